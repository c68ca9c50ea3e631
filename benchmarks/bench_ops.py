"""Benchmark the public ops: Triton vs torch eager, torch.compile, torch's chunked linear CE, Liger-Kernel and
cut-cross-entropy; and, with --device cpu, the CE's torch path against torch's chunked linear CE on the CPU.

Each row: median (and 20th/80th percentile) time from triton.testing.do_bench, peak memory beyond the inputs from
torch.cuda.max_memory_allocated, achieved TFLOP/s and the ratio to the dense matmul rate measured in the same run.
Rows are printed and appended to a markdown file (default benchmarks/RESULTS.md) under a header that names the
date, GPU, commit and command.

    python3 benchmarks/bench_ops.py                 # all shapes of the issue (ImageNet-1K/100 CE, ridge m=100..10000,
                                                    # small systems m=10..128: one launch vs the blocked path)
    python3 benchmarks/bench_ops.py --quick         # small shapes: a smoke run in seconds
    python3 benchmarks/bench_ops.py --ops ce --ce-shapes imagenet100 --no-compile --results /tmp/rows.md

Needs a CUDA GPU (exits with status 2 and a message otherwise), except the CPU mode:

    python3 benchmarks/bench_ops.py --device cpu    # linear_softmax_ce forward + dW (x frozen), N = 200k and 1.28M,
                                                    # d = 768, C = 1000, fp32 and bf16 x, fp32 w
    python3 benchmarks/bench_ops.py --device cpu --cpu-n 20000 --reps 1 --no-compile --no-append   # a smoke run

There every variant runs in its own process (its peak resident set is its own), one forward + backward after a small
warm-up call (torch.compile: a full-size one), the variants interleaved, --reps rounds; reported: the median wall
time, the process's CPU time, the peak resident set beyond the inputs (sampled every millisecond), the loss, and
dW's largest difference from F.linear_cross_entropy's relative to its largest entry. Ratios are to
F.linear_cross_entropy (chunked) measured in the same run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RssSampler, Table, results_header, unit_rows  # noqa: E402

CE_SHAPES = {  # name: (N real features, d, C)
    "imagenet1k": (1_281_167, 768, 1000),
    "imagenet100": (126_689, 768, 100),
    "quick": (65_537, 768, 1000),
}
RIDGE_M = (100, 1000, 10000)
RIDGE_D, RIDGE_C = 768, 1000
HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (CE N=65537, ridge m in {100, 1000})")
    p.add_argument("--ops", default="ce,ridge,ridge-small,cholesky-tiles,gram",
                   help=f"comma list of {','.join(OPS)}, run in the order given (matmul: only the reference rates, "
                   "which every run measures before ce and gram rows)")
    p.add_argument("--ce-shapes", default="imagenet1k,imagenet100", help=f"comma list of {sorted(CE_SHAPES)}")
    p.add_argument("--ridge-m", default=",".join(map(str, RIDGE_M)), help="comma list of m (d=768, C=1000)")
    p.add_argument("--small-m", default="10,32,64,128", help="comma list of m for the one-launch small ridge "
                   "kernel against the blocked path (d=768, C=m/2)")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines (they compile ~1 min)")
    p.add_argument("--no-mixed", action="store_true", help="skip the bf16-x / fp32-w CE rows")
    p.add_argument("--impls", default="", help="comma list of substrings: only CE/ridge implementations whose "
                   "name contains one (e.g. 'compile' or 'triton'); empty runs all")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file the rows are appended to")
    p.add_argument("--no-append", action="store_true", help="print rows only")
    p.add_argument("--warm-only", action="store_true", help="call each selected implementation once (compiling its "
                   "kernels into the on-disk caches) and time nothing; no rows are appended")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the linear CE's torch path against "
                   "torch's chunked F.linear_cross_entropy on the CPU (the --cpu-* options; --ops is ignored)")
    p.add_argument("--cpu-n", default="200000,1281167", help="cpu: comma list of N (d=768, C=1000)")
    p.add_argument("--cpu-dtypes", default="fp32,bf16", help="cpu: comma list of x dtypes (w is fp32)")
    p.add_argument("--reps", type=int, default=3, help="cpu: rounds; each variant runs once per round, in its own "
                   "process")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cpu: torch.set_num_threads")
    p.add_argument("--max-logits-gib", type=float, default=4.0, help="cpu: skip the full-logits variants when the "
                   "N x C fp32 logits exceed this")
    p.add_argument("--cpu-blocks", default="", help="cpu: comma list of reference.CPU_BLOCK_ELEMENTS values to "
                   "measure the torch path with, beside the default")
    p.add_argument("--pythonpath", action="append", default=[], help="cpu: also measure the torch path of the "
                   "clpdd_fast found here (e.g. an older commit)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: one CPU measurement (JSON)
    args = p.parse_args(argv)
    for name in args.cpu_dtypes.split(","):
        if name not in CPU_DTYPES:
            p.error(f"--cpu-dtypes: expected names from {sorted(CPU_DTYPES)}, got {name!r}")
    for name in args.ce_shapes.split(","):
        if name not in CE_SHAPES:
            p.error(f"--ce-shapes: expected names from {sorted(CE_SHAPES)}, got {name!r}")
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        p.error(f"--ops: expected names from {list(OPS)}, got {sorted(unknown)}")
    args.no_append = args.no_append or args.warm_only
    if args.quick:
        args.ce_shapes, args.ridge_m = "quick", "100,1000"
    return args


def wanted(args, impl: str) -> bool:
    return not args.impls or any(key in impl for key in args.impls.split(","))


COLUMNS = ["op", "shape", "dtype", "impl", "median ms", "p20-p80 ms", "peak extra MiB", "TFLOP/s",
           "x dense rate", "note"]


WARM_ONLY = False   # --warm-only: bench() calls fn once and measures nothing


def bench(fn, setup=None):
    """(median, p20, p80) ms with do_bench, and the peak memory (MiB) of one call beyond what was allocated before."""
    from triton.testing import do_bench
    if setup:
        setup()
    fn()
    torch.cuda.synchronize()
    if WARM_ONLY:
        return (float("nan"),) * 4
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return med, p20, p80, peak


def matmul_rates(table: Table) -> dict:
    """Dense matmul TFLOP/s in this run: bf16 (tensor cores) and fp32 with exact products (no TF32)."""
    rates = {}
    n = 8192
    for name, dt in (("bf16", torch.bfloat16), ("fp32-ieee", torch.float32)):
        a = torch.randn(n, n, device="cuda", dtype=dt)
        b = torch.randn(n, n, device="cuda", dtype=dt)
        torch.backends.cuda.matmul.allow_tf32 = False
        med, p20, p80, peak = bench(lambda: a @ b)
        rates[name] = 2 * n**3 / med / 1e9
        table.row("matmul", f"{n}x{n}x{n}", name, "torch.mm (cuBLAS)", f"{med:.3f}", f"{p20:.3f}-{p80:.3f}",
                  f"{peak:.0f}", f"{rates[name]:.0f}", "1.00", "reference rate")
        del a, b
    return rates


def _ce_naive(x, w, t, tau):
    return F.cross_entropy((x.float() @ w.float()) / tau, t)


TORCH_CE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")   # torch >= 2.13
NO_TORCH_CE = f"needs torch >= 2.13 for F.linear_cross_entropy (this is torch {torch.__version__})"
PLAIN_ANCHOR = "torch's chunked algorithm, plain torch ops"
PLAIN_CHUNK = 8192   # rows per chunk of the plain anchor: 8192 x 1000 fp32 logits = 31 MiB


def _ce_torch_chunked(x, w, t, tau):
    """torch's own chunked linear CE (torch >= 2.13), its weight (C, d) = (w / tau)^T: the gradients are computed
    in the forward, chunk size and accumulation dtype from its defaults."""
    if not TORCH_CE:
        raise RuntimeError(NO_TORCH_CE)
    return F.linear_cross_entropy(x, (w / tau).T, t, options=torch.nn.LinearCrossEntropyOptions())


class _ChunkedCE(torch.autograd.Function):
    """The algorithm of torch's chunked linear CE written with plain torch ops, so that any torch runs it (the anchor
    of the CE rows where F.linear_cross_entropy is missing, and beside it where it exists): per chunk of rows one
    logits GEMM in x's dtype (bf16 operands on cuBLAS), the softmax and the coefficients (softmax - onehot) / N in
    place in fp32, and the dW GEMM (coefficients cast to x's dtype) added into an fp32 dW; the mean loss and dW leave
    the forward, the backward only scales dW. x is frozen (no dX)."""

    @staticmethod
    def forward(ctx, x, weight, t, chunk):
        n = x.shape[0]
        wt = weight.to(x.dtype).T                                   # (d, C)
        grad = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk):
            xc, tc = x[start:start + chunk], t[start:start + chunk, None]
            z = (xc @ wt).float()                                   # logits
            lse = torch.logsumexp(z, 1, keepdim=True)
            total += (lse - z.gather(1, tc)).sum()
            z.sub_(lse).exp_().scatter_add_(1, tc, torch.full(tc.shape, -1.0, device=x.device)).div_(n)
            grad += (z.T.to(x.dtype) @ xc).float()                   # dW (C, d)
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return None, grad_loss * grad, None, None


def _ce_plain_chunked(x, w, t, tau, chunk=PLAIN_CHUNK):
    """`_ChunkedCE` with torch's weight layout (C, d) = (w / tau)^T; dW reaches w through autograd."""
    return _ChunkedCE.apply(x, (w / tau).T, t, chunk)


def bench_ce(table: Table, shape_name: str, args, rates: dict):
    from clpdd_fast import ops
    n, d, num_classes = CE_SHAPES[shape_name]
    shape = f"{shape_name} N={n} d={d} C={num_classes}"
    flops = 6.0 * n * d * num_classes      # forward GEMM + recomputed logits GEMM + dW GEMM
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randint(0, num_classes, (n,), device="cuda", generator=g)
    variants = [("bf16", torch.bfloat16)] + ([] if args.no_mixed else [("bf16 x / fp32 w", torch.float32)])
    for dname, wdt in variants:
        w = (torch.randn(d, num_classes, device="cuda", generator=g) * 0.05).to(wdt).requires_grad_()
        rate = rates.get("bf16" if wdt == torch.bfloat16 else "fp32-ieee")

        def run(fn):
            def step():
                w.grad = None
                fn().backward()
            return step

        def triton_ce(precision="high"):
            return lambda: ops.linear_softmax_ce(x, w, t, args.tau, backend="triton", precision=precision,
                                                 check_finite=False)

        mixed = wdt == torch.float32
        impls = [("triton (fused)" + (", w as two bf16 halves" if mixed else ""), run(triton_ce()),
                  "fwd + dW; precision='high'")]
        if mixed:   # the exact-fp32-products alternative to the split
            impls.append(("triton (fused), precision='highest'", run(triton_ce("highest")),
                          "fwd + dW; fp32 FMA products"))
        impls += [
            ("torch eager, chunked reference", run(lambda: ops.linear_softmax_ce(x, w, t, args.tau, backend="torch",
                                                                                  check_finite=False)), "fwd + dW"),
            ("torch eager, full logits", run(lambda: _ce_naive(x, w, t, args.tau)), "fwd + dW; N x C logits"),
        ]
        if not args.no_compile:
            compiled = torch.compile(_ce_naive, dynamic=False)
            impls.append(("torch.compile (full logits)", run(lambda: compiled(x, w, t, args.tau)), "fwd + dW"))
        impls.append((PLAIN_ANCHOR + ", weight w / tau", run(lambda: _ce_plain_chunked(x, w, t, args.tau)),
                      f"fwd + dW; w cast to x's dtype; {PLAIN_CHUNK} rows per chunk"))
        impls.append((CPU_ANCHOR + ", weight w / tau", run(lambda: _ce_torch_chunked(x, w.to(x.dtype), t, args.tau)),
                      "fwd + dW; w cast to x's dtype" if TORCH_CE else NO_TORCH_CE))
        impls += _external_ce(x, w, t, args.tau)
        for impl, fn, note in impls:
            if not wanted(args, impl):
                continue
            try:
                med, p20, p80, peak = bench(fn)
            except Exception as err:  # out of memory, missing kernels: record and go on
                table.row("linear_softmax_ce", shape, dname, impl, "-", "-", "-", "-", "-",
                          f"failed: {type(err).__name__}: {str(err)[:80]}")
                torch.cuda.empty_cache()
                continue
            tflops = flops / med / 1e9
            # the split runs on bf16 tensor cores (two products per GEMM): compare it with the bf16 rate
            impl_rate, rate_name = (rates.get("bf16"), "bf16") if "two bf16 halves" in impl else \
                (rate, "bf16" if wdt == torch.bfloat16 else "fp32")
            ratio = f"{med / (flops / impl_rate / 1e9):.2f}" if impl_rate else "-"
            table.row("linear_softmax_ce", shape, dname, impl, f"{med:.2f}", f"{p20:.2f}-{p80:.2f}", f"{peak:.0f}",
                      f"{tflops:.0f}", ratio, note + f"; ratio = time / (3 dense GEMMs at the measured {rate_name} "
                      "rate)")
        del w
        torch.cuda.empty_cache()


def _external_ce(x, w, t, tau):
    """Liger-Kernel (its fused linear CE, and its temperature-scaled one) and cut-cross-entropy when importable (they
    take the class-major (C, d) weight)."""
    out = []
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        xg = x.detach().clone().requires_grad_()   # Liger computes dW only when x requires grad

        def liger():
            wt = (w / tau).T.contiguous() if w.dtype == x.dtype else (w / tau).T.to(x.dtype).contiguous()
            return liger_fused_linear_cross_entropy(xg, wt, t)
        out.append(("Liger-Kernel fused linear CE", _with_backward(liger, w, xg),
                    "needs x.requires_grad for dW, so dX is computed too"))
    except Exception:
        pass
    try:
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as scaled

        def liger_scaled():   # per-row losses of softmax(x W^T / temperature)
            return scaled.apply(x, w.T.to(x.dtype).contiguous(), t, tau).mean()
        out.append(("Liger-Kernel fused linear scaled CE (temperature = tau)", _with_backward(liger_scaled, w),
                    "fwd + dW; w cast to x's dtype"))
    except Exception:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce():
            wt = (w / tau).T.to(x.dtype)
            return linear_cross_entropy(x, wt, t)
        out.append(("cut-cross-entropy", _with_backward(cce, w), "fwd + dW"))
    except Exception:
        pass
    if not out:
        print("# Liger-Kernel / cut-cross-entropy not importable: skipped", flush=True)
    return out


def _with_backward(fn, w, xg=None):
    def step():
        w.grad = None
        if xg is not None:
            xg.grad = None
        fn().backward()
    return step


def bench_ridge(table: Table, args, rates: dict):
    from clpdd_fast import ops
    from clpdd_fast.kernels import cholesky as kchol
    from clpdd_fast.kernels import gram as kgram
    torch.backends.cuda.matmul.allow_tf32 = False
    for m in (int(v) for v in args.ridge_m.split(",")):
        g = torch.Generator(device="cuda").manual_seed(m)
        phi = torch.randn(m, RIDGE_D, device="cuda", generator=g).requires_grad_()
        y = F.one_hot(torch.arange(m, device="cuda") % RIDGE_C, RIDGE_C).float()
        gw = torch.randn(RIDGE_D, RIDGE_C, device="cuda", generator=g)
        modes = ["auto"] + (["dual"] if m > RIDGE_D else [])
        for mode in modes:
            resolved = "dual" if (mode == "dual" or m <= RIDGE_D) else "primal"
            shape = f"m={m} d={RIDGE_D} C={RIDGE_C} {mode}->{resolved}"
            for impl in ("triton", "torch"):
                if not wanted(args, impl):
                    continue

                def step():
                    phi.grad = None
                    w = ops.ridge_solve(phi, y, 1.0, mode, backend=impl, check_finite=False)
                    w.backward(gw)
                try:
                    med, p20, p80, peak = bench(step)
                except Exception as err:
                    table.row("ridge_solve", shape, "fp32", impl, "-", "-", "-", "-", "-", f"failed: {err!s:.80}")
                    continue
                label = "triton (Gram + blocked Cholesky + solves)" if impl == "triton" else \
                    "torch (cuBLAS + cholesky_ex + cholesky_solve)"
                table.row("ridge_solve", shape, "fp32", label, f"{med:.3f}", f"{p20:.3f}-{p80:.3f}",
                          f"{peak:.0f}", "-", "-", "fwd + bwd (dphi)")
        # the factorisation + solve alone, at the dual size n = m, against cuSOLVER
        if args.impls and not wanted(args, "triton cuSOLVER"):
            continue
        a = kgram.gram(phi.detach(), 1.0)
        for impl, fn in (("triton cholesky + cholesky_solve", lambda: kchol.cholesky_solve(y, kchol.cholesky(a)[0])),
                         ("cuSOLVER cholesky_ex + cholesky_solve",
                          lambda: torch.cholesky_solve(y, torch.linalg.cholesky_ex(a)[0]))):
            med, p20, p80, peak = bench(fn)
            flops = m**3 / 3 + 2 * m * m * RIDGE_C
            table.row("cholesky+solve", f"n={m} rhs={RIDGE_C}", "fp32", impl, f"{med:.3f}", f"{p20:.3f}-{p80:.3f}",
                      f"{peak:.0f}", f"{flops / med / 1e9:.1f}", "-", "")


def bench_ridge_small(table: Table, args, rates: dict):
    """The one-launch small-system kernel against the blocked Triton path and torch, dual systems of m images."""
    from clpdd_fast import ops
    from clpdd_fast.kernels import small_ridge as ksmall
    from clpdd_fast.kernels import tiles
    default_max, limit = tiles.SMALL_RIDGE_MAX_SIZE, ksmall.size_limit(torch.float32)
    for m in (int(v) for v in args.small_m.split(",")):
        num_classes = max(1, m // 2)   # two images per class
        g = torch.Generator(device="cuda").manual_seed(m)
        phi = torch.randn(m, RIDGE_D, device="cuda", generator=g).requires_grad_()
        y = F.one_hot(torch.arange(m, device="cuda") % num_classes, num_classes).float()
        gw = torch.randn(RIDGE_D, num_classes, device="cuda", generator=g)
        shape = f"m={m} d={RIDGE_D} C={num_classes} dual"
        for impl, backend, max_size in (("triton one launch (small_ridge)", "triton", limit),
                                        ("triton blocked (Gram + Cholesky + solves)", "triton", 0),
                                        ("torch (cuBLAS + cuSOLVER)", "torch", 0)):
            if not wanted(args, impl) or (max_size and m > limit):
                continue
            for what in ("fwd", "fwd + bwd (dphi)"):
                def step():
                    phi.grad = None
                    w = ops.ridge_solve(phi, y, 1.0, "dual", backend=backend, check_finite=False)
                    if what != "fwd":
                        w.backward(gw)
                tiles.SMALL_RIDGE_MAX_SIZE = max_size
                try:
                    med, p20, p80, peak = bench(step)
                finally:
                    tiles.SMALL_RIDGE_MAX_SIZE = default_max
                table.row("ridge_solve (small)", shape, "fp32", impl, f"{med:.3f}", f"{p20:.3f}-{p80:.3f}",
                          f"{peak:.0f}", "-", "-", what + f"; backend sends n <= {default_max} to small_ridge")


def bench_cholesky_tiles(table: Table, args, rates: dict):
    """Block width and warps of the blocked Cholesky + solve at n = d = 768 (the primal system that ridge_solve
    factors for every m > 768), against cuSOLVER: which setting kernels/cholesky.py should default to."""
    from clpdd_fast.kernels import cholesky as kchol
    from clpdd_fast.kernels import gram as kgram
    from clpdd_fast.kernels import tiles
    n = RIDGE_D
    g = torch.Generator(device="cuda").manual_seed(7)
    a = kgram.gram(torch.randn(n, 2 * n, device="cuda", generator=g), 1.0)
    y = torch.randn(n, RIDGE_C, device="cuda", generator=g)
    default = tiles.CHOLESKY
    for impl, block, warps in [("cuSOLVER cholesky_ex + cholesky_solve", 0, 0)] + \
            [(f"triton block {b}, {w} warps", b, w) for b, w in tiles.CHOLESKY_CANDIDATES]:
        if block:
            def fn():
                factor = kchol.cholesky(a, block, num_warps=warps)[0]
                return kchol.cholesky_solve(y, factor, block, num_warps=warps)
        else:
            def fn():
                return torch.cholesky_solve(y, torch.linalg.cholesky_ex(a)[0])
        try:
            med, p20, p80, peak = bench(fn)
        except Exception as err:   # e.g. a register tile too large for the block: record and go on
            table.row("cholesky+solve", f"n={n} rhs={RIDGE_C}", "fp32", impl, "-", "-", "-", "-", "-",
                      f"failed: {type(err).__name__}: {str(err)[:80]}")
            continue
        table.row("cholesky+solve", f"n={n} rhs={RIDGE_C}", "fp32", impl, f"{med:.3f}", f"{p20:.3f}-{p80:.3f}",
                  f"{peak:.0f}", "-", "-", f"defaults: block {default['BLOCK']}, {default['num_warps']} warps")


def bench_gram(table: Table, args, rates: dict):
    from clpdd_fast.kernels import gram as kgram
    torch.backends.cuda.matmul.allow_tf32 = False
    for m in (int(v) for v in args.ridge_m.split(",")):
        x = torch.randn(m, RIDGE_D, device="cuda")
        flops = 2.0 * m * m * RIDGE_D
        for impl, fn in (("triton (lower tiles + mirror)", lambda: kgram.gram(x, 1.0)),
                         ("torch x @ x.T (fp32, no TF32)", lambda: x @ x.T)):
            med, p20, p80, peak = bench(fn)
            tfl = flops / med / 1e9
            table.row("gram", f"m={m} d={RIDGE_D}", "fp32", impl, f"{med:.3f}", f"{p20:.3f}-{p80:.3f}",
                      f"{peak:.0f}", f"{tfl:.1f}", f"{rates['fp32-ieee'] / tfl:.2f}" if "fp32-ieee" in rates else "-",
                      "symmetric: half the flops of a full product")


# ----------------------------------------------------------------------------------------------- CPU: torch path
CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_D, CPU_C = 768, 1000
CPU_ANCHOR = "F.linear_cross_entropy (chunked)"
CPU_OURS = "torch path (linear_softmax_ce)"
FULL_LOGITS = ("torch eager, full logits", "torch.compile (full logits)")


def _cpu_step(impl: str, x, w, t, tau: float):
    """One forward + dW (x frozen, w an fp32 leaf) of the variant `impl`; returns the loss."""
    from clpdd_fast import ops
    if impl.startswith("torch path"):
        loss_fn = lambda a: ops.linear_softmax_ce(a, w, t[:len(a)], tau, backend="torch")   # noqa: E731
    elif impl == CPU_ANCHOR:
        loss_fn = lambda a: _ce_torch_chunked(a, w, t[:len(a)], tau)   # noqa: E731
    elif impl == PLAIN_ANCHOR:
        loss_fn = lambda a: _ce_plain_chunked(a, w, t[:len(a)], tau)   # noqa: E731
    elif impl == FULL_LOGITS[0]:
        loss_fn = lambda a: F.cross_entropy(a.to(w.dtype) @ w / tau, t[:len(a)])   # noqa: E731
    else:
        compiled = torch.compile(lambda a, b, c: F.cross_entropy(a.to(b.dtype) @ b / tau, c), dynamic=False)
        loss_fn = lambda a: compiled(a, w, t[:len(a)])   # noqa: E731

    def step(a=x):
        w.grad = None
        loss = loss_fn(a)
        loss.backward()
        return loss
    return step


def cpu_measure(cfg: dict) -> dict:
    """In a process of its own: build the inputs, warm up, then time one forward + backward and sample its RSS."""
    import clpdd_fast
    from clpdd_fast import reference
    torch.set_num_threads(cfg["threads"])
    if cfg["block"]:
        reference.CPU_BLOCK_ELEMENTS = cfg["block"]
    g = torch.Generator().manual_seed(0)
    n = cfg["n"]
    x = unit_rows(n, CPU_D, CPU_DTYPES[cfg["dtype"]], g)
    w = (torch.randn(CPU_D, CPU_C, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, CPU_C, (n,), generator=g)
    step = _cpu_step(cfg["impl"], x, w, t, cfg["tau"])
    step() if cfg["impl"] == FULL_LOGITS[1] else step(x[:256])   # compile at the full shape; others: one-time imports
    gc.collect()
    with RssSampler() as rss:
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    torch.save(w.grad, cfg["grad_path"])
    return {"s": seconds, "cpu_s": cpu_seconds, "peak_mib": rss.peak - rss.base, "loss": float(loss),
            "package": str(Path(clpdd_fast.__file__).resolve().parent.parent)}


def _cpu_variants(args) -> list[tuple[str, dict]]:
    """(row label, what the child process runs) for every CPU variant asked for."""
    out = [(CPU_OURS, {}), (CPU_ANCHOR, {}), (PLAIN_ANCHOR, {})] + [(name, {}) for name in FULL_LOGITS]
    blocks = [int(b) for b in args.cpu_blocks.split(",") if b]
    out += [(f"{CPU_OURS}, blocks of {b} logits", {"block": b}) for b in blocks]
    out += [(f"{CPU_OURS} at {_version(path)}", {"pythonpath": path}) for path in args.pythonpath]
    keep = [(label, extra) for label, extra in out if label == CPU_ANCHOR or wanted(args, label)]
    return [(label, extra) for label, extra in keep if not (args.no_compile and label == FULL_LOGITS[1])]


def _version(path: str) -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=path, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return path


def _cpu_run(label: str, extra: dict, cfg: dict) -> dict:
    env = dict(os.environ)
    if extra.get("pythonpath"):
        env["PYTHONPATH"] = os.path.abspath(extra["pythonpath"]) + os.pathsep + env.get("PYTHONPATH", "")
    impl = CPU_OURS if label.startswith(CPU_OURS) else label
    one = dict(cfg, impl=impl, block=extra.get("block", 0))
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True,
                          env=env, cwd=extra.get("pythonpath"))
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or ["failed (no message)"]
        return {"error": lines[-1][:100]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    expect = os.path.realpath(extra.get("pythonpath") or HERE.parent)
    if impl == CPU_OURS and os.path.realpath(r["package"]) != expect:
        return {"error": f"measured the clpdd_fast in {r['package']}, not {expect}"}
    return r


def bench_ce_cpu(args) -> int:
    command = "python3 benchmarks/bench_ops.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else \
        platform.machine()
    header = results_header("bench_ops --device cpu (linear_softmax_ce forward + dW, x frozen)",
                            f"CPU {model}, {os.cpu_count()} cores, {args.threads} threads", command)
    table = Table(None if args.no_append else args.results, header,
                  ["shape", "x / w", "impl", "median s", "min-max s", "CPU s", "peak extra MiB",
                   "time / F.lce", "memory / F.lce", "loss", "dW vs F.lce", "note"])
    variants = _cpu_variants(args)
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.cpu_n.split(",")):
            for dname in args.cpu_dtypes.split(","):
                shape = f"N={n} d={CPU_D} C={CPU_C}"
                runs = {label: [] for label, _ in variants}
                skipped = {label: f"skipped: N x C fp32 logits are {n * CPU_C * 4 / 2**30:.1f} GiB > "
                                  f"--max-logits-gib {args.max_logits_gib:g}"
                           for label in FULL_LOGITS if n * CPU_C * 4 > args.max_logits_gib * 2**30}
                todo = [(label, extra) for label, extra in variants if label not in skipped]
                for rep in range(args.reps):   # interleaved, the order rotated each round
                    for label, extra in todo[rep % len(todo):] + todo[:rep % len(todo)]:
                        grad_path = os.path.join(tmp, f"{len(runs)}-{abs(hash(label))}-{rep}.pt")
                        cfg = dict(n=n, dtype=dname, tau=args.tau, threads=args.threads, grad_path=grad_path)
                        r = _cpu_run(label, extra, cfg)
                        runs[label].append(dict(r, grad_path=grad_path))
                _cpu_rows(table, shape, dname, variants, runs, skipped)
    return 0


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _cpu_rows(table: Table, shape: str, dname: str, variants, runs: dict, skipped: dict) -> None:
    ok = {label: [r for r in rs if "error" not in r] for label, rs in runs.items()}
    anchor = ok.get(CPU_ANCHOR) or []
    anchor_s = _median([r["s"] for r in anchor]) if anchor else None
    anchor_mib = _median([r["peak_mib"] for r in anchor]) if anchor else None
    anchor_grad = torch.load(anchor[0]["grad_path"], weights_only=True) if anchor else None
    for label, _ in variants:
        cells = [shape, f"{dname} / fp32", label]
        if label in skipped:
            table.row(*cells, "-", "-", "-", "-", "-", "-", "-", "-", skipped[label])
            continue
        rs = ok[label]
        if not rs:
            errors = [r["error"] for r in runs[label] if "error" in r]
            table.row(*cells, "-", "-", "-", "-", "-", "-", "-", "-", f"failed: {errors[0] if errors else '?'}")
            continue
        secs, mib = _median([r["s"] for r in rs]), _median([r["peak_mib"] for r in rs])
        diff = "-"
        if anchor_grad is not None:
            grad = torch.load(rs[0]["grad_path"], weights_only=True)
            diff = f"{float((grad - anchor_grad).abs().max() / anchor_grad.abs().max()):.1e}"
        note = f"{len(rs)} of {len(runs[label])} runs" if len(rs) < len(runs[label]) else ""
        table.row(*cells, f"{secs:.2f}", f"{min(r['s'] for r in rs):.2f}-{max(r['s'] for r in rs):.2f}",
                  f"{_median([r['cpu_s'] for r in rs]):.2f}", f"{mib:.0f}",
                  f"{secs / anchor_s:.2f}" if anchor_s else "-",
                  f"{mib / max(anchor_mib, 1.0):.2f}" if anchor_mib is not None else "-",
                  f"{_median([r['loss'] for r in rs]):.6f}", diff, note)


OPS = {"matmul": None, "ce": bench_ce, "ridge": bench_ridge, "ridge-small": bench_ridge_small,
       "cholesky-tiles": bench_cholesky_tiles, "gram": bench_gram}


def main(argv=None) -> int:
    global WARM_ONLY
    args = parse_args(argv)
    args.argv = argv
    if args.one:
        print(json.dumps(cpu_measure(json.loads(args.one))))
        return 0
    if args.device == "cpu":
        return bench_ce_cpu(args)
    WARM_ONLY = args.warm_only
    if not torch.cuda.is_available():
        print("bench_ops.py needs a CUDA GPU (the Triton kernels are compiled for it); none is visible here. "
              "Run it on a GPU machine, e.g. through benchmarks/gpu_check.sh.", file=sys.stderr)
        return 2
    ops_wanted = set(args.ops.split(","))
    command = "python3 benchmarks/bench_ops.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = results_header("bench_ops" + (" (warm-up only: untimed)" if args.warm_only else ""),
                             torch.cuda.get_device_name(), command)
    table = Table(None if args.no_append else args.results, header, COLUMNS)
    rates = matmul_rates(table) if ops_wanted & {"matmul", "ce", "gram"} else {}
    # in the order asked for (benchmarks/gpu_check.sh asks in decision order), so that a time limit cuts the last
    for op in dict.fromkeys(args.ops.split(",")):
        if op == "ce":
            for name in args.ce_shapes.split(","):
                bench_ce(table, name, args, rates)
        elif op != "matmul":
            OPS[op](table, args, rates)
    return 0


if __name__ == "__main__":
    sys.exit(main())
