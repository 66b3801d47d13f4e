/* The CUDA backend's weight-only quantized matmul against the CPU
 * reference quant_matmul_ref (dequantize, then FP32 matmul), for NB_WINT8,
 * NB_WINT4 (group 128, per channel, and the other groups quant_check
 * allows: 64 as the fixtures get, 16, 48) and NB_WINT2 (`make test-gpu`;
 * `make test` only builds this). Weights are random FP32 packed on the host
 * with quant_pack; data, scale and scale2 go to the GPU with
 * ops->weight_load, byte for byte, as the model loader does. Two paths:
 *  - weights left in quant.h's layout (cuda_wint.cu: GEMV for M <= 16, the
 *    shared-memory BF16 tile kernel above; what a mixture's experts and
 *    the shapes the tensor-core layout refuses always take). Every shape runs M in
 *    {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 257}, N odd or 1, K at
 *    the edges each kernel has (not a multiple of the 64-column tile,
 *    packed rows that are not whole 16-byte chunks);
 *  - weights then passed through ops->weight_pack, as the model loader
 *    does, into the tensor-core layout (quant/quant_tc.h, cuda_wint_tc.cu)
 *    for WINT8, WINT4 group 128 and per channel and the other groups the
 *    layout takes, and WINT2: M in {1, 2, 3, 5, 8, 16, 17, 33, 64, 129} (each block
 *    shape, its edges, split K), N odd, K with a partial last stage;
 *    weight_pack must report the resident bytes and leave refused shapes
 *    as they were.
 * Bounds (max |diff| against max |ref|):
 *  - quant.h layout, M <= 16 (GEMV, FP32 activations, each q exact, the
 *    scale applied to a run's sum): only the order and grouping of FP32
 *    roundings differ: 1e-4 (+ 1e-6 absolute);
 *  - everything on tensor cores (activations, and grouped WINT4's scaled
 *    weights, rounded to BF16): 2e-2 (expected ~2e-3).
 * Outputs are poisoned with NaN before each run, so an element the GPU
 * leaves unwritten fails. Ends with products recorded in CUDA graphs and
 * replayed on new inputs, after a larger product has outgrown the scratch
 * the recordings point at, on both paths. Needs a CUDA device; fails (not
 * skips) without one. */
#include <pthread.h>

#include "quant/quant.h"
#include "quant/quant_tc.h"
#include "tests/gpu/gpu_test.h"

#define M_MAX 257
#define REF_THREADS 8

static const int MS[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 257};
#define N_MS ((int)(sizeof MS / sizeof MS[0]))
/* the tensor-core layout's sweep: 16 | 64 | 128-row blocks and their edges */
static const int MS_TC[] = {1, 2, 3, 5, 8, 16, 17, 33, 64, 129};
#define N_MS_TC ((int)(sizeof MS_TC / sizeof MS_TC[0]))

/* A packed weight: host bytes (c) and their device copies (g). */
typedef struct qweight {
    nb_weight c, g;
} qweight;

/* pack: load it as the model loader does (backend_weight_load: the
 * tensor-core layout where the shape takes it); else as it is. */
