// Weight-only quantized matmul on the GPU: NB_WINT8, NB_WINT4 and NB_WINT2
// weights, FP32 activations in, FP32 out: out[M,N] = x[M,K] @ dequant(w)^T.
//
// WINT8, WINT4 and WINT2 weights that the backend's weight_pack moved into
// the tensor-core layout of quant/quant_tc.h (w->layout == NB_LAYOUT_TC:
// what the model loader does for every dense shape the layout takes, i.e.
// K % 16 == 0 and a WINT4 group that is the whole row or divides or is a
// multiple of 64) go to cuda_wint_tc.cu for every M: dequantized in
// registers straight into mma fragments. Only one copy of a weight is
// resident, so the GEMV below cannot serve them even at M = 1. This file
// keeps the kernels for weights in quant.h's own layout, packed exactly as
// quant/quant.h lays them out and uploaded byte for byte: a mixture's
// experts (cuda_moe.cu), shapes the tensor-core layout refuses (WINT4
// groups such as 48 or 96, K not a multiple of 16, group scales that are
// not BF16 values), and weights no one packed (e.g. loaded by hand with
// weight_load).
//
// M <= 16 (decode): wint_gemv_kernel, one warp per output column n, 8 warps
// per block. Lanes stream the column's packed row with 16-byte loads, turn
// each q (WINT2: q - zc/4) into the exact FP32 value quant_dequant_row
// starts from, and multiply it into all MT activation rows, which stay
// FP32; each run of one scale is summed and then scaled, and the warp
// sums. Only the order and grouping of FP32 roundings differ from
// quant_matmul_ref (the scale multiplies a sum, not each weight). MT is a
// template parameter for every M in 1..16, so the weights are read once
// per call rather than once per 8 rows (a weight is dequantized 4 at a
// time and used for all MT rows).
//
// M > 16 (prefill): wint_mma_kernel on tensor cores. The activations are
// rounded to BF16 once per call into a zero-padded scratch copy; each block
// computes a 64x64 output tile with 4 warps (2 x 2, 32x32 each), walking K
// in tiles of 64: cp.async brings the next tile's activations and packed
// weight bytes into shared memory (double buffered) while the current one is
// used; the packed tile is dequantized (FP32 arithmetic as above, then one
// BF16 rounding) into a BF16 tile in shared memory, and fed to
// mma.sync.m16n8k16 (BF16 x BF16 -> FP32). Shapes whose packed rows are not
// a whole number of 16-byte chunks (WINT8 with K % 16 != 0, WINT4 with
// K % 32 != 0 or a group that is not a multiple of 16: only odd per-channel
// shapes) take the GEMV kernel 16 rows at a time instead.
#include "kernels/cuda/cuda_int.h"
#include "kernels/cuda/cuda_mma.h"
#include "kernels/cuda/cuda_ptx.h"

extern "C" {
#include "quant/quant.h"
}

// Scratch of this file: the BF16 activations of the tensor-core path.
// Grown with cuda_scratch (recorded graphs may point at an old buffer).
struct cuda_wint_state {
    void *act; // [M][Kp] BF16, Kp = K rounded up to WT_BK, the pad zeros
    size_t act_cap;
};

void cuda_wint_free(cuda_backend *c) {
    cuda_wint_tc_free(c);
    if (!c->wint) return;
    if (c->wint->act) cudaFree(c->wint->act);
    free(c->wint);
    c->wint = NULL;
}

// n / d for 0 <= n < 2^31 by a multiply-high, an add and a shift (the
// rounded-up reciprocal of Granlund and Montgomery, "Division by invariant
// integers using multiplication"): the kernels find a WINT4 column's group
// so, where a division by a runtime int is some 20 instructions a chunk.
struct wint_div {
    uint32_t mul;
    int shift;
};
static wint_div wint_div_make(uint32_t d) { // d >= 1
    int l = 0;
    while ((1ull << l) < d) l++;
    return wint_div{(uint32_t)(((1ull << 32) * ((1ull << l) - d)) / d + 1), l};
}
__device__ __forceinline__ int wint_divide(int n, wint_div d) {
    return (int)((__umulhi((uint32_t)n, d.mul) + (uint32_t)n) >> d.shift);
}

// Device pointers and shape of one packed weight, by value to the kernels.
struct wint_args {
    const uint8_t *data;  // packed rows, K / per_byte bytes each
    const float *scale;   // WINT8 [N]; WINT4 [N][G]
    const uint8_t *codes; // WINT2 [N][K / 64] (ls | zc << 4)
    const float *super;   // WINT2 [N]
    int N, K, group;
    int G;        // WINT4: groups a row, K / group
    wint_div gdiv; // WINT4: division by group
};

