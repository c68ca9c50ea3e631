"""The ridge probe as a classifier: fit on one set of features, top-1 accuracy on another (the number `distill`
prints and `evaluate` reports next to the trained-head protocol)."""
from __future__ import annotations

import torch
from torch import Tensor

from clpdd_fast.feature_transform import FeatureTransform
from clpdd_fast.ops import ridge_solve
from clpdd_fast.reference import one_hot
from clpdd_fast.scan import SCAN_ROWS, row_blocks


@torch.no_grad()
def ridge_probe_accuracy(phi_train: Tensor, y_train: Tensor, phi_test: Tensor, y_test: Tensor, lam: float,
                         num_classes: int, transform: FeatureTransform, chunk_rows: int = SCAN_ROWS) -> float:
    """Top-1 accuracy on (phi_test, y_test) of the ridge probe fitted on (phi_train, y_train), one-hot targets."""
    x = transform(phi_train)
    w = ridge_solve(x, one_hot(y_train, num_classes, x.dtype), lam)
    correct = 0
    for rows in row_blocks(phi_test.shape[0], chunk_rows):
        pred = (transform(phi_test[rows]).to(w.device) @ w).argmax(1)
        correct += int((pred.cpu() == y_test[rows].cpu()).sum())
    return correct / phi_test.shape[0]
