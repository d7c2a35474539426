"""The cuda backend held to the NumPy reference in Numba's CUDA simulator (no GPU needed).

tests/conftest.py turns the simulator on for the test session, so every line of
``distann.kernels.cuda`` runs here except the CuPy calls themselves (NumPy stands in for CuPy:
``matmul`` for cuBLAS, ``argsort`` for CuPy's sorts). The simulator runs a Python thread per GPU
thread, so the cases are the awkward shapes of tests/test_kernels.py on small data: empty
lists, a one-vector list, k larger than a list and than the batch, odd d, zeros, large
offsets, exact ties (smaller id first), max_codes limits, filter masks, both metrics, and
k above the fused selection limit (the device-sort path). The block-level selection runs with
4 threads a block here (``Runtime.threads``), so its merge rounds do run.

On a device (DISTANN_TEST_GPU=1, ``pytest -m gpu``) the same file runs for real, and
tests/test_kernels.py adds the cuda backend to its full suite.
"""

from __future__ import annotations

import numpy as np
import pytest

from distann import config
from distann.errors import DeviceMemoryError, ValidationError
from distann.kernels import available_backends, get_backend
from tests.test_kernels import (
    ATOL_FRACTION,
    METRICS,
    REF,
    RTOL,
    Batch,
    _check_scan,
    _exact,
    _radii,
    _scale,
    _vectors,
    assert_knn_equal,
)
from tests.test_kernels_codecs import Coded

pytestmark = pytest.mark.skipif("cuda" not in available_backends(),
                                reason="the cuda backend cannot run here (no device and no CUDA simulator)")

SLOW = pytest.mark.slow  # the other half of a parametrization, for `make test-all`
#: the heaviest simulated cases (5-10 s each in the simulator) run both metrics under `-m slow`
#: and l2 by default; ip is also run by default in the cases below that are light
METRICS_HEAVY = ("l2", pytest.param("ip", marks=SLOW))
SMALL = [0, 1, 9, 23, 0, 12, 3]  # empty lists, one vector, smaller and larger than k
BIG_K = 1030  # above the fused selection's limit: the device-sort path


@pytest.fixture(scope="module")
def cu():
    return get_backend("cuda")


@pytest.fixture(autouse=True)
def _fresh_cache(cu):
    cu.clear_resident()
    yield
    cu.clear_resident()


# --------------------------------------------------------------------------------------------
# list scans
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS_HEAVY)
@pytest.mark.parametrize("kind", ["normal", "offset", "zeros", "dups"])
def test_flat_scan_matches_reference(cu, metric, kind):
    rng = np.random.default_rng([len(metric), len(kind)])
    configs = ((1, 1, 1), (5, 3, 3), (3, 2, len(SMALL))) if kind == "normal" else ((5, 3, 3),)
    for d, nq, nprobe in configs:
        batch = Batch(rng, SMALL, d, nq, nprobe, kind=kind)
        for k in (1, 60):  # 60 > every list and > the 48 vectors of the batch
            _check_scan(cu, batch, k, metric)
            if kind == "dups":  # exact arithmetic: identical results, ties by smaller id
                np.testing.assert_array_equal(batch.scan(cu, k, metric)[1], batch.scan(REF, k, metric)[1])


@pytest.mark.parametrize("metric", METRICS_HEAVY)
def test_flat_scan_max_codes_valid_mask_and_big_k(cu, metric):
    rng = np.random.default_rng([len(metric), 9])
    for kind in ("normal", "dups"):
        for max_codes, valid_frac in ((10, None), (None, 0.5), (7, 0.3), (None, 0.0)):
            _check_scan(cu, Batch(rng, SMALL, 4, 3, 4, kind=kind, max_codes=max_codes, valid_frac=valid_frac),
                        6, metric)
    _check_scan(cu, Batch(rng, SMALL, 3, 2, 3, kind="dups"), BIG_K, metric)


def test_flat_scan_more_pairs_than_a_tile(cu):
    """10 queries all probing every list: 10 pairs per list, more than a tile of 8."""
    rng = np.random.default_rng(11)
    _check_scan(cu, Batch(rng, [0, 7, 19], 3, 10, 3), 4, "l2")


