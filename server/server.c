/* The server's engine loop: a libuv loop that owns the batching engine.
 * HTTP workers (http.c) queue requests and wake it with uv_async; an idle
 * handle runs one engine step per turn while sequences are live, so new
 * requests, cancellations and signals are seen between steps; a timer polls
 * suspended connections for clients that went away; SIGINT/SIGTERM start a
 * drain that ends when the last request finishes or the grace period does. */
#include "server/server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "server/server_int.h"

/* Connections to resume once s->mu is released. */
typedef struct resume_list {
    struct MHD_Connection *c[64];
    int n;
} resume_list;

static void resume_all(nb_server *s, resume_list *l) {
    for (int i = 0; i < l->n; i++) MHD_resume_connection(l->c[i]);
    l->n = 0;
    (void)s;
}

/* Marks r's connection for resuming (under mu); flushes a full list first
 * by dropping and retaking the lock, which is safe: a suspended connection
 * stays until resumed, and only this thread resumes. */
static void wake_conn(nb_server *s, srv_req *r, resume_list *l) {
    if (!r->suspended) return;
    r->suspended = 0;
    if (l->n == (int)(sizeof l->c / sizeof l->c[0])) {
        pthread_mutex_unlock(&s->mu);
        resume_all(s, l);
        pthread_mutex_lock(&s->mu);
    }
    l->c[l->n++] = r->conn;
}

static void loop_close(nb_server *s);
static void loop_step_cb(uv_idle_t *h);

/* All choices are done (or the request failed): answer it (under mu). */
static void req_complete(nb_server *s, srv_req *r, const char *err, resume_list *l) {
    double now = util_now();
    size_t out = 0;
    for (int i = 0; i < r->n; i++) {
        srv_choice *c = &r->ch[i];
        size_t n;
        const char *tail = detok_flush(c->dt, &n);
        if (!c->stop_hit && n) {
            if (c->len + n + 1 > c->cap) c->text = xrealloc(c->text, c->cap = c->len + n + 1);
            memcpy(c->text + c->len, tail, n);
            c->text[c->len += n] = 0;
        }
        if (!c->done) {
            c->done = 1;
            c->fin = FINISH_ABORT;
        }
        out += c->n_out;
    }
    metrics_observe(s, r, now);
    log_info("request %llu: n %d, %zu prompt tokens, %zu output tokens, ttft %.3f s, %.3f s, %s%s%s",
             (unsigned long long)r->id, r->n, r->n_prompt, out, r->t_first > 0 ? r->t_first - r->t_start : 0.0,
             now - r->t_start, err ? "error" : finish_name(r->ch[0].fin), err ? ": " : "", err ? err : "");
    if (err) snprintf(r->err, sizeof r->err, "%s", err);
    r->done = 1;
    s->n_live--;
    wake_conn(s, r, l);
    req_unref(r);
    if (s->draining && s->n_live == 0) loop_close(s);
}

/* Removes r from the active list (under mu). */
static void unlink_active(nb_server *s, srv_req *r) {
    for (srv_req **pp = &s->active; *pp; pp = &(*pp)->next)
        if (*pp == r) {
            *pp = r->next;
            return;
        }
}

/* Ends every unfinished choice in the engine and completes r. */
static void req_abort(nb_server *s, srv_req *r, const char *err, resume_list *l) {
    for (int i = 0; r->added && i < r->n; i++)
        if (!r->ch[i].done) {
            engine_abort(s->eng, r->ch[i].eng_id);
            engine_release(s->eng, r->ch[i].eng_id);
        }
    if (r->added) unlink_active(s, r);
    req_complete(s, r, err, l);
}

/* Admits queued requests into the engine and applies cancellations. */
static void loop_service(nb_server *s) {
    resume_list l = {.n = 0};
    pthread_mutex_lock(&s->mu);
    while (s->pending) {
        srv_req *r = s->pending;
        s->pending = r->next;
        if (r->cancelled) {
            req_complete(s, r, NULL, &l);
            continue;
        }
        nb_err e = {{0}};
        int i = 0;
        for (; i < r->n; i++) {
            nb_gen_opts o = r->opts;
            o.sampling.seed += (uint64_t)i; /* n choices, n different draws */
            if (engine_add(s->eng, r->ch[i].eng_id, r->prompt, r->n_prompt, &o, &e)) break;
        }
        if (i < r->n) {
            while (i-- > 0) {
                engine_abort(s->eng, r->ch[i].eng_id);
                engine_release(s->eng, r->ch[i].eng_id);
            }
            req_complete(s, r, e.msg, &l);
            continue;
        }
        r->added = 1;
        r->next = s->active;
        s->active = r;
        s->prompt_tokens += r->n_prompt;
    }
    for (srv_req *r = s->active, *next; r; r = next) {
        next = r->next;
        if (r->cancelled) req_abort(s, r, NULL, &l);
    }
    if (s->active && !s->stepping && !uv_is_closing((uv_handle_t *)&s->stepper)) {
        s->stepping = 1;
        uv_idle_start(&s->stepper, loop_step_cb);
    }
    pthread_mutex_unlock(&s->mu);
    resume_all(s, &l);
}

