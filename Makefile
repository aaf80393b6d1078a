# make demo : set up .venv, build the extension, run the main job on built-in data
# make test : set up .venv, build the extension, run the tests
# A second run reuses the venv and rebuilds the extension only when csrc/ or setup.py changed.
# `make test` always compiles the CUDA kernels when nvcc is present (that is how CI checks that they build);
# `make demo` on a machine with no GPU builds the C++ kernels only (the CUDA ones could not run there), unless
# a full build is already up to date.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
INSTALL := $(PY) -m pip install -q --no-build-isolation --no-deps -e .
REPORT_BACKENDS := $(PY) -c "import simu_fast, json; print(json.dumps(simu_fast.backends()))"

.PHONY: setup build test test-gpu demo bench clean

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(KERNEL_SOURCES) setup.py pyproject.toml
	MAX_JOBS=$${MAX_JOBS:-2} $(INSTALL)
	$(REPORT_BACKENDS)
	touch $@ $(VENV)/.built-cpu

# the C++ kernels only; a full build that is up to date serves as well
$(VENV)/.built-cpu: $(VENV)/.deps $(KERNEL_SOURCES) setup.py pyproject.toml
	if [ -f $(VENV)/.built ] && [ -z "$$(find $(KERNEL_SOURCES) setup.py pyproject.toml -newer $(VENV)/.built)" ]; then \
		echo "using the full build"; \
	else \
		rm -f $(VENV)/.built; SIMU_FAST_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} $(INSTALL) && $(REPORT_BACKENDS); \
	fi
	touch $@

setup: $(VENV)/.deps
build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

test-gpu: build
	$(PY) -m pytest -q -m gpu tests

demo: $(if $(HAS_GPU),build,$(VENV)/.built-cpu)
	$(PY) -m simu_fast demo

bench: build
	$(PY) -m bench

clean:
	rm -rf build simu_fast/*.so *.egg-info $(VENV)/.built $(VENV)/.built-cpu
