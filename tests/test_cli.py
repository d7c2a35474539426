"""Tests of the ``distann`` command line, end to end through ``distann.cli.main``."""

from __future__ import annotations

import json
import os
import logging

import numpy as np
import pytest
import yaml

import distann
from distann.cli import build_parser, main, read_ground_truth
from distann.errors import ValidationError
from distann.synthetic import write_npy
from tests.ann_helpers import assert_same_neighbours, brute_force

N, D, NQ, NLIST, K = 3000, 16, 40, 16, 5


def run(argv: list[str]) -> int:
    """``main(argv)``, with an argparse ``SystemExit`` turned into its exit status."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Base vectors, queries and exact ground truth (.npy and .ivecs) in a temporary folder."""
    root = tmp_path_factory.mktemp("cli")
    base = write_npy(str(root / "base.npy"), N, D)
    queries = write_npy(str(root / "queries.npy"), NQ, D, stream=1)
    xb, xq = np.load(base), np.load(queries)
    dist = ((xq[:, None, :].astype(np.float64) - xb[None, :, :]) ** 2).sum(-1)
    gt = np.argsort(dist, axis=1, kind="stable")[:, :K].astype(np.int64)
    np.save(root / "gt.npy", gt)
    ivecs = np.hstack([np.full((NQ, 1), K, np.int32), gt.astype(np.int32)])
    ivecs.tofile(root / "gt.ivecs")
    return {"root": root, "base": base, "queries": queries, "gt": gt,
            "gt_npy": str(root / "gt.npy"), "gt_ivecs": str(root / "gt.ivecs")}


@pytest.fixture(scope="module")
def index(data):
    """An index built once through ``distann build`` with a config file and overrides."""
    cfg = data["root"] / "build-test.yaml"
    url = str(data["root"] / "index.zarr")
    cfg.write_text(yaml.safe_dump({"source": "missing.npy", "index": url, "spec": "IVF4,Flat",
                                   "metric": "ip", "niter": 5, "scheduler": "tcp://127.0.0.1:1"}))
    # SOURCE, --spec, --metric and --workers override the file (--workers replaces its scheduler)
    code = run(["build", "--config", str(cfg), data["base"], "--spec", f"IVF{NLIST},Flat", "--metric", "l2",
                "--workers", "2", "--chunk-rows", "1000"])
    assert code == 0
    return url


# --------------------------------------------------------------------------- end to end

def test_build_logs_summary(data, caplog):
    url = str(data["root"] / "plain.zarr")
    with caplog.at_level(logging.INFO, logger="distann"):
        assert run(["build", data["base"], url, "--spec", "IVF8,Flat", "--metric", "l2",
                    "--workers", "2", "--niter", "4", "--seed", "7"]) == 0
    assert f"ntotal={N}" in caplog.text and "nlist=8" in caplog.text


def test_build_chunk_bytes_flag_and_setting(data):
    """``--chunk-bytes`` (and the distann.build.chunk-bytes setting it defaults to) sets the size
    of the stored chunks of the shards' arrays; the index answers as with the default chunks."""
    import dask

    url = str(data["root"] / "chunked.zarr")
    assert run(["build", data["base"], url, "--spec", "IVF8,Flat", "--workers", "2", "--niter", "4", "--seed", "7",
                "--chunk-bytes", "8192"]) == 0
    idx = distann.open_index(url)
    assert idx.manifest.build["chunk_bytes"] == 8192
    assert all(idx.lists.shard(s).codes.chunks[0] == 256 for s in range(len(idx.manifest.shards)))  # the minimum
    with dask.config.set({"distann.build.chunk-bytes": 0}), pytest.raises(ValidationError, match="chunk-bytes"):
        distann.build(np.load(data["base"]), str(data["root"] / "never.zarr"), "IVF8,Flat")
    assert run(["build", data["base"], str(data["root"] / "unchunked.zarr"), "--spec", "IVF8,Flat", "--workers", "2",
                "--niter", "4", "--seed", "7"]) == 0
    default = distann.open_index(str(data["root"] / "unchunked.zarr"))
    xq = np.load(data["queries"])
    for got, want in zip(idx.search(xq, k=5, nprobe=2), default.search(xq, k=5, nprobe=2)):
        np.testing.assert_array_equal(got, want)


