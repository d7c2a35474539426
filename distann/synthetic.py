"""Seeded synthetic vectors with a low intrinsic dimension.

The generator follows the recipe of Faiss's ``SyntheticDataset``: Gaussian points in a
low-dimensional space, a random linear map to ``d`` dimensions, a per-dimension scale and
a sine non-linearity. The data has real cluster structure, so IVF recall curves look
like the ones of real embeddings rather than the flat curves of i.i.d. Gaussian noise.

Generation is by blocks of rows from a seed derived from (seed, block), so any row range
can be produced on its own and the same rows come out whatever the block size of the
caller: a file of 10^9 rows is written without ever holding more than one block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BLOCK = 65536  # rows generated from one derived seed; fixed so output is independent of callers


@dataclass(frozen=True)
class SyntheticSpec:
    """How to generate a data set: ``d`` output dimensions from ``intrinsic_dim`` latent ones."""

    d: int
    intrinsic_dim: int = 16
    seed: int = 1338

    def __post_init__(self) -> None:
        if self.d <= 0:
            raise ValueError(f"d: received {self.d!r}; must be a positive integer")
        if not 0 < self.intrinsic_dim:
            raise ValueError(f"intrinsic_dim: received {self.intrinsic_dim!r}; must be positive")

    def _projection(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0xD15A, self.d, self.intrinsic_dim])
        proj = rng.random((self.intrinsic_dim, self.d))
        scale = rng.random(self.d) * 4 + 0.1
        return proj, scale

    def rows(self, start: int, stop: int, stream: int = 0) -> np.ndarray:
        """Rows ``[start, stop)`` of stream ``stream`` (0: database, 1: queries, 2: training) as float32."""
        if not 0 <= start <= stop:
            raise ValueError(f"rows: received start={start}, stop={stop}; need 0 <= start <= stop")
        proj, scale = self._projection()
        out = np.empty((stop - start, self.d), dtype=np.float32)
        first, last = start // _BLOCK, (stop + _BLOCK - 1) // _BLOCK
        for b in range(first, last):
            b0, b1 = b * _BLOCK, (b + 1) * _BLOCK
            lo, hi = max(b0, start), min(b1, stop)
            if lo >= hi:
                continue
            rng = np.random.default_rng([self.seed, stream, b])
            latent = rng.standard_normal((_BLOCK, self.intrinsic_dim))[lo - b0 : hi - b0]
            x = np.sin((latent @ proj) * scale)
            out[lo - start : hi - start] = x
        return out


def synthetic(n: int, d: int, *, intrinsic_dim: int = 16, seed: int = 1338, stream: int = 0) -> np.ndarray:
    """``n`` synthetic rows of dimension ``d`` in memory (see :class:`SyntheticSpec`)."""
    return SyntheticSpec(d, intrinsic_dim, seed).rows(0, n, stream)


def write_npy(path: str, n: int, d: int, *, intrinsic_dim: int = 16, seed: int = 1338, stream: int = 0,
              block_rows: int = _BLOCK) -> str:
    """Write ``n`` synthetic rows to a ``.npy`` file block by block (peak memory: one block)."""
    spec = SyntheticSpec(d, intrinsic_dim, seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
        for s in range(0, n, block_rows):
            spec.rows(s, min(n, s + block_rows), stream).tofile(f)
    return path
