"""The process-fault half of the fault matrix (docs/RELIABILITY.md), each on a real
multi-process Dask cluster: a `dask scheduler` process and two `dask worker` processes, each
under its nanny (which restarts a killed worker), all started as subprocesses.

Every kill is a real SIGKILL of a process: a worker process kills itself from inside a chosen
task (a worker plugin on the task's state, or distann's private ``DISTANN_KILL_TASK`` hook at
a point partway through a task's output), the scheduler and the driver are killed from here
or by the ``DISTANN_KILL_BEFORE_COMMIT`` hook. A marker file makes a kill happen exactly once
(and proves that it happened). Results are compared with a clean run on the same cluster:
every index array, the k-means objective, big-batch and dedup outputs, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

import distann
from distann.errors import WorkerKilledError
from distann.synthetic import write_npy
from tests.ann_helpers import cli, wait_for_staged_chunks
from tests.proc_cluster import KillTask, Scheduler, SetEnv, Workers, wait_until

N, D = 20_000, 16
#: 10 add chunks, several shards, a handful of k-means iterations: seconds per build
BUILD = dict(spec="IVF16,Flat", niter=4, chunk_rows=2000, shard_bytes=200_000)
#: a one-thread worker is given one task at a time (Dask's default 1.1 gives it two), so that a
#: worker's death makes only the task it was running suspect: with two, a poison task's
#: innocent neighbour can reach allowed-failures first and be the one reported
SCHEDULER_ENV = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
CLI_BUILD = ["--spec", "IVF16,Flat", "--niter", "4", "--chunk-rows", "2000", "--shard-bytes", "200000"]


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def cluster(root):
    """One scheduler and two nanny-managed workers for the module (the scheduler-kill test has
    its own)."""
    logs = root / "logs"
    logs.mkdir()
    scheduler = Scheduler(logs, SCHEDULER_ENV)
    try:
        workers = Workers(scheduler.address, logs)
        try:
            yield workers
        finally:
            workers.close()
    finally:
        scheduler.close()


@pytest.fixture(scope="module")
def source(root):
    return write_npy(str(root / "base.npy"), N, D)


@pytest.fixture(scope="module")
def reference(cluster, source, root):
    """The clean run every faulted build must equal."""
    return distann.build(source, str(root / "reference.zarr"), client=cluster.client, **BUILD)


@pytest.fixture
def faults(cluster, tmp_path):
    """Install fault plugins on every worker (restarted ones too) for one test; afterwards
    remove them and wait until both workers are back."""
    installed = []

    def install(plugin, name: str | None = None, *, remove: str | None = None):
        """``faults(plugin, name)`` installs, ``faults(remove=name)`` removes."""
        if remove is not None:
            cluster.client.unregister_worker_plugin(remove)
            installed.remove(remove)
            return
        cluster.client.register_plugin(plugin, name=name)
        installed.append(name)

    yield install
    for name in installed:
        cluster.client.unregister_worker_plugin(name)
    cluster.wait_for_workers()


def assert_same_index(got, want) -> None:
    """Equal index arrays: centroids, list sizes, every list's codes and ids in order, the
    shards' boundaries and checksums, the k-means objective."""
    np.testing.assert_array_equal(got.centroids, want.centroids)
    np.testing.assert_array_equal(got.list_sizes, want.list_sizes)
    a, b = got.lists.load_all(), want.lists.load_all()
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert [(s.name, s.list_start, s.list_stop, s.ntotal, s.checksum) for s in got.manifest.shards] == \
        [(s.name, s.list_start, s.list_stop, s.ntotal, s.checksum) for s in want.manifest.shards]
    assert got.manifest.build["objective"] == want.manifest.build["objective"]
    got.verify()


def _restarted(before: dict[str, int], cluster) -> bool:
    """A worker process of ``before`` is gone and both workers are up again."""
    after = cluster.wait_for_workers()
    return bool(set(before.values()) - set(after.values()))


# --------------------------------------------------------------------------- a worker killed once
def test_worker_killed_during_kmeans(cluster, faults, source, reference, tmp_path):
    """The worker running the third Lloyd iteration's block is SIGKILLed: the sample block it
    held is recomputed from its lineage and k-means goes on to the same centroids."""
    marker = tmp_path / "killed"
    before = cluster.pids()
    faults(KillTask("block_stats", "executing", nth=3, marker=str(marker)), "kill-kmeans")
    got = distann.build(source, str(tmp_path / "idx.zarr"), client=cluster.client, **BUILD)
    assert marker.exists() and _restarted(before, cluster)
    assert_same_index(got, reference)


@pytest.mark.parametrize("stage,task", [("add", "c000003"), ("merge", "s000001")])
def test_worker_killed_partway_through_a_task(cluster, faults, source, reference, tmp_path, stage, task):
    """A worker SIGKILLs itself partway through one add task (codes written, ids and DONE not)
    or one merge task (shard arrays written, DONE not): Dask reruns the task elsewhere over its
    partial output and the index equals the clean run's."""
    marker = tmp_path / "killed"
    before = cluster.pids()
    faults(SetEnv({"DISTANN_KILL_TASK": f"{stage}:{task}", "DISTANN_KILL_ONCE": str(marker)}), "kill-env")
    got = distann.build(source, str(tmp_path / "idx.zarr"), client=cluster.client, **BUILD)
    assert marker.exists() and _restarted(before, cluster)
    assert_same_index(got, reference)


