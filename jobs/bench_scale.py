"""Scale benchmark: the measured inputs of the 1B cost model (docs/SCALE.md) and a run of the
full build graph at the task count of a 1B build.

    python jobs/bench_scale.py [--parts quantizer stages simulate] [--sim-runs 0.25:32,0.25:64,1:32:0.0625]

Three parts, each merged into docs/benchmarks/scale.json (a part not run keeps its previous
figures) and then rendered, with the model they feed, to docs/benchmarks/scale.md:

quantizer  The ``ivf`` coarse quantizer (distann.codecs.coarse) against exact coarse
           quantization, on two-level centroids trained by distann (train.two_level on a
           local cluster) for nlist 2^14 and 2^16 (and what --q-nlists names): the fraction
           of the exact top-nprobe lists
           it finds, the assign agreement (nprobe 1), queries/s against the exact flat
           quantizer (distann's numba kernel and faiss-cpu IndexFlatL2, one thread each), and
           IVF-Flat recall@10 with the ivf quantizer vs the exact one (computed from list
           membership, and checked on a real distann index by swapping ``index.quantizer``).
stages     Per-stage throughput of one worker (one process, one thread) with distann's own
           functions: scan, k-means iterations (one-level, level 2, refinement), assign +
           encode (Flat, PQ32) at 2^18 and 2^20 lists, staging write, merge, commit.
simulate   ``distann.build`` of tiny data cut into as many add tasks (15,259) as a 1B x 96
           IVF262144,PQ32 build with the default chunk_rows, and a given fraction of its
           merge tasks (1,193 at the default shard_bytes), on a scheduler process and many
           single-threaded worker processes: wall time per stage, scheduler CPU per task,
           client and scheduler memory over time, what the client sends (task arguments) and
           gathers, what the workers hold; by default a quarter of both task counts on 32 and
           on 64 workers, and all add tasks with 1/16 of the merge tasks on 32 workers (the
           merge work grows as add tasks x merge tasks: the full product does not fit in 15
           minutes on 2 cores), plus an empty-task baseline.

Figures are what this run measured; the model section of the json is computed from them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
from distributed.diagnostics.plugin import SchedulerPlugin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import drop_file_cache, machine  # noqa: E402

log = logging.getLogger("bench_scale")

SINGLE_THREAD_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                     "MKL_NUM_THREADS": "1"}
D = 96
ONE_B = 10**9
PQ_M = 32
ROW_BYTES = PQ_M + 8          # one PQ32 code + its int64 id in a shard


def _library_defaults() -> dict:
    """The build defaults the plan depends on, read from distann (nothing copied here)."""
    import inspect

    from distann import config
    from distann.codecs.pq import PQQuantizer
    from distann.train import codec as train_codec
    from distann.train import two_level

    from distann.builder import driver

    params = inspect.signature(driver.build).parameters
    return {"chunk_rows": config.get("build.chunk-rows"), "shard_bytes": config.get("build.shard-bytes"),
            "niter": params["niter"].default, "mppc": params["max_points_per_centroid"].default,
            "refine_niter": two_level.DEFAULT_REFINE_NITER, "max_groups": two_level.MAX_GROUPS,
            "pq_train_rows": PQQuantizer(D, PQ_M).train_size, "mse_rows": train_codec.MSE_SAMPLE}


_LIB = _library_defaults()
CHUNK_ROWS, SHARD_BYTES = _LIB["chunk_rows"], _LIB["shard_bytes"]
NITER, REFINE_NITER, MPPC, MAX_GROUPS = _LIB["niter"], _LIB["refine_niter"], _LIB["mppc"], _LIB["max_groups"]


def sample_block_rows(n_sample: int) -> int:
    """Rows per training sample block, as the build cuts them (distann.train.api)."""
    from distann.train import api

    if hasattr(api, "sample_block_rows"):
        return api.sample_block_rows(n_sample)
    return api._SAMPLE_BLOCK


# =============================================================================================
# part a: the ivf coarse quantizer against exact coarse quantization
# =============================================================================================

def mixture(n: int, d: int, seed: int, stream: int, clusters: int = 2000) -> np.ndarray:
    """A second distribution: a Gaussian mixture with Zipf-sized clusters (sizes ~ 1/rank) and
    per-cluster spreads, the imbalanced structure of real embeddings."""
    rng = np.random.default_rng([seed, 0xC1])
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    spread = (0.35 + 0.3 * rng.random(clusters)).astype(np.float32)
    w = 1.0 / np.arange(1, clusters + 1)
    w /= w.sum()
    r = np.random.default_rng([seed, stream])
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 18):
        e = min(n, s + (1 << 18))
        lab = r.choice(clusters, size=e - s, p=w)
        out[s:e] = centers[lab] + spread[lab, None] * r.standard_normal((e - s, d)).astype(np.float32)
    return out


def dataset(name: str, n: int, stream: int) -> np.ndarray:
    from distann.synthetic import synthetic

    if name == "synthetic":
        return synthetic(n, D, stream=stream)
    if name == "mixture":
        return mixture(n, D, 1338, stream)
    raise ValueError(name)


def train_centroids(client, x: np.ndarray, nlist: int, seed: int = 1234, refine_niter: int = REFINE_NITER):
    """Two-level centroids of ``x`` by distann (train.two_level) with its defaults: nlist1 =
    round(sqrt(nlist)), quantizer nprobe 16, 10 iterations, 5 refinement iterations."""
    from distann.codecs.coarse import DEFAULT_QUANTIZER_NPROBE, level1_size
    from distann.train.two_level import train_two_level

    rows = sample_block_rows(len(x))
    blocks = [x[s:s + rows] for s in range(0, len(x), rows)]
    futs = client.scatter(blocks)
    sizes = np.array([len(b) for b in blocks], dtype=np.int64)
    nlist1 = level1_size(nlist)
    t0 = time.perf_counter()
    km, q = train_two_level(client, futs, sizes, nlist, niter=NITER, spherical=False, init="random", seed=seed,
                            nlist1=nlist1, quantizer_nprobe=DEFAULT_QUANTIZER_NPROBE, refine_niter=refine_niter)
    del futs
    return km, q, time.perf_counter() - t0


def set_threads(n: int) -> None:
    import faiss
    import numba

    faiss.omp_set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def probe_sets(q, x: np.ndarray, nprobe: int, kern, step: int = 4096) -> np.ndarray:
    return np.concatenate([q.search(x[s:s + step], nprobe, "l2", kern)[1] for s in range(0, len(x), step)])


def found_fraction(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact top-p lists present among its approximate top-p."""
    p = exact.shape[1]
    hit = 0
    for a, e in zip(approx, exact):
        hit += len(np.intersect1d(a, e, assume_unique=True))
    return hit / (len(exact) * p)


def ivf_flat_recall(gt: np.ndarray, list_of: dict, probes: np.ndarray) -> float:
    """IVF-Flat recall@k: the fraction of the true k nearest neighbours whose list is probed
    (distances inside the probed lists are exact, so a probed neighbour is always returned)."""
    hits = 0
    for qi in range(len(gt)):
        pset = set(probes[qi].tolist())
        hits += sum(1 for j in gt[qi] if list_of[int(j)] in pset)
    return hits / gt.size


def qps(fn, x: np.ndarray, repeats: int = 2) -> float:
    """Queries/s of one thread, by CPU time (the machine is shared)."""
    fn(x[:256])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn(x)
        best = min(best, time.process_time() - t0)
    return len(x) / best


