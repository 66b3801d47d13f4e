/* bench_cuda --ops, mixture-of-experts part: ops->matmul_experts (one
 * grouped launch for every expert of a layer, kernels/cuda/cuda_moe.cu) on
 * Qwen3-30B-A3B's expert shapes (128 experts, 8 a token; gate or up 768 x
 * 2048, down 2048 x 768), for BF16, WINT8, WINT4 (group 128) and FP8
 * experts in quant/quant.h's layout as the model loads them
 * (backend_weight_load_plain), from one token (decode) to 2048 (prefill).
 *
 * Tokens are routed by moe_route on random router logits, so the experts'
 * loads are what a real router's near-uniform ones would be. Figures per
 * step: time per call (recorded and replayed where experts_recordable);
 * the bytes of the experts in use (each read once: what the GEMV paths
 * stream) per second and as a fraction of copy bandwidth, the bound at
 * decode sizes; and x dense = the time of one dense BF16 matmul with as
 * many rows (the backend's cuBLASLt GEMM, the same FLOPs on one weight) /
 * the grouped time, the tensor-core yardstick at prefill sizes. Every
 * expert has the same packed bytes (on its own device copy), so the first
 * and last grouped rows are checked against quant_matmul_ref of their
 * inputs on the host. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_cuda.h"
#include "common/util.h"
#include "quant/quant.h"

/* Qwen3-30B-A3B's; under --smoke a mixture small enough for the emulator
 * that still takes every path (decode and tensor-core sizes, K a multiple
 * of WINT4's group) */
typedef struct moe_sizes {
    int n_experts, n_used, gate_n, gate_k; /* gate/up [gate_n][gate_k], down the transpose */
} moe_sizes;
static const moe_sizes MOE_FULL = {128, 8, 768, 2048}, MOE_SMOKE = {16, 4, 256, 512};
#define MOE_MAX_E 128

static const struct {
    const char *name;
    nb_dtype t;
    int group;
} MOE_FORMATS[] = {{"bf16", NB_BF16, 0}, {"wint8", NB_WINT8, 0}, {"wint4-g128", NB_WINT4, QUANT_WINT4_GROUP},
                   {"fp8-b128", NB_FP8_B128, 0}};

/* The device buffers of one routed step. */
typedef struct moe_step {
    float *logits, *w;
    int32_t *groups, *rows, *slot;
} moe_step;

/* Routes n tokens on fresh random logits into groups (moe_route's groups
 * array); returns how many experts have rows. */
static int moe_route_random(nb_backend *b, moe_step *s, const moe_sizes *z, int n, int32_t *groups) {
    const int E = z->n_experts;
    float *l = xmalloc(sizeof(float) * (size_t)n * E);
    for (size_t i = 0; i < (size_t)n * E; i++) l[i] = 2.0f * bench_frand();
    b->ops->upload(b, s->logits, l, sizeof(float) * (size_t)n * E);
    free(l);
    nb_moe_route r = {E, z->n_used, 1, 1e-20f, NULL};
    b->ops->moe_route(b, groups, s->rows, s->slot, s->w, s->logits, n, &r);
    int32_t g[NB_MOE_GROUPS(MOE_MAX_E)];
    b->ops->download(b, g, groups, sizeof(int32_t) * NB_MOE_GROUPS(E));
    return g[E + 1];
}

/* Grouped rows 0 and n_rows - 1 of out against the host reference. */
static double check_rows(nb_backend *b, const float *out, const float *hx, const nb_weight *hw, int n_rows, int N,
                         int K) {
    float *got = xmalloc(sizeof(float) * 2 * (size_t)N), *ref = xmalloc(sizeof(float) * 2 * (size_t)N);
    float *xr = xmalloc(sizeof(float) * 2 * (size_t)K);
    memcpy(xr, hx, sizeof(float) * (size_t)K);
    memcpy(xr + K, hx + (size_t)(n_rows - 1) * K, sizeof(float) * (size_t)K);
    quant_matmul_ref(ref, xr, hw, 2);
    b->ops->download(b, got, out, sizeof(float) * (size_t)N);
    b->ops->download(b, got + N, out + (size_t)(n_rows - 1) * N, sizeof(float) * (size_t)N);
    double err = bench_rel_err(got, ref, 2 * (size_t)N);
    free(got), free(ref), free(xr);
    return err;
}

