/* The CUDA backend against the CPU backend, op by op (`make test-gpu`;
 * `make test` only builds this). The CPU backend is the reference: it is
 * checked against double-precision references in tests/test_kernels_cpu.c.
 * Every op of the table runs on both backends on the same random inputs
 * (tests/test.h's seeded generator) over sweeps of shapes with odd sizes: the
 * CPU on host buffers, the GPU on copies made with ops->upload (weights with
 * ops->weight_load), its results read back with ops->download. What each
 * comparison allows:
 *  - bit for bit where both do the same IEEE operations: embedding,
 *    gather_rows, zero, add, add_bias, the residual of
 *    add_rmsnorm, argmax;
 *  - FP32 summation order, expf, cosf/sinf: norms, rope, silu_mul
 *    (1e-5 relative), softmax (1e-3: the CPU's sum over
 *    128k terms is itself ~2e-4 off);
 *  - matmul: FP32 activations for M <= 8 (the GEMV path: 1e-4 of the output
 *    norm), BF16/F16 activations on tensor cores above (1e-2);
 * KV cache writes, rope_kv_write (rope, with Qwen3's per-head norms or
 * without, and the KV write in one op on fused q|k|v rows), attention and
 * recorded steps: test_cuda_attention.c.
 * Needs a CUDA device; fails (not skips) without one. */
#include "tests/gpu/gpu_test.h"

static void test_memory(void) {
    static const size_t sizes[] = {1, 63, 4097, (1u << 20) + 3};
    for (int i = 0; i < 4; i++) {
        size_t n = sizes[i];
        WHERE("memory %zu bytes", n);
        unsigned char *d = gpu->ops->alloc(gpu, n);
        REQUIRE(d != NULL, "alloc(%zu)", n);
        unsigned char *h = xmalloc(n), *src = xmalloc(n);
        memset(h, 0xab, n);
        gpu->ops->download(gpu, h, d, n);
        size_t nz = 0;
        for (size_t j = 0; j < n; j++) nz += h[j] != 0;
        CHECK(nz == 0, "alloc(%zu) is not zeroed: %zu bytes", n, nz);
        for (size_t j = 0; j < n; j++) src[j] = (unsigned char)(j * 7 + 1);
        gpu->ops->upload(gpu, d, src, n);
        memset(h, 0, n);
        gpu->ops->download(gpu, h, d, n);
        CHECK(!memcmp(h, src, n), "upload/download of %zu bytes", n);
        if (n > 8) { /* at odd offsets */
            gpu->ops->upload(gpu, d + 3, src + 1, n - 5);
            memset(h, 0, n);
            gpu->ops->download(gpu, h, d + 3, n - 5);
            CHECK(!memcmp(h, src + 1, n - 5), "upload/download of %zu bytes at offset 3", n - 5);
        }
        const void *w = gpu->ops->weight_load(gpu, src, n);
        CHECK(w != NULL && w != (const void *)src, "weight_load must copy to the device");
        memset(h, 0, n);
        gpu->ops->download(gpu, h, w, n);
        CHECK(!memcmp(h, src, n), "weight_load of %zu bytes", n);
        gpu->ops->weight_free(gpu, w);
        gpu->ops->free(gpu, d);
        free(h), free(src);
    }
    size_t fr = 0, tot = 0;
    int rc = gpu->ops->mem_info(gpu, &fr, &tot);
    CHECK(rc == 0, "mem_info returned %d, want 0 (device memory is budgeted)", rc);
    CHECK(tot > 0 && fr > 0 && fr <= tot, "mem_info: %zu bytes free of %zu", fr, tot);
    printf("  device memory: %.2f GiB free of %.2f GiB\n", fr / 1073741824.0, tot / 1073741824.0);
    CHECK(gpu->ops->supports(gpu, NB_BF16), "supports(BF16)");
    /* the matmul sweep below also takes these */
    CHECK(gpu->ops->supports(gpu, NB_F16) && gpu->ops->supports(gpu, NB_F32), "supports(F16), supports(F32)");
    gpu->ops->sync(gpu);
}

