// The CUDA backend: device memory, the step's batch metadata, recorded
// decode steps (CUDA graphs), and the ops table over the kernels in
// cuda_ops.cu, cuda_matmul.cu and cuda_attention.cu.
//
// Everything runs on one stream. Ops return as soon as their work is queued;
// upload, download, sample and sync wait for it. Activations stay FP32 as the
// interface says; the GEMMs read them as BF16 where tensor cores need it.
//
// Several backends (the ranks of a tensor-parallel group, cuda_comm.cu) may
// live on several devices, each driven by its own thread: the ops of a step
// expect the calling thread to be attached (the backend's device current,
// as attach makes it); the ops that run at load time or teardown select
// the device themselves (cuda_device_enter).
#include <string.h>

#include "kernels/cuda/cuda_int.h"

extern "C" {
#include "common/log.h"
#include "common/util.h"
#include "quant/quant.h"
#include "quant/quant_tc.h"
}

void cuda_check(cudaError_t rc, const char *what, const char *file, int line) {
    if (rc == cudaSuccess) return;
    fprintf(stderr, "nibble: cuda: %s (%s:%d): %s\n", what, file, line, cudaGetErrorString(rc));
    abort();
}

void cublas_check(cublasStatus_t rc, const char *what, const char *file, int line) {
    if (rc == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "nibble: cublasLt: %s (%s:%d): status %d\n", what, file, line, (int)rc);
    abort();
}

// cuBLASLt scratch: enough for its split-K and stream-K algorithms.
#define LT_WORKSPACE (32u << 20)

// ---- devices --------------------------------------------------------------

int cuda_device_enter(const cuda_backend *c) {
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) {
        cudaGetLastError();
        prev = -1;
    }
    if (prev != c->device) CUDA_CHECK(cudaSetDevice(c->device));
    return prev;
}

void cuda_device_leave(const cuda_backend *c, int prev) {
    if (prev >= 0 && prev != c->device) CUDA_CHECK(cudaSetDevice(prev));
}

// ---- memory -------------------------------------------------------------

// Waits for the stream; everything staged before is then consumed.
static void stream_idle(cuda_backend *c) {
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    c->idx.used = 0;
}

// cudaMalloc on the current device, NULL when its memory is full (the
// caller reports it, backend.h); any other failure is fatal.
static void *device_malloc(size_t bytes) {
    void *p = NULL;
    cudaError_t rc = cudaMalloc(&p, bytes ? bytes : 1);
    if (rc == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError(); // not sticky, but the next check would return it
        return NULL;
    }
    CUDA_CHECK(rc);
    return p;
}

static void *cu_alloc(nb_backend *b, size_t bytes) {
    cuda_backend *c = cuda_impl(b);
    int prev = cuda_device_enter(c); // cudaMalloc allocates on the current device
    void *p = device_malloc(bytes);
    if (p) CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, c->stream));
    cuda_device_leave(c, prev);
    return p;
}

static void cu_free(nb_backend *b, void *p) {
    if (!p) return;
    cuda_backend *c = cuda_impl(b);
    int prev = cuda_device_enter(c);
    // queued kernels may still use p, and recorded steps may point at it
    // (a model freed and another loaded on the same backend)
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->n_graphs) cuda_graphs_clear(c);
    CUDA_CHECK(cudaFree(p));
    cuda_device_leave(c, prev);
}

static void cu_upload(nb_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cuda_impl(b);
    if (!bytes) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
    stream_idle(c); // src may be reused once we return
}

static void cu_download(nb_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cuda_impl(b);
    if (!bytes) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    stream_idle(c);
}

static const void *cu_weight_load(nb_backend *b, const void *host, size_t bytes) {
    cuda_backend *c = cuda_impl(b);
    int prev = cuda_device_enter(c);
    void *p = device_malloc(bytes);
    if (p) cu_upload(b, p, host, bytes);
    cuda_device_leave(c, prev);
    return p;
}

static void cu_weight_free(nb_backend *b, const void *p) { cu_free(b, (void *)p); }

