"""Product quantizer: the vector is cut into M sub-vectors, each replaced by the index of the
nearest of 2^nbits centroids trained by k-means on that sub-space (one byte per sub-vector,
whatever nbits). Encodes residuals to the list's coarse centroid (Faiss ``by_residual``).

Training follows Faiss's ``ProductQuantizer``: k-means with 25 iterations per sub-space on at
most 256 * 2^nbits sample points. Search uses asymmetric distance computation (ADC) in the
kernels: a lookup table per (query, list), M lookups per code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distann.codecs.base import Quantizer

#: k-means iterations per sub-space and training points per centroid, as Faiss's ProductQuantizer
PQ_NITER = 25
PQ_POINTS_PER_CENTROID = 256


class PQQuantizer(Quantizer):
    kind = "PQ"
    by_residual = True

    def __init__(self, d: int, m: int, nbits: int = 8):
        super().__init__(d)
        self.m = int(m)
        self.nbits = int(nbits)
        self.ksub = 1 << self.nbits
        self.dsub = d // self.m
        self.codebooks = np.zeros((self.m, self.ksub, self.dsub), dtype=np.float32)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def code_width(self) -> int:
        return self.m

    @property
    def needs_training(self) -> bool:
        return True

    @property
    def train_size(self) -> int:
        """Training points used (Faiss's cap): the rest of a larger sample is ignored."""
        return PQ_POINTS_PER_CENTROID * self.ksub

    def subspace(self, x: np.ndarray, m: int) -> np.ndarray:
        return np.ascontiguousarray(x[:, m * self.dsub:(m + 1) * self.dsub], dtype=np.float32)

    @staticmethod
    def train_subspace(x: np.ndarray, ksub: int, seed) -> np.ndarray:
        """The (ksub, dsub) codebook of one sub-space: k-means on its sample."""
        from distann.train.kmeans import kmeans_local

        return kmeans_local(x, ksub, PQ_NITER, seed)

    def train(self, x: np.ndarray, seed: int) -> None:
        if len(x) > self.train_size:
            x = x[np.sort(np.random.default_rng([seed, 0x7051]).choice(len(x), self.train_size, replace=False))]
        self.codebooks = np.stack([self.train_subspace(self.subspace(x, m), self.ksub, [seed, m])
                                   for m in range(self.m)])

    def set_codebooks(self, codebooks: np.ndarray) -> None:
        self.codebooks = np.ascontiguousarray(codebooks, dtype=np.float32).reshape(self.m, self.ksub, self.dsub)

    def encode(self, x: np.ndarray, backend: str = "numba") -> np.ndarray:
        """Each sub-vector's nearest centroid, by the kernel backend's ``assign``."""
        from distann.kernels import get_backend

        kern = get_backend(backend)
        codes = np.empty((len(x), self.m), dtype=np.uint8)
        for m in range(self.m):
            codes[:, m] = kern.assign(self.subspace(x, m), self.codebooks[m], "l2")
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        out = np.empty((len(codes), self.d), dtype=np.float32)
        for m in range(self.m):
            out[:, m * self.dsub:(m + 1) * self.dsub] = self.codebooks[m][codes[:, m]]
        return out

    def params(self) -> dict[str, Any]:
        return {**super().params(), "m": self.m, "nbits": self.nbits}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"codebooks": self.codebooks}

    def load(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.set_codebooks(arrays["codebooks"])
