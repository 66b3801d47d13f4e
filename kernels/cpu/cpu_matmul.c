/* Matrix products out = x @ w^T for every weight dtype: the F32/BF16/F16
 * weight loaders of the tile core in kernels/cpu/cpu_tile.h (the packed
 * formats' loaders are in quant/quant_matmul.c), the one table of tiles over
 * all dtypes, the blocked loop over it, and the split over threads.
 *
 * A tile of TM x rows by TN weight rows runs TM x TN dot products side by
 * side so each weight vector loaded is used TM times and each x vector TN
 * times; the per-element arithmetic is the same whatever the tile, so tiling
 * and threading never change results. */
#include "kernels/cpu/cpu_ops.h"

#include <string.h>

#include "common/util.h"
#include "kernels/cpu/cpu_tile.h"
#include "quant/quant.h"

const char *cpu_simd_name(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "scalar";
#endif
}

AINLINE float load_w1(const void *w, nb_dtype t, int64_t i) {
    switch (t) {
    case NB_BF16: return bf16_to_f32(((const uint16_t *)w)[i]);
    case NB_F16: return f16_to_f32(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

/* ---- row conversion --------------------------------------------------- */

void cpu_row_to_f32(float *out, const void *src, nb_dtype t, int64_t n) {
    int64_t i = 0;
    if (t == NB_F32) {
        memcpy(out, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *h = src;
    if (t == NB_BF16) {
        for (; i < n; i++) out[i] = bf16_to_f32(h[i]);
        return;
    }
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) out[i] = f16_to_f32(h[i]);
}

/* ---- portable reference ------------------------------------------------ */

void cpu_matmul_scalar(float *out, const float *x, const nb_weight *w, int M) {
    if (w->dtype >= NB_WINT8) {
        quant_matmul_ref(out, x, w, M);
        return;
    }
    int64_t N = w->rows, K = w->cols;
    for (int m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            const char *row = (const char *)w->data + (size_t)(n * K) * nb_dtype_size(w->dtype);
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += x[(size_t)m * K + k] * load_w1(row, w->dtype, k);
            out[(size_t)m * N + n] = s;
        }
}

/* ---- tiles (core in kernels/cpu/cpu_tile.h) ----------------------------- */

/* Dense rows are K contiguous elements. */
AINLINE tile_row tile_row_of(nb_dtype t, const nb_weight *w, int64_t n) {
    tile_row r = {.data = (const uint8_t *)w->data + (size_t)(n * w->cols) * (t == NB_F32 ? 4 : 2)};
    return r;
}

#if defined(__AVX512F__)

AINLINE vf tile_load_vec(nb_dtype t, const tile_row *row, int64_t i) {
    const void *r = row->data;
    switch (t) {
    case NB_BF16: {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)r + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case NB_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)r + i)));
    default: return _mm512_loadu_ps((const float *)r + i);
    }
}

#elif defined(VL)

AINLINE vf tile_load_vec(nb_dtype t, const tile_row *row, int64_t i) {
    const void *r = row->data;
    switch (t) {
    case NB_BF16: {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)r + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
#if defined(__F16C__)
    case NB_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)r + i)));
#else
    case NB_F16: {
        float tmp[8];
        for (int j = 0; j < 8; j++) tmp[j] = f16_to_f32(((const uint16_t *)r)[i + j]);
        return _mm256_loadu_ps(tmp);
    }
#endif
    default: return _mm256_loadu_ps((const float *)r + i);
    }
}

#endif

AINLINE float tile_load_one(nb_dtype t, const tile_row *r, int64_t k) { return load_w1(r->data, t, k); }

TILE_DTYPE(NB_F32, f32)
TILE_DTYPE(NB_BF16, bf16)
TILE_DTYPE(NB_F16, f16)

static const cpu_tile_set dense_tiles[3] = {TILE_TABLE(f32), TILE_TABLE(bf16), TILE_TABLE(f16)};

/* Every dtype's tiles, [dtype][tm-1][tn-1]. */
static const cpu_tile_fn (*const TILES[NB_DTYPE_COUNT])[TN] = {
    dense_tiles[0], dense_tiles[1], dense_tiles[2], quant_tiles[0], quant_tiles[1], quant_tiles[2], quant_tiles[3],
};

