"""Shared fixtures: one real multi-process Dask LocalCluster for the whole test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def client():
    """A LocalCluster with 2 single-threaded worker processes (real processes, loopback only)."""
    from distributed import Client, LocalCluster

    from distann.cluster import WORKER_ENV

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit="4GiB", env=WORKER_ENV) as cluster, Client(cluster) as c:
        yield c
