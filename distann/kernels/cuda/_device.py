"""The device the ``cuda`` backend runs on: whether it is usable, its array module, streams,
pinned host memory and the memory budgets.

Two runtimes share one interface (:class:`Runtime`):

* **CuPy on a CUDA device** (the real one): arrays are ``cupy`` arrays, GEMMs are cuBLAS
  (``cupy.matmul``), sorts and scans are CuPy's, custom kernels are Numba-CUDA kernels launched
  on CuPy's streams (``numba.cuda.external_stream``); host staging buffers are pinned.
* **Numba's CUDA simulator** (``NUMBA_ENABLE_CUDASIM=1``, for machines without a GPU): the
  same Numba-CUDA kernels run in the simulator on NumPy arrays and the library calls are
  NumPy's. Every line of the backend except the CuPy calls themselves runs in this mode, which
  is how CI tests it. It is slow (a Python thread per simulated GPU thread): tiny inputs only.

Nothing here falls back to the CPU: :func:`probe` says why the backend is unusable and
:func:`runtime` raises a ``ValidationError`` with that reason and what to do.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from distann import config
from distann.errors import DeviceMemoryError, ValidationError

SIMULATED_MEMORY = 2 << 30
"""Device memory the simulator pretends to have (budgets are computed from it as on a device)."""


def simulated() -> bool:
    """Whether Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1`` before Numba's import)."""
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


@functools.lru_cache(maxsize=1)
def probe() -> str | None:
    """``None`` when the backend can run here, else why not and what to do (one sentence)."""
    if simulated():
        return None
    try:
        import cupy
    except ImportError as e:
        return (f"CuPy is not installed ({e}); install the GPU extra: pip install 'distann[gpu]' for CUDA 12 "
                "drivers, 'distann[gpu-cu13]' for CUDA 13")
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # CUDARuntimeError: no driver, driver too old, no device
        return (f"CuPy finds no usable CUDA device ({type(e).__name__}: {e}); check the NVIDIA driver "
                f"(nvidia-smi) and CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}")
    if count == 0:
        return (f"no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); run on a machine with an NVIDIA GPU "
                "or use backend 'numba'")
    try:
        from numba import cuda

        if not cuda.is_available():
            return ("Numba cannot use the CUDA driver (numba.cuda.is_available() is False); install "
                    "numba-cuda matching the CUDA version (pip install 'distann[gpu]' or 'distann[gpu-cu13]')")
    except Exception as e:
        return f"Numba's CUDA target failed to load ({type(e).__name__}: {e}); install numba-cuda"
    return None


def check_usable() -> None:
    """Raise ``ValidationError`` naming ``backend`` and the reason when the backend cannot run."""
    reason = probe()
    if reason is not None:
        raise ValidationError("backend", "cuda", f"the cuda backend cannot run here: {reason}")


