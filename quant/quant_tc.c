/* The tensor-core layout of WINT8 / WINT4 weights (quant/quant_tc.h):
 * checks, sizes and the reordering from quant/quant.h's layout. */
#include "quant/quant_tc.h"

#include <string.h>

#include "common/util.h"
#include "quant/quant.h"

static int64_t chunks(const nb_weight *w) { return (w->rows + QUANT_TC_CHUNK - 1) / QUANT_TC_CHUNK; }

int quant_tc_check(const nb_weight *w, nb_err *e) {
    if (w->dtype != NB_WINT8 && w->dtype != NB_WINT4)
        return nb_errf(e, "%s weights have no tensor-core layout", nb_dtype_name(w->dtype));
    if (quant_check(w->dtype, w->rows, w->cols, w->group, e)) return -1;
    if (w->layout != NB_LAYOUT_PLAIN) return nb_errf(e, "the weight is not in quant/quant.h's layout");
    /* the kernel indexes rows, columns and chunk * k-steps * 512 bytes
     * with ints and size_t; keep every row and column index an int */
    if (w->rows > INT32_MAX || w->cols > INT32_MAX)
        return nb_errf(e, "[%lld, %lld] is too large", (long long)w->rows, (long long)w->cols);
    if (w->cols % QUANT_TC_KSTEP)
        return nb_errf(e, "%lld input columns are not a multiple of %d", (long long)w->cols, QUANT_TC_KSTEP);
    if (w->dtype == NB_WINT4 && w->group != w->cols && QUANT_TC_GROUP_UNIT % w->group && w->group % QUANT_TC_GROUP_UNIT)
        return nb_errf(e, "wint4 group %d neither divides nor is a multiple of %d", w->group, QUANT_TC_GROUP_UNIT);
    return 0;
}

int quant_tc_grouped(const nb_weight *w) { return w->dtype == NB_WINT4 && w->group != w->cols; }

size_t quant_tc_data_bytes(const nb_weight *w) {
    return quant_data_bytes(w->dtype, chunks(w) * QUANT_TC_CHUNK, w->cols);
}

size_t quant_tc_scale_bytes(const nb_weight *w) {
    if (!quant_tc_grouped(w)) return quant_scale_bytes(w->dtype, w->rows, w->cols, w->group);
    return sizeof(uint16_t) * (size_t)(w->cols / w->group) * (size_t)(chunks(w) * QUANT_TC_CHUNK);
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "quant_tc.c writes the layout's little-endian words with host stores"
#endif

static uint32_t ld16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* A byte's two nibbles at bits 0-3 and 16-19: the two halves of a B
 * register pair as (word >> 4r) & 0x000F000F reads them. */
static uint32_t spread(uint32_t b) { return (b & 0x0Fu) | (b & 0xF0u) << 12; }

/* The WINT4 step blocks of chunk c (KS of them, 512 bytes each, at dst).
 * Each source row gives a k-step 8 bytes, 16 nibbles: byte t holds
 * kk = 2t (low nibble) and 2t+1, byte 4 + t kk = 2t+8 and 2t+9, which are
 * lane (gi, t)'s b0 and b1 of the row's n-tile j, nibbles r0, r0 + 4 and
 * r0 + 1, r0 + 5 of its word j / 2 (r0 = 2 (j % 2)). Word w of lane
 * (gi, t) thus comes from rows 16 w + gi (j even) and 16 w + 8 + gi (j
 * odd); a k-step reads 8 bytes of each of the chunk's 64 rows, and the
 * next 7 k-steps the rest of the same cache lines. */
static void chunk_wint4(uint8_t *dst, const uint8_t *src, int64_t KS, int64_t n0, int64_t N) {
    static const uint8_t pad[8] = {0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88}; /* past N: q = 0 */
    const int64_t rowb = 8 * KS;
    for (int64_t s = 0; s < KS; s++)
        for (int gi = 0; gi < 8; gi++)
            for (int w = 0; w < 4; w++) {
                const int64_t na = n0 + 16 * w + gi, nb = na + 8;
                const uint8_t *a = na < N ? src + na * rowb + 8 * s : pad, *b = nb < N ? src + nb * rowb + 8 * s : pad;
                uint8_t *d = dst + s * QUANT_TC_STEP + 16 * (4 * gi) + 4 * w;
                for (int t = 0; t < 4; t++) {
                    uint32_t v = spread(a[t]) | spread(a[4 + t]) << 4 | spread(b[t]) << 8 | spread(b[4 + t]) << 12;
                    memcpy(d + 16 * t, &v, 4);
                }
            }
}

/* The WINT8 step blocks of chunk c (KS pairs of 512-byte sub-blocks): row
 * nn's 16 bytes of k-step s go to lanes (gi, t) of sub-block j / 4, word
 * j % 4, as kk = 2t, 2t+1 (b0) then 2t+8, 2t+9 (b1). */
static void chunk_wint8(uint8_t *dst, const uint8_t *src, int64_t KS, int64_t n0, int64_t N) {
    const int64_t K = 16 * KS;
    for (int nn = 0; nn < QUANT_TC_CHUNK; nn++) {
        const int j = nn / 8, gi = nn % 8;
        const uint8_t *row = n0 + nn < N ? src + (n0 + nn) * K : NULL;
        for (int64_t s = 0; s < KS; s++) {
            uint8_t *d = dst + (2 * s + j / 4) * QUANT_TC_STEP + 16 * (4 * gi) + 4 * (j % 4);
            for (int t = 0; t < 4; t++, d += 16) {
                uint32_t w = row ? ld16(row + 16 * s + 2 * t) | ld16(row + 16 * s + 2 * t + 8) << 16 : 0;
                memcpy(d, &w, 4);
            }
        }
    }
}

int quant_tc_repack(const nb_weight *src, void *data, void *scale, nb_err *e) {
    if (quant_tc_check(src, e)) return -1;
    const int64_t N = src->rows, K = src->cols, NC = chunks(src), KS = K / QUANT_TC_KSTEP;
    if (quant_tc_grouped(src)) {
        /* checked first: a refusal leaves data untouched as well */
        const int64_t G = K / src->group;
        const float *sc = src->scale;
        uint16_t *out = scale;
        for (int64_t i = 0; i < N * G; i++)
            if (quant_round_bf16(sc[i]) != sc[i])
                return nb_errf(e, "wint4 scale %g (row %lld) is not a BF16 value", (double)sc[i], (long long)(i / G));
        for (int64_t g = 0; g < G; g++)
            for (int64_t c = 0; c < NC; c++)
                for (int gi = 0; gi < 8; gi++)
                    for (int j = 0; j < 8; j++) {
                        int64_t n = QUANT_TC_CHUNK * c + 8 * j + gi;
                        out[((g * NC + c) * 8 + gi) * 8 + j] = n < N ? f32_to_bf16(sc[n * G + g]) : 0;
                    }
    }
    const uint8_t *in = src->data;
    uint8_t *out = data;
    const size_t step = src->dtype == NB_WINT8 ? 2 * QUANT_TC_STEP : QUANT_TC_STEP;
    for (int64_t c = 0; c < NC; c++) {
        uint8_t *d = out + (size_t)(c * KS) * step;
        if (src->dtype == NB_WINT4) chunk_wint4(d, in, KS, QUANT_TC_CHUNK * c, N);
        else chunk_wint8(d, in, KS, QUANT_TC_CHUNK * c, N);
    }
    return 0;
}