static qweight make_qweight(nb_dtype t, int64_t N, int64_t K, int group, int pack) {
    qweight q;
    memset(&q, 0, sizeof q);
    float *w = randn((size_t)(N * K), 0.05f);
    size_t db = quant_data_bytes(t, N, K), sb = quant_scale_bytes(t, N, K, group), s2b = quant_scale2_bytes(t, N);
    void *data = xmalloc(db), *scale = xmalloc(sb ? sb : 1), *scale2 = s2b ? xmalloc(s2b) : NULL;
    nb_err e = {{0}};
    if (quant_pack(t, w, N, K, group, data, scale, scale2, &e)) {
        fprintf(stderr, "quant_pack %s [%lld, %lld] group %d: %s\n", nb_dtype_name(t), (long long)N, (long long)K,
                group, e.msg);
        abort(); /* a shape this test chose: a bug in the test */
    }
    free(w);
    q.c = (nb_weight){.dtype = t, .rows = N, .cols = K, .data = data, .scale = scale, .scale2 = scale2, .group = group};
    q.g = q.c;
    if (pack) {
        nb_err ce;
        int takes = quant_tc_check(&q.c, &ce) == 0;
        CHECK(gpu->ops->weight_pack, "the cuda backend has no weight_pack");
        size_t bytes = backend_weight_load(gpu, &q.g);
        CHECK(bytes == quant_weight_bytes(&q.g), "backend_weight_load reports %zu resident bytes, quant_weight_bytes %zu",
              bytes, quant_weight_bytes(&q.g));
        CHECK(q.g.data != q.c.data && q.g.scale != q.c.scale, "%s [%lld, %lld]: still host pointers", nb_dtype_name(t),
              (long long)N, (long long)K);
        if (takes)
            CHECK(q.g.layout == NB_LAYOUT_TC, "%s [%lld, %lld] group %d was not repacked", nb_dtype_name(t),
                  (long long)N, (long long)K, group);
        else
            CHECK(q.g.layout == NB_LAYOUT_PLAIN && bytes == quant_weight_bytes(&q.c),
                  "%s [%lld, %lld] group %d: refused (%s) but changed", nb_dtype_name(t), (long long)N, (long long)K,
                  group, ce.msg);
    } else {
        q.g.data = gpu->ops->weight_load(gpu, data, db);
        q.g.scale = gpu->ops->weight_load(gpu, scale, sb);
        q.g.scale2 = s2b ? gpu->ops->weight_load(gpu, scale2, s2b) : NULL;
    }
    return q;
}

static void free_qweight(qweight *q) {
    gpu->ops->weight_free(gpu, q->g.data);
    gpu->ops->weight_free(gpu, q->g.scale);
    if (q->g.scale2) gpu->ops->weight_free(gpu, q->g.scale2);
    free((void *)q->c.data), free((void *)q->c.scale), free((void *)q->c.scale2);
}

/* ---- the reference, on threads --------------------------------------------- */

typedef struct ref_job {
    float *out;
    const float *x;
    nb_weight w;
    int M;
} ref_job;

static void *ref_worker(void *p) {
    ref_job *j = p;
    quant_matmul_ref(j->out, j->x, &j->w, j->M);
    return NULL;
}

/* quant_matmul_ref over slices of w's rows on REF_THREADS threads (the
 * layouts are row-major, so a slice is w at an offset). Each output is the
 * reference's own sum, whichever thread computes it. */
static void ref_matmul(float *out, const float *x, const nb_weight *w, int M) {
    int64_t N = w->rows, K = w->cols;
    int nt = N < REF_THREADS ? (int)N : REF_THREADS;
    pthread_t th[REF_THREADS];
    ref_job jobs[REF_THREADS];
    for (int i = 0; i < nt; i++) {
        int64_t n0 = N * i / nt, n1 = N * (i + 1) / nt;
        nb_weight s = *w;
        s.rows = n1 - n0;
        s.data = (const uint8_t *)w->data + quant_data_bytes(w->dtype, n0, K);
        s.scale = (const uint8_t *)w->scale + quant_scale_bytes(w->dtype, n0, K, w->group);
        s.scale2 = w->scale2 ? (const uint8_t *)w->scale2 + quant_scale2_bytes(w->dtype, n0) : NULL;
        jobs[i] = (ref_job){xmalloc(sizeof(float) * (size_t)M * (size_t)s.rows), x, s, M};
        if (pthread_create(&th[i], NULL, ref_worker, &jobs[i])) abort();
    }
    for (int i = 0; i < nt; i++) {
        pthread_join(th[i], NULL);
        int64_t n0 = N * i / nt, rows = jobs[i].w.rows;
        for (int m = 0; m < M; m++)
            memcpy(out + (size_t)m * N + n0, jobs[i].out + (size_t)m * rows, sizeof(float) * (size_t)rows);
        free(jobs[i].out);
    }
}

/* ---- comparison -------------------------------------------------------------- */

/* max |got - ref| (NaN if got has one), and max |ref| in *ref_max. */
static double max_diff(const float *got, const float *ref, size_t n, double *ref_max) {
    double d = 0, r = 0;
    *ref_max = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        if (isnan(e)) return NAN;
        if (e > d) d = e;
        if (fabs(ref[i]) > r) r = fabs(ref[i]);
    }
    *ref_max = r;
    return d;
}

static double abs_max(const float *v, size_t n) {
    double r = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(v[i]) > r) r = fabs(v[i]);
    return r;
}

