// The paged KV cache as the kernels see it: where (slot, kv head)'s values
// and scale lie, reading one value, and quantizing a row into place. Layout
// and quantization are those of backend.h and kernels/cpu/cpu_attention.c:
// a block holds NB_KV_BLOCK_SIZE slots x n_kv heads x head_dim values, then
// (INT8/FP8) one FP32 scale per slot per head.
#ifndef NB_CUDA_KV_H
#define NB_CUDA_KV_H

#include <cuda_fp8.h>

#include "kernels/cuda/cuda_int.h"

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

// Raw bytes of one aligned vector load of N bytes (16, 8, 4 or 2).
template <int N> struct kv_vec;
template <> struct kv_vec<16> { typedef uint4 t; };
template <> struct kv_vec<8> { typedef uint2 t; };
template <> struct kv_vec<4> { typedef uint32_t t; };
template <> struct kv_vec<2> { typedef uint16_t t; };

// Elements [c * E, c * E + E) of a row as floats, in aligned loads of at
// most 16 bytes (E * element size is a power of two from 2 to 32 bytes,
// and divides the row's bytes, so chunks never straddle rows or lose
// alignment). The same values kv_get gives.
template <int KV, int E>
__device__ __forceinline__ void kv_chunk(const char *vals, int c, float scale, float (&f)[E]) {
    constexpr int ES = KV == NB_KV_F32 ? 4 : KV == NB_KV_BF16 ? 2 : 1;
    constexpr int BYTES = E * ES, LOAD = BYTES < 16 ? BYTES : 16, PER = LOAD / ES;
    const char *p = vals + (size_t)c * BYTES;
#pragma unroll
    for (int v = 0; v < BYTES / LOAD; v++) {
        typename kv_vec<LOAD>::t raw = *(const typename kv_vec<LOAD>::t *)(p + v * LOAD);
        const char *r = (const char *)&raw;
#pragma unroll
        for (int e = 0; e < PER; e++) f[v * PER + e] = kv_get<KV>(r, e, scale);
    }
}

// One warp stores row src[0..D) as (slot, kv head h) of cache. INT8/FP8
// compute the row's scale exactly as the CPU does (max|x| / 127 or / 448,
// then x * (1 / scale) rounded to nearest even), so both write the same
// bytes from the same floats.
template <int KV>
__device__ __forceinline__ void kv_store_warp(char *cache, int slot, int h, int n_kv, int D, size_t block_bytes,
                                              const float *src, int lane) {
    const float *sp = NULL;
    char *dst = (char *)kv_row_ptr<KV>(cache, slot, h, n_kv, D, block_bytes, &sp);
    if (KV == NB_KV_F32) {
        for (int d = lane; d < D; d += 32) ((float *)dst)[d] = src[d];
        return;
    }
    if (KV == NB_KV_BF16) {
        for (int d = lane; d < D; d += 32) ((__nv_bfloat16 *)dst)[d] = __float2bfloat16_rn(src[d]);
        return;
    }
    float amax = 0.0f;
    for (int d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(src[d]));
    amax = cuda_warp_max(amax);
    float sc = amax / (KV == NB_KV_INT8 ? 127.0f : 448.0f), inv = sc > 0 ? 1.0f / sc : 0.0f;
    if (lane == 0) *(float *)sp = sc;
    for (int d = lane; d < D; d += 32) {
        float x = src[d] * inv;
        if (KV == NB_KV_INT8)
            ((int8_t *)dst)[d] = (int8_t)__float2int_rn(fminf(fmaxf(x, -127.0f), 127.0f));
        else
            ((__nv_fp8_storage_t *)dst)[d] = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    }
}

#endif
