"""The Triton backend: the six functions of `clpdd_fast.reference`, same signatures and return conventions.

`clpdd_fast.ops.resolve_backend` returns this module for CUDA tensors (and for backend="triton" on CPU tensors
under TRITON_INTERPRET=1). Every matrix product, factorisation and solve below is a Triton launch from
kernels/matmul.py, kernels/gram.py, kernels/cholesky.py, kernels/small_ridge.py (systems of size <=
small_ridge.MAX_SIZE and within its per-dtype LIMITS: one launch forward, one for the dual backward) or
kernels/linear_ce.py; torch is used only to allocate, cast and add.
Inputs fp16/bf16/fp32 compute in fp32 and return fp32; fp64 inputs compute (and return) fp64. The products of fp32
operands in the Gram matrix and the blocked ridge path (Gram, Cholesky, solves, projections, backward) use
CLPDD_RIDGE_PRECISION ("ieee" or "tf32x3", read at each call); the one-launch small systems always "ieee".
"""
from __future__ import annotations

from torch import Tensor

from clpdd_fast import settings
from clpdd_fast.reference import ridge_system

from . import cholesky as _chol
from . import gram as _gram
from . import linear_ce as _ce
from . import small_ridge as _small
from .matmul import matmul


def gram(x: Tensor, lam: float = 0.0) -> Tensor:
    """x (m, d) -> x x^T + lam I (m, m), fp32 (fp64 for fp64 x)."""
    return _gram.gram(x, lam, settings.ridge_precision())


def ridge_forward(phi: Tensor, y: Tensor, lam: float, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """W (d, C) = ridge probe of phi (m, d) and y (m, C); mode 'dual' or 'primal'.

    Returns (w, factor, info): factor the lower Cholesky factor of the system (fp32, fp64 for fp64 inputs),
    info an int32 0-D tensor, 0 on success, else the 1-based index of the first non-positive pivot
    (w is then not meaningful; the public op raises NotPositiveDefiniteError).
    """
    size = phi.shape[0] if mode == "dual" else phi.shape[1]
    if _small.dispatches(size, phi, y):   # one fused launch (plus phi^T y for the primal form)
        if mode == "dual":
            return _small.small_ridge_solve(phi, y, lam, project=True)
        return _small.small_ridge_solve(phi.T, matmul(phi.T, y), lam, project=False)
    prec = settings.ridge_precision()
    system = ridge_system(phi, lam, mode, gram=lambda x, lam: _gram.gram(x, lam, prec))
    factor, info = _chol.cholesky(system, precision=prec)
    if mode == "dual":
        alpha = _chol.cholesky_solve(y, factor, precision=prec)               # (m, C)
        w = matmul(phi.T, alpha, precision=prec)                              # phi^T alpha
    else:
        w = _chol.cholesky_solve(matmul(phi.T, y, precision=prec), factor, precision=prec)
    return w, factor, info


def ridge_backward(phi: Tensor, y: Tensor, w: Tensor, factor: Tensor, grad_w: Tensor, mode: str,
                   need_phi: bool, need_y: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients through W = ridge(phi, y), reusing the forward's factor (formulas in clpdd_fast.reference)."""
    dt = factor.dtype
    g = grad_w.to(dt)
    if mode == "dual" and _small.dispatches(phi.shape[0], factor):   # one fused launch
        return _small.small_ridge_backward(phi, y, factor, g, need_phi, need_y)
    grad_phi = grad_y = None
    prec = settings.ridge_precision()
    mm = lambda a, b, **kw: matmul(a, b, precision=prec, **kw)                    # noqa: E731
    solve = lambda b: _chol.cholesky_solve(b, factor, precision=prec)            # noqa: E731
    if mode == "dual":
        beta = solve(mm(phi, g))                                                   # A^-1 phi G   (m, C)
        if need_phi:
            alpha = solve(y)                                                       # A^-1 y       (m, C)
            # dphi = alpha G^T - beta (alpha^T phi) - alpha (beta^T phi)
            grad_phi = mm(alpha, g.T)
            mm(beta, mm(alpha.T, phi), out=grad_phi, alpha=-1.0, accumulate=True)
            mm(alpha, mm(beta.T, phi), out=grad_phi, alpha=-1.0, accumulate=True)
        if need_y:
            grad_y = beta
    else:
        gamma = solve(g)                                                           # B^-1 G       (d, C)
        if need_phi:
            # dphi = y gamma^T - (phi gamma) W^T - (phi W) gamma^T
            grad_phi = mm(y, gamma.T)
            mm(mm(phi, gamma), w.T.to(dt), out=grad_phi, alpha=-1.0, accumulate=True)
            mm(mm(phi, w.to(dt)), gamma.T, out=grad_phi, alpha=-1.0, accumulate=True)
        if need_y:
            grad_y = mm(phi, gamma)
    return grad_phi, grad_y


def linear_ce_forward(x: Tensor, w: Tensor, target: Tensor, tau: float, ignore_index: int, chunk_size: int,
                      precision: str = "auto") -> tuple[Tensor, Tensor]:
    """(loss_rows (N,), lse (N,)) of softmax(x w / tau) against target; fused, no logits buffer."""
    return _ce.linear_ce_forward(x, w, target, tau, ignore_index, chunk_size, precision)


def linear_ce_backward(x: Tensor, w: Tensor, target: Tensor, tau: float, lse: Tensor, grad_rows: Tensor,
                       ignore_index: int, chunk_size: int, need_x: bool, need_w: bool,
                       precision: str = "auto") -> tuple[Tensor | None, Tensor | None]:
    """(grad_x (N, d), grad_w (d, C)) or None where not needed; deterministic (no atomics)."""
    return _ce.linear_ce_backward(x, w, target, tau, lse, grad_rows, ignore_index, chunk_size, need_x, need_w,
                                  precision=precision)


def linear_ce_forward_backward(x: Tensor, w: Tensor, target: Tensor, tau: float, ignore_index: int, chunk_size: int,
                               precision: str, grad_rows: Tensor, need_x: bool,
                               need_w: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(loss_rows, lse) as `linear_ce_forward` gives them and, in the same pass, the gradients of
    sum_i grad_rows[i] * loss_i wrt x and w (None where not needed): each logits tile computed once (two GEMMs: logits,
    dW), deterministic (no atomics)."""
    return _ce.linear_ce_forward_backward(x, w, target, tau, ignore_index, chunk_size, precision, grad_rows, need_x,
                                          need_w)


__all__ = ["gram", "ridge_forward", "ridge_backward", "linear_ce_forward", "linear_ce_backward",
           "linear_ce_forward_backward"]
