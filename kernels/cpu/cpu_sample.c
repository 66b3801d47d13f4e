/* sample_row_ref: one logits row to one token id, and sample_logprobs_ref,
 * its log-softmax for the logprobs of a response (kernels/backend.h says
 * what they compute). This is the definition the GPU sampler is tested
 * against and what the CPU backend and engine/sampler.c run.
 *
 * The kept set is always a prefix of the rank order (probability
 * descending, lower id first on ties), so it is named by its last token t:
 * a token is kept when it ranks at or before t. That lets the draw walk the
 * kept tokens in id order, which a GPU can do with a block-wide scan, and
 * the CPU finds t with a heap (top-k) or a quickselect on mass (top-p)
 * without sorting the vocabulary. */
#include <math.h>
#include <stdlib.h>

#include "kernels/backend.h"

/* Below this temperature the softmax is numerically one-hot; vLLM uses the
 * same epsilon to switch to greedy. */
#define SAMPLE_GREEDY_EPS 1e-5f

/* Every history token was seen in the prompt or the output, so the
 * repetition penalty applies to each; the others to output tokens only. */
static void sample_penalties(float *lg, int V, const nb_sample_row *r) {
    int rep = r->repetition_penalty != 1.0f;
    int pen = r->presence_penalty != 0 || r->frequency_penalty != 0;
    if (!rep && !pen) return;
    for (int j = 0; j < r->n_hist; j++) {
        int32_t i = r->hist_ids[j], c = r->hist_count[j];
        if (i < 0 || i >= V) continue;
        if (rep) lg[i] = lg[i] > 0 ? lg[i] / r->repetition_penalty : lg[i] * r->repetition_penalty;
        if (c) lg[i] -= r->frequency_penalty * (float)c + r->presence_penalty;
    }
}

/* First index of the largest value; NaNs are skipped. -1 if all are NaN. */
static int sample_argmax(const float *x, int n) {
    int best = -1;
    for (int i = 0; i < n; i++)
        if (!isnan(x[i]) && (best < 0 || x[i] > x[best])) best = i;
    return best;
}

/* a ranks before b: higher value first, lower id on ties */
static int sample_before(const float *v, int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); }

static int sample_cmp_desc(const void *a, const void *b, void *keys) {
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    const float *v = keys;
    if (sample_before(v, i, j)) return -1;
    return sample_before(v, j, i) ? 1 : 0;
}

/* Min-heap on rank (root = worst kept) so top-k costs O(V log k), not a sort. */
static void sample_heap_down(int32_t *h, int n, int i, const float *v) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && sample_before(v, h[m], h[l])) m = l;
        if (r < n && sample_before(v, h[m], h[r])) m = r;
        if (m == i) return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Writes the k best ids of v into out, sorted best first. */
static void sample_top_k(const float *v, int n, int k, int32_t *out) {
    for (int i = 0; i < k; i++) out[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--) sample_heap_down(out, k, i, v);
    for (int i = k; i < n; i++) {
        if (sample_before(v, i, out[0])) {
            out[0] = i;
            sample_heap_down(out, k, 0, v);
        }
    }
    qsort_r(out, (size_t)k, sizeof(int32_t), sample_cmp_desc, (void *)v);
}

/* Length of the shortest prefix of sorted ids whose mass reaches target
 * (vLLM keeps the top token always); -1 if the prefix never reaches it. */
static int sample_top_p_len(const float *pr, const int32_t *ids, int n, double target) {
    double acc = 0;
    for (int i = 0; i < n; i++) {
        acc += pr[ids[i]];
        if (acc >= target) return i + 1;
    }
    return -1;
}

