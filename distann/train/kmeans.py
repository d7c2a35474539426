"""Distributed k-means on Dask: the coarse quantizer, also usable on its own.

The training sample lives on the workers as blocks (futures). Every Lloyd iteration is a
map-reduce: each block returns its per-centroid (sums, counts, objective), partials are
added pairwise on the workers (a tree reduction), and only the final k x d sums reach the
client, which updates the centroids and splits empty clusters the way Faiss does.

Initialization: ``random`` (k distinct sample points, as Faiss), ``k-means++`` (D^2 seeding
on a uniform subsample of at most 32 k points gathered to the client) or ``k-means||``
(Bahmani et al.: a few distributed oversampling rounds, then weighted k-means++ on the
candidates on the client). ``random`` is the default, as in Faiss: it costs nothing, and
``tests/test_kmeans.py`` holds all three to Faiss's objective.
Everything is seeded: the same data, chunking and seed give the
same centroids.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from distann.cluster import broadcast, tree_reduce
from distann.errors import ValidationError
from distann.validation import INITS  # noqa: F401 - part of this module's interface

log = logging.getLogger(__name__)

MIN_POINTS_PER_CENTROID = 39
_SPLIT_EPS = 1.0 / 1024.0
_KPAR_ROUNDS = 5
_KPAR_OVERSAMPLE = 2.0  # candidates drawn per round, in multiples of k (Bahmani et al.: 0.5-2)
_KPP_SUBSAMPLE = 32    # k-means++ seeds on at most this many points per centroid


class TrainingWarning(UserWarning):
    """Training proceeds but its result may be poor (e.g. too few points per centroid)."""


@dataclass
class KMeansResult:
    """Trained centroids and the objective of every iteration.

    The objective is the sum of squared distances of sample points to their centroid (l2)
    or the sum of their inner products with it (ip / spherical), as in ``faiss.Kmeans.obj``.
    """

    centroids: np.ndarray
    objective: list[float] = field(default_factory=list)
    counts: np.ndarray | None = None
    n_sample: int = 0
    init: str = "random"
    seed: int = 0


# ---------------------------------------------------------------- worker-side block functions

def aligned(x: np.ndarray) -> np.ndarray:
    """``x`` as an aligned C-contiguous array. Arrays that arrive over Dask's comms can sit at
    odd addresses in the receive buffer, and NumPy skips BLAS for unaligned operands (a GEMM
    then runs several times slower); one copy fixes that."""
    return np.require(x, requirements=["C", "A"])


def block_stats(block: np.ndarray, centroids: np.ndarray, spherical: bool, backend: str = "numba"):
    """Per-centroid (sums float64 (k, d), counts int64 (k,), objective) of one sample block, by
    the kernel backend's ``kmeans_stats`` (peak memory: its (2048 x k) score block)."""
    from distann.kernels import get_backend

    return get_backend(backend).kmeans_stats(aligned(block), aligned(centroids), "ip" if spherical else "l2")


def add_stats(a, b):
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def take_rows(block: np.ndarray, local: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block[local])


def _min_sqdist(x: np.ndarray, c: np.ndarray, backend: str = "numba") -> np.ndarray:
    """Squared distance of every row to its nearest center (k-means|| weights)."""
    near = c[nearest(x, c, False, backend)]
    return np.einsum("ij,ij->i", x - near, x - near).astype(np.float32)


def kpar_update(block: np.ndarray, new_centers: np.ndarray, mind: np.ndarray | None,
                backend: str = "numba") -> np.ndarray:
    block, new_centers = aligned(block), aligned(new_centers)
    d2 = _min_sqdist(block, new_centers, backend) if len(new_centers) else np.full(len(block), np.inf, np.float32)
    return d2 if mind is None else np.minimum(mind, d2)


