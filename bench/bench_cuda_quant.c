/* bench_cuda --ops, quantized part (issue 6): ops->matmul on WINT8, WINT4
 * (group 128 and per-channel), WINT2 and block-wise FP8 weights against
 * cublasGemmEx on BF16 weights of the same shape, in the same run, on the
 * Llama-3-8B shapes and M = 1 .. 4096.
 *
 * The packed weights are random bytes in the formats' layouts (quant/quant.h)
 * with plausible scales: packing 117M weights through quant_pack (WINT2's
 * code search especially) would take minutes and changes no timing. They
 * reach the device as the model loader puts them there (weight_load, then
 * weight_pack), so WINT8, WINT4 and WINT2 are timed in the tensor-core
 * layout (kernels/cuda/cuda_wint_tc.cu) and FP8 on its own kernels. Each
 * figure's first output row is checked against quant_matmul_ref on the host
 * (the exact format semantics), so what is timed is also right. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_cuda.h"
#include "common/util.h"
#include "quant/quant.h"

typedef struct qformat {
    const char *name;
    nb_dtype t;
    int group; /* 0: per-channel (group = K) where the format has groups */
} qformat;

static const qformat FORMATS[] = {
    {"wint8", NB_WINT8, 0},       {"wint4-g128", NB_WINT4, QUANT_WINT4_GROUP}, {"wint4-chan", NB_WINT4, 0},
    {"wint2", NB_WINT2, QUANT_WINT2_GROUP}, {"fp8-b128", NB_FP8_B128, 0},
};
#define N_FORMATS ((int)(sizeof FORMATS / sizeof FORMATS[0]))

nb_weight bench_host_weight(nb_dtype t, int group, int N, int K) {
    if (t == NB_BF16) {
        uint16_t *data = xmalloc(sizeof(uint16_t) * (size_t)N * K);
        bench_fill_bf16_exact(NULL, data, (size_t)N * K, 0.035f);
        return (nb_weight){.dtype = t, .rows = N, .cols = K, .data = data};
    }
    group = t == NB_WINT4 || t == NB_WINT2 ? (group ? group : K) : 0;
    size_t db = quant_data_bytes(t, N, K), sb = quant_scale_bytes(t, N, K, group), s2b = quant_scale2_bytes(t, N);
    uint8_t *data = xmalloc(db), *scale = xmalloc(sb), *scale2 = s2b ? xmalloc(s2b) : NULL;
    for (size_t i = 0; i < db; i++) {
        uint8_t v = (uint8_t)(bench_rand_u64() >> 56);
        if (t == NB_WINT8 && v == 0x80) v = 0x81;                  /* int8 -128 is outside [-127, 127] */
        if (t == NB_FP8_B128 && (v & 0x7f) == 0x7f) v ^= 1;        /* 0x7f/0xff are NaN in E4M3 */
        data[i] = v;
    }
    float step = t == NB_WINT8 ? 0.035f / 127 : t == NB_WINT4 ? 0.035f / 7 : 0.035f / 448;
    if (t == NB_WINT2) {
        for (size_t i = 0; i < sb; i++) scale[i] = (uint8_t)(bench_rand_u64() >> 56);
        for (int n = 0; n < N; n++) ((float *)scale2)[n] = quant_round_bf16(0.02f);
    } else {
        for (size_t i = 0; i < sb / sizeof(float); i++)
            ((float *)scale)[i] = quant_round_bf16(step * (0.75f + 0.25f * bench_frand()));
    }
    return (nb_weight){.dtype = t, .rows = N, .cols = K, .data = data, .scale = scale, .scale2 = scale2,
                       .group = group};
}

void bench_host_weight_free(nb_weight *h) {
    free((void *)h->data);
    free((void *)h->scale);
    free((void *)h->scale2);
}

void bench_weight_free(nb_backend *b, nb_weight *d) {
    b->ops->weight_free(b, d->data);
    if (d->scale) b->ops->weight_free(b, d->scale);
    if (d->scale2) b->ops->weight_free(b, d->scale2);
}

nb_weight *bench_weight_copies(nb_backend *b, const nb_weight *h, int *n) {
    nb_weight first = *h;
    backend_weight_load(b, &first);
    *n = bench_copies((double)quant_weight_bytes(&first));
    nb_weight *d = xmalloc(sizeof(nb_weight) * (size_t)*n);
    d[0] = first;
    for (int i = 1; i < *n; i++) {
        d[i] = *h;
        backend_weight_load(b, &d[i]);
    }
    return d;
}

void bench_weight_copies_free(nb_backend *b, nb_weight *d, int n) {
    for (int i = 0; i < n; i++) bench_weight_free(b, &d[i]);
    free(d);
}

double bench_rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (isnan(d)) return NAN;
        if (d > num) num = d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return den > 0 ? num / den : num;
}

