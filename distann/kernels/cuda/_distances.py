"""Numba-CUDA kernels writing the distances of a list scan into a key buffer.

A scan on the device is two kernels: these write, for every (query, probe) pair of a chunk,
the keys of the vectors the pair scans (``buf[pair_key[p] + v]`` for the pair's ``v``-th
vector; NaN for vectors the ``valid`` mask filters out); ``_select`` then keeps the best
``k`` per pair, or the range scan keeps the keys under the radius. Keys are minimized: the
squared l2 distance, or the negated inner product.

* :func:`flat_kernel` (Flat, SQ8, SQfp16): a block takes one *tile*, up to :data:`TQ` pairs of
  one list. The tile's queries are held in shared memory; each thread takes a vector of the
  list, decodes each component once (SQ: one FMA, or a table lookup for fp16, the list's
  centroid folded into a per-list offset) and accumulates it into :data:`TQ` distances kept
  in registers, so a vector read from memory serves every pair of the tile. l2 distances are
  direct differences ``sum (q - x)^2``: no norm trick, so no cancellation on offset data.
* :func:`pq_kernel`: a block takes one pair, builds its M x K lookup table in shared memory
  (l2: on ``q - c`` when the codes are residuals; ip: ``<q, c>`` added after), then each
  thread sums M table entries per code. Tables larger than the 48 KiB of static shared
  memory go to a global scratch slab per block (:func:`pq_kernel` with ``shared=False``).
* :func:`rerank_kernel`: exact distances of candidate rows (RFlat re-ranking).

Every kernel loops over its work items with a grid stride, so the launch size is bounded.
"""

from __future__ import annotations

import functools
import math

from numba import cuda, float32, int64

TQ = 8
"""Pairs per tile of the Flat / SQ kernel (distance accumulators per thread)."""

MODE_FLAT, MODE_SQ8, MODE_FP16 = 0, 1, 2
SHARED_LUT_FLOATS = 12288
"""Lookup-table entries (M * K) that fit the 48 KiB of static shared memory."""


@cuda.jit(device=True, inline=True)
def _load_flat(xb, row, c, j, scale, off, tab):
    return xb[row, c]


@cuda.jit(device=True, inline=True)
def _load_sq8(codes, row, c, j, scale, off, tab):
    return float32(codes[row, c]) * scale[c] + off[j, c]


@cuda.jit(device=True, inline=True)
def _load_fp16(codes, row, c, j, scale, off, tab):
    return tab[codes[row, c]] + off[j, c]


_LOADERS = {MODE_FLAT: _load_flat, MODE_SQ8: _load_sq8, MODE_FP16: _load_fp16}


def _flat_body(load, tq: int):
    """The tile loop of :func:`flat_kernel` for one row loader, ``sq`` the tile's query slab."""

    @cuda.jit(device=True)
    def body(sq, xq, data, list_lo, tile_list, tile_p0, tile_np, pair_query, pair_len, pair_key, valid,
             scale, off, tab, shift, centre, is_ip, buf):
        acc = cuda.local.array(tq, float32)
        t = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        d = xq.shape[1]
        has_valid = valid.shape[0] > 0
        nan = float32(math.nan)
        for tile in range(cuda.blockIdx.x, tile_list.shape[0], cuda.gridDim.x):
            j = tile_list[tile]
            p0 = tile_p0[tile]
            npairs = tile_np[tile]
            for e in range(t, tq * d, nthreads):
                qq = e // d
                c = e - qq * d
                if qq < npairs:
                    sq[e] = xq[pair_query[p0 + qq], c] - shift[j, c] if centre else xq[pair_query[p0 + qq], c]
                else:
                    sq[e] = float32(0.0)
            longest = 0
            for qq in range(npairs):
                longest = max(longest, pair_len[p0 + qq])
            cuda.syncthreads()
            lo = list_lo[j]
            for v in range(t, longest, nthreads):
                row = lo + v
                for qq in range(tq):
                    acc[qq] = float32(0.0)
                for c in range(d):
                    x = load(data, row, c, j, scale, off, tab)
                    for qq in range(tq):
                        if is_ip:
                            acc[qq] += sq[qq * d + c] * x
                        else:
                            diff = sq[qq * d + c] - x
                            acc[qq] += diff * diff
                ok = (not has_valid) or valid[row] != 0
                for qq in range(npairs):
                    p = p0 + qq
                    if v < pair_len[p]:
                        buf[pair_key[p] + v] = (-acc[qq] if is_ip else acc[qq]) if ok else nan
            cuda.syncthreads()

    return body


