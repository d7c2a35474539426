"""The kernel interface: what every backend (NumPy reference, Numba CPU, later GPU) provides.

Every backend is a module exposing the module-level functions below with exactly these
signatures. The NumPy reference (``distann.kernels.reference``) is the truth; every other
backend is held to it by ``tests/test_kernels.py``.

Conventions shared by all kernels
---------------------------------
* ``metric`` is ``"l2"`` (squared Euclidean distance, smaller is better) or ``"ip"`` (inner
  product, larger is better). Cosine is ``"ip"`` on vectors normalized by the caller.
* Results follow Faiss: ``D`` float32, ``I`` int64, best first; missing results are padded
  with id ``-1`` and distance ``+inf`` (l2) or ``-inf`` (ip). Ties are broken by smaller id.
* Inputs are C-contiguous: vectors float32, ids/offsets int64, masks uint8.
* List-major layout of a batch (``ListBatch``): the probed lists are concatenated in
  ``xb`` (N, d) / ``ids`` (N,) and list ``j`` of the batch is ``xb[list_offsets[j]:list_offsets[j+1]]``.
  The (query, probe) pairs are grouped by list: the pairs of list ``j`` are
  ``group_offsets[j]:group_offsets[j+1]`` of ``group_queries`` (query row in ``xq``),
  ``group_slots`` (which probe of that query, 0..nprobe-1, so each pair has its own output
  slot and lists can be scanned in parallel without races) and ``group_limits`` (how many
  leading vectors of the list this pair may scan: the list size, or less under max_codes).
* ``centers`` (nlists_in_batch, d) float32 holds the coarse centroid of each list in the batch.
  L2 kernels compute distances on vectors centred on the list's centroid, which leaves
  distances unchanged and avoids the catastrophic cancellation of ||q||^2 + ||x||^2 - 2<q, x>
  on large, offset data (Faiss FAQ).
* ``valid`` is a uint8 mask over the N concatenated vectors (1: may be returned) or an empty
  array meaning "all valid"; it implements id filtering.

Compressed lists
----------------
``scan_lists_sq`` and ``scan_lists_pq`` take the lists' codes *as stored* instead of float32
vectors, and return exactly what ``scan_lists`` returns on the reconstructed vectors (up to
float rounding): the reconstruction is part of the kernel, list by list, so a batch never holds
its probed lists decoded.

* Scalar quantizer (``sq_kind``): 0 = 8 bits, ``codes`` uint8 (N, d), component t of a code
  reconstructs to ``vmin[t] + (code + 0.5) / 255 * vdiff[t]`` (Faiss ``QT_8bit``); 1 = fp16,
  ``codes`` uint16 (N, d) holding IEEE half-precision bit patterns (``vmin``/``vdiff`` unused).
* Product quantizer: ``codes`` uint8 (N, M), ``codebooks`` float32 (M, K, dsub) with K <= 256
  and M * dsub = d; sub-vector m of a code reconstructs to ``codebooks[m, code[m]]``.
* ``by_residual``: the reconstruction is the residual to the list's coarse centroid
  (``centers[j]``); the vector is ``centers[j] + reconstruction`` (Faiss ``by_residual``).
  Otherwise the reconstruction is the vector itself.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class KernelBackend(Protocol):
    """A module implementing the kernels. Chosen by name in ``distann.kernels.get_backend``."""

    name: str

    def coarse_quantize(self, xq: np.ndarray, centroids: np.ndarray, nprobe: int,
                        metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Distances from each query to all centroids, top-``nprobe`` per query.

        Returns ``(D, I)`` of shape (nq, nprobe), best first (ties: smaller centroid index).
        Requires 1 <= nprobe <= nlist (the caller validates).
        """

    def scan_lists(self, xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                   centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
                   group_slots: np.ndarray, group_limits: np.ndarray, valid: np.ndarray,
                   nprobe: int, k: int, metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
        """List-major kNN scan of a batch.

        Returns per-(query, probe) partial results ``(D, I)`` of shape (nq, nprobe, k): slot
        ``[q, s]`` holds the best ``k`` of the pair (q, s), best first and padded; slots of
        pairs not present in the groups are all padding. With ``out`` (a padded ``(D, I)``
        pair of that shape) the results are written into it and only the slots of the pairs
        present are touched, so consecutive calls on different lists of the same batch (one
        shard after another) fill one output: each slot belongs to the one list its probe
        names. ``scan_lists_sq`` and ``scan_lists_pq`` take ``out`` the same way.
        """

    def merge_topk(self, D: np.ndarray, I: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Merge candidate lists: ``D``/``I`` of shape (nq, m) (any order, padding allowed) to
        the best ``k`` per row, shape (nq, k), best first, ties by smaller id, padded."""

    def range_scan_lists(self, xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                         centers: np.ndarray, group_offsets: np.ndarray, group_queries: np.ndarray,
                         group_limits: np.ndarray, valid: np.ndarray, radius: float,
                         metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Range search of a batch: every vector with distance < radius (l2, squared distance)
        or similarity > radius (ip). Returns ``(lims, D, I)`` in the Faiss convention
        (results of query i are ``D[lims[i]:lims[i+1]]``), each query's results sorted best
        first (ties by smaller id)."""

    def scan_lists_sq(self, xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                      centers: np.ndarray, sq_kind: int, vmin: np.ndarray, vdiff: np.ndarray, by_residual: bool,
                      group_offsets: np.ndarray, group_queries: np.ndarray, group_slots: np.ndarray,
                      group_limits: np.ndarray, valid: np.ndarray, nprobe: int, k: int,
                      metric: str, out=None) -> tuple[np.ndarray, np.ndarray]:
        """``scan_lists`` on scalar-quantized lists (see "Compressed lists")."""

    def scan_lists_pq(self, xq: np.ndarray, codes: np.ndarray, ids: np.ndarray, list_offsets: np.ndarray,
                      centers: np.ndarray, codebooks: np.ndarray, by_residual: bool, group_offsets: np.ndarray,
                      group_queries: np.ndarray, group_slots: np.ndarray, group_limits: np.ndarray,
                      valid: np.ndarray, nprobe: int, k: int, metric: str,
                      out=None) -> tuple[np.ndarray, np.ndarray]:
        """``scan_lists`` on product-quantized lists by asymmetric distance computation: a lookup
        table per (query, list) pair, then M table lookups per code (see "Compressed lists")."""

    def rerank(self, xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, candidates: np.ndarray, k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Exact re-ranking (RFlat): ``candidates`` (nq, kc) int64 are rows of ``xb`` (N, d) (-1:
        none; distinct within a query, as candidates from distinct lists are); the best ``k`` of each query's candidates by exact distance,
        ``(D, I)`` of shape (nq, k) with ``I`` taken from ``ids``, best first, padded."""

    def assign(self, x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
        """Index of the nearest centroid of every row (l2) or of the largest inner product (ip),
        ties to the smaller index: the add stage's and the codecs' assignment."""

    def kmeans_stats(self, x: np.ndarray, centroids: np.ndarray,
                     metric: str) -> tuple[np.ndarray, np.ndarray, float]:
        """One Lloyd step over ``x``: per-centroid sums (float64 (k, d)), counts (int64 (k,)) of
        the rows assigned as by ``assign``, and the objective: the sum of squared distances to
        the assigned centroid (l2) or of inner products with it (ip)."""

    def exact_knn(self, xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int,
                  metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force kNN of ``xq`` against one block ``xb`` (N, d) with ids: (nq, k), best first, padded."""
