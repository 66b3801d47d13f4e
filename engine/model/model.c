#include "engine/model/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/model/model_int.h"
#include "engine/model/safetensors.h"
#include "quant/quant.h"

static int bind_layer(nb_model *m, int i, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    nb_layer *L = &m->layers[i];
    int64_t H = c->hidden_size, hd = c->head_dim, q_dim = (int64_t)c->n_heads * hd,
            kv_dim = (int64_t)c->n_kv_heads * hd, F = c->intermediate_size;
    /* Megatron's split: q/k/v and gate/up by output rows (this rank's heads
     * and MLP columns), o_proj and down_proj by input columns (their partial
     * sums meet in an all-reduce); a single rank takes everything. */
    nb_slice qr = {0, m->q_head0 * hd, m->n_heads * hd}, kvr = {0, m->kv_head0 * hd, m->n_kv_heads * hd},
             qc = {1, qr.start, qr.len}, fr = {0, m->ffn0, m->ffn}, fc = {1, m->ffn0, m->ffn};
    int split = m->n_ranks > 1;
    char n[160];
    nb_dtype d = m->plan.dense;
#define B(field, suffix, rows, cols, sl, opt)                              \
    (snprintf(n, sizeof n, "model.layers.%d.%s", i, suffix),               \
     model_bind(m, &L->field, n, rows, cols, split ? sl : NULL, opt, e))
#define LIN(field, suffix, rows, cols, sl)                                 \
    (snprintf(n, sizeof n, "model.layers.%d.%s", i, suffix),               \
     model_bind_linear(m, &L->field, n, rows, cols, split ? sl : NULL, d, e))
    if (B(attn_norm, "input_layernorm.weight", 0, H, NULL, 0) ||
        B(ffn_norm, "post_attention_layernorm.weight", 0, H, NULL, 0))
        return -1;
    char pn[3][160], fn[160];
    const nb_slice *qs = split ? &qr : NULL, *kvs = split ? &kvr : NULL, *fs = split ? &fr : NULL;
#define PART(j, suffix, rows, sl) \
    (nb_part){(snprintf(pn[j], sizeof pn[j], "model.layers.%d.%s", i, suffix), pn[j]), rows, sl}
    nb_part qkv[3] = {PART(0, "self_attn.q_proj.weight", q_dim, qs), PART(1, "self_attn.k_proj.weight", kv_dim, kvs),
                      PART(2, "self_attn.v_proj.weight", kv_dim, kvs)};
    nb_weight *qkv_out[3] = {&L->wq, &L->wk, &L->wv};
    snprintf(fn, sizeof fn, "model.layers.%d.self_attn.qkv_proj", i);
    if (model_bind_linears(m, &L->wqkv, qkv_out, qkv, 3, H, d, fn, e)) return -1;
    if (LIN(wo, "self_attn.o_proj.weight", H, q_dim, &qc)) return -1;
    if (c->qkv_bias) {
        nb_part b[3] = {PART(0, "self_attn.q_proj.bias", q_dim, qs), PART(1, "self_attn.k_proj.bias", kv_dim, kvs),
                        PART(2, "self_attn.v_proj.bias", kv_dim, kvs)};
        snprintf(fn, sizeof fn, "model.layers.%d.self_attn.qkv_proj.bias", i);
        if (L->wqkv.data ? model_bind_cat(m, &L->bqkv, b, 3, fn, e)
                         : (B(bq, "self_attn.q_proj.bias", 0, q_dim, &qr, 0) ||
                            B(bk, "self_attn.k_proj.bias", 0, kv_dim, &kvr, 0) ||
                            B(bv, "self_attn.v_proj.bias", 0, kv_dim, &kvr, 0)))
            return -1;
    }
    if (config_layer_is_moe(c, i)) {
        if (model_moe_bind(m, i, e)) return -1;
    } else {
        nb_part gu[2] = {PART(0, "mlp.gate_proj.weight", F, fs), PART(1, "mlp.up_proj.weight", F, fs)};
        nb_weight *gu_out[2] = {&L->gate, &L->up};
        snprintf(fn, sizeof fn, "model.layers.%d.mlp.gate_up_proj", i);
        if (model_bind_linears(m, &L->gate_up, gu_out, gu, 2, H, d, fn, e) || LIN(down, "mlp.down_proj.weight", H, F, &fc))
            return -1;
        if (c->mlp_bias) {
            nb_part b[2] = {PART(0, "mlp.gate_proj.bias", F, fs), PART(1, "mlp.up_proj.bias", F, fs)};
            snprintf(fn, sizeof fn, "model.layers.%d.mlp.gate_up_proj.bias", i);
            if (L->gate_up.data ? model_bind_cat(m, &L->b_gate_up, b, 2, fn, e)
                                : (B(b_gate, "mlp.gate_proj.bias", 0, F, &fr, 0) || B(b_up, "mlp.up_proj.bias", 0, F, &fr, 0)))
                return -1;
            if (B(b_down, "mlp.down_proj.bias", 0, H, NULL, 0)) return -1;
        }
    }
#undef PART
    /* the biases of the split sums are added once, after the all-reduce */
    if (c->o_bias && B(bo, "self_attn.o_proj.bias", 0, H, NULL, 0)) return -1;
    if (c->qk_norm && (B(q_norm, "self_attn.q_norm.weight", 0, c->head_dim, NULL, 0) ||
                       B(k_norm, "self_attn.k_norm.weight", 0, c->head_dim, NULL, 0)))
        return -1;
#undef B
#undef LIN
    return 0;
}

