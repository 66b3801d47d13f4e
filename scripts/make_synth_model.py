#!/usr/bin/env python3
"""Writes a synthetic Llama-3-8B-shaped checkpoint for the GPU benchmarks.

    python3 scripts/make_synth_model.py OUT_DIR [--layers 32] [--device auto|cuda|cpu] [--arch llama3-8b|qwen3-30b-a3b]

--arch qwen3-30b-a3b writes a mixture of experts of Qwen3-30B-A3B's shapes
instead (Qwen3MoeForCausalLM: hidden 2048, 32 heads, 4 KV heads, head_dim
128, QK norms, 128 experts of width 768, 8 per token, vocab 151936; about
1.2 GB a layer of its 48).

The directory is a complete Hugging Face model: config.json
(LlamaForCausalLM, hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
head_dim 128, vocab 128256, rope_theta 500000, untied lm_head, bfloat16),
generation_config.json, sharded safetensors (model-0000X-of-0000N.safetensors
of about --shard-gb each, plus model.safetensors.index.json) and a tokenizer.
Weights are random BF16, normal with std 0.02 (norms are ones): the model
computes noise, it only has the real model's shapes and bytes (~16 GB at 32
layers).

The tokenizer is the llama fixture's (tests/fixtures/models/llama, a small
Llama-3-style BPE): prompts encode to ids below its vocabulary, and ids above
it, which the model can produce, decode to nothing. bos/eos in the configs are
the fixture tokenizer's ids so that both agree.

Needs torch (tensors generated on the GPU when there is one, much faster)
or, without torch, numpy alone (on the CPU: about a minute per 4 GB here).
Shards are written one at a time, so host memory stays near one shard,
under a temporary name and renamed; the index is written last, so a
directory with model.safetensors.index.json is complete.
"""
import argparse
import json
import os
import re
import shutil
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "models", "llama")

# the model's shapes; main() switches them to MOE's for --arch qwen3-30b-a3b
HIDDEN = 4096
INTERMEDIATE = 14336
HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
VOCAB = 128256
STD = 0.02
EXPERTS = 0  # experts per layer (0: dense)
MOE = {"HIDDEN": 2048, "INTERMEDIATE": 6144, "HEADS": 32, "KV_HEADS": 4, "HEAD_DIM": 128, "VOCAB": 151936,
       "EXPERTS": 128}
EXPERT_WIDTH = 768
EXPERTS_USED = 8


