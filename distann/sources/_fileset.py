"""Files concatenated by rows: the machinery shared by the .npy, vecs and Parquet sources.

A URL names one file, a directory or a glob. :func:`list_entries` turns it into
:class:`FileEntry` records (path, size, version stamp) from a single listing; a format
module then probes each file (header, footer) to get its row count and per-file metadata,
and :class:`FileSet` keeps the files in name order with their row offsets. A read of rows
``[start, stop)`` visits only the files overlapping the range, and ``subset`` cuts the set
down to those files so a Dask task carries a few paths, not the whole listing.
"""

from __future__ import annotations

import copy
import logging
import posixpath
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from distann.errors import ValidationError
from distann.sources.base import IdSource, VectorSource, check_nonempty, file_stamp, make_fingerprint

logger = logging.getLogger(__name__)

GLOB_CHARS = "*?["
_PROBE_THREADS = 16

T = TypeVar("T")


@dataclass(frozen=True)
class FileEntry:
    """One file as listed: fs-internal path, size in bytes, version stamp (etag/mtime)."""

    path: str
    size: int
    stamp: str

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> FileEntry:
        return cls(path=info["name"], size=int(info.get("size") or 0), stamp=file_stamp(info))


@dataclass
class OpenRequest:
    """What a format module's ``open_vectors``/``open_ids`` receives from the registry."""

    url: str
    storage_options: dict[str, Any]
    fs: Any
    path: str  # fs-internal path of the URL (a file, a directory or a glob)
    entries: list[FileEntry] = field(default_factory=list)  # the files, sorted by name
    column: str | None = None
    param: str = "source"  # "source" or "ids": the parameter named in errors


def is_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)


def extension(path: str) -> str:
    """Lower-case extension of the last path component (``""`` if none)."""
    return posixpath.splitext(posixpath.basename(path.rstrip("/")))[1].lower()


def is_hidden(path: str) -> bool:
    """Files that datasets tools leave beside the data (``_SUCCESS``, ``.crc``, ``_metadata``)."""
    base = posixpath.basename(path.rstrip("/"))
    return base.startswith((".", "_"))


def list_directory(fs: Any, path: str) -> list[FileEntry]:
    """The visible files directly inside ``path``, sorted by name."""
    infos = fs.ls(path, detail=True)
    entries = [FileEntry.from_info(i) for i in infos if i.get("type") == "file" and not is_hidden(i["name"])]
    return sorted(entries, key=lambda e: e.path)


def list_glob(fs: Any, path: str) -> list[FileEntry]:
    """The files matching the glob ``path``, sorted by name."""
    infos = fs.glob(path, detail=True)
    entries = [FileEntry.from_info(i) for i in infos.values() if i.get("type") == "file"]
    return sorted(entries, key=lambda e: e.path)


def probe_all(entries: Sequence[FileEntry], probe: Callable[[FileEntry], T]) -> list[T]:
    """``[probe(e) for e in entries]``, on a few threads when there are many (remote latency)."""
    if len(entries) <= 1:
        return [probe(e) for e in entries]
    with ThreadPoolExecutor(max_workers=min(_PROBE_THREADS, len(entries))) as pool:
        return list(pool.map(probe, entries))


class FileSet:
    """Files read as one matrix: entries, per-file metadata and row offsets. Picklable."""

    def __init__(self, url: str, storage_options: dict[str, Any], entries: Sequence[FileEntry],
                 counts: Sequence[int], metas: Sequence[Any]):
        self.url = url
        self.storage_options = dict(storage_options)
        self.entries = tuple(entries)
        self.metas = tuple(metas)
        self.offsets = np.zeros(len(self.entries) + 1, dtype=np.int64)
        np.cumsum(np.asarray(counts, dtype=np.int64), out=self.offsets[1:])
        self._fs: Any = None

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @property
    def fs(self) -> Any:
        """The filesystem, opened lazily in the reading process (fsspec caches instances)."""
        if self._fs is None:
            import fsspec.core

            self._fs = fsspec.core.url_to_fs(self.url, **self.storage_options)[0]
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    def pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """``(file index, first row in file, end row in file, position in output)`` over ``[start, stop)``."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        i = first
        while i < len(self.entries) and self.offsets[i] < stop:
            base = int(self.offsets[i])
            lo, hi = max(start, base) - base, min(stop, int(self.offsets[i + 1])) - base
            if hi > lo:
                yield i, lo, hi, base + lo - start
            i += 1

    def subset(self, start: int, stop: int) -> tuple[FileSet, int]:
        """The files overlapping ``[start, stop)`` as a new set, and the global row it starts at."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left"))
        first = min(max(first, 0), len(self.entries) - 1)
        last = max(last, first + 1)
        sub = copy.copy(self)
        sub.entries = self.entries[first:last]
        sub.metas = self.metas[first:last]
        sub.offsets = self.offsets[first : last + 1] - self.offsets[first]
        return sub, int(self.offsets[first])

    def fingerprint(self, kind: str, extra: Any = None) -> str:
        payload = {"url": self.url, "extra": extra, "files": [[e.path, e.size, e.stamp] for e in self.entries]}
        return make_fingerprint(kind, payload)


