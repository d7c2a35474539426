"""What the per-chunk CRC-32C costs: the same data built and searched with and without the
``crc32c`` codec, in one run.

    python jobs/bench_checksum.py [--n 400000] [--d 96] [--nlist 1024] [--rounds 3] [--repeat 10]

"Without" rewrites ``store.arrays.write_array`` (in this process and on the workers) to write
chunks as indexes did before the codec (``bytes`` alone); readers handle both, so the search
side differs only by the checksum. Build rounds alternate with / without (a shared machine drifts) and
their medians are printed; searches alternate between the two indexes of the last round and the
best of ``--repeat`` is printed:

* build: the add and merge stages' seconds (``manifest.build["timings"]``) and the CPU seconds
  of the 2 worker processes over the whole build;
* search, streaming (``cache_bytes=0``: every call reads its probed lists and checks them):
  queries per second of one 1,000-query call and of 10-query calls;
* search, resident: the time to load the whole index (checked once), then the QPS of a
  1,000-query call (nothing read, so nothing checked);
* the raw throughput of google-crc32c on this machine.

Each QPS is also given by CPU time (``*_cpu``: queries per CPU second of this process, all its
threads), which other processes on a shared machine disturb less than the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distann  # noqa: E402
from distann.store import arrays, shards  # noqa: E402
from distann.synthetic import synthetic, write_npy  # noqa: E402

_CHECKED = arrays.write_array


def _plain_write_array(store, name, data, chunks):
    """write_array as before the crc32c codec (codec ``bytes`` alone)."""
    import zarr

    arr = zarr.create_array(store, name=name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=None,
                            fill_value=0, overwrite=True, config={"write_empty_chunks": True})
    if data.size:
        arr[...] = data


def _use(checked: bool) -> None:
    fn = _CHECKED if checked else _plain_write_array
    arrays.write_array = fn
    shards.write_array = fn


def _use_on_workers(client, checked: bool) -> None:
    def patch(checked=checked):
        from distann.store import arrays as a
        from distann.store import shards as s

        if not hasattr(a, "_bench_checked"):
            a._bench_checked = a.write_array
        fn = a._bench_checked if checked else _plain_write_array
        a.write_array = fn
        s.write_array = fn

    client.run(patch)
    _use(checked)


def _qps(fn, nq: int, out: dict, key: str) -> None:
    """Queries per second of ``fn`` by the wall clock, and by this process's CPU time (all its
    threads: the kernels, Zarr's reads and the checks), which a busy shared machine disturbs less."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    out.setdefault(key, []).append(nq / (time.perf_counter() - t0))
    out.setdefault(key + "_cpu", []).append(nq / (time.process_time() - c0))


def _workers_cpu(client) -> float:
    """CPU seconds the worker processes have used so far."""
    def cpu():
        import psutil

        t = psutil.Process().cpu_times()
        return t.user + t.system

    return sum(client.run(cpu).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400_000)
    ap.add_argument("--d", type=int, default=96)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    import google_crc32c
    from distributed import Client, LocalCluster

    from distann.cluster import WORKER_ENV

    buf = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    google_crc32c.value(buf)
    crc_gbs = buf.nbytes / (time.perf_counter() - t0) / 1e9

    xq = synthetic(1000, args.d, seed=2)
    tmp = tempfile.mkdtemp(prefix="distann-bench-crc-")
    xb = os.path.join(tmp, "base.npy")
    write_npy(xb, args.n, args.d, seed=1)
    results: dict[str, dict[str, list[float]]] = {"crc32c": {}, "plain": {}}
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, env=WORKER_ENV) as cluster, Client(cluster) as client:
            # warm-up (worker imports, kernel compilation, page cache), not counted
            warm = distann.build(xb, os.path.join(tmp, "warm.zarr"), spec=f"IVF{args.nlist},Flat", client=client,
                                 niter=2)
            distann.open_index(warm.url, cache_bytes=0).search(xq, k=10, nprobe=args.nprobe)
            urls: dict[str, str] = {}
            for r in range(args.rounds):
                for variant in ("crc32c", "plain") if r % 2 == 0 else ("plain", "crc32c"):
                    _use_on_workers(client, variant == "crc32c")
                    url = os.path.join(tmp, f"{variant}-{r}.zarr")
                    cpu0 = _workers_cpu(client)
                    index = distann.build(xb, url, spec=f"IVF{args.nlist},Flat", client=client, niter=4)
                    results[variant].setdefault("build_cpu_s", []).append(_workers_cpu(client) - cpu0)
                    with open(os.path.join(url, index.manifest.shards[0].path, "codes", "zarr.json")) as f:
                        codecs = json.load(f)
                    assert ("crc32c" in json.dumps(codecs["codecs"])) == (variant == "crc32c")
                    t = index.manifest.build["timings"]
                    results[variant].setdefault("add_s", []).append(t["add_s"])
                    results[variant].setdefault("merge_s", []).append(t["merge_s"])
                    if variant in urls:
                        shutil.rmtree(urls[variant])
                    urls[variant] = url
            # search: the two indexes of the last round, timed alternately, best of `repeat` each
            for _ in range(args.repeat):
                for variant, url in urls.items():
                    out = results[variant]
                    stream = distann.open_index(url, cache_bytes=0)
                    _qps(lambda s=stream: s.search(xq, k=10, nprobe=args.nprobe), len(xq), out, "stream_qps_1000")
                    _qps(lambda s=stream: [s.search(xq[i:i + 10], k=10, nprobe=args.nprobe)
                                           for i in range(0, 200, 10)], 200, out, "stream_qps_10")
                    resident = distann.open_index(url, cache_bytes=0)
                    t0 = time.perf_counter()
                    resident.load()
                    out.setdefault("load_s", []).append(time.perf_counter() - t0)
                    _qps(lambda r=resident: r.search(xq, k=10, nprobe=args.nprobe), len(xq), out, "resident_qps_1000")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # builds: medians over the rounds; searches: the best of the alternating repeats (the least disturbed)
    med = {v: {k: (statistics.median(x) if k in ("add_s", "merge_s", "build_cpu_s") else min(x) if k.endswith("_s")
                   else max(x))
               for k, x in m.items()} for v, m in results.items()}
    print(f"google-crc32c: {crc_gbs:.1f} GB/s ({google_crc32c.implementation}); n={args.n} d={args.d} "
          f"IVF{args.nlist},Flat nprobe={args.nprobe}; builds: median of {args.rounds} rounds; searches: best of "
          f"{args.repeat} alternating repeats")
    print(f"{'':22s} {'crc32c':>10s} {'plain':>10s} {'cost':>8s}")
    for k in med["plain"]:
        a, b = med["crc32c"][k], med["plain"][k]
        cost = (a / b - 1) if k.endswith("_s") else (b / a - 1)  # extra time, or lost throughput
        print(f"{k:22s} {a:10.3f} {b:10.3f} {cost:+8.1%}")


if __name__ == "__main__":
    main()
