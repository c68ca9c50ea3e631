"""pytest plugin: run one shard of the collected tests, so that N processes run a test file in parallel without
pytest-xdist (which a GPU machine may lack). `CLPDD_SHARD=i/N` keeps every N-th test, starting at the i-th (0-based),
in collection order; unset, it keeps everything. Used by benchmarks/gpu_check.sh (`-p pytest_shard`).
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


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("CLPDD_SHARD")
    if not spec:
        return
    index, count = shard(spec)
    keep = items[index::count]
    kept = {id(item) for item in keep}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
    items[:] = keep
