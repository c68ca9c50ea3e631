"""The error bound of the linear CE's bf16-x / fp32-w path (w as two bf16 halves), derived term by term and evaluated
on the data, and the assertion the kernel tests make with it (docs/KERNELS.md, "Error bound of the split")."""
import torch

from helpers import worst_element
from clpdd_fast.kernels import linear_ce as kce


ULP = 2.0**-23    # one fp32 ulp, relative: an addition error of up to one ulp (truncating tensor-core adders too)


def _ce_float64(x, w, t, tau, g=None):
    """Logits, lse, picked logits, softmax and row losses of the linear CE in float64; with per-row weights g also
    the coefficients (softmax - onehot) * g / tau, dX and dW."""
    z = x @ w / tau
    lse = torch.logsumexp(z, 1)
    valid = t != -100
    tgt = torch.where(valid, t, 0).long()
    picked = z.gather(1, tgt[:, None])[:, 0]
    out = dict(z=z, lse=lse, picked=picked, p=torch.exp(z - lse[:, None]), loss=torch.where(valid, lse - picked, 0.0))
    if g is not None:
        coef = out["p"] * (g / tau)[:, None]
        coef[torch.arange(len(t), device=t.device), tgt] -= g / tau     # g is 0 on ignored rows
        out.update(coef=coef, gx=coef @ w.T, gw=x.T @ coef)
    return out


def split_ce_bounds(x, w, t, tau, g=None):
    """The error bound of the bf16-x / fp32-w CE path (docs/KERNELS.md, "Error bound of the split"), evaluated on
    the data.

    The split replaces w by w' = hi + lo with |w' - w| <= 2^-17 |w| elementwise. With A = |x| |w| (sums of
    |x_ik| |w_kj|), gamma_i = g_i / tau and p the softmax:
      split part (w -> w', exact arithmetic): a logit moves by at most s_ij = 2^-17 A_ij / tau; a row's loss by
        s_iy + max_j s_ij (lse is 1-Lipschitz in the max norm); the mean loss by the mean of those; a coefficient
        by gamma_i p_ij (exp(s_ij + max_l s_il) - 1); dW = x^T coef and dX = coef w^T by |x|^T and |w| times that
        (plus 2^-17 |coef| |w|^T for dX, which multiplies w itself).
      kernel part (the kernel's fp32 arithmetic on the split operands): a logit is off by
        e_ij = ULP sqrt(2d) A'_ij / tau + 2 ULP |z'_ij| (2d exact products accumulated in fp32: sqrt(n) ulps of the
        sum of |terms| is many standard deviations of n independent errors of at most one ulp of a partial sum;
        1/tau and the scaling round once each); the online logsumexp adds eta_i = 2^-17 + 2^-22 (|lse'| + |z'_iy|)
        (approximate exp and log, sums, two subtractions); a coefficient is off by
        gamma p' (exp(a) - 1) + (2^-17 + 2^-21) |coef'| with a = e_ij + max_l e_il + eta_i + 2^-22 (1 + |z' - lse'|)
        (the exp), 2^-17 its own bf16 split, 2^-21 the fp32 roundings of g / tau, p - 1 and the product; dW adds
        ULP sqrt(2N) for its 2N products; dX adds 2^-16 (the dropped lo x lo product: both low halves are <= 2^-8
        of their value) and ULP sqrt(3C) for its 3C products. The factors 1.01: sum |hi| + |lo| <= 1.01 |hi + lo|.
    Returns float64 dicts: exact (w), split (w', the float64 replay of the split), split_bound, kernel_bound; each
    with "loss" (N,), and with g also "gx" (N, d) and "gw" (d, C).
    """
    xd, wd = x.double(), w.double()
    hi, lo = kce.split_bf16(w.float())
    w2 = hi.double() + lo.double()
    g = None if g is None else g.double()
    n, d = x.shape
    num_classes = w.shape[1]
    valid = (t != -100).double()
    ex, sp = _ce_float64(xd, wd, t, tau, g), _ce_float64(xd, w2, t, tau, g)
    rows = torch.arange(n, device=x.device)
    tgt = torch.where(t != -100, t, 0).long()
    # split part
    s = 2.0**-17 * (xd.abs() @ wd.abs()) / tau
    s_sum = s + s.max(1, keepdim=True).values
    split_bound = dict(loss=s_sum[rows, tgt] * valid)
    # kernel part
    e = 1.01 * ULP * (2 * d) ** 0.5 * (xd.abs() @ w2.abs()) / tau + 2 * ULP * sp["z"].abs()
    eta = 2.0**-17 + 2.0**-22 * (sp["lse"].abs() + sp["picked"].abs())
    e_sum = e + e.max(1, keepdim=True).values
    kernel_bound = dict(loss=(e_sum[rows, tgt] + eta) * valid)
    names = ["loss"]
    if g is not None:
        names += ["gx", "gw"]
        gamma = (g / tau)[:, None]
        dc = gamma * ex["p"] * torch.expm1(s_sum)
        split_bound.update(gw=xd.abs().T @ dc, gx=dc @ w2.abs().T + 2.0**-17 * ex["coef"].abs() @ wd.abs().T)
        a = e_sum + eta[:, None] + 2.0**-22 * (1 + (sp["z"] - sp["lse"][:, None]).abs())
        dc = gamma * sp["p"] * torch.expm1(a) * (1 + 2.0**-16) + (2.0**-17 + 2.0**-21) * sp["coef"].abs()
        c_abs = sp["coef"].abs() + dc
        gx_rel = 1.01 * (2.0**-16 + ULP * (3 * num_classes) ** 0.5)
        kernel_bound.update(gw=xd.abs().T @ dc + 1.01 * ULP * (2 * n) ** 0.5 * xd.abs().T @ c_abs,
                            gx=dc @ w2.abs().T + gx_rel * c_abs @ w2.abs().T)
    return dict(exact={k: ex[k] for k in names}, split={k: sp[k] for k in names}, split_bound=split_bound,
                kernel_bound=kernel_bound)


