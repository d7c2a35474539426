"""Worker-side build tasks. Each writes only its own outputs and ends with a done marker.

An add task (shard over ids) encodes one row chunk and writes its staging output
(``store.staging``); a merge task (shard over lists) assembles one list-range shard from a
contiguous slice of every staging output (``store.shards``). A rerun finds the DONE marker and
skips the task: tasks are idempotent, which Dask requires (it may run a task twice).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import numpy as np

from distann.builder.plan import ShardTask, list_order
from distann.chunks import ChunkTask, plan_chunks
from distann.codecs.coarse import FlatQuantizer
from distann.codecs.pipeline import CodecPipeline
from distann.kernels import get_backend
from distann.store import layout
from distann.store.location import Location
from distann.store.shards import write_shard
from distann.store.staging import Staging


class InjectedFault(RuntimeError):
    """Raised by the private fault-injection switch used in the resume tests."""


def _maybe_fail(stage: str, name: str) -> None:
    # Private test hooks: DISTANN_FAIL_TASK="add:c000002" makes that task fail after writing
    # part of its output (a crash partway); DISTANN_KILL_TASK="add:c000002" makes it SIGKILL its
    # own worker process there instead (a real kill: tests/test_faults.py), every time, or only
    # once in all when DISTANN_KILL_ONCE names a marker file it may create. Not part of any
    # public signature.
    if os.environ.get("DISTANN_FAIL_TASK") == f"{stage}:{name}":
        raise InjectedFault(f"injected failure in {stage} task {name}")
    if os.environ.get("DISTANN_KILL_TASK") == f"{stage}:{name}":
        once = os.environ.get("DISTANN_KILL_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class AddContext:
    """What every add and merge task needs (centroids and the codec go separately, scattered once)."""

    loc: Location
    gen: str
    nlist: int
    spherical: bool
    code_dtype: str
    code_width: int
    raw_d: int  # dimension of the raw vectors kept for RFlat, 0 without
    backend: str = "numba"  # kernel backend of the assignment
    chunk_bytes: int = 1 << 20  # target bytes of a stored chunk of the shards' arrays


def add_chunk(ctx: AddContext, chunk: ChunkTask, source, ids_source, quantizer: FlatQuantizer,
              codec: CodecPipeline) -> tuple[np.ndarray, bool, int, int]:
    """Shard over ids: check, transform, assign (by the coarse ``quantizer``), encode, sort by
    list and stage one row chunk.

    Returns (per-list counts, skipped, NaN/Inf values, first row holding one or -1). A chunk
    holding NaN or Inf writes nothing: the driver reports it before any merge or commit.
    Peak memory: about three copies of the chunk (four with RFlat's raw vectors).
    """
    staging = Staging(ctx.loc, ctx.gen, chunk.name)
    if staging.done():
        return np.diff(staging.offsets()), True, 0, -1
    x = source.read_rows(chunk.start, chunk.stop)
    if not np.isfinite(np.add.reduce(x, axis=None, dtype=np.float64)):  # one pass; float64 cannot overflow
        bad = ~np.isfinite(x)
        return (np.zeros(ctx.nlist, dtype=np.int64), False, int(bad.sum()),
                chunk.start + int(np.flatnonzero(bad.any(axis=1))[0]))
    x_raw = codec.raw(x)
    del x
    y = codec.transform(x_raw)
    ids = (np.arange(chunk.start, chunk.stop, dtype=np.int64) if ids_source is None
           else ids_source.read(chunk.start, chunk.stop))
    assign = quantizer.assign(y, "ip" if ctx.spherical else "l2", get_backend(ctx.backend))
    order, offsets = list_order(assign, ctx.nlist)
    codes = codec.encode(y[order], assign[order], quantizer.centroids, backend=ctx.backend)
    del y
    raw = x_raw[order] if ctx.raw_d else None
    staging.write(codes, ids[order], offsets, raw, after_codes=lambda: _maybe_fail("add", chunk.name))
    return np.diff(offsets), False, 0, -1


def merge_shard(ctx: AddContext, shard: ShardTask, n: int, chunk_rows: int) -> tuple[int, str, bool]:
    """Shard over lists: gather lists [list_start, list_stop) from every staging output (the add
    tasks' chunks of ``n`` rows cut by ``chunk_rows``, planned again here: the task's message
    does not grow with the number of chunks).

    Reads one contiguous slice per staging output and writes the shard's Zarr arrays
    (list-major; within a list, rows keep chunk order, so ids stay ascending for default ids).
    Returns (ntotal, checksum, skipped). Peak memory: about twice the shard's bytes.
    """
    base = layout.shard(ctx.gen, shard.name)
    if ctx.loc.exists(f"{base}/DONE"):
        done = ctx.loc.read_json(f"{base}/DONE")
        return done["ntotal"], done["checksum"], True
    dtype = np.dtype(ctx.code_dtype).newbyteorder("<")
    chunks = plan_chunks(n, chunk_rows)
    l0, l1 = shard.list_start, shard.list_stop
    # pass 1: every staging output's per-list offsets inside the shard's list range (small)
    spans = []
    for chunk in chunks:
        staging = Staging(ctx.loc, ctx.gen, chunk.name)
        offs = staging.offsets(l0, l1)
        if offs[-1] > offs[0]:
            spans.append((staging, offs))
    counts = np.array([np.diff(o) for _, o in spans], dtype=np.int64).reshape(len(spans), l1 - l0)
    offsets = np.zeros(l1 - l0 + 1, dtype=np.int64)
    np.cumsum(counts.sum(axis=0), out=offsets[1:])
    # pass 2: read one contiguous slice per staging output, copy each list's rows to its place
    # (within a list, chunk order), so the shard is assembled with a single copy
    n = int(offsets[-1])
    codes = np.empty((n, ctx.code_width), dtype=dtype)
    ids = np.empty(n, dtype="<i8")
    raw = np.empty((n, ctx.raw_d), dtype="<f4") if ctx.raw_d else None
    cursor = offsets[:-1].copy()
    for staging, offs in spans:
        part, pid, praw = staging.rows(int(offs[0]), int(offs[-1]), dtype, ctx.code_width, ctx.raw_d)
        local = offs - offs[0]
        for j in np.flatnonzero(np.diff(offs)):
            a, b, c = int(local[j]), int(local[j + 1]), int(cursor[j])
            codes[c:c + b - a] = part[a:b]
            ids[c:c + b - a] = pid[a:b]
            if raw is not None:
                raw[c:c + b - a] = praw[a:b]
            cursor[j] += b - a
        del part, pid, praw
    crc = write_shard(ctx.loc.zarr_store(), base, offsets, codes, ids, raw, chunk_bytes=ctx.chunk_bytes)
    _maybe_fail("merge", shard.name)
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

