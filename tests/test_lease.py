"""One build per index URL at a time: the generation lease, on a local disk and on S3 (moto),
and two real `distann build` processes racing for the same index."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import distann
from distann.errors import BuildConflictError
from distann.store.lease import GenerationLease, lease_path
from distann.store.location import Location
from tests.ann_helpers import cli, first_build


def _record(**kw) -> bytes:
    now = time.time()
    base = {"owner": "x", "host": "another-host", "pid": 1, "pid_started": 0.0, "acquired": now, "renewed": now,
            "ttl": 60.0, "state": "active", "what": "a build elsewhere"}
    return json.dumps({**base, **kw}).encode()


@pytest.fixture(params=["local", "s3"])
def loc(request, tmp_path):
    if request.param == "local":
        return Location(str(tmp_path / "idx.zarr"))
    bucket, options = request.getfixturevalue("s3_bucket")
    return Location(f"s3://{bucket}/idx.zarr", options)


def test_second_acquire_conflicts_until_released(loc):
    first = GenerationLease.acquire(loc, 1, ttl=60, what="first")
    with first:
        with pytest.raises(BuildConflictError, match=r"another build owns generation 1 .*first, by process"):
            GenerationLease.acquire(loc, 1, ttl=60, what="second")
        first.check()  # nobody took it over
    assert json.loads(loc.read_bytes(first.path))["state"] == "released"
    second = GenerationLease.acquire(loc, 1, ttl=60, what="second")
    assert second.attempt == 2


def test_racing_acquires_have_one_winner(loc):
    """Eight threads claim the same generation at once: exactly one lease is granted."""
    barrier = threading.Barrier(8)
    won, lost = [], []

    def claim(i: int) -> None:
        barrier.wait()
        try:
            won.append(GenerationLease.acquire(loc, 3, ttl=60, what=f"claimant {i}"))
        except BuildConflictError:
            lost.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7


def test_lease_of_another_host_expires(loc):
    loc.write_bytes(lease_path(2, 1), _record(renewed=time.time()))
    with pytest.raises(BuildConflictError, match="another-host"):
        GenerationLease.acquire(loc, 2, ttl=60, what="mine")
    loc.write_bytes(lease_path(2, 1), _record(renewed=time.time() - 61))  # not renewed for a whole ttl
    assert GenerationLease.acquire(loc, 2, ttl=60, what="mine").attempt == 2


def test_owner_notices_a_takeover(loc):
    lease = GenerationLease.acquire(loc, 1, ttl=60, what="slow owner")
    loc.write_bytes(lease_path(1, 2), _record())  # another host decided our lease had expired
    with pytest.raises(BuildConflictError, match="lost generation 1 to another build"):
        lease.check()
    lease.renew()  # a lost lease is never written again
    assert json.loads(loc.read_bytes(lease.path))["state"] == "active"


def test_lease_of_a_killed_process_on_this_host_is_stale_at_once(tmp_path):
    loc = Location(str(tmp_path / "idx.zarr"))
    code = ("import os; from distann.store.location import Location; from distann.store.lease import GenerationLease; "
            f"GenerationLease.acquire(Location({loc.url!r}), 1, ttl=3600, what='doomed'); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    held = json.loads(loc.read_bytes(lease_path(1, 1)))
    assert held["state"] == "active" and held["host"] == socket.gethostname()
    assert GenerationLease.acquire(loc, 1, ttl=3600, what="rerun").attempt == 2


def test_two_concurrent_builds_one_wins_and_the_index_stays_readable(tmp_path):
    """The defect: two builds of one URL at once left an index that failed to open."""
    common = ["--workers", "1", "--niter", "3", "--chunk-rows", "5000"]
    src, url = first_build(tmp_path, 30_000, "IVF16,Flat", *common)
    procs = [subprocess.Popen(cli("build", src, url, "--spec", spec, "--overwrite", "--seed", seed, *common,
                                  quiet=True),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for spec, seed in (("IVF64,Flat", "1"), ("IVF32,Flat", "2"))]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another build owns generation 2" in loser and "Traceback" not in loser
    index = distann.open_index(url)
    winner_spec = ("IVF64,Flat", "IVF32,Flat")[[code for code, _ in results].index(0)]
    assert index.spec == winner_spec and index.manifest.generation == 2
    index.verify()
    assert np.array_equal(np.sort(index.lists.load_all().ids), np.arange(30_000))
    # the generation the winner replaced is kept until the next commit (retention rule)
    assert sorted(os.listdir(url)) == ["g000001", "g000002", "leases", "manifest.json", "zarr.json"]


def test_build_on_s3_takes_a_lease_and_refuses_a_concurrent_one(client, s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/idx.zarr"
    xb = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    index = distann.build(xb, url, spec="IVF8,Flat", client=client, niter=3, storage_options=options)
    index.verify()
    loc = Location(url, options)
    assert json.loads(loc.read_bytes(lease_path(1, 1)))["state"] == "committed"
    with GenerationLease.acquire(loc, 2, ttl=60, what="a build holding generation 2"):
        with pytest.raises(BuildConflictError, match="another build owns generation 2"):
            distann.build(xb, url, spec="IVF4,Flat", client=client, niter=3, overwrite=True, storage_options=options)
    reopened = distann.open_index(url, storage_options=options)
    assert reopened.spec == "IVF8,Flat"
    np.testing.assert_array_equal(reopened.search(xb[:5], k=1, nprobe=8)[1][:, 0], np.arange(5))