/* Whether w's product at M rounds activations to BF16 (tensor cores). */
static int bf16_path(const nb_weight *w, int M) { return M > 16 || w->layout == NB_LAYOUT_TC; }

/* Checks M rows of got against ref under the bound of the path the
 * product took; returns the error relative to max |ref| for the summary.
 * BF16 bounds scale with max |ref| over these rows or, if larger,
 * scale_floor (the largest output over all reference rows): a few rows,
 * or one output column, can be small by cancellation while BF16 rounding
 * errors follow the size of the terms. */
static double check_rows(const float *got, const float *ref, int M, int64_t N, int bf16, double scale_floor,
                         const char *what) {
    double rmax, d = max_diff(got, ref, (size_t)M * (size_t)N, &rmax);
    double scale = rmax > scale_floor ? rmax : scale_floor;
    double bound = bf16 ? 2e-2 * scale : 1e-4 * rmax + 1e-6;
    CHECK(d <= bound, "%s: max |diff| %.3g > %.3g (max |ref| %.3g)", what, d, bound, scale);
    return scale > 0 ? d / scale : d;
}

/* The tensor-core layout's arithmetic, emulated in double for `rows` rows
 * of x: activations rounded to BF16 (nearest even, as the kernel's
 * conversion), times the weights (per-row scale: q * s, exact in FP32;
 * grouped WINT4: bf16(q * s), as the kernel's BF16 multiply), summed. Into
 * em the sums, into ab the sums of |term|. The kernel may differ from em
 * only by FP32 accumulation (and the final scale multiply). */
static void tc_emulated(double *em, double *ab, const float *x, const nb_weight *w, int rows) {
    int64_t N = w->rows, K = w->cols;
    float *xb = xmalloc(sizeof(float) * (size_t)(rows * K)), *wr = xmalloc(sizeof(float) * (size_t)K);
    for (int64_t i = 0; i < rows * K; i++) xb[i] = bf16_to_f32(f32_to_bf16(x[i]));
    for (int64_t n = 0; n < N; n++) {
        quant_dequant_row(w, n, wr);
        if (quant_tc_grouped(w))
            for (int64_t k = 0; k < K; k++) wr[k] = quant_round_bf16(wr[k]);
        for (int m = 0; m < rows; m++) {
            double sum = 0, abs_sum = 0;
            for (int64_t k = 0; k < K; k++) {
                double t = (double)xb[m * K + k] * wr[k];
                sum += t, abs_sum += fabs(t);
            }
            em[(size_t)m * N + n] = sum, ab[(size_t)m * N + n] = abs_sum;
        }
    }
    free(xb), free(wr);
}

/* got against the emulation: |diff| <= 2^-12 sum |term| per output, room
 * for FP32 accumulation even where the tensor cores truncate (K 4096: ~4e-6
 * of it) yet far below one BF16 rounding of the weights or activations too
 * many or too few (~2^-9 of a term). Returns the worst |diff| / sum |term|. */
static double check_tc_exact(const float *got, const double *em, const double *ab, int M, int64_t N,
                             const char *what) {
    double worst = 0;
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < (size_t)M * (size_t)N; i++) {
        double d = fabs((double)got[i] - em[i]), r = ab[i] > 0 ? d / ab[i] : d;
        if (isnan(d) || d > 0x1p-12 * ab[i] + 1e-30) {
            if (!bad++) first = i;
        }
        if (isnan(r) || r > worst) worst = isnan(r) ? INFINITY : r;
    }
    CHECK(bad == 0,
          "%s: %zu outputs off the emulated BF16 arithmetic, first [%zu][%zu]: %.8g, want %.8g (sum |term| %.4g)", what,
          bad, first / (size_t)N, first % (size_t)N, got[first], em[first], ab[first]);
    return worst;
}

typedef struct shape {
    int64_t N, K;
    int group; /* WINT4: 0 = per channel (group K); ignored otherwise */
} shape;

/* Every M of a sweep (MS, or MS_TC when pack) on one weight; worst[0] for
 * FP32 activations, worst[1] for BF16; weights in the tensor-core layout
 * are also held to tc_emulated (worst[2]). */
