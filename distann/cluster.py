"""The Dask utilities every job uses: getting a client (join a running cluster or start an
embedded LocalCluster), waiting on tasks with a progress bar, and tree reductions on the workers.

The embedded cluster runs one single-threaded worker process per core (numeric work in
NumPy/Numba releases the GIL only partly; processes scale cleanly) and binds to loopback:
Dask runs arbitrary code for whoever reaches the scheduler port. Its workers log at the level
of the client's ``distributed`` logger (the CLI sets it), and do not repeat the failures of
distann's tasks, which the client reports itself.

Worker processes are started with ``spawn``: they re-import the main script, so a script that
starts the embedded cluster must do so under ``if __name__ == "__main__":``. A worker that
finds itself re-running such a call stops at once and tells the client, which raises one clear
error instead of Dask's pages of "Nanny failed to start".
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from distann import config
from distann.errors import DistannError, SchedulerLostError, ValidationError, WorkerKilledError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

log = logging.getLogger(__name__)

#: environment of embedded worker processes: one compute thread each (Dask already sets the
#: BLAS variables; Numba's kernels would otherwise start one thread per core in every worker)
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: Dask settings of the embedded cluster (a user's own cluster keeps its own):
#: - no memory pause: a worker whose memory stays between the pause (80 %) and kill (95 %)
#:   fractions after a task would take no further task and the job would wait forever; without
#:   the pause it goes on, and a task that really needs too much memory is killed by the nanny,
#:   retried, then reported naming the setting to lower (WorkerKilledError);
#: - worker-saturation 1.0: one task at a time on a one-thread worker, so that a worker's death
#:   makes only the task it was running suspect, and a poison task is the one named.
EMBEDDED_DASK_CONFIG = {"distributed.worker.memory.pause": False,
                        "distributed.scheduler.worker-saturation": 1.0}

#: more embedded worker processes than this many per core are refused (they only thrash)
MAX_WORKERS_PER_CORE = 4

_GUARD_HINT = ('put the code that calls distann under `if __name__ == "__main__":` — the embedded Dask '
               "cluster starts worker processes that re-import the main script")


def check_cluster_args(workers: object = None, scheduler: object = None, client: object = None) -> None:
    """Validate how a job gets its cluster (before anything starts)."""
    if client is None and scheduler is None:
        _stop_if_bootstrapping()
    if client is not None and (workers is not None or scheduler is not None):
        raise ValidationError("client", client, "give either client or workers/scheduler, not both")
    if workers is not None and scheduler is not None:
        raise ValidationError("scheduler", scheduler, "give either workers (a local cluster) or scheduler, not both")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler):
        raise ValidationError("scheduler", scheduler, "the address of a Dask scheduler, e.g. tcp://host:8786")
    if workers is None:
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValidationError("workers", workers, "a positive integer (worker processes) or None for one per core")
    cores = os.cpu_count() or 1
    if workers > MAX_WORKERS_PER_CORE * cores:
        raise ValidationError("workers", workers, f"at most {MAX_WORKERS_PER_CORE * cores} local worker processes "
                              f"on this machine's {cores} cores (more only thrash); use a cluster (scheduler) "
                              "for more workers")


def _bootstrap_report() -> str:
    """Where a worker process that re-ran the main script leaves word for its parent."""
    return os.path.join(tempfile.gettempdir(), f"distann-bootstrap-{os.getppid()}")


def _stop_if_bootstrapping() -> None:
    """In a worker process still importing the main script (no ``__main__`` guard): leave word
    for the parent and stop, before this process starts a cluster of its own."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        with open(_bootstrap_report(), "w") as f:
            f.write(_GUARD_HINT)
        os._exit(3)


