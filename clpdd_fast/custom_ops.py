"""The ops as torch custom ops (namespace `clpdd`): what torch.compile, autocast, opcheck and autograd see.

Registered here, each with a fake (meta) implementation for tracing (the CE's scalars always in the order tau,
[reduction,] ignore_index, chunk_size, backend, precision):
    clpdd::gram(x, lam, backend, check_finite, names) -> K                    autograd registered
    clpdd::one_hot(labels, num_classes, dtype, check_finite, name) -> Y       (integer input: no gradient)
    clpdd::ridge_factorize(phi, y, lam, mode, backend, check_finite, names)
        -> (W, L)                                                            autograd registered (through W)
    clpdd::ridge_backward(...) -> (dphi, dy)                                 the ridge backward's kernels
    clpdd::linear_ce_rows(x, w, target, tau, ignore_index, chunk_size, backend, precision, check_finite, names)
        -> (loss_rows, lse)                                                  autograd registered (through loss_rows)
    clpdd::linear_ce_backward(x, w, target, lse, grad_rows, tau, ...)
        -> (dx, dw)                                                          the CE backward's kernels
    clpdd::linear_ce_reduced(x, w, target, tau, reduction, ..., need_x, need_w)
        -> (loss, dx, dw)                                                    autograd registered (through loss)
    clpdd::scale_gradient(grad, scale) -> grad * scale                       linear_ce_reduced's backward
and three composites of them, which torch.compile traces through: clpdd::ridge_solve, clpdd::linear_softmax_ce and
clpdd::clpdd_loss (`clpdd_fast.ops` has their documented functional wrappers). The CE of a mean or sum whose x or w
needs a gradient (requires_grad, with grad mode on) goes through linear_ce_reduced: its upstream gradient is a scalar,
so the gradients are computed in the forward's pass over the logits and the backward only scales them; otherwise
(reduction "none", or nothing to differentiate) through linear_ce_rows, whose backward recomputes the logits.

Inside every implementation autocast is off and the current CUDA device is the tensors' own, so the ridge systems
are never factorised in bf16 and every Triton launch lands on the right GPU. The backward kernels are custom ops
without autograd: differentiating a gradient of these ops a second time raises instead of silently returning zeros.

check_finite=True validates the result, not the inputs: one pass over the output (a scalar test of the (N,) losses for
the CE, of W for the ridge probe); only when it is not finite are the inputs scanned, in bounded chunks, to name the
bad argument. check_finite=False does none of this and makes no host synchronisation: a singular ridge system or a
label out of range then shows up as NaN in the result. `names` (comma-separated) are the argument names the messages
use.

The settings from the environment (clpdd_fast.settings: CLPDD_RIDGE_PRECISION, CLPDD_AUTOTUNE) are read here, once per
op call, and reach the backends as arguments (the CE's in a `CEParams`): the kernels read no environment.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from clpdd_fast import reference, settings
from clpdd_fast import validation as check
from clpdd_fast.kernels.contract import CEParams, compute_dtype
from clpdd_fast.profiling import nvtx_range

NAMESPACE = "clpdd"
BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device):
    """The module that implements the six backend functions of `clpdd_fast.reference` for `backend` on this device;
    a name not in BACKENDS, or "triton" where the kernels cannot run, is refused with the way out."""
    check.choice("backend", backend, BACKENDS)
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return reference
    if device.type != "cuda" and not settings.triton_interpret():
        raise ValueError(f"backend='triton' got tensors on {device}: Triton runs on CUDA tensors, or on CPU tensors "
                         "under its interpreter (set TRITON_INTERPRET=1 before Python starts); use backend='torch' "
                         "for the plain-torch path")
    from clpdd_fast.kernels import backend as triton_backend
    return triton_backend


@contextlib.contextmanager
def on_device(device: torch.device):
    """Autocast off, and `device` current when it is a GPU (a Triton launch goes to the current device)."""
    with torch.autocast(device.type, enabled=False):
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield


def _ce_params(tau: float, ignore_index: int, chunk_size: int, precision: str) -> CEParams:
    """The CE backend's parameters; precision "torch" is torch.get_float32_matmul_precision() (read here, when the op
    runs: torch.compile cannot read it while tracing)."""
    if precision == "torch":
        precision = torch.get_float32_matmul_precision()
    return CEParams(tau, ignore_index, chunk_size, precision, settings.autotune())


def _names(names: str, count: int) -> list[str]:
    parts = [n.strip() for n in names.split(",")]
    if len(parts) != count:
        raise ValueError(f"names: expected {count} comma-separated argument names, got {names!r}")
    return parts


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _out(t: Tensor | None, like: Tensor) -> Tensor:
    """An op's output: contiguous (as the fake implementations promise), or empty when not computed."""
    return _empty(like) if t is None else t.contiguous()


