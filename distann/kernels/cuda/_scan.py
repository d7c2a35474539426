"""List-major scans on the device: the batch's lists (resident or streamed, ``_resident``) are
scanned in *work chunks* of consecutive (query, probe) pairs whose key buffer fits a share of
``distann.kernels.cuda.work-bytes``; each chunk is a distance kernel (``_distances``) and then
either the top-k selection (``_select``) or the range filter.

Peak device memory of a call: the queries, the resident or two streamed runs of lists, and
one work chunk (keys: 4 bytes per scanned vector; outputs: 12 bytes per pair and k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from distann.kernels._host import f16_table
from distann.kernels.cuda import _distances as dk
from distann.kernels.cuda._resident import list_chunks
from distann.kernels.cuda._select import select_segments


@dataclass
class Codec:
    """How the kernels read a batch's rows: Flat vectors, SQ codes or PQ codes."""

    mode: str  # "flat", "sq8", "fp16", "pq"
    scale: np.ndarray | None = None  # SQ8: (d,) float32
    base: np.ndarray | None = None  # SQ8: (d,) float64, vmin + scale / 2
    by_residual: bool = False
    codebooks: np.ndarray | None = None  # PQ (M, K, dsub) float32


@dataclass
class Batch:
    """A list-major batch (see ``distann.kernels.base``), host arrays, already validated."""

    xq: np.ndarray
    data: np.ndarray
    ids: np.ndarray
    list_offsets: np.ndarray
    centers: np.ndarray
    group_offsets: np.ndarray
    group_queries: np.ndarray
    group_slots: np.ndarray
    group_limits: np.ndarray
    valid: np.ndarray
    is_ip: bool


def _pair_lengths(b: Batch) -> tuple[np.ndarray, np.ndarray]:
    """(list of each pair, vectors each pair scans)."""
    nl = len(b.list_offsets) - 1
    plist = np.repeat(np.arange(nl, dtype=np.int64), np.diff(b.group_offsets))
    size = b.list_offsets[plist + 1] - b.list_offsets[plist]
    return plist, np.clip(b.group_limits, 0, size).astype(np.int64)


def _work_chunks(g0: int, g1: int, plen: np.ndarray, cap: int):
    """Consecutive pair ranges of ``[g0, g1)`` with at most ``cap`` keys (a longer pair alone)."""
    s = g0
    while s < g1:
        csum = np.cumsum(plen[s:g1])
        e = s + max(1, int(np.searchsorted(csum, cap, side="right")))
        yield s, e
        s = e


class _Device:
    """Per-call device state: queries, small tables, the runtime."""

    def __init__(self, rt, b: Batch, codec: Codec):
        self.rt, self.b, self.codec = rt, b, codec
        self.xq = rt.to_device(b.xq)
        self.empty_f32 = rt.empty((1,), np.float32)
        self.empty_off = rt.empty((1, 1), np.float32)
        if codec.mode == "fp16":
            self.tab = rt.to_device(f16_table())
        else:
            self.tab = self.empty_f32
        self.scale = rt.to_device(codec.scale) if codec.mode == "sq8" else self.empty_f32
        self.codebooks = rt.to_device(codec.codebooks) if codec.mode == "pq" else None

    @property
    def centre(self) -> bool:
        """Whether SQ l2 scans centre queries and decoded rows on the list's centroid."""
        return self.codec.mode in ("sq8", "fp16") and not self.b.is_ip

    def tables_of(self, chunk) -> "_Tables":
        """A list chunk's device tables, built once for all its work chunks: first rows of its
        lists; per-list decoding offsets and query shifts (SQ8 ``base (+ centroid)``, fp16 the
        centroid or zeros, minus the centroid when centring (l2); float64, rounded once); the
        lists' centroids for PQ."""
        c, b, rt = self.codec, self.b, self.rt
        j0, j1 = chunk.j0, min(chunk.j1, len(b.list_offsets) - 1)
        list_lo = rt.to_device(chunk.list_lo)
        if c.mode == "pq":
            return _Tables(list_lo, self.empty_off, self.empty_off,
                           rt.to_device(np.ascontiguousarray(b.centers[j0:j1], dtype=np.float32)))
        if c.mode == "flat":
            return _Tables(list_lo, self.empty_off, self.empty_off, self.empty_off)
        d = b.xq.shape[1]
        cent = b.centers[j0:j1].astype(np.float64)
        off = np.zeros((j1 - j0, d), dtype=np.float64)
        if c.mode == "sq8":
            off += c.base[None, :]
        if c.by_residual:
            off += cent
        if self.centre:
            off -= cent
        shift = rt.to_device(np.ascontiguousarray(b.centers[j0:j1], dtype=np.float32)) if self.centre \
            else self.empty_off
        return _Tables(list_lo, rt.to_device(np.ascontiguousarray(off, dtype=np.float32)), shift, self.empty_off)


