"""Gram matrix K = x x^T + lam I: the symmetric mode of the strided matmul (kernels/matmul.py)."""
from __future__ import annotations

from torch import Tensor

from .matmul import matmul


def gram(x: Tensor, lam: float = 0.0, input_precision: str = "ieee") -> Tensor:
    """x (m, d), any strides, fp16/bf16/fp32/fp64 -> x x^T + lam I, (m, m) fp32 (fp64 for fp64 x).

    fp32 accumulation; input_precision (tl.dot's) of fp32 operands: exact products ("ieee", default) or "tf32x3"
    (three TF32 tensor-core products, about as accurate: benchmarks/precision_study.py). Plain TF32 ("tf32") moves K
    by ~1e-4 relative, which a ridge system with small lam amplifies into W. Only the lower triangle is computed and
    mirrored, so K equals K^T exactly.
    """
    if x.dim() != 2:
        raise ValueError(f"gram: expected a 2-D tensor x, got shape {tuple(x.shape)}")
    return matmul(x, x.T, symmetric=True, lam=lam, input_precision=input_precision)
