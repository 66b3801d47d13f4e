// Sampling on the GPU: sample_row_ref (kernels/cpu/cpu_sample.c) for many
// rows at once, one block per row, so a step copies ids to the host rather
// than rows of logits.
//
// The CPU finds the kept set with a heap and a quickselect; a block finds
// the same set with radix selects on the probabilities' bits (probabilities
// are >= 0, so their IEEE bits order like unsigned integers): 4 passes of 8
// bits, each a shared histogram of counts and masses over the candidates
// whose higher bits match. Ties in value are broken by id with a block-wide
// scan in id order, and the draw is a scan in id order too. Every quantity
// the CPU computes in float is computed here with the same IEEE operations
// (explicit _rn intrinsics, so nvcc cannot contract them into FMAs), and
// masses are summed in double, so the two differ only where u lands within
// rounding of a token boundary.
#include "kernels/cuda/cuda_int.h"

#define SAMPLE_THREADS 1024
#define SAMPLE_GREEDY_EPS 1e-5f

// A row as the kernel reads it; the history sits in one device array.
typedef struct cuda_sample_param {
    double u;
    float temperature, top_p, min_p;
    float repetition_penalty, presence_penalty, frequency_penalty;
    int top_k, hist_off, n_hist;
} cuda_sample_param;

// Inclusive prefix sum over the block in thread order; *total gets the sum
// of all. Doubles hold counts exactly too.
static __device__ double block_scan(double v, double *total) {
    __shared__ double warp_tot[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        double n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    __syncthreads(); // warp_tot may still be read by a previous call
    if (lane == 31) warp_tot[w] = v;
    __syncthreads();
    if (w == 0) {
        double t = lane < nw ? warp_tot[lane] : 0.0;
        for (int o = 1; o < 32; o <<= 1) {
            double n = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += n;
        }
        warp_tot[lane] = t;
    }
    __syncthreads();
    *total = warp_tot[nw - 1];
    return v + (w > 0 ? warp_tot[w - 1] : 0.0);
}

static __device__ double block_sum_d(double v) {
    double total;
    block_scan(v, &total);
    return total;
}

// The result of a radix select: the value of the element where the
// running count (or mass), taken in descending order of value, first
// reaches the need; and what lies strictly above that value.
typedef struct select_result {
    float v;
    int found;
    int above_cnt, eq_cnt;
    double above_mass;
} select_result;

// Block-wide radix select over p[0..V) (all >= 0). by_mass: the running
// mass must reach need; else the running count must (need <= V), and the
// masses are not gathered (above_mass stays 0).
static __device__ select_result block_select(const float *p, int V, int by_mass, double need) {
    __shared__ int cnt[256];
    __shared__ double mass[256];
    __shared__ unsigned s_prefix;
    __shared__ int s_found, s_above_cnt, s_eq_cnt;
    __shared__ double s_above_mass;
    unsigned prefix = 0, mask = 0;
    if (threadIdx.x == 0) s_found = 1, s_above_cnt = 0, s_above_mass = 0.0, s_eq_cnt = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) cnt[b] = 0, mass[b] = 0.0;
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float x = p[i];
            unsigned u = __float_as_uint(x);
            if ((u & mask) != prefix) continue;
            int b = (int)((u >> shift) & 255u);
            atomicAdd(&cnt[b], 1);
            if (by_mass) atomicAdd(&mass[b], (double)x);
        }
        __syncthreads();
        if (threadIdx.x == 0 && s_found) {
            int ac = s_above_cnt, chosen = -1;
            double am = s_above_mass;
            for (int b = 255; b >= 0; b--) {
                if (by_mass ? am + mass[b] >= need : (double)(ac + cnt[b]) >= need) {
                    chosen = b;
                    break;
                }
                ac += cnt[b];
                am += mass[b];
            }
            if (chosen < 0) s_found = 0;
            else s_prefix = prefix | ((unsigned)chosen << shift), s_above_cnt = ac, s_above_mass = am,
                 s_eq_cnt = cnt[chosen];
        }
        __syncthreads();
        if (!s_found) break;
        prefix = s_prefix;
        mask |= 255u << shift;
    }
    select_result r;
    r.found = s_found;
    r.v = __uint_as_float(prefix);
    r.above_cnt = s_above_cnt;
    r.above_mass = s_above_mass;
    r.eq_cnt = s_eq_cnt;
    __syncthreads(); // the shared results are rewritten by the next call
    return r;
}

