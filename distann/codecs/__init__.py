"""Codecs and the index spec string (``IVF<nlist>,<codec>``).

Codecs are looked up by name in a registry that imports implementations lazily, so a codec
with heavy or optional dependencies costs nothing until it is used.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from distann.codecs.base import Codec
from distann.errors import ValidationError

#: codec name -> "module:class"
_REGISTRY = {"Flat": "distann.codecs.flat:FlatCodec"}

_SPEC_RE = re.compile(r"^IVF(\d+),(\w+)$")


@dataclass(frozen=True)
class IndexSpec:
    """A parsed spec string: ``IVF1024,Flat`` -> nlist=1024, codec="Flat"."""

    nlist: int
    codec: str

    def __str__(self) -> str:
        return f"IVF{self.nlist},{self.codec}"


def parse_spec(spec: object, param: str = "spec") -> IndexSpec:
    allowed = f"a spec 'IVF<nlist>,Flat' with nlist >= 1 (codecs: {', '.join(sorted(_REGISTRY))}), e.g. 'IVF1024,Flat'"
    if not isinstance(spec, str):
        raise ValidationError(param, spec, allowed)
    m = _SPEC_RE.match(spec.strip())
    if not m or int(m.group(1)) < 1 or m.group(2) not in _REGISTRY:
        raise ValidationError(param, spec, allowed)
    return IndexSpec(int(m.group(1)), m.group(2))


def make_codec(name: str, d: int) -> Codec:
    if name not in _REGISTRY:
        raise ValidationError("codec", name, f"one of {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(d)


__all__ = ["Codec", "IndexSpec", "make_codec", "parse_spec"]
