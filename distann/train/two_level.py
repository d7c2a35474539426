"""Two-level k-means on Dask: 2^14 to 2^20+ centroids, which one-level Lloyd cannot reach.

One-level k-means costs ``n_sample * nlist * d`` per iteration, with ``n_sample`` itself
proportional to ``nlist``: quadratic in nlist (10^16 flops per iteration at 2^20 lists). As
Faiss's ``two_level_clustering``, but distributed:

1. **Level 1**: the distributed k-means (``train.kmeans``) of ``nlist1`` (default
   round(sqrt(nlist))) centroids on the whole sample.
2. **Split**: every sample block is assigned to the level-1 centroids on its worker and cut into
   ``groups`` pieces, a group being a run of consecutive level-1 clusters balanced by the fine
   k-means work it holds; the client only sees the per-cluster counts (``nlist1`` integers).
3. **Level 2**: level-1 cluster ``i`` gets ``k_i`` fine centroids, proportional to its share of
   the sample (largest remainders, so that they sum to ``nlist``); one task per group gathers
   its pieces and runs a local k-means per cluster (``kmeans_local``), ``niter`` iterations.
4. **Refinement** (``refine_niter``, default 5): Lloyd iterations of all ``nlist`` centroids,
   the assignment made by the ``ivf`` coarse quantizer (``codecs.coarse``) instead of
   brute force.

The level-1 centroids become the ``ivf`` coarse quantizer's lists. The returned objective is
that of the final centroids, each sample point assigned by that quantizer; the split tasks
number ``blocks x groups`` (``docs/SCALE.md``).
"""

from __future__ import annotations

import logging
import operator
import warnings

import numpy as np

from distann.cluster import broadcast, tree_reduce
from distann.codecs.coarse import DEFAULT_QUANTIZER_NPROBE, IVFQuantizer, level1_size
from distann.errors import ValidationError
from distann.train.kmeans import (MIN_POINTS_PER_CENTROID, KMeansResult, TrainingWarning, _normalize, add_stats,
                                  aligned, kmeans_local, nearest, train_on_blocks, update_centroids)

log = logging.getLogger(__name__)

#: Lloyd iterations of all centroids after the two levels (``docs/SCALE.md``: what they buy)
DEFAULT_REFINE_NITER = 5
#: level-2 training tasks at most (each gathers one piece of every sample block)
MAX_GROUPS = 64


