"""Cluster-hosted search (``open_index(url, client=..., replicas=R)``): results identical to
local search, compact per-shard answers, placement, worker deaths (SIGKILL of real `dask
worker` processes), deadlines and partial results, bad input, and the reader lease that keeps
the served generation through rebuilds.

The tests that kill nothing share the session LocalCluster (``client`` in conftest); each
kill test starts its own `dask scheduler` and two `dask worker --no-nanny` processes (without
a nanny, the process killed is the worker itself and nobody restarts it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest

import distann
from distann.cluster import WORKER_ENV
from distann.codecs.metric import kernel_metric
from distann.errors import IndexFormatError, ShardsUnavailableError, ValidationError
from distann.kernels import get_backend
from distann.search.resident import load_shard, scan_shard
from distann.store.readers import held_generations, reader_path
from tests.conftest import free_port
from tests.proc_cluster import wait_until as _wait_until

N, DIM, NQ, NLIST = 20_000, 32, 200, 64
K, NPROBE = 10, 8
#: several shards per index whatever the codec's row size
SHARD_BYTES = {"IVF64,Flat": 200_000, "IVF64,SQ8": 60_000, "IVF64,PQ8": 40_000, "IVF64,PQ8,RFlat": 200_000}
CASES = [("IVF64,Flat", "l2"), ("IVF64,SQ8", "l2"), ("IVF64,PQ8", "l2"), ("IVF64,PQ8,RFlat", "l2"),
         ("IVF64,Flat", "ip"), ("IVF64,PQ8,RFlat", "cosine")]


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(20)
    xb = rng.standard_normal((N, DIM)).astype(np.float32)
    xb[N - 1000:] = xb[:1000]  # exact duplicates under other ids: ties that only the id rule breaks
    xq = rng.standard_normal((NQ, DIM)).astype(np.float32)
    return xb, xq


@pytest.fixture(scope="module")
def make_index(client, data, tmp_path_factory):
    """Build (once per module) the index of ``spec`` / ``metric`` on the session cluster: its URL."""
    root = tmp_path_factory.mktemp("distributed")
    built: dict[tuple[str, str], str] = {}

    def make(spec: str, metric: str = "l2") -> str:
        if (spec, metric) not in built:
            url = str(root / f"{spec.replace(',', '_')}-{metric}.zarr")
            distann.build(data[0], url, spec=spec, metric=metric, client=client, niter=5,
                          shard_bytes=SHARD_BYTES[spec])
            built[spec, metric] = url
        return built[spec, metric]

    return make


def _same(got, want) -> None:
    """The same results: ids and lims identical, distances to 1e-6 (they are identical but for a
    one-off 1-ulp difference seen once between duplicate vectors, not reproduced since)."""
    for g, w in zip(got, want, strict=True):
        if np.asarray(w).dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(g, w)


def _row_bytes(di) -> int:
    return di.local.lists.row_bytes


def _start_process(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f, env={**os.environ, **WORKER_ENV})


def _stop_process(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def proc_scheduler(tmp_path_factory):
    """A `dask scheduler` process on loopback for the kill tests: (address, log folder)."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    port = free_port()
    proc = _start_process([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                           "--port", str(port), "--no-dashboard"], logs / "scheduler.log")
    try:
        yield f"tcp://127.0.0.1:{port}", logs
    finally:
        _stop_process(proc)