static void choice_reserve(srv_choice *c, size_t n, int n_top) {
    if (n <= c->tok_cap) return;
    c->tok_cap = n * 2;
    c->ids = xrealloc(c->ids, sizeof(int32_t) * c->tok_cap);
    c->tok_end = xrealloc(c->tok_end, sizeof(size_t) * c->tok_cap);
    if (n_top >= 0) {
        c->lp = xrealloc(c->lp, sizeof(float) * c->tok_cap);
        c->top_lp = xrealloc(c->top_lp, sizeof(float) * c->tok_cap * (size_t)(n_top + 1));
        c->top_ids = xrealloc(c->top_ids, sizeof(int32_t) * c->tok_cap * (size_t)(n_top + 1));
    }
}

/* Cuts c's text at the first stop string that ends in the bytes from
 * `from` on; 1 if one matched. */
static int stop_match(const srv_req *r, srv_choice *c, size_t from) {
    size_t best = SIZE_MAX;
    for (int i = 0; i < r->n_stop; i++) {
        size_t l = strlen(r->stop[i]);
        for (size_t p = from >= l ? from - l + 1 : 0; p + l <= c->len; p++)
            if (!memcmp(c->text + p, r->stop[i], l)) {
                if (p < best) best = p;
                break;
            }
    }
    if (best == SIZE_MAX) return 0;
    c->len = best;
    c->text[best] = 0;
    c->stop_hit = 1;
    return 1;
}

/* Takes a choice's new tokens from the engine; 1 if it finished. */
static int choice_collect(nb_server *s, srv_req *r, srv_choice *c) {
    size_t n;
    nb_finish fin;
    const int32_t *toks = engine_output(s->eng, c->eng_id, &n, &fin);
    const int32_t *top_ids = NULL;
    const float *top_lp = NULL, *lp = r->opts.logprobs ? engine_output_logprobs(s->eng, c->eng_id, &top_ids, &top_lp)
                                                       : NULL;
    size_t before = c->len, k = (size_t)r->n_top;
    choice_reserve(c, n + 1, lp ? r->n_top : -1);
    s->generation_tokens += n - c->n_out;
    for (; c->n_out < n; c->n_out++) {
        size_t t = c->n_out, l;
        const char *piece = detok_push(c->dt, toks[t], &l);
        if (c->len + l + 1 > c->cap) c->text = xrealloc(c->text, c->cap = (c->len + l + 1) * 2);
        memcpy(c->text + c->len, piece, l);
        c->text[c->len += l] = 0;
        c->ids[t] = toks[t];
        c->tok_end[t] = c->len;
        if (lp) {
            c->lp[t] = lp[t];
            memcpy(c->top_lp + t * k, top_lp + t * k, sizeof(float) * k);
            memcpy(c->top_ids + t * k, top_ids + t * k, sizeof(int32_t) * k);
        }
    }
    if (n && r->t_first == 0) r->t_first = util_now();
    if (fin == FINISH_NONE && stop_match(r, c, before)) {
        engine_abort(s->eng, c->eng_id);
        fin = FINISH_STOP;
    }
    if (fin == FINISH_NONE) return 0;
    engine_release(s->eng, c->eng_id);
    c->done = 1;
    c->fin = fin;
    r->n_done++;
    return 1;
}

static void loop_step_cb(uv_idle_t *h) {
    nb_server *s = h->data;
    nb_err e = {{0}};
    int live = engine_step(s->eng, &e);
    if (live < 0) log_error("engine step: %s", e.msg);
    resume_list l = {.n = 0};
    pthread_mutex_lock(&s->mu);
    engine_stats(s->eng, &s->stats);
    for (srv_req *r = s->active, *next; r; r = next) {
        next = r->next;
        if (live < 0) {
            req_abort(s, r, e.msg, &l);
            continue;
        }
        int changed = 0;
        for (int i = 0; i < r->n; i++)
            if (!r->ch[i].done) {
                size_t before = r->ch[i].len;
                changed |= choice_collect(s, r, &r->ch[i]) || r->ch[i].len != before;
            }
        if (r->n_done == r->n) {
            unlink_active(s, r);
            req_complete(s, r, NULL, &l);
        } else if (changed && r->stream) {
            wake_conn(s, r, &l);
        }
    }
    if (!s->active && s->stepping) {
        s->stepping = 0;
        uv_idle_stop(&s->stepper);
    }
    pthread_mutex_unlock(&s->mu);
    resume_all(s, &l);
}

static void on_wake(uv_async_t *h) { loop_service(h->data); }

