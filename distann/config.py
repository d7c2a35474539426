"""Configuration: library tunables in ``dask.config`` and validated job files in YAML.

Library tunables
----------------
Knobs that change how work is cut up, never what is computed, live in one namespaced
``dask.config`` section, ``distann``. Their defaults are registered with
``dask.config.update_defaults`` when this module is imported:

=============================  ===========  ==================================================
key                            default      meaning
=============================  ===========  ==================================================
``distann.build.chunk-rows``   65536        rows of the source handled by one add task
``distann.build.shard-bytes``  33554432     target bytes of one list-range shard of the index
``distann.build.chunk-bytes``  1048576      target bytes of one stored chunk (object) of a shard's
                                            arrays: what a search reads at least per probed list
                                            (at least 256 rows; smaller chunks: less read per
                                            query on object stores, more objects)
``distann.build.lease-seconds`` 60          a build's lease on the index's next generation
                                            expires this long after its last renewal (see
                                            ``distann.store.lease``)
``distann.cluster.connect-timeout`` 10      seconds to wait for ``--scheduler ADDRESS``
``distann.search.cache-bytes`` ``"auto"``   byte budget of the in-memory inverted-list cache
                                            (0: none; ``"auto"``: 1/8 of the machine's memory);
                                            an index that fits is loaded whole at its first search
``distann.search.batch-size``  16384        queries searched together in one batch
``distann.search.reader-lease-seconds`` 60  a serving index's reader lease on its generation
                                            expires this long after its last renewal (see
                                            ``distann.store.readers``)
``distann.bigbatch.chunk-rows`` 65536       queries handled by one bucket / reduce task of a
                                            big-batch search
``distann.bigbatch.range-bytes`` 67108864   stored list bytes read by one scan task of a
                                            big-batch search (whole shards: at least one)
``distann.kernels.backend``    ``"numba"``  kernel backend (see ``distann.kernels``): "numba",
                                            "numpy" or "cuda"
``distann.kernels.cuda.resident-bytes`` auto  device memory lists may stay resident in
                                            (``"auto"``: half the device)
``distann.kernels.cuda.work-bytes`` 536870912  a cuda kernel call's scratch (distance
                                            buffers, GEMM blocks, streamed lists)
``distann.kernels.cuda.stream`` True        stream lists that do not fit the resident budget
                                            from pinned host memory (False: an error instead)
``distann.store.protocols``    see below    fsspec protocols an index, source or output URL
                                            may use: file (local paths), memory, s3, s3a, gs,
                                            gcs, az, abfs, abfss; others are refused
``distann.store.chains``       ``[]``       caching filesystems (only simplecache: blockcache
                                            and filecache fail under concurrent reads) a ``::``
                                            chained URL may put in front of its target; empty:
                                            chained URLs are refused
=============================  ===========  ==================================================

They are set like any dask option: in a dask YAML file (``~/.config/dask/*.yaml``), with
``dask.config.set({"distann.search.cache-bytes": 2**30})`` or through the environment.
Dask maps an environment variable ``DASK_A__B__C_D=value`` to the key ``a.b.c_d``: the
``DASK_`` prefix is dropped, the name lower-cased, ``__`` separates levels, and the value is
parsed with ``ast.literal_eval`` (falling back to the plain string). Underscores and hyphens
are interchangeable in the last part, so::

    DASK_DISTANN__BUILD__CHUNK_ROWS=65536         ->  distann.build.chunk-rows = 65536
    DASK_DISTANN__SEARCH__CACHE_BYTES=1073741824  ->  distann.search.cache-bytes = 2**30
    DASK_DISTANN__KERNELS__BACKEND=numpy          ->  distann.kernels.backend = "numpy"

The environment is read when dask is imported (and by ``dask.config.refresh()``); the
values must be literals (``1073741824``, not ``2**30``). Worker processes started by a
``LocalCluster`` inherit the configuration of the client at the time they start, so library
code resolves tunables with :func:`get` on the client and passes the values into its tasks.

Job files
---------
One frozen dataclass per command line job (:class:`BuildJob`, :class:`SearchJob`,
:class:`KMeansJob`, :class:`ServeJob`, :class:`DedupJob`), loaded from YAML with :func:`load_config` or from a mapping with
:func:`from_dict`. Keys are the field names (``chunk_rows``, not ``chunk-rows``). Everything
is validated at load: unknown keys, wrong types and bad values raise
:class:`~distann.errors.ValidationError` naming the key (``config.k`` for a mapping,
``<file>: key 'k'`` for a file). Each field is documented once, in the ``doc`` metadata of
its definition; the command line reuses those texts for its help.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask.config
import yaml

from distann.errors import ValidationError
from distann.validation import (INITS, METRICS, check_bool, check_chains, check_choice, check_nonnegative_int,
                                check_positive_int, check_protocols, is_int)

__all__ = [
    "DEFAULTS", "get", "BuildJob", "SearchJob", "KMeansJob", "ServeJob", "DedupJob", "JOB_KINDS", "from_dict",
    "load_config", "read_mapping", "kind_from_filename", "field_doc",
]

# --------------------------------------------------------------------------- tunables

#: Defaults of the ``distann`` section of dask.config, registered at import.
DEFAULTS: dict[str, Any] = {
    "distann": {
        "build": {"chunk-rows": 65536, "shard-bytes": 32 * 2**20, "chunk-bytes": 2**20, "lease-seconds": 60},
        "cluster": {"connect-timeout": 10},
        "search": {"cache-bytes": "auto", "batch-size": 16384, "reader-lease-seconds": 60},
        "bigbatch": {"chunk-rows": 65536, "range-bytes": 64 * 2**20},
        "kernels": {"backend": "numba",
                    "cuda": {"resident-bytes": "auto", "work-bytes": 512 * 2**20, "stream": True}},
        # URLs (distann.validation.check_url): no http(s) by default (a URL given by another party
        # would make the process fetch arbitrary addresses); chained URLs only through caches
        "store": {"protocols": ["file", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"], "chains": []},
    }
}
dask.config.update_defaults(DEFAULTS)


def _tunable_name(key: str, value: object) -> str:
    from distann.kernels import check_backend_name

    check_backend_name(value, key)  # the name only: whether it can run is checked where it runs
    return value  # type: ignore[return-value]


_TUNABLE_CHECKS: dict[str, Callable[[str, object], Any]] = {
    "build.chunk-rows": check_positive_int,
    "build.shard-bytes": check_positive_int,
    "build.chunk-bytes": check_positive_int,
    "build.lease-seconds": check_positive_int,
    "cluster.connect-timeout": check_positive_int,
    "search.cache-bytes": lambda key, value: value if value == "auto" else check_nonnegative_int(key, value),
    "search.batch-size": check_positive_int,
    "search.reader-lease-seconds": check_positive_int,
    "bigbatch.chunk-rows": check_positive_int,
    "bigbatch.range-bytes": check_positive_int,
    "kernels.backend": _tunable_name,
    "kernels.cuda.resident-bytes": lambda key, value: value if value == "auto" else check_nonnegative_int(key, value),
    "kernels.cuda.work-bytes": check_positive_int,
    "kernels.cuda.stream": check_bool,
    "store.protocols": check_protocols,
    "store.chains": check_chains,
}


def get(key: str) -> Any:
    """Current value of the tunable ``distann.<key>``, e.g. ``get("build.chunk-rows")``.

    The ``distann.`` prefix is optional and ``_`` may stand for ``-``. Known keys are
    validated, so a bad environment override fails here with the key named.
    """
    short = key[len("distann."):] if key.startswith("distann.") else key
    short = short.replace("_", "-")
    if short not in _TUNABLE_CHECKS:
        raise ValidationError("distann.config.get(key)", key,
                              f"must be one of {', '.join(sorted(_TUNABLE_CHECKS))}")
    full = f"distann.{short}"
    return _TUNABLE_CHECKS[short](full, dask.config.get(full))


# --------------------------------------------------------------------------- field checks

Check = Callable[[object, str], Any]


def _text(value: object, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(param, value, "must be a non-empty string")
    return value


def _flag(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(param, value, "must be true or false")
    return value


def _positive(value: object, param: str) -> int:
    return check_positive_int(param, value)


def _nonnegative(value: object, param: str) -> int:
    return check_nonnegative_int(param, value)


def _real(value: object, param: str) -> float:
    # PyYAML reads ``1e-3`` (no dot) as a string: accept numeric strings for float fields.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(param, value, "must be a finite number")
    return float(value)


def _choice(options: tuple[str, ...]) -> Check:
    def check(value: object, param: str) -> str:
        return check_choice(param, value, options)
    return check


def _spec(value: object, param: str) -> str:
    from distann.codecs import parse_spec

    parse_spec(value, param=param)
    return value  # type: ignore[return-value]


def _options(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValidationError(param, value, "must be a mapping of fsspec option names to values")
    return dict(value)


def _backend(value: object, param: str) -> str:
    from distann.kernels import check_backend_name

    check_backend_name(value, param)  # the name only: the workers are checked when the job starts
    return value  # type: ignore[return-value]


def _optional(check: Check) -> Check:
    def optional(value: object, param: str) -> Any:
        return None if value is None else check(value, param)
    return optional


def _f(doc: str, check: Check, default: Any = dataclasses.MISSING) -> Any:
    """A job field: its one documentation text and its validation."""
    return field(default=default, metadata={"doc": doc, "check": check})


# --------------------------------------------------------------------------- jobs

_BACKEND = ("kernel backend: numba (CPU), numpy (the reference) or cuda (GPU: pip install 'distann[gpu]'; "
            "aliases gpu, cupy); default: the distann.kernels.backend setting (numba unless set)")
_WORKERS = "worker processes of a LocalCluster started for the job (default: one per core); excludes scheduler"
_SCHEDULER = "address of a running dask scheduler to join, e.g. tcp://host:8786; excludes workers"


@dataclass(frozen=True)
class BuildJob:
    """Build an IVF index from a vector source (``distann build``). Fields: see their ``doc``."""

    source: str = _f("URL of the vectors (.npy, .fvecs/.bvecs, Zarr array, Parquet; fsspec URLs ok)", _text)
    index: str = _f("URL of the index to write (a Zarr group; fsspec URLs ok)", _text)
    spec: str = _f("index type, Faiss factory style: [PCA<D>|PCAR<D>|RR<D>|OPQ<M>[_<D>],]IVF<nlist>,"
                   "Flat|SQ8|SQfp16|PQ<M>[x<bits>][,RFlat] (case-sensitive)", _spec, "IVF1024,Flat")
    metric: str = _f("distance: l2 (squared Euclidean), ip (inner product) or cosine", _choice(METRICS), "l2")
    ids: str | None = _f("URL of int64 ids, one per vector (default: row numbers)", _optional(_text), None)
    column: str | None = _f("vector column of a Parquet source", _optional(_text), None)
    ids_column: str | None = _f("id column of a Parquet source", _optional(_text), None)
    workers: int | None = _f(_WORKERS, _optional(_positive), None)
    scheduler: str | None = _f(_SCHEDULER, _optional(_text), None)
    overwrite: bool = _f("replace an existing index at the destination", _flag, False)
    niter: int = _f("k-means iterations of the coarse quantizer (Faiss IndexIVF also uses 10)", _positive, 10)
    seed: int = _f("random seed of k-means (sampling and initialization)", _nonnegative, 1234)
    init: str = _f("k-means initialization: random (k distinct sample points, as Faiss), k-means++ or k-means||", _choice(INITS), "random")
    max_points_per_centroid: int = _f("training sample size per centroid", _positive, 256)
    chunk_rows: int | None = _f("rows per add task (default: distann.build.chunk-rows)", _optional(_positive), None)
    shard_bytes: int | None = _f("target bytes of one list-range shard (default: distann.build.shard-bytes)",
                                 _optional(_positive), None)
    chunk_bytes: int | None = _f("target bytes of one stored chunk of a shard's arrays, at least 256 rows (default: "
                                 "distann.build.chunk-bytes; smaller: less read per query on object stores)",
                                 _optional(_positive), None)
    backend: str | None = _f(_BACKEND + "; runs the k-means and the add stage's assignment on the workers, "
                             "each checked before any task", _optional(_backend), None)
    two_level: bool | None = _f("large nlist (docs/SCALE.md): train the coarse centroids by a two-level k-means and "
                                "assign vectors and queries through an inverted file over them (true or false; "
                                "default: two-level from nlist >= 16384 on)", _optional(_flag), None)
    nlist1: int | None = _f("two-level builds: level-1 clusters of the k-means, the coarse quantizer's lists, "
                            "2 to nlist / 2 (default: round(sqrt(nlist)))", _optional(_positive), None)
    quantizer_nprobe: int | None = _f("two-level builds: level-1 lists the coarse quantizer searches for each "
                                      "vector and query, 1 to nlist1 (default: 16, at most nlist1)",
                                      _optional(_positive), None)
    refine_niter: int | None = _f("two-level builds: Lloyd iterations of all the centroids after the two levels "
                                  "(default: 5)", _optional(_nonnegative), None)
    storage_options: dict[str, Any] | None = _f("fsspec options of the source and index URLs",
                                                _optional(_options), None)


@dataclass(frozen=True)
class SearchJob:
    """Search an index with a file of queries (``distann search``). Fields: see their ``doc``."""

    index: str = _f("URL of the index to search", _text)
    queries: str = _f("URL of the query vectors (any source format)", _text)
    out: str = _f("URL of the .npz result: D and I, or lims, D and I for a range search", _text)
    column: str | None = _f("vector column of Parquet queries (or the array of a Zarr group)", _optional(_text), None)
    k: int = _f("neighbours per query (not with radius)", _positive, 10)
    nprobe: int = _f("inverted lists scanned per query", _positive, 1)
    radius: float | None = _f("range search: squared L2 distance below, or similarity above, this value "
                              "(not with k)", _optional(_real), None)
    max_codes: int | None = _f("most vectors scanned per query (default: no limit)", _optional(_positive), None)
    k_factor: int | None = _f("RFlat indexes: re-rank the best k_factor * k candidates (default 4)",
                              _optional(_positive), None)
    batch_size: int | None = _f("queries per batch (default: distann.search.batch-size)",
                                _optional(_positive), None)
    workers: int | None = _f("search on a LocalCluster of this many worker processes, the index's shards "
                             "resident in their memory (default: in this process); excludes scheduler",
                             _optional(_positive), None)
    scheduler: str | None = _f("search on the Dask cluster of this scheduler (tcp://host:8786), the index's "
                               "shards resident on its workers; excludes workers", _optional(_text), None)
    replicas: int = _f("copies of each shard on distinct workers (with workers or scheduler)", _positive, 1)
    big_batch: bool = _f("big-batch mode: a Dask job over any number of queries that reads every list once; out "
                         "is then a Zarr group or a .parquet folder, chunked by query", _flag, False)
    format: str | None = _f("big-batch output format: zarr or parquet (default: from the extension of out)",
                            _optional(_choice(("zarr", "parquet"))), None)
    exclude_self: bool = _f("big-batch: drop each query's own id from its results (a self-join)", _flag, False)
    query_ids_column: str | None = _f("big-batch: id column of the queries (Parquet / Zarr group), for "
                                      "exclude_self and the output's query_id", _optional(_text), None)
    chunk_rows: int | None = _f("big-batch: queries per task (default: distann.bigbatch.chunk-rows)",
                                _optional(_positive), None)
    overwrite: bool = _f("big-batch: replace an existing result at out", _flag, False)
    storage_options: dict[str, Any] | None = _f("fsspec options of the index, queries and out URLs",
                                                _optional(_options), None)
    backend: str | None = _f(_BACKEND + "; runs in this process (plus the shard scans on the workers, checked "
                             "first, with workers or scheduler); with big_batch only on the workers (checked "
                             "first)", _optional(_backend), None)


@dataclass(frozen=True)
class KMeansJob:
    """Run distributed k-means on a vector source (``distann kmeans``). Fields: see their ``doc``."""

    source: str = _f("URL of the vectors to cluster", _text)
    out: str = _f("URL of the .npy file of centroids (k, d) float32 to write", _text)
    k: int = _f("number of centroids", _positive)
    niter: int = _f("k-means iterations", _positive, 25)
    metric: str = _f("distance: l2, ip or cosine", _choice(METRICS), "l2")
    init: str = _f("initialization: random (as Faiss), k-means++ or k-means||", _choice(INITS), "random")
    seed: int = _f("random seed (sampling and initialization)", _nonnegative, 1234)
    max_points_per_centroid: int = _f("training sample size per centroid", _positive, 256)
    workers: int | None = _f(_WORKERS, _optional(_positive), None)
    scheduler: str | None = _f(_SCHEDULER, _optional(_text), None)
    column: str | None = _f("vector column of a Parquet source", _optional(_text), None)
    storage_options: dict[str, Any] | None = _f("fsspec options of the source and output URLs",
                                                _optional(_options), None)
    backend: str | None = _f(_BACKEND + "; runs the assignments on the workers, each checked before any task",
                             _optional(_backend), None)


def _threshold(value: object, param: str) -> float:
    return _real(value, param)


@dataclass(frozen=True)
class DedupJob:
    """Find the near-duplicate groups of a dataset (``distann dedup``). Fields: see their ``doc``."""

    source: str = _f("URL of the vectors to deduplicate (any source format)", _text)
    threshold: float = _f("duplicates: squared L2 distance at most this (l2), or similarity at least this "
                          "(cosine, ip; e.g. 0.95)", _threshold)
    out: str = _f("URL of the output: a Parquet folder (id, group_id, is_representative), with _summary.json "
                  "and _similarity.png", _text)
    metric: str = _f("distance: cosine, l2 (squared Euclidean) or ip (inner product)", _choice(METRICS), "cosine")
    index: str | None = _f("reuse this index (built from SOURCE with row-number ids, Flat or RFlat) instead of "
                           "building one", _optional(_text), None)
    k: int | None = _f("keep at most k neighbours per vector (kNN self-join) instead of every pair within the "
                       "threshold", _optional(_positive), None)
    nprobe: int | None = _f("lists probed per vector (default: nlist / 64, at least 8)", _optional(_positive), None)
    spec: str | None = _f("index to build (default IVF<n>,Flat with n about sqrt(vectors)); Flat or RFlat",
                          _optional(_spec), None)
    representative: str = _f("which member represents a group: lowest-id or centroid (closest to the group's "
                             "mean)", _choice(("lowest-id", "centroid")), "lowest-id")
    column: str | None = _f("vector column of a Parquet source (or the array of a Zarr group)", _optional(_text), None)
    ids: str | None = _f("URL of int64 ids, one per vector (default: row numbers)", _optional(_text), None)
    ids_column: str | None = _f("id column of a Parquet source (or array of a Zarr group)", _optional(_text), None)
    overwrite: bool = _f("replace an existing result at out", _flag, False)
    chunk_rows: int | None = _f("vectors per task (default: distann.bigbatch.chunk-rows)", _optional(_positive), None)
    workers: int | None = _f(_WORKERS, _optional(_positive), None)
    scheduler: str | None = _f(_SCHEDULER, _optional(_text), None)
    storage_options: dict[str, Any] | None = _f("fsspec options of the source, index and output URLs",
                                                _optional(_options), None)
    backend: str | None = _f(_BACKEND + "; runs the index build and the self-join on the workers, each checked "
                             "before any task", _optional(_backend), None)


def _port(value: object, param: str) -> int:
    if not is_int(value) or not 1 <= value <= 65535:
        raise ValidationError(param, value, "must be a TCP port number in [1, 65535]")
    return int(value)


def _nonnegative_real(value: object, param: str) -> float:
    value = _real(value, param)
    if value < 0:
        raise ValidationError(param, value, "must be >= 0")
    return value


def _positive_real(value: object, param: str) -> float:
    value = _real(value, param)
    if not value > 0:
        raise ValidationError(param, value, "must be > 0")
    return value


def _rate_limit(value: object, param: str) -> str:
    from distann.serve.ratelimit import parse_rate_limit

    parse_rate_limit(value, param)
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ServeJob:
    """Serve an index over HTTP from a Dask cluster (``distann serve``). Fields: see their ``doc``."""

    index: str = _f("URL of the index to serve", _text)
    workers: int | None = _f(_WORKERS, _optional(_positive), None)
    scheduler: str | None = _f(_SCHEDULER, _optional(_text), None)
    replicas: int = _f("copies of each shard, on distinct workers (a copy answers while another is lost)",
                       _positive, 1)
    host: str = _f("address to listen on (loopback by default; 0.0.0.0 exposes the service: set a token)",
                   _text, "127.0.0.1")
    port: int = _f("TCP port to listen on", _port, 8000)
    token: str | None = _f("bearer token required on every request (default: $DISTANN_TOKEN; none if unset)",
                           _optional(_text), None)
    batch_wait_ms: float = _f("how long a request waits for others to share its batch; 0 disables micro-batching",
                              _nonnegative_real, 2.0)
    max_batch: int = _f("most query vectors in one micro-batch", _positive, 4096)
    deadline_ms: float = _f("default per-request deadline (a request may set a shorter timeout_ms)",
                            _positive_real, 30000.0)
    max_body_bytes: int = _f("largest request body accepted (413 above)", _positive, 64 * 2**20)
    max_queries: int = _f("most query vectors in one request", _positive, 65536)
    max_k: int = _f("largest k a request may ask for", _positive, 1024)
    rate_limit: str | None = _f("per-client (remote address) request rate limit, e.g. 20/second or "
                                "50/second;600/minute (bursts of 50, 10/s sustained); over it: 429 with "
                                "Retry-After (default: no limit)", _optional(_rate_limit), None)
    tls_cert: str | None = _f("PEM certificate (chain) file: serve HTTPS instead of HTTP (with tls_key)",
                              _optional(_text), None)
    tls_key: str | None = _f("PEM private key file of tls_cert", _optional(_text), None)
    watch: float | None = _f("check for a newly committed generation every this many seconds and switch to "
                             "it once resident (default: only on POST /reload)", _optional(_positive_real), None)
    storage_options: dict[str, Any] | None = _f("fsspec options of the index URL", _optional(_options), None)
    backend: str | None = _f(_BACKEND + "; the query coarse quantization and merge run in this process, the "
                             "shard scans on the workers (both checked at start)", _optional(_backend), None)


#: Keys of a job that exclude each other, with the reason given in the error.
_CLUSTER = {("workers", "scheduler"): "workers starts a local cluster, scheduler joins one"}
_EXCLUSIVE: dict[str, dict[tuple[str, str], str]] = {
    "build": _CLUSTER, "kmeans": _CLUSTER, "serve": _CLUSTER, "dedup": _CLUSTER,
    "search": {("k", "radius"): "k asks for the k nearest neighbours, radius for all within a distance", **_CLUSTER},
}

#: Job kind (the command name, also the prefix of files in ``configs/``) to its dataclass.
JOB_KINDS: dict[str, type] = {"build": BuildJob, "search": SearchJob, "kmeans": KMeansJob, "serve": ServeJob,
                              "dedup": DedupJob}


def _job_class(kind: str) -> type:
    try:
        return JOB_KINDS[kind]
    except (KeyError, TypeError):
        raise ValidationError("kind", kind, f"must be one of {', '.join(JOB_KINDS)}") from None


def field_doc(kind: str, name: str) -> str:
    """The documentation text of field ``name`` of job ``kind`` (used for command line help)."""
    for f in dataclasses.fields(_job_class(kind)):
        if f.name == name:
            return f.metadata["doc"]
    raise KeyError(name)


def from_dict(kind: str, mapping: Mapping[str, Any], *, origin: str | None = None,
              labels: Mapping[str, str] | None = None) -> Any:
    """Validate ``mapping`` and return the job dataclass of ``kind`` (build, search, kmeans).

    Errors name the key as ``config.<key>``, or ``<origin>: key '<key>'`` when ``origin`` (a
    file name) is given; ``labels`` overrides the name of single keys (the command line
    passes ``--k`` for a value that came from an option).
    """
    cls = _job_class(kind)
    where = origin or "config"

    def label(key: str) -> str:
        if labels and key in labels:
            return labels[key]
        return f"{origin}: key {key!r}" if origin else f"config.{key}"

    if not isinstance(mapping, Mapping):
        raise ValidationError(where, mapping, f"must be a mapping of {kind} job keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValidationError(label(str(key)), mapping[key],
                                  f"unknown key; {hint}allowed keys: {', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in mapping:
            values[name] = f.metadata["check"](mapping[name], label(name))
        elif f.default is dataclasses.MISSING:
            raise ValidationError(label(name), None, f"required ({f.metadata['doc']})")
    for (a, b), why in _EXCLUSIVE.get(kind, {}).items():
        if mapping.get(a) is not None and mapping.get(b) is not None:
            raise ValidationError(f"{label(a)} and {label(b)}", (mapping[a], mapping[b]), f"give at most one: {why}")
    return cls(**values)


def read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML file holding one mapping (an empty file is an empty mapping)."""
    import fsspec

    name = os.fspath(path)
    try:
        with fsspec.open(name, "rt", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ValidationError("config", name, "must be an existing YAML file") from None
    except yaml.YAMLError as exc:
        raise ValidationError(name, type(exc).__name__, f"must be valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationError(name, data, "must hold a mapping of keys to values at the top level")
    return data


def kind_from_filename(path: str | os.PathLike[str]) -> str:
    """The job kind of a config file from its name prefix: ``build-``, ``search-``, ``kmeans-`` or ``serve-``."""
    base = os.path.basename(os.fspath(path))
    for kind in JOB_KINDS:
        if base.startswith(f"{kind}-"):
            return kind
    raise ValidationError("config", base, f"name must start with one of {', '.join(k + '-' for k in JOB_KINDS)} "
                                          "or the job kind must be given")


def load_config(path: str | os.PathLike[str], kind: str | None = None) -> Any:
    """Load and validate the YAML job file ``path`` as a job of ``kind`` (default: from the file name)."""
    kind = kind_from_filename(path) if kind is None else kind
    _job_class(kind)
    return from_dict(kind, read_mapping(path), origin=os.fspath(path))
