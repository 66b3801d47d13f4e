/* Internal to engine/model: the model's fields, shared by model.c (load,
 * forward) and model_quant.c (binding linear weights, packed or quantized
 * at load). */
#ifndef NB_MODEL_INT_H
#define NB_MODEL_INT_H

#include "engine/model/model.h"
#include "engine/model/quant_config.h"
#include "engine/model/safetensors.h"

/* q/k/v, and gate/up, are bound either fused (one weight whose rows are
 * theirs in order, so one matmul reads the input once: wqkv and gate_up)
 * or one by one (model_bind_linears says which; the other fields stay
 * zeroed). */
typedef struct nb_layer {
    nb_weight attn_norm, ffn_norm;
    nb_weight wq, wk, wv, wo;
    nb_weight bq, bk, bv, bo;       /* present when the config says so */
    nb_weight wqkv, bqkv;           /* fused q|k|v and its bias */
    nb_weight q_norm, k_norm;       /* Qwen3 */
    nb_weight gate, up, down;
    nb_weight b_gate, b_up, b_down; /* present with mlp_bias */
    nb_weight gate_up, b_gate_up;   /* fused gate|up and its bias */
} nb_layer;

/* model_free walks a layer as an array of weights. */
_Static_assert(sizeof(nb_layer) % sizeof(nb_weight) == 0, "nb_layer holds only nb_weight fields");

/* A mixture-of-experts MLP block (model_moe.c): this rank's share of each
 * expert, and of the shared experts when the model has them. */
typedef struct nb_moe_layer {
    nb_weight router;              /* [n_experts][hidden], in FP32: never quantized */
    float *score_bias;             /* [n_experts] in backend memory, or NULL */
    nb_weight *gate, *up, *down;   /* [n_experts] */
    void *gate_set, *up_set, *down_set; /* the same, as experts_create sets */
    nb_weight sh_gate, sh_up, sh_down;
} nb_moe_layer;

/* Tensor parallelism: the ranks of a model and their threads (model_tp.c),
 * held by rank 0. */
typedef struct nb_tp nb_tp;

/* A part of a tensor: rows [start, start + len) (dim 0; a vector's
 * elements) or columns (dim 1). NULL where a caller takes it whole. */
typedef struct nb_slice {
    int dim;
    int64_t start, len;
} nb_slice;

/* Each rank of a tensor-parallel model is an nb_model of its own: the same
 * config, plan and checkpoint, its share of the heads and of the MLP, its
 * backend, weights, KV cache and activations. Rank 0 also holds the final
 * norm and the LM head, and answers the model_* calls. */
struct nb_model {
    nb_model_config cfg;
    nb_backend *be;
    st_model *st; /* rank 0's; the other ranks borrow it */
    int rank, n_ranks;
    nb_tp *tp; /* rank 0 of n_ranks > 1 */
    /* this rank's share: heads from q_head0 / kv_head0, MLP columns from ffn0 */
    int n_heads, n_kv_heads, q_head0, kv_head0;
    int64_t ffn, ffn0;
    int64_t moe_ffn, moe_ffn0, shared_ffn, shared_ffn0; /* each expert's share, the shared experts' */
    nb_weight embed, final_norm, lm_head;
    nb_layer *layers;
    /* [n_layers] for a mixture of experts (layer i's where config_layer_is_moe),
     * else NULL; with the block's backend buffers (T tokens, TK = T *
     * n_used (token, expert) pairs, P = NB_MOE_PAD_ROWS): router logits
     * [T][E]; moe_route's groups, rows, slot and weights; the pairs' input
     * rows, later their outputs, moe_xe [TK + P][hidden]; their gate and up
     * moe_g, moe_u [TK + P][expert width] */
    nb_moe_layer *moe;
    float *moe_logits, *moe_xe, *moe_g, *moe_u, *moe_w;
    int32_t *moe_groups, *moe_rows, *moe_slot;
    /* set while a layer's experts are bound: their weights stay in
     * quant.h's layout, which matmul_experts reads */
    int load_plain;
    nb_quant_plan plan;
    void **owned; /* host buffers made at load (packed weights, scales) */
    int n_owned, cap_owned;
    size_t bytes_by[NB_DTYPE_COUNT]; /* resident weight bytes per format */
    size_t alloc_short;              /* bytes of buffers model_alloc could not place */
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
    float *x, *xn, *att, *last, *logits;
    /* q, k and v lie in qkv ([T][q_dim] | [T][kv_dim] | [T][kv_dim]), where
     * a fused projection writes [n][q_dim + 2 kv_dim] rows instead; gate and
     * up lie in gu the same way ([n][2 ffn] when fused, whose silu product
     * goes to act [T][ffn], made only for fused layers) */
    float *qkv, *q, *k, *v, *gu, *gate, *up, *act;
    /* The LM head split by vocabulary (n_ranks > 1 dividing the vocabulary):
     * each rank's rows [rank * V/n, ...) of it; its logits [rows][V/n] in
     * head_part, every rank's gathered in head_all [n][rows][V/n], which
     * rank 0 reorders into logits through head_perm (host, [rows * n]). */
    int vocab_split;
    float *head_part, *head_all;
    int32_t *head_perm;
};