/* ---- embedding, norms ------------------------------------------------------ */

static void test_embedding(void) {
    static const int colss[] = {17, 64, 4096};
    static const int ns[] = {1, 37};
    for (int t = 0; t < 3; t++)
        for (int c = 0; c < 3; c++)
            for (int k = 0; k < 2; k++) {
                int rows = 300, cols = colss[c], n = ns[k];
                WHERE("embedding %s cols=%d n=%d", nb_dtype_name((nb_dtype)t), cols, n);
                twin_weight tab = make_weight((nb_dtype)t, rows, cols, 1.0f);
                int32_t tok[37];
                for (int i = 0; i < n; i++) tok[i] = irand(rows);
                if (n > 3) tok[1] = 0, tok[2] = rows - 1, tok[3] = tok[0]; /* both ends, a repeat */
                size_t no = (size_t)n * cols;
                float *ref = xmalloc(sizeof(float) * no);
                cpu->ops->embedding(cpu, ref, &tab.c, tok, n);
                float *d = gpu->ops->alloc(gpu, sizeof(float) * no);
                gpu->ops->embedding(gpu, d, &tab.g, tok, n);
                float *got = from_gpu(d, no);
                size_t bad = n_mismatch(got, ref, no);
                CHECK(bad == 0, "%s: %zu of %zu values differ", t_where, bad, no);
                gpu->ops->free(gpu, d);
                free(ref), free(got);
                free_weight(&tab);
            }
}

static void test_rmsnorm(void) {
    static const int colss[] = {17, 64, 4096, 5120};
    static const int ns[] = {1, 7};
    double worst = 0;
    for (int t = 0; t < 3; t++)
        for (int c = 0; c < 4; c++)
            for (int k = 0; k < 2; k++) {
                int cols = colss[c], n = ns[k];
                size_t len = (size_t)n * cols;
                WHERE("rmsnorm %s cols=%d n=%d", nb_dtype_name((nb_dtype)t), cols, n);
                twin_weight w = make_weight((nb_dtype)t, 1, cols, 1.0f);
                float *x = randn(len, 3.0f), *ref = xmalloc(sizeof(float) * len);
                cpu->ops->rmsnorm(cpu, ref, x, &w.c, n, 1e-5f);
                float *dx = to_gpu(x, sizeof(float) * len), *dout = gpu->ops->alloc(gpu, sizeof(float) * len);
                gpu->ops->rmsnorm(gpu, dout, dx, &w.g, n, 1e-5f);
                gpu->ops->rmsnorm(gpu, dx, dx, &w.g, n, 1e-5f); /* out == x */
                float *got = from_gpu(dout, len), *got_in = from_gpu(dx, len);
                double e1 = rel_max(got, ref, len), e2 = rel_max(got_in, ref, len);
                CHECK(e1 <= 1e-5, "%s: error %.3g", t_where, e1);
                CHECK(e2 <= 1e-5, "%s in place: error %.3g", t_where, e2);
                note_worst(&worst, e1), note_worst(&worst, e2);
                gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout);
                free(x), free(ref), free(got), free(got_in);
                free_weight(&w);
            }
    printf("  rmsnorm: worst error %.2e of max |out|\n", worst);
}

/* x += delta, out = rmsnorm(x): the residual bit for bit, the norm as
 * rmsnorm; out separate and out == delta (as the model calls it). */
