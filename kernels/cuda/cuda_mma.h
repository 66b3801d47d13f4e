// What the 64x64-tile tensor-core kernels (cuda_wint.cu's mma_tile for
// packed and BF16 weights, cuda_fp8.cu's fp8_mma_tile) share: a block of 4
// warps, warp w computing rows 32 (w / 2).. and columns 32 (w % 2).. of the
// tile as 2 x 4 mma tiles of 16x8, from A (rows) and B (weight rows) tiles
// in shared memory, and the walk that maps a block row to a tile of an
// expert of a mixture.
#ifndef NB_CUDA_MMA_H
#define NB_CUDA_MMA_H

#include <stdint.h>

// The A and B fragments of one 32-byte k-step at byte kb of the tiles
// (rows lds bytes apart), for the warp's rows wm.. and columns wn... In
// bytes the fragments of m16n8k16 BF16 (16 values a step) and m16n8k32
// E4M3 (32) are the same (cuda_ptx.h): A rows g and g + 8, B row g, at
// bytes 4t and 4t + 16 of the step.
__device__ __forceinline__ void mma_warp_frags(uint32_t (&af)[2][4], uint32_t (&bf)[4][2], const uint8_t *as,
                                               const uint8_t *bs, int lds, int kb, int wm, int wn, int g, int t) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const uint8_t *p = as + (wm + 16 * i + g) * lds + kb + 4 * t;
        af[i][0] = *(const uint32_t *)p;
        af[i][1] = *(const uint32_t *)(p + 8 * lds);
        af[i][2] = *(const uint32_t *)(p + 16);
        af[i][3] = *(const uint32_t *)(p + 8 * lds + 16);
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint8_t *p = bs + (wn + 8 * j + g) * lds + kb + 4 * t;
        bf[j][0] = *(const uint32_t *)p;
        bf[j][1] = *(const uint32_t *)(p + 16);
    }
}

// The warp's accumulators into out [M][N] (tile at m0, n0), inside M x N.
__device__ __forceinline__ void mma_warp_store(float *out, const float (&acc)[2][4][4], int M, int N, int m0, int n0,
                                               int wm, int wn, int g, int t) {
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int m = m0 + wm + 16 * i + g + (e >= 2 ? 8 : 0), n = n0 + wn + 8 * j + 2 * t + (e & 1);
                if (m < M && n < N) out[(size_t)m * N + n] = acc[i][j][e];
            }
}

// Block row j of a grouped launch: the j-th 64-row tile of the experts in
// use (groups as moe_route lays them out), their tiles in expert order.
// Returns the expert (its rows r0 .. r0 + cnt - 1, the tile's first row
// *m0 of them), or -1 past the last tile. A step uses few experts next to
// a tile's work, so walking the list beats a prefix sum.
__device__ __forceinline__ int mma_expert_tile(const int32_t *groups, int E, int j, int *r0, int *cnt, int *m0) {
    const int active = groups[E + 1];
    for (int i = 0; i < active; i++) {
        const int e = groups[E + 2 + i], c = groups[e + 1] - groups[e], tiles = (c + 63) / 64;
        if (j < tiles) {
            *r0 = groups[e], *cnt = c, *m0 = 64 * j;
            return e;
        }
        j -= tiles;
    }
    return -1;
}

#endif
