/* CPU backend ops against naive double-precision references written here:
 * matmul over a sweep of odd shapes and all weight dtypes (also the portable
 * scalar kernel), paged causal GQA attention over mixed prefill/decode
 * batches with scattered block tables, rope in both styles, the norms and
 * elementwise ops, greedy argmax ties through the sample op; every threaded op must give bitwise the same
 * result with 1 and 3 threads. rope_kv_write on fused q|k|v rows (padded
 * or not, every KV cache type, with and without Qwen3's head norms) must
 * equal bit for bit rmsnorm, rope and kv_write on packed rows, V and
 * padding untouched. Ends with a (non-gating) matmul bandwidth line. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/threadpool.h"
#include "test.h"

#define TOL 1e-5

static nb_backend *be1, *be3; /* 1 and 3 threads */

/* ---- helpers ----------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float frand(void) { /* uniform in [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
}

static int irand(int n) { return (int)((frand() + 1.0f) * 0.5f * (float)n) % n; }

static float *rand_floats(size_t n) {
    float *p = xmalloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}

/* A weight of dtype t with random values; *vals gets the exact values it
 * holds (after rounding to t) for the references. */
static nb_weight make_weight(nb_dtype t, int64_t rows, int64_t cols, float **vals) {
    size_t n = (size_t)(rows * cols);
    float *v = rand_floats(n);
    void *data = xmalloc(n * nb_dtype_size(t) + 1);
    for (size_t i = 0; i < n; i++) {
        if (t == NB_BF16) {
            ((uint16_t *)data)[i] = f32_to_bf16(v[i]);
            v[i] = bf16_to_f32(((uint16_t *)data)[i]);
        } else if (t == NB_F16) {
            ((uint16_t *)data)[i] = f32_to_f16(v[i]);
            v[i] = f16_to_f32(((uint16_t *)data)[i]);
        } else {
            ((float *)data)[i] = v[i];
        }
    }
    *vals = v;
    return (nb_weight){.dtype = t, .rows = rows, .cols = cols, .data = data};
}

/* |got - ref| <= TOL * max(|ref|, scale) for every element; returns the
 * number of failures and reports the first. */
static int compare(const char *what, const float *got, const double *ref, const double *scale, size_t n,
                   double tol) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        double s = fabs(ref[i]);
        if (scale && scale[i] > s) s = scale[i];
        if (s < 1e-30) s = 1e-30;
        double err = fabs((double)got[i] - ref[i]);
        if (!(err <= tol * s)) {
            if (!bad)
                fprintf(stderr, "  %s: element %zu: got %.9g want %.9g (rel %.3g)\n", what, i, got[i], ref[i],
                        err / s);
            bad++;
        }
    }
    return bad;
}

/* ---- matmul ------------------------------------------------------------ */

static int check_matmul(nb_dtype t, int M, int64_t N, int64_t K) {
    float *wv;
    nb_weight w = make_weight(t, N, K, &wv);
    float *x = rand_floats((size_t)M * K);
    size_t no = (size_t)M * N;
    double *ref = xmalloc(sizeof(double) * no), *scale = xmalloc(sizeof(double) * no);
    for (int m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double s = 0, s2 = 0;
            for (int64_t k = 0; k < K; k++) {
                double p = (double)x[m * K + k] * wv[n * K + k];
                s += p;
                s2 += p * p;
            }
            ref[m * N + n] = s;
            /* FP32 summation error scales with the terms' norm, so a result
             * that cancels to near zero is judged against that */
            scale[m * N + n] = sqrt(s2);
        }
    float *o1 = xmalloc(sizeof(float) * no), *o3 = xmalloc(sizeof(float) * no), *os = xmalloc(sizeof(float) * no);
    be1->ops->matmul(be1, o1, x, &w, M);
    be3->ops->matmul(be3, o3, x, &w, M);
    cpu_matmul_scalar(os, x, &w, M);
    char what[96];
    snprintf(what, sizeof what, "matmul %s M=%d N=%lld K=%lld", nb_dtype_name(t), M, (long long)N, (long long)K);
    int bad = compare(what, o1, ref, scale, no, TOL);
    bad += compare("scalar reference", os, ref, scale, no, TOL);
    if (memcmp(o1, o3, sizeof(float) * no)) {
        fprintf(stderr, "  %s: 1 and 3 threads differ\n", what);
        bad++;
    }
    free(o1), free(o3), free(os), free(ref), free(scale), free(x), free(wv), free((void *)w.data);
    return bad;
}

static void test_matmul_sweep(void) {
    static const int Ms[] = {1, 2, 5, 33};
    static const int64_t Ns[] = {1, 3, 17, 1000};
    static const int64_t Ks[] = {1, 7, 16, 33, 100, 257};
    for (int t = 0; t < 3; t++)
        for (size_t a = 0; a < 4; a++)
            for (size_t b = 0; b < 4; b++)
                for (size_t c = 0; c < 6; c++) CHECK(check_matmul((nb_dtype)t, Ms[a], Ns[b], Ks[c]) == 0, "see above");
}

/* Shapes that take the threaded paths: many column chunks, and few columns
 * with many rows (split over rows). */
static void test_matmul_large(void) {
    for (int t = 0; t < 3; t++) {
        CHECK(check_matmul((nb_dtype)t, 1, 4099, 1000) == 0, "decode");
        CHECK(check_matmul((nb_dtype)t, 70, 300, 512) == 0, "prefill");
        CHECK(check_matmul((nb_dtype)t, 33, 17, 2000) == 0, "narrow");
    }
}

/* ---- attention --------------------------------------------------------- */