static void test_add_rmsnorm(void) {
    static const int colss[] = {17, 64, 4096, 5120};
    double worst = 0;
    for (int t = 0; t < 3; t++)
        for (int c = 0; c < 4; c++)
            for (int alias = 0; alias < 2; alias++) {
                int cols = colss[c], n = 5;
                size_t len = (size_t)n * cols, bytes = sizeof(float) * len;
                WHERE("add_rmsnorm %s cols=%d%s", nb_dtype_name((nb_dtype)t), cols, alias ? " out == delta" : "");
                twin_weight w = make_weight((nb_dtype)t, 1, cols, 1.0f);
                float *x = randn(len, 2.0f), *delta = randn(len, 1.0f);
                float *xc = copy_floats(x, len), *outc = alias ? copy_floats(delta, len) : xmalloc(bytes);
                cpu->ops->add_rmsnorm(cpu, outc, xc, alias ? outc : delta, &w.c, n, 1e-6f);
                float *dx = to_gpu(x, bytes), *dd = to_gpu(delta, bytes);
                float *dout = alias ? dd : gpu->ops->alloc(gpu, bytes);
                gpu->ops->add_rmsnorm(gpu, dout, dx, dd, &w.g, n, 1e-6f);
                float *gx = from_gpu(dx, len), *gout = from_gpu(dout, len);
                size_t bad = n_mismatch(gx, xc, len);
                CHECK(bad == 0, "%s: residual x + delta: %zu of %zu differ", t_where, bad, len);
                double err = rel_max(gout, outc, len);
                CHECK(err <= 1e-5, "%s: error %.3g", t_where, err);
                note_worst(&worst, err);
                gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dd);
                if (!alias) gpu->ops->free(gpu, dout);
                free(x), free(delta), free(xc), free(outc), free(gx), free(gout);
                free_weight(&w);
            }
    printf("  add_rmsnorm: worst error %.2e of max |out|\n", worst);
}

/* ---- matmul ---------------------------------------------------------------- */

/* out[M,N] = x[M,K] @ w^T for every M of the sweep on one weight. The error
 * is judged on the whole output, against max(||ref||, ||x|| ||w|| / sqrt(K))
 * (the size the output has when its dot products do not cancel), so a
 * product that happens to cancel to near zero is not held to a relative
 * bound it cannot meet. Bounds: M <= 8 takes the backend's GEMV path, which
 * reads the activations as FP32, so only the FP32 summation order differs:
 * 1e-4 (expected ~1e-6). M > 8 goes to cuBLASLt with the activations
 * rounded to BF16 (F16 for F16 weights): 1e-2 (expected ~3e-3). */
static void check_matmul(nb_dtype t, int64_t N, int64_t K, double worst[2]) {
    static const int Ms[] = {1, 2, 3, 7, 8, 9, 16, 33, 128, 257};
    enum { N_M = sizeof Ms / sizeof Ms[0], M_MAX = 257 };
    twin_weight w = make_weight(t, N, K, 0.05f);
    double wn = 0;
    for (int64_t i = 0; i < N * K; i++) {
        float v = t == NB_BF16 ? bf16_to_f32(((const uint16_t *)w.c.data)[i])
                  : t == NB_F16 ? f16_to_f32(((const uint16_t *)w.c.data)[i])
                               : ((const float *)w.c.data)[i];
        wn += (double)v * v;
    }
    wn = sqrt(wn);
    size_t xo = (size_t)M_MAX * K, oo = (size_t)M_MAX * N;
    float *x = randn(xo, 1.0f), *ref = xmalloc(sizeof(float) * oo), *got = xmalloc(sizeof(float) * oo);
    unsigned char *poison = xmalloc(sizeof(float) * oo);
    memset(poison, 0xff, sizeof(float) * oo); /* NaN: rows the GPU leaves unwritten fail */
    float *dx = to_gpu(x, sizeof(float) * xo), *dout = gpu->ops->alloc(gpu, sizeof(float) * oo);
    for (int i = 0; i < N_M; i++) {
        int M = Ms[i];
        size_t no = (size_t)M * N;
        WHERE("matmul %s M=%d N=%lld K=%lld", nb_dtype_name(t), M, (long long)N, (long long)K);
        cpu->ops->matmul(cpu, ref, x, &w.c, M);
        gpu->ops->upload(gpu, dout, poison, sizeof(float) * no);
        gpu->ops->matmul(gpu, dout, dx, &w.g, M);
        gpu->ops->download(gpu, got, dout, sizeof(float) * no);
        double floor = norm2(x, (size_t)M * K) * wn / sqrt((double)K);
        double err = rel_l2(got, ref, no, floor);
        int big = M > 8;
        double tol = big ? 1e-2 : 1e-4;
        CHECK(err <= tol, "%s: relative error %.3g > %g", t_where, err, tol);
        note_worst(&worst[big], err);
    }
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout);
    free(x), free(ref), free(got), free(poison);
    free_weight(&w);
}

