"""Worker-side tasks of a big-batch search. Each writes only its own files and ends with a
DONE marker; a rerun finds the marker and returns what it recorded (tasks are idempotent).

* :func:`bucket_chunk` (one per query chunk): read, check, transform and coarse-quantize the
  chunk's queries, and write, per list range, the queries that probe it (the shuffle's map side).
* :func:`scan_range` (one per list range): read the range's lists once, then stream the
  pieces of every query chunk through the engine; write each chunk's partial results.
* :func:`reduce_knn` / :func:`reduce_range` (one per query chunk): merge the partial results of
  every range for the chunk's queries (the shuffle's reduce side) and write the output chunk.
* :func:`write_range_lims` / :func:`write_range_block`: lay a range result out in Zarr.

Peak memory of each task is bounded by the chunk and range sizes, never by the number of
queries (README, "Big-batch search").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from distann.bigbatch import output
from distann.bigbatch.plan import ListRange, range_of_lists
from distann.bigbatch.work import maybe_fail, read_npz, write_npz
from distann.chunks import ChunkTask
from distann.codecs.metric import kernel_metric
from distann.codecs.pipeline import CodecPipeline
from distann.kernels import get_backend
from distann.search.resident import ShardProbes, load_shards, range_shard, scan_shard
from distann.store.location import Location
from distann.store.manifest import Manifest


@dataclass(frozen=True)
class JobContext:
    """What every task of one big-batch job needs (arrays travel separately, scattered once)."""

    index_loc: Location
    manifest: Manifest
    work: Location
    out: Location
    fmt: str
    mode: str  # "knn" or "range"
    k: int
    k_factor: int
    radius: float | None
    nprobe: int
    max_codes: int | None
    exclude_self: bool
    backend: str
    ranges: tuple[ListRange, ...]
    exact: bool = False  # recompute each result's distance in float64 from the stored exact vectors

    @property
    def kk(self) -> int:
        """Neighbours searched per query: one more than asked when the query itself is dropped."""
        return self.k + int(self.exclude_self)


def _piece(chunk_name: str, range_name: str) -> str:
    return f"pieces/{chunk_name}/{range_name}.npz"


def _partial(range_name: str, chunk_name: str) -> str:
    return f"partials/{range_name}/{chunk_name}.npz"


def _read_ids(query_ids, start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.int64) if query_ids is None else query_ids.read(start, stop)


# --------------------------------------------------------------------------- map side

def bucket_chunk(ctx: JobContext, chunk: ChunkTask, queries, query_ids, quantizer,
                 codec: CodecPipeline, list_sizes: np.ndarray) -> dict:
    """Coarse-quantize query chunk ``chunk`` and write its queries bucketed by list range.

    Returns ``{"counts": [...]}``, per range how many of the chunk's queries probe it, or
    ``{"nonfinite": n, "first": row}`` (and writes nothing) if the chunk holds NaN or Inf. Peak memory: about four
    copies of the chunk's vectors plus its probes (chunk x nprobe x 8 bytes, three times).
    """
    done = f"pieces/{chunk.name}/DONE"
    if ctx.work.exists(done):
        return ctx.work.read_json(done)
    x = queries.read_rows(chunk.start, chunk.stop)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():  # reported by the client (before anything of the chunk is written)
        return {"nonfinite": int(bad.sum()), "first": chunk.start + int(np.flatnonzero(bad)[0])}
    x_raw = codec.raw(x)
    del x
    y = np.ascontiguousarray(codec.transform(x_raw), dtype=np.float32)
    kern = get_backend(ctx.backend)
    _, probes = quantizer.search(y, ctx.nprobe, kernel_metric(ctx.manifest.metric), kern)
    probes = probes.astype(np.int64)
    sizes = list_sizes[probes]
    if ctx.max_codes is not None:  # Faiss semantics, as search.plan.plan_probes
        before = np.cumsum(sizes, axis=1) - sizes
        sizes = np.clip(ctx.max_codes - before, 0, sizes)
    probes[sizes == 0] = -1  # nothing to scan there (empty list, budget spent): dropped, as plan_probes does
    rng_of = np.where(probes >= 0, range_of_lists(ctx.ranges, probes), -1)
    m = len(y)
    # (range, row) items: one per query and range it probes, in range-major then row order
    keys = np.unique((rng_of * m + np.arange(m)[:, None])[rng_of >= 0])
    item_rng, item_row = np.divmod(keys, m)
    counts = np.bincount(item_rng, minlength=len(ctx.ranges)).astype(int)
    bounds = np.zeros(len(ctx.ranges) + 1, np.int64)
    np.cumsum(counts, out=bounds[1:])
    for r in np.flatnonzero(counts):
        rows = item_row[bounds[r]:bounds[r + 1]]
        inside = rng_of[rows] == r
        write_npz(ctx.work, _piece(chunk.name, ctx.ranges[r].name), {
            "rows": rows + chunk.start,
            "xq": y[rows],
            "xq_raw": x_raw[rows] if codec.refine else None,
            "probes": np.where(inside, probes[rows], -1),
            "limits": np.where(inside, sizes[rows], 0) if ctx.max_codes is not None else None,
        })
    ctx.work.write_json(done, {"counts": counts.tolist()})
    return {"counts": counts.tolist()}


def range_probes(probes: np.ndarray, limits: np.ndarray | None, list_start: int,
                 list_sizes: np.ndarray) -> ShardProbes:
    """The pairs of a piece (its rows' probes inside one range, -1 elsewhere) grouped by the
    range's lists, as the engine takes them; each row's probes numbered 0, 1, ... in order."""
    valid = probes >= 0
    rows, cols = np.nonzero(valid)
    lists = probes[rows, cols] - list_start
    per_row = valid.sum(axis=1)
    first = np.cumsum(per_row) - per_row
    slots = np.arange(len(rows), dtype=np.int64) - np.repeat(first, per_row)
    lim = limits[rows, cols] if limits is not None else list_sizes[lists]
    order = np.argsort(lists, kind="stable")
    offsets = np.zeros(len(list_sizes) + 1, np.int64)
    np.cumsum(np.bincount(lists, minlength=len(list_sizes)), out=offsets[1:])
    return ShardProbes(np.arange(len(probes), dtype=np.int64), offsets, rows[order].astype(np.int64),
                       slots[order], lim[order].astype(np.int64), max(1, int(per_row.max()) if len(per_row) else 1))


# --------------------------------------------------------------------------- scan

def scan_range(ctx: JobContext, rng: ListRange, chunk_names: list[str], query_ids) -> dict:
    """Scan list range ``rng`` for every query chunk in ``chunk_names`` (those with a piece for
    it), reading the range's lists once. Peak memory: the range's lists, one piece and its
    partial results (piece rows x probes in the range x k' x 12 bytes)."""
    done = f"partials/{rng.name}/DONE"
    if ctx.work.exists(done):
        return {**ctx.work.read_json(done), "skipped": True}
    t0 = time.perf_counter()
    shard = load_shards(ctx.index_loc, ctx.manifest, rng.shard_start, rng.shard_stop, name=rng.name,
                        index=rng.index)
    t_read = time.perf_counter() - t0
    sizes = np.diff(shard.block.offsets)
    refine = shard.codec.refine
    ip = kernel_metric(ctx.manifest.metric) == "ip"
    results = 0
    for name in chunk_names:
        piece = read_npz(ctx.work, _piece(name, rng.name))
        probes = range_probes(piece["probes"], piece.get("limits"), rng.list_start, sizes)
        batch = (piece["xq"], piece["xq_raw"] if refine else piece["xq"])
        rows = piece["rows"]
        if ctx.mode == "knn":
            res = scan_shard(shard, batch, probes, ctx.kk, ctx.k_factor, None, ctx.backend)
            part = {"rows": rows, "D": res.D, "I": res.I}
            if refine:  # global row positions (local search's tie rule), their ids and exact distances
                part.update(I=np.where(res.I >= 0, res.I + rng.row_start, -1), ids=res.ids, exact=res.exact)
            if ctx.exact:
                at = _positions(shard, res.I if refine else None, res.I)
                q = np.repeat(np.arange(len(rows)), res.I.shape[1]).reshape(res.I.shape)
                Dx = exact_distances(shard, batch, q[at >= 0], at[at >= 0]).astype(np.float32)
                key = "exact" if refine else "D"
                part[key] = part[key].copy()
                part[key][at >= 0] = Dx
        else:
            radius = widened(shard, ctx.radius) if ctx.exact else ctx.radius
            res = range_shard(shard, batch, probes, radius, None, ctx.backend)
            counts = np.diff(res.lims)
            local = np.repeat(np.arange(len(rows)), counts)
            D, I = res.D, res.I
            if ctx.exact:  # the kernel's float32 answer was widened; decide on exact distances
                Dx = exact_distances(shard, batch, local, _positions(shard, None, I))
                keep = Dx > ctx.radius if ip else Dx < ctx.radius
                local, D, I = local[keep], Dx[keep].astype(np.float32), I[keep]
            q = rows[local]
            if ctx.exclude_self:
                first = int(rows[0])
                own = _read_ids(query_ids, first, int(rows[-1]) + 1)
                keep = I != own[q - first]
                q, D, I = q[keep], D[keep], I[keep]
            part = {"q": q, "D": D, "I": I}
            results += len(I)
        write_npz(ctx.work, _partial(rng.name, name), part)
        maybe_fail("scan", rng.name)
    record = {"chunks": list(chunk_names), "seconds": round(time.perf_counter() - t0, 3),
              "read_seconds": round(t_read, 3), "vectors": rng.ntotal, "results": results}
    ctx.work.write_json(done, record)
    return {**record, "skipped": False}


def stores_exact_vectors(codec: CodecPipeline) -> bool:
    """Whether an index keeps each vector exactly (as the metric sees it): RFlat's raw vectors,
    or Flat codes without a transform."""
    return codec.refine or (codec.quantizer.kind == "Flat" and not codec.transforms)


def _exact_rows(shard, batch) -> tuple[np.ndarray, np.ndarray]:
    """(queries, stored vectors) in the space where they are exact: raw for RFlat, else IVF."""
    return (batch[1], shard.block.raw) if shard.codec.refine else (batch[0], shard.block.codes)


def _positions(shard, positions: np.ndarray | None, ids: np.ndarray) -> np.ndarray:
    """Row positions in the shard's block of ``ids`` (-1 stays -1); ``positions`` if known."""
    if positions is not None:
        return positions
    order = getattr(shard, "_id_order", None)
    if order is None:
        order = np.argsort(shard.block.ids, kind="stable")
        object.__setattr__(shard, "_id_order", order)
    found = np.searchsorted(shard.block.ids, ids, sorter=order)
    return np.where(ids >= 0, order[np.minimum(found, len(order) - 1)], -1)


def exact_distances(shard, batch, q: np.ndarray, pos: np.ndarray, block: int = 1 << 18) -> np.ndarray:
    """float64 distances between query rows ``q`` of the batch and block rows ``pos``: squared
    L2 for l2, inner product for ip and cosine (vectors normalized), without the
    ``|x|^2 + |y|^2 - 2xy`` expansion the kernels use."""
    xq, xb = _exact_rows(shard, batch)
    out = np.empty(len(q), np.float64)
    l2 = kernel_metric(shard.codec.metric) == "l2"
    for s in range(0, len(q), block):
        a = xq[q[s:s + block]].astype(np.float64)
        b = xb[pos[s:s + block]].astype(np.float64)
        out[s:s + block] = ((a - b) ** 2).sum(axis=1) if l2 else (a * b).sum(axis=1)
    return out


def widened(shard, radius: float) -> float:
    """A radius a little looser than ``radius`` for the kernel's float32 pass, so that no pair
    within ``radius`` by exact distance is lost to rounding (the exact pass then decides)."""
    norms = _max_sq_norm(shard)
    if kernel_metric(shard.codec.metric) == "l2":
        return radius + 1e-4 * (1.0 + radius + 4.0 * norms)
    return radius - 1e-4 * (1.0 + abs(radius) + norms)


def _max_sq_norm(shard) -> float:
    cached = getattr(shard, "_max_sq_norm", None)
    if cached is None:
        xb = shard.block.raw if shard.codec.refine else shard.block.codes
        cached = float(np.einsum("ij,ij->i", xb, xb).max(initial=0.0)) if len(xb) else 0.0
        object.__setattr__(shard, "_max_sq_norm", cached)
    return cached


# --------------------------------------------------------------------------- reduce side

def _take_rows(key_all: np.ndarray, key_want: np.ndarray, *payloads: np.ndarray) -> list[np.ndarray]:
    """``payloads`` at the positions where ``key_all`` (per row, unique non-negative keys, -1
    padding) equals ``key_want`` (per row), row by row; -1 keys give padding."""
    n, m = key_all.shape
    total = int(max(key_all.max(initial=0), key_want.max(initial=0))) + 2  # total - 1: the padding's key
    flat = (np.arange(n, dtype=np.int64)[:, None] * total + np.where(key_all >= 0, key_all, total - 1)).reshape(-1)
    order = np.argsort(flat, kind="stable")
    want = np.arange(n, dtype=np.int64)[:, None] * total + np.maximum(key_want, 0)
    at = order[np.minimum(np.searchsorted(flat[order], want), len(flat) - 1)]
    return [p.reshape(-1)[at] for p in payloads]


def reduce_knn(ctx: JobContext, chunk: ChunkTask, range_names: list[str], query_ids, k_factor_kc: int,
               refine: bool) -> int:
    """Merge every range's partial kNN results for query chunk ``chunk`` and write its output
    rows. Peak memory: the chunk's running results and one partial, about chunk x 3 x k' x 24 B."""
    done = f"reduced/{chunk.name}.json"
    if ctx.work.exists(done):
        return ctx.work.read_json(done)["count"]
    kmetric = kernel_metric(ctx.manifest.metric)
    kern = get_backend(ctx.backend)
    pad = -np.inf if kmetric == "ip" else np.inf
    n = chunk.size
    width = k_factor_kc if refine else ctx.kk
    D = np.full((n, width), pad, np.float32)
    I = np.full((n, width), -1, np.int64)
    if refine:
        X = np.full((n, width), pad, np.float32)
        ID = np.full((n, width), -1, np.int64)
    for rname in range_names:
        p = read_npz(ctx.work, _partial(rname, chunk.name))
        at = p["rows"] - chunk.start
        Dc = np.concatenate([D[at], p["D"]], axis=1)
        Ic = np.concatenate([I[at], p["I"]], axis=1)
        Dn, In = kern.merge_topk(Dc, Ic, width, kmetric)
        if refine:
            X[at], ID[at] = _take_rows(Ic, In, np.concatenate([X[at], p["exact"]], axis=1),
                                       np.concatenate([ID[at], p["ids"]], axis=1))
            X[at] = np.where(In >= 0, X[at], pad)
            ID[at] = np.where(In >= 0, ID[at], -1)
        D[at], I[at] = Dn, In
    if refine:  # the global candidates' best kk by exact distance (ties by id), as Index.search's rerank
        D, I = kern.merge_topk(X, ID, ctx.kk, kmetric)
    if ctx.exclude_self:
        own = _read_ids(query_ids, chunk.start, chunk.stop)
        self_hit = I == own[:, None]
        D, I = kern.merge_topk(np.where(self_hit, pad, D).astype(np.float32), np.where(self_hit, -1, I), ctx.k,
                               kmetric)
    D, I = np.ascontiguousarray(D[:, :ctx.k]), np.ascontiguousarray(I[:, :ctx.k])
    rows = np.arange(chunk.start, chunk.stop, dtype=np.int64)
    if ctx.fmt == "zarr":
        output.write_zarr_rows(ctx.out, "ids", chunk.start, I)
        output.write_zarr_rows(ctx.out, "distances", chunk.start, D)
    else:
        qids = None if query_ids is None else query_ids.read(chunk.start, chunk.stop)
        ctx.work.write_bytes(f"parts/{output.part_name(chunk.name)}",
                             output.parquet_bytes(output.knn_columns(rows, qids, D, I)))
    maybe_fail("reduce", chunk.name)
    ctx.work.write_json(done, {"count": int(n * ctx.k)})
    return int(n * ctx.k)


def reduce_range(ctx: JobContext, chunk: ChunkTask, range_names: list[str], query_ids) -> int:
    """Gather every range's results for query chunk ``chunk``, best first per query (ties by
    id, as local search), and write them. Returns how many results the chunk has. Peak
    memory: the chunk's results, about 3 x results x 12 bytes."""
    done = f"reduced/{chunk.name}.json"
    if ctx.work.exists(done):
        return ctx.work.read_json(done)["count"]
    parts = [read_npz(ctx.work, _partial(rname, chunk.name)) for rname in range_names]
    q = np.concatenate([p["q"] for p in parts]) if parts else np.empty(0, np.int64)
    D = np.concatenate([p["D"] for p in parts]).astype(np.float32) if parts else np.empty(0, np.float32)
    I = np.concatenate([p["I"] for p in parts]).astype(np.int64) if parts else np.empty(0, np.int64)
    del parts
    ip = kernel_metric(ctx.manifest.metric) == "ip"
    order = np.lexsort((I, -D if ip else D, q))
    q, D, I = q[order], D[order], I[order]
    if ctx.fmt == "zarr":
        lims = np.zeros(chunk.size + 1, np.int64)
        np.cumsum(np.bincount(q - chunk.start, minlength=chunk.size), out=lims[1:])
        write_npz(ctx.work, f"results/{chunk.name}.npz", {"lims": lims, "D": D, "I": I})
    else:
        qids = None if query_ids is None else query_ids.read(chunk.start, chunk.stop)[q - chunk.start]
        ctx.work.write_bytes(f"parts/{output.part_name(chunk.name)}",
                             output.parquet_bytes(output.range_columns(q, qids, D, I)))
    maybe_fail("reduce", chunk.name)
    ctx.work.write_json(done, {"count": int(len(I))})
    return int(len(I))


def write_range_lims(ctx: JobContext, chunk: ChunkTask, base: int, last: bool) -> None:
    """``lims`` rows of chunk ``chunk`` (and the final total for the last chunk), offset by
    ``base``, the results of all earlier chunks."""
    lims = read_npz(ctx.work, f"results/{chunk.name}.npz")["lims"] + base
    output.write_zarr_rows(ctx.out, "lims", chunk.start, lims if last else lims[:-1])


def write_range_block(ctx: JobContext, start: int, stop: int, chunks: list[tuple[str, int, int]]) -> None:
    """Rows ``[start, stop)`` of the flat ``ids`` / ``distances`` arrays (one Zarr chunk), from
    the results of the query chunks ``(name, base, count)`` overlapping them."""
    ids = np.empty(stop - start, np.int64)
    dist = np.empty(stop - start, np.float32)
    for name, base, count in chunks:
        a, b = max(start, base), min(stop, base + count)
        if b <= a:
            continue
        r = read_npz(ctx.work, f"results/{name}.npz")
        ids[a - start:b - start] = r["I"][a - base:b - base]
        dist[a - start:b - start] = r["D"][a - base:b - base]
    output.write_zarr_rows(ctx.out, "ids", start, ids)
    output.write_zarr_rows(ctx.out, "distances", start, dist)
