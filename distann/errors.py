"""Exceptions raised by distann.

Every error raised at the API boundary names the parameter, the value received and
what is allowed, so a user can fix the call without reading the source.
"""

from __future__ import annotations


class DistannError(Exception):
    """Base class of every distann error."""


class ValidationError(DistannError, ValueError):
    """A parameter or an input failed validation before any work was scheduled."""

    def __init__(self, param: str, received: object, allowed: str):
        self.param = param
        self.received = received
        self.allowed = allowed
        super().__init__(f"{param}: received {_short(received)}; {allowed}")


class IndexFormatError(DistannError):
    """An index cannot be read: no committed manifest, corrupt, or a newer format version."""


class IndexExistsError(DistannError, FileExistsError):
    """A committed index already exists at the destination and overwrite was not asked for."""


class BuildConflictError(DistannError):
    """Another build owns the index URL's next generation (or took it over from this one)."""


class ShardsUnavailableError(DistannError):
    """Some shards of a distributed search did not answer (a worker lost with no copy left, a
    shard that could not be loaded, or the request's deadline passed). ``shards`` names them."""

    def __init__(self, message: str, shards: list[str], timed_out: bool = False):
        self.shards = list(shards)
        self.timed_out = timed_out
        super().__init__(message)


class WorkerKilledError(DistannError):
    """A task's worker process died every time the task ran (out of memory, a crash in native
    code, a kill signal) until Dask gave up on it (``distributed.scheduler.allowed-failures``).
    ``stage`` and ``task`` say what it was (e.g. "merge", "merge task of shard s000002");
    ``key`` is its Dask key. Nothing was committed: the job's target is as it was before."""

    def __init__(self, message: str, stage: str, task: str, key: str):
        self.stage = stage
        self.task = task
        self.key = key
        super().__init__(message)


class SchedulerLostError(DistannError):
    """The client lost its Dask scheduler in the middle of a job (the scheduler died or became
    unreachable, and did not come back within ``distributed.comm.timeouts.connect``). Nothing
    was committed; the same job rerun on a cluster resumes from what its tasks had finished."""


class StorageFullError(DistannError, OSError):
    """The disk (or quota) under an index filled up while a build wrote to it (ENOSPC, EDQUOT).
    The message names the path; nothing was committed, and a rerun resumes."""


class DeviceMemoryError(DistannError, MemoryError):
    """The GPU could not hold what a kernel call needs (another process holds its memory, or
    lists larger than the device were asked to stay resident with streaming disabled)."""


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