@functools.lru_cache(maxsize=None)
def flat_kernel(mode: int, shared: bool, tq: int = TQ):
    """The tile kernel for Flat (``mode`` 0), SQ8 (1) or SQfp16 (2) lists.

    Arguments: ``xq`` (nq, d) float32; ``data`` the lists' rows (float32 vectors, uint8 or
    uint16 codes); ``list_lo`` first row of each list of the chunk; per tile ``tile_list``,
    ``tile_p0`` (first pair), ``tile_np`` (pairs, <= TQ); per pair ``pair_query``, ``pair_len``
    (vectors scanned), ``pair_key`` (first buffer entry); ``valid`` uint8 per row (empty: all);
    ``scale`` (d,) and ``off`` (lists, d) the SQ decoding (x = code * scale + off[list]; fp16:
    ``tab[code] + off[list]``); ``tab`` the fp16 table; ``shift`` (lists, d) and ``centre``: when
    set, the queries are centred on ``shift[list]`` (the list's centroid; SQ l2, whose offsets
    then hold ``- centroid`` too, so large common offsets do not cost float32 precision);
    ``is_ip``; ``scratch``; ``buf`` the keys. ``tq`` pairs a tile (:data:`TQ`; fewer in the
    simulator). ``shared``: the tile's queries in dynamic shared memory (tq * d float32, up to
    48 KiB); else in ``scratch`` (gridDim, tq * d) in global memory (large d).
    """
    body = _flat_body(_LOADERS[mode], tq)
    if shared:
        @cuda.jit
        def kernel(xq, data, list_lo, tile_list, tile_p0, tile_np, pair_query, pair_len, pair_key, valid,
                   scale, off, tab, shift, centre, is_ip, scratch, buf):
            sq = cuda.shared.array(0, float32)
            body(sq, xq, data, list_lo, tile_list, tile_p0, tile_np, pair_query, pair_len, pair_key, valid,
                 scale, off, tab, shift, centre, is_ip, buf)
    else:
        @cuda.jit
        def kernel(xq, data, list_lo, tile_list, tile_p0, tile_np, pair_query, pair_len, pair_key, valid,
                   scale, off, tab, shift, centre, is_ip, scratch, buf):
            body(scratch[cuda.blockIdx.x], xq, data, list_lo, tile_list, tile_p0, tile_np, pair_query, pair_len,
                 pair_key, valid, scale, off, tab, shift, centre, is_ip, buf)
    return kernel


@cuda.jit(device=True, inline=True)
def _pq_pair(lut, xq, codes, centers, codebooks, list_lo, pair_list, pair_query, pair_len, pair_key, valid,
             by_residual, is_ip, buf, p):
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    M, K, dsub = codebooks.shape
    q = pair_query[p]
    j = pair_list[p]
    for e in range(t, M * K, nthreads):
        m = e // K
        code = e - m * K
        s = float32(0.0)
        for u in range(dsub):
            qv = xq[q, m * dsub + u]
            if is_ip:
                s += qv * codebooks[m, code, u]
            else:
                if by_residual:
                    qv -= centers[j, m * dsub + u]
                diff = qv - codebooks[m, code, u]
                s += diff * diff
        lut[e] = s
    qc = float32(0.0)
    if is_ip and by_residual:
        for c in range(xq.shape[1]):
            qc += xq[q, c] * centers[j, c]
    cuda.syncthreads()
    lo = list_lo[j]
    has_valid = valid.shape[0] > 0
    for v in range(t, pair_len[p], nthreads):
        row = lo + v
        s = float32(0.0)
        for m in range(M):
            s += lut[m * K + int64(codes[row, m])]
        if has_valid and valid[row] == 0:
            buf[pair_key[p] + v] = float32(math.nan)
        else:
            buf[pair_key[p] + v] = -(s + qc) if is_ip else s
    cuda.syncthreads()


@functools.lru_cache(maxsize=None)
def pq_kernel(shared: bool):
    """ADC scan, one pair per block (grid stride over pairs). ``shared``: the lookup table in
    dynamic shared memory (M * K float32); else in ``scratch`` (gridDim, M * K) in global memory.
    ``centers`` are the chunk's lists' centroids, ``pair_list`` indexes them and ``list_lo``."""
    if shared:
        @cuda.jit
        def kernel(xq, codes, centers, codebooks, list_lo, pair_list, pair_query, pair_len, pair_key, valid,
                   by_residual, is_ip, scratch, buf):
            lut = cuda.shared.array(0, float32)
            for p in range(cuda.blockIdx.x, pair_list.shape[0], cuda.gridDim.x):
                _pq_pair(lut, xq, codes, centers, codebooks, list_lo, pair_list, pair_query, pair_len, pair_key,
                         valid, by_residual, is_ip, buf, p)
    else:
        @cuda.jit
        def kernel(xq, codes, centers, codebooks, list_lo, pair_list, pair_query, pair_len, pair_key, valid,
                   by_residual, is_ip, scratch, buf):
            lut = scratch[cuda.blockIdx.x]
            for p in range(cuda.blockIdx.x, pair_list.shape[0], cuda.gridDim.x):
                _pq_pair(lut, xq, codes, centers, codebooks, list_lo, pair_list, pair_query, pair_len, pair_key,
                         valid, by_residual, is_ip, buf, p)
    return kernel


@cuda.jit
def rerank_kernel(xq, xb, cand, is_ip, buf):
    """``buf[q, e]`` = key of candidate row ``cand[q, e]`` of ``xb`` for query ``q`` (NaN for -1),
    by direct differences in float32; one query per block, grid stride."""
    t = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    d = xq.shape[1]
    for q in range(cuda.blockIdx.x, cand.shape[0], cuda.gridDim.x):
        for e in range(t, cand.shape[1], nthreads):
            row = cand[q, e]
            if row < 0:
                buf[q, e] = float32(math.nan)
                continue
            s = float32(0.0)
            for c in range(d):
                if is_ip:
                    s += xq[q, c] * xb[row, c]
                else:
                    diff = xq[q, c] - xb[row, c]
                    s += diff * diff
            buf[q, e] = -s if is_ip else s
