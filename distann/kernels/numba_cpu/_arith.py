"""Arithmetic blocks of the Numba CPU backend: every distance the kernels compute comes from here.

``_kernel_6x2`` is the register-blocked micro-kernel (6 query rows x 2 database rows per
step) used on centred data; ``_keys4`` / ``_direct_rows`` / ``_direct_topk`` are the
direct-difference path for small row counts (at most ``_DIRECT_MAX_ROWS`` query rows: no
centring copy), the last one streaming its keys straight into a small top-k; and
``_prepare_rows`` / ``_prepare_query`` centre and scale the operands of the micro-kernel. The
loops are compiled with ``_FAST`` (reassociation and contraction, no nnan/ninf) so LLVM
vectorizes the reductions over d and emits FMAs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from distann.kernels.numba_cpu._selection import _insert

_DIRECT_MAX_ROWS = 3
"""A list (or ``coarse_quantize`` / ``exact_knn`` call) with at most this many query rows uses
the direct-difference loop instead of the centred micro-kernel path (no O(n d) centring copy)."""

_ROWS = 6
"""Query rows per micro-kernel call (``_kernel_6x2``)."""

# Flags for the arithmetic loops: reassociation lets LLVM vectorize the reductions over d and
# contraction gives FMAs. No nnan/ninf: padding and user data may contain infinities.
_FAST = {"reassoc", "contract", "nsz"}


@njit(cache=True, fastmath=_FAST)
def _kernel_6x2(Q, X, nrows, S):
    """``S[r, v] = <Q[r], X[v]>`` for r < 6 and v < nrows (``nrows`` even, X has >= nrows rows).

    Twelve dot products share each load: the reduction over d is vectorized by LLVM with 12
    vector accumulators (of the 16 AVX2 registers). Every entry is computed by the same
    instruction sequence wherever it lies in the block.
    """
    d = Q.shape[1]
    q0 = Q[0]
    q1 = Q[1]
    q2 = Q[2]
    q3 = Q[3]
    q4 = Q[4]
    q5 = Q[5]
    s0 = S[0]
    s1 = S[1]
    s2 = S[2]
    s3 = S[3]
    s4 = S[4]
    s5 = S[5]
    for v in range(0, nrows, 2):
        x0 = X[v]
        x1 = X[v + 1]
        a00 = np.float32(0.0)
        a01 = np.float32(0.0)
        a10 = np.float32(0.0)
        a11 = np.float32(0.0)
        a20 = np.float32(0.0)
        a21 = np.float32(0.0)
        a30 = np.float32(0.0)
        a31 = np.float32(0.0)
        a40 = np.float32(0.0)
        a41 = np.float32(0.0)
        a50 = np.float32(0.0)
        a51 = np.float32(0.0)
        for t in range(d):
            u = x0[t]
            w = x1[t]
            a = q0[t]
            a00 += a * u
            a01 += a * w
            a = q1[t]
            a10 += a * u
            a11 += a * w
            a = q2[t]
            a20 += a * u
            a21 += a * w
            a = q3[t]
            a30 += a * u
            a31 += a * w
            a = q4[t]
            a40 += a * u
            a41 += a * w
            a = q5[t]
            a50 += a * u
            a51 += a * w
        s0[v] = a00
        s0[v + 1] = a01
        s1[v] = a10
        s1[v + 1] = a11
        s2[v] = a20
        s2[v + 1] = a21
        s3[v] = a30
        s3[v + 1] = a31
        s4[v] = a40
        s4[v + 1] = a41
        s5[v] = a50
        s5[v + 1] = a51


@njit(cache=True, fastmath=_FAST)
def _keys4(q, X, r, last, is_ip):
    """Keys of rows r..r+3 of ``X`` (indices clamped to ``last``) for one query: l2
    ``||q - x||^2`` by direct differences, ip ``-<q, x>``. Shared by both direct loops so that
    every row goes through the same instruction sequence (duplicates get identical keys)."""
    d = q.shape[0]
    x0 = X[r]
    x1 = X[min(r + 1, last)]
    x2 = X[min(r + 2, last)]
    x3 = X[min(r + 3, last)]
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    if is_ip:
        for t in range(d):
            a = q[t]
            s0 += a * x0[t]
            s1 += a * x1[t]
            s2 += a * x2[t]
            s3 += a * x3[t]
        return -s0, -s1, -s2, -s3
    for t in range(d):
        a = q[t]
        y0 = a - x0[t]
        y1 = a - x1[t]
        y2 = a - x2[t]
        y3 = a - x3[t]
        s0 += y0 * y0
        s1 += y1 * y1
        s2 += y2 * y2
        s3 += y3 * y3
    return s0, s1, s2, s3


@njit(cache=True)
def _direct_rows(q, X, row0, n, is_ip, out):
    """Keys (``_keys4``) of ``X[row0:row0 + n]`` for one query into ``out``, which must hold
    ``n + 3`` entries (the last step writes up to three entries of scratch)."""
    last = row0 + n - 1
    for v in range(0, n, 4):
        s0, s1, s2, s3 = _keys4(q, X, row0 + v, last, is_ip)
        out[v] = s0
        out[v + 1] = s1
        out[v + 2] = s2
        out[v + 3] = s3


@njit(cache=True)
def _offer(hd, hi, cnt, k, key, v, n, lo, ids, use_index, valid, has_valid):
    """Insert row v's key when it is a real row (v < n), valid and good enough."""
    if v < n and (cnt < k or key <= hd[k - 1]):
        if not (has_valid and valid[lo + v] == 0):
            idx = lo + v if use_index else ids[lo + v]
            cnt = _insert(hd, hi, cnt, k, key, idx)
    return cnt


