"""Scalar quantizers: one byte per dimension (SQ8) or one half-precision float (SQfp16).

Both encode residuals to the list's coarse centroid (``by_residual``, Faiss's IVF default).

* SQ8 (Faiss ``QT_8bit``, ``RS_minmax``): per-dimension range ``[vmin, vmin + vdiff]`` trained
  on the sample; component ``x`` is stored as ``floor(255 * (x - vmin) / vdiff)`` clamped to
  [0, 255] and reconstructs to ``vmin + (code + 0.5) / 255 * vdiff``. Dimensions of constant
  value (``vdiff`` 0) store 0 and reconstruct exactly. Error per component: at most vdiff / 510
  inside the trained range.
* SQfp16: IEEE half precision, stored as its uint16 bit pattern; magnitudes beyond the largest
  half (65504) are clamped to it. Relative error per component: at most 2^-11.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distann.codecs.base import Quantizer

_HALF_MAX = np.float32(np.finfo(np.float16).max)


class SQ8Quantizer(Quantizer):
    kind = "SQ8"
    by_residual = True
    sq_kind = 0  # the kernels' scalar-quantizer kind

    def __init__(self, d: int):
        super().__init__(d)
        self.vmin = np.zeros(d, dtype=np.float32)
        self.vdiff = np.zeros(d, dtype=np.float32)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def code_width(self) -> int:
        return self.d

    @property
    def needs_training(self) -> bool:
        return True

    def train(self, x: np.ndarray, seed: int) -> None:
        self.set_range(x.min(axis=0), x.max(axis=0))

    def set_range(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """The per-dimension range [lo, hi] (e.g. reduced over a distributed sample)."""
        self.vmin = np.ascontiguousarray(lo, dtype=np.float32)
        self.vdiff = np.ascontiguousarray(np.asarray(hi, dtype=np.float32) - self.vmin, dtype=np.float32)

    def encode(self, x: np.ndarray, backend: str = "numba") -> np.ndarray:
        scale = np.divide(np.float32(255), self.vdiff, out=np.zeros_like(self.vdiff), where=self.vdiff > 0)
        q = np.floor((np.asarray(x, dtype=np.float32) - self.vmin) * scale)
        return np.clip(q, 0, 255).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return (self.vmin + (codes.astype(np.float32) + np.float32(0.5)) * (self.vdiff / np.float32(255))).astype(
            np.float32)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "range": "minmax"}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"vmin": self.vmin, "vdiff": self.vdiff}

    def load(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.vmin = np.ascontiguousarray(arrays["vmin"], dtype=np.float32)
        self.vdiff = np.ascontiguousarray(arrays["vdiff"], dtype=np.float32)


class SQfp16Quantizer(Quantizer):
    kind = "SQfp16"
    by_residual = True
    sq_kind = 1

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    @property
    def code_width(self) -> int:
        return self.d

    def encode(self, x: np.ndarray, backend: str = "numba") -> np.ndarray:
        clipped = np.clip(np.asarray(x, dtype=np.float32), -_HALF_MAX, _HALF_MAX)
        return clipped.astype(np.float16).view(np.uint16)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(codes, dtype=np.uint16).view(np.float16).astype(np.float32)
