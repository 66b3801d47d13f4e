// Writes into the paged KV cache (cuda_kv.h has its layout), for every KV
// cache type: kv_write from rows of K and V, and rope_kv_write, the whole
// step between a fused q|k|v projection and attention in one kernel (per-
// head norm, rope, then K and V into the cache: one launch per layer of a
// decode step instead of two or three). Both give what the CPU's ops give
// from the same floats, INT8/FP8 scales and codes included
// (kv_store_warp); the inputs' rows may lie apart (kv_stride, or a fused
// q|k|v row) and are read with scalar loads, so any stride works.
#include "kernels/cuda/cuda_kv.h"

#define KVW_WARPS 4 // rows (one warp each) per block

void cuda_attn_check_shape(const char *op, const nb_attn_shape *s) {
    if (s->head_dim <= 0 || s->head_dim > CUDA_MAX_HEAD_DIM || (s->head_dim & 1) || s->n_kv_heads <= 0 ||
        s->n_heads % s->n_kv_heads) {
        // the model loader validates shapes; reaching here is a bug
        fprintf(stderr, "nibble: cuda %s: unsupported shape (%d heads, %d kv heads, head_dim %d; head_dim even, at most %d)\n",
                op, s->n_heads, s->n_kv_heads, s->head_dim, CUDA_MAX_HEAD_DIM);
        abort();
    }
    // rows narrower than their heads would overlap: a caller's bug too
    if (nb_attn_q_stride(s) < s->n_heads * s->head_dim || nb_attn_kv_stride(s) < s->n_kv_heads * s->head_dim) {
        fprintf(stderr, "nibble: cuda %s: q_stride %d / kv_stride %d below the rows' %d / %d floats\n", op,
                s->q_stride, s->kv_stride, s->n_heads * s->head_dim, s->n_kv_heads * s->head_dim);
        abort();
    }
}

// ---- kv write ---------------------------------------------------------------

// grid (tokens, rows / KVW_WARPS): a warp per row r of a token, r < n_kv
// K head r, else V head r - n_kv; token t's K and V rows start at t *
// stride.
template <int KV>
__global__ void __launch_bounds__(KVW_WARPS * 32)
    kv_write_kernel(char *k_cache, char *v_cache, const float *k, const float *v, const int32_t *slot, int n_kv,
                    int D, int stride, size_t block_bytes) {
    int lane = threadIdx.x & 31, t = blockIdx.x, r = blockIdx.y * KVW_WARPS + (threadIdx.x >> 5);
    if (r >= 2 * n_kv) return;
    int is_v = r >= n_kv, h = is_v ? r - n_kv : r;
    const float *src = (is_v ? v : k) + (size_t)t * stride + (size_t)h * D;
    kv_store_warp<KV>(is_v ? v_cache : k_cache, slot[t], h, n_kv, D, block_bytes, src, lane);
}

void cuda_kv_write(cuda_backend *c, void *k_cache, void *v_cache, const float *k, const float *v,
                   const nb_attn_shape *s) {
    cuda_attn_check_shape("kv_write", s);
    const cuda_batch *b = &c->batch;
    if (b->n_tokens <= 0) return;
    dim3 grid((unsigned)b->n_tokens, (unsigned)((2 * s->n_kv_heads + KVW_WARPS - 1) / KVW_WARPS));
    size_t bb = nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim);
    int st = nb_attn_kv_stride(s);
    char *kc = (char *)k_cache, *vc = (char *)v_cache;
    switch (s->kv_dtype) {
#define CASE(T)                                                                                                       \
    case T:                                                                                                           \
        kv_write_kernel<T><<<grid, KVW_WARPS * 32, 0, c->stream>>>(kc, vc, k, v, b->slot, s->n_kv_heads,            \
                                                                    s->head_dim, st, bb);                            \
        break;
        CASE(NB_KV_F32) CASE(NB_KV_BF16) CASE(NB_KV_INT8) CASE(NB_KV_FP8)
#undef CASE
    }
    CUDA_LAUNCHED();
}

// ---- rope and kv write in one pass over fused q|k|v rows ---------------------

struct rkw_args {
    float *x;
    char *k_cache, *v_cache;
    const void *qw, *kw; // the per-head norms' weights, or both NULL
    const float *inv_freq;
    int n_q, n_kv, D, stride, interleaved;
    float eps;
    size_t block_bytes;
};

