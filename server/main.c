/* nibble command line: generate, inspect (and, later, serve). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/generate.h"
#include "engine/perplexity.h"
#include "engine/quantize.h"
#include "engine/model/chat_template.h"
#include "engine/model/model.h"
#include "engine/model/tokenizer.h"
#include "kernels/backend.h"
#include "server/server.h"

#include <pthread.h>
#include <signal.h>
#include <systemd/sd-daemon.h>

#define NB_VERSION "0.1.0"

static void usage(FILE *f) {
    fprintf(f,
            "usage: nibble <command> [options]\n"
            "\n"
            "commands:\n"
            "  generate --model DIR --prompt TEXT   generate text, printing tokens as they come\n"
            "      [--chat] [--system TEXT] [--max-tokens N] [--temperature T] [--top-k K]\n"
            "      [--top-p P] [--min-p P] [--repetition-penalty R] [--presence-penalty P]\n"
            "      [--frequency-penalty F] [--seed S] [--ignore-eos] [--threads N] [--device D]\n"
            "      [--show-ids] [--verbose] [--quantization NAME|JSON] [--kv-cache-dtype T]\n"
            "      [--tensor-parallel-size N]\n"
            "  serve --model DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]\n"
            "      [--max-num-seqs N] [--num-kv-blocks N] [--threads N] [--api-key KEY]\n"
            "      [--max-queue N] [--max-num-batched-tokens N] [--shutdown-grace SECONDS]\n"
            "      [--http-threads N] [--quantization NAME|JSON] [--kv-cache-dtype T]\n"
            "      [--device D] [--gpu-memory-utilization F] [--tensor-parallel-size N]\n"
            "      [--config FILE.json]\n"
            "                                       OpenAI-compatible HTTP server\n"
            "  inspect --model DIR [--quantization NAME|JSON] [--quant-report]\n"
            "                                       architecture, parameters, dtypes, memory;\n"
            "                                       with --quant-report each matrix's quantization error\n"
            "  quantize --model IN --out OUT --quantization wint2|wint4|wint8|block_wise_fp8|JSON\n"
            "      [--calib FILE] [--calib-tokens N] [--method gptq|rtn] [--threads N]\n"
            "                                       write a quantized checkpoint\n"
            "  perplexity --model DIR --file TEXT [--ctx N] [--quantization ...] [--kv-cache-dtype T]\n"
            "                                       perplexity of the model on a text file\n"
            "\n"
            "quantization: none, wint8, wint4, wint2 (offline), block_wise_fp8, or a JSON object\n"
            "  {\"quantization\": \"mix_quant\", \"dense_quant_type\": \"wint8\", \"kv_cache_quant_type\": \"int8\"};\n"
            "  --kv-cache-dtype: auto, bf16, int8, float8_e4m3fn\n"
            "device: auto (cuda when a GPU is present, else cpu), cpu, cuda, cuda:N;\n"
            "  --gpu-memory-utilization F: share of GPU memory for weights, activations and KV (0.9)\n"
            "  --tensor-parallel-size N (-tp N): split the model over N GPUs (cuda:K: GPUs K..K+N-1),\n"
            "  or over N CPU ranks with --device cpu\n"
            "  bench-membw                          measure host copy bandwidth\n"
            "  version                              print the version\n");
}

typedef struct cli_opts {
    const char *model, *prompt, *system, *device, *host, *served_name, *api_key;
    const char *quantization, *kv_dtype, *out, *calib, *method, *file;
    int ctx;
    int quant_report, calib_tokens;
    int chat, max_tokens, threads, ignore_eos, show_ids, port, max_num_seqs, kv_blocks, max_queue, max_batched, http_threads, tp;
    double grace, gpu_mem_util;
    int set_temperature, set_top_p, set_top_k; /* else generation_config.json decides */
    cJSON *config;    /* --config document: its strings back some fields */
    char **config_argv; /* the document as flags */
    int config_argc;
    nb_sampling_params sp;
} cli_opts;

