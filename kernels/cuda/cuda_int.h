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
// KV heads up to which the decode attention merges its partials itself
// (more: a merge kernel of its own).
#define CUDA_ATTN_MAX_KV 64
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

// A pinned host buffer and a device buffer of the same size, for ops that
// copy host arrays in (and results out). Grown only when idle: the owner
// has waited for the copies that used it. used: bytes handed out since the
// stream was last idle (the idx staging hands out consecutive pieces, so
// that staging one op's arrays never waits for the ops before it).
typedef struct cuda_staging {
    char *host, *dev;
    size_t cap, used;
} cuda_staging;

typedef struct cuda_backend {
    int device;
    int n_sm;     // multiprocessors, for kernels that size grids to fill the GPU
    cudaStream_t stream;
    cublasLtHandle_t lt;

    // batch metadata: one pinned host image and its device copy
    char *meta_host, *meta_dev;
    size_t meta_cap;
    int cap_tokens, cap_seqs, bt_stride;
    cuda_batch batch;
    int has_batch;
    int32_t *host_pos; // host copy of the positions (tile building)

    // staging for ops that take host index arrays (embedding, gather)
    cuda_staging idx;
    // pinned staging for weights repacked at load (cu_weight_pack)
    char *pack_host;
    size_t pack_cap;

    // scratch: activations converted for cuBLASLt, cuBLASLt workspace,
    // split-context attention partials
    void *conv;
    size_t conv_cap;
    void *lt_ws;
    size_t lt_ws_size;
    float *attn_part;
    size_t attn_part_cap;
    // one arrival counter per (token, kv head) of the decode attention,
    // [cap_tokens][CUDA_ATTN_MAX_KV], zero between launches (made with the
    // batch metadata, never while a step is being recorded)
    int *attn_cnt;
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
    int lt_none_said; // shapes cuBLASLt had no algorithm for are logged once

    // cuda_fp8.cu: its cuBLASLt descriptors per shape and its scratch
    // (quantized activations and their scales), freed by cuda_fp8_free
    struct cuda_fp8_state *fp8;
    // cuda_wint.cu: its scratch, freed by cuda_wint_free
    struct cuda_wint_state *wint;
    // cuda_wint_tc.cu: split-K partial sums and counters, freed by
    // cuda_wint_free (through cuda_wint_tc_free)
    struct cuda_wint_tc_state *wint_tc;
    // cuda_sample.cu: staging of the rows, their histories and the ids
    cuda_staging smp;
    // cuda_moe.cu: the expert counts, read back for matmul_experts' expert-
    // by-expert path
    cuda_staging moe;

    // cuda_comm.cu: tensor parallelism. The group this backend is a rank
    // of (NULL alone) and its NCCL communicator (an ncclComm_t, opaque here
    // so that only cuda_comm.cu sees NCCL's header; NULL once the group's
    // communicators are destroyed).
    struct cuda_comm_group *group;
    void *comm;
} cuda_backend;

static inline cuda_backend *cuda_impl(nb_backend *b) { return (cuda_backend *)b->impl; }

// Makes *buf hold at least `bytes`; an outgrown buffer is retired, not
// freed, since recorded graphs may point at it.
void cuda_scratch(cuda_backend *c, void **buf, size_t *cap, size_t bytes);
// Aborts, naming op, when a step is being recorded: ops that copy host
// arrays cannot be part of a recording.
void cuda_require_eager(cuda_backend *c, const char *op);
// Makes s hold at least `bytes` (at least 64 KiB, doubled when it grows).
void cuda_staging_reserve(cuda_staging *s, size_t bytes);
void cuda_staging_free(cuda_staging *s);
// Drops every recorded graph and frees retired buffers.
void cuda_graphs_clear(cuda_backend *c);
// Makes c's device the calling thread's current one and returns the device
// that was current, for cuda_device_leave to restore: the ops that run at
// load time or teardown (alloc, free, weight_load, mem_info, destroy) then
// work from any thread, attached to this rank or not. The ops of a step
// do not pay for it: the thread that drives a rank attaches to it.
int cuda_device_enter(const cuda_backend *c);
void cuda_device_leave(const cuda_backend *c, int prev);

