"""Tests of distann.sources: every format round-trips by row range, lazily and picklably."""

from __future__ import annotations

import io
import os
import pickle
import uuid
from contextlib import contextmanager

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from distann.errors import ValidationError
from distann.sources import (
    ArrayIdSource,
    ArraySource,
    IdSource,
    VectorSource,
    as_ids,
    as_source,
    open_ids,
    open_source,
    read_ivecs,
    write_bvecs,
    write_fvecs,
    write_ivecs,
)


# ----------------------------------------------------------------------------- helpers


def _data(n: int = 53, d: int = 6, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def _ranges(n: int) -> list[tuple[int, int]]:
    """Whole, first row, last row, empty ranges and odd ranges inside (for n >= 2)."""
    mid = n // 2
    candidates = [(0, n), (0, 1), (n - 1, n), (min(3, n),) * 2, (0, 0), (n, n), (5, n - 7), (mid - 1, mid + 13)]
    return [(a, b) for a, b in candidates if 0 <= a <= b <= n]


def _check_source(src: VectorSource, x: np.ndarray, chunk_rows: int = 8) -> None:
    """Shape, every odd range, the dask array and a pickled copy all agree with ``x``."""
    n, d = x.shape
    assert src.shape == (n, d) and src.n == n and src.d == d
    want = x.astype(np.float32)
    for a, b in _ranges(n):
        got = src.read_rows(a, b)
        assert got.dtype == np.float32 and got.shape == (b - a, d)
        assert got.flags.c_contiguous and got.flags.writeable
        np.testing.assert_array_equal(got, want[a:b])
    # read_rows_at (the build's training sample): scattered rows, runs, both ends, none, all
    rng = np.random.default_rng(n)
    for rows in (np.sort(rng.choice(n, size=max(1, n // 3), replace=False)), np.array([0, 1, 2, n - 1]),
                 np.array([n - 1]), np.arange(n), np.empty(0, np.int64)):
        rows = np.unique(rows[(rows >= 0) & (rows < n)])
        got = src.read_rows_at(rows)
        assert got.dtype == np.float32 and got.shape == (len(rows), d)
        np.testing.assert_array_equal(got, want[rows])
    arr = src.to_dask(chunk_rows)
    assert arr.dtype == np.float32 and arr.shape == (n, d) and arr.chunks[0][0] == min(chunk_rows, n)
    np.testing.assert_array_equal(arr.compute(scheduler="sync"), want)
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy.read_rows(1, n), want[1:])
    assert copy.fingerprint == src.fingerprint


def _check_ids(ids: IdSource, want: np.ndarray) -> None:
    n = len(want)
    assert ids.n == n
    for a, b in _ranges(n):
        got = ids.read(a, b)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want[a:b])
    np.testing.assert_array_equal(ids.to_dask(7).compute(scheduler="sync"), want)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ids)).read(0, n), want)


@contextmanager
def _raises(param: str, *fragments: str):
    """Expect a ValidationError naming ``param`` and containing every fragment."""
    with pytest.raises(ValidationError) as info:
        yield info
    msg = str(info.value)
    assert msg.startswith(f"{param}:"), msg
    for f in fragments:
        assert str(f) in msg, (f, msg)


def _save_npy(url: str, x: np.ndarray) -> None:
    with fsspec.open(url, "wb") as f:
        np.save(f, x)


