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
L is written too, in the layout of `cholesky` (lower, zeros above), so any backward can reuse it.
The dual form's backward (`small_ridge_backward`) is one launch as well: from L it forms L^-1 in registers, then
alpha = A^-1 y, beta = A^-1 phi G and S = beta alpha^T + alpha beta^T tile by tile, and writes dy = beta and
dphi = alpha G^T - S phi.
Whether this pays against the blocked path is measured by benchmarks/bench_ops.py (`--ops ridge-small`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .cholesky import _factor_in_registers, _first_bad_pivot, _load_tile, _lower_inverse, _pad_identity
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
    g = _pad_identity(tl.where(ri == ci, g + lam, g), offs, n, offs)
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


@triton.jit
def _small_ridge_backward_kernel(phi_ptr, y_ptr, g_ptr, l_ptr, dphi_ptr, dy_ptr, m, d, nrhs,
                                 s_p0, s_p1, s_y0, s_y1, s_g0, s_g1, s_l0, s_l1, s_dp0, s_dp1, s_dy0, s_dy1,
                                 NEED_PHI: tl.constexpr, NEED_Y: tl.constexpr, DT: tl.constexpr,
                                 M: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Backward of the dual form W = phi^T A^-1 y (A = phi phi^T + lam I = L L^T) for upstream G = dL/dW:
    alpha = A^-1 y, beta = A^-1 phi G, dy = beta, dphi = alpha G^T - (beta alpha^T + alpha beta^T) phi."""
    offs = tl.arange(0, M).to(tl.int64)
    ri = offs[:, None]
    ci = offs[None, :]
    low = _pad_identity(tl.where(ri >= ci, _load_tile(l_ptr, offs, offs, s_l0, s_l1, m, m, DT), 0.0), offs, m, offs)
    inv = _lower_inverse(low, offs, M)
    # phase 1, over right-hand-side tiles: beta (stored as dy) and the symmetric S = beta alpha^T + alpha beta^T
    sym = tl.zeros((M, M), dtype=DT)
    for c0 in range(0, nrhs, BC):
        cols = c0 + tl.arange(0, BC).to(tl.int64)
        pg = tl.zeros((M, BC), dtype=DT)
        for k0 in range(0, d, BR):
            ks = k0 + tl.arange(0, BR).to(tl.int64)
            pt = _load_tile(phi_ptr, offs, ks, s_p0, s_p1, m, d, DT)
            gt = _load_tile(g_ptr, ks, cols, s_g0, s_g1, d, nrhs, DT)
            pg += tl.dot(pt, gt, input_precision="ieee", out_dtype=DT)
        beta = tl.dot(tl.trans(inv), tl.dot(inv, pg, input_precision="ieee", out_dtype=DT),
                      input_precision="ieee", out_dtype=DT)
        if NEED_Y:
            tl.store(dy_ptr + ri * s_dy0 + cols[None, :] * s_dy1, beta.to(dy_ptr.dtype.element_ty),
                     mask=(ri < m) & (cols[None, :] < nrhs))
        if NEED_PHI:
            yt = _load_tile(y_ptr, offs, cols, s_y0, s_y1, m, nrhs, DT)
            alpha = tl.dot(tl.trans(inv), tl.dot(inv, yt, input_precision="ieee", out_dtype=DT),
                           input_precision="ieee", out_dtype=DT)
            sym += tl.dot(beta, tl.trans(alpha), input_precision="ieee", out_dtype=DT)
            sym += tl.dot(alpha, tl.trans(beta), input_precision="ieee", out_dtype=DT)
    # phase 2, over feature tiles: dphi = alpha G^T - S phi, alpha recomputed per tile (cheap at these sizes)
    if NEED_PHI:
        for k0 in range(0, d, BR):
            ks = k0 + tl.arange(0, BR).to(tl.int64)
            pt = _load_tile(phi_ptr, offs, ks, s_p0, s_p1, m, d, DT)
            acc = -tl.dot(sym, pt, input_precision="ieee", out_dtype=DT)
            for c0 in range(0, nrhs, BC):
                cols = c0 + tl.arange(0, BC).to(tl.int64)
                yt = _load_tile(y_ptr, offs, cols, s_y0, s_y1, m, nrhs, DT)
                alpha = tl.dot(tl.trans(inv), tl.dot(inv, yt, input_precision="ieee", out_dtype=DT),
                               input_precision="ieee", out_dtype=DT)
                gt = _load_tile(g_ptr, ks, cols, s_g0, s_g1, d, nrhs, DT)
                acc += tl.dot(alpha, tl.trans(gt), input_precision="ieee", out_dtype=DT)
            tl.store(dphi_ptr + ri * s_dp0 + ks[None, :] * s_dp1, acc.to(dphi_ptr.dtype.element_ty),
                     mask=(ri < m) & (ks[None, :] < d))


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


def small_ridge_backward(phi: Tensor, y: Tensor, factor: Tensor, grad_w: Tensor, need_phi: bool,
                         need_y: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients through the dual-form W = phi^T (phi phi^T + lam I)^-1 y in one launch, given the forward's factor.

    Args:
        phi: (m, d) with m <= LIMIT, y: (m, C), factor: (m, m) lower Cholesky factor of phi phi^T + lam I,
        grad_w: (d, C) dL/dW. need_phi, need_y: which gradients to compute.
    Returns:
        (grad_phi (m, d), grad_y (m, C)) in factor's dtype, or None where not needed.
    """
    m, d = phi.shape
    if m > LIMIT or factor.shape != (m, m) or y.shape[0] != m or grad_w.shape != (d, y.shape[1]):
        raise ValueError(f"small_ridge_backward: expected phi (m, d) with m <= {LIMIT}, y (m, C), factor (m, m) "
                         f"and grad_w (d, C), got {tuple(phi.shape)}, {tuple(y.shape)}, {tuple(factor.shape)}, "
                         f"{tuple(grad_w.shape)}")
    if not (need_phi or need_y):
        return None, None
    nrhs = y.shape[1]
    dt = factor.dtype
    grad_phi = torch.empty((m, d), dtype=dt, device=phi.device) if need_phi else factor
    grad_y = torch.empty((m, nrhs), dtype=dt, device=phi.device) if need_y else factor
    size = padded_size(m)
    _small_ridge_backward_kernel[(1,)](phi, y, grad_w, factor, grad_phi, grad_y, m, d, nrhs,
                                       phi.stride(0), phi.stride(1), y.stride(0), y.stride(1),
                                       grad_w.stride(0), grad_w.stride(1), factor.stride(0), factor.stride(1),
                                       grad_phi.stride(0), grad_phi.stride(1), grad_y.stride(0), grad_y.stride(1),
                                       NEED_PHI=need_phi, NEED_Y=need_y, DT=TL_DTYPES[dt], M=size, BR=BLOCK_R,
                                       BC=BLOCK_RHS, num_warps=4 if size <= 32 else 8)
    return (grad_phi if need_phi else None), (grad_y if need_y else None)
