/* The CUDA backend's KV cache writes, paged attention and recorded steps
 * against the CPU backend (`make test-gpu`; `make test` only builds this);
 * tolerances as explained in test_cuda_ops.c:
 *  - INT8/FP8 KV caches: the same quantization on both, so a value at most
 *    one code apart where it sits on a rounding tie (>= 99.9% identical);
 *    attention over them as tight as over F32/BF16 when no value differs;
 *  - prefill on tensor cores (head_dim % 16 == 0): BF16 operands, ATTN_TOL_BF16.
 * The same on the rows of a fused q|k|v projection (q_stride, kv_stride),
 * and there with rope_kv_write in kv_write's place (rope, after Qwen3's
 * per-head norms of each weight dtype or none, and the KV write in one
 * op): its rotated q and k heads within rope's 1e-5 of max |x|, V and
 * padding untouched, a rotated F32 or BF16 K cache within the same bound
 * (BF16: plus a code at ties), then attention as above.
 * Ends with CUDA graphs: a recorded decode step replayed with new positions,
 * slots and inputs must give what the same ops give issued one by one, also
 * when the GPU's step runs the fused projection and rope_kv_write.
 * Needs a CUDA device; fails (not skips) without one. */
#include "tests/gpu/gpu_test.h"

/* ---- KV cache and attention --------------------------------------------------- */

/* rope_kv_write's arguments on both backends, for steps on fused rows
 * that rotate q and k (after Qwen3's per-head norms when q_norm is set)
 * and write K and V in one op instead of kv_write. */
typedef struct rope_twin {
    int interleaved;
    const float *inv_c, *inv_g;        /* inv_freq: host, device */
    const twin_weight *q_norm, *k_norm; /* both NULL: no norms */
    double worst;                      /* the rotated heads' worst error, of max |x| */
} rope_twin;

/* One layer's K and V caches on both backends. */
typedef struct kv_twin {
    nb_attn_shape s;
    int n_blocks;
    size_t bytes;     /* of one cache */
    void *ck, *cv;    /* CPU */
    void *gk, *gv;    /* GPU */
    size_t written;   /* token rows written, for the INT8/FP8 statistics */
    rope_twin *rope;  /* NULL: steps write with kv_write, q and k as drawn */
} kv_twin;

static void kv_twin_init(kv_twin *c, const nb_attn_shape *s, int n_blocks) {
    c->s = *s;
    c->n_blocks = n_blocks;
    c->bytes = (size_t)n_blocks * nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim);
    c->ck = cpu->ops->alloc(cpu, c->bytes), c->cv = cpu->ops->alloc(cpu, c->bytes);
    c->gk = gpu->ops->alloc(gpu, c->bytes), c->gv = gpu->ops->alloc(gpu, c->bytes);
    c->written = 0;
    c->rope = NULL;
}

static void kv_twin_free(kv_twin *c) {
    cpu->ops->free(cpu, c->ck), cpu->ops->free(cpu, c->cv);
    gpu->ops->free(gpu, c->gk), gpu->ops->free(gpu, c->gv);
}

/* Sequences with block tables drawn from a shuffled pool of blocks (so
 * tables are scattered); entries past a sequence's need are -1. */
typedef struct seq_set {
    int n_seqs, max_blocks;
    int32_t *tables; /* [n_seqs][max_blocks] */
} seq_set;

