// cuemu's block scheduler: runs a kernel's threads as fibers, a grid's
// blocks one after another (see cuemu.h for the model and what it checks;
// cuemu_api.cc is the runtime API around it, cuemu_rt.h has devices and
// host threads).
//
// Host threads: the scheduler's state (the running block, the thread
// indices, the kernels' __shared__ variables) is shared, so grids run under
// one lock (emu_mu, which also guards cuemu_api.cc's tables).
#include "tests/cuemu/cuemu.h"

#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <utility>
#include <vector>

#include "tests/cuemu/cuemu_ptx.h"
#include "tests/cuemu/cuemu_rt.h"

#undef warpSize // a cudaDeviceProp field here

uint3 cuemu_thread_idx, cuemu_block_idx;
dim3 cuemu_block_dim, cuemu_grid_dim;

std::mutex emu_mu; // cuemu_rt.h

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
#define ASAN_START_SWITCH(save, stack, n) __sanitizer_start_switch_fiber((save), (stack), (n))
#define ASAN_FINISH_SWITCH(save) __sanitizer_finish_switch_fiber((save), NULL, NULL)
#else
#define STACK_UNPOISON(p, n) ((void)(p), (void)(n))
#define ASAN_START_SWITCH(save, stack, n) ((void)(save), (void)(stack), (void)(n))
#define ASAN_FINISH_SWITCH(save) ((void)(save))
#define ASAN_POISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#define ASAN_UNPOISON_MEMORY_REGION(p, n) ((void)(p), (void)(n))
#endif

// Under ThreadSanitizer (CUEMU_SAN=thread: the kernels are instrumented,
// this file is built with -DCUEMU_TSAN and is not, so the scheduler's own
// bookkeeping goes unchecked) every CUDA thread is a fiber of the race
// detector and switches between them establish no order. Order comes only
// from what orders threads on a GPU: a block's threads start after the
// grid's launch, __syncthreads orders the block (its arrivals release, its
// departures acquire), __syncwarp the lanes taking part (shuffles and mma
// exchange values but order no memory), fences and atomics as below, and
// the grid ends after all its threads. A block's shared
// memory is unmapped and mapped again before the next block (the arena
// below), which clears its access history and its barriers'.
// Between blocks: the blocks of a grid run one after another on fibers
// taken so that consecutive blocks share none (fiber_stack_get), so two
// blocks touching the same global memory, one of them writing, are
// reported when they are neighbours in the grid's order, and in kernels
// without __syncthreads at any distance (compute-sanitizer's racecheck
// checks shared memory only). Kernels run one after another, whatever
// their streams.
#ifndef CUEMU_TSAN
#define CUEMU_TSAN 0
#endif
#if CUEMU_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreWritesBegin(const char *file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char *file, int line);
#define TSAN(x) x
static char grid_done_sync;
#else
#define TSAN(x) ((void)0)
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
    char *stack; // this block's fiber_stack: the stack and the
    void *tsan;  // race detector's fiber for it
    uint3 tid;
    unsigned lane, warp;
    int state;
    int fenced; // passed a __threadfence
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
    std::vector<fiber> fibers;
    int n, live, arrived;
    std::vector<warp> warps;
    fiber *cur;
    void *sched_sp;
    void (*run)(void *);
    void *args;
    const char *name;
    unsigned reverse; // this block runs its threads last to first
    // Shared memory: the arena, its dynamic part's bytes, the static
    // variables placed so far in this block and their bytes, and the end
    // of the last one.
    unsigned char *arena;
    size_t dyn, statics, top;
    std::vector<std::pair<const void *, size_t>> vars; // key, offset
    unsigned bar_gen;                                  // __syncthreads completed
};
static block_run B;
// The scheduler's stack, for the sanitizer: the stack of the host thread
// that runs the grid; its fiber, for the race detector.
static thread_local const void *sched_stack;
static thread_local size_t sched_stack_size;
#if CUEMU_TSAN
static thread_local void *sched_tsan;
#endif

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
    TSAN(__tsan_switch_to_fiber(sched_tsan, __tsan_switch_to_fiber_no_sync));
    ASAN_START_SWITCH(dying ? NULL : &fake, sched_stack, sched_stack_size);
    cuemu_switch(&B.cur->sp, B.sched_sp);
    ASAN_FINISH_SWITCH(fake);
}

