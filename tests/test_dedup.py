"""The dedup job on the session's multi-process LocalCluster, held to exact brute-force groups."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distann
from distann.errors import IndexExistsError, ValidationError
from tests.ann_helpers import cli, dataset, exact_scores, set_fault


def planted(n=3000, d=24, groups=60, size=3, exact=40, noise=1e-3, seed=5):
    """Distinct base vectors; ``groups`` groups of ``size`` near copies (small noise) and
    ``exact`` exact copies of other rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    for g in range(groups):
        base = g * 20
        for j in range(1, size):
            x[base + j] = x[base] + noise * rng.standard_normal(d).astype(np.float32)
    x[n - exact:] = x[n - 2 * exact:n - exact]
    return x


def brute_groups(x: np.ndarray, threshold: float, metric: str) -> np.ndarray:
    """Exact groups: connected components of the pairs within the threshold (float64) and of
    identical vectors (duplicates whatever the metric), as the lowest row of each row's component."""
    s = exact_scores(x, x, metric)
    close = (s <= threshold) if metric == "l2" else (s >= threshold)
    close |= (x[:, None, :] == x[None, :, :]).all(-1)
    parent = np.arange(len(x))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(*np.nonzero(np.triu(close, 1))):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(len(x))])


def read(out) -> dict[str, np.ndarray]:
    t = pq.read_table(str(out))
    cols = {name: np.asarray(t.column(name)) for name in t.column_names}
    order = np.argsort(cols["id"])
    return {k: v[order] for k, v in cols.items()}


def check(out, x, threshold, metric, ids=None):
    got = read(out)
    ids = np.arange(len(x)) if ids is None else ids
    ref = brute_groups(x, threshold, metric)
    order = np.argsort(ids)
    lowest = {}  # each component's lowest id
    for row, root in enumerate(ref):
        lowest[root] = min(lowest.get(root, ids[row]), ids[row])
    want_group = np.array([lowest[r] for r in ref])[order]
    np.testing.assert_array_equal(got["id"], ids[order])
    np.testing.assert_array_equal(got["group_id"], want_group)
    np.testing.assert_array_equal(got["is_representative"], got["id"] == got["group_id"])
    return got


@pytest.fixture(scope="module")
def xs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    x = planted()
    np.save(root / "x.npy", x)
    return root, x


def test_planted_groups_are_found_exactly(xs, client, tmp_path):
    root, x = xs
    s = distann.dedup(str(root / "x.npy"), 0.999, "cosine", out=str(tmp_path / "o.parquet"), client=client,
                      chunk_rows=700)
    got = check(tmp_path / "o.parquet", x, 0.999, "cosine")
    sizes = np.bincount(np.unique(got["group_id"], return_inverse=True)[1])
    assert s["pairs"] == 60 * 3  # each group of 3 near copies: 3 pairs, each counted once
    assert s["exact_duplicates"] == 40 and s["group_sizes"] == {"1": 3000 - 60 * 3 - 80, "2": 40, "3": 60}
    assert s["groups"] == len(sizes) == 3000 - 60 * 2 - 40 and s["duplicates_removed"] == 160
    assert json.loads((tmp_path / "o.parquet" / "_summary.json").read_text()) == s
    png = (tmp_path / "o.parquet" / "_similarity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (tmp_path / "o.parquet" / "_distann" / "work").exists()


@pytest.mark.parametrize("metric,threshold", [("l2", 0.0), ("l2", 1e-4), ("ip", 0.999 * 24), ("cosine", 1.0),
                                              ("cosine", -1.0), ("l2", 1e9)])
def test_thresholds_and_metrics_match_brute_force(xs, client, tmp_path, metric, threshold):
    root, x = xs
    x = x[-600:] if threshold in (-1.0, 1e9) else x  # every pair matches: keep it small
    np.save(tmp_path / "x.npy", x)
    s = distann.dedup(str(tmp_path / "x.npy"), threshold, metric, out=str(tmp_path / "o.parquet"), client=client,
                      chunk_rows=500)
    check(tmp_path / "o.parquet", x, threshold, metric)
    if threshold in (-1.0, 1e9):
        assert s["groups"] == 1
    if metric == "l2" and threshold == 0.0:
        assert s["duplicates_removed"] == s["exact_duplicates"] == 40


def test_every_vector_the_same_and_none_alike(client, tmp_path):
    same = np.tile(np.arange(8, dtype=np.float32), (500, 1))
    np.save(tmp_path / "same.npy", same)
    s = distann.dedup(str(tmp_path / "same.npy"), 0.9, "cosine", out=str(tmp_path / "same.parquet"), client=client,
                      chunk_rows=128)
    got = read(tmp_path / "same.parquet")
    assert s["groups"] == 1 and s["duplicates_removed"] == 499 and s["exact_duplicates"] == 499
    assert (got["group_id"] == 0).all() and got["is_representative"].sum() == 1 and got["is_representative"][0]
    xb, _ = dataset(2000, 16)
    np.save(tmp_path / "distinct.npy", xb)
    s = distann.dedup(str(tmp_path / "distinct.npy"), 0.999999, "cosine", out=str(tmp_path / "d.parquet"),
                      client=client)
    got = read(tmp_path / "d.parquet")
    assert s["groups"] == 2000 and s["pairs"] == 0 and got["is_representative"].all()
    np.testing.assert_array_equal(got["group_id"], np.arange(2000))


def test_user_ids_survive_and_centroid_representative(client, tmp_path):
    x = planted(n=1200, groups=30, size=4, exact=0, noise=1e-2)
    ids = (np.arange(1200, dtype=np.int64) * 7 + 1_000_003)[::-1].copy()  # descending: lowest id is the last row
    table = pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 24), "doc": ids})
    pq.write_table(table, tmp_path / "docs.parquet")
    s = distann.dedup(str(tmp_path / "docs.parquet"), 0.99, "cosine", column="emb", ids_column="doc",
                      out=str(tmp_path / "o.parquet"), client=client)
    got = check(tmp_path / "o.parquet", x, 0.99, "cosine", ids=ids)
    assert set(got["id"]) == set(ids) and s["duplicate_groups"] == 30
    s = distann.dedup(str(tmp_path / "docs.parquet"), 0.99, "cosine", column="emb", ids_column="doc",
                      out=str(tmp_path / "c.parquet"), client=client, representative="centroid")
    got = read(tmp_path / "c.parquet")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for g in range(30):
        rows = g * 20 + np.arange(4)
        cent = xn[rows].astype(np.float64).mean(0)
        best = rows[np.argmin(((xn[rows] - cent) ** 2).sum(1))]
        member = np.isin(got["id"], ids[rows])
        assert got["is_representative"][member].sum() == 1
        assert got["id"][member & got["is_representative"]][0] == ids[best]
    assert s["groups"] == got["is_representative"].sum()


