"""Kernel backends, chosen by name.

``get_backend("numba")`` returns the module implementing the kernels of
``distann.kernels.base.KernelBackend``. Backends are imported lazily (on first request), so
importing ``distann.kernels`` neither compiles Numba code nor needs a GPU stack. An unknown or
unavailable name raises ``ValidationError``; there is never a silent fallback to another
backend.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from distann.errors import ValidationError
from distann.kernels.base import KernelBackend

__all__ = ["KernelBackend", "available_backends", "get_backend"]

# name -> module path of the implemented backends
_REGISTRY: dict[str, str] = {
    "numpy": "distann.kernels.reference",
    "numba": "distann.kernels.numba_cpu",
}
_ALIASES: dict[str, str] = {"reference": "numpy"}
_RESERVED: tuple[str, ...] = ("cupy", "cuda")  # names kept for the GPU backend


def available_backends() -> list[str]:
    """Names accepted by ``get_backend`` (aliases excluded), e.g. ``["numba", "numpy"]``."""
    return sorted(_REGISTRY)


def get_backend(name: str = "numba") -> ModuleType:
    """Return the backend module registered under ``name`` ("numba", "numpy" or its alias
    "reference"). Raises ``ValidationError`` naming the allowed values otherwise."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if isinstance(key, str) and key in _REGISTRY:
        return importlib.import_module(_REGISTRY[key])
    allowed = ", ".join(repr(n) for n in available_backends() + sorted(_ALIASES))
    if isinstance(key, str) and key in _RESERVED:
        raise ValidationError("backend", name,
                              f"the GPU backend is not available yet; use one of {allowed}")
    raise ValidationError("backend", name, f"unknown backend; must be one of {allowed}")
