"""The result of a big-batch search: Zarr arrays or Parquet parts, chunked by query, and the
commit record ``_distann.json`` written last.

Zarr (``<out>`` is a Zarr v3 group)::

    kNN    ids (nq, k) int64, distances (nq, k) float32     chunks of ``chunk_rows`` queries
    range  lims (nq + 1,) int64, ids (total,) int64, distances (total,) float32
           (results of query i: ``ids[lims[i]:lims[i+1]]``, best first)

Parquet (``<out>`` is a folder of ``part-<c>.parquet``, one per query chunk)::

    kNN    query int64, [query_id int64], ids list<int64>[k], distances list<float>[k]
    range  query int64, [query_id int64], id int64, distance float   (one row per result)

``query`` is the row of the query in its source; ``query_id`` its id when the job was given
query ids. Padding (fewer than k results reachable): id -1 and distance +inf (l2) / -inf.

A result is complete exactly when ``_distann.json`` exists: it is written last, in one atomic
write, after every array chunk or part file is in place (Parquet parts are moved into the
folder by the commit; before it the folder holds only ``_distann/``, which readers of Parquet
datasets skip). :func:`open_result` refuses anything else.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from distann.errors import IndexFormatError, ValidationError
from distann.store.location import Location

RESULT_PATH = "_distann.json"
RESULT_FORMAT = "distann-big-batch"
FORMATS = ("zarr", "parquet")
#: rows per Zarr chunk of the flat arrays of a range result
RANGE_CHUNK = 1 << 20


def output_format(url: str, fmt: str | None) -> str:
    """The output format: ``fmt``, or from the URL's extension (.parquet / .pq: Parquet; else Zarr)."""
    if fmt is None:
        return "parquet" if url.rstrip("/").endswith((".parquet", ".pq")) else "zarr"
    if fmt not in FORMATS:
        raise ValidationError("format", fmt, f"one of {', '.join(FORMATS)} (or None: from the extension of out)")
    return fmt


def part_name(chunk_name: str) -> str:
    return f"part-{chunk_name[1:]}.parquet"


def create_zarr_knn(out: Location, nq: int, k: int, chunk_rows: int) -> None:
    import zarr

    store = out.zarr_store()
    rows = max(1, min(chunk_rows, nq))
    zarr.create_array(store, name="ids", shape=(nq, k), chunks=(rows, k), dtype="<i8", fill_value=-1,
                      compressors=None, overwrite=True, config={"write_empty_chunks": True})
    zarr.create_array(store, name="distances", shape=(nq, k), chunks=(rows, k), dtype="<f4", fill_value=np.nan,
                      compressors=None, overwrite=True, config={"write_empty_chunks": True})


def write_zarr_rows(out: Location, name: str, start: int, data: np.ndarray) -> None:
    import zarr

    arr = zarr.open_array(out.zarr_store(), path=name, mode="r+", zarr_format=3)
    arr[start:start + len(data)] = data


def create_zarr_range(out: Location, nq: int, total: int, chunk_rows: int) -> None:
    import zarr

    store = out.zarr_store()
    cfg = {"write_empty_chunks": True}
    zarr.create_array(store, name="lims", shape=(nq + 1,), chunks=(max(1, chunk_rows),), dtype="<i8", fill_value=-1,
                      compressors=None, overwrite=True, config=cfg)
    rows = max(1, min(RANGE_CHUNK, total))
    zarr.create_array(store, name="ids", shape=(total,), chunks=(rows,), dtype="<i8", fill_value=-1,
                      compressors=None, overwrite=True, config=cfg)
    zarr.create_array(store, name="distances", shape=(total,), chunks=(rows,), dtype="<f4", fill_value=np.nan,
                      compressors=None, overwrite=True, config=cfg)