def part_quantizer(args, previous: dict | None) -> dict:
    import faiss

    from distann.cluster import client_context
    from distann.codecs.coarse import FlatQuantizer, IVFQuantizer
    from distann.kernels import get_backend

    kern = get_backend("numba")
    out = {"settings": {"d": D, "n_db": args.q_db, "n_queries_lists": args.q_queries, "n_queries_recall": args.q_gtq,
                        "quantizer_nprobe": args.q_nprobes, "search_nprobe": [1, 16, 64], "k": 10,
                        "train_points_per_centroid": args.q_ppc, "niter": NITER, "refine_niter": REFINE_NITER},
           "runs": []}
    for dist in args.q_dists:
        log.info("quantizer: %s data, %d db rows", dist, args.q_db)
        db = dataset(dist, args.q_db, 0)
        queries = dataset(dist, args.q_queries, 1)
        set_threads(2)
        flat_db = faiss.IndexFlatL2(D)
        flat_db.add(db)
        gtq = queries[:args.q_gtq]
        _, gt = flat_db.search(gtq, 10)
        del flat_db
        gt_rows = np.unique(gt)
        for nlist in args.q_nlists:
            if dist != "synthetic" and nlist > min(args.q_nlists):
                continue  # the second distribution at the smallest nlist only (time)
            n_train = min(args.q_ppc * nlist, 4_000_000)
            train = dataset(dist, n_train, 2)
            with client_context(workers=2) as client:
                km, q, t_train = train_centroids(client, train, nlist, refine_niter=args.q_refine)
            del train
            cent = km.centroids
            log.info("  nlist %d (nlist1 %d): trained on %d rows in %.0f s", nlist, q.nlist1, n_train, t_train)
            exact = FlatQuantizer(cent)
            set_threads(2)
            ex_probe = probe_sets(exact, queries, 64, kern)
            ex_db = exact.assign(db[gt_rows], "l2", kern)
            run = {"distribution": dist, "nlist": nlist, "nlist1": q.nlist1, "train_rows": n_train,
                   "train_points_per_centroid": n_train / nlist, "refine_niter": args.q_refine,
                   "train_seconds": t_train, "objective": km.objective[-1], "rows": []}
            # timings: one thread
            set_threads(1)
            tq = queries[:args.q_time]
            fx = faiss.IndexFlatL2(D)
            fx.add(cent)
            run["exact_qps"] = {str(p): {"distann_flat": qps(lambda x: exact.search(x, p, "l2", kern), tq),
                                         "faiss_flat": qps(lambda x: fx.search(x, p), tq)} for p in (1, 16, 64)}
            exact_recall = {}
            for p in (1, 16, 64):
                exact_list = dict(zip(gt_rows.tolist(), ex_db.tolist()))
                exact_recall[p] = ivf_flat_recall(gt, exact_list, ex_probe[:len(gtq), :p])
            run["exact_recall_at_10"] = {str(p): exact_recall[p] for p in (1, 16, 64)}
            for qn in args.q_nprobes:
                if qn > q.nlist1:
                    continue
                iq = IVFQuantizer(cent, q.top, q.members, q.offsets, qn)
                set_threads(2)
                ap = probe_sets(iq, queries, 64, kern)
                db_assign = iq.assign(db[gt_rows], "l2", kern)
                db_list = dict(zip(gt_rows.tolist(), db_assign.tolist()))
                row = {"quantizer_nprobe": qn,
                       "db_assign_agreement": float(np.mean(db_assign == ex_db)),
                       "query_assign_agreement": float(np.mean(ap[:, 0] == ex_probe[:, 0]))}
                set_threads(1)
                for p in (1, 16, 64):
                    # top-p of the ivf quantizer searched for p lists (not the first p of a top-64)
                    app = ap[:, :p] if p == 64 else probe_sets(iq, queries, p, kern)
                    row[f"lists_found_p{p}"] = found_fraction(app, ex_probe[:, :p])
                    row[f"qps_p{p}"] = qps(lambda x: iq.search(x, p, "l2", kern), tq)
                    row[f"recall_at_10_p{p}"] = ivf_flat_recall(gt, db_list, app[:len(gtq)])
                    row[f"recall_loss_p{p}"] = exact_recall[p] - row[f"recall_at_10_p{p}"]
                run["rows"].append(row)
                log.info("  nlist %d qn %d: lists found p1/16/64 %.3f/%.3f/%.3f, recall loss %.4f/%.4f/%.4f, "
                         "qps p16 %.0f", nlist, qn, row["lists_found_p1"], row["lists_found_p16"],
                         row["lists_found_p64"], row["recall_loss_p1"], row["recall_loss_p16"],
                         row["recall_loss_p64"], row["qps_p16"])
            ok = [r["quantizer_nprobe"] for r in run["rows"]
                  if max(r[f"recall_loss_p{p}"] for p in (1, 16, 64)) <= 0.01]
            run["smallest_nprobe_within_0.01"] = min(ok) if ok else None
            out["runs"].append(run)
    if args.q_index:
        out["index_check"] = index_check(args)
    elif previous and "index_check" in previous:
        out["index_check"] = previous["index_check"]
    if previous:  # runs of other (distribution, nlist) pairs measured earlier are kept
        mine = {(r["distribution"], r["nlist"]) for r in out["runs"]}
        out["runs"] = [r for r in previous.get("runs", []) if (r["distribution"], r["nlist"]) not in mine] + out["runs"]
        out["runs"].sort(key=lambda r: (r["distribution"] != "synthetic", r["distribution"], r["nlist"]))
    return out


def index_check(args) -> dict:
    """A real distann index (two-level, default quantizer): its search recall@10 with the ivf
    quantizer it was built with and with the exact one swapped in, against the recall computed
    from list membership (the method of the table)."""
    import faiss

    import distann
    from distann.codecs.coarse import FlatQuantizer
    from distann.kernels import get_backend
    from distann.synthetic import write_npy

    kern = get_backend("numba")
    nlist, n = min(args.q_nlists), args.q_index_rows
    path = os.path.join(args.data, f"synthetic-{n}x{D}.npy")
    if not os.path.exists(path):
        write_npy(path, n, D)
    url = os.path.join(args.data, f"scale-quantizer-{nlist}.zarr")
    t0 = time.perf_counter()
    index = distann.build(path, url, spec=f"IVF{nlist},Flat", workers=2, overwrite=True, two_level=True,
                          max_points_per_centroid=args.q_ppc)
    t_build = time.perf_counter() - t0
    db = np.load(path, mmap_mode="r")
    queries = dataset("synthetic", args.q_gtq, 1)
    set_threads(2)
    fx = faiss.IndexFlatL2(D)
    fx.add(np.ascontiguousarray(db))
    _, gt = fx.search(queries, 10)
    del fx
    ivf_q = index.quantizer
    exact_q = FlatQuantizer(index.centroids)
    rows = np.unique(gt)
    built_list = dict(zip(rows.tolist(), ivf_q.assign(np.ascontiguousarray(db[rows]), "l2", kern).tolist()))
    res = {"nlist": nlist, "n": n, "build_seconds": t_build, "quantizer": ivf_q.params(), "by_nprobe": {}}
    for p in (1, 16, 64):
        r = {}
        for name, qz in (("ivf", ivf_q), ("exact", exact_q)):
            index.quantizer = qz
            _, I = index.search(queries, 10, nprobe=p)
            r[f"search_recall_{name}"] = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(I, gt)]) / 10)
            r[f"computed_recall_{name}"] = ivf_flat_recall(gt, built_list, qz.search(queries, p, "l2", kern)[1])
        index.quantizer = ivf_q
        res["by_nprobe"][str(p)] = r
        log.info("  index check nprobe %d: %s", p, r)
    shutil.rmtree(url, ignore_errors=True)
    return res


# =============================================================================================
# part b: per-stage throughput of one worker (one process, one thread)
# =============================================================================================

