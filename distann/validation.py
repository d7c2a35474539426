"""Checks at the API boundary: each error names the parameter, the value received and what is
allowed (:class:`~distann.errors.ValidationError`). Every module validates through these, so a
rule and its message are written once.
"""

from __future__ import annotations

import numpy as np

from distann.errors import ValidationError

#: distances an index can use: l2 (squared Euclidean), ip (inner product), cosine (ip on
#: L2-normalized vectors)
METRICS = ("l2", "ip", "cosine")

#: k-means initializations: random (k distinct sample points, as Faiss), k-means++, k-means||
INITS = ("k-means||", "k-means++", "random")


def is_int(v: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_bool(param: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(param, value, "True or False")
    return value


def check_positive_int(param: str, value: object) -> int:
    if not is_int(value) or value < 1:
        raise ValidationError(param, value, "a positive integer")
    return int(value)


def check_nonnegative_int(param: str, value: object) -> int:
    if not is_int(value) or value < 0:
        raise ValidationError(param, value, "a non-negative integer")
    return int(value)


def check_choice(param: str, value: object, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValidationError(param, value, f"one of {list(options)}")
    return value


def check_metric(metric: object) -> str:
    return check_choice("metric", metric, METRICS)


#: the dtypes queries may have, in the API and on the command line alike (float64 is converted)
QUERY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_query_dtype(dtype: object, param: str, received: object) -> None:
    """Queries are float32 or float64; any other dtype is refused, never cast silently."""
    if np.dtype(dtype) not in QUERY_DTYPES:
        raise ValidationError(param, received, "float32 (or float64) queries; convert other dtypes explicitly")


def check_queries(xq: object, d: int, param: str = "xq") -> np.ndarray:
    """A C-contiguous float32 (nq, d) array. float32 and float64 are accepted (float64 is
    converted, as every float index does); other dtypes, other shapes and NaN/Inf are refused,
    also values finite in float64 that overflow float32 (they would become Inf)."""
    if isinstance(xq, np.ndarray):
        arr = xq
    else:
        try:  # nested lists convert; ragged ones do not
            arr = np.asarray(xq)
        except (ValueError, TypeError) as exc:
            raise ValidationError(param, type(xq).__name__, f"a 2-D float32 array (nq, {d}) ({exc})") from None
    check_query_dtype(arr.dtype, param, f"array of dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != d:
        raise ValidationError(param, f"array of shape {arr.shape}",
                              f"a 2-D array of shape (nq, {d}) (for one query use xq[None, :])")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValidationError(param, f"{int((~finite).sum())} NaN/Inf value(s) (in float32), first in query row "
                                    f"{bad_rows[0]}", "finite query vectors within the float32 range")
    return out


#: results below this many bytes are not weighed against free memory: asking the OS costs about
#: 45 us, a sizeable part of a single-query search on a resident index (about 150 us)
_SMALL_RESULTS_BYTES = 64 << 20


def check_result_size(k: int, results: int) -> None:
    """Refuse a ``k`` for which ``results`` (distance, id) pairs (the (nq, k) answer plus the
    partial results the search holds at once) cannot fit in this machine's free memory: a
    ValidationError naming k, instead of a MemoryError or the kernel killing the process after
    part of the work. (k larger than the index is fine: results are padded.)"""
    need = results * 12  # float32 distance + int64 id each
    if need <= _SMALL_RESULTS_BYTES:
        return
    import psutil

    free = psutil.virtual_memory().available
    if need > free:
        raise ValidationError("k", k, f"a k whose results fit in memory: these would take {need} bytes, "
                                      f"more than the {free} bytes free")


def check_k(k: object) -> int:
    return check_positive_int("k", k)


def check_nprobe(nprobe: object, nlist: int) -> int:
    """1 <= nprobe <= nlist. Unlike Faiss, a larger nprobe is an error, not a silent clamp."""
    if not is_int(nprobe) or not 1 <= nprobe <= nlist:
        raise ValidationError("nprobe", nprobe, f"an integer in [1, nlist={nlist}]")
    return int(nprobe)


def check_max_codes(max_codes: object) -> int | None:
    if max_codes is None:
        return None
    if not is_int(max_codes) or not 1 <= max_codes < 2**63:  # an int64 budget (the plan sums sizes in int64)
        raise ValidationError("max_codes", max_codes, "a positive integer below 2**63, or None (no limit)")
    return int(max_codes)


def check_radius(radius: object, metric: str) -> float:
    if isinstance(radius, (bool, np.bool_)) or not isinstance(radius, (int, float, np.integer, np.floating)) \
            or not np.isfinite(radius):
        raise ValidationError("radius", radius, "a finite number")
    if metric == "l2" and radius < 0:
        raise ValidationError("radius", radius, "a squared L2 distance >= 0 for an l2 index")
    return float(radius)


def ids_mask(ids: np.ndarray, allowed: object) -> np.ndarray:
    """uint8 mask over ``ids``: 1 where the id is allowed, as the kernels take ``valid``.

    ``allowed`` is either an integer array of ids, or a bool array used as a bitmap indexed by
    id (ids beyond its length are not allowed); ``None`` (no filter) gives the empty mask, which
    the kernels read as "all valid".
    """
    if allowed is None:
        return np.empty(0, dtype=np.uint8)
    if not isinstance(allowed, np.ndarray) or allowed.ndim != 1 or allowed.dtype.kind not in "biu":
        what = f"array of dtype {allowed.dtype}, shape {allowed.shape}" if isinstance(allowed, np.ndarray) \
            else type(allowed).__name__
        raise ValidationError("ids_allowed", what, "a 1-D numpy array of int ids, or a 1-D bool bitmap indexed by id")
    if allowed.dtype.kind == "b":
        inside = ids < len(allowed)
        mask = np.zeros(len(ids), dtype=bool)
        mask[inside] = allowed[ids[inside]]
    else:
        mask = np.isin(ids, allowed)
    return mask.astype(np.uint8)


def check_ids_allowed(allowed: object) -> None:
    ids_mask(np.empty(0, np.int64), allowed)


# --------------------------------------------------------------------------- URLs and stored paths

#: fsspec filesystems a chained URL (``simplecache::s3://...``) may put in front of its target:
#: local caches of the target's files, which read nothing but what the target holds. Other
#: chain links (``reference::``, ``zip::``, ``dir::``...) can redirect reads anywhere.
#: ``blockcache`` and ``filecache`` are caches too, but share cache metadata that concurrent
#: reads (distann reads chunks concurrently) corrupt: a KeyError mid-search (fsspec issue 1126,
#: docs/benchmarks/s3.md), so they are not offered.
CACHING_PROTOCOLS = ("simplecache",)

#: storage options that make fsspec open another filesystem than the URL names
REDIRECTING_OPTIONS = ("protocol", "target_protocol", "fo")

_DOT_DOT = ("..", "%2e%2e", ".%2e", "%2e.")


def check_protocols(key: str, value: object) -> tuple[str, ...]:
    """The ``distann.store.protocols`` setting: protocol names (a list, or one comma-separated string)."""
    names = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names \
            or not all(isinstance(p, str) and p and p.isascii() and p.replace("-", "").isalnum() for p in names):
        raise ValidationError(key, value, "a non-empty list of fsspec protocol names, e.g. ['file', 's3']")
    return tuple(names)


def check_chains(key: str, value: object) -> tuple[str, ...]:
    """The ``distann.store.chains`` setting: the caching filesystems a chained URL may use."""
    names = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or any(p not in CACHING_PROTOCOLS for p in names):
        raise ValidationError(key, value, f"a list of caching filesystems among {list(CACHING_PROTOCOLS)} "
                                          "(empty: chained URLs are refused)")
    return tuple(names)


def has_dot_dot(path: str) -> bool:
    """Whether ``path`` has a ``..`` segment (also percent-encoded, as HTTP servers decode it)."""
    return any(seg.lower() in _DOT_DOT for seg in path.replace("\\", "/").split("/"))


def check_url(param: str, url: object, storage_options: object = None, *,
              protocols: tuple[str, ...] | None = None, chains: tuple[str, ...] | None = None) -> str:
    """Refuse, before any I/O, a URL that could reach outside what it names: a ``..`` segment,
    a control character, a protocol outside ``distann.store.protocols``, a ``::`` chain whose
    links are not caching filesystems allowed by ``distann.store.chains``, or storage options
    that switch the filesystem (``protocol``, ``target_protocol``, ``fo``). Local paths are
    allowed when ``file`` is. Returns ``url``."""
    import fsspec.core

    from distann import config

    if not isinstance(url, str) or not url:
        raise ValidationError(param, url, "a non-empty path or URL string")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValidationError(param, url, "a path or URL without control characters")
    protocols = config.get("store.protocols") if protocols is None else protocols
    chains = config.get("store.chains") if chains is None else chains
    *outer, target = url.split("::")
    for link in outer:
        name = link[:-3] if link.endswith("://") else link
        if name not in chains:
            allowed = f"one of {list(chains)} (distann.store.chains)" if chains else \
                "none: chained URLs are refused unless distann.store.chains names caching filesystems " \
                f"({', '.join(CACHING_PROTOCOLS)})"
            raise ValidationError(param, url, f"a URL without '::' chains, or chained through a caching "
                                              f"filesystem; link {link!r} is not allowed, allowed links: {allowed}")
    protocol, path = fsspec.core.split_protocol(target)
    protocol = protocol or "file"
    if protocol not in protocols:
        raise ValidationError(param, url, f"a local path or a URL of protocol {', '.join(protocols)} "
                                          f"(the distann.store.protocols setting); {protocol!r} is not allowed")
    if has_dot_dot(path):
        raise ValidationError(param, url, "a path or URL without '..' segments (resolve it first, "
                                          "e.g. with os.path.abspath)")
    if storage_options is not None:
        if not isinstance(storage_options, dict):
            raise ValidationError("storage_options", storage_options, "a dict of fsspec options or None")
        nested = [v for v in storage_options.values() if isinstance(v, dict)]
        for opts in (storage_options, *nested):
            bad = [k for k in REDIRECTING_OPTIONS if k in opts]
            if bad:
                raise ValidationError("storage_options", {bad[0]: opts[bad[0]]},
                                      f"fsspec options without {', '.join(REDIRECTING_OPTIONS)}: the URL "
                                      f"names the filesystem ({param})")
    return url


def check_stored_path(path: object) -> str | None:
    """Why ``path``, named by an index's manifest, is not a path inside the index root (None if it is).

    Relative, '/'-separated, no empty, '.' or '..' segments, no '://' or '::', no backslash or
    control character: the manifest is data, and a reader opens nothing outside the index."""
    if not isinstance(path, str) or not path:
        return "not a non-empty string"
    if path.startswith("/") or path.startswith("~"):
        return "an absolute path"
    if "://" in path or "::" in path or ":" in path.split("/")[0]:
        return "a URL"
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "a path with a backslash or a control character"
    if has_dot_dot(path) or any(seg in ("", ".") for seg in path.split("/")):
        return "a path with '..', '.' or empty segments"
    return None
