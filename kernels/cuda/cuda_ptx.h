// The inline PTX the kernels use, in one place: BF16 tensor-core MMA and
// asynchronous global-to-shared copies. Under NB_CUEMU (tests/cuemu, the
// CPU emulator that runs these kernels in CI) the same functions are
// emulated from the PTX ISA's definitions instead.
#ifndef NB_CUDA_PTX_H
#define NB_CUDA_PTX_H

#include <cuda_bf16.h>
#include <stdint.h>

// Two values rounded to nearest-even BF16, lo in the low half: the order
// mma fragments want (the lower-indexed element in the low 16 bits).
__device__ __forceinline__ uint32_t cuda_bf16x2(float lo, float hi) {
    return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
           ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

#ifdef NB_CUEMU
#include "tests/cuemu/cuemu_ptx.h"
#else

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the kernels need sm_80 or newer (BF16 mma.m16n8k16, cp.async)"
#endif

// D = A B + D for one 16x8x16 step, BF16 inputs, FP32 accumulators. The
// fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"), with g = lane >> 2 and t = lane % 4; each .b32 register holds two
// BF16, the lower-indexed element in the low half:
//   A (16x16, row major): a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                         a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, K x N, "col": column n's K values adjacent, which is the layout
//   of a weight row n): b0 = B[2t, 2t+1][g]          b1 = B[2t+8, 2t+9][g]
//   C, D (16x8 FP32):   d[0], d[1] = D[g][2t, 2t+1] d[2], d[3] = D[g+8][2t, 2t+1]
__device__ __forceinline__ void cuda_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// D = A B + D for one 16x8x32 step on E4M3 codes (sm_89 and newer), FP32
// accumulators. The fragments (PTX ISA, "Matrix Fragments for mma.m16n8k32"
// with .e4m3), g and t as above; each .b32 register holds four codes, the
// lowest-indexed in the low byte:
//   A (16x32, row major): a[0] = A[g][4t .. 4t+3]     a[1] = A[g+8][4t .. 4t+3]
//                         a[2] = A[g][4t+16 .. 4t+19] a[3] = A[g+8][4t+16 .. 4t+19]
//   B (32x8, column n's K values adjacent): b0 = B[4t .. 4t+3][g]  b1 = B[4t+16 .. 4t+19][g]
//   C, D as for m16n8k16.
// So a weight row's or an activation row's four consecutive codes are one
// register, read from shared memory as they are.
__device__ __forceinline__ void cuda_mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap(); // the host launches FP8 mma kernels only on 8.9+ (cuda_fp8.cu)
#endif
}

// a * b + c on two BF16 pairs (.x in the low half), one rounding each: on
// the .b32 registers themselves, which the __nv_bfloat162 intrinsic would
// take apart and put together again.
__device__ __forceinline__ uint32_t cuda_fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// a * s.hi (hi = 1) or a * s.lo (hi = 0) on both halves, rounded once: the
// half is taken by the instruction's operand selector, which ptxas uses
// for a splat written so (a __byte_perm splat costs a PRMT).
__device__ __forceinline__ uint32_t cuda_mul_bf16x2_half(uint32_t a, uint32_t s, int hi) {
    uint32_t d;
    if (hi)
        asm("{.reg .b16 l, h; .reg .b32 ss; mov.b32 {l, h}, %2; mov.b32 ss, {h, h};\n"
            " fma.rn.bf16x2 %0, %1, ss, %3; }\n"
            : "=r"(d) : "r"(a), "r"(s), "r"(0x80008000u)); // + -0 leaves every product as it is
    else
        asm("{.reg .b16 l, h; .reg .b32 ss; mov.b32 {l, h}, %2; mov.b32 ss, {l, l};\n"
            " fma.rn.bf16x2 %0, %1, ss, %3; }\n"
            : "=r"(d) : "r"(a), "r"(s), "r"(0x80008000u));
    return d;
}

// (a & mask) | bits in one LOP3 (0xEA is the table of (A & B) | C): given
// the two constants as they are, ptxas makes an AND and an OR of them.
__device__ __forceinline__ uint32_t cuda_and_or(uint32_t a, uint32_t mask, uint32_t bits) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
    return d;
}

// 16 bytes from global to shared memory without passing through registers;
// valid == false reads nothing and fills the 16 bytes with zeros (src-size 0).
__device__ __forceinline__ void cuda_cp_async16(void *smem, const void *gmem, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0)
                 : "memory");
}
// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cuda_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `n` of this thread's most recent groups are pending.
template <int n> __device__ __forceinline__ void cuda_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory");
}

#endif
#endif
