"""NVTX ranges for Nsight Systems timelines; a no-op unless enabled and never an error.

    from clpdd_fast.profiling import nvtx_range, set_enabled
    set_enabled(True)                       # the CLI's --nvtx
    with nvtx_range("encoder_forward"):
        ...

Ranges mark host-side spans (kernel launches); ``nsys profile -t cuda,nvtx`` correlates them with the GPU kernels
they launched. Backends, first that works: the ``nvtx`` PyPI package, then ``torch.cuda.nvtx`` (only when CUDA is
available). With neither, or when disabled, ``nvtx_range`` returns a shared null context: one flag test per call.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

_enabled = False
_backend = None          # (push(name), pop()) once resolved; False when none is usable
_NULL = contextlib.nullcontext()


def _resolve_backend():
    """(push, pop) callables, or False when no NVTX implementation can be used here."""
    try:
        import nvtx  # the PyPI package; works without a GPU (no-op until a profiler injects itself)
        return (lambda name: nvtx.push_range(message=name), nvtx.pop_range)
    except Exception:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            return (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)
    except Exception:
        pass
    return False


def set_enabled(flag: bool = True) -> bool:
    """Turns NVTX ranges on or off. Returns True when ranges will actually be emitted (a backend exists)."""
    global _enabled, _backend
    _enabled = bool(flag)
    if _enabled and _backend is None:
        _backend = _resolve_backend()
        if _backend is False:
            warnings.warn("NVTX requested but neither the nvtx package nor CUDA is available; ranges are disabled",
                          RuntimeWarning, stacklevel=2)
    return _enabled and bool(_backend)


def is_enabled() -> bool:
    """True when ranges are being emitted."""
    return _enabled and bool(_backend)


class _Range:
    __slots__ = ("name", "pushed")

    def __init__(self, name: str):
        self.name = name
        self.pushed = False

    def __enter__(self):
        backend = _backend
        if backend:
            try:
                backend[0](self.name)
                self.pushed = True
            except Exception:  # profiling must never break a run
                self.pushed = False
        return self

    def __exit__(self, *exc):
        if self.pushed:
            self.pushed = False
            try:
                _backend[1]()
            except Exception:
                pass
        return False


def nvtx_range(name: str):
    """Context manager: an NVTX range called ``name`` when enabled, otherwise nothing."""
    if not (_enabled and _backend):
        return _NULL
    return _Range(str(name))


def annotate(name: str | None = None):
    """Decorator form of ``nvtx_range``; the range is named after the function unless ``name`` is given."""
    def wrap(fn):
        label = name or fn.__qualname__

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with nvtx_range(label):
                return fn(*args, **kwargs)
        return inner
    return wrap
