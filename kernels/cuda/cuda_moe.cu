// Mixture-of-experts ops of the CUDA backend (backend.h: moe_route,
// experts_create, matmul_experts, moe_combine). Everything reads and writes
// device memory only, so a decode step through a mixture records into a
// CUDA graph like a dense one.
//
// moe_route is two kernels. moe_pick: one thread per token does what
// moe_route_ref does, in the same order (so the choices equal the CPU's
// unless expf's last bits or the router's summation order tip a near tie);
// it recomputes each probability where the CPU keeps an array, which keeps
// the thread out of local memory. moe_group: one block lays the pairs out
// by expert, each warp scanning every pair for its own experts, so rows
// keep token order within an expert without a sort; the pairs pass through
// shared memory in chunks.
//
// matmul_experts on a grouped set, one launch whatever the routing, a GEMV
// while the experts average at most one pass of its rows (16; BF16 8) and
// tensor cores above (cuda_experts_tc), one block row per 64-row tile of
// the experts in use:
//  - WINT8/WINT4/WINT2 in quant.h's layout (which the model keeps experts
//    in), any number of tokens: cuda_wint.cu's GEMV with one block row per
//    expert in use (each expert's weights read once a pass, its rows MT at
//    a time), and its tensor-core kernel;
//  - BF16 (K % 8 == 0): cuda_matmul.cu's GEMV the same way, and
//    cuda_wint.cu's tensor-core kernel (the weights copied where packed
//    ones are dequantized), which also takes any step past
//    CUDA_EXPERTS_GEMV_MAX_TOKENS tokens;
//  - FP8 (the grouped rows quantized per token per 128 columns first):
//    cuda_fp8_small.cu's FP8 mma tile per expert in use (K % 128 == 0,
//    compute capability 8.9+; else cuda_fp8.cu's GEMV), and cuda_fp8.cu's
//    tensor-core kernel (K % 16 == 0, compute capability 8.9+);
//  - F16/F32 (and BF16 of other K, FP8 of other K) up to
//    CUDA_EXPERTS_GEMV_MAX_TOKENS tokens: the GEMV.
// Larger F16/F32 and FP8 steps (prefill) read the expert counts back and
// run each expert through cuda_matmul on its rows (cuBLASLt where the rows
// are many), one stream sync a call; such steps are not recorded.
#include "kernels/cuda/cuda_int.h"

// Beyond this many tokens an expert's rows are better served by the
// tensor-core paths of cuda_matmul, launched expert by expert.
#define CUDA_EXPERTS_GEMV_MAX_TOKENS 256
#define PICK_THREADS 128
#define GROUP_THREADS 512
#define GROUP_CHUNK 4096

struct cuda_experts {
    const nb_weight *w; // host descriptors, the model's
    int n;
    int kind; // EXPERTS_DENSE, EXPERTS_WINT, EXPERTS_FP8, EXPERTS_EACH
    int vec;
    void *table; // device: data pointers (dense) or wint args
    void *mma;   // BF16 experts: the tensor-core kernel's wint args, or NULL
    int fp8_mma; // FP8 experts: a tensor-core launch at any size
};

enum { EXPERTS_EACH = 0, EXPERTS_DENSE, EXPERTS_WINT, EXPERTS_FP8 };

// ---- routing -------------------------------------------------------------------

__device__ __forceinline__ float pick_p(const float *l, int x, float mx, float sum) {
    return expf(l[x] - mx) / sum;
}

// Token t's experts into chosen[t*K ..] (in id order) and their weights.
__global__ void __launch_bounds__(PICK_THREADS)
    moe_pick_kernel(int32_t *chosen, float *w, const float *logits, int n, nb_moe_route r) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int E = r.n_experts, K = r.n_used;
    const float *l = logits + (size_t)t * E;
    float mx = -INFINITY;
    for (int x = 0; x < E; x++) mx = l[x] > mx ? l[x] : mx;
    float sum = 0.0f;
    for (int x = 0; x < E; x++) sum += expf(l[x] - mx);
    uint32_t taken[NB_MOE_MAX_EXPERTS / 32];
    for (int i = 0; i < (E + 31) / 32; i++) taken[i] = 0;
    for (int k = 0; k < K; k++) {
        int best = -1;
        float bs = 0.0f;
        for (int x = 0; x < E; x++) {
            if (taken[x >> 5] >> (x & 31) & 1u) continue;
            float s = pick_p(l, x, mx, sum);
            if (r.bias) s += r.bias[x];
            if (best < 0 || s > bs) best = x, bs = s;
        }
        taken[best >> 5] |= 1u << (best & 31);
    }
    int32_t *ch = chosen + (size_t)t * K;
    float *wt = w + (size_t)t * K;
    float wsum = 0.0f;
    for (int x = 0, k = 0; x < E; x++)
        if (taken[x >> 5] >> (x & 31) & 1u) {
            const float p = pick_p(l, x, mx, sum);
            ch[k] = x, wt[k++] = p, wsum += p;
        }
    if (r.norm) {
        const float d = wsum > r.norm_min ? wsum : r.norm_min;
        for (int k = 0; k < K; k++) wt[k] /= d;
    }
}

