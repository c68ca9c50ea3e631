"""Plain-torch implementations of every op: the CPU path and the oracle for the Triton kernels.

Each function here is one half of a backend: `clpdd_fast.ops` wraps the forward/backward pairs in autograd
Functions, and the Triton backend (`clpdd_fast.kernels.backend`) exposes the same five functions with the same
signatures. Arguments arrive validated; tensors may be fp16/bf16/fp32 (computed in fp32) or fp64 (computed in fp64).
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (exact checks, gradcheck), float32 otherwise (fp32 accumulation)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
def gram(x: Tensor, lam: float = 0.0) -> Tensor:
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
def ridge_system(phi: Tensor, lam: float, mode: str, gram=gram) -> Tensor:
    """The SPD matrix of the ridge problem: phi phi^T + lam I (dual, m x m) or phi^T phi + lam I (primal, d x d),
    by `gram` (this module's, or the Triton backend's)."""
    return gram(phi, lam) if mode == "dual" else gram(phi.T, lam)


def ridge_forward(phi: Tensor, y: Tensor, lam: float, mode: str) -> tuple[Tensor, Tensor, Tensor]:
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
                   need_phi: bool, need_y: bool) -> tuple[Tensor | None, Tensor | None]:
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
def _chunk_logits(x: Tensor, w: Tensor, tau: float, start: int, stop: int) -> Tensor:
    return (x[start:stop].to(w.dtype) @ w) / tau


def linear_ce_forward(x: Tensor, w: Tensor, target: Tensor, tau: float, ignore_index: int, chunk_size: int,
                      precision: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-row CE of softmax(x w / tau) against target, never holding more than chunk_size x C logits.

    x (N, d), w (d, C), target (N,) int. Returns (loss_rows (N,), lse (N,)) in the compute dtype; rows whose
    target is ignore_index get loss 0, rows whose target lies outside [0, C) NaN. lse is the row logsumexp, saved
    for the backward. precision: the Triton backend's choice of products; here products are exact in fp32 (fp64).
    """
    dt = compute_dtype(x, w)
    wc = w.to(dt)
    n = x.shape[0]
    loss = torch.empty(n, dtype=dt, device=x.device)
    lse = torch.empty(n, dtype=dt, device=x.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = _chunk_logits(x, wc, tau, start, stop)
        t = target[start:stop]
        valid = t != ignore_index
        known = valid & (t >= 0) & (t < w.shape[1])
        picked = logits.gather(1, torch.where(known, t, 0).long().unsqueeze(1)).squeeze(1)
        lse[start:stop] = torch.logsumexp(logits, dim=1)
        loss[start:stop] = torch.where(known, lse[start:stop] - picked, torch.where(valid, float("nan"), 0.0))
    return loss, lse


def linear_ce_backward(x: Tensor, w: Tensor, target: Tensor, tau: float, lse: Tensor, grad_rows: Tensor,
                       ignore_index: int, chunk_size: int, need_x: bool, need_w: bool,
                       precision: str = "auto") -> tuple[Tensor | None, Tensor | None]:
    """Gradients of sum_i grad_rows[i] * loss_i wrt x and w, recomputing each chunk's logits.

    grad_rows (N,) already folds in the reduction (1/count for 'mean') and is 0 on ignored rows.
    Returns grad_x (N, d) and grad_w (d, C) in the compute dtype, or None where not needed.
    """
    dt = lse.dtype
    wc = w.to(dt)
    n = x.shape[0]
    grad_x = torch.empty(x.shape, dtype=dt, device=x.device) if need_x else None
    grad_w = torch.zeros(wc.shape, dtype=dt, device=x.device) if need_w else None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        logits = _chunk_logits(x, wc, tau, start, stop)
        t = target[start:stop]
        known = (t != ignore_index) & (t >= 0) & (t < w.shape[1])
        coef = torch.exp(logits - lse[start:stop, None])
        rows = torch.arange(stop - start, device=x.device)
        coef[rows, torch.where(known, t, 0).long()] -= known.to(dt)
        coef *= (grad_rows[start:stop].to(dt) / tau)[:, None]
        if need_w:
            grad_w += x[start:stop].to(dt).T @ coef
        if need_x:
            grad_x[start:stop] = coef @ wc.T
    return grad_x, grad_w


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
