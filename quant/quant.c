/* Quantized formats: FP8 E4M3 conversion, sizes, round-to-nearest packing
 * and reading back (layouts in quant/quant.h). */
#include "quant/quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "quant/quant_tc.h"

/* ---- FP8 E4M3 (fn) ---- */

uint8_t fp8_e4m3_from_f32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return 0x7f;
    if (u >= 0x43e00000u) return sign | 0x7e; /* >= 448 saturates */
    if (u < 0x3c800000u) {
        /* below 2^-6: multiples of 2^-9 (code 8, the smallest normal, is
         * also exponent 1 mantissa 0) */
        float a;
        memcpy(&a, &u, 4);
        return sign | (uint8_t)nearbyintf(a * 512.0f);
    }
    /* round the 23-bit mantissa to 3 bits, ties to even; a carry moves into
     * the exponent as it should */
    u += 0x7ffffu + ((u >> 20) & 1u);
    uint32_t code = (u >> 20) - (120u << 3); /* rebias 127 -> 7 */
    return sign | (uint8_t)(code > 0x7e ? 0x7e : code);
}

float fp8_e4m3_to_f32(uint8_t b) {
    if ((b & 0x7f) == 0x7f) return NAN;
    /* exponent and mantissa moved into FP32's fields make 2^-120 times the
     * value, subnormals included; the multiply by 2^120 is exact */
    uint32_t u = (uint32_t)(b & 0x7f) << 20 | (uint32_t)(b & 0x80) << 24;
    float f;
    memcpy(&f, &u, 4);
    return f * 0x1p120f;
}

float quant_round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

/* The smallest BF16 value >= x (x >= 0, finite). */
static float bf16_round_up(float x) {
    uint16_t h = f32_to_bf16(x);
    if (bf16_to_f32(h) < x) h++;
    return bf16_to_f32(h);
}

/* ---- shapes and sizes ---- */

static int is_quant(nb_dtype t) { return t == NB_WINT8 || t == NB_WINT4 || t == NB_WINT2 || t == NB_FP8_B128; }

int quant_check(nb_dtype t, int64_t rows, int64_t cols, int group, nb_err *e) {
    if (!is_quant(t)) return nb_errf(e, "%s is not a quantized format", nb_dtype_name(t));
    if (rows <= 0 || cols <= 0) return nb_errf(e, "empty [%lld, %lld] weight", (long long)rows, (long long)cols);
    switch (t) {
    case NB_WINT4:
        if (cols % 2) return nb_errf(e, "wint4 needs an even number of input columns, got %lld", (long long)cols);
        if (group <= 0 || cols % group)
            return nb_errf(e, "wint4 group %d does not divide the %lld input columns", group, (long long)cols);
        if (group % 16 && group != cols)
            return nb_errf(e, "wint4 group %d must be a multiple of 16 or the whole row", group);
        return 0;
    case NB_WINT2:
        if (group != QUANT_WINT2_GROUP) return nb_errf(e, "wint2 group must be %d, got %d", QUANT_WINT2_GROUP, group);
        if (cols % QUANT_WINT2_GROUP)
            return nb_errf(e, "wint2 needs input columns in multiples of %d, got %lld", QUANT_WINT2_GROUP, (long long)cols);
        return 0;
    default: return 0;
    }
}

