# treeserve: the front door. `make run` serves the local stack; `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-stamp
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed-stamp
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: venv run test lint typecheck cfn-lint checkov kserve-venv pytest bench build clean fuzz load

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing treeserve with its dev tools"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(BIN)/python -m pip install $(PIP_FLAGS) -e '.[dev]'
	@touch $@

venv: $(STAMP)

# checkov pins its own dependencies, so it gets its own venv.
$(CHECKOV_STAMP):
	@echo "==> creating $(CHECKOV_VENV) for checkov"
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install $(PIP_FLAGS) 'checkov>=3.2'
	@touch $@

# KServe's REST client pins its own fastapi, pandas, grpcio and kubernetes: a venv of its own,
# which tests/integration/test_open_inference.py runs tests/integration/kserve_client_check.py in.
$(KSERVE_STAMP):
	@echo "==> creating $(KSERVE_VENV) for KServe's inference client"
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install $(PIP_FLAGS) --upgrade pip
	$(KSERVE_VENV)/bin/python -m pip install $(PIP_FLAGS) 'kserve>=0.21'
	@touch $@

kserve-venv: $(KSERVE_STAMP)

run: venv
	$(BIN)/treeserve local

lint: venv
	$(BIN)/ruff check functions tests infra
	$(BIN)/ruff format --check functions tests infra

# Strict over the library, the build and benchmark tools, and each handler (three modules named
# `app`, so one run each).
typecheck: venv
	$(BIN)/mypy
	$(BIN)/mypy -p infra
	for handler in functions/*/app.py; do $(BIN)/mypy "$$handler" || exit 1; done

cfn-lint: venv
	$(BIN)/cfn-lint template.yaml

checkov: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --framework cloudformation --skip-download -f template.yaml

pytest: venv kserve-venv
	$(BIN)/python -m pytest

test: lint typecheck cfn-lint checkov pytest

# `make bench` runs every section; `make bench inference` (or refresh, monitoring, batch, artifacts)
# one or a few: the words after `bench` are its sections, not targets of their own.
ifeq (bench,$(firstword $(MAKECMDGOALS)))
BENCH_SECTIONS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
$(eval $(BENCH_SECTIONS):;@:)
endif
bench: venv
	$(BIN)/python -m infra.bench $(BENCH_SECTIONS)

# The reliability evidence at full size (docs/reliability.md): 1,200+ schemathesis cases and
# 1,200 raw bodies, a fault at every S3 call of a promotion; `make test` runs smaller counts.
fuzz: venv
	TREESERVE_FUZZ_EXAMPLES=300 TREESERVE_FAULT_SWEEP=full $(BIN)/python -m pytest -m reliability tests/reliability

# 32 clients for 60 s against the inference app under uvicorn on 127.0.0.1.
load: venv
	$(BIN)/python -m infra.load --clients 32 --duration 60

# Cross-platform Lambda artifacts in build/artifacts (ARCH=arm64 for Graviton), with sizes.
ARCH ?= x86_64
build: venv
	$(BIN)/python -m infra.build --arch $(ARCH) --zip

# `sam build` (Metadata BuildMethod: makefile, ContextPath: this folder) runs these with
# ARTIFACTS_DIR set, from wherever it chooses: the recipes work from the project root. They need
# only python3 (the project venv when present, for version pins; infra.build brings its own pip);
# no Docker.
PROJECT_ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
BUILD_PYTHON := $(if $(wildcard $(PROJECT_ROOT)/$(BIN)/python),$(PROJECT_ROOT)/$(BIN)/python,$(PYTHON))
.PHONY: build-InferenceFunction build-RefreshFunction build-MonitoringFunction build-BatchFunction
build-InferenceFunction:
	cd "$(PROJECT_ROOT)" && $(BUILD_PYTHON) -m infra.build --function inference --arch $(ARCH) --out "$(ARTIFACTS_DIR)"
build-RefreshFunction:
	cd "$(PROJECT_ROOT)" && $(BUILD_PYTHON) -m infra.build --function refresh --arch $(ARCH) --out "$(ARTIFACTS_DIR)"
build-MonitoringFunction:
	cd "$(PROJECT_ROOT)" && $(BUILD_PYTHON) -m infra.build --function monitoring --arch $(ARCH) --out "$(ARTIFACTS_DIR)"
build-BatchFunction:
	cd "$(PROJECT_ROOT)" && $(BUILD_PYTHON) -m infra.build --function batch --arch $(ARCH) --out "$(ARTIFACTS_DIR)"

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(KSERVE_VENV) .aws-sam build .pytest_cache .mypy_cache .ruff_cache
