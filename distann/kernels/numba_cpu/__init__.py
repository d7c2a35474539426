"""Numba CPU kernels: the fast CPU backend (``name = "numba"``).

Signatures and conventions are those of ``distann.kernels.base``; ``distann.kernels.reference``
is the truth these kernels are tested against (``tests/test_kernels.py``).

How the work is done
--------------------
* Inner products come from a register-blocked micro-kernel written in Numba
  (``_kernel_6x2``: 6 query rows x 2 database rows per step, LLVM vectorizing the reduction
  over d). On the skinny blocks of a list scan it runs close to OpenBLAS sgemm
  (``jobs/bench_search.py`` reports the scan's GFLOP/s against this machine's SGEMM), but it needs no SciPy, cannot oversubscribe the cores with
  BLAS threads, and computes every (query, vector) entry with the same instruction sequence
  wherever it sits in a block, so duplicate vectors get bit-identical distances and their ties
  are broken by id deterministically.
* ``scan_lists`` is list-major: each list of the batch is centred on its centroid once
  (x' = x - c, ||x'||^2), its (query, probe) pairs are taken six at a time (q' = q - c), the
  (6 x n) block of ``-2 <q', x'>`` comes from the micro-kernel and each row is ranked on
  ``||x'||^2 - 2 <q', x'>``; ``||q'||^2`` is added to the k survivors only (clamped at 0).
  Lists probed by at most ``_DIRECT_MAX_ROWS`` pairs (single queries, small batches) skip the
  centring copy and compute ``||q - x||^2`` by direct differences.
* ``scan_lists_sq`` runs the same list-major path on scalar-quantized lists: each list is
  decoded once into the centred float32 buffer the Flat path would build (8 bits: one FMA per
  component, the centroid folded into a per-list offset computed in float64; fp16: a
  65536-entry table), then the micro-kernel or, for lists probed by at most
  ``_DIRECT_MAX_ROWS`` pairs, direct differences on the decoded rows.
* ``scan_lists_pq`` is asymmetric distance computation, list-major: the pairs of a list are
  taken four at a time, each gets its M x K lookup table (l2 by direct differences on
  q - c when ``by_residual``; ip with <q, c> folded in), and one pass over the list's codes
  sums M table entries per code for all four (the codes are read once per four pairs). The
  rows of keys go through the same selection as the Flat path.
* Top-k selection (``_select``): a vectorized pass bounds the k-th best key by the largest of
  the minima of k disjoint blocks, a branch-free pass keeps the few percent of candidates
  under that bound, and those are inserted into a sorted array of size k. Ties: smaller id.
* Threads: each kernel is a ``nogil`` Numba function over a *part* of the work; parts run on
  a small thread pool, one per thread (``numba.get_num_threads()``). Lists are assigned to
  parts by a greedy longest-first balance of their cost. Calls below ``_SERIAL_WORK``
  multiply-adds (a single query) stay in the calling thread. Numba's ``parallel=True`` would
  do the same but multiplies the compile time.
* Metrics are a runtime flag, not a compile-time specialization, so each kernel compiles once
  (``cache=True``).

Inputs are expected finite: NaN keys are never selected.

Layout
------
This package's ``__init__`` holds the public surface (``name`` and the kernels of
``distann.kernels.base``), the Python wrappers that validate and convert the inputs, and the
knobs that decide how a call is cut into parts (``_SERIAL_WORK``, ``_nthreads``: the wrappers
read them from this module, so patching them here takes effect). The compiled internals live
in private modules, by concern: ``_selection`` (ordering and top-k selection), ``_arith``
(micro-kernel, direct differences, centring), ``_balancing`` (lists to threads), ``_lists``
(one list of a ``scan_lists`` / ``range_scan_lists`` batch), ``_codecs`` (one list of a
``scan_lists_sq`` / ``scan_lists_pq`` batch: decoding, lookup tables, the ADC scan; it reuses
``_lists``, ``_arith`` and ``_selection``), ``_coarse_merge_exact`` (the other three kernels)
and ``_threads`` (the thread pool). Numba's on-disk cache only notices edits to the file that
defines a function, not to the files of the functions it calls: after editing a module here,
delete ``distann/kernels/numba_cpu/__pycache__`` (or point ``NUMBA_CACHE_DIR`` at a fresh
directory) so that its callers in the other modules are recompiled.
"""