static int parse_num(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "nibble: %s expects a number in [%g, %g], got \"%s\"\n", flag, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_int(const char *flag, const char *s, long lo, long hi, long *out) {
    double v;
    if (parse_num(flag, s, (double)lo, (double)hi, &v)) return -1;
    if (v != (double)(long)v) {
        fprintf(stderr, "nibble: %s expects an integer, got \"%s\"\n", flag, s);
        return -1;
    }
    *out = (long)v;
    return 0;
}

/* Parses flags into o; returns 0, or -1 after printing one line. */
static int parse_flags(int argc, char **argv, cli_opts *o) {
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        double d;
        long l;
#define NEED_VALUE                                                   \
    if (!v) {                                                        \
        fprintf(stderr, "nibble: %s needs a value\n", a);            \
        return -1;                                                   \
    }                                                                \
    i++;
        if (!strcmp(a, "--chat")) o->chat = 1;
        else if (!strcmp(a, "--verbose") || !strcmp(a, "-v")) log_set_level(LOG_INFO);
        else if (!strcmp(a, "--ignore-eos")) o->ignore_eos = 1;
        else if (!strcmp(a, "--show-ids")) o->show_ids = 1;
        else if (!strcmp(a, "--model")) { NEED_VALUE o->model = v; }
        else if (!strcmp(a, "--prompt")) { NEED_VALUE o->prompt = v; }
        else if (!strcmp(a, "--system")) { NEED_VALUE o->system = v; }
        else if (!strcmp(a, "--device")) { NEED_VALUE o->device = v; }
        else if (!strcmp(a, "--host")) { NEED_VALUE o->host = v; }
        else if (!strcmp(a, "--quantization")) { NEED_VALUE o->quantization = v; }
        else if (!strcmp(a, "--kv-cache-dtype")) { NEED_VALUE o->kv_dtype = v; }
        else if (!strcmp(a, "--quant-report")) o->quant_report = 1;
        else if (!strcmp(a, "--out")) { NEED_VALUE o->out = v; }
        else if (!strcmp(a, "--calib")) { NEED_VALUE o->calib = v; }
        else if (!strcmp(a, "--file")) { NEED_VALUE o->file = v; }
        else if (!strcmp(a, "--ctx")) { NEED_VALUE if (parse_int(a, v, 2, 1 << 20, &l)) return -1; o->ctx = (int)l; }
        else if (!strcmp(a, "--method")) { NEED_VALUE o->method = v; }
        else if (!strcmp(a, "--calib-tokens")) { NEED_VALUE if (parse_int(a, v, 16, 1 << 20, &l)) return -1; o->calib_tokens = (int)l; }
        else if (!strcmp(a, "--api-key")) { NEED_VALUE o->api_key = v; }
        else if (!strcmp(a, "--max-num-batched-tokens")) { NEED_VALUE if (parse_int(a, v, 1, 1 << 20, &l)) return -1; o->max_batched = (int)l; }
        else if (!strcmp(a, "--http-threads")) { NEED_VALUE if (parse_int(a, v, 1, 256, &l)) return -1; o->http_threads = (int)l; }
        else if (!strcmp(a, "--max-queue")) { NEED_VALUE if (parse_int(a, v, 1, 1 << 20, &l)) return -1; o->max_queue = (int)l; }
        else if (!strcmp(a, "--gpu-memory-utilization")) { NEED_VALUE if (parse_num(a, v, 0.01, 1, &d)) return -1; o->gpu_mem_util = d; }
        else if (!strcmp(a, "--shutdown-grace")) { NEED_VALUE if (parse_num(a, v, 0, 3600, &d)) return -1; o->grace = d; }
        else if (!strcmp(a, "--served-model-name")) { NEED_VALUE o->served_name = v; }
        else if (!strcmp(a, "--port")) { NEED_VALUE if (parse_int(a, v, 1, 65535, &l)) return -1; o->port = (int)l; }
        else if (!strcmp(a, "--max-num-seqs")) { NEED_VALUE if (parse_int(a, v, 1, 4096, &l)) return -1; o->max_num_seqs = (int)l; }
        else if (!strcmp(a, "--num-kv-blocks")) { NEED_VALUE if (parse_int(a, v, 1, 1 << 24, &l)) return -1; o->kv_blocks = (int)l; }
        else if (!strcmp(a, "--max-tokens")) { NEED_VALUE if (parse_int(a, v, 1, 1 << 20, &l)) return -1; o->max_tokens = (int)l; }
        else if (!strcmp(a, "--tensor-parallel-size") || !strcmp(a, "-tp")) { NEED_VALUE if (parse_int(a, v, 1, 64, &l)) return -1; o->tp = (int)l; }
        else if (!strcmp(a, "--threads")) { NEED_VALUE if (parse_int(a, v, 0, 1024, &l)) return -1; o->threads = (int)l; }
        else if (!strcmp(a, "--seed")) { NEED_VALUE if (parse_int(a, v, 0, 1L << 52, &l)) return -1; o->sp.seed = (uint64_t)l; o->sp.has_seed = 1; }
        else if (!strcmp(a, "--temperature")) { NEED_VALUE if (parse_num(a, v, 0, 100, &d)) return -1; o->sp.temperature = (float)d; o->set_temperature = 1; }
        else if (!strcmp(a, "--top-k")) { NEED_VALUE if (parse_int(a, v, -1, 1 << 30, &l)) return -1; o->sp.top_k = (int)l; o->set_top_k = 1; }
        else if (!strcmp(a, "--top-p")) { NEED_VALUE if (parse_num(a, v, 0, 1, &d)) return -1; o->sp.top_p = (float)d; o->set_top_p = 1; }
        else if (!strcmp(a, "--min-p")) { NEED_VALUE if (parse_num(a, v, 0, 1, &d)) return -1; o->sp.min_p = (float)d; }
        else if (!strcmp(a, "--repetition-penalty")) { NEED_VALUE if (parse_num(a, v, 0, 100, &d)) return -1; o->sp.repetition_penalty = (float)d; }
        else if (!strcmp(a, "--presence-penalty")) { NEED_VALUE if (parse_num(a, v, -2, 2, &d)) return -1; o->sp.presence_penalty = (float)d; }
        else if (!strcmp(a, "--frequency-penalty")) { NEED_VALUE if (parse_num(a, v, -2, 2, &d)) return -1; o->sp.frequency_penalty = (float)d; }
        else {
            fprintf(stderr, "nibble: unknown option \"%s\" (see nibble --help)\n", a);
            return -1;
        }
#undef NEED_VALUE
    }
    return 0;
}

