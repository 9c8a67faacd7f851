# edgeid: `make run` starts the appliance on its embedded defaults; `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Local state directory for development runs; the appliance uses /var/lib/edgeid.
EDGEID_HOME ?= $(CURDIR)/var
export EDGEID_HOME
DATA ?= $(CURDIR)/../shared/data
FACENET_WHEEL := $(EDGEID_HOME)/wheelhouse/facenet_pytorch-2.6.0-py3-none-any.whl
SELFTEST_WHEEL := $(EDGEID_HOME)/wheelhouse/scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: setup setup-dev run test bench models lint clean gpu-check

setup: $(RUNTIME_STAMP) models

setup-dev: $(DEV_STAMP) models

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The MTCNN weights ship inside this wheel; only its weight files are read, torch is never
# installed. On an air-gapped box the technician copies the wheel into the wheelhouse instead.
$(FACENET_WHEEL): | $(RUNTIME_STAMP)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: facenet-pytorch==2.6.0 \
		-d $(EDGEID_HOME)/wheelhouse

# The self-test's known image (NASA's public-domain astronaut photo) ships inside this wheel;
# only that PNG is read. One platform's wheel is pinned so every machine fetches the same file.
$(SELFTEST_WHEEL): | $(RUNTIME_STAMP)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
		--python-version 3.11 --implementation cp scikit-image==0.25.2 -d $(EDGEID_HOME)/wheelhouse

# The INT8 twins are calibrated on the shared LFW dev photos: built where they are present.
models: $(RUNTIME_STAMP) $(FACENET_WHEEL) $(SELFTEST_WHEEL)
	$(BIN)/edgeid models build $(if $(wildcard $(DATA)/lfw-dev/images),--precision int8 --data $(DATA))

# `edgeid init` is idempotent: the first run prints the web address and the first admin's
# one-time password; later runs change nothing.
run: setup
	$(BIN)/edgeid init
	$(BIN)/edgeid serve

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup-dev lint
	EDGEID_TEST_DATA=$(DATA) $(BIN)/pytest

bench: setup-dev
	$(BIN)/python -m benchmarks.run_all --data $(DATA)

# TensorRT engines against ONNX Runtime on the shared images; needs an NVIDIA GPU, TensorRT 10
# and pycuda (pip install -e '.[tensorrt]'); exits 2 when they are absent.
gpu-check: setup-dev
	$(BIN)/python firmware/gpu_check.py --data $(DATA)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
