// KV-cache writes and causal paged attention on the GPU, for every KV cache
// type (F32, BF16, INT8 and FP8 with a scale per token per head). Layout and
// quantization are those of backend.h and kernels/cpu/cpu_attention.c.
//
// Decode (one token per sequence): the context is cut into parts of
// ATTN_PART positions, one block per (token, kv head, part) computes all the
// query heads of the group against that part, and a second kernel merges the
// parts. The grid covers the longest context the block tables allow, so it
// does not change from step to step and a recorded step can be replayed.
// Prefill: one block per tile of up to 16 query tokens of one sequence and a
// chunk of the group's query heads; K/V stream through shared memory 32
// positions at a time with an online softmax (flash-style), on CUDA cores.
#include <cuda_fp8.h>

#include "kernels/cuda/cuda_int.h"

#define ATTN_PART 512
#define DEC_THREADS 128
#define DEC_HEADS 8 // query heads accumulated per pass over V
#define PF_THREADS 128
#define PF_TK 32    // KV positions per shared-memory chunk
#define PF_ACC 64   // output accumulators per thread

// ---- cache access ---------------------------------------------------------

// Values of (slot, kv head h) and, for INT8/FP8, its scale.
struct kv_row {
    const char *vals;
    float scale;
};

template <int KV>
__device__ __forceinline__ const char *kv_row_ptr(const char *cache, int slot, int h, int n_kv, int D,
                                                  size_t block_bytes, const float **scale) {
    constexpr int ES = KV == NB_KV_F32 ? 4 : KV == NB_KV_BF16 ? 2 : 1;
    size_t blk = (size_t)(slot / NB_KV_BLOCK_SIZE), i = (size_t)(slot % NB_KV_BLOCK_SIZE);
    size_t row = i * (size_t)n_kv + (size_t)h;
    const char *base = cache + blk * block_bytes;
    if (scale) *scale = (const float *)(base + (size_t)NB_KV_BLOCK_SIZE * n_kv * D * ES) + row;
    return base + row * (size_t)D * ES;
}

template <int KV>
__device__ __forceinline__ float kv_get(const char *vals, int d, float scale) {
    if (KV == NB_KV_F32) return ((const float *)vals)[d];
    if (KV == NB_KV_BF16) return __bfloat162float(((const __nv_bfloat16 *)vals)[d]);
    if (KV == NB_KV_INT8) return (float)((const int8_t *)vals)[d] * scale;
    __nv_fp8_e4m3 v;
    v.__x = ((const __nv_fp8_storage_t *)vals)[d];
    return (float)v * scale;
}

template <int KV>
__device__ __forceinline__ kv_row kv_locate(const char *cache, int slot, int h, int n_kv, int D, size_t block_bytes) {
    kv_row r;
    const float *sp = NULL;
    r.vals = kv_row_ptr<KV>(cache, slot, h, n_kv, D, block_bytes, KV >= NB_KV_INT8 ? &sp : NULL);
    r.scale = KV >= NB_KV_INT8 ? *sp : 1.0f;
    return r;
}

// ---- kv write -------------------------------------------------------------

// grid (tokens, kv heads, 2: K then V). INT8/FP8 compute the row's scale
// exactly as the CPU does (max|x| / 127 or / 448, then x * (1 / scale)
// rounded to nearest even), so both write the same bytes.
template <int KV>
__global__ void kv_write_kernel(char *k_cache, char *v_cache, const float *k, const float *v, const int32_t *slot,
                                int n_kv, int D, size_t block_bytes) {
    int t = blockIdx.x, h = blockIdx.y;
    const float *src = (blockIdx.z ? v : k) + ((size_t)t * n_kv + h) * D;
    char *cache = blockIdx.z ? v_cache : k_cache;
    const float *sp = NULL;
    char *dst = (char *)kv_row_ptr<KV>(cache, slot[t], h, n_kv, D, block_bytes, &sp);
    if (KV == NB_KV_F32) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) ((float *)dst)[d] = src[d];
        return;
    }
    if (KV == NB_KV_BF16) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) ((__nv_bfloat16 *)dst)[d] = __float2bfloat16_rn(src[d]);
        return;
    }
    float amax = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) amax = fmaxf(amax, fabsf(src[d]));
    amax = cuda_block_max(amax);
    float sc = amax / (KV == NB_KV_INT8 ? 127.0f : 448.0f), inv = sc > 0 ? 1.0f / sc : 0.0f;
    if (threadIdx.x == 0) *(float *)sp = sc;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float x = src[d] * inv;
        if (KV == NB_KV_INT8)
            ((int8_t *)dst)[d] = (int8_t)__float2int_rn(fminf(fmaxf(x, -127.0f), 127.0f));
        else
            ((__nv_fp8_storage_t *)dst)[d] = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    }
}