def kpar_pick(block: np.ndarray, mind: np.ndarray, ell: float, phi: float, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.minimum(1.0, ell * mind.astype(np.float64) / phi) if phi > 0 else np.zeros(len(mind))
    return np.ascontiguousarray(block[rng.random(len(block)) < p])


def nearest(x: np.ndarray, centroids: np.ndarray, spherical: bool, backend: str = "numba") -> np.ndarray:
    """Index of the nearest centroid of every row (l2) or of the largest inner product (ip), by
    the kernel backend's ``assign`` (peak memory: its (2048 x k) score block)."""
    from distann.kernels import get_backend

    return get_backend(backend).assign(aligned(x), aligned(centroids), "ip" if spherical else "l2")


def kpar_weights(block: np.ndarray, cand: np.ndarray, backend: str = "numba") -> np.ndarray:
    return np.bincount(nearest(block, cand, False, backend), minlength=len(cand)).astype(np.int64)


def _sum(x: np.ndarray) -> float:
    return float(x.sum(dtype=np.float64))


# ---------------------------------------------------------------- client-side pieces

def weighted_kmeanspp(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """D^2 seeding of ``k`` centers from points ``x`` with weights ``w`` (client side, O(k n d))."""
    n = len(x)
    w = w.astype(np.float64)
    chosen = np.empty(k, dtype=np.int64)
    cum = np.cumsum(w)
    chosen[0] = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), n - 1)
    d2 = ((x - x[chosen[0]]) ** 2).sum(axis=1, dtype=np.float64)
    for i in range(1, k):
        p = w * d2
        total = p.sum()
        if total <= 0:  # fewer distinct points than k: take unused points in order
            unused = np.setdiff1d(np.arange(n), chosen[:i])
            chosen[i] = unused[0] if len(unused) else chosen[i - 1]
        else:
            chosen[i] = min(int(np.searchsorted(np.cumsum(p), rng.random() * total, side="right")), n - 1)
        d2 = np.minimum(d2, ((x - x[chosen[i]]) ** 2).sum(axis=1, dtype=np.float64))
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Faiss-style: give each empty cluster half of a donor chosen with probability ~ (size - 1).

    The donor's centroid is copied and the two copies are pushed apart by multiplying
    coordinates by (1 +/- 1/1024) with alternating signs. Works in place; returns the number split.
    """
    k = len(counts)
    counts = counts.astype(np.float64)
    nsplit = 0
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for ci in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0)
        if weights.sum() <= 0:
            break
        cj = int(rng.choice(k, p=weights / weights.sum()))
        centroids[ci] = centroids[cj] * (1 + sign * _SPLIT_EPS)
        centroids[cj] = centroids[cj] * (1 - sign * _SPLIT_EPS)
        counts[ci] = np.floor(counts[cj] / 2)
        counts[cj] -= counts[ci]
        nsplit += 1
    return nsplit


def update_centroids(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                     spherical: bool) -> tuple[np.ndarray, int]:
    """One Lloyd update (a new array): the mean of every non-empty cluster, Faiss-style splitting
    of the empty ones, then normalized when ``spherical``. Returns (centroids, clusters split)."""
    centroids = centroids.copy()
    nonempty = counts > 0
    centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
    nsplit = split_empty_clusters(centroids, counts, rng)
    return (_normalize(centroids) if spherical else centroids), nsplit


def gather_rows(client, blocks, sizes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rows at global sample positions (sorted), fetched from the blocks holding them."""
    positions = np.sort(positions)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(bounds, positions, side="right") - 1
    parts = []
    for b in np.unique(which):
        local = positions[which == b] - bounds[b]
        parts.append(client.submit(take_rows, blocks[b], local, pure=False))
    return np.concatenate(client.gather(parts))


def initialize(client, blocks, sizes: np.ndarray, k: int, init: str, seed: int, backend: str = "numba") -> np.ndarray:
    n = int(sizes.sum())
    rng = np.random.default_rng([seed, 0x1417])
    if init == "random":
        return gather_rows(client, blocks, sizes, rng.choice(n, size=k, replace=False))
    if init == "k-means++":
        m = min(n, _KPP_SUBSAMPLE * k)
        pts = gather_rows(client, blocks, sizes, rng.choice(n, size=m, replace=False))
        return weighted_kmeanspp(pts, np.ones(m), k, rng)
    # k-means||
    live = [(b, s) for b, s in zip(blocks, sizes) if s > 0]
    first = gather_rows(client, blocks, sizes, rng.choice(n, size=1))
    cand = [first]
    new = broadcast(client, first)
    mind = [client.submit(kpar_update, b, new, None, backend, pure=False) for b, _ in live]
    ell = _KPAR_OVERSAMPLE * k
    for r in range(_KPAR_ROUNDS):
        phi = sum(client.gather([client.submit(_sum, m, pure=False) for m in mind]))
        picks = client.gather([client.submit(kpar_pick, b, m, ell, phi, [seed, 0x8A8, r, i], pure=False)
                               for i, ((b, _), m) in enumerate(zip(live, mind))])
        picked = np.concatenate(picks)
        if len(picked) == 0:
            break
        cand.append(picked)
        if r < _KPAR_ROUNDS - 1:
            new = broadcast(client, picked)
            mind = [client.submit(kpar_update, b, new, m, backend, pure=False) for (b, _), m in zip(live, mind)]
    cand_x = np.concatenate(cand)
    if len(cand_x) < k:  # too few candidates: top up with random sample points
        extra = gather_rows(client, blocks, sizes, rng.choice(n, size=k - len(cand_x), replace=False))
        cand_x = np.concatenate([cand_x, extra])
    cf = broadcast(client, cand_x)
    w = tree_reduce(client, [client.submit(kpar_weights, b, cf, backend, pure=False) for b, _ in live],
                    np.add).result()
    return weighted_kmeanspp(cand_x, np.maximum(w, 0) + 1e-12, k, rng)


