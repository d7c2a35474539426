"""Clusters as a new user meets them: separate `dask scheduler` / `dask worker` processes in
another working directory or another mount namespace, too many workers, SIGTERM, a failing
task, a script without a __main__ guard, and the amount of output of a normal run."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distann
from distann.cluster import MAX_WORKERS_PER_CORE, client_context
from distann.errors import ValidationError
from distann.sources import write_fvecs
from distann.synthetic import write_npy
from tests.ann_helpers import cli, first_build, wait_for_staged_chunks
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _start(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


@pytest.fixture
def scheduler():
    """A `dask scheduler` process on loopback; yields its address and a list to add workers to."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                     "--port", str(port), "--no-dashboard"])]
    try:
        yield address, procs
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _worker_command(address: str) -> list[str]:
    return [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1",
            "--no-dashboard", "--host", "127.0.0.1"]


def _wait_for_workers(address: str, n: int) -> None:
    from distributed import Client

    with Client(address, timeout=30) as c:
        c.wait_for_workers(n, timeout=60)


def test_relative_paths_with_workers_in_another_directory(scheduler, tmp_path):
    """The defect: the workers resolved a relative index path against their own directory."""
    address, procs = scheduler
    job, elsewhere = tmp_path / "job", tmp_path / "elsewhere"
    job.mkdir()
    elsewhere.mkdir()
    procs.append(_start(_worker_command(address), cwd=elsewhere))
    _wait_for_workers(address, 1)
    write_npy(str(job / "base.npy"), 5000, 8)
    proc = subprocess.run(cli("build", "base.npy", "idx.zarr", "--spec", "IVF4,Flat", "--niter", "3",
                               "--scheduler", address), cwd=job, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    index = distann.open_index(str(job / "idx.zarr"))
    assert index.verify()["shards"] >= 1 and index.ntotal == 5000
    assert not (elsewhere / "idx.zarr").exists()


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (root) to give a worker its own filesystem view")
def test_worker_that_cannot_see_a_local_path_fails_before_the_build(scheduler, tmp_path):
    """A worker on 'another machine': a mount namespace where the client's folder is an empty tmpfs."""
    address, procs = scheduler
    data = tmp_path / "data"
    data.mkdir()
    worker = " ".join(_worker_command(address))
    procs.append(_start(["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {tmp_path} && exec {worker}"]))
    _wait_for_workers(address, 1)
    write_npy(str(data / "base.npy"), 5000, 8)
    proc = subprocess.run(cli("build", str(data / "base.npy"), str(data / "idx.zarr"), "--spec", "IVF4,Flat",
                               "--scheduler", address), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "INDEX: received" in proc.stderr and "do not see it" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (data / "idx.zarr" / "manifest.json").exists() and not glob.glob(str(data / "idx.zarr" / "g0*"))


def test_too_many_local_workers(tmp_path, caplog):
    cores = os.cpu_count() or 1
    with pytest.raises(ValidationError, match=f"workers: received {MAX_WORKERS_PER_CORE * cores + 1}; at most"):
        distann.build(np.ones((100, 4), np.float32), str(tmp_path / "x.zarr"), spec="IVF2,Flat",
                      workers=MAX_WORKERS_PER_CORE * cores + 1)
    assert not (tmp_path / "x.zarr").exists()
    with caplog.at_level(logging.WARNING, logger="distann"), client_context(workers=cores + 1) as c:
        assert len(c.scheduler_info()["workers"]) == cores + 1
    assert caplog.text.count(f"{cores + 1} worker processes on {cores} cores") == 1


def test_embedded_cluster_never_pauses_and_gives_each_worker_one_task():
    """The embedded cluster's workers never pause for memory (a paused worker whose memory does
    not fall again would make a job wait forever; unpaused, an oversized task is killed by the
    nanny and reported), and its scheduler gives each one-thread worker one task at a time (so
    a poison task, not a bystander, is the one named). The caller's Dask config is untouched."""
    import dask

    with client_context(workers=2) as c:
        assert set(c.run(lambda: dask.config.get("distributed.worker.memory.pause")).values()) == {False}
        assert c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == 1.0
    assert dask.config.get("distributed.worker.memory.pause") == 0.8


def test_wait_all_raises_on_a_cancelled_future_instead_of_counting_it_done():
    """A future cancelled under a job (lost dependencies, a cancel) must not count as a finished
    task: wait_all(gather=False) returned as if the stage were done, and the next stage failed
    with a bare FutureCancelledError of some other key."""
    import threading
    import time
    from concurrent.futures import CancelledError

    from distributed import Client, LocalCluster

    from distann.cluster import wait_all

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as lc, \
            Client(lc) as c:
        futures = [c.submit(time.sleep, 0.05, pure=False), c.submit(time.sleep, 3, pure=False)]
        threading.Timer(0.5, futures[1].cancel).start()
        with pytest.raises(CancelledError):
            wait_all(futures, "test", progress=False, gather=False)


def test_embedded_workers_drop_the_heartbeat_error_of_a_closing_cluster():
    """The embedded cluster's scheduler closes first at the end of a job; a worker heartbeat in
    that moment logged "Failed to communicate with scheduler during heartbeat" with a traceback
    (the quickstart test caught it once in a full run). The embedded workers' filter drops it,
    and still passes every other error."""
    from distann.cluster import _QuietTaskEnds

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, None, None)

    quiet = _QuietTaskEnds()
    assert not quiet.filter(record("Failed to communicate with scheduler during heartbeat."))
    assert quiet.filter(record("Worker stream died during communication"))
    assert quiet.filter(record("Failed to communicate with the store"))


def test_sigterm_stops_a_build_cleanly(tmp_path):
    common = ["--log-level", "WARNING", "--workers", "2", "--chunk-rows", "2000", "--niter", "4"]
    src, url = first_build(tmp_path, 60_000, "IVF8,Flat", *common)
    xq = np.load(src)[:20]
    _, before = distann.open_index(url).search(xq, k=5, nprobe=2)
    proc = subprocess.Popen(cli("build", src, url, "--spec", "IVF16,Flat", "--overwrite", *common),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_staged_chunks(proc, url, generation=2, count=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "terminated (SIGTERM); the committed index is unchanged" in lines[0], err
    assert "Traceback" not in err and "leaked" not in err
    lease = json.loads(Path(url, "leases", "g000002.000001.json").read_text())
    assert lease["state"] == "released"
    np.testing.assert_array_equal(distann.open_index(url).search(xq, k=5, nprobe=2)[1], before)
    subprocess.run(cli("build", src, url, "--spec", "IVF16,Flat", "--overwrite", *common), check=True, timeout=300)
    assert distann.open_index(url).manifest.build["resumed_chunks"] >= 2


def test_bad_record_on_a_worker_is_one_clean_line(tmp_path):
    path = tmp_path / "bad.fvecs"
    write_fvecs(str(path), np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float32))
    raw = bytearray(path.read_bytes())
    offset = 3000 * (4 + 16 * 4)
    raw[offset:offset + 4] = struct.pack("<i", 17)  # record 3000 claims 17 dimensions
    path.write_bytes(bytes(raw))
    proc = subprocess.run(cli("build", str(path), str(tmp_path / "idx.zarr"), "--spec", "IVF8,Flat",
                               "--workers", "2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "record 3000 has dimension 17, expected 16" in proc.stderr
    assert "Compute Failed" not in proc.stderr and "Traceback" not in proc.stderr


def test_script_without_main_guard_gets_one_line_saying_so(tmp_path):
    write_npy(str(tmp_path / "base.npy"), 3000, 8)
    script = tmp_path / "script.py"
    script.write_text("import distann\n"
                      "index = distann.build('base.npy', 'idx.zarr', spec='IVF4,Flat', workers=2)\n"
                      "print(index)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    hint = 'under `if __name__ == "__main__":`'
    assert proc.stderr.count(hint) == 1, proc.stderr
    assert "Nanny failed to start" not in proc.stderr and "bootstrapping phase" not in proc.stderr
    # the script's own uncaught exception, one traceback ending in distann's one-line reason
    assert proc.stderr.count("Traceback") == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("distann.errors.DistannError: the embedded Dask cluster")


def test_a_normal_build_prints_a_few_lines(tmp_path):
    src = str(tmp_path / "base.npy")
    write_npy(src, 20_000, 16)
    run = lambda *extra: subprocess.run(  # noqa: E731
        cli(*extra, "build", src, str(tmp_path / "idx.zarr"), "--spec", "IVF16,Flat", "--workers", "2",
             "--overwrite"), capture_output=True, text=True, timeout=300)
    quiet = run()
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 3, lines  # building ..., started local Dask cluster ..., committed ...
    assert "committed" in lines[-1] and "ntotal=20000" in lines[-1]
    assert not any(s in quiet.stderr for s in ("distributed.", "iteration", "%|"))
    assert run("--log-level", "WARNING").stderr == ""
    verbose = run("-v")
    assert "distributed.scheduler" in verbose.stderr and "k-means iteration" in verbose.stderr


def test_quickstart_job_output_is_short(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "quickstart.py"), "--n", "20000", "--nq", "100",
                           "--nlist", "32", "--nprobe", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["index", "build", "recall@10", "QPS"]
    assert len(proc.stderr.strip().splitlines()) <= 6 and "distributed." not in proc.stderr, proc.stderr


def test_progress_bars_only_on_a_terminal_and_not_with_no_progress(tmp_path):
    """stderr on a pseudo-terminal: one bar per stage; --no-progress: none."""
    import fcntl
    import pty
    import termios

    src = str(tmp_path / "base.npy")
    write_npy(src, 20_000, 16)

    def stderr_on_a_tty(*extra: str) -> str:
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
        proc = subprocess.Popen(cli("build", src, str(tmp_path / "idx.zarr"), "--spec", "IVF16,Flat",
                                     "--workers", "2", "--overwrite", *extra),
                                stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=300) == 0
        os.close(leader)
        return b"".join(chunks).decode(errors="replace")

    shown = stderr_on_a_tty()
    for stage in ("sample", "k-means", "add", "merge"):
        assert f"{stage}: 100%" in shown, shown
    assert "100%" not in stderr_on_a_tty("--no-progress")


def test_training_warning_is_one_log_line(tmp_path):
    src = str(tmp_path / "base.npy")
    write_npy(src, 3000, 16)
    proc = subprocess.run(cli("build", src, str(tmp_path / "pq.zarr"), "--spec", "IVF4,PQ4", "--workers", "1",
                              "--niter", "2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "TrainingWarning" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and "fewer than 39 per centroid" in lines[0], proc.stderr
    assert "warnings.warn(" not in proc.stderr and ".py:" not in proc.stderr
