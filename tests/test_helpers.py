"""tests/helpers.py: a failing comparison names the worst element."""
import pytest
import torch

from helpers import close_to_exact, rand


def test_close_to_exact_names_the_worst_element():
    exact = rand(4, 3, dtype=torch.float64, seed=1, device="cpu")
    ref = exact.float()
    close_to_exact(ref, ref, exact, 1e-6)
    fast = ref.clone()
    fast[2, 1] += 1e-3
    fast[0, 2] += 5e-4
    expected = f"at \\(2, 1\\): got {fast[2, 1].item():.10g}, expected {exact[2, 1].item():.10g} \\(float64\\)"
    with pytest.raises(AssertionError, match=f"max error 0.001 {expected}; bound .* tol 1e-06"):
        close_to_exact(fast, ref, exact, 1e-6)
