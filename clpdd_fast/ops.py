"""The public ops: a validating functional wrapper each, over the `clpdd` custom ops of `clpdd_fast.custom_ops`.

backend="auto" runs the Triton kernels on CUDA tensors and the plain-torch reference otherwise; "torch" always
runs the reference; "triton" always runs the kernels (on CPU tensors only under TRITON_INTERPRET=1).
Low-precision inputs (fp16, bf16) are computed with fp32 accumulation; results come back in fp32
(fp64 for fp64 inputs); gradients come back in each input's own dtype. Inside torch.autocast the ops compute as
outside it (the ridge system is never factorised in bf16).

Checks: the wrappers check shapes, dtypes, devices and the scalar arguments on every call (no device work).
check_finite=True (the default) then checks each result (one host synchronisation) and, only when it is not finite,
scans the inputs in bounded chunks to name the culprit (NaN/inf, a label out of range, a singular ridge system).
check_finite=False makes no host synchronisation: bad values then show as NaN in the result.
"""
from __future__ import annotations

import torch
from torch import Tensor

from clpdd_fast import custom_ops, reference, settings
from clpdd_fast import validation as check
from clpdd_fast.kernels.contract import CE_PRECISIONS, compute_dtype

MODES = ("auto", "dual", "primal")
REDUCTIONS = ("mean", "sum", "none")
OUTER_LOSSES = ("ce", "mse")


def resolve_precision(precision: str | None) -> str:
    """The CE kernels' products of fp32 operands, in the words of torch.set_float32_matmul_precision ("highest",
    "high", "medium"; kernels/contract.py says what each does): the argument, else CLPDD_CE_PRECISION when set, else
    "torch": torch.get_float32_matmul_precision(), read inside the op when it runs (torch.compile cannot read it while
    tracing). The words before this naming ("ieee", "auto", "tf32") still work, with a FutureWarning."""
    if precision is not None:
        return check.choice("precision", settings.renamed("CLPDD_CE_PRECISION", precision, "precision", stacklevel=3),
                            CE_PRECISIONS)
    if settings.is_set("CLPDD_CE_PRECISION"):
        return settings.ce_precision()
    return "torch"


def _chunk_size(chunk_size, num_classes: int, feature_dim: int) -> int:
    if chunk_size is None:
        return reference.default_chunk_size(num_classes, feature_dim)
    return check.integer("chunk_size (None or an integer)", chunk_size, minimum=1)


def _backend(backend: str, device: torch.device) -> str:
    """`backend` once `custom_ops.resolve_backend` accepts it here (the ops resolve it again when they run)."""
    custom_ops.resolve_backend(backend, device)
    return backend


# ----------------------------------------------------------------------------------------------- gram
def gram(x: Tensor, lam: float = 0.0, *, backend: str = "auto", check_finite: bool = True) -> Tensor:
    """K = x x^T + lam I.

    Args:
        x: (m, d) fp16/bf16/fp32/fp64.
        lam: float >= 0 added to the diagonal.
        backend: "auto" | "torch" | "triton".
        check_finite: check K, naming x when it holds NaN/inf (see the module docstring).
    Returns:
        (m, m) fp32 (fp64 for fp64 x), exactly symmetric (K == K^T bitwise on every backend), differentiable in x.
    """
    check.tensor("x", x, 2)
    lam = check.positive("lam", lam, allow_zero=True)
    return custom_ops.gram_op(x, lam, _backend(backend, x.device), bool(check_finite), "x")


