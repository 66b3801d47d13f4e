#!/usr/bin/env python3
"""bench_cuda (make bench's GPU part) under the CPU emulator (stdlib only):
--smoke runs every figure of --ops on small sizes, each checked against its
reference (cuBLAS, quant_matmul_ref); --model decodes the fixtures, dense,
quantized at load and a mixture of experts. Its times mean nothing here; what
is tested is that every table is printed whole, that no figure disagrees with
its reference, and that bad input gives a one-line error. BENCH_CUDA names
the binary (default: the emulator's build); on a GPU it runs the same."""
import os
import re
import subprocess
import sys

from tally import check, done

BENCH = os.environ.get("BENCH_CUDA", "build/cuemu/bench/bench_cuda")
MODELS = "tests/fixtures/models"


def run(*args, timeout=900):
    return subprocess.run([BENCH, *args], capture_output=True, text=True, timeout=timeout)


def rows(out, header, fields):
    """The table rows under the line starting with `header`: lines that
    split into `fields` columns, up to the first blank line."""
    lines = out.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith(header)), None)
    if start is None:
        return []
    got = []
    for l in lines[start + 1:]:
        if not l.strip():
            break
        parts = l.split()
        if len(parts) >= fields:
            got.append(parts)
    return got


def number(s):
    try:
        return float(s)
    except ValueError:
        return None


# --ops --smoke: every section, every row, every check
r = run("--smoke")
out = r.stdout
check("--smoke exits 0", r.returncode == 0, f"rc {r.returncode}: {r.stderr.strip()[-400:]}")
check("no figure disagrees with its reference", "MISMATCH" not in out,
      "\n".join(l for l in out.splitlines() if "MISMATCH" in l)[:800])
m = re.search(r"copy bandwidth: ([0-9.]+) GB/s", out)
check("copy bandwidth measured", m and float(m.group(1)) > 0, out[:300])

# matmul: 4 shapes x 4 M, the error last
mm = [p for p in rows(out, "matmul:", 11) if p[0].endswith("_proj")]
check("matmul: 4 shapes x 4 sizes", len(mm) == 16, f"{len(mm)} rows")
errs = [number(p[10]) for p in mm]
check("matmul: every row's error within 1e-2 of cuBLAS",
      mm and all(e is not None and e <= 1e-2 for e in errs), str(errs))

# quantized matmul: 4 shapes x 5 formats x 5 sizes
qm = [p for p in rows(out, "quantized matmul:", 11) if p[0].endswith("_proj")]
formats = sorted({p[4] for p in qm})
check("quantized matmul: 4 shapes x 5 formats x 5 sizes", len(qm) == 100, f"{len(qm)} rows")
check("quantized matmul: every format", formats == sorted(["wint8", "wint4-g128", "wint4-chan", "wint2", "fp8-b128"]),
      str(formats))
qerr = [number(p[10]) for p in qm]
check("quantized matmul: every row's error within 2e-2 of quant_matmul_ref",
      qm and all(e is not None and e <= 2e-2 for e in qerr), str([e for e in qerr if e is None or e > 2e-2]))
targets = re.findall(r"^    (\S+)\s+of copy at M=1\s+([0-9.]+)", out, re.M)
check("issue 6 targets summarised per format", len(targets) == 5, str(targets))

# attention and elementwise ops: every size timed
att = [p for p in rows(out, "  batch x context", 4)]
check("attention decode: 2 contexts x 2 batches", len(att) == 4, str(att))
pre = [p for p in rows(out, "  tokens", 3)]
check("attention prefill: 2 lengths", len(pre) == 2, str(pre))
ew = rows(out, "  op, rows (tokens)", 4)
check("elementwise ops: 5 ops x 2 sizes", len(ew) == 10, f"{len(ew)} rows")
times = [number(p[-6]) for p in ew] if ew else []
check("elementwise ops: every time positive", times and all(t and t > 0 for t in times), str(times))

# mixture of experts: 2 shapes x 4 formats x 3 token counts, tensor cores included
moe = [p for p in rows(out, "  shape         N", 12)]
check("experts: 2 shapes x 4 formats x 3 sizes", len(moe) == 24, f"{len(moe)} rows")
merr = [number(p[11]) for p in moe]
check("experts: first and last rows within 2e-2 of quant_matmul_ref",
      moe and all(e is not None and e <= 2e-2 for e in merr), str(merr))

# --model: decode tables, dense, quantized at load, a mixture
for model, quant in [("llama", None), ("llama", "wint8"), ("llama", "wint4"), ("llama", "block_wise_fp8"),
                     ("qwen3-moe", "wint4")]:
    args = ["--smoke", "--model", f"{MODELS}/{model}", "--context", "20", "--steps", "2", "--batches", "1,3",
            "--max-batch-tokens", "32"]
    if quant:
        args += ["--quantization", quant]
    r = run(*args, timeout=300)
    name = f"--model {model}" + (f" --quantization {quant}" if quant else "")
    dec = [p for p in rows(r.stdout, "  batch", 10) if p[0].isdigit()]
    ok = r.returncode == 0 and [p[0] for p in dec] == ["1", "3"] and all(
        number(p[1]) and number(p[3]) and number(p[5]) for p in dec)
    check(f"{name}: tok/s and bound at batch 1 and 3", ok, f"rc {r.returncode}: {r.stderr.strip()[-300:]} {dec}")

# bad input: one line on stderr, exit 1
for args, want in [(["--batches", "0"], "--batches"), (["--min-time", "x"], "--min-time"),
                   (["--model", "/nonexistent"], "/nonexistent"), (["--bogus"], "--bogus"),
                   (["--smoke", "--model", f"{MODELS}/llama", "--quantization", "wint2"], "offline only"),
                   (["--quantization", "wint9"], "wint9")]:
    r = run(*args, timeout=60)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    check(f"bad input {' '.join(args)}: exit 1 with a message", r.returncode == 1 and want in last
          and last.startswith("bench_cuda: "), f"rc {r.returncode}, stderr {r.stderr.strip()[-300:]!r}")

done("test_bench_cuda")
