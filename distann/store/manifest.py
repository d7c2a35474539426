"""The manifest: the one file whose atomic write commits an index.

Readers find every array through the manifest and never list directories. A URL without a
manifest holds no index; a manifest with a newer format version is refused. The layout is
documented in ``docs/FORMAT.md``; keep the two in step.

A manifest is data from the store, not trusted: every path it names (arrays, shards, checksum
keys, codec and quantizer arrays) must be a relative path inside the index root, and every
number the type the format says, or the manifest is refused (IndexFormatError) before any array
is read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from distann.errors import IndexFormatError
from distann.store.location import Location
from distann.validation import check_stored_path, is_int

FORMAT_NAME = "distann-ivf"
#: 3: the codec section holds a trained pipeline (spec, transforms, quantizer, arrays under codec/).
#: 2: every chunk of every array is stored (an absent chunk is corruption); quantizer checksums.
#: 1: all-zero chunks were not stored. Version-1 indexes are still read (absent chunks as zeros).
#: Versions 1 and 2 are Flat indexes; they are still read.
FORMAT_VERSION = 3
MANIFEST_PATH = "manifest.json"


@dataclass(frozen=True)
class ShardEntry:
    """One list-range shard: lists ``[list_start, list_stop)`` stored under ``path``."""

    name: str
    path: str
    list_start: int
    list_stop: int
    ntotal: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to open an index. Serialized as ``manifest.json``."""

    generation: int
    build_key: str
    spec: str
    metric: str
    d: int
    nlist: int
    ntotal: int
    codec: dict[str, Any]
    centroids: str
    list_sizes: str
    shards: tuple[ShardEntry, ...]
    checksums: dict[str, str] = field(default_factory=dict)  # array path -> CRC-32 (quantizer, codec)
    build: dict[str, Any] = field(default_factory=dict)
    # the coarse quantizer when it is not the exact one: {"kind": "ivf", "nlist1", "nprobe", "arrays"}
    quantizer: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards"] = [asdict(s) for s in self.shards]
        return out

    @property
    def stores_every_chunk(self) -> bool:
        """From version 2 on, an absent chunk can only mean a lost file."""
        return self.format_version >= 2

    @classmethod
    def from_json(cls, obj: Any, url: str) -> "Manifest":
        if not isinstance(obj, dict):
            raise IndexFormatError(f"{url}: manifest is not a JSON object")
        if obj.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{url}: manifest format is {obj.get('format')!r}, expected {FORMAT_NAME!r}")
        version = obj.get("format_version")
        if not isinstance(version, int):
            raise IndexFormatError(f"{url}: manifest has no integer format_version")
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"{url}: index format version {version} is newer than this distann reads "
                f"(up to {FORMAT_VERSION}); upgrade distann")
        try:
            if not isinstance(obj["shards"], list) or not all(isinstance(s, dict) for s in obj["shards"]):
                raise TypeError("shards is not a list of objects")
            shards = tuple(ShardEntry(**s) for s in obj["shards"])
            fields = {k: obj[k] for k in cls.__dataclass_fields__ if k != "shards" and k in obj}
            manifest = cls(shards=shards, **fields)
        except (KeyError, TypeError) as exc:
            raise IndexFormatError(f"{url}: manifest is missing or has malformed fields ({exc})") from exc
        manifest._check(url)
        return manifest

    def paths(self) -> dict[str, object]:
        """Every path the manifest names, keyed by where it is named (for error messages)."""
        out: dict[str, object] = {"centroids": self.centroids, "list_sizes": self.list_sizes}
        out.update({f"shards[{i}].path": s.path for i, s in enumerate(self.shards)})
        out.update({f"checksums key {k!r}": k for k in self.checksums})
        for section in ("codec", "quantizer"):
            arrays = getattr(self, section).get("arrays", {})
            if not isinstance(arrays, dict):
                out[f"{section}.arrays"] = arrays
                continue
            out.update({f"{section}.arrays[{name!r}]": v for name, v in arrays.items()})
        return out

    def _check_types(self, url: str) -> None:
        """Field types, checked before any value is compared or used as a path."""
        ints = {"generation": self.generation, "d": self.d, "nlist": self.nlist, "ntotal": self.ntotal}
        for i, s in enumerate(self.shards):
            ints.update({f"shards[{i}].{f}": getattr(s, f) for f in ("list_start", "list_stop", "ntotal")})
        bad = [f"{k}={v!r} (not an integer)" for k, v in ints.items() if not is_int(v)]
        texts = {"build_key": self.build_key, "spec": self.spec, "metric": self.metric,
                 **{f"shards[{i}].name": s.name for i, s in enumerate(self.shards)},
                 **{f"shards[{i}].checksum": s.checksum for i, s in enumerate(self.shards)}}
        bad += [f"{k}={v!r} (not a string)" for k, v in texts.items() if not isinstance(v, str)]
        maps = {"codec": self.codec, "checksums": self.checksums, "build": self.build, "quantizer": self.quantizer}
        bad += [f"{k} (not a JSON object)" for k, v in maps.items() if not isinstance(v, dict)]
        if bad:
            raise IndexFormatError(f"{url}: corrupt manifest: " + "; ".join(bad))
        if self.generation < 0:
            raise IndexFormatError(f"{url}: corrupt manifest: generation={self.generation} (negative)")
        outside = [f"{where} = {path!r} is {why}" for where, path in self.paths().items()
                   if (why := check_stored_path(path))]
        if outside:
            raise IndexFormatError(
                f"{url}: manifest names paths outside the index root ({'; '.join(outside)}); refused before "
                "reading them: an index names only relative paths below its root (docs/FORMAT.md)")

    def _check(self, url: str) -> None:
        self._check_types(url)
        problems = []
        if self.d <= 0 or self.nlist <= 0 or self.ntotal < 0:
            problems.append(f"d={self.d}, nlist={self.nlist}, ntotal={self.ntotal}")
        expected = 0
        for s in self.shards:
            if s.list_start != expected or s.list_stop <= s.list_start:
                problems.append(f"shard {s.name} covers lists [{s.list_start}, {s.list_stop}), expected start {expected}")
            expected = s.list_stop
        if expected != self.nlist:
            problems.append(f"shards cover lists [0, {expected}) but nlist is {self.nlist}")
        if sum(s.ntotal for s in self.shards) != self.ntotal:
            problems.append("shard sizes do not add up to ntotal")
        if problems:
            raise IndexFormatError(f"{url}: corrupt manifest: " + "; ".join(problems))


def read_manifest(loc: Location) -> Manifest:
    """Read and check the committed manifest at ``loc``; IndexFormatError if there is none or it is bad."""
    try:
        raw = loc.read_bytes(MANIFEST_PATH)
    except FileNotFoundError:
        raise IndexFormatError(
            f"{loc.url}: no committed index (no {MANIFEST_PATH}); a build that did not finish leaves "
            "none — rerun it to resume") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise IndexFormatError(f"{loc.url}: cannot read {MANIFEST_PATH}: {exc}") from exc
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{loc.url}: {MANIFEST_PATH} is not valid JSON ({exc})") from exc
    return Manifest.from_json(obj, loc.url)


def manifest_exists(loc: Location) -> bool:
    return loc.exists(MANIFEST_PATH)


def write_manifest(loc: Location, manifest: Manifest) -> None:
    """The commit: one atomic write of ``manifest.json``."""
    loc.write_json(MANIFEST_PATH, manifest.to_json(), durable=True)
