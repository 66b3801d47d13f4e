/* Picks the next token from a row of FP32 logits, one sequence at a time, in
 * vLLM's order: repetition penalty, frequency/presence penalties,
 * temperature, top-k, top-p, min-p, then a seeded draw from the softmax of
 * what remains (sample_row_ref in kernels/backend.h). One sampler per
 * sequence holds its RNG and token history. */
#ifndef NB_SAMPLER_H
#define NB_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

typedef struct nb_sampling_params {
    float temperature;        /* 0 (or < 1e-5) => greedy: argmax, lowest id on ties */
    int top_k;                /* <= 0 or >= vocab: disabled; exactly k kept, lower id wins ties */
    float top_p;              /* 1: disabled; (0, 1] */
    float min_p;              /* 0: disabled; [0, 1], relative to the top probability */
    float repetition_penalty; /* 1: disabled; > 0; logit > 0 ? logit / p : logit * p on prompt and output tokens */
    float presence_penalty;   /* 0: disabled; [-2, 2]; subtracted once from tokens in the output */
    float frequency_penalty;  /* 0: disabled; [-2, 2]; count * f subtracted from tokens in the output */
    uint64_t seed;            /* used when has_seed */
    int has_seed;
} nb_sampling_params;

/* temperature 1, everything else disabled, no seed */
void sampling_params_default(nb_sampling_params *p);
/* Checks the ranges above; the message names the field, e.g.
 * "top_p must be in (0, 1], got 1.5". */
int sampling_params_validate(const nb_sampling_params *p, nb_err *e);

typedef struct nb_sampler nb_sampler;

/* Allocates all per-sequence state (O(vocab)) once. Without has_seed the RNG
 * is seeded from getrandom. NULL if vocab_size <= 0. */
nb_sampler *sampler_create(const nb_sampling_params *p, int vocab_size);
void sampler_free(nb_sampler *s);
/* Prompt tokens count for the repetition penalty only. */
void sampler_add_prompt(nb_sampler *s, const int32_t *ids, size_t n);
/* A generated token: counts for all penalties. */
void sampler_accept(nb_sampler *s, int32_t id);
/* Applies penalties, temperature and filters to logits (vocab_size floats,
 * overwritten: it is scratch) and returns the chosen id. Does not call
 * sampler_accept; the caller does once the token is kept. */
int32_t sampler_sample(nb_sampler *s, float *logits);
/* The step's row for a backend's sample op: the parameters, the history
 * (only when a penalty is on) and, unless greedy, one draw from the RNG.
 * The history pointers stay valid until the next sampler_accept. Does not
 * call sampler_accept. */
void sampler_row(nb_sampler *s, nb_sample_row *r);

#endif
