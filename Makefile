# treeserve: the front door. `make run` serves the local stack; `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-stamp
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: venv run test lint typecheck cfn-lint checkov pytest bench build clean

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

run: venv
	$(BIN)/treeserve local

lint: venv
	$(BIN)/ruff check functions tests infra
	$(BIN)/ruff format --check functions tests infra

typecheck: venv
	$(BIN)/mypy

cfn-lint: venv
	$(BIN)/cfn-lint template.yaml

checkov: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --framework cloudformation --skip-download -f template.yaml

pytest: venv
	$(BIN)/python -m pytest

test: lint typecheck cfn-lint checkov pytest

bench: venv
	$(BIN)/python -m infra.bench

build: venv
	$(BIN)/python -m infra.build

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .aws-sam build .pytest_cache .mypy_cache .ruff_cache
