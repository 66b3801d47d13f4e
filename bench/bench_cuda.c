/* GPU benchmarks of the CUDA backend (issue 5).
 *
 *   build/bench/bench_cuda [--ops] [--model DIR] [options]
 *
 * Prints, on the device named in its first line:
 *  - the measured device copy bandwidth (cudaMemcpy device to device of
 *    1 GiB, read + written bytes per second, best of 5): the roofline that
 *    every "of copy" fraction below divides by. A kernel that only reads can
 *    exceed it (its traffic is one-way), so fractions above 1 are possible;
 *  - --ops: per-op times of the backend ops (kernels/backend.h) on
 *    Llama-3-8B shapes: matmul against a plain cublasGemmEx (BF16 x BF16 ->
 *    FP32, CUBLAS_COMPUTE_32F, default algorithm, BF16 activations) on the
 *    same shapes, rmsnorm, add_rmsnorm, rope, silu_mul, kv_write, decode
 *    attention and prefill attention;
 *  - --model DIR: end-to-end decode tokens/s of model_forward at each
 *    --batches size, against the bandwidth bound (weight + KV bytes read per
 *    step / copy bandwidth).
 *
 * Timing. The backend's ops run on a stream of its own that backend.h does
 * not expose, so CUDA events cannot be placed in it; a backend op is timed
 * on the host clock between two ops->sync() around many calls. Unless
 * --no-graph is given, the calls are recorded once with ops->graph_begin /
 * graph_end (as model_forward records a decode step) and replayed, so
 * launch gaps do not count, as in a decode step. cuBLAS runs on our own
 * stream, timed with CUDA events, and is recorded into a CUDA graph the same
 * way. Every figure is the average over a loop of at least --min-time
 * seconds after a warm-up. Prefill attention is timed without graphs (one
 * call is long; the model never records prefill steps).
 */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "engine/model/config.h"
#include "engine/model/model.h"
#include "engine/model/safetensors.h"
#include "kernels/backend.h"

/* Llama-3-8B */
#define HIDDEN 4096
#define INTER 14336
#define N_HEADS 32
#define N_KV 8
#define HEAD_DIM 128
#define ROPE_THETA 500000.0
#define RMS_EPS 1e-5f

#define MAX_BATCHES 16

static struct {
    int device;
    int graphs;      /* record timed loops as graphs */
    double min_time; /* seconds of timed loop per figure */
    uint64_t next_key;
} g = {0, 1, 0.1, (uint64_t)1 << 62};

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fputs("bench_cuda: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

#define CK(call) ck_cuda((call), #call, __LINE__)
#define CKB(call) ck_cublas((call), #call, __LINE__)
static void ck_cuda(cudaError_t rc, const char *what, int line) {
    if (rc != cudaSuccess) die("%s (bench_cuda.c:%d): %s", what, line, cudaGetErrorString(rc));
}
static void ck_cublas(cublasStatus_t rc, const char *what, int line) {
    if (rc != CUBLAS_STATUS_SUCCESS) die("%s (bench_cuda.c:%d): %s", what, line, cublasGetStatusString(rc));
}

static int clampi(double v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : (int)v; }

/* xorshift64 */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t rand_u64(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
/* uniform in [-1, 1) */
static float frand(void) { return (float)((double)(rand_u64() >> 40) * (2.0 / 16777216.0) - 1.0); }
static int32_t rand_token(int vocab) { return (int32_t)(rand_u64() % (uint64_t)vocab); }

/* n host floats that BF16 represents exactly (so FP32 and BF16 activations
 * hold the same values), scaled by amp; bf16 (if not NULL) gets them too. */
static void fill_bf16_exact(float *f, uint16_t *bf16, size_t n, float amp) {
    for (size_t i = 0; i < n; i++) {
        uint16_t h = f32_to_bf16(amp * frand());
        if (f) f[i] = bf16_to_f32(h);
        if (bf16) bf16[i] = h;
    }
}

/* A backend buffer of n random floats in [-amp, amp). */
static float *dev_random(nb_backend *b, size_t n, float amp) {
    float *h = xmalloc(sizeof(float) * n), *d = b->ops->alloc(b, sizeof(float) * n);
    fill_bf16_exact(h, NULL, n, amp);
    b->ops->upload(b, d, h, sizeof(float) * n);
    free(h);
    return d;
}

/* ---- copy bandwidth ------------------------------------------------------ */

static double copy_bandwidth(void) {
    size_t bytes = (size_t)1 << 30;
    void *src = NULL, *dst = NULL;
    cudaStream_t st;
    cudaEvent_t e0, e1;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaMalloc(&src, bytes));
    CK(cudaMalloc(&dst, bytes));
    CK(cudaMemsetAsync(src, 1, bytes, st));
    CK(cudaMemsetAsync(dst, 0, bytes, st));
    float best = 1e30f;
    for (int i = 0; i < 6; i++) { /* the first is a warm-up */
        float ms = 0;
        CK(cudaEventRecord(e0, st));
        CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (i > 0 && ms < best) best = ms;
    }
    CK(cudaFree(src));
    CK(cudaFree(dst));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaStreamDestroy(st));
    return 2.0 * (double)bytes / (best * 1e-3);
}

/* ---- timing backend ops --------------------------------------------------- */

typedef enum { K_MATMUL, K_RMSNORM, K_ADD_RMSNORM, K_ROPE, K_SILU_MUL, K_KV_WRITE, K_ATTENTION } op_kind;

