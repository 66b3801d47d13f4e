/* Mixture-of-experts MLP blocks (Qwen3-MoE, Mixtral, ERNIE 4.5 MoE): the
 * weights of a layer's router and experts, and the block's forward.
 *
 * The router runs on the backend; its logits come back to the host, which
 * picks each token's experts (engine/model/config.h says how, as Hugging
 * Face computes it) and groups the tokens by expert. Each expert then runs
 * its SiLU MLP on its tokens only (gathered rows), and add_rows_scaled adds
 * the weighted outputs into the block's output, expert by expert in id
 * order. So a token's result is the same whatever else is in the batch:
 * each expert's rows go through the same matmuls one row at a time, and
 * its sum always runs over its experts in the same order.
 *
 * Tensor parallelism cuts every expert (and the shared experts) like the
 * dense MLP: gate/up by rows, down by columns; every rank routes the same
 * tokens the same way (its input is the all-reduced hidden state) and the
 * partial sums meet in one all-reduce at the end of the block. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "engine/model/model_int.h"

/* The router's selection bias [E] (ERNIE's e_score_correction_bias, stored
 * [1][E] or [E]) as host floats the model owns. */
static int bind_score_bias(nb_model *m, nb_moe_layer *L, const char *name, nb_err *e) {
    const st_tensor *t = st_find(m->st, name);
    L->score_bias = model_host_f32(m, t, t && t->ndim == 1 ? 0 : 1, m->cfg.moe.n_experts, name, e);
    return L->score_bias ? 0 : -1;
}

int model_moe_bind(nb_model *m, int li, nb_err *e) {
    const nb_model_config *c = &m->cfg;
    const nb_moe_config *mc = &c->moe;
    nb_moe_layer *L = &m->moe[li];
    int64_t H = c->hidden_size, F = mc->ffn, S = mc->shared_ffn;
    int split = m->n_ranks > 1;
    /* this rank's share of each expert's width, and of the shared experts' */
    nb_slice fr = {0, m->moe_ffn0, m->moe_ffn}, fc = {1, m->moe_ffn0, m->moe_ffn};
    nb_slice sr = {0, m->shared_ffn0, m->shared_ffn}, sc = {1, m->shared_ffn0, m->shared_ffn};
    char n[192];
    snprintf(n, sizeof n, "model.layers.%d.%s.gate.weight", li, mc->block);
    /* in FP32 on every backend (as ERNIE's router computes; Qwen and
     * Mixtral's in the model's dtype): the GPU's router logits then equal
     * the CPU's but for summation order, and so do their choices */
    if (model_bind_f32(m, &L->router, n, mc->n_experts, H, e)) return -1;
    if (mc->score_bias) {
        snprintf(n, sizeof n, "model.layers.%d.%s.moe_statics.e_score_correction_bias", li, mc->block);
        if (bind_score_bias(m, L, n, e)) return -1;
    }
    L->gate = xcalloc((size_t)mc->n_experts, sizeof(nb_weight));
    L->up = xcalloc((size_t)mc->n_experts, sizeof(nb_weight));
    L->down = xcalloc((size_t)mc->n_experts, sizeof(nb_weight));
    for (int x = 0; x < mc->n_experts; x++) {
#define EXPERT(field, proj, rows, cols, sl)                                                        \
    (snprintf(n, sizeof n, "model.layers.%d.%s.experts.%d.%s.weight", li, mc->block, x, proj),     \
     model_bind_linear(m, &L->field[x], n, rows, cols, split ? sl : NULL, m->plan.moe, e))
        if (EXPERT(gate, mc->proj[0], F, H, &fr) || EXPERT(up, mc->proj[1], F, H, &fr) ||
            EXPERT(down, mc->proj[2], H, F, &fc))
            return -1;
#undef EXPERT
    }
    if (S) {
        /* shared experts are plain linear layers: the dense format */
#define SHARED(field, proj, rows, cols, sl)                                                        \
    (snprintf(n, sizeof n, "model.layers.%d.%s.shared_experts.%s.weight", li, mc->block, proj),    \
     model_bind_linear(m, &L->field, n, rows, cols, split ? sl : NULL, m->plan.dense, e))
        if (SHARED(sh_gate, mc->proj[0], S, H, &sr) || SHARED(sh_up, mc->proj[1], S, H, &sr) ||
            SHARED(sh_down, mc->proj[2], H, S, &sc))
            return -1;
#undef SHARED
    }
    return 0;
}

void model_moe_free(nb_model *m) {
    if (!m->moe) return;
    nb_backend *be = m->be;
    for (int li = 0; li < m->cfg.n_layers; li++) {
        nb_moe_layer *L = &m->moe[li];
        model_weight_free(be, &L->router);
        for (int x = 0; L->gate && x < m->cfg.moe.n_experts; x++) {
            model_weight_free(be, &L->gate[x]);
            model_weight_free(be, &L->up[x]);
            model_weight_free(be, &L->down[x]);
        }
        model_weight_free(be, &L->sh_gate), model_weight_free(be, &L->sh_up), model_weight_free(be, &L->sh_down);
        free(L->gate), free(L->up), free(L->down);
    }
    free(m->moe);
    m->moe = NULL;
    float *dev[] = {m->moe_logits, m->moe_xe, m->moe_ye};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) be->ops->free(be, dev[i]);
    free(m->moe_host_logits), free(m->moe_rows), free(m->moe_w), free(m->moe_count);
    free(m->moe_tok_x), free(m->moe_tok_w);
}

