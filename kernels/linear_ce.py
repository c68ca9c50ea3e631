"""Fused linear temperature-softmax cross-entropy: loss_i = logsumexp(x_i W / tau) - (x_i W / tau)[y_i].

Forward (`linear_ce_forward`): one program per block of BLOCK_ROWS rows loops over class tiles of BLOCK_CLASSES
columns, computes each (BLOCK_ROWS, BLOCK_CLASSES) logits tile as a tiled product over the feature dimension
(BLOCK_FEATURES at a time), scales it by the runtime float 1/tau, and folds it into an online logsumexp and the picked
target logit. Only (N,) losses and (N,) logsumexps are written: no logits exist beyond one register tile.

Backward (`linear_ce_backward`), over row chunks of at most `chunk_size` rows (and at most COEF_BUDGET_BYTES of
coefficients):
  1. `_ce_coef_kernel` recomputes each logits tile and writes coef = (softmax - onehot) * grad_row / tau for the
     chunk (chunk x C; bf16 on the bf16 path, fp32 otherwise);
  2. dW += x_chunk^T @ coef by the strided matmul kernel, divided over the chunk's rows into `k_slices` fixed slices
     that each own a private fp32 partial dW (read-modify-write, no atomics); the partials are summed in a fixed
     order at the end, so two runs give bitwise-identical dW;
  3. dX_chunk = coef @ W^T when x needs a gradient.
Extra memory: one coefficient chunk (<= COEF_BUDGET_BYTES) + k_slices x d x C fp32 partials; never N x C.

Precision: when x and w are both bf16 (or both fp16) the products use tensor cores in that dtype with fp32
accumulation. When x is bf16 and w fp32 (what a bf16 feature cache and the fp32 ridge probe give), w is split into
two bf16 halves, |w - hi - lo| <= 2^-17 |w|, and x w = x hi + x lo runs as two tensor-core products with fp32
accumulation (x is exact in bf16, so each product is exact); the backward splits its coefficients the same way
(`bf16_pair` below, constexpr BF16_PAIR in the kernels).
The resulting error bound (per logit 2^-17 sum_k |x_k| |w_kj| / tau, plus fp32 accumulation) is in README.md and
checked by tests/test_kernel_linear_ce.py (with split_ce_bounds of tests/ce_split_bound.py).
Otherwise operands are fp32 and the products are exact fp32 ("ieee"). CLPDD_CE_PRECISION (clpdd_fast.settings):
"auto" (default, the above), "ieee" (exact fp32 products whenever an operand is fp32: no split), "tf32" (TF32 products
for fp32 operands, no split). fp64 inputs compute in fp64.

Tiles: fixed defaults below; CLPDD_AUTOTUNE=1 (read at each launch) autotunes the two CE kernels over a few configs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from clpdd_fast import settings
from clpdd_fast.reference import compute_dtype

from .matmul import LARGE, LARGE_FP32, TL_DTYPES, dot_dtype, matmul

# default tiles: rows, classes, features per step; on the interpreter the same sizes run (fewer numpy steps)
BLOCKS = {"BLOCK_ROWS": 64, "BLOCK_CLASSES": 128, "BLOCK_FEATURES": 64}
NUM_WARPS = 8
NUM_STAGES = 3
BLOCKS_FP64 = {"BLOCK_ROWS": 32, "BLOCK_CLASSES": 64, "BLOCK_FEATURES": 32, "num_warps": 4, "num_stages": 2}
COEF_BUDGET_BYTES = 32 * 2**20     # one backward chunk of coefficients (32 MiB)
MAX_K_SLICES = 8                   # fp32 partial dW buffers (each d x C)
_CONFIGS = [triton.Config({"BLOCK_ROWS": rows, "BLOCK_CLASSES": classes, "BLOCK_FEATURES": features}, num_warps=w,
                          num_stages=s)
            for rows, classes, features, w, s in [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3),
                                                  (128, 64, 32, 4, 4), (64, 256, 32, 8, 3)]]


def split_bf16(t: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 t -> (hi, lo): hi = t rounded to bf16, lo = (t - hi) rounded to bf16: |t - hi - lo| <= 2^-17 |t|.

    (With 2^e <= |t|: t - hi is exact in fp32 and |t - hi| <= 2^(e-8); it is either exactly 2^(e-8), so lo is
    exact, or below it, so rounding it to bf16's 8 significant bits leaves at most 2^(e-17). For |t| >= 2^-110,
    where lo stays a normal bf16 number.)

    Stored as bf16 for the tensor cores; under the interpreter (no bf16 arithmetic) as fp32 holding the same values.
    """
    hi = t.to(torch.bfloat16)
    lo = (t - hi.float()).to(torch.bfloat16)
    store = torch.float32 if settings.triton_interpret() else torch.bfloat16
    return hi.to(store).contiguous(), lo.to(store).contiguous()


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32, by integer arithmetic on the bits: the same
    on a GPU and in the interpreter (whose casts to bf16 truncate). For finite v."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, s_x0, s_x1, s_w0, s_w1, inv_tau,
                 BF16_PAIR: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
    """(BLOCK_ROWS, BLOCK_CLASSES) tile of x w / tau with -inf in the columns past C; with BF16_PAIR, w is the pair
    w + w2."""
    acc = tl.zeros((BLOCK_ROWS, BLOCK_CLASSES), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_FEATURES):
        ds = d0 + tl.arange(0, BLOCK_FEATURES).to(tl.int64)
        xt = tl.load(x_ptr + rows[:, None] * s_x0 + ds[None, :] * s_x1,
                     mask=(rows[:, None] < N) & (ds[None, :] < D), other=0.0).to(DOT_DTYPE)
        w_offs = ds[:, None] * s_w0 + cols[None, :] * s_w1
        w_mask = (ds[:, None] < D) & (cols[None, :] < C)
        wt = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
        acc = tl.dot(xt, wt.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if BF16_PAIR:
            wt2 = tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0)
            acc = tl.dot(xt, wt2.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return tl.where(cols[None, :] < C, acc * inv_tau, float("-inf"))


@triton.jit
def _ce_forward_kernel(x_ptr, w_ptr, w2_ptr, t_ptr, loss_ptr, lse_ptr, N, D, C, s_x0, s_x1, s_w0, s_w1,
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
        logits = _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, s_x0, s_x1, s_w0, s_w1, inv_tau,
                              BF16_PAIR, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_ROWS, BLOCK_CLASSES, BLOCK_FEATURES)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        picked += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
    lse = m_i + tl.log(s_i)
    known = (tgt >= 0) & (tgt < C)   # a target outside [0, C) (and not ignored) gets NaN: no silent wrong loss
    loss = tl.where(tgt != ignore_index, tl.where(known, lse - picked, float("nan")), 0.0)
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=rmask)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _ce_coef_kernel(x_ptr, w_ptr, w2_ptr, t_ptr, lse_ptr, g_ptr, coef_ptr, coef2_ptr, N, D, C,
                    s_x0, s_x1, s_w0, s_w1, s_c0, s_c1, inv_tau_ptr, BF16_PAIR: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_CLASSES: tl.constexpr, BLOCK_FEATURES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    inv_tau = tl.load(inv_tau_ptr)
    rows = pid_n.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = pid_c.to(tl.int64) * BLOCK_CLASSES + tl.arange(0, BLOCK_CLASSES).to(tl.int64)
    rmask = rows < N
    # ignored rows have g == 0 (folded in by the caller), and their target never equals a column index
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(ACC_DTYPE) * inv_tau
    logits = _logits_tile(x_ptr, w_ptr, w2_ptr, rows, cols, N, D, C, s_x0, s_x1, s_w0, s_w1, inv_tau,
                          BF16_PAIR, DOT_DTYPE, ACC_DTYPE, PRECISION, BLOCK_ROWS, BLOCK_CLASSES, BLOCK_FEATURES)
    p = tl.exp(logits - lse[:, None])
    coef = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * g[:, None]
    c_offs = rows[:, None] * s_c0 + cols[None, :] * s_c1
    c_mask = rmask[:, None] & (cols[None, :] < C)
    if BF16_PAIR:   # bf16 high part and the bf16 rounding of the remainder, for the tensor-core dW / dX products
        hi = _round_to_bf16(coef)
        tl.store(coef_ptr + c_offs, hi.to(coef_ptr.dtype.element_ty), mask=c_mask)
        tl.store(coef2_ptr + c_offs, (coef - hi).to(coef2_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(coef_ptr + c_offs, coef.to(coef_ptr.dtype.element_ty), mask=c_mask)


@functools.cache
def _autotuned(kernel):
    """The autotuning wrapper of a CE kernel (CLPDD_AUTOTUNE=1), built at its first launch and kept (with what it
    has measured)."""
    return triton.autotune(_CONFIGS, key=["D", "C"])(kernel)


def _inv_tau(tau: float, dtype: torch.dtype, device) -> Tensor:
    return torch.full((1,), 1.0 / tau, dtype=dtype, device=device)


def _launchable(kernel, blocks: dict | None, acc: torch.dtype):
    """(kernel to launch, its launch options): the autotuned kernel with no options under CLPDD_AUTOTUNE=1 (when no
    explicit blocks are given), else the kernel with the fixed tiles (or `blocks`)."""
    if blocks is None and settings.autotune():
        return _autotuned(kernel), {}
    return kernel, _launch_meta(blocks, acc)


def _launch_meta(blocks: dict | None, acc: torch.dtype) -> dict:
    if blocks is None and acc == torch.float64:
        return dict(BLOCKS_FP64)   # fp64 tiles take twice the shared memory: smaller tiles, fewer stages
    meta = dict(BLOCKS if blocks is None else blocks)
    meta.setdefault("num_warps", NUM_WARPS)
    meta.setdefault("num_stages", NUM_STAGES)
    return meta


def _precision(x: Tensor, w: Tensor, mode: str) -> tuple[torch.dtype, torch.dtype, str, bool]:
    """(compute dtype, tl.dot operand dtype, input_precision, bf16_pair) for precision `mode` ("auto", "ieee" or
    "tf32"): bf16_pair when x is bf16 and w fp32 under "auto": w enters as two bf16 halves (`split_bf16`) on tensor
    cores."""
    acc = compute_dtype(x, w)
    if mode == "auto" and x.dtype == torch.bfloat16 and w.dtype == torch.float32:
        return acc, (torch.float32 if settings.triton_interpret() else torch.bfloat16), "ieee", True
    ddt = dot_dtype(x, w)
    return acc, ddt, ("tf32" if mode == "tf32" and ddt == torch.float32 else "ieee"), False


def linear_ce_forward(x: Tensor, w: Tensor, target: Tensor, tau: float, ignore_index: int, chunk_size: int,
                      precision: str | None = None, blocks: dict | None = None) -> tuple[Tensor, Tensor]:
    """Per-row CE of softmax(x w / tau) against target, fused (no logits buffer).

    Args:
        x: (N, d) fp16/bf16/fp32/fp64, any strides. w: (d, C), same family of dtypes.
        target: (N,) int32/int64 in [0, C) or ignore_index. tau: runtime float > 0.
        chunk_size: unused (the kernel never holds more than a (BLOCK_ROWS, BLOCK_CLASSES) logits tile); kept for
            the backend contract.
        precision: "auto", "ieee" or "tf32" (products of fp32 operands; see the module docstring); None reads
            CLPDD_CE_PRECISION.
        blocks: optional {"BLOCK_ROWS", "BLOCK_CLASSES", "BLOCK_FEATURES"} tile override (powers of two >= 16), e.g.
            for tests.
    Returns:
        (loss_rows (N,), lse (N,)) fp32 (fp64 for fp64 inputs); ignored rows get loss 0, rows whose target lies
        outside [0, C) NaN.
    """
    n, d = x.shape
    num_classes = w.shape[1]
    acc, ddt, prec, bf16_pair = _precision(x, w, precision or settings.ce_precision())
    w_hi, w_lo = split_bf16(w) if bf16_pair else (w, w)
    loss = torch.empty(n, dtype=acc, device=x.device)
    lse = torch.empty(n, dtype=acc, device=x.device)
    kernel, meta = _launchable(_ce_forward_kernel, blocks, acc)
    grid = lambda m: (triton.cdiv(n, m["BLOCK_ROWS"]),)  # noqa: E731
    kernel[grid](x, w_hi, w_lo, target, loss, lse, n, d, num_classes, x.stride(0), x.stride(1), w_hi.stride(0),
                 w_hi.stride(1), _inv_tau(tau, acc, x.device), int(ignore_index), BF16_PAIR=bf16_pair,
                 DOT_DTYPE=TL_DTYPES[ddt], ACC_DTYPE=TL_DTYPES[acc], PRECISION=prec, **meta)
    return loss, lse


def _num_k_slices(device: torch.device, d: int, num_classes: int, tiles: dict) -> int:
    """Fixed slices of the row reduction for dW: enough output tiles x slices to fill the GPU twice."""
    if device.type != "cuda":
        return 2  # the interpreter: exercise the sliced path
    tiles = triton.cdiv(d, tiles["BLOCK_M"]) * triton.cdiv(num_classes, tiles["BLOCK_N"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_K_SLICES, triton.cdiv(2 * sms, tiles)))


def linear_ce_backward(x: Tensor, w: Tensor, target: Tensor, tau: float, lse: Tensor, grad_rows: Tensor,
                       ignore_index: int, chunk_size: int, need_x: bool, need_w: bool,
                       precision: str | None = None, blocks: dict | None = None,
                       k_slices: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of sum_i grad_rows[i] * loss_i wrt x and w, recomputing logits tiles; deterministic.

    Args:
        x (N, d), w (d, C), target (N,), tau: as in the forward. lse (N,): the forward's logsumexp.
        grad_rows (N,): per-row weights, already scaled by the reduction and 0 on ignored rows.
        ignore_index: unused here (grad_rows is 0 on ignored rows), kept for the backend contract.
        chunk_size: rows per backward chunk (also bounded by COEF_BUDGET_BYTES of coefficients).
        need_x, need_w: which gradients to compute. precision: as in the forward.
        blocks, k_slices: tile / dW slice-count overrides (tests).
    Returns:
        (grad_x (N, d), grad_w (d, C)) fp32 (fp64 for fp64 inputs), or None where not needed.
    """
    n, d = x.shape
    num_classes = w.shape[1]
    acc, ddt, prec, bf16_pair = _precision(x, w, precision or settings.ce_precision())
    if not (need_x or need_w):
        return None, None
    w_hi, w_lo = split_bf16(w) if bf16_pair else (w, w)
    # coefficients: bf16 on the bf16 path, a bf16 pair (hi, lo) on the bf16-pair path, fp32/fp64 otherwise
    coef_dt = torch.bfloat16 if ddt == torch.bfloat16 else acc
    coef_bytes = torch.empty((), dtype=coef_dt).element_size() * (2 if bf16_pair else 1)
    rows = max(1, min(chunk_size, n, COEF_BUDGET_BYTES // (coef_bytes * num_classes)))
    coef = torch.empty((rows, num_classes), dtype=coef_dt, device=x.device)
    coef_lo = torch.empty_like(coef) if bf16_pair else coef
    # matmul tiles of the backward GEMMs: large on a GPU, the default 64-wide ones for fp64 and for test overrides
    mm = None
    if acc != torch.float64 and blocks is None:
        mm = LARGE if coef_dt == torch.bfloat16 else LARGE_FP32
    if k_slices is None:
        k_slices = _num_k_slices(x.device, d, num_classes, mm or {"BLOCK_M": 64, "BLOCK_N": 64})
    parts = torch.empty((k_slices, d, num_classes), dtype=acc, device=x.device) if need_w else None
    grad_x = torch.empty((n, d), dtype=acc, device=x.device) if need_x else None
    grad_rows = grad_rows.to(acc).contiguous()
    lse = lse.contiguous()
    kernel, meta = _launchable(_ce_coef_kernel, blocks, acc)
    inv_tau = _inv_tau(tau, acc, x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        nrows = stop - start
        xc = x[start:stop]
        grid = lambda m: (triton.cdiv(nrows, m["BLOCK_ROWS"]),  # noqa: E731
                          triton.cdiv(num_classes, m["BLOCK_CLASSES"]))
        kernel[grid](xc, w_hi, w_lo, target[start:stop], lse[start:stop], grad_rows[start:stop], coef, coef_lo,
                     nrows, d, num_classes, xc.stride(0), xc.stride(1), w_hi.stride(0), w_hi.stride(1),
                     coef.stride(0), coef.stride(1), inv_tau, BF16_PAIR=bf16_pair, DOT_DTYPE=TL_DTYPES[ddt],
                     ACC_DTYPE=TL_DTYPES[acc], PRECISION=prec, **meta)
        cchunk = coef[:nrows]
        clow = coef_lo[:nrows] if bf16_pair else None
        if need_w:   # x is exact in bf16: x^T (coef_hi + coef_lo)
            matmul(xc.T, cchunk, out=parts, accumulate=start > 0, k_slices=k_slices, precision=prec, blocks=mm,
                   b_lo=clow)
        if need_x:   # (coef_hi + coef_lo)(w_hi + w_lo)^T without the lo x lo term
            matmul(cchunk, w_hi.T, out=grad_x[start:stop], precision=prec, blocks=mm, a_lo=clow,
                   b_lo=w_lo.T if bf16_pair else None)
    grad_w = None
    if need_w:
        grad_w = parts[0].clone()
        for s in range(1, k_slices):  # fixed order: bitwise reproducible
            grad_w += parts[s]
    return grad_x, grad_w
