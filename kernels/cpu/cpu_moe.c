/* Mixture-of-experts ops of the CPU backend, and moe_route_ref, the
 * routing every backend equals. The experts' matmuls are the backend's
 * own matmul on each expert's rows, so a token's result does not depend on
 * what else is in the batch (each row goes through the same arithmetic
 * whatever rows surround it). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/cpu/cpu_ops.h"

void moe_route_ref(const nb_moe_route *r, const float *logits, const float *bias, int32_t *chosen, float *w) {
    int E = r->n_experts, K = r->n_used;
    float mx = -INFINITY, p[NB_MOE_MAX_EXPERTS];
    for (int x = 0; x < E; x++) mx = logits[x] > mx ? logits[x] : mx;
    float sum = 0.0f;
    for (int x = 0; x < E; x++) sum += p[x] = expf(logits[x] - mx);
    for (int x = 0; x < E; x++) p[x] /= sum;
    unsigned char taken[NB_MOE_MAX_EXPERTS] = {0};
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
    if (r->norm) {
        float d = wsum > r->norm_min ? wsum : r->norm_min;
        for (int k = 0; k < K; k++) w[k] /= d;
    }
}

void cpu_moe_route(nb_backend *b, int32_t *groups, int32_t *rows, int32_t *slot, float *w, const float *logits, int n,
                   const nb_moe_route *r) {
    int E = r->n_experts, K = r->n_used;
    /* slot first holds each pair's expert, and groups' id list the fill
     * positions, until the pairs are placed */
    int32_t *start = groups, *fill = groups + E + 2;
    memset(start, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (int t = 0; t < n; t++) {
        int32_t *chosen = slot + (size_t)t * K;
        moe_route_ref(r, logits + (size_t)t * E, r->bias, chosen, w + (size_t)t * K);
        for (int k = 0; k < K; k++) start[chosen[k] + 1]++;
    }
    for (int x = 0; x < E; x++) start[x + 1] += start[x];
    memcpy(fill, start, sizeof(int32_t) * (size_t)E);
    for (size_t i = 0; i < (size_t)n * K; i++) {
        int32_t at = fill[slot[i]]++;
        rows[at] = (int32_t)(i / (size_t)K);
        slot[i] = at;
    }
    int active = 0;
    for (int x = 0; x < E; x++)
        if (start[x + 1] > start[x]) fill[active++] = x;
    groups[E + 1] = active;
}

typedef struct cpu_experts {
    const nb_weight *w;
    int n;
} cpu_experts;

void *cpu_experts_create(nb_backend *b, const nb_weight *w, int n) {
    cpu_experts *s = xmalloc(sizeof *s);
    s->w = w, s->n = n;
    return s;
}

void cpu_experts_free(nb_backend *b, void *set) { free(set); }

void cpu_matmul_experts(nb_backend *b, float *out, const float *x, const void *set, const int32_t *groups,
                        int n_tokens, int n_rows) {
    const cpu_experts *s = set;
    size_t N = (size_t)s->w[0].rows, K = (size_t)s->w[0].cols;
    for (int e = 0; e < s->n; e++) {
        int g0 = groups[e], cnt = groups[e + 1] - g0;
        if (cnt > 0) b->ops->matmul(b, out + (size_t)g0 * N, x + (size_t)g0 * K, &s->w[e], cnt);
    }
}

/* The CPU records nothing, so nothing it runs is ever recorded. */
int cpu_experts_recordable(nb_backend *b, const void *set, int n_tokens) { return 0; }

void cpu_moe_combine(nb_backend *b, float *out, const float *ye, const int32_t *slot, const float *w, int n, int K,
                     int cols) {
    for (int t = 0; t < n; t++) {
        float *o = out + (size_t)t * cols;
        for (int k = 0; k < K; k++) {
            const float *y = ye + (size_t)slot[t * K + k] * cols;
            float wk = w[t * K + k];
            for (int c = 0; c < cols; c++) o[c] = fmaf(wk, y[c], o[c]);
        }
    }
}
