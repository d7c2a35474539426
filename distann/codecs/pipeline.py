"""The trained codec of an index: metric transform, pre-transforms, vector quantizer, re-ranking.

One object carries everything that turns source vectors into stored codes and queries into
what the kernels scan, so the build's add tasks and every reader use the same trained pieces::

    x --for_metric--> x_m --transforms--> y (the IVF space) --(y - centroid)--> quantizer codes
                      └── stored raw for RFlat re-ranking

It is created untrained from the spec (:meth:`CodecPipeline.create`), trained by the build on
its sample (``distann.train.codec``), serialised into the manifest (``params``: scalars) and the
index group (``arrays``: under ``codec/``), and restored by readers (:meth:`CodecPipeline.load`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distann.codecs.base import Quantizer, Transform
from distann.codecs.flat import FlatQuantizer
from distann.codecs.metric import for_metric
from distann.codecs.pq import PQQuantizer
from distann.codecs.spec import IndexSpec, QuantizerSpec, TransformSpec, parse_spec
from distann.codecs.sq import SQ8Quantizer, SQfp16Quantizer
from distann.codecs.transforms import OPQTransform, PCATransform, RandomRotation


def make_transform(spec: TransformSpec, d_in: int, d_out: int, seed: int) -> Transform:
    if spec.kind in ("PCA", "PCAR"):
        return PCATransform(d_in, d_out, seed, rotate=spec.kind == "PCAR")
    if spec.kind == "RR":
        return RandomRotation(d_in, d_out, seed)
    return OPQTransform(d_in, d_out, spec.m, seed)


def make_quantizer(spec: QuantizerSpec, d: int) -> Quantizer:
    if spec.kind == "Flat":
        return FlatQuantizer(d)
    if spec.kind == "SQ8":
        return SQ8Quantizer(d)
    if spec.kind == "SQfp16":
        return SQfp16Quantizer(d)
    return PQQuantizer(d, spec.m, spec.nbits)


class CodecPipeline:
    """Transforms + quantizer (+ RFlat) of one index; see the module docstring."""

    def __init__(self, spec: IndexSpec, d: int, metric: str, transforms: list[Transform], quantizer: Quantizer):
        self.spec = spec
        self.d = int(d)
        self.metric = metric
        self.transforms = transforms
        self.quantizer = quantizer

    @classmethod
    def create(cls, spec: IndexSpec | str, d: int, metric: str, seed: int = 0) -> CodecPipeline:
        """An untrained pipeline for ``spec`` on ``d``-dimensional vectors (ValidationError if
        the spec does not fit ``d``)."""
        spec = parse_spec(spec) if isinstance(spec, str) else spec
        dims = spec.dims(d)
        transforms = [make_transform(t, dims[i], dims[i + 1], seed + i) for i, t in enumerate(spec.transforms)]
        return cls(spec, d, metric, transforms, make_quantizer(spec.quantizer, dims[-1]))

    # ------------------------------------------------------------------ shapes
    @property
    def d_ivf(self) -> int:
        """Dimension of the space the coarse quantizer and the quantizer work in."""
        return self.quantizer.d

    @property
    def refine(self) -> bool:
        return self.spec.refine

    @property
    def code_size(self) -> int:
        return self.quantizer.code_size

    @property
    def needs_training(self) -> bool:
        return self.quantizer.needs_training or any(t.needs_training for t in self.transforms)

    # ------------------------------------------------------------------ vectors
    def raw(self, x: np.ndarray) -> np.ndarray:
        """What the index searches in the original space (normalized for cosine): RFlat's data."""
        return np.ascontiguousarray(for_metric(np.asarray(x, dtype=np.float32), self.metric), dtype=np.float32)

    def transform(self, x_raw: np.ndarray) -> np.ndarray:
        """Original space (after :meth:`raw`) -> IVF space."""
        for t in self.transforms:
            x_raw = t.apply(x_raw)
        return np.ascontiguousarray(x_raw, dtype=np.float32)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Source vectors or queries -> the IVF space (metric transform, then pre-transforms)."""
        return self.transform(self.raw(x))

    def encode(self, y: np.ndarray, assign: np.ndarray, centroids: np.ndarray, backend: str = "numba") -> np.ndarray:
        """Vectors of the IVF space assigned to lists -> codes (residuals where the quantizer
        wants them); ``backend``: the kernel backend of PQ's sub-quantizer assignment."""
        if self.quantizer.by_residual:
            y = y - centroids[assign]
        return self.quantizer.encode(np.ascontiguousarray(y, dtype=np.float32), backend=backend)

    def decode(self, codes: np.ndarray, assign: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """Codes of lists ``assign`` -> approximate vectors of the IVF space."""
        y = self.quantizer.decode(codes)
        return y + centroids[assign] if self.quantizer.by_residual else y

    def reconstruct(self, codes: np.ndarray, assign: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """Codes -> approximate vectors of the original space (pre-transforms reversed)."""
        y = self.decode(codes, assign, centroids)
        for t in reversed(self.transforms):
            y = t.reverse(y)
        return np.ascontiguousarray(y, dtype=np.float32)

    # ------------------------------------------------------------------ serialisation
    def params(self) -> dict[str, Any]:
        """The manifest's ``codec`` section, without the array paths (the build adds them)."""
        return {"spec": str(self.spec), "metric": self.metric, "d": self.d, "d_ivf": self.d_ivf,
                "transforms": [t.params() for t in self.transforms], "quantizer": self.quantizer.params(),
                "refine": self.refine}

    def arrays(self) -> dict[str, np.ndarray]:
        """The trained arrays, by name (``t<i>/<name>`` for transform i, ``quantizer/<name>``)."""
        out = {f"t{i}/{name}": a for i, t in enumerate(self.transforms) for name, a in t.arrays().items()}
        out.update({f"quantizer/{name}": a for name, a in self.quantizer.arrays().items()})
        return out

    @classmethod
    def load(cls, params: dict[str, Any], read: Callable[[str], np.ndarray]) -> CodecPipeline:
        """Restore a trained pipeline from its manifest section; ``read(name)`` returns the array
        named in ``arrays()``."""
        pipeline = cls.create(params["spec"], params["d"], params["metric"])
        for i, t in enumerate(pipeline.transforms):
            names = t.arrays()
            t.load(params["transforms"][i], {name: read(f"t{i}/{name}") for name in names})
        names = pipeline.quantizer.arrays()
        pipeline.quantizer.load(params["quantizer"], {name: read(f"quantizer/{name}") for name in names})
        return pipeline

    def __repr__(self) -> str:
        return f"CodecPipeline({self.spec}, d={self.d}, metric={self.metric})"
