"""Static performance report of the linear CE's hot kernels for a GPU that need not be here (sm_90 by default).

At the ImageNet-1K shape (N = 1,281,167, d = 768, C = 1000) and the ImageNet-100 shape (N = 126,689, C = 100), the
Triton backend's CE calls run on meta tensors (no data, no GPU) for each precision path, every kernel launch is
recorded (tools/kernel_aot.py), and each distinct compiled variant is compiled for the target with Triton's compiler and
ptxas. One row per (shape, path, kernel role) gives: registers, spill bytes, shared memory, the blocks per SM those
three allow, and from the PTX of the kernel's main loop (the innermost loop with the most product instructions:
its GEMM loop) whether its products run on tensor cores (wgmma / mma), how its operands arrive (asynchronous copies
to shared memory: cp.async or TMA, with the widest copy; synchronous ld.global, with the widest load) and the widest
global load of its other innermost loops (e.g. the coefficient pass of the fused kernel).

    python tools/kernel_report.py [--arch 90] [--jobs N] [--check]

With --check it exits with status 1 when a listed kernel spills registers or its main loop loads an operand
synchronously (tests/test_kernel_aot.py under CLPDD_AOT_CHECK=1, i.e. `make test`). Runs without
TRITON_INTERPRET. Performance evidence without a GPU: it says what the compiler made of the kernels, not how fast
they run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend

if __package__ in (None, ""):   # run as `python tools/kernel_report.py`: the repository root holds `tools`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clpdd_fast import reference  # noqa: E402
from clpdd_fast.kernels import backend as _backend  # noqa: E402
from clpdd_fast.kernels.contract import CEParams, compute_dtype  # noqa: E402
from tools import kernel_aot as aot  # noqa: E402

SHAPES = {"ImageNet-1K": (1_281_167, 768, 1000), "ImageNet-100": (126_689, 768, 100)}
# (x dtype, w dtype, precision of the backend's CEParams, label): the paths the CE runs at these shapes
PATHS = [(torch.bfloat16, torch.float32, "high", "bf16 x, fp32 w (bf16 pair)"),
         (torch.bfloat16, torch.bfloat16, "highest", "bf16"),
         (torch.float16, torch.float16, "highest", "fp16"),
         (torch.float32, torch.float32, "medium", "fp32, tf32"),
         (torch.float32, torch.float32, "highest", "fp32, ieee")]
TAU, IGNORE = 0.05, -100
REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 228 * 1024, 64   # Hopper (sm_90)


ROLES = {"_ce_fused_kernel": "logits+lse+coef (fused)", "_ce_forward_kernel": "forward",
         "_ce_coef_kernel": "coef (recomputed)"}


def _role(kernel, args, d: int) -> str:
    """What a recorded launch does in the CE: the kernel's part, the matmul as dW (M = d) or dX."""
    name = kernel.fn.__name__
    if name == "_matmul_kernel":
        return "dW = x^T coef" if args[5] == d else "dX = coef w^T"
    return ROLES.get(name, name)


def ce_launches(shape: tuple[int, int, int], x_dt, w_dt, precision: str) -> list[tuple[str, tuple]]:
    """[(role, (kernel, args, kwargs))] of the CE's calls at this shape and path with both gradients, not run:
    "mean/sum", the fused forward + backward that reductions mean and sum run, and "none", the forward and
    recomputing backward of reduction "none"."""
    n, d, num_classes = shape
    x, w = aot._meta(n, d, dtype=x_dt), aot._meta(d, num_classes, dtype=w_dt)
    t = aot._meta(n, dtype=torch.int64)
    params = CEParams(TAU, IGNORE, reference.default_chunk_size(num_classes, d), precision)
    rows = []
    for call in ("mean/sum", "none"):
        with aot.recording() as launches:
            if call == "mean/sum":
                g = aot._meta(n, dtype=compute_dtype(x, w))
                _backend.linear_ce_forward_backward(x, w, t, g, params, True, True)
            else:
                _, lse = _backend.linear_ce_forward(x, w, t, params)
                g = aot._meta(n, dtype=lse.dtype)
                _backend.linear_ce_backward(x, w, t, lse, g, params, True, True)
        rows += [(f"{call}: {_role(launch[0], launch[1], d)}", launch) for launch in launches]
    return rows


