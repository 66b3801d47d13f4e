/* /metrics: Prometheus text format, counters and latency histograms. */
#include <stdio.h>
#include <stdlib.h>

#include "common/util.h"
#include "server/server_int.h"

static const double TTFT_BOUNDS[HIST_BUCKETS] = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
static const double TPOT_BOUNDS[HIST_BUCKETS] = {0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5};

static void hist_add(nb_histogram *h, const double *bounds, double v) {
    int i = 0;
    while (i < HIST_BUCKETS && v > bounds[i]) i++;
    h->count[i]++;
    h->n++;
    h->sum += v;
}

/* Appends the histogram at buf + *len. */
static void hist_print(char *buf, size_t cap, size_t *len, const char *name, const nb_histogram *h,
                       const double *bounds) {
    uint64_t cum = 0;
    *len += (size_t)snprintf(buf + *len, cap - *len, "# TYPE %s histogram\n", name);
    for (int i = 0; i <= HIST_BUCKETS && *len < cap; i++) {
        cum += h->count[i];
        if (i < HIST_BUCKETS)
            *len += (size_t)snprintf(buf + *len, cap - *len, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i],
                                     (unsigned long long)cum);
        else
            *len += (size_t)snprintf(buf + *len, cap - *len, "%s_bucket{le=\"+Inf\"} %llu\n", name,
                                     (unsigned long long)cum);
    }
    if (*len < cap)
        *len += (size_t)snprintf(buf + *len, cap - *len, "%s_sum %.6f\n%s_count %llu\n", name, h->sum, name,
                                 (unsigned long long)h->n);
}

void metrics_observe(nb_server *s, const srv_req *r, double now) {
    size_t out = 0;
    for (int i = 0; i < r->n; i++)
        if (r->ch[i].n_out > out) out = r->ch[i].n_out;
    if (out > 0 && r->t_first > 0) hist_add(&s->ttft, TTFT_BOUNDS, r->t_first - r->t_start);
    if (out > 1 && r->t_first > 0) hist_add(&s->tpot, TPOT_BOUNDS, (now - r->t_first) / (double)(out - 1));
    s->requests_done++;
}

char *metrics_render(nb_server *s) {
    size_t cap = 8192, len = 0;
    char *buf = xmalloc(cap);
    pthread_mutex_lock(&s->mu);
    int waiting = s->stats.waiting;
    for (const srv_req *r = s->pending; r; r = r->next) waiting += r->n;
    len = (size_t)snprintf(buf, cap,
             "# TYPE nibble_requests_running gauge\nnibble_requests_running %d\n"
             "# TYPE nibble_requests_waiting gauge\nnibble_requests_waiting %d\n"
             "# TYPE nibble_kv_blocks_used gauge\nnibble_kv_blocks_used %d\n"
             "# TYPE nibble_kv_blocks_total gauge\nnibble_kv_blocks_total %d\n"
             "# TYPE nibble_prompt_tokens_total counter\nnibble_prompt_tokens_total %llu\n"
             "# TYPE nibble_generation_tokens_total counter\nnibble_generation_tokens_total %llu\n"
             "# TYPE nibble_requests_finished_total counter\nnibble_requests_finished_total %llu\n"
             "# TYPE nibble_preemptions_total counter\nnibble_preemptions_total %llu\n"
             "# TYPE nibble_prefix_cache_hit_tokens_total counter\nnibble_prefix_cache_hit_tokens_total %llu\n",
             s->stats.running, waiting, s->stats.kv_blocks_used, s->stats.kv_blocks_total,
             (unsigned long long)s->prompt_tokens, (unsigned long long)s->generation_tokens,
             (unsigned long long)s->requests_done, (unsigned long long)s->stats.preemptions,
             (unsigned long long)s->stats.prefix_hit_tokens);
    hist_print(buf, cap, &len, "nibble_time_to_first_token_seconds", &s->ttft, TTFT_BOUNDS);
    hist_print(buf, cap, &len, "nibble_time_per_output_token_seconds", &s->tpot, TPOT_BOUNDS);
    pthread_mutex_unlock(&s->mu);
    return buf;
}
