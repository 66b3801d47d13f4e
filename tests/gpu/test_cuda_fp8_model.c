/* block_wise_fp8 models end to end on the CUDA backend against the CPU
 * backend (`make test-gpu`; `make test` only builds this): every committed
 * fixture quantized online at load (--quantization block_wise_fp8), and the
 * Hugging Face FP8 checkpoint fixture (llama-fp8, quantization from its
 * config.json), each loaded on the CPU backend and on a fresh CUDA backend
 * with the same KV cache type (BF16):
 *  - the prompt's last-position logits within 2e-2 (max |diff| / max
 *    |logit|, the measure of test_cuda_model.c), the prompt in one step
 *    (M = prompt length: cuBLASLt's block-scaled GEMM with a GEMV tail of
 *    M % 4 rows, where the GPU has it) and in chunks of 5 (the GEMV kernel);
 *  - 32 greedy tokens from generate_run (decode steps recorded as CUDA
 *    graphs and replayed) identical on both backends.
 * Both backends quantize activations per token per 128 columns with the
 * same codes (test_cuda_fp8.c checks that bit for bit), so logits differ
 * by FP32 summation order, the tensor cores' accumulation and the BF16
 * activations of the unquantized GEMMs (lm_head, on the GPU). Needs a CUDA
 * device; fails (not skips) without one. */
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/generate.h"
#include "engine/model/model.h"
#include "tests/fixture_ref.h"
#include "tests/test.h"

#define LOGIT_TOL 2e-2
#define N_GREEDY 32

static nb_backend *cpu;

/* max |a - b| / max |b|; NaN in a gives NaN */
static double rel_err(const float *a, const float *b, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (isnan(d)) return NAN;
        if (d > num) num = d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return num / (den > 0 ? den : 1);
}

static nb_model *load(nb_backend *be, const char *name, const nb_quant_plan *plan) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", name);
    nb_err e = {{0}};
    nb_model_opts o = {.max_batch_tokens = 256, .num_kv_blocks = 64, .quant = plan};
    nb_model *m = model_load(dir, be, &o, &e);
    if (!m) fprintf(stderr, "  load %s on %s: %s\n", dir, be->ops->name, e.msg);
    return m;
}

/* The prompt as one sequence in blocks 0, 1, ..., in steps of at most
 * `chunk` tokens; the last position's logits. */