// Weights per packed byte.
template <nb_dtype T> __host__ __device__ constexpr int wint_per_byte() {
    return T == NB_WINT8 ? 1 : T == NB_WINT4 ? 2 : 4;
}
// Bytes of one packed row of k columns. NB_BF16 too: the tensor-core
// kernel also takes a mixture's BF16 experts, copied instead of dequantized.
template <nb_dtype T> __host__ __device__ constexpr int wint_row_bytes(int k) {
    return T == NB_BF16 ? 2 * k : k / wint_per_byte<T>();
}

// ---- dequantization: the arithmetic of quant_dequant_row -------------------

// The integers become floats by exponent magic, not conversions: integer
// to float (I2F) issues at a quarter of the FP32 rate on sm_80/sm_90 and
// was this GEMV's bound (WINT2: one a weight). An integer u < 2^23 OR-ed
// into the mantissa of 2^23 reads 2^23 + u exactly, and subtracting a
// float of the same binade is exact, so each q is the same float as the
// conversion's (test_quant_tc checks every input). The mask and the OR of
// a WINT4 or WINT2 field are one LOP3 (cuda_and_or); ptxas finds WINT8's.
// Byte i (0..3) of a little-endian word as the int8 q of WINT8: byte ^
// 0x80 is q + 128.
__device__ __forceinline__ float q_i8(uint32_t word, int i) {
    return __uint_as_float(0x4B000000u | (((word >> (8 * i)) & 0xffu) ^ 0x80u)) - 8388736.0f; // 2^23 + 128
}
// Nibble i (0..7) of a word: column 2*byte + (0: low, 1: high nibble), so
// nibble i is column i of the word's 8; q = u - 8.
__device__ __forceinline__ float q_u4(uint32_t word, int i) {
    return __uint_as_float(cuda_and_or(word >> (4 * i), 15u, 0x4B000000u)) - 8388616.0f; // 2^23 + 8
}

// WINT2 group constants from its code byte, as quant_wint2_step and
// quant_wint2_value compute them: w = (q - zc/4) * step.
__device__ __forceinline__ float w2_step(uint8_t code, float super) {
    return super * (float)((code & 15) + 1) * 0.0625f;
}
// 2^21 + zc/4, exact (2^21's ulp is 1/4): what w2_q subtracts.
__device__ __forceinline__ float w2_base(uint8_t code) { return 2097152.0f + (float)(code >> 4) * 0.25f; }
// q - zc/4 of 2-bit field i (0..15) of a word (byte i/4, bits 2*(i%4),
// i.e. column i): q at mantissa bits 2-3 of 2^21 reads 2^21 + q, and the
// difference with base = w2_base(code) is q - zc/4 exactly.
__device__ __forceinline__ float w2_q(uint32_t word, int i, float base) {
    const uint32_t at2 = i == 0 ? word << 2 : word >> (2 * i - 2); // field i at bits 2-3
    return __uint_as_float(cuda_and_or(at2, 0xCu, 0x4A000000u)) - base;
}

// ---- M <= 16: GEMV -----------------------------------------------------------

#define WG_WARPS 8
#define WG_MAX_M 16

// acc[m] += w . x[m][k..k+3] for all MT rows (x rows K apart, 16-byte aligned).
template <int MT>
__device__ __forceinline__ void fma4(float (&acc)[MT], const float *x, int K, int k, float w0, float w1, float w2,
                                     float w3) {
#pragma unroll
    for (int m = 0; m < MT; m++) {
        float4 v = *(const float4 *)(x + (size_t)m * K + k);
        acc[m] += w0 * v.x + w1 * v.y + w2 * v.z + w3 * v.w;
    }
}

template <int MT> __device__ __forceinline__ void fma1(float (&acc)[MT], const float *x, int K, int k, float w) {
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] += w * x[(size_t)m * K + k];
}

// acc[m] += part[m] * s: a run of products of one scale, scaled once.
template <int MT> __device__ __forceinline__ void add_scaled(float (&acc)[MT], const float (&part)[MT], float s) {
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = fmaf(part[m], s, acc[m]);
}

