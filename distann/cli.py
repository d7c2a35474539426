"""The ``distann`` command line: build, search (also ``--big-batch``), dedup, serve, query,
verify, info, kmeans, eval and backends.

Jobs (build, search, kmeans, serve, dedup) take their settings from an optional YAML file
(``--config``, see :mod:`distann.config` and ``configs/``) overridden by command line
options; everything is validated before any work is scheduled. Progress bars (one per
stage, only when stderr is a terminal, off with ``--no-progress``) and log messages go to
stderr (:mod:`distann.logs`); only ``info``, ``verify``, ``eval``, ``backends`` and ``dedup``
(its summary) write results to stdout. The commands that run kernels take ``--backend NAME``
(numba, numpy or cuda; default the ``distann.kernels.backend`` setting); the machines that
will run it (this one, or every worker of the cluster) are checked before any work.
A :class:`~distann.errors.DistannError` ends the command with its message on one line (no
traceback) and exit status 2, like an argparse usage error; SIGINT and SIGTERM stop it
cleanly (status 130 and 143), shutting down the embedded cluster and leaving the committed
index as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distann import config, logs
from distann.errors import DistannError, ValidationError

log = logging.getLogger("distann.cli")


# --------------------------------------------------------------------------- parser

def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (SUPPRESS: a subparser keeps the global value)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more logging: DEBUG messages of distann and Dask's own INFO messages")
    p.add_argument("--log-level", type=str.upper, choices=logs.LEVELS, default=argparse.SUPPRESS,
                   help="logging level of distann (default INFO); Dask logs at WARNING or above unless -v")
    p.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars (they are shown only when stderr is a terminal)")
    return p


def _opt(p: argparse.ArgumentParser, flag: str, kind: str, name: str, **kw: Any) -> None:
    """Add an option overriding job field ``name``; its help is the field's documentation."""
    doc = config.field_doc(kind, name)
    default = config.JOB_KINDS[kind].__dataclass_fields__[name].default
    if default not in (None, dataclasses.MISSING) and not isinstance(default, bool):
        doc += f" (default {default})"
    p.add_argument(flag, dest=name, default=None, help=doc.replace("%", "%%"), **kw)


