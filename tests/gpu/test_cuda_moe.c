/* The CUDA backend's mixture-of-experts ops (kernels/cuda/cuda_moe.cu)
 * against the CPU backend's (checked in tests/test_moe_ops.c), on the same
 * inputs (`make test-gpu`; `make test` runs it under cuemu). What each
 * comparison allows:
 *  - moe_route: router logits drawn so that no choice is within 1e-4 of a
 *    tie (in double), and exact ties (the lower id on both): then the
 *    choices cannot differ, and as the grouping is deterministic, groups,
 *    rows and slot must equal the CPU's exactly; the weights differ only
 *    by expf's last bits: 1e-6 relative;
 *  - gather_rows_dev and moe_combine (fmaf in k order on both): bit for bit;
 *  - matmul_experts, expert by expert against the CPU's rows, with the
 *    bounds tests/gpu/test_cuda_ops.c (dense), test_cuda_wint.c and
 *    test_cuda_fp8.c give a product of that many rows: up to the GEMV's
 *    rows (8 dense, 16 packed) FP32 activations, dense 1e-4 of the output
 *    norm, WINT 1e-4 of max |ref| (+ 1e-6), FP8 1e-3; above, tensor cores
 *    read BF16 (or E4M3) activations: 1e-2, 2e-2 of max |ref|, 2e-3. Where
 *    the set is recordable the step's size picks the path (its kernels are
 *    chosen before the counts, in device memory, are known: tensor cores
 *    when the rows average more than a GEMV pass an expert, tc_step; every
 *    expert is held to that path's bound), else the expert's own rows do
 *    (each runs through matmul). Weights are loaded as the model loads experts,
 *    backend_weight_load_plain (quant.h's layout, never repacked); outputs
 *    are poisoned with NaN, so rows left unwritten fail, and the
 *    NB_MOE_PAD_ROWS rows past n_rows must stay poisoned;
 *  - recorded steps: experts_recordable for every format at up to 64
 *    tokens, then a block recorded under a key (with and without moe_route
 *    inside) and replayed on other tokens routed to other experts, after a
 *    product that outgrows the scratch the recording points at: the replay
 *    equals an eager run on the new routing bit for bit, and the CPU
 *    within the bound of the step's size (output norm).
 * Needs a CUDA device; fails (not skips) without one. */
#include "quant/quant.h"
#include "tests/gpu/gpu_test.h"

/* ---- routing ---------------------------------------------------------------- */

/* How clear token l's choice is: the gap in p + bias (double) between the
 * K-th best and the next, over the size of the terms FP32 rounds (p and
 * p + bias of both). Infinite when every expert is chosen. */
static double route_gap(int E, int K, const float *l, const float *bias) {
    double p[NB_MOE_MAX_EXPERTS], s[NB_MOE_MAX_EXPERTS], mx = -INFINITY, sum = 0;
    if (K >= E) return INFINITY;
    for (int x = 0; x < E; x++) mx = l[x] > mx ? l[x] : mx;
    for (int x = 0; x < E; x++) sum += p[x] = exp((double)l[x] - mx);
    for (int x = 0; x < E; x++) p[x] /= sum, s[x] = p[x] + (bias ? bias[x] : 0.0);
    int at[2] = {-1, -1};
    for (int k = 0; k <= K; k++) { /* the K + 1 best, by selection */
        int best = -1;
        for (int x = 0; x < E; x++)
            if (s[x] > -INFINITY && (best < 0 || s[x] > s[best])) best = x;
        at[k == K] = best;
        if (k < K) s[best] = -INFINITY;
    }
    double sk = p[at[0]] + (bias ? bias[at[0]] : 0.0), sn = s[at[1]];
    return (sk - sn) / (p[at[0]] + p[at[1]] + fabs(sk) + fabs(sn));
}

/* n tokens' logits, each redrawn until its choice is clear of ties; expert
 * `favour` (if >= 0) is everyone's first and `shun` nobody's. */
static float *gapped_logits(int n, int E, int K, const float *bias, int favour, int shun) {
    float *l = xmalloc(sizeof(float) * (size_t)n * E);
    for (int t = 0; t < n; t++) {
        float *r = l + (size_t)t * E;
        do {
            for (int x = 0; x < E; x++) r[x] = 2.0f * gauss();
            if (favour >= 0) r[favour] = 14.0f; /* 7 sigma above the rest */
            if (shun >= 0) r[shun] = -30.0f;
        } while (route_gap(E, K, r, bias) < 1e-4);
    }
    return l;
}

