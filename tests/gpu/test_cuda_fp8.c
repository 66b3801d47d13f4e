/* NB_FP8_B128 matmul on the CUDA backend (kernels/cuda/cuda_fp8.cu) against
 * the CPU reference quant_matmul_ref (`make test-gpu`; `make test` only
 * builds this). Weights are packed on the host with quant_pack and uploaded
 * byte for byte with weight_load. What each comparison allows:
 *  - activation quantization, bit for bit: weights that are E4M3 1.0 on the
 *    diagonal (block scales 1) make out[m][n] the dequantized activation
 *    x[m][n] itself (one exact product, the rest zeros), which must equal
 *    quant_act_rows' value (compared as floats: the CPU's -0 for a code
 *    0x80 is a +0 sum on both backends);
 *  - products, max |diff| <= tol * max |ref|. Both sides multiply the same
 *    quantized activations (checked above) by the same E4M3 weights and
 *    block scales; only the order and grouping of FP32 roundings differ.
 *    M <= 16 runs cuda_fp8_small.cu's kernel where K is whole 128-column
 *    blocks (FP8 mma, each block's sum promoted to FP32 as below: tol
 *    2e-3), else the GEMV kernel (16-term dots of exact E4M3 products,
 *    scaled, summed in FP32): expected ~1e-6, tol 1e-3. Above, cuBLASLt's
 *    block-scaled FP8 GEMM where it takes the shape: Hopper's FP8 tensor
 *    cores add the products inside an MMA keeping fewer than FP32's
 *    mantissa bits (about 14, per the DeepSeek-V3 report), and the kernel
 *    promotes to FP32 at every 128-wide K block (where the block scales
 *    apply), so each block's sum is off by ~2^-13 of its size: expected
 *    ~1e-4, tol 2e-3; where it does not, fp8_mma_kernel, which promotes
 *    the same way: the same bound. Printed worst errors say how much margin
 *    is left;
 *  - a product recorded in a CUDA graph and replayed on new activations in
 *    the same buffer equals the eager product bit for bit (same kernels and
 *    algorithm on the same inputs: cuBLAS is run-to-run reproducible on one
 *    stream).
 * Needs a CUDA device; fails (not skips) without one. */
#include "quant/quant.h"
#include "tests/gpu/gpu_test.h"

/* A packed weight on both backends: host bytes and their weight_load copy. */
typedef struct fp8_twin {
    nb_weight c, g;
} fp8_twin;

static fp8_twin fp8_upload(void *data, float *scale, int64_t N, int64_t K) {
    fp8_twin w;
    w.c = (nb_weight){.dtype = NB_FP8_B128, .rows = N, .cols = K, .data = data, .scale = scale};
    w.g = w.c;
    w.g.data = gpu->ops->weight_load(gpu, data, quant_data_bytes(NB_FP8_B128, N, K));
    w.g.scale = gpu->ops->weight_load(gpu, scale, quant_scale_bytes(NB_FP8_B128, N, K, 0));
    return w;
}

/* Gaussian weights whose magnitude changes from block to block (so the
 * block scales differ), packed with quant_pack. */
static fp8_twin fp8_random(int64_t N, int64_t K) {
    float *W = randn((size_t)(N * K), 0.05f);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) W[n * K + k] *= (float)(1 + (n / 128) % 3) * (float)(1 + 3 * ((k / 128) % 2));
    void *data = xmalloc(quant_data_bytes(NB_FP8_B128, N, K));
    float *scale = xmalloc(quant_scale_bytes(NB_FP8_B128, N, K, 0));
    nb_err e = {{0}};
    if (quant_pack(NB_FP8_B128, W, N, K, 0, data, scale, NULL, &e)) {
        fprintf(stderr, "quant_pack [%lld, %lld]: %s\n", (long long)N, (long long)K, e.msg);
        abort();
    }
    free(W);
    return fp8_upload(data, scale, N, K);
}

static void fp8_free(fp8_twin *w) {
    gpu->ops->weight_free(gpu, w->g.data);
    gpu->ops->weight_free(gpu, w->g.scale);
    free((void *)w->c.data);
    free((void *)w->c.scale);
}

/* Activations with row and block magnitudes spread over 1e-2..1e2, every
 * 37th value 1e-5 of its neighbours (subnormal E4M3 codes), and row 1's
 * first block all zeros (scale 0). */
static float *fp8_acts(int M, int64_t K) {
    float *x = randn((size_t)M * (size_t)K, 1.0f);
    for (int m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
            float *v = &x[(size_t)m * K + k];
            *v *= powf(10.0f, (float)(m % 5 - 2)) * (float)(1 + (k / 128) % 3);
            if ((m * K + k) % 37 == 5) *v *= 1e-5f;
        }
    if (M > 1)
        for (int64_t k = 0; k < K && k < QUANT_FP8_BLOCK; k++) x[K + k] = 0.0f;
    return x;
}

