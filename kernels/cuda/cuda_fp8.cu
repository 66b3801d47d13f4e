// out[M,N] = x[M,K] @ w^T for NB_FP8_B128 weights (quant/quant.h): E4M3
// bytes [N][K], one FP32 scale per 128x128 block, activations quantized per
// token per 128 columns exactly as quant_act_rows does on the CPU.
//
// Every call first quantizes x (fp8_quant_kernel: E4M3 codes + FP32 scales
// in scratch), then multiplies. Larger M (> FP8_GEMV_MAX_M) goes to
// cuBLASLt's block-scaled FP8 GEMM on tensor cores where the device and the
// shape allow it, and where they do not (Ada, N % 4 != 0) to
// fp8_mma_kernel (K % 16 == 0, compute capability 8.9+: FP8 mma on the
// codes, scaled per 128-wide K block); decode-sized M to cuda_fp8_small.cu
// (FP8 mma too, for K % 128 == 0), and the rest (sm_80 has no FP8 mma) to
// fp8_gemv_kernel (one warp per output column, FP32 accumulation), which
// streams the weight bytes once per 16 activation rows.
//
// What cuBLASLt requires (NVIDIA cuBLAS documentation, "Using the cuBLASLt
// API"; verify these first on a GPU):
//  - section 3.1.4, table "Scaling Mode Support Overview": 128-element 1D
//    (CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F) and 128x128 2D
//    (..._BLK128x128_32F) block scaling exist for compute capability 9.0
//    only (Hopper; not Ada, not Blackwell), FP8 data, FP32 scales. They came
//    with cuBLAS 12.9 (NVIDIA/CUDALibrarySamples issue #310).
//  - 3.1.4.5 "128-element 1D and 128x128 2D Block Scaling For FP8 Data
//    Types": set CUBLASLT_MATMUL_DESC_A_SCALE_MODE / B_SCALE_MODE; BLK for
//    both A and B is not supported (we use BLK for the weights, VEC for the
//    activations, a supported pair); D must be 16F, 16BF or 32F.
//  - 3.1.4.5.1 "Scaling factors layouts": scale pointers 16-byte aligned; M
//    and N (the GEMM's, see below) multiples of 4. VEC128: A's scales
//    M-major [L][M], B's N-major [L][N], L = ceil(K/128). BLK128x128:
//    K-major with a column stride that is a multiple of 4, shape
//    L4 x ceil(M/128) for A, L4 = L rounded up to a multiple of 4.
//  - 3.4.17 "cublasLtMatmul()": FP8 needs the "TN" layout on Hopper (A
//    transposed, B not), CUBLAS_COMPUTE_32F, scale type CUDA_R_32F,
//    16-byte aligned pointers and dimensions; A = B = CUDA_R_8F_E4M3 with
//    C = D = CUDA_R_32F is in its type table; FP8 D is not allowed with
//    these scale modes.
// PyTorch's scaled_mm tests use the same layouts (1x128 scales
// outer-dimension-major; 128x128 scales padded to L4 along K, K-major).
//
// Operands: nibble's row-major out[M][N] = x[M][K] @ w[N][K]^T is, column
// major, D (N x M, ld N) = op(A) B with A = w seen as K x N (ld K) and
// TRANSA = T, B = the quantized x as K x M (ld K): the GEMM's M is our N,
// its N our M. So:
//  - A's BLK128x128 scales are [ceil(N/128)][L4] with K blocks contiguous:
//    our [ceil(N/128)][L] row-major array as it is when L % 4 == 0, else a
//    copy padded to L4 columns (fp8_scale_pad_kernel, on every call: it is
//    ~N*K/16384 floats, and a copy cached per weight pointer could outlive
//    the weight it was made from);
//  - B's VEC128 scales are [L][rows] (tokens contiguous), which is how
//    fp8_quant_kernel writes them;
//  - the GEMM's N (our rows) must be a multiple of 4: cuBLASLt takes the
//    first M & ~3 rows straight into out and the GEMV kernel the last 0-3.
#include <string.h>

#include <cuda_fp8.h>

#include "kernels/cuda/cuda_int.h"
#include "kernels/cuda/cuda_mma.h"
#include "kernels/cuda/cuda_ptx.h"

extern "C" {
#include "common/log.h"
#include "quant/quant.h"
}

