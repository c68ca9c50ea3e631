"""What every benchmark shares: the commit, the device's name, and markdown tables appended to RESULTS.md."""
from __future__ import annotations

import datetime
import os
import subprocess
import threading
import time
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
        return torch.cuda.get_device_name(torch.device(device))
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


class RssSampler:
    """Peak resident set (MiB) of this process while active, sampled from /proc/self/statm by a thread."""

    def __init__(self, period_s: float = 0.001):
        self.period_s, self.peak, self._stop = period_s, 0.0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") / 2**20

    def rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
