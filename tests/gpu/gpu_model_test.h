/* Shared by the end-to-end GPU model tests (tests/gpu/test_cuda_model.c,
 * test_cuda_wint_model.c, test_cuda_fp8_model.c): loading a model on both
 * backends, running a prompt in chunks, and comparing the last position's
 * logits and the greedy tokens of the CUDA model against the CPU's, for
 * plain and quantized models. */
#ifndef NB_GPU_MODEL_TEST_H
#define NB_GPU_MODEL_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/generate.h"
#include "engine/model/model.h"
#include "tests/fixture_ref.h"
#include "tests/gpu/gpu_start.h"
#include "tests/test.h"

/* GPU logits against CPU logits: the GPU's prefill GEMMs (and attention)
 * read activations as BF16 (F16 for F16 weights), which moves logits by
 * ~1e-3 of the largest. */
#define LOGIT_TOL 2e-2
/* A mixture of experts sends each token to the experts with the highest
 * router scores, and some tokens of the random fixtures have two experts
 * within 1e-2 of each other: the GPU's BF16 products move the router's
 * input enough to pick the other one (ernie-moe, a 16-token prefix: 2 of
 * 16 tokens routed otherwise, their router logits 1e-2 from the CPU's),
 * which moves those positions' logits by up to 3.3e-2. */
#define MOE_LOGIT_TOL 5e-2

/* Greedy tokens generated and compared. Fixed, not the reference's count:
 * llama-fp8's reference.json has no greedy tokens (nor logits). */
#define N_GREEDY 32

/* max |a - b| / max |b|; NaN in a gives NaN */
static inline double rel_err(const float *a, const float *b, int n) { return rel_max(a, b, (size_t)n); }

/* A fresh CUDA backend: a recorded step points at the buffers of the model
 * that recorded it, so each model gets its own. */
static inline nb_backend *gpu_backend(void) {
    nb_err e = {{0}};
    nb_backend_opts o = {.device = "cuda"};
    nb_backend *b = backend_create(&o, &e);
    if (!b) fprintf(stderr, "  cuda backend: %s\n", e.msg);
    return b;
}

static inline nb_model *load_dir(nb_backend *be, const char *dir, const nb_quant_plan *plan) {
    nb_err e = {{0}};
    nb_model_opts o = {.max_batch_tokens = 256, .num_kv_blocks = 64, .quant = plan};
    nb_model *m = model_load(dir, be, &o, &e);
    if (!m) fprintf(stderr, "  load %s on %s: %s\n", dir, be->ops->name, e.msg);
    return m;
}

/* A committed fixture by name. */
static inline nb_model *load(nb_backend *be, const char *name, const nb_quant_plan *plan) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", name);
    return load_dir(be, dir, plan);
}

/* The prompt as one sequence whose blocks are laid out backwards (every
 * other block from the cache's last), in steps of at most `chunk` tokens;
 * the last position's logits. -1 for an empty prompt or one the layout
 * does not fit in the cache. */
