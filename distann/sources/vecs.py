"""The TEXMEX ``.fvecs`` / ``.bvecs`` / ``.ivecs`` formats (SIFT, GIST, Deep1B...).

Each record is a little-endian int32 dimension ``d`` followed by ``d`` values: float32
(fvecs), uint8 (bvecs) or int32 (ivecs). All records of a file share ``d``, so
``n = size / (4 + d * itemsize)``; rows are read by byte range and every record's
dimension field is checked on read. Opening checks the first and last record's dimension
and that the size is a whole number of records (a truncated download is caught there).

Writers (:func:`write_fvecs`, :func:`write_bvecs`, :func:`write_ivecs`) stream blocks of
rows; :func:`read_ivecs` reads a whole (small) ground-truth file as int32.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from distann.errors import ValidationError
from distann.sources._fileset import (
    FileEntry,
    FileSet,
    FileSetVectorSource,
    OpenRequest,
    check_consistent,
    extension,
    probe_all,
    read_range,
)

logger = logging.getLogger(__name__)

#: value dtype of each extension
VALUE_DTYPES: dict[str, np.dtype] = {
    ".fvecs": np.dtype("<f4"),
    ".bvecs": np.dtype("u1"),
    ".ivecs": np.dtype("<i4"),
}
_WRITE_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class VecsMeta:
    """Per-file layout: dimension and value dtype."""

    d: int
    dtype: np.dtype

    @property
    def record(self) -> int:
        return 4 + self.d * self.dtype.itemsize


def _probe(fs: Any, entry: FileEntry, param: str, url: str) -> tuple[VecsMeta, int]:
    ext = extension(entry.path)
    dtype = VALUE_DTYPES[ext]
    path, size = entry.path, entry.size
    if size < 4:
        raise ValidationError(
            param, url, f"file {path} is truncated: size {size} bytes, expected at least one {ext} record"
        )
    d = int(np.frombuffer(read_range(fs, path, 0, 4, param, url), dtype="<i4")[0])
    if d <= 0:
        raise ValidationError(param, url, f"file {path} has record dimension {d}; need d > 0 (corrupt or not {ext})")
    meta = VecsMeta(d=d, dtype=dtype)
    rec = meta.record
    if size % rec:
        raise ValidationError(
            param,
            url,
            f"file {path} is truncated: size {size} bytes is not a multiple of the record size {rec} bytes "
            f"(4 + {d} x {dtype.itemsize}); expected {size // rec * rec} or {(size // rec + 1) * rec} bytes",
        )
    n = size // rec
    if n > 1:
        last = int(np.frombuffer(read_range(fs, path, size - rec, size - rec + 4, param, url), dtype="<i4")[0])
        if last != d:
            raise ValidationError(
                param, url, f"file {path}: last record has dimension {last}, first has {d}; all records must share d"
            )
    return meta, n


def _decode(data: bytes, meta: VecsMeta, rows: int, path: str, first_row: int, url: str) -> np.ndarray:
    """Values of ``rows`` records, checking every record's dimension field."""
    raw = np.frombuffer(data, dtype=np.uint8).reshape(rows, meta.record)
    dims = raw[:, :4].copy().view("<i4").ravel()
    bad = np.flatnonzero(dims != meta.d)
    if bad.size:
        k = int(bad[0])
        raise ValidationError(
            "source", url, f"file {path}: record {first_row + k} has dimension {int(dims[k])}, expected {meta.d}"
        )
    if meta.dtype.itemsize == 1:
        return raw[:, 4:]
    return np.frombuffer(data, dtype=meta.dtype).reshape(rows, meta.d + 1)[:, 1:]


class VecsSource(FileSetVectorSource):
    """Vectors from .fvecs / .bvecs / .ivecs files (one, a directory or a glob)."""

    format_name = "vecs"

    def _read_file(self, fs: Any, entry: FileEntry, meta: VecsMeta, lo: int, hi: int, out: np.ndarray) -> None:
        rec = meta.record
        data = read_range(fs, entry.path, lo * rec, hi * rec, "source", self.url)
        out[...] = _decode(data, meta, hi - lo, entry.path, lo, self.url)

    def _row_layout(self, meta: VecsMeta):
        return 0, meta.record, 4, meta.dtype