// One 16-byte chunk of column n's packed row at byte b (its first column is
// b * per_byte; b is a multiple of 16). Each run of the chunk under one
// scale (WINT8 the chunk, WINT4 each half, WINT2 the chunk: one group) is
// summed as q . x (WINT2: (q - zc/4) . x) and multiplied by the scale
// once: a multiply a weight fewer than dequantizing first.
template <nb_dtype T, int MT>
__device__ __forceinline__ void gemv_chunk(float (&acc)[MT], const float *x, const wint_args &a, int n, int b,
                                           uint4 v) {
    const int K = a.K;
    const uint32_t word[4] = {v.x, v.y, v.z, v.w};
    float part[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) part[m] = 0.0f;
    if constexpr (T == NB_WINT8) {
#pragma unroll
        for (int j = 0; j < 4; j++)
            fma4(part, x, K, b + 4 * j, q_i8(word[j], 0), q_i8(word[j], 1), q_i8(word[j], 2), q_i8(word[j], 3));
        add_scaled(acc, part, a.scale[n]);
    } else if constexpr (T == NB_WINT4) {
        // 32 columns k0..k0+31; groups are multiples of 16 here (chunked),
        // so each half of the chunk has one scale
        const int k0 = 2 * b;
        const float *srow = a.scale + (size_t)n * a.G;
#pragma unroll
        for (int h = 0; h < 2; h++) {
#pragma unroll
            for (int j = 2 * h; j < 2 * h + 2; j++) {
                const int k = k0 + 8 * j;
                fma4(part, x, K, k, q_u4(word[j], 0), q_u4(word[j], 1), q_u4(word[j], 2), q_u4(word[j], 3));
                fma4(part, x, K, k + 4, q_u4(word[j], 4), q_u4(word[j], 5), q_u4(word[j], 6), q_u4(word[j], 7));
            }
            add_scaled(acc, part, srow[wint_divide(k0 + 16 * h, a.gdiv)]);
#pragma unroll
            for (int m = 0; m < MT; m++) part[m] = 0.0f;
        }
    } else {
        // 64 columns k0..k0+63: exactly one group of 64 (b % 16 == 0)
        const int k0 = 4 * b;
        const uint8_t code = a.codes[(size_t)n * (K / QUANT_WINT2_GROUP) + k0 / QUANT_WINT2_GROUP];
        const float base = w2_base(code);
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int i = 4 * c;
                fma4(part, x, K, k0 + 16 * j + i, w2_q(word[j], i, base), w2_q(word[j], i + 1, base),
                     w2_q(word[j], i + 2, base), w2_q(word[j], i + 3, base));
            }
        add_scaled(acc, part, w2_step(code, a.super[n]));
    }
}

// One packed byte at b, for rows that are not a whole number of 16-byte
// chunks (or unaligned pointers). A byte never straddles a scale group:
// groups are even (WINT4) or 64 (WINT2).
template <nb_dtype T, int MT>
__device__ __forceinline__ void gemv_byte(float (&acc)[MT], const float *x, const wint_args &a, int n, int b,
                                          uint8_t byte) {
    const int K = a.K;
    if constexpr (T == NB_WINT8) {
        fma1(acc, x, K, b, q_i8(byte, 0) * a.scale[n]);
    } else if constexpr (T == NB_WINT4) {
        const int k = 2 * b;
        const float s = a.scale[(size_t)n * a.G + wint_divide(k, a.gdiv)];
        fma1(acc, x, K, k, q_u4(byte, 0) * s);
        fma1(acc, x, K, k + 1, q_u4(byte, 1) * s);
    } else {
        const int k = 4 * b;
        const uint8_t code = a.codes[(size_t)n * (K / QUANT_WINT2_GROUP) + k / QUANT_WINT2_GROUP];
        const float step = w2_step(code, a.super[n]), base = w2_base(code);
#pragma unroll
        for (int i = 0; i < 4; i++) fma1(acc, x, K, k + i, w2_q(byte, i, base) * step);
    }
}

// Output column n of MT activation rows for one warp: lanes take the
// packed row's 16-byte chunks in turn (vec) or its bytes (otherwise); the
// warp's sums are left in acc.
template <nb_dtype T, int MT>
__device__ __forceinline__ void wint_gemv_col(float (&acc)[MT], const float *x, const wint_args &a, int n, int vec,
                                              int lane) {
    constexpr int WPB = wint_per_byte<T>();
    const int rb = a.K / WPB;
    const uint8_t *row = a.data + (size_t)n * rb;
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.0f;
    if (vec) {
        for (int b = lane * 16; b < rb; b += 32 * 16) gemv_chunk<T, MT>(acc, x, a, n, b, *(const uint4 *)(row + b));
    } else {
        for (int b = lane; b < rb; b += 32) gemv_byte<T, MT>(acc, x, a, n, b, row[b]);
    }
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = cuda_warp_sum(acc[m]);
}

