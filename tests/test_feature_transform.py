"""The feature normalisation of the probe, against its definition in numpy."""
import numpy as np
import pytest
import torch

from clpdd_fast.feature_transform import FeatureTransform


def feats(n, d, seed, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + offset  # a large common component, like raw CNN features


@pytest.mark.parametrize("norm", ["raw", "center", "l2", "center-l2"])
def test_transform_matches_its_definition(norm):
    real, x = feats(57, 9, 0), feats(11, 9, 1)
    t = FeatureTransform.fit(norm, real, chunk_rows=10)  # the mean is accumulated over several chunks
    expect = x.numpy().astype(np.float64)
    if norm.startswith("center"):
        expect = expect - real.numpy().astype(np.float64).mean(0)
    if norm.endswith("l2"):
        expect = expect / np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(t(x).numpy(), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.apply_chunked(x, chunk_rows=4, dtype=torch.float32).numpy(), t(x).numpy())


def test_transform_keeps_gradients():
    t = FeatureTransform.fit("center-l2", feats(20, 5, 2))
    x = feats(4, 5, 3).requires_grad_()
    t(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="features"):
        FeatureTransform.fit("zscore", feats(5, 3, 4))
