/* Weight-only quantized models end to end on the CUDA backend against the
 * CPU backend (`make test-gpu`; `make test` only builds this): wint8 and
 * wint4 quantized at load, mix_quant with dense wint4, and wint2 from an
 * offline checkpoint written into build/tests/ by the quantize API (round
 * to nearest), on the committed fixtures. Each model loads once on the CPU
 * backend and once on a fresh CUDA backend with the same plan and a BF16 KV
 * cache, so both hold the same packed bytes; then
 *  - the prompt's last-position logits within 2e-2 (max |diff| / max
 *    |logit|, as tests/gpu/test_cuda_model.c) of the CPU's: in one step
 *    (the tensor-core kernel, BF16 activations), in chunks of 5 and one
 *    token at a time (the GEMV kernel; one-token steps recorded once as a
 *    CUDA graph and replayed);
 *  - 32 greedy tokens from generate_run identical on both backends.
 * Greedy identity is not guaranteed by construction: the GPU's prefill
 * rounds activations and dequantized weights to BF16, which moves logits
 * by ~1e-3 of the largest, and these random-weight fixtures have near-flat
 * logits (min_margin in reference.json). It is still required, as the
 * issue asks; a failure names the first differing step.
 * wint2 needs input widths in multiples of 64, so it runs on llama, qwen2
 * and qwen3 (ernie's and mistral's MLPs are 160 wide). Needs a CUDA device;
 * fails (not skips) without one. */
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/generate.h"
#include "engine/model/model.h"
#include "engine/quantize.h"
#include "tests/fixture_ref.h"
#include "tests/test.h"

#define LOGIT_TOL 2e-2

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

static nb_model *load(nb_backend *be, const char *dir, const nb_quant_plan *plan) {
    nb_err e = {{0}};
    nb_model_opts o = {.max_batch_tokens = 256, .num_kv_blocks = 64, .quant = plan};
    nb_model *m = model_load(dir, be, &o, &e);
    if (!m) fprintf(stderr, "  load %s on %s: %s\n", dir, be->ops->name, e.msg);
    return m;
}

/* The prompt as one sequence in steps of at most `chunk` tokens; the last
 * position's logits. */
