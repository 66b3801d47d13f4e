/* Sampler tests: greedy and its limits, each filter against a full-sort
 * reference, draw statistics, the seeded generator, penalty arithmetic,
 * validation messages and logprobs. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampler.h"
#include "kernels/backend.h"
#include "tests/test.h"

#define DRAWS 20000

/* Deterministic test data, independent of the sampler's own generator. */
static uint32_t lcg_state = 12345;
static float rand_unit(void) {
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return (float)(lcg_state >> 8) / 16777216.0f;
}

static nb_sampling_params seeded(uint64_t seed) {
    nb_sampling_params p;
    sampling_params_default(&p);
    p.seed = seed;
    p.has_seed = 1;
    return p;
}

/* Draws n tokens with fresh copies of the same logits; counts[v] gets tallies. */
static void draw_counts(nb_sampler *s, const float *logits, int vocab, int n, int *counts) {
    float *row = malloc(sizeof(float) * (size_t)vocab);
    memset(counts, 0, sizeof(int) * (size_t)vocab);
    for (int i = 0; i < n; i++) {
        memcpy(row, logits, sizeof(float) * (size_t)vocab);
        int32_t t = sampler_sample(s, row);
        if (t >= 0 && t < vocab) counts[t]++;
    }
    free(row);
}

static const float *ref_keys;
static int ref_cmp(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (ref_keys[i] != ref_keys[j]) return ref_keys[i] > ref_keys[j] ? -1 : 1;
    return (i > j) - (i < j);
}

/* Reference distribution after temperature, top-k, top-p, min-p, computed in
 * double with a full sort, straight from the definitions. */
static void ref_probs(const float *logits, int V, const nb_sampling_params *p, double *out) {
    int *ord = malloc(sizeof(int) * (size_t)V);
    double *q = malloc(sizeof(double) * (size_t)V);
    for (int i = 0; i < V; i++) ord[i] = i;
    ref_keys = logits;
    qsort(ord, (size_t)V, sizeof(int), ref_cmp);
    double mx = logits[ord[0]];
    for (int i = 0; i < V; i++) q[i] = exp((logits[i] - mx) / p->temperature);
    int n = V;
    if (p->top_k > 0 && p->top_k < V) n = p->top_k;
    if (p->top_p < 1) {
        double kept = 0, above = 0;
        for (int i = 0; i < n; i++) kept += q[ord[i]];
        int m = 0;
        while (m < n && above < p->top_p * kept) above += q[ord[m++]];
        n = m;
    }
    while (n > 1 && q[ord[n - 1]] < p->min_p * q[ord[0]]) n--;
    double mass = 0;
    for (int i = 0; i < n; i++) mass += q[ord[i]];
    memset(out, 0, sizeof(double) * (size_t)V);
    for (int i = 0; i < n; i++) out[ord[i]] = q[ord[i]] / mass;
    free(ord);
    free(q);
}

/* Max |frequency - probability|; also fails if a zero-probability token shows up. */
static double max_freq_diff(const int *counts, const double *prob, int V, int n, int *impossible) {
    double worst = 0;
    *impossible = 0;
    for (int i = 0; i < V; i++) {
        double d = fabs((double)counts[i] / n - prob[i]);
        if (d > worst) worst = d;
        if (prob[i] == 0 && counts[i]) (*impossible)++;
    }
    return worst;
}