from __future__ import annotations

import numba
import numpy as np

from distann.errors import ValidationError
from distann.kernels._host import centre_of as _centre_of
from distann.kernels._host import check_codes as _check_codes
from distann.kernels._host import check_metric as _check_metric
from distann.kernels._host import f16_table
from distann.kernels._host import f32 as _f32
from distann.kernels._host import i64 as _i64
from distann.kernels._host import padded as _padded
from distann.kernels._host import scan_outputs as _scan_outputs
from distann.kernels._host import u8 as _u8
from distann.kernels.numba_cpu._arith import _DIRECT_MAX_ROWS, _ROWS, _prepare_rows
from distann.kernels.numba_cpu._assign import assign_accumulate, assign_labels
from distann.kernels.numba_cpu._balancing import _plan_parts
from distann.kernels.numba_cpu._coarse_merge_exact import (
    _EXACT_QBLOCK,
    _EXACT_XBLOCK,
    _coarse_part,
    _exact_part,
    _merge_part,
    _prepare_queries,
    _rerank_part,
)
from distann.kernels.numba_cpu._codecs import _pq_part, _sq_part
from distann.kernels.numba_cpu._lists import (
    _MODE_COUNT,
    _MODE_FILL,
    _MODE_TOPK,
    _range_layout,
    _range_sort_part,
    _run_part,
)
from distann.kernels.numba_cpu._threads import _parallel

name = "numba"

_SERIAL_WORK = 1 << 21
"""Below this many multiply-adds a call runs in the calling thread: handing work to a thread
costs tens of microseconds, more than a single query's scan."""


def _nthreads() -> int:
    """Threads used by the kernels: ``numba.get_num_threads()`` (``NUMBA_NUM_THREADS``,
    ``numba.set_num_threads``)."""
    return max(1, int(numba.get_num_threads()))


_NO_F32_1 = np.empty(0, dtype=np.float32)
_NO_I64_1 = np.empty(0, dtype=np.int64)
_NO_F32_3 = np.empty((0, 0, 0), dtype=np.float32)
_NO_I64_3 = np.empty((0, 0, 0), dtype=np.int64)
_NO_F64_1 = np.empty(0, dtype=np.float64)
_NO_U8_2 = np.empty((0, 0), dtype=np.uint8)
_NO_U16_2 = np.empty((0, 0), dtype=np.uint16)


