// Weight-only matmul on tensor cores for NB_WINT8, NB_WINT4 and NB_WINT2
// weights in the tensor-core layout of quant/quant_tc.h, which the
// backend's weight_pack gives them at load: out[M,N] = x[M,K] @
// dequant(w)^T, FP32 activations in, FP32 out, every M from 1 up. (Shapes
// the layout does not take, and a mixture's experts, stay on cuda_wint.cu's
// kernels.)
//
// A block has 8 warps and computes BM rows x 128 columns (two 64-column
// chunks of the layout) over a range of pipeline stages of BK columns of K.
// Per stage, cp.async brings the weights' step blocks (and, for grouped
// WINT4, the stage's BF16 scales; for WINT2, its group's code bytes) into
// shared memory, STAGES - 1 stages
// ahead; the activations of the same stage are loaded as FP32 into
// registers one iteration ahead of the shared-memory stage they are stored
// to (rounded to BF16), so the product needs no conversion kernel of its
// own. Each lane then reads its 16 bytes of a step block (two for WINT8),
// which hold its B fragments for all 8 n-tiles of its chunk, turns them
// into BF16 pairs in registers and issues mma.sync.m16n8k16 (BF16 x BF16
// -> FP32) for its m-tiles. Warps split a block three ways: WM along M (MT
// m-tiles each), 2 along N (one chunk each) and WK along K (each warp takes
// its own k-steps of every stage; their sums meet in shared memory at the
// end, in warp order). Three shapes, by M (named thresholds below):
//   small  M <= 16: BM 16,  MT 1, 1 x 2 x 4 warps, BK 64, 4 stages (WINT8)
//     or BK 128, two k-steps a warp (TC_SMALL2: WINT4, 3 stages; WINT2, 4)
//   medium M <= 64: BM 64,  MT 2, 2 x 2 x 2 warps, BK 32, 4 stages
//   large  M > 64:  BM 128, MT 2, 4 x 2 x 1 warps, BK 32, 3 stages
// Small M is a stream of weight bytes: there are too few output tiles for
// the SMs, so K is also split over up to TC_SPLIT_WAVES blocks per SM
// (grid z, at least TC_MIN_SPLIT_STAGES stages each). Each split writes its
// partial sums to scratch; the last block of a tile to finish (a counter
// per tile) adds them in split order, so results do not depend on timing
// and a replayed graph equals an eager run bit for bit. The counters are
// back at zero after every launch. The thresholds and shapes are reasoned
// from H100 rates (HBM ~14 bytes per SM clock, mma.sync ~1 m16n8k16 per SM
// clock and a half) and have not been tuned on a device.
//
// Numerics: activations are rounded to BF16 (nearest even); products are
// summed in FP32 by the mma.
//  - WINT8 and per-channel WINT4: the B fragments are the integers q
//    themselves (exact in BF16); the row's FP32 scale multiplies the
//    finished FP32 sum once. WINT8 bytes become q through FP32: byte ^ 0x80
//    OR-ed into the mantissa of 2^23, minus 2^23 + 128; two such floats make
//    one BF16 pair exactly. WINT4 nibbles OR-ed into the mantissa of BF16
//    128.0 read 128 + u; one BF16 subtraction of 136 per pair gives q.
//  - grouped WINT4: as above, then one BF16 multiply by the group's scale
//    (a BF16 value): w = bf16(q * scale), rounded once, as cuda_wint.cu's
//    tensor-core path rounds its dequantized tile.
//  - WINT2: the B fragments are (q - zc/4) * (ls + 1), made exactly in BF16
//    by two multiply-adds (tc_wint2_word); the FP32 sum is multiplied by
//    the row's super scale / 16, so each weight is quant.h's
//    (q - zc/4) * super * (ls + 1) / 16 to FP32 rounding. A register
//    pair costs a mask-and-OR and two BF16 FMAs (WINT4: one subtraction)
//    and a byte of WINT2 holds two pairs, so with the code lookups and the
//    pipeline a warp spends ~245 SASS instructions per 512 bytes of
//    weights against the ~160 issue slots that HBM's rate leaves it (H100:
//    ~3 TB/s over 132 SMs x 4 schedulers at ~1.75 GHz): WINT2 at small M is
//    bound by issue, WINT4 (~96 per channel, ~129 grouped) and WINT8
//    (~109) by memory (scripts/sass_loops.py; docs/BENCHMARKS.md, "SASS
//    counts").
// The repack (quant_tc_repack) runs on the host and is tested on the CPU
// against a mirror of the addressing below (tests/test_quant_tc.c).
#include <string.h>

#include "kernels/cuda/cuda_int.h"
#include "kernels/cuda/cuda_ptx.h"

