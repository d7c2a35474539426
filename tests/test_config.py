"""Tests of distann.config: job files, their validation, and the dask.config tunables."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest

from distann import config
from distann.config import BuildJob, KMeansJob, SearchJob, from_dict, load_config
from distann.errors import ValidationError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p for p in CONFIGS.iterdir() if p.is_file())

MINIMAL = {
    "build": {"source": "data/base.npy", "index": "out/i.zarr"},
    "search": {"index": "out/i.zarr", "queries": "data/q.npy", "out": "out/r.npz"},
    "kmeans": {"source": "data/base.npy", "out": "out/c.npy", "k": 8},
}


# --------------------------------------------------------------------------- configs/

def test_configs_directory_is_not_empty():
    names = {p.name for p in CONFIG_FILES}
    assert {"build-quickstart.yaml", "build-example.yaml", "search-example.yaml",
            "kmeans-example.yaml", "serve-example.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    kind = config.kind_from_filename(path)
    job = load_config(path, kind)
    assert isinstance(job, config.JOB_KINDS[kind])
    assert load_config(path) == job  # kind inferred from the name


def test_build_example_sets_every_key():
    text = (CONFIGS / "build-example.yaml").read_text()
    for f in dataclasses.fields(BuildJob):
        assert f"\n{f.name}:" in text, f.name


# --------------------------------------------------------------------------- defaults

def test_defaults_and_frozen():
    job = from_dict("build", MINIMAL["build"])
    assert (job.spec, job.metric, job.niter, job.seed, job.init) == ("IVF1024,Flat", "l2", 10, 1234, "random")
    assert job.max_points_per_centroid == 256 and job.chunk_rows is None and not job.overwrite
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.metric = "ip"  # type: ignore[misc]
    s = from_dict("search", MINIMAL["search"])
    assert (s.k, s.nprobe, s.radius, s.max_codes, s.batch_size) == (10, 1, None, None, None)
    km = from_dict("kmeans", MINIMAL["kmeans"])
    assert isinstance(km, KMeansJob) and km.k == 8 and km.niter == 25


def test_every_field_is_documented():
    for cls in (BuildJob, SearchJob, KMeansJob):
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"], (cls.__name__, f.name)


def test_radius_accepts_numbers_and_yaml_exponent_strings():
    assert from_dict("search", {**MINIMAL["search"], "radius": 2}).radius == 2.0
    # PyYAML reads 1e-3 (no dot) as a string
    assert from_dict("search", {**MINIMAL["search"], "radius": "1e-3"}).radius == pytest.approx(1e-3)


# --------------------------------------------------------------------------- validation

BAD_VALUES = [
    ("build", "metric", "L2"),
    ("build", "metric", "hamming"),
    ("build", "spec", "ivf1024,flat"),
    ("build", "spec", "IVF0,Flat"),
    ("build", "spec", "IVF1024,PQ8x12"),
    ("build", "spec", "IVF-3,Flat"),
    ("build", "spec", 1024),
    ("build", "niter", 0),
    ("build", "niter", 2.5),
    ("build", "niter", True),
    ("build", "niter", "25"),
    ("build", "seed", -1),
    ("build", "init", "kmeans++"),
    ("build", "workers", 0),
    ("build", "chunk_rows", -5),
    ("build", "shard_bytes", 0),
    ("build", "max_points_per_centroid", 0),
    ("build", "overwrite", "yes"),
    ("build", "source", ""),
    ("build", "index", 3),
    ("build", "storage_options", ["anon"]),
    ("search", "k", 0),
    ("search", "k", None),
    ("search", "nprobe", -1),
    ("search", "radius", "far"),
    ("search", "radius", float("nan")),
    ("search", "max_codes", 0),
    ("search", "batch_size", 0),
    ("kmeans", "k", 0),
    ("kmeans", "metric", "manhattan"),
    ("kmeans", "init", "k-means"),
    ("kmeans", "workers", -2),
]


@pytest.mark.parametrize("kind,key,value", BAD_VALUES)
def test_bad_value_names_the_key(kind, key, value):
    with pytest.raises(ValidationError) as err:
        from_dict(kind, {**MINIMAL[kind], key: value})
    assert err.value.param == f"config.{key}"
    assert f"config.{key}" in str(err.value)


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_unknown_key_is_rejected_with_allowed_keys(kind):
    with pytest.raises(ValidationError) as err:
        from_dict(kind, {**MINIMAL[kind], "nprobes": 4})
    msg = str(err.value)
    assert "config.nprobes" in msg and "unknown key" in msg
    for f in dataclasses.fields(config.JOB_KINDS[kind]):
        assert f.name in msg


def test_unknown_key_suggests_close_match():
    with pytest.raises(ValidationError, match="did you mean 'chunk_rows'"):
        from_dict("build", {**MINIMAL["build"], "chunk-rows": 10})


@pytest.mark.parametrize("kind,key", [("build", "source"), ("build", "index"), ("search", "queries"),
                                      ("search", "out"), ("kmeans", "k")])
def test_missing_required_key(kind, key):
    mapping = {k: v for k, v in MINIMAL[kind].items() if k != key}
    with pytest.raises(ValidationError, match=f"config.{key}.*required"):
        from_dict(kind, mapping)


@pytest.mark.parametrize("kind", ["build", "kmeans"])
def test_workers_and_scheduler_are_mutually_exclusive(kind):
    with pytest.raises(ValidationError) as err:
        from_dict(kind, {**MINIMAL[kind], "workers": 2, "scheduler": "tcp://localhost:8786"})
    assert "config.workers" in str(err.value) and "config.scheduler" in str(err.value)
    assert from_dict(kind, {**MINIMAL[kind], "workers": 2, "scheduler": None}).workers == 2


def test_unknown_kind():
    with pytest.raises(ValidationError, match="kind"):
        from_dict("train", {})


def test_labels_override_key_names():
    with pytest.raises(ValidationError, match="^--metric: received 'x'"):
        from_dict("build", {**MINIMAL["build"], "metric": "x"}, labels={"metric": "--metric"})


# --------------------------------------------------------------------------- files

def test_file_errors_name_file_and_key(tmp_path):
    path = tmp_path / "build-bad.yaml"
    path.write_text("source: a.npy\nindex: b.zarr\nmetric: l1\n")
    with pytest.raises(ValidationError) as err:
        load_config(path)
    assert err.value.param == f"{path}: key 'metric'"
    path.write_text("source: a.npy\nindex: b.zarr\nfoo: 1\n")
    with pytest.raises(ValidationError, match=r"key 'foo'.*allowed keys: source, index"):
        load_config(path, "build")


def test_file_not_a_mapping_or_not_yaml_or_missing(tmp_path):
    path = tmp_path / "search-x.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValidationError, match="mapping"):
        load_config(path)
    path.write_text("k: [1,\n")
    with pytest.raises(ValidationError, match="YAML"):
        load_config(path)
    with pytest.raises(ValidationError, match="existing"):
        load_config(tmp_path / "search-missing.yaml")
    path.write_text("")
    with pytest.raises(ValidationError, match="required"):
        load_config(path)


def test_kind_from_filename(tmp_path):
    assert config.kind_from_filename("configs/kmeans-big.yaml") == "kmeans"
    with pytest.raises(ValidationError, match="build-"):
        config.kind_from_filename(tmp_path / "quick.yaml")


# --------------------------------------------------------------------------- tunables

def test_tunable_defaults():
    assert config.get("build.chunk-rows") == 65536
    assert config.get("build.shard-bytes") == 32 * 2**20
    assert config.get("search.cache-bytes") == "auto"
    assert config.get("search.batch-size") == 16384
    assert config.get("kernels.backend") == "numba"
    # prefix optional, underscores accepted
    assert config.get("distann.build.chunk_rows") == 65536
    assert dask.config.get("distann.search.batch-size") == 16384


def test_tunable_dask_config_set():
    with dask.config.set({"distann.search.cache-bytes": 2**30, "distann.kernels.backend": "numpy"}):
        assert config.get("search.cache-bytes") == 2**30
        assert config.get("kernels.backend") == "numpy"
    assert config.get("search.cache-bytes") == "auto"


def test_tunable_validation():
    with dask.config.set({"distann.build.chunk-rows": 0}):
        with pytest.raises(ValidationError, match="distann.build.chunk-rows"):
            config.get("build.chunk-rows")
    with pytest.raises(ValidationError, match="must be one of"):
        config.get("build.nope")


@pytest.fixture
def refreshed_env(monkeypatch):
    """Let a test set DASK_* variables; dask's config is refreshed before and after."""
    yield monkeypatch
    monkeypatch.undo()
    dask.config.refresh()


