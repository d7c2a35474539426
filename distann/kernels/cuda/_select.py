"""Top-k selection on the device: the best ``k`` (key, id) pairs of many segments of a key buffer.

CuPy has no top-k with indices (``cupy.argpartition`` sorts), so this is distann's own,
block-level like Faiss's BlockSelect, and written so Numba's CUDA simulator can run it (no
warp shuffles, only shared memory and ``syncthreads``):

1. one block per segment (grid-stride: a block takes segment ``b``, ``b + gridDim``, ...);
   each thread walks every ``blockDim``-th key of the segment and keeps its own best ``k`` in a
   sorted array in local memory; a key worse than the thread's current k-th is dropped after
   one comparison, so after the first few hundred keys almost every key costs one compare
   (its id is read only when the key could enter);
2. the block merges its threads' sorted lists in ``k`` rounds: every thread offers the head
   of its list, a shared-memory tree reduction (log2(blockDim) steps) picks the best offer,
   its owner advances. ``k * log2(blockDim)`` barriers per segment.

Keys are *minimized*; callers negate inner products. A NaN key or a negative id is never
selected (NaN marks filtered rows; id -1 is padding). Ties: smaller id first. Output rows are
padded with id -1 and +inf (or -inf when ``negate``, which also flips the written distances).

``k`` up to :data:`MAX_FUSED_K` uses the kernel (compiled per size bucket of ``k``, since the
per-thread arrays need a compile-time size); larger ``k`` sorts the segments on the device
(:func:`select_by_sort`, CuPy's / NumPy's ``lexsort``), slower but exact and unbounded.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32, int64

_BUCKETS = (16, 64, 256, 1024)
MAX_FUSED_K = _BUCKETS[-1]
_MAX_THREADS = 128
_EMPTY = np.iinfo(np.int64).max


@cuda.jit(device=True, inline=True)
def _better(ka, ia, kb, ib):
    return ka < kb or (ka == kb and ia < ib)


@functools.lru_cache(maxsize=None)
def _kernel(kmax: int):
    """The selection kernel with per-thread lists of ``kmax`` entries."""

    @cuda.jit
    def select(keys, seg_key, seg_len, ids, seg_id, out_row, k, negate, out_D, out_I):
        sk = cuda.shared.array(_MAX_THREADS, float32)
        si = cuda.shared.array(_MAX_THREADS, int64)
        st = cuda.shared.array(_MAX_THREADS, int32)
        lk = cuda.local.array(kmax, float32)
        li = cuda.local.array(kmax, int64)
        t = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        inf = float32(math.inf)
        pad = -inf if negate else inf
        for s in range(cuda.blockIdx.x, seg_len.shape[0], cuda.gridDim.x):
            n = 0
            kb = seg_key[s]
            ib = seg_id[s]
            for e in range(t, seg_len[s], nthreads):
                key = keys[kb + e]
                if key != key:  # NaN: a filtered row
                    continue
                if n == k and key > lk[k - 1]:
                    continue
                idv = ids[ib + e]
                if idv < 0:
                    continue
                if n < k:
                    pos = n
                    n += 1
                elif _better(key, idv, lk[k - 1], li[k - 1]):
                    pos = k - 1
                else:
                    continue
                while pos > 0 and _better(key, idv, lk[pos - 1], li[pos - 1]):
                    lk[pos] = lk[pos - 1]
                    li[pos] = li[pos - 1]
                    pos -= 1
                lk[pos] = key
                li[pos] = idv
            h = 0
            for r in range(k):
                if h < n:
                    sk[t] = lk[h]
                    si[t] = li[h]
                else:
                    sk[t] = inf
                    si[t] = _EMPTY
                st[t] = t
                cuda.syncthreads()
                stride = nthreads // 2
                while stride > 0:
                    if t < stride and _better(sk[t + stride], si[t + stride], sk[t], si[t]):
                        sk[t] = sk[t + stride]
                        si[t] = si[t + stride]
                        st[t] = st[t + stride]
                    cuda.syncthreads()
                    stride //= 2
                won = si[0] != _EMPTY  # the same for every thread of the block
                if t == 0:
                    o = out_row[s] * k + r
                    if won:
                        out_D[o] = -sk[0] if negate else sk[0]
                        out_I[o] = si[0]
                    else:  # every list exhausted: pad the rest of the row and stop
                        for rr in range(r, k):
                            out_D[out_row[s] * k + rr] = pad
                            out_I[out_row[s] * k + rr] = -1
                if won and st[0] == t:
                    h += 1
                cuda.syncthreads()
                if not won:
                    break

    return select


def _threads(rt, k: int, longest: int) -> int:
    """Threads per block: a power of two, fewer for large ``k`` (local memory per thread) and
    for short segments (merge rounds cost log2 of it)."""
    want = 128 if k <= 64 else 64 if k <= 256 else 32
    while want > 32 and want // 2 >= longest:
        want //= 2
    t = rt.threads(want)
    assert t & (t - 1) == 0 and t <= _MAX_THREADS
    return t


def select_segments(rt, keys, seg_key, seg_len, ids, seg_id, out_row, k: int, negate: bool, out_D, out_I,
                    longest: int) -> None:
    """Best ``k`` of each segment ``s`` (keys ``keys[seg_key[s] : seg_key[s] + seg_len[s]]``,
    the id of key ``e`` being ``ids[seg_id[s] + e]``) written to row ``out_row[s]`` of the flat
    ``out_D`` / ``out_I`` (``k`` entries a row). All arguments are device arrays of the runtime
    ``rt``; ``longest`` bounds ``seg_len`` (it sizes the blocks)."""
    nseg = int(seg_len.shape[0])
    if nseg == 0 or k == 0:
        return
    if k > MAX_FUSED_K:
        select_by_sort(rt, keys, seg_key, seg_len, ids, seg_id, out_row, k, negate, out_D, out_I)
        return
    kmax = next(b for b in _BUCKETS if b >= k)
    threads = _threads(rt, k, max(1, longest))
    grid = max(1, min(nseg, rt.max_grid))
    _kernel(kmax)[grid, threads, rt.kernel_stream()](keys, seg_key, seg_len, ids, seg_id, out_row, np.int64(k),
                                                     bool(negate), out_D, out_I)


def select_by_sort(rt, keys, seg_key, seg_len, ids, seg_id, out_row, k: int, negate: bool, out_D, out_I) -> None:
    """:func:`select_segments` for any ``k``, by a device lexsort of (segment, key, id)."""
    xp = rt.xp
    nseg = int(seg_len.shape[0])
    lens = seg_len.astype(xp.int64)
    total = int(lens.sum())
    pad = -np.inf if negate else np.inf
    rows = out_row.astype(xp.int64)
    out_D.reshape(-1, k)[rows] = pad
    out_I.reshape(-1, k)[rows] = -1
    if total == 0:
        return
    seg = xp.repeat(xp.arange(nseg, dtype=xp.int64), lens)
    starts = xp.cumsum(lens) - lens
    within = xp.arange(total, dtype=xp.int64) - starts[seg]
    key = keys[seg_key[seg] + within]
    idv = ids[seg_id[seg] + within]
    keep = (key == key) & (idv >= 0)
    seg, key, idv = seg[keep], key[keep], idv[keep]
    order = xp.argsort(idv, kind="stable")  # (segment, key, id) by stable sorts, least significant first
    order = order[xp.argsort(key[order], kind="stable")]
    order = order[xp.argsort(seg[order], kind="stable")]
    seg, key, idv = seg[order], key[order], idv[order]
    first = xp.searchsorted(seg, xp.arange(nseg, dtype=xp.int64))
    rank = xp.arange(len(seg), dtype=xp.int64) - first[seg]
    take = rank < k
    dest = rows[seg[take]] * k + rank[take]
    out_D[dest] = -key[take] if negate else key[take]
    out_I[dest] = idv[take]
