"""CUDA kernels: the GPU backend (``name = "cuda"``), CuPy for arrays and cuBLAS GEMMs,
Numba-CUDA for the kernels no library has.

Signatures and conventions are those of ``distann.kernels.base`` (host NumPy arrays in and
out); ``distann.kernels.reference`` is the truth these kernels are tested against
(``tests/test_cuda.py`` under Numba's CUDA simulator, ``tests/test_kernels.py`` on a device).

How the work is done
--------------------
* GEMM kernels (``coarse_quantize``, ``exact_knn``, ``assign``, ``kmeans_stats``): cuBLAS
  (``cupy.matmul``) on operands centred near the centroids / database (l2: distances are
  unchanged and ||c||^2 - 2<q, c> does not cancel on offset data), in blocks of rows whose
  score matrix fits the work budget; then the block top-k selection (``_select``), or
  ``argmin`` for assignments; k-means sums by ``cupyx.scatter_add`` in float64.
* List scans (``scan_lists``, ``scan_lists_sq``, ``scan_lists_pq``, ``range_scan_lists``):
  list-major, the lists resident on the device or streamed from pinned host memory
  (``_resident``), a distance kernel per work chunk of pairs writing a key buffer
  (``_distances``: Flat / SQ tiles of 8 pairs sharing each vector read, PQ lookup tables in
  shared memory), then selection per pair or the range filter and a device sort (``_scan``).
* ``merge_topk`` and ``rerank``: the same selection kernel on (rows of candidates) and on
  exact distances of the candidate rows.

Memory (``distann.kernels.cuda.*`` settings, see ``distann.config``): lists reused across calls
stay resident within ``resident-bytes`` (default half the device); every other buffer of a call
fits ``work-bytes`` (default 512 MiB, at most 3/4 of the free memory), batches being cut to
fit. A CUDA out-of-memory error (memory held by another process) becomes a
``DeviceMemoryError`` saying what to lower.

Without a usable device, ``distann.kernels.get_backend("cuda")`` raises a ``ValidationError``
saying what is missing (CuPy, a driver, a device); with ``NUMBA_ENABLE_CUDASIM=1`` everything
runs in Numba's simulator on NumPy arrays (slow: for tests on tiny inputs).
"""

from __future__ import annotations

import functools

import numpy as np

from distann.errors import ValidationError
from distann.kernels._host import centre_of as _centre_of
from distann.kernels._host import check_codes as _check_codes
from distann.kernels._host import check_metric as _check_metric
from distann.kernels._host import f32 as _f32
from distann.kernels._host import i64 as _i64
from distann.kernels._host import padded as _padded
from distann.kernels._host import scan_outputs as _scan_outputs
from distann.kernels._host import u8 as _u8
from distann.kernels.cuda import _scan
from distann.kernels.cuda._device import _oom_as_error, device_info, runtime
from distann.kernels.cuda._distances import rerank_kernel
from distann.kernels.cuda._resident import CACHE
from distann.kernels.cuda._select import MAX_FUSED_K, select_segments

name = "cuda"

__all__ = ["name", "coarse_quantize", "scan_lists", "scan_lists_sq", "scan_lists_pq", "merge_topk",
           "range_scan_lists", "rerank", "assign", "kmeans_stats", "exact_knn", "device_info", "clear_resident",
           "MAX_FUSED_K"]


def clear_resident() -> None:
    """Drop every list kept on the device (the next calls upload or stream them again)."""
    CACHE.clear()


