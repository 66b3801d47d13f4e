#!/usr/bin/env python3
"""Static SASS counts of the CUDA kernels' hot loops, without a GPU.

For each kernel of a .cu file: registers and spills (ptxas -v), and its
largest loop that issues tensor-core instructions (HMMA/QMMA), or with
--any its largest loop: how many SASS instructions it holds and which.
Divided by the weight bytes one warp streams per iteration, that is the
issue cost per byte the docs compare with HBM's rate (docs/BENCHMARKS.md,
"SASS counts"). Static counts include branches a given warp skips.

  scripts/sass_loops.py kernels/cuda/cuda_wint_tc.cu [--filter NAME] [--arch sm_90]

Needs nvcc (PATH, $CUDA_HOME/bin or /usr/local/cuda/bin) and cuobjdump,
and the nvdisasm it runs, which the toolkit here lacks: the script takes
them from PATH, $CUDA_HOME/bin, or else installs PyPI's
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm into .venv (pip; nothing of
them is committed)."""
import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_tool(name):
    cands = [shutil.which(name)]
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cands.append(os.path.join(home, "bin", name))
    cands += glob.glob(os.path.join(ROOT, ".venv/lib/python3*/site-packages/nvidia/cu*/bin", name))
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    return None


def cuobjdump():
    tool = find_tool("cuobjdump")
    if tool and find_tool("nvdisasm"):
        return tool
    py = os.path.join(ROOT, ".venv/bin/python")
    if not os.access(py, os.X_OK):
        subprocess.run([sys.executable, "-m", "venv", os.path.join(ROOT, ".venv")], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm"], check=True)
    tool = find_tool("cuobjdump")
    if not tool:
        sys.exit("sass_loops: cuobjdump not found after installing nvidia-cuda-cuobjdump")
    for f in glob.glob(os.path.join(os.path.dirname(tool), "*")):
        os.chmod(f, 0o755)  # wheels may drop the execute bits
    return tool


def ptxas_regs(text):
    """kernel -> (registers, spill store bytes) from ptxas -v."""
    out, name, spill = {}, None, 0
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            spill = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name] = (int(m.group(1)), spill)
            name = None
    return out


def loops(sass, any_loop):
    """kernel -> (instructions of its largest (MMA) loop, opcode counts)."""
    out = {}
    for f in re.split(r"\n\s*Function : ", sass)[1:]:
        name = f.split("\n", 1)[0].strip()
        ins = []
        for line in f.split("\n"):
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
            if m:
                text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())  # drop the predicate
                ins.append((int(m.group(1), 16), text.split()[0] if text else "", text))
        best = None
        for addr, op, text in ins:
            m = re.search(r"0x([0-9a-f]+)", text) if op.startswith("BRA") else None
            if m and int(m.group(1), 16) <= addr:  # a backward branch closes a loop
                body = [x for x in ins if int(m.group(1), 16) <= x[0] <= addr]
                if (any_loop or any("MMA" in x[1] for x in body)) and (best is None or len(body) > len(best)):
                    best = body
        if best:
            out[name] = (len(best), collections.Counter(re.sub(r"\..*", "", x[1]) for x in best))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("--filter", default="", help="only kernels whose mangled name contains this")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--any", action="store_true", help="the largest loop, MMA or not")
    args = ap.parse_args()
    nvcc = find_tool("nvcc")
    if not nvcc:
        sys.exit("sass_loops: nvcc not found")
    dump = cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        arch = args.arch.replace("sm_", "")
        r = subprocess.run([nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", ROOT,
                            "-cubin", "-Xptxas", "-v", "-o", cubin, args.source], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        regs = ptxas_regs(r.stderr)
        env = dict(os.environ, NVDISASM_PATH=os.path.dirname(find_tool("nvdisasm")))
        r = subprocess.run([dump, "-sass", cubin], capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit(r.stderr)
        sass = r.stdout
    for name, (n, ops) in sorted(loops(sass, args.any).items()):
        if args.filter not in name:
            continue
        reg, spill = regs.get(name, (0, 0))
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        print(f"{name}\n    {reg} registers, {spill} B spilled; loop of {n} instructions: {top}")


if __name__ == "__main__":
    main()
