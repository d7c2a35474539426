"""Ordering and selection for the Numba CPU backend: the top-k machinery every kernel shares.

Entries are (key, id) pairs, smaller key first, then smaller id. ``_select`` merges a row of
keys into best-first sorted top-k arrays (a vectorized block-minima bound from
``_finish_keys``, a branch-free filter, then linear insertion for k <= ``_SMALL_K`` or
quickselect + sort above); ``_emit`` turns the sorted keys into output distances. The binary
max-heap here only backs the heap sort of long arrays (``_sort_pairs``), which
``distann.kernels.numba_cpu._balancing._balance`` also uses to order lists by cost.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_SMALL_K = 24
"""Up to this k, selected candidates are inserted one by one into the sorted top-k arrays;
above it they are gathered, cut to k by quickselect and sorted (insertion costs O(k))."""



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
