"""The public ops on the torch backend against independent float64 oracles (numpy/scipy), gradcheck, chunking, errors."""
from functools import partial

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import helpers
from clpdd_fast import NotPositiveDefiniteError, clpdd_loss, gram, linear_softmax_ce, reference, ridge_solve
from clpdd_fast.kernels.contract import CEParams

SHAPES = [(7, 19, 5), (29, 11, 3), (13, 13, 4)]  # (m, d, C): m < d, m > d, m == d
# the torch backend's inputs: CPU tensors, float64 unless a test asks for another dtype
rand = partial(helpers.rand, dtype=torch.float64, device="cpu")
labels = partial(helpers.labels, device="cpu")


def ridge_numpy(phi, y, lam):
    """Primal normal equations in float64 through scipy's symmetric solver: independent of both our modes."""
    phi, y = np.asarray(phi, np.float64), np.asarray(y, np.float64)
    return scipy.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T @ y, assume_a="pos")


def ce_numpy(x, w, t, tau):
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) / tau
    lse = scipy.special.logsumexp(z, axis=1)
    return lse - z[np.arange(len(t)), np.asarray(t)]


# ----------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("m,d,c", SHAPES)
def test_gram_matches_numpy(m, d, c):
    x = rand(m, d, seed=1)
    k = gram(x, 0.7)
    assert torch.equal(k, k.T), "K must be exactly symmetric, whatever order the BLAS sums in"
    expect = x.numpy() @ x.numpy().T + 0.7 * np.eye(m)
    np.testing.assert_allclose(k.numpy(), expect, rtol=1e-12, atol=1e-12)


def test_gram_low_precision_accumulates_in_fp32():
    x = rand(37, 301, seed=2, dtype=torch.float32).to(torch.bfloat16)
    k = gram(x)
    assert k.dtype == torch.float32 and torch.equal(k, k.T)
    exact = x.double() @ x.double().T
    torch.testing.assert_close(k.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,d,c", SHAPES)
@pytest.mark.parametrize("mode", ["dual", "primal", "auto"])
@pytest.mark.parametrize("lam", [1e-3, 0.5, 40.0])
def test_ridge_matches_scipy(m, d, c, mode, lam):
    phi, y = rand(m, d, seed=3), rand(m, c, seed=4)
    w = ridge_solve(phi, y, lam, mode)
    assert w.shape == (d, c) and w.dtype == torch.float64
    np.testing.assert_allclose(w.numpy(), ridge_numpy(phi, y, lam), rtol=1e-8, atol=1e-10)


def test_ridge_fp32_and_bf16_inputs_close_to_float64():
    phi, y = rand(23, 17, seed=5), rand(23, 4, seed=6)
    exact = torch.from_numpy(ridge_numpy(phi, y, 0.3))
    w32 = ridge_solve(phi.float(), y.float(), 0.3)
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), exact, rtol=1e-4, atol=1e-5)
    wbf = ridge_solve(phi.bfloat16(), y.float(), 0.3)
    exact_bf = torch.from_numpy(ridge_numpy(phi.bfloat16().double(), y, 0.3))
    torch.testing.assert_close(wbf.double(), exact_bf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_matches_materialised_logits(reduction):
    x, w, t = rand(41, 13, seed=7), rand(13, 9, seed=8), labels(41, 9, seed=9)
    got = linear_softmax_ce(x, w, t, tau=0.37, reduction=reduction, chunk_size=6)
    rows = ce_numpy(x, w, t, 0.37)
    expect = {"mean": rows.mean(), "sum": rows.sum(), "none": rows}[reduction]
    # lse - z_target cancels: a row's rounding error scales with its largest logit, not with its loss
    logit_scale = np.abs(x.numpy() @ w.numpy() / 0.37).max()
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12, atol=1e-12 * logit_scale * (41 if reduction == "sum"
                                                                                             else 1))
    torch.testing.assert_close(got, F.cross_entropy(x @ w / 0.37, t, reduction=reduction))


