"""Blocked Cholesky factorisation A = L L^T and the triangular solves of the ridge system, without cuSOLVER.

Factorisation (`cholesky`): left-looking by block columns of width BLOCK (one launch per block column k).
Program 0 of launch k updates the diagonal block, A_kk - sum_{j<k} L_kj L_kj^T (a tiled product), factors it in
registers and writes L_kk; program p > 0 does the same diagonal work redundantly (it needs L_kk^-1 and there is no
grid-wide barrier inside a launch), updates its panel block A_ik - sum_{j<k} L_ij L_kj^T and solves it against
L_kk by multiplying with the in-register inverse L_kk^-T. Pivots that are not > 0 (NaN included) are recorded
per block column and folded into one LAPACK-style `info` (1-based index of the first bad pivot, 0 when A is
positive definite) on the device, without a host sync.

Solve (`cholesky_solve`): one launch; each program owns a tile of right-hand-side columns and runs the forward
substitution L Z = B and then the backward substitution L^T X = Z over all block rows, in place in the output,
with a block barrier between a block row's store and the next one's loads.

Precision: fp32 operands with exact fp32 products (input_precision="ieee"); fp64 operands in fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gram import TL_DTYPES

# Block width of the factorisation and of the solves (rows of a diagonal block), and RHS columns per solve program.
BLOCK = 32
BLOCK_RHS = 32
NUM_WARPS = 4


@triton.jit
def _lower_inverse(lkk, offs, B: tl.constexpr):
    """Inverse of a lower-triangular (B, B) register tile by forward substitution on the identity, row by row."""
    r = offs[:, None]
    inv = tl.zeros_like(lkk)
    for i in range(B):
        lrow = tl.sum(tl.where(r == i, lkk, 0.0), axis=0)            # L[i, :]
        diag = tl.sum(tl.where(offs == i, lrow, 0.0), axis=0)        # L[i, i]
        v = tl.sum(lrow[:, None] * inv, axis=0)                      # sum_j L[i, j] inv[j, :]
        e = tl.where(offs == i, 1.0, 0.0)
        inv = tl.where(r == i, ((e - v) / diag)[None, :], inv)
    return inv


@triton.jit
def _factor_in_registers(a, offs, DT: tl.constexpr, B: tl.constexpr):
    """Unblocked right-looking Cholesky of a symmetric (B, B) register tile (lower part read).

    Returns (L, pivots): L lower triangular with zeros above the diagonal, pivots (B,) the values whose square
    roots are L's diagonal (a pivot that is not > 0 makes the rest of L meaningless; the caller reports it).
    """
    r = offs[:, None]
    c = offs[None, :]
    low = tl.zeros_like(a)
    pivots = tl.zeros((B,), dtype=DT)
    for kk in range(B):
        piv = tl.sum(tl.sum(tl.where((r == kk) & (c == kk), a, 0.0), axis=1), axis=0)
        pivots = tl.where(offs == kk, piv, pivots)
        col = tl.sum(tl.where(c == kk, a, 0.0), axis=1) / tl.sqrt(piv)
        col = tl.where(offs >= kk, col, 0.0)
        low = tl.where(c == kk, col[:, None], low)
        below = tl.where(offs > kk, col, 0.0)
        a -= below[:, None] * below[None, :]
    return low, pivots


@triton.jit
def _first_bad_pivot(pivots, offs, n_valid, B: tl.constexpr):
    """1-based index of the first pivot among the first n_valid that is not > 0 (NaN included), 0 if none."""
    bad = (~(pivots > 0.0)) & (offs < n_valid)
    first = tl.min(tl.where(bad, offs + 1, B + 1), axis=0)
    return tl.where(first == B + 1, 0, first).to(tl.int32)


@triton.jit
def _load_tile(ptr, rows, cols, s0, s1, n_rows, n_cols, DT: tl.constexpr):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=mask, other=0.0).to(DT)


@triton.jit
def _cholesky_step_kernel(a_ptr, l_ptr, info_ptr, n, k, s_a0, s_a1, s_l0, s_l1,
                          DT: tl.constexpr, B: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, B).to(tl.int64)
    r = offs[:, None]
    c = offs[None, :]
    kb = k * B
    krows = kb + offs
    # diagonal block: A_kk - sum_{j<k} L_kj L_kj^T (lower part only is used)
    akk = _load_tile(a_ptr, krows, krows, s_a0, s_a1, n, n, DT)
    for j in range(0, k):
        jcols = j * B + offs
        lkj = _load_tile(l_ptr, krows, jcols, s_l0, s_l1, n, n, DT)
        akk -= tl.dot(lkj, tl.trans(lkj), input_precision="ieee", out_dtype=DT)
    akk = tl.where(r >= c, akk, 0.0)
    # rows beyond n are padding: make them an identity block so they factor trivially
    pad = krows >= n
    akk = tl.where(pad[:, None] | pad[None, :], tl.where(r == c, 1.0, 0.0), akk)
    lkk, pivots = _factor_in_registers(akk, offs, DT, B)
    if pid == 0:
        mask = (krows[:, None] < n) & (krows[None, :] < n)
        tl.store(l_ptr + krows[:, None] * s_l0 + krows[None, :] * s_l1, lkk.to(l_ptr.dtype.element_ty), mask=mask)
        tl.store(info_ptr + k, _first_bad_pivot(pivots, offs, n - kb, B))
    else:
        inv = _lower_inverse(lkk, offs, B)
        irows = (k + pid).to(tl.int64) * B + offs
        p = _load_tile(a_ptr, irows, krows, s_a0, s_a1, n, n, DT)
        for j in range(0, k):
            jcols = j * B + offs
            lij = _load_tile(l_ptr, irows, jcols, s_l0, s_l1, n, n, DT)
            lkj = _load_tile(l_ptr, krows, jcols, s_l0, s_l1, n, n, DT)
            p -= tl.dot(lij, tl.trans(lkj), input_precision="ieee", out_dtype=DT)
        lik = tl.dot(p, tl.trans(inv), input_precision="ieee", out_dtype=DT)
        mask = (irows[:, None] < n) & (krows[None, :] < n)
        tl.store(l_ptr + irows[:, None] * s_l0 + krows[None, :] * s_l1, lik.to(l_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _diag_factor_inverse(l_ptr, krows, s_l0, s_l1, n, offs, DT: tl.constexpr, B: tl.constexpr):
    r = offs[:, None]
    c = offs[None, :]
    lkk = _load_tile(l_ptr, krows, krows, s_l0, s_l1, n, n, DT)
    lkk = tl.where(r >= c, lkk, 0.0)
    pad = krows >= n
    lkk = tl.where(pad[:, None] | pad[None, :], tl.where(r == c, 1.0, 0.0), lkk)
    return _lower_inverse(lkk, offs, B)


@triton.jit
def _cholesky_solve_kernel(l_ptr, x_ptr, n, nrhs, s_l0, s_l1, s_x0, s_x1,
                           DT: tl.constexpr, B: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, B).to(tl.int64)
    cols = pid.to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    nb = tl.cdiv(n, B)
    # forward substitution: L Z = B, Z overwrites B block row by block row
    for k in range(0, nb):
        krows = k * B + offs
        acc = _load_tile(x_ptr, krows, cols, s_x0, s_x1, n, nrhs, DT)
        for j in range(0, k):
            jrows = j * B + offs
            lkj = _load_tile(l_ptr, krows, jrows, s_l0, s_l1, n, n, DT)
            zj = _load_tile(x_ptr, jrows, cols, s_x0, s_x1, n, nrhs, DT)
            acc -= tl.dot(lkj, zj, input_precision="ieee", out_dtype=DT)
        inv = _diag_factor_inverse(l_ptr, krows, s_l0, s_l1, n, offs, DT, B)
        z = tl.dot(inv, acc, input_precision="ieee", out_dtype=DT)
        mask = (krows[:, None] < n) & (cols[None, :] < nrhs)
        tl.store(x_ptr + krows[:, None] * s_x0 + cols[None, :] * s_x1, z.to(x_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the stores of this block row must be visible to every thread before the next loads
    # backward substitution: L^T X = Z, from the last block row up
    for kr in range(0, nb):
        k = nb - 1 - kr
        krows = k * B + offs
        acc = _load_tile(x_ptr, krows, cols, s_x0, s_x1, n, nrhs, DT)
        for j in range(k + 1, nb):
            jrows = j * B + offs
            ljk = _load_tile(l_ptr, jrows, krows, s_l0, s_l1, n, n, DT)
            xj = _load_tile(x_ptr, jrows, cols, s_x0, s_x1, n, nrhs, DT)
            acc -= tl.dot(tl.trans(ljk), xj, input_precision="ieee", out_dtype=DT)
        inv = _diag_factor_inverse(l_ptr, krows, s_l0, s_l1, n, offs, DT, B)
        xk = tl.dot(tl.trans(inv), acc, input_precision="ieee", out_dtype=DT)
        mask = (krows[:, None] < n) & (cols[None, :] < nrhs)
        tl.store(x_ptr + krows[:, None] * s_x0 + cols[None, :] * s_x1, xk.to(x_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cholesky(a: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor of a symmetric matrix, like torch.linalg.cholesky_ex.

    Args:
        a: (n, n) symmetric, fp16/bf16/fp32/fp64; only its lower triangle is read.
        block: block width (a power of two >= 16).
    Returns:
        (L, info): L (n, n) lower triangular (zeros above the diagonal), fp32 (fp64 for fp64 a); info an int32
        0-D tensor on a's device, 0 when a is positive definite, else the 1-based index of the first pivot that is
        not > 0 (L is then garbage past that pivot).
    """
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"cholesky: expected a square 2-D matrix a, got shape {tuple(a.shape)}")
    n = a.shape[0]
    dt = _compute_dtype(a)
    nb = triton.cdiv(n, block)
    factor = torch.zeros((n, n), dtype=dt, device=a.device)   # the upper triangle stays zero
    block_info = torch.empty(nb, dtype=torch.int32, device=a.device)
    for k in range(nb):
        _cholesky_step_kernel[(nb - k,)](a, factor, block_info, n, k, a.stride(0), a.stride(1),
                                        factor.stride(0), factor.stride(1), DT=TL_DTYPES[dt], B=block,
                                        num_warps=NUM_WARPS)
    # first bad pivot over all block columns, on the device (no host sync)
    starts = torch.arange(nb, device=a.device, dtype=torch.int32) * block
    never = torch.iinfo(torch.int32).max
    pos = torch.where(block_info > 0, starts + block_info, torch.full_like(block_info, never)).min()
    info = torch.where(pos == never, torch.zeros_like(pos), pos)
    return factor, info


def cholesky_solve(b: Tensor, factor: Tensor, block: int = BLOCK, block_rhs: int = BLOCK_RHS) -> Tensor:
    """X = (L L^T)^-1 b for the lower factor L, like torch.cholesky_solve(b, L).

    Args:
        b: (n, k) right-hand sides, any float dtype and strides (copied into the fresh output).
        factor: (n, n) lower triangular L from `cholesky`.
    Returns:
        (n, k) in factor's dtype (fp32 or fp64).
    """
    if factor.dim() != 2 or factor.shape[0] != factor.shape[1] or b.dim() != 2 or b.shape[0] != factor.shape[0]:
        raise ValueError(f"cholesky_solve: expected b (n, k) and factor (n, n), got {tuple(b.shape)} and "
                         f"{tuple(factor.shape)}")
    n, nrhs = b.shape
    x = b.to(factor.dtype, copy=True).contiguous()
    grid = (triton.cdiv(nrhs, block_rhs),)
    _cholesky_solve_kernel[grid](factor, x, n, nrhs, factor.stride(0), factor.stride(1), x.stride(0), x.stride(1),
                                 DT=TL_DTYPES[factor.dtype], B=block, BR=block_rhs, num_warps=NUM_WARPS)
    return x