def _json_object(text: str) -> dict[str, Any]:
    """``--storage-options``: a JSON object of fsspec options (argparse reports the error, naming the option)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object of fsspec options, e.g. "
                                         f"'{{\"anon\": true}}'; got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of fsspec options, got {type(value).__name__} "
                                         f"{text!r}")
    return value


_STORAGE_HELP = ("fsspec options of the URLs, as a JSON object, e.g. "
                 "'{\"key\": ..., \"secret\": ..., \"client_kwargs\": {\"endpoint_url\": ...}}'")


def _storage_opt(p: argparse.ArgumentParser, kind: str | None = None) -> None:
    """``--storage-options JSON``: the job field ``storage_options`` of ``kind``, or a plain option."""
    if kind is not None:
        _opt(p, "--storage-options", kind, "storage_options", type=_json_object, metavar="JSON")
    else:
        p.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON", help=_STORAGE_HELP)


def _cluster_opts(p: argparse.ArgumentParser, kind: str) -> None:
    group = p.add_mutually_exclusive_group()
    _opt(group, "--workers", kind, "workers", type=int, metavar="N")  # type: ignore[arg-type]
    _opt(group, "--scheduler", kind, "scheduler", metavar="ADDRESS")  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``distann``."""
    common = _common()
    parser = argparse.ArgumentParser(prog="distann", parents=[common],
                                     description="Distributed out-of-core IVF vector indexing on Dask and Zarr.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", parents=[common], help="build an IVF index from a vector source")
    p.add_argument("source", nargs="?", help="URL of the vectors (or `source` in the config)")
    p.add_argument("index", nargs="?", help="URL of the index to write (or `index` in the config)")
    p.add_argument("--config", metavar="FILE.yaml", help="build job file; options given here override it")
    _opt(p, "--spec", "build", "spec", metavar="S")
    _opt(p, "--metric", "build", "metric", metavar="M")
    _opt(p, "--ids", "build", "ids", metavar="URL")
    _opt(p, "--column", "build", "column", metavar="C")
    _opt(p, "--ids-column", "build", "ids_column", metavar="C")
    _cluster_opts(p, "build")
    _opt(p, "--overwrite", "build", "overwrite", action="store_true")
    _opt(p, "--niter", "build", "niter", type=int, metavar="N")
    _opt(p, "--seed", "build", "seed", type=int, metavar="S")
    _opt(p, "--init", "build", "init", metavar="METHOD")
    _opt(p, "--max-points-per-centroid", "build", "max_points_per_centroid", type=int, metavar="N")
    _opt(p, "--chunk-rows", "build", "chunk_rows", type=int, metavar="N")
    _opt(p, "--shard-bytes", "build", "shard_bytes", type=int, metavar="N")
    _opt(p, "--chunk-bytes", "build", "chunk_bytes", type=int, metavar="N")
    _opt(p, "--backend", "build", "backend", metavar="NAME")
    _storage_opt(p, "build")
    _opt(p, "--two-level", "build", "two_level", action=argparse.BooleanOptionalAction)
    _opt(p, "--nlist1", "build", "nlist1", type=int, metavar="N")
    _opt(p, "--quantizer-nprobe", "build", "quantizer_nprobe", type=int, metavar="P")
    _opt(p, "--refine-niter", "build", "refine_niter", type=int, metavar="N")

    p = sub.add_parser("search", parents=[common], help="search an index, write D and I to an .npz")
    p.add_argument("index", nargs="?", help="URL of the index (or `index` in the config)")
    p.add_argument("queries", nargs="?", help="URL of the queries (or `queries` in the config)")
    p.add_argument("--config", metavar="FILE.yaml", help="search job file; options given here override it")
    _opt(p, "--column", "search", "column", metavar="C")
    _opt(p, "--k", "search", "k", type=int, metavar="K")
    _opt(p, "--nprobe", "search", "nprobe", type=int, metavar="P")
    _opt(p, "--out", "search", "out", metavar="RESULT.npz")
    _opt(p, "--radius", "search", "radius", type=float, metavar="R")
    _opt(p, "--max-codes", "search", "max_codes", type=int, metavar="N")
    _opt(p, "--k-factor", "search", "k_factor", type=int, metavar="F")
    _opt(p, "--batch-size", "search", "batch_size", type=int, metavar="N")
    _cluster_opts(p, "search")
    _opt(p, "--replicas", "search", "replicas", type=int, metavar="R")
    _opt(p, "--big-batch", "search", "big_batch", action="store_true")
    _opt(p, "--format", "search", "format", metavar="FMT")
    _opt(p, "--exclude-self", "search", "exclude_self", action="store_true")
    _opt(p, "--query-ids-column", "search", "query_ids_column", metavar="C")
    _opt(p, "--chunk-rows", "search", "chunk_rows", type=int, metavar="N")
    _opt(p, "--overwrite", "search", "overwrite", action="store_true")
    _opt(p, "--backend", "search", "backend", metavar="NAME")
    _storage_opt(p, "search")

    p = sub.add_parser("dedup", parents=[common], help="find near-duplicate groups; write a Parquet table and a summary")
    p.add_argument("source", nargs="?", help="URL of the vectors (or `source` in the config)")
    p.add_argument("--config", metavar="FILE.yaml", help="dedup job file; options given here override it")
    _opt(p, "--threshold", "dedup", "threshold", type=float, metavar="T")
    _opt(p, "--metric", "dedup", "metric", metavar="M")
    _opt(p, "--out", "dedup", "out", metavar="OUT.parquet")
    _opt(p, "--index", "dedup", "index", metavar="INDEX")
    _opt(p, "--k", "dedup", "k", type=int, metavar="K")
    _opt(p, "--nprobe", "dedup", "nprobe", type=int, metavar="P")
    _opt(p, "--spec", "dedup", "spec", metavar="S")
    _opt(p, "--representative", "dedup", "representative", metavar="POLICY")
    _opt(p, "--column", "dedup", "column", metavar="C")
    _opt(p, "--ids", "dedup", "ids", metavar="URL")
    _opt(p, "--ids-column", "dedup", "ids_column", metavar="C")
    _opt(p, "--chunk-rows", "dedup", "chunk_rows", type=int, metavar="N")
    _cluster_opts(p, "dedup")
    _opt(p, "--overwrite", "dedup", "overwrite", action="store_true")
    _opt(p, "--backend", "dedup", "backend", metavar="NAME")
    _storage_opt(p, "dedup")

    p = sub.add_parser("serve", parents=[common], help="serve an index over HTTP from a Dask cluster")
    p.add_argument("index", nargs="?", help="URL of the index (or `index` in the config)")
    p.add_argument("--config", metavar="FILE.yaml", help="serve job file; options given here override it")
    _cluster_opts(p, "serve")
    _opt(p, "--replicas", "serve", "replicas", type=int, metavar="R")
    _opt(p, "--host", "serve", "host", metavar="HOST")
    _opt(p, "--port", "serve", "port", type=int, metavar="PORT")
    _opt(p, "--token", "serve", "token", metavar="TOKEN")
    _opt(p, "--batch-wait-ms", "serve", "batch_wait_ms", type=float, metavar="MS")
    _opt(p, "--max-batch", "serve", "max_batch", type=int, metavar="N")
    _opt(p, "--deadline-ms", "serve", "deadline_ms", type=float, metavar="MS")
    _opt(p, "--max-body-bytes", "serve", "max_body_bytes", type=int, metavar="B")
    _opt(p, "--max-queries", "serve", "max_queries", type=int, metavar="N")
    _opt(p, "--max-k", "serve", "max_k", type=int, metavar="K")
    _opt(p, "--rate-limit", "serve", "rate_limit", metavar="N/PERIOD")
    _opt(p, "--tls-cert", "serve", "tls_cert", metavar="CERT.pem")
    _opt(p, "--tls-key", "serve", "tls_key", metavar="KEY.pem")
    _opt(p, "--watch", "serve", "watch", type=float, metavar="SECONDS")
    _opt(p, "--backend", "serve", "backend", metavar="NAME")
    _storage_opt(p, "serve")

    p = sub.add_parser("query", parents=[common], help="search a running search service, write D and I to an .npz")
    p.add_argument("url", help="address of the service, e.g. http://127.0.0.1:8000")
    p.add_argument("queries", help="URL of the queries (any source format)")
    p.add_argument("--out", required=True, metavar="RESULT.npz", help="URL of the .npz result (D and I, or lims, D, I)")
    p.add_argument("--column", metavar="C", help="vector column of Parquet queries (or the array of a Zarr group)")
    p.add_argument("--k", type=int, default=10, metavar="K", help="neighbours per query (default 10)")
    p.add_argument("--nprobe", type=int, default=None, metavar="P", help="inverted lists scanned per query")
    p.add_argument("--radius", type=float, default=None, metavar="R", help="range search instead of k")
    p.add_argument("--token", default=None, metavar="TOKEN", help="bearer token (default: $DISTANN_TOKEN)")
    p.add_argument("--tls-ca", default=None, metavar="CA.pem",
                   help="https: trust the certificates signed by this CA file (default: the system's CAs)")
    p.add_argument("--timeout-ms", type=float, default=None, metavar="MS", help="per-request deadline")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept results without some shards (coverage is printed) instead of an error")
    _storage_opt(p)

    p = sub.add_parser("verify", parents=[common],
                       help="read every array of an index and check it against the manifest's checksums")
    p.add_argument("index", help="URL of the index")
    _storage_opt(p)

    p = sub.add_parser("info", parents=[common], help="print the summary of an index as JSON")
    p.add_argument("index", help="URL of the index")
    _storage_opt(p)

    p = sub.add_parser("kmeans", parents=[common], help="distributed k-means, write the centroids as .npy")
    p.add_argument("source", nargs="?", help="URL of the vectors (or `source` in the config)")
    p.add_argument("out", nargs="?", help="URL of the .npy of centroids (or `out` in the config)")
    p.add_argument("--config", metavar="FILE.yaml", help="kmeans job file; options given here override it")
    _opt(p, "--k", "kmeans", "k", type=int, metavar="K")
    _opt(p, "--niter", "kmeans", "niter", type=int, metavar="N")
    _opt(p, "--metric", "kmeans", "metric", metavar="M")
    _opt(p, "--init", "kmeans", "init", metavar="METHOD")
    _opt(p, "--seed", "kmeans", "seed", type=int, metavar="S")
    _opt(p, "--max-points-per-centroid", "kmeans", "max_points_per_centroid", type=int, metavar="N")
    _opt(p, "--column", "kmeans", "column", metavar="C")
    _cluster_opts(p, "kmeans")
    _opt(p, "--backend", "kmeans", "backend", metavar="NAME")
    _storage_opt(p, "kmeans")

    p = sub.add_parser("eval", parents=[common], help="recall@k and QPS of an index over several nprobe")
    p.add_argument("index", help="URL of the index")
    p.add_argument("queries", help="URL of the queries")
    p.add_argument("--gt", required=True, metavar="GT", help="ground-truth ids (nq, >=k): .npy or .ivecs")
    p.add_argument("--column", metavar="C", help="vector column of Parquet queries (or the array of a Zarr group)")
    p.add_argument("--k", type=int, default=10, metavar="K", help="neighbours per query (default 10)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1], metavar="P",
                   help="nprobe values to evaluate (default 1)")
    p.add_argument("--max-codes", type=int, default=None, metavar="N",
                   help="most vectors scanned per query (default: no limit)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="time each nprobe N times and keep the fastest (default 1)")
    p.add_argument("--k-factor", type=int, default=None, metavar="F",
                   help="RFlat indexes: re-rank the best F * k candidates (default 4)")
    p.add_argument("--load", action=argparse.BooleanOptionalAction, default=None,
                   help="load the whole index into memory before timing (default: when it takes at most half "
                        "of the available memory); --no-load times searches that read the probed lists "
                        "from the store")
    p.add_argument("--backend", default=None, metavar="NAME",
                   help="kernel backend of the searches: numba (CPU), numpy (the reference) or cuda (GPU: pip "
                        "install 'distann[gpu]'); default: the distann.kernels.backend setting")
    _storage_opt(p)

    p = sub.add_parser("backends", parents=[common],
                       help="print as JSON which kernel backends (numba, numpy, cuda) can run here, or why not")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="also report each worker of the Dask cluster of this scheduler (tcp://host:8786)")
    return parser