def _guard(fn):
    """Run ``fn`` with CuPy's work on the runtime's compute stream (the stream the Numba kernels
    are launched on, so copies, library calls and kernels are ordered), and turn a CUDA
    out-of-memory error anywhere in it into a ``DeviceMemoryError``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _oom_as_error(f"in {fn.__name__}", 0), runtime().compute():
            return fn(*args, **kwargs)

    return wrapper


def _cached(rt, a: np.ndarray):
    """The resident device copy of ``a`` (admitted from its second use), else a fresh copy."""
    dev = CACHE.lookup(a)
    if dev is None:
        dev = CACHE.admit(rt, a, rt.resident_budget())
    return dev if dev is not None else rt.to_device(np.ascontiguousarray(a))


# ------------------------------------------------------------------ selection helpers

def _select_rows(rt, keys, ids, seg_id, k: int, negate: bool, nrows: int, width: int):
    """Top-``k`` of each row of the (nrows, width) device ``keys``; ids ``ids[seg_id[r] + e]``."""
    xp = rt.xp
    outD = rt.empty((nrows * k,), np.float32)
    outI = rt.empty((nrows * k,), np.int64)
    rows = xp.arange(nrows, dtype=xp.int64)
    select_segments(rt, keys.reshape(-1), rows * width, xp.full(nrows, width, dtype=xp.int64), ids, seg_id, rows,
                    k, negate, outD, outI, width)
    return outD.reshape(nrows, k), outI.reshape(nrows, k)


def _merge_pairs(rt, D1, I1, D2, I2, k: int, is_ip: bool):
    """Best ``k`` of two device (n, k) results (D as output distances)."""
    xp = rt.xp
    D = xp.concatenate([D1, D2], axis=1)
    I = xp.ascontiguousarray(xp.concatenate([I1, I2], axis=1))
    keys = xp.ascontiguousarray(-D if is_ip else D)
    n, w = D.shape
    return _select_rows(rt, keys, I.reshape(-1), xp.arange(n, dtype=xp.int64) * w, k, is_ip, n, w)


def _gemm_select(rt, Q, X, xn, ids, k: int, is_ip: bool):
    """Top-``k`` rows of ``X`` for each row of ``Q`` (both centred on the same point for l2) by
    one GEMM: keys ``||x||^2 - 2 <q, x>`` (l2; ``xn`` the rows' squared norms) or ``-<q, x>``
    (ip), then selection. Returns (keys, ids) of shape (len(Q), k): l2 keys lack ``||q||^2``
    (:func:`_distances_of`), ip keys are already the inner products."""
    xp = rt.xp
    S = xp.matmul(Q, X.T)
    keys = xp.ascontiguousarray(-S if is_ip else xn[None, :] - 2 * S, dtype=xp.float32)
    n = int(Q.shape[0])
    return _select_rows(rt, keys, ids, xp.zeros(n, dtype=xp.int64), k, is_ip, n, int(X.shape[0]))


def _distances_of(rt, Db, Ib, Q, is_ip: bool):
    """l2: the selected keys plus ``||q||^2`` (clamped at 0; padding kept); ip: unchanged."""
    if is_ip:
        return Db
    xp = rt.xp
    return xp.where(Ib >= 0, xp.maximum(Db + (Q * Q).sum(axis=1)[:, None], 0), Db)


def _block_rows(rt, width: int, per_entry: int = 12) -> int:
    """Rows of a (rows, width) score block within half the work budget."""
    return max(1, rt.work_budget() // 2 // max(1, width * per_entry))


# ------------------------------------------------------------------ GEMM kernels

@_guard
def coarse_quantize(xq: np.ndarray, centroids: np.ndarray, nprobe: int,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-``nprobe`` centroids per query: a cuBLAS GEMM per block of queries, then selection."""
    is_ip = _check_metric(metric)
    xq, centroids, nprobe = _f32(xq), _f32(centroids), int(nprobe)
    nq, nl = xq.shape[0], centroids.shape[0]
    D, I = _padded((nq, nprobe), is_ip)
    if nq == 0 or nprobe <= 0 or nl == 0:
        return D, I
    rt = runtime()
    xp = rt.xp
    mu = rt.to_device(np.zeros(xq.shape[1], np.float32) if is_ip else _centre_of(centroids))
    C = _cached(rt, centroids) - mu
    cn = (C * C).sum(axis=1)
    cids = xp.arange(nl, dtype=xp.int64)
    step = _block_rows(rt, nl)
    for s in range(0, nq, step):
        e = min(nq, s + step)
        Q = rt.to_device(xq[s:e]) - mu
        Db, Ib = _gemm_select(rt, Q, C, cn, cids, nprobe, is_ip)
        D[s:e], I[s:e] = rt.to_host(_distances_of(rt, Db, Ib, Q, is_ip)), rt.to_host(Ib)
    return D, I


@_guard
def exact_knn(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int,
              metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k``: GEMM blocks (queries x database rows within the work budget),
    selection per block, running merge across database blocks."""
    is_ip = _check_metric(metric)
    xq, xb, ids, k = _f32(xq), _f32(xb), _i64(ids), int(k)
    nq, N = xq.shape[0], xb.shape[0]
    D, I = _padded((nq, k), is_ip)
    if nq == 0 or k <= 0 or N == 0:
        return D, I
    rt = runtime()
    mu = rt.to_device(np.zeros(xq.shape[1], np.float32) if is_ip else _centre_of(xb))
    X = _cached(rt, xb) - mu
    xn = (X * X).sum(axis=1)
    ids_d = _cached(rt, ids)
    xstep = max(1, min(N, rt.work_budget() // 4 // max(1, 12 * min(nq, 1024))))
    qstep = max(1, min(nq, _block_rows(rt, min(N, xstep))))
    for s in range(0, nq, qstep):
        e = min(nq, s + qstep)
        Q = rt.to_device(xq[s:e]) - mu
        best = None
        for a in range(0, N, xstep):
            b = min(N, a + xstep)
            Db, Ib = _gemm_select(rt, Q, X[a:b], xn[a:b], ids_d[a:b], k, is_ip)
            best = (Db, Ib) if best is None else _merge_pairs(rt, *best, Db, Ib, k, is_ip)
        Db, Ib = best
        D[s:e], I[s:e] = rt.to_host(_distances_of(rt, Db, Ib, Q, is_ip)), rt.to_host(Ib)
    return D, I


def _assign_blocks(rt, x: np.ndarray, centroids: np.ndarray, centroids_d, is_ip: bool):
    """(row range, device rows, labels) per block of ``x``: GEMM against the centred centroids
    (``centroids_d``: their device copy) and ``argmin`` (first index on ties: the smaller
    centroid)."""
    xp = rt.xp
    mu = np.zeros(x.shape[1], np.float32) if is_ip or len(centroids) == 0 else _centre_of(centroids)
    mu_d = rt.to_device(mu)
    C = centroids_d - mu_d
    cn = (C * C).sum(axis=1)
    step = _block_rows(rt, len(centroids), per_entry=8)
    for s in range(0, len(x), step):
        e = min(len(x), s + step)
        X = rt.to_device(x[s:e])
        S = xp.matmul(X - mu_d, C.T)
        labels = xp.argmax(S, axis=1) if is_ip else xp.argmin(cn[None, :] - 2 * S, axis=1)
        yield s, e, X, labels.astype(xp.int64)


@_guard
def assign(x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """Nearest centroid (l2) / largest inner product (ip) of every row, ties to the smaller index."""
    is_ip = _check_metric(metric)
    x, centroids = _f32(x), _f32(centroids)
    labels = np.empty(len(x), dtype=np.int64)
    if len(x) == 0:
        return labels
    if len(centroids) == 0:
        labels[:] = -1
        return labels
    rt = runtime()
    for s, e, _, lab in _assign_blocks(rt, x, centroids, _cached(rt, centroids), is_ip):
        labels[s:e] = rt.to_host(lab)
    return labels


@_guard
def kmeans_stats(x: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, float]:
    """One Lloyd step's per-centroid float64 sums, int64 counts and objective (float64), all on
    the device; the objective is recomputed in float64 from the assigned centroids."""
    is_ip = _check_metric(metric)
    x, centroids = _f32(x), _f32(centroids)
    k, d = centroids.shape
    if len(x) == 0 or k == 0:
        return np.zeros((k, d), np.float64), np.zeros(k, np.int64), 0.0
    rt = runtime()
    xp = rt.xp
    sums = rt.full((k, d), 0.0, np.float64)
    counts = rt.full((k,), 0, np.int64)
    C = _cached(rt, centroids)
    C64 = C.astype(xp.float64)
    obj = 0.0
    for _, _, X, lab in _assign_blocks(rt, x, centroids, C, is_ip):
        X64 = X.astype(xp.float64)
        rt.scatter_add(sums, lab, X64)
        counts += xp.bincount(lab, minlength=k).astype(xp.int64)
        own = C64[lab]
        obj += float((X64 * own).sum() if is_ip else ((X64 - own) ** 2).sum())
    return rt.to_host(sums), rt.to_host(counts), obj


# ------------------------------------------------------------------ merge, rerank

@_guard
def merge_topk(D: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row of (nq, m) candidates (id -1: padding), best first, ties by id."""
    is_ip = _check_metric(metric)
    D, I, k = _f32(D), _i64(I), int(k)
    nq, m = D.shape
    Do, Io = _padded((nq, k), is_ip)
    if nq == 0 or k <= 0 or m == 0:
        return Do, Io
    rt = runtime()
    xp = rt.xp
    step = _block_rows(rt, m)
    for s in range(0, nq, step):
        e = min(nq, s + step)
        Dd = rt.to_device(D[s:e])
        keys = xp.ascontiguousarray(-Dd if is_ip else Dd)
        Db, Ib = _select_rows(rt, keys, rt.to_device(I[s:e]).reshape(-1), xp.arange(e - s, dtype=xp.int64) * m,
                              k, is_ip, e - s, m)
        Do[s:e], Io[s:e] = rt.to_host(Db), rt.to_host(Ib)
    return Do, Io


@_guard
def rerank(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, candidates: np.ndarray, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking: float32 direct-difference distances of each query's candidate rows
    (one block per query), then selection by (distance, id)."""
    is_ip = _check_metric(metric)
    xq, xb, ids, cand, k = _f32(xq), _f32(xb), _i64(ids), _i64(candidates), int(k)
    nq, kc = cand.shape
    if nq and kc and int(cand.max()) >= len(xb):
        raise ValidationError("candidates", int(cand.max()), f"must be < {len(xb)} (rows of xb) or -1")
    Do, Io = _padded((nq, k), is_ip)
    if nq == 0 or kc == 0 or k <= 0:
        return Do, Io
    rt = runtime()
    xp = rt.xp
    X, ids_d = _cached(rt, xb), _cached(rt, ids)
    step = _block_rows(rt, kc, per_entry=20)
    for s in range(0, nq, step):
        e = min(nq, s + step)
        C = rt.to_device(cand[s:e])
        keys = rt.empty((e - s, kc), np.float32)
        grid = max(1, min(e - s, rt.max_grid))
        rerank_kernel[grid, rt.threads(64), rt.kernel_stream()](rt.to_device(xq[s:e]), X, C, is_ip, keys)
        gid = xp.where(C >= 0, ids_d[xp.maximum(C, 0)], -1).astype(xp.int64)
        Db, Ib = _select_rows(rt, keys, gid.reshape(-1), xp.arange(e - s, dtype=xp.int64) * kc, k, is_ip, e - s, kc)
        Do[s:e], Io[s:e] = rt.to_host(Db), rt.to_host(Ib)
    return Do, Io


# ------------------------------------------------------------------ list scans

def _knn_scan(xq, data, codec, ids, list_offsets, centers, group_offsets, group_queries, group_slots, group_limits,
              valid, nprobe, k, is_ip, out):
    """The body of the three kNN scans: outputs, the batch, the device scan."""
    nprobe, k, D, I, empty = _scan_outputs(np.shape(xq)[0], nprobe, k, is_ip, out)
    if empty or len(group_queries) == 0:
        return D, I
    b = _batch(xq, data, ids, list_offsets, centers, group_offsets, group_queries, group_slots, group_limits,
               valid, is_ip)
    _scan.knn_scan(runtime(), b, codec, k, D, I)
    return D, I


def _batch(xq, data, ids, list_offsets, centers, group_offsets, group_queries, group_slots, group_limits,
           valid, is_ip) -> _scan.Batch:
    xq = _f32(xq)
    return _scan.Batch(xq, data, _i64(ids), _i64(list_offsets), _f32(centers).reshape(-1, xq.shape[1]),
                       _i64(group_offsets), _i64(group_queries), _i64(group_slots), _i64(group_limits), _u8(valid),
                       is_ip)


@_guard
def scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
               centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
               group_slots: np.ndarray, group_limits: np.ndarray, valid: np.ndarray,
               nprobe: int, k: int, metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """List-major kNN scan of a batch on the device: per-(query, probe) top-``k``."""
    return _knn_scan(xq, _f32(xb), _scan.Codec("flat"), ids, list_offsets, centers, group_offsets, group_queries,
                     group_slots, group_limits, valid, nprobe, k, _check_metric(metric), out)


def _sq_codec(xq, codes, sq_kind, vmin, vdiff, by_residual):
    sq_kind = int(sq_kind)
    d = np.shape(xq)[1]
    if sq_kind == 0:
        codes = _u8(codes)
        _check_codes(codes, d, "one uint8 per component")
        vmin64 = np.asarray(vmin, dtype=np.float64).reshape(-1)
        vdiff64 = np.asarray(vdiff, dtype=np.float64).reshape(-1)
        if vmin64.shape != (d,) or vdiff64.shape != (d,):
            raise ValidationError("vmin/vdiff", (vmin64.shape, vdiff64.shape),
                                  f"must both have d = {d} entries for 8-bit codes")
        scale = vdiff64 / 255.0
        return codes, _scan.Codec("sq8", scale.astype(np.float32), vmin64 + 0.5 * scale, bool(by_residual))
    if sq_kind == 1:
        codes = np.ascontiguousarray(codes, dtype=np.uint16)
        _check_codes(codes, d, "one fp16 bit pattern per component")
        return codes, _scan.Codec("fp16", by_residual=bool(by_residual))
    raise ValidationError("sq_kind", sq_kind, "must be 0 (8 bits) or 1 (fp16)")


@_guard
def scan_lists_sq(xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                  centers: np.ndarray, sq_kind: int, vmin: np.ndarray, vdiff: np.ndarray, by_residual: bool,
                  group_offsets: np.ndarray, group_queries: np.ndarray, group_slots: np.ndarray,
                  group_limits: np.ndarray, valid: np.ndarray, nprobe: int, k: int,
                  metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``scan_lists`` on scalar-quantized lists, decoded inside the distance kernel."""
    is_ip = _check_metric(metric)
    codes, codec = _sq_codec(xq, codes, sq_kind, vmin, vdiff, by_residual)
    return _knn_scan(xq, codes, codec, ids, list_offsets, centers, group_offsets, group_queries, group_slots,
                     group_limits, valid, nprobe, k, is_ip, out)


def _pq_codec(xq, codes, codebooks, by_residual):
    d = np.shape(xq)[1]
    codebooks = _f32(codebooks)
    if codebooks.ndim != 3 or codebooks.shape[0] * codebooks.shape[2] != d or not 1 <= codebooks.shape[1] <= 256:
        raise ValidationError("codebooks", codebooks.shape,
                              f"must be (M, K, dsub) with M * dsub = d = {d} and 1 <= K <= 256")
    M, K, _ = codebooks.shape
    codes = _u8(codes)
    _check_codes(codes, M, "one uint8 per sub-quantizer")
    if K < 256 and codes.size and int(codes.max()) >= K:
        raise ValidationError("codes", int(codes.max()), f"must be < K = {K}")
    return codes, _scan.Codec("pq", by_residual=bool(by_residual), codebooks=codebooks)


@_guard
def scan_lists_pq(xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                  centers: np.ndarray, codebooks: np.ndarray, by_residual: bool, group_offsets: np.ndarray,
                  group_queries: np.ndarray, group_slots: np.ndarray, group_limits: np.ndarray,
                  valid: np.ndarray, nprobe: int, k: int, metric: str,
                  out=None) -> tuple[np.ndarray, np.ndarray]:
    """``scan_lists`` on product-quantized lists: a lookup table per pair in shared memory."""
    is_ip = _check_metric(metric)
    codes, codec = _pq_codec(xq, codes, codebooks, by_residual)
    return _knn_scan(xq, codes, codec, ids, list_offsets, centers, group_offsets, group_queries, group_slots,
                     group_limits, valid, nprobe, k, is_ip, out)


@_guard
def range_scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                     centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
                     group_limits: np.ndarray, valid: np.ndarray, radius: float,
                     metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range search of a batch on the device, ``(lims, D, I)``, each query's results best first
    (ties by id): keys under the radius are compacted on the device, sorted on the host."""
    is_ip = _check_metric(metric)
    nq = np.shape(xq)[0]
    npairs = len(group_queries)
    if nq == 0 or npairs == 0:
        return np.zeros(nq + 1, dtype=np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    b = _batch(xq, _f32(xb), ids, list_offsets, centers, group_offsets, group_queries,
               np.zeros(npairs, np.int64), group_limits, valid, is_ip)
    q, keys, rid = _scan.range_scan(runtime(), b, _scan.Codec("flat"), float(radius))
    order = np.lexsort((rid, keys, q))
    q, keys, rid = q[order], keys[order], rid[order]
    lims = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(np.bincount(q, minlength=nq), out=lims[1:])
    return lims, (-keys if is_ip else keys).astype(np.float32), rid
