/* The offline quantizer. Calibration runs the unquantized model over text
 * and accumulates, per layer, the Hessian of each linear's input (q/k/v
 * share one, gate/up another); layers are taken in passes sized to a memory
 * budget, so a model of any depth needs a few forward passes, not one
 * Hessian set per layer at once. */
#include "engine/quantize.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/model/config.h"
#include "engine/model/model.h"
#include "engine/model/safetensors.h"
#include "engine/model/tokenizer.h"
#include "quant/gptq.h"
#include "quant/quant.h"

#define HESSIAN_BUDGET ((size_t)1 << 30)
/* GPTQ's damping, as a fraction of the mean Hessian diagonal. A few
 * thousand calibration tokens leave the Hessians of 576- and 1536-wide
 * layers far from full rank; 0.1 generalizes better than the paper's 0.01
 * there (SmolLM2-135M, eval.txt perplexity: wint4 67.5 vs 71.3, round to
 * nearest 74.9; wint2 5.9e3 vs 9.8e4, round to nearest 6.2e4). */
#define GPTQ_DAMP 0.1

/* One linear of a layer: its name under model.layers.N., the format it
 * gets, and which captured input feeds it (model_capture_fn; -1: none is
 * captured: a mixture of experts' layers, which GPTQ does not take). */
typedef struct linear_spec {
    char name[96];
    nb_dtype t;
    int input;
} linear_spec;

