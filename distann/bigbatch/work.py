"""The working files of a big-batch job, under ``<out>/_distann/work/`` until the commit.

``job.json``       the job's key and plan (a rerun with another key starts over)
``pieces/<c>/<r>.npz``    the queries of query chunk ``c`` that probe list range ``r``: their
                          rows, transformed vectors (and raw ones for RFlat), probes in ``r``
``pieces/<c>/DONE``       query chunk ``c`` bucketed (per range: how many of its queries probe it)
``partials/<r>/<c>.npz``  range ``r``'s partial results for the queries of chunk ``c``
``partials/<r>/DONE``     range ``r`` scanned (the resume point of the scan stage)
``reduced/<c>.json``      query chunk ``c`` reduced and written (with its number of results)
``results/<c>.npz``       range mode, Zarr output: chunk ``c``'s results until they are laid out
``parts/part-<c>.parquet``  Parquet output: the parts, moved into place by the commit

Every file is written whole (temporary name and rename on local disks, one PUT on object
stores), so a killed task leaves either nothing or a complete file, and a DONE marker is
written last.
"""

from __future__ import annotations

import io
import os

import numpy as np

from distann.store.location import Location

WORK = "_distann/work"


class InjectedFault(RuntimeError):
    """Raised by the private fault-injection switch used in the resume tests."""


def maybe_fail(stage: str, name: str) -> None:
    # Private test hook, as the build's: DISTANN_FAIL_TASK="scan:r00002" makes that task fail
    # after writing part of its output. Not part of any public signature.
    if os.environ.get("DISTANN_FAIL_TASK") == f"{stage}:{name}":
        raise InjectedFault(f"injected failure in {stage} task {name}")


def write_npz(loc: Location, rel: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in arrays.items() if v is not None})
    loc.write_bytes(rel, buf.getbuffer())


def read_npz(loc: Location, rel: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(loc.read_bytes(rel)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