// Largest M the GEMV kernel takes in one pass (accumulators in registers);
// up to it, a GEMV reading the weights once beats a tensor-core GEMM.
#define FP8_GEMV_MAX_M CUDA_FP8_SMALL_MAX_M
#define FP8_GEMV_WARPS 8
#define FP8_QUANT_WARPS 8
// Scratch regions start on this boundary (cuBLASLt's default assumption
// for its operands; scales need 16).
#define FP8_ALIGN 256

// One cuBLASLt plan: a shape's descriptors and heuristic algorithm.
typedef struct fp8_gemm {
    int rows; // the GEMM's N: activation rows it takes (a multiple of 4)
    int64_t N, K;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
    int ok; // 0: cuBLASLt refused this shape, the GEMV kernel takes it
} fp8_gemm;

struct cuda_fp8_state {
    int lt_ok;  // device and cuBLASLt support block-scaled FP8
    int mma_ok; // FP8 mma.sync (compute capability 8.9+): fp8_mma_kernel
    fp8_gemm *gemms;
    int n_gemms, cap_gemms;
    // one scratch buffer: quantized activations, their scales, padded
    // weight scales (grown with cuda_scratch: recorded graphs keep pointers)
    void *buf;
    size_t cap;
};

// ---- E4M3 conversions -------------------------------------------------------

// quant/quant.c's fp8_e4m3_from_f32, operation for operation, so the codes
// equal the CPU's bit for bit: round to nearest even, |x| >= 448 saturates.
__device__ __forceinline__ uint8_t fp8_from_f32(float x) {
    uint32_t u = __float_as_uint(x);
    uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return 0x7f;
    if (u >= 0x43e00000u) return (uint8_t)(sign | 0x7eu);
    // below 2^-6: multiples of 2^-9 (rintf rounds half to even)
    if (u < 0x3c800000u) return (uint8_t)(sign | (uint32_t)rintf(__uint_as_float(u) * 512.0f));
    u += 0x7ffffu + ((u >> 20) & 1u);
    uint32_t code = (u >> 20) - (120u << 3);
    return (uint8_t)(sign | (code > 0x7eu ? 0x7eu : code));
}

// E4M3 -> F16 is exact (F16 covers E4M3's range and subnormals), and so is
// F16 -> F32.
__device__ __forceinline__ float fp8_to_f32(uint8_t b) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3);
    return __half2float(__half(h));
}

// 16 E4M3 bytes (memory order) -> 16 floats. The low byte of each pair is
// the first value (the .x half).
__device__ __forceinline__ void fp8x16_to_f32(float *f, uint4 v) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w[i] >> (16 * h)), __NV_E4M3);
            float2 p = __half22float2(__half2(r));
            f[4 * i + 2 * h] = p.x;
            f[4 * i + 2 * h + 1] = p.y;
        }
}

// ---- activation quantization --------------------------------------------------

// Where the scale of row m, K block kb lives. The rows are split in a head
// (the rows cuBLASLt takes) and a tail; each part is [L][rows], tokens
// contiguous (cuBLASLt's VEC128 layout for B), head first.
__device__ __forceinline__ size_t act_scale_at(int m, int kb, int M, int L, int head) {
    return m < head ? (size_t)kb * head + m : (size_t)head * L + (size_t)kb * (M - head) + (m - head);
}

