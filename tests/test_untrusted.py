"""Untrusted input: index / source / output URLs and manifests that name paths outside what they
should reach are refused before any I/O there (issue 12, part 3).

What a call touched is observed with a Python audit hook (``sys.addaudithook``): every
``open``, ``os.listdir`` and ``os.scandir`` of this process while a block runs is recorded, so
"nothing outside the index root was opened" is a fact about real file system calls, not about
mocks. Builds and big-batch jobs get the session's 2-worker cluster; the ones refused must fail
before any task (their target is checked not to exist afterwards).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager

import dask.config
import numpy as np
import pytest

import distann
from distann.errors import IndexFormatError, ValidationError
from distann.sources import open_source
from distann.store.location import Location
from distann.validation import check_url

# --------------------------------------------------------------------------- observing real file access

_RECORD: list[list[str]] = []


def _hook(event: str, args: tuple) -> None:
    if _RECORD and event in ("open", "os.listdir", "os.scandir") and args:
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            _RECORD[-1].append(os.path.abspath(os.fsdecode(path)))


sys.addaudithook(_hook)  # process-wide and permanent; it records only inside ``touched()``


@contextmanager
def touched():
    """Collect the absolute paths this process opens or lists while the block runs."""
    seen: list[str] = []
    _RECORD.append(seen)
    try:
        yield seen
    finally:
        _RECORD.pop()


def under(paths: list[str], root) -> list[str]:
    root = os.path.abspath(root)
    return [p for p in paths if p == root or p.startswith(root + os.sep)]


# --------------------------------------------------------------------------- a small committed index

@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(7).standard_normal((400, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def built(client, data, tmp_path_factory):
    url = str(tmp_path_factory.mktemp("untrusted") / "index")
    distann.build(data, url, spec="IVF4,Flat", client=client, niter=3)
    return url


@pytest.fixture
def target(built, tmp_path):
    """A fresh copy of the committed index: tmp_path/target."""
    dst = tmp_path / "target"
    shutil.copytree(built, dst)
    return dst


# --------------------------------------------------------------------------- URLs

def test_dotdot_index_url_refused_before_opening_the_index(target, tmp_path):
    url = f"{tmp_path}/elsewhere/../target"  # resolves to a real, valid index
    with touched() as seen, pytest.raises(ValidationError) as err:
        distann.open_index(url)
    assert err.value.param == "url" and "'..'" in err.value.allowed
    assert under(seen, target) == [], "the index behind the '..' URL was read"
    distann.open_index(str(target))  # the same index by its plain path opens


def test_dotdot_build_url_creates_nothing(client, data, tmp_path):
    outside = tmp_path / "outside"
    with touched() as seen, pytest.raises(ValidationError) as err:
        distann.build(data, f"{tmp_path}/inside/../outside", spec="IVF4,Flat", client=client, niter=2)
    assert err.value.param == "index_url"
    assert not outside.exists() and not (tmp_path / "inside").exists()
    assert under(seen, tmp_path) == []


def test_dotdot_source_and_output_urls(client, data, built, tmp_path):
    np.save(tmp_path / "x.npy", data)
    with pytest.raises(ValidationError) as err:
        open_source(f"{tmp_path}/sub/../x.npy")
    assert err.value.param == "source"
    with pytest.raises(ValidationError) as err:
        distann.kmeans(f"{tmp_path}/sub/../x.npy", 4, client=client)
    assert err.value.param == "source"
    with pytest.raises(ValidationError) as err:
        distann.build(f"{tmp_path}/sub/../x.npy", str(tmp_path / "idx"), spec="IVF4,Flat", client=client)
    assert err.value.param == "source" and not (tmp_path / "idx").exists()
    with pytest.raises(ValidationError) as err:
        distann.big_batch_search(built, data[:20], 3, 2, out=f"{tmp_path}/a/../res.zarr", client=client)
    assert err.value.param == "out" and not (tmp_path / "res.zarr").exists() and not (tmp_path / "a").exists()
    with pytest.raises(ValidationError) as err:  # percent-encoded '..' (an HTTP server would decode it)
        Location("s3://bucket/a/%2E%2E/b", param="index_url")
    assert err.value.param == "index_url"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/index",          # outside the default allowlist: never fetched
    "https://example.invalid/index",
    "ftp://127.0.0.1:9/index",
    "data:application/octet-stream;base64,AAAA",
    "reference::file:///tmp/index",      # a chain through a filesystem that can redirect anywhere
    "zip://manifest.json::file:///tmp/index.zip",
    "simplecache::file:///tmp/index",    # caching chains are off by default
    "/tmp/index\x00/x",
])
def test_urls_outside_the_allowlist_refused(url):
    with touched() as seen, pytest.raises(ValidationError) as err:
        distann.open_index(url)
    assert err.value.param == "url"
    assert under(seen, "/tmp/index") == [] and under(seen, "/tmp/index.zip") == []


def test_redirecting_storage_options_refused(target):
    for options in ({"protocol": "http"}, {"target_protocol": "http"}, {"file": {"fo": "x"}}):
        with touched() as seen, pytest.raises(ValidationError) as err:
            distann.open_index(str(target), storage_options=options)
        assert err.value.param == "storage_options"
        assert under(seen, target) == []


def test_protocol_allowlist_setting(target):
    with dask.config.set({"distann.store.protocols": ["s3"]}):
        with pytest.raises(ValidationError) as err:
            distann.open_index(str(target))
        assert err.value.param == "url" and "distann.store.protocols" in err.value.allowed
    with dask.config.set({"distann.store.protocols": "file, memory"}):  # the environment's form
        assert distann.open_index(str(target)).ntotal == 400
    with dask.config.set({"distann.store.protocols": ["no such/proto"]}), pytest.raises(ValidationError) as err:
        distann.open_index(str(target))
    assert err.value.param == "distann.store.protocols"


def test_caching_chains_when_enabled(target, data, tmp_path):
    url = f"simplecache::file://{target}"
    options = {"simplecache": {"cache_storage": str(tmp_path / "cache")}}
    with pytest.raises(ValidationError):
        distann.open_index(url, storage_options=options)
    expected = distann.open_index(str(target)).search(data[:10], 5, 4)
    with dask.config.set({"distann.store.chains": ["simplecache"]}):
        got = distann.open_index(url, storage_options=options).search(data[:10], 5, 4)
        np.testing.assert_array_equal(got[1], expected[1])
        assert os.listdir(tmp_path / "cache"), "the cache was not used"
        with pytest.raises(ValidationError) as err:  # another cache than the one allowed
            distann.open_index(f"blockcache::file://{target}")
        assert err.value.param == "url"
    for unsafe in ("reference", "blockcache", "filecache"):  # the last two fail under concurrent reads
        with dask.config.set({"distann.store.chains": [unsafe]}), pytest.raises(ValidationError) as err:
            distann.open_index(url)
        assert err.value.param == "distann.store.chains"


def test_allowed_urls_pass():
    for url in ("/data/index", "relative/index", "file:///data/index", "s3://bucket/a/b", "gs://b/x",
                "memory://x", "~/index", "s3://bucket/a..b/c"):
        assert check_url("url", url) == url


# --------------------------------------------------------------------------- manifests

def edit_manifest(root, change) -> None:
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    change(m)
    with open(path, "w") as f:
        json.dump(m, f)


def _set(path, value):
    def change(m):
        obj = m
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return change


@pytest.mark.parametrize("where, change", [
    ("centroids", _set(["centroids"], "../other_index/g000001/quantizer/centroids")),
    ("shards[0].path", _set(["shards", 0, "path"], "{other}/g000001/shards/s000000")),
    ("list_sizes", _set(["list_sizes"], "s3://bucket/other_index/g000001/quantizer/list_sizes")),
    ("codec.arrays", _set(["codec", "arrays"], {"quantizer/codebooks": "simplecache::file:///etc/x"})),
    ("quantizer.arrays", _set(["quantizer"], {"kind": "ivf", "nlist1": 2, "nprobe": 1,
                                              "arrays": {"top": "g000001/../../other_index/top"}})),
    ("checksums key", lambda m: m["checksums"].update({"/etc/passwd": "crc32:00000000"})),
    ("shards[0].path", _set(["shards", 0, "path"], "g000001/shards/./s000000")),
])
def test_manifest_naming_outside_paths_refused(target, tmp_path, where, change):
    other = tmp_path / "other_index"
    shutil.copytree(target, other)  # a real index there: a reader that followed the path would succeed
    other_str = str(other)

    def fill(m):
        change(m)
        text = json.dumps(m).replace("{other}", other_str)
        m.clear()
        m.update(json.loads(text))

    edit_manifest(target, fill)
    with touched() as seen, pytest.raises(IndexFormatError) as err:
        distann.open_index(str(target))
    assert "outside the index root" in str(err.value) and where in str(err.value)
    assert under(seen, other) == [], "a file outside the index root was opened"
    assert set(under(seen, target)) == {str(target / "manifest.json")}, "an array was read before the refusal"
    with pytest.raises(IndexFormatError):  # distann verify goes through the same check
        distann.open_index(str(target)).verify()


@pytest.mark.parametrize("change", [
    _set(["generation"], "1"), _set(["d"], "8"), _set(["nlist"], 4.0), _set(["ntotal"], True),
    _set(["shards", 0, "list_start"], None), _set(["shards"], {"a": 1}), _set(["shards"], [1, 2]),
    _set(["checksums"], []), _set(["codec"], "Flat"), _set(["generation"], -1),
])
def test_manifest_with_wrong_types_is_a_format_error(target, change):
    edit_manifest(target, change)
    with pytest.raises(IndexFormatError):
        distann.open_index(str(target))
