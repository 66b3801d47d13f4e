/* Quantized weight formats (docs/DESIGN.md section 4): packing from FP32,
 * the plain reference (dequantize, then FP32 matmul) and the fast CPU
 * kernels that read the packed bytes directly.
 *
 * A weight is [N rows = out features][K cols = in features], as nb_weight.
 * Layouts, for row n and column k:
 *
 *  NB_WINT8   data  int8 [N][K], symmetric, q in [-127, 127]
 *             scale float [N] (values are BF16-representable: checkpoints
 *                   store them as BF16)                w = q * scale[n]
 *  NB_WINT4   data  uint8 [N][K/2]; column k is the low nibble of byte k/2
 *                   when k is even, the high nibble when odd; nibble u
 *                   means q = u - 8 (symmetric packing uses [-7, 7])
 *             scale float [N][K/group] (BF16-representable); group 128, or
 *                   group == K for per-channel      w = q * scale[n][k/group]
 *  NB_WINT2   data  uint8 [N][K/4]; column k sits in bits 2*(k%4)..2*(k%4)+1
 *                   of byte k/4; q in [0, 3]
 *             scale uint8 [N][K/group] codes, group 64: low nibble ls,
 *                   high nibble zc, both in [0, 15]
 *             scale2 float [N] super scale (BF16-representable)
 *                   w = (q - zc/4) * scale2[n] * (ls + 1) / 16
 *             (2 + 8/64 bits per weight plus the row's super scale)
 *  NB_FP8_B128 data uint8 [N][K] E4M3 ("fn": no infinities, max 448)
 *             scale float [ceil(N/128)][ceil(K/128)]
 *                   w = e4m3(data) * scale[n/128][k/128]
 *             (the layout of Hugging Face FP8 checkpoints' weight_scale_inv)
 *             Activations are quantized too, per token per 128 columns:
 *             sx = max|x[k0..k0+127]| / 448, xq = e4m3(x / sx), and the
 *             product uses e4m3(xq) * sx in place of x.
 *
 * K must be a multiple of the group (and of 4 for NB_WINT2, 2 for NB_WINT4);
 * quant_check says why a shape is refused.
 */
#ifndef NB_QUANT_H
#define NB_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

#define QUANT_WINT4_GROUP 128
#define QUANT_WINT2_GROUP 64
#define QUANT_FP8_BLOCK 128
#define QUANT_FP8_MAX 448.0f

/* ---- FP8 E4M3 (fn) ---- */

/* Round to nearest even; |x| beyond 448 saturates to +-448; NaN -> 0x7f. */
uint8_t fp8_e4m3_from_f32(float x);
float fp8_e4m3_to_f32(uint8_t b);

/* Rounds to the nearest BF16 value (ties to even), returned as float. */
float quant_round_bf16(float x);

/* ---- shapes and sizes ---- */

/* 0 if a [rows][cols] weight can be packed as t with this group (group is
 * ignored for NB_WINT8 and NB_FP8_B128); else -1 with the reason in e. */
int quant_check(nb_dtype t, int64_t rows, int64_t cols, int group, nb_err *e);
/* Bytes of data, scale and scale2 for a packed [rows][cols] weight. */
size_t quant_data_bytes(nb_dtype t, int64_t rows, int64_t cols);
size_t quant_scale_bytes(nb_dtype t, int64_t rows, int64_t cols, int group);
size_t quant_scale2_bytes(nb_dtype t, int64_t rows);
/* All three together: the resident bytes of w (in either layout). */
size_t quant_weight_bytes(const nb_weight *w);

/* ---- packing (round to nearest, from FP32 [rows][cols]) ---- */

/* Fills caller-allocated buffers of the sizes above: data, scale, scale2
 * (NULL unless NB_WINT2). WINT8/WINT4 scales are max|w| / 127 (/ 7) per row
 * (per group), rounded to BF16. WINT2: the super scale and each group's
 * (ls, zc) minimise the group's squared error over the 256 code pairs;
 * FP8: scale = max|block| / 448. Returns -1 (with e) if quant_check fails. */
int quant_pack(nb_dtype t, const float *w, int64_t rows, int64_t cols, int group, void *data, void *scale,
               void *scale2, nb_err *e);

/* WINT2 building blocks, also used by the calibrated quantizer (gptq.c). */
/* The super scale of one row: the largest group step over the row's
 * groups, rounded up to BF16 so every group's step fits in 16 codes. */
float quant_wint2_super(const float *row, int64_t cols, int group);
/* Best (ls, zc) code byte for n (<= 256) values under super scale `super`
 * (minimum squared error after rounding each value to its nearest q). */
uint8_t quant_wint2_fit_group(const float *v, int n, float super);
/* The 2-bit q of value v under a code byte (nearest of the four levels). */
int quant_wint2_q(float v, uint8_t code, float super);
/* The value a (q, code) pair stands for: (q - zc/4) * quant_wint2_step. */
float quant_wint2_value(int q, uint8_t code, float super);
/* A group's step, super * (ls + 1) / 16; the kernels use this same
 * expression so their weights equal quant_dequant_row's bit for bit. */
static inline float quant_wint2_step(uint8_t code, float super) {
    return super * (float)((code & 15) + 1) * 0.0625f;
}

/* Stores the integer q of element (r, k) of a packed [rows][cols] weight
 * (WINT8: [-127, 127], WINT4: [-8, 7], WINT2: [0, 3]; FP8: the E4M3 byte). */
void quant_put_q(nb_dtype t, void *data, int64_t cols, int64_t r, int64_t k, int q);

/* ---- reading back ---- */

/* Row r of w as FP32 (cols floats). Works for every dtype, F32/BF16/F16 too. */
void quant_dequant_row(const nb_weight *w, int64_t r, float *out);
/* ||W - dequant(q)||_F / ||W||_F for the FP32 original w. */
double quant_rel_error(const float *w, const nb_weight *q);

/* ---- matmul ---- */

/* The reference: out[M][N] = x[M][K] @ dequant(w)^T in FP32, one thread,
 * plain loops (for NB_FP8_B128 with the activation quantization above). */
void quant_matmul_ref(float *out, const float *x, const nb_weight *w, int M);
/* The fast kernel on packed bytes, same contract as cpu_matmul_block:
 * out[m][n] for m in [m0, m1), n in [n0, n1), row strides N and K. Each
 * output element is computed in one fixed order, independent of the block
 * bounds, so threads and batch sizes give bitwise identical results. */
void quant_matmul_block(float *out, const float *x, const nb_weight *w, int m0, int m1, int64_t n0, int64_t n1);

/* The activations the product uses, for callers that split one product
 * over threads and want to quantize them once: for NB_FP8_B128, out gets
 * x's M rows quantized per token per 128 columns (as above), and returns 1;
 * for other formats it returns 0 and x is used as it is. */
int quant_act_rows(float *out, const float *x, const nb_weight *w, int M);
/* quant_matmul_block on rows already passed through quant_act_rows. */
void quant_matmul_block_act(float *out, const float *xa, const nb_weight *w, int m0, int m1, int64_t n0, int64_t n1);

#endif
