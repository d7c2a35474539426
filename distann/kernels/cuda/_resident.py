"""Lists on the device: which host arrays stay resident in GPU memory, and the list-major
streaming of the others from pinned host memory.

The kernel interface takes host arrays. A resident index (``Index.load()``, a worker-resident
shard, a big-batch list range) hands the *same* array objects to every call, so the backend
keeps a device copy of such an array (:class:`DeviceCache`, keyed by the host array, LRU within
``distann.kernels.cuda.resident-bytes``) from its second use on. A first use, an array that
does not fit the budget, or a block fetched for one batch goes through :func:`list_chunks`
instead: the batch's *probed* lists only, in runs of consecutive lists of at most a quarter of
the work budget, gathered into a pinned staging buffer and copied to the device on a copy
stream while the previous run is scanned on the compute stream (two staging and two device
buffers alternate). Each probed list crosses PCIe once per batch.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from distann import config
from distann.errors import DeviceMemoryError


class DeviceCache:
    """Device copies of host arrays, LRU within a byte budget; an entry dies with its host array."""

    def __init__(self):
        self._entries: OrderedDict[int, tuple[weakref.ref, object, int]] = OrderedDict()
        self._seen: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()
        self.nbytes = 0

    @staticmethod
    def _key(a: np.ndarray) -> int:
        return id(a)

    def _drop_dead(self) -> None:
        for key in [k for k, (ref, _, _) in self._entries.items() if ref() is None]:
            self.nbytes -= self._entries.pop(key)[2]
        for key in [k for k, ref in self._seen.items() if ref() is None]:
            del self._seen[key]

    def lookup(self, a: np.ndarray):
        """The device copy of ``a`` if resident, else None."""
        with self._lock:
            self._drop_dead()
            key = self._key(a)
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is a:
                self._entries.move_to_end(key)
                return hit[1]
            return None

    def admit(self, rt, a: np.ndarray, budget: int, *, first_use_ok: bool = False):
        """Make ``a`` resident if it was seen before (or ``first_use_ok``) and fits ``budget``,
        evicting the least recently used entries; returns the device copy or None."""
        with self._lock:
            key = self._key(a)
            seen = self._seen.get(key)
            if not first_use_ok and (seen is None or seen() is not a):
                try:
                    self._seen[key] = weakref.ref(a)
                except TypeError:  # not weak-referenceable: never resident
                    pass
                return None
            if a.nbytes > budget:
                return None
            while self._entries and self.nbytes + a.nbytes > budget:
                self.nbytes -= self._entries.popitem(last=False)[1][2]
            try:
                ref = weakref.ref(a)
            except TypeError:
                return None
            dev = rt.to_device(np.ascontiguousarray(a))
            self._entries[key] = (ref, dev, int(a.nbytes))
            self.nbytes += int(a.nbytes)
            return dev

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self.nbytes = 0


CACHE = DeviceCache()


@dataclass
class ListChunk:
    """Lists ``j0:j1`` of a batch on the device: row ``r`` of list ``j`` is row
    ``list_lo[j - j0] + r`` of ``arrays[i]`` (each a device array of the batch's row arrays)."""

    j0: int
    j1: int
    list_lo: np.ndarray
    arrays: list
    ready: object = None  # the copy's event (streamed runs on a device)


def resident_arrays(rt, arrays: list[np.ndarray]):
    """Device copies of all ``arrays`` if they are (or now become) resident, else None."""
    budget = rt.resident_budget()
    devs = [CACHE.lookup(a) for a in arrays]
    if all(d is not None for d in devs):
        return devs
    total = sum(a.nbytes for a in arrays)
    stream = bool(config.get("kernels.cuda.stream"))
    if total > budget and not stream:
        raise DeviceMemoryError(
            f"the lists of this call take {total / 2**20:.1f} MiB, more than the resident budget "
            f"distann.kernels.cuda.resident-bytes = {budget / 2**20:.1f} MiB, and streaming is disabled "
            "(distann.kernels.cuda.stream = False); enable streaming, raise the budget, or use smaller shards")
    devs = [d if d is not None else CACHE.admit(rt, a, budget, first_use_ok=not stream)
            for a, d in zip(arrays, devs)]
    return devs if all(d is not None for d in devs) else None


def list_chunks(rt, arrays: list[np.ndarray], transient: list[np.ndarray], list_offsets: np.ndarray,
                probed: np.ndarray):
    """The probed lists (``probed``: bool per list) of a batch on the device, as consecutive
    :class:`ListChunk` runs: the whole arrays when ``arrays`` are resident (``transient`` row
    arrays, such as a call's filter mask, are then copied whole), else all of them streamed (see
    the module docstring). Chunk arrays: ``arrays`` then ``transient``, all of equal length."""
    nl = len(list_offsets) - 1
    devs = resident_arrays(rt, arrays)
    if devs is not None:
        yield ListChunk(0, nl, np.ascontiguousarray(list_offsets[:-1]), devs + [rt.to_device(a) for a in transient])
        return
    arrays = arrays + transient
    row_bytes = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in arrays)
    cap_rows = max(1, rt.work_budget() // 4 // max(1, row_bytes))
    sizes = np.diff(list_offsets)
    runs, j = [], 0
    while j < nl:
        if not probed[j]:
            j += 1
            continue
        j0, rows = j, 0
        while j < nl and (j == j0 or rows + sizes[j] <= cap_rows):
            rows += int(sizes[j]) if probed[j] else 0
            j += 1
        runs.append((j0, j))
    yield from _stream(rt, arrays, list_offsets, probed, runs)


def _stream(rt, arrays, list_offsets, probed, runs):
    """Copy each run's probed lists to the device: run n + 1 is gathered and its copy issued on
    the copy stream before run n is handed out, so the copy overlaps run n's kernels (two
    staging buffers and two device copies alive at a time)."""
    staging: list[list[np.ndarray] | None] = [None, None]
    events: list = [None, None]

    def issue(n: int) -> ListChunk:
        j0, j1 = runs[n]
        sizes = np.where(probed[j0:j1], np.diff(list_offsets[j0:j1 + 1]), 0)
        lo = np.zeros(j1 - j0, dtype=np.int64)
        np.cumsum(sizes[:-1], out=lo[1:])
        rows = int(sizes.sum())
        slot = n % 2
        if events[slot] is not None:
            events[slot].synchronize()  # the copy that last read this staging buffer is done
        buf = staging[slot]
        if buf is None or len(buf[0]) < rows:
            buf = staging[slot] = [rt.pinned((max(rows, 1),) + a.shape[1:], a.dtype) for a in arrays]
        for j in np.flatnonzero(sizes):
            a0, a1 = int(list_offsets[j0 + j]), int(list_offsets[j0 + j + 1])
            for host, b in zip(arrays, buf):
                b[lo[j]:lo[j] + (a1 - a0)] = host[a0:a1]
        devs, events[slot] = _upload(rt, [b[:rows] for b in buf])
        return ListChunk(j0, j1, lo, devs, events[slot])

    nxt = issue(0) if runs else None
    for n in range(len(runs)):
        current = nxt
        nxt = issue(n + 1) if n + 1 < len(runs) else None
        if current.ready is not None:
            rt.compute_stream.wait_event(current.ready)  # this run's kernels start after its copy
        yield current


def _upload(rt, parts: list[np.ndarray]):
    """Device copies of pinned ``parts`` on the copy stream, and the event marking their end."""
    if rt.simulated:
        return [np.array(p, copy=True) for p in parts], None
    with rt.copy_stream:
        devs = [rt.to_device(p, stream=rt.copy_stream) for p in parts]
    return devs, rt.copy_stream.record()
