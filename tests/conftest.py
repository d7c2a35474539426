"""Shared fixtures: one real multi-process Dask LocalCluster for the whole test session, and an
S3 API served by moto in server mode (a separate process on loopback) for object-store paths."""

from __future__ import annotations

import os

# The cuda kernel backend is tested without a GPU in Numba's CUDA simulator (tests/test_cuda.py);
# it must be switched on before Numba is first imported. DISTANN_TEST_GPU=1 runs on a real
# device instead (the `gpu`-marked tests: pytest -m gpu).
if os.environ.get("DISTANN_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import re
import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="session")
def client():
    """A LocalCluster with 2 single-threaded worker processes (real processes, loopback only)."""
    from distributed import Client, LocalCluster

    from distann.cluster import WORKER_ENV

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="4GiB", env=WORKER_ENV) as cluster, Client(cluster) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """``moto_server`` on a free loopback port: yields the fsspec storage options reaching it."""
    pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is needed for object-store tests")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    try:
        yield {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server: yields (bucket name, storage options)."""
    import boto3

    name = ("distann-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:60].strip("-")
    kw = s3_server["client_kwargs"]
    boto3.client("s3", endpoint_url=kw["endpoint_url"], region_name=kw["region_name"],
                 aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"]).create_bucket(Bucket=name)
    return name, s3_server
