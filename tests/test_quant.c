/* quant/: FP8 conversion, pack/unpack round trips and error bounds per
 * format, the packed-weight kernels against the dequantize-then-matmul
 * reference, and bitwise independence from block bounds. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "quant/quant.h"
#include "tests/test.h"


static float *gauss_matrix(int64_t rows, int64_t cols, float sd) {
    float *w = xmalloc(sizeof(float) * (size_t)(rows * cols));
    for (int64_t i = 0; i < rows * cols; i++) w[i] = gauss() * sd;
    return w;
}

/* A packed weight with its own buffers (free with free_packed). */
static nb_weight pack(nb_dtype t, const float *w, int64_t rows, int64_t cols, int group) {
    nb_weight q = {.dtype = t, .rows = rows, .cols = cols, .group = group};
    q.data = xcalloc(1, quant_data_bytes(t, rows, cols) + 1);
    q.scale = xcalloc(1, quant_scale_bytes(t, rows, cols, group) + 1);
    q.scale2 = xcalloc(1, quant_scale2_bytes(t, rows) + 1);
    nb_err e = {0};
    if (quant_pack(t, w, rows, cols, group, (void *)q.data, (void *)q.scale, (void *)q.scale2, &e)) {
        fprintf(stderr, "pack failed: %s\n", e.msg);
        q.rows = 0;
    }
    return q;
}

static void free_packed(nb_weight *q) {
    free((void *)q->data);
    free((void *)q->scale);
    free((void *)q->scale2);
}

static void test_fp8_conversion(void) {
    int bad = 0;
    for (int b = 0; b < 256; b++) {
        if ((b & 0x7f) == 0x7f) {
            CHECK(isnan(fp8_e4m3_to_f32((uint8_t)b)), "code %02x is not NaN", b);
            continue;
        }
        float v = fp8_e4m3_to_f32((uint8_t)b);
        uint8_t back = fp8_e4m3_from_f32(v);
        if (back != b && !(v == 0.0f && (back & 0x7f) == 0)) bad++;
    }
    CHECK(bad == 0, "%d codes do not round-trip", bad);
    CHECK(fp8_e4m3_to_f32(0x7e) == 448.0f, "max %g", fp8_e4m3_to_f32(0x7e));
    CHECK(fp8_e4m3_to_f32(0x01) == 0x1p-9f, "min subnormal %g", fp8_e4m3_to_f32(0x01));
    CHECK(fp8_e4m3_to_f32(0x08) == 0x1p-6f, "min normal %g", fp8_e4m3_to_f32(0x08));
    CHECK(fp8_e4m3_from_f32(1e6f) == 0x7e && fp8_e4m3_from_f32(-1e6f) == 0xfe, "saturation");
    CHECK(fp8_e4m3_from_f32(NAN) == 0x7f, "NaN");
    /* ties to even: 1.0625 is halfway between 1.0 (man 0) and 1.125 (man 1) */
    CHECK(fp8_e4m3_to_f32(fp8_e4m3_from_f32(1.0625f)) == 1.0f, "tie 1.0625 -> %g",
          fp8_e4m3_to_f32(fp8_e4m3_from_f32(1.0625f)));
    CHECK(fp8_e4m3_to_f32(fp8_e4m3_from_f32(1.1875f)) == 1.25f, "tie 1.1875");
    /* every finite value maps to the nearest code */
    for (int i = 0; i < 20000; i++) {
        float x = (float)((urand() * 2.0 - 1.0) * pow(2.0, urand() * 22.0 - 12.0));
        float y = fp8_e4m3_to_f32(fp8_e4m3_from_f32(x));
        float best = INFINITY;
        for (int b = 0; b < 256; b++)
            if ((b & 0x7f) != 0x7f) best = fminf(best, fabsf(fp8_e4m3_to_f32((uint8_t)b) - x));
        if (fabsf(y - x) > best) {
            CHECK(0, "%g -> %g, but a code is %g away", x, y, best);
            break;
        }
    }
}

