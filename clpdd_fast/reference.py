"""Plain-torch implementations of every op: the CPU path and the oracle for the Triton kernels.

Each function here is one piece of a backend: `clpdd_fast.custom_ops` wraps them in torch custom ops, and the Triton
backend (`clpdd_fast.kernels.backend`) exposes the same six functions with the same signatures. Arguments arrive
validated; tensors may be fp16/bf16/fp32 (computed in fp32) or fp64 (computed in fp64). The rule and the CE's
parameters object are the kernels' (`clpdd_fast.kernels.contract`); the precision arguments say what the Triton
backend may do: here products are always exact in the compute dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clpdd_fast.kernels.contract import CEParams, compute_dtype

__all__ = ["CEParams", "compute_dtype", "choose_mode", "default_chunk_size", "gram", "ridge_system", "ridge_forward",
           "ridge_backward", "linear_ce_forward", "linear_ce_backward", "linear_ce_forward_backward", "one_hot",
           "mse_outer"]


def choose_mode(m: int, d: int, mode: str) -> str:
    """'auto' picks the smaller system: dual (m x m) when m <= d, primal (d x d) otherwise."""
    if mode != "auto":
        return mode
    return "dual" if m <= d else "primal"


def default_chunk_size(num_classes: int, feature_dim: int, budget_bytes: int = 128 * 2**20) -> int:
    """Rows per chunk so that one chunk's fp32 logits and its fp32 copy of the features fit in `budget_bytes`
    (128 MiB by default)."""
    return max(1, budget_bytes // (4 * (max(1, num_classes) + max(1, feature_dim))))


# ----------------------------------------------------------------------------------------------- gram
def gram(x: Tensor, lam: float = 0.0, precision: str = "highest") -> Tensor:
    """x (m, d) -> x x^T + lam I (m, m) in the compute dtype, exactly symmetric.

    A BLAS product may sum (i, j) and (j, i) in different orders; the lower triangle is kept and mirrored so that
    K == K^T bitwise, as the Triton kernel guarantees too.
    """
    xc = x.to(compute_dtype(x))
    k = xc @ xc.T
    k = k.tril() + k.tril(-1).T
    if lam:
        k.diagonal().add_(lam)
    return k


# ----------------------------------------------------------------------------------------------- ridge
def ridge_system(phi: Tensor, lam: float, mode: str) -> Tensor:
    """The SPD matrix of the ridge problem: phi phi^T + lam I (dual, m x m) or phi^T phi + lam I (primal, d x d)."""
    return gram(phi, lam) if mode == "dual" else gram(phi.T, lam)


def ridge_forward(phi: Tensor, y: Tensor, lam: float, mode: str,
                  precision: str = "highest") -> tuple[Tensor, Tensor, Tensor]:
    """Exact ridge probe W (d, C) of features phi (m, d) and targets y (m, C); mode is 'dual' or 'primal'.

    Returns (w, factor, info): factor is the lower Cholesky factor of the system, info an int tensor that is 0
    on success and k > 0 when the k-th leading minor is not positive definite (LAPACK convention).
    """
    dt = compute_dtype(phi, y)
    phic, yc = phi.to(dt), y.to(dt)
    factor, info = torch.linalg.cholesky_ex(ridge_system(phic, lam, mode))
    if mode == "dual":
        w = phic.T @ torch.cholesky_solve(yc, factor)
    else:
        w = torch.cholesky_solve(phic.T @ yc, factor)
    return w, factor, info


def ridge_backward(phi: Tensor, y: Tensor, w: Tensor, factor: Tensor, grad_w: Tensor, mode: str,
                   need_phi: bool, need_y: bool, precision: str = "highest") -> tuple[Tensor | None, Tensor | None]:
    """Gradients of a loss through W = ridge(phi, y), reusing the forward's Cholesky factor.

    dual:   alpha = A^-1 y, beta = A^-1 phi G:   dphi = alpha G^T - (beta alpha^T + alpha beta^T) phi,  dy = beta
    primal: gamma = B^-1 G:                      dphi = y gamma^T - phi (gamma W^T + W gamma^T),        dy = phi gamma
    """
    dt = factor.dtype
    phic, yc, g = phi.to(dt), y.to(dt), grad_w.to(dt)
    grad_phi = grad_y = None
    if mode == "dual":
        beta = torch.cholesky_solve(phic @ g, factor)
        if need_phi:
            alpha = torch.cholesky_solve(yc, factor)
            grad_phi = alpha @ g.T - beta @ (alpha.T @ phic) - alpha @ (beta.T @ phic)
        if need_y:
            grad_y = beta
    else:
        gamma = torch.cholesky_solve(g, factor)
        if need_phi:
            grad_phi = yc @ gamma.T - (phic @ gamma) @ w.T - (phic @ w) @ gamma.T
        if need_y:
            grad_y = phic @ gamma
    return grad_phi, grad_y


# ----------------------------------------------------------------------------------------------- linear CE
# The CPU loop's block: at most this many logits (32 MiB in fp32) at once, so that the passes over a block between its
# two products (softmax, scaling) read the cache rather than memory, with blocks large enough that the per-operation
# cost of two BLAS threads stays small (benchmarks/RESULTS.md, "bench_ops --device cpu").
CPU_BLOCK_ELEMENTS = 2**23


def block_rows(chunk_size: int, num_classes: int, device: torch.device) -> int:
    """Rows of logits the loop holds at once: chunk_size, capped on the CPU at CPU_BLOCK_ELEMENTS logits."""
    if device.type != "cpu":
        return chunk_size
    return max(1, min(chunk_size, CPU_BLOCK_ELEMENTS // max(1, num_classes)))


def _chunk_logits(x: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """out = x @ w (w already scaled by 1/tau): one block's logits, in a buffer reused across blocks."""
    return torch.mm(x, w, out=out)


