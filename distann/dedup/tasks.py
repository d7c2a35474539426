"""Worker-side tasks of the dedup job (see ``dedup.driver`` for the stages)."""

from __future__ import annotations

import numpy as np

from distann.bigbatch.output import parquet_bytes, part_name
from distann.chunks import ChunkTask
from distann.dedup.components import forest, group_keys, roots_of, row_keys
from distann.store.location import Location

#: pair distances each pair task sends back for the similarity plot (a uniform sample)
SAMPLE_PER_PART = 20_000


def hash_chunk(src, chunk: ChunkTask, nbuckets: int) -> dict:
    """Keys of the chunk's rows, split into ``nbuckets`` buckets by key; or ``{"nonfinite": n,
    "first": row}`` if the chunk holds NaN or Inf (reported by the client)."""
    x = src.read_rows(chunk.start, chunk.stop)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        return {"nonfinite": int(bad.sum()), "first": chunk.start + int(np.flatnonzero(bad)[0])}
    h1, h2 = row_keys(x)
    bucket = (h1 % np.uint64(nbuckets)).astype(np.int64)
    order = np.argsort(bucket, kind="stable")
    cuts = np.searchsorted(bucket[order], np.arange(nbuckets + 1))
    rows = np.arange(chunk.start, chunk.stop, dtype=np.int64)
    return {"parts": [(h1[order[a:b]], h2[order[a:b]], rows[order[a:b]]) for a, b in zip(cuts[:-1], cuts[1:])]}


def bucket_part(hashed: dict, b: int) -> tuple:
    return hashed["parts"][b]


