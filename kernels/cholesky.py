"""Blocked Cholesky factorisation A = L L^T and the triangular solves of the ridge system, without cuSOLVER.

Factorisation (`cholesky`): left-looking by block columns of width BLOCK with a one-block look-ahead, one launch per
block column and no redundant work. Launch -1 factors diagonal block 0. Launch k >= 0 has one program per block row
i > k: each computes L_ik = (A_ik - sum_{j<k} L_ij L_kj^T) L_kk^-T with the inverse L_kk^-1 stored by the launch that
factored block k; program 0 (i = k + 1) then also updates diagonal block k + 1 with the L_{k+1,k} it holds in
registers, factors it in registers, and stores L_{k+1,k+1} and its inverse for launch k + 1. Pivots that are not > 0
(NaN included) are recorded per diagonal block and folded into one LAPACK-style `info` (1-based index of the first
bad pivot, 0 when A is positive definite) on the device, without a host sync.

Solve (`cholesky_solve`): one launch inverts every diagonal block of L in parallel; then one launch in which each
program owns a tile of right-hand-side columns runs the forward substitution L Z = B and the backward substitution
L^T X = Z over all block rows, in place in the output, with a block barrier between a block row's store and the
next one's loads.

Precision: every tl.dot takes the launcher's `input_precision` for fp32 operands: "ieee" (exact fp32 products, the
default) or "tf32x3" (three TF32 tensor-core products, about as accurate: benchmarks/precision_study.py; plain TF32 is
not offered: its updates make the factorisation of a well-posed ridge system with lam <= 1e-3 fail). fp64 operands
compute in fp64 ("ieee").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .contract import compute_dtype
from .matmul import TL_DTYPES
from .tiles import CHOLESKY

INPUT_PRECISIONS = ("ieee", "tf32x3")   # tl.dot's input_precision for the products of fp32 operands


@triton.jit
def _lower_inverse(lkk, offs, BLOCK: tl.constexpr):
    """Inverse of a lower-triangular (BLOCK, BLOCK) register tile by forward substitution on the identity, row by
    row."""
    r = offs[:, None]
    inv = tl.zeros_like(lkk)
    for i in range(BLOCK):
        lrow = tl.sum(tl.where(r == i, lkk, 0.0), axis=0)            # L[i, :]
        diag = tl.sum(tl.where(offs == i, lrow, 0.0), axis=0)        # L[i, i]
        v = tl.sum(lrow[:, None] * inv, axis=0)                      # sum_j L[i, j] inv[j, :]
        e = tl.where(offs == i, 1.0, 0.0)
        inv = tl.where(r == i, ((e - v) / diag)[None, :], inv)
    return inv


@triton.jit
def _factor_in_registers(a, offs, DT: tl.constexpr, BLOCK: tl.constexpr):
    """Unblocked right-looking Cholesky of a symmetric (BLOCK, BLOCK) register tile (lower part read).

    Returns (L, pivots): L lower triangular with zeros above the diagonal, pivots (BLOCK,) the values whose square
    roots are L's diagonal (a pivot that is not > 0 makes the rest of L meaningless; the caller reports it).
    """
    c = offs[None, :]
    low = tl.zeros_like(a)
    pivots = tl.zeros((BLOCK,), dtype=DT)
    for kk in range(BLOCK):
        col = tl.sum(tl.where(c == kk, a, 0.0), axis=1)               # A[:, kk]: one 2-D reduction per column
        piv = tl.sum(tl.where(offs == kk, col, 0.0), axis=0)          # A[kk, kk]
        pivots = tl.where(offs == kk, piv, pivots)
        col = tl.where(offs >= kk, col / tl.sqrt(piv), 0.0)
        low = tl.where(c == kk, col[:, None], low)
        below = tl.where(offs > kk, col, 0.0)
        a -= below[:, None] * below[None, :]
    return low, pivots


@triton.jit
def _first_bad_pivot(pivots, offs, n_valid, BLOCK: tl.constexpr):
    """1-based index of the first pivot among the first n_valid that is not > 0 (NaN included), 0 if none."""
    bad = (~(pivots > 0.0)) & (offs < n_valid)
    first = tl.min(tl.where(bad, offs + 1, BLOCK + 1), axis=0)
    return tl.where(first == BLOCK + 1, 0, first).to(tl.int32)


@triton.jit
def _pad_identity(a, rows, n, offs):
    """a (BLOCK, BLOCK) with every row and column whose global index (rows) is >= n replaced by the identity's: padding
    that factors, inverts and solves trivially."""
    pad = rows >= n
    return tl.where(pad[:, None] | pad[None, :], tl.where(offs[:, None] == offs[None, :], 1.0, 0.0), a)


@triton.jit
def _load_tile(ptr, rows, cols, s0, s1, n_rows, n_cols, DT: tl.constexpr):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=mask, other=0.0).to(DT)


@triton.jit
def _factor_diag_block(a_ptr, l_ptr, inv_ptr, info_ptr, n, i, li_prev, s_a0, s_a1, s_l0, s_l1,
                       DT: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Factor diagonal block i: A_ii - sum_{j < i-1} L_ij L_ij^T - P P^T (P = L_{i,i-1}, given in registers
    by the caller that just computed it; zeros for i = 0). Writes L_ii, its inverse and the block's info."""
    offs = tl.arange(0, BLOCK).to(tl.int64)
    r = offs[:, None]
    c = offs[None, :]
    irows = i * BLOCK + offs
    aii = _load_tile(a_ptr, irows, irows, s_a0, s_a1, n, n, DT)
    for j in range(0, i - 1):
        lij = _load_tile(l_ptr, irows, j * BLOCK + offs, s_l0, s_l1, n, n, DT)
        aii -= tl.dot(lij, tl.trans(lij), input_precision=PRECISION, out_dtype=DT)
    aii -= tl.dot(li_prev, tl.trans(li_prev), input_precision=PRECISION, out_dtype=DT)
    aii = _pad_identity(tl.where(r >= c, aii, 0.0), irows, n, offs)
    lii, pivots = _factor_in_registers(aii, offs, DT, BLOCK)
    tl.store(l_ptr + irows[:, None] * s_l0 + irows[None, :] * s_l1, lii.to(l_ptr.dtype.element_ty),
             mask=(irows[:, None] < n) & (irows[None, :] < n))
    tl.store(info_ptr + i, _first_bad_pivot(pivots, offs, n - i * BLOCK, BLOCK))
    inv = _lower_inverse(lii, offs, BLOCK)
    tl.store(inv_ptr + i * BLOCK * BLOCK + r * BLOCK + c, inv.to(inv_ptr.dtype.element_ty))