size_t quant_data_bytes(nb_dtype t, int64_t rows, int64_t cols) {
    size_t n = (size_t)rows * (size_t)cols;
    switch (t) {
    case NB_WINT4: return n / 2;
    case NB_WINT2: return n / 4;
    case NB_WINT8:
    case NB_FP8_B128: return n;
    default: return n * nb_dtype_size(t);
    }
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t quant_scale_bytes(nb_dtype t, int64_t rows, int64_t cols, int group) {
    switch (t) {
    case NB_WINT8: return sizeof(float) * (size_t)rows;
    case NB_WINT4: return group > 0 ? sizeof(float) * (size_t)rows * (size_t)(cols / group) : 0;
    case NB_WINT2: return (size_t)rows * (size_t)(cols / QUANT_WINT2_GROUP);
    case NB_FP8_B128: return sizeof(float) * (size_t)(ceil_div(rows, QUANT_FP8_BLOCK) * ceil_div(cols, QUANT_FP8_BLOCK));
    default: return 0;
    }
}

size_t quant_scale2_bytes(nb_dtype t, int64_t rows) { return t == NB_WINT2 ? sizeof(float) * (size_t)rows : 0; }

size_t quant_weight_bytes(const nb_weight *w) {
    if (w->layout == NB_LAYOUT_TC)
        return quant_tc_data_bytes(w) + quant_tc_scale_bytes(w) + quant_scale2_bytes(w->dtype, w->rows);
    return quant_data_bytes(w->dtype, w->rows, w->cols) + quant_scale_bytes(w->dtype, w->rows, w->cols, w->group) +
           quant_scale2_bytes(w->dtype, w->rows);
}

/* ---- element access ---- */

void quant_put_q(nb_dtype t, void *data, int64_t cols, int64_t r, int64_t k, int q) {
    uint8_t *d = data;
    size_t i = (size_t)r * (size_t)cols + (size_t)k;
    switch (t) {
    case NB_WINT8: ((int8_t *)data)[i] = (int8_t)q; break;
    case NB_WINT4: {
        uint8_t u = (uint8_t)(q + 8), *b = d + i / 2;
        *b = i % 2 ? (uint8_t)((*b & 0x0f) | (u << 4)) : (uint8_t)((*b & 0xf0) | u);
        break;
    }
    case NB_WINT2: {
        uint8_t *b = d + i / 4;
        int sh = 2 * (int)(i % 4);
        *b = (uint8_t)((*b & ~(3 << sh)) | ((q & 3) << sh));
        break;
    }
    case NB_FP8_B128: d[i] = (uint8_t)q; break;
    default: break;
    }
}

/* ---- WINT2 building blocks ---- */

float quant_wint2_value(int q, uint8_t code, float super) {
    return ((float)q - (float)(code >> 4) * 0.25f) * quant_wint2_step(code, super);
}

int quant_wint2_q(float v, uint8_t code, float super) {
    float step = quant_wint2_step(code, super);
    if (step == 0.0f) return 0;
    float q = nearbyintf(v / step + (float)(code >> 4) * 0.25f);
    return q < 0.0f ? 0 : q > 3.0f ? 3 : (int)q;
}

float quant_wint2_super(const float *row, int64_t cols, int group) {
    float best = 0.0f;
    for (int64_t g = 0; g + group <= cols; g += group) {
        float lo = row[g], hi = row[g];
        for (int i = 1; i < group; i++) {
            lo = fminf(lo, row[g + i]);
            hi = fmaxf(hi, row[g + i]);
        }
        /* four levels three steps apart cover [lo, hi] with step (hi-lo)/3 */
        best = fmaxf(best, (hi - lo) / 3.0f);
    }
    return bf16_round_up(best);
}

/* The nearest of 0, 1, 2, 3 to u (halves round up: only the search uses
 * it), in operations the compiler vectorizes. */
static inline float nearest_level(float u) {
    float c = u < 0.0f ? 0.0f : u > 3.0f ? 3.0f : u;
    return (float)(int)(c + 0.5f);
}

uint8_t quant_wint2_fit_group(const float *v, int n, float super) {
    float lo = 0.0f, t[256];
    if (n > 256) n = 256;
    for (int i = 0; i < n; i++) lo = fminf(lo, v[i]);
    uint8_t best = 0;
    float best_err = INFINITY;
    for (int ls = 0; ls < 16; ls++) {
        float step = quant_wint2_step((uint8_t)ls, super);
        if (step == 0.0f) continue;
        for (int i = 0; i < n; i++) t[i] = v[i] / step;
        /* the zero points worth trying put the lowest level near the
         * group's minimum (zc = -4 lo / step) or a little above it, which
         * clips outliers: within 6 of it was as good as all 16 on Gaussian
         * groups (0.05% more error) */
        int z0 = (int)nearbyintf(-4.0f * lo / step);
        for (int zc = z0 - 6 < 0 ? 0 : z0 - 6; zc <= z0 + 6 && zc < 16; zc++) {
            float off = (float)zc * 0.25f, acc[8] = {0};
            /* the error in units of step: values t + off rounded to 0..3;
             * eight lanes side by side so the compiler vectorizes it */
            int i = 0;
            for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++) {
                    float u = t[i + l] + off, d = u - nearest_level(u);
                    acc[l] += d * d;
                }
            for (; i < n; i++) {
                float u = t[i] + off, d = u - nearest_level(u);
                acc[0] += d * d;
            }
            float err = step * step * (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
            if (err < best_err) best_err = err, best = (uint8_t)(zc << 4 | ls);
        }
    }
    return best;
}

/* ---- packing ---- */

/* max |v|, NaNs passed over (as fmaxf would, but fmaxf is a libm call
 * and this loop vectorizes) */
static float absmax(const float *v, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(v[i]);
        m = a > m ? a : m;
    }
    return m;
}