static void cli_opts_free(cli_opts *o) {
    for (int i = 0; i < o->config_argc; i++) free(o->config_argv[i]);
    free(o->config_argv);
    cJSON_Delete(o->config);
}

/* A JSON config {"port": 8000, "max_num_seqs": 8, "ignore_eos": true, ...}
 * becomes the flags --port 8000 --max-num-seqs 8 --ignore-eos. */
static int load_config(const char *path, cli_opts *o) {
    nb_err e;
    char *text = util_read_file(path, NULL, &e);
    if (!text) {
        fprintf(stderr, "nibble: --config: %s\n", e.msg);
        return -1;
    }
    o->config = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(o->config)) {
        fprintf(stderr, "nibble: --config %s: not a JSON object\n", path);
        return -1;
    }
    int n = cJSON_GetArraySize(o->config);
    o->config_argv = xcalloc((size_t)(2 * n + 1), sizeof(char *));
    for (const cJSON *it = o->config->child; it; it = it->next) {
        char flag[128];
        snprintf(flag, sizeof flag, "--%s", it->string);
        for (char *p = flag; *p; p++)
            if (*p == '_') *p = '-';
        char value[64];
        if (cJSON_IsBool(it)) {
            if (cJSON_IsTrue(it)) o->config_argv[o->config_argc++] = xstrdup(flag);
            continue;
        }
        o->config_argv[o->config_argc++] = xstrdup(flag);
        if (cJSON_IsString(it)) {
            o->config_argv[o->config_argc++] = xstrdup(it->valuestring);
        } else if (cJSON_IsNumber(it)) {
            snprintf(value, sizeof value, "%.17g", it->valuedouble);
            o->config_argv[o->config_argc++] = xstrdup(value);
        } else if (cJSON_IsObject(it) && !strcmp(it->string, "quantization")) {
            o->config_argv[o->config_argc++] = cJSON_PrintUnformatted(it);
        } else {
            fprintf(stderr, "nibble: --config %s: \"%s\" must be a string, number or boolean\n", path, it->string);
            return -1;
        }
    }
    return 0;
}

