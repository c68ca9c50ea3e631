"""kernels/matmul.py (the strided matmul) and kernels/gram.py against float64, under Triton's interpreter on CPU
tensors without CUDA (tests/conftest.py sets TRITON_INTERPRET=1), compiled with CUDA.

Shapes are small and odd so that every dimension has a masked tail; tiles are >= 16 (GPU tl.dot minimum).
"""
import pytest
import torch

from helpers import DEVICE, check_kernels_can_run, close_to_exact, rand, tol_for

check_kernels_can_run()

from clpdd_fast import reference  # noqa: E402
from clpdd_fast.kernels import gram as kgram  # noqa: E402
from clpdd_fast.kernels import matmul as kmatmul  # noqa: E402


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


def test_matmul_low_halves_must_match_their_main_part():
    a, b = rand(5, 7), rand(7, 3)
    with pytest.raises(ValueError, match="b_lo must match"):
        kmatmul.matmul(a, b, b_lo=rand(7, 4))                  # other shape
    with pytest.raises(ValueError, match="a_lo must match"):
        kmatmul.matmul(a, b, a_lo=rand(5, 7, dtype=torch.float64))


@pytest.mark.parametrize("k_slices", [1, 2])
def test_matmul_pairs_take_their_low_halves_at_their_own_strides(k_slices):
    """a @ b + a @ b_lo + a_lo @ b with the low halves laid out apart from the high ones (a transposed view, a row
    stride wider than the row): each read at its own strides, against float64, in every output tile and K slice."""
    a, b = rand(37, 45, seed=4), rand(45, 29, seed=5)
    a_lo = rand(45, 37, seed=6).T * 1e-3                       # strides (1, 37) against a's (45, 1)
    b_lo = (rand(45, 48, seed=7) * 1e-3)[:, :29]               # row stride 48 against b's 29
    out = torch.full((k_slices, 37, 29) if k_slices > 1 else (37, 29), float("nan"), device=DEVICE)
    kmatmul.matmul(a, b, out=out, k_slices=k_slices, a_lo=a_lo, b_lo=b_lo, blocks={"BLOCK_M": 16, "BLOCK_N": 16,
                                                                                    "BLOCK_K": 16})
    total = out.sum(0) if k_slices > 1 else out
    ad, bd = a.double(), b.double()
    exact = ad @ bd + ad @ b_lo.double() + a_lo.double() @ bd
    close_to_exact(total, a @ b + a @ b_lo + a_lo @ b, exact, 2e-5)
