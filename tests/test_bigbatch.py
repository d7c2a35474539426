"""Big-batch search on the session's multi-process LocalCluster: equal to regular search,
resumable byte for byte, and refusing bad input before any task runs."""

from __future__ import annotations

import hashlib
import os
import subprocess

import numpy as np
import pytest

import distann
from distann.errors import IndexExistsError, IndexFormatError, ValidationError
from tests.ann_helpers import cli, dataset, set_fault

N, D, NQ = 6000, 16, 1500


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigbatch")
    xb, xq = dataset(N, D, NQ)
    np.save(root / "base.npy", xb)
    np.save(root / "queries.npy", xq)
    return root, xb, xq


@pytest.fixture(scope="module")
def indexes(data, client):
    root = data[0]
    out = {}
    for spec, metric in (("IVF32,Flat", "l2"), ("IVF32,SQ8", "l2"), ("IVF32,PQ4x4,RFlat", "l2"), ("IVF32,Flat", "ip")):
        url = str(root / f"{spec.replace(',', '_')}-{metric}.zarr")
        out[spec, metric] = distann.build(str(root / "base.npy"), url, spec, metric, client=client, shard_bytes=40_000)
    return out


def _search(index, root, client, tmp_path, name, **kw):
    return distann.big_batch_search(index.url, str(root / "queries.npy"), out=str(tmp_path / name), client=client,
                                    chunk_rows=400, range_bytes=60_000, **kw)


@pytest.mark.parametrize("key", [("IVF32,Flat", "l2"), ("IVF32,SQ8", "l2"), ("IVF32,PQ4x4,RFlat", "l2"),
                                 ("IVF32,Flat", "ip")])
@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_knn_equals_regular_search(indexes, data, client, tmp_path, key, fmt):
    root, _, xq = data
    index = indexes[key]
    res = _search(index, root, client, tmp_path, f"knn.{fmt}", k=7, nprobe=5)
    assert len(index.manifest.shards) > 2 and res.record["list_ranges"] > 1  # several scan tasks
    D, I = res.knn()
    D0, I0 = index.search(xq, k=7, nprobe=5)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-6, atol=1e-6)
    assert res.format == fmt and res.nq == NQ


@pytest.mark.parametrize("key", [("IVF32,Flat", "l2"), ("IVF32,SQ8", "l2"), ("IVF32,PQ4x4,RFlat", "l2"),
                                 ("IVF32,Flat", "ip")])
@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_range_equals_regular_search(indexes, data, client, tmp_path, key, fmt):
    root, _, xq = data
    index = indexes[key]
    D0, _ = index.search(xq[:200], k=5, nprobe=4)
    radius = float(np.median(D0[:, 4]))
    res = _search(index, root, client, tmp_path, f"range.{fmt}", radius=radius, nprobe=4)
    lims, D, I = res.range()
    lims0, Dr0, Ir0 = index.range_search(xq, radius, nprobe=4)
    assert lims0[-1] > NQ  # a real amount of results
    np.testing.assert_array_equal(lims, lims0)
    np.testing.assert_array_equal(I, Ir0)
    np.testing.assert_allclose(D, Dr0, rtol=1e-6, atol=1e-6)
    part_l, part_D, part_I = res.range(100, 300)  # a slice reads the same
    np.testing.assert_array_equal(part_I, Ir0[lims0[100]:lims0[300]])
    np.testing.assert_array_equal(part_l, lims0[100:301] - lims0[100])


def test_max_codes_and_k_factor_as_regular_search(indexes, data, client, tmp_path):
    root, _, xq = data
    index = indexes["IVF32,PQ4x4,RFlat", "l2"]
    res = _search(index, root, client, tmp_path, "mc.zarr", k=5, nprobe=6, max_codes=700, k_factor=2)
    D, I = res.knn()
    D0, I0 = index.search(xq, k=5, nprobe=6, max_codes=700, k_factor=2)
    np.testing.assert_array_equal(I, I0)


def test_self_join_excludes_each_query_itself(indexes, data, client, tmp_path):
    root, xb, _ = data
    index = indexes["IVF32,Flat", "l2"]
    res = distann.big_batch_search(index, str(root / "base.npy"), k=4, nprobe=32, out=str(tmp_path / "self.zarr"),
                                   client=client, exclude_self=True, chunk_rows=1000)
    D, I = res.knn()
    assert not (I == np.arange(N)[:, None]).any()
    D0, I0 = index.search(xb[:300], k=5, nprobe=32)  # nprobe = nlist: exact; drop self (first)
    assert (I0[:, 0] == np.arange(300)).all()
    np.testing.assert_array_equal(I[:300], I0[:, 1:])


def test_exact_range_self_join_matches_brute_force(indexes, data, client, tmp_path):
    root, xb, _ = data
    index = indexes["IVF32,Flat", "l2"]
    d2 = ((xb[:400, None, :].astype(np.float64) - xb[None, :, :]) ** 2).sum(-1)
    radius = float(np.quantile(d2[d2 > 0], 0.001))
    res = distann.big_batch_search(index, str(root / "base.npy"), radius=radius, nprobe=32, exact=True,
                                   exclude_self=True, out=str(tmp_path / "pairs.parquet"), client=client)
    lims, D, I = res.range(0, 400)
    for q in range(400):
        want = set(np.flatnonzero(d2[q] < radius)) - {q}
        assert set(I[lims[q]:lims[q + 1]]) == want
        np.testing.assert_allclose(D[lims[q]:lims[q + 1]], d2[q, I[lims[q]:lims[q + 1]]], rtol=1e-6)


