"""The Triton kernels (kernels/) against the torch reference and a float64 oracle.

Without CUDA every kernel runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported). With CUDA the same tests run compiled on the GPU, plus the GPU-only
ones (bf16, large shapes, bitwise determinism, memory).
Shapes are small and odd so that every dimension has a masked tail; tiles are >= 16 (GPU tl.dot minimum).
"""
import inspect
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
# Triton reads TRITON_INTERPRET when kernels are decorated, i.e. at import: tests/conftest.py sets it first.
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("without CUDA the kernel tests need TRITON_INTERPRET=1 before triton is imported "
                       "(tests/conftest.py sets it: run them through pytest from the repository)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from clpdd_fast import reference  # noqa: E402
from clpdd_fast import ops  # noqa: E402
from clpdd_fast.validation import NotPositiveDefiniteError  # noqa: E402
from clpdd_fast.kernels import backend as kbackend  # noqa: E402
from clpdd_fast.kernels import cholesky as kchol  # noqa: E402
from clpdd_fast.kernels import gram as kgram  # noqa: E402
from clpdd_fast.kernels import matmul as kmatmul  # noqa: E402
from clpdd_fast.kernels import linear_ce as kce  # noqa: E402
from clpdd_fast.kernels import small_ridge as ksmall  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SMALL = {"BLOCK_ROWS": 16, "BLOCK_CLASSES": 16, "BLOCK_FEATURES": 16}   # several tiles in every dimension at the test shapes
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton); gpu_check.sh runs it")


def rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def labels(n, num_classes, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, num_classes, (n,), generator=g)
    for i in ignore:
        t[i] = -100
    return t.to(DEVICE)


def close_to_exact(fast, ref, exact, tol):
    """|fast - exact| <= 2 |torch in the same precision - exact| + tol * max|exact| (elementwise maxima)."""
    assert fast.shape == exact.shape, (fast.shape, exact.shape)
    assert torch.isfinite(fast).all(), "non-finite entries (unwritten output?)"
    exact = exact.double().cpu()
    err_fast = (fast.double().cpu() - exact).abs().max().item()
    err_ref = (ref.double().cpu() - exact).abs().max().item()
    bound = 2 * err_ref + tol * max(exact.abs().max().item(), 1.0)
    assert err_fast <= bound, f"error {err_fast:.3g} > bound {bound:.3g} (torch error {err_ref:.3g})"