void bench_moe_experts(nb_backend *b, double bw) {
    static const int full[] = {1, 8, 32, 64, 256, 512, 2048}, smoke[] = {1, 8, 80};
    const bench_list ns = BENCH_PICK(full, smoke);
    const moe_sizes *z = bench_opts.smoke ? &MOE_SMOKE : &MOE_FULL;
    const int E = z->n_experts, max_tokens = bench_list_max(ns), max_rows = max_tokens * z->n_used;
    const int maxN = z->gate_n > z->gate_k ? z->gate_n : z->gate_k, maxK = maxN;
    const struct {
        const char *name;
        int N, K;
    } shapes[] = {{"gate/up", z->gate_n, z->gate_k}, {"down", z->gate_k, z->gate_n}};
    const nb_backend_ops *o = b->ops;
    moe_step s = {
        .logits = o->alloc(b, sizeof(float) * (size_t)max_tokens * E),
        .w = o->alloc(b, sizeof(float) * max_rows),
        .groups = o->alloc(b, sizeof(int32_t) * NB_MOE_GROUPS(E) * BENCH_MAX_COPIES),
        .rows = o->alloc(b, sizeof(int32_t) * max_rows),
        .slot = o->alloc(b, sizeof(int32_t) * max_rows),
    };
    size_t xn = (size_t)(max_rows + NB_MOE_PAD_ROWS) * maxK;
    float *hx = xmalloc(sizeof(float) * xn);
    bench_fill_bf16_exact(hx, NULL, xn, 1.0f);
    float *x = o->alloc(b, sizeof(float) * xn), *out = o->alloc(b, sizeof(float) * (size_t)max_rows * maxN);
    o->upload(b, x, hx, sizeof(float) * xn);

    printf("\nmixture of experts: ops->matmul_experts, %s experts (%d, %d a token), quant.h layout;\n"
           "time per call (graph replay where recordable); expert GB/s = resident bytes of the experts in use / time,\n"
           "of copy = that / copy bandwidth; x dense = dense BF16 matmul of as many rows (cuBLASLt) / grouped time;\n"
           "rel err = first and last grouped rows against quant_matmul_ref\n",
           bench_opts.smoke ? "--smoke" : "Qwen3-30B-A3B", E, z->n_used);
    printf("  %-8s %6s %6s %6s %6s %-11s %4s %11s %10s %8s %8s %9s\n", "shape", "N", "K", "tokens", "rows", "format",
           "rec", "grouped us", "expert GB/s", "of copy", "x dense", "rel err");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int N = shapes[si].N, K = shapes[si].K;
        double t_dense[sizeof full / sizeof full[0]];
        int n_dense;
        nb_weight dense_h = bench_host_weight(NB_BF16, 0, N, K), *dense = bench_weight_copies(b, &dense_h, &n_dense);
        for (int i = 0; i < ns.n; i++) {
            op_call c = {.kind = K_MATMUL, .b = b, .out = out, .x = x, .w = dense, .n_rot = n_dense,
                         .n = ns.v[i] * z->n_used};
            t_dense[i] = bench_time_op(&c, 1);
        }
        bench_weight_copies_free(b, dense, n_dense);
        bench_host_weight_free(&dense_h);
        for (size_t f = 0; f < sizeof MOE_FORMATS / sizeof MOE_FORMATS[0]; f++) {
            nb_weight hw = bench_host_weight(MOE_FORMATS[f].t, MOE_FORMATS[f].group, N, K);
            nb_weight *dw = xmalloc(sizeof(nb_weight) * E);
            for (int e = 0; e < E; e++) {
                dw[e] = hw;
                backend_weight_load_plain(b, &dw[e]);
            }
            void *set = o->experts_create(b, dw, E);
            const double ebytes = (double)quant_weight_bytes(&dw[0]);
            for (int i = 0; i < ns.n; i++) {
                const int n = ns.v[i], n_rows = n * z->n_used;
                /* the timed loop cycles through n_rot routings, so that
                 * its calls read other experts than the last ones left in
                 * L2; used: the experts with rows, on average */
                const size_t gs = NB_MOE_GROUPS(E);
                double used = moe_route_random(b, &s, z, n, s.groups);
                const int n_rot = bench_copies(used * ebytes);
                for (int k = 1; k < n_rot; k++) used += moe_route_random(b, &s, z, n, s.groups + k * gs);
                used /= n_rot;
                const int rec = o->experts_recordable(b, set, n);
                op_call c = {.kind = K_EXPERTS, .b = b, .out = out, .x = x, .set = set, .groups = s.groups,
                             .groups_stride = gs, .n_rot = n_rot, .n_tokens = n, .n = n_rows};
                double t = bench_time_op(&c, rec);
                double err = check_rows(b, out, hx, &hw, n_rows, N, K), gbs = used * ebytes / t;
                printf("  %-8s %6d %6d %6d %6d %-11s %4s %11.2f %10.1f %8.2f %8.2f %9.1e%s\n", shapes[si].name,
                       N, K, n, n_rows, MOE_FORMATS[f].name, rec ? "yes" : "no", t * 1e6, gbs / 1e9, gbs / bw,
                       t_dense[i] / t, err, bench_check(err, 2e-2));
            }
            o->experts_free(b, set);
            for (int e = 0; e < E; e++) bench_weight_free(b, &dw[e]);
            free(dw);
            bench_host_weight_free(&hw);
        }
    }
    o->free(b, s.logits), o->free(b, s.w), o->free(b, s.groups), o->free(b, s.rows), o->free(b, s.slot);
    o->free(b, x), o->free(b, out);
    free(hx);
}