def _linear_ce(x: Tensor, w: Tensor, target: Tensor, params: CEParams, grad_rows: Tensor | None, need_x: bool,
               need_w: bool):
    """The linear CE loop: per block of rows, one logits product, an in-place softmax, the row's max logit, largest
    probability and target logit read from the same buffer, then (for grad_rows) the coefficients
    g_i (softmax - onehot) / tau in that buffer and one product each for dW (accumulated with addmm_) and dX. Work on
    (N,) vectors is done once for all rows, not per block (on the CPU every operation costs a wake-up of the threads).
    Returns (loss_rows, lse, grad_x | None, grad_w | None)."""
    dt = compute_dtype(x, w)
    tau = params.tau
    n, num_classes = x.shape[0], w.shape[1]
    ws = w.to(dt) / tau
    rows = min(block_rows(params.chunk_size, num_classes, x.device), max(1, n))
    valid = target != params.ignore_index
    known = valid & (target >= 0) & (target < num_classes)
    index = torch.where(known, target, 0).long().unsqueeze(1)
    top, p_top, picked = (torch.empty(n, 1, dtype=dt, device=x.device) for _ in range(3))
    if need_x or need_w:
        g = grad_rows.to(dt).unsqueeze(1)
        g_target = -(g * known.unsqueeze(1))
    grad_x = torch.empty(x.shape, dtype=dt, device=x.device) if need_x else None
    grad_w = torch.zeros(w.shape, dtype=dt, device=x.device) if need_w else None
    logits = torch.empty(rows, num_classes, dtype=dt, device=x.device)
    x_rows = torch.empty(rows, x.shape[1], dtype=dt, device=x.device) if x.dtype != dt else None
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xc = x[start:stop] if x_rows is None else x_rows[:stop - start].copy_(x[start:stop])
        z = _chunk_logits(xc, ws, logits[:stop - start])
        torch.gather(z, 1, index[start:stop], out=picked[start:stop])
        torch.amax(z, 1, keepdim=True, out=top[start:stop])
        torch.softmax(z, 1, out=z)
        torch.amax(z, 1, keepdim=True, out=p_top[start:stop])
        if need_x or need_w:
            z.mul_(g[start:stop])
            z.scatter_add_(1, index[start:stop], g_target[start:stop])
            if need_w:
                grad_w.addmm_(xc.T, z, alpha=1 / tau)
            if need_x:
                torch.mm(z, ws.T, out=grad_x[start:stop])
    # the largest probability is exp(0) / sum_j exp(z_j - top): lse = top + log(sum) = top - log(p_top)
    lse = top.sub_(p_top.log_()).squeeze(1)
    loss = torch.where(known, lse - picked.squeeze(1), torch.where(valid, float("nan"), 0.0))
    return loss, lse, grad_x, grad_w


