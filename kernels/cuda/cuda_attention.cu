// Causal paged attention on the GPU, for every KV cache type (F32, BF16,
// INT8 and FP8 with a scale per token per head; cuda_kv.h reads them,
// cuda_kv.cu writes them). The query rows may lie apart (q_stride: a fused
// q|k|v projection's rows); every kernel reads them with scalar loads, so
// any stride works. The output is packed.
//
// Decode (one token per sequence): the context is cut into parts of
// ATTN_PART positions; a block per (token, kv head, z) takes parts z, z + Z,
// z + 2Z, ... (Z = gridDim.z), computes all the query heads of the group
// against each and folds them into one running (max, sum, output) with the
// online-softmax rescaling; the last block of a (token, kv head) to finish
// merges the Z partials (a counter per pair; past CUDA_ATTN_MAX_KV kv heads
// a second kernel does; with Z = 1, at large batches, each block
// normalizes its own). Z depends
// only on the step's token count (enough blocks to fill the GPU twice, at
// most the parts of the longest context the block tables allow), so a
// recorded step replays at any context length and short contexts launch no
// idle blocks.
// Prefill (any other step): one block per tile of up to 16 query tokens of
// one sequence and a chunk of the group's query heads; K/V stream through
// shared memory with an online softmax (flash-style). head_dim a multiple of
// 16 runs on tensor cores (BF16 mma, FP32 accumulation); other head_dims on
// CUDA cores in FP32 (prefill_dispatch says exactly when each runs).
#include "kernels/cuda/cuda_kv.h"
#include "kernels/cuda/cuda_ptx.h"

#define ATTN_PART 512
#define PF_THREADS 128
#define PF_TK 32    // KV positions per shared-memory chunk
#define PF_ACC 64   // output accumulators per thread
#define TC_THREADS 128
#define TC_WARPS 4
#define TC_ROWS 64            // query rows (token, head) per block: one m16 tile per warp
#define TC_KV 64              // KV positions per shared-memory chunk
#define TC_VW ((TC_KV + 8) / 2) // V^T row stride in 32-bit words (see the bank note)

// ---- decode -----------------------------------------------------------------

// q_stride: floats from one token's q row to the next (n_heads * D packed,
// more in a fused q|k|v buffer); out is always packed.
struct attn_args {
    const float *q;
    const char *k_cache, *v_cache;
    int n_heads, n_kv, D;
    float scale;
    size_t block_bytes;
    int q_stride;
};

// A block per (token, kv head, z): its DEC_WARPS warps take 32-position
// tiles of its parts in turn, each warp keeping its own running (max, sum,
// output) per query head, merged across the warps at the end. Every load
// is independent of the arithmetic before it, so a warp keeps many in
// flight (a memory-bound kernel must: HBM's latency times its bandwidth is
// ~20 KB per SM):
//  - scores: a lane per position, reading its K row in chunks of E values
//    (16 bytes for BF16, 8 for INT8/FP8, 32 for F32) against q in shared
//    memory (the same address for every lane: one broadcast read);
//  - weighted V: lanes across the row in chunks of E, 32 / (D / E) rows a
//    step (BF16, D = 128: 16 lanes a row, 2 rows a step), each lane adding
//    its chunk's weighted values into registers; the row groups' sums meet
//    by shuffles at the end.
// HM query heads a pass (4 or 8: the registers hold HM x E x CPL sums);
// larger groups take several passes over K and V. CPL > 1 only for head
// dims no vector chunk divides (E = 2): a lane then takes chunks lane,
// lane + 32, ... of a row.
//
// Shared memory (floats): qs [G][QD] (QD = D rounded up to 4, for vector
// reads), then per warp: weights [HM][32], slots [32], (max, sum) [HM][2]
// and output [HM][D] of the pass.
#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)

// The layout, for the launcher's size and the kernel's pointers alike: q's
// row stride, a warp's area, and where its (max, sum) pairs start in it.
__host__ __device__ static inline int dec_qd(int D) { return (D + 3) & ~3; }
__host__ __device__ static inline size_t dec_warp_floats(int HM, int D) {
    return (size_t)HM * 32 + 32 + (size_t)HM * 2 + (size_t)HM * D;
}
__host__ __device__ static inline int dec_ml_at(int HM) { return HM * 32 + 32; }