def _cast_like(grad: Tensor | None, like: Tensor) -> Tensor | None:
    return None if grad is None else grad.to(like.dtype)


# ----------------------------------------------------------------------------------------------- gram
@torch.library.custom_op(f"{NAMESPACE}::gram", mutates_args=())
def gram_op(x: Tensor, lam: float, backend: str, check_finite: bool, names: str) -> Tensor:
    with on_device(x.device):
        k = resolve_backend(backend, x.device).gram(x, lam, settings.ridge_precision()).contiguous()
    if check_finite and not bool(torch.isfinite(k).all()):
        (x_name,) = _names(names, 1)
        check.finite(x_name, x)
        raise ValueError(f"{x_name}: {x_name} {x_name}^T overflows {k.dtype} (largest |{x_name}| = "
                         f"{float(x.abs().max()):.3g}); scale the features down")
    return k


@gram_op.register_fake
def _(x, lam, backend, check_finite, names):
    return x.new_empty((x.shape[0], x.shape[0]), dtype=compute_dtype(x))


def _gram_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gram_backward(ctx, grad_k):
    (x,) = ctx.saved_tensors
    with on_device(x.device):
        g = grad_k.to(compute_dtype(x, grad_k))
        return _cast_like((g + g.T) @ x.to(g.dtype), x), None, None, None, None


gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)


# ----------------------------------------------------------------------------------------------- one-hot targets
@torch.library.custom_op(f"{NAMESPACE}::one_hot", mutates_args=())
def one_hot_op(labels: Tensor, num_classes: int, dtype: torch.dtype, check_finite: bool, name: str) -> Tensor:
    """(m, C) one-hot rows of integer labels; with check_finite, a label outside [0, C) is an error naming `name`
    (without, it gives a zero row)."""
    if check_finite:
        check.labels(name, labels, num_classes)
    return reference.one_hot(labels, num_classes, dtype)


@one_hot_op.register_fake
def _(labels, num_classes, dtype, check_finite, name):
    return labels.new_empty((labels.shape[0], num_classes), dtype=dtype)


# ----------------------------------------------------------------------------------------------- ridge
def _system_size(phi: Tensor, mode: str) -> int:
    return phi.shape[0] if mode == "dual" else phi.shape[1]


@torch.library.custom_op(f"{NAMESPACE}::ridge_factorize", mutates_args=())
def ridge_factorize(phi: Tensor, y: Tensor, lam: float, mode: str, backend: str, check_finite: bool,
                    names: str) -> tuple[Tensor, Tensor]:
    """(W, lower Cholesky factor of the ridge system). A failed factorisation raises NotPositiveDefiniteError with
    check_finite, and gives a NaN W without."""
    with on_device(phi.device), nvtx_range(f"ridge_solve[{mode}]"):
        w, factor, info = resolve_backend(backend, phi.device).ridge_forward(phi, y, lam, mode,
                                                                             settings.ridge_precision())
    w, factor = w.contiguous(), factor.contiguous()
    if not check_finite:
        return torch.where(info == 0, w, torch.full_like(w, float("nan"))), factor
    pivot = int(info)
    if pivot or not bool(torch.isfinite(w).all()):
        phi_name, y_name = _names(names, 2)
        check.finite(phi_name, phi)
        check.finite(y_name, y)
        size = _system_size(phi, mode)
        if pivot:
            raise check.NotPositiveDefiniteError(
                f"ridge_solve: the {mode} system ({size} x {size}, lam={lam:g}) is not positive definite "
                f"(Cholesky failed at pivot {pivot}); use a larger lam (e.g. {lam * 100:g}) or centre/normalise "
                "the features")
        raise ValueError(f"ridge_solve: W overflows {w.dtype} (the {mode} system is {size} x {size}, lam={lam:g}); "
                         "use a larger lam or scale the features")
    return w, factor


