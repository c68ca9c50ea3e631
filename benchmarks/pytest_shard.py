"""pytest plugin: run one shard of the collected tests, so that N processes share a test run without pytest-xdist
(which a GPU machine may lack). In collection order:
- `CLPDD_SHARD=i/N` keeps the i-th (0-based) of N contiguous blocks, as equal in size as they can be. A block keeps
  the parametrisations of one test, which launch the same kernel variants, in one process, so that two processes
  seldom compile the same variant (benchmarks/gpu_check.sh's tests step);
- `CLPDD_SHARD=i/N,interleaved` keeps every N-th test from the i-th: the slow tests, which sit together, spread over
  the shards (recording the tests' launches under the interpreter, which compiles nothing: benchmarks/compile_cost.py).
Unset, it keeps everything.
"""
from __future__ import annotations

import os


def shard(spec: str) -> tuple[int, int, bool]:
    """'i/N' or 'i/N,interleaved' -> (i, N, interleaved), with 0 <= i < N."""
    where, _, how = spec.partition(",")
    try:
        index, count = (int(part) for part in where.split("/"))
    except ValueError:
        raise ValueError(f"CLPDD_SHARD: expected 'i/N' or 'i/N,interleaved', got {spec!r}") from None
    if not 0 <= index < count or how not in ("", "interleaved"):
        raise ValueError(f"CLPDD_SHARD: expected 'i/N' or 'i/N,interleaved' with 0 <= i < N, got {spec!r}")
    return index, count, how == "interleaved"


def kept(size: int, spec: str) -> range:
    """The positions in range(size) that shard `spec` keeps."""
    index, count, interleaved = shard(spec)
    if interleaved:
        return range(index, size, count)
    return range(size * index // count, size * (index + 1) // count)


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get("CLPDD_SHARD")
    if not spec:
        return
    keep = set(kept(len(items), spec))
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i not in keep])
    items[:] = [item for i, item in enumerate(items) if i in keep]
