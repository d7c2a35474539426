"""Planning of a big-batch search: the list ranges its scan tasks own, and the job's key.

A *list range* is a run of consecutive whole shards of the index, at most ``range_bytes`` of
stored lists (one shard when a shard alone is larger). One scan task per range reads its lists
once and streams every query that probes them through the engine, so the number of scan
tasks, and what each holds in memory, depend on the index only, never on the number of
queries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from distann.store.manifest import Manifest


@dataclass(frozen=True)
class ListRange:
    """Shards ``[shard_start, shard_stop)``, that is lists ``[list_start, list_stop)``, whose
    rows are rows ``[row_start, row_stop)`` of the index in list order."""

    index: int
    shard_start: int
    shard_stop: int
    list_start: int
    list_stop: int
    row_start: int
    row_stop: int

    @property
    def name(self) -> str:
        return f"r{self.index:05d}"

    @property
    def ntotal(self) -> int:
        return self.row_stop - self.row_start


def plan_ranges(manifest: Manifest, row_bytes: int, range_bytes: int) -> tuple[ListRange, ...]:
    """Group the index's shards, in order, into list ranges of at most ``range_bytes`` of
    stored rows each (a larger shard is a range of its own)."""
    ranges: list[ListRange] = []
    start, row0, row, acc = 0, 0, 0, 0
    shards = manifest.shards
    for s, entry in enumerate(shards):
        size = entry.ntotal * row_bytes
        if s > start and acc + size > range_bytes:
            ranges.append(ListRange(len(ranges), start, s, shards[start].list_start, shards[s - 1].list_stop,
                                    row0, row))
            start, row0, acc = s, row, 0
        acc += size
        row += entry.ntotal
    if shards:
        ranges.append(ListRange(len(ranges), start, len(shards), shards[start].list_start, shards[-1].list_stop,
                                row0, row))
    return tuple(ranges)


def ranges_of(manifest: Manifest, bounds: list) -> tuple[ListRange, ...]:
    """The list ranges of ``bounds``, ``(shard_start, shard_stop)`` pairs (a persisted plan)."""
    rows = np.concatenate([[0], np.cumsum([s.ntotal for s in manifest.shards])]).astype(np.int64)
    shards = manifest.shards
    return tuple(ListRange(i, int(a), int(b), shards[a].list_start, shards[b - 1].list_stop, int(rows[a]), int(rows[b]))
                 for i, (a, b) in enumerate(bounds))


def range_of_lists(ranges: tuple[ListRange, ...], lists: np.ndarray) -> np.ndarray:
    """The range index of each list number in ``lists`` (any shape)."""
    starts = np.array([r.list_start for r in ranges], dtype=np.int64)
    return np.searchsorted(starts, lists, side="right") - 1


def job_key(**parts) -> str:
    """A stable identity of a job's inputs and parameters: a rerun with the same key resumes."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
