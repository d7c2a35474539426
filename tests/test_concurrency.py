"""1,000 searches at once from threads of one process on one opened Index: no errors, the
results of sequential runs, memory flat.

Streaming (``cache_bytes=0``: every search reads its probed lists from the store, through Zarr's
one event loop) and with the LRU list cache on and smaller than the index (lists are evicted
while other threads read and insert them): the cache's byte count must stay its contents' size.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import numpy as np
import psutil
import pytest

import distann
from tests.ann_helpers import dataset

N, D, NLIST, SEARCHES = 20_000, 32, 64, 1000
# memory bounds (RSS after the allocator's free pages are trimmed): one round of 1,000 threads
# after a warm-up, and further rounds after the first (the slow test); a leak of each search's
# probed lists would be about 1,000 x 0.7 MiB here
RSS_GROWTH_MIB = 128
RSS_ROUNDS_MIB = 32


@pytest.fixture(scope="module")
def index_url(client, tmp_path_factory):
    xb, _ = dataset(N, D, seed=3)
    url = str(tmp_path_factory.mktemp("concurrency") / "idx.zarr")
    distann.build(xb, url, spec=f"IVF{NLIST},Flat", client=client, niter=3, shard_bytes=400_000)
    return url


def _requests():
    """1,000 searches of 1 to 8 queries each, with varied k and nprobe."""
    _, xq = dataset(N, D, 4 * SEARCHES, seed=3)
    rng = np.random.default_rng(7)
    out = []
    for i in range(SEARCHES):
        nq = int(rng.integers(1, 9))
        start = int(rng.integers(0, len(xq) - nq))
        out.append((xq[start:start + nq], int(rng.integers(1, 20)), int(rng.integers(1, 17))))
    return out


def _concurrently(index, requests) -> list:
    """Every request in its own thread, all released together by a barrier."""
    results: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(i: int) -> None:
        xq, k, nprobe = requests[i]
        barrier.wait()
        try:
            results[i] = index.search(xq, k=k, nprobe=nprobe)
        except BaseException as exc:  # noqa: BLE001 - reported below, with the request
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "searches still running after 300 s"
    return results


def _rss_mib() -> float:
    """This process's resident memory, after handing the allocator's free pages back to the
    system (glibc keeps the freed memory of each thread's arena: 1,000 searches at once hold
    1,000 blocks of probed lists at their peak, which is no leak)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it is
        pass
    return psutil.Process().memory_info().rss / 2**20


@pytest.fixture(scope="module")
def expected(index_url):
    """The requests and their results, searched one after the other."""
    requests = _requests()
    reference = distann.open_index(index_url, cache_bytes=0)
    return requests, [reference.search(xq, k=k, nprobe=nprobe) for xq, k, nprobe in requests]


def _open(index_url, cache: str):
    if cache == "streaming":
        return distann.open_index(index_url, cache_bytes=0)
    # the list cache on, a quarter of the index: lists are evicted while other threads read them
    return distann.open_index(index_url, cache_bytes=distann.open_index(index_url, cache_bytes=0).lists.nbytes // 4)


def _round(index, cache: str, requests, results_expected) -> None:
    t0 = time.perf_counter()
    results = _concurrently(index, requests)
    print(f"\n{cache}: {SEARCHES} concurrent searches in {time.perf_counter() - t0:.1f} s")
    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {SEARCHES} searches failed, e.g. request {errors[0][0]}: {errors[0][1]!r}"
    for (D, I), (D0, I0) in zip(results, results_expected):
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_allclose(D, D0, rtol=1e-5, atol=1e-5)
    lists = index.lists
    assert lists.resident is None
    if cache == "cache":  # the LRU's byte count is its contents' size, within budget
        cached = sum(len(rows.ids) for rows in lists._cache.values()) * lists.row_bytes
        assert lists._cached_bytes == cached <= lists.cache_bytes
        assert lists.stats.cache_hits > 0
    else:
        assert not lists._cache


@pytest.mark.parametrize("cache", [pytest.param("streaming", marks=pytest.mark.slow), "cache"])
def test_thousand_concurrent_searches(index_url, expected, cache):
    """No errors, the sequential results, and memory flat: after a first round, a round of
    1,000 threads (2,000 with the searches' prefetch threads) leaves at most RSS_GROWTH_MIB behind."""
    requests, results = expected
    index = _open(index_url, cache)
    assert len(index.manifest.shards) >= 3
    # warm-up, a whole round: shard readers, kernels, thread pools, and glibc's per-thread malloc
    # arenas, which the first 1,000 threads create and keep (100-150 MiB measured, depending on
    # what else the process ran before: a one-time cost, not growth per search)
    _round(index, cache, requests, results)
    before = _rss_mib()
    _round(index, cache, requests, results)
    after = _rss_mib()
    print(f"{cache}: RSS {before:.0f} -> {after:.0f} MiB")
    assert after - before < RSS_GROWTH_MIB, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["streaming", "cache"])
def test_rounds_of_concurrent_searches_accumulate_no_memory(index_url, expected, cache):
    """Four rounds of 1,000: after the first, memory stays within RSS_ROUNDS_MIB."""
    requests, results = expected
    index = _open(index_url, cache)
    _round(index, cache, requests, results)
    rss = [_rss_mib()]
    for _ in range(3):
        _round(index, cache, requests, results)
        rss.append(_rss_mib())
    print(f"{cache}: RSS after each round {[round(r) for r in rss]} MiB")
    assert max(rss) - rss[0] < RSS_ROUNDS_MIB, rss
