# distann — the two quickstart commands are `make quickstart` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: quickstart test test-all bench-build bench-search bench-codecs bench-serve bench-bigbatch install clean

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

clean:
	rm -rf $(VENV) data out .pytest_cache
	find distann -name __pycache__ -type d -prune -exec rm -rf {} +  # also Numba's on-disk kernel cache