static void test_matmul(void) {
    static const int64_t NKs[] = {1, 3, 17, 100, 1000};
    for (int t = 0; t < 3; t++) {
        double worst[2] = {0, 0};
        for (int a = 0; a < 5; a++)
            for (int b = 0; b < 5; b++) check_matmul((nb_dtype)t, NKs[a], NKs[b], worst);
        check_matmul((nb_dtype)t, 4096, 4096, worst);
        check_matmul((nb_dtype)t, 4099, 100, worst); /* N not a multiple of the GEMV's 8 columns per block */
        printf("  matmul %-4s: worst relative error %.2e for M <= 8 (FP32 activations), %.2e above\n",
               nb_dtype_name((nb_dtype)t), worst[0], worst[1]);
    }
}

/* Where cuBLASLt has no algorithm for a shape (it may say so by its status
 * or by finding none), the GEMV kernel takes the product in passes, every
 * M of the sweep. The emulator is told to find none (CUEMU_LT_NO_ALGO); a
 * GPU's cuBLASLt ignores that and the same checks run on it. Shapes unused
 * above, since the backend keeps each shape's answer. */
static void test_matmul_no_algo(void) {
    static const char *answers[] = {"status", "none"};
    for (int a = 0; a < 2; a++) {
        setenv("CUEMU_LT_NO_ALGO", answers[a], 1);
        for (int t = 0; t < 3; t++) {
            double worst[2] = {0, 0};
            check_matmul((nb_dtype)t, 37 + a, 45, worst);
            check_matmul((nb_dtype)t, 300 + a, 64, worst);
            printf("  matmul %-4s, cuBLASLt answering %-6s: worst relative error %.2e for M <= 8, %.2e above\n",
                   nb_dtype_name((nb_dtype)t), answers[a], worst[0], worst[1]);
        }
    }
    unsetenv("CUEMU_LT_NO_ALGO");
}

/* ---- elementwise ----------------------------------------------------------- */

static void test_add_bias(void) {
    static const int colss[] = {1, 17, 4096};
    static const int Ms[] = {1, 9, 33};
    for (int t = 0; t < 3; t++)
        for (int c = 0; c < 3; c++)
            for (int m = 0; m < 3; m++) {
                int cols = colss[c], M = Ms[m];
                size_t len = (size_t)M * cols;
                WHERE("add_bias %s cols=%d M=%d", nb_dtype_name((nb_dtype)t), cols, M);
                twin_weight bias = make_weight((nb_dtype)t, 1, cols, 1.0f);
                float *x = randn(len, 1.0f), *dx = to_gpu(x, sizeof(float) * len);
                cpu->ops->add_bias(cpu, x, &bias.c, M);
                gpu->ops->add_bias(gpu, dx, &bias.g, M);
                float *got = from_gpu(dx, len);
                size_t bad = n_mismatch(got, x, len);
                CHECK(bad == 0, "%s: %zu of %zu differ", t_where, bad, len);
                gpu->ops->free(gpu, dx);
                free(x), free(got);
                free_weight(&bias);
            }
}

/* add bit for bit, also with out aliasing either input; silu_mul within
 * expf's rounding on packed rows (ld == cols), also with out == gate. */
