"""``distann.build``: the Dask driver that turns the build plan into tasks.

Stages, each resumable (a rerun of the same build skips what has a done marker)::

    validate (no task) -> lease the next generation -> check the workers reach the data
    -> sample (read-only tasks reading only the training sample's rows; id checks)
    -> train (distributed k-means) -> add (shard over ids, staging; every row checked for NaN/Inf,
       a bad row stops the build before any merge) -> merge (shard over lists)
    -> commit (one atomic manifest write) -> clean up staging and the previous generation

Everything a build writes lives under a fresh generation folder ``g<N>/``, which the build owns
through its lease (``distann.store.lease``: a second build of the same URL fails with a
conflict); the committed index (generation N-1) is never touched before the new manifest is
in place, so a build killed at any point leaves the previous index readable.
"""

from __future__ import annotations

import logging
import operator
import os
import signal
import time
import warnings
from datetime import datetime, timezone

import numpy as np

from distann import config
from distann.builder.plan import build_key, plan_shards
from distann.builder.tasks import AddContext, add_chunk, first_duplicate, merge_shard, scan_ids, split_sorted
from distann.chunks import ChunkTask, plan_chunks
from distann.cluster import (TaskNames, broadcast, check_backend, check_cluster_args, check_reachable, client_context,
                             tree_reduce, wait_all)
from distann.codecs.coarse import TWO_LEVEL_NLIST, FlatQuantizer, load_quantizer
from distann.codecs.pipeline import CodecPipeline
from distann.codecs.pq import PQQuantizer
from distann.codecs.spec import parse_spec
from distann.errors import BuildConflictError, IndexExistsError, IndexFormatError, ValidationError
from distann.kernels import resolve_backend
from distann.store import layout
from distann.store.arrays import CheckedStore, StoredArray, checksum, write_small
from distann.store.lease import LEASE_DIR, GenerationLease, remove_older
from distann.store.location import Location
from distann.store.readers import READERS_DIR, held_generations
from distann.store.staging import STAGING_VERSION
from distann.store.manifest import (FORMAT_VERSION, MANIFEST_PATH, Manifest, ShardEntry, manifest_exists,
                                    read_manifest, write_manifest)
from distann.train.api import check_train_params, collect_sample
from distann.train.codec import TwoLevel, sample_size, train_pipeline
from distann.train.kmeans import MIN_POINTS_PER_CENTROID, TrainingWarning
from distann.train.sampling import ChunkScan, raise_if_nonfinite
from distann.train.two_level import DEFAULT_REFINE_NITER, check_two_level
from distann.validation import check_bool, check_metric, check_nonnegative_int, check_positive_int, check_url

log = logging.getLogger(__name__)


def _add_counts(a, b):
    """Reduce add results: list sizes, skipped chunks, NaN/Inf values, first bad row."""
    firsts = [f for f in (a[3], b[3]) if f >= 0]
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], min(firsts) if firsts else -1