class _Tables(NamedTuple):
    list_lo: object  # device (lists,) int64
    off: object  # device (lists, d) float32, or a placeholder
    shift: object
    centers: object  # PQ: device (lists, d) float32


class _Keys(NamedTuple):
    """A work chunk's key buffer, where each pair's keys start, and the pairs' queries (device)."""

    buf: object
    key0_d: object
    queries_d: object


def _keys_of_chunk(dev: _Device, chunk, g0: int, g1: int, plist: np.ndarray, plen: np.ndarray,
                   tables: _Tables) -> _Keys:
    """Run the distance kernel on pairs ``g0:g1`` of list chunk ``chunk``: the key buffer and
    where each pair's keys start."""
    rt, b, c = dev.rt, dev.b, dev.codec
    lens = plen[g0:g1]
    key0 = np.zeros(g1 - g0, dtype=np.int64)
    np.cumsum(lens[:-1], out=key0[1:])
    total = int(lens.sum())
    keys = _Keys(rt.empty((max(total, 1),), np.float32), rt.to_device(key0), rt.to_device(b.group_queries[g0:g1]))
    if total == 0:
        return keys
    data_d, _, valid_d = chunk.arrays
    local = plist[g0:g1] - chunk.j0
    lens_d = rt.to_device(lens)
    is_ip = bool(b.is_ip)
    d = b.xq.shape[1]
    stream = rt.kernel_stream()
    if c.mode == "pq":
        M, K, _ = c.codebooks.shape
        shared = M * K <= dk.SHARED_LUT_FLOATS
        grid = max(1, min(g1 - g0, rt.max_grid if shared else min(rt.max_grid, 1024)))
        scratch = rt.empty((1, 1) if shared else (grid, M * K), np.float32)
        dk.pq_kernel(shared)[grid, rt.threads(128), stream, (M * K * 4) if shared else 0](
            dev.xq, data_d, tables.centers, dev.codebooks, tables.list_lo, rt.to_device(local), keys.queries_d,
            lens_d, keys.key0_d, valid_d, bool(c.by_residual), is_ip, scratch, keys.buf)
        return keys
    # Flat / SQ tiles: up to TQ consecutive pairs of one list
    tq = rt.tile_pairs
    first_of_list = np.ones(g1 - g0, dtype=bool)
    first_of_list[1:] = local[1:] != local[:-1]
    run_start = np.maximum.accumulate(np.where(first_of_list, np.arange(g1 - g0), 0))
    tile_start = np.flatnonzero(first_of_list | ((np.arange(g1 - g0) - run_start) % tq == 0))
    tile_np = np.diff(np.append(tile_start, g1 - g0))
    mode = {"flat": dk.MODE_FLAT, "sq8": dk.MODE_SQ8, "fp16": dk.MODE_FP16}[c.mode]
    shared = tq * d <= dk.SHARED_LUT_FLOATS
    grid = max(1, min(len(tile_start), rt.max_grid if shared else min(rt.max_grid, 1024)))
    scratch = rt.empty((1, 1) if shared else (grid, tq * d), np.float32)
    dk.flat_kernel(mode, shared, tq)[grid, rt.threads(128), stream, (tq * d * 4) if shared else 0](
        dev.xq, data_d, tables.list_lo, rt.to_device(local[tile_start]), rt.to_device(tile_start.astype(np.int64)),
        rt.to_device(tile_np.astype(np.int64)), keys.queries_d, lens_d, keys.key0_d, valid_d, dev.scale,
        tables.off, dev.tab, tables.shift, dev.centre, is_ip, scratch, keys.buf)
    return keys


