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

# `make gpu-check` (docs/BENCHMARKS.md, "GPU check"): without a GPU, one line and exit 0 before anything is
# installed; with one, `make install`, then bench/gpu_check.py's stages within GPU_CHECK_BUDGET seconds from the
# start (the install included). GPU_CHECK_PYTHON=<an interpreter already set up> skips the install (and never
# pip-installs '.[gpu]'); GPU_CHECK_ARGS passes options (e.g. --out DIR, --stages …).
GPU_CHECK_BUDGET ?= 480
GPU_CHECK_PYTHON ?=
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	@t0=$$(date +%s); $(PYTHON) bench/gpu_check.py --detect; rc=$$?; \
	if [ $$rc -eq 10 ]; then exit 0; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	py="$(GPU_CHECK_PYTHON)"; \
	if [ -z "$$py" ]; then $(MAKE) --no-print-directory install || exit $$?; py=$(BIN)/python; fi; \
	$$py bench/gpu_check.py --since $$t0 --budget $(GPU_CHECK_BUDGET) $(if $(GPU_CHECK_PYTHON),--no-install) \
	  $(GPU_CHECK_ARGS)
