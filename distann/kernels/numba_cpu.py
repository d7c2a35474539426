"""Numba CPU kernels: the fast CPU backend (``name = "numba"``).

Signatures and conventions are those of ``distann.kernels.base``; ``distann.kernels.reference``
is the truth these kernels are tested against (``tests/test_kernels.py``).

How the work is done
--------------------
* Inner products come from a register-blocked micro-kernel written in Numba
  (``_kernel_6x2``: 6 query rows x 2 database rows per step, LLVM vectorizing the reduction
  over d). About 55 GFLOP/s per core on this machine's shapes (d = 64), close to OpenBLAS
  sgemm on the same skinny blocks, but it needs no SciPy, cannot oversubscribe the cores with
  BLAS threads, and computes every (query, vector) entry with the same instruction sequence
  wherever it sits in a block, so duplicate vectors get bit-identical distances and their ties
  are broken by id deterministically.
* ``scan_lists`` is list-major: each list of the batch is centred on its centroid once
  (x' = x - c, ||x'||^2), its (query, probe) pairs are taken six at a time (q' = q - c), the
  (6 x n) block of ``-2 <q', x'>`` comes from the micro-kernel and each row is ranked on
  ``||x'||^2 - 2 <q', x'>``; ``||q'||^2`` is added to the k survivors only (clamped at 0).
  Lists probed by at most ``_DIRECT_MAX_ROWS`` pairs (single queries, small batches) skip the
  centring copy and compute ``||q - x||^2`` by direct differences.
* Top-k selection (``_select``): a vectorized pass bounds the k-th best key by the largest of
  the minima of k disjoint blocks, a branch-free pass keeps the few percent of candidates
  under that bound, and those are inserted into a sorted array of size k. Ties: smaller id.
* Threads: each kernel is a ``nogil`` Numba function over a *part* of the work; parts run on
  a small thread pool, one per thread (``numba.get_num_threads()``). Lists are assigned to
  parts by a greedy longest-first balance of their cost. Calls below ``_SERIAL_WORK``
  multiply-adds (a single query) stay in the calling thread. Numba's ``parallel=True`` would
  do the same but multiplies the compile time.
* Metrics are a runtime flag, not a compile-time specialization, so each kernel compiles once
  (``cache=True``).

Inputs are expected finite: NaN keys are never selected.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from distann.errors import ValidationError

name = "numba"

_DIRECT_MAX_ROWS = 3
"""A list (or ``coarse_quantize`` / ``exact_knn`` call) with at most this many query rows uses
the direct-difference loop instead of the centred micro-kernel path (no O(n d) centring copy)."""

_SMALL_K = 24
"""Up to this k, selected candidates are inserted one by one into the sorted top-k arrays;
above it they are gathered, cut to k by quickselect and sorted (insertion costs O(k))."""

_ROWS = 6
"""Query rows per micro-kernel call (``_kernel_6x2``)."""

_EXACT_QBLOCK = 60
"""Queries per tile in ``exact_knn`` (a multiple of ``_ROWS``)."""

_EXACT_XBLOCK = 512
"""Database rows centred at a time in ``exact_knn`` (512 x d float32 stays in L2)."""

# Flags for the arithmetic loops: reassociation lets LLVM vectorize the reductions over d and
# contraction gives FMAs. No nnan/ninf: padding and user data may contain infinities.
_FAST = {"reassoc", "contract", "nsz"}


# --------------------------------------------------------------------------------------------
# Ordering and selection. Entries are (key, id) pairs, smaller key first, then smaller id.
# The binary max-heap below only backs the heap sort of long arrays (``_sort_pairs``).
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _worse(d1: float, i1: int, d2: float, i2: int) -> bool:
    """True when (d1, i1) ranks after (d2, i2): larger key, or equal key and larger id."""
    return d1 > d2 or (d1 == d2 and i1 > i2)


@njit(cache=True)
def _sift_down(hd, hi, pos, n):
    dv = hd[pos]
    iv = hi[pos]
    while True:
        c = 2 * pos + 1
        if c >= n:
            break
        if c + 1 < n and _worse(hd[c + 1], hi[c + 1], hd[c], hi[c]):
            c += 1
        if _worse(hd[c], hi[c], dv, iv):
            hd[pos] = hd[c]
            hi[pos] = hi[c]
            pos = c
        else:
            break
    hd[pos] = dv
    hi[pos] = iv


@njit(cache=True)
def _heap_push(hd, hi, cnt, k, key, idx):
    """Offer (key, idx) to a heap holding ``cnt`` of at most ``k`` entries; returns the new count."""
    if cnt < k:
        pos = cnt
        while pos > 0:
            parent = (pos - 1) >> 1
            if _worse(key, idx, hd[parent], hi[parent]):
                hd[pos] = hd[parent]
                hi[pos] = hi[parent]
                pos = parent
            else:
                break
        hd[pos] = key
        hi[pos] = idx
        return cnt + 1
    if _worse(hd[0], hi[0], key, idx):
        hd[0] = key
        hi[0] = idx
        _sift_down(hd, hi, 0, k)
    return cnt


@njit(cache=True)
def _heap_sort(hd, hi, cnt):
    """Sort a heap of ``cnt`` entries in place, best first."""
    n = cnt
    while n > 1:
        n -= 1
        dv = hd[n]
        iv = hi[n]
        hd[n] = hd[0]
        hi[n] = hi[0]
        hd[0] = dv
        hi[0] = iv
        _sift_down(hd, hi, 0, n)


@njit(cache=True)
def _insert(hd, hi, cnt, k, key, idx):
    """Offer (key, idx) to the best-first sorted arrays ``hd``/``hi`` holding ``cnt`` <= k
    entries; returns the new count. Linear insertion: meant for small k (``_SMALL_K``)."""
    if cnt == k:
        if not _worse(hd[k - 1], hi[k - 1], key, idx):
            return cnt
        pos = k - 1
    else:
        pos = cnt
        cnt += 1
    while pos > 0 and _worse(hd[pos - 1], hi[pos - 1], key, idx):
        hd[pos] = hd[pos - 1]
        hi[pos] = hi[pos - 1]
        pos -= 1
    hd[pos] = key
    hi[pos] = idx
    return cnt


@njit(cache=True, fastmath={"nnan", "nsz", "reassoc"})
def _finish_keys(keys, xn, add_xn, lim, lo, valid, has_valid, nblk):
    """Finish the keys in place (``+= xn`` when ``add_xn``; +inf where not valid) and return
    the largest of the minima of ``nblk`` disjoint blocks of ``keys[:lim]``.

    Those nblk minima are nblk distinct entries, so the value returned bounds the nblk-th
    smallest key from above: a cheap, vectorized threshold for the selection.
    """
    inf = np.float32(np.inf)
    if add_xn:
        for u in range(lim):
            keys[u] += xn[u]
    if has_valid:
        for u in range(lim):
            if valid[lo + u] == 0:
                keys[u] = inf
    bound = -inf
    for b in range(nblk):
        m = inf
        for u in range(b * lim // nblk, (b + 1) * lim // nblk):
            x = keys[u]
            m = x if x < m else m
        bound = m if m > bound else bound
    return bound


@njit(cache=True)
def _sort_best_first(keys, idx, n):
    """Sort ``keys[:n]``/``idx[:n]`` by (key, idx) ascending: insertion sort up to 128
    entries (fewer mispredicted branches than a heap at these sizes), heap sort above."""
    if n > 128:
        _sort_pairs(keys, idx, n)
        return
    for u in range(1, n):
        dv = keys[u]
        iv = idx[u]
        w = u
        while w > 0 and (keys[w - 1] > dv or (keys[w - 1] == dv and idx[w - 1] > iv)):
            keys[w] = keys[w - 1]
            idx[w] = idx[w - 1]
            w -= 1
        keys[w] = dv
        idx[w] = iv


@njit(cache=True)
def _sort_pairs(keys, idx, n):
    """Sort ``keys[:n]`` / ``idx[:n]`` in place by (key, idx) ascending: in-place heapify by
    sift-up, then heap sort. O(n log n); reuses the heap code (no extra compilation)."""
    for u in range(1, n):
        _heap_push(keys, idx, u, n, keys[u], idx[u])
    _heap_sort(keys, idx, n)


@njit(cache=True)
def _less(d1, i1, d2, i2):
    return d1 < d2 or (d1 == d2 and i1 < i2)


@njit(cache=True)
def _swap(sk, si, a, b):
    tk = sk[a]
    sk[a] = sk[b]
    sk[b] = tk
    ti = si[a]
    si[a] = si[b]
    si[b] = ti


@njit(cache=True)
def _partial_select(sk, si, n, k):
    """Reorder ``sk[:n]``/``si[:n]`` so that the first k hold the k smallest (key, id) pairs,
    in any order (quickselect, median-of-three Hoare partition; expected O(n))."""
    lo = 0
    hi = n - 1
    target = k - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        if _less(sk[mid], si[mid], sk[lo], si[lo]):
            _swap(sk, si, lo, mid)
        if _less(sk[hi], si[hi], sk[lo], si[lo]):
            _swap(sk, si, lo, hi)
        if _less(sk[hi], si[hi], sk[mid], si[mid]):
            _swap(sk, si, mid, hi)
        pk = sk[mid]
        pi = si[mid]
        a = lo
        b = hi
        while a <= b:
            while _less(sk[a], si[a], pk, pi):
                a += 1
            while _less(pk, pi, sk[b], si[b]):
                b -= 1
            if a <= b:
                _swap(sk, si, a, b)
                a += 1
                b -= 1
        if target <= b:
            hi = b
        elif target >= a:
            lo = a
        else:
            break


@njit(cache=True)
def _select(keys, xn, add_xn, lim, ids, lo, use_index, valid, has_valid, k, hd, hi, cnt, sk, si):
    """Merge the best of ``keys[:lim]`` (plus ``xn`` when ``add_xn``) into the sorted top-k
    arrays ``hd``/``hi`` (``cnt`` entries); returns the new count.

    Ids are ``ids[lo + v]``, or ``lo + v`` when ``use_index``; entries with ``valid[lo + v]``
    == 0 are skipped when ``has_valid``. ``keys`` is overwritten; ``sk`` (float32) and ``si``
    (int64) are scratch of at least ``lim + k`` entries. A block-minima bound
    (``_finish_keys``) and the current k-th key filter the candidates branch-free, so only a
    few percent survive. Those are inserted one by one into the sorted arrays for small k, and
    for large k gathered with the current entries, cut to k by quickselect and sorted.
    NaN keys never qualify.
    """
    if lim <= 0:
        return cnt
    bound = _finish_keys(keys, xn, add_xn, lim, lo, valid, has_valid, min(k, lim))
    if cnt == k and hd[k - 1] < bound:
        bound = hd[k - 1]
    c = 0
    for u in range(lim):
        si[c] = u
        if keys[u] <= bound:
            c += 1
    if k <= _SMALL_K:
        for t in range(c):
            u = si[t]
            if has_valid and valid[lo + u] == 0:
                continue
            idx = lo + u if use_index else ids[lo + u]
            cnt = _insert(hd, hi, cnt, k, keys[u], idx)
        return cnt
    w = 0
    for t in range(c):  # gather in place: si[w] is written after si[t] (t >= w) is read
        u = si[t]
        if has_valid and valid[lo + u] == 0:
            continue
        sk[w] = keys[u]
        si[w] = lo + u if use_index else ids[lo + u]
        w += 1
    if w == 0:
        return cnt
    for t in range(cnt):
        sk[w] = hd[t]
        si[w] = hi[t]
        w += 1
    if w > k:
        _partial_select(sk, si, w, k)
        w = k
    _sort_best_first(sk, si, w)
    for t in range(w):
        hd[t] = sk[t]
        hi[t] = si[t]
    return w


@njit(cache=True)
def _emit(hd, hi, cnt, qn, is_ip, dout, iout):
    """Write sorted top-k entries as distances: ip ``-key``; l2 ``max(key + qn, 0)``.

    Adding ``qn`` (rounding, clamping) can create new ties, so the l2 output is re-sorted by
    (distance, id) with an insertion sort (already nearly sorted: O(cnt)).
    """
    zero = np.float32(0.0)
    for u in range(cnt):
        if is_ip:
            dout[u] = -hd[u]
        else:
            dout[u] = max(hd[u] + qn, zero)
        iout[u] = hi[u]
    if not is_ip:
        for u in range(1, cnt):
            dv = dout[u]
            iv = iout[u]
            w = u - 1
            while w >= 0 and (dout[w] > dv or (dout[w] == dv and iout[w] > iv)):
                dout[w + 1] = dout[w]
                iout[w + 1] = iout[w]
                w -= 1
            dout[w + 1] = dv
            iout[w + 1] = iv


# --------------------------------------------------------------------------------------------
# Arithmetic blocks
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Work balancing
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _balance(cost, nparts):
    """Greedy longest-first assignment of items with ``cost`` to ``nparts`` parts.

    Returns CSR ``(ptr, items)``: part p holds ``items[ptr[p]:ptr[p + 1]]``. Zero-cost items are
    dropped. O(n + m log m + m * nparts) for m items with work.
    """
    n = cost.shape[0]
    neg = np.empty(n, dtype=np.float32)
    order = np.empty(n, dtype=np.int64)
    nz = 0
    for j in range(n):  # only the lists with work are sorted (a single query: nprobe of them)
        if cost[j] > 0:
            neg[nz] = -cost[j]
            order[nz] = j
            nz += 1
    _sort_pairs(neg, order, nz)
    load = np.zeros(nparts, dtype=np.float64)
    owner = np.full(n, -1, dtype=np.int64)
    for t in range(nz):
        j = order[t]
        best = 0
        for p in range(1, nparts):
            if load[p] < load[best]:
                best = p
        owner[j] = best
        load[best] += cost[j]
    ptr = np.zeros(nparts + 1, dtype=np.int64)
    for j in range(n):
        if owner[j] >= 0:
            ptr[owner[j] + 1] += 1
    for p in range(nparts):
        ptr[p + 1] += ptr[p]
    fill = ptr[:nparts].copy()
    items = np.empty(ptr[nparts], dtype=np.int64)
    for t in range(nz):
        j = order[t]
        if owner[j] >= 0:
            items[fill[owner[j]]] = j
            fill[owner[j]] += 1
    return ptr, items


@njit(cache=True)
def _list_costs(list_offsets, group_offsets, d):
    nl = list_offsets.shape[0] - 1
    cost = np.zeros(nl, dtype=np.float64)
    for j in range(nl):
        n = list_offsets[j + 1] - list_offsets[j]
        m = group_offsets[j + 1] - group_offsets[j]
        if n > 0 and m > 0:
            cost[j] = float(m) * float(n) * float(d + 8) + float(n) * float(d)
    return cost


@njit(cache=True)
def _plan_parts(list_offsets, group_offsets, d, nthreads, serial_work):
    """Lists of the batch balanced over ``nthreads`` parts, or one part when the whole batch
    costs less than ``serial_work`` multiply-adds."""
    cost = _list_costs(list_offsets, group_offsets, d)
    return _balance(cost, 1 if cost.sum() < serial_work else nthreads)


# --------------------------------------------------------------------------------------------
# One list of a batch: shared by scan_lists (mode 0) and range_scan_lists (modes 1 and 2)
# --------------------------------------------------------------------------------------------

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
def _process_list(j, mode, xq, xb, ids, list_offsets, centers, group_offsets, group_queries,
                  group_slots, group_limits, valid, k, is_ip, D, I, radius, counts, starts, Dr, Ir):
    """Compute the keys of every pair of list ``j`` and hand each row to ``_consume``.

    Peak memory (per thread): the centred list, (n + 1) x d float32, ``_ROWS`` rows of n keys
    and 12 (n + k) bytes of selection scratch.
    """
    lo = list_offsets[j]
    n = list_offsets[j + 1] - lo
    g0 = group_offsets[j]
    g1 = group_offsets[j + 1]
    m = g1 - g0
    if m <= 0 or n <= 0:
        return
    d = xq.shape[1]
    has_valid = valid.shape[0] > 0
    nmax = 0
    for g in range(g0, g1):
        lim = min(max(group_limits[g], 0), n)
        if lim > nmax:
            nmax = lim
    if nmax == 0:
        return
    kk = max(k, 1)
    hd = np.empty(kk, dtype=np.float32)
    hi = np.empty(kk, dtype=np.int64)
    sk = np.empty(nmax + kk, dtype=np.float32)
    si = np.empty(nmax + kk, dtype=np.int64)
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


# --------------------------------------------------------------------------------------------
# coarse_quantize, merge_topk, exact_knn kernels
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Threads: the kernels release the GIL (nogil=True) and are run on a small thread pool, one
# part per thread. (Numba's parallel=True would do the same work but multiplies compile time:
# every prange body re-optimizes and re-generates the whole call tree it inlines.)
# --------------------------------------------------------------------------------------------

_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_POOL_LOCK = threading.Lock()

_SERIAL_WORK = 1 << 21
"""Below this many multiply-adds a call runs in the calling thread: handing work to a thread
costs tens of microseconds, more than a single query's scan."""