def test_linear_ce_ignore_index_like_torch():
    x, w, t = rand(30, 8, seed=10), rand(8, 5, seed=11), labels(30, 5, seed=12)
    t[::4] = -7
    for reduction in ["mean", "sum", "none"]:
        got = linear_softmax_ce(x, w, t, tau=2.0, reduction=reduction, chunk_size=7, ignore_index=-7)
        expect = F.cross_entropy(x @ w / 2.0, t, reduction=reduction, ignore_index=-7)
        torch.testing.assert_close(got, expect)


def test_linear_ce_bf16_features_fp32_weights():
    x, w, t = rand(50, 16, seed=13).bfloat16(), rand(16, 7, seed=14).float(), labels(50, 7, seed=15)
    got = linear_softmax_ce(x, w, t, tau=0.5)
    assert got.dtype == torch.float32
    expect = ce_numpy(x.double(), w.double(), t, 0.5).mean()
    assert abs(got.item() - expect) < 1e-5 * max(1.0, abs(expect))


@pytest.mark.parametrize("m,d,c", SHAPES)
def test_clpdd_loss_matches_direct_formula(m, d, c):
    phi_s, y_s = rand(m, d, seed=16), labels(m, c, seed=17)
    phi_r, y_r = rand(53, d, seed=18), labels(53, c, seed=19)
    w = ridge_numpy(phi_s, np.eye(c)[y_s.numpy()], 0.9)
    got_ce = clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.9, tau=0.2, num_classes=c, chunk_size=10)
    np.testing.assert_allclose(got_ce.item(), ce_numpy(phi_r, w, y_r, 0.2).mean(), rtol=1e-10)
    got_mse = clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.9, outer="mse", num_classes=c, chunk_size=10)
    resid = phi_r.numpy() @ w - np.eye(c)[y_r.numpy()]
    np.testing.assert_allclose(got_mse.item(), (resid ** 2).sum() / 53, rtol=1e-9)


def test_clpdd_loss_target_matrix_equals_indices():
    phi_s, y_s = rand(12, 6, seed=20), labels(12, 4, seed=21)
    phi_r, y_r = rand(20, 6, seed=22), labels(20, 4, seed=23)
    by_index = clpdd_loss(phi_s, y_s, phi_r, y_r, 0.4, 0.6, num_classes=4)
    by_matrix = clpdd_loss(phi_s, F.one_hot(y_s, 4).double(), phi_r, y_r, 0.4, 0.6)
    torch.testing.assert_close(by_index, by_matrix)


# ----------------------------------------------------------------------------------------------- gradients
def test_gram_gradcheck():
    x = rand(6, 9, seed=24, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: gram(a, 0.3), (x,))


@pytest.mark.parametrize("m,d", [(6, 9), (11, 5)])
@pytest.mark.parametrize("mode", ["dual", "primal"])
def test_ridge_gradcheck(m, d, mode):
    phi, y = rand(m, d, seed=25, requires_grad=True), rand(m, 3, seed=26, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: ridge_solve(p, t, 0.45, mode), (phi, y))


@pytest.mark.parametrize("m,d", [(6, 9), (11, 5)])
def test_ridge_analytic_gradient_equals_autograd_of_naive_formula(m, d):
    """The dL/dPhi_s of docs/METHOD.md (section 2) against autograd through an explicit-solve implementation, for a random upstream G."""
    phi, y, g = rand(m, d, seed=27, requires_grad=True), rand(m, 4, seed=28), rand(d, 4, seed=29)
    naive = phi.T @ torch.linalg.solve(phi @ phi.T + 0.6 * torch.eye(m, dtype=phi.dtype), y)
    (expect,) = torch.autograd.grad((naive * g).sum(), phi)
    for mode in ["dual", "primal"]:
        (got,) = torch.autograd.grad((ridge_solve(phi, y, 0.6, mode) * g).sum(), phi)
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_gradcheck(reduction):
    x, w, t = rand(13, 5, seed=30, requires_grad=True), rand(5, 4, seed=31, requires_grad=True), labels(13, 4, 32)
    t[3] = -100
    assert torch.autograd.gradcheck(lambda a, b: linear_softmax_ce(a, b, t, 0.7, reduction, 4), (x, w))


def test_linear_ce_only_needed_gradients():
    x, w, t = rand(9, 4, seed=33), rand(4, 3, seed=34, requires_grad=True), labels(9, 3, 35)
    linear_softmax_ce(x, w, t).backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("outer", ["ce", "mse"])
