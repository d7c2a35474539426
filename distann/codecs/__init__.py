"""Codecs: the spec grammar, the metric transform, pre-transforms, vector quantizers, and the
pipeline that chains them (``distann.codecs.pipeline.CodecPipeline``).

``parse_spec`` reads a Faiss index-factory style string (``OPQ16,IVF1024,PQ16``); the build
creates a pipeline from it, trains it on its sample and stores it with the index; readers load
the trained pipeline back from the manifest.
"""

from __future__ import annotations

from distann.codecs.base import Quantizer, Transform
from distann.codecs.pipeline import CodecPipeline
from distann.codecs.spec import IndexSpec, QuantizerSpec, TransformSpec, parse_spec

__all__ = ["CodecPipeline", "IndexSpec", "Quantizer", "QuantizerSpec", "Transform", "TransformSpec", "parse_spec"]
