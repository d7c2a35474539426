"""A damaged index is an error naming the array and chunk — never a silent wrong answer.

Every chunk of every array is stored, so an absent chunk file can only mean a lost file;
search, open and verify() all refuse it, and a truncated chunk gets the same clean error.
Every chunk ends with its CRC-32C, so a single flipped bit is refused on every read too, naming
the shard and the lists the chunk holds. Metadata declaring anything but the uncompressed
numeric arrays distann writes (a pickle or object codec) is refused before any chunk is read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

import distann
from distann.errors import IndexFormatError
from distann.search import lists as lists_mod
from tests.ann_helpers import cli, dataset

N, D, NLIST = 4000, 256, 4  # d=256: 1024 rows per 1 MiB codes chunk, so each shard has several chunks


@pytest.fixture(scope="module")
def built(client, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    xb, xq = dataset(N, D, 8)
    xb[:1500] = 0.0  # all-zero rows: their codes chunks are all zeros and must be stored too
    np.save(root / "queries.npy", xq)
    index = distann.build(xb, str(root / "idx.zarr"), spec=f"IVF{NLIST},Flat", client=client, niter=3)
    return root, index


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built index to damage, and the path of its generation folder."""
    root, index = built
    dst = tmp_path / "c.zarr"
    shutil.copytree(root / "idx.zarr", dst)
    return dst, dst / f"g{index.manifest.generation:06d}"


