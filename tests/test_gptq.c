/* quant/gptq.c: the Hessian sum, and GPTQ against round to nearest on a
 * layer whose inputs are correlated (as real activations are): the
 * calibrated weights must give a smaller output error on the calibration
 * inputs and on held-out inputs from the same distribution. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "quant/gptq.h"
#include "quant/quant.h"
#include "tests/test.h"


/* n rows of x = z A + outliers in a few channels, z Gaussian with rank r. */
static float *inputs(int n, int64_t K, const float *A, int r) {
    float *x = xcalloc((size_t)n * (size_t)K, sizeof(float)), *z = xmalloc(sizeof(float) * (size_t)r);
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < r; i++) z[i] = gauss();
        for (int i = 0; i < r; i++)
            for (int64_t k = 0; k < K; k++) x[t * K + k] += z[i] * A[i * K + k];
        for (int64_t k = 0; k < K; k++) x[t * K + k] += 0.1f * gauss() * (k % 17 == 0 ? 8.0f : 1.0f);
    }
    free(z);
    return x;
}

/* ||x W^T - x Q^T||_F / ||x W^T||_F */
static double output_error(const float *x, int n, const float *w, const nb_weight *q) {
    int64_t N = q->rows, K = q->cols;
    float *y = xmalloc(sizeof(float) * (size_t)n * (size_t)N), *yq = xmalloc(sizeof(float) * (size_t)n * (size_t)N);
    quant_matmul_ref(yq, x, q, n);
    for (int t = 0; t < n; t++)
        for (int64_t j = 0; j < N; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += x[t * K + k] * w[j * K + k];
            y[t * N + j] = s;
        }
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < (int64_t)n * N; i++) {
        num += (double)(y[i] - yq[i]) * (y[i] - yq[i]);
        den += (double)y[i] * y[i];
    }
    free(y);
    free(yq);
    return sqrt(num / den);
}

static void test_hessian(void) {
    int64_t K = 37;
    int n = 11;
    float *x = xmalloc(sizeof(float) * (size_t)n * (size_t)K);
    for (int64_t i = 0; i < n * K; i++) x[i] = gauss();
    x[5] = 0.0f;
    double *H = xcalloc((size_t)(K * K), sizeof(double));
    gptq_hessian_add(H, x, 4, K);
    gptq_hessian_add(H, x + 4 * K, n - 4, K);
    double worst = 0.0;
    for (int64_t i = 0; i < K; i++)
        for (int64_t j = 0; j < K; j++) {
            double s = 0.0;
            for (int t = 0; t < n; t++) s += (double)x[t * K + i] * x[t * K + j];
            worst = fmax(worst, fabs(s - H[i * K + j]));
        }
    CHECK(worst < 1e-9, "H differs from sum x x^T by %g", worst);
    free(x);
    free(H);
}

typedef struct packed {
    nb_weight w;
    void *d, *s, *s2;
} packed;

static packed alloc_packed(nb_dtype t, int64_t N, int64_t K, int group) {
    packed p = {{.dtype = t, .rows = N, .cols = K, .group = group}, NULL, NULL, NULL};
    p.d = xcalloc(1, quant_data_bytes(t, N, K) + 1);
    p.s = xcalloc(1, quant_scale_bytes(t, N, K, group) + 1);
    p.s2 = xcalloc(1, quant_scale2_bytes(t, N) + 1);
    p.w.data = p.d, p.w.scale = p.s, p.w.scale2 = p.s2;
    return p;
}

static void free_packed(packed *p) {
    free(p->d);
    free(p->s);
    free(p->s2);
}

static void test_gptq_beats_rtn(void) {
    int64_t N = 64, K = 256;
    int r = 24, n_cal = 512, n_test = 256;
    float *A = xmalloc(sizeof(float) * (size_t)(r * K)), *w = xmalloc(sizeof(float) * (size_t)(N * K));
    for (int64_t i = 0; i < r * K; i++) A[i] = gauss();
    for (int64_t i = 0; i < N * K; i++) w[i] = gauss() * 0.02f;
    float *xc = inputs(n_cal, K, A, r), *xt = inputs(n_test, K, A, r);
    double *H = xcalloc((size_t)(K * K), sizeof(double));
    gptq_hessian_add(H, xc, n_cal, K);
    struct {
        nb_dtype t;
        int group;
        double need; /* GPTQ error must be below need x RTN error */
    } f[] = {{NB_WINT2, 64, 0.85}, {NB_WINT4, 128, 0.85}, {NB_WINT4, 64, 0.85}, {NB_WINT8, 0, 0.9}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        nb_err e = {0};
        packed g = alloc_packed(f[i].t, N, K, f[i].group), q = alloc_packed(f[i].t, N, K, f[i].group);
        int rc = gptq_quantize(f[i].t, w, N, K, f[i].group, H, 0.01, 3, g.d, g.s, g.s2, &e);
        REQUIRE(rc == 0, "gptq %s: %s", nb_dtype_name(f[i].t), e.msg);
        REQUIRE(quant_pack(f[i].t, w, N, K, f[i].group, q.d, q.s, q.s2, &e) == 0, "pack: %s", e.msg);
        if (f[i].t == NB_WINT8) g.w.group = q.w.group = 0;
        double gc = output_error(xc, n_cal, w, &g.w), rc_ = output_error(xc, n_cal, w, &q.w);
        double gt = output_error(xt, n_test, w, &g.w), rt = output_error(xt, n_test, w, &q.w);
        printf("  %-6s group %3d: output error GPTQ %.4f vs RTN %.4f (calibration), %.4f vs %.4f (held out); "
               "weight error %.4f vs %.4f\n",
               nb_dtype_name(f[i].t), f[i].group, gc, rc_, gt, rt, quant_rel_error(w, &g.w), quant_rel_error(w, &q.w));
        CHECK(gc < f[i].need * rc_, "%s calibration: GPTQ %g vs RTN %g", nb_dtype_name(f[i].t), gc, rc_);
        CHECK(gt < f[i].need * rt, "%s held out: GPTQ %g vs RTN %g", nb_dtype_name(f[i].t), gt, rt);
        free_packed(&g);
        free_packed(&q);
    }
    free(A);
    free(w);
    free(xc);
    free(xt);
    free(H);
}

