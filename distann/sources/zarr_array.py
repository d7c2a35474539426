"""A Zarr array (format 3 or 2) as a vector or id source.

The URL names the array itself, or a group with ``column`` the path of the array inside
it. Local paths are opened with ``zarr.storage.LocalStore``, anything else with
``zarr.storage.FsspecStore.from_url`` (which wraps synchronous filesystems such as
``memory://`` for zarr's async API; ``memory://`` is per process, like fsspec's). Rows are
read by slicing the array, so zarr fetches only the chunks overlapping the range.

The fingerprint is the URL, column, shape, dtype, chunks and the version stamp (etag or
mtime) of the array's metadata document: rewriting the array changes it; editing chunk
data in place without touching the metadata does not (listing every chunk of a large
array on each open would cost more than it is worth).
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from distann.errors import ValidationError
from distann.sources._fileset import OpenRequest
from distann.sources.base import (
    IdSource,
    VectorSource,
    assign_ids,
    check_id_dtype,
    check_id_shape,
    check_nonempty,
    check_vector_dtype,
    check_vector_shape,
    file_stamp,
    make_fingerprint,
)

logger = logging.getLogger(__name__)


def _store(url: str, storage_options: dict[str, Any]):
    import fsspec.core
    from fsspec.implementations.local import LocalFileSystem

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if isinstance(fs, LocalFileSystem):
        return LocalStore(path, read_only=True)
    return FsspecStore.from_url(url, storage_options=storage_options or None, read_only=True)


def _open(url: str, storage_options: dict[str, Any], column: str | None, param: str):
    """The zarr array at ``url``/``column``; a group without ``column`` lists its arrays."""
    try:
        node = zarr.open(_store(url, storage_options), mode="r", path=column or "")
    except Exception as exc:  # zarr raises several not-found types depending on format and store
        if column is not None:
            raise ValidationError(
                "column", column, f"no Zarr array at this path inside {url} ({type(exc).__name__}: {exc})"
            ) from exc
        raise ValidationError(param, url, f"cannot open a Zarr array there ({type(exc).__name__}: {exc})") from exc
    if isinstance(node, zarr.Group):
        arrays = sorted(name for name, m in node.members(max_depth=None) if isinstance(m, zarr.Array))
        where = f"{url} at {column!r}" if column else url
        raise ValidationError(
            "column", column, f"{where} is a Zarr group; pass column= the path of an array inside it: {arrays}"
        )
    return node


def _fingerprint(kind: str, req: OpenRequest, arr: Any) -> str:
    meta_name = "zarr.json" if arr.metadata.zarr_format == 3 else ".zarray"
    meta_path = posixpath.join(req.path.rstrip("/"), req.column or "", meta_name)
    try:
        stamp = file_stamp(req.fs.info(meta_path))
    except (FileNotFoundError, OSError):
        stamp = ""
    payload = {
        "url": req.url,
        "column": req.column,
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "chunks": list(arr.chunks),
        "meta": stamp,
    }
    return make_fingerprint(kind, payload)


class _ZarrBase:
    """Shared state: where the array is, opened lazily (and once) in each process."""

    url: str
    storage_options: dict[str, Any]
    column: str | None
    _param: str

    def _array(self):
        arr = self.__dict__.get("_arr")
        if arr is None:
            arr = _open(self.url, self.storage_options, self.column, self._param)
            self.__dict__["_arr"] = arr
        return arr

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_arr", None)
        return state

    def _open_request(self, req: OpenRequest) -> tuple[Any, str]:
        """Record where the array is, open it; returns (array, its name for messages)."""
        self.url = req.url
        self.storage_options = dict(req.storage_options)
        self.column = req.column
        self._param = req.param
        return self._array(), "the Zarr array" + (f" {req.column!r}" if req.column else "")


class ZarrSource(_ZarrBase, VectorSource):
    """Vectors from a 2-D numeric Zarr array."""

    def __init__(self, req: OpenRequest):
        arr, where = self._open_request(req)
        self.n, self.d = check_vector_shape(arr.shape, req.param, req.url, where)
        self.dtype = check_vector_dtype(np.dtype(arr.dtype), req.param, req.url, where)
        check_nonempty(self.n, req.param, req.url)
        self.chunks = tuple(arr.chunks)
        self.fingerprint = _fingerprint("zarr", req, arr)

    def _read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        out[...] = self._array()[start:stop]

    def ids_from_column(self, column: str) -> ZarrIdSource:
        """Ids from the array ``column`` of the Zarr group holding the vectors (``column=`` of the source)."""
        from distann.sources import open_ids

        if self.column is None:
            return super().ids_from_column(column)
        return open_ids(self.url, column=column, storage_options=self.storage_options)

    def _token(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.url, self.column, self.fingerprint)


class ZarrIdSource(_ZarrBase, IdSource):
    """Ids from a 1-D (or (n, 1)) integer Zarr array."""

    def __init__(self, req: OpenRequest):
        arr, where = self._open_request(req)
        self.n = check_id_shape(arr.shape, req.param, req.url, where)
        self.dtype = check_id_dtype(np.dtype(arr.dtype), req.param, req.url, where)
        check_nonempty(self.n, req.param, req.url)
        self.fingerprint = _fingerprint("zarr-ids", req, arr)

    def _read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        assign_ids(out, np.asarray(self._array()[start:stop]), "ids", self.url)

    def _token(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.url, self.column, self.fingerprint)


def open_vectors(req: OpenRequest) -> ZarrSource:
    return ZarrSource(req)


def open_ids(req: OpenRequest) -> ZarrIdSource:
    return ZarrIdSource(req)
