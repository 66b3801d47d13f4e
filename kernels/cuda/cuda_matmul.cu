// out[M,N] = x[M,K] @ w^T on the GPU.
//
// Small M (decode): a GEMV-style kernel that streams each weight row once
// with 16-byte loads and keeps the activations FP32; it is bound by memory
// bandwidth, as decode is. Larger M: cuBLASLt on tensor cores, activations
// rounded to BF16 (F16 for F16 weights) and FP32 accumulation and output,
// with the algorithm picked by cuBLASLt's heuristic once per shape.
#include <string.h>

#include "kernels/cuda/cuda_int.h"

extern "C" {
#include "common/log.h"
}

// Largest M the GEMV kernel takes: its accumulators live in registers.
#define GEMV_MAX_M CUDA_GEMV_MAX_M
#define GEMV_WARPS 8

// ---- small M --------------------------------------------------------------

__device__ __forceinline__ void load_vec(float *dst, const float *w) {
    float4 v = *(const float4 *)w;
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
}
__device__ __forceinline__ void load_vec(float *dst, const __nv_bfloat16 *w) {
    uint4 v = *(const uint4 *)w;
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        dst[2 * i] = f.x, dst[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void load_vec(float *dst, const __half *w) {
    uint4 v = *(const uint4 *)w;
    const __half2 *h = (const __half2 *)&v;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __half22float2(h[i]);
        dst[2 * i] = f.x, dst[2 * i + 1] = f.y;
    }
}

// Output columns n0 .. n0 + nr - 1 (nr <= R) of MT activation rows (K
// apart) for one warp: lanes walk the R weight rows (w, K apart) in
// 16-byte vectors, each activation vector read once and multiplied into
// all R rows; the warp's sums are left in acc (lane 0's are whole). vec:
// the row length is a multiple of the vector width (else one element per
// lane per step). Each sum is added in the same order whatever R is.
template <typename T, int MT, int R>
__device__ __forceinline__ void gemv_rows(float (&acc)[R][MT], const float *x, const T *w, int K, int vec, int lane,
                                          int nr) {
    constexpr int V = 16 / sizeof(T);
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int m = 0; m < MT; m++) acc[r][m] = 0.0f;
    if (vec) {
#pragma unroll(R >= 4 ? 1 : 4 / R)
        for (int k = lane * V; k < K; k += 32 * V) {
            float wv[R][V];
#pragma unroll
            for (int r = 0; r < R; r++)
                if (r < nr) load_vec(wv[r], w + (size_t)r * K + k);
#pragma unroll
            for (int m = 0; m < MT; m++) {
                const float *xr = x + (size_t)m * K + k;
#pragma unroll
                for (int i = 0; i < V; i += 4) {
                    float4 xv = *(const float4 *)(xr + i);
#pragma unroll
                    for (int r = 0; r < R; r++)
                        acc[r][m] += wv[r][i] * xv.x + wv[r][i + 1] * xv.y + wv[r][i + 2] * xv.z + wv[r][i + 3] * xv.w;
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            float wv[R];
#pragma unroll
            for (int r = 0; r < R; r++) wv[r] = r < nr ? cuda_to_f32(w[(size_t)r * K + k]) : 0.0f;
#pragma unroll
            for (int m = 0; m < MT; m++) {
                const float xv = x[(size_t)m * K + k];
#pragma unroll
                for (int r = 0; r < R; r++) acc[r][m] += wv[r] * xv;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int m = 0; m < MT; m++) acc[r][m] = cuda_warp_sum(acc[r][m]);
}

// Weight rows per warp for MT activation rows: enough that the FP32
// activations, read from L1 for every weight vector, stay within ~4 bytes
// per weight byte (2 * MT / R for BF16). One row per warp read 16 bytes of
// x per weight byte at MT = 8, more than L1 serves per SM while HBM feeds
// its share of weights (~128 vs ~14 bytes a clock on an H100).
template <int MT> __host__ __device__ constexpr int gemv_rows_per_warp() { return MT <= 2 ? 1 : MT <= 4 ? 2 : 4; }

// A warp per R = gemv_rows_per_warp output columns.
template <typename T, int MT>
__global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_kernel(float *out, const float *x, const T *w, int N, int K,
                                                               int vec) {
    constexpr int R = gemv_rows_per_warp<MT>();
    int lane = threadIdx.x & 31;
    int n0 = (blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * R;
    if (n0 >= N) return;
    int nr = N - n0 < R ? N - n0 : R;
    float acc[R][MT];
    gemv_rows<T, MT, R>(acc, x, w + (size_t)n0 * K, K, vec, lane, nr);
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (r < nr)
#pragma unroll
                for (int m = 0; m < MT; m++) out[(size_t)m * N + n0 + r] = acc[r][m];
}

// An expert's cnt rows from r0 at the narrowest MT that takes them in one
// pass, as cuda_wint.cu's wint_expert_rows: the weights read once, no
// products for rows the expert does not have. Rows past its last are read
// (the input has NB_MOE_PAD_ROWS to spare) and not stored.
template <typename T, int MT>
__device__ __forceinline__ void gemv_expert_rows(float *out, const float *x, const T *wr, int N, int K, int vec,
                                                 int lane, int n, int r0, int cnt) {
    if constexpr (MT > 1) {
        if (cnt <= MT / 2) {
            gemv_expert_rows<T, MT / 2>(out, x, wr, N, K, vec, lane, n, r0, cnt);
            return;
        }
    }
    for (int c0 = 0; c0 < cnt; c0 += MT) {
        float acc[1][MT];
        gemv_rows<T, MT, 1>(acc, x + (size_t)(r0 + c0) * K, wr, K, vec, lane, 1);
        if (lane == 0)
#pragma unroll
            for (int m = 0; m < MT; m++)
                if (c0 + m < cnt) out[(size_t)(r0 + c0 + m) * N + n] = acc[0][m];
    }
}

// The experts of a mixture (matmul_experts): block row j takes the j-th
// expert that has rows (groups as moe_route lays them out).
template <typename T, int MT>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_experts_kernel(float *out, const float *x, const void *const *w, const int32_t *groups, int E, int N, int K,
                        int vec) {
    const int j = blockIdx.y;
    if (j >= groups[E + 1]) return;
    const int e = groups[E + 2 + j], r0 = groups[e], cnt = groups[e + 1] - r0;
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    gemv_expert_rows<T, MT>(out, x, (const T *)w[e] + (size_t)n * K, N, K, vec, lane, n, r0, cnt);
}

template <typename T>
static void gemv_launch(cudaStream_t st, float *out, const float *x, const T *w, int M, int N, int K) {
    constexpr int V = 16 / sizeof(T);
    int vec = K % V == 0 && ((uintptr_t)x % 16) == 0 && ((uintptr_t)w % 16) == 0;
    dim3 block(GEMV_WARPS * 32);
    switch (M) {
#define CASE(m)                                                                                                       \
    case m: {                                                                                                         \
        const int per_block = GEMV_WARPS * gemv_rows_per_warp<m>();                                                  \
        gemv_kernel<T, m><<<(unsigned)((N + per_block - 1) / per_block), block, 0, st>>>(out, x, w, N, K, vec);      \
        break;                                                                                                        \
    }
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    default: abort();
    }
    CUDA_LAUNCHED();
}

template <typename T>
static void gemv_experts_launch(cudaStream_t st, float *out, const float *x, const void *const *w,
                                const int32_t *groups, int E, int N, int K, int vec, int mt, int max_active) {
    dim3 grid((unsigned)((N + GEMV_WARPS - 1) / GEMV_WARPS), (unsigned)max_active), block(GEMV_WARPS * 32);
    switch (mt) {
#define CASE(m) \
    case m: gemv_experts_kernel<T, m><<<grid, block, 0, st>>>(out, x, w, groups, E, N, K, vec); break;
        CASE(1) CASE(2) CASE(4) CASE(8)
#undef CASE
    default: abort();
    }
    CUDA_LAUNCHED();
}

int cuda_gemv_experts_ok(nb_dtype t) { return t == NB_F32 || t == NB_BF16 || t == NB_F16; }

void cuda_gemv_experts(cuda_backend *c, float *out, const float *x, const void *const *w_dev, int vec,
                       const int32_t *groups, int E, const nb_weight *w0, int n_tokens, int n_rows) {
    const int N = (int)w0->rows, K = (int)w0->cols;
    // rows per pass: the tokens (no expert has more), at most GEMV_MAX_M
    int mt = 1;
    while (mt < n_tokens && mt < GEMV_MAX_M) mt *= 2;
    const int max_active = E < n_rows ? E : n_rows;
    vec = vec && K % (16 / (int)nb_dtype_size(w0->dtype)) == 0 && (uintptr_t)x % 16 == 0;
    switch (w0->dtype) {
    case NB_F32: gemv_experts_launch<float>(c->stream, out, x, w_dev, groups, E, N, K, vec, mt, max_active); break;
    case NB_BF16:
        gemv_experts_launch<__nv_bfloat16>(c->stream, out, x, w_dev, groups, E, N, K, vec, mt, max_active);
        break;
    case NB_F16: gemv_experts_launch<__half>(c->stream, out, x, w_dev, groups, E, N, K, vec, mt, max_active); break;
    default: abort();
    }
}

// ---- larger M: cuBLASLt ---------------------------------------------------

struct cuda_gemm_algo {
    nb_dtype t;
    int M;
    int64_t N, K;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
    int fallback; // cuBLASLt found no algorithm for this shape
};

void cuda_gemm_algos_free(cuda_backend *c) {
    for (int i = 0; i < c->n_algos; i++) {
        cuda_gemm_algo *g = &c->algos[i];
        cublasLtMatrixLayoutDestroy(g->a);
        cublasLtMatrixLayoutDestroy(g->b);
        cublasLtMatrixLayoutDestroy(g->d);
        cublasLtMatmulDescDestroy(g->op);
    }
    free(c->algos);
    c->algos = NULL;
    c->n_algos = c->cap_algos = 0;
}

// Column-major view of the row-major product: D (N x M, ld N) =
// op(A) B with A = w as K x N (ld K) transposed, B = x as K x M (ld K).
static const cuda_gemm_algo *gemm_algo(cuda_backend *c, nb_dtype t, int M, int64_t N, int64_t K) {
    for (int i = 0; i < c->n_algos; i++) {
        cuda_gemm_algo *g = &c->algos[i];
        if (g->t == t && g->M == M && g->N == N && g->K == K) return g;
    }
    if (c->n_algos == c->cap_algos) {
        c->cap_algos = c->cap_algos ? 2 * c->cap_algos : 32;
        c->algos = (cuda_gemm_algo *)realloc(c->algos, sizeof(cuda_gemm_algo) * (size_t)c->cap_algos);
        if (!c->algos) abort();
    }
    cuda_gemm_algo *g = &c->algos[c->n_algos];
    memset(g, 0, sizeof *g);
    g->t = t, g->M = M, g->N = N, g->K = K;
    cudaDataType ab = t == NB_BF16 ? CUDA_R_16BF : t == NB_F16 ? CUDA_R_16F : CUDA_R_32F;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&g->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&g->a, ab, (uint64_t)K, (uint64_t)N, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&g->b, ab, (uint64_t)K, (uint64_t)M, K));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&g->d, CUDA_R_32F, (uint64_t)N, (uint64_t)M, N));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = c->lt_ws_size;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    // cuBLASLt answers "none" either with found = 0 or with
    // CUBLAS_STATUS_NOT_SUPPORTED ("no heuristic function available for
    // current configuration"): neither is an error here
    cublasStatus_t rc = cublasLtMatmulAlgoGetHeuristic(c->lt, g->op, g->a, g->b, g->d, g->d, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    // No algorithm (odd leading dimensions, say): the GEMV kernel takes the
    // product eight rows at a time.
    g->fallback = rc != CUBLAS_STATUS_SUCCESS || found < 1 || res.state != CUBLAS_STATUS_SUCCESS;
    if (!g->fallback) g->algo = res.algo;
    else if (!c->lt_none_said++)
        log_warn("cuda: cuBLASLt has no %s algorithm for %d x %lld x %lld (status %d, %d found): the GEMV kernel "
                 "takes it, and any other such shape (said once)", nb_dtype_name(t), M, (long long)N, (long long)K,
                 (int)rc, found);
    c->n_algos++;
    return g;
}

static void gemv_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M);

static void lt_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M) {
    const cuda_gemm_algo *g = gemm_algo(c, w->dtype, M, w->rows, w->cols);
    if (g->fallback) {
        for (int m0 = 0; m0 < M; m0 += GEMV_MAX_M) {
            int mt = M - m0 < GEMV_MAX_M ? M - m0 : GEMV_MAX_M;
            gemv_matmul(c, out + (size_t)m0 * w->rows, x + (size_t)m0 * w->cols, w, mt);
        }
        return;
    }
    const void *B = x;
    if (w->dtype != NB_F32) {
        size_t n = (size_t)M * (size_t)w->cols;
        cuda_scratch(c, &c->conv, &c->conv_cap, n * 2);
        cuda_convert(c, c->conv, w->dtype, x, n);
        B = c->conv;
    }
    float alpha = 1.0f, beta = 0.0f;
    CUBLAS_CHECK(cublasLtMatmul(c->lt, g->op, &alpha, w->data, g->a, B, g->b, &beta, out, g->d, out, g->d, &g->algo,
                                c->lt_ws, c->lt_ws_size, c->stream));
}

static void gemv_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M) {
    int N = (int)w->rows, K = (int)w->cols;
    switch (w->dtype) {
    case NB_F32: gemv_launch(c->stream, out, x, (const float *)w->data, M, N, K); break;
    case NB_BF16: gemv_launch(c->stream, out, x, (const __nv_bfloat16 *)w->data, M, N, K); break;
    case NB_F16: gemv_launch(c->stream, out, x, (const __half *)w->data, M, N, K); break;
    default:
        fprintf(stderr, "nibble: cuda matmul: %s weights are not supported\n", nb_dtype_name(w->dtype));
        abort();
    }
}

void cuda_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M) {
    if (M <= 0 || w->rows <= 0) return;
    switch (w->dtype) {
    case NB_WINT8:
    case NB_WINT4:
    case NB_WINT2: cuda_wint_matmul(c, out, x, w, M); return;
    case NB_FP8_B128: cuda_fp8_matmul(c, out, x, w, M); return;
    default: break;
    }
    if (M > GEMV_MAX_M) lt_matmul(c, out, x, w, M);
    else gemv_matmul(c, out, x, w, M);
}
