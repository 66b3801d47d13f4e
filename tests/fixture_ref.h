/* The transformers reference of a committed fixture model
 * (tests/fixtures/models/NAME/reference.json, from scripts/make_fixtures.py):
 * prompt ids, FP32 last-position logits, 32 greedy tokens. */
#ifndef NB_FIXTURE_REF_H
#define NB_FIXTURE_REF_H

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/err.h"
#include "common/util.h"

typedef struct ref {
    int32_t *prompt;
    int n_prompt;
    float *logits;
    int n_logits;
    int32_t greedy[64];
    int n_greedy;
} ref;

static inline int ref_load(const char *name, ref *r) {
    char path[256];
    snprintf(path, sizeof path, "tests/fixtures/models/%s/reference.json", name);
    nb_err e;
    char *text = util_read_file(path, NULL, &e);
    if (!text) return -1;
    cJSON *j = cJSON_Parse(text);
    free(text);
    if (!j) return -1;
    cJSON *p = cJSON_GetObjectItem(j, "prompt_ids"), *l = cJSON_GetObjectItem(j, "logits"),
          *g = cJSON_GetObjectItem(j, "greedy");
    r->n_prompt = cJSON_GetArraySize(p);
    r->prompt = xmalloc(sizeof(int32_t) * (size_t)r->n_prompt);
    for (int i = 0; i < r->n_prompt; i++) r->prompt[i] = cJSON_GetArrayItem(p, i)->valueint;
    r->n_logits = cJSON_GetArraySize(l);
    r->logits = xmalloc(sizeof(float) * (size_t)r->n_logits);
    for (int i = 0; i < r->n_logits; i++) r->logits[i] = (float)cJSON_GetArrayItem(l, i)->valuedouble;
    r->n_greedy = cJSON_GetArraySize(g);
    for (int i = 0; i < r->n_greedy && i < 64; i++) r->greedy[i] = cJSON_GetArrayItem(g, i)->valueint;
    cJSON_Delete(j);
    return 0;
}

static inline void ref_free(ref *r) {
    free(r->prompt);
    free(r->logits);
}

#endif