@triton.jit
def _cholesky_step_kernel(a_ptr, l_ptr, inv_ptr, info_ptr, n, k, s_a0, s_a1, s_l0, s_l1,
                          DT: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Launch k >= 0: block column k below the diagonal, and (program 0) diagonal block k + 1.
    Launch k = -1: diagonal block 0 alone."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    if k < 0:
        _factor_diag_block(a_ptr, l_ptr, inv_ptr, info_ptr, n, 0, tl.zeros((BLOCK, BLOCK), dtype=DT),
                           s_a0, s_a1, s_l0, s_l1, DT, BLOCK, PRECISION)
    else:
        krows = k * BLOCK + offs
        irows = (k + 1 + pid).to(tl.int64) * BLOCK + offs
        # L_ik = (A_ik - sum_{j<k} L_ij L_kj^T) L_kk^-T, with L_kk^-1 from the launch that factored block k
        p = _load_tile(a_ptr, irows, krows, s_a0, s_a1, n, n, DT)
        for j in range(0, k):
            jcols = j * BLOCK + offs
            lij = _load_tile(l_ptr, irows, jcols, s_l0, s_l1, n, n, DT)
            lkj = _load_tile(l_ptr, krows, jcols, s_l0, s_l1, n, n, DT)
            p -= tl.dot(lij, tl.trans(lkj), input_precision=PRECISION, out_dtype=DT)
        inv = tl.load(inv_ptr + k * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :])
        lik = tl.dot(p, tl.trans(inv), input_precision=PRECISION, out_dtype=DT)
        tl.store(l_ptr + irows[:, None] * s_l0 + krows[None, :] * s_l1, lik.to(l_ptr.dtype.element_ty),
                 mask=(irows[:, None] < n) & (krows[None, :] < n))
        if pid == 0:   # look-ahead: block k + 1's diagonal needs only this program's L_{k+1,k} beyond stored L
            _factor_diag_block(a_ptr, l_ptr, inv_ptr, info_ptr, n, k + 1, lik, s_a0, s_a1, s_l0, s_l1, DT, BLOCK,
                               PRECISION)