class Runtime:
    """The array module and device services the kernels use (see the module docstring)."""

    def __init__(self):
        check_usable()
        self.simulated = simulated()
        if self.simulated:
            self.xp = np
            self.name = "Numba CUDA simulator (NumPy arrays)"
            self.total_bytes = SIMULATED_MEMORY
        else:
            import cupy

            self.xp = cupy
            dev = cupy.cuda.Device()
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            self.name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            self.total_bytes = int(dev.mem_info[1])
            self.copy_stream = cupy.cuda.Stream(non_blocking=True)
            self.compute_stream = cupy.cuda.Stream(non_blocking=True)

    # ------------------------------------------------------------------ memory
    def free_bytes(self) -> int:
        if self.simulated:
            return self.total_bytes
        import cupy

        pool = cupy.get_default_memory_pool()
        free, _ = cupy.cuda.Device().mem_info
        return int(free) + int(pool.free_bytes())  # CuPy's pool holds freed blocks for reuse

    def resident_budget(self) -> int:
        """Bytes that lists kept on the device may take (``distann.kernels.cuda.resident-bytes``)."""
        value = config.get("kernels.cuda.resident-bytes")
        return self.total_bytes // 2 if value == "auto" else int(value)

    def work_budget(self) -> int:
        """Bytes of a kernel call's scratch (distance buffers, GEMM blocks, streamed lists):
        ``distann.kernels.cuda.work-bytes``, never more than 3/4 of what the device has free."""
        return max(1 << 20, min(int(config.get("kernels.cuda.work-bytes")), self.free_bytes() * 3 // 4))

    # ------------------------------------------------------------------ arrays
    def to_device(self, a: np.ndarray, stream=None):
        """A device copy of host array ``a`` (asynchronous on ``stream`` when ``a`` is pinned)."""
        if self.simulated:
            return np.array(a, copy=True)
        with _oom_as_error("copying", a.nbytes):
            out = self.xp.empty(a.shape, dtype=a.dtype)
            out.set(a, stream=stream)
            return out

    def to_host(self, a) -> np.ndarray:
        if self.simulated:
            return np.asarray(a)
        return self.xp.asnumpy(a, stream=self.compute_stream)

    def empty(self, shape, dtype):
        with _oom_as_error("allocating", int(np.prod(shape)) * np.dtype(dtype).itemsize):
            return self.xp.empty(shape, dtype=dtype)

    def full(self, shape, value, dtype):
        with _oom_as_error("allocating", int(np.prod(shape)) * np.dtype(dtype).itemsize):
            return self.xp.full(shape, value, dtype=dtype)

    def pinned(self, shape, dtype) -> np.ndarray:
        """A host array in page-locked memory (plain memory in the simulator)."""
        if self.simulated:
            return np.empty(shape, dtype=dtype)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mem = self.xp.cuda.alloc_pinned_memory(max(1, nbytes))
        return np.frombuffer(mem, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def kernel_stream(self):
        """The stream Numba kernels are launched on (CuPy's compute stream)."""
        if self.simulated:
            return 0
        from numba import cuda

        return cuda.external_stream(self.compute_stream.ptr)

    def compute(self):
        """Context making CuPy calls run on the compute stream."""
        if self.simulated:
            return _Null()
        return self.compute_stream

    def scatter_add(self, target, rows, values) -> None:
        """``target[rows] += values`` with repeated rows summed (``cupyx.scatter_add`` / ``np.add.at``)."""
        if self.simulated:
            np.add.at(target, rows, values)
        else:
            import cupyx

            cupyx.scatter_add(target, rows, values)

    @property
    def max_grid(self) -> int:
        """Blocks launched at most; kernels loop over their work items (grid-stride)."""
        return 4 if self.simulated else 65535

    @property
    def tile_pairs(self) -> int:
        """Pairs a Flat / SQ tile (``_distances.TQ`` on a device; 2 in the simulator, where each
        accumulator costs Python time and several tiles per list still run)."""
        from distann.kernels.cuda._distances import TQ

        return 2 if self.simulated else TQ

    def threads(self, wanted: int) -> int:
        """Threads per block: as asked on a device, 4 in the simulator (a Python thread each)."""
        return 4 if self.simulated else wanted


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _oom_as_error:
    """Turn CuPy's OutOfMemoryError into a DeviceMemoryError saying what to lower."""

    def __init__(self, what: str, nbytes: int):
        self.what, self.nbytes = what, nbytes

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and exc_type.__name__ == "OutOfMemoryError":
            raise DeviceMemoryError(
                f"the GPU ran out of memory {self.what} {self.nbytes / 2**20:.1f} MiB ({exc}); other processes may "
                "hold device memory (nvidia-smi); lower distann.kernels.cuda.work-bytes and "
                "distann.kernels.cuda.resident-bytes, or search in smaller batches (distann.search.batch-size)") from exc
        return False


@functools.lru_cache(maxsize=1)
def runtime() -> Runtime:
    """The process's runtime (created on first use; raises ``ValidationError`` when unusable)."""
    return Runtime()


def device_info() -> dict:
    """What ``distann info``-style reports show about the device."""
    rt = runtime()
    return {"device": rt.name, "simulated": rt.simulated, "total_bytes": rt.total_bytes,
            "resident_budget": rt.resident_budget(), "work_budget": rt.work_budget()}
