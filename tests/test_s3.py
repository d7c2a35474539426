"""distann on an S3 API: moto in server mode (a separate process on loopback, the ``s3_server``
fixture), reached through s3fs with storage options given to the Python API, the command line
(``--storage-options``) and a job file.

Build (its source also on S3), open, search, distributed search, big-batch search, dedup and
``verify`` on ``s3://`` URLs, with results equal to the same work on local disk; and the requests
a search issues, counted on the botocore event system of the s3fs clients: no LIST, only the
chunks of the probed lists, each fetched by one GET.
"""

from __future__ import annotations

import collections
import io
import json
import subprocess

import numpy as np
import pytest
import yaml

import distann
from distann.cli import main
from distann.errors import IndexFormatError
from tests.ann_helpers import cli, dataset

N, D, NQ, SPEC, BUCKET = 5000, 16, 40, "IVF32,Flat", "distann-test-s3"


@pytest.fixture(scope="module")
def s3(s3_server):
    """(bucket, storage options, s3fs filesystem) of one bucket for this module."""
    import boto3
    import s3fs

    kw = s3_server["client_kwargs"]
    boto3.client("s3", endpoint_url=kw["endpoint_url"], region_name=kw["region_name"],
                 aws_access_key_id=s3_server["key"],
                 aws_secret_access_key=s3_server["secret"]).create_bucket(Bucket=BUCKET)
    return BUCKET, s3_server, s3fs.S3FileSystem(**s3_server)


def _put_npy(fs, path: str, x: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, x)
    fs.pipe_file(path, buf.getvalue())
    return f"s3://{path}"


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    """The vectors and queries on S3 and on local disk."""
    bucket, _, fs = s3
    root = tmp_path_factory.mktemp("s3")
    xb, xq = dataset(N, D, NQ)
    np.save(root / "base.npy", xb)
    np.save(root / "queries.npy", xq)
    return {"xb": xb, "xq": xq, "root": root, "local_base": str(root / "base.npy"),
            "s3_base": _put_npy(fs, f"{bucket}/base.npy", xb), "s3_queries": _put_npy(fs, f"{bucket}/queries.npy", xq)}


@pytest.fixture(scope="module")
def built(s3, data, client):
    """The same build (same data, same seed) on S3 and on local disk."""
    bucket, opts, _ = s3
    remote = distann.build(data["s3_base"], f"s3://{bucket}/idx.zarr", SPEC, storage_options=opts, client=client)
    local = distann.build(data["local_base"], str(data["root"] / "idx.zarr"), SPEC, client=client)
    return remote, local


def test_build_on_s3_equals_the_build_on_local_disk(built, data, s3):
    remote, local = built
    assert remote.url.startswith("s3://") and remote.ntotal == N
    np.testing.assert_array_equal(remote.centroids, local.centroids)
    np.testing.assert_array_equal(remote.list_sizes, local.list_sizes)
    # reopened from S3, streamed (no cache: every search reads its lists from the object store)
    index = distann.open_index(remote.url, storage_options=s3[1], cache_bytes=0)
    D, I = index.search(data["xq"], k=10, nprobe=4)
    D_ref, I_ref = local.search(data["xq"], k=10, nprobe=4)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)
    assert index.lists.resident is None and index.lists.stats.reads > 0


def test_distributed_search_on_s3(built, data, s3, client):
    remote, local = built
    with distann.open_index(remote.url, storage_options=s3[1], client=client) as index:
        D, I = index.search(data["xq"], k=10, nprobe=4)
    D_ref, I_ref = local.search(data["xq"], k=10, nprobe=4)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)


def test_big_batch_search_on_s3(built, data, s3, client):
    remote, local = built
    bucket, opts, _ = s3
    out = f"s3://{bucket}/bigbatch.zarr"
    distann.big_batch_search(remote.url, data["s3_queries"], k=10, nprobe=4, out=out, client=client,
                             storage_options=opts)
    D, I = distann.open_result(out, storage_options=opts).knn()
    D_ref, I_ref = local.search(data["xq"], k=10, nprobe=4)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)


def test_dedup_on_s3(s3, data, client):
    """Planted duplicates (exact copies) of a source on S3: the groups written to S3 are exactly them."""
    import pyarrow.parquet as pq

    bucket, opts, fs = s3
    xb = data["xb"][:2000]
    x = np.concatenate([xb, xb[:50]])  # row 2000 + i duplicates row i
    src = _put_npy(fs, f"{bucket}/dup.npy", x)
    summary = distann.dedup(src, 1e-6, "l2", out=f"s3://{bucket}/dedup.parquet", storage_options=opts, client=client)
    assert summary["duplicate_groups"] == 50 and summary["duplicates_removed"] == 50
    table = pq.read_table(f"{bucket}/dedup.parquet", filesystem=fs)
    ids, groups = table["id"].to_numpy(), table["group_id"].to_numpy()
    np.testing.assert_array_equal(groups[np.argsort(ids)], np.concatenate([np.arange(2000), np.arange(50)]))
    assert json.loads(fs.cat_file(f"{bucket}/dedup.parquet/_summary.json"))["groups"] == 2000


