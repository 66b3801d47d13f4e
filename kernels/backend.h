/* The backend interface: the table of operations a model forward needs.
 *
 * Everything above kernels/ calls these and nothing else, so it never knows
 * whether it runs on the CPU or on a GPU. Pointers named "device" below live
 * in the backend's memory (on the CPU backend, ordinary host memory).
 *
 * Conventions of this revision:
 *  - activations are FP32, row-major [n_tokens, width];
 *  - weights are row-major [rows = out features, cols = in features], as in a
 *    Hugging Face nn.Linear, stored as F32, BF16 or F16 (quantized formats
 *    come with quant/); all accumulation is FP32;
 *  - the KV cache is paged: per layer one K and one V buffer of num_blocks
 *    blocks; a block holds [block_size][n_kv_heads][head_dim] values of the
 *    cache dtype, then (INT8 and FP8 only) [block_size][n_kv_heads] FP32
 *    scales, one per token per head, computed as the token is written
 *    (value = stored * scale). A sequence owns a list of blocks (its block
 *    table) and token i of it lives in slot
 *    block_table[i / block_size] * block_size + i % block_size.
 */
#ifndef NB_BACKEND_H
#define NB_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

#define NB_KV_BLOCK_SIZE 16

typedef enum nb_dtype {
    NB_F32 = 0,
    NB_BF16 = 1,
    NB_F16 = 2,
    /* weight-only quantized formats (layouts in quant/quant.h) */
    NB_WINT8 = 3,
    NB_WINT4 = 4,
    NB_WINT2 = 5,
    NB_FP8_B128 = 6, /* E4M3 with one FP32 scale per 128x128 block */
    NB_DTYPE_COUNT
} nb_dtype;

size_t nb_dtype_size(nb_dtype t);
const char *nb_dtype_name(nb_dtype t);

/* The byte order of a weight's data and scale: quant/quant.h's, or the
 * tensor-core fragment order of quant/quant_tc.h, which a backend's
 * weight_pack may give WINT8/WINT4 weights (then only that backend's ops
 * read them). */
typedef enum nb_layout {
    NB_LAYOUT_PLAIN = 0,
    NB_LAYOUT_TC = 1,
} nb_layout;

/* A weight matrix (or vector, rows == 1) resident in backend memory. For the
 * quantized dtypes, data holds the packed values and scale/scale2/group
 * describe how to read them back (quant/quant.h). */
typedef struct nb_weight {
    nb_dtype dtype;
    int64_t rows, cols;
    const void *data;
    const void *scale;  /* quantized dtypes only */
    const void *scale2; /* NB_WINT2: per-row super scales */
    int group;          /* NB_WINT4, NB_WINT2: columns per scale group */
    nb_layout layout;   /* NB_LAYOUT_PLAIN unless weight_pack changed it */
} nb_weight;

/* Where each token of a step sits. Host pointers; they must stay valid until
 * the step's last op returns. A step's tokens may come from many sequences
 * (continuous batching): token t belongs to sequence seq_of[t], sits at
 * absolute position pos[t] in it, and attends to positions 0..pos[t]. */
typedef struct nb_batch {
    int n_tokens;
    const int32_t *pos;          /* [n_tokens] */
    const int32_t *seq_of;       /* [n_tokens] index into the block tables */
    const int32_t *slot;         /* [n_tokens] KV slot the token's K/V go to */
    int n_seqs;
    int max_blocks;              /* row stride of block_tables */
    const int32_t *block_tables; /* [n_seqs][max_blocks] */
} nb_batch;

/* KV cache element types (--kv-cache-dtype). */
typedef enum nb_kv_dtype {
    NB_KV_F32 = 0, /* the CPU default: activations are FP32 */
    NB_KV_BF16,
    NB_KV_INT8,    /* symmetric, scale = max|x| / 127 per token per head */
    NB_KV_FP8,     /* E4M3, scale = max|x| / 448 per token per head */
} nb_kv_dtype;