// From fiber `from` straight to `to` (a lane of the same warp), without the
// round trip through the scheduler.
static void switch_to_fiber(fiber *from, fiber *to) {
    void *fake = NULL;
    B.cur = to;
    cuemu_thread_idx = to->tid;
    TSAN(__tsan_switch_to_fiber(to->tsan, __tsan_switch_to_fiber_no_sync));
    ASAN_START_SWITCH(&fake, to->stack, STACK_BYTES);
    cuemu_switch(&from->sp, to->sp);
    ASAN_FINISH_SWITCH(fake);
}

static void yield_to_scheduler(void) { switch_to_scheduler(0); }

static void release_block_barrier(void) {
    for (int i = 0; i < B.n; i++)
        if (B.fibers[i].state == F_WAIT_BLOCK) B.fibers[i].state = F_RUN;
    B.arrived = 0;
    B.bar_gen++;
}

// The race detector's synchronisation objects, in the arena's first bytes
// (so a block's are new): the launch, then __syncthreads (two, by
// parity: a thread can be one barrier ahead of one still leaving the
// last), then each warp's exchanges, likewise.
#define SYNC_BYTES 128
static inline void *bar_sync(unsigned gen) { return B.arena + 1 + (gen & 1); }
static inline void *warp_sync(unsigned warp, unsigned phase) { return B.arena + 3 + 2 * warp + (phase & 1); }

static void fiber_exit(void) {
    fiber *f = B.cur;
    warp *w = &B.warps[f->warp];
    if (w->arrived && (w->wait_mask >> f->lane & 1u))
        emu_fail("%s", "exited while lanes of its warp wait for it in a shuffle or mma");
    TSAN(__tsan_release(&grid_done_sync));
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
    ASAN_FINISH_SWITCH(NULL);
    TSAN(__tsan_acquire(B.arena)); // the launch
    B.run(B.args);
    fiber_exit();
}

// Stacks (with their race-detector fibers) are kept across blocks and
// launches, in two sets of one more than the block's threads: the b-th
// block of a grid runs on set b mod 2, its thread i on stack
// (i + b / 2) mod (threads + 1) of the set. The detector orders all that
// one fiber does, and a fiber that passed a __syncthreads carries its
// block's order into the next block it runs; so two consecutive blocks
// share no fiber and no order, and the races between them are seen,
// barriers or not. Blocks two apart are ordered once a barrier was passed;
// without one, thread i of block b and thread i - k of block b + 2k share
// a fiber, and only that pair's races go unseen.
struct fiber_stack {
    char *stack; // STACK_BYTES above a guard page
    void *tsan;
};
static std::vector<fiber_stack> stacks;

static fiber_stack fiber_stack_get(size_t i) {
    while (stacks.size() <= i) {
        long page = sysconf(_SC_PAGESIZE);
        char *m = (char *)mmap(NULL, STACK_BYTES + (size_t)page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                               -1, 0);
        if (m == MAP_FAILED) {
            perror("cuemu: fiber stack");
            abort();
        }
        mprotect(m, (size_t)page, PROT_NONE); // overflow faults instead of corrupting
        fiber_stack s = {m + page, NULL};
        TSAN(s.tsan = __tsan_create_fiber(0));
        stacks.push_back(s);
    }
    return stacks[i];
}

static void fiber_start(fiber *f, fiber_stack s) {
    f->stack = s.stack;
    f->tsan = s.tsan;
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
    f->fenced = 0;
}

