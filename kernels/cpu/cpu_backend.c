/* The CPU backend: host memory, a thread pool, and the ops table over the
 * kernels in cpu_matmul.c and cpu_attention.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/threadpool.h"

/* Elementwise ops smaller than this run on the caller alone. */
#define ELEM_PAR_MIN (1 << 16)

typedef struct cpu_backend {
    threadpool *pool;
    nb_batch batch; /* copied by set_batch; its arrays belong to the caller */
    int has_batch;
    /* sample: per-task scratch for sample_row_ref, [threads][cap] each */
    float *sample_prob;
    int32_t *sample_idx;
    size_t sample_cap;
    cpu_comm *comm; /* tensor parallelism: the group's, or NULL alone */
} cpu_backend;

static cpu_backend *impl(nb_backend *b) { return b->impl; }

static const nb_batch *cur_batch(nb_backend *b, const char *op) {
    cpu_backend *c = impl(b);
    if (!c->has_batch) {
        fprintf(stderr, "nibble: cpu %s called before set_batch\n", op);
        abort();
    }
    return &c->batch;
}

/* ---- memory ------------------------------------------------------------ */

static void *cpu_alloc(nb_backend *b, size_t bytes) {
    /* 64-byte aligned and rounded up to whole cache lines */
    size_t n = (bytes + 63) & ~(size_t)63;
    if (n == 0) n = 64;
    void *p = NULL;
    if (posix_memalign(&p, 64, n)) {
        fprintf(stderr, "nibble: out of memory allocating %zu bytes\n", bytes);
        abort();
    }
    memset(p, 0, n);
    return p;
}

static void cpu_free(nb_backend *b, void *p) { free(p); }

static void cpu_copy(nb_backend *b, void *dst, const void *src, size_t bytes) {
    if (bytes) memcpy(dst, src, bytes);
}

static const void *cpu_weight_load(nb_backend *b, const void *host, size_t bytes) { return host; }

static void cpu_weight_free(nb_backend *b, const void *p) {}

static void cpu_set_batch(nb_backend *b, const nb_batch *batch) {
    impl(b)->batch = *batch;
    impl(b)->has_batch = 1;
}

/* ---- row-parallel helper ----------------------------------------------- */

typedef void (*rows_fn)(void *arg, size_t r0, size_t r1);

typedef struct rows_job {
    rows_fn fn;
    void *arg;
    size_t n_rows, per_task;
} rows_job;

static void rows_task(void *arg, int task) {
    const rows_job *j = arg;
    size_t r0 = (size_t)task * j->per_task, r1 = r0 + j->per_task;
    if (r1 > j->n_rows) r1 = j->n_rows;
    j->fn(j->arg, r0, r1);
}

/* Runs fn over [0, n_rows) in a few chunks per thread when the op touches
 * enough elements to be worth it, else inline. */
static void run_rows(nb_backend *b, size_t n_rows, size_t row_width, rows_fn fn, void *arg) {
    threadpool *pool = impl(b)->pool;
    int threads = threadpool_size(pool);
    if (n_rows < 2 || threads == 1 || n_rows * row_width < ELEM_PAR_MIN) {
        fn(arg, 0, n_rows);
        return;
    }
    size_t tasks = (size_t)threads * 4;
    if (tasks > n_rows) tasks = n_rows;
    rows_job j = {fn, arg, n_rows, (n_rows + tasks - 1) / tasks};
    threadpool_run(pool, (int)((n_rows + j.per_task - 1) / j.per_task), rows_task, &j);
}

/* ---- ops --------------------------------------------------------------- */

static void cpu_embedding(nb_backend *b, float *out, const nb_weight *table, const int32_t *tokens,
                          int n) {
    size_t row_bytes = (size_t)table->cols * nb_dtype_size(table->dtype);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= table->rows) {
            /* model_forward validates ids; reaching here is a bug */
            fprintf(stderr, "nibble: cpu embedding: token id %d out of range [0, %lld)\n", tokens[t],
                    (long long)table->rows);
            abort();
        }
        cpu_row_to_f32(out + (size_t)t * table->cols, (const char *)table->data + (size_t)tokens[t] * row_bytes,
                       table->dtype, table->cols);
    }
}

void cpu_rmsnorm_row(float *out, const float *x, const float *w, int n, float eps) {
    float ss = cpu_dot_f32(x, x, n);
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    /* HF order: (x * rsqrt(var + eps)) then * weight */
    for (int i = 0; i < n; i++) out[i] = (x[i] * scale) * w[i];
}

