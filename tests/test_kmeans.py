"""Distributed k-means on a real multi-process cluster, held to faiss.Kmeans."""

from __future__ import annotations

import numpy as np
import pytest

import distann
from distann.errors import ValidationError
from distann.train.kmeans import TrainingWarning, split_empty_clusters
from tests.ann_helpers import dataset

faiss = pytest.importorskip("faiss")

N, D, K, NITER = 12_800, 32, 50, 20  # 256 points per centroid: no subsampling on either side


@pytest.fixture(scope="module")
def data():
    xb, _ = dataset(N, D)
    return xb


@pytest.mark.parametrize("init", ["k-means||", "k-means++", "random"])
def test_l2_objective_within_one_percent_of_faiss(client, data, init):
    ours = distann.kmeans(data, K, niter=NITER, init=init, seed=1234, client=client, chunk_rows=3000)
    km = faiss.Kmeans(D, K, niter=NITER, seed=1234, max_points_per_centroid=256)
    km.train(data)
    assert len(ours.objective) == NITER
    assert ours.centroids.shape == (K, D) and ours.centroids.dtype == np.float32
    # the quality target of the issue: final objective within 1% of Faiss's
    assert ours.objective[-1] <= 1.01 * km.obj[-1], (ours.objective[-1], km.obj[-1])
    # Lloyd never increases the objective (splits of empty clusters aside, none here)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(ours.objective, ours.objective[1:]))
    # the reported objective is the real one: the last iteration reports the objective of the
    # centroids it starts from, which a run one iteration shorter returns (same seed: same
    # steps). rtol 1e-4: float32 GEMM scores against a float64 recomputation.
    shorter = distann.kmeans(data, K, niter=NITER - 1, init=init, seed=1234, client=client, chunk_rows=3000)
    d2 = ((data[:, None, :].astype(np.float64) - shorter.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(ours.objective[-1], d2.min(1).sum(), rtol=1e-4)


def test_spherical_objective_within_one_percent_of_faiss(client, data):
    x = data / np.linalg.norm(data, axis=1, keepdims=True)
    ours = distann.kmeans(x, K, niter=NITER, metric="ip", client=client, chunk_rows=5000)
    km = faiss.Kmeans(D, K, niter=NITER, seed=1234, spherical=True, max_points_per_centroid=256)
    km.train(x)
    np.testing.assert_allclose(np.linalg.norm(ours.centroids, axis=1), 1, rtol=1e-5)  # float32 normalization
    assert ours.objective[-1] >= 0.99 * km.obj[-1]


def test_seeded_and_reproducible(client, data):
    a = distann.kmeans(data[:4000], 16, niter=5, seed=7, client=client, chunk_rows=1000)
    b = distann.kmeans(data[:4000], 16, niter=5, seed=7, client=client, chunk_rows=1000)
    c = distann.kmeans(data[:4000], 16, niter=5, seed=8, client=client, chunk_rows=1000)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.objective == b.objective
    assert not np.array_equal(a.centroids, c.centroids)


def test_sample_is_capped_per_centroid(client, data):
    res = distann.kmeans(data, 10, niter=2, max_points_per_centroid=100, client=client, chunk_rows=4000)
    assert res.n_sample == 1000 and res.counts.sum() == 1000


def test_warns_under_39_points_per_centroid(client, data):
    with pytest.warns(TrainingWarning, match="fewer than 39"):
        distann.kmeans(data[:300], 10, niter=2, client=client)


def test_bad_parameters_rejected(data):
    with pytest.raises(ValidationError, match="k: received 0"):
        distann.kmeans(data, 0)
    with pytest.raises(ValidationError, match="k: received 20000"):
        distann.kmeans(data, 20_000)
    with pytest.raises(ValidationError, match="init"):
        distann.kmeans(data, 4, init="kmeans")
    with pytest.raises(ValidationError, match="metric"):
        distann.kmeans(data, 4, metric="hamming")


def test_split_empty_clusters_like_faiss():
    rng = np.random.default_rng(0)
    cents = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    counts = np.array([10, 0, 1])
    assert split_empty_clusters(cents, counts, rng) == 1
    # only cluster 0 can donate (size - 1 > 0): its centroid is split in two, pushed apart
    eps = 1 / 1024
    np.testing.assert_allclose(cents[1], [1 * (1 + eps), 2 * (1 - eps), 3 * (1 + eps)], rtol=1e-6)
    np.testing.assert_allclose(cents[0], [1 * (1 - eps), 2 * (1 + eps), 3 * (1 - eps)], rtol=1e-6)


def test_sample_plan_is_uniform_over_chunks():
    """The per-chunk counts of the sample follow the chunk sizes: over 400 seeds the mean
    count of each chunk is within 3% of n_sample * size / n (the standard error of a mean of
    400 hypergeometric counts of this size is under 1%)."""
    from distann.train.sampling import chunk_sample_rows, plan_sample

    sizes = np.array([1000, 4000, 2500, 500], dtype=np.int64)
    counts = np.array([plan_sample(sizes, 800, seed) for seed in range(400)])
    assert (counts.sum(axis=1) == 800).all() and (counts <= sizes).all()
    np.testing.assert_allclose(counts.mean(axis=0), 800 * sizes / sizes.sum(), rtol=0.03)
    rows = chunk_sample_rows(4000, 300, seed=5, chunk_index=1)
    assert len(np.unique(rows)) == 300 and rows.min() >= 0 and rows.max() < 4000 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(plan_sample(sizes, 10**6, 1), sizes)  # more than there is: everything


def test_sample_rows_are_not_broadcast(client, data, monkeypatch):
    """The defect: every sampled row id was scattered to every worker (about 1 GiB each at 1B
    vectors). Now the client sends each scan task two numbers and scatters nothing."""
    from distann.chunks import plan_chunks
    from distann.sources import ArraySource
    from distann.train.api import collect_sample

    scattered = []
    real = client.scatter
    monkeypatch.setattr(client, "scatter", lambda data, **kw: scattered.append(data) or real(data, **kw))
    blocks, sizes, _ = collect_sample(client, ArraySource(data), plan_chunks(len(data), 1000), 5000, 3, False, False)
    assert sizes.sum() == 5000 and sum(len(b) for b in client.gather(blocks)) == 5000
    assert scattered == []