/* q = v / scale rounded to nearest even and clamped to [-qmax, qmax], for
 * a run of n values with one nonzero scale; branch-free so that it
 * vectorizes. A NaN fails both comparisons and converts as (int)NaN. */
static void clamp_run(const float *v, int64_t n, float scale, int qmax, int8_t *q) {
    const float lo = (float)-qmax, hi = (float)qmax;
    for (int64_t i = 0; i < n; i++) {
        float r = nearbyintf(v[i] / scale);
        q[i] = (int8_t)(int)(r < lo ? lo : r > hi ? hi : r);
    }
}

int quant_pack(nb_dtype t, const float *w, int64_t rows, int64_t cols, int group, void *data, void *scale,
               void *scale2, nb_err *e) {
    if (quant_check(t, rows, cols, group, e)) return -1;
    memset(data, 0, quant_data_bytes(t, rows, cols));
    float *fs = scale;
    switch (t) {
    case NB_WINT8:
        /* bytes written directly, not through quant_put_q: quantizing at
         * load goes through every weight of the model */
        for (int64_t r = 0; r < rows; r++) {
            const float *row = w + r * cols;
            int8_t *q = (int8_t *)data + r * cols;
            float s = fs[r] = quant_round_bf16(absmax(row, cols) / 127.0f);
            if (s != 0.0f) clamp_run(row, cols, s, 127, q); /* else the zeros of the memset */
        }
        return 0;
    case NB_WINT4: {
        /* group and cols are even (quant_check): each pair of columns is
         * one byte, the even one in the low nibble; a per-channel group
         * goes in runs of WINT4_RUN */
        enum { WINT4_RUN = 256 };
        int64_t groups = cols / group;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t g = 0; g < groups; g++) {
                const float *v = w + r * cols + g * group;
                uint8_t *b = (uint8_t *)data + (r * cols + g * group) / 2;
                float s = fs[r * groups + g] = quant_round_bf16(absmax(v, group) / 7.0f);
                for (int64_t i0 = 0; i0 < group; i0 += WINT4_RUN) {
                    int n = group - i0 < WINT4_RUN ? (int)(group - i0) : WINT4_RUN;
                    int8_t q[WINT4_RUN];
                    if (s != 0.0f) clamp_run(v + i0, n, s, 7, q);
                    else memset(q, 0, sizeof q);
                    for (int i = 0; i < n; i += 2) b[(i0 + i) / 2] = (uint8_t)((q[i] + 8) | (q[i + 1] + 8) << 4);
                }
            }
        return 0;
    }
    case NB_WINT2: {
        uint8_t *codes = scale;
        float *super = scale2;
        int64_t groups = cols / group;
        for (int64_t r = 0; r < rows; r++) {
            const float *row = w + r * cols;
            super[r] = quant_wint2_super(row, cols, group);
            for (int64_t g = 0; g < groups; g++) {
                const float *v = row + g * group;
                uint8_t code = codes[r * groups + g] = quant_wint2_fit_group(v, group, super[r]);
                for (int i = 0; i < group; i++)
                    quant_put_q(t, data, cols, r, g * group + i, quant_wint2_q(v[i], code, super[r]));
            }
        }
        return 0;
    }
    case NB_FP8_B128: {
        int64_t bc = ceil_div(cols, QUANT_FP8_BLOCK);
        for (int64_t br = 0; br * QUANT_FP8_BLOCK < rows; br++)
            for (int64_t bk = 0; bk < bc; bk++) {
                int64_t r0 = br * QUANT_FP8_BLOCK, r1 = r0 + QUANT_FP8_BLOCK < rows ? r0 + QUANT_FP8_BLOCK : rows;
                int64_t k0 = bk * QUANT_FP8_BLOCK, k1 = k0 + QUANT_FP8_BLOCK < cols ? k0 + QUANT_FP8_BLOCK : cols;
                float m = 0.0f;
                for (int64_t r = r0; r < r1; r++) m = fmaxf(m, absmax(w + r * cols + k0, k1 - k0));
                float s = fs[br * bc + bk] = m / QUANT_FP8_MAX;
                for (int64_t r = r0; r < r1; r++) {
                    uint8_t *q = (uint8_t *)data + r * cols;
                    for (int64_t k = k0; k < k1; k++) q[k] = s == 0.0f ? 0 : fp8_e4m3_from_f32(w[r * cols + k] / s);
                }
            }
        return 0;
    }
    default: return nb_errf(e, "%s is not a quantized format", nb_dtype_name(t));
    }
}

