#!/usr/bin/env bash
# The GPU checks of issue 5 in one call, on a lent H100/H200 (device tool `run`, repo root):
#   carry .whl (wheels for diffusers/peft/deepspeed, see README "GPU checks"), then: bash bench/gpu_check.sh
# Builds the C++/CUDA extensions in place, runs the GPU tests, then prints the benchmark table.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 setup.py build_ext --inplace 2>&1 | tail -3
# kernels/ is installed as densegrpo_fast.kernels; in place, link it
[ -e densegrpo_fast/kernels ] || ln -s ../kernels densegrpo_fast/kernels
python3 -c "import densegrpo_fast.ops as o; print('backends:', o.available_backends())"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_sources.py tests/test_graphs.py tests/test_sde_step.py \
  tests/test_sde_logprob.py tests/test_grpo_loss.py 2>&1 | tail -5
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py
