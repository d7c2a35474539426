"""``Index``: an opened, committed index, and its local list-major search.

``Index`` is a thin facade over the engine (``search.engine``): it validates the call, cuts the
queries into batches, prepares each batch (metric transform, pre-transforms, coarse
quantization, probes grouped by list), reads the probed lists as stored (``search.lists``)
and hands everything to the engine, which scans with the codec's kernels and merges.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from distann import config
from distann.codecs.coarse import load_quantizer
from distann.codecs.metric import kernel_metric
from distann.codecs.pipeline import CodecPipeline
from distann.errors import IndexFormatError, ValidationError
from distann.kernels import get_backend
from distann.search import engine
from distann.search.lists import ListStore
from distann.search.plan import ProbePlan, expand_to_all_lists, plan_probes, shard_runs
from distann.store.arrays import CheckedStore, StoredArray, checksum
from distann.store.location import Location
from distann.store.manifest import Manifest, read_manifest
from distann.validation import (check_ids_allowed, check_k, check_max_codes, check_nonnegative_int, check_nprobe,
                                check_positive_int, check_queries, check_radius, check_result_size, check_url,
                                ids_mask, is_int)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchParams:
    """Defaults used when a search call leaves a parameter out (``k_factor``: RFlat re-ranks the
    best ``k_factor * k`` candidates)."""

    k: int = 10
    nprobe: int = 1
    max_codes: int | None = None
    ids_allowed: Any = None
    k_factor: int = 4


def open_index(url: str, *, storage_options: dict | None = None, cache_bytes: int | str | None = None,
               client=None, replicas: int = 1):
    """Open the committed index at ``url`` (IndexFormatError if there is none or it is unreadable).

    ``cache_bytes``: memory for lists read by searches (default ``distann.search.cache-bytes``,
    ``"auto"``: 1/8 of the machine's memory; 0: none). An index that fits is loaded whole at its
    first search; a larger one keeps its most recently searched lists.

    ``client`` (a ``distributed.Client``): serve the index from that cluster instead: its shards
    are loaded into the workers' memory (``replicas`` copies of each on distinct workers) and a
    :class:`~distann.search.distributed.DistributedIndex` is returned once they are resident.
    """
    if cache_bytes is not None and cache_bytes != "auto":
        check_nonnegative_int("cache_bytes", cache_bytes)
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValidationError("url", url, "a non-empty path or URL of an index")
    check_url("url", url, storage_options)
    if client is not None:
        from distann.search.distributed import DistributedIndex, _check_client

        _check_client(client)
        check_positive_int("replicas", replicas)
    elif not (is_int(replicas) and replicas == 1):
        raise ValidationError("replicas", replicas, "1 unless client is given (copies live on cluster workers)")
    loc = Location(url, dict(storage_options or {}))
    if client is None:
        return Index(loc, read_manifest(loc), cache_bytes=cache_bytes)
    return DistributedIndex(Index(loc, read_manifest(loc), cache_bytes=0), client, replicas=replicas)


def read_codec(store: CheckedStore, manifest: Manifest, url: str) -> CodecPipeline:
    """The trained codec pipeline of a committed index, from its manifest and codec arrays."""
    section = manifest.codec
    if "spec" not in section:  # format versions 1 and 2: Flat, no transforms
        return CodecPipeline.create(manifest.spec, manifest.d, manifest.metric)
    arrays = section.get("arrays", {})
    try:
        return CodecPipeline.load(section, lambda name: StoredArray(store, arrays[name]).read())
    except KeyError as exc:
        raise IndexFormatError(f"{url}: the manifest names no codec array {exc}") from None


def read_quantizer(store, manifest: Manifest, centroids: np.ndarray, url: str):
    """The coarse quantizer of a committed index (``codecs.coarse``): exact unless the manifest
    names another kind."""
    section = manifest.quantizer
    arrays = section.get("arrays", {})
    try:
        return load_quantizer(section, centroids, lambda name: StoredArray(store, arrays[name]).read())
    except KeyError as exc:
        raise IndexFormatError(f"{url}: the manifest names no quantizer array {exc}") from None
    except ValueError as exc:
        raise IndexFormatError(f"{url}: {exc} (corrupt index)") from None


def raw_centers(codec: CodecPipeline, centers: np.ndarray) -> np.ndarray | None:
    """Coarse centroids mapped back to the original space (RFlat range search centres on them);
    None for other codecs."""
    if not codec.refine:
        return None
    y = centers
    for t in reversed(codec.transforms):
        y = t.reverse(y)
    return np.ascontiguousarray(y, dtype=np.float32)


class Index:
    """A committed IVF index. Open with :func:`open_index`; ``distann.build`` returns one."""

    def __init__(self, loc: Location, manifest: Manifest, *, cache_bytes: int | None = None):
        self.loc = loc
        self.manifest = manifest
        if not manifest.stores_every_chunk:
            log.warning("%s: index format version %d does not store all-zero chunks, so a lost chunk file "
                        "reads as zeros; Index.verify() detects it, a rebuild upgrades the format",
                        loc.url, manifest.format_version)
        self.store = CheckedStore(loc.zarr_store(read_only=True), loc.url, strict=manifest.stores_every_chunk)
        self.codec = read_codec(self.store, manifest, loc.url)
        self.centroids = np.ascontiguousarray(StoredArray(self.store, manifest.centroids).read(), dtype=np.float32)
        self.list_sizes = StoredArray(self.store, manifest.list_sizes).read().astype(np.int64)
        if self.centroids.shape != (manifest.nlist, self.codec.d_ivf) or self.list_sizes.shape != (manifest.nlist,) \
                or int(self.list_sizes.sum()) != manifest.ntotal:
            raise IndexFormatError(f"{loc.url}: quantizer arrays do not match the manifest (corrupt index)")
        self.quantizer = read_quantizer(self.store, manifest, self.centroids, loc.url)
        if cache_bytes is None:
            cache_bytes = config.get("search.cache-bytes")
        if cache_bytes == "auto":
            import psutil

            cache_bytes = psutil.virtual_memory().total // 8
        row_bytes = self.codec.code_size + 8 + (4 * self.d if self.codec.refine else 0)
        self.lists = ListStore(self.store, manifest, self.list_sizes, row_bytes, cache_bytes, raw=self.codec.refine)
        self.defaults = SearchParams()

    # ------------------------------------------------------------------ description
    url = property(lambda self: self.loc.url)
    ntotal = property(lambda self: self.manifest.ntotal)
    d = property(lambda self: self.manifest.d)
    nlist = property(lambda self: self.manifest.nlist)
    metric = property(lambda self: self.manifest.metric)
    spec = property(lambda self: self.manifest.spec)

    def __repr__(self) -> str:
        return f"<distann.Index {self.spec} metric={self.metric} ntotal={self.ntotal} d={self.d} at {self.url}>"

    def info(self) -> dict[str, Any]:
        """A JSON-able summary of the index."""
        sizes = self.list_sizes
        mean = sizes.mean() if len(sizes) else 0.0
        return {
            "url": self.url, "spec": self.spec, "metric": self.metric, "d": self.d, "nlist": self.nlist,
            "ntotal": self.ntotal, "format_version": self.manifest.format_version,
            "generation": self.manifest.generation, "shards": len(self.manifest.shards),
            "codec": {k: v for k, v in self.manifest.codec.items() if k != "arrays"},
            "quantizer": self.quantizer.params(),
            "code_size": self.codec.code_size, "bytes_in_memory": self.lists.nbytes,
            "list_sizes": {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(mean),
                           "empty": int((sizes == 0).sum()),
                           "imbalance": float((sizes.astype(np.float64) ** 2).sum() * len(sizes) / max(1, sizes.sum()) ** 2)},
            "build": self.manifest.build,
        }

    def set_defaults(self, **params: Any) -> "Index":
        """Set search defaults (k, nprobe, max_codes, ids_allowed, k_factor) used when a call omits them."""
        unknown = set(params) - set(SearchParams.__dataclass_fields__)
        if unknown:
            raise ValidationError(sorted(unknown)[0], params[sorted(unknown)[0]],
                                  f"one of {sorted(SearchParams.__dataclass_fields__)}")
        merged = replace(self.defaults, **params)
        check_ids_allowed(merged.ids_allowed)
        check_k(merged.k)
        check_nprobe(merged.nprobe, self.nlist)
        check_max_codes(merged.max_codes)
        check_positive_int("k_factor", merged.k_factor)
        self.defaults = merged
        return self

    def load(self) -> "Index":
        """Load every list into memory once (resident mode, as stored): later searches read nothing."""
        self.lists.load_all()
        return self

    def verify(self) -> dict[str, int]:
        """Read every array the manifest names, chunk by chunk, and check each against its
        checksum: the quantizer and codec arrays, then every shard (offsets, ids, codes, raw).

        Raises IndexFormatError naming the first array or chunk that is missing, truncated or
        altered; returns what was checked: ``{"arrays": ..., "shards": ..., "bytes": ...}``.
        """
        report = {"arrays": 0, "shards": 0, "bytes": 0}
        for path in dict.fromkeys((self.manifest.centroids, self.manifest.list_sizes, *self.manifest.checksums)):
            data = StoredArray(self.store, path).read()
            self._compare(path, checksum([data]), self.manifest.checksums.get(path))
            report["arrays"] += 1
            report["bytes"] += data.nbytes
        for s, entry in enumerate(self.manifest.shards):
            got, nbytes = self.lists.shard(s).checksum()
            self._compare(f"shard {entry.name}", got, entry.checksum)
            report["shards"] += 1
            report["bytes"] += nbytes
        return report

    def _compare(self, what: str, got: str, expected: str | None) -> None:
        if expected is not None and got != expected:
            raise IndexFormatError(f"{self.url}: {what}: checksum {got} != manifest {expected}; the index is corrupt")

    def reconstruct(self, ids) -> np.ndarray:
        """The stored (decoded) vectors of ``ids``, in the original space (normalized for cosine;
        approximate for compressed codecs and dimension-reducing transforms). Reads the whole
        index once (resident mode) to find the ids."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValidationError("ids", f"array of dtype {ids.dtype}, shape {ids.shape}", "a 1-D array of int ids")
        block = self.lists.load_all()
        order = np.argsort(block.ids, kind="stable")
        pos = np.searchsorted(block.ids[order], ids)
        found = (pos < len(order)) & (block.ids[order][np.minimum(pos, len(order) - 1)] == ids)
        if not found.all():
            raise ValidationError("ids", f"{int((~found).sum())} id(s) not in the index, e.g. {ids[~found][0]}",
                                  "ids of vectors in the index")
        rows = order[pos]
        if self.codec.refine:
            return np.ascontiguousarray(block.raw[rows])
        assign = np.searchsorted(block.offsets, rows, side="right") - 1
        return self.codec.reconstruct(block.codes[rows], assign, self.centroids)

    # ------------------------------------------------------------------ search
    def _prepare(self, xq, nprobe, max_codes, ids_allowed, backend):
        xq = check_queries(xq, self.d)
        nprobe = check_nprobe(self.defaults.nprobe if nprobe is None else nprobe, self.nlist)
        max_codes = check_max_codes(self.defaults.max_codes if max_codes is None else max_codes)
        allowed = self.defaults.ids_allowed if ids_allowed is None else ids_allowed
        check_ids_allowed(allowed)
        kern = get_backend(backend or config.get("kernels.backend"))
        xq_raw = self.codec.raw(xq)
        return xq_raw, self.codec.transform(xq_raw), nprobe, max_codes, allowed, kern

    def _batches(self, nq: int, per_query_bytes: int = 0):
        """Query ranges of at most ``search.batch-size`` queries, fewer when the per-probe
        partial results (``per_query_bytes`` a query) would pass 256 MiB."""
        step = int(config.get("search.batch-size"))
        if per_query_bytes:
            step = max(1, min(step, (256 << 20) // per_query_bytes))
        for s in range(0, nq, step):
            yield s, min(nq, s + step)

    def _resident(self) -> bool:
        """Whether the lists are in memory (loading them if the cache covers the whole index)."""
        if self.lists.resident is None and self.lists.cache_bytes >= self.lists.nbytes > 0:
            self.lists.load_all()
        return self.lists.resident is not None

    def _lists_for(self, plan: ProbePlan, allowed):
        """(block, centers of its lists, probes grouped by its lists, valid mask) for the engine:
        every probed list of the batch in one block."""
        if self._resident():
            block = self.lists.resident
            centers, groups = self.centroids, expand_to_all_lists(plan, self.nlist)
        else:
            block = self.lists.fetch(plan.lists)
            centers, groups = np.ascontiguousarray(self.centroids[plan.lists]), plan.group_offsets
        valid = ids_mask(block.ids, allowed)
        probes = engine.Probes(groups, plan.group_queries, plan.group_slots, plan.group_limits)
        return block, centers, probes, valid

    def _shard_blocks(self, plan: ProbePlan, allowed):
        """The probed lists of a batch shard by shard, as (block, centers, probes, valid), the
        next shard read in a background thread while the caller scans the current one: a
        streamed batch costs about max(read, scan) and holds two shards' probed lists at most."""
        bounds = [(a, b) for _, a, b in shard_runs(plan.lists, self.lists.shard_starts)]

        def read(a: int, b: int):
            lists = plan.lists[a:b]
            block = self.lists.fetch(lists)
            g0, g1 = plan.group_offsets[a], plan.group_offsets[b]
            probes = engine.Probes(plan.group_offsets[a:b + 1] - g0, plan.group_queries[g0:g1],
                                   plan.group_slots[g0:g1], plan.group_limits[g0:g1])
            valid = ids_mask(block.ids, allowed)
            return block, np.ascontiguousarray(self.centroids[lists]), probes, valid

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="distann-prefetch") as pool:
            pending = pool.submit(read, *bounds[0]) if bounds else None
            for nxt in bounds[1:] + [None]:
                current = pending.result()
                pending = pool.submit(read, *nxt) if nxt is not None else None
                yield current

    def _coarse(self, kern, q: np.ndarray, nprobe: int, max_codes: int | None) -> ProbePlan:
        _, probes = self.quantizer.search(q, nprobe, kernel_metric(self.metric), kern)
        return plan_probes(probes, self.list_sizes, max_codes)

    def search(self, xq, k: int | None = None, nprobe: int | None = None, *, max_codes: int | None = None,
               ids_allowed=None, k_factor: int | None = None,
               backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours of each query row: ``(D, I)`` float32 / int64 of shape (nq, k).

        Best first; padded with id -1 and +inf (l2) or -inf (ip, cosine) when fewer than k
        vectors are reachable. ``nprobe`` lists are scanned per query (1 <= nprobe <= nlist, an
        error otherwise: distann never clamps silently); ``max_codes`` caps the vectors scanned
        per query; ``ids_allowed`` (int array of ids, or a bool array indexed by id) restricts
        the results to those ids; ``k_factor`` (RFlat indexes) re-ranks the best
        ``k_factor * k`` candidates with the raw vectors.
        """
        k = check_k(self.defaults.k if k is None else k)
        k_factor = check_positive_int("k_factor", self.defaults.k_factor if k_factor is None else k_factor)
        xq_raw, xq, nprobe, max_codes, allowed, kern = self._prepare(xq, nprobe, max_codes, ids_allowed, backend)
        kc = k * k_factor if self.codec.refine else k
        nq = len(xq)
        check_result_size(k, nq * k + nprobe * kc)  # the results, and one query's partials at least
        D = np.empty((nq, k), dtype=np.float32)
        I = np.empty((nq, k), dtype=np.int64)
        kmetric = kernel_metric(self.metric)
        for s, e in self._batches(nq, per_query_bytes=nprobe * kc * 12):  # (nprobe, k') float32 + int64
            q = np.ascontiguousarray(xq[s:e])
            plan = self._coarse(kern, q, nprobe, max_codes)
            if self._resident() or self.codec.refine:  # RFlat re-ranks by row of one block
                block, centers, probes, valid = self._lists_for(plan, allowed)
                D[s:e], I[s:e] = engine.knn(kern, self.codec, q, block, centers, probes, valid, nprobe, k,
                                            xq_raw=xq_raw[s:e], k_factor=k_factor)
                continue
            out = engine.partials(len(q), nprobe, k, kmetric)
            for block, centers, probes, valid in self._shard_blocks(plan, allowed):
                engine.scan(kern, self.codec, q, block, centers, probes, valid, nprobe, k, out=out)
            D[s:e], I[s:e] = kern.merge_topk(out[0].reshape(len(q), -1), out[1].reshape(len(q), -1), k, kmetric)
        return D, I

    def range_search(self, xq, radius: float, nprobe: int | None = None, *, max_codes: int | None = None,
                     ids_allowed=None, backend: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All vectors within ``radius`` of each query, in the Faiss convention ``(lims, D, I)``.

        l2: squared distance < radius (as Faiss; radius >= 0); ip / cosine: similarity > radius.
        Results of query i are ``D[lims[i]:lims[i+1]]``, best first. Distances are those of the
        codec (to the reconstructed vectors); RFlat indexes answer with exact distances.
        """
        radius = check_radius(radius, self.metric)
        xq_raw, xq, nprobe, max_codes, allowed, kern = self._prepare(xq, nprobe, max_codes, ids_allowed, backend)
        lims_parts, D_parts, I_parts, base = [np.zeros(1, np.int64)], [], [], 0
        for s, e in self._batches(len(xq)):
            q = np.ascontiguousarray(xq[s:e])
            plan = self._coarse(kern, q, nprobe, max_codes)
            block, centers, probes, valid = self._lists_for(plan, allowed)
            lims, Dr, Ir = engine.range_search(kern, self.codec, q, block, centers, probes, valid, radius,
                                               xq_raw=xq_raw[s:e], raw_centers=raw_centers(self.codec, centers))
            lims_parts.append(lims[1:] + base)
            base += int(lims[-1])
            D_parts.append(Dr)
            I_parts.append(Ir)
        cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.empty(0, dt)  # noqa: E731
        return np.concatenate(lims_parts), cat(D_parts, np.float32), cat(I_parts, np.int64)