/* ---- reading back ---- */

void quant_dequant_row(const nb_weight *w, int64_t r, float *out) {
    int64_t K = w->cols;
    const uint8_t *d = w->data;
    const float *fs = w->scale;
    switch (w->dtype) {
    case NB_F32: memcpy(out, (const float *)w->data + r * K, sizeof(float) * (size_t)K); return;
    case NB_BF16:
        for (int64_t k = 0; k < K; k++) out[k] = bf16_to_f32(((const uint16_t *)w->data)[r * K + k]);
        return;
    case NB_F16:
        for (int64_t k = 0; k < K; k++) out[k] = f16_to_f32(((const uint16_t *)w->data)[r * K + k]);
        return;
    case NB_WINT8:
        for (int64_t k = 0; k < K; k++) out[k] = (float)((const int8_t *)w->data)[r * K + k] * fs[r];
        return;
    case NB_WINT4: {
        const uint8_t *row = d + r * (K / 2);
        const float *s = fs + r * (K / w->group);
        for (int64_t k = 0; k < K; k++) {
            int u = k % 2 ? row[k / 2] >> 4 : row[k / 2] & 15;
            out[k] = (float)(u - 8) * s[k / w->group];
        }
        return;
    }
    case NB_WINT2: {
        const uint8_t *row = d + r * (K / 4), *codes = (const uint8_t *)w->scale + r * (K / QUANT_WINT2_GROUP);
        float super = ((const float *)w->scale2)[r];
        for (int64_t k = 0; k < K; k++)
            out[k] = quant_wint2_value((row[k / 4] >> (2 * (k % 4))) & 3, codes[k / QUANT_WINT2_GROUP], super);
        return;
    }
    case NB_FP8_B128: {
        const float *s = fs + (r / QUANT_FP8_BLOCK) * ceil_div(K, QUANT_FP8_BLOCK);
        for (int64_t k = 0; k < K; k++) out[k] = fp8_e4m3_to_f32(d[r * K + k]) * s[k / QUANT_FP8_BLOCK];
        return;
    }
    default: memset(out, 0, sizeof(float) * (size_t)K); return;
    }
}

double quant_rel_error(const float *w, const nb_weight *q) {
    float *row = xmalloc(sizeof(float) * (size_t)q->cols);
    double num = 0.0, den = 0.0;
    for (int64_t r = 0; r < q->rows; r++) {
        quant_dequant_row(q, r, row);
        for (int64_t k = 0; k < q->cols; k++) {
            double a = w[r * q->cols + k], d = a - row[k];
            num += d * d;
            den += a * a;
        }
    }
    free(row);
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}