/* moe_route's outputs in one backend's memory. */
typedef struct route_bufs {
    int32_t *groups, *rows, *slot;
    float *w;
} route_bufs;

static route_bufs route_alloc(nb_backend *b, int E, int nk) {
    route_bufs r = {b->ops->alloc(b, sizeof(int32_t) * NB_MOE_GROUPS(E)), b->ops->alloc(b, sizeof(int32_t) * nk),
                    b->ops->alloc(b, sizeof(int32_t) * nk), b->ops->alloc(b, sizeof(float) * nk)};
    return r;
}

static void route_free(nb_backend *b, route_bufs *r) {
    b->ops->free(b, r->groups), b->ops->free(b, r->rows), b->ops->free(b, r->slot), b->ops->free(b, r->w);
}

/* The GPU's outputs g (device) against the CPU's c (host): exactly, but
 * the weights (1e-6 relative) and groups' ids past the active count
 * (unspecified). Returns the worst weight error. */
static double compare_route(const route_bufs *c, const route_bufs *g, int E, int nk, const char *what) {
    int32_t *gg = xmalloc(sizeof(int32_t) * NB_MOE_GROUPS(E)), *gr = xmalloc(sizeof(int32_t) * nk),
            *gs = xmalloc(sizeof(int32_t) * nk);
    float *gw = from_gpu(g->w, (size_t)nk);
    gpu->ops->download(gpu, gg, g->groups, sizeof(int32_t) * NB_MOE_GROUPS(E));
    gpu->ops->download(gpu, gr, g->rows, sizeof(int32_t) * nk);
    gpu->ops->download(gpu, gs, g->slot, sizeof(int32_t) * nk);
    int ng = E + 2 + (c->groups[E + 1] >= 0 && c->groups[E + 1] <= E ? c->groups[E + 1] : 0);
    int first = -1;
    for (int i = 0; i < ng && first < 0; i++)
        if (gg[i] != c->groups[i]) first = i;
    CHECK(first < 0, "%s: groups[%d] = %d, cpu %d", what, first, first < 0 ? 0 : gg[first],
          first < 0 ? 0 : c->groups[first]);
    CHECK(!memcmp(gr, c->rows, sizeof(int32_t) * nk), "%s: rows differ from the cpu's", what);
    CHECK(!memcmp(gs, c->slot, sizeof(int32_t) * nk), "%s: slot differs from the cpu's", what);
    double err = rel_elem(gw, c->w, (size_t)nk);
    CHECK(err <= 1e-6, "%s: weights off the cpu's by %.3g relative", what, err);
    free(gg), free(gr), free(gs), free(gw);
    return err;
}

/* One routing on both backends; the GPU's buffers poisoned first. */
static double route_case(int E, int K, int n, const float *logits, const float *bias, int norm, float norm_min,
                         const char *what) {
    int nk = n * K;
    float *dl = to_gpu(logits, sizeof(float) * (size_t)n * E), *db = bias ? to_gpu(bias, sizeof(float) * E) : NULL;
    route_bufs c = route_alloc(cpu, E, nk), g = route_alloc(gpu, E, nk);
    size_t pb = sizeof(int32_t) * (size_t)(nk > NB_MOE_GROUPS(E) ? nk : NB_MOE_GROUPS(E));
    unsigned char *poison = memset(xmalloc(pb), 0xa5, pb);
    gpu->ops->upload(gpu, g.groups, poison, sizeof(int32_t) * NB_MOE_GROUPS(E));
    gpu->ops->upload(gpu, g.rows, poison, sizeof(int32_t) * nk);
    gpu->ops->upload(gpu, g.slot, poison, sizeof(int32_t) * nk);
    gpu->ops->upload(gpu, g.w, poison, sizeof(float) * nk);
    nb_moe_route rc = {E, K, norm, norm_min, bias}, rg = {E, K, norm, norm_min, db};
    cpu->ops->moe_route(cpu, c.groups, c.rows, c.slot, c.w, logits, n, &rc);
    gpu->ops->moe_route(gpu, g.groups, g.rows, g.slot, g.w, dl, n, &rg);
    double err = compare_route(&c, &g, E, nk, what);
    route_free(cpu, &c), route_free(gpu, &g);
    gpu->ops->free(gpu, dl), gpu->ops->free(gpu, db);
    free(poison);
    return err;
}