typedef struct op_call {
    op_kind kind;
    nb_backend *b;
    float *out, *x, *y; /* y: second input (delta, up, v) */
    const nb_weight *w;
    int n;              /* M, rows */
    size_t count;       /* silu_mul elements */
    int heads;          /* rope */
    const float *inv_freq;
    void *kc, *vc;
    nb_attn_shape s;
} op_call;

static void op_run(const op_call *c) {
    const nb_backend_ops *o = c->b->ops;
    switch (c->kind) {
    case K_MATMUL: o->matmul(c->b, c->out, c->x, c->w, c->n); break;
    case K_RMSNORM: o->rmsnorm(c->b, c->out, c->x, c->w, c->n, RMS_EPS); break;
    case K_ADD_RMSNORM: o->add_rmsnorm(c->b, c->out, c->x, c->y, c->w, c->n, RMS_EPS); break;
    case K_ROPE: o->rope(c->b, c->x, c->heads, HEAD_DIM, c->inv_freq, 0); break;
    case K_SILU_MUL: o->silu_mul(c->b, c->out, c->x, c->y, c->count); break;
    case K_KV_WRITE: o->kv_write(c->b, c->kc, c->vc, c->x, c->y, &c->s); break;
    case K_ATTENTION: o->attention(c->b, c->out, c->x, c->kc, c->vc, &c->s); break;
    }
}

/* Seconds per call of c. graph: record the inner loop as a backend graph
 * (when --no-graph is not given). Any set_batch the op needs is done. */
static double time_op(const op_call *c, int graph) {
    nb_backend *b = c->b;
    const nb_backend_ops *o = b->ops;
    for (int i = 0; i < 2; i++) op_run(c);
    o->sync(b);
    double t0 = util_now();
    for (int i = 0; i < 3; i++) op_run(c);
    o->sync(b);
    double est = (util_now() - t0) / 3;
    if (est < 1e-7) est = 1e-7;
    graph = graph && g.graphs;
    int inner = graph ? clampi(2e-3 / est, 1, 100) : 1;
    uint64_t key = graph ? g.next_key++ : 0;
    if (graph) { /* record (and run once) */
        if (!o->graph_begin(b, key)) {
            for (int i = 0; i < inner; i++) op_run(c);
            o->graph_end(b);
        }
        o->sync(b);
    }
    int reps = clampi(g.min_time / (est * inner), 3, 100000);
    t0 = util_now();
    for (int r = 0; r < reps; r++) {
        if (graph && o->graph_begin(b, key)) continue; /* replayed */
        for (int i = 0; i < inner; i++) op_run(c);
        if (graph) o->graph_end(b);
    }
    o->sync(b);
    return (util_now() - t0) / ((double)reps * inner);
}

/* ---- cuBLAS reference ------------------------------------------------------ */

typedef struct gemm_ref {
    cublasHandle_t h;
    cudaStream_t st;
    float *c;             /* [M][N] FP32 */
    const uint16_t *w, *x; /* BF16 [N][K], [M][K] */
    int M, N, K;
} gemm_ref;

/* Row-major out[M][N] = x[M][K] w[N][K]^T, i.e. column-major
 * C (N x M) = W^T (N x K) X (K x M). */
