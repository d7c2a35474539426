"""``Index``: an opened, committed index, and its list-major search.

Search of a batch: coarse quantization (one GEMM, top-nprobe), then the (query, probe) pairs
are grouped by list (``search.plan``), each probed list is read once for the whole batch and
scanned against all of its queries as one block by the kernel backend, and the per-probe
partial top-k are merged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from distann import config
from distann.codecs import make_codec
from distann.codecs.metric import for_metric, kernel_metric
from distann.errors import IndexFormatError, ValidationError
from distann.kernels import get_backend
from distann.search.lists import ListStore
from distann.search.plan import ProbePlan, expand_to_all_lists, plan_probes
from distann.validation import (check_ids_allowed, check_k, check_max_codes, check_nprobe, check_queries,
                                check_radius, ids_mask)
from distann.store.arrays import CheckedStore, StoredArray, checksum
from distann.store.location import Location
from distann.store.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchParams:
    """Defaults used when a search call leaves a parameter out."""

    k: int = 10
    nprobe: int = 1
    max_codes: int | None = None
    ids_allowed: Any = None


def open_index(url: str, *, storage_options: dict | None = None, cache_bytes: int | None = None) -> "Index":
    """Open the committed index at ``url`` (IndexFormatError if there is none or it is unreadable)."""
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValidationError("url", url, "a non-empty path or URL of an index")
    loc = Location(url, dict(storage_options or {}))
    return Index(loc, read_manifest(loc), cache_bytes=cache_bytes)


class Index:
    """A committed IVF index. Open with :func:`open_index`; ``distann.build`` returns one."""

    def __init__(self, loc: Location, manifest: Manifest, *, cache_bytes: int | None = None):
        self.loc = loc
        self.manifest = manifest
        self.codec = make_codec(manifest.codec["name"], manifest.d)
        if not manifest.stores_every_chunk:
            log.warning("%s: index format version %d does not store all-zero chunks, so a lost chunk file "
                        "reads as zeros; Index.verify() detects it, a rebuild upgrades the format",
                        loc.url, manifest.format_version)
        self.store = CheckedStore(loc.zarr_store(read_only=True), loc.url, strict=manifest.stores_every_chunk)
        self.centroids = np.ascontiguousarray(StoredArray(self.store, manifest.centroids).read(), dtype=np.float32)
        self.list_sizes = StoredArray(self.store, manifest.list_sizes).read().astype(np.int64)
        if self.centroids.shape != (manifest.nlist, manifest.d) or self.list_sizes.shape != (manifest.nlist,) \
                or int(self.list_sizes.sum()) != manifest.ntotal:
            raise IndexFormatError(f"{loc.url}: quantizer arrays do not match the manifest (corrupt index)")
        if cache_bytes is None:
            cache_bytes = config.get("search.cache-bytes")
        self.lists = ListStore(self.store, manifest, self.codec, self.list_sizes, cache_bytes)
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
            "codec": self.manifest.codec, "code_size": self.codec.code_size,
            "list_sizes": {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(mean),
                           "empty": int((sizes == 0).sum()),
                           "imbalance": float((sizes.astype(np.float64) ** 2).sum() * len(sizes) / max(1, sizes.sum()) ** 2)},
            "build": self.manifest.build,
        }

    def set_defaults(self, **params: Any) -> "Index":
        """Set search defaults (k, nprobe, max_codes, ids_allowed) used when a call omits them."""
        unknown = set(params) - set(SearchParams.__dataclass_fields__)
        if unknown:
            raise ValidationError(sorted(unknown)[0], params[sorted(unknown)[0]],
                                  f"one of {sorted(SearchParams.__dataclass_fields__)}")
        merged = replace(self.defaults, **params)
        check_ids_allowed(merged.ids_allowed)
        check_k(merged.k)
        check_nprobe(merged.nprobe, self.nlist)
        check_max_codes(merged.max_codes)
        self.defaults = merged
        return self

    def load(self) -> "Index":
        """Load every list into memory once (resident mode): later searches read nothing."""
        self.lists.load_all()
        return self

    def verify(self) -> dict[str, int]:
        """Read every array the manifest names, chunk by chunk, and check each against its
        checksum: the quantizer and codec arrays, then every shard (offsets, ids, codes).

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
            offsets, codes, ids = self.lists.shard_arrays(s)
            parts = (offsets, ids.read(), codes.read())
            self._compare(f"shard {entry.name}", checksum(parts), entry.checksum)
            report["shards"] += 1
            report["bytes"] += sum(p.nbytes for p in parts)
        return report

    def _compare(self, what: str, got: str, expected: str | None) -> None:
        if expected is not None and got != expected:
            raise IndexFormatError(f"{self.url}: {what}: checksum {got} != manifest {expected}; the index is corrupt")

    # ------------------------------------------------------------------ search
    def _prepare(self, xq, nprobe, max_codes, ids_allowed, backend):
        xq = check_queries(xq, self.d)
        nprobe = check_nprobe(self.defaults.nprobe if nprobe is None else nprobe, self.nlist)
        max_codes = check_max_codes(self.defaults.max_codes if max_codes is None else max_codes)
        allowed = self.defaults.ids_allowed if ids_allowed is None else ids_allowed
        check_ids_allowed(allowed)
        kern = get_backend(backend or config.get("kernels.backend"))
        xq = for_metric(xq, self.metric)
        return xq, nprobe, max_codes, allowed, kern

    def _batches(self, nq: int, per_query_bytes: int = 0):
        """Query ranges of at most ``search.batch-size`` queries, fewer when the per-probe
        partial results (``per_query_bytes`` a query) would pass 256 MiB."""
        step = int(config.get("search.batch-size"))
        if per_query_bytes:
            step = max(1, min(step, (256 << 20) // per_query_bytes))
        for s in range(0, nq, step):
            yield s, min(nq, s + step)

    def _lists_for(self, plan: ProbePlan, allowed):
        """(xb, ids, list_offsets, centers, group_offsets, valid) for the kernels."""
        if self.lists.resident is None and self.lists.cache_bytes >= self.lists.nbytes > 0:
            self.lists.load_all()
        if self.lists.resident is not None:
            xb, ids, offsets = self.lists.resident
            centers, groups = self.centroids, expand_to_all_lists(plan, self.nlist)
        else:
            xb, ids, offsets = self.lists.fetch(plan.lists)
            centers, groups = np.ascontiguousarray(self.centroids[plan.lists]), plan.group_offsets
        valid = ids_mask(ids, allowed) if allowed is not None else np.empty(0, np.uint8)
        return xb, ids, offsets, centers, groups, valid

    def search(self, xq, k: int | None = None, nprobe: int | None = None, *, max_codes: int | None = None,
               ids_allowed=None, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours of each query row: ``(D, I)`` float32 / int64 of shape (nq, k).

        Best first; padded with id -1 and +inf (l2) or -inf (ip, cosine) when fewer than k
        vectors are reachable. ``nprobe`` lists are scanned per query (1 <= nprobe <= nlist, an
        error otherwise: distann never clamps silently); ``max_codes`` caps the vectors scanned
        per query; ``ids_allowed`` (int array of ids, or a bool array indexed by id) restricts
        the results to those ids.
        """
        k = check_k(self.defaults.k if k is None else k)
        xq, nprobe, max_codes, allowed, kern = self._prepare(xq, nprobe, max_codes, ids_allowed, backend)
        kmetric = kernel_metric(self.metric)
        nq = len(xq)
        D = np.empty((nq, k), dtype=np.float32)
        I = np.empty((nq, k), dtype=np.int64)
        for s, e in self._batches(nq, per_query_bytes=nprobe * k * 12):  # (nprobe, k) float32 + int64
            q = np.ascontiguousarray(xq[s:e])
            _, probes = kern.coarse_quantize(q, self.centroids, nprobe, kmetric)
            plan = plan_probes(probes, self.list_sizes, max_codes)
            xb, ids, offsets, centers, groups, valid = self._lists_for(plan, allowed)
            Dp, Ip = kern.scan_lists(q, xb, ids, offsets, centers, groups, plan.group_queries, plan.group_slots,
                                     plan.group_limits, valid, nprobe, k, kmetric)
            D[s:e], I[s:e] = kern.merge_topk(Dp.reshape(len(q), -1), Ip.reshape(len(q), -1), k, kmetric)
        return D, I

    def range_search(self, xq, radius: float, nprobe: int | None = None, *, max_codes: int | None = None,
                     ids_allowed=None, backend: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All vectors within ``radius`` of each query, in the Faiss convention ``(lims, D, I)``.

        l2: squared distance < radius (as Faiss; radius >= 0); ip / cosine: similarity > radius.
        Results of query i are ``D[lims[i]:lims[i+1]]``, best first.
        """
        radius = check_radius(radius, self.metric)
        xq, nprobe, max_codes, allowed, kern = self._prepare(xq, nprobe, max_codes, ids_allowed, backend)
        kmetric = kernel_metric(self.metric)
        lims_parts, D_parts, I_parts, base = [np.zeros(1, np.int64)], [], [], 0
        for s, e in self._batches(len(xq)):
            q = np.ascontiguousarray(xq[s:e])
            _, probes = kern.coarse_quantize(q, self.centroids, nprobe, kmetric)
            plan = plan_probes(probes, self.list_sizes, max_codes)
            xb, ids, offsets, centers, groups, valid = self._lists_for(plan, allowed)
            lims, Dr, Ir = kern.range_scan_lists(q, xb, ids, offsets, centers, groups, plan.group_queries,
                                                 plan.group_limits, valid, radius, kmetric)
            lims_parts.append(lims[1:] + base)
            base += int(lims[-1])
            D_parts.append(Dr)
            I_parts.append(Ir)
        cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.empty(0, dt)  # noqa: E731
        return np.concatenate(lims_parts), cat(D_parts, np.float32), cat(I_parts, np.int64)
