// cuemu's cuBLASLt: the calls nibble makes, computed by a plain triple
// loop in FP32/FP64 from the documented semantics (cuBLAS documentation,
// "cublasLtMatmul()" and "128-element 1D and 128x128 2D Block Scaling For
// FP8 Data Types"): column-major matrices, D = alpha * op(A) op(B) + beta * C,
// FP8 operands scaled per 128-element vector along K (VEC128_32F: scales
// [ceil(K/128)][outer], outer dimension contiguous) or per 128x128 block
// (BLK128x128_32F: scales [ceil(outer/128)][L4], K blocks contiguous, L4 =
// ceil(K/128) rounded up to a multiple of 4). What the documentation says
// cuBLASLt refuses (block scales on both operands, FP8 without the "TN"
// layout, dimensions not multiples of 4 / 16) it refuses here, so callers'
// fallbacks run too. Whether a real cuBLASLt agrees is for a GPU to show.
// Also the few cuBLAS calls bench_cuda makes for its reference GEMM
// (cublasGemmEx on a handle's stream), so the benchmark runs here too.
#include "tests/cuemu/cuemu.h"

#include <cublas_v2.h>

#include <stdio.h>
#include <stdlib.h>

#include <functional>
#include <vector>

#include "tests/cuemu/cuemu_rt.h"

struct cublasLtContext {
    int device; // current when it was made: a handle serves that device only
};

struct emu_layout {
    cudaDataType type;
    uint64_t rows, cols;
    int64_t ld;
};

struct emu_desc {
    cublasComputeType_t compute;
    cudaDataType scale_type;
    cublasOperation_t transa, transb;
    const void *a_scale, *b_scale;
    int32_t a_mode, b_mode;
};

static emu_layout *L(cublasLtMatrixLayout_t l) { return (emu_layout *)l; }
static emu_desc *D(cublasLtMatmulDesc_t d) { return (emu_desc *)d; }

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    *h = new cublasLtContext{cuemu_current_device()};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
size_t cublasLtGetVersion(void) { return CUBLAS_VERSION; }

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    if (ld < (int64_t)rows) return CUBLAS_STATUS_INVALID_VALUE;
    *l = (cublasLtMatrixLayout_t) new emu_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete L(l);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType scale) {
    emu_desc *e = new emu_desc();
    e->compute = compute;
    e->scale_type = scale;
    e->transa = e->transb = CUBLAS_OP_N;
    e->a_mode = e->b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
    *d = (cublasLtMatmulDesc_t)e;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete D(d);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t n) {
    emu_desc *e = D(d);
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: memcpy(&e->transa, buf, sizeof e->transa); break;
    case CUBLASLT_MATMUL_DESC_TRANSB: memcpy(&e->transb, buf, sizeof e->transb); break;
    case CUBLASLT_MATMUL_DESC_A_SCALE_POINTER: memcpy(&e->a_scale, buf, sizeof e->a_scale); break;
    case CUBLASLT_MATMUL_DESC_B_SCALE_POINTER: memcpy(&e->b_scale, buf, sizeof e->b_scale); break;
    case CUBLASLT_MATMUL_DESC_A_SCALE_MODE: memcpy(&e->a_mode, buf, sizeof e->a_mode); break;
    case CUBLASLT_MATMUL_DESC_B_SCALE_MODE: memcpy(&e->b_mode, buf, sizeof e->b_mode); break;
    default:
        fprintf(stderr, "cuemu: cublasLtMatmulDescSetAttribute: attribute %d is not emulated\n", (int)attr);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = (cublasLtMatmulPreference_t) new cublasLtContext();
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete (cublasLtContext *)p;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t n) {
    return CUBLAS_STATUS_SUCCESS;
}

static int is_fp8(cudaDataType t) { return t == CUDA_R_8F_E4M3 || t == CUDA_R_8F_E5M2; }
static int is_block_mode(int32_t m) {
    return m == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F || m == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
}

