"""GPU benchmark: the cuda kernel backend against the numba backend (all cores) and PyTorch brute
force, same data, same machine, in one run.

    python jobs/bench_gpu.py [--n 10000000] [--d 96] [--nq 10000] [--nlist 4096] [--backends cuda numba]
                             [--phases data gt build search ceiling kmeans] [--time-budget SECONDS]
                             [--work DIR] [--out DIR]

Phases, in this order (``--phases`` picks a subset; ``--time-budget`` skips what is left, noting it):

* data: synthetic low-intrinsic-dimension vectors (``distann.synthetic``), written block by block to
  an ``.npy`` file in ``--work`` by all cores; the queries are stream 1 of the same generator.
* gt: exact ground truth on the GPU (PyTorch ``torch.mm`` + ``torch.topk`` in blocks, TF32 off),
  which is also the brute-force baseline (QPS, recall 1.0); cross-checked on a sample of queries
  with NumPy float64. Without PyTorch or a GPU: the same blocks in NumPy float32, no baseline.
* build: ``IVF<nlist>,Flat`` and ``IVF<nlist>,SQ8`` with the cuda backend on a local Dask cluster
  (``--gpu-workers`` worker processes sharing the GPU); ``--cpu-build`` also times the numba backend
  on ``--cpu-workers`` processes.
* search: per index and backend, ``Index.load()``, two warm-up calls (compilation; the cuda backend
  keeps the lists on the device from the second call on), then the nprobe sweep over all queries in
  one call each: recall and batch QPS (best of ``--repeats``); the smallest nprobe with
  10-recall@10 >= 0.9; cuda / numba QPS at that nprobe, cuda / PyTorch brute force.
* ceiling: device copy bandwidth (CuPy device-to-device, bytes read + written; pinned host to
  device) and float32 GEMM rate (``cupy.matmul``, FP32: CuPy uses TF32 only under CUPY_TF32=1);
  then the scan itself, timed as the kernel-backend call on a prepared batch (``engine.scan`` ->
  ``scan_lists`` / ``scan_lists_sq``: host arrays in, per-(query, probe) top-k back on the host;
  coarse quantization, planning and the final merge excluded): 1 and 16 queries at nprobe >= 64
  against the copy bandwidth (bytes of the distinct probed lists' codes), the whole query batch
  against the GEMM rate (useful flops 2 d per scanned vector).
* kmeans: ``distann.kmeans`` of a ``--kmeans-n`` x d sample into ``--kmeans-k`` centroids,
  ``--kmeans-iter`` iterations, random init with one seed, cuda then numba: time and objective.

Writes ``--docs``/gpu.json and gpu.md after every step (a run killed at the device's time limit
leaves what it measured), also into ``--out`` and ``--work``. A run continues the results in
``--work``/gpu.json (or ``--resume FILE``) for the same sizes; ``--report-only`` re-renders gpu.md
from them. Every figure in the output comes from a run; nothing is hard-coded but the published
Faiss-GPU figures quoted with their sources.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import platform
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distann.synthetic import SyntheticSpec, synthetic  # noqa: E402
from _measure import machine  # noqa: E402

log = logging.getLogger("bench_gpu")
PHASES = ("data", "gt", "build", "search", "ceiling", "kmeans")
NPROBES = (8, 16, 32, 64, 128, 256)
TARGET = 0.9
ALLOW_SIMULATOR = False  # --simulator: accept Numba's CUDA simulator as "cuda" (tiny code-path checks only)
GEN_ROWS = 8 * 65536  # rows per data-generation task (a multiple of the generator's block)

# Published GPU figures, quoted (not measured here: no Faiss-GPU run is possible in this setup).
PUBLISHED = [
    ("big-ann-benchmarks 2021, 1B vectors", "Faiss GPU baseline (V100): 0.93-0.94 recall@10 at about 2k QPS"),
    ("Faiss `bench_gpu_1bn.py`, Deep1B, OPQ20_80,IVF262144,PQ20, 4 GPUs",
     "10k queries at nprobe 64 in 0.238 s (about 42k QPS), 1-R@10 0.865"),
    ("rapidsai/raft#1621, Deep10M, one L4, IVF-PQ, k=100, nprobe 128",
     "RAFT 12,008 vs Faiss 3,044 QPS at batch 1024; 1,827 vs 1,736 QPS at batch 1"),
    ("The Faiss library (Douze et al., 2024), GPU Faiss",
     "k-selection at up to 55% of peak; an A100 has 19.5 TFLOP/s of fp32 FMA throughput"),
    ("Faiss distributed k-means (contrib/clustering), 50M vectors -> 1M centroids",
     "20 iterations on 20 servers x 4 GPUs in 899 s, mostly RPC"),
]


# ----------------------------------------------------------------------------- bookkeeping

class Run:
    """Results, the time budget, and the writing of gpu.json / gpu.md after every step."""

    def __init__(self, args, results: dict):
        self.args = args
        self.r = results
        self.t0 = time.perf_counter()
        self.indexes: dict[str, object] = {}  # spec -> opened Index (the same object keeps lists resident)

    def left(self) -> float:
        if self.args.time_budget is None:
            return math.inf
        return self.args.time_budget - (time.perf_counter() - self.t0)

    def may_start(self, unit: str) -> bool:
        """Whether there is time for ``unit``; otherwise note it as skipped."""
        if self.left() >= self.args.min_unit_seconds:
            return True
        self.skip(unit, f"time budget: {max(0.0, self.left()):.0f} s of {self.args.time_budget:.0f} s left, "
                        f"under --min-unit-seconds {self.args.min_unit_seconds:.0f}")
        return False

    def skip(self, unit: str, why: str) -> None:
        log.warning("skipped %s: %s", unit, why)
        self.r.setdefault("skipped", {})[unit] = why
        self.save()

    def done(self, unit: str) -> None:
        self.r.setdefault("skipped", {}).pop(unit, None)

    def note(self, text: str) -> None:
        log.info("note: %s", text)
        notes = self.r.setdefault("notes", [])
        if text not in notes:
            notes.append(text)

    def save(self) -> None:
        self.r["meta"]["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.r["meta"]["written"] = time.strftime("%Y-%m-%d %H:%M:%S")
        text = json.dumps(self.r, indent=1, default=_jsonable)
        md = markdown(self.r)
        for folder in dict.fromkeys(p for p in (self.args.docs, self.args.out, self.args.work) if p):
            os.makedirs(folder, exist_ok=True)
            _atomic_write(os.path.join(folder, "gpu.json"), text)
            if folder != self.args.work:
                _atomic_write(os.path.join(folder, "gpu.md"), md)


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_state() -> tuple[bool, str]:
    """(usable, device name or why not) of distann's cuda backend; the simulator does not count."""
    from distann.kernels import get_backend

    try:
        kern = get_backend("cuda")
        info = kern.device_info()
    except Exception as e:  # ValidationError naming what is missing (CuPy, driver, device)
        return False, f"{type(e).__name__}: {e}"
    if info.get("simulated") and not ALLOW_SIMULATOR:
        return False, "only Numba's CUDA simulator is available (NUMBA_ENABLE_CUDASIM=1): far too slow to time"
    return True, info["device"]