// One warp per output column n.
template <nb_dtype T, int MT>
__global__ void __launch_bounds__(WG_WARPS * 32) wint_gemv_kernel(float *out, const float *x, wint_args a, int vec) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WG_WARPS + (threadIdx.x >> 5);
    if (n >= a.N) return;
    float acc[MT];
    wint_gemv_col<T, MT>(acc, x, a, n, vec, lane);
    if (lane == 0)
#pragma unroll
        for (int m = 0; m < MT; m++) out[(size_t)m * a.N + n] = acc[m];
}

// An expert's cnt rows from r0, MT at a time, at the narrowest MT (halving
// the launch's, a block's choice so no warp diverges) that takes them in
// one pass: the weights are still read once, and no products are made for
// rows the expert does not have (a decode step over many experts has a few
// rows each where the launch allows 16). Rows past its last are read and
// not stored.
template <nb_dtype T, int MT>
__device__ __forceinline__ void wint_expert_rows(float *out, const float *x, const wint_args &a, int n, int vec,
                                                 int lane, int r0, int cnt) {
    if constexpr (MT > 1) {
        if (cnt <= MT / 2) {
            wint_expert_rows<T, MT / 2>(out, x, a, n, vec, lane, r0, cnt);
            return;
        }
    }
    for (int c0 = 0; c0 < cnt; c0 += MT) {
        float acc[MT];
        wint_gemv_col<T, MT>(acc, x + (size_t)(r0 + c0) * a.K, a, n, vec, lane);
        if (lane == 0)
#pragma unroll
            for (int m = 0; m < MT; m++)
                if (c0 + m < cnt) out[(size_t)(r0 + c0 + m) * a.N + n] = acc[m];
    }
}

// The experts of a mixture (matmul_experts), as cuda_matmul.cu's
// gemv_experts_kernel: block row j takes the j-th expert that has rows.
template <nb_dtype T, int MT>
__global__ void __launch_bounds__(WG_WARPS * 32)
    wint_gemv_experts_kernel(float *out, const float *x, const wint_args *tab, const int32_t *groups, int E, int vec) {
    const int j = blockIdx.y;
    if (j >= groups[E + 1]) return;
    const int e = groups[E + 2 + j], r0 = groups[e], cnt = groups[e + 1] - r0;
    const wint_args a = tab[e];
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WG_WARPS + (threadIdx.x >> 5);
    if (n >= a.N) return;
    wint_expert_rows<T, MT>(out, x, a, n, vec, lane, r0, cnt);
}

// Whether the packed rows can be read in aligned 16-byte chunks of which
// every 8 columns share one scale: what gemv_chunk and the tensor-core
// kernel assume. Only odd per-channel shapes (WINT8 with K % 16 != 0, WINT4
// with K % 32 != 0) are not.
template <nb_dtype T> static int chunked(const wint_args &a) {
    const int rb = wint_row_bytes<T>(a.K);
    return rb % 16 == 0 && (uintptr_t)a.data % 16 == 0 && (T != NB_WINT4 || a.group % 16 == 0);
}

template <nb_dtype T>
static void gemv_launch(cudaStream_t st, float *out, const float *x, const wint_args &a, int M) {
    // float4 activation loads: K % 4 == 0 follows from whole chunks
    int vec = chunked<T>(a) && (uintptr_t)x % 16 == 0;
    dim3 grid((unsigned)((a.N + WG_WARPS - 1) / WG_WARPS)), block(WG_WARPS * 32);
    switch (M) {
#define CASE(m) \
    case m: wint_gemv_kernel<T, m><<<grid, block, 0, st>>>(out, x, a, vec); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
        CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
    default: abort();
    }
    CUDA_LAUNCHED();
}

// ---- M > 16: tensor cores ----------------------------------------------------

#define WT_BM 64
#define WT_BN 64
#define WT_BK 64
#define WT_THREADS 128
// Shared-memory row stride of the BF16 tiles, in elements: 64 + 8 keeps rows
// 16-byte aligned (cp.async, uint4 stores) and puts the 8 rows one fragment
// load touches (row stride 36 words) in 8 different groups of 4 banks.
#define WT_LDS 72
static_assert(WT_BM == 64 && WT_BN == 64, "cuda_mma.h: 64x64 tiles");

// x (FP32 [M][K]) to BF16 [M][Kp], columns K..Kp-1 zero: the tensor-core
// kernel then reads whole 64-column tiles without a K bound, and the zeros
// cancel whatever the weights' padding dequantizes to.
__global__ void wint_act_kernel(__nv_bfloat16 *out, const float *x, int K, int Kp, size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        size_t m = i / (size_t)Kp;
        int k = (int)(i - m * (size_t)Kp);
        out[i] = __float2bfloat16_rn(k < K ? x[m * (size_t)K + k] : 0.0f);
    }
}

