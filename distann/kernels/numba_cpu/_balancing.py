"""Work balancing for the Numba CPU backend: which thread scans which lists of a batch.

``_plan_parts`` estimates the cost of each list of a batch (``_list_costs``: the micro-kernel
work of its probing pairs plus the centring copy) and, unless the whole batch is cheaper than
the serial threshold it is given, hands the lists to the parts by a greedy longest-first
balance (``_balance``), returned as CSR ``(ptr, items)``. The threshold and thread count are
arguments, not globals, so the Python wrappers (and the tests that patch them) decide.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from distann.kernels.numba_cpu._selection import _sort_pairs


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