static void test_add_silu_mul(void) {
    static const struct {
        int n, cols;
    } shapes[] = {{1, 1}, {1, 17}, {4, 1024}, {3, 100001}};
    double worst = 0;
    for (int k = 0; k < 4; k++) {
        int rows = shapes[k].n, cols = shapes[k].cols;
        size_t n = (size_t)rows * cols, bytes = sizeof(float) * n;
        WHERE("add/silu_mul %d x %d", rows, cols);
        float *a = randn(n, 4.0f), *c = randn(n, 1.0f), *ref = xmalloc(bytes);
        float *da = to_gpu(a, bytes), *dc = to_gpu(c, bytes), *dout = gpu->ops->alloc(gpu, bytes);
        cpu->ops->add(cpu, ref, a, c, n);
        gpu->ops->add(gpu, dout, da, dc, n);
        float *got = from_gpu(dout, n);
        CHECK(n_mismatch(got, ref, n) == 0, "add n=%zu: %zu differ", n, n_mismatch(got, ref, n));
        free(got);
        gpu->ops->add(gpu, da, da, dc, n); /* out == a */
        got = from_gpu(da, n);
        CHECK(n_mismatch(got, ref, n) == 0, "add n=%zu out == a: %zu differ", n, n_mismatch(got, ref, n));
        free(got);
        gpu->ops->upload(gpu, da, a, bytes);
        gpu->ops->add(gpu, dc, da, dc, n); /* out == c */
        got = from_gpu(dc, n);
        CHECK(n_mismatch(got, ref, n) == 0, "add n=%zu out == c: %zu differ", n, n_mismatch(got, ref, n));
        free(got);

        gpu->ops->upload(gpu, dc, c, bytes);
        cpu->ops->silu_mul(cpu, ref, a, c, rows, cols, cols);
        gpu->ops->silu_mul(gpu, dout, da, dc, rows, cols, cols);
        gpu->ops->silu_mul(gpu, da, da, dc, rows, cols, cols); /* out == gate */
        float *g1 = from_gpu(dout, n), *g2 = from_gpu(da, n);
        double e1 = rel_elem(g1, ref, n), e2 = rel_elem(g2, ref, n);
        CHECK(e1 <= 1e-5 && e2 <= 1e-5, "silu_mul %d x %d: relative error %.3g, in place %.3g", rows, cols, e1, e2);
        note_worst(&worst, e1), note_worst(&worst, e2);
        gpu->ops->free(gpu, da), gpu->ops->free(gpu, dc), gpu->ops->free(gpu, dout);
        free(a), free(c), free(ref), free(g1), free(g2);
    }
    printf("  silu_mul: worst relative error %.2e per element\n", worst);
}

/* silu_mul on a fused gate|up projection's rows: buf [n][ld] with gate =
 * buf, up = buf + cols (ld = 2 * cols, as the model calls it, and an odd ld
 * with padding, whose rows sit at every alignment). Against the CPU on the
 * same buffer; out is packed [n][cols], so the floats after it must stay
 * untouched, and so must the input. */
static void test_silu_mul_strided(void) {
    static const struct {
        int n, cols, pad; /* ld = 2 * cols + pad */
    } cfg[] = {{1, 1, 0}, {1, 17, 0}, {5, 33, 3}, {7, 1024, 0}, {70, 300, 1}, {3, 14336, 0}};
    enum { GUARD = 64 };
    double worst = 0;
    for (size_t k = 0; k < sizeof cfg / sizeof cfg[0]; k++) {
        int rows = cfg[k].n, cols = cfg[k].cols, ld = 2 * cols + cfg[k].pad;
        size_t len = (size_t)rows * ld, n = (size_t)rows * cols, ob = n + GUARD;
        WHERE("silu_mul strided %d x %d ld=%d", rows, cols, ld);
        float *buf = randn(len, 3.0f), *ref = xmalloc(sizeof(float) * ob), *init = xmalloc(sizeof(float) * ob);
        for (size_t i = 0; i < ob; i++) init[i] = ref[i] = -1234.5f; /* sentinel past out's n floats */
        float *dbuf = to_gpu(buf, sizeof(float) * len), *dout = to_gpu(init, sizeof(float) * ob);
        cpu->ops->silu_mul(cpu, ref, buf, buf + cols, rows, cols, ld);
        gpu->ops->silu_mul(gpu, dout, dbuf, dbuf + cols, rows, cols, ld);
        float *got = from_gpu(dout, ob), *gbuf = from_gpu(dbuf, len);
        double err = rel_elem(got, ref, n);
        CHECK(err <= 1e-5, "%s: relative error %.3g", t_where, err);
        size_t past = n_mismatch(got + n, init + n, GUARD), in = n_mismatch(gbuf, buf, len);
        CHECK(past == 0, "%s: %zu of the %d floats after out written", t_where, past, GUARD);
        CHECK(in == 0, "%s: %zu input floats changed", t_where, in);
        note_worst(&worst, err);
        gpu->ops->free(gpu, dbuf), gpu->ops->free(gpu, dout);
        free(buf), free(ref), free(init), free(got), free(gbuf);
    }
    printf("  silu_mul on fused gate|up rows: worst relative error %.2e per element\n", worst);
}

