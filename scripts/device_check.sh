#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call that ends before a
# deadline: the lease is short (15 device-minutes a task, starts included),
# so the checks run in order of what they prove, each capped by what is left.
#
#   here:   scripts/device_debs.sh fetch        (the -dev .debs into .deps/)
#   device: run(carry [".deps"], timeout_s 600,
#               command "scripts/device_check.sh 540")
#
# Phases, in order (each one's cap is min(its own, time left - reserve)):
#   build     make gpu-bins for sm_90 only (the .debs unpacked by device_debs.sh)
#   gpu       tests/gpu binaries one by one (op tests first): make test-gpu's core
#   ops       bench_cuda --ops: copy bandwidth, BF16 and quantized matmul vs
#             cuBLAS, attention and elementwise ops (make bench, GPU part)
#   synth     scripts/make_synth_model.py (synthetic Llama-3-8B, 16 GB, random)
#   decode    bench_cuda --model on it: BF16 at batch 1,8,32,64, then each of
#             QUANTS at batch 1,32
#   memcheck  compute-sanitizer memcheck on test_cuda_ops
#   server    test_cli.py and test_server.py with NIBBLE_DEVICE=cuda
#   moe       a synthetic Qwen3-30B-A3B-shaped mixture (MOE_LAYERS of its 48
#             layers, ~1.2 GB each), decode in BF16 and wint4 at batch 1,8,32
#   memcheck-moe  compute-sanitizer memcheck on test_cuda_moe (the grouped
#             expert kernels), with what time is left
#   racecheck compute-sanitizer racecheck (shared-memory hazards) on
#             test_cuda_moe, with what time is still left: the hardware's
#             word on what make test-racecheck checks in the emulator
# Logs go to $OUT (the device tool's return folder; ./tmp/device_check when
# unset), at most 8 files; the last thing printed is a table of phases with
# their results and the lines that matter, since a reply carries only the
# end of the output.
# Environment: SKIP (phase names to leave out, e.g. "synth decode"), QUANTS
# (wint8 wint4 block_wise_fp8), LAYERS (32), SYNTH_DIR (/tmp/nibble-synth-8b),
# MOE_DIR (/tmp/nibble-synth-moe), MOE_LAYERS (8),
# JOBS (nproc), CUDA_ARCHS (sm_90 only); NIBBLE (bin/nibble), GPU_BIN
# (build/tests/gpu), BENCH (build/bench/bench_cuda): the binaries run, so
# that the script itself can be tried here on the emulator's builds first:
#   SKIP="build synth decode moe" NIBBLE=build/cuemu/nibble \
#   GPU_BIN=build/cuemu/tests BENCH=build/cuemu/bench/bench_cuda scripts/device_check.sh 300
set -u
cd "$(dirname "$0")/.."

BUDGET=${1:-540}
T0=$(date +%s)
OUT=${OUT:-tmp/device_check}
mkdir -p "$OUT"
SKIP=${SKIP:-}
QUANTS=${QUANTS-wint8 wint4 block_wise_fp8}
LAYERS=${LAYERS:-32}
SYNTH_DIR=${SYNTH_DIR:-/tmp/nibble-synth-8b}
MOE_DIR=${MOE_DIR:-/tmp/nibble-synth-moe}
MOE_LAYERS=${MOE_LAYERS:-8}
JOBS=${JOBS:-$(nproc)}
NIBBLE=${NIBBLE:-bin/nibble}
GPU_BIN=${GPU_BIN:-build/tests/gpu}
BENCH=${BENCH:-build/bench/bench_cuda}
export NIBBLE # tests/test_cli.py and test_server.py run it
export CUDA_ARCHS=${CUDA_ARCHS:--gencode arch=compute_90,code=sm_90}
export PYTHONUNBUFFERED=1
RESERVE=8 # seconds kept back for the summary
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - T0))); }

# note NAME RESULT SECONDS DETAIL: one line of the final table
note() { printf '%-12s %-9s %5ss  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"; }

skipped() { case " $SKIP " in *" $1 "*) return 0 ;; esac; return 1; }