/* Defaults, then --config FILE, then the other flags (which win). */
static int parse_args(int argc, char **argv, cli_opts *o) {
    memset(o, 0, sizeof *o);
    o->max_tokens = 128;
    o->device = "auto";
    o->grace = 30;
    sampling_params_default(&o->sp);
    char **rest = xmalloc(sizeof(char *) * (size_t)(argc + 1));
    int n_rest = 0, rc = 0;
    for (int i = 0; i < argc && rc == 0; i++) {
        if (strcmp(argv[i], "--config")) {
            rest[n_rest++] = argv[i];
        } else if (i + 1 >= argc) {
            fprintf(stderr, "nibble: --config needs a value\n");
            rc = -1;
        } else if (o->config) {
            fprintf(stderr, "nibble: --config given twice\n");
            rc = -1;
        } else {
            rc = load_config(argv[++i], o);
        }
    }
    if (rc == 0 && o->config) rc = parse_flags(o->config_argc, o->config_argv, o);
    if (rc == 0) rc = parse_flags(n_rest, rest, o);
    free(rest);
    if (rc == 0 && !o->model) {
        fprintf(stderr, "nibble: --model DIR is required\n");
        rc = -1;
    }
    return rc;
}

/* The quantization the flags ask for; prints one line on a bad setting. */
static int make_plan(const cli_opts *o, nb_quant_plan *p) {
    nb_err e;
    if (quant_plan_parse(o->quantization, o->kv_dtype, p, &e)) {
        fprintf(stderr, "nibble: %s\n", e.msg);
        return -1;
    }
    return 0;
}

/* Renders the chat template (or takes the raw prompt) and tokenizes it. */
static int build_prompt(const cli_opts *o, const nb_tokenizer *tok, int32_t **ids, size_t *n, nb_err *e) {
    if (!o->chat) return tokenizer_encode(tok, o->prompt, strlen(o->prompt), 1, ids, n, e);
    nb_chat_template *ct = chat_template_load(o->model, e);
    if (!ct) return -1;
    nb_chat_msg msgs[2];
    int nm = 0;
    if (o->system) msgs[nm++] = (nb_chat_msg){"system", o->system};
    msgs[nm++] = (nb_chat_msg){"user", o->prompt};
    char *text = chat_template_render(ct, msgs, nm, 1, e);
    chat_template_free(ct);
    if (!text) return -1;
    /* The template already holds BOS and the other special tokens. */
    int rc = tokenizer_encode(tok, text, strlen(text), 0, ids, n, e);
    free(text);
    return rc;
}

typedef struct print_ctx {
    nb_detok *dt;
    int show_ids;
} print_ctx;

static int print_token(void *ctx, int32_t id) {
    print_ctx *p = ctx;
    size_t len;
    const char *s = detok_push(p->dt, id, &len);
    fwrite(s, 1, len, stdout);
    if (p->show_ids) printf("[%d]", id);
    fflush(stdout);
    return 0;
}

