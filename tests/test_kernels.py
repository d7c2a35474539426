"""Every kernel backend held to the NumPy reference (``distann.kernels.reference``).

Awkward shapes on purpose: empty lists, single-vector lists, k larger than a list and than the
whole batch (padding), d not a multiple of the SIMD width, all-zero vectors, large offset data
(the cancellation case of ||q||^2 + ||x||^2 - 2<q, x>), duplicate vectors (ties broken by the
smaller id), max_codes limits, valid masks, nprobe 1 and nlist, both metrics, range search.

Ids are compared exactly. The only allowed difference is a *near* tie: two candidates whose
float64 distances differ by less than the float32 tolerance may come out in either order,
and the test then checks, in float64, that the backend's id really is that close. Exact ties
(duplicates, integer data) must come out identical: smaller id first.
"""

from __future__ import annotations

import numpy as np
import pytest

from distann.errors import ValidationError
from distann.kernels import available_backends, get_backend

REF = get_backend("numpy")


def _simulated() -> bool:
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


# The cuda backend runs this whole suite on a real device only (marked gpu); in the simulator
# it is too slow for these sizes and has its own selection of cases (tests/test_cuda.py).
BACKENDS = [name for name in available_backends() if name not in ("numpy", "cuda")]
if "cuda" in available_backends() and not _simulated():
    BACKENDS.append(pytest.param("cuda", marks=pytest.mark.gpu))
METRICS = ("l2", "ip")
DIMS = (1, 3, 17, 33, 100)

# float32 against the float64 reference: a sum of d products carries a relative error of at
# most ~d * 2^-24 of the sum of magnitudes (6e-6 for d = 100), usually far less; 1e-5 of the
# largest possible magnitude (``_scale``) leaves a margin and is still ~1e6 times tighter than
# the error of the uncentred norm trick on the offset data below.
RTOL = 1e-5
ATOL_FRACTION = 1e-5


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


@pytest.fixture(params=["auto", "forced-parallel"])
def threads(request, monkeypatch, backend):
    """Run each case as the backend decides and once with small-work shortcuts disabled and an
    odd thread count, so the multi-part code paths (balancing, chunk merges) run on tiny data."""
    if request.param == "forced-parallel":
        if hasattr(backend, "_SERIAL_WORK"):
            monkeypatch.setattr(backend, "_SERIAL_WORK", 0)
        if hasattr(backend, "_nthreads"):
            monkeypatch.setattr(backend, "_nthreads", lambda: 3)
    return request.param


# --------------------------------------------------------------------------------------------
# Data and batch construction
# --------------------------------------------------------------------------------------------


def _vectors(rng, n, d, kind):
    if kind == "normal":
        return rng.standard_normal((n, d)).astype(np.float32)
    if kind == "offset":  # Faiss FAQ case: large common offset, small spread
        return (1e4 + rng.standard_normal((n, d))).astype(np.float32)
    if kind == "zeros":
        return np.zeros((n, d), dtype=np.float32)
    if kind == "dups":  # few distinct small-integer vectors: exact arithmetic, exact ties
        pool = rng.integers(-3, 4, size=(5, d)).astype(np.float32)
        return pool[rng.integers(0, len(pool), size=n)]
    raise AssertionError(kind)


