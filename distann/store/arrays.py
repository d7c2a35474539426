"""The Zarr arrays of an index: written whole, read back with lost chunks treated as corruption.

Zarr reads an absent chunk as the array's fill value, so a deleted chunk file inside an index
would silently read as zeros. distann therefore writes every chunk of every array (also the
all-zero ones: ``write_empty_chunks``), and reads committed arrays through a
:class:`CheckedStore`, on which a chunk that is absent, or whose size is not the size of an
uncompressed chunk, is an :class:`~distann.errors.IndexFormatError` naming the array and the
chunk. The check costs no extra I/O: it looks at what each chunk read returned.

Bad chunks are not raised inside Zarr's asynchronous read (that would leave the other chunk
reads of the same call pending); the store records them and reads them as missing, and
:meth:`StoredArray.read` raises once Zarr's call has returned.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from distann.errors import IndexFormatError

_METADATA_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def write_array(store: Store, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Create (or replace) array ``name`` holding ``data``, uncompressed, every chunk stored."""
    arr = zarr.create_array(store, name=name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                            compressors=None, fill_value=0, overwrite=True, config={"write_empty_chunks": True})
    if data.size:
        arr[...] = data


def write_small(store: Store, name: str, data: np.ndarray) -> str:
    """Write a small array (centroids, list sizes, codec parameters) as one chunk; return its checksum."""
    data = np.ascontiguousarray(data)
    write_array(store, name, data, tuple(max(1, s) for s in data.shape))
    return checksum([data])


def checksum(arrays: Iterable[np.ndarray]) -> str:
    """CRC-32 over the bytes of ``arrays`` in order, as ``"crc32:%08x"``."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).data, crc)
    return f"crc32:{crc:08x}"


class CheckedStore(WrapperStore):
    """A read view of an index's store that records chunks read as absent or of the wrong size.

    Only arrays opened through :class:`StoredArray` are checked (they register the byte size
    of their chunks); ``strict=False`` (format version 1, which did not store all-zero
    chunks) lets absent chunks read as zeros and still catches wrong-sized ones.
    """

    def __init__(self, store: Store, url: str, strict: bool = True):
        super().__init__(store)
        self.url = url
        self.strict = strict
        self.chunk_nbytes: dict[str, int | None] = {}  # array path -> stored chunk size (None: compressed)
        self.bad: dict[str, str] = {}  # chunk key -> what is wrong with it

    def _with_store(self, store: Store) -> CheckedStore:
        other = type(self)(store, self.url, self.strict)
        other.chunk_nbytes, other.bad = self.chunk_nbytes, self.bad
        return other

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        array, sep, _ = key.rpartition("/c/")  # the default v3 chunk key encoding, as distann writes
        if not sep or array not in self.chunk_nbytes or key.endswith(_METADATA_KEYS):
            return buf
        expected = self.chunk_nbytes[array]
        if buf is None:
            if self.strict:
                self.bad[key] = "is missing"
        elif byte_range is None and expected is not None and len(buf) != expected:
            self.bad[key] = f"has {len(buf)} bytes, expected {expected} (truncated or overwritten)"
            return None
        return buf


class StoredArray:
    """One committed array, read by row ranges through a :class:`CheckedStore`."""

    def __init__(self, store: CheckedStore, path: str):
        self.store = store
        self.path = path
        try:
            self._arr = zarr.open_array(store, path=path, mode="r", zarr_format=3)
        except FileNotFoundError:
            raise IndexFormatError(f"{store.url}: array {path} is missing; the index is corrupt") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise IndexFormatError(f"{store.url}: array {path} is unreadable ({exc}); the index is corrupt") from None
        meta = self._arr.metadata
        self.shape: tuple[int, ...] = tuple(self._arr.shape)
        self.dtype = np.dtype(self._arr.dtype)
        self.chunks: tuple[int, ...] = tuple(meta.chunk_grid.chunk_shape)
        plain = all(type(c).__name__ == "BytesCodec" for c in meta.codecs)
        store.chunk_nbytes[path] = math.prod(self.chunks) * self.dtype.itemsize if plain else None

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` (all rows by default); IndexFormatError if a chunk is bad."""
        stop = self.shape[0] if stop is None else stop
        try:
            data = self._arr[start:stop] if self.shape else self._arr[...]
        except (ValueError, TypeError) as exc:  # a chunk a compressed array cannot decode
            raise IndexFormatError(f"{self.store.url}: array {self.path}: rows [{start}, {stop}) cannot be "
                                   f"decoded ({exc}); the index is corrupt") from None
        self._raise_if_bad(start, stop)
        return np.asarray(data)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at ``rows`` (sorted int64) in one call: Zarr reads each chunk they touch once,
        concurrently. IndexFormatError if one of those chunks is bad."""
        if len(rows) == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        data = self._arr.oindex[(rows,) + (slice(None),) * (len(self.shape) - 1)]
        if self.store.bad:
            self._raise_for_chunks(np.unique(rows // self.chunks[0]))
        return np.asarray(data)

    def _raise_if_bad(self, start: int, stop: int) -> None:
        if not self.store.bad or stop <= start:
            return
        self._raise_for_chunks(range(start // self.chunks[0], (stop - 1) // self.chunks[0] + 1))

    def _raise_for_chunks(self, rows) -> None:
        rest = [range(math.ceil(s / c)) for s, c in zip(self.shape[1:], self.chunks[1:])]
        for coords in itertools.product((int(r) for r in rows), *rest):
            key = f"{self.path}/{self._arr.metadata.encode_chunk_key(coords)}"
            problem = self.store.bad.get(key)
            if problem is not None:
                raise IndexFormatError(f"{self.store.url}: array {self.path}: chunk "
                                       f"{self._arr.metadata.encode_chunk_key(coords)} {problem}; "
                                       "the index is corrupt (rebuild it, or restore the file)")


def read_small(store: CheckedStore, path: str) -> np.ndarray:
    """A whole (small) array: centroids, list sizes, codec parameters."""
    return StoredArray(store, path).read()
