/* quant/quant_tc.c: the tensor-core layout of WINT8 / WINT4 / WINT2 weights.
 * Random packed weights are repacked and read back the way the CUDA kernel
 * (kernels/cuda/cuda_wint_tc.cu) reads them: frag_q and frag_scale below
 * mirror its addressing, from a lane's 16-byte load of a step block to the
 * nibble or byte behind each half of its B registers, and the element that
 * register half stands for comes from the PTX ISA's B fragment of
 * mma.m16n8k16 (lane L, g = L / 4, t = L % 4: b0 holds k = 2t, 2t+1 of
 * column g, b1 k = 2t+8, 2t+9), independently of quant_tc.c. Every element
 * (n, k) must be reached exactly once and hold the plain layout's q (0 past
 * N), for N not a multiple of 64 and several K and groups; for WINT2 the
 * BF16 weight the kernel makes from q and the group's code byte must be
 * (q - zc/4) * (ls + 1) exactly. The bytes
 * must also equal those of ref_repack, a plain element-by-element repack
 * written from quant_tc.h's description (quant_tc.c builds the same bytes
 * a tile and a vector at a time, split over threads for large weights).
 * Also: the integer-to-float tricks of the kernel (and of cuda_wint.cu's
 * GEMV on the plain layout) are exact, sizes, refusals. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "quant/quant.h"
#include "quant/quant_tc.h"
#include "tests/test.h"

/* ---- the kernel's view ------------------------------------------------------- */

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The q in half `half` (0: low 16 bits) of register `reg` (0: b0, 1: b1)
 * of n-tile j (0..7) that lane `lane` builds at k-step s of chunk c: the
 * kernel loads the lane's 16 bytes at ((c * KS + s) * subs + h) * 512 +
 * lane * 16 (subs = 1 for WINT4, 2 for WINT8), then
 *  - WINT4: word w = j / 2, r = 2 (j % 2) + reg, and the pair is
 *    (word >> 4r) & 0x000F000F, each half a nibble u, q = u - 8;
 *  - WINT8: sub-block h = j / 4, word j % 4, byte 2 reg + half, q the
 *    int8. */
static int frag_q(nb_dtype t, const uint8_t *data, int64_t KS, int64_t c, int64_t s, int lane, int j, int reg,
                  int half) {
    if (t == NB_WINT4) {
        const uint8_t *p = data + (size_t)(c * KS + s) * 512 + (size_t)lane * 16;
        uint32_t word = le32(p + 4 * (j / 2)), pair = (word >> (4 * (2 * (j % 2) + reg))) & 0x000F000Fu;
        return (int)(half ? pair >> 16 : pair & 0xFu) - 8;
    }
    const uint8_t *p = data + (size_t)((c * KS + s) * 2 + j / 4) * 512 + (size_t)lane * 16 + 4 * (j % 4);
    return (int8_t)p[2 * reg + half];
}

/* WINT2: the BF16 weight, as a float, that lane `lane` builds for half
 * `half` of register `reg` of n-tile j at k-step s of chunk c: its 8 bytes
 * at (c * KS + s) * 256 + lane * 8, word w = j / 4, pair P = 2 (j % 4) +
 * reg, shifted right by sh = 0, 6, 12 for P < 3, < 6, else, and masked to
 * the field i = P - sh / 2 of each half; the half OR-ed into BF16 128.0
 * (128 + 4^i q) times 4^-i minus 128 * 4^-i (one BF16 rounding, as
 * __hfma2) is q; then times the code's ls + 1, minus zc / 4 (ls + 1) (one
 * more rounding). The code: byte j of the lane's 8 at ((grp * NC + c) * 8
 * + lane / 4) * 8, grp = s / 4. */
static float frag_w2(const uint8_t *data, const uint8_t *codes, int64_t NC, int64_t KS, int64_t c, int64_t s,
                     int lane, int j, int reg, int half) {
    const uint8_t *p = data + (size_t)(c * KS + s) * 256 + (size_t)lane * 8;
    const int P = 2 * (j % 4) + reg, sh = P < 3 ? 0 : P < 6 ? 6 : 12, i = P - sh / 2;
    const uint32_t pair = (le32(p + 4 * (j / 4)) >> sh) & (3u << 2 * i) * 0x10001u;
    const uint16_t h = (uint16_t)(half ? pair >> 16 : pair & 0xffffu);
    const float inv = 1.0f / (float)(1 << 2 * i);
    const float q = quant_round_bf16(fmaf(bf16_to_f32((uint16_t)(0x4300 | h)), inv, -128.0f * inv));
    const uint8_t code = codes[((size_t)(s / 4 * NC + c) * 8 + (size_t)lane / 4) * 8 + (size_t)j];
    const float a = (float)((code & 15) + 1), off = (float)(code >> 4) * 0.25f;
    return quant_round_bf16(fmaf(q, a, -off * a));
}