def torch_state() -> tuple[object | None, str]:
    try:
        import torch
    except Exception as e:
        return None, f"PyTorch is not installed ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return None, "PyTorch sees no CUDA device"
    return torch, torch.cuda.get_device_name(0)


def meta(args) -> dict:
    m = machine()
    m["cpu"] = _cpu_model()
    m["platform"] = platform.platform()
    m["versions"] = {n: _version(n) for n in ("distann", "numpy", "numba", "numba-cuda", "cupy-cuda13x",
                                               "cupy-cuda12x", "cupy", "torch", "dask", "distributed", "zarr")}
    m["versions"] = {k: v for k, v in m["versions"].items() if v}
    m["sizes"] = {"n": args.n, "d": args.d, "nq": args.nq, "k": args.k, "nlist": args.nlist,
                  "kmeans_n": args.kmeans_n, "kmeans_k": args.kmeans_k, "kmeans_iter": args.kmeans_iter}
    m["threads"] = args.threads
    m["repeats"] = args.repeats
    m["argv"] = sys.argv[1:]
    return m


def device_meta(run: Run) -> None:
    """Device name, budgets and library versions as the run sees them."""
    m = run.r["meta"]
    ok, what = cuda_state()
    m["cuda_backend"] = {"usable": ok, "device" if ok else "reason": what}
    if ok:
        from distann.kernels.cuda import device_info

        m["device_info"] = device_info()
        try:
            import cupy

            m["cuda_runtime"] = int(cupy.cuda.runtime.runtimeGetVersion())
            m["cuda_driver"] = int(cupy.cuda.runtime.driverGetVersion())
        except Exception:
            pass
    torch, what = torch_state()
    m["torch_device"] = what if torch is not None else None
    from distann import config

    m["config"] = {key: config.get(key) for key in ("kernels.cuda.resident-bytes", "kernels.cuda.work-bytes",
                                                     "kernels.cuda.stream", "search.batch-size",
                                                     "search.cache-bytes")}
    import numba

    m["numba_threads"] = int(numba.get_num_threads())


@contextlib.contextmanager
def backend_config(backend: str):
    """Make ``backend`` the kernel backend of build and kmeans (their ``backend=`` keyword, once it
    exists, is passed as well: see :func:`backend_kw`)."""
    import dask.config

    with dask.config.set({"distann.kernels.backend": backend}):
        yield


def backend_kw(fn, backend: str) -> dict:
    return {"backend": backend} if "backend" in inspect.signature(fn).parameters else {}


def _warm_worker(backend: str) -> float:
    """Run on every worker before a timed build / k-means: import the backend, create the CUDA
    context, compile the assignment kernels (first-use costs timed apart)."""
    t0 = time.perf_counter()
    from distann.kernels import get_backend

    kern = get_backend(backend)
    x = np.random.default_rng(0).standard_normal((512, 8)).astype(np.float32)
    kern.assign(x, x[:16].copy(), "l2")
    kern.kmeans_stats(x, x[:16].copy(), "l2")
    return time.perf_counter() - t0


def warm_cluster(client, backend: str) -> float:
    t0 = time.perf_counter()
    client.run(_warm_worker, backend)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- data

def _fill(job: tuple[str, int, int, int, int]) -> int:
    path, start, stop, d, stream = job
    out = np.load(path, mmap_mode="r+")
    out[start:stop] = SyntheticSpec(d).rows(start, stop, stream)
    out.flush()
    return stop - start


def write_npy_parallel(path: str, n: int, d: int, stream: int, workers: int) -> str:
    """The rows of ``distann.synthetic.write_npy`` (identical bytes), generated by ``workers``
    processes into a memory-mapped .npy (renamed into place when complete)."""
    if os.path.exists(path):
        try:
            x = np.load(path, mmap_mode="r")
            if x.shape == (n, d) and x.dtype == np.float32:
                return path
        except Exception:
            pass
    tmp = path + ".part.npy"
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, d)).flush()
    jobs = [(tmp, s, min(n, s + GEN_ROWS), d, stream) for s in range(0, n, GEN_ROWS)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
            done = sum(ex.map(_fill, jobs))
    else:
        done = sum(map(_fill, jobs))
    assert done == n
    os.replace(tmp, path)
    return path


def base_path(args) -> str:
    return os.path.join(args.work, f"base-{args.n}x{args.d}.npy")


def queries(args) -> np.ndarray:
    return synthetic(args.nq, args.d, stream=1)


def phase_data(run: Run) -> None:
    args = run.args
    path = base_path(args)
    reused = os.path.exists(path)
    t0 = time.perf_counter()
    write_npy_parallel(path, args.n, args.d, 0, args.threads)
    run.r["data"] = {"path": path, "n": args.n, "d": args.d, "nq": args.nq, "generator": "distann.synthetic "
                     "(intrinsic_dim 16, seed 1338; stream 0 base, 1 queries)", "bytes": args.n * args.d * 4,
                     "seconds": time.perf_counter() - t0, "reused": reused, "processes": args.threads}
    run.done("data")
    log.info("data: %s (%.1f s%s)", path, run.r["data"]["seconds"], ", reused" if reused else "")


# ----------------------------------------------------------------------------- ground truth

def gt_path(args) -> str:
    return os.path.join(args.work, f"gt-{args.n}x{args.d}-q{args.nq}-k{args.k}.npy")


def torch_knn(torch, X, xn, Q, k: int, block_bytes: int = 2 << 30):
    """Exact top-``k`` (smallest squared L2) of queries ``Q`` against ``X`` (both on the device,
    centred), in blocks of (queries x rows) scores of at most ``block_bytes``."""
    nq, n = Q.shape[0], X.shape[0]
    qb = min(nq, 4096)
    xb = max(k, min(n, block_bytes // (4 * qb)))
    Ds, Is = [], []
    for s in range(0, nq, qb):
        q = Q[s:s + qb]
        qn = (q * q).sum(dim=1, keepdim=True)
        best_d = best_i = None
        for a in range(0, n, xb):
            b = min(n, a + xb)
            S = torch.mm(q, X[a:b].T)
            S.mul_(-2).add_(xn[a:b][None, :])
            d, i = torch.topk(S, min(k, b - a), dim=1, largest=False)
            i += a
            if best_d is not None:
                d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                d, j = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
                i = torch.gather(i, 1, j)
            best_d, best_i = d, i
        Ds.append((best_d + qn).clamp_(min=0))
        Is.append(best_i)
    return torch.cat(Ds), torch.cat(Is)


def numpy_knn(xb: np.ndarray, xq: np.ndarray, k: int, dtype=np.float32, rows: int = 1 << 18):
    """Exact top-``k`` in NumPy (``dtype`` arithmetic), database in blocks of ``rows``."""
    q = xq.astype(dtype)
    qn = (q * q).sum(1)[:, None]
    best_d = np.full((len(q), 0), np.inf, dtype)
    best_i = np.zeros((len(q), 0), np.int64)
    for a in range(0, len(xb), rows):
        x = np.asarray(xb[a:a + rows], dtype=dtype)
        d = (x * x).sum(1)[None, :] - 2 * (q @ x.T) + qn
        d = np.concatenate([best_d, d], 1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(a, a + len(x)), (len(q), len(x)))], 1)
        kk = min(k, d.shape[1])
        part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
        best_d, best_i = np.take_along_axis(d, part, 1), np.take_along_axis(i, part, 1)
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_d, order, 1), np.take_along_axis(best_i, order, 1)


