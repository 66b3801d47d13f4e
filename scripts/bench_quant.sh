#!/bin/sh
# Quantization benchmark on CPU, one model at a time, all formats in one run:
# resident weight memory, decode tokens/s at batch 1 (greedy, EOS ignored;
# best of REPEAT runs) and perplexity on tests/fixtures/text/eval.txt, each
# with its ratio to the unquantized model measured in the same run. WINT2
# needs an offline checkpoint: it is written first with `nibble quantize`
# (GPTQ, calibration text tests/fixtures/text/calib.txt), as is a GPTQ WINT4
# one (wint4-gptq) to compare with WINT4 rounded to nearest at load.
#   scripts/bench_quant.sh [MODEL_DIR ...]   (default: the largest fixture)
set -e
BIN=${BIN:-bin/nibble}
TOKENS=${TOKENS:-64}
THREADS=${THREADS:-$(nproc)}
EVAL=${EVAL:-tests/fixtures/text/eval.txt}
[ $# -eq 0 ] && set -- tests/fixtures/models/llama
for m in "$@"; do
    w2=build/bench/$(basename "$m")-wint2
    mkdir -p build/bench
    w4=build/bench/$(basename "$m")-wint4-gptq
    [ -f "$w2/config.json" ] || $BIN quantize --model "$m" --out "$w2" --quantization wint2 --threads "$THREADS" | tail -n 1
    [ -f "$w4/config.json" ] || $BIN quantize --model "$m" --out "$w4" --quantization wint4 --threads "$THREADS" | tail -n 1
    echo "model $m, $THREADS threads, $TOKENS tokens, perplexity on $EVAL"
    base_tps=0; base_mib=0; base_ppl=0
    for q in none wint8 wint4 wint4-gptq block_wise_fp8 wint2 kv-int8 kv-fp8; do
        dir=$m; flags="--quantization $q"
        [ "$q" = wint2 ] && { dir=$w2; flags=""; }
        [ "$q" = wint4-gptq ] && { dir=$w4; flags=""; }
        [ "$q" = kv-int8 ] && flags="--kv-cache-dtype int8"
        [ "$q" = kv-fp8 ] && flags="--kv-cache-dtype float8_e4m3fn"
        mib=$($BIN inspect --model "$dir" $flags --quant-report 2>/dev/null |
              awk '/^resident/ {s += $(NF-1)} END {printf "%.2f", s}')
        best=0
        for r in $(seq "${REPEAT:-3}"); do
            tps=$($BIN generate --model "$dir" $flags --prompt "The history of the sea" --max-tokens "$TOKENS" \
                  --temperature 0 --ignore-eos --threads "$THREADS" 2>&1 >/dev/null | tail -n 1 |
                  sed -E 's/.*output [0-9]+ tokens, ([0-9.]+) tok\/s.*/\1/')
            best=$(awk -v a="$tps" -v b="$best" 'BEGIN { print (a > b) ? a : b }')
        done
        ppl=$($BIN perplexity --model "$dir" $flags --file "$EVAL" --threads "$THREADS" | awk '{print $2}')
        [ "$q" = none ] && { base_tps=$best; base_mib=$mib; base_ppl=$ppl; }
        awk -v q="$q" -v mib="$mib" -v tps="$best" -v ppl="$ppl" -v bm="$base_mib" -v bt="$base_tps" -v bp="$base_ppl" 'BEGIN {
            printf "%-15s weights %8.2f MiB (%.2fx)  decode %8.2f tok/s (%.2fx)  perplexity %9.3f (%.3fx)\n",
                   q, mib, mib / bm, tps, tps / bt, ppl, ppl / bp }'
    done
done
