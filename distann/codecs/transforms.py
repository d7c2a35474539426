"""Pre-transforms: linear maps applied to every vector (at add time) and every query (at search
time) before the coarse quantizer, as Faiss's ``IndexPreTransform`` does.

Each is ``y = (x - mean) @ A.T`` with ``A`` of shape (d_out, d_in) and orthonormal rows (or
columns, when a random rotation goes to more dimensions), so ``reverse`` is ``y @ A + mean``:
exact for rotations, the least-squares back-projection for reductions.

* ``PCA<D>`` (Faiss ``PCAMatrix``): the D leading eigenvectors of the sample covariance.
  ``PCAR<D>`` then applies a random rotation in the D-dimensional output (Faiss's
  ``random_rotation``), which spreads the variance evenly over the dimensions.
* ``RR<D>`` (Faiss ``RandomRotationMatrix``): a seeded random orthonormal matrix, no training.
* ``OPQ<M>[_<D>]`` (Faiss ``OPQMatrix``, Ge et al. 2013): starting from a random rotation,
  alternate training a PQ with M sub-quantizers on the rotated sample and solving the
  orthogonal Procrustes problem for the rotation that best maps the sample onto its PQ
  reconstruction. Same schedule as Faiss: 50 iterations, 40 k-means iterations in the first,
  4 in the others, at most 65,536 training points.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distann.codecs.base import Transform

OPQ_NITER = 50
OPQ_NITER_PQ_FIRST = 40
OPQ_NITER_PQ = 4
OPQ_MAX_TRAIN = 256 * 256


def random_rotation(d_in: int, d_out: int, seed) -> np.ndarray:
    """A (d_out, d_in) float32 matrix with orthonormal rows (d_out <= d_in) or columns."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((max(d_in, d_out), min(d_in, d_out))))
    q *= np.sign(np.diag(r))[None, :]  # a uniform (Haar) rotation, not one biased by QR's signs
    return np.ascontiguousarray(q.T if d_out <= d_in else q, dtype=np.float32)


class LinearTransform(Transform):
    """``y = (x - mean) @ A.T``; subclasses say how ``A`` (and ``mean``) are obtained."""

    def __init__(self, d_in: int, d_out: int, seed: int = 0):
        super().__init__(d_in, d_out)
        self.seed = int(seed)
        self.mean = np.zeros(d_in, dtype=np.float32)
        self.matrix = np.zeros((d_out, d_in), dtype=np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return np.ascontiguousarray((x - self.mean) @ self.matrix.T, dtype=np.float32)

    def reverse(self, y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(y, dtype=np.float32) @ self.matrix + self.mean, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "seed": self.seed}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "matrix": self.matrix}

    def load(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.mean = np.ascontiguousarray(arrays["mean"], dtype=np.float32)
        self.matrix = np.ascontiguousarray(arrays["matrix"], dtype=np.float32)


class PCATransform(LinearTransform):
    kind = "PCA"

    def __init__(self, d_in: int, d_out: int, seed: int = 0, rotate: bool = False):
        super().__init__(d_in, d_out, seed)
        self.rotate = rotate
        self.kind = "PCAR" if rotate else "PCA"

    def train(self, x: np.ndarray, seed: int) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.fit_moments(len(x), x.sum(axis=0), x.T @ x)

    def fit_moments(self, n: int, s1: np.ndarray, s2: np.ndarray) -> None:
        """Fit from the sample's count, sum (d,) and sum of outer products (d, d): moments that
        blocks of a distributed sample can add up."""
        mean = s1 / n
        cov = s2 / n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        top = vectors[:, np.argsort(values)[::-1][:self.d_out]].T  # (d_out, d_in), leading first
        if self.rotate:
            top = random_rotation(self.d_out, self.d_out, [self.seed, 0x9CA]) @ top
        self.mean = mean.astype(np.float32)
        self.matrix = np.ascontiguousarray(top, dtype=np.float32)


class RandomRotation(LinearTransform):
    kind = "RR"

    def __init__(self, d_in: int, d_out: int, seed: int = 0):
        super().__init__(d_in, d_out, seed)
        self.matrix = random_rotation(d_in, d_out, [seed, 0x22])

    @property
    def needs_training(self) -> bool:
        return False

    def train(self, x: np.ndarray, seed: int) -> None:
        """Nothing to learn: the rotation is drawn from the seed."""


class OPQTransform(LinearTransform):
    kind = "OPQ"

    def __init__(self, d_in: int, d_out: int, m: int, seed: int = 0):
        super().__init__(d_in, d_out, seed)
        self.m = int(m)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "m": self.m}

    def train(self, x: np.ndarray, seed: int) -> None:
        from distann.codecs.pq import PQQuantizer
        from distann.train.kmeans import kmeans_local

        rng = np.random.default_rng([seed, 0x0B9])
        x = np.asarray(x, dtype=np.float32)
        if len(x) > OPQ_MAX_TRAIN:
            x = x[np.sort(rng.choice(len(x), OPQ_MAX_TRAIN, replace=False))]
        pq = PQQuantizer(self.d_out, self.m, 8)  # needs >= 256 training points (checked by the build)
        rotation = random_rotation(self.d_in, self.d_out, [seed, 0x0B8])
        books = None
        for it in range(OPQ_NITER):
            y = np.ascontiguousarray(x @ rotation.T, dtype=np.float32)
            niter = OPQ_NITER_PQ_FIRST if it == 0 else OPQ_NITER_PQ
            books = np.stack([kmeans_local(pq.subspace(y, m), pq.ksub, niter, [seed, it, m],
                                           init=None if books is None else books[m]) for m in range(self.m)])
            pq.set_codebooks(books)
            recon = pq.decode(pq.encode(y))
            # orthogonal Procrustes: the rotation with orthonormal rows minimizing ||x R^T - recon||
            u, _, vt = np.linalg.svd(recon.T.astype(np.float64) @ x.astype(np.float64), full_matrices=False)
            rotation = np.ascontiguousarray(u @ vt, dtype=np.float32)
        self.matrix = rotation