static void check_shape(const char *op, const nb_attn_shape *s) {
    if (s->head_dim <= 0 || s->head_dim > CUDA_MAX_HEAD_DIM || (s->head_dim & 1) || s->n_kv_heads <= 0 ||
        s->n_heads % s->n_kv_heads) {
        // the model loader validates shapes; reaching here is a bug
        fprintf(stderr, "nibble: cuda %s: unsupported shape (%d heads, %d kv heads, head_dim %d; head_dim even, at most %d)\n",
                op, s->n_heads, s->n_kv_heads, s->head_dim, CUDA_MAX_HEAD_DIM);
        abort();
    }
}

void cuda_kv_write(cuda_backend *c, void *k_cache, void *v_cache, const float *k, const float *v,
                   const nb_attn_shape *s) {
    check_shape("kv_write", s);
    const cuda_batch *b = &c->batch;
    if (b->n_tokens <= 0) return;
    dim3 grid((unsigned)b->n_tokens, (unsigned)s->n_kv_heads, 2);
    int th = s->head_dim >= 128 ? 128 : s->head_dim > 32 ? 64 : 32;
    size_t bb = nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim);
    char *kc = (char *)k_cache, *vc = (char *)v_cache;
    switch (s->kv_dtype) {
    case NB_KV_F32: kv_write_kernel<NB_KV_F32><<<grid, th, 0, c->stream>>>(kc, vc, k, v, b->slot, s->n_kv_heads, s->head_dim, bb); break;
    case NB_KV_BF16: kv_write_kernel<NB_KV_BF16><<<grid, th, 0, c->stream>>>(kc, vc, k, v, b->slot, s->n_kv_heads, s->head_dim, bb); break;
    case NB_KV_INT8: kv_write_kernel<NB_KV_INT8><<<grid, th, 0, c->stream>>>(kc, vc, k, v, b->slot, s->n_kv_heads, s->head_dim, bb); break;
    case NB_KV_FP8: kv_write_kernel<NB_KV_FP8><<<grid, th, 0, c->stream>>>(kc, vc, k, v, b->slot, s->n_kv_heads, s->head_dim, bb); break;
    }
    CUDA_LAUNCHED();
}

// ---- decode -----------------------------------------------------------------

struct attn_args {
    const float *q;
    const char *k_cache, *v_cache;
    int n_heads, n_kv, D;
    float scale;
    size_t block_bytes;
};