def group_bucket(*parts: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Exact duplicates among one bucket's rows: ``(dup_rows, rep_rows)``, sorted by row."""
    h1 = np.concatenate([p[0] for p in parts])
    h2 = np.concatenate([p[1] for p in parts])
    rows = np.concatenate([p[2] for p in parts])
    return group_keys(h1, h2, rows)


def rows_between(dups: tuple[np.ndarray, np.ndarray], start: int, stop: int) -> np.ndarray:
    """The duplicate rows in ``[start, stop)``."""
    a, b = np.searchsorted(dups[0], [start, stop])
    return dups[0][a:b]


def dup_forest(dups: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return forest(dups[0], dups[1])


def compact_chunk(work: Location, src, chunk: ChunkTask, *dup_rows: np.ndarray) -> int:
    """Write the chunk's rows that are not exact copies of a lower row (vector and row number)
    as ``unique/part-<c>.parquet``; returns how many."""
    import pyarrow as pa

    name = f"unique/{part_name(chunk.name)}"
    done = f"unique/DONE-{chunk.name}"
    if work.exists(done):
        return int(work.read_json(done)["count"])
    drop = np.concatenate(dup_rows) if dup_rows else np.empty(0, np.int64)
    keep = np.ones(chunk.size, dtype=bool)
    keep[drop - chunk.start] = False
    x = src.read_rows(chunk.start, chunk.stop)[keep]
    rows = np.arange(chunk.start, chunk.stop, dtype=np.int64)[keep]
    if len(rows):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
        work.write_bytes(name, parquet_bytes({"vector": vec, "row": pa.array(rows, pa.int64())}))
    work.write_json(done, {"count": int(len(rows))})
    return int(len(rows))


def pair_forest(result_loc: Location, part: str, mode: str, threshold: float, ip: bool,
                seed: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """The pairs of one part of the self-join (rows of the source at both ends; kNN results
    filtered by the threshold): their forest, the pairs (lower row, higher row), unique, and a
    sample of their distances."""
    import pyarrow.parquet as pq

    with result_loc.fs.open(result_loc.path(part), "rb") as fh:
        table = pq.read_table(fh)
    a = np.asarray(table.column("query_id" if "query_id" in table.column_names else "query"), dtype=np.int64)
    if mode == "range":
        b = np.asarray(table.column("id"), dtype=np.int64)
        d = np.asarray(table.column("distance"), dtype=np.float32)
    else:
        k = table.schema.field("ids").type.list_size
        b = np.asarray(table.column("ids").combine_chunks().flatten(), dtype=np.int64)
        d = np.asarray(table.column("distances").combine_chunks().flatten(), dtype=np.float32)
        a = np.repeat(a, k)
        keep = (b >= 0) & ((d >= threshold) if ip else (d <= threshold))
        a, b, d = a[keep], b[keep], d[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    if len(lo):  # each pair counted once, whichever of its ends found it
        key = np.unique(np.stack([lo, hi], axis=1), axis=0, return_index=True)[1]
        lo, hi, d = lo[key], hi[key], d[key]
    rng = np.random.default_rng(seed)
    sample = d if len(d) <= SAMPLE_PER_PART else rng.choice(d, SAMPLE_PER_PART, replace=False)
    return forest(lo, hi), np.stack([lo, hi], axis=1), np.sort(sample)


def merge_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The union of two sets of pairs (a pair found from both of its ends counts once)."""
    return np.unique(np.concatenate([a, b]), axis=0)


def _members(f: tuple[np.ndarray, np.ndarray], chunk: ChunkTask, ids_src) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chunk's rows that belong to a group (nodes of the forest ``f``): ``(mask, their
    roots, the ids of all the chunk's rows)``."""
    rows = np.arange(chunk.start, chunk.stop, dtype=np.int64)
    member = np.isin(rows, f[0], assume_unique=True) if len(f[0]) else np.zeros(len(rows), bool)
    ids = rows if ids_src is None else ids_src.read(chunk.start, chunk.stop)
    return member, roots_of(f, rows[member]), ids


def group_stats(f: tuple[np.ndarray, np.ndarray], chunk: ChunkTask, ids_src, src, centroid: bool) -> tuple:
    """Per component touching the chunk: ``(roots, min id, members[, vector sums])``."""
    member, roots, ids = _members(f, chunk, ids_src)
    ids = ids[member]
    uniq, inv = np.unique(roots, return_inverse=True)
    minid = np.full(len(uniq), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(minid, inv, ids)
    count = np.bincount(inv, minlength=len(uniq)).astype(np.int64)
    if not centroid:
        return uniq, minid, count
    x = src.read_rows(chunk.start, chunk.stop)[member].astype(np.float64)
    sums = np.zeros((len(uniq), x.shape[1]), np.float64)
    np.add.at(sums, inv, x)
    return uniq, minid, count, sums


def merge_stats(s: tuple, t: tuple) -> tuple:
    roots = np.concatenate([s[0], t[0]])
    uniq, inv = np.unique(roots, return_inverse=True)
    minid = np.full(len(uniq), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(minid, inv, np.concatenate([s[1], t[1]]))
    count = np.bincount(inv, weights=np.concatenate([s[2], t[2]]), minlength=len(uniq)).astype(np.int64)
    if len(s) == 3:
        return uniq, minid, count
    sums = np.zeros((len(uniq), s[3].shape[1]), np.float64)
    np.add.at(sums, inv, np.concatenate([s[3], t[3]]))
    return uniq, minid, count, sums


def size_histogram(stats: tuple) -> dict[int, int]:
    sizes, counts = np.unique(stats[2], return_counts=True)
    return {int(s): int(c) for s, c in zip(sizes, counts)}


def centroid_choice(f: tuple, stats: tuple, chunk: ChunkTask, ids_src, src, spherical: bool) -> tuple:
    """Per component touching the chunk, its member closest to the component's centroid:
    ``(roots, distance, id)`` (ties by lower id)."""
    member, roots, ids = _members(f, chunk, ids_src)
    ids = ids[member]
    x = src.read_rows(chunk.start, chunk.stop)[member].astype(np.float64)
    at = np.searchsorted(stats[0], roots)
    cent = stats[3][at] / stats[2][at, None]
    if spherical:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    dist = ((x - cent) ** 2).sum(axis=1)
    return _best(roots, dist, ids)


def _best(roots: np.ndarray, dist: np.ndarray, ids: np.ndarray) -> tuple:
    order = np.lexsort((ids, dist, roots))
    roots, dist, ids = roots[order], dist[order], ids[order]
    first = np.ones(len(roots), dtype=bool)
    first[1:] = roots[1:] != roots[:-1]
    return roots[first], dist[first], ids[first]


def merge_choice(s: tuple, t: tuple) -> tuple:
    return _best(np.concatenate([s[0], t[0]]), np.concatenate([s[1], t[1]]), np.concatenate([s[2], t[2]]))


def write_groups(work: Location, f: tuple, stats: tuple, choice: tuple | None, chunk: ChunkTask, ids_src) -> int:
    """The chunk's rows of the output: ``id``, ``group_id`` (the lowest id of the group) and
    ``is_representative``; returns how many rows are representatives."""
    import pyarrow as pa

    grouped, roots, ids = _members(f, chunk, ids_src)
    group_id = ids.copy()
    group_id[grouped] = stats[1][np.searchsorted(stats[0], roots)]
    rep = np.ones(len(ids), dtype=bool)
    if choice is None:
        rep[grouped] = ids[grouped] == group_id[grouped]
    else:
        rep[grouped] = ids[grouped] == choice[2][np.searchsorted(choice[0], roots)]
    work.write_bytes(f"parts/{part_name(chunk.name)}", parquet_bytes(
        {"id": pa.array(ids, pa.int64()), "group_id": pa.array(group_id, pa.int64()),
         "is_representative": pa.array(rep, pa.bool_())}))
    return int(rep.sum())