/* One step over 4 sequences: a whole prefill, a decode, a prefill chunk
 * continuing earlier context, and a first decode at position 0. Blocks are a
 * random permutation of the cache so tables are non-contiguous. */
static void check_attention(int n_heads, int n_kv, int hd) {
    enum { NSEQ = 4, NBLK = 40, MAXB = 10 };
    const int seq_len[NSEQ] = {37, 101, 53, 1};   /* context after the step */
    const int step_from[NSEQ] = {0, 100, 20, 0}; /* first position in the step */
    int perm[NBLK];
    for (int i = 0; i < NBLK; i++) perm[i] = i;
    for (int i = NBLK - 1; i > 0; i--) {
        int j = irand(i + 1), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    int32_t tables[NSEQ][MAXB];
    int used = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int b = 0; b < MAXB; b++) tables[s][b] = b * NB_KV_BLOCK_SIZE < seq_len[s] ? perm[used++] : -1;

    size_t kv_row = (size_t)n_kv * hd, q_row = (size_t)n_heads * hd;
    float *kd[NSEQ], *vd[NSEQ]; /* dense K/V per sequence */
    for (int s = 0; s < NSEQ; s++) kd[s] = rand_floats(seq_len[s] * kv_row), vd[s] = rand_floats(seq_len[s] * kv_row);
    size_t cache_floats = (size_t)NBLK * NB_KV_BLOCK_SIZE * kv_row;
    float *kc = be1->ops->alloc(be1, cache_floats * sizeof(float));
    float *vc = be1->ops->alloc(be1, cache_floats * sizeof(float));

    int n = 0;
    for (int s = 0; s < NSEQ; s++) n += seq_len[s] - step_from[s];
    int32_t *pos = xmalloc(sizeof(int32_t) * n), *seq_of = xmalloc(sizeof(int32_t) * n), *slot = xmalloc(sizeof(int32_t) * n);
    float *k = xmalloc(sizeof(float) * n * kv_row), *v = xmalloc(sizeof(float) * n * kv_row);
    /* interleave the sequences' tokens so a step mixes them */
    int t = 0;
    for (int i = 0; t < n; i++)
        for (int s = 0; s < NSEQ; s++) {
            int p = step_from[s] + i;
            if (p >= seq_len[s]) continue;
            pos[t] = p, seq_of[t] = s;
            slot[t] = tables[s][p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
            memcpy(k + t * kv_row, kd[s] + p * kv_row, sizeof(float) * kv_row);
            memcpy(v + t * kv_row, vd[s] + p * kv_row, sizeof(float) * kv_row);
            t++;
        }
    /* earlier steps' context goes straight into the cache */
    for (int s = 0; s < NSEQ; s++)
        for (int p = 0; p < step_from[s]; p++) {
            size_t sl = (size_t)tables[s][p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
            memcpy(kc + sl * kv_row, kd[s] + p * kv_row, sizeof(float) * kv_row);
            memcpy(vc + sl * kv_row, vd[s] + p * kv_row, sizeof(float) * kv_row);
        }
    nb_batch batch = {n, pos, seq_of, slot, NSEQ, MAXB, &tables[0][0]};
    nb_attn_shape shape = {.n_heads = n_heads, .n_kv_heads = n_kv, .head_dim = hd, .scale = 1.0f / sqrtf((float)hd)};
    float *q = rand_floats(n * q_row);
    float *o1 = xmalloc(sizeof(float) * n * q_row), *o3 = xmalloc(sizeof(float) * n * q_row);

    be1->ops->set_batch(be1, &batch);
    be1->ops->kv_write(be1, kc, vc, k, v, &shape);
    /* the cache now holds every sequence's dense K/V at its slots */
    int kv_bad = 0;
    for (int s = 0; s < NSEQ; s++)
        for (int p = 0; p < seq_len[s]; p++) {
            size_t sl = (size_t)tables[s][p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
            kv_bad += memcmp(kc + sl * kv_row, kd[s] + p * kv_row, sizeof(float) * kv_row) != 0;
            kv_bad += memcmp(vc + sl * kv_row, vd[s] + p * kv_row, sizeof(float) * kv_row) != 0;
        }
    CHECK(kv_bad == 0, "kv_write: %d rows misplaced", kv_bad);
    be1->ops->attention(be1, o1, q, kc, vc, &shape);
    be3->ops->set_batch(be3, &batch);
    be3->ops->attention(be3, o3, q, kc, vc, &shape);

    double *ref = xmalloc(sizeof(double) * n * q_row), *sc = xmalloc(sizeof(double) * 128);
    int group = n_heads / n_kv;
    for (t = 0; t < n; t++)
        for (int h = 0; h < n_heads; h++) {
            int s = seq_of[t], kvh = h / group, L = pos[t] + 1;
            const float *qv = q + t * q_row + (size_t)h * hd;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j < L; j++) {
                double d = 0;
                for (int i = 0; i < hd; i++) d += (double)qv[i] * kd[s][j * kv_row + (size_t)kvh * hd + i];
                sc[j] = d / sqrt((double)hd);
                if (sc[j] > mx) mx = sc[j];
            }
            for (int j = 0; j < L; j++) sum += (sc[j] = exp(sc[j] - mx));
            for (int i = 0; i < hd; i++) {
                double a = 0;
                for (int j = 0; j < L; j++) a += sc[j] * vd[s][j * kv_row + (size_t)kvh * hd + i];
                ref[t * q_row + (size_t)h * hd + i] = a / sum;
            }
        }
    /* outputs are averages of values in [-1, 1]: judge against that scale */
    double *unit = xmalloc(sizeof(double) * n * q_row);
    for (size_t i = 0; i < n * q_row; i++) unit[i] = 1.0;
    char what[80];
    snprintf(what, sizeof what, "attention heads=%d kv=%d hd=%d", n_heads, n_kv, hd);
    CHECK(compare(what, o1, ref, unit, n * q_row, TOL) == 0, "%s", what);
    CHECK(memcmp(o1, o3, sizeof(float) * n * q_row) == 0, "%s: 1 and 3 threads differ", what);
    /* The same step from one fused q|k|v buffer (rows q_row + 2 kv_row
     * apart), into a cache whose step slots were cleared: the same cache
     * bytes and the same outputs. */
    size_t ld = q_row + 2 * kv_row;
    float *fused = rand_floats(n * ld), *o2 = xmalloc(sizeof(float) * n * q_row);
    for (int i = 0; i < n; i++) {
        memcpy(fused + i * ld, q + i * q_row, sizeof(float) * q_row);
        memcpy(fused + i * ld + q_row, k + i * kv_row, sizeof(float) * kv_row);
        memcpy(fused + i * ld + q_row + kv_row, v + i * kv_row, sizeof(float) * kv_row);
    }
    float *kc2 = be1->ops->alloc(be1, cache_floats * sizeof(float)), *vc2 = be1->ops->alloc(be1, cache_floats * sizeof(float));
    memcpy(kc2, kc, cache_floats * sizeof(float)), memcpy(vc2, vc, cache_floats * sizeof(float));
    for (int i = 0; i < n; i++)
        memset(kc2 + (size_t)slot[i] * kv_row, 0, sizeof(float) * kv_row), memset(vc2 + (size_t)slot[i] * kv_row, 0, sizeof(float) * kv_row);
    nb_attn_shape strided = shape;
    strided.q_stride = strided.kv_stride = (int)ld;
    be3->ops->kv_write(be3, kc2, vc2, fused + q_row, fused + q_row + kv_row, &strided);
    CHECK(memcmp(kc2, kc, cache_floats * sizeof(float)) == 0 && memcmp(vc2, vc, cache_floats * sizeof(float)) == 0,
          "%s: kv_write from fused rows differs", what);
    be3->ops->attention(be3, o2, fused, kc2, vc2, &strided);
    CHECK(memcmp(o1, o2, sizeof(float) * n * q_row) == 0, "%s: attention on fused rows differs", what);
    be1->ops->free(be1, kc2), be1->ops->free(be1, vc2);
    free(fused), free(o2);

    for (int s = 0; s < NSEQ; s++) free(kd[s]), free(vd[s]);
    be1->ops->free(be1, kc), be1->ops->free(be1, vc);
    free(pos), free(seq_of), free(slot), free(k), free(v), free(q), free(o1), free(o3), free(ref), free(sc), free(unit);
}

static void test_attention(void) {
    static const int ratios[] = {1, 2, 4}, hds[] = {16, 64, 128};
    for (int r = 0; r < 3; r++)
        for (int d = 0; d < 3; d++) check_attention(2 * ratios[r], 2, hds[d]);
}


/* Quantized KV caches: rows read back within the format's rounding, and
 * attention over them close to attention over the FP32 cache. */
static void test_attention_kv_dtypes(void) {
    enum { L = 70, NKV = 2, NH = 4, HD = 64, NBLK = 5 };
    static const struct {
        nb_kv_dtype t;
        double row_tol, out_tol; /* row: relative to the row's max |x|; out: absolute (values in [-1, 1]) */
    } kinds[] = {{NB_KV_BF16, 1.0 / 256, 1e-2}, {NB_KV_INT8, 0.5 / 127 + 1e-6, 2e-2}, {NB_KV_FP8, 1.0 / 16, 6e-2}};
    size_t kv_row = (size_t)NKV * HD, q_row = (size_t)NH * HD;
    float *k = rand_floats(L * kv_row), *v = rand_floats(L * kv_row), *q = rand_floats(L * q_row);
    int32_t pos[L], seq_of[L], table[NBLK];
    for (int i = 0; i < L; i++) pos[i] = i, seq_of[i] = 0;
    for (int i = 0; i < NBLK; i++) table[i] = NBLK - 1 - i; /* reversed: non-contiguous */
    int32_t slot[L];
    for (int i = 0; i < L; i++) slot[i] = table[i / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + i % NB_KV_BLOCK_SIZE;
    nb_batch batch = {L, pos, seq_of, slot, 1, NBLK, table};
    nb_attn_shape f32 = {.n_heads = NH, .n_kv_heads = NKV, .head_dim = HD, .scale = 0.125f, .kv_dtype = NB_KV_F32};
    float *o_ref = xmalloc(sizeof(float) * L * q_row), *o = xmalloc(sizeof(float) * L * q_row);
    void *kc = be1->ops->alloc(be1, NBLK * nb_kv_block_bytes(NB_KV_F32, NKV, HD));
    void *vc = be1->ops->alloc(be1, NBLK * nb_kv_block_bytes(NB_KV_F32, NKV, HD));
    be1->ops->set_batch(be1, &batch);
    be1->ops->kv_write(be1, kc, vc, k, v, &f32);
    be1->ops->attention(be1, o_ref, q, kc, vc, &f32);
    be1->ops->free(be1, kc), be1->ops->free(be1, vc);
    for (size_t c = 0; c < sizeof kinds / sizeof kinds[0]; c++) {
        nb_attn_shape sh = f32;
        sh.kv_dtype = kinds[c].t;
        size_t bb = nb_kv_block_bytes(sh.kv_dtype, NKV, HD);
        kc = be1->ops->alloc(be1, NBLK * bb), vc = be1->ops->alloc(be1, NBLK * bb);
        be1->ops->kv_write(be1, kc, vc, k, v, &sh);
        double worst_row = 0, worst_out = 0;
        float buf[HD];
        for (int t = 0; t < L; t++)
            for (int h = 0; h < NKV; h++) {
                const float *x = k + t * kv_row + (size_t)h * HD, *r = cpu_kv_row(kc, &sh, (size_t)slot[t], h, buf);
                double amax = 0, err = 0;
                for (int d = 0; d < HD; d++) amax = fmax(amax, fabs(x[d])), err = fmax(err, fabs(x[d] - r[d]));
                if (err / amax > worst_row) worst_row = err / amax;
            }
        be1->ops->attention(be1, o, q, kc, vc, &sh);
        for (size_t i = 0; i < L * q_row; i++) worst_out = fmax(worst_out, fabs(o[i] - o_ref[i]));
        printf("  kv %-13s row error %.2e of max|x|, attention error %.2e (%zu bytes per block vs %zu)\n",
               nb_kv_dtype_name(sh.kv_dtype), worst_row, worst_out, bb, nb_kv_block_bytes(NB_KV_F32, NKV, HD));
        CHECK(worst_row <= kinds[c].row_tol, "%s: row error %g > %g", nb_kv_dtype_name(sh.kv_dtype), worst_row,
              kinds[c].row_tol);
        CHECK(worst_out <= kinds[c].out_tol && worst_out > 0, "%s: attention error %g (limit %g)",
              nb_kv_dtype_name(sh.kv_dtype), worst_out, kinds[c].out_tol);
        be1->ops->free(be1, kc), be1->ops->free(be1, vc);
    }
    free(k), free(v), free(q), free(o_ref), free(o);
}

/* ---- rope -------------------------------------------------------------- */

/* rope on rows of `pad` more floats than the heads (a fused q|k|v row's v
 * part), which must come out untouched */
static void check_rope(int interleaved, int n, int n_heads, int hd, int pad) {
    int half = hd / 2;
    float *inv = xmalloc(sizeof(float) * half);
    for (int i = 0; i < half; i++) inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / hd));
    int32_t *pos = xmalloc(sizeof(int32_t) * n);
    for (int t = 0; t < n; t++) pos[t] = t < 3 ? t : irand(4000);
    nb_batch batch = {.n_tokens = n, .pos = pos};
    size_t total = (size_t)n * n_heads * hd, row = (size_t)n_heads * hd + (size_t)pad, all = (size_t)n * row;
    float *x = rand_floats(total), *x1 = xmalloc(sizeof(float) * total), *x3 = rand_floats(all);
    float *x3in = xmalloc(sizeof(float) * all);
    memcpy(x1, x, sizeof(float) * total);
    for (int t = 0; t < n; t++) memcpy(x3 + t * row, x + t * (row - pad), sizeof(float) * (row - pad));
    memcpy(x3in, x3, sizeof(float) * all);
    be1->ops->set_batch(be1, &batch), be3->ops->set_batch(be3, &batch);
    be1->ops->rope(be1, x1, n_heads, hd, n_heads * hd, inv, interleaved);
    be3->ops->rope(be3, x3, n_heads, hd, (int)row, inv, interleaved);
    double *ref = xmalloc(sizeof(double) * total), *unit = xmalloc(sizeof(double) * total);
    for (int t = 0; t < n; t++)
        for (int h = 0; h < n_heads; h++) {
            const float *v = x + ((size_t)t * n_heads + h) * hd;
            double *r = ref + ((size_t)t * n_heads + h) * hd;
            for (int i = 0; i < half; i++) {
                /* the angle as HF forms it: a float32 product */
                double ang = (double)((float)pos[t] * inv[i]), c = cos(ang), s = sin(ang);
                int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
                r[ia] = v[ia] * c - v[ib] * s;
                r[ib] = v[ib] * c + v[ia] * s;
            }
        }
    for (size_t i = 0; i < total; i++) unit[i] = 1.0;
    CHECK(compare(interleaved ? "rope interleaved" : "rope neox", x1, ref, unit, total, TOL) == 0, "n=%d hd=%d", n, hd);
    int differ = 0, touched = 0;
    for (int t = 0; t < n; t++) {
        differ += memcmp(x1 + t * (row - pad), x3 + t * row, sizeof(float) * (row - pad)) != 0;
        touched += memcmp(x3 + t * row + (row - pad), x3in + t * row + (row - pad), sizeof(float) * pad) != 0;
    }
    CHECK(differ == 0, "rope: 1 and 3 threads (row stride %zu) differ in %d rows", row, differ);
    CHECK(touched == 0, "rope: %d rows changed past their heads", touched);
    free(inv), free(pos), free(x), free(x1), free(x3), free(x3in), free(ref), free(unit);
}

static void test_rope(void) {
    for (int il = 0; il < 2; il++) {
        check_rope(il, 5, 3, 16, 0);
        check_rope(il, 70, 8, 128, 2 * 128); /* big enough to run threaded */
        check_rope(il, 1, 2, 64, 64);
        check_rope(il, 9, 6, 32, 0);
    }
}

/* rope_kv_write on fused q|k|v rows equals, bit for bit, the separate ops on
 * separate packed q, k and v: rmsnorm per head (when normed), rope on q and
 * on k, then kv_write of the rotated k and of v; and leaves v and the
 * padding after it alone. Caches start as the same random bytes, so a write
 * to a wrong slot or of an unrotated k shows in the memcmp of the whole
 * cache. */
static void check_rope_kv_write(int n, int nq, int nkv, int hd, int pad, nb_kv_dtype kt, int norm_t,
                                int il) {
    size_t qd = (size_t)nq * hd, kvd = (size_t)nkv * hd, ld = qd + 2 * kvd + (size_t)pad;
    float *inv = xmalloc(sizeof(float) * hd / 2), *qv = NULL, *kv = NULL;
    for (int i = 0; i < hd / 2; i++) inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / hd));
    /* norm_t < 0: no norms (both NULL) */
    nb_weight qn = {0}, kn = {0};
    if (norm_t >= 0) qn = make_weight((nb_dtype)norm_t, 1, hd, &qv), kn = make_weight((nb_dtype)norm_t, 1, hd, &kv);
    const nb_weight *qnp = norm_t >= 0 ? &qn : NULL, *knp = norm_t >= 0 ? &kn : NULL;

    /* one sequence over scattered slots of a cache of n_blocks blocks: the
     * first n of a shuffled list of every slot, so no two tokens share one */
    int n_blocks = (n + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE + 2, n_slots = n_blocks * NB_KV_BLOCK_SIZE;
    int32_t *all = xmalloc(sizeof(int32_t) * n_slots), *table = xmalloc(sizeof(int32_t) * n_blocks);
    for (int i = 0; i < n_slots; i++) all[i] = i;
    for (int i = n_slots - 1; i > 0; i--) {
        int j = irand(i + 1), tmp = all[i];
        all[i] = all[j], all[j] = tmp;
    }
    for (int i = 0; i < n_blocks; i++) table[i] = i;
    int32_t *pos = xmalloc(sizeof(int32_t) * n), *seq_of = xcalloc((size_t)n, sizeof(int32_t));
    /* positions 0-2 (0: the identity rotation) then random; a lone token
     * decodes at a random position, where rope moves it */
    for (int i = 0; i < n; i++) pos[i] = i < 3 && n > 1 ? i : irand(4000);
    nb_batch batch = {n, pos, seq_of, all, 1, n_blocks, table};

    nb_attn_shape packed = {.n_heads = nq, .n_kv_heads = nkv, .head_dim = hd, .scale = 1.0f, .kv_dtype = kt};
    nb_attn_shape fused_s = packed;
    fused_s.q_stride = fused_s.kv_stride = (int)ld;
    size_t cb = (size_t)n_blocks * nb_kv_block_bytes(kt, nkv, hd);
    unsigned char *kc1 = be1->ops->alloc(be1, cb), *vc1 = be1->ops->alloc(be1, cb);
    unsigned char *kc3 = be3->ops->alloc(be3, cb), *vc3 = be3->ops->alloc(be3, cb);
    for (size_t i = 0; i < cb; i++) kc1[i] = (unsigned char)irand(256), vc1[i] = (unsigned char)irand(256);
    memcpy(kc3, kc1, cb), memcpy(vc3, vc1, cb);

    float *fused = rand_floats((size_t)n * ld), *in = xmalloc(sizeof(float) * n * ld);
    float *q = xmalloc(sizeof(float) * n * qd), *k = xmalloc(sizeof(float) * n * kvd);
    float *v = xmalloc(sizeof(float) * n * kvd);
    for (int i = 0; i < n; i++) {
        memcpy(q + i * qd, fused + i * ld, sizeof(float) * qd);
        memcpy(k + i * kvd, fused + i * ld + qd, sizeof(float) * kvd);
        memcpy(v + i * kvd, fused + i * ld + qd + kvd, sizeof(float) * kvd);
    }
    memcpy(in, fused, sizeof(float) * n * ld);

    be1->ops->set_batch(be1, &batch), be3->ops->set_batch(be3, &batch);
    if (qnp) {
        be1->ops->rmsnorm(be1, q, q, qnp, n * nq, 1e-6f);
        be1->ops->rmsnorm(be1, k, k, knp, n * nkv, 1e-6f);
    }
    be1->ops->rope(be1, q, nq, hd, (int)qd, inv, il);
    be1->ops->rope(be1, k, nkv, hd, (int)kvd, inv, il);
    be1->ops->kv_write(be1, kc1, vc1, k, v, &packed);
    be3->ops->rope_kv_write(be3, fused, kc3, vc3, &fused_s, qnp, knp, 1e-6f, inv, il);

    int bad_q = 0, bad_k = 0, bad_rest = 0;
    for (int i = 0; i < n; i++) {
        bad_q += memcmp(fused + i * ld, q + i * qd, sizeof(float) * qd) != 0;
        bad_k += memcmp(fused + i * ld + qd, k + i * kvd, sizeof(float) * kvd) != 0;
        bad_rest += memcmp(fused + i * ld + qd + kvd, in + i * ld + qd + kvd, sizeof(float) * (kvd + pad)) != 0;
    }
    char what[160];
    snprintf(what, sizeof what, "rope_kv_write n=%d q=%d kv=%d hd=%d pad=%d kv %s norms %s%s", n, nq, nkv, hd, pad,
             nb_kv_dtype_name(kt), norm_t >= 0 ? nb_dtype_name((nb_dtype)norm_t) : "none",
             il ? " interleaved" : "");
    CHECK(bad_q == 0 && bad_k == 0, "%s: %d q rows, %d k rows differ from the separate ops", what, bad_q, bad_k);
    CHECK(bad_rest == 0, "%s: %d rows changed in v or the padding", what, bad_rest);
    CHECK(memcmp(kc1, kc3, cb) == 0, "%s: K cache differs from kv_write's", what);
    CHECK(memcmp(vc1, vc3, cb) == 0, "%s: V cache differs from kv_write's", what);

    be1->ops->free(be1, kc1), be1->ops->free(be1, vc1), be3->ops->free(be3, kc3), be3->ops->free(be3, vc3);
    if (qnp) free(qv), free(kv), free((void *)qn.data), free((void *)kn.data);
    free(inv), free(all), free(table), free(pos), free(seq_of), free(fused), free(in), free(q), free(k), free(v);
}

