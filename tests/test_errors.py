"""Bad input: a clear error naming the parameter, before any task runs, and nothing damaged."""

from __future__ import annotations

import json

import numpy as np
import pytest

import distann
from distann.errors import IndexExistsError, IndexFormatError, ValidationError
from distann.store.manifest import FORMAT_VERSION
from tests.ann_helpers import dataset

N, D = 3000, 16


@pytest.fixture(scope="module")
def committed(client, tmp_path_factory):
    """A committed index whose URL every failing build below targets (with overwrite)."""
    root = tmp_path_factory.mktemp("errors")
    xb, xq = dataset(N, D, 20)
    np.save(root / "base.npy", xb)
    index = distann.build(str(root / "base.npy"), str(root / "idx.zarr"), spec="IVF8,Flat", client=client,
                          niter=5, chunk_rows=1000)
    return root, index, xq, index.search(xq, k=5, nprobe=2)


def _unchanged(committed):
    root, _, xq, (D0, I0) = committed
    D1, I1 = distann.open_index(str(root / "idx.zarr")).search(xq, k=5, nprobe=2)
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)


def _build(committed, source, **kw):
    root, _, _, _ = committed
    kw.setdefault("spec", "IVF8,Flat")
    kw.setdefault("niter", 2)
    return distann.build(source, str(root / "idx.zarr"), overwrite=True, chunk_rows=1000, **kw)


def test_nan_and_inf_reported_with_count_and_first_row(client, committed):
    xb, _ = dataset(N, D)
    xb[1234, 3] = np.nan
    xb[2000, 0] = np.inf
    xb[2000, 1] = -np.inf
    with pytest.raises(ValidationError, match=r"source: received '3 NaN/Inf value\(s\), first in row 1234'"):
        _build(committed, xb, client=client)
    _unchanged(committed)


def test_nan_outside_the_training_sample_is_caught_by_the_add_pass(client, committed, tmp_path):
    """The build reads only the sample's rows before training; a NaN in a row outside the sample
    is found by the add pass, which stops the build before any merge or commit. Fixing the row
    and rerunning at the failed build's URL then completes."""
    from distann.train.sampling import chunk_sample_rows, plan_sample

    root = committed[0]
    xb, _ = dataset(N, D)
    # IVF8 with 39 points per centroid samples 312 of the 3000 rows: pick a row it leaves out
    counts = plan_sample(np.array([1000, 1000, 1000]), 8 * 39, 1234)
    sampled = np.concatenate([1000 * i + chunk_sample_rows(1000, int(c), 1234, i) for i, c in enumerate(counts)])
    row = int(np.setdiff1d(np.arange(1500, N), sampled)[0])
    xb[row, 5] = np.nan
    with pytest.raises(ValidationError, match=rf"source: received '1 NaN/Inf value\(s\), first in row {row}'"):
        _build(committed, xb, client=client, max_points_per_centroid=39)
    _unchanged(committed)
    url = str(tmp_path / "fresh.zarr")
    with pytest.raises(ValidationError, match=rf"first in row {row}"):
        distann.build(xb, url, spec="IVF8,Flat", niter=2, chunk_rows=1000, client=client, max_points_per_centroid=39)
    assert not (tmp_path / "fresh.zarr" / "manifest.json").exists()
    xb[row, 5] = 0.0
    index = distann.build(xb, url, spec="IVF8,Flat", niter=2, chunk_rows=1000, client=client,
                          max_points_per_centroid=39)
    assert index.ntotal == N


def test_nan_in_the_training_sample_counts_every_bad_value(client, committed):
    root = committed[0]
    xb, _ = dataset(N, D)
    xb[:, 7] = np.inf  # every row: the sample holds some, the message counts all 3000
    with pytest.raises(ValidationError, match=r"source: received '3000 NaN/Inf value\(s\), first in row 0'"):
        _build(committed, xb, client=client, max_points_per_centroid=39)
    _unchanged(committed)


@pytest.mark.parametrize("source, match", [
    (np.zeros(10, np.float32), r"source.*shape \(10,\)"),
    (np.zeros((10, 4), dtype=bool), r"source.*bool"),
    (np.array([["a", "b"]]), r"source.*<U1"),
])
def test_bad_source_arrays(committed, source, match):
    with pytest.raises(ValidationError, match=match):
        _build(committed, source)
    _unchanged(committed)


@pytest.mark.parametrize("kw, match", [
    ({"spec": "IVF8,SQ4"}, r"spec: received 'IVF8,SQ4'; unsupported quantizer 'SQ4'"),
    ({"spec": "HNSW32"}, r"spec: received 'HNSW32'"),
    ({"spec": "IVF0,Flat"}, r"spec: received 'IVF0,Flat'"),
    ({"spec": f"IVF{N + 1},Flat"}, r"spec.*nlist \(3001\) must be at most the number of training vectors \(3000\)"),
    ({"metric": "hamming"}, r"metric: received 'hamming'; one of \['l2', 'ip', 'cosine'\]"),
    ({"niter": 0}, r"niter: received 0"),
    ({"init": "kmeans"}, r"init: received 'kmeans'"),
])
def test_bad_build_parameters(committed, kw, match):
    xb, _ = dataset(N, D)
    with pytest.raises(ValidationError, match=match):
        _build(committed, xb, **kw)
    _unchanged(committed)