static void sample_swap(int32_t *a, int32_t *b) {
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
static int sample_top_p_select(const float *pr, int32_t *ids, int n, double target) {
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        /* median of three to the end as pivot: sorted input stays O(n) */
        if (sample_before(pr, ids[mid], ids[lo])) sample_swap(&ids[mid], &ids[lo]);
        if (sample_before(pr, ids[hi - 1], ids[lo])) sample_swap(&ids[hi - 1], &ids[lo]);
        if (sample_before(pr, ids[mid], ids[hi - 1])) sample_swap(&ids[mid], &ids[hi - 1]);
        int32_t pivot = ids[hi - 1];
        int store = lo;
        double better = 0;
        for (int i = lo; i < hi - 1; i++) {
            if (sample_before(pr, ids[i], pivot)) {
                better += pr[ids[i]];
                sample_swap(&ids[i], &ids[store++]);
            }
        }
        sample_swap(&ids[store], &ids[hi - 1]);
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

/* The last kept token in rank order (the kept set's boundary). */
static int32_t sample_last_kept(const nb_sample_row *r, const float *pr, int V, int32_t *idx) {
    int k = r->top_k > 0 && r->top_k < V ? r->top_k : 0;
    if (k) {
        sample_top_k(pr, V, k, idx);
        int n = k;
        if (r->top_p < 1.0f) {
            double kept = 0;
            for (int i = 0; i < k; i++) kept += pr[idx[i]];
            int m = sample_top_p_len(pr, idx, k, (double)r->top_p * kept);
            if (m > 0) n = m;
        }
        /* min-p on a list sorted best first is a prefix cut */
        while (n > 1 && !(pr[idx[n - 1]] >= r->min_p && pr[idx[n - 1]] > 0)) n--;
        return idx[n - 1];
    }
    /* Zero-probability tokens can never be drawn, and tokens below min_p
     * are cut whatever top-p keeps, so both are dropped up front. The top
     * token (probability exactly 1) always survives. */
    int n = 0;
    double total = 0;
    for (int i = 0; i < V; i++) {
        total += pr[i];
        if (pr[i] >= r->min_p && pr[i] > 0) idx[n++] = i;
    }
    /* top-p's target is a share of the whole vocabulary's mass; when the
     * min-p survivors cannot reach it, min-p is the tighter filter. */
    if (r->top_p < 1.0f) n = sample_top_p_select(pr, idx, n, (double)r->top_p * total);
    int32_t last = idx[0];
    for (int i = 1; i < n; i++)
        if (sample_before(pr, last, idx[i])) last = idx[i];
    return last;
}

int32_t sample_row_ref(float *lg, int V, const nb_sample_row *r, float *pr, int32_t *idx) {
    sample_penalties(lg, V, r);
    int best = sample_argmax(lg, V);
    if (best < 0) return 0;
    float mx = lg[best];
    if (r->temperature < SAMPLE_GREEDY_EPS || isinf(mx)) return best;

    /* Probabilities relative to the top token (which gets exactly 1), so
     * min-p's "min_p * p_max" is simply min_p. exp in double, rounded once,
     * is the correctly rounded value nearly always, so a GPU computing the
     * same expression ranks tokens identically. */
    for (int i = 0; i < V; i++) pr[i] = isnan(lg[i]) ? 0.0f : (float)exp((double)((lg[i] - mx) / r->temperature));
    int32_t t = sample_last_kept(r, pr, V, idx);

    double mass = 0;
    for (int i = 0; i < V; i++)
        if (i == t || sample_before(pr, i, t)) mass += pr[i];
    double target = r->u * mass, acc = 0;
    int32_t last = t;
    for (int i = 0; i < V; i++) {
        if (i != t && !sample_before(pr, i, t)) continue;
        acc += pr[i];
        last = i;
        if (target < acc) return i;
    }
    return last; /* rounding left the target at the very top of the range */
}

/* ---- logprobs ---- */

float sample_logprobs_ref(const float *lg, int vocab, int32_t chosen, int n_top, int32_t *top_ids, float *top_lp) {
    int best = sample_argmax(lg, vocab);
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
        if (have == n_fill && !sample_before(lg, i, top_ids[have - 1])) continue;
        int j = have < n_fill ? have++ : have - 1;
        while (j > 0 && sample_before(lg, i, top_ids[j - 1])) {
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