// cuda_comm.cu: sums x[n] over the ranks of c's group in place, queued on
// c->stream (recorded when the stream is); nothing when c is alone.
void cuda_comm_all_reduce(cuda_backend *c, float *x, size_t n);
// ... and out[r*n ..] = rank r's in[n] (a copy alone).
void cuda_comm_all_gather(cuda_backend *c, float *out, const float *in, size_t n);
// Takes c out of its group (nothing when alone). The first rank of a group
// to leave destroys the group's communicators, all of them at once (NCCL's
// teardown is collective); the last one frees the group.
void cuda_comm_leave(cuda_backend *c);

// ---- device helpers shared by the kernel files ----

__device__ __forceinline__ float cuda_to_f32(float v) { return v; }
__device__ __forceinline__ float cuda_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float cuda_to_f32(__half v) { return __half2float(v); }

// silu(g) * u, as backend.h's silu_mul: one formula for every kernel that
// makes it, so that a fused product reads the values the op would write.
__device__ __forceinline__ float cuda_silu_mul1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ __forceinline__ float cuda_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float cuda_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Rotates pair i (of half = head_dim / 2) of the head at v in place by the
// angle pos * inv_freq[i], as Hugging Face and the CPU do: the angle a
// float32 product, then cos/sin in float32 (full-range, not the fast
// intrinsics: positions reach the hundreds of thousands of radians).
// interleaved = 0 pairs the two halves (NeoX/HF Llama), 1 adjacent values.
__device__ __forceinline__ void cuda_rope_pair(float *v, int i, int half, float pos, const float *inv_freq,
                                               int interleaved) {
    float a = pos * inv_freq[i];
    float cs = cosf(a), sn = sinf(a);
    int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
    float p = v[i0], q = v[i1];
    v[i0] = p * cs - q * sn;
    v[i1] = q * cs + p * sn;
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

// Lowest index among the maxima; NaN never wins (every comparison with it
// is false), as on the CPU.
__device__ __forceinline__ void cuda_argmax_merge(float &bv, int &bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

// Block-wide argmax of (bv, bi) pairs (start from -INFINITY, INT32_MAX);
// every thread gets the result.
static __device__ void cuda_block_argmax(float &bv, int &bi) {
    __shared__ float sv[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, bv, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        cuda_argmax_merge(bv, bi, v, i);
    }
    __syncthreads(); // sv/si may still be read by a previous call
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    bv = lane < nw ? sv[lane] : -INFINITY;
    bi = lane < nw ? si[lane] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, bv, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        cuda_argmax_merge(bv, bi, v, i);
    }
}

// ---- launchers (all enqueue on c->stream) ----

// cuda_ops.cu
void cuda_embedding(cuda_backend *c, float *out, const nb_weight *table, const int32_t *tokens_dev, int n);
void cuda_rmsnorm(cuda_backend *c, float *out, const float *x, const nb_weight *w, int n, float eps);
void cuda_add_rmsnorm(cuda_backend *c, float *out, float *x, const float *delta, const nb_weight *w, int n,
                      float eps);
void cuda_add_bias(cuda_backend *c, float *x, const nb_weight *bias, int M);
void cuda_add(cuda_backend *c, float *out, const float *a, const float *b, size_t n);
// n rows of cols; gate's and up's rows ld floats apart (backend.h's silu_mul)
void cuda_silu_mul(cuda_backend *c, float *out, const float *gate, const float *up, int n, int cols, int ld);
// token rows stride floats apart, the first n_heads * head_dim rotated
void cuda_rope(cuda_backend *c, float *x, int n_heads, int head_dim, int stride, const float *inv_freq,
               int interleaved);
void cuda_softmax(cuda_backend *c, float *x, int n, int cols);
void cuda_gather_rows(cuda_backend *c, float *out, const float *x, const int32_t *rows_dev, int n_rows, int cols);
// x (FP32) to BF16 or F16, n elements
void cuda_convert(cuda_backend *c, void *out, nb_dtype t, const float *x, size_t n);

// cuda_matmul.cu. Up to CUDA_GEMV_MAX_M rows, a GEMV that keeps the
// activations FP32; above, tensor cores (BF16 activations).
#define CUDA_GEMV_MAX_M 8
void cuda_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M);
void cuda_gemm_algos_free(cuda_backend *c);
// The experts of a mixture with F32/BF16/F16 weights (w_dev: their data
// pointers in device memory; w0 the first's descriptor), grouped as
// moe_route lays them out: the GEMV kernel, one block row per expert in use.
int cuda_gemv_experts_ok(nb_dtype t);
void cuda_gemv_experts(cuda_backend *c, float *out, const float *x, const void *const *w_dev, int vec,
                       const int32_t *groups, int E, const nb_weight *w0, int n_tokens, int n_rows);