static cublasStatus_t gemm_run(const gemm_ref *r) {
    const float alpha = 1.0f, beta = 0.0f;
    return cublasGemmEx(r->h, CUBLAS_OP_T, CUBLAS_OP_N, r->N, r->M, r->K, &alpha, r->w, CUDA_R_16BF, r->K, r->x,
                        CUDA_R_16BF, r->K, &beta, r->c, CUDA_R_32F, r->N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

static double time_gemm(const gemm_ref *r) {
    cudaEvent_t e0, e1;
    float ms = 0;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 2; i++) CKB(gemm_run(r));
    CK(cudaEventRecord(e0, r->st));
    for (int i = 0; i < 3; i++) CKB(gemm_run(r));
    CK(cudaEventRecord(e1, r->st));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    double est = ms * 1e-3 / 3;
    if (est < 1e-7) est = 1e-7;
    int inner = 1;
    cudaGraphExec_t exec = NULL;
    if (g.graphs) {
        inner = clampi(2e-3 / est, 1, 100);
        cudaGraph_t gr = NULL;
        int ok = cudaStreamBeginCapture(r->st, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
        if (ok) {
            for (int i = 0; i < inner && ok; i++) ok = gemm_run(r) == CUBLAS_STATUS_SUCCESS;
            if (cudaStreamEndCapture(r->st, &gr) != cudaSuccess) ok = 0;
        }
        if (ok && cudaGraphInstantiate(&exec, gr, 0) != cudaSuccess) ok = 0;
        if (gr) CK(cudaGraphDestroy(gr));
        if (!ok) {
            static int said;
            (void)cudaGetLastError();
            if (exec) CK(cudaGraphExecDestroy(exec));
            exec = NULL;
            inner = 1;
            if (!said++) fprintf(stderr, "bench_cuda: cublasGemmEx could not be recorded into a graph; timed eagerly\n");
        }
    }
    int reps = clampi(g.min_time / (est * inner), 3, 100000);
    CK(cudaEventRecord(e0, r->st));
    for (int i = 0; i < reps; i++) {
        if (exec) CK(cudaGraphLaunch(exec, r->st));
        else CKB(gemm_run(r));
    }
    CK(cudaEventRecord(e1, r->st));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (exec) CK(cudaGraphExecDestroy(exec));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return ms * 1e-3 / ((double)reps * inner);
}

/* ---- batches ---------------------------------------------------------------- */

typedef struct bench_batch {
    nb_batch b;
    int32_t *pos, *seq_of, *slot, *tables;
} bench_batch;

static void batch_free(bench_batch *bb) {
    free(bb->pos);
    free(bb->seq_of);
    free(bb->slot);
    free(bb->tables);
    memset(bb, 0, sizeof *bb);
}

/* n_seqs sequences of ctx tokens each, one query token per sequence at
 * position ctx - 1; sequence s owns blocks s * bps .. s * bps + bps - 1. */
static void batch_decode(bench_batch *bb, int n_seqs, int ctx) {
    int bps = (ctx + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE, p = ctx - 1;
    bb->pos = xmalloc(sizeof(int32_t) * (size_t)n_seqs);
    bb->seq_of = xmalloc(sizeof(int32_t) * (size_t)n_seqs);
    bb->slot = xmalloc(sizeof(int32_t) * (size_t)n_seqs);
    bb->tables = xmalloc(sizeof(int32_t) * (size_t)n_seqs * (size_t)bps);
    for (int s = 0; s < n_seqs; s++) {
        for (int j = 0; j < bps; j++) bb->tables[(size_t)s * bps + j] = s * bps + j;
        bb->pos[s] = p;
        bb->seq_of[s] = s;
        bb->slot[s] = bb->tables[(size_t)s * bps + p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
    }
    bb->b = (nb_batch){n_seqs, bb->pos, bb->seq_of, bb->slot, n_seqs, bps, bb->tables};
}

/* One sequence of n tokens at positions 0..n-1 in blocks 0, 1, ... */
static void batch_prefill(bench_batch *bb, int n) {
    int bps = (n + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    bb->pos = xmalloc(sizeof(int32_t) * (size_t)n);
    bb->seq_of = xmalloc(sizeof(int32_t) * (size_t)n);
    bb->slot = xmalloc(sizeof(int32_t) * (size_t)n);
    bb->tables = xmalloc(sizeof(int32_t) * (size_t)bps);
    for (int j = 0; j < bps; j++) bb->tables[j] = j;
    for (int t = 0; t < n; t++) {
        bb->pos[t] = t;
        bb->seq_of[t] = 0;
        bb->slot[t] = t;
    }
    bb->b = (nb_batch){n, bb->pos, bb->seq_of, bb->slot, 1, bps, bb->tables};
}

static size_t kv_token_bytes(const nb_attn_shape *s) { /* one of K or V, one token, one layer */
    return nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim) / NB_KV_BLOCK_SIZE;
}

/* Writes random K/V into the first n_slots slots of a cache through
 * kv_write, 4096 tokens at a time (the values are then valid for every
 * cache type, scales included). */
static void fill_kv(nb_backend *b, void *kc, void *vc, int n_slots, const nb_attn_shape *s) {
    enum { CHUNK = 4096 };
    size_t kvd = (size_t)s->n_kv_heads * s->head_dim;
    float *k = dev_random(b, CHUNK * kvd, 1.0f), *v = dev_random(b, CHUNK * kvd, 1.0f);
    int32_t *pos = xmalloc(sizeof(int32_t) * CHUNK), *seq = xcalloc(CHUNK, sizeof(int32_t)),
            *slot = xmalloc(sizeof(int32_t) * CHUNK), table = 0;
    for (int t0 = 0; t0 < n_slots; t0 += CHUNK) {
        int n = n_slots - t0 < CHUNK ? n_slots - t0 : CHUNK;
        for (int t = 0; t < n; t++) pos[t] = t, slot[t] = t0 + t;
        nb_batch bt = {n, pos, seq, slot, 1, 1, &table};
        b->ops->set_batch(b, &bt);
        b->ops->kv_write(b, kc, vc, k, v, s);
    }
    b->ops->sync(b);
    b->ops->free(b, k);
    b->ops->free(b, v);
    free(pos);
    free(seq);
    free(slot);
}

/* ---- the op benchmarks ---------------------------------------------------------- */

static void print_bw(const char *what, double sec, double bytes, double bw) {
    printf("  %-34s %10.2f us %9.1f GB/s %8.2f\n", what, sec * 1e6, bytes / sec / 1e9, bytes / sec / bw);
}

/* Returns the best cuBLAS TFLOP/s seen (the prefill reference). */
static double bench_matmul(nb_backend *b, double bw) {
    static const struct {
        const char *name;
        int N, K;
    } shapes[] = {{"qkv_proj", 6144, 4096}, {"o_proj", 4096, 4096}, {"gate_up_proj", 28672, 4096},
                  {"down_proj", 4096, 14336}};
    static const int Ms[] = {1, 8, 32, 64, 512, 4096};
    const int n_shapes = (int)(sizeof shapes / sizeof shapes[0]), n_ms = (int)(sizeof Ms / sizeof Ms[0]);
    const nb_backend_ops *o = b->ops;
    size_t max_mk = 0, max_mn = 0, max_nk = 0;
    int max_m = Ms[n_ms - 1];
    for (int i = 0; i < n_shapes; i++) {
        size_t mk = (size_t)max_m * shapes[i].K, mn = (size_t)max_m * shapes[i].N, nk = (size_t)shapes[i].N * shapes[i].K;
        if (mk > max_mk) max_mk = mk;
        if (mn > max_mn) max_mn = mn;
        if (nk > max_nk) max_nk = nk;
    }
    gemm_ref r;
    memset(&r, 0, sizeof r);
    void *ws = NULL;
    size_t ws_bytes = (size_t)32 << 20;
    CKB(cublasCreate(&r.h));
    CK(cudaStreamCreateWithFlags(&r.st, cudaStreamNonBlocking));
    CKB(cublasSetStream(r.h, r.st));
    CK(cudaMalloc(&ws, ws_bytes)); /* our own workspace: nothing to allocate while a graph records */
    CKB(cublasSetWorkspace(r.h, ws, ws_bytes));
    uint16_t *xb_dev = NULL, *w_dev = NULL;
    CK(cudaMalloc((void **)&r.c, sizeof(float) * max_mn));
    CK(cudaMalloc((void **)&xb_dev, 2 * max_mk));
    CK(cudaMalloc((void **)&w_dev, 2 * max_nk));
    float *x = o->alloc(b, sizeof(float) * max_mk), *out = o->alloc(b, sizeof(float) * max_mn);
    float *hx = xmalloc(sizeof(float) * max_mk), *ha = xmalloc(sizeof(float) * max_mn),
          *hb = xmalloc(sizeof(float) * max_mn);
    uint16_t *hxb = xmalloc(2 * max_mk), *hw = xmalloc(2 * max_nk);
    double best_tflops = 0;

    printf("\nmatmul: nibble ops->matmul (BF16 weights, FP32 activations and output) vs cublasGemmEx\n"
           "(BF16 weights and activations, FP32 output, CUBLAS_COMPUTE_32F, default algorithm); time per call;\n"
           "x cuBLAS = cuBLAS time / nibble time (above 1: nibble faster); weight GB/s and of copy for M <= 64;\n"
           "rel err = max |nibble - cuBLAS| / max |cuBLAS| on the same BF16-exact inputs\n");
    printf("  %-13s %6s %6s %5s %11s %11s %9s %8s %12s %8s %9s\n", "shape", "N", "K", "M", "nibble us", "cuBLAS us",
           "x cuBLAS", "TFLOP/s", "weight GB/s", "of copy", "rel err");
    for (int si = 0; si < n_shapes; si++) {
        int N = shapes[si].N, K = shapes[si].K;
        size_t nk = (size_t)N * K, mk = (size_t)max_m * K;
        fill_bf16_exact(NULL, hw, nk, 0.035f); /* about the spread of N(0, 0.02) */
        fill_bf16_exact(hx, hxb, mk, 1.0f);
        nb_weight w = {NB_BF16, N, K, o->weight_load(b, hw, 2 * nk), NULL, NULL, 0};
        CK(cudaMemcpyAsync(w_dev, hw, 2 * nk, cudaMemcpyHostToDevice, r.st));
        CK(cudaMemcpyAsync(xb_dev, hxb, 2 * mk, cudaMemcpyHostToDevice, r.st));
        CK(cudaStreamSynchronize(r.st));
        o->upload(b, x, hx, sizeof(float) * mk);
        for (int mi = 0; mi < n_ms; mi++) {
            int M = Ms[mi];
            size_t mn = (size_t)M * N;
            r.w = w_dev, r.x = xb_dev, r.M = M, r.N = N, r.K = K;
            /* correctness of what is timed */
            o->matmul(b, out, x, &w, M);
            o->download(b, ha, out, sizeof(float) * mn);
            CKB(gemm_run(&r));
            CK(cudaMemcpyAsync(hb, r.c, sizeof(float) * mn, cudaMemcpyDeviceToHost, r.st));
            CK(cudaStreamSynchronize(r.st));
            double maxd = 0, maxr = 0;
            int nan = 0;
            for (size_t i = 0; i < mn; i++) {
                double d = fabs((double)ha[i] - hb[i]), a = fabs((double)hb[i]);
                if (isnan(d)) nan = 1;
                if (d > maxd) maxd = d;
                if (a > maxr) maxr = a;
            }
            double rel = nan ? NAN : maxr > 0 ? maxd / maxr : maxd;

            op_call c = {.kind = K_MATMUL, .b = b, .out = out, .x = x, .w = &w, .n = M};
            double tn = time_op(&c, 1), tc = time_gemm(&r);
            double flops = 2.0 * M * (double)N * K, wbytes = 2.0 * (double)nk;
            if (flops / tc / 1e12 > best_tflops) best_tflops = flops / tc / 1e12;
            printf("  %-13s %6d %6d %5d %11.2f %11.2f %9.2f %8.1f", shapes[si].name, N, K, M, tn * 1e6, tc * 1e6, tc / tn,
                   flops / tn / 1e12);
            if (M <= 64) printf(" %12.1f %8.2f", wbytes / tn / 1e9, wbytes / tn / bw);
            else printf(" %12s %8s", "-", "-");
            printf(" %9.1e%s\n", rel, isnan(rel) || rel > 1e-2 ? "  MISMATCH" : "");
        }
        o->weight_free(b, w.data);
    }
    printf("  best cuBLAS rate above: %.1f TFLOP/s\n", best_tflops);
    o->free(b, x);
    o->free(b, out);
    free(hx);
    free(ha);
    free(hb);
    free(hxb);
    free(hw);
    CK(cudaStreamSynchronize(r.st));
    CK(cudaFree(r.c));
    CK(cudaFree(xb_dev));
    CK(cudaFree(w_dev));
    CKB(cublasDestroy(r.h));
    CK(cudaFree(ws));
    CK(cudaStreamDestroy(r.st));
    return best_tflops;
}

static void bench_attention(nb_backend *b, double bw, double gemm_tflops) {
    const nb_backend_ops *o = b->ops;
    nb_attn_shape s = {N_HEADS, N_KV, HEAD_DIM, 1.0f / sqrtf((float)HEAD_DIM), o->kv_default};
    size_t qd = (size_t)N_HEADS * HEAD_DIM, blk = nb_kv_block_bytes(s.kv_dtype, N_KV, HEAD_DIM),
           tokb = kv_token_bytes(&s);
    static const int ctxs[] = {1024, 4096}, batches[] = {1, 32, 64}, prefills[] = {512, 4096};

    printf("\nattention decode: one query token per sequence, %d heads / %d KV heads, head_dim %d, KV cache %s;\n"
           "GB/s = K and V bytes read / time\n", N_HEADS, N_KV, HEAD_DIM, nb_kv_dtype_name(s.kv_dtype));
    printf("  %-34s %13s %14s %8s\n", "batch x context", "time", "KV read", "of copy");
    for (size_t ci = 0; ci < sizeof ctxs / sizeof ctxs[0]; ci++)
        for (size_t bi = 0; bi < sizeof batches / sizeof batches[0]; bi++) {
            int B = batches[bi], C = ctxs[ci];
            bench_batch bb;
            batch_decode(&bb, B, C);
            int blocks = B * bb.b.max_blocks;
            void *kc = o->alloc(b, blk * (size_t)blocks), *vc = o->alloc(b, blk * (size_t)blocks);
            fill_kv(b, kc, vc, blocks * NB_KV_BLOCK_SIZE, &s);
            float *q = dev_random(b, (size_t)B * qd, 1.0f), *out = o->alloc(b, sizeof(float) * B * qd);
            o->set_batch(b, &bb.b);
            op_call c = {.kind = K_ATTENTION, .b = b, .out = out, .x = q, .kc = kc, .vc = vc, .s = s};
            double t = time_op(&c, 1);
            char what[64];
            snprintf(what, sizeof what, "%d x %d", B, C);
            print_bw(what, t, 2.0 * (double)B * C * (double)tokb, bw);
            o->free(b, q);
            o->free(b, out);
            o->free(b, kc);
            o->free(b, vc);
            batch_free(&bb);
        }

    printf("\nattention prefill: one sequence, causal; FLOPs = 4 * heads * head_dim * T (T + 1) / 2;\n"
           "of cuBLAS = TFLOP/s / the best cublasGemmEx TFLOP/s measured above\n");
    printf("  %-34s %13s %14s %8s\n", "tokens", "time", "rate", "of cuBLAS");
    for (size_t pi = 0; pi < sizeof prefills / sizeof prefills[0]; pi++) {
        int T = prefills[pi];
        bench_batch bb;
        batch_prefill(&bb, T);
        void *kc = o->alloc(b, blk * (size_t)bb.b.max_blocks), *vc = o->alloc(b, blk * (size_t)bb.b.max_blocks);
        fill_kv(b, kc, vc, T, &s);
        float *q = dev_random(b, (size_t)T * qd, 1.0f), *out = o->alloc(b, sizeof(float) * T * qd);
        o->set_batch(b, &bb.b);
        op_call c = {.kind = K_ATTENTION, .b = b, .out = out, .x = q, .kc = kc, .vc = vc, .s = s};
        double t = time_op(&c, 0);
        double flops = 4.0 * N_HEADS * HEAD_DIM * (double)T * (T + 1) / 2.0, tf = flops / t / 1e12;
        char what[64];
        snprintf(what, sizeof what, "%d", T);
        printf("  %-34s %10.2f us %6.2f TFLOP/s", what, t * 1e6, tf);
        if (gemm_tflops > 0) printf(" %8.3f", tf / gemm_tflops);
        printf("\n");
        o->free(b, q);
        o->free(b, out);
        o->free(b, kc);
        o->free(b, vc);
        batch_free(&bb);
    }
}

static void bench_small_ops(nb_backend *b, double bw) {
    const nb_backend_ops *o = b->ops;
    static const int rows[] = {1, 64, 4096};
    const int n_rows = (int)(sizeof rows / sizeof rows[0]), max_n = rows[n_rows - 1];
    nb_attn_shape s = {N_HEADS, N_KV, HEAD_DIM, 1.0f / sqrtf((float)HEAD_DIM), o->kv_default};
    size_t qd = (size_t)N_HEADS * HEAD_DIM, kvd = (size_t)N_KV * HEAD_DIM;

    uint16_t ones[HIDDEN];
    for (int i = 0; i < HIDDEN; i++) ones[i] = f32_to_bf16(1.0f);
    nb_weight norm = {NB_BF16, 1, HIDDEN, o->weight_load(b, ones, sizeof ones), NULL, NULL, 0};
    float inv[HEAD_DIM / 2];
    for (int i = 0; i < HEAD_DIM / 2; i++) inv[i] = (float)(1.0 / pow(ROPE_THETA, 2.0 * i / HEAD_DIM));
    float *inv_dev = o->alloc(b, sizeof inv);
    o->upload(b, inv_dev, inv, sizeof inv);

    size_t big = (size_t)max_n * INTER;
    float *a = dev_random(b, big, 1.0f), *c2 = dev_random(b, big, 1.0f), *out = o->alloc(b, sizeof(float) * big);
    size_t blk = nb_kv_block_bytes(s.kv_dtype, N_KV, HEAD_DIM),
           n_blocks = (size_t)(max_n + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    void *kc = o->alloc(b, blk * n_blocks), *vc = o->alloc(b, blk * n_blocks);

    printf("\nelementwise ops (FP32 activations, hidden %d, intermediate %d); GB/s = bytes read + written / time\n",
           HIDDEN, INTER);
    printf("  %-34s %13s %14s %8s\n", "op, rows (tokens)", "time", "traffic", "of copy");
    char what[64];
    for (int i = 0; i < n_rows; i++) {
        int n = rows[i];
        op_call c = {.kind = K_RMSNORM, .b = b, .out = out, .x = a, .w = &norm, .n = n};
        snprintf(what, sizeof what, "rmsnorm %d", n);
        print_bw(what, time_op(&c, 1), 8.0 * n * HIDDEN + 2.0 * HIDDEN, bw);
    }
    for (int i = 0; i < n_rows; i++) {
        int n = rows[i];
        /* x += delta each call: a tiny delta keeps x bounded over the loop */
        float *delta = dev_random(b, (size_t)n * HIDDEN, 1e-6f);
        op_call c = {.kind = K_ADD_RMSNORM, .b = b, .out = out, .x = a, .y = delta, .w = &norm, .n = n};
        snprintf(what, sizeof what, "add_rmsnorm %d", n);
        print_bw(what, time_op(&c, 1), 16.0 * n * HIDDEN + 2.0 * HIDDEN, bw);
        o->free(b, delta);
    }
    for (int i = 0; i < n_rows; i++) {
        int n = rows[i];
        bench_batch bb;
        batch_prefill(&bb, n);
        o->set_batch(b, &bb.b);
        op_call c = {.kind = K_ROPE, .b = b, .x = a, .heads = N_HEADS, .inv_freq = inv_dev};
        snprintf(what, sizeof what, "rope q (%d heads) %d", N_HEADS, n);
        print_bw(what, time_op(&c, 1), 8.0 * n * qd, bw);
        batch_free(&bb);
    }
    for (int i = 0; i < n_rows; i++) {
        int n = rows[i];
        op_call c = {.kind = K_SILU_MUL, .b = b, .out = out, .x = a, .y = c2, .count = (size_t)n * INTER};
        snprintf(what, sizeof what, "silu_mul %d x %d", n, INTER);
        print_bw(what, time_op(&c, 1), 12.0 * n * INTER, bw);
    }
    for (int i = 0; i < n_rows; i++) {
        int n = rows[i];
        bench_batch bb;
        batch_prefill(&bb, n);
        o->set_batch(b, &bb.b);
        op_call c = {.kind = K_KV_WRITE, .b = b, .x = a, .y = c2, .kc = kc, .vc = vc, .s = s};
        snprintf(what, sizeof what, "kv_write (%s) %d", nb_kv_dtype_name(s.kv_dtype), n);
        print_bw(what, time_op(&c, 1), 2.0 * n * (4.0 * kvd + (double)kv_token_bytes(&s)), bw);
        batch_free(&bb);
    }
    o->free(b, a);
    o->free(b, c2);
    o->free(b, out);
    o->free(b, kc);
    o->free(b, vc);
    o->free(b, inv_dev);
    o->weight_free(b, norm.data);
}

static void bench_ops(double bw) {
    nb_err e;
    memset(&e, 0, sizeof e);
    nb_backend *b = cuda_backend_create(g.device, &e);
    if (!b) die("CUDA backend: %s", e.msg);
    printf("\nbackend ops, Llama-3-8B shapes; %s\n",
           g.graphs ? "timed loops recorded as graphs (ops->graph_begin) and replayed, except prefill attention"
                    : "timed loops issued eagerly (--no-graph)");
    double tf = bench_matmul(b, bw);
    bench_attention(b, bw, tf);
    bench_small_ops(b, bw);
    backend_destroy(b);
}

/* ---- end-to-end decode -------------------------------------------------------------- */

static void bench_decode(const char *dir, const int *batches, int n_batches, int prompt, int steps, int max_batch_tokens,
                         double bw) {
    enum { WARM = 3 };
    nb_err e;
    memset(&e, 0, sizeof e);
    nb_model_config cfg;
    if (config_load(dir, &cfg, &e)) die("%s", e.msg);
    int max_b = 0;
    for (int i = 0; i < n_batches; i++)
        if (batches[i] > max_b) max_b = batches[i];
    /* every batch size decodes WARM + steps tokens from position `prompt`
     * on, twice (logits, then argmax; the second pass rewrites the same KV
     * slots), in the same sequences */
    int span = prompt + WARM + steps, bps = (span + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    if (span > cfg.max_position)
        die("%s: --context %d plus %d decode steps needs %d positions; the model has %d", dir, prompt, WARM + steps, span,
            cfg.max_position);
    if (max_batch_tokens < max_b) max_batch_tokens = max_b;

    nb_backend *b = cuda_backend_create(g.device, &e);
    if (!b) die("CUDA backend: %s", e.msg);
    nb_model_opts mo;
    memset(&mo, 0, sizeof mo);
    mo.max_batch_tokens = max_batch_tokens;
    mo.num_kv_blocks = max_b * bps;
    double t0 = util_now();
    nb_model *m = model_load(dir, b, &mo, &e);
    if (!m) die("%s", e.msg);
    double load_s = util_now() - t0;
    const nb_model_config *c = model_config(m);
    int V = c->vocab_size, L = c->n_layers;
    nb_attn_shape s = {c->n_heads, c->n_kv_heads, c->head_dim, 0, model_quant_plan(m)->kv};
    double kv_tok = 2.0 * L * (double)kv_token_bytes(&s); /* K and V, all layers, one token */

    /* weight bytes read per step: all resident weights, except that of an
     * untied embedding table only the step's rows are read */
    double wtotal = 0;
    char wdesc[256] = "";
    for (int t = 0, len = 0; t < NB_DTYPE_COUNT; t++) {
        size_t by = model_weight_bytes(m, (nb_dtype)t);
        wtotal += (double)by;
        if (by && len < (int)sizeof wdesc)
            len += snprintf(wdesc + len, sizeof wdesc - (size_t)len, "%s%s %.2f GB", len ? ", " : "",
                            nb_dtype_name((nb_dtype)t), by / 1e9);
    }
    st_model *st = st_open(dir, &e);
    if (!st) die("%s", e.msg);
    const st_tensor *et = st_find(st, "model.embed_tokens.weight");
    if (!et) die("%s: no model.embed_tokens.weight", dir);
    double emb_bytes = (double)et->nbytes, emb_row = emb_bytes / V;
    st_close(st);
    double w_fixed = c->tie_embeddings ? wtotal : wtotal - emb_bytes;

    printf("\ndecode: %s (%s, %d layers, hidden %d, vocab %d, %s lm_head), weights %s, KV cache %s; load %.1f s\n", dir,
           c->arch_name, L, c->hidden_size, V, c->tie_embeddings ? "tied" : "untied", wdesc, nb_kv_dtype_name(s.kv_dtype),
           load_s);
    printf("bound = (weight bytes read per step + KV bytes read per step) / copy bandwidth; weights read per step:\n"
           "%.3f GB (every linear and norm weight and the lm_head%s; of the embedding only the step's rows);\n"
           "KV %.0f KiB per token of context (all layers, K and V)\n",
           w_fixed / 1e9, c->tie_embeddings ? " = the embedding" : "", kv_tok / 1024.0);

    /* sequence s owns blocks s * bps ...; the first B rows serve batch B */
    int32_t *tables = xmalloc(sizeof(int32_t) * (size_t)max_b * bps);
    for (int i = 0; i < max_b * bps; i++) tables[i] = i;
    int cap = max_batch_tokens > max_b ? max_batch_tokens : max_b;
    int32_t *tok = xmalloc(sizeof(int32_t) * cap), *pos = xmalloc(sizeof(int32_t) * cap),
            *seq = xmalloc(sizeof(int32_t) * cap), *slot = xmalloc(sizeof(int32_t) * cap),
            *rows = xmalloc(sizeof(int32_t) * cap), *ids = xmalloc(sizeof(int32_t) * cap),
            *step_tables = xmalloc(sizeof(int32_t) * (size_t)cap * bps);
    float *logits = xmalloc(sizeof(float) * (size_t)max_b * V);
    for (int i = 0; i < cap; i++) rows[i] = i;

    /* prefill: max_b sequences of `prompt` random tokens, packed into steps
     * of at most max_batch_tokens tokens */
    t0 = util_now();
    int n_steps = 0;
    for (int s0 = 0, p0 = 0; s0 < max_b;) {
        int n = 0, n_seqs = 0, last = -1;
        while (n < max_batch_tokens && s0 < max_b) {
            if (s0 != last) {
                memcpy(step_tables + (size_t)n_seqs * bps, tables + (size_t)s0 * bps, sizeof(int32_t) * bps);
                n_seqs++;
                last = s0;
            }
            tok[n] = rand_token(V);
            pos[n] = p0;
            seq[n] = n_seqs - 1;
            slot[n] = tables[(size_t)s0 * bps + p0 / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p0 % NB_KV_BLOCK_SIZE;
            n++;
            if (++p0 == prompt) s0++, p0 = 0;
        }
        nb_batch bt = {n, pos, seq, slot, n_seqs, bps, step_tables};
        if (model_forward(m, tok, &bt, NULL, 0, NULL, &e)) die("prefill: %s", e.msg);
        n_steps++;
    }
    b->ops->sync(b);
    double pf = util_now() - t0;
    printf("prefill: %d sequences x %d tokens in %d steps of <= %d tokens: %.2f s, %.0f tok/s\n", max_b, prompt, n_steps,
           max_batch_tokens, pf, (double)max_b * prompt / pf);

    printf("decode, one token per sequence per step, %d timed steps after %d warm-up, context %d..%d:\n"
           "logits = model_forward (all rows' logits to the host), argmax = model_forward_argmax\n",
           steps, WARM, prompt, span - 1);
    printf("  %5s %14s %10s %14s %10s %14s %9s %9s %8s %8s\n", "batch", "logits tok/s", "ms/step", "argmax tok/s",
           "ms/step", "bound tok/s", "weight GB", "KV GB", "ratio", "ratio");
    for (int bi = 0; bi < n_batches; bi++) {
        int B = batches[bi];
        double rate[2], ms[2], kv_read = 0;
        for (int t = 0; t < B; t++) ids[t] = t % V;
        for (int phase = 0; phase < 2; phase++) {
            double ts = 0;
            for (int i = 0; i < WARM + steps; i++) {
                int p = prompt + i;
                if (i == WARM) ts = util_now();
                for (int t = 0; t < B; t++) {
                    tok[t] = ids[t];
                    pos[t] = p;
                    seq[t] = t;
                    slot[t] = tables[(size_t)t * bps + p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
                }
                nb_batch bt = {B, pos, seq, slot, B, bps, tables};
                if (phase == 0) {
                    if (model_forward(m, tok, &bt, rows, B, logits, &e)) die("decode: %s", e.msg);
                    for (int t = 0; t < B; t++) ids[t] = rand_token(V);
                } else if (model_forward_argmax(m, tok, &bt, rows, B, ids, &e)) {
                    die("decode: %s", e.msg);
                }
                if (i >= WARM && phase == 0) kv_read += (double)B * (p + 1) * kv_tok;
            }
            double dt = util_now() - ts;
            rate[phase] = (double)B * steps / dt;
            ms[phase] = dt / steps * 1e3;
        }
        kv_read /= steps;
        double wread = w_fixed + B * emb_row, bound_step = (wread + kv_read) / bw, bound = B / bound_step;
        printf("  %5d %14.1f %10.3f %14.1f %10.3f %14.1f %9.2f %9.3f %8.2f %8.2f\n", B, rate[0], ms[0], rate[1], ms[1],
               bound, wread / 1e9, kv_read / 1e9, rate[0] / bound, rate[1] / bound);
    }
    printf("  (ratio = tok/s / bound tok/s, for logits and argmax)\n");
    free(tables);
    free(tok);
    free(pos);
    free(seq);
    free(slot);
    free(rows);
    free(ids);
    free(step_tables);
    free(logits);
    model_free(m);
    backend_destroy(b);
}

/* ---- main ---------------------------------------------------------------------------- */

static void usage(FILE *f) {
    fprintf(f,
            "usage: bench_cuda [--ops] [--model DIR] [options]\n"
            "  --ops                  per-op timings (the default when --model is not given)\n"
            "  --model DIR            end-to-end decode on the model in DIR\n"
            "  --device N             CUDA device (default 0)\n"
            "  --context N            prompt tokens per sequence before decoding (default 512)\n"
            "  --steps N              timed decode steps per batch size (default 64)\n"
            "  --batches LIST         decode batch sizes, comma-separated (default 1,8,32,64)\n"
            "  --max-batch-tokens N   tokens per prefill step (default 512)\n"
            "  --min-time S           seconds of timed loop per op figure (default 0.1)\n"
            "  --no-graph             time backend ops and cuBLAS eagerly, not as recorded graphs\n");
}

static int parse_int(const char *flag, const char *v, int lo, int hi) {
    char *end;
    long x = v ? strtol(v, &end, 10) : 0;
    if (!v || *end || end == v || x < lo || x > hi) die("%s expects an integer in [%d, %d]", flag, lo, hi);
    return (int)x;
}

int main(int argc, char **argv) {
    int ops = 0, prompt = 512, steps = 64, max_batch_tokens = 512, n_batches = 4;
    int batches[MAX_BATCHES] = {1, 8, 32, 64};
    const char *model = NULL;
    setvbuf(stdout, NULL, _IOLBF, 0);
    log_set_level(LOG_WARN);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--ops")) ops = 1;
        else if (!strcmp(a, "--no-graph")) g.graphs = 0;
        else if (!strcmp(a, "--model") && v) model = v, i++;
        else if (!strcmp(a, "--device")) g.device = parse_int(a, v, 0, 1023), i++;
        else if (!strcmp(a, "--context")) prompt = parse_int(a, v, 1, 1 << 20), i++;
        else if (!strcmp(a, "--steps")) steps = parse_int(a, v, 1, 1 << 20), i++;
        else if (!strcmp(a, "--max-batch-tokens")) max_batch_tokens = parse_int(a, v, 1, 1 << 20), i++;
        else if (!strcmp(a, "--min-time") && v) {
            char *end;
            g.min_time = strtod(v, &end);
            if (*end || end == v || !(g.min_time > 0 && g.min_time <= 60)) die("--min-time expects seconds in (0, 60]");
            i++;
        } else if (!strcmp(a, "--batches") && v) {
            n_batches = 0;
            for (const char *p = v; *p;) {
                char *end;
                long x = strtol(p, &end, 10);
                if (end == p || x < 1 || x > 4096 || n_batches == MAX_BATCHES || (*end && *end != ','))
                    die("--batches expects up to %d comma-separated sizes in [1, 4096], got '%s'", MAX_BATCHES, v);
                batches[n_batches++] = (int)x;
                p = *end ? end + 1 : end;
            }
            if (!n_batches) die("--batches: no sizes given");
            i++;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            die("unknown or incomplete argument '%s'", a);
        }
    }
    if (!model) ops = 1;

    int n_dev = cuda_device_count();
    if (n_dev == 0) die("no CUDA device found (cuda_device_count() is 0); the GPU benchmarks need one");
    if (g.device >= n_dev) die("--device %d: %d CUDA device(s) found", g.device, n_dev);
    char desc[256];
    if (cuda_device_describe(g.device, desc, sizeof desc)) die("%s", desc);
    printf("device: %s\n", desc);
    CK(cudaSetDevice(g.device));
    double bw = copy_bandwidth();
    printf("copy bandwidth: %.1f GB/s (device-to-device cudaMemcpy of 1 GiB, bytes read + written, best of 5)\n",
           bw / 1e9);
    if (ops) bench_ops(bw);
    if (model) bench_decode(model, batches, n_batches, prompt, steps, max_batch_tokens, bw);
    return 0;
}
