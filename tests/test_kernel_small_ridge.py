"""kernels/small_ridge.py (a small ridge system and its dual backward, one launch each) against float64 and LAPACK's
info, under Triton's interpreter on CPU tensors without CUDA (tests/conftest.py sets TRITON_INTERPRET=1), compiled
with CUDA."""
import pytest
import torch

from helpers import DEVICE, check_kernels_can_run, close_to_exact, rand, tol_for

check_kernels_can_run()

from clpdd_fast import reference  # noqa: E402
from clpdd_fast.kernels import small_ridge as ksmall  # noqa: E402


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