// cuda_wint.cu: weight-only NB_WINT8 / NB_WINT4 / NB_WINT2 (quant/quant.h
// layouts), FP32 activations in and out, the same contract as cuda_matmul.
void cuda_wint_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M);
void cuda_wint_free(cuda_backend *c);
// The same for a mixture's experts in quant.h's layout: whether w can be
// one, the device table of n experts (cudaFree'd by the caller; chunked:
// all are read in 16-byte chunks) and their grouped product (as
// cuda_gemv_experts): tensor cores where cuda_experts_tc says so (for
// chunked experts), else the GEMV, any number of tokens.
int cuda_wint_experts_ok(const nb_weight *w);
// BF16 experts on the same tensor-core kernel (table: cuda_wint_experts_table
// of them, which also takes BF16; K % 8 == 0, every expert chunked).
int cuda_bf16_experts_mma_ok(const nb_weight *w);
void cuda_bf16_experts_mma(cuda_backend *c, float *out, const float *x, const void *table, const int32_t *groups, int E,
                           const nb_weight *w0, int n_rows);
void *cuda_wint_experts_table(cuda_backend *c, const nb_weight *w, int n, int *chunked);
void cuda_wint_experts(cuda_backend *c, float *out, const float *x, const void *table, int chunked,
                       const int32_t *groups, int E, const nb_weight *w0, int n_tokens, int n_rows);

// cuda_moe.cu: the mixture-of-experts ops of backend.h.
void cuda_moe_route(cuda_backend *c, int32_t *groups, int32_t *rows, int32_t *slot, float *w, const float *logits,
                    int n, const nb_moe_route *r);
void cuda_moe_combine(cuda_backend *c, float *out, const float *ye, const int32_t *slot, const float *w, int n, int K,
                      int cols);
void *cuda_experts_create(cuda_backend *c, const nb_weight *w, int n);
void cuda_experts_free(cuda_backend *c, void *set);
int cuda_experts_recordable(const void *set, int n_tokens);
void cuda_matmul_experts(cuda_backend *c, float *out, const float *x, const void *set, const int32_t *groups,
                         int n_tokens, int n_rows);

// cuda_wint_tc.cu: the same product for NB_WINT8 / NB_WINT4 weights in the
// tensor-core layout of quant/quant_tc.h (w->layout == NB_LAYOUT_TC), any M.
void cuda_wint_tc_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M);
// The same of silu(gate) * up (rows ld floats apart), made where the
// activations are loaded, for M up to TC_SILU_MAX_M (4) and weights in the
// layout: backend.h's matmul_silu (0 done, 1 declined, nothing done).
int cuda_wint_tc_matmul_silu(cuda_backend *c, float *out, const float *gate, const float *up, int ld,
                             const nb_weight *w, int M);
void cuda_wint_tc_free(cuda_backend *c);