static void test_route(void) {
    static const int EK[][2] = {{8, 2}, {64, 6}, {128, 8}, {256, 8}, {8, 8}};
    static const int ns[] = {1, 5, 37, 200};
    double worst = 0;
    for (int c = 0; c < 5; c++)
        for (int i = 0; i < 4; i++)
            for (int v = 0; v < 6; v++) { /* bias off/on x norm off, on, on with norm_min above the mass */
                int E = EK[c][0], K = EK[c][1], n = ns[i], use_bias = v & 1, norm = v >= 2;
                float norm_min = v >= 4 ? 0.6f : 1e-20f;
                WHERE("moe_route E=%d K=%d n=%d bias=%d norm=%d norm_min=%g", E, K, n, use_bias, norm, norm_min);
                float *bias = use_bias ? randn((size_t)E, 1.0f / (float)E) : NULL;
                float *logits = gapped_logits(n, E, K, bias, -1, -1);
                note_worst(&worst, route_case(E, K, n, logits, bias, norm, norm_min, t_where));
                free(bias), free(logits);
            }
    printf("  moe_route: worst weight error %.2e relative\n", worst);
}

/* Equal logits (and equal biased scores): the lower id on both. */
static void test_route_ties(void) {
    static const int EK[][2] = {{8, 2}, {64, 6}, {256, 8}};
    for (int c = 0; c < 3; c++)
        for (int use_bias = 0; use_bias < 2; use_bias++) {
            int E = EK[c][0], K = EK[c][1], n = 7;
            WHERE("moe_route ties E=%d K=%d bias=%d", E, K, use_bias);
            float *logits = xcalloc((size_t)n * E, sizeof(float)), *bias = xcalloc((size_t)E, sizeof(float));
            /* one token in two has a clear first, the rest tie */
            for (int t = 0; t < n; t++) logits[t * E + t % E] = t % 2 ? 1.0f : 0.0f;
            bias[E - 1] = bias[E - 2] = 0.5f; /* the two last tie for first */
            route_case(E, K, n, logits, use_bias ? bias : NULL, 1, 1e-20f, t_where);
            free(logits), free(bias);
        }
}

/* ---- gather, combine ---------------------------------------------------------- */

static void test_gather_rows_dev(void) {
    static const int colss[] = {1, 17, 4096}, ns[] = {1, 9, 400};
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < 3; i++) {
            int cols = colss[c], n = ns[i], src = 50;
            WHERE("gather_rows_dev cols=%d rows=%d", cols, n);
            int32_t *rows = xmalloc(sizeof(int32_t) * n);
            for (int j = 0; j < n; j++) rows[j] = j == 1 ? 0 : j == 2 ? src - 1 : irand(src); /* both ends */
            size_t no = (size_t)n * cols;
            float *x = randn((size_t)src * cols, 1.0f), *ref = xmalloc(sizeof(float) * no);
            float *dx = to_gpu(x, sizeof(float) * src * cols), *dout = gpu->ops->alloc(gpu, sizeof(float) * no);
            int32_t *drows = to_gpu(rows, sizeof(int32_t) * n);
            cpu->ops->gather_rows(cpu, ref, x, rows, n, cols);
            gpu->ops->gather_rows_dev(gpu, dout, dx, drows, n, cols);
            float *got = from_gpu(dout, no);
            CHECK(n_mismatch(got, ref, no) == 0, "%s: %zu of %zu differ", t_where, n_mismatch(got, ref, no), no);
            gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout), gpu->ops->free(gpu, drows);
            free(rows), free(x), free(ref), free(got);
        }
}

static void test_moe_combine(void) {
    static const int EK[][2] = {{8, 2}, {64, 8}}, ns[] = {1, 5, 37}, colss[] = {1, 17, 300, 2048};
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 4; j++) {
                int E = EK[c][0], K = EK[c][1], n = ns[i], cols = colss[j], nk = n * K;
                WHERE("moe_combine E=%d K=%d n=%d cols=%d", E, K, n, cols);
                float *logits = randn((size_t)n * E, 2.0f);
                nb_moe_route r = {E, K, 1, 1e-20f, NULL};
                route_bufs rt = route_alloc(cpu, E, nk); /* a real slot permutation */
                cpu->ops->moe_route(cpu, rt.groups, rt.rows, rt.slot, rt.w, logits, n, &r);
                size_t no = (size_t)n * cols;
                float *ye = randn((size_t)nk * cols, 1.0f), *out = randn(no, 1.0f);
                float *dye = to_gpu(ye, sizeof(float) * nk * cols), *dout = to_gpu(out, sizeof(float) * no);
                int32_t *dslot = to_gpu(rt.slot, sizeof(int32_t) * nk);
                float *dw = to_gpu(rt.w, sizeof(float) * nk);
                cpu->ops->moe_combine(cpu, out, ye, rt.slot, rt.w, n, K, cols);
                gpu->ops->moe_combine(gpu, dout, dye, dslot, dw, n, K, cols);
                float *got = from_gpu(dout, no);
                CHECK(n_mismatch(got, out, no) == 0, "%s: %zu of %zu differ", t_where, n_mismatch(got, out, no), no);
                gpu->ops->free(gpu, dye), gpu->ops->free(gpu, dout);
                gpu->ops->free(gpu, dslot), gpu->ops->free(gpu, dw);
                route_free(cpu, &rt);
                free(logits), free(ye), free(out), free(got);
            }
}