def open_vectors(req: OpenRequest) -> VecsSource:
    """A :class:`VecsSource` over ``req.entries`` (all with the same d and value type)."""
    if req.column is not None:
        raise ValidationError("column", req.column, "only Parquet and Zarr sources take a column; vecs files have none")
    probed = probe_all(req.entries, lambda e: _probe(req.fs, e, req.param, req.url))
    d, dtype = check_consistent(req, [(e.path, m.d, m.dtype) for e, (m, _) in zip(req.entries, probed)])
    files = FileSet(req.url, req.storage_options, req.entries, [n for _, n in probed], [m for m, _ in probed])
    return VecsSource(req, files, d, dtype)


# ----------------------------------------------------------------------------- whole-file helpers


def read_ivecs(url: str, *, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """A whole ``.ivecs`` file (ground truth, typically) as an int32 (n, d) array."""
    from distann.sources import open_source

    src = open_source(url, storage_options=storage_options)
    if not isinstance(src, VecsSource) or src.dtype != VALUE_DTYPES[".ivecs"]:
        raise ValidationError("url", url, f"need .ivecs file(s); this is a {type(src).__name__} of {src.dtype}")
    out = np.empty((src.n, src.d), dtype=np.int32)
    src._read_into(0, src.n, out)
    return out


def _write(url: str, x: Any, ext: str, storage_options: dict[str, Any] | None) -> None:
    import fsspec.core
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or extension(url) != ext:
        raise ValidationError("url", url, f"need a URL ending in {ext}")
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValidationError("x", f"shape {x.shape}", "need a 2-D (n, d) array with d > 0")
    if x.dtype.kind not in "iuf":
        raise ValidationError("x", f"dtype {x.dtype}", "need an integer or floating-point array")
    dtype = VALUE_DTYPES[ext]
    if dtype.kind in "iu" and x.size:
        info = np.iinfo(dtype)
        lo, hi = x.min(), x.max()
        integral = x.dtype.kind in "iu" or bool(np.all(np.mod(x, 1) == 0))
        if lo < info.min or hi > info.max or not integral:
            raise ValidationError(
                "x", f"values in [{lo}, {hi}]", f"{ext} holds integers in [{info.min}, {info.max}]"
            )
    n, d = x.shape
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    rows = max(1, _WRITE_BLOCK_BYTES // (4 + d * dtype.itemsize))
    head = np.array([d], dtype="<i4").view(np.uint8)
    with fs.open(path, "wb") as f:
        for a in range(0, n, rows):
            block = x[a : a + rows]
            rec = np.empty((len(block), 4 + d * dtype.itemsize), dtype=np.uint8)
            rec[:, :4] = head
            rec[:, 4:] = np.ascontiguousarray(block, dtype=dtype).view(np.uint8).reshape(len(block), -1)
            f.write(rec.tobytes())
    logger.debug("wrote %s: %d x %d %s", url, n, d, dtype)


def write_fvecs(url: str, x: Any, *, storage_options: dict[str, Any] | None = None) -> None:
    """Write the (n, d) array ``x`` as float32 records to ``url`` (a .fvecs file)."""
    _write(url, x, ".fvecs", storage_options)


def write_bvecs(url: str, x: Any, *, storage_options: dict[str, Any] | None = None) -> None:
    """Write the (n, d) array ``x`` (integers in [0, 255]) as uint8 records to ``url`` (.bvecs)."""
    _write(url, x, ".bvecs", storage_options)


def write_ivecs(url: str, x: Any, *, storage_options: dict[str, Any] | None = None) -> None:
    """Write the (n, d) array ``x`` (integers fitting int32) as int32 records to ``url`` (.ivecs)."""
    _write(url, x, ".ivecs", storage_options)
