"""Evaluation helpers: exact ground truth on the cluster, recall, and nprobe sweeps."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from distann import config
from distann.errors import ValidationError


def _chunk_knn(source, start: int, stop: int, xq: np.ndarray, k: int, metric: str, backend: str):
    from distann.codecs.metric import for_metric, kernel_metric
    from distann.kernels import get_backend

    x = for_metric(source.read_rows(start, stop), metric)
    kern = get_backend(backend)
    return kern.exact_knn(xq, x, np.arange(start, stop, dtype=np.int64), k, kernel_metric(metric))


def _merge_pair(a, b, k: int, metric: str, backend: str):
    from distann.kernels import get_backend

    D = np.concatenate([a[0], b[0]], axis=1)
    I = np.concatenate([a[1], b[1]], axis=1)
    return get_backend(backend).merge_topk(np.ascontiguousarray(D), np.ascontiguousarray(I), k, metric)


def brute_force_knn(source, queries, k: int, metric: str = "l2", *, client=None, workers: int | None = None,
                    scheduler: str | None = None, chunk_rows: int | None = None, backend: str | None = None,
                    column: str | None = None, storage_options: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of ``queries`` over an out-of-core ``source`` on the Dask cluster.

    One task per row chunk computes the chunk's top-k for every query; partial results are
    merged pairwise on the workers. Ids are row numbers. Peak memory per task: one chunk plus
    (nq x chunk) distances in blocks. Returns ``(D, I)`` of shape (nq, k), best first.
    """
    from distann.chunks import plan_chunks
    from distann.cluster import broadcast, check_backend, client_context, tree_reduce
    from distann.kernels import resolve_backend
    from distann.codecs.metric import for_metric, kernel_metric
    from distann.sources import as_source
    from distann.validation import check_k, check_metric, check_positive_int, check_queries, check_result_size

    check_metric(metric)
    k = check_k(k)
    chunk_rows = check_positive_int("chunk_rows", config.get("build.chunk-rows") if chunk_rows is None else chunk_rows)
    src = as_source(source, column=column, storage_options=storage_options)
    xq = for_metric(check_queries(queries, src.d, "queries"), metric)
    check_result_size(k, 3 * len(xq) * k)  # a chunk's top-k, and the two being merged
    backend = resolve_backend(backend)
    kmetric = kernel_metric(metric)
    with client_context(workers=workers, scheduler=scheduler, client=client) as c:
        check_backend(c, backend)
        qf = broadcast(c, xq)
        parts = [c.submit(_chunk_knn, src, ch.start, ch.stop, qf, k, metric, backend, pure=False)
                 for ch in plan_chunks(src.n, chunk_rows)]
        return tree_reduce(c, parts, functools.partial(_merge_pair, k=k, metric=kmetric, backend=backend)).result()


def recall_at_k(I: np.ndarray, gt: np.ndarray, k: int, n: int | None = None) -> float:
    """n-recall@k: mean over queries of |first n ground-truth ids  ∩  first k results| / n.

    ``n = 1`` gives 1-recall@k (is the nearest neighbour among the first k results);
    ``n = k`` (default) gives the k-recall@k intersection measure.
    """
    I, gt = np.asarray(I), np.asarray(gt)
    n = k if n is None else n
    if I.ndim != 2 or gt.ndim != 2 or len(I) != len(gt):
        raise ValidationError("I", f"shapes {I.shape} and {gt.shape}", "2-D result and ground-truth arrays with one row per query")
    if not 1 <= k <= I.shape[1]:
        raise ValidationError("k", k, f"an integer in [1, {I.shape[1]}] (columns of I)")
    if not 1 <= n <= gt.shape[1]:
        raise ValidationError("n", n, f"an integer in [1, {gt.shape[1]}] (columns of gt)")
    hits = 0
    for row, truth in zip(I[:, :k], gt[:, :n]):
        hits += np.intersect1d(row[row >= 0], truth).size
    return hits / (len(I) * n) if len(I) else 0.0


@dataclass(frozen=True)
class OperatingPoint:
    nprobe: int
    recall: float
    qps: float
    seconds: float


def sweep_nprobe(index, xq: np.ndarray, gt: np.ndarray, nprobes, k: int = 10, *, n: int | None = None,
                 repeats: int = 1, warmup: int = 100, **search_kw) -> tuple[list[OperatingPoint], list[OperatingPoint]]:
    """Search at each nprobe and measure (recall, QPS). Returns (all points, Pareto-optimal points),
    a point being Pareto-optimal when no other point has both higher recall and higher QPS.

    Before timing an nprobe, the first ``warmup`` queries are searched once untimed (kernel
    compilation, caches). For figures that do not depend on the store's latency, ``index.load()``
    first (``distann eval`` does when the index fits in memory)."""
    points = []
    for nprobe in nprobes:
        if warmup:
            index.search(xq[:warmup], k=k, nprobe=int(nprobe), **search_kw)
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            _, I = index.search(xq, k=k, nprobe=int(nprobe), **search_kw)
            best = min(best, time.perf_counter() - t0)
        points.append(OperatingPoint(int(nprobe), recall_at_k(I, gt, k, n), len(xq) / best, best))
    return points, pareto(points)


def pareto(points: list[OperatingPoint]) -> list[OperatingPoint]:
    """Points not dominated by another with recall >= and qps >= (and one of them >)."""
    keep = []
    for p in points:
        dominated = any((q.recall >= p.recall and q.qps >= p.qps) and (q.recall > p.recall or q.qps > p.qps)
                        for q in points)
        if not dominated:
            keep.append(p)
    return sorted(keep, key=lambda p: p.recall)