def _fsl(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


def _write_parquet(url: str, x: np.ndarray, row_group_size: int = 10, **cols) -> None:
    table = pa.table({"emb": _fsl(x), **cols})
    with fsspec.open(url, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


@pytest.fixture
def mem():
    """A fresh ``memory://`` prefix, removed afterwards."""
    prefix = f"memory://distann-test-{uuid.uuid4().hex}"
    yield prefix
    fs = fsspec.filesystem("memory")
    path = prefix[len("memory://") :]
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path, mem):
    return str(tmp_path) if request.param == "local" else mem


# ----------------------------------------------------------------------------- npy


def test_npy_roundtrip(root):
    x = _data()
    _save_npy(f"{root}/x.npy", x)
    src = open_source(f"{root}/x.npy")
    assert src.dtype == np.float32 and src.url == f"{root}/x.npy"
    _check_source(src, x)


def test_npy_file_url_and_pathlike(tmp_path):
    x = _data(n=12)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(open_source(f"file://{tmp_path}/x.npy").read_rows(0, 12), x)
    np.testing.assert_array_equal(open_source(tmp_path / "x.npy").read_rows(2, 5), x[2:5])


@pytest.mark.parametrize("dtype", ["float64", "float16", "int16", "uint8", ">f4"])
def test_npy_dtypes_become_float32(tmp_path, dtype):
    x = (_data(n=20) * 10).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    src = open_source(str(tmp_path / "x.npy"))
    assert src.dtype == np.dtype(dtype)
    _check_source(src, x)


def test_npy_fortran_order(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(_data(n=10)))
    with _raises("source", "Fortran order", "f.npy"):
        open_source(str(tmp_path / "f.npy"))
    col = np.asfortranarray(_data(n=10, d=1))  # one column: both orders are the same bytes
    np.save(tmp_path / "c.npy", col)
    _check_source(open_source(str(tmp_path / "c.npy")), col)


def test_npy_directory_and_glob(root):
    parts = [_data(n=n, seed=i) for i, n in enumerate([7, 0, 12, 1, 9])]
    for i, p in enumerate(parts):
        _save_npy(f"{root}/ds/part-{i:02d}.npy", p)
    fs, path = fsspec.core.url_to_fs(f"{root}/ds")
    fs.pipe_file(f"{path}/_SUCCESS", b"")
    fs.pipe_file(f"{path}/README.txt", b"not data")
    x = np.concatenate(parts)
    src = open_source(f"{root}/ds")
    assert len(src.files) == 5
    _check_source(src, x, chunk_rows=5)
    np.testing.assert_array_equal(src.read_rows(6, 21), x[6:21])  # crosses three files and an empty one
    glob = open_source(f"{root}/ds/part-0[2-4].npy")
    _check_source(glob, np.concatenate(parts[2:]), chunk_rows=4)


def test_npy_set_inconsistent(tmp_path):
    np.save(tmp_path / "a.npy", _data(n=5, d=4))
    np.save(tmp_path / "b.npy", _data(n=5, d=3))
    with _raises("source", "b.npy", "d=3", "d=4"):
        open_source(str(tmp_path))
    np.save(tmp_path / "b.npy", _data(n=5, d=4, dtype=np.float64))
    with _raises("source", "b.npy", "float64"):
        open_source(str(tmp_path / "*.npy"))


def test_dask_tasks_carry_only_their_files(tmp_path):
    for i in range(6):
        np.save(tmp_path / f"p{i}.npy", _data(n=10, seed=i))
    arr = open_source(str(tmp_path)).to_dask(10)
    tasks = [t for t in dict(arr.__dask_graph__()).values()]
    payload = max(len(pickle.dumps(t)) for t in tasks)
    assert payload < len(pickle.dumps(open_source(str(tmp_path))))


# ----------------------------------------------------------------------------- vecs


def test_fvecs_roundtrip(root):
    x = _data()
    write_fvecs(f"{root}/x.fvecs", x)
    src = open_source(f"{root}/x.fvecs")
    assert src.dtype == np.float32
    _check_source(src, x)


def test_bvecs_and_ivecs(root):
    b = np.random.default_rng(1).integers(0, 256, size=(31, 16), dtype=np.uint8)
    write_bvecs(f"{root}/x.bvecs", b)
    src = open_source(f"{root}/x.bvecs")
    assert src.dtype == np.uint8
    _check_source(src, b)
    gt = np.random.default_rng(2).integers(-5, 10**6, size=(9, 4))
    write_ivecs(f"{root}/gt.ivecs", gt)
    got = read_ivecs(f"{root}/gt.ivecs")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, gt)
    _check_source(open_source(f"{root}/gt.ivecs"), gt)