def test_info(index, capsys):
    assert run(["info", index]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == N
    assert info["d"] == D
    assert info["nlist"] == NLIST
    assert info["metric"] == "l2"


def test_search(index, data):
    out = data["root"] / "res.npz"
    assert run(["search", index, data["queries"], "--k", str(K), "--nprobe", "4", "--out", str(out)]) == 0
    with np.load(out) as res:
        assert set(res.files) == {"D", "I"}
        assert res["D"].shape == (NQ, K) and res["D"].dtype == np.float32
        assert res["I"].shape == (NQ, K) and res["I"].dtype == np.int64
        assert (res["I"] >= 0).all() and (res["I"] < N).all()


def test_relative_paths_with_dot_dot_are_the_users_own(index, data, monkeypatch):
    """The library refuses '..' in URLs it is handed; on the command line a relative path is the
    user's own and is resolved first, so `distann search ../index.zarr ...` works."""
    sub = data["root"] / "sub"
    sub.mkdir(exist_ok=True)
    monkeypatch.chdir(sub)
    rel = lambda p: "../" + str(p).rsplit("/", 1)[1]  # noqa: E731
    assert run(["search", rel(index), rel(data["queries"]), "--k", str(K), "--nprobe", "4",
                "--out", "../res-rel.npz"]) == 0
    _, I_ref = distann.open_index(index).search(np.load(data["queries"]), k=K, nprobe=4)
    with np.load(data["root"] / "res-rel.npz") as res:
        np.testing.assert_array_equal(res["I"], I_ref)


def test_search_exhaustive_matches_ground_truth(index, data):
    out = data["root"] / "res-all.npz"
    assert run(["search", index, data["queries"], "--k", str(K), "--nprobe", str(NLIST), "--out", str(out)]) == 0
    xb, xq = np.load(data["base"]), np.load(data["queries"])
    D_ref, I_ref = brute_force(xq, xb, K, "l2")
    with np.load(out) as res:
        # nprobe = nlist scans every vector: the result is exact, up to ties and float32
        # rounding of the distances (rtol 1e-5 of float32 sums over d=16 terms)
        assert_same_neighbours(res["D"], res["I"], D_ref, I_ref, rtol=1e-5, atol=1e-5)


def test_search_with_config_file(index, data):
    cfg = data["root"] / "search-test.yaml"
    out = data["root"] / "res-cfg.npz"
    cfg.write_text(yaml.safe_dump({"index": index, "queries": data["queries"], "out": str(out),
                                   "k": 3, "nprobe": 2, "batch_size": 7}))
    assert run(["search", "--config", str(cfg), "--k", "4"]) == 0
    with np.load(out) as res:
        assert res["I"].shape == (NQ, 4)


def test_range_search(index, data):
    out = data["root"] / "range.npz"
    assert run(["search", index, data["queries"], "--nprobe", "4", "--radius", "1e9", "--out", str(out)]) == 0
    with np.load(out) as res:
        assert set(res.files) == {"lims", "D", "I"}
        lims = res["lims"]
        assert lims.shape == (NQ + 1,) and lims[0] == 0 and (np.diff(lims) > 0).all()
        assert res["D"].shape == res["I"].shape == (lims[-1],)
        assert res["D"].dtype == np.float32 and res["I"].dtype == np.int64


def test_kmeans(data, caplog):
    out = data["root"] / "sub" / "centroids.npy"
    with caplog.at_level(logging.INFO, logger="distann"):
        assert run(["kmeans", data["base"], str(out), "--k", "8", "--niter", "3", "--workers", "2",
                    "--init", "k-means++", "--seed", "3"]) == 0
    centroids = np.load(out)
    assert centroids.shape == (8, D) and centroids.dtype == np.float32
    assert np.isfinite(centroids).all()
    assert "objective" in caplog.text


@pytest.mark.parametrize("gt_key", ["gt_npy", "gt_ivecs"])
def test_eval(index, data, capsys, gt_key):
    assert run(["eval", index, data["queries"], "--gt", data[gt_key], "--k", str(K),
                "--nprobe", "1", str(NLIST), "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("index loaded in memory")  # small enough: evaluated resident
    assert lines[1].split() == ["nprobe", f"recall@{K}", "QPS", "pareto"]
    rows = [line.split() for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [1, NLIST]
    recalls = [float(r[1]) for r in rows]
    assert all(0.0 <= r <= 1.0 for r in recalls)
    assert recalls[1] == 1.0 and recalls[1] >= recalls[0]  # nprobe = nlist: exact (no ties in this data)
    assert all(float(r[2]) > 0 for r in rows)


def test_existing_index_needs_overwrite(index, data, caplog):
    cfg = data["root"] / "build-again.yaml"
    cfg.write_text(yaml.safe_dump({"source": data["base"], "index": index, "spec": f"IVF{NLIST},Flat",
                                   "workers": 2, "niter": 3}))
    assert run(["build", "--config", str(cfg)]) == 2
    assert "Traceback" not in caplog.text
    assert run(["build", "--config", str(cfg), "--overwrite"]) == 0


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("cmd", ["build", "kmeans"])
def test_bad_metric(data, caplog, cmd):
    argv = [cmd, data["base"], str(data["root"] / "x"), "--metric", "euclid", "--workers", "2"]
    if cmd == "kmeans":
        argv += ["--k", "4"]
    assert run(argv) == 2
    assert "--metric" in caplog.text and "euclid" in caplog.text and "one of ['l2', 'ip', 'cosine']" in caplog.text


def test_unknown_config_key(data, caplog):
    cfg = data["root"] / "build-typo.yaml"
    cfg.write_text("source: a.npy\nindex: b.zarr\nnlsit: 4\n")
    assert run(["build", "--config", str(cfg)]) == 2
    assert "nlsit" in caplog.text and "allowed keys" in caplog.text


def test_bad_config_value_names_file_and_key(data, caplog):
    cfg = data["root"] / "kmeans-bad.yaml"
    cfg.write_text("source: a.npy\nout: c.npy\nk: 0\n")
    assert run(["kmeans", "--config", str(cfg)]) == 2
    assert f"{cfg}: key 'k'" in caplog.text


def test_missing_positional(caplog):
    assert run(["search", "--k", "3"]) == 2
    assert "INDEX" in caplog.text and "required" in caplog.text


def test_missing_config_file(tmp_path, caplog):
    assert run(["build", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in caplog.text


def test_workers_and_scheduler_exclusive_on_command_line():
    assert run(["build", "a.npy", "b.zarr", "--workers", "2", "--scheduler", "tcp://h:1"]) == 2


def test_cli_workers_replace_config_scheduler(tmp_path):
    from distann.cli import _job

    cfg = tmp_path / "build-s.yaml"
    cfg.write_text("source: a.npy\nindex: b.zarr\nscheduler: tcp://h:1\n")
    job = _job("build", build_parser().parse_args(["build", "--config", str(cfg), "--workers", "3"]))
    assert (job.workers, job.scheduler, job.source) == (3, None, os.path.abspath("a.npy"))  # local: resolved


def test_usage_errors_exit_2():
    assert run([]) == 2
    assert run(["frobnicate"]) == 2
    assert run(["search", "i", "q", "--k", "three"]) == 2
    assert run(["eval", "i", "q", "--k", "3"]) == 2  # --gt missing


def test_global_options_before_or_after_command(tmp_path, caplog):
    assert run(["--log-level", "debug", "build", "a.npy", "b.zarr", "--spec", "IVF0,Flat"]) == 2
    assert run(["build", "-v", "a.npy", "b.zarr", "--spec", "IVF0,Flat"]) == 2
    assert "--spec: received 'IVF0,Flat'; IVF<nlist> with nlist >= 1" in caplog.text


def test_read_ground_truth_formats(tmp_path):
    gt = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.save(tmp_path / "g.npy", gt)
    np.hstack([np.full((3, 1), 4, np.int32), gt]).tofile(tmp_path / "g.ivecs")
    for name in ("g.npy", "g.ivecs"):
        out = read_ground_truth(str(tmp_path / name))
        assert out.dtype == np.int64 and (out == gt).all()
    np.save(tmp_path / "f.npy", gt.astype(np.float32))
    with pytest.raises(ValidationError, match="--gt"):
        read_ground_truth(str(tmp_path / "f.npy"))
    with pytest.raises(ValidationError, match="--gt"):
        read_ground_truth(str(tmp_path / "g.txt"))


def test_build_joins_a_running_scheduler(client, tmp_path):
    """--scheduler ADDRESS joins an existing cluster (here the session's LocalCluster) and
    leaves it running."""
    src = str(tmp_path / "base.npy")
    write_npy(src, 3000, 8)
    idx = str(tmp_path / "joined.zarr")
    address = client.scheduler.address
    assert run(["build", src, idx, "--spec", "IVF4,Flat", "--niter", "3", "--scheduler", address]) == 0
    assert distann.open_index(idx).ntotal == 3000
    assert len(client.scheduler_info()["workers"]) == 2  # the cluster we joined is still up


# --------------------------------------------------------------------------- issue 6: what a new user hit

def test_unreachable_scheduler_is_one_clean_line(data, caplog):
    import dask.config

    with dask.config.set({"distann.cluster.connect-timeout": 1}):
        assert run(["build", data["base"], str(data["root"] / "never.zarr"), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "--scheduler: received 'tcp://127.0.0.1:1'; a reachable Dask scheduler: none answered" in caplog.text
    assert "within 1 s" in caplog.text


def test_index_path_that_is_a_file_refused_before_any_cluster(data, tmp_path, caplog):
    target = tmp_path / "afile"
    target.write_text("not an index")
    assert run(["build", data["base"], str(target), "--spec", "IVF4,Flat", "--workers", "1"]) == 2
    assert "INDEX: received" in caplog.text and "this is an existing file" in caplog.text
    assert "started local Dask cluster" not in caplog.text
    assert target.read_text() == "not an index"


def test_folder_of_other_files_needs_overwrite_and_keeps_them(data, tmp_path, caplog):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "g000001").mkdir()  # named like a generation, but not written by distann
    (folder / "g000001" / "photo.jpg").write_bytes(b"\xff\xd8")
    argv = ["build", data["base"], str(folder), "--spec", "IVF4,Flat", "--workers", "1", "--niter", "2"]
    assert run(argv) == 2
    assert "not a distann index (g000001, notes.txt)" in caplog.text
    assert run([*argv, "--overwrite"]) == 2  # its g000001/ would have to be deleted: refused
    assert "g000001/ holds files distann did not write" in caplog.text
    (folder / "g000001" / "photo.jpg").unlink()
    (folder / "g000001").rmdir()
    assert run([*argv, "--overwrite"]) == 0
    assert run([*argv, "--overwrite"]) == 0  # a rebuild removes its own old generation only
    assert (folder / "notes.txt").read_text() == "keep me"
    assert distann.open_index(str(folder)).manifest.generation == 2


@pytest.mark.parametrize("content", ["pickled", "text"])
def test_eval_ground_truth_that_is_not_an_array(index, data, tmp_path, caplog, content):
    gt = tmp_path / "gt.npy"
    if content == "pickled":
        np.save(gt, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        gt.write_text("1 2 3\n")
    assert run(["eval", index, data["queries"], "--gt", str(gt), "--k", str(K)]) == 2
    assert "--gt: received" in caplog.text and "must be an .npy file holding an integer array" in caplog.text


@pytest.mark.parametrize("where", ["directory", "below a file"])
def test_search_output_checked_before_searching(index, data, tmp_path, caplog, where):
    (tmp_path / "f").write_text("")
    out = tmp_path if where == "directory" else tmp_path / "f" / "r.npz"
    assert run(["search", index, data["queries"], "--k", "3", "--nprobe", "2", "--out", str(out)]) == 2
    assert "--out: received" in caplog.text
    assert "searched" not in caplog.text


@pytest.mark.parametrize("dtype", ["int32", "int8", "float16"])
def test_cli_queries_follow_the_api_dtype_rule(index, data, tmp_path, caplog, dtype):
    queries = tmp_path / f"q-{dtype}.npy"
    np.save(queries, np.load(data["queries"]).astype(dtype))
    assert run(["search", index, str(queries), "--k", "3", "--out", str(tmp_path / "r.npz")]) == 2
    assert f"QUERIES: received '{queries} of dtype {dtype}'; float32 (or float64) queries" in caplog.text
    with pytest.raises(ValidationError, match=f"xq: received 'array of dtype {dtype}'; float32 \\(or float64\\)"):
        distann.open_index(index).search(np.load(queries), k=3)


def test_cli_float64_queries_accepted(index, data, tmp_path):
    queries = tmp_path / "q64.npy"
    np.save(queries, np.load(data["queries"]).astype(np.float64))
    assert run(["search", index, str(queries), "--k", "3", "--out", str(tmp_path / "r.npz")]) == 0


@pytest.mark.parametrize("cmd", ["search", "eval"])
def test_dimension_mismatch_in_command_line_words(index, data, tmp_path, caplog, cmd):
    queries = tmp_path / "q17.npy"
    np.save(queries, np.ones((10, D + 1), np.float32))
    extra = ["--out", str(tmp_path / "r.npz")] if cmd == "search" else ["--gt", data["gt_npy"]]
    assert run([cmd, index, str(queries), "--k", "3", *extra]) == 2
    assert f"QUERIES: received '{queries}'; vectors of the index's dimension d={D}; this file has d={D + 1}" \
        in caplog.text
    assert "xq[None" not in caplog.text and "(1, " not in caplog.text


def test_missing_out_named_as_the_option(index, data, caplog):
    assert run(["search", index, data["queries"]]) == 2
    assert "--out (or `out` in --config): received None; required" in caplog.text
    assert "config.out" not in caplog.text


def test_radius_and_k_refused_together(index, data, tmp_path, caplog):
    assert run(["search", index, data["queries"], "--k", "3", "--radius", "1.0",
                "--out", str(tmp_path / "r.npz")]) == 2
    assert "--k and --radius: received (3, 1.0); give at most one" in caplog.text


def test_search_parquet_queries_by_column(index, data, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    xq = np.load(data["queries"])
    col = pa.FixedSizeListArray.from_arrays(pa.array(xq.reshape(-1)), D)
    pq.write_table(pa.table({"emb": col, "other": col}), tmp_path / "q.parquet")
    out = tmp_path / "r.npz"
    assert run(["search", index, str(tmp_path / "q.parquet"), "--k", "3", "--out", str(out)]) == 2
    assert "pass column= to choose one" in caplog.text
    assert run(["search", index, str(tmp_path / "q.parquet"), "--column", "emb", "--k", "3", "--out", str(out)]) == 0
    with np.load(out) as res:
        np.testing.assert_array_equal(res["I"], distann.open_index(index).search(xq, k=3)[1])


def test_eval_streamed_on_request(index, data, capsys):
    assert run(["eval", index, data["queries"], "--gt", data["gt_npy"], "--k", str(K), "--no-load"]) == 0
    assert capsys.readouterr().out.startswith("index streamed from the store (--no-load)")


def test_sweep_warms_up_each_nprobe_before_timing(index, data):
    from distann.evaluation import sweep_nprobe

    calls = []

    class Recorder:  # the real index, with its search calls recorded
        def __init__(self, inner):
            self.inner = inner

        def search(self, xq, **kw):
            calls.append((len(xq), kw["nprobe"]))
            return self.inner.search(xq, **kw)

    xq = np.load(data["queries"])
    sweep_nprobe(Recorder(distann.open_index(index)), xq, data["gt"], [1, 4], k=K, repeats=2, warmup=10)
    assert calls == [(10, 1), (NQ, 1), (NQ, 1), (10, 4), (NQ, 4), (NQ, 4)]


def test_pyproject_license_is_an_spdx_string():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # the table form is deprecated by setuptools


def test_compressed_index_through_the_command_line(data, tmp_path, capsys):
    """Every command works with a codec spec: build, info (the codec and its error), search with
    --k-factor, range search, verify and eval."""
    url = str(tmp_path / "pq.zarr")
    assert run(["build", data["base"], url, "--spec", "PCAR8,IVF4,PQ4x4,RFlat", "--workers", "2",
                "--niter", "4"]) == 0
    capsys.readouterr()
    assert run(["info", url]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["codec"]["spec"] == "PCAR8,IVF4,PQ4x4,RFlat" and info["code_size"] == 4 and info["codec"]["mse"] > 0
    out = tmp_path / "r.npz"
    hits = {}
    for factor in ("1", "20"):
        assert run(["search", url, data["queries"], "--k", str(K), "--nprobe", "4", "--k-factor", factor,
                    "--out", str(out)]) == 0
        with np.load(out) as res:
            xb, xq = np.load(data["base"]), np.load(data["queries"])
            exact = ((xq[:, None, :].astype(np.float64) - xb[res["I"]]) ** 2).sum(-1)
            np.testing.assert_allclose(res["D"], exact, rtol=1e-5, atol=1e-5)  # RFlat: exact distances
            hits[factor] = np.mean([len(set(a) & set(b)) for a, b in zip(res["I"], data["gt"])])
    assert hits["20"] > hits["1"] + 0.5  # re-ranking 20 k candidates finds far more true neighbours
    assert run(["search", url, data["queries"], "--radius", "1e9", "--nprobe", "1", "--out", str(out)]) == 0
    assert run(["verify", url]) == 0
    assert run(["eval", url, data["queries"], "--gt", data["gt_npy"], "--k", str(K), "--nprobe", "1", "4",
                "--k-factor", "20"]) == 0
    assert "verified" in capsys.readouterr().out
