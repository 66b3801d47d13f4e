/* Mixture-of-experts MLP blocks (Qwen3-MoE, Mixtral, ERNIE 4.5 MoE): the
 * weights of a layer's router and experts, and the block's forward.
 *
 * Everything runs on the backend, so a decode step records like a dense
 * one: the router's logits go to moe_route, which picks each token's
 * experts (as Hugging Face computes it: backend.h's moe_route_ref) and lays
 * the (token, expert) pairs out grouped by expert; gather_rows_dev copies
 * each pair's input row into place; matmul_experts runs gate, up and down
 * for every expert on its rows at once; moe_combine adds each token's
 * weighted outputs into the block's output, over its experts in id order.
 * A token's result is the same whatever else is in the batch: each row
 * goes through the same matmuls as it would alone, and its sum always runs
 * over its experts in the same order.
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
#include "quant/quant.h"

_Static_assert(NB_MAX_EXPERTS <= NB_MOE_MAX_EXPERTS, "the backends route at most NB_MOE_MAX_EXPERTS experts");

/* The router's selection bias [E] (ERNIE's e_score_correction_bias, stored
 * [1][E] or [E]) as FP32 in backend memory. */
static int bind_score_bias(nb_model *m, nb_moe_layer *L, const char *name, nb_err *e) {
    const st_tensor *t = st_find(m->st, name);
    size_t E = (size_t)m->cfg.moe.n_experts;
    const float *host = model_host_f32(m, t, t && t->ndim == 1 ? 0 : 1, (int64_t)E, name, e);
    if (!host) return -1;
    if (!(L->score_bias = model_alloc(m, sizeof(float) * E))) return model_no_memory(m, name, sizeof(float) * E, NULL, e);
    m->be->ops->upload(m->be, L->score_bias, host, sizeof(float) * E);
    return 0;
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
    m->load_plain = 1;
    for (int x = 0; x < mc->n_experts; x++) {
#define EXPERT(field, proj, rows, cols, sl)                                                        \
    (snprintf(n, sizeof n, "model.layers.%d.%s.experts.%d.%s.weight", li, mc->block, x, proj),     \
     model_bind_linear(m, &L->field[x], n, rows, cols, split ? sl : NULL, m->plan.moe, e))
        if (EXPERT(gate, mc->proj[0], F, H, &fr) || EXPERT(up, mc->proj[1], F, H, &fr) ||
            EXPERT(down, mc->proj[2], H, F, &fc)) {
            m->load_plain = 0;
            return -1;
        }
#undef EXPERT
    }
    m->load_plain = 0;
    const nb_backend_ops *op = m->be->ops;
    L->gate_set = op->experts_create(m->be, L->gate, mc->n_experts);
    L->up_set = op->experts_create(m->be, L->up, mc->n_experts);
    L->down_set = op->experts_create(m->be, L->down, mc->n_experts);
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
    const nb_backend_ops *op = be->ops;
    for (int li = 0; li < m->cfg.n_layers; li++) {
        nb_moe_layer *L = &m->moe[li];
        void *sets[] = {L->gate_set, L->up_set, L->down_set};
        for (int i = 0; i < 3; i++)
            if (sets[i]) op->experts_free(be, sets[i]);
        model_weight_free(be, &L->router);
        if (L->score_bias) op->free(be, L->score_bias);
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
    void *dev[] = {m->moe_logits, m->moe_xe, m->moe_g, m->moe_u, m->moe_w, m->moe_groups, m->moe_rows, m->moe_slot};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) op->free(be, dev[i]);
}

void model_moe_alloc(nb_model *m) {
    const nb_moe_config *mc = &m->cfg.moe;
    size_t T = (size_t)m->max_tokens, H = (size_t)m->cfg.hidden_size, E = (size_t)mc->n_experts,
           F = (size_t)m->moe_ffn, TK = T * (size_t)mc->n_used, P = NB_MOE_PAD_ROWS;
    m->moe_logits = model_alloc(m, sizeof(float) * T * E);
    m->moe_xe = model_alloc(m, sizeof(float) * (TK + P) * H);
    m->moe_g = model_alloc(m, sizeof(float) * (TK + P) * F);
    m->moe_u = model_alloc(m, sizeof(float) * (TK + P) * F);
    m->moe_w = model_alloc(m, sizeof(float) * TK);
    m->moe_groups = model_alloc(m, sizeof(int32_t) * NB_MOE_GROUPS(E));
    m->moe_rows = model_alloc(m, sizeof(int32_t) * TK);
    m->moe_slot = model_alloc(m, sizeof(int32_t) * TK);
}

