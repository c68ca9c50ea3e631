"""Ridge solve of a small system in one launch: Gram matrix, Cholesky factor and solve fused in one program.

For a system of size n <= MAX_SIZE (the dual system of a few dozen synthetic images, which is what CLP-DD solves at
low images-per-class on small label sets), the blocked path of kernels/cholesky.py costs a Gram launch, one launch per
32-wide block column, a solve launch and a projection launch, and at these sizes launch latency is the whole cost.
Here a single program, with everything in registers:
  1. G = S S^T + lam I (n x n, padded to M rows that form an identity), accumulated over the columns of S, BR at a
     time, with exact fp32 products (fp64 for fp64 inputs);
  2. G = L L^T by the unblocked register factorisation of kernels/cholesky.py, recording the first pivot that is
     not > 0 in `info` exactly as `cholesky` does;
  3. L^-1 in registers, then for each tile of BC right-hand-side columns X = L^-T (L^-1 B);
  4. with `project`, writes S^T X instead of X (the dual form's W = phi^T alpha), BR rows at a time.
L is written too, in the layout of `cholesky` (lower, zeros above), so the backward's `cholesky_solve` reuses it.
Whether this pays against the blocked path is measured by benchmarks/bench_ops.py (`--ops ridge-small`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cholesky import _factor_in_registers, _first_bad_pivot, _load_tile, _lower_inverse
from .gram import TL_DTYPES, accumulate_dtype

MAX_SIZE = 64        # largest system the backend sends here (module variable: tests and benchmarks change it)
LIMIT = 128          # largest system the kernel accepts (register tiles of LIMIT x LIMIT)
BLOCK_R = 32         # columns of S per Gram / projection step
BLOCK_RHS = 32       # right-hand-side columns per solve step


@triton.jit
def _small_ridge_kernel(s_ptr, b_ptr, l_ptr, out_ptr, info_ptr, lam_ptr, n, r, nrhs,
                        s_s0, s_s1, s_b0, s_b1, s_l0, s_l1, s_o0, s_o1,
                        PROJECT: tl.constexpr, DT: tl.constexpr,
                        M: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    offs = tl.arange(0, M).to(tl.int64)
    ri = offs[:, None]
    ci = offs[None, :]
    # 1. Gram matrix of the rows of S, plus lam on the diagonal; padding rows/columns become an identity
    g = tl.zeros((M, M), dtype=DT)
    for k0 in range(0, r, BR):
        ks = k0 + tl.arange(0, BR).to(tl.int64)
        st = _load_tile(s_ptr, offs, ks, s_s0, s_s1, n, r, DT)
        g += tl.dot(st, tl.trans(st), input_precision="ieee", out_dtype=DT)
    lam = tl.load(lam_ptr).to(DT)   # from memory: a Python float argument would be rounded to fp32
    g = tl.where(ri == ci, g + lam, g)
    pad = offs >= n
    g = tl.where(pad[:, None] | pad[None, :], tl.where(ri == ci, 1.0, 0.0), g)
    # 2. factor
    low, pivots = _factor_in_registers(g, offs, DT, M)
    tl.store(info_ptr, _first_bad_pivot(pivots, offs, n, M))
    tl.store(l_ptr + ri * s_l0 + ci * s_l1, low.to(l_ptr.dtype.element_ty), mask=(ri < n) & (ci < n))
    # 3. solve through the in-register inverse, BC right-hand sides at a time; 4. optional projection S^T X
    inv = _lower_inverse(low, offs, M)
    for c0 in range(0, nrhs, BC):
        cols = c0 + tl.arange(0, BC).to(tl.int64)
        bt = _load_tile(b_ptr, offs, cols, s_b0, s_b1, n, nrhs, DT)
        z = tl.dot(inv, bt, input_precision="ieee", out_dtype=DT)
        x = tl.dot(tl.trans(inv), z, input_precision="ieee", out_dtype=DT)
        if PROJECT:
            for k0 in range(0, r, BR):
                ks = k0 + tl.arange(0, BR).to(tl.int64)
                st = _load_tile(s_ptr, offs, ks, s_s0, s_s1, n, r, DT)
                wt = tl.dot(tl.trans(st), x, input_precision="ieee", out_dtype=DT)
                tl.store(out_ptr + ks[:, None] * s_o0 + cols[None, :] * s_o1, wt.to(out_ptr.dtype.element_ty),
                         mask=(ks[:, None] < r) & (cols[None, :] < nrhs))
        else:
            tl.store(out_ptr + ri * s_o0 + cols[None, :] * s_o1, x.to(out_ptr.dtype.element_ty),
                     mask=(ri < n) & (cols[None, :] < nrhs))


def padded_size(n: int) -> int:
    """Register tile size for a system of size n: the next power of two, at least 16 (the tl.dot minimum)."""
    return max(16, triton.next_power_of_2(n))


def small_ridge_solve(s: Tensor, b: Tensor, lam: float, project: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Solve (S S^T + lam I) X = B in one launch; return (X or S^T X, L, info).

    Args:
        s: (n, r), any strides, fp16/bf16/fp32/fp64, n <= LIMIT. b: (n, k) right-hand sides.
        lam: added to the diagonal (a runtime value). project: return S^T X (r, k) instead of X (n, k).
    Returns:
        (out, factor, info): out fp32 (fp64 when s or b is fp64); factor the lower Cholesky factor L (n, n) of
        S S^T + lam I, zeros above the diagonal, as `cholesky` returns it; info an int32 0-D tensor, 0 on success,
        else the 1-based index of the first pivot that is not > 0 (out and L are then not meaningful).
    """
    n, r = s.shape
    if n > LIMIT or b.dim() != 2 or b.shape[0] != n:
        raise ValueError(f"small_ridge_solve: expected s (n, r) with n <= {LIMIT} and b (n, k), got "
                         f"{tuple(s.shape)} and {tuple(b.shape)}")
    nrhs = b.shape[1]
    dt = accumulate_dtype(s, b)
    factor = torch.zeros((n, n), dtype=dt, device=s.device)
    out = torch.empty((r, nrhs) if project else (n, nrhs), dtype=dt, device=s.device)
    info = torch.empty((), dtype=torch.int32, device=s.device)
    lam_t = torch.full((1,), lam, dtype=dt, device=s.device)
    size = padded_size(n)
    _small_ridge_kernel[(1,)](s, b, factor, out, info, lam_t, n, r, nrhs, s.stride(0), s.stride(1),
                              b.stride(0), b.stride(1), factor.stride(0), factor.stride(1),
                              out.stride(0), out.stride(1), PROJECT=project, DT=TL_DTYPES[dt],
                              M=size, BR=BLOCK_R, BC=BLOCK_RHS, num_warps=4 if size <= 32 else 8)
    return out, factor, info
