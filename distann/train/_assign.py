"""Numba loops fused after the assignment GEMM (training and the add stage).

NumPy would make three passes over the (rows x k) score matrix (scale, add norms, argmin)
plus a sort to accumulate per-centroid sums; these loops make one. Ties go to the smaller
centroid index, as ``np.argmin`` does.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _best(dots, c_norms, i, spherical):
    k = dots.shape[1]
    best = np.inf
    bj = 0
    for j in range(k):
        v = -dots[i, j] if spherical else c_norms[j] - 2.0 * dots[i, j]
        if v < best:
            best = v
            bj = j
    return bj, best


@njit(cache=True, nogil=True)
def assign_labels(dots, c_norms, spherical, out):
    """out[i] = argmin_j (||c_j||^2 - 2 dots[i, j]) (l2) or argmax_j dots[i, j] (spherical)."""
    for i in range(dots.shape[0]):
        out[i] = _best(dots, c_norms, i, spherical)[0]


@njit(cache=True, nogil=True)
def assign_accumulate(dots, c_norms, x, spherical, sums, counts):
    """Assign rows of ``x`` (scores in ``dots`` = x @ c.T) and add them to per-centroid
    ``sums`` (float64) and ``counts``; returns the objective of these rows."""
    obj = 0.0
    d = x.shape[1]
    for i in range(x.shape[0]):
        bj, best = _best(dots, c_norms, i, spherical)
        counts[bj] += 1
        xn = 0.0
        for t in range(d):
            v = np.float64(x[i, t])
            sums[bj, t] += v
            xn += v * v
        obj += -best if spherical else max(best + xn, 0.0)
    return obj


@njit(cache=True, nogil=True)
def min_sqdist(dots, c_norms, x_norms, out):
    """out[i] = min_j ||x_i - c_j||^2 from scores ``dots`` = x @ c.T (clamped at 0)."""
    for i in range(dots.shape[0]):
        out[i] = max(_best(dots, c_norms, i, False)[1] + x_norms[i], 0.0)
