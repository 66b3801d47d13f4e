/* The HTTP side: libmicrohttpd with a pool of epoll workers. Generation
 * requests are handed to the engine loop and their connections suspended;
 * the loop resumes a connection when its request has something to send, so
 * no worker ever blocks waiting for tokens. */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "server/server_int.h"

/* Per connection: the request body as it arrives, then the request it
 * submitted (non-streaming: answered when the loop resumes us). */
typedef struct conn_ctx {
    char *data;
    size_t len, cap;
    int too_big;
    srv_req *r;
} conn_ctx;

/* A streaming response: SSE bytes produced but not yet handed to MHD. */
typedef struct stream_ctx {
    nb_server *s;
    srv_req *r;
    char *buf;
    size_t len, off;
    int ended;
} stream_ctx;

static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, cJSON *body) {
    char *text = cJSON_PrintUnformatted(body);
    cJSON_Delete(body);
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(resp, "Content-Type", "application/json");
    enum MHD_Result ret = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result send_error(struct MHD_Connection *c, unsigned status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static enum MHD_Result send_error(struct MHD_Connection *c, unsigned status, const char *param, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return send_json(c, status, response_error(status, param, msg));
}

/* The HTTP side lets go of r (under mu). */
static void release_req(nb_server *s, srv_req *r) {
    s->n_conns--;
    req_unref(r);
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    stream_ctx *x = cls;
    nb_server *s = x->s;
    if (x->off == x->len) {
        free(x->buf);
        x->buf = NULL;
        x->len = x->off = 0;
        if (x->ended) return MHD_CONTENT_READER_END_OF_STREAM;
        pthread_mutex_lock(&s->mu);
        x->ended = response_stream_next(s, x->r, &x->buf, &x->len);
        if (!x->len) {
            /* nothing new: sleep until the loop has tokens for us */
            x->r->suspended = 1;
            MHD_suspend_connection(x->r->conn);
            pthread_mutex_unlock(&s->mu);
            return 0;
        }
        pthread_mutex_unlock(&s->mu);
    }
    size_t n = x->len - x->off;
    if (n > max) n = max;
    memcpy(buf, x->buf + x->off, n);
    x->off += n;
    (void)pos;
    return (ssize_t)n;
}

/* The response is done or the client went away. */
static void stream_free(void *cls) {
    stream_ctx *x = cls;
    nb_server *s = x->s;
    pthread_mutex_lock(&s->mu);
    int cancel = !x->r->done;
    x->r->cancelled |= cancel;
    release_req(s, x->r);
    pthread_mutex_unlock(&s->mu);
    if (cancel) uv_async_send(&s->wake);
    free(x->buf);
    free(x);
}

static enum MHD_Result handle_generate(nb_server *s, struct MHD_Connection *c, conn_ctx *b, int chat) {
    srv_req *r = xcalloc(1, sizeof *r);
    r->chat = chat;
    r->created = time(NULL);
    r->t_start = util_now();
    r->refs = 1;
    req_error x = {0};
    if (request_parse(s, b->data ? b->data : "", b->len, r, &x)) {
        req_unref(r);
        return send_error(c, x.status, x.param, "%s", x.msg);
    }
    r->ch = xcalloc((size_t)r->n, sizeof *r->ch);
    for (int i = 0; i < r->n; i++) r->ch[i].dt = detok_create(s->tok, 1);
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    r->conn = c;
    r->fd = ci ? ci->connect_fd : -1;
    pthread_mutex_lock(&s->mu);
    if (s->stopping || s->n_live >= s->o.max_queue) {
        int stopping = s->stopping;
        req_unref(r);
        pthread_mutex_unlock(&s->mu);
        if (stopping) return send_error(c, 503, NULL, "the server is shutting down");
        return send_error(c, 429, NULL, "too many requests in flight (limit %d); retry later", s->o.max_queue);
    }
    s->n_live++;
    s->n_conns++;
    r->id = ++s->next_id;
    for (int i = 0; i < r->n; i++) r->ch[i].eng_id = r->id * SRV_MAX_N + (uint64_t)i;
    r->refs = 2; /* this connection and the engine loop */
    srv_req **tail = &s->pending;
    while (*tail) tail = &(*tail)->next;
    *tail = r;
    if (!r->stream) {
        b->r = r;
        r->suspended = 1;
        MHD_suspend_connection(c); /* before the loop can see r, so its resume never comes first */
        pthread_mutex_unlock(&s->mu);
        uv_async_send(&s->wake);
        return MHD_YES;
    }
    pthread_mutex_unlock(&s->mu);
    uv_async_send(&s->wake);
    stream_ctx *sx = xcalloc(1, sizeof *sx);
    sx->s = s;
    sx->r = r;
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_reader, sx, stream_free);
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* A suspended non-streaming request was resumed by the loop: answer it. */
static enum MHD_Result finish_generate(nb_server *s, struct MHD_Connection *c, conn_ctx *b) {
    srv_req *r = b->r;
    pthread_mutex_lock(&s->mu);
    if (!r->done) { /* not ours to answer yet */
        r->suspended = 1;
        MHD_suspend_connection(c);
        pthread_mutex_unlock(&s->mu);
        return MHD_YES;
    }
    cJSON *body = r->err[0] ? response_error(400, NULL, r->err) : response_full(s, r);
    unsigned status = r->err[0] ? 400 : MHD_HTTP_OK;
    b->r = NULL;
    release_req(s, r);
    pthread_mutex_unlock(&s->mu);
    return send_json(c, status, body);
}

/* vLLM's shapes: {"prompt": str} or {"messages": [...]} -> tokens, count. */
static enum MHD_Result handle_tokenize(nb_server *s, struct MHD_Connection *c, const conn_ctx *b) {
    cJSON *root = cJSON_ParseWithLength(b->data ? b->data : "", b->len);
    srv_req r = {0};
    req_error x = {0};
    int rc;
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return send_error(c, 400, NULL, "request body is not a valid JSON object");
    }
    if (cJSON_GetObjectItemCaseSensitive(root, "messages")) rc = request_parse_messages(s, root, &r, &x);
    else rc = request_parse_prompt(s, root, &r, &x);
    cJSON_Delete(root);
    if (rc) {
        free(r.prompt);
        return send_error(c, x.status, x.param, "%s", x.msg);
    }
    cJSON *out = cJSON_CreateObject(), *toks = cJSON_AddArrayToObject(out, "tokens");
    for (size_t i = 0; i < r.n_prompt; i++) cJSON_AddItemToArray(toks, cJSON_CreateNumber(r.prompt[i]));
    cJSON_AddNumberToObject(out, "count", (double)r.n_prompt);
    cJSON_AddNumberToObject(out, "max_model_len", model_config(s->m)->max_position);
    free(r.prompt);
    return send_json(c, MHD_HTTP_OK, out);
}

static enum MHD_Result handle_detokenize(nb_server *s, struct MHD_Connection *c, const conn_ctx *b) {
    cJSON *root = cJSON_ParseWithLength(b->data ? b->data : "", b->len);
    const cJSON *toks = cJSON_GetObjectItemCaseSensitive(root, "tokens");
    if (!cJSON_IsArray(toks)) {
        cJSON_Delete(root);
        return send_error(c, 400, "tokens", "'tokens' must be a list of token ids");
    }
    int n = cJSON_GetArraySize(toks), i = 0, V = tokenizer_vocab_size(s->tok);
    int32_t *ids = xmalloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    for (const cJSON *t = toks->child; t; t = t->next, i++) {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) || t->valuedouble < 0 || t->valuedouble >= V) {
            free(ids);
            cJSON_Delete(root);
            return send_error(c, 400, "tokens", "tokens[%d] is not a token id in [0, %d)", i, V);
        }
        ids[i] = (int32_t)t->valuedouble;
    }
    cJSON_Delete(root);
    char *text = tokenizer_decode(s->tok, ids, (size_t)n, 0);
    free(ids);
    cJSON *out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "prompt", text);
    free(text);
    return send_json(c, MHD_HTTP_OK, out);
}

