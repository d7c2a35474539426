"""Build staging carries block checksums (distann/store/staging.py): what a merge reads from
staging is checked, and a flipped, truncated or overwritten staging file is a clear error that
sends its chunk back to the add stage on the rerun, never a wrong vector in a committed shard."""

from __future__ import annotations

import os

import numpy as np
import pytest

import distann
from distann.builder.tasks import InjectedFault
from distann.store.location import Location
from distann.store.staging import BLOCK, CRC, Staging, StagingCorruptError
from tests.ann_helpers import set_fault


@pytest.fixture
def staged(tmp_path):
    """Chunks of several sizes staged with codes, ids, raw vectors and offsets: {n: arrays}."""
    loc = Location(str(tmp_path), {})
    rng = np.random.default_rng(0)
    out = {}
    for n in (0, 1, 100, 2048, 5000, 20000):  # empty, one row, less than a block, block-aligned, several blocks
        codes = rng.integers(0, 255, (n, 24), dtype=np.uint8)
        ids = rng.integers(0, 2**40, n).astype(np.int64)
        offsets = np.array([0, n // 3, n // 3, n], dtype=np.int64)
        raw = rng.random((n, 5), dtype=np.float32)
        Staging(loc, "g000001", f"c{n}").write(codes, ids, offsets, raw)
        out[n] = (codes, ids, offsets, raw)
    return loc, out


def test_rows_and_offsets_read_back_exactly(staged):
    loc, chunks = staged
    for n, (codes, ids, offsets, raw) in chunks.items():
        st = Staging(loc, "g000001", f"c{n}")
        np.testing.assert_array_equal(st.offsets(), offsets)
        np.testing.assert_array_equal(st.offsets(1, 3), offsets[1:])
        for r0, r1 in [(0, n), (0, 0), (n // 3, n), (max(0, n - 7), n), (min(n, 683), min(n, 2000)),
                       (min(n, 2048), min(n, 4096))]:
            c, i, w = st.rows(r0, r1, np.uint8, 24, 5)
            np.testing.assert_array_equal(c, codes[r0:r1])
            np.testing.assert_array_equal(i, ids[r0:r1])
            np.testing.assert_array_equal(w, raw[r0:r1])


def test_files_are_framed_blocks_with_their_crc32c(staged, tmp_path):
    """Each file: its data in BLOCK-byte blocks, each followed by 4 CRC bytes (FORMAT.md)."""
    import google_crc32c

    _, chunks = staged
    codes = chunks[20000][0]
    framed = (tmp_path / "g000001" / "staging" / "c20000" / "codes.bin").read_bytes()
    data = codes.tobytes()
    assert len(framed) == len(data) + CRC * -(-len(data) // BLOCK)
    for b in range(0, len(data), BLOCK):
        block = framed[b // BLOCK * (BLOCK + CRC):][:min(BLOCK, len(data) - b) + CRC]
        assert block[:-CRC] == data[b:b + BLOCK]
        assert int.from_bytes(block[-CRC:], "little") == google_crc32c.value(data[b:b + BLOCK])


@pytest.mark.parametrize("fault", ["flip", "truncate", "zero-block"])
def test_a_damaged_file_is_refused_naming_it_and_its_chunk_goes_back_to_add(staged, tmp_path, fault):
    loc, _ = staged
    folder = tmp_path / "g000001" / "staging" / "c20000"
    path = folder / "ids.bin"
    b = bytearray(path.read_bytes())
    if fault == "flip":
        b[3 * (BLOCK + CRC) + 100] ^= 0x10
    elif fault == "zero-block":
        b[3 * (BLOCK + CRC):4 * (BLOCK + CRC)] = bytes(BLOCK + CRC)
    else:
        b = b[:len(b) - 50]
    path.write_bytes(bytes(b))
    st = Staging(loc, "g000001", "c20000")
    st.rows(0, 100, np.uint8, 24, 5)  # the blocks before the damage still read
    with pytest.raises(StagingCorruptError) as info:
        st.rows(0, 20000, np.uint8, 24, 5)
    msg = str(info.value)
    assert str(path) in msg and "chunk c20000" in msg and "rerunning the same build redoes that chunk" in msg
    assert ("are missing" if fault == "truncate" else "fail their CRC-32C") in msg
    assert not (folder / "DONE").exists()  # the rerun's add task writes the chunk again
    assert isinstance(info.value, distann.errors.IndexFormatError)


def test_staging_of_an_older_distann_reads_unchecked(tmp_path):
    """DONE without ``block``: raw files as distann wrote them before the checksums."""
    loc = Location(str(tmp_path), {})
    folder = tmp_path / "g000001" / "staging" / "c000000"
    folder.mkdir(parents=True)
    codes, ids, offsets = np.arange(40, dtype=np.uint8).reshape(10, 4), np.arange(10, dtype=np.int64), np.array([0, 10])
    (folder / "codes.bin").write_bytes(codes.tobytes())
    (folder / "ids.bin").write_bytes(ids.tobytes())
    (folder / "offsets.bin").write_bytes(offsets.tobytes())
    (folder / "DONE").write_text('{"rows": 10}')
    st = Staging(loc, "g000001", "c000000")
    np.testing.assert_array_equal(st.offsets(), offsets)
    c, i, _ = st.rows(2, 7, np.uint8, 4, 0)
    np.testing.assert_array_equal(c, codes[2:7])
    np.testing.assert_array_equal(i, ids[2:7])


def test_a_build_over_damaged_staging_fails_clearly_then_resumes_to_a_clean_index(client, tmp_path):
    """A build stops in its merge stage (an injected fault) with every chunk staged; a bit in
    every block of one chunk's codes is flipped. The rerun's merge refuses it
    (StagingCorruptError naming the file and the chunk, nothing committed); the next rerun
    redoes that chunk's add task, keeps the others, and equals a clean build."""
    x = np.random.default_rng(3).standard_normal((12_000, 16)).astype(np.float32)
    src = str(tmp_path / "base.npy")
    np.save(src, x)
    opts = dict(spec="IVF16,Flat", niter=4, chunk_rows=2000, shard_bytes=100_000, client=client)
    clean = distann.build(src, str(tmp_path / "clean.zarr"), **opts)
    url = str(tmp_path / "idx.zarr")
    set_fault(client, "merge:s000001")
    try:
        with pytest.raises(InjectedFault):
            distann.build(src, url, **opts)
    finally:
        set_fault(client, None)
    path = tmp_path / "idx.zarr" / "g000001" / "staging" / "c000002" / "codes.bin"
    b = bytearray(path.read_bytes())
    for pos in range(7, len(b), BLOCK + CRC):
        b[pos] ^= 0x01
    path.write_bytes(bytes(b))
    with pytest.raises(StagingCorruptError) as info:
        distann.build(src, url, **opts)
    # the first merge to read the chunk names the damaged file; another reading it at the same time
    # may be the one reported, finding the chunk already sent back to the add stage
    assert (f"staging file {path}: data bytes" in str(info.value) and "fail their CRC-32C" in str(info.value)) or \
        ("staging of chunk c000002" in str(info.value) and "DONE marker is gone" in str(info.value)), info.value
    assert "rerunning the same build redoes that chunk" in str(info.value)
    with pytest.raises(distann.errors.IndexFormatError, match="no committed index"):
        distann.open_index(url)
    assert not (path.parent / "DONE").exists()
    got = distann.build(src, url, **opts)
    assert got.manifest.build["resumed_chunks"] == 5  # of 6: all but the damaged one
    a, b = got.lists.load_all(), clean.lists.load_all()
    for name in ("codes", "ids", "offsets"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    got.verify()
    assert not os.path.exists(tmp_path / "idx.zarr" / "g000001" / "staging")
