// Internal to kernels/cuda: the backend's state and the launchers each .cu
// file gives the others. C-style CUDA: plain structs, functions, templates
// only where a kernel is instantiated per element type.
#ifndef NB_CUDA_INT_H
#define NB_CUDA_INT_H

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

extern "C" {
#include "kernels/backend.h"
}

// An error inside an op is a bug or a dead device: report it once, with
// where it happened, and stop (the CPU backend aborts on OOM the same way).
#define CUDA_CHECK(call) cuda_check((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)
void cuda_check(cudaError_t rc, const char *what, const char *file, int line);
void cublas_check(cublasStatus_t rc, const char *what, const char *file, int line);
// Checks the launch just made (bad configuration shows here, not later).
#define CUDA_LAUNCHED() CUDA_CHECK(cudaGetLastError())

// Largest head_dim the attention kernels take.
#define CUDA_MAX_HEAD_DIM 256
// Query tokens per prefill attention tile.
#define CUDA_ATTN_TILE_TOKENS 16

// A prefill attention tile: up to CUDA_ATTN_TILE_TOKENS consecutive step
// tokens of one sequence.
typedef struct cuda_tile {
    int32_t tok0, n_tok;
} cuda_tile;

// The batch as the kernels see it: device arrays at addresses that stay put
// while recorded graphs exist (graphs bake pointers in).
typedef struct cuda_batch {
    int n_tokens, n_seqs;
    int bt_stride;                // row stride of block_tables (>= any batch's max_blocks)
    int n_tiles;
    int max_pos;                  // largest position in the step
    const int32_t *pos, *seq_of, *slot, *block_tables; // device
    const cuda_tile *tiles;       // device
} cuda_batch;

// A recorded decode step, replayed by key.
typedef struct cuda_graph {
    uint64_t key;
    cudaGraphExec_t exec;
} cuda_graph;

#define CUDA_MAX_GRAPHS 64

typedef struct cuda_gemm_algo cuda_gemm_algo; // cuda_matmul.cu

typedef struct cuda_backend {
    int device;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    size_t weight_bytes; // resident weights, for the start-up log

    // batch metadata: one pinned host image and its device copy
    char *meta_host, *meta_dev;
    size_t meta_cap;
    int cap_tokens, cap_seqs, bt_stride;
    cuda_batch batch;
    int has_batch;
    int32_t *host_pos; // host copy of the positions (tile building)

    // staging for ops that take host index arrays (embedding, gather, argmax)
    int32_t *idx_host, *idx_dev;
    size_t idx_cap;

    // scratch: activations converted for cuBLASLt, cuBLASLt workspace,
    // split-context attention partials
    void *conv;
    size_t conv_cap;
    void *lt_ws;
    size_t lt_ws_size;
    float *attn_part;
    size_t attn_part_cap;
    // Buffers replaced while graphs may still point at them: freed only
    // when the graphs go.
    void **retired;
    int n_retired, cap_retired;

    // graphs
    cuda_graph graphs[CUDA_MAX_GRAPHS];
    int n_graphs;
    uint64_t capturing; // key being recorded, 0 when none

    cuda_gemm_algo *algos; // cuBLASLt heuristic results per shape
    int n_algos, cap_algos;
} cuda_backend;

static inline cuda_backend *cuda_impl(nb_backend *b) { return (cuda_backend *)b->impl; }

// Makes *buf hold at least `bytes`; an outgrown buffer is retired, not
// freed, since recorded graphs may point at it.
void cuda_scratch(cuda_backend *c, void **buf, size_t *cap, size_t bytes);
// Drops every recorded graph and frees retired buffers.
void cuda_graphs_clear(cuda_backend *c);

// ---- device helpers shared by the kernel files ----

__device__ __forceinline__ float cuda_to_f32(float v) { return v; }
__device__ __forceinline__ float cuda_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float cuda_to_f32(__half v) { return __half2float(v); }

__device__ __forceinline__ float cuda_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float cuda_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. blockDim.x is a multiple of
// 32, at most 1024.
static __device__ float cuda_block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cuda_warp_sum(v);
    __syncthreads(); // part may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : 0.0f;
    return cuda_warp_sum(v);
}

static __device__ float cuda_block_max(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cuda_warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nw ? part[lane] : -INFINITY;
    return cuda_warp_max(v);
}

// ---- launchers (all enqueue on c->stream) ----

// cuda_ops.cu
void cuda_embedding(cuda_backend *c, float *out, const nb_weight *table, const int32_t *tokens_dev, int n);
void cuda_rmsnorm(cuda_backend *c, float *out, const float *x, const nb_weight *w, int n, float eps);
void cuda_add_rmsnorm(cuda_backend *c, float *out, float *x, const float *delta, const nb_weight *w, int n,
                      float eps);
void cuda_add_bias(cuda_backend *c, float *x, const nb_weight *bias, int M);
void cuda_add(cuda_backend *c, float *out, const float *a, const float *b, size_t n);
void cuda_silu_mul(cuda_backend *c, float *out, const float *gate, const float *up, size_t n);
void cuda_rope(cuda_backend *c, float *x, int n_heads, int head_dim, const float *inv_freq, int interleaved);
void cuda_softmax(cuda_backend *c, float *x, int n, int cols);
void cuda_gather_rows(cuda_backend *c, float *out, const float *x, const int32_t *rows_dev, int n_rows, int cols);
void cuda_argmax(cuda_backend *c, int32_t *ids_dev, const float *x, int n, int cols);
// x (FP32) to BF16 or F16, n elements
void cuda_convert(cuda_backend *c, void *out, nb_dtype t, const float *x, size_t n);

// cuda_matmul.cu
void cuda_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M);
void cuda_gemm_algos_free(cuda_backend *c);

// cuda_attention.cu
void cuda_kv_write(cuda_backend *c, void *k_cache, void *v_cache, const float *k, const float *v,
                   const nb_attn_shape *s);
void cuda_attention(cuda_backend *c, float *out, const float *q, const void *k_cache, const void *v_cache,
                    const nb_attn_shape *s);

#endif