def test_bad_ids(client, committed):
    xb, _ = dataset(N, D)
    with pytest.raises(ValidationError, match=r"ids: received '10 ids'; exactly one id per vector \(3000\)"):
        _build(committed, xb, ids=np.arange(10))
    neg = np.arange(N, dtype=np.int64)
    neg[77] = -5
    with pytest.raises(ValidationError, match=r"ids: received '1 negative id\(s\), first at row 77'"):
        _build(committed, xb, ids=neg, client=client)
    dup = np.arange(N, dtype=np.int64)
    dup[2500] = 10  # same id in two different chunks
    with pytest.raises(ValidationError, match=r"ids: received '1 duplicate id\(s\), e.g. 10'"):
        _build(committed, xb, ids=dup, client=client)
    with pytest.raises(ValidationError, match=r"ids.*float64"):
        _build(committed, xb, ids=np.arange(N, dtype=np.float64))
    _unchanged(committed)


def test_existing_index_refused_without_overwrite(committed):
    root, _, _, _ = committed
    xb, _ = dataset(N, D)
    with pytest.raises(IndexExistsError, match="already committed.*overwrite"):
        distann.build(xb, str(root / "idx.zarr"), spec="IVF8,Flat")
    _unchanged(committed)


@pytest.mark.parametrize("call, match", [
    (lambda ix, q: ix.search(q, k=0), r"k: received 0; a positive integer"),
    (lambda ix, q: ix.search(q, k=-3), r"k: received -3"),
    (lambda ix, q: ix.search(q, nprobe=0), r"nprobe: received 0; an integer in \[1, nlist=8\]"),
    (lambda ix, q: ix.search(q, nprobe=9), r"nprobe: received 9; an integer in \[1, nlist=8\]"),
    (lambda ix, q: ix.search(q[:, :5]), r"xq: received 'array of shape \(20, 5\)'"),
    (lambda ix, q: ix.search(q[0]), r"xq: received 'array of shape \(16,\)'"),
    (lambda ix, q: ix.search(q.astype(np.int32)), r"xq: received 'array of dtype int32'"),
    (lambda ix, q: ix.search(np.where(np.arange(16) == 2, np.nan, q).astype(np.float32)),
     r"xq: received .*NaN/Inf.*first in query row 0"),
    (lambda ix, q: ix.search(q, max_codes=0), r"max_codes: received 0"),
    (lambda ix, q: ix.search(q, max_codes=2**63), r"max_codes: received 9223372036854775808; .*below 2\*\*63"),
    (lambda ix, q: ix.search(q, ids_allowed=[1, 2]), r"ids_allowed: received 'list'"),
    (lambda ix, q: ix.search(q, ids_allowed=np.array([0.5])), r"ids_allowed: received .*float64"),
    (lambda ix, q: ix.range_search(q, -1.0), r"radius: received -1.0"),
    (lambda ix, q: ix.search(q, backend="tpu"), r"backend: received 'tpu'"),
])
def test_bad_search_parameters(committed, call, match):
    _, index, xq, _ = committed
    with pytest.raises(ValidationError, match=match):
        call(index, xq)


def test_unreadable_indexes(committed, tmp_path):
    root, _, _, _ = committed
    with pytest.raises(IndexFormatError, match="no committed index"):
        distann.open_index(str(tmp_path / "nothing-here"))
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        distann.open_index(str(bad))
    manifest = json.loads((root / "idx.zarr" / "manifest.json").read_text())
    newer = dict(manifest, format_version=FORMAT_VERSION + 1)
    (bad / "manifest.json").write_text(json.dumps(newer))
    with pytest.raises(IndexFormatError, match=f"version {FORMAT_VERSION + 1} is newer"):
        distann.open_index(str(bad))
    broken = dict(manifest, ntotal=manifest["ntotal"] + 1)
    (bad / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(IndexFormatError, match="corrupt manifest"):
        distann.open_index(str(bad))
    # a manifest naming arrays that are not there (copied without its data)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="array g000001/quantizer/centroids is missing"):
        distann.open_index(str(bad))


def test_corrupt_shard_detected(client, tmp_path):
    xb, xq = dataset(2000, 8, 5)
    index = distann.build(xb, str(tmp_path / "c.zarr"), spec="IVF4,Flat", client=client, niter=3)
    index.verify()
    shard = index.manifest.shards[0]
    chunk = tmp_path / "c.zarr" / shard.path / "codes" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="checksum"):
        distann.open_index(str(tmp_path / "c.zarr")).verify()