// WINT8, WINT4 and WINT2 weights go into the tensor-core layout of
// quant/quant_tc.h, which cuda_wint_tc.cu reads: the host bytes are
// reordered by plain C (quant_tc_repack, tested on the CPU) into a pinned
// staging buffer, reused from weight to weight (fresh buffers would cost
// more in page faults than the repack), and uploaded from there. Other
// dtypes and shapes the layout does not take are declined (0): the loader
// uploads them as they are.
static size_t cu_weight_pack(nb_backend *b, nb_weight *w) {
    cuda_backend *c = cuda_impl(b);
    nb_err e;
    if (quant_tc_check(w, &e)) return 0;
    const int new_scale = quant_tc_new_scale(w); // scales (WINT2: codes) rewritten too
    const size_t tdb = quant_tc_data_bytes(w), tsb = new_scale ? quant_tc_scale_bytes(w) : 0;
    int prev = cuda_device_enter(c);
    if (tdb + tsb > c->pack_cap) {
        // the last upload from it has finished: cu_upload waits for it
        if (c->pack_host) CUDA_CHECK(cudaFreeHost(c->pack_host));
        CUDA_CHECK(cudaMallocHost((void **)&c->pack_host, tdb + tsb));
        c->pack_cap = tdb + tsb;
    }
    if (quant_tc_repack(w, c->pack_host, new_scale ? c->pack_host + tdb : NULL, &e)) {
        log_debug("cuda: %s [%lld, %lld] keeps quant.h's layout: %s", nb_dtype_name(w->dtype), (long long)w->rows,
                  (long long)w->cols, e.msg);
        cuda_device_leave(c, prev);
        return 0;
    }
    const void *data = cu_weight_load(b, c->pack_host, tdb);
    const void *scale = !data      ? NULL
                        : new_scale ? cu_weight_load(b, c->pack_host + tdb, tsb)
                                    : cu_weight_load(b, w->scale, quant_scale_bytes(w->dtype, w->rows, w->cols, w->group));
    const size_t s2b = quant_scale2_bytes(w->dtype, w->rows); // WINT2's super scales, as they are
    const void *scale2 = scale && s2b ? cu_weight_load(b, w->scale2, s2b) : NULL;
    if (!scale || (s2b && !scale2)) {
        if (data) cu_weight_free(b, data);
        if (scale) cu_weight_free(b, scale);
        cuda_device_leave(c, prev);
        return NB_WEIGHT_NO_MEMORY;
    }
    w->data = data, w->scale = scale;
    if (s2b) w->scale2 = scale2;
    w->layout = NB_LAYOUT_TC;
    cuda_device_leave(c, prev);
    return quant_weight_bytes(w);
}

void cuda_scratch(cuda_backend *c, void **buf, size_t *cap, size_t bytes) {
    if (bytes <= *cap) return;
    size_t n = *cap ? *cap : 1u << 20;
    while (n < bytes) n *= 2;
    if (*buf) {
        if (c->n_retired == c->cap_retired) {
            c->cap_retired = c->cap_retired ? 2 * c->cap_retired : 8;
            c->retired = (void **)realloc(c->retired, sizeof(void *) * (size_t)c->cap_retired);
            if (!c->retired) abort();
        }
        c->retired[c->n_retired++] = *buf;
    }
    void *p = NULL;
    if (cudaMalloc(&p, n) != cudaSuccess) {
        fprintf(stderr, "nibble: cuda: out of device memory for %zu bytes of scratch\n", n);
        abort();
    }
    *buf = p;
    *cap = n;
}

// ---- batch metadata -----------------------------------------------------

// Host and device images share one layout:
//   pos, seq_of, slot [cap_tokens] | tiles [cap_tokens] | block_tables [cap_seqs][bt_stride]
static size_t meta_bytes(int cap_tokens, int cap_seqs, int bt_stride) {
    return sizeof(int32_t) * 3 * (size_t)cap_tokens + sizeof(cuda_tile) * (size_t)cap_tokens +
           sizeof(int32_t) * (size_t)cap_seqs * (size_t)bt_stride;
}

