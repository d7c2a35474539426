"""The first pass over a source: a finiteness check and an unbiased training sample, fused.

One task per row chunk reads its rows once, counts non-finite values (so a NaN anywhere is
reported before anything is trained or written) and keeps the rows of a seeded uniform
sample that fall in the chunk. The sample blocks stay on the workers as futures: the
training sample never has to fit on the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distann.codecs.metric import normalize_rows
from distann.errors import ValidationError


def sample_row_ids(n: int, n_sample: int, seed: int) -> np.ndarray:
    """Sorted global row numbers of an unbiased sample of ``n_sample`` of ``n`` rows (all rows if n <= n_sample)."""
    if n_sample >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5A4D])
    return np.sort(rng.choice(n, size=n_sample, replace=False).astype(np.int64))


@dataclass(frozen=True)
class ChunkScan:
    """What the first pass learns about one chunk."""

    start: int
    nonfinite: int        # number of NaN/Inf values in the chunk
    first_bad_row: int    # global row of the first non-finite value, -1 if none


def scan_chunk(source, start: int, stop: int, sample_rows: np.ndarray, normalize: bool):
    """Read rows [start, stop): return (ChunkScan, sample block of the rows in ``sample_rows``).

    Peak memory: one chunk of float32 rows plus its sample rows.
    """
    x = source.read_rows(start, stop)
    bad = ~np.isfinite(x)
    nbad = int(bad.sum())
    first = int(start + np.flatnonzero(bad.any(axis=1))[0]) if nbad else -1
    local = sample_rows[(sample_rows >= start) & (sample_rows < stop)] - start
    block = np.ascontiguousarray(x[local])
    if normalize and nbad == 0:
        block = normalize_rows(block)
    return ChunkScan(start, nbad, first), block


def raise_if_nonfinite(scans: list[ChunkScan], param: str = "source") -> None:
    total = sum(s.nonfinite for s in scans)
    if total:
        first = min(s.first_bad_row for s in scans if s.nonfinite)
        raise ValidationError(param, f"{total} NaN/Inf value(s), first in row {first}",
                              "all vector components must be finite")