def linear_ce_forward(x: Tensor, w: Tensor, target: Tensor, params: CEParams) -> tuple[Tensor, Tensor]:
    """Per-row CE of softmax(x w / tau) against target, never holding more than params.chunk_size x C logits.

    x (N, d), w (d, C), target (N,) int. Returns (loss_rows (N,), lse (N,)) in the compute dtype; rows whose
    target is params.ignore_index get loss 0, rows whose target lies outside [0, C) NaN. lse is the row logsumexp,
    saved for the backward. params.precision and params.autotune are the Triton backend's choices; here products are
    exact in fp32 (fp64).
    """
    return _linear_ce(x, w, target, params, None, False, False)[:2]


def linear_ce_backward(x: Tensor, w: Tensor, target: Tensor, lse: Tensor, grad_rows: Tensor, params: CEParams,
                       need_x: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of sum_i grad_rows[i] * loss_i wrt x and w, recomputing each chunk's logits (and its softmax: lse,
    which the Triton backend reads, is not needed here).

    grad_rows (N,) already folds in the reduction (1/count for 'mean') and is 0 on ignored rows.
    Returns grad_x (N, d) and grad_w (d, C) in the compute dtype, or None where not needed.
    """
    return _linear_ce(x, w, target, params, grad_rows, need_x, need_w)[2:]


def linear_ce_forward_backward(x: Tensor, w: Tensor, target: Tensor, grad_rows: Tensor, params: CEParams,
                               need_x: bool, need_w: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """linear_ce_forward and, in the same pass over each chunk's logits (computed once), the gradients of
    sum_i grad_rows[i] * loss_i wrt x and w (grad_rows as in linear_ce_backward): on the CPU one logits product and
    one dW product (and one dX product when asked) per block. Returns (loss_rows, lse, grad_x | None, grad_w | None).
    """
    return _linear_ce(x, w, target, params, grad_rows, need_x, need_w)


# ----------------------------------------------------------------------------------------------- CLP-DD's MSE ablation
def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(m, C) one-hot rows of `labels`, with no host synchronisation (a label outside [0, C) gives a zero row:
    check labels first where they enter)."""
    return (labels.long()[:, None] == torch.arange(num_classes, device=labels.device)).to(dtype)


def mse_outer(phi_r: Tensor, w: Tensor, y_r: Tensor, chunk_size: int) -> Tensor:
    """(1/N) sum_i ||phi_r[i] W - onehot(y_r[i])||^2 through S = phi_r^T phi_r and class sums M = phi_r^T Y_r,
    so that no N x C matrix exists: ||X W - Y||^2 = tr(W^T S W) - 2 tr(W^T M) + N."""
    dt = w.dtype
    n, num_classes = phi_r.shape[0], w.shape[1]
    s = w.new_zeros(w.shape[0], w.shape[0])
    m = w.new_zeros(w.shape)
    for start in range(0, n, chunk_size):
        xc = phi_r[start:start + chunk_size].to(dt)
        s = s + xc.T @ xc
        m = m + xc.T @ one_hot(y_r[start:start + chunk_size], num_classes, dt)
    return ((w * (s @ w)).sum() - 2 * (w * m).sum() + n) / n
