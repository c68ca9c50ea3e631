"""What every benchmark shares: the commit, the device's name, and markdown tables appended to RESULTS.md."""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_commit() -> str:
    """The commit under test: $CLPDD_COMMIT (set where the tree travels without .git), else git's HEAD."""
    if os.environ.get("CLPDD_COMMIT"):
        return os.environ["CLPDD_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def device_name(device: str = "cuda") -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU"


def results_header(bench: str, where: str, command: str) -> str:
    """The heading of one run's table: what ran, when (UTC), on what, at which commit, with which versions."""
    import torch
    try:
        import triton
        versions = f"torch {torch.__version__} · triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"### {bench} · {when} · {where} · commit {git_commit()} · {versions}\n\nCommand: `{command.strip()}`"


class Table:
    """A markdown table printed as it grows and, when `path` is given, appended to that file row by row."""

    def __init__(self, path: str | None, header: str, columns: list[str]):
        self.path = path
        self.columns = columns
        lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        self._emit(lines, leading_blank=True)

    def _emit(self, lines: list[str], leading_blank: bool = False) -> None:
        print("\n".join(lines), flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(("\n" if leading_blank else "") + "\n".join(lines) + "\n")

    def row(self, *cells) -> None:
        self._emit(["| " + " | ".join(str(c) for c in cells) + " |"])
