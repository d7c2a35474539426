"""The worker side of cluster-hosted search: shards resident in a worker's memory, and the
task that scans one of them for one batch of queries.

A :class:`ResidentShard` is the *result* of a Dask task (:func:`load_shard`) that reads the
shard from the store, so the scheduler can compute it again, from the same task, on another
worker when the worker holding it dies (lineage). Nothing here keeps state outside Dask's
own data: a shard is a key in a worker's memory like any other task result.

:func:`scan_shard` runs the same engine as local search (``search.engine``) on the probes of
that shard only and returns a *compact* partial result: at most ``k`` per query that probed
the shard (``k_factor * k`` candidates for RFlat, with their exact distances), or the range
results of those queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from distann.codecs.metric import kernel_metric
from distann.codecs.pipeline import CodecPipeline
from distann.kernels import get_backend
from distann.search import engine
from distann.store.arrays import CheckedStore, StoredArray
from distann.store.location import Location
from distann.store.manifest import Manifest
from distann.store.shards import ShardReader
from distann.validation import ids_mask


@dataclass(frozen=True)
class ResidentShard:
    """One shard's lists in memory, as stored, with what scanning them needs: the coarse
    centroids of its lists (IVF space, and the original space for RFlat range search) and the
    codec."""

    name: str
    index: int
    list_start: int
    block: engine.ListBlock
    centers: np.ndarray
    raw_centers: np.ndarray | None
    codec: CodecPipeline

    @property
    def nbytes(self) -> int:
        return self.block.nbytes + self.block.offsets.nbytes + self.centers.nbytes

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        return self.nbytes


def load_shard(loc: Location, manifest: Manifest, s: int) -> ResidentShard:
    """Read shard ``s`` of the committed index (checked against its manifest entry)."""
    return load_shards(loc, manifest, s, s + 1, name=manifest.shards[s].name, index=s)


def load_shards(loc: Location, manifest: Manifest, s0: int, s1: int, *, name: str, index: int) -> ResidentShard:
    """Read shards ``[s0, s1)`` (consecutive, so their lists are one list range) as one block."""
    from distann.search.index import raw_centers, read_codec

    store = CheckedStore(loc.zarr_store(read_only=True), loc.url, strict=manifest.stores_every_chunk)
    entries = manifest.shards[s0:s1]
    l0, l1 = entries[0].list_start, entries[-1].list_stop
    codec = read_codec(store, manifest, loc.url)
    list_sizes = StoredArray(store, manifest.list_sizes).read(l0, l1).astype(np.int64)
    parts = [ShardReader(store, e, list_sizes[e.list_start - l0:e.list_stop - l0], raw=codec.refine).read_all()
             for e in entries]
    centers = np.ascontiguousarray(StoredArray(store, manifest.centroids).read(l0, l1), dtype=np.float32)
    offsets = np.zeros(l1 - l0 + 1, dtype=np.int64)
    np.cumsum(list_sizes, out=offsets[1:])
    one = len(parts) == 1
    codes = parts[0].codes if one else np.concatenate([p.codes for p in parts])
    ids = parts[0].ids if one else np.concatenate([p.ids for p in parts])
    raw = None if not codec.refine else parts[0].raw if one else np.concatenate([p.raw for p in parts])
    block = engine.ListBlock(np.arange(l0, l1, dtype=np.int64), offsets, np.ascontiguousarray(codes),
                             np.ascontiguousarray(ids), raw)
    return ResidentShard(name, index, l0, block, centers, raw_centers(codec, centers), codec)


@dataclass(frozen=True)
class ShardProbes:
    """The probes of one batch that fall in one shard, relative to the shard.

    ``queries`` are the batch rows that probe the shard (ascending); the pairs of the shard's
    list ``list_start + j`` are ``group_offsets[j]:group_offsets[j+1]``, with ``group_queries``
    indexing ``queries`` and ``group_slots`` numbering each query's probes in this shard
    (``0 .. nprobe - 1``)."""

    queries: np.ndarray
    group_offsets: np.ndarray
    group_queries: np.ndarray
    group_slots: np.ndarray
    group_limits: np.ndarray
    nprobe: int

    @property
    def npairs(self) -> int:
        return len(self.group_queries)


@dataclass(frozen=True)
class ShardResult:
    """A shard's compact answer for the queries ``queries`` of a batch.

    kNN: ``D``/``I`` (nq_s, k'); for RFlat ``I`` holds the candidates' row positions in the
    shard and ``ids`` / ``exact`` their ids and exact distances. Range: ``lims`` (nq_s + 1,)
    and ``D``/``I`` flat. ``seconds``: time the worker spent scanning."""

    shard: int
    queries: np.ndarray
    D: np.ndarray
    I: np.ndarray
    seconds: float
    ids: np.ndarray | None = None
    exact: np.ndarray | None = None
    lims: np.ndarray | None = None


def _inputs(shard: ResidentShard, batch: tuple, probes: ShardProbes, allowed):
    xq, xq_raw = batch
    q = np.ascontiguousarray(xq[probes.queries])
    q_raw = np.ascontiguousarray(xq_raw[probes.queries]) if shard.codec.refine else None
    valid = ids_mask(shard.block.ids, allowed)
    eprobes = engine.Probes(probes.group_offsets, probes.group_queries, probes.group_slots, probes.group_limits)
    return q, q_raw, valid, eprobes


def scan_shard(shard: ResidentShard, batch: tuple, probes: ShardProbes, k: int, k_factor: int, allowed,
               backend: str) -> ShardResult:
    """kNN of the batch rows ``probes.queries`` among this shard's probed lists: the best ``k``
    per query, or, for RFlat, the best ``k_factor * k`` candidates by the codec's distance with
    their exact distances (the coordinator picks the global candidates as local search does)."""
    t0 = time.perf_counter()
    kern = get_backend(backend)
    q, q_raw, valid, eprobes = _inputs(shard, batch, probes, allowed)
    codec, block, nq = shard.codec, shard.block, len(probes.queries)
    kmetric = kernel_metric(codec.metric)
    if not codec.refine:
        D, I = engine.knn(kern, codec, q, block, shard.centers, eprobes, valid, probes.nprobe, k)
        return ShardResult(shard.index, probes.queries, D, I, time.perf_counter() - t0)
    kc = k * k_factor
    positions = np.arange(len(block.ids), dtype=np.int64)
    Dp, Pp = engine.scan(kern, codec, q, block, shard.centers, eprobes, valid, probes.nprobe, kc, ids=positions)
    D, P = kern.merge_topk(Dp.reshape(nq, -1), Pp.reshape(nq, -1), kc, kmetric)
    # exact distances of the same candidates, aligned with P (rerank returns them sorted by exact distance)
    Dx, Ix = kern.rerank(q_raw, block.raw, positions, P, kc, kmetric)
    # the same candidate set in both (padding -1 included): sorted by position they line up
    ox = np.argsort(Ix, axis=1)
    exact = np.empty_like(Dx)
    np.put_along_axis(exact, np.argsort(P, axis=1), np.take_along_axis(Dx, ox, axis=1), axis=1)
    ids = np.where(P >= 0, block.ids[np.maximum(P, 0)], -1)
    return ShardResult(shard.index, probes.queries, D, P, time.perf_counter() - t0, ids=ids, exact=exact)


def range_shard(shard: ResidentShard, batch: tuple, probes: ShardProbes, radius: float, allowed,
                backend: str) -> ShardResult:
    """Range search of the batch rows ``probes.queries`` among this shard's probed lists."""
    t0 = time.perf_counter()
    kern = get_backend(backend)
    q, q_raw, valid, eprobes = _inputs(shard, batch, probes, allowed)
    lims, D, I = engine.range_search(kern, shard.codec, q, shard.block, shard.centers, eprobes, valid, radius,
                                     xq_raw=q_raw, raw_centers=shard.raw_centers)
    return ShardResult(shard.index, probes.queries, D, I, time.perf_counter() - t0, lims=lims)


def batch_queries(xq: np.ndarray, xq_raw: np.ndarray | None) -> tuple:
    """The task that holds a batch's queries on the cluster (computed, not scattered, so a
    worker that dies with it does not lose it: the scheduler runs this task again)."""
    return xq, xq_raw if xq_raw is not None else xq