# run_capped NAME CAP LOG CMD...: runs CMD, appending to LOG, killed at
# min(CAP, time left - RESERVE); sets RC (124 when it was stopped) and DT
run_capped() {
    local name=$1 cap=$2 log=$3 l t s
    shift 3
    l=$(left)
    t=$((l - RESERVE < cap ? l - RESERVE : cap))
    if [ "$t" -lt 5 ]; then RC=125 DT=0; echo "== $name: no time left" >>"$log"; return; fi
    echo "== $name (limit ${t}s): $*" >>"$log"
    s=$(date +%s)
    timeout -k 5 "$t" "$@" >>"$log" 2>&1
    RC=$?
    DT=$(($(date +%s) - s))
    [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ] && echo "== $name: stopped at its ${t}s limit" >>"$log"
}

result() { # rc -> word
    case "$1" in 0) echo ok ;; 124 | 137) echo timeout ;; 125) echo no-time ;; *) echo "fail($1)" ;; esac
}

# ---- environment and build -------------------------------------------------------
{
    date -u
    nvidia-smi -L 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    nvcc --version 2>&1 | tail -n 2
    echo "cpus $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB memory"}'); disk $(df -h /tmp | awk 'NR == 2 {print $4}') free"
    command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo "no compute-sanitizer"
} >"$OUT/build.log" 2>&1

built=0
if skipped build; then
    built=1
else
    if [ -d .deps/debs ]; then
        # shellcheck disable=SC1091
        . scripts/device_debs.sh env >>"$OUT/build.log" 2>&1 || echo "device_debs env failed" >>"$OUT/build.log"
    fi
    run_capped build 240 "$OUT/build.log" make -j"$JOBS" gpu-bins
    [ "$RC" -eq 0 ] && built=1
    note build "$(result $RC)" "$DT" "$(grep -m1 -E 'error|Error' "$OUT/build.log" | cut -c1-100)"
fi
if [ "$built" -ne 1 ]; then
    echo "device_check: the build failed; the end of $OUT/build.log:"
    tail -n 40 "$OUT/build.log"
    cat "$SUMMARY"
    exit 1
fi
ndev=$("$NIBBLE" inspect --model tests/fixtures/models/qwen2 2>/dev/null | sed -n 's/^cuda devices: *//p')
if [ "${ndev:-0}" -lt 1 ]; then
    echo "device_check: no CUDA device found ($NIBBLE inspect: cuda devices ${ndev:-?})" >&2
    cat "$SUMMARY"
    exit 1
fi

# ---- GPU tests, op tests first ---------------------------------------------------------
GPU_TESTS="test_cuda_ops test_cuda_attention test_cuda_wint test_cuda_fp8 test_cuda_moe test_cuda_sample
           test_cuda_model test_cuda_wint_model test_cuda_fp8_model test_cuda_comm"
if ! skipped gpu; then
    for t in $GPU_TESTS; do
        run_capped "$t" 150 "$OUT/gpu_tests.log" "$GPU_BIN/$t"
        line=$(sed -n "/^== $t /,\$p" "$OUT/gpu_tests.log" | grep -E '[0-9]+ passed, [0-9]+ failed' | tail -n 1)
        fails=$(sed -n "/^== $t /,\$p" "$OUT/gpu_tests.log" | grep -E '^(FAIL|not ok)' | head -n 2 | cut -c1-60 | tr '\n' ' ')
        note "${t#test_cuda_}" "$(result $RC)" "$DT" "${line:-no summary} $fails"
    done
fi

# ---- benchmarks: ops ------------------------------------------------------------------
if ! skipped ops; then
    run_capped bench-ops 150 "$OUT/bench_ops.log" "$BENCH" --ops --min-time 0.05
    note bench-ops "$(result $RC)" "$DT" "$(grep -m1 'copy bandwidth' "$OUT/bench_ops.log" | cut -c1-60)"
fi

# ---- benchmarks: decode on the synthetic 8B model ----------------------------------------
if ! skipped synth && [ ! -f "$SYNTH_DIR/model.safetensors.index.json" ]; then
    run_capped synth 120 "$OUT/bench_decode.log" python3 scripts/make_synth_model.py "$SYNTH_DIR" --layers "$LAYERS"
    note synth "$(result $RC)" "$DT" "$SYNTH_DIR, $LAYERS layers"
