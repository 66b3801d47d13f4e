/* The GPU benchmarks' shared helpers (bench/bench_cuda.h). */
#include "bench/bench_cuda.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

static const bench_shape SHAPES[BENCH_N_SHAPES] = {
    {"qkv_proj", 6144, 4096}, {"o_proj", 4096, 4096}, {"gate_up_proj", 28672, 4096}, {"down_proj", 4096, 14336}};

bench_options bench_opts = {0, 1, 0.1, 0, (uint64_t)1 << 62, 0, 0};

int bench_copies(double bytes) {
    const int cap = bench_opts.smoke ? 2 : BENCH_MAX_COPIES;
    double n = bytes > 0 ? ceil(2.0 * (double)bench_opts.l2_bytes / bytes) : 1;
    return n < 1 ? 1 : n > cap ? cap : (int)n;
}

int bench_dim(int full) { return bench_opts.smoke ? full / SMOKE_DIV : full; }

int bench_list_max(bench_list l) {
    int m = 0;
    for (int i = 0; i < l.n; i++)
        if (l.v[i] > m) m = l.v[i];
    return m;
}

bench_shape bench_shape_at(int i) {
    return (bench_shape){SHAPES[i].name, bench_dim(SHAPES[i].N), bench_dim(SHAPES[i].K)};
}

void bench_shapes_max(int max_m, size_t *mk, size_t *mn, size_t *nk) {
    *mk = *mn = *nk = 0;
    for (int i = 0; i < BENCH_N_SHAPES; i++) {
        bench_shape s = bench_shape_at(i);
        size_t a = (size_t)max_m * s.K, b = (size_t)max_m * s.N, c = (size_t)s.N * s.K;
        if (a > *mk) *mk = a;
        if (b > *mn) *mn = b;
        if (c > *nk) *nk = c;
    }
}

const char *bench_check(double err, double tol) {
    if (!isnan(err) && err <= tol) return "";
    bench_opts.mismatches++;
    return "  MISMATCH";
}

