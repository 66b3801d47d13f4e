/* The register-tiled matmul core shared by every weight dtype: the dense
 * ones in kernels/cpu/cpu_matmul.c and the packed ones in
 * quant/quant_matmul.c. Each of those files includes this header, defines
 * the two weight loaders declared below for its own dtypes, and
 * instantiates its tiles with TILE_DTYPE / TILE_TABLE; the one dispatch
 * table over all dtypes and the blocked loop (cpu_tile_run) are in
 * cpu_matmul.c. The loaders are inlined into every tile, which is why each
 * dtype's tiles are compiled next to its loaders rather than called through
 * a pointer.
 *
 * Each output element is one dot product over K: vector lanes accumulate
 * with FMA over whole vectors, the lanes are summed in a fixed order, and
 * the remaining K % VL products are added one by one. The portable build
 * (no AVX2+FMA) is the same code with 1x1 tiles and no vector part, so the
 * sum runs over k in order from 0. */
#ifndef NB_CPU_TILE_H
#define NB_CPU_TILE_H

#include <immintrin.h>
#include <stdint.h>

#include "kernels/backend.h"

#define AINLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)

#define VL 16
#define TM 4
#define TN 4
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vloadx(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vset1(a) _mm512_set1_ps(a)
#define vhsum(v) _mm512_reduce_add_ps(v)

#elif defined(__AVX2__) && defined(__FMA__)

#define VL 8
#define TM 2
#define TN 4
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vloadx(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vset1(a) _mm256_set1_ps(a)

/* Fixed pairwise order: (0+4, 1+5, 2+6, 3+7), then (a+c, b+d), then a+b. */
AINLINE float vhsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#else /* portable build */

#define TM 1
#define TN 1

#endif

/* A weight row's addresses, worked out once per tile (tile_row_of) so
 * that the loaders in the k loop only add k: a division by a group size
 * there, or a multiply per row, costs as much as the unpacking. */
typedef struct tile_row {
    const uint8_t *data;   /* the row's first byte */
    const void *scale;     /* the row's group scales (WINT2: codes; FP8: its block row) */
    float row_scale;       /* WINT8: the row's scale; WINT2: its super scale */
    int gshift;            /* k >> gshift is k's group, when the group is a power of two */
    int64_t group;         /* else k / group (gshift < 0) */
} tile_row;

/* k's scale group in row r (a per-channel group is made shift 62: 0). */
AINLINE int64_t tile_group(const tile_row *r, int64_t k) { return r->gshift >= 0 ? k >> r->gshift : k / r->group; }

/* A group size as tile_row's (gshift, group): the shift of a power of
 * two, 62 for a group that is the whole row, -1 otherwise. */
AINLINE void tile_set_group(tile_row *r, int64_t group, int64_t cols) {
    r->group = group;
    r->gshift = group >= cols ? 62 : (group & (group - 1)) == 0 ? __builtin_ctzll((unsigned long long)group) : -1;
}

/* What each including file defines for its dtypes: row n's tile_row; VL
 * weights of a row at columns k..k+VL-1 (k a multiple of VL); the one
 * weight at column k; both as FP32 with the same arithmetic as
 * quant_dequant_row. */
AINLINE tile_row tile_row_of(nb_dtype t, const nb_weight *w, int64_t n);
#ifdef VL
AINLINE vf tile_load_vec(nb_dtype t, const tile_row *r, int64_t k);
#endif
AINLINE float tile_load_one(nb_dtype t, const tile_row *r, int64_t k);

/* out[i*N + j*rs] = x[i] . w[n + j*rs] for i < tm, j < tn (tm <= TM,
 * tn <= TN), x with row stride K. The constant bounds unroll after
 * inlining so the accumulators stay in registers; each weight vector
 * loaded serves tm rows of x and each x vector tn weight rows. The weight
 * rows are rs apart (cpu_tile_run says why). */
AINLINE void tile(int tm, int tn, nb_dtype t, float *out, const float *x, const nb_weight *w, int64_t n, int64_t rs) {
    int64_t K = w->cols, N = w->rows;
    int64_t k = 0;
    tile_row row[TN];
#pragma GCC unroll 4
    for (int j = 0; j < tn; j++) row[j] = tile_row_of(t, w, n + j * rs);
#ifdef VL
    vf acc[TM][TN];
#pragma GCC unroll 4
    for (int i = 0; i < tm; i++)
#pragma GCC unroll 4
        for (int j = 0; j < tn; j++) acc[i][j] = vzero();
    for (; k + VL <= K; k += VL) {
        vf wv[TN];
#pragma GCC unroll 4
        for (int j = 0; j < tn; j++) wv[j] = tile_load_vec(t, &row[j], k);
#pragma GCC unroll 4
        for (int i = 0; i < tm; i++) {
            vf xv = vloadx(x + (size_t)i * K + k);
#pragma GCC unroll 4
            for (int j = 0; j < tn; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
#endif
    for (int i = 0; i < tm; i++)
        for (int j = 0; j < tn; j++) {
#ifdef VL
            float s = vhsum(acc[i][j]);
#else
            float s = 0.0f;
#endif
            for (int64_t kk = k; kk < K; kk++) s += x[(size_t)i * K + kk] * tile_load_one(t, &row[j], kk);
            out[(size_t)i * N + j * rs] = s;
        }
}

typedef void (*cpu_tile_fn)(float *out, const float *x, const nb_weight *w, int64_t n, int64_t rs);
/* One dtype's tiles, [tm-1][tn-1]. */
typedef cpu_tile_fn cpu_tile_set[TM][TN];

/* One function per (dtype, tm, tn) so each gets its own unrolled body. */
#define TILE_FN(name, T, tm, tn) \
    static void name(float *out, const float *x, const nb_weight *w, int64_t n, int64_t rs) { \
        tile(tm, tn, T, out, x, w, n, rs);                                                     \
    }
#if TN == 4
#define TILE_ROW(T, sfx, tm)                    \
    TILE_FN(tile_##sfx##_##tm##x1, T, tm, 1)    \
    TILE_FN(tile_##sfx##_##tm##x2, T, tm, 2)    \
    TILE_FN(tile_##sfx##_##tm##x3, T, tm, 3)    \
    TILE_FN(tile_##sfx##_##tm##x4, T, tm, 4)
#define TILE_TROW(sfx, tm) {tile_##sfx##_##tm##x1, tile_##sfx##_##tm##x2, tile_##sfx##_##tm##x3, tile_##sfx##_##tm##x4}
#else
#define TILE_ROW(T, sfx, tm) TILE_FN(tile_##sfx##_##tm##x1, T, tm, 1)
#define TILE_TROW(sfx, tm) {tile_##sfx##_##tm##x1}
#endif
#if TM == 4
#define TILE_DTYPE(T, sfx) TILE_ROW(T, sfx, 1) TILE_ROW(T, sfx, 2) TILE_ROW(T, sfx, 3) TILE_ROW(T, sfx, 4)
#define TILE_TABLE(sfx) {TILE_TROW(sfx, 1), TILE_TROW(sfx, 2), TILE_TROW(sfx, 3), TILE_TROW(sfx, 4)}
#elif TM == 2
#define TILE_DTYPE(T, sfx) TILE_ROW(T, sfx, 1) TILE_ROW(T, sfx, 2)
#define TILE_TABLE(sfx) {TILE_TROW(sfx, 1), TILE_TROW(sfx, 2)}
#else
#define TILE_DTYPE(T, sfx) TILE_ROW(T, sfx, 1)
#define TILE_TABLE(sfx) {TILE_TROW(sfx, 1)}
#endif

/* The packed dtypes' tiles, [dtype - NB_WINT8], defined in
 * quant/quant_matmul.c next to their loaders. */
extern const cpu_tile_set quant_tiles[NB_DTYPE_COUNT - NB_WINT8];

/* cpu_matmul_block for every dtype on x as the product uses it (for
 * NB_FP8_B128, rows already passed through quant_act_rows). */
void cpu_tile_run(float *out, const float *x, const nb_weight *w, int m0, int m1, int64_t n0, int64_t n1);

#endif