/* ---- experts ------------------------------------------------------------------ */

/* E experts of one dtype and shape: host descriptors (c) and their
 * backend_weight_load_plain copies (g), as the model loader keeps them. */
typedef struct experts {
    int E;
    nb_weight c[16], g[16];
    double wn[16]; /* each expert's Frobenius norm */
} experts;

static void make_experts(experts *s, int E, nb_dtype t, int64_t N, int64_t K, int group) {
    s->E = E;
    for (int x = 0; x < E; x++) {
        size_t n = (size_t)(N * K);
        float *v = randn(n, 0.05f);
        nb_weight w = {.dtype = t, .rows = N, .cols = K, .group = group};
        if (t == NB_BF16) {
            uint16_t *d = xmalloc(sizeof(uint16_t) * n);
            for (size_t i = 0; i < n; i++) d[i] = f32_to_bf16(v[i]), v[i] = bf16_to_f32(d[i]);
            w.data = d;
        } else {
            size_t sb = quant_scale_bytes(t, N, K, group), s2b = quant_scale2_bytes(t, N);
            void *d = xmalloc(quant_data_bytes(t, N, K)), *sc = xmalloc(sb ? sb : 1), *s2 = s2b ? xmalloc(s2b) : NULL;
            nb_err e = {{0}};
            if (quant_pack(t, v, N, K, group, d, sc, s2, &e)) {
                fprintf(stderr, "quant_pack %s [%lld, %lld] group %d: %s\n", nb_dtype_name(t), (long long)N,
                        (long long)K, group, e.msg);
                abort(); /* a shape this test chose: a bug in the test */
            }
            w.data = d, w.scale = sc, w.scale2 = s2;
        }
        s->wn[x] = norm2(v, n);
        free(v);
        s->c[x] = s->g[x] = w;
        size_t want = t == NB_BF16 ? n * 2 : quant_weight_bytes(&w), got = backend_weight_load_plain(gpu, &s->g[x]);
        CHECK(got == want && s->g[x].layout == NB_LAYOUT_PLAIN && s->g[x].data != w.data,
              "%s [%lld, %lld]: backend_weight_load_plain: %zu bytes (want %zu), layout %d", nb_dtype_name(t),
              (long long)N, (long long)K, got, want, (int)s->g[x].layout);
    }
}

static void free_experts(experts *s) {
    for (int x = 0; x < s->E; x++) {
        gpu->ops->weight_free(gpu, s->g[x].data);
        if (s->g[x].scale) gpu->ops->weight_free(gpu, s->g[x].scale);
        if (s->g[x].scale2) gpu->ops->weight_free(gpu, s->g[x].scale2);
        free((void *)s->c[x].data), free((void *)s->c[x].scale), free((void *)s->c[x].scale2);
    }
}

static double max_abs(const float *v, size_t n) {
    double r = 0;
    for (size_t i = 0; i < n; i++) r = fmax(r, fabs(v[i]));
    return r;
}

/* The most rows a product takes with FP32 activations (GEMV). */
static int gemv_rows(nb_dtype t) { return t == NB_BF16 ? 8 : 16; }

/* Whether a recordable set's step of n_rows rows over E experts runs on
 * tensor cores: its rows average more than a GEMV pass an expert
 * (cuda_experts_tc in kernels/cuda/cuda_int.h). */
static int tc_step(nb_dtype t, int n_rows, int E) { return n_rows > gemv_rows(t) * E; }

/* Expert e's cnt rows of got against the CPU's under the bound of its
 * path (the header); returns the error in the bound's measure. */
