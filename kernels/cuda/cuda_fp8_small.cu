// NB_FP8_B128 products of 1 to 16 activation rows (decode) on FP8 tensor
// cores: out[m][n] = sum over 128-wide K blocks kb of xs(m, kb) * ws(n, kb)
// * (codes of x row m) . (codes of w row n), the same arithmetic as
// cuda_fp8.cu's GEMV and fp8_mma_kernel, for K % 128 == 0 on devices with
// FP8 mma (compute capability 8.9+).
//
// Why not the GEMV: it widens every activation code to FP32 for every
// weight row (two conversions and an FMA per code per row), so past a few
// rows it is bound by instruction issue, not memory: ~43 issue slots per
// row per 512 bytes of weights against the ~160 that HBM's rate leaves (H100:
// ~3 TB/s over 132 SMs x 4 schedulers at ~1.75 GHz), i.e. about 80 % of
// the bandwidth at 4 rows and 20 % at 16. Here the codes go to
// mma.m16n8k32.e4m3 as they are: ~20 slots per KiB of weights whatever the
// row count (up to 16, one m-tile).
//
// A block has 8 warps and NT n-tiles of 8 weight rows; the warps split the
// K blocks between them and their sums meet in shared memory at the end,
// in warp order (deterministic). Per K block, lane (g, t) loads 32
// consecutive codes (two 16-byte loads) of weight row n0 + 8j + g for each
// n-tile j and of activation rows g and g + 8: columns 32t .. 32t + 31 of
// the block. The mma's k index is a permutation of the block's columns,
// the same on both sides: at k-step s (0..3), kk = 4t + r (A register 0 or
// 2 of rows g, g + 8; B register 0) is column 32t + 8s + r and kk = 16 + 4t
// + r (register 1 or 3; B register 1) is column 32t + 8s + 4 + r, so every
// register is one aligned word of the lane's own loads and the 4 k-steps
// cover the block's 128 columns once. Each block's sum is kept apart and
// scaled into FP32 (an FP8 mma may add inside with fewer bits than FP32,
// about 14 for Hopper's wgmma per the DeepSeek-V3 report; promoting every
// 128 columns bounds what that loses), as fp8_mma_kernel does. On sm_90
// ptxas lowers this mma.sync to E4M3 -> FP16 unpacks (F2FP) and FP16
// HMMA with FP32 accumulation (the SASS; FP8 rate is wgmma's): exact
// products, 12 to 24 conversions per 512 weight bytes, well within what
// decode's memory rate leaves (docs/BENCHMARKS.md, "SASS counts").
//
// NT grows with the rows (1 up to 4 rows, 2 up to 8, 4 above) so that the
// activations a block reads (rows x K codes, from L1 or L2) stay at most
// half its weight bytes. A mixture's experts take the same tile with NT 1,
// a block row per expert in use (their rows, 16 at a time, are known on
// the device only).
#include "kernels/cuda/cuda_int.h"
#include "kernels/cuda/cuda_ptx.h"

extern "C" {
#include "quant/quant.h"
}

#define F8S_WARPS 8

// Word i (0..7) of a lane's 32 loaded bytes.
__device__ __forceinline__ uint32_t f8s_word(const uint4 (&v)[2], int i) {
    const uint4 h = v[i >> 2];
    const int w = i & 3;
    return w == 0 ? h.x : w == 1 ? h.y : w == 2 ? h.z : h.w;
}

__device__ __forceinline__ void f8s_load(uint4 (&v)[2], const uint8_t *p, bool ok) {
    const uint4 z = make_uint4(0, 0, 0, 0);
    v[0] = ok ? __ldg((const uint4 *)p) : z;
    v[1] = ok ? __ldg((const uint4 *)(p + 16)) : z;
}