extern "C" {
#include "quant/quant.h"
#include "quant/quant_tc.h"
}

#define TC_THREADS 256
#define TC_WN 2 // warps along N, one 64-column chunk each
#define TC_BN (TC_WN * QUANT_TC_CHUNK)
// M thresholds between the three block shapes
#define TC_SMALL_MAX_M 16
#define TC_MEDIUM_MAX_M 64
// matmul_silu fuses up to this many rows: the threads of the rows below M
// make silu(gate) * up, ~29 SASS instructions a value (expf and an IEEE
// division, as silu_mul), ~116 a stage for a warp that loads a row. Up to
// 4 rows that is half the warps of a block at most, about a tenth more
// issue in all, which the small shape's margin under HBM's rate takes
// (docs/BENCHMARKS.md, "SASS counts"); at 8 every warp pays it and the
// product could become bound by issue, to save one small kernel.
#define TC_SILU_MAX_M 4
// split-K: aim for this many blocks per SM, each with at least this many
// stages (fewer would be mostly pipeline fill)
#define TC_SPLIT_WAVES 2
#define TC_MIN_SPLIT_STAGES 4

enum { TC_SMALL, TC_MEDIUM, TC_LARGE, TC_SMALL2 };

// The block shapes of the header comment, by config C. TC_SMALL2 is the
// small shape with two k-steps a warp per stage (BK 128): the work of a
// stage that is the same whatever its size (the barrier, the copies'
// addresses, the loop) is spread over twice the weight bytes of
// TC_SMALL's, and WINT2's warps look their rows' code constants up once
// for both k-steps (they lie in one group). WINT8's stages would be too
// large for it.
__host__ __device__ constexpr bool tc_small(int C) { return C == TC_SMALL || C == TC_SMALL2; }
__host__ __device__ constexpr int tc_mt(int C) { return tc_small(C) ? 1 : 2; } // m-tiles per warp
__host__ __device__ constexpr int tc_wm(int C) { return tc_small(C) ? 1 : C == TC_MEDIUM ? 2 : 4; }
__host__ __device__ constexpr int tc_wk(int C) { return tc_small(C) ? 4 : C == TC_MEDIUM ? 2 : 1; }
__host__ __device__ constexpr int tc_ksw(int C) { return C == TC_LARGE || C == TC_SMALL2 ? 2 : 1; } // k-steps per warp per stage
// Pipeline stages: 3 for the large shape and for WINT4's TC_SMALL2 (four
// of its 12.5 KB stages would pass the 48 KB of static shared memory).
template <nb_dtype T> __host__ __device__ constexpr int tc_stages(int C) {
    return C == TC_LARGE || (C == TC_SMALL2 && T == NB_WINT4) ? 3 : 4;
}
__host__ __device__ constexpr int tc_bm(int C) { return 16 * tc_mt(C) * tc_wm(C); }
__host__ __device__ constexpr int tc_kps(int C) { return tc_ksw(C) * tc_wk(C); } // k-steps per stage
__host__ __device__ constexpr int tc_bk(int C) { return QUANT_TC_KSTEP * tc_kps(C); }
// Row stride of the BF16 activation tile, in elements: BK + 8 keeps rows
// 16-byte aligned and puts the 8 rows of one fragment load in different
// banks (row strides of 36 or 20 words).
__host__ __device__ constexpr int tc_lda(int C) { return tc_bk(C) + 8; }
// float4s of activations each thread loads per stage (1, 2, 4)
__host__ __device__ constexpr int tc_af4(int C) { return tc_bm(C) * tc_bk(C) / 4 / TC_THREADS; }