def phase_gt(run: Run) -> None:
    args = run.args
    xb = np.load(base_path(args), mmap_mode="r")
    xq = queries(args)
    mu = np.asarray(xb[:min(args.n, 1 << 20)], dtype=np.float64).mean(0).astype(np.float32)
    torch, why = torch_state()
    out: dict = {}
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dev = torch.device("cuda")
        t0 = time.perf_counter()
        X = torch.empty((args.n, args.d), dtype=torch.float32, device=dev)
        mu_t = torch.from_numpy(mu).to(dev)
        for a in range(0, args.n, 1 << 20):
            X[a:a + (1 << 20)] = torch.from_numpy(np.ascontiguousarray(xb[a:a + (1 << 20)])).to(dev) - mu_t
        xn = (X * X).sum(dim=1)
        torch.cuda.synchronize()
        upload_s = time.perf_counter() - t0
        Q = torch.from_numpy(xq).to(dev) - mu_t
        torch_knn(torch, X, xn, Q[:min(args.nq, 256)], args.k)  # warm-up (cuBLAS handles, kernels)
        torch.cuda.synchronize()
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            D, I = torch_knn(torch, X, xn, Q, args.k)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        gt, gt_d = I.cpu().numpy().astype(np.int64), D.cpu().numpy()
        best = min(times)
        out.update(method="torch.mm + torch.topk on the GPU, float32, TF32 off, data centred on its mean",
                   device=why, torch=torch.__version__, allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                   upload_s=upload_s, seconds=best, all_seconds=times,
                   brute_force={"qps": args.nq / best, "recall": 1.0, "seconds": best,
                                "what": "exact search of all queries, database resident on the GPU"})
        log.info("gt: torch brute force %.3f s = %.0f QPS", best, args.nq / best)
        del X, xn, Q, D, I
        torch.cuda.empty_cache()
    else:
        run.note(f"brute-force baseline not measured: {why}; ground truth by NumPy float32 on the CPU")
        t0 = time.perf_counter()
        gt_d, gt = numpy_knn(_centred(xb, mu), xq - mu, args.k)
        out.update(method="NumPy float32 on the CPU (PyTorch unavailable), data centred on its mean",
                   seconds=time.perf_counter() - t0, brute_force=None, torch_unavailable=why)
    # cross-check a sample of queries in float64
    sample = np.unique(np.linspace(0, args.nq - 1, min(args.nq, args.gt_check)).astype(np.int64))
    t0 = time.perf_counter()
    d64, i64 = numpy_knn(xb, xq[sample], args.k, dtype=np.float64)
    import distann

    same = (np.sort(gt[sample], 1) == np.sort(i64, 1)).all(1)
    rel = np.abs(gt_d[sample].astype(np.float64) - d64) / np.maximum(d64, 1e-30)
    out["float64_check"] = {"queries": len(sample),
                            "recall_vs_float64": distann.recall_at_k(gt[sample], i64, args.k),
                            "rows_identical_id_sets": int(same.sum()), "max_rel_distance_diff": float(rel.max()),
                            "seconds": time.perf_counter() - t0}
    log.info("gt: float64 check on %d queries: recall %.5f, %d/%d identical", len(sample),
             out["float64_check"]["recall_vs_float64"], same.sum(), len(sample))
    np.save(gt_path(args), gt)
    run.r["gt"] = out
    run.done("gt")


class _centred:
    """Rows of a (memory-mapped) array minus ``mu``, sliced lazily (NumPy ground-truth fallback)."""

    def __init__(self, x, mu):
        self.x, self.mu = x, mu

    def __len__(self):
        return len(self.x)

    def __getitem__(self, s):
        return np.asarray(self.x[s], dtype=np.float32) - self.mu


def load_gt(run: Run) -> np.ndarray | None:
    path = gt_path(run.args)
    return np.load(path) if os.path.exists(path) else None


# ----------------------------------------------------------------------------- builds

def spec_names(args) -> list[str]:
    return [f"IVF{args.nlist},{q}" for q in args.quantizers]


def index_url(args, spec: str, backend: str | None = None) -> str:
    tag = spec.replace(",", "-").lower()
    return os.path.join(args.work, f"{tag}-n{args.n}" + (f"-{backend}" if backend else "") + ".zarr")