const char *nb_kv_dtype_name(nb_kv_dtype t);
/* Bytes of one KV block (values and scales) for one of K or V. */
size_t nb_kv_block_bytes(nb_kv_dtype t, int n_kv_heads, int head_dim);

/* Shapes of one attention layer. q_stride and kv_stride are the floats
 * from one token's row of q (attention's input) and of k and v (kv_write's)
 * to the next: rows of a fused q|k|v projection lie q_dim + 2 * kv_dim
 * apart. 0 means packed rows (n_heads * head_dim, n_kv_heads * head_dim). */
typedef struct nb_attn_shape {
    int n_heads, n_kv_heads, head_dim;
    float scale; /* usually 1/sqrt(head_dim) */
    nb_kv_dtype kv_dtype;
    int q_stride, kv_stride;
} nb_attn_shape;

static inline int nb_attn_q_stride(const nb_attn_shape *s) {
    return s->q_stride ? s->q_stride : s->n_heads * s->head_dim;
}
static inline int nb_attn_kv_stride(const nb_attn_shape *s) {
    return s->kv_stride ? s->kv_stride : s->n_kv_heads * s->head_dim;
}
/* Whether s describes rows of a fused q|k|v projection (rope_kv_write's
 * input): q and k and v in one row, q_stride == kv_stride apart. */
static inline int nb_attn_fused_rows(const nb_attn_shape *s) {
    return s->q_stride == s->kv_stride && s->q_stride >= (s->n_heads + 2 * s->n_kv_heads) * s->head_dim;
}
/* Aborts, naming the backend, unless rope_kv_write's arguments keep its
 * contract: rows of a fused q|k|v projection, and q_norm and k_norm both
 * NULL or both [head_dim]. The model binds them so; failing is a bug. */
void nb_rope_kv_write_check(const char *backend, const nb_attn_shape *s, const nb_weight *q_norm,
                            const nb_weight *k_norm);

/* One logits row's sampling (engine/sampler.h has the parameters' meaning):
 * the parameters, the uniform number the sequence's RNG drew for the step,
 * and the tokens the penalties touch. */
typedef struct nb_sample_row {
    float temperature; /* < 1e-5: greedy (argmax after the penalties) */
    int top_k;
    float top_p, min_p;
    float repetition_penalty, presence_penalty, frequency_penalty;
    double u;                  /* in [0, 1): where the draw lands in the kept mass */
    int n_hist;                /* distinct tokens in the prompt or the output so far */
    const int32_t *hist_ids;   /* [n_hist] host; no id twice */
    const int32_t *hist_count; /* [n_hist] times generated (0: in the prompt only) */
} nb_sample_row;

/* The reference every backend's sample op equals (kernels/cpu/cpu_sample.c),
 * in vLLM's order: penalties on the history tokens (written into logits),
 * temperature, then the kept set: the shortest prefix of the tokens ranked
 * by probability (lower id first on ties) that satisfies top-k, top-p (mass
 * >= top_p of the top-k mass, or of the whole mass without top-k) and min-p
 * (probability >= min_p times the top one); at least the top token. The
 * draw walks the kept tokens in id order and returns the first whose
 * running mass exceeds u times the kept mass. Probabilities are
 * (float)exp((double)((logit - max) / temperature)) and masses are summed in
 * double, so backends differ only where u lands within rounding of a
 * boundary. prob and idx are [vocab] scratch. */
int32_t sample_row_ref(float *logits, int vocab, const nb_sample_row *r, float *prob, int32_t *idx);
/* Log-softmax of an original logits row (before penalties and temperature;
 * kernels/cpu/cpu_sample.c): writes the n_top best ids and their logprobs,
 * best first (lower id on ties, NaN skipped; slots beyond vocab get id -1,
 * -inf), and returns chosen's logprob. */
float sample_logprobs_ref(const float *logits, int vocab, int32_t chosen, int n_top, int32_t *top_ids,
                          float *top_lp);

/* How a mixture of experts picks a token's experts, as Hugging Face's
 * routers do (engine/model/config.h's nb_moe_config). */