/* The bound of the path M rows take (see the top): the GEMV's for M <= 16
 * where K is not whole 128-column blocks, else the tensor cores'. */
static double fp8_tol(int M, int64_t K) { return M <= 16 && K % QUANT_FP8_BLOCK ? 1e-3 : 2e-3; }

/* Values that pin the rounding down (row 0, block 0, whose maximum 448
 * makes the scale exactly 1): ties to even at 1.0625 (-> 1) and 1.1875
 * (-> 1.25), subnormal ties at 1.5 * 2^-9 (-> 2^-8) and -0.5 * 2^-9
 * (-> -0), 447.9 (-> 448), 300 (-> 288). */
static void plant_ties(float *x, int64_t K) {
    static const float v[] = {448.0f, 1.0625f, 1.1875f, 0.0029296875f, -0.0009765625f, 447.9f, 300.0f};
    for (size_t i = 0; i < sizeof v / sizeof v[0] && (int64_t)i < K; i++) x[i] = v[i];
    for (int64_t k = 7; k < K && k < QUANT_FP8_BLOCK; k++) x[k] = fmaxf(fminf(x[k], 400.0f), -400.0f);
}

/* ---- activation quantization ------------------------------------------------ */

static void check_quant(int64_t K) {
    static const int Ms[] = {1, 3, 16, 17, 64, 301};
    enum { N_M = sizeof Ms / sizeof Ms[0], M_MAX = 301 };
    int64_t N = K;
    uint8_t *data = xcalloc((size_t)(N * K), 1);
    size_t sb = quant_scale_bytes(NB_FP8_B128, N, K, 0);
    float *scale = xmalloc(sb);
    for (size_t i = 0; i < sb / sizeof(float); i++) scale[i] = 1.0f;
    uint8_t one = fp8_e4m3_from_f32(1.0f);
    for (int64_t n = 0; n < N; n++) data[n * K + n] = one;
    fp8_twin w = fp8_upload(data, scale, N, K);

    float *x = fp8_acts(M_MAX, K);
    plant_ties(x, K);
    float *xa = xmalloc(sizeof(float) * M_MAX * (size_t)K), *got = xmalloc(sizeof(float) * M_MAX * (size_t)N);
    CHECK(quant_act_rows(xa, x, &w.c, M_MAX) == 1, "quant_act_rows does not quantize NB_FP8_B128");
    float *dx = to_gpu(x, sizeof(float) * M_MAX * (size_t)K);
    float *dout = gpu->ops->alloc(gpu, sizeof(float) * M_MAX * (size_t)N);
    for (int i = 0; i < N_M; i++) {
        int M = Ms[i];
        size_t no = (size_t)M * N;
        WHERE("fp8 activation quantization M=%d K=%lld", M, (long long)K);
        gpu->ops->matmul(gpu, dout, dx, &w.g, M);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        size_t bad = 0, first = 0;
        for (size_t j = 0; j < no; j++)
            if (!(got[j] == xa[j])) { /* N == K: out row m is x row m */
                if (!bad) first = j;
                bad++;
            }
        CHECK(bad == 0, "%s: %zu of %zu values differ from quant_act_rows; first [%zu][%zu]: %.9g, want %.9g",
              t_where, bad, no, first / (size_t)N, first % (size_t)N, got[first], xa[first]);
    }
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout);
    free(x), free(xa), free(got);
    fp8_free(&w);
}

/* K = N = 512 (cuBLASLt above 16 rows, scales as they are), 384 (scales
 * padded to 4 K blocks), 64 (one short block), 200 (K % 16 != 0: the GEMV
 * kernel's scalar path at every M). */
static void test_quantization(void) {
    static const int64_t Ks[] = {512, 384, 64, 200};
    for (int i = 0; i < 4; i++) check_quant(Ks[i]);
}

/* ---- products ------------------------------------------------------------------- */

/* The rows of an M-row product compared with the reference: all up to 64,
 * else both ends and every 17th (the reference is one plain FP32 loop). */
static int sampled(int m, int M) { return M <= 64 || m < 32 || m >= M - 32 || m % 17 == 0; }