def train_on_blocks(client, blocks: list, sizes: np.ndarray, k: int, *, niter: int, spherical: bool,
                    init: str, seed: int, progress: bool = False, backend: str = "numba") -> KMeansResult:
    """Lloyd iterations over sample blocks already on the workers; ``backend`` names the kernel
    backend whose ``kmeans_stats`` runs the assignment on the workers."""
    n = int(sizes.sum())
    if n < k:
        raise ValidationError("k", k, f"at most the number of training vectors ({n})")
    if n < MIN_POINTS_PER_CENTROID * k:
        warnings.warn(f"k-means: {n} training points for {k} centroids is fewer than "
                      f"{MIN_POINTS_PER_CENTROID} per centroid; the centroids may be poor",
                      TrainingWarning, stacklevel=3)
    centroids = initialize(client, blocks, sizes, k, init, seed, backend)
    if spherical:
        centroids = _normalize(centroids)
    rng = np.random.default_rng([seed, 0xE4])
    objective: list[float] = []
    counts = np.zeros(k, dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=niter, desc="k-means", unit="iter")
    for it in range(niter):
        cf = broadcast(client, centroids)
        parts = [client.submit(block_stats, b, cf, spherical, backend, pure=False)
                 for b, s in zip(blocks, sizes) if s > 0]
        sums, counts, obj = tree_reduce(client, parts, add_stats).result()
        objective.append(obj)
        log.debug("k-means iteration %d/%d: objective %.6g", it + 1, niter, obj)
        if bar is not None:
            bar.set_postfix_str(f"objective {obj:.6g}", refresh=False)
            bar.update(1)
        centroids, nsplit = update_centroids(centroids, sums, counts, rng, spherical)
        if nsplit:
            log.debug("k-means iteration %d: split %d empty cluster(s)", it + 1, nsplit)
    if bar is not None:
        bar.close()
    return KMeansResult(np.ascontiguousarray(centroids, dtype=np.float32), objective, counts, n, init, seed)


def kmeans_local(x: np.ndarray, k: int, niter: int, seed, init: np.ndarray | None = None,
                 spherical: bool = False, backend: str = "numba") -> np.ndarray:
    """k-means of an in-memory sample in this process (codec training: PQ sub-spaces, OPQ; the
    fine level of a two-level k-means): ``init`` centroids or ``k`` distinct random rows,
    ``niter`` Lloyd iterations with the same fused assignment as the distributed k-means,
    Faiss-style splitting of empty clusters, centroids normalized each iteration when
    ``spherical``. Needs ``len(x) >= k``. Peak memory: one (2048 x k) score block and the
    (k, d) float64 sums."""
    x = aligned(np.asarray(x, dtype=np.float32))
    rng = np.random.default_rng(seed)
    if init is not None:
        centroids = np.array(init, dtype=np.float32, order="C")
    else:
        centroids = np.ascontiguousarray(x[rng.choice(len(x), size=k, replace=False)], dtype=np.float32)
    if spherical:
        centroids = _normalize(centroids)
    for _ in range(niter):
        sums, counts, _ = block_stats(x, centroids, spherical, backend)
        centroids, _ = update_centroids(centroids, sums, counts, rng, spherical)
    return centroids


def _normalize(c: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return np.ascontiguousarray(c / norms, dtype=np.float32)
