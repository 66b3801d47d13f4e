/* Internal to engine/model: the model's fields, shared by model.c (load,
 * forward) and model_quant.c (binding linear weights, packed or quantized
 * at load). */
#ifndef NB_MODEL_INT_H
#define NB_MODEL_INT_H

#include "engine/model/model.h"
#include "engine/model/quant_config.h"
#include "engine/model/safetensors.h"

typedef struct nb_layer {
    nb_weight attn_norm, ffn_norm;
    nb_weight wq, wk, wv, wo;
    nb_weight bq, bk, bv, bo;       /* present when the config says so */
    nb_weight q_norm, k_norm;       /* Qwen3 */
    nb_weight gate, up, down;
    nb_weight b_gate, b_up, b_down; /* present with mlp_bias */
} nb_layer;

/* model_free walks a layer as an array of weights. */
_Static_assert(sizeof(nb_layer) % sizeof(nb_weight) == 0, "nb_layer holds only nb_weight fields");

struct nb_model {
    nb_model_config cfg;
    nb_backend *be;
    st_model *st;
    nb_weight embed, final_norm, lm_head;
    nb_layer *layers;
    nb_quant_plan plan;
    void **owned; /* host buffers made at load (packed weights, scales) */
    int n_owned, cap_owned;
    size_t bytes_by[NB_DTYPE_COUNT]; /* resident weight bytes per format */
    FILE *report;                    /* per-layer quantization error, when asked */
    model_capture_fn capture;
    void *capture_ctx;
    float *inv_freq;

    int num_blocks;
    void **k_cache, **v_cache; /* [n_layers] */
    size_t kv_layer_bytes;     /* of each of them */
    /* Padded decode steps (backends that record graphs): the padding
     * tokens write and read block num_blocks, one past the engine's, and
     * the step is rebuilt in these host arrays (allocated on first use). */
    int32_t *pad_tok, *pad_pos, *pad_seq, *pad_slot, *pad_tables;
    size_t pad_tables_cap;

    /* activation workspace for max_tokens tokens */
    int max_tokens;
    int max_rows; /* logit rows: last and logits hold this many */
    float *x, *xn, *q, *k, *v, *att, *gate, *up, *last, *logits;
};


/* Binds a plain tensor (norms, biases, embeddings) as a [rows, cols] weight
 * (rows == 0: a vector of cols); a missing optional tensor leaves w zeroed. */
int model_bind(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, int optional, nb_err *e);
/* Binds linear weight `name` [rows][cols] as the plan says: packed tensors
 * of an offline checkpoint as they are, else the checkpoint's BF16/F16/F32
 * values, quantized now when `target` is a packed format. */
int model_bind_linear(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, nb_dtype target,
                      nb_err *e);
/* Frees what model_bind_linear made. */
void model_free_owned(nb_model *m);

#endif
