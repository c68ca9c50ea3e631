"""pytest plugin: run one shard of the collected tests, so that N processes share a test run without pytest-xdist
(which a GPU machine may lack). `CLPDD_SHARD=i/N` keeps the i-th (0-based) of N contiguous blocks of the tests in
collection order, the blocks as equal in size as they can be; unset, it keeps everything. Contiguous blocks keep the
parametrisations of one test, which launch the same kernel variants, in one process, so that two processes seldom
compile the same variant. Used by benchmarks/gpu_check.sh and benchmarks/compile_cost.py (`-p pytest_shard`).
"""
from __future__ import annotations

import os


def shard(spec: str) -> tuple[int, int]:
    """'i/N' -> (i, N), with 0 <= i < N."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"CLPDD_SHARD: expected 'i/N', got {spec!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"CLPDD_SHARD: expected 0 <= i < N, got {spec!r}")
    return index, count


def block(size: int, index: int, count: int) -> slice:
    """The index-th of `count` contiguous blocks of range(size), in order; their sizes differ by at most one."""
    return slice(size * index // count, size * (index + 1) // count)


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("CLPDD_SHARD")
    if not spec:
        return
    keep = block(len(items), *shard(spec))
    config.hook.pytest_deselected(items=items[:keep.start] + items[keep.stop:])
    items[:] = items[keep]
