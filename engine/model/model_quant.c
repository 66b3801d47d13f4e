/* Binding weights to the backend: plain tensors as they are in the mmapped
 * checkpoint, linear weights packed (an offline checkpoint's tensors) or
 * quantized at load from BF16/F16/F32, with an optional per-matrix error
 * report.
 *
 * Offline checkpoints (written by `nibble quantize`, and Hugging Face FP8)
 * name a linear layer's tensors after its weight, e.g. for
 * model.layers.0.mlp.down_proj:
 *   .weight              I8 [N][K] (wint8), U8 [N][K/2] (wint4),
 *                        U8 [N][K/4] (wint2), F8_E4M3 [N][K] (fp8)
 *   .weight_scale        BF16 [N] (wint8), BF16 [N][K/group] (wint4),
 *                        U8 [N][K/64] codes (wint2)
 *   .weight_super_scale  BF16 [N] (wint2)
 *   .weight_scale_inv    F32 or BF16 [ceil(N/128)][ceil(K/128)] (fp8)
 * The layouts are those of quant/quant.h. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/parallel.h"
#include "common/util.h"
#include "engine/model/model_int.h"
#include "quant/quant.h"

void *model_own(nb_model *m, size_t bytes) {
    if (m->n_owned == m->cap_owned) m->owned = xrealloc(m->owned, sizeof(void *) * (size_t)(m->cap_owned = m->cap_owned * 2 + 16));
    return m->owned[m->n_owned++] = xcalloc(1, bytes ? bytes : 1);
}

void model_free_owned(nb_model *m) {
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    m->owned = NULL;
    m->n_owned = m->cap_owned = 0;
}

static int shape_str(const st_tensor *t, char *buf, size_t n) {
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < t->ndim && len + 24 < n; i++)
        len += (size_t)snprintf(buf + len, n - len, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    return 0;
}

static int has_shape(const st_tensor *t, int64_t rows, int64_t cols) {
    return rows == 0 ? (t->ndim == 1 && t->shape[0] == cols)
                     : (t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols);
}

static int plain_dtype(st_dtype t, nb_dtype *out) {
    switch (t) {
    case ST_F32: *out = NB_F32; return 0;
    case ST_BF16: *out = NB_BF16; return 0;
    case ST_F16: *out = NB_F16; return 0;
    default: return -1;
    }
}

const char *model_size_str(char *buf, size_t cap, size_t n) {
    if (n < ((size_t)1 << 30)) snprintf(buf, cap, "%.1f MiB", n / 1048576.0);
    else snprintf(buf, cap, "%.2f GiB", n / 1073741824.0);
    return buf;
}

int model_no_memory(nb_model *m, const char *what, size_t bytes, const char *fix, nb_err *e) {
    size_t loaded = 0, free_b = 0, total_b = 0;
    for (int t = 0; t < NB_DTYPE_COUNT; t++) loaded += m->bytes_by[t];
    char room[96] = "", b1[32], b2[32], b3[32], b4[32];
    if (m->be->ops->mem_info(m->be, &free_b, &total_b) == 0)
        snprintf(room, sizeof room, ", %s free of %s", model_size_str(b1, sizeof b1, free_b),
                 model_size_str(b2, sizeof b2, total_b));
    char who[32] = "";
    if (m->n_ranks > 1) snprintf(who, sizeof who, " (rank %d of %d)", m->rank, m->n_ranks);
    return nb_errf(e, "out of device memory for %s (%s)%s: %s of weights loaded%s; %s%sa smaller format "
                      "(--quantization wint8 or wint4) or more devices (--tensor-parallel-size) would fit it",
                   what, model_size_str(b3, sizeof b3, bytes), who, model_size_str(b4, sizeof b4, loaded), room,
                   fix ? fix : "", fix ? ", " : "");
}

/* Hands host bytes to the backend (*dst: where they are there) and counts
 * them as format t. */
static int load(nb_model *m, nb_dtype t, const void **dst, const void *host, size_t bytes, const char *what,
                nb_err *e) {
    const void *p = m->be->ops->weight_load(m->be, host, bytes);
    if (!p) {
        *dst = NULL; /* not the backend's to free */
        return model_no_memory(m, what, bytes, NULL, e);
    }
    m->bytes_by[t] += bytes;
    *dst = p;
    return 0;
}

