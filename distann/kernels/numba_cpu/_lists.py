"""List processing of the Numba CPU backend: one list of a batch, for the kNN and range scans.

``_process_list`` computes the keys of every (query, probe) pair that probes a list, by the
centred micro-kernel or, for lists probed by at most ``_DIRECT_MAX_ROWS`` pairs, by direct
differences, and hands each row to ``_consume``, which either selects the pair's top-k into its
output slot (``_MODE_TOPK``, ``scan_lists``) or counts / writes its results within the radius
(``_MODE_COUNT`` then ``_MODE_FILL``, ``range_scan_lists``). Its micro-kernel half,
``_centred_pairs``, works on rows already prepared (centred) in a buffer, which is how
``_codecs`` runs decoded scalar-quantized lists through it. ``_run_part`` is the nogil entry
point over one thread's share of the lists; ``_range_layout`` and ``_range_sort_part`` lay out
and sort the range results per query.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from distann.kernels.numba_cpu._arith import (
    _DIRECT_MAX_ROWS,
    _ROWS,
    _direct_rows,
    _direct_topk,
    _kernel_6x2,
    _prepare_query,
    _prepare_rows,
)
from distann.kernels.numba_cpu._selection import _SMALL_K, _emit, _select, _sort_best_first

_MODE_TOPK = 0
_MODE_COUNT = 1
_MODE_FILL = 2


@njit(cache=True)
def _consume(mode, g, row, xn, add_xn, lim, qn, lo, ids, valid, has_valid, k, is_ip, hd, hi,
             sk, si, group_queries, group_slots, D, I, radius, counts, starts, Dr, Ir):
    """Use the keys of pair ``g`` (``row`` + ``xn`` when ``add_xn``): top-k into its slot, or
    count / write its range results."""
    if mode == _MODE_TOPK:
        cnt = _select(row, xn, add_xn, lim, ids, lo, False, valid, has_valid, k, hd, hi, 0, sk, si)
        qi = group_queries[g]
        sl = group_slots[g]
        _emit(hd, hi, cnt, qn, is_ip, D[qi, sl], I[qi, sl])
        return
    zero = np.float32(0.0)
    pos = starts[g]
    c = 0
    for v in range(lim):
        if has_valid and valid[lo + v] == 0:
            continue
        key = row[v] + xn[v] if add_xn else row[v]
        if is_ip:
            dist = -key
            ok = dist > radius
        else:
            dist = max(key + qn, zero)
            ok = dist < radius
        if ok:
            if mode == _MODE_FILL:
                Dr[pos + c] = dist
                Ir[pos + c] = ids[lo + v]
            c += 1
    if mode == _MODE_COUNT:
        counts[g] = c


@njit(cache=True)
def _list_work(j, list_offsets, group_offsets, group_limits, k):
    """The shape of list ``j``'s work and its selection scratch, shared by every list kernel:
    (first row, rows, first pair, end of pairs, most rows any pair scans, and the top-k and
    selection buffers). ``nmax`` is 0 when there is nothing to scan."""
    lo = list_offsets[j]
    n = list_offsets[j + 1] - lo
    g0 = group_offsets[j]
    g1 = group_offsets[j + 1]
    nmax = 0
    if n > 0:
        for g in range(g0, g1):
            nmax = max(nmax, min(max(group_limits[g], 0), n))
    kk = max(k, 1)
    hd = np.empty(kk, dtype=np.float32)
    hi = np.empty(kk, dtype=np.int64)
    sk = np.empty(nmax + kk, dtype=np.float32)
    si = np.empty(nmax + kk, dtype=np.int64)
    return lo, n, g0, g1, nmax, hd, hi, sk, si


@njit(cache=True)
def _process_list(j, mode, xq, xb, ids, list_offsets, centers, group_offsets, group_queries,
                  group_slots, group_limits, valid, k, is_ip, D, I, radius, counts, starts, Dr, Ir):
    """Compute the keys of every pair of list ``j`` and hand each row to ``_consume``.

    Peak memory (per thread): the centred list, (n + 1) x d float32, ``_ROWS`` rows of n keys
    and 12 (n + k) bytes of selection scratch.
    """
    lo, n, g0, g1, nmax, hd, hi, sk, si = _list_work(j, list_offsets, group_offsets, group_limits, k)
    if nmax == 0:
        return
    m = g1 - g0
    d = xq.shape[1]
    has_valid = valid.shape[0] > 0
    if m <= _DIRECT_MAX_ROWS:
        keys = np.empty(nmax + 3, dtype=np.float32)
        for g in range(g0, g1):
            lim = min(max(group_limits[g], 0), n)
            if lim == 0:
                continue
            qv = xq[group_queries[g]]
            if mode == _MODE_TOPK and k <= _SMALL_K:
                cnt = _direct_topk(qv, xb, lo, lim, is_ip, ids, False, valid, has_valid, k, hd,
                                   hi, 0)
                _emit(hd, hi, cnt, np.float32(0.0), is_ip, D[group_queries[g], group_slots[g]],
                      I[group_queries[g], group_slots[g]])
                continue
            _direct_rows(qv, xb, lo, lim, is_ip, keys)
            _consume(mode, g, keys, keys, False, lim, np.float32(0.0), lo, ids, valid,
                     has_valid, k, is_ip, hd, hi, sk, si, group_queries, group_slots, D, I,
                     radius, counts, starts, Dr, Ir)
        return
    npad = nmax + (nmax & 1)
    Xc = np.empty((npad, d), dtype=np.float32)
    xn = np.empty(npad, dtype=np.float32)
    c = centers[j]
    _prepare_rows(xb, lo, nmax, c, is_ip, Xc, xn)
    _centred_pairs(mode, xq, Xc, xn, c, lo, n, g0, g1, ids, group_queries, group_slots,
                   group_limits, valid, has_valid, k, is_ip, hd, hi, sk, si, D, I, radius,
                   counts, starts, Dr, Ir)


@njit(cache=True)
def _centred_pairs(mode, xq, Xc, xn, c, lo, n, g0, g1, ids, group_queries, group_slots,
                   group_limits, valid, has_valid, k, is_ip, hd, hi, sk, si, D, I, radius,
                   counts, starts, Dr, Ir):
    """The micro-kernel path of a list of ``n`` vectors (ids and mask from ``lo``): the keys of
    pairs ``g0..g1`` against the prepared rows ``Xc`` (an even number of rows, at least each
    pair's limit, zero padded; centred on ``c`` with norms ``xn`` for l2, the vectors as they
    are for ip, as ``_prepare_rows`` writes them), six pairs per ``_kernel_6x2`` call, each row
    handed to ``_consume``. ``scan_lists_sq`` feeds it decoded rows.

    Peak memory: ``_ROWS`` rows of ``Xc.shape[0]`` keys and ``_ROWS`` x d scaled queries.
    """
    d = xq.shape[1]
    npad = Xc.shape[0]
    QB = np.zeros((_ROWS, d), dtype=np.float32)
    qnb = np.zeros(_ROWS, dtype=np.float32)
    S = np.empty((_ROWS, npad), dtype=np.float32)
    for b in range(g0, g1, _ROWS):
        nr = min(_ROWS, g1 - b)
        for r in range(_ROWS):
            if r < nr:
                qnb[r] = _prepare_query(xq[group_queries[b + r]], c, is_ip, QB[r])
            else:
                QB[r, :] = 0.0
        _kernel_6x2(QB, Xc, npad, S)
        for r in range(nr):
            g = b + r
            lim = min(max(group_limits[g], 0), n)
            if lim == 0:
                continue
            _consume(mode, g, S[r], xn, not is_ip, lim, qnb[r], lo, ids, valid, has_valid, k,
                     is_ip, hd, hi, sk, si, group_queries, group_slots, D, I, radius, counts,
                     starts, Dr, Ir)


@njit(cache=True, nogil=True)
def _run_part(p, nparts, ptr, items, mode, xq, xb, ids, list_offsets, centers, group_offsets,
              group_queries, group_slots, group_limits, valid, k, is_ip, D, I, radius, counts,
              starts, Dr, Ir):
    for t in range(ptr[p], ptr[p + 1]):
        _process_list(items[t], mode, xq, xb, ids, list_offsets, centers, group_offsets,
                      group_queries, group_slots, group_limits, valid, k, is_ip, D, I,
                      radius, counts, starts, Dr, Ir)


@njit(cache=True)
def _range_layout(group_queries, counts, nq):
    """``lims`` per query and the start of each pair's results (pairs of a query in order)."""
    lims = np.zeros(nq + 1, dtype=np.int64)
    for g in range(counts.shape[0]):
        lims[group_queries[g] + 1] += counts[g]
    for q in range(nq):
        lims[q + 1] += lims[q]
    pos = lims[:nq].copy()
    starts = np.empty(counts.shape[0], dtype=np.int64)
    for g in range(counts.shape[0]):
        q = group_queries[g]
        starts[g] = pos[q]
        pos[q] += counts[g]
    return lims, starts


@njit(cache=True, nogil=True)
def _range_sort_part(p, nparts, lims, D, I, is_ip):
    nq = lims.shape[0] - 1
    for q in range(p, nq, nparts):
        a = lims[q]
        n = lims[q + 1] - a
        if n < 2:
            continue
        keys = np.empty(n, dtype=np.float32)
        idx = I[a:a + n].copy()
        for u in range(n):
            keys[u] = -D[a + u] if is_ip else D[a + u]
        _sort_best_first(keys, idx, n)
        for u in range(n):
            D[a + u] = -keys[u] if is_ip else keys[u]
            I[a + u] = idx[u]
