"""The thread pool of the Numba CPU backend.

The kernels release the GIL (``nogil=True``) and are run on a small thread pool, one part per
thread: ``_parallel`` runs part 0 in the calling thread and the others on the pool, which is
created on first use (and anew in a forked child). Numba's ``parallel=True`` would do the same
work but multiplies compile time: every prange body re-optimizes and re-generates the whole
call tree it inlines. How many parts a call gets is decided by the Python wrappers in
``distann.kernels.numba_cpu`` (``_nthreads``, ``_SERIAL_WORK``), not here.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's kernel thread pool, created on first use (and anew in a forked child,
    whose copy of the parent's pool has no threads)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1)),
                                       thread_name_prefix="distann-kernels")
            _POOL_PID = os.getpid()
        return _POOL


def _parallel(fn, nparts: int, *args) -> None:
    """Run ``fn(p, nparts, *args)`` for p in range(nparts): part 0 in the calling thread, the
    others on the pool. ``fn`` must be a nogil kernel writing disjoint outputs."""
    if nparts <= 1:
        fn(0, 1, *args)
        return
    futures = [_pool().submit(fn, p, nparts, *args) for p in range(1, nparts)]
    try:
        fn(0, nparts, *args)
    finally:
        for f in futures:
            f.result()
