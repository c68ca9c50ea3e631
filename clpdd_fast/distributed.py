"""torch.distributed helpers for runs started with torchrun: what each rank owns, and the reductions that keep
every rank's synthetic images identical.

Each rank encodes a contiguous block of the synthetic images (all-gathered into the full phi_s), holds its own
shard of the real features (every rank solves the small ridge system itself), and backpropagates its own images;
the gradients of the synthetic parameters are then summed over ranks, so every rank takes the same optimiser step.
A single process is the world of size 1, where every operation here is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# Imported before any process group exists: torch.distributed.nn.functional binds `group.WORLD` into its functions'
# defaults at import, and imported after init_process_group (timm -> torchvision -> torch._dynamo -> fsdp does) it
# keeps the default group alive past destroy_process_group, and so its gloo threads into interpreter exit, where
# torch 2.11 aborts the rank (SIGABRT, "terminate called without an active exception") when one of them is still
# releasing a collective's tensors.
if dist.is_available():
    import torch.distributed.nn.functional  # noqa: F401


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, n: int) -> tuple[int, int]:
        """This rank's contiguous block [start, stop) of n items; blocks differ in size by at most one."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def gather_rows(self, local: Tensor, n: int) -> Tensor:
        """Concatenate every rank's block of rows (rank order) into the full (n, ...) tensor."""
        if not self.active:
            return local
        sizes = [n * (r + 1) // self.size - n * r // self.size for r in range(self.size)]
        biggest = max(sizes)
        padded = local.new_zeros((biggest,) + tuple(local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads_(self, parameters) -> None:
        """Sum each parameter's .grad over ranks (parameters without a gradient, e.g. inactive pyramid levels, are
        the same on every rank and are left alone)."""
        if self.active:
            for p in parameters:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


# whether init_from_env created the default process group (then `shutdown` destroys it; a group the caller made
# before calling us is theirs to destroy)
_created_group = False


def init_from_env(device: str | None) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK); NCCL with one
    GPU per rank when CUDA is available, gloo on CPU. Without torchrun: World(0, 1) and the requested device.
    Pair every call with `shutdown()` in a `finally`."""
    global _created_group
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _created_group = True
    return (World(dist.get_rank(), dist.get_world_size()),
            torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def shutdown() -> None:
    """Destroy the process group `init_from_env` created, if any: its communication threads are then stopped and
    joined here rather than torn down at interpreter exit (where gloo can abort the process with SIGABRT, making
    torchrun report a failed run). Safe to call more than once, and after an error or Ctrl-C."""
    global _created_group
    if _created_group and dist.is_initialized():
        dist.destroy_process_group()
    _created_group = False
