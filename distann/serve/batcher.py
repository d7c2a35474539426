"""Micro-batching: concurrent requests with the same parameters become one coordinator batch.

A request waits at least ``wait`` seconds for others to join its batch (unless the batch fills
up to ``max_batch`` queries first), and longer while ``inflight`` batches already run; the batch
then runs in a worker thread while new requests gather in the next one. ``wait = 0`` switches
batching off: every request is its own batch, started at once. Requests only share a batch when everything but their vectors
is equal (k, nprobe, ...: the batch key), and every request has been validated before it
joins, so one bad request cannot fail the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class _Pending:
    params: Any
    vectors: list[np.ndarray] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)
    nq: int = 0
    due: bool = False
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    """``await submit(key, params, xq, deadline)`` -> this request's slice of the batch result.

    ``run(params, xq, deadline)`` runs one batch (in a thread) and returns a result whose rows
    ``split`` hands back to the requests; ``deadline`` is the earliest of the batch's requests
    (``time.monotonic()`` seconds, or None).

    At most ``inflight`` batches run at once. A batch whose wait is over while they all run
    stays open and keeps gathering requests until one finishes: under load, batches grow to
    what arrives during one batch's round trip instead of queueing many small ones.
    """

    def __init__(self, run: Callable[[Any, np.ndarray, float | None], Any], split: Callable[[Any, list[int]], list],
                 wait: float, max_batch: int, inflight: int = 2, on_batch: Callable[[int, int], None] | None = None):
        self.run = run
        self.split = split
        self.wait = float(wait)
        self.max_batch = int(max_batch)
        self.inflight = int(inflight)
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=max(self.inflight, 8), thread_name_prefix="distann-batch")
        self._open: dict[Hashable, _Pending] = {}
        self._closed: deque[_Pending] = deque()  # full batches waiting for a free slot
        self._running = 0

    async def submit(self, key: Hashable, params: Any, xq: np.ndarray, deadline: float | None):
        if self.wait <= 0:  # no micro-batching: every request is its own batch, right away
            return (await self._execute(params, [xq], [deadline]))[0]
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        pending = self._open.get(key)
        if pending is not None and pending.nq + len(xq) > self.max_batch:
            self._close(key)
            pending = None
        if pending is None:
            pending = self._open[key] = _Pending(params)
            pending.timer = loop.call_later(self.wait, self._due, key)
        pending.vectors.append(xq)
        pending.waiters.append(waiter)
        pending.deadlines.append(deadline)
        pending.nq += len(xq)
        if pending.nq >= self.max_batch:
            self._close(key)
        self._pump()
        return await waiter

    def _due(self, key: Hashable) -> None:
        pending = self._open.get(key)
        if pending is not None:
            pending.due = True
            self._pump()

    def _close(self, key: Hashable) -> None:
        pending = self._open.pop(key)
        if pending.timer is not None:
            pending.timer.cancel()
        self._closed.append(pending)

    def _pump(self) -> None:
        """Start batches while slots are free: full ones first, then open ones whose wait is over."""
        while self._running < self.inflight:
            if self._closed:
                self._start(self._closed.popleft())
                continue
            due = next((k for k, p in self._open.items() if p.due), None)
            if due is None:
                return
            self._close(due)

    def _start(self, pending: _Pending) -> None:
        self._running += 1
        task = asyncio.ensure_future(self._execute(pending.params, pending.vectors, pending.deadlines))

        def deliver(t: asyncio.Task) -> None:
            self._running -= 1
            for i, waiter in enumerate(pending.waiters):
                if waiter.done():
                    continue
                if t.exception() is not None:
                    waiter.set_exception(t.exception())
                else:
                    waiter.set_result(t.result()[i])
            self._pump()

        task.add_done_callback(deliver)

    async def _execute(self, params: Any, vectors: list[np.ndarray], deadlines: list[float | None]) -> list:
        xq = vectors[0] if len(vectors) == 1 else np.concatenate(vectors)
        known = [d for d in deadlines if d is not None]
        deadline = min(known) if known else None
        if self.on_batch is not None:
            self.on_batch(len(vectors), len(xq))
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, self.run, params, xq, deadline)
        return self.split(result, [len(v) for v in vectors])

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
