/* The mixture-of-experts ops of the CPU backend (kernels/cpu/cpu_moe.c),
 * which the CUDA backend is held to (tests/gpu/test_cuda_moe.c):
 *  - moe_route against a router written here (softmax and selection in
 *    double, on logits drawn so that no choice is within rounding of a
 *    tie) and against moe_route_ref bit for bit, for several expert counts,
 *    with and without a selection bias and renormalization (norm_min both
 *    below and above the chosen mass); exact ties, where the lower id must
 *    win; and every invariant of the grouped layout (groups, rows, slot)
 *    that matmul_experts and moe_combine rely on;
 *  - matmul_experts for every weight dtype against ops->matmul of each
 *    expert on its own rows, bit for bit (the CPU computes every output in
 *    one order whatever the rows around it), experts with no rows among
 *    them, the pad rows' products never written;
 *  - moe_combine against fmaf in k order, gather_rows_dev against
 *    gather_rows, bit for bit; a whole block (route, gather, experts,
 *    combine) against the same arithmetic token by token;
 *  - experts_recordable merely answers (the CPU records no graphs). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/backend.h"
#include "quant/quant.h"
#include "test.h"

static nb_backend *be; /* 3 threads: the threaded matmul paths */

static int irand(int n) { return (int)(urand() * n); } /* [0, n) */

static float *randn(size_t n, float scale) {
    float *p = xmalloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = gauss() * scale;
    return p;
}

/* ---- routing ------------------------------------------------------------- */

/* The router in double: softmax, the K best of p + bias picked one by one
 * (a strictly greater score replaces the best, so the lower id wins ties),
 * chosen[] in id order, weights p renormalized by max(sum, norm_min).
 * Returns the gap between the worst chosen score and the best one left
 * out: FP32 cannot choose otherwise when it is well above FP32 rounding. */
static double route_double(int E, int K, const float *logits, const float *bias, int norm, float norm_min,
                           int32_t *chosen, double *w) {
    double p[NB_MOE_MAX_EXPERTS], s[NB_MOE_MAX_EXPERTS], mx = -INFINITY, sum = 0;
    unsigned char taken[NB_MOE_MAX_EXPERTS] = {0};
    for (int x = 0; x < E; x++) mx = logits[x] > mx ? logits[x] : mx;
    for (int x = 0; x < E; x++) sum += p[x] = exp((double)logits[x] - mx);
    for (int x = 0; x < E; x++) p[x] /= sum, s[x] = p[x] + (bias ? bias[x] : 0.0);
    double worst_in = INFINITY, best_out = -INFINITY;
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int x = 0; x < E; x++)
            if (!taken[x] && (best < 0 || s[x] > s[best])) best = x;
        taken[best] = 1;
        if (s[best] < worst_in) worst_in = s[best];
    }
    double wsum = 0;
    for (int x = 0, k = 0; x < E; x++) {
        if (taken[x]) chosen[k] = x, wsum += w[k++] = p[x];
        else if (s[x] > best_out) best_out = s[x];
    }
    if (norm)
        for (int k = 0; k < K; k++) w[k] /= wsum > norm_min ? wsum : norm_min;
    return worst_in - best_out;
}

/* Every promise of moe_route's layout, given the experts chosen[n * K]
 * (per token, in id order) it must have picked. Returns the number of
 * violations and reports the first. */