static void check_product(int64_t N, int64_t K, double worst[3]) {
    static const int Ms[] = {1, 2, 5, 8, 16, 17, 33, 64, 128, 300, 1024};
    enum { N_M = sizeof Ms / sizeof Ms[0], M_MAX = 1024 };
    fp8_twin w = fp8_random(N, K);
    float *x = fp8_acts(M_MAX, K);

    /* the reference for every row any M samples, in one call */
    int *idx = xmalloc(sizeof(int) * M_MAX), nr = 0;
    for (int m = 0; m < M_MAX; m++) {
        idx[m] = -1;
        for (int i = 0; i < N_M; i++)
            if (m < Ms[i] && sampled(m, Ms[i])) idx[m] = 0;
        if (idx[m] == 0) idx[m] = nr++;
    }
    float *xr = xmalloc(sizeof(float) * (size_t)nr * (size_t)K), *ref = xmalloc(sizeof(float) * (size_t)nr * (size_t)N);
    for (int m = 0; m < M_MAX; m++)
        if (idx[m] >= 0) memcpy(xr + (size_t)idx[m] * K, x + (size_t)m * K, sizeof(float) * (size_t)K);
    quant_matmul_ref(ref, xr, &w.c, nr);

    size_t oo = (size_t)M_MAX * N;
    float *got = xmalloc(sizeof(float) * oo), *gs = xmalloc(sizeof(float) * oo), *rs = xmalloc(sizeof(float) * oo);
    unsigned char *poison = xmalloc(sizeof(float) * oo);
    memset(poison, 0xff, sizeof(float) * oo); /* NaN: rows the GPU leaves unwritten fail */
    float *dx = to_gpu(x, sizeof(float) * M_MAX * (size_t)K), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo);
    for (int i = 0; i < N_M; i++) {
        int M = Ms[i];
        size_t no = (size_t)M * N, ns = 0, nonfinite = 0;
        WHERE("fp8 matmul M=%d N=%lld K=%lld", M, (long long)N, (long long)K);
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        gpu->ops->matmul(gpu, dout, dx, &w.g, M);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        for (size_t j = 0; j < no; j++) nonfinite += !isfinite(got[j]);
        for (int m = 0; m < M; m++)
            if (sampled(m, M)) {
                memcpy(gs + ns, got + (size_t)m * N, sizeof(float) * (size_t)N);
                memcpy(rs + ns, ref + (size_t)idx[m] * N, sizeof(float) * (size_t)N);
                ns += (size_t)N;
            }
        double err = rel_max(gs, rs, ns), tol = fp8_tol(M, K);
        CHECK(nonfinite == 0, "%s: %zu of %zu outputs not finite (unwritten?)", t_where, nonfinite, no);
        CHECK(err <= tol, "%s: max |diff| / max |ref| = %.3g > %g", t_where, err, tol);
        note_worst(&worst[M > 16 ? 2 : K % QUANT_FP8_BLOCK ? 0 : 1], err);
    }
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout);
    free(x), free(idx), free(xr), free(ref), free(got), free(gs), free(rs), free(poison);
    fp8_free(&w);
}

/* (N, K): K off multiples of 16 takes the GEMV kernel at every M; N % 4
 * != 0 (cuBLASLt refuses it) the GEMV up to 16 rows and fp8_mma_kernel
 * above, (131, 208) with a last K block of one short k-tile; (256, 336),
 * (64, 64) are cuBLASLt shapes with a short last K block. */
static void test_products(void) {
    static const int64_t NK[][2] = {{1, 128},   {7, 130},   {129, 256},   {131, 208},   {256, 384},
                                    {256, 336}, {64, 64},   {1000, 1024}, {4096, 4096}, {300, 4100}};
    double worst[3] = {0, 0, 0};
    for (size_t i = 0; i < sizeof NK / sizeof NK[0]; i++) check_product(NK[i][0], NK[i][1], worst);
    printf("  fp8 matmul: worst max|diff|/max|ref| %.2e for M <= 16 (GEMV), %.2e (FP8 mma, K %% 128 == 0), %.2e "
           "above\n",
           worst[0], worst[1], worst[2]);
}

/* ---- CUDA graphs -------------------------------------------------------------------- */

/* Per M (cuda_fp8_small; cuBLASLt with a tail of 3 rows for it; cuBLASLt alone): the
 * product recorded under a key, then replayed on new activations uploaded
 * into the same buffer, against the eager product of those and the CPU.
 * Runs first, so the backend's FP8 state, cuBLASLt plans and scratch are
 * all made while a graph is being recorded. */