static double check_expert(nb_dtype t, const float *got, const float *ref, const float *x, int cnt, int64_t N,
                           int64_t K, double wn, int tc, double ref_floor, const char *what, int e) {
    size_t no = (size_t)cnt * N;
    double err, tol;
    if (t == NB_BF16) { /* test_cuda_ops: the output norm, floored by the size of uncancelled products */
        double floor = norm2(x, (size_t)cnt * K) * wn / sqrt((double)K);
        err = rel_l2(got, ref, no, floor), tol = tc ? 1e-2 : 1e-4;
    } else if (t == NB_FP8_B128) { /* test_cuda_fp8: FP8 mma (K whole 128-column blocks) or the GEMV */
        err = rel_max(got, ref, no), tol = tc || K % QUANT_FP8_BLOCK == 0 ? 2e-3 : 1e-3;
    } else { /* test_cuda_wint's check_rows, relative to max |ref| */
        double rmax = max_abs(ref, no), d = 0, scale = tc && ref_floor > rmax ? ref_floor : rmax;
        for (size_t i = 0; i < no; i++) {
            double di = fabs((double)got[i] - ref[i]);
            d = isnan(di) || di > d ? di : d;
        }
        double bound = tc ? 2e-2 * scale : 1e-4 * rmax + 1e-6;
        err = scale > 0 ? d / scale : d, tol = bound / (scale > 0 ? scale : 1);
    }
    CHECK(err <= tol, "%s: expert %d (%d rows%s): error %.3g > %.3g", what, e, cnt, tc ? ", tensor cores" : "", err,
          tol);
    return err;
}

/* n_tokens tokens, 2 of 8 experts each (expert 0 everyone's, expert 5
 * nobody's), routed on the CPU; both backends multiply the same grouped
 * activations. worst[0]: GEMV paths, worst[1]: tensor cores. */
static void check_experts(nb_dtype t, int group, int64_t N, int64_t K, int n_tokens, double worst[2]) {
    enum { E = 8, KU = 2 };
    const int nk = n_tokens * KU;
    WHERE("matmul_experts %s group %d N=%lld K=%lld n_tokens=%d: setup", nb_dtype_name(t), group, (long long)N,
          (long long)K, n_tokens);
    experts s;
    make_experts(&s, E, t, N, K, group);
    float *logits = gapped_logits(n_tokens, E, KU, NULL, 0, 5);
    nb_moe_route r = {E, KU, 1, 1e-20f, NULL};
    route_bufs rt = route_alloc(cpu, E, nk);
    cpu->ops->moe_route(cpu, rt.groups, rt.rows, rt.slot, rt.w, logits, n_tokens, &r);
    size_t xo = (size_t)(nk + NB_MOE_PAD_ROWS) * K, oo = (size_t)(nk + NB_MOE_PAD_ROWS) * N;
    float *x = randn(xo, 1.0f), *ref = xmalloc(sizeof(float) * oo), *got = xmalloc(sizeof(float) * oo);
    unsigned char *poison = memset(xmalloc(sizeof(float) * oo), 0xff, sizeof(float) * oo); /* NaN */
    float *dx = to_gpu(x, sizeof(float) * xo), *dout = to_gpu(poison, sizeof(float) * oo);
    int32_t *dgroups = to_gpu(rt.groups, sizeof(int32_t) * NB_MOE_GROUPS(E));
    void *cs = cpu->ops->experts_create(cpu, s.c, E), *gs = gpu->ops->experts_create(gpu, s.g, E);
    int rec = gpu->ops->experts_recordable(gpu, gs, n_tokens);
    /* FP8 experts of whole 16-byte rows have a tensor-core launch at any size */
    if (n_tokens <= 64 || (t == NB_FP8_B128 && K % 16 == 0))
        CHECK(rec == 1, "%s experts at %d tokens: not recordable", nb_dtype_name(t), n_tokens);
    WHERE("matmul_experts %s group %d N=%lld K=%lld n_tokens=%d%s", nb_dtype_name(t), group, (long long)N,
          (long long)K, n_tokens, rec ? " (recordable)" : "");
    cpu->ops->matmul_experts(cpu, ref, x, cs, rt.groups, n_tokens, nk);
    gpu->ops->matmul_experts(gpu, dout, dx, gs, dgroups, n_tokens, nk);
    gpu->ops->download(gpu, got, dout, sizeof(float) * oo);
    const double ref_floor = max_abs(ref, (size_t)nk * N);
    for (int e = 0; e < E; e++) {
        int g0 = rt.groups[e], cnt = rt.groups[e + 1] - g0;
        if (!cnt) continue;
        int tc = rec ? tc_step(t, nk, E) : cnt > gemv_rows(t);
        note_worst(&worst[tc], check_expert(t, got + (size_t)g0 * N, ref + (size_t)g0 * N, x + (size_t)g0 * K, cnt, N,
                                            K, s.wn[e], tc, ref_floor, t_where, e));
    }
    CHECK(rt.groups[6] == rt.groups[5] && rt.groups[1] == n_tokens, "%s: the routing is not the one planned", t_where);
    CHECK(!memcmp(got + (size_t)nk * N, poison, sizeof(float) * NB_MOE_PAD_ROWS * N),
          "%s: values written past the n_rows = %d rows", t_where, nk);
    cpu->ops->experts_free(cpu, cs), gpu->ops->experts_free(gpu, gs);
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout), gpu->ops->free(gpu, dgroups);
    route_free(cpu, &rt);
    free(logits), free(x), free(ref), free(got), free(poison);
    free_experts(&s);
}

