/* Sampler: greedy and its limits, each filter's surviving set, draw
 * frequencies against the softmax, seeds, penalty formulas, validation,
 * logprobs against a double-precision log-softmax. */
#include <math.h>
#include <string.h>

#include "engine/sampler.h"
#include "test.h"

#define V 8
static const float BASE[V] = {1.0f, 2.0f, 0.5f, 2.0f, -1.0f, 0.0f, 1.5f, -3.0f};

static nb_sampling_params params(float temp) {
    nb_sampling_params p;
    sampling_params_default(&p);
    p.temperature = temp;
    p.seed = 99;
    p.has_seed = 1;
    return p;
}

/* Draws n tokens and counts them. */
static void draw(const nb_sampling_params *p, int n, int *counts) {
    nb_sampler *s = sampler_create(p, V);
    memset(counts, 0, sizeof(int) * V);
    for (int i = 0; i < n; i++) {
        float lg[V];
        memcpy(lg, BASE, sizeof lg);
        counts[sampler_sample(s, lg)]++;
    }
    sampler_free(s);
}

static void softmax(const float *x, float t, double *p) {
    double mx = -1e30, sum = 0;
    for (int i = 0; i < V; i++) mx = x[i] / t > mx ? x[i] / t : mx;
    for (int i = 0; i < V; i++) sum += p[i] = exp(x[i] / t - mx);
    for (int i = 0; i < V; i++) p[i] /= sum;
}

static void test_greedy(void) {
    nb_sampling_params p = params(0);
    int c[V];
    draw(&p, 50, c);
    CHECK(c[1] == 50, "greedy picks the lowest index of the tied maximum (got %d)", c[1]);
    p = params(1e-4f);
    draw(&p, 200, c);
    CHECK(c[1] + c[3] == 200, "temperature -> 0 only picks maxima");
    p = params(1);
    p.top_k = 1;
    draw(&p, 200, c);
    CHECK(c[1] == 200, "top_k = 1 is greedy");
    p = params(1);
    p.top_p = 1e-6f;
    draw(&p, 200, c);
    CHECK(c[1] == 200, "tiny top_p is greedy");
}

static void test_distribution(void) {
    const int N = 20000;
    nb_sampling_params p = params(1);
    int c[V];
    double want[V];
    draw(&p, N, c);
    softmax(BASE, 1, want);
    double worst = 0;
    for (int i = 0; i < V; i++) worst = fmax(worst, fabs((double)c[i] / N - want[i]));
    CHECK(worst < 0.01, "temperature 1 frequencies off by %.4f", worst);
    p = params(0.5f);
    draw(&p, N, c);
    softmax(BASE, 0.5f, want);
    worst = 0;
    for (int i = 0; i < V; i++) worst = fmax(worst, fabs((double)c[i] / N - want[i]));
    CHECK(worst < 0.01, "temperature 0.5 frequencies off by %.4f", worst);
}

static void test_filters(void) {
    const int N = 20000;
    int c[V];
    double sm[V];
    softmax(BASE, 1, sm);
    /* top_k = 3 keeps 1, 3 (2.0) and 6 (1.5), renormalised */
    nb_sampling_params p = params(1);
    p.top_k = 3;
    draw(&p, N, c);
    double z = sm[1] + sm[3] + sm[6];
    CHECK(c[0] + c[2] + c[4] + c[5] + c[7] == 0, "top_k leaks other tokens");
    CHECK(fabs((double)c[6] / N - sm[6] / z) < 0.01, "top_k renormalisation: %.3f vs %.3f", (double)c[6] / N, sm[6] / z);
    /* top_p: smallest prefix of the sorted distribution reaching p */
    p = params(1);
    p.top_p = 0.6f; /* sm[1] + sm[3] = 0.50..; + sm[6] crosses 0.6 */
    draw(&p, N, c);
    CHECK(c[1] && c[3] && c[6] && c[0] + c[2] + c[4] + c[5] + c[7] == 0, "top_p set");
    /* min_p = 0.5: tokens with p >= 0.5 * p_max, i.e. logit >= 2 - ln 2 = 1.307 */
    p = params(1);
    p.min_p = 0.5f;
    draw(&p, N, c);
    CHECK(c[1] && c[3] && c[6] && c[0] + c[2] + c[4] + c[5] + c[7] == 0, "min_p set");
}