static void check_shape(nb_dtype t, shape s, double worst[3], int pack) {
    const int *ms = pack ? MS_TC : MS, n_ms = pack ? N_MS_TC : N_MS;
    int group = t == NB_WINT4 ? (s.group ? s.group : (int)s.K) : t == NB_WINT2 ? QUANT_WINT2_GROUP : 0;
    WHERE("%s N=%lld K=%lld group %d: packing", nb_dtype_name(t), (long long)s.N, (long long)s.K, group);
    qweight w = make_qweight(t, s.N, s.K, group, pack);
    size_t xo = (size_t)M_MAX * (size_t)s.K, oo = (size_t)M_MAX * (size_t)s.N;
    float *x = randn(xo, 1.0f), *ref = xmalloc(sizeof(float) * oo), *got = xmalloc(sizeof(float) * oo);
    /* row m of the product depends on row m of x only: one reference of
     * M_MAX rows serves every M */
    ref_matmul(ref, x, &w.c, M_MAX);
    const double ref_floor = abs_max(ref, oo);
    const int tc = w.g.layout == NB_LAYOUT_TC, tc_rows = MS_TC[N_MS_TC - 1];
    double *em = NULL, *ab = NULL;
    if (tc) {
        em = xmalloc(sizeof(double) * (size_t)tc_rows * (size_t)s.N);
        ab = xmalloc(sizeof(double) * (size_t)tc_rows * (size_t)s.N);
        tc_emulated(em, ab, x, &w.c, tc_rows);
    }
    unsigned char *poison = xmalloc(sizeof(float) * oo);
    memset(poison, 0xff, sizeof(float) * oo);
    float *dx = to_gpu(x, sizeof(float) * xo), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo);
    for (int i = 0; i < n_ms; i++) {
        int M = ms[i], bf16 = bf16_path(&w.g, M);
        size_t no = (size_t)M * (size_t)s.N;
        WHERE("%s N=%lld K=%lld group %d M=%d%s", nb_dtype_name(t), (long long)s.N, (long long)s.K, group, M,
              tc ? " (tensor-core layout)" : "");
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        gpu->ops->matmul(gpu, dout, dx, &w.g, M);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        note_worst(&worst[bf16], check_rows(got, ref, M, s.N, bf16, ref_floor, t_where));
        if (tc) note_worst(&worst[2], check_tc_exact(got, em, ab, M, s.N, t_where));
    }
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout);
    free(x), free(ref), free(got), free(poison), free(em), free(ab);
    free_qweight(&w);
}

/* The shapes of the issue: N odd (or 1), K multiples of every group here. */
static const shape COMMON[] = {{1, 128, 0},   {7, 256, 0},    {33, 384, 0},  {130, 512, 0},
                               {257, 1024, 0}, {4099, 4096, 0}, {1000, 4096, 0}};
#define N_COMMON ((int)(sizeof COMMON / sizeof COMMON[0]))

static void run_shapes(nb_dtype t, int group, const shape *extra, int n_extra, const char *name) {
    double worst[3] = {0, 0, 0};
    for (int i = 0; i < N_COMMON; i++) {
        shape s = COMMON[i];
        s.group = group;
        check_shape(t, s, worst, 0);
    }
    for (int i = 0; i < n_extra; i++) check_shape(t, extra[i], worst, 0);
    printf("  %-16s worst max|diff| / max|ref|: %.2e for M <= 16 (FP32 activations), %.2e above (BF16)\n", name,
           worst[0], worst[1]);
}

static void test_wint8(void) {
    /* K = 144: a last K tile of 16 columns on the tensor cores; K = 100 and
     * 1: rows of no whole 16-byte chunk (byte loads, GEMV for every M) */
    static const shape extra[] = {{65, 144, 0}, {9, 100, 0}, {3, 1, 0}};
    run_shapes(NB_WINT8, 0, extra, 3, "wint8");
}

static void test_wint4_g128(void) { run_shapes(NB_WINT4, 128, NULL, 0, "wint4 group 128"); }

static void test_wint4_per_channel(void) {
    /* K = 160: whole chunks, a last K tile of 32 columns; K = 200, 72, 2:
     * packed rows of 100, 36, 1 bytes (byte loads, GEMV for every M) */
    static const shape extra[] = {{65, 160, 0}, {5, 200, 0}, {33, 72, 0}, {17, 2, 0}};
    run_shapes(NB_WINT4, 0, extra, 4, "wint4 per channel");
}