void bench_quant_matmul(nb_backend *b, double bw) {
    static const int full[] = {1, 2, 4, 8, 16, 32, 64, 128, 512, 4096}, smoke[] = {1, 5, 16, 17, 80};
    const bench_list Ms = BENCH_PICK(full, smoke);
    const int max_m = bench_list_max(Ms), last_m = Ms.v[Ms.n - 1];
    const nb_backend_ops *o = b->ops;
    size_t max_mk, max_mn, max_nk;
    bench_shapes_max(max_m, &max_mk, &max_mn, &max_nk);
    gemm_ref r;
    bench_gemm_open(&r, max_mn, max_mk);
    float *x = o->alloc(b, sizeof(float) * max_mk), *out = o->alloc(b, sizeof(float) * max_mn);
    float *hx = xmalloc(sizeof(float) * max_mk), *row = xmalloc(sizeof(float) * max_mn),
          *ref = xmalloc(sizeof(float) * max_mn);
    uint16_t *hxb = xmalloc(2 * max_mk), *hw = xmalloc(2 * max_nk);
    /* the targets of issue 6, worst case over the shapes */
    double bw_m1[N_FORMATS], x_small[N_FORMATS], x_large[N_FORMATS];
    for (int f = 0; f < N_FORMATS; f++) bw_m1[f] = x_small[f] = x_large[f] = INFINITY;

    printf("\nquantized matmul: ops->matmul on packed weights (FP32 activations and output) vs cublasGemmEx on BF16\n"
           "weights of the same shape (BF16 activations, FP32 output, CUBLAS_COMPUTE_32F); time per call;\n"
           "x BF16 = cuBLAS BF16 time / format time; weight GB/s and of copy (resident bytes incl. scales) for M <= 64;\n"
           "rel err = first output row against quant_matmul_ref (host, exact format semantics)\n");
    printf("  %-13s %6s %6s %5s %-11s %11s %11s %8s %12s %8s %9s\n", "shape", "N", "K", "M", "format", "format us",
           "BF16 us", "x BF16", "weight GB/s", "of copy", "rel err");
    for (int si = 0; si < BENCH_N_SHAPES; si++) {
        const bench_shape sh = bench_shape_at(si);
        const int N = sh.N, K = sh.K;
        size_t nk = (size_t)N * K, mk = (size_t)max_m * K;
        bench_fill_bf16_exact(NULL, hw, nk, 0.035f);
        bench_fill_bf16_exact(hx, hxb, mk, 1.0f);
        bench_gemm_upload(&r, hw, nk, hxb, mk);
        o->upload(b, x, hx, sizeof(float) * mk);
        double t_bf16[sizeof full / sizeof full[0]];
        for (int mi = 0; mi < Ms.n; mi++) {
            r.M = Ms.v[mi], r.N = N, r.K = K;
            t_bf16[mi] = bench_time_gemm(&r);
        }
        for (int f = 0; f < N_FORMATS; f++) {
            int n_rot;
            nb_weight hwq = bench_host_weight(FORMATS[f].t, FORMATS[f].group, N, K),
                      *dwq = bench_weight_copies(b, &hwq, &n_rot);
            double wbytes = (double)quant_weight_bytes(&dwq[0]); /* as resident: the layout may pad or shrink */
            quant_matmul_ref(ref, hx, &hwq, 1);
            for (int mi = 0; mi < Ms.n; mi++) {
                int M = Ms.v[mi];
                o->matmul(b, out, x, &dwq[0], M);
                o->download(b, row, out, sizeof(float) * (size_t)N);
                double err = bench_rel_err(row, ref, (size_t)N);
                op_call c = {.kind = K_MATMUL, .b = b, .out = out, .x = x, .w = dwq, .n_rot = n_rot, .n = M};
                double t = bench_time_op(&c, 1), ratio = t_bf16[mi] / t;
                printf("  %-13s %6d %6d %5d %-11s %11.2f %11.2f %8.2f", sh.name, N, K, M, FORMATS[f].name,
                       t * 1e6, t_bf16[mi] * 1e6, ratio);
                if (M <= 64) printf(" %12.1f %8.2f", wbytes / t / 1e9, wbytes / t / bw);
                else printf(" %12s %8s", "-", "-");
                /* BF16 activations on tensor cores (the bound of
                 * tests/gpu/test_cuda_wint.c); the GEMV paths are tighter */
                printf(" %9.1e%s\n", err, bench_check(err, 2e-2));
                if (M == 1 && wbytes / t / bw < bw_m1[f]) bw_m1[f] = wbytes / t / bw;
                if (M <= 16 && ratio < x_small[f]) x_small[f] = ratio;
                if (M == last_m && ratio < x_large[f]) x_large[f] = ratio;
            }
            bench_weight_copies_free(b, dwq, n_rot);
            bench_host_weight_free(&hwq);
        }
    }
    printf("  issue 6 targets, worst shape: of copy at M=1 >= 0.90; wint4 x BF16 >= 3.5 for M <= 16; fp8 x BF16 >= 1.6 "
           "at M=4096\n");
    for (int f = 0; f < N_FORMATS; f++)
        printf("    %-11s of copy at M=1 %5.2f   x BF16 (M <= 16) %5.2f   x BF16 (M = %d) %5.2f\n", FORMATS[f].name,
               bw_m1[f], x_small[f], last_m, x_large[f]);
    o->free(b, x);
    o->free(b, out);
    free(hx), free(row), free(ref), free(hxb), free(hw);
    bench_gemm_close(&r);
}