static void test_rope_kv_write(void) {
    static const int shapes[][4] = {{5, 4, 2, 16}, {70, 8, 2, 128}, {1, 2, 1, 64}, {9, 6, 3, 32}}; /* n, q, kv, hd */
    static const nb_kv_dtype kts[] = {NB_KV_F32, NB_KV_BF16, NB_KV_INT8, NB_KV_FP8};
    static const int norm_ts[] = {-1, NB_F32, NB_BF16, NB_F16}; /* -1: no norms */
    for (int il = 0; il < 2; il++)
        for (int c = 0; c < 4; c++)
            for (int kt = 0; kt < 4; kt++)
                for (int nt = 0; nt < 4; nt++)
                    for (int pad = 0; pad <= 3; pad += 3)
                        check_rope_kv_write(shapes[c][0], shapes[c][1], shapes[c][2], shapes[c][3], pad, kts[kt],
                                            norm_ts[nt], il);
}

/* ---- norms and elementwise --------------------------------------------- */

static void test_rmsnorm(void) {
    static const int colss[] = {1, 33, 128, 5000};
    for (int t = 0; t < 3; t++)
        for (int c = 0; c < 4; c++) {
            int cols = colss[c], n = 40;
            float *wv;
            nb_weight w = make_weight((nb_dtype)t, 1, cols, &wv);
            float *x = rand_floats((size_t)n * cols), *o1 = xmalloc(sizeof(float) * n * cols);
            float *o3 = xmalloc(sizeof(float) * n * cols);
            double *ref = xmalloc(sizeof(double) * n * cols);
            float eps = 1e-6f;
            for (int r = 0; r < n; r++) {
                double ss = 0;
                for (int i = 0; i < cols; i++) ss += (double)x[r * cols + i] * x[r * cols + i];
                double sc = 1.0 / sqrt(ss / cols + eps);
                for (int i = 0; i < cols; i++) ref[r * cols + i] = x[r * cols + i] * sc * wv[i];
            }
            be1->ops->rmsnorm(be1, o1, x, &w, n, eps);
            memcpy(o3, x, sizeof(float) * n * cols);
            be3->ops->rmsnorm(be3, o3, o3, &w, n, eps); /* in place */
            CHECK(compare("rmsnorm", o1, ref, NULL, (size_t)n * cols, TOL) == 0, "%s cols=%d", nb_dtype_name((nb_dtype)t), cols);
            CHECK(memcmp(o1, o3, sizeof(float) * n * cols) == 0, "rmsnorm: threads / in-place differ");
            free(wv), free((void *)w.data), free(x), free(o1), free(o3), free(ref);
        }
}

