"""kernels/cholesky.py (blocked Cholesky and solve) against float64 and LAPACK's info, under Triton's interpreter on
CPU tensors without CUDA (tests/conftest.py sets TRITON_INTERPRET=1), compiled with CUDA."""
import pytest
import torch

from helpers import DEVICE, check_kernels_can_run, close_to_exact, rand, spd, tol_for

check_kernels_can_run()

from clpdd_fast.kernels import cholesky as kchol  # noqa: E402


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
