"""The process-fault half of the fault matrix (docs/RELIABILITY.md), each on a real
multi-process Dask cluster: a `dask scheduler` process and two `dask worker` processes, each
under its nanny (which restarts a killed worker), all started as subprocesses.

Faults: a worker killed once during k-means, add (partway through a task, or after its tasks
finished), merge, a big-batch scan and dedup's last stage (results equal a clean run); the
scheduler killed mid-build (a clear error, the rerun resumes); the driver killed just before
the commit (readers keep the previous index); a poison task in a build, a big-batch and a
dedup job (a WorkerKilledError naming it). A worker out of memory in a merge is in
tests/test_storage_faults.py. Two builds racing for one URL are in
tests/test_lease.py, a worker killed during distributed search in tests/test_distributed.py.

Every kill is real: a worker process SIGKILLs itself from inside a chosen task (a worker
plugin on the task's state, or distann's private ``DISTANN_KILL_TASK`` hook at a point partway
through a task's output), the scheduler is SIGKILLed from here, the driver by the
``DISTANN_KILL_BEFORE_COMMIT`` hook, the out-of-memory worker by its nanny. A marker file makes
a kill happen exactly once (and proves that it happened). Results are compared with a clean
run on the same cluster: every index array, the k-means objective, big-batch and dedup
outputs, bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

import distann
from distann.errors import IndexFormatError, WorkerKilledError
from distann.synthetic import write_npy
from tests.ann_helpers import cli
from tests.proc_cluster import KillTask, Scheduler, SetEnv, StallTask, Workers, wait_until

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


@pytest.mark.parametrize("func,nth", [("train_group", 1), ("quantizer_stats", 3)])
def test_worker_killed_during_two_level_kmeans(cluster, faults, source, tmp_path, func, nth):
    """Two-level k-means: the worker running a level-2 group's training (or a refinement block)
    is SIGKILLed; the pieces and blocks it held are recomputed and the build equals a clean
    two-level build, centroids, quantizer and lists."""
    two = {**BUILD, "spec": "IVF64,Flat", "two_level": True, "nlist1": 8, "refine_niter": 2}
    clean = distann.build(source, str(tmp_path / "clean.zarr"), client=cluster.client, **two)
    marker = tmp_path / "killed"
    before = cluster.pids()
    faults(KillTask(func, "executing", nth=nth, marker=str(marker)), "kill-two-level")
    got = distann.build(source, str(tmp_path / "idx.zarr"), client=cluster.client, **two)
    assert marker.exists() and _restarted(before, cluster)
    assert got.manifest.build["two_level"] == clean.manifest.build["two_level"]
    want = clean.quantizer.arrays()
    assert want and got.quantizer.arrays().keys() == want.keys()
    for name, a in want.items():
        np.testing.assert_array_equal(got.quantizer.arrays()[name], a)
    assert_same_index(got, clean)


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


def test_broadcast_data_outlives_the_worker_holding_its_last_copy(cluster, faults):
    """Dask's Active Memory Manager drops all but one copy of a broadcast key once no task waits
    for it. SIGKILL the worker holding that copy: a task submitted afterwards still gets the
    data (recomputed from its task), instead of being cancelled for "lost dependencies" as it
    was when broadcast scattered the data (a scattered key has no lineage; the CI run of the
    add-kill test above failed that way when the killed worker held the coarse quantizer)."""
    from distann.cluster import broadcast

    c = cluster.client
    data = np.arange(10_000, dtype=np.float64)
    f = broadcast(c, data)
    assert c.submit(np.sum, f, pure=False).result() == data.sum()

    def one_copy():
        holders = c.who_has([f]).get(f.key, ())
        return holders[0] if len(holders) == 1 else None

    holder = wait_until(one_copy, 30, "the Active Memory Manager leaving one copy of the broadcast key")
    os.kill(cluster.pids()[holder], signal.SIGKILL)
    wait_until(lambda: holder not in c.scheduler_info()["workers"], 30, "the scheduler noticing the dead worker")
    assert c.submit(np.sum, f, pure=False).result(timeout=60) == data.sum()


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


# --------------------------------------------------------------------------- the scheduler killed
def test_scheduler_killed_mid_build_then_rerun_resumes(cluster, source, reference, root, tmp_path):
    """`distann build --scheduler` on its own cluster; the add stage is held at its fifth
    chunk and the scheduler SIGKILLed. The build fails within the reconnect timeout with a
    clear SchedulerLostError (no traceback), nothing is committed; the cluster is started
    again, the same command rerun resumes: the chunks finished before the kill are not redone,
    and the index equals a clean run's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    url = str(tmp_path / "idx.zarr")
    stalled, release = tmp_path / "stalled", tmp_path / "release"
    scheduler = Scheduler(logs, SCHEDULER_ENV)
    workers = None
    try:
        workers = Workers(scheduler.address, logs)
        workers.client.register_plugin(StallTask("add_chunk", 3, str(stalled), str(release)), name="stall")
        args = cli("build", source, url, *CLI_BUILD, "--scheduler", scheduler.address, quiet=True)
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: stalled.exists() or proc.poll() is not None, 240, "the add stage held")
            assert proc.poll() is None, proc.stderr.read()
            staging = tmp_path / "idx.zarr" / "g000001" / "staging"
            staged = wait_until(lambda: len(list(staging.glob("*/DONE"))) >= 2 and len(list(staging.glob("*/DONE"))),
                                60, "chunks staged beside the held one")
            assert staged < 10
            scheduler.kill()
            release.touch()
            _, err = proc.communicate(timeout=180)  # the client gives up reconnecting after its timeout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 2, err
        assert "lost the Dask scheduler" in err and "in the add stage" in err and "Traceback" not in err, err
        with pytest.raises(IndexFormatError, match="no committed index"):
            distann.open_index(url)
        workers.kill()  # the workers lost their scheduler as well: the whole cluster is started again
        scheduler.start()
        workers = Workers(scheduler.address, logs)
        subprocess.run(args, check=True, timeout=300)
    finally:
        if workers is not None:
            workers.close()
        scheduler.close()
    new = distann.open_index(url)
    assert new.manifest.build["resumed_chunks"] >= staged
    assert_same_index(new, reference)


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