def coarse_quantize(xq: np.ndarray, centroids: np.ndarray, nprobe: int,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-``nprobe`` centroids per query, (nq, nprobe), best first, ties by smaller index.

    nq <= 3: direct differences, no allocation beyond one row of nlist keys.
    Larger batches: micro-kernel on data centred near the centroids (l2); peak extra memory
    one centred copy of the centroids, (nlist + 1) x d float32, and 4 x nlist keys per thread.
    """
    is_ip = _check_metric(metric)
    xq = _f32(xq)
    centroids = _f32(centroids)
    nprobe = int(nprobe)
    nq, d = xq.shape
    nl = centroids.shape[0]
    D, I = _padded((nq, nprobe), is_ip)
    if nq == 0 or nprobe <= 0 or nl == 0:
        return D, I
    direct = nq <= _DIRECT_MAX_ROWS
    if direct:
        mu = np.zeros(d, dtype=np.float32)
        Cc = np.zeros((0, d), dtype=np.float32)
        cn = _NO_F32_1
    else:
        mu = np.zeros(d, dtype=np.float32) if is_ip else _centre_of(centroids)
        Cc = np.empty((nl + (nl & 1), d), dtype=np.float32)
        cn = np.empty(Cc.shape[0], dtype=np.float32)
        _prepare_rows(centroids, 0, nl, mu, is_ip, Cc, cn)
    work = nq * nl * d
    nparts = 1 if work < _SERIAL_WORK else min(_nthreads(), (nq + _ROWS - 1) // _ROWS)
    _parallel(_coarse_part, nparts, xq, centroids, Cc, cn, mu, nprobe, is_ip, direct, D, I)
    return D, I


def _batch_parts(list_offsets: np.ndarray, group_offsets: np.ndarray, d: int):
    """Lists of the batch balanced over the threads (one part when the batch is small)."""
    return _plan_parts(list_offsets, group_offsets, d, _nthreads(), float(_SERIAL_WORK))


def scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
               centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
               group_slots: np.ndarray, group_limits: np.ndarray, valid: np.ndarray,
               nprobe: int, k: int, metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """List-major kNN scan of a batch: per-(query, probe) top-``k``, shape (nq, nprobe, k).

    Peak extra memory: the (nq, nprobe, k) outputs plus, per thread, one centred list
    ((n + 1) x d float32) and 4 x n keys.
    """
    is_ip = _check_metric(metric)
    nprobe, k, D, I, empty = _scan_outputs(xq.shape[0], nprobe, k, is_ip, out)
    if empty:
        return D, I
    xq, list_offsets, group_offsets = _f32(xq), _i64(list_offsets), _i64(group_offsets)
    ptr, items = _batch_parts(list_offsets, group_offsets, xq.shape[1])
    _parallel(_run_part, ptr.shape[0] - 1, ptr, items, _MODE_TOPK, xq, _f32(xb), _i64(ids),
              list_offsets, _f32(centers), group_offsets, _i64(group_queries),
              _i64(group_slots), _i64(group_limits), _u8(valid), k, is_ip, D, I, 0.0,
              _NO_I64_1, _NO_I64_1, _NO_F32_1, _NO_I64_1)
    return D, I


def scan_lists_sq(xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                  centers: np.ndarray, sq_kind: int, vmin: np.ndarray, vdiff: np.ndarray,
                  by_residual: bool, group_offsets: np.ndarray, group_queries: np.ndarray,
                  group_slots: np.ndarray, group_limits: np.ndarray, valid: np.ndarray,
                  nprobe: int, k: int, metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``scan_lists`` on scalar-quantized lists (``sq_kind`` 0: 8 bits, 1: fp16), decoding each
    list once into a centred float32 buffer and running the Flat path on it.

    Peak extra memory: the (nq, nprobe, k) outputs, the fp16 decode table (256 KiB, built
    once per process), plus, per thread, one decoded list ((n + 1) x d float32), 6 rows of n
    float32 keys and 12 (n + k) bytes of selection scratch (n: the list's size).
    """
    is_ip = _check_metric(metric)
    sq_kind = int(sq_kind)
    if sq_kind not in (0, 1):
        raise ValidationError("sq_kind", sq_kind, "must be 0 (8 bits) or 1 (fp16)")
    nprobe, k, D, I, empty = _scan_outputs(xq.shape[0], nprobe, k, is_ip, out)
    if empty:
        return D, I
    xq, list_offsets, group_offsets = _f32(xq), _i64(list_offsets), _i64(group_offsets)
    d = xq.shape[1]
    if sq_kind == 0:
        codes8, codes16, tab = _u8(codes), _NO_U16_2, _NO_F32_1
        _check_codes(codes8, d, "one uint8 per component")
        vmin64 = np.asarray(vmin, dtype=np.float64).reshape(-1)
        vdiff64 = np.asarray(vdiff, dtype=np.float64).reshape(-1)
        if vmin64.shape != (d,) or vdiff64.shape != (d,):
            raise ValidationError("vmin/vdiff", (vmin64.shape, vdiff64.shape),
                                  f"must both have d = {d} entries for 8-bit codes")
        # component t = vmin + (code + 0.5) vdiff / 255 = base + code * scale; the kernel folds
        # the centroid into base per list (float64, rounded once)
        scale = (vdiff64 / 255.0).astype(np.float32)
        base = vmin64 + 0.5 * (vdiff64 / 255.0)
    else:
        codes8, codes16, tab = _NO_U8_2, np.ascontiguousarray(codes, dtype=np.uint16), f16_table()
        _check_codes(codes16, d, "one fp16 bit pattern per component")
        scale, base = _NO_F32_1, _NO_F64_1
    ptr, items = _batch_parts(list_offsets, group_offsets, d)
    _parallel(_sq_part, ptr.shape[0] - 1, ptr, items, xq, sq_kind, codes8, codes16, _i64(ids),
              list_offsets, _f32(centers), base, scale, tab, bool(by_residual), group_offsets,
              _i64(group_queries), _i64(group_slots), _i64(group_limits), _u8(valid), k, is_ip,
              D, I)
    return D, I


def scan_lists_pq(xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                  centers: np.ndarray, codebooks: np.ndarray, by_residual: bool,
                  group_offsets: np.ndarray, group_queries: np.ndarray, group_slots: np.ndarray,
                  group_limits: np.ndarray, valid: np.ndarray, nprobe: int, k: int,
                  metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    """``scan_lists`` on product-quantized lists by asymmetric distance computation: per list,
    its (query, probe) pairs four at a time, one lookup table each, one pass over the codes.

    Peak extra memory: the (nq, nprobe, k) outputs, a transposed copy of the codebooks
    (K x d float32), plus, per thread, 4 lookup tables (4 x M x K float32: 64 KiB for M = 16,
    K = 256), 4 x n keys and 12 (n + k) bytes of selection scratch (n: the list's size).
    """
    is_ip = _check_metric(metric)
    nprobe, k, D, I, empty = _scan_outputs(xq.shape[0], nprobe, k, is_ip, out)
    if empty:
        return D, I
    xq, list_offsets, group_offsets = _f32(xq), _i64(list_offsets), _i64(group_offsets)
    d = xq.shape[1]
    codebooks = _f32(codebooks)
    if codebooks.ndim != 3 or codebooks.shape[0] * codebooks.shape[2] != d \
            or not 1 <= codebooks.shape[1] <= 256:
        raise ValidationError("codebooks", codebooks.shape,
                              f"must be (M, K, dsub) with M * dsub = d = {d} and 1 <= K <= 256")
    M, K, _ = codebooks.shape
    codes = _u8(codes)
    _check_codes(codes, M, "one uint8 per sub-quantizer")
    if K < 256 and codes.size and int(codes.max()) >= K:  # the tables have K entries
        raise ValidationError("codes", int(codes.max()), f"must be < K = {K}")
    cbT = np.ascontiguousarray(codebooks.transpose(0, 2, 1))  # (M, dsub, K): loops along K
    ptr, items = _batch_parts(list_offsets, group_offsets, M)
    _parallel(_pq_part, ptr.shape[0] - 1, ptr, items, xq, codes, _i64(ids), list_offsets,
              _f32(centers), cbT, bool(by_residual), group_offsets, _i64(group_queries),
              _i64(group_slots), _i64(group_limits), _u8(valid), k, is_ip, D, I)
    return D, I


def merge_topk(D: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row of (nq, m) candidates, best first, ties by smaller id, padded.
    Entries with id -1 are padding and ignored. Peak extra memory: the outputs."""
    is_ip = _check_metric(metric)
    k = int(k)
    D = _f32(D)
    I = _i64(I)
    Do, Io = _padded((D.shape[0], k), is_ip)
    if D.shape[0] == 0 or k <= 0 or D.shape[1] == 0:
        return Do, Io
    nparts = 1 if D.size < (1 << 16) else _nthreads()
    _parallel(_merge_part, nparts, D, I, k, is_ip, Do, Io)
    return Do, Io


def rerank(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, candidates: np.ndarray, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-ranking of each query's candidate rows of ``xb``: (nq, k), best first, padded.

    Distances are computed in place of the gather (no (nq, kc, d) copy), then cut to k by
    ``merge_topk``. Peak extra memory: nq x kc x 12 bytes of candidate keys and ids.
    """
    is_ip = _check_metric(metric)
    k = int(k)
    xq, xb, ids, cand = _f32(xq), _f32(xb), _i64(ids), _i64(candidates)
    nq, kc = cand.shape
    if nq and kc and int(cand.max()) >= len(xb):
        raise ValidationError("candidates", int(cand.max()), f"must be < {len(xb)} (rows of xb) or -1")
    Dc, Ic = _padded((nq, kc), is_ip)
    if nq == 0 or kc == 0:
        return merge_topk(Dc, Ic, k, metric)
    nparts = 1 if nq * kc * xq.shape[1] < _SERIAL_WORK else min(_nthreads(), nq)
    _parallel(_rerank_part, nparts, xq, xb, ids, cand, is_ip, Dc, Ic)
    return merge_topk(Dc, Ic, k, metric)


def range_scan_lists(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                     centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
                     group_limits: np.ndarray, valid: np.ndarray, radius: float,
                     metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range search of a batch, ``(lims, D, I)`` in the Faiss convention, sorted best first.

    Two passes over the lists (count, then fill: distances are computed twice), then a
    per-query sort. Peak extra memory: the results plus two int64 per pair.
    """
    is_ip = _check_metric(metric)
    nq = xq.shape[0]
    xq, xb, ids = _f32(xq), _f32(xb), _i64(ids)
    list_offsets, centers = _i64(list_offsets), _f32(centers)
    group_offsets, group_queries = _i64(group_offsets), _i64(group_queries)
    group_limits, valid = _i64(group_limits), _u8(valid)
    npairs = group_queries.shape[0]
    if nq == 0 or npairs == 0:
        return np.zeros(nq + 1, dtype=np.int64), _NO_F32_1.copy(), _NO_I64_1.copy()
    group_slots = np.zeros(npairs, dtype=np.int64)
    radius = float(radius)
    ptr, items = _batch_parts(list_offsets, group_offsets, xq.shape[1])
    nparts = ptr.shape[0] - 1
    counts = np.zeros(npairs, dtype=np.int64)
    _parallel(_run_part, nparts, ptr, items, _MODE_COUNT, xq, xb, ids, list_offsets, centers,
              group_offsets, group_queries, group_slots, group_limits, valid, 1, is_ip,
              _NO_F32_3, _NO_I64_3, radius, counts, _NO_I64_1, _NO_F32_1, _NO_I64_1)
    lims, starts = _range_layout(group_queries, counts, nq)
    Dr = np.empty(lims[-1], dtype=np.float32)
    Ir = np.empty(lims[-1], dtype=np.int64)
    _parallel(_run_part, nparts, ptr, items, _MODE_FILL, xq, xb, ids, list_offsets, centers,
              group_offsets, group_queries, group_slots, group_limits, valid, 1, is_ip,
              _NO_F32_3, _NO_I64_3, radius, counts, starts, Dr, Ir)
    _parallel(_range_sort_part, min(nparts, nq), lims, Dr, Ir, is_ip)
    return lims, Dr, Ir


def exact_knn(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int,
              metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` of ``xq`` against ``xb`` (N, d) with ``ids``: (nq, k), padded.

    Work is cut in tiles (query block x database chunk), at least two per thread. nq <= 3:
    direct differences. Larger batches: 64-query blocks, the micro-kernel on data centred near
    ``xb`` (``_centre_of``, l2). Peak extra memory: per thread a 512 x d centred block;
    partial results chunks x nq x k (chunks = 1 once nq >= 128 x threads), a copy of ``xq``.
    """
    is_ip = _check_metric(metric)
    k = int(k)
    xq, xb, ids = _f32(xq), _f32(xb), _i64(ids)
    nq, d = xq.shape
    N = xb.shape[0]
    D, I = _padded((nq, k), is_ip)
    if nq == 0 or k <= 0 or N == 0:
        return D, I
    nthreads = 1 if nq * N * d < _SERIAL_WORK else _nthreads()
    direct = nq <= _DIRECT_MAX_ROWS
    qbs = nq if direct else _EXACT_QBLOCK
    nqb = (nq + qbs - 1) // qbs
    nch = max(1, min((2 * nthreads + nqb - 1) // nqb, (N + _EXACT_XBLOCK - 1) // _EXACT_XBLOCK))
    if nthreads == 1:
        nch = 1
    chunk = (N + nch - 1) // nch
    if direct or is_ip:
        mu = np.zeros(d, dtype=np.float32)
    else:
        mu = _centre_of(xb)
    Qs = np.zeros((0 if direct else nq, d), dtype=np.float32)
    qn = np.zeros(nq, dtype=np.float32)
    if not direct:
        _prepare_queries(xq, mu, is_ip, Qs, qn)
    if nch == 1:
        PD, PI = D.reshape(nq, 1, k), I.reshape(nq, 1, k)
    else:
        PD, PI = _padded((nq, nch, k), is_ip)
    ntiles = nqb * nch
    _parallel(_exact_part, min(nthreads, ntiles), ntiles, nch, chunk, qbs, direct, xq, Qs, qn,
              xb, ids, mu, k, is_ip, PD, PI)
    if nch > 1:
        _parallel(_merge_part, min(nthreads, nq), PD.reshape(nq, nch * k),
                  PI.reshape(nq, nch * k), k, is_ip, D, I)
    return D, I


# ------------------------------------------------------------------ assignment (k-means, add stage)

_ASSIGN_BLOCK = 2048
"""Rows per assignment GEMM: a (2048 x k) float32 score block stays in cache."""


def _scores_into(x: np.ndarray, ct: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``x @ ct`` into a reused buffer. Dask workers set MALLOC_TRIM_THRESHOLD_, which turns
    off glibc's adaptive mmap threshold: a fresh multi-MB array per block would be mmapped and
    page-faulted every time, costing about a third of the GEMM."""
    out = buf[:len(x)]
    np.matmul(x, ct, out=out)
    return out


def _assign_operands(x: np.ndarray, centroids: np.ndarray, is_ip: bool):
    """Operands of the assignment GEMM. For l2 both sides are centred near the centroids
    (``_centre_of``): distances are unchanged and ||c||^2 - 2<x, c> no longer cancels on offset
    data (Faiss FAQ). Returns (x, centroids^T, ||c||^2, score buffer, centre)."""
    x = np.require(x, dtype=np.float32, requirements=["C", "A"])
    centroids = np.require(centroids, dtype=np.float32, requirements=["C", "A"])
    mu = np.zeros(centroids.shape[1], dtype=np.float32) if is_ip or len(centroids) == 0 else _centre_of(centroids)
    if mu.any():
        x, centroids = x - mu, centroids - mu
    c_norms = np.einsum("ij,ij->i", centroids, centroids)
    buf = np.empty((min(_ASSIGN_BLOCK, max(len(x), 1)), len(centroids)), dtype=np.float32)
    return x, np.ascontiguousarray(centroids.T), c_norms, buf, mu


def assign(x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """Nearest centroid of every row (l2) or largest inner product (ip), ties to the smaller
    index: a BLAS GEMM per 2048-row block, then one fused Numba pass over the scores.
    Peak extra memory: a centred copy of ``x`` (l2) and one (2048 x k) float32 score block."""
    is_ip = _check_metric(metric)
    x, ct, c_norms, buf, _ = _assign_operands(x, centroids, is_ip)
    labels = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), _ASSIGN_BLOCK):
        assign_labels(_scores_into(x[s:s + _ASSIGN_BLOCK], ct, buf), c_norms, is_ip, labels[s:s + _ASSIGN_BLOCK])
    return labels


def kmeans_stats(x: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, float]:
    """One Lloyd step's statistics of ``x``: per-centroid sums (float64 (k, d)), counts (int64)
    and the objective (sum of squared distances to the assigned centroid, l2; sum of inner
    products with it, ip). Peak extra memory: as ``assign``, plus the sums."""
    is_ip = _check_metric(metric)
    x, ct, c_norms, buf, mu = _assign_operands(x, centroids, is_ip)
    k, d = centroids.shape
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    obj = 0.0
    for s in range(0, len(x), _ASSIGN_BLOCK):
        xs = x[s:s + _ASSIGN_BLOCK]
        obj += assign_accumulate(_scores_into(xs, ct, buf), c_norms, xs, is_ip, sums, counts)
    sums += counts[:, None] * mu.astype(np.float64)[None, :]  # the sums of the uncentred rows
    return sums, counts, obj