class ProcCluster:
    """Two fresh `dask worker --no-nanny` processes (single-threaded, distann's worker
    environment) on the shared scheduler, and a client: without a nanny, the process killed
    is the worker itself and nothing restarts it."""

    def __init__(self, address: str, logs: Path, name: str, nworkers: int = 2):
        from distributed import Client

        self.procs = [_start_process([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                      "--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "2GiB"],
                                     logs / f"{name}-worker{i}.log") for i in range(nworkers)]
        self.client = None
        try:
            self.client = Client(address, timeout=30)
            mine = sorted(p.pid for p in self.procs)
            # worker address -> pid (no nanny: the Popen's pid); the workers of an earlier test are gone
            self.pids = _wait_until(lambda: (lambda got: got if sorted(got.values()) == mine else None)(
                self.client.run(os.getpid)), 60, "the two new workers, and only them, on the scheduler", step=0.2)
        except BaseException:
            self.close()
            raise

    def kill(self, address: str) -> None:
        os.kill(self.pids[address], signal.SIGKILL)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for p in self.procs:  # one after the other: a worker says goodbye to the scheduler
            _stop_process(p)


@pytest.fixture
def proc_cluster(proc_scheduler, request):
    """Two killable workers (and a client) for one test, on the module's scheduler."""
    address, logs = proc_scheduler
    cluster = ProcCluster(address, logs, request.node.name[:40])
    try:
        yield cluster
    finally:
        cluster.close()


def _copy_index(url: str, dest: Path) -> str:
    shutil.copytree(url, dest)
    return str(dest)


def _outcome(di, xq, want) -> tuple[float, object]:
    """(start time, outcome) of one search: "same" (identical to ``want``), "different", or the exception."""
    t0 = time.monotonic()
    try:
        D, I = di.search(xq, k=K, nprobe=NPROBE, timeout=120)
        same = np.array_equal(I, want[1]) and np.allclose(D, want[0], rtol=1e-6, atol=0)
        outcome: object = "same" if same else "different"
    except BaseException as exc:  # noqa: BLE001 - recorded, judged by the test
        outcome = exc
    return t0, outcome


class Stream:
    """Searches ``xq`` over and over in a thread, recording (start time, outcome) per call:
    outcome "same" (identical to ``want``), "different", ShardsUnavailableError or any other exception."""

    def __init__(self, di, xq, want):
        self.di, self.xq, self.want = di, xq, want
        self.outcomes: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="search-stream", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.outcomes.append(_outcome(self.di, self.xq, self.want))

    def count(self, since: float = -np.inf) -> int:
        return sum(1 for t, _ in self.outcomes if t >= since)

    def stop(self) -> list[tuple[float, object]]:
        self._stop.set()
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "a search of the stream hung"
        return self.outcomes


# --------------------------------------------------------------------------- identical results
@pytest.mark.parametrize("spec,metric", CASES)
def test_distributed_results_equal_local(client, make_index, data, spec, metric):
    xb, xq = data
    url = make_index(spec, metric)
    local = distann.open_index(url)
    nshards = len(local.manifest.shards)
    assert nshards >= 4
    rng = np.random.default_rng(3)
    some_ids = np.sort(rng.choice(N, N // 3, replace=False))
    bitmap = np.zeros(N, bool)
    bitmap[::4] = True
    few_ids = some_ids[:60]  # most queries find fewer than k of them: padded results
    calls = [dict(k=K, nprobe=NPROBE), dict(k=K, nprobe=NPROBE, ids_allowed=some_ids),
             dict(k=K, nprobe=NPROBE, ids_allowed=bitmap), dict(k=K, nprobe=NPROBE, max_codes=700),
             dict(k=25, nprobe=2, ids_allowed=few_ids), dict(k=1, nprobe=NLIST)]
    if local.codec.refine:
        calls.append(dict(k=K, nprobe=NPROBE, k_factor=2))
    with distann.open_index(url, client=client) as di:
        assert isinstance(di, distann.DistributedIndex) and di.generation == 1
        for kw in calls:
            want = local.search(xq, **kw)
            _same(di.search(xq, **kw), want)
        assert (local.search(xq, k=25, nprobe=2, ids_allowed=few_ids)[1] == -1).any()  # padding was compared
        with dask.config.set({"distann.search.batch-size": 64}):  # 4 batches on the cluster
            _same(di.search(xq, k=K, nprobe=NPROBE), local.search(xq, k=K, nprobe=NPROBE))

        r = di.search_result(xq, k=K, nprobe=NPROBE)
        _same((r.D, r.I), local.search(xq, k=K, nprobe=NPROBE))
        assert r.coverage == 1.0 and r.missing_shards == [] and r.generation == 1 and r.lims is None
        assert r.shard_seconds and set(r.shard_seconds) <= {e.name for e in local.manifest.shards}
        assert all(v >= 0 for v in r.shard_seconds.values())

        # range search: a radius at which about half the queries have 5 results or more
        radius = float(np.median(local.search(xq, k=5, nprobe=NPROBE)[0][:, 4]))
        for kw in [dict(), dict(ids_allowed=bitmap), dict(max_codes=700)]:
            want = local.range_search(xq, radius, NPROBE, **kw)
            assert want[0][-1] > 0 and len(np.unique(np.diff(want[0]))) > 1
            _same(di.range_search(xq, radius, NPROBE, **kw), want)
        rr = di.range_search_result(xq, radius, NPROBE)
        _same((rr.lims, rr.D, rr.I), local.range_search(xq, radius, NPROBE))
        assert rr.coverage == 1.0 and rr.missing_shards == []


@pytest.mark.parametrize("spec", ["IVF64,Flat", "IVF64,PQ8,RFlat"])
def test_a_shard_answers_only_its_queries_with_at_most_k_each(client, make_index, data, spec):
    """The per-shard task: rows only for the queries that probe one of the shard's (non-empty)
    lists, at most k results each (k * k_factor candidates for RFlat), with as many probe pairs
    as the queries have in that shard; merged, the shards' answers are the local result."""
    _, xq = data
    url = make_index(spec)
    k, k_factor = 7, 3
    with distann.open_index(url, client=client) as di:
        local = di.local
        xq_raw, q, nprobe, _, _, kern = local._prepare(xq, NPROBE, None, None, "numba")
        plan = local._coarse(kern, q, nprobe, None)
        _, P = kern.coarse_quantize(q, local.centroids, nprobe, kernel_metric(local.metric))
        nonempty = local.list_sizes[P] > 0
        shard_of = np.searchsorted(local.lists.shard_starts, plan.lists, side="right") - 1
        results, pairs = [], 0
        for s, entry in enumerate(local.manifest.shards):
            sel = np.flatnonzero(shard_of == s)
            if not len(sel):
                continue
            a, b = int(sel[0]), int(sel[-1]) + 1
            assert np.array_equal(sel, np.arange(a, b))  # the shard's lists are contiguous in the plan
            probes = di._shard_probes(plan, a, b, s)
            mine = (P >= entry.list_start) & (P < entry.list_stop) & nonempty
            np.testing.assert_array_equal(probes.queries, np.flatnonzero(mine.any(axis=1)))
            assert probes.npairs == mine.sum() and probes.nprobe == mine.sum(axis=1).max()
            shard = load_shard(local.loc, local.manifest, s)
            r = scan_shard(shard, (q, xq_raw), probes, k, k_factor, None, "numba")
            width = k * k_factor if local.codec.refine else k
            assert r.shard == s and r.D.shape == r.I.shape == (len(probes.queries), width)
            np.testing.assert_array_equal(r.queries, probes.queries)
            if local.codec.refine:  # candidates are rows of this shard with their ids
                assert r.I.max() < entry.ntotal and r.ids.shape == r.exact.shape == r.I.shape
                np.testing.assert_array_equal(r.ids[r.I >= 0], shard.block.ids[r.I[r.I >= 0]])
            results.append(r)
            pairs += probes.npairs
        assert len(results) >= 4 and pairs == nonempty.sum()
        merged = di._merge_knn(kern, len(q), results, k, k * k_factor if local.codec.refine else k)
        _same(merged, local.search(xq, k=k, nprobe=NPROBE, k_factor=k_factor))


# --------------------------------------------------------------------------- placement
def test_placement_replicas_and_balance(client, make_index, data):
    _, xq = data
    url = make_index("IVF64,Flat")
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2
    with distann.open_index(url, client=client, replicas=2) as di:
        n = len(di.manifest.shards)
        assert di.health() == {"generation": 1, "shards": n, "shards_resident": n, "replicas": 2,
                               "copies_resident": 2 * n, "workers": 2}
        placement = di.placement()
        assert sorted(placement) == [e.name for e in di.manifest.shards]
        assert all(where == workers for where in placement.values()), placement
        assert di.info()["bytes_on_workers"] == 2 * di.local.lists.nbytes
    with distann.open_index(url, client=client) as di:
        placement = di.placement()
        assert all(len(where) == 1 for where in placement.values()), placement
        sizes = {e.name: e.ntotal * _row_bytes(di) for e in di.manifest.shards}
        load = {w: sum(sizes[s] for s, where in placement.items() if where == [w]) for w in workers}
        assert sum(load.values()) == di.local.lists.nbytes
        # largest first onto the least loaded worker: the loads differ by at most one shard
        assert abs(load[workers[0]] - load[workers[1]]) <= max(sizes.values()), (load, sizes)
        assert di.health()["copies_resident"] == n
    assert held_generations(distann.open_index(url).loc) == set()  # both leases released by close


def test_search_uses_its_own_client_not_the_default_one(client, make_index, data):
    """Another client created later becomes Dask's default; the index keeps using its own: the
    same results, and about as fast as with its own client the default."""
    from distributed import Client, default_client

    _, xq = data
    url = make_index("IVF64,Flat")
    want = distann.open_index(url).search(xq, k=K, nprobe=NPROBE)

    def open_and_search() -> float:
        t0 = time.monotonic()
        with distann.open_index(url, client=client) as di:
            for _ in range(3):
                _same(di.search(xq, k=K, nprobe=NPROBE), want)
        return time.monotonic() - t0

    with Client(client.scheduler.address, timeout=30) as other:
        assert default_client() is other
        slow = open_and_search()
        with client.as_current():
            fast = open_and_search()
    # before the fix: ~2 s per call (waiting on the default client's loop, which wakes every 2 s)
    assert slow <= 3 * fast + 1.5, (slow, fast)


# --------------------------------------------------------------------------- deadlines
def test_a_passed_deadline_names_the_shards_and_partial_returns_coverage(client, make_index, data):
    """A 1 µs deadline has passed before the scans are even submitted (``wait`` gets a timeout
    of 0), so no scan can have answered: every probed shard is missing, deterministically."""
    _, xq = data
    url = make_index("IVF64,Flat")
    local = distann.open_index(url)
    names = {e.name for e in local.manifest.shards}
    with distann.open_index(url, client=client) as di:
        with pytest.raises(ShardsUnavailableError) as info:
            di.search_result(xq, k=K, nprobe=NPROBE, timeout=1e-6)
        assert info.value.shards and set(info.value.shards) <= names
        assert info.value.timed_out is True and "deadline" in str(info.value)
        with pytest.raises(ShardsUnavailableError) as info:
            di.range_search(xq, 30.0, NPROBE, timeout=1e-6)
        assert info.value.timed_out is True
        r = di.search_result(xq, k=K, nprobe=NPROBE, timeout=1e-6, allow_partial=True)
        assert r.coverage < 1 and r.missing_shards and set(r.missing_shards) <= names
        assert r.D.shape == r.I.shape == (NQ, K)
        # the cancelled scans did not take the shards with them
        assert di.health()["shards_resident"] == len(names)
        _same(di.search(xq, k=K, nprobe=NPROBE, timeout=60), local.search(xq, k=K, nprobe=NPROBE))


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_any_task(client, make_index, data, tmp_path, monkeypatch):
    from distributed import Client

    _, xq = data
    url = make_index("IVF64,Flat")
    loc = distann.open_index(url).loc
    with pytest.raises(ValidationError) as info:
        distann.open_index(url, client="not a client")
    assert info.value.param == "client"
    with pytest.raises(ValidationError) as info:
        distann.open_index(url, client=client, replicas=3)
    assert info.value.param == "replicas" and "at most the number of workers" in str(info.value)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValidationError) as info:
            distann.open_index(url, client=client, replicas=bad)
        assert info.value.param == "replicas"
    with pytest.raises(ValidationError) as info:
        distann.open_index(url, replicas=2)
    assert info.value.param == "replicas"
    with pytest.raises(IndexFormatError):
        distann.open_index(str(tmp_path / "nothing.zarr"), client=client)
    assert held_generations(loc) == set()  # no refused open left a reader lease

    di = distann.open_index(url, client=client)
    try:
        def no_tasks(*args, **kwargs):
            raise AssertionError("a task was submitted for a call that must be refused")

        monkeypatch.setattr(client, "submit", no_tasks)
        monkeypatch.setattr(Client, "submit", no_tasks)
        nan = xq.copy()
        nan[3, 5] = np.nan
        bad_calls = [
            ("xq", lambda: di.search(xq[:, :DIM - 1], k=K, nprobe=NPROBE)),
            ("xq", lambda: di.search(nan, k=K, nprobe=NPROBE)),
            ("xq", lambda: di.range_search(nan, 30.0, NPROBE)),
            ("nprobe", lambda: di.search(xq, k=K, nprobe=NLIST + 1)),
            ("nprobe", lambda: di.range_search(xq, 30.0, 0)),
            ("k", lambda: di.search(xq, k=0, nprobe=NPROBE)),
            ("max_codes", lambda: di.search(xq, k=K, nprobe=NPROBE, max_codes=0)),
            ("timeout", lambda: di.search(xq, k=K, nprobe=NPROBE, timeout=0)),
            ("timeout", lambda: di.search_result(xq, k=K, nprobe=NPROBE, timeout=-1.0, allow_partial=True)),
            ("k_factor", lambda: di.search(xq, k=K, nprobe=NPROBE, k_factor=0)),
        ]
        for param, call in bad_calls:
            with pytest.raises(ValidationError) as info:
                call()
            assert info.value.param == param, (param, info.value)
        monkeypatch.undo()
        _same(di.search(xq[:20], k=K, nprobe=NPROBE), distann.open_index(url).search(xq[:20], k=K, nprobe=NPROBE))
    finally:
        di.close()
    with pytest.raises(ValidationError, match="closed"):
        di.search(xq, k=K, nprobe=NPROBE)


def test_a_failed_open_leaves_no_reader_lease(client, make_index, tmp_path):
    url = _copy_index(make_index("IVF64,Flat"), tmp_path / "idx.zarr")
    loc = distann.open_index(url).loc
    shutil.rmtree(Path(url, "g000001", "shards", "s000001"))
    before = {t for t in threading.enumerate() if t.name == "distann-reader-lease"}
    try:
        with pytest.raises(IndexFormatError, match="s000001"):
            distann.open_index(url, client=client)
        assert held_generations(loc) == set()
    finally:  # stop a leaked renewal thread, whatever the outcome
        for t in threading.enumerate():
            if t.name == "distann-reader-lease" and t not in before and getattr(t, "_target", None):
                t._target.__self__.release()


# --------------------------------------------------------------------------- reader leases
def test_the_served_generation_survives_rebuilds_until_closed(client, data, tmp_path):
    xb, xq = data
    url = str(tmp_path / "idx.zarr")
    opts = dict(spec="IVF16,Flat", client=client, niter=3, shard_bytes=30_000)
    small = xb[:5000]
    distann.build(small, url, **opts)
    gen = lambda n: Path(url, f"g{n:06d}")  # noqa: E731
    di = distann.open_index(url, client=client)
    try:
        loc = di.local.loc
        want = di.search(xq, k=K, nprobe=4)
        assert held_generations(loc) == {1}
        other = np.ascontiguousarray(small[::-1] * 2)  # another data set under the same ids
        for _ in range(2):
            distann.build(other, url, overwrite=True, **opts)
        newest = distann.open_index(url)
        assert newest.manifest.generation == 3
        assert not np.array_equal(newest.search(xq, k=K, nprobe=4)[1], want[1])  # a different index now
        assert gen(1).exists() and gen(3).exists()  # g1: held by the lease; g2: the one just replaced
        _same(di.search(xq, k=K, nprobe=4), want)
        # the coordinator's own Index (no cache) reads generation 1 from the store: it is all still there
        _same(di.local.search(xq, k=K, nprobe=4), want)
        assert di.generation == 1
    finally:
        di.close()
    assert held_generations(loc) == set()
    distann.build(other, url, overwrite=True, **opts)  # generation 4
    assert not gen(1).exists() and not gen(2).exists() and gen(3).exists() and gen(4).exists()

    # an expired lease holds nothing (and is removed); a live one holds its generation
    now = time.time()
    for g, token, expires in ((3, "expired0", now - 5), (4, "live0000", now + 600)):
        loc.write_json(reader_path(g, token), {"generation": g, "host": "test", "pid": 0,
                                               "renewed": now - 10, "expires": expires})
    distann.build(other, url, overwrite=True, **opts)  # generation 5
    assert not gen(3).exists() and gen(4).exists() and gen(5).exists()
    assert not Path(url, reader_path(3, "expired0")).exists()
    distann.build(other, url, overwrite=True, **opts)  # generation 6: g4 is still held
    assert gen(4).exists() and gen(5).exists() and gen(6).exists()
    loc.remove(reader_path(4, "live0000"))


def test_a_reader_lease_is_renewed_while_open(client, make_index, data):
    url = make_index("IVF64,Flat")
    with dask.config.set({"distann.search.reader-lease-seconds": 1}):
        di = distann.open_index(url, client=client)
    try:
        path = Path(url, di._lease.path)
        first = json.loads(path.read_text())
        assert first["expires"] - first["renewed"] == pytest.approx(1.0)
        time.sleep(1.6)  # longer than the lease: only renewals keep it alive
        assert held_generations(di.local.loc) == {1}
        assert json.loads(path.read_text())["expires"] > first["expires"] + 0.5
    finally:
        di.close()
    assert not path.exists() and held_generations(di.local.loc) == set()


# --------------------------------------------------------------------------- worker deaths
def _judge(outcomes, unavailable_ok: bool) -> None:
    """Every search of a stream: identical to local, or (``unavailable_ok``) ShardsUnavailableError."""
    bad = [o for _, o in outcomes
           if o != "same" and not (unavailable_ok and isinstance(o, ShardsUnavailableError))]
    assert not bad, bad[:3]


def test_a_worker_killed_mid_stream_loses_no_answer(proc_cluster, make_index, data):
    """replicas=1: the victim's shards are recomputed on the survivor; meanwhile every search
    answers identically (later) or raises ShardsUnavailableError, never something else."""
    _, xq = data
    url = make_index("IVF64,Flat")
    local = distann.open_index(url)
    want = local.search(xq, k=K, nprobe=NPROBE)
    c = proc_cluster.client
    di = distann.open_index(url, client=c)
    try:
        n = len(di.manifest.shards)
        placement = di.placement()
        victim = placement["s000000"][0]
        survivor = next(w for w in proc_cluster.pids if w != victim)
        lost = [s for s, where in placement.items() if where == [victim]]
        assert lost and len(lost) < n  # both workers hold shards; the victim's will be recomputed

        stream = Stream(di, xq, want)
        _wait_until(lambda: stream.count() >= 3, 60, "three searches before the kill")
        killed_at = time.monotonic()
        proc_cluster.kill(victim)
        _wait_until(lambda: all(w == [survivor] for w in di.placement().values()), 60,
                    "every shard resident on the surviving worker")
        recovered_at = time.monotonic()
        _wait_until(lambda: stream.count(since=recovered_at) >= 3, 60, "three searches after the recovery")
        outcomes = stream.stop()
        _judge(outcomes, unavailable_ok=True)
        assert any(t > killed_at and o == "same" for t, o in outcomes)
        assert all(o == "same" for t, o in outcomes if t >= recovered_at)
        assert di.health() == {"generation": 1, "shards": n, "shards_resident": n, "replicas": 1,
                               "copies_resident": n, "workers": 1}
        _same(di.search(xq, k=K, nprobe=NPROBE), want)
        _same(di.range_search(xq, 30.0, NPROBE), local.range_search(xq, 30.0, NPROBE))
    finally:
        di.close()


def test_replicas_answer_at_once_while_a_copy_is_down(proc_cluster, make_index, data):
    """replicas=2: a search right after a kill is answered by the other copies, without error."""
    _, xq = data
    url = make_index("IVF64,Flat")
    want = distann.open_index(url).search(xq, k=K, nprobe=NPROBE)
    di = distann.open_index(url, client=proc_cluster.client, replicas=2)
    try:
        n = len(di.manifest.shards)
        victim = sorted(proc_cluster.pids)[0]
        stream = Stream(di, xq, want)
        _wait_until(lambda: stream.count() >= 2, 60, "two searches before the kill")
        killed_at = time.monotonic()
        proc_cluster.kill(victim)
        at_once = [_outcome(di, xq, want) for _ in range(3)]  # in this thread too, beside the stream
        time.sleep(max(0.0, killed_at + 3 - time.monotonic()))
        outcomes = stream.stop() + at_once
        _judge(outcomes, unavailable_ok=False)
        assert sum(1 for t, _ in outcomes if t > killed_at) >= 3
        assert di.health()["shards_resident"] == n
        _same(di.search(xq, k=K, nprobe=NPROBE), want)
    finally:
        di.close()


def test_a_search_while_lost_shards_are_recomputed_waits_for_them(proc_cluster, make_index, data):
    """The survivor is kept busy (one thread, a 3 s task) so the victim's shards stay lost, with
    no copy anywhere, while a search is submitted: it must wait for their recomputation."""
    _, xq = data
    url = make_index("IVF64,Flat")
    want = distann.open_index(url).search(xq, k=K, nprobe=NPROBE)
    c = proc_cluster.client
    di = distann.open_index(url, client=c)
    try:
        victim = di.placement()["s000000"][0]
        survivor = next(w for w in proc_cluster.pids if w != victim)
        blocker = c.submit(time.sleep, 3, workers=[survivor], pure=False)
        _wait_until(lambda: c.processing([survivor])[survivor], 30, "the blocker running on the survivor")
        proc_cluster.kill(victim)
        _wait_until(lambda: di.shards[0][0].status != "finished", 30, "the client told that s000000 is lost")
        assert di.placement()["s000000"] == [] and blocker.status == "pending"
        _same(di.search(xq, k=K, nprobe=NPROBE, timeout=60), want)
        assert blocker.status == "finished"
    finally:
        di.close()


def test_a_shard_that_cannot_come_back_fails_or_is_left_out(proc_cluster, make_index, data, tmp_path):
    """Deterministic partial results: the only copy of a shard dies with its worker and its
    files are gone, so its reload on the survivor fails for good (no timing involved)."""
    _, xq = data
    url = _copy_index(make_index("IVF64,Flat"), tmp_path / "idx.zarr")
    local = distann.open_index(url).load()  # in memory: the reference survives the deletion
    di = distann.open_index(url, client=proc_cluster.client)
    try:
        n = len(di.manifest.shards)
        placement = di.placement()
        victim = placement["s000001"][0]
        doomed = "s000001"
        s = [e.name for e in di.manifest.shards].index(doomed)
        entry = di.manifest.shards[s]
        shutil.rmtree(Path(url, entry.path))
        proc_cluster.kill(victim)
        _wait_until(lambda: di.shards[s][0].status == "error" and di.health()["shards_resident"] == n - 1, 60,
                    "the other shards back on the survivor, the doomed one failed")
        assert di.placement()[doomed] == []

        with pytest.raises(ShardsUnavailableError) as info:
            di.search(xq, k=K, nprobe=NPROBE)
        assert info.value.shards == [doomed] and info.value.timed_out is False
        assert doomed in str(info.value)

        # what the others answer is local search without the doomed shard's vectors
        block = local.lists.resident
        gone = block.ids[block.offsets[entry.list_start]:block.offsets[entry.list_stop]]
        assert len(gone) == entry.ntotal > 0
        rest = np.setdiff1d(np.arange(N), gone)
        r = di.search_result(xq, k=K, nprobe=NPROBE, allow_partial=True)
        assert r.missing_shards == [doomed]
        kern = get_backend("numba")
        q = local._prepare(xq, NPROBE, None, None, None)[1]
        plan = local._coarse(kern, q, NPROBE, None)
        in_doomed = (plan.lists >= entry.list_start) & (plan.lists < entry.list_stop)
        pairs_doomed = int(np.diff(plan.group_offsets)[in_doomed].sum())
        assert 0 < pairs_doomed < len(plan.group_queries)
        assert r.coverage == pytest.approx(1 - pairs_doomed / len(plan.group_queries))
        _same((r.D, r.I), local.search(xq, k=K, nprobe=NPROBE, ids_allowed=rest))
        rr = di.range_search_result(xq, 30.0, NPROBE, allow_partial=True)
        assert rr.missing_shards == [doomed] and rr.coverage == pytest.approx(r.coverage)
        _same((rr.lims, rr.D, rr.I), local.range_search(xq, 30.0, NPROBE, ids_allowed=rest))
    finally:
        di.close()


def test_scan_results_lost_with_their_worker_before_the_gather(proc_cluster, make_index, data, monkeypatch):
    """Deterministic form of a race of the streams above: every scan has answered, then a
    worker holding some of the answers dies before the coordinator gathers them
    (``distann.search.distributed._wait``, which ``_run`` calls, is wrapped to kill it right there). With a copy
    of every shard on the survivor the search must still answer, identically."""
    import distributed

    from distann.search import distributed as coordinator

    _, xq = data
    url = make_index("IVF64,Flat")
    want = distann.open_index(url).search(xq, k=K, nprobe=NPROBE)
    c = proc_cluster.client
    di = distann.open_index(url, client=c, replicas=2)
    real_wait = coordinator._wait
    killed = []

    def wait_then_kill(client, fs, timeout=None):
        out = real_wait(client, fs, timeout)
        if not killed and fs and all(isinstance(f, distributed.Future) for f in fs):
            holders = {w for ws in c.who_has(fs).values() for w in ws}
            victim = sorted(holders)[0]
            killed.append(victim)
            proc_cluster.kill(victim)
            _wait_until(lambda: any(f.status == "lost" for f in fs), 30, "the client told of the loss")
        return out

    try:
        monkeypatch.setattr(coordinator, "_wait", wait_then_kill)
        _same(di.search(xq, k=K, nprobe=NPROBE, timeout=60), want)
        assert killed
    finally:
        monkeypatch.undo()
        di.close()
