/* Continuous batching: many greedy requests sharing steps return exactly
 * what each returns alone, also when a small KV pool forces preemption and
 * on a model split over 2 CPU ranks; aborting frees blocks at once; bad
 * requests are refused. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "engine/engine.h"
#include "test.h"

#define N_REQ 12

static nb_backend *be;
static int32_t base[256];
static int n_base;

static int load_prompt(void) {
    nb_err e;
    char *text = util_read_file("tests/fixtures/models/qwen2/reference.json", NULL, &e);
    cJSON *j = text ? cJSON_Parse(text) : NULL;
    free(text);
    if (!j) return -1;
    cJSON *p = cJSON_GetObjectItem(j, "prompt_ids");
    n_base = cJSON_GetArraySize(p);
    for (int i = 0; i < n_base && i < 256; i++) base[i] = cJSON_GetArrayItem(p, i)->valueint;
    cJSON_Delete(j);
    return 0;
}

/* Request r: a rotated slice of the fixture prompt, its own length. */
static int make_prompt(int r, int32_t *out) {
    int len = 3 + (r * 7) % (n_base - 3);
    for (int i = 0; i < len; i++) out[i] = base[(i + r * 5) % n_base];
    return len;
}

static nb_gen_opts greedy(int r) {
    nb_gen_opts o = {.max_tokens = 5 + (r * 3) % 20, .ignore_eos = 1};
    sampling_params_default(&o.sampling);
    o.sampling.temperature = 0;
    return o;
}

static nb_model *load_on(nb_backend *b, int blocks) {
    nb_err e;
    nb_model_opts mo = {.max_batch_tokens = 48, .num_kv_blocks = blocks};
    nb_model *m = model_load("tests/fixtures/models/qwen2", b, &mo, &e);
    if (!m) fprintf(stderr, "  load: %s\n", e.msg);
    return m;
}

static nb_model *load(int blocks) { return load_on(be, blocks); }

static int32_t solo[N_REQ][64];
static size_t solo_n[N_REQ];

static void run_batched(nb_backend *b, int blocks, int expect_preemption) {
    nb_model *m = load_on(b, blocks);
    REQUIRE(m, "model");
    nb_err e;
    for (int r = 0; r < N_REQ; r++) {
        int32_t p[256];
        int n = make_prompt(r, p);
        nb_gen_opts o = greedy(r);
        int32_t *out;
        REQUIRE(generate_run(m, p, (size_t)n, &o, NULL, NULL, &out, &solo_n[r], NULL, &e) == 0, "solo: %s", e.msg);
        memcpy(solo[r], out, sizeof(int32_t) * solo_n[r]);
        free(out);
    }
    nb_engine_opts eo = {.max_num_seqs = 8};
    nb_engine *g = engine_create(m, &eo, &e);
    REQUIRE(g, "%s", e.msg);
    for (int r = 0; r < N_REQ; r++) {
        int32_t p[256];
        int n = make_prompt(r, p);
        nb_gen_opts o = greedy(r);
        CHECK(engine_add(g, 100 + (uint64_t)r, p, (size_t)n, &o, &e) == 0, "add %d: %s", r, e.msg);
    }
    int live = N_REQ, steps = 0;
    while (live > 0 && steps < 5000) {
        live = engine_step(g, &e);
        steps++;
        CHECK(live >= 0, "step: %s", live < 0 ? e.msg : "");
        if (live < 0) break;
    }
    CHECK(live == 0, "requests left after %d steps", steps);
    for (int r = 0; r < N_REQ; r++) {
        size_t n;
        nb_finish fin;
        const int32_t *out = engine_output(g, 100 + (uint64_t)r, &n, &fin);
        CHECK(out && fin == FINISH_LENGTH && n == solo_n[r] && !memcmp(out, solo[r], sizeof(int32_t) * n),
              "request %d: batched output differs from solo (%zu vs %zu tokens)", r, out ? n : 0, solo_n[r]);
        engine_release(g, 100 + (uint64_t)r);
    }
    nb_engine_stats st;
    engine_stats(g, &st);
    printf("  %d KV blocks: %llu steps, %llu preemptions\n", blocks, (unsigned long long)st.steps,
           (unsigned long long)st.preemptions);
    CHECK(st.kv_blocks_used == 0, "%d blocks still used", st.kv_blocks_used);
    CHECK(st.steps < 400, "batching should need far fewer steps than solo runs (%llu)", (unsigned long long)st.steps);
    if (expect_preemption) CHECK(st.preemptions > 0, "a small pool must preempt");
    engine_free(g);
    model_free(m);
}

static void test_batched_equals_solo(void) { run_batched(be, 64, 0); }
static void test_preemption_equals_solo(void) { run_batched(be, 8, 1); }

/* The same on 2 CPU ranks, whose solo runs also equal the single rank's. */
static void test_tensor_parallel(void) {
    int32_t one[N_REQ][64];
    size_t one_n[N_REQ];
    memcpy(one, solo, sizeof one);
    memcpy(one_n, solo_n, sizeof one_n);
    nb_err e;
    nb_backend_opts bo = {.device = "cpu", .threads = 2, .tensor_parallel = 2};
    nb_backend *group = backend_create(&bo, &e);
    REQUIRE(group, "%s", e.msg);
    run_batched(group, 8, 1);
    for (int r = 0; r < N_REQ; r++)
        CHECK(solo_n[r] == one_n[r] && !memcmp(solo[r], one[r], sizeof(int32_t) * one_n[r]),
              "request %d: 2 ranks give other tokens than one", r);
    backend_destroy(group);
}

