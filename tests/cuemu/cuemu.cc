// cuemu's runtime: the CUDA runtime API calls nibble makes, over host
// memory, and the block scheduler that runs a kernel's threads as fibers
// (see cuemu.h for the model and what it checks, cuemu_rt.h for devices and
// host threads).
//
// Host threads: the scheduler's state (the running block, the thread
// indices, the kernels' __shared__ variables) and the allocation tables are
// shared, so grids run and tables change under one lock (emu_mu). The
// sticky error and the current device are per host thread, as in CUDA.
#include "tests/cuemu/cuemu.h"

#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tests/cuemu/cuemu_ptx.h"
#include "tests/cuemu/cuemu_rt.h"

#undef warpSize // a cudaDeviceProp field here

uint3 cuemu_thread_idx, cuemu_block_idx;
dim3 cuemu_block_dim, cuemu_grid_dim;

// Held while a grid runs and while the allocation and attribute tables
// change; never while a thread waits for another.
static std::mutex emu_mu;

// ---- fibers -------------------------------------------------------------------
//
// A fiber's context is its saved stack pointer: cuemu_switch pushes the
// callee-saved registers on the current stack (the kernels never change the
// floating-point control words, so those are left alone), stores the stack pointer in *save, loads `load` and pops the
// other context's registers. A new fiber's stack is laid out as if it had
// switched away at the entry of fiber_main.
#if !defined(__x86_64__)
#error "cuemu: the fiber switch is written for x86-64"
#endif
extern "C" void cuemu_switch(void **save, void *load);
__asm__(".text\n"
        ".globl cuemu_switch\n"
        ".type cuemu_switch,@function\n"
        "cuemu_switch:\n"
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n"
        ".size cuemu_switch, .-cuemu_switch\n");

// Under AddressSanitizer (CUEMU_SAN=address) every stack switch is announced,
// as its fiber interface asks, so that it knows which stack is live.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
// A reused fiber stack still carries the shadow of the frames of the thread
// that last ran on it.
#define STACK_UNPOISON(p, n) __asan_unpoison_memory_region((p), (n))
#else
#define STACK_UNPOISON(p, n) ((void)(p), (void)(n))
static inline void __sanitizer_start_switch_fiber(void **, const void *, size_t) {}
static inline void __sanitizer_finish_switch_fiber(void *, const void **, size_t *) {}
#endif

enum { F_RUN, F_WAIT_BLOCK, F_WAIT_WARP, F_DONE };

#define STACK_BYTES (256u << 10)

struct cp_copy {
    void *dst;
    const void *src;
    int src_bytes, bytes;
};

struct fiber {
    void *sp;
    char *stack; // STACK_BYTES above a guard page
    uint3 tid;
    unsigned lane, warp;
    int state;
    std::vector<cp_copy> uncommitted;
    std::vector<std::vector<cp_copy>> groups; // committed, oldest first
};

struct warp {
    unsigned exists, done, arrived, wait_mask, phase, first_phase;
    float scratch[256];
    unsigned char slots[2][32][CUEMU_SLOT];
};

// The block being run (one at a time) and its kernel.
struct block_run {
    std::vector<fiber> fibers; // kept across launches: stacks are reused
    int n, live, arrived;
    std::vector<warp> warps;
    fiber *cur;
    void *sched_sp;
    void (*run)(void *);
    void *args;
    const char *name;
    unsigned char *smem;
    unsigned reverse; // this block runs its threads last to first
};
static block_run B;
// The scheduler's stack, for the sanitizer: the stack of the host thread
// that runs the grid.
static thread_local const void *sched_stack;
static thread_local size_t sched_stack_size;

[[noreturn]] static void emu_fail(const char *fmt, const char *detail) {
    fprintf(stderr, "cuemu: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): ", B.name ? B.name : "?",
            cuemu_block_idx.x, cuemu_block_idx.y, cuemu_block_idx.z, cuemu_thread_idx.x, cuemu_thread_idx.y,
            cuemu_thread_idx.z);
    fprintf(stderr, fmt, detail);
    fputc('\n', stderr);
    abort();
}

