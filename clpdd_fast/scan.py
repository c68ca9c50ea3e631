"""Row-chunked scans of large, possibly memory-mapped feature matrices: one block size for every such pass, so the
temporary memory of a scan stays bounded whatever the number of rows."""
from __future__ import annotations

SCAN_ROWS = 65536  # rows read (and converted to float) at a time


def row_blocks(n: int, rows: int = SCAN_ROWS) -> list[slice]:
    """Consecutive slices of `rows` rows covering rows 0 .. n - 1 (the last one may reach past n: slicing stops at
    the end)."""
    return [slice(start, start + rows) for start in range(0, n, rows)]