// Bytes of a k-step's step block(s): WINT8 has two (32 columns each per
// lane load), WINT2's is half a block (8 bytes a lane).
template <nb_dtype T> __host__ __device__ constexpr int tc_step_bytes() {
    return T == NB_WINT8 ? 2 * QUANT_TC_STEP : T == NB_WINT2 ? QUANT_TC_STEP / 2 : QUANT_TC_STEP;
}
// One stage in shared memory: step blocks [chunk][k-step], then the
// grouped scales [group row][chunk][8 lanes' 16 bytes] (WINT2: the codes
// of the stage's group, [chunk][8 lanes' 8 bytes]), then the BF16
// activations [BM][lda].
template <nb_dtype T, int C> __host__ __device__ constexpr int tc_b_bytes() {
    return TC_WN * tc_kps(C) * tc_step_bytes<T>();
}
// WINT2: the groups a stage holds codes for (a stage of 64 or fewer
// columns lies in one).
__host__ __device__ constexpr int tc_w2_groups(int C) {
    return tc_bk(C) > QUANT_WINT2_GROUP ? tc_bk(C) / QUANT_WINT2_GROUP : 1;
}
template <nb_dtype T, bool GRP, int C> __host__ __device__ constexpr int tc_s_bytes() {
    return T == NB_WINT2 ? tc_w2_groups(C) * TC_WN * 64 : GRP ? tc_kps(C) * TC_WN * 128 : 0;
}
template <nb_dtype T, bool GRP, int C> __host__ __device__ constexpr int tc_stage_bytes() {
    return tc_b_bytes<T, C>() + tc_s_bytes<T, GRP, C>() + tc_bm(C) * tc_lda(C) * 2;
}
// A WINT2 stage holds whole groups or lies in one, and a warp's k-steps of
// a stage lie in one group.
__host__ __device__ constexpr bool tc_w2_fits(int C) {
    return (tc_bk(C) % QUANT_WINT2_GROUP == 0 || QUANT_WINT2_GROUP % tc_bk(C) == 0) &&
           QUANT_WINT2_GROUP % (tc_ksw(C) * QUANT_TC_KSTEP) == 0;
}
static_assert(tc_w2_fits(TC_SMALL2) && tc_w2_fits(TC_MEDIUM) && tc_w2_fits(TC_LARGE), "WINT2 stages and groups");
// What multiplies a finished sum besides the row's scale: WINT2's weights
// are made without the 1/16 of its group step.
template <nb_dtype T> __host__ __device__ constexpr float tc_out_mul() { return T == NB_WINT2 ? 0.0625f : 1.0f; }
// After the loop the same memory holds the K-split warps' sums.
template <int C> __host__ __device__ constexpr int tc_red_bytes() {
    return (tc_wk(C) - 1) * tc_wm(C) * TC_WN * 32 * tc_mt(C) * 32 * 4;
}
template <nb_dtype T, bool GRP, int C> __host__ __device__ constexpr int tc_smem_bytes() {
    return tc_stages<T>(C) * tc_stage_bytes<T, GRP, C>() > tc_red_bytes<C>() ? tc_stages<T>(C) * tc_stage_bytes<T, GRP, C>()
                                                                            : tc_red_bytes<C>();
}

// Split-K scratch of this file (cuda_backend.wint_tc).
struct cuda_wint_tc_state {
    void *part; // [S][M][N] FP32 partial sums, grown with cuda_scratch
    size_t part_cap;
    int *cnt; // one arrival counter per output tile, zero between launches
    int n_cnt;
};

void cuda_wint_tc_free(cuda_backend *c) {
    if (!c->wint_tc) return;
    if (c->wint_tc->part) cudaFree(c->wint_tc->part);
    if (c->wint_tc->cnt) cudaFree(c->wint_tc->cnt);
    free(c->wint_tc);
    c->wint_tc = NULL;
}

// One launch's arguments, by value.
struct tc_args {
    const float *x;        // [M][K]
    float *out;            // [M][N]
    float *part;           // [S][M][N] when S > 1
    int *cnt;              // [tiles] when S > 1
    const uint8_t *data;   // step blocks (quant_tc.h)
    const uint8_t *gscale; // grouped WINT4: BF16 scales in the layout; WINT2: its codes
    const float *cscale;   // otherwise: float [N], applied to finished sums (WINT2: super)
    int M, N, K, gsh; // gsh: grouped WINT4's log2(group) (a power of two)
    int KS, NC, G;   // k-steps, chunks, groups
    int nst, sps, S; // stages of K, stages per split, splits
    int xal;         // x (and up) 16-byte aligned, rows too: float4 loads
    int ldx;         // floats from one row of x (and up) to the next
    const float *up; // small shape: the activations are silu(x) * up
};

// log2 of the group whose scales or codes a stage copies
template <nb_dtype T> __device__ __forceinline__ int tc_gsh(const tc_args &a) {
    static_assert(QUANT_WINT2_GROUP == 64, "WINT2 groups of 64");
    return T == NB_WINT2 ? 6 : a.gsh;
}

// BF16 pair constants (.x, the lower k, in the low half), for
// cuda_fma_bf16x2 on the registers as they are: x * 1 - 136 is a
// subtraction (sm_80 has no BF16 add of its own).
#define TC_BF2_ONE 0x3F803F80u
#define TC_BF2_M136 0xC308C308u
__device__ __forceinline__ uint32_t tc_ld32(const __nv_bfloat16 *p) { return *(const uint32_t *)p; }

