"""What the command-line tools share: argument types, help formatting, old flag names that keep working, and turning
bad input into one error line."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from clpdd_fast import settings


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
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


class _OldFlag(argparse.Action):
    """The old spelling of a renamed flag, hidden from --help: it sets what the new flag sets and says, once, on
    stderr, which flag to use instead."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new = new
        self.noted = False   # parse() may read a command line twice (presets): one note

    def __call__(self, parser, namespace, values, option_string=None):
        if not self.noted:
            print(f"note: {option_string} is now {self.new}", file=sys.stderr)
            self.noted = True
        setattr(namespace, self.dest, values)


def add_old_flag(parser: argparse.ArgumentParser, old: str, new: argparse.Action) -> None:
    """Keep `old` working as a hidden alias of the flag `new` (what add_argument returned): same destination, type and
    choices, plus a note naming the new flag."""
    parser.add_argument(old, action=_OldFlag, new=new.option_strings[0], dest=new.dest, type=new.type,
                        choices=new.choices, metavar=new.metavar)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout; appends '(default: X)' unless the help text already names the default."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def run_main(main) -> None:
    """Run a CLI's main(): bad input (ValueError, TypeError, FileNotFoundError: their messages name the argument, and
    SystemExit("error: ...") raised by the tools' own checks) ends the program with that message and status 2
    instead of a traceback (or Python's status 1); CLPDD_TRACEBACK=1 keeps the traceback."""
    keep_traceback = False
    try:
        keep_traceback = settings.show_traceback()   # a bad value ends in an error line, as bad input does
        main()
    except (ValueError, TypeError, FileNotFoundError) as err:
        if keep_traceback:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:
        if not isinstance(stop.code, str):   # argparse's 0 / 2, an interrupt's 130: as they are
            raise
        print(stop.code, file=sys.stderr)
        raise SystemExit(2) from None