static int run_prompt(nb_model *m, const ref *r, int chunk, float *logits) {
    int nb = (r->n_prompt + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    int32_t *table = xmalloc(sizeof(int32_t) * (size_t)nb);
    for (int i = 0; i < nb; i++) table[i] = i;
    int32_t pos[256], seq[256];
    int rc = 0;
    for (int start = 0; start < r->n_prompt && rc == 0; start += chunk) {
        int n = r->n_prompt - start < chunk ? r->n_prompt - start : chunk;
        for (int t = 0; t < n; t++) pos[t] = start + t, seq[t] = 0;
        nb_batch b = {n, pos, seq, pos, 1, nb, table}; /* slot = position: blocks in order */
        int32_t last = n - 1;
        nb_err e = {{0}};
        rc = model_forward(m, r->prompt + start, &b, &last, start + n == r->n_prompt, logits, &e);
        if (rc) fprintf(stderr, "  forward: %s\n", e.msg);
    }
    free(table);
    return rc;
}

static int32_t *greedy(nb_model *m, const ref *r, size_t *n) {
    nb_gen_opts go = {.max_tokens = N_GREEDY, .ignore_eos = 1};
    sampling_params_default(&go.sampling);
    go.sampling.temperature = 0;
    int32_t *out = NULL;
    nb_err e = {{0}};
    *n = 0;
    if (generate_run(m, r->prompt, (size_t)r->n_prompt, &go, NULL, NULL, &out, n, NULL, &e)) {
        fprintf(stderr, "  generate: %s\n", e.msg);
        return NULL;
    }
    return out;
}

/* name: the fixture; quant: the --quantization setting (NULL: the
 * checkpoint's own). */
static void check_model(const char *name, const char *quant) {
    char what[96];
    snprintf(what, sizeof what, "%s, %s, kv bf16", name, quant ? quant : "checkpoint fp8");
    ref r;
    REQUIRE(ref_load(name, &r) == 0, "%s: reference.json unreadable", what);
    nb_quant_plan plan;
    nb_err e = {{0}};
    if (r.n_prompt <= 0 || r.n_prompt > 256) {
        CHECK(0, "%s: prompt of %d tokens (want 1..256)", what, r.n_prompt);
        ref_free(&r);
        return;
    }
    if (quant_plan_parse(quant, "bf16", &plan, &e)) {
        CHECK(0, "%s: %s", what, e.msg);
        ref_free(&r);
        return;
    }
    nb_backend_opts bo = {.device = "cuda"};
    nb_backend *gpu = backend_create(&bo, &e);
    if (!gpu) {
        CHECK(0, "%s: cuda backend: %s", what, e.msg);
        ref_free(&r);
        return;
    }
    nb_model *mc = load(cpu, name, &plan), *mg = load(gpu, name, &plan);
    CHECK(mc && mg, "%s: model did not load (cpu %s, cuda %s)", what, mc ? "ok" : "failed", mg ? "ok" : "failed");
    if (mc && mg) {
        CHECK(model_quant_plan(mc)->dense == NB_FP8_B128 && model_quant_plan(mg)->dense == NB_FP8_B128,
              "%s: linears are %s (cpu) and %s (cuda), want block_wise_fp8", what,
              nb_dtype_name(model_quant_plan(mc)->dense), nb_dtype_name(model_quant_plan(mg)->dense));
        CHECK(model_quant_plan(mg)->kv == NB_KV_BF16 && model_quant_plan(mc)->kv == NB_KV_BF16, "%s: KV cache %s",
              what, nb_kv_dtype_name(model_quant_plan(mg)->kv));
        int V = model_config(mc)->vocab_size;
        float *lc = xmalloc(sizeof(float) * (size_t)V), *lg = xmalloc(sizeof(float) * (size_t)V);
        static const int chunks[] = {256, 5};
        for (int i = 0; i < 2; i++) {
            if (run_prompt(mc, &r, chunks[i], lc) || run_prompt(mg, &r, chunks[i], lg)) {
                CHECK(0, "%s: forward failed (chunks of %d)", what, chunks[i]);
                continue;
            }
            double err = rel_err(lg, lc, V);
            CHECK(err <= LOGIT_TOL, "%s: prompt logits in chunks of %d: relative error %.3e vs the CPU", what,
                  chunks[i], err);
            printf("  %s: last-position logits (chunks of %d), relative error %.2e vs the CPU\n", what, chunks[i],
                   err);
        }
        free(lc), free(lg);

        size_t nc = 0, ng = 0;
        int32_t *tc = greedy(mc, &r, &nc), *tg = greedy(mg, &r, &ng);
        CHECK(tc && tg, "%s: generate_run failed (cpu %s, cuda %s)", what, tc ? "ok" : "failed", tg ? "ok" : "failed");
        if (tc && tg) {
            CHECK(nc == N_GREEDY && ng == N_GREEDY, "%s: %zu (cpu) and %zu (cuda) tokens, want %d", what, nc, ng,
                  N_GREEDY);
            size_t n = nc < ng ? nc : ng;
            for (size_t i = 0; i < n; i++)
                if (tc[i] != tg[i]) {
                    CHECK(0, "%s: greedy token %zu is %d on cuda, %d on cpu", what, i, tg[i], tc[i]);
                    break;
                }
        }
        free(tc), free(tg);
    }
    model_free(mg);
    model_free(mc);
    backend_destroy(gpu);
    ref_free(&r);
}

static void test_device(void) {
    char buf[256] = "";
    int n = cuda_device_count();
    cuda_device_describe(0, buf, sizeof buf);
    REQUIRE(n > 0, "no CUDA device (cuda_device_count() = %d; %s): these tests need a GPU", n, buf);
    printf("  %s\n", buf);
}

static void test_llama(void) { check_model("llama", "block_wise_fp8"); }
static void test_mistral(void) { check_model("mistral", "block_wise_fp8"); }
static void test_qwen2(void) { check_model("qwen2", "block_wise_fp8"); }
static void test_qwen3(void) { check_model("qwen3", "block_wise_fp8"); }
static void test_ernie(void) { check_model("ernie", "block_wise_fp8"); }
static void test_hf_checkpoint(void) { check_model("llama-fp8", NULL); }

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    log_set_level(LOG_WARN); /* not a "loaded ..." line per model; cuda_fp8's fallback warnings stay */
    RUN(test_device);
    if (t_failed) TEST_DONE("test_cuda_fp8_model");
    nb_err e = {{0}};
    cpu = cpu_backend_create(0, &e);
    if (!cpu) {
        fprintf(stderr, "cpu backend: %s\n", e.msg);
        return 1;
    }
    RUN(test_llama);
    RUN(test_mistral);
    RUN(test_qwen2);
    RUN(test_qwen3);
    RUN(test_ernie);
    RUN(test_hf_checkpoint);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_fp8_model");
}
