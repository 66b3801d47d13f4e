/* The tensor-core layout (NB_LAYOUT_TC) of NB_WINT8, NB_WINT4 and NB_WINT2
 * weights: the packed values of quant/quant.h reordered so that the CUDA
 * kernel (kernels/cuda/cuda_wint_tc.cu) brings each lane's mma.m16n8k16 B
 * fragments for 64 output columns with one load per k-step (16 bytes; two
 * for WINT8, 8 bytes for WINT2) and turns them into BF16 pairs in
 * registers, without a shared BF16 tile or any shuffling. The CUDA
 * backend's weight_pack makes it at load; this file is plain C so the
 * reordering is tested on the CPU.
 *
 * Terms, for a weight [N rows = out features][K cols = in features]:
 *  - chunk c: the 64 rows n = 64 c + 8 j + gi (n-tile j 0..7, gi 0..7);
 *    NC = ceil(N / 64) chunks, rows past N hold q = 0;
 *  - k-step s: the 16 columns k = 16 s + kk (K % 16 == 0, KS = K / 16);
 *  - lane L of a warp, gi = L / 4, t = L % 4. By the PTX ISA's B fragment
 *    of mma.m16n8k16 (B is K x N, "col"), lane L's register b0 of n-tile j
 *    holds rows k = 2t, 2t+1 of column gi, b1 rows 2t+8, 2t+9, the lower k
 *    in the low half: 4 weights per n-tile, 32 per lane for a chunk.
 *
 * data: for chunk c and k-step s a step block of QUANT_TC_STEP bytes per
 * sub-block (WINT4 one, WINT8 two) at ((c * KS + s) * subs + h) *
 * QUANT_TC_STEP, in which lane L's 16 bytes start at L * 16; WINT2's step
 * block is half as long (QUANT_TC_STEP / 2 at (c * KS + s) * 256), lane
 * L's 8 bytes at L * 8. A chunk's k-steps are adjacent, so a block that
 * walks K reads one run of bytes.
 *  - WINT4: 4 little-endian words; word w covers n-tiles 2w and 2w+1.
 *    Nibble p of a word (bits 4p..4p+3) with r = p % 4 holds n-tile
 *    j = 2w + r / 2, register r % 2 (b0 or b1), half p / 4, i.e.
 *    kk = 2t + 8 (r % 2) + p / 4; the nibble is u = q + 8 as in quant.h.
 *    So (word >> 4r) & 0x000F000F has the two halves of one register:
 *    OR-ed into the mantissa of BF16 128.0 (0x4300) they read 128 + u,
 *    and subtracting 136 leaves q exactly.
 *  - WINT8: sub-block h covers n-tiles 4h..4h+3; word w of lane L's 16
 *    bytes is n-tile 4h + w, its byte p holds kk = 2t + p % 2 + 8 (p / 2),
 *    the int8 q as in quant.h (bytes 0-1: b0, bytes 2-3: b1).
 *  - WINT2: 2 little-endian words; word w covers n-tiles 4w..4w+3. Pair
 *    P (0..7) of a word is register P % 2 of n-tile 4w + P / 2: bits
 *    2P, 2P+1 hold the q (0..3, as in quant.h) of kk = 2t + 8 (P % 2),
 *    bits 16 + 2P, 17 + 2P that of kk + 1. So (word >> sh) & (3 << 2i)
 *    * 0x10001 with P = i + sh / 2 (sh 0, 6 or 12, i < 3) has the two
 *    halves of one register: OR-ed into BF16 128.0 they read 128 + 4^i q,
 *    which one BF16 multiply-add turns into q exactly.
 * scale:
 *  - WINT8 and per-channel WINT4 (group == K): quant.h's float [N],
 *    unchanged (the kernel applies it in FP32 to each finished sum);
 *  - grouped WINT4: BF16 [K / group][NC][8 gi][8 j], the scale of row
 *    64 c + 8 j + gi (0 past N): lane L reads the 16 bytes at
 *    ((grp * NC + c) * 8 + L / 4) * 16, the scales of all 8 of its rows.
 *    The kernel multiplies q by it in BF16 (one rounding, as the scale is
 *    a BF16 value), so only scales BF16 represents exactly are taken.
 *  - WINT2: the code bytes (ls | zc << 4) as uint8 [K / 64][NC][8 gi][8 j]
 *    (0 past N), lane L's 8 at ((grp * NC + c) * 8 + L / 4) * 8; scale2
 *    (the super scales, float [N]) unchanged. The kernel makes the BF16
 *    weight (q - zc / 4) * (ls + 1), exact, and multiplies each finished
 *    FP32 sum by super / 16: quant.h's w = (q - zc/4) * super * (ls+1) / 16
 *    up to FP32 rounding.
 *
 * Taken: WINT8, WINT4 and WINT2 weights that pass quant_check, with K % 16 == 0,
 * N and K below 2^31, and a WINT4 group that is the whole row or a power
 * of two (so that every pipeline stage of the kernel, 32 to 128 columns,
 * holds whole groups or lies in one, and the kernel finds a column's
 * group by a shift; the groups checkpoints use, 32 to 256, all are). Host
 * code that reads weights (quant_dequant_row, quant_matmul_ref) takes
 * the plain layout only. */
#ifndef NB_QUANT_TC_H
#define NB_QUANT_TC_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

#define QUANT_TC_CHUNK 64      /* rows (output columns) per chunk */
#define QUANT_TC_KSTEP 16      /* input columns per k-step (the mma's k) */
#define QUANT_TC_STEP 512      /* bytes of a step block: 32 lanes x 16 */

/* 0 if w (dtype, shape and group; not its values) can take the layout,
 * else -1 with the reason in e. */
int quant_tc_check(const nb_weight *w, nb_err *e);
/* Whether the layout has per-group scales (grouped WINT4). */
int quant_tc_grouped(const nb_weight *w);
/* Whether the layout rewrites w's scales too (grouped WINT4, WINT2's
 * codes); scale2 is never rewritten. */
int quant_tc_new_scale(const nb_weight *w);
/* Bytes of the layout's data and scale for w's dtype, shape and group. */
size_t quant_tc_data_bytes(const nb_weight *w);
size_t quant_tc_scale_bytes(const nb_weight *w);

/* Writes the layout of src (plain layout, host memory) into data
 * (quant_tc_data_bytes) and, when quant_tc_new_scale, scale
 * (quant_tc_scale_bytes; otherwise scale is not touched and may be NULL).
 * Returns -1 with the reason in e if quant_tc_check fails or a group
 * scale is not a BF16 value. A weight of several MiB is repacked by up to
 * one thread per core (8 at most), started and joined within the call. */
int quant_tc_repack(const nb_weight *src, void *data, void *scale, nb_err *e);

#endif