static void meta_reserve(cuda_backend *c, const nb_batch *bt) {
    if (bt->n_tokens <= c->cap_tokens && bt->n_seqs <= c->cap_seqs && bt->max_blocks <= c->bt_stride) return;
    // Recorded graphs point into the old buffers and bake the old stride.
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    cuda_graphs_clear(c);
    int ct = c->cap_tokens, cs = c->cap_seqs, st = c->bt_stride;
    while (ct < bt->n_tokens) ct = ct ? 2 * ct : 256;
    while (cs < bt->n_seqs) cs = cs ? 2 * cs : 64;
    if (st < bt->max_blocks) st = bt->max_blocks;
    size_t bytes = meta_bytes(ct, cs, st);
    if (c->meta_host) CUDA_CHECK(cudaFreeHost(c->meta_host));
    if (c->meta_dev) CUDA_CHECK(cudaFree(c->meta_dev));
    if (c->attn_cnt) CUDA_CHECK(cudaFree(c->attn_cnt));
    free(c->host_pos);
    CUDA_CHECK(cudaMallocHost((void **)&c->meta_host, bytes));
    CUDA_CHECK(cudaMalloc((void **)&c->meta_dev, bytes));
    const size_t cnt_bytes = sizeof(int) * (size_t)ct * CUDA_ATTN_MAX_KV;
    CUDA_CHECK(cudaMalloc((void **)&c->attn_cnt, cnt_bytes));
    CUDA_CHECK(cudaMemsetAsync(c->attn_cnt, 0, cnt_bytes, c->stream)); // not recorded: no step is
    c->host_pos = (int32_t *)malloc(sizeof(int32_t) * (size_t)ct);
    if (!c->host_pos) abort();
    c->meta_cap = bytes;
    c->cap_tokens = ct, c->cap_seqs = cs, c->bt_stride = st;
}

static void cu_set_batch(nb_backend *b, const nb_batch *bt) {
    cuda_backend *c = cuda_impl(b);
    meta_reserve(c, bt);
    // the previous step's copy out of meta_host must be done before we
    // overwrite it (a step ends with a download, so this rarely waits)
    stream_idle(c);
    int n = bt->n_tokens, T = c->cap_tokens;
    int32_t *h = (int32_t *)c->meta_host;
    memcpy(h, bt->pos, sizeof(int32_t) * (size_t)n);
    memcpy(h + T, bt->seq_of, sizeof(int32_t) * (size_t)n);
    memcpy(h + 2 * T, bt->slot, sizeof(int32_t) * (size_t)n);
    memcpy(c->host_pos, bt->pos, sizeof(int32_t) * (size_t)n);
    // prefill tiles: runs of consecutive tokens of one sequence, cut every
    // CUDA_ATTN_TILE_TOKENS
    cuda_tile *tiles = (cuda_tile *)(h + 3 * T);
    int nt = 0, max_pos = 0;
    for (int t = 0; t < n; t++) {
        if (bt->pos[t] > max_pos) max_pos = bt->pos[t];
        if (nt > 0 && bt->seq_of[t] == bt->seq_of[t - 1] && tiles[nt - 1].n_tok < CUDA_ATTN_TILE_TOKENS) {
            tiles[nt - 1].n_tok++;
        } else {
            tiles[nt].tok0 = t;
            tiles[nt].n_tok = 1;
            nt++;
        }
    }
    int32_t *tables = (int32_t *)(tiles + T);
    for (int s = 0; s < bt->n_seqs; s++)
        memcpy(tables + (size_t)s * c->bt_stride, bt->block_tables + (size_t)s * bt->max_blocks,
               sizeof(int32_t) * (size_t)bt->max_blocks);
    // One copy: the used prefix of the token arrays would need four, and
    // the image is small next to a step's work.
    size_t used = (size_t)((char *)(tables + (size_t)bt->n_seqs * c->bt_stride) - c->meta_host);
    CUDA_CHECK(cudaMemcpyAsync(c->meta_dev, c->meta_host, used, cudaMemcpyHostToDevice, c->stream));

    int32_t *d = (int32_t *)c->meta_dev;
    c->batch.n_tokens = n;
    c->batch.n_seqs = bt->n_seqs;
    c->batch.bt_stride = c->bt_stride;
    c->batch.n_tiles = nt;
    c->batch.max_pos = max_pos;
    c->batch.pos = d;
    c->batch.seq_of = d + T;
    c->batch.slot = d + 2 * T;
    c->batch.tiles = (const cuda_tile *)(d + 3 * T);
    c->batch.block_tables = (const int32_t *)((const cuda_tile *)(d + 3 * T) + T);
    c->has_batch = 1;
}

static const cuda_batch *cur_batch(cuda_backend *c, const char *op) {
    if (!c->has_batch) {
        fprintf(stderr, "nibble: cuda %s called before set_batch\n", op);
        abort();
    }
    return &c->batch;
}