static void test_validate(void) {
    nb_sampling_params p;
    nb_err e;
    sampling_params_default(&p);
    CHECK(sampling_params_validate(&p, &e) == 0, "defaults valid");
    CHECK(p.temperature == 1 && p.top_k == 0 && p.top_p == 1 && p.min_p == 0 && p.repetition_penalty == 1 &&
              p.presence_penalty == 0 && p.frequency_penalty == 0 && !p.has_seed,
          "defaults disabled");
    nb_sampling_params ok = p;
    ok.temperature = 0, ok.top_k = -1, ok.top_p = 1, ok.min_p = 1, ok.presence_penalty = 2, ok.frequency_penalty = -2;
    ok.repetition_penalty = 0.5f;
    CHECK(sampling_params_validate(&ok, &e) == 0, "edges valid: %s", e.msg);

    struct {
        const char *field;
        nb_sampling_params p;
    } bad[12];
    int n = 0;
    for (int i = 0; i < 12; i++) bad[i].p = p;
    bad[n].field = "temperature", bad[n++].p.temperature = -0.1f;
    bad[n].field = "temperature", bad[n++].p.temperature = NAN;
    bad[n].field = "top_k", bad[n++].p.top_k = -2;
    bad[n].field = "top_p", bad[n++].p.top_p = 1.5f;
    bad[n].field = "top_p", bad[n++].p.top_p = 0;
    bad[n].field = "min_p", bad[n++].p.min_p = -0.01f;
    bad[n].field = "min_p", bad[n++].p.min_p = 1.01f;
    bad[n].field = "repetition_penalty", bad[n++].p.repetition_penalty = 0;
    bad[n].field = "presence_penalty", bad[n++].p.presence_penalty = 2.5f;
    bad[n].field = "frequency_penalty", bad[n++].p.frequency_penalty = -2.01f;
    bad[n].field = "frequency_penalty", bad[n++].p.frequency_penalty = NAN;
    for (int i = 0; i < n; i++) {
        e.msg[0] = 0;
        CHECK(sampling_params_validate(&bad[i].p, &e) == -1, "%s accepted", bad[i].field);
        CHECK(strncmp(e.msg, bad[i].field, strlen(bad[i].field)) == 0, "message '%s' names %s", e.msg, bad[i].field);
    }
    bad[0].p = p;
    bad[0].p.top_p = 1.5f;
    sampling_params_validate(&bad[0].p, &e);
    CHECK(strcmp(e.msg, "top_p must be in (0, 1], got 1.5") == 0, "msg: %s", e.msg);
}

static void test_greedy_ties(void) {
    nb_sampling_params p = seeded(1);
    p.temperature = 0;
    float lg[6] = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f, 3.0f};
    nb_sampler *s = sampler_create(&p, 6);
    REQUIRE(s, "create");
    for (int i = 0; i < 50; i++) {
        float row[6];
        memcpy(row, lg, sizeof row);
        CHECK(sampler_sample(s, row) == 1, "argmax with ties picks lowest id");
    }
    float neg[6] = {-5.0f, -2.0f, -2.0f, -7.0f, -3.0f, -2.5f};
    CHECK(sampler_sample(s, neg) == 1, "all negative");
    float inf[6] = {-INFINITY, -INFINITY, 1.0f, -INFINITY, -INFINITY, 0.5f};
    CHECK(sampler_sample(s, inf) == 2, "-inf entries");
    sampler_free(s);

    /* penalties apply before greedy */
    p.presence_penalty = 0.2f;
    s = sampler_create(&p, 6);
    sampler_accept(s, 1);
    float row[6];
    memcpy(row, lg, sizeof row);
    CHECK(sampler_sample(s, row) == 3, "penalised token loses to the next tie");
    sampler_free(s);
}

static void test_low_temperature_and_tiny_filters(void) {
    int V = 1000;
    float *lg = malloc(sizeof(float) * (size_t)V);
    for (int trial = 0; trial < 20; trial++) {
        for (int i = 0; i < V; i++) lg[i] = rand_unit() * 10.0f - 5.0f;
        int best = trial % V;
        lg[best] = 6.0f; /* margin >= 1 over the rest */
        /* a tie at the top: greedy, top_k = 1 and tiny top_p keep the lower
         * id; a low but nonzero temperature rightly splits between the two */
        int tie = trial % 4 == 0;
        if (tie) lg[V - 1] = 6.0f;
        int *counts = malloc(sizeof(int) * (size_t)V);
        nb_sampling_params variants[4];
        for (int v = 0; v < 4; v++) variants[v] = seeded(100 + (uint64_t)trial);
        variants[0].temperature = 1e-6f;
        variants[1].temperature = 1e-2f; /* exp(-1/0.01) underflows: still one-hot */
        variants[2].top_k = 1;
        variants[3].top_p = 1e-6f;
        for (int v = 0; v < 4; v++) {
            if (tie && v == 1) continue;
            nb_sampler *s = sampler_create(&variants[v], V);
            draw_counts(s, lg, V, 200, counts);
            CHECK(counts[best] == 200, "variant %d trial %d: argmax %d drawn %d/200", v, trial, best, counts[best]);
            sampler_free(s);
        }
        free(counts);
    }
    free(lg);
}

