"""Host-side helpers shared by the kernel backends."""

from __future__ import annotations

import numpy as np


def centre_of(rows: np.ndarray) -> np.ndarray:
    """A centre for the l2 computations on ``rows``: the mean of a strided sample of at most
    ~1024 rows, rounded to a multiple of a power of two no larger than the per-coordinate RMS
    spread.

    Any centre leaves distances unchanged; one within the data's spread removes the offset that
    makes ||q||^2 + ||x||^2 - 2<q, x> cancel (Faiss FAQ). The rounding keeps integer-valued
    data integer after centring, so its arithmetic stays exact and its ties exact.
    """
    step = max(1, rows.shape[0] // 1024)
    sample = rows[::step].astype(np.float64)
    mu = sample.mean(axis=0)
    rms = float(np.sqrt(((sample - mu) ** 2).mean())) if sample.size else 0.0
    if rms > 0 and np.isfinite(rms):
        unit = 2.0 ** np.floor(np.log2(rms))
        mu = np.round(mu / unit) * unit
    return mu.astype(np.float32)