class _QuietTaskEnds(logging.Filter):
    """Drops, in an embedded cluster's worker, the report of a failed task ("Compute Failed":
    the client raises the task's error itself), of the tasks cancelled when the client stops the
    cluster early, and of a heartbeat that found the scheduler gone: the scheduler lives in the
    driver's process and closes first when the job ends, so a worker's heartbeat in that moment
    logs a traceback about nothing (it made the quickstart print one, now and then)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Compute Failed")
                    or msg.startswith("Failed to communicate with scheduler during heartbeat")
                    or (msg.startswith("Async instruction for") and "CancelledError" in record.getMessage()))


def _quiet_worker_logs(dask_worker=None) -> None:
    for name in ("distributed.worker", "distributed.worker.state_machine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietTaskEnds) for f in logger.filters):
            logger.addFilter(_QuietTaskEnds())


def _connect(scheduler: str) -> Client:
    from distributed import Client

    timeout = config.get("cluster.connect-timeout")
    try:
        return Client(scheduler, timeout=timeout)
    except TypeError as exc:
        if "ssl_context" not in str(exc):
            raise
        # a tls:// scheduler and no TLS settings: Dask's Security comes from its config
        raise ValidationError("scheduler", scheduler, "a scheduler this client has TLS settings for: set the Dask "
                              "config distributed.comm.tls.ca-file, .client.cert and .client.key (e.g. "
                              "DASK_DISTRIBUTED__COMM__TLS__CA_FILE=ca.pem, ..._TLS__CLIENT__CERT, "
                              "..._TLS__CLIENT__KEY)") from None
    except (OSError, TimeoutError):
        raise ValidationError("scheduler", scheduler, f"a reachable Dask scheduler: none answered at this address "
                              f"within {timeout} s (distann.cluster.connect-timeout)") from None


def _start_local(n: int, memory_limit: str | None):
    import dask
    from distributed import LocalCluster

    level = logging.getLogger("distributed").getEffectiveLevel()
    report = os.path.join(tempfile.gettempdir(), f"distann-bootstrap-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(report)
    try:
        with dask.config.set(EMBEDDED_DASK_CONFIG):  # read by the scheduler and the nannies as they start
            return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                dashboard_address="127.0.0.1:0", memory_limit=memory_limit, env=WORKER_ENV,
                                silence_logs=level if level <= logging.DEBUG else max(level, logging.WARNING))
    except Exception as exc:
        if os.path.exists(report):
            os.remove(report)
            raise DistannError(f"the embedded Dask cluster could not start its workers: {_GUARD_HINT}") from None
        raise DistannError(f"the embedded Dask cluster could not start: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def client_context(workers: int | None = None, scheduler: str | None = None,
                   client=None, memory_limit: str | None = "auto") -> Iterator[Client]:
    """Yield a ``distributed.Client``.

    ``client`` given: yield it unchanged (the caller owns it). ``scheduler`` given: connect to
    that address and close only the connection. Otherwise start a LocalCluster with
    ``workers`` processes (default: one per core), yield, and shut it down.
    """
    check_cluster_args(workers, scheduler, client)
    if client is not None:
        yield client
        return
    if scheduler is not None:
        with _connect(scheduler) as c:
            log.info("joined Dask scheduler %s (dashboard: %s)", scheduler, c.dashboard_link)
            yield c
        return
    from distributed import Client

    cores = os.cpu_count() or 1
    n = workers or cores
    if n > cores:
        log.warning("%d worker processes on %d cores: they will compete for the cores", n, cores)
    with _start_local(n, memory_limit) as cluster, Client(cluster) as c:
        c.register_worker_callbacks(_quiet_worker_logs)
        log.info("started local Dask cluster: %d worker process(es); dashboard: %s", n, c.dashboard_link)
        yield c


def check_reachable(client, loc, loc_param: str, marker: str, sources: dict) -> None:
    """Every worker must reach ``loc`` (see its file ``marker``) and read each of ``sources``
    (``{param: source or None}``) as the client does: memory:// lives in one process, and a
    local path must be on a filesystem the workers share. Errors name the parameter."""
    from distann.sources.memory import ArrayIdSource, ArraySource

    pids = set(client.run(os.getpid).values())
    if pids != {os.getpid()}:
        if loc.is_process_local:
            raise ValidationError(loc_param, loc.url, "a path or URL every worker process can reach "
                                  "(memory:// exists only in one process; use a threads-only cluster for it)")
        for param, source in sources.items():
            if str(getattr(source, "url", "")).startswith("memory://"):
                raise ValidationError(param, source.url, "a path or URL every worker process can reach "
                                      "(memory:// exists only in one process)")
    blind = sorted(w for w, seen in client.run(loc.exists, marker).items() if not seen)
    if blind:
        raise ValidationError(loc_param, loc.url, f"a location every worker can reach; worker(s) {', '.join(blind)} "
                              "do not see it (a local path must be on a filesystem shared with the workers; "
                              "or use an object store URL)")
    for param, source in sources.items():
        if source is None or isinstance(source, (ArraySource, ArrayIdSource)):  # the data travel with the tasks
            continue
        failed = {w: r for w, r in client.run(_can_read, source).items() if r}
        if failed:
            w, reason = sorted(failed.items())[0]
            raise ValidationError(param, source.url, f"a source every worker can read; {len(failed)} worker(s) "
                                  f"cannot, e.g. {w}: {reason}")


def check_backend(client, name, param: str = "backend") -> str:
    """Every worker of ``client`` must be able to run kernel backend ``name`` (None: the
    ``distann.kernels.backend`` setting); returns the registered name to send to the tasks.

    Checked before any task is scheduled, because the client is not the machine that counts:
    a client without a GPU may drive GPU workers, and a CPU worker must not be handed cuda
    work. The failing workers are named with the reason; there is no fallback to another
    backend. A cluster with no worker yet is not checked (its tasks wait for workers)."""
    from distann.kernels import backend_status, check_backend_name, resolve_backend

    key = resolve_backend(None) if name is None else check_backend_name(name, param)
    status = client.run(backend_status, key)
    failed = {w: r for w, r in status.items() if r != "ok"}
    if failed:
        by_reason: dict[str, list[str]] = {}
        for w, r in sorted(failed.items()):
            by_reason.setdefault(r, []).append(w)
        what = "; ".join(f"{', '.join(ws)}: {r}" for r, ws in by_reason.items())
        hint = ("start GPU workers (dask cuda worker / LocalCUDACluster) or use backend 'numba'" if key == "cuda"
                else "install distann's dependencies on every worker")
        raise ValidationError(param, name if name is not None else key,
                              f"the {key} backend cannot run on {len(failed)} of {len(status)} worker(s) {what}; "
                              f"{hint}")
    return key


def _can_read(source) -> str:
    """'' if this process can read the first row of ``source``, else why not."""
    try:
        source.read_rows(0, 1) if hasattr(source, "read_rows") else source.read(0, 1)
    except Exception as exc:  # noqa: BLE001 - reported to the client as the reason
        return f"{type(exc).__name__}: {exc}"
    return ""


# --------------------------------------------------------------------------- tasks that kill their workers

class TaskNames:
    """What each task of a job is (its stage and its piece of work: "chunk c000003", "shard
    s000001", "list range r00002"), so that a task whose workers keep dying is reported by name,
    and a lost scheduler by the stage it was lost in.

    Dask retries a task whose worker process died while running it (a SIGKILL, the OOM killer,
    a crash in native code) on another worker, and gives up after
    ``distributed.scheduler.allowed-failures`` deaths with a bare ``KilledWorker`` naming only
    the task's key. ``translate()`` turns that into a WorkerKilledError naming the job, the
    stage, the piece of work, the setting and what stays unchanged; tasks never named (the
    k-means blocks, reductions) are named by their function and the stage running them.
    Losing the scheduler cancels every future ("cancelled for reason: unknown"); with
    ``client`` given, that becomes a SchedulerLostError saying the job can be rerun."""

    def __init__(self, job: str, unchanged: str):
        self.job = job
        self.unchanged = unchanged
        self.stage = "setup"
        self.hint = ""
        self._names: dict = {}

    def enter(self, stage: str, hint: str = "") -> None:
        """Tasks submitted from now on belong to ``stage``; ``hint``: the setting that bounds a
        task's memory in this stage, named in the error (a worker killed for memory)."""
        self.stage, self.hint = stage, hint

    def name(self, futures: list, names) -> list:
        """Record what each of ``futures`` is (``names``, in order); returns ``futures``."""
        for fut, what in zip(futures, names):
            self._names[fut.key] = (self.stage, what, self.hint)
        return futures

    @contextlib.contextmanager
    def translate(self, client=None) -> Iterator["TaskNames"]:
        from concurrent.futures import CancelledError

        from distributed import KilledWorker

        try:
            yield self
        except KilledWorker as exc:
            raise self.error(exc) from exc
        except CancelledError as exc:
            if client is None or client.status == "running":
                raise
            address = getattr(client.scheduler, "address", None) or "(unknown address)"
            raise SchedulerLostError(
                f"{self.job}: lost the Dask scheduler {address} in the {self.stage} stage (it stopped answering "
                f"and did not come back within distributed.comm.timeouts.connect). {self.unchanged}") from exc

    def error(self, exc) -> WorkerKilledError:
        from dask.utils import key_split

        key = exc.task
        stage, what, hint = self._names.get(key, (self.stage, f"{key_split(key)} task", self.hint))
        last = getattr(exc.last_worker, "address", exc.last_worker)
        tries = exc.allowed_failures + 1
        return WorkerKilledError(
            f"{self.job}: the {stage} stage's {what} (Dask task {key}) was given to {tries} worker process(es) "
            f"in turn and each died before finishing it (killed by the operating system, its nanny or a signal: "
            f"out of memory, a crash in native code); Dask gives up after distributed.scheduler.allowed-failures = "
            f"{exc.allowed_failures} retries. {self.unchanged}. The last worker was {last}: see its log"
            + (f"; if the workers ran out of memory, lower {hint}" if hint else ""), stage, what, str(key))


# --------------------------------------------------------------------------- working with futures

def broadcast(client, data):
    """Make ``data`` available to the tasks of this job; returns its future.

    A task that returns ``data`` (its argument), not ``client.scatter``: scattered data has no
    lineage, and Dask's Active Memory Manager (on by default) drops all but one of its copies
    once no task waits for it. When the worker holding that last copy dies, the key is gone
    and every task depending on it is cancelled ("lost dependencies") instead of retried. The
    task's argument stays on the scheduler, so Dask recomputes a lost copy like any other
    result; the first worker to run it serves it to the others. Each call is its own key
    (``pure=False``): two jobs broadcasting equal data never share one."""
    import dask

    try:
        client.wait_for_workers(1, timeout=config.get("cluster.connect-timeout"))
    except TimeoutError:
        raise DistannError(f"no Dask worker is connected to the scheduler {client.scheduler.address} (none joined "
                           "within distann.cluster.connect-timeout); start workers (dask worker ADDRESS) and "
                           "rerun") from None
    # the data is this one-task graph's argument on purpose: no "Sending large graph" warning
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": 2**62}):
        return client.submit(_broadcast_value, data, pure=False)


def _broadcast_value(data):
    return data


def tree_reduce(client, futures: list, fn, fan_in: int = 2):
    """Reduce futures pairwise on the workers with ``fn``; returns one future (nothing
    reaches the client but the final result, when the caller asks for it)."""
    level = list(futures)
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), fan_in):
            group = level[i:i + fan_in]
            nxt.append(group[0] if len(group) == 1 else client.submit(fn, *group, pure=False))
        level = nxt
    return level[0]


