"""Where an index lives: a URL resolved through fsspec, with the few file operations we need.

``Location`` is picklable (it keeps the URL and storage options, not an open filesystem),
so build tasks can carry it to worker processes and reopen it there.

Local paths are made absolute when a Location is created (in the client), so worker processes
with another working directory reach the same files.

The URL is checked when a Location is created, before any I/O (``validation.check_url``): no
``..`` segment, a protocol of the ``distann.store.protocols`` allowlist, ``::`` chains only
through the caching filesystems ``distann.store.chains`` allows, no storage option that switches
the filesystem. A Location unpickled in a worker is not checked again.

Atomic writes: on a local filesystem a file is written under a temporary name and renamed
into place (``os.replace`` is atomic); on object stores a single PUT is already atomic.
Exclusive creation (the build's generation lease) links a complete temporary file into place
on local disks (``link`` fails if the name exists) and is a conditional PUT elsewhere (fsspec's
``mode="create"``: ``If-None-Match: *`` on S3).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from contextlib import suppress
from dataclasses import InitVar, dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import zarr
from zarr.storage import FsspecStore, LocalStore

from distann.validation import check_url


def absolute_url(url: str) -> str:
    """``url`` with a local path (no protocol, or ``file://``) made absolute; others unchanged."""
    if "://" in url and not url.startswith("file://"):
        return url
    path = url[len("file://"):] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True)
class Location:
    """A root URL plus storage options; every path below is relative to the root. ``param``
    names the URL in the ValidationError of a refused one."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    param: InitVar[str] = "url"

    def __post_init__(self, param: str) -> None:
        check_url(param, self.url, self.storage_options)
        object.__setattr__(self, "url", absolute_url(self.url))

    @cached_property
    def _fs_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **self._fs_options)
        return fs, root.rstrip("/") if root != "/" else root

    @property
    def _fs_options(self) -> dict[str, Any]:
        """The storage options, with s3fs's ``max_concurrency`` set to 1 unless given: above 1,
        s3fs sends a HEAD (the object's size) before every whole-object GET so as to fetch objects
        over its block size (50 MiB) in parallel parts, which an index's chunks (about 1 MiB) and
        manifest never are. Every chunk read would cost two requests instead of one."""
        if fsspec.core.split_protocol(self.url)[0] in ("s3", "s3a"):
            return {"max_concurrency": 1, **self.storage_options}
        return self.storage_options

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "url", state["url"])
        object.__setattr__(self, "storage_options", state["storage_options"])

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_root[0]

    @property
    def root(self) -> str:
        return self._fs_root[1]

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protocols or "local" in protocols

    @property
    def is_process_local(self) -> bool:
        """True for ``memory://``: the data exists only in the process that wrote it."""
        protocol = self.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "memory" in protocols

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def write_bytes(self, rel: str, data: bytes | memoryview, durable: bool = False) -> None:
        """Write a whole file atomically (temporary name then rename on local disks).

        ``data`` may be any buffer (e.g. ``ndarray.data``): on local disks it is written
        without a copy. Atomicity protects against killed processes; ``durable`` also fsyncs
        the file before the rename (against power loss) — used for the manifest, the commit."""
        self._put(rel, data, durable, exclusive=False)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create file ``rel`` holding ``data`` unless it exists: True if this call created it.

        Atomic against concurrent creators, and readers never see a partial file."""
        return self._put(rel, data, durable=True, exclusive=True)

    def _put(self, rel: str, data: bytes | memoryview, durable: bool, exclusive: bool) -> bool:
        target = self.path(rel)
        parent = posixpath.dirname(target)
        if not self.is_local:
            self.fs.makedirs(parent, exist_ok=True)
            try:
                self.fs.pipe_file(target, bytes(data), mode="create" if exclusive else "overwrite")
            except FileExistsError:
                if not exclusive:
                    raise
                return False
            return True
        os.makedirs(parent, exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if not exclusive:
            os.replace(tmp, target)
            return True
        try:
            os.link(tmp, target)  # fails if the name exists: the exclusive step
        except FileExistsError:
            return False
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any, durable: bool = False) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode(), durable)

    def remove(self, rel: str) -> None:
        """Remove a file or a whole folder; missing paths are fine."""
        target = self.path(rel)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def list_dir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (writers only: readers never list, see docs/FORMAT.md)."""
        target = self.path(rel)
        if not self.fs.exists(target):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(target, detail=False))

    def zarr_store(self, read_only: bool = False) -> zarr.abc.store.Store:
        if self.is_local:
            return LocalStore(self.root, read_only=read_only)
        if "::" in self.url:
            # a caching filesystem chained in front of the store (simplecache::s3://...) is synchronous: Zarr's
            # from_url would remake it asynchronous, leaving the s3fs behind it on another event loop (it fails)
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            return FsspecStore(fs=AsyncFileSystemWrapper(self.fs, asynchronous=True), path=self.root,
                               read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self._fs_options or None, read_only=read_only)
