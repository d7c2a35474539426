"""Index-level search: list-major batches, range search, search parameters, lazy list reads."""

from __future__ import annotations

import numpy as np
import pytest

import distann
from distann.errors import ValidationError
from tests.ann_helpers import assert_same_neighbours, brute_force, dataset, exact_scores

N, D, NQ, NLIST = 5000, 20, 40, 16


@pytest.fixture(scope="module")
def data():
    return dataset(N, D, NQ, seed=7)


@pytest.fixture(scope="module")
def indexes(client, data, tmp_path_factory):
    xb, _ = data
    root = tmp_path_factory.mktemp("search")
    return {m: distann.build(xb, str(root / f"{m}.zarr"), spec=f"IVF{NLIST},Flat", metric=m, client=client,
                             niter=8, chunk_rows=1500, shard_bytes=32 * 1024) for m in ("l2", "ip", "cosine")}


def _fresh(index):
    return distann.open_index(index.url, cache_bytes=0)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_backends_agree_and_match_brute_force(indexes, data, metric, backend):
    xb, xq = data
    D, I = _fresh(indexes[metric]).search(xq, k=7, nprobe=NLIST, backend=backend)
    Dr, Ir = brute_force(xq, xb, 7, metric)
    # float32 scan vs float64 truth on O(1) data: 1e-4
    assert_same_neighbours(D, I, Dr, Ir, rtol=1e-4, atol=1e-4)


def test_single_query_and_small_batches_equal_the_batch(indexes, data):
    _, xq = data
    index = _fresh(indexes["l2"])
    D, I = index.search(xq, k=10, nprobe=4)
    for i in (0, 5, 17):
        d1, i1 = index.search(xq[i:i + 1], k=10, nprobe=4)
        np.testing.assert_array_equal(i1[0], I[i])
        np.testing.assert_allclose(d1[0], D[i], rtol=1e-5)


def test_only_probed_lists_are_read(indexes, data):
    _, xq = data
    index = _fresh(indexes["l2"])
    from distann.kernels import get_backend
    _, probes = get_backend("numpy").coarse_quantize(xq[:3], index.centroids, 2, "l2")
    index.search(xq[:3], k=5, nprobe=2)
    assert index.lists.stats.read_lists == set(probes.ravel().tolist()) - set(np.flatnonzero(index.list_sizes == 0))
    assert index.lists.stats.vectors_read == index.list_sizes[np.unique(probes)].sum()


def test_cache_serves_repeated_batches(indexes, data):
    _, xq = data
    index = distann.open_index(indexes["l2"].url, cache_bytes=300_000)  # < the index (440 kB): an LRU, not resident
    D1, I1 = index.search(xq[:2], k=5, nprobe=2)   # <= 4 lists, ~110 kB: fits the cache
    reads = index.lists.stats.reads
    D2, I2 = index.search(xq[:2], k=5, nprobe=2)
    assert index.lists.stats.reads == reads and index.lists.stats.cache_hits > 0
    np.testing.assert_array_equal(I1, I2)
    # a cache as big as the index makes it resident: same results, nothing read later
    big = distann.open_index(indexes["l2"].url, cache_bytes=1 << 30)
    D3, I3 = big.search(xq[:2], k=5, nprobe=2)
    assert big.lists.resident is not None
    np.testing.assert_array_equal(I1, I3)


def test_default_cache_makes_repeated_searches_read_nothing(indexes, data):
    """Without any tuning (cache "auto": 1/8 of the memory), an index that fits is loaded at the
    first search and later searches read nothing from the store."""
    _, xq = data
    index = distann.open_index(indexes["l2"].url)
    assert index.lists.cache_bytes > index.lists.nbytes
    first = index.search(xq[:1], k=5, nprobe=2)
    reads = index.lists.stats.reads
    for q in range(1, 5):
        index.search(xq[q:q + 1], k=5, nprobe=2)
    assert index.lists.stats.reads == reads and index.lists.resident is not None
    np.testing.assert_array_equal(first[1], distann.open_index(indexes["l2"].url, cache_bytes=0).search(
        xq[:1], k=5, nprobe=2)[1])
    with pytest.raises(ValidationError, match="cache_bytes: received -1"):
        distann.open_index(indexes["l2"].url, cache_bytes=-1)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_range_search_matches_exact(indexes, data, metric):
    xb, xq = data
    s = exact_scores(xq, xb, metric)
    radius = float(np.quantile(s, 0.002 if metric == "l2" else 0.998))
    lims, D, I = _fresh(indexes[metric]).range_search(xq, radius, nprobe=NLIST)
    assert lims.shape == (NQ + 1,) and lims[0] == 0 and lims[-1] == len(D) == len(I)
    for q in range(NQ):
        want = np.flatnonzero(s[q] < radius) if metric == "l2" else np.flatnonzero(s[q] > radius)
        got = I[lims[q]:lims[q + 1]]
        near = np.abs(s[q] - radius) < 1e-4  # float32 vs float64 at the boundary
        assert set(got) ^ set(want) <= set(np.flatnonzero(near)), q
        d = D[lims[q]:lims[q + 1]]
        assert (np.diff(d) >= -1e-6).all() if metric == "l2" else (np.diff(d) <= 1e-6).all()


