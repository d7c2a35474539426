"""Waiting on futures, with an optional progress bar (the CLI turns it on)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

#: worker-side task states in which the task's function is still running
_RUNNING = ("executing", "long-running", "cancelled", "resumed")


def wait_all(futures: Sequence, desc: str, progress: bool, gather: bool = True) -> list | None:
    """Wait for ``futures``, raising the first task error as soon as it happens; return their
    results in order, or None with ``gather=False`` (results stay on the workers).

    On an error or an interrupt the other futures are cancelled and this returns only once no
    worker is still running one of them (a running task cannot be stopped; it must not go on
    writing after its job has failed and released the index)."""
    from distributed import as_completed

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(futures), desc=desc, unit="task")
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                fut.result()  # raises the task's exception
            if bar is not None:
                bar.update(1)
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
