"""Parquet files (one, a directory or a glob) as vector or id sources.

Vectors live in a fixed-size-list column (``pa.list_(pa.float32(), d)``; float16, float64
and integer values are accepted and read as float32). ``column`` names it; by default the
single fixed-size-list column of the file is used. Ids live in an integer column.

Opening reads each file's footer (``pyarrow.parquet.ParquetFile`` over ``fs.open``): the
schema and the row-group sizes. A read of rows ``[start, stop)`` then reads only the row
groups overlapping the range, only the one column, and turns it into numpy with
``flatten().to_numpy()``: no per-row Python work. Null embeddings or ids are refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distann.errors import ValidationError
from distann.sources._fileset import (
    FileEntry,
    FileSet,
    FileSetIdSource,
    FileSetVectorSource,
    OpenRequest,
    check_consistent,
    probe_all,
)
from distann.sources.base import assign_ids

logger = logging.getLogger(__name__)

_FOOTER_CACHE = 64  # footers kept per source object in a reading process


@dataclass(frozen=True)
class ParquetMeta:
    """Per-file layout: the column read and the row offsets of the row groups."""

    column: str
    rg_offsets: tuple[int, ...]  # len = row groups + 1


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _is_vector_type(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))


def _pick_column(schema: pa.Schema, column: str | None, path: str, ok, want: str) -> str:
    """The column to read: ``column`` if it fits ``ok``, else the single field that does."""
    names = [f.name for f in schema]
    if column is not None:
        if column not in names:
            raise ValidationError("column", column, f"no such column in {path}; its columns are {_describe(schema)}")
        t = schema.field(column).type
        if not ok(t):
            raise ValidationError("column", column, f"column has type {t} in {path}; need {want}")
        return column
    candidates = [f.name for f in schema if ok(f.type)]
    if len(candidates) != 1:
        which = "no" if not candidates else f"several ({', '.join(candidates)})"
        raise ValidationError(
            "column",
            None,
            f"{path} has {which} columns of {want}; pass column= to choose one (columns: {_describe(schema)})",
        )
    return candidates[0]


def _null_count_in_footer(md: pq.FileMetaData, column: str) -> int:
    """Nulls of ``column`` recorded in the row-group statistics (0 when there are none)."""
    leaves = [j for j in range(md.num_columns) if md.schema.column(j).path.split(".")[0] == column]
    total = 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        for j in leaves:
            stats = rg.column(j).statistics
            if stats is not None and stats.has_null_count:
                total += stats.null_count
    return total


def _probe(req: OpenRequest, entry: FileEntry, ok, want: str) -> tuple[ParquetMeta, pa.DataType, int]:
    try:
        with req.fs.open(entry.path, "rb") as f:
            pf = pq.ParquetFile(f)
            md, schema = pf.metadata, pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValidationError(req.param, req.url, f"file {entry.path} is not a readable Parquet file: {exc}") from None
    column = _pick_column(schema, req.column, entry.path, ok, want)
    nulls = _null_count_in_footer(md, column)
    if nulls:
        raise ValidationError(
            req.param, req.url, f"file {entry.path}: column {column!r} has {nulls} null values; nulls are not allowed"
        )
    counts = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))
    return ParquetMeta(column=column, rg_offsets=offsets), schema.field(column).type, md.num_rows


class _ParquetReader:
    """Mixin: read rows of one column from the row groups overlapping a range."""

    url: str
    _footers: dict[str, pq.FileMetaData] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_footers", None)
        return state

    def _column_chunks(self, fs: Any, entry: FileEntry, meta: ParquetMeta, lo: int, hi: int) -> list[pa.Array]:
        offs = np.asarray(meta.rg_offsets)
        first = int(np.searchsorted(offs, lo, side="right")) - 1
        last = int(np.searchsorted(offs, hi, side="left"))
        footers = self.__dict__.setdefault("_footers", {})
        with fs.open(entry.path, "rb") as f:
            pf = pq.ParquetFile(f, metadata=footers.get(entry.path))
            if len(footers) >= _FOOTER_CACHE:
                footers.clear()
            footers[entry.path] = pf.metadata
            table = pf.read_row_groups(list(range(first, last)), columns=[meta.column])
        chunks = table.column(0).slice(lo - int(offs[first]), hi - lo).chunks
        for chunk in chunks:
            if chunk.null_count:
                row = lo + int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValidationError(
                    "source",
                    self.url,
                    f"file {entry.path}: column {meta.column!r} is null at row {row}; nulls are not allowed",
                )
        return chunks


class ParquetSource(_ParquetReader, FileSetVectorSource):
    """Vectors from a fixed-size-list column of one or more Parquet files."""

    format_name = "parquet"

    def _read_file(self, fs: Any, entry: FileEntry, meta: ParquetMeta, lo: int, hi: int, out: np.ndarray) -> None:
        pos = 0
        for chunk in self._column_chunks(fs, entry, meta, lo, hi):
            values = chunk.flatten()
            if values.null_count:
                raise ValidationError(
                    "source", self.url, f"file {entry.path}: column {meta.column!r} holds null values inside embeddings"
                )
            k = len(chunk)
            out[pos : pos + k] = values.to_numpy(zero_copy_only=False).reshape(k, self.d)
            pos += k

    def ids_from_column(self, column: str) -> ParquetIdSource:
        from distann.sources import open_ids

        return open_ids(self.url, column=column, storage_options=self._files.storage_options)


class ParquetIdSource(_ParquetReader, FileSetIdSource):
    """Ids from an integer column of one or more Parquet files."""

    format_name = "parquet"

    def _read_file(self, fs: Any, entry: FileEntry, meta: ParquetMeta, lo: int, hi: int, out: np.ndarray) -> None:
        pos = 0
        for chunk in self._column_chunks(fs, entry, meta, lo, hi):
            k = len(chunk)
            assign_ids(out[pos : pos + k], chunk.to_numpy(zero_copy_only=False), "ids", entry.path)
            pos += k


def _check_same_column(req: OpenRequest, metas: list[ParquetMeta]) -> str:
    for entry, meta in zip(req.entries[1:], metas[1:]):
        if meta.column != metas[0].column:
            raise ValidationError(
                "column",
                req.column,
                f"file {entry.path} uses column {meta.column!r} but {req.entries[0].path} uses "
                f"{metas[0].column!r}; pass column= to choose one",
            )
    return metas[0].column


def open_vectors(req: OpenRequest) -> ParquetSource:
    """A :class:`ParquetSource` over ``req.entries`` (same column, d and value type in every file)."""
    want = "fixed_size_list<float, d> (a fixed-size list of numbers per row)"
    probed = probe_all(req.entries, lambda e: _probe(req, e, _is_vector_type, want))
    metas = [m for m, _, _ in probed]
    column = _check_same_column(req, metas)
    types = [t for _, t, _ in probed]
    shapes = [(e.path, t.list_size, np.dtype(t.value_type.to_pandas_dtype())) for e, t in zip(req.entries, types)]
    d, dtype = check_consistent(req, shapes)
    if d <= 0:
        raise ValidationError(req.param, req.url, f"column {column!r} has list size {d}; need d > 0 dimensions")
    files = FileSet(req.url, req.storage_options, req.entries, [n for _, _, n in probed], metas)
    return ParquetSource(req, files, d, dtype, column=column)


def open_ids(req: OpenRequest) -> ParquetIdSource:
    """A :class:`ParquetIdSource` over ``req.entries`` (an integer column)."""
    probed = probe_all(req.entries, lambda e: _probe(req, e, pa.types.is_integer, "an integer type"))
    metas = [m for m, _, _ in probed]
    column = _check_same_column(req, metas)
    shapes = [(e.path, 1, np.dtype(t.to_pandas_dtype())) for e, (_, t, _) in zip(req.entries, probed)]
    _, dtype = check_consistent(req, shapes)
    files = FileSet(req.url, req.storage_options, req.entries, [n for _, _, n in probed], metas)
    return ParquetIdSource(req, files, dtype, column=column)