def blocks_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM that registers (allocated per warp in units of 256), shared memory (+1 KB reserved
    per block) and warps allow."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(REGISTERS_PER_SM // (per_warp * num_warps), SHARED_PER_SM // (shared + 1024), WARPS_PER_SM // num_warps)


def collect(arch: int, jobs: int) -> list[dict]:
    """One row per (shape, path, role): the variant of that role launched most often (later chunks' dW accumulates,
    the first chunk's does not: the later one), with its compile results."""
    target = make_backend(GPUTarget("cuda", arch, 32))
    rows, todo, index = [], [], {}
    for shape_name, shape in SHAPES.items():
        for x_dt, w_dt, precision, label in PATHS:
            counts: dict[str, dict[str, list]] = {}
            for role, (kernel, args, kwargs) in ce_launches(shape, x_dt, w_dt, precision):
                v = aot.Variant(kernel, args, {"debug": False, **kwargs}, target)
                counts.setdefault(role, {}).setdefault(v.key(exact=True), [v, 0])[1] += 1
            for role, found in counts.items():
                key, (v, _) = max(found.items(), key=lambda item: item[1][1])
                if key not in index:
                    index[key] = len(todo)
                    todo.append(v)
                rows.append(dict(shape=shape_name, path=label, role=role, variant=v, i=index[key]))
    results = aot.compile_all(todo, arch, jobs)
    for row in rows:
        row.update(results[row["i"]])
    return rows


def _describe_loop(loop: dict) -> tuple[str, str, str, str]:
    if not loop:
        return "no loop", "", "", ""
    copies = (f"{loop['async_copies']} cp.async <= {loop['async_bytes']} B" if loop["async_copies"] else "") + \
        (f" {loop['tma']} TMA" if loop["tma"] else "")
    loads = f"{loop['sync_loads']} x <= {loop['sync_bytes']} B" if loop["sync_loads"] else "none"
    others = ", ".join(f"{o['sync_bytes']} B" for o in loop["others"] if o["sync_loads"]) or "-"
    return loop["tensor_cores"] or "FMA", copies.strip() or "none", loads, others


def failures(row: dict) -> list[str]:
    """Why a row fails the check: a compile error, a spill, a main loop without asynchronous copies or with a
    synchronous global load."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["spill"]:
        out.append(f"spills {row['spill']} bytes per thread")
    loop = row["loop"]
    if not loop.get("async_copies") and not loop.get("tma"):
        out.append("main loop without asynchronous copies")
    if loop.get("sync_loads"):
        out.append(f"main loop loads {loop['sync_loads']} times synchronously (<= {loop['sync_bytes']} B)")
    return out


def table(rows: list[dict]) -> str:
    head = ("| shape | path | kernel | regs | spill B | smem KB | blocks/SM | tensor cores | main loop: async copies "
            "| main loop: ld.global | other loops: widest ld.global |\n|" + "---|" * 11)
    lines = [head]
    for r in rows:
        v = r["variant"]
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['path']} | {r['role']} | compile error: {r['error'][:80]} |")
            continue
        blocks = blocks_per_sm(r["regs"], r["shared"], v.options.num_warps)
        tc, copies, loads, others = _describe_loop(r["loop"])
        lines.append(f"| {r['shape']} | {r['path']} | {r['role']} (w{v.options.num_warps} s{v.options.num_stages}) | "
                     f"{r['regs']} | {r['spill']} | {r['shared'] / 1024:.0f} | {blocks} | {tc} | {copies} | {loads} | "
                     f"{others} |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--check", action="store_true", help="exit with status 1 on a spill or a synchronous main loop")
    args = p.parse_args(argv)
    start = time.time()
    rows = collect(args.arch, args.jobs)
    print(f"# sm_{args.arch} static (no GPU) · triton {triton.__version__} · torch {torch.__version__} · commit "
          f"{_commit()} · {len({r['i'] for r in rows})} variants compiled in {time.time() - start:.0f} s")
    print(table(rows))
    bad = [f"{r['shape']} {r['path']} {r['role']}: {why}" for r in rows for why in failures(r)]
    for line in bad:
        print("FAIL", line)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