// The FP32 activations of stage st (rows m0.., zero past M and K) into
// registers. In the small shape, rows past M are neither loaded nor stored
// (tc_store_a), so a decode step of one row does the work of one row, not
// of the tile's 16: whatever those shared-memory rows hold only reaches
// the same rows of the mma's result (row m of D is row m of A times B),
// which are never stored. (The larger shapes have rows past M in their
// last tile only; skipping there costs ptxas more registers than it saves.)
// With up (small shape only: cuda_wint_tc_matmul_silu), the same of up
// into ru; tc_store_a makes silu(x) * up of them, after the mma have been
// issued, so that the loads stay in flight meanwhile.
__device__ __forceinline__ float4 tc_ld4(const float *p, int al) {
    return al ? *(const float4 *)p : make_float4(p[0], p[1], p[2], p[3]);
}
template <int C>
__device__ __forceinline__ void tc_load_a(float4 (&r)[tc_af4(C)], float4 (&ru)[tc_af4(C)], const tc_args &a, int m0,
                                          int st) {
    constexpr int C4 = tc_bk(C) / 4;
#pragma unroll
    for (int i = 0; i < tc_af4(C); i++) {
        const int idx = threadIdx.x + i * TC_THREADS, m = m0 + idx / C4, k = st * tc_bk(C) + 4 * (idx % C4);
        if (tc_small(C) && m >= a.M) break; // idx grows with i: so do the rows
        r[i] = ru[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (m < a.M && k < a.K) { // K % 16 == 0: a float4 is wholly in or out
            const size_t at = (size_t)m * a.ldx + k;
            r[i] = tc_ld4(a.x + at, a.xal);
            if (tc_small(C) && a.up) ru[i] = tc_ld4(a.up + at, a.xal);
        }
    }
}

// ... and from registers into a stage's activation tile, as BF16 (small
// shape: rows below mv = M - m0 only).
template <int C>
__device__ __forceinline__ void tc_store_a(__nv_bfloat16 *as, float4 (&r)[tc_af4(C)], const float4 (&ru)[tc_af4(C)],
                                           const tc_args &a, int mv) {
    constexpr int C4 = tc_bk(C) / 4;
#pragma unroll
    for (int i = 0; i < tc_af4(C); i++) {
        const int idx = threadIdx.x + i * TC_THREADS;
        if (tc_small(C) && idx / C4 >= mv) break;
        if (tc_small(C) && a.up) {
            r[i].x = cuda_silu_mul1(r[i].x, ru[i].x), r[i].y = cuda_silu_mul1(r[i].y, ru[i].y);
            r[i].z = cuda_silu_mul1(r[i].z, ru[i].z), r[i].w = cuda_silu_mul1(r[i].w, ru[i].w);
        }
        uint2 v;
        v.x = cuda_bf16x2(r[i].x, r[i].y), v.y = cuda_bf16x2(r[i].z, r[i].w);
        *(uint2 *)(as + (idx / C4) * tc_lda(C) + 4 * (idx % C4)) = v;
    }
}

// The async copies of stage st's step blocks for chunks cg0, cg0 + 1 and,
// grouped, of its scales. Chunks past NC and k-steps past KS are zero
// filled without reading (their address stays a real one).
template <nb_dtype T, bool GRP, int C>
__device__ __forceinline__ void tc_copy_b(uint8_t *stg, const tc_args &a, int cg0, int st) {
    constexpr int PKS = tc_step_bytes<T>() / 16, PPC = tc_kps(C) * PKS, P = TC_WN * PPC; // 16-byte pieces
    const int ks0 = st * tc_kps(C);
#pragma unroll
    for (int i0 = 0; i0 < P; i0 += TC_THREADS) {
        const int i = i0 + threadIdx.x;
        if (P % TC_THREADS == 0 || i < P) {
            const int ch = i / PPC, off = i % PPC, cg = cg0 + ch, ks = ks0 + off / PKS;
            const bool ok = cg < a.NC && ks < a.KS;
            // the piece's offset in the chunk apart from the stage's, so
            // that only the stage's is computed per stage
            const uint8_t *src = a.data + ((size_t)cg * a.KS * PKS + off) * 16;
            cuda_cp_async16(stg + i * 16, ok ? src + (size_t)ks0 * (PKS * 16) : a.data, ok);
        }
    }
    if constexpr (GRP || T == NB_WINT2) {
        // the stage holds BK / group whole groups, or lies in one group:
        // [group row][chunk][PPG 16-byte pieces] (grouped WINT4: 64 BF16
        // scales a chunk, WINT2: 64 code bytes)
        // (at most a group of 16 per k-step: straight-line code)
        constexpr int PPG = T == NB_WINT2 ? 4 : 8, MAXP = tc_kps(C) * TC_WN * PPG;
        const int gsh = tc_gsh<T>(a), ngr = tc_bk(C) >> gsh ? tc_bk(C) >> gsh : 1, grp0 = st * tc_bk(C) >> gsh;
        uint8_t *ss = stg + tc_b_bytes<T, C>();
#pragma unroll
        for (int i0 = 0; i0 < MAXP; i0 += TC_THREADS) {
            const int i = i0 + threadIdx.x;
            if (i >= ngr * TC_WN * PPG) break;
            const int row = i / (TC_WN * PPG), cg = cg0 + (i / PPG) % TC_WN, grp = grp0 + row;
            const bool ok = cg < a.NC && grp < a.G;
            const uint8_t *src = ok ? a.gscale + (((size_t)grp * a.NC + cg) * PPG + i % PPG) * 16 : a.gscale;
            cuda_cp_async16(ss + i * 16, src, ok);
        }
    }
}

// WINT2: the BF16 weights of one lane's n-tiles 4w..4w+3 (word wv of its
// step block; ac: their rows' code constants from the lut) into
// bf[4w..4w+3]. Pair P of the word is field i = P - sh / 2 of (wv >> sh)
// in each half (sh 0, 6, 12): OR-ed into BF16 128.0 it reads 128 + 4^i q,
// and times 4^-i minus 128 * 4^-i it is q; then q * (ls + 1) - zc / 4 *
// (ls + 1) is the weight (q - zc / 4) * (ls + 1). Every step is exact
// (tested in test_quant_tc), so one BF16 rounding never rounds anything.
__device__ __forceinline__ void tc_wint2_word(uint32_t (&bf)[8][2], uint32_t wv, const uint2 (&ac8)[8], int w) {
#pragma unroll
    for (int jj = 0; jj < 4; jj++) {
        const uint2 ac = ac8[4 * w + jj];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int P = 2 * jj + r, sh = P < 3 ? 0 : P < 6 ? 6 : 12, i = P - sh / 2;
            // BF16 4^-i and -128 * 4^-i: exponent lowered by 2i
            const uint32_t mul = (0x3F80u - 0x100u * i) * 0x10001u, add = (0xC300u - 0x100u * i) * 0x10001u;
            const uint32_t h = cuda_and_or(wv >> sh, 0x00030003u << (2 * i), 0x43004300u);
            bf[4 * w + jj][r] = cuda_fma_bf16x2(cuda_fma_bf16x2(h, mul, add), ac.x, ac.y);
        }
    }
}

