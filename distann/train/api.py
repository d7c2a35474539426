"""``distann.kmeans``: distributed k-means on a vector source, on its own."""

from __future__ import annotations

import logging
import operator

import numpy as np

from distann import config
from distann.chunks import plan_chunks
from distann.cluster import check_backend, client_context, wait_all
from distann.errors import ValidationError
from distann.kernels import resolve_backend
from distann.train.kmeans import KMeansResult, train_on_blocks
from distann.validation import INITS, check_choice, check_metric, check_positive_int, is_int
from distann.train.sampling import ChunkScan, plan_sample, raise_if_nonfinite, sample_rows, scan_chunk

log = logging.getLogger(__name__)

_SAMPLE_BLOCK = 16384  # sample rows per training block, at least
_MAX_SAMPLE_BLOCKS = 1024  # ... and blocks at most (larger blocks beyond 16M sample rows)


def sample_block_rows(n_sample: int) -> int:
    """Rows per sample block: 16,384, enough blocks that a Lloyd iteration's tasks spread evenly
    over the workers (a block more on one worker costs little), and at most 1,024 blocks so that
    the per-iteration task count and the two-level split (blocks x groups tasks) stay bounded.
    It depends on the sample size only, never on the cluster: the same build trains the same
    centroids on any cluster."""
    return max(_SAMPLE_BLOCK, -(-n_sample // _MAX_SAMPLE_BLOCKS))


def check_train_params(niter: object, init: object, seed: object, max_points_per_centroid: object) -> None:
    check_positive_int("niter", niter)
    check_positive_int("max_points_per_centroid", max_points_per_centroid)
    check_choice("init", init, INITS)
    if not is_int(seed):
        raise ValidationError("seed", seed, "an integer")


def collect_sample(client, source, chunks, n_sample: int, seed: int, normalize: bool,
                   progress: bool, full_scan: bool = True) -> tuple[list, np.ndarray, list[ChunkScan]]:
    """Leave a uniform sample on the workers; with ``full_scan`` also check that every value of
    the source is finite (a pass over all of it), otherwise only the sample's values (the build
    checks the rest in its add pass). The sample is the same either way.

    Returns (sample block futures, block sizes, scans). Raises ValidationError on NaN/Inf
    before anything is written (counting every NaN/Inf of the source when the sample holds one).
    """
    sizes = plan_sample(np.array([c.size for c in chunks], dtype=np.int64), n_sample, seed)
    if not full_scan:
        return _read_sample(client, source, chunks, sizes, seed, normalize, progress)
    futs = [client.submit(scan_chunk, source, c, int(size), seed, normalize, pure=False)
            for c, size in zip(chunks, sizes)]
    # only the small per-chunk scans travel to the client; the sample stays on the workers
    scans = wait_all([client.submit(operator.getitem, f, 0, pure=False) for f in futs], "scan", progress)
    raise_if_nonfinite(scans)
    groups = _sample_groups(sizes)
    blocks = []
    for group, _ in groups:
        parts = [client.submit(operator.getitem, futs[i], 1, pure=False) for i in group]
        blocks.append(parts[0] if len(parts) == 1 else client.submit(_concat, *parts, pure=False))
    return blocks, np.array([rows for _, rows in groups], dtype=np.int64), scans


def _sample_groups(sizes: np.ndarray) -> list[tuple[list[int], int]]:
    """The sample blocks: runs of consecutive chunks (those giving sample rows) holding about
    ``sample_block_rows`` sample rows each, as (chunk indices, rows). Few, large tasks per Lloyd
    iteration, and a grouping that does not depend on the cluster."""
    block_rows = sample_block_rows(int(sizes.sum()))
    groups, group, acc = [], [], 0
    for i, size in enumerate(sizes):
        if size:
            group.append(i)
            acc += int(size)
        if group and (acc >= block_rows or i == len(sizes) - 1):
            groups.append((group, acc))
            group, acc = [], 0
    return groups


def _read_sample(client, source, chunks, sizes: np.ndarray, seed: int, normalize: bool, progress: bool):
    """One task per run of consecutive chunks holding about ``sample_block_rows`` sample rows reads
    only those rows: the sample blocks, as the full scan would leave them, without the pass."""
    groups = _sample_groups(sizes)
    futs = [client.submit(sample_rows, source, [chunks[i] for i in g], sizes[g], seed, normalize, pure=False)
            for g, _ in groups]
    scans = wait_all([client.submit(operator.getitem, f, 0, pure=False) for f in futs], "sample", progress)
    if any(s.nonfinite for s in scans):  # count every bad value of the source for the message
        del futs
        full = [client.submit(scan_chunk, source, c, 0, seed, False, pure=False) for c in chunks]
        raise_if_nonfinite(wait_all([client.submit(operator.getitem, f, 0, pure=False) for f in full], "scan",
                                    progress))
    blocks = [client.submit(operator.getitem, f, 1, pure=False) for f in futs]
    return blocks, np.array([a for _, a in groups], dtype=np.int64), scans


def _concat(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts)


def kmeans(source, k: int, *, niter: int = 25, metric: str = "l2", init: str = "random", seed: int = 1234,
           max_points_per_centroid: int = 256, client=None, workers: int | None = None,
           scheduler: str | None = None, column: str | None = None, storage_options: dict | None = None,
           chunk_rows: int | None = None, progress: bool = False, backend: str | None = None) -> KMeansResult:
    """Distributed k-means of ``source`` (URL, VectorSource or 2-D array) into ``k`` centroids.

    Trains on an unbiased sample of at most ``max_points_per_centroid * k`` rows (Faiss's rule)
    with ``niter`` Lloyd iterations. ``metric`` "l2" is ordinary k-means; "ip" is spherical
    k-means (centroids normalized each iteration); "cosine" also normalizes the data.
    ``backend``: the kernel backend of the assignments on the workers ("numba", "numpy" or
    "cuda"; default the ``distann.kernels.backend`` setting), checked on every worker before
    any task is scheduled.
    """
    from distann.sources import as_source

    k = check_positive_int("k", k)
    check_metric(metric)
    check_train_params(niter, init, seed, max_points_per_centroid)
    chunk_rows = check_positive_int("chunk_rows", chunk_rows if chunk_rows is not None else config.get("build.chunk-rows"))
    backend = resolve_backend(backend)
    src = as_source(source, column=column, storage_options=storage_options)
    if src.n < k:
        raise ValidationError("k", k, f"at most the number of vectors in the source ({src.n})")
    n_sample = min(src.n, max_points_per_centroid * k)
    with client_context(workers=workers, scheduler=scheduler, client=client) as c:
        check_backend(c, backend)
        blocks, sizes, _ = collect_sample(c, src, plan_chunks(src.n, chunk_rows), n_sample, seed,
                                          metric == "cosine", progress)
        return train_on_blocks(c, blocks, sizes, k, niter=niter, spherical=metric != "l2",
                               init=init, seed=seed, progress=progress, backend=backend)
