/* `nibble quantize`: reads a BF16/F16/F32 checkpoint and writes one whose
 * linear layers are packed (quant/quant.h layouts, tensor names in
 * engine/model/model_quant.c) with a quantization_config in config.json.
 * WINT2/WINT4/WINT8 use GPTQ with Hessians from calibration text unless
 * rtn is set; block_wise_fp8 is always round to nearest. */
#ifndef NB_QUANTIZE_H
#define NB_QUANTIZE_H

#include <stdio.h>

#include "common/err.h"
#include "engine/model/quant_config.h"

typedef struct nb_quantize_opts {
    const char *in, *out;
    const nb_quant_plan *plan;
    const char *calib; /* text file; NULL: tests/fixtures/text/calib.txt */
    int calib_tokens;  /* tokens of it to run (default 2048) */
    int rtn;           /* plain round to nearest: no calibration */
    int threads;
    FILE *report; /* per-matrix errors and a summary; NULL: quiet */
} nb_quantize_opts;

int quantize_model(const nb_quantize_opts *o, nb_err *e);

#endif
