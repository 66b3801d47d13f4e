#!/usr/bin/env python3
"""Kernels per recorded decode step, as the CUDA backend reports them at
--verbose (cudaGraphGetNodes on the recording), counted by the CPU
emulator's nibble (stdlib only). A guard against launches creeping into
the decode step: the counts are exact, so a change that adds or removes
kernels fails here until it updates them (and docs/BENCHMARKS.md, "Kernels
per recorded decode step"). The emulator records what a GPU would: the
same code picks the same kernels; CUEMU_SMS sets the SM count the backend
sees (the decode attention splits a context into fewer partials when the
batch alone fills the GPU). NIBBLE_CUEMU names the binary (default: the emulator's
build)."""
import os
import re
import subprocess

from tally import check, done

NIBBLE = os.environ.get("NIBBLE_CUEMU", "build/cuemu/nibble")
MODELS = "tests/fixtures/models"

# (what, model, extra args, SMs, kernels, other nodes)
CASES = [
    # llama: 4 layers of 9 kernels, one more for the step (the decode
    # attention's last block merges its partials: no merge kernel)
    ("llama bf16", "llama", [], 132, 37, 0),
    # one partial per (token, kv head): nothing to merge, the same count
    ("llama bf16, batch fills the GPU (one partial)", "llama", [], 1, 37, 0),
    # the down product makes silu(gate) * up itself (matmul_silu): 8 a layer
    ("llama wint4", "llama", ["--quantization", "wint4"], 132, 33, 0),
    ("llama int8 kv", "llama", ["--kv-cache-dtype", "int8"], 132, 37, 0),
    # unaligned dims: q, k, v, gate, up unfused, every product quantizes its
    # input; the down product's quantization makes silu(gate) * up itself
    ("llama-fp8 checkpoint", "llama-fp8", [], 132, 73, 0),
    ("qwen3 bf16", "qwen3", [], 132, 19, 0),
    ("qwen3-moe bf16", "qwen3-moe", [], 132, 40, 2),
]

REPORT = re.compile(r"recorded a decode step of (\d+) tokens: (\d+) kernels, (\d+) other nodes")

for what, model, extra, sms, kernels, others in CASES:
    env = dict(os.environ, CUEMU_SMS=str(sms))
    r = subprocess.run([NIBBLE, "generate", "--model", f"{MODELS}/{model}", "--device", "cuda", "--max-tokens", "3",
                        "--temperature", "0", "--prompt", "hello", "--verbose", *extra],
                       capture_output=True, text=True, timeout=600, env=env)
    reports = [tuple(int(g) for g in m.groups()) for m in REPORT.finditer(r.stderr)]
    one = [rep for rep in reports if rep[0] == 1]
    check(f"{what}: generate runs", r.returncode == 0, r.stderr[-300:])
    check(f"{what}: a one-token decode step is recorded", len(one) >= 1, f"reports: {reports}")
    if one:
        check(f"{what}: {kernels} kernels and {others} other nodes per step", one[0][1:] == (kernels, others),
              f"got {one[0][1]} kernels and {one[0][2]} other nodes")

done("test_graph_nodes")