// The GEMM's m, n, k from the layouts, or a refusal.
static cublasStatus_t check(const emu_desc *e, const emu_layout *a, const emu_layout *b, const emu_layout *c,
                            const emu_layout *d, int64_t *m, int64_t *n, int64_t *k) {
    *m = e->transa == CUBLAS_OP_N ? (int64_t)a->rows : (int64_t)a->cols;
    *k = e->transa == CUBLAS_OP_N ? (int64_t)a->cols : (int64_t)a->rows;
    int64_t kb = e->transb == CUBLAS_OP_N ? (int64_t)b->rows : (int64_t)b->cols;
    *n = e->transb == CUBLAS_OP_N ? (int64_t)b->cols : (int64_t)b->rows;
    if (kb != *k || (int64_t)d->rows != *m || (int64_t)d->cols != *n || (int64_t)c->rows != *m ||
        (int64_t)c->cols != *n)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (e->compute != CUBLAS_COMPUTE_32F || e->scale_type != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (d->type != CUDA_R_32F && d->type != CUDA_R_16BF && d->type != CUDA_R_16F) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (is_fp8(a->type) || is_fp8(b->type)) {
        if (!is_fp8(a->type) || !is_fp8(b->type)) return CUBLAS_STATUS_NOT_SUPPORTED;
        // Hopper FP8 is "TN" only, with 16-byte aligned leading dimensions
        if (e->transa != CUBLAS_OP_T || e->transb != CUBLAS_OP_N) return CUBLAS_STATUS_NOT_SUPPORTED;
        if (a->ld % 16 || b->ld % 16) return CUBLAS_STATUS_NOT_SUPPORTED;
        if (is_block_mode(e->a_mode) || is_block_mode(e->b_mode)) {
            if (e->a_mode == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F &&
                e->b_mode == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F)
                return CUBLAS_STATUS_NOT_SUPPORTED;
            if (!is_block_mode(e->a_mode) || !is_block_mode(e->b_mode)) return CUBLAS_STATUS_NOT_SUPPORTED;
            if (*m % 4 || *n % 4) return CUBLAS_STATUS_NOT_SUPPORTED;
            if ((uintptr_t)e->a_scale % 16 || (uintptr_t)e->b_scale % 16) return CUBLAS_STATUS_INVALID_VALUE;
        }
    } else if (is_block_mode(e->a_mode) || is_block_mode(e->b_mode))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref,
                                              int requested, cublasLtMatmulHeuristicResult_t *res, int *found) {
    int64_t m, n, k;
    cublasStatus_t rc = check(D(op), L(a), L(b), L(c), L(d), &m, &n, &k);
    *found = 0;
    if (rc != CUBLAS_STATUS_SUCCESS) return rc;
    // CUEMU_LT_NO_ALGO (read at each call, so a test can set it around the
    // products it means): no algorithm for anything, answered either way a
    // cuBLASLt may answer it, so the callers' fallbacks run on any shape:
    // "status" returns CUBLAS_STATUS_NOT_SUPPORTED, anything else success
    // with none found
    if (const char *no = getenv("CUEMU_LT_NO_ALGO"))
        return strcmp(no, "status") ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
    if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    memset(res, 0, sizeof *res);
    res->state = CUBLAS_STATUS_SUCCESS;
    res->wavesCount = 1.0f;
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}

static float element(const void *p, cudaDataType t, size_t i) {
    switch (t) {
    case CUDA_R_32F: return ((const float *)p)[i];
    case CUDA_R_16BF: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    case CUDA_R_16F: return __half2float(((const __half *)p)[i]);
    case CUDA_R_8F_E4M3: {
        __nv_fp8_e4m3 v;
        v.__x = ((const __nv_fp8_storage_t *)p)[i];
        return (float)v;
    }
    case CUDA_R_8F_E5M2: {
        __nv_fp8_e5m2 v;
        v.__x = ((const __nv_fp8_storage_t *)p)[i];
        return (float)v;
    }
    default: fprintf(stderr, "cuemu: cuBLASLt data type %d is not emulated\n", (int)t); abort();
    }
}

static void store(void *p, cudaDataType t, size_t i, float v) {
    switch (t) {
    case CUDA_R_32F: ((float *)p)[i] = v; break;
    case CUDA_R_16BF: ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); break;
    case CUDA_R_16F: ((__half *)p)[i] = __float2half_rn(v); break;
    default: abort();
    }
}

// The scale of element (outer, kk) of an operand whose K runs along its
// rows (the stored, pre-op matrix of a "TN" FP8 product).
static float scale_of(const emu_desc *e, int which, int64_t outer, int64_t outer_n, int64_t kk, int64_t k) {
    const float *s = (const float *)(which ? e->b_scale : e->a_scale);
    int32_t mode = which ? e->b_mode : e->a_mode;
    if (!s) return 1.0f;
    int64_t nk = (k + 127) / 128, l4 = (nk + 3) / 4 * 4;
    if (mode == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F) return s[(kk / 128) * outer_n + outer];
    if (mode == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F) return s[(outer / 128) * l4 + kk / 128];
    return s[0];
}

// FP32 accumulation, as CUBLAS_COMPUTE_32F; eight running sums, which the
// compiler turns into vector code.
static float dot(const float *a, const float *b, int64_t k) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    float t = 0.0f;
    for (; i < k; i++) t += a[i] * b[i];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

// One operand as stored (column-major, leading dimension ld) and its op.
struct gemm_operand {
    const void *p;
    cudaDataType type;
    int64_t ld;
    cublasOperation_t op;
};