static void test_embedding_bias(void) {
    for (int t = 0; t < 3; t++) {
        int rows = 50, cols = 37, n = 6;
        float *tv, *bv;
        nb_weight table = make_weight((nb_dtype)t, rows, cols, &tv);
        nb_weight bias = make_weight((nb_dtype)t, 1, cols, &bv);
        int32_t tok[6] = {0, 49, 7, 7, 23, 1};
        float *o = xmalloc(sizeof(float) * n * cols);
        be1->ops->embedding(be1, o, &table, tok, n);
        int bad = 0;
        for (int i = 0; i < n; i++)
            for (int c = 0; c < cols; c++) bad += o[i * cols + c] != tv[tok[i] * cols + c];
        CHECK(bad == 0, "embedding %s: %d wrong", nb_dtype_name((nb_dtype)t), bad);
        be3->ops->add_bias(be3, o, &bias, n);
        bad = 0;
        for (int i = 0; i < n; i++)
            for (int c = 0; c < cols; c++) bad += o[i * cols + c] != tv[tok[i] * cols + c] + bv[c];
        CHECK(bad == 0, "add_bias %s: %d wrong", nb_dtype_name((nb_dtype)t), bad);
        free(tv), free(bv), free((void *)table.data), free((void *)bias.data), free(o);
    }
}

