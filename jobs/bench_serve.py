"""Cluster-hosted search benchmark: distributed vs local batch search, and the HTTP service
under load (micro-batching on and off, a worker killed mid-load), in one run.

    python jobs/bench_serve.py [--n 1000000] [--d 64] [--nlist 1024] [--seconds 30]

On an embedded LocalCluster of 2 single-threaded worker processes:

(a) batch QPS of ``nq`` queries, local resident ``Index.search`` (all cores of this process) vs
    ``DistributedIndex.search`` (the shards resident on the 2 workers), same index, same
    parameters, results checked identical; faiss-cpu ``IndexIVFFlat`` / ``IndexIVFScalarQuantizer``
    on the same data and threads for reference. For each codec of ``--codecs``.
(b) ``distann serve`` (its own process, joined to the cluster) under ``--clients`` concurrent
    clients sending single queries for ``--seconds`` (``jobs/_loadgen.py``, its own process,
    loopback only): throughput, p50 / p99 latency, errors; micro-batching on, then off.
(c) the same load while one worker is killed (SIGKILL; its nanny starts it again), with
    ``replicas=2`` and ``replicas=1``: errors, latency while shards are recovering, time until
    every shard copy is resident again.
(d) chaos: ``--clients`` clients for ``--chaos-seconds`` (60) while a worker is SIGKILLed every
    ``--kill-every`` seconds (15; the two workers in turn), ``replicas=2``: errors (target zero),
    p50 / p99 latency, each kill's recovery time.

``--phases`` runs a subset (e.g. ``--phases chaos``); the other phases' results already in
serve.json are kept. ``--reuse`` skips building an index that already exists.
Writes docs/benchmarks/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distann  # noqa: E402
from distann.cluster import client_context  # noqa: E402
from distann.synthetic import synthetic, write_npy  # noqa: E402
from _measure import machine, timed  # noqa: E402

log = logging.getLogger("bench_serve")
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_phase(client, url: str, codec: str, xb_path: str, xq: np.ndarray, args) -> dict:
    """(a): local vs distributed batch QPS on one index (and faiss-cpu for reference)."""
    import faiss

    local = distann.open_index(url).load()
    local.search(xq[:200], k=args.k, nprobe=args.nprobe)  # compile
    D0, I0 = local.search(xq, k=args.k, nprobe=args.nprobe)
    t_local = timed(lambda: local.search(xq, k=args.k, nprobe=args.nprobe), args.repeats)
    with distann.open_index(url, client=client) as di:
        di.search(xq[:200], k=args.k, nprobe=args.nprobe)  # compile on the workers
        D1, I1 = di.search(xq, k=args.k, nprobe=args.nprobe)
        t_dist = timed(lambda: di.search(xq, k=args.k, nprobe=args.nprobe), args.repeats)
        shards = len(di.manifest.shards)
    del local
    xb = np.load(xb_path, mmap_mode="r")
    quantizer = faiss.IndexFlatL2(args.d)
    if codec == "Flat":
        fidx = faiss.IndexIVFFlat(quantizer, args.d, args.nlist)
    else:
        fidx = faiss.IndexIVFScalarQuantizer(quantizer, args.d, args.nlist, faiss.ScalarQuantizer.QT_8bit)
    fidx.train(np.ascontiguousarray(xb[:args.nlist * 256]))
    fidx.add(np.ascontiguousarray(xb))
    fidx.nprobe = args.nprobe
    t_faiss = timed(lambda: fidx.search(xq, args.k), args.repeats)
    return {"codec": codec, "shards": shards, "nq": len(xq), "nprobe": args.nprobe, "k": args.k,
            "local_qps": len(xq) / t_local, "distributed_qps": len(xq) / t_dist, "faiss_qps": len(xq) / t_faiss,
            "ratio_distributed_to_local": t_local / t_dist,
            "identical": bool(np.array_equal(I0, I1) and np.array_equal(D0, D1))}


class Service:
    """``distann serve`` in its own process, joined to the benchmark's cluster."""

    def __init__(self, url: str, scheduler: str, *, replicas: int, wait_ms: float, token: str):
        import httpx

        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "distann.cli", "--no-progress", "--log-level", "WARNING",
                                      "serve", url, "--scheduler", scheduler, "--port", str(self.port),
                                      "--replicas", str(replicas), "--batch-wait-ms", str(wait_ms)],
                                     env={**os.environ, "DISTANN_TOKEN": token})
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.address + "/health?ready=1", headers=self.headers).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.2)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.address + "/health", headers=self.headers, timeout=30).json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(service: Service, queries: str, args, token: str) -> dict:
    """Run the load generator against ``service``; per-request (start, latency, status)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    subprocess.run([sys.executable, os.path.join(HERE, "_loadgen.py"), service.address, queries,
                    "--clients", str(args.clients), "--seconds", str(args.seconds), "--nprobe", str(args.nprobe),
                    "--k", str(args.k), "--out", out], check=True, env={**os.environ, "DISTANN_TOKEN": token})
    with open(out) as fh:
        data = json.load(fh)
    os.remove(out)
    return data


def summarize(rows: list, t_from: float = 0.0, t_to: float = float("inf")) -> dict:
    sel = [(s, lat, st) for s, lat, st in rows if t_from <= s < t_to]
    if not sel:
        return {"requests": 0}
    lat = np.array([r[1] for r in sel if r[2] == 200])
    span = max(s + lat_ for s, lat_, _ in sel) - min(s for s, _, _ in sel)
    errors = sum(1 for r in sel if r[2] != 200)
    out = {"requests": len(sel), "errors": errors, "qps": (len(sel) - errors) / max(span, 1e-9)}
    if len(lat):
        out.update({"p50_ms": float(np.median(lat) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
                    "max_ms": float(lat.max() * 1e3)})
    return out


def kill_phase(client, service: Service, queries: str, args, token: str, replicas: int) -> dict:
    """(c): the load while one worker is SIGKILLed after a third of the run."""
    pids = client.run(os.getpid)
    result: dict = {}

    def killer():
        time.sleep(args.seconds / 3)
        victim, pid = sorted(pids.items())[0]
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        result["killed"] = victim
        expected = None
        while time.perf_counter() - t_kill < 300:
            h = service.health()
            expected = expected or h["shards"] * replicas
            if h["shards_resident"] == h["shards"] and h["copies_resident"] == expected and h["workers"] == 2 \
                    and time.perf_counter() - t_kill > 0.5:
                break
            time.sleep(0.1)
        result["t_kill"] = t_kill
        result["resident_again_s"] = time.perf_counter() - t_kill

    t = threading.Thread(target=killer)
    t.start()
    data = load(service, queries, args, token)
    t.join()
    rows, t0 = data["requests"], data["t0"]
    k0 = result["t_kill"] - t0
    k1 = k0 + result["resident_again_s"]
    return {"replicas": replicas, "killed": result["killed"], "resident_again_s": result["resident_again_s"],
            "whole_run": summarize(rows), "before_kill": summarize(rows, 0, k0),
            "during_recovery": summarize(rows, k0, k1), "after_recovery": summarize(rows, k1)}


def _by_second(rows: list) -> list:
    """(second, requests started, errors, max latency ms) for each second of the run."""
    out: dict[int, list] = {}
    for start, lat, st in rows:
        b = out.setdefault(int(start), [0, 0, 0.0])
        b[0] += 1
        b[1] += st != 200
        b[2] = max(b[2], lat * 1e3)
    return [(sec, *vals) for sec, vals in sorted(out.items())]


def chaos_phase(client, service: Service, queries: str, args, token: str) -> dict:
    """(d): the load while a worker is SIGKILLed every ``--kill-every`` seconds, the two in turn."""
    kills: list[dict] = []
    timeline: list[tuple] = []  # (time, shards resident, copies on distinct workers, workers)
    stop = threading.Event()
    expected_copies = None

    def resident(h: dict) -> bool:
        return (h["shards_resident"] == h["shards"] and h["copies_resident"] == expected_copies
                and h["workers"] == 2)

    def killer():
        nonlocal expected_copies
        h = service.health()
        expected_copies = h["shards"] * 2
        survivors: set = set()
        for i in range(math.ceil(args.chaos_seconds / args.kill_every) - 1):  # kills inside the run only
            if stop.wait(args.kill_every if i == 0 else max(0.0, t_next - time.perf_counter())):
                return
            t_next = time.perf_counter() + args.kill_every
            pids = client.run(os.getpid)  # the workers alive now (a restarted one has a new address)
            # the two in turn: the survivor of the last kill (not its restarted replacement)
            victim, pid = sorted(pids.items(), key=lambda kv: (kv[0] not in survivors, kv[0]))[0]
            survivors = set(pids) - {victim}
            t_kill = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            back = None
            while time.perf_counter() - t_kill < args.kill_every - 0.5:
                try:
                    h = service.health()
                    timeline.append((time.perf_counter(), h["shards_resident"], h["copies_resident"], h["workers"]))
                    if back is None and time.perf_counter() - t_kill > 0.5 and resident(h):
                        back = time.perf_counter() - t_kill
                except Exception:  # noqa: BLE001 - the health probe may time out under load: probe again
                    pass
                time.sleep(0.25)
            kills.append({"worker": victim, "t_kill": t_kill, "resident_again_s": back})
            log.info("killed %s; all copies resident again after %s s", victim,
                     "more than the kill interval" if back is None else f"{back:.1f}")

    t = threading.Thread(target=killer)
    t.start()
    saved = args.seconds
    args.seconds = args.chaos_seconds
    try:
        data = load(service, queries, args, token)
    finally:
        args.seconds = saved
        stop.set()
        t.join()
    rows, t0 = data["requests"], data["t0"]
    statuses: dict[str, int] = {}
    for _, _, st in rows:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    windows = []
    for k in kills:
        k0 = k["t_kill"] - t0
        windows.append({"worker": k["worker"], "at_s": k0, "resident_again_s": k["resident_again_s"],
                        "next_5s": summarize(rows, k0, k0 + 5.0)})
    return {"replicas": 2, "clients": args.clients, "seconds": args.chaos_seconds, "kill_every_s": args.kill_every,
            "kills": windows, "statuses": statuses, "whole_run": summarize(rows),
            "health": [(round(t - t0, 2), *rest) for t, *rest in timeline],
            "latency_by_second": _by_second(rows),
            "machine": machine()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--codecs", nargs="+", default=["Flat", "SQ8"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--chaos-seconds", type=float, default=60.0)
    p.add_argument("--kill-every", type=float, default=15.0)
    p.add_argument("--phases", nargs="+", default=["batch", "load", "kill", "chaos"],
                   choices=["batch", "load", "kill", "chaos"])
    p.add_argument("--reuse", action="store_true", help="do not rebuild an index that already exists")
    p.add_argument("--skip-load", action="store_true", help="only (a)")
    p.add_argument("--data", default="data/bench")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distann.train.kmeans").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    os.makedirs(args.data, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    import faiss

    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    path = os.path.join(args.data, f"synthetic-{args.n}x{args.d}.npy")
    if not os.path.exists(path):
        write_npy(path, args.n, args.d)
    xq = synthetic(args.nq, args.d, stream=1)
    qpath = os.path.join(args.data, f"serve-queries-{args.d}.npy")
    np.save(qpath, xq[:1000])
    token = "bench-" + os.urandom(8).hex()
    phases = set(args.phases) - ({"load", "kill", "chaos"} if args.skip_load else set())
    report = {"machine": machine(), "n": args.n, "d": args.d, "nlist": args.nlist, "workers": 2,
              "batch": [], "load": {}, "kill": []}
    previous = os.path.join(args.out, "serve.json")
    if phases != {"batch", "load", "kill", "chaos"} and os.path.exists(previous):
        with open(previous) as f:
            report = json.load(f)  # keep the results of the phases not run now
    with client_context(workers=2) as client:
        urls = {}
        for codec in args.codecs:
            urls[codec] = os.path.join(args.data, f"serve-index-{args.n}x{args.d}-{codec}.zarr")
            if not (args.reuse and os.path.exists(os.path.join(urls[codec], "manifest.json"))):
                log.info("build IVF%d,%s", args.nlist, codec)
                distann.build(path, urls[codec], spec=f"IVF{args.nlist},{codec}", client=client, overwrite=True)
            if "batch" in phases:
                if codec == args.codecs[0]:
                    report["batch"] = []
                log.info("(a) batch search, %s", codec)
                report["batch"].append(batch_phase(client, urls[codec], codec, path, xq, args))
                log.info("%s", report["batch"][-1])
        url = urls[args.codecs[0]]
        scheduler = client.scheduler.address
        if "load" in phases:
            for name, wait_ms in (("micro-batching", 2.0), ("no batching", 0.0)):
                log.info("(b) HTTP load, %s", name)
                svc = Service(url, scheduler, replicas=1, wait_ms=wait_ms, token=token)
                try:
                    report["load"][name] = summarize(load(svc, qpath, args, token)["requests"])
                finally:
                    svc.stop()
                log.info("%s: %s", name, report["load"][name])
            lb = report["load"]
            report["batching_speedup"] = lb["micro-batching"]["qps"] / lb["no batching"]["qps"]
        if "kill" in phases:
            report["kill"] = []
            for replicas in (2, 1):
                log.info("(c) HTTP load with a worker killed, replicas=%d", replicas)
                client.wait_for_workers(2, timeout=300)
                svc = Service(url, scheduler, replicas=replicas, wait_ms=2.0, token=token)
                try:
                    report["kill"].append(kill_phase(client, svc, qpath, args, token, replicas))
                finally:
                    svc.stop()
                log.info("%s", report["kill"][-1])
        if "chaos" in phases:
            log.info("(d) HTTP load for %.0f s, a worker killed every %.0f s, replicas=2", args.chaos_seconds,
                     args.kill_every)
            client.wait_for_workers(2, timeout=300)
            svc = Service(url, scheduler, replicas=2, wait_ms=2.0, token=token)
            try:
                report["chaos"] = chaos_phase(client, svc, qpath, args, token)
            finally:
                svc.stop()
            log.info("%s", report["chaos"])
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "serve.md"), "w") as f:
        f.write(markdown(report, args))
    print(markdown(report, args))
    return 0


def markdown(r: dict, args) -> str:
    m = r["machine"]
    lines = [f"# Cluster-hosted search benchmark ({m['date']}, {m['cores']} cores, {m['memory_gib']} GiB)", "",
             f"{r['n']:,} x {r['d']} synthetic vectors, IVF{r['nlist']}, k={args.k}, nprobe={args.nprobe}; "
             "an embedded LocalCluster of 2 single-threaded worker processes on this machine.", "",
             "## (a) Batch search: distributed vs local", "",
             "| codec | shards | local QPS | distributed QPS | distributed / local (target >= 0.8) | identical | "
             "faiss-cpu QPS |", "|---|---|---|---|---|---|---|"]
    for b in r["batch"]:
        lines.append(f"| {b['codec']} | {b['shards']} | {b['local_qps']:,.0f} | {b['distributed_qps']:,.0f} | "
                     f"{b['ratio_distributed_to_local']:.2f} | {b['identical']} | {b['faiss_qps']:,.0f} |")
    if r.get("load"):
        lines += ["", f"## (b) HTTP service, {args.clients} concurrent clients, single queries, {args.seconds:.0f} s",
                  "", "| mode | requests | errors | QPS | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for name, s in r["load"].items():
            lines.append(f"| {name} | {s['requests']:,} | {s['errors']} | {s['qps']:,.0f} | {s.get('p50_ms', 0):.1f} | "
                         f"{s.get('p99_ms', 0):.1f} |")
        lines += ["", f"Micro-batching speed-up: **{r['batching_speedup']:.2f}x** (target >= 3x).", "",
                  "## (c) The same load while one worker is killed (SIGKILL, restarted by its nanny)", "",
                  "| replicas | errors (whole run) | QPS before | p99 ms before | QPS during recovery | p50 / p99 ms "
                  "during recovery | all copies resident again after |", "|---|---|---|---|---|---|---|"]
        for k in r["kill"]:
            b, d = k["before_kill"], k["during_recovery"]
            lines.append(f"| {k['replicas']} | {k['whole_run']['errors']} | {b.get('qps', 0):,.0f} | "
                         f"{b.get('p99_ms', 0):.1f} | {d.get('qps', 0):,.0f} | {d.get('p50_ms', 0):.1f} / "
                         f"{d.get('p99_ms', 0):.1f} | {k['resident_again_s']:.1f} s |")
    if r.get("chaos"):
        c, w = r["chaos"], r["chaos"]["whole_run"]
        cm = c["machine"]
        lines += ["", f"## (d) {c['clients']} clients for {c['seconds']:.0f} s, a worker SIGKILLed every "
                  f"{c['kill_every_s']:.0f} s (replicas=2)", "",
                  f"Measured {cm['date']} on {cm['cores']} cores shared with other work (latencies are noisy). "
                  "Each kill takes the survivor of the previous one (the worker holding the copies that were "
                  "not lost), its nanny restarts it, and the service answers from the other copies, sends "
                  "scans waiting on a lost copy to another copy and loads the second copies again on the "
                  "restarted worker. Errors: any answer other than 200, or none within 30 s.", "",
                  "| requests | errors | statuses | QPS | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|",
                  f"| {w['requests']:,} | **{w['errors']}** | "
                  f"{', '.join(f'{k}: {v:,}' for k, v in sorted(c['statuses'].items()))} | {w['qps']:,.0f} | "
                  f"{w.get('p50_ms', 0):.1f} | {w.get('p99_ms', 0):.1f} | {w.get('max_ms', 0):.1f} |", "",
                  "| kill at | worker | all copies resident again after | errors in the next 5 s | p50 / p99 ms "
                  "in the next 5 s |", "|---|---|---|---|---|"]
        for k in c["kills"]:
            n5 = k["next_5s"]
            back = "not within the interval" if k["resident_again_s"] is None else f"{k['resident_again_s']:.1f} s"
            lines.append(f"| {k['at_s']:.1f} s | {k['worker']} | {back} | {n5.get('errors', 0)} | "
                         f"{n5.get('p50_ms', 0):.1f} / {n5.get('p99_ms', 0):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
