/* Rotary embedding, KV-cache writes and causal paged attention on the CPU. */
#include "kernels/cpu/cpu_ops.h"

#include "common/util.h"
#include "quant/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Below this many multiply-adds an op runs on the caller alone: waking the
 * pool costs more than it saves. */
#define PAR_MIN_WORK (1 << 16)

static void check_head_dim(const char *op, int head_dim) {
    if (head_dim <= 0 || head_dim > CPU_MAX_HEAD_DIM || (head_dim & 1)) {
        /* the model loader validates head_dim; reaching here is a bug */
        fprintf(stderr, "nibble: cpu %s: unsupported head_dim %d (even, at most %d)\n", op, head_dim,
                CPU_MAX_HEAD_DIM);
        abort();
    }
}

/* ---- rope -------------------------------------------------------------- */

typedef struct rope_job {
    const nb_batch *batch;
    float *x;
    int n_heads, head_dim, stride;
    const float *inv_freq;
    int interleaved;
    int tokens_per_task;
    const cpu_head_norm *norm;
} rope_job;

static void rope_tokens(const rope_job *j, int t0, int t1) {
    int half = j->head_dim / 2;
    float cs[CPU_MAX_HEAD_DIM / 2], sn[CPU_MAX_HEAD_DIM / 2];
    for (int t = t0; t < t1; t++) {
        /* As Hugging Face: the angle is a float32 product, then cos/sin in
         * float32; shared by all heads of the token. */
        float p = (float)j->batch->pos[t];
        for (int i = 0; i < half; i++) {
            float a = p * j->inv_freq[i];
            cs[i] = cosf(a);
            sn[i] = sinf(a);
        }
        for (int h = 0; h < j->n_heads; h++) {
            float *v = j->x + (size_t)t * j->stride + (size_t)h * j->head_dim;
            if (j->norm) /* rmsnorm's own row, on one head */
                cpu_rmsnorm_row(v, v, h < j->norm->n_q ? j->norm->q_w : j->norm->k_w, j->head_dim, j->norm->eps);
            if (j->interleaved) {
                for (int i = 0; i < half; i++) {
                    float a = v[2 * i], b = v[2 * i + 1];
                    v[2 * i] = a * cs[i] - b * sn[i];
                    v[2 * i + 1] = b * cs[i] + a * sn[i];
                }
            } else {
                for (int i = 0; i < half; i++) {
                    float a = v[i], b = v[i + half];
                    v[i] = a * cs[i] - b * sn[i];
                    v[i + half] = b * cs[i] + a * sn[i];
                }
            }
        }
    }
}

static void rope_task(void *arg, int task) {
    const rope_job *j = arg;
    int t0 = task * j->tokens_per_task, t1 = t0 + j->tokens_per_task;
    if (t1 > j->batch->n_tokens) t1 = j->batch->n_tokens;
    rope_tokens(j, t0, t1);
}

void cpu_rope(threadpool *pool, const nb_batch *batch, float *x, int n_heads, int head_dim, int stride,
              const float *inv_freq, int interleaved, const cpu_head_norm *norm) {
    check_head_dim("rope", head_dim);
    int n = batch->n_tokens;
    rope_job j = {batch, x, n_heads, head_dim, stride, inv_freq, interleaved, n, norm};
    if ((int64_t)n * n_heads * head_dim < PAR_MIN_WORK || n == 1) {
        rope_tokens(&j, 0, n);
        return;
    }
    int tasks = threadpool_size(pool) * 4;
    if (tasks > n) tasks = n;
    j.tokens_per_task = (n + tasks - 1) / tasks;
    threadpool_run(pool, (n + j.tokens_per_task - 1) / j.tokens_per_task, rope_task, &j);
}

/* ---- kv cache ---------------------------------------------------------- */

/* Where slot's values for kv head h start, and its scale (INT8/FP8). */
static size_t kv_elem_size(nb_kv_dtype t) { return t == NB_KV_F32 ? 4 : t == NB_KV_BF16 ? 2 : 1; }

static char *kv_values(const void *cache, const nb_attn_shape *s, size_t slot, int h, float **scale) {
    size_t bb = nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim);
    size_t blk = slot / NB_KV_BLOCK_SIZE, i = slot % NB_KV_BLOCK_SIZE, row = i * (size_t)s->n_kv_heads + (size_t)h;
    char *base = (char *)cache + blk * bb;
    if (scale)
        *scale = (float *)(base + (size_t)NB_KV_BLOCK_SIZE * s->n_kv_heads * s->head_dim * kv_elem_size(s->kv_dtype)) +
                 row;
    return base + row * (size_t)s->head_dim * kv_elem_size(s->kv_dtype);
}

static void kv_store_row(void *cache, const nb_attn_shape *s, size_t slot, int h, const float *x) {
    float *scale;
    char *dst = kv_values(cache, s, slot, h, &scale);
    int hd = s->head_dim;
    if (s->kv_dtype == NB_KV_F32) {
        memcpy(dst, x, sizeof(float) * (size_t)hd);
        return;
    }
    if (s->kv_dtype == NB_KV_BF16) {
        for (int d = 0; d < hd; d++) ((uint16_t *)dst)[d] = f32_to_bf16(x[d]);
        return;
    }
    float amax = 0.0f;
    for (int d = 0; d < hd; d++) amax = fmaxf(amax, fabsf(x[d]));
    float sc = amax / (s->kv_dtype == NB_KV_INT8 ? 127.0f : QUANT_FP8_MAX), inv = sc > 0 ? 1.0f / sc : 0.0f;
    *scale = sc;
    for (int d = 0; d < hd; d++) {
        if (s->kv_dtype == NB_KV_INT8) ((int8_t *)dst)[d] = (int8_t)lrintf(fminf(fmaxf(x[d] * inv, -127.0f), 127.0f));
        else ((uint8_t *)dst)[d] = fp8_e4m3_from_f32(x[d] * inv);
    }
}