static void test_elementwise(void) {
    static const size_t ns[] = {1, 17, 300001};
    for (int k = 0; k < 3; k++) {
        size_t n = ns[k];
        float *a = rand_floats(n), *c = rand_floats(n), *o1 = xmalloc(sizeof(float) * n), *o3 = xmalloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) a[i] *= 12.0f; /* reach both tails of silu */
        double *ref = xmalloc(sizeof(double) * n);
        for (size_t i = 0; i < n; i++) ref[i] = (double)a[i] / (1.0 + exp(-(double)a[i])) * c[i];
        be1->ops->silu_mul(be1, o1, a, c, 1, (int)n, (int)n);
        be3->ops->silu_mul(be3, o3, a, c, 1, (int)n, (int)n);
        CHECK(compare("silu_mul", o1, ref, NULL, n, TOL) == 0, "n=%zu", n);
        CHECK(memcmp(o1, o3, sizeof(float) * n) == 0, "silu_mul: threads differ");
        int bad = 0;
        memcpy(o3, a, sizeof(float) * n);
        be3->ops->add(be3, o3, o3, c, n); /* out aliases a */
        for (size_t i = 0; i < n; i++) bad += o3[i] != a[i] + c[i];
        CHECK(bad == 0, "add: %d wrong", bad);
        free(a), free(c), free(o1), free(o3), free(ref);
    }
}