static void add_linear(linear_spec *l, int *n, nb_dtype t, int input, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void add_linear(linear_spec *l, int *n, nb_dtype t, int input, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(l[*n].name, sizeof l[*n].name, fmt, ap);
    va_end(ap);
    l[*n].t = t, l[*n].input = input;
    (*n)++;
}

/* Layer li's linears in checkpoint names: attention, then the dense MLP,
 * or a mixture of experts' experts (moe format) and shared experts (dense
 * format). Returns how many, at most layer_linear_cap(c). */
static int layer_linears(const nb_model_config *c, const nb_quant_plan *p, int li, linear_spec *l) {
    int n = 0;
    static const char *const ATTN[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"};
    for (int i = 0; i < 4; i++) add_linear(l, &n, p->dense, i < 3 ? 0 : 1, "%s", ATTN[i]);
    if (!config_layer_is_moe(c, li)) {
        add_linear(l, &n, p->dense, 2, "mlp.gate_proj");
        add_linear(l, &n, p->dense, 2, "mlp.up_proj");
        add_linear(l, &n, p->dense, 3, "mlp.down_proj");
        return n;
    }
    const nb_moe_config *mc = &c->moe;
    for (int x = 0; x < mc->n_experts; x++)
        for (int j = 0; j < 3; j++) add_linear(l, &n, p->moe, -1, "%s.experts.%d.%s", mc->block, x, mc->proj[j]);
    if (mc->shared_ffn)
        for (int j = 0; j < 3; j++) add_linear(l, &n, p->dense, -1, "%s.shared_experts.%s", mc->block, mc->proj[j]);
    return n;
}

static int layer_linear_cap(const nb_model_config *c) { return 7 + 3 * c->moe.n_experts; }

/* What the writer collects: tensors to write and the buffers behind them. */
typedef struct out_set {
    st_write_tensor *t;
    int n, cap;
    void **bufs;
    int n_bufs, cap_bufs;
} out_set;

static void *out_buf(out_set *o, size_t bytes) {
    if (o->n_bufs == o->cap_bufs) o->bufs = xrealloc(o->bufs, sizeof(void *) * (size_t)(o->cap_bufs = o->cap_bufs * 2 + 32));
    return o->bufs[o->n_bufs++] = xcalloc(1, bytes ? bytes : 1);
}

static void out_add(out_set *o, const char *name, st_dtype dt, int64_t rows, int64_t cols, const void *data) {
    if (o->n == o->cap) o->t = xrealloc(o->t, sizeof(st_write_tensor) * (size_t)(o->cap = o->cap * 2 + 64));
    char *nm = out_buf(o, strlen(name) + 1);
    strcpy(nm, name);
    st_write_tensor *t = &o->t[o->n++];
    memset(t, 0, sizeof *t);
    t->name = nm;
    t->dtype = dt;
    t->ndim = rows ? 2 : 1;
    t->shape[0] = rows ? rows : cols;
    t->shape[1] = cols;
    t->data = data;
}

static uint16_t *to_bf16(out_set *o, const float *x, size_t n) {
    uint16_t *b = out_buf(o, n * 2);
    for (size_t i = 0; i < n; i++) b[i] = f32_to_bf16(x[i]); /* exact: the scales are BF16 values */
    return b;
}

/* Emits the packed tensors of one linear under prefix (".weight" etc.). */
static void emit_packed(out_set *o, const char *prefix, nb_dtype t, int64_t N, int64_t K, int group, void *data,
                        float *scale, float *scale2) {
    char n[256];
    snprintf(n, sizeof n, "%s.weight", prefix);
    switch (t) {
    case NB_WINT8:
        out_add(o, n, ST_I8, N, K, data);
        snprintf(n, sizeof n, "%s.weight_scale", prefix);
        out_add(o, n, ST_BF16, 0, N, to_bf16(o, scale, (size_t)N));
        break;
    case NB_WINT4:
        out_add(o, n, ST_U8, N, K / 2, data);
        snprintf(n, sizeof n, "%s.weight_scale", prefix);
        out_add(o, n, ST_BF16, N, K / group, to_bf16(o, scale, (size_t)(N * (K / group))));
        break;
    case NB_WINT2:
        out_add(o, n, ST_U8, N, K / 4, data);
        snprintf(n, sizeof n, "%s.weight_scale", prefix);
        out_add(o, n, ST_U8, N, K / group, scale);
        snprintf(n, sizeof n, "%s.weight_super_scale", prefix);
        out_add(o, n, ST_BF16, 0, N, to_bf16(o, scale2, (size_t)N));
        break;
    case NB_FP8_B128:
        out_add(o, n, ST_F8_E4M3, N, K, data);
        snprintf(n, sizeof n, "%s.weight_scale_inv", prefix);
        out_add(o, n, ST_F32, (N + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK, (K + QUANT_FP8_BLOCK - 1) / QUANT_FP8_BLOCK,
                scale);
        break;
    default: break;
    }
}

/* sum_n d_n^T H d_n over sample rows of d = W - Q, relative to W's: the
 * output error on the calibration inputs, without the inputs. */
static double hessian_error(const float *W, const nb_weight *q, const double *H, int64_t N, int64_t K) {
    double num = 0, den = 0;
    float *row = xmalloc(sizeof(float) * (size_t)K);
    double *d = xmalloc(sizeof(double) * (size_t)K), *w = xmalloc(sizeof(double) * (size_t)K);
    int64_t step = N > 64 ? N / 64 : 1;
    for (int64_t n = 0; n < N; n += step) {
        quant_dequant_row(q, n, row);
        for (int64_t k = 0; k < K; k++) {
            w[k] = W[n * K + k];
            d[k] = w[k] - row[k];
        }
        for (int64_t i = 0; i < K; i++) {
            double hd = 0, hw = 0;
            for (int64_t j = 0; j < K; j++) {
                hd += H[i * K + j] * d[j];
                hw += H[i * K + j] * w[j];
            }
            num += d[i] * hd;
            den += w[i] * hw;
        }
    }
    free(row);
    free(d);
    free(w);
    return den > 0 ? sqrt(num / den) : 0;
}

typedef struct calib_ctx {
    int l0, l1;
    double **H;    /* [(l1 - l0) * 4] */
    nb_backend *be; /* the CPU backend: its buffers are host memory */
} calib_ctx;

/* H += x^T x for one forward step's inputs. The sum over the step's tokens
 * is one backend matmul (xt @ xt^T with xt = x^T, threaded and vectorized;
 * FP32 over at most a batch of tokens), added to the FP64 total; it does
 * what gptq_hessian_add does, about 20x faster on smollm2-sized layers. */
static void on_capture(void *ctx, int layer, int which, const float *x, int n, int64_t cols) {
    calib_ctx *c = ctx;
    if (layer < c->l0 || layer >= c->l1) return;
    float *xt = xmalloc(sizeof(float) * (size_t)n * (size_t)cols), *g = xmalloc(sizeof(float) * (size_t)(cols * cols));
    for (int t = 0; t < n; t++)
        for (int64_t k = 0; k < cols; k++) xt[k * n + t] = x[(size_t)t * cols + k];
    nb_weight w = {.dtype = NB_F32, .rows = cols, .cols = n, .data = xt};
    c->be->ops->matmul(c->be, g, xt, &w, (int)cols);
    double *H = c->H[(layer - c->l0) * 4 + which];
    for (int64_t i = 0; i < cols * cols; i++) H[i] += g[i];
    free(xt);
    free(g);
}

/* Runs ids through the model as sequences that fit its KV cache. */
static int calib_forward(nb_model *m, const int32_t *ids, size_t n, nb_err *e) {
    int max_t = model_max_batch_tokens(m), blocks = model_num_kv_blocks(m);
    size_t seq = (size_t)blocks * NB_KV_BLOCK_SIZE;
    if (seq > (size_t)model_config(m)->max_position) seq = (size_t)model_config(m)->max_position;
    int32_t *table = xmalloc(sizeof(int32_t) * (size_t)blocks), *pos = xmalloc(sizeof(int32_t) * (size_t)max_t),
            *seq_of = xcalloc((size_t)max_t, sizeof(int32_t));
    for (int i = 0; i < blocks; i++) table[i] = i;
    int rc = 0;
    for (size_t s0 = 0; s0 < n && !rc; s0 += seq) {
        size_t len = n - s0 < seq ? n - s0 : seq;
        for (size_t c0 = 0; c0 < len && !rc; c0 += (size_t)max_t) {
            int cn = len - c0 < (size_t)max_t ? (int)(len - c0) : max_t;
            for (int t = 0; t < cn; t++) pos[t] = (int32_t)(c0 + (size_t)t);
            nb_batch b = {.n_tokens = cn, .pos = pos, .seq_of = seq_of, .slot = pos, .n_seqs = 1,
                          .max_blocks = blocks, .block_tables = table};
            rc = model_forward(m, ids + s0 + c0, &b, NULL, 0, NULL, e);
        }
    }
    free(table);
    free(pos);
    free(seq_of);
    return rc;
}

/* Quantizes linear l of layer li and adds its tensors to o. */
static int quantize_linear(const nb_quantize_opts *qo, const st_model *st, out_set *o, int li, const linear_spec *l,
                           const double *H, double *err_sum, int *n_err, nb_err *e) {
    char prefix[200], name[256];
    snprintf(prefix, sizeof prefix, "model.layers.%d.%s", li, l->name);
    snprintf(name, sizeof name, "%s.weight", prefix);
    const st_tensor *t = st_find(st, name);
    nb_dtype t_src, t_dst = l->t;
    if (!t || t->ndim != 2) return nb_errf(e, "tensor '%s' missing or not a matrix", name);
    t_src = t->dtype == ST_F32 ? NB_F32 : t->dtype == ST_BF16 ? NB_BF16 : t->dtype == ST_F16 ? NB_F16 : NB_DTYPE_COUNT;
    if (t_src == NB_DTYPE_COUNT) return nb_errf(e, "%s is %s; quantize reads F32, BF16 or F16", name, st_dtype_name(t->dtype));
    int64_t N = t->shape[0], K = t->shape[1];
    int group = quant_pick_group(qo->plan, t_dst, K);
    if (quant_check(t_dst, N, K, group, e)) return nb_err_wrap(e, "%s", name);
    nb_weight src = {.dtype = t_src, .rows = N, .cols = K, .data = t->data};
    float *W = xmalloc(sizeof(float) * (size_t)(N * K));
    for (int64_t r = 0; r < N; r++) quant_dequant_row(&src, r, W + r * K);
    void *data = out_buf(o, quant_data_bytes(t_dst, N, K)), *scale = out_buf(o, quant_scale_bytes(t_dst, N, K, group));
    void *scale2 = out_buf(o, quant_scale2_bytes(t_dst, N));
    int rc = H ? gptq_quantize(t_dst, W, N, K, group, H, GPTQ_DAMP, qo->threads, data, scale, scale2, e)
               : quant_pack(t_dst, W, N, K, group, data, scale, scale2, e);
    if (rc) {
        free(W);
        return nb_err_wrap(e, "%s", name);
    }
    nb_weight q = {.dtype = t_dst, .rows = N, .cols = K, .data = data, .scale = scale, .scale2 = scale2, .group = group};
    double werr = quant_rel_error(W, &q);
    if (H) {
        /* the same weights rounded plainly, judged on the same inputs */
        void *d2 = xcalloc(1, quant_data_bytes(t_dst, N, K)), *s2 = xcalloc(1, quant_scale_bytes(t_dst, N, K, group) + 1);
        void *ss2 = xcalloc(1, quant_scale2_bytes(t_dst, N) + 1);
        nb_weight r = {.dtype = t_dst, .rows = N, .cols = K, .data = d2, .scale = s2, .scale2 = ss2, .group = group};
        double g = 0, rt = 0;
        if (!quant_pack(t_dst, W, N, K, group, d2, s2, ss2, e)) {
            g = hessian_error(W, &q, H, N, K);
            rt = hessian_error(W, &r, H, N, K);
        }
        if (qo->report)
            fprintf(qo->report, "%-36s %-6s weight error %.4f  calibration output error %.4f (round to nearest %.4f)\n",
                    prefix, nb_dtype_name(t_dst), werr, g, rt);
        err_sum[0] += g;
        err_sum[1] += rt;
        (*n_err)++;
        free(d2);
        free(s2);
        free(ss2);
    } else {
        if (qo->report) fprintf(qo->report, "%-36s %-6s weight error %.4f\n", prefix, nb_dtype_name(t_dst), werr);
    }
    free(W);
    emit_packed(o, prefix, t_dst, N, K, group, data, scale, scale2);
    return 0;
}

/* Copies every file but the weights and config.json from in to out. */
static int copy_side_files(const char *in, const char *out, nb_err *e) {
    DIR *d = opendir(in);
    if (!d) return nb_errf(e, "cannot read directory %s", in);
    struct dirent *de;
    int rc = 0;
    while (!rc && (de = readdir(d))) {
        const char *n = de->d_name;
        size_t l = strlen(n);
        if (n[0] == '.' || !strcmp(n, "config.json") || (l > 12 && !strcmp(n + l - 12, ".safetensors")) ||
            !strcmp(n, "model.safetensors.index.json") || !strcmp(n, "reference.json"))
            continue;
        char *src = util_path_join(in, n), *dst = util_path_join(out, n);
        struct stat sb;
        size_t len;
        char *buf = !stat(src, &sb) && S_ISREG(sb.st_mode) ? util_read_file(src, &len, e) : NULL;
        if (buf) {
            FILE *f = fopen(dst, "wb");
            if (!f || fwrite(buf, 1, len, f) != len) rc = nb_errf(e, "cannot write %s", dst);
            if (f) fclose(f);
            free(buf);
        }
        free(src);
        free(dst);
    }
    closedir(d);
    return rc;
}

/* config.json with the quantization_config that loads this checkpoint. */
static int write_config(const nb_quantize_opts *qo, nb_err *e) {
    char *path = util_path_join(qo->in, "config.json");
    char *text = util_read_file(path, NULL, e);
    free(path);
    if (!text) return -1;
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return nb_errf(e, "%s/config.json is not a JSON object", qo->in);
    }
    const nb_quant_plan *p = qo->plan;
    cJSON *qc = cJSON_CreateObject();
    if (p->dense == NB_FP8_B128 && strcmp(p->method, "mix_quant") && !p->kv_set) {
        /* Hugging Face's own shape, so other tools load it too */
        cJSON_AddStringToObject(qc, "quant_method", "fp8");
        cJSON_AddStringToObject(qc, "activation_scheme", "dynamic");
        cJSON_AddStringToObject(qc, "fmt", "e4m3");
        cJSON *bs = cJSON_AddArrayToObject(qc, "weight_block_size");
        cJSON_AddItemToArray(bs, cJSON_CreateNumber(128));
        cJSON_AddItemToArray(bs, cJSON_CreateNumber(128));
    } else {
        cJSON_AddStringToObject(qc, "quant_method", "nibble");
        cJSON_AddStringToObject(qc, "quantization", p->method);
        if (!strcmp(p->method, "mix_quant")) {
            cJSON_AddStringToObject(qc, "dense_quant_type", quant_dtype_setting_name(p->dense));
            cJSON_AddStringToObject(qc, "moe_quant_type", quant_dtype_setting_name(p->moe));
        }
        if (p->kv_set) cJSON_AddStringToObject(qc, "kv_cache_quant_type", nb_kv_dtype_name(p->kv));
        cJSON_AddBoolToObject(qc, "is_quantized", 1);
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "quantization_config");
    cJSON_AddItemToObject(root, "quantization_config", qc);
    char *out = cJSON_Print(root);
    cJSON_Delete(root);
    path = util_path_join(qo->out, "config.json");
    FILE *f = fopen(path, "wb");
    int rc = !f || fputs(out, f) < 0 ? nb_errf(e, "cannot write %s", path) : 0;
    if (f) fclose(f);
    free(path);
    free(out);
    return rc;
}

/* Reads the calibration text and tokenizes the first calib_tokens of it. */
static int calib_tokens(const nb_quantize_opts *qo, int32_t **ids, size_t *n, nb_err *e) {
    const char *path = qo->calib ? qo->calib : "tests/fixtures/text/calib.txt";
    char *text = util_read_file(path, NULL, e);
    if (!text) return nb_err_wrap(e, "--calib");
    nb_tokenizer *tok = tokenizer_load(qo->in, e);
    int rc = tok ? tokenizer_encode(tok, text, strlen(text), 1, ids, n, e) : -1;
    tokenizer_free(tok);
    free(text);
    if (rc) return -1;
    size_t want = qo->calib_tokens > 0 ? (size_t)qo->calib_tokens : 2048;
    if (*n > want) *n = want;
    if (*n < 16) return nb_errf(e, "%s: calibration text gives only %zu tokens (need 16 or more)", path, *n);
    return 0;
}

static int cmp_name(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int is_packed(nb_dtype t) { return t == NB_WINT8 || t == NB_WINT4 || t == NB_WINT2 || t == NB_FP8_B128; }

int quantize_model(const nb_quantize_opts *qo, nb_err *e) {
    const nb_quant_plan *p = qo->plan;
    nb_model_config cfg;
    if (config_load(qo->in, &cfg, e)) return -1;
    if (!is_packed(p->dense) && !(cfg.moe.n_experts && is_packed(p->moe)))
        return nb_errf(e, "quantize: the setting quantizes no layer (dense type %s%s%s)", quant_dtype_setting_name(p->dense),
                       cfg.moe.n_experts ? ", experts " : "", cfg.moe.n_experts ? quant_dtype_setting_name(p->moe) : "");
    int calibrated = !qo->rtn && p->dense != NB_FP8_B128;
    if (calibrated && cfg.moe.n_experts)
        return nb_errf(e, "quantize: GPTQ does not calibrate experts yet (a mixture of experts, %s); use --method rtn",
                       cfg.arch_name);
    nb_quant_plan none, have;
    quant_plan_parse(NULL, NULL, &none, e);
    if (quant_plan_resolve(qo->in, &none, &have, e)) return -1;
    if (strcmp(have.method, "none")) return nb_errf(e, "%s is already quantized (%s)", qo->in, have.method);
    st_model *st = st_open(qo->in, e);
    if (!st) return -1;
    mkdir(qo->out, 0755);
    out_set o = {0};
    int rc = 0, n_err = 0;
    linear_spec *lin = xmalloc(sizeof(linear_spec) * (size_t)layer_linear_cap(&cfg));
    double err_sum[2] = {0, 0}, t0 = util_now();
    nb_backend *be = NULL;
    nb_model *m = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (calibrated) {
        nb_backend_opts bo = {.device = "cpu", .threads = qo->threads};
        int blocks = ((cfg.max_position < 512 ? cfg.max_position : 512) + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
        nb_model_opts mo = {.quant = &none, .num_kv_blocks = blocks};
        if (calib_tokens(qo, &ids, &n_ids, e) || !(be = backend_create(&bo, e)) || !(m = model_load(qo->in, be, &mo, e)))
            rc = -1;
    }
    int64_t H = cfg.hidden_size, qd = (int64_t)cfg.n_heads * cfg.head_dim, F = cfg.intermediate_size;
    int64_t dims[4] = {H, qd, H, F};
    size_t per_layer = 0;
    for (int w = 0; w < 4; w++) per_layer += sizeof(double) * (size_t)(dims[w] * dims[w]);
    int per_pass = calibrated ? (int)(HESSIAN_BUDGET / per_layer) : cfg.n_layers;
    if (per_pass < 1) per_pass = 1;
    for (int l0 = 0; l0 < cfg.n_layers && !rc; l0 += per_pass) {
        int l1 = l0 + per_pass < cfg.n_layers ? l0 + per_pass : cfg.n_layers;
        calib_ctx cc = {.l0 = l0, .l1 = l1, .be = be};
        if (calibrated) {
            cc.H = xcalloc((size_t)(l1 - l0) * 4, sizeof(double *));
            for (int i = 0; i < (l1 - l0) * 4; i++) cc.H[i] = xcalloc((size_t)(dims[i % 4] * dims[i % 4]), sizeof(double));
            model_set_capture(m, on_capture, &cc);
            log_info("calibrating layers %d-%d on %zu tokens", l0, l1 - 1, n_ids);
            rc = calib_forward(m, ids, n_ids, e);
        }
        for (int li = l0; li < l1 && !rc; li++) {
            int nl = layer_linears(&cfg, p, li, lin);
            for (int w = 0; w < nl && !rc; w++)
                if (is_packed(lin[w].t))
                    rc = quantize_linear(qo, st, &o, li, &lin[w],
                                         calibrated && lin[w].input >= 0 ? cc.H[(li - l0) * 4 + lin[w].input] : NULL,
                                         err_sum, &n_err, e);
        }
        for (int i = 0; cc.H && i < (l1 - l0) * 4; i++) free(cc.H[i]);
        free(cc.H);
    }
    /* everything else as it is: the tensors not written packed above
     * (their names, sorted: a large mixture of experts packs tens of
     * thousands of them) */
    int n_packed = o.n;
    const char **packed = xmalloc(sizeof(char *) * (size_t)(n_packed ? n_packed : 1));
    for (int j = 0; j < n_packed; j++) packed[j] = o.t[j].name;
    qsort(packed, (size_t)n_packed, sizeof *packed, cmp_name);
    for (int i = 0; i < st_count(st) && !rc; i++) {
        const st_tensor *t = st_get(st, i);
        if (!bsearch(&t->name, packed, (size_t)n_packed, sizeof *packed, cmp_name)) {
            if (o.n == o.cap) o.t = xrealloc(o.t, sizeof(st_write_tensor) * (size_t)(o.cap = o.cap * 2 + 64));
            st_write_tensor *w = &o.t[o.n++];
            memset(w, 0, sizeof *w);
            w->name = t->name;
            w->dtype = t->dtype;
            w->ndim = t->ndim;
            memcpy(w->shape, t->shape, sizeof w->shape);
            w->data = t->data;
        }
    }
    free(packed);
    if (!rc) {
        char *path = util_path_join(qo->out, "model.safetensors");
        const char *meta[] = {"format", "pt", "quantized_by", "nibble"};
        rc = st_write(path, o.t, o.n, meta, 2, e);
        free(path);
    }
    if (!rc) rc = write_config(qo, e) || copy_side_files(qo->in, qo->out, e) ? -1 : 0;
    if (!rc && n_err && qo->report)
        fprintf(qo->report, "quantized %d matrices with GPTQ in %.1f s: mean calibration output error %.4f vs %.4f for round to "
                 "nearest (%.2fx)\n",
                 n_err, util_now() - t0, err_sum[0] / n_err, err_sum[1] / n_err,
                 err_sum[0] > 0 ? err_sum[1] / err_sum[0] : 0.0);
    for (int i = 0; i < o.n_bufs; i++) free(o.bufs[i]);
    free(o.bufs);
    free(o.t);
    free(ids);
    free(lin);
    model_free(m);
    backend_destroy(be);
    st_close(st);
    return rc;
}
