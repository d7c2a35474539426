"""``distann.big_batch_search``: search an index with more queries than fit anywhere at once.

Stages (one Dask task per unit; every task resumable through its DONE marker)::

    validate (no task) -> lease the output -> bucket: one task per query chunk (read, check,
    transform, coarse-quantize, write the chunk's queries bucketed by list range)
    -> scan: one task per list range (read its lists once, stream every piece of queries
    that probes them through the engine, write partial results per query chunk)
    -> reduce: one task per query chunk (merge every range's partial results for the chunk:
    the shuffle's reduce side, built from Dask tasks on the workers) and write the output
    -> commit: ``_distann.json``, written last, then the working files are removed

Queries and results travel between workers through the output's working folder
(``<out>/_distann/work``, see ``bigbatch.work``), never through the client; the client holds
only the plan and per-(chunk, range) counts.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from datetime import datetime, timezone

import numpy as np

from distann import config
from distann.bigbatch import output
from distann.bigbatch.plan import job_key, plan_ranges, ranges_of
from distann.bigbatch.tasks import (JobContext, bucket_chunk, reduce_knn, reduce_range, scan_range,
                                    stores_exact_vectors, write_range_block, write_range_lims)
from distann.bigbatch.work import WORK, check_output, clear_output, move_parts
from distann.chunks import plan_chunks
from distann.cluster import (TaskNames, broadcast, check_backend, check_cluster_args, check_reachable, client_context,
                             wait_all)
from distann.errors import ValidationError
from distann.kernels import resolve_backend
from distann.store.lease import GenerationLease
from distann.store.location import Location
from distann.store.readers import ReaderLease
from distann.validation import (check_bool, check_k, check_max_codes, check_nprobe, check_positive_int,
                                check_query_dtype, check_radius)

log = logging.getLogger(__name__)

#: what a result folder may hold besides the result itself
_OURS = ("_distann", output.RESULT_PATH)


def _open(index, storage_options):
    from distann.search.distributed import DistributedIndex
    from distann.search.index import Index, open_index

    if isinstance(index, DistributedIndex):
        return index.local
    if isinstance(index, Index):
        return index
    if isinstance(index, (str, os.PathLike)):
        return open_index(os.fspath(index), storage_options=storage_options, cache_bytes=0)
    raise ValidationError("index", type(index).__name__, "an Index, or the URL of a committed index")


def big_batch_search(index, queries, k: int | None = None, nprobe: int | None = None, *, out: str,
                     radius: float | None = None, client=None, format: str | None = None, overwrite: bool = False,
                     max_codes: int | None = None, k_factor: int | None = None, metric: str | None = None,
                     column: str | None = None, query_ids=None, query_ids_column: str | None = None,
                     exclude_self: bool = False, exact: bool = False, chunk_rows: int | None = None, range_bytes: int | None = None,
                     storage_options: dict | None = None, workers: int | None = None, scheduler: str | None = None,
                     progress: bool = False, backend: str | None = None) -> output.BigBatchResult:
    """Search ``index`` with every vector of ``queries`` on a Dask cluster; the results go to
    ``out`` (Zarr, or Parquet when ``out`` ends in .parquet / ``format="parquet"``), chunked by
    query, and the committed result is returned (see :func:`distann.bigbatch.open_result`).

    kNN (``k``, default 10) or range mode (``radius``: squared L2 distance below, or
    similarity above, as :meth:`Index.range_search`). Results equal :meth:`Index.search` /
    :meth:`Index.range_search` with the same parameters. ``queries``: any source URL (the
    index's own source for a self-join), a VectorSource or an array; ``query_ids`` /
    ``query_ids_column``: their ids (default row numbers), which ``exclude_self`` drops from
    each query's results (a self-join). ``metric``: if given, must be the index's. ``exact``
    (indexes storing exact vectors: ``IVF<n>,Flat`` without transform, or any RFlat): each
    result's distance is recomputed in float64 from the stored vectors, and range mode keeps
    exactly the results within ``radius`` by those distances.

    A job killed at any point leaves no committed result; rerun it with the same arguments
    to resume from the finished list ranges. ``overwrite`` replaces a committed result (or an
    unfinished job with other parameters) at ``out``. ``chunk_rows`` (queries per task) and
    ``range_bytes`` (stored list bytes per scan task, lowered to give at least two list ranges
    per worker when the shards allow) bound each worker's memory (``distann.bigbatch.*``
    settings by default). ``client``: a ``distributed.Client``; with
    none, an embedded LocalCluster (``workers``) is started, or ``scheduler`` is joined.
    ``backend``: the kernel backend of the bucket, scan and reduce tasks ("numba", "numpy" or
    "cuda"; default the ``distann.kernels.backend`` setting), checked on every worker before
    any task is scheduled.
    """
    from distann.sources import as_source, resolve_ids

    t_start = time.perf_counter()
    idx = _open(index, storage_options)
    mode = "knn" if radius is None else "range"
    if radius is not None and k is not None:
        raise ValidationError("k", k, "None with radius (radius asks for every vector within a distance)")
    if metric is not None and metric != idx.metric:
        raise ValidationError("metric", metric, f"the metric the index was built with ({idx.metric}); "
                                                f"{idx.url} cannot answer {metric} searches")
    k = check_k(10 if k is None else k) if mode == "knn" else 0
    radius = check_radius(radius, idx.metric) if mode == "range" else None
    nprobe = check_nprobe(idx.defaults.nprobe if nprobe is None else nprobe, idx.nlist)
    max_codes = check_max_codes(max_codes)
    k_factor = check_positive_int("k_factor", idx.defaults.k_factor if k_factor is None else k_factor)
    check_bool("exclude_self", exclude_self)
    check_bool("exact", exact)
    if exact and not stores_exact_vectors(idx.codec):
        raise ValidationError("exact", exact, f"False for {idx.spec}: recomputing distances needs an index storing "
                              "exact vectors (IVF<n>,Flat without a transform, or a ...,RFlat spec)")
    check_bool("overwrite", overwrite)
    chunk_rows = check_positive_int("chunk_rows", chunk_rows if chunk_rows is not None
                                    else config.get("bigbatch.chunk-rows"))
    range_bytes = check_positive_int("range_bytes", range_bytes if range_bytes is not None
                                     else config.get("bigbatch.range-bytes"))
    check_cluster_args(workers, scheduler, client)
    backend = resolve_backend(backend)
    try:
        src = as_source(queries, column=column, storage_options=storage_options)
    except ValidationError as exc:
        raise ValidationError("queries" if exc.param == "source" else exc.param, exc.received, exc.allowed) from None
    check_query_dtype(src.dtype, "queries", f"{src.url} of dtype {src.dtype}")
    if src.d != idx.d:
        raise ValidationError("queries", src.url, f"vectors of the index's dimension d={idx.d}; this source has "
                                                  f"d={src.d}")
    if src.n == 0:
        raise ValidationError("queries", src.url, "at least one query vector")
    qids = resolve_ids(query_ids, query_ids_column, src, storage_options, param="query_ids",
                       column_param="query_ids_column")
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if not isinstance(out, str) or not out:
        raise ValidationError("out", out, "a non-empty path or URL for the result")
    fmt = output.output_format(out, format)
    out_loc = Location(out, dict(storage_options or {}), "out")
    work = Location(posixpath.join(out_loc.url, WORK), dict(storage_options or {}))
    m = idx.manifest
    codec = idx.codec
    row_bytes = codec.code_size + 8 + (4 * idx.d if codec.refine else 0)
    chunks = plan_chunks(src.n, chunk_rows)
    key = job_key(index=idx.url, generation=m.generation, build_key=m.build_key, queries=src.fingerprint,
                  query_ids=getattr(qids, "fingerprint", None), mode=mode, k=k, radius=radius, nprobe=nprobe,
                  max_codes=max_codes, k_factor=k_factor if codec.refine else None, exclude_self=exclude_self,
                  exact=exact, format=fmt, chunk_rows=chunk_rows, range_bytes=range_bytes)
    resume = check_output(out_loc, work, key, overwrite, output.RESULT_PATH, _OURS, "big-batch result")
    lease_loc = Location(posixpath.join(out_loc.url, "_distann"), dict(storage_options or {}))
    timings: dict[str, float] = {}
    names = TaskNames(f"big-batch search into {out_loc.url}", f"Nothing was committed at {out_loc.url} (rerun the same "
                                                              "job to resume it)")
    with GenerationLease.acquire(lease_loc, 1, config.get("build.lease-seconds"),
                                 what=f"a big-batch search of {src.url} into {out_loc.url}") as lease:
        reader = ReaderLease(idx.loc, m.generation) if not idx.loc.is_process_local else None
        try:
            if not resume:
                clear_output(out_loc)
            planned = work.read_json("job.json").get("ranges") if resume else None
            work.write_json("job.json", {"key": key, "started": _now(), "ranges": planned})
            if mode == "knn" and fmt == "zarr" and not (resume and out_loc.exists("ids/zarr.json")):
                output.create_zarr_knn(out_loc, src.n, k, chunk_rows)
            with client_context(workers=workers, scheduler=scheduler, client=client) as c, names.translate(c):
                check_reachable(c, out_loc, "out", "_distann/work/job.json", {"queries": src, "query_ids": qids})
                check_backend(c, backend)
                if planned is None:  # at least two list ranges per worker when the shards allow it
                    nworkers = max(1, len(c.scheduler_info(n_workers=-1)["workers"]))
                    target = min(range_bytes, -(-idx.lists.nbytes // (2 * nworkers)))
                    planned = [(r.shard_start, r.shard_stop) for r in plan_ranges(m, row_bytes, max(1, target))]
                    work.write_json("job.json", {"key": key, "started": _now(), "ranges": planned})
                ranges = ranges_of(m, planned)  # a resumed job keeps the plan of its first run
                ctx = JobContext(idx.loc, m, work, out_loc, fmt, mode, k, k_factor, radius, nprobe, max_codes,
                                 exclude_self, backend, ranges, exact)
                t0 = time.perf_counter()
                cf, pf = broadcast(c, idx.quantizer), broadcast(c, codec)
                sf = broadcast(c, idx.list_sizes)
                names.enter("bucket", "chunk_rows (distann.bigbatch.chunk-rows)")
                buckets = [c.submit(bucket_chunk, ctx, ch, src, qids, cf, pf, sf, pure=False) for ch in chunks]
                got = wait_all(names.name(buckets, (f"bucket task of query chunk {ch.name}" for ch in chunks)),
                               "bucket", progress)
                del buckets
                bad = [g for g in got if "nonfinite" in g]
                if bad:
                    first = min(g["first"] for g in bad)
                    raise ValidationError("queries", f"{sum(g['nonfinite'] for g in bad)} vector(s) with NaN or Inf, "
                                          f"first at row {first}", "finite vectors (nothing was written)")
                counts = np.array([g["counts"] for g in got], dtype=np.int64).reshape(len(chunks), len(ranges))
                del cf, pf, sf
                timings["bucket_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                names.enter("scan", "range_bytes (distann.bigbatch.range-bytes)")
                scans = [c.submit(scan_range, ctx, r, [chunks[i].name for i in np.flatnonzero(counts[:, r.index])],
                                  qids, pure=False) for r in ranges]
                names.name(scans, (f"scan task of list range {r.name}" for r in ranges))
                scanned = wait_all(scans, "scan", progress, eta="list ranges")
                del scans
                timings["scan_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                probed = [[ranges[j].name for j in np.flatnonzero(counts[i])] for i in range(len(chunks))]
                names.enter("reduce", "chunk_rows (distann.bigbatch.chunk-rows)")
                if mode == "knn":
                    kc = ctx.kk * k_factor
                    reds = [c.submit(reduce_knn, ctx, ch, probed[i], qids, kc, codec.refine, pure=False)
                            for i, ch in enumerate(chunks)]
                else:
                    reds = [c.submit(reduce_range, ctx, ch, probed[i], qids, pure=False) for i, ch in enumerate(chunks)]
                names.name(reds, (f"reduce task of query chunk {ch.name}" for ch in chunks))
                totals = wait_all(reds, "reduce", progress)
                del reds
                if mode == "range" and fmt == "zarr":
                    names.enter("layout")
                    _layout_range(c, ctx, chunks, totals, src.n, chunk_rows, progress)
                timings["reduce_s"] = time.perf_counter() - t0
            if fmt == "parquet":
                move_parts(work, out_loc, [output.part_name(ch.name) for ch in chunks])
            elif not out_loc.exists("zarr.json"):
                import zarr

                zarr.open_group(out_loc.zarr_store(), mode="a", zarr_format=3)
            record = {"format_name": output.RESULT_FORMAT, "version": 1, "mode": mode, "format": fmt,
                      "nq": int(src.n), "k": k, "radius": radius, "nprobe": nprobe, "max_codes": max_codes,
                      "k_factor": k_factor if codec.refine else None, "exclude_self": exclude_self,
                      "exact": exact, "metric": idx.metric, "results": int(sum(totals)), "chunk_rows": chunk_rows,
                      "index": {"url": idx.url, "generation": m.generation, "spec": m.spec, "ntotal": m.ntotal},
                      "queries": src.url, "query_ids": getattr(qids, "url", None), "job_key": key,
                      "list_ranges": len(ranges), "resumed_ranges": int(sum(bool(s["skipped"]) for s in scanned)),
                      "scan_seconds": round(sum(s["seconds"] for s in scanned), 3),
                      "created": _now(), "timings": {k_: round(v, 3) for k_, v in timings.items()}}
            lease.check()
            out_loc.write_json(output.RESULT_PATH, record, durable=True)
            lease.commit()
        finally:
            if reader is not None:
                reader.release()
    work.remove("")
    elapsed = time.perf_counter() - t_start
    log.info("big-batch %s search of %d queries (%d list ranges, %d resumed) in %.1f s (%.0f queries/s); wrote %s",
             mode, src.n, len(ranges), record["resumed_ranges"], elapsed, src.n / max(elapsed, 1e-9), out_loc.url)
    return output.open_result(out_loc.url, storage_options=storage_options)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _layout_range(client, ctx: JobContext, chunks, totals: list[int], nq: int, chunk_rows: int,
                  progress: bool) -> None:
    """Range result in Zarr: ``lims`` from each chunk's counts, the flat arrays block by block."""
    bases = np.zeros(len(chunks) + 1, np.int64)
    np.cumsum(totals, out=bases[1:])
    total = int(bases[-1])
    output.create_zarr_range(ctx.out, nq, total, chunk_rows)
    tasks = [client.submit(write_range_lims, ctx, ch, int(bases[i]), i == len(chunks) - 1, pure=False)
             for i, ch in enumerate(chunks)]
    block = max(1, min(output.RANGE_CHUNK, total))
    for start in range(0, total, block):
        stop = min(total, start + block)
        lo = int(np.searchsorted(bases, start, side="right")) - 1
        hi = int(np.searchsorted(bases, stop, side="left"))
        owners = [(chunks[i].name, int(bases[i]), int(totals[i])) for i in range(max(0, lo), min(len(chunks), hi))]
        tasks.append(client.submit(write_range_block, ctx, start, stop, owners, pure=False))
    wait_all(tasks, "layout", progress, gather=False)
