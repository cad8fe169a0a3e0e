# Two commands do everything on a fresh machine: `make up` runs the system, `make test` runs the tests.
# The venv is built once (torch==2.13.0 first, so pip never pulls a multi-GB CUDA build on a CPU machine).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: up test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/turboserve up

# pytest exits 5 when it collects nothing (e.g. a filtered run); that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench: $(STAMP)
	$(PY) bench/model.py && $(PY) bench/wire.py && $(PY) bench/e2e.py && $(PY) bench/event_loop.py && $(PY) bench/state.py && $(PY) bench/policies.py && $(PY) bench/scheduler_speed.py && $(PY) bench/kernels.py

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/mypy services

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
