"""A disk that fills up under a build: a clear error naming the path, the committed index as it
was, and a rerun (once there is space) that resumes and ends with the right index. And a merge
bigger than its workers' memory: really killed by Dask's nanny, retried, then a clear error
naming the setting to lower, never a hang.

ENOSPC cannot be produced on demand on the test machine's disk, so it is injected where the
kernel would raise it: in the worker processes of the session's real LocalCluster
(``client.run``), the file writes of one staging folder (``Location``'s ``open``) or of one
shard's chunk files (Zarr's ``LocalStore`` file put) write half of their bytes and then raise
``OSError(ENOSPC)`` without a path, as ``write(2)`` does on a full disk.
"""

from __future__ import annotations

import contextlib
import shutil

import numpy as np
import pytest

import distann
from distann.errors import StorageFullError
from tests.ann_helpers import dataset

N, D, NLIST, CHUNK, SHARD_BYTES = 6000, 16, 8, 1000, 100_000
BUILD = {"spec": f"IVF{NLIST},Flat", "niter": 3, "chunk_rows": CHUNK, "shard_bytes": SHARD_BYTES}


def _faults(pattern: str):
    """(install, remove) closures (shipped by value to the workers): writes of files whose path
    contains ``pattern`` fail with ENOSPC halfway through."""
    def install(pattern=pattern):
        import errno
        import os

        import zarr.storage._local as local

        from distann.store import location

        class HalfWritten:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                view = memoryview(data).cast("B")
                self.f.write(view[:len(view) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.f, name)

        def full_open(path, mode="r", *args, **kwargs):
            f = open(path, mode, *args, **kwargs)  # noqa: SIM115 - handed to the caller's with
            return HalfWritten(f) if pattern in str(path) and "w" in mode else f

        real_put = getattr(local, "_test_real_put", local._put)

        def full_put(path, value, exclusive=False):
            if pattern not in str(path):
                return real_put(path, value, exclusive)
            path.parent.mkdir(parents=True, exist_ok=True)
            with local._atomic_write(path, "wb", exclusive=exclusive) as f:
                HalfWritten(f).write(value.as_buffer_like())

        location.open = full_open
        local._test_real_put = real_put
        local._put = full_put

    def remove():
        import zarr.storage._local as local

        from distann.store import location

        location.__dict__.pop("open", None)
        if hasattr(local, "_test_real_put"):
            local._put = local._test_real_put
            del local._test_real_put

    return install, remove


@contextlib.contextmanager
def disk_full(client, pattern: str):
    install, remove = _faults(pattern)
    client.run(install)
    try:
        yield
    finally:
        client.run(remove)


@pytest.fixture(scope="module")
def data():
    xa, xq = dataset(N, D, 20, seed=1)
    xb, _ = dataset(N, D, 20, seed=2)
    return xa, xb, xq


@pytest.fixture(scope="module")
def committed(client, data, tmp_path_factory):
    """An index committed from ``xa``, and a clean build of ``xb`` (what a rebuild must give)."""
    xa, xb, xq = data
    root = tmp_path_factory.mktemp("enospc")
    index = distann.build(xa, str(root / "idx.zarr"), client=client, **BUILD)
    clean = distann.build(xb, str(root / "clean.zarr"), client=client, **BUILD)
    assert len(clean.manifest.shards) >= 3  # a shard other than the first can fail
    return root / "idx.zarr", index.search(xq, k=10, nprobe=NLIST), clean


def _rebuild_with_a_full_disk(client, committed, data, tmp_path, pattern: str, where: str):
    """Rebuild (``xb`` over ``xa``) with writes matching ``pattern`` failing; check the error and
    that the committed index is unchanged; return the URL and the path of the new generation."""
    src, before, _ = committed
    _, xb, xq = data
    url = tmp_path / "idx.zarr"
    shutil.copytree(src, url)
    with disk_full(client, pattern), pytest.raises(StorageFullError) as err:
        distann.build(xb, str(url), client=client, overwrite=True, **BUILD)
    assert isinstance(err.value, OSError) and err.value.errno == 28
    message = str(err.value)
    assert "No space left on device" in message and f"{url}/g000002/{where}" in message, message
    assert "rerun the same build" in message and "committed index is unchanged" in message
    index = distann.open_index(str(url))
    assert index.manifest.generation == 1
    D, I = index.search(xq, k=10, nprobe=NLIST)
    np.testing.assert_array_equal(I, before[1])
    np.testing.assert_array_equal(D, before[0])
    assert index.verify()["shards"] == len(index.manifest.shards)
    return url, url / "g000002"


def _rerun_equals_clean(client, committed, data, url):
    _, _, clean = committed
    _, xb, xq = data
    index = distann.build(xb, str(url), client=client, overwrite=True, **BUILD)
    assert index.manifest.generation == 2
    np.testing.assert_array_equal(index.list_sizes, clean.list_sizes)
    np.testing.assert_array_equal(index.search(xq, k=10, nprobe=NLIST)[1], clean.search(xq, k=10, nprobe=NLIST)[1])
    assert index.verify()["shards"] == len(clean.manifest.shards)
    return index


def test_disk_full_while_staging(client, committed, data, tmp_path):
    url, gen = _rebuild_with_a_full_disk(client, committed, data, tmp_path, "/staging/c000003/",
                                         "staging/c000003")
    assert not (gen / "staging" / "c000003" / "DONE").exists()
    staged = {p.parent.name for p in (gen / "staging").glob("*/DONE")}
    assert staged and "c000003" not in staged
    index = _rerun_equals_clean(client, committed, data, url)
    assert index.manifest.build["resumed_chunks"] == len(staged)  # the staged chunks were reused


def test_disk_full_while_writing_a_shard(client, committed, data, tmp_path):
    url, gen = _rebuild_with_a_full_disk(client, committed, data, tmp_path, "/shards/s000001/codes/",
                                         "shards/s000001")
    assert len(list((gen / "staging").glob("*/DONE"))) == N // CHUNK  # every add task had finished
    assert not (gen / "shards" / "s000001" / "DONE").exists()
    merged = len(list((gen / "shards").glob("*/DONE")))
    index = _rerun_equals_clean(client, committed, data, url)
    assert index.manifest.build["resumed_chunks"] == N // CHUNK
    assert index.manifest.build["resumed_shards"] == merged


# --------------------------------------------------------------------------- a merge bigger than a worker's memory

OOM_N, OOM_D, OOM_NLIST, OOM_LIMIT = 800_000, 64, 16, "300MiB"


def test_oversized_merge_kills_its_workers_and_the_error_names_shard_bytes(tmp_path):
    """A real out-of-memory: a shard of ~210 MB (shard_bytes=1 GiB) merged on workers limited to
    300 MiB, which Dask's nanny kills at 95 % of the limit. Dask retries the task on the other
    worker (allowed-failures = 1 here, 3 by default), then the build fails within a bounded time
    with WorkerKilledError naming the merge task and the setting to lower; the committed index is
    unchanged, and the same build with a smaller shard_bytes completes."""
    from concurrent.futures import ThreadPoolExecutor

    import dask
    from distributed import Client, LocalCluster

    from distann.cluster import WORKER_ENV
    from distann.errors import WorkerKilledError
    from distann.synthetic import write_npy

    src = str(tmp_path / "big.npy")
    write_npy(src, OOM_N, OOM_D, seed=5)
    small, xq = dataset(5000, OOM_D, 10, seed=6)
    url = str(tmp_path / "idx.zarr")
    common = {"spec": f"IVF{OOM_NLIST},Flat", "niter": 2}
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                         memory_limit=OOM_LIMIT, env=WORKER_ENV) as cluster, Client(cluster) as c, \
            ThreadPoolExecutor(1) as pool:
        before = distann.build(small, url, client=c, **common).search(xq, k=5, nprobe=4)
        job = pool.submit(distann.build, src, url, client=c, overwrite=True, shard_bytes=2**30, **common)
        with pytest.raises(WorkerKilledError) as err:
            job.result(timeout=300)  # never a hang
        message = str(err.value)
        assert err.value.stage == "merge" and "shard s000000" in err.value.task, message
        assert "lower shard_bytes (distann.build.shard-bytes)" in message and "out of memory" in message, message
        index = distann.open_index(url)
        assert index.manifest.generation == 1 and index.ntotal == 5000
        np.testing.assert_array_equal(index.search(xq, k=5, nprobe=4)[1], before[1])
        index = pool.submit(distann.build, src, url, client=c, overwrite=True, shard_bytes=8 << 20,
                            **common).result(timeout=300)
        assert index.ntotal == OOM_N and index.manifest.generation == 2 and len(index.manifest.shards) > 1