@pytest.mark.parametrize("m,d", [(8, 6), (5, 9)])
def test_clpdd_loss_gradcheck(outer, m, d):
    phi_s, y_s = rand(m, d, seed=36, requires_grad=True), labels(m, 3, seed=37)
    phi_r, y_r = rand(17, d, seed=38, requires_grad=True), labels(17, 3, seed=39)
    fn = lambda a, b: clpdd_loss(a, y_s, b, y_r, lam=0.5, tau=0.8, outer=outer, num_classes=3, chunk_size=5)
    assert torch.autograd.gradcheck(fn, (phi_s, phi_r))


# ----------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("chunk", [1, 3, 16, 1000, None])
def test_chunking_changes_nothing(chunk):
    x, w, t = rand(37, 10, seed=40, requires_grad=True), rand(10, 6, seed=41, requires_grad=True), labels(37, 6, 42)
    loss = linear_softmax_ce(x, w, t, 0.3, chunk_size=chunk)
    gx, gw = torch.autograd.grad(loss, (x, w))
    z = x @ w / 0.3
    ref = F.cross_entropy(z, t)
    rx, rw = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunk", [1, 4, 500])
def test_clpdd_loss_chunking_changes_nothing(chunk):
    phi_s, y_s = rand(9, 7, seed=43, requires_grad=True), labels(9, 3, seed=44)
    phi_r, y_r = rand(31, 7, seed=45), labels(31, 3, seed=46)
    for outer in ["ce", "mse"]:
        loss = clpdd_loss(phi_s, y_s, phi_r, y_r, 0.5, 0.4, outer=outer, num_classes=3, chunk_size=chunk)
        (g,) = torch.autograd.grad(loss, phi_s)
        ref = clpdd_loss(phi_s, y_s, phi_r, y_r, 0.5, 0.4, outer=outer, num_classes=3, chunk_size=31)
        (rg,) = torch.autograd.grad(ref, phi_s)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction,passes", [("mean", 1), ("sum", 1), ("none", 2)])
def test_chunk_bounds_logits_memory(monkeypatch, reduction, passes):
    """No chunk ever sees more than chunk_size rows (so never more than chunk_size x C logits); with a mean or sum,
    forward and backward compute each chunk's logits once, with "none" the backward recomputes them."""
    import clpdd_fast.reference as ref
    seen = []
    real = ref._chunk_logits
    monkeypatch.setattr(ref, "_chunk_logits", lambda x, w, out: seen.append(x.shape[0]) or real(x, w, out))
    x, w, t = rand(23, 4, seed=47, requires_grad=True), rand(4, 3, seed=48, requires_grad=True), labels(23, 3, 49)
    linear_softmax_ce(x, w, t, chunk_size=5, reduction=reduction, backend="torch").sum().backward()
    assert seen and max(seen) == 5 and sum(seen) == passes * 23


# ----------------------------------------------------------------------------------------------- CE backend functions
def ce_grads_numpy(x, w, t, tau, g):
    """Float64 (dL/dx, dL/dw) of L = sum_i g_i loss_i: row i's logits' gradient is g_i (softmax_i - onehot(t_i)) / tau.
    Rows with g_i = 0 may hold any label."""
    x, w, t, g = (np.asarray(a, np.float64) for a in (x, w, t, g))
    z = x @ w / tau
    coef = np.exp(z - scipy.special.logsumexp(z, axis=1, keepdims=True))
    rows = np.flatnonzero(g)
    coef[rows, t[rows].astype(int)] -= 1
    coef *= g[:, None] / tau
    return coef @ w.T, x.T @ coef


