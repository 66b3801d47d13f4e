/* Sampler: a sequence's sampling state (parameters, RNG, the penalties'
 * history). The row arithmetic itself, vLLM's order of
 *
 *   repetition penalty -> frequency/presence penalties -> temperature
 *   -> top-k -> top-p -> min-p -> draw from the renormalised softmax,
 *
 * is sample_row_ref (kernels/cpu/cpu_sample.c), which the backends' sample
 * ops equal, so the draw can run where the logits are.
 *
 * Random numbers come from xoshiro256** (Blackman and Vigna), its 256-bit
 * state filled from the 64-bit seed by four splitmix64 steps. Each
 * non-greedy step consumes exactly one 64-bit output whose top 53 bits make
 * a double in [0, 1), so a fixed seed and identical logits give the same
 * token sequence on every run and machine. */
#include "engine/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "common/util.h"

/* Below this temperature the softmax is numerically one-hot; vLLM uses the
 * same epsilon to switch to greedy (as does sample_row_ref). */
#define SAMPLER_GREEDY_EPS 1e-5f

struct nb_sampler {
    nb_sampling_params p;
    int vocab;
    uint64_t rng[4]; /* xoshiro256** state */
    /* The penalties' history as a list of distinct tokens, so that a step
     * hands the backend what it touches and not a vocabulary-sized array. */
    int n_hist;
    int32_t *hist_ids;   /* [vocab] */
    int32_t *hist_count; /* [vocab] times generated; 0: prompt only */
    int32_t *hist_at;    /* [vocab] index into hist_ids, -1 if unseen */
    int32_t *idx;        /* [vocab] scratch for sample_row_ref */
    float *prob;         /* [vocab] scratch for sample_row_ref */
};

void sampling_params_default(nb_sampling_params *p) {
    memset(p, 0, sizeof *p);
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repetition_penalty = 1.0f;
}

/* The negated comparisons also reject NaN. */
int sampling_params_validate(const nb_sampling_params *p, nb_err *e) {
    if (!(p->temperature >= 0 && isfinite(p->temperature)))
        return nb_errf(e, "temperature must be a finite value >= 0, got %g", (double)p->temperature);
    if (p->top_k < -1) return nb_errf(e, "top_k must be -1 or 0 (disabled) or >= 1, got %d", p->top_k);
    if (!(p->top_p > 0 && p->top_p <= 1)) return nb_errf(e, "top_p must be in (0, 1], got %g", (double)p->top_p);
    if (!(p->min_p >= 0 && p->min_p <= 1)) return nb_errf(e, "min_p must be in [0, 1], got %g", (double)p->min_p);
    if (!(p->repetition_penalty > 0 && isfinite(p->repetition_penalty)))
        return nb_errf(e, "repetition_penalty must be a finite value > 0, got %g", (double)p->repetition_penalty);
    if (!(p->presence_penalty >= -2 && p->presence_penalty <= 2))
        return nb_errf(e, "presence_penalty must be in [-2, 2], got %g", (double)p->presence_penalty);
    if (!(p->frequency_penalty >= -2 && p->frequency_penalty <= 2))
        return nb_errf(e, "frequency_penalty must be in [-2, 2], got %g", (double)p->frequency_penalty);
    return 0;
}

/* ---- random numbers ---- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t *s) {
    uint64_t r = rotl64(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return r;
}

static double xoshiro_uniform(uint64_t *s) { return (double)(xoshiro_next(s) >> 11) * (1.0 / 9007199254740992.0); }

/* ---- lifetime and history ---- */

nb_sampler *sampler_create(const nb_sampling_params *p, int vocab_size) {
    if (vocab_size <= 0) return NULL;
    nb_sampler *s = xcalloc(1, sizeof *s);
    s->p = *p;
    s->vocab = vocab_size;
    uint64_t seed = p->seed;
    if (!p->has_seed && getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) {
        /* getrandom only fails on ancient kernels; any varying value will do. */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)(uintptr_t)s;
    }
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&seed);
    s->hist_ids = xmalloc(sizeof(int32_t) * (size_t)vocab_size);
    s->hist_count = xmalloc(sizeof(int32_t) * (size_t)vocab_size);
    s->hist_at = xmalloc(sizeof(int32_t) * (size_t)vocab_size);
    for (int i = 0; i < vocab_size; i++) s->hist_at[i] = -1;
    s->idx = xmalloc(sizeof(int32_t) * (size_t)vocab_size);
    s->prob = xmalloc(sizeof(float) * (size_t)vocab_size);
    return s;
}

void sampler_free(nb_sampler *s) {
    if (!s) return;
    free(s->hist_ids);
    free(s->hist_count);
    free(s->hist_at);
    free(s->idx);
    free(s->prob);
    free(s);
}

/* The history entry of a valid id, added on first sight. */
static int32_t *sampler_hist(nb_sampler *s, int32_t id) {
    if (s->hist_at[id] < 0) {
        s->hist_at[id] = s->n_hist;
        s->hist_ids[s->n_hist] = id;
        s->hist_count[s->n_hist++] = 0;
    }
    return &s->hist_count[s->hist_at[id]];
}

void sampler_add_prompt(nb_sampler *s, const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < s->vocab) sampler_hist(s, ids[i]);
}

void sampler_accept(nb_sampler *s, int32_t id) {
    if (id >= 0 && id < s->vocab) (*sampler_hist(s, id))++;
}

/* ---- sampling ---- */

void sampler_row(nb_sampler *s, nb_sample_row *r) {
    const nb_sampling_params *p = &s->p;
    r->temperature = p->temperature;
    r->top_k = p->top_k;
    r->top_p = p->top_p;
    r->min_p = p->min_p;
    r->repetition_penalty = p->repetition_penalty;
    r->presence_penalty = p->presence_penalty;
    r->frequency_penalty = p->frequency_penalty;
    /* a greedy row draws nothing, so its RNG stream is not advanced */
    r->u = p->temperature < SAMPLER_GREEDY_EPS ? 0.0 : xoshiro_uniform(s->rng);
    int pen = p->repetition_penalty != 1.0f || p->presence_penalty != 0 || p->frequency_penalty != 0;
    r->n_hist = pen ? s->n_hist : 0;
    r->hist_ids = s->hist_ids;
    r->hist_count = s->hist_count;
}

int32_t sampler_sample(nb_sampler *s, float *lg) {
    nb_sample_row r;
    sampler_row(s, &r);
    return sample_row_ref(lg, s->vocab, &r, s->prob, s->idx);
}
