#!/usr/bin/env bash
# The GPU check in one call (docs/gpu.md): bash bench/gpu_check.sh [--cpu] [OUT]   (OUT defaults to runs/gpu_check)
# On a bare GPU machine (repo root, .whl/ carried from `make gpu-bundle`): installs what the image lacks from .whl/
# into a private folder, builds the C++/CUDA extensions in place, prints the device, then bench/gpu_check.py runs
# the GPU tests and the timings and prints the table last. --cpu: tiny sizes in this interpreter, nothing installed
# or built (the suite runs this: tests/test_gpu_check.py). PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CPU=""
OUT=runs/gpu_check
for a in "$@"; do
  case "$a" in
    --cpu) CPU=--cpu ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) OUT=$a ;;
  esac
done
if [ -z "$CPU" ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  SITE=${GPU_CHECK_SITE:-/tmp/densegrpo_gpu_site}
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" bench/gpu_wheels.py install .whl "$SITE" || echo "gpu_check: wheel install failed" >&2
    export PYTHONPATH=$SITE:$PYTHONPATH PATH=$SITE/bin:$PATH   # bin/: ninja for the extension build
  else
    echo "gpu_check: no .whl/ (run make gpu-bundle here and carry .whl): using the image's packages" >&2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # kernels/ is installed as densegrpo_fast.kernels; in place, link it
  [ -e densegrpo_fast/kernels ] || ln -s ../kernels densegrpo_fast/kernels
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q build_ext --inplace > /tmp/gpu_check_build.log 2>&1 \
    || { echo "gpu_check: build_ext failed (tail of /tmp/gpu_check_build.log):" >&2; tail -20 /tmp/gpu_check_build.log >&2; }
  grep -iE "warning: optional extension|error" /tmp/gpu_check_build.log | tail -5
fi
mkdir -p "$OUT"
PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py $CPU "$OUT"