@triton.jit
def _diag_inverse_kernel(l_ptr, inv_ptr, n, s_l0, s_l1, DT: tl.constexpr, BLOCK: tl.constexpr):
    """Program k: the inverse of L's diagonal block k (padding rows as identity), for the solves."""
    k = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    r = offs[:, None]
    c = offs[None, :]
    krows = k * BLOCK + offs
    lkk = _load_tile(l_ptr, krows, krows, s_l0, s_l1, n, n, DT)
    lkk = _pad_identity(tl.where(r >= c, lkk, 0.0), krows, n, offs)
    tl.store(inv_ptr + k * BLOCK * BLOCK + r * BLOCK + c, _lower_inverse(lkk, offs, BLOCK).to(inv_ptr.dtype.element_ty))


@triton.jit
def _cholesky_solve_kernel(l_ptr, inv_ptr, x_ptr, n, nrhs, s_l0, s_l1, s_x0, s_x1,
                           DT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_RHS: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    tile = offs[:, None] * BLOCK + offs[None, :]
    cols = pid.to(tl.int64) * BLOCK_RHS + tl.arange(0, BLOCK_RHS).to(tl.int64)
    nb = tl.cdiv(n, BLOCK)
    # forward substitution: L Z = B, Z overwrites B block row by block row
    for k in range(0, nb):
        krows = k * BLOCK + offs
        acc = _load_tile(x_ptr, krows, cols, s_x0, s_x1, n, nrhs, DT)
        for j in range(0, k):
            jrows = j * BLOCK + offs
            lkj = _load_tile(l_ptr, krows, jrows, s_l0, s_l1, n, n, DT)
            zj = _load_tile(x_ptr, jrows, cols, s_x0, s_x1, n, nrhs, DT)
            acc -= tl.dot(lkj, zj, input_precision=PRECISION, out_dtype=DT)
        inv = tl.load(inv_ptr + k * BLOCK * BLOCK + tile)
        z = tl.dot(inv, acc, input_precision=PRECISION, out_dtype=DT)
        mask = (krows[:, None] < n) & (cols[None, :] < nrhs)
        tl.store(x_ptr + krows[:, None] * s_x0 + cols[None, :] * s_x1, z.to(x_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the stores of this block row must be visible to every thread before the next loads
    # backward substitution: L^T X = Z, from the last block row up
    for kr in range(0, nb):
        k = nb - 1 - kr
        krows = k * BLOCK + offs
        acc = _load_tile(x_ptr, krows, cols, s_x0, s_x1, n, nrhs, DT)
        for j in range(k + 1, nb):
            jrows = j * BLOCK + offs
            ljk = _load_tile(l_ptr, jrows, krows, s_l0, s_l1, n, n, DT)
            xj = _load_tile(x_ptr, jrows, cols, s_x0, s_x1, n, nrhs, DT)
            acc -= tl.dot(tl.trans(ljk), xj, input_precision=PRECISION, out_dtype=DT)
        inv = tl.load(inv_ptr + k * BLOCK * BLOCK + tile)
        xk = tl.dot(tl.trans(inv), acc, input_precision=PRECISION, out_dtype=DT)
        mask = (krows[:, None] < n) & (cols[None, :] < nrhs)
        tl.store(x_ptr + krows[:, None] * s_x0 + cols[None, :] * s_x1, xk.to(x_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()


def _input_precision(input_precision: str, dt: torch.dtype) -> str:
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")
    return input_precision if dt == torch.float32 else "ieee"


def cholesky(a: Tensor, block: int = CHOLESKY["BLOCK"], input_precision: str = "ieee",
             num_warps: int = CHOLESKY["num_warps"]) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor of a symmetric matrix, like torch.linalg.cholesky_ex.

    Args:
        a: (n, n) symmetric, fp16/bf16/fp32/fp64; only its lower triangle is read.
        block: block width (a power of two >= 16). num_warps: per program (kernels/tiles.py: CHOLESKY).
        input_precision: "ieee" or "tf32x3", the products of the block updates in fp32 (fp64 is always exact).
    Returns:
        (L, info): L (n, n) lower triangular (zeros above the diagonal), fp32 (fp64 for fp64 a); info an int32
        0-D tensor on a's device, 0 when a is positive definite, else the 1-based index of the first pivot that is
        not > 0 (L is then garbage past that pivot).
    """
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"cholesky: expected a square 2-D matrix a, got shape {tuple(a.shape)}")
    n = a.shape[0]
    dt = compute_dtype(a)
    prec = _input_precision(input_precision, dt)
    nb = triton.cdiv(n, block)
    factor = torch.zeros((n, n), dtype=dt, device=a.device)   # the upper triangle stays zero
    block_info = torch.empty(nb, dtype=torch.int32, device=a.device)
    inverses = torch.empty((nb, block, block), dtype=dt, device=a.device)   # L_kk^-1, for the panels
    for k in range(-1, nb - 1):
        _cholesky_step_kernel[(1 if k < 0 else nb - 1 - k,)](a, factor, inverses, block_info, n, k, a.stride(0),
                                                     a.stride(1), factor.stride(0), factor.stride(1),
                                                     DT=TL_DTYPES[dt], BLOCK=block, PRECISION=prec,
                                                     num_warps=num_warps, num_stages=CHOLESKY["num_stages"])
    # first bad pivot over all block columns, on the device (no host sync)
    starts = torch.arange(nb, device=a.device, dtype=torch.int32) * block
    never = torch.iinfo(torch.int32).max
    pos = torch.where(block_info > 0, starts + block_info, torch.full_like(block_info, never)).min()
    info = torch.where(pos == never, torch.zeros_like(pos), pos)
    return factor, info


def cholesky_solve(b: Tensor, factor: Tensor, block: int = CHOLESKY["BLOCK"], block_rhs: int = CHOLESKY["BLOCK_RHS"],
                   input_precision: str = "ieee", num_warps: int = CHOLESKY["num_warps"]) -> Tensor:
    """X = (L L^T)^-1 b for the lower factor L, like torch.cholesky_solve(b, L).

    Args:
        b: (n, k) right-hand sides, any float dtype and strides (copied into the fresh output).
        factor: (n, n) lower triangular L from `cholesky`.
        input_precision: "ieee" or "tf32x3", the products of the substitutions in fp32 (fp64 is always exact).
        block, block_rhs, num_warps: tiles (kernels/tiles.py: CHOLESKY).
    Returns:
        (n, k) in factor's dtype (fp32 or fp64).
    """
    if factor.dim() != 2 or factor.shape[0] != factor.shape[1] or b.dim() != 2 or b.shape[0] != factor.shape[0]:
        raise ValueError(f"cholesky_solve: expected b (n, k) and factor (n, n), got {tuple(b.shape)} and "
                         f"{tuple(factor.shape)}")
    n, nrhs = b.shape
    prec = _input_precision(input_precision, factor.dtype)
    x = b.to(factor.dtype, copy=True).contiguous()
    nb = triton.cdiv(n, block)
    dt = TL_DTYPES[factor.dtype]
    inverses = torch.empty((nb, block, block), dtype=factor.dtype, device=factor.device)
    _diag_inverse_kernel[(nb,)](factor, inverses, n, factor.stride(0), factor.stride(1), DT=dt, BLOCK=block,
                                num_warps=num_warps, num_stages=CHOLESKY["num_stages"])
    grid = (triton.cdiv(nrhs, block_rhs),)
    _cholesky_solve_kernel[grid](factor, inverses, x, n, nrhs, factor.stride(0), factor.stride(1), x.stride(0),
                                 x.stride(1), DT=dt, BLOCK=block, BLOCK_RHS=block_rhs, PRECISION=prec,
                                 num_warps=num_warps, num_stages=CHOLESKY["num_stages"])
    return x
