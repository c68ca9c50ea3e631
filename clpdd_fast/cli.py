"""What the two command-line tools share: argument types, help formatting, and the real-data subsets."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_CACHE = Path.home() / ".cache" / "clpdd-fast" / "features"
# Ridge strength and temperature, chosen by the sweep in benchmarks/FIDELITY.md (README: "How the defaults were chosen")
DEFAULT_LAM = 1.0
DEFAULT_TAU = 0.05
EMBEDDED_SUBSET = 5000  # real train / test rows used when --data is omitted (keeps the default run in minutes)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def device_arg(text: str) -> str:
    """--device: cpu, cuda (the current GPU) or cuda:N, checked against this machine without creating a CUDA context.
    Returns the text."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU or driver found"
            if "CUDA_VISIBLE_DEVICES" in os.environ:
                why += f", CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine ({why}); "
                                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), "
                                             f"cuda:0 to cuda:{count - 1}")
    return text


def int_or_all(text: str) -> int | None:
    """'all' -> None, else an integer >= 1."""
    return None if text == "all" else positive_int(text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout; appends '(default: X)' unless the help text already names the default."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def subset_size(requested: int | None, embedded: bool) -> int | None:
    """Rows of a split to use: what was asked, else EMBEDDED_SUBSET on the embedded default, else all (None)."""
    return requested if requested is not None or not embedded else EMBEDDED_SUBSET


def fixed_subset(n: int, k: int | None) -> np.ndarray | None:
    """A fixed (seed-independent, so caches are shared across seeds and tools) sorted random subset of k of n rows;
    None for all rows."""
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:k])


def default_image_size(dataset, encoder) -> int:
    """64 px for IDX data (28 px sources such as Fashion-MNIST), the encoder's own input size otherwise."""
    return 64 if type(dataset).__name__.startswith("Idx") else encoder.default_image_size


def run_main(main) -> None:
    """Run a CLI's main(): bad input (ValueError, TypeError, FileNotFoundError: their messages name the argument, and
    SystemExit("error: ...") raised by the tools' own checks) ends the program with that message and status 2
    instead of a traceback (or Python's status 1); CLPDD_TRACEBACK=1 keeps the traceback."""
    import os
    import sys

    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as err:
        if os.environ.get("CLPDD_TRACEBACK") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:
        if not isinstance(stop.code, str):   # argparse's 0 / 2, an interrupt's 130: as they are
            raise
        print(stop.code, file=sys.stderr)
        raise SystemExit(2) from None
