/* Tensor parallelism: the ranks of a model and the threads that drive them.
 *
 * Each rank is an nb_model with its share of the weights (model.c,
 * set_share) on its own backend of the group backend_create made; one
 * thread per rank issues its ops, so that the ranks' all-reduces meet. A
 * step is a job every rank runs at once: rank 0 on the caller's thread, the
 * others on theirs; the caller returns when all have finished. */
#include <pthread.h>
#include <stdlib.h>

#include "common/util.h"
#include "engine/model/model_int.h"

struct nb_tp {
    int n;
    nb_model **ranks; /* [n]; ranks[0] is rank 0's model itself */
    pthread_t *threads; /* [n]: ranks 1..n-1 */
    int n_started;      /* threads running: ranks 1..n_started */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    /* the job, under mu: a new one each time gen moves */
    void (*fn)(nb_model *r, void *arg);
    void *arg;
    unsigned gen;
    int pending; /* ranks 1.. still running the job */
    int quit;
};

typedef struct rank_arg {
    nb_tp *tp;
    int rank;
} rank_arg;

static void attach(nb_model *m) {
    if (m->be->ops->attach) m->be->ops->attach(m->be);
}

static void *rank_main(void *p) {
    nb_tp *tp = ((rank_arg *)p)->tp;
    nb_model *m = tp->ranks[((rank_arg *)p)->rank];
    free(p);
    attach(m);
    unsigned seen = 0;
    pthread_mutex_lock(&tp->mu);
    for (;;) {
        while (tp->gen == seen && !tp->quit) pthread_cond_wait(&tp->go, &tp->mu);
        if (tp->quit) break;
        seen = tp->gen;
        pthread_mutex_unlock(&tp->mu);
        tp->fn(m, tp->arg);
        pthread_mutex_lock(&tp->mu);
        if (--tp->pending == 0) pthread_cond_signal(&tp->done);
    }
    pthread_mutex_unlock(&tp->mu);
    return NULL;
}

nb_model *model_tp_rank(nb_model *m, int r) { return m->tp ? m->tp->ranks[r] : m; }

void model_tp_run(nb_model *m, void (*fn)(nb_model *r, void *arg), void *arg) {
    nb_tp *tp = m->tp;
    pthread_mutex_lock(&tp->mu);
    tp->fn = fn;
    tp->arg = arg;
    tp->pending = tp->n - 1;
    tp->gen++;
    pthread_cond_broadcast(&tp->go);
    pthread_mutex_unlock(&tp->mu);
    fn(m, arg);
    pthread_mutex_lock(&tp->mu);
    while (tp->pending) pthread_cond_wait(&tp->done, &tp->mu);
    pthread_mutex_unlock(&tp->mu);
}

int model_tp_start(nb_model *m, const nb_model_opts *opts, nb_err *e) {
    int n = m->n_ranks;
    nb_tp *tp = xcalloc(1, sizeof *tp);
    tp->n = n;
    tp->ranks = xcalloc((size_t)n, sizeof *tp->ranks);
    tp->threads = xcalloc((size_t)n, sizeof *tp->threads);
    tp->ranks[0] = m;
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->go, NULL);
    pthread_cond_init(&tp->done, NULL);
    m->tp = tp;
    /* the other ranks load one after another on this thread, each with its
     * backend attached */
    for (int r = 1; r < n; r++) {
        nb_model *p = xcalloc(1, sizeof *p);
        tp->ranks[r] = p;
        p->cfg = m->cfg;
        p->plan = m->plan;
        p->st = m->st;
        p->be = m->be->ranks[r];
        p->rank = r;
        p->n_ranks = n;
        attach(p);
        int rc = model_load_rank(p, opts, e);
        attach(m);
        if (rc) return nb_err_wrap(e, "rank %d", r);
    }
    for (int r = 1; r < n; r++) {
        rank_arg *a = xmalloc(sizeof *a);
        *a = (rank_arg){tp, r};
        if (pthread_create(&tp->threads[r], NULL, rank_main, a)) {
            free(a);
            return nb_errf(e, "cannot start the thread of rank %d", r);
        }
        tp->n_started = r;
    }
    return 0;
}

void model_tp_stop(nb_model *m) {
    nb_tp *tp = m->tp;
    pthread_mutex_lock(&tp->mu);
    tp->quit = 1;
    pthread_cond_broadcast(&tp->go);
    pthread_mutex_unlock(&tp->mu);
    for (int r = 1; r <= tp->n_started; r++) pthread_join(tp->threads[r], NULL);
    pthread_mutex_destroy(&tp->mu);
    pthread_cond_destroy(&tp->go);
    pthread_cond_destroy(&tp->done);
    for (int r = 1; r < tp->n; r++) {
        if (!tp->ranks[r]) continue;
        attach(tp->ranks[r]);
        model_free(tp->ranks[r]);
    }
    attach(m);
    free(tp->ranks);
    free(tp->threads);
    free(tp);
    m->tp = NULL;
}
