"""The source interfaces: ``VectorSource`` (an (n, d) matrix) and ``IdSource`` (n int64 ids).

A source is a small, picklable description of data that stays where it is: it holds the
URL, the storage options and a little metadata (shape, on-disk dtype, per-file row
counts), and opens files lazily in whichever process reads. It is shipped to Dask worker
processes as is, so it must never hold file handles or data.

Reads are by row range and return fresh, writable, C-contiguous arrays: float32 for
vectors, int64 for ids, whatever the on-disk dtype. ``to_dask`` builds a Dask array with
one task per chunk of rows; each task carries only the source (for a set of files, only
the files its rows touch) and the row range, never the data.

Every bad input raises :class:`distann.errors.ValidationError` naming the parameter, the
value received and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from distann.chunks import DEFAULT_CHUNK_ROWS, plan_chunks
from distann.errors import ValidationError

if TYPE_CHECKING:
    import dask.array as da

logger = logging.getLogger(__name__)

#: keys of an fsspec ``info()`` dict that identify a version of a file, most specific first
_STAMP_KEYS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated")


_SPAN_ROWS = 65536  # rows read at once by the default ``read_rows_at``


class _RowSource(ABC):
    """What vector and id sources share: rows read by range into a fresh array, and the
    identity Dask uses to name their tasks."""

    url: str
    n: int
    fingerprint: str

    def _read_new(self, start: int, stop: int, tail: tuple[int, ...], dtype: type) -> np.ndarray:
        start, stop = check_range(start, stop, self.n)
        out = np.empty((stop - start, *tail), dtype=dtype)
        if stop > start:
            self._read_into(start, stop, out)
        return out

    @abstractmethod
    def _read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Write rows ``[start, stop)`` (validated, non-empty) into ``out``."""

    def _task_source(self, start: int, stop: int) -> tuple[_RowSource, int]:
        """The smallest source able to read rows ``[start, stop)`` and the row it starts at."""
        return self, 0

    def _token(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.url, self.fingerprint)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return self._token()


