"""What every benchmark shares: the commit, the device's name, markdown tables appended to RESULTS.md, the peak
resident set, random feature rows, and running the package's commands as child processes."""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent   # the repository: where the package's commands run
PY = "python"        # the interpreter named in the commands the fidelity benchmarks print and run
# Rows drawn at a time by unit_rows: clpdd_fast.scan.SCAN_ROWS, written out because bench_checks.py --pythonpath runs
# these helpers against checkouts of clpdd_fast that predate that module.
ROW_BLOCK = 65536


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


def unit_rows(n: int, d: int, dtype, generator):
    """(n, d) standard normal rows divided by sqrt(d) (norm about 1), in `dtype`, drawn ROW_BLOCK rows at a time
    (no float32 copy of all of them)."""
    import torch
    x = torch.empty(n, d, dtype=dtype)
    for s in range(0, n, ROW_BLOCK):
        x[s:s + ROW_BLOCK] = torch.randn(min(ROW_BLOCK, n - s), d, generator=generator) / d ** 0.5
    return x


def command(args: list[str]) -> str:
    """A command line as a shell would take it back."""
    return " ".join(shlex.quote(a) for a in args)


def run_child(cmd: list[str], log, env: dict | None = None) -> tuple[float, float, int]:
    """Run cmd in the repository (with environment env, default ours), streaming its output into log; returns (wall
    seconds, peak RSS MiB of the child, return code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss is KiB on Linux