// The j-th (1-based) smallest id among the elements equal to v.
static __device__ int block_nth_equal(const float *p, int V, float v, int j) {
    __shared__ int s_id;
    if (threadIdx.x == 0) s_id = -1;
    double carry = 0;
    for (int i0 = 0; i0 < V; i0 += blockDim.x) {
        int i = i0 + (int)threadIdx.x;
        int eq = i < V && p[i] == v;
        double total, incl = block_scan(eq ? 1.0 : 0.0, &total);
        if (eq && carry + incl == (double)j) s_id = i;
        carry += total;
        __syncthreads();
        if (s_id >= 0 || carry >= (double)j) break;
    }
    int id = s_id;
    __syncthreads();
    return id;
}

__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(int32_t *ids, float *x, int V, const cuda_sample_param *params, const int32_t *hist_ids,
                  const int32_t *hist_count) {
    const cuda_sample_param P = params[blockIdx.x];
    float *lg = x + (size_t)blockIdx.x * V;
    int tid = threadIdx.x;

    // penalties: the history ids are distinct, so threads never collide
    int rep = P.repetition_penalty != 1.0f, pen = P.presence_penalty != 0.0f || P.frequency_penalty != 0.0f;
    if (rep || pen) {
        for (int j = tid; j < P.n_hist; j += blockDim.x) {
            int i = hist_ids[P.hist_off + j], c = hist_count[P.hist_off + j];
            if (i < 0 || i >= V) continue;
            float v = lg[i];
            if (rep) v = v > 0 ? __fdiv_rn(v, P.repetition_penalty) : __fmul_rn(v, P.repetition_penalty);
            if (c) v = __fsub_rn(v, __fadd_rn(__fmul_rn(P.frequency_penalty, (float)c), P.presence_penalty));
            lg[i] = v;
        }
        __syncthreads();
    }

    float mx = -INFINITY;
    int best = INT32_MAX;
    for (int i = tid; i < V; i += blockDim.x) cuda_argmax_merge(mx, best, lg[i], i);
    cuda_block_argmax(mx, best);
    if (best == INT32_MAX || P.temperature < SAMPLE_GREEDY_EPS || isinf(mx)) {
        if (tid == 0) ids[blockIdx.x] = best == INT32_MAX ? 0 : best;
        return;
    }

    // probabilities relative to the top token, in place of the logits
    double total_p = 0, n_pos_p = 0, n_minp_p = 0;
    for (int i = tid; i < V; i += blockDim.x) {
        float v = lg[i];
        float pr = isnan(v) ? 0.0f : (float)exp((double)__fdiv_rn(__fsub_rn(v, mx), P.temperature));
        lg[i] = pr;
        total_p += pr;
        n_pos_p += pr > 0.0f;
        n_minp_p += pr >= P.min_p && pr > 0.0f;
    }
    __syncthreads();
    double total = block_sum_d(total_p);
    int n_pos = (int)block_sum_d(n_pos_p), n_minp = (int)block_sum_d(n_minp_p);

    // The kept prefix's length n: top-k, then top-p within it, then min-p.
    int k = P.top_k > 0 && P.top_k < V ? P.top_k : 0;
    int n = n_minp;
    double base = total; // the mass top-p takes its share of
    if (k) {
        // the top-k mass: what ranks above the k-th value, plus the copies
        // of that value the k tokens include
        select_result s = block_select(lg, V, 0, (double)k);
        double above = 0;
        for (int i = tid; i < V; i += blockDim.x)
            if (lg[i] > s.v) above += lg[i];
        base = block_sum_d(above) + (double)(k - s.above_cnt) * (double)s.v;
        n = min(n, k);
    }
    if (P.top_p < 1.0f) {
        double target = (double)P.top_p * base;
        select_result s = block_select(lg, V, 1, target);
        if (s.found) {
            // equal values are taken one at a time, lowest id first
            double j = ceil((target - s.above_mass) / (double)s.v);
            int jj = j < 1.0 ? 1 : j > (double)s.eq_cnt ? s.eq_cnt : (int)j;
            n = min(n, s.above_cnt + jj);
        }
    }
    n = max(n, 1);

    // The last kept token (t_v, t_id): kept means ranked at or before it.
    float t_v = 0.0f;
    int t_id = -1; // n == n_pos: every positive token
    if (n < n_pos) {
        select_result s = block_select(lg, V, 0, (double)n);
        t_v = s.v;
        t_id = block_nth_equal(lg, V, s.v, n - s.above_cnt);
    }

    double kept_p = 0;
    for (int i = tid; i < V; i += blockDim.x) {
        float pr = lg[i];
        if (pr > t_v || (pr == t_v && i <= t_id)) kept_p += pr;
    }
    double target = P.u * block_sum_d(kept_p);

    // the draw: the first kept id whose running mass in id order exceeds target
    __shared__ int s_pick, s_last;
    if (tid == 0) s_pick = INT32_MAX, s_last = -1;
    __syncthreads();
    double carry = 0;
    for (int i0 = 0; i0 < V; i0 += blockDim.x) {
        int i = i0 + tid;
        float pr = i < V ? lg[i] : 0.0f;
        int kept = i < V && (pr > t_v || (pr == t_v && i <= t_id));
        double tile, incl = block_scan(kept ? (double)pr : 0.0, &tile);
        if (kept) {
            if (target < carry + incl) atomicMin(&s_pick, i);
            atomicMax(&s_last, i);
        }
        carry += tile;
        __syncthreads();
        if (s_pick != INT32_MAX) break;
    }
    if (tid == 0) ids[blockIdx.x] = s_pick != INT32_MAX ? s_pick : s_last;
}

