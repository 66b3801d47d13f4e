/* The "quantization" setting (docs/DESIGN.md section 4): a method name or a
 * JSON object from the command line or a server config, --kv-cache-dtype,
 * and the checkpoint's own quantization_config in config.json, which wins.
 * The result is a plan: which packed format each class of layer gets. */
#ifndef NB_QUANT_CONFIG_H
#define NB_QUANT_CONFIG_H

#include <stddef.h>

#include "common/err.h"
#include "kernels/backend.h"

typedef struct nb_quant_plan {
    char method[24]; /* "none", "wint8", "wint4", "wint2", "block_wise_fp8", "mix_quant" */
    nb_dtype dense;  /* attention and MLP linears; NB_BF16 = as in the checkpoint */
    nb_dtype moe;    /* expert linears (no supported architecture has them yet) */
    nb_kv_dtype kv;
    int group;        /* NB_WINT4 group size (128 or 0 = per channel); NB_WINT2: 64 */
    int is_quantized; /* the checkpoint already holds packed weights */
    int kv_set;       /* kv was asked for explicitly */
} nb_quant_plan;

/* Parses a --quantization value (NULL, a name, or a JSON object) and a
 * --kv-cache-dtype value (NULL or a name) into p. */
int quant_plan_parse(const char *setting, const char *kv_dtype, nb_quant_plan *p, nb_err *e);

/* The plan for the model in dir: the checkpoint's quantization_config (Hugging
 * Face FP8 or our own) wins over `requested`, with a warning when they
 * differ; KV cache settings from either combine unless they conflict. */
int quant_plan_resolve(const char *dir, const nb_quant_plan *requested, nb_quant_plan *p, nb_err *e);

/* FastDeploy's naming: W8A16C16, W4A16C8, Wfp8Afp8C16, ... */
const char *quant_plan_name(const nb_quant_plan *p, char *buf, size_t n);

/* Names of formats as the setting spells them ("wint4", "block_wise_fp8");
 * -1 for an unknown name. */
int quant_dtype_from_name(const char *name, nb_dtype *out);
const char *quant_dtype_setting_name(nb_dtype t);
int quant_kv_from_name(const char *name, nb_kv_dtype *out);

/* The scale group a [N][K] matrix gets for format t: WINT4 takes the plan's
 * group (128) when K allows it, else 64, else one per row (group = K);
 * WINT2 always 64; 0 for formats without groups. */
int quant_pick_group(const nb_quant_plan *p, nb_dtype t, int64_t K);

#endif
