"""The generation a service answers from, and the switch to a newer one without downtime.

Every batch takes the current index for its whole duration (:meth:`IndexHolder.use`), so an
answer never mixes generations. :meth:`IndexHolder.reload` opens the newly committed
generation on the cluster and waits until all its shards are resident while the old one keeps
answering; it then swaps them in one step. The old generation's shards are dropped (and its
reader lease released) once the last batch using it has finished.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from distann.store.location import Location
from distann.store.manifest import read_manifest

log = logging.getLogger(__name__)


class IndexHolder:
    """Holds the served :class:`~distann.search.distributed.DistributedIndex`.

    ``open_generation(loc)`` opens the index currently committed at ``loc`` (resident)."""

    def __init__(self, loc: Location, open_generation: Callable[[Location], Any]):
        self.loc = loc
        self._open = open_generation
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._users: dict[int, int] = {}
        self._retired: dict[int, Any] = {}
        self.current = open_generation(loc)
        self.reloads = 0

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        with self._lock:
            index = self.current
            self._users[id(index)] = self._users.get(id(index), 0) + 1
        try:
            yield index
        finally:
            with self._lock:
                self._users[id(index)] -= 1
                done = self._users[id(index)] == 0 and id(index) in self._retired
                if self._users[id(index)] == 0:
                    del self._users[id(index)]
            if done:
                self._close(self._retired.pop(id(index)))

    def committed_generation(self) -> int:
        return read_manifest(self.loc).generation

    def reload(self) -> dict[str, Any]:
        """Switch to the committed generation if it is newer than the served one; returns
        ``{"generation": ..., "previous": ..., "reloaded": bool}``."""
        with self._reload_lock:
            previous = self.current.generation
            if self.committed_generation() <= previous:
                return {"generation": previous, "previous": previous, "reloaded": False}
            fresh = self._open(self.loc)  # resident before it answers anything
            with self._lock:
                old, self.current = self.current, fresh
                idle = id(old) not in self._users
                if not idle:
                    self._retired[id(old)] = old
            if idle:
                self._close(old)
            self.reloads += 1
            log.info("%s: now serving generation %d (was %d)", self.loc.url, fresh.generation, previous)
            return {"generation": fresh.generation, "previous": previous, "reloaded": True}

    @staticmethod
    def _close(index: Any) -> None:
        try:
            index.close()
        except Exception as exc:  # noqa: BLE001 - a cluster going away must not fail a request
            log.warning("closing generation %s: %s", getattr(index, "generation", "?"), exc)

    def close(self) -> None:
        with self._lock:
            everything = [self.current, *self._retired.values()]
            self._retired.clear()
        for index in everything:
            self._close(index)
