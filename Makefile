# Set-up and everyday commands. `make test` and `make demo` install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# A registry download cut short (CI once failed on 'Connection broken: IncompleteRead', which pip
# does not retry) is tried again, up to three times, before the set-up gives up.
RETRY := for try in 1 2 3; do
UNTIL := && break; [ $$try = 3 ] && exit 1; echo "pip failed (try $$try of 3), trying again"; sleep 10; done
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo jobs clean nezha-reference

setup: $(STAMP)

# torch first, pinned to the CPU build on these machines' disk: a bare `torch` requirement
# would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(RETRY) $(PIP) install -q --upgrade pip $(UNTIL)
	$(RETRY) $(PIP) install -q torch==2.13.0 $(UNTIL)
	$(RETRY) $(PIP) install -q -e ".[test,embed]" $(UNTIL)
	touch $(STAMP)

# the layers contract first (seconds), then the suite
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# the development loop: every test but those marked slow (README: Development)
test-fast: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/rayinfer demo

# Every job in jobs/, as written, with its output checked (fetches the catalog models once).
jobs: setup
	$(PY) jobs/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Regenerate tests/data/nezha-* with transformers 4.57.6 (the last release with NEZHA), in its
# own virtualenv: CI only reads the committed files.
nezha-reference:
	$(PYTHON) -m venv /tmp/rayinfer-nezha-ref
	/tmp/rayinfer-nezha-ref/bin/pip install -q torch==2.13.0 transformers==4.57.6
	/tmp/rayinfer-nezha-ref/bin/python tests/data/make_nezha_reference.py
