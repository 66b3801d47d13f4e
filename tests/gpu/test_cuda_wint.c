/* The CUDA backend's weight-only quantized matmul (kernels/cuda/cuda_wint.cu)
 * against the CPU reference quant_matmul_ref (dequantize, then FP32
 * matmul), for NB_WINT8, NB_WINT4 (group 128, per channel, and the other
 * groups quant_check allows: 64 as the fixtures get, 16, 48) and NB_WINT2
 * (`make test-gpu`; `make test` only builds this). Weights are random FP32
 * packed on the host with quant_pack; data, scale and scale2 go to the GPU
 * with ops->weight_load, byte for byte, as the model loader does. Every
 * shape runs M in {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 257}, N odd
 * or 1, K at the edges each path has (not a multiple of the 64-column
 * tensor-core tile, packed rows that are not whole 16-byte chunks). Bounds:
 *  - M <= 16 (GEMV, FP32 activations, each weight equal to the reference's):
 *    only the FP32 summation order differs: max |diff| <= 1e-4 max |ref|
 *    (+ 1e-6 absolute);
 *  - M > 16 (tensor cores, activations and dequantized weights rounded to
 *    BF16): max |diff| <= 2e-2 max |ref| (expected ~2e-3).
 * Outputs are poisoned with NaN before each run, so an element the GPU
 * leaves unwritten fails. Ends with a product recorded in a CUDA graph and
 * replayed on new inputs, after a larger product has outgrown the scratch
 * the recording points at. Needs a CUDA device; fails (not skips) without
 * one. */
#include <pthread.h>

#include "quant/quant.h"
#include "tests/gpu/gpu_test.h"

#define M_MAX 257
#define REF_THREADS 8

static const int MS[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 64, 100, 257};
#define N_MS ((int)(sizeof MS / sizeof MS[0]))

/* A packed weight: host bytes (c) and their device copies (g). */
typedef struct qweight {
    nb_weight c, g;
} qweight;

static qweight make_qweight(nb_dtype t, int64_t N, int64_t K, int group) {
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
    q.g.data = gpu->ops->weight_load(gpu, data, db);
    q.g.scale = gpu->ops->weight_load(gpu, scale, sb);
    q.g.scale2 = s2b ? gpu->ops->weight_load(gpu, scale2, s2b) : NULL;
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

/* Checks M rows of got against ref under the bound of the path M takes;
 * returns the error relative to max |ref| for the summary. */
static double check_rows(const float *got, const float *ref, int M, int64_t N, const char *what) {
    double rmax, d = max_diff(got, ref, (size_t)M * (size_t)N, &rmax);
    double bound = M <= 16 ? 1e-4 * rmax + 1e-6 : 2e-2 * rmax;
    CHECK(d <= bound, "%s: max |diff| %.3g > %.3g (max |ref| %.3g)", what, d, bound, rmax);
    return rmax > 0 ? d / rmax : d;
}

typedef struct shape {
    int64_t N, K;
    int group; /* WINT4: 0 = per channel (group K); ignored otherwise */
} shape;

/* Every M of the sweep on one weight; worst[0] for M <= 16, worst[1] above. */
static void check_shape(nb_dtype t, shape s, double worst[2]) {
    int group = t == NB_WINT4 ? (s.group ? s.group : (int)s.K) : t == NB_WINT2 ? QUANT_WINT2_GROUP : 0;
    WHERE("%s N=%lld K=%lld group %d: packing", nb_dtype_name(t), (long long)s.N, (long long)s.K, group);
    qweight w = make_qweight(t, s.N, s.K, group);
    size_t xo = (size_t)M_MAX * (size_t)s.K, oo = (size_t)M_MAX * (size_t)s.N;
    float *x = randn(xo, 1.0f), *ref = xmalloc(sizeof(float) * oo), *got = xmalloc(sizeof(float) * oo);
    /* row m of the product depends on row m of x only: one reference of
     * M_MAX rows serves every M */
    ref_matmul(ref, x, &w.c, M_MAX);
    unsigned char *poison = xmalloc(sizeof(float) * oo);
    memset(poison, 0xff, sizeof(float) * oo);
    float *dx = to_gpu(x, sizeof(float) * xo), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo);
    for (int i = 0; i < N_MS; i++) {
        int M = MS[i];
        size_t no = (size_t)M * (size_t)s.N;
        WHERE("%s N=%lld K=%lld group %d M=%d", nb_dtype_name(t), (long long)s.N, (long long)s.K, group, M);
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        gpu->ops->matmul(gpu, dout, dx, &w.g, M);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        note_worst(&worst[M > 16], check_rows(got, ref, M, s.N, t_where));
    }
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout);
    free(x), free(ref), free(got), free(poison);
    free_qweight(&w);
}

/* The shapes of the issue: N odd (or 1), K multiples of every group here. */
static const shape COMMON[] = {{1, 128, 0},   {7, 256, 0},    {33, 384, 0},  {130, 512, 0},
                               {257, 1024, 0}, {4099, 4096, 0}, {1000, 4096, 0}};
#define N_COMMON ((int)(sizeof COMMON / sizeof COMMON[0]))

