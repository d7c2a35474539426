"""Every codec end to end on the session's LocalCluster: build, search, range search, filters,
resume, verify, reconstruct and info, held to brute force and to faiss-cpu on the same data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import distann
from distann.builder.tasks import InjectedFault
from distann.errors import IndexFormatError, ValidationError
from tests.ann_helpers import brute_force, dataset, set_fault

recall = distann.recall_at_k

faiss = pytest.importorskip("faiss")

N, D, NQ, NLIST, K = 10240, 32, 50, 16, 10  # 40 points per PQ centroid: no training warning
OPTS = dict(niter=10, chunk_rows=2000, shard_bytes=32 * 1024)
SPECS = ["IVF16,SQ8", "IVF16,SQfp16", "IVF16,PQ8", "IVF16,PQ16x6", "OPQ8,IVF16,PQ8", "PCAR16,IVF16,SQ8",
         "RR32,IVF16,Flat", "IVF16,PQ8,RFlat"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    xb, xq = dataset(N, D, NQ)
    root = tmp_path_factory.mktemp("codecs")
    np.save(root / "base.npy", xb)
    return root, xb, xq


@pytest.fixture(scope="module")
def built(client, data):
    root, _, _ = data
    return {spec: distann.build(str(root / "base.npy"), str(root / f"{i}.zarr"), spec=spec, client=client, **OPTS)
            for i, spec in enumerate(SPECS)}


def _faiss_recall(spec: str, xb, xq, gt, nprobe: int) -> float:
    index = faiss.index_factory(D, spec)
    index.train(xb)
    index.add(xb)
    faiss.extract_index_ivf(index).nprobe = nprobe
    return recall(index.search(xq, K)[1], gt, K)


#: faiss-cpu takes 3-30 s to train these references here (PQ k-means on 2 shared cores): checked by
#: `pytest -m slow` and by the codec benchmark, while the default run keeps one PQ, one SQ, one
#: transform and the flat reference
_SLOW_FAISS = {"OPQ8,IVF16,PQ8", "IVF16,PQ8,RFlat", "IVF16,PQ16x6"}


@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s in _SLOW_FAISS else s for s in SPECS])
def test_recall_on_par_with_faiss(built, data, spec):
    """10-recall@10 at nprobe 4 and 16 (all lists) no more than 0.03 below faiss-cpu's with the
    same factory string on the same data (different k-means seeds move recall by about 0.01 on
    50 queries; the issue's 0.01 target is checked by the benchmark on 10k queries)."""
    _, xb, xq = data
    _, gt = brute_force(xq, xb, K, "l2")
    for nprobe in (4, NLIST):
        ours = recall(built[spec].search(xq, k=K, nprobe=nprobe)[1], gt, K)
        assert ours >= _faiss_recall(spec, xb, xq, gt, nprobe) - 0.03, (spec, nprobe)


def _decoded(index, ids: np.ndarray) -> np.ndarray:
    """The decoded vectors of ``ids`` in the IVF space (where the kernels compute distances)."""
    block = index.lists.load_all()
    order = np.argsort(block.ids)
    rows = order[np.searchsorted(block.ids[order], ids)]
    assign = np.searchsorted(block.offsets, rows, side="right") - 1
    return index.codec.decode(block.codes[rows], assign, index.centroids)


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.endswith("RFlat")])
def test_distances_are_those_of_the_decoded_vectors(built, data, spec):
    """ADC / decoded-scan distances equal exact distances from the query (in the IVF space) to the
    decoded vectors of the returned ids: rtol 1e-4 covers float32 sums of up to 32 terms and the
    lookup-table rounding."""
    _, _, xq = data
    index = built[spec]
    Dd, Id = index.search(xq, k=K, nprobe=4)
    y = index.codec.prepare(xq).astype(np.float64)
    rec = _decoded(index, Id.reshape(-1)).reshape(NQ, K, -1).astype(np.float64)
    exact = ((y[:, None, :] - rec) ** 2).sum(-1)
    np.testing.assert_allclose(Dd, exact, rtol=1e-4, atol=1e-4 * exact.max())