static void test_min_p_set(void) {
    /* relative probabilities 1, .5, .2, .09, .11, .05, .0999, .1001 */
    double rel[8] = {1, .5, .2, .09, .11, .05, .0999, .1001};
    float lg[8];
    for (int i = 0; i < 8; i++) lg[i] = (float)log(rel[i]);
    int counts[8];
    nb_sampling_params p = seeded(7);
    p.min_p = 0.1f;
    nb_sampler *s = sampler_create(&p, 8);
    draw_counts(s, lg, 8, DRAWS, counts);
    int allowed[8] = {1, 1, 1, 0, 1, 0, 0, 1};
    for (int i = 0; i < 8; i++)
        CHECK(allowed[i] ? counts[i] > 0 : counts[i] == 0, "min_p 0.1: token %d drawn %d times", i, counts[i]);
    sampler_free(s);

    /* at temperature 2 relative probabilities are sqrt(rel): only .05 (->.22) falls below .25 */
    p.temperature = 2.0f;
    p.min_p = 0.25f;
    s = sampler_create(&p, 8);
    draw_counts(s, lg, 8, DRAWS, counts);
    for (int i = 0; i < 8; i++) {
        int ok = sqrt(rel[i]) >= 0.25;
        CHECK(ok ? counts[i] > 0 : counts[i] == 0, "min_p 0.25 T 2: token %d drawn %d times", i, counts[i]);
    }
    sampler_free(s);

    /* min_p = 1 keeps only the top token */
    p.min_p = 1.0f;
    s = sampler_create(&p, 8);
    draw_counts(s, lg, 8, 2000, counts);
    CHECK(counts[0] == 2000, "min_p 1: top only, got %d", counts[0]);
    sampler_free(s);
}

static void test_plain_distribution(void) {
    float lg[8] = {1.0f, 0.5f, 0.0f, -0.5f, 2.0f, -1.0f, 0.25f, 1.5f};
    double prob[8];
    int counts[8], bad;
    float temps[3] = {1.0f, 0.7f, 1.8f};
    for (int t = 0; t < 3; t++) {
        nb_sampling_params p = seeded(2024 + (uint64_t)t);
        p.temperature = temps[t];
        nb_sampler *s = sampler_create(&p, 8);
        draw_counts(s, lg, 8, DRAWS, counts);
        ref_probs(lg, 8, &p, prob);
        double d = max_freq_diff(counts, prob, 8, DRAWS, &bad);
        CHECK(d < 0.01, "T %g: max |freq - softmax| = %g", (double)temps[t], d);
        sampler_free(s);
    }
}

static void test_top_k_top_p_renormalise(void) {
    double q[5] = {0.4, 0.3, 0.15, 0.1, 0.05};
    float lg[5];
    for (int i = 0; i < 5; i++) lg[i] = (float)log(q[i]);
    int counts[5];

    nb_sampling_params p = seeded(11);
    p.top_k = 3;
    nb_sampler *s = sampler_create(&p, 5);
    draw_counts(s, lg, 5, DRAWS, counts);
    for (int i = 0; i < 5; i++) {
        double want = i < 3 ? q[i] / 0.85 : 0;
        CHECK(fabs((double)counts[i] / DRAWS - want) < 0.01 && (want > 0 || counts[i] == 0), "top_k 3: token %d freq %g want %g",
              i, (double)counts[i] / DRAWS, want);
    }
    sampler_free(s);

    /* top_p 0.8: mass above token 2 is .7 < .8 (kept), above token 3 is .85 (dropped) */
    p = seeded(12);
    p.top_p = 0.8f;
    s = sampler_create(&p, 5);
    draw_counts(s, lg, 5, DRAWS, counts);
    for (int i = 0; i < 5; i++) {
        double want = i < 3 ? q[i] / 0.85 : 0;
        CHECK(fabs((double)counts[i] / DRAWS - want) < 0.01 && (want > 0 || counts[i] == 0), "top_p .8: token %d freq %g want %g",
              i, (double)counts[i] / DRAWS, want);
    }
    sampler_free(s);

    /* top_p after top_k is relative to the top-k mass: .4 >= .55 * .7, so one token */
    p = seeded(13);
    p.top_k = 2;
    p.top_p = 0.55f;
    s = sampler_create(&p, 5);
    draw_counts(s, lg, 5, 2000, counts);
    CHECK(counts[0] == 2000, "top_k 2 + top_p .55: only token 0, got %d", counts[0]);
    sampler_free(s);
    p.top_k = 0;
    s = sampler_create(&p, 5);
    draw_counts(s, lg, 5, DRAWS, counts);
    CHECK(fabs((double)counts[0] / DRAWS - 0.4 / 0.7) < 0.01 && counts[2] == 0, "top_p .55 alone: two tokens, %d %d %d",
          counts[0], counts[1], counts[2]);
    sampler_free(s);
}