/* The rows [r0, r0 + nr) and bytes [b0, b0 + nb) of each of them, from a
 * row-major host array whose rows hold row_bytes: in place when the rows
 * are taken whole, else copied into a buffer the model owns. */
static const void *cut(nb_model *m, const void *base, size_t row_bytes, int64_t r0, int64_t nr, size_t b0,
                       size_t nb) {
    const char *p = (const char *)base + (size_t)r0 * row_bytes;
    if (b0 == 0 && nb == row_bytes) return p;
    char *out = model_own(m, (size_t)nr * nb);
    for (int64_t r = 0; r < nr; r++) memcpy(out + (size_t)r * nb, p + (size_t)r * row_bytes + b0, nb);
    return out;
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Row bytes of data for `cols` columns of format t. */
static int is_plain(nb_dtype t) { return t == NB_F32 || t == NB_BF16 || t == NB_F16; }

static size_t data_row_bytes(nb_dtype t, int64_t cols) {
    return is_plain(t) ? (size_t)cols * nb_dtype_size(t) : quant_data_bytes(t, 1, cols);
}

/* Whether the part sl of an [N][K] weight of format t keeps whole groups
 * (and so exactly the codes and scales of the whole): a cut must fall on
 * the format's groups, or be the weight's edge. */
static int check_cut(const char *name, nb_dtype t, int group, int64_t N, int64_t K, const nb_slice *sl, nb_err *e) {
    int64_t unit_c = t == NB_WINT4 ? (group < K ? group : 2) : t == NB_WINT2 ? QUANT_WINT2_GROUP
                   : t == NB_FP8_B128 ? QUANT_FP8_BLOCK : 1;
    int64_t unit = sl->dim ? unit_c : t == NB_FP8_B128 ? QUANT_FP8_BLOCK : 1, edge = sl->dim ? K : N;
    int64_t bad = sl->start % unit ? sl->start : (sl->len % unit && sl->start + sl->len != edge) ? sl->start + sl->len : -1;
    if (bad < 0) return 0;
    return nb_errf(e, "%s: tensor parallelism would cut this %s [%lld, %lld] weight at %s %lld, inside its "
                      "%lld-wide groups; use a tensor parallel size that divides the groups",
                   name, nb_dtype_name(t), (long long)N, (long long)K, sl->dim ? "column" : "row", (long long)bad,
                   (long long)unit);
}

/* The part sl of host weight full (data, scale and scale2 on the host) in
 * out, for a tensor-parallel rank. */
static int slice_weight(nb_model *m, const char *name, const nb_weight *full, const nb_slice *sl, nb_weight *out,
                        nb_err *e) {
    /* out is written only on success: on failure it holds nothing that
     * model_free would hand the backend (these are host bytes) */
    if (sl && check_cut(name, full->dtype, full->group, full->rows, full->cols, sl, e)) return -1;
    *out = *full;
    if (!sl) return 0;
    nb_dtype t = full->dtype;
    int64_t N = full->rows, K = full->cols, r0 = 0, nr = N, c0 = 0, nc = K;
    if (sl->dim == 0) r0 = sl->start, nr = sl->len;
    else c0 = sl->start, nc = sl->len;
    out->rows = nr;
    out->cols = nc;
    out->data = cut(m, full->data, data_row_bytes(t, K), r0, nr, data_row_bytes(t, c0), data_row_bytes(t, nc));
    switch (t) {
    case NB_WINT8: out->scale = cut(m, full->scale, sizeof(float), r0, nr, 0, sizeof(float)); break;
    case NB_WINT4:
        if (full->group == K) { /* per channel: every part keeps its rows' one scale */
            out->group = (int)nc;
            out->scale = cut(m, full->scale, sizeof(float), r0, nr, 0, sizeof(float));
        } else {
            out->scale = cut(m, full->scale, sizeof(float) * (size_t)(K / full->group), r0, nr,
                             sizeof(float) * (size_t)(c0 / full->group), sizeof(float) * (size_t)(nc / full->group));
        }
        break;
    case NB_WINT2:
        out->scale = cut(m, full->scale, (size_t)(K / QUANT_WINT2_GROUP), r0, nr, (size_t)(c0 / QUANT_WINT2_GROUP),
                         (size_t)(nc / QUANT_WINT2_GROUP));
        out->scale2 = cut(m, full->scale2, sizeof(float), r0, nr, 0, sizeof(float));
        break;
    case NB_FP8_B128: {
        size_t bc = (size_t)ceil_div(K, QUANT_FP8_BLOCK);
        out->scale = cut(m, full->scale, sizeof(float) * bc, r0 / QUANT_FP8_BLOCK, ceil_div(nr, QUANT_FP8_BLOCK),
                         sizeof(float) * (size_t)(c0 / QUANT_FP8_BLOCK),
                         sizeof(float) * (size_t)ceil_div(nc, QUANT_FP8_BLOCK));
        break;
    }
    default: break;
    }
    return 0;
}

/* Checks tensor `name` against [rows, cols] (rows 0: a vector) and
 * describes it, or its part sl, in w with data still host bytes (the
 * checkpoint's, or a cut the model owns), for the callers that read it
 * before (or instead of) the backend getting it. */
static int bind_host(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, const nb_slice *sl,
                     int optional, nb_err *e) {
    const st_tensor *t = st_find(m->st, name);
    memset(w, 0, sizeof *w);
    if (!t) return optional ? 0 : nb_errf(e, "tensor '%s' not found in the checkpoint", name);
    if (!has_shape(t, rows, cols)) {
        char got[96];
        shape_str(t, got, sizeof got);
        if (rows == 0)
            return nb_errf(e, "%s: tensor '%s' has shape [%s], expected [%lld]", t->file, name, got, (long long)cols);
        return nb_errf(e, "%s: tensor '%s' has shape [%s], expected [%lld, %lld]", t->file, name, got,
                       (long long)rows, (long long)cols);
    }
    nb_weight full = {.rows = rows == 0 ? 1 : rows, .cols = cols, .data = t->data};
    if (plain_dtype(t->dtype, &full.dtype))
        return nb_errf(e, "%s: tensor '%s' has dtype %s; expected F32, BF16 or F16", t->file, name,
                       st_dtype_name(t->dtype));
    nb_slice vec;
    if (sl && rows == 0) { /* a vector's part is a part of its one row */
        vec = (nb_slice){1, sl->start, sl->len};
        sl = &vec;
    }
    return slice_weight(m, name, &full, sl, w, e);
}

int model_bind(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, const nb_slice *sl,
               int optional, nb_err *e) {
    if (bind_host(m, w, name, rows, cols, sl, optional, e)) return -1;
    if (!w->data) return 0;
    return load(m, w->dtype, &w->data, w->data, (size_t)w->rows * (size_t)w->cols * nb_dtype_size(w->dtype), name, e);
}

int model_bind_f32(nb_model *m, nb_weight *w, const char *name, int64_t rows, int64_t cols, nb_err *e) {
    float *f = model_host_f32(m, st_find(m->st, name), rows, cols, name, e);
    if (!f) return -1;
    *w = (nb_weight){.dtype = NB_F32, .rows = rows, .cols = cols};
    return load(m, NB_F32, &w->data, f, sizeof(float) * (size_t)rows * (size_t)cols, name, e);
}

/* A companion tensor of `name` (".weight" -> ".weight_scale" etc.). */
static const st_tensor *companion(const nb_model *m, const char *name, const char *suffix) {
    char n[256];
    snprintf(n, sizeof n, "%s%s", name, suffix);
    return st_find(m->st, n);
}

float *model_host_f32(nb_model *m, const st_tensor *t, int64_t rows, int64_t cols, const char *what, nb_err *e) {
    nb_dtype d;
    if (!t) return nb_errf(e, "%s not found in the checkpoint", what), NULL;
    if (!has_shape(t, rows, cols) || plain_dtype(t->dtype, &d)) {
        char got[96];
        shape_str(t, got, sizeof got);
        nb_errf(e, "%s: tensor '%s' is %s [%s], expected floats [%lld, %lld]", t->file, t->name,
                st_dtype_name(t->dtype), got, (long long)(rows ? rows : 1), (long long)cols);
        return NULL;
    }
    float *out = model_own(m, sizeof(float) * (size_t)(rows ? rows : 1) * (size_t)cols);
    nb_weight src = {.dtype = d, .rows = rows ? rows : 1, .cols = cols, .data = t->data};
    for (int64_t r = 0; r < src.rows; r++) quant_dequant_row(&src, r, out + r * cols);
    return out;
}

/* Hands a packed host weight to the backend (in its own layout where it
 * has one, unless the model asks for quant.h's), counted as its format. */
static int load_packed(nb_model *m, nb_weight *w, const char *name, nb_err *e) {
    size_t bytes = m->load_plain ? backend_weight_load_plain(m->be, w) : backend_weight_load(m->be, w);
    if (!bytes) {
        size_t want = quant_weight_bytes(w);
        w->data = w->scale = w->scale2 = NULL; /* host bytes: not the backend's to free */
        return model_no_memory(m, name, want, NULL, e);
    }
    m->bytes_by[w->dtype] += bytes;
    return 0;
}

/* The packed tensors of an offline checkpoint (or their part sl), described
 * in w where they lie (host bytes). */
static int bind_packed(nb_model *m, nb_weight *w, const st_tensor *t, const char *name, int64_t N, int64_t K,
                       const nb_slice *sl, nb_err *e) {
    char sname[256];
    snprintf(sname, sizeof sname, "%s_scale", name);
    nb_weight full = {.rows = N, .cols = K, .data = t->data};
    if (t->dtype == ST_I8 && has_shape(t, N, K)) {
        full.dtype = NB_WINT8;
        if (!(full.scale = model_host_f32(m, companion(m, name, "_scale"), 0, N, sname, e))) return -1;
    } else if (t->dtype == ST_U8 && has_shape(t, N, K / 2) && K % 2 == 0) {
        const st_tensor *s = companion(m, name, "_scale");
        int64_t groups = s && s->ndim == 2 ? s->shape[1] : 0;
        if (groups <= 0 || K % groups) return nb_errf(e, "%s: wint4 needs a [%lld, K/group] scale tensor", sname, (long long)N);
        full.dtype = NB_WINT4;
        full.group = (int)(K / groups);
        if (!(full.scale = model_host_f32(m, s, N, groups, sname, e))) return -1;
    } else if (t->dtype == ST_U8 && has_shape(t, N, K / 4) && K % 4 == 0) {
        const st_tensor *s = companion(m, name, "_scale");
        full.dtype = NB_WINT2;
        full.group = QUANT_WINT2_GROUP;
        if (!s || s->dtype != ST_U8 || !has_shape(s, N, K / QUANT_WINT2_GROUP))
            return nb_errf(e, "%s: wint2 needs U8 codes [%lld, %lld]", sname, (long long)N, (long long)(K / QUANT_WINT2_GROUP));
        full.scale = s->data;
        snprintf(sname, sizeof sname, "%s_super_scale", name);
        if (!(full.scale2 = model_host_f32(m, companion(m, name, "_super_scale"), 0, N, sname, e))) return -1;
    } else if (t->dtype == ST_F8_E4M3 && has_shape(t, N, K)) {
        full.dtype = NB_FP8_B128;
        snprintf(sname, sizeof sname, "%s_scale_inv", name);
        int64_t br = (N + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK, bc = (K + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK;
        if (!(full.scale = model_host_f32(m, companion(m, name, "_scale_inv"), br, bc, sname, e))) return -1;
    } else {
        char got[96];
        shape_str(t, got, sizeof got);
        return nb_errf(e, "%s: tensor '%s' is %s [%s]: not a packed format of a [%lld, %lld] weight", t->file, name,
                       st_dtype_name(t->dtype), got, (long long)N, (long long)K);
    }
    nb_err ce;
    if (quant_check(full.dtype, N, K, full.group, &ce)) return nb_errf(e, "%s: %s", name, ce.msg);
    return slice_weight(m, name, &full, sl, w, e);
}

/* Relative error of the layer's output on 16 Gaussian sample rows. */
static double output_error(const float *W, const nb_weight *q) {
    int M = 16;
    int64_t N = q->rows, K = q->cols;
    float *x = xmalloc(sizeof(float) * (size_t)(M * K)), *y = xmalloc(sizeof(float) * (size_t)(M * N)),
          *yq = xmalloc(sizeof(float) * (size_t)(M * N));
    uint64_t st = 0x9e3779b97f4a7c15ull;
    for (int64_t i = 0; i < M * K; i++) { /* Box-Muller on a fixed LCG: the same inputs every run */
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        double u1 = ((st >> 11) + 1.0) / 9007199254740993.0;
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        double u2 = (st >> 11) / 9007199254740992.0;
        x[i] = (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
    }
    nb_weight ref = {.dtype = NB_F32, .rows = N, .cols = K, .data = W};
    quant_matmul_ref(y, x, &ref, M);
    quant_matmul_ref(yq, x, q, M);
    double num = 0, den = 0;
    for (int64_t i = 0; i < M * N; i++) {
        num += ((double)y[i] - yq[i]) * ((double)y[i] - yq[i]);
        den += (double)y[i] * y[i];
    }
    free(x);
    free(y);
    free(yq);
    return den > 0 ? sqrt(num / den) : 0.0;
}

/* Quantizing at load goes through every weight of the model once, so it
 * runs on all cores: bands of PACK_BAND rows (FP8's block height, so its
 * 128x128 blocks stay whole) are turned into FP32 in W and packed into
 * their part of `out`, whose bytes are those of one quant_pack of all the
 * rows: rows never share a byte or a scale across a band edge. */
#define PACK_BAND QUANT_FP8_BLOCK
#define PACK_THREAD_BYTES (8.0 * 1024 * 1024)

typedef struct pack_work {
    const nb_weight *src, *out;
    float *W;
    int64_t bands;
    atomic_llong next; /* the first band no thread has taken */
    atomic_int failed;
    nb_err e; /* the first failure, written by the thread that set failed */
} pack_work;

static void *pack_run(void *arg) {
    pack_work *pw = arg;
    const nb_weight *src = pw->src, *o = pw->out;
    const int64_t K = src->cols;
    /* without W, one band's FP32 rows at a time: a whole matrix in FP32
     * is mostly page faults */
    float *band = pw->W ? NULL : xmalloc(sizeof(float) * PACK_BAND * (size_t)K);
    for (int64_t b; (b = par_take(&pw->next, pw->bands)) >= 0;) {
        const int64_t r0 = b * PACK_BAND, nr = src->rows - r0 < PACK_BAND ? src->rows - r0 : PACK_BAND;
        float *f = band ? band : pw->W + r0 * K;
        for (int64_t r = 0; r < nr; r++) quant_dequant_row(src, r0 + r, f + r * K);
        nb_err e;
        if (quant_pack(o->dtype, f, nr, K, o->group, (char *)o->data + quant_data_bytes(o->dtype, r0, K),
                       (char *)o->scale + quant_scale_bytes(o->dtype, r0, K, o->group),
                       o->scale2 ? (char *)o->scale2 + quant_scale2_bytes(o->dtype, r0) : NULL, &e) &&
            !atomic_exchange(&pw->failed, 1))
            pw->e = e;
    }
    free(band);
    return NULL;
}

/* src's rows packed into out (its buffers sized for all of them) and, when
 * W is not NULL, into W as FP32. */
static int pack_bands(const nb_weight *src, float *W, const nb_weight *out, nb_err *e) {
    pack_work pw = {.src = src, .out = out, .W = W, .bands = (src->rows + PACK_BAND - 1) / PACK_BAND};
    atomic_init(&pw.next, 0);
    atomic_init(&pw.failed, 0);
    par_run(par_threads(pw.bands, (double)PACK_BAND * (double)src->cols * 4.0, PACK_THREAD_BYTES, 64), pack_run, &pw);
    if (atomic_load(&pw.failed)) {
        *e = pw.e;
        return -1;
    }
    return 0;
}

/* Frees host buffer p if the model owns it (made at load); anything else
 * (the mmapped checkpoint) is left alone. */
static void disown(nb_model *m, const void *p) {
    for (int i = 0; p && i < m->n_owned; i++)
        if (m->owned[i] == p) {
            free(m->owned[i]);
            m->owned[i] = m->owned[--m->n_owned];
            return;
        }
}

/* Frees the buffers of `made` (data, scale, scale2) that `kept` no longer
 * points at, where the model owns them. */
static void disown_unused(nb_model *m, const nb_weight *made, const nb_weight *kept) {
    if (made->data != kept->data) disown(m, made->data);
    if (made->scale != kept->scale) disown(m, made->scale);
    if (made->scale2 != kept->scale2) disown(m, made->scale2);
}

/* Linear weight `name` (or its part sl) as model_bind_linear describes,
 * in w as host bytes: packed tensors where they lie, plain ones too, or
 * quantized now into buffers the model owns. Nothing is loaded. */
static int linear_host(nb_model *m, nb_weight *w, const char *name, int64_t N, int64_t K, const nb_slice *sl,
                       nb_dtype target, nb_err *e) {
    const st_tensor *t = st_find(m->st, name);
    memset(w, 0, sizeof *w);
    if (t && (t->dtype == ST_I8 || t->dtype == ST_U8 || t->dtype == ST_F8_E4M3))
        return bind_packed(m, w, t, name, N, K, sl, e);
    if (is_plain(target)) return bind_host(m, w, name, N, K, sl, 0, e);
    /* Quantize this rank's rows over all their columns, as a single rank
     * would, then cut the columns: a split never changes the codes or
     * scales (the cut must fall on the groups, as for offline tensors). */
    int group = quant_pick_group(&m->plan, target, K);
    if (sl && check_cut(name, target, group, N, K, sl, e)) return -1;
    nb_slice rows_part = {0, 0, N};
    if (sl && sl->dim == 0) rows_part = *sl;
    /* quantize now, from host bytes (a backend's copy need not be readable
     * here): rows to FP32, pack, hand only the packed bytes over. w gets
     * them only at the end: until then it holds nothing to free. */
    nb_weight src;
    if (bind_host(m, &src, name, N, K, &rows_part, 0, e)) return -1;
    if (target == NB_WINT2)
        return nb_errf(e, "%s: wint2 is offline only; write a checkpoint with `nibble quantize --quantization wint2`",
                       name);
    if (m->plan.is_quantized)
        return nb_errf(e, "%s: quantization_config says is_quantized but the tensor is %s", name, nb_dtype_name(src.dtype));
    N = src.rows;
    if (quant_check(target, N, K, group, e)) return nb_err_wrap(e, "%s", name);
    float *W = m->report ? xmalloc(sizeof(float) * (size_t)N * (size_t)K) : NULL; /* the report's reference */
    size_t db = quant_data_bytes(target, N, K), sb = quant_scale_bytes(target, N, K, group),
           s2b = quant_scale2_bytes(target, N);
    nb_weight packed = {.dtype = target, .rows = N, .cols = K, .data = model_own(m, db), .scale = model_own(m, sb),
                        .scale2 = s2b ? model_own(m, s2b) : NULL, .group = group};
    if (pack_bands(&src, W, &packed, e)) {
        free(W);
        return nb_err_wrap(e, "%s", name);
    }
    if (m->report)
        fprintf(m->report, "%-44s %-9s [%lld x %lld] group %-4d weight error %.4f  output error %.4f\n", name,
                nb_dtype_name(target), (long long)N, (long long)K, group, quant_rel_error(W, &packed),
                output_error(W, &packed));
    free(W);
    if (slice_weight(m, name, &packed, sl && sl->dim == 1 ? sl : NULL, w, e)) return -1;
    /* what a column cut copied is not needed whole any more */
    disown_unused(m, &packed, w);
    return 0;
}

/* Hands host weight w to the backend, in place of its host bytes. The host
 * buffers the model made for it are freed where the backend took a copy
 * (the CPU backend uses them where they lie, so it keeps them). */
static int linear_load(nb_model *m, nb_weight *w, const char *name, nb_err *e) {
    nb_weight host = *w;
    int rc = is_plain(w->dtype) ? load(m, w->dtype, &w->data, w->data, data_row_bytes(w->dtype, w->cols) * (size_t)w->rows,
                                       name, e)
                                : load_packed(m, w, name, e);
    if (rc) return -1;
    disown_unused(m, &host, w);
    return 0;
}

int model_bind_linear(nb_model *m, nb_weight *w, const char *name, int64_t N, int64_t K, const nb_slice *sl,
                      nb_dtype target, nb_err *e) {
    if (linear_host(m, w, name, N, K, sl, target, e)) return -1;
    return linear_load(m, w, name, e);
}

/* Whether host weights p[0..n) can be one weight with their rows one after
 * the other, with the very codes and scales each has alone: one format,
 * width and group, and (FP8) row blocks that no two of them share. */
static int fusable(const nb_weight *p, int n) {
    for (int i = 0; i < n; i++) {
        if (p[i].dtype != p[0].dtype || p[i].cols != p[0].cols || p[i].group != p[0].group) return 0;
        if (p[i].dtype == NB_FP8_B128 && i < n - 1 && p[i].rows % QUANT_FP8_BLOCK) return 0;
    }
    return 1;
}

/* p's rows one after the other in one host weight the model owns; the
 * parts' own buffers made at load are freed. */
static nb_weight concat_rows(nb_model *m, const nb_weight *p, int n) {
    nb_weight f = p[0];
    f.rows = 0;
    for (int i = 0; i < n; i++) f.rows += p[i].rows;
    nb_dtype t = f.dtype;
    int plain = is_plain(t);
    size_t row = data_row_bytes(t, f.cols);
    char *data = model_own(m, row * (size_t)f.rows);
    char *scale = plain ? NULL : model_own(m, quant_scale_bytes(t, f.rows, f.cols, f.group));
    char *scale2 = p[0].scale2 ? model_own(m, quant_scale2_bytes(t, f.rows)) : NULL;
    int64_t r = 0;
    for (int i = 0; i < n; i++) {
        memcpy(data + row * (size_t)r, p[i].data, row * (size_t)p[i].rows);
        if (scale)
            memcpy(scale + quant_scale_bytes(t, r, f.cols, f.group), p[i].scale,
                   quant_scale_bytes(t, p[i].rows, f.cols, f.group));
        if (scale2) memcpy(scale2 + quant_scale2_bytes(t, r), p[i].scale2, quant_scale2_bytes(t, p[i].rows));
        r += p[i].rows;
        disown(m, p[i].data), disown(m, p[i].scale), disown(m, p[i].scale2);
    }
    f.data = data, f.scale = scale, f.scale2 = scale2;
    return f;
}

int model_bind_linears(nb_model *m, nb_weight *fused, nb_weight *const *outs, const nb_part *parts, int n, int64_t K,
                       nb_dtype target, const char *fused_name, nb_err *e) {
    nb_weight host[MODEL_MAX_PARTS];
    if (n < 1 || n > MODEL_MAX_PARTS) abort(); /* a caller's bug */
    for (int i = 0; i < n; i++)
        if (linear_host(m, &host[i], parts[i].name, parts[i].rows, K, parts[i].sl, target, e)) return -1;
    /* Fused only where the bytes are copied anyway: a backend that uses
     * host weights in place (the CPU's, over the mmapped checkpoint) would
     * otherwise hold a second copy of the plain ones. */
    int copied = !m->be->ops->weights_in_place || !is_plain(host[0].dtype);
    memset(fused, 0, sizeof *fused);
    if (copied && fusable(host, n)) {
        *fused = concat_rows(m, host, n);
        return linear_load(m, fused, fused_name, e);
    }
    for (int i = 0; i < n; i++) {
        *outs[i] = host[i];
        if (linear_load(m, outs[i], parts[i].name, e)) return -1;
    }
    return 0;
}

int model_bind_cat(nb_model *m, nb_weight *w, const nb_part *parts, int n, const char *fused_name, nb_err *e) {
    nb_weight host[MODEL_MAX_PARTS];
    if (n < 1 || n > MODEL_MAX_PARTS) abort();
    memset(w, 0, sizeof *w);
    int64_t cols = 0;
    for (int i = 0; i < n; i++) {
        if (bind_host(m, &host[i], parts[i].name, 0, parts[i].rows, parts[i].sl, 0, e)) return -1;
        if (host[i].dtype != host[0].dtype)
            return nb_errf(e, "%s: the biases %s and %s differ in dtype", fused_name, parts[0].name, parts[i].name);
        cols += host[i].cols;
    }
    size_t es = nb_dtype_size(host[0].dtype);
    char *cat = model_own(m, es * (size_t)cols);
    for (int64_t i = 0, c = 0; i < n; c += host[i].cols, i++) memcpy(cat + es * (size_t)c, host[i].data, es * (size_t)host[i].cols);
    *w = (nb_weight){.dtype = host[0].dtype, .rows = 1, .cols = cols, .data = cat};
    return linear_load(m, w, fused_name, e);
}
