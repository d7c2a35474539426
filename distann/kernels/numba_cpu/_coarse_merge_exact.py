"""The coarse_quantize, merge_topk, exact_knn and rerank kernels of the Numba CPU backend.

Each ``*_part`` function is a nogil kernel over one thread's share of the work:
``_coarse_part`` ranks the centroids for a run of query blocks (or every ``nparts``-th query
on the direct path), ``_merge_part`` cuts rows of candidates to their best k, and
``_exact_part`` runs brute-force tiles (query block x database chunk, ``_exact_tile``) whose
partial top-k lists are merged by ``_merge_part`` when the database was cut in several chunks.
``_prepare_queries`` centres and scales the queries of ``exact_knn`` once for all tiles.
``_rerank_part`` computes the exact keys of every query's candidate rows (``rerank``), which
``_merge_part`` then cuts to the best k.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from distann.kernels.numba_cpu._arith import (
    _FAST,
    _ROWS,
    _direct_rows,
    _direct_topk,
    _kernel_6x2,
    _prepare_query,
    _prepare_rows,
)
from distann.kernels.numba_cpu._selection import (
    _SMALL_K,
    _emit,
    _insert,
    _partial_select,
    _select,
    _sort_best_first,
)

_EXACT_QBLOCK = 60
"""Queries per tile in ``exact_knn`` (a multiple of ``_ROWS``)."""

_EXACT_XBLOCK = 512
"""Database rows centred at a time in ``exact_knn`` (512 x d float32 stays in L2)."""


@njit(cache=True, nogil=True)
def _coarse_part(p, nparts, xq, cent, Cc, cn, mu, nprobe, is_ip, direct, D, I):
    """Queries of part ``p``: every ``nparts``-th query (direct) or a run of ``_ROWS``-query
    blocks."""
    nq, d = xq.shape
    nl = cent.shape[0]
    noids = np.empty(0, dtype=np.int64)
    novalid = np.empty(0, dtype=np.uint8)
    hd = np.empty(nprobe, dtype=np.float32)
    hi = np.empty(nprobe, dtype=np.int64)
    sk = np.empty(nl + nprobe, dtype=np.float32)
    si = np.empty(nl + nprobe, dtype=np.int64)
    if direct:
        keys = np.empty(nl + 3, dtype=np.float32)
        for qi in range(p, nq, nparts):
            if nprobe <= _SMALL_K:
                cnt = _direct_topk(xq[qi], cent, 0, nl, is_ip, noids, True, novalid, False,
                                   nprobe, hd, hi, 0)
            else:
                _direct_rows(xq[qi], cent, 0, nl, is_ip, keys)
                cnt = _select(keys, keys, False, nl, noids, 0, True, novalid, False, nprobe,
                              hd, hi, 0, sk, si)
            _emit(hd, hi, cnt, np.float32(0.0), is_ip, D[qi], I[qi])
        return
    npad = Cc.shape[0]
    nblocks = (nq + _ROWS - 1) // _ROWS
    per = (nblocks + nparts - 1) // nparts
    QB = np.zeros((_ROWS, d), dtype=np.float32)
    qnb = np.zeros(_ROWS, dtype=np.float32)
    S = np.empty((_ROWS, npad), dtype=np.float32)
    for b in range(p * per, min((p + 1) * per, nblocks)):
        q0 = _ROWS * b
        nr = min(_ROWS, nq - q0)
        for r in range(_ROWS):
            if r < nr:
                qnb[r] = _prepare_query(xq[q0 + r], mu, is_ip, QB[r])
            else:
                QB[r, :] = 0.0
        _kernel_6x2(QB, Cc, npad, S)
        for r in range(nr):
            cnt = _select(S[r], cn, not is_ip, nl, noids, 0, True, novalid, False, nprobe, hd, hi,
                          0, sk, si)
            _emit(hd, hi, cnt, qnb[r], is_ip, D[q0 + r], I[q0 + r])


@njit(cache=True, nogil=True)
def _merge_part(p, nparts, D, I, k, is_ip, Do, Io):
    """Rows p, p + nparts, ... of ``merge_topk`` (entries with id < 0 are padding)."""
    nq, m = D.shape
    hd = np.empty(k, dtype=np.float32)
    hi = np.empty(k, dtype=np.int64)
    sk = np.empty(m, dtype=np.float32)
    si = np.empty(m, dtype=np.int64)
    for qi in range(p, nq, nparts):
        cnt = 0
        if k <= _SMALL_K:
            for u in range(m):
                idx = I[qi, u]
                if idx >= 0:
                    cnt = _insert(hd, hi, cnt, k, -D[qi, u] if is_ip else D[qi, u], idx)
        else:
            for u in range(m):
                idx = I[qi, u]
                if idx >= 0:
                    sk[cnt] = -D[qi, u] if is_ip else D[qi, u]
                    si[cnt] = idx
                    cnt += 1
            if cnt > k:
                _partial_select(sk, si, cnt, k)
                cnt = k
            _sort_best_first(sk, si, cnt)
            for u in range(cnt):
                hd[u] = sk[u]
                hi[u] = si[u]
        for u in range(cnt):
            Do[qi, u] = -hd[u] if is_ip else hd[u]
            Io[qi, u] = hi[u]


@njit(cache=True)
def _prepare_queries(xq, mu, is_ip, Qs, qn):
    """Scaled, centred query rows for the micro-kernel (see ``_prepare_query``) and their
    ``||q - mu||^2``."""
    for qi in range(xq.shape[0]):
        qn[qi] = _prepare_query(xq[qi], mu, is_ip, Qs[qi])


@njit(cache=True, nogil=True)
def _exact_part(p, nparts, ntiles, nch, chunk, qbs, direct, xq, Qs, qn, xb, ids, mu, k, is_ip,
                PD, PI):
    """Tiles p, p + nparts, ... of ``exact_knn``."""
    for tile in range(p, ntiles, nparts):
        _exact_tile(tile, nch, chunk, qbs, direct, xq, Qs, qn, xb, ids, mu, k, is_ip, PD, PI)


@njit(cache=True)
def _exact_tile(tile, nch, chunk, qbs, direct, xq, Qs, qn, xb, ids, mu, k, is_ip, PD, PI):
    """Tile = (query block, database chunk): its partial top-k into ``PD[q, chunk]``."""
    nq, d = xq.shape
    N = xb.shape[0]
    b = tile // nch
    c = tile - b * nch
    qa = b * qbs
    qz = min(nq, qa + qbs)
    xa = c * chunk
    xz = min(N, xa + chunk)
    if qa >= qz or xa >= xz:
        return
    novalid = np.empty(0, dtype=np.uint8)
    hd = np.empty((qz - qa, k), dtype=np.float32)
    hi = np.empty((qz - qa, k), dtype=np.int64)
    cnt = np.zeros(qz - qa, dtype=np.int64)
    sk = np.empty(_EXACT_XBLOCK + k, dtype=np.float32)
    si = np.empty(_EXACT_XBLOCK + k, dtype=np.int64)
    if direct:
        keys = np.empty(_EXACT_XBLOCK + 3, dtype=np.float32)
        for x0 in range(xa, xz, _EXACT_XBLOCK):
            nx = min(_EXACT_XBLOCK, xz - x0)
            for qi in range(qa, qz):
                r = qi - qa
                if k <= _SMALL_K:
                    cnt[r] = _direct_topk(xq[qi], xb, x0, nx, is_ip, ids, False, novalid, False,
                                          k, hd[r], hi[r], cnt[r])
                    continue
                _direct_rows(xq[qi], xb, x0, nx, is_ip, keys)
                cnt[r] = _select(keys, keys, False, nx, ids, x0, False, novalid, False, k,
                                 hd[r], hi[r], cnt[r], sk, si)
        for qi in range(qa, qz):
            r = qi - qa
            _emit(hd[r], hi[r], cnt[r], np.float32(0.0), is_ip, PD[qi, c], PI[qi, c])
        return
    Xc = np.empty((_EXACT_XBLOCK, d), dtype=np.float32)
    xn = np.empty(_EXACT_XBLOCK, dtype=np.float32)
    S = np.empty((_ROWS, _EXACT_XBLOCK), dtype=np.float32)
    QB = np.zeros((_ROWS, d), dtype=np.float32)
    for x0 in range(xa, xz, _EXACT_XBLOCK):
        nx = min(_EXACT_XBLOCK, xz - x0)
        npad = nx + (nx & 1)
        _prepare_rows(xb, x0, nx, mu, is_ip, Xc, xn)
        for q0 in range(qa, qz, _ROWS):
            nr = min(_ROWS, qz - q0)
            for r in range(_ROWS):
                for t in range(d):
                    QB[r, t] = Qs[q0 + r, t] if r < nr else 0.0
            _kernel_6x2(QB, Xc, npad, S)
            for r in range(nr):
                w = q0 + r - qa
                cnt[w] = _select(S[r], xn, not is_ip, nx, ids, x0, False, novalid, False, k,
                                 hd[w], hi[w], cnt[w], sk, si)
    for qi in range(qa, qz):
        r = qi - qa
        _emit(hd[r], hi[r], cnt[r], qn[qi], is_ip, PD[qi, c], PI[qi, c])


@njit(cache=True, nogil=True, fastmath=_FAST)
def _rerank_part(p, nparts, xq, xb, ids, cand, is_ip, Dc, Ic):
    """Rows p, p + nparts, ... of ``rerank``: for each candidate row of ``xb``, its exact
    distance (l2 by direct differences, ip the inner product) into ``Dc`` and its id into ``Ic``
    (-1 for no candidate: padding for ``_merge_part``). The reduction over d is vectorized;
    every candidate gets the same instruction sequence, so duplicates get identical distances."""
    nq, kc = cand.shape
    d = xq.shape[1]
    for qi in range(p, nq, nparts):
        q = xq[qi]
        for u in range(kc):
            r = cand[qi, u]
            if r < 0:
                Ic[qi, u] = -1
                continue
            x = xb[r]
            s = np.float32(0.0)
            if is_ip:
                for t in range(d):
                    s += q[t] * x[t]
            else:
                for t in range(d):
                    z = q[t] - x[t]
                    s += z * z
            Dc[qi, u] = s
            Ic[qi, u] = ids[r]
