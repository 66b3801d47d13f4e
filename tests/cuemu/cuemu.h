// cuemu: runs nibble's CUDA kernels on the CPU, so that CI machines without
// a GPU execute every kernel, not only compile it.
//
// Each kernels/cuda/*.cu (and .h) is compiled as C++ by the host compiler
// with this header forced in (-include) after tests/cuemu/cuemu_src.pl has
// rewritten what only nvcc parses: kernel<<<...>>>(...) launches and
// `__shared__` declarations (into the block's shared memory, below). The
// CUDA headers' host halves give the BF16, FP16 and FP8 types and
// conversions; this header gives the rest of the device side: thread
// indices, barriers, warp shuffles, atomics and the few intrinsics the
// kernels use. tests/cuemu/cuemu.cc is the block scheduler behind it,
// cuemu_api.cc the runtime (device memory, streams, graph capture,
// launches), cuemu_lt.cc a reference cuBLASLt and cuemu_nccl.cc the NCCL
// calls of tensor parallelism, over several devices (CUEMU_DEVICES) that
// host threads may drive at once (cuemu_rt.h).
//
// The execution model: a grid's blocks run one after another; within a
// block every CUDA thread is a fiber (its own stack) on one OS thread. A
// fiber runs until it reaches a barrier (__syncthreads, a warp shuffle, an
// mma), so the emulation is deterministic, and checks what a GPU would
// punish: barriers a thread never reaches (deadlock), shuffles whose mask
// names an exited lane, launch configurations and dynamic shared memory
// beyond the device's limits, misaligned cp.async. Between barriers the
// fibers of a block run in forward order in one block and reverse order in
// the next, so a read that a missing __syncthreads leaves racing with a
// write sees the stale value in one of them. cp.async copies are performed
// only when a wait_group retires them, so reading a tile before waiting for
// it reads stale data here too.
//
// Streams are asynchronous as on a GPU: work queued on a stream runs when
// the host waits for it (cudaStreamSynchronize, cudaDeviceSynchronize, a
// blocking copy or cudaFree, the legacy default stream's implicit
// barrier), so reading a result before waiting reads what was there
// before, and a pinned buffer reused before the stream read it is read
// with its new contents. Copies from pageable memory happen at the call,
// as the driver stages them. CUEMU_SYNC=1 runs everything at the call.
//
// Races between threads, which this fixed order hides, are the race
// detector's (CUEMU_SAN=thread, see cuemu.cc).
//
// What it cannot see: timing, register pressure, bank conflicts, and
// whether cuBLASLt accepts a configuration (cuemu_lt.cc follows the
// documentation).
#ifndef NB_CUEMU_H
#define NB_CUEMU_H

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

// The vector types keep their device alignment here (the CUDA headers'
// __builtin_align__), so that under CUEMU_SAN=alignment (UBSan) a
// misaligned vector load or store faults as it does on the GPU.
static_assert(alignof(float4) == 16 && alignof(uint4) == 16 && alignof(int4) == 16 && alignof(float2) == 8 &&
                  alignof(uint2) == 8,
              "cuemu: the CUDA vector types lost their alignment on the host");

// ---- qualifiers: plain C++ here --------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __launch_bounds__(...)
// No __shared__: cuemu_src.pl turns every shared declaration into a
// reference into the running block's shared memory (below).

// ---- the current thread ----------------------------------------------------
// Set by the scheduler before it switches to a fiber.
extern uint3 cuemu_thread_idx, cuemu_block_idx;
extern dim3 cuemu_block_dim, cuemu_grid_dim;
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#undef warpSize
#define threadIdx cuemu_thread_idx
#define blockIdx cuemu_block_idx
#define blockDim cuemu_block_dim
#define gridDim cuemu_grid_dim
#define warpSize 32

// Barrier of the whole block.
void cuemu_syncthreads(void);
#define __syncthreads() cuemu_syncthreads()
static inline void __syncwarp(unsigned mask = 0xffffffffu);
// The block's shared memory: the dynamic part, and the static variable
// declared at `key` (cuemu_src.pl gives each declaration its own key), the
// same bytes for every thread of the block, NaN-filled when the block
// starts.
void *cuemu_dynamic_smem(void);
void *cuemu_static_smem(const void *key, size_t bytes, size_t align);

