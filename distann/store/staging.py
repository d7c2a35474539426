"""Build staging: the transient output of one add task (row chunk), read by the merge tasks.

Raw little-endian files, not Zarr (``docs/FORMAT.md``, "Build staging")::

    <gen>/staging/<chunk>/codes.bin    (n_c, code_width) codes, rows sorted by list (stable)
    <gen>/staging/<chunk>/ids.bin      (n_c,) int64
    <gen>/staging/<chunk>/raw.bin      (n_c, d) float32 raw vectors (RFlat indexes only)
    <gen>/staging/<chunk>/offsets.bin  (nlist + 1,) int64: rows of list l are [off[l], off[l+1])
    <gen>/staging/<chunk>/DONE         JSON, written last: {"rows", "block", "bytes": {file: size}}

A merge task reads the offsets of its list range, then one contiguous byte range of each file.

Each file is framed in blocks: every ``block`` (16 KiB) bytes of the data, the last block
shorter, are followed by the block's CRC-32C (4 bytes, little-endian). A read covers the whole
blocks holding the bytes asked for (one ranged read, as before, at most two blocks longer) and
checks each, so a flipped, truncated or overwritten byte in staging is a StagingCorruptError
naming the file, the bytes and the add task that wrote them, never a wrong vector in a merged
shard. The error removes that chunk's DONE marker first: rerunning the build redoes the chunk.
Staging whose DONE has no ``block`` (an older distann) is unframed and read unchecked.
"""

from __future__ import annotations

import contextlib

import google_crc32c
import numpy as np

from distann.errors import IndexFormatError
from distann.store import layout
from distann.store.arrays import disk_full_error
from distann.store.location import Location

#: data bytes per checksummed block of a staging file (each followed by its 4-byte CRC-32C)
BLOCK = 1 << 14
#: part of a build's key: a build never resumes staging written in another layout (1: unframed)
STAGING_VERSION = 2
CRC = 4


class StagingCorruptError(IndexFormatError):
    """A staging file of a build does not match the checksums its add task wrote."""


