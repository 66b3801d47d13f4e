/* Sampler: vLLM's order of operations on one row of FP32 logits.
 *
 *   repetition penalty -> frequency/presence penalties -> temperature
 *   -> top-k -> top-p -> min-p -> draw from the renormalised softmax.
 *
 * Random numbers come from xoshiro256** (Blackman and Vigna), its 256-bit
 * state filled from the 64-bit seed by four splitmix64 steps. Each random
 * draw consumes exactly one 64-bit output whose top 53 bits make a double in
 * [0, 1), so a fixed seed and identical logits give the same token sequence on
 * every run and machine (given the same libm expf). */
#include "engine/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "common/util.h"

/* Below this temperature the softmax is numerically one-hot; vLLM uses the
 * same epsilon to switch to greedy. */
#define SAMPLER_GREEDY_EPS 1e-5f

struct nb_sampler {
    nb_sampling_params p;
    int vocab;
    uint64_t rng[4];    /* xoshiro256** state */
    uint8_t *in_prompt; /* [vocab] 1 if the token occurs in the prompt */
    int32_t *out_count; /* [vocab] times the token was generated */
    int32_t *idx;       /* [vocab] scratch: candidate token ids */
    float *prob;        /* [vocab] scratch: unnormalised probabilities */
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
    s->in_prompt = xcalloc((size_t)vocab_size, 1);
    s->out_count = xcalloc((size_t)vocab_size, sizeof(int32_t));
    s->idx = xmalloc(sizeof(int32_t) * (size_t)vocab_size);
    s->prob = xmalloc(sizeof(float) * (size_t)vocab_size);
    return s;
}

void sampler_free(nb_sampler *s) {
    if (!s) return;
    free(s->in_prompt);
    free(s->out_count);
    free(s->idx);
    free(s->prob);
    free(s);
}

void sampler_add_prompt(nb_sampler *s, const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < s->vocab) s->in_prompt[ids[i]] = 1;
}

void sampler_accept(nb_sampler *s, int32_t id) {
    if (id >= 0 && id < s->vocab) s->out_count[id]++;
}

/* ---- sampling ---- */

static void sampler_apply_penalties(const nb_sampler *s, float *lg) {
    const nb_sampling_params *p = &s->p;
    int rep = p->repetition_penalty != 1.0f;
    int pen = p->presence_penalty != 0 || p->frequency_penalty != 0;
    if (!rep && !pen) return;
    for (int i = 0; i < s->vocab; i++) {
        int32_t c = s->out_count[i];
        if (rep && (c || s->in_prompt[i]))
            lg[i] = lg[i] > 0 ? lg[i] / p->repetition_penalty : lg[i] * p->repetition_penalty;
        if (c) lg[i] -= p->frequency_penalty * (float)c + p->presence_penalty;
    }
}

/* First index of the largest value; NaNs are skipped. -1 if all are NaN. */
static int sampler_argmax(const float *x, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!isnan(x[i]) && (best < 0 || x[i] > x[best])) best = i;
    return best;
}

/* a ranks before b: higher value first, lower id on ties */
static int sampler_before(const float *v, int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); }

static int sampler_cmp_desc(const void *a, const void *b, void *keys) {
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    const float *v = keys;
    if (sampler_before(v, i, j)) return -1;
    return sampler_before(v, j, i) ? 1 : 0;
}

/* Min-heap on rank (root = worst kept) so top-k costs O(V log k), not a sort. */
static void sampler_heap_down(int32_t *h, int n, int i, const float *v) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && sampler_before(v, h[m], h[l])) m = l;
        if (r < n && sampler_before(v, h[m], h[r])) m = r;
        if (m == i) return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Writes the k best ids of v into out, sorted best first. */
static void sampler_top_k(const float *v, int n, int k, int32_t *out) {
    for (int i = 0; i < k; i++) out[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--) sampler_heap_down(out, k, i, v);
    for (int i = k; i < n; i++) {
        if (sampler_before(v, i, out[0])) {
            out[0] = i;
            sampler_heap_down(out, k, 0, v);
        }
    }
    qsort_r(out, (size_t)k, sizeof(int32_t), sampler_cmp_desc, (void *)v);
}

/* Length of the shortest prefix of sorted ids whose mass reaches top_p * mass,
 * i.e. a token is kept when the mass ranked strictly above it is below that
 * (vLLM keeps the top token always). Returns -1 if the prefix never reaches it. */
static int sampler_top_p_len(const float *pr, const int32_t *ids, int n, double target) {
    double acc = 0;
    for (int i = 0; i < n; i++) {
        acc += pr[ids[i]];
        if (acc >= target) return i + 1;
    }
    return -1;
}

static void sampler_swap(int32_t *a, int32_t *b) {
    int32_t t = *a;
    *a = *b;
    *b = t;
}

/* Top-p without top-k: reorders ids so that ids[0..m) is the top-p set and
 * returns m, without sorting. Quickselect on probability mass: partition
 * around a pivot; if the better side alone reaches the target the answer lies
 * there, otherwise keep it and the pivot and look for the rest on the worse
 * side. Expected O(n), where a sort of a 150k vocabulary would be O(n log n)
 * on every step. The rank order is total (ties broken by id), so the set
 * equals the prefix of a full sort. */
