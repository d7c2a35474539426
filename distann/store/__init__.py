"""The index store: a Zarr v3 group on any fsspec filesystem, reached through its manifest."""

from distann.store.location import Location
from distann.store.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, ShardEntry, read_manifest, write_manifest

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Location", "Manifest", "ShardEntry", "read_manifest", "write_manifest"]