/* ---- rope ------------------------------------------------------------------- */

/* rope on rows `stride` floats apart against the CPU on the same rows: the
 * first heads * hd floats of each row rotated, the rest of the row (a fused
 * q|k|v row's V, or padding) untouched on the GPU, bit for bit. Returns the
 * error of the rotated part (of max |x|). */
static double check_rope(int il, int hd, int n, int heads, int stride) {
    int half = hd / 2;
    size_t len = (size_t)n * stride;
    float *inv = xmalloc(sizeof(float) * half);
    for (int i = 0; i < half; i++) inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / hd));
    plain_batch pb;
    plain_batch_init(&pb, n);
    for (int t = 3; t < n; t++) pb.pos[t] = irand(8192);
    if (n >= 5) pb.pos[3] = 8000, pb.pos[4] = 8191; /* large angles */
    float *x = randn(len, 1.0f), *x0 = copy_floats(x, len), *dx = to_gpu(x, sizeof(float) * len);
    float *dinv = to_gpu(inv, sizeof(float) * half);
    cpu->ops->set_batch(cpu, &pb.b);
    gpu->ops->set_batch(gpu, &pb.b);
    cpu->ops->rope(cpu, x, heads, hd, stride, inv, il);
    gpu->ops->rope(gpu, dx, heads, hd, stride, dinv, il);
    float *got = from_gpu(dx, len);
    /* the rotated part, compared row by row; the rest must be the input */
    size_t w = (size_t)heads * hd, rest = 0;
    float *gr = xmalloc(sizeof(float) * n * w), *cr = xmalloc(sizeof(float) * n * w);
    for (int t = 0; t < n; t++) {
        memcpy(gr + t * w, got + (size_t)t * stride, sizeof(float) * w);
        memcpy(cr + t * w, x + (size_t)t * stride, sizeof(float) * w);
        rest += n_mismatch(got + (size_t)t * stride + w, x0 + (size_t)t * stride + w, (size_t)stride - w);
    }
    double err = rel_max(gr, cr, (size_t)n * w);
    CHECK(err <= 1e-5, "%s: error %.3g of max |x|", t_where, err);
    CHECK(rest == 0, "%s: %zu floats past the rotated heads changed", t_where, rest);
    gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dinv);
    free(inv), free(x), free(x0), free(got), free(gr), free(cr);
    plain_batch_free(&pb);
    return err;
}

static void test_rope(void) {
    static const int hds[] = {16, 64, 128, 256};
    static const struct {
        int n, heads;
    } cfg[] = {{1, 2}, {5, 3}, {70, 8}};
    double worst = 0;
    for (int il = 0; il < 2; il++)
        for (int d = 0; d < 4; d++)
            for (int c = 0; c < 3; c++) {
                int hd = hds[d], n = cfg[c].n, heads = cfg[c].heads;
                WHERE("rope %s hd=%d n=%d heads=%d", il ? "interleaved" : "neox", hd, n, heads);
                note_worst(&worst, check_rope(il, hd, n, heads, heads * hd));
            }
    printf("  rope: worst error %.2e of max |x|\n", worst);
}