def test_fvecs_directory(tmp_path):
    parts = [_data(n=n, seed=n) for n in (4, 9, 3)]
    for i, p in enumerate(parts):
        write_fvecs(str(tmp_path / f"{i}.fvecs"), p)
    _check_source(open_source(str(tmp_path)), np.concatenate(parts), chunk_rows=5)


def test_vecs_corrupt(tmp_path):
    x = _data(n=10, d=4)
    write_fvecs(str(tmp_path / "x.fvecs"), x)
    raw = (tmp_path / "x.fvecs").read_bytes()
    (tmp_path / "t.fvecs").write_bytes(raw[:-3])
    with _raises("source", "t.fvecs", "size 197 bytes", "record size 20", "expected 180 or 200"):
        open_source(str(tmp_path / "t.fvecs"))
    (tmp_path / "z.fvecs").write_bytes(np.array([0], "<i4").tobytes() + raw[4:])
    with _raises("source", "dimension 0"):
        open_source(str(tmp_path / "z.fvecs"))
    (tmp_path / "e.fvecs").write_bytes(b"")
    with _raises("source", "e.fvecs", "size 0"):
        open_source(str(tmp_path / "e.fvecs"))
    bad = bytearray(raw)
    bad[5 * 20 : 5 * 20 + 4] = np.array([7], "<i4").tobytes()  # record 5 claims d=7
    (tmp_path / "m.fvecs").write_bytes(bytes(bad))
    src = open_source(str(tmp_path / "m.fvecs"))
    np.testing.assert_array_equal(src.read_rows(0, 5), x[:5])
    with _raises("source", "record 5 has dimension 7"):
        src.read_rows(3, 8)


def test_vecs_writers_validate(tmp_path):
    with _raises("x", "0, 300", "[0, 255]"):
        write_bvecs(str(tmp_path / "b.bvecs"), np.array([[0, 300]]))
    with _raises("x", "(3,)", "2-D"):
        write_fvecs(str(tmp_path / "a.fvecs"), np.zeros(3))
    with _raises("url", "a.npy", ".fvecs"):
        write_fvecs(str(tmp_path / "a.npy"), np.zeros((3, 2)))
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    with _raises("url", "a.npy", ".ivecs"):
        read_ivecs(str(tmp_path / "a.npy"))


# ----------------------------------------------------------------------------- zarr


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_roundtrip(root, zarr_format):
    x = _data(n=47, d=5, dtype=np.float64)
    z = zarr.create_array(f"{root}/x.zarr", shape=x.shape, chunks=(10, 5), dtype=x.dtype, zarr_format=zarr_format)
    z[:] = x
    src = open_source(f"{root}/x.zarr")
    assert src.dtype == np.float64
    _check_source(src, x, chunk_rows=9)
    np.testing.assert_array_equal(src.read_rows(8, 31), x[8:31].astype(np.float32))  # crosses zarr chunks


def test_zarr_group_and_detection(tmp_path):
    x = _data(n=30, d=3)
    g = zarr.open_group(str(tmp_path / "store"), mode="w")  # no .zarr extension: found by zarr.json
    g.create_array("emb/vectors", shape=x.shape, chunks=(7, 3), dtype=x.dtype)[:] = x
    g.create_array("ids", shape=(30,), chunks=(7,), dtype="i4")[:] = np.arange(30) * 3
    _check_source(open_source(str(tmp_path / "store"), column="emb/vectors"), x)
    _check_source(open_source(str(tmp_path / "store" / "emb" / "vectors")), x)
    _check_ids(open_ids(str(tmp_path / "store"), column="ids"), np.arange(30) * 3)
    with _raises("column", "None", "Zarr group", "emb/vectors", "ids"):
        open_source(str(tmp_path / "store"))
    with _raises("column", "'nope'"):
        open_source(str(tmp_path / "store"), column="nope")
    with _raises("source", "shape (30,)", "2-D (n, d)"):
        open_source(str(tmp_path / "store"), column="ids")