def test_verify_on_s3_and_a_truncated_chunk(built, s3):
    remote, _ = built
    bucket, opts, fs = s3
    report = distann.open_index(remote.url, storage_options=opts).verify()
    assert report["shards"] == len(remote.manifest.shards) and report["bytes"] > N * D * 4
    # a damaged copy: one codes chunk truncated
    fs.copy(f"{bucket}/idx.zarr", f"{bucket}/damaged.zarr", recursive=True)
    shard = remote.manifest.shards[0]
    key = f"{bucket}/damaged.zarr/{shard.path}/codes/c/0/0"
    fs.pipe_file(key, fs.cat_file(key)[:-100])
    damaged = distann.open_index(f"s3://{bucket}/damaged.zarr", storage_options=opts, cache_bytes=0)
    with pytest.raises(IndexFormatError, match=r"codes: chunk c/0/0 has \d+ bytes, expected"):
        damaged.verify()
    with pytest.raises(IndexFormatError, match=r"codes: chunk c/0/0 has \d+ bytes, expected"):
        damaged.search(np.zeros((1, D), np.float32), k=5, nprobe=32)


def test_search_through_fsspec_simplecache_in_front_of_s3(built, data, s3, tmp_path):
    """``simplecache::s3://...`` (allowed by distann.store.chains): the chunk files are fetched from S3
    once, then read from the local cache; results equal the local index."""
    import dask.config

    remote, local = built
    requests = Requests()
    opts = {"s3": {**s3[1], "session": requests.session}, "simplecache": {"cache_storage": str(tmp_path / "cache")}}
    with dask.config.set({"distann.store.chains": ["simplecache"]}):
        index = distann.open_index(f"simplecache::{remote.url}", storage_options=opts, cache_bytes=0)
        I1 = index.search(data["xq"], k=10, nprobe=4)[1]
        first = requests.take()
        I2 = index.search(data["xq"], k=10, nprobe=4)[1]
        assert requests.take() == [] and first  # the second search reads the local copies only
    np.testing.assert_array_equal(I1, local.search(data["xq"], k=10, nprobe=4)[1])
    np.testing.assert_array_equal(I2, I1)
    assert not any(op.startswith("List") for op, _, _ in first)


# --------------------------------------------------------------------------- requests on the search path

