"""The coarse quantizer of an IVF index: which list a vector is added to, which lists a query probes.

Two kinds, both over the same ``nlist`` centroids (``docs/FORMAT.md``, "Coarse quantizer"):

* ``flat`` (every index up to ``TWO_LEVEL_NLIST`` lists): every vector is compared with every
  centroid, a GEMM plus a top-k (the kernels' ``coarse_quantize`` / ``assign``). Exact.
* ``ivf`` (two-level indexes, ``nlist >= TWO_LEVEL_NLIST``): an inverted file *over the
  centroids*. The ``nlist1`` (about sqrt(nlist)) level-1 centroids of the two-level k-means are
  its lists; every fine centroid sits in the list of its nearest level-1 centroid. A vector is
  compared with the level-1 centroids, then with the fine centroids of its ``nprobe`` nearest
  level-1 lists only, scanned list-major by the same kernel as an IVF-Flat search
  (``scan_lists``). With ``nlist1 = sqrt(nlist)`` a vector costs ``sqrt(nlist) * (1 + nprobe)``
  distance computations instead of ``nlist``: 33x fewer at 2^20 lists and the default nprobe.

The ``ivf`` kind is approximate: a vector whose true nearest centroids sit in a level-1 list it
does not probe gets the best ones of the lists it does probe. ``jobs/bench_scale.py`` measures
what that costs (top-nprobe lists found against exact quantization); ``nprobe`` trades it
against speed and can be changed on an opened index (``index.quantizer.nprobe``).
"""

from __future__ import annotations

import numpy as np

from distann.errors import ValidationError

#: two-level k-means and the ``ivf`` coarse quantizer from this many lists on (2^14)
TWO_LEVEL_NLIST = 16384
#: level-1 lists an ``ivf`` quantizer probes per vector when the build names none
DEFAULT_QUANTIZER_NPROBE = 16
_SCAN_ENTRIES = 1 << 22  # (rows x level-1 probes x k) partial results per scan block: 48 MiB


def level1_size(nlist: int) -> int:
    """Level-1 clusters of a two-level k-means of ``nlist`` centroids: round(sqrt(nlist))."""
    return max(1, int(round(np.sqrt(nlist))))


def check_quantizer_nprobe(nprobe: object, nlist1: int, param: str = "quantizer_nprobe") -> int:
    from distann.validation import is_int

    if not is_int(nprobe) or not 1 <= int(nprobe) <= nlist1:
        raise ValidationError(param, nprobe, f"an integer from 1 to the number of level-1 lists ({nlist1})")
    return int(nprobe)


class FlatQuantizer:
    """Exact coarse quantization: every vector against every centroid."""

    kind = "flat"

    def __init__(self, centroids: np.ndarray):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    def search(self, x: np.ndarray, nprobe: int, kmetric: str, kern) -> tuple[np.ndarray, np.ndarray]:
        """The ``nprobe`` best lists of every row of ``x``: (D, I) of shape (n, nprobe), best first."""
        return kern.coarse_quantize(np.ascontiguousarray(x, dtype=np.float32), self.centroids, nprobe, kmetric)

    def assign(self, x: np.ndarray, kmetric: str, kern) -> np.ndarray:
        """The best list of every row of ``x`` (ties to the smaller list number)."""
        return kern.assign(np.ascontiguousarray(x, dtype=np.float32), self.centroids, kmetric)

    def params(self) -> dict:
        return {"kind": self.kind}

    def arrays(self) -> dict[str, np.ndarray]:
        return {}


