"""How long Triton takes to compile the kernel variants benchmarks/gpu_check.sh launches, measured on this CPU with
the ahead-of-time path of tools/kernel_aot.py (sm_90; no GPU needed).

The variants:
  1. every kernel launch of the kernel tests (tests/test_kernel_*.py), recorded while they run under Triton's
     interpreter (here the two bf16 halves of a split fp32 w are fp32 tensors: those few variants are recorded with
     fp32 operands);
  2. the launches of their GPU-only tests (test_gpu_*) and of the rows gpu_check.sh asks bench_ops.py and bench_step.py
     for, recorded on meta tensors at their shapes (they need a GPU to run).
Each distinct compile (kernel, argument types, constexprs, integer specialisations, alignment hints, launch options)
is compiled once, --jobs processes at a time; the wall time, and the sum of the per-variant times (one core), are
printed. Rows for benchmarks/RESULTS.md are printed at the end.

    python3 benchmarks/compile_cost.py [--jobs N] [--launches FILE]

As a pytest plugin (`-p compile_cost`, with CLPDD_RECORD_LAUNCHES=FILE) it records the launches of a test run.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))   # tools/ (the compile tool)

_recording = None


def pytest_configure(config):
    global _recording
    if os.environ.get("CLPDD_RECORD_LAUNCHES"):
        from tools import kernel_aot as aot
        _recording = aot.recording(run=True)
        config._clpdd_launches = _recording.__enter__()


def pytest_unconfigure(config):
    if _recording is not None:
        from tools import kernel_aot as aot
        _recording.__exit__(None, None, None)
        aot.save_launches(config._clpdd_launches, os.environ["CLPDD_RECORD_LAUNCHES"])


def test_launches(path: str) -> None:
    """Run the kernel tests under the interpreter, recording their launches into `path`."""
    env = dict(os.environ, TRITON_INTERPRET="1", CLPDD_RECORD_LAUNCHES=path,
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("CLPDD_AOT_CHECK", None)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py"))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "compile_cost", "-p", "no:cacheprovider", *files],
                   cwd=ROOT, env=env, check=False)


def gpu_launches() -> list[tuple]:
    """The launches of the GPU-only tests and of gpu_check.sh's benchmark rows, on meta tensors at their shapes."""
    import torch

    import bench_ops
    from clpdd_fast import reference
    from clpdd_fast.kernels import backend as kb
    from clpdd_fast.kernels import cholesky, small_ridge, tiles
    from clpdd_fast.kernels import gram as kgram
    from clpdd_fast.kernels.contract import CEParams
    from tools import kernel_aot as aot

    def t(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")

    def ce(n, d, c, x_dt, w_dt, chunk, need_x=True, need_w=True, precision="high"):
        x, w, target = t(n, d, dtype=x_dt), t(d, c, dtype=w_dt), t(n, dtype=torch.int64)
        params = CEParams(0.1, -100, chunk, precision)
        _, lse = kb.linear_ce_forward(x, w, target, params)
        if need_x or need_w:
            kb.linear_ce_backward(x, w, target, lse, t(n, dtype=lse.dtype), params, need_x, need_w)

    def ridge(m, d, c, mode, backward=True, dtype=torch.float32):
        phi, y = t(m, d, dtype=dtype), t(m, c, dtype=dtype)
        w, factor, _ = kb.ridge_forward(phi, y, 1.0, mode)
        if backward:   # phi needs a gradient, y (one-hot labels) does not
            kb.ridge_backward(phi, y, w, factor, t(d, c), mode, True, False)

    bf16, fp32 = torch.bfloat16, torch.float32
    default = tiles.SMALL_RIDGE_MAX_SIZE
    with aot.recording() as launches:
        try:
            # test_gpu_bf16_linear_ce_and_ridge, test_gpu_large_shapes_..., test_gpu_int64_row_offsets_...
            for w_dt in (bf16, fp32):
                ce(4099, 768, 1000, bf16, w_dt, 4096)
                ce(200_003, 768, 1000, bf16, w_dt, 16384, need_x=False)
            for mode in ("dual", "primal"):
                ridge(1000, 768, 100, mode, backward=False, dtype=bf16)
            cholesky.cholesky(t(1000, 1000))
            ce(2**31 // 768 + 4099, 768, 16, bf16, bf16, 1 << 20, need_x=False, need_w=False)
            # bench_ops.py --ops ce,ridge-small,cholesky-tiles,ridge,gram --ce-shapes imagenet1k --ridge-m 1000,10000
            n, d, c = bench_ops.CE_SHAPES["imagenet1k"]
            chunk = reference.default_chunk_size(c, d)
            for w_dt, precisions in ((bf16, ("high",)), (fp32, ("high", "highest"))):
                for precision in precisions:
                    ce(n, d, c, bf16, w_dt, chunk, need_x=False, precision=precision)
            for m in (10, 32, 64, 128):
                for max_size in (small_ridge.size_limit(fp32), 0):
                    tiles.SMALL_RIDGE_MAX_SIZE = max_size
                    ridge(m, bench_ops.RIDGE_D, max(1, m // 2), "dual")
            tiles.SMALL_RIDGE_MAX_SIZE = default
            a = kgram.gram(t(768, 1536), 1.0)
            for block, warps in tiles.CHOLESKY_CANDIDATES:
                factor = cholesky.cholesky(a, block, num_warps=warps)[0]
                cholesky.cholesky_solve(t(768, 1000), factor, block, num_warps=warps)
            for m in (1000, 10000):
                for mode in ("primal", "dual"):
                    ridge(m, bench_ops.RIDGE_D, bench_ops.RIDGE_C, mode)
                cholesky.cholesky_solve(t(m, 1000), cholesky.cholesky(kgram.gram(t(m, 768), 1.0))[0])
                kgram.gram(t(m, 768), 1.0)
            # bench_step.py --imagenet: the ridge probe of m = 1000 fp32 features (primal), the CE on 1.28 M bf16
            ridge(1000, 768, 1000, "primal")
            ce(1_281_167, 768, 1000, bf16, fp32, reference.default_chunk_size(1000, 768), need_x=False)
        finally:
            tiles.SMALL_RIDGE_MAX_SIZE = default
    return launches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--launches", default=None, help="launches of the kernel tests recorded before (skips the "
                   "interpreted test run)")
    args = p.parse_args(argv)
    from clpdd_fast import settings
    if settings.triton_interpret():
        p.error("run it without TRITON_INTERPRET=1 (the compiling process needs the compiled kernels)")
    sys.path.insert(0, str(HERE))
    path = args.launches
    if path is None:
        path = os.path.join(tempfile.mkdtemp(), "test_launches.pkl")
        start = time.time()
        test_launches(path)
        print(f"# tests/test_kernel_*.py under the interpreter, recorded in {time.time() - start:.0f} s", flush=True)
    from tools import kernel_aot as aot
    import triton
    tests = aot.variants(aot.load_launches(path), 90, every=True)
    seen = {v.key(exact=True) for v in tests}
    gpu = [v for v in aot.variants(gpu_launches(), 90, every=True) if v.key(exact=True) not in seen]
    todo = tests + gpu
    start = time.time()
    results = aot.compile_all(todo, 90, args.jobs)
    wall = time.time() - start
    errors = [r["error"] for r in results if "error" in r]
    one_core = sum(r["seconds"] for r in results)
    cpu = platform.processor() or platform.machine()
    print(f"# {len(tests)} variants from the tests run on the CPU + {len(gpu)} more from the GPU-only tests and the "
          f"benchmark rows: {len(todo)} compiled for sm_90 in {wall:.0f} s wall with {args.jobs} processes "
          f"({one_core:.0f} s summed over variants, i.e. on one core); {len(errors)} failed to compile")
    for e in errors:
        print("error:", e)
    print(f"| variants (tests + GPU-only tests and benchmarks) | processes | wall s | summed s | machine | triton |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {len(tests)} + {len(gpu)} = {len(todo)} | {args.jobs} | {wall:.0f} | {one_core:.0f} | {cpu}, "
          f"{os.cpu_count()} cores | {triton.__version__} |")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