// The async copies of k-tile kt into one stage: the activation tile
// (64 rows x 64 BF16 = 8 chunks of 16 bytes per row; rows past M zero) and
// the packed weight tile (64 rows x BKB bytes; rows past N and chunks past
// the row's end zero; a chunk is wholly in or out since the row is whole
// chunks).
template <nb_dtype T>
__device__ __forceinline__ void mma_load_stage(__nv_bfloat16 *as, uint8_t *bp, const __nv_bfloat16 *act, int Kp,
                                               int M, const wint_args &a, int m0, int n0, int kt) {
    constexpr int BKB = wint_row_bytes<T>(WT_BK), BCH = BKB / 16;
    const int tid = threadIdx.x, k0 = kt * WT_BK, rb = wint_row_bytes<T>(a.K);
#pragma unroll
    for (int i = 0; i < WT_BM * 8 / WT_THREADS; i++) {
        const int c = tid + i * WT_THREADS, r = c >> 3, cc = c & 7, m = m0 + r;
        // an invalid copy reads nothing, but its address stays a real one
        const __nv_bfloat16 *src = act + (size_t)(m < M ? m : 0) * Kp + k0 + cc * 8;
        cuda_cp_async16(as + r * WT_LDS + cc * 8, src, m < M);
    }
    for (int c = tid; c < WT_BN * BCH; c += WT_THREADS) {
        const int r = c / BCH, cc = c % BCH, n = n0 + r, boff = wint_row_bytes<T>(k0) + cc * 16;
        const bool ok = n < a.N && boff < rb;
        cuda_cp_async16(bp + r * BKB + cc * 16, ok ? a.data + (size_t)n * rb + boff : a.data, ok);
    }
}

// Dequantizes the packed tile of k-tile kt into bs (64 rows x 64 BF16).
// Thread t takes row t / 2 and its 32 columns from 32 * (t % 2), in units of
// 8 columns; a unit is wholly inside or outside K (K is a multiple of 16,
// 32, 64 for WINT8, 4, 2 here) and wholly in one scale group (WINT4 groups
// are multiples of 16 here: chunked). Units past K or N are zero.
template <nb_dtype T>
__device__ __forceinline__ void mma_dequant(__nv_bfloat16 *bs, const uint8_t *bp, const wint_args &a, int n0,
                                            int kt) {
    constexpr int BKB = wint_row_bytes<T>(WT_BK);
    const int r = threadIdx.x >> 1, h = threadIdx.x & 1, n = n0 + r, K = a.K;
    const int kb = kt * WT_BK + 32 * h;
    const uint8_t *src = bp + r * BKB + h * (BKB / 2); // 32 columns' bytes
    __nv_bfloat16 *dst = bs + r * WT_LDS + 32 * h;
    if constexpr (T == NB_BF16) {
        // as they are: the copies left zeros past N and K (K % 8 == 0)
#pragma unroll
        for (int u = 0; u < 4; u++) *(uint4 *)(dst + 8 * u) = *(const uint4 *)(src + 16 * u);
        return;
    }
    float s = 0.0f, base = 0.0f;
    if (n < a.N) {
        if constexpr (T == NB_WINT8) s = a.scale[n];
        if constexpr (T == NB_WINT2) {
            // the tile's 64 columns are one group (K % 64 == 0)
            const uint8_t code = a.codes[(size_t)n * (K / QUANT_WINT2_GROUP) + kt * WT_BK / QUANT_WINT2_GROUP];
            s = w2_step(code, a.super[n]), base = w2_base(code);
        }
    }
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const int k = kb + 8 * u;
        float w[8];
        if (n < a.N && k < K) {
            if constexpr (T == NB_WINT8) {
                const uint2 v = *(const uint2 *)(src + 8 * u);
#pragma unroll
                for (int i = 0; i < 4; i++) w[i] = q_i8(v.x, i) * s, w[4 + i] = q_i8(v.y, i) * s;
            } else if constexpr (T == NB_WINT4) {
                const uint32_t v = *(const uint32_t *)(src + 4 * u);
                const float sg = a.scale[(size_t)n * a.G + wint_divide(k, a.gdiv)];
#pragma unroll
                for (int i = 0; i < 8; i++) w[i] = q_u4(v, i) * sg;
            } else {
                const uint32_t v = *(const uint16_t *)(src + 2 * u);
#pragma unroll
                for (int i = 0; i < 8; i++) w[i] = w2_q(v, i, base) * s;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) w[i] = 0.0f;
        }
        uint4 o;
        o.x = cuda_bf16x2(w[0], w[1]), o.y = cuda_bf16x2(w[2], w[3]);
        o.z = cuda_bf16x2(w[4], w[5]), o.w = cuda_bf16x2(w[6], w[7]);
        *(uint4 *)(dst + 8 * u) = o;
    }
}

