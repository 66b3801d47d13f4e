/* GPTQ (see quant/gptq.h). Each weight row is independent; for column i,
 * with U the upper Cholesky factor of H^-1 (H^-1 = U^T U):
 *     q_i = quantize(w_i);  e = (w_i - q_i) / U[i][i];
 *     w_j -= e * U[i][j]    for every j > i.
 * The updates are applied eagerly inside blocks of GPTQ_BLOCK columns and
 * once per block to the columns after it (a matrix product), which is the
 * same arithmetic in a cache-friendly order.
 *
 * U comes from one Cholesky factorization: with J the reversal
 * permutation, J H J = L L^T gives H = V V^T with V = J L J upper
 * triangular, so H^-1 = V^-T V^-1 and U = V^-1 = J L^-1 J. */
#include "quant/gptq.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/parallel.h"
#include "common/util.h"
#include "quant/quant.h"

#define GPTQ_BLOCK 128
#define GPTQ_ROWS 32

void gptq_hessian_add(double *H, const float *x, int n, int64_t cols) {
    for (int t = 0; t < n; t++) {
        const float *v = x + (size_t)t * cols;
        for (int64_t i = 0; i < cols; i++) {
            double a = v[i];
            if (a == 0.0) continue;
            double *h = H + i * cols;
            for (int64_t j = 0; j < cols; j++) h[j] += a * v[j];
        }
    }
}

/* a . b over n doubles, with four partial sums so the additions overlap */
static double dot4(const double *a, const double *b, int64_t n) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
        s0 += a[k] * b[k];
        s1 += a[k + 1] * b[k + 1];
        s2 += a[k + 2] * b[k + 2];
        s3 += a[k + 3] * b[k + 3];
    }
    for (; k < n; k++) s0 += a[k] * b[k];
    return (s0 + s1) + (s2 + s3);
}

/* In place: A (n x n, symmetric positive definite) -> its lower Cholesky
 * factor. Returns -1 if a pivot is not positive. */
static int cholesky(double *A, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        double *rj = A + j * n;
        double d = rj[j] - dot4(rj, rj, j);
        if (!(d > 0.0)) return -1;
        d = sqrt(d);
        rj[j] = d;
        for (int64_t i = j + 1; i < n; i++) {
            double *ri = A + i * n;
            ri[j] = (ri[j] - dot4(ri, rj, j)) / d;
        }
    }
    return 0;
}

/* Inverse of the lower triangular L (n x n) into X (lower), column by
 * column: L x = e_c. */
static void tri_lower_inverse(const double *L, double *X, int64_t n) {
    memset(X, 0, sizeof(double) * (size_t)(n * n));
    double *col = xmalloc(sizeof(double) * (size_t)n);
    for (int64_t c = 0; c < n; c++) {
        for (int64_t i = c; i < n; i++) {
            const double *ri = L + i * n;
            col[i] = ((i == c ? 1.0 : 0.0) - dot4(ri + c, col + c, i - c)) / ri[i];
            X[i * n + c] = col[i];
        }
    }
    free(col);
}

/* U (float, n x n upper) with (H + damp)^-1 = U^T U; -1 if not positive
 * definite. */
static int inverse_factor(const double *H, int64_t n, double damp_abs, float *U) {
    double *A = xmalloc(sizeof(double) * (size_t)(n * n)), *X = xmalloc(sizeof(double) * (size_t)(n * n));
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < n; j++) A[i * n + j] = H[(n - 1 - i) * n + (n - 1 - j)] + (i == j ? damp_abs : 0.0);
    int rc = cholesky(A, n);
    if (!rc) {
        tri_lower_inverse(A, X, n);
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) U[i * n + j] = (float)X[(n - 1 - i) * n + (n - 1 - j)];
    }
    free(A);
    free(X);
    return rc;
}

/* Per-row quantization state: the scale of the current group. */
typedef struct gptq_row {
    float scale; /* WINT8 / WINT4 */
    uint8_t code; /* WINT2 */
} gptq_row;

static float absmax(const float *v, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) m = fmaxf(m, fabsf(v[i]));
    return m;
}

/* Quantizes v under the row's current group parameters: stores q and
 * returns the value it stands for. */
static float quant_one(nb_dtype t, float v, const gptq_row *st, float super, int *q) {
    if (t == NB_WINT2) {
        *q = quant_wint2_q(v, st->code, super);
        return quant_wint2_value(*q, st->code, super);
    }
    int qmax = t == NB_WINT8 ? 127 : 7;
    float r = st->scale == 0.0f ? 0.0f : nearbyintf(v / st->scale);
    *q = r < (float)-qmax ? -qmax : r > (float)qmax ? qmax : (int)r;
    return (float)*q * st->scale;
}

/* The threads' shared job: they take chunks of GPTQ_ROWS rows in turn
 * (rows are independent once U is known). */
typedef struct gptq_job {
    nb_dtype t;
    const float *w, *U;
    int64_t rows, cols;
    int group;
    void *data, *scale, *scale2;
    atomic_llong next; /* the first chunk no thread has taken */
} gptq_job;

