"""distann: distributed, out-of-core IVF vector indexing on Dask, Zarr and Numba.

The top-level names are imported lazily so ``import distann`` stays cheap (no Dask cluster,
no Numba compilation) until a function is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from distann import config as _config  # noqa: F401  registers distann's dask.config defaults now: a
# dask.config.set({"distann...": ...}) block entered before they were registered would remove the
# whole section, defaults included, when it exits

__version__ = "0.1.0"

_EXPORTS = {
    "open_index": "distann.search.index",
    "Index": "distann.search.index",
    "DistributedIndex": "distann.search.distributed",
    "SearchResult": "distann.search.distributed",
    "big_batch_search": "distann.bigbatch",
    "open_result": "distann.bigbatch",
    "BigBatchResult": "distann.bigbatch",
    "dedup": "distann.dedup",
    "kmeans": "distann.train.api",
    "KMeansResult": "distann.train.kmeans",
    "open_source": "distann.sources",
    "brute_force_knn": "distann.evaluation",
    "recall_at_k": "distann.evaluation",
    "sweep_nprobe": "distann.evaluation",
    "DistannError": "distann.errors",
    "ValidationError": "distann.errors",
    "IndexFormatError": "distann.errors",
    "IndexExistsError": "distann.errors",
    "BuildConflictError": "distann.errors",
    "ShardsUnavailableError": "distann.errors",
    "WorkerKilledError": "distann.errors",
    "SchedulerLostError": "distann.errors",
}

__all__ = sorted([*_EXPORTS, "build", "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distann' has no attribute {name!r}")


def build(source, index_url, spec="IVF1024,Flat", metric="l2", ids=None, client=None, **options):
    """Build an IVF index; see :func:`distann.builder.driver.build` for every option."""
    from distann.builder.driver import build as _build

    return _build(source, index_url, spec, metric, ids, client, **options)


if TYPE_CHECKING:  # pragma: no cover
    from distann.bigbatch import BigBatchResult, big_batch_search, open_result
    from distann.dedup import dedup
    from distann.errors import (BuildConflictError, DistannError, IndexExistsError, IndexFormatError,
                                SchedulerLostError, ShardsUnavailableError, ValidationError,
                                WorkerKilledError)
    from distann.evaluation import brute_force_knn, recall_at_k, sweep_nprobe
    from distann.search.distributed import DistributedIndex, SearchResult
    from distann.search.index import Index, open_index
    from distann.sources import open_source
    from distann.train.api import kmeans
    from distann.train.kmeans import KMeansResult
