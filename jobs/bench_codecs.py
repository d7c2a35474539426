"""Codec benchmark: distann vs faiss-cpu with the same factory string, same data, same machine,
same number of threads, in one run.

    python jobs/bench_codecs.py [--n 1000000] [--dims 64 96] [--nq 10000] [--specs ...]

For each dimension and spec: build time of both (distann from the .npy file on an embedded
LocalCluster; faiss train + add in memory), peak memory of the distann build (Flat and PQ16),
index size on disk against codes + ids (+ raw vectors for RFlat), the recall/QPS curve of both
over nprobe (distann resident), recall at nprobe 16 and 64, and distann's batch QPS at faiss's
recall at nprobe 16, 32 and 64 (distann's curve interpolated in (recall, log QPS) at that recall). For the Flat spec also the streaming (not resident, files in the page cache) batch
QPS against resident. Writes docs/benchmarks/codecs.{json,md}.
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
from _measure import TreeMemorySampler, machine, timed  # noqa: E402

log = logging.getLogger("bench_codecs")
SPECS = ["IVF1024,Flat", "IVF1024,SQ8", "IVF1024,SQfp16", "IVF1024,PQ16", "IVF1024,PQ32", "OPQ16,IVF1024,PQ16",
         "IVF1024,PQ16,RFlat", "PCAR32,IVF1024,SQ8"]
NPROBES = [4, 8, 16, 32, 64, 128]
MEMORY_SPECS = ("IVF1024,Flat", "IVF1024,PQ16")


def curve(search, gt: np.ndarray, k: int, label: str) -> list[dict]:
    points = []
    for nprobe in NPROBES:
        I = search(nprobe)[1]
        seconds = timed(lambda: search(nprobe), 2)
        points.append({"nprobe": nprobe, "recall": distann.recall_at_k(I, gt, k), "qps": len(gt) / seconds})
        log.info("  %s nprobe %3d recall %.4f QPS %.0f", label, nprobe, points[-1]["recall"], points[-1]["qps"])
    return points


def at(points: list[dict], nprobe: int) -> dict:
    return next(p for p in points if p["nprobe"] == nprobe)


def qps_at_recall(points: list[dict], recall: float) -> float | None:
    """QPS of the curve at ``recall``, interpolated linearly in (recall, log QPS) between the two
    points around it (as recall/QPS curves are compared); None if the curve never reaches it."""
    if points[0]["recall"] >= recall:
        return points[0]["qps"]
    for a, b in zip(points, points[1:]):
        if a["recall"] < recall <= b["recall"]:
            t = (recall - a["recall"]) / (b["recall"] - a["recall"])
            return float(np.exp(np.log(a["qps"]) + t * (np.log(b["qps"]) - np.log(a["qps"]))))
    return None


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench_spec(spec: str, path: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, args, client) -> dict:
    import faiss

    d = xb.shape[1]
    url = os.path.join(args.data, f"codec-{d}-{spec.replace(',', '_')}.zarr")
    log.info("%s d=%d: distann build", spec, d)
    with TreeMemorySampler() as mem:
        t0 = time.perf_counter()
        index = distann.build(path, url, spec=spec, client=client, overwrite=True)
        build_s = time.perf_counter() - t0
    gen = os.path.join(url, f"g{index.manifest.generation:06d}")
    payload = len(xb) * (index.codec.code_size + 8 + (4 * d if index.codec.refine else 0))
    row = {"spec": spec, "d": d, "distann": {"build_s": build_s, "timings": index.manifest.build["timings"],
                                              "disk_bytes": dir_bytes(gen), "payload_bytes": payload,
                                              "mse": index.manifest.codec.get("mse")}}
    if spec in MEMORY_SPECS:
        row["distann"]["peak_rss_bytes"] = mem.peak_rss
    log.info("%s d=%d: faiss train + add", spec, d)
    ref = faiss.index_factory(d, spec)
    t0 = time.perf_counter()
    ref.train(xb)
    ref.add(xb)
    row["faiss"] = {"build_s": time.perf_counter() - t0}
    ivf = faiss.extract_index_ivf(ref)
    if index.codec.refine:  # the same re-ranking depth as distann's default k_factor
        faiss.downcast_index(ref).k_factor = index.defaults.k_factor
    index.load()
    index.search(xq[:200], k=args.k, nprobe=16)  # kernel compilation is not timed

    def ours(nprobe):
        return index.search(xq, k=args.k, nprobe=nprobe)

    def theirs(nprobe):
        ivf.nprobe = nprobe
        return ref.search(xq, args.k)

    row["distann"]["curve"] = curve(ours, gt, args.k, "distann")
    row["faiss"]["curve"] = curve(theirs, gt, args.k, "faiss")
    row["equal_recall"] = []
    for nprobe in (16, 32, 64):
        f = at(row["faiss"]["curve"], nprobe)
        o = qps_at_recall(row["distann"]["curve"], f["recall"])
        row["equal_recall"].append({"faiss_nprobe": nprobe, "recall": f["recall"], "faiss_qps": f["qps"],
                                    "distann_qps": o, "ratio": o and o / f["qps"]})
    if spec == "IVF1024,Flat":
        streamed = distann.open_index(url, cache_bytes=0)
        streamed.search(xq[:200], k=args.k, nprobe=32)
        s_qps = len(xq) / timed(lambda: streamed.search(xq, k=args.k, nprobe=32), 2)
        r_qps = len(xq) / timed(lambda: index.search(xq, k=args.k, nprobe=32), 2)
        row["streaming"] = {"nprobe": 32, "resident_qps": r_qps, "streaming_qps": s_qps, "ratio": s_qps / r_qps}
        log.info("  streaming / resident at nprobe 32: %.2f", s_qps / r_qps)
    return row


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['cores']} cores ({meta['cpu']}), {meta['threads']} threads for both; "
             f"n={meta['n']:,}, {meta['nq']:,} queries, k={meta['k']}; distann searches a resident index.", "",
             "| d | spec | 10-recall@10 nprobe 16 (distann / faiss) | nprobe 64 (distann / faiss) | "
             "QPS ratio at faiss's recall, nprobe 16 / 32 / 64 | build s (distann / faiss) | "
             "disk / (codes+ids) | MSE |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, f = r["distann"], r["faiss"]
        ratios = " / ".join("n/a" if e["ratio"] is None else f"{e['ratio']:.2f}" for e in r["equal_recall"])
        lines.append(f"| {r['d']} | {r['spec']} | {at(o['curve'], 16)['recall']:.3f} / {at(f['curve'], 16)['recall']:.3f} "
                     f"| {at(o['curve'], 64)['recall']:.3f} / {at(f['curve'], 64)['recall']:.3f} | {ratios} | "
                     f"{o['build_s']:.1f} / {f['build_s']:.1f} | {o['disk_bytes'] / o['payload_bytes']:.3f} | "
                     f"{o['mse']:.4g} |")
    if any("peak_rss_bytes" in r["distann"] for r in rows):
        lines += ["", "Peak memory of the distann build (client + workers, RSS):", ""]
    for r in rows:
        if "peak_rss_bytes" in r["distann"]:
            lines.append(f"- d={r['d']} {r['spec']}: {r['distann']['peak_rss_bytes'] / 2**20:.0f} MiB, "
                         f"build {r['distann']['build_s']:.1f} s (stages {r['distann']['timings']})")
    if any("streaming" in r for r in rows):
        lines += ["", "Streaming (not resident, files in the page cache) vs resident, IVF1024,Flat, nprobe 32:", ""]
    for r in rows:
        if "streaming" in r:
            s = r["streaming"]
            lines.append(f"- d={r['d']}: {s['streaming_qps']:.0f} vs {s['resident_qps']:.0f} QPS = {s['ratio']:.2f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 96])
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--specs", nargs="+", default=SPECS)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--data", default="data/bench")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="codecs", help="file name of the figures (name.json, name.md)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(args.data, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows = []
    meta = {**machine(), "threads": args.threads, "n": args.n, "nq": args.nq, "k": args.k}
    with client_context(workers=args.threads) as client:
        for d in args.dims:
            path = os.path.join(args.data, f"synthetic-{args.n}x{d}.npy")
            if not os.path.exists(path):
                write_npy(path, args.n, d)
            xb = np.load(path)
            xq = synthetic(args.nq, d, stream=1)
            flat = faiss.IndexFlatL2(d)
            flat.add(xb)
            _, gt = flat.search(xq, args.k)
            del flat
            for spec in args.specs:
                rows.append(bench_spec(spec, path, xb, xq, gt, args, client))
                with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = report(rows, meta)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
