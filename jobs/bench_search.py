"""Search benchmark: distann (list-major Numba kernels, resident index) vs faiss-cpu
IndexIVFFlat, same data, same machine, same number of threads, in one run.

    python jobs/bench_search.py [--n 1000000] [--d 64] [--nlist 1024] [--nq 10000]

For each system: the recall/QPS curve over nprobe, the batch QPS at the smallest nprobe whose
10-recall@10 >= 0.9, and single-query latency (median, p99 over 1000 one-vector calls) there.
Also: distann ids vs the NumPy reference backend, and the fraction of the machine's SGEMM
throughput (measured here) that the batch scan reaches. Writes docs/benchmarks/search.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distann  # noqa: E402
from distann.cluster import client_context  # noqa: E402
from distann.synthetic import synthetic, write_npy  # noqa: E402
from _measure import machine, timed  # noqa: E402

log = logging.getLogger("bench_search")
NPROBES = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
TARGET = 0.9


def sgemm_gflops(threads: int) -> float:
    """Best-of-3 float32 GEMM throughput of this machine (NumPy's BLAS, ``threads`` threads)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    best = float("inf")
    with threadpool_limits(threads):
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
    return 2 * 4096 ** 3 / best / 1e9


def latency(fn, xq: np.ndarray, calls: int) -> dict:
    times = np.empty(calls)
    for i in range(calls):
        q = xq[i % len(xq):i % len(xq) + 1]
        t0 = time.perf_counter()
        fn(q)
        times[i] = time.perf_counter() - t0
    return {"median_us": float(np.median(times) * 1e6), "p99_us": float(np.percentile(times, 99) * 1e6)}


def curve(search, gt: np.ndarray, k: int) -> list[dict]:
    points = []
    for nprobe in NPROBES:
        I = search(nprobe)[1]
        seconds = timed(lambda: search(nprobe), 3)
        points.append({"nprobe": nprobe, "recall": distann.recall_at_k(I, gt, k), "qps": len(gt) / seconds})
        log.info("  nprobe %3d recall %.4f QPS %.0f", nprobe, points[-1]["recall"], points[-1]["qps"])
    return points


def first_at_target(points: list[dict]) -> dict | None:
    return next((p for p in points if p["recall"] >= TARGET), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--latency-calls", type=int, default=1000)
    p.add_argument("--data", default="data/bench")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distann.train.kmeans").setLevel(logging.WARNING)
    os.makedirs(args.data, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    path = os.path.join(args.data, f"synthetic-{args.n}x{args.d}.npy")
    if not os.path.exists(path):
        write_npy(path, args.n, args.d)
    xb = np.load(path)
    xq = synthetic(args.nq, args.d, stream=1)

    log.info("ground truth (faiss IndexFlatL2, exact)")
    flat = faiss.IndexFlatL2(args.d)
    flat.add(xb)
    _, gt = flat.search(xq, args.k)
    del flat

    log.info("distann build")
    with client_context(workers=args.threads) as client:
        index = distann.build(path, os.path.join(args.data, f"search-index-{args.n}.zarr"),
                              spec=f"IVF{args.nlist},Flat", client=client, overwrite=True)
    index.load()
    index.search(xq[:100], k=args.k, nprobe=4)  # compile
    log.info("faiss build")
    fq = faiss.IndexFlatL2(args.d)
    fidx = faiss.IndexIVFFlat(fq, args.d, args.nlist)
    fidx.train(xb)
    fidx.add(xb)

    def faiss_search(nprobe, q=xq):
        fidx.nprobe = nprobe
        return fidx.search(q, args.k)

    log.info("distann curve")
    ours = curve(lambda nprobe: index.search(xq, k=args.k, nprobe=nprobe), gt, args.k)
    log.info("faiss curve")
    theirs = curve(faiss_search, gt, args.k)
    o_pt, f_pt = first_at_target(ours), first_at_target(theirs)
    result = {"machine": machine(), "n": args.n, "d": args.d, "nlist": args.nlist, "nq": args.nq, "k": args.k,
              "threads": args.threads, "target_recall": TARGET, "distann_curve": ours, "faiss_curve": theirs,
              "distann_at_target": o_pt, "faiss_at_target": f_pt}
    if o_pt and f_pt:
        result["batch_qps_ratio"] = o_pt["qps"] / f_pt["qps"]
        log.info("single-query latency")
        index.search(xq[:1], k=args.k, nprobe=o_pt["nprobe"])
        result["distann_latency"] = latency(lambda q: index.search(q, k=args.k, nprobe=o_pt["nprobe"]), xq,
                                            args.latency_calls)
        result["faiss_latency"] = latency(lambda q: faiss_search(f_pt["nprobe"], q), xq, args.latency_calls)
        result["latency_ratio_median"] = result["distann_latency"]["median_us"] / result["faiss_latency"]["median_us"]
        result["latency_ratio_p99"] = result["distann_latency"]["p99_us"] / result["faiss_latency"]["p99_us"]
        # ids vs the NumPy reference backend on a subset (the reference is slow)
        sub = xq[:500]
        _, I_fast = index.search(sub, k=args.k, nprobe=o_pt["nprobe"])
        _, I_ref = index.search(sub, k=args.k, nprobe=o_pt["nprobe"], backend="numpy")
        result["ids_identical_to_reference"] = bool(np.array_equal(I_fast, I_ref))
        result["ids_mismatching_rows"] = int((I_fast != I_ref).any(axis=1).sum())
        # GEMM roofline: useful flops of the scan (2 d per (query, vector) pair) / time
        from distann.kernels import get_backend

        _, probes = get_backend("numba").coarse_quantize(xq, index.centroids, o_pt["nprobe"], "l2")
        scanned = int(index.list_sizes[probes].sum())
        seconds = args.nq / o_pt["qps"]
        peak = sgemm_gflops(args.threads)
        result["sgemm_gflops"] = peak
        result["scan_gflops"] = 2 * args.d * scanned / seconds / 1e9
        result["roofline_fraction"] = result["scan_gflops"] / peak
    with open(os.path.join(args.out, "search.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.out, "search.md"), "w") as f:
        f.write(md)
    plot(result, os.path.join(args.out, "search.png"))
    print(md)
    return 0


def markdown(r: dict) -> str:
    o, f = r.get("distann_at_target"), r.get("faiss_at_target")
    if not (o and f):
        return f"recall target {r['target_recall']} not reached (distann: {o}, faiss: {f})\n"
    ol, fl = r["distann_latency"], r["faiss_latency"]
    lines = [
        f"{r['n']:,} x {r['d']}, IVF{r['nlist']},Flat, {r['nq']:,} queries, k={r['k']}, {r['threads']} threads; "
        f"smallest nprobe with 10-recall@10 >= {r['target_recall']}:",
        "",
        "| system | nprobe | 10-recall@10 | batch QPS | single-query median (us) | p99 (us) |",
        "|---|---|---|---|---|---|",
        f"| distann | {o['nprobe']} | {o['recall']:.3f} | {o['qps']:,.0f} | {ol['median_us']:,.0f} | {ol['p99_us']:,.0f} |",
        f"| faiss-cpu | {f['nprobe']} | {f['recall']:.3f} | {f['qps']:,.0f} | {fl['median_us']:,.0f} | {fl['p99_us']:,.0f} |",
        "",
        f"Batch QPS ratio distann / faiss: **{r['batch_qps_ratio']:.2f}x** (target >= 2x). "
        f"Single-query latency ratio: median {r['latency_ratio_median']:.2f}x, p99 {r['latency_ratio_p99']:.2f}x "
        f"(target <= 1.5x). Scan throughput {r['scan_gflops']:.1f} GFLOP/s = "
        f"{100 * r['roofline_fraction']:.0f}% of this machine's measured SGEMM ({r['sgemm_gflops']:.0f} GFLOP/s). "
        f"Ids identical to the NumPy reference on 500 queries: {r['ids_identical_to_reference']} "
        f"({r['ids_mismatching_rows']} rows differ).",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, key in (("distann", "distann_curve"), ("faiss-cpu", "faiss_curve")):
        pts = r[key]
        ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("10-recall@10")
    ax.set_ylabel("queries per second")
    ax.axvline(r["target_recall"], color="grey", lw=0.8, ls="--")
    ax.set_title(f"{r['n']:,} x {r['d']}, IVF{r['nlist']},Flat, {r['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