// E floats of shared memory at p (16-byte aligned for E % 4 == 0, else 8).
template <int E> __device__ __forceinline__ void dec_lds(float (&f)[E], const float *p) {
#pragma unroll
    for (int e = 0; e < E; e += (E % 4 == 0 ? 4 : 2)) {
        if constexpr (E % 4 == 0) {
            float4 v = *(const float4 *)(p + e);
            f[e] = v.x, f[e + 1] = v.y, f[e + 2] = v.z, f[e + 3] = v.w;
        } else {
            float2 v = *(const float2 *)(p + e);
            f[e] = v.x, f[e + 1] = v.y;
        }
    }
}

// Output element d of query head `head` (token * n_heads + head) from the
// first np of its n_parts partials: out = sum_p e^(m_p - M) o_p / sum_p
// e^(m_p - M) l_p, summed in part order. Volatile reads: in the decode
// kernel the partials come from other blocks, past this SM's L1.
__device__ __forceinline__ void attn_merge_elem(float *out, const float *part_o, const float *part_ml, size_t head,
                                                int n_parts, int np, int D, int d) {
    const volatile float *ml = part_ml + head * n_parts * 2, *po = part_o + head * n_parts * D + d;
    float M = -INFINITY;
    for (int p = 0; p < np; p++) M = fmaxf(M, ml[2 * p]);
    float L = 0.0f;
    for (int p = 0; p < np; p++) L += expf(ml[2 * p] - M) * ml[2 * p + 1];
    float inv = 1.0f / L, o = 0.0f;
    for (int p = 0; p < np; p++) o += expf(ml[2 * p] - M) * po[(size_t)p * D];
    out[head * D + d] = o * inv;
}

// Partials of a context of ctx positions: one per part, at most n_parts.
__device__ __forceinline__ int attn_live_parts(int ctx, int n_parts) {
    const int np = (ctx + ATTN_PART - 1) / ATTN_PART;
    return np < n_parts ? np : n_parts;
}

