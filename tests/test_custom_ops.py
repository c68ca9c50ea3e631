"""The ops as torch custom ops: opcheck, torch.compile without graph breaks, autocast, no host synchronisation with
check_finite=False, results checked instead of inputs, the device guard, the precision argument."""
import contextlib

import pytest
import torch

from clpdd_fast import clpdd_loss, custom_ops, gram, linear_softmax_ce, ops, reference, ridge_solve
from clpdd_fast import validation
from clpdd_fast.kernels.contract import CEParams

from helpers import labels, rand


def cpu(*shape, seed, dtype=torch.float64, requires_grad=False):
    return rand(*shape, seed=seed, dtype=dtype, device="cpu", requires_grad=requires_grad)


def cpu_labels(n, c, seed, ignore=()):
    return labels(n, c, seed=seed, ignore=ignore, device="cpu")


# ----------------------------------------------------------------------------------------------- opcheck
def _opcheck_cases(dtype):
    x = cpu(9, 5, seed=1, dtype=dtype, requires_grad=True)
    y = cpu(9, 3, seed=2, dtype=dtype, requires_grad=True)
    wide = cpu(4, 7, seed=3, dtype=dtype, requires_grad=True)
    w = cpu(5, 4, seed=4, dtype=dtype, requires_grad=True)
    t = cpu_labels(9, 4, seed=5, ignore=(2,))
    xr = cpu(9, 7, seed=7, dtype=dtype, requires_grad=True)
    lse = reference.linear_ce_forward(x.detach(), w.detach(), t, CEParams(0.7, -100, 4, "high"))[1]
    wf, factor, _ = reference.ridge_forward(x.detach(), y.detach(), 0.5, "primal")
    c = torch.ops.clpdd
    return [
        (c.gram.default, (x, 0.3, "torch", True, "x")),
        (c.ridge_factorize.default, (x, y, 0.5, "primal", "torch", True, "phi,y")),
        (c.ridge_factorize.default, (wide, y[:4], 0.5, "dual", "torch", False, "phi,y")),
        (c.ridge_backward.default, (x.detach(), y.detach(), wf, factor, cpu(5, 3, seed=6, dtype=dtype), "primal",
                                    "torch", True, False)),
        (c.linear_ce_rows.default, (x, w, t, 0.7, -100, 4, "torch", "high", True, "x,w,target")),
        (c.linear_ce_backward.default, (x.detach(), w.detach(), t, lse, torch.ones_like(lse), 0.7, -100, 4, "torch",
                                        "high", False, True)),
        (c.ridge_solve.default, (x, y, 0.5, "dual", "torch", True, "phi,y")),
        (c.linear_softmax_ce.default, (x, w, t, 0.7, "mean", -100, 4, "torch", "high", True, "x,w,target")),
        (c.linear_softmax_ce.default, (x, w, t, 0.7, "none", -100, 4, "torch", "high", False, "x,w,target")),
        (c.linear_ce_reduced.default, (x, w, t, 0.7, "mean", -100, 4, "torch", "high", True, "x,w,target", True, True)),
        (c.linear_ce_reduced.default, (x.detach(), w, t, 0.7, "sum", -100, 3, "torch", "high", False, "x,w,target",
                                       False, True)),
        (c.scale_gradient.default, (cpu(5, 4, seed=8, dtype=dtype), cpu(1, seed=9, dtype=dtype)[0])),
        (c.clpdd_loss.default, (wide, y[:4], xr, t.abs() % 3, 0.5, 0.7, "ce", "dual", 4, "torch", "high", True)),
        (c.clpdd_loss.default, (wide, y[:4], xr, t.abs() % 3, 0.5, 0.7, "mse", "dual", 4, "torch", "high", True)),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck_passes_for_every_op(dtype):
    for op, args in _opcheck_cases(dtype):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_the_four_public_ops_are_registered_in_one_namespace():
    for name in ("gram", "ridge_solve", "linear_softmax_ce", "clpdd_loss"):
        assert hasattr(torch.ops.clpdd, name)


def test_a_second_derivative_raises_instead_of_being_silently_wrong():
    phi, x = cpu(5, 3, seed=8, requires_grad=True), cpu(7, 3, seed=9, requires_grad=True)
    w = ridge_solve(phi, cpu(5, 2, seed=10), 0.5)
    loss = linear_softmax_ce(x, cpu(3, 4, seed=11), cpu_labels(7, 4, seed=12))
    for out, wrt, op in ((w.square().sum(), phi, "ridge_backward"), (loss, x, "scale_gradient")):
        (g,) = torch.autograd.grad(out, wrt, create_graph=True)
        with pytest.raises(RuntimeError, match=f"clpdd.{op}.*no autograd formula"):
            g.sum().backward()
    # the Gram matrix's backward is plain torch: its second derivative is exact
    assert torch.autograd.gradcheck(lambda a: torch.autograd.grad(gram(a).square().sum(), a, create_graph=True)[0],
                                    (phi,))


# ----------------------------------------------------------------------------------------------- the CE's two paths
@pytest.fixture
def ce_calls(monkeypatch):
    """Which torch-backend CE functions ran: the one-pass forward + gradients, or the forward and the recomputing
    backward."""
    calls = []
    for name in ("linear_ce_forward", "linear_ce_backward", "linear_ce_forward_backward"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mean_and_sum_with_a_gradient_compute_it_in_the_forward(ce_calls, reduction):
    x, w, t = cpu(31, 6, seed=90, requires_grad=True), cpu(6, 4, seed=91, requires_grad=True), cpu_labels(31, 4, 92)
    loss = linear_softmax_ce(x, w, t, 0.6, reduction, chunk_size=7)
    assert ce_calls == ["linear_ce_forward_backward"]
    # the backward scales by the upstream gradient, nothing else
    gx, gw = torch.autograd.grad(loss * 2.5, (x, w), retain_graph=True)
    assert ce_calls == ["linear_ce_forward_backward"]
    xd, wd = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xd @ wd / 0.6, t, reduction=reduction)
    rx, rw = torch.autograd.grad(ref * 2.5, (xd, wd))
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-14)
    (again,) = torch.autograd.grad(loss * 2.5, w)   # a second backward through the same graph (retained above)
    torch.testing.assert_close(again, rw, rtol=1e-12, atol=1e-14)
    xb, wf = x.detach().bfloat16().requires_grad_(), w.detach().float().requires_grad_()
    gx, gw = torch.autograd.grad(linear_softmax_ce(xb, wf, t, 0.6, reduction), (xb, wf))   # in each input's dtype
    assert (gx.dtype, gw.dtype) == (torch.bfloat16, torch.float32)