# ----------------------------------------------------------------------------------------------- ridge
def _ridge_args(phi: Tensor, y: Tensor, lam, mode: str, names: tuple[str, str]) -> tuple[float, str]:
    check.tensor(names[0], phi, 2)
    check.tensor(names[1], y, 2)
    check.rows_match(names[0], phi, names[1], y)
    check.same_device(**{names[0]: phi, names[1]: y})
    check.compatible_dtypes(**{names[0]: phi, names[1]: y})
    lam = check.positive("lam", lam)
    return lam, reference.choose_mode(phi.shape[0], phi.shape[1], check.choice("mode", mode, MODES))


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
        check_finite: check W (see the module docstring); without it a failed factorisation gives a NaN W.
    Returns:
        W (d, C) fp32 (fp64 for fp64 inputs), differentiable in phi and y.
    Raises:
        NotPositiveDefiniteError (a ValueError) when the factorisation fails (with check_finite): increase lam.
    """
    lam, mode = _ridge_args(phi, y, lam, mode, ("phi", "y"))
    return torch.ops.clpdd.ridge_solve(phi, y, lam, mode, _backend(backend, phi.device), bool(check_finite), "phi,y")


# ----------------------------------------------------------------------------------------------- linear CE
def _ce_args(x: Tensor, w: Tensor, target: Tensor, tau, chunk_size, names: tuple[str, str, str]) -> tuple[float, int]:
    check.tensor(names[0], x, 2)
    check.tensor(names[1], w, 2)
    check.tensor(names[2], target, 1, check.INDEX_DTYPES)
    if w.shape[0] != x.shape[1]:
        raise ValueError(f"{names[1]}: expected {x.shape[1]} rows to match {names[0]} {tuple(x.shape)}, got shape "
                         f"{tuple(w.shape)}")
    check.rows_match(names[0], x, names[2], target)
    check.same_device(**dict(zip(names, (x, w, target))))
    check.compatible_dtypes(**{names[0]: x, names[1]: w})
    return check.positive("tau", tau), _chunk_size(chunk_size, w.shape[1], w.shape[0])


def linear_softmax_ce(x: Tensor, w: Tensor, target: Tensor, tau: float = 1.0, reduction: str = "mean",
                      chunk_size: int | None = None, ignore_index: int = -100, *, backend: str = "auto",
                      precision: str | None = None, check_finite: bool = True) -> Tensor:
    """Cross-entropy of softmax(x @ w / tau) against integer targets, without materialising the N x C logits.

    At most `chunk_size` x C logits exist at once. Gradients are computed only for the inputs that require them
    (frozen features x with a trainable w is the main case): with reduction "mean" or "sum" in the forward, in its
    one pass over the logits (the backward scales them by the upstream gradient); with "none" the backward recomputes
    the logits chunk by chunk.

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
        precision: products of fp32 operands in the Triton kernels, as torch.set_float32_matmul_precision words:
            "highest" (exact), "high" (exact, but an fp32 w with a bf16 x as two bf16 halves on tensor cores,
            |w - hi - lo| <= 2^-17 |w|) or "medium" (TF32); None: CLPDD_CE_PRECISION, else
            torch.get_float32_matmul_precision(). The torch backend computes exactly in fp32 whatever it says.
        check_finite: check the losses, naming x, w or target when one is bad (see the module docstring); without
            it a NaN/inf input or a target out of range gives NaN losses.
    Returns:
        A scalar (mean, sum) or (N,) losses (none), fp32 (fp64 for fp64 inputs).
    """
    tau, chunk_size = _ce_args(x, w, target, tau, chunk_size, ("x", "w", "target"))
    check.choice("reduction", reduction, REDUCTIONS)
    return torch.ops.clpdd.linear_softmax_ce(x, w, target, tau, reduction, int(ignore_index), chunk_size,
                                             _backend(backend, x.device), resolve_precision(precision),
                                             bool(check_finite), "x,w,target")


# ----------------------------------------------------------------------------------------------- CLP-DD
def clpdd_loss(phi_s: Tensor, y_s: Tensor, phi_r: Tensor, y_r: Tensor, lam: float, tau: float = 1.0,
               outer: str = "ce", mode: str = "auto", chunk_size: int | None = None,
               num_classes: int | None = None, *, backend: str = "auto", precision: str | None = None,
               check_finite: bool = True) -> Tensor:
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
        num_classes: C when y_s holds indices; None takes 1 + the largest label in y_s and y_r (a host
            synchronisation: pass it where that matters).
        backend, precision, check_finite: as in the other ops. With check_finite the labels of y_s are checked too;
            with outer="mse" also phi_r and y_r, up front, in bounded chunks (in this function, which
            torch.compile(fullgraph=True) cannot trace: pass check_finite=False there).
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
        check.integer("num_classes", num_classes, minimum=1)
        y_s = custom_ops.one_hot_op(y_s, num_classes, compute_dtype(phi_s), bool(check_finite), "y_s")
    else:
        check.tensor("y_s", y_s, 2)
        if num_classes is not None and num_classes != y_s.shape[1]:
            raise ValueError(f"num_classes: got {num_classes}, but y_s has {y_s.shape[1]} columns")
        num_classes = y_s.shape[1]
    check.same_device(phi_s=phi_s, y_s=y_s, phi_r=phi_r, y_r=y_r)
    lam, mode = _ridge_args(phi_s, y_s, lam, mode, ("phi_s", "y_s"))
    chunk_size = _chunk_size(chunk_size, num_classes, phi_r.shape[1])
    if check_finite and outer == "mse":   # the CE checks its result inside the op; the MSE's sums are plain torch
        check.finite("phi_r", phi_r)
        check.labels("y_r", y_r, num_classes)
    return torch.ops.clpdd.clpdd_loss(phi_s, y_s, phi_r, y_r, lam, tau, outer, mode, chunk_size,
                                      _backend(backend, phi_s.device), resolve_precision(precision),
                                      bool(check_finite))