void cuda_require_eager(cuda_backend *c, const char *op) {
    if (!c->capturing) return;
    fprintf(stderr, "nibble: cuda: %s (host arrays) inside a recorded step\n", op);
    abort();
}

void cuda_staging_free(cuda_staging *s) {
    if (s->host) CUDA_CHECK(cudaFreeHost(s->host));
    if (s->dev) CUDA_CHECK(cudaFree(s->dev));
    s->host = s->dev = NULL;
    s->cap = s->used = 0;
}

void cuda_staging_reserve(cuda_staging *s, size_t bytes) {
    if (bytes <= s->cap) return;
    cuda_staging_free(s);
    size_t cap = bytes < 65536 ? 65536 : bytes * 2;
    CUDA_CHECK(cudaMallocHost((void **)&s->host, cap));
    CUDA_CHECK(cudaMalloc((void **)&s->dev, cap));
    s->cap = cap;
}

// Copies host arrays a (na bytes) and, after it, b (nb bytes; none when
// NULL) to the device for one op, returning where a lands. Each call takes
// the next piece of the staging buffer, so it waits for the stream only
// when the buffer is full: a mixture-of-experts layer stages every
// expert's rows without stalling the GPU between experts. The pieces are
// free again once the stream is idle (stream_idle).
static const void *stage_host(cuda_backend *c, const void *a, size_t na, const void *b, size_t nb, const char *op) {
    cuda_require_eager(c, op);
    cuda_staging *s = &c->idx;
    size_t need = (na + nb + 15) / 16 * 16; // pieces stay 16-byte aligned
    if (!need) need = 16;
    if (s->used + need > s->cap) {
        stream_idle(c);
        cuda_staging_reserve(s, need);
    }
    char *h = s->host + s->used, *d = s->dev + s->used;
    s->used += need;
    memcpy(h, a, na);
    if (b) memcpy(h + na, b, nb);
    CUDA_CHECK(cudaMemcpyAsync(d, h, na + nb, cudaMemcpyHostToDevice, c->stream));
    return d;
}

// A host index array on the device, for one op.
static const int32_t *stage_indices(cuda_backend *c, const int32_t *idx, int n, const char *op) {
    return (const int32_t *)stage_host(c, idx, sizeof(int32_t) * (size_t)n, NULL, 0, op);
}

// ---- ops ----------------------------------------------------------------

static void cu_embedding(nb_backend *b, float *out, const nb_weight *table, const int32_t *tokens, int n) {
    cuda_backend *c = cuda_impl(b);
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= table->rows) {
            // model_forward validates ids; reaching here is a bug
            fprintf(stderr, "nibble: cuda embedding: token id %d out of range [0, %lld)\n", tokens[t],
                    (long long)table->rows);
            abort();
        }
    cuda_embedding(c, out, table, stage_indices(c, tokens, n, "embedding"), n);
}

static void cu_rmsnorm(nb_backend *b, float *out, const float *x, const nb_weight *w, int n, float eps) {
    cuda_rmsnorm(cuda_impl(b), out, x, w, n, eps);
}

static void cu_add_rmsnorm(nb_backend *b, float *out, float *x, const float *delta, const nb_weight *w, int n,
                           float eps) {
    cuda_add_rmsnorm(cuda_impl(b), out, x, delta, w, n, eps);
}

static void cu_matmul(nb_backend *b, float *out, const float *x, const nb_weight *w, int M) {
    cuda_matmul(cuda_impl(b), out, x, w, M);
}

static int cu_matmul_silu(nb_backend *b, float *out, const float *gate, const float *up, int ld, const nb_weight *w,
                          int M) {
    if (w->dtype == NB_FP8_B128) {
        cuda_fp8_matmul_silu(cuda_impl(b), out, gate, up, ld, w, M);
        return 0;
    }
    if (w->layout == NB_LAYOUT_TC) return cuda_wint_tc_matmul_silu(cuda_impl(b), out, gate, up, ld, w, M);
    return 1;
}

static void cu_add_bias(nb_backend *b, float *x, const nb_weight *bias, int M) {
    cuda_add_bias(cuda_impl(b), x, bias, M);
}

static void cu_add(nb_backend *b, float *out, const float *a, const float *c2, size_t n) {
    cuda_add(cuda_impl(b), out, a, c2, n);
}