# --------------------------------------------------------------------------- big-batch and dedup jobs
BIG_BATCH = dict(k=10, nprobe=4, chunk_rows=2500)


@pytest.fixture(scope="module")
def queries(root):
    return write_npy(str(root / "queries.npy"), 10_000, D, seed=77)


def test_worker_killed_during_a_big_batch_job(cluster, faults, reference, queries, tmp_path):
    """The worker running the first list-range scan is SIGKILLed: the job completes, and its
    result is identical to a clean run's (and the job's own record shows nothing was lost)."""
    c = cluster.client
    want = distann.big_batch_search(reference, queries, out=str(tmp_path / "clean.zarr"), client=c, **BIG_BATCH)
    marker = tmp_path / "killed"
    before = cluster.pids()
    faults(KillTask("scan_range", "executing", marker=str(marker)), "kill-scan")
    got = distann.big_batch_search(reference, queries, out=str(tmp_path / "got.zarr"), client=c, **BIG_BATCH)
    assert marker.exists() and _restarted(before, cluster)
    assert got.record["list_ranges"] == want.record["list_ranges"] >= 4
    for a, b in zip(got.knn(), want.knn()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.knn()[1], reference.search(np.load(queries), k=10, nprobe=4)[1])


def _planted(path, n=6000, d=D, seed=5) -> str:
    """Distinct vectors, 100 groups of three near copies and 50 exact copies (dedup's input)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    for g in range(100):
        for j in (1, 2):
            x[g * 20 + j] = x[g * 20] + 1e-3 * rng.standard_normal(d).astype(np.float32)
    x[n - 50:] = x[n - 100:n - 50]
    np.save(path, x)
    return str(path)


def _read_dedup(out) -> dict[str, np.ndarray]:
    t = pq.read_table(str(out))
    cols = {name: np.asarray(t.column(name)) for name in t.column_names}
    order = np.argsort(cols["id"])
    return {k: v[order] for k, v in cols.items()}


def test_worker_killed_during_a_dedup_job(cluster, faults, tmp_path):
    """A worker SIGKILLs itself as the last stage (writing the groups) starts, losing the
    group forests, statistics and exact-duplicate groups it held: Dask recomputes them from
    their lineage and the output equals a clean run's, row for row."""
    c = cluster.client
    src = _planted(tmp_path / "planted.npy")
    job = dict(threshold=0.999, metric="cosine", chunk_rows=1500, client=c)
    clean = distann.dedup(src, out=str(tmp_path / "clean"), **job)
    assert clean["duplicate_groups"] >= 100 and clean["exact_duplicates"] == 50
    marker = tmp_path / "killed"
    before = cluster.pids()
    faults(KillTask("write_groups", "executing", marker=str(marker)), "kill-write")
    got = distann.dedup(src, out=str(tmp_path / "got"), **job)
    assert marker.exists() and _restarted(before, cluster)
    a, b = _read_dedup(tmp_path / "got"), _read_dedup(tmp_path / "clean")
    assert a.keys() == b.keys() and len(a["id"]) == 6000
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    for field in ("groups", "duplicate_groups", "duplicates_removed", "exact_duplicates", "pairs", "group_sizes"):
        assert got[field] == clean[field], field