def die(msg):
    print(f"make_synth_model: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    import torch
except ImportError:
    torch = None
    try:
        import numpy as np
    except ImportError as exc:  # one clear line, not a traceback
        die(f"needs torch or numpy in this python ({sys.executable}): {exc}")


def tensor_plan(layers):
    """(name, shape, is_norm) in checkpoint order: embedding, layers, norm, lm_head."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    plan = [("model.embed_tokens.weight", (VOCAB, HIDDEN), False)]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (HIDDEN,), True),
            (p + "self_attn.q_proj.weight", (q, HIDDEN), False),
            (p + "self_attn.k_proj.weight", (kv, HIDDEN), False),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN), False),
            (p + "self_attn.o_proj.weight", (HIDDEN, q), False),
            (p + "post_attention_layernorm.weight", (HIDDEN,), True),
        ]
        if not EXPERTS:
            plan += [
                (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), False),
                (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), False),
                (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), False),
            ]
            continue
        plan += [(p + "self_attn.q_norm.weight", (HEAD_DIM,), True), (p + "self_attn.k_norm.weight", (HEAD_DIM,), True),
                 (p + "mlp.gate.weight", (EXPERTS, HIDDEN), False)]
        for x in range(EXPERTS):
            e = f"{p}mlp.experts.{x}."
            plan += [
                (e + "gate_proj.weight", (EXPERT_WIDTH, HIDDEN), False),
                (e + "up_proj.weight", (EXPERT_WIDTH, HIDDEN), False),
                (e + "down_proj.weight", (HIDDEN, EXPERT_WIDTH), False),
            ]
    plan += [("model.norm.weight", (HIDDEN,), True), ("lm_head.weight", (VOCAB, HIDDEN), False)]
    return plan


def nbytes(shape):
    n = 2  # bfloat16
    for d in shape:
        n *= d
    return n


def split_shards(plan, shard_bytes):
    """Consecutive tensors, a new shard whenever the next one would overflow."""
    shards, cur, size = [], [], 0
    for t in plan:
        b = nbytes(t[1])
        if cur and size + b > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += b
    if cur:
        shards.append(cur)
    return shards


def bf16_bytes(shape, is_norm, seed, dev):
    """A tensor's BF16 bytes: ones for norms, else N(0, STD) from seed."""
    if torch is not None:
        with torch.no_grad():
            if is_norm:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator(device=dev).manual_seed(seed)
                t = torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(0.0, STD, generator=g)
            return t.cpu().contiguous().view(torch.int16).numpy().tobytes()
    if is_norm:
        return np.full(shape, 0x3F80, dtype=np.uint16).tobytes()  # 1.0
    a = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(STD)
    u = a.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()  # to nearest even


def write_safetensors(path, tensors):
    """(name, shape, BF16 bytes) in order: an 8-byte little-endian header
    length, the JSON header (padded with spaces to 8 bytes), the data."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, data in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, data in tensors:
            f.write(data)


def special_ids():
    """bos/eos ids of the fixture tokenizer, looked up by their content."""
    with open(os.path.join(TOKENIZER_DIR, "tokenizer.json")) as f:
        tok = json.load(f)
    with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    ids = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    ids.update(tok["model"]["vocab"])

    def lookup(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v not in ids:
            die(f"{TOKENIZER_DIR}: {key} {v!r} is not in tokenizer.json")
        return ids[v]

    return lookup("bos_token"), lookup("eos_token"), len(tok["model"]["vocab"])


def write_configs(out, layers, bos, eos, seed):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": STD,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB,
        "nibble_synthetic": f"random N(0, {STD}) weights, seed {seed}, written by scripts/make_synth_model.py",
    }
    if EXPERTS:
        config.update({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": EXPERT_WIDTH,
            "norm_topk_prob": True,
            "num_experts": EXPERTS,
            "num_experts_per_tok": EXPERTS_USED,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
        })
        del config["mlp_bias"], config["pretraining_tp"]
    gen = {"bos_token_id": bos, "eos_token_id": eos}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(out, name))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, as Llama-3-8B)")
    ap.add_argument("--device", default="auto", help="where to generate the tensors: auto, cuda or cpu")
    ap.add_argument("--shard-gb", type=float, default=4.0, help="largest shard in GB (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="llama3-8b", help="llama3-8b (default) or qwen3-30b-a3b (a mixture of experts)")
    args = ap.parse_args()
    if args.arch not in ("llama3-8b", "qwen3-30b-a3b"):
        die(f"--arch {args.arch!r}: expected llama3-8b or qwen3-30b-a3b")
    if args.arch == "qwen3-30b-a3b":
        globals().update(MOE)
    if args.layers < 1:
        die("--layers must be at least 1")
    if args.device not in ("auto", "cuda", "cpu"):
        die(f"--device {args.device!r}: expected auto, cuda or cpu")
    has_cuda = torch is not None and torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        die("--device cuda: " + ("torch sees no CUDA device" if torch is not None else "no torch (numpy runs on the CPU)"))
    dev = "cuda" if args.device == "auto" and has_cuda else args.device if args.device != "auto" else "cpu"

    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    index_path = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(index_path):
        os.remove(index_path)  # incomplete until rewritten at the end
    for old in os.listdir(out):  # shards of an earlier run (maybe another layer count)
        if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors(\.tmp)?", old):
            os.remove(os.path.join(out, old))

    plan = tensor_plan(args.layers)
    total = sum(nbytes(s) for _, s, _ in plan)
    free = shutil.disk_usage(out).free
    if free < total * 1.02:
        die(f"{out}: {total / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    shards = split_shards(plan, int(args.shard_gb * 1e9))
    n = len(shards)
    bos, eos, tok_vocab = special_ids()
    write_configs(out, args.layers, bos, eos, args.seed)
    arch = "Qwen3MoeForCausalLM" if EXPERTS else "LlamaForCausalLM"
    print(f"make_synth_model: {out}: {arch}, {args.layers} layers, "
          f"{len(plan)} tensors, {total / 1e9:.2f} GB BF16 in {n} shard(s), generated on {dev} with {'torch' if torch is not None else 'numpy'}; "
          f"tokenizer vocab {tok_vocab} of the model's {VOCAB}", flush=True)

    weight_map = {}
    t_start = time.time()
    k = 0  # tensor index, for per-tensor seeds
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = []
        for name, shape, is_norm in shard:
            tensors.append((name, shape, bf16_bytes(shape, is_norm, args.seed * 1000003 + k, dev)))
            weight_map[name] = fname
            k += 1
        tmp = os.path.join(out, fname + ".tmp")
        write_safetensors(tmp, tensors)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(out, fname))
        size = sum(nbytes(s) for _, s, _ in shard)
        del tensors
        print(f"  {fname}: {len(shard)} tensors, {size / 1e9:.2f} GB ({time.time() - t_start:.0f} s)", flush=True)

    with open(index_path + ".tmp", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(index_path + ".tmp", index_path)
    print(f"make_synth_model: done in {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
