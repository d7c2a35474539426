"""The compressed-list kernels (``scan_lists_sq``, ``scan_lists_pq``) held to the NumPy reference.

The batches are those of ``tests/test_kernels.py`` (empty lists, a one-vector list, lists
smaller and larger than k, random probes so that several queries share a list), their vectors
encoded into codes: scalar quantizer 8 bits (``sq_kind`` 0, range trained on the data) and fp16
(``sq_kind`` 1), product quantizer with M in {1, 2, 4, 8}, dsub in {1, 3, 4}, K in {2, 16, 256}
(codes: the nearest codebook entry of each sub-vector), by_residual or not, both metrics.

The truth is the reference scan of the float64 reconstruction, itself checked against
``scan_lists`` on explicitly reconstructed vectors (``test_reference_is_scan_of_reconstruction``).
Ids are compared exactly except at near ties (``assert_knn_equal`` of ``tests/test_kernels.py``:
the backend's id must then be that close in float64); duplicate codes are exact ties and must
come out smaller id first, and on integer-valued reconstructions the results must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

from distann.errors import ValidationError
from distann.kernels import get_backend
from tests.test_kernels import (
    ATOL_FRACTION,
    METRICS,
    SIZES,
    Batch,
    _exact,
    _scale,
    assert_knn_equal,
    backend,  # noqa: F401 - fixtures shared with tests/test_kernels.py
    threads,  # noqa: F401
)

REF = get_backend("numpy")

# Tolerance: the rule of tests/test_kernels.py (RTOL and ATOL_FRACTION = 1e-5 of the largest
# magnitude the float32 sums can carry, ``_scale`` of the reconstructed vectors), which covers:
# * SQ: the float32 decode adds one rounding per component (relative 2^-24 of the component
#   after centring: the kernel folds vmin and the centroid into one offset rounded from float64)
#   to the sum of d float32 products (at most ~d 2^-24 = 2e-6 of the magnitudes for d = 33);
# * PQ: each table entry is a float32 sum of dsub terms, and a key the float32 sum of M
#   entries: at most ~(dsub + M) 2^-24 (7e-7 for M = 8, dsub = 4) of the magnitudes; with
#   by_residual and ip, <q, centroid> adds d more terms.
# All far below 1e-5, and far above what a wrong table entry or a lost centroid would change.


# --------------------------------------------------------------------------------------------
# Encoding and reconstruction (test side, independent of the reference's code)
# --------------------------------------------------------------------------------------------


def _targets(batch, by_residual):
    """What the codes encode: the residuals to each vector's list centroid, or the vectors."""
    x = batch.xb.astype(np.float64)
    if by_residual:
        sizes = np.diff(batch.list_offsets)
        x = x - np.repeat(batch.centers.astype(np.float64), sizes, axis=0)
    return x


def _centroid_rows(batch):
    return np.repeat(batch.centers.astype(np.float64), np.diff(batch.list_offsets), axis=0)


def encode_sq(batch, sq_kind, by_residual):
    """(codes, vmin, vdiff) of the batch's vectors: 8 bits with the range of the data, or fp16."""
    x = _targets(batch, by_residual)
    d = batch.xq.shape[1]
    if sq_kind == 1:
        return (x.astype(np.float16).view(np.uint16), np.zeros(0, np.float32),
                np.zeros(0, np.float32))
    vmin = (x.min(0) if len(x) else np.zeros(d)).astype(np.float32)
    vdiff = ((x.max(0) if len(x) else np.ones(d)) - vmin).astype(np.float32)
    vdiff = np.maximum(vdiff, np.float32(1e-3))
    codes = np.clip(np.floor((x - vmin) / vdiff * 255), 0, 255).astype(np.uint8)
    return codes, vmin, vdiff


def reconstruct_sq(codes, sq_kind, vmin, vdiff):
    """float64 reconstruction, written out from the contract in ``distann.kernels.base``."""
    if sq_kind == 1:
        return codes.view(np.float16).astype(np.float64)
    out = np.empty(codes.shape, dtype=np.float64)
    for t in range(codes.shape[1]):
        code = codes[:, t].astype(np.float64)
        out[:, t] = float(vmin[t]) + (code + 0.5) / 255.0 * float(vdiff[t])
    return out


