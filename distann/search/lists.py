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
import threading
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


def _slices(shard: ShardReader, lists: np.ndarray) -> list[tuple[int, int]] | None:
    """List ranges ``[l0, l1)`` covering ``lists`` (ascending, of ``shard``) whose slice reads
    fetch every chunk they touch once, or None when only a gather can (two runs sharing a chunk
    of one array but not of another).

    Runs of consecutive lists are merged when the rows between them lie in chunks the two runs
    read anyway (in every array): the merged slice reads no extra chunk and no chunk twice."""
    base = shard.entry.list_start
    breaks = np.flatnonzero(np.diff(lists) != 1) + 1
    starts = lists[np.r_[0, breaks]] - base
    stops = lists[np.r_[breaks - 1, len(lists) - 1]] + 1 - base
    first, last = shard.offsets[starts], shard.offsets[stops] - 1  # rows of each run (runs are non-empty)
    rows_per_chunk = [a.chunks[0] for a in (shard.codes, shard.ids, shard.raw) if a is not None]
    # per array and pair of neighbouring runs: chunks from the last of one run to the first of the next
    gaps = np.array([first[1:] // c - last[:-1] // c for c in rows_per_chunk]).reshape(len(rows_per_chunk), -1)
    merge = (gaps <= 1).all(axis=0)
    if (gaps[:, ~merge] == 0).any():
        return None
    keep = np.r_[0, np.flatnonzero(~merge) + 1]
    return [(int(starts[a]) + base, int(stops[b]) + base)
            for a, b in zip(keep, np.r_[keep[1:] - 1, len(starts) - 1])]


class ListStore:
    """The probed lists of searches, through an LRU cache of ``cache_bytes``, or all of them resident.

    Thread-safe: any number of threads may search one opened index at once. One lock guards
    the cache, its byte count and ``stats`` (held for dictionary updates only, never during a
    read); shard readers are opened and the index made resident once, however many threads ask.
    Two threads missing the same list may both read it; the cache keeps one copy.
    """

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
        self._lock = threading.Lock()  # the cache, _cached_bytes, stats
        self._open_lock = threading.Lock()  # opening shard readers
        self._load_lock = threading.Lock()  # load_all
        self.resident: ListBlock | None = None
        self.global_offsets = np.zeros(len(list_sizes) + 1, dtype=np.int64)
        np.cumsum(list_sizes, out=self.global_offsets[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of the lists in memory as stored (codes, ids, raw vectors for RFlat)."""
        return int(self.global_offsets[-1]) * self.row_bytes

    def shard(self, s: int) -> ShardReader:
        reader = self._shards.get(s)
        if reader is None:
            with self._open_lock:
                reader = self._shards.get(s)
                if reader is None:
                    entry = self.manifest.shards[s]
                    reader = ShardReader(self.store, entry, self.list_sizes[entry.list_start:entry.list_stop],
                                         raw=self.raw)
                    self._shards[s] = reader
        return reader

    def _read_shard(self, s: int, lists: list[int]) -> list[tuple[int, ListRows]]:
        """Lists ``lists`` (ascending) of shard ``s``, each chunk they touch read once (on an object
        store, one GET per chunk). A few runs of consecutive lists are read as one slice each;
        many scattered lists (a small batch), or runs that would share a chunk, as one gather of
        their rows, in which Zarr fetches each chunk once, concurrently (measured faster than a
        slice per run once there are more than a handful)."""
        shard = self.shard(s)
        slices = _slices(shard, np.asarray(lists, dtype=np.int64))
        if slices is not None and len(slices) < _MAX_SLICES:
            reads = [(np.arange(l0, l1), shard.read(l0, l1)) for l0, l1 in slices]
        else:
            reads = [(np.asarray(lists), shard.read_lists(np.asarray(lists, dtype=np.int64)))]
        wanted = set(lists)
        out = []
        for covered, rows in reads:
            # a slice that also holds unprobed lists is cut into copies: the cache keeps no unprobed rows alive
            copy = len(covered) > np.isin(covered, lists).sum()
            for i, lst in enumerate(covered.tolist()):
                if lst not in wanted:
                    continue
                a, b = int(rows.offsets[i]), int(rows.offsets[i + 1])
                codes, ids, raw = (None if x is None else x[a:b].copy() if copy else x[a:b]
                                   for x in (rows.codes, rows.ids, rows.raw))
                out.append((lst, ListRows(codes, ids, np.array([0, b - a], np.int64), raw)))
        with self._lock:
            self.stats.reads += len(reads)
            self.stats.lists_read += len(out)
            self.stats.vectors_read += sum(len(rows.ids) for _, rows in out)
            self.stats.read_lists.update(lst for lst, _ in out)
        return out

    def fetch(self, lists: np.ndarray) -> ListBlock:
        """The rows of ``lists`` (ascending), concatenated in that order. The lists not in the
        cache are read shard by shard, one call per array and shard.

        Peak memory: the probed lists twice (read rows + the concatenation).
        """
        got: dict[int, ListRows] = {}
        missing = []
        with self._lock:
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
                read = self._read_shard(int(s), [m for m, t in zip(missing, shard_of) if t == s])
                got.update(read)
                with self._lock:
                    for lst, rows in read:
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
        """Cache ``rows`` as list ``lst`` (the caller holds ``_lock``)."""
        size = len(rows.ids) * self.row_bytes
        if size > self.cache_bytes or lst in self._cache:  # another thread read it too
            return
        self._cache[lst] = rows
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old.ids) * self.row_bytes

    def load_all(self) -> ListBlock:
        """Make the whole index resident: one block of every list, in list order (read once,
        however many threads ask at the same time)."""
        if self.resident is None:
            with self._load_lock:
                if self.resident is None:
                    parts = [self.shard(s).read_all() for s in range(len(self.manifest.shards))]
                    codes, ids, raw = self._concat(parts)
                    with self._lock:
                        self.stats.reads += len(parts)
                        self.stats.vectors_read += sum(e.ntotal for e in self.manifest.shards)
                        self._cache.clear()
                        self._cached_bytes = 0
                    self.resident = ListBlock(np.arange(len(self.list_sizes), dtype=np.int64), self.global_offsets,
                                              codes, ids, raw)
                    log.info("index %s resident in memory: %.1f MiB", self.store.url, self.nbytes / 2**20)
        return self.resident
