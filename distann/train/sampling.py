"""The training sample of a source: unbiased, seeded, left on the workers.

The client draws how many rows each row chunk gives (a multivariate hypergeometric split,
O(chunks)), and the task that reads a chunk draws which of its rows: the union is a uniform
sample without replacement, and nothing of size O(sample) is shipped to a task. Two ways:

* :func:`sample_rows` (the build): one task per run of consecutive chunks reads only that run's
  sample rows (``VectorSource.read_rows_at``: a fraction of a pass over npy/vecs files). Only the
  sample is checked for NaN/Inf here; the build's add pass checks every row.
* :func:`scan_chunk` (``distann.kmeans``, and the build's full check when the sample holds a
  NaN): one task per chunk reads every row once, counts non-finite values and keeps its share
  of the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distann.codecs.metric import normalize_rows
from distann.errors import ValidationError


def plan_sample(sizes: np.ndarray, n_sample: int, seed: int) -> np.ndarray:
    """How many sample rows each chunk contributes to a uniform sample of ``n_sample`` rows
    without replacement (all rows when the chunks hold no more): a multivariate hypergeometric
    draw over the chunk sizes. O(chunks) on the client, whatever the sample size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if n_sample >= sizes.sum():
        return sizes.copy()
    rng = np.random.default_rng([seed, 0x5A4D])
    return rng.multivariate_hypergeometric(sizes, n_sample, method="marginals").astype(np.int64)


def chunk_sample_rows(size: int, count: int, seed: int, chunk_index: int) -> np.ndarray:
    """The ``count`` rows (sorted, local to the chunk) that chunk ``chunk_index`` of ``size``
    rows gives to the sample: uniform without replacement, seeded per chunk. With the counts of
    :func:`plan_sample` the union over chunks is a uniform sample of the whole source."""
    if count >= size:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5A4D, chunk_index])
    return np.sort(rng.choice(size, size=count, replace=False).astype(np.int64))


@dataclass(frozen=True)
class ChunkScan:
    """What the first pass learns about one chunk."""

    start: int
    nonfinite: int        # number of NaN/Inf values in the chunk
    first_bad_row: int    # global row of the first non-finite value, -1 if none


def scan_chunk(source, chunk, count: int, seed: int, normalize: bool):
    """Read the rows of ``chunk``: return (ChunkScan, its ``count`` sample rows).

    The task finds its own sample rows (:func:`chunk_sample_rows`): nothing of size O(sample)
    is shipped to it. Peak memory: one chunk of float32 rows plus its sample rows.
    """
    x = source.read_rows(chunk.start, chunk.stop)
    bad = ~np.isfinite(x)
    nbad = int(bad.sum())
    first = int(chunk.start + np.flatnonzero(bad.any(axis=1))[0]) if nbad else -1
    block = np.ascontiguousarray(x[chunk_sample_rows(chunk.size, count, seed, chunk.index)])
    if normalize and nbad == 0:
        block = normalize_rows(block)
    return ChunkScan(chunk.start, nbad, first), block


def sample_rows(source, chunks, counts: np.ndarray, seed: int, normalize: bool):
    """The sample rows of consecutive ``chunks`` (``counts[i]`` of chunk i), read in one call:
    (ChunkScan of the sample rows, block). ``first_bad_row`` is a global row."""
    rows = np.concatenate([c.start + chunk_sample_rows(c.size, int(k), seed, c.index) for c, k in zip(chunks, counts)])
    block = source.read_rows_at(rows)
    bad = ~np.isfinite(block)
    nbad = int(bad.sum())
    first = int(rows[np.flatnonzero(bad.any(axis=1))[0]]) if nbad else -1
    if normalize and nbad == 0:
        block = normalize_rows(block)
    return ChunkScan(int(chunks[0].start), nbad, first), block


def raise_if_nonfinite(scans: list[ChunkScan], param: str = "source") -> None:
    total = sum(s.nonfinite for s in scans)
    if total:
        first = min(s.first_bad_row for s in scans if s.nonfinite)
        raise ValidationError(param, f"{total} NaN/Inf value(s), first in row {first}",
                              "all vector components must be finite")