// Whether a grouped expert product of n_rows rows over E experts goes to
// tensor cores (64-row tiles) rather than the GEMV (pass_rows rows a pass):
// when the experts average more than a pass. Below, both read each
// expert's weights once, and the GEMV is the kernel built to stream them
// (the tensor-core tile would be mostly padding rows; reasoned, not yet
// timed on a device), so a decode batch spread over many experts
// (Qwen3-30B-A3B: 128, 8 a token) stays on the GEMV up to 256 tokens.
// Decided from sizes known when a step is recorded, not from the counts.
static inline int cuda_experts_tc(int n_rows, int E, int pass_rows) { return n_rows > pass_rows * E; }

// cuda_fp8.cu: NB_FP8_B128 with activations quantized per token per 128
// columns (quant/quant.h), the same contract as cuda_matmul.
void cuda_fp8_matmul(cuda_backend *c, float *out, const float *x, const nb_weight *w, int M);
// The same of silu(gate) * up (rows ld floats apart), made where the
// activations are quantized: backend.h's matmul_silu.
void cuda_fp8_matmul_silu(cuda_backend *c, float *out, const float *gate, const float *up, int ld, const nb_weight *w,
                          int M);
void cuda_fp8_free(cuda_backend *c);
// cuda_fp8_small.cu: 1 to CUDA_FP8_SMALL_MAX_M quantized activation rows
// (codes xq [rows][K], scale of row m, block kb at xs[kb * ld + m]) times
// an FP8 weight (codes w [N][K], block scales ws) on FP8 tensor cores. The
// caller checks what it needs: compute capability 8.9+, K % 128 == 0,
// 16-byte aligned code rows.
#define CUDA_FP8_SMALL_MAX_M 16
void cuda_fp8_small(cudaStream_t st, float *out, const uint8_t *xq, const float *xs, int ld, int rows,
                    const uint8_t *w, const float *ws, int N, int K);
// The same for a mixture's experts (cuda_fp8_experts' grouped rows and
// device table; max_active: a bound on the experts in use).
struct cuda_fp8_expert {
    const uint8_t *w; // codes [N][K]
    const float *ws;  // block scales
};
void cuda_fp8_small_experts(cudaStream_t st, float *out, const uint8_t *xq, const float *xs, int ld,
                            const cuda_fp8_expert *tab, const int32_t *groups, int E, int max_active, int N, int K);
// A mixture's FP8 experts (as cuda_gemv_experts): the device table of n
// (cudaFree'd by the caller; vec: rows of whole 16-byte chunks) and one
// grouped launch, the grouped rows quantized once: tensor cores where
// *mma (vec, and a device with FP8 mma) and cuda_experts_tc say so, else
// the GEMV.
void *cuda_fp8_experts_table(cuda_backend *c, const nb_weight *w, int n, int *vec, int *mma);
void cuda_fp8_experts(cuda_backend *c, float *out, const float *x, const void *table, int vec, const int32_t *groups,
                      int E, const nb_weight *w0, int n_tokens, int n_rows);

// cuda_sample.cu: ids[r] = sample_row_ref of row r for n rows (host ids
// and rows); copies in and out and waits, so it cannot be recorded.
void cuda_sample(cuda_backend *c, int32_t *ids, float *x, int n, int cols, const nb_sample_row *rows);

// cuda_kv.cu: aborts on a shape the kernels do not take (a caller's bug)
void cuda_attn_check_shape(const char *op, const nb_attn_shape *s);
// k/v rows nb_attn_kv_stride(s) apart (backend.h's kv_write),
// and backend.h's rope_kv_write on fused q|k|v rows
void cuda_kv_write(cuda_backend *c, void *k_cache, void *v_cache, const float *k, const float *v,
                   const nb_attn_shape *s);
void cuda_rope_kv_write(cuda_backend *c, float *x, void *k_cache, void *v_cache, const nb_attn_shape *s,
                        const nb_weight *q_norm, const nb_weight *k_norm, float eps, const float *inv_freq,
                        int interleaved);
// cuda_attention.cu: q rows nb_attn_q_stride(s) apart, out packed
void cuda_attention(cuda_backend *c, float *out, const float *q, const void *k_cache, const void *v_cache,
                    const nb_attn_shape *s);

#endif
