// cuemu's versions of the PTX in kernels/cuda/cuda_ptx.h, written from the
// PTX ISA's definitions (not from the kernels' own comments), so that a
// kernel that builds its fragments wrongly computes wrong results here too.
#ifndef NB_CUEMU_PTX_H
#define NB_CUEMU_PTX_H

#include <stdint.h>
#include <string.h>

#include <cuda_fp16.h>

static inline float cuemu_bf16_bits(uint32_t reg, int high) {
    uint32_t u = (high ? reg >> 16 : reg & 0xffffu) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// The F16 element of a register (high: the upper half), by the CUDA
// headers' host conversion (exact).
static inline float cuemu_f16_bits(uint32_t reg, int high) {
    __half_raw h;
    h.x = (unsigned short)(high ? reg >> 16 : reg & 0xffffu);
    return __half2float(__half(h));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32, PTX ISA 9.7.14.5.8
// "Matrix Fragments for mma.m16n8k16 with floating point type": with
// groupID = lane >> 2 and threadID_in_group = lane % 4, element i of a
// lane's A fragment (8 values in 4 registers, two per register, the first in
// the low half) is at
//   row = groupID + 8 * ((i % 4) >= 2), col = 2 * threadID_in_group + (i % 2) + 8 * (i >= 4);
// element i of B (4 values in 2 registers) at
//   row (k) = 2 * threadID_in_group + (i % 2) + 8 * (i >= 2), col (n) = groupID;
// element i of C and D (4 FP32) at
//   row = groupID + 8 * (i >= 2), col = 2 * threadID_in_group + (i % 2).
// The lanes' registers are exchanged through the warp barrier; `elem`
// reads one input element (BF16 or F16) out of a register.
static inline void cuemu_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                      float (*elem)(uint32_t, int)) {
    struct frag {
        uint32_t a[4], b[2];
        float c[4];
    } me = {{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
    const unsigned char *s = cuemu_warp_exchange(0xffffffffu, &me, sizeof me);
    // The first lane back computes the warp's whole D; the others read it.
    float(*D)[8] = (float(*)[8])cuemu_warp_scratch();
    if (cuemu_warp_first()) {
        float A[16][16], B[16][8];
        for (int lane = 0; lane < 32; lane++) {
            frag f;
            memcpy(&f, s + (size_t)lane * CUEMU_SLOT, sizeof f);
            int g = lane >> 2, t = lane & 3;
            for (int i = 0; i < 8; i++) {
                int row = g + 8 * ((i % 4) >= 2), col = 2 * t + (i % 2) + 8 * (i >= 4);
                A[row][col] = elem(f.a[i / 2], i % 2);
            }
            for (int i = 0; i < 4; i++) {
                int k = 2 * t + (i % 2) + 8 * (i >= 2);
                B[k][g] = elem(f.b[i / 2], i % 2);
            }
            for (int i = 0; i < 4; i++) D[g + 8 * (i >= 2)][2 * t + (i % 2)] = f.c[i];
        }
        for (int row = 0; row < 16; row++)
            for (int col = 0; col < 8; col++) {
                float acc = D[row][col];
                for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
                D[row][col] = acc;
            }
    }
    int lane = (int)cuemu_lane(), g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; i++) d[i] = D[g + 8 * (i >= 2)][2 * t + (i % 2)];
}

static inline void cuda_mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuemu_mma_m16n8k16(d, a, b0, b1, cuemu_bf16_bits);
}
static inline void cuda_mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuemu_mma_m16n8k16(d, a, b0, b1, cuemu_f16_bits);
}

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