static inline int run_prompt(nb_model *m, const ref *r, int chunk, float *logits) {
    int nb = (r->n_prompt + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE, total = model_num_kv_blocks(m);
    if (r->n_prompt <= 0 || chunk <= 0 || 2 * nb - 1 > total) {
        fprintf(stderr, "  run_prompt: a prompt of %d tokens in chunks of %d does not fit %d KV blocks\n", r->n_prompt,
                chunk, total);
        return -1;
    }
    int32_t *table = xmalloc(sizeof(int32_t) * (size_t)nb);
    for (int i = 0; i < nb; i++) table[i] = total - 1 - 2 * i;
    int32_t pos[256], slot[256], seq[256];
    int rc = 0;
    for (int start = 0; start < r->n_prompt && rc == 0; start += chunk) {
        int n = r->n_prompt - start < chunk ? r->n_prompt - start : chunk;
        for (int t = 0; t < n; t++) {
            int p = start + t;
            pos[t] = p, seq[t] = 0;
            slot[t] = table[p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
        }
        nb_batch b = {n, pos, seq, slot, 1, nb, table};
        int32_t last = n - 1;
        nb_err e = {{0}};
        int want = start + n == r->n_prompt;
        rc = model_forward(m, r->prompt + start, &b, &last, want, logits, &e);
        if (rc) fprintf(stderr, "  forward: %s\n", e.msg);
    }
    free(table);
    return rc;
}

/* The prompt's last-position logits on both models within tol, the prompt
 * in steps of each of the n chunk sizes; prints each size's error (and, for
 * the first, the CUDA model's against transformers where the reference has
 * logits of this vocabulary). */
static inline void check_logits(nb_model *mc, nb_model *mg, const ref *r, const char *what, const int *chunks, int n,
                                double tol) {
    int V = model_config(mc)->vocab_size;
    float *lc = xmalloc(sizeof(float) * (size_t)V), *lg = xmalloc(sizeof(float) * (size_t)V);
    for (int i = 0; i < n; i++) {
        if (run_prompt(mc, r, chunks[i], lc) || run_prompt(mg, r, chunks[i], lg)) {
            CHECK(0, "%s: forward failed (chunks of %d)", what, chunks[i]);
            continue;
        }
        double err = rel_err(lg, lc, V);
        CHECK(err <= tol, "%s: prompt logits in chunks of %d: relative error %.3e vs the CPU (limit %.3g)", what,
              chunks[i], err, tol);
        if (i == 0 && V == r->n_logits)
            printf("  %s: last-position logits (chunks of %d), relative error %.2e vs the CPU, %.2e vs transformers\n",
                   what, chunks[i], err, rel_err(lg, r->logits, V));
        else
            printf("  %s: last-position logits (chunks of %d), relative error %.2e vs the CPU\n", what, chunks[i], err);
    }
    free(lc), free(lg);
}

static inline int32_t *greedy(nb_model *m, const ref *r, size_t *n) {
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

/* Index of the first difference, or -1. */
static inline int first_diff(const int32_t *a, const int32_t *b, int n) {
    for (int i = 0; i < n; i++)
        if (a[i] != b[i]) return i;
    return -1;
}

/* N_GREEDY greedy tokens from generate_run (decode steps recorded and
 * replayed, sampling on the device) on both backends: identical when
 * `exact` (else the length of the common prefix is printed) and, when
 * vs_transformers, equal to transformers' tokens (reference.json must have
 * at least N_GREEDY). */
static inline void check_greedy(nb_model *mc, nb_model *mg, const ref *r, const char *what, int exact,
                                int vs_transformers) {
    size_t nc = 0, ng = 0;
    int32_t *tc = greedy(mc, r, &nc), *tg = greedy(mg, r, &ng);
    CHECK(tc && tg, "%s: generate_run failed (cpu %s, cuda %s)", what, tc ? "ok" : "failed", tg ? "ok" : "failed");
    if (tc && tg) {
        CHECK(nc == N_GREEDY && ng == N_GREEDY, "%s: %zu (cpu) and %zu (cuda) greedy tokens, want %d", what, nc, ng,
              N_GREEDY);
        int n = (int)(nc < ng ? nc : ng);
        if (n > N_GREEDY) n = N_GREEDY;
        int d = first_diff(tg, tc, n);
        if (exact)
            CHECK(d < 0, "%s: greedy token %d is %d on cuda, %d on cpu", what, d, d >= 0 ? tg[d] : 0,
                  d >= 0 ? tc[d] : 0);
        else
            printf("  %s: %d of %d greedy tokens as on the CPU before the first difference\n", what, d < 0 ? n : d, n);
        if (vs_transformers) {
            CHECK(r->n_greedy >= N_GREEDY, "%s: reference.json has %d greedy tokens, want %d", what, r->n_greedy,
                  N_GREEDY);
            if (n > r->n_greedy) n = r->n_greedy;
            d = first_diff(tg, r->greedy, n);
            CHECK(d < 0, "%s: greedy token %d is %d on cuda, transformers gives %d", what, d, d >= 0 ? tg[d] : 0,
                  d >= 0 ? r->greedy[d] : 0);
        }
    }
    free(tc), free(tg);
}

/* How far the CPU's own logits move when only its KV cache changes from
 * BF16 to FP32: the noise that the GPU's BF16 tensor-core attention adds
 * too. Formats that quantize activations (block_wise_fp8: 1/16 steps)
 * amplify such noise: a value near a code boundary takes the other code.
 * Measured on the fixtures: 3-6e-2 for block_wise_fp8, 1-2e-3 for BF16 and
 * WINT8. */
static inline double cpu_kv_noise(const char *dir, const char *setting, const ref *r) {
    nb_quant_plan p16, p32;
    nb_err e = {{0}};
    if (quant_plan_parse(setting, "bf16", &p16, &e) || quant_plan_parse(setting, "float32", &p32, &e)) return -1;
    nb_model *a = load_dir(cpu, dir, &p16), *b = load_dir(cpu, dir, &p32);
    double noise = -1;
    if (a && b) {
        int V = model_config(a)->vocab_size;
        float *la = xmalloc(sizeof(float) * (size_t)V), *lb = xmalloc(sizeof(float) * (size_t)V);
        if (!run_prompt(a, r, 256, la) && !run_prompt(b, r, 256, lb)) noise = rel_err(la, lb, V);
        free(la), free(lb);
    }
    model_free(a), model_free(b);
    return noise;
}

/* One fixture (or a checkpoint made from it, in dir) under the plan of
 * `setting` (NULL: the checkpoint's own), on both backends with a BF16 KV
 * cache: check_logits over `chunks`, then check_greedy. `want` is the
 * packed format the linears must get, so that a plan that silently left
 * them BF16 cannot pass. For NB_FP8_B128, which quantizes activations, the
 * logits may differ by 3x the CPU's own KV noise (cpu_kv_noise) and
 * greedy tokens are compared but not required equal: on these random
 * fixtures, whose top logits are close, one flipped activation code in
 * the prompt changes the continuation (test_cuda_fp8.c holds the kernels
 * to the CPU's exact codes and products instead). */
static inline void check_quant_model(const char *fixture, const char *dir, const char *setting, const char *label,
                                     nb_dtype want, const int *chunks, int n_chunks) {
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
    nb_backend *gpu = gpu_backend();
    if (!gpu) {
        CHECK(0, "%s: no cuda backend", what);
        ref_free(&r);
        return;
    }
    nb_model *mc = load_dir(cpu, dir, &plan), *mg = load_dir(gpu, dir, &plan);
    CHECK(mc && mg, "%s: model did not load (cpu %s, cuda %s)", what, mc ? "ok" : "failed", mg ? "ok" : "failed");
    if (mc && mg) {
        /* The same weights quantized on both; the CUDA backend's weight_pack
         * moves WINT8/WINT4 into its tensor-core layout (rows padded to 64,
         * group scales as BF16), so its resident bytes only come close. */
        size_t bg = model_weight_bytes(mg, want), bc = model_weight_bytes(mc, want);
        int same = (want != NB_WINT8 && want != NB_WINT4) ? bg == bc : 2 * bg >= bc && bg <= 2 * bc;
        CHECK(model_quant_plan(mg)->dense == want && model_quant_plan(mc)->dense == want && bg > 0 && same,
              "%s: cuda model holds %zu bytes of %s (cpu %zu), dense format %s (cuda), %s (cpu)", what,
              model_weight_bytes(mg, want), nb_dtype_name(want), model_weight_bytes(mc, want),
              nb_dtype_name(model_quant_plan(mg)->dense), nb_dtype_name(model_quant_plan(mc)->dense));
        CHECK(model_quant_plan(mg)->kv == NB_KV_BF16 && model_quant_plan(mc)->kv == NB_KV_BF16,
              "%s: KV cache %s (cuda), %s (cpu), want bf16", what, nb_kv_dtype_name(model_quant_plan(mg)->kv),
              nb_kv_dtype_name(model_quant_plan(mc)->kv));
        double tol = model_config(mc)->moe.n_experts ? MOE_LOGIT_TOL : LOGIT_TOL;
        if (want == NB_FP8_B128) {
            double noise = cpu_kv_noise(dir, setting, &r);
            CHECK(noise >= 0, "%s: the CPU's KV-noise runs failed", what);
            if (3 * noise > tol) tol = 3 * noise;
            printf("  %s: logits limit %.3g (the CPU's own BF16-vs-FP32 KV noise %.3g)\n", what, tol, noise);
        }
        check_logits(mc, mg, &r, what, chunks, n_chunks, tol);
        check_greedy(mc, mg, &r, what, want != NB_FP8_B128, 0);
    }
    model_free(mg);
    model_free(mc);
    backend_destroy(gpu);
    ref_free(&r);
}

static inline void test_device(void) { gpu_require_device(); }

/* Start-up of a model test binary: the device, then the CPU backend.
 * Returns 0 when both are there. */
static inline int gpu_model_tests_start(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    log_set_level(LOG_WARN); /* not a "loaded ..." line per model; kernel fallback warnings stay */
    RUN(test_device);
    if (t_failed) return -1;
    return gpu_start_cpu();
}

#endif
