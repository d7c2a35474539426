"""The Zarr arrays of an index: written whole, read back with lost or altered chunks treated as corruption.

Zarr reads an absent chunk as the array's fill value, so a deleted chunk file inside an index
would silently read as zeros. distann therefore writes every chunk of every array (also the
all-zero ones: ``write_empty_chunks``), each ending with the CRC-32C of its bytes (Zarr v3's
``crc32c`` codec), and reads committed arrays through a :class:`CheckedStore`, on which a chunk
that is absent, whose size is not the size of a stored chunk, or whose bytes do not match its
CRC-32C (a flipped bit), is an :class:`~distann.errors.IndexFormatError` naming the array and
the chunk (and, for shard arrays, the rows and lists it holds). The check costs no extra I/O:
it looks at what each chunk read returned. Arrays written before the checksum (no ``crc32c``
codec) are still read, with the size check alone.

Only the metadata distann writes is accepted (:func:`check_metadata`): numeric data types, the
``bytes`` and ``crc32c`` codecs, the default ``/`` chunk keys. Anything else — a pickle, object
or variable-length codec, which would run code or build Python objects from the index's bytes —
is refused from the ``zarr.json`` alone, before Zarr instantiates a codec or reads a chunk.

Bad chunks are not raised inside Zarr's asynchronous read (that would leave the other chunk
reads of the same call pending); the store records them and reads them as missing, and
:meth:`StoredArray.read` raises once Zarr's call has returned.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.codecs import Crc32cCodec
from zarr.core.array import AsyncArray
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import StorePath, WrapperStore

from distann.errors import IndexFormatError, StorageFullError

_METADATA_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
_CODECS = ("bytes", "crc32c")  # the only codecs distann writes (crc32c since format 3's checksummed chunks)
_DATA_TYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                         "float16", "float32", "float64"})
CRC_BYTES = 4  # the crc32c codec's trailer


@contextmanager
def disk_full_error(what: str, where: str) -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) met while writing ``what`` at ``where`` into a
    StorageFullError naming them: the OSError a write raises then names no path."""
    try:
        yield
    except StorageFullError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StorageFullError(exc.errno, f"{where}: {os.strerror(exc.errno)} while writing {what}; free space "
                                          "(or raise the quota) there and rerun the same build: it resumes, "
                                          "keeping the add and merge tasks already finished; the committed "
                                          "index is unchanged") from exc


def store_url(store: Store) -> str:
    """The root of a Zarr store as a path or URL, for messages."""
    if getattr(store, "root", None) is not None:  # LocalStore
        return str(store.root)
    fs, path = getattr(store, "fs", None), getattr(store, "path", "")
    protocol = getattr(fs, "protocol", "")
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    return f"{protocol}://{path}" if protocol else str(path)