def fine_counts(counts: np.ndarray, k: int) -> np.ndarray:
    """Fine centroids per level-1 cluster: proportional to ``counts`` (largest remainders), summing
    to ``k``, at most the cluster's size and at least one for every non-empty cluster."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n < k:
        raise ValueError(f"fine_counts: {n} points for {k} centroids")
    if k < np.count_nonzero(counts):
        raise ValueError(f"fine_counts: {k} centroids for {np.count_nonzero(counts)} non-empty clusters")
    exact = counts * (k / n)
    ks = np.minimum(np.floor(exact).astype(np.int64), counts)
    ks[(counts > 0) & (ks == 0)] = 1
    while ks.sum() > k:  # the minimum of one pushed the total over: take back from the clusters with
        # the largest excess that keep at least one (there is one: k >= the non-empty clusters)
        ks[np.argmax(np.where(ks > 1, ks - exact, -np.inf))] -= 1
    while ks.sum() < k:  # hand out the rest by largest remainder, where points remain
        room = np.where(ks < counts, exact - ks, -np.inf)
        ks[np.argmax(room)] += 1
    return ks


def plan_groups(counts: np.ndarray, ks: np.ndarray, groups: int) -> np.ndarray:
    """Bounds (groups + 1) of runs of consecutive level-1 clusters with about equal fine work
    (points x fine centroids of each cluster)."""
    work = np.cumsum(counts.astype(np.float64) * np.maximum(ks, 1))
    targets = work[-1] * np.arange(1, groups) / groups
    inner = np.searchsorted(work, targets, side="left") + 1
    return np.unique(np.concatenate([[0], np.clip(inner, 1, len(counts)), [len(counts)]])).astype(np.int64)


# ---------------------------------------------------------------- worker-side block functions

def _count(labels: np.ndarray, nlist1: int) -> np.ndarray:
    return np.bincount(labels, minlength=nlist1).astype(np.int64)


def _split(block: np.ndarray, labels: np.ndarray, bounds: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The rows of ``block`` (and their level-1 labels) of each group, sorted by label."""
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    cuts = np.searchsorted(lab, bounds)
    return [(np.ascontiguousarray(block[order[a:b]]), lab[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def _train_group(lo: int, ks: np.ndarray, niter: int, seed: int, spherical: bool, backend: str,
                 *pieces: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Fine centroids of level-1 clusters lo, lo + 1, ... (``ks`` of them each), in that order."""
    x = np.concatenate([p[0] for p in pieces]) if pieces else np.empty((0, 0), np.float32)
    lab = np.concatenate([p[1] for p in pieces]) if pieces else np.empty(0, np.int64)
    order = np.argsort(lab, kind="stable")
    x, lab = x[order], lab[order]
    cuts = np.searchsorted(lab, lo + np.arange(len(ks) + 1))
    out = []
    for i, k in enumerate(ks):
        if k:
            pts = x[cuts[i]:cuts[i + 1]]
            out.append(kmeans_local(pts, int(k), niter, [seed, 0x2E, lo + i], spherical=spherical, backend=backend))
    return np.concatenate(out) if out else np.empty((0, x.shape[1]), np.float32)


def quantizer_stats(block: np.ndarray, quantizer: IVFQuantizer, spherical: bool, backend: str):
    """As ``kmeans.block_stats``, each row assigned by the ``ivf`` quantizer."""
    from distann.kernels import get_backend

    block = aligned(block)
    kmetric = "ip" if spherical else "l2"
    labels = quantizer.assign(block, kmetric, get_backend(backend))
    k, d = quantizer.centroids.shape
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    order = np.argsort(labels, kind="stable")
    sums = np.zeros((k, d), dtype=np.float64)
    nz = np.flatnonzero(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nz]
    x = block.astype(np.float64)
    sums[nz] = np.add.reduceat(x[order], starts, axis=0)
    c = quantizer.centroids[labels].astype(np.float64)
    if spherical:
        obj = float(np.einsum("ij,ij->", x, c))
    else:
        x -= c
        obj = float(np.einsum("ij,ij->", x, x))
    return sums, counts, obj


# ---------------------------------------------------------------- client side

def check_two_level(nlist: int, nlist1: object, n_sample: int, quantizer_nprobe: object) -> tuple[int, int]:
    """(nlist1, quantizer nprobe) of a two-level k-means of ``nlist`` centroids on ``n_sample``
    points, defaults filled in, or a ValidationError naming the parameter."""
    from distann.codecs.coarse import check_quantizer_nprobe
    from distann.validation import is_int

    if nlist1 is None:
        nlist1 = level1_size(nlist)
    if not is_int(nlist1) or not 2 <= int(nlist1) <= nlist // 2:
        raise ValidationError("nlist1", nlist1, f"an integer from 2 to nlist / 2 ({nlist // 2}): the level-1 "
                                                "clusters of a two-level k-means each hold several lists")
    nlist1 = int(nlist1)
    if n_sample < nlist:
        raise ValidationError("nlist", nlist, f"at most the training sample size ({n_sample} vectors): a "
                                              f"two-level k-means of {nlist} lists needs at least {nlist} "
                                              "training vectors")
    nprobe = min(DEFAULT_QUANTIZER_NPROBE, nlist1) if quantizer_nprobe is None else quantizer_nprobe
    return nlist1, check_quantizer_nprobe(nprobe, nlist1)


def train_two_level(client, blocks: list, sizes: np.ndarray, k: int, *, niter: int, spherical: bool, init: str,
                    seed: int, nlist1: int, quantizer_nprobe: int, refine_niter: int = DEFAULT_REFINE_NITER,
                    progress: bool = False, backend: str = "numba") -> tuple[KMeansResult, IVFQuantizer]:
    """Two-level k-means of the sample ``blocks`` (futures, ``sizes`` rows each) into ``k``
    centroids; returns the result and its ``ivf`` coarse quantizer (``nlist1`` level-1 lists,
    ``quantizer_nprobe`` probed)."""
    from distann.kernels import get_backend

    kern = get_backend(backend)
    kmetric = "ip" if spherical else "l2"
    live = [(b, int(s)) for b, s in zip(blocks, sizes) if s > 0]
    n = int(sizes.sum())
    if n < MIN_POINTS_PER_CENTROID * k:  # as one-level k-means warns (its level 1 alone has plenty)
        warnings.warn(f"two-level k-means: {n} training points for {k} centroids is fewer than "
                      f"{MIN_POINTS_PER_CENTROID} per centroid; the centroids may be poor", TrainingWarning,
                      stacklevel=3)
    level1 = train_on_blocks(client, blocks, sizes, nlist1, niter=niter, spherical=spherical, init=init,
                             seed=seed, progress=progress, backend=backend)
    top = level1.centroids
    tf = broadcast(client, top)
    labels = [client.submit(nearest, b, tf, spherical, backend, pure=False) for b, _ in live]
    counts = tree_reduce(client, [client.submit(_count, f, nlist1, pure=False) for f in labels], np.add).result()
    ks = fine_counts(counts, k)
    bounds = plan_groups(counts, ks, min(MAX_GROUPS, nlist1))
    log.info("two-level k-means: %d level-1 clusters (%d to %d points), %d level-2 tasks", nlist1,
             int(counts.min()), int(counts.max()), len(bounds) - 1)
    pieces = [client.submit(_split, b, f, bounds, pure=False) for (b, _), f in zip(live, labels)]
    parts = []
    for g in range(len(bounds) - 1):
        lo, hi = int(bounds[g]), int(bounds[g + 1])
        mine = [client.submit(operator.getitem, p, g, pure=False) for p in pieces]
        parts.append(client.submit(_train_group, lo, ks[lo:hi], niter, seed, spherical, backend, *mine,
                                   pure=False))
    centroids = np.ascontiguousarray(np.concatenate(client.gather(parts)), dtype=np.float32)
    del pieces, parts, labels
    if spherical:
        centroids = _normalize(centroids)
    rng = np.random.default_rng([seed, 0x2F])
    objective: list[float] = []
    counts_k = np.zeros(k, dtype=np.int64)
    for it in range(refine_niter + 1):
        quantizer = IVFQuantizer.build(centroids, top, kmetric, quantizer_nprobe, kern)
        qf = broadcast(client, quantizer)
        sums, counts_k, obj = tree_reduce(client, [client.submit(quantizer_stats, b, qf, spherical, backend,
                                                                 pure=False) for b, _ in live], add_stats).result()
        objective.append(obj)
        if it == refine_niter:
            break
        centroids, _ = update_centroids(centroids, sums, counts_k, rng, spherical)
    log.info("two-level k-means of %d centroids: objective %.6g", k, objective[-1])
    result = KMeansResult(centroids, objective, counts_k, int(sizes.sum()), init, seed)
    return result, quantizer
