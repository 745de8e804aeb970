# Two commands for a newcomer: `make train` (the default job) and `make test` (the suite; `make test-fast` for the
# unit tier). All install on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch lies on this machine's disk (pip's find-links); on a GPU machine override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/shapes_default.yaml
RUN_ARGS ?=

.PHONY: install test test-fast train bench bench-vs-flow-grpo bench-gpu cuda-check gpu-bundle clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)" ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[test,ocr]"
	$(BIN)/python -c "import densegrpo_fast.ops as o; print('densegrpo_fast installed; ops backends:', o.available_backends())"
	touch $(STAMP)

# The fast tier: unit tests, ops, credit by hand, config; no process launches (tests/conftest.py enforces it).
test-fast: $(STAMP)
	DENSEGRPO_TEST_TIER=fast $(BIN)/python -m pytest tests -m "not slow" -p no:cacheprovider --durations=10; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; exit $$rc

# The whole suite on two workers; the tests that launch DeepSpeed share one worker (their ports and /dev/shm).
test: $(STAMP)
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup -p no:cacheprovider --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; exit $$rc

train: $(STAMP)
	$(BIN)/python train.py --config $(CONFIG) $(RUN_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest bench -p no:cacheprovider --benchmark-columns=min,median,mean,rounds -q

# Throughput against Flow-GRPO's own code: FLOW_GRPO_SRC=a local checkout of github.com/yifan123/flow_grpo.
FLOW_GRPO_SRC ?=
BENCH_ARGS ?=
bench-vs-flow-grpo: $(STAMP)
	@test -n "$(FLOW_GRPO_SRC)" || { echo "usage: make bench-vs-flow-grpo FLOW_GRPO_SRC=/path/to/flow_grpo [BENCH_ARGS='--columns defaults']" >&2; exit 2; }
	$(BIN)/python bench/vs_flow_grpo.py --flow-grpo-src "$(FLOW_GRPO_SRC)" $(BENCH_ARGS)

# Compile the CUDA sources with the machine's nvcc (no GPU needed); CI runs this through the test suite too.
cuda-check:
	nvcc -std=c++17 -O3 -arch=sm_90 -c csrc/sde_ops_kernels.cu -o /tmp/sde_ops_kernels.o && echo "nvcc: csrc/sde_ops_kernels.cu compiles"

# Wheels a bare GPU machine lacks (bench/gpu_wheels.py: diffusers, DeepSpeed built from its sdist, their missing
# dependencies, pytest), for CPython 3.12 manylinux x86_64, pinned to this venv's versions, into .whl/ (ignored).
# Then on the GPU machine, with .whl carried: bash bench/gpu_check.sh OUT (docs/gpu.md).
WHL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-bundle: $(STAMP)
	rm -rf .whl && mkdir -p .whl/sdist
	$(BIN)/python bench/gpu_wheels.py pins > .whl/pins.txt
	$(BIN)/python bench/gpu_wheels.py pins --sdist > .whl/sdist-pins.txt
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
	  $(WHL_PLATFORMS) -d .whl -r .whl/pins.txt
	$(BIN)/pip download -q --no-deps --no-binary=:all: -d .whl/sdist -r .whl/sdist-pins.txt
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl .whl/sdist/*.tar.gz
	rm -rf .whl/sdist
	-git rev-parse HEAD > .whl/commit.txt 2>/dev/null
	@ls -1 .whl/*.whl
	@du -cb .whl/*.whl | tail -1 | awk '{printf "gpu-bundle: %d wheels, %.1f MiB in .whl/\n", '"$$(ls .whl/*.whl | wc -l)"', $$1 / 1048576}'

clean:
	rm -rf build *.egg-info densegrpo_fast/_C*.so runs/
