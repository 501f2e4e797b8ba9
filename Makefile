# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if needed, install, run the main job on the built-in default
#   make test   the same install, then the whole test suite (what CI runs)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fusion_rl-installed
# Threads TVM uses for tuning and timing; set explicitly (TVM picks 1 here otherwise).
export TVM_NUM_THREADS ?= 2
# pytest-xdist processes for `make test`: one per core of CI's 2. Most of a test's time is a
# single-threaded TVM/LLVM build, and no test asserts a time, so two run side by side.
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast test-corpus clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The core is `pip install .`; the demo and the tests also train, evaluate and use hf_* models.
	$(PY) -m pip install -q -e '.[dev,train,hf]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/fusion-rl demo

test: install
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) -m "not corpus" tests

# The ONNX import corpus: 12 architectures x 2 exporters, every rule set verified (long: the
# exports alone take minutes; scripts/onnx_corpus.py writes the same as a table).
test-corpus: install
	$(PY) -m pytest -q -ra -m corpus tests

# The unit tier only (no TVM build, no worker process; tiers: tests/conftest.py): for the edit-test loop.
test-fast: install
	$(PY) -m pytest -q -m unit tests

clean:
	rm -rf $(VENV) .pytest_cache
