"""The one ANN test-helpers module: seeded data, exact ground truth, tie-tolerant comparisons."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

import numpy as np

from distann.synthetic import synthetic


def dataset(n: int, d: int, nq: int = 0, *, seed: int = 1338, intrinsic_dim: int = 12):
    """Seeded low-intrinsic-dimension data (Faiss SyntheticDataset recipe) and queries."""
    xb = synthetic(n, d, intrinsic_dim=intrinsic_dim, seed=seed, stream=0)
    xq = synthetic(nq, d, intrinsic_dim=intrinsic_dim, seed=seed, stream=1) if nq else None
    return xb, xq


def exact_scores(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """(nq, n) float64 distances (l2, squared) or similarities (ip, cosine), computed directly."""
    q, b = xq.astype(np.float64), xb.astype(np.float64)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-300)
    if metric == "l2":
        return ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return q @ b.T


def brute_force(xq: np.ndarray, xb: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k in float64: (D, I), best first, ties by smaller id."""
    s = exact_scores(xq, xb, metric)
    key = s if metric == "l2" else -s
    idx = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), key), axis=1)[:, :k]
    return np.take_along_axis(s, idx, 1), idx


def assert_same_neighbours(D, I, D_ref, I_ref, *, rtol: float, atol: float) -> None:
    """Results equal up to ties: distances match row by row, and every returned id whose
    distance is strictly better than the k-th reference distance is a reference id."""
    np.testing.assert_allclose(D, D_ref, rtol=rtol, atol=atol)
    for row, (ids, ref_ids, dref) in enumerate(zip(I, I_ref, D_ref)):
        kth = dref[-1]
        strict = np.abs(D[row] - kth) > atol + rtol * abs(kth)
        assert set(ids[strict]) <= set(ref_ids), f"row {row}: ids {ids} vs reference {ref_ids}"
        assert len(set(ids[ids >= 0])) == len(ids[ids >= 0]), f"row {row}: duplicate ids {ids}"


def cli(*args: str, quiet: bool = False) -> list[str]:
    """The command line of ``distann ARGS`` in a fresh Python process of this interpreter
    (``quiet``: warnings and errors only)."""
    return [sys.executable, "-m", "distann.cli", *(("--log-level", "WARNING") if quiet else ()), *args]


def first_build(root, n: int, spec: str, *options: str) -> tuple[str, str]:
    """Write ``n`` x 16 vectors to ``root/base.npy`` and commit a first index of them at
    ``root/idx.zarr`` with ``distann build SPEC OPTIONS``; returns (source, index URL)."""
    from distann.synthetic import write_npy

    src, url = os.path.join(root, "base.npy"), os.path.join(root, "idx.zarr")
    write_npy(src, n, 16)
    subprocess.run(cli("build", src, url, "--spec", spec, *options, quiet=True), check=True, timeout=300)
    return src, url


def wait_for_staged_chunks(proc, url: str, generation: int, count: int, timeout: float = 240) -> None:
    """Return once ``count`` add tasks of ``generation`` are done at ``url`` while ``proc`` (a
    running build) is still alive; fail the test if the build ended first."""
    pattern = os.path.join(url, f"g{generation:06d}", "staging", "*", "DONE")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(glob.glob(pattern)) >= count:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be stopped"


def set_fault(client, value: str | None) -> None:
    """Arm (``"add:c000003"``) or clear (None) the build's private fault hook on every worker."""
    def setter(v=value):
        if v is None:
            os.environ.pop("DISTANN_FAIL_TASK", None)
        else:
            os.environ["DISTANN_FAIL_TASK"] = v
    client.run(setter)