static int sampler_top_p_select(const float *pr, int32_t *ids, int n, double target) {
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        /* median of three to the end as pivot: sorted input stays O(n) */
        if (sampler_before(pr, ids[mid], ids[lo])) sampler_swap(&ids[mid], &ids[lo]);
        if (sampler_before(pr, ids[hi - 1], ids[lo])) sampler_swap(&ids[hi - 1], &ids[lo]);
        if (sampler_before(pr, ids[mid], ids[hi - 1])) sampler_swap(&ids[mid], &ids[hi - 1]);
        int32_t pivot = ids[hi - 1];
        int store = lo;
        double better = 0;
        for (int i = lo; i < hi - 1; i++) {
            if (sampler_before(pr, ids[i], pivot)) {
                better += pr[ids[i]];
                sampler_swap(&ids[i], &ids[store++]);
            }
        }
        sampler_swap(&ids[store], &ids[hi - 1]);
        if (better >= target) {
            hi = store;
        } else if (better + pr[pivot] >= target) {
            return store + 1;
        } else {
            target -= better + pr[pivot];
            lo = store + 1;
        }
    }
    /* one token left in range: it completes the set (or rounding ran out) */
    int m = hi > lo ? lo + 1 : lo;
    return m > 0 ? m : 1;
}

int sampler_is_greedy(const nb_sampler *s) {
    const nb_sampling_params *p = &s->p;
    return p->temperature < SAMPLER_GREEDY_EPS && p->repetition_penalty == 1.0f && p->presence_penalty == 0.0f &&
           p->frequency_penalty == 0.0f;
}

int32_t sampler_sample(nb_sampler *s, float *lg) {
    const nb_sampling_params *p = &s->p;
    int V = s->vocab;
    sampler_apply_penalties(s, lg);
    int best = sampler_argmax(lg, V);
    if (best < 0) return 0;
    float mx = lg[best];
    if (p->temperature < SAMPLER_GREEDY_EPS || isinf(mx)) return best;

    /* Probabilities relative to the top token (which gets exactly 1), so
     * min-p's "min_p * p_max" is simply min_p. */
    float *pr = s->prob;
    double total = 0;
    for (int i = 0; i < V; i++) {
        pr[i] = isnan(lg[i]) ? 0.0f : expf((lg[i] - mx) / p->temperature);
        total += pr[i];
    }

    int k = p->top_k > 0 && p->top_k < V ? p->top_k : 0;
    int n;
    if (k) {
        sampler_top_k(pr, V, k, s->idx);
        n = k;
        if (p->top_p < 1.0f) {
            double kept = 0;
            for (int i = 0; i < k; i++) kept += pr[s->idx[i]];
            int m = sampler_top_p_len(pr, s->idx, k, (double)p->top_p * kept);
            if (m > 0) n = m;
        }
        /* min-p on a list sorted best first is a prefix cut */
        while (n > 1 && !(pr[s->idx[n - 1]] >= p->min_p && pr[s->idx[n - 1]] > 0)) n--;
    } else {
        /* Zero-probability tokens can never be drawn, and tokens below min_p
         * are cut whatever top-p keeps, so both are dropped up front. */
        n = 0;
        for (int i = 0; i < V; i++)
            if (pr[i] >= p->min_p && pr[i] > 0) s->idx[n++] = i;
        /* top-p's target is a share of the whole vocabulary's mass; when the
         * min-p survivors cannot reach it, min-p is the tighter filter. */
        if (p->top_p < 1.0f) n = sampler_top_p_select(pr, s->idx, n, (double)p->top_p * total);
    }

    double mass = 0;
    for (int i = 0; i < n; i++) mass += pr[s->idx[i]];
    double r = xoshiro_uniform(s->rng) * mass, acc = 0;
    int32_t last = best;
    for (int i = 0; i < n; i++) {
        float q = pr[s->idx[i]];
        acc += q;
        last = s->idx[i];
        if (r < acc) return last;
    }
    return last; /* rounding left r at the very top of the range */
}

/* ---- logprobs ---- */

float sampler_logprobs(const float *lg, int vocab, int32_t chosen, int n_top, int32_t *top_ids, float *top_lp) {
    int best = sampler_argmax(lg, vocab);
    if (best < 0) return -INFINITY;
    double mx = lg[best], sum = 0;
    for (int i = 0; i < vocab; i++)
        if (!isnan(lg[i])) sum += exp((double)lg[i] - mx);
    double lse = mx + log(sum);
    int n_fill = n_top < vocab ? n_top : vocab;
    /* n_top is small (OpenAI allows 20): insertion into a sorted list beats a sort */
    int have = 0;
    for (int i = 0; i < vocab && n_fill > 0; i++) {
        if (isnan(lg[i])) continue;
        if (have == n_fill && !sampler_before(lg, i, top_ids[have - 1])) continue;
        int j = have < n_fill ? have++ : have - 1;
        while (j > 0 && sampler_before(lg, i, top_ids[j - 1])) {
            top_ids[j] = top_ids[j - 1];
            j--;
        }
        top_ids[j] = i;
    }
    for (int i = 0; i < have; i++) top_lp[i] = (float)((double)lg[top_ids[i]] - lse);
    for (int i = have; i < n_top; i++) {
        top_ids[i] = -1;
        top_lp[i] = -INFINITY;
    }
    if (chosen < 0 || chosen >= vocab || isnan(lg[chosen])) return -INFINITY;
    return (float)((double)lg[chosen] - lse);
}
