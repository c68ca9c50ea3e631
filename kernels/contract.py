"""What both backends of the ops agree on (the Triton kernels here and the plain-torch `clpdd_fast.reference`): the
compute-dtype rule, the precision words, and the linear CE's parameters as one object.

Plain Python and torch (no Triton): `clpdd_fast.reference` imports it on machines without Triton too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The products of fp32 operands, in the words of torch.set_float32_matmul_precision:
#   CE:    "highest" exact fp32 products; "high" exact, except an fp32 w with a bf16 x, which runs as two bf16 halves of
#          w on tensor cores (|w - hi - lo| <= 2^-17 |w|); "medium" TF32 products, no halves.
#   ridge: "highest" exact fp32 products; "high" three TF32 products per product (about fp32 accuracy).
# The torch backend computes exactly in fp32 (fp64) whatever the word.
CE_PRECISIONS = ("highest", "high", "medium")
RIDGE_PRECISIONS = ("highest", "high")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (exact checks, gradcheck), float32 otherwise (fp32 accumulation)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class CEParams:
    """The scalar arguments of every linear CE backend function.

    tau: temperature > 0 (the logits are x w / tau). ignore_index: rows with this target have loss 0 and no gradient.
    chunk_size: rows per chunk (at most chunk_size x C logits at once on the torch backend; the Triton launchers bound
    their scratch further). precision: one of CE_PRECISIONS. autotune: the Triton forward and coefficient kernels
    choose their tiles by autotuning instead of the fixed tiles of kernels/tiles.py.
    """
    tau: float
    ignore_index: int = -100
    chunk_size: int = 8192
    precision: str = "highest"
    autotune: bool = False

    def __post_init__(self):
        if self.precision not in CE_PRECISIONS:
            raise ValueError(f"precision: expected one of {CE_PRECISIONS}, got {self.precision!r}")
        if not self.tau > 0:
            raise ValueError(f"tau: expected a number > 0, got {self.tau!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: expected an integer >= 1, got {self.chunk_size!r}")