def frame(a: np.ndarray) -> bytearray:
    """The bytes of C-contiguous ``a`` in blocks of BLOCK bytes (the last shorter), each followed
    by its CRC-32C."""
    view = memoryview(a.reshape(-1).view(np.uint8))
    out = bytearray(len(view) + CRC * -(-len(view) // BLOCK))
    pos = 0
    for i in range(0, len(view), BLOCK):
        block = bytes(view[i:i + BLOCK])  # google_crc32c takes bytes only
        out[pos:pos + len(block)] = block
        out[pos + len(block):pos + len(block) + CRC] = google_crc32c.value(block).to_bytes(CRC, "little")
        pos += len(block) + CRC
    return out


def _le(a: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian view (a copy only on big-endian machines)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


class Staging:
    """The staging output of chunk ``chunk`` of generation ``gen``; files as in the module docstring."""

    def __init__(self, loc: Location, gen: str, chunk: str):
        self.loc = loc
        self.chunk = chunk
        self.base = layout.staging(gen, chunk)
        self._record: dict | None = None

    def done(self) -> bool:
        return self.loc.exists(f"{self.base}/DONE")

    def write(self, codes: np.ndarray, ids: np.ndarray, offsets: np.ndarray, raw: np.ndarray | None,
              after_codes=None) -> None:
        """Write every file (framed, see the module docstring), DONE last. ``after_codes`` is
        called between the first file and the others (the resume tests' private fault hook). A
        full disk is a StorageFullError naming the folder: the files written so far stay
        (without DONE) and a rerun rewrites them."""
        files = {"codes.bin": _le(codes), "ids.bin": _le(ids), "raw.bin": None if raw is None else _le(raw),
                 "offsets.bin": _le(offsets)}
        files = {name: a for name, a in files.items() if a is not None}
        with disk_full_error(f"the staging output of add task {self.base.rpartition('/')[2]}",
                             self.loc.path(self.base)):
            for name, a in files.items():
                self.loc.write_bytes(f"{self.base}/{name}", frame(a))
                if name == "codes.bin" and after_codes is not None:
                    after_codes()
            self.loc.write_json(f"{self.base}/DONE", {"rows": int(len(ids)), "block": BLOCK,
                                                      "bytes": {name: int(a.nbytes) for name, a in files.items()}})

    def _read(self, name: str, start: int | None = None, end: int | None = None) -> bytes | np.ndarray:
        """Bytes [start, end) of the data of staging file ``name`` (all of it by default): one
        ranged read of the blocks holding them, each block checked against its CRC-32C."""
        if self._record is None:
            try:
                self._record = self.loc.read_json(f"{self.base}/DONE")
            except FileNotFoundError:  # another merge found the chunk damaged and sent it back to add
                raise StagingCorruptError(
                    f"staging of chunk {self.chunk} ({self.loc.path(self.base)}): its DONE marker is gone, removed by "
                    "a merge that found the chunk's files damaged. Nothing was committed: rerunning the same build "
                    "redoes that chunk") from None
        block = self._record.get("block")
        if block is None:  # unframed staging of an older distann
            return self.loc.read_bytes(f"{self.base}/{name}", start, end)
        size = self._record["bytes"][name]
        start, end = (0 if start is None else start), (size if end is None else end)
        if end <= start:
            return b""
        if end > size:
            self._corrupt(name, start, end, f"are asked of a file of {size} bytes (its offsets do not match its rows)")
        b0, b1 = start // block, -(-end // block)
        stride = block + CRC
        # blocks [b0, b1) in the file: every block before b1 whole, block b1 - 1 perhaps the short last one
        framed = self.loc.read_bytes(f"{self.base}/{name}", b0 * stride, min(b1 * block, size) + b1 * CRC)
        for i, b in enumerate(range(b0, b1)):
            n, lo = min(block, size - b * block), i * stride
            data, crc = framed[lo:lo + n], framed[lo + n:lo + n + CRC]
            if len(crc) < CRC:
                self._corrupt(name, b * block, b * block + n, "are missing (the file is shorter than its add task "
                                                              "wrote)")
            if google_crc32c.value(data) != int.from_bytes(crc, "little"):
                self._corrupt(name, b * block, b * block + n, "fail their CRC-32C (a flipped bit or overwritten "
                                                              "bytes)")
        # every block checked: drop the checksums (whole blocks in one copy, then the shorter last one)
        raw = np.frombuffer(framed, dtype=np.uint8)
        full = len(raw) // stride
        data = np.concatenate([raw[:full * stride].reshape(full, stride)[:, :block].reshape(-1),
                               raw[full * stride:len(raw) - CRC] if len(raw) % stride else raw[:0]])
        return data[start - b0 * block:end - b0 * block]

    def _corrupt(self, name: str, start: int, end: int, what: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # another merge reading the chunk may have removed it
            self.loc.remove(f"{self.base}/DONE")  # the rerun's add task writes the chunk's staging again
        raise StagingCorruptError(
            f"staging file {self.loc.path(f'{self.base}/{name}')}: data bytes [{start}, {end}) {what}; written by "
            f"the add task of chunk {self.chunk}. Nothing was committed, and the chunk's DONE marker is removed: "
            "rerunning the same build redoes that chunk")

    def offsets(self, l0: int | None = None, l1: int | None = None) -> np.ndarray:
        """The list offsets, all of them or those of lists [l0, l1) (l1 - l0 + 1 entries)."""
        if l0 is None:
            return np.frombuffer(self._read("offsets.bin"), dtype="<i8")
        return np.frombuffer(self._read("offsets.bin", l0 * 8, (l1 + 1) * 8), dtype="<i8")

    def rows(self, r0: int, r1: int, code_dtype: np.dtype, code_width: int,
             raw_d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Codes, ids and (with ``raw_d``) raw vectors of rows [r0, r1): one ranged read each."""
        dtype = np.dtype(code_dtype).newbyteorder("<")
        size = dtype.itemsize * code_width
        codes = np.frombuffer(self._read("codes.bin", r0 * size, r1 * size), dtype=dtype).reshape(-1, code_width)
        ids = np.frombuffer(self._read("ids.bin", r0 * 8, r1 * 8), dtype="<i8")
        raw = None
        if raw_d:
            raw = np.frombuffer(self._read("raw.bin", r0 * raw_d * 4, r1 * raw_d * 4), dtype="<f4").reshape(-1, raw_d)
        return codes, ids, raw
