"""Getting a Dask client: join a running cluster or start an embedded LocalCluster.

The embedded cluster runs one single-threaded worker process per core (numeric work in
NumPy/Numba releases the GIL only partly; processes scale cleanly) and binds to loopback:
Dask runs arbitrary code for whoever reaches the scheduler port.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from distann.errors import ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

log = logging.getLogger(__name__)

#: environment of embedded worker processes: one compute thread each (Dask already sets the
#: BLAS variables; Numba's kernels would otherwise start one thread per core in every worker)
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _check_workers(workers: object) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValidationError("workers", workers, "a positive integer (worker processes) or None for one per core")


@contextlib.contextmanager
def client_context(workers: int | None = None, scheduler: str | None = None,
                   client=None, memory_limit: str | None = "auto") -> Iterator[Client]:
    """Yield a ``distributed.Client``.

    ``client`` given: yield it unchanged (the caller owns it). ``scheduler`` given: connect to
    that address and close only the connection. Otherwise start a LocalCluster with
    ``workers`` processes (default: one per core), yield, and shut it down.
    """
    if client is not None:
        if workers is not None or scheduler is not None:
            raise ValidationError("client", client, "give either client or workers/scheduler, not both")
        yield client
        return
    _check_workers(workers)
    if workers is not None and scheduler is not None:
        raise ValidationError("scheduler", scheduler, "give either workers (a local cluster) or scheduler, not both")
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as c:
            log.info("joined Dask scheduler %s (dashboard: %s)", scheduler, c.dashboard_link)
            yield c
        return
    n = workers or os.cpu_count() or 1
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", memory_limit=memory_limit, env=WORKER_ENV) as cluster, \
            Client(cluster) as c:
        log.info("started local Dask cluster: %d worker process(es); dashboard: %s", n, c.dashboard_link)
        yield c
