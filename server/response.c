/* Response bodies shaped as OpenAI's: completion and chat objects, SSE chunk
 * streams, logprobs, errors. Called under the server mutex. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "server/server_int.h"

const char *finish_name(nb_finish f) { return f == FINISH_STOP ? "stop" : f == FINISH_LENGTH ? "length" : "abort"; }

/* {"error": {"message", "type", "param", "code"}} */
cJSON *response_error(unsigned status, const char *param, const char *msg) {
    cJSON *root = cJSON_CreateObject(), *err = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(err, "message", msg);
    cJSON_AddStringToObject(err, "type", status == 404   ? "NotFoundError"
                                         : status == 401 ? "AuthenticationError"
                                         : status == 429 ? "RateLimitError"
                                         : status >= 500 ? "InternalServerError"
                                                         : "BadRequestError");
    if (param) cJSON_AddStringToObject(err, "param", param);
    else cJSON_AddNullToObject(err, "param");
    cJSON_AddNumberToObject(err, "code", status);
    return root;
}

static cJSON *envelope(const nb_server *s, const srv_req *r, int chunk) {
    cJSON *root = cJSON_CreateObject();
    char id[48];
    snprintf(id, sizeof id, "%s-%llu", r->chat ? "chatcmpl" : "cmpl", (unsigned long long)r->id);
    cJSON_AddStringToObject(root, "id", id);
    cJSON_AddStringToObject(root, "object", r->chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                                    : "text_completion");
    cJSON_AddNumberToObject(root, "created", (double)r->created);
    cJSON_AddStringToObject(root, "model", s->o.model_name);
    return root;
}

static void add_usage(cJSON *root, const srv_req *r) {
    size_t out = 0;
    for (int i = 0; i < r->n; i++) out += r->ch[i].n_out;
    cJSON *u = cJSON_AddObjectToObject(root, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", (double)r->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", (double)out);
    cJSON_AddNumberToObject(u, "total_tokens", (double)(r->n_prompt + out));
}

static char *token_str(const nb_server *s, int32_t id) { return tokenizer_decode(s->tok, &id, 1, 0); }

static cJSON *bytes_of(const char *t) {
    cJSON *b = cJSON_CreateArray();
    for (const unsigned char *p = (const unsigned char *)t; *p; p++) cJSON_AddItemToArray(b, cJSON_CreateNumber(*p));
    return b;
}

static size_t tok_start(const srv_choice *c, size_t t) { return t ? c->tok_end[t - 1] : 0; }

/* Tokens [t0, t1) of a choice as OpenAI's logprobs object: the legacy
 * completions shape or chat's content list. */
static cJSON *logprobs_json(const nb_server *s, const srv_req *r, const srv_choice *c, size_t t0, size_t t1) {
    cJSON *root = cJSON_CreateObject();
    size_t k = (size_t)r->n_top;
    if (r->chat) {
        cJSON *content = cJSON_AddArrayToObject(root, "content");
        for (size_t t = t0; t < t1; t++) {
            cJSON *e = cJSON_CreateObject(), *tops = cJSON_CreateArray();
            char *str = token_str(s, c->ids[t]);
            cJSON_AddStringToObject(e, "token", str);
            cJSON_AddNumberToObject(e, "logprob", c->lp[t]);
            cJSON_AddItemToObject(e, "bytes", bytes_of(str));
            free(str);
            for (size_t j = 0; j < k; j++) {
                int32_t id = c->top_ids[t * k + j];
                if (id < 0) continue;
                cJSON *a = cJSON_CreateObject();
                char *ts = token_str(s, id);
                cJSON_AddStringToObject(a, "token", ts);
                cJSON_AddNumberToObject(a, "logprob", c->top_lp[t * k + j]);
                cJSON_AddItemToObject(a, "bytes", bytes_of(ts));
                free(ts);
                cJSON_AddItemToArray(tops, a);
            }
            cJSON_AddItemToObject(e, "top_logprobs", tops);
            cJSON_AddItemToArray(content, e);
        }
        return root;
    }
    cJSON *tokens = cJSON_AddArrayToObject(root, "tokens"), *tlp = cJSON_AddArrayToObject(root, "token_logprobs");
    cJSON *tops = cJSON_AddArrayToObject(root, "top_logprobs"), *off = cJSON_AddArrayToObject(root, "text_offset");
    for (size_t t = t0; t < t1; t++) {
        char *str = token_str(s, c->ids[t]);
        cJSON_AddItemToArray(tokens, cJSON_CreateString(str));
        free(str);
        cJSON_AddItemToArray(tlp, cJSON_CreateNumber(c->lp[t]));
        cJSON_AddItemToArray(off, cJSON_CreateNumber((double)tok_start(c, t)));
        cJSON *m = cJSON_CreateObject();
        for (size_t j = 0; j < k; j++) {
            int32_t id = c->top_ids[t * k + j];
            if (id < 0) continue;
            char *ts = token_str(s, id);
            if (!cJSON_GetObjectItemCaseSensitive(m, ts)) cJSON_AddNumberToObject(m, ts, c->top_lp[t * k + j]);
            free(ts);
        }
        cJSON_AddItemToArray(tops, m);
    }
    return root;
}

/* Tokens that belong to the final text: all of them, unless a stop string
 * cut the text, then those that start before the cut. */
static size_t kept_tokens(const srv_choice *c) {
    size_t t = c->n_out;
    if (c->stop_hit)
        while (t > 0 && tok_start(c, t - 1) >= c->len) t--;
    return t;
}