@njit(cache=True)
def _direct_topk(q, X, lo, n, is_ip, ids, use_index, valid, has_valid, k, hd, hi, cnt):
    """Streaming top-k (k <= ``_SMALL_K``) of one query over ``X[lo:lo + n]``, merged into the
    sorted arrays ``hd``/``hi`` holding ``cnt`` entries; returns the new count.

    Keys are compared to the current k-th key as they are computed, four rows at a time: one
    pass over the data, no key buffer (the single-query path). NaN keys never qualify.
    """
    last = lo + n - 1
    thr = hd[k - 1] if cnt == k else np.float32(np.inf)
    for v in range(0, n, 4):
        s0, s1, s2, s3 = _keys4(q, X, lo + v, last, is_ip)
        if s0 <= thr or s1 <= thr or s2 <= thr or s3 <= thr:
            cnt = _offer(hd, hi, cnt, k, s0, v, n, lo, ids, use_index, valid, has_valid)
            cnt = _offer(hd, hi, cnt, k, s1, v + 1, n, lo, ids, use_index, valid, has_valid)
            cnt = _offer(hd, hi, cnt, k, s2, v + 2, n, lo, ids, use_index, valid, has_valid)
            cnt = _offer(hd, hi, cnt, k, s3, v + 3, n, lo, ids, use_index, valid, has_valid)
            if cnt == k:
                thr = hd[k - 1]
    return cnt


@njit(cache=True, fastmath=_FAST)
def _prepare_rows(src, lo, n, c, is_ip, Xc, xn):
    """Copy ``src[lo:lo + n]`` into ``Xc[:n]``: centred on ``c`` with ``xn = ||x - c||^2`` (l2)
    or as is with ``xn = 0`` (ip). Rows ``n..`` of ``Xc`` are zeroed (padding)."""
    d = src.shape[1]
    for v in range(n):
        x = src[lo + v]
        y = Xc[v]
        if is_ip:
            for t in range(d):
                y[t] = x[t]
            xn[v] = 0.0
        else:
            s = np.float32(0.0)
            for t in range(d):
                z = x[t] - c[t]
                y[t] = z
                s += z * z
            xn[v] = s
    for v in range(n, Xc.shape[0]):
        for t in range(d):
            Xc[v, t] = 0.0
        xn[v] = 0.0


@njit(cache=True, fastmath=_FAST)
def _prepare_query(q, c, is_ip, out):
    """Write the scaled query row used by the micro-kernel and return its ``||q - c||^2``.

    l2: ``out = -2 (q - c)`` so the kernel yields ``-2 <q', x'>``; ip: ``out = -q``. Scaling by
    -2 or -1 is exact in floating point.
    """
    d = q.shape[0]
    s = np.float32(0.0)
    if is_ip:
        for t in range(d):
            out[t] = -q[t]
    else:
        for t in range(d):
            z = q[t] - c[t]
            out[t] = np.float32(-2.0) * z
            s += z * z
    return s