def tol_for(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


# ----------------------------------------------------------------------------------------------- contract
def test_backend_exposes_the_reference_functions_with_the_same_signatures():
    for name in ("gram", "ridge_forward", "ridge_backward", "linear_ce_forward", "linear_ce_backward"):
        ours = inspect.signature(getattr(kbackend, name))
        theirs = inspect.signature(getattr(reference, name))
        assert list(ours.parameters) == list(theirs.parameters), name


def test_kernels_run_under_the_interpreter_on_cpu():
    if not CUDA:
        assert type(kmatmul._matmul_kernel).__name__.startswith("Interpreted")
    assert ops.resolve_backend("triton", torch.device(DEVICE)) is kbackend


# ----------------------------------------------------------------------------------------------- gram / matmul
@pytest.mark.parametrize("m,d", [(29, 19), (19, 37), (70, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("lam", [0.0, 1e-7, 1e3])
def test_gram_matches_float64(m, d, dtype, lam):
    x = rand(m, d, dtype=dtype, seed=m + d)
    k = kgram.gram(x, lam)
    assert k.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(k, k.T), "mirrored tiles must be exactly symmetric"
    exact = reference.gram(x.double(), lam)
    close_to_exact(k, reference.gram(x, lam), exact, tol_for(dtype))


def test_symmetric_mode_mirrors_the_lower_triangle_of_every_tile():
    # with b != a^T the product is not symmetric, so what the symmetric mode keeps is visible: the lower triangle
    # of a @ b, diagonal tiles included, mirrored bitwise into the upper one
    a, b = rand(37, 19, seed=4), rand(19, 37, seed=5)
    k = kmatmul.matmul(a, b, symmetric=True, blocks={"BLOCK_M": 16, "BLOCK_N": 16})
    assert torch.equal(k, k.T)
    exact = torch.tril(a.double() @ b.double())
    exact = exact + torch.tril(exact, -1).T
    close_to_exact(k, exact.float(), exact, 2e-5)


def test_gram_of_a_transposed_view_and_bf16_is_fp32():
    x = rand(23, 41, seed=3)
    close_to_exact(kgram.gram(x.T, 0.5), reference.gram(x.T, 0.5), reference.gram(x.T.double(), 0.5), 2e-5)


@pytest.mark.parametrize("k_slices", [1, 3])
def test_matmul_strides_k_slices_accumulate_and_poisoned_output(k_slices):
    a, b = rand(50, 33, seed=1), rand(41, 33, seed=2).T            # b is a transposed view
    out = torch.full((k_slices, 50, 41) if k_slices > 1 else (50, 41), float("nan"), device=DEVICE)
    kmatmul.matmul(a, b, out=out, alpha=2.0, k_slices=k_slices)
    total = out.sum(0) if k_slices > 1 else out
    exact = 2.0 * a.double() @ b.double()
    close_to_exact(total, (2.0 * a @ b), exact, 2e-5)
    kmatmul.matmul(a, b, out=out, alpha=-1.0, k_slices=k_slices, accumulate=True)
    total = out.sum(0) if k_slices > 1 else out
    close_to_exact(total, a @ b, a.double() @ b.double(), 2e-5)


# ----------------------------------------------------------------------------------------------- cholesky
def spd(n, dtype, seed=0, lam=0.1):
    x = rand(n, n + 5, dtype=torch.float64, seed=seed)
    return (x @ x.T + lam * torch.eye(n, dtype=torch.float64, device=DEVICE)).to(dtype)


@pytest.mark.parametrize("n", [29, 37, 83])   # 2, 3 and 6 blocks of 16: the look-ahead crosses several
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_and_solve_match_float64(n, dtype):
    a = spd(n, dtype, seed=n)
    factor, info = kchol.cholesky(a, block=16)
    assert int(info) == 0 and factor.dtype == dtype
    assert torch.equal(torch.triu(factor, 1), torch.zeros_like(factor))
    exact = torch.linalg.cholesky(a.double())
    close_to_exact(factor, torch.linalg.cholesky(a), exact, tol_for(dtype))
    b = rand(n, 21, dtype=dtype, seed=7)
    x = kchol.cholesky_solve(b, factor, block=16, block_rhs=16)
    exact_x = torch.cholesky_solve(b.double(), exact)
    close_to_exact(x, torch.cholesky_solve(b, torch.linalg.cholesky(a)), exact_x, tol_for(dtype) * 10)


def test_cholesky_default_blocks_single_block():
    a = spd(13, torch.float32, seed=5)
    factor, info = kchol.cholesky(a)
    close_to_exact(factor, torch.linalg.cholesky(a), torch.linalg.cholesky(a.double()), 2e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("case", ["negative_in_second_block", "negative_definite", "nan", "indefinite"])
def test_cholesky_reports_the_first_bad_pivot_like_lapack(case):
    n = 40
    if case == "negative_in_second_block":
        a = torch.eye(n, device=DEVICE)
        a[20, 20] = -1.0
        a[33, 33] = -1.0
    elif case == "negative_definite":
        a = -spd(n, torch.float32, seed=1)
    elif case == "nan":
        a = spd(n, torch.float32, seed=2)
        a[17, 17] = float("nan")
    else:
        a = spd(n, torch.float32, seed=3)
        a[25, 24] = a[24, 25] = 1e4   # 2x2 minor at (24, 25) indefinite
    _, info = kchol.cholesky(a, block=16)
    _, expected = torch.linalg.cholesky_ex(a.cpu())
    assert int(info) == int(expected) > 0


# ----------------------------------------------------------------------------------------------- ridge
@pytest.fixture(params=["fused", "blocked"])
def ridge_path(request, monkeypatch):
    """Run a ridge test through the one-launch small-system kernel and through the blocked Cholesky path."""
    monkeypatch.setattr(ksmall, "MAX_SIZE", max(ksmall.LIMITS.values()) if request.param == "fused" else 0)
    return request.param


def small_system(n, r, k, dtype, lam, seed):
    """s (n, r), b (n, k) and the float64 solution of (s s^T + lam I) x = b with its factor."""
    s = rand(n, r, dtype=dtype, seed=seed)
    b = rand(n, k, dtype=dtype, seed=seed + 1)
    a = s.double() @ s.double().T + lam * torch.eye(n, dtype=torch.float64, device=DEVICE)
    factor = torch.linalg.cholesky(a)
    return s, b, factor, torch.cholesky_solve(b.double(), factor)


@pytest.mark.parametrize("n,r,k", [(1, 19, 3), (17, 37, 40), (64, 23, 5), ("limit", 130, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("project", [True, False])
def test_small_ridge_one_launch_matches_float64(n, r, k, dtype, project):
    if n == "limit":   # the largest size class the kernel accepts for this dtype, with a masked tail
        n = ksmall.size_limit(dtype) - 5
    lam = 0.3
    s, b, factor_ex, x_ex = small_system(n, r, k, dtype, lam, seed=n)
    exact = s.double().T @ x_ex if project else x_ex
    # the torch path in the kernel's compute precision, as the reference of the attainable error
    ref_dt = torch.float64 if dtype == torch.float64 else torch.float32
    s_ref, b_ref = s.to(ref_dt), b.to(ref_dt)
    factor_ref = torch.linalg.cholesky(s_ref @ s_ref.T + lam * torch.eye(n, dtype=ref_dt, device=DEVICE))
    x_ref = torch.cholesky_solve(b_ref, factor_ref)
    out, factor, info = ksmall.small_ridge_solve(s, b, lam, project)
    assert int(info) == 0 and out.shape == exact.shape and factor.shape == (n, n)
    assert out.dtype == factor.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.triu(factor, 1), torch.zeros_like(factor))
    tol = tol_for(dtype) * 10
    close_to_exact(factor, factor_ref, factor_ex, tol)
    close_to_exact(out, s_ref.T @ x_ref if project else x_ref, exact, tol)


@pytest.mark.parametrize("need_phi,need_y", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_ridge_backward_one_launch_matches_float64(need_phi, need_y, dtype):
    m, d, num_classes, lam = 23, 45, 40, 0.7           # two right-hand-side tiles of 32, feature tails
    phi = rand(m, d, dtype=dtype, seed=21)
    y = rand(m, num_classes, dtype=dtype, seed=22)
    g = rand(d, num_classes, dtype=dtype, seed=23)
    w_ref, factor_ref, _ = reference.ridge_forward(phi, y, lam, "dual")
    w_ex, factor_ex, _ = reference.ridge_forward(phi.double(), y.double(), lam, "dual")
    _, factor, info = ksmall.small_ridge_solve(phi, y, lam, project=True)
    assert int(info) == 0
    gp, gy = ksmall.small_ridge_backward(phi, y, factor, g, need_phi, need_y)
    gp_ref, gy_ref = reference.ridge_backward(phi, y, w_ref, factor_ref, g, "dual", need_phi, need_y)
    gp_ex, gy_ex = reference.ridge_backward(phi.double(), y.double(), w_ex, factor_ex, g.double(), "dual",
                                            need_phi, need_y)
    assert (gp is None) == (not need_phi) and (gy is None) == (not need_y)
    tol = tol_for(dtype) * 10
    if need_phi:
        close_to_exact(gp, gp_ref, gp_ex, tol)
    if need_y:
        close_to_exact(gy, gy_ref, gy_ex, tol)
    assert ksmall.small_ridge_backward(phi, y, factor, g, False, False) == (None, None)
    with pytest.raises(ValueError, match="grad_w"):
        ksmall.small_ridge_backward(phi, y, factor, g[:, :-1], True, True)


def test_matmul_low_halves_must_match_their_main_part():
    a, b = rand(5, 7), rand(7, 3)
    with pytest.raises(ValueError, match="b_lo must match"):
        kmatmul.matmul(a, b, b_lo=rand(3, 7).T)               # same shape, other strides
    with pytest.raises(ValueError, match="a_lo must match"):
        kmatmul.matmul(a, b, a_lo=rand(5, 7, dtype=torch.float64))


def test_small_ridge_strided_mixed_inputs_and_lam_edges():
    s = rand(41, 23, seed=3).T                  # (23, 41) transposed view
    b = rand(23, 9, dtype=torch.bfloat16, seed=4)
    for lam in (1e-7, 1e3):
        a = s.double() @ s.double().T + lam * torch.eye(23, dtype=torch.float64, device=DEVICE)
        x_ex = torch.linalg.solve(a, b.double())
        out, factor, info = ksmall.small_ridge_solve(s, b, lam, project=False)
        assert int(info) == 0
        x_ref = torch.linalg.solve(a.float(), b.float())
        close_to_exact(out, x_ref, x_ex, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_ridge_refuses_systems_above_its_dtype_limit(dtype):
    n = ksmall.size_limit(dtype) + 1
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=f"small_ridge_solve: systems of size <= {n - 1} in {name}.*got {n}"):
        ksmall.small_ridge_solve(rand(n, 4, dtype=dtype), rand(n, 2, dtype=dtype), 1.0, project=False)
    phi, y, factor = rand(n, 4, dtype=dtype), rand(n, 2, dtype=dtype), torch.eye(n, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=f"small_ridge_backward: systems of size <= {n - 1} in {name}"):
        ksmall.small_ridge_backward(phi, y, factor, rand(4, 2, dtype=dtype), True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_sends_a_system_above_the_dtype_limit_to_the_blocked_path(dtype, monkeypatch):
    """With MAX_SIZE above the kernel's limit for this dtype, a system at the limit still takes the one-launch kernel
    and one past it the blocked path; both match float64."""
    monkeypatch.setattr(ksmall, "MAX_SIZE", 10 * ksmall.size_limit(dtype))
    calls = []
    for name in ("small_ridge_solve", "small_ridge_backward"):
        real = getattr(ksmall, name)
        monkeypatch.setattr(ksmall, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    for n, fused in ((ksmall.size_limit(dtype), True), (ksmall.size_limit(dtype) + 3, False)):
        calls.clear()
        phi, y, g = rand(n, 9, dtype=dtype, seed=1), rand(n, 3, dtype=dtype, seed=2), rand(9, 3, dtype=dtype, seed=3)
        w, factor, info = kbackend.ridge_forward(phi, y, 0.5, "dual")
        gp, gy = kbackend.ridge_backward(phi, y, w, factor, g, "dual", True, True)
        assert int(info) == 0 and calls == (["small_ridge_solve", "small_ridge_backward"] if fused else [])
        w_ex, factor_ex, _ = reference.ridge_forward(phi.double(), y.double(), 0.5, "dual")
        gp_ex, gy_ex = reference.ridge_backward(phi.double(), y.double(), w_ex, factor_ex, g.double(), "dual",
                                                True, True)
        w_ref, factor_ref, _ = reference.ridge_forward(phi, y, 0.5, "dual")
        gp_ref, gy_ref = reference.ridge_backward(phi, y, w_ref, factor_ref, g, "dual", True, True)
        for fast, ref, exact in ((w, w_ref, w_ex), (gp, gp_ref, gp_ex), (gy, gy_ref, gy_ex)):
            close_to_exact(fast, ref, exact, tol_for(dtype) * 10)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("case", ["negative_lam", "nan", "singular_row"])
def test_small_ridge_reports_the_first_bad_pivot_like_lapack(case):
    n, r = 37, 45
    s = rand(n, r, dtype=torch.float64, seed=5)
    lam = 0.5
    if case == "negative_lam":
        s[:20] *= 10.0                              # rows 0..19 dominate: the first bad pivot is past them
        lam = -4.0 * r
    elif case == "nan":
        s[23, 7] = float("nan")
    else:
        s[30] = 0.0                                 # a zero row with lam = 0: an exactly zero pivot at row 31
        lam = 0.0
    a = s @ s.T + lam * torch.eye(n, dtype=torch.float64, device=DEVICE)
    _, expected = torch.linalg.cholesky_ex(a.cpu())
    _, _, info = ksmall.small_ridge_solve(s, rand(n, 3, dtype=torch.float64), lam, project=True)
    assert int(info) == int(expected) > 0


RIDGE_CASES = [(29, 19, 7, "primal"), (29, 19, 7, "dual"), (13, 37, 5, "dual"), (13, 37, 5, "primal")]


@pytest.mark.parametrize("m,d,num_classes,mode", RIDGE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [0.3, 1e3])
def test_ridge_forward_backward_match_reference_and_float64(ridge_path, m, d, num_classes, mode, dtype, lam):
    phi = rand(m, d, dtype=dtype, seed=m)
    y = rand(m, num_classes, dtype=dtype, seed=d)
    w, factor, info = kbackend.ridge_forward(phi, y, lam, mode)
    assert int(info) == 0
    w_ref, factor_ref, _ = reference.ridge_forward(phi, y, lam, mode)
    w_ex, factor_ex, _ = reference.ridge_forward(phi.double(), y.double(), lam, mode)
    tol = tol_for(dtype) * 10
    close_to_exact(w, w_ref, w_ex, tol)
    close_to_exact(factor, factor_ref, factor_ex, tol)
    g = rand(d, num_classes, dtype=dtype, seed=11)
    gp, gy = kbackend.ridge_backward(phi, y, w, factor, g, mode, True, True)
    gp_ref, gy_ref = reference.ridge_backward(phi, y, w_ref, factor_ref, g, mode, True, True)
    gp_ex, gy_ex = reference.ridge_backward(phi.double(), y.double(), w_ex, factor_ex, g.double(), mode, True, True)
    close_to_exact(gp, gp_ref, gp_ex, tol)
    close_to_exact(gy, gy_ref, gy_ex, tol)
    assert kbackend.ridge_backward(phi, y, w, factor, g, mode, False, False) == (None, None)


def test_ridge_low_precision_inputs_and_tiny_lam(ridge_path):
    phi = rand(13, 37, dtype=torch.float16, seed=4)
    y = rand(13, 5, dtype=torch.float16, seed=5)
    w, factor, info = kbackend.ridge_forward(phi, y, 1e-6, "dual")
    assert int(info) == 0 and w.dtype == torch.float32
    w_ref, _, _ = reference.ridge_forward(phi, y, 1e-6, "dual")
    w_ex, _, _ = reference.ridge_forward(phi.double(), y.double(), 1e-6, "dual")
    close_to_exact(w, w_ref, w_ex, 1e-4)


# ----------------------------------------------------------------------------------------------- linear CE
CE_SHAPE = (37, 19, 23)   # N, d, C: tails in every dimension with 16-wide tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("tau", [0.03, 1.0, 50.0])
def test_linear_ce_forward_backward_match_float64(dtype, tau):
    n, d, num_classes = CE_SHAPE
    x = rand(n, d, dtype=dtype, seed=1)
    w = rand(d, num_classes, dtype=dtype, seed=2, scale=0.5)
    t = labels(n, num_classes, ignore=(3, 36))
    loss, lse = kce.linear_ce_forward(x, w, t, tau, -100, 16, blocks=SMALL)
    loss_ref, lse_ref = reference.linear_ce_forward(x, w, t, tau, -100, 16)
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, tau, -100, 16)
    tol = tol_for(dtype) * 10
    close_to_exact(loss, loss_ref, loss_ex, tol)
    close_to_exact(lse, lse_ref, lse_ex, tol)
    assert loss[3] == 0 and loss[36] == 0
    grad_rows = rand(n, dtype=lse.dtype, seed=9).abs() * (t != -100)
    gx, gw = kce.linear_ce_backward(x, w, t, tau, lse, grad_rows, -100, 16, True, True, blocks=SMALL, k_slices=2)
    gx_ref, gw_ref = reference.linear_ce_backward(x, w, t, tau, lse_ref, grad_rows, -100, 16, True, True)
    gx_ex, gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, tau, lse_ex, grad_rows.double(),
                                                -100, 16, True, True)
    close_to_exact(gx, gx_ref, gx_ex, tol)
    close_to_exact(gw, gw_ref, gw_ex, tol)
    assert torch.all(gx[3] == 0)


@pytest.mark.parametrize("need_x,need_w", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("chunk_size", [1000, 16, 5])
def test_linear_ce_backward_flags_and_chunking(need_x, need_w, chunk_size):
    n, d, num_classes = CE_SHAPE
    x, w, t = rand(n, d, seed=3), rand(d, num_classes, seed=4, scale=0.3), labels(n, num_classes, seed=2)
    _, lse = reference.linear_ce_forward(x, w, t, 0.7, -100, n)
    grad_rows = torch.full((n,), 1.0 / n, device=DEVICE)
    gx, gw = kce.linear_ce_backward(x, w, t, 0.7, lse, grad_rows, -100, chunk_size, need_x, need_w,
                                    blocks=SMALL, k_slices=3)
    gx_ref, gw_ref = reference.linear_ce_backward(x, w, t, 0.7, lse, grad_rows, -100, n, need_x, need_w)
    gx_ex, gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, 0.7, lse.double(), grad_rows.double(),
                                                -100, n, need_x, need_w)
    assert (gx is None) == (not need_x) and (gw is None) == (not need_w)
    if need_x:
        close_to_exact(gx, gx_ref, gx_ex, 2e-5)
    if need_w:
        close_to_exact(gw, gw_ref, gw_ex, 2e-5)


def test_linear_ce_default_tiles_mixed_dtypes_and_strided_inputs():
    n, d, num_classes = CE_SHAPE
    x = rand(d, n, dtype=torch.float16, seed=5).T                     # fp16 features, transposed view
    w = rand(d, num_classes, seed=6, scale=0.3)                         # fp32 weights: fp32 ieee path
    t = labels(n, num_classes, seed=3).int()
    loss, lse = kce.linear_ce_forward(x, w, t, 0.5, -100, 8)
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, 0.5, -100, 8)
    close_to_exact(loss, reference.linear_ce_forward(x, w, t, 0.5, -100, 8)[0], loss_ex, 1e-5)
    gx, gw = kce.linear_ce_backward(x, w, t, 0.5, lse, torch.ones(n, device=DEVICE), -100, 8, True, True)
    gx_ex, gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, 0.5, lse_ex,
                                                torch.ones(n, dtype=torch.float64, device=DEVICE), -100, 8, True, True)
    gx_ref, gw_ref = reference.linear_ce_backward(x, w, t, 0.5, lse, torch.ones(n, device=DEVICE), -100, 8, True, True)
    close_to_exact(gx, gx_ref, gx_ex, 1e-5)
    close_to_exact(gw, gw_ref, gw_ex, 1e-5)


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
    """The error bound of the bf16-x / fp32-w CE path (README, "Linear softmax CE"), evaluated on the data.

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
        assert (split_err <= b["split_bound"][name]).all(), f"{name}: the split exceeds its documented bound"
        err = (fast.double() - exact).abs()
        excess = (err - split_err - b["kernel_bound"][name]).max().item()
        assert excess <= 0, (f"{name}: error {err.max().item():.3g} exceeds the derived bound by {excess:.3g} "
                             f"(split part {split_err.max().item():.3g})")
    valid = t != -100
    mean_err = (loss.double()[valid].mean() - b["exact"]["loss"][valid].mean()).abs()
    assert mean_err <= (b["split_bound"]["loss"] + b["kernel_bound"]["loss"])[valid].mean()


@pytest.mark.parametrize("mode", ["auto", "ieee", "tf32"])
def test_linear_ce_bf16_x_fp32_w_splits_w_into_bf16_halves(mode, monkeypatch):
    """bf16 features with an fp32 probe (the bf16 pipeline): by default w enters as hi + lo bf16 halves on tensor
    cores, within the split's derived error bound of float64; CLPDD_CE_PRECISION=ieee/tf32 keeps fp32 operands."""
    monkeypatch.setenv("CLPDD_CE_PRECISION", mode)
    calls = []
    real_split = kce.split_bf16
    monkeypatch.setattr(kce, "split_bf16", lambda t: calls.append(t.shape) or real_split(t))
    n, d, num_classes = CE_SHAPE
    x = rand(n, d, dtype=torch.bfloat16, seed=7)
    w = rand(d, num_classes, seed=8, scale=0.3)
    t = labels(n, num_classes, seed=4, ignore=(3,))
    g = rand(n, seed=9).abs() * (t != -100)
    tau = 0.05                                  # logits of ~100: the split's ~2^-17 relative error shows most here
    loss, lse = kce.linear_ce_forward(x, w, t, tau, -100, 8, blocks=SMALL)
    gx, gw = kce.linear_ce_backward(x, w, t, tau, lse, g, -100, 8, True, True, blocks=SMALL, k_slices=3)
    assert len(calls) == (2 if mode == "auto" else 0)
    if mode == "auto":
        assert_within_split_bound(loss, gx, gw, x, w, t, tau, g)
        return
    xd, wd = x.double(), w.double()
    loss_ex, lse_ex = reference.linear_ce_forward(xd, wd, t, tau, -100, 8)
    gx_ex, gw_ex = reference.linear_ce_backward(xd, wd, t, tau, lse_ex, g.double(), -100, 8, True, True)
    gx_ref, gw_ref = reference.linear_ce_backward(x, w, t, tau, lse, g, -100, 8, True, True)
    tol = 1e-3 if mode == "tf32" else 1e-5     # tf32 products are ~2^-11 relative (the interpreter ignores it)
    close_to_exact(loss, reference.linear_ce_forward(x, w, t, tau, -100, 8)[0], loss_ex, tol)
    close_to_exact(gw, gw_ref, gw_ex, tol)
    close_to_exact(gx, gx_ref, gx_ex, tol)


def test_split_bf16_halves_reconstruct_fp32_and_bad_precision_setting_raises(monkeypatch):
    w = rand(19, 23, seed=3) * torch.logspace(-20, 20, 23, device=DEVICE)
    hi, lo = kce.split_bf16(w)
    assert torch.equal(hi.float(), w.to(torch.bfloat16).float())             # hi is w rounded to bf16
    assert torch.equal(lo.float(), lo.to(torch.bfloat16).float())            # lo is bf16 too
    rel = ((hi.double() + lo.double() - w.double()).abs() / w.double().abs()).max().item()
    assert 2.0**-18 < rel <= 2.0**-17                                         # the bound the README documents
    monkeypatch.setenv("CLPDD_CE_PRECISION", "fast")
    with pytest.raises(ValueError, match="CLPDD_CE_PRECISION"):
        kce.linear_ce_forward(rand(5, 3, dtype=torch.bfloat16), w[:3, :4], labels(5, 4), 1.0, -100, 8)


@triton.jit
def _round_to_bf16_probe(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    tl.store(dst_ptr + offs, kce._round_to_bf16(v), mask=offs < n)


def test_in_kernel_bf16_rounding_is_round_to_nearest_even_like_torch():
    v = rand(1000, seed=12) * torch.logspace(-30, 30, 1000, device=DEVICE)
    ties = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 2.0**-8 * 3], device=DEVICE)
    v = torch.cat([v, ties, torch.zeros(1, device=DEVICE)])
    out = torch.full_like(v, float("nan"))
    _round_to_bf16_probe[(triton.cdiv(v.numel(), 256),)](v, out, v.numel(), BLOCK=256)
    assert torch.equal(out, v.to(torch.bfloat16).float())


def test_linear_ce_backward_is_bitwise_reproducible():
    n, d, num_classes = CE_SHAPE
    x, w, t = rand(n, d, seed=7), rand(d, num_classes, seed=8), labels(n, num_classes, seed=4)
    _, lse = kce.linear_ce_forward(x, w, t, 1.0, -100, n, blocks=SMALL)
    g = torch.ones(n, device=DEVICE)
    first = kce.linear_ce_backward(x, w, t, 1.0, lse, g, -100, 16, True, True, blocks=SMALL)
    second = kce.linear_ce_backward(x, w, t, 1.0, lse, g, -100, 16, True, True, blocks=SMALL)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ----------------------------------------------------------------------------------------------- public ops
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_linear_softmax_ce_triton_matches_torch(reduction):
    n, d, num_classes = CE_SHAPE
    results = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
        x = rand(n, d, dtype=dtype, seed=1).requires_grad_()
        w = rand(d, num_classes, dtype=dtype, seed=2, scale=0.5).requires_grad_()
        t = labels(n, num_classes, ignore=(0, 5))
        loss = ops.linear_softmax_ce(x, w, t, tau=0.2, reduction=reduction, chunk_size=16, backend=backend)
        (loss.sum() if reduction == "none" else loss).backward()
        results[backend, dtype] = (loss.detach(), x.grad, w.grad)
    for fast, ref, exact in zip(results["triton", torch.float32], results["torch", torch.float32],
                                results["torch", torch.float64]):
        close_to_exact(fast, ref, exact, 1e-5)


@pytest.mark.parametrize("mode", ["dual", "primal"])
def test_public_ridge_solve_and_gram_triton_match_torch(ridge_path, mode):
    results = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
        phi = rand(29, 19, dtype=dtype, seed=2).requires_grad_()
        y = rand(29, 7, dtype=dtype, seed=3).requires_grad_()
        w = ops.ridge_solve(phi, y, 0.7, mode, backend=backend)
        k = ops.gram(phi, 0.1, backend=backend)
        ((w * rand(19, 7, dtype=dtype, seed=4)).sum() + (k * k).sum() * 1e-3).backward()
        results[backend, dtype] = (w.detach(), k.detach(), phi.grad, y.grad)
    for fast, ref, exact in zip(results["triton", torch.float32], results["torch", torch.float32],
                                results["torch", torch.float64]):
        close_to_exact(fast, ref, exact, 1e-5)


@pytest.mark.parametrize("real_dtype", [torch.float32, torch.bfloat16])   # bf16: the --precision bf16 pipeline
def test_public_clpdd_loss_triton_matches_torch(ridge_path, real_dtype):
    out = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.float32), ("torch", torch.float64)):
        phi_s = rand(10, 19, dtype=dtype, seed=1).requires_grad_()
        y_s = torch.arange(10, device=DEVICE) % 5
        # real features rounded to real_dtype first, so that every backend sees the same values
        phi_r, y_r = rand(37, 19, dtype=real_dtype, seed=2), labels(37, 5)
        phi_r = phi_r if dtype == torch.float32 else phi_r.to(dtype)
        loss = ops.clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.3, tau=0.05, num_classes=5, backend=backend)
        loss.backward()
        out[backend, dtype] = (loss.detach(), phi_s.grad)
    for fast, ref, exact in zip(out["triton", torch.float32], out["torch", torch.float32],
                                out["torch", torch.float64]):
        close_to_exact(fast, ref, exact, 1e-5)


@pytest.mark.parametrize("mode", ["dual", "primal"])
def test_ridge_gradcheck_through_the_triton_backend(ridge_path, mode):
    """Finite differences against the kernels' own backward (fp64), not only against the torch backward
    (fast_mode: random directional derivatives, a few interpreted launches instead of one per input)."""
    phi = rand(5, 4, dtype=torch.float64, seed=31).requires_grad_()
    y = rand(5, 3, dtype=torch.float64, seed=32).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, t: ops.ridge_solve(p, t, 0.45, mode, backend="triton"), (phi, y),
                                    fast_mode=True)


def test_linear_ce_gradcheck_through_the_triton_backend():
    x = rand(7, 4, dtype=torch.float64, seed=33).requires_grad_()
    w = rand(4, 5, dtype=torch.float64, seed=34).requires_grad_()
    t = labels(7, 5, ignore=(2,))
    assert torch.autograd.gradcheck(lambda a, b: ops.linear_softmax_ce(a, b, t, 0.7, "mean", 3, backend="triton"),
                                    (x, w), fast_mode=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
def test_public_ridge_solve_raises_not_positive_definite_on_overflowing_features(ridge_path):
    phi = torch.full((6, 5), 1e20, device=DEVICE)        # the Gram matrix overflows: inf / NaN pivots
    y = rand(6, 3)
    for backend in ("torch", "triton"):
        with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
            ops.ridge_solve(phi, y, 1e-3, "dual", backend=backend)


def test_triton_path_never_calls_torch_linalg_or_cross_entropy(ridge_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path called a torch routine it replaces")
    for owner, name in [(torch.linalg, "cholesky"), (torch.linalg, "cholesky_ex"), (torch, "cholesky_solve"),
                        (torch.linalg, "solve_triangular"), (torch.linalg, "solve"), (torch.linalg, "inv"),
                        (torch, "logsumexp"), (torch.Tensor, "logsumexp"), (torch, "cholesky"),
                        (torch.nn.functional, "cross_entropy"), (torch.nn.functional, "log_softmax"),
                        (torch.nn.functional, "softmax"), (torch, "log_softmax"), (torch, "softmax")]:
        monkeypatch.setattr(owner, name, boom)
    phi_s = rand(10, 19, seed=1).requires_grad_()
    y_s = torch.arange(10, device=DEVICE) % 5
    phi_r, y_r = rand(37, 19, seed=2), labels(37, 5)
    loss = ops.clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.3, tau=0.5, num_classes=5, backend="triton")
    loss.backward()
    k = ops.gram(phi_s, 0.1, backend="triton")
    assert torch.isfinite(loss) and torch.isfinite(phi_s.grad).all() and torch.isfinite(k).all()
    with pytest.raises(AssertionError, match="replaces"):
        ops.clpdd_loss(phi_s, y_s, phi_r, y_r, lam=0.3, num_classes=5, backend="torch")


# ----------------------------------------------------------------------------------------------- GPU only
@gpu_only
def test_gpu_bf16_linear_ce_and_ridge():
    n, d, num_classes = 4099, 768, 1000
    x = rand(n, d, dtype=torch.bfloat16, seed=1)
    w = rand(d, num_classes, dtype=torch.bfloat16, seed=2, scale=0.05)
    t = labels(n, num_classes, ignore=(7,))
    loss, lse = kbackend.linear_ce_forward(x, w, t, 0.1, -100, 4096)
    loss_ex, lse_ex = reference.linear_ce_forward(x.double(), w.double(), t, 0.1, -100, 4096)
    torch.testing.assert_close(loss.double(), loss_ex, rtol=1e-4, atol=1e-3)
    g = torch.full((n,), 1.0 / n, device=DEVICE) * (t != -100)
    gx, gw = kbackend.linear_ce_backward(x, w, t, 0.1, lse, g, -100, 4096, True, True)
    gx_ex, gw_ex = reference.linear_ce_backward(x.double(), w.double(), t, 0.1, lse_ex, g.double(), -100, 4096,
                                                True, True)
    # bf16 coefficients: ~2^-9 relative per term (replayed in float64 with this data: 0.2 of these tolerances; a
    # truncating tensor-core adder, modelled, uses 0.01 of the loss tolerance above)
    assert (gw.double() - gw_ex).abs().max() <= 1e-2 * gw_ex.abs().max()
    assert (gx.double() - gx_ex).abs().max() <= 1e-2 * gx_ex.abs().max()
    # bf16 x with an fp32 w: w split into bf16 halves (2^-17 relative), within the split's derived bound. With
    # this data the float64 replay of the split uses at most 0.72 of the split part (dX; 0.04 loss, 0.02 dW: exact
    # arithmetic, so no chance involved); the whole path run by the interpreter on the CPU 0.21 of the kernel part
    # (0.007 loss); a model of a truncating tensor-core adder without guard bits 0.15 (loss), 0.09 (dX).
    w32 = rand(d, num_classes, seed=2, scale=0.05)
    loss, lse = kbackend.linear_ce_forward(x, w32, t, 0.1, -100, 4096)
    gx, gw = kbackend.linear_ce_backward(x, w32, t, 0.1, lse, g, -100, 4096, True, True)
    assert_within_split_bound(loss, gx, gw, x, w32, t, 0.1, g)
    phi = rand(1000, 768, dtype=torch.bfloat16, seed=3)
    y = torch.nn.functional.one_hot(torch.arange(1000, device=DEVICE) % 100, 100).to(torch.bfloat16)
    for mode in ("dual", "primal"):
        w_t, _, info = kbackend.ridge_forward(phi, y, 10.0, mode)
        w_ex, _, _ = reference.ridge_forward(phi.double(), y.double(), 10.0, mode)
        assert int(info) == 0
        assert (w_t.double() - w_ex).abs().max() <= 1e-3 * w_ex.abs().max()


@gpu_only
def test_gpu_large_shapes_bitwise_determinism_and_memory():
    n, d, num_classes = 200_003, 768, 1000
    x = rand(n, d, dtype=torch.bfloat16, seed=4)
    t = labels(n, num_classes)
    g = torch.full((n,), 1.0 / n, device=DEVICE)
    for w_dtype in (torch.bfloat16, torch.float32):   # bf16 pair, and bf16 x with fp32 w (split into halves)
        w = rand(d, num_classes, dtype=w_dtype, seed=5, scale=0.05)
        loss, lse = kbackend.linear_ce_forward(x, w, t, 0.1, -100, 16384)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _, gw1 = kbackend.linear_ce_backward(x, w, t, 0.1, lse, g, -100, 16384, False, True)
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < 100 * 2**20, f"backward ({w_dtype}) used {extra / 2**20:.1f} MiB beyond its inputs"
        _, gw2 = kbackend.linear_ce_backward(x, w, t, 0.1, lse, g, -100, 16384, False, True)
        assert torch.equal(gw1, gw2), f"two runs must give bitwise-identical dW ({w_dtype})"
        if w_dtype == torch.float32:   # the split's derived bound (float64 row blocks of ~3 GB); the fp32 torch
            # comparison it replaces had no derivation: a float64 replay of the split alone used 0.38 of rtol=atol=1e-4
            for s in range(0, n, 50_000):
                assert_within_split_bound(loss[s:s + 50_000], None, None, x[s:s + 50_000], w, t[s:s + 50_000], 0.1)
        else:
            loss_ref, _ = reference.linear_ce_forward(x, w, t, 0.1, -100, 16384)
            torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    a = spd(1000, torch.float32, seed=6)
    f1, _ = kchol.cholesky(a)
    f2, _ = kchol.cholesky(a)
    assert torch.equal(f1, f2)


@gpu_only
def test_gpu_int64_row_offsets_beyond_2_pow_31_elements():
    d, num_classes = 768, 16
    n = (2**31) // d + 4099                                # n * d > 2^31: int32 offsets would wrap
    try:
        x = torch.empty((n, d), dtype=torch.bfloat16, device=DEVICE)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x[: n - 64].zero_()
    x[n - 64:] = rand(64, d, dtype=torch.bfloat16, seed=1)
    w = rand(d, num_classes, dtype=torch.bfloat16, seed=2, scale=0.1)
    t = labels(n, num_classes)
    loss, _ = kbackend.linear_ce_forward(x, w, t, 1.0, -100, 1 << 20)
    tail, _ = reference.linear_ce_forward(x[n - 64:], w, t[n - 64:], 1.0, -100, 64)
    torch.testing.assert_close(loss[n - 64:], tail, rtol=1e-4, atol=1e-4)


def test_triton_version_is_recent_enough():
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    assert (major, minor) >= (3, 0)


# Every variant the backend can dispatch (derived by clpdd_fast.kernels.aot from the launchers and their constants:
# dtypes, paths, size classes, constexpr flags), compiled for sm_90 with Triton's compiler and assembled with ptxas -v;
# fails on a shared-memory overflow (Hopper: 227 KB per block) or a register spill in a dispatched kernel.
AOT_SCRIPT = r"""
import os, sys
from clpdd_fast.kernels import aot
sys.exit(aot.main(["--arch", "90", "--jobs", str(os.cpu_count() or 1)]))
"""


@pytest.mark.skipif(os.environ.get("CLPDD_AOT_CHECK") != "1", reason="set CLPDD_AOT_CHECK=1: compiles every kernel "
                    "variant for sm_90 without a GPU (2-5 minutes on 2 cores), catching what the interpreter accepts "
                    "but the GPU would not: compile errors, shared memory beyond Hopper's, register spills")
def test_kernels_compile_ahead_of_time_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout)   # the resource table (pytest -s or -rP shows it)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