cJSON *response_full(const nb_server *s, const srv_req *r) {
    cJSON *root = envelope(s, r, 0), *choices = cJSON_AddArrayToObject(root, "choices");
    for (int i = 0; i < r->n; i++) {
        const srv_choice *c = &r->ch[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddNumberToObject(ch, "index", i);
        if (r->chat) {
            cJSON *msg = cJSON_AddObjectToObject(ch, "message");
            cJSON_AddStringToObject(msg, "role", "assistant");
            cJSON_AddStringToObject(msg, "content", c->text ? c->text : "");
        } else {
            cJSON_AddStringToObject(ch, "text", c->text ? c->text : "");
        }
        if (c->lp) cJSON_AddItemToObject(ch, "logprobs", logprobs_json(s, r, c, 0, kept_tokens(c)));
        else cJSON_AddNullToObject(ch, "logprobs");
        cJSON_AddStringToObject(ch, "finish_reason", finish_name(c->fin));
        cJSON_AddItemToArray(choices, ch);
    }
    add_usage(root, r);
    return root;
}

/* Appends "data: <json>\n\n" for root (consumed). */
static void sse_append(char **buf, size_t *len, cJSON *root) {
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    size_t n = strlen(json);
    *buf = xrealloc(*buf, *len + n + 9);
    memcpy(*buf + *len, "data: ", 6);
    memcpy(*buf + *len + 6, json, n);
    memcpy(*buf + *len + 6 + n, "\n\n", 3);
    *len += n + 8;
    free(json);
}

/* One chunk of choice i: a role announcement, text with the logprobs of
 * tokens [t0, t1), or (fin) the finish reason. */
static void chunk_append(const nb_server *s, const srv_req *r, int i, const char *text, size_t n, size_t t0,
                         size_t t1, int role, int fin, char **buf, size_t *len) {
    const srv_choice *c = &r->ch[i];
    cJSON *root = envelope(s, r, 1), *choices = cJSON_AddArrayToObject(root, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", i);
    char *piece = xstrndup(text ? text : "", n);
    if (r->chat) {
        cJSON *d = cJSON_AddObjectToObject(ch, "delta");
        if (role) cJSON_AddStringToObject(d, "role", "assistant");
        if (text) cJSON_AddStringToObject(d, "content", piece);
    } else {
        cJSON_AddStringToObject(ch, "text", piece);
    }
    free(piece);
    if (c->lp && t1 > t0) cJSON_AddItemToObject(ch, "logprobs", logprobs_json(s, r, c, t0, t1));
    else cJSON_AddNullToObject(ch, "logprobs");
    if (fin) cJSON_AddStringToObject(ch, "finish_reason", finish_name(c->fin));
    else cJSON_AddNullToObject(ch, "finish_reason");
    cJSON_AddItemToArray(choices, ch);
    sse_append(buf, len, root);
}

/* Bytes of choice c that can go out now: a stream holds back what could
 * still become a stop string, and never splits a UTF-8 sequence. */
static size_t safe_len(const srv_req *r, const srv_choice *c) {
    if (c->done) return c->len;
    size_t safe = c->len < r->stop_hold ? 0 : c->len - r->stop_hold;
    while (safe > c->sent && safe < c->len && ((unsigned char)c->text[safe] & 0xc0) == 0x80) safe--;
    return safe;
}

int response_stream_next(const nb_server *s, srv_req *r, char **buf, size_t *len) {
    if (r->stage == 0) {
        r->stage = 1;
        for (int i = 0; r->chat && i < r->n; i++) chunk_append(s, r, i, NULL, 0, 0, 0, 1, 0, buf, len);
    }
    if (r->stage == 1 && r->done && r->err[0]) {
        cJSON *root = response_error(400, NULL, r->err);
        sse_append(buf, len, root);
        r->stage = 3;
    }
    if (r->stage == 1) {
        int all = 1;
        for (int i = 0; i < r->n; i++) {
            srv_choice *c = &r->ch[i];
            size_t safe = safe_len(r, c), t1 = c->sent_tok;
            if (c->sent < safe) {
                while (t1 < c->n_out && c->tok_end[t1] <= safe) t1++;
                if (c->done) t1 = kept_tokens(c);
                chunk_append(s, r, i, c->text + c->sent, safe - c->sent, c->sent_tok, t1, 0, 0, buf, len);
                c->sent = safe;
                c->sent_tok = t1;
            }
            if (c->done && !c->fin_sent) {
                size_t kept = kept_tokens(c);
                chunk_append(s, r, i, NULL, 0, c->sent_tok, kept > c->sent_tok ? kept : c->sent_tok, 0, 1, buf,
                             len);
                c->sent_tok = kept;
                c->fin_sent = 1;
            }
            all &= c->fin_sent;
        }
        if (all) r->stage = 2;
    }
    if (r->stage == 2) {
        /* stream_options.include_usage: one more chunk, with no choices */
        r->stage = 3;
        if (r->include_usage) {
            cJSON *root = envelope(s, r, 1);
            cJSON_AddArrayToObject(root, "choices");
            add_usage(root, r);
            sse_append(buf, len, root);
        }
    }
    if (r->stage == 3) {
        r->stage = 4;
        const char *done = "data: [DONE]\n\n";
        *buf = xrealloc(*buf, *len + strlen(done) + 1);
        memcpy(*buf + *len, done, strlen(done) + 1);
        *len += strlen(done);
    }
    return r->stage == 4;
}
