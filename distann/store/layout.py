"""Where everything of an index lives, relative to its root: the one place that spells paths.

See ``docs/FORMAT.md`` for the layout these functions describe.
"""

from __future__ import annotations

import re

GENERATION = re.compile(r"g\d{6}")


def generation(n: int) -> str:
    """Folder of generation ``n``: ``g000001``."""
    return f"g{n:06d}"


def build_marker(gen: str) -> str:
    return f"{gen}/BUILD.json"


def centroids(gen: str) -> str:
    return f"{gen}/quantizer/centroids"


def quantizer_array(gen: str, name: str) -> str:
    """An array of the ``ivf`` coarse quantizer (``top``, ``members``, ``member_offsets``)."""
    return f"{gen}/quantizer/{name}"


def list_sizes(gen: str) -> str:
    return f"{gen}/quantizer/list_sizes"


def trained_marker(gen: str) -> str:
    """Written when the coarse quantizer and the codec are trained (resume marker)."""
    return f"{gen}/quantizer/DONE"


def codec_array(gen: str, name: str) -> str:
    """A trained codec array, ``name`` as the pipeline names it (``t0/matrix``, ``quantizer/vmin``)."""
    return f"{gen}/codec/{name}"


def shard(gen: str, name: str) -> str:
    return f"{gen}/shards/{name}"


def staging(gen: str, chunk: str = "") -> str:
    return f"{gen}/staging/{chunk}" if chunk else f"{gen}/staging"