/* Values already on the format's grid come back exactly. */
static void test_exact_roundtrip(void) {
    int64_t R = 8, C = 128;
    float *w = xmalloc(sizeof(float) * (size_t)(R * C)), *row = xmalloc(sizeof(float) * (size_t)C);
    /* WINT8: integers times a power of two, with 127 present per row */
    for (int64_t r = 0; r < R; r++)
        for (int64_t k = 0; k < C; k++) w[r * C + k] = (float)((int)(urand() * 255) - 127) * 0x1p-7f * (float)(r + 1);
    for (int64_t r = 0; r < R; r++) w[r * C] = 127.0f * 0x1p-7f * (float)(r + 1);
    nb_weight q = pack(NB_WINT8, w, R, C, 0);
    REQUIRE(q.rows, "pack");
    CHECK(quant_rel_error(w, &q) == 0.0, "wint8 on-grid error %g", quant_rel_error(w, &q));
    free_packed(&q);
    /* WINT4: group 64, q in [-7, 7], 7 present in each group */
    for (int64_t i = 0; i < R * C; i++) w[i] = (float)((int)(urand() * 15) - 7) * 0.25f;
    for (int64_t i = 0; i < R * C; i += 64) w[i] = -7.0f * 0.25f;
    q = pack(NB_WINT4, w, R, C, 64);
    REQUIRE(q.rows, "pack");
    CHECK(quant_rel_error(w, &q) == 0.0, "wint4 on-grid error %g", quant_rel_error(w, &q));
    free_packed(&q);
    /* FP8: E4M3 values times a block scale of 1 (block max 448) */
    for (int64_t i = 0; i < R * C; i++) w[i] = fp8_e4m3_to_f32((uint8_t)(urand() * 126));
    for (int64_t r = 0; r < R; r++) w[r * C] = 448.0f;
    q = pack(NB_FP8_B128, w, R, C, 0);
    REQUIRE(q.rows, "pack");
    CHECK(quant_rel_error(w, &q) == 0.0, "fp8 on-grid error %g", quant_rel_error(w, &q));
    /* dequant_row reads the same values */
    quant_dequant_row(&q, 3, row);
    CHECK(memcmp(row, w + 3 * C, sizeof(float) * (size_t)C) == 0, "fp8 row 3 differs");
    free_packed(&q);
    /* WINT2: a group that is exactly (q - 2) * s with s = super (ls 15, zc 8) */
    for (int64_t r = 0; r < R; r++)
        for (int64_t k = 0; k < C; k++) w[r * C + k] = (float)((int)(urand() * 4) - 2) * 0.5f;
    for (int64_t i = 0; i < R * C; i += 64) w[i] = -1.0f, w[i + 1] = 0.5f;
    q = pack(NB_WINT2, w, R, C, 64);
    REQUIRE(q.rows, "pack");
    CHECK(quant_rel_error(w, &q) == 0.0, "wint2 on-grid error %g", quant_rel_error(w, &q));
    free_packed(&q);
    free(w);
    free(row);
}

/* Relative Frobenius errors on Gaussian weights, as formats this coarse
 * should give (each bound is about 1.3x what round to nearest reaches). */
static void test_error_bounds(void) {
    struct {
        nb_dtype t;
        int group;
        double lo, hi;
    } f[] = {
        {NB_WINT8, 0, 0.001, 0.012},      {NB_WINT4, 128, 0.05, 0.15}, {NB_WINT4, 64, 0.05, 0.14},
        {NB_WINT4, 256, 0.05, 0.17},      {NB_WINT2, 64, 0.2, 0.6},    {NB_FP8_B128, 0, 0.01, 0.05},
    };
    int64_t R = 96, C = 256;
    float *w = gauss_matrix(R, C, 0.02f);
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        nb_weight q = pack(f[i].t, w, R, C, f[i].group);
        REQUIRE(q.rows, "pack %s", nb_dtype_name(f[i].t));
        double err = quant_rel_error(w, &q);
        printf("  %-9s group %3d: relative error %.4f, %.3f bits per weight\n", nb_dtype_name(f[i].t), f[i].group, err,
               8.0 * (double)quant_weight_bytes(&q) / (double)(R * C));
        CHECK(err > f[i].lo && err < f[i].hi, "%s group %d: error %g outside (%g, %g)", nb_dtype_name(f[i].t),
              f[i].group, err, f[i].lo, f[i].hi);
        free_packed(&q);
    }
    /* WINT2's fitted codes beat the plain choice ls = 15, zc = 8 */
    nb_weight q = pack(NB_WINT2, w, R, C, 64);
    double fitted = 0.0, plain = 0.0;
    float *row = xmalloc(sizeof(float) * (size_t)C);
    for (int64_t r = 0; r < R; r++) {
        float sup = ((const float *)q.scale2)[r];
        for (int64_t k = 0; k < C; k++) {
            double d = w[r * C + k] - quant_wint2_value(quant_wint2_q(w[r * C + k], 0x8f, sup), 0x8f, sup);
            plain += d * d;
        }
        quant_dequant_row(&q, r, row);
        for (int64_t k = 0; k < C; k++) fitted += (w[r * C + k] - row[k]) * (double)(w[r * C + k] - row[k]);
    }
    CHECK(fitted < 0.9 * plain, "wint2 fitted %g vs plain %g", fitted, plain);
    free(row);
    free_packed(&q);
    free(w);
    /* bad shapes are refused with a reason */
    nb_err e = {0};
    CHECK(quant_check(NB_WINT4, 4, 100, 128, &e) == -1 && strstr(e.msg, "group"), "wint4 K=100: %s", e.msg);
    CHECK(quant_check(NB_WINT2, 4, 96, 64, &e) == -1 && strstr(e.msg, "64"), "wint2 K=96: %s", e.msg);
    CHECK(quant_check(NB_WINT4, 4, 48, 48, &e) == 0, "wint4 per channel K=48: %s", e.msg);
    CHECK(quant_check(NB_BF16, 4, 48, 0, &e) == -1, "bf16 is not quantized");
}