/* rope on fused q|k|v rows: q and k heads rotated in one call (heads = n_q +
 * n_kv, stride = (n_q + 2 n_kv) * hd), V after them untouched; and rows
 * with a few floats of padding (an odd stride, rows at every alignment). */
static void test_rope_strided(void) {
    static const int hds[] = {16, 64, 128};
    static const struct {
        int n, q_heads, kv_heads, pad;
    } cfg[] = {{1, 2, 1, 0}, {5, 3, 3, 0}, {70, 8, 2, 0}, {6, 4, 2, 5}};
    double worst = 0;
    for (int il = 0; il < 2; il++)
        for (int d = 0; d < 3; d++)
            for (int c = 0; c < 4; c++) {
                int hd = hds[d], n = cfg[c].n, heads = cfg[c].q_heads + cfg[c].kv_heads;
                int stride = (cfg[c].q_heads + 2 * cfg[c].kv_heads) * hd + cfg[c].pad;
                WHERE("rope strided %s hd=%d n=%d heads=%d+%d stride=%d", il ? "interleaved" : "neox", hd, n,
                      cfg[c].q_heads, cfg[c].kv_heads, stride);
                note_worst(&worst, check_rope(il, hd, n, heads, stride));
            }
    printf("  rope on fused q|k|v rows: worst error %.2e of max |x|\n", worst);
}

/* ---- rows ------------------------------------------------------------------- */

static void test_softmax(void) {
    static const int colss[] = {1, 7, 32000, 128256};
    static const int ns[] = {1, 3};
    double worst = 0;
    for (int c = 0; c < 4; c++)
        for (int k = 0; k < 2; k++) {
            int cols = colss[c], n = ns[k];
            size_t len = (size_t)n * cols;
            WHERE("softmax cols=%d n=%d", cols, n);
            float *x = randn(len, 4.0f);
            for (size_t i = 0; i < len; i++) x[i] += 100.0f; /* needs the max subtracted */
            float *dx = to_gpu(x, sizeof(float) * len);
            cpu->ops->softmax(cpu, x, n, cols);
            gpu->ops->softmax(gpu, dx, n, cols);
            float *got = from_gpu(dx, len);
            /* the CPU sums a row's terms one after another in FP32: over
             * 128256 of them its result is ~2e-4 off (measured against
             * double precision), a tree sum much less */
            double err = rel_max(got, x, len);
            CHECK(err <= 1e-3, "%s: error %.3g of the largest probability", t_where, err);
            note_worst(&worst, err);
            for (int r = 0; r < n; r++) {
                double sum = 0;
                for (int i = 0; i < cols; i++) sum += got[(size_t)r * cols + i];
                CHECK(fabs(sum - 1.0) <= 1e-3, "%s: row %d sums to %.7f", t_where, r, sum);
            }
            gpu->ops->free(gpu, dx);
            free(x), free(got);
        }
    printf("  softmax: worst error %.2e of the largest probability\n", worst);
}

static void test_gather_rows(void) {
    static const int colss[] = {1, 17, 4096};
    static const int32_t rows[9] = {49, 0, 7, 7, 23, 1, 48, 0, 30};
    for (int c = 0; c < 3; c++)
        for (int n = 1; n <= 9; n += 8) {
            int cols = colss[c];
            WHERE("gather_rows cols=%d rows=%d", cols, n);
            float *x = randn((size_t)50 * cols, 1.0f), *ref = xmalloc(sizeof(float) * n * cols);
            float *dx = to_gpu(x, sizeof(float) * 50 * cols), *dout = gpu->ops->alloc(gpu, sizeof(float) * n * cols);
            cpu->ops->gather_rows(cpu, ref, x, rows, n, cols);
            gpu->ops->gather_rows(gpu, dout, dx, rows, n, cols);
            float *got = from_gpu(dout, (size_t)n * cols);
            CHECK(n_mismatch(got, ref, (size_t)n * cols) == 0, "%s", t_where);
            gpu->ops->free(gpu, dx), gpu->ops->free(gpu, dout);
            free(x), free(ref), free(got);
        }
}