// Shared memory: qs [G][D], scores [G][ATTN_PART], slots [ATTN_PART],
// max/sum [G][2].
template <int KV>
__global__ void __launch_bounds__(DEC_THREADS) attn_decode_kernel(float *part_o, float *part_ml, attn_args a,
                                                                  cuda_batch b, int n_parts) {
    extern __shared__ float sm[];
    int t = blockIdx.x, h = blockIdx.y, part = blockIdx.z;
    int G = a.n_heads / a.n_kv, D = a.D;
    int ctx = b.pos[t] + 1, start = part * ATTN_PART;
    if (start >= ctx) return; // the merge reads only the parts a context has
    int len = min(ctx - start, ATTN_PART);
    float *qs = sm, *sc = qs + G * D;
    int *slots = (int *)(sc + G * ATTN_PART);
    float *ml = (float *)(slots + ATTN_PART);
    const int32_t *table = b.block_tables + (size_t)b.seq_of[t] * b.bt_stride;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    const float *qt = a.q + ((size_t)t * a.n_heads + (size_t)h * G) * D;
    for (int i = threadIdx.x; i < G * D; i += DEC_THREADS) qs[i] = qt[i];
    for (int i = threadIdx.x; i < len; i += DEC_THREADS) {
        int p = start + i;
        slots[i] = table[p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
    }
    __syncthreads();

    // scores: a warp per position, lanes across the head dimension
    for (int i = warp; i < len; i += DEC_THREADS / 32) {
        kv_row kr = kv_locate<KV>(a.k_cache, slots[i], h, a.n_kv, D, a.block_bytes);
        float kd[CUDA_MAX_HEAD_DIM / 32];
#pragma unroll
        for (int j = 0; j < CUDA_MAX_HEAD_DIM / 32; j++) {
            int d = lane + 32 * j;
            kd[j] = d < D ? kv_get<KV>(kr.vals, d, kr.scale) : 0.0f;
        }
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < CUDA_MAX_HEAD_DIM / 32; j++) {
                int d = lane + 32 * j;
                if (d < D) s += qs[g * D + d] * kd[j];
            }
            s = cuda_warp_sum(s);
            if (lane == 0) sc[g * ATTN_PART + i] = s * a.scale;
        }
    }
    __syncthreads();

    // softmax pieces per head: a warp per head
    for (int g = warp; g < G; g += DEC_THREADS / 32) {
        float *r = sc + g * ATTN_PART;
        float m = -INFINITY;
        for (int i = lane; i < len; i += 32) m = fmaxf(m, r[i]);
        m = cuda_warp_max(m);
        float l = 0.0f;
        for (int i = lane; i < len; i += 32) {
            float e = expf(r[i] - m);
            r[i] = e;
            l += e;
        }
        l = cuda_warp_sum(l);
        if (lane == 0) ml[2 * g] = m, ml[2 * g + 1] = l;
    }
    __syncthreads();

    // weighted V: a thread per head-dimension element, DEC_HEADS heads a pass
    for (int g0 = 0; g0 < G; g0 += DEC_HEADS) {
        for (int d = threadIdx.x; d < D; d += DEC_THREADS) {
            float acc[DEC_HEADS];
#pragma unroll
            for (int j = 0; j < DEC_HEADS; j++) acc[j] = 0.0f;
            for (int i = 0; i < len; i++) {
                kv_row vr = kv_locate<KV>(a.v_cache, slots[i], h, a.n_kv, D, a.block_bytes);
                float v = kv_get<KV>(vr.vals, d, vr.scale);
#pragma unroll
                for (int j = 0; j < DEC_HEADS; j++)
                    if (g0 + j < G) acc[j] += sc[(g0 + j) * ATTN_PART + i] * v;
            }
#pragma unroll
            for (int j = 0; j < DEC_HEADS; j++)
                if (g0 + j < G) {
                    size_t head = (size_t)t * a.n_heads + (size_t)h * G + g0 + j;
                    part_o[(head * n_parts + part) * D + d] = acc[j];
                }
        }
    }
    for (int g = threadIdx.x; g < G; g += DEC_THREADS) {
        size_t head = (size_t)t * a.n_heads + (size_t)h * G + g;
        part_ml[(head * n_parts + part) * 2] = ml[2 * g];
        part_ml[(head * n_parts + part) * 2 + 1] = ml[2 * g + 1];
    }
}

// grid (tokens, heads): out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p
__global__ void attn_merge_kernel(float *out, const float *part_o, const float *part_ml, const int32_t *pos,
                                  int n_heads, int D, int n_parts) {
    int t = blockIdx.x, hq = blockIdx.y;
    int np = (pos[t] + ATTN_PART) / ATTN_PART; // parts of a pos+1 context
    size_t head = (size_t)t * n_heads + hq;
    const float *ml = part_ml + head * n_parts * 2;
    float M = -INFINITY;
    for (int p = 0; p < np; p++) M = fmaxf(M, ml[2 * p]);
    float L = 0.0f;
    for (int p = 0; p < np; p++) L += expf(ml[2 * p] - M) * ml[2 * p + 1];
    float inv = 1.0f / L;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f;
        for (int p = 0; p < np; p++) o += expf(ml[2 * p] - M) * part_o[(head * n_parts + p) * D + d];
        out[head * D + d] = o * inv;
    }
}