void cuemu_syncthreads(void) {
    unsigned gen = B.bar_gen;
    TSAN(__tsan_release(bar_sync(gen)));
    if (++B.arrived == B.live) {
        release_block_barrier();
    } else {
        B.cur->state = F_WAIT_BLOCK;
        yield_to_scheduler();
    }
    TSAN(__tsan_acquire(bar_sync(gen)));
    (void)gen;
}

const unsigned char *cuemu_warp_exchange(unsigned mask, const void *mine, size_t n, int orders_memory) {
    fiber *f = B.cur;
    warp *w = &B.warps[f->warp];
    unsigned part = mask & w->exists, bit = 1u << f->lane;
    if (!(part & bit)) emu_fail("%s", "a warp-synchronous call whose mask leaves out the calling lane");
    if (part & w->done) emu_fail("%s", "a warp-synchronous call whose mask names a lane that has exited");
    if (w->arrived == 0) w->wait_mask = part;
    else if (w->wait_mask != part)
        emu_fail("%s", "lanes of one warp in warp-synchronous calls with different masks (diverged)");
    unsigned phase = w->phase;
    // the slots are the emulator's (and outlive the block): not checked
    TSAN(AnnotateIgnoreWritesBegin(__FILE__, __LINE__));
    if (n) memcpy(w->slots[phase & 1][f->lane], mine, n);
    TSAN(AnnotateIgnoreWritesEnd(__FILE__, __LINE__));
    if (orders_memory) TSAN(__tsan_release(warp_sync(f->warp, phase)));
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
    if (orders_memory) TSAN(__tsan_acquire(warp_sync(f->warp, phase)));
    return &w->slots[phase & 1][0][0];
}

#if CUEMU_TSAN
// __threadfence and atomics for the race detector (cuemu.h): PTX orders a
// thread's accesses before a fence ahead of another thread's after its own
// fence once an atomic write after the first fence is read by an atomic
// before the second. Here an atomic of a thread that has passed a fence
// releases into one object, and every atomic and fence acquires from it:
// looser (an atomic is taken to read every earlier such write), never
// stricter, so the guide's reduction is accepted and a missing fence on
// the writing side is still reported.
static char fence_sync;

void cuemu_race_fence(void) {
    B.cur->fenced = 1;
    __tsan_acquire(&fence_sync);
}

void cuemu_race_atomic(int done) {
    if (!done) __tsan_acquire(&fence_sync);
    else if (B.cur->fenced) __tsan_release(&fence_sync);
}
#endif

int cuemu_warp_first(void) {
    warp *w = &B.warps[B.cur->warp];
    if (w->first_phase == w->phase) return 0;
    w->first_phase = w->phase;
    return 1;
}

float *cuemu_warp_scratch(void) { return B.warps[B.cur->warp].scratch; }

// ---- shared memory ----------------------------------------------------------
//
// One arena holds a block's shared memory: the race detector's sync bytes,
// the dynamic part, then each static __shared__ variable as the block
// first reaches its declaration, with unaddressable gaps between them
// under AddressSanitizer. It is NaN-filled (0xff) for every block, static
// variables included: a block that reads what it never wrote reads NaN, not
// what the previous block left. The limits are the device's: 48 KiB of
// static shared memory, static and dynamic together at most the opt-in.
#define ARENA_BYTES (SYNC_BYTES + (size_t)CUEMU_SMEM_OPTIN_MAX + 64 * 64)
#define SMEM_GAP 64

static void fill_unchecked(void *p, size_t n) {
    TSAN(AnnotateIgnoreWritesBegin(__FILE__, __LINE__));
    memset(p, 0xff, n);
    TSAN(AnnotateIgnoreWritesEnd(__FILE__, __LINE__));
}