@ridge_factorize.register_fake
def _(phi, y, lam, mode, backend, check_finite, names):
    dt = compute_dtype(phi, y)
    size = _system_size(phi, mode)
    return phi.new_empty((phi.shape[1], y.shape[1]), dtype=dt), phi.new_empty((size, size), dtype=dt)


@torch.library.custom_op(f"{NAMESPACE}::ridge_backward", mutates_args=())
def ridge_backward_op(phi: Tensor, y: Tensor, w: Tensor, factor: Tensor, grad_w: Tensor, mode: str, backend: str,
                      need_phi: bool, need_y: bool) -> tuple[Tensor, Tensor]:
    """(dL/dphi, dL/dy) in the factor's dtype; an empty tensor for a gradient not asked for."""
    with on_device(phi.device):
        grad_phi, grad_y = resolve_backend(backend, phi.device).ridge_backward(phi, y, w, factor, grad_w, mode,
                                                                                need_phi, need_y,
                                                                                settings.ridge_precision())
    return _out(grad_phi if need_phi else None, factor), _out(grad_y if need_y else None, factor)


@ridge_backward_op.register_fake
def _(phi, y, w, factor, grad_w, mode, backend, need_phi, need_y):
    return (factor.new_empty(phi.shape) if need_phi else _empty(factor)), \
        (factor.new_empty(y.shape) if need_y else _empty(factor))


def _ridge_setup(ctx, inputs, output):
    phi, y, lam, mode, backend, check_finite, names = inputs
    ctx.mode, ctx.backend = mode, backend
    ctx.save_for_backward(phi, y, output[0], output[1])


def _ridge_backward(ctx, grad_w, grad_factor):
    phi, y, w, factor = ctx.saved_tensors
    need_phi, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_phi, grad_y = ridge_backward_op(phi, y, w, factor, grad_w, ctx.mode, ctx.backend, need_phi, need_y)
    return (_cast_like(grad_phi, phi) if need_phi else None), (_cast_like(grad_y, y) if need_y else None), \
        None, None, None, None, None


ridge_factorize.register_autograd(_ridge_backward, setup_context=_ridge_setup)


# ----------------------------------------------------------------------------------------------- linear CE
def _check_ce(loss: Tensor, x: Tensor, w: Tensor, target: Tensor, tau: float, ignore_index: int, names: str) -> None:
    """With check_finite: the per-row losses are finite, else the inputs are scanned to name the bad one."""
    if bool(torch.isfinite(loss).all()):
        return
    x_name, w_name, t_name = _names(names, 3)
    check.finite(x_name, x)
    check.finite(w_name, w)
    check.labels(t_name, target, w.shape[1], ignore_index)
    raise ValueError(f"{x_name}: the logits {x_name} {w_name} / tau overflow {loss.dtype} (tau={tau:g}); use a "
                     "larger tau or scale the features")


@torch.library.custom_op(f"{NAMESPACE}::linear_ce_rows", mutates_args=())
def linear_ce_rows(x: Tensor, w: Tensor, target: Tensor, tau: float, ignore_index: int, chunk_size: int,
                   backend: str, precision: str, check_finite: bool, names: str) -> tuple[Tensor, Tensor]:
    """(per-row losses, per-row logsumexp) of softmax(x w / tau) against target; ignored rows lose 0, a row whose
    target lies outside [0, C) gets NaN."""
    with on_device(x.device), nvtx_range("linear_softmax_ce"):
        loss, lse = resolve_backend(backend, x.device).linear_ce_forward(
            x, w, target, _ce_params(tau, ignore_index, chunk_size, precision))
    loss, lse = loss.contiguous(), lse.contiguous()
    if check_finite:
        _check_ce(loss, x, w, target, tau, ignore_index, names)
    return loss, lse


