# The two commands a new user needs: `make serve` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_NAME := SmolLM2-135M-Instruct
MODEL_DIR := models/$(MODEL_NAME)
HOST ?= 0.0.0.0
PORT ?= 8000
PROTOS := $(wildcard protos/pagedserve/v1/*.proto)

.PHONY: install model protos serve test

install: $(VENV)/.installed

# torch is installed first with its pin: on a machine without CUDA the CPU build on disk satisfies
# it, instead of pip resolving the multi-gigabyte CUDA build as a dependency of the project.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

model: install
	$(BIN)/python -m pagedserve.fetch_model --output $(MODEL_DIR)

protos: install
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

serve: install model
	$(BIN)/pagedserve serve --model $(MODEL_DIR) --served-model-name $(MODEL_NAME) --host $(HOST) --port $(PORT)

test: install model
	$(BIN)/python -m pytest -q tests
