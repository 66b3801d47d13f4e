/* Model-vs-transformers tests on the committed fixtures: last-position
 * logits within 1e-3 (relative to the largest logit) of FP32 transformers,
 * 32 greedy tokens identical, the same through chunked prefill and inside a
 * multi-sequence batch; bad config.json and checkpoints give clear errors. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "engine/engine.h"
#include "engine/generate.h"
#include "engine/model/model.h"
#include "tests/fixture_ref.h"
#include "test.h"

static const char *FIXTURES[] = {"llama", "mistral", "qwen2", "qwen3", "ernie", "qwen3-moe", "mixtral", "ernie-moe"};
#define N_FIX (int)(sizeof FIXTURES / sizeof FIXTURES[0])

/* Runs the prompt as one sequence whose blocks are laid out backwards
 * (non-contiguous on purpose), in chunks of at most `chunk` tokens. */
static int run_prompt(nb_model *m, const ref *r, int chunk, float *logits) {
    int nb = (r->n_prompt + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE, total = model_num_kv_blocks(m);
    int32_t *table = xmalloc(sizeof(int32_t) * (size_t)nb);
    for (int i = 0; i < nb; i++) table[i] = total - 1 - 2 * i;
    int32_t pos[512], slot[512], seq[512];
    int rc = 0;
    for (int start = 0; start < r->n_prompt && rc == 0; start += chunk) {
        int n = r->n_prompt - start < chunk ? r->n_prompt - start : chunk;
        for (int t = 0; t < n; t++) {
            int p = start + t;
            pos[t] = p;
            seq[t] = 0;
            slot[t] = table[p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
        }
        nb_batch b = {n, pos, seq, slot, 1, nb, table};
        int32_t last = n - 1;
        nb_err e;
        int want = start + n == r->n_prompt;
        rc = model_forward(m, r->prompt + start, &b, &last, want, logits, &e);
        if (rc) fprintf(stderr, "  forward: %s\n", e.msg);
    }
    free(table);
    return rc;
}

static nb_model *load(nb_backend *be, const char *name, int max_tokens) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", name);
    nb_err e;
    nb_model_opts o = {.max_batch_tokens = max_tokens, .num_kv_blocks = 64};
    nb_model *m = model_load(dir, be, &o, &e);
    if (!m) fprintf(stderr, "  load: %s\n", e.msg);
    return m;
}

static nb_backend *be;

static void check_fixture(const char *name) {
    ref r;
    REQUIRE(ref_load(name, &r) == 0, "%s: reference.json unreadable", name);
    nb_model *m = load(be, name, 256);
    if (!m) {
        CHECK(0, "%s: model did not load", name);
        ref_free(&r);
        return;
    }
    const nb_model_config *c = model_config(m);
    CHECK(c->vocab_size == r.n_logits, "%s: vocab %d vs %d logits", name, c->vocab_size, r.n_logits);
    float *logits = xmalloc(sizeof(float) * (size_t)c->vocab_size);

    /* whole prompt in one step */
    if (run_prompt(m, &r, 256, logits) == 0) {
        double err = rel_max(logits, r.logits, (size_t)r.n_logits);
        printf("  %s: logits relative error %.2e\n", name, err);
        CHECK(err <= 1e-3, "%s: logits relative error %.3e > 1e-3", name, err);
    } else {
        CHECK(0, "%s: forward failed", name);
    }
    /* chunked prefill (chunks of 5) gives the same logits */
    if (run_prompt(m, &r, 5, logits) == 0) {
        double err = rel_max(logits, r.logits, (size_t)r.n_logits);
        CHECK(err <= 1e-3, "%s: chunked prefill relative error %.3e", name, err);
    }
    /* 32 greedy tokens */
    nb_gen_opts go = {.max_tokens = r.n_greedy, .ignore_eos = 1};
    sampling_params_default(&go.sampling);
    go.sampling.temperature = 0;
    int32_t *out = NULL;
    size_t n_out = 0;
    nb_err e;
    int rc = generate_run(m, r.prompt, (size_t)r.n_prompt, &go, NULL, NULL, &out, &n_out, NULL, &e);
    CHECK(rc == 0, "%s: generate: %s", name, e.msg);
    if (rc == 0) {
        CHECK(n_out == (size_t)r.n_greedy, "%s: %zu greedy tokens, want %d", name, n_out, r.n_greedy);
        for (size_t i = 0; i < n_out && i < (size_t)r.n_greedy; i++) {
            if (out[i] != r.greedy[i]) {
                CHECK(0, "%s: greedy token %zu is %d, transformers gives %d", name, i, out[i], r.greedy[i]);
                break;
            }
        }
    }
    free(out);
    free(logits);
    model_free(m);
    ref_free(&r);
}

static void test_llama(void) { check_fixture("llama"); }
static void test_mistral(void) { check_fixture("mistral"); }
static void test_qwen2(void) { check_fixture("qwen2"); }
static void test_qwen3(void) { check_fixture("qwen3"); }
static void test_ernie(void) { check_fixture("ernie"); }
static void test_qwen3_moe(void) { check_fixture("qwen3-moe"); }
static void test_mixtral(void) { check_fixture("mixtral"); }
static void test_ernie_moe(void) { check_fixture("ernie-moe"); }

/* Two sequences in one step: A runs its whole prompt while B (the first 9
 * tokens of the same prompt, in other blocks) runs alongside; A's logits must
 * not change and B's must equal a solo run of B, within solo_tol (0: bit for
 * bit; a mixture of experts then routes B's tokens with A's in the same
 * expert matmuls, and must still give B the same bytes). */
static void batched_sequences(const char *name, double solo_tol) {
    ref r;
    REQUIRE(ref_load(name, &r) == 0, "reference");
    nb_model *m = load(be, name, 256);
    REQUIRE(m, "load");
    int V = model_config(m)->vocab_size;
    int na = r.n_prompt, nbt = 9;
    REQUIRE(na + nbt <= 256 && na > nbt, "prompt length %d", na);
    int32_t tables[2][8] = {{10, 3, 7, 20, 21, 22, 23, 24}, {5, 30, 31, 32, 33, 34, 35, 36}};
    int32_t tok[512], pos[512], slot[512], seq[512];
    int n = 0;
    for (int s = 0; s < 2; s++) {
        int len = s == 0 ? na : nbt;
        for (int p = 0; p < len; p++, n++) {
            tok[n] = r.prompt[p];
            pos[n] = p;
            seq[n] = s;
            slot[n] = tables[s][p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
        }
    }
    nb_batch b = {n, pos, seq, slot, 2, 8, &tables[0][0]};
    int32_t rows[2] = {na - 1, n - 1};
    float *lg = xmalloc(sizeof(float) * 2 * (size_t)V), *solo = xmalloc(sizeof(float) * (size_t)V);
    nb_err e;
    int rc = model_forward(m, tok, &b, rows, 2, lg, &e);
    CHECK(rc == 0, "batched forward: %s", e.msg);
    double err = rel_max(lg, r.logits, (size_t)V);
    CHECK(err <= 1e-3, "sequence A in a batch: relative error %.3e", err);
    /* solo B, in yet other blocks */
    int32_t tb[1] = {40};
    nb_batch bb = {nbt, pos + na, seq, slot, 1, 1, tb};
    int32_t sl[16];
    for (int p = 0; p < nbt; p++) sl[p] = 40 * NB_KV_BLOCK_SIZE + p;
    bb.slot = sl;
    int32_t seq0[16] = {0};
    bb.seq_of = seq0;
    int32_t last = nbt - 1;
    rc = model_forward(m, r.prompt, &bb, &last, 1, solo, &e);
    CHECK(rc == 0, "solo forward: %s", e.msg);
    if (solo_tol > 0) {
        err = rel_max(lg + V, solo, (size_t)V);
        CHECK(err <= solo_tol, "%s: sequence B batched vs solo: relative error %.3e", name, err);
    } else {
        CHECK(!memcmp(lg + V, solo, sizeof(float) * (size_t)V), "%s: sequence B batched differs from solo (%.3e)",
              name, rel_max(lg + V, solo, (size_t)V));
    }
    free(lg);
    free(solo);
    model_free(m);
    ref_free(&r);
}

static void test_batched_sequences(void) { batched_sequences("qwen2", 1e-5); }
static void test_batched_moe(void) {
    batched_sequences("qwen3-moe", 0);
    batched_sequences("mixtral", 0);
    batched_sequences("ernie-moe", 0);
}

/* Padded decode steps: on a backend that records graphs the model pads a
 * decode step of n sequences to a few sizes (3 -> 4, 5 -> 8, 11 -> 16) with
 * tokens of their own in a spare KV block. The CPU backend's ops are exact
 * whatever the batch size, so a copy of its op table that claims to record
 * must give every real row the same logits, bit for bit, as the plain CPU
 * backend; and the padding must not touch the real sequences' blocks. A
 * mixture of experts pads too where its experts record (here: claimed),
 * its padding tokens routed like any other. */
static int always_recordable(nb_backend *b, const void *set, int n_tokens) { return 1; }

static void decode_padding(const char *name) {
    nb_backend_ops rec_ops = *be->ops;
    rec_ops.records_graphs = 1;
    rec_ops.experts_recordable = always_recordable;
    nb_backend rec = {.ops = &rec_ops, .impl = be->impl, .n_ranks = 1}; /* shares be's state; never destroyed itself */
    nb_model *mp = load(&rec, name, 64), *mu = load(be, name, 64);
    REQUIRE(mp && mu, "%s: load", name);
    int V = model_config(mu)->vocab_size;
    static const int sizes[] = {3, 5, 11, 16};
    enum { MAXN = 16, PROMPT = 5 };
    float *lp = xmalloc(sizeof(float) * MAXN * (size_t)V), *lu = xmalloc(sizeof(float) * MAXN * (size_t)V);
    nb_err e;
    for (int si = 0; si < 4; si++) {
        int n = sizes[si];
        /* n sequences, each a prompt of PROMPT tokens in block s (prefilled
         * one sequence at a time), then one decode step together */
        int32_t tok[MAXN], pos[MAXN], seq[MAXN], slot[MAXN], rows[MAXN], tables[MAXN][2];
        int ok = 1;
        for (int s = 0; s < n && ok; s++) {
            int32_t ptok[PROMPT], ppos[PROMPT], pseq[PROMPT] = {0}, pslot[PROMPT], table[2] = {s, 63}, last = PROMPT - 1;
            for (int p = 0; p < PROMPT; p++)
                ptok[p] = (int32_t)((s * 31 + p * 7 + 1) % V), ppos[p] = p, pslot[p] = s * NB_KV_BLOCK_SIZE + p;
            nb_batch pb = {PROMPT, ppos, pseq, pslot, 1, 2, table};
            ok = !model_forward(mp, ptok, &pb, &last, 1, lp, &e) && !model_forward(mu, ptok, &pb, &last, 1, lu, &e);
            tables[s][0] = s, tables[s][1] = 63;
        }
        REQUIRE(ok, "%s: prefill: %s", name, e.msg);
        for (int s = 0; s < n; s++)
            tok[s] = (int32_t)((s * 17 + 3) % V), pos[s] = PROMPT, seq[s] = s, rows[s] = s,
            slot[s] = s * NB_KV_BLOCK_SIZE + PROMPT;
        nb_batch b = {n, pos, seq, slot, n, 2, &tables[0][0]};
        ok = !model_forward(mp, tok, &b, rows, n, lp, &e) && !model_forward(mu, tok, &b, rows, n, lu, &e);
        CHECK(ok, "%s: decode of %d sequences: %s", name, n, e.msg);
        if (ok)
            CHECK(!memcmp(lp, lu, sizeof(float) * (size_t)n * V), "%s: decode of %d sequences: padded logits differ", name, n);
        /* a second step reads the first step's K/V: wrong slots would show */
        for (int s = 0; s < n; s++) pos[s]++, slot[s]++;
        ok = !model_forward(mp, tok, &b, rows, n, lp, &e) && !model_forward(mu, tok, &b, rows, n, lu, &e);
        CHECK(ok && !memcmp(lp, lu, sizeof(float) * (size_t)n * V), "%s: second decode step of %d sequences differs", name, n);
    }
    free(lp), free(lu);
    model_free(mp), model_free(mu);
}

static void test_decode_padding(void) {
    decode_padding("qwen2");
    decode_padding("qwen3-moe");
}

/* Out-of-range inputs to a forward step are errors, not crashes. */
static void test_forward_rejects_bad_batch(void) {
    nb_model *m = load(be, "qwen2", 16);
    REQUIRE(m, "load");
    int32_t tok[2] = {1, 999999}, pos[2] = {0, 1}, slot[2] = {0, 1}, seq[2] = {0, 0}, table[1] = {0};
    nb_batch b = {2, pos, seq, slot, 1, 1, table};
    int32_t last = 1;
    float lg[8];
    nb_err e;
    CHECK(model_forward(m, tok, &b, &last, 0, lg, &e) != 0 && strstr(e.msg, "token id"), "bad token id");
    tok[1] = 2;
    slot[1] = 1 << 30;
    CHECK(model_forward(m, tok, &b, &last, 0, lg, &e) != 0, "slot out of range");
    b.n_tokens = 17;
    CHECK(model_forward(m, tok, &b, &last, 0, lg, &e) != 0 && strstr(e.msg, "limit"), "too many tokens");
    model_free(m);
}

/* A model sized for fewer logit rows than tokens (a server's one row per
 * sequence) returns them all up to that limit and refuses more, clearly;
 * an engine that would need more rows than that is refused too. */
static void test_logit_rows_limit(void) {
    nb_err e;
    nb_model_opts o = {.max_batch_tokens = 16, .max_logit_rows = 2, .num_kv_blocks = 16};
    nb_model *m = model_load("tests/fixtures/models/qwen2", be, &o, &e);
    REQUIRE(m, "load: %s", e.msg);
    CHECK(model_max_logit_rows(m) == 2 && model_max_batch_tokens(m) == 16, "rows %d, tokens %d",
          model_max_logit_rows(m), model_max_batch_tokens(m));
    int V = model_config(m)->vocab_size;
    int32_t tok[3] = {1, 2, 3}, pos[3] = {0, 0, 0}, seq[3] = {0, 1, 2}, slot[3] = {0, 16, 32}, tables[3] = {0, 1, 2};
    int32_t rows[3] = {0, 1, 2};
    nb_batch b = {3, pos, seq, slot, 3, 1, tables};
    float *lg = xmalloc(sizeof(float) * 3 * (size_t)V);
    CHECK(model_forward(m, tok, &b, rows, 2, lg, &e) == 0, "2 rows: %s", e.msg);
    CHECK(model_forward(m, tok, &b, rows, 3, lg, &e) != 0 && strstr(e.msg, "logit rows (limit 2)"), "3 rows: %s",
          e.msg);
    nb_engine_opts eo = {.max_num_seqs = 4};
    nb_engine *g = engine_create(m, &eo, &e);
    CHECK(!g && strstr(e.msg, "max_num_seqs 4"), "engine with 4 sequences over 2 rows: %s", g ? "created" : e.msg);
    engine_free(g);
    free(lg);
    model_free(m);
}

static void test_config_errors(void) {
    static const struct {
        const char *json, *expect;
    } cases[] = {
        {"{", "not valid JSON"},
        {"[]", "JSON object"},
        {"{\"hidden_size\": 8}", "architectures"},
        {"{\"architectures\": [\"GPT2LMHeadModel\"]}", "unsupported architecture"},
        {"{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": 8, "
         "\"intermediate_size\": 16, \"num_hidden_layers\": 1}", "num_attention_heads"},
        {"{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": \"10\", \"hidden_size\": 8}", "vocab_size"},
        {"{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": 8, "
         "\"intermediate_size\": 16, \"num_hidden_layers\": 1, \"num_attention_heads\": 3, "
         "\"num_key_value_heads\": 2}", "multiple"},
        {"{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": 8, "
         "\"intermediate_size\": 16, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, "
         "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 2}}", "unsupported rope"},
        {"{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": 8, "
         "\"intermediate_size\": 16, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, "
         "\"tie_word_embeddings\": 1}", "tie_word_embeddings"},
        {"{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": 8, "
         "\"intermediate_size\": 16, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, "
         "\"rms_norm_eps\": -1}", "rms_norm_eps"},
        {"{\"architectures\": [\"LlamaForCausalLM\"], \"vocab_size\": 10, \"hidden_size\": 8, "
         "\"intermediate_size\": 16, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, "
         "\"eos_token_id\": [1, \"x\"]}", "eos_token_id"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        nb_model_config c;
        nb_err e = {{0}};
        int rc = config_parse(cases[i].json, "config.json", &c, &e);
        CHECK(rc != 0, "case %zu accepted", i);
        CHECK(rc != 0 && strstr(e.msg, cases[i].expect) && strstr(e.msg, "config.json"),
              "case %zu: message \"%s\" lacks \"%s\"", i, e.msg, cases[i].expect);
    }
}

/* A config that does not match the checkpoint names the tensor; a truncated
 * checkpoint is an error naming the file. */
static void test_checkpoint_errors(void) {
    char tmpl[] = "/tmp/nibble_model_XXXXXX";
    char *dir = mkdtemp(tmpl);
    REQUIRE(dir, "mkdtemp");
    nb_err e;
    size_t len;
    char *cfg = util_read_file("tests/fixtures/models/qwen2/config.json", NULL, &e);
    char *st = util_read_file("tests/fixtures/models/qwen2/model.safetensors", &len, &e);
    REQUIRE(cfg && st, "fixture files");
    char path[512];
    /* hidden_size 64 -> 96: every shape is wrong */
    char *hs = strstr(cfg, "\"hidden_size\": 64");
    REQUIRE(hs, "hidden_size in fixture config");
    memcpy(hs, "\"hidden_size\": 96", 17);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs(cfg, f);
    fclose(f);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    f = fopen(path, "w");
    fwrite(st, 1, len, f);
    fclose(f);
    nb_model *m = model_load(dir, be, NULL, &e);
    CHECK(!m && strstr(e.msg, "tensor '") && strstr(e.msg, "shape"), "shape mismatch: %s", m ? "loaded" : e.msg);
    model_free(m);
    memcpy(hs, "\"hidden_size\": 64", 17);
    snprintf(path, sizeof path, "%s/config.json", dir);
    f = fopen(path, "w");
    fputs(cfg, f);
    fclose(f);
    /* truncated checkpoint */
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    f = fopen(path, "w");
    fwrite(st, 1, len / 2, f);
    fclose(f);
    m = model_load(dir, be, NULL, &e);
    CHECK(!m && strstr(e.msg, "model.safetensors"), "truncated: %s", m ? "loaded" : e.msg);
    model_free(m);
    /* missing checkpoint */
    unlink(path);
    m = model_load(dir, be, NULL, &e);
    CHECK(!m, "missing checkpoint loaded");
    model_free(m);
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    m = model_load(dir, be, NULL, &e);
    CHECK(!m && strstr(e.msg, "config.json"), "missing config: %s", m ? "loaded" : e.msg);
    model_free(m);
    rmdir(dir);
    free(cfg);
    free(st);
}

int main(void) {
    nb_err e;
    be = cpu_backend_create(2, &e);
    if (!be) {
        fprintf(stderr, "backend: %s\n", e.msg);
        return 1;
    }
    (void)N_FIX;
    RUN(test_llama);
    RUN(test_mistral);
    RUN(test_qwen2);
    RUN(test_qwen3);
    RUN(test_ernie);
    RUN(test_qwen3_moe);
    RUN(test_mixtral);
    RUN(test_ernie_moe);
    RUN(test_batched_sequences);
    RUN(test_batched_moe);
    RUN(test_decode_padding);
    RUN(test_forward_rejects_bad_batch);
    RUN(test_logit_rows_limit);
    RUN(test_config_errors);
    RUN(test_checkpoint_errors);
    backend_destroy(be);
    TEST_DONE("test_model");
}