// One warp per (row, 128-column block): sx = max|x| / 448, codes
// e4m3(x / sx) (0 where sx == 0), as quant_act_rows. Lanes take columns
// lane + 32 j so every load and store of the warp is contiguous. x's rows
// are ld floats apart; with up, the row quantized is silu(x) * up (up's
// rows ld apart too), the values silu_mul would have written.
__global__ void __launch_bounds__(FP8_QUANT_WARPS * 32)
    fp8_quant_kernel(uint8_t *xq, float *xs, const float *x, const float *up, int ld, int M, int K, int L, int head) {
    int lane = threadIdx.x & 31;
    int64_t idx = (int64_t)blockIdx.x * FP8_QUANT_WARPS + (threadIdx.x >> 5);
    if (idx >= (int64_t)M * L) return;
    int m = (int)(idx / L), kb = (int)(idx % L);
    int k0 = kb * QUANT_FP8_BLOCK, n = K - k0 < QUANT_FP8_BLOCK ? K - k0 : QUANT_FP8_BLOCK;
    const float *xr = x + (size_t)m * ld + k0, *ur = up ? up + (size_t)m * ld + k0 : NULL;
    float v[QUANT_FP8_BLOCK / 32], amax = 0.0f;
#pragma unroll
    for (int j = 0; j < QUANT_FP8_BLOCK / 32; j++) {
        int col = lane + 32 * j;
        v[j] = col >= n ? 0.0f : ur ? cuda_silu_mul1(xr[col], ur[col]) : xr[col];
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = cuda_warp_max(amax);
    float sx = amax / QUANT_FP8_MAX;
    uint8_t *qr = xq + (size_t)m * K + k0;
#pragma unroll
    for (int j = 0; j < QUANT_FP8_BLOCK / 32; j++) {
        int col = lane + 32 * j;
        if (col < n) qr[col] = sx == 0.0f ? (uint8_t)0 : fp8_from_f32(v[j] / sx);
    }
    if (lane == 0) xs[act_scale_at(m, kb, M, L, head)] = sx;
}

// fp8_quant_kernel over M rows of K columns (L blocks), a warp a block.
static void fp8_quantize(cuda_backend *c, uint8_t *xq, float *xs, const float *x, const float *up, int ld, int M, int K,
                         int L, int head) {
    const int64_t units = (int64_t)M * L;
    fp8_quant_kernel<<<(unsigned)((units + FP8_QUANT_WARPS - 1) / FP8_QUANT_WARPS), FP8_QUANT_WARPS * 32, 0,
                       c->stream>>>(xq, xs, x, up, ld, M, K, L, head);
    CUDA_LAUNCHED();
}

// dst [NB][L4] = src [NB][L], the K blocks past L zero: the column stride
// cuBLASLt's BLK128x128 layout needs.
__global__ void fp8_scale_pad_kernel(float *dst, const float *src, int NB, int L, int L4) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= NB * L4) return;
    int nb = i / L4, kb = i % L4;
    dst[i] = kb < L ? src[(size_t)nb * L + kb] : 0.0f;
}

// ---- small M: GEMV ------------------------------------------------------------

