#!/usr/bin/env python3
"""Builds the tiny random-weight model fixtures under tests/fixtures/models/
and records what Hugging Face transformers computes for them.

Each fixture is a complete Hugging Face model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with the family's
real chat template, generation_config.json) plus reference.json:
  prompt, prompt_ids       the prompt and its ids (tokenizers, add_special_tokens)
  logits                   FP32 logits at the last prompt position
  greedy                   32 greedy tokens (EOS ignored) from FP32 transformers
  greedy_text              their decode (skip_special_tokens)
  min_margin               smallest top-1/top-2 logit gap along the greedy path

Needs torch + transformers + tokenizers (the repo's .venv); CI only reads the
committed output. Run from the repository root:  .venv/bin/python scripts/make_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture_tokenizers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
N_GREEDY = 32
MIN_MARGIN = 2e-3  # greedy steps closer than this could flip on summation order

PROMPT_SHORT = "The quick brown fox jumps over the lazy dog. 你好，世界！ def f(x): return x*2"
PROMPT_LONG = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    "told stories about the stars. Every evening the children gathered on the beach to "
    "listen, and every evening he began with the same words: the sea remembers everything."
)

FIXTURES = [
    dict(name="llama", arch="LlamaForCausalLM", tok="llama3", template="llama3", dtype=torch.bfloat16,
         prompt=PROMPT_LONG,
         cfg=dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=64))),
    dict(name="mistral", arch="MistralForCausalLM", tok="mistral", template="mistral", dtype=torch.float16,
         prompt=PROMPT_SHORT,
         cfg=dict(model_type="mistral", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None)),
    dict(name="qwen2", arch="Qwen2ForCausalLM", tok="qwen2", template="qwen2.5", dtype=torch.bfloat16,
         prompt=PROMPT_SHORT, pad_vocab=64,
         cfg=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
                  use_sliding_window=False)),
    dict(name="qwen3", arch="Qwen3ForCausalLM", tok="qwen2", template="qwen3", dtype=torch.float32,
         prompt=PROMPT_SHORT,
         cfg=dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0,
                  attention_bias=False, use_sliding_window=False)),
    dict(name="ernie", arch="Ernie4_5_ForCausalLM", tok="ernie", template="ernie4.5", dtype=torch.bfloat16,
         prompt=PROMPT_SHORT,
         cfg=dict(model_type="ernie4_5", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0, use_bias=False)),
    # mixtures of experts: layer 1 of qwen3-moe is dense (mlp_only_layers) and its chosen weights are
    # not renormalized; mixtral renormalizes; ernie-moe has a dense layer 0, a shared expert and a
    # router score bias
    dict(name="qwen3-moe", arch="Qwen3MoeForCausalLM", tok="qwen2", template="qwen3", dtype=torch.bfloat16,
         prompt=PROMPT_SHORT,
         cfg=dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                  num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                  decoder_sparse_step=1, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_theta=1000000.0, use_sliding_window=False)),
    dict(name="mixtral", arch="MixtralForCausalLM", tok="mistral", template="mistral", dtype=torch.bfloat16,
         prompt=PROMPT_SHORT,
         cfg=dict(model_type="mixtral", hidden_size=64, intermediate_size=48, num_local_experts=4,
                  num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_theta=1000000.0, sliding_window=None)),
    dict(name="ernie-moe", arch="Ernie4_5_MoeForCausalLM", tok="ernie", template="ernie4.5", dtype=torch.bfloat16,
         prompt=PROMPT_SHORT,
         cfg=dict(model_type="ernie4_5_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  moe_num_experts=6, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                  moe_layer_interval=1, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_theta=500000.0, use_bias=False)),
]


def init_weights(model, seed):
    """Random weights scaled so activations stay O(1): greedy steps then have
    clear winners instead of near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def special_id(tok, content):
    return tok.token_to_id(content) if content else None


def token_content(v):
    return v.get("content") if isinstance(v, dict) else v


def reference(model_dir, prompt, tok):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok.encode(prompt, add_special_tokens=True).ids
    seq = list(ids)
    logits0, greedy, margin = None, [], float("inf")
    with torch.no_grad():
        for step in range(N_GREEDY):
            out = model(torch.tensor([seq])).logits[0, -1].float()
            if step == 0:
                logits0 = out.tolist()
            top = torch.topk(out, 2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            nxt = int(torch.argmax(out))
            greedy.append(nxt)
            seq.append(nxt)
    return ids, logits0, greedy, margin


def build(fx):
    out = os.path.join(FIX, "models", fx["name"])
    tok, tok_cfg = fixture_tokenizers.build(fx["tok"])
    with open(os.path.join(FIX, "templates", fx["template"] + ".jinja")) as f:
        tok_cfg["chat_template"] = f.read()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    pad = fx.get("pad_vocab", 1)
    vocab = (vocab + pad - 1) // pad * pad
    bos = special_id(tok, token_content(tok_cfg.get("bos_token")))
    eos = special_id(tok, token_content(tok_cfg.get("eos_token")))

    for attempt in range(20):
        seed = 1234 + attempt
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out)
        cfg = AutoConfig.for_model(fx["cfg"]["model_type"], **{k: v for k, v in fx["cfg"].items() if k != "model_type"})
        cfg.architectures = [fx["arch"]]
        cfg.vocab_size = vocab
        cfg.bos_token_id = bos
        cfg.eos_token_id = eos
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        init_weights(model, seed)
        model.to(fx["dtype"]).save_pretrained(out, safe_serialization=True)
        tok.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
        ids, logits, greedy, margin = reference(out, fx["prompt"], tok)
        if margin >= MIN_MARGIN:
            break
        print(f"{fx['name']}: seed {seed} has a greedy margin of {margin:.2e}, retrying", file=sys.stderr)
    else:
        raise SystemExit(f"{fx['name']}: no seed gave a clear greedy path")

    ref = dict(prompt=fx["prompt"], prompt_ids=ids, logits=logits, greedy=greedy,
               greedy_text=tok.decode(greedy, skip_special_tokens=True), min_margin=margin,
               seed=seed, torch=torch.__version__)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, ensure_ascii=False)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"{fx['name']}: {fx['arch']} vocab {vocab}, {len(ids)} prompt tokens, margin {margin:.3g}, "
          f"{size / 1e6:.2f} MB")
    assert size < 5e6, "fixture over 5 MB"


def main():
    names = sys.argv[1:]
    for fx in FIXTURES:
        if not names or fx["name"] in names:
            build(fx)


if __name__ == "__main__":
    main()
