# hbfp-hw: the two set-up commands. Both create .venv on first use.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo venv clean sweep bench

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test,torch]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -n 2 $(PYTEST_ARGS)

sweep: $(STAMP)
	$(VPY) -m pytest -m sweep $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/hbfp-hw demo

clean:
	rm -rf $(VENV) build sim_build out .pytest_cache .hypothesis