# --------------------------------------------------------------------------- jobs

_POSITIONALS = {"build": ("source", "index"), "search": ("index", "queries"), "kmeans": ("source", "out"),
                "serve": ("index",), "dedup": ("source",)}


def _flag(kind: str, name: str) -> str:
    """How the command line spells job field ``name``: SOURCE for a positional, --ids-column for an option."""
    return name.upper() if name in _POSITIONALS[kind] else "--" + name.replace("_", "-")


def _job(kind: str, args: argparse.Namespace) -> Any:
    """The validated job of ``kind``: the YAML of ``--config`` overridden by the options given."""
    fields = [f.name for f in dataclasses.fields(config.JOB_KINDS[kind])]
    mapping: dict[str, Any] = {}
    origin = None
    if getattr(args, "config", None):
        origin = args.config
        mapping = config.read_mapping(origin)
    overrides = {name: getattr(args, name) for name in fields
                 if getattr(args, name, None) is not None}
    if "workers" in overrides or "scheduler" in overrides:
        # --workers on the command line replaces a scheduler of the file and vice versa.
        mapping.pop("workers", None)
        mapping.pop("scheduler", None)
    labels = {name: _flag(kind, name) for name in overrides}
    for name in fields:
        if name not in overrides and name not in mapping:
            labels[name] = f"{_flag(kind, name)} (or `{name}` in --config)"
    merged = {**mapping, **overrides}
    for name in _PATH_FIELDS.intersection(merged):
        merged[name] = _resolve_local(merged[name])
    return config.from_dict(kind, merged, origin=origin, labels=labels)


