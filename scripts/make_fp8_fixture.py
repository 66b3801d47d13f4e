#!/usr/bin/env python3
"""Makes tests/fixtures/models/llama-fp8: the llama fixture as a Hugging Face
block-wise FP8 checkpoint (quantization_config quant_method "fp8",
weight_block_size [128, 128], dynamic activations), the layout of
DeepSeek-V3 and Qwen3-FP8 releases: each linear's `weight` in
float8_e4m3fn and `weight_scale_inv` (FP32, one per 128x128 block, the
factor that multiplies the FP8 values back). Quantized with torch's own
float8 cast, so nibble's loader is checked against another implementation.

reference.json records, for the fixture prompt, the last-position logits of
the model whose linears are the dequantized FP8 weights (transformers,
FP32), i.e. what a weight-only FP8 dequantization gives."""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

SRC = "tests/fixtures/models/llama"
DST = "tests/fixtures/models/llama-fp8"
BLOCK = 128
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w):
    """w [N, K] -> (fp8 [N, K], scale_inv [ceil(N/128), ceil(K/128)] fp32)."""
    w = w.float()
    n, k = w.shape
    br, bc = (n + BLOCK - 1) // BLOCK, (k + BLOCK - 1) // BLOCK
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.empty(br, bc, dtype=torch.float32)
    for i in range(br):
        for j in range(bc):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            amax = blk.abs().max()
            scale = (amax / 448.0) if amax > 0 else torch.tensor(1.0)
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (blk / scale).to(torch.float8_e4m3fn)
            s[i, j] = scale
    return q, s


def dequantize(q, s):
    w = q.float()
    n, k = w.shape
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= s[i, j]
    return w


def main():
    src = load_file(os.path.join(SRC, "model.safetensors"))
    out, deq = {}, {}
    for name, t in src.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q, s = quantize(t)
            out[name] = q
            out[name + "_scale_inv"] = s
            deq[name] = dequantize(q, s)
        else:
            out[name] = t
            deq[name] = t.float()
    if os.path.exists(DST):
        shutil.rmtree(DST)
    os.makedirs(DST)
    save_file(out, os.path.join(DST, "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(SRC, f)):
            shutil.copy(os.path.join(SRC, f), DST)
    with open(os.path.join(SRC, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": ["lm_head"]}
    with open(os.path.join(DST, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    # reference: transformers FP32 on the dequantized weights
    with open(os.path.join(SRC, "reference.json")) as f:
        ref = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32, attn_implementation="eager")
    model.load_state_dict(deq, strict=False)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ref["prompt_ids"]])).logits[0, -1].float()
    with open(os.path.join(DST, "reference.json"), "w") as f:
        json.dump({"prompt_ids": ref["prompt_ids"], "dequant_logits": logits.tolist(),
                   "bf16_logits": ref["logits"], "torch": torch.__version__}, f)
    print(f"wrote {DST}: {sum(t.numel() * t.element_size() for t in out.values()) / 1e6:.2f} MB of tensors")


if __name__ == "__main__":
    sys.exit(main())
