# mistral-qlora: one Makefile for the H100 (CUDA), the Apple M4 (MLX) and the CPU demo/tests.
#   make demo    set up (CPU) and train the tiny built-in model on the sample data
#   make test    set up (CPU) and run the test suite
#   make test-serving  build llama.cpp's Python binding (~30 min the first time) and run the llama.cpp tests
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
QLORA := $(BIN)/qlora
RED := \033[31m
GREEN := \033[32m
YELLOW := \033[33m
NC := \033[0m
ARGS ?=

.PHONY: help setup setup-cpu setup-h100 setup-m4 flash-attn demo test test-serving lint check plan train train-h100 train-m4 convert bench chat merge gguf

help:  # colours only on a terminal: `make help | less` or a file gets plain text
	@if [ -t 1 ] && [ -z "$$NO_COLOR" ]; then on='\033[32m' off='\033[0m'; fi; \
	grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) \
	  | awk -F':.*## ' -v on="$$on" -v off="$$off" '{printf "  %s%-12s%s %s\n", on, $$1, off, $$2}'
	@echo "  (qlora itself: source $(VENV)/bin/activate, or $(QLORA) without it; make targets use it directly)"

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo -e "$(RED)Python >= 3.10 is needed (found $$($(PY) --version))$(NC)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: ## set up for this machine (H100 / Apple silicon / CPU, detected)
	@if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then $(MAKE) setup-h100; \
	elif [ "$$(uname -s)-$$(uname -m)" = "Darwin-arm64" ]; then $(MAKE) setup-m4; \
	else echo -e "$(YELLOW)no NVIDIA GPU and no Apple silicon: setting up the CPU demo and tests$(NC)"; $(MAKE) setup-cpu; fi

$(VENV)/.cpu-ready: configs/constraints/cpu.txt pyproject.toml | $(BIN)/python
	@echo -e "$(GREEN)installing the CPU stack (torch 2.13.0 CPU build first)$(NC)"
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r configs/constraints/cpu.txt
	$(BIN)/pip install -q -e . --no-deps
	@touch $@

setup-cpu: $(VENV)/.cpu-ready ## CPU: both backends on tiny models (demo, tests)
	@echo -e "$(GREEN)✔ CPU environment ready in $(VENV)$(NC)"

setup-h100: | $(BIN)/python ## NVIDIA H100: CUDA stack, then FlashAttention if it can be installed
	$(BIN)/pip install -q -r configs/constraints/h100.txt
	$(BIN)/pip install -q -e . --no-deps
	@$(MAKE) --no-print-directory flash-attn
	@echo -e "$(GREEN)✔ H100 environment ready; next: make check, make train-h100$(NC)"

flash-attn: ## try flash-attn-4 (pure Python, Hopper), then flash-attn 2; SDPA otherwise
	@$(BIN)/pip install -q --pre "flash-attn-4==4.0.0b36" \
	  && echo -e "$(GREEN)✔ flash-attn-4 installed$(NC)" \
	  || { echo -e "$(YELLOW)! flash-attn-4 could not be installed; trying flash-attn 2 (builds from source, can take an hour)$(NC)"; \
	       MAX_JOBS=8 $(BIN)/pip install -q flash-attn --no-build-isolation \
	       && echo -e "$(GREEN)✔ flash-attn 2 installed$(NC)" \
	       || echo -e "$(YELLOW)! no FlashAttention: training will use PyTorch SDPA (slower on packed data). See docs/benchmarks.md$(NC)"; }

setup-m4: | $(BIN)/python ## Apple silicon: MLX stack
	@[ "$$(uname -s)-$$(uname -m)" = "Darwin-arm64" ] || { echo -e "$(RED)setup-m4 needs an Apple silicon Mac$(NC)"; exit 1; }
	$(BIN)/pip install -q -r configs/constraints/m4.txt
	$(BIN)/pip install -q -e . --no-deps
	@echo -e "$(GREEN)✔ M4 environment ready; next: make check, make train-m4$(NC)"

demo: setup-cpu ## set up and train the tiny built-in model on the CPU (ARGS="--backend mlx")
	$(QLORA) demo $(ARGS)

test: setup-cpu ## set up and run the tests
	$(BIN)/python -m pytest -q $(ARGS)

test-serving: setup-cpu ## llama.cpp runs our GGUF: builds llama-cpp-python (~30 min once, cached by pip), runs its tests
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
	  echo -e "$(YELLOW)building llama-cpp-python from source (compiles llama.cpp: ~30 min on 2 cores, once per machine)$(NC)"; \
	  time CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install -q -r configs/constraints/serving.txt; }
	QLORA_REQUIRE_LLAMA_CPP=1 $(BIN)/python -m pytest -q -m llama_cpp tests/test_serving.py $(ARGS)

lint: setup-cpu ## ruff
	$(BIN)/ruff check common backends commands tests scripts bench

train: ## train on this machine's platform (detected)
	$(QLORA) train $(ARGS)

train-h100: ## train with configs/training_config_h100.yaml (GPUS=N or GPUS=all: data-parallel, docs/multi-gpu.md)
	$(QLORA) train --platform h100 $(if $(GPUS),--gpus $(GPUS)) $(ARGS)

train-m4: ## train with configs/training_config_m4.yaml
	$(QLORA) train --platform m4 $(ARGS)

BENCH_OUT ?= /tmp/bench-out
bench: ## H100: random 7B checkpoint + data, stock TRL, our levers one by one, loss match -> bench/results, docs
	@command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1 || { echo -e "$(RED)make bench needs an NVIDIA GPU (run make setup-h100 there first)$(NC)"; exit 1; }
	mkdir -p $(BENCH_OUT)
	for step in prepare stock ablation liger loss-match whole versions; do OUT=$(BENCH_OUT) PY=$(BIN)/python bash bench/run_h100.sh $$step || exit 1; done
	$(BIN)/python bench/report.py --collect $(BENCH_OUT)

convert: ## convert an adapter: make convert SRC=dir DST=dir [ARGS="--base-model DIR --verify"]
	@[ -n "$(SRC)" ] && [ -n "$(DST)" ] || { echo -e "$(RED)usage: make convert SRC=adapter_dir DST=new_dir$(NC)"; exit 2; }
	$(QLORA) convert "$(SRC)" "$(DST)" $(ARGS)

chat: ## chat with a trained adapter: make chat RUN=adapters/<run-name>
	@[ -n "$(RUN)" ] || { echo -e "$(RED)usage: make chat RUN=adapters/<run-name>$(NC)"; exit 2; }
	$(QLORA) chat "$(RUN)" $(ARGS)

merge: ## merge an adapter into its base: make merge RUN=adapters/<run-name> OUT=dir [ARGS="--to mlx"]
	@[ -n "$(RUN)" ] && [ -n "$(OUT)" ] || { echo -e "$(RED)usage: make merge RUN=adapters/<run-name> OUT=new_dir$(NC)"; exit 2; }
	$(QLORA) merge "$(RUN)" "$(OUT)" $(ARGS)

gguf: ## GGUF + Ollama Modelfile: make gguf RUN=adapters/<run-name> OUT=file.gguf [ARGS="--quant f16"]
	@[ -n "$(RUN)" ] && [ -n "$(OUT)" ] || { echo -e "$(RED)usage: make gguf RUN=adapters/<run-name> OUT=file.gguf$(NC)"; exit 2; }
	$(QLORA) export "$(RUN)" "$(OUT)" $(ARGS)

check: ## preflight for this machine and config (ARGS="--platform h100")
	$(QLORA) check $(ARGS)

plan: ## memory, time and disk before a run (ARGS="--platform h100 [--calibrate] [--time-budget 4h]")
	$(QLORA) plan $(ARGS)
