"""Pure planning of a list-major search batch: invert (query, probe) pairs into per-list groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProbePlan:
    """The probed lists of a batch and, per list, the (query, probe slot, scan limit) pairs.

    Pairs of list ``lists[j]`` are ``group_offsets[j]:group_offsets[j+1]`` of the group arrays.
    """

    lists: np.ndarray
    group_offsets: np.ndarray
    group_queries: np.ndarray
    group_slots: np.ndarray
    group_limits: np.ndarray


def plan_probes(probes: np.ndarray, list_sizes: np.ndarray, max_codes: int | None = None) -> ProbePlan:
    """Group the pairs of ``probes`` (nq, nprobe), best probe first, by list.

    ``max_codes`` (Faiss semantics): a query scans its probes in order and stops once it has
    scanned that many vectors; the list that crosses the budget is scanned partially.
    Pairs left with nothing to scan (empty lists, exhausted budget) are dropped.
    """
    nq, nprobe = probes.shape
    lists = probes.reshape(-1).astype(np.int64)
    sizes = list_sizes[lists].reshape(nq, nprobe).astype(np.int64)
    if max_codes is not None:
        before = np.cumsum(sizes, axis=1) - sizes
        sizes = np.clip(max_codes - before, 0, sizes)
    limits = sizes.reshape(-1)
    keep = np.flatnonzero(limits > 0)
    lists, limits = lists[keep], limits[keep]
    queries, slots = np.divmod(keep, nprobe)
    order = np.argsort(lists, kind="stable")
    lists, limits, queries, slots = lists[order], limits[order], queries[order], slots[order]
    uniq, starts = np.unique(lists, return_index=True)
    offsets = np.append(starts, len(lists)).astype(np.int64)
    return ProbePlan(uniq.astype(np.int64), offsets, queries.astype(np.int64), slots.astype(np.int64),
                     limits.astype(np.int64))


def expand_to_all_lists(plan: ProbePlan, nlist: int) -> np.ndarray:
    """Group offsets over all ``nlist`` lists (empty groups for unprobed lists): used when the
    whole index is resident and every list sits at its global offset."""
    counts = np.zeros(nlist, dtype=np.int64)
    counts[plan.lists] = np.diff(plan.group_offsets)
    out = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def shard_runs(lists: np.ndarray, shard_starts: np.ndarray) -> list[tuple[int, int, int]]:
    """``(shard, a, b)`` for each run ``lists[a:b]`` (ascending list numbers) that falls in one
    shard, ``shard_starts`` being each shard's first list: how a batch's probed lists are cut
    into per-shard work (streamed reads locally, one task per shard on a cluster)."""
    if len(lists) == 0:
        return []
    shard_of = np.searchsorted(shard_starts, lists, side="right") - 1
    cuts = np.flatnonzero(np.diff(shard_of)) + 1
    starts = np.concatenate([[0], cuts]).astype(int)
    stops = np.concatenate([cuts, [len(lists)]]).astype(int)
    return [(int(shard_of[a]), int(a), int(b)) for a, b in zip(starts, stops)]