def test_reused_index_and_knn_mode(xs, client, tmp_path):
    root, x = xs
    index = distann.build(str(root / "x.npy"), str(tmp_path / "idx.zarr"), "IVF16,Flat", "cosine", client=client)
    distann.dedup(str(root / "x.npy"), 0.999, "cosine", out=str(tmp_path / "o.parquet"), index=index.url, k=5,
                  nprobe=16, client=client)
    check(tmp_path / "o.parquet", x, 0.999, "cosine")


def test_resume_after_a_failure(xs, client, tmp_path):
    root, x = xs
    set_fault(client, "scan:r00000")
    try:
        with pytest.raises(Exception, match="injected failure"):
            distann.dedup(str(root / "x.npy"), 0.999, "cosine", out=str(tmp_path / "o.parquet"), client=client)
    finally:
        set_fault(client, None)
    assert not (tmp_path / "o.parquet" / "_summary.json").exists()
    assert (tmp_path / "o.parquet" / "_distann" / "work" / "index.zarr" / "manifest.json").exists()
    s = distann.dedup(str(root / "x.npy"), 0.999, "cosine", out=str(tmp_path / "o.parquet"), client=client)
    check(tmp_path / "o.parquet", x, 0.999, "cosine")
    assert s["duplicates_removed"] == 160


def test_bad_input_is_refused_before_any_task(xs, client, tmp_path):
    root, x = xs
    src, out = str(root / "x.npy"), str(tmp_path / "o.parquet")
    for metric, t, what in (("l2", -0.5, "squared L2"), ("cosine", 1.5, r"\[-1, 1\]"), ("cosine", float("nan"),
                                                                                        "finite")):
        with pytest.raises(ValidationError, match=what):
            distann.dedup(src, t, metric, out=out, client=client)
    with pytest.raises(ValidationError, match="metric"):
        distann.dedup(src, 0.9, "angular", out=out, client=client)
    l2 = distann.build(src, str(tmp_path / "l2.zarr"), "IVF8,Flat", "l2", client=client)
    with pytest.raises(ValidationError, match="metric cosine"):
        distann.dedup(src, 0.9, "cosine", out=out, index=l2.url, client=client)
    other = np.load(src)[:900]
    np.save(tmp_path / "other.npy", other)
    with pytest.raises(ValidationError, match="built from"):
        distann.dedup(str(tmp_path / "other.npy"), 1.0, "l2", out=out, index=l2.url, client=client)
    sq = distann.build(src, str(tmp_path / "sq.zarr"), "IVF8,SQ8", "l2", client=client)
    with pytest.raises(ValidationError, match="exact vectors"):
        distann.dedup(src, 1.0, "l2", out=out, index=sq.url, client=client)
    assert not os.path.exists(out)
    bad = x[:800].copy()
    bad[333] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValidationError, match="row 333"):
        distann.dedup(str(tmp_path / "bad.npy"), 0.9, "cosine", out=out, client=client)
    assert not os.path.exists(os.path.join(out, "_summary.json"))
    (tmp_path / "taken.parquet").mkdir()
    (tmp_path / "taken.parquet" / "mine.csv").write_text("x")
    with pytest.raises(IndexExistsError, match="mine.csv"):
        distann.dedup(src, 0.9, "cosine", out=str(tmp_path / "taken.parquet"), client=client)


def test_cli_dedup_with_a_config_file(xs, tmp_path):
    root, x = xs
    cfg = tmp_path / "dedup-job.yaml"
    cfg.write_text(f"source: {root / 'x.npy'}\nthreshold: 0.999\nmetric: cosine\nout: {tmp_path / 'o.parquet'}\n"
                   "workers: 2\n")
    done = subprocess.run(cli("dedup", "--config", str(cfg), quiet=True), capture_output=True, text=True,
                          check=True, timeout=300)
    summary = json.loads(done.stdout)
    assert summary["duplicates_removed"] == 160
    check(tmp_path / "o.parquet", x, 0.999, "cosine")
    again = subprocess.run(cli("dedup", "--config", str(cfg)), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    bad = subprocess.run(cli("dedup", str(root / "x.npy"), "--threshold", "-1", "--metric", "l2", "--out",
                             str(tmp_path / "b.parquet")), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--threshold" in bad.stderr and "squared L2" in bad.stderr