static const struct {
    nb_dtype t;
    int group; /* WINT4: 0 = per channel (group K) */
    const char *name;
} FORMATS[] = {{NB_BF16, 0, "bf16"},          {NB_WINT8, 0, "wint8"},        {NB_WINT4, 128, "wint4 g128"},
               {NB_WINT4, 0, "wint4 channel"}, {NB_WINT2, QUANT_WINT2_GROUP, "wint2"}, {NB_FP8_B128, 0, "fp8"}};
#define N_FORMATS ((int)(sizeof FORMATS / sizeof FORMATS[0]))

/* (N, K) of the issue, and K = 100 (rows of no whole 16-byte chunk, where
 * the format takes it); each format gets the shapes quant_check allows. */
static void test_matmul_experts(void) {
    static const int64_t NK[][2] = {{96, 128}, {200, 256}, {64, 320}, {33, 100}};
    static const int ns[] = {1, 3, 8, 17, 64, 200};
    for (int f = 0; f < N_FORMATS; f++) {
        double worst[2] = {0, 0};
        for (int s = 0; s < 4; s++) {
            nb_dtype t = FORMATS[f].t;
            int group = t == NB_WINT4 && !FORMATS[f].group ? (int)NK[s][1] : FORMATS[f].group;
            nb_err e;
            if (t != NB_BF16 && quant_check(t, NK[s][0], NK[s][1], group, &e)) continue;
            for (int i = 0; i < 6; i++) check_experts(t, group, NK[s][0], NK[s][1], ns[i], worst);
        }
        /* past the dense GEMV's 256 tokens (expert by expert), many tiles an expert */
        nb_dtype t = FORMATS[f].t;
        check_experts(t, t == NB_WINT4 ? 128 : FORMATS[f].group, 96, 128, 300, worst);
        printf("  matmul_experts %-13s worst error %.2e within the GEMV's rows, %.2e above\n", FORMATS[f].name,
               worst[0], worst[1]);
    }
}

/* ---- recorded steps ------------------------------------------------------------ */

/* An eager product that outgrows the tensor-core activation scratch (1 MiB
 * at first; 600 rows of 1024 BF16 columns), run between a recording and
 * its replay: the recording still points at the old buffer, which must be
 * retired, not freed. Made before anything is recorded, freed after
 * (frees drop the recordings). */
enum { BIG_T = 300, BIG_R = 2 * BIG_T, BIG_N = 16, BIG_K = 1024 };
static const int32_t BIG_GROUPS[NB_MOE_GROUPS(2)] = {0, BIG_T, BIG_R, 2, 0, 1};
static struct {
    experts s;
    void *cs, *gs;
    float *x, *dx, *dout;
    int32_t *dgroups;
} big;

static void big_init(void) {
    make_experts(&big.s, 2, NB_WINT4, BIG_N, BIG_K, 128);
    big.cs = cpu->ops->experts_create(cpu, big.s.c, 2), big.gs = gpu->ops->experts_create(gpu, big.s.g, 2);
    big.x = randn((size_t)(BIG_R + NB_MOE_PAD_ROWS) * BIG_K, 1.0f);
    big.dx = to_gpu(big.x, sizeof(float) * (BIG_R + NB_MOE_PAD_ROWS) * BIG_K);
    big.dout = gpu->ops->alloc(gpu, sizeof(float) * BIG_R * BIG_N), big.dgroups = to_gpu(BIG_GROUPS, sizeof BIG_GROUPS);
}

static void big_run(void) {
    float *ref = xmalloc(sizeof(float) * BIG_R * BIG_N);
    cpu->ops->matmul_experts(cpu, ref, big.x, big.cs, BIG_GROUPS, BIG_T, BIG_R);
    gpu->ops->matmul_experts(gpu, big.dout, big.dx, big.gs, big.dgroups, BIG_T, BIG_R);
    float *got = from_gpu(big.dout, (size_t)BIG_R * BIG_N);
    double err = rel_l2(got, ref, (size_t)BIG_R * BIG_N, 0);
    CHECK(err <= 1e-2, "%s: the larger eager product in between: error %.3g", t_where, err);
    free(ref), free(got);
}

