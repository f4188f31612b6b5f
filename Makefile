# The commands a person types. Each target creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
REPRO_WORKDIR ?= runs/repro

.PHONY: install test demo repro bench bench-gpu aot-check lint format clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 tests

# All ten papers: each experiment at its smallest meaningful size (about 25 minutes on 2 CPU
# cores), then $(WORKDIR)/REPORT.md over them. A rerun skips what finished.
demo: $(STAMP)
	$(PY) -m experiments.reproduce --config=configs/reproduce.py:demo --workdir=$(WORKDIR)

# The longer set: the experiments' full configs (hours; the plan with times prints first).
repro: $(STAMP)
	$(PY) -m experiments.reproduce --config=configs/reproduce.py:repro --workdir=$(REPRO_WORKDIR)

bench: $(STAMP)
	$(PY) -m experiments.bench.model --out=bench_results/bench_model.json
	$(PY) -m experiments.bench.train --out=bench_results/bench_train.json
	$(PY) -m experiments.bench.optim --out=bench_results/bench_optim.json
	$(PY) -m experiments.bench.denseformer --out=bench_results/bench_denseformer.json
	$(PY) -m experiments.bench.cotformer --out=bench_results/bench_cotformer.json
	$(PY) -m experiments.bench.layer_parallel --out=bench_results/bench_layer_parallel.json
	$(PY) -m experiments.bench.distill --out=bench_results/bench_distill.json
	$(PY) -m experiments.bench.attention --out=bench_results/bench_attention.json
	$(PY) -m experiments.bench.scan --out=bench_results/bench_scan.json
	$(PY) -m experiments.bench.acvi --out=bench_results/bench_acvi.json
	$(PY) -m experiments.bench.udp --out=bench_results/bench_udp.json
	$(PY) -m experiments.bench.doge --out=bench_results/bench_doge.json
	$(PY) -m experiments.bench.generate --out=bench_results/bench_generate.json
	$(PY) -m experiments.bench.input_pipeline --out=bench_results/bench_input_pipeline.json
	$(PY) -m experiments.bench.medical_eval --out=bench_results/bench_medical_eval.json
	$(PY) -m experiments.bench.test_time --out=bench_results/bench_test_time.json

# On a lent GPU machine, which has no network: its own python3 already holds jax[cuda], absl and
# numpy, so this target installs nothing and runs from the source tree.
GPU_PYTHON ?= python3
bench-gpu:
	PYTHONPATH=. $(GPU_PYTHON) -m experiments.bench.gpu --out=bench_results/bench_gpu.json

# Ahead-of-time compilation for GPUs and TPUs on this machine (no accelerator needed): jax's CUDA
# plugin with its CUDA libraries (about 4.5 GB) and libtpu go into their own environment, never
# into .venv. AOT_FLAGS passes flags, e.g. make aot-check AOT_FLAGS="--targets=h100,v5p --quick".
AOT_VENV := .venv-aot
AOT_STAMP := $(AOT_VENV)/.installed

$(AOT_STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AOT_VENV)/bin/python -m pip install --quiet -e .
	$(AOT_VENV)/bin/python -m pip install --quiet \
		"jax-cuda12-plugin[with-cuda]==$$($(AOT_VENV)/bin/python -c 'import jax; print(jax.__version__)')" \
		"jax[tpu]==$$($(AOT_VENV)/bin/python -c 'import jax; print(jax.__version__)')"
	touch $(AOT_STAMP)

aot-check: $(AOT_STAMP)
	JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 \
		$(AOT_VENV)/bin/python -m experiments.aot_check --workdir=aot_results $(AOT_FLAGS)

# ruff format's output is the layout: no pragmas that switch it off.
lint: $(STAMP)
	$(VENV)/bin/ruff check jaxlab kernels_pallas configs experiments tests
	$(VENV)/bin/ruff format --check jaxlab kernels_pallas configs experiments tests
	@if grep -rn --include='*.py' -e 'fmt: skip' -e 'fmt: off' jaxlab kernels_pallas configs experiments tests; then \
		echo "lint: keep ruff format's output instead of the fmt pragmas above"; exit 1; fi

format: $(STAMP)
	$(VENV)/bin/ruff format jaxlab kernels_pallas configs experiments tests

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .jax_cache bench_results aot_results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