// Under ThreadSanitizer (CUEMU_SAN=thread, the emulator's racecheck) the
// emulator's own bookkeeping inside a kernel's code is hidden from it, and
// fences and atomics order memory as the CUDA programming guide's
// "last block" reduction needs: an atomic after a __threadfence publishes
// what its thread did before it, and any later atomic or fence sees all
// that was so published (cuemu.cc, built uninstrumented with CUEMU_TSAN).
#if defined(__SANITIZE_THREAD__) || (defined(CUEMU_TSAN) && CUEMU_TSAN)
extern "C" void AnnotateIgnoreReadsBegin(const char *file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char *file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char *file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char *file, int line);
#define CUEMU_UNCHECKED_BEGIN()                                                                                        \
    (AnnotateIgnoreReadsBegin(__FILE__, __LINE__), AnnotateIgnoreWritesBegin(__FILE__, __LINE__))
#define CUEMU_UNCHECKED_END() (AnnotateIgnoreWritesEnd(__FILE__, __LINE__), AnnotateIgnoreReadsEnd(__FILE__, __LINE__))
void cuemu_race_fence(void);
void cuemu_race_atomic(int done); // 0 before the atomic operation, 1 after
static inline void __threadfence(void) { cuemu_race_fence(); }
#else
#define CUEMU_UNCHECKED_BEGIN() ((void)0)
#define CUEMU_UNCHECKED_END() ((void)0)
static inline void cuemu_race_atomic(int) {}
static inline void __threadfence(void) {}
#endif
static inline void __threadfence_block(void) {}

// Lane of the current thread in its warp.
static inline unsigned cuemu_lane(void) {
    unsigned t = cuemu_thread_idx.x + cuemu_block_dim.x * (cuemu_thread_idx.y + cuemu_block_dim.y * cuemu_thread_idx.z);
    return t & 31u;
}

// Bytes each lane may deposit in one warp exchange.
#define CUEMU_SLOT 64
// The warp barrier under every shuffle and mma: deposits this lane's `n`
// bytes, waits for every lane of `mask` and returns the 32 lanes' slots
// (lane i's at + i * CUEMU_SLOT), valid until the warp's next exchange but
// one. `orders_memory`: the lanes' memory accesses before it happen before
// theirs after it, for the race detector (__syncwarp; a shuffle or an mma
// exchanges values only).
const unsigned char *cuemu_warp_exchange(unsigned mask, const void *mine, size_t n, int orders_memory = 0);

// After an exchange: 1 for the first lane of the warp to ask, 0 for the
// others, so that work the whole warp shares is done once; the warp's
// scratch (256 floats) holds its result until the warp's next exchange.
int cuemu_warp_first(void);
float *cuemu_warp_scratch(void);

static inline void __syncwarp(unsigned mask) { (void)cuemu_warp_exchange(mask, NULL, 0, 1); }

template <class T> static inline T cuemu_lane_value(const unsigned char *slots, unsigned from) {
    T r;
    memcpy(&r, slots + (size_t)from * CUEMU_SLOT, sizeof r);
    return r;
}
template <class T> static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    static_assert(sizeof(T) <= CUEMU_SLOT, "shuffle of a type wider than a slot");
    const unsigned char *s = cuemu_warp_exchange(mask, &v, sizeof v);
    unsigned lane = cuemu_lane(), base = lane & ~(unsigned)(width - 1);
    return cuemu_lane_value<T>(s, base + ((unsigned)src & (unsigned)(width - 1)));
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const unsigned char *s = cuemu_warp_exchange(mask, &v, sizeof v);
    unsigned lane = cuemu_lane(), from = lane ^ (unsigned)lane_mask;
    // a source outside the lane's width-segment returns the lane's own value
    if ((from & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) from = lane;
    return cuemu_lane_value<T>(s, from);
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned char *s = cuemu_warp_exchange(mask, &v, sizeof v);
    unsigned lane = cuemu_lane(), in_seg = lane & (unsigned)(width - 1);
    return cuemu_lane_value<T>(s, in_seg >= delta ? lane - delta : lane);
}
template <class T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const unsigned char *s = cuemu_warp_exchange(mask, &v, sizeof v);
    unsigned lane = cuemu_lane(), in_seg = lane & (unsigned)(width - 1);
    return cuemu_lane_value<T>(s, in_seg + delta < (unsigned)width ? lane + delta : lane);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    int p = pred != 0;
    const unsigned char *s = cuemu_warp_exchange(mask, &p, sizeof p);
    unsigned r = 0;
    for (unsigned i = 0; i < 32; i++)
        if ((mask >> i & 1u) && cuemu_lane_value<int>(s, i)) r |= 1u << i;
    return r;
}
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
static inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