class Batch:
    """A list-major batch over lists of the given sizes, with random distinct probes."""

    def __init__(self, rng, sizes, d, nq, nprobe, kind="normal", max_codes=None,
                 valid_frac=None):
        sizes = np.asarray(sizes, dtype=np.int64)
        nlist = len(sizes)
        n = int(sizes.sum())
        self.xb = _vectors(rng, n, d, kind)
        self.xq = _vectors(rng, nq, d, kind)
        self.ids = (rng.permutation(n) + 1000).astype(np.int64)
        self.list_offsets = np.zeros(nlist + 1, dtype=np.int64)
        self.list_offsets[1:] = np.cumsum(sizes)
        cent = np.empty((nlist, d), dtype=np.float32)
        for j in range(nlist):
            rows = self.xb[self.list_offsets[j]:self.list_offsets[j + 1]]
            cent[j] = rows.mean(0) if len(rows) else self.xb.mean(0) if n else 0.0
        if kind == "dups":
            cent = np.round(cent)  # keep centring exact on integer data
        self.centers = np.ascontiguousarray(cent, dtype=np.float32)
        probes = np.stack([rng.permutation(nlist)[:nprobe] for _ in range(nq)])
        lists = probes.ravel()
        queries = np.repeat(np.arange(nq), nprobe)
        slots = np.tile(np.arange(nprobe), nq)
        order = np.argsort(lists, kind="stable")
        lists, self.group_queries, self.group_slots = lists[order], queries[order], slots[order]
        self.group_offsets = np.zeros(nlist + 1, dtype=np.int64)
        self.group_offsets[1:] = np.cumsum(np.bincount(lists, minlength=nlist))
        limits = sizes[lists]
        if max_codes is not None:
            limits = np.minimum(limits, rng.integers(0, max_codes + 1, size=len(limits)))
        self.group_limits = limits.astype(np.int64)
        self.valid = (np.zeros(0, dtype=np.uint8) if valid_frac is None
                      else (rng.random(n) < valid_frac).astype(np.uint8))
        self.nprobe = nprobe
        self._by_id = {int(i): r for r, i in enumerate(self.ids)}

    def scan(self, mod, k, metric):
        return mod.scan_lists(self.xq, self.xb, self.ids, self.list_offsets, self.centers,
                              self.group_offsets, self.group_queries, self.group_slots,
                              self.group_limits, self.valid, self.nprobe, k, metric)

    def range(self, mod, radius, metric):
        return mod.range_scan_lists(self.xq, self.xb, self.ids, self.list_offsets, self.centers,
                                    self.group_offsets, self.group_queries, self.group_limits,
                                    self.valid, radius, metric)

    def exact(self, q, idx, metric):
        """float64 distance of query row ``q`` to the vector with id ``idx``."""
        return _exact(self.xq[q], self.xb[self._by_id[int(idx)]], metric)


def _exact(q, x, metric):
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    return float(q64 @ x64) if metric == "ip" else float(((q64 - x64) ** 2).sum())


def _scale(xq, xb, metric):
    """Largest magnitude the float32 sums can carry: l2 ||q - c||^2 + ||x - c||^2 around the
    data mean (what centring leaves); ip ||q|| ||x||."""
    if len(xb) == 0 or len(xq) == 0:
        return 1.0
    if metric == "ip":
        return float(np.linalg.norm(xq, axis=1).max() * np.linalg.norm(xb, axis=1).max()) + 1.0
    c = xb.astype(np.float64).mean(0)
    return float(((xq - c) ** 2).sum(1).max() + ((xb - c) ** 2).sum(1).max()) + 1.0


def assert_knn_equal(D, I, D_ref, I_ref, atol, exact_of):
    """Distances within tolerance; ids identical except at near ties (see module docstring).

    ``exact_of(row, id)`` gives the float64 distance of an id for that result row.
    """
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert D.shape == D_ref.shape and I.shape == I_ref.shape
    np.testing.assert_allclose(D, D_ref, rtol=RTOL, atol=atol)
    rows = int(np.prod(D.shape[:-1]))
    D2, I2 = D.reshape(rows, D.shape[-1]), I.reshape(rows, I.shape[-1])
    R2, J2 = D_ref.reshape(D2.shape), I_ref.reshape(I2.shape)
    for row in range(I2.shape[0]):
        np.testing.assert_array_equal(I2[row] >= 0, J2[row] >= 0)  # same padding
        got = I2[row][I2[row] >= 0]
        assert len(set(got.tolist())) == len(got), "duplicate ids in a result row"
        for pos in np.flatnonzero(I2[row] != J2[row]):
            true = exact_of(row, I2[row, pos])
            gap = abs(true - float(R2[row, pos]))
            assert 0 < gap <= atol + RTOL * abs(true), (
                f"row {row} pos {pos}: id {I2[row, pos]} (float64 distance {true}) instead of "
                f"{J2[row, pos]} ({R2[row, pos]}); not a near tie")


