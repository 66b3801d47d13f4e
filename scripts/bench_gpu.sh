#!/bin/sh
# GPU benchmarks of the CUDA backend (issue 5), everything on stdout:
#  1. build/bench/bench_cuda --ops: the device, its measured copy bandwidth,
#     per-op times on Llama-3-8B shapes (matmul against cublasGemmEx, the
#     others against copy bandwidth or TFLOP/s);
#  2. a synthetic Llama-3-8B-shaped model (random BF16 weights, ~16 GB) in
#     $SYNTH_DIR, written once by scripts/make_synth_model.py if absent;
#  3. bench_cuda --model $SYNTH_DIR: end-to-end decode tokens/s at each batch
#     size against the bandwidth bound.
#   scripts/bench_gpu.sh        (run by `make bench` when nvidia-smi sees a GPU)
# Environment: SYNTH_DIR (default /tmp/nibble-synth-8b), LAYERS (32, used
# only when the model is created), CONTEXT (prompt tokens per sequence, 512),
# STEPS (timed decode steps, 64), BATCHES (1,8,32,64), PYTHON (python3, with
# torch and safetensors), BENCH_FLAGS (more bench_cuda flags, e.g. --no-graph),
# QUANTS (wint8 wint4 block_wise_fp8; empty to skip), QUANT_BATCHES (1,32).
set -e
BIN=${BIN:-build/bench/bench_cuda}
SYNTH_DIR=${SYNTH_DIR:-/tmp/nibble-synth-8b}
LAYERS=${LAYERS:-32}
CONTEXT=${CONTEXT:-512}
STEPS=${STEPS:-64}
BATCHES=${BATCHES:-1,8,32,64}
PYTHON=${PYTHON:-python3}
QUANTS=${QUANTS-wint8 wint4 block_wise_fp8}
QUANT_BATCHES=${QUANT_BATCHES:-1,32}

make --no-print-directory all
if [ ! -x "$BIN" ]; then
    echo "bench_gpu: $BIN was not built: it comes with the CUDA build (nvcc found, CUDA=1)" >&2
    exit 1
fi

echo "== bench_cuda --ops"
# a figure that disagrees with its reference makes it exit 1 after printing
# everything: the decode runs still follow, and this script fails at the end
status=0
# shellcheck disable=SC2086 # BENCH_FLAGS is a list of flags
"$BIN" --ops $BENCH_FLAGS || status=1

if [ -f "$SYNTH_DIR/model.safetensors.index.json" ]; then
    echo "== synthetic model: using $SYNTH_DIR"
else
    echo "== synthetic model: writing $SYNTH_DIR ($LAYERS layers) with $PYTHON"
    "$PYTHON" scripts/make_synth_model.py "$SYNTH_DIR" --layers "$LAYERS"
fi

echo "== bench_cuda --model $SYNTH_DIR"
# shellcheck disable=SC2086
"$BIN" --model "$SYNTH_DIR" --context "$CONTEXT" --steps "$STEPS" --batches "$BATCHES" $BENCH_FLAGS

for q in $QUANTS; do
    echo "== bench_cuda --model $SYNTH_DIR --quantization $q"
    # shellcheck disable=SC2086
    "$BIN" --model "$SYNTH_DIR" --quantization "$q" --context "$CONTEXT" --steps "$STEPS" --batches "$QUANT_BATCHES" \
        $BENCH_FLAGS
done
exit $status