/* Random logits through every filter combination against the full-sort reference. */
static void test_filters_vs_reference(void) {
    int V = 200;
    float *lg = malloc(sizeof(float) * (size_t)V);
    double *prob = malloc(sizeof(double) * (size_t)V);
    int *counts = malloc(sizeof(int) * (size_t)V), bad;
    for (int i = 0; i < V; i++) lg[i] = rand_unit() * 8.0f - 4.0f;
    lg[17] = lg[18] = 4.5f; /* a tie at the top */
    struct {
        float t, top_p, min_p;
        int top_k;
    } cases[] = {
        {1.0f, 1.0f, 0, 5},      {0.5f, 1.0f, 0, 50},   {1.5f, 0.5f, 0, 0},    {1.0f, 0.9f, 0, 0},
        {1.0f, 1.0f, 0.05f, 0},  {0.8f, 0.9f, 0.02f, 20}, {2.0f, 0.3f, 0, 10}, {1.2f, 0.95f, 0.3f, 0},
        {1.0f, 1.0f, 0, 199},    {1.0f, 1.0f, 0, 1000},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        nb_sampling_params p = seeded(500 + c);
        p.temperature = cases[c].t, p.top_p = cases[c].top_p, p.min_p = cases[c].min_p, p.top_k = cases[c].top_k;
        nb_sampler *s = sampler_create(&p, V);
        draw_counts(s, lg, V, DRAWS, counts);
        ref_probs(lg, V, &p, prob);
        double d = max_freq_diff(counts, prob, V, DRAWS, &bad);
        CHECK(d < 0.01 && bad == 0, "case %zu: max diff %g, %d tokens outside the kept set", c, d, bad);
        sampler_free(s);
    }
    free(lg);
    free(prob);
    free(counts);
}

/* top-p over a long flat tail: the kept prefix reaches past the first
 * candidate threshold, and over a 150k vocabulary (a real model's size). */