def test_zarr_bad_dtype(tmp_path):
    zarr.create_array(str(tmp_path / "b.zarr"), shape=(4, 2), dtype=bool)[:] = True
    with _raises("source", "b.zarr", "dtype bool"):
        open_source(str(tmp_path / "b.zarr"))


# ----------------------------------------------------------------------------- parquet


@pytest.mark.parametrize("value_type", [np.float32, np.float16, np.float64])
def test_parquet_roundtrip(root, value_type):
    x = _data(n=45, d=4, dtype=value_type)
    _write_parquet(f"{root}/x.parquet", x, row_group_size=10, label=pa.array(["a"] * 45))
    src = open_source(f"{root}/x.parquet")
    assert src.dtype == np.dtype(value_type) and src.column == "emb"
    _check_source(src, x, chunk_rows=7)
    np.testing.assert_array_equal(src.read_rows(9, 31), x[9:31].astype(np.float32))  # crosses row groups


def test_parquet_dataset_directory_and_glob(root):
    parts = [_data(n=n, seed=n) for n in (13, 6, 20)]
    for i, p in enumerate(parts):
        _write_parquet(f"{root}/ds/part-{i}.parquet", p, row_group_size=4)
    x = np.concatenate(parts)
    _check_source(open_source(f"{root}/ds"), x, chunk_rows=11)
    _check_source(open_source(f"{root}/ds/part-[12].parquet"), np.concatenate(parts[1:]), chunk_rows=5)


def test_parquet_columns(tmp_path):
    x, y = _data(n=12, d=4), _data(n=12, d=2, seed=9)
    table = pa.table({"a": _fsl(x), "b": _fsl(y), "id": np.arange(12), "id2": np.arange(12, dtype=np.int32)})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=5)
    url = str(tmp_path / "t.parquet")
    with _raises("column", "None", "several (a, b)"):
        open_source(url)
    _check_source(open_source(url, column="b"), y)
    with _raises("column", "'id'", "int64", "fixed_size_list"):
        open_source(url, column="id")
    with _raises("column", "'zz'", "no such column"):
        open_source(url, column="zz")
    with _raises("column", "None", "several (id, id2)"):
        open_ids(url)
    _check_ids(open_ids(url, column="id2"), np.arange(12))
    pq.write_table(pa.table({"v": pa.array([[1.0, 2.0]], type=pa.list_(pa.float32()))}), tmp_path / "l.parquet")
    with _raises("column", "None", "no columns", "v: list<"):
        open_source(str(tmp_path / "l.parquet"))


def test_parquet_nulls(tmp_path):
    arr = pa.array([[1.0, 2.0], None, [3.0, 4.0]], type=pa.list_(pa.float32(), 2))
    pq.write_table(pa.table({"emb": arr}), tmp_path / "n.parquet")
    with _raises("source", "n.parquet", "null"):
        open_source(str(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"emb": arr}), tmp_path / "s.parquet", write_statistics=False)
    src = open_source(str(tmp_path / "s.parquet"))  # no statistics: caught on read
    np.testing.assert_array_equal(src.read_rows(0, 1), [[1.0, 2.0]])
    with _raises("source", "null at row 1"):
        src.read_rows(0, 3)


def test_parquet_ids(root):
    ids = np.random.default_rng(3).choice(10**12, size=37, replace=False).astype(np.int64)
    _write_parquet(f"{root}/x.parquet", _data(n=37), row_group_size=8, doc_id=ids)
    _check_ids(open_ids(f"{root}/x.parquet"), ids)


# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize("shape_dtype", [((29,), np.int32), ((29,), np.uint16), ((29, 1), np.int64)])
def test_npy_ids(root, shape_dtype):
    shape, dtype = shape_dtype
    ids = np.random.default_rng(4).integers(0, 30000, size=shape).astype(dtype)
    _save_npy(f"{root}/ids.npy", ids)
    _check_ids(open_ids(f"{root}/ids.npy"), ids.ravel().astype(np.int64))


