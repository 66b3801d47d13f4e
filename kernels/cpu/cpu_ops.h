/* Kernels behind the CPU backend, shared by its files and by the tests.
 *
 * The vector paths are chosen at build time (-march=native): AVX-512F, else
 * AVX2+FMA, else portable C. The portable versions are always compiled; the
 * tests use them as a second reference. Every kernel accumulates in FP32 and
 * computes each output element in one fixed order, independent of how the
 * work is split into tiles or threads, so results do not depend on the thread
 * count. */
#ifndef NB_CPU_OPS_H
#define NB_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"
#include "kernels/cpu/threadpool.h"

/* Largest head_dim the attention and rope kernels take (their per-task
 * scratch lives on the stack). */
#define CPU_MAX_HEAD_DIM 1024

/* The all-reduce of a group of CPU backends (cpu_comm.c): n ranks share
 * one, each releases it when destroyed. */
typedef struct cpu_comm cpu_comm;
cpu_comm *cpu_comm_create(int n, nb_err *e);
void cpu_comm_release(cpu_comm *c);
/* Sums x[n] over the ranks in place; every rank calls it with its own x. */
void cpu_comm_all_reduce(cpu_comm *c, int rank, float *x, size_t n);
/* out[k*n ..] = rank k's in[n] for every rank k. */
void cpu_comm_all_gather(cpu_comm *c, int rank, float *out, const float *in, size_t n);

/* Name of the vector path compiled in: "avx512", "avx2" or "scalar". */
const char *cpu_simd_name(void);

/* out[i] = (float)src[i] for n elements of type t. */
void cpu_row_to_f32(float *out, const void *src, nb_dtype t, int64_t n);

/* out[m][n] = x[m] . w[n] for m in [m0,m1), n in [n0,n1); out and x have row
 * strides N = w->rows and K = w->cols. */
void cpu_matmul_block(float *out, const float *x, const nb_weight *w, int m0, int m1, int64_t n0,
                      int64_t n1);
/* The whole matmul out[M,N] = x[M,K] @ w^T, split over the pool. */
void cpu_matmul(threadpool *pool, float *out, const float *x, const nb_weight *w, int M);
/* Portable reference: the same product with plain loops, one thread. */
void cpu_matmul_scalar(float *out, const float *x, const nb_weight *w, int M);

/* Small vector helpers (the attention inner loops). */
float cpu_dot_f32(const float *a, const float *b, int n);
void cpu_axpy_f32(float *y, float a, const float *x, int n); /* y += a*x */
void cpu_scale_f32(float *y, float a, int n);                /* y *= a */
/* out = x / sqrt(mean(x^2) + eps) * w over one row of n (FP32 weights), in
 * Hugging Face's order; out may equal x. rmsnorm and rope_kv_write's head
 * norm share it, so a head normalized by either is the same bits. */
void cpu_rmsnorm_row(float *out, const float *x, const float *w, int n, float eps);

/* Rotary embedding, kv-cache write and paged attention over a batch
 * (kernels/cpu/cpu_attention.c); shapes as in backend.h. */
/* Optional per-head rmsnorm before rope (Qwen3's q/k norm): heads below
 * n_q by q_w, the others by k_w (FP32, head_dim each). */
typedef struct cpu_head_norm {
    const float *q_w, *k_w;
    int n_q;
    float eps;
} cpu_head_norm;
void cpu_rope(threadpool *pool, const nb_batch *batch, float *x, int n_heads, int head_dim, int stride,
              const float *inv_freq, int interleaved, const cpu_head_norm *norm);
void cpu_kv_write(const nb_batch *batch, void *k_cache, void *v_cache, const float *k,
                  const float *v, const nb_attn_shape *s);
void cpu_attention(threadpool *pool, const nb_batch *batch, float *out, const float *q,
                   const void *k_cache, const void *v_cache, const nb_attn_shape *s);
/* One cached K or V row (one token, one kv head) as FP32: a pointer into the
 * cache for F32, else decoded into buf (head_dim floats). */
const float *cpu_kv_row(const void *cache, const nb_attn_shape *s, size_t slot, int kvh, float *buf);

/* Mixture-of-experts ops (kernels/cpu/cpu_moe.c), as in backend.h. */
void cpu_moe_route(nb_backend *b, int32_t *groups, int32_t *rows, int32_t *slot, float *w, const float *logits, int n,
                   const nb_moe_route *r);
void *cpu_experts_create(nb_backend *b, const nb_weight *w, int n);
void cpu_experts_free(nb_backend *b, void *set);
void cpu_matmul_experts(nb_backend *b, float *out, const float *x, const void *set, const int32_t *groups,
                        int n_tokens, int n_rows);
int cpu_experts_recordable(nb_backend *b, const void *set, int n_tokens);
void cpu_moe_combine(nb_backend *b, float *out, const float *ye, const int32_t *slot, const float *w, int n, int K,
                     int cols);

#endif