/* Groups other than 128 and K: 64 (what a K = 192 fixture layer gets), 16
 * and 48 (two scales in one 16-byte chunk, 48 not a power of two), 32 with
 * K = 96 (a last K tile of 32 columns), 192 (the kernels divide by the
 * group by multiply-high: a divisor that is not a power of two, over a
 * long row). */
static void test_wint4_groups(void) {
    static const shape s[] = {{65, 192, 64}, {33, 256, 16}, {7, 384, 48}, {130, 96, 32}, {257, 1024, 64}, {9, 4224, 192}};
    double worst[3] = {0, 0, 0};
    for (int i = 0; i < 6; i++) check_shape(NB_WINT4, s[i], worst, 0);
    printf("  %-16s worst max|diff| / max|ref|: %.2e for M <= 16, %.2e above\n", "wint4 groups", worst[0], worst[1]);
}

static void test_wint2(void) {
    static const shape extra[] = {{19, 64, 0}, {70, 192, 0}};
    run_shapes(NB_WINT2, 0, extra, 2, "wint2");
}

/* ---- the tensor-core layout (weight_pack) ------------------------------------ */

/* N odd (or 1; 33: one chunk, the block's second empty; 65: a chunk of one
 * row), K with a partial last pipeline stage (144: 9 k-steps) and K long
 * enough for many K splits at few tiles (130 x 4096). */
static const shape TC_SHAPES[] = {{1, 128, 0},   {7, 256, 0},   {33, 144, 0},  {65, 1024, 0},
                                  {130, 512, 0}, {257, 384, 0}, {130, 4096, 0}, {1000, 2048, 0}};
#define N_TC_SHAPES ((int)(sizeof TC_SHAPES / sizeof TC_SHAPES[0]))

static void run_tc_shapes(nb_dtype t, int group, const char *name) {
    double worst[3] = {0, 0, 0};
    for (int i = 0; i < N_TC_SHAPES; i++) {
        shape s = TC_SHAPES[i];
        if (group && s.K % group) continue; /* group 128: K = 144 has no whole groups */
        s.group = group;
        check_shape(t, s, worst, 1);
    }
    printf("  %-16s worst max|diff| / max|ref|: %.2e (BF16 activations, every M); off the emulated BF16 "
           "arithmetic: %.2e of sum |term|\n",
           name, worst[1], worst[2]);
}

static void test_tc_wint8(void) { run_tc_shapes(NB_WINT8, 0, "tc wint8"); }
static void test_tc_wint4_g128(void) { run_tc_shapes(NB_WINT4, 128, "tc wint4 g128"); }
static void test_tc_wint4_per_channel(void) { run_tc_shapes(NB_WINT4, 0, "tc wint4 channel"); }
/* WINT2 also with K = 64 and 192: half of the small shape's 128-column
 * stage, and one and a half (a last stage whose second group is past K). */
static void test_tc_wint2(void) {
    run_tc_shapes(NB_WINT2, QUANT_WINT2_GROUP, "tc wint2");
    double worst[3] = {0, 0, 0};
    check_shape(NB_WINT2, (shape){19, 64, 0}, worst, 1);
    check_shape(NB_WINT2, (shape){70, 192, 0}, worst, 1);
    printf("  %-16s worst max|diff| / max|ref|: %.2e; off the emulated BF16 arithmetic: %.2e of sum |term|\n",
           "tc wint2 K 64/192", worst[1], worst[2]);
}

/* The other groups the layout takes (powers of two): 64 (a fixture's
 * K = 192 and stages of 32 columns inside one group), 16 and 32 (several
 * groups per stage), 256 and 512 (a group over several stages); per
 * channel with K = 160 (a fixture's MLP). Then shapes weight_pack must
 * leave alone (make_qweight checks that), still right on the old kernels:
 * groups 48 and 192, per channel with K = 200. */
