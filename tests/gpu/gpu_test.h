/* Shared by the GPU op tests (tests/gpu/test_cuda_ops.c, test_cuda_attention.c):
 * the two backends, seeded inputs, copies to and from the GPU, twin weights,
 * error measures, and the case name printed if a test dies inside an op. */
#ifndef NB_GPU_TEST_H
#define NB_GPU_TEST_H

#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "kernels/backend.h"
#include "tests/gpu/gpu_start.h"
#include "tests/test.h"

static nb_backend *gpu;

/* ---- helpers ------------------------------------------------------------ */

/* The case being run, printed if the process dies inside an op (a CUDA
 * error aborts with the kernel's file and line, not the shape). */
static char t_where[256];
#define WHERE(...) snprintf(t_where, sizeof t_where, __VA_ARGS__)

static inline void on_fatal(int sig) {
    static const char pre[] = "  died during: ";
    ssize_t r = write(2, pre, sizeof pre - 1);
    r = write(2, t_where, strlen(t_where));
    r = write(2, "\n", 1);
    (void)r;
    signal(sig, SIG_DFL);
    raise(sig);
}

static inline int irand(int n) { return (int)(urand() * n); } /* [0, n) */

static inline float *randn(size_t n, float scale) {
    float *p = xmalloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = gauss() * scale;
    return p;
}

static inline void *to_gpu(const void *host, size_t bytes) {
    void *d = gpu->ops->alloc(gpu, bytes);
    gpu->ops->upload(gpu, d, host, bytes);
    return d;
}

static inline float *from_gpu(const void *dev, size_t n_floats) {
    float *h = xmalloc(sizeof(float) * (n_floats ? n_floats : 1));
    gpu->ops->download(gpu, h, dev, sizeof(float) * n_floats);
    return h;
}

/* One GPU matmul bracketed as a model's decode step is: graph_begin(key)
 * and, unless that replayed the recording, the matmul recorded and run by
 * graph_end. Returns graph_begin's answer (0: recorded, 1: replayed). */
static inline int graph_matmul(uint64_t key, float *out, const float *x, const nb_weight *w, int M) {
    int r = gpu->ops->graph_begin(gpu, key);
    if (!r) {
        gpu->ops->matmul(gpu, out, x, w, M);
        gpu->ops->graph_end(gpu);
    }
    return r;
}

static inline float *copy_floats(const float *x, size_t n) {
    float *p = xmalloc(sizeof(float) * (n ? n : 1));
    memcpy(p, x, sizeof(float) * n);
    return p;
}

/* A weight on both backends: the CPU's reads the host bytes, the GPU's is
 * the weight_load copy of them. */
typedef struct twin_weight {
    nb_weight c, g;
} twin_weight;

static inline twin_weight make_weight(nb_dtype t, int64_t rows, int64_t cols, float scale) {
    size_t n = (size_t)(rows * cols), bytes = n * nb_dtype_size(t);
    void *data = xmalloc(bytes + 16);
    for (size_t i = 0; i < n; i++) {
        float v = gauss() * scale;
        if (t == NB_BF16) ((uint16_t *)data)[i] = f32_to_bf16(v);
        else if (t == NB_F16) ((uint16_t *)data)[i] = f32_to_f16(v);
        else ((float *)data)[i] = v;
    }
    twin_weight w;
    w.c = (nb_weight){.dtype = t, .rows = rows, .cols = cols, .data = data};
    w.g = w.c;
    w.g.data = gpu->ops->weight_load(gpu, data, bytes);
    return w;
}

static inline void free_weight(twin_weight *w) {
    gpu->ops->weight_free(gpu, w->g.data);
    free((void *)w->c.data);
}

static inline double norm2(const float *x, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return sqrt(s);
}

/* ||got - ref|| / max(||ref||, floor): the error of a whole output. A NaN
 * or inf in got makes it NaN or inf, which fails every "<= bound" check. */
static inline double rel_l2(const float *got, const float *ref, size_t n, double floor) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    den = sqrt(den);
    if (den < floor) den = floor;
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return sqrt(num) / den;
}