def build(source, index_url: str, spec: str = "IVF1024,Flat", metric: str = "l2", ids=None, client=None, *,
          overwrite: bool = False, niter: int = 10, seed: int = 1234, init: str = "random",
          max_points_per_centroid: int = 256, chunk_rows: int | None = None, shard_bytes: int | None = None,
          chunk_bytes: int | None = None,
          column: str | None = None, ids_column: str | None = None, storage_options: dict | None = None,
          workers: int | None = None, scheduler: str | None = None, progress: bool = False,
          backend: str | None = None, two_level: bool | None = None, nlist1: int | None = None,
          quantizer_nprobe: int | None = None, refine_niter: int | None = None):
    """Build an IVF index of ``source`` at ``index_url`` and return it opened.

    ``source``: URL (npy, fvecs/bvecs, zarr, parquet, directory or glob), a VectorSource or a
    2-D array. ``ids``: optional int64 ids (URL or array), one per vector, unique and >= 0;
    ``ids_column`` alone takes them from that column of the source itself (Parquet, or an
    array of the source's Zarr group); default: sequential ids 0..n-1. ``client``: a
    ``distributed.Client``; with none, an embedded LocalCluster (``workers`` processes, default
    one per core) is started and closed, or ``scheduler`` is joined. Every parameter is
    validated before any task is scheduled. ``niter`` defaults to 10 k-means iterations, as
    Faiss's IndexIVF training does. ``backend``: the kernel backend of the k-means and of the
    add stage's assignment on the workers ("numba", "numpy" or "cuda"; default the
    ``distann.kernels.backend`` setting); every worker is checked to be able to run it before
    any task is scheduled. ``chunk_bytes`` (default ``distann.build.chunk-bytes``, 1 MiB): the
    target size of one stored chunk of a shard's arrays, at least 256 rows; a search reads whole
    chunks, so smaller chunks read less per probed list on object stores, at the cost of more
    objects.

    Large ``nlist`` (``docs/SCALE.md``): with ``two_level`` (default: from ``nlist`` >= 16384 on)
    the coarse centroids come from a two-level k-means (``nlist1`` level-1 clusters, default
    round(sqrt(nlist)), each split into fine centroids in parallel, then ``refine_niter``
    (default 5) Lloyd iterations of all centroids), and vectors and queries are assigned by an
    inverted file over the centroids that searches ``quantizer_nprobe`` (default 16) level-1 lists instead of
    comparing with every centroid (``distann.codecs.coarse``).

    Only one build at a time may write an index URL: a second one fails with
    BuildConflictError while the first holds its lease (``docs/FORMAT.md``).
    """
    from distann.sources import as_source, resolve_ids

    ispec = parse_spec(spec)
    check_metric(metric)
    check_train_params(niter, init, seed, max_points_per_centroid)
    check_bool("overwrite", overwrite)
    chunk_rows = check_positive_int("chunk_rows", chunk_rows if chunk_rows is not None else config.get("build.chunk-rows"))
    shard_bytes = check_positive_int("shard_bytes", shard_bytes if shard_bytes is not None else config.get("build.shard-bytes"))
    chunk_bytes = check_positive_int("chunk_bytes", chunk_bytes if chunk_bytes is not None else config.get("build.chunk-bytes"))
    check_cluster_args(workers, scheduler, client)
    backend = resolve_backend(backend)
    if isinstance(index_url, os.PathLike):
        index_url = os.fspath(index_url)
    if not isinstance(index_url, str) or not index_url:
        raise ValidationError("index_url", index_url, "a non-empty path or URL")
    check_url("index_url", index_url, storage_options)  # before the source is opened: no I/O for a refused URL
    src = as_source(source, column=column, storage_options=storage_options)
    ids_src = resolve_ids(ids, ids_column, src, storage_options)
    if ispec.nlist > src.n:
        raise ValidationError("spec", spec, f"nlist ({ispec.nlist}) must be at most the number of training "
                                            f"vectors ({src.n}): the minimum training size of k-means is nlist "
                                            f"vectors ({MIN_POINTS_PER_CENTROID} per list, "
                                            f"{MIN_POINTS_PER_CENTROID * ispec.nlist} here, to train well)")
    loc = Location(index_url, dict(storage_options or {}))
    _check_destination(loc, overwrite)
    committed = _committed_generation(loc, overwrite)
    codec = CodecPipeline.create(ispec, src.d, metric, seed)
    n_sample = sample_size(codec, src.n, ispec.nlist, max_points_per_centroid)
    _check_training_size(codec, n_sample)
    levels = _check_levels(ispec.nlist, n_sample, two_level, nlist1, quantizer_nprobe, refine_niter)
    key = build_key(source=src.fingerprint, ids=getattr(ids_src, "fingerprint", None), spec=str(ispec),
                    metric=metric, niter=niter, seed=seed, init=init, mppc=max_points_per_centroid,
                    chunk_rows=chunk_rows, shard_bytes=shard_bytes, chunk_bytes=chunk_bytes, format=FORMAT_VERSION,
                    staging=STAGING_VERSION,
                    **({"two_level": [levels.nlist1, levels.nprobe, levels.refine_niter]} if levels else {}))
    gen = layout.generation(committed + 1)
    if loc.list_dir(gen) and not loc.exists(layout.build_marker(gen)):
        raise IndexExistsError(f"{loc.url}: {gen}/ holds files distann did not write; move them away "
                               "(distann never deletes files it did not write)")
    chunks = plan_chunks(src.n, chunk_rows)
    q = codec.quantizer
    ctx = AddContext(loc, gen, ispec.nlist, metric != "l2", q.code_dtype.str, q.code_width,
                     src.d if codec.refine else 0, backend, chunk_bytes)
    timings: dict[str, float] = {}
    names = TaskNames(f"build of {loc.url}", f"Nothing was committed: {loc.url} holds what it held before the build "
                                              "(rerun the same build to resume it)")
    t_start = time.perf_counter()
    with GenerationLease.acquire(loc, committed + 1, config.get("build.lease-seconds"),
                                 what=f"a build of {ispec} from {src.url}") as lease:
        if _committed_generation(loc, overwrite) != committed:
            raise BuildConflictError(f"{loc.url}: another build committed generation {committed + 1} while this one "
                                     "was starting; nothing was written (rerun to build on top of it)")
        with client_context(workers=workers, scheduler=scheduler, client=client) as c, names.translate(c):
            check_reachable(c, loc, "index_url", lease.path, {"source": src, "ids": ids_src})
            check_backend(c, backend)
            resumed = _resumable(loc, gen, key)
            # ---- train (or reuse the quantizer and codec of an interrupted run of the same build)
            t0 = time.perf_counter()
            if resumed and loc.exists(layout.trained_marker(gen)):
                trained = _load_trained(loc, gen)
                codec, centroids, coarse = trained["codec"], trained["centroids"], trained["quantizer"]
                objective, mse = trained["objective"], trained["mse"]
                log.info("resuming build %s: reusing the trained quantizer and codec", key)
            else:
                names.enter("sample")
                blocks, sizes, _ = collect_sample(c, src, chunks, n_sample, seed, metric == "cosine", progress,
                                                  full_scan=False)
                if ids_src is not None:
                    _check_ids(c, ids_src, chunks, progress)
                timings["sample_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                if not resumed:
                    _start_generation(loc, gen, key)
                names.enter("train (k-means)")
                km, coarse, mse = train_pipeline(c, codec, blocks, sizes, ispec.nlist, niter=niter, init=init,
                                                 seed=seed, progress=progress, backend=backend, two_level=levels)
                del blocks
                centroids, objective = km.centroids, km.objective
                _save_trained(loc, gen, codec, coarse, objective, mse)
            timings["train_s"] = time.perf_counter() - t0
            # ---- add: shard over ids
            t0 = time.perf_counter()
            cf = broadcast(c, coarse)
            pf = broadcast(c, codec)
            names.enter("add", "chunk_rows (distann.build.chunk-rows)")
            adds = names.name([c.submit(add_chunk, ctx, ch, src, ids_src, cf, pf, pure=False) for ch in chunks],
                              (f"add task of chunk {ch.name}" for ch in chunks))
            wait_all(adds, "add", progress, gather=False)  # per-chunk counts are reduced on the workers
            list_sizes, skipped_chunks, nonfinite, first_bad = tree_reduce(
                c, [c.submit(_as_counts, f, pure=False) for f in adds], _add_counts).result()
            del adds
            if nonfinite:  # nothing is merged or committed: the committed index stays as it was
                raise_if_nonfinite([ChunkScan(0, nonfinite, first_bad)])
            timings["add_s"] = time.perf_counter() - t0
            # ---- merge: shard over lists
            t0 = time.perf_counter()
            shards = plan_shards(list_sizes, q.code_size + 4 * ctx.raw_d, shard_bytes)
            # each merge task gets (n, chunk_rows), not the chunk list: its message stays O(1) in N
            names.enter("merge", "shard_bytes (distann.build.shard-bytes)")
            merges = [c.submit(merge_shard, ctx, sh, src.n, chunk_rows, pure=False) for sh in shards]
            names.name(merges, (f"merge task of shard {sh.name}" for sh in shards))
            merged = wait_all(merges, "merge", progress)
            timings["merge_s"] = time.perf_counter() - t0
        # ---- commit
        checksums = _codec_checksums(gen, codec)
        checksums[layout.centroids(gen)] = checksum([centroids])
        quantizer_section = {}
        if coarse.kind != "flat":
            arrays = {name: layout.quantizer_array(gen, name) for name in coarse.arrays()}
            quantizer_section = {**coarse.params(), "arrays": arrays}
            for name, a in coarse.arrays().items():
                checksums[arrays[name]] = checksum([np.ascontiguousarray(a)])
        checksums[layout.list_sizes(gen)] = write_small(loc.zarr_store(), layout.list_sizes(gen),
                                                        list_sizes.astype(np.int64))
        entries = []
        for sh, (ntotal, crc, _) in zip(shards, merged):
            if ntotal != sh.ntotal:
                raise IndexFormatError(f"{loc.url}: shard {sh.name} has {ntotal} vectors, planned {sh.ntotal}")
            entries.append(ShardEntry(sh.name, layout.shard(gen, sh.name), sh.list_start, sh.list_stop, ntotal, crc))
        codec_section = {**codec.params(), "mse": mse,
                         "arrays": {name: layout.codec_array(gen, name) for name in codec.arrays()}}
        manifest = Manifest(
            generation=committed + 1, build_key=key, spec=str(ispec), metric=metric, d=src.d, nlist=ispec.nlist,
            ntotal=int(src.n), codec=codec_section, centroids=layout.centroids(gen),
            list_sizes=layout.list_sizes(gen), shards=tuple(entries), checksums=checksums,
            quantizer=quantizer_section,
            build={"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": src.url,
                   "source_fingerprint": src.fingerprint, "ids": getattr(ids_src, "url", None),
                   "ids_column": getattr(ids_src, "column", None),
                   "niter": niter, "seed": seed, "init": init, "max_points_per_centroid": max_points_per_centroid,
                   "n_sample": n_sample, "two_level": _levels_record(levels), "chunk_rows": chunk_rows,
                   "shard_bytes": shard_bytes, "chunk_bytes": chunk_bytes, "backend": backend,
                   "objective": objective, "resumed_chunks": int(skipped_chunks),
                   "resumed_shards": int(sum(m[2] for m in merged)),
                   "timings": {k: round(v, 3) for k, v in timings.items()}})
        lease.check()
        _maybe_die_before_commit()
        write_manifest(loc, manifest)
        lease.commit()
    elapsed = time.perf_counter() - t_start
    log.info("committed %s: ntotal=%d d=%d nlist=%d metric=%s, %d shard(s), in %.1f s (%.0f vectors/s)",
             loc.url, src.n, src.d, ispec.nlist, metric, len(entries), elapsed, src.n / max(elapsed, 1e-9))
    _cleanup(loc, gen)
    from distann.search.index import open_index

    return open_index(loc.url, storage_options=storage_options)


def _maybe_die_before_commit() -> None:
    # Private test hook (tests/test_faults.py): DISTANN_KILL_BEFORE_COMMIT=1 makes the driver
    # SIGKILL itself with every shard written and the manifest not yet: a real kill, at the one
    # moment a signal from outside cannot be timed. Not part of any public interface.
    if os.environ.get("DISTANN_KILL_BEFORE_COMMIT") == "1":
        os.kill(os.getpid(), signal.SIGKILL)


def _check_training_size(codec: CodecPipeline, n_sample: int) -> None:
    """Enough training vectors for the codec: 2^bits per PQ sub-space (and OPQ's 256)."""
    need = 0
    if isinstance(codec.quantizer, PQQuantizer):
        need = codec.quantizer.ksub
    if any(t.kind == "OPQ" for t in codec.transforms):
        need = max(need, 256)
    if n_sample < need:
        raise ValidationError("spec", str(codec.spec), f"at least {need} training vectors (the {need} centroids "
                                                       f"of each sub-space need as many points); the source has "
                                                       f"{n_sample}")
    if n_sample < MIN_POINTS_PER_CENTROID * need:
        warnings.warn(f"{codec.spec}: {n_sample} training vectors for {need} centroids per sub-space is fewer than "
                      f"{MIN_POINTS_PER_CENTROID} per centroid; the codebooks may be poor", TrainingWarning,
                      stacklevel=3)


def _save_trained(loc: Location, gen: str, codec: CodecPipeline, coarse: FlatQuantizer, objective: list,
                  mse: float) -> None:
    """The trained coarse quantizer and codec, then their DONE marker (the resume point)."""
    store = loc.zarr_store()
    write_small(store, layout.centroids(gen), coarse.centroids)
    for name, array in coarse.arrays().items():
        write_small(store, layout.quantizer_array(gen, name), array)
    for name, array in codec.arrays().items():
        write_small(store, layout.codec_array(gen, name), array)
    loc.write_json(layout.trained_marker(gen), {"objective": objective, "mse": mse, "codec": codec.params(),
                                                "quantizer": coarse.params()})


def _load_trained(loc: Location, gen: str) -> dict:
    store = CheckedStore(loc.zarr_store(read_only=True), loc.url)
    done = loc.read_json(layout.trained_marker(gen))
    codec = CodecPipeline.load(done["codec"], lambda name: StoredArray(store, layout.codec_array(gen, name)).read())
    centroids = StoredArray(store, layout.centroids(gen)).read()
    coarse = load_quantizer(done.get("quantizer", {}), centroids,
                            lambda name: StoredArray(store, layout.quantizer_array(gen, name)).read())
    return {"codec": codec, "centroids": centroids, "quantizer": coarse, "objective": done["objective"],
            "mse": done["mse"]}


def _check_levels(nlist: int, n_sample: int, two_level: object, nlist1: object, quantizer_nprobe: object,
                  refine_niter: object) -> TwoLevel | None:
    """The two-level parameters of a build (None: one-level k-means, exact quantizer), checked."""
    if two_level is not None:
        check_bool("two_level", two_level)
    use = nlist >= TWO_LEVEL_NLIST if two_level is None else two_level
    if refine_niter is not None:
        check_nonnegative_int("refine_niter", refine_niter)
    if not use:
        for name, value in (("nlist1", nlist1), ("quantizer_nprobe", quantizer_nprobe),
                            ("refine_niter", refine_niter)):
            if value is not None:
                raise ValidationError(name, value, f"None unless the build uses a two-level k-means (two_level=True, "
                                                   f"or nlist >= {TWO_LEVEL_NLIST}; this build has nlist {nlist})")
        return None
    nlist1, nprobe = check_two_level(nlist, nlist1, n_sample, quantizer_nprobe)
    return TwoLevel(nlist1, nprobe, DEFAULT_REFINE_NITER if refine_niter is None else int(refine_niter))


def _levels_record(levels: TwoLevel | None) -> dict | None:
    if levels is None:
        return None
    return {"nlist1": levels.nlist1, "quantizer_nprobe": levels.nprobe, "refine_niter": levels.refine_niter}


def _codec_checksums(gen: str, codec: CodecPipeline) -> dict[str, str]:
    return {layout.codec_array(gen, name): checksum([np.ascontiguousarray(a)]) for name, a in codec.arrays().items()}


def _as_counts(result) -> tuple[np.ndarray, int, int, int]:
    counts, skipped, nonfinite, first_bad = result
    return counts.astype(np.int64), int(skipped), int(nonfinite), int(first_bad)


def _committed_generation(loc: Location, overwrite: bool) -> int:
    """Generation number of the committed index at ``loc`` (0 if none); refuse it unless overwrite."""
    if not manifest_exists(loc):
        return 0
    try:
        manifest = read_manifest(loc)
    except IndexFormatError as exc:
        if not overwrite:
            raise IndexExistsError(f"{loc.url}: holds an unreadable index ({exc}); pass overwrite=True "
                                   "(--overwrite) to replace it") from exc
        return max([int(n[1:]) for n in _generations(loc)] or [0])
    if not overwrite:
        raise IndexExistsError(f"{loc.url}: an index is already committed there ({manifest.ntotal} vectors, "
                               f"{manifest.spec}); pass overwrite=True (--overwrite) to replace it")
    return manifest.generation


def _check_destination(loc: Location, overwrite: bool) -> None:
    """The index URL is a folder (or nothing yet) holding nothing but distann's files, unless
    ``overwrite`` allows building among other files (which distann never deletes)."""
    if loc.fs.isfile(loc.root):
        raise ValidationError("index_url", loc.url, "the folder of an index (a Zarr group); this is an existing file")
    foreign = [n for n in loc.list_dir("") if not _is_ours(loc, n)]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise IndexExistsError(f"{loc.url}: a folder holding files that are not a distann index ({shown}); "
                               "choose an empty or new folder, or pass overwrite=True (--overwrite) to build "
                               "beside them (distann never deletes files it did not write)")


def _is_ours(loc: Location, name: str) -> bool:
    """Whether ``name`` at the root of an index folder is something a distann build writes."""
    if name in ("zarr.json", MANIFEST_PATH, LEASE_DIR, READERS_DIR) or name.startswith(f"{MANIFEST_PATH}.tmp-"):
        return True
    return bool(layout.GENERATION.fullmatch(name)) and loc.exists(layout.build_marker(name))


def _generations(loc: Location) -> list[str]:
    """The generation folders a distann build wrote at ``loc`` (writers may list; readers never do)."""
    return [n for n in loc.list_dir("") if layout.GENERATION.fullmatch(n) and loc.exists(layout.build_marker(n))]


def _resumable(loc: Location, gen: str, key: str) -> bool:
    """True when generation ``gen`` holds an interrupted run of the same build."""
    marker = layout.build_marker(gen)
    return loc.exists(marker) and loc.read_json(marker).get("build_key") == key


def _start_generation(loc: Location, gen: str, key: str) -> None:
    """Clear what an interrupted, different build left in ``gen`` (checked to be distann's
    before the lease was taken) and mark it as ours."""
    loc.remove(gen)
    loc.write_json(layout.build_marker(gen),
                   {"build_key": key, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _cleanup(loc: Location, gen: str) -> None:
    """After commit: staging is garbage, and so is every older generation but the one just
    replaced and those a live reader lease holds (the retention rule of ``store.readers``).
    Newer generation folders belong to builds started after this commit and are left alone."""
    loc.remove(layout.staging(gen))
    n = int(gen[1:])
    held = held_generations(loc)
    for name in _generations(loc):
        g = int(name[1:])
        if g < n - 1 and g not in held:
            loc.remove(name)
    remove_older(loc, n)


def _check_ids(client, ids_src, chunks: tuple[ChunkTask, ...], progress: bool) -> None:
    """Ids must be >= 0 and unique: per-chunk checks, then a distributed range-partitioned
    duplicate search only when chunk id ranges overlap."""
    futs = [client.submit(scan_ids, ids_src, ch.start, ch.stop, pure=False) for ch in chunks]
    stats = [r[0] for r in wait_all(futs, "ids", progress)]
    nneg = sum(s["neg"] for s in stats)
    if nneg:
        first = min(s["first_neg"] for s in stats if s["neg"])
        raise ValidationError("ids", f"{nneg} negative id(s), first at row {first}", "ids >= 0")
    ranges = sorted((s["min"], s["max"]) for s in stats if s["max"] >= s["min"])
    overlap = any(b[0] <= a[1] for a, b in zip(ranges, ranges[1:]))
    if not overlap and not any(s["dup"] for s in stats):
        return
    qs = np.sort(np.concatenate([s["quantiles"] for s in stats]))
    bounds = np.unique(qs[np.linspace(0, len(qs) - 1, len(chunks) + 1).astype(int)[1:-1]])
    sorted_f = [client.submit(operator.getitem, f, 1, pure=False) for f in futs]
    pieces = [client.submit(split_sorted, f, bounds, pure=False) for f in sorted_f]
    buckets = [client.submit(first_duplicate, *[client.submit(operator.getitem, p, b, pure=False) for p in pieces],
                             pure=False) for b in range(len(bounds) + 1)]
    found = [r for r in client.gather(buckets) if r[0]]
    if found:
        raise ValidationError("ids", f"{sum(r[0] for r in found)} duplicate id(s), e.g. {found[0][1]}",
                              "unique ids (each id at most once)")