typedef struct nb_moe_route {
    int n_experts, n_used;
    int norm;           /* renormalize the chosen weights by max(their sum, norm_min) */
    float norm_min;
    const float *bias;  /* [n_experts] selection bias in backend memory, or NULL */
} nb_moe_route;

/* groups[] of moe_route for E experts: offsets, the count, the ids. */
#define NB_MOE_GROUPS(E) (2 * (E) + 2)
/* Most experts a mixture may have (DeepSeek-V3 has 256). */
#define NB_MOE_MAX_EXPERTS 512
/* Rows past the end an expert matmul's input must have room for. */
#define NB_MOE_PAD_ROWS 16

/* The reference every backend's moe_route equals (kernels/cpu/cpu_moe.c)
 * for one token: softmax of logits[E] in FP32; the n_used highest of
 * p + bias (host, or NULL; a lower id first on ties); their weights p,
 * renormalized when r->norm. chosen[] comes out in id order. */
void moe_route_ref(const nb_moe_route *r, const float *logits, const float *bias, int32_t *chosen, float *w);

typedef struct nb_backend nb_backend;

typedef struct nb_backend_ops {
    const char *name;

    /* memory */
    void *(*alloc)(nb_backend *b, size_t bytes); /* zeroed; NULL when device memory is full (host: aborts) */
    void (*free)(nb_backend *b, void *p);
    void (*upload)(nb_backend *b, void *dst, const void *src, size_t bytes);
    void (*download)(nb_backend *b, void *dst, const void *src, size_t bytes);
    /* Makes host weight bytes usable by the ops. The CPU backend returns
     * `host` itself (weights stay in the mmapped file); others copy, and
     * return NULL when their memory cannot hold the bytes (the model
     * loader reports it: a model too large for the device is the user's
     * to fix, not a crash). */
    const void *(*weight_load)(nb_backend *b, const void *host, size_t bytes);
    void (*weight_free)(nb_backend *b, const void *p);
    /* Optional (NULL: weights are loaded as they are, as on the CPU). Offered
     * each packed (quantized) matmul weight while its data, scale and scale2
     * are still host bytes: the backend may load it in a layout its kernels
     * read faster (w->layout names it), pointing w at backend memory that
     * weight_free frees, and return the bytes w holds there,
     * quant_weight_bytes(w). It returns 0, w untouched, for a weight it
     * leaves to be loaded as it is, and NB_WEIGHT_NO_MEMORY, w untouched
     * and nothing kept, when its memory cannot hold the weight.
     * backend_weight_load calls it. */
    size_t (*weight_pack)(nb_backend *b, nb_weight *w);

    /* Sets the token layout for the ops that follow (rope, kv_write,
     * attention). */
    void (*set_batch)(nb_backend *b, const nb_batch *batch);

    /* out[t] = table[tokens[t]]; tokens is a host array. */
    void (*embedding)(nb_backend *b, float *out, const nb_weight *table,
                      const int32_t *tokens, int n);
    /* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for n rows of w->cols.
     * out may equal x. */
    void (*rmsnorm)(nb_backend *b, float *out, const float *x, const nb_weight *w,
                    int n, float eps);
    /* x += delta, then out = rmsnorm(x) * w (the residual add fused with the
     * next norm); n rows of w->cols. out may equal delta, not x. */
    void (*add_rmsnorm)(nb_backend *b, float *out, float *x, const float *delta, const nb_weight *w,
                        int n, float eps);
    /* out[M,N] = x[M,K] @ w^T (w is [N,K]), FP32 accumulation. */
    void (*matmul)(nb_backend *b, float *out, const float *x, const nb_weight *w, int M);
    /* x[r] += bias for M rows of bias->cols. */
    void (*add_bias)(nb_backend *b, float *x, const nb_weight *bias, int M);
    /* out = a + c, n elements; out may alias either input. */
    void (*add)(nb_backend *b, float *out, const float *a, const float *c, size_t n);
    /* out[r] = silu(gate[r]) * up[r] for n rows of cols: out is [n][cols],
     * gate's and up's rows lie ld floats apart (ld >= cols; a fused
     * gate|up projection's rows hold both, ld = 2 * cols). out may equal
     * gate when ld == cols. */
    void (*silu_mul)(nb_backend *b, float *out, const float *gate, const float *up, int n, int cols, int ld);
    /* Optional (NULL: never): out[M,N] = (silu(gate) * up)[M,K] @ w^T
     * without the silu_mul op and its buffer, gate's and up's rows ld
     * floats apart as silu_mul's, the same values as silu_mul then matmul.
     * Returns 0 when done, 1 when it does not fuse for w (nothing done: the
     * caller runs the two ops). CUDA fuses block_wise_fp8, whose products
     * quantize their activations in a kernel of their own anyway, and
     * tensor-core-layout WINT8/4/2 up to 4 rows (decode), whose kernel
     * loads its activations itself. */
    int (*matmul_silu)(nb_backend *b, float *out, const float *gate, const float *up, int ld, const nb_weight *w,
                       int M);
    /* Rotary embedding in place on the first n_heads * head_dim floats of
     * each token's row of x, rows `stride` floats apart (n_heads * head_dim
     * for packed rows; a fused q|k|v row rotates its q and k heads in one
     * call), at the batch positions. inv_freq has head_dim/2 device floats
     * (the model's rope scaling is already folded in). interleaved = 0
     * rotates the two halves (NeoX/HF Llama), 1 rotates adjacent pairs
     * (GPT-J, ERNIE). */
    void (*rope)(nb_backend *b, float *x, int n_heads, int head_dim, int stride,
                 const float *inv_freq, int interleaved);
    /* The step between a fused q|k|v projection and attention, in one
     * pass over x's rows (s->q_stride == s->kv_stride floats apart, each
     * [n_heads q heads | n_kv_heads k heads | n_kv_heads v heads], then
     * any padding): with q_norm and k_norm (Qwen3's per-head norm; both
     * NULL for none) the q and k heads are normalized as rmsnorm does a row
     * of head_dim, then rotated as rope does, in place; then the rows' K
     * and V are written into the cache as kv_write does. The same result as
     * those ops in turn (on the CPU bit for bit); the V heads and padding
     * are left as they are. */
    void (*rope_kv_write)(nb_backend *b, float *x, void *k_cache, void *v_cache, const nb_attn_shape *s,
                          const nb_weight *q_norm, const nb_weight *k_norm, float eps, const float *inv_freq,
                          int interleaved);
    /* Writes the step's K and V (rows of n_kv_heads*head_dim, kv_stride
     * apart) into the layer's cache at the batch slots. */
    void (*kv_write)(nb_backend *b, void *k_cache, void *v_cache, const float *k,
                     const float *v, const nb_attn_shape *s);
    /* Causal paged attention (q's rows q_stride apart, out packed
     * [n_tokens][n_heads*head_dim]): out[t] = softmax(q[t] K^T * scale) V over the
     * positions 0..pos[t] of the token's sequence, read through its block
     * table (so K/V of this step must be written first). GQA: query head h
     * reads KV head h / (n_heads / n_kv_heads). */
    void (*attention)(nb_backend *b, float *out, const float *q, const void *k_cache,
                      const void *v_cache, const nb_attn_shape *s);
    /* In-place softmax over n rows of width cols. */
    void (*softmax)(nb_backend *b, float *x, int n, int cols);
    /* out[i] = x[rows[i]] for n_rows rows of width cols; rows is a host array;
     * out and x must not overlap. */
    void (*gather_rows)(nb_backend *b, float *out, const float *x, const int32_t *rows,
                        int n_rows, int cols);
    /* Sets bytes of device memory at p to zero. */
    void (*zero)(nb_backend *b, void *p, size_t bytes);
    /* gather_rows with a device index array (rows[n_rows] in backend
     * memory); recordable. */
    void (*gather_rows_dev)(nb_backend *b, float *out, const float *x, const int32_t *rows, int n_rows, int cols);

    /* Mixture of experts (engine/model/model_moe.c). All arrays are in
     * backend memory, so a block records like any other op.
     *
     * moe_route picks each of n tokens' r->n_used experts from its router
     * logits [n][n_experts] as moe_route_ref does, and lays the n * n_used
     * (token, expert) pairs out grouped by expert, tokens in order within
     * an expert: groups[x] .. groups[x + 1] - 1 are expert x's rows
     * (groups[0] = 0, groups[E] = n * n_used), groups[E + 1] is the number
     * of experts that have rows and groups[E + 2 ..] their ids in order;
     * rows[i] is the token of grouped row i; slot[t * n_used + k] is the
     * grouped row of token t's k-th expert (its experts in id order) and
     * w[t * n_used + k] its weight. groups holds NB_MOE_GROUPS(E) ints. */
    void (*moe_route)(nb_backend *b, int32_t *groups, int32_t *rows, int32_t *slot, float *w, const float *logits,
                      int n, const nb_moe_route *r);
    /* A layer's experts as one set: w[n] host descriptors (same dtype and
     * shape, loaded), which must outlive the set. Freed by experts_free. */
    void *(*experts_create)(nb_backend *b, const nb_weight *w, int n);
    void (*experts_free)(nb_backend *b, void *set);
    /* For every expert x: rows groups[x] .. groups[x + 1] - 1 of out =
     * the same rows of x @ w[x]^T (n_rows = groups[E]; every expert has at
     * most n_tokens rows). x has NB_MOE_PAD_ROWS readable rows past
     * n_rows, whose products are computed and dropped. out must not
     * overlap x. */
    void (*matmul_experts)(nb_backend *b, float *out, const float *x, const void *set, const int32_t *groups,
                           int n_tokens, int n_rows);
    /* Whether matmul_experts on set, for a step of n_tokens, only reads
     * backend memory (and so may be recorded by graph_begin). */
    int (*experts_recordable)(nb_backend *b, const void *set, int n_tokens);
    /* out[t][c] = fmaf(w[t*K + k], ye[slot[t*K + k]][c], ...) over k = 0 ..
     * K - 1 in order, starting from out[t][c]: a token's experts' weighted
     * outputs added in id order, for n tokens of width cols. */
    void (*moe_combine)(nb_backend *b, float *out, const float *ye, const int32_t *slot, const float *w, int n, int K,
                        int cols);
    /* ids[r] = sample_row_ref(row r of x, cols, &rows[r]) for n rows; ids
     * and rows (with their history arrays) are host memory; x is scratch
     * afterwards. */
    void (*sample)(nb_backend *b, int32_t *ids, float *x, int n, int cols, const nb_sample_row *rows);

    /* Waits for queued work (no-op on CPU). */
    void (*sync)(nb_backend *b);
    void (*destroy)(nb_backend *b);

    /* Whether matmul takes weights of dtype t. */
    int (*supports)(nb_backend *b, nb_dtype t);
    /* Device memory: free and total bytes. Returns -1 where memory is the
     * host's and not worth budgeting (CPU). */
    int (*mem_info)(nb_backend *b, size_t *free_bytes, size_t *total_bytes);
    /* Recorded op sequences (CUDA graphs). graph_begin(key) returns 1 when
     * it has replayed the sequence recorded under key: the caller skips it.
     * It returns 0 when the caller must issue the ops itself and then call
     * graph_end(), which records them under key (if the backend records) and
     * runs them. A recorded sequence may only depend on device memory and on
     * the batch passed to set_batch before graph_begin, never on host
     * arguments of the ops; the caller picks keys so that one key always
     * means one op sequence with the same shapes. key 0 records nothing. */
    int (*graph_begin)(nb_backend *b, uint64_t key);
    void (*graph_end)(nb_backend *b);

    /* Tensor parallelism (backend_create with tensor_parallel > 1): sums
     * x[n] over the ranks of the group, in place and in stream order; every
     * rank ends with the same bytes. Each rank's thread calls it at the same
     * point of the same op sequence. In a group of one it does nothing. */
    void (*all_reduce)(nb_backend *b, float *x, size_t n);
    /* Also collective: out[r*n .. r*n + n) = rank r's in[n], on every rank
     * (out holds n_ranks * n, and does not overlap in). Alone: out = in. */
    void (*all_gather)(nb_backend *b, float *out, const float *in, size_t n);
    /* Optional: readies the calling thread to issue this backend's ops
     * (CUDA: selects its device). A thread that drives another rank, or
     * that loads another rank's weights, calls it first. */
    void (*attach)(nb_backend *b);

    /* weight_load returns the host bytes themselves (CPU: the mmapped
     * checkpoint is used in place), so the model does not make copies of
     * plain weights just to fuse them. */
    int weights_in_place;
    /* The KV cache type used when the configuration names none. */
    nb_kv_dtype kv_default;
    /* graph_begin records and replays (CUDA). The model then pads decode
     * steps to a few batch sizes, so that a few recordings serve every
     * batch; where nothing is recorded padding would only add work. */
    int records_graphs;
} nb_backend_ops;

