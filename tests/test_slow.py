"""Heavier cases (``pytest -m slow``): a larger build held to faiss-cpu on the same data."""

from __future__ import annotations

import numpy as np
import pytest

import distann
from distann.synthetic import write_npy

faiss = pytest.importorskip("faiss")


@pytest.mark.slow
def test_recall_on_par_with_faiss_at_200k(client, tmp_path):
    n, d, nlist, nq = 200_000, 32, 256, 500
    src = write_npy(str(tmp_path / "base.npy"), n, d)
    xb = np.load(src)
    xq = distann.synthetic.synthetic(nq, d, stream=1)
    index = distann.build(src, str(tmp_path / "idx.zarr"), spec=f"IVF{nlist},Flat", client=client)
    flat = faiss.IndexFlatL2(d)
    flat.add(xb)
    _, gt = flat.search(xq, 10)
    fidx = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    fidx.train(xb)
    fidx.add(xb)
    for nprobe in (4, 16, 64):
        ours = distann.recall_at_k(index.search(xq, k=10, nprobe=nprobe)[1], gt, 10)
        fidx.nprobe = nprobe
        theirs = distann.recall_at_k(fidx.search(xq, 10)[1], gt, 10)
        # same recipe (random init, 10 iterations, 256 points per centroid): over seeds 1-3 the
        # two differed by at most 0.013 (recall 0.47 / 0.80 / 0.99 at nprobe 4 / 16 / 64);
        # 0.03 leaves twice that, and a broken build loses far more
        assert ours >= theirs - 0.03, (nprobe, ours, theirs)
