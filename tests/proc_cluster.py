"""A real multi-process Dask cluster for the fault tests: a `dask scheduler` process and
`dask worker` processes (each under its nanny, which restarts a killed worker), started as
subprocesses on loopback so that any of them can be SIGKILLed, and worker plugins that make a
chosen task kill its own worker process (a real SIGKILL, from inside the worker).

Worker processes import this module to unpickle the plugins: they run with the repository
root as their working directory and on their ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from distann.cluster import WORKER_ENV

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port (not tests.conftest's: worker processes import this module, and
    conftest switches Numba to its CUDA simulator on import)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, step: float = 0.1):
    """Poll ``predicate`` until it returns a true value (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


def start_process(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """``args`` in a new process group (so that a test can kill it with its children), its
    stderr to ``log``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as f:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f, cwd=ROOT, start_new_session=True,
                                env={**os.environ, **WORKER_ENV, "PYTHONPATH": path, **(env or {})})


def stop_process(p: subprocess.Popen) -> None:
    """Stop ``p`` and what it started (its process group): SIGTERM, then SIGKILL after 20 s."""
    if p.poll() is None:
        _signal_group(p, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(p, signal.SIGKILL)  # a nanny's worker process may outlive its nanny
    p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


class Scheduler:
    """A `dask scheduler` process on a fixed loopback port (it can be killed and restarted
    there); ``env`` its environment (e.g. ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES``)."""

    def __init__(self, logs: Path, env: dict | None = None):
        self.logs, self.env = logs, env
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = start_process([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                   "--port", str(self.port), "--no-dashboard"], self.logs / "scheduler.log", self.env)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Workers:
    """``n`` `dask worker` processes, each a nanny and its single-threaded worker process, on
    the scheduler at ``address``, and a client of that scheduler."""

    def __init__(self, address: str, logs: Path, n: int = 2, env: dict | None = None, memory_limit: str = "2GiB"):
        from distributed import Client

        self.address, self.n = address, n
        self.procs = [start_process([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                     "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", memory_limit],
                                    logs / f"worker{i}.log", env) for i in range(n)]
        self.client = None
        try:
            self.client = Client(address, timeout=60)
            self.wait_for_workers()
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, int]:
        """Worker address -> pid of its worker process (not the nanny's)."""
        return self.client.run(os.getpid)

    def wait_for_workers(self, timeout: float = 120) -> dict[str, int]:
        """Wait until all ``n`` workers are up (after a kill, until the nanny has restarted one)."""
        def all_up() -> dict[str, int] | None:
            pids = self.pids()
            return pids if len(pids) == self.n else None

        return wait_until(all_up, timeout, f"{self.n} workers on the scheduler", step=0.25)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for p in self.procs:  # one after the other: a worker says goodbye to the scheduler
            stop_process(p)

    def kill(self) -> None:
        """SIGKILL every worker and nanny (e.g. after their scheduler died: nobody to say goodbye to)."""
        for p in self.procs:
            _signal_group(p, signal.SIGKILL)
            p.wait()
        if self.client is not None:
            self.client.close(timeout=5)
            self.client = None


class KillTask(WorkerPlugin):
    """Makes the worker process SIGKILL itself when a task of function ``func`` (the key's
    prefix, e.g. "add_chunk") reaches state ``when`` on it: "executing" (the task has just
    started) or "memory" (it has finished: its outputs are written, its result lives only in
    the doomed process). ``nth``: on the nth such task of that worker process. ``marker``: a
    file created before the kill; while it exists nobody kills again (one kill in all, even
    across the restarted workers the plugin is installed on too). Without a marker, every
    attempt kills: a poison task."""

    def __init__(self, func: str, when: str = "executing", nth: int = 1, marker: str | None = None):
        self.func, self.when, self.nth, self.marker = func, when, nth, marker
        self.seen = 0

    def setup(self, worker) -> None:
        self.seen = 0

    def transition(self, key, start, finish, **kwargs) -> None:
        from dask.utils import key_split

        if finish != self.when or key_split(key) != self.func:
            return
        self.seen += 1
        if self.seen < self.nth:
            return
        if self.marker is not None:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


class SetEnv(WorkerPlugin):
    """Environment variables in every worker process, restarted ones included (distann's
    private fault hooks read them in the tasks)."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def setup(self, worker) -> None:
        os.environ.update(self.env)

    def teardown(self, worker) -> None:
        for name in self.env:
            os.environ.pop(name, None)


class StallTask(WorkerPlugin):
    """Holds up the worker when the ``nth`` task of function ``func`` starts on it (once in
    all: ``marker`` is created then), until the file ``release`` exists or ``timeout`` s pass:
    a job paused at a known point, for a test to kill something there."""

    def __init__(self, func: str, nth: int, marker: str, release: str, timeout: float = 120):
        self.func, self.nth, self.marker, self.release, self.timeout = func, nth, marker, release, timeout
        self.seen = 0

    def setup(self, worker) -> None:
        self.seen = 0

    def transition(self, key, start, finish, **kwargs) -> None:
        from dask.utils import key_split

        if finish != "executing" or key_split(key) != self.func:
            return
        self.seen += 1
        if self.seen < self.nth:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self.release) and time.monotonic() < deadline:
            time.sleep(0.05)