static void *gptq_rows(void *arg) {
    gptq_job *j = arg;
    nb_dtype t = j->t;
    int64_t cols = j->cols, n = cols, groups = cols / j->group;
    int group = j->group;
    float *W = xmalloc(sizeof(float) * (size_t)(GPTQ_ROWS * cols));
    float *err = xmalloc(sizeof(float) * GPTQ_ROWS * GPTQ_BLOCK);
    float *fs = j->scale, *super = j->scale2;
    uint8_t *codes = j->scale;
    const float *U = j->U;
    gptq_row st[GPTQ_ROWS];
    const int64_t chunks = (j->rows + GPTQ_ROWS - 1) / GPTQ_ROWS;
    for (int64_t ch; (ch = par_take(&j->next, chunks)) >= 0;) {
        const int64_t r0 = ch * GPTQ_ROWS;
        int nr = j->rows - r0 < GPTQ_ROWS ? (int)(j->rows - r0) : GPTQ_ROWS;
        memcpy(W, j->w + r0 * cols, sizeof(float) * (size_t)(nr * cols));
        for (int c = 0; c < nr; c++)
            if (t == NB_WINT2) super[r0 + c] = quant_wint2_super(W + c * cols, cols, group);
        for (int64_t b0 = 0; b0 < cols; b0 += GPTQ_BLOCK) {
            int64_t b1 = b0 + GPTQ_BLOCK < cols ? b0 + GPTQ_BLOCK : cols;
            for (int64_t i = b0; i < b1; i++) {
                const float *restrict u = U + i * n;
                for (int c = 0; c < nr; c++) {
                    int64_t r = r0 + c;
                    float *restrict Wr = W + c * cols, sup = t == NB_WINT2 ? super[r] : 0.0f;
                    if (i % group == 0) {
                        /* a group's parameters come from its weights as the
                         * walk reaches it: groups larger than a block (whole
                         * rows) are fitted from the original row at i == 0 */
                        int64_t g = i / group;
                        if (t == NB_WINT2) st[c].code = codes[r * groups + g] = quant_wint2_fit_group(Wr + i, group, sup);
                        else
                            st[c].scale = fs[r * groups + g] =
                                quant_round_bf16(absmax(Wr + i, group) / (t == NB_WINT8 ? 127.0f : 7.0f));
                    }
                    int q;
                    float v = quant_one(t, Wr[i], &st[c], sup, &q);
                    quant_put_q(t, j->data, cols, r, i, q);
                    float ei = (Wr[i] - v) / u[i];
                    err[c * GPTQ_BLOCK + (i - b0)] = ei;
                    for (int64_t k = i + 1; k < b1; k++) Wr[k] -= ei * u[k];
                }
            }
            for (int c = 0; c < nr; c++) {
                float *restrict Wr = W + c * cols;
                for (int64_t i = b0; i < b1; i++) {
                    const float *restrict u = U + i * n;
                    float ei = err[c * GPTQ_BLOCK + (i - b0)];
                    for (int64_t k = b1; k < cols; k++) Wr[k] -= ei * u[k];
                }
            }
        }
    }
    free(W);
    free(err);
    return NULL;
}

int gptq_quantize(nb_dtype t, const float *w, int64_t rows, int64_t cols, int group, const double *H, double damp,
                  int threads, void *data, void *scale, void *scale2, nb_err *e) {
    if (t != NB_WINT2 && t != NB_WINT4 && t != NB_WINT8)
        return nb_errf(e, "GPTQ supports wint2, wint4 and wint8, not %s", nb_dtype_name(t));
    if (quant_check(t, rows, cols, group, e)) return -1;
    if (t == NB_WINT8) group = (int)cols;
    int64_t n = cols;

    /* dead columns (never activated) get a unit diagonal: decoupled from
     * the others, they are quantized plainly */
    double *Hd = xmalloc(sizeof(double) * (size_t)(n * n)), mean = 0.0;
    memcpy(Hd, H, sizeof(double) * (size_t)(n * n));
    for (int64_t i = 0; i < n; i++) {
        if (Hd[i * n + i] <= 0.0) {
            for (int64_t j = 0; j < n; j++) Hd[i * n + j] = Hd[j * n + i] = 0.0;
            Hd[i * n + i] = 1.0;
        }
        mean += Hd[i * n + i];
    }
    mean /= (double)n;
    float *U = xmalloc(sizeof(float) * (size_t)(n * n));
    int ok = -1;
    for (int tries = 0; tries < 6 && ok; tries++, damp *= 10.0) ok = inverse_factor(Hd, n, damp * mean, U);
    free(Hd);
    if (ok) {
        free(U);
        return nb_errf(e, "GPTQ: the calibration Hessian is not positive definite even with damping");
    }

    memset(data, 0, quant_data_bytes(t, rows, cols));
    int64_t chunks = (rows + GPTQ_ROWS - 1) / GPTQ_ROWS;
    if (threads < 1) threads = 1;
    if (threads > chunks) threads = (int)chunks;
    gptq_job job = {t, w, U, rows, cols, group, data, scale, scale2, 0};
    atomic_init(&job.next, 0);
    par_run(threads, gptq_rows, &job);
    free(U);
    return 0;
}
