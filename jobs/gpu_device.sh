#!/usr/bin/env bash
# One command for a lent GPU machine (H100 / H200, 16 cores, no package registry): install the
# carried wheels, run the gpu-marked tests on the real device, then the GPU benchmark, all within
# the device's 10-minute limit for one command. Results and logs go to $OUT.
#
# Here, first:  make gpu-wheels          (downloads the wheels the machine lacks into .whl/)
# Device call:  bash jobs/gpu_device.sh [bench_gpu.py options]      with carry [".whl"]
#
# Environment (all optional):
#   GPU_DEVICE_LIMIT  seconds the whole command may take (default 570: the 600 s limit minus a margin)
#   GPU_TEST_LIMIT    seconds for the tests (default 180); SKIP_TESTS=1 skips them
#   SKIP_BENCH=1      only the tests
# Extra arguments go to jobs/bench_gpu.py, e.g. `--n 5000000` or `--phases kmeans`.
set -u
T0=$SECONDS
LIMIT=${GPU_DEVICE_LIMIT:-570}
OUT=${OUT:-/tmp/distann-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
section() { echo; echo "===== [$(( SECONDS - T0 )) s] $*"; }

section "1/4 machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cores: $(nproc); $($PY -V 2>&1) at $(command -v $PY)"

section "2/4 carried wheels -> /tmp/site"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "FAILED: installing the carried wheels"; exit 1; }
else
    echo "no .whl/*.whl here: run 'make gpu-wheels' and call with carry [\".whl\"]"; exit 1
fi
# distann itself from the working tree (no install step needed)
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'EOF' || { echo "FAILED: imports"; exit 1; }
import importlib
for name in ("numpy", "numba", "numba.cuda", "cupy", "torch", "dask", "distributed", "zarr", "distann"):
    m = importlib.import_module(name)
    print(f"{name:12s} {getattr(m, '__version__', '')}  {getattr(m, '__file__', '')}")
from distann.kernels import available_backends
print("backends:", available_backends())
from distann.kernels.cuda import device_info
print("device:", device_info())
EOF

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    section "3/4 gpu-marked tests on the device (log: \$OUT/gpu-tests.log)"
    tests=(tests/test_kernels.py)
    [ -f tests/test_cuda.py ] && tests+=(tests/test_cuda.py)
    DISTANN_TEST_GPU=1 timeout "${GPU_TEST_LIMIT:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider "${tests[@]}" \
        > "$OUT/gpu-tests.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/gpu-tests.log"
    [ $rc = 124 ] && echo "tests STOPPED at GPU_TEST_LIMIT=${GPU_TEST_LIMIT:-180} s"
    echo "pytest exit status: $rc"
else
    section "3/4 tests skipped (SKIP_TESTS=1)"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    budget=$(( LIMIT - (SECONDS - T0) - 25 ))
    section "4/4 benchmark, time budget ${budget} s (log: \$OUT/bench-gpu.log)"
    if [ $budget -lt 60 ]; then
        echo "too little time left for the benchmark"
    else
        # the script writes $OUT/gpu.json and gpu.md after every step; timeout is the last resort
        timeout $(( budget + 20 )) $PY jobs/bench_gpu.py --out "$OUT" --time-budget "$budget" "$@" \
            > "$OUT/bench-gpu.log" 2>&1
        rc=$?
        grep -v " distributed\." "$OUT/bench-gpu.log" | tail -n 60
        echo "benchmark exit status: $rc"
    fi
fi
section "done; \$OUT holds: $(ls "$OUT" | tr '\n' ' ')"