class VectorSource(_RowSource):
    """An (n, d) matrix of vectors readable by row range.

    Attributes: ``url`` (where it lives), ``n`` (rows), ``d`` (dimensions), ``dtype``
    (on-disk dtype; reads are always float32) and ``fingerprint`` (a stable identity
    string that changes when the input is rewritten).
    """

    url: str
    n: int
    d: int
    dtype: np.dtype
    fingerprint: str

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``."""
        return (self.n, self.d)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new float32 C-contiguous (stop - start, d) array."""
        return self._read_new(start, stop, (self.d,), np.float32)

    def read_rows_at(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (ascending global row numbers) as a new float32 (len(rows), d) array.

        Formats with fixed-size rows in files (npy, fvecs/bvecs) and in-memory arrays read only
        those rows (the build's training sample costs a fraction of a pass over the data);
        others read the range the rows span, 65,536 rows at a time, and keep the rows asked for.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        if len(rows):
            check_range(int(rows[0]), int(rows[-1]) + 1, self.n)
            self._read_rows_at(rows, out)
        return out

    def _read_rows_at(self, rows: np.ndarray, out: np.ndarray) -> None:
        pos = 0
        while pos < len(rows):
            lo = int(rows[pos])
            end = int(np.searchsorted(rows, lo + _SPAN_ROWS, side="left"))
            span = self.read_rows(lo, int(rows[end - 1]) + 1)
            out[pos:end] = span[rows[pos:end] - lo]
            pos = end

    def ids_from_column(self, column: str) -> IdSource:
        """The ids stored beside the vectors, in ``column`` of the same files (Parquet) or group (Zarr)."""
        raise ValidationError("ids_column", column, f"an id column of a Parquet or Zarr-group source; {self.url} "
                              "has no other columns: give the ids separately (ids=URL, --ids URL)")

    def to_dask(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> da.Array:
        """A float32 ``dask.array.Array`` of shape (n, d) chunked by ``chunk_rows`` rows.

        One task per chunk calls :meth:`read_rows`; the graph holds no data.
        """
        return rows_to_dask(self, self.n, (self.d,), np.float32, chunk_rows, _read_vectors_task)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, n={self.n}, d={self.d}, dtype={self.dtype})"


class IdSource(_RowSource):
    """n int64 ids readable by range, aligned with the rows of a :class:`VectorSource`."""

    url: str
    n: int
    dtype: np.dtype
    fingerprint: str

    @property
    def shape(self) -> tuple[int]:
        """``(n,)``."""
        return (self.n,)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Ids ``[start, stop)`` as a new int64 array."""
        return self._read_new(start, stop, (), np.int64)

    def to_dask(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> da.Array:
        """An int64 ``dask.array.Array`` of shape (n,) chunked by ``chunk_rows``."""
        return rows_to_dask(self, self.n, (), np.int64, chunk_rows, _read_ids_task)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, n={self.n}, dtype={self.dtype})"


# ----------------------------------------------------------------------------- dask


def _read_vectors_task(source: VectorSource, start: int, stop: int) -> np.ndarray:
    return source.read_rows(start, stop)


def _read_ids_task(source: IdSource, start: int, stop: int) -> np.ndarray:
    return source.read(start, stop)


def check_chunk_rows(chunk_rows: object) -> int:
    """``chunk_rows`` as a positive int."""
    if isinstance(chunk_rows, bool):
        raise ValidationError("chunk_rows", chunk_rows, "need a positive integer")
    try:
        value = operator.index(chunk_rows)  # type: ignore[arg-type]
    except TypeError:
        raise ValidationError("chunk_rows", chunk_rows, "need a positive integer") from None
    if value <= 0:
        raise ValidationError("chunk_rows", chunk_rows, "need a positive integer")
    return value


def rows_to_dask(source: Any, n: int, trailing: tuple[int, ...], dtype: Any, chunk_rows: object, task: Any) -> da.Array:
    """A Dask array over ``source`` with one ``task(sub_source, start, stop)`` per row chunk."""
    import dask.array as da
    from dask.base import tokenize

    chunk_rows = check_chunk_rows(chunk_rows)
    bounds = [(c.start, c.stop) for c in plan_chunks(n, chunk_rows)]
    name = "distann-read-" + tokenize(source, chunk_rows)
    tail = (0,) * len(trailing)
    dsk: dict[tuple, tuple] = {}
    for i, (a, b) in enumerate(bounds):
        sub, offset = source._task_source(a, b)
        dsk[(name, i, *tail)] = (task, sub, a - offset, b - offset)
    chunks = (tuple(b - a for a, b in bounds), *((t,) for t in trailing))
    meta = np.empty((0,) * (1 + len(trailing)), dtype=dtype)
    return da.Array(dsk, name, chunks, meta=meta)


# ----------------------------------------------------------------------------- checks


def check_range(start: object, stop: object, n: int) -> tuple[int, int]:
    """``(start, stop)`` as ints with ``0 <= start <= stop <= n``."""
    try:
        if isinstance(start, bool) or isinstance(stop, bool):
            raise TypeError
        a, b = operator.index(start), operator.index(stop)  # type: ignore[arg-type]
    except TypeError:
        raise ValidationError("start, stop", (start, stop), f"need integers with 0 <= start <= stop <= n={n}") from None
    if not 0 <= a <= b <= n:
        raise ValidationError("start, stop", (a, b), f"need 0 <= start <= stop <= n={n}")
    return a, b


def check_vector_dtype(dtype: np.dtype, param: str, url: str, where: str) -> np.dtype:
    """Accept integer and floating-point dtypes (the vectors are read as float32)."""
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "iuf":
        raise ValidationError(
            param,
            url,
            f"{where} has dtype {describe_dtype(dtype)}; need an integer or floating-point dtype "
            "(bool, complex, string, object and structured dtypes are not vectors)",
        )
    return dtype


def check_id_dtype(dtype: np.dtype, param: str, url: str, where: str) -> np.dtype:
    """Accept integer dtypes (the ids are read as int64)."""
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "iu":
        raise ValidationError(param, url, f"{where} has dtype {describe_dtype(dtype)}; ids need an integer dtype")
    return dtype


def describe_dtype(dtype: np.dtype) -> str:
    return str(dtype) if dtype.fields is None else f"structured {dtype.descr}"


def check_vector_shape(shape: tuple[int, ...], param: str, url: str, where: str) -> tuple[int, int]:
    """``(n, d)`` from a 2-D shape with d > 0 (n may be 0 for one file of a set)."""
    if len(shape) != 2:
        raise ValidationError(param, url, f"{where} has shape {tuple(shape)}; need a 2-D (n, d) array")
    n, d = int(shape[0]), int(shape[1])
    if d == 0:
        raise ValidationError(param, url, f"{where} has shape {tuple(shape)}; need d > 0 dimensions")
    return n, d


def check_id_shape(shape: tuple[int, ...], param: str, url: str, where: str) -> int:
    """n from a shape (n,) or (n, 1)."""
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return int(shape[0])
    raise ValidationError(param, url, f"{where} has shape {tuple(shape)}; ids need a 1-D (n,) array")


def check_nonempty(n: int, param: str, url: str) -> None:
    if n == 0:
        raise ValidationError(param, url, "has zero rows; need at least one")


def assign_ids(out: np.ndarray, values: np.ndarray, param: str, where: str) -> None:
    """``out[:] = values`` refusing uint64 ids that do not fit int64."""
    if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
        raise ValidationError(param, where, f"holds id {int(values.max())} > 2**63 - 1; ids must fit int64")
    out[...] = values.reshape(out.shape)


# ----------------------------------------------------------------------------- fingerprints


def file_stamp(info: dict[str, Any]) -> str:
    """What identifies one version of a file in an fsspec ``info()`` dict (etag, mtime...)."""
    parts = [f"{k}={info[k]}" for k in _STAMP_KEYS if info.get(k) is not None]
    if not parts and info.get("created") is not None:  # memory:// has only a creation time
        parts.append(f"created={info['created']}")
    return ";".join(parts)


def make_fingerprint(kind: str, payload: Any) -> str:
    """``"<kind>:<sha256 of the canonical JSON of payload>"``."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return f"{kind}:{hashlib.sha256(text.encode()).hexdigest()}"