def assert_within_split_bound(loss, gx, gw, x, w, t, tau, g=None):
    """The split path's results against float64: (1) the float64 replay of the split (w -> hi + lo) is within the
    documented split bound; (2) the kernel is within that replay's error plus the kernel part of the bound (the
    documented total bound, tighter where the split happens to cost less than its worst case); (3) the mean loss
    over the counted rows is within the mean of the row bounds. gx, gw (and g) None: the loss only."""
    b = split_ce_bounds(x, w, t, tau, g)
    for name, fast in (("loss", loss), ("gx", gx), ("gw", gw)):
        if fast is None:
            continue
        exact, split = b["exact"][name], b["split"][name]
        split_err = (split - exact).abs()
        bound = b["split_bound"][name]
        assert (split_err <= bound).all(), (f"{name}: the split exceeds its documented bound, most "
                                            f"{worst_element(split, exact, split_err - bound, bound)}")
        err = (fast.double() - exact).abs()
        over = err - split_err - b["kernel_bound"][name]
        excess = over.max().item()
        assert excess <= 0, (f"{name}: error {err.max().item():.3g} exceeds the derived bound by {excess:.3g} "
                             f"(split part {split_err.max().item():.3g}), most "
                             f"{worst_element(fast.double(), exact, over, split_err + b['kernel_bound'][name])}")
    valid = t != -100
    mean_err = (loss.double()[valid].mean() - b["exact"]["loss"][valid].mean()).abs()
    mean_bound = (b["split_bound"]["loss"] + b["kernel_bound"]["loss"])[valid].mean()
    assert mean_err <= mean_bound, f"mean loss: error {mean_err.item():.3g} > bound {mean_bound.item():.3g}"
