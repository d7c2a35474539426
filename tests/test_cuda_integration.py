"""The cuda backend chosen by name everywhere: search, range search, build, k-means and
big-batch search on a real multi-process cluster (Numba's CUDA simulator, switched on for the
test session by tests/conftest.py), the workers checked before any task, and the errors of a
machine without CuPy (subprocesses with the simulator off)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import distann
from distann.cli import main
from distann.errors import ValidationError
from distann.train.kmeans import TrainingWarning
from tests.ann_helpers import cli, dataset

# the simulator runs a Python thread per GPU thread: tiny data only
N, D, NQ, NLIST, K, NPROBE = 300, 8, 4, 4, 5, 2
SPECS = ["IVF4,Flat", "IVF4,SQ8", "IVF4,PQ4x4"]

#: the cuda backend's kernels, counted in the processes that run them
KERNELS = ("coarse_quantize", "scan_lists", "scan_lists_sq", "scan_lists_pq", "range_scan_lists", "merge_topk",
           "assign", "kmeans_stats", "exact_knn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def data():
    return dataset(N, D, NQ, seed=21)


@pytest.fixture(scope="module")
def indexes(client, data, tmp_path_factory):
    xb, _ = data
    root = tmp_path_factory.mktemp("cuda")
    with warnings.catch_warnings():  # PQ4x4: 300 training vectors for 16 centroids a sub-space (< 39 each)
        warnings.simplefilter("ignore", TrainingWarning)
        return {spec: distann.build(xb, str(root / f"{spec}.zarr"), spec=spec, client=client, niter=4,
                                    backend="numba") for spec in SPECS}


def _counters():
    """(install, remove): wrap the cuda backend's kernels in the process that runs them to count
    their calls, and put them back returning the counts. Closures, so that ``client.run`` ships
    them by value to the workers."""
    def install(names=KERNELS):
        import distann.kernels.cuda as m

        if not hasattr(m, "_test_calls"):
            m._test_calls = {}
            for n in names:
                def wrapper(*a, _orig=getattr(m, n), _n=n, **kw):
                    m._test_calls[_n] = m._test_calls.get(_n, 0) + 1
                    return _orig(*a, **kw)
                wrapper._test_orig = getattr(m, n)
                setattr(m, n, wrapper)
        m._test_calls.clear()

    def remove(names=KERNELS):
        import distann.kernels.cuda as m

        calls = dict(getattr(m, "_test_calls", {}))
        for n in names:
            setattr(m, n, getattr(getattr(m, n), "_test_orig", getattr(m, n)))
        if hasattr(m, "_test_calls"):
            del m._test_calls
        return calls

    return install, remove


@contextlib.contextmanager
def cuda_calls(client=None):
    """Count the cuda kernels called inside the block, on the workers of ``client`` (or in this
    process): the proof that a job ran on the backend it was given, not on the default."""
    install, remove = _counters()
    calls: dict[str, int] = {}
    client.run(install) if client is not None else install()
    try:
        yield calls
    finally:
        for r in (client.run(remove).values() if client is not None else [remove()]):
            for n, v in r.items():
                calls[n] = calls.get(n, 0) + v


def no_sim_env() -> dict:
    """The environment of a machine without a GPU: no simulator, no device tests."""
    env = {k: v for k, v in os.environ.items() if k != "DISTANN_TEST_GPU"}
    env["NUMBA_ENABLE_CUDASIM"] = "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


needs_no_cupy = pytest.mark.skipif(importlib.util.find_spec("cupy") is not None,
                                   reason="CuPy is installed: the no-CuPy errors cannot be shown here")


# --------------------------------------------------------------------------- same results

@pytest.mark.parametrize("spec", SPECS)
def test_search_and_range_search_equal_numba(indexes, data, spec):
    _, xq = data
    index = indexes[spec]
    Dn, In = index.search(xq, k=K, nprobe=NPROBE, backend="numba")
    radius = float(np.median(Dn))  # about half of the kNN results inside
    ln, Dnr, Inr = index.range_search(xq, radius, nprobe=NPROBE, backend="numba")
    with cuda_calls() as calls:
        Dc, Ic = index.search(xq, k=K, nprobe=NPROBE, backend="cuda")
        lc, Dcr, Icr = index.range_search(xq, radius, nprobe=NPROBE, backend="cuda")
    scan = {"IVF4,Flat": "scan_lists", "IVF4,SQ8": "scan_lists_sq", "IVF4,PQ4x4": "scan_lists_pq"}[spec]
    assert calls.get("coarse_quantize", 0) >= 2 and calls.get(scan, 0) >= 1 and calls.get("range_scan_lists", 0) >= 1, \
        calls
    np.testing.assert_array_equal(Ic, In)
    np.testing.assert_allclose(Dc, Dn, rtol=1e-4, atol=1e-6)
    assert 0 < ln[-1] < NQ * N  # the range search returns something and not everything
    np.testing.assert_array_equal(lc, ln)
    np.testing.assert_array_equal(Icr, Inr)
    np.testing.assert_allclose(Dcr, Dnr, rtol=1e-4, atol=1e-6)


def test_build_on_cuda_workers_equals_numba(client, data, indexes, tmp_path):
    xb, xq = data
    ref = indexes["IVF4,Flat"]
    with cuda_calls(client) as calls:
        idx = distann.build(xb, str(tmp_path / "cuda.zarr"), spec="IVF4,Flat", client=client, niter=4, backend="cuda")
    # the k-means and the add stage's assignment ran the cuda kernels on the workers
    assert calls.get("kmeans_stats", 0) >= 4 and calls.get("assign", 0) >= 1, calls
    assert idx.manifest.build["backend"] == "cuda" and ref.manifest.build["backend"] == "numba"
    # same seed, same sample, same Lloyd steps: the float32 GEMM scores differ in the last bits
    # only, so no point changes list (none lies on a tie at this size) and the centroids agree
    np.testing.assert_array_equal(idx.list_sizes, ref.list_sizes)
    np.testing.assert_allclose(idx.centroids, ref.centroids, rtol=1e-4, atol=1e-5)
    Dc, Ic = idx.search(xq, k=K, nprobe=NLIST, backend="numba")
    Dn, In = ref.search(xq, k=K, nprobe=NLIST, backend="numba")
    np.testing.assert_array_equal(Ic, In)


def test_kmeans_on_cuda_workers_matches_numba(client, data):
    xb, _ = data
    ref = distann.kmeans(xb, 6, niter=5, seed=7, client=client, backend="numba")
    with cuda_calls(client) as calls:
        res = distann.kmeans(xb, 6, niter=5, seed=7, client=client, backend="cuda")
    assert calls.get("kmeans_stats", 0) >= 5, calls
    assert len(res.objective) == len(ref.objective) == 5
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-4)
    np.testing.assert_allclose(res.centroids, ref.centroids, rtol=1e-4, atol=1e-5)


def test_big_batch_on_cuda_workers_equals_search(client, data, indexes, tmp_path):
    _, xq = data
    index = indexes["IVF4,SQ8"]
    q = str(tmp_path / "q.npy")
    np.save(q, xq)
    with cuda_calls(client) as calls:
        res = distann.big_batch_search(index.url, q, k=K, nprobe=NPROBE, out=str(tmp_path / "knn.zarr"),
                                       client=client, backend="cuda")
    assert calls.get("coarse_quantize", 0) >= 1 and calls.get("scan_lists_sq", 0) >= 1, calls
    D, I = res.knn(0, NQ)
    Dn, In = index.search(xq, k=K, nprobe=NPROBE, backend="numba")
    np.testing.assert_array_equal(I, In)
    np.testing.assert_allclose(D, Dn, rtol=1e-4, atol=1e-6)


def test_dedup_on_cuda_workers_equals_numba(client, data, tmp_path):
    import pyarrow.parquet as pq

    xb, _ = data
    x = np.concatenate([xb[:40], xb[:8] + 1e-3]).astype(np.float32)  # 8 near-duplicate pairs (tiny: simulator)
    ref = distann.dedup(x, 0.01, "l2", out=str(tmp_path / "numba.parquet"), client=client, backend="numba")
    with cuda_calls(client) as calls:
        got = distann.dedup(x, 0.01, "l2", out=str(tmp_path / "cuda.parquet"), client=client, backend="cuda")
    # the index build, the exact range self-join and the plot's nearest-neighbour sample ran on cuda
    assert calls.get("assign", 0) >= 1 and calls.get("range_scan_lists", 0) >= 1 and calls.get("scan_lists", 0) >= 1, \
        calls
    assert (got["groups"], got["pairs"], got["duplicates_removed"]) == (ref["groups"], ref["pairs"], 8)
    table = lambda name: pq.read_table(str(tmp_path / name)).sort_by("id").to_pydict()  # noqa: E731
    assert table("cuda.parquet") == table("numba.parquet")


def test_numba_jobs_leave_the_cuda_kernels_alone(client, data, indexes, tmp_path):
    """The contrast of the tests above: the counters do see a job that does not use cuda."""
    xb, xq = data
    q = str(tmp_path / "q.npy")
    np.save(q, xq)
    with cuda_calls(client) as calls:
        distann.kmeans(xb, 4, niter=2, client=client, backend="numba")
        distann.big_batch_search(indexes["IVF4,Flat"].url, q, k=K, nprobe=NPROBE, out=str(tmp_path / "knn.zarr"),
                                 client=client)  # the distann.kernels.backend setting: numba
    assert calls == {}


# --------------------------------------------------------------------------- names and checks

def test_names_are_checked_before_any_work(client, data, tmp_path):
    import dask.config

    from distann import config
    from distann.kernels import check_backend_name, resolve_backend

    xb, _ = data
    assert check_backend_name("gpu") == "cuda" and check_backend_name("reference") == "numpy"
    with pytest.raises(ValidationError, match="'faiss'; unknown backend; must be one of 'cuda', 'numba', 'numpy'"):
        distann.build(xb, str(tmp_path / "x.zarr"), spec="IVF4,Flat", client=client, backend="faiss")
    assert not os.path.exists(tmp_path / "x.zarr")  # refused before the lease, nothing written
    with pytest.raises(ValidationError) as err:
        distann.kmeans(xb, 4, client=client, backend="faiss")
    assert err.value.param == "backend"
    with pytest.raises(ValidationError, match="config.backend"):
        config.from_dict("search", {"index": "i", "queries": "q", "out": "o.npz", "backend": "faiss"})
    assert config.from_dict("build", {"source": "s", "index": "i", "backend": "gpu"}).backend == "gpu"
    with dask.config.set({"distann.kernels.backend": "faiss"}):
        with pytest.raises(ValidationError) as err:
            resolve_backend(None)
        assert err.value.param == "distann.kernels.backend"
    with dask.config.set({"distann.kernels.backend": "cuda"}):
        assert resolve_backend(None) == "cuda"


def test_workers_without_cupy_are_named_before_any_task(data, indexes, tmp_path):
    """A real fault: a worker process started with the simulator off and no CuPy cannot run cuda."""
    from distributed import Client, LocalCluster

    from distann.cluster import WORKER_ENV, check_backend

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: a worker without it cannot be made here")
    xb, xq = data
    env = {**WORKER_ENV, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": ROOT}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      memory_limit="2GiB", env=env) as cluster, Client(cluster) as c:
        (worker,) = c.scheduler_info()["workers"]
        assert check_backend(c, "numba") == "numba"
        with pytest.raises(ValidationError) as err:
            check_backend(c, "gpu")
        msg = str(err.value)
        assert err.value.param == "backend" and worker in msg and "CuPy is not installed" in msg
        assert "LocalCUDACluster" in msg and "backend 'numba'" in msg
        # the jobs refuse before any task: no index, no output written
        url = str(tmp_path / "idx.zarr")
        with pytest.raises(ValidationError, match=worker):
            distann.build(xb, url, spec="IVF4,Flat", client=c, backend="cuda")
        assert not os.path.exists(os.path.join(url, "g000001", "staging"))
        with pytest.raises(ValidationError, match=worker):
            distann.kmeans(xb, 4, client=c, backend="cuda")
        with pytest.raises(ValidationError, match=worker):
            distann.big_batch_search(indexes["IVF4,Flat"], xq, k=K, out=str(tmp_path / "bb.zarr"), client=c,
                                     backend="cuda")
        # a distributed search: this process can run cuda (the simulator), its worker cannot
        with distann.open_index(indexes["IVF4,Flat"].url, client=c) as dindex:
            D, I = dindex.search(xq, k=K, nprobe=NPROBE, backend="numba")
            with pytest.raises(ValidationError, match=worker):
                dindex.search(xq, k=K, nprobe=NPROBE, backend="cuda")
        np.testing.assert_array_equal(I, indexes["IVF4,Flat"].search(xq, k=K, nprobe=NPROBE)[1])


# --------------------------------------------------------------------------- a machine without CuPy

@needs_no_cupy
def test_cuda_unusable_without_cupy_says_what_to_install():
    code = ("import json\n"
            "from distann.kernels import available_backends, get_backend\n"
            "from distann.errors import ValidationError\n"
            "try:\n"
            "    get_backend('cuda')\n"
            "    out = {'error': None}\n"
            "except ValidationError as e:\n"
            "    out = {'error': str(e), 'param': e.param}\n"
            "out['available'] = available_backends()\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=no_sim_env(), capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(proc.stdout)
    assert out["param"] == "backend"
    assert "cannot run here" in out["error"] and "CuPy is not installed" in out["error"]
    assert "distann[gpu]" in out["error"]
    assert out["available"] == ["numba", "numpy"]


@needs_no_cupy
def test_cli_backend_cuda_without_cupy_exits_2(indexes, data, tmp_path):
    _, xq = data
    q = str(tmp_path / "q.npy")
    np.save(q, xq)
    out = tmp_path / "r.npz"
    proc = subprocess.run(cli("search", indexes["IVF4,Flat"].url, q, "--k", "3", "--out", str(out),
                              "--backend", "cuda"), env=no_sim_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--backend: received 'cuda'" in proc.stderr and "CuPy is not installed" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    proc = subprocess.run(cli("backends"), env=no_sim_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backends"]["numba"] == "ok" and report["backends"]["numpy"] == "ok"
    assert "CuPy is not installed" in report["backends"]["cuda"] and "cuda_device" not in report


def test_cli_unknown_backend_exits_2_naming_the_option(indexes, data, tmp_path, caplog):
    _, xq = data
    q = str(tmp_path / "q.npy")
    np.save(q, xq)
    assert run(["search", indexes["IVF4,Flat"].url, q, "--out", str(tmp_path / "r.npz"), "--backend", "faiss"]) == 2
    assert "--backend: received 'faiss'; unknown backend; must be one of" in caplog.text
    caplog.clear()
    cfg = tmp_path / "kmeans-b.yaml"
    cfg.write_text(f"source: {q}\nout: {tmp_path / 'c.npy'}\nk: 2\nbackend: faiss\n")
    assert run(["kmeans", "--config", str(cfg)]) == 2
    assert f"{cfg}: key 'backend'" in caplog.text and not (tmp_path / "c.npy").exists()


def test_cli_search_and_eval_on_cuda(indexes, data, tmp_path, capsys):
    _, xq = data
    q = str(tmp_path / "q.npy")
    np.save(q, xq)
    index = indexes["IVF4,Flat"]
    with cuda_calls() as calls:
        assert run(["search", index.url, q, "--k", str(K), "--nprobe", str(NPROBE), "--out", str(tmp_path / "r.npz"),
                    "--backend", "cuda"]) == 0
    assert calls.get("scan_lists", 0) >= 1, calls
    r = np.load(tmp_path / "r.npz")
    In = index.search(xq, k=K, nprobe=NPROBE, backend="numba")[1]
    np.testing.assert_array_equal(r["I"], In)
    gt = str(tmp_path / "gt.npy")
    np.save(gt, In)
    capsys.readouterr()
    with cuda_calls() as calls:
        assert run(["eval", index.url, q, "--gt", gt, "--k", str(K), "--nprobe", str(NPROBE), "--backend", "gpu"]) == 0
    assert calls.get("scan_lists", 0) >= 2, calls  # the warm-up and the timed search
    assert "1.0000" in capsys.readouterr().out  # recall against the numba results: the same ids


def test_cli_backends_report(client, capsys):
    assert run(["backends", "--scheduler", client.scheduler.address]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["default"] == "numba"
    assert report["backends"] == {"cuda": "ok", "numba": "ok", "numpy": "ok"}  # the simulator counts as usable
    assert report["cuda_device"]["simulated"] is True and report["cuda_device"]["work_budget"] > 0
    assert sorted(report["workers"]) == sorted(client.scheduler_info()["workers"])
    assert all(w == {"cuda": "ok", "numba": "ok", "numpy": "ok"} for w in report["workers"].values())