static void run_shapes(nb_dtype t, int group, const shape *extra, int n_extra, const char *name) {
    double worst[2] = {0, 0};
    for (int i = 0; i < N_COMMON; i++) {
        shape s = COMMON[i];
        s.group = group;
        check_shape(t, s, worst);
    }
    for (int i = 0; i < n_extra; i++) check_shape(t, extra[i], worst);
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
 * K = 96 (a last K tile of 32 columns). */
static void test_wint4_groups(void) {
    static const shape s[] = {{65, 192, 64}, {33, 256, 16}, {7, 384, 48}, {130, 96, 32}, {257, 1024, 64}};
    double worst[2] = {0, 0};
    for (int i = 0; i < 5; i++) check_shape(NB_WINT4, s[i], worst);
    printf("  %-16s worst max|diff| / max|ref|: %.2e for M <= 16, %.2e above\n", "wint4 groups", worst[0], worst[1]);
}

static void test_wint2(void) {
    static const shape extra[] = {{19, 64, 0}, {70, 192, 0}};
    run_shapes(NB_WINT2, 0, extra, 2, "wint2");
}

/* Activations 4 bytes off 16-byte alignment: the GEMV kernel's byte path
 * for shapes that would take 16-byte chunks, whatever the format. */
static void test_unaligned_x(void) {
    static const nb_dtype ts[] = {NB_WINT8, NB_WINT4, NB_WINT2};
    static const int Ms[] = {1, 5, 16};
    for (int i = 0; i < 3; i++) {
        int64_t N = 33, K = 256;
        int group = ts[i] == NB_WINT4 ? 128 : ts[i] == NB_WINT2 ? QUANT_WINT2_GROUP : 0;
        WHERE("unaligned x %s", nb_dtype_name(ts[i]));
        qweight w = make_qweight(ts[i], N, K, group);
        size_t xo = 16 * (size_t)K, oo = 16 * (size_t)N;
        float *x = randn(xo, 1.0f), *ref = xmalloc(sizeof(float) * oo), *got = xmalloc(sizeof(float) * oo);
        ref_matmul(ref, x, &w.c, 16);
        float *dbuf = gpu->ops->alloc(gpu, sizeof(float) * (xo + 1)), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo);
        gpu->ops->upload(gpu, dbuf + 1, x, sizeof(float) * xo);
        for (int j = 0; j < 3; j++) {
            WHERE("unaligned x %s M=%d", nb_dtype_name(ts[i]), Ms[j]);
            gpu->ops->matmul(gpu, dout, dbuf + 1, &w.g, Ms[j]);
            gpu->ops->download(gpu, got, dout, sizeof(float) * (size_t)Ms[j] * N);
            check_rows(got, ref, Ms[j], N, t_where);
        }
        gpu->ops->free(gpu, dbuf), gpu->ops->free(gpu, dout);
        free(x), free(ref), free(got);
        free_qweight(&w);
    }
}

/* ---- CUDA graphs ---------------------------------------------------------------- */

/* A product recorded under a key (graph_begin 0, graph_end runs it), then a
 * larger eager product on another weight that outgrows the tensor-core
 * path's activation scratch (the recorded step still points at the old
 * buffer, which must be retired, not freed), then new activations in the
 * same buffer and the key replayed (graph_begin 1): the replay must match
 * the reference and an eager run on the same inputs bit for bit. M = 40
 * records the conversion and tensor-core kernels, M = 5 the GEMV kernel.
 * On a backend of its own, so that the scratch starts empty: the first
 * recording makes it 1 MiB, the larger product needs 2 MiB. */
static void graph_checks(void) {
    const int64_t N = 130, K = 512, NB = 64, KB = 4096;
    static const int Ms[] = {40, 5};
    WHERE("graphs: setup");
    qweight w = make_qweight(NB_WINT4, N, K, 128), wb = make_qweight(NB_WINT4, NB, KB, 128);
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
        uint64_t key = 0x7717000 + (uint64_t)M;
        size_t no = (size_t)M * N;
        WHERE("graphs M=%d: record", M);
        gpu->ops->upload(gpu, dx, x1, sizeof(float) * (size_t)M * K);
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        int rc = gpu->ops->graph_begin(gpu, key);
        CHECK(rc == 0, "M=%d: graph_begin of a new key returned %d, want 0 (record)", M, rc);
        if (!rc) {
            gpu->ops->matmul(gpu, dout, dx, &w.g, M);
            gpu->ops->graph_end(gpu);
        }
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        check_rows(got, ref1, M, N, "graph, recording run");

        WHERE("graphs M=%d: eager %d x %lld", M, M_MAX, (long long)KB);
        gpu->ops->matmul(gpu, doutb, dxb, &wb.g, M_MAX);
        gpu->ops->download(gpu, gotb, doutb, sizeof(float) * obo);
        check_rows(gotb, refb, M_MAX, NB, "graph, the larger eager product between");

        WHERE("graphs M=%d: replay", M);
        gpu->ops->upload(gpu, dx, x2, sizeof(float) * (size_t)M * K);
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        rc = gpu->ops->graph_begin(gpu, key);
        CHECK(rc == 1, "M=%d: graph_begin of a recorded key returned %d, want 1 (replayed)", M, rc);
        if (!rc) {
            gpu->ops->matmul(gpu, dout, dx, &w.g, M);
            gpu->ops->graph_end(gpu);
        }
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        check_rows(got, ref2, M, N, "graph, replay on new inputs");
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
    nb_err e = {{0}};
    nb_backend_opts o = {.device = "cuda"};
    gpu = backend_create(&o, &e);
    if (!gpu) {
        gpu = shared;
        CHECK(0, "a second cuda backend: %s", e.msg);
        return;
    }
    graph_checks();
    backend_destroy(gpu);
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
        RUN(test_unaligned_x);
        RUN(test_graph);
        backend_destroy(cpu);
        backend_destroy(gpu);
    }
    TEST_DONE("test_cuda_wint");
}