/* silu_mul on a fused [rows][2 cols] gate|up buffer: the products of the
 * packed call, row by row, whatever the pieces the threads take. */
static void test_silu_mul_rows(void) {
    static const int shapes[][2] = {{1, 1}, {3, 17}, {7, 5000}, {40, 4096}, {5, 9000}};
    for (int k = 0; k < 5; k++) {
        int rows = shapes[k][0], cols = shapes[k][1];
        size_t n = (size_t)rows * cols;
        float *gu = rand_floats(2 * n), *g = xmalloc(sizeof(float) * n), *u = xmalloc(sizeof(float) * n);
        for (size_t i = 0; i < 2 * n; i++) gu[i] *= 12.0f;
        for (int r = 0; r < rows; r++) {
            memcpy(g + (size_t)r * cols, gu + (size_t)r * 2 * cols, sizeof(float) * cols);
            memcpy(u + (size_t)r * cols, gu + (size_t)r * 2 * cols + cols, sizeof(float) * cols);
        }
        float *o1 = xmalloc(sizeof(float) * n), *o3 = xmalloc(sizeof(float) * n);
        be1->ops->silu_mul(be1, o1, g, u, rows, cols, cols);
        be3->ops->silu_mul(be3, o3, gu, gu + cols, rows, cols, 2 * cols);
        CHECK(memcmp(o1, o3, sizeof(float) * n) == 0, "silu_mul %d x %d from gate|up rows differs", rows, cols);
        be3->ops->silu_mul(be3, g, g, u, rows, cols, cols); /* out == gate */
        CHECK(memcmp(o1, g, sizeof(float) * n) == 0, "silu_mul %d x %d in place differs", rows, cols);
        free(gu), free(g), free(u), free(o1), free(o3);
    }
}

