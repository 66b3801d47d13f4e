/* The OpenAI-compatible HTTP daemon: libmicrohttpd (a pool of epoll worker
 * threads) in front of one libuv engine loop running continuous batching. */
#ifndef NB_SERVER_H
#define NB_SERVER_H

#include "common/err.h"
#include "engine/model/chat_template.h"
#include "engine/model/model.h"
#include "engine/model/tokenizer.h"

typedef struct nb_server nb_server;

typedef struct nb_server_opts {
    const char *host;       /* default 127.0.0.1 */
    int port;               /* default 8000 */
    const char *model_name; /* the id /v1/models reports and requests may name */
    int max_num_seqs;       /* default 16 */
    size_t max_body;        /* request body limit in bytes (default 1 MiB) */
    const char *api_key;    /* when set, requests need "Authorization: Bearer KEY" */
    int max_queue;          /* requests in flight before new ones get 429 (default 256) */
    int http_threads;       /* libmicrohttpd worker threads (default 4) */
} nb_server_opts;

/* Starts serving; the model, tokenizer and template stay owned by the caller
 * and must outlive the server. */
nb_server *server_start(nb_model *m, const nb_tokenizer *tok, const nb_chat_template *ct, const nb_server_opts *o,
                        nb_err *e);
/* Runs the engine loop on the calling thread until SIGINT or SIGTERM: then
 * stops accepting connections (systemd hears STOPPING=1), lets the requests
 * in flight finish for up to grace_s seconds and cancels the rest (a second
 * signal cancels at once). Returns how many requests were cancelled. */
int server_run(nb_server *s, double grace_s);
/* Cancels what is in flight, stops the HTTP workers, frees the server. */
void server_stop(nb_server *s);

#endif