def test_tunable_environment_override(refreshed_env):
    refreshed_env.setenv("DASK_DISTANN__BUILD__CHUNK_ROWS", "32768")  # not the default: the override must show
    refreshed_env.setenv("DASK_DISTANN__SEARCH__CACHE_BYTES", "1073741824")
    refreshed_env.setenv("DASK_DISTANN__KERNELS__BACKEND", "numpy")
    dask.config.refresh()
    assert config.get("build.chunk-rows") == 32768
    assert config.get("search.cache-bytes") == 2**30
    assert config.get("kernels.backend") == "numpy"
    assert config.get("build.shard-bytes") == 32 * 2**20  # untouched default


def test_tunable_environment_bad_value(refreshed_env):
    refreshed_env.setenv("DASK_DISTANN__SEARCH__BATCH_SIZE", "lots")
    dask.config.refresh()
    with pytest.raises(ValidationError, match="distann.search.batch-size: received 'lots'"):
        config.get("search.batch-size")


def test_environment_restored():
    assert config.get("build.chunk-rows") == 65536
    assert config.get("search.batch-size") == 16384


def test_a_setting_changed_before_distann_config_is_used_keeps_the_defaults():
    """The defect: dask.config.set of a distann key before distann.config was imported removed
    the whole distann section (defaults included) when the block exited: KeyError 'distann'."""
    code = ("import dask.config, distann\n"
            "with dask.config.set({'distann.store.chains': ['simplecache']}):\n"
            "    from distann import config  # as a first open_index inside the block would\n"
            "print(config.get('search.cache-bytes'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "auto"
