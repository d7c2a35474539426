"""Reading inverted lists from the store: only the probed ones, through the manifest.

Two modes:

* streaming (default): every batch reads the lists it probes (adjacent probed lists of a shard
  are read as one slice), keeping recently used lists in an LRU cache of ``cache_bytes``;
* resident: the whole index is loaded once into one contiguous array in list order
  (``Index.load()``, or automatically when ``cache_bytes`` covers the whole index), after which
  a batch reads nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from distann.codecs.base import Codec
from distann.errors import IndexFormatError
from distann.store.arrays import CheckedStore, StoredArray
from distann.store.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class ReadStats:
    """What searches have read from the store so far (tests use it to check lazy reading)."""

    lists_read: int = 0
    vectors_read: int = 0
    reads: int = 0
    cache_hits: int = 0
    read_lists: set[int] = field(default_factory=set)


class ListStore:
    def __init__(self, store: CheckedStore, manifest: Manifest, codec: Codec, list_sizes: np.ndarray,
                 cache_bytes: int):
        self.store = store
        self.manifest = manifest
        self.codec = codec
        self.list_sizes = list_sizes
        self.cache_bytes = int(cache_bytes)
        self.stats = ReadStats()
        self._shard_starts = np.array([s.list_start for s in manifest.shards], dtype=np.int64)
        self._shards: dict[int, tuple[np.ndarray, StoredArray, StoredArray]] = {}
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self.resident: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.global_offsets = np.zeros(len(list_sizes) + 1, dtype=np.int64)
        np.cumsum(list_sizes, out=self.global_offsets[1:])

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded index in memory (float32 vectors + int64 ids)."""
        return int(self.global_offsets[-1]) * (self.codec.d * 4 + 8)

    def shard_arrays(self, s: int) -> tuple[np.ndarray, StoredArray, StoredArray]:
        """Shard ``s``: its offsets (read), codes and ids (opened, not read), checked against
        the manifest."""
        if s not in self._shards:
            entry = self.manifest.shards[s]
            offsets = StoredArray(self.store, f"{entry.path}/offsets").read()
            codes = StoredArray(self.store, f"{entry.path}/codes")
            ids = StoredArray(self.store, f"{entry.path}/ids")
            nl = entry.list_stop - entry.list_start
            if (offsets.shape != (nl + 1,) or offsets[-1] != entry.ntotal or codes.shape[0] != entry.ntotal
                    or ids.shape != (entry.ntotal,)
                    or not np.array_equal(np.diff(offsets), self.list_sizes[entry.list_start:entry.list_stop])):
                raise IndexFormatError(f"{self.store.url}: shard {entry.name} does not match the manifest "
                                       f"(corrupt index)")
            self._shards[s] = (offsets, codes, ids)
        return self._shards[s]

    def _read_run(self, s: int, l0: int, l1: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Lists [l0, l1) of shard ``s`` (consecutive lists, so one contiguous slice)."""
        offsets, codes, ids = self.shard_arrays(s)
        base = self.manifest.shards[s].list_start
        r0, r1 = int(offsets[l0 - base]), int(offsets[l1 - base])
        xs = self.codec.decode(codes.read(r0, r1)) if r1 > r0 else np.empty((0, self.codec.d), np.float32)
        idv = ids.read(r0, r1).astype(np.int64, copy=False) if r1 > r0 else np.empty(0, np.int64)
        self.stats.reads += 1
        self.stats.vectors_read += r1 - r0
        out = []
        for lst in range(l0, l1):
            a, b = int(offsets[lst - base]) - r0, int(offsets[lst + 1 - base]) - r0
            out.append((lst, xs[a:b], idv[a:b]))
            self.stats.lists_read += 1
            self.stats.read_lists.add(lst)
        return out

    def fetch(self, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectors, ids and offsets of ``lists`` (ascending), concatenated in that order.

        Peak memory: the probed lists twice (read slices + the concatenation).
        """
        got: dict[int, tuple[np.ndarray, np.ndarray]] = {}
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
            shard_of = np.searchsorted(self._shard_starts, missing, side="right") - 1
            run_start = 0
            for i in range(1, len(missing) + 1):
                if i == len(missing) or missing[i] != missing[i - 1] + 1 or shard_of[i] != shard_of[i - 1]:
                    for lst, xs, idv in self._read_run(int(shard_of[run_start]), missing[run_start], missing[i - 1] + 1):
                        got[lst] = (xs, idv)
                        self._remember(lst, xs, idv)
                    run_start = i
        sizes = np.array([len(got[lst][1]) if lst in got else 0 for lst in lists.tolist()], dtype=np.int64)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        parts = [got[lst] for lst in lists.tolist() if lst in got]
        xb = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, self.codec.d), np.float32)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)
        return np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids), offsets

    def _remember(self, lst: int, xs: np.ndarray, idv: np.ndarray) -> None:
        size = xs.nbytes + idv.nbytes
        if size > self.cache_bytes:
            return
        self._cache[lst] = (np.ascontiguousarray(xs), np.ascontiguousarray(idv))
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, (ox, oi) = self._cache.popitem(last=False)
            self._cached_bytes -= ox.nbytes + oi.nbytes

    def load_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Make the whole index resident: (vectors, ids, global list offsets)."""
        if self.resident is None:
            n = int(self.global_offsets[-1])
            xb = np.empty((n, self.codec.d), dtype=np.float32)
            ids = np.empty(n, dtype=np.int64)
            for s, entry in enumerate(self.manifest.shards):
                offsets, codes, idarr = self.shard_arrays(s)
                g0 = int(self.global_offsets[entry.list_start])
                if entry.ntotal:
                    xb[g0:g0 + entry.ntotal] = self.codec.decode(codes.read())
                    ids[g0:g0 + entry.ntotal] = idarr.read()
                self.stats.reads += 1
                self.stats.vectors_read += entry.ntotal
            self.resident = (xb, ids, self.global_offsets)
            self._cache.clear()
            self._cached_bytes = 0
            log.info("index %s resident in memory: %.1f MiB", self.store.url, self.nbytes / 2**20)
        return self.resident