static void cu_silu_mul(nb_backend *b, float *out, const float *gate, const float *up, int n, int cols, int ld) {
    cuda_silu_mul(cuda_impl(b), out, gate, up, n, cols, ld);
}

static void cu_rope(nb_backend *b, float *x, int n_heads, int head_dim, int stride, const float *inv_freq,
                    int interleaved) {
    cuda_backend *c = cuda_impl(b);
    cur_batch(c, "rope");
    cuda_rope(c, x, n_heads, head_dim, stride, inv_freq, interleaved);
}

static void cu_rope_kv_write(nb_backend *b, float *x, void *k_cache, void *v_cache, const nb_attn_shape *s,
                             const nb_weight *q_norm, const nb_weight *k_norm, float eps, const float *inv_freq,
                             int interleaved) {
    cuda_backend *c = cuda_impl(b);
    cur_batch(c, "rope_kv_write");
    cuda_rope_kv_write(c, x, k_cache, v_cache, s, q_norm, k_norm, eps, inv_freq, interleaved);
}

static void cu_kv_write(nb_backend *b, void *k_cache, void *v_cache, const float *k, const float *v,
                        const nb_attn_shape *s) {
    cuda_backend *c = cuda_impl(b);
    cur_batch(c, "kv_write");
    cuda_kv_write(c, k_cache, v_cache, k, v, s);
}

static void cu_attention(nb_backend *b, float *out, const float *q, const void *k_cache, const void *v_cache,
                         const nb_attn_shape *s) {
    cuda_backend *c = cuda_impl(b);
    cur_batch(c, "attention");
    cuda_attention(c, out, q, k_cache, v_cache, s);
}

static void cu_softmax(nb_backend *b, float *x, int n, int cols) { cuda_softmax(cuda_impl(b), x, n, cols); }

static void cu_gather_rows(nb_backend *b, float *out, const float *x, const int32_t *rows, int n_rows, int cols) {
    cuda_backend *c = cuda_impl(b);
    if (n_rows <= 0) return;
    cuda_gather_rows(c, out, x, stage_indices(c, rows, n_rows, "gather_rows"), n_rows, cols);
}

static void cu_zero(nb_backend *b, void *p, size_t bytes) {
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cuda_impl(b)->stream));
}

static void cu_gather_rows_dev(nb_backend *b, float *out, const float *x, const int32_t *rows, int n_rows, int cols) {
    if (n_rows > 0) cuda_gather_rows(cuda_impl(b), out, x, rows, n_rows, cols);
}

static void cu_moe_route(nb_backend *b, int32_t *groups, int32_t *rows, int32_t *slot, float *w, const float *logits,
                         int n, const nb_moe_route *r) {
    cuda_moe_route(cuda_impl(b), groups, rows, slot, w, logits, n, r);
}

static void *cu_experts_create(nb_backend *b, const nb_weight *w, int n) {
    return cuda_experts_create(cuda_impl(b), w, n);
}

static void cu_experts_free(nb_backend *b, void *set) { cuda_experts_free(cuda_impl(b), set); }

static void cu_matmul_experts(nb_backend *b, float *out, const float *x, const void *set, const int32_t *groups,
                              int n_tokens, int n_rows) {
    cuda_matmul_experts(cuda_impl(b), out, x, set, groups, n_tokens, n_rows);
}

static int cu_experts_recordable(nb_backend *b, const void *set, int n_tokens) {
    return cuda_experts_recordable(set, n_tokens);
}

static void cu_moe_combine(nb_backend *b, float *out, const float *ye, const int32_t *slot, const float *w, int n,
                           int K, int cols) {
    cuda_moe_combine(cuda_impl(b), out, ye, slot, w, n, K, cols);
}

static void cu_sample(nb_backend *b, int32_t *ids, float *x, int n, int cols, const nb_sample_row *rows) {
    cuda_sample(cuda_impl(b), ids, x, n, cols, rows);
}

static void cu_sync(nb_backend *b) { stream_idle(cuda_impl(b)); }

static int cu_supports(nb_backend *b, nb_dtype t) { return t >= 0 && t < NB_DTYPE_COUNT; }

