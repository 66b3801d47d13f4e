/* A model's shape and behaviour, read from its Hugging Face config.json and
 * generation_config.json. One parameterised llama-family description covers
 * every dense architecture; per-architecture switches are plain fields. */
#ifndef NB_CONFIG_H
#define NB_CONFIG_H

#include <stdint.h>

#include "common/err.h"

#define NB_MAX_EOS 8

typedef enum nb_arch {
    ARCH_LLAMA,   /* LlamaForCausalLM */
    ARCH_MISTRAL, /* MistralForCausalLM */
    ARCH_QWEN2,   /* Qwen2ForCausalLM: q/k/v bias */
    ARCH_QWEN3,   /* Qwen3ForCausalLM: per-head q/k RMSNorm */
    ARCH_ERNIE45, /* Ernie4_5_ForCausalLM: interleaved rope */
    /* mixtures of experts: the dense ones' attention, MoE MLP blocks */
    ARCH_QWEN3_MOE,  /* Qwen3MoeForCausalLM */
    ARCH_MIXTRAL,    /* MixtralForCausalLM */
    ARCH_ERNIE45_MOE, /* Ernie4_5_MoeForCausalLM: shared experts, router bias */
} nb_arch;

#define NB_MAX_MLP_ONLY 64
#define NB_MAX_EXPERTS 512 /* DeepSeek-V3 has 256 */
#define NB_MAX_EXPERTS_USED 64

/* A mixture of experts, as Hugging Face's MoE blocks compute it: router
 * probabilities p = softmax(x @ router^T) in FP32; the n_used experts with
 * the highest p (+ the router's score bias, where the checkpoint has one)
 * are chosen; their weights are p, divided by max(sum, norm_min) when norm
 * is set; the block's output is the weighted sum of the chosen experts'
 * SiLU MLPs, plus, with shared_ffn, a dense MLP of that width. */
typedef struct nb_moe_config {
    int n_experts;   /* 0: every layer is dense */
    int n_used;      /* experts per token */
    int ffn;         /* each expert's width */
    int norm;        /* renormalize the chosen weights */
    float norm_min;
    int shared_ffn;  /* 0: no shared experts */
    int score_bias;  /* the router has a selection bias (ERNIE's e_score_correction_bias) */
    /* which layers: (i + 1) % step == 0, first <= i <= last, not in dense[] */
    int step, first, last;
    int n_dense, dense[NB_MAX_MLP_ONLY];
    /* checkpoint names under model.layers.N.: the block ("mlp",
     * "block_sparse_moe"), an expert's gate, up and down projections */
    const char *block, *proj[3];
} nb_moe_config;

typedef enum nb_rope_type { ROPE_DEFAULT, ROPE_LINEAR, ROPE_LLAMA3 } nb_rope_type;

typedef struct nb_model_config {
    char arch_name[64];
    nb_arch arch;
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int max_position;   /* usable context length */
    float rms_eps;
    int tie_embeddings;
    int qkv_bias;       /* q/k/v projections carry a bias */
    int o_bias;         /* o_proj carries a bias */
    int mlp_bias;       /* gate/up/down carry a bias */
    int qk_norm;        /* RMSNorm over each q and k head before rope */
    int rope_interleaved;
    float rope_theta;
    nb_rope_type rope_type;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_orig_max_position;
    char dtype[16];     /* torch_dtype as declared, informational */
    nb_moe_config moe;

    /* generation_config.json (falls back to config.json) */
    int32_t bos_token_id; /* -1 if none */
    int32_t eos_token_ids[NB_MAX_EOS];
    int n_eos;
    float gen_temperature, gen_top_p; /* -1 when not given */
    int gen_top_k;                    /* -1 when not given */
} nb_model_config;

/* Reads DIR/config.json (and DIR/generation_config.json if present).
 * Errors name the file and the field. */
int config_load(const char *dir, nb_model_config *c, nb_err *e);
/* Parses a config.json document already in memory (path is for messages). */
int config_parse(const char *json, const char *path, nb_model_config *c, nb_err *e);

/* The rope inverse frequencies (head_dim/2 floats) with scaling folded in,
 * computed as transformers does in float32. */
void config_rope_inv_freq(const nb_model_config *c, float *inv_freq);

int config_is_eos(const nb_model_config *c, int32_t id);
/* Whether layer i's MLP is a mixture of experts. */
int config_layer_is_moe(const nb_model_config *c, int i);
const char *config_arch_label(nb_arch a);

#endif
