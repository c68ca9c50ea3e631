"""Fused linear temperature-softmax cross-entropy: loss_i = logsumexp(x_i W / tau) - (x_i W / tau)[y_i].

Forward + backward in one pass (`linear_ce_forward_backward`, what reductions mean and sum use: their upstream
gradient is known before the forward, so the per-row weights grad_rows are too), over row chunks (at most
CHUNK_BUDGET_BYTES of scratch and coefficients):
  1. `_ce_fused_kernel`, one program per block of BLOCK_ROWS rows, computes each (BLOCK_ROWS, BLOCK_CLASSES) logits
     tile once (a tiled product over the feature dimension, BLOCK_FEATURES at a time, scaled by the runtime 1/tau),
     folds it into an online logsumexp and the picked target logit, and stores it (fp32) in the chunk's scratch; after
     the last tile it writes the rows' losses and logsumexps, then turns its own stored logits into the coefficients
     coef = (softmax - onehot) * grad_row / tau (bf16 on the bf16 paths, fp16 on the fp16 path, fp32 otherwise),
     written in place over the logits (a 16-bit coefficient row is the first half of its fp32 logits row). When one
     class tile covers every class (C <= BLOCK_CLASSES, e.g. C = 100) the tile stays in registers: no scratch.
  2. dW += x_chunk^T @ coef by the strided matmul kernel, divided over the chunk's rows into `k_slices` fixed slices
     that each own a private fp32 partial dW (read-modify-write, no atomics); the partials are summed in a fixed
     order at the end, so two runs give bitwise-identical dW. k_slices: from the GPU's SM count (`_num_k_slices`).
  3. dX_chunk = coef @ W^T when x needs a gradient.
Two GEMMs in all (logits, dW; a third for dX), no logits tile computed twice; on the bf16-pair path (below) each GEMM
is two tensor-core products (dX three): four products in all without dX. Extra memory: one chunk of scratch
(<= CHUNK_BUDGET_BYTES) + k_slices x d x C fp32 partials; never N x C.

Forward alone (`linear_ce_forward`: reduction "none", or no gradient): `_ce_forward_kernel`, the same tiles and
online logsumexp, writes only the (N,) losses and logsumexps. Its backward (`linear_ce_backward`) recomputes the
logits: `_ce_coef_kernel` writes a chunk's coefficients (class tiles of one row block adjacent in launch order, so
the block's rows are read from memory once), then steps 2 and 3.

Alignment: every operand the kernels stream has rows of a multiple of 16 elements (ALIGN) and its loads are masked
at that padded width, so Triton can prove 16-byte alignment and issue vector loads / asynchronous copies: w is
copied into a zero-padded (d, C_pad) buffer when C % 16 != 0 (or its strides do not allow it), the coefficient
buffers and dW partials are C_pad wide (their padding columns hold zeros), and the logits are masked to -inf at C.

Precision (`CEParams.precision`, kernels/contract.py): when x and w are both bf16 (or both fp16) the products use tensor
cores in that dtype with fp32 accumulation; the coefficients are stored in that dtype too (fp16 ones scaled by
1/max|grad_rows| instead of 1/tau, so they use fp16's range; the gradients are scaled back). Under "high", when x is
bf16 and w fp32 (what a bf16 feature cache and the fp32 ridge probe give), w is split into two bf16 halves,
|w - hi - lo| <= 2^-17 |w|, and x w = x hi + x lo runs as two tensor-core products with fp32 accumulation (x is exact
in bf16, so each product is exact); the backward splits its coefficients the same way (`bf16_pair` below, constexpr
BF16_PAIR in the kernels), so each of its products is two tensor-core products too, and dX = (c_hi + c_lo)(hi + lo)^T
is three (the c_lo lo term is dropped).
The resulting error bound (per logit 2^-17 sum_k |x_k| |w_kj| / tau, plus fp32 accumulation) is in docs/KERNELS.md and
checked by tests/test_kernel_linear_ce.py (with split_ce_bounds of tests/ce_split_bound.py).
Otherwise operands are fp32 and the products are exact fp32 (tl.dot's "ieee"): "highest" (and "high" for other dtype
pairs); "medium" multiplies fp32 operands in TF32, with no split. fp64 inputs compute in fp64.

Tiles: kernels/tiles.py (CE, CE_FP64, CE_FUSED_FEATURES_FMA); with `CEParams.autotune` the forward and coefficient
kernels autotune over tiles.CE_AUTOTUNE (the fused kernel keeps its fixed tiles). `python tools/kernel_report.py`
lists what the compiler makes of these kernels for sm_90.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tiles
from .contract import CEParams, compute_dtype
from .matmul import TL_DTYPES, dot_dtype, matmul

COEF_BUDGET_BYTES = 32 * 2**20     # one chunk of coefficients of the recomputing backward (32 MiB)
CHUNK_BUDGET_BYTES = 64 * 2**20    # one chunk of logits scratch and coefficients of the fused pass (64 MiB)
MAX_K_SLICES = 32                  # fp32 partial dW buffers (each d x C_pad) ...
PARTIALS_BUDGET_BYTES = 16 * 2**20  # ... and at most this much of them (with the scratch: < 100 MB in all)
ALIGN = 16                         # elements: row strides and masked widths of streamed buffers are multiples of it
_BLOCK_KEYS = ("BLOCK_ROWS", "BLOCK_CLASSES", "BLOCK_FEATURES")


def split_bf16(t: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 t -> (hi, lo): hi = t rounded to bf16, lo = (t - hi) rounded to bf16: |t - hi - lo| <= 2^-17 |t|.

    (With 2^e <= |t|: t - hi is exact in fp32 and |t - hi| <= 2^(e-8); it is either exactly 2^(e-8), so lo is
    exact, or below it, so rounding it to bf16's 8 significant bits leaves at most 2^(e-17). For |t| >= 2^-110,
    where lo stays a normal bf16 number.)

    Stored as bf16 for the tensor cores; on CPU tensors (Triton's interpreter: no bf16 arithmetic) as fp32 holding the
    same values.
    """
    hi = t.to(torch.bfloat16)
    lo = (t - hi.float()).to(torch.bfloat16)
    store = torch.float32 if t.device.type == "cpu" else torch.bfloat16
    return hi.to(store).contiguous(), lo.to(store).contiguous()


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32, by integer arithmetic on the bits: the same
    on a GPU and in the interpreter (whose casts to bf16 truncate). For finite v."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, C_LOAD, s_x0, s_x1, s_w0, s_w1, inv_tau,
                 BF16_PAIR: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
    """(BLOCK_ROWS, BLOCK_CLASSES) tile of x w / tau with -inf in the columns past C; with BF16_PAIR, w is the pair
    w + w2. w is read up to C_LOAD (a multiple of ALIGN: zero columns past C), so its loads are aligned vectors."""
    acc = tl.zeros((BLOCK_ROWS, BLOCK_CLASSES), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_FEATURES):
        ds = d0 + tl.arange(0, BLOCK_FEATURES).to(tl.int64)
        xt = tl.load(x_ptr + rows[:, None] * s_x0 + ds[None, :] * s_x1,
                     mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0).to(DOT_DTYPE)
        w_offs = ds[:, None] * s_w0 + cols[None, :] * s_w1
        w_mask = (ds[:, None] < D) & (cols[None, :] < C_LOAD)
        wt = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
        acc = tl.dot(xt, wt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if BF16_PAIR:
            wt2 = tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0)
            acc = tl.dot(xt, wt2.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return tl.where(cols[None, :] < C, acc * inv_tau, float("-inf"))


@triton.jit
def _row_loss(lse, picked, tgt, ignore_index, C):
    """A row's loss from its logsumexp and picked logit: 0 when ignored, NaN when its target lies outside [0, C)
    (no silent wrong loss)."""
    known = (tgt >= 0) & (tgt < C)
    return tl.where(tgt != ignore_index, tl.where(known, lse - picked, float("nan")), 0.0)


@triton.jit
def _store_coef(logits, rows, cols, rmask, lse, gs, tgt, coef_ptr, coef2_ptr, s_c0, s_c20, C_LOAD,
                BF16_PAIR: tl.constexpr):
    """coef = (softmax - onehot) * gs (gs: the row's weight times the coefficient scale) of a logits tile, stored
    up to C_LOAD (zeros past C, where the logits are -inf). With BF16_PAIR a bf16 high part and the bf16 rounding of
    the remainder (into coef2, row stride s_c20), for the tensor-core dW / dX products; bf16 coefficients are rounded
    to nearest (the interpreter's cast would truncate)."""
    p = tl.exp(logits - lse[:, None])
    coef = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * gs[:, None]
    offs = rows[:, None] * s_c0 + cols[None, :]
    mask = rmask[:, None] & (cols[None, :] < C_LOAD)
    if BF16_PAIR:
        hi = _round_to_bf16(coef)
        tl.store(coef_ptr + offs, hi.to(coef_ptr.dtype.element_ty), mask=mask)
        tl.store(coef2_ptr + rows[:, None] * s_c20 + cols[None, :], (coef - hi).to(coef2_ptr.dtype.element_ty),
                 mask=mask)
    else:
        if coef_ptr.dtype.element_ty == tl.bfloat16:
            coef = _round_to_bf16(coef)
        tl.store(coef_ptr + offs, coef.to(coef_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_forward_kernel(x_ptr, w_ptr, w2_ptr, t_ptr, loss_ptr, lse_ptr, N, D, C, C_LOAD, s_x0, s_x1, s_w0, s_w1,
                       inv_tau_ptr, ignore_index, BF16_PAIR: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
    pid = tl.program_id(0)
    inv_tau = tl.load(inv_tau_ptr)   # 1/tau from memory: runtime value, and exact in fp64 (a float arg is fp32)
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    m_i = tl.full((BLOCK_ROWS,), float("-inf"), dtype=ACC_DTYPE)
    s_i = tl.zeros((BLOCK_ROWS,), dtype=ACC_DTYPE)
    picked = tl.zeros((BLOCK_ROWS,), dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_CLASSES):
        cols = c0 + tl.arange(0, BLOCK_CLASSES).to(tl.int64)
        logits = _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, C_LOAD, s_x0, s_x1, s_w0, s_w1, inv_tau,
                              BF16_PAIR, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_ROWS, BLOCK_CLASSES, BLOCK_FEATURES)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        picked += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
    lse = m_i + tl.log(s_i)
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=rmask)
    tl.store(loss_ptr + rows, _row_loss(lse, picked, tgt, ignore_index, C).to(loss_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _ce_coef_kernel(x_ptr, w_ptr, w2_ptr, t_ptr, lse_ptr, g_ptr, coef_ptr, coef2_ptr, N, D, C, C_LOAD,
                    s_x0, s_x1, s_w0, s_w1, s_c0, s_c20, inv_tau_ptr, scale_ptr, BF16_PAIR: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
    pid_c = tl.program_id(0)   # class tiles on the fast axis: the programs of one row block run together
    pid_n = tl.program_id(1)
    inv_tau = tl.load(inv_tau_ptr)
    rows = pid_n.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = pid_c.to(tl.int64) * BLOCK_CLASSES + tl.arange(0, BLOCK_CLASSES).to(tl.int64)
    rmask = rows < N
    # ignored rows have g == 0 (folded in by the caller), and their target never equals a column index
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC_DTYPE)
    gs = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(ACC_DTYPE) * tl.load(scale_ptr)
    logits = _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, C_LOAD, s_x0, s_x1, s_w0, s_w1, inv_tau,
                          BF16_PAIR, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_ROWS, BLOCK_CLASSES, BLOCK_FEATURES)
    _store_coef(logits, rows, cols, rmask, lse, gs, tgt, coef_ptr, coef2_ptr, s_c0, s_c20, C_LOAD,
                BF16_PAIR)


@triton.jit
def _ce_fused_kernel(x_ptr, w_ptr, w2_ptr, t_ptr, g_ptr, loss_ptr, lse_ptr, z_ptr, coef_ptr, coef2_ptr,
                     N, D, C, C_LOAD, s_x0, s_x1, s_w0, s_w1, s_z0, s_c0, s_c20, inv_tau_ptr, scale_ptr,
                     ignore_index,
                     BF16_PAIR: tl.constexpr, ONE_TILE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
    """Losses, logsumexps and coefficients of one row block, each logits tile computed once (module docstring).

    z (row stride s_z0, ACC_DTYPE) is the scratch of the block's logits; coef (row stride s_c0) may alias it: a
    16-bit coefficient row occupies the first half of the bytes of its logits row. Unused with ONE_TILE."""
    pid = tl.program_id(0)
    inv_tau = tl.load(inv_tau_ptr)
    rows = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    gs = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(ACC_DTYPE) * tl.load(scale_ptr)
    if ONE_TILE:   # every class in one tile: the logits stay in registers
        cols = tl.arange(0, BLOCK_CLASSES).to(tl.int64)
        logits = _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, C_LOAD, s_x0, s_x1, s_w0, s_w1, inv_tau,
                              BF16_PAIR, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_ROWS, BLOCK_CLASSES, BLOCK_FEATURES)
        m_i = tl.max(logits, axis=1)
        lse = m_i + tl.log(tl.sum(tl.exp(logits - m_i[:, None]), axis=1))
        picked = tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
        _store_coef(logits, rows, cols, rmask, lse, gs, tgt, coef_ptr, coef2_ptr, s_c0, s_c20, C_LOAD, BF16_PAIR)
    else:
        m_i = tl.full((BLOCK_ROWS,), float("-inf"), dtype=ACC_DTYPE)
        s_i = tl.zeros((BLOCK_ROWS,), dtype=ACC_DTYPE)
        picked = tl.zeros((BLOCK_ROWS,), dtype=ACC_DTYPE)
        for c0 in range(0, C, BLOCK_CLASSES):
            cols = c0 + tl.arange(0, BLOCK_CLASSES).to(tl.int64)
            logits = _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, C_LOAD, s_x0, s_x1, s_w0, s_w1,
                                  inv_tau, BF16_PAIR, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_ROWS, BLOCK_CLASSES,
                                  BLOCK_FEATURES)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m_i = m_new
            picked += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
            tl.store(z_ptr + rows[:, None] * s_z0 + cols[None, :], logits,
                     mask=rmask[:, None] & (cols[None, :] < C_LOAD))
        lse = m_i + tl.log(s_i)
        tl.debug_barrier()   # the block's logits, stored by all its threads, are visible to all of them
        for c0 in range(0, C_LOAD, BLOCK_CLASSES):
            cols = c0 + tl.arange(0, BLOCK_CLASSES).to(tl.int64)
            logits = tl.load(z_ptr + rows[:, None] * s_z0 + cols[None, :],
                             mask=rmask[:, None] & (cols[None, :] < C_LOAD), other=float("-inf"))
            # every thread has read this tile before any coefficient is written: a 16-bit coefficient tile
            # overwrites bytes of this logits tile (the first one) or of tiles already read
            tl.debug_barrier()
            _store_coef(logits, rows, cols, rmask, lse, gs, tgt, coef_ptr, coef2_ptr, s_c0, s_c20, C_LOAD, BF16_PAIR)
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=rmask)
    tl.store(loss_ptr + rows, _row_loss(lse, picked, tgt, ignore_index, C).to(loss_ptr.dtype.element_ty), mask=rmask)


@functools.cache
def _autotuned(kernel):
    """The autotuning wrapper of a CE kernel (CEParams.autotune), built at its first launch and kept (with what it
    has measured)."""
    configs = [triton.Config({k: c[k] for k in _BLOCK_KEYS}, num_warps=c["num_warps"], num_stages=c["num_stages"])
               for c in tiles.CE_AUTOTUNE]
    return triton.autotune(configs, key=["D", "C"])(kernel)


def _inv_tau(tau: float, dtype: torch.dtype, device) -> Tensor:
    return torch.full((1,), 1.0 / tau, dtype=dtype, device=device)


def _launchable(kernel, blocks: dict | None, acc: torch.dtype, autotune: bool):
    """(kernel to launch, its launch options): the autotuned kernel with no options with `autotune` (when no
    explicit blocks are given), else the kernel with the fixed tiles (or `blocks`)."""
    if blocks is None and autotune:
        return _autotuned(kernel), {}
    return kernel, _launch_meta(blocks, acc)


def _launch_meta(blocks: dict | None, acc: torch.dtype) -> dict:
    """The launch options: `blocks` (with the default warps and stages), else tiles.CE (tiles.CE_FP64 for fp64)."""
    if blocks is None:
        return dict(tiles.CE_FP64 if acc == torch.float64 else tiles.CE)
    return {"num_warps": tiles.CE["num_warps"], "num_stages": tiles.CE["num_stages"], **blocks}


def _precision(x: Tensor, w: Tensor, precision: str) -> tuple[torch.dtype, torch.dtype, str, bool]:
    """(compute dtype, tl.dot operand dtype, tl.dot input_precision, bf16_pair) for a CEParams precision:
    bf16_pair when x is bf16 and w fp32 under "high": w enters as two bf16 halves (`split_bf16`) on tensor cores;
    TF32 products of fp32 operands under "medium"; exact products otherwise."""
    acc = compute_dtype(x, w)
    if precision == "high" and x.dtype == torch.bfloat16 and w.dtype == torch.float32:
        return acc, (torch.float32 if x.device.type == "cpu" else torch.bfloat16), "ieee", True
    ddt = dot_dtype(x, w)
    return acc, ddt, ("tf32" if precision == "medium" and ddt == torch.float32 else "ieee"), False


def padded_width(num_classes: int) -> int:
    """C rounded up to a multiple of ALIGN: the row width of the buffers the kernels stream."""
    return triton.cdiv(num_classes, ALIGN) * ALIGN


def _aligned(w: Tensor) -> Tensor:
    """w (d, C) as the kernels stream it: itself when C and its row stride are multiples of ALIGN (unit column
    stride, 16-byte aligned start), else a zero-padded contiguous copy (d, padded_width(C))."""
    d, num_classes = w.shape
    width = padded_width(num_classes)
    if width == num_classes and w.stride(1) == 1 and w.stride(0) % ALIGN == 0 and w.data_ptr() % 16 == 0:
        return w
    out = torch.zeros((d, width), dtype=w.dtype, device=w.device)
    out[:, :num_classes] = w
    return out


def _streamed_w(w: Tensor, bf16_pair: bool) -> tuple[Tensor, Tensor]:
    """(w, w2) as the kernels read them: aligned (`_aligned`), as two bf16 halves on the bf16-pair path."""
    wa = _aligned(w)
    return split_bf16(wa) if bf16_pair else (wa, wa)


def _coef_dtype(ddt: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """The coefficients' storage dtype: the tensor cores' dtype on the 16-bit paths (the bf16 pair's halves are
    fp32 stand-ins under the interpreter, as in `split_bf16`), the compute dtype otherwise."""
    return ddt if ddt in (torch.float16, torch.bfloat16) else acc


def _coef_scales(grad_rows: Tensor, tau: float, coef_dt: torch.dtype, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(scale the kernels multiply grad_rows by, factor the gradients are multiplied by afterwards or None).

    1/tau and None, except for fp16 coefficients: (softmax - onehot) * grad_rows scaled by 1/max|grad_rows| (so they
    lie in [-1, 1], not in fp16's subnormals: 1/N / tau is ~1e-5 at ImageNet scale) and the gradients by
    max|grad_rows| / tau. Tensors on the device: no host synchronisation."""
    if coef_dt != torch.float16:
        return _inv_tau(tau, acc, grad_rows.device), None
    top = grad_rows.abs().amax().reshape(1)
    top = torch.where(top > 0, top, torch.ones_like(top))
    return 1.0 / top, top / tau


def _sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device (tools/kernel_aot.py stands in a target GPU's count for meta tensors)."""
    if device.type != "cuda":
        raise ValueError(f"linear_ce: the SM count of a {device.type} device is unknown")
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_k_slices(device: torch.device, d: int, width: int, mm_tiles: dict, rows: int) -> int:
    """Fixed slices of the row reduction for dW: the count (up to MAX_K_SLICES, PARTIALS_BUDGET_BYTES of partials
    and one BLOCK_K of rows per slice) whose programs (output tiles x slices) fill the SMs' resident blocks in the
    fewest, fullest waves (a multiple of them where one exists), the smaller count on a tie."""
    if device.type == "cpu":
        return 2  # the interpreter: exercise the sliced path
    out_tiles = triton.cdiv(d, mm_tiles["BLOCK_M"]) * triton.cdiv(width, mm_tiles["BLOCK_N"])
    slots = _sm_count(device) * tiles.DW_BLOCKS_PER_SM
    top = max(1, min(MAX_K_SLICES, PARTIALS_BUDGET_BYTES // (4 * d * width), triton.cdiv(rows, mm_tiles["BLOCK_K"])))

    def fill(s: int) -> float:
        programs = out_tiles * s
        return programs / (triton.cdiv(programs, slots) * slots)
    return max(range(1, top + 1), key=lambda s: (fill(s), -s))


def _matmul_tiles(coef_dt: torch.dtype, acc: torch.dtype, blocks: dict | None) -> dict | None:
    """Tiles of the dW / dX products: large on a GPU, the matmul's default 64-wide ones for fp64 and for test
    overrides."""
    if acc == torch.float64 or blocks is not None:
        return None
    return tiles.MATMUL_LARGE if coef_dt in (torch.bfloat16, torch.float16) else tiles.MATMUL_LARGE_FP32


def _summed_slices(parts: Tensor, num_classes: int, post: Tensor | None) -> Tensor:
    """dW (d, C) from the partial slices (k, d, C_pad), summed in a fixed order (bitwise reproducible)."""
    grad_w = parts[0, :, :num_classes].contiguous()
    for s in range(1, parts.shape[0]):
        grad_w += parts[s, :, :num_classes]
    return grad_w if post is None else grad_w.mul_(post)


def linear_ce_forward(x: Tensor, w: Tensor, target: Tensor, params: CEParams,
                      blocks: dict | None = None) -> tuple[Tensor, Tensor]:
    """Per-row CE of softmax(x w / tau) against target, fused (no logits buffer).

    Args:
        x: (N, d) fp16/bf16/fp32/fp64, any strides. w: (d, C), same family of dtypes.
        target: (N,) int32/int64 in [0, C) or params.ignore_index, any stride.
        params: tau (a runtime value), ignore_index, precision (module docstring), autotune; chunk_size is unused
            (the kernel never holds more than a (BLOCK_ROWS, BLOCK_CLASSES) logits tile).
        blocks: optional {"BLOCK_ROWS", "BLOCK_CLASSES", "BLOCK_FEATURES"} tile override (powers of two >= 16), e.g.
            for tests.
    Returns:
        (loss_rows (N,), lse (N,)) fp32 (fp64 for fp64 inputs); ignored rows get loss 0, rows whose target lies
        outside [0, C) NaN.
    """
    n, d = x.shape
    num_classes = w.shape[1]
    acc, ddt, prec, bf16_pair = _precision(x, w, params.precision)
    w_hi, w_lo = _streamed_w(w, bf16_pair)
    target = target.contiguous()   # the kernels read targets at unit stride
    loss = torch.empty(n, dtype=acc, device=x.device)
    lse = torch.empty(n, dtype=acc, device=x.device)
    kernel, meta = _launchable(_ce_forward_kernel, blocks, acc, params.autotune)
    grid = lambda m: (triton.cdiv(n, m["BLOCK_ROWS"]),)  # noqa: E731
    kernel[grid](x, w_hi, w_lo, target, loss, lse, n, d, num_classes, w_hi.shape[1], x.stride(0), x.stride(1),
                 w_hi.stride(0), w_hi.stride(1), _inv_tau(params.tau, acc, x.device), int(params.ignore_index),
                 BF16_PAIR=bf16_pair, DOT_DTYPE=TL_DTYPES[ddt], ACC_DTYPE=TL_DTYPES[acc], PRECISION=prec, **meta)
    return loss, lse


def linear_ce_backward(x: Tensor, w: Tensor, target: Tensor, lse: Tensor, grad_rows: Tensor, params: CEParams,
                       need_x: bool, need_w: bool, blocks: dict | None = None,
                       k_slices: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of sum_i grad_rows[i] * loss_i wrt x and w, recomputing logits tiles; deterministic.

    Args:
        x (N, d), w (d, C), target (N,): as in the forward. lse (N,): the forward's logsumexp.
        grad_rows (N,): per-row weights, already scaled by the reduction and 0 on ignored rows.
        params: as in the forward; chunk_size is the rows per backward chunk (also bounded by COEF_BUDGET_BYTES of
            coefficients); ignore_index is unused (grad_rows is 0 on ignored rows).
        need_x, need_w: which gradients to compute. blocks, k_slices: tile / dW slice-count overrides (tests).
    Returns:
        (grad_x (N, d), grad_w (d, C)) fp32 (fp64 for fp64 inputs), or None where not needed.
    """
    n, d = x.shape
    num_classes = w.shape[1]
    acc, ddt, prec, bf16_pair = _precision(x, w, params.precision)
    if not (need_x or need_w):
        return None, None
    w_hi, w_lo = _streamed_w(w, bf16_pair)
    target = target.contiguous()
    width = w_hi.shape[1]
    coef_dt = _coef_dtype(ddt, acc)
    coef_bytes = torch.empty((), dtype=coef_dt).element_size() * (2 if bf16_pair else 1)
    rows = max(1, min(params.chunk_size, n, COEF_BUDGET_BYTES // (coef_bytes * width)))
    coef = torch.empty((rows, width), dtype=coef_dt, device=x.device)
    coef_lo = torch.empty_like(coef) if bf16_pair else coef
    mm = _matmul_tiles(coef_dt, acc, blocks)
    if k_slices is None:
        k_slices = _num_k_slices(x.device, d, width, mm or {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, rows)
    parts = torch.empty((k_slices, d, width), dtype=acc, device=x.device) if need_w else None
    grad_x = torch.empty((n, d), dtype=acc, device=x.device) if need_x else None
    grad_rows = grad_rows.to(acc).contiguous()
    scale, post = _coef_scales(grad_rows, params.tau, coef_dt, acc)
    lse = lse.contiguous()
    kernel, meta = _launchable(_ce_coef_kernel, blocks, acc, params.autotune)
    inv_tau = _inv_tau(params.tau, acc, x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        nrows = stop - start
        xc = x[start:stop]
        grid = lambda m: (triton.cdiv(num_classes, m["BLOCK_CLASSES"]),  # noqa: E731
                          triton.cdiv(nrows, m["BLOCK_ROWS"]))
        kernel[grid](xc, w_hi, w_lo, target[start:stop], lse[start:stop], grad_rows[start:stop], coef, coef_lo,
                     nrows, d, num_classes, width, xc.stride(0), xc.stride(1), w_hi.stride(0), w_hi.stride(1),
                     coef.stride(0), coef_lo.stride(0), inv_tau, scale, BF16_PAIR=bf16_pair,
                     DOT_DTYPE=TL_DTYPES[ddt], ACC_DTYPE=TL_DTYPES[acc], PRECISION=prec, **meta)
        _gradient_products(xc, coef[:nrows], coef_lo[:nrows] if bf16_pair else None, w_hi, w_lo if bf16_pair else None,
                           parts, grad_x[start:stop] if need_x else None, start > 0, k_slices, prec, mm, post)
    return grad_x, (_summed_slices(parts, num_classes, post) if need_w else None)


def _gradient_products(xc: Tensor, coef: Tensor, coef_lo: Tensor | None, w_hi: Tensor, w_lo: Tensor | None,
                       parts: Tensor | None, grad_x: Tensor | None, accumulate: bool, k_slices: int, prec: str,
                       mm: dict | None, post: Tensor | None) -> None:
    """One chunk's dW partials (parts += x_chunk^T coef, in k_slices slices) and dX rows (grad_x = coef w^T,
    times post). With the bf16 pair, x (exact in bf16) multiplies coef + coef_lo, and (coef + coef_lo) (w_hi + w_lo)
    drops the lo x lo term."""
    if parts is not None:
        matmul(xc.T, coef, out=parts, accumulate=accumulate, k_slices=k_slices, input_precision=prec, blocks=mm,
               b_lo=coef_lo)
    if grad_x is not None:
        matmul(coef, w_hi.T, out=grad_x, input_precision=prec, blocks=mm, a_lo=coef_lo,
               b_lo=None if w_lo is None else w_lo.T)
        if post is not None:
            grad_x.mul_(post)


def linear_ce_forward_backward(x: Tensor, w: Tensor, target: Tensor, grad_rows: Tensor, params: CEParams,
                               need_x: bool, need_w: bool, blocks: dict | None = None,
                               k_slices: int | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-row losses and logsumexps, and in the same pass the gradients of sum_i grad_rows[i] * loss_i wrt x and w:
    each logits tile is computed once (module docstring); deterministic (dW bitwise identical run to run).

    Args:
        x, w, target, blocks: as in `linear_ce_forward`.
        grad_rows (N,): per-row weights, already scaled by the reduction and 0 on ignored rows.
        params: as in `linear_ce_forward`; chunk_size is the rows per chunk (also bounded by CHUNK_BUDGET_BYTES of
            scratch and coefficients); autotune does not apply (the fused kernel keeps its fixed tiles).
        need_x, need_w: which gradients to compute. k_slices: dW slice-count override (tests).
    Returns:
        (loss_rows (N,), lse (N,), grad_x (N, d) or None, grad_w (d, C) or None): as `linear_ce_forward` and
        `linear_ce_backward` give them.
    """
    if not (need_x or need_w):
        return (*linear_ce_forward(x, w, target, params, blocks), None, None)
    n, d = x.shape
    num_classes = w.shape[1]
    acc, ddt, prec, bf16_pair = _precision(x, w, params.precision)
    w_hi, w_lo = _streamed_w(w, bf16_pair)
    target = target.contiguous()
    width = w_hi.shape[1]
    coef_dt = _coef_dtype(ddt, acc)
    meta = _launch_meta(blocks, acc)
    if blocks is None and ddt == torch.float32 and prec == "ieee":
        meta["BLOCK_FEATURES"] = tiles.CE_FUSED_FEATURES_FMA
    one_tile = width <= meta["BLOCK_CLASSES"]
    # per row: the fp32 (fp64) logits scratch, the coefficients in place over it; the bf16 pair's low halves in a
    # compact buffer of their own (rows x width in their dtype: the matmul takes their strides apart from the highs')
    row_bytes = width * (torch.empty((), dtype=acc).element_size() +
                         (torch.empty((), dtype=coef_dt).element_size() if bf16_pair else 0))
    rows = max(1, min(params.chunk_size, n, CHUNK_BUDGET_BYTES // row_bytes))
    scratch = torch.empty((rows, width), dtype=acc, device=x.device)
    coef = scratch.view(coef_dt)[:, :width]
    coef_lo = torch.empty((rows, width), dtype=coef_dt, device=x.device) if bf16_pair else None
    mm = _matmul_tiles(coef_dt, acc, blocks)
    if k_slices is None:
        k_slices = _num_k_slices(x.device, d, width, mm or {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, rows)
    parts = torch.empty((k_slices, d, width), dtype=acc, device=x.device) if need_w else None
    grad_x = torch.empty((n, d), dtype=acc, device=x.device) if need_x else None
    loss = torch.empty(n, dtype=acc, device=x.device)
    lse = torch.empty(n, dtype=acc, device=x.device)
    grad_rows = grad_rows.to(acc).contiguous()
    scale, post = _coef_scales(grad_rows, params.tau, coef_dt, acc)
    inv_tau = _inv_tau(params.tau, acc, x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        nrows = stop - start
        xc = x[start:stop]
        _ce_fused_kernel[(triton.cdiv(nrows, meta["BLOCK_ROWS"]),)](
            xc, w_hi, w_lo, target[start:stop], grad_rows[start:stop], loss[start:stop], lse[start:stop], scratch,
            coef, coef if coef_lo is None else coef_lo, nrows, d, num_classes, width, xc.stride(0), xc.stride(1),
            w_hi.stride(0), w_hi.stride(1), scratch.stride(0), coef.stride(0),
            (coef if coef_lo is None else coef_lo).stride(0), inv_tau, scale, int(params.ignore_index),
            BF16_PAIR=bf16_pair, ONE_TILE=one_tile, DOT_DTYPE=TL_DTYPES[ddt], ACC_DTYPE=TL_DTYPES[acc],
            PRECISION=prec, **meta)
        _gradient_products(xc, coef[:nrows], None if coef_lo is None else coef_lo[:nrows], w_hi,
                           w_lo if bf16_pair else None, parts, grad_x[start:stop] if need_x else None, start > 0,
                           k_slices, prec, mm, post)
    return loss, lse, grad_x, (_summed_slices(parts, num_classes, post) if need_w else None)