static int cu_mem_info(nb_backend *b, size_t *free_bytes, size_t *total_bytes) {
    cuda_backend *c = cuda_impl(b);
    int prev = cuda_device_enter(c); // cudaMemGetInfo reports the current device
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
    cuda_device_leave(c, prev);
    return 0;
}

static void cu_all_reduce(nb_backend *b, float *x, size_t n) { cuda_comm_all_reduce(cuda_impl(b), x, n); }

static void cu_all_gather(nb_backend *b, float *out, const float *in, size_t n) {
    cuda_comm_all_gather(cuda_impl(b), out, in, n);
}

static void cu_attach(nb_backend *b) { CUDA_CHECK(cudaSetDevice(cuda_impl(b)->device)); }

// ---- graphs -------------------------------------------------------------

void cuda_graphs_clear(cuda_backend *c) {
    for (int i = 0; i < c->n_graphs; i++) CUDA_CHECK(cudaGraphExecDestroy(c->graphs[i].exec));
    c->n_graphs = 0;
    if (c->n_retired) CUDA_CHECK(cudaStreamSynchronize(c->stream));
    for (int i = 0; i < c->n_retired; i++) CUDA_CHECK(cudaFree(c->retired[i]));
    c->n_retired = 0;
}

static int cu_graph_begin(nb_backend *b, uint64_t key) {
    cuda_backend *c = cuda_impl(b);
    if (key == 0) return 0;
    for (int i = 0; i < c->n_graphs; i++)
        if (c->graphs[i].key == key) {
            CUDA_CHECK(cudaGraphLaunch(c->graphs[i].exec, c->stream));
            return 1;
        }
    if (c->n_graphs == CUDA_MAX_GRAPHS) return 0; // full: this size runs eagerly
    // Relaxed: scratch may grow (cudaMalloc) while the step is recorded.
    CUDA_CHECK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeRelaxed));
    c->capturing = key;
    return 0;
}

// Counts the recorded graph's kernel nodes and logs them with the other
// nodes (copies, memsets), so that a fusion's effect on the kernels a decode
// step launches can be measured, on a GPU as on the emulator.
static void graph_report(cuda_backend *c, cudaGraph_t g) {
    size_t n = 0;
    CUDA_CHECK(cudaGraphGetNodes(g, NULL, &n));
    cudaGraphNode_t *nodes = (cudaGraphNode_t *)xmalloc(sizeof(cudaGraphNode_t) * (n ? n : 1));
    CUDA_CHECK(cudaGraphGetNodes(g, nodes, &n));
    int kernels = 0;
    for (size_t i = 0; i < n; i++) {
        enum cudaGraphNodeType t;
        CUDA_CHECK(cudaGraphNodeGetType(nodes[i], &t));
        kernels += t == cudaGraphNodeTypeKernel;
    }
    free(nodes);
    log_info("cuda:%d: recorded a decode step of %d tokens: %d kernels, %d other nodes", c->device,
             c->batch.n_tokens, kernels, (int)n - kernels);
}

static void cu_graph_end(nb_backend *b) {
    cuda_backend *c = cuda_impl(b);
    if (!c->capturing) return;
    cudaGraph_t g = NULL;
    CUDA_CHECK(cudaStreamEndCapture(c->stream, &g));
    graph_report(c, g);
    cudaGraphExec_t exec = NULL;
    cudaError_t rc = cudaGraphInstantiate(&exec, g, 0);
    if (rc != cudaSuccess) {
        // The recorded ops have not run, so the step cannot go on without
        // them; a graph the driver refuses is a bug in what we recorded.
        fprintf(stderr, "nibble: cuda: recording a decode step failed: %s\n", cudaGetErrorString(rc));
        abort();
    }
    CUDA_CHECK(cudaGraphDestroy(g));
    c->graphs[c->n_graphs].key = c->capturing;
    c->graphs[c->n_graphs].exec = exec;
    c->n_graphs++;
    c->capturing = 0;
    // recording ran nothing: run it now
    CUDA_CHECK(cudaGraphLaunch(exec, c->stream));
}

// ---- lifetime -------------------------------------------------------------

