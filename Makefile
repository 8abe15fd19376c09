# Two entry points (see README): `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@# MedMNIST-C without its pins (they would downgrade medmnist and scikit-image and add opencv-python beside
	@# grad-cam's opencv-python-headless); what it imports comes with medzoo (pyproject.toml). ImageMagick's
	@# library for its motion blur comes from apt (.ci/run, README).
	$(BIN)/pip install --quiet --no-deps 'medmnistc==0.1.0'
	@# One ONNX Runtime package: a venv upgraded from a CPU-only medzoo may still hold `onnxruntime`
	@# beside `onnxruntime-gpu` (both install the same module); keep the one pyproject.toml asks for.
	if $(BIN)/pip show -q onnxruntime-gpu 2>/dev/null && $(BIN)/pip show -q onnxruntime 2>/dev/null; then \
	  $(BIN)/pip uninstall --quiet -y onnxruntime && \
	  $(BIN)/pip install --quiet --force-reinstall --no-deps onnxruntime-gpu; fi
	touch $(STAMP)

.PHONY: install test serve
install: $(STAMP)

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

serve: $(STAMP)
	$(BIN)/zoo serve
