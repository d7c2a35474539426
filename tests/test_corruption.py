"""A damaged index is an error naming the array and chunk — never a silent wrong answer.

Every chunk of every array is stored, so an absent chunk file can only mean a lost file;
search, open and verify() all refuse it, and a truncated chunk gets the same clean error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import distann
from distann.errors import IndexFormatError
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


def test_verify_checks_the_quantizer_checksums(copy):
    dst, gen = copy
    victim = _chunks(gen / "quantizer" / "centroids")[0]
    raw = bytearray(victim.read_bytes())
    raw[5] ^= 0x40
    victim.write_bytes(bytes(raw))
    index = distann.open_index(str(dst))  # a flipped bit is only found by the checksum
    with pytest.raises(IndexFormatError, match="quantizer/centroids: checksum crc32:.* != manifest"):
        index.verify()


def test_format_version_1_still_opens_with_a_warning(copy, caplog):
    """Version-1 indexes did not store all-zero chunks: they read as zeros, as they used to."""
    dst, gen = copy
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(dict(manifest, format_version=1)))
    victim = next(c for c in _chunks(gen / "shards" / "s000000" / "codes") if any(c.read_bytes()))
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