def test_ids_invalid(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros(4, np.float32))
    with _raises("ids", "f.npy", "float32", "integer"):
        open_ids(str(tmp_path / "f.npy"))
    np.save(tmp_path / "m.npy", np.zeros((4, 2), np.int64))
    with _raises("ids", "shape (4, 2)", "1-D"):
        open_ids(str(tmp_path / "m.npy"))
    np.save(tmp_path / "u.npy", np.array([1, 2**63 + 5], np.uint64))
    with _raises("ids", str(2**63 + 5), "int64"):
        open_ids(str(tmp_path / "u.npy")).read(0, 2)
    write_fvecs(str(tmp_path / "v.fvecs"), np.zeros((2, 2)))
    with _raises("ids", "v.fvecs"):
        open_ids(str(tmp_path / "v.fvecs"))


# ----------------------------------------------------------------------------- as_source / as_ids


def test_as_source_array_and_passthrough(tmp_path):
    x = _data(n=40, dtype=np.float64)
    src = as_source(x)
    assert isinstance(src, ArraySource) and src.dtype == np.float64
    _check_source(src, x, chunk_rows=9)
    assert as_source(src) is src
    assert as_source(x).fingerprint == src.fingerprint
    y = x.copy()
    y[17, 2] += 1
    assert as_source(y).fingerprint != src.fingerprint
    np.save(tmp_path / "x.npy", x)
    assert as_source(str(tmp_path / "x.npy")).n == 40
    with _raises("source", "list", "2-D numpy array"):
        as_source([[1.0, 2.0]])
    with _raises("source", "shape (4,)", "2-D (n, d)"):
        as_source(np.zeros(4))


def test_as_ids(tmp_path):
    ids = np.arange(100, 130, dtype=np.int32)
    src = as_ids(ids)
    assert isinstance(src, ArrayIdSource)
    _check_ids(src, ids.astype(np.int64))
    assert as_ids(src) is src
    np.save(tmp_path / "i.npy", ids)
    _check_ids(as_ids(tmp_path / "i.npy"), ids)
    with _raises("ids", "float64", "integer"):
        as_ids(np.zeros(3))
    with _raises("ids", "dict"):
        as_ids({})


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_changes_on_rewrite(root):
    url = f"{root}/x.npy"
    _save_npy(url, _data(n=10))
    first = open_source(url).fingerprint
    assert open_source(url).fingerprint == first  # stable across opens
    _save_npy(url, _data(n=11))
    assert open_source(url).fingerprint != first
    write_fvecs(f"{root}/y.fvecs", _data(n=10))
    fp = open_source(f"{root}/y.fvecs").fingerprint
    write_fvecs(f"{root}/y.fvecs", _data(n=12))
    assert open_source(f"{root}/y.fvecs").fingerprint != fp


def test_fingerprint_zarr_rewrite(tmp_path):
    url = str(tmp_path / "z.zarr")
    zarr.create_array(url, shape=(10, 2), dtype="f4")[:] = 1
    fp = open_source(url).fingerprint
    zarr.create_array(url, shape=(12, 2), dtype="f4", overwrite=True)[:] = 1
    assert open_source(url).fingerprint != fp


# ----------------------------------------------------------------------------- bad inputs


def test_not_found_and_unknown_extension(tmp_path, mem):
    for url in (str(tmp_path / "missing.npy"), f"{mem}/missing.fvecs"):
        with _raises("source", url, "no file or directory"):
            open_source(url)
    with _raises("ids", "missing.npy"):
        open_ids(str(tmp_path / "missing.npy"))
    (tmp_path / "x.csv").write_text("1,2\n")
    with _raises("source", "x.csv", "'.csv'", ".npy", ".fvecs", ".parquet", ".zarr"):
        open_source(str(tmp_path / "x.csv"))
    with _raises("source", "no*.npy", "matched no files"):
        open_source(str(tmp_path / "no*.npy"))
    (tmp_path / "empty").mkdir()
    with _raises("source", "empty", "no (visible) files"):
        open_source(str(tmp_path / "empty"))
    with _raises("source", "None", "URL"):
        open_source(None)  # type: ignore[arg-type]
    with _raises("storage_options", "[1]"):
        open_source(str(tmp_path / "x.csv"), storage_options=[1])  # type: ignore[arg-type]