/* The BF16 scale lane `lane` uses for n-tile j of chunk c in group grp:
 * its 16 bytes at ((grp * NC + c) * 8 + lane / 4) * 16, half j. */
static float frag_scale(const uint16_t *scale, int64_t NC, int64_t grp, int64_t c, int lane, int j) {
    return bf16_to_f32(scale[((grp * NC + c) * 8 + lane / 4) * 8 + j]);
}

/* ---- the plain layout --------------------------------------------------------- */

static int plain_q(const nb_weight *w, int64_t n, int64_t k) {
    const uint8_t *d = w->data;
    if (w->dtype == NB_WINT8) return (int8_t)d[n * w->cols + k];
    size_t i = (size_t)(n * w->cols + k);
    if (w->dtype == NB_WINT2) return (d[i / 4] >> (2 * (i % 4))) & 3;
    return (int)((d[i / 2] >> (4 * (i % 2))) & 15u) - 8;
}

/* Random q in the format's range and random BF16 scales (WINT2: random
 * code bytes and super scales). */
static nb_weight random_weight(nb_dtype t, int64_t N, int64_t K, int group) {
    nb_weight w = {.dtype = t, .rows = N, .cols = K, .group = t == NB_WINT2 ? QUANT_WINT2_GROUP : group};
    uint8_t *data = xcalloc(1, quant_data_bytes(t, N, K));
    const size_t sb = quant_scale_bytes(t, N, K, w.group);
    void *scale = xmalloc(sb);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++)
            quant_put_q(t, data, K, n, k,
                        t == NB_WINT8   ? (int)(urand() * 255) - 127
                        : t == NB_WINT2 ? (int)(urand() * 4)
                                        : (int)(urand() * 16) - 8);
    if (t == NB_WINT2) {
        for (size_t i = 0; i < sb; i++) ((uint8_t *)scale)[i] = (uint8_t)(urand() * 256);
        float *super = xmalloc(quant_scale2_bytes(t, N));
        for (int64_t n = 0; n < N; n++) super[n] = quant_round_bf16((float)(0.001 + 0.01 * urand()));
        w.scale2 = super;
    } else {
        for (size_t i = 0; i < sb / sizeof(float); i++)
            ((float *)scale)[i] = quant_round_bf16((float)(0.001 + 0.01 * urand()));
    }
    w.data = data;
    w.scale = scale;
    return w;
}

static void free_weight(nb_weight *w) { free((void *)w->data), free((void *)w->scale), free((void *)w->scale2); }

/* ---- the reference repack ------------------------------------------------------ */

/* quant_tc_repack one element at a time, from quant_tc.h: element (n, k),
 * n in chunk c = n / 64 as 8 j + gi, k = 16 s + kk with kk = 2t + 8 reg +
 * half, is half `half` of register `reg` of n-tile j in lane 4 gi + t of
 * step block (c, s):
 *  - WINT4: word j / 2, nibble r + 4 half with r = 2 (j % 2) + reg, u = q + 8;
 *  - WINT8: sub-block j / 4, word j % 4, byte 2 reg + half, the int8 q;
 *  - WINT2: step block at (c * KS + s) * 256, lane's word j / 4 at lane * 8
 *    + 4 (j / 4), bits 2 P + 16 half with P = 2 (j % 4) + reg;
 * rows past N hold q = 0. Grouped scales: BF16 at ((g * NC + c) * 8 + gi)
 * * 8 + j, 0 past N; WINT2's code bytes the same way, one byte each. */
