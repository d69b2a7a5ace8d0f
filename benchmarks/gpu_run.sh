#!/usr/bin/env bash
# Every GPU check and benchmark of docs/performance.md, in one run on a GPU machine.
#
# The GPU machine had torch and transformers but not the geospatial packages. Put their wheels,
# with every dependency (they are installed with --no-deps, from no index), for that machine's
# Python in .whl/ (git ignores it) and copy it there with the checkout, e.g.
#   pip download --only-binary=:all: --python-version 3.X --dest .whl rasterio pyogrio shapely pyproj
# The scripts import the checkout's backend/ and trainer/ directly (no install). Logs go to $OUT
# (default /tmp/gpu-out). BATCHES and SIZES override the benchmarks' batch sizes and raster
# sides; SKIP_PYTEST=1 skips the test run.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/backend:$PWD/trainer${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers, rasterio, pyogrio
print('torch', torch.__version__, 'transformers', transformers.__version__,
      'rasterio', rasterio.__version__, 'pyogrio', pyogrio.__version__)"; } 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
}

step checks 120 python3 benchmarks/gpu_checks.py
step bench_unigeoseg 150 python3 benchmarks/bench_unigeoseg.py \
    --model unigeoseg-official-sparseconv --batch-sizes "${BATCHES:-1,8,16,32}" --modes eager,graphs \
    --repeats 10
step bench_raster 200 python3 benchmarks/bench_raster_text.py --sizes "${SIZES:-4000,8000}" \
    --device cuda --random-model unigeoseg-official-sparseconv --batch-size 32 \
    --nodata-grid 1000 --workdir /tmp
[ -n "${SKIP_PYTEST:-}" ] || step pytest_model 60 python3 -m pytest tests/model -q -x -p no:cacheprovider -k "not full_size"
