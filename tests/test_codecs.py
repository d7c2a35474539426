"""Codecs on their own, without a cluster: the spec grammar, each quantizer's round trip, the
pre-transforms (held to Faiss where Faiss has the same one), and the pipeline's serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from distann.codecs.pipeline import CodecPipeline
from distann.codecs.pq import PQQuantizer
from distann.codecs.spec import parse_spec
from distann.codecs.sq import SQ8Quantizer, SQfp16Quantizer
from distann.codecs.transforms import OPQTransform, PCATransform, RandomRotation, random_rotation
from distann.errors import ValidationError

faiss = pytest.importorskip("faiss")


def anisotropic(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Correlated data with a decaying spectrum: a random rotation of axes of variances 1/i."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1))
    return np.ascontiguousarray(x @ random_rotation(d, d, seed + 1), dtype=np.float32)


# ------------------------------------------------------------------------------- spec grammar

@pytest.mark.parametrize("spec", ["IVF1024,Flat", "IVF8,SQ8", "IVF8,SQfp16", "IVF1024,PQ16", "IVF64,PQ8x4",
                                  "OPQ16,IVF1024,PQ16", "OPQ16_64,IVF1024,PQ16", "PCA32,IVF16,SQ8",
                                  "PCAR32,IVF1024,SQ8", "RR64,IVF16,Flat", "IVF1024,PQ16,RFlat",
                                  "PCA48,RR48,IVF8,PQ12"])
def test_specs_parse_to_their_canonical_form(spec):
    assert str(parse_spec(spec)) == spec


def test_spec_fields():
    s = parse_spec("OPQ16_64,IVF1024,PQ16x4,RFlat")
    assert (s.nlist, s.refine, s.codec, s.quantizer.m, s.quantizer.nbits) == (1024, True, "PQ", 16, 4)
    assert (s.transforms[0].kind, s.transforms[0].m, s.transforms[0].d_out) == ("OPQ", 16, 64)
    assert s.dims(96) == [96, 64]


@pytest.mark.parametrize("spec, match", [
    ("IVF8", "a quantizer after IVF8"),
    ("Flat", "an IVF<nlist> part"),
    ("HNSW32,Flat", "an IVF<nlist> part"),
    ("LSH,IVF8,Flat", "unsupported part 'LSH'"),
    ("IVF8,SQ4", "unsupported quantizer 'SQ4'"),
    ("IVF8,PQ4x9", "PQ4x9: PQ codes of 1 to 8 bits"),
    ("IVF8,PQ0", "PQ0: PQ<M> with M >= 1"),
    ("IVF0,Flat", "IVF<nlist> with nlist >= 1"),
    ("IVF8,Flat,RFlat,PQ4", "nothing after the quantizer but an optional RFlat"),
    ("IVF8,Flat,Refine", "nothing after the quantizer but an optional RFlat"),
    ("PCA0,IVF8,Flat", "PCA0: an output dimension >= 1"),
    ("", "a spec string"),
])
def test_bad_specs_name_what_is_wrong(spec, match):
    with pytest.raises(ValidationError, match=match):
        parse_spec(spec)


@pytest.mark.parametrize("spec, d, match", [
    ("IVF8,PQ5", 96, r"PQ5: 5 sub-quantizers do not divide the dimension 96 .* use PQ4, or first a transform to a "
                     r"multiple of 5: OPQ5_95 or PCA95, RR100"),
    ("PCA128,IVF8,Flat", 96, "PCA128: a PCA cannot output more dimensions than it receives"),
    ("OPQ16_40,IVF8,PQ8", 96, "OPQ16_40: its 16 sub-quantizers must divide its output dimension 40"),
    ("PCA30,IVF8,PQ8", 96, "PQ8: 8 sub-quantizers do not divide the dimension 30"),
])
def test_spec_that_does_not_fit_the_dimension(spec, d, match):
    with pytest.raises(ValidationError, match=match):
        CodecPipeline.create(spec, d, "l2")


# ------------------------------------------------------------------------------- quantizers

def test_sq8_round_trip_error_bound():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5000, 24)) * rng.uniform(0.1, 10, 24)).astype(np.float32)
    x[:, 3] = 7.0  # a constant dimension reconstructs exactly
    q = SQ8Quantizer(24)
    q.train(x, 0)
    codes = q.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    err = np.abs(q.decode(codes) - x)
    # inside the trained range a component is off by at most half a step, vdiff / 510, plus
    # float32 rounding of the decode (a few ulps of the range)
    assert (err <= q.vdiff / 510 * (1 + 1e-4) + 1e-6 * np.abs(x).max()).all()
    assert (err[:, 3] == 0).all()
    # outside the range: clamped to its ends
    far = q.decode(q.encode(np.full((1, 24), 1e6, np.float32)))
    np.testing.assert_allclose(far[0], q.vmin + q.vdiff * (255.5 / 255), rtol=1e-6)


def test_sq8_matches_faiss_codes():
    """Same training range and the same 8-bit codes as Faiss's QT_8bit on the same data."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    q = SQ8Quantizer(16)
    q.train(x, 0)
    ref = faiss.ScalarQuantizer(16, faiss.ScalarQuantizer.QT_8bit)
    ref.train(x)
    ours, theirs = q.encode(x[:500]), ref.compute_codes(x[:500])
    # a component exactly on a step boundary may round either way in float32
    assert (np.abs(ours.astype(int) - theirs.astype(int)) <= 1).all() and (ours == theirs).mean() > 0.999