const float *cpu_kv_row(const void *cache, const nb_attn_shape *s, size_t slot, int kvh, float *buf) {
    float *scale;
    const char *src = kv_values(cache, s, slot, kvh, &scale);
    int hd = s->head_dim;
    switch (s->kv_dtype) {
    case NB_KV_F32: return (const float *)src;
    case NB_KV_BF16:
        for (int d = 0; d < hd; d++) buf[d] = bf16_to_f32(((const uint16_t *)src)[d]);
        break;
    case NB_KV_INT8:
        for (int d = 0; d < hd; d++) buf[d] = (float)((const int8_t *)src)[d] * *scale;
        break;
    case NB_KV_FP8:
        for (int d = 0; d < hd; d++) buf[d] = fp8_e4m3_to_f32(((const uint8_t *)src)[d]) * *scale;
        break;
    }
    return buf;
}

void cpu_kv_write(const nb_batch *batch, void *k_cache, void *v_cache, const float *k,
                  const float *v, const nb_attn_shape *s) {
    size_t row = (size_t)nb_attn_kv_stride(s);
    for (int t = 0; t < batch->n_tokens; t++)
        for (int h = 0; h < s->n_kv_heads; h++) {
            size_t slot = (size_t)batch->slot[t], off = (size_t)t * row + (size_t)h * s->head_dim;
            kv_store_row(k_cache, s, slot, h, k + off);
            kv_store_row(v_cache, s, slot, h, v + off);
        }
}

/* ---- attention --------------------------------------------------------- */

typedef struct attn_job {
    const nb_batch *batch;
    float *out;
    const float *q;
    const void *k_cache, *v_cache;
    const nb_attn_shape *s;
} attn_job;

/* One query head of one token. Online softmax one KV block at a time: the
 * block's scores are computed together, then the running sum and output are
 * rescaled once per block rather than once per key. */
static void attn_one(const attn_job *j, int t, int h) {
    const nb_attn_shape *s = j->s;
    const nb_batch *b = j->batch;
    int hd = s->head_dim, group = s->n_heads / s->n_kv_heads, kvh = h / group;
    float rowbuf[CPU_MAX_HEAD_DIM];
    const float *q = j->q + (size_t)t * nb_attn_q_stride(s) + (size_t)h * hd;
    float *o = j->out + ((size_t)t * s->n_heads + h) * hd;
    const int32_t *table = b->block_tables + (size_t)b->seq_of[t] * b->max_blocks;
    int n_ctx = b->pos[t] + 1;

    float acc[CPU_MAX_HEAD_DIM];
    memset(acc, 0, sizeof(float) * (size_t)hd);
    float run_max = -INFINITY, run_sum = 0.0f;
    for (int j0 = 0; j0 < n_ctx; j0 += NB_KV_BLOCK_SIZE) {
        int nb = n_ctx - j0 < NB_KV_BLOCK_SIZE ? n_ctx - j0 : NB_KV_BLOCK_SIZE;
        size_t base = (size_t)table[j0 / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE;
        float sc[NB_KV_BLOCK_SIZE];
        float bmax = -INFINITY;
        for (int i = 0; i < nb; i++) {
            const float *kr = cpu_kv_row(j->k_cache, s, base + (size_t)i, kvh, rowbuf);
            sc[i] = cpu_dot_f32(q, kr, hd) * s->scale;
            if (sc[i] > bmax) bmax = sc[i];
        }
        if (bmax > run_max) {
            /* exp(-inf) = 0 also clears the empty start */
            float corr = expf(run_max - bmax);
            run_sum *= corr;
            cpu_scale_f32(acc, corr, hd);
            run_max = bmax;
        }
        for (int i = 0; i < nb; i++) {
            float p = expf(sc[i] - run_max);
            run_sum += p;
            cpu_axpy_f32(acc, p, cpu_kv_row(j->v_cache, s, base + (size_t)i, kvh, rowbuf), hd);
        }
    }
    float inv = 1.0f / run_sum;
    for (int i = 0; i < hd; i++) o[i] = acc[i] * inv;
}

static void attn_task(void *arg, int task) {
    const attn_job *j = arg;
    attn_one(j, task / j->s->n_heads, task % j->s->n_heads);
}

void cpu_attention(threadpool *pool, const nb_batch *batch, float *out, const float *q,
                   const void *k_cache, const void *v_cache, const nb_attn_shape *s) {
    check_head_dim("attention", s->head_dim);
    if (s->n_kv_heads <= 0 || s->n_heads % s->n_kv_heads) {
        fprintf(stderr, "nibble: cpu attention: %d heads not a multiple of %d kv heads\n", s->n_heads,
                s->n_kv_heads);
        abort();
    }
    attn_job j = {batch, out, q, k_cache, v_cache, s};
    int n = batch->n_tokens;
    int64_t work = 0;
    for (int t = 0; t < n; t++) work += (int64_t)(batch->pos[t] + 1);
    work *= (int64_t)s->n_heads * s->head_dim * 2;
    if (work < PAR_MIN_WORK) {
        for (int t = 0; t < n; t++)
            for (int h = 0; h < s->n_heads; h++) attn_one(&j, t, h);
        return;
    }
    threadpool_run(pool, n * s->n_heads, attn_task, &j);
}