def best_of(fn, repeats: int = 3, clock=time.process_time) -> float:
    """Best time of ``repeats`` calls: CPU time of this process by default (the machine is
    shared, so wall time would count other jobs' use of the core; with one thread, the CPU
    time is the time one dedicated core takes), ``clock=time.perf_counter`` for wall time."""
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def part_stages(args) -> dict:
    """Runs in a fresh process with one Numba/BLAS thread (see main)."""
    from distann.builder.plan import ShardTask, list_order
    from distann.builder.tasks import AddContext, add_chunk, merge_shard
    from distann.chunks import ChunkTask, plan_chunks
    from distann.codecs.coarse import IVFQuantizer
    from distann.codecs.pipeline import CodecPipeline
    from distann.codecs.pq import PQQuantizer
    from distann.codecs.spec import parse_spec
    from distann.kernels import get_backend
    from distann.sources import open_source
    from distann.store import layout
    from distann.store.arrays import checksum, write_small
    from distann.store.location import Location
    from distann.store.shards import write_shard
    from distann.store.staging import Staging
    from distann.synthetic import synthetic, write_npy
    from distann.train.kmeans import add_stats, kmeans_local
    from distann.train.sampling import scan_chunk
    from distann.train.two_level import quantizer_stats

    import numba
    kern = get_backend("numba")
    res: dict = {"threads": {"numba": numba.get_num_threads()}}
    n = args.stage_rows
    path = os.path.join(args.data, f"synthetic-{n}x{D}.npy")
    if not os.path.exists(path):
        write_npy(path, n, D)
    src = open_source(path)
    chunks = plan_chunks(n, CHUNK_ROWS)

    # ---- scan: read rows (warm page cache and cold), and the scan task (finite check + sample share)
    def read_all():
        for ch in chunks:
            src.read_rows(ch.start, ch.stop)
    drop_file_cache(path)
    t_cold = best_of(read_all, 1, time.perf_counter)  # wall: includes the disk
    t_warm = best_of(read_all, 2)
    per_chunk_sample = int(round(MPPC * 2**18 * CHUNK_ROWS / ONE_B))  # a chunk's share of the 2^18 sample
    t_scan = best_of(lambda: [scan_chunk(src, ch, per_chunk_sample, 1, False) for ch in chunks], 2)
    res["scan"] = {"rows": n, "read_rows_per_s_cold": n / t_cold, "read_rows_per_s_warm": n / t_warm,
                   "read_bytes_per_s_warm": n * D * 4 / t_warm, "scan_task_rows_per_s": n / t_scan,
                   "sample_rows_per_chunk": per_chunk_sample}
    # the build's sample pass (train.sampling.sample_rows, when this version of distann has it):
    # one task reads only the sample rows of a run of chunks, here with the 2^18 and 2^20 shares
    from distann.train import sampling
    if hasattr(sampling, "sample_rows"):
        for nl in (2**18, 2**20):
            share = int(round(MPPC * nl * CHUNK_ROWS / ONE_B))
            run = chunks[:max(1, min(len(chunks), math.ceil(sample_block_rows(MPPC * nl) / share)))]
            counts = np.full(len(run), share, dtype=np.int64)
            drop_file_cache(path)
            t_cold = best_of(lambda: sampling.sample_rows(src, run, counts, 1, False), 1, time.perf_counter)
            t = best_of(lambda: sampling.sample_rows(src, run, counts, 1, False), 2)
            res["scan"][f"sample_task_{nl}"] = {"chunks": len(run), "sample_rows": int(counts.sum()),
                                                "seconds": t, "seconds_cold": t_cold,
                                                "source_rows_per_s": len(run) * CHUNK_ROWS / t,
                                                "source_rows_per_s_cold": len(run) * CHUNK_ROWS / t_cold}
    log.info("scan: %s", res["scan"])

    x = src.read_rows(0, CHUNK_ROWS)
    # ---- one-level k-means: kmeans_stats (rows x centroids x d per second)
    km = {}
    for k in (512, 1024, 4096):
        c = x[np.random.default_rng(k).choice(len(x), k, replace=False)].copy()
        kern.kmeans_stats(x[:2048], c, "l2")
        t = best_of(lambda: kern.kmeans_stats(x, c, "l2"), 2)
        km[str(k)] = {"seconds": t, "rows_k_d_per_s": len(x) * k * D / t}
    res["kmeans_one_level"] = km
    # ---- level 2: one local k-means of a level-1 cluster (n_sample / nlist1 points, nlist / nlist1 centroids)
    pts = synthetic(2 * 65536, D, stream=2)
    t = best_of(lambda: kmeans_local(pts, 512, 2, [1, 2]), 1) / 2
    res["kmeans_level2"] = {"points": len(pts), "k": 512, "seconds_per_iteration": t,
                            "rows_k_d_per_s": len(pts) * 512 * D / t}
    # ---- PQ training: one sub-space (65,536 x 3, 256 centroids, 25 iterations), one of 32 tasks
    t = best_of(lambda: PQQuantizer.train_subspace(np.ascontiguousarray(pts[:65536, :3]), 256, [1, 0]), 1)
    res["pq_train_subspace_seconds"] = t
    log.info("k-means: %s level2 %s pq %s", km, res["kmeans_level2"], t)

    # ---- per nlist: ivf quantizer (refinement stats, assign), add_chunk Flat / PQ32
    tmp = tempfile.mkdtemp(prefix="bench-scale-", dir=args.data)
    res["by_nlist"] = {}
    for nlist in args.stage_nlists:
        nlist1 = int(round(math.sqrt(nlist)))
        cent = synthetic(nlist, D, stream=3)
        top = kmeans_local(cent, nlist1, 2, [3])
        q = IVFQuantizer.build(cent, top, "l2", 16, kern)
        t_qbuild = best_of(lambda: IVFQuantizer.build(cent, top, "l2", 16, kern), 1)
        r = {"nlist1": nlist1, "quantizer_build_seconds": t_qbuild,
             "quantizer_pickle_bytes": len(pickle.dumps(q, protocol=5)), "centroid_bytes": cent.nbytes}
        q.assign(x[:512], "l2", kern)
        for qn in (8, 16, 32):
            q.nprobe = qn
            t = best_of(lambda: q.assign(x[:16384], "l2", kern), 2)
            r[f"assign_rows_per_s_qn{qn}"] = 16384 / t
        q.nprobe = 16
        t = best_of(lambda: quantizer_stats(x, q, False, "numba"), 1)
        part = quantizer_stats(x, q, False, "numba")
        r["refine_stats_rows_per_s"] = len(x) / t
        r["refine_partial_bytes"] = int(part[0].nbytes + part[1].nbytes)
        r["refine_reduce_seconds"] = best_of(lambda: add_stats(part, part), 2)
        kern.assign(x[:64], cent, "l2")
        r["exact_assign_rows_per_s"] = 1024 / best_of(lambda: kern.assign(x[:1024], cent, "l2"), 2)
        part = None
        # add_chunk, the add task itself: read, assign, sort by list, encode, write staging
        loc = Location(os.path.join(tmp, f"add-{nlist}.zarr"), {})
        for spec in ("Flat", "PQ32"):
            codec = CodecPipeline.create(parse_spec(f"IVF{nlist},{spec}"), D, "l2", 0)
            qq = codec.quantizer
            if isinstance(qq, PQQuantizer):
                rng = np.random.default_rng(5)
                resid = x[:4096] - cent[q.assign(x[:4096], "l2", kern)]
                qq.set_codebooks(np.stack([qq.subspace(resid, m)[rng.choice(4096, 256, replace=False)]
                                           for m in range(qq.m)]))
            ctx = AddContext(loc, "g000001", nlist, False, qq.code_dtype.str, qq.code_width, 0, "numba")
            ch = [ChunkTask(i, c.start, c.stop) for i, c in enumerate(chunks[:2])]
            add_chunk(ctx, ChunkTask(999, 0, 1024), src, None, q, codec)  # warm (compiles)
            t0 = time.process_time()
            for c in ch:
                add_chunk(ctx, c, src, None, q, codec)
            t_add = (time.process_time() - t0) / len(ch)
            y = codec.transform(x)
            a = q.assign(y, "l2", kern)
            order, offs = list_order(a, nlist)
            t_assign = best_of(lambda: q.assign(y, "l2", kern), 1)
            t_encode = best_of(lambda: codec.encode(y[order], a[order], cent), 2)
            codes = codec.encode(y[order], a[order], cent)
            st = Staging(loc, "g000001", "w")
            t_write = best_of(lambda: st.write(codes, np.arange(len(y), dtype=np.int64), offs, None), 2)
            staged = codes.nbytes + len(y) * 8 + offs.nbytes
            r[spec] = {"add_task_seconds": t_add, "add_rows_per_s": CHUNK_ROWS / t_add,
                       "assign_rows_per_s": len(y) / t_assign, "encode_rows_per_s": len(y) / t_encode,
                       "staging_write_bytes": staged, "staging_write_bytes_per_s": staged / t_write,
                       "staging_offsets_bytes": int(offs.nbytes)}
            shutil.rmtree(loc.root, ignore_errors=True)
        # commit pieces: the centroid checksum and the list sizes written
        r["checksum_centroids_seconds"] = best_of(lambda: checksum([cent]), 2)
        loc = Location(os.path.join(tmp, f"commit-{nlist}.zarr"), {})
        r["write_list_sizes_seconds"] = best_of(
            lambda: write_small(loc.zarr_store(), layout.list_sizes("g000001"), np.zeros(nlist, np.int64)), 2)
        res["by_nlist"][str(nlist)] = r
        log.info("nlist %d: %s", nlist, r)
        q = cent = top = None  # free them before the next nlist

    # ---- merge: merge_shard over staging outputs shaped as at 1B (65,536-row chunks, 2^18 lists,
    # a shard of 220 lists = 32 MiB at 1B rows: ~55 rows from ~50 lists per staging output)
    nlist, nchunks = 2**18, args.merge_chunks
    loc = Location(os.path.join(tmp, "merge.zarr"), {})
    rng = np.random.default_rng(7)
    mchunks = tuple(ChunkTask(i, i * CHUNK_ROWS, (i + 1) * CHUNK_ROWS) for i in range(nchunks))
    for ch in mchunks:
        a = rng.integers(0, nlist, CHUNK_ROWS)
        order, offs = list_order(a, nlist)
        Staging(loc, "g000001", ch.name).write(rng.integers(0, 256, (CHUNK_ROWS, PQ_M), dtype=np.uint8),
                                             np.arange(ch.start, ch.stop, dtype=np.int64)[order], offs, None)
    ctx = AddContext(loc, "g000001", nlist, False, "|u1", PQ_M, 0, "numba")
    lists_per_shard = int(round(SHARD_BYTES / ROW_BYTES / (ONE_B / nlist)))
    import inspect
    by_plan = "chunk_rows" in inspect.signature(merge_shard).parameters  # merge tasks plan the chunks themselves

    def merge_time(cs, s):
        l0 = 1000 + s * 5000
        task = ShardTask(s, l0, l0 + lists_per_shard, 0)
        args = (len(cs) * CHUNK_ROWS, CHUNK_ROWS) if by_plan else (cs,)
        t0 = time.process_time()
        merge_shard(ctx, task, *args)
        return time.process_time() - t0
    # per staging output: the slope between merges over a quarter and over all of the outputs
    # (a merge task also has fixed costs: the shard's Zarr arrays and DONE marker)
    few = mchunks[:nchunks // 4]
    t_few = float(np.median([merge_time(few, 10 + s) for s in range(5)]))
    t_merge = float(np.median([merge_time(mchunks, s) for s in range(5)]))
    per_output = (t_merge - t_few) / (nchunks - len(few))
    # the read pieces of one span, and the shard write
    st = Staging(loc, "g000001", mchunks[0].name)
    t_off = best_of(lambda: [Staging(loc, "g000001", c.name).offsets(5000, 5000 + lists_per_shard)
                             for c in mchunks], 3) / nchunks
    o = st.offsets(5000, 5000 + lists_per_shard)
    t_rows = best_of(lambda: [Staging(loc, "g000001", c.name).rows(int(o[0]), int(o[-1]), np.uint8, PQ_M, 0)
                              for c in mchunks], 3) / nchunks
    rows_1b = SHARD_BYTES // ROW_BYTES
    codes = rng.integers(0, 256, (rows_1b, PQ_M), dtype=np.uint8)
    ids = np.arange(rows_1b, dtype=np.int64)
    offs = np.linspace(0, rows_1b, lists_per_shard + 1).astype(np.int64)
    t_write = best_of(lambda: write_shard(loc.zarr_store(), "g000001/shards/big", offs, codes, ids), 2)
    res["merge"] = {"staging_outputs": nchunks, "nlist": nlist, "lists_per_shard": lists_per_shard,
                    "rows_per_span": CHUNK_ROWS * lists_per_shard / nlist,
                    "merge_task_seconds": t_merge, "merge_task_seconds_quarter": t_few,
                    "seconds_per_staging_output": per_output, "fixed_seconds": t_merge - per_output * nchunks,
                    "offsets_read_seconds": t_off, "rows_read_seconds": t_rows,
                    "shard_write_bytes": int(codes.nbytes + ids.nbytes + offs.nbytes),
                    "shard_write_bytes_per_s": (codes.nbytes + ids.nbytes + offs.nbytes) / t_write}
    log.info("merge: %s", res["merge"])
    shutil.rmtree(tmp, ignore_errors=True)
    return res


# =============================================================================================
# part c: the 1B build graph on many worker processes
# =============================================================================================

class Recorder(SchedulerPlugin):
    """Scheduler plugin (pickled by value to the scheduler process): per task prefix, the
    number of tasks finished, the first and last finish, the pickled size of a sample of
    their run specs (what a task carries), and a time series of the scheduler's task count
    and the bytes held in worker memory by prefix."""

    name = "bench-scale-recorder"
    idempotent = True

    def __init__(self):
        self.done = {}
        self.spec = {}
        self.series = []
        self.transitions = 0
        self._last = 0.0

    async def start(self, scheduler):
        self.scheduler = scheduler

    def update_graph(self, scheduler, *, keys=None, tasks=None, **kw):
        import pickle as _p

        from dask.utils import key_split
        for k in (tasks or keys or []):
            ts = scheduler.tasks.get(k)
            if ts is None:
                continue
            prefix = key_split(k)
            s = self.spec.setdefault(prefix, {"n": 0, "sampled": 0, "bytes": 0, "max": 0})
            s["n"] += 1
            if s["n"] <= 3 or s["n"] % 97 == 0:
                try:
                    b = len(_p.dumps(ts.run_spec, protocol=5))
                except Exception:  # noqa: BLE001 - a spec that does not pickle here: skip it
                    continue
                s["sampled"] += 1
                s["bytes"] += b
                s["max"] = max(s["max"], b)

    def transition(self, key, start, finish, *args, **kw):
        import time as _t

        from dask.utils import key_split
        self.transitions += 1
        now = _t.time()
        if finish in ("memory", "erred") and start == "processing":
            p = key_split(key)
            d = self.done.setdefault(p, [0, now, now])
            d[0] += 1
            d[2] = now
        if now - self._last > 1.0:
            self._last = now
            held = {}
            for ts in self.scheduler.tasks.values():
                if ts.state == "memory":
                    p = ts.prefix.name
                    held[p] = held.get(p, 0) + (ts.nbytes if ts.nbytes > 0 else 0)
            self.series.append((now, len(self.scheduler.tasks), held))

    def report(self):
        return {"done": self.done, "spec": self.spec, "series": self.series, "transitions": self.transitions}


def _report(dask_scheduler=None):
    return dask_scheduler.plugins["bench-scale-recorder"].report()


class ProcSampler:
    """Every ``interval`` s: RSS and CPU time of the client (this process), the scheduler, and
    all worker processes (summed)."""

    def __init__(self, scheduler_pid: int, worker_pids: list[int], interval: float = 0.5):
        self.me = psutil.Process(os.getpid())
        self.sched = psutil.Process(scheduler_pid)
        self.workers = [psutil.Process(p) for p in worker_pids]
        self.interval = interval
        self.rows: list[tuple] = []
        self._stop = threading.Event()

    def sample(self) -> tuple:
        wr = wc = 0.0
        for w in self.workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                wr += w.memory_info().rss
                ct = w.cpu_times()
                wc += ct.user + ct.system
        ct, sc = self.me.cpu_times(), self.sched.cpu_times()
        return (time.time(), self.me.memory_info().rss, ct.user + ct.system, self.sched.memory_info().rss,
                sc.user + sc.system, wr, wc)

    def _run(self):
        while not self._stop.is_set():
            self.rows.append(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.rows.append(self.sample())

    def at(self, t: float) -> tuple:
        """The last sample at or before ``t`` (the first one if none)."""
        best = self.rows[0]
        for r in self.rows:
            if r[0] <= t:
                best = r
        return best


class ClientTap:
    """Wraps Client.submit, Client._gather and Client._scatter in this process to record, per
    build stage, what the client sends (pickled task arguments, sampled) and receives."""

    def __init__(self):
        self.stage = "setup"
        self.stages: list[tuple[str, float]] = [("setup", time.time())]
        self.sent: dict = {}
        self.gathered: dict = {}
        self.scattered: dict = {}

    def set_stage(self, name: str) -> None:
        if name != self.stage:
            self.stage = name
            self.stages.append((name, time.time()))

    def install(self):
        from dask.sizeof import sizeof
        from distributed import Client

        tap = self
        self._orig = (Client.submit, Client._gather, Client._scatter)
        orig_submit, orig_gather, orig_scatter = self._orig

        def submit(client, func, *a, **k):
            name = getattr(func, "__name__", type(func).__name__)
            s = tap.sent.setdefault(tap.stage, {}).setdefault(name, {"n": 0, "sampled": 0, "bytes": 0, "max": 0})
            s["n"] += 1
            if s["n"] <= 3 or s["n"] % 97 == 0:
                from distributed.protocol.pickle import dumps
                b = len(dumps((a, {kk: v for kk, v in k.items() if kk != "pure"})))
                s["sampled"] += 1
                s["bytes"] += b
                s["max"] = max(s["max"], b)
            return orig_submit(client, func, *a, **k)

        async def _gather(client, futures, *a, **k):
            t0 = time.perf_counter()
            r = await orig_gather(client, futures, *a, **k)
            g = tap.gathered.setdefault(tap.stage, {"calls": 0, "futures": 0, "bytes": 0, "max": 0, "seconds": 0.0})
            nb = sizeof(r)
            g["calls"] += 1
            g["futures"] += len(futures) if hasattr(futures, "__len__") else 1
            g["bytes"] += nb
            g["max"] = max(g["max"], nb)
            g["seconds"] += time.perf_counter() - t0
            return r

        async def _scatter(client, data, *a, **k):
            s = tap.scattered.setdefault(tap.stage, {"calls": 0, "bytes": 0, "max": 0})
            nb = sizeof(data)
            s["calls"] += 1
            s["bytes"] += nb
            s["max"] = max(s["max"], nb)
            return await orig_scatter(client, data, *a, **k)

        Client.submit, Client._gather, Client._scatter = submit, _gather, _scatter
        return self

    def uninstall(self):
        from distributed import Client

        Client.submit, Client._gather, Client._scatter = self._orig


@contextlib.contextmanager
def stage_hooks(tap: ClientTap):
    """Marks the build's stage boundaries by wrapping functions the driver calls at each (in
    this process only): collect_sample (scan), train_pipeline (train), the first broadcast
    after training (add), plan_shards (merge), _codec_checksums (commit), _cleanup."""
    from distann.builder import driver

    saved = {n: getattr(driver, n) for n in ("collect_sample", "train_pipeline", "broadcast", "plan_shards",
                                             "_codec_checksums", "_cleanup")}

    def mark(name, stage, after=None):
        fn = saved[name]

        def wrapped(*a, **k):
            if name != "broadcast" or tap.stage == "train":
                tap.set_stage(stage)
            try:
                return fn(*a, **k)
            finally:
                if after:
                    tap.set_stage(after)
        return wrapped

    driver.collect_sample = mark("collect_sample", "scan")
    driver.train_pipeline = mark("train_pipeline", "train")
    driver.broadcast = mark("broadcast", "add")
    driver.plan_shards = mark("plan_shards", "merge")
    driver._codec_checksums = mark("_codec_checksums", "commit")
    driver._cleanup = mark("_cleanup", "cleanup", after="open")
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(driver, n, f)


@contextlib.contextmanager
def process_cluster(workers: int, memory_limit: str, workdir: str):
    """A scheduler process and ``workers`` single-threaded worker processes (no nannies) on
    loopback, as a real deployment runs them: the client process is the client only."""
    env = {**os.environ, **SINGLE_THREAD_ENV, "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "error"}
    sched_file = os.path.join(workdir, "scheduler.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(sched_file)
    dask_bin = os.path.join(os.path.dirname(sys.executable), "dask")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": open(os.path.join(workdir, "cluster.log"), "a")}
    sched = subprocess.Popen([dask_bin, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                              "127.0.0.1:0", "--scheduler-file", sched_file], env=env, **quiet)
    procs = []
    try:
        for _ in range(200):
            if os.path.exists(sched_file):
                break
            time.sleep(0.1)
        for i in range(workers):
            procs.append(subprocess.Popen([dask_bin, "worker", "--scheduler-file", sched_file, "--nthreads", "1",
                                           "--no-nanny", "--memory-limit", memory_limit, "--no-dashboard",
                                           "--local-directory", os.path.join(workdir, "w"), "--name", f"w{i:03d}"],
                                          env=env, **quiet))
        from distributed import Client

        client = Client(scheduler_file=sched_file)
        client.wait_for_workers(workers, timeout=300)
        yield client, sched.pid, [p.pid for p in procs]
        client.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        sched.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sched.wait(30)


def _noop(*a):
    return 0


def _warm(nlist: int) -> int:
    """Load the kernels a build uses in a worker (Numba's cache), outside the timed stages."""
    from distann.codecs.coarse import IVFQuantizer
    from distann.kernels import get_backend

    kern = get_backend("numba")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, D)).astype(np.float32)
    c = rng.standard_normal((256, D)).astype(np.float32)
    q = IVFQuantizer.build(c, c[:16].copy(), "l2", 4, kern)
    q.assign(x, "l2", kern)
    kern.kmeans_stats(x, c, "l2")
    kern.assign(x[:, :3].copy(), c[:, :3].copy(), "l2")
    return os.getpid()


def baseline(client, ntasks: int, arg_bytes: int) -> dict:
    """Empty tasks submitted one call each (as distann does), with an argument of ``arg_bytes``."""
    p = psutil.Process(client.run_on_scheduler(os.getpid))
    arg = np.zeros(arg_bytes, np.uint8) if arg_bytes else None
    c0 = p.cpu_times()
    t0 = time.perf_counter()
    futs = [client.submit(_noop, i, arg, pure=False) for i in range(ntasks)]
    t_submit = time.perf_counter() - t0
    from distributed import wait
    wait(futs)
    t_done = time.perf_counter() - t0
    t1 = time.perf_counter()
    [f.result() for f in futs[:2000]]
    t_seq = (time.perf_counter() - t1) / min(2000, len(futs))
    t1 = time.perf_counter()
    client.gather(futs)
    t_batch = time.perf_counter() - t1
    c1 = p.cpu_times()
    del futs
    time.sleep(1)
    return {"tasks": ntasks, "arg_bytes": arg_bytes, "submit_seconds": t_submit, "wall_seconds": t_done,
            "scheduler_cpu_seconds": (c1.user + c1.system) - (c0.user + c0.system),
            "scheduler_cpu_per_task_ms": 1000 * ((c1.user + c1.system) - (c0.user + c0.system)) / ntasks,
            "tasks_per_s": ntasks / t_done, "sequential_result_ms": 1000 * t_seq,
            "batch_gather_seconds": t_batch}


def simulate_one(args, scale: float, workers: int, shard_scale: float | None = None) -> dict:
    import warnings

    import distann
    from distann.builder.plan import plan_shards
    from distann.synthetic import write_npy

    nchunks = int(math.ceil(ONE_B / CHUNK_ROWS * scale))
    shard_scale = scale if shard_scale is None else shard_scale
    target_shards = int(round(ONE_B * ROW_BYTES / SHARD_BYTES * shard_scale))
    rows = args.sim_chunk_rows
    n = nchunks * rows
    nlist = args.sim_nlist
    path = os.path.join(args.data, f"synthetic-{n}x{D}.npy")
    if not os.path.exists(path):
        write_npy(path, n, D)
    # shard_bytes giving the target shard count: plan_shards closes a shard once it reaches the
    # target, overshooting by about half a list on average
    list_bytes = n / nlist * ROW_BYTES
    shard_bytes = max(1, int(n * ROW_BYTES / target_shards - list_bytes / 2))
    url = os.path.join(args.data, f"scale-sim-{nchunks}.zarr")
    workdir = tempfile.mkdtemp(prefix="sim-", dir=args.data)
    out = {"distann": _library_state(), "scale": scale, "shard_scale": shard_scale, "workers": workers,
           "chunks": nchunks, "chunk_rows": rows, "n": n, "nlist": nlist,
           "spec": f"IVF{nlist},PQ{PQ_M}", "shard_bytes": shard_bytes, "target_shards": target_shards}
    log.info("simulate: %d workers, %d chunks of %d rows, nlist %d, shard_bytes %d (target %d shards)", workers,
             nchunks, rows, nlist, shard_bytes, target_shards)
    with process_cluster(workers, args.sim_memory_limit, workdir) as (client, spid, wpids):
        client.register_plugin(Recorder())
        pids = set(client.run(_warm, nlist).values())
        assert len(pids) == workers
        idle = ProcSampler(spid, wpids).sample()
        time.sleep(5)
        idle2 = ProcSampler(spid, wpids).sample()
        out["idle"] = {"client_rss": idle[1], "scheduler_rss": idle[3], "workers_rss": idle[5],
                       "scheduler_cpu_per_s": (idle2[4] - idle[4]) / (idle2[0] - idle[0])}
        tap = ClientTap().install()
        t0 = time.time()
        tap.stages = [("setup", t0)]
        try:
            with ProcSampler(spid, wpids) as ps, stage_hooks(tap), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                index = distann.build(path, url, spec=out["spec"], client=client, overwrite=True, chunk_rows=rows,
                                      shard_bytes=shard_bytes, max_points_per_centroid=MPPC)
                tap.set_stage("done")
        finally:
            tap.uninstall()
        t_end = time.time()
        rep = client.run_on_scheduler(_report)
        out["shards"] = len(index.manifest.shards)
        out["timings"] = index.manifest.build["timings"]
        out["wall_seconds"] = t_end - t0
        # the shard plan from the index's list sizes (what the driver computed)
        assert len(plan_shards(np.asarray(index.list_sizes), PQ_M, shard_bytes)) == out["shards"]
        # per stage: wall, client/scheduler CPU and peak RSS, tasks finished
        bounds = tap.stages + [("end", t_end)]
        stages = {}
        for (name, a), (_, b) in zip(bounds, bounds[1:]):
            s0, s1 = ps.at(a), ps.at(b)
            inside = [r for r in ps.rows if a <= r[0] <= b] or [s1]
            stages[name] = {"seconds": b - a, "client_cpu_s": s1[2] - s0[2], "scheduler_cpu_s": s1[4] - s0[4],
                            "workers_cpu_s": s1[6] - s0[6], "client_peak_rss": max(r[1] for r in inside),
                            "scheduler_peak_rss": max(r[3] for r in inside),
                            "workers_peak_rss": max(r[5] for r in inside)}
        out["stages"] = stages
        out["tasks_by_prefix"] = {p: {"n": v[0], "first": v[1] - t0, "last": v[2] - t0} for p, v in rep["done"].items()}
        out["total_tasks"] = int(sum(v[0] for v in rep["done"].values()))
        out["graph_predicted"] = graph(n, nlist, rows, shards=out["shards"],
                                       sample_pass="sample_rows" in out["tasks_by_prefix"])
        out["run_spec_bytes"] = {p: {"n": v["n"], "mean": v["bytes"] / max(1, v["sampled"]), "max": v["max"]}
                                 for p, v in rep["spec"].items()}
        out["client_sent"] = {st: {f: {"n": v["n"], "mean_bytes": v["bytes"] / max(1, v["sampled"]), "max": v["max"]}
                                   for f, v in d.items()} for st, d in tap.sent.items()}
        out["client_gathered"] = tap.gathered
        out["client_scattered"] = tap.scattered
        held = {}
        for _, ntask, h in rep["series"]:
            for p, b in h.items():
                held[p] = max(held.get(p, 0), b)
        out["peak_worker_bytes_by_prefix"] = held
        out["peak_scheduler_tasks"] = max((s[1] for s in rep["series"]), default=0)
        out["peak"] = {"client_rss": max(r[1] for r in ps.rows), "scheduler_rss": max(r[3] for r in ps.rows),
                       "workers_rss": max(r[5] for r in ps.rows)}
        out["series"] = [[round(r[0] - t0, 2), r[1], round(r[2], 2), r[3], round(r[4], 2), r[5]]
                         for r in ps.rows[::4]]
        del index
        # overhead baselines on the same cluster: empty tasks like the add stage's, and tasks
        # carrying an argument the size of the merge tasks' chunk list
        if args.sim_baseline:
            out["baseline_empty"] = baseline(client, nchunks, 0)
            merge_arg = out["run_spec_bytes"].get("merge_shard", {}).get("mean", 0)
            out["baseline_merge_sized"] = baseline(client, out["shards"], int(merge_arg))
    shutil.rmtree(url, ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def part_simulate(args, previous: dict | None) -> dict:
    runs = []
    for scale, workers, shard_scale in args.sim_runs:
        free = psutil.virtual_memory().available
        need = workers * 200 * 2**20 + 2 * 2**30
        if free < need:
            log.warning("skipping %d workers: %.1f GiB available, about %.1f GiB needed", workers, free / 2**30,
                        need / 2**30)
            continue
        runs.append(simulate_one(args, scale, workers, shard_scale))
        r = runs[-1]
        log.info("simulate %d workers scale %.2f: %d tasks in %.0f s; stages %s", workers, scale, r["total_tasks"],
                 r["wall_seconds"], {k: round(v["seconds"], 1) for k, v in r["stages"].items()})
    key = lambda r: (r["scale"], r.get("shard_scale", r["scale"]), r["workers"])  # noqa: E731
    mine = {key(r) for r in runs}
    runs = sorted([r for r in (previous or {}).get("runs", []) if key(r) not in mine] + runs, key=key)
    return {"settings": {"chunk_rows": args.sim_chunk_rows, "nlist": args.sim_nlist,
                         "memory_limit": args.sim_memory_limit}, "runs": runs}


# =============================================================================================
# the model: the 1B plan computed from the measured figures
# =============================================================================================

def _blocks_hit(blocks: int, picks: int) -> float:
    """Expected number of distinct sample blocks holding ``picks`` uniformly drawn rows."""
    return blocks * (1 - (1 - 1 / blocks) ** picks) if blocks else 0.0


def graph(n: int, nlist: int, chunk_rows: int = CHUNK_ROWS, shards: int | None = None,
          shard_bytes: int = SHARD_BYTES, sample_pass: bool = True) -> dict:
    """Task counts of a two-level PQ32 build of ``n`` rows, read off the driver's code:
    ``sample_pass`` the build's sample-only first pass (train.sampling.sample_rows), else the
    full scan (one scan_chunk task per chunk)."""
    C = math.ceil(n / chunk_rows)
    S = shards if shards is not None else math.ceil(n * ROW_BYTES / shard_bytes)
    n_sample = min(n, MPPC * nlist)
    per_chunk = n_sample / C
    block_rows = sample_block_rows(n_sample)
    per_block = max(1, math.ceil(block_rows / per_chunk))  # chunks whose samples make one block
    B = math.ceil(C / per_block)
    nlist1 = int(round(math.sqrt(nlist)))
    G = min(MAX_GROUPS, nlist1)
    tasks = {
        "sample": 3 * B if sample_pass else 3 * C + (B if per_block > 1 else 0),
        # init (random: take_rows from the blocks holding the chosen rows), then per iteration
        # one block_stats per block and a pairwise reduce
        "train_level1": _blocks_hit(B, nlist1) + NITER * (2 * B - 1),
        # labels, counts + reduce, split, one piece per (block, group), one task per group
        "train_split": B + 2 * B - 1 + B + B * G + G,
        "train_refine": (REFINE_NITER + 1) * (2 * B - 1),
        # residuals, PQ subsample rows, 32 sub-spaces, rows for the reconstruction error
        "train_codec": B + _blocks_hit(B, _LIB["pq_train_rows"]) + PQ_M + _blocks_hit(B, _LIB["mse_rows"]),
        "add": 3 * C - 1,  # add_chunk, its counts, pairwise reduce
        "merge": S,
    }
    tasks = {k: int(round(v)) for k, v in tasks.items()}
    return {"n": n, "nlist": nlist, "nlist1": nlist1, "chunks": C, "shards": S, "n_sample": n_sample,
            "sample_block_rows": block_rows, "sample_blocks": B, "groups": G, "tasks": tasks,
            "total_tasks": sum(tasks.values())}


#: $/core-hour: AWS EC2 c7i on-demand, us-east-1 (c7i.xlarge: 4 vCPU for $0.1785/h), per vCPU
PRICE_PER_CORE_HOUR = 0.1785 / 4
#: seconds per small ranged read from an object store, for the one sensitivity line of the model
#: (an assumption, not measured here: S3's documented first-byte latency is tens of ms)
OBJECT_STORE_READ_S = 0.010


def model(results: dict) -> dict:
    """Predicted wall time and cost of a 1B x 96 PQ32 build, from the measured figures only."""
    st = results.get("stages")
    sim = [r for r in results.get("simulate", {}).get("runs", []) if "stages" in r]
    if not st or not sim:
        return {}
    full = max(sim, key=lambda r: (r["chunks"], r["workers"]))
    sample_pass = "sample_rows" in full["tasks_by_prefix"]
    # scheduler CPU per task: the add stage (C add tasks, C count conversions, C - 1 reduces)
    sched_task_s = full["stages"]["add"]["scheduler_cpu_s"] / (3 * full["chunks"] - 1)
    based = [r for r in sim if "baseline_empty" in r]
    # the least contended measurement (the machine is shared; this is a latency, not a CPU time)
    seq_result_s = min((r["baseline_empty"]["sequential_result_ms"] / 1000 for r in based), default=0.0)
    cleanup_per_chunk_s = full["stages"].get("cleanup", {}).get("seconds", 0.0) / full["chunks"]
    out = {"assumptions": {"price_per_core_hour": PRICE_PER_CORE_HOUR,
                           "core": "one worker process with one thread; per-core figures are CPU times measured here",
                           "io": "reads and writes as fast as this machine's page cache and local disk",
                           "object_store_read_s": OBJECT_STORE_READ_S},
           "inputs": {"scheduler_cpu_per_task_s": sched_task_s, "sequential_result_s": seq_result_s,
                      "cleanup_per_staging_output_s": cleanup_per_chunk_s, "sample_pass": sample_pass,
                      "from_simulation": {"workers": full["workers"], "chunks": full["chunks"]}},
           "plans": {}}
    km = st["kmeans_one_level"]
    l2_rate = st["kmeans_level2"]["rows_k_d_per_s"]
    m = st["merge"]
    for nlist in (2**18, 2**20):
        bn = st["by_nlist"].get(str(nlist))
        if bn is None:
            continue
        g = graph(ONE_B, nlist, sample_pass=sample_pass)
        C, S, B, G, ns, n1 = g["chunks"], g["shards"], g["sample_blocks"], g["groups"], g["n_sample"], g["nlist1"]
        km_rate = km[str(n1)]["rows_k_d_per_s"] if str(n1) in km else km["1024"]["rows_k_d_per_s"]
        if sample_pass:
            sp = st["scan"][f"sample_task_{nlist}"]
            sample_task_s = sp["seconds"] * math.ceil(g["sample_block_rows"] / (ns / C)) / sp["chunks"]
        else:
            sample_task_s = CHUNK_ROWS / st["scan"]["scan_task_rows_per_s"]
        add_task_s = bn["PQ32"]["add_task_seconds"]
        merge_task_s = (C * m["seconds_per_staging_output"] + m["fixed_seconds"]
                        + SHARD_BYTES / m["shard_write_bytes_per_s"])
        merge_task_os_s = merge_task_s + 3 * C * OBJECT_STORE_READ_S
        level1_task_s = g["sample_block_rows"] * n1 * D / km_rate
        refine_task_s = g["sample_block_rows"] / bn["refine_stats_rows_per_s"]
        group_task_s = (ns / G) * (nlist / n1) * D * NITER / l2_rate
        by_n = {}
        for N in (16, 64, 256, 1024):
            waves = lambda tasks: math.ceil(tasks / N)  # noqa: E731
            t = {}
            sched = lambda stage: g["tasks"][stage] * sched_task_s  # noqa: E731
            nblocks = B if sample_pass else C
            t["sample"] = max(waves(nblocks) * sample_task_s, sched("sample")) + nblocks * seq_result_s
            t_l1 = max((NITER + 1) * waves(B) * level1_task_s, sched("train_level1") + B * sched_task_s)
            t_l2 = waves(G) * group_task_s
            t_ref = max((REFINE_NITER + 2) * waves(B) * refine_task_s, sched("train_refine")) \
                + (REFINE_NITER + 1) * (math.ceil(math.log2(B)) * bn["refine_reduce_seconds"]
                                        + bn["quantizer_build_seconds"])
            t_pq = waves(PQ_M) * st["pq_train_subspace_seconds"]
            t["train"] = t_l1 + t_l2 + t_ref + t_pq
            t["add"] = max(waves(C) * add_task_s, sched("add"))
            t["merge"] = max(waves(S) * merge_task_s, sched("merge")) + S * seq_result_s
            t["commit"] = bn["checksum_centroids_seconds"] + bn["write_list_sizes_seconds"] + C * cleanup_per_chunk_s
            wall = sum(t.values())
            wall_os = wall - t["merge"] + waves(S) * merge_task_os_s
            by_n[str(N)] = {"seconds": t,
                            "train_detail_s": {"level1": t_l1, "level2": t_l2, "refine": t_ref, "pq": t_pq},
                            "wall_hours": wall / 3600, "core_hours": N * wall / 3600,
                            "cost_usd": N * wall / 3600 * PRICE_PER_CORE_HOUR,
                            "scheduler_cpu_hours": g["total_tasks"] * sched_task_s / 3600,
                            "wall_hours_object_store_merge": wall_os / 3600,
                            "cost_usd_object_store_merge": N * wall_os / 3600 * PRICE_PER_CORE_HOUR}
        qbytes = bn["quantizer_pickle_bytes"]
        out["plans"][str(nlist)] = {
            "graph": g,
            "per_task_s": {"sample": sample_task_s, "level1_block": level1_task_s, "level2_group": group_task_s,
                           "refine_block": refine_task_s, "add": add_task_s, "merge": merge_task_s,
                           "merge_object_store": merge_task_os_s},
            "core_hours": {"sample": B * sample_task_s / 3600 if sample_pass else C * sample_task_s / 3600,
                           "train_level1": (NITER + 1) * B * level1_task_s / 3600,
                           "train_level2": G * group_task_s / 3600,
                           "train_refine": (REFINE_NITER + 2) * B * refine_task_s / 3600,
                           "add": C * add_task_s / 3600, "merge": S * merge_task_s / 3600,
                           "merge_object_store": S * merge_task_os_s / 3600},
            "bytes": {
                # remotely, sample rows closer than 1 MiB are read in one request (sources._fileset):
                # at these sample densities that is every byte of the source
                "source_read_sample_pass_local": (ns if sample_pass else ONE_B) * D * 4,
                "source_read_sample_pass_remote": (ONE_B if not sample_pass or ONE_B / ns * D * 4 < 2**20
                                                   else ns) * D * 4,
                "sample_row_gap_bytes": ONE_B / ns * D * 4,
                "source_read_add": ONE_B * D * 4,
                "sample_held_on_workers": ns * D * 4,
                "level2_pieces_moved": ns * D * 4,
                "quantizer_pickled": qbytes,
                "quantizer_broadcasts": REFINE_NITER + 1 + 2,
                "refine_partial_sums_per_block": nlist * (D * 8 + 8),
                "refine_partial_sums_per_iteration": B * nlist * (D * 8 + 8),
                "client_sums_per_iteration": nlist * (D * 8 + 8),
                "staging_codes_ids": ONE_B * ROW_BYTES,
                "staging_offsets": C * (nlist + 1) * 8,
                "add_counts_results": C * nlist * 8,
                "merge_read_requests": 3 * C * S,
                "merge_offsets_read": C * (nlist + S) * 8,
                "shards_written": ONE_B * ROW_BYTES,
                # as measured in the largest simulation (it grew with the chunk count before e334bf9)
                "merge_task_spec": full["run_spec_bytes"].get("merge_shard", {}).get("mean"),
            },
            "by_workers": by_n}
    return out


# =============================================================================================
# report
# =============================================================================================

def render(results: dict) -> str:
    L = []
    q = results.get("quantizer")
    if q:
        L += ["## Coarse quantizer: ivf vs exact", "",
              f"{q['settings']['n_db']:,} x {D} database rows, {q['settings']['n_queries_lists']:,} queries for the "
              f"list sets, {q['settings']['n_queries_recall']:,} for recall@10 (IVF-Flat, computed from list "
              "membership). Lists found: the mean fraction of the exact top-p lists among the ivf quantizer's top-p. "
              "Recall loss: exact-quantizer recall@10 minus ivf-quantizer recall@10 (vectors added and queries probed "
              "by the same quantizer). Queries/s: one thread.", ""]
        for run in q["runs"]:
            L += [f"### {run['distribution']}, nlist {run['nlist']:,} (nlist1 {run['nlist1']}, trained on "
                  f"{run['train_rows']:,} rows, refinement iterations {run.get('refine_niter', REFINE_NITER)}, in "
                  f"{run['train_seconds']:.0f} s)", "",
                  "| quantizer nprobe | assign agreement (db / queries) | lists found p=1 / 16 / 64 | "
                  "recall@10 loss p=1 / 16 / 64 | queries/s p=1 / 16 / 64 |", "|---|---|---|---|---|"]
            for r in run["rows"]:
                L.append(f"| {r['quantizer_nprobe']} | {r['db_assign_agreement']:.4f} / "
                         f"{r['query_assign_agreement']:.4f} | "
                         f"{r['lists_found_p1']:.4f} / {r['lists_found_p16']:.4f} / {r['lists_found_p64']:.4f} | "
                         f"{r['recall_loss_p1']:+.4f} / {r['recall_loss_p16']:+.4f} / {r['recall_loss_p64']:+.4f} | "
                         f"{r['qps_p1']:,.0f} / {r['qps_p16']:,.0f} / {r['qps_p64']:,.0f} |")
            e, x = run["exact_recall_at_10"], run["exact_qps"]
            L.append(f"| exact | 1 / 1 | 1 / 1 / 1 | recall {e['1']:.4f} / {e['16']:.4f} / {e['64']:.4f} | "
                     f"distann {x['1']['distann_flat']:,.0f} / {x['16']['distann_flat']:,.0f} / "
                     f"{x['64']['distann_flat']:,.0f}; faiss {x['1']['faiss_flat']:,.0f} / "
                     f"{x['16']['faiss_flat']:,.0f} / {x['64']['faiss_flat']:,.0f} |")
            L += ["", f"Smallest quantizer nprobe with a recall@10 loss <= 0.01 at every search nprobe: "
                      f"{run['smallest_nprobe_within_0.01']}.", ""]
        ic = q.get("index_check")
        if ic:
            L += [f"Check on a real index ({ic['n']:,} rows, IVF{ic['nlist']},Flat built by distann, quantizer "
                  f"{ic['quantizer']}): search recall@10 with the built ivf quantizer and with the exact one "
                  "swapped in, "
                  "against the recall computed from list membership.", "",
                  "| nprobe | search ivf | computed ivf | search exact | computed exact |", "|---|---|---|---|---|"]
            for p, r in ic["by_nprobe"].items():
                L.append(f"| {p} | {r['search_recall_ivf']:.4f} | {r['computed_recall_ivf']:.4f} | "
                         f"{r['search_recall_exact']:.4f} | {r['computed_recall_exact']:.4f} |")
            L.append("")
    st = results.get("stages")
    if st:
        s = st["scan"]
        L += ["## Per-stage throughput of one worker (one process, one thread)", "",
              "| what | measured |", "|---|---|",
              f"| scan: read rows from a local .npy (cold / warm page cache) | {s['read_rows_per_s_cold']:,.0f} / "
              f"{s['read_rows_per_s_warm']:,.0f} rows/s |",
              f"| scan task (read + finite check + sample share) | {s['scan_task_rows_per_s']:,.0f} rows/s |"]
        for k, v in st["kmeans_one_level"].items():
            L.append(f"| one-level k-means iteration, k = {k} | {v['rows_k_d_per_s'] / 1e9:.1f} G rows x k x d / s |")
        L.append(f"| level-2 local k-means ({st['kmeans_level2']['points']:,} points, k = 512) | "
                 f"{st['kmeans_level2']['rows_k_d_per_s'] / 1e9:.1f} G rows x k x d / s |")
        L.append(f"| PQ training, one sub-space (65,536 x 3, 256 centroids, 25 iterations) | "
                 f"{st['pq_train_subspace_seconds']:.2f} s |")
        for nl, b in st["by_nlist"].items():
            L.append(f"| nlist {int(nl):,} (nlist1 {b['nlist1']}): ivf assign, quantizer nprobe 8 / 16 / 32 | "
                     f"{b['assign_rows_per_s_qn8']:,.0f} / {b['assign_rows_per_s_qn16']:,.0f} / "
                     f"{b['assign_rows_per_s_qn32']:,.0f} rows/s |")
            L.append(f"| nlist {int(nl):,}: refinement stats (assign + sums) | "
                     f"{b['refine_stats_rows_per_s']:,.0f} rows/s; "
                     f"partial sums {b['refine_partial_bytes'] / 2**20:,.0f} MiB per block, one pairwise add "
                     f"{b['refine_reduce_seconds']:.2f} s |")
            L.append(f"| nlist {int(nl):,}: add task Flat / PQ32 (read, assign, sort, encode, write staging) | "
                     f"{b['Flat']['add_rows_per_s']:,.0f} / {b['PQ32']['add_rows_per_s']:,.0f} rows/s "
                     f"(encode PQ32 {b['PQ32']['encode_rows_per_s']:,.0f} rows/s; staging "
                     f"{b['PQ32']['staging_write_bytes_per_s'] / 2**20:,.0f} MiB/s, offsets "
                     f"{b['PQ32']['staging_offsets_bytes'] / 2**20:.1f} MiB per chunk) |")
            L.append(f"| nlist {int(nl):,}: quantizer build (client) / pickled size | "
                     f"{b['quantizer_build_seconds']:.1f} s / {b['quantizer_pickle_bytes'] / 2**20:,.0f} MiB "
                     f"(centroids {b['centroid_bytes'] / 2**20:,.0f} MiB) |")
        m = st["merge"]
        L.append(f"| merge task, shard of {m['lists_per_shard']} of {m['nlist']:,} lists over {m['staging_outputs']} "
                 f"staging outputs | {m['merge_task_seconds']:.2f} s = {1e3 * m['seconds_per_staging_output']:.2f} ms "
                 f"per staging output (offsets read {1e6 * m['offsets_read_seconds']:.0f} us, rows read "
                 f"{1e6 * m['rows_read_seconds']:.0f} us) |")
        L.append(f"| shard write (32 MiB of PQ32 codes + ids) | {m['shard_write_bytes_per_s'] / 2**20:,.0f} MiB/s |")
        L.append("")
    sim = results.get("simulate")
    if sim and sim["runs"]:
        L += ["## The 1B build graph on many worker processes", "",
              "`distann.build` (IVF16384,PQ32, two-level) of tiny data (16-row chunks) cut like a 1B x 96 build: "
              "add tasks = 1B / 65,536 chunks x scale, merge tasks = 1B x 40 B / 32 MiB shards x shard scale, on a "
              "scheduler process and single-threaded worker processes (no nannies) sharing this 2-core machine "
              "with other jobs: wall times are inflated, CPU times are not.", "",
              "| workers | scale / shard scale | add / merge tasks | all tasks (predicted) | wall (s) | "
              "sample / train / add / merge / commit + cleanup (s) | scheduler CPU per add-stage task (ms) | "
              "merge CPU per (staging output x shard) (us) | peak RSS client / scheduler (MiB) | "
              "add results held on workers (MiB) | merge task spec (bytes) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sim["runs"]:
            s = r["stages"]
            g = lambda k: s.get(k, {}).get("seconds", 0.0)  # noqa: E731
            per = 1e3 * s["add"]["scheduler_cpu_s"] / (3 * r["chunks"] - 1)
            pair = 1e6 * s["merge"]["workers_cpu_s"] / (r["chunks"] * r["shards"])
            held = sum(v for k, v in r["peak_worker_bytes_by_prefix"].items() if k in ("add_chunk", "as_counts"))
            spec = r["run_spec_bytes"].get("merge_shard", {}).get("mean", 0)
            L.append(f"| {r['workers']} | {r['scale']:.2f} / {r.get('shard_scale') or r['scale']:.4g} | "
                     f"{r['chunks']:,} / {r['shards']:,} | {r['total_tasks']:,} "
                     f"({r['graph_predicted']['total_tasks']:,}) | {r['wall_seconds']:.0f} | {g('scan'):.0f} / "
                     f"{g('train'):.0f} / {g('add'):.0f} / {g('merge'):.0f} / {g('commit') + g('cleanup'):.0f} | "
                     f"{per:.2f} | {pair:.0f} | {r['peak']['client_rss'] / 2**20:,.0f} / "
                     f"{r['peak']['scheduler_rss'] / 2**20:,.0f} | {held / 2**20:,.0f} | {spec:,.0f} |")
        L += ["", "Idle: client " + ", ".join(f"{r['idle']['client_rss'] / 2**20:.0f}" for r in sim["runs"]) +
              " MiB, scheduler " + ", ".join(f"{r['idle']['scheduler_rss'] / 2**20:.0f}" for r in sim["runs"]) +
              " MiB RSS before each build (same order); the scheduler idles at " +
              ", ".join(f"{1e3 * r['idle']['scheduler_cpu_per_s']:.0f}" for r in sim["runs"]) +
              " ms of CPU per second (worker heartbeats).", ""]
        r = max(sim["runs"], key=lambda r: (r["chunks"], r["shards"], r["workers"]))
        L += [f"Largest run ({r['workers']} workers, {r['chunks']:,} add tasks, {r['shards']:,} merge tasks): pickled "
              "task spec per task prefix (what the scheduler holds and ships per task):", "",
              "| task | tasks | mean bytes | max bytes |", "|---|---|---|---|"]
        for p, v in sorted(r["run_spec_bytes"].items(), key=lambda kv: -kv[1]["mean"]):
            if v["n"] >= 8:
                L.append(f"| {p} | {v['n']:,} | {v['mean']:,.0f} | {v['max']:,} |")
        L += ["", "What the client gathered, per stage:", "", "| stage | gather calls | futures | bytes | seconds |",
              "|---|---|---|---|---|"]
        for stg, v in r["client_gathered"].items():
            L.append(f"| {stg} | {v['calls']:,} | {v['futures']:,} | {v['bytes']:,} | {v['seconds']:.1f} |")
        L += ["", "Peak bytes held in worker memory by task prefix (MiB): " +
              ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in sorted(r["peak_worker_bytes_by_prefix"].items(),
                                                                   key=lambda kv: -kv[1]) if v >= 2**20) + "."]
        for run in sim["runs"]:
            for key in ("baseline_empty", "baseline_merge_sized"):
                b = run.get(key)
                if b:
                    L.append("")
                    L.append(f"Baseline ({run['workers']} workers): {b['tasks']:,} empty tasks with a "
                             f"{b['arg_bytes']:,}-byte "
                             f"argument, one submit each: {b['tasks_per_s']:,.0f} tasks/s, scheduler CPU "
                             f"{b['scheduler_cpu_per_task_ms']:.2f} ms per task, submit {b['submit_seconds']:.1f} s, "
                             f"sequential `.result()` {b['sequential_result_ms']:.2f} ms each vs one gather of all "
                             f"{b['batch_gather_seconds']:.2f} s.")
        L.append("")
    mo = results.get("model")
    if mo:
        a = mo["assumptions"]
        L += ["## Model: 1B x 96, PQ32, default chunk_rows and shard_bytes (docs/SCALE.md explains it)", "",
              f"Computed from the figures above: per-task CPU times of one core, the scheduler's CPU per task "
              f"({1e3 * mo['inputs']['scheduler_cpu_per_task_s']:.2f} ms), tasks in waves of N; I/O as fast as this "
              f"machine's local disk. Price {a['price_per_core_hour']:.4f} $ per core-hour (AWS c7i on-demand, per "
              f"vCPU). Last two columns: the same build with each small ranged read of the merge costing "
              f"{1e3 * a['object_store_read_s']:.0f} ms (an object store; assumed, not measured).", ""]
        for nl, p in mo["plans"].items():
            gr = p["graph"]
            L += [f"### IVF{int(nl)},PQ32: {gr['chunks']:,} add tasks, {gr['shards']:,} merge tasks, "
                  f"{gr['sample_blocks']:,} sample blocks, {gr['total_tasks']:,} tasks in all", "",
                  "| workers | sample / train / add / merge / commit (min) | wall (h) | core-hours | cost ($) | "
                  "wall, object-store merge (h) | cost, object-store merge ($) |", "|---|---|---|---|---|---|---|"]
            for N, v in p["by_workers"].items():
                t = v["seconds"]
                L.append(f"| {N} | {t['sample'] / 60:.1f} / {t['train'] / 60:.1f} / {t['add'] / 60:.1f} / "
                         f"{t['merge'] / 60:.1f} / {t['commit'] / 60:.1f} | {v['wall_hours']:.2f} | "
                         f"{v['core_hours']:,.0f} | {v['cost_usd']:,.2f} | {v['wall_hours_object_store_merge']:.2f} | "
                         f"{v['cost_usd_object_store_merge']:,.2f} |")
            ch = p["core_hours"]
            L += ["", "Core-hours by stage: " + ", ".join(f"{k} {v:,.1f}" for k, v in ch.items()) + ".", ""]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["quantizer", "stages", "simulate"],
                   choices=["quantizer", "stages", "simulate", "render"])
    p.add_argument("--data", default="data/bench/scale")
    p.add_argument("--out", default="docs/benchmarks")
    # quantizer
    p.add_argument("--q-dists", nargs="+", default=["synthetic", "mixture"])
    p.add_argument("--q-nlists", type=int, nargs="+", default=[2**14, 2**16])
    p.add_argument("--q-nprobes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--q-db", type=int, default=4_000_000)
    p.add_argument("--q-queries", type=int, default=10_000)
    p.add_argument("--q-gtq", type=int, default=1_000)
    p.add_argument("--q-time", type=int, default=2_000)
    p.add_argument("--q-ppc", type=int, default=40, help="training points per centroid")
    p.add_argument("--q-refine", type=int, default=REFINE_NITER, help="refinement iterations of the training")
    p.add_argument("--q-index", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--q-index-rows", type=int, default=1_000_000)
    # stages
    p.add_argument("--stage-rows", type=int, default=1_048_576)
    p.add_argument("--stage-nlists", type=int, nargs="+", default=[2**18, 2**20])
    p.add_argument("--merge-chunks", type=int, default=256)
    # simulate
    p.add_argument("--sim-runs", default="0.25:32,0.25:64,1:32:0.0625",
                   help="scale:workers[:shard_scale],... (scale 1: the add tasks of a 1B build; shard_scale, "
                        "default scale: its merge tasks; 1:32:0.0625 keeps a run under 15 minutes here, the merge "
                        "work growing as add tasks x merge tasks)")
    p.add_argument("--sim-chunk-rows", type=int, default=16)
    p.add_argument("--sim-nlist", type=int, default=16384)
    p.add_argument("--sim-memory-limit", default="1GiB")
    p.add_argument("--sim-baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the stages part, JSON to a file
    args = p.parse_args(argv)
    args.sim_runs = [(float(v[0]), int(v[1]), float(v[2]) if len(v) > 2 else None)
                     for v in (x.split(":") for x in args.sim_runs.split(","))]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("distann.train.kmeans", "distann.train.two_level", "distributed", "distann.cluster",
                 "distann.builder.driver"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.makedirs(args.data, exist_ok=True)
    if args.one:
        with open(args.one, "w") as f:
            json.dump(part_stages(args), f)
        return 0
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "scale.json")
    results = {}
    if os.path.exists(jpath):
        with open(jpath) as f:
            results = json.load(f)
    results["machine"] = machine()
    results["distann"] = _library_state()
    if "quantizer" in args.parts:
        results["quantizer"] = part_quantizer(args, results.get("quantizer"))
        results["quantizer"]["load_average_after"] = os.getloadavg()
        _save(jpath, results)
    if "stages" in args.parts:
        tmp = os.path.join(args.data, "stages.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", tmp, "--data", args.data, "--stage-rows",
               str(args.stage_rows), "--merge-chunks", str(args.merge_chunks), "--stage-nlists",
               *map(str, args.stage_nlists)]
        subprocess.run(cmd, check=True, env={**os.environ, **SINGLE_THREAD_ENV})
        with open(tmp) as f:
            results["stages"] = json.load(f)
        results["stages"]["load_average_after"] = os.getloadavg()
        _save(jpath, results)
    if "simulate" in args.parts:
        results["simulate"] = part_simulate(args, results.get("simulate"))
        results["simulate"]["load_average_after"] = os.getloadavg()
        _save(jpath, results)
    results["model"] = model(results)
    _save(jpath, results)
    text = render(results)
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def _library_state() -> dict:
    """The distann code measured: the commit, and the files of distann/ changed since it."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "distann").splitlines()}


def _save(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    raise SystemExit(main())
