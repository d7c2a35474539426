"""NumPy reference kernels: the truth every other backend is tested against.

Simple and obviously correct rather than fast: distances are computed in float64 by direct
differences (no ``||q||^2 + ||x||^2 - 2<q, x>`` norm trick, so no cancellation on offset data)
and results are ordered by a stable sort on (distance, id). Python loops over lists and pairs
make it slow; use it on small inputs only. Signatures and conventions: ``distann.kernels.base``.
"""

from __future__ import annotations

import numpy as np

from distann.errors import ValidationError

name = "numpy"

_METRICS = ("l2", "ip")


def _check_metric(metric: str) -> bool:
    """Return True for "ip", False for "l2"; raise ValidationError otherwise."""
    if metric not in _METRICS:
        raise ValidationError("metric", metric, "must be 'l2' or 'ip'")
    return metric == "ip"


def _distances(q: np.ndarray, x: np.ndarray, is_ip: bool) -> np.ndarray:
    """float64 distances (l2: squared, by direct differences) or inner products of q to rows of x."""
    q64 = q.astype(np.float64)
    x64 = x.astype(np.float64)
    if is_ip:
        return x64 @ q64
    diff = x64 - q64[None, :]
    return np.einsum("ij,ij->i", diff, diff)


def _order(dist: np.ndarray, ids: np.ndarray, is_ip: bool) -> np.ndarray:
    """Indices sorting candidates best first, ties by smaller id (stable lexicographic sort)."""
    primary = -dist if is_ip else dist
    return np.lexsort((ids, primary))


def _pad(shape: tuple[int, ...], is_ip: bool) -> tuple[np.ndarray, np.ndarray]:
    D = np.full(shape, -np.inf if is_ip else np.inf, dtype=np.float32)
    I = np.full(shape, -1, dtype=np.int64)
    return D, I