/* len[s]: the most positions sequence s will hold. */
static void seq_set_init(seq_set *q, int n_seqs, const int *len, int max_blocks, int n_blocks) {
    int *perm = xmalloc(sizeof(int) * n_blocks);
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = irand(i + 1), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    q->n_seqs = n_seqs, q->max_blocks = max_blocks;
    q->tables = xmalloc(sizeof(int32_t) * (size_t)n_seqs * max_blocks);
    int used = 0;
    for (int s = 0; s < n_seqs; s++) {
        int need = (len[s] + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
        if (need > max_blocks || used + need > n_blocks) {
            fprintf(stderr, "test bug: %d blocks for sequence %d do not fit\n", need, s);
            abort();
        }
        for (int b = 0; b < max_blocks; b++) q->tables[(size_t)s * max_blocks + b] = b < need ? perm[used++] : -1;
    }
    free(perm);
}

static int32_t slot_of(const seq_set *q, int s, int p) {
    return q->tables[(size_t)s * q->max_blocks + p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
}

/* A run of positions [p0, p1) of sequence seq in a step. */
typedef struct seg {
    int seq, p0, p1;
} seg;

/* A step's batch over all sequences of q: the segments one after another,
 * or (interleave) one token of each in turn. */
typedef struct step_batch {
    nb_batch b;
    int32_t *pos, *seq_of, *slot;
} step_batch;

static void step_batch_init(step_batch *st, const seq_set *q, const seg *segs, int n_segs, int interleave) {
    int n = 0;
    for (int i = 0; i < n_segs; i++) n += segs[i].p1 - segs[i].p0;
    st->pos = xmalloc(sizeof(int32_t) * n), st->seq_of = xmalloc(sizeof(int32_t) * n);
    st->slot = xmalloc(sizeof(int32_t) * n);
    int t = 0;
    if (interleave) {
        for (int k = 0; t < n; k++)
            for (int i = 0; i < n_segs; i++) {
                int p = segs[i].p0 + k;
                if (p >= segs[i].p1) continue;
                st->pos[t] = p, st->seq_of[t] = segs[i].seq, st->slot[t] = slot_of(q, segs[i].seq, p);
                t++;
            }
    } else {
        for (int i = 0; i < n_segs; i++)
            for (int p = segs[i].p0; p < segs[i].p1; p++, t++)
                st->pos[t] = p, st->seq_of[t] = segs[i].seq, st->slot[t] = slot_of(q, segs[i].seq, p);
    }
    st->b = (nb_batch){n, st->pos, st->seq_of, st->slot, q->n_seqs, q->max_blocks, q->tables};
}

static void step_batch_free(step_batch *st) { free(st->pos), free(st->seq_of), free(st->slot); }

/* rope_kv_write's q and k heads, GPU against CPU: the bound of rope's in
 * test_cuda_ops.c, 1e-5 of max |x|. Without norms only cosf/sinf differ
 * (an ulp or two of each factor). With norms the sum of squares is summed
 * in another order too, which moves a head's scale by a few ulps (~1e-7
 * relative even at head_dim 256), and the weight multiplies that: the
 * error stays near 1e-7 of max |x|, so the norms need no looser bound (the
 * former qk_norm_rope test held them to 1e-5 as well). A head rotated at a
 * wrong position, not normalized or normalized by the other weight is off
 * by order 1. */
#define ROPE_TOL 1e-5

/* After rope_kv_write on the fused rows: the CPU's rows are host, the
 * GPU's dq. The q and k heads of each row within ROPE_TOL of the CPU's,
 * the V heads and any padding bit for bit the input in0. */
static void check_rotated(kv_twin *c, const float *host, const float *in0, const float *dq, size_t n) {
    const nb_attn_shape *s = &c->s;
    size_t row = (size_t)nb_attn_q_stride(s), w = (size_t)(s->n_heads + s->n_kv_heads) * s->head_dim, rest = 0;
    float *got = from_gpu(dq, n * row);
    float *gr = xmalloc(sizeof(float) * n * w), *cr = xmalloc(sizeof(float) * n * w);
    for (size_t t = 0; t < n; t++) {
        memcpy(gr + t * w, got + t * row, sizeof(float) * w);
        memcpy(cr + t * w, host + t * row, sizeof(float) * w);
        rest += n_mismatch(got + t * row + w, in0 + t * row + w, row - w);
    }
    double err = rel_max(gr, cr, n * w);
    CHECK(err <= ROPE_TOL, "%s: rope_kv_write's q and k heads: error %.3g of max |x|", t_where, err);
    CHECK(rest == 0, "%s: rope_kv_write changed %zu floats of V or padding", t_where, rest);
    note_worst(&c->rope->worst, err);
    free(got), free(gr), free(cr);
}

/* One step on both backends: set_batch, kv_write of random K/V and, when
 * attend, attention of random queries. Returns the attention output's
 * relative error (0 without attention). Packed shapes (q_stride and
 * kv_stride 0) take q, k and v from buffers of their own; strided ones
 * from one buffer of rows nb_attn_q_stride apart (== nb_attn_kv_stride),
 * laid out as a fused q|k|v projection's: q at 0, k after the q heads, v
 * after the k heads, and random floats in any padding after v. So a
 * kernel that ignores a stride reads another token's or another part's
 * values and fails. With c->rope (fused rows only) rope_kv_write takes
 * kv_write's place: each backend rotates its own copy of the rows in place
 * (checked: check_rotated) and attention reads each one's rotated q. */
static double step_both(kv_twin *c, const nb_batch *b, int attend) {
    const nb_attn_shape *s = &c->s;
    size_t n = (size_t)b->n_tokens, qd = (size_t)s->n_heads * s->head_dim, kvd = (size_t)s->n_kv_heads * s->head_dim;
    size_t qn = n * qd, row = (size_t)nb_attn_q_stride(s);
    int fused = s->q_stride || s->kv_stride;
    if (fused && (row != (size_t)nb_attn_kv_stride(s) || row < qd + 2 * kvd)) {
        fprintf(stderr, "test bug: strides %d / %d are not a fused q|k|v row\n", s->q_stride, s->kv_stride);
        abort();
    }
    if (c->rope && !nb_attn_fused_rows(s)) {
        fprintf(stderr, "test bug: rope_kv_write on rows that are not fused q|k|v rows\n");
        abort();
    }
    /* on the host: the fused rows, or q, k, v one after another; on the
     * GPU: the fused rows, or each of q, k, v in an allocation of its own */
    size_t len = fused ? n * row : qn + 2 * n * kvd;
    float *buf = randn(len, 1.0f);
    const float *q = buf, *k = fused ? buf + qd : buf + qn, *v = fused ? buf + qd + kvd : buf + qn + n * kvd;
    float *dq, *dk, *dv;
    if (fused) {
        dq = to_gpu(buf, sizeof(float) * len);
        dk = dq + qd, dv = dq + qd + kvd;
    } else {
        dq = to_gpu(q, sizeof(float) * qn);
        dk = to_gpu(k, sizeof(float) * n * kvd), dv = to_gpu(v, sizeof(float) * n * kvd);
    }
    cpu->ops->set_batch(cpu, b);
    gpu->ops->set_batch(gpu, b);
    if (c->rope) {
        const rope_twin *r = c->rope;
        float *in0 = copy_floats(buf, len);
        cpu->ops->rope_kv_write(cpu, buf, c->ck, c->cv, s, r->q_norm ? &r->q_norm->c : NULL,
                                r->k_norm ? &r->k_norm->c : NULL, 1e-6f, r->inv_c, r->interleaved);
        gpu->ops->rope_kv_write(gpu, dq, c->gk, c->gv, s, r->q_norm ? &r->q_norm->g : NULL,
                                r->k_norm ? &r->k_norm->g : NULL, 1e-6f, r->inv_g, r->interleaved);
        check_rotated(c, buf, in0, dq, n);
        free(in0);
    } else {
        cpu->ops->kv_write(cpu, c->ck, c->cv, k, v, s);
        gpu->ops->kv_write(gpu, c->gk, c->gv, dk, dv, s);
    }
    c->written += n;
    double err = 0;
    if (attend) {
        float *ref = xmalloc(sizeof(float) * qn), *dout = gpu->ops->alloc(gpu, sizeof(float) * qn);
        cpu->ops->attention(cpu, ref, q, c->ck, c->cv, s);
        gpu->ops->attention(gpu, dout, dq, c->gk, c->gv, s);
        float *got = from_gpu(dout, qn);
        err = rel_l2(got, ref, qn, 0);
        gpu->ops->free(gpu, dout);
        free(ref), free(got);
    }
    if (!fused) gpu->ops->free(gpu, dk), gpu->ops->free(gpu, dv);
    gpu->ops->free(gpu, dq);
    free(buf);
    return err;
}

/* Writes positions [0, upto[s]) of every sequence without attention (with
 * kv_write, or rope_kv_write in c->rope's mode), in steps of at most
 * `chunk` tokens (earlier steps' context). */
static void write_history(kv_twin *c, const seq_set *q, const int *upto, int chunk) {
    for (int s = 0; s < q->n_seqs; s++)
        for (int p0 = 0; p0 < upto[s]; p0 += chunk) {
            seg g = {s, p0, p0 + chunk < upto[s] ? p0 + chunk : upto[s]};
            step_batch st;
            step_batch_init(&st, q, &g, 1, 0);
            step_both(c, &st.b, 0);
            step_batch_free(&st);
        }
}

/* E4M3 codes ordered by value: sign and magnitude. */
static int fp8_rank(uint8_t b) { return b & 0x80 ? -(int)(b & 0x7f) : (int)(b & 0x7f); }

/* The K cache after rope_kv_writes, F32 or BF16: each backend wrote its own
 * rotation of k, within ROPE_TOL of max |x| of the other's
 * (check_rotated). F32: the same bound over the cache; the differences are
 * not counted (attention's ATTN_TOL_SAME covers q and k moved by 1e-5).
 * BF16: rounding adds at most a code where the two rotations straddle a
 * tie (2^-7 of the value), so ROPE_TOL of max |x| plus that; not "one code
 * apart", as near zero ROPE_TOL of max |x| spans many codes. At most 0.1%
 * of the written values may differ at all (ties and values near zero: up
 * to 1e-5 of them on the emulator, where only the norms' sums differ);
 * rounding other than to nearest even differs in about half. Returns the
 * values that differ. */
static size_t check_rotated_k(const kv_twin *c, const unsigned char *h, const unsigned char *g, const char *what) {
    const nb_attn_shape *s = &c->s;
    if (s->kv_dtype == NB_KV_F32) {
        double err = rel_max((const float *)g, (const float *)h, c->bytes / sizeof(float));
        CHECK(err <= ROPE_TOL, "%s: K cache: error %.3g of max |x|", what, err);
        return 0;
    }
    const uint16_t *hv = (const uint16_t *)h, *gv = (const uint16_t *)g;
    size_t n = c->bytes / 2, diff = 0, far = 0, written = c->written * s->n_kv_heads * s->head_dim;
    double amax = 0;
    for (size_t i = 0; i < n; i++) amax = fmax(amax, fabs(bf16_to_f32(hv[i])));
    for (size_t i = 0; i < n; i++) {
        if (hv[i] == gv[i]) continue;
        double x = bf16_to_f32(hv[i]), y = bf16_to_f32(gv[i]);
        diff++;
        far += !(fabs(x - y) <= ROPE_TOL * amax + 0x1p-7 * fmax(fabs(x), fabs(y)));
    }
    CHECK(far == 0, "%s: K cache: %zu values off by more than ROPE_TOL of max |x| and a code", what, far);
    CHECK(diff * 1000 <= written, "%s: K cache: %zu of %zu written values differ (> 0.1%%)", what, diff, written);
    return diff;
}

/* The caches after the same kv_writes: F32 and BF16 bit for bit (both round
 * to nearest even); INT8/FP8 values at most one code apart where they
 * differ, at least 99.9% of the written values identical, and scales
 * within 1e-6 relative (both compute max|x| / 127 or / 448). Returns the
 * number of bytes or values that differ. After rope_kv_writes (c->rope) the
 * same, but for an F32 or BF16 K cache: check_rotated_k. (INT8/FP8 K
 * values quantize each backend's rotation, a few ulps of the head's max |x|
 * apart: far less than the smallest code, FP8's 2^-9 of max |x| / 448
 * (4.4e-6 of it), so a value lands at most one code off, where the two
 * straddle a tie, which the one code and 0.1% allow; the scales move by
 * ulps.) */
static size_t check_caches(const kv_twin *c, const char *what) {
    const nb_attn_shape *s = &c->s;
    size_t all_diff = 0;
    for (int which = 0; which < 2; which++) {
        const unsigned char *h = which ? c->cv : c->ck;
        unsigned char *g = xmalloc(c->bytes);
        gpu->ops->download(gpu, g, which ? c->gv : c->gk, c->bytes);
        const char *kv = which ? "V" : "K";
        if (c->rope && !which && (s->kv_dtype == NB_KV_F32 || s->kv_dtype == NB_KV_BF16)) {
            all_diff += check_rotated_k(c, h, g, what);
        } else if (s->kv_dtype == NB_KV_F32 || s->kv_dtype == NB_KV_BF16) {
            size_t diff = 0;
            for (size_t i = 0; i < c->bytes; i++) diff += h[i] != g[i];
            CHECK(diff == 0, "%s: %s cache: %zu of %zu bytes differ", what, kv, diff, c->bytes);
            all_diff += diff;
        } else {
            size_t bb = nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim);
            size_t vals = (size_t)NB_KV_BLOCK_SIZE * s->n_kv_heads * s->head_dim;
            size_t n_scales = (size_t)NB_KV_BLOCK_SIZE * s->n_kv_heads;
            size_t diff = 0, far = 0, bad_scale = 0;
            for (int b = 0; b < c->n_blocks; b++) {
                const unsigned char *hb = h + (size_t)b * bb, *gb = g + (size_t)b * bb;
                for (size_t i = 0; i < vals; i++) {
                    if (hb[i] == gb[i]) continue;
                    diff++;
                    int dist = s->kv_dtype == NB_KV_INT8 ? abs((int)(int8_t)hb[i] - (int)(int8_t)gb[i])
                                                         : abs(fp8_rank(hb[i]) - fp8_rank(gb[i]));
                    far += dist > 1;
                }
                const float *hs = (const float *)(hb + vals), *gs = (const float *)(gb + vals);
                for (size_t i = 0; i < n_scales; i++) {
                    double x = hs[i], y = gs[i];
                    bad_scale += !(fabs(x - y) <= 1e-6 * fmax(fabs(x), fabs(y)));
                }
            }
            size_t written = c->written * s->n_kv_heads * s->head_dim;
            CHECK(far == 0, "%s: %s cache: %zu values more than one code apart", what, kv, far);
            CHECK(diff * 1000 <= written, "%s: %s cache: %zu of %zu written values differ (> 0.1%%)", what, kv,
                  diff, written);
            CHECK(bad_scale == 0, "%s: %s cache: %zu scales differ by more than 1e-6", what, kv, bad_scale);
            all_diff += diff + bad_scale;
        }
        free(g);
    }
    return all_diff;
}

static const struct {
    int heads, kv_heads;
} HEADS[] = {{8, 2}, {4, 4}, {12, 4}};
/* 40: not a multiple of 16, so prefill takes the CUDA-core kernel */
static const int HEAD_DIMS[] = {16, 40, 64, 128, 256};
#define N_HEAD_DIMS (int)(sizeof HEAD_DIMS / sizeof HEAD_DIMS[0])
static const nb_kv_dtype KV_TYPES[] = {NB_KV_F32, NB_KV_BF16, NB_KV_INT8, NB_KV_FP8};
/* Attention bounds, relative to the output norm. When the two caches hold
 * the same bytes (always for F32/BF16, checked), only the FP32 summation
 * order and expf differ: 1e-4 (the CPU itself is ~2e-6 from double
 * precision at 5000 positions; one position too few or too many at a
 * context of 1000+ moves outputs by ~1e-3). An INT8/FP8 value one code
 * apart (a rounding tie) moves an output by up to a code's size: 2e-2. */
#define ATTN_TOL_SAME 1e-4
#define ATTN_TOL_TIES 2e-2
/* Prefill with head_dim a multiple of 16 runs on tensor cores
 * (cuda_attention.cu, prefill_dispatch): Q (pre-scaled), K, P and V rounded
 * to BF16, 8 significant bits, so each carries a relative rounding error of
 * up to 2^-9 (~1.1e-3 rms), with FP32 accumulation. Here q and k are unit
 * normals and scale = 1/sqrt(head_dim), so a score is ~N(0, 1) and rounding
 * Q and K moves it by ~sqrt(2) * 1.1e-3 = 1.6e-3 rms: each softmax weight
 * moves by that relative amount; P and V add ~1.1e-3 each. These errors are
 * independent across positions and average out as the output does, so the
 * relative L2 error is 2-3e-3 at any context length over an F32, INT8 or FP8
 * cache (~1.6e-3 over BF16, whose K and V are exact). 1e-2 leaves a 3x
 * margin; a wrong index, fragment or mask gives errors of order 1. */
#define ATTN_TOL_BF16 1e-2

static int prefill_on_tensor_cores(int head_dim) { return head_dim % 16 == 0; }

/* The bound on a step's attention error at head_dim hd when the caches
 * differ in cache_diff values: on tensor cores a tie's code and BF16
 * rounding add at most. */
static double attn_tol(int prefill, int hd, size_t cache_diff) {
    if (prefill && prefill_on_tensor_cores(hd)) return ATTN_TOL_BF16 + (cache_diff ? ATTN_TOL_TIES : 0);
    return cache_diff ? ATTN_TOL_TIES : ATTN_TOL_SAME;
}

#define N_HEADS (int)(sizeof HEADS / sizeof HEADS[0])

/* Decode only: five sequences of one token each at contexts 1 .. 5000,
 * their earlier positions written by kv_write steps of up to 1024 tokens;
 * two decode steps (the second reads the first's K/V), the step's tokens
 * in an order other than the sequences'. rope: NULL, or every step (the
 * earlier positions' too) in its rope_kv_write mode (kv_twin). */
static double check_decode(const nb_attn_shape *s, rope_twin *rope, size_t *cache_diff) {
    enum { NS = 5, STEPS = 2 };
    static const int ctx[NS] = {1, 17, 300, 2100, 5000}; /* at the first decode step, its token included */
    static const int order[NS] = {3, 0, 4, 1, 2};
    int len[NS], hist[NS], n_blocks = 3; /* 3 blocks no table uses */
    for (int i = 0; i < NS; i++) {
        len[i] = ctx[i] + STEPS - 1;
        hist[i] = ctx[i] - 1;
        n_blocks += (len[i] + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    }
    seq_set q;
    seq_set_init(&q, NS, len, (5000 + STEPS + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE + 2, n_blocks);
    kv_twin c;
    kv_twin_init(&c, s, n_blocks);
    c.rope = rope;
    write_history(&c, &q, hist, 1024);
    double worst = 0;
    for (int k = 0; k < STEPS; k++) {
        seg segs[NS];
        for (int i = 0; i < NS; i++) segs[i] = (seg){order[i], hist[order[i]] + k, hist[order[i]] + k + 1};
        step_batch st;
        step_batch_init(&st, &q, segs, NS, 0);
        note_worst(&worst, step_both(&c, &st.b, 1));
        step_batch_free(&st);
    }
    *cache_diff = check_caches(&c, t_where);
    kv_twin_free(&c);
    free(q.tables);
    return worst;
}

/* Decode of 80 sequences at once (contexts 1 .. ~1300, so some span
 * several ATTN_PART parts): with 4 or more KV heads that is at least 320
 * (token, kv head) pairs, enough to fill twice any GPU of up to 160 SMs,
 * so the decode kernel runs each pair's whole context in one block and
 * normalizes its own output (no merge kernel; cuda_attention.cu). */
static double check_decode_wide(const nb_attn_shape *s, size_t *cache_diff) {
    enum { NS = 80 };
    int len[NS], hist[NS], order[NS], n_blocks = 3;
    for (int i = 0; i < NS; i++) {
        hist[i] = (i * 337) % 1300; /* 0 .. 1299 earlier positions */
        len[i] = hist[i] + 1;
        order[i] = (i * 31) % NS; /* 31 and 80 are coprime: a permutation */
        n_blocks += (len[i] + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    }
    seq_set q;
    seq_set_init(&q, NS, len, 1300 / NB_KV_BLOCK_SIZE + 2, n_blocks);
    kv_twin c;
    kv_twin_init(&c, s, n_blocks);
    write_history(&c, &q, hist, 2048);
    seg segs[NS];
    for (int i = 0; i < NS; i++) segs[i] = (seg){order[i], hist[order[i]], hist[order[i]] + 1};
    step_batch st;
    step_batch_init(&st, &q, segs, NS, 0);
    double err = step_both(&c, &st.b, 1);
    step_batch_free(&st);
    *cache_diff = check_caches(&c, t_where);
    kv_twin_free(&c);
    free(q.tables);
    return err;
}

/* Prefill: whole prompts, a chunk continuing a sequence, a first token, a
 * decode token and a 48-token chunk at position 2000 in one step; then two
 * sequences' tokens interleaved one by one. rope as check_decode's. */
static double check_prefill(const nb_attn_shape *s, rope_twin *rope, size_t *cache_diff) {
    enum { A, B, C, D, E, NS };
    static const int len[NS] = {96, 137, 1, 131, 2048};
    static const int hist[NS] = {0, 0, 0, 0, 2000}; /* E's context before the steps */
    seq_set q;
    seq_set_init(&q, NS, len, 2048 / NB_KV_BLOCK_SIZE + 2, 160);
    kv_twin c;
    kv_twin_init(&c, s, 160);
    c.rope = rope;
    write_history(&c, &q, hist, 1000);
    static const seg step1[] = {{D, 0, 130}, {A, 0, 77}, {B, 0, 40}};
    static const seg step2[] = {{B, 40, 121}, {C, 0, 1}, {D, 130, 131}, {A, 77, 80}, {E, 2000, 2048}};
    static const seg step3[] = {{A, 80, 96}, {B, 121, 137}};
    static const struct {
        const seg *segs;
        int n, interleave;
    } steps[] = {{step1, 3, 0}, {step2, 5, 0}, {step3, 2, 1}};
    double worst = 0;
    for (int k = 0; k < 3; k++) {
        step_batch st;
        step_batch_init(&st, &q, steps[k].segs, steps[k].n, steps[k].interleave);
        note_worst(&worst, step_both(&c, &st.b, 1));
        step_batch_free(&st);
    }
    *cache_diff = check_caches(&c, t_where);
    kv_twin_free(&c);
    free(q.tables);
    return worst;
}

/* Strides of a fused q|k|v row for s, plus pad floats after v (pad < 0:
 * packed rows, both strides 0). */
static void set_strides(nb_attn_shape *s, int pad) {
    int row = (s->n_heads + 2 * s->n_kv_heads) * s->head_dim + pad;
    s->q_stride = s->kv_stride = pad < 0 ? 0 : row;
}

/* Every KV type over shapes from the first n_heads_cfg of HEADS x
 * head_dims, packed (pad < 0) or on fused q|k|v rows with pad floats after
 * v. */
static void run_attention(int prefill, int n_heads_cfg, const int *head_dims, int n_hd, int pad) {
    const char *rows = pad < 0 ? "" : pad ? ", fused q|k|v rows + pad" : ", fused q|k|v rows";
    for (int kt = 0; kt < 4; kt++) {
        double worst = 0, worst_tc = 0;
        for (int h = 0; h < n_heads_cfg; h++)
            for (int d = 0; d < n_hd; d++) {
                int hd = head_dims[d], tc = prefill && prefill_on_tensor_cores(hd);
                nb_attn_shape s = {HEADS[h].heads, HEADS[h].kv_heads, hd, 1.0f / sqrtf((float)hd), KV_TYPES[kt], 0, 0};
                set_strides(&s, pad);
                WHERE("%s attention kv %s heads=%d kv_heads=%d head_dim=%d q/kv stride %d/%d (%s cores)",
                      prefill ? "prefill" : "decode", nb_kv_dtype_name(s.kv_dtype), s.n_heads, s.n_kv_heads, hd,
                      s.q_stride, s.kv_stride, tc ? "tensor" : "CUDA");
                size_t cache_diff = 0;
                double err = prefill ? check_prefill(&s, NULL, &cache_diff) : check_decode(&s, NULL, &cache_diff);
                double tol = attn_tol(prefill, hd, cache_diff);
                CHECK(err <= tol, "%s: relative error %.3g > %g (caches %s)", t_where, err, tol,
                      cache_diff ? "differ" : "identical");
                note_worst(tc ? &worst_tc : &worst, err);
            }
        if (prefill)
            printf("  prefill attention, kv %-13s%s: worst relative error %.2e on CUDA cores, %.2e on tensor cores\n",
                   nb_kv_dtype_name(KV_TYPES[kt]), rows, worst, worst_tc);
        else
            printf("  decode  attention, kv %-13s%s: worst relative error %.2e\n", nb_kv_dtype_name(KV_TYPES[kt]),
                   rows, worst);
    }
}

static void test_attention_decode(void) { run_attention(0, N_HEADS, HEAD_DIMS, N_HEAD_DIMS, -1); }
static void test_attention_prefill(void) { run_attention(1, N_HEADS, HEAD_DIMS, N_HEAD_DIMS, -1); }

/* The decode kernel's other shapes, every KV type: query groups of 8 (one
 * pass of 8 heads), 10 (a pass of 8 and one of 2) and 16 (two of 8); head
 * dims no 8-value chunk divides (36: 18 chunks of 2; 100 and 250: more
 * chunks than lanes, so a lane takes 2 and 4); and a batch wide enough
 * that each (token, kv head) takes its whole context in one block
 * (check_decode_wide). */
static void test_attention_decode_shapes(void) {
    static const struct {
        int heads, kv_heads, hd, wide;
    } shapes[] = {{16, 2, 64, 0}, {20, 2, 128, 0}, {32, 2, 64, 0}, {4, 2, 36, 0},
                  {6, 2, 100, 0}, {8, 4, 250, 0},  {12, 4, 64, 1}, {8, 8, 128, 1}};
    for (int kt = 0; kt < 4; kt++) {
        double worst = 0;
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
            int hd = shapes[i].hd;
            nb_attn_shape s = {shapes[i].heads, shapes[i].kv_heads, hd, 1.0f / sqrtf((float)hd), KV_TYPES[kt], 0, 0};
            WHERE("decode attention%s kv %s heads=%d kv_heads=%d head_dim=%d", shapes[i].wide ? ", 80 sequences," : "",
                  nb_kv_dtype_name(s.kv_dtype), s.n_heads, s.n_kv_heads, hd);
            size_t cache_diff = 0;
            double err = shapes[i].wide ? check_decode_wide(&s, &cache_diff) : check_decode(&s, NULL, &cache_diff);
            double tol = attn_tol(0, hd, cache_diff);
            CHECK(err <= tol, "%s: relative error %.3g > %g", t_where, err, tol);
            note_worst(&worst, err);
        }
        printf("  decode  attention, kv %-13s, groups of 8-16, odd head dims, 80 sequences: worst relative error "
               "%.2e\n",
               nb_kv_dtype_name(KV_TYPES[kt]), worst);
    }
}

/* kv_write reading k/v rows and attention reading q rows of a fused q|k|v
 * buffer (step_both): the caches must hold what the CPU writes from the
 * same rows, and attention match as on packed rows. head_dim 40 takes the
 * CUDA-core prefill kernel, 64 and 128 the tensor-core one (both of its
 * instantiations); rows with 3 floats of padding (an odd stride) put q, k
 * and v at every 16-byte alignment. */
static void test_attention_strided(int prefill) {
    static const int fused[] = {40, 128}, padded[] = {40, 64};
    run_attention(prefill, N_HEADS, fused, 2, 0);
    run_attention(prefill, 1, padded, 2, 3);
}
static void test_attention_decode_strided(void) { test_attention_strided(0); }
static void test_attention_prefill_strided(void) { test_attention_strided(1); }

/* rope_kv_write in place of kv_write (step_both's rope mode) on fused
 * q|k|v rows, in check_decode's and check_prefill's steps: the GPU's
 * rotated q and k heads (check_rotated, at positions up to ~5000), its
 * caches (check_caches) and attention over its rotated q against the
 * CPU's. Not the full cross product (the emulator is slow): every KV type
 * with every head dim (40 takes the CUDA-core prefill kernel), and for
 * each pair one heads config of HEADS, one of the norms (none; F32, BF16,
 * F16 weights) and one rope style, drawn in turn so that each KV type and
 * each head dim meets every norm and both styles, and each norm and each
 * heads config both styles; rows with 3 floats of padding after v once
 * per KV type, each time at another head dim. Normed cases rotate with
 * Qwen3's theta (1e6), the others with 1e4. */
static void test_rope_kv_write(void) {
    static const int norm_types[] = {-1, NB_F32, NB_BF16, NB_F16}; /* -1: no norms */
    for (int kt = 0; kt < 4; kt++) {
        double worst_rope = 0, worst[2] = {0, 0};
        for (int d = 0; d < N_HEAD_DIMS; d++) {
            int hd = HEAD_DIMS[d], h = (kt + d) % N_HEADS, nt = norm_types[(kt + d) % 4], il = (kt + d / 2) % 2;
            int pad = d == kt ? 3 : 0;
            nb_attn_shape s = {HEADS[h].heads, HEADS[h].kv_heads, hd, 1.0f / sqrtf((float)hd), KV_TYPES[kt], 0, 0};
            set_strides(&s, pad);
            float *inv = xmalloc(sizeof(float) * hd / 2);
            double theta = nt >= 0 ? 1e6 : 1e4;
            for (int i = 0; i < hd / 2; i++) inv[i] = (float)(1.0 / pow(theta, 2.0 * i / hd));
            twin_weight norms[2];
            for (int i = 0; i < 2 && nt >= 0; i++) norms[i] = make_weight((nb_dtype)nt, 1, hd, 1.0f);
            rope_twin r = {il, inv, to_gpu(inv, sizeof(float) * hd / 2), nt >= 0 ? &norms[0] : NULL,
                           nt >= 0 ? &norms[1] : NULL, 0};
            for (int prefill = 0; prefill < 2; prefill++) {
                WHERE("%s rope_kv_write kv %s heads=%d kv_heads=%d head_dim=%d stride %d, %s, norms %s",
                      prefill ? "prefill" : "decode", nb_kv_dtype_name(s.kv_dtype), s.n_heads, s.n_kv_heads, hd,
                      s.q_stride, il ? "interleaved" : "neox", nt >= 0 ? nb_dtype_name((nb_dtype)nt) : "none");
                size_t cache_diff = 0;
                double err = prefill ? check_prefill(&s, &r, &cache_diff) : check_decode(&s, &r, &cache_diff);
                double tol = attn_tol(prefill, hd, cache_diff);
                CHECK(err <= tol, "%s: relative error %.3g > %g (caches %s)", t_where, err, tol,
                      cache_diff ? "differ" : "identical");
                note_worst(&worst[prefill], err);
            }
            note_worst(&worst_rope, r.worst);
            if (nt >= 0) free_weight(&norms[0]), free_weight(&norms[1]);
            gpu->ops->free(gpu, (void *)r.inv_g);
            free(inv);
        }
        printf("  rope_kv_write, kv %-13s: q/k heads worst error %.2e of max |x|, then attention %.2e decode, "
               "%.2e prefill\n",
               nb_kv_dtype_name(KV_TYPES[kt]), worst_rope, worst[0], worst[1]);
    }
}

/* ---- CUDA graphs ---------------------------------------------------------------- */

/* A small decoder layer on one backend: its buffers, weights and caches.
 * fused: one q|k|v projection (wqkv, rows of qkv) as the model's fused
 * layers have, so rope_kv_write and attention work on its strided rows. */
typedef struct mini_layer {
    nb_backend *be;
    float *x, *xn, *q, *k, *v, *att, *o; /* for up to 12 tokens */
    float *qkv;                          /* fused: 12 rows of q|k|v */
    const float *inv_freq;
    void *kc, *vc;
    nb_weight norm, wq, wk, wv, wo, wqkv;
    nb_attn_shape s; /* fused: q_stride = kv_stride = the q|k|v row */
    int fused;
} mini_layer;

/* What a model's decode step issues: norm, projections, rope, KV write
 * (fused: rope_kv_write, as engine/model/model.c issues it), attention,
 * output projection, residual. */
static void mini_forward(const mini_layer *L, int n) {
    nb_backend *be = L->be;
    const nb_backend_ops *op = be->ops;
    int H = L->s.n_heads * L->s.head_dim, KVD = L->s.n_kv_heads * L->s.head_dim;
    op->rmsnorm(be, L->xn, L->x, &L->norm, n, 1e-5f);
    if (L->fused) {
        /* q and k heads rotated and K and V written in one op (no head
         * norms: eps unused); attention reads q from the rows */
        op->matmul(be, L->qkv, L->xn, &L->wqkv, n);
        op->rope_kv_write(be, L->qkv, L->kc, L->vc, &L->s, NULL, NULL, 1e-6f, L->inv_freq, 0);
        op->attention(be, L->att, L->qkv, L->kc, L->vc, &L->s);
        op->matmul(be, L->o, L->att, &L->wo, n);
        op->add(be, L->x, L->x, L->o, (size_t)n * H);
        return;
    }
    op->matmul(be, L->q, L->xn, &L->wq, n);
    op->matmul(be, L->k, L->xn, &L->wk, n);
    op->matmul(be, L->v, L->xn, &L->wv, n);
    op->rope(be, L->q, L->s.n_heads, L->s.head_dim, H, L->inv_freq, 0);
    op->rope(be, L->k, L->s.n_kv_heads, L->s.head_dim, KVD, L->inv_freq, 0);
    op->kv_write(be, L->kc, L->vc, L->k, L->v, &L->s);
    op->attention(be, L->att, L->q, L->kc, L->vc, &L->s);
    op->matmul(be, L->o, L->att, &L->wo, n);
    op->add(be, L->x, L->x, L->o, (size_t)n * H);
}

enum { G_NH = 8, G_NKV = 2, G_HD = 64, G_H = G_NH * G_HD, G_KVD = G_NKV * G_HD, G_MAXB = 100, G_NSEQ = 20,
       G_MAXT = 12 };

typedef struct graph_rig {
    mini_layer c, g;
    seq_set q;
    int len[G_NSEQ]; /* positions written so far */
    twin_weight norm, wq, wk, wv, wo, wqkv;
    float *inv;
    uint64_t key_base; /* added to the steps' nonzero keys */
} graph_rig;

/* wq, wk and wv stacked by rows into one weight: the fused projection
 * whose output rows are q|k|v. */
static twin_weight weight_stack3(const twin_weight *a, const twin_weight *b, const twin_weight *c) {
    const twin_weight *p[3] = {a, b, c};
    size_t es = nb_dtype_size(a->c.dtype), bytes = 0;
    for (int i = 0; i < 3; i++) bytes += (size_t)(p[i]->c.rows * p[i]->c.cols) * es;
    char *data = xmalloc(bytes), *d = data;
    for (int i = 0; i < 3; i++) {
        size_t n = (size_t)(p[i]->c.rows * p[i]->c.cols) * es;
        memcpy(d, p[i]->c.data, n);
        d += n;
    }
    twin_weight w;
    w.c = (nb_weight){.dtype = a->c.dtype, .rows = a->c.rows + b->c.rows + c->c.rows, .cols = a->c.cols, .data = data};
    w.g = w.c;
    w.g.data = gpu->ops->weight_load(gpu, data, bytes);
    return w;
}

/* One decode step of the sequences seqs[0..n) (one token each, so n_seqs ==
 * n_tokens as a model's decode step has) on both backends. The GPU brackets
 * it with graph_begin(key) / graph_end: `expect` is graph_begin's answer
 * (1: replayed, the ops are not issued). Returns the worst relative error of
 * the attention output and of the layer output. */
static double graph_step(graph_rig *r, const int *seqs, int n, uint64_t key, int expect, const char *what) {
    int32_t pos[G_MAXT], seq_of[G_MAXT], slot[G_MAXT], tables[G_MAXT * G_MAXB];
    for (int i = 0; i < n; i++) {
        int s = seqs[i];
        pos[i] = r->len[s], seq_of[i] = i, slot[i] = slot_of(&r->q, s, r->len[s]);
        memcpy(tables + i * G_MAXB, r->q.tables + (size_t)s * G_MAXB, sizeof(int32_t) * G_MAXB);
        r->len[s]++;
    }
    nb_batch b = {n, pos, seq_of, slot, n, G_MAXB, tables};
    size_t xn = (size_t)n * G_H;
    float *x = randn(xn, 1.0f);
    memcpy(r->c.x, x, sizeof(float) * xn);
    gpu->ops->upload(gpu, r->g.x, x, sizeof(float) * xn);

    if (key) key += r->key_base;
    cpu->ops->set_batch(cpu, &b);
    if (!cpu->ops->graph_begin(cpu, key)) {
        mini_forward(&r->c, n);
        cpu->ops->graph_end(cpu);
    }
    gpu->ops->set_batch(gpu, &b);
    int replayed = gpu->ops->graph_begin(gpu, key);
    CHECK(replayed == expect, "%s: graph_begin(%llu) returned %d, want %d", what, (unsigned long long)key, replayed,
          expect);
    if (!replayed) {
        mini_forward(&r->g, n);
        gpu->ops->graph_end(gpu);
    }
    float *gatt = from_gpu(r->g.att, xn), *gx = from_gpu(r->g.x, xn);
    double e_att = rel_l2(gatt, r->c.att, xn, 0), e_x = rel_l2(gx, r->c.x, xn, 0);
    /* n <= 8: GEMV projections with FP32 activations; above, cuBLASLt reads
     * them as BF16 */
    double tol = n <= 8 ? 1e-3 : 2e-2;
    CHECK(e_att <= tol && e_x <= tol, "%s: attention error %.3g, layer output error %.3g (limit %g)", what, e_att, e_x,
          tol);
    free(x), free(gatt), free(gx);
    return fmax(e_att, e_x);
}

static void mini_init(mini_layer *L, nb_backend *be, graph_rig *r, int gpu_side, int fused) {
    L->be = be;
    float **bufs[] = {&L->x, &L->xn, &L->q, &L->k, &L->v, &L->att, &L->o};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        *bufs[i] = be->ops->alloc(be, sizeof(float) * G_MAXT * G_H);
    L->qkv = be->ops->alloc(be, sizeof(float) * G_MAXT * (G_H + 2 * G_KVD));
    L->fused = fused;
    L->s = (nb_attn_shape){G_NH, G_NKV, G_HD, 0.125f, NB_KV_BF16, 0, 0};
    if (fused) L->s.q_stride = L->s.kv_stride = G_H + 2 * G_KVD;
    size_t cb = (size_t)G_NSEQ * G_MAXB * nb_kv_block_bytes(NB_KV_BF16, G_NKV, G_HD);
    L->kc = be->ops->alloc(be, cb), L->vc = be->ops->alloc(be, cb);
    if (gpu_side) {
        L->inv_freq = to_gpu(r->inv, sizeof(float) * G_HD / 2);
        L->norm = r->norm.g, L->wq = r->wq.g, L->wk = r->wk.g, L->wv = r->wv.g, L->wo = r->wo.g, L->wqkv = r->wqkv.g;
    } else {
        L->inv_freq = r->inv;
        L->norm = r->norm.c, L->wq = r->wq.c, L->wk = r->wk.c, L->wv = r->wv.c, L->wo = r->wo.c, L->wqkv = r->wqkv.c;
    }
}

static void mini_free(mini_layer *L, int gpu_side) {
    float *bufs[] = {L->x, L->xn, L->q, L->k, L->v, L->att, L->o, L->qkv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) L->be->ops->free(L->be, bufs[i]);
    L->be->ops->free(L->be, L->kc), L->be->ops->free(L->be, L->vc);
    if (gpu_side) L->be->ops->free(L->be, (void *)L->inv_freq);
}

/* Decode steps bracketed by graph_begin/graph_end as model_forward does:
 * the first step of a key records (0), later steps of it replay (1) with
 * other positions, slots, block tables and inputs, and must match the CPU
 * as the first did. Sequences 0-3 decode 4 at a time (GEMV projections),
 * 4-15 12 at a time (cuBLASLt), 16-19 4 at a time at contexts of ~1500
 * (longer than any the key-4 graph was recorded with); key 0 records
 * nothing. Every batch shape change (token count, block table width) comes
 * before the first recording, so the backend has no reason to drop graphs.
 * fused: the GPU's layer runs the fused q|k|v projection (rope_kv_write
 * and strided attention, recorded and replayed), the CPU's the separate
 * ones, under keys of their own (key_base). */
static void run_graphs(int fused, uint64_t key_base) {
    graph_rig *r = xcalloc(1, sizeof *r);
    r->key_base = key_base;
    WHERE("graphs: setup");
    r->inv = xmalloc(sizeof(float) * G_HD / 2);
    for (int i = 0; i < G_HD / 2; i++) r->inv[i] = (float)(1.0 / pow(10000.0, 2.0 * i / G_HD));
    r->norm = make_weight(NB_BF16, 1, G_H, 1.0f);
    r->wq = make_weight(NB_BF16, G_H, G_H, 0.05f);
    r->wk = make_weight(NB_BF16, G_KVD, G_H, 0.05f);
    r->wv = make_weight(NB_BF16, G_KVD, G_H, 0.05f);
    r->wo = make_weight(NB_BF16, G_H, G_H, 0.05f);
    r->wqkv = weight_stack3(&r->wq, &r->wk, &r->wv);
    mini_init(&r->c, cpu, r, 0, 0);
    mini_init(&r->g, gpu, r, 1, fused);
    int cap[G_NSEQ];
    static const int init[G_NSEQ] = {5, 30, 100, 16, 1, 2, 3, 8, 15, 16, 17, 31, 33, 60, 64, 90, 700, 1200, 1500, 1555};
    for (int s = 0; s < G_NSEQ; s++) cap[s] = G_MAXB * NB_KV_BLOCK_SIZE;
    seq_set_init(&r->q, G_NSEQ, cap, G_MAXB, G_NSEQ * G_MAXB);

    /* the sequences' earlier context: random K/V written by eager steps of
     * up to 2048 tokens, before anything is recorded */
    kv_twin kv = {.s = r->c.s, .n_blocks = G_NSEQ * G_MAXB};
    kv.bytes = (size_t)kv.n_blocks * nb_kv_block_bytes(NB_KV_BF16, G_NKV, G_HD);
    kv.ck = r->c.kc, kv.cv = r->c.vc, kv.gk = r->g.kc, kv.gv = r->g.vc;
    for (int s = 0; s < G_NSEQ; s++) r->len[s] = init[s];
    WHERE("graphs: history");
    write_history(&kv, &r->q, r->len, 2048);

    static const int s4a[4] = {0, 1, 2, 3}, s4b[4] = {18, 16, 19, 17};
    static const int s12a[12] = {4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    static const int s12b[12] = {15, 9, 4, 12, 5, 14, 6, 11, 7, 13, 8, 10};
    static const struct {
        const int *seqs;
        int n;
        uint64_t key;
        int expect;
        const char *what;
    } steps[] = {
        {s4a, 4, 4, 0, "step 1: key 4 records"},
        {s4a, 4, 4, 1, "step 2: key 4 replays at the next positions"},
        {s12a, 12, 12, 0, "step 3: key 12 records"},
        {s4b, 4, 4, 1, "step 4: key 4 replays for other sequences at ~1500 positions"},
        {s12b, 12, 12, 1, "step 5: key 12 replays, sequences reordered"},
        {s4a, 4, 0, 0, "step 6: key 0 runs eagerly"},
        {s4a, 4, 0, 0, "step 7: key 0 still records nothing"},
        {s4b, 4, 4, 1, "step 8: key 4 replays after eager steps"},
        {s4a, 4, 4, 1, "step 9: key 4 replays back at short contexts"},
    };
    double worst = 0;
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        WHERE("graphs: %s", steps[i].what);
        note_worst(&worst, graph_step(r, steps[i].seqs, steps[i].n, steps[i].key, steps[i].expect, steps[i].what));
    }
    /* (no cache comparison here: the steps' K/V come out of matmuls, so
     * BF16 rounding may differ where the two backends' sums do) */
    printf("  graphs%s: worst relative error %.2e over %zu steps\n", fused ? " (GPU: fused q|k|v)" : "", worst,
           sizeof steps / sizeof steps[0]);

    mini_free(&r->c, 0);
    mini_free(&r->g, 1);
    free_weight(&r->norm), free_weight(&r->wq), free_weight(&r->wk), free_weight(&r->wv), free_weight(&r->wo);
    free_weight(&r->wqkv);
    free(r->inv), free(r->q.tables), free(r);
}

static void test_graphs(void) { run_graphs(0, 0); }
static void test_graphs_fused(void) { run_graphs(1, 1000); }

int main(void) {
    if (gpu_tests_start()) TEST_DONE("test_cuda_attention");
    RUN(test_attention_decode);
    RUN(test_attention_prefill);
    RUN(test_attention_decode_shapes);
    RUN(test_attention_decode_strided);
    RUN(test_attention_prefill_strided);
    RUN(test_rope_kv_write);
    RUN(test_graphs);
    RUN(test_graphs_fused);
    backend_destroy(gpu);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_attention");
}
