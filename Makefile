# `make test` and `make demo` set everything up themselves: a venv in .venv with the package
# and its test tools, then run. Needs python3 (>= 3.11, with venv) and PostgreSQL's server
# package (a running server is used if reachable, else a private one is started).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test lint demo install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon tests scripts bench
	$(VENV)/bin/mypy --strict daemon

test: lint
	$(VENV)/bin/pytest

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
