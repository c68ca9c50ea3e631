"""The Triton backend: the six functions of `clpdd_fast.reference`, same signatures and return conventions.

`clpdd_fast.custom_ops.resolve_backend` returns this module for CUDA tensors (and for backend="triton" on CPU tensors
under TRITON_INTERPRET=1). Every matrix product, factorisation and solve is a Triton launch from kernels/matmul.py,
kernels/gram.py, kernels/cholesky.py, kernels/small_ridge.py (systems of size <= tiles.SMALL_RIDGE_MAX_SIZE and within
its per-dtype limits: one launch forward, one for the dual backward) or kernels/linear_ce.py (whose three functions
are the CE's part of this backend as they are); torch is used only to allocate, cast and add.
Inputs fp16/bf16/fp32 compute in fp32 and return fp32; fp64 inputs compute (and return) fp64. The products of fp32
operands in the Gram matrix and the blocked ridge path (Gram, Cholesky, solves, projections, backward) follow the
`precision` argument (contract.RIDGE_PRECISIONS: "highest" exact, "high" three TF32 products); the one-launch small
systems are always exact.
"""
from __future__ import annotations

from torch import Tensor

from . import cholesky as _chol
from . import gram as _gram
from . import small_ridge as _small
from .contract import RIDGE_PRECISIONS
from .linear_ce import linear_ce_backward, linear_ce_forward, linear_ce_forward_backward
from .matmul import matmul


def _input_precision(precision: str) -> str:
    """tl.dot's input_precision for the ridge path's products of fp32 operands."""
    if precision not in RIDGE_PRECISIONS:
        raise ValueError(f"precision: expected one of {RIDGE_PRECISIONS}, got {precision!r}")
    return "ieee" if precision == "highest" else "tf32x3"


def gram(x: Tensor, lam: float = 0.0, precision: str = "highest") -> Tensor:
    """x (m, d) -> x x^T + lam I (m, m), fp32 (fp64 for fp64 x)."""
    return _gram.gram(x, lam, _input_precision(precision))


def ridge_forward(phi: Tensor, y: Tensor, lam: float, mode: str,
                  precision: str = "highest") -> tuple[Tensor, Tensor, Tensor]:
    """W (d, C) = ridge probe of phi (m, d) and y (m, C); mode 'dual' or 'primal'.

    Returns (w, factor, info): factor the lower Cholesky factor of the system (fp32, fp64 for fp64 inputs),
    info an int32 0-D tensor, 0 on success, else the 1-based index of the first non-positive pivot
    (w is then not meaningful; the public op raises NotPositiveDefiniteError).
    """
    size = phi.shape[0] if mode == "dual" else phi.shape[1]
    prec = _input_precision(precision)
    if _small.dispatches(size, phi, y):   # one fused launch (plus phi^T y for the primal form)
        if mode == "dual":
            return _small.small_ridge_solve(phi, y, lam, project=True)
        return _small.small_ridge_solve(phi.T, matmul(phi.T, y), lam, project=False)
    system = _gram.gram(phi if mode == "dual" else phi.T, lam, prec)
    factor, info = _chol.cholesky(system, input_precision=prec)
    if mode == "dual":
        alpha = _chol.cholesky_solve(y, factor, input_precision=prec)            # (m, C)
        w = matmul(phi.T, alpha, input_precision=prec)                           # phi^T alpha
    else:
        w = _chol.cholesky_solve(matmul(phi.T, y, input_precision=prec), factor, input_precision=prec)
    return w, factor, info


def ridge_backward(phi: Tensor, y: Tensor, w: Tensor, factor: Tensor, grad_w: Tensor, mode: str,
                   need_phi: bool, need_y: bool, precision: str = "highest") -> tuple[Tensor | None, Tensor | None]:
    """Gradients through W = ridge(phi, y), reusing the forward's factor (formulas in clpdd_fast.reference)."""
    dt = factor.dtype
    g = grad_w.to(dt)
    prec = _input_precision(precision)
    if mode == "dual" and _small.dispatches(phi.shape[0], factor):   # one fused launch
        return _small.small_ridge_backward(phi, y, factor, g, need_phi, need_y)
    grad_phi = grad_y = None
    mm = lambda a, b, **kw: matmul(a, b, input_precision=prec, **kw)              # noqa: E731
    solve = lambda b: _chol.cholesky_solve(b, factor, input_precision=prec)      # noqa: E731
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


__all__ = ["gram", "ridge_forward", "ridge_backward", "linear_ce_forward", "linear_ce_backward",
           "linear_ce_forward_backward"]
