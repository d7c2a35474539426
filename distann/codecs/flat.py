"""Flat: vectors stored as float32, bit-exact (no training, no residual)."""

from __future__ import annotations

import numpy as np

from distann.codecs.base import Quantizer


class FlatQuantizer(Quantizer):
    kind = "Flat"

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def code_width(self) -> int:
        return self.d

    def encode(self, x: np.ndarray, backend: str = "numba") -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(codes, dtype=np.float32)