def _chunks(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


def _flip_bit(chunk: Path, byte: int | None = None) -> None:
    """Flip one bit of a chunk's data (not of its 4-byte CRC trailer), in place."""
    raw = bytearray(chunk.read_bytes())
    byte = (len(raw) - 4) // 2 if byte is None else byte
    raw[byte] ^= 0x10
    chunk.write_bytes(bytes(raw))


def _search_paths(monkeypatch, index, xq, gather: bool):
    """Search with the probed lists read by row slices, or (gather) by one oindex/take call."""
    monkeypatch.setattr(lists_mod, "_MAX_SLICES", 0 if gather else 8)
    return index.search(xq, k=10, nprobe=NLIST)


def test_every_chunk_of_every_array_is_stored(built):
    root, index = built
    gen = root / "idx.zarr" / f"g{index.manifest.generation:06d}"
    for meta in gen.rglob("zarr.json"):
        info = json.loads(meta.read_text())
        if info["node_type"] != "array":
            continue
        shape, chunks = info["shape"], info["chunk_grid"]["configuration"]["chunk_shape"]
        expected = int(np.prod([-(-s // c) for s, c in zip(shape, chunks)])) if all(shape) else 0
        assert len(_chunks(meta.parent)) == expected, meta.parent
        # every chunk carries its CRC-32C: data bytes + a 4-byte trailer
        assert [c["name"] for c in info["codecs"]] == ["bytes", "crc32c"], meta.parent
        nbytes = int(np.prod(chunks)) * np.dtype(info["data_type"]).itemsize + 4
        assert {c.stat().st_size for c in _chunks(meta.parent)} <= {nbytes}, meta.parent
    assert index.verify()["shards"] == len(index.manifest.shards)


@pytest.mark.parametrize("array", ["centroids", "list_sizes"])
def test_missing_quantizer_chunk_refused_at_open(copy, array):
    dst, gen = copy
    victim = _chunks(gen / "quantizer" / array)[0]
    victim.unlink()
    key = victim.relative_to(gen / "quantizer" / array).as_posix()
    with pytest.raises(IndexFormatError, match=f"array g000001/quantizer/{array}: chunk {key} is missing"):
        distann.open_index(str(dst))


@pytest.mark.parametrize("array", ["codes", "ids", "offsets"])
def test_missing_shard_chunk_refused_by_search_and_verify(copy, array):
    dst, gen = copy
    victim = _chunks(gen / "shards" / "s000000" / array)[-1]
    victim.unlink()
    key = victim.relative_to(gen / "shards" / "s000000" / array).as_posix()
    pattern = f"shards/s000000/{array}: chunk {key} is missing"
    index = distann.open_index(str(dst))
    _, xq = dataset(N, D, 8)
    with pytest.raises(IndexFormatError, match=pattern):
        index.search(xq, k=10, nprobe=NLIST)
    with pytest.raises(IndexFormatError, match=pattern):
        distann.open_index(str(dst)).verify()


def test_truncated_chunk_refused_by_search_and_verify(copy):
    dst, gen = copy
    victim = _chunks(gen / "shards" / "s000000" / "codes")[0]
    with open(victim, "r+b") as f:
        f.truncate(100)
    _, xq = dataset(N, D, 8)
    pattern = r"codes: chunk c/0/0 has 100 bytes, expected \d+ \(truncated"
    with pytest.raises(IndexFormatError, match=pattern):
        distann.open_index(str(dst)).search(xq, k=10, nprobe=NLIST)
    with pytest.raises(IndexFormatError, match=pattern):
        distann.open_index(str(dst)).verify()


def test_flipped_bit_in_quantizer_refused_at_open(copy):
    dst, gen = copy
    _flip_bit(_chunks(gen / "quantizer" / "centroids")[0], byte=5)
    with pytest.raises(IndexFormatError, match="array g000001/quantizer/centroids: chunk c/0/0 fails its CRC-32C"):
        distann.open_index(str(dst))


def test_verify_checks_the_manifest_checksums(copy):
    """A chunk rewritten whole with a matching CRC-32C (overwritten, not rotted) is found by
    verify(), which compares every array with the manifest's checksum."""
    dst, gen = copy
    victim = _chunks(gen / "quantizer" / "centroids")[0]
    data = np.frombuffer(victim.read_bytes()[:-4], dtype="<f4").copy()
    data[0] += 1.0
    import google_crc32c

    victim.write_bytes(data.tobytes() + np.uint32(google_crc32c.value(data.tobytes())).tobytes())
    index = distann.open_index(str(dst))  # every chunk is self-consistent: only the manifest tells
    with pytest.raises(IndexFormatError, match="quantizer/centroids: checksum crc32:.* != manifest"):
        index.verify()


@pytest.mark.parametrize("gather", [False, True], ids=["slices", "take"])
@pytest.mark.parametrize("array", ["codes", "ids", "offsets"])
def test_flipped_bit_in_shard_refused_by_search_and_verify(copy, monkeypatch, array, gather):
    """One flipped bit anywhere in a shard: search (row slices, and the oindex/take gather) and
    verify() raise IndexFormatError naming the array, the shard, the chunk and its lists."""
    dst, gen = copy
    victim = _chunks(gen / "shards" / "s000000" / array)[-1]
    _flip_bit(victim)
    key = victim.relative_to(gen / "shards" / "s000000" / array).as_posix()
    pattern = (rf"shards/s000000/{array}: chunk {key} fails its CRC-32C checksum .*: rows \[\d+, \d+\), "
               rf"(the offsets of )?lists \d+-\d+ of shard s000000")
    _, xq = dataset(N, D, 8)
    with pytest.raises(IndexFormatError, match=pattern):
        _search_paths(monkeypatch, distann.open_index(str(dst), cache_bytes=0), xq, gather)
    with pytest.raises(IndexFormatError, match=pattern):
        distann.open_index(str(dst)).verify()


def test_bad_chunk_names_the_lists_it_holds(built, copy):
    """The lists named are those whose rows lie in the damaged chunk (here the last codes chunk)."""
    _, index = built
    dst, gen = copy
    entry = index.manifest.shards[0]
    offsets = index.lists.shard(0).offsets
    chunk_rows = index.lists.shard(0).codes.chunks[0]
    victim = _chunks(gen / "shards" / entry.name / "codes")[-1]
    _flip_bit(victim)
    r0 = (len(_chunks(gen / "shards" / entry.name / "codes")) - 1) * chunk_rows
    first = int(np.searchsorted(offsets, r0, side="right")) - 1
    last = int(np.searchsorted(offsets, entry.ntotal - 1, side="right")) - 1
    with pytest.raises(IndexFormatError, match=rf"rows \[{r0}, {entry.ntotal}\), lists {first}-{last} of shard"):
        distann.open_index(str(dst)).verify()


def _strip_checksums(gen: Path) -> None:
    """Rewrite every array of a generation as an index written before chunk checksums was."""
    for meta in list(gen.rglob("zarr.json")):
        info = json.loads(meta.read_text())
        if info["node_type"] != "array":
            continue
        rel = meta.parent.relative_to(gen.parent).as_posix()
        store = zarr.storage.LocalStore(gen.parent)
        data = zarr.open_array(store, path=rel, mode="r")[...]
        arr = zarr.create_array(store, name=rel, shape=data.shape, chunks=info["chunk_grid"]["configuration"]
                                ["chunk_shape"], dtype=data.dtype, compressors=None, fill_value=0, overwrite=True,
                                config={"write_empty_chunks": True})
        if data.size:
            arr[...] = data


def test_index_without_chunk_checksums_still_reads(built, copy):
    """Indexes written before the crc32c codec read as before, with the size check alone."""
    _, index = built
    dst, gen = copy
    _strip_checksums(gen)
    assert all("crc32c" not in m.read_text() for m in gen.rglob("zarr.json"))
    _, xq = dataset(N, D, 8)
    old = distann.open_index(str(dst))
    np.testing.assert_array_equal(old.search(xq, k=10, nprobe=NLIST)[1], index.search(xq, k=10, nprobe=NLIST)[1])
    assert old.verify()["shards"] == 1
    codes = gen / "shards" / "s000000" / "codes"
    plain = int(np.prod(json.loads((codes / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"])) * 4
    with open(_chunks(codes)[0], "r+b") as f:
        f.truncate(100)
    with pytest.raises(IndexFormatError, match=rf"codes: chunk c/0/0 has 100 bytes, expected {plain} \(truncated"):
        distann.open_index(str(dst)).verify()


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m["codecs"].insert(0, {"name": "numcodecs.pickle", "configuration": {"protocol": 5}}),
                 id="pickle-codec"),
    pytest.param(lambda m: m.update(data_type="object"), id="object-dtype"),
    pytest.param(lambda m: m.update(data_type="string", codecs=[{"name": "vlen-utf8"}]), id="vlen-utf8"),
    pytest.param(lambda m: m.update(data_type="variable_length_bytes", codecs=[{"name": "vlen-bytes"}]),
                 id="vlen-bytes"),
    pytest.param(lambda m: m["codecs"].append({"name": "numcodecs.zlib", "configuration": {"level": 1}}),
                 id="unexpected-compressor"),
    pytest.param(lambda m: m.update(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}),
                 id="v2-chunk-keys"),
])
def test_metadata_declaring_foreign_codecs_refused(copy, monkeypatch, edit):
    """An array's zarr.json edited to declare a pickle / object / variable-length codec or data
    type (or a layout the chunk checks cannot see) is refused before any chunk is read."""
    dst, gen = copy
    meta_path = gen / "shards" / "s000000" / "codes" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    read = []
    real_get = zarr.storage.LocalStore.get

    async def spy(self, key, *args, **kwargs):
        read.append(key)
        return await real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", spy)
    _, xq = dataset(N, D, 8)
    pattern = "array g000001/shards/s000000/codes: its zarr.json declares .* refuses this array before reading any chunk"
    with pytest.raises(IndexFormatError, match=pattern):
        distann.open_index(str(dst), cache_bytes=0).search(xq, k=5, nprobe=NLIST)
    with pytest.raises(IndexFormatError, match=pattern):
        distann.open_index(str(dst)).verify()
    assert not [k for k in read if "shards/s000000/codes/c/" in k]


def test_format_version_1_still_opens_with_a_warning(copy, caplog):
    """Version-1 indexes did not store all-zero chunks: they read as zeros, as they used to."""
    dst, gen = copy
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(dict(manifest, format_version=1)))
    victim = next(c for c in _chunks(gen / "shards" / "s000000" / "codes") if any(c.read_bytes()[:-4]))
    victim.unlink()
    index = distann.open_index(str(dst))
    assert "format version 1" in caplog.text
    _, xq = dataset(N, D, 8)
    index.search(xq, k=5, nprobe=NLIST)
    with pytest.raises(IndexFormatError, match="checksum"):
        index.verify()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=120)


def test_cli_verify_and_search_report_corruption_in_one_line(built, copy):
    root, _ = built
    ok = _cli("verify", str(root / "idx.zarr"))
    assert ok.returncode == 0, ok.stderr
    assert "verified" in ok.stdout and "1 shard" in ok.stdout
    dst, gen = copy
    with open(_chunks(gen / "shards" / "s000000" / "codes")[0], "r+b") as f:
        f.truncate(100)
    for args in (("verify", str(dst)),
                 ("search", str(dst), str(root / "queries.npy"), "--k", "5", "--nprobe", str(NLIST),
                  "--out", str(dst.parent / "r.npz"))):
        bad = _cli(*args)
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "chunk c/0/0 has 100 bytes" in lines[0], bad.stderr
    assert not (dst.parent / "r.npz").exists()