static enum MHD_Result handle_metrics(nb_server *s, struct MHD_Connection *c) {
    char *buf = metrics_render(s);
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(buf), buf, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(resp, "Content-Type", "text/plain; version=0.0.4");
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result handle_models(nb_server *s, struct MHD_Connection *c) {
    cJSON *root = cJSON_CreateObject(), *data = cJSON_AddArrayToObject(root, "data");
    cJSON_AddStringToObject(root, "object", "list");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddStringToObject(m, "id", s->o.model_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)time(NULL));
    cJSON_AddStringToObject(m, "owned_by", "nibble");
    cJSON_AddNumberToObject(m, "max_model_len", model_config(s->m)->max_position);
    cJSON_AddItemToArray(data, m);
    return send_json(c, MHD_HTTP_OK, root);
}

static int authorized(const nb_server *s, struct MHD_Connection *c) {
    if (!s->o.api_key) return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    return h && !strncmp(h, "Bearer ", 7) && !strcmp(h + 7, s->o.api_key);
}

static enum MHD_Result answer(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                              const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    nb_server *s = cls;
    conn_ctx *b = *con_cls;
    if (!b) { /* first call: headers only */
        *con_cls = xcalloc(1, sizeof(conn_ctx));
        return MHD_YES;
    }
    if (*upload_size) {
        if (b->len + *upload_size > s->o.max_body) {
            b->too_big = 1;
        } else {
            if (b->len + *upload_size + 1 > b->cap) b->data = xrealloc(b->data, b->cap = (b->len + *upload_size + 1) * 2);
            memcpy(b->data + b->len, upload, *upload_size);
            b->len += *upload_size;
            b->data[b->len] = 0;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    (void)version;
    if (b->r) return finish_generate(s, c, b);
    int post = !strcmp(method, "POST"), get = !strcmp(method, "GET");
    if (b->too_big) return send_error(c, 413, NULL, "request body is larger than %zu bytes", s->o.max_body);
    if (!strcmp(url, "/health") && get) return send_json(c, MHD_HTTP_OK, cJSON_CreateObject());
    if (!strcmp(url, "/metrics") && get) return handle_metrics(s, c);
    if (!authorized(s, c)) return send_error(c, 401, NULL, "missing or wrong API key (Authorization: Bearer ...)");
    if (!strcmp(url, "/tokenize") && post) return handle_tokenize(s, c, b);
    if (!strcmp(url, "/detokenize") && post) return handle_detokenize(s, c, b);
    if (!strcmp(url, "/v1/models") && get) return handle_models(s, c);
    if (!strcmp(url, "/v1/completions") && post) return handle_generate(s, c, b, 0);
    if (!strcmp(url, "/v1/chat/completions") && post) return handle_generate(s, c, b, 1);
    if (!strcmp(url, "/v1/completions") || !strcmp(url, "/v1/chat/completions") || !strcmp(url, "/v1/models") ||
        !strcmp(url, "/health") || !strcmp(url, "/metrics") || !strcmp(url, "/tokenize") || !strcmp(url, "/detokenize"))
        return send_error(c, 405, NULL, "method %s not allowed on %s", method, url);
    return send_error(c, 404, NULL, "no route %s %s", method, url);
}

/* The connection is done with this request, answered or not. */
static void request_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode t) {
    nb_server *s = cls;
    conn_ctx *b = *con_cls;
    if (!b) return;
    if (b->r) { /* never answered: the client left or the daemon is stopping */
        pthread_mutex_lock(&s->mu);
        int cancel = !b->r->done;
        b->r->cancelled |= cancel;
        release_req(s, b->r);
        pthread_mutex_unlock(&s->mu);
        if (cancel) uv_async_send(&s->wake);
    }
    free(b->data);
    free(b);
    *con_cls = NULL;
    (void)c;
    (void)t;
}

int http_start(nb_server *s, nb_err *e) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->o.port)};
    if (inet_pton(AF_INET, s->o.host, &addr.sin_addr) != 1)
        return nb_errf(e, "--host %s is not an IPv4 address", s->o.host);
    s->daemon = MHD_start_daemon(MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG,
                                 (uint16_t)s->o.port, NULL, NULL, answer, s, MHD_OPTION_SOCK_ADDR, &addr,
                                 MHD_OPTION_THREAD_POOL_SIZE, (unsigned)s->o.http_threads,
                                 MHD_OPTION_CONNECTION_LIMIT, 4096u, MHD_OPTION_NOTIFY_COMPLETED, request_completed,
                                 s, MHD_OPTION_END);
    if (!s->daemon) return nb_errf(e, "cannot listen on %s:%d (in use or not permitted)", s->o.host, s->o.port);
    return 0;
}

void http_stop(nb_server *s) {
    if (s->daemon && s->listen_fd == MHD_INVALID_SOCKET) s->listen_fd = MHD_quiesce_daemon(s->daemon);
    if (s->daemon) MHD_stop_daemon(s->daemon);
    if (s->listen_fd != MHD_INVALID_SOCKET) close(s->listen_fd);
    s->daemon = NULL;
    s->listen_fd = MHD_INVALID_SOCKET;
}
