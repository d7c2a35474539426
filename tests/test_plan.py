"""Pure planning functions, tested without a cluster."""

from __future__ import annotations

import numpy as np
import pytest

from distann.builder.plan import build_key, list_order, plan_shards
from distann.store.shards import chunk_rows
from distann.chunks import plan_chunks
from distann.search.plan import expand_to_all_lists, plan_probes


def test_plan_chunks_covers_rows_once():
    chunks = plan_chunks(10, 4)
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert [c.name for c in chunks] == ["c000000", "c000001", "c000002"]
    assert plan_chunks(0, 4) == ()


def test_plan_shards_balances_bytes_and_covers_lists():
    sizes = np.array([5, 0, 100, 1, 1, 1, 1, 50, 0, 0])
    shards = plan_shards(sizes, code_size=8, shard_bytes=16 * 60)  # 16 bytes a row: ~60 rows a shard
    assert shards[0].list_start == 0 and shards[-1].list_stop == len(sizes)
    for a, b in zip(shards, shards[1:]):
        assert a.list_stop == b.list_start
    assert sum(s.ntotal for s in shards) == sizes.sum()
    assert [s.ntotal for s in shards] == [sizes[s.list_start:s.list_stop].sum() for s in shards]
    # a shard closes as soon as it reaches the target: without its last list it is below it
    # (so no shard holds two lists past the target), and the 100-vector list closes its shard
    for s in shards[:-1]:
        assert sizes[s.list_start:s.list_stop - 1].sum() * 16 < 16 * 60 <= sizes[s.list_start:s.list_stop].sum() * 16
    assert any(s.list_stop == 3 for s in shards)


def test_plan_shards_one_shard_when_target_is_large():
    shards = plan_shards(np.array([3, 4, 5]), code_size=4, shard_bytes=1 << 30)
    assert len(shards) == 1 and (shards[0].list_start, shards[0].list_stop, shards[0].ntotal) == (0, 3, 12)


def test_list_order_is_stable_and_offsets_match():
    assign = np.array([2, 0, 2, 1, 0, 2])
    order, offsets = list_order(assign, 4)
    assert order.tolist() == [1, 4, 3, 0, 2, 5]
    assert offsets.tolist() == [0, 2, 3, 6, 6]


def test_chunk_rows_even_and_near_the_target():
    assert chunk_rows(10_000, 384) == 2500            # 3.84 MB in 4 chunks of 2500 rows: no padding
    assert chunk_rows(3000, 1 << 22) == 256            # at least 256 rows a chunk
    assert chunk_rows(100, 8) == 100 and chunk_rows(0, 8) == 1
    for n, row in [(1_000_003, 16), (262_145, 8), (77_777, 256)]:
        rows = chunk_rows(n, row)
        nchunks = -(-n // rows)
        assert rows * row <= (1 << 20) * 1.01 or rows == 256
        assert nchunks * rows - n < nchunks  # the padding of the last chunk: under a row a chunk


def test_build_key_depends_on_every_input():
    a = build_key(source="x", nlist=4)
    assert a == build_key(nlist=4, source="x")
    assert a != build_key(source="x", nlist=5)


def test_plan_probes_groups_pairs_by_list():
    probes = np.array([[3, 1], [1, 0], [3, 2]])
    sizes = np.array([5, 5, 0, 5])
    plan = plan_probes(probes, sizes)
    assert plan.lists.tolist() == [0, 1, 3]  # list 2 is empty: its pair is dropped
    groups = {int(l): list(zip(plan.group_queries[a:b].tolist(), plan.group_slots[a:b].tolist()))
              for l, a, b in zip(plan.lists, plan.group_offsets[:-1], plan.group_offsets[1:])}
    assert groups == {0: [(1, 1)], 1: [(0, 1), (1, 0)], 3: [(0, 0), (2, 0)]}
    assert (plan.group_limits == 5).all()
    full = expand_to_all_lists(plan, 4)
    assert full.tolist() == [0, 1, 3, 3, 5]


@pytest.mark.parametrize("max_codes, expected", [(7, [5, 2]), (5, [5]), (100, [5, 5])])
def test_plan_probes_max_codes_truncates_in_probe_order(max_codes, expected):
    plan = plan_probes(np.array([[1, 0]]), np.array([5, 5]), max_codes)
    by_slot = sorted(zip(plan.group_slots.tolist(), plan.group_limits.tolist()))
    assert [lim for _, lim in by_slot] == expected


def test_shard_runs_cut_probed_lists_by_shard():
    from distann.search.plan import shard_runs

    starts = np.array([0, 4, 10, 12])  # shards [0,4) [4,10) [10,12) [12,...)
    lists = np.array([1, 3, 4, 9, 12, 20])
    assert shard_runs(lists, starts) == [(0, 0, 2), (1, 2, 4), (3, 4, 6)]  # shard 2 not probed
    assert shard_runs(np.array([], np.int64), starts) == []