class Requests:
    """The S3 operations s3fs sends, as (operation, key, Range), recorded on a botocore event of
    every client made from one aiobotocore session (passed in the storage options)."""

    def __init__(self):
        from aiobotocore.session import AioSession

        self.calls: list[tuple[str, str | None, str | None]] = []
        self.session = AioSession()
        self.session.register("before-parameter-build.s3", self._record)

    def _record(self, model, params, **kwargs) -> None:
        self.calls.append((model.name, params.get("Key"), params.get("Range")))

    def take(self) -> list[tuple[str, str | None, str | None]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture(scope="module")
def counted(s3, client, tmp_path_factory):
    """A 40,000 x 32 index of 4 shards, most with 2 codes chunks, copied to S3 and opened with
    request counting: (S3 index, the local original, requests)."""
    bucket, opts, fs = s3
    root = tmp_path_factory.mktemp("counted")
    xb, _ = dataset(40_000, 32, seed=7)
    local = distann.build(xb, str(root / "idx.zarr"), "IVF64,Flat", client=client, shard_bytes=1_500_000)
    fs.put(str(root / "idx.zarr"), f"{bucket}/counted.zarr", recursive=True)
    requests = Requests()
    index = distann.open_index(f"s3://{bucket}/counted.zarr", storage_options={**opts, "session": requests.session},
                               cache_bytes=0)
    return index, local, requests, xb


def _chunk_keys(local, lists: np.ndarray, prefix: str) -> set[str]:
    """The keys of the codes and ids chunks holding the rows of ``lists``, from the layout of the
    local original (manifest shards, offsets, chunk shapes)."""
    keys = set()
    for s, entry in enumerate(local.manifest.shards):
        mine = lists[(lists >= entry.list_start) & (lists < entry.list_stop)] - entry.list_start
        shard = local.lists.shard(s)
        for lst in mine:
            r0, r1 = int(shard.offsets[lst]), int(shard.offsets[lst + 1])
            if r1 == r0:
                continue
            for name, arr, suffix in (("codes", shard.codes, "/0"), ("ids", shard.ids, "")):
                for c in range(r0 // arr.chunks[0], (r1 - 1) // arr.chunks[0] + 1):
                    keys.add(f"{prefix}/{entry.path}/{name}/c/{c}{suffix}")
    return keys


def test_open_reads_the_manifest_and_quantizer_without_listing(counted, s3):
    _, _, requests, _ = counted
    bucket, opts, _ = s3
    requests.take()
    distann.open_index(f"s3://{bucket}/counted.zarr", storage_options={**opts, "session": requests.session})
    calls = requests.take()
    assert {op for op, _, _ in calls} == {"GetObject"}, calls  # no LIST, no HEAD
    assert [k for _, k, _ in calls][0] == "counted.zarr/manifest.json" and len(calls) == 5


@pytest.mark.parametrize("nq, nprobe", [(1, 4), (3, 5), (40, 8)])  # slices, runs sharing a chunk, a gather
def test_search_gets_only_the_chunks_of_probed_lists_once_each(counted, nq, nprobe):
    """(a) no LIST (nor HEAD) request; (b) the codes and ids chunks GET are exactly those holding
    the probed lists; (c) each chunk is one whole-object GET (a chunk is its own object: no
    ranged GETs), none fetched twice in a search."""
    index, local, requests, xb = counted
    assert local.manifest.nlist == 64 and len(local.manifest.shards) == 4
    assert sum(local.lists.shard(s).codes.shape[0] > local.lists.shard(s).codes.chunks[0] for s in range(4)) >= 2
    xq = xb[np.random.default_rng(nq).choice(len(xb), nq, replace=False)] + 0.01
    # the probed lists, by exact coarse quantization (the index's quantizer is exact)
    dist = ((xq[:, None, :].astype(np.float64) - local.centroids[None].astype(np.float64)) ** 2).sum(-1)
    probed = np.unique(np.argsort(dist, axis=1, kind="stable")[:, :nprobe])
    expected = _chunk_keys(local, probed, "counted.zarr")
    shards = {f"counted.zarr/{e.path}/" for e in local.manifest.shards
              if ((probed >= e.list_start) & (probed < e.list_stop) & (local.list_sizes[probed] > 0)).any()}
    for attempt in range(2):  # the first search of a shard also reads its arrays' metadata
        requests.take()
        I = index.search(xq, k=10, nprobe=nprobe)[1]
        calls = requests.take()
        ops = collections.Counter(op for op, _, _ in calls)
        assert set(ops) == {"GetObject"}, ops
        assert all(rng is None for _, _, rng in calls), calls
        keys = collections.Counter(k for _, k, _ in calls)
        assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
        data = {k for k in keys if "/codes/c/" in k or "/ids/c/" in k}
        assert data == expected
        meta = set(keys) - data
        assert all(k.startswith(tuple(shards)) for k in meta), meta  # only of the probed shards
        assert all(k.endswith("zarr.json") or "/offsets/c/" in k for k in meta), meta
        if attempt:
            assert not meta  # metadata and offsets are read once per opened shard
        np.testing.assert_array_equal(I, local.search(xq, k=10, nprobe=nprobe)[1])


def test_smaller_chunks_read_less_per_query(counted, s3, client, tmp_path):
    """The same data built with ``chunk_bytes`` = 64 KiB (instead of 1 MiB): a search GETs exactly
    the chunks holding its probed lists, now smaller objects, so it fetches under half the bytes,
    and answers the same."""
    _, local, _, xb = counted
    bucket, opts, fs = s3
    small = distann.build(xb, str(tmp_path / "small.zarr"), "IVF64,Flat", client=client, shard_bytes=1_500_000,
                          chunk_bytes=65536)
    assert small.manifest.build["chunk_bytes"] == 65536 and local.manifest.build["chunk_bytes"] == 2**20
    # 64 KiB of 128-byte rows: at most 512 rows per chunk (equal chunks: a few rows fewer)
    assert all(400 < small.lists.shard(s).codes.chunks[0] <= 512 for s in range(len(small.manifest.shards)))
    fs.put(str(tmp_path / "small.zarr"), f"{bucket}/small.zarr", recursive=True)
    fetched = {}
    xq = xb[np.random.default_rng(11).choice(len(xb), 3, replace=False)] + 0.01
    for name, ref in (("counted", local), ("small", small)):
        requests = Requests()
        index = distann.open_index(f"s3://{bucket}/{name}.zarr",
                                   storage_options={**opts, "session": requests.session}, cache_bytes=0)
        index.search(xq, k=10, nprobe=4)  # opens the probed shards (metadata, offsets)
        requests.take()
        I = index.search(xq, k=10, nprobe=4)[1]
        keys = [k for _, k, _ in requests.take()]
        np.testing.assert_array_equal(I, local.search(xq, k=10, nprobe=4)[1])
        dist = ((xq[:, None, :].astype(np.float64) - ref.centroids[None].astype(np.float64)) ** 2).sum(-1)
        probed = np.unique(np.argsort(dist, axis=1, kind="stable")[:, :4])
        assert set(keys) == _chunk_keys(ref, probed, f"{name}.zarr")
        fetched[name] = sum(fs.size(f"{bucket}/{k}") for k in keys)
    assert fetched["small"] < fetched["counted"] / 2, fetched


# --------------------------------------------------------------------------- command line and job files

def _cli_ok(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args, quiet=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_build_search_verify_on_s3(s3, data, built, client):
    bucket, opts, fs = s3
    so = json.dumps(opts)
    url = f"s3://{bucket}/cli.zarr"
    _cli_ok("build", data["s3_base"], url, "--spec", SPEC, "--scheduler", client.scheduler.address,
            "--storage-options", so)
    _cli_ok("search", url, data["s3_queries"], "--k", "10", "--nprobe", "4", "--out", f"s3://{bucket}/res.npz",
            "--storage-options", so)
    res = np.load(io.BytesIO(fs.cat_file(f"{bucket}/res.npz")))
    I_ref = built[1].search(data["xq"], k=10, nprobe=4)[1]
    np.testing.assert_array_equal(res["I"], I_ref)
    out = _cli_ok("verify", url, "--storage-options", so).stdout
    assert out.startswith(f"verified {url}: ") and "match the manifest's checksums" in out
    info = json.loads(_cli_ok("info", url, "--storage-options", so).stdout)
    assert info["ntotal"] == N and info["spec"] == SPEC


@pytest.mark.parametrize("value, why", [("{not json", "must be a JSON object of fsspec options"),
                                        ("[1, 2]", "must be a JSON object of fsspec options, got list")])
@pytest.mark.parametrize("command", [["verify", "s3://b/i.zarr"], ["build", "s.npy", "s3://b/i.zarr"],
                                     ["search", "s3://b/i.zarr", "q.npy", "--out", "o.npz"]])
def test_cli_refuses_storage_options_that_are_not_a_json_object(command, value, why, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--storage-options", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --storage-options:" in err and why in err


def test_search_job_file_with_storage_options(s3, data, built, tmp_path):
    """A search job (YAML) whose storage_options reach the index, the queries and the output on S3."""
    bucket, opts, fs = s3
    job = {"index": built[0].url, "queries": data["s3_queries"], "out": f"s3://{bucket}/job.npz", "k": 5,
           "nprobe": 3, "storage_options": opts}
    path = tmp_path / "search-s3.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["--no-progress", "search", "--config", str(path)]) == 0
    res = np.load(io.BytesIO(fs.cat_file(f"{bucket}/job.npz")))
    np.testing.assert_array_equal(res["I"], built[1].search(data["xq"], k=5, nprobe=3)[1])


def test_cli_serve_an_index_on_s3_with_storage_options(s3, data, built):
    """``distann serve s3://... --storage-options JSON``: the service and its worker open the
    index on S3 with the options, answer as local search, and report the index's generation."""
    import os
    import sys
    import time

    from distann.serve.client import SearchClient, ServiceUnreachableError
    from tests.conftest import free_port

    bucket, opts, _ = s3
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distann.cli", "serve", built[0].url, "--workers", "1",
                             "--port", str(port), "--batch-wait-ms", "1", "--storage-options", json.dumps(opts)],
                            env={**os.environ, "DISTANN_TOKEN": "s3-token"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with SearchClient(f"http://127.0.0.1:{port}", token="s3-token") as c:
            deadline = time.time() + 90
            while True:
                try:
                    health = c.health()
                    break
                except ServiceUnreachableError:
                    assert proc.poll() is None and time.time() < deadline, \
                        proc.stdout.read() if proc.poll() is not None else "no answer within 90 s"
                    time.sleep(0.2)
            assert c.info()["url"] == built[0].url, health
            D, I = c.search(data["xq"], k=10, nprobe=4)
        want = built[1].search(data["xq"], k=10, nprobe=4)
        np.testing.assert_array_equal(I, want[1])
        np.testing.assert_allclose(D, want[0], rtol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
