"""Ctrl-C during distillation: the run stops on a step boundary, so its last checkpoint resumes exactly.

A step has two parts. Its forward and backward passes change only gradients and the random generators; the loop
can discard them at any moment by rewinding the generators to the last boundary. Its commit (optimiser step,
upkeep, metrics row, checkpoint write) changes the run's state and must not stop half-way; the loop runs it inside
``held()``.

- A first Ctrl-C outside ``held()`` raises KeyboardInterrupt at once: the loop rewinds and saves the state after
  the last completed step.
- A first Ctrl-C inside ``held()`` is kept until the section ends and raised there, on the step boundary.
- A second Ctrl-C raises at once wherever it lands. If a KeyboardInterrupt cuts a held section, the state may be
  half-changed: ``aborted`` is set and the loop exits without writing, so the checkpoint on disk stays as it was
  (writes are atomic: an interrupted write leaves the old file).

``save_after_interrupt`` is what the loop does with the KeyboardInterrupt (checkpoint.py holds the state it saves).
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupts:
    """Context manager: installs the SIGINT handler described above and restores the previous one on exit. Nothing is
    installed outside the main thread (Python handles signals there only) or where SIGINT is ignored (a background
    job started with it ignored stays so); ``held()`` then only marks the sections."""

    def __init__(self):
        self.presses = 0      # Ctrl-Cs received while installed
        self.pending = False  # a first Ctrl-C held back until the end of the held section
        self.aborted = False  # a Ctrl-C raised inside a held section: the in-memory state may be half-changed
        self._holding = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc) -> bool:
        if self._installed:
            # None: the previous handler was set outside Python and cannot be put back; SIG_DFL comes closest
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        return False

    def _on_sigint(self, signum, frame) -> None:
        self.presses += 1
        if self._holding and self.presses == 1:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def held(self):
        """A section that a first Ctrl-C does not cut: the interrupt is raised when it ends normally."""
        self._holding = True
        try:
            yield
        except KeyboardInterrupt:  # a second Ctrl-C (or one raised by other means) cut the section
            self.aborted = True
            raise
        finally:
            self._holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def save_after_interrupt(self, rewind, save) -> bool:
        """The loop's answer to a KeyboardInterrupt: unless a held section was cut (aborted: nothing is written),
        drop the step in progress (rewind()) and save() the state after the last completed step, held, so that a
        second Ctrl-C aborts the write and leaves the old file whole. Returns whether the state was saved."""
        if not self.aborted:
            rewind()
            try:
                with self.held():
                    save()
            except KeyboardInterrupt:
                pass
        return not self.aborted
