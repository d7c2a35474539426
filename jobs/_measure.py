"""Measurement helpers shared by the benchmark jobs (not part of the library)."""

from __future__ import annotations

import os
import platform
import threading
import time

import psutil


class TreeMemorySampler:
    """Samples the resident memory of this process and all its descendants (Dask nannies and
    workers of an embedded LocalCluster) every ``interval`` seconds and keeps the peak.

    Reports two sums: RSS (counts shared library pages once per process, so it overstates) and
    PSS (proportional set size: shared pages split between the processes that map them).
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int]:
        procs = [psutil.Process(os.getpid())]
        procs += procs[0].children(recursive=True)
        rss = pss = 0
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self.peak_rss, self.peak_pss = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def drop_file_cache(path: str) -> None:
    """Best effort: ask the kernel to forget the file's cached pages (so reads come from disk)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