/* max over elements of |got - ref| / |ref| (|ref| floored at 1e-20). */
static inline double rel_elem(const float *got, const float *ref, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]), s = fabs(ref[i]);
        if (isnan(d)) return NAN;
        d /= s > 1e-20 ? s : 1e-20;
        if (d > worst) worst = d;
    }
    return worst;
}

/* Elements whose bits differ. */
static inline size_t n_mismatch(const float *a, const float *b, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += memcmp(a + i, b + i, sizeof(float)) != 0;
    return bad;
}

/* matmul_silu of gate/up (rows ld apart) times w into dout, against
 * silu_mul into dact then matmul into dref: CHECKs that it fused (0) and
 * that every output equals the two ops' bit for bit. */
static inline void check_matmul_silu(float *dout, float *dref, float *dact, const float *g, const float *u, int ld,
                                     const nb_weight *w, int M) {
    const size_t n = (size_t)M * (size_t)w->rows;
    gpu->ops->silu_mul(gpu, dact, g, u, M, (int)w->cols, ld);
    gpu->ops->matmul(gpu, dref, dact, w, M);
    CHECK(gpu->ops->matmul_silu(gpu, dout, g, u, ld, w, M) == 0, "%s: declined", t_where);
    float *ref = from_gpu(dref, n), *got = from_gpu(dout, n);
    size_t bad = n_mismatch(got, ref, n);
    CHECK(bad == 0, "%s: %zu of %zu values differ from silu_mul then matmul", t_where, bad, n);
    free(ref), free(got);
}

/* matmul_silu must decline (1) and leave dout's first row as it was. */
static inline void check_matmul_silu_declined(float *dout, const float *g, const float *u, int ld, const nb_weight *w,
                                              int M, const char *what) {
    float *before = from_gpu(dout, (size_t)w->rows);
    CHECK(gpu->ops->matmul_silu(gpu, dout, g, u, ld, w, M) == 1, "%s not declined", what);
    float *after = from_gpu(dout, (size_t)w->rows);
    CHECK(n_mismatch(before, after, (size_t)w->rows) == 0, "%s: a declined matmul_silu wrote its output", what);
    free(before), free(after);
}

static inline void note_worst(double *worst, double err) {
    if (isnan(err) || err > *worst) *worst = err;
}

/* ---- device ---------------------------------------------------------------- */


static inline void test_device(void) {
    gpu_require_device();
    if (t_cur_failed) return;
    nb_err e = {{0}};
    nb_backend_opts o = {.device = "cuda"};
    gpu = backend_create(&o, &e);
    REQUIRE(gpu != NULL, "cuda backend: %s", e.msg);
    CHECK(!strcmp(gpu->ops->name, "cuda"), "device \"cuda\" gave the %s backend", gpu->ops->name);
}

/* Start-up shared by the op-test binaries: the GPU (test_device) and the
 * CPU reference backend. Returns 0 when both are there. */
static inline int gpu_tests_start(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGABRT, on_fatal);
    signal(SIGSEGV, on_fatal);
    WHERE("start-up");
    RUN(test_device);
    if (t_failed) return -1;
    return gpu_start_cpu();
}

/* ---- batches ---------------------------------------------------------------- */


/* A batch that only rope reads (positions), but whole, as set_batch copies
 * every array: one sequence whose slots are its positions' order. */
typedef struct plain_batch {
    nb_batch b;
    int32_t *pos, *seq_of, *slot, *table;
} plain_batch;

static inline void plain_batch_init(plain_batch *p, int n) {
    int nb = (n + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    p->pos = xmalloc(sizeof(int32_t) * n), p->seq_of = xcalloc((size_t)n, sizeof(int32_t));
    p->slot = xmalloc(sizeof(int32_t) * n), p->table = xmalloc(sizeof(int32_t) * nb);
    for (int t = 0; t < n; t++) p->pos[t] = t, p->slot[t] = t;
    for (int i = 0; i < nb; i++) p->table[i] = i;
    p->b = (nb_batch){n, p->pos, p->seq_of, p->slot, 1, nb, p->table};
}

static inline void plain_batch_free(plain_batch *p) { free(p->pos), free(p->seq_of), free(p->slot), free(p->table); }

#endif