static void test_top_p_long_tail(void) {
    int V = 50000;
    float *lg = malloc(sizeof(float) * (size_t)V);
    int *counts = malloc(sizeof(int) * (size_t)V);
    lg[0] = 0;
    for (int i = 1; i < V; i++) lg[i] = logf(1e-4f); /* each tail token 1e-4 of the top */
    nb_sampling_params p = seeded(99);
    p.top_p = 0.9f;
    nb_sampler *s = sampler_create(&p, V);
    int draws = 5000; /* fewer than elsewhere: each draw here scans 50k tokens */
    draw_counts(s, lg, V, draws, counts);
    double total = 1 + (V - 1) * 1e-4, need = 0.9 * total;
    int kept_tail = (int)ceil((need - 1) / 1e-4); /* tail ties are ranked by id */
    int max_id = 0;
    for (int i = 0; i < V; i++)
        if (counts[i]) max_id = i;
    CHECK(max_id <= kept_tail + 1 && max_id > kept_tail - 500, "highest drawn id %d, kept tail %d", max_id, kept_tail);
    double want0 = 1 / (1 + kept_tail * 1e-4);
    /* 0.02 is over 3.5 standard deviations at 5000 draws */
    CHECK(fabs((double)counts[0] / draws - want0) < 0.02, "top token freq %g want %g", (double)counts[0] / draws, want0);
    sampler_free(s);
    free(lg);
    free(counts);

    V = 151936;
    lg = malloc(sizeof(float) * (size_t)V);
    double *prob = malloc(sizeof(double) * (size_t)V);
    for (int i = 0; i < V; i++) lg[i] = rand_unit() * 20.0f - 10.0f;
    float top_ps[2] = {0.9f, 0.5f};
    int top_ks[2] = {0, 40};
    for (int c = 0; c < 2; c++) {
        p = seeded(7 + (uint64_t)c);
        p.top_p = top_ps[c];
        p.top_k = top_ks[c];
        ref_probs(lg, V, &p, prob);
        s = sampler_create(&p, V);
        float *row = malloc(sizeof(float) * (size_t)V);
        for (int i = 0; i < 30; i++) {
            memcpy(row, lg, sizeof(float) * (size_t)V);
            int32_t t = sampler_sample(s, row);
            CHECK(t >= 0 && t < V && prob[t] > 0, "150k case %d: drew %d outside the kept set", c, t);
        }
        free(row);
        sampler_free(s);
    }
    free(lg);
    free(prob);
}

/* Independent xoshiro256** / splitmix64, written from the published algorithms. */
static uint64_t ref_splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint64_t ref_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static uint64_t ref_xoshiro(uint64_t *s) {
    uint64_t r = ref_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t;
    s[3] = ref_rotl(s[3], 45);
    return r;
}

static void test_seed(void) {
    uint64_t x = 0;
    CHECK(ref_splitmix(&x) == 0xe220a8397b1dcdafull, "reference splitmix64 matches the published first output");

    int V = 1024;
    float *lg = calloc((size_t)V, sizeof(float)), *row = malloc(sizeof(float) * (size_t)V);
    nb_sampling_params p = seeded(42);
    nb_sampler *a = sampler_create(&p, V), *b = sampler_create(&p, V);
    p.seed = 43;
    nb_sampler *c = sampler_create(&p, V);
    p.has_seed = 0;
    nb_sampler *d = sampler_create(&p, V), *e = sampler_create(&p, V);
    uint64_t st[4], sd = 42;
    for (int i = 0; i < 4; i++) st[i] = ref_splitmix(&sd);
    int same_ab = 1, same_ac = 1, same_de = 1, documented = 1;
    for (int i = 0; i < 100; i++) {
        memcpy(row, lg, sizeof(float) * (size_t)V);
        int32_t ta = sampler_sample(a, row);
        memcpy(row, lg, sizeof(float) * (size_t)V);
        int32_t tb = sampler_sample(b, row);
        memcpy(row, lg, sizeof(float) * (size_t)V);
        int32_t tc = sampler_sample(c, row);
        memcpy(row, lg, sizeof(float) * (size_t)V);
        int32_t td = sampler_sample(d, row);
        memcpy(row, lg, sizeof(float) * (size_t)V);
        int32_t te = sampler_sample(e, row);
        same_ab &= ta == tb;
        same_ac &= ta == tc;
        same_de &= td == te;
        /* uniform over 1024 tokens: the top 10 bits of each generator output */
        documented &= ta == (int32_t)(ref_xoshiro(st) >> 54);
    }
    CHECK(same_ab, "same seed, same sequence");
    CHECK(!same_ac, "different seed, different sequence");
    CHECK(!same_de, "seedless samplers draw different sequences");
    CHECK(documented, "draws follow xoshiro256** seeded by splitmix64");
    sampler_free(a), sampler_free(b), sampler_free(c), sampler_free(d), sampler_free(e);
    free(lg), free(row);
}

