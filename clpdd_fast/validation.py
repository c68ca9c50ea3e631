"""Argument checks shared by the ops and the pipeline: each failure names the argument, what was seen, what was
expected."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from clpdd_fast.scan import SCAN_ROWS, row_blocks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


class NotPositiveDefiniteError(ValueError):
    """The ridge system could not be Cholesky-factorised."""


def tensor(name: str, value, ndim: int, dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if value.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(value.shape)}")
    return value


def same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"inputs must be on one device, got {seen}")


def compatible_dtypes(**tensors: Tensor) -> None:
    """fp16/bf16/fp32 mix freely (all computed in fp32); float64 mixed with a lower precision is ambiguous."""
    dts = {name: t.dtype for name, t in tensors.items()}
    if torch.float64 in dts.values() and any(d != torch.float64 for d in dts.values()):
        seen = ", ".join(f"{n} is {str(d).replace('torch.', '')}" for n, d in dts.items())
        raise TypeError(f"float64 inputs must all be float64 (got {seen}); cast them to one precision")


def integer(name: str, value, minimum: int = 1):
    """A Python int (not a bool) >= minimum; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def positive(name: str, value, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with allow_zero), also from a one-element tensor; returns it as a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name}: expected a Python number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return float(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {sorted(options)}, got {value!r}")
    return value


def finite(name: str, value: Tensor, chunk_rows: int = SCAN_ROWS) -> None:
    """No NaN or inf in `value`, scanned `chunk_rows` rows at a time (memory bounded whatever its size)."""
    parts = [value[rows] for rows in row_blocks(value.shape[0], chunk_rows)] if value.dim() else [value]
    bad = sum(int((~torch.isfinite(part)).sum()) for part in parts)
    if bad:
        raise ValueError(f"{name}: contains {bad} non-finite value(s) (NaN or inf); pass check_finite=False "
                         "to skip this check")


def labels(name: str, value: Tensor, num_classes: int | None, ignore_index: int | None = None) -> None:
    """Every label in [0, num_classes) (num_classes None: every label >= 0), except entries equal to ignore_index."""
    v = value if ignore_index is None else value[value != ignore_index]
    if v.numel() and (int(v.min()) < 0 or (num_classes is not None and int(v.max()) >= num_classes)):
        raise ValueError(f"{name}: labels must lie in [0, {'inf' if num_classes is None else num_classes}), got "
                         f"values in [{int(v.min())}, {int(v.max())}]")


def rows_match(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_b}: expected {a.shape[0]} rows to match {name_a} {tuple(a.shape)}, "
                         f"got shape {tuple(b.shape)}")
