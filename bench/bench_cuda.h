/* Shared by the GPU benchmarks (bench/bench_cuda*.c): options, fatal
 * errors, seeded data, timing of backend ops and of the cuBLAS reference,
 * batches and KV caches. What they measure and how is described at the top
 * of bench/bench_cuda.c. */
#ifndef NB_BENCH_CUDA_H
#define NB_BENCH_CUDA_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/backend.h"

/* Llama-3-8B */
#define HIDDEN 4096
#define INTER 14336
#define N_HEADS 32
#define N_KV 8
#define HEAD_DIM 128
#define ROPE_THETA 500000.0
#define RMS_EPS 1e-5f

/* The command line's settings (the process configuration). */
typedef struct bench_options {
    int device;
    int graphs;      /* record timed loops as graphs */
    double min_time; /* seconds of timed loop per figure */
    /* --smoke: every figure on small sizes (model widths / SMOKE_DIV, short
     * lists of M, contexts and tokens), for the CPU emulator (make test):
     * proves that each runs and agrees with its reference; the times mean
     * nothing */
    int smoke;
    uint64_t next_key; /* graph key of the next recorded loop */
    int mismatches;    /* figures whose check failed (bench_check) */
    size_t l2_bytes;   /* the device's L2 cache (bench_copies) */
} bench_options;
extern bench_options bench_opts;
#define SMOKE_DIV 16

/* How many copies of an operand of `bytes` a timed loop cycles through so
 * that together they are twice the L2 cache: each call then reads its
 * operand from memory, as a decode step reads each layer's weights once,
 * and not from what the previous calls left in L2 (a 4096 x 4096 WINT4
 * weight is 8 MiB; an H100's L2 holds 50). At most BENCH_MAX_COPIES (2
 * under --smoke, which only proves the cycling). */
#define BENCH_MAX_COPIES 64
int bench_copies(double bytes);

/* A model width (HIDDEN, INTER, a linear's N or K) at the run's scale. */
int bench_dim(int full);

/* A list of sizes: the full one, or under --smoke the short one. */
typedef struct bench_list {
    const int *v;
    int n;
} bench_list;
#define BENCH_PICK(full_, short_)                                                                                      \
    (bench_opts.smoke ? (bench_list){(short_), (int)(sizeof(short_) / sizeof((short_)[0]))}                             \
                      : (bench_list){(full_), (int)(sizeof(full_) / sizeof((full_)[0]))})
int bench_list_max(bench_list l);

/* The Llama-3-8B linear shapes [N out][K in] the matmul benchmarks use
 * (under --smoke, N and K / SMOKE_DIV: multiples of 128 still). */
typedef struct bench_shape {
    const char *name;
    int N, K;
} bench_shape;
#define BENCH_N_SHAPES 4
bench_shape bench_shape_at(int i);
/* The largest M*K, M*N and N*K over the shapes at M = max_m: buffer sizes
 * that serve every shape. */
void bench_shapes_max(int max_m, size_t *mk, size_t *mn, size_t *nk);
/* "" if err (a relative error) is within tol, else "  MISMATCH", counted in
 * bench_opts.mismatches (bench_cuda then exits non-zero). */
const char *bench_check(double err, double tol);

void bench_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
#define CK(call) bench_ck_cuda((call), #call, __FILE__, __LINE__)
#define CKB(call) bench_ck_cublas((call), #call, __FILE__, __LINE__)
void bench_ck_cuda(cudaError_t rc, const char *what, const char *file, int line);
void bench_ck_cublas(cublasStatus_t rc, const char *what, const char *file, int line);
int bench_clampi(double v, int lo, int hi);

/* seeded xorshift64 data */
uint64_t bench_rand_u64(void);
float bench_frand(void); /* uniform in [-1, 1) */
int32_t bench_rand_token(int vocab);
/* n host floats that BF16 represents exactly (so FP32 and BF16 activations
 * hold the same values), scaled by amp; bf16 (if not NULL) gets them too. */
void bench_fill_bf16_exact(float *f, uint16_t *bf16, size_t n, float amp);
/* A backend buffer of n random floats in [-amp, amp). */
float *bench_dev_random(nb_backend *b, size_t n, float amp);

/* Device-to-device copy bandwidth, bytes read + written per second (printed). */
double bench_copy_bandwidth(void);
void bench_print_bw(const char *what, double sec, double bytes, double bw);

/* one backend op call, timed by bench_time_op */
typedef enum { K_MATMUL, K_RMSNORM, K_ADD_RMSNORM, K_ROPE, K_SILU_MUL, K_KV_WRITE, K_ATTENTION, K_EXPERTS } op_kind;