static int check_layout(const int32_t *groups, const int32_t *rows, const int32_t *slot, const int32_t *chosen, int E,
                        int K, int n, const char *what) {
    int bad = 0, NK = n * K;
#define BAD(...)                                                        \
    do {                                                                \
        if (!bad++) {                                                   \
            fprintf(stderr, "  %s: ", what);                            \
            fprintf(stderr, __VA_ARGS__);                               \
            fputc('\n', stderr);                                        \
        }                                                               \
    } while (0)
    if (groups[0] != 0) BAD("groups[0] = %d, want 0", groups[0]);
    if (groups[E] != NK) BAD("groups[E] = %d, want n * K = %d", groups[E], NK);
    for (int x = 0; x < E; x++)
        if (groups[x + 1] < groups[x]) BAD("groups[%d] = %d > groups[%d] = %d", x, groups[x], x + 1, groups[x + 1]);
    if (bad) return bad; /* the ranges below would read out of bounds */
    int cnt[NB_MOE_MAX_EXPERTS] = {0}, active = 0;
    for (int i = 0; i < NK; i++) cnt[chosen[i]]++;
    for (int x = 0; x < E; x++) {
        if (groups[x + 1] - groups[x] != cnt[x])
            BAD("expert %d has %d rows, want %d", x, groups[x + 1] - groups[x], cnt[x]);
        if (cnt[x] && groups[E + 1] > active && groups[E + 2 + active] != x)
            BAD("active expert #%d is %d, want %d", active, groups[E + 2 + active], x);
        active += cnt[x] > 0;
    }
    if (groups[E + 1] != active) BAD("groups[E + 1] = %d experts with rows, want %d", groups[E + 1], active);
    if (bad) return bad;
    for (int x = 0; x < E; x++)
        for (int i = groups[x]; i < groups[x + 1]; i++) {
            int t = rows[i], has = 0;
            if (t < 0 || t >= n) {
                BAD("rows[%d] = %d, not a token", i, t);
                continue;
            }
            if (i > groups[x] && t <= rows[i - 1]) BAD("expert %d: rows[%d] = %d after %d", x, i, t, rows[i - 1]);
            for (int k = 0; k < K; k++) has |= chosen[t * K + k] == x;
            if (!has) BAD("rows[%d] = token %d in expert %d's range, which it did not choose", i, t, x);
        }
    for (int t = 0; t < n; t++)
        for (int k = 0; k < K; k++) {
            int s = slot[t * K + k], x = chosen[t * K + k];
            if (k && x <= chosen[t * K + k - 1]) BAD("token %d: the reference's experts are not in id order", t);
            if (s < 0 || s >= NK) BAD("slot[%d][%d] = %d out of range", t, k, s);
            else if (rows[s] != t) BAD("slot[%d][%d] = %d, whose token is %d", t, k, s, rows[s]);
            else if (s < groups[x] || s >= groups[x + 1])
                BAD("slot[%d][%d] = %d, outside expert %d's rows %d..%d", t, k, s, x, groups[x], groups[x + 1] - 1);
        }
#undef BAD
    return bad;
}

/* Runs moe_route on n tokens into poisoned buffers; the caller frees
 * groups, rows, slot, w. */
typedef struct routed {
    int32_t *groups, *rows, *slot;
    float *w;
} routed;

static routed run_route(const float *logits, int n, const nb_moe_route *r) {
    int E = r->n_experts, NK = n * r->n_used;
    routed o = {xmalloc(sizeof(int32_t) * NB_MOE_GROUPS(E)), xmalloc(sizeof(int32_t) * NK),
                xmalloc(sizeof(int32_t) * NK), xmalloc(sizeof(float) * NK)};
    memset(o.groups, 0xa5, sizeof(int32_t) * NB_MOE_GROUPS(E));
    memset(o.rows, 0xa5, sizeof(int32_t) * NK), memset(o.slot, 0xa5, sizeof(int32_t) * NK);
    memset(o.w, 0xff, sizeof(float) * NK);
    be->ops->moe_route(be, o.groups, o.rows, o.slot, o.w, logits, n, r);
    return o;
}

static void routed_free(routed *o) { free(o->groups), free(o->rows), free(o->slot), free(o->w); }

/* One case: the op against route_double (ids; weights to 1e-5) and
 * moe_route_ref (weights bit for bit), then the layout. Returns how many
 * tokens the bias moved off their unbiased choice. */
