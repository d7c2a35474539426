"""Row chunks: the one planner that cuts ``n`` rows into consecutive ranges.

Sources build their Dask arrays from it, the first pass and the add stage run one task per
chunk, and exact search reads by it. A chunk is an id range: global ids come from chunk
offsets, so no coordination is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

#: rows per chunk when the caller names none (``distann.build.chunk-rows`` has the same default)
DEFAULT_CHUNK_ROWS = 65536


@dataclass(frozen=True)
class ChunkTask:
    """Rows ``[start, stop)`` of a source: one task (and, in a build, one staging output)."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"c{self.index:06d}"

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_chunks(n: int, chunk_rows: int) -> tuple[ChunkTask, ...]:
    """Split ``n`` rows into consecutive chunks of ``chunk_rows`` (the last may be shorter)."""
    if n < 0 or chunk_rows < 1:
        raise ValueError(f"plan_chunks: n={n}, chunk_rows={chunk_rows}")
    return tuple(ChunkTask(i, s, min(n, s + chunk_rows)) for i, s in enumerate(range(0, n, chunk_rows)))