static void test_abort_and_errors(void) {
    nb_model *m = load(64);
    REQUIRE(m, "model");
    nb_err e;
    nb_engine *g = engine_create(m, NULL, &e);
    REQUIRE(g, "%s", e.msg);
    int32_t p[256];
    int n = make_prompt(1, p);
    nb_gen_opts o = greedy(1);
    o.max_tokens = 40;
    REQUIRE(engine_add(g, 1, p, (size_t)n, &o, &e) == 0, "%s", e.msg);
    REQUIRE(engine_add(g, 2, p, (size_t)n, &o, &e) == 0, "%s", e.msg);
    CHECK(engine_add(g, 2, p, (size_t)n, &o, &e) != 0 && strstr(e.msg, "exists"), "duplicate id");
    for (int i = 0; i < 3; i++) engine_step(g, &e);
    nb_engine_stats before, after;
    engine_stats(g, &before);
    engine_abort(g, 1);
    engine_stats(g, &after);
    CHECK(after.kv_blocks_used < before.kv_blocks_used, "abort frees blocks (%d -> %d)", before.kv_blocks_used,
          after.kv_blocks_used);
    size_t k;
    nb_finish fin;
    engine_output(g, 1, &k, &fin);
    CHECK(fin == FINISH_ABORT, "aborted request reports abort");
    while (engine_step(g, &e) > 0) {}
    engine_output(g, 2, &k, &fin);
    CHECK(fin == FINISH_LENGTH && k == 40, "the other request completes (%zu tokens)", k);
    int32_t bad = 1 << 30;
    CHECK(engine_add(g, 3, &bad, 1, &o, &e) != 0 && strstr(e.msg, "out of range"), "bad token id");
    o.max_tokens = 5000;
    CHECK(engine_add(g, 4, p, (size_t)n, &o, &e) != 0 && strstr(e.msg, "context"), "too long");
    o.max_tokens = 10;
    CHECK(engine_add(g, 5, p, 0, &o, &e) != 0, "empty prompt");
    engine_free(g);
    model_free(m);
}

/* A second request with the same prompt reuses the first one's full KV
 * blocks (the last token is always recomputed) and generates the same. */
static void test_prefix_cache(void) {
    nb_model *m = load(64);
    REQUIRE(m, "model");
    nb_err e;
    nb_engine *g = engine_create(m, NULL, &e);
    REQUIRE(g, "%s", e.msg);
    REQUIRE(n_base >= 33, "prompt of %d tokens", n_base);
    nb_gen_opts o = greedy(3);
    int32_t alt[256];
    memcpy(alt, base, sizeof(int32_t) * (size_t)n_base);
    alt[n_base - 1] = (alt[n_base - 1] + 1) % 1000; /* same first full blocks, other last token */
    const int32_t *prompts[3] = {base, base, alt};
    int32_t first[64];
    size_t n_first = 0;
    uint64_t hits[3];
    for (int r = 0; r < 3; r++) {
        REQUIRE(engine_add(g, 10 + (uint64_t)r, prompts[r], (size_t)n_base, &o, &e) == 0, "%s", e.msg);
        while (engine_step(g, &e) > 0) {}
        size_t n;
        nb_finish fin;
        const int32_t *out = engine_output(g, 10 + (uint64_t)r, &n, &fin);
        if (r == 0) {
            memcpy(first, out, sizeof(int32_t) * n);
            n_first = n;
        } else if (r == 1) {
            CHECK(n == n_first && !memcmp(out, first, sizeof(int32_t) * n), "cached prefix changes the output");
        }
        engine_release(g, 10 + (uint64_t)r);
        nb_engine_stats st;
        engine_stats(g, &st);
        hits[r] = st.prefix_hit_tokens;
    }
    int full = (n_base - 1) / NB_KV_BLOCK_SIZE * NB_KV_BLOCK_SIZE;
    CHECK(hits[0] == 0, "first request hit the cache (%llu)", (unsigned long long)hits[0]);
    CHECK((int)(hits[1] - hits[0]) == full, "same prompt reused %llu tokens, want %d", (unsigned long long)(hits[1] - hits[0]), full);
    CHECK((int)(hits[2] - hits[1]) == full, "same leading blocks reused %llu tokens, want %d", (unsigned long long)(hits[2] - hits[1]), full);
    /* the alt prompt's output equals its solo run on a fresh model */
    size_t n_alt;
    nb_finish fin;
    REQUIRE(engine_add(g, 20, alt, (size_t)n_base, &o, &e) == 0, "%s", e.msg);
    while (engine_step(g, &e) > 0) {}
    const int32_t *cached = engine_output(g, 20, &n_alt, &fin);
    int32_t *solo_out;
    size_t n_solo;
    nb_model *m2 = load(64);
    REQUIRE(m2 && generate_run(m2, alt, (size_t)n_base, &o, NULL, NULL, &solo_out, &n_solo, NULL, &e) == 0, "solo");
    CHECK(n_solo == n_alt && !memcmp(solo_out, cached, sizeof(int32_t) * n_solo), "prefix-cached output differs from solo");
    free(solo_out);
    model_free(m2);
    engine_free(g);
    model_free(m);
}

int main(void) {
    nb_err e;
    be = cpu_backend_create(2, &e);
    if (!be || load_prompt()) {
        fprintf(stderr, "setup failed\n");
        return 1;
    }
    RUN(test_batched_equals_solo);
    RUN(test_preemption_equals_solo);
    RUN(test_tensor_parallel);
    RUN(test_abort_and_errors);
    RUN(test_prefix_cache);
    backend_destroy(be);
    TEST_DONE("test_engine");
}
