"""Duplicate groups: exact-duplicate keys and connected components of the pair graph.

Exact duplicates are found by content: every row gets a 128-bit key (two 64-bit hashes of its
float32 bytes, -0.0 counted as 0.0), rows are partitioned by key across tasks, and rows sharing
a key form a group whose lowest row is kept for the ANN step. (Two different vectors share a key
with probability about n^2 / 2^129: never, in practice.)

Components are computed as *forests*: a forest is ``(nodes, roots)``, sorted node numbers and
the smallest node of each one's component. Each task turns its edges into a forest
(union-find, in Numba), and forests are merged pairwise on the workers (``cluster.tree_reduce``):
the merge of two forests is the forest of their (node, root) edges. Only nodes with at least one
edge appear; every other row is a group of its own.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_S1 = np.uint64(0x243F6A8885A308D3)
_S2 = np.uint64(0x13198A2E03707344)


def row_keys(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two 64-bit hashes of each row's float32 bytes (-0.0 hashed as 0.0): equal rows, equal keys."""
    w = np.ascontiguousarray(x, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
    w = w.view(np.uint32).astype(np.uint64)
    h1 = np.full(len(w), _S1, dtype=np.uint64)
    h2 = np.full(len(w), _S2, dtype=np.uint64)
    s31, s29 = np.uint64(31), np.uint64(29)
    for j in range(w.shape[1]):
        h1 = (h1 ^ w[:, j]) * _P1
        h1 ^= h1 >> s31
        h2 = (h2 ^ (w[:, j] << np.uint64(17))) * _P2
        h2 ^= h2 >> s29
    return h1, h2


def group_keys(h1: np.ndarray, h2: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sharing a key: ``(dup_rows, rep_rows)`` for every row but the lowest of its group
    (the representative), sorted by row."""
    order = np.lexsort((rows, h2, h1))
    h1, h2, rows = h1[order], h2[order], rows[order]
    same = np.zeros(len(rows), dtype=bool)
    same[1:] = (h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1])
    starts = np.flatnonzero(~same)
    rep = rows[starts][np.cumsum(~same) - 1]
    dup, rep = rows[same], rep[same]
    order = np.argsort(dup, kind="stable")
    return dup[order].astype(np.int64), rep[order].astype(np.int64)


@njit(cache=True)
def _find(parent, x):
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:  # path compression
        nxt = parent[x]
        parent[x] = root
        x = nxt
    return root


@njit(cache=True)
def _union_find(a, b, n):
    parent = np.arange(n)
    for i in range(len(a)):
        ra = _find(parent, a[i])
        rb = _find(parent, b[i])
        if ra < rb:
            parent[rb] = ra
        elif rb < ra:
            parent[ra] = rb
    for x in range(n):
        parent[x] = _find(parent, x)
    return parent


def forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The forest of edges ``a[i] -- b[i]``: (sorted nodes, the smallest node of each one's component)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if len(a) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    parent = _union_find(inv[:len(a)].astype(np.int64), inv[len(a):].astype(np.int64), len(nodes))
    return nodes, nodes[parent]


def merge_forests(f: tuple[np.ndarray, np.ndarray], g: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The forest of the union of two forests' components."""
    return forest(np.concatenate([f[0], g[0]]), np.concatenate([f[1], g[1]]))


def roots_of(f: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The component root of each row (the row itself when it has no edge)."""
    nodes, roots = f
    if len(nodes) == 0:
        return rows.copy()
    at = np.minimum(np.searchsorted(nodes, rows), len(nodes) - 1)
    return np.where(nodes[at] == rows, roots[at], rows)