/* A zeroed host buffer the model owns (freed with it). */
void *model_own(nb_model *m, size_t bytes);
/* Tensor t (BF16/F16/F32, [rows][cols], rows 0: a vector of cols) as FP32
 * in a host buffer the model owns; NULL with the reason in e (naming
 * `what`) when t is missing or of another shape or dtype. */
float *model_host_f32(nb_model *m, const st_tensor *t, int64_t rows, int64_t cols, const char *what, nb_err *e);
/* Gives back what the backend holds of w (data, scale, scale2). */
void model_weight_free(nb_backend *be, const nb_weight *w);

/* model_moe.c: binds layer li's router and experts (this rank's share);
 * allocates the block's buffers (after max_tokens is set); runs the block
 * on xn (n tokens), leaving its output in xn; frees the weights and
 * buffers. */
int model_moe_bind(nb_model *m, int li, nb_err *e);
void model_moe_alloc(nb_model *m);
/* A zeroed buffer in the backend's memory, or NULL (counted in
 * m->alloc_short, which the caller turns into one error) when it is full. */
void *model_alloc(nb_model *m, size_t bytes);
/* The error for `bytes` of `what` (a weight's name, "activations", the KV
 * cache) that the backend's memory cannot hold: what is loaded and free,
 * and what would fit it (fix, if not NULL, first). */
int model_no_memory(nb_model *m, const char *what, size_t bytes, const char *fix, nb_err *e);
/* n bytes as "12.3 MiB" or "4.56 GiB" in buf. */
const char *model_size_str(char *buf, size_t cap, size_t n);
void model_moe_forward(nb_model *m, int li, int n);
void model_moe_free(nb_model *m);
/* Whether a step of n tokens through the mixture's layers may be recorded
 * (every layer's experts: experts_recordable). */
int model_moe_recordable(const nb_model *m, int n);

/* Binds a plain tensor (norms, biases, embeddings) as a [rows, cols] weight
 * (rows == 0: a vector of cols), or the part sl of it; a missing optional
 * tensor leaves w zeroed. */
int model_bind(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, const nb_slice *sl,
               int optional, nb_err *e);
/* A whole [rows, cols] tensor as a weight converted to FP32. */
int model_bind_f32(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, nb_err *e);
/* Binds linear weight `name` [rows][cols] (or its part sl) as the plan
 * says: packed tensors of an offline checkpoint as they are, else the
 * checkpoint's BF16/F16/F32 values, quantized now when `target` is a packed
 * format. */
int model_bind_linear(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, const nb_slice *sl,
                      nb_dtype target, nb_err *e);

/* One projection of a layer whose projections share an input: its
 * tensor, rows and this rank's part of them (NULL: all). */
typedef struct nb_part {
    const char *name;
    int64_t rows;
    const nb_slice *sl;
} nb_part;
#define MODEL_MAX_PARTS 3

/* Binds the n linear weights parts (each [rows][K], as model_bind_linear
 * would) either as one weight, *fused, whose rows are theirs in order, or
 * one by one into *outs[i] (*fused then zeroed). Fused where every part
 * has the same format, width and group (FP8: row blocks not shared) and
 * the backend copies the bytes anyway (not the CPU's plain weights, used
 * where they lie in the checkpoint). fused_name names the fused weight in
 * errors. */
int model_bind_linears(nb_model *m, nb_weight *fused, nb_weight *const *outs, const nb_part *parts, int n, int64_t K,
                       nb_dtype target, const char *fused_name, nb_err *e);
/* The vectors parts (rows: each one's length) one after the other, as one
 * vector weight: the bias of a fused weight. */
int model_bind_cat(nb_model *m, nb_weight *w, const nb_part *parts, int n, const char *fused_name, nb_err *e);

/* Sets this rank's share (rank, n_ranks, be set), binds its weights and
 * makes its activations; the KV cache comes after. */
int model_load_rank(nb_model *m, const nb_model_opts *opts, nb_err *e);

/* model_tp.c: splits rank 0's model over its backend's group (shares,
 * weights of the other ranks, their threads); rank 0 has its share set and
 * its weights bound, no KV cache yet. */
int model_tp_start(nb_model *m, const nb_model_opts *opts, nb_err *e);
/* Runs fn(rank's model, arg) on every rank at once, rank 0 on the caller. */
void model_tp_run(nb_model *m, void (*fn)(nb_model *r, void *arg), void *arg);
/* Rank r's model (0: m itself). */
nb_model *model_tp_rank(nb_model *m, int r);
void model_tp_stop(nb_model *m);
/* Frees what model_bind_linear made. */
void model_free_owned(nb_model *m);

#endif