@pytest.mark.parametrize("n,d,c", [(41, 13, 9), (17, 5, 2)])
@pytest.mark.parametrize("dtype", ["fp64", "fp32", "bf16 x / fp32 w"])
@pytest.mark.parametrize("chunk", [1, 3, None])
@pytest.mark.parametrize("block", [None, 20])   # 20: CPU blocks of 20 // C rows, fewer than the chunk's
def test_linear_ce_forward_backward_matches_float64(monkeypatch, n, d, c, dtype, chunk, block):
    if block:
        monkeypatch.setattr(reference, "CPU_BLOCK_ELEMENTS", block)
    x_dt, w_dt = {"fp64": (torch.float64,) * 2, "fp32": (torch.float32,) * 2,
                  "bf16 x / fp32 w": (torch.bfloat16, torch.float32)}[dtype]
    x, w, t = rand(n, d, seed=60, dtype=x_dt), rand(d, c, seed=61, dtype=w_dt), labels(n, c, seed=62)
    t[::4] = -7
    g = torch.where(t != -7, rand(n, seed=63), 0.0).to(reference.compute_dtype(x, w))
    tau = 0.37
    chunk = chunk or reference.default_chunk_size(c, d)
    loss, lse, gx, gw = reference.linear_ce_forward_backward(x, w, t, g, CEParams(tau, -7, chunk, "high"), True, True)
    out_dt = torch.float64 if dtype == "fp64" else torch.float32
    assert {a.dtype for a in (loss, lse, gx, gw)} == {out_dt}
    z = x.double().numpy() @ w.double().numpy() / tau
    exact_lse = scipy.special.logsumexp(z, axis=1)
    exact_loss = np.where(t.numpy() != -7, exact_lse - z[np.arange(n), t.clamp(min=0).numpy()], 0.0)
    exact_gx, exact_gw = ce_grads_numpy(x.double(), w.double(), t, tau, g.double())
    tol = 1e-12 if dtype == "fp64" else 1e-6
    scale = np.abs(z).max()   # a loss's rounding error scales with the row's largest logit
    np.testing.assert_allclose(loss.double().numpy(), exact_loss, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(lse.double().numpy(), exact_lse, rtol=tol, atol=tol * scale)
    for got, exact in ((gx, exact_gx), (gw, exact_gw)):
        np.testing.assert_allclose(got.double().numpy(), exact, rtol=tol, atol=tol * scale * np.abs(exact).max())
    # only what is asked for; the recomputing backward gives the same gradients
    for need_x, need_w in ((True, False), (False, True)):
        rx, rw = reference.linear_ce_forward_backward(x, w, t, g, CEParams(tau, -7, chunk, "high"), need_x, need_w)[2:]
        bx, bw = reference.linear_ce_backward(x, w, t, lse, g, CEParams(tau, -7, chunk, "high"), need_x, need_w)
        for got, recomputed, exact, needed in ((rx, bx, exact_gx, need_x), (rw, bw, exact_gw, need_w)):
            assert (got is None and recomputed is None) if not needed else True
            if needed:
                for v in (got, recomputed):
                    np.testing.assert_allclose(v.double().numpy(), exact, rtol=tol,
                                               atol=tol * scale * np.abs(exact).max())


def test_linear_ce_forward_backward_target_out_of_range_gives_nan():
    x, w, t = rand(9, 4, seed=64), rand(4, 3, seed=65), torch.tensor([0, 3, 2, -1, -100, 1, 7, 2, 0])
    g = torch.where(t != -100, 1.0 / 8, 0.0).double()
    for with_grad in (True, False):
        params = CEParams(0.5, -100, 4)
        loss, lse = (reference.linear_ce_forward_backward(x, w, t, g, params, False, True) if with_grad
                     else reference.linear_ce_forward(x, w, t, params))[:2]
        bad = torch.tensor([1, 3, 6])
        assert torch.isnan(loss[bad]).all() and loss[4] == 0 and torch.isfinite(loss[[0, 2, 5, 7, 8]]).all()
        z = x.numpy() @ w.numpy() / 0.5
        np.testing.assert_allclose(lse.numpy(), scipy.special.logsumexp(z, axis=1), rtol=1e-12)


def test_cpu_blocks_are_capped_and_other_devices_take_the_chunk():
    assert reference.block_rows(10**6, 1000, torch.device("cpu")) == reference.CPU_BLOCK_ELEMENTS // 1000
    assert reference.block_rows(7, 1000, torch.device("cpu")) == 7
    assert reference.block_rows(10**6, 1000, torch.device("cuda")) == 10**6
    assert reference.block_rows(10**6, 10**8, torch.device("cpu")) == 1


# ----------------------------------------------------------------------------------------------- bad input
def test_ridge_not_positive_definite_suggests_larger_lam():
    phi = torch.ones(6, 4, dtype=torch.float64) * 1e8  # rank one, huge: lam is lost in rounding
    with pytest.raises(NotPositiveDefiniteError, match="larger lam"):
        ridge_solve(phi, rand(6, 2, seed=50), 1e-12, "dual")


@pytest.mark.parametrize("call,match", [
    (lambda: ridge_solve(torch.randn(5, 3), torch.randn(5, 2), 0.0), "lam"),
    (lambda: ridge_solve(torch.randn(5, 3), torch.randn(5, 2), -1.0), "lam"),
    (lambda: ridge_solve(torch.randn(5, 3), torch.randn(5, 2), float("nan")), "lam"),
    (lambda: ridge_solve(torch.randn(5, 3), torch.randn(4, 2), 1.0), "y"),
    (lambda: ridge_solve(torch.randn(5), torch.randn(5, 2), 1.0), "phi"),
    (lambda: ridge_solve(torch.randn(5, 3), torch.randn(5, 2), 1.0, mode="fast"), "mode"),
    (lambda: ridge_solve(torch.full((5, 3), float("nan")), torch.randn(5, 2), 1.0), "phi"),
    (lambda: ridge_solve(torch.randn(5, 3), torch.randn(5, 2).double(), 1.0), "float64"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.tensor([0, 1, 2, 0, 1])), "target"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.tensor([0, 1, -1, 0, 1])), "target"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(4, 2), torch.zeros(5, dtype=torch.long)), "w"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.zeros(4, dtype=torch.long)), "target"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.zeros(5)), "target"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.zeros(5, dtype=torch.long), 0.0), "tau"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.zeros(5, dtype=torch.long), -2), "tau"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.zeros(5, dtype=torch.long),
                               reduction="avg"), "reduction"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.randn(3, 2), torch.zeros(5, dtype=torch.long),
                               chunk_size=0), "chunk_size"),
    (lambda: linear_softmax_ce(torch.randn(5, 3), torch.tensor([[1.0, float("inf")]] * 3),
                               torch.zeros(5, dtype=torch.long)), "w"),
    (lambda: linear_softmax_ce(torch.randn(5, 3).int(), torch.randn(3, 2), torch.zeros(5, dtype=torch.long)), "x"),
    (lambda: gram(torch.randn(4, 3), lam=-1.0), "lam"),
    (lambda: clpdd_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.randn(6, 3),
                        torch.tensor([0, 1, 2, 3, 4, 0]), 1.0, num_classes=4), "y_r"),
    (lambda: clpdd_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.randn(6, 2),
                        torch.zeros(6, dtype=torch.long), 1.0), "phi_r"),
    (lambda: clpdd_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.randn(6, 3),
                        torch.zeros(6, dtype=torch.long), 1.0, outer="l1"), "outer"),
    (lambda: clpdd_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.randn(6, 3),
                        torch.zeros(6, dtype=torch.long), 1.0, tau=0.0, outer="mse"), "tau"),
])
def test_bad_input_raises_naming_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("outer", ["ce", "mse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clpdd_loss_names_a_non_finite_real_feature(outer, bad):
    phi_r = rand(9, 3, seed=4)
    phi_r[7, 1] = bad
    with pytest.raises(ValueError, match="^phi_r: contains 1 non-finite"):
        clpdd_loss(rand(4, 3, seed=3), torch.tensor([0, 1, 2, 0]), phi_r, torch.arange(9) % 3, 1.0, outer=outer)


def test_check_finite_opt_out_skips_the_check():
    x = torch.randn(5, 3)
    x[0, 0] = float("nan")
    out = linear_softmax_ce(x, torch.randn(3, 2), torch.zeros(5, dtype=torch.long), reduction="none",
                            check_finite=False)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gram(torch.randn(4, 3), backend="triton")


@pytest.mark.parametrize("kwargs,name", [({"tau": 0.0}, "tau"), ({"tau": float("nan")}, "tau"),
                                         ({"chunk_size": 0}, "chunk_size"), ({"precision": "tf32"}, "precision")])
def test_ce_params_refuse_what_no_backend_can_run(kwargs, name):
    """The CE backends' parameters object names a bad field (the public ops check first; this guards direct
    backend callers)."""
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        CEParams(**{"tau": 1.0, **kwargs})