def _check_scan(mod, batch, k, metric):
    D, I = batch.scan(mod, k, metric)
    Dr, Ir = batch.scan(REF, k, metric)
    nprobe = batch.nprobe
    atol = ATOL_FRACTION * _scale(batch.xq, batch.xb, metric)
    assert_knn_equal(D, I, Dr, Ir, atol, lambda row, idx: batch.exact(row // nprobe, idx, metric))
    pad = np.inf if metric == "l2" else -np.inf
    assert np.all(D[I < 0] == pad)


# --------------------------------------------------------------------------------------------
# get_backend
# --------------------------------------------------------------------------------------------


def test_get_backend_names():
    assert {"numba", "numpy"} <= set(available_backends()) <= {"cuda", "numba", "numpy"}
    assert get_backend("reference") is get_backend("numpy")
    assert get_backend().name == "numba" and get_backend("numpy").name == "numpy"
    if "cuda" in available_backends():  # a device, or Numba's CUDA simulator (tests/conftest.py)
        assert get_backend("cupy") is get_backend("cuda") and get_backend("cuda").name == "cuda"
    with pytest.raises(ValidationError, match="'cuda'.*'numba'.*'numpy'"):
        get_backend("faiss")


def test_unknown_metric_is_rejected(backend):
    with pytest.raises(ValidationError, match="metric"):
        backend.merge_topk(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int64), 1, "cosine")


# --------------------------------------------------------------------------------------------
# scan_lists
# --------------------------------------------------------------------------------------------

# list sizes: empty lists, a single vector, lists smaller and larger than k
SIZES = [0, 1, 9, 70, 0, 41, 3, 130]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("nq", [1, 2, 23])  # 1-3 pairs per list: direct loop; more: micro-kernel
def test_scan_matches_reference(backend, threads, metric, d, nq):
    rng = np.random.default_rng([d, nq, len(metric)])
    for nprobe in (1, 3, len(SIZES)):
        batch = Batch(rng, SIZES, d, nq, nprobe)
        for k in (1, 7, 300):  # 300 > every list and > the 254 vectors of the batch
            _check_scan(backend, batch, k, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["offset", "zeros", "dups"])
@pytest.mark.parametrize("nq", [2, 23])
def test_scan_awkward_data(backend, threads, metric, kind, nq):
    rng = np.random.default_rng([nq, len(kind), len(metric)])
    for d in (3, 33):
        batch = Batch(rng, SIZES, d, nq, 4, kind=kind)
        for k in (5, 300):
            _check_scan(backend, batch, k, metric)
            if kind == "dups":  # exact arithmetic: identical distances and ids, no tolerance
                D, I = batch.scan(backend, k, metric)
                Dr, Ir = batch.scan(REF, k, metric)
                np.testing.assert_array_equal(I, Ir)
                np.testing.assert_array_equal(D, Dr)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [2, 23])
def test_scan_max_codes_and_valid_mask(backend, threads, metric, nq):
    rng = np.random.default_rng([nq, len(metric), 7])
    for kind in ("normal", "dups"):
        for max_codes, valid_frac in ((20, None), (None, 0.6), (50, 0.3), (None, 0.0)):
            batch = Batch(rng, SIZES, 17, nq, 5, kind=kind, max_codes=max_codes,
                          valid_frac=valid_frac)
            for k in (3, 60):
                _check_scan(backend, batch, k, metric)


def test_scan_empty_inputs(backend):
    rng = np.random.default_rng(3)
    batch = Batch(rng, [0, 0, 0], 5, 3, 2)
    D, I = batch.scan(backend, 4, "l2")
    assert D.shape == (3, 2, 4) and np.all(I == -1) and np.all(D == np.inf)
    D, I = backend.scan_lists(np.zeros((0, 5), np.float32), batch.xb, batch.ids,
                              batch.list_offsets, batch.centers, np.zeros(4, np.int64),
                              np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                              batch.valid, 2, 4, "ip")
    assert D.shape == (0, 2, 4) and I.dtype == np.int64