static int check_route(int E, int K, int n, int use_bias, int norm, float norm_min) {
    char what[128];
    snprintf(what, sizeof what, "moe_route E=%d K=%d n=%d%s norm=%d norm_min=%g", E, K, n, use_bias ? " bias" : "",
             norm, norm_min);
    float *bias = use_bias ? randn((size_t)E, 1.0f / (float)E) : NULL;
    float *logits = xmalloc(sizeof(float) * (size_t)n * E);
    int32_t *chosen = xmalloc(sizeof(int32_t) * (size_t)n * K), plain[NB_MOE_MAX_EXPERTS], rc[NB_MOE_MAX_EXPERTS];
    double *wd = xmalloc(sizeof(double) * (size_t)n * K);
    float rw[NB_MOE_MAX_EXPERTS];
    int moved = 0;
    for (int t = 0; t < n; t++) {
        float *l = logits + (size_t)t * E;
        double gap, gap_plain;
        do { /* redraw a token whose choice sits within 1e-5 of a tie */
            for (int x = 0; x < E; x++) l[x] = 2.0f * gauss();
            gap_plain = route_double(E, K, l, NULL, norm, norm_min, plain, wd + t * K);
            gap = route_double(E, K, l, bias, norm, norm_min, chosen + t * K, wd + t * K);
        } while (gap < 1e-5 || gap_plain < 1e-5);
        moved += memcmp(plain, chosen + t * K, sizeof(int32_t) * K) != 0;
    }
    nb_moe_route r = {E, K, norm, norm_min, bias};
    routed o = run_route(logits, n, &r);
    CHECK(check_layout(o.groups, o.rows, o.slot, chosen, E, K, n, what) == 0, "%s: layout (above)", what);
    int ref_bad = 0, w_bad = 0;
    for (int t = 0; t < n; t++) {
        moe_route_ref(&r, logits + (size_t)t * E, bias, rc, rw);
        ref_bad += memcmp(rc, chosen + t * K, sizeof(int32_t) * K) != 0;
        w_bad += memcmp(rw, o.w + t * K, sizeof(float) * K) != 0;
        for (int k = 0; k < K; k++) {
            double d = fabs(o.w[t * K + k] - wd[t * K + k]);
            if (!(d <= 1e-5 * wd[t * K + k] + 1e-30)) {
                if (!w_bad) fprintf(stderr, "  %s: token %d k %d: w %.9g, double %.9g\n", what, t, k, o.w[t * K + k],
                                    wd[t * K + k]);
                w_bad++;
            }
        }
    }
    CHECK(ref_bad == 0, "%s: moe_route_ref chose other experts than the double router for %d tokens", what, ref_bad);
    CHECK(w_bad == 0, "%s: %d weights off moe_route_ref's bits or the double router's value", what, w_bad);
    routed_free(&o);
    free(bias), free(logits), free(chosen), free(wd);
    return moved;
}

static void test_route(void) {
    static const int EK[][2] = {{8, 2}, {64, 6}, {128, 8}, {256, 8}};
    static const int ns[] = {1, 5, 37};
    int moved = 0;
    for (int c = 0; c < 4; c++)
        for (int i = 0; i < 3; i++)
            for (int b = 0; b < 2; b++) {
                moved += check_route(EK[c][0], EK[c][1], ns[i], b, 0, 0.0f);
                moved += check_route(EK[c][0], EK[c][1], ns[i], b, 1, 1e-20f);
                /* above the chosen mass of most tokens: the max() branch */
                moved += check_route(EK[c][0], EK[c][1], ns[i], b, 1, 0.6f);
            }
    check_route(8, 8, 5, 1, 1, 1e-20f); /* every expert used */
    CHECK(moved > 0, "the bias never changed a choice: the cases do not test it");
}

/* Exact ties: equal p + bias, where the lower id must win. */
static void test_route_ties(void) {
    static const struct {
        int E, K, n;
        float logit[8], bias[8]; /* logits repeat when E > 8 */
        int use_bias, want[6];
    } cs[] = {
        {8, 2, 5, {0}, {0}, 0, {0, 1}},                                   /* all equal */
        {8, 2, 3, {1, 3, 3, 3, 0, 0, 0, 0}, {0}, 0, {1, 2}},              /* three tied for first */
        {8, 3, 4, {0}, {0, 0, 0.1f, 0.1f, 0, 0, 0, 0}, 1, {0, 2, 3}},     /* the bias ties two, then p ties six */
        {8, 2, 2, {0, 0, 0, 0, 0, 0, 0, 5}, {0, 0, 0, 0, 0, 0, 0, -2}, 1, {0, 1}}, /* the bias drops the top p */
        {64, 6, 7, {0}, {0}, 0, {0, 1, 2, 3, 4, 5}},
    };
    for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++) {
        int E = cs[c].E, K = cs[c].K, n = cs[c].n;
        char what[64];
        snprintf(what, sizeof what, "ties case %zu (E=%d K=%d)", c, E, K);
        float *logits = xmalloc(sizeof(float) * (size_t)n * E), bias[64];
        for (int i = 0; i < n * E; i++) logits[i] = cs[c].logit[i % E % 8];
        for (int x = 0; x < E; x++) bias[x] = x < 8 ? cs[c].bias[x] : 0.0f;
        int32_t *chosen = xmalloc(sizeof(int32_t) * (size_t)n * K), rc[8];
        for (int t = 0; t < n; t++) memcpy(chosen + t * K, cs[c].want, sizeof(int32_t) * K);
        for (int norm = 0; norm < 2; norm++) {
            nb_moe_route r = {E, K, norm, 1e-20f, cs[c].use_bias ? bias : NULL};
            routed o = run_route(logits, n, &r);
            CHECK(check_layout(o.groups, o.rows, o.slot, chosen, E, K, n, what) == 0, "%s norm=%d (above)", what, norm);
            float rw[8];
            moe_route_ref(&r, logits, r.bias, rc, rw);
            CHECK(!memcmp(rc, cs[c].want, sizeof(int32_t) * K), "%s: moe_route_ref chose %d, %d...", what, rc[0],
                  rc[1]);
            for (int t = 0; t < n; t++)
                CHECK(!memcmp(rw, o.w + t * K, sizeof(float) * K), "%s norm=%d token %d: weights differ from the ref",
                      what, norm, t);
            if (c == 0) /* p = 1/8 exactly; renormalized, 1/2 */
                CHECK(o.w[0] == (norm ? 0.5f : 0.125f) && o.w[1] == o.w[0], "%s norm=%d: w %.9g %.9g", what, norm,
                      o.w[0], o.w[1]);
            routed_free(&o);
        }
        free(logits), free(chosen);
    }
}

