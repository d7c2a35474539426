"""Build staging: the transient output of one add task (row chunk), read by the merge tasks.

Raw little-endian files, not Zarr (``docs/FORMAT.md``, "Build staging")::

    <gen>/staging/<chunk>/codes.bin    (n_c, code_width) codes, rows sorted by list (stable)
    <gen>/staging/<chunk>/ids.bin      (n_c,) int64
    <gen>/staging/<chunk>/raw.bin      (n_c, d) float32 raw vectors (RFlat indexes only)
    <gen>/staging/<chunk>/offsets.bin  (nlist + 1,) int64: rows of list l are [off[l], off[l+1])
    <gen>/staging/<chunk>/DONE         JSON, written last

A merge task reads the offsets of its list range, then one contiguous byte range of each file.
"""

from __future__ import annotations

import numpy as np

from distann.store import layout
from distann.store.arrays import disk_full_error
from distann.store.location import Location


def _le(a: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian view (a copy only on big-endian machines)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


class Staging:
    """The staging output of chunk ``chunk`` of generation ``gen``; files as in the module docstring."""

    def __init__(self, loc: Location, gen: str, chunk: str):
        self.loc = loc
        self.base = layout.staging(gen, chunk)

    def done(self) -> bool:
        return self.loc.exists(f"{self.base}/DONE")

    def write(self, codes: np.ndarray, ids: np.ndarray, offsets: np.ndarray, raw: np.ndarray | None,
              after_codes=None) -> None:
        """Write every file, DONE last. ``after_codes`` is called between the first file and the
        others (the resume tests' private fault hook). A full disk is a StorageFullError naming
        the folder: the files written so far stay (without DONE) and a rerun rewrites them."""
        with disk_full_error(f"the staging output of add task {self.base.rpartition('/')[2]}",
                             self.loc.path(self.base)):
            self.loc.write_bytes(f"{self.base}/codes.bin", _le(codes).data)
            if after_codes is not None:
                after_codes()
            self.loc.write_bytes(f"{self.base}/ids.bin", _le(ids).data)
            if raw is not None:
                self.loc.write_bytes(f"{self.base}/raw.bin", _le(raw).data)
            self.loc.write_bytes(f"{self.base}/offsets.bin", _le(offsets).data)
            self.loc.write_json(f"{self.base}/DONE", {"rows": int(len(ids))})

    def offsets(self, l0: int | None = None, l1: int | None = None) -> np.ndarray:
        """The list offsets, all of them or those of lists [l0, l1) (l1 - l0 + 1 entries)."""
        if l0 is None:
            return np.frombuffer(self.loc.read_bytes(f"{self.base}/offsets.bin"), dtype="<i8")
        return np.frombuffer(self.loc.read_bytes(f"{self.base}/offsets.bin", l0 * 8, (l1 + 1) * 8), dtype="<i8")

    def rows(self, r0: int, r1: int, code_dtype: np.dtype, code_width: int,
             raw_d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Codes, ids and (with ``raw_d``) raw vectors of rows [r0, r1): one ranged read each."""
        dtype = np.dtype(code_dtype).newbyteorder("<")
        size = dtype.itemsize * code_width
        codes = np.frombuffer(self.loc.read_bytes(f"{self.base}/codes.bin", r0 * size, r1 * size),
                              dtype=dtype).reshape(-1, code_width)
        ids = np.frombuffer(self.loc.read_bytes(f"{self.base}/ids.bin", r0 * 8, r1 * 8), dtype="<i8")
        raw = None
        if raw_d:
            raw = np.frombuffer(self.loc.read_bytes(f"{self.base}/raw.bin", r0 * raw_d * 4, r1 * raw_d * 4),
                                dtype="<f4").reshape(-1, raw_d)
        return codes, ids, raw