template <int KV, int E, int CPL, int HM>
__global__ void __launch_bounds__(DEC_THREADS) attn_decode_kernel(float *out, float *part_o, float *part_ml, int *cnt,
                                                                  attn_args a, cuda_batch b, int n_parts) {
    extern __shared__ float sm[];
    const int t = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const int G = a.n_heads / a.n_kv, D = a.D, QD = dec_qd(D), CPR = D / E;
    const int ctx = b.pos[t] + 1;
    if (z * ATTN_PART >= ctx) return; // the merge reads only the partials a context has
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // weighted V: CL lanes a row, RPW rows a step; lane's row group and first chunk
    const int CL = CPR < 32 ? CPR : 32, RPW = 32 / CL, rg = lane / CL, c0 = lane % CL;
    const size_t WF = dec_warp_floats(HM, D);
    const int ML = dec_ml_at(HM);
    float *qs = sm, *wbase = qs + (size_t)G * QD;
    float *ps = wbase + warp * WF, *wml = ps + ML, *wo = wml + HM * 2;
    int *slots = (int *)(ps + HM * 32);
    const int32_t *table = b.block_tables + (size_t)b.seq_of[t] * b.bt_stride;

    const float *qt = a.q + (size_t)t * a.q_stride + (size_t)h * G * D;
    for (int i = threadIdx.x; i < G * D; i += DEC_THREADS) qs[(i / D) * QD + i % D] = qt[i];
    __syncthreads();

    for (int g0 = 0; g0 < G; g0 += HM) {
        const int nh = min(HM, G - g0);
        float m[HM], l[HM], acc[HM][CPL][E];
#pragma unroll
        for (int j = 0; j < HM; j++) {
            m[j] = -INFINITY, l[j] = 0.0f;
#pragma unroll
            for (int k = 0; k < CPL; k++)
#pragma unroll
                for (int e = 0; e < E; e++) acc[j][k][e] = 0.0f;
        }
        for (int start = z * ATTN_PART; start < ctx; start += (int)gridDim.z * ATTN_PART) {
            const int end = min(ctx, start + ATTN_PART);
            for (int ts = start + warp * 32; ts < end; ts += DEC_THREADS) {
                const int n = min(32, end - ts), p = ts + lane;
                const bool valid = lane < n;
                // scores of this lane's position for the pass's heads
                float s[HM];
#pragma unroll
                for (int j = 0; j < HM; j++) s[j] = 0.0f;
                int slot = 0;
                if (valid) {
                    slot = table[p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
                    kv_row kr = kv_locate<KV>(a.k_cache, slot, h, a.n_kv, D, a.block_bytes);
#pragma unroll 4
                    for (int c = 0; c < CPR; c++) {
                        float kv[E], qv[E];
                        kv_chunk<KV, E>(kr.vals, c, kr.scale, kv);
#pragma unroll
                        for (int j = 0; j < HM; j++) {
                            if (j >= nh) break;
                            dec_lds<E>(qv, qs + (size_t)(g0 + j) * QD + c * E);
#pragma unroll
                            for (int e = 0; e < E; e++) s[j] += qv[e] * kv[e];
                        }
                    }
                }
                slots[lane] = slot;
                // fold the tile into the running max and sum; its weights
                // go to shared memory for the V step
#pragma unroll
                for (int j = 0; j < HM; j++) {
                    if (j >= nh) break; // nh is the same for the whole warp
                    const float sj = valid ? s[j] * a.scale : -INFINITY;
                    const float mn = fmaxf(m[j], cuda_warp_max(sj));
                    const float al = expf(m[j] - mn); // 0 on the first tile (m = -inf)
                    const float pj = valid ? expf(sj - mn) : 0.0f;
                    l[j] = l[j] * al + cuda_warp_sum(pj);
                    m[j] = mn;
#pragma unroll
                    for (int k = 0; k < CPL; k++)
#pragma unroll
                        for (int e = 0; e < E; e++) acc[j][k][e] *= al;
                    ps[j * 32 + lane] = pj;
                }
                __syncwarp();
                if (rg < RPW) {
#pragma unroll 4
                    for (int r = rg; r < n; r += RPW) {
                        kv_row vr = kv_locate<KV>(a.v_cache, slots[r], h, a.n_kv, D, a.block_bytes);
#pragma unroll
                        for (int k = 0; k < CPL; k++) {
                            const int c = c0 + k * CL;
                            if (c >= CPR) break;
                            float vv[E];
                            kv_chunk<KV, E>(vr.vals, c, vr.scale, vv);
#pragma unroll
                            for (int j = 0; j < HM; j++) {
                                if (j >= nh) break;
                                const float w = ps[j * 32 + r];
#pragma unroll
                                for (int e = 0; e < E; e++) acc[j][k][e] += w * vv[e];
                            }
                        }
                    }
                }
                __syncwarp(); // ps and slots are rewritten by the next tile
            }
        }
        // the row groups' sums into the first group's lanes (lanes of one
        // chunk are CL apart), then the warp's pass into shared memory
        for (int sft = 1; sft < RPW; sft <<= 1)
#pragma unroll
            for (int j = 0; j < HM; j++)
#pragma unroll
                for (int k = 0; k < CPL; k++)
#pragma unroll
                    for (int e = 0; e < E; e++) {
                        const float o = __shfl_down_sync(0xffffffffu, acc[j][k][e], sft * CL);
                        if (rg % (2 * sft) == 0 && rg + sft < RPW) acc[j][k][e] += o;
                    }
        if (rg == 0)
#pragma unroll
            for (int j = 0; j < HM; j++) {
                if (j >= nh) break;
#pragma unroll
                for (int k = 0; k < CPL; k++) {
                    const int c = c0 + k * CL;
                    if (c >= CPR) break;
#pragma unroll
                    for (int e = 0; e < E; e++) wo[j * D + c * E + e] = acc[j][k][e];
                }
            }
        if (lane == 0) // m and l are the same in every lane
#pragma unroll
            for (int j = 0; j < HM; j++)
                if (j < nh) wml[2 * j] = m[j], wml[2 * j + 1] = l[j];
        __syncthreads();
        // the warps' passes merged: out = sum_w e^(m_w - M) o_w / sum_w e^(m_w - M) l_w
        for (int i = threadIdx.x; i < nh * D; i += DEC_THREADS) {
            const int j = i / D, d = i % D;
            float M = -INFINITY;
            for (int w = 0; w < DEC_WARPS; w++) M = fmaxf(M, wbase[w * WF + ML + 2 * j]);
            float O = 0.0f, L = 0.0f;
            for (int w = 0; w < DEC_WARPS; w++) {
                const float *wm = wbase + w * WF + ML;
                const float f = expf(wm[2 * j] - M); // 0 for a warp that had no positions
                O += wm[HM * 2 + j * D + d] * f;
                L += wm[2 * j + 1] * f;
            }
            const size_t head = (size_t)t * a.n_heads + (size_t)h * G + g0 + j;
            if (n_parts == 1) {
                // the whole context in one partial: normalized here, as
                // the merge would, and no merge launched
                out[head * D + d] = O * (1.0f / L);
            } else {
                part_o[(head * n_parts + z) * D + d] = O;
                if (d == 0) part_ml[(head * n_parts + z) * 2] = M, part_ml[(head * n_parts + z) * 2 + 1] = L;
            }
        }
        __syncthreads(); // the next pass rewrites the warps' areas
    }
    if (n_parts == 1 || !cnt) return;

    // The last block of (t, h) to finish merges the group's partials, in
    // part order (the same sums whichever block is last), so no merge
    // kernel runs. Each thread's partial stores are made visible before its
    // block counts itself in; blocks past the context never count (the
    // merge takes only the partials a context has).
    // (The flag lives where q was, free now: a static shared variable
    // would count against the dynamic size the launcher allows.)
    int *last = (int *)qs;
    const int np = attn_live_parts(ctx, n_parts);
    int *ct = cnt + (size_t)t * CUDA_ATTN_MAX_KV + h;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *last = atomicAdd(ct, 1) == np - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    for (int i = threadIdx.x; i < G * D; i += DEC_THREADS)
        attn_merge_elem(out, part_o, part_ml, (size_t)t * a.n_heads + (size_t)h * G + i / D, n_parts, np, D, i % D);
    if (threadIdx.x == 0) *ct = 0; // for the next launch
}

// grid (tokens, heads): out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p
// (for more than CUDA_ATTN_MAX_KV kv heads, where the decode kernel has
// no counters to merge by)
__global__ void attn_merge_kernel(float *out, const float *part_o, const float *part_ml, const int32_t *pos,
                                  int n_heads, int D, int n_parts) {
    const int t = blockIdx.x, np = attn_live_parts(pos[t] + 1, n_parts);
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        attn_merge_elem(out, part_o, part_ml, (size_t)t * n_heads + blockIdx.y, n_parts, np, D, d);
}

template <int KV, int E, int CPL, int HM>
static void decode_run(cuda_backend *c, float *out, float *part_o, float *part_ml, int *cnt, const attn_args &a,
                       int n_parts) {
    const cuda_batch *b = &c->batch;
    int G = a.n_heads / a.n_kv;
    size_t smem = sizeof(float) * ((size_t)G * dec_qd(a.D) + DEC_WARPS * dec_warp_floats(HM, a.D));
    if (smem > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(attn_decode_kernel<KV, E, CPL, HM>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)b->n_tokens, (unsigned)a.n_kv, (unsigned)n_parts);
    attn_decode_kernel<KV, E, CPL, HM>
        <<<grid, DEC_THREADS, smem, c->stream>>>(out, part_o, part_ml, cnt, a, *b, n_parts);
    CUDA_LAUNCHED();
}

// The chunk width: E values (16 bytes of BF16, 8 of INT8/FP8, 32 of F32)
// where E divides the head dim, else pairs (E = 2, a lane up to 4 chunks:
// any even head dim up to 256).
template <int KV, int HM>
static void decode_pick(cuda_backend *c, float *out, float *part_o, float *part_ml, int *cnt, const attn_args &a,
                        int n_parts) {
    constexpr int E = 8;
    if (a.D % E == 0) decode_run<KV, E, 1, HM>(c, out, part_o, part_ml, cnt, a, n_parts);
    else decode_run<KV, 2, 4, HM>(c, out, part_o, part_ml, cnt, a, n_parts);
}

template <int KV>
static void decode_launch(cuda_backend *c, float *out, const attn_args &a) {
    const cuda_batch *b = &c->batch;
    int G = a.n_heads / a.n_kv;
    // partials per (token, kv head): enough blocks for two waves, no more
    // than the parts of the longest context the block tables can describe;
    // a function of the token count alone, so recorded steps stay valid
    int max_parts = (b->bt_stride * NB_KV_BLOCK_SIZE + ATTN_PART - 1) / ATTN_PART;
    int per_part = b->n_tokens * a.n_kv;
    int n_parts = (2 * c->n_sm + per_part - 1) / per_part;
    if (n_parts > max_parts) n_parts = max_parts;
    if (n_parts < 1) n_parts = 1;
    size_t heads = (size_t)b->n_tokens * a.n_heads;
    size_t po = heads * n_parts * a.D, pml = heads * n_parts * 2;
    float *part_o = NULL, *part_ml = NULL;
    if (n_parts > 1) {
        cuda_scratch(c, (void **)&c->attn_part, &c->attn_part_cap, sizeof(float) * (po + pml));
        part_o = c->attn_part, part_ml = c->attn_part + po;
    }
    int *cnt = a.n_kv <= CUDA_ATTN_MAX_KV ? c->attn_cnt : NULL; // the kernel merges
    if (G <= 4) decode_pick<KV, 4>(c, out, part_o, part_ml, cnt, a, n_parts);
    else decode_pick<KV, 8>(c, out, part_o, part_ml, cnt, a, n_parts);
    if (n_parts == 1 || cnt) return;
    int th = a.D >= 128 ? 128 : a.D > 32 ? 64 : 32;
    attn_merge_kernel<<<dim3((unsigned)b->n_tokens, (unsigned)a.n_heads), th, 0, c->stream>>>(
        out, part_o, part_ml, b->pos, a.n_heads, a.D, n_parts);
    CUDA_LAUNCHED();
}

// ---- prefill on CUDA cores (the fallback: see prefill_dispatch) --------------

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
        Qs[e] = a.q[(size_t)tok * a.q_stride + (size_t)head * D + d];
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

// ---- prefill on tensor cores --------------------------------------------------
//
// mma.sync m16n8k16 (cuda_ptx.h gives its fragments). A row-major [n][k]
// array (K rows: position x head dim; V^T rows: head dim x position) gives
// B as two aligned 32-bit loads, and the S = Q K^T accumulators of two
// adjacent 8-column tiles are exactly the A fragment of P for the P V
// product (FlashAttention-2's register reuse): no shuffles.

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// Eight values of position p (zeros past the context, whose table entries
// may be -1) for kv head h.
template <int KV>
__device__ __forceinline__ void kv_fetch8(const char *cache, const int32_t *table, int p, int kv_end, int h, int d,
                                          const attn_args &a, float (&x)[8]) {
    if (p >= kv_end) {
#pragma unroll
        for (int i = 0; i < 8; i++) x[i] = 0.0f;
        return;
    }
    int slot = table[p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
    kv_row r = kv_locate<KV>(cache, slot, h, a.n_kv, a.D, a.block_bytes);
    kv_chunk<KV, 8>(r.vals, d / 8, r.scale, x); // d is a multiple of 8
}

// Dynamic shared memory of the tensor-core kernel for head_dim D: the main
// loop's Qs [TC_ROWS][D+8] and Ks [TC_KV][D+8] BF16 and Vt [D][TC_KV+8] BF16,
// or the epilogue's Os [TC_WARPS*16][D+8] FP32 and (m, l) [TC_WARPS*16][2]
// laid over them, whichever is larger (the main loop's, for every D >= 4).
// D = 64: 27 KB, 128: 52 KB, 256: 102 KB.
static size_t tc_smem_bytes(int D) {
    size_t main_loop = sizeof(uint16_t) * ((size_t)(TC_ROWS + TC_KV) * (D + 8) + (size_t)D * (TC_KV + 8));
    size_t epilogue = sizeof(float) * ((size_t)TC_WARPS * 16 * (D + 8) + TC_WARPS * 16 * 2);
    return main_loop > epilogue ? main_loop : epilogue;
}

// grid (tiles, kv heads x head chunks), TC_THREADS threads. Rows r = i * gn +
// g (token i of the tile, query head g0 + g of kv head h), R = n_tok * gn <=
// 64 of them in MT m16 tiles. The 4 warps split as (m tile, KV slice): with
// MTp = MT rounded up to a power of two, warp w owns m tile w % MTp and slice
// w / MTp of every chunk (KS = 4 / MTp slices of CW = 64 / KS positions), so
// a small tile (a decode token in a mixed step, or an MHA tile of 16 rows)
// still keeps all four warps busy; each warp keeps its own online-softmax
// state (m, l, O) and the epilogue merges the slices. Scores are in the log2
// domain: Q is pre-multiplied by scale * log2(e), so p = exp2(s - m).
//
// Smem strides: Qs/Ks rows of D+8 BF16 (D/2+4 words, = 4 mod 8 since D % 16
// == 0) and Vt rows of TC_KV+8 (36 words): the fragment loads, word
// row * stride + t for rows g = 0..7 and t = 0..3, hit 32 distinct banks.
static_assert(CUDA_ATTN_TILE_TOKENS <= TC_ROWS, "a tile's rows of one query head must fit a tensor-core block");

template <int KV, int DMAX>
__global__ void __launch_bounds__(TC_THREADS) attn_prefill_tc_kernel(float *out, attn_args a, cuda_batch b,
                                                                     int g_tile) {
    extern __shared__ __align__(16) uint32_t smw[];
    __shared__ int rpos[TC_ROWS];
    __shared__ int kv_end_s;
    const int D = a.D, G = a.n_heads / a.n_kv, QW = (D + 8) / 2, DG = D / 8;
    int n_gchunks = (G + g_tile - 1) / g_tile;
    int h = blockIdx.y / n_gchunks, g0 = (blockIdx.y % n_gchunks) * g_tile;
    int gn = min(g_tile, G - g0);
    cuda_tile tile = b.tiles[blockIdx.x];
    int R = tile.n_tok * gn;
    int MT = (R + 15) / 16, MTp = MT == 3 ? 4 : MT, KS = TC_WARPS / MTp, CW = TC_KV / KS;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    int mt = warp % MTp, ks = warp / MTp;
    bool active = mt < MT; // only warp 3 when MT == 3 idles
    uint32_t *Qs = smw, *Ks = Qs + TC_ROWS * QW, *Vt = Ks + TC_KV * QW;
    const int32_t *table = b.block_tables + (size_t)b.seq_of[tile.tok0] * b.bt_stride;

    // Q as BF16 once, pre-scaled; rows past R are zeros (computed, never written)
    const float qscale = a.scale * 1.4426950408889634f;
    for (int e = threadIdx.x; e < MT * 16 * (D / 2); e += TC_THREADS) {
        int r = e / (D / 2), dp = e % (D / 2);
        uint32_t w = 0;
        if (r < R) {
            int tok = tile.tok0 + r / gn, head = h * G + g0 + r % gn;
            // scalar loads: a q row need only be float-aligned (any q_stride)
            const float *qr = a.q + (size_t)tok * a.q_stride + (size_t)head * D + 2 * dp;
            w = cuda_bf16x2(qr[0] * qscale, qr[1] * qscale);
        }
        Qs[r * QW + dp] = w;
    }
    // padding rows take a real position of the tile, so every row sees
    // position 0 and its running max is finite by the end
    for (int r = threadIdx.x; r < TC_ROWS; r += TC_THREADS) rpos[r] = b.pos[tile.tok0 + (r < R ? r / gn : 0)];
    if (threadIdx.x == 0) {
        int mx = 0;
        for (int i = 0; i < tile.n_tok; i++) mx = max(mx, b.pos[tile.tok0 + i]);
        kv_end_s = mx + 1;
    }
    __syncthreads();
    const int kv_end = kv_end_s;
    // this thread's rows (g and g+8 of the warp's m tile) and the warp's last
    // visible position: a slice past it is skipped
    const int rp0 = rpos[mt * 16 + gid], rp1 = rpos[mt * 16 + gid + 8];
    int wmax = max(rp0, rp1);
    for (int o = 16; o > 0; o >>= 1) wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));

    float acc[DMAX / 8][4];
#pragma unroll
    for (int nt = 0; nt < DMAX / 8; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; // rows g, g+8; l is this thread's columns only

    for (int c0 = 0; c0 < kv_end; c0 += TC_KV) {
        __syncthreads(); // the previous chunk's Ks/Vt are no longer read
        // K rows: lanes along the head dimension (coalesced), 16-byte stores
        for (int e = threadIdx.x; e < TC_KV * DG; e += TC_THREADS) {
            int j = e / DG, d = (e % DG) * 8;
            float x[8];
            kv_fetch8<KV>(a.k_cache, table, c0 + j, kv_end, h, d, a, x);
            *(uint4 *)(Ks + j * QW + d / 2) =
                make_uint4(cuda_bf16x2(x[0], x[1]), cuda_bf16x2(x[2], x[3]), cuda_bf16x2(x[4], x[5]), cuda_bf16x2(x[6], x[7]));
        }
        // V transposed: a thread takes positions (2jp, 2jp+1) x 8 dims and
        // writes one word per dim; lanes along jp keep the stores on 32
        // distinct banks
        for (int e = threadIdx.x; e < (TC_KV / 2) * DG; e += TC_THREADS) {
            int jp = e % (TC_KV / 2), d = (e / (TC_KV / 2)) * 8;
            float x0[8], x1[8];
            kv_fetch8<KV>(a.v_cache, table, c0 + 2 * jp, kv_end, h, d, a, x0);
            kv_fetch8<KV>(a.v_cache, table, c0 + 2 * jp + 1, kv_end, h, d, a, x1);
#pragma unroll
            for (int i = 0; i < 8; i++) Vt[(d + i) * TC_VW + jp] = cuda_bf16x2(x0[i], x1[i]);
        }
        __syncthreads();

        const int p0 = c0 + ks * CW; // this warp's first position
        if (!active || p0 > wmax) continue;

        // S = Q K^T over the warp's CW positions: CW/8 n tiles
        float s[TC_KV / 8][4];
#pragma unroll
        for (int nt = 0; nt < TC_KV / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        const uint32_t *qa = Qs + (mt * 16 + gid) * QW + tig, *kb = Ks + (ks * CW + gid) * QW + tig;
        for (int k0 = 0; k0 < D / 2; k0 += 8) { // k0 in words: 16 head dims per step
            uint32_t af[4] = {qa[k0], qa[8 * QW + k0], qa[k0 + 4], qa[8 * QW + k0 + 4]};
#pragma unroll
            for (int nt = 0; nt < TC_KV / 8; nt++)
                if (nt < CW / 8) cuda_mma_bf16(s[nt], af, kb[nt * 8 * QW + k0], kb[nt * 8 * QW + k0 + 4]);
        }

        // causal mask by absolute position, then the online softmax per row
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < TC_KV / 8; nt++)
            if (nt < CW / 8) {
                int p = p0 + nt * 8 + 2 * tig;
                if (p > rp0) s[nt][0] = -INFINITY;
                if (p + 1 > rp0) s[nt][1] = -INFINITY;
                if (p > rp1) s[nt][2] = -INFINITY;
                if (p + 1 > rp1) s[nt][3] = -INFINITY;
                mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
                mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
            }
        // a row's columns sit in the 4 threads of its group
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // a row with nothing visible yet subtracts 0, not -inf: its masked
        // scores give exp2(-inf) = 0 (not NaN) and its correction too
        float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
        float corr0 = exp2f(m0 - base0), corr1 = exp2f(m1 - base1);
        m0 = mn0, m1 = mn1;
        // P rounded to BF16 here, and l sums the rounded values: the weights
        // the P V mma applies are exactly the ones the output is divided by
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < TC_KV / 8; nt++)
            if (nt < CW / 8) {
                s[nt][0] = bf16_round(exp2f(s[nt][0] - base0));
                s[nt][1] = bf16_round(exp2f(s[nt][1] - base0));
                s[nt][2] = bf16_round(exp2f(s[nt][2] - base1));
                s[nt][3] = bf16_round(exp2f(s[nt][3] - base1));
                sum0 += s[nt][0] + s[nt][1];
                sum1 += s[nt][2] + s[nt][3];
            }
        l0 = l0 * corr0 + sum0;
        l1 = l1 * corr1 + sum1;
#pragma unroll
        for (int nt = 0; nt < DMAX / 8; nt++)
            if (nt < DG) acc[nt][0] *= corr0, acc[nt][1] *= corr0, acc[nt][2] *= corr1, acc[nt][3] *= corr1;

        // O += P V: 16 positions per k step; P's A fragment is S tiles 2kk, 2kk+1
        const uint32_t *vb = Vt + gid * TC_VW + ks * CW / 2 + tig;
#pragma unroll
        for (int kk = 0; kk < TC_KV / 16; kk++)
            if (kk < CW / 16) {
                uint32_t pf[4] = {cuda_bf16x2(s[2 * kk][0], s[2 * kk][1]), cuda_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                                  cuda_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  cuda_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int nt = 0; nt < DMAX / 8; nt++)
                    if (nt < DG) {
                        const uint32_t *v = vb + nt * 8 * TC_VW + kk * 8;
                        cuda_mma_bf16(acc[nt], pf, v[0], v[4]);
                    }
            }
    }

    // Epilogue: each warp's unnormalized O and (m, l) go to shared memory
    // (over Qs/Ks/Vt), then out = sum_k 2^(m_k - M) O_k / sum_k 2^(m_k - M) l_k
    // over the KV slices of the row's m tile, coalesced along the head dim.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    __syncthreads();
    const int OW = D + 8; // floats; 64-bit stores of 16 lanes cover 32 banks
    float *Os = (float *)smw, *ml = Os + TC_WARPS * 16 * OW;
    if (active) {
        float *w0 = Os + (warp * 16 + gid) * OW + 2 * tig, *w1 = w0 + 8 * OW;
#pragma unroll
        for (int nt = 0; nt < DMAX / 8; nt++)
            if (nt < DG) {
                *(float2 *)(w0 + nt * 8) = make_float2(acc[nt][0], acc[nt][1]);
                *(float2 *)(w1 + nt * 8) = make_float2(acc[nt][2], acc[nt][3]);
            }
        if (tig == 0) {
            ml[(warp * 16 + gid) * 2] = m0, ml[(warp * 16 + gid) * 2 + 1] = l0;
            ml[(warp * 16 + gid + 8) * 2] = m1, ml[(warp * 16 + gid + 8) * 2 + 1] = l1;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < R * D; e += TC_THREADS) {
        int r = e / D, d = e % D, rt = r >> 4, rr = r & 15;
        // slice 0 saw position 0, so M is finite; a slice that saw nothing
        // has m = -inf and weighs 0
        float M = -INFINITY;
        for (int k = 0; k < KS; k++) M = fmaxf(M, ml[((k * MTp + rt) * 16 + rr) * 2]);
        float num = 0.0f, den = 0.0f;
        for (int k = 0; k < KS; k++) {
            int wr = (k * MTp + rt) * 16 + rr;
            float f = exp2f(ml[wr * 2] - M);
            num += f * Os[wr * OW + d];
            den += f * ml[wr * 2 + 1];
        }
        int tok = tile.tok0 + r / gn, head = h * G + g0 + r % gn;
        out[((size_t)tok * a.n_heads + head) * D + d] = num / den;
    }
}

template <int KV, int DMAX>
static void prefill_tc_launch(cuda_backend *c, float *out, const attn_args &a) {
    const cuda_batch *b = &c->batch;
    int G = a.n_heads / a.n_kv;
    int g_tile = G < TC_ROWS / CUDA_ATTN_TILE_TOKENS ? G : TC_ROWS / CUDA_ATTN_TILE_TOKENS;
    int n_gchunks = (G + g_tile - 1) / g_tile;
    // Raised to what the largest head_dim of this instantiation needs, on
    // every call as the other kernels here do: a cheap host-side setting,
    // and no state to keep per device.
    if (tc_smem_bytes(DMAX) > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(attn_prefill_tc_kernel<KV, DMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)tc_smem_bytes(DMAX)));
    dim3 grid((unsigned)b->n_tiles, (unsigned)(a.n_kv * n_gchunks));
    attn_prefill_tc_kernel<KV, DMAX><<<grid, TC_THREADS, tc_smem_bytes(a.D), c->stream>>>(out, a, *b, g_tile);
    CUDA_LAUNCHED();
}