def test_no_gradient_or_reduction_none_keeps_the_recomputing_backward(ce_calls):
    x, w, t = cpu(31, 6, seed=93), cpu(6, 4, seed=94, requires_grad=True), cpu_labels(31, 4, 95)
    with torch.no_grad():
        linear_softmax_ce(x, w, t)
    linear_softmax_ce(x, w.detach(), t)
    assert ce_calls == ["linear_ce_forward"] * 2
    ce_calls.clear()
    linear_softmax_ce(x, w, t, reduction="none").sum().backward()
    assert ce_calls == ["linear_ce_forward", "linear_ce_backward"]
    ce_calls.clear()
    clpdd_loss(cpu(5, 6, seed=96, requires_grad=True), torch.arange(5) % 4, x, t, 0.5, num_classes=4).backward()
    assert ce_calls == ["linear_ce_forward_backward"]


def test_gradient_in_forward_passes_the_precision(monkeypatch):
    seen = []
    real = reference.linear_ce_forward_backward
    monkeypatch.setattr(reference, "linear_ce_forward_backward", lambda *a: seen.append(a[4].precision) or real(*a))
    x, w, t = cpu(7, 3, seed=106), cpu(3, 4, seed=107, requires_grad=True), cpu_labels(7, 4, seed=108)
    linear_softmax_ce(x, w, t, precision="highest")
    monkeypatch.delenv("CLPDD_CE_PRECISION", raising=False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    linear_softmax_ce(x, w, t, reduction="sum")
    assert seen == ["highest", "medium"]


def test_differentiating_the_gradient_again_raises():
    x, w, t = cpu(11, 4, seed=97, requires_grad=True), cpu(4, 3, seed=98, requires_grad=True), cpu_labels(11, 3, 99)
    for reduction in ("mean", "sum", "none"):
        (gw,) = torch.autograd.grad(linear_softmax_ce(x, w, t, 0.5, reduction).sum(), w, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            gw.square().sum().backward()


def test_gradient_in_forward_still_checks_the_result_and_names_the_input():
    x, w, t = cpu(13, 4, seed=100), cpu(4, 3, seed=101, requires_grad=True), cpu_labels(13, 3, seed=102)
    bad_t = t.clone()
    bad_t[5] = 3
    with pytest.raises(ValueError, match=r"^target: labels must lie in \[0, 3\)"):
        linear_softmax_ce(x, w, bad_t)
    assert torch.isnan(linear_softmax_ce(x, w, bad_t, reduction="sum", check_finite=False))
    x[2, 1] = float("inf")
    with pytest.raises(ValueError, match="^x: contains 1 non-finite"):
        linear_softmax_ce(x, w, t)


def test_compiled_gradient_in_forward(ce_calls):
    torch._dynamo.reset()
    x, w, t = cpu(23, 5, seed=103, requires_grad=True), cpu(5, 3, seed=104, requires_grad=True), cpu_labels(23, 3, 105)
    fn = lambda a, b: linear_softmax_ce(a, b, t, 0.4, check_finite=False)   # noqa: E731
    expect = torch.autograd.grad(fn(x, w), (x, w))
    ce_calls.clear()
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w), (x, w))
    assert ce_calls == ["linear_ce_forward_backward"]
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------- torch.compile
def _user_function(phi_s, y_s, phi_r, y_r):
    """What a user might write around the ops: every op, forward and backward."""
    k = gram(phi_s, 0.1)
    w = ridge_solve(phi_s, reference.one_hot(y_s, 3, phi_s.dtype), 0.5)
    ce = linear_softmax_ce(phi_r, w, y_r, 0.4)
    loss = clpdd_loss(phi_s, y_s, phi_r, y_r, 0.5, 0.4, num_classes=3)
    mse = clpdd_loss(phi_s, y_s, phi_r, y_r, 0.5, outer="mse", num_classes=3, check_finite=False)
    return k.square().mean() + ce + loss + mse


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_with_fullgraph_gives_the_eager_result(compiler):
    torch._dynamo.reset()
    phi_s = cpu(6, 5, seed=10, requires_grad=True)
    phi_r = cpu(23, 5, seed=11, requires_grad=True)
    y_s, y_r = torch.arange(6) % 3, cpu_labels(23, 3, seed=12)
    eager = _user_function(phi_s, y_s, phi_r, y_r)
    grads = torch.autograd.grad(eager, (phi_s, phi_r))
    compiled = torch.compile(_user_function, fullgraph=True, backend=compiler)
    got = compiled(phi_s, y_s, phi_r, y_r)
    got_grads = torch.autograd.grad(got, (phi_s, phi_r))
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=0)
    for g, e in zip(got_grads, grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


def test_compiled_checks_still_name_the_bad_argument():
    torch._dynamo.reset()
    phi_r = cpu(23, 5, seed=11)
    phi_r[4, 2] = float("nan")
    compiled = torch.compile(lambda a, b, t: linear_softmax_ce(a, b, t, 0.4), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="^x: contains 1 non-finite"):
        compiled(phi_r, cpu(5, 3, seed=13), cpu_labels(23, 3, seed=12))


# ----------------------------------------------------------------------------------------------- autocast
def test_autocast_changes_nothing():
    """Under bf16 autocast the ops compute exactly as outside it: fp32 results, the same values and, with the
    backward outside the autocast region as torch recommends, the same gradients."""
    phi_s = cpu(6, 5, seed=20, dtype=torch.float32, requires_grad=True)
    phi_r = cpu(41, 5, seed=21, dtype=torch.float32)
    y_s, y_r = torch.arange(6) % 3, cpu_labels(41, 3, seed=22)

    def forward():
        return [gram(phi_s, 0.2), ridge_solve(phi_s, reference.one_hot(y_s, 3, torch.float32), 0.3),
                linear_softmax_ce(phi_r, phi_r[:5].T.contiguous(), y_r, 0.5),
                clpdd_loss(phi_s, y_s, phi_r, y_r, 0.3, 0.5, num_classes=3),
                clpdd_loss(phi_s, y_s, phi_r, y_r, 0.3, outer="mse", num_classes=3)]

    def with_grad(results):
        return results + list(torch.autograd.grad(sum(r.sum() for r in results), phi_s))

    outside = with_grad(forward())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = forward()
        assert torch.mm(phi_s, phi_s.T).dtype == torch.bfloat16   # autocast is on here
    for a, b in zip(with_grad(inside), outside):
        assert a.dtype == torch.float32 and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- no host syncs
@contextlib.contextmanager
def no_host_syncs():
    """Fails on any tensor -> Python value conversion (each is a device-to-host synchronisation on a GPU)."""
    names = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def trap(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return fail
    try:
        for n in names:
            setattr(torch.Tensor, n, trap(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("outer", ["ce", "mse"])
def test_no_host_sync_and_no_input_scan_without_check_finite(monkeypatch, outer):
    for name in ("finite", "labels"):
        monkeypatch.setattr(validation, name, lambda *a, **k: pytest.fail("validation ran on the hot path"))
    phi_s = cpu(8, 5, seed=30, dtype=torch.float32, requires_grad=True)
    phi_r, y_r = cpu(31, 5, seed=31, dtype=torch.float32), cpu_labels(31, 4, seed=32)
    y_s = torch.arange(8) % 4
    with no_host_syncs():
        for mode in ("dual", "primal"):
            loss = clpdd_loss(phi_s, y_s, phi_r, y_r, 0.5, 0.3, outer=outer, mode=mode, num_classes=4,
                              check_finite=False)
            loss.backward()
    with pytest.raises(AssertionError, match="host synchronisation"):   # the trap works
        with no_host_syncs():
            bool(loss > 0)


def test_check_finite_scans_no_input_when_the_result_is_finite(monkeypatch):
    """The default check reads the result only (bounded memory): the inputs are scanned only to name a bad one."""
    scanned = []
    real = validation.finite
    monkeypatch.setattr(validation, "finite", lambda name, v, *a: scanned.append(name) or real(name, v, *a))
    phi_r = cpu(31, 5, seed=41)
    clpdd_loss(cpu(8, 5, seed=40), torch.arange(8) % 4, phi_r, cpu_labels(31, 4, seed=42), 0.5, 0.3, num_classes=4)
    assert scanned == []
    phi_r[30, 4] = float("inf")
    with pytest.raises(ValueError, match="^phi_r: contains 1 non-finite"):
        clpdd_loss(cpu(8, 5, seed=40), torch.arange(8) % 4, phi_r, cpu_labels(31, 4, seed=42), 0.5, 0.3,
                   num_classes=4)
    assert scanned == ["phi_r"]


def test_finite_check_reads_bounded_chunks():
    seen = []

    class Rows(torch.Tensor):
        def __getitem__(self, index):
            seen.append(index.stop - index.start)
            return super().__getitem__(index)

    big = torch.zeros(10, 3).as_subclass(Rows)
    validation.finite("x", big, chunk_rows=4)
    assert seen == [4, 4, 4]


def test_without_check_bad_values_show_as_nan():
    w = ridge_solve(torch.ones(6, 4, dtype=torch.float64) * 1e8, cpu(6, 2, seed=50), 1e-12, "dual",
                    check_finite=False)
    assert torch.isnan(w).all()   # the factorisation failed: no exception, a NaN probe
    t = torch.tensor([0, 1, 5, 0, -100])
    rows = linear_softmax_ce(cpu(5, 3, seed=51), cpu(3, 2, seed=52), t, reduction="none", check_finite=False)
    assert torch.isnan(rows[2]) and rows[4] == 0 and torch.isfinite(rows[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match=r"^target: labels must lie in \[0, 2\), got values in \[0, 5\]"):
        linear_softmax_ce(cpu(5, 3, seed=51), cpu(3, 2, seed=52), t)


def test_an_overflow_with_finite_inputs_is_named_as_such():
    with pytest.raises(ValueError, match=r"^x: x x\^T overflows torch.float32"):
        gram(torch.full((3, 2), 1e20))
    x = torch.full((4, 3), 1e30)
    with pytest.raises(ValueError, match="^x: the logits x w / tau overflow"):
        linear_softmax_ce(x, torch.ones(3, 2), torch.zeros(4, dtype=torch.long), tau=1e-10)


# ----------------------------------------------------------------------------------------------- device and precision
def test_every_launch_runs_under_the_device_guard(monkeypatch):
    entered = []
    real = custom_ops.on_device

    def spy(device):
        entered.append(device)
        return real(device)
    monkeypatch.setattr(custom_ops, "on_device", spy)
    phi_s = cpu(6, 5, seed=60, requires_grad=True)
    clpdd_loss(phi_s, torch.arange(6) % 3, cpu(9, 5, seed=61), cpu_labels(9, 3, seed=62), 0.5).backward()
    gram(phi_s).sum().backward()
    # forward and backward of the ridge solve and of the Gram matrix, and the CE's forward (which computes its
    # gradient too: its backward only scales it)
    assert len(entered) == 5 and all(d == torch.device("cpu") for d in entered)


def test_precision_argument_environment_and_torch_default(monkeypatch):
    """The argument wins, then CLPDD_CE_PRECISION, then torch's float32 matmul precision (read when the op runs);
    the autotune setting reaches the backend with them."""
    seen = []
    real = reference.linear_ce_forward
    monkeypatch.setattr(reference, "linear_ce_forward", lambda *a: seen.append(a[-1]) or real(*a))
    x, w, t = cpu(7, 3, seed=70), cpu(3, 4, seed=71), cpu_labels(7, 4, seed=72)
    monkeypatch.delenv("CLPDD_CE_PRECISION", raising=False)
    linear_softmax_ce(x, w, t)
    linear_softmax_ce(x, w, t, precision="high")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    linear_softmax_ce(x, w, t)
    monkeypatch.setenv("CLPDD_CE_PRECISION", "high")
    monkeypatch.setenv("CLPDD_AUTOTUNE", "1")
    clpdd_loss(cpu(4, 3, seed=73), torch.arange(4) % 4, x, t, 0.5, num_classes=4)
    assert [(p.precision, p.autotune) for p in seen] == [("highest", False), ("high", False), ("medium", False),
                                                          ("high", True)]
    with pytest.raises(ValueError, match="^precision: expected one of"):
        linear_softmax_ce(x, w, t, precision="fast")


@pytest.mark.parametrize("old,new", [("ieee", "highest"), ("auto", "high"), ("tf32", "medium")])
def test_old_precision_words_still_work_with_a_note(old, new, monkeypatch):
    seen = []
    real = reference.linear_ce_forward
    monkeypatch.setattr(reference, "linear_ce_forward", lambda *a: seen.append(a[-1].precision) or real(*a))
    x, w, t = cpu(7, 3, seed=74), cpu(3, 4, seed=75), cpu_labels(7, 4, seed=76)
    with pytest.warns(FutureWarning, match=f"precision: '{old}' is now called '{new}'"):
        linear_softmax_ce(x, w, t, precision=old)
    monkeypatch.setenv("CLPDD_CE_PRECISION", old)
    with pytest.warns(FutureWarning, match=f"CLPDD_CE_PRECISION: '{old}' is now called '{new}'"):
        linear_softmax_ce(x, w, t)
    assert seen == [new, new]


def test_backend_names_are_checked_before_any_work():
    with pytest.raises(ValueError, match="^backend: expected one of"):
        ops.gram(cpu(3, 2, seed=80), backend="cuda")
