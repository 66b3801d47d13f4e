/* The tensor-core layout of WINT8 / WINT4 / WINT2 weights (quant/quant_tc.h):
 * checks, sizes and the reordering from quant/quant.h's layout. */
#include "quant/quant_tc.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/parallel.h"
#include "common/util.h"
#include "quant/quant.h"

static int64_t chunks(const nb_weight *w) { return (w->rows + QUANT_TC_CHUNK - 1) / QUANT_TC_CHUNK; }

int quant_tc_check(const nb_weight *w, nb_err *e) {
    if (w->dtype != NB_WINT8 && w->dtype != NB_WINT4 && w->dtype != NB_WINT2)
        return nb_errf(e, "%s weights have no tensor-core layout", nb_dtype_name(w->dtype));
    if (quant_check(w->dtype, w->rows, w->cols, w->group, e)) return -1;
    if (w->layout != NB_LAYOUT_PLAIN) return nb_errf(e, "the weight is not in quant/quant.h's layout");
    /* the kernel indexes rows, columns and chunk * k-steps * 512 bytes
     * with ints and size_t; keep every row and column index an int */
    if (w->rows > INT32_MAX || w->cols > INT32_MAX)
        return nb_errf(e, "[%lld, %lld] is too large", (long long)w->rows, (long long)w->cols);
    if (w->cols % QUANT_TC_KSTEP)
        return nb_errf(e, "%lld input columns are not a multiple of %d", (long long)w->cols, QUANT_TC_KSTEP);
    if (w->dtype == NB_WINT4 && w->group != w->cols && (w->group & (w->group - 1)))
        return nb_errf(e, "wint4 group %d is not a power of two", w->group);
    return 0;
}

int quant_tc_grouped(const nb_weight *w) { return w->dtype == NB_WINT4 && w->group != w->cols; }

int quant_tc_new_scale(const nb_weight *w) { return quant_tc_grouped(w) || w->dtype == NB_WINT2; }

size_t quant_tc_data_bytes(const nb_weight *w) {
    return quant_data_bytes(w->dtype, chunks(w) * QUANT_TC_CHUNK, w->cols);
}

