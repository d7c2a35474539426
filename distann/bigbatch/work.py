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

from distann.errors import IndexExistsError
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


def check_output(out: Location, work: Location, key: str, overwrite: bool, commit: str, ours: tuple[str, ...],
                 what: str) -> bool:
    """Whether ``out`` holds an unfinished run of the job ``key`` (resume it). A committed result
    (its ``commit`` file), another job's unfinished work, a file or foreign files at ``out`` are
    refused unless ``overwrite`` (a file is then removed; the folder is emptied by the caller)."""
    if out.fs.isfile(out.root):
        if not overwrite:
            raise IndexExistsError(f"{out.url}: a file exists there; pass overwrite=True (--overwrite) to replace it")
        out.fs.rm(out.root)
        return False
    if out.exists(commit):
        if not overwrite:
            raise IndexExistsError(f"{out.url}: a committed {what} is there; pass overwrite=True (--overwrite) to "
                                   "replace it")
        return False
    if work.exists("job.json"):
        if work.read_json("job.json").get("key") == key:
            return True
        if not overwrite:
            raise IndexExistsError(f"{out.url}: holds an unfinished {what} job with other parameters; rerun that "
                                   "job to finish it, or pass overwrite=True (--overwrite) to replace it")
        return False
    foreign = [n for n in out.list_dir("") if n not in ours]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise IndexExistsError(f"{out.url}: exists and holds {shown}; choose a new path, or pass overwrite=True "
                               "(--overwrite) to replace it")
    return False


def clear_output(out: Location) -> None:
    """Empty an output folder for a fresh job (``check_output`` allowed it), keeping only the
    output's lease."""
    for name in out.list_dir(""):
        if name != "_distann":
            out.remove(name)
    for name in out.list_dir("_distann"):
        if name != "leases":
            out.remove(f"_distann/{name}")


def move_parts(work: Location, out: Location, names: list[str]) -> None:
    """The commit's move of the Parquet parts from ``work/parts/`` into ``out`` (a part already
    moved by an interrupted commit stays where it is)."""
    for name in names:
        if work.exists(f"parts/{name}"):
            out.fs.mv(work.path(f"parts/{name}"), out.path(name))
