/* Calibrated weight quantization (GPTQ, Frantar et al. 2022). Plain round to
 * nearest treats every weight alone; GPTQ quantizes one column at a time, in
 * order, and spreads each column's rounding error over the columns not yet
 * quantized through the inverse Hessian of the layer's inputs (H = sum of
 * x x^T over calibration tokens), so the layer's output on inputs like the
 * calibration ones moves as little as possible. Group scales are fitted when
 * the walk reaches a group's first column, from the already-updated weights.
 * The result is an ordinary packed weight in the layouts of quant/quant.h. */
#ifndef NB_GPTQ_H
#define NB_GPTQ_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

/* H[cols][cols] += sum over the n rows of x[n][cols] of x x^T. H is
 * row-major doubles, zeroed by the caller before the first call. */
void gptq_hessian_add(double *H, const float *x, int n, int64_t cols);

/* Packs w [rows][cols] as t (NB_WINT2, NB_WINT4 or NB_WINT8) into data,
 * scale, scale2 (sizes from quant_data_bytes & co.), using H from
 * gptq_hessian_add. damp (e.g. 0.01) adds damp * mean(diag H) to the
 * diagonal; columns whose diagonal is 0 (never activated) are quantized
 * plainly. Rows are independent and shared among `threads` threads (the
 * result does not depend on their number). Returns -1 with e on a bad
 * shape or if H cannot be factored even after raising the damping. */
int gptq_quantize(nb_dtype t, const float *w, int64_t rows, int64_t cols, int group, const double *H,
                  double damp, int threads, void *data, void *scale, void *scale2, nb_err *e);

#endif