void bench_die(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fputs("bench_cuda: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

void bench_ck_cuda(cudaError_t rc, const char *what, const char *file, int line) {
    if (rc != cudaSuccess) bench_die("%s (%s:%d): %s", what, file, line, cudaGetErrorString(rc));
}
void bench_ck_cublas(cublasStatus_t rc, const char *what, const char *file, int line) {
    if (rc != CUBLAS_STATUS_SUCCESS) bench_die("%s (%s:%d): %s", what, file, line, cublasGetStatusString(rc));
}

int bench_clampi(double v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : (int)v; }

/* xorshift64 */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
uint64_t bench_rand_u64(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
float bench_frand(void) { return (float)((double)(bench_rand_u64() >> 40) * (2.0 / 16777216.0) - 1.0); }
int32_t bench_rand_token(int vocab) { return (int32_t)(bench_rand_u64() % (uint64_t)vocab); }

void bench_fill_bf16_exact(float *f, uint16_t *bf16, size_t n, float amp) {
    for (size_t i = 0; i < n; i++) {
        uint16_t h = f32_to_bf16(amp * bench_frand());
        if (f) f[i] = bf16_to_f32(h);
        if (bf16) bf16[i] = h;
    }
}

float *bench_dev_random(nb_backend *b, size_t n, float amp) {
    float *h = xmalloc(sizeof(float) * n), *d = b->ops->alloc(b, sizeof(float) * n);
    bench_fill_bf16_exact(h, NULL, n, amp);
    b->ops->upload(b, d, h, sizeof(float) * n);
    free(h);
    return d;
}

/* ---- copy bandwidth ------------------------------------------------------ */

double bench_copy_bandwidth(void) {
    size_t bytes = (size_t)1 << (bench_opts.smoke ? 26 : 30);
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
    double bw = 2.0 * (double)bytes / (best * 1e-3);
    printf("copy bandwidth: %.1f GB/s (device-to-device cudaMemcpy of %zu MiB, bytes read + written, best of 5)\n",
           bw / 1e9, bytes >> 20);
    return bw;
}

/* ---- timing backend ops --------------------------------------------------- */



void bench_op_run(const op_call *c, int i) {
    const nb_backend_ops *o = c->b->ops;
    const int r = c->n_rot > 1 ? i % c->n_rot : 0;
    switch (c->kind) {
    case K_MATMUL: o->matmul(c->b, c->out, c->x, &c->w[r], c->n); break;
    case K_RMSNORM: o->rmsnorm(c->b, c->out, c->x, c->w, c->n, RMS_EPS); break;
    case K_ADD_RMSNORM: o->add_rmsnorm(c->b, c->out, c->x, c->y, c->w, c->n, RMS_EPS); break;
    case K_ROPE: o->rope(c->b, c->x, c->heads, HEAD_DIM, c->heads * HEAD_DIM, c->inv_freq, 0); break;
    case K_SILU_MUL: o->silu_mul(c->b, c->out, c->x, c->y, c->n, c->cols, c->cols); break;
    case K_KV_WRITE: o->kv_write(c->b, c->kc, c->vc, c->x, c->y, &c->s); break;
    case K_ATTENTION:
        o->attention(c->b, c->out, c->x, (char *)c->kc + r * c->kv_stride, (char *)c->vc + r * c->kv_stride, &c->s);
        break;
    case K_EXPERTS:
        o->matmul_experts(c->b, c->out, c->x, c->set, c->groups + r * c->groups_stride, c->n_tokens, c->n);
        break;
    }
}

/* Whole cycles over n_rot copies, at least `inner` calls. */
static int whole_cycles(int inner, int n_rot) { return n_rot > 1 ? (inner + n_rot - 1) / n_rot * n_rot : inner; }

double bench_time_op(const op_call *c, int graph) {
    nb_backend *b = c->b;
    const nb_backend_ops *o = b->ops;
    const int rot = c->n_rot > 1 ? c->n_rot : 1;
    for (int i = 0; i < rot + 1; i++) bench_op_run(c, i);
    o->sync(b);
    double t0 = util_now();
    for (int i = 0; i < 3; i++) bench_op_run(c, i);
    o->sync(b);
    double est = (util_now() - t0) / 3;
    if (est < 1e-7) est = 1e-7;
    graph = graph && bench_opts.graphs;
    int inner = whole_cycles(graph ? bench_clampi(2e-3 / est, 1, 100) : 1, rot);
    uint64_t key = graph ? bench_opts.next_key++ : 0;
    if (graph) { /* record (and run once) */
        if (!o->graph_begin(b, key)) {
            for (int i = 0; i < inner; i++) bench_op_run(c, i);
            o->graph_end(b);
        }
        o->sync(b);
    }
    int reps = bench_clampi(bench_opts.min_time / (est * inner), 3, 100000);
    t0 = util_now();
    for (int r = 0; r < reps; r++) {
        if (graph && o->graph_begin(b, key)) continue; /* replayed */
        for (int i = 0; i < inner; i++) bench_op_run(c, i);
        if (graph) o->graph_end(b);
    }
    o->sync(b);
    return (util_now() - t0) / ((double)reps * inner);
}

/* ---- cuBLAS reference ------------------------------------------------------ */


/* Row-major out[M][N] = x[M][K] w[N][K]^T, i.e. column-major
 * C (N x M) = W^T (N x K) X (K x M). */
void bench_gemm_open(gemm_ref *r, size_t max_mn, size_t max_mk) {
    size_t ws_bytes = (size_t)32 << 20;
    memset(r, 0, sizeof *r);
    CKB(cublasCreate(&r->h));
    CK(cudaStreamCreateWithFlags(&r->st, cudaStreamNonBlocking));
    CKB(cublasSetStream(r->h, r->st));
    CK(cudaMalloc(&r->ws, ws_bytes));
    CKB(cublasSetWorkspace(r->h, r->ws, ws_bytes));
    CK(cudaMalloc((void **)&r->c, sizeof(float) * max_mn));
    CK(cudaMalloc((void **)&r->x, 2 * max_mk));
}

void bench_gemm_close(gemm_ref *r) {
    CK(cudaStreamSynchronize(r->st));
    CK(cudaFree(r->c));
    CK(cudaFree(r->x));
    CK(cudaFree(r->w));
    CKB(cublasDestroy(r->h));
    CK(cudaFree(r->ws));
    CK(cudaStreamDestroy(r->st));
    memset(r, 0, sizeof *r);
}

void bench_gemm_upload(gemm_ref *r, const uint16_t *w, size_t nk, const uint16_t *x, size_t mk) {
    r->n_rot = bench_copies(2.0 * (double)nk);
    if ((size_t)r->n_rot * nk > r->w_cap) {
        CK(cudaStreamSynchronize(r->st));
        CK(cudaFree(r->w));
        r->w_cap = (size_t)r->n_rot * nk;
        CK(cudaMalloc((void **)&r->w, 2 * r->w_cap));
    }
    for (int i = 0; i < r->n_rot; i++) CK(cudaMemcpyAsync(r->w + i * nk, w, 2 * nk, cudaMemcpyHostToDevice, r->st));
    CK(cudaMemcpyAsync(r->x, x, 2 * mk, cudaMemcpyHostToDevice, r->st));
    CK(cudaStreamSynchronize(r->st));
}

cublasStatus_t bench_gemm_run(const gemm_ref *r, int i) {
    const float alpha = 1.0f, beta = 0.0f;
    const uint16_t *w = r->w + (size_t)(r->n_rot > 1 ? i % r->n_rot : 0) * r->N * r->K;
    return cublasGemmEx(r->h, CUBLAS_OP_T, CUBLAS_OP_N, r->N, r->M, r->K, &alpha, w, CUDA_R_16BF, r->K, r->x,
                        CUDA_R_16BF, r->K, &beta, r->c, CUDA_R_32F, r->N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

double bench_time_gemm(const gemm_ref *r) {
    cudaEvent_t e0, e1;
    float ms = 0;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int rot = r->n_rot > 1 ? r->n_rot : 1;
    for (int i = 0; i < rot + 1; i++) CKB(bench_gemm_run(r, i));
    CK(cudaEventRecord(e0, r->st));
    for (int i = 0; i < 3; i++) CKB(bench_gemm_run(r, i));
    CK(cudaEventRecord(e1, r->st));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    double est = ms * 1e-3 / 3;
    if (est < 1e-7) est = 1e-7;
    int inner = whole_cycles(1, rot);
    cudaGraphExec_t exec = NULL;
    if (bench_opts.graphs) {
        inner = whole_cycles(bench_clampi(2e-3 / est, 1, 100), rot);
        cudaGraph_t gr = NULL;
        int ok = cudaStreamBeginCapture(r->st, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
        if (ok) {
            for (int i = 0; i < inner && ok; i++) ok = bench_gemm_run(r, i) == CUBLAS_STATUS_SUCCESS;
            if (cudaStreamEndCapture(r->st, &gr) != cudaSuccess) ok = 0;
        }
        if (ok && cudaGraphInstantiate(&exec, gr, 0) != cudaSuccess) ok = 0;
        if (gr) CK(cudaGraphDestroy(gr));
        if (!ok) {
            static int said;
            (void)cudaGetLastError();
            if (exec) CK(cudaGraphExecDestroy(exec));
            exec = NULL;
            inner = whole_cycles(1, rot);
            if (!said++) fprintf(stderr, "bench_cuda: cublasGemmEx could not be recorded into a graph; timed eagerly\n");
        }
    }
    int reps = bench_clampi(bench_opts.min_time / (est * inner), 3, 100000);
    CK(cudaEventRecord(e0, r->st));
    for (int i = 0; i < reps; i++) {
        if (exec) CK(cudaGraphLaunch(exec, r->st));
        else
            for (int j = 0; j < inner; j++) CKB(bench_gemm_run(r, j));
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


void bench_batch_free(bench_batch *bb) {
    free(bb->pos);
    free(bb->seq_of);
    free(bb->slot);
    free(bb->tables);
    memset(bb, 0, sizeof *bb);
}

void bench_batch_decode(bench_batch *bb, int n_seqs, int ctx) {
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

void bench_batch_prefill(bench_batch *bb, int n) {
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

size_t bench_kv_token_bytes(const nb_attn_shape *s) {
    return nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim) / NB_KV_BLOCK_SIZE;
}

/* Writes random K/V into the first n_slots slots of a cache through
 * kv_write, 4096 tokens at a time (the values are then valid for every
 * cache type, scales included). */
void bench_fill_kv(nb_backend *b, void *kc, void *vc, int n_slots, const nb_attn_shape *s) {
    enum { CHUNK = 4096 };
    size_t kvd = (size_t)s->n_kv_heads * s->head_dim;
    float *k = bench_dev_random(b, CHUNK * kvd, 1.0f), *v = bench_dev_random(b, CHUNK * kvd, 1.0f);
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


void bench_print_bw(const char *what, double sec, double bytes, double bw) {
    printf("  %-34s %10.2f us %9.1f GB/s %8.2f\n", what, sec * 1e6, bytes / sec / 1e9, bytes / sec / bw);
}