static void ref_repack(const nb_weight *w, uint8_t *data, void *scale) {
    const int64_t N = w->rows, K = w->cols, NC = (N + 63) / 64, KS = K / 16;
    memset(data, 0, quant_tc_data_bytes(w));
    for (int64_t n = 0; n < NC * 64; n++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t c = n / 64, s = k / 16;
            const int j = (int)(n % 64 / 8), gi = (int)(n % 8), kk = (int)(k % 16);
            const int reg = kk / 8, t = kk % 8 / 2, half = kk % 2, lane = 4 * gi + t;
            const int q = n < N ? plain_q(w, n, k) : 0;
            if (w->dtype == NB_WINT2) {
                const int P = 2 * (j % 4) + reg;
                uint8_t *wd = data + (size_t)(c * KS + s) * 256 + (size_t)lane * 8 + 4 * (j / 4);
                const int bit = 2 * P + 16 * half;
                wd[bit / 8] |= (uint8_t)(q << (bit % 8));
            } else if (w->dtype == NB_WINT4) {
                const int p = 2 * (j % 2) + reg + 4 * half;
                uint8_t *b = data + (size_t)(c * KS + s) * 512 + (size_t)lane * 16 + 4 * (j / 2) + p / 2;
                *b |= (uint8_t)((q + 8) << (4 * (p % 2)));
            } else {
                data[(size_t)((c * KS + s) * 2 + j / 4) * 512 + (size_t)lane * 16 + 4 * (j % 4) + 2 * reg + half] =
                    (uint8_t)q;
            }
        }
    if (!quant_tc_new_scale(w)) return;
    const int64_t G = K / w->group;
    for (int64_t g = 0; g < G; g++)
        for (int64_t n = 0; n < NC * 64; n++) {
            const size_t at = (size_t)((g * NC + n / 64) * 8 + n % 8) * 8 + (size_t)(n % 64 / 8);
            if (w->dtype == NB_WINT2) ((uint8_t *)scale)[at] = n < N ? ((const uint8_t *)w->scale)[n * G + g] : 0;
            else ((uint16_t *)scale)[at] = n < N ? f32_to_bf16(((const float *)w->scale)[n * G + g]) : 0;
        }
}

/* quant_tc_repack's bytes (data, and scale when rewritten) against
 * ref_repack's. */
static void check_bytes(const nb_weight *w, const uint8_t *data, const void *scale) {
    const size_t db = quant_tc_data_bytes(w), sb = quant_tc_new_scale(w) ? quant_tc_scale_bytes(w) : 0;
    uint8_t *rd = xmalloc(db);
    void *rs = sb ? xmalloc(sb) : NULL;
    ref_repack(w, rd, rs);
    size_t i = 0;
    while (i < db && data[i] == rd[i]) i++;
    CHECK(i == db, "%s N=%lld K=%lld group %d: data byte %zu is %02x, the reference's %02x", nb_dtype_name(w->dtype),
          (long long)w->rows, (long long)w->cols, w->group, i, i < db ? data[i] : 0, i < db ? rd[i] : 0);
    CHECK(!sb || memcmp(scale, rs, sb) == 0, "%s N=%lld K=%lld group %d: scales differ from the reference",
          nb_dtype_name(w->dtype), (long long)w->rows, (long long)w->cols, w->group);
    free(rd), free(rs);
}

/* ---- tests ---------------------------------------------------------------------- */