def coarse_quantize(xq: np.ndarray, centroids: np.ndarray, nprobe: int,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-``nprobe`` centroids per query, (nq, nprobe), best first, ties by smaller index."""
    is_ip = _check_metric(metric)
    nq = xq.shape[0]
    D, I = _pad((nq, nprobe), is_ip)
    idx = np.arange(centroids.shape[0], dtype=np.int64)
    for qi in range(nq):
        dist = _distances(xq[qi], centroids, is_ip)
        sel = _order(dist, idx, is_ip)[:nprobe]
        D[qi, : len(sel)] = dist[sel]
        I[qi, : len(sel)] = idx[sel]
    return D, I


def _pair_candidates(xq, xb, ids, list_offsets, group_offsets, group_queries, group_limits,
                     valid, j, g, is_ip):
    """Distances and ids of the vectors pair ``g`` of list ``j`` may return."""
    lo, hi = int(list_offsets[j]), int(list_offsets[j + 1])
    lim = max(0, min(int(group_limits[g]), hi - lo))
    rows = np.arange(lo, lo + lim)
    if valid.shape[0] > 0:
        rows = rows[valid[rows] != 0]
    dist = _distances(xq[group_queries[g]], xb[rows], is_ip)
    return dist, ids[rows]


def scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
               centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
               group_slots: np.ndarray, group_limits: np.ndarray, valid: np.ndarray,
               nprobe: int, k: int, metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-(query, probe) top-``k``, shape (nq, nprobe, k) (into ``out`` when given). ``centers``
    is not needed here: float64 direct differences do not suffer from cancellation."""
    is_ip = _check_metric(metric)
    D, I = out if out is not None else _pad((xq.shape[0], nprobe, k), is_ip)
    for j in range(len(list_offsets) - 1):
        for g in range(int(group_offsets[j]), int(group_offsets[j + 1])):
            dist, cid = _pair_candidates(xq, xb, ids, list_offsets, group_offsets, group_queries,
                                         group_limits, valid, j, g, is_ip)
            sel = _order(dist, cid, is_ip)[:k]
            qi, s = group_queries[g], group_slots[g]
            D[qi, s, : len(sel)] = dist[sel]
            I[qi, s, : len(sel)] = cid[sel]
    return D, I


def merge_topk(D: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of each row of (nq, m) candidates; entries with id -1 are padding and ignored."""
    is_ip = _check_metric(metric)
    nq = D.shape[0]
    Do, Io = _pad((nq, k), is_ip)
    for qi in range(nq):
        keep = I[qi] >= 0
        dist, cid = D[qi][keep].astype(np.float64), I[qi][keep]
        sel = _order(dist, cid, is_ip)[:k]
        Do[qi, : len(sel)] = dist[sel]
        Io[qi, : len(sel)] = cid[sel]
    return Do, Io


def range_scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                     centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
                     group_limits: np.ndarray, valid: np.ndarray, radius: float,
                     metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All results with distance < radius (l2) / similarity > radius (ip): ``(lims, D, I)``."""
    is_ip = _check_metric(metric)
    nq = xq.shape[0]
    per_q_d: list[list[np.ndarray]] = [[] for _ in range(nq)]
    per_q_i: list[list[np.ndarray]] = [[] for _ in range(nq)]
    for j in range(len(list_offsets) - 1):
        for g in range(int(group_offsets[j]), int(group_offsets[j + 1])):
            dist, cid = _pair_candidates(xq, xb, ids, list_offsets, group_offsets, group_queries,
                                         group_limits, valid, j, g, is_ip)
            keep = dist > radius if is_ip else dist < radius
            per_q_d[group_queries[g]].append(dist[keep])
            per_q_i[group_queries[g]].append(cid[keep])
    lims = np.zeros(nq + 1, dtype=np.int64)
    Ds, Is = [], []
    for qi in range(nq):
        dist = np.concatenate(per_q_d[qi]) if per_q_d[qi] else np.zeros(0)
        cid = np.concatenate(per_q_i[qi]) if per_q_i[qi] else np.zeros(0, dtype=np.int64)
        sel = _order(dist, cid, is_ip)
        Ds.append(dist[sel].astype(np.float32))
        Is.append(cid[sel].astype(np.int64))
        lims[qi + 1] = lims[qi] + len(sel)
    D = np.concatenate(Ds) if Ds else np.zeros(0, dtype=np.float32)
    I = np.concatenate(Is) if Is else np.zeros(0, dtype=np.int64)
    return lims, D.astype(np.float32), I.astype(np.int64)


def exact_knn(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int,
              metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` of each query against all rows of ``xb``: (nq, k), padded."""
    is_ip = _check_metric(metric)
    nq = xq.shape[0]
    D, I = _pad((nq, k), is_ip)
    for qi in range(nq):
        dist = _distances(xq[qi], xb, is_ip)
        sel = _order(dist, ids, is_ip)[:k]
        D[qi, : len(sel)] = dist[sel]
        I[qi, : len(sel)] = ids[sel]
    return D, I


def rerank(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, candidates: np.ndarray, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of each query's candidate rows of ``xb`` by exact distance: (nq, k), padded."""
    is_ip = _check_metric(metric)
    nq = xq.shape[0]
    D, I = _pad((nq, k), is_ip)
    for qi in range(nq):
        rows = np.asarray(candidates[qi], dtype=np.int64)
        rows = rows[rows >= 0]
        dist, cid = _distances(xq[qi], xb[rows], is_ip), ids[rows]
        sel = _order(dist, cid, is_ip)[:k]
        D[qi, : len(sel)] = dist[sel]
        I[qi, : len(sel)] = cid[sel]
    return D, I


def _add_centers(x: np.ndarray, list_offsets: np.ndarray, centers: np.ndarray) -> None:
    """``x[rows of list j] += centers[j]`` in place (the ``by_residual`` reconstruction)."""
    for j in range(len(list_offsets) - 1):
        lo, hi = int(list_offsets[j]), int(list_offsets[j + 1])
        x[lo:hi] += centers[j].astype(np.float64)


def _reconstruct_sq(codes: np.ndarray, sq_kind: int, vmin: np.ndarray,
                    vdiff: np.ndarray) -> np.ndarray:
    """float64 reconstruction of scalar-quantized codes (see ``base``, "Compressed lists")."""
    if sq_kind == 0:
        c = np.asarray(codes, dtype=np.uint8).astype(np.float64)
        return (np.asarray(vmin, dtype=np.float64)
                + (c + 0.5) / 255.0 * np.asarray(vdiff, dtype=np.float64))
    if sq_kind == 1:
        return np.ascontiguousarray(codes, dtype=np.uint16).view(np.float16).astype(np.float64)
    raise ValidationError("sq_kind", sq_kind, "must be 0 (8 bits) or 1 (fp16)")


def scan_lists_sq(xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                  centers: np.ndarray, sq_kind: int, vmin: np.ndarray, vdiff: np.ndarray,
                  by_residual: bool, group_offsets: np.ndarray, group_queries: np.ndarray,
                  group_slots: np.ndarray, group_limits: np.ndarray, valid: np.ndarray,
                  nprobe: int, k: int, metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``scan_lists`` on the float64 reconstruction of scalar-quantized lists."""
    _check_metric(metric)
    xb = _reconstruct_sq(codes, int(sq_kind), vmin, vdiff)
    if by_residual:
        _add_centers(xb, list_offsets, centers)
    return scan_lists(xq, xb, ids, list_offsets, centers, group_offsets, group_queries,
                      group_slots, group_limits, valid, nprobe, k, metric, out)


def _reconstruct_pq(codes: np.ndarray, codebooks: np.ndarray, d: int) -> np.ndarray:
    """float64 reconstruction of product-quantized codes: sub-vector m is codebooks[m, code[m]]."""
    codes = np.asarray(codes, dtype=np.uint8)
    codebooks = np.asarray(codebooks)
    if (codebooks.ndim != 3 or codebooks.shape[0] * codebooks.shape[2] != d
            or not 1 <= codebooks.shape[1] <= 256):
        raise ValidationError("codebooks", codebooks.shape,
                              f"must be (M, K, dsub) with M * dsub = d = {d} and 1 <= K <= 256")
    M, K, _ = codebooks.shape
    if codes.ndim != 2 or codes.shape[1] != M:
        raise ValidationError("codes", codes.shape, f"must be (N, {M}): a uint8 per sub-quantizer")
    if codes.size and int(codes.max()) >= K:
        raise ValidationError("codes", int(codes.max()), f"must be < K = {K}")
    cb = np.asarray(codebooks, dtype=np.float64)
    parts = [cb[m][codes[:, m].astype(np.int64)] for m in range(M)]
    return np.concatenate(parts, axis=1) if parts else np.zeros((codes.shape[0], 0))


def scan_lists_pq(xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                  centers: np.ndarray, codebooks: np.ndarray, by_residual: bool,
                  group_offsets: np.ndarray, group_queries: np.ndarray, group_slots: np.ndarray,
                  group_limits: np.ndarray, valid: np.ndarray, nprobe: int, k: int,
                  metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``scan_lists`` on the float64 reconstruction of product-quantized lists (the reference
    reconstructs; fast backends use lookup tables, which give the same distances)."""
    _check_metric(metric)
    xb = _reconstruct_pq(codes, codebooks, np.shape(xq)[1])
    if by_residual:
        _add_centers(xb, list_offsets, centers)
    return scan_lists(xq, xb, ids, list_offsets, centers, group_offsets, group_queries,
                      group_slots, group_limits, valid, nprobe, k, metric, out)


def assign(x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """Nearest centroid (l2) / largest inner product (ip) of every row, ties to the smaller index."""
    is_ip = _check_metric(metric)
    labels = np.empty(len(x), dtype=np.int64)
    idx = np.arange(len(centroids), dtype=np.int64)
    for i in range(len(x)):
        labels[i] = idx[_order(_distances(x[i], centroids, is_ip), idx, is_ip)[0]] if len(idx) else -1
    return labels


def kmeans_stats(x: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-centroid sums (float64), counts and objective of the rows of ``x`` assigned by ``assign``."""
    is_ip = _check_metric(metric)
    labels = assign(x, centroids, metric)
    k, d = centroids.shape
    sums = np.zeros((k, d), dtype=np.float64)
    np.add.at(sums, labels, x.astype(np.float64))
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    own = centroids[labels].astype(np.float64)
    x64 = x.astype(np.float64)
    obj = float((x64 * own).sum()) if is_ip else float(((x64 - own) ** 2).sum())
    return sums, counts, obj