static void test_graph(void) {
    static const int Ms[] = {5, 19, 40};
    enum { M_MAX = 40 };
    int64_t N = 256, K = 384;
    fp8_twin w = fp8_random(N, K);
    size_t xo = (size_t)M_MAX * K, oo = (size_t)M_MAX * N;
    float *x1 = fp8_acts(M_MAX, K), *x2 = fp8_acts(M_MAX, K);
    for (size_t i = 0; i < xo; i++) x2[i] *= -0.7f;
    float *ref = xmalloc(sizeof(float) * oo), *got = xmalloc(sizeof(float) * oo), *eager = xmalloc(sizeof(float) * oo);
    for (int i = 0; i < 3; i++) {
        int M = Ms[i];
        size_t no = (size_t)M * N;
        uint64_t key = 0xf8000 + (uint64_t)M;
        float *dx = to_gpu(x1, sizeof(float) * xo), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo),
              *dout2 = gpu->ops->alloc(gpu, sizeof(float) * oo);
        WHERE("fp8 graph M=%d: record", M);
        int r = graph_matmul(key, dout, dx, &w.g, M);
        CHECK(r == 0, "%s: graph_begin(new key) returned %d", t_where, r);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        quant_matmul_ref(ref, x1, &w.c, M);
        double e1 = rel_max(got, ref, no);
        CHECK(e1 <= fp8_tol(M, K), "%s: error %.3g", t_where, e1);

        WHERE("fp8 graph M=%d: replay", M);
        gpu->ops->upload(gpu, dx, x2, sizeof(float) * xo);
        r = graph_matmul(key, dout, dx, &w.g, M);
        CHECK(r == 1, "%s: graph_begin(recorded key) returned %d", t_where, r);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        gpu->ops->matmul(gpu, dout2, dx, &w.g, M);
        gpu->ops->download(gpu, eager, dout2, sizeof(float) * no);
        size_t bad = n_mismatch(got, eager, no);
        CHECK(bad == 0, "%s: %zu of %zu values differ from the eager product", t_where, bad, no);
        quant_matmul_ref(ref, x2, &w.c, M);
        double e2 = rel_max(got, ref, no);
        CHECK(e2 <= fp8_tol(M, K), "%s: error %.3g vs the CPU", t_where, e2);
        /* frees drop the recorded graphs: only after the replay */
        gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout), gpu->ops->free(gpu, dout2);
    }
    free(x1), free(x2), free(ref), free(got), free(eager);
    fp8_free(&w);
}

/* ---- matmul_silu --------------------------------------------------------------------- */

/* matmul_silu on FP8 weights makes silu(gate) * up in the activation
 * quantization kernel: the values silu_mul writes, so the product must
 * equal silu_mul then matmul bit for bit (the same kernels after the
 * quantization), on every path M takes (cuda_fp8_small.cu, the GEMV for
 * K % 128 != 0, cuBLASLt with a tail), gate and up in one buffer (a fused
 * gate|up projection's rows, ld = 2K) or apart (ld = K). Other dtypes
 * decline (1) and write nothing. */
static void test_matmul_silu(void) {
    static const int Ms[] = {1, 5, 16, 17, 40};
    static const int64_t Ks[] = {512, 200};
    enum { M_MAX = 40, N = 96 };
    for (int ki = 0; ki < 2; ki++) {
        const int64_t K = Ks[ki];
        fp8_twin w = fp8_random(N, K);
        float *gu = randn((size_t)M_MAX * 2 * (size_t)K, 2.0f);
        float *dgu = to_gpu(gu, sizeof(float) * M_MAX * 2 * (size_t)K);
        float *dact = gpu->ops->alloc(gpu, sizeof(float) * M_MAX * (size_t)K);
        float *dref = gpu->ops->alloc(gpu, sizeof(float) * M_MAX * N), *dout = gpu->ops->alloc(gpu, sizeof(float) * M_MAX * N);
        for (int fused = 0; fused < 2; fused++) {
            const int ld = fused ? 2 * (int)K : (int)K;
            const float *g = dgu, *u = fused ? dgu + K : dgu + (size_t)M_MAX * K;
            for (int i = 0; i < 5; i++) {
                const int M = Ms[i];
                WHERE("fp8 matmul_silu M=%d K=%lld ld=%d", M, (long long)K, ld);
                check_matmul_silu(dout, dref, dact, g, u, ld, &w.g, M);
            }
        }
        /* a BF16 weight: declined, out untouched */
        twin_weight bw = make_weight(NB_BF16, N, K, 0.05f);
        check_matmul_silu_declined(dout, dgu, dgu + K, 2 * (int)K, &bw.g, 1, "a bf16 weight");
        free_weight(&bw);
        gpu->ops->free(gpu, dgu), gpu->ops->free(gpu, dact), gpu->ops->free(gpu, dref), gpu->ops->free(gpu, dout);
        free(gu);
        fp8_free(&w);
    }
}

static void test_supported(void) { CHECK(gpu->ops->supports(gpu, NB_FP8_B128), "supports(NB_FP8_B128)"); }

int main(void) {
    if (gpu_tests_start()) TEST_DONE("test_cuda_fp8");
    RUN(test_supported);
    RUN(test_graph);
    RUN(test_quantization);
    RUN(test_products);
    RUN(test_matmul_silu);
    backend_destroy(gpu);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_fp8");
}