/* Repacks one shape and checks every element and scale through the mirror. */
static void check_shape(nb_dtype t, int64_t N, int64_t K, int group) {
    nb_weight w = random_weight(t, N, K, group);
    nb_err e = {{0}};
    const char *name = nb_dtype_name(t);
    group = w.group;
    const int grouped = quant_tc_grouped(&w), wint2 = t == NB_WINT2;
    REQUIRE(quant_tc_check(&w, &e) == 0, "%s [%lld, %lld] group %d refused: %s", name, (long long)N, (long long)K,
            group, e.msg);
    const int64_t NC = (N + 63) / 64, KS = K / 16;
    size_t db = quant_tc_data_bytes(&w), sb = quant_tc_scale_bytes(&w);
    CHECK(db == (size_t)(NC * 64 * K) / (size_t)(t == NB_WINT4 ? 2 : wint2 ? 4 : 1), "%s data bytes %zu", name, db);
    CHECK(sb == (grouped ? 2 * (size_t)(NC * 64 * (K / group))
                 : wint2 ? (size_t)(NC * 64 * (K / group))
                         : quant_scale_bytes(t, N, K, group)),
          "%s scale bytes %zu", name, sb);
    uint8_t *data = xmalloc(db);
    void *scale = quant_tc_new_scale(&w) ? xmalloc(sb) : NULL;
    memset(data, 0x5a, db); /* every byte must be written */
    REQUIRE(quant_tc_repack(&w, data, scale, &e) == 0, "%s repack: %s", name, e.msg);
    check_bytes(&w, data, scale);

    uint8_t *seen = xcalloc((size_t)(NC * 64), (size_t)K);
    int64_t bad = 0, dup = 0;
    for (int64_t c = 0; c < NC; c++)
        for (int64_t s = 0; s < KS; s++)
            for (int lane = 0; lane < 32; lane++)
                for (int j = 0; j < 8; j++)
                    for (int reg = 0; reg < 2; reg++)
                        for (int half = 0; half < 2; half++) {
                            int64_t n = 64 * c + 8 * j + lane / 4, k = 16 * s + 2 * (lane % 4) + 8 * reg + half;
                            float want = n < N ? (float)plain_q(&w, n, k) : 0.0f, got;
                            if (wint2) {
                                /* the weight w / super * 16, exact in BF16 */
                                const uint8_t code = n < N ? ((const uint8_t *)w.scale)[n * (K / 64) + k / 64] : 0;
                                want = (want - (float)(code >> 4) * 0.25f) * (float)((code & 15) + 1);
                                got = frag_w2(data, scale, NC, KS, c, s, lane, j, reg, half);
                            } else {
                                got = (float)frag_q(t, data, KS, c, s, lane, j, reg, half);
                            }
                            if (got != want && bad++ < 5)
                                fprintf(stderr,
                                        "  %s N=%lld K=%lld: n %lld k %lld: lane %d tile %d b%d half %d reads %g, "
                                        "want %g\n",
                                        name, (long long)N, (long long)K, (long long)n, (long long)k, lane, j, reg,
                                        half, got, want);
                            if (seen[n * K + k]++) dup++;
                        }
    CHECK(bad == 0, "%s N=%lld K=%lld group %d: %lld elements misplaced", name, (long long)N, (long long)K, group,
          (long long)bad);
    CHECK(dup == 0, "%s: %lld elements read twice", name, (long long)dup);

    if (grouped) {
        const int64_t G = K / group;
        const float *sc = w.scale;
        int64_t sbad = 0;
        for (int64_t grp = 0; grp < G; grp++)
            for (int64_t c = 0; c < NC; c++)
                for (int lane = 0; lane < 32; lane++)
                    for (int j = 0; j < 8; j++) {
                        int64_t n = 64 * c + 8 * j + lane / 4;
                        float want = n < N ? sc[n * G + grp] : 0.0f;
                        if (frag_scale(scale, NC, grp, c, lane, j) != want) sbad++;
                    }
        CHECK(sbad == 0, "%s N=%lld K=%lld group %d: %lld scales misplaced", name, (long long)N, (long long)K, group,
              (long long)sbad);
    }
    nb_weight packed = w;
    packed.layout = NB_LAYOUT_TC;
    const size_t s2b = quant_scale2_bytes(t, N);
    CHECK(quant_weight_bytes(&packed) == db + sb + s2b, "%s resident bytes %zu, want %zu", name,
          quant_weight_bytes(&packed), db + sb + s2b);
    free(seen), free(data), free(scale);
    free_weight(&w);
}

/* N: 1, below one n-tile, one chunk and a row, two chunks and two rows,
 * and a larger odd count; K from one k-step up. */
static const int64_t NS[] = {1, 7, 65, 130, 257};
static const int64_t KSZ[] = {16, 128, 384, 1024};

static void test_wint8(void) {
    for (int i = 0; i < 5; i++)
        for (int k = 0; k < 4; k++) check_shape(NB_WINT8, NS[i], KSZ[k], 0);
    check_shape(NB_WINT8, 33, 48, 0);
    /* 64 bytes of a row and then some: a partial last tile after whole ones */
    check_shape(NB_WINT8, 65, 80, 0);
    check_shape(NB_WINT8, 130, 112, 0);
}

static void test_wint4_per_channel(void) {
    for (int i = 0; i < 5; i++)
        for (int k = 0; k < 4; k++) check_shape(NB_WINT4, NS[i], KSZ[k], (int)KSZ[k]);
    check_shape(NB_WINT4, 65, 160, 160); /* a fixture's MLP width: per channel, not a power of two */
}

/* WINT2 (group 64: K a multiple of 64): one group, a partial last tile of
 * the repack (K = 320: 80 bytes a row), several chunks. */
