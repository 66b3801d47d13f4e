#include "engine/engine.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "engine/block_manager.h"

enum { SEQ_WAITING, SEQ_RUNNING, SEQ_DONE };

typedef struct eseq {
    uint64_t id, arrival;
    int state;
    nb_finish finish;
    int32_t *tokens; /* prompt, then output */
    size_t n_tokens, n_prompt, n_computed; /* n_computed: tokens whose K/V are cached */
    int32_t *blocks;
    int n_blocks;
    int n_hashed;       /* leading blocks registered in the prefix cache */
    uint64_t last_hash; /* hash of block n_hashed - 1 */
    nb_gen_opts opts;
    nb_sampler *smp;
    float *lp, *top_lp; /* with opts.logprobs: [max_tokens], [max_tokens][logprobs - 1] */
    int32_t *top_ids;
} eseq;

struct nb_engine {
    nb_model *m;
    const nb_model_config *c;
    nb_block_manager *bm;
    int max_seqs, budget, max_blocks;
    eseq **seqs; /* every live request, in arrival order */
    int n_seqs, cap;
    uint64_t next_arrival, preemptions, steps, prefix_hit_tokens;
    /* step scratch */
    int32_t *tok, *pos, *slot, *seq_of, *rows, *tables;
    int32_t *ids;            /* sampled per logit row, when the backend samples */
    nb_sample_row *smp_rows; /* [S] those rows' sampling */
    eseq **batch_seq;
    int *take;
    float *logits;
    float *raw; /* one logits row kept before sampling edits it, for logprobs */
};