// From a fiber back to the scheduler; `dying`: this fiber never resumes.
static void switch_to_scheduler(int dying) {
    void *fake = NULL;
    __sanitizer_start_switch_fiber(dying ? NULL : &fake, sched_stack, sched_stack_size);
    cuemu_switch(&B.cur->sp, B.sched_sp);
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
}

// From fiber `from` straight to `to` (a lane of the same warp), without the
// round trip through the scheduler.
static void switch_to_fiber(fiber *from, fiber *to) {
    void *fake = NULL;
    B.cur = to;
    cuemu_thread_idx = to->tid;
    __sanitizer_start_switch_fiber(&fake, to->stack, STACK_BYTES);
    cuemu_switch(&from->sp, to->sp);
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
}

static void yield_to_scheduler(void) { switch_to_scheduler(0); }

static void release_block_barrier(void) {
    for (int i = 0; i < B.n; i++)
        if (B.fibers[i].state == F_WAIT_BLOCK) B.fibers[i].state = F_RUN;
    B.arrived = 0;
}

static void fiber_exit(void) {
    fiber *f = B.cur;
    warp *w = &B.warps[f->warp];
    if (w->arrived && (w->wait_mask >> f->lane & 1u))
        emu_fail("%s", "exited while lanes of its warp wait for it in a shuffle or mma");
    f->state = F_DONE;
    f->uncommitted.clear();
    f->groups.clear();
    w->done |= 1u << f->lane;
    B.live--;
    if (B.arrived && B.arrived == B.live) release_block_barrier();
    switch_to_scheduler(1);
    emu_fail("%s", "a finished thread was resumed");
}

static void fiber_main(void) {
    __sanitizer_finish_switch_fiber(NULL, NULL, NULL);
    B.run(B.args);
    fiber_exit();
}

static void fiber_start(fiber *f) {
    if (!f->stack) {
        long page = sysconf(_SC_PAGESIZE);
        char *m = (char *)mmap(NULL, STACK_BYTES + (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                               -1, 0);
        if (m == MAP_FAILED) {
            perror("cuemu: fiber stack");
            abort();
        }
        mprotect(m, (size_t)page, PROT_NONE); // overflow faults instead of corrupting
        f->stack = m + page;
    }
    // From the top: a zero "return address" for fiber_main (so that its
    // stack is aligned as after a call), fiber_main as cuemu_switch's return
    // address, six callee-saved registers.
    STACK_UNPOISON(f->stack, STACK_BYTES);
    uint64_t *top = (uint64_t *)(f->stack + STACK_BYTES);
    uint64_t *sp = top - 8;
    memset(sp, 0, 8 * sizeof *sp);
    top[-2] = (uint64_t)(uintptr_t)fiber_main;
    f->sp = sp;
    f->state = F_RUN;
}

void cuemu_syncthreads(void) {
    if (++B.arrived == B.live) {
        release_block_barrier();
        return;
    }
    B.cur->state = F_WAIT_BLOCK;
    yield_to_scheduler();
}

const unsigned char *cuemu_warp_exchange(unsigned mask, const void *mine, size_t n) {
    fiber *f = B.cur;
    warp *w = &B.warps[f->warp];
    unsigned part = mask & w->exists, bit = 1u << f->lane;
    if (!(part & bit)) emu_fail("%s", "a warp-synchronous call whose mask leaves out the calling lane");
    if (part & w->done) emu_fail("%s", "a warp-synchronous call whose mask names a lane that has exited");
    if (w->arrived == 0) w->wait_mask = part;
    else if (w->wait_mask != part)
        emu_fail("%s", "lanes of one warp in warp-synchronous calls with different masks (diverged)");
    if (n) memcpy(w->slots[w->phase & 1][f->lane], mine, n);
    w->arrived |= bit;
    if (w->arrived == part) {
        w->arrived = 0;
        w->phase++;
        for (unsigned l = 0; l < 32; l++)
            if ((part >> l & 1u) && l != f->lane) {
                fiber *o = &B.fibers[f->warp * 32 + l];
                if (o->state != F_WAIT_WARP) emu_fail("%s", "internal: a lane of the mask is not waiting");
                o->state = F_RUN;
            }
    } else {
        // Hand over to the next lane of the warp still to arrive, in this
        // block's order: a shuffle then costs one switch per lane.
        f->state = F_WAIT_WARP;
        fiber *next = NULL;
        for (unsigned i = 1; i < 32 && !next; i++) {
            unsigned l = B.reverse ? (f->lane + 32 - i) & 31u : (f->lane + i) & 31u;
            fiber *o = &B.fibers[f->warp * 32 + l];
            if ((part >> l & 1u) && o->state == F_RUN) next = o;
        }
        if (next) switch_to_fiber(f, next);
        else yield_to_scheduler();
    }
    return &w->slots[(w->phase - 1) & 1][0][0];
}

int cuemu_warp_first(void) {
    warp *w = &B.warps[B.cur->warp];
    if (w->first_phase == w->phase) return 0;
    w->first_phase = w->phase;
    return 1;
}

float *cuemu_warp_scratch(void) { return B.warps[B.cur->warp].scratch; }

void *cuemu_dynamic_smem(void) { return B.smem; }

void cuemu_cp_async(void *smem, const void *gmem, int src_bytes, int bytes) {
    if (((uintptr_t)smem | (uintptr_t)gmem) % (uintptr_t)bytes)
        emu_fail("%s", "cp.async with an address not aligned to its size");
    B.cur->uncommitted.push_back(cp_copy{smem, gmem, src_bytes, bytes});
}

void cuemu_cp_async_commit(void) {
    fiber *f = B.cur;
    f->groups.push_back(std::move(f->uncommitted));
    f->uncommitted.clear();
}

void cuemu_cp_async_wait(int n) {
    fiber *f = B.cur;
    while ((int)f->groups.size() > n) {
        for (const cp_copy &c : f->groups.front()) {
            memcpy(c.dst, c.src, (size_t)c.src_bytes);
            memset((char *)c.dst + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
        }
        f->groups.erase(f->groups.begin());
    }
}

// Runs one block: every thread from the kernel's start to its end.
static void run_block(unsigned order) {
    B.reverse = order & 1;
    for (int i = 0; i < B.n; i++) {
        fiber *f = &B.fibers[i];
        unsigned bx = cuemu_block_dim.x, by = cuemu_block_dim.y;
        f->tid = make_uint3((unsigned)i % bx, (unsigned)i / bx % by, (unsigned)i / (bx * by));
        f->lane = (unsigned)i & 31u;
        f->warp = (unsigned)i >> 5;
        f->uncommitted.clear();
        f->groups.clear();
        fiber_start(f);
    }
    for (size_t w = 0; w < B.warps.size(); w++) {
        warp *wp = &B.warps[w];
        int lanes = B.n - (int)w * 32 < 32 ? B.n - (int)w * 32 : 32;
        wp->exists = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
        wp->done = wp->arrived = wp->wait_mask = wp->phase = wp->first_phase = 0;
    }
    B.live = B.n;
    B.arrived = 0;
    while (B.live > 0) {
        int ran = 0;
        for (int j = 0; j < B.n; j++) {
            fiber *f = &B.fibers[B.reverse ? B.n - 1 - j : j];
            if (f->state != F_RUN) continue;
            B.cur = f;
            cuemu_thread_idx = f->tid;
            void *fake = NULL;
            __sanitizer_start_switch_fiber(&fake, f->stack, STACK_BYTES);
            cuemu_switch(&B.sched_sp, f->sp);
            __sanitizer_finish_switch_fiber(fake, NULL, NULL);
            ran = 1;
        }
        if (!ran && B.live > 0) {
            int blocked = 0, warped = 0;
            for (int i = 0; i < B.n; i++) {
                blocked += B.fibers[i].state == F_WAIT_BLOCK;
                warped += B.fibers[i].state == F_WAIT_WARP;
            }
            char why[160];
            snprintf(why, sizeof why, "%d threads wait at __syncthreads, %d in warp-synchronous calls, %d exited",
                     blocked, warped, B.n - B.live);
            emu_fail("deadlock: %s", why);
        }
    }
    B.cur = NULL;
}

// ---- launches -----------------------------------------------------------------

// A node of a stream's queue or of a graph: the work, and whether it blocks
// on other host threads (an NCCL collective), which must not wait in a
// queue that only its own thread drains.
struct emu_work {
    std::function<void()> fn;
    int collective;
};
typedef std::shared_ptr<emu_work> emu_node;

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
#define SMEM_DEFAULT (48 << 10)
#define SMEM_OPTIN_MAX 232448 // sm_90: 227 KiB

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

static void stream_enqueue(cudaStream_t s, std::function<void()> fn, int collective = 0) {
    stream_push(s, std::make_shared<emu_work>(emu_work{std::move(fn), collective}));
}

static void run_grid(const char *name, cuemu_cfg cfg, void (*run)(void *), void *args) {
    std::lock_guard<std::mutex> hold(emu_mu);
    if (!sched_stack) {
        pthread_attr_t at;
        void *lo = NULL;
        size_t size = 0;
        if (pthread_getattr_np(pthread_self(), &at) == 0) {
            pthread_attr_getstack(&at, &lo, &size);
            pthread_attr_destroy(&at);
        }
        sched_stack = lo, sched_stack_size = size;
    }
    static int trace = -1;
    if (trace < 0) trace = getenv("CUEMU_TRACE") != NULL;
    if (trace)
        fprintf(stderr, "cuemu: %s grid (%u,%u,%u) block (%u,%u,%u) shared %zu\n", name, cfg.grid.x, cfg.grid.y,
                cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z, cfg.smem);
    B.name = name;
    B.run = run;
    B.args = args;
    B.n = (int)(cfg.block.x * cfg.block.y * cfg.block.z);
    if ((int)B.fibers.size() < B.n) B.fibers.resize((size_t)B.n);
    B.warps.resize((size_t)(B.n + 31) / 32);
    std::vector<unsigned char> smem(cfg.smem + 128);
    B.smem = (unsigned char *)(((uintptr_t)smem.data() + 127) & ~(uintptr_t)127);
    cuemu_block_dim = cfg.block;
    cuemu_grid_dim = cfg.grid;
    unsigned order = 0;
    for (unsigned z = 0; z < cfg.grid.z; z++)
        for (unsigned y = 0; y < cfg.grid.y; y++)
            for (unsigned x = 0; x < cfg.grid.x; x++) {
                cuemu_block_idx = make_uint3(x, y, z);
                // uninitialised shared memory reads as NaN
                memset(B.smem, 0xff, cfg.smem);
                run_block(order++);
            }
    B.name = NULL;
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
        size_t limit = it == smem_optin.end() ? SMEM_DEFAULT : (size_t)it->second;
        if (cfg.smem > limit) bad = "dynamic shared memory over the kernel's limit";
    }
    if (bad) {
        fprintf(stderr, "cuemu: launch of %s: invalid %s (grid %u,%u,%u block %u,%u,%u, %zu bytes shared)\n", name,
                bad, cfg.grid.x, cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z, cfg.smem);
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    stream_enqueue(cfg.stream, [=]() { run_grid(name, cfg, run, owned.get()); });
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
    stream_enqueue(s, [=]() { memcpy(dst, src, n); });
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int v, size_t n) {
    if (emu_deferred()) device_drain(current_device, 1);
    memset(p, v, n);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    stream_enqueue(s, [=]() { memset(p, v, n); });
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

cudaError_t cuemu_func_set_attribute(const char *name, enum cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value > SMEM_OPTIN_MAX) {
            fprintf(stderr, "cuemu: cudaFuncSetAttribute: %d bytes of dynamic shared memory is over the device's %d\n",
                    value, SMEM_OPTIN_MAX);
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
    p->sharedMemPerBlock = SMEM_DEFAULT;
    p->sharedMemPerBlockOptin = SMEM_OPTIN_MAX;
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
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = SMEM_OPTIN_MAX; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    default: return emu_error(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

// cuemu_lt.cc enqueues its products on streams too.
void cuemu_stream_enqueue(cudaStream_t s, std::function<void()> fn, int collective) {
    stream_enqueue(s, std::move(fn), collective);
}