// One warp per output column n over `rows` (<= MT) activation rows. Lanes
// walk the weight row in 16-byte vectors (16 columns inside one 128-block,
// since K % 16 == 0 on this path), each dotted with the same 16 columns of
// every activation row; the 16-term dot of E4M3 values (exact products)
// is scaled by the weight block's scale times the row's block scale. xs:
// scale of row m, block kb at xs[kb * ld + m]. vec == 0 (K % 16 != 0): one
// column per lane per step.
template <int MT>
__device__ __forceinline__ void fp8_gemv_col(float *out, const uint8_t *xq, const float *xs, int ld, int rows,
                                             const uint8_t *wr, const float *wsr, int n, int N, int K, int vec,
                                             int lane) {
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.0f;
    if (vec) {
        for (int k = lane * 16; k < K; k += 32 * 16) {
            int kb = k / QUANT_FP8_BLOCK;
            float wsc = __ldg(wsr + kb), wf[16];
            fp8x16_to_f32(wf, __ldg((const uint4 *)(wr + k)));
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if (m < rows) {
                    float xf[16], d = 0.0f;
                    fp8x16_to_f32(xf, *(const uint4 *)(xq + (size_t)m * K + k));
#pragma unroll
                    for (int i = 0; i < 16; i++) d = fmaf(wf[i], xf[i], d);
                    acc[m] = fmaf(d, wsc * xs[(size_t)kb * ld + m], acc[m]);
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            int kb = k / QUANT_FP8_BLOCK;
            float wv = fp8_to_f32(wr[k]) * wsr[kb];
#pragma unroll
            for (int m = 0; m < MT; m++)
                if (m < rows) acc[m] = fmaf(wv, fp8_to_f32(xq[(size_t)m * K + k]) * xs[(size_t)kb * ld + m], acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < MT; m++) {
        if (m < rows) {
            float s = cuda_warp_sum(acc[m]);
            if (lane == 0) out[(size_t)m * N + n] = s;
        }
    }
}

template <int MT>
__global__ void __launch_bounds__(FP8_GEMV_WARPS * 32)
    fp8_gemv_kernel(float *out, const uint8_t *xq, const float *xs, int ld, int rows, const uint8_t *w,
                    const float *ws, int N, int K, int L, int vec) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * FP8_GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    fp8_gemv_col<MT>(out, xq, xs, ld, rows, w + (size_t)n * K, ws + (size_t)(n / QUANT_FP8_BLOCK) * L, n, N, K, vec,
                     lane);
}

// One expert of a mixture, as the grouped kernels read it (cuda_int.h).
typedef cuda_fp8_expert fp8_expert;

// The experts of a mixture (matmul_experts), as cuda_matmul.cu's
// gemv_experts_kernel: block row j takes the j-th expert in use and walks
// its rows MT at a time; xq/xs are the quantized grouped rows (ld: all).
template <int MT>
__global__ void __launch_bounds__(FP8_GEMV_WARPS * 32)
    fp8_gemv_experts_kernel(float *out, const uint8_t *xq, const float *xs, int ld, const fp8_expert *tab,
                            const int32_t *groups, int E, int N, int K, int L, int vec) {
    const int j = blockIdx.y;
    if (j >= groups[E + 1]) return;
    const int e = groups[E + 2 + j], r0 = groups[e], cnt = groups[e + 1] - r0;
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * FP8_GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const fp8_expert x = tab[e];
    for (int c0 = 0; c0 < cnt; c0 += MT) {
        const int r = r0 + c0;
        fp8_gemv_col<MT>(out + (size_t)r * N, xq + (size_t)r * K, xs + r, ld, cnt - c0 < MT ? cnt - c0 : MT,
                         x.w + (size_t)n * K, x.ws + (size_t)(n / QUANT_FP8_BLOCK) * L, n, N, K, vec, lane);
    }
}

// ---- larger M where cuBLASLt does not take it: tensor cores ---------------

// A 64x64 tile of out per block of 4 warps, as cuda_wint.cu's mma_tile, on
// the E4M3 codes themselves (sm_89 and newer): both operands' k-tiles (64
// codes a row) come into shared memory by cp.async, double-buffered, and
// go to mma.m16n8k32.e4m3 as they are (four codes a register), FP32
// accumulators. The scales apply where the format puts them: each 128-wide
// K block (two k-tiles) is summed on its own, then added to the result
// times the weight block's scale (one per tile: its 64 columns lie in one
// 128-row weight block) and the row's activation scale, as the GEMV does
// per 16 columns, which also bounds what the MMA's short internal sums
// lose to one block's worth. This kernel serves the experts of a mixture
// and the shapes cuBLASLt refuses, where it replaces GEMV passes per 16
// rows. (On sm_90 the mma.sync becomes E4M3 -> FP16 unpacks and FP16 HMMA
// in the SASS: the FP16 mma.sync rate, not Hopper's FP8 rate, which only
// wgmma, i.e. cuBLASLt here, reaches.)
#define F8_BM 64
#define F8_BN 64
#define F8_BK 64
#define F8_LDS (F8_BK + 16) // bytes a shared row: 16-byte aligned, lanes' loads on distinct banks
#define F8_THREADS 128
static_assert(F8_BM == 64 && F8_BN == 64, "cuda_mma.h: 64x64 tiles");

// The async copies of k-tile kt (codes k0 .. k0 + 63) of rows r0.. of a
// [rows][K] code matrix into a 64-row stage; rows past `rows` and chunks
// past K zero (K % 16 == 0: a chunk is wholly in or out).
__device__ __forceinline__ void f8_load_tile(uint8_t *dst, const uint8_t *src, int rows, int K, int r0, int k0) {
#pragma unroll
    for (int i = 0; i < F8_BM * (F8_BK / 16) / F8_THREADS; i++) {
        const int c = threadIdx.x + i * F8_THREADS, r = c >> 2, k = k0 + (c & 3) * 16;
        const bool ok = r0 + r < rows && k < K;
        // an invalid copy reads nothing, but its address stays a real one
        cuda_cp_async16(dst + r * F8_LDS + (c & 3) * 16, ok ? src + (size_t)(r0 + r) * K + k : src, ok);
    }
}

// Rows m0.. and columns n0.. of out[M][N] = codes xq [M][K] (scales
// xs[kb * ld + m]) times weight w [N][K] (block scales ws [N/128][L]).
// Warp w computes rows 32 (w / 2).. and columns 32 (w % 2).. as 2 x 4 mma
// tiles of 16x8.
__device__ __forceinline__ void fp8_mma_tile(float *out, const uint8_t *xq, const float *xs, int ld, int M,
                                             const uint8_t *w, const float *ws, int N, int K, int L, int m0,
                                             int n0) {
    __shared__ __align__(16) uint8_t As[2][F8_BM * F8_LDS];
    __shared__ __align__(16) uint8_t Bs[2][F8_BN * F8_LDS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int KT = (K + F8_BK - 1) / F8_BK;
    const float *wsr = ws + (size_t)(n0 / QUANT_FP8_BLOCK) * L;

    float acc[2][4][4], part[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = part[i][j][e] = 0.0f;

    f8_load_tile(As[0], xq, M, K, m0, 0);
    f8_load_tile(Bs[0], w, N, K, n0, 0);
    cuda_cp_async_commit();
    for (int kt = 0; kt < KT; kt++) {
        const int st = kt & 1;
        // stage st ^ 1 was last read in iteration kt - 1, which ended with a barrier
        if (kt + 1 < KT) {
            f8_load_tile(As[st ^ 1], xq, M, K, m0, (kt + 1) * F8_BK);
            f8_load_tile(Bs[st ^ 1], w, N, K, n0, (kt + 1) * F8_BK);
        }
        cuda_cp_async_commit(); // possibly empty: the wait still means "tile kt is in"
        cuda_cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < F8_BK; kk += 32) {
            uint32_t af[2][4], bf[4][2];
            mma_warp_frags(af, bf, As[st], Bs[st], F8_LDS, kk, wm, wn, g, t);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) cuda_mma_e4m3(part[i][j], af[i], bf[j][0], bf[j][1]);
        }
        __syncthreads(); // stage st is rewritten next
        if ((kt & 1) || kt == KT - 1) { // the end of K block kb: scale it in
            const int kb = kt / 2;
            const float wsc = __ldg(wsr + kb);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int m = m0 + wm + 16 * i + g + 8 * h;
                    const float sc = m < M ? wsc * xs[(size_t)kb * ld + m] : 0.0f;
#pragma unroll
                    for (int j = 0; j < 4; j++)
#pragma unroll
                        for (int e = 2 * h; e < 2 * h + 2; e++) {
                            acc[i][j][e] = fmaf(part[i][j][e], sc, acc[i][j][e]);
                            part[i][j][e] = 0.0f;
                        }
                }
        }
    }

    mma_warp_store(out, acc, M, N, m0, n0, wm, wn, g, t);
}

// One tile per block (blockIdx.x: columns, blockIdx.y: rows).
__global__ void __launch_bounds__(F8_THREADS)
    fp8_mma_kernel(float *out, const uint8_t *xq, const float *xs, int ld, int M, const uint8_t *w, const float *ws,
                   int N, int K, int L) {
    fp8_mma_tile(out, xq, xs, ld, M, w, ws, N, K, L, blockIdx.y * F8_BM, blockIdx.x * F8_BN);
}

// The experts of a mixture: block row j is the j-th 64-row tile of the
// experts in use, their tiles in expert order (mma_expert_tile).
__global__ void __launch_bounds__(F8_THREADS)
    fp8_mma_experts_kernel(float *out, const uint8_t *xq, const float *xs, int ld, const fp8_expert *tab,
                           const int32_t *groups, int E, int N, int K, int L) {
    int r0, cnt, m0;
    const int e = mma_expert_tile(groups, E, blockIdx.y, &r0, &cnt, &m0);
    if (e < 0) return;
    const fp8_expert x = tab[e];
    fp8_mma_tile(out + (size_t)r0 * N, xq + (size_t)r0 * K, xs + r0, ld, cnt, x.w, x.ws, N, K, L, m0, blockIdx.x * F8_BN);
}

// out rows [0, rows) of the product from quantized rows xq (row stride K)
// with scales xs[kb * ld + m]: more than FP8_GEMV_MAX_M rows on tensor
// cores where the rows are whole 16-byte chunks, fewer where K is whole
// 128-column blocks (cuda_fp8_small), else the GEMV, FP8_GEMV_MAX_M rows
// per launch.
static cuda_fp8_state *fp8_state(cuda_backend *c);

// Whether cuda_fp8_small.cu may take a product: FP8 mma on the device, K
// whole 128-column blocks, and (vec) the codes in 16-byte aligned rows.
static int small_ok(cuda_backend *c, int vec, int K) {
    return vec && K % QUANT_FP8_BLOCK == 0 && fp8_state(c)->mma_ok;
}

static void product_rows(cuda_backend *c, float *out, const uint8_t *xq, const float *xs, int ld, int rows,
                         const nb_weight *w) {
    int N = (int)w->rows, K = (int)w->cols, L = (K + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK;
    int vec = K % 16 == 0 && (uintptr_t)w->data % 16 == 0 && (uintptr_t)xq % 16 == 0;
    const uint8_t *wd = (const uint8_t *)w->data;
    const float *ws = (const float *)w->scale;
    if (rows <= FP8_GEMV_MAX_M && small_ok(c, vec, K)) {
        cuda_fp8_small(c->stream, out, xq, xs, ld, rows, wd, ws, N, K);
        return;
    }
    if (vec && rows > FP8_GEMV_MAX_M && rows <= 65535 * F8_BM && fp8_state(c)->mma_ok) {
        dim3 tiles((unsigned)((N + F8_BN - 1) / F8_BN), (unsigned)((rows + F8_BM - 1) / F8_BM));
        fp8_mma_kernel<<<tiles, F8_THREADS, 0, c->stream>>>(out, xq, xs, ld, rows, wd, ws, N, K, L);
        CUDA_LAUNCHED();
        return;
    }
    dim3 grid((unsigned)((N + FP8_GEMV_WARPS - 1) / FP8_GEMV_WARPS)), block(FP8_GEMV_WARPS * 32);
    for (int m0 = 0; m0 < rows; m0 += FP8_GEMV_MAX_M) {
        int mt = rows - m0 < FP8_GEMV_MAX_M ? rows - m0 : FP8_GEMV_MAX_M;
        float *o = out + (size_t)m0 * N;
        const uint8_t *q = xq + (size_t)m0 * K;
        const float *s = xs + m0;
#define FP8_GEMV(MT) fp8_gemv_kernel<MT><<<grid, block, 0, c->stream>>>(o, q, s, ld, mt, wd, ws, N, K, L, vec)
        if (mt == 1) FP8_GEMV(1);
        else if (mt == 2) FP8_GEMV(2);
        else if (mt <= 4) FP8_GEMV(4);
        else if (mt <= 8) FP8_GEMV(8);
        else FP8_GEMV(16);
#undef FP8_GEMV
        CUDA_LAUNCHED();
    }
}

// ---- larger M: cuBLASLt ---------------------------------------------------------

static cuda_fp8_state *fp8_state(cuda_backend *c) {
    if (c->fp8) return c->fp8;
    cuda_fp8_state *f = (cuda_fp8_state *)calloc(1, sizeof *f);
    if (!f) abort();
    int major = 0, minor = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c->device));
    size_t ver = cublasLtGetVersion();
    f->lt_ok = major == 9 && minor == 0 && ver >= 120900;
    f->mma_ok = major * 10 + minor >= 89;
    if (!f->lt_ok)
        log_warn("cuda fp8: cuBLASLt block-scaled FP8 needs compute capability 9.0 and cuBLASLt 12.9+ (device "
                 "%d.%d, cuBLASLt %zu): FP8 products run on nibble's own kernels",
                 major, minor, ver);
    c->fp8 = f;
    return f;
}