#: worker-side task states in which the task's function is still running
_RUNNING = ("executing", "long-running", "cancelled", "resumed")


def wait_all(futures: Sequence, desc: str, progress: bool, gather: bool = True, eta: str | None = None) -> list | None:
    """Wait for ``futures``, raising the first task error as soon as it happens; return their
    results in order, or None with ``gather=False`` (results stay on the workers).

    ``eta`` (what a task is, e.g. "list ranges"): log a time estimate once the first tenth of
    the tasks has finished, and again at half way (the progress bar shows one all along).

    On an error or an interrupt the other futures are cancelled and this returns only once no
    worker is still running one of them (a running task cannot be stopped; it must not go on
    writing after its job has failed and released the index)."""
    from distributed import as_completed

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(futures), desc=desc, unit="task")
    t0, finished = time.perf_counter(), 0
    marks = sorted({max(1, len(futures) // 10), max(1, len(futures) // 2)}) if eta and len(futures) > 1 else []
    try:
        for fut in as_completed(futures):
            if fut.status in ("error", "cancelled"):
                fut.result()  # raises the task's exception (or why it was cancelled)
            finished += 1
            if bar is not None:
                bar.update(1)
            if marks and finished == marks[0] and finished < len(futures):
                marks.pop(0)
                spent = time.perf_counter() - t0
                log.info("%s: %d of %d %s done in %.1f s; about %.0f s left", desc, finished, len(futures), eta,
                         spent, spent / finished * (len(futures) - finished))
    except BaseException:
        _cancel_and_drain(futures)
        raise
    finally:
        if bar is not None:
            bar.close()
    return [f.result() for f in futures] if gather else None


def _running_keys(keys: set, dask_worker=None) -> list:
    """The keys among ``keys`` whose function is still running on this worker."""
    tasks = dask_worker.state.tasks
    return [k for k in keys if k in tasks and tasks[k].state in _RUNNING]


def _cancel_and_drain(futures: Sequence, timeout: float = 120.0) -> None:
    if not futures:
        return
    client = futures[0].client
    keys = {f.key for f in futures}
    try:
        client.cancel(list(futures))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(client.run(_running_keys, keys).values()):
                return
            time.sleep(0.05)
        log.warning("tasks of the failed job are still running on the workers after %.0f s", timeout)
    except Exception as exc:  # noqa: BLE001 - the cluster may be going down with the job
        log.debug("could not wait for the cancelled tasks: %s", exc)