/* ---- experts --------------------------------------------------------------- */

/* A host weight of dtype t ([N][K], random), as the loader hands it over. */
static nb_weight make_weight(nb_dtype t, int64_t N, int64_t K, int group) {
    size_t n = (size_t)(N * K);
    float *v = randn(n, 0.05f);
    nb_weight w = {.dtype = t, .rows = N, .cols = K, .group = group};
    if (t == NB_F32 || t == NB_BF16 || t == NB_F16) {
        void *data = xmalloc(n * nb_dtype_size(t));
        for (size_t i = 0; i < n; i++) {
            if (t == NB_BF16) ((uint16_t *)data)[i] = f32_to_bf16(v[i]);
            else if (t == NB_F16) ((uint16_t *)data)[i] = f32_to_f16(v[i]);
            else ((float *)data)[i] = v[i];
        }
        w.data = data;
    } else {
        size_t sb = quant_scale_bytes(t, N, K, group), s2b = quant_scale2_bytes(t, N);
        void *data = xmalloc(quant_data_bytes(t, N, K)), *scale = xmalloc(sb ? sb : 1);
        void *scale2 = s2b ? xmalloc(s2b) : NULL;
        nb_err e = {{0}};
        if (quant_pack(t, v, N, K, group, data, scale, scale2, &e)) {
            fprintf(stderr, "quant_pack %s [%lld, %lld] group %d: %s\n", nb_dtype_name(t), (long long)N, (long long)K,
                    group, e.msg);
            abort(); /* a shape this test chose: a bug in the test */
        }
        w.data = data, w.scale = scale, w.scale2 = scale2;
    }
    free(v);
    return w;
}

static void free_weight(nb_weight *w) { free((void *)w->data), free((void *)w->scale), free((void *)w->scale2); }

/* groups of E experts with cnt[x] rows each (the ids list too). */
static void make_groups(int32_t *groups, const int *cnt, int E) {
    groups[0] = 0;
    int active = 0;
    for (int x = 0; x < E; x++) {
        groups[x + 1] = groups[x] + cnt[x];
        if (cnt[x]) groups[E + 2 + active++] = x;
    }
    groups[E + 1] = active;
}

/* Each expert's rows of matmul_experts equal ops->matmul of that expert on
 * those rows, bit for bit; the NB_MOE_PAD_ROWS rows past n_rows of out
 * stay as they were. Row counts: random up to n_tokens, expert 0 full,
 * experts 1 and E - 1 empty. */
