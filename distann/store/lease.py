"""Generation leases: exactly one build at a time owns the next generation of an index URL.

A build that will write generation ``N`` first creates the lease object
``leases/g<N>.<attempt>.json`` (attempt 1, 2, ...) with an exclusive create
(:meth:`Location.create_exclusive`: a link on local disks, a conditional PUT on object stores),
so of two builds racing for the same name exactly one succeeds. The record names its owner
(host, process, start time) and is renewed by a heartbeat thread every ``ttl / 3`` seconds.

A lease whose attempt file exists is *live* while its state is ``active`` and

* its process is alive, when the owner ran on this host (a killed build is stale at once);
* it was renewed less than ``ttl`` seconds ago, when the owner ran on another host (clocks
  must agree to well within ``ttl``).

A build finding a live lease fails with :class:`~distann.errors.BuildConflictError`. A stale,
released or committed lease is taken over by creating the next attempt, again exclusively, so
two builds taking over the same stale lease cannot both win. The owner notices a takeover
(the next attempt exists) at each renewal and before it commits, and then stops with a
conflict instead of committing. The layout is documented in ``docs/FORMAT.md``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

import psutil

from distann.errors import BuildConflictError
from distann.store.location import Location

log = logging.getLogger(__name__)

LEASE_DIR = "leases"
_MAX_ATTEMPTS = 10_000


def lease_path(generation: int, attempt: int) -> str:
    return f"{LEASE_DIR}/g{generation:06d}.{attempt:06d}.json"


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """The content of one lease attempt file."""

    owner: str
    host: str
    pid: int
    pid_started: float
    acquired: float
    renewed: float
    ttl: float
    state: str  # "active", "released" (ended without a commit) or "committed"
    what: str  # what the owner is doing, for the conflict message

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    def is_live(self, now: float) -> bool:
        if self.state != "active":
            return False
        if self.host == socket.gethostname():
            started = _process_started(self.pid)
            return started is not None and abs(started - self.pid_started) < 1.0
        return now - self.renewed < self.ttl

    def describe(self, now: float) -> str:
        return (f"{self.what}, by process {self.pid} on {self.host}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.acquired))}, "
                f"renewed {now - self.renewed:.0f} s ago")


class GenerationLease:
    """Ownership of generation ``generation`` of the index at ``loc``; see the module docstring.

    Use :meth:`acquire`, then as a context manager: the heartbeat runs inside the ``with``
    block and the lease is released on the way out (``committed`` after :meth:`commit`).
    """

    def __init__(self, loc: Location, generation: int, attempt: int, record: LeaseRecord):
        self.loc = loc
        self.generation = generation
        self.attempt = attempt
        self.record = record
        self.lost_to: LeaseRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return lease_path(self.generation, self.attempt)

    @classmethod
    def acquire(cls, loc: Location, generation: int, ttl: float, what: str) -> GenerationLease:
        """Claim the generation, taking over a stale lease; BuildConflictError if a live one holds it."""
        now = time.time()
        pid = os.getpid()
        record = LeaseRecord(owner=uuid.uuid4().hex, host=socket.gethostname(), pid=pid,
                             pid_started=_process_started(pid) or now, acquired=now, renewed=now, ttl=float(ttl),
                             state="active", what=what)
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            path = lease_path(generation, attempt)
            if loc.create_exclusive(path, record.to_bytes()):
                if attempt > 1:
                    log.info("%s: took over the lease of generation %d (attempt %d)", loc.url, generation, attempt)
                return cls(loc, generation, attempt, record)
            holder = _read(loc, path)
            if holder is not None and holder.is_live(time.time()):
                raise BuildConflictError(
                    f"{loc.url}: another build owns generation {generation} of this index ({holder.describe(time.time())}); "
                    f"wait for it to finish, or rerun once it has stopped (a lease from another host expires "
                    f"{holder.ttl:.0f} s after its last renewal)")
        raise BuildConflictError(f"{loc.url}: generation {generation} has {_MAX_ATTEMPTS} lease attempts; "
                                 f"remove {LEASE_DIR}/ of this index if no build is running")

    # ------------------------------------------------------------------ while building
    def __enter__(self) -> GenerationLease:
        self._thread = threading.Thread(target=self._heartbeat, name="distann-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.record.state == "active":
            self._write("released")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.record.ttl / 3):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - retried at the next beat; the commit re-checks ownership
                log.warning("%s: could not renew the build lease (%s)", self.loc.url, exc)

    def renew(self) -> None:
        if not self._taken_over():
            self._write("active")

    def _taken_over(self) -> bool:
        if self.lost_to is None:
            nxt = _read(self.loc, lease_path(self.generation, self.attempt + 1))
            if nxt is not None:
                self.lost_to = nxt
        return self.lost_to is not None

    def check(self) -> None:
        """Raise BuildConflictError if another build took this lease over."""
        if self._taken_over():
            assert self.lost_to is not None
            raise BuildConflictError(
                f"{self.loc.url}: this build lost generation {self.generation} to another build "
                f"({self.lost_to.describe(time.time())}) after not renewing its lease for {self.record.ttl:.0f} s; "
                "nothing was committed")

    def commit(self) -> None:
        """Mark the generation committed (call right after the manifest write)."""
        self._write("committed")

    def _write(self, state: str) -> None:
        with self._lock:
            if self.lost_to is not None:
                return
            self.record = replace(self.record, state=state, renewed=time.time())
            self.loc.write_bytes(self.path, self.record.to_bytes())


def _read(loc: Location, path: str) -> LeaseRecord | None:
    """The lease at ``path``; None if there is none. An unreadable record counts as stale."""
    try:
        raw = loc.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        return LeaseRecord(**json.loads(raw))
    except (ValueError, TypeError):
        return LeaseRecord(owner="?", host="?", pid=-1, pid_started=0.0, acquired=0.0, renewed=0.0, ttl=0.0,
                           state="unreadable", what="unreadable lease")


def remove_older(loc: Location, generation: int) -> None:
    """Remove the lease files of generations before ``generation`` (after a commit)."""
    for name in loc.list_dir(LEASE_DIR):
        gen = name[1:7]
        if name.startswith("g") and gen.isdigit() and int(gen) < generation:
            loc.remove(f"{LEASE_DIR}/{name}")
