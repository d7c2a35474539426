"""Bad-input sweep (issue 12, part 5): Hypothesis draws parameters of the public API — search,
range_search, build, open_index, brute_force_knn, kmeans — good and bad mixed, and every call
either succeeds with a correct result (searches probing every list are compared with a NumPy
brute force; others are checked for shapes and invariants) or raises
:class:`distann.errors.ValidationError` naming one of the parameters this test made bad, never
another exception. Builds refused for a bad parameter must fail before any task reaches the
scheduler (its transition counter does not move) and write nothing; the committed index is
byte-for-byte and result-for-result unchanged at the end.

One small index (IVF4,Flat, 300 x 8, l2) is built once for the module on the session's cluster.
"""

from __future__ import annotations

import math
import os
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import distann
from distann.errors import IndexExistsError, IndexFormatError, ValidationError
from distann.validation import is_int

N, D, NLIST = 300, 8, 4
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)


@pytest.fixture(scope="module")
def committed(client, tmp_path_factory):
    root = tmp_path_factory.mktemp("properties")
    data = np.random.default_rng(11).standard_normal((N, D)).astype(np.float32)
    url = str(root / "index")
    index = distann.build(data, url, spec=f"IVF{NLIST},Flat", client=client, niter=4)
    probe = data[:16] + 0.01
    with open(os.path.join(url, "manifest.json"), "rb") as f:
        manifest = f.read()
    return Committed(index=index, data=data, url=url, root=root, manifest=manifest,
                     baseline=index.search(probe, 10, NLIST), probe=probe)


class Committed(dict):
    """The module's index and what it looked like when built (a short repr for Hypothesis reports)."""

    def __repr__(self) -> str:
        return f"<committed index at {self['url']}>"


# --------------------------------------------------------------------------- strategies