static void check_experts(nb_dtype t, int group, int64_t N, int64_t K, int E, int n_tokens) {
    char what[128];
    snprintf(what, sizeof what, "matmul_experts %s group %d N=%lld K=%lld E=%d n_tokens=%d", nb_dtype_name(t), group,
             (long long)N, (long long)K, E, n_tokens);
    nb_weight *w = xmalloc(sizeof(nb_weight) * (size_t)E);
    int cnt[64];
    for (int x = 0; x < E; x++) w[x] = make_weight(t, N, K, group), cnt[x] = irand(n_tokens + 1);
    cnt[0] = n_tokens, cnt[1] = 0, cnt[E - 1] = 0;
    int32_t groups[NB_MOE_GROUPS(64)];
    make_groups(groups, cnt, E);
    int n_rows = groups[E];
    size_t oo = (size_t)(n_rows + NB_MOE_PAD_ROWS) * (size_t)N;
    float *x = randn((size_t)(n_rows + NB_MOE_PAD_ROWS) * (size_t)K, 1.0f);
    float *out = xmalloc(sizeof(float) * oo), *ref = xmalloc(sizeof(float) * oo);
    memset(out, 0xff, sizeof(float) * oo); /* NaN: rows left unwritten fail */
    void *set = be->ops->experts_create(be, w, E);
    REQUIRE(set != NULL, "%s: experts_create returned NULL", what);
    be->ops->matmul_experts(be, out, x, set, groups, n_tokens, n_rows);
    for (int e = 0; e < E; e++) {
        if (!cnt[e]) continue;
        size_t g0 = (size_t)groups[e];
        be->ops->matmul(be, ref + g0 * N, x + g0 * K, &w[e], cnt[e]);
        size_t bad = 0, no = (size_t)cnt[e] * N;
        for (size_t i = 0; i < no; i++) bad += memcmp(out + g0 * N + i, ref + g0 * N + i, sizeof(float)) != 0;
        CHECK(bad == 0, "%s: expert %d (%d rows from %zu): %zu of %zu values differ from matmul", what, e, cnt[e], g0,
              bad, no);
    }
    size_t touched = 0;
    for (size_t i = (size_t)n_rows * N; i < oo; i++) touched += ((uint32_t *)out)[i] != 0xffffffffu;
    CHECK(touched == 0, "%s: %zu values written past the n_rows = %d rows", what, touched, n_rows);
    be->ops->experts_free(be, set);
    for (int e = 0; e < E; e++) free_weight(&w[e]);
    free(w), free(x), free(out), free(ref);
}

static void test_matmul_experts(void) {
    static const struct {
        nb_dtype t;
        int group;
    } ds[] = {{NB_F32, 0},   {NB_BF16, 0},  {NB_F16, 0},   {NB_WINT8, 0},   {NB_WINT4, 128},
              {NB_WINT4, 0}, {NB_WINT2, 64}, {NB_FP8_B128, 0}};
    static const int64_t NK[][2] = {{33, 128}, {96, 256}};
    static const int ns[] = {1, 5, 37};
    for (size_t d = 0; d < sizeof ds / sizeof ds[0]; d++)
        for (int s = 0; s < 2; s++)
            for (int i = 0; i < 3; i++) {
                int group = ds[d].t == NB_WINT4 && !ds[d].group ? (int)NK[s][1] : ds[d].group; /* 0: per channel */
                check_experts(ds[d].t, group, NK[s][0], NK[s][1], 8, ns[i]);
            }
    check_experts(NB_BF16, 0, 17, 64, 64, 3); /* many experts, most empty */
}

/* ---- combine, gather ------------------------------------------------------ */

static void test_moe_combine(void) {
    static const int colss[] = {1, 17, 300};
    static const int ns[] = {1, 6, 37};
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < 3; i++) {
            int E = 8, K = 3, n = ns[i], cols = colss[c];
            float *logits = randn((size_t)n * E, 2.0f);
            nb_moe_route r = {E, K, 1, 1e-20f, NULL};
            routed o = run_route(logits, n, &r); /* a real slot permutation */
            float *ye = randn((size_t)n * K * cols, 1.0f), *out = randn((size_t)n * cols, 1.0f);
            float *ref = xmalloc(sizeof(float) * (size_t)n * cols);
            memcpy(ref, out, sizeof(float) * (size_t)n * cols);
            for (int t = 0; t < n; t++)
                for (int k = 0; k < K; k++)
                    for (int j = 0; j < cols; j++) {
                        const float *y = ye + (size_t)o.slot[t * K + k] * cols;
                        ref[t * cols + j] = fmaf(o.w[t * K + k], y[j], ref[t * cols + j]);
                    }
            be->ops->moe_combine(be, out, ye, o.slot, o.w, n, K, cols);
            CHECK(!memcmp(out, ref, sizeof(float) * (size_t)n * cols), "moe_combine n=%d K=%d cols=%d", n, K, cols);
            routed_free(&o);
            free(logits), free(ye), free(out), free(ref);
        }
}

static void test_gather_rows_dev(void) {
    static const int colss[] = {1, 17, 4096};
    static const int32_t rows[9] = {49, 0, 7, 7, 23, 1, 48, 0, 30};
    for (int c = 0; c < 3; c++)
        for (int n = 1; n <= 9; n += 8) {
            int cols = colss[c];
            float *x = randn((size_t)50 * cols, 1.0f), *a = xmalloc(sizeof(float) * n * cols),
                  *g = xmalloc(sizeof(float) * n * cols);
            be->ops->gather_rows(be, a, x, rows, n, cols);
            be->ops->gather_rows_dev(be, g, x, rows, n, cols);
            CHECK(!memcmp(a, g, sizeof(float) * n * cols), "gather_rows_dev cols=%d rows=%d", cols, n);
            free(x), free(a), free(g);
        }
}