static void test_tc_groups_and_refusals(void) {
    static const shape s[] = {{65, 192, 64}, {33, 256, 16}, {7, 512, 32}, {130, 768, 256}, {9, 1024, 512}, {65, 160, 0}};
    double worst[3] = {0, 0, 0};
    for (int i = 0; i < 6; i++) check_shape(NB_WINT4, s[i], worst, 1);
    printf("  %-16s worst max|diff| / max|ref|: %.2e; off the emulated BF16 arithmetic: %.2e of sum |term|\n",
           "tc wint4 groups", worst[1], worst[2]);
    static const shape refused[] = {{7, 384, 48}, {9, 576, 192}, {5, 200, 0}};
    for (int i = 0; i < 3; i++) check_shape(NB_WINT4, refused[i], worst, 1);
}

/* Activations 4 bytes off 16-byte alignment: the GEMV kernel's byte path
 * for shapes that would take 16-byte chunks, whatever the format; the
 * tensor-core layout's scalar activation loads. */
static void test_unaligned_x(void) {
    static const nb_dtype ts[] = {NB_WINT8, NB_WINT4, NB_WINT2, NB_WINT8, NB_WINT4, NB_WINT2};
    static const int Ms[] = {1, 5, 16, 40, 100};
    for (int i = 0; i < 6; i++) {
        int64_t N = 33, K = 256;
        int group = ts[i] == NB_WINT4 ? 128 : ts[i] == NB_WINT2 ? QUANT_WINT2_GROUP : 0, pack = i >= 3;
        WHERE("unaligned x %s%s", nb_dtype_name(ts[i]), pack ? " (packed)" : "");
        qweight w = make_qweight(ts[i], N, K, group, pack);
        size_t xo = 100 * (size_t)K, oo = 100 * (size_t)N;
        float *x = randn(xo, 1.0f), *ref = xmalloc(sizeof(float) * oo), *got = xmalloc(sizeof(float) * oo);
        ref_matmul(ref, x, &w.c, 100);
        float *dbuf = gpu->ops->alloc(gpu, sizeof(float) * (xo + 1)), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo);
        gpu->ops->upload(gpu, dbuf + 1, x, sizeof(float) * xo);
        for (int j = 0; j < (pack ? 5 : 3); j++) {
            WHERE("unaligned x %s%s M=%d", nb_dtype_name(ts[i]), pack ? " (packed)" : "", Ms[j]);
            gpu->ops->matmul(gpu, dout, dbuf + 1, &w.g, Ms[j]);
            gpu->ops->download(gpu, got, dout, sizeof(float) * (size_t)Ms[j] * N);
            check_rows(got, ref, Ms[j], N, bf16_path(&w.g, Ms[j]), abs_max(ref, oo), t_where);
        }
        gpu->ops->free(gpu, dbuf), gpu->ops->free(gpu, dout);
        free(x), free(ref), free(got);
        free_qweight(&w);
    }
}

/* ---- matmul_silu ------------------------------------------------------------------ */

/* matmul_silu on weights in the tensor-core layout: up to 4 rows the
 * kernel makes silu(gate) * up as it loads its activations (the values
 * silu_mul writes), so the product must equal silu_mul then matmul bit for
 * bit, for every format; gate|up rows in one buffer (ld = 2K) or apart
 * (ld = K, and 4 floats off 16-byte alignment: the scalar loads); K = 144
 * (WINT2: 192) has a short last stage. 5 rows, and a weight in quant.h's layout, are
 * declined (1) with nothing written. */