void model_moe_alloc(nb_model *m) {
    const nb_moe_config *mc = &m->cfg.moe;
    size_t T = (size_t)m->max_tokens, H = (size_t)m->cfg.hidden_size, E = (size_t)mc->n_experts,
           TK = T * (size_t)mc->n_used;
    nb_backend *be = m->be;
    m->moe_logits = be->ops->alloc(be, sizeof(float) * T * E);
    m->moe_xe = be->ops->alloc(be, sizeof(float) * TK * H);
    m->moe_ye = be->ops->alloc(be, sizeof(float) * T * H);
    m->moe_host_logits = xmalloc(sizeof(float) * T * E);
    m->moe_rows = xmalloc(sizeof(int32_t) * TK);
    m->moe_w = xmalloc(sizeof(float) * TK);
    m->moe_count = xmalloc(sizeof(int) * (E + 1));
    m->moe_tok_x = xmalloc(sizeof(int32_t) * TK);
    m->moe_tok_w = xmalloc(sizeof(float) * TK);
}

/* Token t's experts, as Hugging Face's routers pick them: softmax of the
 * logits in FP32; the n_used highest of p + score bias (a lower id first
 * on ties); weights p of those, renormalized when the config says so.
 * chosen[] is in id order, so the caller's sums run over the experts in
 * one order whatever the weights. */
static void route(const nb_moe_config *mc, const float *logits, const float *bias, int32_t *chosen, float *w) {
    int E = mc->n_experts, K = mc->n_used;
    float mx = -INFINITY, p[NB_MAX_EXPERTS];
    for (int x = 0; x < E; x++) mx = logits[x] > mx ? logits[x] : mx;
    float sum = 0.0f;
    for (int x = 0; x < E; x++) sum += p[x] = expf(logits[x] - mx);
    for (int x = 0; x < E; x++) p[x] /= sum;
    unsigned char taken[NB_MAX_EXPERTS] = {0};
    for (int k = 0; k < K; k++) {
        int best = -1;
        float bs = 0.0f;
        for (int x = 0; x < E; x++) {
            float s = bias ? p[x] + bias[x] : p[x];
            if (!taken[x] && (best < 0 || s > bs)) best = x, bs = s;
        }
        taken[best] = 1;
    }
    float wsum = 0.0f;
    for (int x = 0, k = 0; x < E; x++)
        if (taken[x]) chosen[k] = x, wsum += w[k++] = p[x];
    if (mc->norm) {
        float d = wsum > mc->norm_min ? wsum : mc->norm_min;
        for (int k = 0; k < K; k++) w[k] /= d;
    }
}

/* The SiLU MLP of one expert (or the shared experts) on n rows of x, into
 * out, through the model's gate/up buffers. */
static void mlp(nb_model *m, float *out, const float *x, const nb_weight *gate, const nb_weight *up,
                const nb_weight *down, int n) {
    const nb_backend_ops *op = m->be->ops;
    op->matmul(m->be, m->gate, x, gate, n);
    op->matmul(m->be, m->up, x, up, n);
    op->silu_mul(m->be, m->gate, m->gate, m->up, (size_t)n * (size_t)gate->rows);
    op->matmul(m->be, out, m->gate, down, n);
}

void model_moe_forward(nb_model *m, int li, int n) {
    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    const nb_model_config *c = &m->cfg;
    const nb_moe_config *mc = &c->moe;
    const nb_moe_layer *L = &m->moe[li];
    int E = mc->n_experts, K = mc->n_used;
    size_t H = (size_t)c->hidden_size;

    op->matmul(be, m->moe_logits, m->xn, &L->router, n);
    op->download(be, m->moe_host_logits, m->moe_logits, sizeof(float) * (size_t)n * (size_t)E);
    /* each token's experts, then the tokens grouped by expert (in token
     * order within an expert): moe_count[x] is where expert x's rows start */
    int32_t chosen[NB_MAX_EXPERTS_USED];
    float wt[NB_MAX_EXPERTS_USED];
    int *start = m->moe_count;
    memset(start, 0, sizeof(int) * (size_t)(E + 1));
    int32_t *tok_experts = m->moe_tok_x;
    float *tok_w = m->moe_tok_w;
    for (int t = 0; t < n; t++) {
        route(mc, m->moe_host_logits + (size_t)t * E, L->score_bias, chosen, wt);
        for (int k = 0; k < K; k++) {
            tok_experts[t * K + k] = chosen[k], tok_w[t * K + k] = wt[k];
            start[chosen[k] + 1]++;
        }
    }
    for (int x = 0; x < E; x++) start[x + 1] += start[x];
    int fill[NB_MAX_EXPERTS];
    memcpy(fill, start, sizeof(int) * (size_t)E);
    for (int t = 0; t < n; t++)
        for (int k = 0; k < K; k++) {
            int x = tok_experts[t * K + k], at = fill[x]++;
            m->moe_rows[at] = t, m->moe_w[at] = tok_w[t * K + k];
        }

    /* every expert's input rows, so that xn can take the block's output */
    op->gather_rows(be, m->moe_xe, m->xn, m->moe_rows, n * K, (int)H);
    if (mc->shared_ffn) mlp(m, m->xn, m->xn, &L->sh_gate, &L->sh_up, &L->sh_down, n);
    else op->zero(be, m->xn, sizeof(float) * (size_t)n * H);
    for (int x = 0; x < E; x++) {
        int cnt = start[x + 1] - start[x];
        if (!cnt) continue;
        mlp(m, m->moe_ye, m->moe_xe + (size_t)start[x] * H, &L->gate[x], &L->up[x], &L->down[x], cnt);
        op->add_rows_scaled(be, m->xn, m->moe_ye, m->moe_rows + start[x], m->moe_w + start[x], cnt, (int)H);
    }
    if (m->n_ranks > 1) op->all_reduce(be, m->xn, (size_t)n * H);
}