# --------------------------------------------------------------------------------------------
# range_scan_lists
# --------------------------------------------------------------------------------------------


def _radii(batch, metric, atol):
    """Radii giving no result, some results (in a gap wider than the tolerance), all results."""
    _, every, _ = batch.range(REF, np.inf if metric == "l2" else -np.inf, metric)
    every = np.unique(every.astype(np.float64))
    wide = np.diff(every) - 4 * (atol + RTOL * np.abs(every[1:]))
    gaps = np.flatnonzero(wide > 0)
    if len(gaps) == 0:  # float32 cannot separate any two results: take the widest gap
        gaps = np.array([np.argmax(wide)])
    mid = gaps[np.argmin(np.abs(gaps - len(every) // 2))]
    some = (every[mid] + every[mid + 1]) / 2
    if metric == "l2":
        return [0.0, some, every[-1] * 2 + 1]
    return [every[-1] + abs(every[-1]) + 1, some, every[0] - abs(every[0]) - 1]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 23])
@pytest.mark.parametrize("kind", ["normal", "offset", "dups"])
def test_range_matches_reference(backend, threads, metric, nq, kind):
    rng = np.random.default_rng([nq, len(metric), len(kind)])
    for d, valid_frac, max_codes in ((17, None, None), (3, 0.5, 40), (100, None, None)):
        batch = Batch(rng, SIZES, d, nq, 3, kind=kind, valid_frac=valid_frac,
                      max_codes=max_codes)
        atol = ATOL_FRACTION * _scale(batch.xq, batch.xb, metric)
        counts = []
        for radius in _radii(batch, metric, atol):
            lims, D, I = batch.range(backend, radius, metric)
            lims_r, D_r, I_r = batch.range(REF, radius, metric)
            assert lims.dtype == np.int64 and D.dtype == np.float32 and I.dtype == np.int64
            np.testing.assert_array_equal(lims, lims_r)
            for q in range(nq):
                seg = slice(lims[q], lims[q + 1])
                assert_knn_equal(D[None, seg], I[None, seg], D_r[None, seg], I_r[None, seg],
                                 atol, lambda _row, idx, q=q: batch.exact(q, idx, metric))
            counts.append(lims[-1])
        assert counts[0] == 0 and 0 < counts[1] < counts[2]


# --------------------------------------------------------------------------------------------
# merge_topk
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_merge_topk_matches_reference(backend, threads, metric):
    rng = np.random.default_rng(len(metric))
    pad = np.inf if metric == "l2" else -np.inf
    for nq, m in ((1, 1), (5, 30), (40, 160)):
        D = rng.integers(0, 6, size=(nq, m)).astype(np.float32)  # many exact ties
        I = np.stack([rng.permutation(10 * m)[:m] for _ in range(nq)]).astype(np.int64)
        hole = rng.random((nq, m)) < 0.3
        D[hole], I[hole] = pad, -1
        for k in (1, 4, m + 3):
            Dm, Im = backend.merge_topk(D, I, k, metric)
            Dr, Ir = REF.merge_topk(D, I, k, metric)
            np.testing.assert_array_equal(Im, Ir)  # no arithmetic: exact equality
            np.testing.assert_array_equal(Dm, Dr)
            assert Dm.dtype == np.float32 and Im.dtype == np.int64


# --------------------------------------------------------------------------------------------
# coarse_quantize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", DIMS)
def test_coarse_quantize_matches_reference(backend, threads, metric, d):
    rng = np.random.default_rng([d, len(metric)])
    for kind in ("normal", "offset", "dups"):
        nlist = 37
        cent = _vectors(rng, nlist, d, kind)
        cent[5] = cent[30]  # duplicated centroid: tie broken by the smaller index
        for nq in (1, 2, 9, 50):
            xq = _vectors(rng, nq, d, kind)
            atol = ATOL_FRACTION * _scale(xq, cent, metric)
            for nprobe in (1, 4, nlist):
                D, I = backend.coarse_quantize(xq, cent, nprobe, metric)
                Dr, Ir = REF.coarse_quantize(xq, cent, nprobe, metric)
                assert_knn_equal(D, I, Dr, Ir, atol,
                                 lambda row, c, xq=xq: _exact(xq[row], cent[c], metric))


# --------------------------------------------------------------------------------------------
# exact_knn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("d", [1, 17, 100])
@pytest.mark.parametrize("kind", ["normal", "offset", "dups", "zeros"])
def test_exact_knn_matches_reference(backend, threads, metric, d, kind):
    rng = np.random.default_rng([d, len(metric), len(kind)])
    n = 1100  # spans several 512-row blocks and database chunks
    xb = _vectors(rng, n, d, kind)
    ids = (rng.permutation(n) * 3 + 7).astype(np.int64)
    by_id = {int(i): r for r, i in enumerate(ids)}
    for nq in (1, 3, 37):
        xq = _vectors(rng, nq, d, kind)
        atol = ATOL_FRACTION * _scale(xq, xb, metric)
        for k in (1, 10, n + 5):
            if kind != "normal" and k > 10:
                continue
            D, I = backend.exact_knn(xq, xb, ids, k, metric)
            Dr, Ir = REF.exact_knn(xq, xb, ids, k, metric)
            assert_knn_equal(D, I, Dr, Ir, atol,
                             lambda row, idx, xq=xq: _exact(xq[row], xb[by_id[int(idx)]], metric))
            if kind in ("dups", "zeros"):
                np.testing.assert_array_equal(I, Ir)


def test_exact_knn_empty(backend):
    D, I = backend.exact_knn(np.ones((2, 3), np.float32), np.zeros((0, 3), np.float32),
                             np.zeros(0, np.int64), 4, "l2")
    assert D.shape == (2, 4) and np.all(I == -1) and np.all(D == np.inf)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["normal", "offset", "dups"])