def check_consistent(req: OpenRequest, shapes: Sequence[tuple[str, int, np.dtype]]) -> tuple[int, np.dtype]:
    """All files share ``d`` and ``dtype`` (``shapes``: path, d, dtype per file); returns them."""
    path0, d0, dtype0 = shapes[0]
    for path, d, dtype in shapes[1:]:
        if d != d0 or dtype != dtype0:
            raise ValidationError(
                req.param,
                req.url,
                f"file {path} has d={d}, dtype {dtype} but {path0} has d={d0}, dtype {dtype0}; "
                "all files of a source must share d and dtype",
            )
    return d0, dtype0


class _FileSetRows:
    """What both file-set sources share: reading a row range piece by piece across files."""

    _files: FileSet
    n: int

    def _read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        fs = self._files.fs
        for i, lo, hi, pos in self._files.pieces(start, stop):
            self._read_file(fs, self._files.entries[i], self._files.metas[i], lo, hi, out[pos : pos + hi - lo])

    def _read_file(self, fs: Any, entry: FileEntry, meta: Any, lo: int, hi: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def _row_layout(self, meta: Any) -> tuple[int, int, int, np.dtype] | None:
        """(file offset of row 0, bytes per row, offset of the values in a row, value dtype) of
        formats whose rows have a fixed size, or None."""
        return None

    def _read_rows_at(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Only the rows asked for: local files are memory-mapped (only the pages holding those
        rows are read), others read by ranged requests, rows closer than 1 MiB in one request."""
        from fsspec.implementations.local import LocalFileSystem

        files = self._files
        if self._row_layout(files.metas[0]) is None:
            super()._read_rows_at(rows, out)  # type: ignore[misc]
            return
        bounds = np.searchsorted(rows, files.offsets)
        for i in range(len(files.entries)):
            a, b = int(bounds[i]), int(bounds[i + 1])
            if a == b:
                continue
            base, stride, skip, dtype = self._row_layout(files.metas[i])
            local = rows[a:b] - files.offsets[i]
            width = out.shape[1] * dtype.itemsize
            path = files.entries[i].path
            nrows = int(files.offsets[i + 1] - files.offsets[i])
            if base + nrows * stride > files.entries[i].size:
                raise ValidationError("source", self.url, f"file {path} is shorter than its header says")
            if isinstance(files.fs, LocalFileSystem):
                table = np.memmap(path, dtype=np.uint8, mode="r", offset=base, shape=(nrows, stride))
                out[a:b] = table[local, skip:skip + width].view(dtype)
                del table
                continue
            gap = max(1, (1 << 20) // stride)
            cuts = np.flatnonzero(np.diff(local) > gap) + 1
            starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(local)]])
            first, last = local[starts], local[stops - 1] + 1
            blobs = files.fs.cat_ranges([path] * len(starts), (base + first * stride).tolist(),
                                        (base + last * stride).tolist())
            for s, e, lo, hi, blob in zip(starts, stops, first, last, blobs):
                if len(blob) != (hi - lo) * stride:
                    raise ValidationError("source", self.url, f"file {path} ended early at row {lo}")
                table = np.frombuffer(blob, dtype=np.uint8).reshape(hi - lo, stride)
                out[a + s:a + e] = table[local[s:e] - lo, skip:skip + width].view(dtype)

    def _task_source(self, start: int, stop: int):
        sub = copy.copy(self)
        sub._files, offset = self._files.subset(start, stop)
        sub.n = sub._files.n
        return sub, offset

    def _token(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.url, self.fingerprint, self.n)


class FileSetVectorSource(_FileSetRows, VectorSource):
    """A :class:`VectorSource` over a :class:`FileSet`; formats implement ``_read_file``."""

    format_name = "files"

    def __init__(self, req: OpenRequest, files: FileSet, d: int, dtype: np.dtype, column: str | None = None):
        check_nonempty(files.n, req.param, req.url)
        self.url = req.url
        self.n = files.n
        self.d = int(d)
        self.dtype = np.dtype(dtype)
        self.column = column
        self._files = files
        self.fingerprint = files.fingerprint(self.format_name, column)

    @property
    def files(self) -> list[str]:
        """The fs-internal paths of the files, in row order."""
        return [e.path for e in self._files.entries]


class FileSetIdSource(_FileSetRows, IdSource):
    """An :class:`IdSource` over a :class:`FileSet`; formats implement ``_read_file``."""

    format_name = "files"

    def __init__(self, req: OpenRequest, files: FileSet, dtype: np.dtype, column: str | None = None):
        check_nonempty(files.n, req.param, req.url)
        self.url = req.url
        self.n = files.n
        self.dtype = np.dtype(dtype)
        self.column = column
        self._files = files
        self.fingerprint = files.fingerprint(self.format_name + "-ids", column)


def read_range(fs: Any, path: str, start: int, stop: int, param: str, url: str) -> bytes:
    """Bytes ``[start, stop)`` of ``path`` by a ranged read; a short read is a truncated file."""
    data = fs.cat_file(path, start=start, end=stop)
    if len(data) != stop - start:
        raise ValidationError(
            param, url, f"file {path} ended early: read {len(data)} bytes at offset {start}, expected {stop - start}"
        )
    return data
