/* Backend selection and the dtype table. */
#include "kernels/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "quant/quant.h"

size_t nb_dtype_size(nb_dtype t) {
    switch (t) {
    case NB_F32: return 4;
    case NB_BF16: return 2;
    case NB_F16: return 2;
    default: return 0; /* packed: see quant_data_bytes */
    }
}

const char *nb_dtype_name(nb_dtype t) {
    switch (t) {
    case NB_F32: return "F32";
    case NB_BF16: return "BF16";
    case NB_F16: return "F16";
    case NB_WINT8: return "WINT8";
    case NB_WINT4: return "WINT4";
    case NB_WINT2: return "WINT2";
    case NB_FP8_B128: return "FP8_B128";
    default: break;
    }
    return "?";
}

const char *nb_kv_dtype_name(nb_kv_dtype t) {
    switch (t) {
    case NB_KV_F32: return "float32";
    case NB_KV_BF16: return "bf16";
    case NB_KV_INT8: return "int8";
    case NB_KV_FP8: return "float8_e4m3fn";
    }
    return "?";
}

size_t nb_kv_block_bytes(nb_kv_dtype t, int n_kv_heads, int head_dim) {
    size_t vals = (size_t)NB_KV_BLOCK_SIZE * (size_t)n_kv_heads * (size_t)head_dim;
    switch (t) {
    case NB_KV_F32: return vals * 4;
    case NB_KV_BF16: return vals * 2;
    case NB_KV_INT8:
    case NB_KV_FP8: return vals + (size_t)NB_KV_BLOCK_SIZE * (size_t)n_kv_heads * sizeof(float);
    }
    return 0;
}

void nb_rope_kv_write_check(const char *backend, const nb_attn_shape *s, const nb_weight *q_norm,
                            const nb_weight *k_norm) {
    int hd = s->head_dim;
    if (nb_attn_fused_rows(s) && !q_norm == !k_norm && (!q_norm || (q_norm->cols == hd && k_norm->cols == hd)))
        return;
    fprintf(stderr, "nibble: %s rope_kv_write: strides %d / %d for %d + 2 x %d heads of %d, norms %lld / %lld\n",
            backend, s->q_stride, s->kv_stride, s->n_heads, s->n_kv_heads, hd,
            q_norm ? (long long)q_norm->cols : -1LL, k_norm ? (long long)k_norm->cols : -1LL);
    abort();
}

#ifdef NB_HAVE_CUDA
/* Parses "cuda" or "cuda:N" into the device index N (0 for "cuda"). */
static int cuda_index(const char *dev, int *id, nb_err *e) {
    *id = 0;
    if (dev[4] != ':') return 0;
    char *end;
    long v = strtol(dev + 5, &end, 10);
    if (*end || end == dev + 5 || v < 0 || v > 1024) return nb_errf(e, "device '%s': expected cuda or cuda:N", dev);
    *id = (int)v;
    return 0;
}
#endif

/* Makes the n backends of a group; out[r] is rank r. */
static int create_group(const char *dev, int threads, int n, nb_backend **out, nb_err *e) {
    if (strcmp(dev, "cpu") == 0) return cpu_backend_create_group(threads, n, out, e);
#ifdef NB_HAVE_CUDA
    int id, count = cuda_device_count();
    if (cuda_index(dev, &id, e)) return -1;
    if (id + n > count)
        return nb_errf(e, "device %s with tensor parallel size %d needs devices %d..%d; %d CUDA device(s) found",
                       dev, n, id, id + n - 1, count);
    if (n == 1) return (out[0] = cuda_backend_create(id, e)) ? 0 : -1;
    return cuda_backend_create_group(id, n, out, e);
#else
    return nb_errf(e, "device %s: CUDA backend not available in this build", dev);
#endif
}

nb_backend *backend_create(const nb_backend_opts *opts, nb_err *e) {
    const char *dev = opts && opts->device ? opts->device : "auto";
    int threads = opts ? opts->threads : 0, n = opts && opts->tensor_parallel > 1 ? opts->tensor_parallel : 1;
    if (strcmp(dev, "auto") == 0) dev = cuda_device_count() > 0 ? "cuda" : "cpu";
    if (strcmp(dev, "cpu") && strcmp(dev, "cuda") && strncmp(dev, "cuda:", 5)) {
        nb_errf(e, "unknown device '%s' (expected auto, cpu, cuda or cuda:N)", dev);
        return NULL;
    }
    if (n > 64) {
        nb_errf(e, "tensor parallel size %d: at most 64", n);
        return NULL;
    }
    if (n == 1 && strcmp(dev, "cpu") == 0) return cpu_backend_create(threads, e);
    nb_backend **ranks = xcalloc((size_t)n, sizeof *ranks);
    if (create_group(dev, threads, n, ranks, e)) {
        free(ranks);
        return NULL;
    }
    if (n == 1) {
        nb_backend *b = ranks[0];
        free(ranks);
        return b;
    }
    ranks[0]->ranks = ranks;
    return ranks[0];
}

static size_t weight_load(nb_backend *b, nb_weight *w, int may_pack) {
    int packed = w->dtype != NB_F32 && w->dtype != NB_BF16 && w->dtype != NB_F16;
    size_t bytes = packed && may_pack && b->ops->weight_pack ? b->ops->weight_pack(b, w) : 0;
    if (bytes == NB_WEIGHT_NO_MEMORY) return 0;
    if (bytes) return bytes;
    size_t db = packed ? quant_data_bytes(w->dtype, w->rows, w->cols) : (size_t)w->rows * (size_t)w->cols * nb_dtype_size(w->dtype);
    nb_weight d = *w;
    int ok = (d.data = b->ops->weight_load(b, w->data, db)) != NULL;
    if (packed && ok) ok = (d.scale = b->ops->weight_load(b, w->scale, quant_scale_bytes(w->dtype, w->rows, w->cols, w->group))) != NULL;
    if (packed && ok && w->scale2) ok = (d.scale2 = b->ops->weight_load(b, w->scale2, quant_scale2_bytes(w->dtype, w->rows))) != NULL;
    if (!ok) { /* give back what did fit: the caller reports the whole weight */
        if (d.data && d.data != w->data) b->ops->weight_free(b, d.data);
        if (packed && d.scale && d.scale != w->scale) b->ops->weight_free(b, d.scale);
        return 0;
    }
    *w = d;
    return packed ? quant_weight_bytes(w) : db;
}

size_t backend_weight_load(nb_backend *b, nb_weight *w) { return weight_load(b, w, 1); }
size_t backend_weight_load_plain(nb_backend *b, nb_weight *w) { return weight_load(b, w, 0); }

void backend_destroy(nb_backend *b) {
    if (!b) return;
    nb_backend **ranks = b->ranks;
    int n = b->n_ranks;
    b->ops->destroy(b);
    for (int r = 1; ranks && r < n; r++) ranks[r]->ops->destroy(ranks[r]);
    free(ranks);
}

#ifndef NB_HAVE_CUDA
/* A CPU-only build has no CUDA devices; these are its true answers. */
int cuda_device_count(void) { return 0; }

int cuda_device_describe(int i, char *buf, size_t len) {
    if (len) snprintf(buf, len, "built without CUDA");
    return -1;
}
#endif
