"""benchmarks/precision_study.py: the emulated roundings (TF32 in three rounding modes, Triton's tf32x3 split, bf16)
against their definitions, and the emulated accuracy of the ridge solve's products that CLPDD_RIDGE_PRECISION offers:
tf32x3 within the ridge tests' tolerance of float64 where plain TF32 makes the factorisation fail. (The interpreter
ignores input_precision, so this emulation is what a machine without a GPU can check.)"""
import sys
from pathlib import Path

import pytest
import torch

from helpers import close_to_exact, rand, tol_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import precision_study as ps  # noqa: E402

from clpdd_fast import reference  # noqa: E402


def _bits(t):
    return t.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def test_tf32_rounding_modes_on_ties_and_carries():
    one, ulp = 1.0, 2.0**-10                        # a TF32 ulp at 1: 10 explicit mantissa bits
    t = torch.tensor([one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0**-23, -(one + ulp / 2), 2 - 2.0**-23])
    assert ps.round_tf32(t, "rne").tolist() == [one, one + 2 * ulp, one + ulp, -one, 2.0]
    assert ps.round_tf32(t, "rna").tolist() == [one + ulp, one + 2 * ulp, one + ulp, -(one + ulp), 2.0]
    assert ps.round_tf32(t, "rz").tolist() == [one, one + ulp, one, -one, 2 - ulp]
    with pytest.raises(ValueError, match="mode"):
        ps.round_tf32(t, "up")


@pytest.mark.parametrize("mode,bound", [("rne", 2.0**-11), ("rna", 2.0**-11), ("rz", 2.0**-10)])
def test_tf32_rounding_keeps_ten_mantissa_bits_within_its_error_bound(mode, bound):
    t = rand(4000, seed=3) * torch.logspace(-20, 20, 4000)
    r = ps.round_tf32(t, mode)
    assert (_bits(r) & 0x1FFF == 0).all()                            # the 13 low mantissa bits are gone
    err = (r.double() - t.double()).abs()
    assert (err <= bound * t.double().abs()).all() and err.max() > 0
    if mode == "rz":
        assert (r.abs() <= t.abs()).all()
    else:                                                            # nearest: no TF32 value is closer
        up = (_bits(r) + 0x2000).to(torch.int32).view(torch.float32)
        assert (err <= (up.double() - t.double()).abs()).all()


def test_bf16_split_of_the_ce_leaves_two_to_the_minus_17():
    w = rand(300, 70, seed=4, scale=0.05)
    hi, lo = ps._split(w)
    assert torch.equal(hi, ps.round_bf16(hi)) and torch.equal(lo, ps.round_bf16(lo))
    assert ((w.double() - hi.double() - lo.double()).abs() <= 2.0**-17 * w.double().abs()).all()


@pytest.mark.parametrize("precision", ["tf32x3", "tf32x3-triton"])
def test_tf32x3_products_are_about_as_accurate_as_fp32_and_tf32_is_not(precision):
    a, b = rand(64, 300, seed=5), rand(300, 48, seed=6)
    exact = a.double() @ b.double()
    err = {p: (ps.dot(a, b, p).double() - exact).abs().max().item() for p in ("ieee", "tf32", precision)}
    assert err[precision] <= 3 * err["ieee"]
    assert err["tf32"] >= 30 * err["ieee"]
    # Triton's order: small x big, + big x small, + big x big, from zero; the dropped small x small product is
    # about 2^-22 of a term
    terms = (a.double().abs() @ b.double().abs()).max().item()
    assert err[precision] <= 2.0**-19 * terms


def _features(m, d, seed):
    """m > d unit-norm rows with a common direction (centred and l2-normalised real features have the same kind of
    spectrum: a rank-d Gram matrix, so K = x x^T + lam I has its m - d smallest eigenvalues at lam)."""
    return torch.nn.functional.normalize(rand(m, d, seed=seed, device="cpu") + rand(1, d, seed=seed + 100,
                                                                                    device="cpu"), dim=1)


@pytest.mark.parametrize("mode", ["dual", "primal"])
@pytest.mark.parametrize("precision", ["tf32x3", "tf32x3-triton"])
def test_emulated_tf32x3_ridge_is_within_the_ridge_tolerance_where_tf32_fails(precision, mode):
    m, d, lam = 150, 40, 1e-4
    phi = _features(m, d, seed=1)
    y = torch.nn.functional.one_hot(torch.arange(m) % 10, 10).float()
    g = rand(d, 10, seed=7, device="cpu")
    w_ex, f_ex, _ = reference.ridge_forward(phi.double(), y.double(), lam, mode)
    gp_ex, _ = reference.ridge_backward(phi.double(), y.double(), w_ex, f_ex, g.double(), mode, True, False)
    w_ref, f_ref, _ = reference.ridge_forward(phi, y, lam, mode)
    gp_ref, _ = reference.ridge_backward(phi, y, w_ref, f_ref, g, mode, True, False)
    k, info, w, gp = ps.ridge(phi, y, g, lam, mode, precision)
    assert info == 0
    close_to_exact(w, w_ref, w_ex, tol_for(torch.float32) * 10)
    close_to_exact(gp, gp_ref, gp_ex, tol_for(torch.float32) * 10)
    if mode == "dual":
        k_tf32, info_tf32, _, _ = ps.ridge(phi, y, g, lam, mode, "tf32")
        assert info_tf32 > 0, "plain TF32 products: the blocked factorisation fails"
        # ... although the TF32 Gram matrix itself stays positive definite: it is the Gram matrix of the rounded
        # features, so its smallest eigenvalues stay at lam (the failure comes from the factorisation's updates)
        assert torch.linalg.eigvalsh(k_tf32.double()).min() > 0.9 * lam


def test_emulated_blocked_cholesky_and_solve_match_float64_in_ieee():
    a = reference.gram(_features(70, 90, seed=2), 0.3)             # m < d: well conditioned
    low, info, inverses = ps.cholesky(a, "ieee", block=16)
    assert info == 0
    close_to_exact(low, torch.linalg.cholesky(a), torch.linalg.cholesky(a.double()), 2e-5)
    b = rand(70, 9, seed=8, device="cpu")
    x = ps.cholesky_solve(b, low, inverses, "ieee", block=16)
    exact = torch.cholesky_solve(b.double(), torch.linalg.cholesky(a.double()))
    close_to_exact(x, torch.cholesky_solve(b, torch.linalg.cholesky(a)), exact, 2e-4)