// The 64x64 tile of out at rows m0, columns n0, for one block. Warp w
// computes rows 32 * (w / 2) .. +31 and columns 32 * (w % 2) .. +31 of it
// as 2 x 4 mma tiles of 16x8.
template <nb_dtype T>
__device__ __forceinline__ void mma_tile(float *out, const __nv_bfloat16 *act, int Kp, int M, const wint_args &a,
                                         int m0, int n0) {
    constexpr int BKB = wint_row_bytes<T>(WT_BK);
    __shared__ __align__(16) __nv_bfloat16 As[2][WT_BM * WT_LDS];
    __shared__ __align__(16) uint8_t Bp[2][WT_BN * BKB];
    __shared__ __align__(16) __nv_bfloat16 Bs[WT_BN * WT_LDS];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int KT = Kp / WT_BK;

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    mma_load_stage<T>(As[0], Bp[0], act, Kp, M, a, m0, n0, 0);
    cuda_cp_async_commit();
    for (int kt = 0; kt < KT; kt++) {
        const int st = kt & 1;
        // stage st ^ 1 was last read in iteration kt - 1, which ended with
        // a barrier
        if (kt + 1 < KT) mma_load_stage<T>(As[st ^ 1], Bp[st ^ 1], act, Kp, M, a, m0, n0, kt + 1);
        cuda_cp_async_commit(); // possibly empty: the wait below then still means "tile kt is in"
        cuda_cp_async_wait<1>();
        __syncthreads(); // every thread's copies of tile kt visible
        mma_dequant<T>(Bs, Bp[st], a, n0, kt);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < WT_BK; kk += 16) {
            uint32_t af[2][4], bf[4][2];
            mma_warp_frags(af, bf, (const uint8_t *)As[st], (const uint8_t *)Bs, 2 * WT_LDS, 2 * kk, wm, wn, g, t);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) cuda_mma_bf16(acc[i][j], af[i], bf[j][0], bf[j][1]);
        }
        __syncthreads(); // Bs and stage st are rewritten next
    }

    mma_warp_store(out, acc, M, a.N, m0, n0, wm, wn, g, t);
}

// One tile per block (blockIdx.x: columns n, blockIdx.y: rows m).
template <nb_dtype T>
__global__ void __launch_bounds__(WT_THREADS) wint_mma_kernel(float *out, const __nv_bfloat16 *act, int Kp, int M,
                                                              wint_args a) {
    mma_tile<T>(out, act, Kp, M, a, blockIdx.y * WT_BM, blockIdx.x * WT_BN);
}

// The experts of a mixture: block row j is the j-th 64-row tile of the
// experts in use, their tiles in expert order (the block finds its expert
// by walking the list; a step uses few experts next to a tile's work).
template <nb_dtype T>
__global__ void __launch_bounds__(WT_THREADS)
    wint_mma_experts_kernel(float *out, const __nv_bfloat16 *act, int Kp, const wint_args *tab, const int32_t *groups,
                            int E) {
    int r0, cnt, m0;
    const int e = mma_expert_tile(groups, E, blockIdx.y, &r0, &cnt, &m0);
    if (e < 0) return;
    const wint_args a = tab[e];
    mma_tile<T>(out + (size_t)r0 * a.N, act + (size_t)r0 * Kp, Kp, cnt, a, m0, blockIdx.x * WT_BN);
}

template <nb_dtype T> static void mma_launch(cuda_backend *c, float *out, const float *x, const wint_args &a, int M) {
    if (!c->wint) {
        c->wint = (cuda_wint_state *)calloc(1, sizeof *c->wint);
        if (!c->wint) abort();
    }
    const int Kp = (a.K + WT_BK - 1) / WT_BK * WT_BK;
    const size_t total = (size_t)M * (size_t)Kp;
    cuda_scratch(c, &c->wint->act, &c->wint->act_cap, total * sizeof(__nv_bfloat16));
    __nv_bfloat16 *act = (__nv_bfloat16 *)c->wint->act;
    size_t blocks = (total + 255) / 256;
    wint_act_kernel<<<(unsigned)(blocks < 65535u * 16u ? blocks : 65535u * 16u), 256, 0, c->stream>>>(act, x, a.K, Kp,
                                                                                                     total);
    CUDA_LAUNCHED();
    dim3 grid((unsigned)((a.N + WT_BN - 1) / WT_BN), (unsigned)((M + WT_BM - 1) / WT_BM));
    wint_mma_kernel<T><<<grid, WT_THREADS, 0, c->stream>>>(out, act, Kp, M, a);
    CUDA_LAUNCHED();
}

