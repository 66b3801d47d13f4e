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
    int64_t H = c->hidden_size, q_dim = (int64_t)c->n_heads * c->head_dim,
            kv_dim = (int64_t)c->n_kv_heads * c->head_dim, F = c->intermediate_size;
    char n[160];
    nb_dtype d = m->plan.dense;
#define B(field, suffix, rows, cols, opt)                                  \
    (snprintf(n, sizeof n, "model.layers.%d.%s", i, suffix),               \
     model_bind(m, &L->field, n, rows, cols, opt, e))
#define LIN(field, suffix, rows, cols)                                     \
    (snprintf(n, sizeof n, "model.layers.%d.%s", i, suffix),               \
     model_bind_linear(m, &L->field, n, rows, cols, d, e))
    if (B(attn_norm, "input_layernorm.weight", 0, H, 0) ||
        B(ffn_norm, "post_attention_layernorm.weight", 0, H, 0) ||
        LIN(wq, "self_attn.q_proj.weight", q_dim, H) || LIN(wk, "self_attn.k_proj.weight", kv_dim, H) ||
        LIN(wv, "self_attn.v_proj.weight", kv_dim, H) || LIN(wo, "self_attn.o_proj.weight", H, q_dim) ||
        LIN(gate, "mlp.gate_proj.weight", F, H) || LIN(up, "mlp.up_proj.weight", F, H) ||
        LIN(down, "mlp.down_proj.weight", H, F))
        return -1;
    if (c->qkv_bias && (B(bq, "self_attn.q_proj.bias", 0, q_dim, 0) || B(bk, "self_attn.k_proj.bias", 0, kv_dim, 0) ||
                        B(bv, "self_attn.v_proj.bias", 0, kv_dim, 0)))
        return -1;
    if (c->o_bias && B(bo, "self_attn.o_proj.bias", 0, H, 0)) return -1;
    if (c->mlp_bias && (B(b_gate, "mlp.gate_proj.bias", 0, F, 0) || B(b_up, "mlp.up_proj.bias", 0, F, 0) ||
                        B(b_down, "mlp.down_proj.bias", 0, H, 0)))
        return -1;
    if (c->qk_norm && (B(q_norm, "self_attn.q_norm.weight", 0, c->head_dim, 0) ||
                       B(k_norm, "self_attn.k_norm.weight", 0, c->head_dim, 0)))
        return -1;
#undef B
#undef LIN
    return 0;
}

/* Most KV blocks sized from device memory: more than this many tokens of
 * cache would only fill host-side tables. */
#define KV_MAX_AUTO_BLOCKS (1 << 18)

/* Sizes and allocates the paged KV cache. An explicit block count wins; on a
 * backend that budgets device memory, the cache gets what is free beyond the
 * (1 - gpu_memory_utilization) share of the device; elsewhere it holds one
 * full-context sequence (more only helps with many sequences). */
