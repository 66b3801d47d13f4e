#!/bin/sh
# Runs every test binary given, then sums their "N passed, N failed" lines.
# An argument NAME=VALUE sets that environment variable for the tests after it.
passed=0; failed=0; broken=""
for t in "$@"; do
    case "$t" in *=*) export "$t"; continue ;; esac
    echo "== $t"
    out=$("$t" 2>&1); rc=$?
    printf '%s\n' "$out"
    line=$(printf '%s\n' "$out" | grep -E '[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$line" ]; then
        failed=$((failed + 1)); broken="$broken $t(rc=$rc, no summary)"; continue
    fi
    p=$(printf '%s' "$line" | sed -E 's/.* ([0-9]+) passed.*/\1/; s/^([0-9]+) passed.*/\1/')
    f=$(printf '%s' "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    passed=$((passed + p)); failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then failed=$((failed + 1)); broken="$broken $t(rc=$rc)"; fi
done
[ -n "$broken" ] && echo "broken:$broken"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
