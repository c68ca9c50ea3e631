"""The public ops: one torch.autograd.Function each, a functional wrapper that validates, and backend dispatch.

backend="auto" runs the Triton kernels on CUDA tensors and the plain-torch reference otherwise; "torch" always
runs the reference; "triton" always runs the kernels (on CPU tensors only under TRITON_INTERPRET=1).
Low-precision inputs (fp16, bf16) are computed with fp32 accumulation; results come back in fp32
(fp64 for fp64 inputs); gradients come back in each input's own dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from clpdd_fast import reference, settings
from clpdd_fast import validation as check
from clpdd_fast.profiling import nvtx_range

BACKENDS = ("auto", "torch", "triton")
MODES = ("auto", "dual", "primal")
REDUCTIONS = ("mean", "sum", "none")
OUTER_LOSSES = ("ce", "mse")


def resolve_backend(backend: str, device: torch.device):
    """The module that implements the five backend functions of `clpdd_fast.reference` for this device."""
    check.choice("backend", backend, BACKENDS)
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return reference
    if device.type != "cuda" and not settings.triton_interpret():
        raise ValueError(f"backend='triton' got tensors on {device}: Triton runs on CUDA tensors, or on CPU tensors "
                         "under its interpreter (set TRITON_INTERPRET=1 before Python starts); use backend='torch' "
                         "for the plain-torch path")
    from clpdd_fast.kernels import backend as triton_backend
    return triton_backend


def _chunk_size(chunk_size, num_classes: int, feature_dim: int) -> int:
    if chunk_size is None:
        return reference.default_chunk_size(num_classes, feature_dim)
    return check.integer("chunk_size (None or an integer)", chunk_size, minimum=1)


def _cast_like(grad: Tensor | None, like: Tensor) -> Tensor | None:
    return None if grad is None else grad.to(like.dtype)


# ----------------------------------------------------------------------------------------------- gram
class GramFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lam: float, impl) -> Tensor:
        ctx.save_for_backward(x)
        return impl.gram(x, lam)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_k: Tensor):
        (x,) = ctx.saved_tensors
        g = grad_k.to(reference.compute_dtype(x, grad_k))
        return (g + g.T) @ x.to(g.dtype), None, None


def gram(x: Tensor, lam: float = 0.0, *, backend: str = "auto", check_finite: bool = True) -> Tensor:
    """K = x x^T + lam I.

    Args:
        x: (m, d) fp16/bf16/fp32/fp64.
        lam: float >= 0 added to the diagonal.
        backend: "auto" | "torch" | "triton".
        check_finite: reject NaN/inf in x (one device sync; pass False to skip).
    Returns:
        (m, m) fp32 (fp64 for fp64 x), exactly symmetric (K == K^T bitwise on every backend), differentiable in x.
    """
    check.tensor("x", x, 2)
    lam = check.positive("lam", lam, allow_zero=True)
    if check_finite:
        check.finite("x", x)
    return GramFunction.apply(x, float(lam), resolve_backend(backend, x.device))


# ----------------------------------------------------------------------------------------------- ridge
class RidgeSolveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi: Tensor, y: Tensor, lam: float, mode: str, impl) -> Tensor:
        w, factor, info = impl.ridge_forward(phi, y, lam, mode)
        pivot = int(info)
        if pivot:
            size = phi.shape[0] if mode == "dual" else phi.shape[1]
            raise check.NotPositiveDefiniteError(
                f"ridge_solve: the {mode} system ({size} x {size}, lam={lam:g}) is not positive definite "
                f"(Cholesky failed at pivot {pivot}); use a larger lam (e.g. {lam * 100:g}) or centre/normalise "
                "the features")
        ctx.mode, ctx.impl = mode, impl
        ctx.save_for_backward(phi, y, w, factor)
        return w

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_w: Tensor):
        phi, y, w, factor = ctx.saved_tensors
        need_phi, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_phi, grad_y = ctx.impl.ridge_backward(phi, y, w, factor, grad_w, ctx.mode, need_phi, need_y)
        return _cast_like(grad_phi, phi), _cast_like(grad_y, y), None, None, None


def ridge_solve(phi: Tensor, y: Tensor, lam: float, mode: str = "auto", *, backend: str = "auto",
                check_finite: bool = True) -> Tensor:
    """The exact ridge probe W = argmin ||phi W - y||^2 + lam ||W||^2 = phi^T (phi phi^T + lam I)^-1 y.

    Solved by Cholesky (never an explicit inverse) on the dual m x m system or the primal d x d one
    ((phi^T phi + lam I)^-1 phi^T y, the same matrix); the backward reuses the factor.

    Args:
        phi: (m, d) features, fp16/bf16/fp32/fp64.
        y: (m, C) targets (e.g. one-hot), fp16/bf16/fp32/fp64.
        lam: ridge strength, > 0.
        mode: "dual", "primal" or "auto" (the smaller system).
        backend: "auto" | "torch" | "triton".
        check_finite: reject NaN/inf in phi and y (one device sync; pass False to skip).
    Returns:
        W (d, C) fp32 (fp64 for fp64 inputs), differentiable in phi and y.
    Raises:
        NotPositiveDefiniteError (a ValueError) when the factorisation fails: increase lam.
    """
    check.tensor("phi", phi, 2)
    check.tensor("y", y, 2)
    check.rows_match("phi", phi, "y", y)
    check.same_device(phi=phi, y=y)
    check.compatible_dtypes(phi=phi, y=y)
    lam = check.positive("lam", lam)
    mode = reference.choose_mode(phi.shape[0], phi.shape[1], check.choice("mode", mode, MODES))
    if check_finite:
        check.finite("phi", phi)
        check.finite("y", y)
    with nvtx_range(f"ridge_solve[{mode}]"):
        return RidgeSolveFunction.apply(phi, y, lam, mode, resolve_backend(backend, phi.device))


# ----------------------------------------------------------------------------------------------- linear CE
class LinearSoftmaxCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, target: Tensor, tau: float, reduction: str, chunk_size: int,
                ignore_index: int, impl) -> Tensor:
        loss_rows, lse = impl.linear_ce_forward(x, w, target, tau, ignore_index, chunk_size)
        valid = target != ignore_index
        ctx.tau, ctx.reduction, ctx.chunk_size, ctx.ignore_index, ctx.impl = (
            tau, reduction, chunk_size, ignore_index, impl)
        count = valid.sum()
        ctx.save_for_backward(x, w, target, lse, count)
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total if reduction == "sum" else total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w, target, lse, count = ctx.saved_tensors
        valid = (target != ctx.ignore_index).to(lse.dtype)
        grad_rows = grad_out.to(lse.dtype) * valid
        if ctx.reduction == "mean":
            grad_rows = grad_rows / count
        grad_x, grad_w = ctx.impl.linear_ce_backward(
            x, w, target, ctx.tau, lse, grad_rows, ctx.ignore_index, ctx.chunk_size,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return _cast_like(grad_x, x), _cast_like(grad_w, w), None, None, None, None, None, None


def linear_softmax_ce(x: Tensor, w: Tensor, target: Tensor, tau: float = 1.0, reduction: str = "mean",
                      chunk_size: int | None = None, ignore_index: int = -100, *, backend: str = "auto",
                      check_finite: bool = True) -> Tensor:
    """Cross-entropy of softmax(x @ w / tau) against integer targets, without materialising the N x C logits.

    At most `chunk_size` x C logits exist at once; the backward recomputes them chunk by chunk. Gradients are
    computed only for the inputs that require them (frozen features x with a trainable w is the main case).

    Args:
        x: (N, d) features, fp16/bf16/fp32/fp64.
        w: (d, C) weights (class anchors), fp16/bf16/fp32/fp64.
        target: (N,) int64/int32 class indices in [0, C), or ignore_index.
        tau: temperature, > 0 (a runtime float).
        reduction: "mean" (over non-ignored rows, like torch's cross_entropy), "sum" or "none".
        chunk_size: rows per chunk; None picks one that keeps a chunk's fp32 logits and fp32 copy of its rows
            of x within 128 MiB.
        ignore_index: rows with this target contribute neither loss nor gradient.
        backend: "auto" | "torch" | "triton".
        check_finite: reject NaN/inf in x and w (one device sync; pass False to skip).
    Returns:
        A scalar (mean, sum) or (N,) losses (none), fp32 (fp64 for fp64 inputs).
    """
    check.tensor("x", x, 2)
    check.tensor("w", w, 2)
    check.tensor("target", target, 1, check.INDEX_DTYPES)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"w: expected {x.shape[1]} rows to match x {tuple(x.shape)}, got shape {tuple(w.shape)}")
    check.rows_match("x", x, "target", target)
    check.same_device(x=x, w=w, target=target)
    check.compatible_dtypes(x=x, w=w)
    tau = check.positive("tau", tau)
    check.choice("reduction", reduction, REDUCTIONS)
    chunk_size = _chunk_size(chunk_size, w.shape[1], w.shape[0])
    check.labels("target", target, w.shape[1], ignore_index)
    if check_finite:
        check.finite("x", x)
        check.finite("w", w)
    with nvtx_range("linear_softmax_ce"):
        return LinearSoftmaxCEFunction.apply(x, w, target, tau, reduction, chunk_size, int(ignore_index),
                                             resolve_backend(backend, x.device))


# ----------------------------------------------------------------------------------------------- CLP-DD
def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)


def _mse_outer(phi_r: Tensor, w: Tensor, y_r: Tensor, chunk_size: int) -> Tensor:
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


def clpdd_loss(phi_s: Tensor, y_s: Tensor, phi_r: Tensor, y_r: Tensor, lam: float, tau: float = 1.0,
               outer: str = "ce", mode: str = "auto", chunk_size: int | None = None,
               num_classes: int | None = None, *, backend: str = "auto", check_finite: bool = True) -> Tensor:
    """CLP-DD's outer loss: the exact ridge probe of the synthetic features, evaluated on real features.

    W = ridge_solve(phi_s, Y_s, lam, mode); outer="ce": mean CE of softmax(phi_r W / tau) against y_r;
    outer="mse": (1/N) sum_i ||phi_r[i] W - onehot(y_r[i])||^2 (the paper's ablation; tau unused).

    Args:
        phi_s: (m, d) synthetic features, fp16/bf16/fp32/fp64.
        y_s: (m,) int class indices (one-hot targets) or an (m, C) float target matrix.
        phi_r: (N, d) real features (any float dtype; fp16/bf16 caches are read chunk by chunk).
        y_r: (N,) int real labels in [0, C).
        lam: ridge strength > 0. tau: temperature > 0.
        mode: ridge system "auto" | "dual" | "primal". chunk_size: real rows per chunk (None: from a memory budget).
        num_classes: C when y_s holds indices; None takes 1 + the largest label in y_s and y_r.
        backend, check_finite: as in the other ops.
    Returns:
        A scalar, fp32 (fp64 for fp64 inputs), differentiable in phi_s (and y_s, phi_r).
    """
    check.choice("outer", outer, OUTER_LOSSES)
    tau = check.positive("tau", tau)
    check.tensor("phi_s", phi_s, 2)
    check.tensor("phi_r", phi_r, 2)
    check.tensor("y_r", y_r, 1, check.INDEX_DTYPES)
    if phi_r.shape[1] != phi_s.shape[1]:
        raise ValueError(f"phi_r: expected {phi_s.shape[1]} columns to match phi_s {tuple(phi_s.shape)}, "
                         f"got shape {tuple(phi_r.shape)}")
    check.rows_match("phi_r", phi_r, "y_r", y_r)
    if isinstance(y_s, Tensor) and y_s.dim() == 1:
        check.tensor("y_s", y_s, 1, check.INDEX_DTYPES)
        check.rows_match("phi_s", phi_s, "y_s", y_s)
        if num_classes is None:
            num_classes = 1 + max(int(y_s.max()), int(y_r.max()))
        check.labels("y_s", y_s, num_classes)
        y_s = one_hot(y_s, num_classes, reference.compute_dtype(phi_s))
    else:
        check.tensor("y_s", y_s, 2)
        if num_classes is not None and num_classes != y_s.shape[1]:
            raise ValueError(f"num_classes: got {num_classes}, but y_s has {y_s.shape[1]} columns")
        num_classes = y_s.shape[1]
    check.same_device(phi_s=phi_s, y_s=y_s, phi_r=phi_r, y_r=y_r)
    check.labels("y_r", y_r, num_classes)
    if check_finite:   # here, so that both outer losses check it and the error names the argument passed
        check.finite("phi_r", phi_r)
    w = ridge_solve(phi_s, y_s, lam, mode, backend=backend, check_finite=check_finite)
    if outer == "mse":
        return _mse_outer(phi_r, w, y_r, _chunk_size(chunk_size, num_classes, phi_r.shape[1]))
    # phi_r is checked above and w comes from checked inputs: no second pass over the N real rows
    return linear_softmax_ce(phi_r, w, y_r, tau, "mean", chunk_size, backend=backend, check_finite=False)