// Output columns n0 .. n0 + 8 NT - 1 of rows [0, rows) (rows <= 16), by
// the whole block; red is the block's shared memory for the warps' sums,
// free again when this returns.
template <int NT>
__device__ __forceinline__ void fp8_small_tile(float (*red)[NT][4][32], float *out, const uint8_t *xq, const float *xs,
                                               int ld, int rows, const uint8_t *w, const float *ws, int N, int K,
                                               int L, int n0) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int kb0 = warp * L / F8S_WARPS, kb1 = (warp + 1) * L / F8S_WARPS;

    // this lane's rows: weight row n0 + 8j + g of each n-tile, activation
    // rows g and g + 8 (rows past the ends read as zeros)
    const uint8_t *wr[NT];
    bool wok[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int n = n0 + 8 * j + g;
        wok[j] = n < N;
        wr[j] = w + (size_t)(wok[j] ? n : 0) * K + 32 * t;
    }
    const bool ma = g < rows, mb = g + 8 < rows;
    const uint8_t *xa = xq + (size_t)(ma ? g : 0) * K + 32 * t, *xb = xq + (size_t)(mb ? g + 8 : 0) * K + 32 * t;

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;

    for (int kb = kb0; kb < kb1; kb++) {
        const size_t k = (size_t)kb * QUANT_FP8_BLOCK;
        uint4 b[NT][2], a0[2], a1[2];
#pragma unroll
        for (int j = 0; j < NT; j++) f8s_load(b[j], wr[j] + k, wok[j]);
        f8s_load(a0, xa + k, ma);
        f8s_load(a1, xb + k, mb);
        const float sa = ma ? xs[(size_t)kb * ld + g] : 0.0f, sb = mb ? xs[(size_t)kb * ld + g + 8] : 0.0f;
        float part[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) part[j][e] = 0.0f;
#pragma unroll
        for (int s = 0; s < 4; s++) {
            const uint32_t af[4] = {f8s_word(a0, 2 * s), f8s_word(a1, 2 * s), f8s_word(a0, 2 * s + 1),
                                    f8s_word(a1, 2 * s + 1)};
#pragma unroll
            for (int j = 0; j < NT; j++) cuda_mma_e4m3(part[j], af, f8s_word(b[j], 2 * s), f8s_word(b[j], 2 * s + 1));
        }
#pragma unroll
        for (int j = 0; j < NT; j++) {
            // an n-tile's 8 rows lie in one 128-row block of weight scales
            const int nt0 = n0 + 8 * j;
            const float wsc = nt0 < N ? __ldg(ws + (size_t)(nt0 / QUANT_FP8_BLOCK) * L + kb) : 0.0f;
            acc[j][0] = fmaf(part[j][0], wsc * sa, acc[j][0]);
            acc[j][1] = fmaf(part[j][1], wsc * sa, acc[j][1]);
            acc[j][2] = fmaf(part[j][2], wsc * sb, acc[j][2]);
            acc[j][3] = fmaf(part[j][3], wsc * sb, acc[j][3]);
        }
    }

    if (warp > 0)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) red[warp - 1][j][e][lane] = acc[j][e];
    __syncthreads();
    if (warp == 0) {
        for (int w2 = 0; w2 < F8S_WARPS - 1; w2++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[j][e] += red[w2][j][e][lane];
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int m = g + 8 * (e >> 1), n = n0 + 8 * j + 2 * t + (e & 1);
                if (m < rows && n < N) out[(size_t)m * N + n] = acc[j][e];
            }
    }
    __syncthreads(); // red is read
}

template <int NT>
__global__ void __launch_bounds__(F8S_WARPS * 32)
    fp8_small_kernel(float *out, const uint8_t *xq, const float *xs, int ld, int rows, const uint8_t *w,
                     const float *ws, int N, int K, int L) {
    __shared__ float red[F8S_WARPS - 1][NT][4][32];
    fp8_small_tile<NT>(red, out, xq, xs, ld, rows, w, ws, N, K, L, blockIdx.x * 8 * NT);
}

// The experts of a mixture (matmul_experts), as cuda_fp8.cu's
// fp8_gemv_experts_kernel: block row j takes the j-th expert in use, its
// rows 16 at a time; xq/xs are the quantized grouped rows (ld: all). Two
// blocks an SM at least: left alone, ptxas gives the loop over an
// expert's rows 134 registers and an SM one block, too few loads in flight.
__global__ void __launch_bounds__(F8S_WARPS * 32, 2)
    fp8_small_experts_kernel(float *out, const uint8_t *xq, const float *xs, int ld, const cuda_fp8_expert *tab,
                             const int32_t *groups, int E, int N, int K, int L) {
    __shared__ float red[F8S_WARPS - 1][1][4][32];
    const int j = blockIdx.y;
    if (j >= groups[E + 1]) return; // the whole block
    const int e = groups[E + 2 + j], r0 = groups[e], cnt = groups[e + 1] - r0;
    const cuda_fp8_expert x = tab[e];
    for (int c0 = 0; c0 < cnt; c0 += CUDA_FP8_SMALL_MAX_M) {
        const int r = r0 + c0, rows = cnt - c0 < CUDA_FP8_SMALL_MAX_M ? cnt - c0 : CUDA_FP8_SMALL_MAX_M;
        fp8_small_tile<1>(red, out + (size_t)r * N, xq + (size_t)r * K, xs + r, ld, rows, x.w, x.ws, N, K, L,
                          blockIdx.x * 8);
    }
}

void cuda_fp8_small_experts(cudaStream_t st, float *out, const uint8_t *xq, const float *xs, int ld,
                            const cuda_fp8_expert *tab, const int32_t *groups, int E, int max_active, int N, int K) {
    const dim3 grid((unsigned)((N + 7) / 8), (unsigned)max_active), block(F8S_WARPS * 32);
    fp8_small_experts_kernel<<<grid, block, 0, st>>>(out, xq, xs, ld, tab, groups, E, N, K, K / QUANT_FP8_BLOCK);
    CUDA_LAUNCHED();
}

void cuda_fp8_small(cudaStream_t st, float *out, const uint8_t *xq, const float *xs, int ld, int rows,
                    const uint8_t *w, const float *ws, int N, int K) {
    const int L = K / QUANT_FP8_BLOCK, nt = rows <= 4 ? 1 : rows <= 8 ? 2 : 4;
    const dim3 grid((unsigned)((N + 8 * nt - 1) / (8 * nt))), block(F8S_WARPS * 32);
    if (nt == 1) fp8_small_kernel<1><<<grid, block, 0, st>>>(out, xq, xs, ld, rows, w, ws, N, K, L);
    else if (nt == 2) fp8_small_kernel<2><<<grid, block, 0, st>>>(out, xq, xs, ld, rows, w, ws, N, K, L);
    else fp8_small_kernel<4><<<grid, block, 0, st>>>(out, xq, xs, ld, rows, w, ws, N, K, L);
    CUDA_LAUNCHED();
}