typedef struct norm_job {
    float *out;
    const float *x;
    const float *w; /* FP32 copy of the weight */
    int cols;
    float eps;
} norm_job;

static void norm_rows(void *arg, size_t r0, size_t r1) {
    const norm_job *j = arg;
    for (size_t r = r0; r < r1; r++) cpu_rmsnorm_row(j->out + r * j->cols, j->x + r * j->cols, j->w, j->cols, j->eps);
}

static void cpu_rmsnorm(nb_backend *b, float *out, const float *x, const nb_weight *w, int n, float eps) {
    int cols = (int)w->cols;
    float stack_w[4096];
    float *wf = cols <= 4096 ? stack_w : xmalloc(sizeof(float) * (size_t)cols);
    cpu_row_to_f32(wf, w->data, w->dtype, cols);
    norm_job j = {out, x, wf, cols, eps};
    run_rows(b, (size_t)n, (size_t)cols, norm_rows, &j);
    if (wf != stack_w) free(wf);
}

static void cpu_add(nb_backend *b, float *out, const float *a, const float *c, size_t n);

/* The CPU gains nothing from fusing: the add, then the norm, in the same
 * order as the unfused ops. */
static void cpu_add_rmsnorm(nb_backend *b, float *out, float *x, const float *delta, const nb_weight *w, int n,
                            float eps) {
    cpu_add(b, x, x, delta, (size_t)n * (size_t)w->cols);
    cpu_rmsnorm(b, out, x, w, n, eps);
}

static void cpu_matmul_op(nb_backend *b, float *out, const float *x, const nb_weight *w, int M) {
    cpu_matmul(impl(b)->pool, out, x, w, M);
}

static void cpu_add_bias(nb_backend *b, float *x, const nb_weight *bias, int M) {
    int cols = (int)bias->cols;
    float stack_b[4096];
    float *bf = cols <= 4096 ? stack_b : xmalloc(sizeof(float) * (size_t)cols);
    cpu_row_to_f32(bf, bias->data, bias->dtype, cols);
    for (int r = 0; r < M; r++) {
        float *row = x + (size_t)r * cols;
        for (int i = 0; i < cols; i++) row[i] += bf[i];
    }
    if (bf != stack_b) free(bf);
}

/* Elementwise ops run over blocks of ELEM_BLOCK elements as "rows". */
#define ELEM_BLOCK 4096

typedef struct elem_job {
    float *out;
    const float *a, *c;
    size_t n;
} elem_job;

static void add_rows(void *arg, size_t r0, size_t r1) {
    const elem_job *j = arg;
    size_t i1 = r1 * ELEM_BLOCK < j->n ? r1 * ELEM_BLOCK : j->n;
    for (size_t i = r0 * ELEM_BLOCK; i < i1; i++) j->out[i] = j->a[i] + j->c[i];
}

/* silu_mul over out's n * cols elements in ELEM_BLOCK pieces; a piece may
 * span rows, whose gate and up lie ld apart. */
typedef struct silu_job {
    float *out;
    const float *gate, *up;
    size_t n, cols, ld;
} silu_job;