def test_rflat_returns_exact_distances(built, data):
    _, xb, xq = data
    Dd, Id = built["IVF16,PQ8,RFlat"].search(xq, k=K, nprobe=NLIST, k_factor=8)
    exact = ((xq[:, None, :].astype(np.float64) - xb[Id].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(Dd, exact, rtol=1e-5, atol=1e-5)  # float32 sums of 32 squares
    plain = built["IVF16,PQ8"].search(xq, k=K, nprobe=NLIST)[1]
    _, gt = brute_force(xq, xb, K, "l2")
    assert recall(Id, gt, K) > recall(plain, gt, K) + 0.1  # re-ranking is what RFlat is for


def test_k_factor_validated(built, data):
    _, _, xq = data
    with pytest.raises(ValidationError, match="k_factor: received 0; a positive integer"):
        built["IVF16,PQ8,RFlat"].search(xq, k=5, k_factor=0)


@pytest.mark.parametrize("spec", ["IVF16,SQ8", "IVF16,PQ8", "IVF16,PQ8,RFlat"])
def test_range_search_agrees_with_knn(built, data, spec):
    """Every kNN result closer than the radius is in the range results with the same distance."""
    _, _, xq = data
    index = built[spec]
    Dk, Ik = index.search(xq, k=K, nprobe=4, k_factor=8)
    radius = float(np.median(Dk[:, 4]))
    lims, Dr, Ir = index.range_search(xq, radius, nprobe=4)
    assert lims[-1] > 0 and (Dr < radius).all()
    for q in range(NQ):
        got = dict(zip(Ir[lims[q]:lims[q + 1]].tolist(), Dr[lims[q]:lims[q + 1]].tolist()))
        for dist, i in zip(Dk[q], Ik[q]):
            if dist < radius * (1 - 1e-4):
                assert i in got and got[i] == pytest.approx(dist, rel=1e-4)


@pytest.mark.parametrize("spec", ["IVF16,SQ8", "IVF16,PQ8"])
def test_filters_and_max_codes(built, data, spec):
    _, _, xq = data
    allowed = np.arange(0, N, 3)
    _, I = built[spec].search(xq, k=K, nprobe=8, ids_allowed=allowed)
    assert np.isin(I[I >= 0], allowed).all()
    _, I1 = built[spec].search(xq[:5], k=K, nprobe=NLIST, max_codes=30)
    assert ((I1 >= 0).sum(1) <= 30).all()


@pytest.mark.parametrize("spec", SPECS)
def test_streaming_equals_resident(built, data, spec):
    _, _, xq = data
    streamed = distann.open_index(built[spec].url, cache_bytes=0)
    resident = distann.open_index(built[spec].url).load()
    for a, b in zip(streamed.search(xq, k=K, nprobe=4), resident.search(xq, k=K, nprobe=4)):
        np.testing.assert_array_equal(a, b)


def test_index_size_on_disk_is_codes_and_ids(built):
    """Storage must not undo the compression: the files within 10% of codes + ids (+ raw)."""
    for spec, index in built.items():
        gen = os.path.join(index.url, f"g{index.manifest.generation:06d}", "shards")
        on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(gen) for f in fs)
        payload = N * (index.codec.code_size + 8 + (4 * D if index.codec.refine else 0))
        assert on_disk <= 1.10 * payload, (spec, on_disk, payload)


def test_verify_covers_codec_arrays(built, tmp_path):
    import shutil

    src = built["OPQ8,IVF16,PQ8"]
    assert src.verify()["arrays"] == 2 + len(src.codec.arrays())
    dst = tmp_path / "copy.zarr"
    shutil.copytree(src.url, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    books = dst / manifest["codec"]["arrays"]["quantizer/codebooks"] / "c" / "0" / "0" / "0"
    raw = bytearray(books.read_bytes())
    raw[100] ^= 0x10
    books.write_bytes(bytes(raw))
    # refused by the chunk's CRC-32C as soon as it is read (at open), before verify()'s checksum
    with pytest.raises(IndexFormatError, match="quantizer/codebooks: chunk c/0/0/0 fails its CRC-32C checksum"):
        distann.open_index(str(dst)).verify()


def test_info_reports_the_codec_and_its_error(built, data):
    _, xb, _ = data
    info = {spec: index.info() for spec, index in built.items()}
    for spec, i in info.items():
        assert i["codec"]["spec"] == spec and i["codec"]["mse"] >= 0
    assert info["IVF16,SQfp16"]["codec"]["mse"] < info["IVF16,SQ8"]["codec"]["mse"] < info["IVF16,PQ8"]["codec"]["mse"]
    assert info["IVF16,PQ8"]["code_size"] == 8 and info["IVF16,SQ8"]["code_size"] == D
    # the reported error is the real one: reconstruct a sample and measure it
    index = built["IVF16,PQ8"]
    ids = np.arange(0, N, 7)
    mse = float(((index.reconstruct(ids) - xb[ids]) ** 2).sum(1).mean())
    assert mse == pytest.approx(info["IVF16,PQ8"]["codec"]["mse"], rel=0.15)  # two samples of the same error


def test_reconstruct_refuses_unknown_ids(built):
    with pytest.raises(ValidationError, match="1 id\\(s\\) not in the index, e.g. 99999"):
        built["IVF16,SQ8"].reconstruct(np.array([1, 99999]))


@pytest.mark.parametrize("spec, fault", [("OPQ8,IVF16,PQ8,RFlat", "add:c000002"), ("PCAR16,IVF16,SQ8", "merge:s000001")])
def test_killed_and_resumed_build_equals_a_clean_one(client, data, tmp_path, spec, fault):
    root, _, xq = data
    src = str(root / "base.npy")
    clean = distann.build(src, str(tmp_path / "clean.zarr"), spec=spec, client=client, **OPTS)
    set_fault(client, fault)
    try:
        with pytest.raises(InjectedFault):
            distann.build(src, str(tmp_path / "r.zarr"), spec=spec, client=client, **OPTS)
    finally:
        set_fault(client, None)
    resumed = distann.build(src, str(tmp_path / "r.zarr"), spec=spec, client=client, **OPTS)
    assert resumed.manifest.build["resumed_chunks"] >= 1
    a, b = clean.lists.load_all(), resumed.lists.load_all()
    for name in ("codes", "ids", "offsets", "raw"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(clean.centroids, resumed.centroids)
    for name, array in clean.codec.arrays().items():
        np.testing.assert_array_equal(array, resumed.codec.arrays()[name])
    for x, y in zip(clean.search(xq, k=K, nprobe=4), resumed.search(xq, k=K, nprobe=4)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("spec, match", [
    ("IVF16,PQ5", "PQ5: 5 sub-quantizers do not divide the dimension 32"),
    ("PCA64,IVF16,Flat", "PCA64: a PCA cannot output more dimensions than it receives \\(32\\)"),
    ("IVF4,PQ4x8", "at least 256 training vectors"),
])
def test_bad_codec_specs_fail_before_any_task(data, tmp_path, spec, match):
    _, xb, _ = data
    x = xb[:200] if "x8" in spec else xb
    with pytest.raises(ValidationError, match=match):
        distann.build(x, str(tmp_path / "x.zarr"), spec=spec, workers=1)
    assert not (tmp_path / "x.zarr").exists()