def _nthreads() -> int:
    """Threads used by the kernels: ``numba.get_num_threads()`` (``NUMBA_NUM_THREADS``,
    ``numba.set_num_threads``)."""
    return max(1, int(numba.get_num_threads()))


def _pool() -> ThreadPoolExecutor:
    """The process's kernel thread pool, created on first use (and anew in a forked child,
    whose copy of the parent's pool has no threads)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1)),
                                       thread_name_prefix="distann-kernels")
            _POOL_PID = os.getpid()
        return _POOL


def _parallel(fn, nparts: int, *args) -> None:
    """Run ``fn(p, nparts, *args)`` for p in range(nparts): part 0 in the calling thread, the
    others on the pool. ``fn`` must be a nogil kernel writing disjoint outputs."""
    if nparts <= 1:
        fn(0, 1, *args)
        return
    futures = [_pool().submit(fn, p, nparts, *args) for p in range(1, nparts)]
    try:
        fn(0, nparts, *args)
    finally:
        for f in futures:
            f.result()


def _check_metric(metric: str) -> bool:
    """Return True for "ip", False for "l2"; raise ValidationError otherwise."""
    if metric != "l2" and metric != "ip":
        raise ValidationError("metric", metric, "must be 'l2' or 'ip'")
    return metric == "ip"


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint8)


def _padded(shape: tuple[int, ...], is_ip: bool) -> tuple[np.ndarray, np.ndarray]:
    D = np.full(shape, -np.inf if is_ip else np.inf, dtype=np.float32)
    I = np.full(shape, -1, dtype=np.int64)
    return D, I


_NO_F32_1 = np.empty(0, dtype=np.float32)
_NO_I64_1 = np.empty(0, dtype=np.int64)
_NO_F32_3 = np.empty((0, 0, 0), dtype=np.float32)
_NO_I64_3 = np.empty((0, 0, 0), dtype=np.int64)


def _centre_of(rows: np.ndarray) -> np.ndarray:
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


def coarse_quantize(xq: np.ndarray, centroids: np.ndarray, nprobe: int,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-``nprobe`` centroids per query, (nq, nprobe), best first, ties by smaller index.

    nq <= 3: direct differences, no allocation beyond one row of nlist keys.
    Larger batches: micro-kernel on data centred near the centroids (l2); peak extra memory
    one centred copy of the centroids, (nlist + 1) x d float32, and 4 x nlist keys per thread.
    """
    is_ip = _check_metric(metric)
    xq = _f32(xq)
    centroids = _f32(centroids)
    nprobe = int(nprobe)
    nq, d = xq.shape
    nl = centroids.shape[0]
    D, I = _padded((nq, nprobe), is_ip)
    if nq == 0 or nprobe <= 0 or nl == 0:
        return D, I
    direct = nq <= _DIRECT_MAX_ROWS
    if direct:
        mu = np.zeros(d, dtype=np.float32)
        Cc = np.zeros((0, d), dtype=np.float32)
        cn = _NO_F32_1
    else:
        mu = np.zeros(d, dtype=np.float32) if is_ip else _centre_of(centroids)
        Cc = np.empty((nl + (nl & 1), d), dtype=np.float32)
        cn = np.empty(Cc.shape[0], dtype=np.float32)
        _prepare_rows(centroids, 0, nl, mu, is_ip, Cc, cn)
    work = nq * nl * d
    nparts = 1 if work < _SERIAL_WORK else min(_nthreads(), (nq + _ROWS - 1) // _ROWS)
    _parallel(_coarse_part, nparts, xq, centroids, Cc, cn, mu, nprobe, is_ip, direct, D, I)
    return D, I


def _batch_parts(list_offsets: np.ndarray, group_offsets: np.ndarray, d: int):
    """Lists of the batch balanced over the threads (one part when the batch is small)."""
    return _plan_parts(list_offsets, group_offsets, d, _nthreads(), float(_SERIAL_WORK))


def scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
               centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
               group_slots: np.ndarray, group_limits: np.ndarray, valid: np.ndarray,
               nprobe: int, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """List-major kNN scan of a batch: per-(query, probe) top-``k``, shape (nq, nprobe, k).

    Peak extra memory: the (nq, nprobe, k) outputs plus, per thread, one centred list
    ((n + 1) x d float32) and 4 x n keys.
    """
    is_ip = _check_metric(metric)
    nprobe = int(nprobe)
    k = int(k)
    D, I = _padded((xq.shape[0], nprobe, k), is_ip)
    if xq.shape[0] == 0 or nprobe <= 0 or k <= 0:
        return D, I
    xq, list_offsets, group_offsets = _f32(xq), _i64(list_offsets), _i64(group_offsets)
    ptr, items = _batch_parts(list_offsets, group_offsets, xq.shape[1])
    _parallel(_run_part, ptr.shape[0] - 1, ptr, items, _MODE_TOPK, xq, _f32(xb), _i64(ids),
              list_offsets, _f32(centers), group_offsets, _i64(group_queries),
              _i64(group_slots), _i64(group_limits), _u8(valid), k, is_ip, D, I, 0.0,
              _NO_I64_1, _NO_I64_1, _NO_F32_1, _NO_I64_1)
    return D, I


def merge_topk(D: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row of (nq, m) candidates, best first, ties by smaller id, padded.
    Entries with id -1 are padding and ignored. Peak extra memory: the outputs."""
    is_ip = _check_metric(metric)
    k = int(k)
    D = _f32(D)
    I = _i64(I)
    Do, Io = _padded((D.shape[0], k), is_ip)
    if D.shape[0] == 0 or k <= 0 or D.shape[1] == 0:
        return Do, Io
    nparts = 1 if D.size < (1 << 16) else _nthreads()
    _parallel(_merge_part, nparts, D, I, k, is_ip, Do, Io)
    return Do, Io


def range_scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                     centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
                     group_limits: np.ndarray, valid: np.ndarray, radius: float,
                     metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range search of a batch, ``(lims, D, I)`` in the Faiss convention, sorted best first.

    Two passes over the lists (count, then fill: distances are computed twice), then a
    per-query sort. Peak extra memory: the results plus two int64 per pair.
    """
    is_ip = _check_metric(metric)
    nq = xq.shape[0]
    xq, xb, ids = _f32(xq), _f32(xb), _i64(ids)
    list_offsets, centers = _i64(list_offsets), _f32(centers)
    group_offsets, group_queries = _i64(group_offsets), _i64(group_queries)
    group_limits, valid = _i64(group_limits), _u8(valid)
    npairs = group_queries.shape[0]
    if nq == 0 or npairs == 0:
        return np.zeros(nq + 1, dtype=np.int64), _NO_F32_1.copy(), _NO_I64_1.copy()
    group_slots = np.zeros(npairs, dtype=np.int64)
    radius = float(radius)
    ptr, items = _batch_parts(list_offsets, group_offsets, xq.shape[1])
    nparts = ptr.shape[0] - 1
    counts = np.zeros(npairs, dtype=np.int64)
    _parallel(_run_part, nparts, ptr, items, _MODE_COUNT, xq, xb, ids, list_offsets, centers,
              group_offsets, group_queries, group_slots, group_limits, valid, 1, is_ip,
              _NO_F32_3, _NO_I64_3, radius, counts, _NO_I64_1, _NO_F32_1, _NO_I64_1)
    lims, starts = _range_layout(group_queries, counts, nq)
    Dr = np.empty(lims[-1], dtype=np.float32)
    Ir = np.empty(lims[-1], dtype=np.int64)
    _parallel(_run_part, nparts, ptr, items, _MODE_FILL, xq, xb, ids, list_offsets, centers,
              group_offsets, group_queries, group_slots, group_limits, valid, 1, is_ip,
              _NO_F32_3, _NO_I64_3, radius, counts, starts, Dr, Ir)
    _parallel(_range_sort_part, min(nparts, nq), lims, Dr, Ir, is_ip)
    return lims, Dr, Ir


def exact_knn(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int,
              metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` of ``xq`` against ``xb`` (N, d) with ``ids``: (nq, k), padded.

    Work is cut in tiles (query block x database chunk), at least two per thread. nq <= 3:
    direct differences. Larger batches: 64-query blocks, the micro-kernel on data centred near
    ``xb`` (``_centre_of``, l2). Peak extra memory: per thread a 512 x d centred block;
    partial results chunks x nq x k (chunks = 1 once nq >= 128 x threads), a copy of ``xq``.
    """
    is_ip = _check_metric(metric)
    k = int(k)
    xq, xb, ids = _f32(xq), _f32(xb), _i64(ids)
    nq, d = xq.shape
    N = xb.shape[0]
    D, I = _padded((nq, k), is_ip)
    if nq == 0 or k <= 0 or N == 0:
        return D, I
    nthreads = 1 if nq * N * d < _SERIAL_WORK else _nthreads()
    direct = nq <= _DIRECT_MAX_ROWS
    qbs = nq if direct else _EXACT_QBLOCK
    nqb = (nq + qbs - 1) // qbs
    nch = max(1, min((2 * nthreads + nqb - 1) // nqb, (N + _EXACT_XBLOCK - 1) // _EXACT_XBLOCK))
    if nthreads == 1:
        nch = 1
    chunk = (N + nch - 1) // nch
    if direct or is_ip:
        mu = np.zeros(d, dtype=np.float32)
    else:
        mu = _centre_of(xb)
    Qs = np.zeros((0 if direct else nq, d), dtype=np.float32)
    qn = np.zeros(nq, dtype=np.float32)
    if not direct:
        _prepare_queries(xq, mu, is_ip, Qs, qn)
    if nch == 1:
        PD, PI = D.reshape(nq, 1, k), I.reshape(nq, 1, k)
    else:
        PD, PI = _padded((nq, nch, k), is_ip)
    ntiles = nqb * nch
    _parallel(_exact_part, min(nthreads, ntiles), ntiles, nch, chunk, qbs, direct, xq, Qs, qn,
              xb, ids, mu, k, is_ip, PD, PI)
    if nch > 1:
        _parallel(_merge_part, min(nthreads, nq), PD.reshape(nq, nch * k),
                  PI.reshape(nq, nch * k), k, is_ip, D, I)
    return D, I