static void test_penalties(void) {
    float lg[8] = {1.0f, 2.0f, -1.0f, 3.0f, 0.5f, -2.0f, 4.0f, 0.0f};
    nb_sampling_params p = seeded(3);
    p.temperature = 0;
    p.repetition_penalty = 2.0f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    nb_sampler *s = sampler_create(&p, 8);
    int32_t prompt[4] = {1, 2, 5, 1};
    sampler_add_prompt(s, prompt, 4);
    sampler_accept(s, 2);
    sampler_accept(s, 3);
    sampler_accept(s, 3);
    sampler_accept(s, 6);
    sampler_accept(s, 6);
    sampler_accept(s, 6);
    float row[8];
    memcpy(row, lg, sizeof row);
    int32_t t = sampler_sample(s, row);
    float want[8] = {
        1.0f,                         /* untouched */
        2.0f / 2,                     /* prompt only: repetition */
        -1.0f * 2 - 0.5f - 0.25f,     /* prompt + output once */
        3.0f / 2 - 2 * 0.5f - 0.25f,  /* output twice */
        0.5f,                         /* untouched */
        -2.0f * 2,                    /* prompt only, negative */
        4.0f / 2 - 3 * 0.5f - 0.25f,  /* output three times */
        0.0f,                         /* untouched */
    };
    for (int i = 0; i < 8; i++) CHECK(fabsf(row[i] - want[i]) < 1e-6f, "token %d: %g want %g", i, (double)row[i], (double)want[i]);
    CHECK(t == 0, "greedy after penalties picks 0, got %d", t);
    sampler_free(s);

    /* negative presence/frequency penalties encourage repeats; no repetition penalty */
    p.repetition_penalty = 1.0f;
    p.frequency_penalty = -1.0f;
    p.presence_penalty = -0.5f;
    s = sampler_create(&p, 8);
    sampler_add_prompt(s, prompt, 4); /* prompt alone must not matter here */
    sampler_accept(s, 4);
    sampler_accept(s, 4);
    memcpy(row, lg, sizeof row);
    t = sampler_sample(s, row);
    CHECK(fabsf(row[4] - (0.5f + 2.0f + 0.5f)) < 1e-6f, "token 4: %g", (double)row[4]);
    CHECK(row[1] == 2.0f && row[5] == -2.0f, "prompt tokens untouched: %g %g", (double)row[1], (double)row[5]);
    CHECK(t == 6, "greedy still 6 (4.0 > 3.0), got %d", t);
    sampler_free(s);
}

static void test_logprobs(void) {
    int V = 5000;
    float *lg = malloc(sizeof(float) * (size_t)V);
    for (int i = 0; i < V; i++) lg[i] = rand_unit() * 30.0f - 15.0f;
    lg[10] = lg[20] = 16.0f; /* tie at the top: lower id first */
    double mx = 16.0, sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)lg[i] - mx);
    double lse = mx + log(sum);
    int32_t ids[20];
    float lp[20];
    float chosen = sample_logprobs_ref(lg, V, 123, 20, ids, lp);
    CHECK(fabs(chosen - (lg[123] - lse)) < 1e-5, "chosen %g want %g", (double)chosen, lg[123] - lse);
    CHECK(ids[0] == 10 && ids[1] == 20, "ties: %d %d", ids[0], ids[1]);
    int *ord = malloc(sizeof(int) * (size_t)V);
    for (int i = 0; i < V; i++) ord[i] = i;
    ref_keys = lg;
    qsort(ord, (size_t)V, sizeof(int), ref_cmp);
    for (int i = 0; i < 20; i++) {
        CHECK(ids[i] == ord[i], "rank %d: id %d want %d", i, ids[i], ord[i]);
        CHECK(fabs(lp[i] - (lg[ord[i]] - lse)) < 1e-5, "rank %d: lp %g", i, (double)lp[i]);
        if (i) CHECK(lp[i] <= lp[i - 1], "descending at %d", i);
    }
    free(ord);
    /* more slots than tokens */
    float small[3] = {0.0f, 1.0f, 2.0f};
    int32_t ids5[5];
    float lp5[5];
    float c = sample_logprobs_ref(small, 3, 0, 5, ids5, lp5);
    double l3 = log(exp(0.0) + exp(1.0) + exp(2.0));
    CHECK(fabs(c - (0 - l3)) < 1e-6, "small chosen %g", (double)c);
    CHECK(ids5[0] == 2 && ids5[1] == 1 && ids5[2] == 0 && ids5[3] == -1 && ids5[4] == -1, "small ids");
    CHECK(isinf(lp5[3]) && lp5[3] < 0, "unused slot is -inf");
    double z = exp(lp5[0]) + exp(lp5[1]) + exp(lp5[2]);
    CHECK(fabs(z - 1) < 1e-6, "probabilities sum to 1: %g", z);
    free(lg);
}