static void gemm_set_scales(fp8_gemm *g, const void *a_scale, const void *b_scale) {
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof a_scale));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof b_scale));
}

// The plan for `rows` activation rows on a [N][K] weight, made on first use
// (the heuristic wants the scale pointers set, so the first call's go in).
static fp8_gemm *gemm_get(cuda_backend *c, cuda_fp8_state *f, int rows, int64_t N, int64_t K, const void *a_scale,
                          const void *b_scale) {
    for (int i = 0; i < f->n_gemms; i++) {
        fp8_gemm *g = &f->gemms[i];
        if (g->rows == rows && g->N == N && g->K == K) return g;
    }
    if (f->n_gemms == f->cap_gemms) {
        f->cap_gemms = f->cap_gemms ? 2 * f->cap_gemms : 32;
        f->gemms = (fp8_gemm *)realloc(f->gemms, sizeof(fp8_gemm) * (size_t)f->cap_gemms);
        if (!f->gemms) abort();
    }
    fp8_gemm *g = &f->gemms[f->n_gemms++];
    memset(g, 0, sizeof *g);
    g->rows = rows, g->N = N, g->K = K;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    int32_t am = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, bm = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &am, sizeof am));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &bm, sizeof bm));
    gemm_set_scales(g, a_scale, b_scale);
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&g->a, CUDA_R_8F_E4M3, (uint64_t)K, (uint64_t)N, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&g->b, CUDA_R_8F_E4M3, (uint64_t)K, (uint64_t)rows, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&g->d, CUDA_R_32F, (uint64_t)N, (uint64_t)rows, N));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = c->lt_ws_size;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t res;
    memset(&res, 0, sizeof res);
    int found = 0;
    // A refusal here (no algorithm, or NOT_SUPPORTED) is an answer, not an
    // error: the GEMV kernel takes the shape.
    cublasStatus_t rc =
        cublasLtMatmulAlgoGetHeuristic(c->lt, g->op, g->a, g->b, g->d, g->d, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    g->ok = rc == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS;
    if (g->ok) g->algo = res.algo;
    else
        log_warn("cuda fp8: cuBLASLt has no block-scaled FP8 algorithm for %d x %lld x %lld (status %d, %d found): "
                 "the GEMV kernel takes it",
                 rows, (long long)N, (long long)K, (int)rc, found);
    return g;
}

