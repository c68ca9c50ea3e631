"""The strided matrix product behind `gram` and every launcher's glue, and the kernels' dtype rules (TL_DTYPES,
dot_dtype; the compute dtype is kernels/contract.py's).

One kernel, `_matmul_kernel`, does C = alpha * A @ B (+ lam on the diagonal) (+ C when accumulating), with
arbitrary strides (so transposes are free), an optional split of the reduction dimension into `k_slices` fixed slices
that write separate partial outputs (deterministic split-K: no atomics; the caller sums the slices in a fixed order),
and a symmetric mode in which only the lower tiles are computed and each is mirrored into the upper triangle
(inside diagonal tiles too, by a second small launch, so the result is exactly symmetric whatever order tl.dot
sums in).

Precision: operands are cast to `dot_dtype` inside the kernel and multiplied with tl.dot's `input_precision="ieee"`
unless the caller asks for "tf32" or "tf32x3" (fp32 operands only); accumulation is fp32 (fp64 for fp64 operands:
`compute_dtype`). Tiles: kernels/tiles.py (MATMUL, or the caller's `blocks`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .contract import compute_dtype
from .tiles import MATMUL

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
# tl.dot input precisions for fp32 operands: exact fp32 products (FMA units), one TF32 tensor-core product, or three
# (Triton's split of each operand into a TF32 value and the TF32 rounding of the rest: about fp32 accuracy)
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def dot_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype both tiles are cast to before tl.dot: the shared low precision when both operands are fp16 or
    both bf16 (tensor cores, fp32 accumulation), the compute dtype otherwise."""
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        return a.dtype
    return compute_dtype(a, b)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, a2_ptr, b2_ptr, M, N, K, k_per_slice,
                   s_am, s_ak, s_bk, s_bn, s_a2m, s_a2k, s_b2k, s_b2n, s_cs, s_cm, s_cn, alpha, lam_ptr,
                   SYMMETRIC: tl.constexpr, ACCUMULATE: tl.constexpr, ADD_DIAG: tl.constexpr,
                   HAS_A2: tl.constexpr, HAS_B2: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if SYMMETRIC:
        if pid_n > pid_m:  # upper tiles are written by their mirror
            return
    # int64 offsets: row * stride overflows int32 at ImageNet scale
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k_start = pid_s.to(tl.int64) * k_per_slice
    k_stop = tl.minimum(k_start + k_per_slice, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = ks < k_stop
        a_offs = rows[:, None] * s_am + ks[None, :] * s_ak
        a_mask = (rows[:, None] < M) & kmask[None, :]
        b_offs = ks[:, None] * s_bk + cols[None, :] * s_bn
        b_mask = kmask[:, None] & (cols[None, :] < N)
        a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptr + b_offs, mask=b_mask, other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        # bf16 pairs (a + a2)(b + b2): the low parts' cross terms; a2 b2 is below the precision kept
        if HAS_B2:
            b2 = tl.load(b2_ptr + ks[:, None] * s_b2k + cols[None, :] * s_b2n, mask=b_mask, other=0.0).to(DOT_DTYPE)
            acc = tl.dot(a, b2, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if HAS_A2:
            a2 = tl.load(a2_ptr + rows[:, None] * s_a2m + ks[None, :] * s_a2k, mask=a_mask, other=0.0).to(DOT_DTYPE)
            acc = tl.dot(a2, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    acc = acc * alpha
    if ADD_DIAG:
        lam = tl.load(lam_ptr).to(ACC_DTYPE)   # from memory: a Python float argument would be rounded to fp32
        acc = tl.where(rows[:, None] == cols[None, :], acc + lam, acc)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    c_base = c_ptr + pid_s.to(tl.int64) * s_cs
    c_ptrs = c_base + rows[:, None] * s_cm + cols[None, :] * s_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    if SYMMETRIC:
        if pid_n < pid_m:
            tl.store(c_base + cols[None, :] * s_cm + rows[:, None] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mirror_diagonal_tiles_kernel(c_ptr, n, s_cs, s_cm, s_cn, BLOCK: tl.constexpr):
    """Copies the lower triangle of diagonal tile program_id(0) (of slice program_id(1)) into its upper triangle.

    A diagonal tile of the symmetric mode is one full tl.dot product, whose (i, j) and (j, i) elements are summed in
    orders nothing promises to be equal (the interpreter's BLAS does not, nor does a GPU's); after this launch the
    result is exactly symmetric. Reads (lower) and writes (upper) are disjoint; a separate launch rather than a
    transpose inside the matmul kernel, which raised its registers from 128 to 255 and made ptxas spill."""
    base = c_ptr + tl.program_id(1).to(tl.int64) * s_cs
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    upper = (idx[:, None] < idx[None, :]) & (idx[None, :] < n)
    values = tl.load(base + idx[None, :] * s_cm + idx[:, None] * s_cn, mask=upper)   # element (j, i) of the lower
    tl.store(base + idx[:, None] * s_cm + idx[None, :] * s_cn, values, mask=upper)


def matmul(a: Tensor, b: Tensor, out: Tensor | None = None, *, alpha: float = 1.0, accumulate: bool = False,
           k_slices: int = 1, input_precision: str = "ieee", symmetric: bool = False, lam: float = 0.0,
           blocks: dict | None = None, a_lo: Tensor | None = None, b_lo: Tensor | None = None) -> Tensor:
    """out = alpha * a @ b (+ lam I) (+ out when accumulate), computed by one Triton launch.

    With a_lo / b_lo (same shape and dtype as a / b, any strides) the operands are the pairs a + a_lo and b + b_lo,
    and the product is a @ b + a @ b_lo + a_lo @ b (the a_lo @ b_lo term is dropped): two bf16 halves of an fp32
    operand (`linear_ce.split_bf16`) multiplied on tensor cores.

    Args:
        a: (M, K), b: (K, N), any strides, fp16/bf16/fp32/fp64 (mixed low precisions compute in fp32).
        out: (M, N), or (k_slices, M, N) when k_slices > 1: slice s receives the product over the s-th contiguous
            range of K (sum the slices afterwards, in order, for a deterministic split-K). Allocated (fp32, or
            fp64 for fp64 operands) when None.
        alpha: runtime scale (passed as an fp32 scalar: use exactly representable values such as 1, -1, 2).
            accumulate: add into the existing content of out (read-modify-write, no atomics).
        input_precision: tl.dot's, for fp32 operands: "ieee" (exact fp32 products), "tf32" or "tf32x3"
            (three TF32 products: benchmarks/precision_study.py measures its accuracy); other dtypes ignore it.
        symmetric: a @ b is known symmetric (b = a^T): only lower tiles are computed and mirrored.
        lam: added to the diagonal of the result (before accumulation).
        blocks: tile override {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} (BLOCK_M == BLOCK_N
            when symmetric).
    """
    m, k = a.shape
    k2, n = b.shape
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"matmul: input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    if k != k2:
        raise ValueError(f"matmul: inner dimensions differ, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    for name, main, low in (("a_lo", a, a_lo), ("b_lo", b, b_lo)):
        if low is not None and (low.shape != main.shape or low.dtype != main.dtype):
            raise ValueError(f"matmul: {name} must match its main part in shape and dtype")
    acc_dt = compute_dtype(a, b)
    if out is None:
        out = torch.empty((k_slices, m, n) if k_slices > 1 else (m, n), dtype=acc_dt, device=a.device)
    s_cs = out.stride(0) if out.dim() == 3 else 0
    s_cm, s_cn = out.stride(-2), out.stride(-1)
    meta = {**MATMUL, **(blocks or {})}
    if symmetric and meta["BLOCK_M"] != meta["BLOCK_N"]:
        raise ValueError(f"matmul: symmetric needs square tiles, got BLOCK_M={meta['BLOCK_M']} "
                         f"BLOCK_N={meta['BLOCK_N']}")
    k_per_slice = triton.cdiv(triton.cdiv(k, k_slices), meta["BLOCK_K"]) * meta["BLOCK_K"]
    ddt = dot_dtype(a, b)
    prec = input_precision if ddt == torch.float32 else "ieee"
    lam_t = torch.full((1,), lam, dtype=acc_dt, device=a.device)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), k_slices)
    a2, b2 = a if a_lo is None else a_lo, b if b_lo is None else b_lo
    _matmul_kernel[grid](a, b, out, a2, b2, m, n, k,
                         k_per_slice, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
                         s_cs, s_cm, s_cn, float(alpha), lam_t,
                         SYMMETRIC=symmetric, ACCUMULATE=accumulate, ADD_DIAG=lam != 0.0,
                         HAS_A2=a_lo is not None, HAS_B2=b_lo is not None,
                         DOT_DTYPE=TL_DTYPES[ddt], ACC_DTYPE=TL_DTYPES[acc_dt], PRECISION=prec,
                         **meta)
    if symmetric:   # after the product (same stream): each diagonal tile's lower triangle copied into its upper
        _mirror_diagonal_tiles_kernel[(grid[0], k_slices)](out, m, s_cs, s_cm, s_cn, BLOCK=meta["BLOCK_M"],
                                                           num_warps=4)
    return out