size_t quant_tc_scale_bytes(const nb_weight *w) {
    if (w->dtype == NB_WINT2) return (size_t)(w->cols / QUANT_WINT2_GROUP) * (size_t)(chunks(w) * QUANT_TC_CHUNK);
    if (!quant_tc_grouped(w)) return quant_scale_bytes(w->dtype, w->rows, w->cols, w->group);
    return sizeof(uint16_t) * (size_t)(w->cols / w->group) * (size_t)(chunks(w) * QUANT_TC_CHUNK);
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "quant_tc.c writes the layout's little-endian words with host stores"
#endif

/* ---- the reordering ----
 *
 * A chunk is made a tile at a time: its 64 rows, 64 bytes of each (8 WINT4
 * k-steps, 4 WINT8 ones), copied next to each other. A row of a large
 * weight is thousands of bytes long, often a multiple of 2 KiB, so a
 * chunk's 64 rows read in place fall in a few L1 sets and evict each other
 * between k-steps; copied a cache line at a time, every source line is
 * read once, and the tile's step blocks (4 KiB, written in order) are made
 * from L1. Rows past N are padded in the tile, so the reordering itself
 * has no bounds checks. */

#define TILE_BYTES 64
#define TILE_WORDS (TILE_BYTES / 8)

typedef uint64_t tile_t[QUANT_TC_CHUNK][TILE_WORDS];

/* A WINT4 row's 8 bytes x of one k-step (byte t: kk = 2t low nibble, 2t+1
 * high; byte 4+t: kk = 2t+8, 2t+9), rearranged as they pair up in the
 * words of quant_tc.h: with y_t = lo(x_t) | lo(x_4+t) << 4 (the register
 * pair's low halves) and y_4+t = hi(x_t) | hi(x_4+t) << 4 (high halves),
 * the result is bytes y0 y4 y1 y5 y2 y6 y3 y7, so lane t's word from rows
 * a (n-tile 2w) and b (2w+1) is bytes 2t, 2t+1 of both, interleaved:
 * a[2t] b[2t] a[2t+1] b[2t+1] (nibbles 0-1, 2-3, 4-5, 6-7). Three swaps
 * of bit fields (x ^= d ^ d << shift), plain 64-bit arithmetic that
 * compilers vectorize over a tile row; the padding byte 0x88 is unchanged. */
static uint64_t wint4_prep(uint64_t x) {
    uint64_t d = ((x >> 28) ^ x) & 0x00000000F0F0F0F0ull; /* hi(x_t) <-> lo(x_4+t): bytes y0..y7 */
    x ^= d ^ d << 28;
    d = ((x >> 16) ^ x) & 0x00000000FFFF0000ull; /* y2 y3 <-> y4 y5: y0 y1 y4 y5 y2 y3 y6 y7 */
    x ^= d ^ d << 16;
    d = ((x >> 8) ^ x) & 0x0000FF000000FF00ull; /* y1 <-> y4, y3 <-> y6 */
    return x ^ d ^ d << 8;
}

#if defined(__SSE2__)
/* x86-64 always has SSE2: a step block's 64 bytes for one gi are built in
 * four registers (unpacks, then a 4 x 4 transpose of 32-bit words) rather
 * than byte by byte as in the portable code below, which places the same
 * bytes. test_quant_tc compares whichever is built with a plain
 * element-by-element repack. */
#include <emmintrin.h>

/* Non-temporal stores when the output is 16-byte aligned (it always is
 * from malloc): the layout is written once and not read back soon, so
 * this saves reading each output line into the cache first. */
static inline void store16(uint8_t *p, __m128i v, int nt) {
    if (nt) _mm_stream_si128((__m128i *)p, v);
    else _mm_storeu_si128((__m128i *)p, v);
}

/* Rows a, b, c, d = 4 words each -> out + 16 t = word t of a, b, c, d. */
static inline void store_transposed(uint8_t *out, __m128i a, __m128i b, __m128i c, __m128i d, int nt) {
    __m128i ab0 = _mm_unpacklo_epi32(a, b), cd0 = _mm_unpacklo_epi32(c, d);
    __m128i ab1 = _mm_unpackhi_epi32(a, b), cd1 = _mm_unpackhi_epi32(c, d);
    store16(out, _mm_unpacklo_epi64(ab0, cd0), nt);
    store16(out + 16, _mm_unpackhi_epi64(ab0, cd0), nt);
    store16(out + 32, _mm_unpacklo_epi64(ab1, cd1), nt);
    store16(out + 48, _mm_unpackhi_epi64(ab1, cd1), nt);
}

/* Word w of lanes (gi, 0..3) from prepared rows a and b: their bytes
 * interleaved, so word t is a[2t] b[2t] a[2t+1] b[2t+1]. */
static inline __m128i wint4_word(const uint64_t *a, const uint64_t *b) {
    return _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)a), _mm_loadl_epi64((const __m128i *)b));
}

/* One WINT4 step block (512 bytes at d) from k-step s of a prepared tile:
 * lanes (gi, 0..3) are the 64 bytes at d + 64 gi, word w from rows
 * 16 w + gi and 16 w + 8 + gi. */
static void step_wint4(uint8_t *d, const tile_t tile, int s, int nt) {
    for (int gi = 0; gi < 8; gi++)
        store_transposed(d + 64 * gi, wint4_word(&tile[gi][s], &tile[gi + 8][s]),
                         wint4_word(&tile[gi + 16][s], &tile[gi + 24][s]),
                         wint4_word(&tile[gi + 32][s], &tile[gi + 40][s]),
                         wint4_word(&tile[gi + 48][s], &tile[gi + 56][s]), nt);
}

/* Row x's 16 bytes of a WINT8 k-step -> word t = its 16-bit pairs t
 * (kk = 2t, 2t+1: b0) and 4 + t (kk = 2t+8, 2t+9: b1). */
static inline __m128i wint8_word(const uint64_t *x) {
    __m128i v = _mm_loadu_si128((const __m128i *)x);
    return _mm_unpacklo_epi16(v, _mm_unpackhi_epi64(v, v));
}

/* The two WINT8 sub-blocks (1024 bytes at d) of k-step s of a tile:
 * sub-block h, lanes (gi, 0..3) at d + 512 h + 64 gi, word w from row
 * 8 (4 h + w) + gi. */
