"""Reading inverted lists from the store: only the probed ones, through the manifest, as stored.

Two modes:

* streaming (default): every batch reads the lists it probes (one read per array and shard, the
  chunks they touch fetched concurrently), keeping recently used lists in an LRU cache of
  ``cache_bytes``;
* resident: the whole index is loaded once into one block in list order (``Index.load()``, or
  automatically when ``cache_bytes`` covers the whole index), after which a batch reads nothing.

Lists are kept as stored (uint8 codes for SQ8 and PQ): the engine decodes inside its kernels,
so the cache and a resident index take the compressed size, not the float32 size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from distann.search.engine import ListBlock
from distann.store.arrays import CheckedStore
from distann.store.manifest import Manifest
from distann.store.shards import ListRows, ShardReader

log = logging.getLogger(__name__)

_MAX_SLICES = 8
"""Above this many runs of consecutive probed lists in a shard, one gather replaces the slices."""


@dataclass
class ReadStats:
    """What searches have read from the store so far (tests use it to check lazy reading)."""

    lists_read: int = 0
    vectors_read: int = 0
    reads: int = 0
    cache_hits: int = 0
    read_lists: set[int] = field(default_factory=set)


class ListStore:
    def __init__(self, store: CheckedStore, manifest: Manifest, list_sizes: np.ndarray, row_bytes: int,
                 cache_bytes: int, raw: bool = False):
        self.store = store
        self.manifest = manifest
        self.list_sizes = list_sizes
        self.row_bytes = int(row_bytes)
        self.cache_bytes = int(cache_bytes)
        self.raw = raw
        self.stats = ReadStats()
        self.shard_starts = np.array([s.list_start for s in manifest.shards], dtype=np.int64)
        self._shards: dict[int, ShardReader] = {}
        self._cache: OrderedDict[int, ListRows] = OrderedDict()
        self._cached_bytes = 0
        self.resident: ListBlock | None = None
        self.global_offsets = np.zeros(len(list_sizes) + 1, dtype=np.int64)
        np.cumsum(list_sizes, out=self.global_offsets[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of the lists in memory as stored (codes, ids, raw vectors for RFlat)."""
        return int(self.global_offsets[-1]) * self.row_bytes

    def shard(self, s: int) -> ShardReader:
        if s not in self._shards:
            entry = self.manifest.shards[s]
            self._shards[s] = ShardReader(self.store, entry, self.list_sizes[entry.list_start:entry.list_stop],
                                          raw=self.raw)
        return self._shards[s]

    def _read_shard(self, s: int, lists: list[int]) -> list[tuple[int, ListRows]]:
        """Lists ``lists`` (ascending) of shard ``s``. A few runs of consecutive lists are read
        as one slice each; many scattered lists (a small batch) as one gather of their rows, in
        which Zarr fetches each chunk once, concurrently (measured faster than a slice per run
        once there are more than a handful)."""
        breaks = np.flatnonzero(np.diff(lists) != 1) + 1
        if len(breaks) < _MAX_SLICES:
            runs = [self.shard(s).read(int(r[0]), int(r[-1]) + 1) for r in np.split(np.asarray(lists), breaks)]
        else:
            runs = [self.shard(s).read_lists(np.asarray(lists, dtype=np.int64))]
        self.stats.reads += len(runs)
        out = []
        it = iter(lists)
        for rows in runs:
            for i in range(len(rows.offsets) - 1):
                lst = next(it)
                a, b = int(rows.offsets[i]), int(rows.offsets[i + 1])
                raw = rows.raw[a:b] if rows.raw is not None else None
                out.append((lst, ListRows(rows.codes[a:b], rows.ids[a:b], np.array([0, b - a], np.int64), raw)))
                self.stats.lists_read += 1
                self.stats.vectors_read += b - a
                self.stats.read_lists.add(lst)
        return out

    def fetch(self, lists: np.ndarray) -> ListBlock:
        """The rows of ``lists`` (ascending), concatenated in that order. The lists not in the
        cache are read shard by shard, one call per array and shard.

        Peak memory: the probed lists twice (read rows + the concatenation).
        """
        got: dict[int, ListRows] = {}
        missing = []
        for lst in lists.tolist():
            hit = self._cache.get(lst)
            if hit is not None:
                self._cache.move_to_end(lst)
                got[lst] = hit
                self.stats.cache_hits += 1
            elif self.list_sizes[lst] > 0:
                missing.append(lst)
        if missing:
            shard_of = np.searchsorted(self.shard_starts, missing, side="right") - 1
            for s in np.unique(shard_of):
                for lst, rows in self._read_shard(int(s), [m for m, t in zip(missing, shard_of) if t == s]):
                    got[lst] = rows
                    self._remember(lst, rows)
        parts = [got[lst] for lst in lists.tolist() if lst in got]
        sizes = np.array([len(got[lst].ids) if lst in got else 0 for lst in lists.tolist()], dtype=np.int64)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return ListBlock(np.asarray(lists, dtype=np.int64), offsets, *self._concat(parts))

    def _concat(self, parts: list[ListRows]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if not parts:
            shard = self.shard(0)
            codes = np.empty((0, shard.codes.shape[1]), dtype=shard.codes.dtype)
            raw = np.empty((0, shard.raw.shape[1]), np.float32) if shard.raw is not None else None
            return codes, np.empty(0, np.int64), raw
        codes = np.ascontiguousarray(np.concatenate([p.codes for p in parts]))
        ids = np.ascontiguousarray(np.concatenate([p.ids for p in parts]))
        raw = np.ascontiguousarray(np.concatenate([p.raw for p in parts])) if self.raw else None
        return codes, ids, raw

    def _remember(self, lst: int, rows: ListRows) -> None:
        size = len(rows.ids) * self.row_bytes
        if size > self.cache_bytes:
            return
        self._cache[lst] = rows
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old.ids) * self.row_bytes

    def load_all(self) -> ListBlock:
        """Make the whole index resident: one block of every list, in list order."""
        if self.resident is None:
            parts = []
            for s, entry in enumerate(self.manifest.shards):
                parts.append(self.shard(s).read_all())
                self.stats.reads += 1
                self.stats.vectors_read += entry.ntotal
            codes, ids, raw = self._concat(parts)
            self.resident = ListBlock(np.arange(len(self.list_sizes), dtype=np.int64), self.global_offsets,
                                      codes, ids, raw)
            self._cache.clear()
            self._cached_bytes = 0
            log.info("index %s resident in memory: %.1f MiB", self.store.url, self.nbytes / 2**20)
        return self.resident