// A fresh arena for the next block: mapped anew under the race detector
// (which forgets the previous block's accesses and barriers with the
// mapping), the dynamic part NaN-filled, the rest unaddressable.
static void arena_reset(size_t dyn) {
    if (!B.arena || CUEMU_TSAN) {
        void *hint = B.arena;
        if (B.arena) munmap(B.arena, ARENA_BYTES);
        void *m = mmap(hint, ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            perror("cuemu: shared memory");
            abort();
        }
        B.arena = (unsigned char *)m;
    }
    B.dyn = dyn;
    B.top = SYNC_BYTES + (dyn + 127) / 128 * 128;
    B.statics = 0;
    B.vars.clear();
    ASAN_POISON_MEMORY_REGION(B.arena + SYNC_BYTES, ARENA_BYTES - SYNC_BYTES);
    ASAN_UNPOISON_MEMORY_REGION(B.arena + SYNC_BYTES, dyn);
    fill_unchecked(B.arena + SYNC_BYTES, dyn);
}

void *cuemu_dynamic_smem(void) { return B.arena + SYNC_BYTES; }

void *cuemu_static_smem(const void *key, size_t bytes, size_t align) {
    for (const auto &v : B.vars)
        if (v.first == key) return B.arena + v.second;
    if (align < 16) align = 16;
    size_t off = (B.top + SMEM_GAP + align - 1) / align * align;
    B.statics += bytes;
    char why[128];
    if (B.statics > CUEMU_SMEM_DEFAULT || B.statics + B.dyn > CUEMU_SMEM_OPTIN_MAX || off + bytes > ARENA_BYTES) {
        snprintf(why, sizeof why, "%zu bytes of static and %zu of dynamic shared memory (limits %d, together %d)",
                 B.statics, B.dyn, CUEMU_SMEM_DEFAULT, CUEMU_SMEM_OPTIN_MAX);
        emu_fail("shared memory over the device's limit: %s", why);
    }
    B.vars.push_back(std::make_pair(key, off));
    B.top = off + bytes;
    ASAN_UNPOISON_MEMORY_REGION(B.arena + off, bytes);
    fill_unchecked(B.arena + off, bytes);
    return B.arena + off;
}

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
static void run_block(unsigned order, size_t dyn) {
    arena_reset(dyn);
    TSAN(__tsan_release(B.arena)); // the launch: what the host did before it
    B.bar_gen = 0;
    B.reverse = order & 1;
    for (int i = 0; i < B.n; i++) {
        fiber *f = &B.fibers[i];
        unsigned bx = cuemu_block_dim.x, by = cuemu_block_dim.y;
        f->tid = make_uint3((unsigned)i % bx, (unsigned)i / bx % by, (unsigned)i / (bx * by));
        f->lane = (unsigned)i & 31u;
        f->warp = (unsigned)i >> 5;
        f->uncommitted.clear();
        f->groups.clear();
        size_t set = (size_t)(B.n + 1);
        fiber_start(f, fiber_stack_get((order & 1) * set + ((size_t)i + order / 2) % set));
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
            TSAN(__tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync));
            ASAN_START_SWITCH(&fake, f->stack, STACK_BYTES);
            cuemu_switch(&B.sched_sp, f->sp);
            ASAN_FINISH_SWITCH(fake);
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

// ---- grids --------------------------------------------------------------------

void cuemu_run_grid(const char *name, const cuemu_cfg &cfg, void (*run)(void *), void *args) {
    std::lock_guard<std::mutex> hold(emu_mu);
    TSAN(sched_tsan = __tsan_get_current_fiber());
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
    cuemu_block_dim = cfg.block;
    cuemu_grid_dim = cfg.grid;
    unsigned order = 0;
    for (unsigned z = 0; z < cfg.grid.z; z++)
        for (unsigned y = 0; y < cfg.grid.y; y++)
            for (unsigned x = 0; x < cfg.grid.x; x++) {
                cuemu_block_idx = make_uint3(x, y, z);
                run_block(order++, cfg.smem);
            }
    TSAN(__tsan_acquire(&grid_done_sync));
    B.name = NULL;
}
