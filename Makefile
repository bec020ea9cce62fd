# The two commands of the README. Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
export PYTHONUNBUFFERED := 1

.PHONY: test test-all demo estimators toy clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

test: $(VENV)/.installed-test  ## the test suite without tests marked slow
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.installed-test  ## every test, slow ones included
	$(PY) -m pytest -q

demo: $(VENV)/.installed  ## end-to-end OPD on synthetic arithmetic, outputs in workdir/demo
	$(PY) -m opd_jax.main --config=experiments/tiny_arith.py --config.workdir=workdir/demo

estimators: $(VENV)/.installed  ## the estimator comparison table
	$(PY) -m opd_jax.main --config=experiments/estimator_table.py

toy: $(VENV)/.installed  ## the paper's toy variance study (App. E), outputs in workdir/toy_variance
	$(PY) -m opd_jax.main --config=experiments/toy_variance.py --config.workdir=workdir/toy_variance

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
