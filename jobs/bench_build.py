"""Build benchmark: distann (from a file, on a local Dask cluster) vs faiss-cpu (train + add in
memory, the same index_factory spec), on the same synthetic data, same machine, faiss with as
many threads as distann has worker processes.

    python jobs/bench_build.py [--sizes 1000000 2000000 4000000] [--specs IVF1024,Flat IVF1024,PQ16]
                               [--workers 1 2] [--d 96]

Writes docs/benchmarks/build.json and build.md. Figures are what this run measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distann  # noqa: E402
from distann.cluster import client_context  # noqa: E402
from distann.synthetic import write_npy  # noqa: E402
from _measure import TreeMemorySampler, machine  # noqa: E402

log = logging.getLogger("bench_build")


def bench_distann(path: str, index_url: str, spec: str, niter: int, workers: int) -> dict:
    with client_context(workers=workers) as client:
        with TreeMemorySampler() as idle:
            pass
        with TreeMemorySampler() as mem:
            t0 = time.perf_counter()
            index = distann.build(path, index_url, spec=spec, client=client, overwrite=True, niter=niter)
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_bytes": mem.peak_rss, "peak_pss_bytes": mem.peak_pss,
            "idle_cluster_rss_bytes": idle.peak_rss, "idle_cluster_pss_bytes": idle.peak_pss,
            "timings": index.manifest.build["timings"], "objective": index.manifest.build["objective"][-1],
            "imbalance": index.info()["list_sizes"]["imbalance"]}


def bench_faiss(path: str, spec: str, niter: int, threads: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    x = np.load(path)
    d = x.shape[1]
    t0 = time.perf_counter()
    index = faiss.index_factory(d, spec)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = niter
    index.train(x)
    t_train = time.perf_counter() - t0
    index.add(x)
    seconds = time.perf_counter() - t0
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.float64)
    return {"seconds": seconds, "train_seconds": t_train, "add_seconds": seconds - t_train, "threads": threads,
            "imbalance": float((sizes ** 2).sum() * ivf.nlist / sizes.sum() ** 2)}


def measure_one(args) -> int:
    """One (size, spec, workers), in this (fresh) process: distann first, then faiss with as many
    threads as distann has worker processes; prints one JSON line."""
    n, spec, workers = args.one, args.spec, args.workers
    path = os.path.join(args.data, f"synthetic-{n}x{args.d}.npy")
    raw = n * args.d * 4
    ours = bench_distann(path, os.path.join(args.data, f"index-{n}.zarr"), spec, args.niter, workers)
    theirs = bench_faiss(path, spec, args.niter, workers)
    print(json.dumps({"n": n, "d": args.d, "spec": spec, "workers": workers, "niter": args.niter, "raw_bytes": raw,
                      "distann": ours, "faiss": theirs, "time_ratio": ours["seconds"] / theirs["seconds"],
                      "peak_rss_fraction_of_raw": ours["peak_rss_bytes"] / raw,
                      "peak_pss_fraction_of_raw": ours["peak_pss_bytes"] / raw}))
    return 0


def write_outputs(rows: list[dict], out: str) -> None:
    """build.json and build.md from the measured rows (specs and worker counts as they appear)."""
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    workers_seen = list(dict.fromkeys(r["workers"] for r in rows))
    result = {"machine": machine(), "rows": rows}
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| spec | n x d | workers (faiss threads) | distann build (s) | faiss train+add (s) | time ratio "
             "(target <= 1.5) | peak RSS, all processes (MiB) | RSS / raw data (target <= 50%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["distann"]
        lines.append(f"| {r['spec']} | {r['n']:,} x {r['d']} | {r['workers']} | {o['seconds']:.1f} | "
                     f"{r['faiss']['seconds']:.1f} | {r['time_ratio']:.2f} | {o['peak_rss_bytes'] / 2**20:,.0f} | "
                     f"{100 * r['peak_rss_fraction_of_raw']:.0f}% |")
    lines.append("")
    for spec in specs:
        for workers in workers_seen:
            sel = [r for r in rows if r["spec"] == spec and r["workers"] == workers]
            if len(sel) > 1:
                growth = sel[-1]["distann"]["peak_rss_bytes"] / sel[0]["distann"]["peak_rss_bytes"] - 1
                lines.append(f"- {spec}, {workers} worker(s): peak RSS growth from n={sel[0]['n']:,} to "
                             f"n={sel[-1]['n']:,}: {100 * growth:+.1f}% (target: flat in N); idle cluster before the "
                             f"build: {sel[-1]['distann']['idle_cluster_rss_bytes'] / 2**20:,.0f} MiB RSS.")
    lines.append("")
    lines.append("| spec | n | workers | distann sample / train / add / merge (s) | faiss train / add (s) |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        t, f = r["distann"]["timings"], r["faiss"]
        lines.append(f"| {r['spec']} | {r['n']:,} | {r['workers']} | {t.get('sample_s', 0):.1f} / {t['train_s']:.1f} / "
                     f"{t['add_s']:.1f} / {t['merge_s']:.1f} | {f['train_seconds']:.1f} / {f['add_seconds']:.1f} |")
    with open(os.path.join(out, "build.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    p.add_argument("--specs", nargs="+", default=["IVF1024,Flat", "IVF1024,PQ16"])
    p.add_argument("--d", type=int, default=96)
    p.add_argument("--niter", type=int, default=10, help="k-means iterations for both (Faiss IVF default: 10)")
    p.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count()],
                   help="worker processes for distann = threads for faiss; several values give a scaling curve")
    p.add_argument("--data", default="data/bench")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one run, JSON to stdout
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        args.workers = args.workers[0]
        return measure_one(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distann.train.kmeans").setLevel(logging.WARNING)
    os.makedirs(args.data, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for spec in args.specs:
        for workers in args.workers:
            for n in args.sizes:
                path = os.path.join(args.data, f"synthetic-{n}x{args.d}.npy")
                if not os.path.exists(path):
                    log.info("writing %s", path)
                    write_npy(path, n, args.d)
                # each run in a fresh process, so that memory left over by earlier work is not counted
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(n), "--spec", spec,
                                      "--d", str(args.d), "--niter", str(args.niter), "--workers", str(workers),
                                      "--data", args.data], check=True, stdout=subprocess.PIPE, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                log.info("%s n=%d workers=%d: distann %.1f s, faiss %.1f s, ratio %.2f, peak RSS %.0f MiB (%.0f%% of raw)",
                         spec, n, workers, row["distann"]["seconds"], row["faiss"]["seconds"], row["time_ratio"],
                         row["distann"]["peak_rss_bytes"] / 2**20, 100 * row["peak_rss_fraction_of_raw"])
    write_outputs(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