static void cu_destroy(nb_backend *b) {
    if (!b) return;
    cuda_backend *c = cuda_impl(b);
    // backend_destroy tears a whole group down from one thread
    int device = c->device, prev = cuda_device_enter(c);
    cudaStreamSynchronize(c->stream);
    // the communicators go first, while every rank's stream and recorded
    // steps (which may hold NCCL work) still exist
    cuda_comm_leave(c);
    cuda_graphs_clear(c);
    free(c->retired);
    cuda_gemm_algos_free(c);
    cuda_fp8_free(c);
    cuda_wint_free(c);
    if (c->lt) cublasLtDestroy(c->lt);
    cudaFree(c->lt_ws);
    cudaFree(c->conv);
    cudaFree(c->attn_part);
    cudaFree(c->attn_cnt);
    cudaFree(c->meta_dev);
    if (c->meta_host) cudaFreeHost(c->meta_host);
    if (c->pack_host) cudaFreeHost(c->pack_host);
    cuda_staging_free(&c->idx);
    cuda_staging_free(&c->moe);
    cuda_staging_free(&c->smp);
    free(c->host_pos);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
    free(b);
    if (prev >= 0 && prev != device) cudaSetDevice(prev);
}

static nb_backend_ops make_ops(void) {
    nb_backend_ops o;
    memset(&o, 0, sizeof o);
    o.name = "cuda";
    o.alloc = cu_alloc;
    o.free = cu_free;
    o.upload = cu_upload;
    o.download = cu_download;
    o.weight_load = cu_weight_load;
    o.weight_free = cu_weight_free;
    o.weight_pack = cu_weight_pack;
    o.set_batch = cu_set_batch;
    o.embedding = cu_embedding;
    o.rmsnorm = cu_rmsnorm;
    o.add_rmsnorm = cu_add_rmsnorm;
    o.matmul = cu_matmul;
    o.add_bias = cu_add_bias;
    o.add = cu_add;
    o.silu_mul = cu_silu_mul;
    o.matmul_silu = cu_matmul_silu;
    o.rope = cu_rope;
    o.rope_kv_write = cu_rope_kv_write;
    o.kv_write = cu_kv_write;
    o.attention = cu_attention;
    o.softmax = cu_softmax;
    o.gather_rows = cu_gather_rows;
    o.zero = cu_zero;
    o.gather_rows_dev = cu_gather_rows_dev;
    o.moe_route = cu_moe_route;
    o.experts_create = cu_experts_create;
    o.experts_free = cu_experts_free;
    o.matmul_experts = cu_matmul_experts;
    o.experts_recordable = cu_experts_recordable;
    o.moe_combine = cu_moe_combine;
    o.sync = cu_sync;
    o.sample = cu_sample;
    o.destroy = cu_destroy;
    o.supports = cu_supports;
    o.mem_info = cu_mem_info;
    o.graph_begin = cu_graph_begin;
    o.graph_end = cu_graph_end;
    o.all_reduce = cu_all_reduce;
    o.all_gather = cu_all_gather;
    o.attach = cu_attach;
    o.kv_default = NB_KV_BF16;
    o.records_graphs = 1;
    return o;
}

static const nb_backend_ops CUDA_OPS = make_ops();

extern "C" nb_backend *cuda_backend_create(int device, nb_err *e) {
    cudaError_t rc = cudaSetDevice(device);
    if (rc != cudaSuccess) {
        nb_errf(e, "cuda:%d: %s", device, cudaGetErrorString(rc));
        cudaGetLastError();
        return NULL;
    }
    cuda_backend *c = (cuda_backend *)calloc(1, sizeof *c);
    nb_backend *b = (nb_backend *)calloc(1, sizeof *b);
    if (!c || !b) abort();
    b->ops = &CUDA_OPS;
    b->impl = c;
    b->n_ranks = 1; // alone until cuda_backend_create_group joins it to others
    c->device = device;
    if ((rc = cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess ||
        (rc = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (rc = cudaMalloc(&c->lt_ws, LT_WORKSPACE)) != cudaSuccess) {
        nb_errf(e, "cuda:%d: %s", device, cudaGetErrorString(rc));
        cu_destroy(b);
        return NULL;
    }
    c->lt_ws_size = LT_WORKSPACE;
    if (cublasLtCreate(&c->lt) != CUBLAS_STATUS_SUCCESS) {
        c->lt = NULL;
        nb_errf(e, "cuda:%d: cuBLASLt did not start", device);
        cu_destroy(b);
        return NULL;
    }
    char desc[256];
    cuda_device_describe(device, desc, sizeof desc);
    log_info("cuda backend: %s", desc);
    return b;
}