#: job fields naming data: a local path given on the command line or in a job file is the
#: user's own, so ``../idx`` is resolved here (the library refuses '..' in the URLs it is given)
_PATH_FIELDS = frozenset({"source", "index", "out", "queries", "ids"})


def _resolve_local(value: Any) -> Any:
    """``value`` made an absolute, normalized path when it is a local path; anything else unchanged."""
    if not isinstance(value, str) or not value or "://" in value or "::" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _cmd_build(args: argparse.Namespace) -> int:
    job: config.BuildJob = _job("build", args)
    import distann

    log.info("building %s from %s: %s, metric %s", job.index, job.source, job.spec, job.metric)
    # distann.build validates everything (destination, nlist <= n, ...) and takes the index's
    # lease before it starts the cluster, so bad input fails without one.
    distann.build(
        job.source, job.index, spec=job.spec, metric=job.metric, ids=job.ids,
        overwrite=job.overwrite, niter=job.niter, seed=job.seed, init=job.init,
        max_points_per_centroid=job.max_points_per_centroid, chunk_rows=job.chunk_rows,
        shard_bytes=job.shard_bytes, chunk_bytes=job.chunk_bytes, column=job.column, ids_column=job.ids_column,
        storage_options=job.storage_options, workers=job.workers, scheduler=job.scheduler,
        progress=_progress(args), backend=job.backend, two_level=job.two_level, nlist1=job.nlist1,
        quantizer_nprobe=job.quantizer_nprobe, refine_niter=job.refine_niter)
    return 0


