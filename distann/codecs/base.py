"""The two codec interfaces: pre-transforms and vector quantizers.

A trained codec is a :class:`~distann.codecs.pipeline.CodecPipeline`: zero or more
:class:`Transform` (PCA, random rotation, OPQ) applied to every vector and query, then one
:class:`Quantizer` (Flat, SQ, PQ) that turns vectors of the transformed space into the fixed-size
codes stored in the inverted lists. Both are serialisable the same way: ``params()`` (JSON
scalars, written into the manifest) and ``arrays()`` (NumPy arrays, written under ``codec/`` in
the index group); ``load(params, arrays)`` restores a trained object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Transform(ABC):
    """A linear map from ``d_in`` to ``d_out`` dimensions, trained on a sample (or not)."""

    kind: str = ""

    def __init__(self, d_in: int, d_out: int):
        self.d_in = int(d_in)
        self.d_out = int(d_out)

    @property
    def needs_training(self) -> bool:
        return True

    @abstractmethod
    def train(self, x: np.ndarray, seed: int) -> None:
        """Fit on a sample (n, d_in) float32 held in memory."""

    @abstractmethod
    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, d_in) -> (n, d_out) float32."""

    @abstractmethod
    def reverse(self, y: np.ndarray) -> np.ndarray:
        """(n, d_out) -> (n, d_in): the inverse where it exists, else the least-squares back-projection."""

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_in": self.d_in, "d_out": self.d_out}

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The trained state as arrays (names unique within the transform)."""

    @abstractmethod
    def load(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore the state written by ``params()`` / ``arrays()``."""


class Quantizer(ABC):
    """Encodes (n, d) float32 vectors to (n, code_width) codes of ``code_dtype`` and back.

    With ``by_residual`` the pipeline hands it residuals to the list's coarse centroid (and adds
    the centroid back after decoding), as Faiss's IVF quantizers do by default.
    """

    kind: str = ""
    by_residual: bool = False

    def __init__(self, d: int):
        self.d = int(d)

    @property
    @abstractmethod
    def code_dtype(self) -> np.dtype:
        """dtype of the stored code array."""

    @property
    @abstractmethod
    def code_width(self) -> int:
        """Number of ``code_dtype`` elements per vector."""

    @property
    def code_size(self) -> int:
        """Bytes per encoded vector."""
        return self.code_width * self.code_dtype.itemsize

    @property
    def needs_training(self) -> bool:
        return False

    def train(self, x: np.ndarray, seed: int) -> None:
        """Fit on a sample of what ``encode`` will see (residuals when ``by_residual``)."""

    @abstractmethod
    def encode(self, x: np.ndarray, backend: str = "numba") -> np.ndarray:
        """(n, d) float32 -> (n, code_width) codes; ``backend`` names the kernel backend of any
        nearest-centroid search the encoding needs (PQ)."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, code_width) codes -> (n, d) float32."""

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "d": self.d, "by_residual": self.by_residual,
                "code_dtype": self.code_dtype.str, "code_width": self.code_width}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore the trained state (stateless quantizers have none)."""
