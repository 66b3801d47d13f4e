// cuemu's runtime as its other parts see it (cuemu_lt.cc, cuemu_nccl.cc):
// the emulated devices, streams and device memory of tests/cuemu/cuemu_api.cc.
//
// Several devices (CUEMU_DEVICES, default 1) share the host's memory; what
// makes them distinct is the bookkeeping: each host thread has its current
// device (cudaSetDevice), a stream and an allocation belong to the device
// current when they were made, and a kernel launched into a stream of
// another device fails as on a GPU. Host threads may drive different
// devices at once: kernels run one at a time under the emulator's lock, and
// work that blocks (an NCCL collective waiting for its peers) runs outside it.
#ifndef NB_CUEMU_RT_H
#define NB_CUEMU_RT_H

#include <cuda_runtime.h>
#include <stddef.h>

#include <functional>
#include <mutex>

// Queues fn on the stream (it runs when the host waits for the stream), or
// appends it to the graph the stream is recording as a node of the given
// type (what a GPU would record: cudaGraphNodeGetType). fn runs without the
// emulator's lock: what it shares with other threads it guards. A
// collective (it waits for other host threads' work) runs at the call.
void cuemu_stream_enqueue(cudaStream_t s, std::function<void()> fn, enum cudaGraphNodeType type, int collective = 0);
// The device a stream belongs to (the default stream: the caller's current).
int cuemu_stream_device(cudaStream_t s);
// The calling thread's current device, and how many there are.
int cuemu_current_device(void);
int cuemu_device_count(void);
// The device of the allocation holding [p, p + bytes), or -1 if no single
// device allocation holds it all.
int cuemu_device_of(const void *p, size_t bytes);

// Between the block scheduler (cuemu.cc) and the runtime API
// (cuemu_api.cc): the lock under which grids run and the allocation and
// attribute tables change (never held while a thread waits for another),
// and one grid run now on the calling thread.
extern std::mutex emu_mu;
// The device's shared memory per block: without opting in, and at most
// (static and dynamic together) with cudaFuncAttributeMaxDynamicSharedMemorySize.
#define CUEMU_SMEM_DEFAULT (48 << 10)
#define CUEMU_SMEM_OPTIN_MAX 232448 // sm_90: 227 KiB
struct cuemu_cfg;
void cuemu_run_grid(const char *name, const cuemu_cfg &cfg, void (*run)(void *), void *args);

#endif
