"""Ridge solve of a small system in one launch: Gram matrix, Cholesky factor and solve fused in one program.

For a system of size n <= tiles.SMALL_RIDGE_MAX_SIZE (the dual system of a few dozen synthetic images, which is what
CLP-DD solves at low images-per-class on small label sets), the blocked path of kernels/cholesky.py costs a Gram launch,
one launch per
32-wide block column, a solve launch and a projection launch, and at these sizes launch latency is the whole cost.
Here a single program (one CTA) does:
  1. G = S S^T + lam I (n x n, padded to M rows that form an identity), with exact fp32 products (fp64 for fp64
     inputs);
  2. G = L L^T by the unblocked register factorisation of kernels/cholesky.py, recording the first pivot that is
     not > 0 in `info` exactly as `cholesky` does; L^-1 in registers;
  3. A^-1 = L^-T L^-1, then X = A^-1 B, BLOCK_C right-hand-side columns at a time;
  4. with `project`, writes S^T X instead of X (the dual form's W = phi^T alpha), tile by tile.
L is written too, in the layout of `cholesky` (lower, zeros above), so any backward can reuse it.
The dual form's backward (`small_ridge_backward`) is one launch as well: from L it forms A^-1, then
beta = A^-1 phi G and alpha = A^-1 y tile by tile, S = beta alpha^T + alpha beta^T, and writes dy = beta and
dphi = alpha G^T - S phi.

Registers: every product is `_product`, which reads both operands from memory BLOCK_K = 16 of the inner dimension at a
time. A `tl.dot` with exact fp32 products runs on FMA units and holds each thread's whole strip of the inner
dimension in registers, so a product whose inner dimension is the system size (64) spilled kilobytes per thread;
the intermediates (L^-1, A^-1, phi G, alpha, beta, S) therefore go through a small global workspace that one program
writes, then reads back after a block barrier (they stay in L1/L2).
Sizes: the kernel accepts n <= tiles.SMALL_RIDGE_LIMITS[compute dtype] (a larger request is a ValueError); the backend
sends it systems of size <= min(tiles.SMALL_RIDGE_MAX_SIZE, that limit) and everything larger to the blocked path.
`benchmarks/bench_ops.py --ops ridge-small` measures whether this pays against the blocked path; CLPDD_AOT_CHECK=1
(tests) compiles every size class for sm_90 and fails on a register spill or a shared-memory overflow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tiles
from .cholesky import _factor_in_registers, _first_bad_pivot, _load_tile, _lower_inverse, _pad_identity
from .contract import compute_dtype
from .matmul import TL_DTYPES

BLOCK_K, BLOCK_C, BLOCK_D = (tiles.SMALL_RIDGE[k] for k in ("BLOCK_K", "BLOCK_C", "BLOCK_D"))


@triton.jit
def _product(a_ptr, s_a0, s_a1, b_ptr, s_b0, s_b1, rows, cols, n_rows, n_k, n_cols,
             DT: tl.constexpr, R: tl.constexpr, C: tl.constexpr, BLOCK_K: tl.constexpr):
    """(R, C) tile of A[rows, :n_k] @ B[:n_k, cols], both read from memory BLOCK_K of the inner dimension at a time;
    rows >= n_rows, inner indices >= n_k and cols >= n_cols read as zeros."""
    acc = tl.zeros((R, C), dtype=DT)
    for k0 in range(0, n_k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a = _load_tile(a_ptr, rows, ks, s_a0, s_a1, n_rows, n_k, DT)
        b = _load_tile(b_ptr, ks, cols, s_b0, s_b1, n_k, n_cols, DT)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=DT)
    return acc


@triton.jit
def _inverse_to_workspace(low, offs, inv_ptr, ainv_ptr, M: tl.constexpr, DT: tl.constexpr, BLOCK_K: tl.constexpr):
    """A^-1 = L^-T L^-1 (M x M, row-major) into ainv_ptr, from the lower factor L in registers; L^-1 goes through
    inv_ptr. Ends with a block barrier: A^-1 is then readable by every thread."""
    r = offs[:, None]
    c = offs[None, :]
    tl.store(inv_ptr + r * M + c, _lower_inverse(low, offs, M))
    tl.debug_barrier()
    # (L^-T L^-1)[i, j] = sum_k L^-1[k, i] L^-1[k, j]: the left operand is L^-1 read transposed
    ainv = _product(inv_ptr, 1, M, inv_ptr, M, 1, offs, offs, M, M, M, DT, M, M, BLOCK_K)
    tl.store(ainv_ptr + r * M + c, ainv)
    tl.debug_barrier()


@triton.jit
def _small_ridge_kernel(s_ptr, b_ptr, l_ptr, out_ptr, info_ptr, lam_ptr, inv_ptr, ainv_ptr, x_ptr, n, r, nrhs,
                        s_s0, s_s1, s_b0, s_b1, s_l0, s_l1, s_o0, s_o1,
                        PROJECT: tl.constexpr, DT: tl.constexpr, M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    offs = tl.arange(0, M).to(tl.int64)
    ri = offs[:, None]
    ci = offs[None, :]
    # 1. Gram matrix of the rows of S, plus lam on the diagonal; padding rows/columns become an identity
    g = _product(s_ptr, s_s0, s_s1, s_ptr, s_s1, s_s0, offs, offs, n, r, n, DT, M, M, BLOCK_K)
    lam = tl.load(lam_ptr).to(DT)   # from memory: a Python float argument would be rounded to fp32
    g = _pad_identity(tl.where(ri == ci, g + lam, g), offs, n, offs)
    # 2. factor, and A^-1 into the workspace
    low, pivots = _factor_in_registers(g, offs, DT, M)
    tl.store(info_ptr, _first_bad_pivot(pivots, offs, n, M))
    tl.store(l_ptr + ri * s_l0 + ci * s_l1, low.to(l_ptr.dtype.element_ty), mask=(ri < n) & (ci < n))
    _inverse_to_workspace(low, offs, inv_ptr, ainv_ptr, M, DT, BLOCK_K)
    # 3. X = A^-1 B, BLOCK_C right-hand sides at a time: into out, or into the workspace x (M x nrhs) for the projection
    for c0 in range(0, nrhs, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        x = _product(ainv_ptr, M, 1, b_ptr, s_b0, s_b1, offs, cols, M, n, nrhs, DT, M, BLOCK_C, BLOCK_K)
        if PROJECT:
            tl.store(x_ptr + ri * nrhs + cols[None, :], x, mask=cols[None, :] < nrhs)
        else:
            tl.store(out_ptr + ri * s_o0 + cols[None, :] * s_o1, x.to(out_ptr.dtype.element_ty),
                     mask=(ri < n) & (cols[None, :] < nrhs))
    # 4. W = S^T X, (BLOCK_D, BLOCK_C) tiles
    if PROJECT:
        tl.debug_barrier()
        for k0 in range(0, r, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
            for c0 in range(0, nrhs, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
                wt = _product(s_ptr, s_s1, s_s0, x_ptr, nrhs, 1, ks, cols, r, n, nrhs, DT, BLOCK_D, BLOCK_C, BLOCK_K)
                tl.store(out_ptr + ks[:, None] * s_o0 + cols[None, :] * s_o1, wt.to(out_ptr.dtype.element_ty),
                         mask=(ks[:, None] < r) & (cols[None, :] < nrhs))


@triton.jit
def _small_ridge_backward_kernel(phi_ptr, y_ptr, g_ptr, l_ptr, dphi_ptr, beta_ptr, inv_ptr, ainv_ptr, pg_ptr,
                                 alpha_ptr, sym_ptr, m, d, nrhs, s_p0, s_p1, s_y0, s_y1, s_g0, s_g1, s_l0, s_l1,
                                 s_dp0, s_dp1, s_b0, s_b1,
                                 NEED_PHI: tl.constexpr, DT: tl.constexpr, M: tl.constexpr,
                                 BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of the dual form W = phi^T A^-1 y (A = phi phi^T + lam I = L L^T) for upstream G = dL/dW:
    alpha = A^-1 y, beta = A^-1 phi G, dy = beta, dphi = alpha G^T - (beta alpha^T + alpha beta^T) phi.
    beta goes to beta_ptr (dy itself, or workspace when dy is not wanted); alpha (m x nrhs), phi G (M x BLOCK_C) and
    S (M x M) to the workspace."""
    offs = tl.arange(0, M).to(tl.int64)
    ri = offs[:, None]
    ci = offs[None, :]
    low = _pad_identity(tl.where(ri >= ci, _load_tile(l_ptr, offs, offs, s_l0, s_l1, m, m, DT), 0.0), offs, m, offs)
    _inverse_to_workspace(low, offs, inv_ptr, ainv_ptr, M, DT, BLOCK_K)
    # phase 1, over right-hand-side tiles: beta = A^-1 (phi G), and alpha = A^-1 y
    bc = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(0, nrhs, BLOCK_C):
        cols = c0 + bc
        pg = _product(phi_ptr, s_p0, s_p1, g_ptr, s_g0, s_g1, offs, cols, m, d, nrhs, DT, M, BLOCK_C, BLOCK_K)
        tl.store(pg_ptr + ri * BLOCK_C + bc[None, :], pg)
        tl.debug_barrier()
        beta = _product(ainv_ptr, M, 1, pg_ptr, BLOCK_C, 1, offs, bc, M, m, BLOCK_C, DT, M, BLOCK_C, BLOCK_K)
        tl.store(beta_ptr + ri * s_b0 + cols[None, :] * s_b1, beta.to(beta_ptr.dtype.element_ty),
                 mask=(ri < m) & (cols[None, :] < nrhs))
        if NEED_PHI:
            alpha = _product(ainv_ptr, M, 1, y_ptr, s_y0, s_y1, offs, cols, M, m, nrhs, DT, M, BLOCK_C, BLOCK_K)
            tl.store(alpha_ptr + ri * nrhs + cols[None, :], alpha, mask=(ri < m) & (cols[None, :] < nrhs))
        tl.debug_barrier()   # pg is overwritten by the next tile; beta and alpha are read by phase 2
    if NEED_PHI:
        # S = beta alpha^T + alpha beta^T (M x M; zero past m), over the nrhs columns
        sym = _product(beta_ptr, s_b0, s_b1, alpha_ptr, 1, nrhs, offs, offs, m, nrhs, m, DT, M, M, BLOCK_K)
        sym += _product(alpha_ptr, nrhs, 1, beta_ptr, s_b1, s_b0, offs, offs, m, nrhs, m, DT, M, M, BLOCK_K)
        tl.store(sym_ptr + ri * M + ci, sym)
        tl.debug_barrier()
        # phase 2, over feature tiles: dphi = alpha G^T - S phi
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
            acc = _product(alpha_ptr, nrhs, 1, g_ptr, s_g1, s_g0, offs, ks, m, nrhs, d, DT, M, BLOCK_D, BLOCK_K)
            acc -= _product(sym_ptr, M, 1, phi_ptr, s_p0, s_p1, offs, ks, M, m, d, DT, M, BLOCK_D, BLOCK_K)
            tl.store(dphi_ptr + ri * s_dp0 + ks[None, :] * s_dp1, acc.to(dphi_ptr.dtype.element_ty),
                     mask=(ri < m) & (ks[None, :] < d))