def test_scan_empty_inputs_and_out(cu):
    rng = np.random.default_rng(3)
    batch = Batch(rng, [0, 0, 0], 5, 3, 2)
    D, I = batch.scan(cu, 4, "l2")
    assert D.shape == (3, 2, 4) and np.all(I == -1) and np.all(D == np.inf)
    with pytest.raises(ValidationError, match="out"):
        cu.scan_lists(batch.xq, batch.xb, batch.ids, batch.list_offsets, batch.centers, batch.group_offsets,
                      batch.group_queries, batch.group_slots, batch.group_limits, batch.valid, 2, 4, "l2",
                      out=(np.zeros((3, 2, 5), np.float32), np.zeros((3, 2, 5), np.int64)))


def test_scan_into_out_by_parts_equals_one_scan(cu):
    """Two calls on the two halves of the lists fill one ``out`` exactly like one call."""
    rng = np.random.default_rng(7)
    b = Batch(rng, SMALL, 3, 5, 3)
    whole = b.scan(cu, 4, "l2")
    out = (np.full(whole[0].shape, np.inf, np.float32), np.full(whole[1].shape, -1, np.int64))
    for l0, l1 in ((0, 3), (3, len(SMALL))):
        r0, r1 = b.list_offsets[l0], b.list_offsets[l1]
        g0, g1 = b.group_offsets[l0], b.group_offsets[l1]
        cu.scan_lists(b.xq, b.xb[r0:r1], b.ids[r0:r1], b.list_offsets[l0:l1 + 1] - r0, b.centers[l0:l1],
                      b.group_offsets[l0:l1 + 1] - g0, b.group_queries[g0:g1], b.group_slots[g0:g1],
                      b.group_limits[g0:g1], b.valid, b.nprobe, 4, "l2", out=out)
    np.testing.assert_array_equal(out[1], whole[1])
    np.testing.assert_array_equal(out[0], whole[0])




@pytest.mark.parametrize("metric, sq_kind", [("l2", 0), ("ip", 1), pytest.param("ip", 0, marks=SLOW),
                                             pytest.param("l2", 1, marks=SLOW)])
def test_sq_scan_matches_reference(cu, metric, sq_kind):
    rng = np.random.default_rng([len(metric), sq_kind])
    for by_residual in (False, True):
        for kind, d in (("normal", 3), ("offset", 5)):
            batch = Batch(rng, SMALL, d, 3, 3, kind=kind)
            Coded.sq_of(batch, sq_kind, by_residual).check(cu, (5,) if kind == "normal" else (1, 60), metric)