// slot holds each pair's expert on entry and its grouped row on exit. Warp
// w takes experts w, w + warps, ...; its lanes test 32 consecutive pairs
// at a time, and a ballot gives each match its rank among them, so the
// pairs of an expert keep their order.
__global__ void __launch_bounds__(GROUP_THREADS)
    moe_group_kernel(int32_t *groups, int32_t *rows, int32_t *slot, int nk, int K, int E) {
    __shared__ int32_t ids[GROUP_CHUNK];
    __shared__ int32_t count[NB_MOE_MAX_EXPERTS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const uint32_t below = (1u << lane) - 1u;
    for (int x = threadIdx.x; x < E; x += blockDim.x) count[x] = 0;
    for (int pass = 0; pass < 2; pass++) {
        // pass 0 counts each expert's pairs, pass 1 places them
        for (int c0 = 0; c0 < nk; c0 += GROUP_CHUNK) {
            const int len = nk - c0 < GROUP_CHUNK ? nk - c0 : GROUP_CHUNK;
            __syncthreads();
            for (int i = threadIdx.x; i < len; i += blockDim.x) ids[i] = slot[c0 + i];
            __syncthreads();
            for (int x = warp; x < E; x += nw) {
                int at = count[x];
                for (int i0 = 0; i0 < len; i0 += 32) {
                    const int i = i0 + lane;
                    const int hit = i < len && ids[i] == x;
                    const uint32_t mask = __ballot_sync(0xffffffffu, hit);
                    if (pass && hit) {
                        const int r = at + __popc(mask & below);
                        rows[r] = (c0 + i) / K;
                        slot[c0 + i] = r;
                    }
                    at += __popc(mask);
                }
                __syncwarp();
                if (lane == 0) count[x] = at;
            }
        }
        __syncthreads();
        if (pass == 0 && threadIdx.x == 0) {
            int at = 0, active = 0;
            for (int x = 0; x < E; x++) {
                const int cnt = count[x];
                groups[x] = at;
                count[x] = at; // from here on: where x's next pair goes
                at += cnt;
                if (cnt) groups[E + 2 + active++] = x;
            }
            groups[E] = at;
            groups[E + 1] = active;
        }
    }
}

void cuda_moe_route(cuda_backend *c, int32_t *groups, int32_t *rows, int32_t *slot, float *w, const float *logits,
                    int n, const nb_moe_route *r) {
    if (n <= 0) {
        CUDA_CHECK(cudaMemsetAsync(groups, 0, sizeof(int32_t) * NB_MOE_GROUPS(r->n_experts), c->stream));
        return;
    }
    if (r->n_experts > NB_MOE_MAX_EXPERTS || r->n_used > r->n_experts || r->n_used <= 0) {
        fprintf(stderr, "nibble: cuda moe_route: %d of %d experts (at most %d)\n", r->n_used, r->n_experts,
                NB_MOE_MAX_EXPERTS);
        abort();
    }
    moe_pick_kernel<<<(n + PICK_THREADS - 1) / PICK_THREADS, PICK_THREADS, 0, c->stream>>>(slot, w, logits, n, *r);
    CUDA_LAUNCHED();
    moe_group_kernel<<<1, GROUP_THREADS, 0, c->stream>>>(groups, rows, slot, n * r->n_used, r->n_used, r->n_experts);
    CUDA_LAUNCHED();
}

// ---- combine -------------------------------------------------------------------

// One block per token; fmaf over its experts in order, as on the CPU, so
// both give the same bytes.
__global__ void moe_combine_kernel(float *out, const float *ye, const int32_t *slot, const float *w, int K, int cols) {
    const int t = blockIdx.x;
    float *o = out + (size_t)t * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = o[c];
        for (int k = 0; k < K; k++) acc = fmaf(w[t * K + k], ye[(size_t)slot[t * K + k] * cols + c], acc);
        o[c] = acc;
    }
}

void cuda_moe_combine(cuda_backend *c, float *out, const float *ye, const int32_t *slot, const float *w, int n, int K,
                      int cols) {
    if (n <= 0) return;
    moe_combine_kernel<<<n, 256, 0, c->stream>>>(out, ye, slot, w, K, cols);
    CUDA_LAUNCHED();
}

// ---- experts -------------------------------------------------------------------