template <int KV>
static void decode_launch(cuda_backend *c, float *out, const attn_args &a) {
    const cuda_batch *b = &c->batch;
    int G = a.n_heads / a.n_kv;
    // parts for the longest context the block tables can describe: the
    // grid stays the same from step to step
    int n_parts = (b->bt_stride * NB_KV_BLOCK_SIZE + ATTN_PART - 1) / ATTN_PART;
    size_t heads = (size_t)b->n_tokens * a.n_heads;
    size_t po = heads * n_parts * a.D, pml = heads * n_parts * 2;
    cuda_scratch(c, (void **)&c->attn_part, &c->attn_part_cap, sizeof(float) * (po + pml));
    float *part_o = c->attn_part, *part_ml = c->attn_part + po;
    size_t smem = sizeof(float) * ((size_t)G * a.D + (size_t)G * ATTN_PART + ATTN_PART + 2 * (size_t)G);
    if (smem > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(attn_decode_kernel<KV>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)b->n_tokens, (unsigned)a.n_kv, (unsigned)n_parts);
    attn_decode_kernel<KV><<<grid, DEC_THREADS, smem, c->stream>>>(part_o, part_ml, a, *b, n_parts);
    CUDA_LAUNCHED();
    int th = a.D >= 128 ? 128 : a.D > 32 ? 64 : 32;
    attn_merge_kernel<<<dim3((unsigned)b->n_tokens, (unsigned)a.n_heads), th, 0, c->stream>>>(
        out, part_o, part_ml, b->pos, a.n_heads, a.D, n_parts);
    CUDA_LAUNCHED();
}

// ---- prefill ----------------------------------------------------------------

