/* Perplexity of a model on a token sequence: the quality yardstick for
 * quantized formats (docs/BENCHMARKS.md). */
#ifndef NB_PERPLEXITY_H
#define NB_PERPLEXITY_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "engine/model/model.h"

/* Splits ids into windows of ctx tokens (the last one may be shorter), runs
 * each from an empty cache and scores every token after the first of its
 * window: exp(mean negative log-likelihood). The model needs
 * ceil(ctx / 16) KV blocks. */
int perplexity_run(nb_model *m, const int32_t *ids, size_t n, int ctx, double *ppl, size_t *n_scored, nb_err *e);

#endif