struct nb_backend {
    const nb_backend_ops *ops;
    void *impl; /* the implementation's own state */
    /* Tensor parallelism: this backend is rank `rank` of n_ranks joined by
     * all_reduce. Rank 0 owns the group: ranks[r] is rank r's backend (0 is
     * itself) and backend_destroy(rank 0) destroys them all. Alone: rank 0
     * of 1, ranks NULL. */
    int rank, n_ranks;
    nb_backend **ranks;
};

typedef struct nb_backend_opts {
    const char *device;  /* "cpu", "cuda", "cuda:N", or NULL/"auto": cuda when a GPU is present */
    int threads;         /* CPU worker threads, shared by the ranks; 0 = number of online cores */
    int tensor_parallel; /* ranks (0 or 1: one); CUDA: devices N, N+1, ...; CPU: threads split */
} nb_backend_opts;

/* weight_pack's answer for a weight that does not fit. */
#define NB_WEIGHT_NO_MEMORY ((size_t)-1)

/* Loads host weight w (data, scale and scale2 for the packed formats) into
 * b's memory, in the backend's layout where weight_pack takes it; w then
 * points there. Returns the bytes w holds in backend memory, or 0 (w
 * untouched, nothing kept) when b's memory cannot hold it. */
size_t backend_weight_load(nb_backend *b, nb_weight *w);
/* The same, always in quant/quant.h's layout (never weight_pack): what
 * matmul_experts reads on every backend. */
size_t backend_weight_load_plain(nb_backend *b, nb_weight *w);

/* Creates the backend named by opts->device: one, or with tensor_parallel
 * > 1 the group, returned as its rank 0. */
nb_backend *backend_create(const nb_backend_opts *opts, nb_err *e);
void backend_destroy(nb_backend *b);

/* Implementations (kernels/cpu, kernels/cuda). */
nb_backend *cpu_backend_create(int threads, nb_err *e);
/* The CUDA backend on device `device` (kernels/cuda). */
nb_backend *cuda_backend_create(int device, nb_err *e);
/* n CPU backends joined by an all_reduce, threads split among them; out[r]
 * is rank r, its rank fields set, out[0]->ranks left to the caller. */
int cpu_backend_create_group(int threads, int n, nb_backend **out, nb_err *e);
/* n CUDA backends on devices first..first+n-1 joined by NCCL (loaded at
 * run time: only tensor parallelism needs libnccl), as above. */
int cuda_backend_create_group(int first, int n, nb_backend **out, nb_err *e);
/* Number of usable CUDA devices; 0 when none or not built with CUDA. */
int cuda_device_count(void);
/* One line describing CUDA device i into buf. */
int cuda_device_describe(int i, char *buf, size_t len);

#endif