// This warp's k-steps of stage st (in slot stg) into acc.
template <nb_dtype T, bool GRP, int C>
__device__ __forceinline__ void tc_compute(float (&acc)[tc_mt(C)][8][4], const uint8_t *stg, const tc_args &a, int st,
                                           int wm, int wn, int wk, const uint2 *lut) {
    constexpr int MT = tc_mt(C), LDA = tc_lda(C);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const __nv_bfloat16 *as = (const __nv_bfloat16 *)(stg + tc_b_bytes<T, C>() + tc_s_bytes<T, GRP, C>());
    uint2 ac[8]; // WINT2: the constants of this lane's 8 rows in its k-steps' group
    if constexpr (T == NB_WINT2) {
        const int row = wk * tc_ksw(C) * QUANT_TC_KSTEP >> tc_gsh<T>(a);
        const uint2 cv = *(const uint2 *)(stg + tc_b_bytes<T, C>() + ((row * TC_WN + wn) * 8 + g) * 8);
#pragma unroll
        for (int j = 0; j < 8; j++) ac[j] = lut[((j < 4 ? cv.x : cv.y) >> (8 * (j % 4))) & 0xffu];
    }
#pragma unroll
    for (int ksl = 0; ksl < tc_ksw(C); ksl++) {
        const int ks = wk * tc_ksw(C) + ksl; // k-step within the stage
        if (st * tc_kps(C) + ks >= a.KS) break; // K's tail in the last stage (warp-uniform)
        uint32_t af[MT][4];
#pragma unroll
        for (int i = 0; i < MT; i++) {
            const __nv_bfloat16 *p = as + (wm * 16 * MT + 16 * i + g) * LDA + QUANT_TC_KSTEP * ks + 2 * t;
            af[i][0] = tc_ld32(p);
            af[i][1] = tc_ld32(p + 8 * LDA);
            af[i][2] = tc_ld32(p + 8);
            af[i][3] = tc_ld32(p + 8 * LDA + 8);
        }
        // this lane's bytes of the step block(s): all 8 n-tiles' B
        const uint8_t *bp = stg + (wn * tc_kps(C) + ks) * tc_step_bytes<T>();
        uint32_t bf[8][2];
        if constexpr (T == NB_WINT2) {
            const uint2 v = *(const uint2 *)(bp + lane * 8);
            tc_wint2_word(bf, v.x, ac, 0);
            tc_wint2_word(bf, v.y, ac, 1);
        } else if constexpr (T == NB_WINT4) {
            const uint4 v = *(const uint4 *)(bp + lane * 16);
            const uint32_t wv[4] = {v.x, v.y, v.z, v.w};
            uint32_t sc[4] = {0, 0, 0, 0}; // grouped: the 8 rows' BF16 scales, two per word
            if constexpr (GRP) {
                const int row = ks * QUANT_TC_KSTEP >> a.gsh;
                const uint4 s = *(const uint4 *)(stg + tc_b_bytes<T, C>() + ((row * TC_WN + wn) * 8 + g) * 16);
                sc[0] = s.x, sc[1] = s.y, sc[2] = s.z, sc[3] = s.w;
            }
#pragma unroll
            for (int w = 0; w < 4; w++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    // nibbles r and r + 4: register r % 2 of n-tile 2w + r / 2
                    const int j = 2 * w + r / 2;
                    uint32_t q = cuda_fma_bf16x2(cuda_and_or(wv[w] >> (4 * r), 0x000F000Fu, 0x43004300u), TC_BF2_ONE,
                                                 TC_BF2_M136);
                    if constexpr (GRP) q = cuda_mul_bf16x2_half(q, sc[j >> 1], j & 1); // row j's scale
                    bf[j][r & 1] = q;
                }
        } else {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint4 v = *(const uint4 *)(bp + h * QUANT_TC_STEP + lane * 16);
                const uint32_t wv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    const uint32_t u = wv[w] ^ 0x80808080u; // q + 128 per byte
                    float f[4];
#pragma unroll
                    for (int p = 0; p < 4; p++)
                        f[p] = __uint_as_float(0x4B000000u | ((u >> (8 * p)) & 0xffu)) - 8388736.0f;
                    bf[4 * h + w][0] = cuda_bf16x2(f[0], f[1]);
                    bf[4 * h + w][1] = cuda_bf16x2(f[2], f[3]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int j = 0; j < 8; j++) cuda_mma_bf16(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
}

// Two blocks an SM for the larger shapes (at most 128 registers): left
// alone, ptxas gives some of them 150 or more, and an SM one block.
__host__ __device__ constexpr int tc_min_blocks(int C) { return tc_small(C) ? 1 : 2; }

// Block (x: 128 columns, y: BM rows, z: split of K).
template <nb_dtype T, bool GRP, int C>
__global__ void __launch_bounds__(TC_THREADS, tc_min_blocks(C)) wint_tc_kernel(tc_args a) {
    constexpr int MT = tc_mt(C), WM = tc_wm(C), WK = tc_wk(C), STAGES = tc_stages<T>(C), BM = tc_bm(C);
    constexpr int SB = tc_stage_bytes<T, GRP, C>(), A_OFF = tc_b_bytes<T, C>() + tc_s_bytes<T, GRP, C>();
    __shared__ __align__(16) uint8_t smem[tc_smem_bytes<T, GRP, C>()];
    __shared__ int last_block;
    // WINT2: BF16 pairs (ls + 1, ls + 1) and -zc / 4 * (ls + 1) twice, by
    // code byte; made before the first barrier of the loop below
    __shared__ uint2 lut[T == NB_WINT2 ? 256 : 1];
    if constexpr (T == NB_WINT2)
        for (int code = threadIdx.x; code < 256; code += TC_THREADS) {
            const float m = (float)((code & 15) + 1), c = -(float)(code >> 4) * 0.25f * m;
            lut[code] = make_uint2(cuda_bf16x2(m, m), cuda_bf16x2(c, c));
        }

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wmn = warp % (WM * TC_WN), wk = warp / (WM * TC_WN), wm = wmn / TC_WN, wn = wmn % TC_WN;
    const int m0 = blockIdx.y * BM, cg0 = blockIdx.x * TC_WN;
    const int st0 = blockIdx.z * a.sps, nst = a.nst - st0 < a.sps ? a.nst - st0 : a.sps;

    float acc[MT][8][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    const int mv = a.M - m0; // rows of the tile that exist
    float4 ar[tc_af4(C)], au[tc_af4(C)]; // (zeroed: the host compiler of the emulator cannot
    // tell that tc_store_a reads only what tc_load_a wrote)
#pragma unroll
    for (int i = 0; i < tc_af4(C); i++) ar[i] = au[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) {
        if (i < nst) {
            tc_copy_b<T, GRP, C>(smem + i * SB, a, cg0, st0 + i);
            tc_load_a<C>(ar, au, a, m0, st0 + i);
            tc_store_a<C>((__nv_bfloat16 *)(smem + i * SB + A_OFF), ar, au, a, mv);
        }
        cuda_cp_async_commit(); // possibly empty, so that group i is stage i
    }
    for (int it = 0; it < nst; it++) {
        const int nxt = it + STAGES - 1;
        uint8_t *nstg = smem + (nxt % STAGES) * SB;
        // the activations of stage nxt are in flight during the wait and
        // the mma below
        if (nxt < nst) tc_load_a<C>(ar, au, a, m0, st0 + nxt);
        cuda_cp_async_wait<STAGES - 2>(); // this thread's copies of stage it are in
        __syncthreads(); // everyone's are; and slot nxt % STAGES (stage it - 1) is no longer read
        if (nxt < nst) tc_copy_b<T, GRP, C>(nstg, a, cg0, st0 + nxt);
        cuda_cp_async_commit();
        tc_compute<T, GRP, C>(acc, smem + (it % STAGES) * SB, a, st0 + it, wm, wn, wk, lut);
        if (nxt < nst) tc_store_a<C>((__nv_bfloat16 *)(nstg + A_OFF), ar, au, a, mv);
    }
    cuda_cp_async_wait<0>();
    __syncthreads(); // the stages' memory is free for the K-split sums

    constexpr int NACC = MT * 8 * 4;
    if constexpr (WK > 1) {
        // [warp k - 1][warp m, n][accumulator][lane]: conflict-free
        float *red = (float *)smem;
        if (wk > 0) {
            float *r = red + (size_t)((wk - 1) * WM * TC_WN + wmn) * NACC * 32 + lane;
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) r[((i * 8 + j) * 4 + e) * 32] = acc[i][j][e];
        }
        __syncthreads();
        if (wk == 0)
            for (int w2 = 1; w2 < WK; w2++) {
                const float *r = red + (size_t)((w2 - 1) * WM * TC_WN + wmn) * NACC * 32 + lane;
#pragma unroll
                for (int i = 0; i < MT; i++)
#pragma unroll
                    for (int j = 0; j < 8; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++) acc[i][j][e] += r[((i * 8 + j) * 4 + e) * 32];
            }
    }

    const bool split = a.S > 1;
    if (wk == 0) {
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int m = m0 + wm * 16 * MT + 16 * i + g + 8 * (e >> 1);
                    const int n = (cg0 + wn) * QUANT_TC_CHUNK + 8 * j + 2 * t + (e & 1);
                    if (m >= a.M || n >= a.N) continue;
                    if (split) a.part[((size_t)blockIdx.z * a.M + m) * a.N + n] = acc[i][j][e];
                    else a.out[(size_t)m * a.N + n] = GRP ? acc[i][j][e] : acc[i][j][e] * a.cscale[n] * tc_out_mul<T>();
                }
    }
    if (!split) return;

    // The last split of this tile to arrive adds all of them, in split
    // order. Each thread's partial stores are made visible before its block
    // counts itself in; the adder reads them past L1.
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_block = atomicAdd(a.cnt + tile, 1) == a.S - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < BM * TC_BN; idx += TC_THREADS) {
        const int m = m0 + idx / TC_BN, n = cg0 * QUANT_TC_CHUNK + idx % TC_BN;
        if (m >= a.M || n >= a.N) continue;
        float s = 0.0f;
        for (int z = 0; z < a.S; z++) s += *(volatile const float *)(a.part + ((size_t)z * a.M + m) * a.N + n);
        a.out[(size_t)m * a.N + n] = GRP ? s : s * a.cscale[n] * tc_out_mul<T>();
    }
    if (threadIdx.x == 0) a.cnt[tile] = 0; // for the next launch
}

// ---- launch --------------------------------------------------------------------

static cuda_wint_tc_state *tc_state(cuda_backend *c) {
    if (c->wint_tc) return c->wint_tc;
    cuda_wint_tc_state *s = (cuda_wint_tc_state *)calloc(1, sizeof *s);
    if (!s) abort();
    int n = c->n_sm;
    // split-K runs only when a launch has fewer tiles than its target of
    // TC_SPLIT_WAVES blocks per SM, so this many counters always do. On the
    // stream: if this first call is being recorded, the zeroing is recorded
    // too, which is harmless.
    s->n_cnt = TC_SPLIT_WAVES * n;
    CUDA_CHECK(cudaMalloc((void **)&s->cnt, sizeof(int) * (size_t)s->n_cnt));
    CUDA_CHECK(cudaMemsetAsync(s->cnt, 0, sizeof(int) * (size_t)s->n_cnt, c->stream));
    c->wint_tc = s;
    return s;
}

template <nb_dtype T, bool GRP, int C> static void tc_launch(cuda_backend *c, const tc_args &a0) {
    constexpr int BM = tc_bm(C);
    cuda_wint_tc_state *s = tc_state(c);
    const int gx = (a0.N + TC_BN - 1) / TC_BN, max_rows = 65535 * BM, target = TC_SPLIT_WAVES * c->n_sm;
    for (int r0 = 0; r0 < a0.M; r0 += max_rows) {
        tc_args a = a0;
        a.M = a0.M - r0 < max_rows ? a0.M - r0 : max_rows;
        a.x = a0.x + (size_t)r0 * a0.ldx;
        if (a0.up) a.up = a0.up + (size_t)r0 * a0.ldx;
        a.out = a0.out + (size_t)r0 * a0.N;
        a.nst = (a.KS + tc_kps(C) - 1) / tc_kps(C);
        const int gy = (a.M + BM - 1) / BM, tiles = gx * gy;
        int S = 1;
        if (tiles < target) {
            const int most = a.nst / TC_MIN_SPLIT_STAGES;
            S = (target + tiles - 1) / tiles;
            if (S > most) S = most > 1 ? most : 1;
        }
        a.sps = (a.nst + S - 1) / S;
        a.S = (a.nst + a.sps - 1) / a.sps; // no empty split
        if (a.S > 1) {
            cuda_scratch(c, &s->part, &s->part_cap, sizeof(float) * (size_t)a.S * (size_t)a.M * (size_t)a.N);
            a.part = (float *)s->part;
            a.cnt = s->cnt;
        }
        dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)a.S);
        wint_tc_kernel<T, GRP, C><<<grid, TC_THREADS, 0, c->stream>>>(a);
        CUDA_LAUNCHED();
    }
}