/* Most KV blocks sized from device memory: more than this many tokens of
 * cache would only fill host-side tables. */
#define KV_MAX_AUTO_BLOCKS (1 << 18)

/* How many KV blocks this rank can hold. An explicit block count wins; on a
 * backend that budgets device memory, the cache gets what is free beyond
 * the (1 - gpu_memory_utilization) share of the device; elsewhere it holds
 * one full-context sequence (more only helps with many sequences). */
static int kv_budget(nb_model *m, const nb_model_opts *opts, int *blocks, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    nb_backend *be = m->be;
    size_t per_block = 2 * (size_t)c->n_layers * nb_kv_block_bytes(m->plan.kv, m->n_kv_heads, c->head_dim);
    int full_ctx = (c->max_position + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    size_t free_b = 0, total_b = 0;
    char who[32] = "";
    if (m->n_ranks > 1) snprintf(who, sizeof who, " (rank %d)", m->rank);
    if (opts && opts->num_kv_blocks > 0) {
        *blocks = opts->num_kv_blocks;
    } else if (be->ops->mem_info(be, &free_b, &total_b) == 0) {
        double util = opts && opts->gpu_mem_util > 0 ? opts->gpu_mem_util : 0.9;
        double keep = (1.0 - util) * (double)total_b;
        double avail = (double)free_b - keep;
        if (avail < (double)per_block)
            return nb_errf(e, "no device memory left for the KV cache%s: %.2f GiB free of %.2f GiB after weights "
                              "and activations, %.2f GiB kept back by --gpu-memory-utilization %.2f",
                           who, free_b / 1073741824.0, total_b / 1073741824.0, keep / 1073741824.0, util);
        double n = avail / (double)per_block;
        *blocks = n > KV_MAX_AUTO_BLOCKS ? KV_MAX_AUTO_BLOCKS : (int)n;
        log_info("KV cache%s: %.2f GiB free of %.2f GiB after weights and activations, utilization %.2f: %d blocks "
                 "(%lld tokens, %.1f full contexts)",
                 who, free_b / 1073741824.0, total_b / 1073741824.0, util, *blocks,
                 (long long)*blocks * NB_KV_BLOCK_SIZE, (double)*blocks / full_ctx);
    } else {
        *blocks = full_ctx;
    }
    return 0;
}

/* Allocates this rank's paged KV cache of num_blocks blocks. */
static int kv_alloc(nb_model *m, int num_blocks, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    nb_backend *be = m->be;
    m->num_blocks = num_blocks;
    /* one block more for the padding of recorded decode steps */
    int n_alloc = num_blocks + (be->ops->records_graphs ? 1 : 0);
    size_t kv_bytes = nb_kv_block_bytes(m->plan.kv, m->n_kv_heads, c->head_dim) * (size_t)n_alloc;
    m->kv_layer_bytes = kv_bytes;
    m->k_cache = xcalloc((size_t)c->n_layers, sizeof(void *));
    m->v_cache = xcalloc((size_t)c->n_layers, sizeof(void *));
    m->alloc_short = 0;
    for (int i = 0; i < c->n_layers; i++) {
        m->k_cache[i] = model_alloc(m, kv_bytes);
        m->v_cache[i] = model_alloc(m, kv_bytes);
    }
    if (!m->alloc_short) return 0;
    char what[64];
    snprintf(what, sizeof what, "the KV cache of %d blocks", num_blocks);
    return model_no_memory(m, what, 2 * (size_t)c->n_layers * kv_bytes, "fewer --num-kv-blocks", e);
}

void *model_alloc(nb_model *m, size_t bytes) {
    void *p = m->be->ops->alloc(m->be, bytes);
    if (!p) m->alloc_short += bytes;
    return p;
}

static void *act_alloc(nb_model *m, size_t floats) { return model_alloc(m, floats * sizeof(float)); }

/* This rank's share of the heads and of the MLP. KV heads are split like
 * the query heads, or, when there are fewer KV heads than ranks, each rank
 * keeps (a copy of) the one its query heads read, as vLLM does. */
static int set_share(nb_model *m, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    int n = m->n_ranks, r = m->rank;
    if (c->n_heads % n)
        return nb_errf(e, "tensor parallel size %d does not divide the model's %d attention heads", n, c->n_heads);
    if (c->n_kv_heads % n && n % c->n_kv_heads)
        return nb_errf(e, "tensor parallel size %d neither divides nor is a multiple of the model's %d KV heads", n,
                       c->n_kv_heads);
    if (c->intermediate_size % n)
        return nb_errf(e, "tensor parallel size %d does not divide the model's MLP width %d", n,
                       c->intermediate_size);
    m->n_heads = c->n_heads / n;
    m->q_head0 = r * m->n_heads;
    m->n_kv_heads = c->n_kv_heads >= n ? c->n_kv_heads / n : 1;
    m->kv_head0 = c->n_kv_heads >= n ? r * m->n_kv_heads : m->q_head0 / (c->n_heads / c->n_kv_heads);
    m->ffn = c->intermediate_size / n;
    m->ffn0 = (int64_t)r * m->ffn;
    const nb_moe_config *mc = &c->moe;
    if (mc->n_experts && (mc->ffn % n || mc->shared_ffn % n))
        return nb_errf(e, "tensor parallel size %d does not divide the model's expert width %d%s", n,
                       mc->ffn % n ? mc->ffn : mc->shared_ffn, mc->ffn % n ? "" : " (shared experts)");
    m->moe_ffn = mc->ffn / n;
    m->moe_ffn0 = (int64_t)r * m->moe_ffn;
    m->shared_ffn = mc->shared_ffn / n;
    m->shared_ffn0 = (int64_t)r * m->shared_ffn;
    return 0;
}

int model_load_rank(nb_model *m, const nb_model_opts *opts, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    nb_backend *be = m->be;
    if (set_share(m, e)) return -1;
    int64_t V = c->vocab_size, H = c->hidden_size;
    m->layers = xcalloc((size_t)c->n_layers, sizeof *m->layers);
    if (c->moe.n_experts) m->moe = xcalloc((size_t)c->n_layers, sizeof *m->moe);
    if (model_bind(m, &m->embed, "model.embed_tokens.weight", V, H, NULL, 0, e)) return -1;
    /* The LM head is split by vocabulary where the ranks divide it (each
     * rank computes its part of every logit row, rank 0 gathers them), else
     * rank 0 holds it whole and computes the logits alone. */
    m->vocab_split = m->n_ranks > 1 && V % m->n_ranks == 0;
    const char *head = c->tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    nb_slice vocab = {0, m->rank * (V / m->n_ranks), V / m->n_ranks};
    if (m->rank == 0 || m->vocab_split)
        if (model_bind(m, &m->final_norm, "model.norm.weight", 0, H, NULL, 0, e)) return -1;
    if (m->vocab_split) {
        if (model_bind(m, &m->lm_head, head, V, H, &vocab, 0, e)) return -1;
    } else if (m->rank == 0) {
        if (c->tie_embeddings) m->lm_head = m->embed;
        else if (model_bind(m, &m->lm_head, head, V, H, NULL, 0, e)) return -1;
    }
    for (int i = 0; i < c->n_layers; i++)
        if (bind_layer(m, i, e)) return -1;

    m->max_tokens = opts && opts->max_batch_tokens > 0 ? opts->max_batch_tokens : 256;
    m->max_rows = opts && opts->max_logit_rows > 0 && opts->max_logit_rows < m->max_tokens ? opts->max_logit_rows
                                                                                           : m->max_tokens;
    size_t T = (size_t)m->max_tokens, R = (size_t)m->max_rows, qd = (size_t)m->n_heads * c->head_dim,
           kvd = (size_t)m->n_kv_heads * c->head_dim;
    m->x = act_alloc(m, T * H);
    m->xn = act_alloc(m, T * H);
    m->qkv = act_alloc(m, T * (qd + 2 * kvd));
    if (m->qkv) m->q = m->qkv, m->k = m->q + T * qd, m->v = m->k + T * kvd;
    m->att = act_alloc(m, T * qd);
    /* gate/up serve the dense MLP, each expert and the shared experts */
    size_t mlp_width = (size_t)m->ffn;
    if (m->moe) {
        if ((size_t)m->moe_ffn > mlp_width) mlp_width = (size_t)m->moe_ffn;
        if ((size_t)m->shared_ffn > mlp_width) mlp_width = (size_t)m->shared_ffn;
        model_moe_alloc(m);
    }
    m->gu = act_alloc(m, 2 * T * mlp_width);
    if (m->gu) m->gate = m->gu, m->up = m->gu + T * mlp_width;
    int fused_mlp = 0;
    for (int i = 0; i < c->n_layers; i++) fused_mlp |= m->layers[i].gate_up.data != NULL;
    if (fused_mlp) m->act = act_alloc(m, T * (size_t)m->ffn);
    if (m->rank == 0 || m->vocab_split) m->last = act_alloc(m, R * H);
    if (m->rank == 0) m->logits = act_alloc(m, R * V);
    if (m->vocab_split) {
        m->head_part = act_alloc(m, R * (size_t)(V / m->n_ranks));
        m->head_all = act_alloc(m, R * V);
        if (m->rank == 0) m->head_perm = xmalloc(sizeof(int32_t) * R * (size_t)m->n_ranks);
    }
    m->inv_freq = act_alloc(m, (size_t)c->head_dim / 2);
    if (m->alloc_short) {
        char fix[64];
        snprintf(fix, sizeof fix, "a smaller --max-batch-tokens than %d", m->max_tokens);
        return model_no_memory(m, "activations", m->alloc_short, fix, e);
    }
    float *inv = xmalloc(sizeof(float) * (size_t)(c->head_dim / 2));
    config_rope_inv_freq(c, inv);
    be->ops->upload(be, m->inv_freq, inv, sizeof(float) * (size_t)(c->head_dim / 2));
    free(inv);
    return 0;
}

static void attach(nb_model *m) {
    if (m->be->ops->attach) m->be->ops->attach(m->be);
}

nb_model *model_load(const char *dir, nb_backend *be, const nb_model_opts *opts, nb_err *e) {
    double t0 = util_now();
    nb_model *m = xcalloc(1, sizeof *m);
    m->be = be;
    m->n_ranks = be->n_ranks > 1 ? be->n_ranks : 1;
    if (config_load(dir, &m->cfg, e)) goto fail;
    nb_quant_plan none;
    if (!opts || !opts->quant) quant_plan_parse(NULL, NULL, &none, e);
    if (quant_plan_resolve(dir, opts && opts->quant ? opts->quant : &none, &m->plan, e)) goto fail;
    if (!m->plan.kv_set) m->plan.kv = be->ops->kv_default;
    if (!be->ops->supports(be, m->plan.dense)) {
        nb_errf(e, "%s weights are not supported by the %s backend yet; use --device cpu",
                nb_dtype_name(m->plan.dense), be->ops->name);
        goto fail;
    }
    m->report = opts ? opts->quant_report : NULL;
    const nb_model_config *c = &m->cfg;
    m->st = st_open(dir, e);
    if (!m->st) goto fail;
    if (model_load_rank(m, opts, e)) goto fail;
    if (m->n_ranks > 1 && model_tp_start(m, opts, e)) goto fail;
    /* The KV cache comes last so that a device backend can give it what the
     * weights and activations left; every rank holds the same blocks. */
    int blocks = 0;
    for (int r = 0; r < m->n_ranks; r++) {
        nb_model *mr = model_tp_rank(m, r);
        int b = 0;
        attach(mr);
        if (kv_budget(mr, opts, &b, e)) goto fail;
        if (r == 0 || b < blocks) blocks = b;
    }
    for (int r = 0; r < m->n_ranks; r++) {
        attach(model_tp_rank(m, r));
        if (kv_alloc(model_tp_rank(m, r), blocks, e)) goto fail;
    }
    attach(m);
    char qname[32], wbytes[256] = "", ranks[48] = "";
    for (int t = 0, len = 0; t < NB_DTYPE_COUNT; t++)
        if (model_weight_bytes(m, (nb_dtype)t))
            len += snprintf(wbytes + len, sizeof wbytes - (size_t)len, "%s%s %.1f MiB", len ? ", " : "",
                            nb_dtype_name((nb_dtype)t), model_weight_bytes(m, (nb_dtype)t) / 1048576.0);
    if (m->n_ranks > 1) snprintf(ranks, sizeof ranks, " on each of %d ranks", m->n_ranks);
    int f_qkv = 0, f_gu = 0;
    for (int i = 0; i < c->n_layers; i++) f_qkv += m->layers[i].wqkv.data != NULL, f_gu += m->layers[i].gate_up.data != NULL;
    log_info("loaded %s (%s, %d layers, hidden %d) in %.2f s; %s (%s); weights %s, q|k|v fused in %d layers, "
             "gate|up in %d; KV cache %d blocks of %d tokens, %s (%.1f MiB%s)",
             dir, c->arch_name, c->n_layers, c->hidden_size, util_now() - t0, quant_plan_name(&m->plan, qname, sizeof qname),
             m->plan.method, wbytes, f_qkv, f_gu, m->num_blocks, NB_KV_BLOCK_SIZE, nb_kv_dtype_name(m->plan.kv),
             2.0 * c->n_layers * m->kv_layer_bytes / (1 << 20), ranks);
    return m;
fail:
    nb_err_wrap(e, "%s", dir);
    attach(m);
    model_free(m);
    return NULL;
}

void model_weight_free(nb_backend *be, const nb_weight *w) {
    if (w->data) be->ops->weight_free(be, w->data);
    if (w->scale) be->ops->weight_free(be, w->scale);
    if (w->scale2) be->ops->weight_free(be, w->scale2);
}

void model_free(nb_model *m) {
    if (!m) return;
    if (m->tp) model_tp_stop(m);
    nb_backend *be = m->be;
    float *bufs[] = {m->inv_freq, m->x,      m->xn,        m->qkv,      m->att, m->gu,
                     m->act,      m->last,   m->logits,    m->head_part, m->head_all};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->ops->free(be, bufs[i]);
    for (int i = 0; m->k_cache && i < m->cfg.n_layers; i++) {
        if (m->k_cache[i]) be->ops->free(be, m->k_cache[i]);
        if (m->v_cache[i]) be->ops->free(be, m->v_cache[i]);
    }
    free(m->k_cache);
    free(m->v_cache);
    free(m->pad_tok), free(m->pad_pos), free(m->pad_seq), free(m->pad_slot), free(m->pad_tables);
    free(m->head_perm);
    if (m->layers) {
        /* weight_free releases backend copies; every nb_weight is a plain struct */
        nb_weight *w = (nb_weight *)m->layers;
        size_t n = (size_t)m->cfg.n_layers * (sizeof(nb_layer) / sizeof(nb_weight));
        for (size_t i = 0; i < n; i++) model_weight_free(be, &w[i]);
    }
    model_moe_free(m);
    if (m->embed.data) be->ops->weight_free(be, m->embed.data);
    if (m->final_norm.data) be->ops->weight_free(be, m->final_norm.data);
    if (m->lm_head.data && m->lm_head.data != m->embed.data) be->ops->weight_free(be, m->lm_head.data);
    free(m->layers);
    model_free_owned(m);
    if (m->rank == 0) st_close(m->st);
    free(m);
}

const nb_model_config *model_config(const nb_model *m) { return &m->cfg; }
const nb_quant_plan *model_quant_plan(const nb_model *m) { return &m->plan; }
size_t model_weight_bytes(const nb_model *m, nb_dtype t) {
    size_t sum = 0;
    for (int r = 0; t < NB_DTYPE_COUNT && r < m->n_ranks; r++) sum += model_tp_rank((nb_model *)m, r)->bytes_by[t];
    return sum;
}

void model_set_capture(nb_model *m, model_capture_fn fn, void *ctx) {
    m->capture = fn;
    m->capture_ctx = ctx;
}
int model_num_kv_blocks(const nb_model *m) { return m->num_blocks; }
int model_max_batch_tokens(const nb_model *m) { return m->max_tokens; }
int model_max_logit_rows(const nb_model *m) { return m->max_rows; }

static void linear(nb_model *m, float *out, const float *x, const nb_weight *w, const nb_weight *bias, int n) {
    m->be->ops->matmul(m->be, out, x, w, n);
    if (bias->data) m->be->ops->add_bias(m->be, out, bias, n);
}

/* The rest of a row-parallel linear layer once out holds this rank's
 * partial product over its input columns: summed over the ranks, then the
 * bias once. */
static void linear_sum_tail(nb_model *m, float *out, const nb_weight *w, const nb_weight *bias, int n) {
    if (m->n_ranks > 1) m->be->ops->all_reduce(m->be, out, (size_t)n * (size_t)w->rows);
    if (bias->data) m->be->ops->add_bias(m->be, out, bias, n);
}

static void linear_sum(nb_model *m, float *out, const float *x, const nb_weight *w, const nb_weight *bias, int n) {
    m->be->ops->matmul(m->be, out, x, w, n);
    linear_sum_tail(m, out, w, bias, n);
}

static void layer_forward(nb_model *m, int li, int n) {
    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    const nb_model_config *c = &m->cfg;
    const nb_layer *L = &m->layers[li];
    size_t H = (size_t)c->hidden_size;
    nb_attn_shape s = {.n_heads = m->n_heads, .n_kv_heads = m->n_kv_heads, .head_dim = c->head_dim,
                       .scale = 1.0f / sqrtf((float)c->head_dim), .kv_dtype = m->plan.kv};
    size_t qd = (size_t)m->n_heads * c->head_dim;
#define CAPTURE(which, x, cols) \
    if (m->capture) m->capture(m->capture_ctx, li, which, x, n, (int64_t)(cols))

    /* the previous layer's MLP output still waits in xn to be added */
    if (li == 0) op->rmsnorm(be, m->xn, m->x, &L->attn_norm, n, c->rms_eps);
    else op->add_rmsnorm(be, m->xn, m->x, m->xn, &L->attn_norm, n, c->rms_eps);
    CAPTURE(0, m->xn, H);
    if (L->wqkv.data) {
        /* one product, rows [q | k | v]; one op turns the q and k heads
         * (after Qwen3's per-head norm) and writes K and V to the cache;
         * attention reads q with the stride */
        s.q_stride = s.kv_stride = (int)(qd + 2 * (size_t)m->n_kv_heads * c->head_dim);
        linear(m, m->qkv, m->xn, &L->wqkv, &L->bqkv, n);
        op->rope_kv_write(be, m->qkv, m->k_cache[li], m->v_cache[li], &s, c->qk_norm ? &L->q_norm : NULL,
                          c->qk_norm ? &L->k_norm : NULL, c->rms_eps, m->inv_freq, c->rope_interleaved);
        op->attention(be, m->att, m->qkv, m->k_cache[li], m->v_cache[li], &s);
    } else {
        linear(m, m->q, m->xn, &L->wq, &L->bq, n);
        linear(m, m->k, m->xn, &L->wk, &L->bk, n);
        linear(m, m->v, m->xn, &L->wv, &L->bv, n);
        if (c->qk_norm) {
            op->rmsnorm(be, m->q, m->q, &L->q_norm, n * m->n_heads, c->rms_eps);
            op->rmsnorm(be, m->k, m->k, &L->k_norm, n * m->n_kv_heads, c->rms_eps);
        }
        op->rope(be, m->q, m->n_heads, c->head_dim, (int)qd, m->inv_freq, c->rope_interleaved);
        op->rope(be, m->k, m->n_kv_heads, c->head_dim, m->n_kv_heads * c->head_dim, m->inv_freq,
                 c->rope_interleaved);
        op->kv_write(be, m->k_cache[li], m->v_cache[li], m->k, m->v, &s);
        op->attention(be, m->att, m->q, m->k_cache[li], m->v_cache[li], &s);
    }
    CAPTURE(1, m->att, qd);
    linear_sum(m, m->xn, m->att, &L->wo, &L->bo, n);
    op->add_rmsnorm(be, m->xn, m->x, m->xn, &L->ffn_norm, n, c->rms_eps);
    CAPTURE(2, m->xn, H);
    if (m->moe && config_layer_is_moe(c, li)) {
        model_moe_forward(m, li, n); /* its output in xn too */
        return;
    }
    int F = (int)m->ffn, ld = F;
    float *act = m->gate, *g = m->gate, *u = m->up;
    if (L->gate_up.data) {
        linear(m, m->gu, m->xn, &L->gate_up, &L->b_gate_up, n); /* rows [gate | up] */
        act = m->act, g = m->gu, u = m->gu + F, ld = 2 * F;
    } else {
        linear(m, m->gate, m->xn, &L->gate, &L->b_gate, n);
        linear(m, m->up, m->xn, &L->up, &L->b_up, n);
    }
    /* the down product's output is added by the next layer's norm */
    if (!m->capture && op->matmul_silu && op->matmul_silu(be, m->xn, g, u, ld, &L->down, n) == 0) {
        linear_sum_tail(m, m->xn, &L->down, &L->b_down, n);
        return;
    }
    op->silu_mul(be, act, g, u, n, F, ld);
    CAPTURE(3, act, F);
    linear_sum(m, m->xn, act, &L->down, &L->b_down, n);
#undef CAPTURE
}

/* The batch size a decode step of n sequences is padded to: few sizes, so
 * few recordings serve every batch (as vLLM's capture sizes), at a cost of
 * at most 1/8 more tokens up to 256 and 1/16 up to 512. */
static int decode_pad_size(int n) {
    if (n <= 8) {
        int p = 1;
        while (p < n) p *= 2;
        return p;
    }
    if (n <= 256) return (n + 7) / 8 * 8;
    if (n <= 512) return (n + 31) / 32 * 32;
    return n;
}

/* Rebuilds a decode step padded with tokens of their own one-token
 * sequences at position 0 of the spare block (they all write the same
 * K/V there, and their rows are never read). Returns 0 when no padding is
 * needed or it would not fit the activations. */
static int decode_pad(nb_model *m, const int32_t *tokens, const nb_batch *b, nb_batch *out) {
    int n = b->n_tokens, np = decode_pad_size(n), mb = b->max_blocks;
    if (np == n || np > m->max_tokens) return 0;
    if (!m->pad_tok) {
        size_t T = (size_t)m->max_tokens;
        m->pad_tok = xmalloc(sizeof(int32_t) * T), m->pad_pos = xmalloc(sizeof(int32_t) * T);
        m->pad_seq = xmalloc(sizeof(int32_t) * T), m->pad_slot = xmalloc(sizeof(int32_t) * T);
    }
    size_t tables = (size_t)np * (size_t)mb;
    if (tables > m->pad_tables_cap) {
        free(m->pad_tables);
        m->pad_tables = xmalloc(sizeof(int32_t) * tables);
        m->pad_tables_cap = tables;
    }
    memcpy(m->pad_tok, tokens, sizeof(int32_t) * (size_t)n);
    memcpy(m->pad_pos, b->pos, sizeof(int32_t) * (size_t)n);
    memcpy(m->pad_seq, b->seq_of, sizeof(int32_t) * (size_t)n);
    memcpy(m->pad_slot, b->slot, sizeof(int32_t) * (size_t)n);
    memcpy(m->pad_tables, b->block_tables, sizeof(int32_t) * (size_t)n * (size_t)mb);
    for (int t = n; t < np; t++) {
        m->pad_tok[t] = 0;
        m->pad_pos[t] = 0;
        m->pad_seq[t] = t;
        m->pad_slot[t] = m->num_blocks * NB_KV_BLOCK_SIZE;
        int32_t *row = m->pad_tables + (size_t)t * mb;
        for (int j = 0; j < mb; j++) row[j] = m->num_blocks;
    }
    *out = (nb_batch){np, m->pad_pos, m->pad_seq, m->pad_slot, np, mb, m->pad_tables};
    return 1;
}

/* What every rank runs of a step: the embedding and the layers, leaving
 * the final hidden states in x, then, with the LM head split, its part of
 * the logits of out_rows, gathered on every rank into head_all. */
typedef struct rank_step {
    const int32_t *tokens;
    const nb_batch *batch;
    int decode;
    const int32_t *out_rows;
    int n_out;
} rank_step;

/* The final norm and this rank's LM head (whole, or its part) on the
 * out_rows of x. */
static void rank_head(nb_model *m, const int32_t *out_rows, int n_out) {
    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    const nb_model_config *c = &m->cfg;
    op->gather_rows(be, m->last, m->x, out_rows, n_out, c->hidden_size);
    op->rmsnorm(be, m->last, m->last, &m->final_norm, n_out, c->rms_eps);
    if (!m->vocab_split) {
        op->matmul(be, m->logits, m->last, &m->lm_head, n_out);
        return;
    }
    op->matmul(be, m->head_part, m->last, &m->lm_head, n_out);
    op->all_gather(be, m->head_all, m->head_part, (size_t)n_out * (size_t)m->lm_head.rows);
}

static void rank_layers(nb_model *m, void *arg) {
    const rank_step *st = arg;
    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    int n = st->batch->n_tokens;
    op->set_batch(be, st->batch);
    op->embedding(be, m->x, &m->embed, st->tokens, n);
    if (!op->graph_begin(be, st->decode ? (uint64_t)n : 0)) {
        for (int li = 0; li < m->cfg.n_layers; li++) layer_forward(m, li, n);
        op->add(be, m->x, m->x, m->xn, (size_t)n * m->cfg.hidden_size);
        op->graph_end(be);
    }
    if (st->n_out > 0 && m->vocab_split) rank_head(m, st->out_rows, st->n_out);
}

/* The step up to the logits of out_rows, left in m->logits on the backend. */
static int forward_logits(nb_model *m, const int32_t *tokens, const nb_batch *batch, const int32_t *out_rows,
                          int n_out, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    int n = batch->n_tokens;
    if (n <= 0 || n > m->max_tokens)
        return nb_errf(e, "forward step of %d tokens (limit %d)", n, m->max_tokens);
    if (n_out < 0 || n_out > n) return nb_errf(e, "forward step asks for %d logit rows of %d", n_out, n);
    if (n_out > m->max_rows) return nb_errf(e, "forward step asks for %d logit rows (limit %d)", n_out, m->max_rows);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
            return nb_errf(e, "token id %d out of range [0, %d)", tokens[t], c->vocab_size);
        int32_t slot = batch->slot[t], seq = batch->seq_of[t];
        if (seq < 0 || seq >= batch->n_seqs || slot < 0 || slot >= m->num_blocks * NB_KV_BLOCK_SIZE ||
            batch->pos[t] < 0 || batch->pos[t] >= c->max_position)
            return nb_errf(e, "token %d of the step has an invalid position, slot or sequence", t);
    }
    for (int r = 0; r < n_out; r++)
        if (out_rows[r] < 0 || out_rows[r] >= n) return nb_errf(e, "logit row %d out of the step", out_rows[r]);

    if (m->capture && m->n_ranks > 1) return nb_errf(e, "calibration runs on a single rank");
    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    /* A decode-only step (one token per sequence) issues the same ops for
     * the same token count, whatever the positions: the backend may record
     * them once and replay them. Prefill steps and calibration runs (host
     * callbacks) issue theirs every time. */
    /* (A mixture of experts records where its expert matmuls can.) */
    int decode = batch->n_seqs == n && !m->capture &&
                 (!m->moe || !op->records_graphs || model_moe_recordable(m, decode_pad_size(n)));
    nb_batch padded;
    if (decode && op->records_graphs && decode_pad(m, tokens, batch, &padded)) {
        tokens = m->pad_tok;
        batch = &padded;
        n = padded.n_tokens;
    }
    rank_step st = {tokens, batch, decode, out_rows, n_out};
    if (m->n_ranks > 1) model_tp_run(m, rank_layers, &st);
    else rank_layers(m, &st);
    if (n_out == 0) return 0;
    if (!m->vocab_split) {
        rank_head(m, out_rows, n_out);
        return 0;
    }
    /* head_all is [rank][row][V/n]: row r of the logits is the r-th row of
     * every rank's part, in rank order */
    int ranks = m->n_ranks;
    for (int r = 0; r < n_out; r++)
        for (int k = 0; k < ranks; k++) m->head_perm[r * ranks + k] = k * n_out + r;
    op->gather_rows(be, m->logits, m->head_all, m->head_perm, n_out * ranks, (int)m->lm_head.rows);
    return 0;
}

