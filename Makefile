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

# The benchmarks that need no board and no synthesis, with their quick defaults
# (bench_link: the emulate:// transport only). The synthesis / place-and-route and
# board-build benchmarks take many minutes each: run them by hand (docs/cli.md).
bench: $(STAMP)
	$(VPY) benchmarks/bench_quantize.py
	$(VPY) benchmarks/bench_link.py --url emulate://
	$(VPY) benchmarks/bench_accelerator_modes.py
	$(VPY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) build sim_build out .pytest_cache .hypothesis