def encode_pq(rng, batch, M, K, by_residual):
    """(codes, codebooks): random codebooks spread like the data, each sub-vector coded by its
    nearest entry (ties and unused entries are fine)."""
    x = _targets(batch, by_residual)
    d = batch.xq.shape[1]
    dsub = d // M
    mu = x.mean(0) if len(x) else np.zeros(d)
    sd = x.std(0) + 0.5 if len(x) else np.ones(d)
    cb = (mu + sd * rng.standard_normal((K, d))).reshape(K, M, dsub).transpose(1, 0, 2)
    cb = np.ascontiguousarray(cb, dtype=np.float32)
    codes = np.empty((len(x), M), dtype=np.uint8)
    for m in range(M):
        sub = x[:, m * dsub:(m + 1) * dsub]
        dist = ((sub[:, None, :] - cb[m][None].astype(np.float64)) ** 2).sum(-1)
        codes[:, m] = dist.argmin(1) if len(x) else 0
    return codes, cb


def reconstruct_pq(codes, codebooks):
    M = codebooks.shape[0]
    return np.concatenate([codebooks[m][codes[:, m]].astype(np.float64) for m in range(M)], axis=1)


class Coded:
    """A batch of ``tests/test_kernels.py`` whose vectors are replaced by codes; ``recon`` is
    the float64 reconstruction (centroid added when ``by_residual``) the results must match."""

    def __init__(self, batch, by_residual, sq=None, pq=None):
        self.b = batch
        self.by_residual = by_residual
        self.sq, self.pq = sq, pq
        if sq is not None:
            codes, sq_kind, vmin, vdiff = sq
            recon = reconstruct_sq(codes, sq_kind, vmin, vdiff)
        else:
            codes, cb = pq
            recon = reconstruct_pq(codes, cb)
        if by_residual:
            recon = recon + _centroid_rows(batch)
        self.recon = recon
        self._by_id = {int(i): r for r, i in enumerate(batch.ids)}

    @classmethod
    def sq_of(cls, batch, sq_kind, by_residual):
        codes, vmin, vdiff = encode_sq(batch, sq_kind, by_residual)
        return cls(batch, by_residual, sq=(codes, sq_kind, vmin, vdiff))

    @classmethod
    def pq_of(cls, rng, batch, M, K, by_residual):
        return cls(batch, by_residual, pq=encode_pq(rng, batch, M, K, by_residual))

    def scan(self, mod, k, metric):
        b = self.b
        groups = (b.group_offsets, b.group_queries, b.group_slots, b.group_limits, b.valid,
                  b.nprobe, k, metric)
        if self.sq is not None:
            codes, sq_kind, vmin, vdiff = self.sq
            return mod.scan_lists_sq(b.xq, codes, b.ids, b.list_offsets, b.centers, sq_kind,
                                     vmin, vdiff, self.by_residual, *groups)
        codes, cb = self.pq
        return mod.scan_lists_pq(b.xq, codes, b.ids, b.list_offsets, b.centers, cb,
                                 self.by_residual, *groups)

    def scan_flat_ref(self, k, metric):
        """Reference ``scan_lists`` on the explicit reconstruction."""
        b = self.b
        return REF.scan_lists(b.xq, self.recon, b.ids, b.list_offsets, b.centers,
                              b.group_offsets, b.group_queries, b.group_slots, b.group_limits,
                              b.valid, b.nprobe, k, metric)

    def check(self, mod, ks, metric):
        """``mod`` against the reference for each k (the reference once, at the largest k: its
        top-k is a prefix of its top-kmax)."""
        Dr_all, Ir_all = self.scan(REF, max(ks), metric)
        atol = ATOL_FRACTION * _scale(self.b.xq, self.recon, metric)
        nprobe = self.b.nprobe
        pad = np.inf if metric == "l2" else -np.inf
        for k in ks:
            D, I = self.scan(mod, k, metric)
            assert_knn_equal(D, I, Dr_all[..., :k], Ir_all[..., :k], atol,
                             lambda row, idx: _exact(self.b.xq[row // nprobe],
                                                     self.recon[self._by_id[int(idx)]], metric))
            assert np.all(D[I < 0] == pad)


# list sizes: empty lists, a single vector, lists smaller and larger than k (tests/test_kernels.py)
NLIST = len(SIZES)
KS = (1, 7, 300)  # 300 > every list and > the 254 vectors of the batch; 7 and 300 on both
#                   sides of the backend's small-k selection switch


# --------------------------------------------------------------------------------------------
# The reference's semantics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("by_residual", [False, True])
def test_reference_is_scan_of_reconstruction(metric, by_residual):
    """``scan_lists_sq/pq`` of the reference == reference ``scan_lists`` on the vectors
    reconstructed here from the written contract (centroid added when by_residual)."""
    rng = np.random.default_rng([len(metric), by_residual])
    batch = Batch(rng, SIZES, 12, 9, 3, max_codes=50, valid_frac=0.8)
    cases = [Coded.sq_of(batch, 0, by_residual), Coded.sq_of(batch, 1, by_residual),
             Coded.pq_of(rng, batch, 4, 16, by_residual),
             Coded.pq_of(rng, batch, 12, 3, by_residual)]
    for case in cases:
        D, I = case.scan(REF, 20, metric)
        Df, If = case.scan_flat_ref(20, metric)
        # the same float64 values by two computations, rounded to float32: equal up to the
        # last float32 bit (a float64 difference of one ulp may round either way)
        np.testing.assert_array_equal(I, If)
        np.testing.assert_allclose(D, Df, rtol=1e-6, atol=0)
        assert (I >= 0).sum() > 50  # results to compare, not all padding
    # the centroid matters (ip: a per-list shift of the distances, not of the order)
    if by_residual:
        plain = Coded(batch, False, sq=cases[0].sq)
        D0, D1 = plain.scan(REF, 20, metric)[0], cases[0].scan(REF, 20, metric)[0]
        fin = np.isfinite(D0) & np.isfinite(D1)
        assert fin.sum() > 50 and np.abs(D0[fin] - D1[fin]).max() > 0.1


# --------------------------------------------------------------------------------------------
# scan_lists_sq
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("sq_kind", [0, 1])
@pytest.mark.parametrize("by_residual", [False, True])
def test_sq_matches_reference(backend, threads, metric, sq_kind, by_residual):
    rng = np.random.default_rng([sq_kind, by_residual, len(metric)])
    for d in (1, 3, 17, 33):
        for nq in (1, 2, 23):  # 1-3 pairs per list: direct loop; more: micro-kernel
            for nprobe in (1, 3, NLIST):
                batch = Batch(rng, SIZES, d, nq, nprobe)
                Coded.sq_of(batch, sq_kind, by_residual).check(backend, KS, metric)


def test_sq_fp16_bit_patterns(backend, threads):
    """Every kind of finite half: subnormals, signed zeros, the largest magnitudes."""
    rng = np.random.default_rng(16)
    for metric in METRICS:
        for by_residual in (False, True):
            batch = Batch(rng, SIZES, 9, 23, 4)
            bits = rng.integers(0, 1 << 16, size=(len(batch.ids), 9)).astype(np.uint16)
            bits[(bits & 0x7C00) == 0x7C00] &= 0x83FF  # no inf/NaN: exponent 31 -> 0 (subnormal)
            bits[: len(bits) // 2] &= 0x8FFF  # half the rows small (exponent < 8: |x| < 2^-7)
            Coded(batch, by_residual, sq=(bits, 1, np.zeros(0, np.float32),
                                          np.zeros(0, np.float32))).check(backend, (5, 60), metric)


# --------------------------------------------------------------------------------------------
# scan_lists_pq
# --------------------------------------------------------------------------------------------

PQ_SHAPES = [(1, 1), (1, 4), (2, 3), (4, 4), (8, 1), (8, 3)]  # (M, dsub): d = 1 .. 24


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("by_residual", [False, True])
def test_pq_matches_reference(backend, threads, metric, by_residual):
    rng = np.random.default_rng([by_residual, len(metric), 1])
    for M, dsub in PQ_SHAPES:
        for K in (2, 16, 256):
            for nq, nprobe in ((1, NLIST), (2, 3), (23, 1), (23, NLIST)):
                # 23 queries over 8 lists: 2-23 pairs per list, the 4-pair blocks full and not
                batch = Batch(rng, SIZES, M * dsub, nq, nprobe)
                Coded.pq_of(rng, batch, M, K, by_residual).check(backend, KS, metric)


# --------------------------------------------------------------------------------------------
# Both: awkward data, limits and masks, exact ties
# --------------------------------------------------------------------------------------------

CODECS = ["sq8", "fp16", "pq"]


def _coded(rng, batch, codec, by_residual):
    if codec == "pq":
        d = batch.xq.shape[1]
        M = 8 if d % 8 == 0 else 4 if d % 4 == 0 else 1
        return Coded.pq_of(rng, batch, M, 256, by_residual)
    return Coded.sq_of(batch, 0 if codec == "sq8" else 1, by_residual)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("metric", METRICS)
def test_codecs_offset_data(backend, threads, codec, metric):
    """Large common offset, small spread (the cancellation case of the norm trick): l2 must keep
    the float32 precision of the spread (the tolerance is relative to it, ``_scale``)."""
    rng = np.random.default_rng([len(codec), len(metric), 2])
    for by_residual in (False, True):
        for d, nq in ((8, 2), (24, 23)):
            batch = Batch(rng, SIZES, d, nq, 4, kind="offset")
            _coded(rng, batch, codec, by_residual).check(backend, (5, 300), metric)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("metric", METRICS)
def test_codecs_max_codes_and_valid_mask(backend, threads, codec, metric):
    rng = np.random.default_rng([len(codec), len(metric), 3])
    for nq in (2, 23):
        for max_codes, valid_frac in ((20, None), (None, 0.6), (50, 0.3), (None, 0.0)):
            batch = Batch(rng, SIZES, 16, nq, 5, max_codes=max_codes, valid_frac=valid_frac)
            _coded(rng, batch, codec, nq == 23).check(backend, (3, 60), metric)


def _integer_codes(rng, batch, codec, by_residual):
    """Few distinct codes (many exact duplicates) whose reconstructions are small integers, on
    integer queries and centroids: float32 arithmetic is then exact, so the results must equal
    the reference's bit for bit and duplicates tie exactly (smaller id first)."""
    n, d = batch.xb.shape
    pick = rng.integers(0, 5, size=n)
    if codec == "pq":
        M, K = d // 3, 16
        cb = rng.integers(-3, 4, size=(M, K, 3)).astype(np.float32)
        pool = rng.integers(0, K, size=(5, M)).astype(np.uint8)
        return Coded(batch, by_residual, pq=(pool[pick], cb))
    pool = rng.integers(-4, 5, size=(5, d)).astype(np.float64)
    if codec == "fp16":
        codes = pool.astype(np.float16).view(np.uint16)[pick]
        return Coded(batch, by_residual, sq=(codes, 1, np.zeros(0, np.float32),
                                             np.zeros(0, np.float32)))
    # vmin + (code + 0.5) / 255 * vdiff = 2 code - 255 with vmin = -256, vdiff = 510
    codes = ((pool + 255) / 2).astype(np.uint8)[pick]
    vmin = np.full(d, -256, np.float32)
    vdiff = np.full(d, 510, np.float32)
    coded = Coded(batch, by_residual, sq=(codes, 0, vmin, vdiff))
    assert np.array_equal(coded.recon, np.round(coded.recon))  # odd integers 2 code - 255
    return coded


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("metric", METRICS)
def test_codecs_duplicate_codes_exact(backend, threads, codec, metric):
    rng = np.random.default_rng([len(codec), len(metric), 4])
    for by_residual in (False, True):
        for nq, valid_frac in ((2, None), (23, None), (23, 0.5)):
            batch = Batch(rng, SIZES, 15, nq, 5, kind="dups", valid_frac=valid_frac)
            coded = _integer_codes(rng, batch, codec, by_residual)
            for k in (4, 300):
                D, I = coded.scan(backend, k, metric)
                Dr, Ir = coded.scan(REF, k, metric)
                np.testing.assert_array_equal(I, Ir)
                np.testing.assert_array_equal(D, Dr)
                # duplicates present among the results: the ties really were exercised
                row = I.reshape(-1, k)
                dist = D.reshape(-1, k)
                assert any(len(set(dist[r][row[r] >= 0].tolist())) < (row[r] >= 0).sum()
                           for r in range(len(row)))


# --------------------------------------------------------------------------------------------
# Degenerate inputs and validation
# --------------------------------------------------------------------------------------------


def test_codecs_empty_inputs(backend):
    rng = np.random.default_rng(5)
    for mod in (backend, REF):
        batch = Batch(rng, [0, 0, 0], 4, 3, 2)
        for coded in (Coded.sq_of(batch, 0, True), Coded.sq_of(batch, 1, False),
                      Coded(batch, True, pq=(np.zeros((0, 2), np.uint8),
                                             np.ones((2, 16, 2), np.float32)))):
            D, I = coded.scan(mod, 4, "l2")
            assert D.shape == (3, 2, 4) and np.all(I == -1) and np.all(D == np.inf)
            assert D.dtype == np.float32 and I.dtype == np.int64
        empty_q = np.zeros((0, 4), np.float32)
        no_groups = (np.zeros(4, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                     np.zeros(0, np.int64), batch.valid, 2, 4, "ip")
        D, I = mod.scan_lists_sq(empty_q, np.zeros((0, 4), np.uint8), batch.ids, batch.list_offsets,
                                 batch.centers, 0, np.zeros(4, np.float32), np.ones(4, np.float32),
                                 False, *no_groups)
        assert D.shape == (0, 2, 4) and I.dtype == np.int64
        D, I = mod.scan_lists_pq(empty_q, np.zeros((0, 2), np.uint8), batch.ids, batch.list_offsets,
                                 batch.centers, np.ones((2, 16, 2), np.float32), False, *no_groups)
        assert D.shape == (0, 2, 4) and I.dtype == np.int64


def test_codecs_reject_bad_arguments(backend):
    rng = np.random.default_rng(6)
    batch = Batch(rng, [3, 4], 6, 2, 1)
    sq = Coded.sq_of(batch, 0, False)
    pq = Coded.pq_of(rng, batch, 2, 16, False)
    for mod in (backend, REF):
        with pytest.raises(ValidationError, match="metric"):
            sq.scan(mod, 2, "cosine")
        with pytest.raises(ValidationError, match="metric"):
            pq.scan(mod, 2, "cosine")
        with pytest.raises(ValidationError, match="sq_kind"):
            mod.scan_lists_sq(batch.xq, sq.sq[0], batch.ids, batch.list_offsets, batch.centers,
                              2, sq.sq[2], sq.sq[3], False, batch.group_offsets,
                              batch.group_queries, batch.group_slots, batch.group_limits,
                              batch.valid, 1, 2, "l2")
        bad_cb = np.ones((4, 16, 2), np.float32)  # M * dsub = 8 != d = 6
        with pytest.raises(ValidationError, match="codebooks"):
            mod.scan_lists_pq(batch.xq, pq.pq[0], batch.ids, batch.list_offsets, batch.centers,
                              bad_cb, False, batch.group_offsets, batch.group_queries,
                              batch.group_slots, batch.group_limits, batch.valid, 1, 2, "l2")
        big = pq.pq[0].copy()
        big[0, 0] = 16  # an entry beyond K = 16
        with pytest.raises(ValidationError, match="codes"):
            mod.scan_lists_pq(batch.xq, big, batch.ids, batch.list_offsets, batch.centers,
                              pq.pq[1], False, batch.group_offsets, batch.group_queries,
                              batch.group_slots, batch.group_limits, batch.valid, 1, 2, "l2")
