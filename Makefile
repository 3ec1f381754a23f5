# The two commands (README): `make demo` runs the main job, `make test` runs the tests.
# Both create or reuse the virtual environment in $(VENV) and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradmod-installed

.PHONY: demo test test-all docs bench-speed bench-accuracy clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,reference]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m reference_models.demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

docs: $(STAMP)
	$(PY) -m mkdocs build --strict

bench-speed: $(STAMP)
	$(PY) benchmarks/speed.py

bench-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .hypothesis