def test_rerank_matches_reference(backend, threads, metric, kind):
    """RFlat's exact re-ranking: distinct candidate rows per query with -1 padding; the
    reference's rerank over every row is its exact_knn (the reference's own semantics)."""
    rng = np.random.default_rng([len(metric), len(kind), 5])
    n, d, nq, kc = 700, 33, 41, 40
    xb = _vectors(rng, n, d, kind)
    ids = (rng.permutation(n) * 5 + 3).astype(np.int64)
    by_id = {int(i): r for r, i in enumerate(ids)}
    xq = _vectors(rng, nq, d, kind)
    cand = np.stack([rng.choice(n, kc, replace=False) for _ in range(nq)]).astype(np.int64)
    cand[rng.random((nq, kc)) < 0.2] = -1
    cand[0] = -1  # a query with no candidate at all
    cand[1, :3] = -1
    atol = ATOL_FRACTION * _scale(xq, xb, metric)
    for k in (1, 10, kc + 3):
        D, I = backend.rerank(xq, xb, ids, cand, k, metric)
        Dr, Ir = REF.rerank(xq, xb, ids, cand, k, metric)
        assert D.shape == I.shape == (nq, k)
        assert_knn_equal(D, I, Dr, Ir, atol,
                         lambda row, idx: _exact(xq[row], xb[by_id[int(idx)]], metric))
        assert np.all(I[0] == -1)
        for qi in range(nq):  # every returned id is one of the query's candidates
            assert set(I[qi][I[qi] >= 0].tolist()) <= set(ids[cand[qi][cand[qi] >= 0]].tolist())
    every = np.tile(np.arange(n, dtype=np.int64), (nq, 1))
    Dr, Ir = REF.rerank(xq, xb, ids, every, 10, metric)
    De, Ie = REF.exact_knn(xq, xb, ids, 10, metric)
    np.testing.assert_array_equal(Ir, Ie)
    np.testing.assert_array_equal(Dr, De)


def test_rerank_refuses_a_row_out_of_range():
    kern = get_backend("numba")
    with pytest.raises(ValidationError, match="candidates"):
        kern.rerank(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), np.arange(3), np.array([[0, 3]]), 1, "l2")


