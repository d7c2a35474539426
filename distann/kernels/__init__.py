"""Kernel backends, chosen by name.

``get_backend("numba")`` returns the module implementing the kernels of
``distann.kernels.base.KernelBackend``: ``"numpy"`` (the reference), ``"numba"`` (CPU) or
``"cuda"`` (GPU: CuPy + Numba-CUDA, ``pip install 'distann[gpu]'``). Backends are imported
lazily (on first request), so importing ``distann.kernels`` neither compiles Numba code nor
needs a GPU stack. An unknown or unusable name raises ``ValidationError``; there is never a
silent fallback to another backend.
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
    "cuda": "distann.kernels.cuda",
}
_ALIASES: dict[str, str] = {"reference": "numpy", "cupy": "cuda", "gpu": "cuda"}


def _unusable(key: str) -> str | None:
    """Why backend ``key`` cannot run in this process (None: it can). Only the GPU backend
    depends on the machine: CuPy, a driver and a device (or Numba's CUDA simulator)."""
    if key != "cuda":
        return None
    from distann.kernels.cuda._device import probe

    return probe()


def available_backends() -> list[str]:
    """Names ``get_backend`` accepts *on this machine* (aliases excluded), e.g.
    ``["cuda", "numba", "numpy"]`` where a GPU is usable, ``["numba", "numpy"]`` elsewhere."""
    return sorted(n for n in _REGISTRY if _unusable(n) is None)


def get_backend(name: str = "numba") -> ModuleType:
    """Return the backend module registered under ``name`` ("numba", "numpy" or its alias
    "reference", "cuda" or its aliases "cupy" / "gpu"). Raises ``ValidationError`` naming the
    allowed values for an unknown name, and saying what is missing for "cuda" on a machine
    where it cannot run (never a silent fallback to the CPU)."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if isinstance(key, str) and key in _REGISTRY:
        reason = _unusable(key)
        if reason is not None:
            raise ValidationError("backend", name, f"the {key} backend cannot run here: {reason}")
        return importlib.import_module(_REGISTRY[key])
    allowed = ", ".join(repr(n) for n in sorted(_REGISTRY) + sorted(_ALIASES))
    raise ValidationError("backend", name, f"unknown backend; must be one of {allowed}")
