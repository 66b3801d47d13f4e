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

// ---- grids --------------------------------------------------------------------

void cuemu_run_grid(const char *name, const cuemu_cfg &cfg, void (*run)(void *), void *args) {
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
