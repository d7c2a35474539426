"""``distann.dedup``: near-duplicate groups of a whole dataset, as a Dask job.

Stages::

    validate (no task) -> exact duplicates: key every row (one task per chunk), group equal
    keys (one task per key bucket) -> keep one row of each exact group (``unique/`` Parquet)
    -> index: build IVF<n>,Flat over the kept rows (or reuse ``index``)
    -> self-join: big-batch range search (kNN with ``k``) of the kept rows against the
    index, self-matches dropped, every pair's distance recomputed exactly (float64)
    -> components of the pair graph plus the exact groups (union-find forests merged on the
    workers) -> per-group lowest id / representative -> one Parquet row per input vector
    -> summary ``_summary.json`` (the commit: written last) and ``_similarity.png``

Ids: internally every vector is its row number in ``source``; user ids (``ids`` /
``ids_column``) appear only in the output.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import time
from datetime import datetime, timezone

import numpy as np

from distann import config
from distann.bigbatch.plan import job_key
from distann.bigbatch.tasks import stores_exact_vectors
from distann.bigbatch.output import part_name
from distann.bigbatch.work import WORK, check_output, clear_output, move_parts
from distann.chunks import plan_chunks
from distann.cluster import TaskNames, check_backend, check_cluster_args, client_context, tree_reduce, wait_all
from distann.dedup import tasks as T
from distann.errors import IndexFormatError, ValidationError
from distann.kernels import resolve_backend
from distann.store.lease import GenerationLease
from distann.store.location import Location
from distann.validation import METRICS, check_bool, check_choice, check_positive_int

log = logging.getLogger(__name__)

SUMMARY_PATH = "_summary.json"
PLOT_PATH = "_similarity.png"
REPRESENTATIVES = ("lowest-id", "centroid")
_OURS = ("_distann", SUMMARY_PATH, PLOT_PATH)


def check_threshold(threshold: object, metric: str) -> float:
    """The threshold of ``metric``: a squared L2 distance >= 0 (l2), a cosine similarity in
    [-1, 1] (cosine), any finite inner product (ip)."""
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not math.isfinite(threshold):
        raise ValidationError("threshold", threshold, "a finite number")
    t = float(threshold)
    if metric == "l2" and t < 0:
        raise ValidationError("threshold", threshold, "a squared L2 distance >= 0 for metric l2 (pairs at most "
                                                      "this far apart are duplicates)")
    if metric == "cosine" and not -1.0 <= t <= 1.0:
        raise ValidationError("threshold", threshold, "a cosine similarity in [-1, 1] for metric cosine (pairs at "
                                                      "least this similar are duplicates), e.g. 0.95")
    return t


def default_nlist(n: int) -> int:
    """Lists of the index dedup builds: the power of two nearest sqrt(n), at most n / 39."""
    if n < 2:
        return 1
    p = 2 ** round(math.log2(math.sqrt(n)))
    return int(max(1, min(p, n // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists probed per vector: 1/64 of them, at least 8 (near-duplicates sit in the same or an
    adjacent list; the benchmark measures the pair recall this gives)."""
    return int(min(nlist, max(8, nlist // 64)))


def dedup(source, threshold: float, metric: str = "cosine", *, out: str, index=None, k: int | None = None,
          nprobe: int | None = None, spec: str | None = None, representative: str = "lowest-id",
          column: str | None = None, ids=None, ids_column: str | None = None, overwrite: bool = False,
          chunk_rows: int | None = None, storage_options: dict | None = None, client=None,
          workers: int | None = None, scheduler: str | None = None, progress: bool = False,
          backend: str | None = None) -> dict:
    """Group the near-duplicates of ``source`` and write one Parquet row per vector to ``out``
    (a folder of ``part-*.parquet``): ``id``, ``group_id`` (the lowest id of its group) and
    ``is_representative`` (one per group: the lowest id, or with ``representative="centroid"``
    the member closest to the group's mean). Returns the summary (also ``out/_summary.json``).

    Two vectors are duplicates when their distance is at most ``threshold`` (l2: squared L2
    distance) or their similarity at least ``threshold`` (cosine, ip); groups are the connected
    components of that relation. ``index``: reuse an index built from ``source`` with row-number
    ids (``IVF<n>,Flat`` or an RFlat spec) instead of building one; ``spec`` the index to build
    (default ``IVF<n>,Flat``, n about sqrt of the vectors); ``nprobe`` lists probed per vector;
    ``k``: keep at most k neighbours per vector (a kNN self-join, bounded output) instead of
    every pair within the threshold. Ids: ``ids`` (URL / array) or ``ids_column`` of the source;
    default row numbers. A killed job rerun with the same arguments resumes. ``backend``: the
    kernel backend of the index build, the self-join and every other kernel call, all on the
    workers ("numba", "numpy" or "cuda"; default the ``distann.kernels.backend`` setting),
    checked on every worker before any task is scheduled.
    """
    from distann.sources import as_source, resolve_ids

    t_start = time.perf_counter()
    metric = check_choice("metric", metric, METRICS)
    threshold = check_threshold(threshold, metric)
    representative = check_choice("representative", representative, REPRESENTATIVES)
    if k is not None:
        k = check_positive_int("k", k)
    if nprobe is not None:
        nprobe = check_positive_int("nprobe", nprobe)
    check_bool("overwrite", overwrite)
    chunk_rows = check_positive_int("chunk_rows", chunk_rows if chunk_rows is not None
                                    else config.get("bigbatch.chunk-rows"))
    check_cluster_args(workers, scheduler, client)
    backend = resolve_backend(backend)
    src = as_source(source, column=column, storage_options=storage_options)
    ids_src = resolve_ids(ids, ids_column, src, storage_options)
    idx = _reused_index(index, src, metric, storage_options)
    if spec is not None and idx is not None:
        raise ValidationError("spec", spec, "None when index is given (the index is reused as built)")
    if spec is not None:
        from distann.codecs.spec import parse_spec
        from distann.codecs.pipeline import CodecPipeline

        ispec = parse_spec(spec)
        if not stores_exact_vectors(CodecPipeline.create(ispec, src.d, metric)):
            raise ValidationError("spec", spec, "an index storing exact vectors, to recompute each pair's distance: "
                                                "IVF<n>,Flat or a ...,RFlat spec")
        if ispec.nlist > src.n:
            raise ValidationError("spec", spec, f"nlist ({ispec.nlist}) at most the number of vectors ({src.n})")
    nlist_hint = idx.nlist if idx is not None else parse_spec(spec).nlist if spec is not None else None
    if nprobe is not None and nlist_hint is not None and nprobe > nlist_hint:
        raise ValidationError("nprobe", nprobe, f"an integer in [1, nlist={nlist_hint}]")
    if isinstance(out, os.PathLike):
        out = os.fspath(out)
    if not isinstance(out, str) or not out:
        raise ValidationError("out", out, "a non-empty path or URL for the Parquet output (a folder)")
    opts = dict(storage_options or {})
    out_loc = Location(out, opts, "out")
    work = Location(posixpath.join(out_loc.url, WORK), opts)
    key = job_key(job="dedup", source=src.fingerprint, ids=getattr(ids_src, "fingerprint", None), metric=metric,
                  threshold=threshold, index=None if idx is None else [idx.url, idx.manifest.build_key], k=k,
                  nprobe=nprobe, spec=spec, representative=representative, chunk_rows=chunk_rows)
    resume = check_output(out_loc, work, key, overwrite, SUMMARY_PATH, _OURS, "dedup result")
    reused = idx is not None
    chunks = plan_chunks(src.n, chunk_rows)
    summary: dict = {}
    timings: dict[str, float] = {}
    ip = metric != "l2"
    lease_loc = Location(posixpath.join(out_loc.url, "_distann"), opts)
    names = TaskNames(f"dedup into {out_loc.url}", f"Nothing was committed at {out_loc.url} (rerun the same job to "
                                                   "resume it)")
    with GenerationLease.acquire(lease_loc, 1, config.get("build.lease-seconds"),
                                 what=f"a dedup of {src.url} into {out_loc.url}") as lease:
        if not resume:
            clear_output(out_loc)
        work.write_json("job.json", {"key": key, "started": _now()})
        with client_context(workers=workers, scheduler=scheduler, client=client) as c, names.translate(c):
            check_backend(c, backend)
            # ---- exact duplicates
            t0 = time.perf_counter()
            nb = max(1, min(len(chunks), 32))
            names.enter("exact duplicates", "chunk_rows (distann.bigbatch.chunk-rows)")
            hashed = names.name([c.submit(T.hash_chunk, src, ch, nb, pure=False) for ch in chunks],
                                (f"hash task of chunk {ch.name}" for ch in chunks))
            flags = wait_all([c.submit(_flag, h, pure=False) for h in hashed], "hash", progress)
            bad = [f for f in flags if f]
            if bad:
                first = min(f["first"] for f in bad)
                raise ValidationError("source", f"{sum(f['nonfinite'] for f in bad)} vector(s) with NaN or Inf, first "
                                      f"at row {first}", "finite vectors (nothing was written)")
            groups = [c.submit(T.group_bucket, *[c.submit(T.bucket_part, h, b, pure=False) for h in hashed],
                               pure=False) for b in range(nb)]
            ndup = sum(wait_all([c.submit(lambda g: len(g[0]), g, pure=False) for g in groups], "group", progress))
            del hashed
            timings["exact_s"] = time.perf_counter() - t0
            log.info("exact duplicates: %d of %d vectors are copies of another", ndup, src.n)
            # ---- the vectors the ANN step searches: one of each exact group
            t0 = time.perf_counter()
            if ndup:
                names.enter("compact", "chunk_rows (distann.bigbatch.chunk-rows)")
                kept = wait_all([c.submit(T.compact_chunk, work, src, ch,
                                          *[c.submit(T.rows_between, g, ch.start, ch.stop, pure=False) for g in groups],
                                          pure=False) for ch in chunks], "compact", progress)
                nu = int(sum(kept))
                from distann.sources import open_source

                queries = open_source(work.path("unique") if work.is_local else posixpath.join(work.url, "unique"),
                                      column="vector", storage_options=opts)
                qcol = "row"
            else:
                nu, queries, qcol = src.n, src, None
            timings["compact_s"] = time.perf_counter() - t0
            # ---- the self-join
            forests = [c.submit(T.dup_forest, g, pure=False) for g in groups]
            npairs, samples, used_nprobe, index_url = 0, [], None, None
            resumed = {"index": False, "pairs": False, "scan_ranges": 0}  # what a rerun found done
            if nu > 1:
                t0 = time.perf_counter()
                if idx is None:
                    idx, resumed["index"] = _build_index(c, work, queries, qcol, spec, metric, nu, progress, opts,
                                                         backend)
                timings["index_s"] = time.perf_counter() - t0
                index_url = idx.url if reused else f"built: {idx.spec}"
                used_nprobe = nprobe if nprobe is not None else default_nprobe(idx.nlist)
                if used_nprobe > idx.nlist:
                    raise ValidationError("nprobe", used_nprobe, f"an integer in [1, nlist={idx.nlist}]")
                t0 = time.perf_counter()
                from distann.bigbatch.driver import big_batch_search

                pairs_url = posixpath.join(work.url, "pairs.parquet")
                radius = float(np.nextafter(threshold, -np.inf if ip else np.inf))
                search = dict(nprobe=used_nprobe, out=pairs_url, format="parquet", client=c, query_ids_column=qcol,
                              exclude_self=True, exact=True, chunk_rows=chunk_rows, storage_options=opts,
                              progress=progress, overwrite=True, backend=backend)
                try:
                    from distann.bigbatch.output import open_result

                    result = open_result(pairs_url, storage_options=opts)
                    resumed["pairs"] = True
                except IndexFormatError:
                    result = big_batch_search(idx, queries, **(dict(k=k) if k is not None else dict(radius=radius)),
                                              **search)
                resumed["scan_ranges"] = int(result.record.get("resumed_ranges", 0))
                timings["join_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                parts = [part_name(ch.name) for ch in plan_chunks(nu, chunk_rows)]
                names.enter("pairs", "chunk_rows (distann.bigbatch.chunk-rows)")
                pf = [c.submit(T.pair_forest, result.loc, p, result.mode, threshold, ip, i, pure=False)
                      for i, p in enumerate(parts)]
                names.name(pf, (f"pairs task of result part {p}" for p in parts))
                samples = wait_all([c.submit(lambda r: r[2], f, pure=False) for f in pf], "pairs", progress)
                unique = tree_reduce(c, [c.submit(lambda r: r[1], f, pure=False) for f in pf], T.merge_pairs)
                npairs = int(c.submit(len, unique, pure=False).result())
                del unique
                forests += [c.submit(lambda r: r[0], f, pure=False) for f in pf]
            # ---- groups
            t0 = time.perf_counter()
            names.enter("groups", "chunk_rows (distann.bigbatch.chunk-rows)")
            final = tree_reduce(c, forests, _merge_forests)
            centroid = representative == "centroid"
            stats = tree_reduce(c, [c.submit(T.group_stats, final, ch, ids_src, src, centroid, pure=False)
                                    for ch in chunks], T.merge_stats)
            choice = None
            if centroid:
                choice = tree_reduce(c, [c.submit(T.centroid_choice, final, stats, ch, ids_src, src, metric == "cosine",
                                                  pure=False) for ch in chunks], T.merge_choice)
            writes = [c.submit(T.write_groups, work, final, stats, choice, ch, ids_src, pure=False) for ch in chunks]
            reps = wait_all(names.name(writes, (f"write task of chunk {ch.name}" for ch in chunks)), "write", progress)
            sizes = c.submit(T.size_histogram, stats, pure=False).result()
            timings["groups_s"] = time.perf_counter() - t0
            # the plot's nearest-neighbour sample is searched on a worker too (checked for the backend;
            # the client may have no GPU)
            nn = (c.submit(_nn_sample_task, idx.url, opts, queries, used_nprobe, backend, pure=False).result()
                  if nu > 1 and idx is not None else None)
        move_parts(work, out_loc, [part_name(ch.name) for ch in chunks])
        groups_with_dups = int(sum(sizes.values()))
        in_groups = int(sum(s * n for s, n in sizes.items()))
        hist = {"1": int(src.n - in_groups), **{str(s): n for s, n in sorted(sizes.items())}}
        summary = {
            "source": src.url, "vectors": int(src.n), "metric": metric, "threshold": threshold,
            "groups": int(sum(reps)), "duplicate_groups": groups_with_dups, "duplicates_removed": int(src.n - sum(reps)),
            "exact_duplicates": int(ndup), "pairs": npairs, "group_sizes": hist, "representative": representative,
            "index": index_url, "nprobe": used_nprobe, "k": k, "searched_vectors": int(nu),
            "resumed": resumed, "seconds": round(time.perf_counter() - t_start, 3),
            "timings": {k_: round(v, 3) for k_, v in timings.items()},
            "created": _now(), "output": out_loc.url,
        }
        _plot(out_loc, np.concatenate(samples) if samples else np.empty(0, np.float32), threshold, metric, nn)
        lease.check()
        out_loc.write_json(SUMMARY_PATH, summary, durable=True)
        lease.commit()
    work.remove("")
    log.info("dedup of %d vectors: %d groups, %d duplicates removed (%d exact), %d pairs within %g; wrote %s",
             src.n, summary["groups"], summary["duplicates_removed"], ndup, npairs, threshold, out_loc.url)
    return summary


def _flag(hashed: dict) -> dict | None:
    return None if "parts" in hashed else hashed


def _merge_forests(f, g):
    from distann.dedup.components import merge_forests

    return merge_forests(f, g)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _reused_index(index, src, metric: str, storage_options):
    """The index to reuse (None: build one): same metric, exact vectors, built from ``src``
    with row-number ids, so that its ids are rows of the source."""
    if index is None:
        return None
    from distann.search.index import Index, open_index

    idx = index if isinstance(index, Index) else open_index(os.fspath(index), storage_options=storage_options)
    if idx.metric != metric:
        raise ValidationError("index", idx.url, f"an index built with metric {metric}; this one was built with "
                                                f"{idx.metric}")
    if not stores_exact_vectors(idx.codec):
        raise ValidationError("index", f"{idx.url} ({idx.spec})", "an index storing exact vectors, to recompute each "
                                                                  "pair's distance: IVF<n>,Flat or a ...,RFlat spec")
    build = idx.manifest.build
    if idx.d != src.d or build.get("source_fingerprint") != src.fingerprint or build.get("ids") is not None \
            or build.get("ids_column") is not None:
        raise ValidationError("index", idx.url, f"an index built from {src.url} as it is now, with row-number ids "
                                                "(distann build SOURCE INDEX, without --ids / --ids-column)")
    return idx


def _build_index(client, work: Location, queries, qcol, spec, metric, nu, progress, opts, backend):
    """The index the self-join searches, and whether an earlier run of the job had built it."""
    from distann.builder.driver import build
    from distann.search.index import open_index
    from distann.store.manifest import manifest_exists

    url = posixpath.join(work.url, "index.zarr")
    loc = Location(url, opts)
    if manifest_exists(loc):  # a resumed job: the index of the first run (same key, same inputs)
        return open_index(url, storage_options=opts, cache_bytes=0), True
    spec = spec or f"IVF{default_nlist(nu)},Flat"
    log.info("building %s over the %d vectors to search", spec, nu)
    build(queries, url, spec, metric, None, client, ids_column=qcol, storage_options=opts, progress=progress,
          backend=backend)
    return open_index(url, storage_options=opts, cache_bytes=0), False


def _nn_sample_task(index_url: str, opts: dict, queries, nprobe: int, backend: str) -> np.ndarray:
    """:func:`_nn_sample` on a worker, the index opened there from its URL."""
    from distann.search.index import open_index

    return _nn_sample(open_index(index_url, storage_options=opts, cache_bytes=0), queries, nprobe, backend)


def _nn_sample(idx, queries, nprobe: int, backend: str, n: int = 2000) -> np.ndarray:
    """Distance (l2) or similarity to the nearest other vector, for up to ``n`` vectors spread
    over the searched set: where the bulk of the data lies relative to the threshold."""
    per = max(1, min(n, queries.n) // 20)
    starts = np.unique(np.linspace(0, max(0, queries.n - per), 20).astype(np.int64))
    x = np.concatenate([queries.read_rows(int(s), min(queries.n, int(s) + per)) for s in starts])
    D, I = idx.search(x, k=2, nprobe=nprobe, backend=backend)
    return D[:, 1][I[:, 1] >= 0]


def _plot(out: Location, pairs: np.ndarray, threshold: float, metric: str, nn: np.ndarray | None) -> None:
    """``_similarity.png``: the distribution of the matched pairs' similarity (distance for l2)
    next to that of each sampled vector's nearest neighbour, with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    what = "squared L2 distance" if metric == "l2" else f"{metric} similarity"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    values = [v for v in (nn, pairs) if v is not None and len(v)]
    lo = min([threshold] + [float(v.min()) for v in values])
    hi = max([threshold] + [float(v.max()) for v in values])
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 60)
    if nn is not None and len(nn):
        ax.hist(nn, bins=bins, alpha=0.5, label=f"nearest neighbour of {len(nn)} sampled vectors")
    if len(pairs):
        ax.hist(pairs, bins=bins, alpha=0.6, label=f"matched pairs (sample of {len(pairs)})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel(what)
    ax.set_ylabel("count")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("dedup: similarity of matched pairs")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out.write_bytes(PLOT_PATH, buf.getvalue())