// D = out's first g->rows rows. Returns 0 if cuBLASLt refuses the call
// itself (it then enqueued nothing; the plan is marked so later calls skip
// it).
static int lt_run(cuda_backend *c, fp8_gemm *g, float *out, const uint8_t *xq, const float *xs, const float *wscale,
                  const nb_weight *w) {
    gemm_set_scales(g, wscale, xs);
    float alpha = 1.0f, beta = 0.0f;
    cublasStatus_t rc = cublasLtMatmul(c->lt, g->op, &alpha, w->data, g->a, xq, g->b, &beta, out, g->d, out, g->d,
                                       &g->algo, c->lt_ws, c->lt_ws_size, c->stream);
    if (rc == CUBLAS_STATUS_NOT_SUPPORTED || rc == CUBLAS_STATUS_INVALID_VALUE) {
        log_warn("cuda fp8: cublasLtMatmul refused %d x %lld x %lld (status %d): the GEMV kernel takes it", g->rows,
                 (long long)g->N, (long long)g->K, (int)rc);
        g->ok = 0;
        return 0;
    }
    CUBLAS_CHECK(rc);
    return 1;
}

static size_t align_up(size_t n) { return (n + FP8_ALIGN - 1) / FP8_ALIGN * FP8_ALIGN; }

// Whether cuBLASLt may take this product at all (the per-shape heuristic
// has the last word): the documented shape rules above, and operands as
// aligned as the heuristic assumes by default (256 bytes; cudaMalloc'd
// weights and the model's activation buffers are).
static int lt_eligible(const cuda_fp8_state *f, const float *out, const nb_weight *w, int M) {
    return f->lt_ok && M > FP8_GEMV_MAX_M && w->cols % 16 == 0 && w->rows % 4 == 0 &&
           (uintptr_t)out % FP8_ALIGN == 0 && (uintptr_t)w->data % FP8_ALIGN == 0 &&
           (uintptr_t)w->scale % FP8_ALIGN == 0;
}