class IVFQuantizer(FlatQuantizer):
    """Approximate coarse quantization through an inverted file over the centroids.

    ``top`` (nlist1, d): the level-1 centroids; ``members`` (nlist,) int64: the centroid numbers
    grouped by level-1 list, list ``j`` being ``members[offsets[j]:offsets[j + 1]]``;
    ``nprobe``: level-1 lists searched per vector.
    """

    kind = "ivf"

    def __init__(self, centroids: np.ndarray, top: np.ndarray, members: np.ndarray, offsets: np.ndarray,
                 nprobe: int):
        super().__init__(centroids)
        self.top = np.ascontiguousarray(top, dtype=np.float32)
        self.members = np.ascontiguousarray(members, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if (self.top.ndim != 2 or self.top.shape[1] != self.centroids.shape[1]
                or self.offsets.shape != (len(self.top) + 1,) or self.offsets[0] != 0
                or self.offsets[-1] != len(self.members) or (np.diff(self.offsets) < 0).any()
                or len(self.members) != len(self.centroids)
                or not np.array_equal(np.sort(self.members), np.arange(len(self.centroids)))):
            raise ValueError("IVFQuantizer: level-1 arrays do not describe the centroids")
        self.nprobe = check_quantizer_nprobe(nprobe, len(self.top))
        self._derive()

    def _derive(self) -> None:
        self._rows = np.ascontiguousarray(self.centroids[self.members])  # centroids grouped by level-1 list
        self._sizes = np.diff(self.offsets)

    def __getstate__(self) -> dict:
        # the grouped copy of the centroids is derived: not shipped (a broadcast to the workers
        # would carry the centroids twice, 776 MiB instead of 388 MiB at 2^20 lists and d = 96)
        return {k: v for k, v in self.__dict__.items() if k not in ("_rows", "_sizes")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._derive()

    @classmethod
    def build(cls, centroids: np.ndarray, top: np.ndarray, kmetric: str, nprobe: int, kern) -> "IVFQuantizer":
        """Group ``centroids`` under their nearest level-1 centroid of ``top`` (exact: nlist x nlist1)."""
        labels = kern.assign(np.ascontiguousarray(centroids, dtype=np.float32),
                             np.ascontiguousarray(top, dtype=np.float32), kmetric)
        members = np.argsort(labels, kind="stable").astype(np.int64)
        offsets = np.zeros(len(top) + 1, dtype=np.int64)
        np.cumsum(np.bincount(labels, minlength=len(top)), out=offsets[1:])
        return cls(centroids, top, members, offsets, nprobe)

    @property
    def nlist1(self) -> int:
        return len(self.top)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        """Level-1 lists searched per vector: may be changed on an opened index, within [1, nlist1]."""
        self._nprobe = check_quantizer_nprobe(value, len(self.top))

    def search(self, x: np.ndarray, nprobe: int, kmetric: str, kern) -> tuple[np.ndarray, np.ndarray]:
        from distann.search.plan import expand_to_all_lists, plan_probes

        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(x)
        cq = self.nprobe
        D = np.empty((n, nprobe), dtype=np.float32)
        I = np.empty((n, nprobe), dtype=np.int64)
        valid = np.empty(0, dtype=np.uint8)
        step = max(1, _SCAN_ENTRIES // (cq * nprobe))
        for s in range(0, n, step):
            xs = x[s:s + step]
            _, top = kern.coarse_quantize(xs, self.top, cq, kmetric)
            plan = plan_probes(top, self._sizes)
            groups = expand_to_all_lists(plan, self.nlist1)
            pd, pi = kern.scan_lists(xs, self._rows, self.members, self.offsets, self.top, groups,
                                     plan.group_queries, plan.group_slots, plan.group_limits, valid, cq, nprobe,
                                     kmetric)
            d, i = kern.merge_topk(pd.reshape(len(xs), -1), pi.reshape(len(xs), -1), nprobe, kmetric)
            short = np.flatnonzero((i < 0).any(axis=1))
            if len(short):  # the probed level-1 lists hold fewer than nprobe centroids: exact for these rows
                d[short], i[short] = kern.coarse_quantize(xs[short], self.centroids, nprobe, kmetric)
            D[s:s + step], I[s:s + step] = d, i
        return D, I

    def assign(self, x: np.ndarray, kmetric: str, kern) -> np.ndarray:
        return self.search(x, 1, kmetric, kern)[1][:, 0].copy()

    def params(self) -> dict:
        return {"kind": self.kind, "nlist1": self.nlist1, "nprobe": self.nprobe}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"top": self.top, "members": self.members, "member_offsets": self.offsets}


def load_quantizer(params: dict, centroids: np.ndarray, read) -> FlatQuantizer:
    """The quantizer a manifest's ``quantizer`` section describes (empty: flat); ``read(name)``
    returns one of its arrays."""
    kind = (params or {}).get("kind", "flat")
    if kind == "flat":
        return FlatQuantizer(centroids)
    if kind == "ivf":
        q = IVFQuantizer(centroids, read("top"), read("members"), read("member_offsets"), params["nprobe"])
        if params.get("nlist1", q.nlist1) != q.nlist1:
            raise ValueError(f"the quantizer section names {params['nlist1']} level-1 lists, its arrays {q.nlist1}")
        return q
    raise ValueError(f"unknown coarse quantizer kind {kind!r}")