static size_t weight_bytes(const nb_weight *w) {
    if (w->dtype == NB_F32 || w->dtype == NB_BF16 || w->dtype == NB_F16)
        return (size_t)w->rows * (size_t)w->cols * nb_dtype_size(w->dtype);
    return quant_weight_bytes(w);
}

size_t model_expert_bytes(const nb_model *m) {
    size_t sum = 0;
    for (int r = 0; m->moe && r < m->n_ranks; r++) {
        const nb_model *rm = model_tp_rank((nb_model *)m, r);
        for (int li = 0; li < rm->cfg.n_layers; li++) {
            const nb_moe_layer *L = &rm->moe[li];
            for (int x = 0; L->gate && x < rm->cfg.moe.n_experts; x++)
                sum += weight_bytes(&L->gate[x]) + weight_bytes(&L->up[x]) + weight_bytes(&L->down[x]);
        }
    }
    return sum;
}

int model_moe_recordable(const nb_model *m, int n) {
    const nb_backend_ops *op = m->be->ops;
    for (int li = 0; li < m->cfg.n_layers; li++) {
        const nb_moe_layer *L = &m->moe[li];
        if (!L->gate_set) continue; /* a dense layer */
        if (!op->experts_recordable(m->be, L->gate_set, n) || !op->experts_recordable(m->be, L->up_set, n) ||
            !op->experts_recordable(m->be, L->down_set, n))
            return 0;
    }
    return 1;
}

/* The SiLU MLP of the shared experts on n rows of x, into out, through the
 * model's gate/up buffers. */
static void mlp(nb_model *m, float *out, const float *x, const nb_weight *gate, const nb_weight *up,
                const nb_weight *down, int n) {
    const nb_backend_ops *op = m->be->ops;
    op->matmul(m->be, m->gate, x, gate, n);
    op->matmul(m->be, m->up, x, up, n);
    op->silu_mul(m->be, m->gate, m->gate, m->up, n, (int)gate->rows, (int)gate->rows);
    op->matmul(m->be, out, m->gate, down, n);
}

void model_moe_forward(nb_model *m, int li, int n) {
    const nb_backend_ops *op = m->be->ops;
    nb_backend *be = m->be;
    const nb_model_config *c = &m->cfg;
    const nb_moe_config *mc = &c->moe;
    const nb_moe_layer *L = &m->moe[li];
    int K = mc->n_used, nk = n * K;
    size_t H = (size_t)c->hidden_size;
    nb_moe_route r = {mc->n_experts, K, mc->norm, mc->norm_min, L->score_bias};

    op->matmul(be, m->moe_logits, m->xn, &L->router, n);
    op->moe_route(be, m->moe_groups, m->moe_rows, m->moe_slot, m->moe_w, m->moe_logits, n, &r);
    /* every pair's input row, so that xn can take the block's output */
    op->gather_rows_dev(be, m->moe_xe, m->xn, m->moe_rows, nk, (int)H);
    if (mc->shared_ffn) mlp(m, m->xn, m->xn, &L->sh_gate, &L->sh_up, &L->sh_down, n);
    else op->zero(be, m->xn, sizeof(float) * (size_t)n * H);
    op->matmul_experts(be, m->moe_g, m->moe_xe, L->gate_set, m->moe_groups, n, nk);
    op->matmul_experts(be, m->moe_u, m->moe_xe, L->up_set, m->moe_groups, n, nk);
    op->silu_mul(be, m->moe_g, m->moe_g, m->moe_u, nk, (int)m->moe_ffn, (int)m->moe_ffn);
    /* the pairs' outputs where their inputs were (read by now) */
    op->matmul_experts(be, m->moe_xe, m->moe_g, L->down_set, m->moe_groups, n, nk);
    op->moe_combine(be, m->xn, m->moe_xe, m->moe_slot, m->moe_w, n, K, (int)H);
    if (m->n_ranks > 1) op->all_reduce(be, m->xn, (size_t)n * H);
}
