# Two commands on a fresh machine: `make reproduce` and `make test`. Each sets up what is missing.
SHELL := /bin/bash
PROFILE ?= cpu
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL := agentlib
MIRROR ?= $(wildcard ../shared/data)
STAMP := $(VENV)/.installed

.PHONY: setup data models test lint reproduce bench lab clean-runs

# The venv: torch's CPU wheel is pinned in the same pip command as the rest (pip finds it on local disk).
$(STAMP): requirements.txt requirements-bench.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-bench.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (agentlib)" >/dev/null
	touch $(STAMP)

setup: $(STAMP) data models

data: $(STAMP)
	@if [ -n "$$AGENTLIB_DATA_DIR" ]; then echo "data: using AGENTLIB_DATA_DIR=$$AGENTLIB_DATA_DIR"; \
	else $(PY) -m agentlib.data fetch $(if $(MIRROR),--mirror $(MIRROR)); fi

models: $(STAMP)
	$(PY) -m agentlib.registry fetch $$($(PY) -m agentlib.profiles models $(PROFILE))

test: $(STAMP) data
	$(MAKE) models PROFILE=smoke
	$(PY) -m ruff check agentlib tests bench notebooks && $(PY) -m ruff format --check agentlib tests bench
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check agentlib tests bench notebooks
	$(PY) -m ruff format --check agentlib tests bench  # notebooks: excluded in pyproject.toml

# Runs the notebooks in order with papermill into runs/$(PROFILE)/; resumable. TEACHER=generate: run the teacher.
reproduce: setup
	$(PY) -m agentlib.reproduce --profile $(PROFILE) --kernel $(KERNEL) $(if $(TEACHER),--teacher-source $(TEACHER))
	$(PY) -m agentlib.report $(PROFILE)  # the README's results block for this profile, if it has one

bench: $(STAMP) data
	$(MAKE) models PROFILE=smoke
	$(PY) bench/collect.py

# JupyterLab in seconds: nothing is fetched first (a notebook fetches the models it uses, once, with a progress bar).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $$(test "$$(id -u)" = 0 && echo --allow-root)

clean-runs:
	rm -rf runs/$(PROFILE)
