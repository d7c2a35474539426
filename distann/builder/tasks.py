"""Worker-side build tasks. Each writes only its own outputs and ends with a done marker.

Staging (transient, removed at commit) is raw little-endian files per add task::

    <gen>/staging/<chunk>/codes.bin    (n_c, code_width) codes, rows sorted by list
    <gen>/staging/<chunk>/ids.bin      (n_c,) int64
    <gen>/staging/<chunk>/offsets.bin  (nlist + 1,) int64: rows of list l are [off[l], off[l+1])
    <gen>/staging/<chunk>/DONE         JSON, written last

so a merge task reads one contiguous byte range of every staging output. A rerun finds the
DONE marker and skips the task: tasks are idempotent, which Dask requires (it may run a task
twice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from distann.builder.plan import ShardTask, chunk_rows_for_codes, list_order
from distann.chunks import ChunkTask
from distann.codecs import make_codec
from distann.codecs.metric import for_metric
from distann.store.arrays import checksum, write_array
from distann.store.location import Location
from distann.train.kmeans import nearest


class InjectedFault(RuntimeError):
    """Raised by the private fault-injection switch used in the resume tests."""


def _maybe_fail(stage: str, name: str) -> None:
    # Private test hook: DISTANN_FAIL_TASK="add:c000002" makes that task fail after writing
    # part of its output (a crash partway). Not part of any public signature.
    if os.environ.get("DISTANN_FAIL_TASK") == f"{stage}:{name}":
        raise InjectedFault(f"injected failure in {stage} task {name}")


@dataclass(frozen=True)
class AddContext:
    """What every add task needs, shipped once per task (centroids go separately as a future)."""

    loc: Location
    gen: str
    nlist: int
    metric: str
    codec: str
    d: int


def add_chunk(ctx: AddContext, chunk: ChunkTask, source, ids_source, centroids: np.ndarray) -> tuple[np.ndarray, bool]:
    """Shard over ids: assign, encode, sort by list and stage one row chunk.

    Returns (per-list counts, skipped). Peak memory: about three copies of the chunk.
    """
    base = f"{ctx.gen}/staging/{chunk.name}"
    if ctx.loc.exists(f"{base}/DONE"):
        offsets = np.frombuffer(ctx.loc.read_bytes(f"{base}/offsets.bin"), dtype="<i8")
        return np.diff(offsets), True
    x = for_metric(source.read_rows(chunk.start, chunk.stop), ctx.metric)
    ids = (np.arange(chunk.start, chunk.stop, dtype=np.int64) if ids_source is None
           else ids_source.read(chunk.start, chunk.stop))
    assign = nearest(x, centroids, spherical=ctx.metric != "l2")
    order, offsets = list_order(assign, ctx.nlist)
    codes = make_codec(ctx.codec, ctx.d).encode(x[order])
    del x
    ctx.loc.write_bytes(f"{base}/codes.bin", _le(codes).data)
    _maybe_fail("add", chunk.name)
    ctx.loc.write_bytes(f"{base}/ids.bin", _le(ids[order]).data)
    ctx.loc.write_bytes(f"{base}/offsets.bin", _le(offsets).data)
    ctx.loc.write_json(f"{base}/DONE", {"rows": chunk.size})
    return np.diff(offsets), False


def _le(a: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian view (a copy only on big-endian machines)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def merge_shard(ctx: AddContext, shard: ShardTask, chunks: tuple[ChunkTask, ...]) -> tuple[int, str, bool]:
    """Shard over lists: gather lists [list_start, list_stop) from every staging output.

    Reads one contiguous slice per staging output and writes the shard's Zarr arrays
    (list-major; within a list, rows keep chunk order, so ids stay ascending for default ids).
    Returns (ntotal, checksum, skipped). Peak memory: about twice the shard's bytes.
    """
    base = f"{ctx.gen}/shards/{shard.name}"
    if ctx.loc.exists(f"{base}/DONE"):
        done = ctx.loc.read_json(f"{base}/DONE")
        return done["ntotal"], done["checksum"], True
    codec = make_codec(ctx.codec, ctx.d)
    width, dtype = codec.code_width, codec.code_dtype.newbyteorder("<")
    l0, l1 = shard.list_start, shard.list_stop
    # pass 1: every staging output's per-list offsets inside the shard's list range (small)
    spans = []
    for chunk in chunks:
        cb = f"{ctx.gen}/staging/{chunk.name}"
        offs = np.frombuffer(ctx.loc.read_bytes(f"{cb}/offsets.bin", l0 * 8, (l1 + 1) * 8), dtype="<i8")
        if offs[-1] > offs[0]:
            spans.append((cb, offs))
    counts = np.array([np.diff(o) for _, o in spans], dtype=np.int64).reshape(len(spans), l1 - l0)
    offsets = np.zeros(l1 - l0 + 1, dtype=np.int64)
    np.cumsum(counts.sum(axis=0), out=offsets[1:])
    # pass 2: read one contiguous slice per staging output, copy each list's rows to its place
    # (within a list, chunk order), so the shard is assembled with a single copy
    n = int(offsets[-1])
    codes = np.empty((n, width), dtype=dtype)
    ids = np.empty(n, dtype="<i8")
    cursor = offsets[:-1].copy()
    for cb, offs in spans:
        r0, r1 = int(offs[0]), int(offs[-1])
        part = np.frombuffer(ctx.loc.read_bytes(f"{cb}/codes.bin", r0 * codec.code_size, r1 * codec.code_size),
                             dtype=dtype).reshape(-1, width)
        pid = np.frombuffer(ctx.loc.read_bytes(f"{cb}/ids.bin", r0 * 8, r1 * 8), dtype="<i8")
        local = offs - r0
        for j in np.flatnonzero(np.diff(offs)):
            a, b, c = int(local[j]), int(local[j + 1]), int(cursor[j])
            codes[c:c + b - a] = part[a:b]
            ids[c:c + b - a] = pid[a:b]
            cursor[j] += b - a
        del part, pid
    store = ctx.loc.zarr_store()
    rows = chunk_rows_for_codes(codec.code_size)
    write_array(store, f"{base}/offsets", offsets, (max(1, len(offsets)),))
    write_array(store, f"{base}/ids", ids, (max(1, min(len(ids), rows * 4)),))
    write_array(store, f"{base}/codes", codes, (max(1, min(len(codes), rows)), width))
    _maybe_fail("merge", shard.name)
    crc = checksum((offsets, ids, codes))
    ctx.loc.write_json(f"{base}/DONE", {"ntotal": int(len(ids)), "checksum": crc})
    return int(len(ids)), crc, False


def scan_ids(ids_source, start: int, stop: int):
    """First-pass check of user ids of one chunk: (min, max, negatives, first negative row,
    sorted ids, has an in-chunk duplicate). Sorted ids stay on the worker for the global check."""
    ids = ids_source.read(start, stop)
    neg = ids < 0
    nneg = int(neg.sum())
    first_neg = int(start + np.flatnonzero(neg)[0]) if nneg else -1
    s = np.sort(ids)
    dup = bool(len(s) > 1 and (s[1:] == s[:-1]).any())
    lo, hi = (int(s[0]), int(s[-1])) if len(s) else (0, -1)
    return {"min": lo, "max": hi, "neg": nneg, "first_neg": first_neg, "dup": dup,
            "quantiles": s[np.linspace(0, len(s) - 1, 33).astype(int)] if len(s) else s}, s


def split_sorted(s: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    cuts = np.searchsorted(s, bounds, side="left")
    return np.split(s, cuts)


def first_duplicate(*parts: np.ndarray) -> tuple[int, int | None]:
    """(number of duplicate values, one duplicated value) among the sorted pieces of one bucket."""
    s = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    eq = s[1:] == s[:-1]
    n = int(eq.sum())
    return n, (int(s[1:][eq][0]) if n else None)