static void silu_mul_rows(void *arg, size_t r0, size_t r1) {
    const silu_job *j = arg;
    size_t i = r0 * ELEM_BLOCK, i1 = r1 * ELEM_BLOCK < j->n ? r1 * ELEM_BLOCK : j->n;
    while (i < i1) {
        size_t r = i / j->cols, end = (r + 1) * j->cols < i1 ? (r + 1) * j->cols : i1;
        /* element i of out is column i - r * cols of row r */
        const float *g = j->gate + r * (j->ld - j->cols), *u = j->up + r * (j->ld - j->cols);
        for (; i < end; i++) j->out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

static void cpu_add(nb_backend *b, float *out, const float *a, const float *c, size_t n) {
    elem_job j = {out, a, c, n};
    run_rows(b, (n + ELEM_BLOCK - 1) / ELEM_BLOCK, ELEM_BLOCK, add_rows, &j);
}

static void cpu_silu_mul(nb_backend *b, float *out, const float *gate, const float *up, int n_rows, int cols,
                         int ld) {
    size_t n = (size_t)n_rows * (size_t)cols;
    silu_job j = {out, gate, up, n, (size_t)cols, (size_t)ld};
    run_rows(b, (n + ELEM_BLOCK - 1) / ELEM_BLOCK, ELEM_BLOCK, silu_mul_rows, &j);
}

static void cpu_rope_op(nb_backend *b, float *x, int n_heads, int head_dim, int stride, const float *inv_freq,
                        int interleaved) {
    cpu_rope(impl(b)->pool, cur_batch(b, "rope"), x, n_heads, head_dim, stride, inv_freq, interleaved, NULL);
}

static void cpu_rope_kv_write(nb_backend *b, float *x, void *k_cache, void *v_cache, const nb_attn_shape *s,
                              const nb_weight *q_norm, const nb_weight *k_norm, float eps, const float *inv_freq,
                              int interleaved) {
    const nb_batch *batch = cur_batch(b, "rope_kv_write");
    int hd = s->head_dim, ld = s->q_stride;
    nb_rope_kv_write_check("cpu", s, q_norm, k_norm);
    if (q_norm && hd > CPU_MAX_HEAD_DIM) {
        /* the norms' rows below are read into buffers of this size */
        fprintf(stderr, "nibble: cpu rope_kv_write: head_dim %d above %d\n", hd, CPU_MAX_HEAD_DIM);
        abort();
    }
    float qw[CPU_MAX_HEAD_DIM], kw[CPU_MAX_HEAD_DIM];
    cpu_head_norm norm = {qw, kw, s->n_heads, eps};
    if (q_norm) {
        cpu_row_to_f32(qw, q_norm->data, q_norm->dtype, hd);
        cpu_row_to_f32(kw, k_norm->data, k_norm->dtype, hd);
    }
    cpu_rope(impl(b)->pool, batch, x, s->n_heads + s->n_kv_heads, hd, ld, inv_freq, interleaved,
             q_norm ? &norm : NULL);
    float *k = x + (size_t)s->n_heads * hd, *v = k + (size_t)s->n_kv_heads * hd;
    cpu_kv_write(batch, k_cache, v_cache, k, v, s);
}

static void cpu_kv_write_op(nb_backend *b, void *k_cache, void *v_cache, const float *k,
                            const float *v, const nb_attn_shape *s) {
    cpu_kv_write(cur_batch(b, "kv_write"), k_cache, v_cache, k, v, s);
}

static void cpu_attention_op(nb_backend *b, float *out, const float *q, const void *k_cache,
                             const void *v_cache, const nb_attn_shape *s) {
    cpu_attention(impl(b)->pool, cur_batch(b, "attention"), out, q, k_cache, v_cache, s);
}

typedef struct softmax_job {
    float *x;
    int cols;
} softmax_job;

static void softmax_rows(void *arg, size_t r0, size_t r1) {
    const softmax_job *j = arg;
    for (size_t r = r0; r < r1; r++) {
        float *x = j->x + r * j->cols;
        float mx = -INFINITY;
        for (int i = 0; i < j->cols; i++)
            if (x[i] > mx) mx = x[i];
        float sum = 0.0f;
        for (int i = 0; i < j->cols; i++) {
            x[i] = expf(x[i] - mx);
            sum += x[i];
        }
        float inv = 1.0f / sum;
        for (int i = 0; i < j->cols; i++) x[i] *= inv;
    }
}

static void cpu_softmax(nb_backend *b, float *x, int n, int cols) {
    softmax_job j = {x, cols};
    run_rows(b, (size_t)n, (size_t)cols, softmax_rows, &j);
}

static void cpu_gather_rows(nb_backend *b, float *out, const float *x, const int32_t *rows, int n_rows,
                            int cols) {
    for (int i = 0; i < n_rows; i++)
        memmove(out + (size_t)i * cols, x + (size_t)rows[i] * cols, sizeof(float) * (size_t)cols);
}

static void cpu_zero(nb_backend *b, void *p, size_t bytes) { memset(p, 0, bytes); }

static void cpu_sync(nb_backend *b) {}

static int cpu_supports(nb_backend *b, nb_dtype t) { return t >= 0 && t < NB_DTYPE_COUNT; }

static int cpu_mem_info(nb_backend *b, size_t *free_bytes, size_t *total_bytes) { return -1; }

/* The CPU records nothing: every step issues its ops. */
static int cpu_graph_begin(nb_backend *b, uint64_t key) { return 0; }

static void cpu_graph_end(nb_backend *b) {}

/* Rows are independent: task j takes rows j, j + tasks, ... with scratch j. */
typedef struct sample_job {
    cpu_backend *c;
    int32_t *ids;
    float *x;
    int n, cols, tasks;
    const nb_sample_row *rows;
} sample_job;

static void sample_task(void *arg, int task) {
    sample_job *j = arg;
    float *prob = j->c->sample_prob + (size_t)task * j->cols;
    int32_t *idx = j->c->sample_idx + (size_t)task * j->cols;
    for (int r = task; r < j->n; r += j->tasks)
        j->ids[r] = sample_row_ref(j->x + (size_t)r * j->cols, j->cols, &j->rows[r], prob, idx);
}

static void cpu_sample(nb_backend *b, int32_t *ids, float *x, int n, int cols, const nb_sample_row *rows) {
    cpu_backend *c = impl(b);
    int threads = threadpool_size(c->pool), tasks = n < threads ? n : threads;
    if (tasks <= 0) return;
    size_t need = (size_t)threads * (size_t)cols;
    if (need > c->sample_cap) {
        free(c->sample_prob);
        free(c->sample_idx);
        c->sample_prob = xmalloc(sizeof(float) * need);
        c->sample_idx = xmalloc(sizeof(int32_t) * need);
        c->sample_cap = need;
    }
    sample_job j = {c, ids, x, n, cols, tasks, rows};
    threadpool_run(c->pool, tasks, sample_task, &j);
}

static void cpu_all_reduce(nb_backend *b, float *x, size_t n) {
    if (impl(b)->comm) cpu_comm_all_reduce(impl(b)->comm, b->rank, x, n);
}

static void cpu_all_gather(nb_backend *b, float *out, const float *in, size_t n) {
    if (impl(b)->comm) cpu_comm_all_gather(impl(b)->comm, b->rank, out, in, n);
    else memcpy(out, in, sizeof(float) * n);
}

static void cpu_destroy(nb_backend *b) {
    if (!b) return;
    cpu_comm_release(impl(b)->comm);
    free(impl(b)->sample_prob);
    free(impl(b)->sample_idx);
    threadpool_destroy(impl(b)->pool);
    free(b->impl);
    free(b);
}

static const nb_backend_ops CPU_OPS = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .weight_load = cpu_weight_load,
    .weight_free = cpu_weight_free,
    .set_batch = cpu_set_batch,
    .embedding = cpu_embedding,
    .rmsnorm = cpu_rmsnorm,
    .add_rmsnorm = cpu_add_rmsnorm,
    .matmul = cpu_matmul_op,
    .add_bias = cpu_add_bias,
    .add = cpu_add,
    .silu_mul = cpu_silu_mul,
    .rope = cpu_rope_op,
    .rope_kv_write = cpu_rope_kv_write,
    .kv_write = cpu_kv_write_op,
    .attention = cpu_attention_op,
    .softmax = cpu_softmax,
    .gather_rows = cpu_gather_rows,
    .zero = cpu_zero,
    .gather_rows_dev = cpu_gather_rows,
    .moe_route = cpu_moe_route,
    .experts_create = cpu_experts_create,
    .experts_free = cpu_experts_free,
    .matmul_experts = cpu_matmul_experts,
    .experts_recordable = cpu_experts_recordable,
    .moe_combine = cpu_moe_combine,
    .sample = cpu_sample,
    .sync = cpu_sync,
    .destroy = cpu_destroy,
    .supports = cpu_supports,
    .mem_info = cpu_mem_info,
    .graph_begin = cpu_graph_begin,
    .graph_end = cpu_graph_end,
    .all_reduce = cpu_all_reduce,
    .all_gather = cpu_all_gather,
    .weights_in_place = 1,
    .kv_default = NB_KV_F32,
};

nb_backend *cpu_backend_create(int threads, nb_err *e) {
    threadpool *pool = threadpool_create(threads, e);
    if (!pool) return NULL;
    cpu_backend *c = xcalloc(1, sizeof *c);
    c->pool = pool;
    nb_backend *b = xcalloc(1, sizeof *b);
    b->ops = &CPU_OPS;
    b->impl = c;
    b->n_ranks = 1;
    log_debug("cpu backend: %d threads, %s kernels", threadpool_size(pool), cpu_simd_name());
    return b;
}

int cpu_backend_create_group(int threads, int n, nb_backend **out, nb_err *e) {
    if (threads <= 0) threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    cpu_comm *comm = cpu_comm_create(n, e);
    if (!comm) return -1;
    for (int r = 0; r < n; r++) {
        /* the ranks share the machine's cores */
        int t = threads / n > 0 ? threads / n : 1;
        if (!(out[r] = cpu_backend_create(t, e))) {
            for (int k = 0; k < r; k++) backend_destroy(out[k]);
            for (int k = r; k < n; k++) cpu_comm_release(comm);
            return -1;
        }
        impl(out[r])->comm = comm;
        out[r]->rank = r;
        out[r]->n_ranks = n;
    }
    return 0;
}