static int run_prompt(nb_model *m, const ref *r, int chunk, float *logits) {
    int nb = (r->n_prompt + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    int32_t *table = xmalloc(sizeof(int32_t) * (size_t)nb);
    for (int i = 0; i < nb; i++) table[i] = i;
    int32_t pos[256], slot[256], seq[256];
    int rc = 0;
    for (int start = 0; start < r->n_prompt && rc == 0; start += chunk) {
        int n = r->n_prompt - start < chunk ? r->n_prompt - start : chunk;
        for (int t = 0; t < n; t++) pos[t] = slot[t] = start + t, seq[t] = 0;
        nb_batch b = {n, pos, seq, slot, 1, nb, table};
        int32_t last = n - 1;
        nb_err e = {{0}};
        rc = model_forward(m, r->prompt + start, &b, &last, start + n == r->n_prompt, logits, &e);
        if (rc) fprintf(stderr, "  forward: %s\n", e.msg);
    }
    free(table);
    return rc;
}

static int32_t *greedy(nb_model *m, const ref *r, size_t *n) {
    nb_gen_opts go = {.max_tokens = 32, .ignore_eos = 1};
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

static void compare(nb_model *mc, nb_model *mg, const ref *r, const char *what) {
    int V = model_config(mc)->vocab_size;
    float *lc = xmalloc(sizeof(float) * (size_t)V), *lg = xmalloc(sizeof(float) * (size_t)V);
    static const int chunks[] = {256, 5, 1};
    for (int i = 0; i < 3; i++) {
        if (run_prompt(mc, r, chunks[i], lc) || run_prompt(mg, r, chunks[i], lg)) {
            CHECK(0, "%s: forward failed (chunks of %d)", what, chunks[i]);
            continue;
        }
        double err = rel_err(lg, lc, V);
        CHECK(err <= LOGIT_TOL, "%s: prompt logits in chunks of %d: relative error %.3e vs the CPU", what, chunks[i],
              err);
        if (i == 0) printf("  %-28s last-position logits: relative error %.2e vs the CPU\n", what, err);
    }
    free(lc), free(lg);
    size_t nc = 0, ng = 0;
    int32_t *tc = greedy(mc, r, &nc), *tg = greedy(mg, r, &ng);
    CHECK(tc && tg, "%s: generate_run failed (cpu %s, cuda %s)", what, tc ? "ok" : "failed", tg ? "ok" : "failed");
    if (tc && tg) {
        CHECK(nc == 32 && ng == 32, "%s: %zu (cpu) and %zu (cuda) greedy tokens, want 32", what, nc, ng);
        size_t n = nc < ng ? nc : ng;
        for (size_t i = 0; i < n; i++)
            if (tc[i] != tg[i]) {
                CHECK(0, "%s: greedy token %zu is %d on cuda, %d on cpu", what, i, tg[i], tc[i]);
                break;
            }
    }
    free(tc), free(tg);
}

/* One fixture (or a checkpoint made from it, in dir) under the plan of
 * `setting` (NULL: the checkpoint's own), on both backends. `want` is the
 * packed format the linears must get, so that a plan that silently left
 * them BF16 cannot pass. */
static void check_model(const char *fixture, const char *dir, const char *setting, const char *label, nb_dtype want) {
    char what[96];
    snprintf(what, sizeof what, "%s %s", fixture, label);
    ref r;
    if (ref_load(fixture, &r)) {
        CHECK(0, "%s: reference.json unreadable", fixture);
        return;
    }
    nb_quant_plan plan;
    nb_err e = {{0}};
    if (quant_plan_parse(setting, "bf16", &plan, &e)) {
        CHECK(0, "%s: %s", what, e.msg);
        ref_free(&r);
        return;
    }
    nb_backend_opts o = {.device = "cuda"};
    nb_backend *gpu = backend_create(&o, &e);
    if (!gpu) {
        CHECK(0, "%s: cuda backend: %s", what, e.msg);
        ref_free(&r);
        return;
    }
    nb_model *mc = load(cpu, dir, &plan), *mg = load(gpu, dir, &plan);
    CHECK(mc && mg, "%s: model did not load (cpu %s, cuda %s)", what, mc ? "ok" : "failed", mg ? "ok" : "failed");
    if (mc && mg) {
        CHECK(model_quant_plan(mg)->dense == want && model_weight_bytes(mg, want) > 0 &&
                  model_weight_bytes(mg, want) == model_weight_bytes(mc, want),
              "%s: cuda model holds %zu bytes of %s (cpu %zu), dense format %s", what, model_weight_bytes(mg, want),
              nb_dtype_name(want), model_weight_bytes(mc, want), nb_dtype_name(model_quant_plan(mg)->dense));
        CHECK(model_quant_plan(mg)->kv == NB_KV_BF16 && model_quant_plan(mc)->kv == NB_KV_BF16,
              "%s: KV cache %s (cuda), %s (cpu), want bf16", what, nb_kv_dtype_name(model_quant_plan(mg)->kv),
              nb_kv_dtype_name(model_quant_plan(mc)->kv));
        compare(mc, mg, &r, what);
    }
    model_free(mg);
    model_free(mc);
    backend_destroy(gpu);
    ref_free(&r);
}

static const char *FIXTURES[] = {"llama", "mistral", "qwen2", "qwen3", "ernie"};
#define N_FIXTURES ((int)(sizeof FIXTURES / sizeof FIXTURES[0]))

static void online(const char *setting, const char *label, nb_dtype want) {
    for (int i = 0; i < N_FIXTURES; i++) {
        char dir[256];
        snprintf(dir, sizeof dir, "tests/fixtures/models/%s", FIXTURES[i]);
        check_model(FIXTURES[i], dir, setting, label, want);
    }
}

static void test_wint8(void) { online("wint8", "wint8", NB_WINT8); }
static void test_wint4(void) { online("wint4", "wint4", NB_WINT4); }
static void test_mix_quant(void) {
    online("{\"quantization\": \"mix_quant\", \"dense_quant_type\": \"wint4\"}", "mix_quant wint4", NB_WINT4);
}

static void test_wint2(void) {
    static const char *fixtures[] = {"llama", "qwen2", "qwen3"};
    for (int i = 0; i < 3; i++) {
        char in[256], out[256];
        snprintf(in, sizeof in, "tests/fixtures/models/%s", fixtures[i]);
        snprintf(out, sizeof out, "build/tests/gpu_wint2_%s", fixtures[i]);
        nb_quant_plan p;
        nb_err e = {{0}};
        if (quant_plan_parse("wint2", NULL, &p, &e)) {
            CHECK(0, "wint2 plan: %s", e.msg);
            return;
        }
        /* round to nearest: quick, and the packed layout is the same as
         * GPTQ's */
        nb_quantize_opts qo = {.in = in, .out = out, .plan = &p, .rtn = 1, .threads = 4};
        if (quantize_model(&qo, &e)) {
            CHECK(0, "quantize %s to wint2: %s", fixtures[i], e.msg);
            continue;
        }
        /* the checkpoint's quantization_config gives the plan */
        check_model(fixtures[i], out, NULL, "offline wint2", NB_WINT2);
    }
}

static void test_device(void) {
    char buf[256] = "";
    int n = cuda_device_count();
    cuda_device_describe(0, buf, sizeof buf);
    REQUIRE(n > 0, "no CUDA device (cuda_device_count() = %d; %s): these tests need a GPU", n, buf);
    printf("  %s\n", buf);
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    log_set_level(LOG_WARN); /* not a "loaded ..." line per model */
    RUN(test_device);
    if (t_failed) TEST_DONE("test_cuda_wint_model");
    nb_err e = {{0}};
    cpu = cpu_backend_create(0, &e);
    if (!cpu) {
        fprintf(stderr, "cpu backend: %s\n", e.msg);
        return 1;
    }
    RUN(test_wint8);
    RUN(test_wint4);
    RUN(test_mix_quant);
    RUN(test_wint2);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_wint_model");
}