# --------------------------------------------------------------------------------------------
# assign / kmeans_stats (the k-means and add-stage GEMMs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["normal", "offset", "dups"])
def test_assign_and_kmeans_stats_match_reference(backend, metric, kind):
    """Labels equal the reference's except where two centroids are within float32 rounding of
    each other (then both must really be that close); sums and counts follow the labels; the
    objective agrees to float32 accuracy of the scores (rtol 1e-4 on sums of 4100 terms)."""
    rng = np.random.default_rng([len(metric), len(kind)])
    x = _vectors(rng, 4100, 19, kind)  # more than two 2048-row GEMM blocks
    c = _vectors(rng, 37, 19, kind)
    c[5] = c[4]  # an exact tie: the smaller index must win
    labels, ref = backend.assign(x, c, metric), REF.assign(x, c, metric)
    assert labels.dtype == np.int64 and labels.shape == (4100,)
    diff = np.flatnonzero(labels != ref)
    dist = x.astype(np.float64) @ c.astype(np.float64).T if metric == "ip" else \
        ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    atol = ATOL_FRACTION * _scale(x, c, metric)
    assert np.allclose(dist[diff, labels[diff]], dist[diff, ref[diff]], atol=atol, rtol=RTOL)
    assert not (labels == 5).any()  # the tie with centroid 4 goes to 4
    sums, counts, obj = backend.kmeans_stats(x, c, metric)
    rs, rc, robj = REF.kmeans_stats(x, c, metric)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=37))
    expect = np.zeros((37, 19))
    np.add.at(expect, labels, x.astype(np.float64))
    # rows may be centred in float32 before they are summed: one rounding (2^-24 relative, of
    # at most 2 max|x|) per row added
    tol = 2.0 ** -24 * 2 * np.abs(x).max() * counts[:, None] + 1e-9
    assert (np.abs(sums - expect) <= tol).all()
    assert obj == pytest.approx(robj, rel=1e-4, abs=atol * len(x))
    if not len(diff):
        np.testing.assert_array_equal(counts, rc)


@pytest.mark.parametrize("mod", [REF] + [get_backend(n) for n in available_backends() if n not in ("numpy", "cuda")],
                         ids=lambda m: m.name)
@pytest.mark.parametrize("metric", METRICS)
def test_scan_into_out_by_parts_equals_one_scan(mod, metric):
    """Scanning the lists of a batch in two parts (as shard after shard) into one ``out`` gives
    exactly the one-call result: each (query, probe) slot belongs to the list its probe names."""
    rng = np.random.default_rng([7, len(metric)])
    b = Batch(rng, SIZES, 13, 23, 3)
    whole = b.scan(mod, 5, metric)
    out = (np.full(whole[0].shape, -np.inf if metric == "ip" else np.inf, np.float32),
           np.full(whole[1].shape, -1, np.int64))
    for l0, l1 in ((0, 4), (4, len(SIZES))):
        r0, r1 = b.list_offsets[l0], b.list_offsets[l1]
        g0, g1 = b.group_offsets[l0], b.group_offsets[l1]
        got = mod.scan_lists(b.xq, b.xb[r0:r1], b.ids[r0:r1], b.list_offsets[l0:l1 + 1] - r0, b.centers[l0:l1],
                             b.group_offsets[l0:l1 + 1] - g0, b.group_queries[g0:g1], b.group_slots[g0:g1],
                             b.group_limits[g0:g1], b.valid, b.nprobe, 5, metric, out=out)
        assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(out[1], whole[1])
    np.testing.assert_array_equal(out[0], whole[0])


def test_scan_refuses_a_wrong_out(backend):
    b = Batch(np.random.default_rng(3), SIZES, 5, 4, 2)
    with pytest.raises(ValidationError, match="out"):
        backend.scan_lists(b.xq, b.xb, b.ids, b.list_offsets, b.centers, b.group_offsets, b.group_queries,
                           b.group_slots, b.group_limits, b.valid, 2, 5, "l2",
                           out=(np.zeros((4, 2, 4), np.float32), np.zeros((4, 2, 4), np.int64)))
