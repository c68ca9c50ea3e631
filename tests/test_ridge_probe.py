"""The ridge probe's accuracy, against a direct numpy computation."""
import numpy as np
import pytest
import torch

from clpdd_fast.feature_transform import FeatureTransform
from clpdd_fast.ridge_probe import ridge_probe_accuracy


def feats(n, d, seed, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + offset  # a large common component, like raw CNN features


def test_ridge_probe_accuracy_matches_numpy():
    train, test = feats(40, 6, 5, 0.0), feats(33, 6, 6, 0.0)
    y_train, y_test = torch.arange(40) % 3, torch.arange(33) % 3
    train[:, :3] += 2.0 * torch.nn.functional.one_hot(y_train, 3)  # make the classes partly separable
    test[:, :3] += 2.0 * torch.nn.functional.one_hot(y_test, 3)
    t = FeatureTransform.fit("center", train)
    got = ridge_probe_accuracy(train, y_train, test, y_test, 0.7, 3, t, chunk_rows=8)
    x, z = t(train).double().numpy(), t(test).double().numpy()
    w = np.linalg.solve(x.T @ x + 0.7 * np.eye(6), x.T @ np.eye(3)[y_train.numpy()])
    expect = float(((z @ w).argmax(1) == y_test.numpy()).mean())
    assert got == pytest.approx(expect) and 0.34 < got <= 1.0