def test_range_search_cli_convention_empty(indexes, data):
    _, xq = data
    lims, D, I = _fresh(indexes["l2"]).range_search(xq, 0.0, nprobe=2)
    assert (lims == 0).all() and len(D) == 0 and I.dtype == np.int64 and D.dtype == np.float32


def test_ids_allowed_as_array_and_bitmap(indexes, data):
    xb, xq = data
    index = _fresh(indexes["l2"])
    allowed = np.arange(0, N, 3)
    D, I = index.search(xq, k=5, nprobe=NLIST, ids_allowed=allowed)
    assert np.isin(I, allowed).all()
    Dr, Ir = brute_force(xq, xb[allowed], 5, "l2")
    assert_same_neighbours(D, I, Dr, allowed[Ir], rtol=1e-4, atol=1e-4)
    bitmap = np.zeros(N, dtype=bool)
    bitmap[allowed] = True
    D2, I2 = index.search(xq, k=5, nprobe=NLIST, ids_allowed=bitmap)
    np.testing.assert_array_equal(I, I2)


def test_max_codes_limits_the_scan(indexes, data):
    xb, xq = data
    index = _fresh(indexes["l2"])
    from distann.kernels import get_backend
    _, probes = get_backend("numpy").coarse_quantize(xq[:1], index.centroids, 4, "l2")
    first = int(probes[0, 0])
    budget = max(1, int(index.list_sizes[first]) // 2)
    D, I = index.search(xq[:1], k=budget + 10, nprobe=4, max_codes=budget)
    got = I[0][I[0] >= 0]
    assert len(got) == budget                            # exactly the budget was scanned
    block = index.lists.load_all()
    members = block.ids[block.offsets[first]:block.offsets[first + 1]]
    assert set(got) <= set(members[:budget].tolist())    # the leading vectors of the best list


def test_defaults_apply(indexes, data):
    _, xq = data
    index = _fresh(indexes["l2"]).set_defaults(k=3, nprobe=5)
    D, I = index.search(xq)
    D2, I2 = index.search(xq, k=3, nprobe=5)
    assert I.shape == (NQ, 3)
    np.testing.assert_array_equal(I, I2)


def test_sweep_and_pareto(indexes, data):
    xb, xq = data
    _, gt = brute_force(xq, xb, 10, "l2")
    points, front = distann.sweep_nprobe(_fresh(indexes["l2"]), xq, gt, [1, 4, NLIST], k=10)
    assert [p.nprobe for p in points] == [1, 4, NLIST]
    assert points[-1].recall == pytest.approx(1.0)
    assert points[0].recall < points[-1].recall
    assert front and all(p in points for p in front)


def test_brute_force_knn_on_cluster(client, data, tmp_path):
    xb, xq = data
    np.save(tmp_path / "b.npy", xb)
    for metric in ("l2", "ip", "cosine"):
        D, I = distann.brute_force_knn(str(tmp_path / "b.npy"), xq, 5, metric, client=client, chunk_rows=700)
        Dr, Ir = brute_force(xq, xb, 5, metric)
        assert_same_neighbours(D, I, Dr, Ir, rtol=1e-4, atol=1e-4)


def test_recall_at_k_definition():
    gt = np.array([[1, 2, 3], [4, 5, 6]])
    I = np.array([[3, 9, 1], [7, 8, -1]])
    assert distann.recall_at_k(I, gt, 3) == pytest.approx(2 / 6)
    assert distann.recall_at_k(I, gt, 3, n=1) == pytest.approx(1 / 2)
