"""``.npy`` files (one, a directory of them, or a glob) as vector or id sources.

The header is parsed from a small ranged read (``np.lib.format``); rows are then read by
byte offset with ``fs.cat_file(path, start, end)``, never by loading or memory-mapping the
file. Fortran-order files are refused (a row range is not contiguous in them) unless one
of the dimensions is 1, where both orders are the same bytes.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from distann.errors import ValidationError
from distann.sources._fileset import (
    FileEntry,
    FileSet,
    FileSetIdSource,
    FileSetVectorSource,
    OpenRequest,
    check_consistent,
    probe_all,
    read_range,
)
from distann.sources.base import (
    assign_ids,
    check_id_dtype,
    check_id_shape,
    check_vector_dtype,
    check_vector_shape,
)

logger = logging.getLogger(__name__)

_MAGIC = b"\x93NUMPY"
_PREFIX = 4096  # bytes read to get the header in one request (headers are usually 128)


@dataclass(frozen=True)
class NpyHeader:
    """Where the data of a .npy file starts and what it holds."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def read_header(fs: Any, entry: FileEntry, param: str, url: str) -> NpyHeader:
    """Parse the header of a .npy file from ranged reads and check the file is long enough."""
    path, size = entry.path, entry.size
    prefix = fs.cat_file(path, start=0, end=min(size, _PREFIX)) if size else b""
    if len(prefix) < 10 or not prefix.startswith(_MAGIC):
        raise ValidationError(
            param, url, f"file {path} ({size} bytes) is not a .npy file: no '\\x93NUMPY' magic and header"
        )
    major = prefix[6]
    if major == 1:
        header_len = 10 + struct.unpack("<H", prefix[8:10])[0]
    elif major in (2, 3) and len(prefix) >= 12:
        header_len = 12 + struct.unpack("<I", prefix[8:12])[0]
    else:
        raise ValidationError(param, url, f"file {path} has unsupported .npy format version {major}.{prefix[7]}")
    if size < header_len:
        raise ValidationError(
            param, url, f"file {path} is truncated: size {size} bytes, but its .npy header alone is {header_len} bytes"
        )
    if len(prefix) < header_len:
        prefix = fs.cat_file(path, start=0, end=header_len)
    buf = io.BytesIO(prefix[:header_len])
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf, max_header_size=header_len)
        else:  # 2.0 and 3.0 differ only in the header's text encoding
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf, max_header_size=header_len)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise ValidationError(param, url, f"file {path} has a corrupt .npy header: {exc}") from None
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = header_len + count * dtype.itemsize
    if size < expected:
        raise ValidationError(
            param,
            url,
            f"file {path} is truncated: size {size} bytes, expected {expected} bytes "
            f"for shape {tuple(shape)} {dtype}",
        )
    if size > expected:
        logger.debug("%s: %d trailing bytes after the array data", path, size - expected)
    return NpyHeader(offset=header_len, shape=tuple(int(s) for s in shape), dtype=dtype, fortran_order=bool(fortran))


def _check_order(h: NpyHeader, path: str, param: str, url: str) -> None:
    if h.fortran_order and len(h.shape) == 2 and min(h.shape) > 1:
        raise ValidationError(
            param,
            url,
            f"file {path} is stored in Fortran order; row ranges are not contiguous there: "
            "rewrite it C-ordered (np.save(path, np.ascontiguousarray(x)))",
        )


class NpySource(FileSetVectorSource):
    """Vectors from one or more .npy files (2-D, numeric), concatenated by rows."""

    format_name = "npy"

    def _read_file(self, fs: Any, entry: FileEntry, meta: NpyHeader, lo: int, hi: int, out: np.ndarray) -> None:
        row = self.d * meta.dtype.itemsize
        data = read_range(fs, entry.path, meta.offset + lo * row, meta.offset + hi * row, "source", self.url)
        out[...] = np.frombuffer(data, dtype=meta.dtype).reshape(hi - lo, self.d)

    def _row_layout(self, meta: NpyHeader):
        row = self.d * meta.dtype.itemsize
        return meta.offset, row, 0, meta.dtype


class NpyIdSource(FileSetIdSource):
    """Ids from one or more .npy files of an integer dtype, shape (n,) or (n, 1)."""

    format_name = "npy"

    def _read_file(self, fs: Any, entry: FileEntry, meta: NpyHeader, lo: int, hi: int, out: np.ndarray) -> None:
        size = meta.dtype.itemsize
        data = read_range(fs, entry.path, meta.offset + lo * size, meta.offset + hi * size, "ids", self.url)
        assign_ids(out, np.frombuffer(data, dtype=meta.dtype), "ids", entry.path)


def _no_column(req: OpenRequest) -> None:
    if req.column is not None:
        raise ValidationError("column", req.column, "only Parquet and Zarr sources take a column; .npy has none")


def open_vectors(req: OpenRequest) -> NpySource:
    """A :class:`NpySource` over ``req.entries``, validated (shape, dtype, sizes, consistency)."""
    _no_column(req)

    def probe(entry: FileEntry) -> tuple[NpyHeader, int, int]:
        h = read_header(req.fs, entry, req.param, req.url)
        n, d = check_vector_shape(h.shape, req.param, req.url, f"file {entry.path}")
        check_vector_dtype(h.dtype, req.param, req.url, f"file {entry.path}")
        _check_order(h, entry.path, req.param, req.url)
        return h, n, d

    probed = probe_all(req.entries, probe)
    d, dtype = check_consistent(req, [(e.path, d, h.dtype) for e, (h, _, d) in zip(req.entries, probed)])
    files = FileSet(req.url, req.storage_options, req.entries, [n for _, n, _ in probed], [h for h, _, _ in probed])
    return NpySource(req, files, d, dtype)


def open_ids(req: OpenRequest) -> NpyIdSource:
    """A :class:`NpyIdSource` over ``req.entries`` (integer dtype, 1-D or (n, 1))."""
    _no_column(req)

    def probe(entry: FileEntry) -> tuple[NpyHeader, int]:
        h = read_header(req.fs, entry, req.param, req.url)
        n = check_id_shape(h.shape, req.param, req.url, f"file {entry.path}")
        check_id_dtype(h.dtype, req.param, req.url, f"file {entry.path}")
        return h, n

    probed = probe_all(req.entries, probe)
    _, dtype = check_consistent(req, [(e.path, 1, h.dtype) for e, (h, _) in zip(req.entries, probed)])
    files = FileSet(req.url, req.storage_options, req.entries, [n for _, n in probed], [h for h, _ in probed])
    return NpyIdSource(req, files, dtype)