@pytest.mark.parametrize("job", ["big-batch", "dedup"])
def test_scheduler_killed_mid_job_then_rerun_resumes(cluster, reference, queries, tmp_path, job):
    """`distann search --big-batch` / `distann dedup` on its own cluster; a list-range scan is
    held and the scheduler SIGKILLed. The job fails with a clear SchedulerLostError (no
    traceback) and commits nothing; the cluster is started again and the same command rerun
    resumes: the ranges scanned before the kill (and dedup's index) are not redone, and the
    output equals a clean run's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "out"
    stalled, release = tmp_path / "stalled", tmp_path / "release"
    env = dict(os.environ)
    if job == "big-batch":
        clean = distann.big_batch_search(reference, queries, out=str(tmp_path / "clean.zarr"), client=cluster.client,
                                         **BIG_BATCH)
        out = tmp_path / "out.zarr"
        args = ["search", reference.url, queries, "--big-batch", "--out", str(out), "--k", "10", "--nprobe", "4",
                "--chunk-rows", "2500"]
        commit = out / "_distann.json"
    else:
        src = _planted(tmp_path / "planted.npy")
        # the index dedup builds in several shards, its self-join's scan in several list ranges (not 1)
        env.update(DASK_DISTANN__BUILD__SHARD_BYTES="65536", DASK_DISTANN__BIGBATCH__RANGE_BYTES="65536")
        clean = distann.dedup(src, out=str(tmp_path / "clean"), client=cluster.client, threshold=0.999,
                              metric="cosine", chunk_rows=1500)
        args = ["dedup", src, "--out", str(out), "--threshold", "0.999", "--metric", "cosine", "--chunk-rows", "1500"]
        commit = out / "_summary.json"
    scheduler = Scheduler(logs, SCHEDULER_ENV)
    workers = None
    try:
        workers = Workers(scheduler.address, logs)
        workers.client.register_plugin(StallTask("scan_range", 1, str(stalled), str(release)), name="stall")
        cmd = cli(*args, "--scheduler", scheduler.address, quiet=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            wait_until(lambda: stalled.exists() or proc.poll() is not None, 240, "a list-range scan held")
            assert proc.poll() is None, proc.stderr.read()
            scanned = wait_until(lambda: len(list(out.glob("**/partials/*/DONE"))), 60, "ranges scanned beside it")
            scheduler.kill()
            release.touch()
            _, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 2, err
        assert "lost the Dask scheduler" in err and "Traceback" not in err, err
        assert not commit.exists()
        workers.kill()
        scheduler.start()
        workers = Workers(scheduler.address, logs)
        subprocess.run(cmd, check=True, timeout=300, env=env)
    finally:
        if workers is not None:
            workers.close()
        scheduler.close()
    if job == "big-batch":
        got = distann.open_result(str(out))
        assert got.record["resumed_ranges"] >= scanned
        for a, b in zip(got.knn(), clean.knn()):
            np.testing.assert_array_equal(a, b)
    else:
        import json

        summary = json.loads(commit.read_text())
        assert summary["resumed"]["index"] and summary["resumed"]["scan_ranges"] >= scanned
        a, b = _read_dedup(out), _read_dedup(tmp_path / "clean")
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
        for field in ("groups", "duplicate_groups", "duplicates_removed", "exact_duplicates", "pairs"):
            assert summary[field] == clean[field], field


@pytest.mark.parametrize("job", ["big-batch", "dedup"])
def test_a_poison_task_of_a_job_fails_naming_it(cluster, faults, reference, queries, tmp_path, job):
    """Every scan task of a big-batch job (every write task of a dedup job) kills its worker:
    WorkerKilledError naming the stage and the list range (chunk), nothing committed; without
    the poison the same job resumes and completes."""
    c = cluster.client
    out = str(tmp_path / "out")
    if job == "big-batch":
        func, stage, what = "scan_range", "scan", "scan task of list range r"
        run = lambda: distann.big_batch_search(reference, queries, out=out, client=c, **BIG_BATCH)  # noqa: E731
    else:
        func, stage, what = "write_groups", "groups", "write task of chunk c"
        src = _planted(tmp_path / "planted.npy")
        run = lambda: distann.dedup(src, 0.999, out=out, chunk_rows=1500, client=c)  # noqa: E731
    previous = _set_allowed_failures(c, 1)
    try:
        faults(KillTask(func, "executing"), "poison")
        with pytest.raises(WorkerKilledError) as info:
            run()
    finally:
        _set_allowed_failures(c, previous)
    assert info.value.stage == stage and info.value.task.startswith(what)
    assert f"the {stage} stage's {info.value.task}" in str(info.value)
    assert f"Nothing was committed at {out}" in str(info.value)
    assert not (tmp_path / "out" / ("_distann.json" if job == "big-batch" else "_summary.json")).exists()
    cluster.wait_for_workers()
    faults(None, remove="poison")
    result = run()
    if job == "big-batch":
        np.testing.assert_array_equal(result.knn()[1], reference.search(np.load(queries), k=10, nprobe=4)[1])
    else:
        assert result["duplicate_groups"] >= 100