def build_one(run: Run, spec: str, backend: str, workers: int, url: str) -> dict:
    import distann
    from distann.builder.driver import build
    from distann.cluster import client_context

    args = run.args
    with backend_config(backend), client_context(workers=workers) as client:
        warm = warm_cluster(client, backend)
        t0 = time.perf_counter()
        index = distann.build(base_path(args), url, spec=spec, client=client, overwrite=True, seed=args.seed,
                              **backend_kw(build, backend))
        seconds = time.perf_counter() - t0
    info = index.info()
    return {"seconds": seconds, "workers": workers, "worker_warmup_s": warm,
            "timings": index.manifest.build.get("timings"), "objective": (index.manifest.build.get("objective")
                                                                          or [None])[-1],
            "imbalance": info["list_sizes"]["imbalance"], "bytes_in_memory": info["bytes_in_memory"],
            "url": url}


def phase_build(run: Run, backends: list[str]) -> None:
    args = run.args
    primary = backends[0]
    builds = run.r.setdefault("builds", {})
    for spec in spec_names(args):
        url = index_url(args, spec)
        unit = f"build {spec} {primary}"
        prev = builds.get(spec, {}).get(primary)
        if prev and not args.force and os.path.exists(url):
            log.info("%s: reusing %s (built earlier, %.1f s)", unit, url, prev["seconds"])
            continue
        if not run.may_start(unit):
            continue
        workers = args.gpu_workers if primary == "cuda" else args.cpu_workers
        log.info("%s on %d worker processes", unit, workers)
        builds.setdefault(spec, {})[primary] = build_one(run, spec, primary, workers, url)
        run.indexes.pop(spec, None)
        run.done(unit)
        log.info("%s: %.1f s", unit, builds[spec][primary]["seconds"])
        run.save()
    if args.cpu_build and primary != "numba":
        for spec in spec_names(args):
            unit = f"build {spec} numba"
            if not run.may_start(unit):
                continue
            url = index_url(args, spec, "numba")
            log.info("%s on %d worker processes", unit, args.cpu_workers)
            builds.setdefault(spec, {})["numba"] = build_one(run, spec, "numba", args.cpu_workers, url)
            shutil.rmtree(url, ignore_errors=True)  # only its time is wanted
            run.done(unit)
            run.save()
    for by in builds.values():
        if "cuda" in by and "numba" in by:
            by["numba_over_cuda_time"] = by["numba"]["seconds"] / by["cuda"]["seconds"]


# ----------------------------------------------------------------------------- search

def open_spec(run: Run, spec: str):
    """The opened, loaded index of ``spec`` (one object per run: the cuda backend keys its
    device-resident copies on the host arrays of the loaded lists)."""
    import distann

    if spec not in run.indexes:
        url = index_url(run.args, spec)
        if not os.path.exists(url):
            return None
        index = distann.open_index(url)
        t0 = time.perf_counter()
        index.load()
        run.r.setdefault("load_s", {})[spec] = time.perf_counter() - t0
        run.indexes[spec] = index
    return run.indexes[spec]


def warm(index, xq: np.ndarray, k: int, backend: str) -> float:
    """Two calls (compilation; with cuda the lists become device-resident at the second)."""
    t0 = time.perf_counter()
    for _ in range(2):
        index.search(xq[:256], k=k, nprobe=min(8, index.nlist), backend=backend)
    return time.perf_counter() - t0


def best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def first_at_target(points: list[dict]) -> dict | None:
    return next((p for p in points if p["recall"] >= TARGET), None)


def nprobes_for(args, nlist: int) -> list[int]:
    return [p for p in args.nprobes if p <= nlist] or [nlist]


def phase_search(run: Run, backends: list[str]) -> None:
    import distann

    args = run.args
    gt = load_gt(run)
    if gt is None:
        run.skip("search", "no ground truth in --work (run the gt phase)")
        return
    xq = queries(args)
    res = run.r.setdefault("search", {})
    for spec in spec_names(args):
        index = open_spec(run, spec)
        if index is None:
            run.skip(f"search {spec}", f"no index at {index_url(args, spec)} (run the build phase)")
            continue
        row = res.setdefault(spec, {})
        results_I = {}
        for backend in backends:
            unit = f"search {spec} {backend}"
            if not run.may_start(unit):
                continue
            log.info("%s", unit)
            warm_s = warm(index, xq, args.k, backend)
            points = []
            for nprobe in nprobes_for(args, index.nlist):
                if run.left() < args.min_unit_seconds:
                    run.note(f"{unit}: sweep cut after nprobe {points[-1]['nprobe'] if points else None} (time budget)")
                    break
                _, I = index.search(xq, k=args.k, nprobe=nprobe, backend=backend)
                seconds = best_time(lambda ix=index, p=nprobe, b=backend: ix.search(xq, k=args.k, nprobe=p, backend=b),
                                    args.repeats)
                points.append({"nprobe": nprobe, "recall": distann.recall_at_k(I, gt, args.k),
                               "qps": args.nq / seconds, "seconds": seconds})
                results_I[(backend, nprobe)] = I
                log.info("  %s nprobe %3d recall %.4f QPS %.0f", backend, nprobe, points[-1]["recall"],
                         points[-1]["qps"])
            row[backend] = {"warmup_s": warm_s, "curve": points, "at_target": first_at_target(points),
                            "threads": args.threads if backend == "numba" else None}
            run.done(unit)
            run.save()
        ratios(run, spec, results_I)
        run.save()


def ratios(run: Run, spec: str, results_I: dict) -> None:
    row = run.r["search"][spec]
    c, n = row.get("cuda"), row.get("numba")
    out = {}
    if c and n and n.get("at_target"):
        p = n["at_target"]["nprobe"]
        cp_ = next((q for q in c["curve"] if q["nprobe"] == p), None)
        if cp_:
            out["cuda_over_numba"] = {"nprobe": p, "recall_cuda": cp_["recall"],
                                      "recall_numba": n["at_target"]["recall"],
                                      "qps_cuda": cp_["qps"], "qps_numba": n["at_target"]["qps"],
                                      "ratio": cp_["qps"] / n["at_target"]["qps"], "target": 10.0}
            Ic, In = results_I.get(("cuda", p)), results_I.get(("numba", p))
            if Ic is not None and In is not None:
                out["cuda_over_numba"]["rows_with_different_ids"] = int((Ic != In).any(axis=1).sum())
    bf = (run.r.get("gt") or {}).get("brute_force")
    if c and c.get("at_target") and bf:
        out["cuda_over_torch"] = {"nprobe": c["at_target"]["nprobe"], "recall_cuda": c["at_target"]["recall"],
                                  "qps_cuda": c["at_target"]["qps"], "qps_torch": bf["qps"],
                                  "ratio": c["at_target"]["qps"] / bf["qps"], "target": 5.0}
    row["ratios"] = out