def _digest(root) -> dict[str, str]:
    """Every data file of a result (not the commit record, which holds timings), by content."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            if rel.startswith("_distann"):
                continue
            with open(path, "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize("fmt,mode,fault", [("zarr", "knn", "scan:r00002"), ("parquet", "range", "scan:r00001"),
                                            ("zarr", "range", "reduce:c000002")])
def test_resume_after_a_failure_gives_identical_output(indexes, data, client, tmp_path, fmt, mode, fault):
    root, _, xq = data
    index = indexes["IVF32,SQ8", "l2"]
    params = dict(k=5) if mode == "knn" else dict(radius=float(np.median(index.search(xq[:50], k=3, nprobe=3)[0])))
    clean = _search(index, root, client, tmp_path, f"clean.{fmt}", nprobe=3, **params)
    url = tmp_path / f"resumed.{fmt}"
    set_fault(client, fault)
    try:
        with pytest.raises(Exception, match="injected failure"):
            _search(index, root, client, tmp_path, f"resumed.{fmt}", nprobe=3, **params)
    finally:
        set_fault(client, None)
    with pytest.raises(IndexFormatError, match="rerun"):
        distann.open_result(str(url))  # nothing readable as complete
    assert not (url / "_distann.json").exists()
    resumed = _search(index, root, client, tmp_path, f"resumed.{fmt}", nprobe=3, **params)
    if fault.startswith("scan"):
        assert resumed.record["resumed_ranges"] >= 1
    assert _digest(url) == _digest(tmp_path / f"clean.{fmt}")
    assert not (url / "_distann" / "work").exists()
    assert resumed.record["results"] == clean.record["results"]


def test_bad_input_is_refused_before_any_task(indexes, data, client, tmp_path):
    root, xb, _ = data
    index = indexes["IVF32,Flat", "l2"]
    q = str(root / "queries.npy")
    out = str(tmp_path / "o.zarr")
    with pytest.raises(ValidationError, match="metric"):
        distann.big_batch_search(index, q, k=3, out=out, metric="ip", client=client)
    np.save(tmp_path / "q8.npy", xb[:10, :8])
    with pytest.raises(ValidationError, match="d=16"):
        distann.big_batch_search(index, str(tmp_path / "q8.npy"), k=3, out=out, client=client)
    with pytest.raises(ValidationError, match="radius"):
        distann.big_batch_search(index, q, radius=-1.0, out=out, client=client)
    with pytest.raises(ValidationError, match="k"):
        distann.big_batch_search(index, q, k=3, radius=1.0, out=out, client=client)
    with pytest.raises(ValidationError, match="nprobe"):
        distann.big_batch_search(index, q, k=3, nprobe=33, out=out, client=client)
    with pytest.raises(ValidationError, match="exact"):
        distann.big_batch_search(indexes["IVF32,SQ8", "l2"], q, k=3, out=out, exact=True, client=client)
    assert not os.path.exists(out)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(IndexExistsError, match="notes.txt"):
        distann.big_batch_search(index, q, k=3, out=str(tmp_path / "taken"), client=client)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    res = distann.big_batch_search(index, q, k=3, out=out, client=client)
    with pytest.raises(IndexExistsError, match="overwrite"):
        distann.big_batch_search(index, q, k=3, out=out, client=client)
    res2 = distann.big_batch_search(index, q, k=4, out=out, client=client, overwrite=True)
    assert res2.knn()[1].shape == (NQ, 4) and res.url == res2.url
    bad = xb[:900].copy()
    bad[777, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValidationError, match="row 777"):
        distann.big_batch_search(index, str(tmp_path / "nan.npy"), k=3, out=str(tmp_path / "n.zarr"), client=client)
    with pytest.raises(IndexFormatError):
        distann.open_result(str(tmp_path / "n.zarr"))


def test_cli_big_batch(indexes, data, tmp_path):
    root, _, xq = data
    index = indexes["IVF32,Flat", "l2"]
    out = tmp_path / "cli.parquet"
    subprocess.run(cli("search", index.url, str(root / "queries.npy"), "--big-batch", "--k", "3", "--nprobe", "4",
                       "--out", str(out), "--workers", "2", "--chunk-rows", "500", quiet=True), check=True, timeout=300)
    D, I = distann.open_result(str(out)).knn()
    np.testing.assert_array_equal(I, index.search(xq, k=3, nprobe=4)[1])
    bad = subprocess.run(cli("search", index.url, str(root / "queries.npy"), "--big-batch", "--k", "3",
                             "--out", str(out), "--workers", "2"), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "overwrite" in bad.stderr
    bad = subprocess.run(cli("search", index.url, str(root / "queries.npy"), "--exclude-self", "--out",
                             str(tmp_path / "x.npz")), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--exclude-self" in bad.stderr and "--big-batch" in bad.stderr
