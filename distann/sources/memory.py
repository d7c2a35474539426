"""In-memory numpy arrays behind the source interfaces (``as_source(x)``, ``as_ids(ids)``).

The array is held by reference (not copied) and pickled with the source; reads return
float32 (int64 for ids) copies of the rows. ``to_dask`` uses ``dask.array.from_array``,
so the array is one key of the graph rather than being repeated in every task.

Fingerprint: sha256 of the shape, dtype and bytes. Arrays up to ``FULL_HASH_BYTES``
(64 MiB) are hashed whole; larger ones are hashed on a sample (the first, last and
``SAMPLE_ROWS`` evenly spaced rows), which is cheap but cannot see a change confined to
rows outside the sample.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from distann.errors import ValidationError
from distann.sources.base import (
    DEFAULT_CHUNK_ROWS,
    IdSource,
    VectorSource,
    assign_ids,
    check_chunk_rows,
    check_id_dtype,
    check_id_shape,
    check_nonempty,
    check_vector_dtype,
    check_vector_shape,
)

if TYPE_CHECKING:
    import dask.array as da

logger = logging.getLogger(__name__)

FULL_HASH_BYTES = 64 << 20
SAMPLE_ROWS = 1024


def array_fingerprint(kind: str, x: np.ndarray) -> str:
    """``"<kind>:<sha256>"`` of shape, dtype and the bytes (or a row sample of a large array)."""
    h = hashlib.sha256(f"{x.shape}|{x.dtype.str}".encode())
    if x.nbytes <= FULL_HASH_BYTES:
        h.update(np.ascontiguousarray(x).data)
    else:
        rows = np.unique(np.linspace(0, len(x) - 1, SAMPLE_ROWS + 2).astype(np.int64))
        h.update(b"sample")
        h.update(np.ascontiguousarray(x[rows]).data)
    return f"{kind}:{h.hexdigest()}"


def _as_float32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def _as_int64(block: np.ndarray) -> np.ndarray:
    out = np.empty(block.shape, dtype=np.int64)
    assign_ids(out, block, "ids", "<array>")
    return out


class ArraySource(VectorSource):
    """A 2-D numeric numpy array as a :class:`VectorSource`."""

    def __init__(self, x: np.ndarray, *, param: str = "source"):
        if not isinstance(x, np.ndarray):
            raise ValidationError(param, type(x).__name__, "need a numpy array")
        what = f"array of shape {x.shape} {x.dtype}"
        self.n, self.d = check_vector_shape(x.shape, param, what, "it")
        self.dtype = check_vector_dtype(x.dtype, param, what, "it")
        check_nonempty(self.n, param, what)
        self.url = f"<array {self.n}x{self.d} {self.dtype}>"
        self._x = x
        self.fingerprint = array_fingerprint("array", x)

    @property
    def array(self) -> np.ndarray:
        """The wrapped array (not a copy)."""
        return self._x

    def _read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        out[...] = self._x[start:stop]

    def _read_rows_at(self, rows: np.ndarray, out: np.ndarray) -> None:
        out[...] = self._x[rows]

    def _token(self) -> tuple[Any, ...]:
        return (type(self).__name__, self.fingerprint)

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return (type(self).__name__, tokenize(self._x))

    def to_dask(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> da.Array:
        """The array as a float32 Dask array chunked by ``chunk_rows`` rows."""
        import dask.array as da

        chunk_rows = check_chunk_rows(chunk_rows)
        arr = da.from_array(self._x, chunks=(chunk_rows, self.d))
        return arr.map_blocks(_as_float32, dtype=np.float32)


class ArrayIdSource(IdSource):
    """A 1-D (or (n, 1)) integer numpy array as an :class:`IdSource`."""

    def __init__(self, ids: np.ndarray, *, param: str = "ids"):
        if not isinstance(ids, np.ndarray):
            raise ValidationError(param, type(ids).__name__, "need a numpy array")
        what = f"array of shape {ids.shape} {ids.dtype}"
        self.n = check_id_shape(ids.shape, param, what, "it")
        self.dtype = check_id_dtype(ids.dtype, param, what, "it")
        check_nonempty(self.n, param, what)
        self.url = f"<array {self.n} {self.dtype}>"
        self._ids = ids
        self.fingerprint = array_fingerprint("array-ids", ids)

    def _read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        assign_ids(out, np.asarray(self._ids[start:stop]), "ids", self.url)

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return (type(self).__name__, tokenize(self._ids))

    def to_dask(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> da.Array:
        """The ids as an int64 Dask array chunked by ``chunk_rows``."""
        import dask.array as da

        chunk_rows = check_chunk_rows(chunk_rows)
        arr = da.from_array(self._ids.reshape(self.n), chunks=(chunk_rows,))
        return arr.map_blocks(_as_int64, dtype=np.int64)
