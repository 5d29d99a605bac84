# transferkit: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all test-gpu test-zoo bench bench-multitask bench-quality bench-transfer bench-standardize bench-soups bench-distill bench-fit bench-checkpointing bench-end-to-end lint clean

# Re-running set-up is fast: pip runs again only when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m transferkit.demo

# The fast suite, for every change (a few minutes on 2 cores).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow and not zoo"

# Everything CI runs: the fast suite plus the slow end-to-end tests (notebooks, SIGKILL and
# resume, several processes, shared sweeps).
test-all: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not zoo"

# The tests that need a CUDA GPU (tests/test_gpu.py; skipped, with the reason, without one).
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

test-zoo: setup
	$(BIN)/python -m pytest -q -n 2 -m zoo

lint: setup
	$(BIN)/ruff check transferkit tests
	$(BIN)/ruff format --check transferkit tests

clean:
	rm -rf $(VENV) runs .pytest_cache

bench: setup
	$(BIN)/python -m bench.run

bench-multitask: setup
	$(BIN)/python -m bench.multitask

# Does fine-tuning deliver? Label budgets x methods x 3 seeds on the digits (about an hour on
# 2 cores); results in bench/results/quality.md, summarized in docs/quality.md.
bench-quality: setup
	$(BIN)/python -m bench.quality
# LP-FT against peft adapters and fine-tuning regularizers on the digits (docs/transfer_methods.md).
bench-transfer: setup
	$(BIN)/python -m bench.transfer_methods
# A regression target in its own units, learned raw or standardized (docs/training_features.md).
bench-standardize: setup
	$(BIN)/python -m bench.standardize
# Greedy and uniform soups against the best run and the ensemble, on held-out digits (docs/ensembles.md).
bench-soups: setup
	$(BIN)/python -m bench.soups
# A small student distilled from an ImageNet teacher against the student alone (docs/distillation.md).
bench-distill: setup
	$(BIN)/python -m bench.distill

# fit against the plain defaults, full fine-tuning and a hand-written LP-FT loop on four task
# sets (one held out), 5-50 labels per class, with its --time-budget at 2 min (about 3 hours);
# results in bench/results/fit.md, summarized in docs/fit.md.
bench-fit: setup
	$(BIN)/python -m bench.fit

# Activation memory and step time with and without train.grad_checkpointing (ViT and CNN).
bench-checkpointing: setup
	$(BIN)/python -m bench.grad_checkpointing

# A whole run's wall time against timm's train.py: TIMM_TRAIN=/path/to/pytorch-image-models
# (else against a hand-written loop that does train.py's work).
bench-end-to-end: setup
	$(BIN)/python -m bench.end_to_end