# ----------------------------------------------------------------------------- ceilings

def measure_device(args) -> dict:
    """Copy bandwidth (device to device, bytes read + written; pinned host to device) and the
    float32 GEMM rate, with CUDA events."""
    import cupy as cp

    free = int(cp.cuda.Device().mem_info[0])
    out: dict = {"cupy_tf32_env": os.environ.get("CUPY_TF32")}
    nbytes = int(min(args.copy_bytes, free // 8)) // 4 * 4
    a = cp.ones(nbytes // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    cp.copyto(b, a)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    reps = 10
    start.record()
    for _ in range(reps):
        cp.copyto(b, a)
    end.record()
    end.synchronize()
    s = cp.cuda.get_elapsed_time(start, end) / 1e3
    out["copy_d2d"] = {"bytes": nbytes, "reps": reps, "seconds": s,
                       "gbps_read_plus_write": 2 * nbytes * reps / s / 1e9, "gbps_read": nbytes * reps / s / 1e9}
    del a, b
    hbytes = int(min(args.copy_bytes // 2, free // 8))
    mem = cp.cuda.alloc_pinned_memory(hbytes)
    h = np.frombuffer(mem, dtype=np.uint8, count=hbytes)
    h[:] = 1
    d = cp.empty(hbytes, dtype=cp.uint8)
    d.set(h)
    cp.cuda.Device().synchronize()
    start.record()
    for _ in range(reps):
        d.set(h)
    end.record()
    end.synchronize()
    s = cp.cuda.get_elapsed_time(start, end) / 1e3
    out["h2d_pinned"] = {"bytes": hbytes, "reps": reps, "seconds": s, "gbps": hbytes * reps / s / 1e9}
    del d, h, mem
    N = args.gemm_n
    rng = cp.random.default_rng(0)
    A = rng.standard_normal((N, N), dtype=cp.float32)
    B = rng.standard_normal((N, N), dtype=cp.float32)
    for _ in range(2):
        C = cp.matmul(A, B)
    reps = 5
    start.record()
    for _ in range(reps):
        C = cp.matmul(A, B)
    end.record()
    end.synchronize()
    s = cp.cuda.get_elapsed_time(start, end) / 1e3
    out["sgemm"] = {"n": N, "reps": reps, "seconds": s, "tflops": 2 * N ** 3 * reps / s / 1e12,
                    "dtype": "float32 (FP32 unless CUPY_TF32=1)"}
    del A, B, C
    cp.get_default_memory_pool().free_all_blocks()
    return out


def prepared(index, kern, xq: np.ndarray, nprobe: int):
    """A batch prepared as ``Index.search`` prepares it for a resident index: transformed queries,
    coarse quantization, the probes grouped by list over all lists."""
    from distann.codecs.metric import kernel_metric
    from distann.search import engine
    from distann.search.plan import expand_to_all_lists, plan_probes

    q = np.ascontiguousarray(index.codec.transform(index.codec.raw(np.ascontiguousarray(xq, dtype=np.float32))))
    _, probes = kern.coarse_quantize(q, index.centroids, nprobe, kernel_metric(index.metric))
    plan = plan_probes(probes, index.list_sizes)
    groups = expand_to_all_lists(plan, index.nlist)
    pr = engine.Probes(groups, plan.group_queries, plan.group_slots, plan.group_limits)
    return q, pr, plan


def scan_call(index, kern, q, pr, nprobe: int, k: int):
    from distann.search import engine

    return engine.scan(kern, index.codec, q, index.lists.resident, index.centroids, pr, np.empty(0, np.uint8),
                       nprobe, k)


def phase_ceiling(run: Run) -> None:
    from distann.codecs.metric import kernel_metric
    from distann.kernels import get_backend

    args = run.args
    ok, why = cuda_state()
    if "cuda" not in args.backends:
        run.skip("ceiling", f"cuda not among --backends {' '.join(args.backends)}")
        return
    if not ok:
        run.skip("ceiling", f"cuda backend unusable: {why}")
        return
    if not run.may_start("ceiling"):
        return
    kern = get_backend("cuda")
    ceil = run.r.setdefault("ceilings", {})
    if kern.device_info()["simulated"]:  # --simulator: the code path only, no ceilings to hold it to
        ceil["device"] = None
        run.note("ceilings not measured: Numba's CUDA simulator (--simulator) has no device; scan times only")
        copy_gbps = sgemm_tflops = None
    else:
        dev = ceil["device"] = measure_device(args)
        copy_gbps, sgemm_tflops = dev["copy_d2d"]["gbps_read_plus_write"], dev["sgemm"]["tflops"]
        log.info("ceilings: copy %.0f GB/s (read+write), pinned H2D %.1f GB/s, SGEMM %.1f TFLOP/s",
                 copy_gbps, dev["h2d_pinned"]["gbps"], sgemm_tflops)
    run.save()
    xq = queries(args)
    scans = ceil["scans"] = []
    for spec in spec_names(args):
        unit = f"ceiling {spec}"
        index = open_spec(run, spec)
        if index is None:
            run.skip(unit, f"no index at {index_url(args, spec)}")
            continue
        if not run.may_start(unit):
            continue
        warm(index, xq, args.k, "cuda")
        at = ((run.r.get("search", {}).get(spec) or {}).get("cuda") or {}).get("at_target")
        nprobe = min(index.nlist, max(64, at["nprobe"] if at else 64))
        code = index.codec.code_size
        for nq in [n for n in (1, 16) if n <= args.nq]:
            reps = max(1, min(args.scan_reps, args.nq // nq))  # distinct queries in every call
            batches = [prepared(index, kern, xq[i * nq:(i + 1) * nq], nprobe) for i in range(reps)]
            for q, pr, _ in batches[:2]:
                scan_call(index, kern, q, pr, nprobe, args.k)
            times, ubytes, pbytes, search_times = [], 0, 0, []
            for q, pr, plan in batches:
                t0 = time.perf_counter()
                scan_call(index, kern, q, pr, nprobe, args.k)
                times.append(time.perf_counter() - t0)
                ubytes += int(index.list_sizes[plan.lists].sum()) * code
                pbytes += int(plan.group_limits.sum()) * code
            for i in range(reps):
                t0 = time.perf_counter()
                index.search(xq[i * nq:(i + 1) * nq], k=args.k, nprobe=nprobe, backend="cuda")
                search_times.append(time.perf_counter() - t0)
            total = sum(times)
            gbps = ubytes / total / 1e9
            scans.append({"spec": spec, "nq": nq, "nprobe": nprobe, "calls": reps, "bound": "bandwidth",
                          "scan_s_total": total, "scan_ms_median": 1e3 * float(np.median(times)),
                          "search_ms_median": 1e3 * float(np.median(search_times)),
                          "distinct_list_bytes": ubytes, "pair_bytes": pbytes, "gbps": gbps,
                          "fraction": gbps / copy_gbps if copy_gbps else None})
            log.info("  %s nq %d nprobe %d: scan %.3f ms, %.3g GB/s = %s of copy", spec, nq, nprobe,
                     scans[-1]["scan_ms_median"], gbps, _pct(scans[-1]["fraction"]))
        q, pr, plan = prepared(index, kern, xq, nprobe)
        scan_call(index, kern, q, pr, nprobe, args.k)
        secs = best_time(lambda ix=index, q=q, pr=pr, p=nprobe: scan_call(ix, kern, q, pr, p, args.k), args.repeats)
        coarse = best_time(lambda ix=index, q=q, p=nprobe: kern.coarse_quantize(q, ix.centroids, p,
                                                                                 kernel_metric(ix.metric)),
                           args.repeats)
        full = best_time(lambda ix=index, p=nprobe: ix.search(xq, k=args.k, nprobe=p, backend="cuda"), args.repeats)
        scanned = int(plan.group_limits.sum())
        flops = 2 * index.d * scanned
        scans.append({"spec": spec, "nq": args.nq, "nprobe": nprobe, "bound": "gemm", "scan_s": secs,
                      "coarse_s": coarse, "search_s": full, "scanned_vectors": scanned, "useful_flops": flops,
                      "tflops": flops / secs / 1e12,
                      "fraction": flops / secs / 1e12 / sgemm_tflops if sgemm_tflops else None})
        log.info("  %s nq %d nprobe %d: scan %.3f s, %.3g TFLOP/s = %s of SGEMM", spec, args.nq, nprobe, secs,
                 scans[-1]["tflops"], _pct(scans[-1]["fraction"]))
        run.done(unit)
        run.save()
    run.done("ceiling")


# ----------------------------------------------------------------------------- k-means

def phase_kmeans(run: Run, backends: list[str]) -> None:
    import distann
    from distann.cluster import client_context
    from distann.train.api import kmeans

    args = run.args
    if not run.may_start("kmeans"):
        return
    path = os.path.join(args.work, f"kmeans-{args.kmeans_n}x{args.d}.npy")
    write_npy_parallel(path, args.kmeans_n, args.d, 2, args.threads)
    mppc = math.ceil(args.kmeans_n / args.kmeans_k)  # the sample is the whole file
    res = run.r.setdefault("kmeans", {})
    res.update(n=args.kmeans_n, d=args.d, k=args.kmeans_k, niter=args.kmeans_iter, seed=args.seed, init="random")
    for backend in [b for b in ("cuda", "numba") if b in backends]:
        unit = f"kmeans {backend}"
        if not run.may_start(unit):
            continue
        workers = args.gpu_workers if backend == "cuda" else args.cpu_workers
        log.info("%s on %d worker processes", unit, workers)
        kw = dict(niter=args.kmeans_iter, seed=args.seed, init="random", max_points_per_centroid=mppc,
                  **backend_kw(kmeans, backend))
        with backend_config(backend), client_context(workers=workers) as client:
            warm_s = warm_cluster(client, backend)
            distann.kmeans(path, args.kmeans_k, client=client, **{**kw, "niter": 1})  # sample + first use
            t0 = time.perf_counter()
            out = distann.kmeans(path, args.kmeans_k, client=client, **kw)
            seconds = time.perf_counter() - t0
        res[backend] = {"seconds": seconds, "workers": workers, "worker_warmup_s": warm_s,
                        "objective": out.objective[-1], "objectives": out.objective, "n_sample": out.n_sample,
                        "seconds_per_iter": seconds / args.kmeans_iter}
        log.info("%s: %.1f s, objective %.6g", unit, seconds, out.objective[-1])
        run.done(unit)
        run.save()
    if "cuda" in res and "numba" in res:
        res["rel_objective_diff"] = abs(res["cuda"]["objective"] - res["numba"]["objective"]) / abs(
            res["numba"]["objective"])
        res["speedup"] = res["numba"]["seconds"] / res["cuda"]["seconds"]


# ----------------------------------------------------------------------------- report

def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _f(x, fmt="{:,.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def markdown(r: dict) -> str:
    m = r.get("meta", {})
    sz = m.get("sizes", {})
    cb = m.get("cuda_backend") or {}
    dev = f"**{cb['device']}**" if cb.get("device") else f"none usable by the cuda backend ({cb.get('reason', 'n/a')})"
    L = ["# GPU backend benchmark", "",
         f"Measured {m.get('date', '?')} by `jobs/bench_gpu.py` ({m.get('elapsed_s', '?')} s, last written "
         f"{m.get('written', '?')}): device {dev}; {m.get('cores', '?')} CPU cores ({m.get('cpu', '?')}), "
         f"{m.get('memory_gib', '?')} GiB; numba threads {m.get('numba_threads', '?')}.",
         f"Data: {sz.get('n', 0):,} x {sz.get('d')} synthetic vectors (`distann.synthetic`, intrinsic dimension 16), "
         f"{sz.get('nq', 0):,} queries, k={sz.get('k')}, nlist={sz.get('nlist')}. "
         f"Versions: {', '.join(f'{k} {v}' for k, v in (m.get('versions') or {}).items())}."
         + (f" CUDA runtime {m['cuda_runtime']}, driver {m.get('cuda_driver')}." if m.get("cuda_runtime") else ""), ""]
    skipped = r.get("skipped") or {}
    if skipped:
        L += ["Skipped by the last run (figures an earlier run of the same sizes measured are kept below):",
              ""] + [f"- {u}: {w}" for u, w in skipped.items()] + [""]
    if r.get("notes"):
        L += ["Notes:", ""] + [f"- {n}" for n in r["notes"]] + [""]

    # --- QPS at target
    s = r.get("search") or {}
    bf = (r.get("gt") or {}).get("brute_force")
    L += ["## Batch QPS at 10-recall@10 >= 0.9", "",
          f"All {sz.get('nq', 0):,} queries in one `Index.search` call on a loaded index, after two warm-up calls "
          "(compilation; the cuda backend keeps the lists on the device from the second call), best of "
          f"{m.get('repeats', '?')} timed calls; smallest nprobe reaching the target.", "",
          "| index | backend | nprobe | 10-recall@10 | batch QPS |", "|---|---|---|---|---|"]
    for spec, row in s.items():
        for b in ("cuda", "numba"):
            at = (row.get(b) or {}).get("at_target")
            if b in row:
                L.append(f"| {spec} | {b} | {_f(at and at['nprobe'], '{}')} | {_f(at and at['recall'], '{:.3f}')} | "
                         f"{_f(at and at['qps'])} |" if at else f"| {spec} | {b} | not reached (best "
                         f"{max((p['recall'] for p in row[b]['curve']), default=0):.3f}) | | |")
    if bf:
        L.append(f"| exact | PyTorch brute force | - | 1.000 | {_f(bf['qps'])} |")
    L.append("")
    for spec, row in s.items():
        ra = row.get("ratios") or {}
        if "cuda_over_numba" in ra:
            x = ra["cuda_over_numba"]
            L.append(f"- {spec}: cuda / numba at nprobe {x['nprobe']} (recall {x['recall_cuda']:.3f} / "
                     f"{x['recall_numba']:.3f}): **{x['ratio']:.1f}x** (target >= 10x); result rows whose ids "
                     f"differ: {x.get('rows_with_different_ids', 'n/a')}.")
        if "cuda_over_torch" in ra:
            x = ra["cuda_over_torch"]
            L.append(f"- {spec}: cuda at nprobe {x['nprobe']} / PyTorch brute force: **{x['ratio']:.1f}x** "
                     "(target >= 5x).")
    L.append("")
    if s:
        L += ["Recall and QPS over nprobe:", "", "| index | backend | " + " | ".join(
            f"nprobe {p}" for p in _all_nprobes(s)) + " |", "|---|---|" + "---|" * len(_all_nprobes(s))]
        for spec, row in s.items():
            for b in ("cuda", "numba"):
                if b in row:
                    pts = {p["nprobe"]: p for p in row[b]["curve"]}
                    L.append(f"| {spec} | {b} | " + " | ".join(
                        f"{pts[p]['recall']:.3f} / {pts[p]['qps']:,.0f}" if p in pts else "" for p in _all_nprobes(s))
                        + " |")
        L += ["", "(cells: 10-recall@10 / QPS)", ""]

    # --- builds
    b = r.get("builds") or {}
    if b:
        L += ["## Build", "", "`distann.build` from the .npy file on a local Dask cluster (worker processes; "
              "first-use costs in the workers, the CUDA context and compilation, are run before the timing).", "",
              "| index | backend | workers | seconds | stages (s) | imbalance |", "|---|---|---|---|---|---|"]
        for spec, by in b.items():
            for be in ("cuda", "numba"):
                if be in by:
                    x = by[be]
                    t = x.get("timings") or {}
                    L.append(f"| {spec} | {be} | {x['workers']} | {x['seconds']:.1f} | "
                             + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if isinstance(v, (int, float)))
                             + f" | {x['imbalance']:.3f} |")
        L.append("")

    # --- ground truth
    g = r.get("gt")
    if g:
        c = g.get("float64_check") or {}
        L += ["## Ground truth", "", f"{g['method']}: {g['seconds']:.2f} s for {sz.get('nq', 0):,} queries"
              + (f" ({bf['qps']:,.0f} QPS, the brute-force baseline)" if bf else "") + ". "
              f"Float64 NumPy check on {c.get('queries')} queries: 10-recall@10 {c.get('recall_vs_float64', 0):.5f}, "
              f"{c.get('rows_identical_id_sets')} rows with identical id sets, largest relative distance difference "
              f"{c.get('max_rel_distance_diff', 0):.2e}.", ""]

    # --- ceilings
    ce = r.get("ceilings") or {}
    if ce.get("device") or ce.get("scans"):
        d = ce.get("device")
        L += ["## Scan against its binding ceiling", "",
              (f"Measured here: device-to-device copy {d['copy_d2d']['gbps_read_plus_write']:,.0f} GB/s (bytes read + "
               f"written, {d['copy_d2d']['bytes'] / 2**30:.1f} GiB buffer), pinned host to device "
               f"{d['h2d_pinned']['gbps']:,.1f} GB/s, float32 GEMM ({d['sgemm']['n']}^3, cupy.matmul, CUPY_TF32="
               f"{d.get('cupy_tf32_env')}) {d['sgemm']['tflops']:,.1f} TFLOP/s." if d else
               "Ceilings not measured (no device); scan times only."), "",
              "The scan is timed as the kernel-backend call on a prepared batch (`engine.scan` -> `scan_lists` / "
              "`scan_lists_sq`: query and probe arrays from the host, the per-(query, probe) top-k back to the host; "
              "coarse quantization, planning and the final merge are not in it). Small batches are held to the copy "
              "bandwidth (bytes of the distinct probed lists' codes, ids not counted, one query batch per call, "
              "different queries each call); the full batch to the GEMM rate (useful flops = 2 d per scanned "
              "vector; SQ8 decoding not counted).", "",
              "| index | queries | nprobe | scan (median ms / total s) | Index.search | achieved "
              "| fraction of ceiling |",
              "|---|---|---|---|---|---|---|"]
        for x in ce.get("scans", []):
            if x["bound"] == "bandwidth":
                L.append(f"| {x['spec']} | {x['nq']} | {x['nprobe']} | {x['scan_ms_median']:.3f} ms | "
                         f"{x['search_ms_median']:.3f} ms | {x['gbps']:,.3g} GB/s | "
                         f"{_pct(x['fraction'])} of copy |")
            else:
                L.append(f"| {x['spec']} | {x['nq']:,} | {x['nprobe']} | {x['scan_s']:.3f} s | {x['search_s']:.3f} s "
                         f"(coarse {x['coarse_s']:.3f} s) | {x['tflops']:.3g} TFLOP/s | "
                         f"{_pct(x['fraction'])} of SGEMM |")
        L.append("")

    # --- k-means
    km = r.get("kmeans") or {}
    if "cuda" in km or "numba" in km:
        L += ["## k-means", "", f"`distann.kmeans`: {km['n']:,} x {km['d']} (stream 2 of the generator), "
              f"k={km['k']:,}, "
              f"{km['niter']} iterations, random init, seed {km['seed']}; the time includes the sampling pass over the "
              "file (a one-iteration run on the same cluster comes first, untimed).", "",
              "| backend | workers | seconds | s / iteration | final objective |", "|---|---|---|---|---|"]
        for be in ("cuda", "numba"):
            if be in km:
                x = km[be]
                L.append(f"| {be} | {x['workers']} | {x['seconds']:.1f} | {x['seconds_per_iter']:.2f} | "
                         f"{x['objective']:.8g} |")
        if "rel_objective_diff" in km:
            L += ["", f"Relative objective difference {km['rel_objective_diff']:.2e} (target within 0.1% = 1e-3); "
                      f"numba / cuda time {km['speedup']:.1f}x."]
        L.append("")

    L += ["## Published Faiss-GPU figures (not run here)", "",
          "No side-by-side Faiss-GPU run is possible in this setup; these figures are quoted from their sources, on "
          "other data, codecs and hardware, so they only place the measurements above:", ""]
    L += [f"- {src}: {fig}." for src, fig in PUBLISHED]
    return "\n".join(L) + "\n"


def _all_nprobes(s: dict) -> list[int]:
    return sorted({p["nprobe"] for row in s.values() for b in ("cuda", "numba") if b in row for p in row[b]["curve"]})


# ----------------------------------------------------------------------------- main

def load_previous(args) -> dict | None:
    path = args.resume or os.path.join(args.work, "gpu.json")
    if args.fresh or not os.path.exists(path):
        return None
    with open(path) as f:
        prev = json.load(f)
    sizes = (prev.get("meta") or {}).get("sizes") or {}
    want = {"n": args.n, "d": args.d, "nq": args.nq, "k": args.k, "nlist": args.nlist}
    if any(sizes.get(k) != v for k, v in want.items()):
        log.warning("not continuing %s: it holds other sizes (%s)", path, sizes)
        return None
    log.info("continuing the results in %s", path)
    return prev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--d", type=int, default=96)
    p.add_argument("--nq", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--quantizers", nargs="+", default=["Flat", "SQ8"])
    p.add_argument("--nprobes", type=int, nargs="+", default=list(NPROBES))
    p.add_argument("--backends", nargs="+", default=["cuda", "numba"], choices=["cuda", "numba", "numpy"],
                   help="search / k-means backends; the first usable one builds the indexes")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="numba threads of the search (all cores)")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count(), help="worker processes of numba builds/k-means")
    p.add_argument("--gpu-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes of cuda builds / k-means (they share the GPU)")
    p.add_argument("--cpu-build", action="store_true", help="also time the build with the numba backend")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of each batch search (best kept)")
    p.add_argument("--gt-check", type=int, default=100, help="queries cross-checked in float64")
    p.add_argument("--scan-reps", type=int, default=32, help="small-batch scan calls timed per size")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="buffer of the copy-bandwidth measurement")
    p.add_argument("--gemm-n", type=int, default=8192)
    p.add_argument("--kmeans-n", type=int, default=1_000_000)
    p.add_argument("--kmeans-k", type=int, default=4096)
    p.add_argument("--kmeans-iter", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; phases left when it is spent are skipped")
    p.add_argument("--min-unit-seconds", type=float, default=20.0,
                   help="do not start a step with less than this left of the time budget")
    p.add_argument("--work", default="data/bench-gpu", help="data, ground truth, indexes, continuation state")
    p.add_argument("--docs", default="docs/benchmarks", help="where gpu.json and gpu.md are written")
    p.add_argument("--out", default=None, help="also copy gpu.json and gpu.md here (e.g. $OUT on the device)")
    p.add_argument("--resume", default=None, help="results to continue (default: WORK/gpu.json if same sizes)")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results")
    p.add_argument("--force", action="store_true", help="rebuild indexes even if built earlier")
    p.add_argument("--simulator", action="store_true", help=argparse.SUPPRESS)  # cuda code paths without a GPU
    p.add_argument("--report-only", action="store_true", help="only re-render gpu.md from the results")
    args = p.parse_args(argv)
    global ALLOW_SIMULATOR
    ALLOW_SIMULATOR = args.simulator
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distann.train.kmeans").setLevel(logging.WARNING)
    import distributed  # noqa: F401 - its import sets the "distributed" logger to INFO: quiet it after

    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))  # before numba's first import
    os.makedirs(args.work, exist_ok=True)

    results = load_previous(args) or {}
    results["meta"] = {**results.get("meta", {}), **meta(args)}
    run = Run(args, results)
    if args.report_only:
        run.save()
        print(markdown(results))
        return 0
    device_meta(run)
    if "cuda" not in args.backends:
        run.note(f"cuda backend not requested (--backends {' '.join(args.backends)}): no GPU figures in this run")
    backends = []
    for b in args.backends:
        if b == "cuda":
            ok, why = cuda_state()
            if not ok:
                run.note(f"cuda backend skipped: {why}")
                for ph in ("search", "kmeans"):
                    run.r.setdefault("skipped", {})[f"{ph} (cuda)"] = why
                continue
        backends.append(b)
    if not backends:
        run.skip("all", "no usable backend")
        return 1
    run.save()
    steps = {"data": lambda: phase_data(run), "gt": lambda: phase_gt(run), "build": lambda: phase_build(run, backends),
             "search": lambda: phase_search(run, backends), "ceiling": lambda: phase_ceiling(run),
             "kmeans": lambda: phase_kmeans(run, backends)}
    for phase in PHASES:
        if phase not in args.phases:
            continue
        if phase in ("data", "gt") and not run.may_start(phase):
            continue
        if phase != "data" and phase != "kmeans" and not os.path.exists(base_path(args)):
            run.skip(phase, f"no data at {base_path(args)} (run the data phase)")
            continue
        print(f"===== phase {phase} ({run.left():.0f} s of budget left)" if args.time_budget else
              f"===== phase {phase}", flush=True)
        steps[phase]()  # each step clears the skips of what it measured and notes what it skipped
        run.save()
    if any(b == "cuda" for b in backends):
        with contextlib.suppress(Exception):
            importlib.import_module("distann.kernels.cuda").clear_resident()
    run.save()
    print(markdown(run.r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