void *cuda_experts_create(cuda_backend *c, const nb_weight *w, int n) {
    cuda_experts *s = (cuda_experts *)calloc(1, sizeof *s);
    if (!s) abort();
    s->w = w, s->n = n;
    int same = 1;
    for (int e = 1; e < n; e++)
        same &= w[e].dtype == w[0].dtype && w[e].rows == w[0].rows && w[e].cols == w[0].cols &&
                w[e].group == w[0].group && w[e].layout == w[0].layout;
    int wint = same, dense = same && cuda_gemv_experts_ok(w[0].dtype) && w[0].rows <= INT32_MAX &&
                             w[0].cols <= INT32_MAX;
    for (int e = 0; e < n && wint; e++) wint = cuda_wint_experts_ok(&w[e]);
    int prev = cuda_device_enter(c);
    if (dense) {
        const void **h = (const void **)malloc(sizeof(void *) * (size_t)n);
        if (!h) abort();
        s->vec = 1;
        for (int e = 0; e < n; e++) h[e] = w[e].data, s->vec &= (uintptr_t)w[e].data % 16 == 0;
        CUDA_CHECK(cudaMalloc(&s->table, sizeof(void *) * (size_t)n));
        CUDA_CHECK(cudaMemcpy(s->table, h, sizeof(void *) * (size_t)n, cudaMemcpyHostToDevice));
        free(h);
        s->kind = EXPERTS_DENSE;
        int mma = 1, chunked = 0;
        for (int e = 0; e < n && mma; e++) mma = cuda_bf16_experts_mma_ok(&w[e]);
        if (mma) s->mma = cuda_wint_experts_table(c, w, n, &chunked);
        if (s->mma && !chunked) CUDA_CHECK(cudaFree(s->mma)), s->mma = NULL;
    } else if (wint) {
        s->table = cuda_wint_experts_table(c, w, n, &s->vec);
        s->kind = EXPERTS_WINT;
    } else if (same && w[0].dtype == NB_FP8_B128 && w[0].rows <= INT32_MAX && w[0].cols <= INT32_MAX) {
        s->table = cuda_fp8_experts_table(c, w, n, &s->vec, &s->fp8_mma);
        s->kind = EXPERTS_FP8;
    } else {
        s->kind = EXPERTS_EACH;
    }
    cuda_device_leave(c, prev);
    return s;
}

void cuda_experts_free(cuda_backend *c, void *set) {
    cuda_experts *s = (cuda_experts *)set;
    if (!s) return;
    if (s->table) {
        int prev = cuda_device_enter(c);
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
        if (c->n_graphs) cuda_graphs_clear(c); // recorded steps point at the tables
        CUDA_CHECK(cudaFree(s->table));
        if (s->mma) CUDA_CHECK(cudaFree(s->mma));
        cuda_device_leave(c, prev);
    }
    free(s);
}

int cuda_experts_recordable(const void *set, int n_tokens) {
    const cuda_experts *s = (const cuda_experts *)set;
    return s->kind == EXPERTS_WINT || s->mma || s->fp8_mma ||
           ((s->kind == EXPERTS_DENSE || s->kind == EXPERTS_FP8) && n_tokens <= CUDA_EXPERTS_GEMV_MAX_TOKENS);
}

void cuda_matmul_experts(cuda_backend *c, float *out, const float *x, const void *set, const int32_t *groups,
                         int n_tokens, int n_rows) {
    const cuda_experts *s = (const cuda_experts *)set;
    if (n_rows <= 0) return;
    if (s->mma && (cuda_experts_tc(n_rows, s->n, CUDA_GEMV_MAX_M) || n_tokens > CUDA_EXPERTS_GEMV_MAX_TOKENS)) {
        cuda_bf16_experts_mma(c, out, x, s->mma, groups, s->n, &s->w[0], n_rows);
        return;
    }
    if (cuda_experts_recordable(set, n_tokens)) {
        if (s->kind == EXPERTS_DENSE)
            cuda_gemv_experts(c, out, x, (const void *const *)s->table, s->vec, groups, s->n, &s->w[0], n_tokens,
                              n_rows);
        else if (s->kind == EXPERTS_FP8)
            cuda_fp8_experts(c, out, x, s->table, s->vec, groups, s->n, &s->w[0], n_tokens, n_rows);
        else
            cuda_wint_experts(c, out, x, s->table, s->vec, groups, s->n, &s->w[0], n_tokens, n_rows);
        return;
    }
    // expert by expert: the counts to the host first
    cuda_require_eager(c, "matmul_experts (expert by expert)");
    cuda_staging_reserve(&c->moe, sizeof(int32_t) * (size_t)(s->n + 1));
    CUDA_CHECK(cudaMemcpyAsync(c->moe.host, groups, sizeof(int32_t) * (size_t)(s->n + 1), cudaMemcpyDeviceToHost,
                               c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    const int32_t *g = (const int32_t *)c->moe.host;
    const size_t N = (size_t)s->w[0].rows, K = (size_t)s->w[0].cols;
    for (int e = 0; e < s->n; e++) {
        const int cnt = g[e + 1] - g[e];
        if (cnt > 0) cuda_matmul(c, out + (size_t)g[e] * N, x + (size_t)g[e] * K, &s->w[e], cnt);
    }
}