def mostly(good, bad):
    """``good`` three times in four: most examples then reach the result checks (a flat one_of
    over many bad branches would make nearly every call a refusal)."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 0 else good)


def good_queries():
    return st.tuples(st.sampled_from([np.float32, np.float64]), st.integers(0, 6)).flatmap(
        lambda t: hnp.arrays(t[0], (t[1], D), elements=st.floats(-10, 10, width=32)))


def numbers():
    """Anything a caller might pass for an integer parameter."""
    return st.one_of(
        st.integers(-3, 40), st.integers(-3, 40).map(np.int64), st.integers(0, 40).map(np.uint16),
        st.integers(-2**70, -1), st.integers(2**50, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
        st.just(np.bool_(True)), st.none(), st.text(max_size=3), st.just([2]), st.just(np.float32(3.0)))


def _float_elements(width: int):
    special = st.sampled_from([math.nan, math.inf, -math.inf])
    return st.one_of(st.floats(-100, 100, width=width), special) if width else st.floats(-100, 100)


@st.composite
def queries(draw):
    """Query arrays of every dtype and shape, NaN/Inf included, and things that are no array."""
    kind = draw(st.sampled_from(["float32", "float32", "float64", "float16", "int32", "uint8", "complex64",
                                 "bool", "object", "list", "ragged", "huge", "scalar", "none", "text"]))
    nq = draw(st.integers(0, 5))
    d = draw(st.sampled_from([D, D, D, D - 1, D + 1]))
    ndim = draw(st.sampled_from([2, 2, 2, 1, 3]))
    shape = {1: (d,), 2: (nq, d), 3: (nq, 1, d)}[ndim]
    if kind in ("float32", "float64", "float16"):
        width = {"float32": 32, "float64": 64, "float16": 16}[kind]
        finite = draw(st.booleans()) or draw(st.booleans())
        elements = st.floats(-100, 100, width=width) if finite else _float_elements(width)
        return draw(hnp.arrays(np.dtype(kind), shape, elements=elements))
    if kind in ("int32", "uint8", "bool", "complex64"):
        return draw(hnp.arrays(np.dtype(kind), shape))
    if kind == "object":
        return draw(hnp.arrays(np.dtype(object), shape, elements=st.floats(-10, 10)))
    if kind == "list":
        return draw(hnp.arrays(np.float64, shape, elements=st.floats(-10, 10))).tolist()
    if kind == "ragged":
        return [[1.0] * D, [1.0] * (D - 1)]
    if kind == "huge":  # finite in float64, infinite once converted to float32
        return np.full((1, D), 1e300)
    return {"scalar": 3.0, "none": None, "text": "0,1,2"}[kind]


def id_filters():
    return st.one_of(
        st.none(), hnp.arrays(np.int64, st.integers(0, 40), elements=st.integers(-5, N + 5)),
        hnp.arrays(np.uint32, st.integers(0, 20), elements=st.integers(0, N)),
        hnp.arrays(np.bool_, st.integers(0, N + 10)), hnp.arrays(np.float64, 3, elements=st.floats(0, 9)),
        hnp.arrays(np.int64, (2, 2), elements=st.integers(0, 9)), st.just([1, 2, 3]), st.just("1,2"))


# --------------------------------------------------------------------------- oracles

def _int_in(v, lo, hi=None) -> bool:
    return is_int(v) and v >= lo and (hi is None or v <= hi)


def query_problem(xq) -> bool:
    """True when distann must refuse ``xq``: not float32/float64 (lists convert to float64), not
    (nq, D), or not finite in float32."""
    if isinstance(xq, list):
        try:
            xq = np.asarray(xq)
        except ValueError:
            return True
    if not isinstance(xq, np.ndarray) or xq.dtype not in (np.float32, np.float64):
        return True
    if xq.ndim != 2 or xq.shape[1] != D:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return not np.isfinite(xq.astype(np.float32)).all()


def ids_problem(allowed) -> bool:
    return allowed is not None and (not isinstance(allowed, np.ndarray) or allowed.ndim != 1
                                    or allowed.dtype.kind not in "biu")


def allowed_mask(allowed) -> np.ndarray:
    mask = np.ones(N, bool)
    if allowed is None:
        return mask
    if allowed.dtype.kind == "b":
        mask[:] = False
        mask[:min(N, len(allowed))] = allowed[:N]
        return mask
    return np.isin(np.arange(N), allowed.astype(np.int64))


def exact_l2(data, xq) -> np.ndarray:
    x, q = data.astype(np.float64), np.asarray(xq, np.float64)
    return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def expect_validation(call, bad: set[str]):
    """Run ``call``; a ValidationError must name a parameter in ``bad``, and ``bad`` empty means
    success. Any other exception fails the test. Returns the result or None."""
    try:
        out = call()
    except ValidationError as exc:
        assert bad, f"refused a valid call: {exc}"
        assert exc.param in bad, f"{exc.param!r} named, but the bad parameters are {sorted(bad)}: {exc}"
        event(f"refused: {exc.param}")
        return None
    assert not bad, f"accepted bad {sorted(bad)}"
    event("accepted")
    return out


# --------------------------------------------------------------------------- search and range_search

def search_problems(xq, nprobe, max_codes, allowed) -> set[str]:
    """The parameters shared by search and range_search that distann must refuse."""
    bad = set()
    if query_problem(xq):
        bad.add("xq")
    if nprobe is not None and not _int_in(nprobe, 1, NLIST):
        bad.add("nprobe")
    if max_codes is not None and not _int_in(max_codes, 1, 2**63 - 1):
        bad.add("max_codes")
    if ids_problem(allowed):
        bad.add("ids_allowed")
    return bad


@settings(max_examples=300, **SETTINGS)
@given(xq=mostly(good_queries(), queries()), k=mostly(st.integers(1, 12), numbers()),
       nprobe=mostly(st.sampled_from([NLIST, NLIST, 1, 2, None]), numbers()),
       max_codes=mostly(st.sampled_from([None, None, 20, 100]), numbers()), allowed=mostly(st.none(), id_filters()))
def test_search_sweep(committed, xq, k, nprobe, max_codes, allowed):
    index, data = committed["index"], committed["data"]
    bad = search_problems(xq, nprobe, max_codes, allowed)
    if k is not None and not _int_in(k, 1):
        bad.add("k")
    if is_int(k) and k >= 2**50:  # results that cannot fit in memory are refused, not attempted
        bad.add("k")
    out = expect_validation(lambda: index.search(xq, k, nprobe, max_codes=max_codes, ids_allowed=allowed), bad)
    if out is None:
        return
    Dr, Ir = out
    k_ = 10 if k is None else int(k)
    xq = np.asarray(xq, np.float32)
    assert Dr.shape == Ir.shape == (len(xq), k_) and Dr.dtype == np.float32 and Ir.dtype == np.int64
    dist, mask = exact_l2(data, xq), allowed_mask(allowed)
    for q in range(len(xq)):
        found = Ir[q][Ir[q] >= 0]
        n_found = len(found)
        assert (Ir[q, n_found:] == -1).all() and np.isinf(Dr[q, n_found:]).all()
        assert len(set(found.tolist())) == n_found and mask[found].all()
        np.testing.assert_allclose(Dr[q, :n_found], dist[q, found], rtol=1e-4, atol=1e-3)
        assert (np.diff(Dr[q, :n_found]) >= -1e-4).all()
        if (nprobe is None and NLIST > 1) or max_codes is not None or nprobe != NLIST:
            continue
        best = np.sort(dist[q, mask])[:k_]  # every list probed: exactly the brute force top-k
        assert n_found == len(best)
        np.testing.assert_allclose(Dr[q, :n_found], best, rtol=1e-4, atol=1e-3)


def radii():
    return st.one_of(st.floats(0, 40), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 30),
                     st.booleans(), st.none(), st.text(max_size=2), st.just(np.float32(12.5)), st.just([1.0]))


@settings(max_examples=200, **SETTINGS)
@given(xq=mostly(good_queries(), queries()), radius=mostly(st.floats(0, 12), radii()),
       nprobe=mostly(st.sampled_from([NLIST, NLIST, 1, 2, None]), numbers()),
       max_codes=mostly(st.sampled_from([None, None, 20, 100]), numbers()), allowed=mostly(st.none(), id_filters()))
def test_range_search_sweep(committed, xq, radius, nprobe, max_codes, allowed):
    index, data = committed["index"], committed["data"]
    bad = search_problems(xq, nprobe, max_codes, allowed)
    if isinstance(radius, (bool, np.bool_)) or not isinstance(radius, (int, float, np.integer, np.floating)) \
            or not np.isfinite(radius) or radius < 0:
        bad.add("radius")
    out = expect_validation(
        lambda: index.range_search(xq, radius, nprobe, max_codes=max_codes, ids_allowed=allowed), bad)
    if out is None:
        return
    lims, Dr, Ir = out
    xq = np.asarray(xq, np.float32)
    assert lims.shape == (len(xq) + 1,) and lims[0] == 0 and (np.diff(lims) >= 0).all()
    assert len(Dr) == len(Ir) == lims[-1]
    dist, mask = exact_l2(data, xq), allowed_mask(allowed)
    for q in range(len(xq)):
        ids, dq = Ir[lims[q]:lims[q + 1]], Dr[lims[q]:lims[q + 1]]
        assert mask[ids].all() and len(set(ids.tolist())) == len(ids)
        np.testing.assert_allclose(dq, dist[q, ids], rtol=1e-4, atol=1e-3)
        assert (dq < radius + 1e-3).all()
        if max_codes is not None or nprobe != NLIST:
            continue
        margin = 1e-3 * max(1.0, float(radius))
        sure = set(np.flatnonzero(mask & (dist[q] < radius - margin)).tolist())
        maybe = set(np.flatnonzero(mask & (dist[q] < radius + margin)).tolist())
        assert sure <= set(ids.tolist()) <= maybe


# --------------------------------------------------------------------------- build

def _transitions(client) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)


_BAD_URLS = ["", "{root}/x/../y", "simplecache::file://{root}/y", "http://127.0.0.1:9/y", "data:abc",
             "{root}/nul\x00", "zip://a::file://{root}/y.zip"]

#: parameter -> strategy of values that are wrong for it (the other parameters stay valid)
_BAD_BUILD = {
    "spec": st.one_of(st.sampled_from(["", "IVF0,Flat", "IVF-1,Flat", "IVF4", "IVF4,PQ3", f"IVF{N + 1},Flat",
                                       "Flat", "IVF4,SQ9", "IVF4,PQ16", "IVF4,Flat,Flat", "PCA0,IVF4,Flat",
                                       "IVF4,PQ4x99", "OPQ3,IVF4,PQ3"]),
                      st.text(alphabet="IVFPQSRlat0123456789,_x ", max_size=12), st.integers(), st.none()),
    "metric": st.one_of(st.sampled_from(["L2", "euclidean", "", "dot", "cos"]), st.integers(), st.none()),
    "chunk_rows": st.one_of(st.integers(-5, 0), st.floats(), st.booleans(), st.text(max_size=2),
                            st.just(np.float64(64))),
    "shard_bytes": st.one_of(st.integers(-5, 0), st.floats(), st.booleans(), st.text(max_size=2)),
    "chunk_bytes": st.one_of(st.integers(-5, 0), st.floats(), st.booleans(), st.text(max_size=2)),
    "niter": st.one_of(st.integers(-5, 0), st.floats(), st.booleans(), st.none()),
    "seed": st.one_of(st.floats(), st.booleans(), st.none(), st.text(max_size=2)),
    "init": st.one_of(st.sampled_from(["kmeans++", "", "Random"]), st.integers(), st.none()),
    "max_points_per_centroid": st.one_of(st.integers(-5, 0), st.floats(), st.booleans()),
    "overwrite": st.one_of(st.sampled_from(["yes", 1, None, np.bool_(True)])),
    "index_url": st.one_of(st.sampled_from(_BAD_URLS), st.integers(), st.none()),
    "ids": st.one_of(  # checked before any task: length, dtype, shape, kind
        hnp.arrays(np.int64, st.integers(0, N - 1).filter(lambda n: n != N)),
        hnp.arrays(np.float64, N), hnp.arrays(np.int64, (N, 2)), st.just(list(range(N))), st.just(3.5),
        st.just("/nonexistent/ids.npy")),
    "source": st.one_of(
        hnp.arrays(np.float32, st.sampled_from([(N,), (N, D, 1), (0, D)])), hnp.arrays(np.complex64, (N, D)),
        hnp.arrays(np.dtype(object), (N, D), elements=st.just(1.0)), st.none(), st.integers(),
        st.just("/nonexistent/x.npy"), st.just([[1.0] * D] * N)),
}


@settings(max_examples=150, **SETTINGS)
@given(param=st.sampled_from(sorted(_BAD_BUILD)), data=st.data(), onto_committed=st.booleans())
def test_build_sweep_refuses_before_any_task(client, committed, param, data, onto_committed):
    value = data.draw(_BAD_BUILD[param], label=param)
    root = str(committed["root"])
    url = committed["url"] if onto_committed else os.path.join(root, f"b-{uuid.uuid4().hex[:8]}")
    kwargs = dict(spec=f"IVF{NLIST},Flat", metric="l2", niter=2, client=client)
    source = committed["data"]
    if param == "source":
        source = value
    elif param == "index_url":
        url = value.replace("{root}", root) if isinstance(value, str) else value
    else:
        kwargs[param] = value
    before = _transitions(client)
    try:
        index = distann.build(source, url, **kwargs)
    except ValidationError as exc:
        assert exc.param == param or (param == "ids" and exc.param == "ids_column"), exc
        assert _transitions(client) == before, f"tasks were scheduled before {param} was refused"
    except IndexExistsError:
        # a random spec that happened to be valid, onto the committed index: refused, not built over
        assert param == "spec" and onto_committed
    else:  # a random spec that happened to be valid: then it built a working index
        assert param == "spec" and not onto_committed
        assert index.search(committed["data"][:3], 1, 1)[1][:, 0].tolist() == [0, 1, 2]
        return
    if isinstance(url, str) and url != committed["url"] and os.path.isabs(url) and "\x00" not in url:
        assert not os.path.exists(url), f"{url} was written"
    with open(os.path.join(committed["url"], "manifest.json"), "rb") as f:
        assert f.read() == committed["manifest"]


@pytest.mark.parametrize("bad, param", [
    ("duplicate", "ids"), ("negative", "ids"), ("nan", "source")])
def test_build_checks_done_by_tasks_write_no_index(client, committed, tmp_path, bad, param):
    """Ids and values of an out-of-core source are checked by the sample / add tasks (the data
    need not fit the client): refused naming the parameter, nothing committed."""
    x, ids = committed["data"].copy(), np.arange(N, dtype=np.int64)
    if bad == "duplicate":
        ids[7] = ids[3]
    elif bad == "negative":
        ids[5] = -1
    else:
        x[N - 2, 1] = np.nan
    with pytest.raises(ValidationError) as err:
        distann.build(x, str(tmp_path / "i"), spec=f"IVF{NLIST},Flat", ids=ids, client=client, niter=2)
    assert err.value.param == param
    assert not (tmp_path / "i" / "manifest.json").exists()


# --------------------------------------------------------------------------- open_index

@settings(max_examples=100, **SETTINGS)
@given(which=st.sampled_from(["committed", "missing", "bad"]), bad_url=st.sampled_from(_BAD_URLS + [None, 5]),
       cache_bytes=mostly(st.sampled_from([None, "auto", 0, 2**20]), numbers()),
       replicas=mostly(st.just(1), st.one_of(numbers(), st.sampled_from([True, np.True_, 1.0, 2]))),
       options=st.one_of(st.none(), st.just({}), st.just([1]), st.just("anon"), st.just({"protocol": "http"})))
def test_open_index_sweep(committed, which, bad_url, cache_bytes, replicas, options):
    root = str(committed["root"])
    url = {"committed": committed["url"], "missing": os.path.join(root, "nothing-here"),
           "bad": bad_url.replace("{root}", root) if isinstance(bad_url, str) else bad_url}[which]
    bad = set()
    if cache_bytes is not None and cache_bytes != "auto" and not _int_in(cache_bytes, 0):
        bad.add("cache_bytes")
    if which == "bad":
        bad.add("url")
    if replicas != 1 or isinstance(replicas, (bool, np.bool_)):
        bad.add("replicas")
    if options is not None and not isinstance(options, dict) or isinstance(options, dict) and options:
        bad.add("storage_options")
    try:
        index = expect_validation(
            lambda: distann.open_index(url, storage_options=options, cache_bytes=cache_bytes, replicas=replicas), bad)
    except IndexFormatError:
        assert which == "missing" and not bad  # a well-formed URL holding no index
        return
    if index is not None:
        Dr, Ir = index.search(committed["probe"], 10, NLIST)
        np.testing.assert_array_equal(Ir, committed["baseline"][1])


# --------------------------------------------------------------------------- brute_force_knn and kmeans

# the client's event loop thread uses the random module while Hypothesis draws the next example;
# Hypothesis takes that for a strategy using it (ours do not)
@pytest.mark.filterwarnings("ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning")
@settings(max_examples=50, **SETTINGS)
@given(xq=mostly(good_queries(), queries()), k=mostly(st.integers(1, 12), numbers()),
       metric=mostly(st.sampled_from(["l2", "ip", "cosine"]), st.sampled_from(["L2", "", None, 3])),
       chunk_rows=mostly(st.sampled_from([None, 64, 400]), numbers()))
def test_brute_force_knn_sweep(client, committed, xq, k, metric, chunk_rows):
    data = committed["data"]
    bad = set()
    if not _int_in(k, 1) or (is_int(k) and k >= 2**50):
        bad.add("k")
    if metric not in ("l2", "ip", "cosine"):
        bad.add("metric")
    if query_problem(xq):
        bad.add("queries")
    if chunk_rows is not None and not _int_in(chunk_rows, 1):
        bad.add("chunk_rows")
    out = expect_validation(lambda: distann.brute_force_knn(data, xq, k, metric, client=client,
                                                            chunk_rows=chunk_rows), bad)
    if out is None:
        return
    Dr, Ir = out
    xq = np.asarray(xq, np.float32)
    assert Dr.shape == Ir.shape == (len(xq), int(k))
    if metric == "l2" and len(xq):
        best = np.sort(exact_l2(data, xq), axis=1)[:, :min(int(k), N)]
        np.testing.assert_allclose(Dr[:, :best.shape[1]], best, rtol=1e-4, atol=1e-3)


@pytest.mark.filterwarnings("ignore::distann.train.kmeans.TrainingWarning")  # small k-means samples warn
@pytest.mark.filterwarnings("ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning")
@settings(max_examples=40, **SETTINGS)
@given(k=mostly(st.integers(1, 6), numbers()), niter=mostly(st.integers(1, 3), numbers()),
       metric=mostly(st.sampled_from(["l2", "cosine"]), st.just("L1")),
       init=mostly(st.sampled_from(["random", "k-means++"]), st.just("kmeans")),
       seed=mostly(st.integers(0, 99), st.one_of(st.floats(), st.none())),
       chunk_rows=mostly(st.sampled_from([None, 50, 400]), numbers()))
def test_kmeans_sweep(client, committed, k, niter, metric, init, seed, chunk_rows):
    data = committed["data"][:200]
    bad = set()
    if not _int_in(k, 1, len(data)):
        bad.add("k")
    if not _int_in(niter, 1) or (is_int(niter) and niter > 50):
        if not _int_in(niter, 1):
            bad.add("niter")
        else:
            assume(False)  # valid but slow
    if metric not in ("l2", "ip", "cosine"):
        bad.add("metric")
    if init not in ("random", "k-means++", "k-means||"):
        bad.add("init")
    if not is_int(seed):
        bad.add("seed")
    if chunk_rows is not None and not _int_in(chunk_rows, 1):
        bad.add("chunk_rows")
    result = expect_validation(lambda: distann.kmeans(data, k, niter=niter, metric=metric, init=init, seed=seed,
                                                      chunk_rows=chunk_rows, client=client), bad)
    if result is not None:
        assert result.centroids.shape == (int(k), D) and np.isfinite(result.centroids).all()


# --------------------------------------------------------------------------- the committed index afterwards

def test_committed_index_unchanged(committed):
    """Runs last in this module: nothing above changed the committed index."""
    with open(os.path.join(committed["url"], "manifest.json"), "rb") as f:
        assert f.read() == committed["manifest"]
    again = distann.open_index(committed["url"]).search(committed["probe"], 10, NLIST)
    np.testing.assert_array_equal(again[1], committed["baseline"][1])
    np.testing.assert_array_equal(again[0], committed["baseline"][0])
    assert committed["index"].verify()["shards"] >= 1