static void big_free(void) {
    cpu->ops->experts_free(cpu, big.cs), gpu->ops->experts_free(gpu, big.gs);
    gpu->ops->free(gpu, big.dx), gpu->ops->free(gpu, big.dout), gpu->ops->free(gpu, big.dgroups);
    free(big.x);
    free_experts(&big.s);
}

/* A block of n tokens (route, gather, experts, combine onto the residual)
 * recorded under a key, with moe_route eager before graph_begin (whole 0)
 * or inside the recording (whole 1); then new tokens whose logits send
 * them to other experts, and the key replayed; between the two, the
 * larger product above where the step takes tensor cores. */
static void graph_case(nb_dtype t, int group, int n, int whole) {
    enum { E = 8, KU = 2, H = 128, D = 96 };
    const int nk = n * KU;
    WHERE("graph %s n=%d%s: setup", nb_dtype_name(t), n, whole ? " (route recorded)" : "");
    experts s;
    make_experts(&s, E, t, D, H, group);
    float *xt[2] = {randn((size_t)n * H, 1.0f), randn((size_t)n * H, 1.0f)}, *res = randn((size_t)n * D, 1.0f);
    float *logits[2] = {gapped_logits(n, E, KU, NULL, 0, 7), gapped_logits(n, E, KU, NULL, 7, 0)};
    nb_moe_route r = {E, KU, 1, 1e-20f, NULL};
    /* device: the step's inputs, its buffers, and a second set for the eager run */
    float *dl = gpu->ops->alloc(gpu, sizeof(float) * n * E), *dxt = gpu->ops->alloc(gpu, sizeof(float) * n * H);
    float *dxg[2], *dye[2], *dout[2];
    for (int i = 0; i < 2; i++) {
        dxg[i] = gpu->ops->alloc(gpu, sizeof(float) * (nk + NB_MOE_PAD_ROWS) * H);
        dye[i] = gpu->ops->alloc(gpu, sizeof(float) * nk * D);
        dout[i] = gpu->ops->alloc(gpu, sizeof(float) * n * D);
    }
    route_bufs g = route_alloc(gpu, E, nk), c = route_alloc(cpu, E, nk);
    void *gs = gpu->ops->experts_create(gpu, s.g, E), *cs = cpu->ops->experts_create(cpu, s.c, E);
    REQUIRE(gpu->ops->experts_recordable(gpu, gs, n), "%s experts at %d tokens: not recordable", nb_dtype_name(t), n);
    float *cxg = xcalloc((size_t)(nk + NB_MOE_PAD_ROWS) * H, sizeof(float)), *cye = xmalloc(sizeof(float) * nk * D);
    float *cout = xmalloc(sizeof(float) * n * D);
    int32_t first_groups[NB_MOE_GROUPS(E)];
    plain_batch pb;
    plain_batch_init(&pb, n);
    uint64_t key = 0x30e0000 + (uint64_t)(t * 2 + whole) * 1000 + (uint64_t)n;
    for (int step = 0; step < 2; step++) {
        WHERE("graph %s n=%d%s: %s", nb_dtype_name(t), n, whole ? " (route recorded)" : "", step ? "replay" : "record");
        gpu->ops->upload(gpu, dl, logits[step], sizeof(float) * n * E);
        gpu->ops->upload(gpu, dxt, xt[step], sizeof(float) * n * H);
        gpu->ops->upload(gpu, dout[0], res, sizeof(float) * n * D);
        gpu->ops->set_batch(gpu, &pb.b); /* as the model's step: the batch first */
        if (!whole) gpu->ops->moe_route(gpu, g.groups, g.rows, g.slot, g.w, dl, n, &r);
        int rc = gpu->ops->graph_begin(gpu, key);
        CHECK(rc == step, "%s: graph_begin returned %d, want %d", t_where, rc, step);
        if (!rc) {
            if (whole) gpu->ops->moe_route(gpu, g.groups, g.rows, g.slot, g.w, dl, n, &r);
            gpu->ops->gather_rows_dev(gpu, dxg[0], dxt, g.rows, nk, H);
            gpu->ops->matmul_experts(gpu, dye[0], dxg[0], gs, g.groups, n, nk);
            gpu->ops->moe_combine(gpu, dout[0], dye[0], g.slot, g.w, n, KU, D);
            gpu->ops->graph_end(gpu);
        }
        /* the same ops eagerly on the routing the step saw */
        gpu->ops->upload(gpu, dout[1], res, sizeof(float) * n * D);
        gpu->ops->gather_rows_dev(gpu, dxg[1], dxt, g.rows, nk, H);
        gpu->ops->matmul_experts(gpu, dye[1], dxg[1], gs, g.groups, n, nk);
        gpu->ops->moe_combine(gpu, dout[1], dye[1], g.slot, g.w, n, KU, D);
        /* and the CPU */
        memcpy(cout, res, sizeof(float) * n * D);
        cpu->ops->moe_route(cpu, c.groups, c.rows, c.slot, c.w, logits[step], n, &r);
        cpu->ops->gather_rows_dev(cpu, cxg, xt[step], c.rows, nk, H);
        cpu->ops->matmul_experts(cpu, cye, cxg, cs, c.groups, n, nk);
        cpu->ops->moe_combine(cpu, cout, cye, c.slot, c.w, n, KU, D);
        compare_route(&c, &g, E, nk, t_where);
        float *ye0 = from_gpu(dye[0], (size_t)nk * D), *ye1 = from_gpu(dye[1], (size_t)nk * D);
        float *o0 = from_gpu(dout[0], (size_t)n * D), *o1 = from_gpu(dout[1], (size_t)n * D);
        CHECK(n_mismatch(ye0, ye1, (size_t)nk * D) == 0 && n_mismatch(o0, o1, (size_t)n * D) == 0,
              "%s: %zu expert outputs and %zu block outputs differ from the eager run", t_where,
              n_mismatch(ye0, ye1, (size_t)nk * D), n_mismatch(o0, o1, (size_t)n * D));
        double e_ye = rel_l2(ye0, cye, (size_t)nk * D, 0), e_out = rel_l2(o0, cout, (size_t)n * D, 0);
        /* FP8 (H = 128) takes FP8 mma at every step: test_cuda_fp8's bound */
        double tol = tc_step(t, nk, E) ? 1e-2 : t == NB_FP8_B128 ? 2e-3 : 1e-4;
        CHECK(e_ye <= tol && e_out <= tol, "%s: expert outputs off the cpu by %.3g, block outputs by %.3g (limit %g)",
              t_where, e_ye, e_out, tol);
        if (step == 0) memcpy(first_groups, c.groups, sizeof first_groups);
        else
            CHECK(memcmp(first_groups, c.groups, sizeof first_groups), "%s: the new tokens routed as the old", t_where);
        free(ye0), free(ye1), free(o0), free(o1);
        if (step == 0 && t != NB_BF16 && tc_step(t, nk, E)) big_run();
    }
    /* frees drop the recordings: only after the replay */
    gpu->ops->experts_free(gpu, gs), cpu->ops->experts_free(cpu, cs);
    route_free(gpu, &g), route_free(cpu, &c);
    for (int i = 0; i < 2; i++) gpu->ops->free(gpu, dxg[i]), gpu->ops->free(gpu, dye[i]), gpu->ops->free(gpu, dout[i]);
    gpu->ops->free(gpu, dl), gpu->ops->free(gpu, dxt);
    plain_batch_free(&pb);
    free(xt[0]), free(xt[1]), free(res), free(logits[0]), free(logits[1]), free(cxg), free(cye), free(cout);
    free_experts(&s);
}