def test_worker_killed_after_its_add_tasks_finished(cluster, faults, source, reference, tmp_path):
    """A worker dies just after an add task finished: the per-chunk counts it held in memory
    are lost, Dask recomputes them, and the rerun add tasks find their staging done."""
    marker = tmp_path / "killed"
    before = cluster.pids()
    faults(KillTask("add_chunk", "memory", nth=2, marker=str(marker)), "kill-add-done")
    got = distann.build(source, str(tmp_path / "idx.zarr"), client=cluster.client, **BUILD)
    assert marker.exists() and _restarted(before, cluster)
    assert got.manifest.build["resumed_chunks"] >= 1  # recomputed from the staging, not redone
    assert_same_index(got, reference)


# --------------------------------------------------------------------------- a poison task
def _set_allowed_failures(client, n: int) -> int:
    """Set the running scheduler's allowed-failures (``distributed.scheduler.allowed-failures``,
    read when a scheduler starts); returns the previous value."""
    def swap(dask_scheduler=None, n=n):
        old, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, n
        return old
    return client.run_on_scheduler(swap)


@pytest.mark.parametrize("stage,task,what", [("add", "c000004", "add task of chunk c000004"),
                                             ("merge", "s000002", "merge task of shard s000002")])
def test_a_task_that_kills_every_worker_fails_naming_it(cluster, faults, source, reference, tmp_path, stage, task,
                                                        what):
    """A task that SIGKILLs every worker that runs it: the build fails with a WorkerKilledError
    naming the stage, the chunk or shard and the setting (not Dask's bare KilledWorker), the
    committed index is intact, and once the cause is gone a rerun resumes to the clean result."""
    url = str(tmp_path / "idx.zarr")
    old = distann.build(source, url, client=cluster.client, **{**BUILD, "spec": "IVF8,Flat"})
    xq = np.load(source)[:50]
    want = old.search(xq, k=5, nprobe=2)
    before = cluster.pids()
    previous = _set_allowed_failures(cluster.client, 1)  # two deaths, not four: a shorter test
    try:
        faults(SetEnv({"DISTANN_KILL_TASK": f"{stage}:{task}"}), "poison")
        with pytest.raises(WorkerKilledError) as info:
            distann.build(source, url, client=cluster.client, overwrite=True, **BUILD)
    finally:
        _set_allowed_failures(cluster.client, previous)
    err = info.value
    assert (err.stage, err.task) == (stage, what)
    msg = str(err)
    assert what in msg and f"the {stage} stage" in msg and "distributed.scheduler.allowed-failures = 1" in msg
    assert "Nothing was committed" in msg
    assert ("chunk_rows" if stage == "add" else "shard_bytes") in msg
    assert isinstance(err.__cause__, __import__("distributed").KilledWorker)
    assert not set(before.values()) & set(cluster.wait_for_workers().values())  # both workers died once
    intact = distann.open_index(url)
    assert intact.manifest.generation == 1 and intact.spec == "IVF8,Flat"
    intact.verify()
    for got, exp in zip(intact.search(xq, k=5, nprobe=2), want):
        np.testing.assert_array_equal(got, exp)
    faults(None, remove="poison")  # the cause is fixed: the rerun resumes
    rerun = distann.build(source, url, client=cluster.client, overwrite=True, **BUILD)
    assert rerun.manifest.generation == 2
    assert rerun.manifest.build["resumed_chunks"] >= (4 if stage == "add" else 10)
    assert_same_index(rerun, reference)


# --------------------------------------------------------------------------- the driver killed
def test_driver_killed_just_before_the_commit(cluster, source, reference, tmp_path):
    """`distann build` SIGKILLed with every shard written and the manifest not: readers see the
    previous index (a reader opened before as well as one opened after), never the new one;
    the rerun redoes nothing (every chunk and shard resumed) and equals a clean run."""
    url = str(tmp_path / "idx.zarr")
    old = distann.build(source, url, client=cluster.client, **{**BUILD, "spec": "IVF8,Flat"})
    xq = np.load(source)[:50]
    want = old.search(xq, k=5, nprobe=2)
    manifest = (tmp_path / "idx.zarr" / "manifest.json").read_bytes()
    args = cli("build", source, url, *CLI_BUILD, "--overwrite", "--scheduler", cluster.client.scheduler.address,
               quiet=True)
    proc = subprocess.run(args, env={**os.environ, "DISTANN_KILL_BEFORE_COMMIT": "1"}, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    shards = sorted((tmp_path / "idx.zarr" / "g000002" / "shards").glob("s*"))
    assert len(shards) == len(reference.manifest.shards) and all((s / "DONE").exists() for s in shards)
    assert (tmp_path / "idx.zarr" / "manifest.json").read_bytes() == manifest
    for reader in (old, distann.open_index(url)):
        assert reader.manifest.generation == 1 and reader.spec == "IVF8,Flat"
        for got, exp in zip(reader.search(xq, k=5, nprobe=2), want):
            np.testing.assert_array_equal(got, exp)
    distann.open_index(url).verify()

    subprocess.run(args, check=True, timeout=300)
    new = distann.open_index(url)
    assert new.manifest.generation == 2
    assert new.manifest.build["resumed_chunks"] == 10 and new.manifest.build["resumed_shards"] == len(shards)
    assert_same_index(new, reference)