// D (m x n) = alpha op(A) op(B) + beta C in FP32, column-major, on the
// host: op(A) gathered as m rows of k and op(B) as n rows of k, each
// element times its FP8 block scale when scales is not NULL.
static void host_gemm(int64_t m, int64_t n, int64_t k, float al, gemm_operand a, gemm_operand b, float be,
                      const void *C, cudaDataType ct, int64_t ldc, void *D, cudaDataType dt, int64_t ldd,
                      const emu_desc *scales) {
    std::vector<float> ra((size_t)(m * k)), rb((size_t)(n * k));
    for (int64_t i = 0; i < m; i++)
        for (int64_t kk = 0; kk < k; kk++) {
            float v = element(a.p, a.type, a.op == CUBLAS_OP_N ? (size_t)(i + kk * a.ld) : (size_t)(kk + i * a.ld));
            ra[(size_t)(i * k + kk)] = scales ? v * scale_of(scales, 0, i, m, kk, k) : v;
        }
    for (int64_t j = 0; j < n; j++)
        for (int64_t kk = 0; kk < k; kk++) {
            float v = element(b.p, b.type, b.op == CUBLAS_OP_N ? (size_t)(kk + j * b.ld) : (size_t)(j + kk * b.ld));
            rb[(size_t)(j * k + kk)] = scales ? v * scale_of(scales, 1, j, n, kk, k) : v;
        }
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < m; i++) {
            float v = al * dot(&ra[(size_t)(i * k)], &rb[(size_t)(j * k)], k);
            if (be != 0.0f) v += be * element(C, ct, (size_t)(i + j * ldc));
            store(D, dt, (size_t)(i + j * ldd), v);
        }
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t op, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t a, const void *B, cublasLtMatrixLayout_t b, const void *beta,
                              const void *C, cublasLtMatrixLayout_t c, void *Dp, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_size, cudaStream_t stream) {
    if (h->device != cuemu_current_device() || cuemu_stream_device(stream) != h->device) {
        fprintf(stderr, "cuemu: cublasLtMatmul with a handle of device %d, device %d current, a stream of device %d\n",
                h->device, cuemu_current_device(), cuemu_stream_device(stream));
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    int64_t m, n, k;
    emu_desc e = *D(op);
    emu_layout la = *L(a), lb = *L(b), lc = *L(c), ld = *L(d);
    cublasStatus_t rc = check(&e, &la, &lb, &lc, &ld, &m, &n, &k);
    if (rc != CUBLAS_STATUS_SUCCESS) return rc;
    float al = *(const float *)alpha, be = *(const float *)beta;
    int fp8 = is_fp8(la.type);
    // The descriptor is read now (as cuBLASLt does at the call); the data
    // when the stream gets to it. One kernel node, where a real cuBLASLt may
    // record more (a split-K reduction, say): graph node counts taken here
    // are a lower bound for the products.
    cuemu_stream_enqueue(
        stream,
        [=]() {
            host_gemm(m, n, k, al, gemm_operand{A, la.type, la.ld, e.transa}, gemm_operand{B, lb.type, lb.ld, e.transb},
                      be, C, lc.type, lc.ld, Dp, ld.type, ld.ld, fp8 ? &e : NULL);
        },
        cudaGraphNodeTypeKernel);
    return CUBLAS_STATUS_SUCCESS;
}

// ---- cuBLAS: cublasGemmEx on a handle's stream ---------------------------------

struct cublasContext {
    int device;
    cudaStream_t stream;
};

cublasStatus_t cublasCreate_v2(cublasHandle_t *h) {
    *h = new cublasContext{cuemu_current_device(), NULL};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
// The emulated GEMM needs no workspace; the call is only checked.
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void *ws, size_t bytes) {
    return ws || !bytes ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}
const char *cublasGetStatusString(cublasStatus_t rc) {
    switch (rc) {
    case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
    case CUBLAS_STATUS_INVALID_VALUE: return "an unsupported value or parameter was passed to the function";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    default: return "cuemu: unknown cuBLAS status";
    }
}

// Column-major C (m x n) = alpha op(A) (m x k) op(B) (k x n) + beta C, with
// FP32 (or BF16/FP16) inputs and FP32 accumulation.
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                            int ldb, const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
    if (h->device != cuemu_current_device() || cuemu_stream_device(h->stream) != h->device) {
        fprintf(stderr, "cuemu: cublasGemmEx with a handle of device %d, device %d current, a stream of device %d\n",
                h->device, cuemu_current_device(), cuemu_stream_device(h->stream));
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    if (m < 0 || n < 0 || k < 0 || lda < (transa == CUBLAS_OP_N ? m : k) || ldb < (transb == CUBLAS_OP_N ? k : n) ||
        ldc < m || lda < 1 || ldb < 1 || ldc < 1)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (compute != CUBLAS_COMPUTE_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    for (cudaDataType t : {at, bt, ct})
        if (t != CUDA_R_32F && t != CUDA_R_16BF && t != CUDA_R_16F) return CUBLAS_STATUS_NOT_SUPPORTED;
    float al = *(const float *)alpha, be = *(const float *)beta;
    cuemu_stream_enqueue(
        h->stream,
        [=]() {
            host_gemm(m, n, k, al, gemm_operand{A, at, lda, transa}, gemm_operand{B, bt, ldb, transb}, be, C, ct, ldc,
                      C, ct, ldc, NULL);
        },
        cudaGraphNodeTypeKernel);
    return CUBLAS_STATUS_SUCCESS;
}
