"""The search engine: one batch of queries against a block of inverted lists, for every codec.

This is the function local search, the cluster coordinator's worker tasks and big-batch search
all call; only who holds the lists and where the partial results are merged differ. Its
inputs are already prepared: queries transformed into the IVF space (and in the original space
for RFlat re-ranking), probes planned per list (``search.plan``), and the probed lists' rows
*as stored* (:class:`ListBlock`). The codec's scan strategy is chosen here:

* Flat: ``scan_lists`` on the float32 vectors (centred micro-kernel);
* SQ8 / SQfp16: ``scan_lists_sq``, which decodes list by list inside the kernel;
* PQ: ``scan_lists_pq``, asymmetric distances from a lookup table per (query, list);
* RFlat: the scan keeps the best ``k_factor * k`` candidates per query, which are re-ranked by
  exact distances to the stored raw vectors.

A kNN call returns at most ``k`` results per query, merged over all the block's lists: a block
holding one shard's lists gives that shard's compact partial result.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from distann.codecs.metric import kernel_metric
from distann.codecs.pipeline import CodecPipeline


@dataclass(frozen=True)
class ListBlock:
    """Inverted lists ``lists`` (ascending) as stored: list ``lists[i]`` is rows
    ``offsets[i]:offsets[i+1]`` of ``codes`` / ``ids`` / ``raw`` (``raw`` only for RFlat)."""

    lists: np.ndarray
    offsets: np.ndarray
    codes: np.ndarray
    ids: np.ndarray
    raw: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.ids.nbytes + (self.raw.nbytes if self.raw is not None else 0)

    def rows_of(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


@dataclass(frozen=True)
class Probes:
    """The (query, probe) pairs of a batch grouped by the lists of a block: the pairs of
    ``block.lists[i]`` are ``group_offsets[i]:group_offsets[i+1]`` (see ``search.plan``)."""

    group_offsets: np.ndarray
    group_queries: np.ndarray
    group_slots: np.ndarray
    group_limits: np.ndarray


def partials(nq: int, nprobe: int, k: int, kmetric: str) -> tuple[np.ndarray, np.ndarray]:
    """Empty per-(query, probe) results (nq, nprobe, k), padded, for :func:`scan`'s ``out``."""
    return (np.full((nq, nprobe, k), -np.inf if kmetric == "ip" else np.inf, dtype=np.float32),
            np.full((nq, nprobe, k), -1, dtype=np.int64))


def scan(kern: ModuleType, pipeline: CodecPipeline, xq: np.ndarray, block: ListBlock, centers: np.ndarray,
         probes: Probes, valid: np.ndarray, nprobe: int, k: int, *, ids: np.ndarray | None = None,
         out=None) -> tuple[np.ndarray, np.ndarray]:
    """The codec's list-major scan of the block: per-(query, probe) top-``k`` (nq, nprobe, k),
    into ``out`` when given (so the blocks of one batch, shard after shard, fill one output).
    ``ids`` replaces the block's ids in the results (RFlat asks for row positions)."""
    q = pipeline.quantizer
    kmetric = kernel_metric(pipeline.metric)
    ids = block.ids if ids is None else ids
    groups = (probes.group_offsets, probes.group_queries, probes.group_slots, probes.group_limits)
    if q.kind == "Flat":
        return kern.scan_lists(xq, block.codes, ids, block.offsets, centers, *groups, valid, nprobe, k, kmetric,
                               out=out)
    if q.kind == "PQ":
        return kern.scan_lists_pq(xq, block.codes, ids, block.offsets, centers, q.codebooks, q.by_residual,
                                  *groups, valid, nprobe, k, kmetric, out=out)
    return kern.scan_lists_sq(xq, block.codes, ids, block.offsets, centers, q.sq_kind,
                              getattr(q, "vmin", np.empty(0, np.float32)), getattr(q, "vdiff", np.empty(0, np.float32)),
                              q.by_residual, *groups, valid, nprobe, k, kmetric, out=out)


def knn(kern: ModuleType, pipeline: CodecPipeline, xq: np.ndarray, block: ListBlock, centers: np.ndarray,
        probes: Probes, valid: np.ndarray, nprobe: int, k: int, *, xq_raw: np.ndarray | None = None,
        k_factor: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best results of each query of the batch among the block's lists: ``(D, I)`` of
    shape (nq, k), best first, padded with id -1 and +inf (l2) / -inf (ip).

    ``centers`` are the coarse centroids of ``block.lists`` (IVF space). With RFlat, ``xq_raw``
    are the queries in the original space and ``k_factor * k`` candidates are re-ranked.
    Peak memory: the kernel's per-(query, probe) partial results, nq x nprobe x k' x 12 bytes.
    """
    kmetric = kernel_metric(pipeline.metric)
    nq = len(xq)
    if not pipeline.refine:
        Dp, Ip = scan(kern, pipeline, xq, block, centers, probes, valid, nprobe, k)
        return kern.merge_topk(Dp.reshape(nq, -1), Ip.reshape(nq, -1), k, kmetric)
    kc = k * k_factor
    positions = np.arange(len(block.ids), dtype=np.int64)  # candidates by row, to find their raw vectors
    Dp, Pp = scan(kern, pipeline, xq, block, centers, probes, valid, nprobe, kc, ids=positions)
    _, P = kern.merge_topk(Dp.reshape(nq, -1), Pp.reshape(nq, -1), kc, kmetric)
    return kern.rerank(xq_raw, block.raw, block.ids, P, k, kmetric)  # exact distances to the raw rows


def range_search(kern: ModuleType, pipeline: CodecPipeline, xq: np.ndarray, block: ListBlock, centers: np.ndarray,
                 probes: Probes, valid: np.ndarray, radius: float, *, xq_raw: np.ndarray | None = None,
                 raw_centers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every vector of the block's probed lists within ``radius`` (l2: squared distance below;
    ip/cosine: similarity above): ``(lims, D, I)`` in the Faiss convention, best first.

    Flat scans the vectors; RFlat indexes answer exactly from the raw vectors (``xq_raw``,
    ``raw_centers``: the lists' centroids mapped back to the original space, for centring);
    SQ and PQ decode the block's lists to float32 (peak memory: the block decoded) and scan the
    reconstructions, which is what their kNN distances are, up to float rounding.
    """
    kmetric = kernel_metric(pipeline.metric)
    args = (probes.group_offsets, probes.group_queries, probes.group_limits, valid, radius, kmetric)
    if pipeline.refine:
        return kern.range_scan_lists(xq_raw, block.raw, block.ids, block.offsets, raw_centers, *args)
    if pipeline.quantizer.kind == "Flat":
        return kern.range_scan_lists(xq, block.codes, block.ids, block.offsets, centers, *args)
    assign = np.repeat(np.arange(len(block.lists)), np.diff(block.offsets))
    vectors = pipeline.decode(block.codes, assign, centers)
    return kern.range_scan_lists(xq, np.ascontiguousarray(vectors), block.ids, block.offsets, centers, *args)