// ---- dispatch ------------------------------------------------------------------

template <nb_dtype T> static void wint_run(cuda_backend *c, float *out, const float *x, const wint_args &a, int M) {
    if (M <= WG_MAX_M) {
        gemv_launch<T>(c->stream, out, x, a, M);
    } else if (M <= 65535 * WT_BM && chunked<T>(a)) {
        mma_launch<T>(c, out, x, a, M);
    } else {
        for (int m0 = 0; m0 < M; m0 += WG_MAX_M) {
            int mt = M - m0 < WG_MAX_M ? M - m0 : WG_MAX_M;
            gemv_launch<T>(c->stream, out + (size_t)m0 * a.N, x + (size_t)m0 * a.K, a, mt);
        }
    }
}

// The kernels' view of w; nonzero when its group breaks the layout they
// read (they divide by the group and read whole bytes of a group).
static int wint_make_args(const nb_weight *w, wint_args *a) {
    a->data = (const uint8_t *)w->data;
    a->scale = (const float *)w->scale;
    a->codes = (const uint8_t *)w->scale;
    a->super = (const float *)w->scale2;
    a->N = (int)w->rows, a->K = (int)w->cols, a->group = w->group;
    if (w->dtype == NB_WINT4) {
        if (a->group <= 0 || a->K % a->group != 0 || a->group % 2 != 0) return 1;
        a->G = a->K / a->group;
        a->gdiv = wint_div_make((uint32_t)a->group);
        return 0;
    }
    if (w->dtype == NB_WINT2) return a->K % QUANT_WINT2_GROUP != 0;
    if (w->dtype == NB_BF16) return a->K % 8 != 0; // whole 16-byte chunks
    return 0;
}

void cuda_wint_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M) {
    if (w->layout == NB_LAYOUT_TC) {
        cuda_wint_tc_matmul(c, out, x, w, M);
        return;
    }
    if (M <= 0 || w->rows <= 0) return;
    if (w->rows > INT32_MAX || w->cols > INT32_MAX) {
        fprintf(stderr, "nibble: cuda matmul: %s weight [%lld, %lld] is too large\n", nb_dtype_name(w->dtype),
                (long long)w->rows, (long long)w->cols);
        abort();
    }
    wint_args a;
    if (wint_make_args(w, &a)) {
        fprintf(stderr, "nibble: cuda matmul: %s weight [%d, %d] with group %d breaks its layout (quant_check)\n",
                nb_dtype_name(w->dtype), a.N, a.K, a.group);
        abort();
    }
    switch (w->dtype) {
    case NB_WINT8: wint_run<NB_WINT8>(c, out, x, a, M); break;
    case NB_WINT4: wint_run<NB_WINT4>(c, out, x, a, M); break;
    case NB_WINT2: wint_run<NB_WINT2>(c, out, x, a, M); break;
    default:
        fprintf(stderr, "nibble: cuda wint matmul: %s weights are not weight-only quantized\n",
                nb_dtype_name(w->dtype));
        abort();
    }
}

// ---- experts -------------------------------------------------------------------

int cuda_wint_experts_ok(const nb_weight *w) {
    wint_args a;
    return (w->dtype == NB_WINT8 || w->dtype == NB_WINT4 || w->dtype == NB_WINT2) && w->layout == NB_LAYOUT_PLAIN &&
           w->rows <= INT32_MAX && w->cols <= INT32_MAX && !wint_make_args(w, &a);
}