/* |a - b| within FP32 rounding of a K-term dot product. */
static int close_enough(float a, float b, double mag, int64_t K) {
    return fabs((double)a - (double)b) <= 1e-6 * sqrt((double)K) * mag + 1e-30;
}

static void check_kernel(nb_dtype t, int64_t N, int64_t K, int group, int M) {
    float *w = gauss_matrix(N, K, 0.05f), *x = gauss_matrix(M, K, 1.0f);
    /* a few outliers, as real activations have */
    x[0] = 40.0f;
    if (M > 1) x[K + K / 2] = -25.0f;
    nb_weight q = pack(t, w, N, K, group);
    REQUIRE(q.rows, "pack");
    float *ref = xmalloc(sizeof(float) * (size_t)(M * N)), *out = xmalloc(sizeof(float) * (size_t)(M * N));
    float *out2 = xmalloc(sizeof(float) * (size_t)(M * N)), *row = xmalloc(sizeof(float) * (size_t)K);
    quant_matmul_ref(ref, x, &q, M);
    quant_matmul_block(out, x, &q, 0, M, 0, N);
    int bad = 0;
    for (int m = 0; m < M && !bad; m++)
        for (int64_t n = 0; n < N; n++) {
            quant_dequant_row(&q, n, row);
            double mag = 0.0;
            for (int64_t k = 0; k < K; k++) mag += fabs(x[m * K + k] * row[k]);
            if (!close_enough(out[m * N + n], ref[m * N + n], mag, K)) {
                CHECK(0, "%s N=%lld K=%lld M=%d: out[%d][%lld] = %.9g, reference %.9g", nb_dtype_name(t), (long long)N,
                      (long long)K, M, m, (long long)n, out[m * N + n], ref[m * N + n]);
                bad = 1;
                break;
            }
        }
    /* the same elements from odd block bounds, bit for bit */
    memset(out2, 0, sizeof(float) * (size_t)(M * N));
    for (int m0 = 0; m0 < M; m0 += 3)
        for (int64_t n0 = 0; n0 < N; n0 += 5)
            quant_matmul_block(out2, x, &q, m0, m0 + 3 < M ? m0 + 3 : M, n0, n0 + 5 < N ? n0 + 5 : N);
    CHECK(memcmp(out, out2, sizeof(float) * (size_t)(M * N)) == 0, "%s N=%lld K=%lld M=%d: block bounds change bits",
          nb_dtype_name(t), (long long)N, (long long)K, M);
    free_packed(&q);
    free(w);
    free(x);
    free(ref);
    free(out);
    free(out2);
    free(row);
}

static void test_kernels_vs_reference(void) {
    int shapes[][2] = {{1, 64}, {7, 128}, {37, 192}, {130, 320}, {64, 1024}};
    int ms[] = {1, 2, 3, 4, 5, 9};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t mi = 0; mi < sizeof ms / sizeof ms[0]; mi++) {
            int64_t N = shapes[s][0], K = shapes[s][1];
            int M = ms[mi];
            check_kernel(NB_WINT8, N, K, 0, M);
            check_kernel(NB_WINT4, N, K, 64, M);
            check_kernel(NB_WINT4, N, K, K % 128 ? 64 : 128, M);
            check_kernel(NB_WINT2, N, K, 64, M);
            check_kernel(NB_FP8_B128, N, K, 0, M);
        }
    /* shapes off the vector width: per-channel WINT4 with K % 16 != 0, FP8
     * with partial 128-blocks in both directions */
    check_kernel(NB_WINT4, 9, 40, 40, 3);
    check_kernel(NB_WINT8, 5, 37, 0, 2);
    check_kernel(NB_FP8_B128, 131, 200, 0, 3);
    check_kernel(NB_FP8_B128, 3, 5, 0, 1);
}

/* The FP8 product quantizes activations per 128 columns: a row whose
 * halves differ by 2^20 in magnitude keeps both halves' contributions. */
static void test_fp8_activation_blocks(void) {
    int64_t K = 256, N = 1;
    float w[256], x[256], out, ref;
    for (int k = 0; k < K; k++) w[k] = 1.0f, x[k] = k < 128 ? 1e-6f : 1.0f;
    nb_weight q = pack(NB_FP8_B128, w, N, K, 0);
    REQUIRE(q.rows, "pack");
    quant_matmul_block(&out, x, &q, 0, 1, 0, 1);
    quant_matmul_ref(&ref, x, &q, 1);
    CHECK(fabsf(out - (128.0f + 128e-6f)) < 1e-4f, "fp8 blockwise activations: %.9g", out);
    CHECK(out == ref || fabsf(out - ref) < 1e-5f, "kernel %.9g vs reference %.9g", out, ref);
    free_packed(&q);
}

int main(void) {
    RUN(test_fp8_conversion);
    RUN(test_exact_roundtrip);
    RUN(test_error_bounds);
    RUN(test_kernels_vs_reference);
    RUN(test_fp8_activation_blocks);
    TEST_DONE("test_quant");
}