static void test_wint2(void) {
    for (int i = 0; i < 5; i++) {
        check_shape(NB_WINT2, NS[i], 64, 0);
        check_shape(NB_WINT2, NS[i], 1024, 0);
    }
    check_shape(NB_WINT2, 65, 320, 0);
    check_shape(NB_WINT2, 130, 192, 0);
}

static void test_wint4_groups(void) {
    for (int i = 0; i < 5; i++) {
        check_shape(NB_WINT4, NS[i], 384, 128);
        check_shape(NB_WINT4, NS[i], 1024, 128);
    }
    /* the other groups the layout takes: powers of two */
    check_shape(NB_WINT4, 65, 192, 64);
    check_shape(NB_WINT4, 33, 256, 16);
    check_shape(NB_WINT4, 7, 256, 32);
    check_shape(NB_WINT4, 130, 768, 256);
    check_shape(NB_WINT4, 9, 1024, 512);
}

/* Weights large enough to be split over threads (8 MiB or more of
 * layout), N not a multiple of 64 and K with a partial last tile (not a
 * multiple of 64 bytes): the bytes against ref_repack. */
static void test_large(void) {
    static const struct {
        nb_dtype t;
        int64_t N, K;
        int group;
    } cases[] = {
        {NB_WINT8, 2049, 4112, 0},
        {NB_WINT4, 4100, 4096, 128},
        {NB_WINT4, 4097, 4112, 4112},
        {NB_WINT4, 4500, 4112, 16},
        {NB_WINT2, 4100, 8256, 64},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        nb_weight w = random_weight(cases[i].t, cases[i].N, cases[i].K, cases[i].group);
        nb_err e = {{0}};
        uint8_t *data = xmalloc(quant_tc_data_bytes(&w));
        void *scale = quant_tc_new_scale(&w) ? xmalloc(quant_tc_scale_bytes(&w)) : NULL;
        CHECK(quant_tc_repack(&w, data, scale, &e) == 0, "%s repack: %s", nb_dtype_name(w.dtype), e.msg);
        check_bytes(&w, data, scale);
        free(data), free(scale);
        free_weight(&w);
    }
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The conversions the kernel does in registers, done here bit for bit on
 * every input, against their meaning. */
static void test_conversions(void) {
    /* WINT4: BF16 0x4300 | u is 128 + u; minus 136 (0x4308) is q, exact */
    for (int u = 0; u < 16; u++) {
        float v = bf16_to_f32((uint16_t)(0x4300 | u));
        CHECK(v == 128.0f + (float)u, "nibble %d reads %g", u, v);
        CHECK(quant_round_bf16(v - bf16_to_f32(0x4308)) == (float)(u - 8), "nibble %d: q %g", u,
              quant_round_bf16(v - bf16_to_f32(0x4308)));
    }
    /* WINT8: (byte ^ 0x80) in the mantissa of 2^23, minus 2^23 + 128, is
     * the int8, and BF16 holds it exactly */
    for (int b = 0; b < 256; b++) {
        uint32_t bits = 0x4B000000u | ((uint32_t)b ^ 0x80u);
        float f;
        memcpy(&f, &bits, 4);
        f -= 8388736.0f;
        CHECK(f == (float)(int8_t)b && quant_round_bf16(f) == f, "byte %02x reads %g", b, f);
    }
    /* WINT2: a 2-bit field at mantissa bits 2i of BF16 128.0 reads 128 +
     * 4^i q; times 4^-i minus 128 * 4^-i is q; and for every code byte,
     * q (ls + 1) - zc/4 (ls + 1) is (q - zc/4) (ls + 1): the multiplier,
     * the addend and the result are all BF16 values, so one fused
     * multiply-add and one rounding give it exactly */
    for (int i = 0; i < 3; i++)
        for (int q = 0; q < 4; q++) {
            float v = bf16_to_f32((uint16_t)(0x4300 | q << 2 * i)), inv = 1.0f / (float)(1 << 2 * i);
            CHECK(v == 128.0f + (float)(q << 2 * i), "field %d q %d reads %g", i, q, v);
            CHECK(quant_round_bf16(fmaf(v, inv, -128.0f * inv)) == (float)q, "field %d q %d", i, q);
        }
    /* cuda_wint.cu's GEMV (quant.h's layout): the same exponent magic in
     * FP32 gives each q as the integer conversion would, and WINT2's q at
     * mantissa bits 2-3 of 2^21 minus 2^21 + zc/4 is q - zc/4, so times
     * the group step it is quant_wint2_value bit for bit */
    for (int b = 0; b < 256; b++)
        CHECK(bits_f32(0x4B000000u | ((uint32_t)b ^ 0x80u)) - 8388736.0f == (float)(int8_t)b, "i8 %02x", b);
    for (int u = 0; u < 16; u++) CHECK(bits_f32(0x4B000000u | (uint32_t)u) - 8388616.0f == (float)(u - 8), "u4 %d", u);
    for (int code = 0; code < 256; code++)
        for (int q = 0; q < 4; q++) {
            const float base = 2097152.0f + (float)(code >> 4) * 0.25f;
            const float d = bits_f32(0x4A000000u | (uint32_t)q << 2) - base;
            const float super = quant_round_bf16(0.0137f * (float)(1 + code % 7));
            CHECK(d == (float)q - (float)(code >> 4) * 0.25f, "w2 code %02x q %d: %g", code, q, d);
            CHECK(d * quant_wint2_step((uint8_t)code, super) == quant_wint2_value(q, (uint8_t)code, super),
                  "w2 code %02x q %d: the weight", code, q);
        }
    for (int code = 0; code < 256; code++) {
        const float a = (float)((code & 15) + 1), c = -(float)(code >> 4) * 0.25f * a;
        CHECK(quant_round_bf16(a) == a && quant_round_bf16(c) == c, "code %02x: constants", code);
        for (int q = 0; q < 4; q++) {
            const float want = ((float)q - (float)(code >> 4) * 0.25f) * a;
            CHECK(quant_round_bf16(fmaf((float)q, a, c)) == want && quant_round_bf16(want) == want,
                  "code %02x q %d: %g", code, q, fmaf((float)q, a, c));
        }
    }
}

static void test_refusals(void) {
    nb_err e;
    nb_weight w = (nb_weight){.dtype = NB_FP8_B128, .rows = 8, .cols = 128};
    CHECK(quant_tc_check(&w, &e) != 0, "fp8 accepted");
    w = (nb_weight){.dtype = NB_BF16, .rows = 8, .cols = 128};
    CHECK(quant_tc_check(&w, &e) != 0, "bf16 accepted");
    w = (nb_weight){.dtype = NB_WINT8, .rows = 8, .cols = 24};
    CHECK(quant_tc_check(&w, &e) != 0, "K = 24 accepted");
    w = (nb_weight){.dtype = NB_WINT4, .rows = 8, .cols = 200, .group = 200};
    CHECK(quant_tc_check(&w, &e) != 0, "K = 200 accepted");
    w = (nb_weight){.dtype = NB_WINT4, .rows = 8, .cols = 96, .group = 48};
    CHECK(quant_tc_check(&w, &e) != 0, "group 48 accepted");
    w = (nb_weight){.dtype = NB_WINT4, .rows = 8, .cols = 192, .group = 96};
    CHECK(quant_tc_check(&w, &e) != 0, "group 96 accepted");
    w = (nb_weight){.dtype = NB_WINT4, .rows = 8, .cols = 576, .group = 192};
    CHECK(quant_tc_check(&w, &e) != 0, "group 192 accepted");
    w = (nb_weight){.dtype = NB_WINT4, .rows = 8, .cols = 256, .group = 128, .layout = NB_LAYOUT_TC};
    CHECK(quant_tc_check(&w, &e) != 0, "an already repacked weight accepted");
    /* a group scale BF16 cannot hold */
    w = random_weight(NB_WINT4, 9, 256, 128);
    ((float *)w.scale)[5] = 0.1f;
    uint8_t *data = xmalloc(quant_tc_data_bytes(&w));
    uint16_t *scale = xmalloc(quant_tc_scale_bytes(&w));
    CHECK(quant_tc_repack(&w, data, scale, &e) != 0, "a non-BF16 scale accepted");
    free(data), free(scale);
    free_weight(&w);
}

int main(void) {
    RUN(test_conversions);
    RUN(test_wint8);
    RUN(test_wint4_per_channel);
    RUN(test_wint4_groups);
    RUN(test_wint2);
    RUN(test_large);
    RUN(test_refusals);
    TEST_DONE("test_quant_tc");
}
