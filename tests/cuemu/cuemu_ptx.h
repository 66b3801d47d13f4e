// cuemu's versions of the PTX in kernels/cuda/cuda_ptx.h, written from the
// PTX ISA's definitions (not from the kernels' own comments), so that a
// kernel that builds its fragments wrongly computes wrong results here too.
#ifndef NB_CUEMU_PTX_H
#define NB_CUEMU_PTX_H

#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

static inline float cuemu_bf16_bits(uint32_t reg, int high) {
    uint32_t u = (high ? reg >> 16 : reg & 0xffffu) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Code `byte` (0-3) of a register as E4M3, by the CUDA headers' host
// conversion (exact).
static inline float cuemu_e4m3_bits(uint32_t reg, int byte) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)(reg >> (8 * byte) & 0xffu), __NV_E4M3);
    return __half2float(__half(h));
}

// The lanes' fragments of one mma, as they are exchanged through the warp
// barrier.
struct cuemu_frag {
    uint32_t a[4], b[2];
    float c[4];
};

// D = A B + C for a 16x8xKD mma: `place(f, g, t, A, B)` puts lane (g, t)'s
// A and B elements where the instruction's fragment layout says. The first
// lane back computes the warp's whole D; the others read it. C and D
// (4 FP32 a lane) are at row = groupID + 8 * (i >= 2), col = 2 *
// threadID_in_group + (i % 2) for every shape here.
template <int KD, class Place>
static inline void cuemu_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Place place) {
    cuemu_frag me = {{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
    const unsigned char *s = cuemu_warp_exchange(0xffffffffu, &me, sizeof me);
    float(*D)[8] = (float(*)[8])cuemu_warp_scratch();
    CUEMU_UNCHECKED_BEGIN(); // the warp's scratch is the emulator's, not the kernel's
    if (cuemu_warp_first()) {
        float A[16][KD], B[KD][8];
        for (int lane = 0; lane < 32; lane++) {
            cuemu_frag f;
            memcpy(&f, s + (size_t)lane * CUEMU_SLOT, sizeof f);
            int g = lane >> 2, t = lane & 3;
            place(f, g, t, A, B);
            for (int i = 0; i < 4; i++) D[g + 8 * (i >= 2)][2 * t + (i % 2)] = f.c[i];
        }
        for (int row = 0; row < 16; row++)
            for (int col = 0; col < 8; col++) {
                float acc = D[row][col];
                for (int k = 0; k < KD; k++) acc += A[row][k] * B[k][col];
                D[row][col] = acc;
            }
    }
    int lane = (int)cuemu_lane(), g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; i++) d[i] = D[g + 8 * (i >= 2)][2 * t + (i % 2)];
    CUEMU_UNCHECKED_END();
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, PTX ISA 9.7.14.5.8
// "Matrix Fragments for mma.m16n8k16 with floating point type": with
// groupID = lane >> 2 and threadID_in_group = lane % 4, element i of a
// lane's A fragment (8 BF16 in 4 registers, two per register, the first in
// the low half) is at
//   row = groupID + 8 * ((i % 4) >= 2), col = 2 * threadID_in_group + (i % 2) + 8 * (i >= 4);
// element i of B (4 BF16 in 2 registers) at
//   row (k) = 2 * threadID_in_group + (i % 2) + 8 * (i >= 2), col (n) = groupID.
static inline void cuda_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuemu_mma<16>(d, a, b0, b1, [](const cuemu_frag &f, int g, int t, float (*A)[16], float (*B)[8]) {
        for (int i = 0; i < 8; i++) {
            int row = g + 8 * ((i % 4) >= 2), col = 2 * t + (i % 2) + 8 * (i >= 4);
            A[row][col] = cuemu_bf16_bits(f.a[i / 2], i % 2);
        }
        for (int i = 0; i < 4; i++) B[2 * t + (i % 2) + 8 * (i >= 2)][g] = cuemu_bf16_bits(f.b[i / 2], i % 2);
    });
}

// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32, PTX ISA 9.7.14.5
// "Matrix Fragments for mma.m16n8k32" (8-bit types): element i of a lane's
// A fragment (16 codes in 4 registers, four per register, the first in the
// low byte) is at
//   row = groupID + 8 * ((i / 4) % 2), col = 4 * threadID_in_group + (i % 4) + 16 * (i >= 8);
// element i of B (8 codes in 2 registers) at
//   row (k) = 4 * threadID_in_group + (i % 4) + 16 * (i >= 4), col (n) = groupID.
// E4M3 products are exact in FP32 and summed here in FP32 (the GPU keeps
// fewer bits inside the MMA; see test_cuda_fp8.c).
static inline void cuda_mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuemu_mma<32>(d, a, b0, b1, [](const cuemu_frag &f, int g, int t, float (*A)[32], float (*B)[8]) {
        for (int i = 0; i < 16; i++) {
            int row = g + 8 * ((i / 4) % 2), col = 4 * t + (i % 4) + 16 * (i >= 8);
            A[row][col] = cuemu_e4m3_bits(f.a[i / 4], i % 4);
        }
        for (int i = 0; i < 8; i++) B[4 * t + (i % 4) + 16 * (i >= 4)][g] = cuemu_e4m3_bits(f.b[i / 4], i % 4);
    });
}

// fma.rn.bf16x2: per half, a * b + c rounded once to BF16 (nearest even).
// BF16 products have 16 significant bits, so the sum is exact in double
// unless the terms lie more than 37 binades apart (the kernels' never do)
// and one rounding from double is the instruction's.
static inline uint32_t cuda_fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d = 0;
    for (int h = 0; h < 2; h++) {
        double v = (double)cuemu_bf16_bits(a, h) * cuemu_bf16_bits(b, h) + cuemu_bf16_bits(c, h);
        d |= (uint32_t)__bfloat16_as_ushort(__double2bfloat16(v)) << (16 * h);
    }
    return d;
}

// fma.rn.bf16x2 by one half of s in both halves, plus -0 (a product,
// +0 included, as it is).
static inline uint32_t cuda_mul_bf16x2_half(uint32_t a, uint32_t s, int hi) {
    const uint32_t h = hi ? s >> 16 : s & 0xffffu;
    return cuda_fma_bf16x2(a, h | h << 16, 0x80008000u);
}

// lop3.b32 with the table of (a & mask) | bits.
static inline uint32_t cuda_and_or(uint32_t a, uint32_t mask, uint32_t bits) { return (a & mask) | bits; }

// cp.async: queued per thread and performed when a wait_group retires its
// group (cuemu.cc), so data read before the wait is stale, as it may be on
// the device.
void cuemu_cp_async(void *smem, const void *gmem, int src_bytes, int bytes);
void cuemu_cp_async_commit(void);
void cuemu_cp_async_wait(int n);

static inline void cuda_cp_async16(void *smem, const void *gmem, bool valid) {
    cuemu_cp_async(smem, gmem, valid ? 16 : 0, 16);
}
static inline void cuda_cp_async_commit() { cuemu_cp_async_commit(); }
template <int n> static inline void cuda_cp_async_wait() { cuemu_cp_async_wait(n); }

#endif
