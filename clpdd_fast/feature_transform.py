"""The feature normalisation applied alike to both sides of the ridge probe (synthetic and real features)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clpdd_fast.scan import SCAN_ROWS, row_blocks

FEATURE_NORMS = ("raw", "center", "l2", "center-l2")


@dataclass
class FeatureTransform:
    """phi -> (phi - mean) then optionally phi / ||phi||; differentiable, applied alike to synthetic and real features.

    `mean` is the mean real training feature (a constant), or None for no centring.
    """
    mean: Tensor | None = None
    l2: bool = False

    @classmethod
    def fit(cls, norm: str, real_features: Tensor, chunk_rows: int = SCAN_ROWS) -> "FeatureTransform":
        """Build the transform named `norm` (one of FEATURE_NORMS), reading real features chunk by chunk."""
        if norm not in FEATURE_NORMS:
            raise ValueError(f"features: expected one of {FEATURE_NORMS}, got {norm!r}")
        mean = None
        if norm.startswith("center"):
            total = torch.zeros(real_features.shape[1], dtype=torch.float64)
            for rows in row_blocks(real_features.shape[0], chunk_rows):
                total += real_features[rows].double().sum(0).cpu()
            mean = (total / real_features.shape[0]).float()
        return cls(mean=mean, l2=norm.endswith("l2"))

    def __call__(self, phi: Tensor) -> Tensor:
        out = phi.float() if phi.dtype != torch.float64 else phi
        if self.mean is not None:
            out = out - self.mean.to(out.device, out.dtype)
        if self.l2:
            out = torch.nn.functional.normalize(out, dim=1)
        return out

    def apply_chunked(self, phi: Tensor, chunk_rows: int = SCAN_ROWS, dtype: torch.dtype = torch.float16) -> Tensor:
        """Transform a large (possibly memory-mapped) feature matrix into a new tensor of `dtype`, chunk by chunk."""
        out = torch.empty(phi.shape, dtype=dtype)
        for rows in row_blocks(phi.shape[0], chunk_rows):
            out[rows] = self(phi[rows]).to(dtype)
        return out