def _local_backend(name: str | None) -> str:
    """The backend of kernels run in this process, checked to run here before any work: the
    registered name. Errors name ``--backend``, or the setting when the name came from it."""
    from distann.kernels import get_backend, resolve_backend

    key = resolve_backend(name)
    try:
        get_backend(key)
    except ValidationError as exc:
        raise ValidationError("--backend" if name is not None else "distann.kernels.backend", exc.received,
                              exc.allowed) from None
    return key


def _check_output(param: str, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse an output path that cannot be written, before any work is done: a local path is
    tried for real (its folder created, a temporary file written and removed)."""
    import tempfile

    import fsspec.core

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.isdir(path):
        raise ValidationError(param, url, "a file to write; this is a directory")
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" not in protocols and "local" not in protocols:
        return  # object stores create the key on write
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValidationError(param, url, f"a file that can be written: {exc.strerror or exc}") from None


def _save(url: str, writer: Any, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a file through fsspec (local paths and remote URLs alike)."""
    import fsspec

    with fsspec.open(url, "wb", auto_mkdir=True, **(storage_options or {})) as fh:
        writer(fh)


def _read_queries(url: str, column: str | None, d: int, storage_options: dict | None = None) -> np.ndarray:
    """The queries of the file at ``url``, under the same dtype rule as Index.search."""
    from distann.validation import check_query_dtype
    from distann.sources import open_source

    try:
        src = open_source(url, column=column, storage_options=storage_options)
    except ValidationError as exc:
        raise ValidationError("QUERIES" if exc.param == "source" else exc.param, exc.received, exc.allowed) from None
    check_query_dtype(src.dtype, "QUERIES", f"{url} of dtype {src.dtype}")
    if src.d != d:
        raise ValidationError("QUERIES", url, f"vectors of the index's dimension d={d}; this file has d={src.d}")
    return np.ascontiguousarray(src.read_rows(0, src.n), dtype=np.float32)


def _cmd_big_batch(job: config.SearchJob, args: argparse.Namespace) -> int:
    import distann

    if job.replicas != 1:
        raise ValidationError("--replicas", job.replicas, "1 with --big-batch (it reads each list once from the store)")
    if job.batch_size is not None:
        raise ValidationError("--batch-size", job.batch_size, "not given with --big-batch (use --chunk-rows)")
    result = distann.big_batch_search(
        job.index, job.queries, k=None if job.radius is not None else job.k, nprobe=job.nprobe, radius=job.radius,
        out=job.out, format=job.format, overwrite=job.overwrite, max_codes=job.max_codes, k_factor=job.k_factor,
        column=job.column, query_ids_column=job.query_ids_column, exclude_self=job.exclude_self,
        chunk_rows=job.chunk_rows, workers=job.workers, scheduler=job.scheduler, progress=_progress(args),
        backend=job.backend, storage_options=job.storage_options)
    log.info("result: %r", result)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    job: config.SearchJob = _job("search", args)
    import dask.config

    import distann
    from distann.cluster import check_backend, check_cluster_args, client_context

    if job.big_batch:
        return _cmd_big_batch(job, args)
    for name in ("format", "query_ids_column", "chunk_rows"):
        if getattr(job, name) is not None:
            raise ValidationError(_flag("search", name), getattr(job, name), "only with --big-batch")
    for name in ("exclude_self", "overwrite"):
        if getattr(job, name):
            raise ValidationError(_flag("search", name), True, "only with --big-batch")
    opts = job.storage_options
    _check_output("--out", job.out, opts)
    distributed = job.workers is not None or job.scheduler is not None
    if distributed:
        check_cluster_args(job.workers, job.scheduler)
    elif job.replicas != 1:
        raise ValidationError("--replicas", job.replicas, "1 unless --workers or --scheduler is given")
    backend = _local_backend(job.backend)  # this process quantizes the queries and merges, in any case
    index = distann.open_index(job.index, storage_options=opts)
    xq = _read_queries(job.queries, job.column, index.d, opts)
    settings = {} if job.batch_size is None else {"distann.search.batch-size": job.batch_size}
    with dask.config.set(settings), contextlib.ExitStack() as stack:
        if distributed:
            client = stack.enter_context(client_context(job.workers, job.scheduler))
            check_backend(client, backend)  # before the shards are loaded onto the workers
            index = stack.enter_context(distann.open_index(job.index, client=client, replicas=job.replicas,
                                                           storage_options=opts))
        t0 = time.perf_counter()
        if job.radius is None:
            D, I = index.search(xq, k=job.k, nprobe=job.nprobe, max_codes=job.max_codes, k_factor=job.k_factor,
                                backend=backend)
            arrays = {"D": D, "I": I}
        else:
            lims, D, I = index.range_search(xq, job.radius, nprobe=job.nprobe, max_codes=job.max_codes,
                                            backend=backend)
            arrays = {"lims": lims, "D": D, "I": I}
        elapsed = time.perf_counter() - t0
    _save(job.out, lambda fh: np.savez(fh, **arrays), opts)
    what = f"k={job.k}" if job.radius is None else f"radius={job.radius:g} ({len(I)} results)"
    log.info("searched %d queries, %s, nprobe=%d in %.2f s (%.0f QPS); wrote %s",
             len(xq), what, job.nprobe, elapsed, len(xq) / max(elapsed, 1e-9), job.out)
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    job: config.DedupJob = _job("dedup", args)
    import distann

    summary = distann.dedup(
        job.source, job.threshold, job.metric, out=job.out, index=job.index, k=job.k, nprobe=job.nprobe,
        spec=job.spec, representative=job.representative, column=job.column, ids=job.ids, ids_column=job.ids_column,
        overwrite=job.overwrite, chunk_rows=job.chunk_rows, storage_options=job.storage_options, workers=job.workers,
        scheduler=job.scheduler, progress=_progress(args), backend=job.backend)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    job: config.ServeJob = _job("serve", args)
    try:
        from distann.serve.app import ServeSettings
        from distann.serve.server import check_tls, make_holder, serve
    except ImportError as exc:
        raise ValidationError("serve", f"missing package {exc.name!r}",
                              'the serve extra: pip install "distann[serve]"') from None
    import dask.config

    import distann
    from distann.cluster import check_backend, check_cluster_args, client_context

    check_cluster_args(job.workers, job.scheduler)
    check_tls(job.tls_cert, job.tls_key)  # before the cluster starts
    backend = _local_backend(job.backend)  # the coordinator quantizes and merges in this process
    distann.open_index(job.index, storage_options=job.storage_options)  # a bad URL fails before any cluster starts
    _check_port_free(job.host, job.port)
    token = job.token if job.token is not None else os.environ.get("DISTANN_TOKEN") or None
    settings = ServeSettings(batch_wait_ms=job.batch_wait_ms, max_batch=job.max_batch, deadline_ms=job.deadline_ms,
                             max_body_bytes=job.max_body_bytes, max_queries=job.max_queries, max_k=job.max_k,
                             token=token, rate_limit=job.rate_limit, watch_seconds=job.watch)
    with client_context(job.workers, job.scheduler) as client, \
            dask.config.set({"distann.kernels.backend": backend}):  # every search of the service
        check_backend(client, backend)
        holder = make_holder(job.index, client, replicas=job.replicas, storage_options=job.storage_options)
        try:
            serve(holder, settings, host=job.host, port=job.port, tls_cert=job.tls_cert, tls_key=job.tls_key)
        finally:
            holder.close()
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ValidationError("--port", port, f"a port that can be bound on {host}: {exc.strerror or exc}") from None


def _cmd_query(args: argparse.Namespace) -> int:
    from distann.serve.client import SearchClient

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    if not re.match(r"https?://", args.url):
        raise ValidationError("URL", args.url, "the http:// or https:// address of a running distann serve")
    _check_output("--out", args.out, args.storage_options)
    try:
        service = SearchClient(args.url, token=args.token, verify=args.tls_ca or True)
    except ValidationError as exc:  # the CA file: named as the command line spells it
        raise ValidationError("--tls-ca" if exc.param == "verify" else exc.param, exc.received, exc.allowed) from None
    with service:
        try:
            d = service.info()["d"]
        except ConnectionError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ValidationError("--tls-ca", args.tls_ca, f"a CA file that vouches for the certificate of "
                                      f"{args.url}: {exc}") from None
            raise ValidationError("URL", args.url, f"the address of a running distann serve: {exc}") from None
        xq = _read_queries(args.queries, args.column, d, args.storage_options)
        extra = {"timeout_ms": args.timeout_ms, "allow_partial": args.allow_partial or None}
        t0 = time.perf_counter()
        if args.radius is None:
            out = service.search_result(xq, k=args.k, nprobe=args.nprobe, **extra)
            arrays = {"D": out["distances"], "I": out["ids"]}
            coverage = out["coverage"]
        else:
            lims, D, I = service.range_search(xq, args.radius, nprobe=args.nprobe, **extra)
            arrays, coverage = {"lims": lims, "D": D, "I": I}, None
        elapsed = time.perf_counter() - t0
    _save(args.out, lambda fh: np.savez(fh, **arrays), args.storage_options)
    log.info("queried %s: %d queries in %.2f s (%.0f QPS)%s; wrote %s", args.url, len(xq), elapsed,
             len(xq) / max(elapsed, 1e-9), "" if coverage in (None, 1.0) else f", coverage {coverage:.3f}", args.out)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import distann

    index = distann.open_index(args.index, storage_options=args.storage_options)
    t0 = time.perf_counter()
    report = index.verify()
    nshard = report["shards"]
    print(f"verified {index.url}: {report['arrays']} arrays and {nshard} shard{'s' if nshard != 1 else ''} "
          f"({report['bytes'] / 2**20:.1f} MiB) match the manifest's checksums "
          f"(format version {index.manifest.format_version}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import distann

    index = distann.open_index(args.index, storage_options=args.storage_options)
    print(json.dumps(index.info(), indent=2, default=str))
    return 0


def _cmd_kmeans(args: argparse.Namespace) -> int:
    job: config.KMeansJob = _job("kmeans", args)
    import distann

    _check_output("OUT", job.out, job.storage_options)
    t0 = time.perf_counter()
    result = distann.kmeans(
        job.source, job.k, niter=job.niter, metric=job.metric, init=job.init, seed=job.seed,
        max_points_per_centroid=job.max_points_per_centroid, column=job.column,
        storage_options=job.storage_options, workers=job.workers, scheduler=job.scheduler,
        progress=_progress(args), backend=job.backend)
    elapsed = time.perf_counter() - t0
    centroids = np.ascontiguousarray(result.centroids, dtype=np.float32)
    _save(job.out, lambda fh: np.save(fh, centroids), job.storage_options)
    obj = [float(v) for v in result.objective]
    if obj:
        change = (obj[0] - obj[-1]) / abs(obj[0]) * 100 if obj[0] else 0.0
        log.info("k-means: k=%d, %d iterations in %.1f s, objective %.6g -> %.6g (%.1f%% lower); wrote %s",
                 job.k, len(obj), elapsed, obj[0], obj[-1], change, job.out)
    return 0


def read_ground_truth(url: str, storage_options: dict | None = None) -> np.ndarray:
    """Ground-truth ids from an ``.npy`` (nq, k) or an ``.ivecs`` file, as int64."""
    import fsspec

    if not url.endswith((".npy", ".ivecs")):
        raise ValidationError("--gt", url, "must be an .npy or .ivecs file")
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            raw = fh.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ValidationError("--gt", url, "must be an existing file") from None
    if url.endswith(".ivecs"):
        ints = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=np.int32)
        k = int(ints[0]) if ints.size else 0
        if k <= 0 or len(raw) % 4 or ints.size % (k + 1) or (ints.reshape(-1, k + 1)[:, 0] != k).any():
            raise ValidationError("--gt", url, "must be an .ivecs file (int32 rows, each prefixed by k)")
        gt = ints.reshape(-1, k + 1)[:, 1:]
    else:
        try:
            gt = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValidationError("--gt", url, f"must be an .npy file holding an integer array ({exc})") from None
    if gt.ndim != 2 or not np.issubdtype(gt.dtype, np.integer):
        raise ValidationError("--gt", f"{gt.dtype} array of shape {gt.shape}", "must be a 2-d integer array (nq, k)")
    return gt.astype(np.int64, copy=False)


def _cmd_eval(args: argparse.Namespace) -> int:
    import psutil

    import distann
    from distann.evaluation import sweep_nprobe

    for name, value in (("--k", args.k), ("--max-codes", args.max_codes), ("--repeats", args.repeats),
                        ("--k-factor", args.k_factor)):
        if value is not None and value < 1:
            raise ValidationError(name, value, "must be a positive integer")
    backend = _local_backend(args.backend)
    index = distann.open_index(args.index, storage_options=args.storage_options)
    for nprobe in args.nprobe:
        if not 1 <= nprobe <= index.nlist:
            raise ValidationError("--nprobe", nprobe, f"values in [1, nlist={index.nlist}]")
    xq = _read_queries(args.queries, args.column, index.d, args.storage_options)
    gt = read_ground_truth(args.gt, args.storage_options)
    if gt.shape[0] != len(xq) or gt.shape[1] < args.k:
        raise ValidationError("--gt", f"array of shape {gt.shape}", f"must have one row per query ({len(xq)}) "
                                                                    f"and at least k={args.k} columns")
    size, available = index.lists.nbytes, psutil.virtual_memory().available
    load = args.load if args.load is not None else size <= available // 2
    if load:
        index.load()
        print(f"index loaded in memory ({size / 2**20:.1f} MiB); searches read nothing from the store")
    else:
        reason = "--no-load" if args.load is False else \
            f"it needs {size / 2**20:.0f} MiB, more than half of the {available / 2**20:.0f} MiB available"
        print(f"index streamed from the store ({reason}); each search reads the lists it probes")
    points, front = sweep_nprobe(index, xq, gt, args.nprobe, k=args.k, repeats=args.repeats,
                                 max_codes=args.max_codes, k_factor=args.k_factor, backend=backend)
    best = {p.nprobe for p in front}
    print(f"{'nprobe':>8} {f'recall@{args.k}':>10} {'QPS':>12}  pareto")
    for p in points:
        print(f"{p.nprobe:>8d} {p.recall:>10.4f} {p.qps:>12.1f}  {'*' if p.nprobe in best else ''}".rstrip())
    return 0


def backend_report() -> dict[str, str]:
    """Each registered kernel backend -> "ok", or why it cannot run in this process."""
    from distann.kernels import _REGISTRY, backend_status

    return {name: backend_status(name) for name in sorted(_REGISTRY)}


def _cmd_backends(args: argparse.Namespace) -> int:
    from distann.cluster import client_context

    try:
        default: str = config.get("kernels.backend")
    except ValidationError as exc:
        default = f"invalid setting: {exc}"
    here = backend_report()
    report: dict[str, Any] = {"default": default, "backends": here}
    if here.get("cuda") == "ok":
        try:
            from distann.kernels.cuda import device_info

            report["cuda_device"] = device_info()
        except Exception as exc:  # noqa: BLE001 - a report, not a job: say what failed
            report["cuda_device"] = f"{type(exc).__name__}: {exc}"
    if args.scheduler is not None:
        with client_context(scheduler=args.scheduler) as client:
            report["workers"] = dict(sorted(client.run(backend_report).items()))
    print(json.dumps(report, indent=2, default=str))
    return 0


_COMMANDS = {"build": _cmd_build, "search": _cmd_search, "verify": _cmd_verify, "info": _cmd_info,
             "kmeans": _cmd_kmeans, "eval": _cmd_eval, "serve": _cmd_serve, "query": _cmd_query,
             "dedup": _cmd_dedup, "backends": _cmd_backends}

#: API parameter names that the command line spells otherwise
_CLI_NAMES = {"index_url": "INDEX", "url": "INDEX", "xq": "QUERIES"}


def _cli_error(exc: DistannError, command: str) -> DistannError:
    """``exc`` naming the command line's spelling of an API parameter (``--ids-column``, not ``ids_column``)."""
    if not isinstance(exc, ValidationError) or not re.fullmatch(r"[a-z][a-z0-9_]*", exc.param):
        return exc
    name = _CLI_NAMES.get(exc.param)
    if name is None:
        name = _flag(command, exc.param) if command in _POSITIONALS else "--" + exc.param.replace("_", "-")
    return ValidationError(name, exc.received, exc.allowed)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that clusters and leases are released on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distann`` command line; returns the exit status (2: invalid input or index)."""
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", 0))
    level = getattr(args, "log_level", None) or ("DEBUG" if verbose else "INFO")
    logs.setup(level, verbose)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _COMMANDS[args.command](args)
    except DistannError as exc:
        log.error("%s", _cli_error(exc, args.command))
        return 2
    except _Terminated:
        log.error("terminated (SIGTERM); the committed index is unchanged, rerun to resume")
        return 143
    except KeyboardInterrupt:
        log.error("interrupted; the committed index is unchanged, rerun to resume")
        return 130
    except BrokenPipeError:
        # stdout closed early (``distann info ... | head``): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