static void test_softmax_gather_argmax(void) {
    int n = 7, cols = 1001;
    float *x = rand_floats((size_t)n * cols);
    for (int i = 0; i < cols; i++) x[i] = x[i] * 50.0f + 1000.0f; /* large: needs the max subtracted */
    double *ref = xmalloc(sizeof(double) * n * cols);
    for (int r = 0; r < n; r++) {
        double mx = -INFINITY, s = 0;
        for (int i = 0; i < cols; i++) mx = fmax(mx, x[r * cols + i]);
        for (int i = 0; i < cols; i++) s += exp(x[r * cols + i] - mx);
        for (int i = 0; i < cols; i++) ref[r * cols + i] = exp(x[r * cols + i] - mx) / s;
    }
    float *y = xmalloc(sizeof(float) * n * cols);
    memcpy(y, x, sizeof(float) * n * cols);
    be3->ops->softmax(be3, y, n, cols);
    /* probabilities: judged against the row's largest */
    double *scale = xmalloc(sizeof(double) * n * cols);
    for (int r = 0; r < n; r++) {
        double mx = 0;
        for (int i = 0; i < cols; i++) mx = fmax(mx, ref[r * cols + i]);
        for (int i = 0; i < cols; i++) scale[r * cols + i] = mx;
    }
    CHECK(compare("softmax", y, ref, scale, (size_t)n * cols, TOL) == 0, "softmax");

    int32_t rows[3] = {6, 0, 6};
    float *g = xmalloc(sizeof(float) * 3 * cols);
    be1->ops->gather_rows(be1, g, x, rows, 3, cols);
    CHECK(!memcmp(g, x + 6 * cols, sizeof(float) * cols) && !memcmp(g + cols, x, sizeof(float) * cols) &&
              !memcmp(g + 2 * cols, x + 6 * cols, sizeof(float) * cols),
          "gather_rows");

    float am[4][9] = {
        {0, 1, 5, 2, 5, 5, 0, 0, -1},                                  /* tie: 2 */
        {3, 3, 3, 3, 3, 3, 3, 3, 3},                                   /* all equal: 0 */
        {-INFINITY, -INFINITY, -7, -INFINITY, -7, 0, -1, -2, -3},      /* 5 */
        {NAN, -1, -0.5f, NAN, -0.5f, -2, -3, -4, -5},                  /* NaN skipped: 2 */
    };
    /* argmax: the sample op on greedy rows */
    nb_sample_row greedy[4];
    for (int r = 0; r < 4; r++) greedy[r] = (nb_sample_row){.top_p = 1.0f, .repetition_penalty = 1.0f};
    int32_t ids[4];
    be3->ops->sample(be3, ids, &am[0][0], 4, 9, greedy);
    CHECK(ids[0] == 2 && ids[1] == 0 && ids[2] == 5 && ids[3] == 2, "argmax %d %d %d %d", ids[0], ids[1], ids[2], ids[3]);
    int32_t big;
    be1->ops->sample(be1, &big, x + 3 * cols, 1, cols, greedy);
    int want = 0;
    for (int i = 1; i < cols; i++)
        if (x[3 * cols + i] > x[3 * cols + want]) want = i;
    CHECK(big == want, "argmax wide row: %d want %d", big, want);
    free(x), free(ref), free(y), free(scale), free(g);
}

/* ---- memory, creation, pool -------------------------------------------- */

static void test_memory(void) {
    static const size_t sizes[] = {0, 1, 63, 64, 100000};
    for (int i = 0; i < 5; i++) {
        unsigned char *p = be1->ops->alloc(be1, sizes[i]);
        CHECK(((uintptr_t)p & 63) == 0, "alloc not 64-byte aligned");
        int nz = 0;
        for (size_t j = 0; j < sizes[i]; j++) nz += p[j] != 0;
        CHECK(nz == 0, "alloc not zeroed");
        unsigned char src[64], back[64];
        for (int j = 0; j < 64; j++) src[j] = (unsigned char)(j * 7 + 1);
        size_t m = sizes[i] < 64 ? sizes[i] : 64;
        be1->ops->upload(be1, p, src, m);
        be1->ops->download(be1, back, p, m);
        CHECK(memcmp(src, back, m) == 0, "upload/download");
        be1->ops->free(be1, p);
    }
    float host[4] = {1, 2, 3, 4};
    const void *w = be1->ops->weight_load(be1, host, sizeof host);
    CHECK(w == host, "cpu weight_load must keep the host pointer");
    be1->ops->weight_free(be1, w);
    be1->ops->sync(be1);
    CHECK(nb_dtype_size(NB_F32) == 4 && nb_dtype_size(NB_BF16) == 2 && nb_dtype_size(NB_F16) == 2, "dtype sizes");
    CHECK(!strcmp(nb_dtype_name(NB_BF16), "BF16"), "dtype name");
}