static void test_tc_matmul_silu(void) {
    static const nb_dtype ts[] = {NB_WINT8, NB_WINT4, NB_WINT4, NB_WINT2};
    static const int grouped[] = {0, 1, 0, 0};
    static const int64_t Ks[] = {256, 144};
    static const int Ms[] = {1, 3, 4};
    enum { N = 130, ROWS = 5 };
    for (int fi = 0; fi < 4; fi++)
        for (int ki = 0; ki < 2; ki++) {
            const nb_dtype t = ts[fi];
            const int64_t K = t == NB_WINT2 && ki ? 192 : Ks[ki]; /* WINT2: whole groups of 64 */
            if (grouped[fi] && K % 128) continue;
            const int group = t == NB_WINT4 ? (grouped[fi] ? 128 : (int)K) : t == NB_WINT2 ? QUANT_WINT2_GROUP : 0;
            qweight w = make_qweight(t, N, K, group, 1);
            REQUIRE(w.g.layout == NB_LAYOUT_TC, "%s [%d, %lld] not repacked", nb_dtype_name(t), N, (long long)K);
            const size_t xn = (size_t)ROWS * 2 * (size_t)K + 4;
            float *gu = randn(xn, 2.0f), *dgu = to_gpu(gu, sizeof(float) * xn);
            float *dact = gpu->ops->alloc(gpu, sizeof(float) * ROWS * (size_t)K);
            float *dref = gpu->ops->alloc(gpu, sizeof(float) * ROWS * N);
            float *dout = gpu->ops->alloc(gpu, sizeof(float) * ROWS * N);
            for (int fused = 0; fused < 2; fused++) {
                const int ld = fused ? 2 * (int)K : (int)K;
                const float *g = fused ? dgu : dgu + 4, *u = fused ? dgu + K : dgu + 4 + (size_t)ROWS * K;
                for (int i = 0; i < 3; i++) {
                    const int M = Ms[i];
                    WHERE("tc matmul_silu %s%s K=%lld M=%d ld=%d", nb_dtype_name(t), grouped[fi] ? " g128" : "",
                          (long long)K, M, ld);
                    check_matmul_silu(dout, dref, dact, g, u, ld, &w.g, M);
                }
            }
            WHERE("tc matmul_silu %s, 5 rows", nb_dtype_name(t));
            check_matmul_silu_declined(dout, dgu, dgu + K, 2 * (int)K, &w.g, ROWS, t_where);
            gpu->ops->free(gpu, dgu), gpu->ops->free(gpu, dact), gpu->ops->free(gpu, dref), gpu->ops->free(gpu, dout);
            free(gu);
            free_qweight(&w);
        }
    /* quant.h's layout (the GEMV's): declined */
    qweight w = make_qweight(NB_WINT4, N, 256, 128, 0);
    float *d = gpu->ops->alloc(gpu, sizeof(float) * 2 * 256 + sizeof(float) * N);
    check_matmul_silu_declined(d + 512, d, d + 256, 512, &w.g, 1, "a plain-layout weight");
    gpu->ops->free(gpu, d);
    free_qweight(&w);
}

/* ---- CUDA graphs ---------------------------------------------------------------- */

/* A product recorded under a key (graph_begin 0, graph_end runs it), then a
 * larger eager product on another weight that outgrows the scratch the
 * recording points at (the recorded step still points at the old buffer,
 * which must be retired, not freed), then new activations in the same
 * buffer and the key replayed (graph_begin 1): the replay must match the
 * reference and an eager run on the same inputs bit for bit. In quant.h's
 * layout (pack 0) M = 40 records the conversion and tensor-core kernels,
 * M = 5 the GEMV kernel, and the scratch is the BF16 activations: the
 * first recording makes it 1 MiB, the larger product needs 2 MiB. In the
 * tensor-core layout (pack 1) M = 40 and M = 5 record the medium and small
 * block shapes with K split 4 and 2 ways (the split counters must be back
 * at zero for the replay), and the scratch is the split partial sums: 1 MiB,
 * then over 2 MiB for the 257 x 64 x 4096 product split 32 ways (on a
 * device of 48 SMs or more). On a backend of its own, so that the scratch
 * starts empty. */