// ---- host side --------------------------------------------------------------

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

void cuda_sample(cuda_backend *c, int32_t *ids, float *x, int n, int cols, const nb_sample_row *rows) {
    if (n <= 0) return;
    cuda_require_eager(c, "sample");
    size_t n_hist = 0;
    for (int r = 0; r < n; r++) n_hist += rows[r].n_hist > 0 ? (size_t)rows[r].n_hist : 0;
    size_t off_hist = align16(sizeof(cuda_sample_param) * (size_t)n);
    size_t off_count = off_hist + align16(sizeof(int32_t) * (n_hist ? n_hist : 1));
    size_t off_ids = off_count + align16(sizeof(int32_t) * (n_hist ? n_hist : 1));
    size_t bytes = off_ids + sizeof(int32_t) * (size_t)n;
    // the previous call waited for its copies, so the buffers are idle
    cuda_staging_reserve(&c->smp, bytes);
    cuda_sample_param *P = (cuda_sample_param *)c->smp.host;
    int32_t *hid = (int32_t *)(c->smp.host + off_hist), *hcnt = (int32_t *)(c->smp.host + off_count);
    size_t h = 0;
    for (int r = 0; r < n; r++) {
        const nb_sample_row *s = &rows[r];
        int nh = s->n_hist > 0 ? s->n_hist : 0;
        P[r] = (cuda_sample_param){s->u,
                                   s->temperature,
                                   s->top_p,
                                   s->min_p,
                                   s->repetition_penalty,
                                   s->presence_penalty,
                                   s->frequency_penalty,
                                   s->top_k,
                                   (int)h,
                                   nh};
        if (nh) {
            memcpy(hid + h, s->hist_ids, sizeof(int32_t) * (size_t)nh);
            memcpy(hcnt + h, s->hist_count, sizeof(int32_t) * (size_t)nh);
        }
        h += (size_t)nh;
    }
    CUDA_CHECK(cudaMemcpyAsync(c->smp.dev, c->smp.host, off_ids, cudaMemcpyHostToDevice, c->stream));
    int32_t *ids_dev = (int32_t *)(c->smp.dev + off_ids);
    sample_kernel<<<n, SAMPLE_THREADS, 0, c->stream>>>(ids_dev, x, cols, (const cuda_sample_param *)c->smp.dev,
                                                       (const int32_t *)(c->smp.dev + off_hist),
                                                       (const int32_t *)(c->smp.dev + off_count));
    CUDA_LAUNCHED();
    CUDA_CHECK(cudaMemcpyAsync(c->smp.host + off_ids, ids_dev, sizeof(int32_t) * (size_t)n, cudaMemcpyDeviceToHost,
                               c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    memcpy(ids, c->smp.host + off_ids, sizeof(int32_t) * (size_t)n);
}