fi
if ! skipped decode && [ -f "$SYNTH_DIR/model.safetensors.index.json" ]; then
    run_capped decode-bf16 90 "$OUT/bench_decode.log" "$BENCH" --model "$SYNTH_DIR" --context 512 \
        --steps 32 --batches 1,8,32,64
    note decode-bf16 "$(result $RC)" "$DT" "batch 1,8,32,64"
    for q in $QUANTS; do
        run_capped "decode-$q" 75 "$OUT/bench_decode.log" "$BENCH" --model "$SYNTH_DIR" \
            --quantization "$q" --context 512 --steps 32 --batches 1,32
        note "decode-$q" "$(result $RC)" "$DT" "batch 1,32"
    done
fi

# ---- memcheck, then the CLI and server on the GPU ---------------------------------------
cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if ! skipped memcheck; then
    if [ -n "$cs" ]; then
        run_capped memcheck 120 "$OUT/memcheck.log" "$cs" --tool memcheck --error-exitcode 1 "$GPU_BIN/test_cuda_ops"
        note memcheck "$(result $RC)" "$DT" "$(grep -m1 'ERROR SUMMARY' "$OUT/memcheck.log")"
    else
        note memcheck skipped 0 "no compute-sanitizer"
    fi
fi
if ! skipped server; then
    run_capped server 200 "$OUT/server.log" env NIBBLE_DEVICE=cuda scripts/run_tests.sh tests/test_cli.py tests/test_server.py
    note server "$(result $RC)" "$DT" "$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$OUT/server.log" | tail -n 1)"
fi

# ---- last, with what time is left: a mixture of experts (Qwen3-30B-A3B's shapes) --------
if ! skipped moe; then
    if [ ! -f "$MOE_DIR/model.safetensors.index.json" ]; then
        run_capped synth-moe 90 "$OUT/bench_decode.log" python3 scripts/make_synth_model.py "$MOE_DIR" \
            --arch qwen3-30b-a3b --layers "$MOE_LAYERS"
        note synth-moe "$(result $RC)" "$DT" "$MOE_DIR, $MOE_LAYERS layers"
    fi
    if [ -f "$MOE_DIR/model.safetensors.index.json" ]; then
        for q in "" wint4; do
            run_capped "moe-${q:-bf16}" 75 "$OUT/bench_decode.log" "$BENCH" --model "$MOE_DIR" \
                ${q:+--quantization $q} --context 512 --steps 32 --batches 1,8,32
            note "moe-${q:-bf16}" "$(result $RC)" "$DT" "batch 1,8,32"
        done
    fi
fi

# ---- if time is still left: memcheck on the grouped expert kernels (FP8 and WINT tensor cores) --
if ! skipped memcheck-moe && [ -n "$cs" ]; then
    run_capped memcheck-moe 150 "$OUT/memcheck.log" "$cs" --tool memcheck --error-exitcode 1 "$GPU_BIN/test_cuda_moe"
    note memcheck-moe "$(result $RC)" "$DT" "$(grep 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -n 1)"
fi
if ! skipped racecheck && [ -n "$cs" ]; then
    run_capped racecheck 150 "$OUT/memcheck.log" "$cs" --tool racecheck --error-exitcode 1 "$GPU_BIN/test_cuda_moe"
    note racecheck "$(result $RC)" "$DT" "$(grep 'RACECHECK SUMMARY' "$OUT/memcheck.log" | tail -n 1)"
fi

# ---- what the reply should carry ------------------------------------------------------------
echo
echo "== failures (gpu tests, server)"
grep -h -E '^(FAIL|not ok)|check failed|MISMATCH' "$OUT"/gpu_tests.log "$OUT"/server.log "$OUT"/bench_ops.log 2>/dev/null |
    awk '!seen[$0]++' | cut -c1-200 | head -n 20
echo "== issue 6 targets (bench_cuda --ops)"
sed -n '/issue 6 targets/,/^$/p' "$OUT/bench_ops.log" 2>/dev/null | head -n 8
echo "== decode (bench_cuda --model)"
grep -E '^decode:|^ +[0-9]+ +[0-9.]+ ' "$OUT/bench_decode.log" 2>/dev/null | cut -c1-150 | head -n 36
echo "== phases ($(($(date +%s) - T0)) s of $BUDGET)"
cat "$SUMMARY"
