/* Request bodies: every field checked, an OpenAI-style message naming the
 * field on the first problem. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "server/server_int.h"

void req_unref(srv_req *r) {
    if (--r->refs > 0) return;
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    for (int i = 0; r->ch && i < r->n; i++) {
        srv_choice *c = &r->ch[i];
        detok_free(c->dt);
        free(c->text);
        free(c->ids);
        free(c->tok_end);
        free(c->lp);
        free(c->top_lp);
        free(c->top_ids);
    }
    free(r->ch);
    free(r->prompt);
    free(r);
}

static int fail(req_error *x, unsigned status, const char *param, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(req_error *x, unsigned status, const char *param, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->msg, sizeof x->msg, fmt, ap);
    va_end(ap);
    x->status = status;
    x->param = param;
    return -1;
}

/* Reads an optional number field within [lo, hi]. */
static int num_field(const cJSON *root, const char *key, double lo, double hi, int integer, double *out, req_error *x) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return fail(x, 400, key, "'%s' must be a number", key);
    if (integer && v->valuedouble != floor(v->valuedouble)) return fail(x, 400, key, "'%s' must be an integer", key);
    if (v->valuedouble < lo || v->valuedouble > hi)
        return fail(x, 400, key, "'%s' must be in [%g, %g], got %g", key, lo, hi, v->valuedouble);
    *out = v->valuedouble;
    return 1;
}

static int bool_field(const cJSON *root, const char *key, int *out, req_error *x) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) return 0;
    if (!cJSON_IsBool(v)) return fail(x, 400, key, "'%s' must be true or false", key);
    *out = cJSON_IsTrue(v);
    return 0;
}

int request_parse_prompt(const nb_server *s, const cJSON *root, srv_req *r, req_error *x) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    nb_err e;
    if (cJSON_IsString(p)) {
        if (tokenizer_encode(s->tok, p->valuestring, strlen(p->valuestring), 1, &r->prompt, &r->n_prompt, &e))
            return fail(x, 400, "prompt", "%s", e.msg);
    } else if (cJSON_IsArray(p)) {
        int n = cJSON_GetArraySize(p);
        r->prompt = xmalloc(sizeof(int32_t) * (size_t)(n ? n : 1));
        for (const cJSON *t = p->child; t; t = t->next) {
            if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) || t->valuedouble < 0 ||
                t->valuedouble >= model_config(s->m)->vocab_size)
                return fail(x, 400, "prompt", "'prompt' token ids must be integers in [0, %d)", model_config(s->m)->vocab_size);
            r->prompt[r->n_prompt++] = (int32_t)t->valuedouble;
        }
    } else {
        return fail(x, 400, "prompt", "'prompt' must be a string or a list of token ids");
    }
    if (r->n_prompt == 0) return fail(x, 400, "prompt", "'prompt' is empty");
    return 0;
}

int request_parse_messages(const nb_server *s, const cJSON *root, srv_req *r, req_error *x) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    if (!cJSON_IsArray(msgs)) return fail(x, 400, "messages", "'messages' must be a list");
    int n = cJSON_GetArraySize(msgs);
    if (n == 0) return fail(x, 400, "messages", "'messages' is empty");
    nb_chat_msg *m = xcalloc((size_t)n, sizeof *m);
    int i = 0, rc = 0;
    for (const cJSON *it = msgs->child; it; it = it->next, i++) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!cJSON_IsObject(it) || !cJSON_IsString(role) || !cJSON_IsString(content)) {
            rc = fail(x, 400, "messages", "messages[%d] needs a string 'role' and a string 'content'", i);
            break;
        }
        m[i] = (nb_chat_msg){role->valuestring, content->valuestring};
    }
    nb_err e;
    char *text = rc ? NULL : chat_template_render(s->ct, m, n, 1, &e);
    free(m);
    if (rc) return -1;
    if (!text) return fail(x, 400, "messages", "chat template: %s", e.msg);
    rc = tokenizer_encode(s->tok, text, strlen(text), 0, &r->prompt, &r->n_prompt, &e);
    free(text);
    if (rc) return fail(x, 400, "messages", "%s", e.msg);
    return 0;
}

