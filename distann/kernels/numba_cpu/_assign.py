"""Numba loops fused after the assignment GEMM: the backend's ``assign`` and ``kmeans_stats``.

NumPy would make three passes over the (rows x k) score matrix (scale, add norms, argmin)
plus a sort to accumulate per-centroid sums; these loops make one pass that LLVM vectorizes
(float32 scores and a running minimum), then find the first column holding the minimum, so
ties go to the smaller centroid index, as ``np.argmin`` does. Scores are float32, as the
GEMM that produced them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# reassociation lets LLVM vectorize the running minimum; no nnan/ninf (inf is the start value)
_FAST = {"reassoc", "nsz", "contract", "arcp"}


@njit(cache=True, nogil=True, fastmath=_FAST)
def _row_scores(dots, c_norms, i, spherical, tmp):
    """tmp[j] = ranking score of centroid j for row i (smaller is better); returns the minimum."""
    best = np.float32(np.inf)
    if spherical:
        for j in range(dots.shape[1]):
            v = -dots[i, j]
            tmp[j] = v
            best = min(best, v)
    else:
        for j in range(dots.shape[1]):
            v = c_norms[j] - np.float32(2.0) * dots[i, j]
            tmp[j] = v
            best = min(best, v)
    return best


@njit(cache=True, nogil=True)
def _first(tmp, best):
    for j in range(tmp.shape[0]):
        if tmp[j] == best:
            return j
    return 0


@njit(cache=True, nogil=True)
def assign_labels(dots, c_norms, spherical, out):
    """out[i] = argmin_j (||c_j||^2 - 2 dots[i, j]) (l2) or argmax_j dots[i, j] (spherical)."""
    tmp = np.empty(dots.shape[1], dtype=np.float32)
    for i in range(dots.shape[0]):
        out[i] = _first(tmp, _row_scores(dots, c_norms, i, spherical, tmp))


@njit(cache=True, nogil=True)
def assign_accumulate(dots, c_norms, x, spherical, sums, counts):
    """Assign rows of ``x`` (scores in ``dots`` = x @ c.T) and add them to per-centroid
    ``sums`` (float64) and ``counts``; returns the objective of these rows."""
    tmp = np.empty(dots.shape[1], dtype=np.float32)
    obj = 0.0
    d = x.shape[1]
    for i in range(x.shape[0]):
        best = _row_scores(dots, c_norms, i, spherical, tmp)
        bj = _first(tmp, best)
        counts[bj] += 1
        xn = 0.0
        for t in range(d):
            v = np.float64(x[i, t])
            sums[bj, t] += v
            xn += v * v
        obj += -np.float64(best) if spherical else max(np.float64(best) + xn, 0.0)
    return obj