static void test_seed(void) {
    nb_sampling_params p = params(1);
    int a[64], b[64], d[64];
    for (int run = 0; run < 3; run++) {
        p.seed = run == 2 ? 100 : 99;
        nb_sampler *s = sampler_create(&p, V);
        for (int i = 0; i < 64; i++) {
            float lg[V];
            memcpy(lg, BASE, sizeof lg);
            (run == 0 ? a : run == 1 ? b : d)[i] = sampler_sample(s, lg);
        }
        sampler_free(s);
    }
    CHECK(!memcmp(a, b, sizeof a), "same seed, same tokens");
    CHECK(memcmp(a, d, sizeof a), "other seed, other tokens");
}

static void test_penalties(void) {
    nb_sampling_params p = params(0);
    p.repetition_penalty = 2;
    p.frequency_penalty = 0.25f;
    p.presence_penalty = 0.5f;
    nb_sampler *s = sampler_create(&p, V);
    int32_t prompt[2] = {0, 4};
    sampler_add_prompt(s, prompt, 2);
    sampler_accept(s, 1);
    sampler_accept(s, 1);
    sampler_accept(s, 3);
    float lg[V];
    memcpy(lg, BASE, sizeof lg);
    int32_t id = sampler_sample(s, lg);
    /* 0: prompt only, 1/2 = 0.5; 4: prompt, negative, -1*2 = -2;
     * 1: 2/2 - 2*0.25 - 0.5 = 0; 3: 2/2 - 0.25 - 0.5 = 0.25; 6 untouched 1.5 */
    CHECK(fabsf(lg[0] - 0.5f) < 1e-6f && fabsf(lg[4] + 2.0f) < 1e-6f, "repetition penalty: %g %g", lg[0], lg[4]);
    CHECK(fabsf(lg[1] - 0.0f) < 1e-6f && fabsf(lg[3] - 0.25f) < 1e-6f, "frequency/presence: %g %g", lg[1], lg[3]);
    CHECK(lg[6] == 1.5f && id == 6, "untouched token wins: id %d", id);
    sampler_free(s);
}

static void test_validation(void) {
    static const struct {
        int field;
        float value;
        const char *name;
    } bad[] = {{0, -1, "temperature"}, {1, 0, "top_p"}, {1, 1.5f, "top_p"}, {2, -0.1f, "min_p"}, {2, 2, "min_p"},
               {3, 0, "repetition_penalty"}, {4, 3, "presence_penalty"}, {5, -2.5f, "frequency_penalty"},
               {6, -5, "top_k"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        nb_sampling_params p = params(1);
        switch (bad[i].field) {
        case 0: p.temperature = bad[i].value; break;
        case 1: p.top_p = bad[i].value; break;
        case 2: p.min_p = bad[i].value; break;
        case 3: p.repetition_penalty = bad[i].value; break;
        case 4: p.presence_penalty = bad[i].value; break;
        case 5: p.frequency_penalty = bad[i].value; break;
        case 6: p.top_k = (int)bad[i].value; break;
        }
        nb_err e = {{0}};
        CHECK(sampling_params_validate(&p, &e) != 0 && strstr(e.msg, bad[i].name), "case %zu: %s", i, e.msg);
    }
    nb_sampling_params p = params(0.7f);
    nb_err e;
    CHECK(sampling_params_validate(&p, &e) == 0, "defaults are valid");
}

static void test_logprobs(void) {
    int32_t ids[3];
    float lp[3];
    float chosen = sample_logprobs_ref(BASE, V, 6, 3, ids, lp);
    double sm[V];
    softmax(BASE, 1, sm);
    CHECK(fabs(chosen - log(sm[6])) < 1e-5, "chosen logprob %g vs %g", chosen, log(sm[6]));
    CHECK(ids[0] == 1 && ids[1] == 3 && ids[2] == 6, "top ids %d %d %d", ids[0], ids[1], ids[2]);
    CHECK(lp[0] >= lp[1] && lp[1] >= lp[2] && fabs(lp[2] - log(sm[6])) < 1e-5, "top logprobs sorted");
}

int main(void) {
    RUN(test_greedy);
    RUN(test_distribution);
    RUN(test_filters);
    RUN(test_seed);
    RUN(test_penalties);
    RUN(test_validation);
    RUN(test_logprobs);
    TEST_DONE("test_sampler_checks");
}