/* Channels never activated, an all-zero Hessian, a rank-deficient one: all
 * quantize without NaN; other formats are refused. */
static void test_degenerate(void) {
    int64_t N = 8, K = 128;
    float *w = xmalloc(sizeof(float) * (size_t)(N * K)), *row = xmalloc(sizeof(float) * (size_t)K);
    for (int64_t i = 0; i < N * K; i++) w[i] = gauss();
    double *H = xcalloc((size_t)(K * K), sizeof(double));
    packed g = alloc_packed(NB_WINT4, N, K, 64);
    nb_err e = {0};
    CHECK(gptq_quantize(NB_WINT4, w, N, K, 64, H, 0.01, 3, g.d, g.s, g.s2, &e) == 0, "zero H: %s", e.msg);
    double err0 = quant_rel_error(w, &g.w);
    CHECK(err0 > 0.0 && err0 < 0.2, "zero H gives plain quantization, error %g", err0);
    float x[3 * 128] = {0};
    for (int k = 0; k < 64; k++) x[k] = 1.0f, x[128 + k] = (float)k, x[256 + k] = -1.0f; /* rank 2, half dead */
    gptq_hessian_add(H, x, 3, K);
    CHECK(gptq_quantize(NB_WINT4, w, N, K, 64, H, 0.01, 3, g.d, g.s, g.s2, &e) == 0, "rank 2 H: %s", e.msg);
    int finite = 1;
    for (int64_t r = 0; r < N; r++) {
        quant_dequant_row(&g.w, r, row);
        for (int64_t k = 0; k < K; k++) finite &= isfinite(row[k]);
    }
    CHECK(finite, "non-finite weights");
    CHECK(gptq_quantize(NB_FP8_B128, w, N, K, 0, H, 0.01, 3, g.d, g.s, g.s2, &e) == -1 && strstr(e.msg, "GPTQ"),
          "fp8 refused: %s", e.msg);
    CHECK(gptq_quantize(NB_WINT2, w, N, 96, 64, H, 0.01, 3, g.d, g.s, g.s2, &e) == -1, "bad shape refused");
    free_packed(&g);
    free(w);
    free(row);
    free(H);
}

/* Rows are shared among threads: any thread count gives the same bytes. */
static void test_threads_identical(void) {
    int64_t N = 100, K = 192;
    float *w = xmalloc(sizeof(float) * (size_t)(N * K)), *x = xmalloc(sizeof(float) * 300 * (size_t)K);
    for (int64_t i = 0; i < N * K; i++) w[i] = gauss();
    for (int64_t i = 0; i < 300 * K; i++) x[i] = gauss() + (i % K < 8 ? 3.0f : 0.0f);
    double *H = xcalloc((size_t)(K * K), sizeof(double));
    gptq_hessian_add(H, x, 300, K);
    packed a = alloc_packed(NB_WINT2, N, K, 64), b = alloc_packed(NB_WINT2, N, K, 64);
    nb_err e = {0};
    CHECK(gptq_quantize(NB_WINT2, w, N, K, 64, H, 0.01, 1, a.d, a.s, a.s2, &e) == 0, "%s", e.msg);
    CHECK(gptq_quantize(NB_WINT2, w, N, K, 64, H, 0.01, 4, b.d, b.s, b.s2, &e) == 0, "%s", e.msg);
    CHECK(memcmp(a.d, b.d, quant_data_bytes(NB_WINT2, N, K)) == 0 &&
              memcmp(a.s, b.s, quant_scale_bytes(NB_WINT2, N, K, 64)) == 0 &&
              memcmp(a.s2, b.s2, quant_scale2_bytes(NB_WINT2, N)) == 0,
          "1 and 4 threads differ");
    free_packed(&a);
    free_packed(&b);
    free(w);
    free(x);
    free(H);
}

int main(void) {
    RUN(test_hessian);
    RUN(test_gptq_beats_rtn);
    RUN(test_degenerate);
    RUN(test_threads_identical);
    TEST_DONE("test_gptq");
}