// ---- atomics ---------------------------------------------------------------
// Fibers never run at the same time, but the race detector must see these
// as atomic (relaxed, as CUDA's are) to let threads race on them.
template <class T, class F> static inline T cuemu_atomic_update(T *p, F f) {
    T old, v;
    cuemu_race_atomic(0);
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do v = f(old);
    while (!__atomic_compare_exchange(p, &old, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    cuemu_race_atomic(1);
    return old;
}
template <class T> static inline T atomicAdd(T *p, T v) {
    return cuemu_atomic_update(p, [v](T old) { return old + v; });
}
template <class T> static inline T atomicMin(T *p, T v) {
    return cuemu_atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <class T> static inline T atomicMax(T *p, T v) {
    return cuemu_atomic_update(p, [v](T old) { return v > old ? v : old; });
}
template <class T> static inline T atomicExch(T *p, T v) {
    return cuemu_atomic_update(p, [v](T) { return v; });
}
template <class T> static inline T atomicCAS(T *p, T cmp, T v) {
    return cuemu_atomic_update(p, [cmp, v](T old) { return old == cmp ? v : old; });
}

// ---- intrinsics ------------------------------------------------------------
template <class T> static inline T __ldg(const T *p) { return *p; }
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float __int_as_float(int u) { return __uint_as_float((unsigned)u); }
static inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
// The _rn forms are single IEEE operations: volatile keeps the host
// compiler from contracting them into fused multiply-adds.
static inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
static inline float __fsub_rn(float a, float b) {
    volatile float r = a - b;
    return r;
}
static inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
static inline float __fdiv_rn(float a, float b) {
    volatile float r = a / b;
    return r;
}
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
static inline int __float2int_rn(float x) { return (int)rintf(x); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes y:x (x the low four).
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = (unsigned long long)y << 32 | x;
    unsigned r = 0;
    for (int n = 0; n < 4; n++) r |= (unsigned)(v >> (8 * ((s >> (4 * n)) & 7u)) & 0xffu) << (8 * n);
    return r;
}
// The high 32 bits of the 64-bit product.
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)((unsigned long long)a * b >> 32); }

#define CUEMU_MINMAX(T)                                                                                                \
    static inline T min(T a, T b) { return a < b ? a : b; }                                                            \
    static inline T max(T a, T b) { return a > b ? a : b; }
CUEMU_MINMAX(int)
CUEMU_MINMAX(unsigned)
CUEMU_MINMAX(long long)
CUEMU_MINMAX(unsigned long long)
CUEMU_MINMAX(long)
CUEMU_MINMAX(unsigned long)
#undef CUEMU_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

// ---- launches ---------------------------------------------------------------
typedef struct cuemu_cfg {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
} cuemu_cfg;

static inline cuemu_cfg cuemu_config(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = 0) {
    cuemu_cfg c = {grid, block, smem, stream};
    return c;
}

// Runs (or, on a capturing stream, records) `run(args)` once per thread of
// the grid; `destroy(args)` frees the arguments when no launch or graph
// needs them any more. Configuration errors become the sticky launch error
// that cudaGetLastError returns, with a message naming the kernel.
void cuemu_submit(const char *name, cuemu_cfg cfg, void (*run)(void *), void (*destroy)(void *), void *args);

// cudaFuncSetAttribute(kernel, attr, v) becomes
// cuemu_func_set_attribute("kernel", attr, v): limits are kept by the
// kernel's name as written, which is what a launch can name too.
cudaError_t cuemu_func_set_attribute(const char *name, enum cudaFuncAttribute attr, int value);

// kernel<<<cfg>>>(args...) becomes cuemu_launch("kernel", cuemu_config(cfg),
// [](auto &...a) { kernel(a...); }, args...): the arguments are stored once
// and every thread calls the kernel with them, which copies them into its
// parameters (and deduces template arguments) as a device launch does.
template <class F, class... A> static void cuemu_launch(const char *name, cuemu_cfg cfg, F body, A &&...args) {
    struct call {
        F body;
        std::tuple<typename std::decay<A>::type...> args;
    };
    call *c = new call{body, std::tuple<typename std::decay<A>::type...>(std::forward<A>(args)...)};
    cuemu_submit(
        name, cfg, [](void *x) { std::apply(((call *)x)->body, ((call *)x)->args); },
        [](void *x) { delete (call *)x; }, c);
}

#endif