/* The backend's sample op (what the engine calls: many rows, split over
 * threads) equals sampler_sample one row at a time, for rows built by
 * sampler_row with their own parameters, histories and seeds; and a
 * sampler's stream is the same whichever of the two draws it. */
static void test_backend_sample_op(void) {
    enum { V = 3000, R = 12 };
    nb_err e = {{0}};
    nb_backend *be = cpu_backend_create(3, &e);
    REQUIRE(be != NULL, "cpu backend: %s", e.msg);
    float *x = malloc(sizeof(float) * R * V), *row = malloc(sizeof(float) * V);
    nb_sampler *a[R], *b[R];
    nb_sample_row rows[R];
    for (int r = 0; r < R; r++) {
        nb_sampling_params p = seeded(1000 + (uint64_t)r);
        p.temperature = r % 4 == 0 ? 0.0f : 0.5f + 0.1f * (float)r;
        p.top_k = r % 3 == 1 ? 10 * r : 0;
        p.top_p = r % 2 ? 0.85f : 1.0f;
        p.min_p = r % 5 == 2 ? 0.05f : 0.0f;
        p.repetition_penalty = r % 4 == 3 ? 1.5f : 1.0f;
        p.frequency_penalty = r % 4 == 0 ? 0.5f : 0.0f;
        a[r] = sampler_create(&p, V);
        b[r] = sampler_create(&p, V);
    }
    int same = 1;
    for (int step = 0; step < 20; step++) {
        for (int i = 0; i < R * V; i++) x[i] = rand_unit() * 12.0f - 6.0f;
        for (int r = 0; r < R; r++) sampler_row(a[r], &rows[r]);
        int32_t got[R];
        float *copy = malloc(sizeof(float) * R * V);
        memcpy(copy, x, sizeof(float) * R * V);
        be->ops->sample(be, got, copy, R, V, rows);
        free(copy);
        for (int r = 0; r < R; r++) {
            memcpy(row, x + (size_t)r * V, sizeof(float) * V);
            int32_t want = sampler_sample(b[r], row);
            same &= want == got[r];
            sampler_accept(a[r], got[r]);
            sampler_accept(b[r], want);
        }
    }
    CHECK(same, "the backend op and sampler_sample drew different tokens");
    /* the history reaches the op: a greedy row whose top token was generated
     * before loses it to the penalty */
    nb_sampling_params p = seeded(5);
    p.temperature = 0;
    p.presence_penalty = 2.0f;
    nb_sampler *s = sampler_create(&p, V);
    for (int i = 0; i < V; i++) x[i] = 0.0f;
    x[42] = 1.0f, x[7] = 0.5f;
    sampler_accept(s, 42);
    sampler_row(s, &rows[0]);
    int32_t id;
    be->ops->sample(be, &id, x, 1, V, rows);
    CHECK(id == 7, "presence penalty through the op: got %d, want 7", id);
    sampler_free(s);
    for (int r = 0; r < R; r++) sampler_free(a[r]), sampler_free(b[r]);
    free(x), free(row);
    backend_destroy(be);
}

int main(void) {
    RUN(test_validate);
    RUN(test_greedy_ties);
    RUN(test_low_temperature_and_tiny_filters);
    RUN(test_min_p_set);
    RUN(test_plain_distribution);
    RUN(test_top_k_top_p_renormalise);
    RUN(test_filters_vs_reference);
    RUN(test_top_p_long_tail);
    RUN(test_seed);
    RUN(test_penalties);
    RUN(test_logprobs);
    RUN(test_backend_sample_op);
    TEST_DONE("sampler");
}