void cpu_tile_run(float *out, const float *x, const nb_weight *w, int m0, int m1, int64_t n0, int64_t n1) {
    int64_t N = w->rows, K = w->cols;
    const cpu_tile_fn(*tiles)[TN] = TILES[w->dtype];
    /* Rows of x outer, weight rows inner: the block's weight rows (sized by
     * the caller to fit in L2) are reused from cache by every group of TM x
     * rows, and those x rows stay in L1 across the block.
     * A tile's TN weight rows are not neighbours but a quarter of the block
     * apart (rs), so the block is read as TN long sequential streams: TN
     * adjacent rows are TN streams of one row each (a few hundred bytes to
     * a few KiB), which the hardware prefetcher follows poorly. On the
     * 2-vCPU EPYC, one thread reads BF16 weights at about 10 GB/s in
     * adjacent tiles and 20-24 GB/s in spaced ones (docs/BENCHMARKS.md).
     * Each output element's arithmetic is the same either way. The rows
     * left over (fewer than TN) go in one tile of neighbours. */
    const int64_t rs = (n1 - n0) / TN, tail = n0 + rs * TN;
    for (int m = m0; m < m1; m += TM) {
        int tm = m1 - m < TM ? m1 - m : TM;
        float *o = out + (size_t)m * N;
        const float *xm = x + (size_t)m * K;
        for (int64_t n = n0; n < n0 + rs; n++) tiles[tm - 1][TN - 1](o + n, xm, w, n, rs);
        if (tail < n1) tiles[tm - 1][n1 - tail - 1](o + tail, xm, w, tail, 1);
    }
}

void cpu_matmul_block(float *out, const float *x, const nb_weight *w, int m0, int m1, int64_t n0,
                      int64_t n1) {
    /* packed formats may first quantize the activations (FP8) */
    if (w->dtype >= NB_WINT8) quant_matmul_block(out, x, w, m0, m1, n0, n1);
    else cpu_tile_run(out, x, w, m0, m1, n0, n1);
}

/* ---- threading --------------------------------------------------------- */

typedef struct mm_job {
    float *out;
    const float *x; /* for packed formats, x as quant_act_rows made it */
    const nb_weight *w;
    int M;
    int64_t n_chunk; /* weight rows per task */
    int n_col_tasks;
    int m_chunk; /* x rows per task */
} mm_job;

static void mm_task(void *arg, int task) {
    const mm_job *j = arg;
    int ct = task % j->n_col_tasks, rt = task / j->n_col_tasks;
    int64_t n0 = (int64_t)ct * j->n_chunk, n1 = n0 + j->n_chunk;
    if (n1 > j->w->rows) n1 = j->w->rows;
    int m0 = rt * j->m_chunk, m1 = m0 + j->m_chunk;
    if (m1 > j->M) m1 = j->M;
    cpu_tile_run(j->out, j->x, j->w, m0, m1, n0, n1);
}

void cpu_matmul(threadpool *pool, float *out, const float *x, const nb_weight *w, int M) {
    int64_t N = w->rows, K = w->cols;
    if (M <= 0 || N <= 0) return;
    int threads = threadpool_size(pool);
    /* Column chunks of about 128 KiB of weights: small enough to stay in L2
     * while every x row passes over them, many enough to balance threads. */
    size_t wrow = w->dtype >= NB_WINT8 ? quant_data_bytes(w->dtype, 1, K) : (size_t)K * nb_dtype_size(w->dtype);
    int64_t chunk = wrow ? (int64_t)((128u << 10) / wrow) : N;
    chunk = chunk < 4 ? 4 : chunk & ~(int64_t)3;
    int64_t min_tasks = (int64_t)threads * 4;
    if (N / chunk < min_tasks) {
        /* too few chunks to share: shrink them, down to one tile */
        int64_t c = (N + min_tasks - 1) / min_tasks;
        c = (c + 3) & ~(int64_t)3;
        chunk = c < chunk ? c : chunk;
    }
    mm_job j = {out, x, w, M, chunk, (int)((N + chunk - 1) / chunk), M};
    /* Few columns and many rows (a long prefill through a narrow matrix):
     * split the rows too, in multiples of the tile height. */
    if (j.n_col_tasks < 2 * threads && M >= 32) {
        int rows_tasks = (2 * threads + j.n_col_tasks - 1) / j.n_col_tasks;
        int mc = (M + rows_tasks - 1) / rows_tasks;
        j.m_chunk = (mc + 3) & ~3;
    }
    int n_row_tasks = (M + j.m_chunk - 1) / j.m_chunk;
    /* Tiny products are not worth waking the pool for. */
    int64_t work = (int64_t)M * N * K;
    if (work < (1 << 15)) {
        cpu_matmul_block(out, x, w, 0, M, 0, N);
        return;
    }
    /* FP8 activations are quantized once here, not once per task */
    float *xa = NULL;
    if (w->dtype == NB_FP8_B128) {
        xa = xmalloc(sizeof(float) * (size_t)M * (size_t)K);
        quant_act_rows(xa, x, w, M);
        j.x = xa;
    }
    threadpool_run(pool, j.n_col_tasks * n_row_tasks, mm_task, &j);
    free(xa);
}

/* ---- vector helpers for attention -------------------------------------- */

float cpu_dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#ifdef VL
    vf acc = vzero();
    for (; i + VL <= n; i += VL) acc = vfma(vloadx(a + i), vloadx(b + i), acc);
    s = vhsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void cpu_axpy_f32(float *y, float a, const float *x, int n) {
    int i = 0;
#if defined(__AVX512F__)
    __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#elif defined(VL)
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

void cpu_scale_f32(float *y, float a, int n) {
    for (int i = 0; i < n; i++) y[i] *= a;
}
