# YOLOv1 reproduction. `make help` lists the targets; results are files, and each file depends on
# the script and inputs that make it.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --warn-undefined-variables --no-builtin-rules

PYTHON ?= python3## interpreter that creates the virtual environment
VENV ?= .venv## virtual environment (point it at a conda env to use that instead)
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-requirements

.PHONY: help test

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# The stamp is newer than requirements.txt only after a complete install of exactly those pins.
$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

test: $(INSTALLED) ## install the pinned environment (once) and run the test suite
	$(PY) -m pytest