int model_forward(nb_model *m, const int32_t *tokens, const nb_batch *batch, const int32_t *out_rows,
                  int n_out, float *logits, nb_err *e) {
    if (forward_logits(m, tokens, batch, out_rows, n_out, e)) return -1;
    if (n_out > 0)
        m->be->ops->download(m->be, logits, m->logits, sizeof(float) * (size_t)n_out * m->cfg.vocab_size);
    return 0;
}

int model_forward_sample(nb_model *m, const int32_t *tokens, const nb_batch *batch, const int32_t *out_rows,
                         int n_out, const nb_sample_row *rows, int32_t *ids, nb_err *e) {
    if (forward_logits(m, tokens, batch, out_rows, n_out, e)) return -1;
    if (n_out > 0) m->be->ops->sample(m->be, ids, m->logits, n_out, m->cfg.vocab_size, rows);
    return 0;
}

int model_inspect(const char *dir, FILE *out, nb_err *e) {
    nb_model_config c;
    if (config_load(dir, &c, e)) return -1;
    st_model *st = st_open(dir, e);
    if (!st) return -1;
    int64_t params = 0;
    size_t bytes_by[ST_F8_E5M2 + 1] = {0};
    int64_t count_by[ST_F8_E5M2 + 1] = {0};
    for (int i = 0; i < st_count(st); i++) {
        const st_tensor *t = st_get(st, i);
        int64_t n = 1;
        for (int d = 0; d < t->ndim; d++) n *= t->shape[d];
        params += n;
        bytes_by[t->dtype] += t->nbytes;
        count_by[t->dtype]++;
    }
    fprintf(out, "model:          %s\n", dir);
    fprintf(out, "architecture:   %s\n", c.arch_name);
    fprintf(out, "parameters:     %lld (%.2f M)\n", (long long)params, params / 1e6);
    fprintf(out, "layers:         %d, hidden %d, intermediate %d, vocab %d\n", c.n_layers, c.hidden_size,
            c.intermediate_size, c.vocab_size);
    fprintf(out, "attention:      %d heads, %d kv heads, head_dim %d%s%s\n", c.n_heads, c.n_kv_heads,
            c.head_dim, c.qkv_bias ? ", qkv bias" : "", c.qk_norm ? ", q/k norm" : "");
    if (c.moe.n_experts) {
        int n_moe = 0;
        for (int i = 0; i < c.n_layers; i++) n_moe += config_layer_is_moe(&c, i);
        fprintf(out, "experts:        %d, %d per token, width %d%s; %d of %d layers%s\n", c.moe.n_experts, c.moe.n_used,
                c.moe.ffn, c.moe.shared_ffn ? ", shared experts" : "", n_moe, c.n_layers,
                c.moe.norm ? ", weights renormalized" : "");
    }
    static const char *rope_names[] = {"default", "linear", "llama3"};
    fprintf(out, "rope:           theta %g, %s%s\n", c.rope_theta, rope_names[c.rope_type],
            c.rope_interleaved ? ", interleaved" : "");
    fprintf(out, "context:        %d tokens\n", c.max_position);
    fprintf(out, "tied embedding: %s\n", c.tie_embeddings ? "yes" : "no");
    fprintf(out, "declared dtype: %s\n", c.dtype);
    for (int d = 0; d <= ST_F8_E5M2; d++)
        if (count_by[d])
            fprintf(out, "tensors %-6s  %lld tensors, %.2f MiB\n", st_dtype_name((st_dtype)d),
                    (long long)count_by[d], bytes_by[d] / 1048576.0);
    size_t kv_tok = 2 * (size_t)c.n_layers * c.n_kv_heads * c.head_dim * sizeof(float);
    fprintf(out, "memory:         weights %.2f MiB (mmapped); KV cache %zu bytes/token FP32, %.2f MiB "
                 "for one full %d-token context\n",
            st_total_bytes(st) / 1048576.0, kv_tok, (double)kv_tok * c.max_position / 1048576.0,
            c.max_position);
    st_close(st);
    return 0;
}