int request_parse(const nb_server *s, const char *body, size_t len, srv_req *r, req_error *x) {
    cJSON *root = cJSON_ParseWithLength(body, len);
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        fail(x, 400, NULL, "request body is not a valid JSON object");
        goto out;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (model && !cJSON_IsNull(model) && (!cJSON_IsString(model) || strcmp(model->valuestring, s->o.model_name))) {
        fail(x, 400, "model", "model '%s' does not exist; this server serves '%s'",
             cJSON_IsString(model) ? model->valuestring : "?", s->o.model_name);
        goto out;
    }
    if (r->chat ? request_parse_messages(s, root, r, x) : request_parse_prompt(s, root, r, x)) goto out;
    const nb_model_config *c = model_config(s->m);
    sampling_params_default(&r->opts.sampling);
    if (c->gen_temperature >= 0) r->opts.sampling.temperature = c->gen_temperature;
    if (c->gen_top_p > 0 && c->gen_top_p <= 1) r->opts.sampling.top_p = c->gen_top_p;
    if (c->gen_top_k > 0) r->opts.sampling.top_k = c->gen_top_k;
    double v;
    int max_tokens = r->chat ? c->max_position - (int)r->n_prompt : 16;
    int got;
    if ((got = num_field(root, "max_tokens", 1, 1e9, 1, &v, x)) < 0) goto out;
    if (got) max_tokens = (int)v;
    if ((got = num_field(root, "max_completion_tokens", 1, 1e9, 1, &v, x)) < 0) goto out;
    if (got) max_tokens = (int)v;
    if ((size_t)max_tokens + r->n_prompt > (size_t)c->max_position || max_tokens < 1) {
        fail(x, 400, "max_tokens", "prompt (%zu tokens) + max_tokens (%d) exceeds the context length %d", r->n_prompt,
             max_tokens, c->max_position);
        goto out;
    }
    r->opts.max_tokens = max_tokens;
    nb_sampling_params *sp = &r->opts.sampling;
    if ((got = num_field(root, "temperature", 0, 2, 0, &v, x)) < 0) goto out;
    if (got) sp->temperature = (float)v;
    if ((got = num_field(root, "top_p", 1e-9, 1, 0, &v, x)) < 0) goto out;
    if (got) sp->top_p = (float)v;
    if ((got = num_field(root, "top_k", -1, 1e9, 1, &v, x)) < 0) goto out;
    if (got) sp->top_k = (int)v;
    if ((got = num_field(root, "min_p", 0, 1, 0, &v, x)) < 0) goto out;
    if (got) sp->min_p = (float)v;
    if ((got = num_field(root, "presence_penalty", -2, 2, 0, &v, x)) < 0) goto out;
    if (got) sp->presence_penalty = (float)v;
    if ((got = num_field(root, "frequency_penalty", -2, 2, 0, &v, x)) < 0) goto out;
    if (got) sp->frequency_penalty = (float)v;
    if ((got = num_field(root, "repetition_penalty", 1e-6, 100, 0, &v, x)) < 0) goto out;
    if (got) sp->repetition_penalty = (float)v;
    if ((got = num_field(root, "seed", 0, 9007199254740991.0, 1, &v, x)) < 0) goto out;
    if (got) {
        sp->seed = (uint64_t)v;
        sp->has_seed = 1;
    }
    if (bool_field(root, "stream", &r->stream, x) || bool_field(root, "ignore_eos", &r->opts.ignore_eos, x)) goto out;
    const cJSON *user = cJSON_GetObjectItemCaseSensitive(root, "user");
    if (user && !cJSON_IsNull(user) && !cJSON_IsString(user)) {
        fail(x, 400, "user", "'user' must be a string");
        goto out;
    }
    r->n = 1;
    if ((got = num_field(root, "n", 1, SRV_MAX_N, 1, &v, x)) < 0) goto out;
    if (got) r->n = (int)v;
    /* logprobs: completions take a count of alternatives (0-20), chat a
     * boolean plus top_logprobs (0-20). */
    int want_lp = 0, n_top = 0;
    if (r->chat) {
        if (bool_field(root, "logprobs", &want_lp, x)) goto out;
        if ((got = num_field(root, "top_logprobs", 0, 20, 1, &v, x)) < 0) goto out;
        if (got) {
            if (!want_lp) {
                fail(x, 400, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
                goto out;
            }
            n_top = (int)v;
        }
    } else if ((got = num_field(root, "logprobs", 0, 20, 1, &v, x)) < 0) {
        goto out;
    } else if (got) {
        want_lp = 1;
        n_top = (int)v;
    }
    if (want_lp) {
        r->opts.logprobs = n_top + 1;
        r->n_top = n_top;
    }
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(root, "stop");
    if (stop && !cJSON_IsNull(stop)) {
        const cJSON *one = cJSON_IsString(stop) ? stop : NULL;
        if (!one && (!cJSON_IsArray(stop) || cJSON_GetArraySize(stop) > 4)) {
            fail(x, 400, "stop", "'stop' must be a string or a list of at most 4 strings");
            goto out;
        }
        for (const cJSON *it = one ? one : stop->child; it; it = one ? NULL : it->next) {
            if (!cJSON_IsString(it) || !it->valuestring[0]) {
                fail(x, 400, "stop", "'stop' entries must be non-empty strings");
                goto out;
            }
            size_t l = strlen(it->valuestring);
            r->stop[r->n_stop++] = xstrdup(it->valuestring);
            if (l - 1 > r->stop_hold) r->stop_hold = l - 1;
        }
    }
    const cJSON *sti = cJSON_GetObjectItemCaseSensitive(root, "stop_token_ids");
    if (sti && !cJSON_IsNull(sti)) {
        if (!cJSON_IsArray(sti) || cJSON_GetArraySize(sti) > 16) {
            fail(x, 400, "stop_token_ids", "'stop_token_ids' must be a list of at most 16 token ids");
            goto out;
        }
        for (const cJSON *it = sti->child; it; it = it->next) {
            if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || it->valuedouble < 0 ||
                it->valuedouble >= c->vocab_size) {
                fail(x, 400, "stop_token_ids", "'stop_token_ids' entries must be token ids in [0, %d)", c->vocab_size);
                goto out;
            }
            r->opts.stop_ids[r->opts.n_stop_ids++] = (int32_t)it->valuedouble;
        }
    }
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so)) {
            fail(x, 400, "stream_options", "'stream_options' must be an object");
            goto out;
        }
        if (bool_field(so, "include_usage", &r->include_usage, x)) goto out;
    }
    nb_err e;
    if (sampling_params_validate(sp, &e)) {
        fail(x, 400, NULL, "%s", e.msg);
        goto out;
    }
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}
