"""Pure planning of a build: which rows go to which add task, which lists form which shard.

No I/O and no Dask here: these functions are tested on their own, and the driver only turns
their output into tasks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from distann.chunks import ChunkTask, plan_chunks  # noqa: F401 - re-exported: the build plans by chunks


@dataclass(frozen=True)
class ShardTask:
    """Lists ``[list_start, list_stop)``: one shard-over-lists merge task and one shard."""

    index: int
    list_start: int
    list_stop: int
    ntotal: int

    @property
    def name(self) -> str:
        return f"s{self.index:06d}"


def plan_shards(list_sizes: np.ndarray, code_size: int, shard_bytes: int) -> tuple[ShardTask, ...]:
    """Group consecutive lists into shards of about ``shard_bytes`` of codes + ids each.

    Balanced by bytes, not by list count: a shard closes as soon as it reaches the target, and
    every shard holds at least one list, so one huge list makes a shard of its own.
    """
    row_bytes = code_size + 8
    shards: list[ShardTask] = []
    start, acc, count = 0, 0, 0
    nlist = len(list_sizes)
    for lst in range(nlist):
        size = int(list_sizes[lst])
        acc += size * row_bytes
        count += size
        if acc >= shard_bytes or lst == nlist - 1:
            shards.append(ShardTask(len(shards), start, lst + 1, count))
            start, acc, count = lst + 1, 0, 0
    return tuple(shards)


def list_order(assign: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable permutation sorting rows by list, and offsets (nlist + 1) of each list in it."""
    order = np.argsort(assign, kind="stable")
    offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(np.bincount(assign, minlength=nlist), out=offsets[1:])
    return order, offsets


def build_key(**inputs) -> str:
    """A stable hash of everything that determines the built index (used to resume)."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]