/* A suspended connection whose peer closed: readable with 0 bytes. */
static int hung_up(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    char peek;
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) &&
           recv(fd, &peek, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

static void on_watch(uv_timer_t *h) {
    nb_server *s = h->data;
    int any = 0;
    pthread_mutex_lock(&s->mu);
    for (int list = 0; list < 2; list++)
        for (srv_req *r = list ? s->active : s->pending; r; r = r->next)
            if (r->suspended && !r->cancelled && r->fd >= 0 && hung_up(r->fd)) any = r->cancelled = 1;
    pthread_mutex_unlock(&s->mu);
    if (any) loop_service(s);
}

/* The grace period is over (or a second signal came): cancel what is left. */
/* Answers every waiting and running request with a shutdown error (under
 * s->mu; the connections go on l to be resumed after unlocking). */
static void fail_all_locked(nb_server *s, resume_list *l) {
    while (s->pending) {
        srv_req *r = s->pending;
        s->pending = r->next;
        req_complete(s, r, "server shutting down", l);
    }
    while (s->active) req_abort(s, s->active, "server shutting down", l);
}

static void on_grace(uv_timer_t *h) {
    nb_server *s = h->data;
    resume_list l = {.n = 0};
    pthread_mutex_lock(&s->mu);
    s->left = s->n_live;
    fail_all_locked(s, &l);
    pthread_mutex_unlock(&s->mu);
    resume_all(s, &l);
    loop_close(s);
}

static void on_signal(uv_signal_t *h, int sig) {
    nb_server *s = h->data;
    if (s->draining) {
        log_warn("signal %d again: cancelling the requests in flight", sig);
        on_grace(&s->grace);
        return;
    }
    sd_notify(0, "STOPPING=1");
    if (s->listen_fd == MHD_INVALID_SOCKET) s->listen_fd = MHD_quiesce_daemon(s->daemon);
    pthread_mutex_lock(&s->mu);
    s->draining = s->stopping = 1;
    int live = s->n_live;
    pthread_mutex_unlock(&s->mu);
    log_info("signal %d: no new connections; draining %d requests for up to %.0f s", sig, live, s->grace_s);
    if (live == 0) loop_close(s);
    else uv_timer_start(&s->grace, on_grace, (uint64_t)(s->grace_s * 1000), 0);
}

static void loop_close(nb_server *s) {
    uv_handle_t *hs[] = {(uv_handle_t *)&s->wake,  (uv_handle_t *)&s->stepper, (uv_handle_t *)&s->watch,
                         (uv_handle_t *)&s->grace, (uv_handle_t *)&s->sigint,  (uv_handle_t *)&s->sigterm};
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++)
        if (!uv_is_closing(hs[i])) uv_close(hs[i], NULL);
}

nb_server *server_start(nb_model *m, const nb_tokenizer *tok, const nb_chat_template *ct, const nb_server_opts *o,
                        nb_err *e) {
    nb_server *s = xcalloc(1, sizeof *s);
    s->m = m;
    s->tok = tok;
    s->ct = ct;
    s->o = *o;
    if (!s->o.host) s->o.host = "127.0.0.1";
    if (!s->o.port) s->o.port = 8000;
    if (!s->o.max_body) s->o.max_body = 1 << 20;
    if (!s->o.model_name) s->o.model_name = "default";
    if (!s->o.max_queue) s->o.max_queue = 256;
    if (s->o.http_threads <= 0) s->o.http_threads = 4;
    s->listen_fd = MHD_INVALID_SOCKET;
    nb_engine_opts eo = {.max_num_seqs = o->max_num_seqs > 0 ? o->max_num_seqs : 16};
    if (!(s->eng = engine_create(m, &eo, e))) {
        free(s);
        return NULL;
    }
    pthread_mutex_init(&s->mu, NULL);
    uv_loop_init(&s->loop);
    uv_async_init(&s->loop, &s->wake, on_wake);
    uv_idle_init(&s->loop, &s->stepper);
    uv_timer_init(&s->loop, &s->watch);
    uv_timer_init(&s->loop, &s->grace);
    uv_signal_init(&s->loop, &s->sigint);
    uv_signal_init(&s->loop, &s->sigterm);
    s->wake.data = s->stepper.data = s->watch.data = s->grace.data = s->sigint.data = s->sigterm.data = s;
    if (http_start(s, e)) {
        server_stop(s);
        return NULL;
    }
    return s;
}

int server_run(nb_server *s, double grace_s) {
    s->grace_s = grace_s;
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_timer_start(&s->watch, on_watch, 20, 20);
    uv_async_send(&s->wake); /* requests that came before the loop ran */
    uv_run(&s->loop, UV_RUN_DEFAULT);
    return s->left;
}

void server_stop(nb_server *s) {
    if (!s) return;
    resume_list l = {.n = 0};
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    fail_all_locked(s, &l); /* requests that raced in after the loop ended */
    pthread_mutex_unlock(&s->mu);
    resume_all(s, &l);
    /* Let answered connections flush their last bytes before closing them. */
    pthread_mutex_lock(&s->mu);
    double until = util_now() + 2.0;
    while (s->n_conns > 0 && util_now() < until) {
        pthread_mutex_unlock(&s->mu);
        usleep(5000);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    http_stop(s);
    loop_close(s);
    uv_run(&s->loop, UV_RUN_DEFAULT); /* completes the closes */
    uv_loop_close(&s->loop);
    engine_free(s->eng);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