// grid (tokens, heads / KVW_WARPS), heads = n_q + 2 n_kv: a warp per head
// of a token's row. A q or k head is staged in shared memory (normalized
// as rmsnorm_kernel does a row, when there are norms), its pairs rotated
// there as rope_kernel rotates them and the head written back; a k head
// is then stored into the cache from the staged floats, a v head straight
// from the row.
template <int KV, typename T>
__global__ void __launch_bounds__(KVW_WARPS * 32) rope_kv_write_kernel(rkw_args a, const int32_t *pos,
                                                                       const int32_t *slot) {
    __shared__ float hs[KVW_WARPS][CUDA_MAX_HEAD_DIM];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = blockIdx.x, h = blockIdx.y * KVW_WARPS + warp;
    if (h >= a.n_q + 2 * a.n_kv) return; // whole warps leave; no block-wide barrier follows
    int D = a.D;
    float *v = a.x + (size_t)t * a.stride + (size_t)h * D, *s = hs[warp];
    if (h >= a.n_q + a.n_kv) {
        kv_store_warp<KV>(a.v_cache, slot[t], h - a.n_q - a.n_kv, a.n_kv, D, a.block_bytes, v, lane);
        return;
    }
    if (a.qw) {
        const T *w = (const T *)(h < a.n_q ? a.qw : a.kw);
        float ss = 0.0f;
        for (int d = lane; d < D; d += 32) ss += v[d] * v[d];
        ss = cuda_warp_sum(ss);
        float scale = 1.0f / sqrtf(ss / (float)D + a.eps);
        for (int d = lane; d < D; d += 32) s[d] = (v[d] * scale) * cuda_to_f32(w[d]);
    } else {
        for (int d = lane; d < D; d += 32) s[d] = v[d];
    }
    __syncwarp();
    int half = D / 2;
    for (int i = lane; i < half; i += 32) cuda_rope_pair(s, i, half, (float)pos[t], a.inv_freq, a.interleaved);
    __syncwarp();
    for (int d = lane; d < D; d += 32) v[d] = s[d];
    if (h >= a.n_q) kv_store_warp<KV>(a.k_cache, slot[t], h - a.n_q, a.n_kv, D, a.block_bytes, s, lane);
}

template <typename T>
static void rope_kv_write_launch(cuda_backend *c, const rkw_args &a, nb_kv_dtype kv) {
    const cuda_batch *b = &c->batch;
    int heads = a.n_q + 2 * a.n_kv;
    dim3 grid((unsigned)b->n_tokens, (unsigned)((heads + KVW_WARPS - 1) / KVW_WARPS));
    switch (kv) {
#define CASE(K)                                                                                                       \
    case K: rope_kv_write_kernel<K, T><<<grid, KVW_WARPS * 32, 0, c->stream>>>(a, b->pos, b->slot); break;
        CASE(NB_KV_F32) CASE(NB_KV_BF16) CASE(NB_KV_INT8) CASE(NB_KV_FP8)
#undef CASE
    }
    CUDA_LAUNCHED();
}

void cuda_rope_kv_write(cuda_backend *c, float *x, void *k_cache, void *v_cache, const nb_attn_shape *s,
                        const nb_weight *q_norm, const nb_weight *k_norm, float eps, const float *inv_freq,
                        int interleaved) {
    cuda_attn_check_shape("rope_kv_write", s);
    nb_rope_kv_write_check("cuda", s, q_norm, k_norm);
    int hd = s->head_dim;
    if (q_norm && q_norm->dtype != k_norm->dtype) {
        // the kernel reads both norms as one type; the model binds them so
        fprintf(stderr, "nibble: cuda rope_kv_write: norms of %s and %s\n", nb_dtype_name(q_norm->dtype),
                nb_dtype_name(k_norm->dtype));
        abort();
    }
    if (c->batch.n_tokens <= 0) return;
    rkw_args a = {x,  (char *)k_cache, (char *)v_cache, q_norm ? q_norm->data : NULL, k_norm ? k_norm->data : NULL,
                  inv_freq, s->n_heads, s->n_kv_heads, hd, s->q_stride, interleaved, eps,
                  nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, hd)};
    switch (q_norm ? q_norm->dtype : NB_F32) {
    case NB_F32: rope_kv_write_launch<float>(c, a, s->kv_dtype); break;
    case NB_BF16: rope_kv_write_launch<__nv_bfloat16>(c, a, s->kv_dtype); break;
    case NB_F16: rope_kv_write_launch<__half>(c, a, s->kv_dtype); break;
    default:
        fprintf(stderr, "nibble: cuda rope_kv_write: norm dtype %s\n", nb_dtype_name(q_norm->dtype));
        abort();
    }
}