def write_array(store: Store, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Create (or replace) array ``name`` holding ``data``, uncompressed, every chunk stored and
    followed by its CRC-32C."""
    arr = zarr.create_array(store, name=name, shape=data.shape, chunks=chunks, dtype=data.dtype,
                            compressors=[Crc32cCodec()], fill_value=0, overwrite=True,
                            config={"write_empty_chunks": True})
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


def check_metadata(doc: object, url: str, path: str) -> dict:
    """``doc`` (an array's parsed ``zarr.json``) if it describes an array as distann writes them,
    else IndexFormatError. Checked before Zarr sees it: a pickle, object or variable-length
    codec or data type is refused without instantiating anything."""
    def refuse(what: str) -> IndexFormatError:
        return IndexFormatError(f"{url}: array {path}: its zarr.json {what}; distann reads only uncompressed "
                                f"numeric arrays (data types {', '.join(sorted(_DATA_TYPES))}; codecs "
                                f"{' and '.join(_CODECS)}), so it refuses this array before reading any chunk "
                                "(an untrusted or corrupt index)")

    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "array":
        raise refuse("is not Zarr v3 array metadata")
    dtype = doc.get("data_type")
    if not isinstance(dtype, str) or dtype not in _DATA_TYPES:
        raise refuse(f"declares data type {json.dumps(dtype)[:80]}")
    codecs = doc.get("codecs")
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs] if isinstance(codecs, list) else None
    if names not in (["bytes"], ["bytes", "crc32c"]):
        raise refuse(f"declares codecs {json.dumps(names if names is not None else codecs)[:120]}")
    keys = doc.get("chunk_key_encoding")
    if not (isinstance(keys, dict) and keys.get("name") == "default"
            and (keys.get("configuration") or {}).get("separator", "/") == "/"):
        raise refuse(f"declares chunk key encoding {json.dumps(keys)[:80]} (the checks need the default '/' keys)")
    if doc.get("storage_transformers") or not isinstance(doc.get("chunk_grid"), dict) \
            or doc["chunk_grid"].get("name") != "regular":
        raise refuse("declares a storage transformer or a chunk grid other than 'regular'")
    return doc


class CheckedStore(WrapperStore):
    """A read view of an index's store that records chunks read as absent, of the wrong size,
    or (arrays with the ``crc32c`` codec) not matching their CRC-32C.

    Only arrays opened through :class:`StoredArray` are checked (they register the byte size
    of their chunks); ``strict=False`` (format version 1, which did not store all-zero
    chunks) lets absent chunks read as zeros and still catches wrong-sized ones.

    A good chunk is handed to Zarr without its CRC-32C trailer (:class:`StoredArray` opens the
    array as plain ``bytes``), so the checksum is computed once per chunk read.

    A bad chunk is read as absent (Zarr fills it with the fill value, and the other chunk reads
    of the call complete) and recorded in ``bad``; :class:`StoredArray` raises once Zarr's call
    has returned. Entries are never removed, so a thread that reads a bad chunk after another
    one recorded it also raises: no reader is ever handed the fill value of a bad chunk.
    """

    def __init__(self, store: Store, url: str, strict: bool = True):
        super().__init__(store)
        self.url = url
        self.strict = strict
        # array path -> (stored chunk size, whether it ends with a CRC-32C)
        self.chunk_format: dict[str, tuple[int, bool]] = {}
        self.bad: dict[str, str] = {}  # chunk key -> what is wrong with it

    def _with_store(self, store: Store) -> CheckedStore:
        other = type(self)(store, self.url, self.strict)
        other.chunk_format, other.bad = self.chunk_format, self.bad
        return other

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        array, sep, _ = key.rpartition("/c/")  # the default v3 chunk key encoding (check_metadata requires it)
        if not sep or array not in self.chunk_format or key.endswith(_METADATA_KEYS):
            return buf
        expected, crc = self.chunk_format[array]
        if buf is None:
            if self.strict:
                self.bad[key] = "is missing"
        elif byte_range is None and len(buf) != expected:
            self.bad[key] = f"has {len(buf)} bytes, expected {expected} (truncated or overwritten)"
            return None
        elif crc and byte_range is None:
            data = buf.as_numpy_array()
            stored = bytes(data[-CRC_BYTES:])
            if np.uint32(google_crc32c.value(data[:-CRC_BYTES])).tobytes() != stored:  # as Zarr's codec writes it
                self.bad[key] = "fails its CRC-32C checksum (a flipped bit or overwritten bytes)"
                return None
            return buf[:-CRC_BYTES]  # checked here, once: StoredArray reads it as a plain `bytes` chunk
        return buf


class StoredArray:
    """One committed array, read by row ranges through a :class:`CheckedStore`.

    ``where(r0, r1)``, when set by the owner (a shard reader), describes what rows ``[r0, r1)``
    hold (``"lists 3-5 of shard s000000"``) for the error naming a bad chunk.
    """

    def __init__(self, store: CheckedStore, path: str):
        self.store = store
        self.path = path
        self.where: Callable[[int, int], str] | None = None
        try:
            raw = sync(store.get(f"{path}/zarr.json", default_buffer_prototype()))
            if raw is None:
                raise FileNotFoundError(path)
            doc = check_metadata(json.loads(raw.to_bytes()), store.url, path)
            crc = len(doc["codecs"]) == 2
            # the store checks and strips each chunk's CRC-32C: Zarr decodes the rest as plain
            # bytes (its fast path, and the checksum computed once instead of twice)
            read = {**doc, "codecs": doc["codecs"][:1]}
            self._arr = zarr.Array(AsyncArray(metadata=read, store_path=StorePath(store, path)))
        except FileNotFoundError:
            raise IndexFormatError(f"{store.url}: array {path} is missing; the index is corrupt") from None
        except (KeyError, ValueError, TypeError) as exc:
            raise IndexFormatError(f"{store.url}: array {path} is unreadable ({exc}); the index is corrupt") from None
        meta = self._arr.metadata
        self.shape: tuple[int, ...] = tuple(self._arr.shape)
        self.dtype = np.dtype(self._arr.dtype)
        self.chunks: tuple[int, ...] = tuple(meta.chunk_grid.chunk_shape)
        store.chunk_format[path] = (math.prod(self.chunks) * self.dtype.itemsize + (CRC_BYTES if crc else 0), crc)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` (all rows by default); IndexFormatError if a chunk is bad."""
        stop = self.shape[0] if stop is None else stop
        try:
            data = self._arr[start:stop] if self.shape else self._arr[...]
        except (ValueError, TypeError) as exc:  # a chunk that cannot be decoded
            raise IndexFormatError(f"{self.store.url}: array {self.path}: rows [{start}, {stop}) cannot be "
                                   f"decoded ({exc}); the index is corrupt") from None
        self._raise_if_bad(start, stop)
        return np.asarray(data)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at ``rows`` (sorted int64) in one call: Zarr reads each chunk they touch once,
        concurrently. IndexFormatError if one of those chunks is bad."""
        if len(rows) == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        try:
            data = self._arr.oindex[(rows,) + (slice(None),) * (len(self.shape) - 1)]
        except (ValueError, TypeError) as exc:
            raise IndexFormatError(f"{self.store.url}: array {self.path}: rows {int(rows[0])}-{int(rows[-1])} "
                                   f"cannot be decoded ({exc}); the index is corrupt") from None
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
                r0 = coords[0] * self.chunks[0] if self.shape else 0
                r1 = min(self.shape[0], r0 + self.chunks[0]) if self.shape else 1
                held = f": rows [{r0}, {r1})" + (f", {self.where(r0, r1)}" if self.where and r1 > r0 else "")
                raise IndexFormatError(f"{self.store.url}: array {self.path}: chunk "
                                       f"{self._arr.metadata.encode_chunk_key(coords)} {problem}{held}; "
                                       "the index is corrupt (rebuild it, or restore the file)")


def read_small(store: CheckedStore, path: str) -> np.ndarray:
    """A whole (small) array: centroids, list sizes, codec parameters."""
    return StoredArray(store, path).read()
