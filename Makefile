# diffexp: make train (the default experiment), make test (the whole suite)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install train test test-fast bench lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: install  ## train the default (8-Gaussian ring); extra Hydra overrides in ARGS="..."
	$(PY) -m diffexp.train $(ARGS)

test: install  ## the whole suite, slow tests included (what CI runs)
	$(PY) -m pytest -q

test-fast: install  ## the suite without the tests marked slow
	$(PY) -m pytest -q -m "not slow"

bench: install  ## training step vs a minimal loop (command line, in process, per part); sampler quality against NFE; the variance objective's cost; image-scale step vs plain loop and CIFAR-10 loading (GPU check: bash bench/gpu_check.sh)
	$(PY) -m bench.step_time
	$(PY) -m bench.train_throughput $(ARGS)
	$(PY) -m bench.step_profile
	$(PY) -m bench.sampler_quality
	$(PY) -m bench.variance_objective_cost
	$(PY) -m bench.image_throughput --compile
	$(PY) -m bench.data_loading

lint: install
	$(VENV)/bin/ruff check diffexp tests bench
	$(VENV)/bin/ruff format --check diffexp tests bench

format: install
	$(VENV)/bin/ruff check --fix diffexp tests bench
	$(VENV)/bin/ruff format diffexp tests bench

clean:
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache
