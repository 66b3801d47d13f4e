// cuemu's runtime API: the CUDA runtime calls nibble makes, over host
// memory: allocations, copies, streams (asynchronous: see emu_stream),
// graph capture, replay and node queries, events, launches (checked, then
// queued for cuemu_run_grid in cuemu.cc) and the devices.
//
// Host threads: the allocation and attribute tables are shared with the
// scheduler's lock (emu_mu); the sticky error and the current device are
// per host thread, as in CUDA.
#include "tests/cuemu/cuemu.h"

#include <stdio.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tests/cuemu/cuemu_rt.h"

#undef warpSize // a cudaDeviceProp field here

// ---- launches -----------------------------------------------------------------

// A node of a stream's queue or of a graph: the work, what a GPU would
// record it as (cudaGraphNodeGetType), and whether it blocks on other host
// threads (an NCCL collective), which must not wait in a queue that only
// its own thread drains. A recorded graph's nodes are these: the handles
// cudaGraphGetNodes gives point into the graph's shared_ptrs, so they live
// as long as the graph (an instantiated graph holds its own references).
struct CUgraphNode_st {
    std::function<void()> fn;
    enum cudaGraphNodeType type;
    int collective;
};
typedef std::shared_ptr<CUgraphNode_st> emu_node;

// Streams run their work later, as a GPU does: a stream's queue is drained
// in order when the host waits for it (cudaStreamSynchronize, cudaFree,
// cudaDeviceSynchronize, a copy to or from pageable memory), so that host
// code which reuses a buffer before the stream has read it, or reads a
// result before waiting, sees what a GPU would give it. CUEMU_SYNC=1 runs
// everything at the call instead.
struct emu_stream {
    int capturing;
    cudaGraph_t graph;
    int device;   // current when the stream was made
    int blocking; // not cudaStreamNonBlocking: the legacy default stream waits for it
    std::vector<emu_node> pending;
    std::mutex drain; // held while the queue drains, so its work runs in order
};
struct CUstream_st {
    emu_stream s;
};
struct CUgraph_st {
    std::vector<emu_node> nodes;
};
struct CUgraphExec_st {
    std::vector<emu_node> nodes;
    int collective;
};

static CUstream_st default_stream;
static thread_local cudaError_t last_error = cudaSuccess;
static thread_local int current_device;
// cudaFuncAttributeMaxDynamicSharedMemorySize by device and kernel name: on
// a GPU the attribute is set per device too
static std::map<std::pair<int, std::string>, int> smem_optin;

// Every stream made, for the waits that cover a device.
static std::mutex streams_mu;
static std::vector<CUstream_st *> streams;

static CUstream_st *emu_stream_of(cudaStream_t s) { return s ? (CUstream_st *)s : &default_stream; }

static int emu_deferred(void) {
    static const int v = [] {
        const char *e = getenv("CUEMU_SYNC");
        return !(e && atoi(e));
    }();
    return v;
}

// Runs the stream's queued work, in order, on the calling thread.
static void stream_drain(CUstream_st *st) {
    std::lock_guard<std::mutex> hold(st->s.drain);
    for (;;) {
        std::vector<emu_node> work;
        {
            std::lock_guard<std::mutex> q(streams_mu);
            work.swap(st->s.pending);
        }
        if (work.empty()) return;
        for (const emu_node &n : work) n->fn();
    }
}

// Drains every stream of device d (blocking_only: those the legacy default
// stream waits for).
static void device_drain(int d, int blocking_only) {
    std::vector<CUstream_st *> of;
    {
        std::lock_guard<std::mutex> q(streams_mu);
        for (CUstream_st *st : streams)
            if (st->s.device == d && (!blocking_only || st->s.blocking)) of.push_back(st);
    }
    for (CUstream_st *st : of) stream_drain(st);
}

// Appends work to the graph the stream is recording, or to its queue; work
// on the legacy default stream, and collectives, run now (after what the
// stream already holds), since no one else would drain them.
static void stream_push(cudaStream_t s, emu_node n) {
    CUstream_st *st = emu_stream_of(s);
    if (st->s.capturing) {
        st->s.graph->nodes.push_back(std::move(n));
        return;
    }
    if (!emu_deferred()) {
        n->fn();
        return;
    }
    if (!s) {
        device_drain(current_device, 1);
        n->fn();
        return;
    }
    if (n->collective) {
        stream_drain(st);
        n->fn();
        return;
    }
    std::lock_guard<std::mutex> q(streams_mu);
    st->s.pending.push_back(std::move(n));
}

static void stream_enqueue(cudaStream_t s, std::function<void()> fn, enum cudaGraphNodeType type,
                           int collective = 0) {
    stream_push(s, std::make_shared<CUgraphNode_st>(CUgraphNode_st{std::move(fn), type, collective}));
}


void cuemu_submit(const char *name, cuemu_cfg cfg, void (*run)(void *), void (*destroy)(void *), void *args) {
    std::shared_ptr<void> owned(args, destroy);
    unsigned threads = cfg.block.x * cfg.block.y * cfg.block.z;
    const char *bad = NULL;
    if (threads == 0 || threads > 1024 || cfg.block.z > 64) bad = "block size";
    else if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.grid.y > 65535 || cfg.grid.z > 65535)
        bad = "grid size";
    else if (cuemu_stream_device(cfg.stream) != current_device) {
        // "A kernel launch will fail if it is issued to a stream that is not
        // associated to the current device" (CUDA programming guide)
        fprintf(stderr, "cuemu: launch of %s into a stream of device %d while device %d is current\n", name,
                cuemu_stream_device(cfg.stream), current_device);
        last_error = cudaErrorInvalidResourceHandle;
        return;
    } else {
        std::lock_guard<std::mutex> hold(emu_mu);
        auto it = smem_optin.find(std::make_pair(current_device, std::string(name)));
        size_t limit = it == smem_optin.end() ? CUEMU_SMEM_DEFAULT : (size_t)it->second;
        if (cfg.smem > limit) bad = "dynamic shared memory over the kernel's limit";
    }
    if (bad) {
        fprintf(stderr, "cuemu: launch of %s: invalid %s (grid %u,%u,%u block %u,%u,%u, %zu bytes shared)\n", name,
                bad, cfg.grid.x, cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z, cfg.smem);
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    stream_enqueue(cfg.stream, [=]() { cuemu_run_grid(name, cfg, run, owned.get()); }, cudaGraphNodeTypeKernel);
}

// ---- the runtime API ------------------------------------------------------------

// Allocations by address: their size and device (-1: pinned host memory).
struct emu_alloc_info {
    size_t n;
    int device;
};
#define EMU_MAX_DEVICES 16
static std::map<uintptr_t, emu_alloc_info> device_allocs, host_allocs;
static size_t device_used[EMU_MAX_DEVICES];

// CUEMU_DEVICES sets how many devices there are (default 1); read once, at
// the first call that asks.
int cuemu_device_count(void) {
    static const int n = [] {
        const char *e = getenv("CUEMU_DEVICES");
        int v = e ? atoi(e) : 1;
        return v < 1 ? 1 : v > EMU_MAX_DEVICES ? EMU_MAX_DEVICES : v;
    }();
    return n;
}

int cuemu_current_device(void) { return current_device; }

int cuemu_stream_device(cudaStream_t s) { return s ? ((CUstream_st *)s)->s.device : current_device; }

int cuemu_device_of(const void *p, size_t bytes) {
    std::lock_guard<std::mutex> hold(emu_mu);
    auto it = device_allocs.upper_bound((uintptr_t)p);
    if (it == device_allocs.begin()) return -1;
    --it;
    if ((uintptr_t)p + bytes > it->first + it->second.n) return -1;
    return it->second.device;
}

// CUEMU_SMS sets the SM count the device reports (default 132, an H100's),
// for kernels that size their grids by it.
static int emu_sms(void) {
    const char *e = getenv("CUEMU_SMS");
    return e && atoi(e) > 0 ? atoi(e) : 132;
}

static size_t emu_total_memory(void) {
    const char *e = getenv("CUEMU_MEMORY_MB");
    return (e && atol(e) > 0 ? (size_t)atol(e) : 2048) << 20;
}

static cudaError_t emu_error(cudaError_t rc) {
    if (rc != cudaSuccess) last_error = rc;
    return rc;
}

static cudaError_t emu_alloc(std::map<uintptr_t, emu_alloc_info> &m, void **p, size_t n, int device) {
    if (!p) return emu_error(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> hold(emu_mu);
    int d = current_device;
    if (device && device_used[d] + n > emu_total_memory()) return emu_error(cudaErrorMemoryAllocation);
    // exactly n bytes (at the device's 256-byte alignment), so that an
    // AddressSanitizer build (CUEMU_SAN=address) sees any access past them
    void *q = NULL;
    if (posix_memalign(&q, 256, n ? n : 1)) return emu_error(cudaErrorMemoryAllocation);
    // fresh device memory is not zero on a GPU either
    memset(q, 0xa5, n);
    m[(uintptr_t)q] = emu_alloc_info{n, device ? d : -1};
    if (device) device_used[d] += n;
    *p = q;
    return cudaSuccess;
}

static cudaError_t emu_free(std::map<uintptr_t, emu_alloc_info> &m, void *p, int device) {
    if (!p) return cudaSuccess;
    std::lock_guard<std::mutex> hold(emu_mu);
    auto it = m.find((uintptr_t)p);
    if (it == m.end()) {
        fprintf(stderr, "cuemu: %s of a pointer it did not allocate\n", device ? "cudaFree" : "cudaFreeHost");
        return emu_error(cudaErrorInvalidValue);
    }
    if (device) device_used[it->second.device] -= it->second.n;
    m.erase(it);
    free(p);
    return cudaSuccess;
}

// Whether [p, p + n) lies in pinned memory (cudaMallocHost), which copies
// read or write when the stream gets to them; pageable memory is copied at
// the call.
static int emu_pinned(const void *p, size_t n) {
    std::lock_guard<std::mutex> hold(emu_mu);
    auto it = host_allocs.upper_bound((uintptr_t)p);
    if (it == host_allocs.begin()) return 0;
    --it;
    return (uintptr_t)p + n <= it->first + it->second.n;
}

cudaError_t cudaMalloc(void **p, size_t n) { return emu_alloc(device_allocs, p, n, 1); }
cudaError_t cudaMallocHost(void **p, size_t n) { return emu_alloc(host_allocs, p, n, 0); }
// Both wait for the device first, as on a GPU, so nothing queued still
// reads what they free.
cudaError_t cudaFree(void *p) {
    device_drain(current_device, 0);
    return emu_free(device_allocs, p, 1);
}
cudaError_t cudaFreeHost(void *p) {
    device_drain(current_device, 0);
    return emu_free(host_allocs, p, 0);
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    std::lock_guard<std::mutex> hold(emu_mu);
    *total_bytes = emu_total_memory();
    *free_bytes = *total_bytes - device_used[current_device];
    return cudaSuccess;
}

// The synchronous calls run on the legacy default stream, which first waits
// for the device's blocking streams (not for cudaStreamNonBlocking ones).
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    if (emu_deferred()) device_drain(current_device, 1);
    memcpy(dst, src, n);
    return cudaSuccess;
}

// A copy from pageable memory waits for the stream and reads the source at
// the call; one to pageable memory returns when it is done; copies between
// device and pinned memory happen in stream order.
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t s) {
    CUstream_st *st = emu_stream_of(s);
    int pageable = (kind == cudaMemcpyHostToDevice && !emu_pinned(src, n)) ||
                   (kind == cudaMemcpyDeviceToHost && !emu_pinned(dst, n));
    if (pageable && !st->s.capturing && emu_deferred() && s) {
        stream_drain(st);
        memcpy(dst, src, n);
        return cudaSuccess;
    }
    stream_enqueue(s, [=]() { memcpy(dst, src, n); }, cudaGraphNodeTypeMemcpy);
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int v, size_t n) {
    if (emu_deferred()) device_drain(current_device, 1);
    memset(p, v, n);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    stream_enqueue(s, [=]() { memset(p, v, n); }, cudaGraphNodeTypeMemset);
    return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags) {
    CUstream_st *st = new CUstream_st();
    st->s.device = current_device;
    st->s.blocking = !(flags & cudaStreamNonBlocking);
    std::lock_guard<std::mutex> q(streams_mu);
    streams.push_back(st);
    *s = (cudaStream_t)st;
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
// The stream's queued work still runs, as on a GPU.
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    CUstream_st *st = (CUstream_st *)s;
    stream_drain(st);
    {
        std::lock_guard<std::mutex> q(streams_mu);
        for (size_t i = 0; i < streams.size(); i++)
            if (streams[i] == st) streams.erase(streams.begin() + (long)i), i = streams.size();
    }
    delete st;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    CUstream_st *st = emu_stream_of(s);
    if (st->s.capturing) {
        fprintf(stderr, "cuemu: cudaStreamSynchronize on a stream being captured\n");
        return emu_error(cudaErrorStreamCaptureUnsupported);
    }
    if (s) stream_drain(st);
    else device_drain(current_device, 1);
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) {
    device_drain(current_device, 0);
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode) {
    CUstream_st *st = emu_stream_of(s);
    if (st->s.capturing || !s) return emu_error(cudaErrorIllegalState);
    st->s.capturing = 1;
    st->s.graph = new CUgraph_st();
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g) {
    CUstream_st *st = emu_stream_of(s);
    if (!st->s.capturing) return emu_error(cudaErrorIllegalState);
    st->s.capturing = 0;
    *g = st->s.graph;
    st->s.graph = NULL;
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t g, unsigned long long flags) {
    CUgraphExec_st *e = new CUgraphExec_st();
    e->nodes = g->nodes;
    e->collective = 0;
    for (const emu_node &n : e->nodes) e->collective |= n->collective;
    *exec = e;
    return cudaSuccess;
}

// A graph that holds a collective runs at the launch (after what the stream
// holds), since its peers' graphs wait for it in theirs.
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    CUstream_st *st = emu_stream_of(s);
    if (exec->collective && !st->s.capturing && emu_deferred()) {
        if (s) stream_drain(st);
        for (const emu_node &n : exec->nodes) n->fn();
        return cudaSuccess;
    }
    for (const emu_node &n : exec->nodes) stream_push(s, n);
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    delete exec;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}

// As documented: with nodes NULL, the count; otherwise up to *numNodes
// handles, the rest of the *numNodes entries NULL, and *numNodes set to how
// many were filled. A captured stream's graph is a chain, so the order is
// the order of capture.
cudaError_t cudaGraphGetNodes(cudaGraph_t g, cudaGraphNode_t *nodes, size_t *numNodes) {
    if (!g || !numNodes) return emu_error(cudaErrorInvalidValue);
    size_t n = g->nodes.size();
    if (!nodes) {
        *numNodes = n;
        return cudaSuccess;
    }
    size_t filled = *numNodes < n ? *numNodes : n;
    for (size_t i = 0; i < *numNodes; i++) nodes[i] = i < filled ? g->nodes[i].get() : NULL;
    *numNodes = filled;
    return cudaSuccess;
}

cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, enum cudaGraphNodeType *type) {
    if (!node || !type) return emu_error(cudaErrorInvalidValue);
    *type = node->type;
    return cudaSuccess;
}

// ---- events: host clock readings taken when the stream reaches them -----------

// An event stamps the host's clock when its stream runs the record, so the
// time between two events is the emulator's time for the work between them
// (bench_cuda times cuBLAS this way; its figures mean nothing here).
struct CUevent_st {
    CUstream_st *st;         // the stream of the last record; NULL: never recorded
    std::atomic<int> done;   // the last record has run
    std::chrono::steady_clock::time_point at;
};

cudaError_t cudaEventCreate(cudaEvent_t *e) {
    if (!e) return emu_error(cudaErrorInvalidValue);
    *e = new CUevent_st();
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    e->st = emu_stream_of(s);
    e->done = 0;
    // Captured on a GPU, a record adds no node (unless made with
    // cudaEventRecordExternal); here it is a node that stamps the clock at
    // each replay, so it counts as an event record node, not a kernel.
    stream_enqueue(
        s,
        [e]() {
            e->at = std::chrono::steady_clock::now();
            e->done = 1;
        },
        cudaGraphNodeTypeEventRecord);
    return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!e->st || e->done) return cudaSuccess;
    if (e->st == &default_stream) device_drain(current_device, 1);
    else stream_drain(e->st);
    return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    if (!ms || !a->st || !b->st) return emu_error(cudaErrorInvalidResourceHandle);
    if (!a->done || !b->done) return emu_error(cudaErrorNotReady);
    *ms = (float)std::chrono::duration<double, std::milli>(b->at - a->at).count();
    return cudaSuccess;
}

cudaError_t cuemu_func_set_attribute(const char *name, enum cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value > CUEMU_SMEM_OPTIN_MAX) {
            fprintf(stderr, "cuemu: cudaFuncSetAttribute: %d bytes of dynamic shared memory is over the device's %d\n",
                    value, CUEMU_SMEM_OPTIN_MAX);
            return emu_error(cudaErrorInvalidValue);
        }
        std::lock_guard<std::mutex> hold(emu_mu);
        smem_optin[std::make_pair(current_device, std::string(name))] = value;
    }
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    cudaError_t rc = last_error;
    last_error = cudaSuccess;
    return rc;
}
cudaError_t cudaPeekAtLastError(void) { return last_error; }

const char *cudaGetErrorString(cudaError_t rc) {
    switch (rc) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorIllegalState: return "illegal state";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    default: return "cuemu: unknown error";
    }
}
const char *cudaGetErrorName(cudaError_t rc) { return cudaGetErrorString(rc); }

// ---- the devices: sm_90 parts with a small memory ----------------------------------

static int valid_device(int d) { return d >= 0 && d < cuemu_device_count(); }

cudaError_t cudaGetDeviceCount(int *n) {
    *n = cuemu_device_count();
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
    if (!valid_device(d)) return emu_error(cudaErrorInvalidDevice);
    current_device = d;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *d) {
    *d = current_device;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d) {
    if (!valid_device(d)) return emu_error(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cuemu (CPU emulation of an sm_90 GPU)");
    p->totalGlobalMem = emu_total_memory();
    p->sharedMemPerBlock = CUEMU_SMEM_DEFAULT;
    p->sharedMemPerBlockOptin = CUEMU_SMEM_OPTIN_MAX;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->multiProcessorCount = emu_sms();
    p->major = 9;
    p->minor = 0;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr attr, int d) {
    if (!valid_device(d)) return emu_error(cudaErrorInvalidDevice);
    switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMultiProcessorCount: *v = emu_sms(); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = CUEMU_SMEM_OPTIN_MAX; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrL2CacheSize: *v = 50 << 20; break; // an H100's
    default: return emu_error(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

// cuemu_lt.cc enqueues its products on streams too, cuemu_nccl.cc its
// collectives.
void cuemu_stream_enqueue(cudaStream_t s, std::function<void()> fn, enum cudaGraphNodeType type, int collective) {
    stream_enqueue(s, std::move(fn), type, collective);
}