// Which prefill kernel runs: the tensor-core one when head_dim is a multiple
// of 16 (its mma k step; every Llama/Qwen/Mistral-style model) and both
// caches are 16-byte aligned (its vector loads; backend allocations always
// are); the FP32 CUDA-core one otherwise (an even head_dim like 40 or 72, or
// a cache pointer offset into some larger buffer).
template <int KV>
static void prefill_dispatch(cuda_backend *c, float *out, const attn_args &a) {
    int aligned = (((uintptr_t)a.k_cache | (uintptr_t)a.v_cache) & 15) == 0;
    if (a.D % 16 || !aligned) prefill_launch<KV>(c, out, a);
    else if (a.D <= 64) prefill_tc_launch<KV, 64>(c, out, a);
    else if (a.D <= 128) prefill_tc_launch<KV, 128>(c, out, a);
    else prefill_tc_launch<KV, 256>(c, out, a);
}

void cuda_attention(cuda_backend *c, float *out, const float *q, const void *k_cache, const void *v_cache,
                    const nb_attn_shape *s) {
    cuda_attn_check_shape("attention", s);
    const cuda_batch *b = &c->batch;
    if (b->n_tokens <= 0) return;
    attn_args a = {q, (const char *)k_cache, (const char *)v_cache, s->n_heads, s->n_kv_heads, s->head_dim, s->scale,
                   nb_kv_block_bytes(s->kv_dtype, s->n_kv_heads, s->head_dim), nb_attn_q_stride(s)};
    // One token per sequence: the split-context kernel (the shape a
    // recorded decode step has); anything else: query tiles (prefill_dispatch
    // picks tensor cores or CUDA cores).
    int decode = b->n_seqs == b->n_tokens;
    switch (s->kv_dtype) {
#define CASE(T)                                                                 \
    case T:                                                                     \
        if (decode) decode_launch<T>(c, out, a); else prefill_dispatch<T>(c, out, a); \
        break;
        CASE(NB_KV_F32) CASE(NB_KV_BF16) CASE(NB_KV_INT8) CASE(NB_KV_FP8)
#undef CASE
    }
}
