"""The metric transform: what the three metrics do to vectors before any codec sees them.

``cosine`` is inner product on L2-normalized vectors: database vectors, training samples and
queries all go through :func:`for_metric`. The kernels know two metrics only
(:func:`kernel_metric`): ``l2`` and ``ip``.
"""

from __future__ import annotations

import numpy as np


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


def for_metric(x: np.ndarray, metric: str) -> np.ndarray:
    """``x`` as the index stores and searches it: normalized for cosine, unchanged otherwise."""
    return normalize_rows(x) if metric == "cosine" else x


def kernel_metric(metric: str) -> str:
    """The kernels' metric of an index metric: ``l2`` stays, ``ip`` and ``cosine`` are ``ip``."""
    return "l2" if metric == "l2" else "ip"
