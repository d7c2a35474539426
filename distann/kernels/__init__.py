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

__all__ = ["KernelBackend", "available_backends", "backend_status", "check_backend_name", "get_backend",
           "resolve_backend"]

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


def _allowed() -> str:
    return ", ".join(repr(n) for n in sorted(_REGISTRY) + sorted(_ALIASES))


def check_backend_name(name: object, param: str = "backend") -> str:
    """The registered name ``name`` stands for ("gpu" -> "cuda"), checking only the *name*:
    nothing is imported and the machine is not probed (a client without a GPU may send work
    to GPU workers). ``ValidationError`` naming ``param`` and the allowed values otherwise."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(key, str) or key not in _REGISTRY:
        raise ValidationError(param, name, f"unknown backend; must be one of {_allowed()}")
    return key


def resolve_backend(name: object = None) -> str:
    """The backend a call runs on: ``name``, or when None the ``distann.kernels.backend``
    setting (an error then names the setting), checked by :func:`check_backend_name`. The
    result is the registered name, what library code sends to its worker tasks."""
    if name is not None:
        return check_backend_name(name)
    from distann import config

    return check_backend_name(config.get("kernels.backend"), "distann.kernels.backend")


def backend_status(key: str) -> str:
    """"ok" when backend ``key`` can run in this process, else the reason it cannot (what
    ``distann backends`` and the worker check of ``distann.cluster.check_backend`` report)."""
    try:
        reason = _unusable(check_backend_name(key))
    except Exception as exc:  # noqa: BLE001 - a broken GPU stack is reported, not raised
        reason = f"{type(exc).__name__}: {exc}"
    return "ok" if reason is None else reason


def available_backends() -> list[str]:
    """Names ``get_backend`` accepts *on this machine* (aliases excluded), e.g.
    ``["cuda", "numba", "numpy"]`` where a GPU is usable, ``["numba", "numpy"]`` elsewhere."""
    return sorted(n for n in _REGISTRY if _unusable(n) is None)


def get_backend(name: str = "numba") -> ModuleType:
    """Return the backend module registered under ``name`` ("numba", "numpy" or its alias
    "reference", "cuda" or its aliases "cupy" / "gpu"). Raises ``ValidationError`` naming the
    allowed values for an unknown name, and saying what is missing for "cuda" on a machine
    where it cannot run (never a silent fallback to the CPU)."""
    key = check_backend_name(name)
    reason = _unusable(key)
    if reason is not None:
        raise ValidationError("backend", name, f"the {key} backend cannot run here: {reason}")
    return importlib.import_module(_REGISTRY[key])
