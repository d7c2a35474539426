"""Build benchmark: distann (from a file, on a local Dask cluster) vs faiss-cpu IndexIVFFlat
(train + add in memory), on the same synthetic data, same machine, same number of threads.

    python jobs/bench_build.py [--sizes 2000000 4000000] [--d 96] [--nlist 1024]

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


def bench_distann(path: str, index_url: str, nlist: int, niter: int, workers: int) -> dict:
    with client_context(workers=workers) as client:
        with TreeMemorySampler() as idle:
            pass
        with TreeMemorySampler() as mem:
            t0 = time.perf_counter()
            index = distann.build(path, index_url, spec=f"IVF{nlist},Flat", client=client, overwrite=True,
                                  niter=niter)
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_bytes": mem.peak_rss, "peak_pss_bytes": mem.peak_pss,
            "idle_cluster_rss_bytes": idle.peak_rss, "idle_cluster_pss_bytes": idle.peak_pss,
            "timings": index.manifest.build["timings"], "objective": index.manifest.build["objective"][-1],
            "imbalance": index.info()["list_sizes"]["imbalance"]}


def bench_faiss(path: str, nlist: int, niter: int, threads: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    x = np.load(path)
    d = x.shape[1]
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist)
    index.cp.niter = niter
    index.train(x)
    t_train = time.perf_counter() - t0
    index.add(x)
    seconds = time.perf_counter() - t0
    sizes = np.array([index.invlists.list_size(i) for i in range(nlist)], dtype=np.float64)
    return {"seconds": seconds, "train_seconds": t_train, "add_seconds": seconds - t_train, "threads": threads,
            "imbalance": float((sizes ** 2).sum() * nlist / sizes.sum() ** 2)}


def measure_one(args) -> int:
    """One size, in this (fresh) process: distann first, then faiss; prints one JSON line."""
    n = args.one
    path = os.path.join(args.data, f"synthetic-{n}x{args.d}.npy")
    raw = n * args.d * 4
    ours = bench_distann(path, os.path.join(args.data, f"index-{n}.zarr"), args.nlist, args.niter, args.workers)
    theirs = bench_faiss(path, args.nlist, args.niter, args.workers)
    print(json.dumps({"n": n, "d": args.d, "nlist": args.nlist, "niter": args.niter, "raw_bytes": raw,
                      "distann": ours, "faiss": theirs, "time_ratio": ours["seconds"] / theirs["seconds"],
                      "peak_rss_fraction_of_raw": ours["peak_rss_bytes"] / raw,
                      "peak_pss_fraction_of_raw": ours["peak_pss_bytes"] / raw}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 4_000_000])
    p.add_argument("--d", type=int, default=96)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--niter", type=int, default=10, help="k-means iterations for both (Faiss IVF default: 10)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--data", default="data/bench")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size, JSON to stdout
    args = p.parse_args(argv)
    if args.one is not None:
        return measure_one(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distann.train.kmeans").setLevel(logging.WARNING)
    os.makedirs(args.data, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for n in args.sizes:
        path = os.path.join(args.data, f"synthetic-{n}x{args.d}.npy")
        if not os.path.exists(path):
            log.info("writing %s", path)
            write_npy(path, n, args.d)
        # each size in a fresh process, so that memory left over by earlier work is not counted
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", str(n), "--d", str(args.d),
                              "--nlist", str(args.nlist), "--niter", str(args.niter), "--workers", str(args.workers),
                              "--data", args.data], check=True, stdout=subprocess.PIPE, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        log.info("n=%d distann %.1f s, faiss %.1f s, ratio %.2f, peak RSS %.0f MiB (%.0f%% of raw)", n,
                 row["distann"]["seconds"], row["faiss"]["seconds"], row["time_ratio"],
                 row["distann"]["peak_rss_bytes"] / 2**20, 100 * row["peak_rss_fraction_of_raw"])
    growth = (rows[-1]["distann"]["peak_rss_bytes"] / rows[0]["distann"]["peak_rss_bytes"] - 1) if len(rows) > 1 else 0.0
    result = {"machine": machine(), "workers": args.workers, "rows": rows, "peak_rss_growth_first_to_last": growth}
    with open(os.path.join(args.out, "build.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| n x d | distann build (s) | faiss train+add (s) | time ratio (target <= 1.5) | "
             "peak RSS, all processes (MiB) | peak PSS (MiB) | RSS / raw data (target <= 50%) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["distann"]
        lines.append(f"| {r['n']:,} x {r['d']} | {o['seconds']:.1f} | {r['faiss']['seconds']:.1f} | "
                     f"{r['time_ratio']:.2f} | {o['peak_rss_bytes'] / 2**20:,.0f} | {o['peak_pss_bytes'] / 2**20:,.0f} | "
                     f"{100 * r['peak_rss_fraction_of_raw']:.0f}% |")
    lines.append("")
    lines.append(f"Peak RSS growth from n={rows[0]['n']:,} to n={rows[-1]['n']:,}: {100 * growth:+.1f}% (target <= +10%). "
                 f"Idle cluster (client process with scheduler and nannies + {args.workers} worker processes) before "
                 f"the build: {rows[-1]['distann']['idle_cluster_rss_bytes'] / 2**20:,.0f} MiB RSS.")
    lines.append("")
    lines.append("| n | distann sample / train / add / merge (s) | faiss train / add (s) |")
    lines.append("|---|---|---|")
    for r in rows:
        t, f = r["distann"]["timings"], r["faiss"]
        lines.append(f"| {r['n']:,} | {t.get('sample_s', 0):.1f} / {t['train_s']:.1f} / "
                     f"{t['add_s']:.1f} / {t['merge_s']:.1f} | {f['train_seconds']:.1f} / {f['add_seconds']:.1f} |")
    with open(os.path.join(args.out, "build.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
