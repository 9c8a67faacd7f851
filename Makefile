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
# Jetson (JetPack 6): TensorRT and its Python 3.10 bindings are system packages, so the venv is
# made from the system Python and sees its site-packages. Detected from /etc/nv_tegra_release;
# JETSON=1 or JETSON=0 overrides. Changing it needs `make clean` (the venv is made once).
JETSON ?= $(if $(wildcard /etc/nv_tegra_release),1,0)
ifeq ($(JETSON),1)
VENV_FLAGS := --system-site-packages
GPU_EXTRA := jetson
else
VENV_FLAGS :=
# TensorRT's CUDA build for make gpu-check: 12 (drivers r525+) or 13 (drivers r580+).
CUDA ?= 12
GPU_EXTRA := $(if $(filter 13,$(CUDA)),tensorrt-cu13,tensorrt)
endif
GPU_STAMP := $(VENV)/.gpu-$(GPU_EXTRA)-installed
GPU_REPORT ?= $(EDGEID_HOME)/gpu-check.json
# axe-core for the accessibility test (tests/test_web_a11y.py), pinned in tests/a11y's lock file;
# test-only, never shipped.
AXE := tests/a11y/node_modules/axe-core/axe.min.js

.PHONY: setup setup-dev run test bench models lint clean gpu-check screenshots

setup: $(RUNTIME_STAMP) models

setup-dev: $(DEV_STAMP) models

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
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

models: $(RUNTIME_STAMP) $(FACENET_WHEEL) $(SELFTEST_WHEEL)
	$(BIN)/edgeid models build

# `edgeid init` is idempotent: the first run prints the web address and the first admin's
# one-time password; later runs change nothing.
run: setup
	$(BIN)/edgeid init
	$(BIN)/edgeid serve

# vermin: the whole product runs on Python 3.10 (JetPack 6), which cannot be installed here, so
# no stdlib module or name newer than 3.10 may be used (edgeid.runtime.compat has the backports).
lint: $(DEV_STAMP)
	$(BIN)/vermin --target=3.10- --violations --eval-annotations --no-tips --quiet \
		edgeid firmware benchmarks tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

$(AXE): tests/a11y/package.json tests/a11y/package-lock.json
	npm ci --prefix tests/a11y --no-audit --no-fund --silent
	touch $@

test: setup-dev lint $(AXE)
	EDGEID_TEST_DATA=$(DATA) $(BIN)/pytest

bench: setup-dev
	$(BIN)/python -m benchmarks.run_all --data $(DATA)

# A PNG of every web page at 1280 and 768 px into $(EDGEID_HOME)/screenshots (not committed).
screenshots: setup-dev
	$(BIN)/python -m benchmarks.screenshots --data $(DATA)

# TensorRT engines against ONNX Runtime on the shared images (firmware/gpu_check.py), with the
# JSON report in $(GPU_REPORT). Installs edgeid[$(GPU_EXTRA)] first; the preflight says what the
# machine lacks (driver, CUDA toolkit for pycuda's build, TensorRT 10) and exits 2 before and
# after the install when something is missing. It needs the runtime only, not the dev tools
# (some have no aarch64 wheels for a Jetson).
gpu-check: setup $(GPU_STAMP)
	$(BIN)/python firmware/gpu_preflight.py
	$(BIN)/python firmware/gpu_check.py --data $(DATA) --report $(GPU_REPORT)

$(GPU_STAMP): $(RUNTIME_STAMP)
	$(BIN)/python firmware/gpu_preflight.py --before-install
	$(BIN)/pip install --quiet -e '.[$(GPU_EXTRA)]'
	touch $@

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
