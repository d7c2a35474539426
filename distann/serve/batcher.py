"""Micro-batching: concurrent requests with the same parameters become one coordinator batch.

A request waits at most ``wait`` seconds for others to join its batch (or until the batch holds
``max_batch`` queries); the batch then runs in a worker thread while new requests gather in the
next one, so several batches can be on the cluster at once. ``wait = 0`` switches batching off:
every request is its own batch. Requests only share a batch when everything but their vectors
is equal (k, nprobe, ...: the batch key), and every request has been validated before it
joins, so one bad request cannot fail the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class _Pending:
    vectors: list[np.ndarray] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)
    nq: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    """``await submit(key, params, xq, deadline)`` -> this request's slice of the batch result.

    ``run(params, xq, deadline)`` runs one batch (in a thread) and returns a result whose rows
    :meth:`split` hands back to the requests; ``deadline`` is the earliest of the batch's
    requests (``time.monotonic()`` seconds, or None)."""

    def __init__(self, run: Callable[[Any, np.ndarray, float | None], Any], split: Callable[[Any, list[int]], list],
                 wait: float, max_batch: int, threads: int = 4, on_batch: Callable[[int, int], None] | None = None):
        self.run = run
        self.split = split
        self.wait = float(wait)
        self.max_batch = int(max_batch)
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="distann-batch")
        self._pending: dict[Hashable, _Pending] = {}

    async def submit(self, key: Hashable, params: Any, xq: np.ndarray, deadline: float | None):
        loop = asyncio.get_running_loop()
        if self.wait <= 0 or len(xq) >= self.max_batch:
            return (await self._execute(params, [xq], [deadline]))[0]
        waiter = loop.create_future()
        pending = self._pending.get(key)
        if pending is not None and pending.nq + len(xq) > self.max_batch:
            self._flush(key, params)
            pending = None
        if pending is None:
            pending = self._pending[key] = _Pending()
            pending.timer = loop.call_later(self.wait, self._flush, key, params)
        pending.vectors.append(xq)
        pending.waiters.append(waiter)
        pending.deadlines.append(deadline)
        pending.nq += len(xq)
        if pending.nq >= self.max_batch:
            self._flush(key, params)
        return await waiter

    def _flush(self, key: Hashable, params: Any) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        task = asyncio.ensure_future(self._execute(params, pending.vectors, pending.deadlines))

        def deliver(t: asyncio.Task) -> None:
            for i, waiter in enumerate(pending.waiters):
                if waiter.done():
                    continue
                if t.exception() is not None:
                    waiter.set_exception(t.exception())
                else:
                    waiter.set_result(t.result()[i])

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