static int cmd_generate(int argc, char **argv) {
    cli_opts o;
    if (parse_args(argc, argv, &o)) {
        cli_opts_free(&o);
        return 2;
    }
    nb_quant_plan plan;
    if (!o.prompt) fprintf(stderr, "nibble: generate needs --prompt TEXT\n");
    if (!o.prompt || make_plan(&o, &plan)) {
        cli_opts_free(&o);
        return 2;
    }
    nb_err e = {{0}};
    nb_backend_opts bo = {.device = o.device, .threads = o.threads, .tensor_parallel = o.tp};
    nb_backend *be = NULL;
    nb_model *m = NULL;
    nb_tokenizer *tok = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = 1;
    double t0 = util_now();
    /* The prompt is tokenized first so the KV cache is sized to this one
     * sequence (prompt + max_tokens), not to the model's whole context. */
    nb_model_opts mo = {.quant = &plan, .quant_report = o.quant_report ? stderr : NULL};
    if (!(be = backend_create(&bo, &e)) || !(tok = tokenizer_load(o.model, &e)) ||
        build_prompt(&o, tok, &ids, &n_ids, &e))
        goto out;
    nb_model_config cfg;
    if (config_load(o.model, &cfg, &e)) goto out;
    /* Sampling defaults come from the model's generation_config.json, as in
     * vLLM and transformers; flags override them. */
    if (!o.set_temperature && cfg.gen_temperature >= 0) o.sp.temperature = cfg.gen_temperature;
    if (!o.set_top_p && cfg.gen_top_p > 0 && cfg.gen_top_p <= 1) o.sp.top_p = cfg.gen_top_p;
    if (!o.set_top_k && cfg.gen_top_k > 0) o.sp.top_k = cfg.gen_top_k;
    size_t want = n_ids + (size_t)o.max_tokens;
    if (want > (size_t)cfg.max_position) want = (size_t)cfg.max_position; /* generate_run rejects the excess */
    mo.num_kv_blocks = (int)((want + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE);
    if (!(m = model_load(o.model, be, &mo, &e))) goto out;
    double load_s = util_now() - t0;
    print_ctx pc = {detok_create(tok, 1), o.show_ids};
    nb_gen_opts go = {.max_tokens = o.max_tokens, .ignore_eos = o.ignore_eos, .sampling = o.sp};
    nb_gen_stats st;
    if (generate_run(m, ids, n_ids, &go, print_token, &pc, NULL, NULL, &st, &e) == 0) {
        size_t len;
        const char *tail = detok_flush(pc.dt, &len);
        fwrite(tail, 1, len, stdout);
        printf("\n");
        fflush(stdout);
        fprintf(stderr,
                "load %.2f s | prompt %zu tokens, %.1f tok/s | output %zu tokens, %.2f tok/s (%s)\n",
                load_s, st.prompt_tokens, st.prompt_tokens / (st.prefill_s > 0 ? st.prefill_s : 1e-9),
                st.output_tokens,
                st.output_tokens > 1 ? (st.output_tokens - 1) / (st.decode_s > 0 ? st.decode_s : 1e-9) : 0.0,
                st.finish_eos ? "eos" : "length");
        rc = 0;
    }
    detok_free(pc.dt);
out:
    if (rc) fprintf(stderr, "nibble: %s\n", e.msg);
    free(ids);
    model_free(m);
    tokenizer_free(tok);
    backend_destroy(be);
    cli_opts_free(&o);
    return rc;
}

static int cmd_inspect(int argc, char **argv) {
    cli_opts o;
    nb_quant_plan plan;
    if (parse_args(argc, argv, &o) || make_plan(&o, &plan)) {
        cli_opts_free(&o);
        return 2;
    }
    nb_err e = {{0}};
    int rc = 0;
    if (model_inspect(o.model, stdout, &e)) {
        rc = 1;
    } else if (o.quant_report || o.quantization || o.kv_dtype) {
        /* bind the model as it would serve, reporting each quantized matrix */
        nb_backend_opts bo = {.device = "cpu", .threads = o.threads};
        nb_backend *be = backend_create(&bo, &e);
        nb_model_opts mo = {.quant = &plan, .quant_report = o.quant_report ? stdout : NULL, .num_kv_blocks = 1};
        if (o.quant_report) printf("quantization report (relative Frobenius error of W, and of x W^T on 16 Gaussian rows):\n");
        nb_model *m = be ? model_load(o.model, be, &mo, &e) : NULL;
        if (m) {
            char name[32];
            const nb_quant_plan *p = model_quant_plan(m);
            printf("quantization:   %s (%s), KV cache %s\n", p->method, quant_plan_name(p, name, sizeof name),
                   nb_kv_dtype_name(p->kv));
            for (int t = 0; t < NB_DTYPE_COUNT; t++)
                if (model_weight_bytes(m, (nb_dtype)t))
                    printf("resident %-9s %.2f MiB\n", nb_dtype_name((nb_dtype)t), model_weight_bytes(m, (nb_dtype)t) / 1048576.0);
        }
        rc = m ? 0 : 1;
        model_free(m);
        backend_destroy(be);
    }
    if (rc == 0) {
        int ndev = cuda_device_count();
        printf("cuda devices:   %d\n", ndev);
        for (int i = 0; i < ndev; i++) {
            char buf[256];
            cuda_device_describe(i, buf, sizeof buf);
            printf("  [%d] %s\n", i, buf);
        }
    } else {
        fprintf(stderr, "nibble: %s\n", e.msg);
    }
    cli_opts_free(&o);
    return rc;
}

/* Perplexity of the model (as quantized by the flags) on a text file. */
static int cmd_perplexity(int argc, char **argv) {
    cli_opts o;
    nb_quant_plan plan;
    if (parse_args(argc, argv, &o) || make_plan(&o, &plan)) {
        cli_opts_free(&o);
        return 2;
    }
    if (!o.file) {
        fprintf(stderr, "nibble: perplexity needs --file TEXT\n");
        cli_opts_free(&o);
        return 2;
    }
    nb_err e = {{0}};
    int rc = 1, ctx = o.ctx ? o.ctx : 256;
    nb_backend_opts bo = {.device = o.device, .threads = o.threads, .tensor_parallel = o.tp};
    nb_backend *be = NULL;
    nb_tokenizer *tok = NULL;
    nb_model *m = NULL;
    int32_t *ids = NULL;
    size_t n = 0, scored = 0;
    double ppl = 0, t0 = util_now();
    char *text = util_read_file(o.file, NULL, &e);
    nb_model_opts mo = {.quant = &plan, .num_kv_blocks = (ctx + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE};
    if (text && (be = backend_create(&bo, &e)) && (tok = tokenizer_load(o.model, &e)) &&
        !tokenizer_encode(tok, text, strlen(text), 1, &ids, &n, &e) && (m = model_load(o.model, be, &mo, &e)) &&
        !perplexity_run(m, ids, n, ctx, &ppl, &scored, &e)) {
        char name[32];
        printf("perplexity %.4f over %zu tokens (windows of %d), %s, %.1f s\n", ppl, scored, ctx,
               quant_plan_name(model_quant_plan(m), name, sizeof name), util_now() - t0);
        rc = 0;
    }
    if (rc) fprintf(stderr, "nibble: %s\n", e.msg);
    free(text);
    free(ids);
    model_free(m);
    tokenizer_free(tok);
    backend_destroy(be);
    cli_opts_free(&o);
    return rc;
}

/* Writes a quantized checkpoint (engine/quantize.c). */
static int cmd_quantize(int argc, char **argv) {
    cli_opts o;
    nb_quant_plan plan;
    if (parse_args(argc, argv, &o) || make_plan(&o, &plan)) {
        cli_opts_free(&o);
        return 2;
    }
    int rc = 2;
    if (!o.out) fprintf(stderr, "nibble: quantize needs --out DIR\n");
    else if (!o.quantization) fprintf(stderr, "nibble: quantize needs --quantization NAME|JSON\n");
    else if (o.method && strcmp(o.method, "gptq") && strcmp(o.method, "rtn"))
        fprintf(stderr, "nibble: --method must be gptq or rtn, got \"%s\"\n", o.method);
    else {
        nb_err e = {{0}};
        nb_quantize_opts qo = {.in = o.model, .out = o.out, .plan = &plan, .calib = o.calib,
                               .calib_tokens = o.calib_tokens, .rtn = o.method && !strcmp(o.method, "rtn"),
                               .threads = o.threads, .report = stdout};
        rc = quantize_model(&qo, &e) ? 1 : 0;
        if (rc) fprintf(stderr, "nibble: %s\n", e.msg);
    }
    cli_opts_free(&o);
    return rc;
}

/* Serves until SIGINT or SIGTERM; this thread runs the engine loop. */
static int cmd_serve(int argc, char **argv) {
    cli_opts o;
    if (parse_args(argc, argv, &o)) {
        cli_opts_free(&o);
        return 2;
    }
    log_set_level(LOG_INFO);
    nb_err e = {{0}};
    nb_backend_opts bo = {.device = o.device, .threads = o.threads, .tensor_parallel = o.tp};
    nb_backend *be = NULL;
    nb_model *m = NULL;
    nb_tokenizer *tok = NULL;
    nb_chat_template *ct = NULL;
    nb_server *srv = NULL;
    int rc = 1;
    nb_quant_plan plan;
    if (make_plan(&o, &plan)) {
        cli_opts_free(&o);
        return 2;
    }
    /* one logit row per running sequence: vocab floats each, a lot of
     * device memory at max_batch_tokens rows */
    nb_model_opts mo = {.num_kv_blocks = o.kv_blocks, .max_batch_tokens = o.max_batched,
                        .max_logit_rows = o.max_num_seqs > 0 ? o.max_num_seqs : 16, .quant = &plan,
                        .quant_report = o.quant_report ? stderr : NULL, .gpu_mem_util = (float)o.gpu_mem_util};
    if (!(be = backend_create(&bo, &e)) || !(tok = tokenizer_load(o.model, &e)) ||
        !(ct = chat_template_load(o.model, &e)) || !(m = model_load(o.model, be, &mo, &e)))
        goto out;
    nb_server_opts so = {.host = o.host, .port = o.port, .model_name = o.served_name ? o.served_name : o.model,
                         .max_num_seqs = o.max_num_seqs, .api_key = o.api_key, .max_queue = o.max_queue,
                         .http_threads = o.http_threads};
    if (!(srv = server_start(m, tok, ct, &so, &e))) goto out;
    log_info("serving %s on http://%s:%d (model id \"%s\")", o.model, so.host ? so.host : "127.0.0.1",
             so.port ? so.port : 8000, so.model_name);
    sd_notify(0, "READY=1");
    int left = server_run(srv, o.grace);
    if (left) log_warn("%d requests still running after the grace period are cancelled", left);
    rc = 0;
out:
    if (rc) fprintf(stderr, "nibble: %s\n", e.msg);
    server_stop(srv);
    model_free(m);
    chat_template_free(ct);
    tokenizer_free(tok);
    backend_destroy(be);
    cli_opts_free(&o);
    return rc;
}

/* Host copy bandwidth, the yardstick for memory-bound decode. */
static int cmd_bench_membw(void) {
    size_t n = (size_t)256 << 20;
    char *a = xmalloc(n), *b = xmalloc(n);
    memset(a, 1, n);
    memset(b, 2, n);
    double best = 1e9;
    for (int i = 0; i < 5; i++) {
        double t0 = util_now();
        memcpy(b, a, n);
        double dt = util_now() - t0;
        if (dt < best) best = dt;
        a[i] = b[n - 1 - i]; /* keep the copies observable */
    }
    printf("memcpy 256 MiB: %.2f GB/s\n", 2.0 * n / best / 1e9);
    free(a);
    free(b);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    /* The CLI prints results; progress logs are for --verbose (the server
     * will log at info). */
    log_set_level(LOG_WARN);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc - 2, argv + 2);
    if (!strcmp(cmd, "inspect")) return cmd_inspect(argc - 2, argv + 2);
    if (!strcmp(cmd, "quantize")) return cmd_quantize(argc - 2, argv + 2);
    if (!strcmp(cmd, "perplexity")) return cmd_perplexity(argc - 2, argv + 2);
    if (!strcmp(cmd, "serve")) return cmd_serve(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench-membw")) return cmd_bench_membw();
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("nibble %s\n", NB_VERSION);
        return 0;
    }
    fprintf(stderr, "nibble: unknown command \"%s\" (see nibble --help)\n", cmd);
    return 2;
}
