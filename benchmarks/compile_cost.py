"""The kernel variants benchmarks/gpu_check.sh launches: how long Triton takes to compile them, measured on this CPU
for sm_90 with the ahead-of-time path of tools/kernel_aot.py (no GPU needed), and, with --warm on the GPU machine,
gpu_check.sh's compile step: every one of them compiled there, with all its cores, into Triton's on-disk cache, from
which the tests and the benchmarks then load them.

The variants:
  1. every kernel launch of the kernel tests (tests/test_kernel_*.py), recorded while they run under Triton's
     interpreter with CUDA hidden, in --jobs processes (interleaved shards: pytest_shard.py). Tests that
     spy on the kernels themselves fail under the recorder, which is expected. Recorded there, the two bf16 halves of
     a split fp32 w are the interpreter's fp32 stand-ins: those few variants the tests compile themselves on the GPU;
  2. the launches of their GPU-only tests (test_gpu_*) and of the rows gpu_check.sh asks bench_ops.py and bench_step.py
     for, recorded on meta tensors at their shapes (they need a GPU to run).
Each distinct compile (kernel, argument types, constexprs, integer specialisations, alignment hints, launch options)
counts once.

Measuring (the default): each variant compiled for sm_90 by Triton's compiler, --jobs processes at a time. Printed:
the time the recording took, the compile wall time and per-variant times (their sum: the time on one core), and, with
a Triton that builds a C launcher per kernel signature at first launch (3.6, the GPU machines' version; 3.8 has one
generic launcher), how many launchers there are and how long the C compiler takes for them. Rows for
benchmarks/RESULTS.md at the end.

Warming (--warm, on the GPU machine): each distinct launch goes through its kernel's own `warmup`, a launch without
the launch: Triton's binder specialises the recorded arguments, the target is the one the device reports and the
options are the launch's, so the cache entry it writes is the very one the launch will look up (a triton.compile
call with a key rebuilt by hand would miss silently on any difference: an option the JIT adds, another target). The
compiled kernel is then loaded on the GPU, which builds its C launcher into the same cache. --jobs spawned processes
(CUDA does not survive a fork) take the variants one at a time. Exit status 1 when a variant fails to compile or load.

    python3 benchmarks/compile_cost.py [--jobs N] [--launches FILE]    # measure (CPU or GPU machine)
    python3 benchmarks/compile_cost.py --warm [--jobs N]               # fill Triton's cache (GPU: gpu_check.sh)

As a pytest plugin (`-p compile_cost`, with CLPDD_RECORD_LAUNCHES=FILE) it records the launches of a test run.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
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


def test_launches(jobs: int) -> list[tuple]:
    """Run the kernel tests under the interpreter with CUDA hidden, in `jobs` processes (every jobs-th test each: the
    slow ones spread out), recording their launches; returns them (with this process's kernels and meta tensors).
    Prints the tests' outcomes: many failures say the interpreter is broken here, and the recording incomplete."""
    from tools import kernel_aot as aot
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernel_*.py"))
    launches, outcomes = [], collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for i in range(jobs):
            env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", CLPDD_SHARD=f"{i}/{jobs},interleaved",
                       CLPDD_RECORD_LAUNCHES=os.path.join(tmp, f"{i}.pkl"),
                       PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
            env.pop("CLPDD_AOT_CHECK", None)
            with open(os.path.join(tmp, f"{i}.txt"), "w") as log:   # the child keeps its own descriptor
                shards.append(subprocess.Popen(
                    [sys.executable, "-m", "pytest", "-q", "-p", "compile_cost", "-p", "pytest_shard", "-p",
                     "no:cacheprovider", *files], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for i, proc in enumerate(shards):
            proc.wait()
            tail = Path(tmp, f"{i}.txt").read_text().splitlines()[-1:]
            for count, outcome in re.findall(r"(\d+) (passed|failed|skipped|errors?)", " ".join(tail)):
                outcomes[outcome] += int(count)
            path = os.path.join(tmp, f"{i}.pkl")
            if os.path.exists(path):
                launches += aot.load_launches(path)
            else:
                print(f"# recording shard {i}/{jobs} wrote no launches: {tail}")
    print(f"# the kernel tests under the recorder: {dict(outcomes)} (the few that spy on the kernels themselves fail "
          f"there)")
    return launches


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


def distinct(launches: list[tuple]) -> dict:
    """{key: Variant} for each distinct compile of these launches, in first-launch order (Variant.launch is that first
    launch): tools/kernel_aot.py's variants(every=True), by Triton's specialisation rules for sm_90, which are the
    same on every NVIDIA target."""
    from tools import kernel_aot as aot
    return {v.key(exact=True): v for v in aot.variants(launches, 90, every=True)}


def launcher_sources(variants: list) -> list[str]:
    """The distinct C sources of the launchers Triton builds at first launch, one per kernel signature and constexpr
    set, as triton 3.6's CudaLauncher writes them (without tensor descriptors, which these kernels do not take); []
    with a Triton that launches every kernel through one generic launcher (3.8)."""
    try:
        from triton.backends.nvidia.driver import make_launcher
    except ImportError:
        return []
    from triton.compiler import ASTSource
    sources = set()
    for v in variants:
        src = ASTSource(v.kernel, v.signature, v.constexprs, v.attrs)
        index = {name: (i,) for i, name in enumerate(src.fn.arg_names)}
        constants = {index.get(k, k): value for k, value in src.constants.items()}
        sources.add(make_launcher(constants, dict(src.signature), None))
    return sorted(sources)


def build_launchers(sources: list[str], jobs: int) -> list[float]:
    """Seconds the C compiler takes for each launcher, `jobs` at a time, with the flags of triton/runtime/build.py
    (not linked against libcuda, which a machine without a GPU lacks)."""
    import triton
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    include = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include"),
               sysconfig.get_paths()["include"]]

    def build(source: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "launcher.c")
            Path(path).write_text(source)
            start = time.time()
            subprocess.run([cc, path, "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o", os.path.join(tmp, "launcher.so"),
                            *(f"-I{d}" for d in include)], check=True, capture_output=True)
            return time.time() - start

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(build, sources))


_WARM: dict = {}   # in a warming process: {path: the launches saved there}


def warm_one(job: tuple[str, int]) -> dict:
    """Compile launch i of the launches saved at `path` through its kernel's `warmup` (into Triton's cache) and load
    it on the GPU (building its launcher): {seconds} or {error, seconds}."""
    path, i = job
    start, what = time.time(), f"launch {i}"
    try:
        if path not in _WARM:
            from tools import kernel_aot as aot
            _WARM[path] = aot.load_launches(path)
        kernel, args, kwargs = _WARM[path][i]
        what = kernel.fn.__name__
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()   # what the first launch does: build the launcher, load the binary, check resources
        return dict(seconds=time.time() - start)
    except Exception as err:   # reported: the launch in the tests would fail the same way
        return dict(error=f"{what}: {type(err).__name__}: {str(err)[:300]}", seconds=time.time() - start)


def warm(launches: list[tuple], jobs: int) -> list[dict]:
    """warm_one over these launches in `jobs` spawned processes (a process that dies fails the whole call, rather
    than leaving it waiting)."""
    from tools import kernel_aot as aot
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.pkl")
        aot.save_launches(launches, path)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(warm_one, [(path, i) for i in range(len(launches))]))


