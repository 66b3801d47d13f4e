/* Internal to the server files: the request and server state shared by the
 * HTTP worker threads (http.c) and the engine loop (server.c), request
 * parsing (request.c), response bodies (response.c) and /metrics
 * (metrics.c).
 *
 * Threads: libmicrohttpd runs a pool of epoll workers; the engine loop is a
 * libuv loop on the thread that calls server_run. A request is handed over
 * under s->mu; the worker then suspends its connection and the loop resumes
 * it when there is something to send. Connections are resumed only by the
 * loop thread and only after s->mu is released. */
#ifndef NB_SERVER_INT_H
#define NB_SERVER_INT_H

#include <cjson/cJSON.h>
#include <microhttpd.h>
#include <pthread.h>
#include <time.h>
#include <uv.h>

#include "engine/engine.h"
#include "server/server.h"

#define SRV_MAX_N 64 /* choices per request */

/* A Prometheus histogram with fixed upper bounds (seconds). */
#define HIST_BUCKETS 11
typedef struct nb_histogram {
    uint64_t count[HIST_BUCKETS + 1]; /* last: +Inf */
    uint64_t n;
    double sum;
} nb_histogram;

/* One of a request's n choices: one engine sequence. Under s->mu. */
typedef struct srv_choice {
    uint64_t eng_id;
    char *text; /* detokenized output so far (cut at a stop string) */
    size_t len, cap;
    size_t n_out;      /* tokens taken from the engine */
    int32_t *ids;      /* those tokens */
    size_t *tok_end;   /* text length once token i was added */
    float *lp, *top_lp; /* with logprobs: per token, and n_top per token */
    int32_t *top_ids;
    size_t tok_cap;
    size_t sent, sent_tok; /* stream progress: bytes and tokens sent */
    int stop_hit, done, fin_sent;
    nb_finish fin;
    nb_detok *dt;
} srv_choice;

typedef struct srv_req {
    uint64_t id;
    int chat, stream, include_usage, n;
    char *stop[4]; /* stop strings: output ends before the first match */
    int n_stop;
    size_t stop_hold; /* longest stop string - 1: bytes a stream holds back */
    int n_top;        /* logprob alternatives per token (opts.logprobs - 1) */
    double t_start, t_first;
    int32_t *prompt;
    size_t n_prompt;
    nb_gen_opts opts;
    time_t created;
    /* below: under s->mu */
    srv_choice *ch; /* [n] */
    int n_done;     /* choices finished */
    int added;      /* its sequences are in the engine */
    int done, cancelled, stage, refs;
    char err[256];
    struct MHD_Connection *conn;
    int fd;        /* the connection's socket, polled for hang-ups while suspended */
    int suspended; /* conn is suspended, waiting for the loop */
    struct srv_req *next;
} srv_req;

struct nb_server {
    struct MHD_Daemon *daemon;
    nb_model *m;
    const nb_tokenizer *tok;
    const nb_chat_template *ct;
    nb_server_opts o;
    nb_engine *eng; /* touched by the loop thread only */
    uv_loop_t loop;
    uv_async_t wake; /* new requests, cancellations */
    uv_idle_t stepper; /* runs engine steps while there is work */
    uv_timer_t watch;  /* polls suspended connections for hang-ups */
    uv_timer_t grace;  /* ends the drain */
    uv_signal_t sigint, sigterm;
    int stepping, draining;
    double grace_s;
    int left; /* requests cancelled when the grace period ran out */
    pthread_mutex_t mu;
    int stopping;           /* no new generation requests (503) */
    srv_req *pending, *active;
    uint64_t next_id;
    int n_live;  /* submitted, not yet finished */
    int n_conns; /* connections holding a request */
    MHD_socket listen_fd; /* after quiescing, closed once the daemon stopped */
    /* for /metrics, written by the loop under mu */
    nb_engine_stats stats;
    uint64_t prompt_tokens, generation_tokens, requests_done;
    nb_histogram ttft, tpot;
};

typedef struct req_error {
    unsigned status;
    const char *param;
    char msg[400];
} req_error;

/* request.c: fills r (prompt, options, n, stream flags) from a completion or
 * chat request body, or returns -1 with the HTTP status and message in x. */
int request_parse(const nb_server *s, const char *body, size_t len, srv_req *r, req_error *x);
int request_parse_prompt(const nb_server *s, const cJSON *root, srv_req *r, req_error *x);
int request_parse_messages(const nb_server *s, const cJSON *root, srv_req *r, req_error *x);
/* Drops one reference (under mu); the last frees r and its choices. */
void req_unref(srv_req *r);

/* http.c: the libmicrohttpd daemon. */
int http_start(nb_server *s, nb_err *e);
void http_stop(nb_server *s);

/* response.c (under s->mu): bodies as OpenAI shapes them. */
const char *finish_name(nb_finish f);
cJSON *response_error(unsigned status, const char *param, const char *msg);
cJSON *response_full(const nb_server *s, const srv_req *r);
/* Appends every SSE event that is ready to *buf (malloc'd, grows); returns
 * 1 when the stream has ended (after data: [DONE]). */
int response_stream_next(const nb_server *s, srv_req *r, char **buf, size_t *len);

/* metrics.c */
void metrics_observe(nb_server *s, const srv_req *r, double now); /* under mu */
char *metrics_render(nb_server *s);                                /* takes mu */

#endif