static int alloc_kv_cache(nb_model *m, const nb_model_opts *opts, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    nb_backend *be = m->be;
    size_t per_block = 2 * (size_t)c->n_layers * nb_kv_block_bytes(m->plan.kv, c->n_kv_heads, c->head_dim);
    int full_ctx = (c->max_position + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    size_t free_b = 0, total_b = 0;
    if (opts && opts->num_kv_blocks > 0) {
        m->num_blocks = opts->num_kv_blocks;
    } else if (be->ops->mem_info(be, &free_b, &total_b) == 0) {
        double util = opts && opts->gpu_mem_util > 0 ? opts->gpu_mem_util : 0.9;
        double keep = (1.0 - util) * (double)total_b;
        double avail = (double)free_b - keep;
        if (avail < (double)per_block)
            return nb_errf(e, "no device memory left for the KV cache: %.2f GiB free of %.2f GiB after weights "
                              "and activations, %.2f GiB kept back by --gpu-memory-utilization %.2f",
                           free_b / 1073741824.0, total_b / 1073741824.0, keep / 1073741824.0, util);
        double n = avail / (double)per_block;
        m->num_blocks = n > KV_MAX_AUTO_BLOCKS ? KV_MAX_AUTO_BLOCKS : (int)n;
        log_info("KV cache: %.2f GiB free of %.2f GiB after weights and activations, utilization %.2f: %d blocks "
                 "(%lld tokens, %.1f full contexts)",
                 free_b / 1073741824.0, total_b / 1073741824.0, util, m->num_blocks,
                 (long long)m->num_blocks * NB_KV_BLOCK_SIZE, (double)m->num_blocks / full_ctx);
    } else {
        m->num_blocks = full_ctx;
    }
    /* one block more for the padding of recorded decode steps */
    int n_alloc = m->num_blocks + (be->ops->records_graphs ? 1 : 0);
    size_t kv_bytes = per_block / 2 / (size_t)c->n_layers * (size_t)n_alloc;
    m->kv_layer_bytes = kv_bytes;
    m->k_cache = xcalloc((size_t)c->n_layers, sizeof(void *));
    m->v_cache = xcalloc((size_t)c->n_layers, sizeof(void *));
    for (int i = 0; i < c->n_layers; i++) {
        m->k_cache[i] = be->ops->alloc(be, kv_bytes);
        m->v_cache[i] = be->ops->alloc(be, kv_bytes);
    }
    return 0;
}

static void *act_alloc(nb_model *m, size_t floats) {
    return m->be->ops->alloc(m->be, floats * sizeof(float));
}

nb_model *model_load(const char *dir, nb_backend *be, const nb_model_opts *opts, nb_err *e) {
    double t0 = util_now();
    nb_model *m = xcalloc(1, sizeof *m);
    m->be = be;
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

    int64_t V = c->vocab_size, H = c->hidden_size;
    m->layers = xcalloc((size_t)c->n_layers, sizeof *m->layers);
    if (model_bind(m, &m->embed, "model.embed_tokens.weight", V, H, 0, e) ||
        model_bind(m, &m->final_norm, "model.norm.weight", 0, H, 0, e))
        goto fail;
    if (c->tie_embeddings) {
        m->lm_head = m->embed;
    } else if (model_bind(m, &m->lm_head, "lm_head.weight", V, H, 0, e)) {
        goto fail;
    }
    for (int i = 0; i < c->n_layers; i++)
        if (bind_layer(m, i, e)) goto fail;

    float *inv = xmalloc(sizeof(float) * (size_t)(c->head_dim / 2));
    config_rope_inv_freq(c, inv);
    m->inv_freq = act_alloc(m, (size_t)c->head_dim / 2);
    be->ops->upload(be, m->inv_freq, inv, sizeof(float) * (size_t)(c->head_dim / 2));
    free(inv);

    m->max_tokens = opts && opts->max_batch_tokens > 0 ? opts->max_batch_tokens : 256;
    m->max_rows = opts && opts->max_logit_rows > 0 && opts->max_logit_rows < m->max_tokens ? opts->max_logit_rows
                                                                                           : m->max_tokens;
    size_t T = (size_t)m->max_tokens, R = (size_t)m->max_rows, qd = (size_t)c->n_heads * c->head_dim,
           kvd = (size_t)c->n_kv_heads * c->head_dim;
    m->x = act_alloc(m, T * H);
    m->xn = act_alloc(m, T * H);
    m->q = act_alloc(m, T * qd);
    m->k = act_alloc(m, T * kvd);
    m->v = act_alloc(m, T * kvd);
    m->att = act_alloc(m, T * qd);
    m->gate = act_alloc(m, T * c->intermediate_size);
    m->up = act_alloc(m, T * c->intermediate_size);
    m->last = act_alloc(m, R * H);
    m->logits = act_alloc(m, R * V);
    /* The KV cache comes last so that a device backend can give it what the
     * weights and activations left. */
    if (alloc_kv_cache(m, opts, e)) goto fail;
    char qname[32], wbytes[256] = "";
    for (int t = 0, len = 0; t < NB_DTYPE_COUNT; t++)
        if (m->bytes_by[t])
            len += snprintf(wbytes + len, sizeof wbytes - (size_t)len, "%s%s %.1f MiB", len ? ", " : "",
                            nb_dtype_name((nb_dtype)t), m->bytes_by[t] / 1048576.0);
    log_info("loaded %s (%s, %d layers, hidden %d) in %.2f s; %s (%s); weights %s; KV cache %d blocks of %d "
             "tokens, %s (%.1f MiB)",
             dir, c->arch_name, c->n_layers, c->hidden_size, util_now() - t0, quant_plan_name(&m->plan, qname, sizeof qname),
             m->plan.method, wbytes, m->num_blocks, NB_KV_BLOCK_SIZE, nb_kv_dtype_name(m->plan.kv),
             2.0 * c->n_layers * m->kv_layer_bytes / (1 << 20));
    return m;
fail:
    nb_err_wrap(e, "%s", dir);
    model_free(m);
    return NULL;
}

void model_free(nb_model *m) {
    if (!m) return;
    nb_backend *be = m->be;
    float *bufs[] = {m->inv_freq, m->x, m->xn, m->q, m->k, m->v, m->att, m->gate, m->up, m->last, m->logits};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->ops->free(be, bufs[i]);
    for (int i = 0; m->k_cache && i < m->cfg.n_layers; i++) {
        if (m->k_cache[i]) be->ops->free(be, m->k_cache[i]);
        if (m->v_cache[i]) be->ops->free(be, m->v_cache[i]);
    }
    free(m->k_cache);
    free(m->v_cache);
    free(m->pad_tok), free(m->pad_pos), free(m->pad_seq), free(m->pad_slot), free(m->pad_tables);
    if (m->layers) {
        /* weight_free releases backend copies; every nb_weight is a plain struct */
        nb_weight *w = (nb_weight *)m->layers;
        size_t n = (size_t)m->cfg.n_layers * (sizeof(nb_layer) / sizeof(nb_weight));
        for (size_t i = 0; i < n; i++) {
            if (w[i].data) be->ops->weight_free(be, w[i].data);
            if (w[i].scale) be->ops->weight_free(be, w[i].scale);
            if (w[i].scale2) be->ops->weight_free(be, w[i].scale2);
        }
    }
    if (m->embed.data) be->ops->weight_free(be, m->embed.data);
    if (m->final_norm.data) be->ops->weight_free(be, m->final_norm.data);
    if (m->lm_head.data && m->lm_head.data != m->embed.data) be->ops->weight_free(be, m->lm_head.data);
    free(m->layers);
    model_free_owned(m);
    st_close(m->st);
    free(m);
}

const nb_model_config *model_config(const nb_model *m) { return &m->cfg; }
const nb_quant_plan *model_quant_plan(const nb_model *m) { return &m->plan; }
size_t model_weight_bytes(const nb_model *m, nb_dtype t) { return t < NB_DTYPE_COUNT ? m->bytes_by[t] : 0; }

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

static void layer_forward(nb_model *m, int li, int n) {
    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    const nb_model_config *c = &m->cfg;
    const nb_layer *L = &m->layers[li];
    size_t H = (size_t)c->hidden_size;
    nb_attn_shape s = {c->n_heads, c->n_kv_heads, c->head_dim, 1.0f / sqrtf((float)c->head_dim), m->plan.kv};
    size_t qd = (size_t)c->n_heads * c->head_dim;
#define CAPTURE(which, x, cols) \
    if (m->capture) m->capture(m->capture_ctx, li, which, x, n, (int64_t)(cols))

    /* the previous layer's MLP output still waits in xn to be added */
    if (li == 0) op->rmsnorm(be, m->xn, m->x, &L->attn_norm, n, c->rms_eps);
    else op->add_rmsnorm(be, m->xn, m->x, m->xn, &L->attn_norm, n, c->rms_eps);
    CAPTURE(0, m->xn, H);
    linear(m, m->q, m->xn, &L->wq, &L->bq, n);
    linear(m, m->k, m->xn, &L->wk, &L->bk, n);
    linear(m, m->v, m->xn, &L->wv, &L->bv, n);
    if (c->qk_norm) {
        op->rmsnorm(be, m->q, m->q, &L->q_norm, n * c->n_heads, c->rms_eps);
        op->rmsnorm(be, m->k, m->k, &L->k_norm, n * c->n_kv_heads, c->rms_eps);
    }
    op->rope(be, m->q, c->n_heads, c->head_dim, m->inv_freq, c->rope_interleaved);
    op->rope(be, m->k, c->n_kv_heads, c->head_dim, m->inv_freq, c->rope_interleaved);
    op->kv_write(be, m->k_cache[li], m->v_cache[li], m->k, m->v, &s);
    op->attention(be, m->att, m->q, m->k_cache[li], m->v_cache[li], &s);
    CAPTURE(1, m->att, qd);
    linear(m, m->xn, m->att, &L->wo, &L->bo, n);
    op->add_rmsnorm(be, m->xn, m->x, m->xn, &L->ffn_norm, n, c->rms_eps);
    CAPTURE(2, m->xn, H);
    linear(m, m->gate, m->xn, &L->gate, &L->b_gate, n);
    linear(m, m->up, m->xn, &L->up, &L->b_up, n);
    op->silu_mul(be, m->gate, m->gate, m->up, (size_t)n * c->intermediate_size);
    CAPTURE(3, m->gate, c->intermediate_size);
    linear(m, m->xn, m->gate, &L->down, &L->b_down, n); /* added by the next layer's norm */
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

    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    /* A decode-only step (one token per sequence) issues the same ops for
     * the same token count, whatever the positions: the backend may record
     * them once and replay them. Prefill steps and calibration runs (host
     * callbacks) issue theirs every time. */
    int decode = batch->n_seqs == n && !m->capture;
    nb_batch padded;
    if (decode && op->records_graphs && decode_pad(m, tokens, batch, &padded)) {
        tokens = m->pad_tok;
        batch = &padded;
        n = padded.n_tokens;
    }
    op->set_batch(be, batch);
    op->embedding(be, m->x, &m->embed, tokens, n);
    if (!op->graph_begin(be, decode ? (uint64_t)n : 0)) {
        for (int li = 0; li < c->n_layers; li++) layer_forward(m, li, n);
        op->add(be, m->x, m->x, m->xn, (size_t)n * c->hidden_size);
        op->graph_end(be);
    }
    if (n_out == 0) return 0;
    op->gather_rows(be, m->last, m->x, out_rows, n_out, c->hidden_size);
    op->rmsnorm(be, m->last, m->last, &m->final_norm, n_out, c->rms_eps);
    op->matmul(be, m->logits, m->last, &m->lm_head, n_out);
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