static void graph_checks(int pack) {
    const int64_t N = 130, K = 512, NB = 64, KB = 4096;
    static const int Ms[] = {40, 5};
    WHERE("graphs: setup");
    qweight w = make_qweight(NB_WINT4, N, K, 128, pack), wb = make_qweight(NB_WINT4, NB, KB, 128, pack);
    size_t xo = (size_t)M_MAX * K, oo = (size_t)M_MAX * N, xbo = (size_t)M_MAX * KB, obo = (size_t)M_MAX * NB;
    float *x1 = randn(xo, 1.0f), *x2 = randn(xo, 1.0f), *xb = randn(xbo, 1.0f);
    float *ref1 = xmalloc(sizeof(float) * oo), *ref2 = xmalloc(sizeof(float) * oo), *refb = xmalloc(sizeof(float) * obo);
    ref_matmul(ref1, x1, &w.c, M_MAX), ref_matmul(ref2, x2, &w.c, M_MAX), ref_matmul(refb, xb, &wb.c, M_MAX);
    float *got = xmalloc(sizeof(float) * oo), *eager = xmalloc(sizeof(float) * oo), *gotb = xmalloc(sizeof(float) * obo);
    unsigned char *poison = xmalloc(sizeof(float) * oo);
    memset(poison, 0xff, sizeof(float) * oo);
    float *dx = gpu->ops->alloc(gpu, sizeof(float) * xo), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo);
    float *dout2 = gpu->ops->alloc(gpu, sizeof(float) * oo), *dxb = to_gpu(xb, sizeof(float) * xbo);
    float *doutb = gpu->ops->alloc(gpu, sizeof(float) * obo);
    for (int i = 0; i < 2; i++) {
        int M = Ms[i];
        uint64_t key = 0x7717000 + (uint64_t)M + (pack ? 0x1000 : 0);
        size_t no = (size_t)M * N;
        WHERE("graphs%s M=%d: record", pack ? " (packed)" : "", M);
        gpu->ops->upload(gpu, dx, x1, sizeof(float) * (size_t)M * K);
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        int rc = graph_matmul(key, dout, dx, &w.g, M);
        CHECK(rc == 0, "M=%d: graph_begin of a new key returned %d, want 0 (record)", M, rc);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        check_rows(got, ref1, M, N, bf16_path(&w.g, M), abs_max(ref1, oo), "graph, recording run");

        WHERE("graphs%s M=%d: eager %d x %lld", pack ? " (packed)" : "", M, M_MAX, (long long)KB);
        gpu->ops->matmul(gpu, doutb, dxb, &wb.g, M_MAX);
        gpu->ops->download(gpu, gotb, doutb, sizeof(float) * obo);
        check_rows(gotb, refb, M_MAX, NB, 1, 0, "graph, the larger eager product between");

        WHERE("graphs%s M=%d: replay", pack ? " (packed)" : "", M);
        gpu->ops->upload(gpu, dx, x2, sizeof(float) * (size_t)M * K);
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        rc = graph_matmul(key, dout, dx, &w.g, M);
        CHECK(rc == 1, "M=%d: graph_begin of a recorded key returned %d, want 1 (replayed)", M, rc);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        check_rows(got, ref2, M, N, bf16_path(&w.g, M), abs_max(ref2, oo), "graph, replay on new inputs");
        gpu->ops->matmul(gpu, dout2, dx, &w.g, M);
        gpu->ops->download(gpu, eager, dout2, sizeof(float) * no);
        size_t bad = n_mismatch(got, eager, no);
        CHECK(bad == 0, "M=%d: the replay and an eager run differ in %zu of %zu outputs", M, bad, no);
    }
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout), gpu->ops->free(gpu, dout2);
    gpu->ops->free(gpu, dxb), gpu->ops->free(gpu, doutb);
    free(x1), free(x2), free(xb), free(ref1), free(ref2), free(refb), free(got), free(eager), free(gotb), free(poison);
    free_qweight(&w), free_qweight(&wb);
}

static void test_graph(void) {
    nb_backend *shared = gpu;
    for (int pack = 0; pack < 2; pack++) {
        nb_err e = {{0}};
        nb_backend_opts o = {.device = "cuda"};
        gpu = backend_create(&o, &e);
        if (!gpu) {
            gpu = shared;
            CHECK(0, "a second cuda backend: %s", e.msg);
            return;
        }
        graph_checks(pack);
        backend_destroy(gpu);
    }
    gpu = shared;
}

static void test_supports(void) {
    CHECK(gpu->ops->supports(gpu, NB_WINT8) && gpu->ops->supports(gpu, NB_WINT4) && gpu->ops->supports(gpu, NB_WINT2),
          "the cuda backend must report wint8, wint4 and wint2 as supported");
}

int main(void) {
    if (gpu_tests_start() == 0) {
        RUN(test_supports);
        RUN(test_wint8);
        RUN(test_wint4_g128);
        RUN(test_wint4_per_channel);
        RUN(test_wint4_groups);
        RUN(test_wint2);
        RUN(test_tc_wint8);
        RUN(test_tc_wint4_g128);
        RUN(test_tc_wint4_per_channel);
        RUN(test_tc_wint2);
        RUN(test_tc_groups_and_refusals);
        RUN(test_unaligned_x);
        RUN(test_tc_matmul_silu);
        RUN(test_graph);
        backend_destroy(cpu);
        backend_destroy(gpu);
    }
    TEST_DONE("test_cuda_wint");
}
