"""Training a codec pipeline on the build's sample, which stays on the workers.

Order (as Faiss's ``IndexPreTransform`` + ``IndexIVF`` train): each pre-transform is fitted on
the sample as the previous ones left it and then applied to the sample blocks on the workers;
the coarse k-means runs on the transformed blocks; the vector quantizer is fitted on the
residuals of the transformed sample to its nearest centroid (or on the vectors, for quantizers
that do not encode residuals).

What reaches the client is bounded whatever the sample size: PCA's moments (d x d, added up
on the workers), SQ8's per-dimension range (reduced on the workers), and for OPQ and PQ a
uniform subsample of at most their training size (65,536 rows for 8-bit codes, Faiss's caps).
PQ's sub-spaces are trained in parallel, one task per sub-space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from distann.cluster import broadcast, tree_reduce
from distann.codecs.coarse import FlatQuantizer
from distann.codecs.pipeline import CodecPipeline
from distann.codecs.pq import PQQuantizer
from distann.codecs.transforms import OPQ_MAX_TRAIN, OPQTransform, PCATransform
from distann.kernels import get_backend
from distann.train.kmeans import KMeansResult, aligned, gather_rows, train_on_blocks
from distann.train.two_level import train_two_level

log = logging.getLogger(__name__)

#: rows on which the reconstruction error reported by ``distann info`` is measured
MSE_SAMPLE = 16384


@dataclass(frozen=True)
class TwoLevel:
    """The parameters of a two-level coarse k-means (``train.two_level``)."""

    nlist1: int
    nprobe: int
    refine_niter: int


def sample_size(pipeline: CodecPipeline, n: int, nlist: int, max_points_per_centroid: int) -> int:
    """Rows to sample: the coarse k-means's share, or more when a codec needs more to train."""
    need = max_points_per_centroid * nlist
    if any(isinstance(t, OPQTransform) for t in pipeline.transforms):
        need = max(need, OPQ_MAX_TRAIN)
    if isinstance(pipeline.quantizer, PQQuantizer):
        need = max(need, pipeline.quantizer.train_size)
    return min(n, need)


def _moments(block: np.ndarray):
    x = block.astype(np.float64)
    return len(x), x.sum(axis=0), x.T @ x


def _add_moments(a, b):
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _apply(transform, block: np.ndarray) -> np.ndarray:
    return transform.apply(aligned(block))


def _residuals(block: np.ndarray, quantizer: FlatQuantizer, spherical: bool, by_residual: bool,
               backend: str) -> np.ndarray:
    if not by_residual:
        return block
    labels = quantizer.assign(aligned(block), "ip" if spherical else "l2", get_backend(backend))
    return np.ascontiguousarray(block - quantizer.centroids[labels], dtype=np.float32)


def _range(block: np.ndarray):
    return block.min(axis=0), block.max(axis=0)


def _merge_range(a, b):
    return np.minimum(a[0], b[0]), np.maximum(a[1], b[1])


def _subsample(client, blocks, sizes: np.ndarray, m: int, seed) -> np.ndarray:
    n = int(sizes.sum())
    if m >= n:
        return gather_rows(client, blocks, sizes, np.arange(n))
    return gather_rows(client, blocks, sizes, np.random.default_rng(seed).choice(n, size=m, replace=False))


def train_pipeline(client, pipeline: CodecPipeline, blocks: list, sizes: np.ndarray, nlist: int, *, niter: int,
                   init: str, seed: int, progress: bool = False, backend: str = "numba",
                   two_level: TwoLevel | None = None) -> tuple[KMeansResult, FlatQuantizer, float]:
    """Train ``pipeline`` (in place) and the coarse quantizer on the sample ``blocks`` (futures of
    the metric-transformed sample, ``sizes`` rows each): one-level k-means and the exact
    quantizer, or with ``two_level`` a two-level k-means and its ``ivf`` quantizer. Returns the
    k-means result (centroids in the IVF space), the quantizer and the reconstruction MSE of the
    whole pipeline on a subsample, measured in the original space (mean squared distance between
    a vector and its reconstruction)."""
    raw_blocks = blocks
    for i, t in enumerate(pipeline.transforms):
        if isinstance(t, PCATransform):
            n, s1, s2 = tree_reduce(client, [client.submit(_moments, b, pure=False) for b in blocks],
                                    _add_moments).result()
            t.fit_moments(n, s1, s2)
        elif t.needs_training:
            t.train(_subsample(client, blocks, sizes, OPQ_MAX_TRAIN, [seed, 0x0A, i]), seed)
        tf = broadcast(client, t)
        blocks = [client.submit(_apply, tf, b, pure=False) for b in blocks]
        log.debug("trained pre-transform %s", t.kind)
    spherical = pipeline.metric != "l2"
    if two_level is None:
        km = train_on_blocks(client, blocks, sizes, nlist, niter=niter, spherical=spherical,
                             init=init, seed=seed, progress=progress, backend=backend)
        coarse = FlatQuantizer(km.centroids)
    else:
        km, coarse = train_two_level(client, blocks, sizes, nlist, niter=niter, spherical=spherical, init=init,
                                     seed=seed, nlist1=two_level.nlist1, quantizer_nprobe=two_level.nprobe,
                                     refine_niter=two_level.refine_niter, progress=progress, backend=backend)
    q = pipeline.quantizer
    if q.needs_training:
        cf = broadcast(client, coarse)
        resid = [client.submit(_residuals, b, cf, pipeline.metric != "l2", q.by_residual, backend, pure=False)
                 for b in blocks]
        if isinstance(q, PQQuantizer):
            x = _subsample(client, resid, sizes, q.train_size, [seed, 0x0B])
            books = client.gather([client.submit(PQQuantizer.train_subspace, q.subspace(x, m), q.ksub, [seed, m],
                                                 pure=False) for m in range(q.m)])
            q.set_codebooks(np.stack(books))
        else:
            lo, hi = tree_reduce(client, [client.submit(_range, r, pure=False) for r in resid], _merge_range).result()
            q.set_range(lo, hi)
        log.debug("trained quantizer %s", q.kind)
    mse = _reconstruction_mse(client, pipeline, coarse, raw_blocks, sizes, seed, backend)
    return km, coarse, mse


def _reconstruction_mse(client, pipeline: CodecPipeline, coarse: FlatQuantizer, raw_blocks, sizes: np.ndarray,
                        seed: int, backend: str) -> float:
    n = int(sizes.sum())
    positions = np.random.default_rng([seed, 0x3E]).choice(n, size=min(n, MSE_SAMPLE), replace=False)
    x = gather_rows(client, raw_blocks, sizes, positions)
    y = pipeline.transform(x)
    centroids = coarse.centroids
    assign = coarse.assign(y, "l2" if pipeline.metric == "l2" else "ip", get_backend(backend))
    rec = pipeline.reconstruct(pipeline.encode(y, assign, centroids, backend=backend), assign, centroids)
    return float(((rec.astype(np.float64) - x) ** 2).sum(axis=1).mean())
