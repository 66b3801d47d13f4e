// Elementwise, normalisation, rotary, embedding and row kernels of the CUDA
// backend. Each mirrors its CPU version in kernels/cpu (same formulas, same
// operation order per element where it matters; reductions differ only in
// summation order).
#include "kernels/cuda/cuda_int.h"

#define ELEM_THREADS 256

static unsigned grid_for(size_t n, unsigned threads) {
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g < 1 ? 1 : g > 65535u * 16u ? 65535u * 16u : g);
}

// ---- embedding ------------------------------------------------------------

template <typename T>
__global__ void embedding_kernel(float *out, const T *table, const int32_t *tokens, int cols) {
    const T *row = table + (size_t)tokens[blockIdx.x] * cols;
    float *o = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = cuda_to_f32(row[i]);
}

void cuda_embedding(cuda_backend *c, float *out, const nb_weight *table, const int32_t *tokens_dev, int n) {
    if (n <= 0) return;
    int cols = (int)table->cols;
    switch (table->dtype) {
    case NB_F32: embedding_kernel<<<n, ELEM_THREADS, 0, c->stream>>>(out, (const float *)table->data, tokens_dev, cols); break;
    case NB_BF16: embedding_kernel<<<n, ELEM_THREADS, 0, c->stream>>>(out, (const __nv_bfloat16 *)table->data, tokens_dev, cols); break;
    case NB_F16: embedding_kernel<<<n, ELEM_THREADS, 0, c->stream>>>(out, (const __half *)table->data, tokens_dev, cols); break;
    default:
        fprintf(stderr, "nibble: cuda embedding: table dtype %s\n", nb_dtype_name(table->dtype));
        abort();
    }
    CUDA_LAUNCHED();
}

// ---- rmsnorm ----------------------------------------------------------------

// One block per row. out may equal x: each thread reads its elements before
// the block's sum is known and writes only its own elements after.
template <typename T>
__global__ void rmsnorm_kernel(float *out, const float *x, const T *w, int cols, float eps) {
    const float *xr = x + (size_t)blockIdx.x * cols;
    float *o = out + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    ss = cuda_block_sum(ss);
    float scale = 1.0f / sqrtf(ss / (float)cols + eps);
    // HF order: (x * rsqrt(var + eps)) then * weight
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = (xr[i] * scale) * cuda_to_f32(w[i]);
}

static int row_threads(int cols) {
    int t = 32;
    while (t < cols && t < 1024) t *= 2;
    return t > 256 && cols < 4096 ? 256 : t > 1024 ? 1024 : t;
}

void cuda_rmsnorm(cuda_backend *c, float *out, const float *x, const nb_weight *w, int n, float eps) {
    if (n <= 0) return;
    int cols = (int)w->cols, th = row_threads(cols);
    switch (w->dtype) {
    case NB_F32: rmsnorm_kernel<<<n, th, 0, c->stream>>>(out, x, (const float *)w->data, cols, eps); break;
    case NB_BF16: rmsnorm_kernel<<<n, th, 0, c->stream>>>(out, x, (const __nv_bfloat16 *)w->data, cols, eps); break;
    case NB_F16: rmsnorm_kernel<<<n, th, 0, c->stream>>>(out, x, (const __half *)w->data, cols, eps); break;
    default:
        fprintf(stderr, "nibble: cuda rmsnorm: weight dtype %s\n", nb_dtype_name(w->dtype));
        abort();
    }
    CUDA_LAUNCHED();
}

// x += delta, then out = rmsnorm(x) * w. Each thread adds, stores and later
// normalises only its own elements, so out may be delta.
template <typename T>
__global__ void add_rmsnorm_kernel(float *out, float *x, const float *delta, const T *w, int cols, float eps) {
    float *xr = x + (size_t)blockIdx.x * cols;
    const float *dr = delta + (size_t)blockIdx.x * cols;
    float *o = out + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = xr[i] + dr[i];
        xr[i] = v;
        ss += v * v;
    }
    ss = cuda_block_sum(ss);
    float scale = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) o[i] = (xr[i] * scale) * cuda_to_f32(w[i]);
}

void cuda_add_rmsnorm(cuda_backend *c, float *out, float *x, const float *delta, const nb_weight *w, int n, float eps) {
    if (n <= 0) return;
    int cols = (int)w->cols, th = row_threads(cols);
    switch (w->dtype) {
    case NB_F32: add_rmsnorm_kernel<<<n, th, 0, c->stream>>>(out, x, delta, (const float *)w->data, cols, eps); break;
    case NB_BF16: add_rmsnorm_kernel<<<n, th, 0, c->stream>>>(out, x, delta, (const __nv_bfloat16 *)w->data, cols, eps); break;
    case NB_F16: add_rmsnorm_kernel<<<n, th, 0, c->stream>>>(out, x, delta, (const __half *)w->data, cols, eps); break;
    default:
        fprintf(stderr, "nibble: cuda add_rmsnorm: weight dtype %s\n", nb_dtype_name(w->dtype));
        abort();
    }
    CUDA_LAUNCHED();
}

// ---- elementwise ------------------------------------------------------------

template <typename T>
__global__ void add_bias_kernel(float *x, const T *bias, int cols, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += cuda_to_f32(bias[i % (size_t)cols]);
}

