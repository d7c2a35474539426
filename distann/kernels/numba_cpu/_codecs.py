"""Compressed-list scans of the Numba CPU backend: ``scan_lists_sq`` and ``scan_lists_pq``.

Both work list by list, like ``scan_lists`` (``_lists``), and never hold more than one list of a
thread decoded.

* Scalar quantizer: ``_sq_list`` decodes the rows of a list once (``_decode_sq``) into a
  float32 buffer laid out as ``_prepare_rows`` lays out a Flat list: centred on the list's
  centroid for l2 (the residual itself when ``by_residual``: no subtraction), the full vector
  for ip (centroid + residual when ``by_residual``), with the l2 norms. The centring is folded
  into the per-list offset of the decode (8 bits: ``off + code * scale`` with ``off`` = vmin +
  scale / 2 - centroid rounded once from float64, so offset data loses nothing; fp16: a
  65536-entry table plus ``off``). Lists probed by more than ``_DIRECT_MAX_ROWS`` pairs then go
  through the Flat micro-kernel path (``_lists._centred_pairs``); the others through the direct
  differences of ``_arith`` on the decoded rows (query centred the same way).
* Product quantizer (ADC): ``_pq_list`` takes the pairs of a list ``_PQ_PAIRS`` (4) at a time,
  builds their lookup tables (``_pq_lut``: M x K float32 each, rows of one (4, M K) buffer)
  and scans the list's codes once for the four (``_adc_scan``): each code is loaded once, its
  M table indices computed once, and four sums accumulated, one per pair (two codes per
  step). Each pair's row of keys then goes to the Flat selection (``_consume`` /
  ``_select``). The sums run in the order m = 0..M-1 without reassociation, so identical codes
  get bit-identical keys and their ties are broken by id.

Keys follow the Flat path: l2 the squared distance (``||q - c||^2`` added after selection for
the decoded SQ rows, already inside the table for PQ), ip minus the inner product.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from distann.kernels.numba_cpu._arith import (
    _DIRECT_MAX_ROWS,
    _FAST,
    _direct_rows,
    _direct_topk,
)
from distann.kernels.numba_cpu._lists import _MODE_TOPK, _centred_pairs, _consume, _list_work
from distann.kernels.numba_cpu._selection import _SMALL_K, _emit

_PQ_PAIRS = 4
"""(query, probe) pairs whose lookup tables are scanned together in one pass over a list's
codes (``_adc_scan`` is written for exactly 4). Four tables of M x 256 float32 are 64 KiB for
M = 16: they stay in L2. More lanes gain little (the scan is bound by the scalar table loads
and their index arithmetic) and waste more on lists probed by few pairs."""


# --------------------------------------------------------------------------------------------
# Scalar quantizer
# --------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FAST)
def _decode_sq(sq_kind, codes8, codes16, lo, n, scale, off, tab, want_norms, Xc, xn):
    """Decode rows ``lo..lo + n`` into ``Xc[:n]``: ``off + code * scale`` (8 bits, ``codes8``)
    or ``off + tab[code]`` (fp16, ``codes16``), with ``xn = ||row||^2`` when ``want_norms``
    (else 0). Rows ``n..`` of ``Xc`` are zeroed (padding for the micro-kernel)."""
    d = Xc.shape[1]
    for v in range(n):
        y = Xc[v]
        s = np.float32(0.0)
        if sq_kind == 0:
            x8 = codes8[lo + v]
            for t in range(d):
                z = off[t] + np.float32(x8[t]) * scale[t]
                y[t] = z
                s += z * z
        else:
            x16 = codes16[lo + v]
            for t in range(d):
                z = off[t] + tab[x16[t]]
                y[t] = z
                s += z * z
        xn[v] = s if want_norms else np.float32(0.0)
    for v in range(n, Xc.shape[0]):
        for t in range(d):
            Xc[v, t] = 0.0
        xn[v] = 0.0


@njit(cache=True)
def _sq_list(j, xq, sq_kind, codes8, codes16, ids, list_offsets, centers, base, scale, tab,
             by_residual, group_offsets, group_queries, group_slots, group_limits, valid, k,
             is_ip, D, I, no_i, no_f):
    """Top-k of every pair of list ``j`` of a scalar-quantized batch into its output slot.

    Peak memory (per thread): the decoded list, (n + 1) x d float32, ``_ROWS`` rows of n keys
    (or one row on the direct path) and 12 (n + k) bytes of selection scratch.
    """
    lo, n, g0, g1, nmax, hd, hi, sk, si = _list_work(j, list_offsets, group_offsets, group_limits, k)
    if nmax == 0:
        return
    m = g1 - g0
    d = xq.shape[1]
    has_valid = valid.shape[0] > 0
    c = centers[j]
    # Decoded rows: l2 centred on c (a residual already is x - c; else subtract c), ip the
    # full vector (c + residual, or the reconstruction itself).
    if is_ip:
        sgn = 1.0 if by_residual else 0.0
    else:
        sgn = 0.0 if by_residual else -1.0
    off = np.empty(d, dtype=np.float32)
    for t in range(d):
        if sq_kind == 0:
            off[t] = np.float32(base[t] + sgn * np.float64(c[t]))
        else:
            off[t] = np.float32(sgn) * c[t]
    direct = m <= _DIRECT_MAX_ROWS
    npad = nmax + (nmax & 1)
    Xc = np.empty((npad, d), dtype=np.float32)
    xn = np.empty(npad, dtype=np.float32)
    _decode_sq(sq_kind, codes8, codes16, lo, nmax, scale, off, tab, not is_ip and not direct,
               Xc, xn)
    if not direct:
        _centred_pairs(_MODE_TOPK, xq, Xc, xn, c, lo, n, g0, g1, ids, group_queries,
                       group_slots, group_limits, valid, has_valid, k, is_ip, hd, hi, sk, si,
                       D, I, 0.0, no_i, no_i, no_f, no_i)
        return
    # Few pairs: direct differences between the centred query and the decoded rows (which
    # start at row 0 of Xc: ids and mask are taken from the list's slices).
    ids_l = ids[lo:lo + n]
    valid_l = valid[lo:lo + n]
    qc = np.empty(d, dtype=np.float32)
    keys = np.empty(nmax + 3, dtype=np.float32)
    for g in range(g0, g1):
        lim = min(max(group_limits[g], 0), n)
        if lim == 0:
            continue
        q = xq[group_queries[g]]
        for t in range(d):
            qc[t] = q[t] if is_ip else q[t] - c[t]
        if k <= _SMALL_K:
            cnt = _direct_topk(qc, Xc, 0, lim, is_ip, ids_l, False, valid_l, has_valid, k, hd,
                               hi, 0)
            _emit(hd, hi, cnt, np.float32(0.0), is_ip, D[group_queries[g], group_slots[g]],
                  I[group_queries[g], group_slots[g]])
            continue
        _direct_rows(qc, Xc, 0, lim, is_ip, keys)
        _consume(_MODE_TOPK, g, keys, keys, False, lim, np.float32(0.0), 0, ids_l, valid_l,
                 has_valid, k, is_ip, hd, hi, sk, si, group_queries, group_slots, D, I, 0.0,
                 no_i, no_i, no_f, no_i)


@njit(cache=True, nogil=True)
def _sq_part(p, nparts, ptr, items, xq, sq_kind, codes8, codes16, ids, list_offsets, centers,
             base, scale, tab, by_residual, group_offsets, group_queries, group_slots,
             group_limits, valid, k, is_ip, D, I):
    no_i = np.empty(0, dtype=np.int64)
    no_f = np.empty(0, dtype=np.float32)
    for t in range(ptr[p], ptr[p + 1]):
        _sq_list(items[t], xq, sq_kind, codes8, codes16, ids, list_offsets, centers, base,
                 scale, tab, by_residual, group_offsets, group_queries, group_slots,
                 group_limits, valid, k, is_ip, D, I, no_i, no_f)


# --------------------------------------------------------------------------------------------
# Product quantizer
# --------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=_FAST)
def _pq_lut(q, c, cbT, by_residual, is_ip, qr, L):
    """Write the lookup table of one (query, list) pair into ``L`` (M x K, flat): the key of a
    code is the sum over m of ``L[m * K + code[m]]``.

    l2: ``||q'_m - codebooks[m, c]||^2`` with q' = q - centroid (``by_residual``) or q, by
    direct differences. ip: ``-<q_m, codebooks[m, c]>``, with ``-<q, centroid>`` folded into
    the m = 0 entries when ``by_residual``. ``cbT`` is (M, dsub, K), so the loops run along K
    (vectorized); ``qr`` (d) is scratch.
    """
    M = cbT.shape[0]
    dsub = cbT.shape[1]
    K = cbT.shape[2]
    d = q.shape[0]
    const = np.float32(0.0)
    for t in range(d):
        if is_ip:
            qr[t] = -q[t]  # exact: the table holds minus the inner products
            if by_residual:
                const -= q[t] * c[t]
        else:
            qr[t] = q[t] - c[t] if by_residual else q[t]
    for mm in range(M):
        row0 = mm * K
        init = const if mm == 0 else np.float32(0.0)
        for u in range(K):
            L[row0 + u] = init
        for s in range(dsub):
            a = qr[mm * dsub + s]
            cb = cbT[mm, s]
            if is_ip:
                for u in range(K):
                    L[row0 + u] += a * cb[u]
            else:
                for u in range(K):
                    z = a - cb[u]
                    L[row0 + u] += z * z


@njit(cache=True)
def _adc_scan(codes, lo, nrows, T, K, S):
    """``S[r, v] = sum_m T[r, m * K + codes[lo + v, m]]`` for the 4 tables r (``_PQ_PAIRS``
    must be 4) and v < nrows.

    Each code is read once for the four pairs, which share its index arithmetic; two codes per
    step give eight independent sums to hide the add latency. No fastmath: every sum is taken
    in the order m = 0..M-1 (scalar adds, on either path), so identical codes get identical
    keys. Unsigned indices spare the negative-index checks.
    """
    M = codes.shape[1]
    KU = np.uint64(K)
    t0 = T[0]
    t1 = T[1]
    t2 = T[2]
    t3 = T[3]
    s0 = S[0]
    s1 = S[1]
    s2 = S[2]
    s3 = S[3]
    v = 0
    while v + 1 < nrows:
        x = codes[lo + v]
        y = codes[lo + v + 1]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        b0 = np.float32(0.0)
        b1 = np.float32(0.0)
        b2 = np.float32(0.0)
        b3 = np.float32(0.0)
        at = np.uint64(0)
        for mm in range(M):
            e = at + np.uint64(x[mm])
            f = at + np.uint64(y[mm])
            a0 += t0[e]
            a1 += t1[e]
            a2 += t2[e]
            a3 += t3[e]
            b0 += t0[f]
            b1 += t1[f]
            b2 += t2[f]
            b3 += t3[f]
            at += KU
        s0[v] = a0
        s1[v] = a1
        s2[v] = a2
        s3[v] = a3
        s0[v + 1] = b0
        s1[v + 1] = b1
        s2[v + 1] = b2
        s3[v + 1] = b3
        v += 2
    if v < nrows:
        x = codes[lo + v]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        at = np.uint64(0)
        for mm in range(M):
            e = at + np.uint64(x[mm])
            a0 += t0[e]
            a1 += t1[e]
            a2 += t2[e]
            a3 += t3[e]
            at += KU
        s0[v] = a0
        s1[v] = a1
        s2[v] = a2
        s3[v] = a3


@njit(cache=True)
def _pq_list(j, xq, codes, ids, list_offsets, centers, cbT, by_residual, group_offsets,
             group_queries, group_slots, group_limits, valid, k, is_ip, D, I, no_i, no_f):
    """Top-k of every pair of list ``j`` of a product-quantized batch into its output slot.

    Peak memory (per thread): ``_PQ_PAIRS`` tables of M x K float32, ``_PQ_PAIRS`` rows of n
    keys and 12 (n + k) bytes of selection scratch.
    """
    lo, n, g0, g1, nmax, hd, hi, sk, si = _list_work(j, list_offsets, group_offsets, group_limits, k)
    if nmax == 0:
        return
    d = xq.shape[1]
    M = cbT.shape[0]
    K = cbT.shape[2]
    has_valid = valid.shape[0] > 0
    T = np.empty((_PQ_PAIRS, M * K), dtype=np.float32)
    qr = np.empty(d, dtype=np.float32)
    S = np.empty((_PQ_PAIRS, nmax), dtype=np.float32)
    c = centers[j]
    zero = np.float32(0.0)
    for b in range(g0, g1, _PQ_PAIRS):
        nr = min(_PQ_PAIRS, g1 - b)
        bmax = 0
        for r in range(_PQ_PAIRS):
            lim = min(max(group_limits[b + r], 0), n) if r < nr else 0
            if lim > 0:
                _pq_lut(xq[group_queries[b + r]], c, cbT, by_residual, is_ip, qr, T[r])
                bmax = max(bmax, lim)
            else:  # an idle lane: its sums are computed but never read; zeros keep them
                # cheap (np.empty may hold denormals or NaNs)
                T[r, :] = zero
        if bmax == 0:
            continue
        _adc_scan(codes, lo, bmax, T, K, S)
        for r in range(nr):
            g = b + r
            lim = min(max(group_limits[g], 0), n)
            if lim == 0:
                continue
            _consume(_MODE_TOPK, g, S[r], S[r], False, lim, zero, lo, ids, valid, has_valid,
                     k, is_ip, hd, hi, sk, si, group_queries, group_slots, D, I, 0.0, no_i,
                     no_i, no_f, no_i)


@njit(cache=True, nogil=True)
def _pq_part(p, nparts, ptr, items, xq, codes, ids, list_offsets, centers, cbT, by_residual,
             group_offsets, group_queries, group_slots, group_limits, valid, k, is_ip, D, I):
    no_i = np.empty(0, dtype=np.int64)
    no_f = np.empty(0, dtype=np.float32)
    for t in range(ptr[p], ptr[p + 1]):
        _pq_list(items[t], xq, codes, ids, list_offsets, centers, cbT, by_residual,
                 group_offsets, group_queries, group_slots, group_limits, valid, k, is_ip, D,
                 I, no_i, no_f)