def _chunks(dev: _Device):
    """(list chunk, its pairs g0:g1, its tables) of the batch, lists on the device."""
    b = dev.b
    nl = len(b.list_offsets) - 1
    probed = np.diff(b.group_offsets) > 0
    transient = [b.valid] if b.valid.shape[0] else []
    for chunk in list_chunks(dev.rt, [b.data, b.ids], transient, b.list_offsets, probed):
        if len(chunk.arrays) == 2:
            chunk.arrays.append(dev.rt.to_device(np.zeros(0, np.uint8)))  # all rows valid
        yield chunk, int(b.group_offsets[chunk.j0]), int(b.group_offsets[min(chunk.j1, nl)]), dev.tables_of(chunk)


def knn_scan(rt, b: Batch, codec: Codec, k: int, D: np.ndarray, I: np.ndarray) -> None:
    """Per-(query, probe) top-``k`` of the batch into the host arrays ``D``/``I`` (nq, nprobe, k):
    only the slots of the batch's pairs are written."""
    dev = _Device(rt, b, codec)
    plist, plen = _pair_lengths(b)
    cap = max(1, rt.work_budget() // 2 // 4)
    for chunk, g0, g1, tables in _chunks(dev):
        ids_d = chunk.arrays[1]
        for s, e in _work_chunks(g0, g1, plen, cap):
            keys = _keys_of_chunk(dev, chunk, s, e, plist, plen, tables)
            n = e - s
            id0 = chunk.list_lo[plist[s:e] - chunk.j0]
            outD = rt.empty((n * k,), np.float32)
            outI = rt.empty((n * k,), np.int64)
            select_segments(rt, keys.buf, keys.key0_d, rt.to_device(plen[s:e]), ids_d, rt.to_device(id0),
                            rt.to_device(np.arange(n, dtype=np.int64)), k, b.is_ip, outD, outI,
                            int(plen[s:e].max(initial=0)))
            q, slot = b.group_queries[s:e], b.group_slots[s:e]
            D[q, slot] = rt.to_host(outD).reshape(n, k)
            I[q, slot] = rt.to_host(outI).reshape(n, k)


def range_scan(rt, b: Batch, codec: Codec, radius: float):
    """Every (query, key, id) of the batch within ``radius`` (keys: l2 distance or -ip), as
    host arrays, unsorted."""
    dev = _Device(rt, b, codec)
    xp = rt.xp
    plist, plen = _pair_lengths(b)
    cap = max(1, rt.work_budget() // 2 // 4)
    thr = np.float32(-radius if b.is_ip else radius)
    qs, keys, ids = [], [], []
    for chunk, g0, g1, tables in _chunks(dev):
        ids_d = chunk.arrays[1]
        for s, e in _work_chunks(g0, g1, plen, cap):
            kc = _keys_of_chunk(dev, chunk, s, e, plist, plen, tables)
            total = int(plen[s:e].sum())
            if total == 0:
                continue
            hit = xp.flatnonzero(kc.buf[:total] < thr)  # NaN (filtered) compares False
            if int(hit.shape[0]) == 0:
                continue
            pair = xp.searchsorted(kc.key0_d, hit, side="right") - 1
            row = tables.list_lo[rt.to_device(plist[s:e] - chunk.j0)[pair]] + hit - kc.key0_d[pair]
            qs.append(rt.to_host(kc.queries_d[pair]))
            keys.append(rt.to_host(kc.buf[hit]))
            ids.append(rt.to_host(ids_d[row]))
    cat = lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dt)  # noqa: E731
    return cat(qs, np.int64), cat(keys, np.float32), cat(ids, np.int64)
