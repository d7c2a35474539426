"""Vector and id sources: out-of-core inputs opened by URL through fsspec.

``open_source(url)`` returns a :class:`VectorSource` (n, d, on-disk dtype, fingerprint,
``read_rows(start, stop)`` -> float32, ``to_dask(chunk_rows)``); ``open_ids(url)`` an
:class:`IdSource` (``read(start, stop)`` -> int64). URLs are anything fsspec resolves:
local paths, ``file://``, ``memory://``, and ``s3://`` / ``gs://`` when s3fs / gcsfs are
installed (``storage_options`` are passed to the filesystem).

Formats, chosen by extension through :data:`FORMATS` (implementations imported lazily):

* ``.npy`` — 2-D numeric, C order;
* ``.fvecs`` / ``.bvecs`` / ``.ivecs`` — TEXMEX records;
* ``.parquet`` / ``.pq`` — a fixed-size-list column (``column``, or the only one);
* ``.zarr`` (or any directory holding ``zarr.json`` / ``.zarray`` / ``.zgroup``) — a
  2-D Zarr array, ``column`` naming the array inside a group;
* a directory or a glob (``*``, ``?``, ``[``) of files of one of the file formats above,
  concatenated by rows in name order (hidden ``.``/``_`` files and unknown extensions
  in a directory are skipped; mixing formats is an error).

Nothing is loaded whole: opening reads headers / footers / metadata only, and every read
is a byte-range read of the rows asked for. All validation (not found, unknown format,
shape, dtype, truncation, inconsistent files) happens at open time and raises
:class:`distann.errors.ValidationError` naming ``source`` (``ids`` for ids) or ``column``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import numpy as np

from distann.errors import ValidationError
from distann.sources._fileset import (
    OpenRequest,
    extension,
    is_glob,
    is_hidden,
    list_directory,
    list_glob,
)
from distann.sources.base import IdSource, VectorSource
from distann.sources.memory import ArrayIdSource, ArraySource
from distann.sources.vecs import read_ivecs, write_bvecs, write_fvecs, write_ivecs
from distann.store.location import absolute_url
from distann.validation import check_url

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ArrayIdSource",
    "ArraySource",
    "IdSource",
    "VectorSource",
    "as_ids",
    "as_source",
    "open_ids",
    "open_source",
    "read_ivecs",
    "resolve_ids",
    "register_format",
    "write_bvecs",
    "write_fvecs",
    "write_ivecs",
]

#: extension -> module implementing ``open_vectors(req)`` (and ``open_ids(req)`` if ids are supported)
FORMATS: dict[str, str] = {
    ".npy": "distann.sources.npy",
    ".fvecs": "distann.sources.vecs",
    ".bvecs": "distann.sources.vecs",
    ".ivecs": "distann.sources.vecs",
    ".parquet": "distann.sources.parquet",
    ".pq": "distann.sources.parquet",
    ".zarr": "distann.sources.zarr_array",
}
_ZARR_MODULE = "distann.sources.zarr_array"
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


def register_format(ext: str, module: str) -> None:
    """Map the extension ``ext`` (e.g. ``".h5"``) to a module exposing ``open_vectors(req)``."""
    if not ext.startswith(".") or not module:
        raise ValidationError("ext", ext, "need an extension starting with '.' and a module path")
    FORMATS[ext.lower()] = module


def _supported() -> str:
    exts = ", ".join(sorted(FORMATS))
    return f"supported: {exts}, a Zarr directory, or a directory or glob of files of one of these formats"


def _check_args(url: object, column: object, storage_options: object, param: str) -> tuple[str, dict[str, Any]]:
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValidationError(param, url, "need a URL or path string")
    url = absolute_url(check_url(param, url))  # absolute: worker processes may run in another directory
    if column is not None and (not isinstance(column, str) or not column):
        raise ValidationError("column", column, "need a column / array name (a non-empty string) or None")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise ValidationError("storage_options", storage_options, "need a dict of fsspec options or None")
    return url, dict(storage_options or {})


def _module_of_entries(req: OpenRequest) -> str:
    """The format module of a directory / glob listing; drops unknown extensions, refuses a mix."""
    by_module: dict[str, list[str]] = {}
    for e in req.entries:
        module = FORMATS.get(extension(e.path))
        if module is not None and module != _ZARR_MODULE:
            by_module.setdefault(module, []).append(e.path)
    if not by_module:
        found = sorted({extension(e.path) or "(none)" for e in req.entries})
        what = f"files with extensions {found}" if req.entries else "no files"
        raise ValidationError(req.param, req.url, f"matched {what}; {_supported()}")
    if len(by_module) > 1:
        examples = "; ".join(f"{paths[0]} ({len(paths)} files)" for paths in by_module.values())
        raise ValidationError(req.param, req.url, f"mixes files of several formats: {examples}; use one format")
    module, paths = next(iter(by_module.items()))
    keep = set(paths)
    skipped = [e.path for e in req.entries if e.path not in keep]
    if skipped:
        logger.debug("%s: skipping %d files of other extensions, e.g. %s", req.url, len(skipped), skipped[0])
    req.entries = [e for e in req.entries if e.path in keep]
    return module


def _resolve(url: str, column: str | None, storage_options: dict[str, Any], param: str) -> tuple[str, OpenRequest]:
    """The format module and the open request for ``url`` (lists a directory / glob once)."""
    import fsspec.core

    from distann.sources._fileset import FileEntry

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except (ValueError, ImportError, TypeError) as exc:
        raise ValidationError(param, url, f"cannot open a filesystem for this URL: {exc}") from None
    req = OpenRequest(url=url, storage_options=storage_options, fs=fs, path=path, column=column, param=param)
    if is_glob(path):
        req.entries = list_glob(fs, path)
        if not req.entries:
            raise ValidationError(param, url, "the glob matched no files")
        return _module_of_entries(req), req
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ValidationError(param, url, "no file or directory at this URL") from None
    if info.get("type") == "directory":
        base = path.rstrip("/")
        if extension(base) == ".zarr" or any(fs.exists(f"{base}/{m}") for m in _ZARR_MARKERS):
            return _ZARR_MODULE, req
        req.entries = list_directory(fs, path)
        if not req.entries:
            raise ValidationError(param, url, "the directory holds no (visible) files")
        return _module_of_entries(req), req
    ext = extension(path)
    module = FORMATS.get(ext)
    if module == _ZARR_MODULE:
        raise ValidationError(param, url, "is a file; a Zarr array is a directory (holding zarr.json or .zarray)")
    if module is None:
        raise ValidationError(param, url, f"unknown extension {ext or '(none)'!r}; {_supported()}")
    if is_hidden(path):
        logger.debug("%s: opening a hidden file explicitly named", url)
    req.entries = [FileEntry.from_info(info)]
    return module, req


def open_source(url: str, *, column: str | None = None, storage_options: dict | None = None) -> VectorSource:
    """Open the vectors at ``url`` (validated now; nothing but headers is read)."""
    url, options = _check_args(url, column, storage_options, "source")
    module_name, req = _resolve(url, column, options, "source")
    source = importlib.import_module(module_name).open_vectors(req)
    logger.debug("opened %r", source)
    return source


def open_ids(url: str, *, column: str | None = None, storage_options: dict | None = None) -> IdSource:
    """Open the int ids at ``url``: ``.npy`` of an integer dtype, a Parquet integer column or a Zarr array."""
    url, options = _check_args(url, column, storage_options, "ids")
    module_name, req = _resolve(url, column, options, "ids")
    opener = getattr(importlib.import_module(module_name), "open_ids", None)
    if opener is None:
        raise ValidationError(
            "ids",
            url,
            "ids are read from .npy (integer dtype), Parquet (an integer column) or Zarr (1-D integer array)",
        )
    return opener(req)


def as_source(obj: Any, *, column: str | None = None, storage_options: dict | None = None) -> VectorSource:
    """A :class:`VectorSource` from a source (returned as is), a URL / path, or a 2-D numpy array."""
    if isinstance(obj, VectorSource):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return open_source(obj, column=column, storage_options=storage_options)
    if isinstance(obj, np.ndarray):
        return ArraySource(obj)
    raise ValidationError("source", type(obj).__name__, "need a URL, a path, a VectorSource or a 2-D numpy array")


def as_ids(obj: Any, *, column: str | None = None, storage_options: dict | None = None) -> IdSource:
    """An :class:`IdSource` from an id source (returned as is), a URL / path, or a 1-D int numpy array."""
    if isinstance(obj, IdSource):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return open_ids(obj, column=column, storage_options=storage_options)
    if isinstance(obj, np.ndarray):
        return ArrayIdSource(obj)
    raise ValidationError("ids", type(obj).__name__, "need a URL, a path, an IdSource or a 1-D integer numpy array")


def resolve_ids(ids: Any, ids_column: str | None, src: VectorSource, storage_options: dict | None = None, *,
                param: str = "ids", column_param: str = "ids_column") -> IdSource | None:
    """The ids of ``src``'s rows: a URL / array / IdSource (``ids``), a column of the source
    itself (``ids_column`` alone), or None for row numbers; errors name ``param`` /
    ``column_param``, and one id per vector is required."""
    if ids is None and ids_column is None:
        return None
    try:
        out = src.ids_from_column(ids_column) if ids is None else \
            as_ids(ids, column=ids_column, storage_options=storage_options)
    except ValidationError as exc:
        name = {"column": column_param, "ids_column": column_param, "ids": param}.get(exc.param, exc.param)
        raise ValidationError(name, exc.received, exc.allowed) from None
    if out.n != src.n:
        raise ValidationError(param, f"{out.n} ids", f"exactly one id per vector ({src.n})")
    return out