/* zero on part of a buffer: the bytes before it stay (the rest of the
 * mixture-of-experts ops: test_cuda_moe.c). */
static void test_zero(void) {
    static const int colss[] = {1, 17, 4096};
    for (int c = 0; c < 3; c++) {
        int cols = colss[c];
        size_t out_n = (size_t)32 * cols;
        WHERE("zero cols=%d", cols);
        float *ref = randn(out_n, 1.0f);
        float *dout = to_gpu(ref, sizeof(float) * out_n);
        cpu->ops->zero(cpu, ref + out_n / 2, sizeof(float) * (out_n - out_n / 2));
        gpu->ops->zero(gpu, dout + out_n / 2, sizeof(float) * (out_n - out_n / 2));
        float *got = from_gpu(dout, out_n);
        CHECK(n_mismatch(got, ref, out_n) == 0, "%s", t_where);
        gpu->ops->free(gpu, dout);
        free(ref), free(got);
    }
}

/* The argmax of greedy sample rows. Rows: random; a maximum planted twice
 * (the lower index wins); all equal (index 0); -inf but for a few values;
 * the maximum last; a tie between the middle and the end. No NaN. */
static void test_argmax(void) {
    static const int colss[] = {1, 7, 32000, 128256};
    enum { R = 6 };
    for (int c = 0; c < 4; c++) {
        int cols = colss[c];
        WHERE("argmax cols=%d", cols);
        size_t len = (size_t)R * cols;
        float *x = randn(len, 1.0f);
        int want[R] = {-1, 0, 0, -1, cols - 1, cols / 2};
        int p1 = irand(cols), p2 = irand(cols);
        if (p2 < p1) { int t = p1; p1 = p2; p2 = t; }
        x[(size_t)cols + p1] = 100.0f, x[(size_t)cols + p2] = 100.0f;
        want[1] = p1;
        for (int i = 0; i < cols; i++) x[2 * (size_t)cols + i] = 0.5f;
        for (int i = 0; i < cols; i++) x[3 * (size_t)cols + i] = i % 97 == 5 ? gauss() : -INFINITY;
        x[4 * (size_t)cols + cols - 1] = 100.0f;
        x[5 * (size_t)cols + cols / 2] = 100.0f, x[5 * (size_t)cols + cols - 1] = 100.0f;
        int32_t ref[R], got[R];
        for (int r = 0; r < R; r++) ref[r] = got[r] = -1;
        float *dx = to_gpu(x, sizeof(float) * len);
        nb_sample_row greedy[R];
        for (int r = 0; r < R; r++) greedy[r] = (nb_sample_row){.top_p = 1.0f, .repetition_penalty = 1.0f};
        cpu->ops->sample(cpu, ref, x, R, cols, greedy);
        gpu->ops->sample(gpu, got, dx, R, cols, greedy);
        for (int r = 0; r < R; r++) {
            CHECK(got[r] == ref[r], "%s row %d: cuda %d, cpu %d", t_where, r, got[r], ref[r]);
            if (want[r] >= 0) CHECK(got[r] == want[r], "%s row %d: %d, want %d", t_where, r, got[r], want[r]);
        }
        gpu->ops->free(gpu, dx);
        free(x);
    }
}

int main(void) {
    if (gpu_tests_start()) TEST_DONE("test_cuda_ops");
    RUN(test_memory);
    RUN(test_embedding);
    RUN(test_rmsnorm);
    RUN(test_add_rmsnorm);
    RUN(test_matmul);
    RUN(test_matmul_no_algo);
    RUN(test_add_bias);
    RUN(test_add_silu_mul);
    RUN(test_silu_mul_strided);
    RUN(test_rope);
    RUN(test_rope_strided);
    RUN(test_softmax);
    RUN(test_gather_rows);
    RUN(test_zero);
    RUN(test_argmax);
    backend_destroy(gpu);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_ops");
}