static void test_backend_create(void) {
    nb_err e = {{0}};
    nb_backend_opts o = {.threads = 2};
    nb_backend *b = backend_create(&o, &e);
    REQUIRE(b != NULL, "default device: %s", e.msg);
    CHECK(!strcmp(b->ops->name, cuda_device_count() > 0 ? "cuda" : "cpu"), "default is cuda when a GPU is present, else cpu");
    backend_destroy(b);
    o.device = "cpu";
    o.threads = 0; /* one per core */
    b = backend_create(&o, &e);
    CHECK(b != NULL, "cpu: %s", e.msg);
    backend_destroy(b);
    o.device = "tpu";
    CHECK(backend_create(&o, &e) == NULL && strstr(e.msg, "tpu"), "unknown device: %s", e.msg);
    o.device = "cuda:x";
    CHECK(backend_create(&o, &e) == NULL && strstr(e.msg, "cuda:x"), "bad device index: %s", e.msg);
    o.device = "cuda:1000";
    CHECK(backend_create(&o, &e) == NULL && strstr(e.msg, "cuda:1000"), "missing device: %s", e.msg);
    if (cuda_device_count() == 0) {
        o.device = "cuda";
        CHECK(backend_create(&o, &e) == NULL && strstr(e.msg, "cuda"), "cuda without a GPU: %s", e.msg);
    }
    CHECK(cpu_backend_create(-1, &e) == NULL, "negative threads must fail");

    char buf[256];
    int n = cuda_device_count();
    CHECK(n >= 0, "device count");
    for (int i = 0; i < n; i++) CHECK(cuda_device_describe(i, buf, sizeof buf) == 0 && buf[0], "describe %d", i);
    CHECK(cuda_device_describe(n, buf, sizeof buf) == -1 && buf[0], "describe past the last device");
    printf("  cuda devices: %d (%s)\n", n, buf);
}

typedef struct pool_count {
    int *hits;
} pool_count;

static void count_task(void *arg, int task) { __atomic_fetch_add(&((pool_count *)arg)->hits[task], 1, __ATOMIC_RELAXED); }

static void test_threadpool(void) {
    nb_err e;
    static const int sizes[] = {1, 3, 8};
    for (int s = 0; s < 3; s++) {
        threadpool *p = threadpool_create(sizes[s], &e);
        REQUIRE(p, "%s", e.msg);
        CHECK(threadpool_size(p) == sizes[s], "size");
        int hits[257];
        pool_count pc = {hits};
        int bad = 0;
        for (int run = 0; run < 2000; run++) {
            int n = run % 257;
            memset(hits, 0, sizeof hits);
            threadpool_run(p, n, count_task, &pc);
            for (int i = 0; i < n; i++) bad += hits[i] != 1;
        }
        CHECK(bad == 0, "pool of %d: %d tasks not run exactly once", sizes[s], bad);
        threadpool_destroy(p);
    }
}

/* ---- benchmark (printed, never asserted) ------------------------------- */

static void bench_matmul(void) {
    int64_t N = 4096, K = 4096;
    float *wv;
    nb_weight w = make_weight(NB_BF16, N, K, &wv);
    float *x = rand_floats((size_t)K), *o = xmalloc(sizeof(float) * N);
    nb_err e;
    nb_backend *all = cpu_backend_create(0, &e);
    nb_backend *bs[2] = {be1, all};
    for (int i = 0; i < 2; i++) {
        nb_backend *b = bs[i];
        b->ops->matmul(b, o, x, &w, 1); /* warm-up */
        int iters = 20;
        double t0 = util_now();
        for (int it = 0; it < iters; it++) b->ops->matmul(b, o, x, &w, 1);
        double dt = (util_now() - t0) / iters;
        printf("  bench matmul BF16 M=1 N=4096 K=4096, %s, %s: %.3f ms, %.1f GB/s of weights\n",
               i ? "all threads" : "1 thread", cpu_simd_name(), dt * 1e3, (double)N * K * 2 / dt / 1e9);
    }
    backend_destroy(all);
    free(wv), free((void *)w.data), free(x), free(o);
}

int main(void) {
    nb_err e;
    be1 = cpu_backend_create(1, &e);
    be3 = cpu_backend_create(3, &e);
    if (!be1 || !be3) {
        fprintf(stderr, "backend: %s\n", e.msg);
        return 1;
    }
    RUN(test_threadpool);
    RUN(test_memory);
    RUN(test_backend_create);
    RUN(test_matmul_sweep);
    RUN(test_matmul_large);
    RUN(test_attention);
    RUN(test_attention_kv_dtypes);
    RUN(test_rope);
    RUN(test_rope_kv_write);
    RUN(test_rmsnorm);
    RUN(test_embedding_bias);
    RUN(test_elementwise);
    RUN(test_silu_mul_rows);
    RUN(test_softmax_gather_argmax);
    bench_matmul();
    backend_destroy(be1);
    backend_destroy(be3);
    TEST_DONE("kernels_cpu");
}