static void step_wint8(uint8_t *d, const tile_t tile, int s, int nt) {
    for (int h = 0; h < 2; h++)
        for (int gi = 0; gi < 8; gi++) {
            const int r = 32 * h + gi;
            store_transposed(d + QUANT_TC_STEP * h + 64 * gi, wint8_word(&tile[r][2 * s]),
                             wint8_word(&tile[r + 8][2 * s]), wint8_word(&tile[r + 16][2 * s]),
                             wint8_word(&tile[r + 24][2 * s]), nt);
        }
}

#else

/* One WINT4 step block from k-step s of a prepared tile: lane (gi, t)'s
 * word w at d + 16 (4 gi + t) + 4 w, from rows a = 16 w + gi (n-tile 2w)
 * and b = 16 w + 8 + gi (2w+1), as wint4_prep says. */
static void step_wint4(uint8_t *d, const tile_t tile, int s, int nt) {
    for (int gi = 0; gi < 8; gi++)
        for (int w = 0; w < 4; w++) {
            const uint8_t *a = (const uint8_t *)&tile[16 * w + gi][s], *b = (const uint8_t *)&tile[16 * w + 8 + gi][s];
            for (int t = 0; t < 4; t++) {
                uint32_t v = a[2 * t] | b[2 * t] << 8 | a[2 * t + 1] << 16 | (uint32_t)b[2 * t + 1] << 24;
                memcpy(d + 16 * (4 * gi + t) + 4 * w, &v, 4);
            }
        }
}

/* The two WINT8 sub-blocks of k-step s: row nn = 8 j + gi's 16 bytes go to
 * lanes (gi, t) of sub-block j / 4, word j % 4, as kk = 2t, 2t+1 (b0) then
 * 2t+8, 2t+9 (b1). */
static void step_wint8(uint8_t *d, const tile_t tile, int s, int nt) {
    for (int nn = 0; nn < QUANT_TC_CHUNK; nn++) {
        const int j = nn / 8, gi = nn % 8;
        const uint8_t *row = (const uint8_t *)&tile[nn][2 * s];
        for (int t = 0; t < 4; t++) {
            uint32_t v = row[2 * t] | row[2 * t + 1] << 8 | row[2 * t + 8] << 16 | (uint32_t)row[2 * t + 9] << 24;
            memcpy(d + QUANT_TC_STEP * (j / 4) + 16 * (4 * gi + t) + 4 * (j % 4), &v, 4);
        }
    }
}

#endif

/* One WINT2 step block (256 bytes at d) from k-step s of a tile, whose
 * rows hold 4 bytes a k-step (kk at bits 2 kk of the little-endian word):
 * lane (gi, t)'s word w at d + 8 (4 gi + t) + 4 w takes, for pair P of
 * n-tile 4w + P / 2 (row 8 (4w + P / 2) + gi), register r = P % 2, the q
 * of kk = 2t + 8r into bits 2P and of kk + 1 into bits 16 + 2P. */
static void step_wint2(uint8_t *d, const tile_t tile, int s) {
    for (int gi = 0; gi < 8; gi++)
        for (int t = 0; t < 4; t++)
            for (int w = 0; w < 2; w++) {
                uint32_t v = 0;
                for (int P = 0; P < 8; P++) {
                    uint32_t x;
                    memcpy(&x, (const uint8_t *)tile[8 * (4 * w + P / 2) + gi] + 4 * s, 4);
                    const int kk = 2 * t + 8 * (P % 2);
                    v |= (x >> 2 * kk & 3u) << 2 * P | (x >> (2 * kk + 2) & 3u) << (16 + 2 * P);
                }
                memcpy(d + 8 * (4 * gi + t) + 4 * w, &v, 4);
            }
}

/* The KS step blocks (`step` bytes each) of chunk c at dst, from the plain
 * rows at src, prefetching chunk `next` (none if it is NC), through the
 * caller's tile. nt: see store16. */