def test_fp16_round_trip():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 17)).astype(np.float32) * 100
    q = SQfp16Quantizer(17)
    codes = q.encode(x)
    assert codes.dtype == np.uint16
    np.testing.assert_allclose(q.decode(codes), x, rtol=2.0 ** -11)  # half precision: 11-bit significand
    big = q.decode(q.encode(np.array([[1e9] * 17], np.float32)))
    assert np.isfinite(big).all() and big[0, 0] == np.float32(65504)  # clamped, not inf


def test_pq_encodes_each_subvector_to_its_nearest_centroid():
    x = anisotropic(4000, 32)
    q = PQQuantizer(32, 8, 6)  # 64 centroids per sub-space
    q.train(x, 0)
    codes = q.encode(x[:300])
    assert codes.shape == (300, 8) and codes.dtype == np.uint8 and codes.max() < 64
    for m in range(8):
        sub = x[:300, m * 4:(m + 1) * 4].astype(np.float64)
        d2 = ((sub[:, None, :] - q.codebooks[m].astype(np.float64)[None]) ** 2).sum(-1)
        chosen = d2[np.arange(300), codes[:, m]]
        assert (chosen <= d2.min(1) * (1 + 1e-5) + 1e-7).all()
    rec = q.decode(codes)
    np.testing.assert_array_equal(rec[:, 4:8], q.codebooks[1][codes[:, 1]])


def test_pq_error_falls_with_more_subquantizers():
    x = anisotropic(6000, 32)
    errs = []
    for m in (2, 4, 8, 16):
        q = PQQuantizer(32, m)
        q.train(x, 0)
        errs.append(float(((q.decode(q.encode(x)) - x) ** 2).sum(1).mean()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 2


def test_pq_mse_close_to_faiss():
    """Same training schedule as Faiss's ProductQuantizer: the reconstruction error agrees within
    5% (k-means from different random starts)."""
    x = anisotropic(20000, 32, seed=4)
    q = PQQuantizer(32, 8)
    q.train(x, 0)
    ours = ((q.decode(q.encode(x)) - x) ** 2).sum(1).mean()
    pq = faiss.ProductQuantizer(32, 8, 8)
    pq.train(x)
    theirs = ((pq.decode(pq.compute_codes(x)) - x) ** 2).sum(1).mean()
    assert ours <= 1.05 * theirs, (ours, theirs)


# ------------------------------------------------------------------------------- transforms

def test_pca_matches_faiss_pcamatrix():
    x = anisotropic(5000, 24)
    t = PCATransform(24, 8)
    t.train(x, 0)
    ref = faiss.PCAMatrix(24, 8)
    ref.train(x)
    ours, theirs = t.apply(x[:100]), ref.apply(x[:100])
    signs = np.sign((ours * theirs).sum(0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(ours * signs, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())


def test_rotations_are_orthonormal_and_reversible():
    x = anisotropic(500, 20)
    for t in (RandomRotation(20, 20, 3), PCATransform(20, 20, 3, rotate=True)):
        t.train(x, 0)
        np.testing.assert_allclose(t.matrix @ t.matrix.T, np.eye(20), atol=1e-5)
        np.testing.assert_allclose(t.reverse(t.apply(x)), x, atol=1e-4)
    up = RandomRotation(20, 32, 3)  # to more dimensions: columns orthonormal, norms kept
    np.testing.assert_allclose(np.linalg.norm(up.apply(x), axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


def _pq_mse(x: np.ndarray, transforms: list) -> float:
    y = x
    for t in transforms:
        t.train(y, 0)
        y = t.apply(y)
    q = PQQuantizer(y.shape[1], 8)
    q.train(y, 0)
    rec = q.decode(q.encode(y))
    for t in reversed(transforms):
        rec = t.reverse(rec)
    return float(((rec - x) ** 2).sum(1).mean())


def test_opq_and_pca_lower_the_error_of_plain_pq_on_anisotropic_data():
    """Axis-aligned variances decaying as 1/i: plain PQ puts the largest ones in the same
    sub-space; a rotation balances them (PCAR), and OPQ learns the best one. Thresholds: the
    error must drop by more than k-means's seed-to-seed noise (about 1% here)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((12000, 32)) / np.sqrt(np.arange(1, 33))).astype(np.float32)
    plain = _pq_mse(x, [])
    opq = _pq_mse(x, [OPQTransform(32, 32, 8, seed=1)])
    pcar = _pq_mse(x, [PCATransform(32, 32, seed=1, rotate=True)])
    assert opq < 0.92 * plain and pcar < 0.97 * plain, (plain, opq, pcar)


# ------------------------------------------------------------------------------- pipeline

@pytest.mark.parametrize("spec", ["IVF4,Flat", "IVF4,SQ8", "IVF4,SQfp16", "OPQ4,IVF4,PQ4", "PCAR8,IVF4,PQ4x6",
                                  "RR16,IVF4,SQ8,RFlat"])
def test_pipeline_serialises_and_restores(spec):
    x = anisotropic(3000, 16)
    p = CodecPipeline.create(spec, 16, "l2", seed=7)
    y = x
    for t in p.transforms:
        t.train(y, 0)
        y = t.apply(y)
    centroids = y[:4].copy()
    assign = np.arange(len(y)) % 4
    p.quantizer.train(y - centroids[assign], 0)
    codes = p.encode(y, assign, centroids)
    arrays = p.arrays()
    q = CodecPipeline.load(p.params(), lambda name: arrays[name])
    np.testing.assert_array_equal(q.encode(q.transform(x), assign, centroids), codes)
    np.testing.assert_array_equal(q.reconstruct(codes, assign, centroids), p.reconstruct(codes, assign, centroids))
    assert str(q.spec) == spec and q.refine == spec.endswith("RFlat")
