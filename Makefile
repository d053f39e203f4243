# The README's commands. Each creates its own virtual environment (.venv) and installs into it:
# torch's CPU wheel first, pinned by constraints.txt, so no step can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIN := -c constraints.txt
STAMP := $(VENV)/.peftkern-installed
PYTEST_ARGS ?=
# A second environment with the Triton the lent GPU machines run (3.6), for the static compile
# only: `peftkern kernels` must give 0 spills under both versions. `make test` runs it too.
TRITON36 ?= 3.6.0
VENV36 ?= .venv-triton36
PY36 := $(VENV36)/bin/python
STAMP36 := $(VENV36)/.peftkern-triton$(TRITON36)

.PHONY: install demo test ctest browser kernels kernels36 bench gpu-check clean

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*/*.cu csrc/*/*.cuh csrc/*/*.cpp csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(PIN) "setuptools>=68" wheel "pybind11>=2.12" ninja
	$(PIP) install -q $(PIN) --no-build-isolation -e ".[dev,bench,peers,label,label-test]"
	touch $(STAMP)

# torch's CPU wheel, Triton $(TRITON36) and what `import peftkern` needs; peftkern itself from the
# source tree (PYTHONPATH), so this environment never builds anything.
$(STAMP36): constraints.txt
	test -x $(PY36) || $(PYTHON) -m venv $(VENV36)
	$(PY36) -m pip install -q torch==2.13.0
	$(PY36) -m pip install -q "triton==$(TRITON36)" "safetensors>=0.4"
	touch $(STAMP36)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftkern demo --out demo_out

test: $(STAMP) $(STAMP36) ctest browser
	$(VENV)/bin/peftkern info
	PEFTKERN_STATIC_PYTHONS=$(CURDIR)/$(PY36) $(PY) -m pytest -q -ra $(PYTEST_ARGS)

# C++ unit tests of the csrc/ math on the host (the fatbin itself is built by setup.py).
ctest:
	cmake -S . -B build/cmake -DPEFTKERN_BUILD_FATBIN=OFF > /dev/null
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

# Headless Chromium for the labelling page's browser test (Debian's packages; the test skips, saying
# why, where there is none). Never fails: without root or apt-get it leaves things as they are.
browser:
	-@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium chromium-driver || { apt-get update -q && \
	    apt-get install -y -q chromium chromium-driver; }; } >/dev/null 2>&1; } || \
	  echo "browser: no chromium (the labelling page's browser test will skip)"

kernels: $(STAMP)
	$(VENV)/bin/peftkern kernels

# The static report under Triton $(TRITON36); OP=logprobs (or lora, dora, nf4, adamw, ...) for one op.
kernels36: $(STAMP36)
	PYTHONPATH=$(CURDIR) $(PY36) -m peftkern kernels $(if $(OP),--op $(OP))

bench: $(STAMP)
	$(VENV)/bin/peftkern bench

# The first-GPU check (docs/gpu-check.md): every CUDA-only path, one JSON report in benchmarks/results.
# It runs in the Python that has the GPU's torch (GPU_PYTHON, default python3), never in the CPU .venv,
# and skips with exit 0 where no GPU is visible. The fatbin is rebuilt first when csrc/ changed and nvcc
# is there (else the CUDA face compiles csrc/ with NVRTC, or reports why it cannot).
GPU_PYTHON ?= $(PYTHON)
GPU_CHECK_ARGS ?=
gpu-check:
	@if command -v nvcc >/dev/null 2>&1 && { [ ! -f peftkern/_kernels.fatbin ] || \
	    [ -n "$$(find csrc -newer peftkern/_kernels.fatbin -name '*.cu*' 2>/dev/null)" ]; }; then \
	  PEFTKERN_BUILD_CUDA=1 $(GPU_PYTHON) setup.py -q build_ext --inplace || \
	    echo "gpu-check: building the fatbin failed; the check reports what the CUDA face can do without it"; \
	fi
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info peftkern/_host*.so peftkern/_kernels.fatbin
