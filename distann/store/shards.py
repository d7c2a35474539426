"""List-range shards: the inverted lists of an index, written by the merge and read by searches.

A shard holds lists ``[list_start, list_stop)`` (``docs/FORMAT.md``)::

    offsets  (lists + 1,) int64     list l is rows offsets[l - list_start] : offsets[l - list_start + 1]
    codes    (n_s, code_width)      the codec's codes, as stored (float32 for Flat, uint8 for SQ8/PQ, ...)
    ids      (n_s,) int64
    raw      (n_s, d) float32       raw vectors, RFlat indexes only

:func:`write_shard` writes them (every chunk stored, see ``store.arrays``) and returns the
checksum the manifest records; :class:`ShardReader` opens one shard through its manifest entry
and returns the rows of consecutive lists *as stored*: decoding is the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.abc.store import Store

from distann.errors import IndexFormatError
from distann.store.arrays import CheckedStore, StoredArray, checksum, disk_full_error, store_url, write_array
from distann.store.manifest import ShardEntry

ARRAYS = ("offsets", "codes", "ids", "raw")


def chunk_rows(n: int, row_bytes: int, target_bytes: int = 1 << 20) -> int:
    """Rows per Zarr chunk of an ``n``-row array: chunks of about ``target_bytes`` (at least 256
    rows), all of nearly the same size, so the padded last chunk (Zarr stores edge chunks whole)
    wastes less than one row per chunk instead of up to a whole chunk.

    Small chunks let a search read little more than the probed lists.
    """
    nchunks = max(1, -(-(n * row_bytes) // target_bytes))
    return max(1, min(n, max(256, -(-n // nchunks))))


def write_shard(store: Store, path: str, offsets: np.ndarray, codes: np.ndarray, ids: np.ndarray,
                raw: np.ndarray | None = None, chunk_bytes: int = 1 << 20) -> str:
    """Write one shard's arrays under ``path``, in chunks of about ``chunk_bytes`` (see
    :func:`chunk_rows`); returns its checksum (CRC-32 over offsets, ids, codes and raw, in that
    order)."""
    n = len(ids)
    with disk_full_error(f"shard {path.rpartition('/')[2]}", f"{store_url(store).rstrip('/')}/{path}"):
        write_array(store, f"{path}/offsets", offsets, (max(1, len(offsets)),))
        write_array(store, f"{path}/ids", ids, (chunk_rows(n, 8, chunk_bytes),))
        write_array(store, f"{path}/codes", codes,
                    (chunk_rows(n, codes.shape[1] * codes.dtype.itemsize, chunk_bytes), codes.shape[1]))
        if raw is not None:
            write_array(store, f"{path}/raw", raw, (chunk_rows(n, raw.shape[1] * 4, chunk_bytes), raw.shape[1]))
    return checksum([offsets, ids, codes] + ([raw] if raw is not None else []))


@dataclass(frozen=True)
class ListRows:
    """The rows of consecutive lists, as stored: list ``i`` of them is ``[offsets[i], offsets[i+1])``."""

    codes: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    raw: np.ndarray | None = None


class ShardReader:
    """One shard of a committed index, checked against its manifest entry when opened."""

    def __init__(self, store: CheckedStore, entry: ShardEntry, list_sizes: np.ndarray, raw: bool = False):
        self.entry = entry
        offsets = StoredArray(store, f"{entry.path}/offsets")
        offsets.where = self._lists_of_entries
        self.offsets = offsets.read()
        self.codes = StoredArray(store, f"{entry.path}/codes")
        self.ids = StoredArray(store, f"{entry.path}/ids")
        self.raw = StoredArray(store, f"{entry.path}/raw") if raw else None
        for arr in (self.codes, self.ids, self.raw):
            if arr is not None:
                arr.where = self._lists_of_rows
        nl = entry.list_stop - entry.list_start
        if (self.offsets.shape != (nl + 1,) or self.offsets[-1] != entry.ntotal
                or self.codes.shape[0] != entry.ntotal or self.ids.shape != (entry.ntotal,)
                or (self.raw is not None and self.raw.shape[0] != entry.ntotal)
                or not np.array_equal(np.diff(self.offsets), list_sizes)):
            raise IndexFormatError(f"{store.url}: shard {entry.name} does not match the manifest (corrupt index)")

    def _lists_of_entries(self, r0: int, r1: int) -> str:
        """What entries [r0, r1) of ``offsets`` describe (entry i: where list list_start + i starts)."""
        e = self.entry
        return f"the offsets of lists {e.list_start + r0}-{min(e.list_start + r1, e.list_stop) - 1} of shard {e.name}"

    def _lists_of_rows(self, r0: int, r1: int) -> str:
        """Which lists rows [r0, r1) of ``codes`` / ``ids`` / ``raw`` belong to (for errors)."""
        e = self.entry
        nl = e.list_stop - e.list_start
        first, last = (min(nl - 1, int(np.searchsorted(self.offsets, r, side="right")) - 1) for r in (r0, r1 - 1))
        return f"lists {e.list_start + first}-{e.list_start + last} of shard {e.name}"

    def read(self, l0: int, l1: int) -> ListRows:
        """Lists [l0, l1) (consecutive, global list numbers) in one contiguous read per array."""
        base = self.entry.list_start
        offsets = self.offsets[l0 - base:l1 - base + 1]
        r0, r1 = int(offsets[0]), int(offsets[-1])
        raw = self.raw.read(r0, r1) if self.raw is not None else None
        return ListRows(self.codes.read(r0, r1), self.ids.read(r0, r1).astype(np.int64, copy=False),
                        offsets - r0, raw)

    def read_lists(self, lists: np.ndarray) -> ListRows:
        """Lists ``lists`` (ascending global numbers, not necessarily consecutive) in one call per
        array: the chunks they touch are read once each, concurrently."""
        base = self.entry.list_start
        starts, stops = self.offsets[lists - base], self.offsets[lists - base + 1]
        sizes = stops - starts
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        rows = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1], dtype=np.int64)
        raw = self.raw.take(rows) if self.raw is not None else None
        return ListRows(self.codes.take(rows), self.ids.take(rows).astype(np.int64, copy=False), offsets, raw)

    def read_all(self) -> ListRows:
        return self.read(self.entry.list_start, self.entry.list_stop)

    def checksum(self) -> tuple[str, int]:
        """(checksum of the stored arrays, bytes read)."""
        rows = self.read_all()
        parts = [self.offsets, rows.ids, rows.codes] + ([rows.raw] if rows.raw is not None else [])
        return checksum(parts), sum(p.nbytes for p in parts)