@linear_ce_rows.register_fake
def _(x, w, target, tau, ignore_index, chunk_size, backend, precision, check_finite, names):
    dt = compute_dtype(x, w)
    return x.new_empty((x.shape[0],), dtype=dt), x.new_empty((x.shape[0],), dtype=dt)


@torch.library.custom_op(f"{NAMESPACE}::linear_ce_backward", mutates_args=())
def linear_ce_backward_op(x: Tensor, w: Tensor, target: Tensor, lse: Tensor, grad_rows: Tensor, tau: float,
                          ignore_index: int, chunk_size: int, backend: str, precision: str, need_x: bool,
                          need_w: bool) -> tuple[Tensor, Tensor]:
    """(dL/dx, dL/dw) in the compute dtype for the per-row weights grad_rows (0 on ignored rows); an empty tensor for
    a gradient not asked for."""
    with on_device(x.device):
        grad_x, grad_w = resolve_backend(backend, x.device).linear_ce_backward(
            x, w, target, lse, grad_rows, _ce_params(tau, ignore_index, chunk_size, precision), need_x, need_w)
    return _out(grad_x if need_x else None, lse), _out(grad_w if need_w else None, lse)


@linear_ce_backward_op.register_fake
def _(x, w, target, lse, grad_rows, tau, ignore_index, chunk_size, backend, precision, need_x, need_w):
    return (lse.new_empty(x.shape) if need_x else _empty(lse)), (lse.new_empty(w.shape) if need_w else _empty(lse))


def _ce_setup(ctx, inputs, output):
    x, w, target, tau, ignore_index, chunk_size, backend, precision, check_finite, names = inputs
    ctx.args = (tau, ignore_index, chunk_size, backend, precision)
    ctx.save_for_backward(x, w, target, output[1])


def _ce_backward(ctx, grad_loss, grad_lse):
    x, w, target, lse = ctx.saved_tensors
    tau, ignore_index, chunk_size, backend, precision = ctx.args
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_rows = torch.where(target != ignore_index, grad_loss.to(lse.dtype), 0.0)
    grad_x, grad_w = linear_ce_backward_op(x, w, target, lse, grad_rows, tau, ignore_index, chunk_size, backend,
                                           precision, need_x, need_w)
    return (_cast_like(grad_x, x) if need_x else None), (_cast_like(grad_w, w) if need_w else None), \
        None, None, None, None, None, None, None, None


linear_ce_rows.register_autograd(_ce_backward, setup_context=_ce_setup)


@torch.library.custom_op(f"{NAMESPACE}::linear_ce_reduced", mutates_args=())
def linear_ce_reduced(x: Tensor, w: Tensor, target: Tensor, tau: float, reduction: str, ignore_index: int,
                      chunk_size: int, backend: str, precision: str, check_finite: bool, names: str, need_x: bool,
                      need_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(the mean or sum of the per-row losses, dL/dx, dL/dw): the gradients of the reduced loss computed in the same
    pass over the logits (an empty tensor for one not asked for), in the compute dtype; the backward only scales
    them by the upstream gradient. Mean: over the rows not ignored, their weights 1/count computed on the device."""
    dt = compute_dtype(x, w)
    valid = target != ignore_index
    count = valid.sum()
    grad_rows = torch.where(valid, 1.0 / count.to(dt), 0.0) if reduction == "mean" else valid.to(dt)
    with on_device(x.device), nvtx_range("linear_softmax_ce"):
        loss, _, grad_x, grad_w = resolve_backend(backend, x.device).linear_ce_forward_backward(
            x, w, target, grad_rows, _ce_params(tau, ignore_index, chunk_size, precision), need_x, need_w)
    if check_finite:
        _check_ce(loss, x, w, target, tau, ignore_index, names)
    total = loss.sum()
    total = total if reduction == "sum" else total / count
    return total, _out(grad_x if need_x else None, total), _out(grad_w if need_w else None, total)


@linear_ce_reduced.register_fake
def _(x, w, target, tau, reduction, ignore_index, chunk_size, backend, precision, check_finite, names, need_x, need_w):
    dt = compute_dtype(x, w)
    return x.new_empty((), dtype=dt), (x.new_empty(x.shape, dtype=dt) if need_x else x.new_empty((0,), dtype=dt)), \
        (x.new_empty(w.shape, dtype=dt) if need_w else x.new_empty((0,), dtype=dt))


@torch.library.custom_op(f"{NAMESPACE}::scale_gradient", mutates_args=())
def scale_gradient(grad: Tensor, scale: Tensor) -> Tensor:
    """grad * scale, scale the 0-d upstream gradient: linear_ce_reduced's backward (no autograd of its own)."""
    return grad * scale.to(grad.dtype)


@scale_gradient.register_fake
def _(grad, scale):
    return torch.empty_like(grad)


def _reduced_setup(ctx, inputs, output):
    x, w, *_, need_x, need_w = inputs
    ctx.dtypes, ctx.need = (x.dtype, w.dtype), (need_x, need_w)
    ctx.save_for_backward(output[1], output[2])


def _reduced_backward(ctx, grad_loss, grad_grad_x, grad_grad_w):
    grads = []
    for i, saved in enumerate(ctx.saved_tensors):
        if not ctx.needs_input_grad[i]:
            grads.append(None)
            continue
        if not ctx.need[i]:
            raise RuntimeError(f"clpdd::linear_ce_reduced was called with need_{'xw'[i]}=False for an input that "
                               "requires a gradient")
        grads.append(scale_gradient(saved, grad_loss).to(ctx.dtypes[i]))
    return (*grads, *[None] * 11)


linear_ce_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup)