def seconds(results: list[dict]) -> str:
    """Per-variant times: mean, median and largest."""
    times = [r["seconds"] for r in results] or [0.0]
    return (f"{statistics.mean(times):.2f} s per variant (median {statistics.median(times):.2f}, largest "
            f"{max(times):.1f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes: recording and compiling")
    p.add_argument("--launches", default=None, help="file of the kernel tests' launches: read when it exists (skips "
                   "the interpreted test run), else recorded and written there")
    p.add_argument("--warm", action="store_true", help="compile them for this machine's GPU into Triton's cache "
                   "(gpu_check.sh's compile step) instead of measuring the compile for sm_90")
    args = p.parse_args(argv)
    from clpdd_fast import settings
    if settings.triton_interpret():
        p.error("run it without TRITON_INTERPRET=1 (the compiling process needs the compiled kernels)")
    import torch
    import triton

    from tools import kernel_aot as aot
    if args.warm and not torch.cuda.is_available():
        p.error("--warm compiles for this machine's GPU, and torch sees none")
    sys.path.insert(0, str(HERE))
    start = time.time()
    if args.launches and os.path.exists(args.launches):
        recorded = aot.load_launches(args.launches)
        print(f"# {len(recorded)} launches of tests/test_kernel_*.py read from {args.launches}", flush=True)
    else:
        recorded = test_launches(args.jobs)
        print(f"# {len(recorded)} launches of tests/test_kernel_*.py recorded under the interpreter in "
              f"{time.time() - start:.0f} s with {args.jobs} processes", flush=True)
        if args.launches:
            aot.save_launches(recorded, args.launches)
    tests = distinct(recorded)
    gpu = {k: x for k, x in distinct(gpu_launches()).items() if k not in tests}
    todo = list({**tests, **gpu}.values())
    what = (f"{len(tests)} variants from the tests run on the CPU + {len(gpu)} more from the GPU-only tests and the "
            f"benchmark rows")
    start = time.time()
    if args.warm:
        target = triton.runtime.driver.active.get_current_target()   # also builds Triton's CUDA utilities, once
        results = warm([v.launch for v in todo], args.jobs)
        errors = [r["error"] for r in results if "error" in r]
        print(f"# {what}: {len(todo)} compiled into Triton's cache for {target.backend} {target.arch} and loaded in "
              f"{time.time() - start:.0f} s wall with {args.jobs} processes, {seconds(results)}; {len(errors)} failed")
        for e in errors:
            print("error:", e)
        return 1 if errors else 0
    results = aot.compile_all(todo, 90, args.jobs)
    wall = time.time() - start
    errors = [r["error"] for r in results if "error" in r]
    one_core = sum(r["seconds"] for r in results)
    launchers = build_launchers(launcher_sources(todo), args.jobs)
    cpu = platform.processor() or platform.machine()
    print(f"# {what}: {len(todo)} compiled for sm_90 in {wall:.0f} s wall with {args.jobs} processes "
          f"({one_core:.0f} s summed over variants, i.e. on one core; {seconds(results)}); {len(errors)} failed to "
          f"compile")
    print(f"# {len(launchers)} distinct C launchers (triton {triton.__version__}): {sum(launchers):.0f} s summed, "
          f"{statistics.mean(launchers or [0]):.2f} s each")
    for e in errors:
        print("error:", e)
    print(f"| variants (tests + GPU-only tests and benchmarks) | processes | wall s | summed s | s per variant | "
          f"C launchers: count, summed s | machine | triton |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {len(tests)} + {len(gpu)} = {len(todo)} | {args.jobs} | {wall:.0f} | {one_core:.0f} | "
          f"{one_core / max(1, len(todo)):.2f} | {len(launchers)}, {sum(launchers):.0f} | {cpu}, {os.cpu_count()} "
          f"cores | {triton.__version__} |")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
