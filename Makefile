# distann — the two quickstart commands are `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: quickstart test test-all bench-build bench-search bench-codecs bench-serve bench-bigbatch bench-s3 bench-scale bench-gpu gpu-wheels install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e ".[test,bench,serve]"
	touch $@

install: $(VENV)/.installed

## Generate vectors, build an index on an embedded local Dask cluster, search it, print recall/QPS/build time
quickstart: $(VENV)/.installed
	$(PY) jobs/quickstart.py

## The default test suite (what CI runs)
test: $(VENV)/.installed
	$(PY) -m pytest -q

## Everything, including the slow cases
test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m "not gpu"

bench-build: $(VENV)/.installed
	$(PY) jobs/bench_build.py

bench-search: $(VENV)/.installed
	$(PY) jobs/bench_search.py

## Every codec against faiss-cpu on the same data (about 40 minutes on 2 cores)
bench-codecs: $(VENV)/.installed
	$(PY) jobs/bench_codecs.py

## Cluster-hosted search: distributed vs local batch QPS, the HTTP service under load, a worker killed (about 15 minutes)
bench-serve: $(VENV)/.installed
	$(PY) jobs/bench_serve.py

## Dedup and self-kNN at 1M x 64 against exact brute force and faiss-cpu, worker memory vs queries
bench-bigbatch: $(VENV)/.installed
	$(PY) jobs/bench_bigbatch.py

## Search on S3 (a moto server on loopback, +0 and +20 ms per request) vs local disk, with and without a cache
## (about 10 minutes on 2 cores; docs/benchmarks/s3.md)
bench-s3: $(VENV)/.installed
	$(PY) jobs/bench_s3.py $(BENCH_S3_ARGS)

## The 1B plan's inputs (docs/SCALE.md): ivf vs exact coarse quantizer, per-stage throughput of one core, the
## 1B build graph on 32-64 worker processes (about an hour on 2 cores; one part: BENCH_SCALE_ARGS="--parts simulate")
bench-scale: $(VENV)/.installed
	$(PY) jobs/bench_scale.py $(BENCH_SCALE_ARGS)

## The GPU benchmark (cuda vs numba vs PyTorch brute force, ceilings, k-means) on a machine with a GPU;
## on a lent device machine run `bash jobs/gpu_device.sh` instead (docs/benchmarks/gpu.md)
bench-gpu: $(VENV)/.installed
	$(PY) jobs/bench_gpu.py $(BENCH_GPU_ARGS)

## Wheels the lent GPU machine lacks (jobs/gpu_wheels.txt), for Python 3.12 x86-64, into .whl/ (git-ignored);
## a device call carries them: carry [".whl"], command `bash jobs/gpu_device.sh`
GPU_WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-wheels: $(VENV)/.installed
	rm -rf .whl && mkdir -p .whl
	grep -Ev '^[[:space:]]*(#|$$)' jobs/gpu_wheels.txt | xargs $(PY) -m pip download -q --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp $(GPU_WHEEL_PLATFORMS) -d .whl
	@ls .whl | sed 's/^/  /'; du -sh .whl

clean:
	rm -rf $(VENV) data out .pytest_cache
	find distann -name __pycache__ -type d -prune -exec rm -rf {} +  # also Numba's on-disk kernel cache