// Rows of a tile: (token i, head g) as r = i * gn + g. Shared memory:
// Qs [rmax][D], Ks [PF_TK][D+1] (odd stride: no bank conflicts across j),
// Vs [PF_TK][D], Ss [rmax][PF_TK+1], row max/sum/correction, row positions.
template <int KV>
__global__ void __launch_bounds__(PF_THREADS) attn_prefill_kernel(float *out, attn_args a, cuda_batch b, int g_tile,
                                                                  int rmax) {
    extern __shared__ float sm[];
    int D = a.D, G = a.n_heads / a.n_kv;
    int n_gchunks = (G + g_tile - 1) / g_tile;
    int h = blockIdx.y / n_gchunks, g0 = (blockIdx.y % n_gchunks) * g_tile;
    int gn = min(g_tile, G - g0);
    cuda_tile tile = b.tiles[blockIdx.x];
    int R = tile.n_tok * gn;
    float *Qs = sm, *Ks = Qs + rmax * D, *Vs = Ks + PF_TK * (D + 1), *Ss = Vs + PF_TK * D;
    float *rm = Ss + rmax * (PF_TK + 1), *rl = rm + rmax, *rc = rl + rmax;
    int *rpos = (int *)(rc + rmax);
    __shared__ int kv_end;
    const int32_t *table = b.block_tables + (size_t)b.seq_of[tile.tok0] * b.bt_stride;

    for (int e = threadIdx.x; e < R * D; e += PF_THREADS) {
        int r = e / D, d = e % D;
        int tok = tile.tok0 + r / gn, head = h * G + g0 + r % gn;
        Qs[e] = a.q[((size_t)tok * a.n_heads + head) * D + d];
    }
    for (int r = threadIdx.x; r < R; r += PF_THREADS) {
        rpos[r] = b.pos[tile.tok0 + r / gn];
        rm[r] = -INFINITY;
        rl[r] = 0.0f;
    }
    if (threadIdx.x == 0) {
        int mx = 0;
        for (int i = 0; i < tile.n_tok; i++) mx = max(mx, b.pos[tile.tok0 + i]);
        kv_end = mx + 1;
    }
    float acc[PF_ACC];
#pragma unroll
    for (int i = 0; i < PF_ACC; i++) acc[i] = 0.0f;
    __syncthreads();

    for (int c0 = 0; c0 < kv_end; c0 += PF_TK) {
        for (int e = threadIdx.x; e < PF_TK * D; e += PF_THREADS) {
            int j = e / D, d = e % D, p = c0 + j;
            float kvk = 0.0f, kvv = 0.0f;
            if (p < kv_end) {
                int slot = table[p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
                kv_row kr = kv_locate<KV>(a.k_cache, slot, h, a.n_kv, D, a.block_bytes);
                kv_row vr = kv_locate<KV>(a.v_cache, slot, h, a.n_kv, D, a.block_bytes);
                kvk = kv_get<KV>(kr.vals, d, kr.scale);
                kvv = kv_get<KV>(vr.vals, d, vr.scale);
            }
            Ks[j * (D + 1) + d] = kvk;
            Vs[j * D + d] = kvv;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < R * PF_TK; e += PF_THREADS) {
            int r = e / PF_TK, j = e % PF_TK, p = c0 + j;
            float s = -INFINITY;
            if (p <= rpos[r]) {
                const float *qr = Qs + r * D, *kr = Ks + j * (D + 1);
                float dot = 0.0f;
                for (int d = 0; d < D; d++) dot += qr[d] * kr[d];
                s = dot * a.scale;
            }
            Ss[r * (PF_TK + 1) + j] = s;
        }
        __syncthreads();
        for (int r = threadIdx.x; r < R; r += PF_THREADS) {
            float *sr = Ss + r * (PF_TK + 1);
            float mx = -INFINITY;
            for (int j = 0; j < PF_TK; j++) mx = fmaxf(mx, sr[j]);
            float m_new = fmaxf(rm[r], mx);
            if (m_new == -INFINITY) {
                // nothing visible yet: keep the empty state
                for (int j = 0; j < PF_TK; j++) sr[j] = 0.0f;
                rc[r] = 1.0f;
                continue;
            }
            float corr = expf(rm[r] - m_new), sum = 0.0f; // exp(-inf) = 0 clears the empty start
            for (int j = 0; j < PF_TK; j++) {
                float e = expf(sr[j] - m_new);
                sr[j] = e;
                sum += e;
            }
            rl[r] = rl[r] * corr + sum;
            rm[r] = m_new;
            rc[r] = corr;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < PF_ACC; i++) {
            int e = threadIdx.x + i * PF_THREADS;
            if (e < R * D) {
                int r = e / D, d = e % D;
                const float *sr = Ss + r * (PF_TK + 1);
                float v = acc[i] * rc[r];
                for (int j = 0; j < PF_TK; j++) v += sr[j] * Vs[j * D + d];
                acc[i] = v;
            }
        }
        __syncthreads(); // Ks/Vs/Ss are refilled next
    }
#pragma unroll
    for (int i = 0; i < PF_ACC; i++) {
        int e = threadIdx.x + i * PF_THREADS;
        if (e < R * D) {
            int r = e / D, d = e % D;
            int tok = tile.tok0 + r / gn, head = h * G + g0 + r % gn;
            out[((size_t)tok * a.n_heads + head) * D + d] = acc[i] / rl[r];
        }
    }
}

template <int KV>
static void prefill_launch(cuda_backend *c, float *out, const attn_args &a) {
    const cuda_batch *b = &c->batch;
    int G = a.n_heads / a.n_kv;
    int rmax = PF_ACC * PF_THREADS / a.D;
    if (rmax > 8 * CUDA_ATTN_TILE_TOKENS) rmax = 8 * CUDA_ATTN_TILE_TOKENS;
    int g_tile = rmax / CUDA_ATTN_TILE_TOKENS;
    if (g_tile > G) g_tile = G;
    int n_gchunks = (G + g_tile - 1) / g_tile;
    size_t smem = sizeof(float) * ((size_t)rmax * a.D + PF_TK * (size_t)(a.D + 1) + PF_TK * (size_t)a.D +
                                   (size_t)rmax * (PF_TK + 1) + 3 * (size_t)rmax) +
                  sizeof(int) * (size_t)rmax;
    if (smem > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(attn_prefill_kernel<KV>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)b->n_tiles, (unsigned)(a.n_kv * n_gchunks));
    attn_prefill_kernel<KV><<<grid, PF_THREADS, smem, c->stream>>>(out, a, *b, g_tile, rmax);
    CUDA_LAUNCHED();
}

void cuda_attention(cuda_backend *c, float *out, const float *q, const void *k_cache, const void *v_cache,
                    const nb_attn_shape *s) {
    check_shape("attention", s);
    const cuda_batch *b = &c->batch;
    if (b->n_tokens <= 0) return;
    attn_args a = {q, (const char *)k_cache, (const char *)v_cache, s->n_heads, s->n_kv_heads, s->head_dim, s->scale,
                   nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim)};
    // One token per sequence: the split-context kernel (the shape a
    // recorded decode step has); anything else: query tiles.
    int decode = b->n_seqs == b->n_tokens;
    switch (s->kv_dtype) {
#define CASE(T)                                                               \
    case T:                                                                   \
        if (decode) decode_launch<T>(c, out, a); else prefill_launch<T>(c, out, a); \
        break;
        CASE(NB_KV_F32) CASE(NB_KV_BF16) CASE(NB_KV_INT8) CASE(NB_KV_FP8)
#undef CASE
    }
}