template <nb_dtype T, bool GRP> static void tc_run(cuda_backend *c, const tc_args &a) {
    if (a.M <= TC_SMALL_MAX_M) tc_launch<T, GRP, T == NB_WINT8 ? TC_SMALL : TC_SMALL2>(c, a);
    else if (a.M <= TC_MEDIUM_MAX_M) tc_launch<T, GRP, TC_MEDIUM>(c, a);
    else tc_launch<T, GRP, TC_LARGE>(c, a);
}

static int tc_layout_ok(const nb_weight *w) {
    nb_err e;
    nb_weight plain = *w;
    plain.layout = NB_LAYOUT_PLAIN; // quant_tc_check takes the weight before its repack
    return w->layout == NB_LAYOUT_TC && !quant_tc_check(&plain, &e);
}

// x's rows ld floats apart; with up, the product of silu(x) * up (the
// small shape only).
static void tc_matmul(cuda_backend *c, float *out, const float *x, const float *up, int ld, const nb_weight *w, int M) {
    if (!tc_layout_ok(w)) {
        fprintf(stderr, "nibble: cuda wint tc: %s [%lld, %lld] is not in the tensor-core layout\n",
                nb_dtype_name(w->dtype), (long long)w->rows, (long long)w->cols);
        abort();
    }
    if (M <= 0) return;
    tc_args a;
    memset(&a, 0, sizeof a);
    a.x = x, a.up = up, a.ldx = ld, a.out = out;
    a.data = (const uint8_t *)w->data;
    a.M = M, a.N = (int)w->rows, a.K = (int)w->cols;
    a.KS = a.K / QUANT_TC_KSTEP;
    a.NC = (a.N + QUANT_TC_CHUNK - 1) / QUANT_TC_CHUNK;
    a.xal = (uintptr_t)x % 16 == 0 && (uintptr_t)up % 16 == 0 && ld % 4 == 0;
    if (w->dtype == NB_WINT8) {
        a.cscale = (const float *)w->scale;
        tc_run<NB_WINT8, false>(c, a);
    } else if (w->dtype == NB_WINT2) {
        a.gscale = (const uint8_t *)w->scale;
        a.cscale = (const float *)w->scale2;
        a.G = a.K / QUANT_WINT2_GROUP;
        tc_run<NB_WINT2, false>(c, a);
    } else if (quant_tc_grouped(w)) {
        a.gscale = (const uint8_t *)w->scale;
        while (1 << a.gsh < w->group) a.gsh++; // a power of two (quant_tc_check)
        a.G = a.K >> a.gsh;
        tc_run<NB_WINT4, true>(c, a);
    } else {
        a.cscale = (const float *)w->scale;
        tc_run<NB_WINT4, false>(c, a);
    }
}

void cuda_wint_tc_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M) {
    tc_matmul(c, out, x, NULL, (int)w->cols, w, M);
}

int cuda_wint_tc_matmul_silu(cuda_backend *c, float *out, const float *gate, const float *up, int ld,
                             const nb_weight *w, int M) {
    if (M > TC_SILU_MAX_M || !tc_layout_ok(w)) return 1;
    tc_matmul(c, out, gate, up, ld, w, M);
    return 0;
}