void cuda_add_bias(cuda_backend *c, float *x, const nb_weight *bias, int M) {
    size_t n = (size_t)M * (size_t)bias->cols;
    if (!n) return;
    unsigned g = grid_for(n, ELEM_THREADS);
    int cols = (int)bias->cols;
    switch (bias->dtype) {
    case NB_F32: add_bias_kernel<<<g, ELEM_THREADS, 0, c->stream>>>(x, (const float *)bias->data, cols, n); break;
    case NB_BF16: add_bias_kernel<<<g, ELEM_THREADS, 0, c->stream>>>(x, (const __nv_bfloat16 *)bias->data, cols, n); break;
    case NB_F16: add_bias_kernel<<<g, ELEM_THREADS, 0, c->stream>>>(x, (const __half *)bias->data, cols, n); break;
    default:
        fprintf(stderr, "nibble: cuda add_bias: dtype %s\n", nb_dtype_name(bias->dtype));
        abort();
    }
    CUDA_LAUNCHED();
}

__global__ void add_kernel(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

void cuda_add(cuda_backend *c, float *out, const float *a, const float *b, size_t n) {
    if (!n) return;
    add_kernel<<<grid_for(n, ELEM_THREADS), ELEM_THREADS, 0, c->stream>>>(out, a, b, n);
    CUDA_LAUNCHED();
}

// grid (column blocks, row blocks), each striding over both: out is packed,
// gate and up are read at row * ld (a fused gate|up projection's rows hold
// both halves, ld = 2 * cols). Consecutive threads take consecutive columns
// of a row, so every access stays coalesced, and the 2-D walk needs no
// per-element 64-bit division. Scalar loads, so that ld and the pointers
// need no alignment (an odd ld is legal); the op is bound by memory
// traffic, which wider loads would leave the same (not timed on a device).
// out may equal gate only when ld == cols: each thread then reads its
// element before writing it.
__global__ void silu_mul_kernel(float *out, const float *gate, const float *up, int n, int cols, int ld) {
    for (int r = blockIdx.y; r < n; r += gridDim.y) {
        const float *g = gate + (size_t)r * ld, *u = up + (size_t)r * ld;
        float *o = out + (size_t)r * cols;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x) {
            o[i] = cuda_silu_mul1(g[i], u[i]);
        }
    }
}

void cuda_silu_mul(cuda_backend *c, float *out, const float *gate, const float *up, int n, int cols, int ld) {
    if (n <= 0 || cols <= 0) return;
    unsigned gx = grid_for((size_t)cols, ELEM_THREADS), gy = n < 65535 ? (unsigned)n : 65535u;
    if (gx > 65535u) gx = 65535u;
    silu_mul_kernel<<<dim3(gx, gy), ELEM_THREADS, 0, c->stream>>>(out, gate, up, n, cols, ld);
    CUDA_LAUNCHED();
}

template <typename T>
__global__ void convert_kernel(T *out, const float *x, size_t n);

template <>
__global__ void convert_kernel<__nv_bfloat16>(__nv_bfloat16 *out, const float *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

template <>
__global__ void convert_kernel<__half>(__half *out, const float *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(x[i]);
}

void cuda_convert(cuda_backend *c, void *out, nb_dtype t, const float *x, size_t n) {
    if (!n) return;
    unsigned g = grid_for(n, ELEM_THREADS);
    if (t == NB_BF16) convert_kernel<<<g, ELEM_THREADS, 0, c->stream>>>((__nv_bfloat16 *)out, x, n);
    else if (t == NB_F16) convert_kernel<<<g, ELEM_THREADS, 0, c->stream>>>((__half *)out, x, n);
    else abort();
    CUDA_LAUNCHED();
}

// ---- rope -------------------------------------------------------------------

// One thread per rotated pair (cuda_rope_pair). Token t's heads are the
// first n_heads * head_dim floats of its row at t * stride; the rest of
// the row is never touched.
__global__ void rope_kernel(float *x, const int32_t *pos, int n_tokens, int n_heads, int head_dim, int stride,
                            const float *inv_freq, int interleaved) {
    int half = head_dim / 2;
    size_t n = (size_t)n_tokens * n_heads * half;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(k % half);
        size_t th = k / half; // token * n_heads + head
        int t = (int)(th / n_heads), h = (int)(th % n_heads);
        cuda_rope_pair(x + (size_t)t * stride + (size_t)h * head_dim, i, half, (float)pos[t], inv_freq, interleaved);
    }
}

void cuda_rope(cuda_backend *c, float *x, int n_heads, int head_dim, int stride, const float *inv_freq,
               int interleaved) {
    const cuda_batch *b = &c->batch;
    size_t n = (size_t)b->n_tokens * n_heads * (head_dim / 2);
    if (!n) return;
    rope_kernel<<<grid_for(n, ELEM_THREADS), ELEM_THREADS, 0, c->stream>>>(x, b->pos, b->n_tokens, n_heads, head_dim,
                                                                           stride, inv_freq, interleaved);
    CUDA_LAUNCHED();
}

// ---- rows -------------------------------------------------------------------

__global__ void softmax_kernel(float *x, int cols) {
    float *r = x + (size_t)blockIdx.x * cols;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) mx = fmaxf(mx, r[i]);
    mx = cuda_block_max(mx);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float e = expf(r[i] - mx);
        r[i] = e;
        sum += e;
    }
    sum = cuda_block_sum(sum);
    float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) r[i] *= inv;
}

void cuda_softmax(cuda_backend *c, float *x, int n, int cols) {
    if (n <= 0 || cols <= 0) return;
    softmax_kernel<<<n, row_threads(cols), 0, c->stream>>>(x, cols);
    CUDA_LAUNCHED();
}

// out and x must not overlap (the model gathers into its own buffer).
__global__ void gather_kernel(float *out, const float *x, const int32_t *rows, int cols) {
    const float *src = x + (size_t)rows[blockIdx.x] * cols;
    float *dst = out + (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

void cuda_gather_rows(cuda_backend *c, float *out, const float *x, const int32_t *rows_dev, int n_rows, int cols) {
    gather_kernel<<<n_rows, ELEM_THREADS, 0, c->stream>>>(out, x, rows_dev, cols);
    CUDA_LAUNCHED();
}


