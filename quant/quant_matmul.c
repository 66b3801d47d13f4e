/* out = x @ w^T on packed weights (layouts in quant/quant.h).
 *
 * The kernels widen each packed vector of weights to FP32 in registers
 * (integer unpack, then one multiply by its row's or group's scale, the
 * very expression quant_dequant_row uses, so every weight equals the
 * reference's bit for bit): these are the packed formats' loaders for the
 * tile core of kernels/cpu/cpu_tile.h, which uses each vector for a tile of
 * TM x rows. No matrix is ever dequantized in memory: the packed bytes are
 * read once per tile of x rows.
 * The only difference from the reference is the order of the sums (lanes,
 * then a fixed horizontal sum), the same for every element whatever the
 * block bounds, so threads and batch sizes give identical results.
 *
 * block_wise_fp8 also quantizes activations per token per 128 columns
 * (fp8_act_row); the quantized-and-rescaled rows are made once per call. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/cpu/cpu_tile.h"
#include "quant/quant.h"

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* x with each 128-column block replaced by e4m3(x / sx) * sx,
 * sx = max|block| / 448 (0 where the block is all zero). */
static void fp8_act_row(float *out, const float *x, int64_t K) {
    for (int64_t k0 = 0; k0 < K; k0 += QUANT_FP8_BLOCK) {
        int64_t k1 = k0 + QUANT_FP8_BLOCK < K ? k0 + QUANT_FP8_BLOCK : K;
        float m = 0.0f;
        for (int64_t k = k0; k < k1; k++) m = fmaxf(m, fabsf(x[k]));
        float sx = m / QUANT_FP8_MAX;
        for (int64_t k = k0; k < k1; k++)
            out[k] = sx == 0.0f ? 0.0f : fp8_e4m3_to_f32(fp8_e4m3_from_f32(x[k] / sx)) * sx;
    }
}

int quant_act_rows(float *out, const float *x, const nb_weight *w, int M) {
    if (w->dtype != NB_FP8_B128) return 0;
    for (int m = 0; m < M; m++) fp8_act_row(out + (size_t)m * w->cols, x + (size_t)m * w->cols, w->cols);
    return 1;
}

/* Rows [m0, m1) of x as the product uses them, returned as if indexed from
 * row 0; *owned is the copy to free, if one was made. */
static const float *act_rows(const float *x, const nb_weight *w, int m0, int m1, float **owned) {
    *owned = NULL;
    if (w->dtype != NB_FP8_B128) return x;
    int64_t K = w->cols;
    float *p = xmalloc(sizeof(float) * (size_t)(m1 - m0) * (size_t)K);
    quant_act_rows(p, x + (size_t)m0 * K, w, m1 - m0);
    *owned = p;
    return p - (size_t)m0 * K;
}

void quant_matmul_block(float *out, const float *x, const nb_weight *w, int m0, int m1, int64_t n0, int64_t n1) {
    float *owned;
    quant_matmul_block_act(out, act_rows(x, w, m0, m1, &owned), w, m0, m1, n0, n1);
    free(owned);
}

void quant_matmul_ref(float *out, const float *x, const nb_weight *w, int M) {
    int64_t N = w->rows, K = w->cols;
    float *owned, *row = xmalloc(sizeof(float) * (size_t)K);
    const float *xa = act_rows(x, w, 0, M, &owned);
    for (int64_t n = 0; n < N; n++) {
        quant_dequant_row(w, n, row);
        for (int m = 0; m < M; m++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += xa[(size_t)m * K + k] * row[k];
            out[(size_t)m * N + n] = s;
        }
    }
    free(row);
    free(owned);
}

/* Row n's data, and the scales its columns use. */
AINLINE tile_row tile_row_of(nb_dtype t, const nb_weight *w, int64_t n) {
    const int64_t K = w->cols;
    const uint8_t *d = w->data;
    const float *fs = w->scale;
    tile_row r = {0};
    switch (t) {
    case NB_WINT8:
        r.data = d + n * K;
        r.row_scale = fs[n];
        break;
    case NB_WINT4:
        r.data = d + n * (K / 2);
        r.scale = fs + n * (K / w->group);
        tile_set_group(&r, w->group, K);
        break;
    case NB_WINT2:
        r.data = d + n * (K / 4);
        r.scale = (const uint8_t *)w->scale + n * (K / QUANT_WINT2_GROUP);
        r.row_scale = ((const float *)w->scale2)[n];
        tile_set_group(&r, QUANT_WINT2_GROUP, K);
        break;
    default:
        r.data = d + n * K;
        r.scale = fs + (n / QUANT_FP8_BLOCK) * ceil_div(K, QUANT_FP8_BLOCK);
        tile_set_group(&r, QUANT_FP8_BLOCK, K);
        break;
    }
    return r;
}

/* One weight (column k of row r) as FP32: the same arithmetic as
 * quant_dequant_row. */