void *cuda_wint_experts_table(cuda_backend *c, const nb_weight *w, int n, int *chunked_all) {
    wint_args *h = (wint_args *)malloc(sizeof(wint_args) * (size_t)n);
    if (!h) abort();
    int ok = 1;
    for (int e = 0; e < n; e++) {
        wint_make_args(&w[e], &h[e]);
        switch (w[e].dtype) {
        case NB_WINT8: ok &= chunked<NB_WINT8>(h[e]); break;
        case NB_WINT4: ok &= chunked<NB_WINT4>(h[e]); break;
        case NB_WINT2: ok &= chunked<NB_WINT2>(h[e]); break;
        default: ok &= chunked<NB_BF16>(h[e]); break;
        }
    }
    *chunked_all = ok;
    void *d = NULL;
    CUDA_CHECK(cudaMalloc(&d, sizeof(wint_args) * (size_t)n));
    CUDA_CHECK(cudaMemcpy(d, h, sizeof(wint_args) * (size_t)n, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

template <nb_dtype T>
static void experts_launch(cudaStream_t st, float *out, const float *x, const wint_args *tab, const int32_t *groups,
                           int E, int N, int vec, int mt, int max_active) {
    dim3 grid((unsigned)((N + WG_WARPS - 1) / WG_WARPS), (unsigned)max_active), block(WG_WARPS * 32);
    switch (mt) {
#define CASE(m) \
    case m: wint_gemv_experts_kernel<T, m><<<grid, block, 0, st>>>(out, x, tab, groups, E, vec); break;
        CASE(1) CASE(2) CASE(4) CASE(8) CASE(16)
#undef CASE
    default: abort();
    }
    CUDA_LAUNCHED();
}

template <nb_dtype T>
static void mma_experts_launch(cuda_backend *c, float *out, const float *x, const wint_args *tab,
                               const int32_t *groups, int E, const nb_weight *w0, int n_rows) {
    if (!c->wint) {
        c->wint = (cuda_wint_state *)calloc(1, sizeof *c->wint);
        if (!c->wint) abort();
    }
    const int K = (int)w0->cols, N = (int)w0->rows, Kp = (K + WT_BK - 1) / WT_BK * WT_BK;
    const size_t total = (size_t)n_rows * (size_t)Kp;
    cuda_scratch(c, &c->wint->act, &c->wint->act_cap, total * sizeof(__nv_bfloat16));
    __nv_bfloat16 *act = (__nv_bfloat16 *)c->wint->act;
    size_t blocks = (total + 255) / 256;
    wint_act_kernel<<<(unsigned)(blocks < 65535u * 16u ? blocks : 65535u * 16u), 256, 0, c->stream>>>(act, x, K, Kp,
                                                                                                     total);
    CUDA_LAUNCHED();
    // an expert with r rows has ceil(r / 64) <= r / 64 + 1 tiles
    const int max_tiles = (E < n_rows ? E : n_rows) + n_rows / WT_BM;
    dim3 grid((unsigned)((N + WT_BN - 1) / WT_BN), (unsigned)max_tiles);
    wint_mma_experts_kernel<T><<<grid, WT_THREADS, 0, c->stream>>>(out, act, Kp, tab, groups, E);
    CUDA_LAUNCHED();
}

void cuda_wint_experts(cuda_backend *c, float *out, const float *x, const void *table, int chunked,
                       const int32_t *groups, int E, const nb_weight *w0, int n_tokens, int n_rows) {
    const wint_args *tab = (const wint_args *)table;
    if (cuda_experts_tc(n_rows, E, WG_MAX_M) && chunked && n_rows <= 65535 * (WT_BM / 2)) {
        switch (w0->dtype) {
        case NB_WINT8: mma_experts_launch<NB_WINT8>(c, out, x, tab, groups, E, w0, n_rows); break;
        case NB_WINT4: mma_experts_launch<NB_WINT4>(c, out, x, tab, groups, E, w0, n_rows); break;
        case NB_WINT2: mma_experts_launch<NB_WINT2>(c, out, x, tab, groups, E, w0, n_rows); break;
        default: abort();
        }
        return;
    }
    if (w0->dtype == NB_BF16) abort(); // the GEMV here is for packed weights only
    int mt = 1;
    while (mt < n_tokens && mt < WG_MAX_M) mt *= 2;
    const int max_active = E < n_rows ? E : n_rows, N = (int)w0->rows;
    const int vec = chunked && (uintptr_t)x % 16 == 0;
    switch (w0->dtype) {
    case NB_WINT8: experts_launch<NB_WINT8>(c->stream, out, x, tab, groups, E, N, vec, mt, max_active); break;
    case NB_WINT4: experts_launch<NB_WINT4>(c->stream, out, x, tab, groups, E, N, vec, mt, max_active); break;
    case NB_WINT2: experts_launch<NB_WINT2>(c->stream, out, x, tab, groups, E, N, vec, mt, max_active); break;
    default: abort();
    }
}

int cuda_bf16_experts_mma_ok(const nb_weight *w) {
    wint_args a;
    return w->dtype == NB_BF16 && w->rows <= INT32_MAX && w->cols <= INT32_MAX && !wint_make_args(w, &a);
}

void cuda_bf16_experts_mma(cuda_backend *c, float *out, const float *x, const void *table, const int32_t *groups, int E,
                           const nb_weight *w0, int n_rows) {
    mma_experts_launch<NB_BF16>(c, out, x, (const wint_args *)table, groups, E, w0, n_rows);
}