nb_engine *engine_create(nb_model *m, const nb_engine_opts *o, nb_err *e) {
    nb_engine *g = xcalloc(1, sizeof *g);
    g->m = m;
    g->c = model_config(m);
    g->bm = bm_create(model_num_kv_blocks(m));
    g->max_seqs = o && o->max_num_seqs > 0 ? o->max_num_seqs : 16;
    g->budget = model_max_batch_tokens(m);
    if (o && o->max_batch_tokens > 0 && o->max_batch_tokens < g->budget) g->budget = o->max_batch_tokens;
    if (g->budget < g->max_seqs) {
        nb_errf(e, "max_batch_tokens %d is below max_num_seqs %d: decode steps would not fit", g->budget, g->max_seqs);
        engine_free(g);
        return NULL;
    }
    if (model_max_logit_rows(m) < g->max_seqs) {
        nb_errf(e, "the model returns at most %d logit rows a step, below max_num_seqs %d", model_max_logit_rows(m),
                g->max_seqs);
        engine_free(g);
        return NULL;
    }
    g->max_blocks = (g->c->max_position + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    size_t T = (size_t)g->budget, S = (size_t)g->max_seqs;
    g->tok = xmalloc(sizeof(int32_t) * T);
    g->pos = xmalloc(sizeof(int32_t) * T);
    g->slot = xmalloc(sizeof(int32_t) * T);
    g->seq_of = xmalloc(sizeof(int32_t) * T);
    g->rows = xmalloc(sizeof(int32_t) * S);
    g->ids = xmalloc(sizeof(int32_t) * S);
    g->smp_rows = xmalloc(sizeof(nb_sample_row) * S);
    g->tables = xmalloc(sizeof(int32_t) * S * (size_t)g->max_blocks);
    g->batch_seq = xmalloc(sizeof(eseq *) * S);
    g->take = xmalloc(sizeof(int) * S);
    g->logits = xmalloc(sizeof(float) * S * (size_t)g->c->vocab_size);
    g->raw = xmalloc(sizeof(float) * (size_t)g->c->vocab_size);
    return g;
}

/* Gives the blocks back (cached ones stay findable until reused); the
 * sequence's K/V must be computed again. */
static void seq_free_blocks(nb_engine *g, eseq *s) {
    for (int i = 0; i < s->n_blocks; i++) bm_release(g->bm, s->blocks[i]);
    s->n_blocks = 0;
    s->n_computed = 0;
    s->n_hashed = 0;
    s->last_hash = 0;
}

/* Takes the cached blocks that hold this sequence's leading full blocks;
 * at least the last token is always left to compute, for its logits. */
static void prefix_lookup(nb_engine *g, eseq *s) {
    size_t full = (s->n_tokens - 1) / NB_KV_BLOCK_SIZE;
    for (size_t b = 0; b < full; b++) {
        uint64_t h = bm_block_hash(s->last_hash, s->tokens + b * NB_KV_BLOCK_SIZE, NB_KV_BLOCK_SIZE);
        int blk = bm_lookup(g->bm, h);
        if (blk < 0) break;
        s->blocks[s->n_blocks++] = blk;
        s->n_computed += NB_KV_BLOCK_SIZE;
        s->n_hashed++;
        s->last_hash = h;
        g->prefix_hit_tokens += NB_KV_BLOCK_SIZE;
    }
}

/* Registers the blocks this step completed. */
static void prefix_register(nb_engine *g, eseq *s) {
    while ((size_t)(s->n_hashed + 1) * NB_KV_BLOCK_SIZE <= s->n_computed) {
        uint64_t h = bm_block_hash(s->last_hash, s->tokens + (size_t)s->n_hashed * NB_KV_BLOCK_SIZE, NB_KV_BLOCK_SIZE);
        bm_register(g->bm, s->blocks[s->n_hashed], h);
        s->last_hash = h;
        s->n_hashed++;
    }
}

static void seq_destroy(nb_engine *g, eseq *s) {
    seq_free_blocks(g, s);
    sampler_free(s->smp);
    free(s->lp);
    free(s->top_lp);
    free(s->top_ids);
    free(s->tokens);
    free(s->blocks);
    free(s);
}

void engine_free(nb_engine *g) {
    if (!g) return;
    for (int i = 0; i < g->n_seqs; i++) seq_destroy(g, g->seqs[i]);
    free(g->seqs);
    bm_free(g->bm);
    free(g->tok);
    free(g->pos);
    free(g->slot);
    free(g->seq_of);
    free(g->rows);
    free(g->ids);
    free(g->smp_rows);
    free(g->tables);
    free(g->batch_seq);
    free(g->take);
    free(g->logits);
    free(g->raw);
    free(g);
}

static eseq *find(const nb_engine *g, uint64_t id, int *index) {
    for (int i = 0; i < g->n_seqs; i++)
        if (g->seqs[i]->id == id) {
            if (index) *index = i;
            return g->seqs[i];
        }
    return NULL;
}

int engine_add(nb_engine *g, uint64_t id, const int32_t *prompt, size_t n, const nb_gen_opts *o, nb_err *e) {
    if (find(g, id, NULL)) return nb_errf(e, "request %llu already exists", (unsigned long long)id);
    if (n == 0) return nb_errf(e, "empty prompt");
    if (o->max_tokens < 1) return nb_errf(e, "max_tokens must be at least 1");
    if (n + (size_t)o->max_tokens > (size_t)g->c->max_position)
        return nb_errf(e, "prompt (%zu tokens) + max_tokens (%d) exceeds the context length %d", n, o->max_tokens,
                       g->c->max_position);
    for (size_t i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= g->c->vocab_size)
            return nb_errf(e, "prompt token %d out of range [0, %d)", prompt[i], g->c->vocab_size);
    size_t blocks = (n + (size_t)o->max_tokens + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    if (blocks > (size_t)bm_num_total(g->bm))
        return nb_errf(e, "prompt + max_tokens needs %zu KV blocks; the cache has %d", blocks, bm_num_total(g->bm));
    if (sampling_params_validate(&o->sampling, e)) return -1;
    if (o->logprobs < 0 || o->logprobs > 21) return nb_errf(e, "logprobs must be in [0, 21], got %d", o->logprobs);
    eseq *s = xcalloc(1, sizeof *s);
    if (o->logprobs > 0) {
        size_t k = (size_t)o->logprobs - 1, T = (size_t)o->max_tokens;
        s->lp = xmalloc(sizeof(float) * T);
        s->top_lp = xmalloc(sizeof(float) * (T * k + 1));
        s->top_ids = xmalloc(sizeof(int32_t) * (T * k + 1));
    }
    s->id = id;
    s->arrival = g->next_arrival++;
    s->opts = *o;
    s->tokens = xmalloc(sizeof(int32_t) * (n + (size_t)o->max_tokens));
    memcpy(s->tokens, prompt, sizeof(int32_t) * n);
    s->n_tokens = s->n_prompt = n;
    s->blocks = xmalloc(sizeof(int32_t) * (size_t)g->max_blocks);
    s->smp = sampler_create(&o->sampling, g->c->vocab_size);
    sampler_add_prompt(s->smp, prompt, n);
    if (g->n_seqs == g->cap) g->seqs = xrealloc(g->seqs, sizeof(eseq *) * (size_t)(g->cap = g->cap ? 2 * g->cap : 16));
    g->seqs[g->n_seqs++] = s;
    return 0;
}

static void finish(nb_engine *g, eseq *s, nb_finish why) {
    s->state = SEQ_DONE;
    s->finish = why;
    seq_free_blocks(g, s);
}

void engine_abort(nb_engine *g, uint64_t id) {
    eseq *s = find(g, id, NULL);
    if (s && s->state != SEQ_DONE) finish(g, s, FINISH_ABORT);
}

void engine_release(nb_engine *g, uint64_t id) {
    int i;
    eseq *s = find(g, id, &i);
    if (!s) return;
    seq_destroy(g, s);
    memmove(g->seqs + i, g->seqs + i + 1, sizeof(eseq *) * (size_t)(g->n_seqs - i - 1));
    g->n_seqs--;
}

const int32_t *engine_output(const nb_engine *g, uint64_t id, size_t *n, nb_finish *fin) {
    eseq *s = find(g, id, NULL);
    if (!s) return NULL;
    *n = s->n_tokens - s->n_prompt;
    if (fin) *fin = s->finish;
    return s->tokens + s->n_prompt;
}

const float *engine_output_logprobs(const nb_engine *g, uint64_t id, const int32_t **top_ids, const float **top_lp) {
    eseq *s = find(g, id, NULL);
    if (!s || !s->lp) return NULL;
    *top_ids = s->top_ids;
    *top_lp = s->top_lp;
    return s->lp;
}

/* Blocks for positions [0, upto); 0, or -1 when the pool is short (the
 * blocks taken so far stay with the sequence). */
static int reserve(nb_engine *g, eseq *s, size_t upto) {
    int need = (int)((upto + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE);
    while (s->n_blocks < need) {
        int b = bm_alloc(g->bm);
        if (b < 0) return -1;
        s->blocks[s->n_blocks++] = b;
    }
    return 0;
}

/* Frees the blocks of the newest running sequence that arrived after
 * seqs[after] (older ones may already be in this step's batch); it
 * recomputes its prompt and output later, its sampler keeping its state. */
static eseq *preempt_newest(nb_engine *g, int after) {
    for (int i = g->n_seqs - 1; i > after; i--) {
        eseq *s = g->seqs[i];
        if (s->state != SEQ_RUNNING) continue;
        seq_free_blocks(g, s);
        s->n_computed = 0;
        s->state = SEQ_WAITING;
        g->preemptions++;
        return s;
    }
    return NULL;
}

/* Decides which sequences run this step and how many tokens each takes. */
static int schedule(nb_engine *g) {
    int nb = 0, left = g->budget;
    /* decode first: running sequences one token each, preempting the newest
     * when the pool cannot hold the next position */
    for (int i = 0; i < g->n_seqs && nb < g->max_seqs; i++) {
        eseq *s = g->seqs[i];
        if (s->state != SEQ_RUNNING || s->n_tokens - s->n_computed != 1) continue;
        while (reserve(g, s, s->n_computed + 1) && preempt_newest(g, i)) {}
        if (reserve(g, s, s->n_computed + 1)) {
            /* nothing left to preempt: this one waits for recompute itself */
            seq_free_blocks(g, s);
            s->n_computed = 0;
            s->state = SEQ_WAITING;
            g->preemptions++;
            continue;
        }
        g->batch_seq[nb] = s;
        g->take[nb++] = 1;
        left--;
    }
    /* then prefill chunks: running sequences mid-prompt, then waiting ones
     * in arrival order while blocks and slots last */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < g->n_seqs && nb < g->max_seqs && left > 0; i++) {
            eseq *s = g->seqs[i];
            if (pass == 0 ? !(s->state == SEQ_RUNNING && s->n_tokens - s->n_computed > 1) : s->state != SEQ_WAITING)
                continue;
            if (pass == 1 && s->n_blocks == 0) prefix_lookup(g, s);
            size_t rest = s->n_tokens - s->n_computed;
            int take = rest < (size_t)left ? (int)rest : left;
            if (reserve(g, s, s->n_computed + (size_t)take)) {
                /* take what the blocks already held allow, or stop admitting */
                int fit = s->n_blocks * NB_KV_BLOCK_SIZE - (int)s->n_computed;
                if (fit <= 0) {
                    if (s->state == SEQ_WAITING) seq_free_blocks(g, s);
                    break;
                }
                take = fit;
            }
            s->state = SEQ_RUNNING;
            g->batch_seq[nb] = s;
            g->take[nb++] = take;
            left -= take;
        }
    }
    return nb;
}

int engine_step(nb_engine *g, nb_err *e) {
    int nb = schedule(g);
    int n_tok = 0, n_rows = 0, on_backend = 0, wants_lp = 0;
    for (int b = 0; b < nb; b++) {
        eseq *s = g->batch_seq[b];
        memcpy(g->tables + (size_t)b * g->max_blocks, s->blocks, sizeof(int32_t) * (size_t)s->n_blocks);
        for (int t = 0; t < g->take[b]; t++, n_tok++) {
            size_t p = s->n_computed + (size_t)t;
            g->tok[n_tok] = s->tokens[p];
            g->pos[n_tok] = (int32_t)p;
            g->seq_of[n_tok] = b;
            g->slot[n_tok] = s->blocks[p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + (int32_t)(p % NB_KV_BLOCK_SIZE);
        }
        if (s->n_computed + (size_t)g->take[b] == s->n_tokens) {
            g->rows[n_rows++] = n_tok - 1;
            wants_lp |= s->lp != NULL;
        }
    }
    if (nb > 0) {
        nb_batch batch = {n_tok, g->pos, g->seq_of, g->slot, nb, g->max_blocks, g->tables};
        /* The backend samples where the logits are (only ids cross to the
         * host) unless a row wants logprobs, which need the whole row. */
        on_backend = n_rows > 0 && !wants_lp;
        if (on_backend) {
            int r = 0;
            for (int b = 0; b < nb; b++) {
                eseq *s = g->batch_seq[b];
                if (s->n_computed + (size_t)g->take[b] == s->n_tokens) sampler_row(s->smp, &g->smp_rows[r++]);
            }
        }
        if (on_backend ? model_forward_sample(g->m, g->tok, &batch, g->rows, n_rows, g->smp_rows, g->ids, e)
                       : model_forward(g->m, g->tok, &batch, g->rows, n_rows, g->logits, e))
            return -1;
        g->steps++;
    }
    int r = 0;
    for (int b = 0; b < nb; b++) {
        eseq *s = g->batch_seq[b];
        s->n_computed += (size_t)g->take[b];
        prefix_register(g, s);
        if (s->n_computed != s->n_tokens) continue;
        int32_t id;
        if (on_backend) {
            id = g->ids[r++];
        } else {
            float *lg = g->logits + (size_t)r++ * g->c->vocab_size;
            if (s->lp) memcpy(g->raw, lg, sizeof(float) * (size_t)g->c->vocab_size);
            id = sampler_sample(s->smp, lg);
        }
        if (s->lp) {
            size_t t = s->n_tokens - s->n_prompt, k = (size_t)s->opts.logprobs - 1;
            s->lp[t] = sample_logprobs_ref(g->raw, g->c->vocab_size, id, (int)k, s->top_ids + t * k, s->top_lp + t * k);
        }
        sampler_accept(s->smp, id);
        s->tokens[s->n_tokens++] = id;
        int stop_id = 0;
        for (int k = 0; k < s->opts.n_stop_ids; k++) stop_id |= s->opts.stop_ids[k] == id;
        if (stop_id || (!s->opts.ignore_eos && config_is_eos(g->c, id))) finish(g, s, FINISH_STOP);
        else if (s->n_tokens - s->n_prompt >= (size_t)s->opts.max_tokens) finish(g, s, FINISH_LENGTH);
    }
    int live = 0;
    for (int i = 0; i < g->n_seqs; i++) live += g->seqs[i]->state != SEQ_DONE;
    return live;
}

void engine_stats(const nb_engine *g, nb_engine_stats *st) {
    memset(st, 0, sizeof *st);
    for (int i = 0; i < g->n_seqs; i++) {
        st->running += g->seqs[i]->state == SEQ_RUNNING;
        st->waiting += g->seqs[i]->state == SEQ_WAITING;
    }
    st->kv_blocks_total = bm_num_total(g->bm);
    st->kv_blocks_used = st->kv_blocks_total - bm_num_free(g->bm);
    st->preemptions = g->preemptions;
    st->prefix_hit_tokens = g->prefix_hit_tokens;
    st->steps = g->steps;
}