/* A block as model_moe.c runs it (route, gather the tokens' rows into
 * expert order, the experts, combine onto the residual) against each
 * token alone: one-row matmuls of its chosen experts, fmaf in id order.
 * The CPU's rows do not depend on their neighbours: bit for bit. */
static void test_block(void) {
    enum { E = 8, K = 2, H = 64, D = 48, n = 37 };
    nb_weight w[E];
    for (int x = 0; x < E; x++) w[x] = make_weight(NB_BF16, D, H, 0);
    float *xt = randn((size_t)n * H, 1.0f), *logits = randn((size_t)n * E, 2.0f), *bias = randn(E, 0.1f);
    nb_moe_route r = {E, K, 1, 1e-20f, bias};
    routed o = run_route(logits, n, &r);
    float *xg = xcalloc((size_t)(n * K + NB_MOE_PAD_ROWS) * H, sizeof(float));
    float *ye = xmalloc(sizeof(float) * (size_t)n * K * D), *out = randn((size_t)n * D, 1.0f);
    float *ref = xmalloc(sizeof(float) * (size_t)n * D), y1[D];
    memcpy(ref, out, sizeof(float) * (size_t)n * D);
    void *set = be->ops->experts_create(be, w, E);
    be->ops->gather_rows_dev(be, xg, xt, o.rows, n * K, H);
    be->ops->matmul_experts(be, ye, xg, set, o.groups, n, n * K);
    be->ops->moe_combine(be, out, ye, o.slot, o.w, n, K, D);
    for (int t = 0; t < n; t++) {
        int32_t chosen[K];
        float wk[K];
        moe_route_ref(&r, logits + t * E, bias, chosen, wk);
        for (int k = 0; k < K; k++) {
            be->ops->matmul(be, y1, xt + t * H, &w[chosen[k]], 1);
            for (int j = 0; j < D; j++) ref[t * D + j] = fmaf(wk[k], y1[j], ref[t * D + j]);
        }
    }
    size_t bad = 0;
    for (int i = 0; i < n * D; i++) bad += memcmp(out + i, ref + i, sizeof(float)) != 0;
    CHECK(bad == 0, "block of %d tokens: %zu of %d outputs differ from the token-by-token arithmetic", n, bad, n * D);
    be->ops->experts_free(be, set);
    routed_free(&o);
    for (int x = 0; x < E; x++) free_weight(&w[x]);
    free(xt), free(logits), free(bias), free(xg), free(ye), free(out), free(ref);
}

static void test_recordable(void) {
    nb_weight w[4];
    for (int x = 0; x < 4; x++) w[x] = make_weight(NB_WINT4, 16, 128, 128);
    void *set = be->ops->experts_create(be, w, 4);
    int r1 = be->ops->experts_recordable(be, set, 1), r2 = be->ops->experts_recordable(be, set, 300);
    CHECK((r1 == 0 || r1 == 1) && (r2 == 0 || r2 == 1), "experts_recordable answered %d, %d", r1, r2);
    CHECK(be->ops->records_graphs == 0, "the cpu backend claims to record graphs");
    be->ops->experts_free(be, set);
    for (int x = 0; x < 4; x++) free_weight(&w[x]);
}

static void test_ops_present(void) {
    const nb_backend_ops *o = be->ops;
    CHECK(o->gather_rows_dev && o->moe_route && o->experts_create && o->experts_free && o->matmul_experts &&
              o->experts_recordable && o->moe_combine,
          "the cpu backend lacks a mixture-of-experts op");
}

int main(void) {
    nb_err e;
    be = cpu_backend_create(3, &e);
    if (!be) {
        fprintf(stderr, "backend: %s\n", e.msg);
        return 1;
    }
    RUN(test_ops_present);
    if (t_failed) TEST_DONE("moe_ops");
    RUN(test_route);
    RUN(test_route_ties);
    RUN(test_matmul_experts);
    RUN(test_moe_combine);
    RUN(test_gather_rows_dev);
    RUN(test_block);
    RUN(test_recordable);
    backend_destroy(be);
    TEST_DONE("moe_ops");
}