def padded_size(n: int) -> int:
    """Register tile size for a system of size n: the next power of two, at least 16 (the tl.dot minimum)."""
    return max(16, triton.next_power_of_2(n))


def size_limit(dtype: torch.dtype) -> int:
    """Largest system the kernel accepts for inputs of this dtype (its compute dtype's entry of
    tiles.SMALL_RIDGE_LIMITS)."""
    return tiles.SMALL_RIDGE_LIMITS[torch.float64 if dtype == torch.float64 else torch.float32]


def dispatches(n: int, *tensors: Tensor) -> bool:
    """Whether the backend sends a system of size n with these operands here (else: the blocked path)."""
    return n <= min(tiles.SMALL_RIDGE_MAX_SIZE, size_limit(compute_dtype(*tensors)))


def _check_size(fn: str, n: int, dt: torch.dtype) -> None:
    if n > size_limit(dt):
        raise ValueError(f"{fn}: systems of size <= {size_limit(dt)} in {str(dt).replace('torch.', '')} "
                         f"(tiles.SMALL_RIDGE_LIMITS), got {n}; larger systems take the blocked Cholesky path")


def small_ridge_solve(s: Tensor, b: Tensor, lam: float, project: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Solve (S S^T + lam I) X = B in one launch; return (X or S^T X, L, info).

    Args:
        s: (n, r), any strides, fp16/bf16/fp32/fp64, n <= size_limit(dtype). b: (n, k) right-hand sides.
        lam: added to the diagonal (a runtime value). project: return S^T X (r, k) instead of X (n, k).
    Returns:
        (out, factor, info): out fp32 (fp64 when s or b is fp64); factor the lower Cholesky factor L (n, n) of
        S S^T + lam I, zeros above the diagonal, as `cholesky` returns it; info an int32 0-D tensor, 0 on success,
        else the 1-based index of the first pivot that is not > 0 (out and L are then not meaningful).
    """
    n, r = s.shape
    if b.dim() != 2 or b.shape[0] != n:
        raise ValueError(f"small_ridge_solve: expected s (n, r) and b (n, k), got {tuple(s.shape)} and "
                         f"{tuple(b.shape)}")
    dt = compute_dtype(s, b)
    _check_size("small_ridge_solve", n, dt)
    nrhs = b.shape[1]
    size = padded_size(n)
    factor = torch.zeros((n, n), dtype=dt, device=s.device)
    out = torch.empty((r, nrhs) if project else (n, nrhs), dtype=dt, device=s.device)
    info = torch.empty((), dtype=torch.int32, device=s.device)
    lam_t = torch.full((1,), lam, dtype=dt, device=s.device)
    work = torch.empty(2 * size * size + (size * nrhs if project else 0), dtype=dt, device=s.device)
    inv, ainv, x = work[:size * size], work[size * size:2 * size * size], work[2 * size * size:]
    _small_ridge_kernel[(1,)](s, b, factor, out, info, lam_t, inv, ainv, x if project else work, n, r, nrhs,
                              s.stride(0), s.stride(1), b.stride(0), b.stride(1), factor.stride(0), factor.stride(1),
                              out.stride(0), out.stride(1), PROJECT=project, DT=TL_DTYPES[dt], M=size,
                              BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
                              num_warps=tiles.small_ridge_warps(size, dt), num_stages=tiles.SMALL_RIDGE["num_stages"])
    return out, factor, info


def small_ridge_backward(phi: Tensor, y: Tensor, factor: Tensor, grad_w: Tensor, need_phi: bool,
                         need_y: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients through the dual-form W = phi^T (phi phi^T + lam I)^-1 y in one launch, given the forward's factor.

    Args:
        phi: (m, d) with m <= size_limit(factor.dtype), y: (m, C), factor: (m, m) lower Cholesky factor of
        phi phi^T + lam I, grad_w: (d, C) dL/dW. need_phi, need_y: which gradients to compute.
    Returns:
        (grad_phi (m, d), grad_y (m, C)) in factor's dtype, or None where not needed.
    """
    m, d = phi.shape
    if factor.shape != (m, m) or y.dim() != 2 or y.shape[0] != m or grad_w.shape != (d, y.shape[1]):
        raise ValueError(f"small_ridge_backward: expected phi (m, d), y (m, C), factor (m, m) and grad_w (d, C), "
                         f"got {tuple(phi.shape)}, {tuple(y.shape)}, {tuple(factor.shape)}, {tuple(grad_w.shape)}")
    dt = factor.dtype
    _check_size("small_ridge_backward", m, dt)
    if not (need_phi or need_y):
        return None, None
    nrhs = y.shape[1]
    size = padded_size(m)
    grad_phi = torch.empty((m, d), dtype=dt, device=phi.device) if need_phi else factor
    # workspace: L^-1, A^-1, S (M x M each), phi G (M x BLOCK_C), alpha (m x C), and beta when dy is not wanted
    flat = -(-m * nrhs // 16) * 16   # m x C rounded up to 16 elements: every part starts 16-byte aligned
    parts = [size * size] * 3 + [size * BLOCK_C] + [flat if need_phi else 0, 0 if need_y else flat]
    work = torch.empty(sum(parts), dtype=dt, device=phi.device)
    inv, ainv, sym, pg, alpha, beta = torch.split(work, parts)
    beta = torch.empty((m, nrhs), dtype=dt, device=phi.device) if need_y else beta[:m * nrhs].view(m, nrhs)
    _small_ridge_backward_kernel[(1,)](phi, y, grad_w, factor, grad_phi, beta, inv, ainv, pg,
                                       alpha if need_phi else work, sym, m, d, nrhs,
                                       phi.stride(0), phi.stride(1), y.stride(0), y.stride(1),
                                       grad_w.stride(0), grad_w.stride(1), factor.stride(0), factor.stride(1),
                                       grad_phi.stride(0), grad_phi.stride(1), beta.stride(0), beta.stride(1),
                                       NEED_PHI=need_phi, DT=TL_DTYPES[dt], M=size, BLOCK_K=BLOCK_K,
                                       BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, num_warps=tiles.small_ridge_warps(size, dt),
                                       num_stages=tiles.SMALL_RIDGE["num_stages"])
    return (grad_phi if need_phi else None), (beta if need_y else None)