# ----------------------------------------------------------------------------------------------- composites
# Ops made of the ones above (CompositeImplicitAutograd): autograd, tracing and torch.compile go through their parts.
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def _composite(schema: str):
    def register(fn):
        _LIBRARY.define(schema)
        _LIBRARY.impl(schema.split("(", 1)[0], fn, "CompositeImplicitAutograd")
        return fn
    return register


@_composite("ridge_solve(Tensor phi, Tensor y, float lam, str mode, str backend, bool check_finite, str names) "
            "-> Tensor")
def _ridge_solve(phi, y, lam, mode, backend, check_finite, names):
    return ridge_factorize(phi, y, lam, mode, backend, check_finite, names)[0]


@_composite("linear_softmax_ce(Tensor x, Tensor w, Tensor target, float tau, str reduction, int ignore_index, "
            "int chunk_size, str backend, str precision, bool check_finite, str names) -> Tensor")
def _linear_softmax_ce(x, w, target, tau, reduction, ignore_index, chunk_size, backend, precision, check_finite, names):
    """mean/sum with a gradient to compute: linear_ce_reduced (the gradients in the forward's pass); otherwise the
    per-row losses, whose backward recomputes the logits."""
    need_x, need_w = (torch.is_grad_enabled() and t.requires_grad for t in (x, w))
    if reduction != "none" and (need_x or need_w):
        return linear_ce_reduced(x, w, target, tau, reduction, ignore_index, chunk_size, backend, precision,
                                 check_finite, names, need_x, need_w)[0]
    rows = linear_ce_rows(x, w, target, tau, ignore_index, chunk_size, backend, precision, check_finite, names)[0]
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (target != ignore_index).sum()


@_composite("clpdd_loss(Tensor phi_s, Tensor y_s, Tensor phi_r, Tensor y_r, float lam, float tau, str outer, "
            "str mode, int chunk_size, str backend, str precision, bool check_finite) -> Tensor")
def _clpdd_loss(phi_s, y_s, phi_r, y_r, lam, tau, outer, mode, chunk_size, backend, precision, check_finite):
    """y_s: the (m, C) target matrix. Real labels equal to NO_IGNORE (int32's lowest value) would be ignored."""
    w = ridge_factorize(phi_s, y_s, lam, mode, backend, check_finite, "phi_s,y_s")[0]
    if outer == "mse":
        with torch.autocast(phi_s.device.type, enabled=False):
            return reference.mse_outer(phi_r, w, y_r, chunk_size)
    return _linear_softmax_ce(phi_r, w, y_r, tau, "mean", NO_IGNORE, chunk_size, backend, precision, check_finite,
                              "phi_r,W (the ridge probe),y_r")


NO_IGNORE = -2**31   # clpdd_loss's ignore_index: no real label is ignored
