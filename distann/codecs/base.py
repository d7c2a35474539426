"""The codec interface: how vectors become the codes stored in inverted lists.

Flat is the first implementation; scalar and product quantizers plug in behind the same
interface. A codec turns float32 vectors (already transformed for the metric, e.g.
normalized for cosine) into fixed-width rows of codes, and back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Codec(ABC):
    """Encodes (n, d) float32 vectors to (n, code_width) rows of ``code_dtype``."""

    #: registry name, as written in the spec string and the manifest
    name: str = ""

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

    def train(self, sample: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> None:
        """Fit codec parameters on a training sample and its coarse assignment (default: none)."""

    @abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, d) float32 -> (n, code_width) codes."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, code_width) codes -> (n, d) float32 (exact for Flat)."""

    def params(self) -> dict[str, Any]:
        """JSON-able parameters written to the manifest (arrays go under ``codec/``)."""
        return {"name": self.name, "d": self.d, "code_dtype": self.code_dtype.str, "code_width": self.code_width}
