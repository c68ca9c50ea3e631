"""A distillation run's resumable state: what checkpoint.pt holds, written on step boundaries, and the rewind of a
step that an interrupt cut short (interrupts.py says when each happens)."""
from __future__ import annotations

from pathlib import Path

import torch

from clpdd_fast import artifacts

KEYS = {"step", "synthetic", "optimizer", "generator", "torch_rng", "config"}


def load(path: Path, what: str = "--resume") -> dict:
    """A checkpoint file, read without running code from it; errors name `what` (the flag that asked for it)."""
    return artifacts.load_torch(path, what, KEYS)


class Checkpointer:
    """The run's state after `step` completed steps: the synthetic parameters, the optimiser, the step generator and
    torch's global generator, with the settings (`config`, a dict) that --resume compares.

    advance() marks a completed step (a step boundary); save() writes the state to `path` (atomically; only where
    `write`, i.e. on rank 0) unless this step is saved already; rewind() puts the generators back as they were at the
    last boundary, dropping the draws of a step in progress (its gradients are dropped with the next zero_grad)."""

    def __init__(self, path: Path, synthetic: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, config: dict, write: bool):
        self.path, self.synthetic, self.optimizer, self.generator = Path(path), synthetic, optimizer, generator
        self.config, self.write = config, write
        self.step = 0
        self.saved: int | None = None   # the step of the last checkpoint this process wrote
        self._boundary = self._rng_state()

    def _rng_state(self) -> tuple:
        return self.generator.get_state(), torch.get_rng_state()

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint that load() read."""
        self.synthetic.load_state_dict(ckpt["synthetic"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.step = ckpt["step"]
        self._boundary = self._rng_state()

    def advance(self) -> None:
        """One more step completed: the generators' state now is the boundary rewind() returns to."""
        self.step += 1
        self._boundary = self._rng_state()

    def rewind(self) -> None:
        self.generator.set_state(self._boundary[0])
        torch.set_rng_state(self._boundary[1])

    def save(self) -> None:
        if self.saved == self.step:
            return
        if self.write:
            artifacts.save_torch({"step": self.step, "synthetic": self.synthetic.state_dict(),
                                  "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                                  "torch_rng": torch.get_rng_state(), "config": self.config}, self.path)
        self.saved = self.step