static void chunk_data(nb_dtype t, uint8_t *dst, const uint8_t *src, int64_t N, int64_t KS, int64_t c, int64_t next,
                       int nt, uint64_t (*tile)[TILE_WORDS]) {
    const int wint4 = t == NB_WINT4, spb = t == NB_WINT2 ? 4 : wint4 ? 8 : 16; /* a row's bytes per k-step */
    const size_t step = t == NB_WINT2 ? QUANT_TC_STEP / 2 : wint4 ? QUANT_TC_STEP : 2 * QUANT_TC_STEP;
    const int64_t rowb = spb * KS, n0 = QUANT_TC_CHUNK * c, rows = N - n0 < QUANT_TC_CHUNK ? N - n0 : QUANT_TC_CHUNK;
    /* past N: q = 0 (0x88 is its own wint4_prep; WINT2's q = 0 is bits 0) */
    memset(tile[rows], wint4 ? 0x88 : 0, (size_t)(QUANT_TC_CHUNK - rows) * TILE_BYTES);
    uint8_t *d = dst + (size_t)(c * KS) * step;
    /* Read a tile at a time, a chunk's rows are 64 streams thousands of
     * bytes apart, more than the hardware prefetcher follows; so the rows
     * of the next chunk (one block of at most as many bytes) are prefetched
     * in address order, a line for every line read. */
    const int64_t m0 = QUANT_TC_CHUNK * next, m1 = m0 + QUANT_TC_CHUNK < N ? m0 + QUANT_TC_CHUNK : N;
    int64_t pf = m0 * rowb; /* an offset in src, below m1 * rowb */
    for (int64_t col = 0; col < rowb; col += TILE_BYTES) {
        const int64_t bytes = rowb - col < TILE_BYTES ? rowb - col : TILE_BYTES;
        const int words = (int)bytes / 8; /* fewer in the rows' last k-steps */
        const uint8_t *p = src + n0 * rowb + col;
        for (int64_t nn = 0; nn < rows; nn++, p += rowb, pf += TILE_BYTES) {
            if (pf < m1 * rowb) __builtin_prefetch(src + pf);
            if (words == TILE_WORDS) memcpy(tile[nn], p, TILE_BYTES);
            else memcpy(tile[nn], p, (size_t)bytes);
            if (wint4)
                for (int i = 0; i < TILE_WORDS; i++)
                    if (i < words) tile[nn][i] = wint4_prep(tile[nn][i]);
        }
        for (int s = 0; s < words * 8 / spb; s++, d += step) {
            if (t == NB_WINT2) step_wint2(d, (const uint64_t(*)[TILE_WORDS])tile, s);
            else if (wint4) step_wint4(d, (const uint64_t(*)[TILE_WORDS])tile, s, nt);
            else step_wint8(d, (const uint64_t(*)[TILE_WORDS])tile, s, nt);
        }
    }
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* The grouped WINT4 scales of chunk c: for group g the 64 BF16 at
 * ((g * NC + c) * 8 + gi) * 8 + j, row 64 c + 8 j + gi. The chunk's 64
 * rows of G floats are read in order into `tile` (G runs of 64, within L1
 * for the usual G) and copied out run by run: in place, the runs of a
 * large weight are a multiple of 4 KiB apart and would evict each other.
 * Scales are BF16 values (checked), so their BF16 is their high half. */
static void chunk_scale(uint16_t *out, const float *sc, int64_t N, int64_t G, int64_t NC, int64_t c, uint16_t *tile) {
    for (int nn = 0; nn < QUANT_TC_CHUNK; nn++) {
        const int64_t n = QUANT_TC_CHUNK * c + nn;
        const float *r = sc + n * G;
        uint16_t *o = tile + 8 * (nn % 8) + nn / 8;
        for (int64_t g = 0; g < G; g++) o[g * QUANT_TC_CHUNK] = n < N ? (uint16_t)(f32_bits(r[g]) >> 16) : 0;
    }
    for (int64_t g = 0; g < G; g++)
        memcpy(out + (g * NC + c) * QUANT_TC_CHUNK, tile + g * QUANT_TC_CHUNK, sizeof(uint16_t) * QUANT_TC_CHUNK);
}

/* WINT2's code bytes of chunk c: for group g the 64 at ((g * NC + c) * 8 +
 * gi) * 8 + j, row 64 c + 8 j + gi, 0 past N. A chunk has a row of G bytes
 * for each of its rows (G = K / 64, small): read in place. */
static void chunk_codes(uint8_t *out, const uint8_t *codes, int64_t N, int64_t G, int64_t NC, int64_t c) {
    for (int64_t g = 0; g < G; g++)
        for (int nn = 0; nn < QUANT_TC_CHUNK; nn++) {
            const int64_t n = QUANT_TC_CHUNK * c + nn;
            out[(g * NC + c) * QUANT_TC_CHUNK + 8 * (nn % 8) + nn / 8] = n < N ? codes[n * G + g] : 0;
        }
}

/* A repack shared by threads, which take chunks one at a time: a busy
 * core then delays one chunk, not a fixed share of them. */
typedef struct tc_work {
    const nb_weight *src;
    uint8_t *data;
    void *scale; /* NULL unless quant_tc_new_scale */
    int nt;
    atomic_llong next; /* the first chunk no thread has taken */
} tc_work;

static void *tc_run(void *arg) {
    tc_work *wk = arg;
    const nb_weight *w = wk->src;
    const int64_t NC = chunks(w), G = wk->scale ? w->cols / w->group : 0;
    const int wint2 = w->dtype == NB_WINT2;
    uint16_t *stile = G && !wint2 ? xmalloc(sizeof(uint16_t) * QUANT_TC_CHUNK * (size_t)G) : NULL;
    /* the tile: 64-byte aligned (a row a cache line), on the heap (as an
     * array on the stack, some placements of it measured up to twice as
     * slow, for a reason not found) */
    uint8_t *tbuf = xmalloc(sizeof(tile_t) + 64);
    uint64_t(*tile)[TILE_WORDS] = (uint64_t(*)[TILE_WORDS])(tbuf + (64 - (uintptr_t)tbuf % 64) % 64);
    /* the chunk after this one is taken first, so that it can be prefetched */
    int64_t c = atomic_fetch_add(&wk->next, 1);
    while (c < NC) {
        int64_t next = atomic_fetch_add(&wk->next, 1);
        if (next > NC) next = NC;
        if (stile) chunk_scale(wk->scale, w->scale, w->rows, G, NC, c, stile);
        if (wint2) chunk_codes(wk->scale, w->scale, w->rows, G, NC, c);
        chunk_data(w->dtype, wk->data, w->data, w->rows, w->cols / QUANT_TC_KSTEP, c, next, wk->nt, tile);
        c = next;
    }
    free(stile);
    free(tbuf);
#if defined(__SSE2__)
    if (wk->nt) _mm_sfence(); /* the streamed stores, visible before the join */
#endif
    return NULL;
}

/* Threads for a repack: one per core, at most QUANT_TC_THREADS, each with
 * at least QUANT_TC_THREAD_BYTES of layout (a thread costs tens of
 * microseconds to start, a few MiB of repacking about a millisecond). */
#define QUANT_TC_THREADS 8
#define QUANT_TC_THREAD_BYTES (4u << 20)

/* Nonzero unless f is a value BF16 holds exactly, i.e. quant_round_bf16(f)
 * == f: its low 16 bits are zero and it is not a NaN (a NaN rounds to a
 * NaN, never equal; (0x7F800000 - magnitude) >> 31 is 1 for NaNs alone).
 * Branch-free, so a row's loop over it vectorizes. */
static uint32_t not_bf16(float f) {
    uint32_t u = f32_bits(f);
    return (u & 0xFFFFu) | (0x7F800000u - (u & 0x7FFFFFFFu)) >> 31;
}

int quant_tc_repack(const nb_weight *src, void *data, void *scale, nb_err *e) {
    if (quant_tc_check(src, e)) return -1;
    const int64_t N = src->rows, K = src->cols;
    const int grouped = quant_tc_grouped(src);
    if (grouped) {
        /* checked first: a refusal leaves data and scale untouched */
        const int64_t G = K / src->group;
        const float *sc = src->scale;
        for (int64_t n = 0; n < N; n++) {
            const float *r = sc + n * G;
            uint32_t bad = 0;
            for (int64_t g = 0; g < G; g++) bad |= not_bf16(r[g]);
            for (int64_t g = 0; bad && g < G; g++)
                if (not_bf16(r[g]))
                    return nb_errf(e, "wint4 scale %g (row %lld) is not a BF16 value", (double)r[g], (long long)n);
        }
    }
    tc_work wk = {.src = src, .data = data, .scale = quant_tc_new_scale(src) ? scale : NULL};
#if defined(__SSE2__)
    wk.nt = (uintptr_t)data % 16 == 0;
#endif
    atomic_init(&wk.next, 0);
    const int64_t NC = chunks(src);
    par_run(par_threads(NC, (double)quant_tc_data_bytes(src) / (double)NC, QUANT_TC_THREAD_BYTES, QUANT_TC_THREADS),
            tc_run, &wk);
    return 0;
}
