# `make demo` runs the default job; `make test` runs the suite (what CI runs); `make test-fast`
# runs every test not marked slow. All create .venv on first use (with the optional tracker
# extras, so their tests run) and reinstall only when pyproject.toml changes. Both test targets
# run the tests on PYTEST_WORKERS processes (pytest-xdist), a test module's tests in one of them
# (they share its fixtures: a data set, the local stack): much of the suite waits on Ray, not on
# the CPU. PYTEST_WORKERS=0 runs them in this process.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: demo install test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,mlflow,wandb]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cmacc pretrain $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
