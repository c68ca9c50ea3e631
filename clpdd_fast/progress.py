"""Progress of long work on stderr: tqdm's bar when tqdm is installed, else a plain line at most every 2 s."""
from __future__ import annotations

import sys
import time


class Progress:
    """A counter from `initial` to `total` `unit`s: update(k) after each piece of work, close() at the end.
    enabled=False shows nothing (e.g. on ranks other than 0)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "images"):
        self.total, self.n, self.desc, self.enabled, self.unit = total, initial, desc, enabled, unit
        self.t0 = self.last = time.time()
        self.start = initial
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr)
            except ImportError:
                pass

    def update(self, k: int) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and (time.time() - self.last > 2 or self.n >= self.total):
            self.last = time.time()
            rate = (self.n - self.start) / max(self.last - self.t0, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({rate:.0f}/s, eta {eta:.0f}s)", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