// x's rows ld floats apart; with up, the product of silu(x) * up.
static void fp8_matmul(cuda_backend *c, float *out, const float *x, const float *up, int ld, const nb_weight *w,
                       int M) {
    if (M <= 0 || w->rows <= 0) return;
    cuda_fp8_state *f = fp8_state(c);
    int N = (int)w->rows, K = (int)w->cols;
    int L = (K + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK, L4 = (L + 3) / 4 * 4;
    int NB = (N + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK;
    int lt = lt_eligible(f, out, w, M), pad = lt && L != L4;

    // scratch: codes [M][K] | scales (act_scale_at) | padded weight scales
    size_t q_bytes = align_up((size_t)M * K), s_bytes = align_up(sizeof(float) * (size_t)M * L);
    size_t p_bytes = pad ? sizeof(float) * (size_t)NB * L4 : 0;
    cuda_scratch(c, &f->buf, &f->cap, q_bytes + s_bytes + p_bytes);
    uint8_t *xq = (uint8_t *)f->buf;
    float *xs = (float *)((char *)f->buf + q_bytes), *wpad = (float *)((char *)f->buf + q_bytes + s_bytes);
    const float *wscale = pad ? wpad : (const float *)w->scale;

    fp8_gemm *g = lt ? gemm_get(c, f, M & ~3, N, K, wscale, xs) : NULL;
    if (g && !g->ok) g = NULL;
    int head = g ? g->rows : M; // rows whose scales are laid out for cuBLASLt

    fp8_quantize(c, xq, xs, x, up, ld, M, K, L, head);

    int lt_rows = 0;
    if (g) {
        if (pad) {
            int n = NB * L4;
            fp8_scale_pad_kernel<<<(n + 255) / 256, 256, 0, c->stream>>>(wpad, (const float *)w->scale, NB, L, L4);
            CUDA_LAUNCHED();
        }
        if (lt_run(c, g, out, xq, xs, wscale, w)) lt_rows = head;
    }
    if (lt_rows < head) product_rows(c, out, xq, xs, head, head, w);
    if (head < M)
        product_rows(c, out + (size_t)head * N, xq + (size_t)head * K, xs + (size_t)head * L, M - head, M - head, w);
}

void cuda_fp8_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M) {
    fp8_matmul(c, out, x, NULL, (int)w->cols, w, M);
}

void cuda_fp8_matmul_silu(cuda_backend *c, float *out, const float *gate, const float *up, int ld, const nb_weight *w,
                          int M) {
    fp8_matmul(c, out, gate, up, ld, w, M);
}

// ---- experts --------------------------------------------------------------------

void *cuda_fp8_experts_table(cuda_backend *c, const nb_weight *w, int n, int *vec, int *mma) {
    fp8_expert *h = (fp8_expert *)malloc(sizeof(fp8_expert) * (size_t)n);
    if (!h) abort();
    *vec = w[0].cols % 16 == 0;
    for (int e = 0; e < n; e++) {
        h[e].w = (const uint8_t *)w[e].data, h[e].ws = (const float *)w[e].scale;
        *vec &= (uintptr_t)w[e].data % 16 == 0;
    }
    *mma = *vec && fp8_state(c)->mma_ok;
    void *d = NULL;
    CUDA_CHECK(cudaMalloc(&d, sizeof(fp8_expert) * (size_t)n));
    CUDA_CHECK(cudaMemcpy(d, h, sizeof(fp8_expert) * (size_t)n, cudaMemcpyHostToDevice));
    free(h);
    return d;
}

void cuda_fp8_experts(cuda_backend *c, float *out, const float *x, const void *table, int vec, const int32_t *groups,
                      int E, const nb_weight *w0, int n_tokens, int n_rows) {
    cuda_fp8_state *f = fp8_state(c);
    const int N = (int)w0->rows, K = (int)w0->cols, L = (K + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK;
    size_t q_bytes = align_up((size_t)n_rows * K);
    cuda_scratch(c, &f->buf, &f->cap, q_bytes + sizeof(float) * (size_t)n_rows * L);
    uint8_t *xq = (uint8_t *)f->buf;
    float *xs = (float *)((char *)f->buf + q_bytes);
    fp8_quantize(c, xq, xs, x, NULL, K, n_rows, K, L, n_rows);
    const int max_active = E < n_rows ? E : n_rows;
    const fp8_expert *tab = (const fp8_expert *)table;
    if (vec && cuda_experts_tc(n_rows, E, FP8_GEMV_MAX_M) && f->mma_ok) {
        // an expert with r rows has ceil(r / 64) <= r / 64 + 1 tiles
        dim3 tiles((unsigned)((N + F8_BN - 1) / F8_BN), (unsigned)(max_active + n_rows / F8_BM));
        fp8_mma_experts_kernel<<<tiles, F8_THREADS, 0, c->stream>>>(out, xq, xs, n_rows, tab, groups, E, N, K, L);
        CUDA_LAUNCHED();
        return;
    }
    if (small_ok(c, vec, K)) { // xq: the scratch's start, 256-byte aligned
        cuda_fp8_small_experts(c->stream, out, xq, xs, n_rows, tab, groups, E, max_active, N, K);
        return;
    }
    int mt = 1;
    while (mt < n_tokens && mt < FP8_GEMV_MAX_M) mt *= 2;
    dim3 grid((unsigned)((N + FP8_GEMV_WARPS - 1) / FP8_GEMV_WARPS), (unsigned)max_active), block(FP8_GEMV_WARPS * 32);
    switch (mt) {
#define CASE(m)                                                                                                        \
    case m:                                                                                                            \
        fp8_gemv_experts_kernel<m><<<grid, block, 0, c->stream>>>(out, xq, xs, n_rows, tab, groups, E, N, K, L, vec); \
        break;
        CASE(1) CASE(2) CASE(4) CASE(8) CASE(16)
#undef CASE
    default: abort();
    }
    CUDA_LAUNCHED();
}

void cuda_fp8_free(cuda_backend *c) {
    cuda_fp8_state *f = c->fp8;
    if (!f) return;
    // queued products may still read the scratch (cu_destroy has synced
    // and dropped the graphs, which also freed retired scratch)
    if (c->stream) cudaStreamSynchronize(c->stream);
    for (int i = 0; i < f->n_gemms; i++) {
        fp8_gemm *g = &f->gemms[i];
        cublasLtMatrixLayoutDestroy(g->a);
        cublasLtMatrixLayoutDestroy(g->b);
        cublasLtMatrixLayoutDestroy(g->d);
        cublasLtMatmulDescDestroy(g->op);
    }
    free(f->gemms);
    cudaFree(f->buf);
    free(f);
    c->fp8 = NULL;
}