static void test_graph(void) {
    static const int ns[] = {5, 80}; /* GEMV, tensor cores (tc_step) */
    static const struct {
        nb_dtype t;
        int group;
    } fs[] = {{NB_BF16, 0}, {NB_WINT8, 0}, {NB_WINT4, 128}, {NB_WINT2, QUANT_WINT2_GROUP}, {NB_FP8_B128, 0}};
    /* on a backend of its own, so that its scratch starts empty */
    nb_backend *shared = gpu;
    nb_err e = {{0}};
    nb_backend_opts o = {.device = "cuda"};
    gpu = backend_create(&o, &e);
    if (!gpu) {
        gpu = shared;
        CHECK(0, "a second cuda backend: %s", e.msg);
        return;
    }
    WHERE("graphs: setup");
    big_init();
    for (int f = 0; f < (int)(sizeof fs / sizeof fs[0]); f++)
        for (int i = 0; i < 2; i++)
            for (int whole = 0; whole < 2; whole++) graph_case(fs[f].t, fs[f].group, ns[i], whole);
    big_free();
    backend_destroy(gpu);
    gpu = shared;
}

int main(void) {
    if (gpu_tests_start()) TEST_DONE("test_cuda_moe");
    RUN(test_route);
    RUN(test_route_ties);
    RUN(test_gather_rows_dev);
    RUN(test_moe_combine);
    RUN(test_matmul_experts);
    RUN(test_graph);
    backend_destroy(gpu);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_moe");
}