AINLINE float tile_load_one(nb_dtype t, const tile_row *r, int64_t k) {
    const uint8_t *d = r->data;
    const float *fs = r->scale;
    switch (t) {
    case NB_WINT8: return (float)((const int8_t *)d)[k] * r->row_scale;
    case NB_WINT4: {
        uint8_t b = d[k / 2];
        return (float)((k % 2 ? b >> 4 : b & 15) - 8) * fs[tile_group(r, k)];
    }
    case NB_WINT2: {
        uint8_t code = ((const uint8_t *)r->scale)[tile_group(r, k)];
        return quant_wint2_value((d[k / 4] >> (2 * (k % 4))) & 3, code, r->row_scale);
    }
    default: return fp8_e4m3_to_f32(d[k]) * fs[tile_group(r, k)];
    }
}

#ifdef VL

/* Spreads the four 2-bit fields of each 32-bit lane's low byte over its
 * four bytes, in column order. */
AINLINE __m128i spread_u2(__m128i b) {
    __m128i t = _mm_and_si128(b, _mm_set1_epi32(3));
    t = _mm_or_si128(t, _mm_and_si128(_mm_slli_epi32(b, 6), _mm_set1_epi32(0x300)));
    t = _mm_or_si128(t, _mm_and_si128(_mm_slli_epi32(b, 12), _mm_set1_epi32(0x30000)));
    return _mm_or_si128(t, _mm_and_si128(_mm_slli_epi32(b, 18), _mm_set1_epi32(0x3000000)));
}

#if VL == 16

/* 16 int8 -> 16 floats */
AINLINE vf cvt_i8(const void *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* 8 bytes -> the 16 q = u - 8 in column order (low nibble first) as
 * floats: the nibbles are split, interleaved and offset in 128-bit
 * registers, so only one 512-bit widening and one conversion remain. */
AINLINE vf cvt_u4(const void *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p), m = _mm_set1_epi8(0x0f);
    __m128i u = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_sub_epi8(u, _mm_set1_epi8(8))));
}

/* 4 bytes -> 16 2-bit values */
AINLINE vf cvt_u2(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    __m128i t = spread_u2(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v)));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(t));
}

/* 16 E4M3 bytes -> 16 floats: exponent and mantissa moved into FP32's
 * fields make 2^-120 times the value (subnormals included), then one exact
 * multiply by 2^120. */
AINLINE vf cvt_fp8(const void *p) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i mag = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7f)), 20);
    __m512i sgn = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(mag, sgn)), _mm512_set1_ps(0x1p120f));
}

#else /* AVX2 */

AINLINE vf cvt_i8(const void *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 4 bytes -> 8 q = u - 8 in column order, as floats (see the AVX-512 one) */
AINLINE vf cvt_u4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    __m128i b = _mm_cvtsi32_si128(v), m = _mm_set1_epi8(0x0f);
    __m128i u = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_sub_epi8(u, _mm_set1_epi8(8))));
}

/* 2 bytes -> 8 2-bit values */
AINLINE vf cvt_u2(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    __m128i t = spread_u2(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v)));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(t));
}

AINLINE vf cvt_fp8(const void *p) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i mag = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7f)), 20);
    __m256i sgn = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
    return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(mag, sgn)), _mm256_set1_ps(0x1p120f));
}

#endif

/* VL weights (columns k..k+VL-1 of row r) as FP32. k is a multiple of VL
 * and the vector never straddles a scale group (quant_check: groups are
 * multiples of 16 or whole rows; FP8 blocks are 128). */
AINLINE vf tile_load_vec(nb_dtype t, const tile_row *r, int64_t k) {
    const uint8_t *d = r->data;
    const float *fs = r->scale;
    switch (t) {
    case NB_WINT8: return vmul(cvt_i8(d + k), vset1(r->row_scale));
    case NB_WINT4: return vmul(cvt_u4(d + k / 2), vset1(fs[tile_group(r, k)]));
    case NB_WINT2: {
        uint8_t code = ((const uint8_t *)r->scale)[tile_group(r, k)];
        float step = quant_wint2_step(code, r->row_scale);
        return vmul(vsub(cvt_u2(d + k / 4), vset1((float)(code >> 4) * 0.25f)), vset1(step));
    }
    default: return vmul(cvt_fp8(d + k), vset1(fs[tile_group(r, k)]));
    }
}

#endif

TILE_DTYPE(NB_WINT8, w8)
TILE_DTYPE(NB_WINT4, w4)
TILE_DTYPE(NB_WINT2, w2)
TILE_DTYPE(NB_FP8_B128, f8)

const cpu_tile_set quant_tiles[NB_DTYPE_COUNT - NB_WINT8] = {TILE_TABLE(w8), TILE_TABLE(w4), TILE_TABLE(w2),
                                                             TILE_TABLE(f8)};

void quant_matmul_block_act(float *out, const float *xa, const nb_weight *w, int m0, int m1, int64_t n0,
                            int64_t n1) {
    cpu_tile_run(out, xa, w, m0, m1, n0, n1);
}
