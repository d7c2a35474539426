"""Quickstart job: generate vectors to a file, build an index on an embedded local Dask
cluster, search it, and print recall@10 against exact ground truth, QPS and build time.

    python jobs/quickstart.py [--n 200000] [--d 64] [--nlist 256] [--nprobe 16] [--workers N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

import distann
from distann import logs
from distann.cluster import client_context
from distann.synthetic import write_npy

log = logging.getLogger("distann.quickstart")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="database vectors")
    p.add_argument("--nq", type=int, default=1_000, help="queries")
    p.add_argument("--d", type=int, default=64, help="dimension")
    p.add_argument("--nlist", type=int, default=256)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--metric", default="l2", choices=["l2", "ip", "cosine"])
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--out", default="out/quickstart", help="folder for the data files and the index")
    p.add_argument("-v", "--verbose", action="store_true", help="Dask's own INFO messages too")
    args = p.parse_args(argv)
    logs.setup("INFO", args.verbose)
    progress = sys.stderr.isatty()

    os.makedirs(args.out, exist_ok=True)
    base, queries = os.path.join(args.out, "base.npy"), os.path.join(args.out, "queries.npy")
    index_url = os.path.join(args.out, "index.zarr")
    log.info("writing %d x %d synthetic vectors to %s", args.n, args.d, base)
    write_npy(base, args.n, args.d, stream=0)
    write_npy(queries, args.nq, args.d, stream=1)
    xq = np.load(queries)

    with client_context(workers=args.workers) as client:
        t0 = time.perf_counter()
        index = distann.build(base, index_url, spec=f"IVF{args.nlist},Flat", metric=args.metric,
                              client=client, overwrite=True, progress=progress)
        build_s = time.perf_counter() - t0
        log.info("exact ground truth on the cluster")
        _, gt = distann.brute_force_knn(base, xq, 10, args.metric, client=client)

    index = distann.open_index(index_url)
    index.load()
    index.search(xq[:10], k=10, nprobe=args.nprobe)  # warm-up: Numba compilation
    t0 = time.perf_counter()
    _, I = index.search(xq, k=10, nprobe=args.nprobe)
    search_s = time.perf_counter() - t0
    recall = distann.recall_at_k(I, gt, 10)
    print(f"index      {index_url}  ({index.spec}, {index.metric}, {index.ntotal} vectors, d={index.d})")
    print(f"build time {build_s:.2f} s")
    print(f"recall@10  {recall:.4f}  (nprobe={args.nprobe})")
    print(f"QPS        {len(xq) / search_s:,.0f}  ({len(xq)} queries in {search_s:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
