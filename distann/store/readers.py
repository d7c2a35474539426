"""Reader leases: a long-lived reader (a search service) keeps the generation it serves.

Retention rule (``docs/FORMAT.md``): a build that commits generation ``N`` deletes an older
generation ``g`` only if ``g < N - 1`` *and* no live reader lease names ``g``. So

* the generation just replaced (``N - 1``) always survives its replacement's commit: a reader
  that opened it before the commit finishes its searches (until the next commit);
* a generation a service still serves survives any number of commits, until the service
  releases its lease (it moved to a newer generation or stopped) or the lease expires
  (``distann.search.reader-lease-seconds`` after its last renewal: a killed service keeps
  nothing forever). The next commit after that deletes it.

A lease is one small JSON file ``readers/g<N>.<token>.json`` holding its expiry time, renewed by a
daemon thread every third of its lifetime. A reader that cannot write to the index location
(read-only credentials) serves without a lease, with a warning: its generation is then only
protected by the ``N - 1`` rule.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from distann import config
from distann.store.location import Location

log = logging.getLogger(__name__)

READERS_DIR = "readers"


def reader_path(generation: int, token: str) -> str:
    return f"{READERS_DIR}/g{generation:06d}.{token}.json"


class ReaderLease:
    """Hold generation ``generation`` of the index at ``loc`` until :meth:`release`."""

    def __init__(self, loc: Location, generation: int, ttl: float | None = None):
        self.loc = loc
        self.generation = generation
        self.ttl = float(config.get("search.reader-lease-seconds") if ttl is None else ttl)
        self.path = reader_path(generation, uuid.uuid4().hex[:16])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._write()
        except OSError as exc:
            log.warning("%s: cannot write a reader lease (%s); generation %d is protected only until the "
                        "second build after it commits", loc.url, exc, generation)
            self.path = None
            return
        self._thread = threading.Thread(target=self._renew, name="distann-reader-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        now = time.time()
        record = {"generation": self.generation, "host": socket.gethostname(), "pid": os.getpid(),
                  "renewed": now, "expires": now + self.ttl}
        self.loc.write_json(self.path, record)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._write()
            except OSError as exc:  # the store is briefly unreachable: try again at the next tick
                log.warning("%s: reader lease renewal failed: %s", self.loc.url, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.path is not None:
            try:
                self.loc.remove(self.path)
            except OSError as exc:
                log.warning("%s: could not remove reader lease %s: %s", self.loc.url, self.path, exc)
            self.path = None


def held_generations(loc: Location, now: float | None = None) -> set[int]:
    """Generations named by a live reader lease at ``loc``; expired lease files are removed."""
    now = time.time() if now is None else now
    held = set()
    for name in loc.list_dir(READERS_DIR):
        rel = f"{READERS_DIR}/{name}"
        try:
            record = json.loads(loc.read_bytes(rel))
            expires, generation = float(record["expires"]), int(record["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours: never delete what cannot be read
        if expires > now:
            held.add(generation)
        else:
            loc.remove(rel)
    return held
