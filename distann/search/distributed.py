"""Cluster-hosted search: a coordinator on the client, the index's shards resident on workers.

``distann.open_index(url, client=client, replicas=R)`` returns a :class:`DistributedIndex`.

Placement. Each shard (replica) is the result of one Dask task, :func:`~distann.search.resident.
load_shard`, that reads it from the store. The tasks are spread over the workers by bytes
(largest shard first onto the least loaded workers; the ``R`` replicas of a shard on ``R``
distinct workers) with ``workers=[w], allow_other_workers=True``: a placement hint, not a
pin. The client holds the futures, so the shards stay in the workers' memory. Because each is
*computed* from the store (not scattered, not an Actor), when its worker dies the scheduler
computes it again on a surviving worker, with no action from the caller.

Search. The coordinator holds the centroids, the codec and the manifest. Per batch it
transforms and coarse-quantizes the queries, plans the probes (``search.plan``), groups them by
the shard owning each list and submits one task per probed shard, on one replica (a resident
one, on the worker with the least work in this batch), with only that shard's probes. The
batch's queries travel as one small task every scan depends on. A shard answers at most ``k``
results per query that probed it; the coordinator merges them with the same kernel and tie
rule (distance, then id) as local search, so results are identical to ``Index.search`` /
``range_search`` with the same parameters.

Failure. A scan task whose worker dies is run again by the scheduler once its shard is back
(on another replica's worker or recomputed from the store): the search completes, only later.
With replicas, a scan waiting on a copy lost with its worker is sent again to a resident copy;
the lost copy is dropped rather than recomputed next to the other one, and loaded again on a
worker holding no copy of the shard once there is one (the restarted worker), so that
``replicas=2`` survives the next death too (:meth:`DistributedIndex._respread`).
A shard that cannot be answered (its load fails, a task fails for good, or the ``timeout``
passes) raises :class:`~distann.errors.ShardsUnavailableError` naming the shards, or, with
``allow_partial=True``, returns what answered with ``coverage`` (fraction of probes answered)
and ``missing_shards``. Never a silently partial result.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distann.codecs.metric import kernel_metric
from distann.errors import IndexFormatError, ShardsUnavailableError, ValidationError
from distann.search.index import Index
from distann.search.plan import ProbePlan, shard_runs
from distann.search.resident import ShardProbes, ShardResult, batch_queries, load_shard, range_shard, scan_shard
from distann.store.readers import ReaderLease
from distann.validation import check_k, check_positive_int, check_radius

log = logging.getLogger(__name__)

#: with replicas, how often (s) a search checks whether a scan waits on a copy lost with its worker
_REROUTE_POLL = 0.25

#: a batch whose queries, repeated in every scan task, stay under this many bytes is sent inline
_INLINE_BYTES = 1 << 20


@dataclass
class SearchResult:
    """What a distributed search answered. kNN: ``D``, ``I`` (nq, k); range: also ``lims``.

    ``coverage``: fraction of the (query, list) probes answered (1.0 unless ``allow_partial``
    let a search return without some shards, then named in ``missing_shards``).
    ``shard_seconds``: worker time spent scanning, per shard name."""

    D: np.ndarray
    I: np.ndarray
    generation: int
    coverage: float = 1.0
    missing_shards: list[str] = field(default_factory=list)
    shard_seconds: dict[str, float] = field(default_factory=dict)
    lims: np.ndarray | None = None


def _check_client(client: Any) -> None:
    from distributed import Client

    if not isinstance(client, Client):
        raise ValidationError("client", client, "a distributed.Client connected to the cluster that serves the index")


class DistributedIndex:
    """An index served from a Dask cluster. Open with ``distann.open_index(url, client=...)``."""

    def __init__(self, local: Index, client, *, replicas: int = 1, lease: bool = True, wait: bool = True):
        _check_client(client)
        check_positive_int("replicas", replicas)
        nworkers = len(client.scheduler_info()["workers"])
        if replicas > max(1, nworkers):
            raise ValidationError("replicas", replicas, f"at most the number of workers of the cluster ({nworkers}): "
                                  "the copies of a shard live on distinct workers")
        self.local = local
        self.client = client
        self.replicas = replicas
        m = local.manifest
        self._row_starts = np.concatenate([[0], np.cumsum([s.ntotal for s in m.shards])]).astype(np.int64)
        self._names = [s.name for s in m.shards]
        self._token = uuid.uuid4().hex[:12]
        self.shards: list[list] = []  # futures, [shard][replica]
        self._where_cache: tuple[dict | None, float] = (None, 0.0)
        self._moves: dict[int, Any] = {}  # shard -> a copy of it being loaded on a worker holding none
        self._moves_lock = threading.Lock()
        self._backends_checked: set[str] = set()  # kernel backends every worker was seen to run
        self._lease = ReaderLease(local.loc, m.generation) if lease else None
        try:
            self._place()
            if wait:
                self.wait_resident()
        except BaseException:
            self.close()  # a failed open holds no shard and no lease
            raise

    # ------------------------------------------------------------------ placement
    def _row_bytes(self) -> int:
        return self.local.lists.row_bytes

    def _place(self) -> None:
        workers = sorted(self.client.scheduler_info()["workers"])
        load = dict.fromkeys(workers, 0)
        sizes = [e.ntotal * self._row_bytes() for e in self.local.manifest.shards]
        self.shards = [[] for _ in sizes]
        for s in sorted(range(len(sizes)), key=lambda s: -sizes[s]):
            chosen = sorted(workers, key=lambda w: (load[w], w))[:self.replicas] if workers else [None]
            for r, w in enumerate(chosen):
                load[w] = load.get(w, 0) + sizes[s]
                key = f"distann-shard-{self._token}-g{self.generation}-{s:05d}-r{r}"
                hint = {} if w is None else {"workers": [w], "allow_other_workers": True}  # no workers yet: any
                self.shards[s].append(self.client.submit(load_shard, self.local.loc, self.local.manifest, s, key=key,
                                                         pure=False, **hint))
        log.info("placing %d shard(s) x %d replica(s) of %s (%.1f MiB) on %d worker(s)", len(sizes), self.replicas,
                 self.url, sum(sizes) * self.replicas / 2**20, len(workers))

    def wait_resident(self, timeout: float | None = None) -> "DistributedIndex":
        """Block until every shard replica is in a worker's memory (IndexFormatError naming the
        shard if one cannot be loaded)."""
        futures = [f for reps in self.shards for f in reps]
        _wait(self.client, futures, timeout)
        for s, reps in enumerate(self.shards):
            for f in reps:
                if f.status == "error":
                    exc = f.exception()
                    raise IndexFormatError(f"{self.url}: shard {self._names[s]} could not be loaded on the cluster: "
                                           f"{type(exc).__name__}: {exc}") from exc
        return self

    def close(self) -> None:
        """Drop the shards from the workers' memory and release the generation's reader lease."""
        for reps in self.shards:
            for f in reps:
                f.release()
        self.shards = []
        with self._moves_lock:
            for f in self._moves.values():
                f.release()
            self._moves.clear()
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> "DistributedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ description
    url = property(lambda self: self.local.url)
    ntotal = property(lambda self: self.local.ntotal)
    d = property(lambda self: self.local.d)
    nlist = property(lambda self: self.local.nlist)
    metric = property(lambda self: self.local.metric)
    spec = property(lambda self: self.local.spec)
    generation = property(lambda self: self.local.manifest.generation)
    manifest = property(lambda self: self.local.manifest)

    def __repr__(self) -> str:
        return (f"<distann.DistributedIndex {self.spec} ntotal={self.ntotal} shards={len(self._names)} "
                f"replicas={self.replicas} at {self.url}>")

    def placement(self) -> dict[str, list[str]]:
        """Shard name -> addresses of the workers holding a copy now (empty: being recomputed)."""
        keys = {f.key: s for s, reps in enumerate(self.shards) for f in reps}
        out: dict[str, list[str]] = {n: [] for n in self._names}
        who = self.client.who_has([f for reps in self.shards for f in reps])
        for key, where in who.items():
            out[self._names[keys[key]]].extend(where)
        self._respread(who)
        return {n: sorted(set(w)) for n, w in out.items()}

    def health(self) -> dict[str, Any]:
        """Shards resident (at least one copy in memory), copies resident (on distinct workers: two
        copies on one worker count once), workers."""
        where = self.placement()
        copies = sum(min(len(w), self.replicas) for w in where.values())
        return {"generation": self.generation, "shards": len(self._names),
                "shards_resident": sum(1 for w in where.values() if w), "replicas": self.replicas,
                "copies_resident": copies, "workers": len(self.client.scheduler_info()["workers"])}

    def _respread(self, who: dict) -> None:
        """Keep the ``replicas`` copies of each shard on distinct workers (``who``: key -> workers,
        from ``who_has``; called on every refresh of the placement). While another copy of the
        shard is resident, a copy lost with its worker is dropped, not left for the scheduler to
        recompute on a survivor (next to the other copy, on the worker now serving that shard
        alone), and so is a copy sharing its worker with another. A shard short of copies gets
        one loaded on a worker holding none (least loaded first), added once resident. Dropped
        copies go with their last reference: a scan already submitted on one still completes."""
        if self.replicas < 2 or not self.shards or not self._moves_lock.acquire(blocking=False):
            return  # another thread is at it
        try:
            workers = sorted(self.client.scheduler_info()["workers"])
            for s, new in list(self._moves.items()):  # loads started earlier
                if new.status == "pending":
                    continue
                del self._moves[s]
                there = set(self.client.who_has([new]).get(new.key, ())) if new.status == "finished" else set()
                taken = set().union(*(who.get(f.key, ()) for f in self.shards[s]))
                if there and not there & taken:
                    who = {**who, new.key: tuple(there)}
                    self.shards[s] = [*self.shards[s], new]
                    log.info("shard %s: a copy loaded on %s", self._names[s], ", ".join(sorted(there)))
            load = dict.fromkeys(workers, 0)
            for s, reps in enumerate(self.shards):
                kept, seen = [], set()
                for f in reps:
                    where = set(who.get(f.key, ()))
                    if f.status == "finished" and where and not where & seen:
                        kept.append(f)
                        seen |= where
                resident = len(kept)
                kept += [f for f in reps if f.status == "pending"]  # still being loaded for the first time
                if resident and len(kept) < len(reps):
                    self.shards[s] = kept
                for w in seen:
                    if w in load:
                        load[w] += 1
            for s, reps in enumerate(self.shards):
                if len(reps) >= self.replicas or s in self._moves:
                    continue
                taken = set().union(*(who.get(f.key, ()) for f in reps))
                free = [w for w in workers if w not in taken]
                if not free:
                    continue
                w = min(free, key=lambda w: (load[w], w))
                load[w] += 1
                key = f"distann-shard-{self._token}-g{self.generation}-{s:05d}-{uuid.uuid4().hex[:8]}"
                self._moves[s] = self.client.submit(load_shard, self.local.loc, self.local.manifest, s, key=key,
                                                    pure=False, workers=[w], allow_other_workers=True)
        finally:
            self._moves_lock.release()

    def info(self) -> dict[str, Any]:
        out = self.local.info()
        out.pop("bytes_in_memory", None)
        out.update({"replicas": self.replicas, "bytes_on_workers": self.local.lists.nbytes * self.replicas,
                    "scheduler": self.client.scheduler.address})
        return out

    # ------------------------------------------------------------------ search
    def search(self, xq, k: int | None = None, nprobe: int | None = None, *, max_codes: int | None = None,
               ids_allowed=None, k_factor: int | None = None, backend: str | None = None,
               timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`Index.search` (same results), on the cluster: ``(D, I)``. ``timeout``
        (seconds) bounds the whole call; ShardsUnavailableError if a shard does not answer."""
        r = self.search_result(xq, k, nprobe, max_codes=max_codes, ids_allowed=ids_allowed, k_factor=k_factor,
                               backend=backend, timeout=timeout)
        return r.D, r.I

    def range_search(self, xq, radius: float, nprobe: int | None = None, *, max_codes: int | None = None,
                     ids_allowed=None, backend: str | None = None,
                     timeout: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`Index.range_search` (same results), on the cluster: ``(lims, D, I)``."""
        r = self.range_search_result(xq, radius, nprobe, max_codes=max_codes, ids_allowed=ids_allowed,
                                     backend=backend, timeout=timeout)
        return r.lims, r.D, r.I

    def _check_backend(self, backend: str | None) -> str:
        """The backend name the shard tasks get; the workers are checked to run it the first
        time it is used with this index (shards do not move to workers that join later)."""
        from distann.cluster import check_backend
        from distann.kernels import resolve_backend

        key = resolve_backend(backend)
        if key not in self._backends_checked:
            check_backend(self.client, key)
            self._backends_checked.add(key)
        return key

    def search_result(self, xq, k: int | None = None, nprobe: int | None = None, *, max_codes: int | None = None,
                      ids_allowed=None, k_factor: int | None = None, backend: str | None = None,
                      timeout: float | None = None, allow_partial: bool = False) -> SearchResult:
        """kNN search returning a :class:`SearchResult` (coverage, missing shards, per-shard
        time). With ``allow_partial``, shards that fail or miss the ``timeout`` are left out
        and named instead of failing the call."""
        local = self.local
        k = check_k(local.defaults.k if k is None else k)
        k_factor = check_positive_int("k_factor", local.defaults.k_factor if k_factor is None else k_factor)
        xq_raw, xq, nprobe, max_codes, allowed, kern = local._prepare(xq, nprobe, max_codes, ids_allowed, backend)
        deadline = _deadline(timeout)
        refine = local.codec.refine
        kk = k * k_factor if refine else k
        bname = self._check_backend(backend)
        nq = len(xq)
        D = np.empty((nq, k), np.float32)
        I = np.empty((nq, k), np.int64)
        acc = _Tally()
        for s, e in local._batches(nq):
            q = np.ascontiguousarray(xq[s:e])
            plan = local._coarse(kern, q, nprobe, max_codes)
            results = self._run(plan, q, xq_raw[s:e] if refine else None, scan_shard, (k, k_factor, allowed, bname),
                                deadline, allow_partial, acc)
            D[s:e], I[s:e] = self._merge_knn(kern, len(q), results, k, kk)
        return acc.result(D, I, self.generation)

    def range_search_result(self, xq, radius: float, nprobe: int | None = None, *, max_codes: int | None = None,
                            ids_allowed=None, backend: str | None = None, timeout: float | None = None,
                            allow_partial: bool = False) -> SearchResult:
        """Range search returning a :class:`SearchResult` (``lims``, ``D``, ``I``)."""
        local = self.local
        radius = check_radius(radius, self.metric)
        xq_raw, xq, nprobe, max_codes, allowed, kern = local._prepare(xq, nprobe, max_codes, ids_allowed, backend)
        deadline = _deadline(timeout)
        bname = self._check_backend(backend)
        lims_parts, D_parts, I_parts, base = [np.zeros(1, np.int64)], [], [], 0
        acc = _Tally()
        for s, e in local._batches(len(xq)):
            q = np.ascontiguousarray(xq[s:e])
            plan = local._coarse(kern, q, nprobe, max_codes)
            results = self._run(plan, q, xq_raw[s:e] if local.codec.refine else None, range_shard,
                                (radius, allowed, bname), deadline, allow_partial, acc)
            lims, Dr, Ir = _merge_range(len(q), results, kernel_metric(self.metric))
            lims_parts.append(lims[1:] + base)
            base += int(lims[-1])
            D_parts.append(Dr)
            I_parts.append(Ir)
        out = acc.result(np.concatenate(D_parts) if D_parts else np.empty(0, np.float32),
                         np.concatenate(I_parts) if I_parts else np.empty(0, np.int64), self.generation)
        out.lims = np.concatenate(lims_parts)
        return out

    # ------------------------------------------------------------------ fan-out
    def _shard_probes(self, plan: ProbePlan, a: int, b: int, s: int) -> ShardProbes:
        """The probes of plan lists ``a:b`` (all in shard ``s``), relative to the shard."""
        entry = self.local.manifest.shards[s]
        g0, g1 = int(plan.group_offsets[a]), int(plan.group_offsets[b])
        queries_all = plan.group_queries[g0:g1]
        queries, inv = np.unique(queries_all, return_inverse=True)
        slots_all = plan.group_slots[g0:g1]
        # number each query's probes within this shard 0, 1, ... (the partial results are that wide)
        order = np.lexsort((slots_all, inv))
        first = np.searchsorted(inv[order], np.arange(len(queries)))
        slots = np.empty(len(inv), np.int64)
        slots[order] = np.arange(len(inv)) - np.repeat(first, np.diff(np.append(first, len(inv))))
        counts = np.zeros(entry.list_stop - entry.list_start, np.int64)
        counts[plan.lists[a:b] - entry.list_start] = np.diff(plan.group_offsets[a:b + 1])
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        nprobe = int(np.bincount(inv).max()) if len(inv) else 1
        return ShardProbes(queries, offsets, inv.astype(np.int64), slots, plan.group_limits[g0:g1].copy(), nprobe)

    def _pick(self, s: int, work: dict, where: dict, npairs: int):
        """The replica of shard ``s`` to scan: a resident one on the worker with the least work
        in this batch (a copy being recomputed only when no other is resident)."""
        reps = self.shards[s]
        ready = [f for f in reps if f.status == "finished"] or reps
        best = min(ready, key=lambda f: work.get(where.get(f.key), 0))
        w = where.get(best.key)
        work[w] = work.get(w, 0) + npairs
        return best

    def _where(self) -> dict:
        """Key -> one worker holding it: where each scan is sent (a hint: the scheduler may still
        run it elsewhere). Asked of the scheduler at most once a second, and again as soon as a
        shard copy is not resident (a worker died)."""
        now = time.monotonic()
        cached, at = self._where_cache
        if cached is None or now - at > 1.0 or any(f.status != "finished" for reps in self.shards for f in reps):
            futures = [f for reps in self.shards for f in reps]
            who = self.client.who_has(futures)
            cached = {k: v[0] for k, v in who.items() if v}
            self._where_cache = (cached, now)
            self._respread(who)
        return cached

    def _run(self, plan: ProbePlan, q: np.ndarray, q_raw, fn, args: tuple, deadline, allow_partial: bool,
             acc: "_Tally") -> list[ShardResult]:
        client = self.client
        if not self.shards:
            raise ValidationError("index", self, "an open distributed index (this one was closed)")
        runs = shard_runs(plan.lists, self.local.lists.shard_starts)
        # Small batches travel inside each scan task; a large one once per worker, as a task
        # of its own (computed, so a worker lost with it does not lose it).
        inline = q.nbytes * (2 if q_raw is not None else 1) * max(1, len(runs)) <= _INLINE_BYTES
        batch = batch_queries(q, q_raw) if inline else client.submit(batch_queries, q, q_raw, pure=False)
        where, work = self._where(), {}
        tasks = []
        for s, a, b in runs:
            probes = self._shard_probes(plan, a, b, s)
            replica = self._pick(s, work, where, probes.npairs)
            w = where.get(replica.key)
            hint = {} if w is None else {"workers": [w], "allow_other_workers": True}
            tasks.append([s, probes.npairs, client.submit(fn, replica, batch, probes, *args, pure=False, **hint),
                          replica, probes])
        timed_out = False
        poll = _REROUTE_POLL if self.replicas > 1 else None
        while True:  # a finished scan whose result was lost with its worker is computed again
            waiting = [t for t in tasks if t[2].status not in ("finished", "error", "cancelled")]
            if not waiting:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                timed_out = True
                break
            if poll is not None:
                self._reroute(waiting, fn, batch, args)
            try:
                _wait(client, [t[2] for t in waiting], remaining if poll is None else min(poll, remaining or poll))
            except TimeoutError:
                if poll is None:
                    timed_out = True
                    break
        tasks = [(s, npairs, f) for s, npairs, f, _, _ in tasks]
        done, failed = [], []
        for s, npairs, f in tasks:
            (done if f.status == "finished" else failed).append((s, npairs, f))
        results = client.gather([f for _, _, f in done]) if done else []
        acc.pairs += int(sum(n for _, n, _ in tasks))
        acc.answered += int(sum(n for _, n, _ in done))
        for r in results:
            acc.seconds[self._names[r.shard]] = acc.seconds.get(self._names[r.shard], 0.0) + r.seconds
        if failed:
            client.cancel([f for _, _, f in failed])
            names = sorted({self._names[s] for s, _, _ in failed})
            timed_out = timed_out and any(f.status not in ("error", "finished") for _, _, f in failed)
            reasons = {type(f.exception()).__name__ + ": " + str(f.exception())
                       for _, _, f in failed if f.status == "error"}
            acc.missing.update(names)
            if not allow_partial:
                why = ("the deadline passed" if timed_out else "; ".join(sorted(reasons))[:500]
                       or "their tasks were cancelled")
                raise ShardsUnavailableError(f"{self.url}: {len(names)} shard(s) did not answer ({why}): "
                                             f"{', '.join(names[:20])}{' ...' if len(names) > 20 else ''}",
                                             names, timed_out=timed_out)
        if not inline:
            batch.release()
        return results

    def _reroute(self, waiting: list, fn, batch, args: tuple) -> None:
        """Send again, to a resident copy, each waiting scan whose copy was lost with its worker
        (``[shard, npairs, future, copy, probes]`` entries, updated in place) instead of waiting
        for the scheduler to recompute that copy; the scan left behind is dropped."""
        for t in waiting:
            s, replica = t[0], t[3]
            if replica.status != "lost":
                continue
            resident = [f for f in self.shards[s] if f.status == "finished"]
            if not resident:
                continue  # no copy left: the scheduler recomputes it from the store
            t[3] = resident[0]
            t[2] = self.client.submit(fn, t[3], batch, t[4], *args, pure=False)
            log.debug("shard %s: a scan on a copy lost with its worker sent to another copy", self._names[s])

    # ------------------------------------------------------------------ merging
    def _merge_knn(self, kern, nq: int, results: list[ShardResult], k: int, kk: int):
        kmetric = kernel_metric(self.metric)
        pad = -np.inf if kmetric == "ip" else np.inf
        counts = np.zeros(nq, np.int64)
        for r in results:
            counts[r.queries] += 1
        m = max(1, int(counts.max()) if nq else 1)
        Dall = np.full((nq, m, kk), pad, np.float32)
        Iall = np.full((nq, m, kk), -1, np.int64)
        refine = self.local.codec.refine
        if refine:
            Xall = np.full((nq, m, kk), pad, np.float32)
            IDall = np.full((nq, m, kk), -1, np.int64)
        slot = np.zeros(nq, np.int64)
        for r in results:
            sl = slot[r.queries]
            Dall[r.queries, sl] = r.D
            if refine:  # global row positions: the tie rule of local search's candidates
                Iall[r.queries, sl] = np.where(r.I >= 0, r.I + self._row_starts[r.shard], -1)
                Xall[r.queries, sl] = r.exact
                IDall[r.queries, sl] = r.ids
            else:
                Iall[r.queries, sl] = r.I
            slot[r.queries] += 1
        D, I = kern.merge_topk(Dall.reshape(nq, -1), Iall.reshape(nq, -1), kk, kmetric)
        if not refine:
            return D, I
        # the global candidates (by the codec's distance), then their best k by exact distance
        total = int(self._row_starts[-1]) + 1
        key = (np.arange(nq, dtype=np.int64)[:, None, None] * total + Iall).reshape(-1)  # unique per (query, row)
        keep = Iall.reshape(-1) >= 0
        key, ex, ids = key[keep], Xall.reshape(-1)[keep], IDall.reshape(-1)[keep]
        order = np.argsort(key)
        want = np.arange(nq, dtype=np.int64)[:, None] * total + np.maximum(I, 0)
        at = order[np.minimum(np.searchsorted(key[order], want), max(0, len(key) - 1))] if len(key) else np.zeros_like(I)
        Ex = np.where(I >= 0, ex[at] if len(key) else pad, pad).astype(np.float32)
        Ids = np.where(I >= 0, ids[at] if len(key) else -1, -1)
        return kern.merge_topk(Ex, Ids, k, kmetric)


def _merge_range(nq: int, results: list[ShardResult], kmetric: str):
    """Concatenate the shards' range results per query, best first, ties by id (as local)."""
    if not results:
        return np.zeros(nq + 1, np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
    q = np.concatenate([np.repeat(r.queries, np.diff(r.lims)) for r in results])
    D = np.concatenate([r.D for r in results]).astype(np.float32)
    I = np.concatenate([r.I for r in results]).astype(np.int64)
    order = np.lexsort((I, -D if kmetric == "ip" else D, q))
    lims = np.zeros(nq + 1, np.int64)
    np.cumsum(np.bincount(q, minlength=nq), out=lims[1:])
    return lims, D[order], I[order]


def _wait(client, futures: list, timeout: float | None) -> None:
    """Wait until every future is done (TimeoutError after ``timeout`` s) on ``client``'s event
    loop: ``distributed.wait`` uses the default client's, which may be another client's."""
    from distributed import as_completed

    for _ in as_completed(futures, loop=client.loop, timeout=timeout):
        pass


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValidationError("timeout", timeout, "a number of seconds > 0, or None for no deadline")
    return time.monotonic() + float(timeout)


@dataclass
class _Tally:
    pairs: int = 0
    answered: int = 0
    missing: set = field(default_factory=set)
    seconds: dict = field(default_factory=dict)

    def result(self, D, I, generation: int) -> SearchResult:
        coverage = self.answered / self.pairs if self.pairs else 1.0
        return SearchResult(D, I, generation, coverage, sorted(self.missing), dict(self.seconds))
