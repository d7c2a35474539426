"""wait_all on a real cluster: a failed job leaves no task of its own running behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from distann.cluster import wait_all


def _slow_write(path: str, delay: float) -> str:
    time.sleep(delay)
    Path(path).write_text("written after the job failed")
    return path


def _fail(delay: float) -> None:
    time.sleep(delay)
    raise RuntimeError("task failed")


def test_failure_waits_for_running_tasks_and_cancels_the_rest(client, tmp_path):
    running = tmp_path / "running.txt"
    queued = [tmp_path / f"queued-{i}.txt" for i in range(4)]
    futures = [client.submit(_slow_write, str(running), 2.0, pure=False),   # starts on one worker
               client.submit(_fail, 0.2, pure=False),                       # fails on the other
               *[client.submit(_slow_write, str(q), 2.0, pure=False) for q in queued]]
    with pytest.raises(RuntimeError, match="task failed"):
        wait_all(futures, "test", progress=False)
    # the task that was running when the job failed has finished: nothing writes after the failure
    assert running.exists()
    time.sleep(2.5)
    assert sum(q.exists() for q in queued) <= 1  # the rest were cancelled (one may have started)