def test_sq_fp16_bit_patterns(cu):
    """Subnormals, signed zeros and the largest finite halves decode as the reference's."""
    rng = np.random.default_rng(16)
    batch = Batch(rng, SMALL, 3, 3, 3)
    bits = rng.integers(0, 1 << 16, size=(len(batch.ids), 3)).astype(np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0x83FF
    bits[: len(bits) // 2] &= 0x8FFF
    for metric in METRICS:
        Coded(batch, True, sq=(bits, 1, np.zeros(0, np.float32), np.zeros(0, np.float32))).check(cu, (5,), metric)


@pytest.mark.parametrize("metric, by_residual", [("l2", True), ("ip", False), pytest.param("l2", False, marks=SLOW),
                                                 pytest.param("ip", True, marks=SLOW)])
def test_pq_scan_matches_reference(cu, metric, by_residual):
    rng = np.random.default_rng([len(metric), by_residual, 2])
    for M, dsub, K in ((1, 1, 2), (2, 3, 16), (3, 1, 256)):
        batch = Batch(rng, SMALL, M * dsub, 3, 3)
        Coded.pq_of(rng, batch, M, K, by_residual).check(cu, (1, 60), metric)


def test_pq_lookup_table_in_global_memory(cu, monkeypatch):
    """A table larger than the shared-memory budget goes to the global scratch: same results."""
    from distann.kernels.cuda import _distances

    monkeypatch.setattr(_distances, "SHARED_LUT_FLOATS", 8)
    rng = np.random.default_rng(5)
    batch = Batch(rng, SMALL, 4, 3, 3, valid_frac=0.7)
    for metric in METRICS:
        Coded.pq_of(rng, batch, 2, 16, True).check(cu, (4,), metric)


def test_flat_queries_in_global_memory(cu, monkeypatch):
    """Large d: the tile's queries in global scratch instead of shared memory, same results."""
    from distann.kernels.cuda import _distances

    monkeypatch.setattr(_distances, "SHARED_LUT_FLOATS", 8)
    rng = np.random.default_rng(6)
    for metric in METRICS:
        _check_scan(cu, Batch(rng, SMALL, 3, 3, 3), 5, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_range_matches_reference(cu, metric):
    rng = np.random.default_rng([len(metric), 4])
    for kind, valid_frac, max_codes in (("normal", None, None), ("offset", 0.5, 10), ("dups", None, None)):
        batch = Batch(rng, SMALL, 3, 3, 3, kind=kind, valid_frac=valid_frac, max_codes=max_codes)
        atol = ATOL_FRACTION * _scale(batch.xq, batch.xb, metric)
        counts = []
        for radius in _radii(batch, metric, atol):
            lims, D, I = batch.range(cu, radius, metric)
            lims_r, D_r, I_r = batch.range(REF, radius, metric)
            assert lims.dtype == np.int64 and D.dtype == np.float32 and I.dtype == np.int64
            np.testing.assert_array_equal(lims, lims_r)
            for q in range(batch.xq.shape[0]):
                seg = slice(lims[q], lims[q + 1])
                assert_knn_equal(D[None, seg], I[None, seg], D_r[None, seg], I_r[None, seg], atol,
                                 lambda _row, idx, q=q: batch.exact(q, idx, metric))
            counts.append(lims[-1])
        assert counts[0] == 0 and 0 < counts[1] < counts[2]


# --------------------------------------------------------------------------------------------
# selection, merge, rerank, GEMM kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_merge_topk_matches_reference(cu, metric):
    rng = np.random.default_rng(len(metric))
    pad = np.inf if metric == "l2" else -np.inf
    for nq, m in ((1, 1), (3, 30)):
        D = rng.integers(0, 6, size=(nq, m)).astype(np.float32)  # many exact ties
        I = np.stack([rng.permutation(10 * m)[:m] for _ in range(nq)]).astype(np.int64)
        hole = rng.random((nq, m)) < 0.3
        D[hole], I[hole] = pad, -1
        for k in (1, 4, m + 3, BIG_K):
            Dm, Im = cu.merge_topk(D, I, k, metric)
            Dr, Ir = REF.merge_topk(D, I, k, metric)
            np.testing.assert_array_equal(Im, Ir)
            np.testing.assert_array_equal(Dm, Dr)
            assert Dm.dtype == np.float32 and Im.dtype == np.int64


def test_merge_topk_batches_bigger_than_the_work_budget(cu):
    """Rows cut into blocks that fit ``distann.kernels.cuda.work-bytes``: same answer."""
    rng = np.random.default_rng(8)
    D = rng.random((9, 40)).astype(np.float32)
    I = np.arange(360, dtype=np.int64).reshape(9, 40)
    with config_set({"distann.kernels.cuda.work-bytes": 1}):  # 1 MiB floor, then 1 row a block
        from distann.kernels.cuda import _device

        assert _device.runtime().work_budget() == 1 << 20
        got = cu.merge_topk(D, I, 3, "l2")
    want = REF.merge_topk(D, I, 3, "l2")
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("metric", METRICS_HEAVY)
def test_coarse_quantize_matches_reference(cu, metric):
    rng = np.random.default_rng([len(metric), 3])
    for kind, d in (("normal", 1), ("offset", 5), ("dups", 7)):
        cent = _vectors(rng, 13, d, kind)
        cent[5] = cent[11]  # duplicated centroid: tie broken by the smaller index
        xq = _vectors(rng, 3, d, kind)
        atol = ATOL_FRACTION * _scale(xq, cent, metric)
        for nprobe in (1, 4, 13):
            D, I = cu.coarse_quantize(xq, cent, nprobe, metric)
            Dr, Ir = REF.coarse_quantize(xq, cent, nprobe, metric)
            assert_knn_equal(D, I, Dr, Ir, atol, lambda row, c, xq=xq: _exact(xq[row], cent[c], metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["normal", "offset", "dups", "zeros"])
def test_exact_knn_matches_reference(cu, metric, kind):
    rng = np.random.default_rng([len(metric), len(kind)])
    n, d = 40, 5
    xb = _vectors(rng, n, d, kind)
    ids = (rng.permutation(n) * 3 + 7).astype(np.int64)
    by_id = {int(i): r for r, i in enumerate(ids)}
    xq = _vectors(rng, 3, d, kind)
    atol = ATOL_FRACTION * _scale(xq, xb, metric)
    for k in (1, 10, n + 5) if kind == "normal" else (10,):
        D, I = cu.exact_knn(xq, xb, ids, k, metric)
        Dr, Ir = REF.exact_knn(xq, xb, ids, k, metric)
        assert_knn_equal(D, I, Dr, Ir, atol, lambda row, idx: _exact(xq[row], xb[by_id[int(idx)]], metric))
        if kind in ("dups", "zeros"):
            np.testing.assert_array_equal(I, Ir)
    D, I = cu.exact_knn(xq, xb[:0], ids[:0], 4, metric)
    assert np.all(I == -1)


def test_exact_knn_database_in_blocks(cu):
    """A database cut into several blocks (tiny work budget), merged across blocks."""
    rng = np.random.default_rng(12)
    xb = _vectors(rng, 300, 3, "dups")
    ids = np.arange(300, dtype=np.int64)[::-1].copy()
    xq = _vectors(rng, 2, 3, "dups")
    with config_set({"distann.kernels.cuda.work-bytes": 1}):
        D, I = cu.exact_knn(xq, xb, ids, 6, "l2")
    Dr, Ir = REF.exact_knn(xq, xb, ids, 6, "l2")
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_array_equal(D, Dr)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["normal", "offset", "dups"])
def test_rerank_matches_reference(cu, metric, kind):
    rng = np.random.default_rng([len(metric), len(kind), 5])
    n, d, nq, kc = 60, 5, 4, 12
    xb = _vectors(rng, n, d, kind)
    ids = (rng.permutation(n) * 5 + 3).astype(np.int64)
    by_id = {int(i): r for r, i in enumerate(ids)}
    xq = _vectors(rng, nq, d, kind)
    cand = np.stack([rng.choice(n, kc, replace=False) for _ in range(nq)]).astype(np.int64)
    cand[rng.random((nq, kc)) < 0.2] = -1
    cand[0] = -1
    atol = ATOL_FRACTION * _scale(xq, xb, metric)
    for k in (1, 5, kc + 3):
        D, I = cu.rerank(xq, xb, ids, cand, k, metric)
        Dr, Ir = REF.rerank(xq, xb, ids, cand, k, metric)
        assert_knn_equal(D, I, Dr, Ir, atol, lambda row, idx: _exact(xq[row], xb[by_id[int(idx)]], metric))
        assert np.all(I[0] == -1)
    with pytest.raises(ValidationError, match="candidates"):
        cu.rerank(xq, xb, ids, np.full((1, 2), n), 1, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["normal", "offset", "dups"])
def test_assign_and_kmeans_stats_match_reference(cu, metric, kind):
    rng = np.random.default_rng([len(metric), len(kind)])
    x = _vectors(rng, 500, 7, kind)
    c = _vectors(rng, 13, 7, kind)
    c[5] = c[4]  # an exact tie: the smaller index must win
    labels, ref = cu.assign(x, c, metric), REF.assign(x, c, metric)
    diff = np.flatnonzero(labels != ref)
    dist = x.astype(np.float64) @ c.astype(np.float64).T if metric == "ip" else \
        ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    atol = ATOL_FRACTION * _scale(x, c, metric)
    assert np.allclose(dist[diff, labels[diff]], dist[diff, ref[diff]], atol=atol, rtol=RTOL)
    assert not (labels == 5).any()
    sums, counts, obj = cu.kmeans_stats(x, c, metric)
    rs, rc, robj = REF.kmeans_stats(x, c, metric)
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=13))
    expect = np.zeros((13, 7))
    np.add.at(expect, labels, x.astype(np.float64))
    np.testing.assert_allclose(sums, expect, rtol=1e-12, atol=1e-9)  # float64 sums of the rows as given
    assert obj == pytest.approx(robj, rel=1e-6, abs=atol)
    assert cu.assign(x[:0], c, metric).shape == (0,)


# --------------------------------------------------------------------------------------------
# lists on the device: resident, streamed, budgets, errors
# --------------------------------------------------------------------------------------------


class config_set:
    """dask.config.set for distann tunables, also clearing the runtime's budget caches."""

    def __init__(self, values):
        import dask

        self._cm = dask.config.set(values)

    def __enter__(self):
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_lists_become_resident_from_their_second_use(cu):
    from distann.kernels.cuda._resident import CACHE

    rng = np.random.default_rng(21)
    b = Batch(rng, SMALL, 3, 3, 3)
    first = b.scan(cu, 4, "l2")
    assert CACHE.lookup(b.xb) is None  # a first use streams the probed lists
    second = b.scan(cu, 4, "l2")
    assert CACHE.lookup(b.xb) is not None and CACHE.lookup(b.ids) is not None
    assert CACHE.nbytes == b.xb.nbytes + b.ids.nbytes
    third = b.scan(cu, 4, "l2")  # served from the device copy
    for got in (second, third):
        np.testing.assert_array_equal(got[1], first[1])
        np.testing.assert_array_equal(got[0], first[0])
    del b, first, second, third
    import gc

    gc.collect()
    CACHE.lookup(np.zeros(1))  # entries die with their host arrays
    assert CACHE.nbytes == 0


def test_lists_larger_than_the_resident_budget_stream_in_runs(cu, monkeypatch):
    """Lists that never become resident (resident budget 0) are streamed: the probed lists
    only, cut into runs by the work budget (here ~25 rows a run), each probed list in exactly
    one run of a call. Results equal the reference's, call after call."""
    from distann.kernels.cuda import _device, _resident

    runs = []
    real = _resident._stream

    def spy(rt, arrays, list_offsets, probed, rr):
        runs.append(list(rr))
        return real(rt, arrays, list_offsets, probed, rr)

    monkeypatch.setattr(_resident, "_stream", spy)
    monkeypatch.setattr(_device.Runtime, "work_budget", lambda self: 4 * 21 * 25)  # rows: 3 float32 + id + mask
    rng = np.random.default_rng(22)
    b = Batch(rng, SMALL, 3, 3, 4, valid_frac=0.7)
    with config_set({"distann.kernels.cuda.resident-bytes": 0}):
        for _ in range(3):
            _check_scan(cu, b, 5, "l2")
    from distann.kernels.cuda._resident import CACHE

    assert CACHE.nbytes == 0 and len(runs) == 3
    probed = set(np.flatnonzero(np.diff(b.group_offsets) > 0).tolist())
    for r in runs:
        assert len(r) >= 2
        covered = [j for j0, j1 in r for j in range(j0, j1) if j in probed]
        assert sorted(covered) == sorted(probed)


def test_streaming_disabled_is_a_clear_error(cu):
    rng = np.random.default_rng(23)
    b = Batch(rng, SMALL, 3, 2, 2)
    with config_set({"distann.kernels.cuda.resident-bytes": 16, "distann.kernels.cuda.stream": False}):
        with pytest.raises(DeviceMemoryError, match="resident-bytes.*stream"):
            b.scan(cu, 3, "l2")
    with config_set({"distann.kernels.cuda.stream": False}):  # fits: uploaded at its first use
        _check_scan(cu, b, 3, "l2")


def test_work_chunks_split_a_batch(cu, monkeypatch):
    """A key buffer cap of a few entries cuts the pairs into many work chunks (one pair each
    at least): same results."""
    from distann.kernels.cuda import _device, _scan

    chunks = []
    real = _scan._work_chunks

    def spy(*args):
        got = list(real(*args))
        chunks.extend(got)
        return iter(got)

    monkeypatch.setattr(_scan, "_work_chunks", spy)
    monkeypatch.setattr(_device.Runtime, "work_budget", lambda self: 64)  # 8 keys a chunk
    rng = np.random.default_rng(24)
    b = Batch(rng, SMALL, 3, 3, 3)
    _check_scan(cu, b, 5, "ip")
    assert len(chunks) >= 4


def test_out_of_memory_becomes_a_device_memory_error():
    """CuPy's OutOfMemoryError (which cannot be produced without a device: a stand-in class of
    that name) becomes a DeviceMemoryError naming the settings to lower."""
    from distann.kernels.cuda._device import _oom_as_error

    class OutOfMemoryError(Exception):
        pass

    with pytest.raises(DeviceMemoryError, match="work-bytes.*resident-bytes") as info:
        with _oom_as_error("allocating", 3 << 20):
            raise OutOfMemoryError("out of memory allocating 3145728 bytes")
    assert "3.0 MiB" in str(info.value) and isinstance(info.value.__cause__, OutOfMemoryError)


def test_device_info_and_settings(cu):
    info = cu.device_info()
    assert info["simulated"] in (True, False) and info["total_bytes"] > 0
    assert info["resident_budget"] == info["total_bytes"] // 2
    with config_set({"distann.kernels.cuda.resident-bytes": 12345}):
        assert cu.device_info()["resident_budget"] == 12345
    with config_set({"distann.kernels.cuda.work-bytes": 0}):
        with pytest.raises(ValidationError, match="work-bytes"):
            config.get("kernels.cuda.work-bytes")
