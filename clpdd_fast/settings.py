"""The settings read from the environment, all in this module: one function per variable, validating its value.

Each function reads its variable when called (not at import), so a change takes effect at the next call; unset or
empty means the default (the first of its values). docs/KERNELS.md ("Environment variables") has the table. The
kernels never read them: the ops read them here, once per call, and pass the values down as arguments.
"""
from __future__ import annotations

import contextlib
import os
import warnings

from clpdd_fast.kernels.contract import CE_PRECISIONS, RIDGE_PRECISIONS

VALUES = {
    "TRITON_INTERPRET": ("0", "1"),
    "CLPDD_AUTOTUNE": ("0", "1"),
    "CLPDD_CE_PRECISION": CE_PRECISIONS,
    "CLPDD_RIDGE_PRECISION": RIDGE_PRECISIONS,
    "CLPDD_TRACEBACK": ("0", "1"),
}
# The precision words before they followed torch.set_float32_matmul_precision, and what each one is now (the same
# products): still accepted, with a note.
RENAMED = {
    "CLPDD_CE_PRECISION": {"ieee": "highest", "auto": "high", "tf32": "medium"},
    "CLPDD_RIDGE_PRECISION": {"ieee": "highest", "tf32x3": "high"},
}


def renamed(name: str, value: str, what: str | None = None, stacklevel: int = 3) -> str:
    """`value`, or the word an old value of variable `name` is now (with a FutureWarning naming `what`: the variable,
    or the argument that took the same words; `stacklevel` as warnings.warn's, counted from the caller)."""
    new = RENAMED.get(name, {}).get(value)
    if new is None:
        return value
    warnings.warn(f"{what or name}: {value!r} is now called {new!r} (the words of torch.set_float32_matmul_precision); "
                  "the old word still works", FutureWarning, stacklevel=stacklevel + 1)
    return new


def _read(name: str) -> str:
    values = VALUES[name]
    value = renamed(name, os.environ.get(name) or values[0])
    if value not in values:
        quoted = [repr(v) for v in values]
        raise ValueError(f"{name}: expected {', '.join(quoted[:-1])} or {quoted[-1]}, got {value!r}")
    return value


def is_set(name: str) -> bool:
    """Whether the variable `name` (one of VALUES) is set to a non-empty value."""
    if name not in VALUES:
        raise KeyError(name)
    return bool(os.environ.get(name))


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton's interpreter runs the kernels on CPU tensors. Triton reads it too, when kernels
    are decorated: set it before Python imports triton."""
    return _read("TRITON_INTERPRET") == "1"


def autotune() -> bool:
    """CLPDD_AUTOTUNE=1: the CE kernels pick their tiles by autotuning (read at each CE launch); fixed tiles
    otherwise."""
    return _read("CLPDD_AUTOTUNE") == "1"


def ce_precision() -> str:
    """CLPDD_CE_PRECISION: the products of fp32 operands in the CE kernels, when the op's `precision` argument is
    None: "highest" (exact), "high" (exact, but an fp32 w with a bf16 x as two bf16 halves on tensor cores) or
    "medium" (TF32). Unset: the op follows torch.get_float32_matmul_precision()."""
    return _read("CLPDD_CE_PRECISION")


def ridge_precision() -> str:
    """CLPDD_RIDGE_PRECISION: the products of fp32 operands in the Triton Gram, blocked Cholesky, solves and ridge
    backward: "highest" (exact fp32 products on FMA units) or "high" (three TF32 tensor-core products per
    product)."""
    return _read("CLPDD_RIDGE_PRECISION")


def show_traceback() -> bool:
    """CLPDD_TRACEBACK=1: a CLI ends with the Python traceback instead of one `error: ...` line."""
    return _read("CLPDD_TRACEBACK") == "1"


@contextlib.contextmanager
def overridden(name: str, value: str):
    """Within the block, the variable `name` (one of VALUES) holds `value`; restored afterwards."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        _read(name)   # a bad value fails here, naming the variable
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