def parquet_bytes(columns: dict[str, Any]) -> bytes:
    """One Parquet file (uncompressed column chunks are not worth it for ids and floats: zstd)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def knn_columns(rows: np.ndarray, query_ids: np.ndarray | None, D: np.ndarray, I: np.ndarray) -> dict[str, Any]:
    import pyarrow as pa

    k = D.shape[1]
    cols: dict[str, Any] = {"query": pa.array(rows, pa.int64())}
    if query_ids is not None:
        cols["query_id"] = pa.array(query_ids, pa.int64())
    cols["ids"] = pa.FixedSizeListArray.from_arrays(pa.array(I.reshape(-1), pa.int64()), k)
    cols["distances"] = pa.FixedSizeListArray.from_arrays(pa.array(D.reshape(-1), pa.float32()), k)
    return cols


def range_columns(q: np.ndarray, query_ids: np.ndarray | None, D: np.ndarray, I: np.ndarray) -> dict[str, Any]:
    import pyarrow as pa

    cols: dict[str, Any] = {"query": pa.array(q, pa.int64())}
    if query_ids is not None:
        cols["query_id"] = pa.array(query_ids, pa.int64())
    cols["id"] = pa.array(I, pa.int64())
    cols["distance"] = pa.array(D, pa.float32())
    return cols


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class BigBatchResult:
    """A committed big-batch result (see the module docstring); open with :func:`open_result`."""

    loc: Location
    record: dict

    url = property(lambda self: self.loc.url)
    mode = property(lambda self: self.record["mode"])
    format = property(lambda self: self.record["format"])
    nq = property(lambda self: self.record["nq"])

    def __repr__(self) -> str:
        what = f"k={self.record['k']}" if self.mode == "knn" else f"radius={self.record['radius']:g}"
        return f"<distann.BigBatchResult {self.mode} {what} nq={self.nq} ({self.format}) at {self.url}>"

    def knn(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)`` of queries ``[start, stop)`` of a kNN result, (n, k) each."""
        if self.mode != "knn":
            raise ValidationError("mode", self.mode, "a kNN result for knn(); use range() for a range result")
        stop = self.nq if stop is None else stop
        if self.format == "zarr":
            return self._zarr("distances")[start:stop], self._zarr("ids")[start:stop]
        table = self._table(start, stop)
        k = self.record["k"]
        I = np.asarray(table.column("ids").combine_chunks().flatten(), dtype=np.int64).reshape(-1, k)
        D = np.asarray(table.column("distances").combine_chunks().flatten(), dtype=np.float32).reshape(-1, k)
        return D, I

    def range(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lims, D, I)`` of queries ``[start, stop)`` of a range result (Faiss convention)."""
        if self.mode != "range":
            raise ValidationError("mode", self.mode, "a range result for range(); use knn() for a kNN result")
        stop = self.nq if stop is None else stop
        if self.format == "zarr":
            lims = self._zarr("lims")[start:stop + 1]
            a, b = int(lims[0]), int(lims[-1])
            return lims - a, self._zarr("distances")[a:b], self._zarr("ids")[a:b]
        table = self._table(start, stop)
        q = np.asarray(table.column("query"), dtype=np.int64)
        lims = np.zeros(stop - start + 1, np.int64)
        np.cumsum(np.bincount(q - start, minlength=stop - start), out=lims[1:])
        return (lims, np.asarray(table.column("distance"), dtype=np.float32),
                np.asarray(table.column("id"), dtype=np.int64))

    def _zarr(self, name: str):
        import zarr

        return zarr.open_array(self.loc.zarr_store(read_only=True), path=name, mode="r", zarr_format=3)

    def _table(self, start: int, stop: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self.record["chunk_rows"]
        tables = []
        for c in range(start // rows, -(-stop // rows)):
            name = part_name(f"c{c:06d}")
            with self.loc.fs.open(self.loc.path(name), "rb") as fh:
                t = pq.read_table(fh)
            q = np.asarray(t.column("query"), dtype=np.int64)
            tables.append(t.filter(pa.array((q >= start) & (q < stop))))
        return pa.concat_tables(tables) if tables else None


def open_result(url: str, *, storage_options: dict | None = None) -> BigBatchResult:
    """Open the committed big-batch result at ``url``; IndexFormatError if there is none (a
    job that has not finished, or was killed, leaves no ``_distann.json``: rerun it to resume)."""
    loc = Location(url, dict(storage_options or {}))
    try:
        record = loc.read_json(RESULT_PATH)
    except FileNotFoundError:
        raise IndexFormatError(f"{loc.url}: no committed big-batch result ({RESULT_PATH} is missing: the job has "
                               "not finished, or was stopped; rerun it with the same arguments to resume)") from None
    if record.get("format_name") != RESULT_FORMAT:
        raise IndexFormatError(f"{loc.url}: {RESULT_PATH} is not a distann big-batch result record")
    return BigBatchResult(loc, record)