typedef struct op_call {
    op_kind kind;
    nb_backend *b;
    float *out, *x, *y; /* y: second input (delta, up, v) */
    /* matmul: n_rot copies of the weight, call i takes w[i % n_rot]; the
     * norms: w[0] */
    const nb_weight *w;
    int n_rot;          /* copies cycled through (bench_copies); 0 or 1: one */
    int n;              /* M, rows */
    int cols;           /* silu_mul: columns of its n packed rows */
    int heads;          /* rope (packed rows) */
    const float *inv_freq;
    void *kc, *vc;         /* attention: n_rot caches, kv_stride bytes apart */
    size_t kv_stride;
    nb_attn_shape s;
    /* experts: the set, n_rot routings of moe_route's groups groups_stride
     * ints apart, n_tokens (n: rows) */
    const void *set;
    const int32_t *groups;
    size_t groups_stride;
    int n_tokens;
} op_call;

/* cuBLAS on a stream of its own, with its own workspace (nothing to
 * allocate while a graph records) and device buffers, all owned here. */
typedef struct gemm_ref {
    cublasHandle_t h;
    cudaStream_t st;
    void *ws;
    float *c;        /* [M][N] FP32 */
    uint16_t *w, *x; /* BF16 n_rot x [N][K] (call i takes copy i % n_rot), [M][K] */
    size_t w_cap;    /* elements w holds */
    int n_rot;
    int M, N, K;
} gemm_ref;

typedef struct bench_batch {
    nb_batch b;
    int32_t *pos, *seq_of, *slot, *tables;
} bench_batch;

/* Call i of a timed loop (the copy of its operand it takes). */
void bench_op_run(const op_call *c, int i);
/* Seconds per call of c. graph: record the inner loop as a backend graph
 * (when --no-graph is not given). Any set_batch the op needs is done. */
double bench_time_op(const op_call *c, int graph);

/* Buffers for products up to max_mn outputs and max_mk activations (the
 * weights' copies are sized by bench_gemm_upload). */
void bench_gemm_open(gemm_ref *r, size_t max_mn, size_t max_mk);
void bench_gemm_close(gemm_ref *r);
/* Copies BF16 weights [nk] (as many copies as bench_copies asks) and
 * activations [mk] from the host. */
void bench_gemm_upload(gemm_ref *r, const uint16_t *w, size_t nk, const uint16_t *x, size_t mk);
/* Row-major out[M][N] = x[M][K] w[N][K]^T with cublasGemmEx, BF16 in, FP32
 * out, on copy i % n_rot of the weight; timed with CUDA events on r->st. */
cublasStatus_t bench_gemm_run(const gemm_ref *r, int i);
double bench_time_gemm(const gemm_ref *r);

void bench_batch_free(bench_batch *bb);
/* n_seqs sequences of ctx tokens each, one query token per sequence at
 * position ctx - 1; sequence s owns blocks s * bps .. s * bps + bps - 1. */
void bench_batch_decode(bench_batch *bb, int n_seqs, int ctx);
/* One sequence of n tokens at positions 0..n-1 in blocks 0, 1, ... */
void bench_batch_prefill(bench_batch *bb, int n);
/* Bytes of one of K or V for one token of one layer. */
size_t bench_kv_token_bytes(const nb_attn_shape *s);
/* Writes random K/V into the first n_slots slots of a cache through
 * kv_write (the values are then valid for every cache type, scales
 * included). */
void bench_fill_kv(nb_backend *b, void *kc, void *vc, int n_slots, const nb_attn_shape *s);

/* bench_cuda_ops.c: --ops */
void bench_ops(double bw);
/* bench_cuda_quant.c: the quantized formats' matmul against cuBLAS BF16 */
void bench_quant_matmul(nb_backend *b, double bw);
/* A host weight [N][K] of dtype t (BF16 or a quantized format; group 0:
 * per channel where the format has groups): random packed values and
 * scales that spread weights about like N(0, 0.02). Freed by
 * bench_host_weight_free; a device copy (backend_weight_load*) by
 * bench_weight_free. */
nb_weight bench_host_weight(nb_dtype t, int group, int N, int K);
void bench_host_weight_free(nb_weight *h);
void bench_weight_free(nb_backend *b, nb_weight *d);
/* Device copies of a host weight as the model loader makes them
 * (backend_weight_load: WINT8 and WINT4 in the tensor-core layout), *n of
 * them as bench_copies asks for its resident bytes; freed by
 * bench_weight_copies_free. */
nb_weight *bench_weight_copies(nb_backend *b, const nb_weight *h, int *n);
void bench_weight_copies_free(nb_backend *b, nb_weight *d, int n);
/* max |a - b| / max |b| over n values (NaN if a has one) */
double bench_rel_err(const float *a, const float *b, size_t n);
/* bench_cuda_moe.c: grouped expert products (matmul_experts) */
void bench_moe_experts(nb_backend *b, double bw);

#endif