def test_mixed_directory(tmp_path):
    np.save(tmp_path / "a.npy", _data(n=3))
    _write_parquet(str(tmp_path / "b.parquet"), _data(n=3))
    with _raises("source", "several formats", "a.npy", "b.parquet"):
        open_source(str(tmp_path))


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.zeros((3, 2), dtype=bool), "dtype bool"),
        (np.zeros((3, 2), dtype=np.complex64), "dtype complex64"),
        (np.array([["a", "b"]]), "dtype <U1"),
        (np.zeros((3, 2), dtype=[("a", "f4"), ("b", "i4")]), "structured"),
        (np.array([[1, "x"]], dtype=object), "dtype object"),
    ],
)
def test_non_numeric_dtype(tmp_path, array, fragment):
    np.save(tmp_path / "x.npy", array, allow_pickle=True)
    with _raises("source", "x.npy", fragment):
        open_source(str(tmp_path / "x.npy"))


def test_bad_shapes(tmp_path):
    np.save(tmp_path / "one.npy", np.zeros(5, np.float32))
    with _raises("source", "one.npy", "shape (5,)", "need a 2-D (n, d) array"):
        open_source(str(tmp_path / "one.npy"))
    np.save(tmp_path / "three.npy", np.zeros((2, 3, 4), np.float32))
    with _raises("source", "shape (2, 3, 4)"):
        open_source(str(tmp_path / "three.npy"))
    np.save(tmp_path / "rows0.npy", np.zeros((0, 4), np.float32))
    with _raises("source", "rows0.npy", "zero rows"):
        open_source(str(tmp_path / "rows0.npy"))
    np.save(tmp_path / "d0.npy", np.zeros((4, 0), np.float32))
    with _raises("source", "d0.npy", "d > 0"):
        open_source(str(tmp_path / "d0.npy"))


def test_corrupt_npy(tmp_path, mem):
    buf = io.BytesIO()
    np.save(buf, _data(n=10, d=4))
    raw = buf.getvalue()
    (tmp_path / "t.npy").write_bytes(raw[:-10])
    with _raises("source", "t.npy", f"size {len(raw) - 10} bytes", f"expected {len(raw)} bytes"):
        open_source(str(tmp_path / "t.npy"))
    (tmp_path / "h.npy").write_bytes(raw[:40])
    with _raises("source", "h.npy", "size 40 bytes", "header alone is 128 bytes"):
        open_source(str(tmp_path / "h.npy"))
    (tmp_path / "g.npy").write_bytes(b"garbage, not numpy")
    with _raises("source", "g.npy", "not a .npy file"):
        open_source(str(tmp_path / "g.npy"))
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{mem[len('memory://'):]}/t.npy", raw[:-4])
    with _raises("source", f"{mem}/t.npy", "expected"):
        open_source(f"{mem}/t.npy")


def test_bad_ranges_and_arguments(tmp_path):
    src = as_source(_data(n=10))
    for a, b in [(-1, 3), (4, 3), (0, 11), (1.0, 3)]:
        with _raises("start, stop", "need", "n=10"):
            src.read_rows(a, b)
    with _raises("start, stop", "n=5"):
        as_ids(np.arange(5)).read(0, 6)
    for bad in (0, -3, 2.5, True):
        with _raises("chunk_rows", repr(bad)):
            src.to_dask(bad)
    np.save(tmp_path / "x.npy", _data(n=3))
    with _raises("column", "'emb'", ".npy"):
        open_source(str(tmp_path / "x.npy"), column="emb")
    assert os.path.exists(tmp_path / "x.npy")
