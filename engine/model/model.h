/* A loaded llama-family model: its weights bound to a backend, its paged KV
 * cache, and one forward pass over a batch of tokens from many sequences. */
#ifndef NB_MODEL_H
#define NB_MODEL_H

#include <stdint.h>
#include <stdio.h>

#include "common/err.h"
#include "engine/model/config.h"
#include "kernels/backend.h"

typedef struct nb_model nb_model;

#include "engine/model/quant_config.h"

typedef struct nb_model_opts {
    int max_batch_tokens; /* most tokens one forward step takes (default 256) */
    int max_logit_rows;   /* most logit rows one step returns (0 = max_batch_tokens); a server
                           * needs one per running sequence, and a row is vocab floats */
    int num_kv_blocks;    /* KV blocks to allocate; 0 = one full-context sequence */
    const nb_quant_plan *quant; /* requested quantization; NULL = none (the checkpoint's config still wins) */
    FILE *quant_report;         /* when set: one line per quantized matrix with its error */
    float gpu_mem_util;         /* share of device memory to use (0 = 0.9); sizes the KV cache when num_kv_blocks is 0 */
} nb_model_opts;

/* Sees the input of every linear layer in a forward pass (CPU backend:
 * host pointers): which is 0 for q/k/v, 1 for o_proj, 2 for gate/up, 3 for
 * down_proj; x is [n][cols]. Used by the calibrated quantizer. */
typedef void (*model_capture_fn)(void *ctx, int layer, int which, const float *x, int n, int64_t cols);

nb_model *model_load(const char *dir, nb_backend *be, const nb_model_opts *opts, nb_err *e);
void model_free(nb_model *m);

const nb_model_config *model_config(const nb_model *m);
void model_set_capture(nb_model *m, model_capture_fn fn, void *ctx);
/* The quantization plan in effect (after the checkpoint's config). */
const nb_quant_plan *model_quant_plan(const nb_model *m);
/* Resident weight bytes of format t. */
size_t model_weight_bytes(const nb_model *m, nb_dtype t);
/* Of those, the bytes of a mixture's experts (all ranks; not the shared
 * experts or routers): a decode step reads only the experts its tokens
 * pick. 0 for a dense model. */
size_t model_expert_bytes(const nb_model *m);
int model_num_kv_blocks(const nb_model *m);
int model_max_batch_tokens(const nb_model *m);
int model_max_logit_rows(const nb_model *m);

/* One forward step. tokens[t] sits where batch says (positions, KV slots,
 * block tables); its K/V are written to the cache. Logits (FP32, host) of
 * the n_out step rows listed in out_rows go to logits[n_out][vocab]. */
int model_forward(nb_model *m, const int32_t *tokens, const nb_batch *batch,
                  const int32_t *out_rows, int n_out, float *logits, nb_err *e);

/* As model_forward, but each logit row is sampled on the backend under
 * rows[r] (sample_row_ref) and only the ids come back, in ids[n_out]: a GPU
 * step then copies n_out ids to the host instead of n_out x vocab floats. */
int model_forward_sample(nb_model *m, const int32_t *tokens, const nb_batch *batch,
                         const int32_t *out_rows, int n_out, const nb_sample_row *rows, int32_t *ids,
                         nb_err *e);

/* Architecture, parameter count, dtypes and memory of the model in dir,
 * without binding it to a backend. */
int model_inspect(const char *dir, FILE *out, nb_err *e);

#endif
