# The two commands (README): `make demo` runs the main job, `make test` runs the tests.
# Both create or reuse the virtual environment in $(VENV) and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradmod-installed

.PHONY: demo test test-all docs docs-check bench-speed bench-step-cost gpu-check bench-accuracy mutation catalogue clean

# gradmod (editable) with its trainer extras, and the dev and reference dependency groups of
# pyproject.toml: what the tests, docs, demo and benchmarks need, not part of the published package
# (pip >= 25.1 installs groups).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade 'pip>=25.1'
	$(PY) -m pip install --quiet -e '.[lightning,transformers]' --group dev --group reference
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m reference_models.demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

docs: $(STAMP)
	$(PY) -m mkdocs build --strict

# The site as a reader sees it: builds it, serves it on 127.0.0.1, screenshots every page in
# headless Chromium (site-check/screenshots/) and fails on horizontal overflow at 1280 px, broken
# internal links, unrendered math or requests that need the network. Not part of `make test`.
docs-check: $(STAMP)
	command -v chromium >/dev/null || { apt-get update && apt-get install -y chromium; }
	$(PY) tools/docs_check.py --out site-check

bench-speed: $(STAMP)
	$(PY) benchmarks/speed.py

# Every method's training step and epoch against a plain one (docs/benchmarks/speed.md): about 7 minutes.
bench-step-cost: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/step_cost.py

# The first GPU run in one command (benchmarks/gpu_check.py): kernel tests compiled, capture and compile
# checks, the speed benchmark; writes benchmarks/results/speed_gpu.json and the GPU section of
# docs/benchmarks/speed.md within 8 minutes. Uses the virtual environment when there is one, else
# $(PYTHON) as it is (a GPU machine may have torch and Triton installed and no network).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py

bench-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py

# Mutation testing of the core modules (tools/mutation.py, docs/testing.md): mutmut runs the fast unit,
# property and seam tests against every mutant, prints the kill rate per module and writes it to
# benchmarks/results/mutation.json. About ten minutes on two cores; not part of `make test`.
mutation: $(STAMP)
	$(PY) -c 'import mutmut' 2>/dev/null || $(PY) -m pip install --quiet 'mutmut==3.8.1'
	$(PY) tools/mutation.py

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .hypothesis

# The lists of methods in mkdocs.yml, docs/ and the READMEs, rewritten from gradmod.METHODS (tools/catalogue.py);
# tests/test_catalogue.py fails when one is stale.
catalogue: $(STAMP)
	$(PY) tools/catalogue.py
