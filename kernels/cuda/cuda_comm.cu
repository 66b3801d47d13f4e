// Tensor parallelism on CUDA: a group of backends on consecutive devices,
// one NCCL communicator each, and the all-reduce that joins them (the
// sharding itself is the model's, engine/model).
//
// NCCL is loaded at run time, so that nibble neither links against libnccl
// nor needs it on one GPU: the group holds the few functions it uses,
// shared by its ranks and freed with the last of them, rather than a
// process-wide table. Under the emulator (NB_CUEMU, tests/cuemu) they are
// its NCCL's (tests/cuemu/cuemu_nccl.cc), taken directly.
#include <string.h>

#include "kernels/cuda/cuda_int.h"
#include "kernels/cuda/cuda_nccl.h"

#ifndef NB_CUEMU
#include <dlfcn.h>
#endif

extern "C" {
#include "common/log.h"
}

// The NCCL functions nibble calls. comm_finalize is NULL for an NCCL older
// than 2.14, where destroying a communicator was a local act.
typedef struct nccl_fns {
    ncclResult_t (*get_version)(int *);
    ncclResult_t (*comm_init_all)(ncclComm_t *, int, const int *);
    ncclResult_t (*comm_finalize)(ncclComm_t);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    ncclResult_t (*group_start)(void);
    ncclResult_t (*group_end)(void);
    const char *(*error_string)(ncclResult_t);
    ncclResult_t (*all_reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                               cudaStream_t);
    ncclResult_t (*all_gather)(const void *, void *, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
} nccl_fns;

// What the ranks of one group share.
struct cuda_comm_group {
    int n, first; // ranks, and the device of rank 0 (rank r is on first + r)
    int refs;     // ranks still in the group (destroyed from one thread: backend_destroy)
    int open;     // the communicators exist
    nccl_fns fns;
    ncclComm_t *comms;      // [n]
    cuda_backend **members; // [n]: the ranks, NULL once a rank has left
};

// ---- loading NCCL ------------------------------------------------------------

#ifdef NB_CUEMU
static int nccl_load(nccl_fns *f, nb_err *e) {
    f->get_version = ncclGetVersion;
    f->comm_init_all = ncclCommInitAll;
    f->comm_finalize = ncclCommFinalize;
    f->comm_destroy = ncclCommDestroy;
    f->group_start = ncclGroupStart;
    f->group_end = ncclGroupEnd;
    f->error_string = ncclGetErrorString;
    f->all_reduce = ncclAllReduce;
    f->all_gather = ncclAllGather;
    return 0;
}
#else
// Binds *slot to the library's `name`; a missing one is an error unless
// optional.
// (A function pointer is written through void **, as POSIX's dlsym
// examples do.)
static int nccl_sym(void *lib, void **slot, const char *name, int optional, nb_err *e) {
    *slot = dlsym(lib, name);
    if (*slot || optional) return 0;
    return nb_errf(e, "tensor parallelism needs NCCL 2.x: the loaded libnccl lacks %s (install a newer libnccl2)", name);
}

// The library stays loaded once found: NCCL keeps process-wide state (its
// threads, exit handlers) that unloading would pull from under it, and the
// loader hands later groups the same copy.
static int nccl_load(nccl_fns *f, nb_err *e) {
    void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libnccl.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        return nb_errf(e, "tensor parallelism needs NCCL: libnccl.so.2 not found (install libnccl2 or set "
                          "LD_LIBRARY_PATH to its directory)");
    if (nccl_sym(lib, (void **)&f->get_version, "ncclGetVersion", 0, e) ||
        nccl_sym(lib, (void **)&f->comm_init_all, "ncclCommInitAll", 0, e) ||
        nccl_sym(lib, (void **)&f->comm_finalize, "ncclCommFinalize", 1, e) ||
        nccl_sym(lib, (void **)&f->comm_destroy, "ncclCommDestroy", 0, e) ||
        nccl_sym(lib, (void **)&f->group_start, "ncclGroupStart", 0, e) ||
        nccl_sym(lib, (void **)&f->group_end, "ncclGroupEnd", 0, e) ||
        nccl_sym(lib, (void **)&f->error_string, "ncclGetErrorString", 0, e) ||
        nccl_sym(lib, (void **)&f->all_reduce, "ncclAllReduce", 0, e) ||
        nccl_sym(lib, (void **)&f->all_gather, "ncclAllGather", 0, e))
        return -1;
    return 0;
}
#endif

// ---- the group ---------------------------------------------------------------

static void group_free(cuda_comm_group *g) {
    free(g->comms);
    free(g->members);
    free(g);
}

static void nccl_warn(cuda_comm_group *g, const char *what, ncclResult_t rc) {
    log_warn("cuda: tensor parallelism on cuda:%d..%d: %s: %s", g->first, g->first + g->n - 1, what,
             g->fns.error_string(rc));
}

// Destroys the communicators of every rank at once. NCCL's teardown is a
// collective of the node's ranks (ncclCommDestroy finalizes first, and a
// rank's finalization waits for the others'), so one thread destroying them
// one by one would wait forever on the first: it finalizes them all in one
// NCCL group, after which each destroy is local. Before that, every rank's
// queued work finishes and its recorded steps go, since they may hold NCCL
// work on these communicators.
static void group_close(cuda_comm_group *g) {
    for (int r = 0; r < g->n; r++) {
        cuda_backend *m = g->members[r];
        if (!m) continue;
        int prev = cuda_device_enter(m);
        cudaStreamSynchronize(m->stream);
        cuda_graphs_clear(m);
        cuda_device_leave(m, prev);
        m->comm = NULL;
    }
    ncclResult_t rc;
    if (g->fns.comm_finalize) {
        if ((rc = g->fns.group_start()) != ncclSuccess) nccl_warn(g, "ncclGroupStart", rc);
        for (int r = 0; r < g->n; r++)
            if ((rc = g->fns.comm_finalize(g->comms[r])) != ncclSuccess) nccl_warn(g, "ncclCommFinalize", rc);
        if ((rc = g->fns.group_end()) != ncclSuccess) nccl_warn(g, "ncclGroupEnd (finalizing)", rc);
    }
    for (int r = 0; r < g->n; r++)
        if ((rc = g->fns.comm_destroy(g->comms[r])) != ncclSuccess) nccl_warn(g, "ncclCommDestroy", rc);
    g->open = 0;
}

void cuda_comm_leave(cuda_backend *c) {
    cuda_comm_group *g = c->group;
    if (!g) return;
    if (g->open) group_close(g);
    for (int r = 0; r < g->n; r++)
        if (g->members[r] == c) g->members[r] = NULL;
    c->group = NULL;
    c->comm = NULL;
    if (--g->refs == 0) group_free(g);
}

void cuda_comm_all_reduce(cuda_backend *c, float *x, size_t n) {
    if (!c->group || n == 0) return;
    if (!c->comm) {
        fprintf(stderr, "nibble: cuda:%d: all_reduce after its tensor-parallel group was destroyed\n", c->device);
        abort();
    }
    // In place on the backend's stream: stream-ordered after the op that
    // wrote x and before the one that reads it, and recorded with them
    // when the stream is being captured (NCCL supports capture).
    ncclResult_t rc =
        c->group->fns.all_reduce(x, x, n, ncclFloat, ncclSum, (ncclComm_t)c->comm, c->stream);
    if (rc != ncclSuccess) {
        fprintf(stderr, "nibble: cuda:%d: NCCL all-reduce of %zu floats failed: %s\n", c->device, n,
                c->group->fns.error_string(rc));
        abort();
    }
}

void cuda_comm_all_gather(cuda_backend *c, float *out, const float *in, size_t n) {
    if (!c->group) {
        if (n && out != in) CUDA_CHECK(cudaMemcpyAsync(out, in, sizeof(float) * n, cudaMemcpyDeviceToDevice, c->stream));
        return;
    }
    if (n == 0) return;
    if (!c->comm) {
        fprintf(stderr, "nibble: cuda:%d: all_gather after its tensor-parallel group was destroyed\n", c->device);
        abort();
    }
    ncclResult_t rc = c->group->fns.all_gather(in, out, n, ncclFloat, (ncclComm_t)c->comm, c->stream);
    if (rc != ncclSuccess) {
        fprintf(stderr, "nibble: cuda:%d: NCCL all-gather of %zu floats failed: %s\n", c->device, n,
                c->group->fns.error_string(rc));
        abort();
    }
}

// Destroys the first n backends of out (not yet in a group).
static void destroy_ranks(nb_backend **out, int n) {
    for (int r = 0; r < n; r++) {
        out[r]->ops->destroy(out[r]);
        out[r] = NULL;
    }
}

extern "C" int cuda_backend_create_group(int first, int n, nb_backend **out, nb_err *e) {
    if (n < 1 || first < 0) return nb_errf(e, "tensor parallel size %d on cuda:%d: invalid", n, first);
    cuda_comm_group *g = (cuda_comm_group *)calloc(1, sizeof *g);
    if (!g) abort();
    g->n = n;
    g->first = first;
    g->comms = (ncclComm_t *)calloc((size_t)n, sizeof *g->comms);
    g->members = (cuda_backend **)calloc((size_t)n, sizeof *g->members);
    int *devs = (int *)calloc((size_t)n, sizeof *devs);
    if (!g->comms || !g->members || !devs) abort();
    // NCCL first: without it there is nothing to build
    if (nccl_load(&g->fns, e)) {
        free(devs);
        group_free(g);
        return -1;
    }
    for (int r = 0; r < n; r++) {
        if (!(out[r] = cuda_backend_create(first + r, e))) {
            nb_err_wrap(e, "tensor parallel rank %d", r);
            destroy_ranks(out, r);
            free(devs);
            group_free(g);
            return -1;
        }
        devs[r] = first + r;
    }
    ncclResult_t rc = g->fns.comm_init_all(g->comms, n, devs);
    free(devs);
    if (rc != ncclSuccess) {
        nb_errf(e, "tensor parallelism: NCCL could not join cuda:%d..%d: %s (NCCL_DEBUG=WARN tells why)", first,
                first + n - 1, g->fns.error_string(rc));
        destroy_ranks(out, n);
        group_free(g);
        return -1;
    }
    g->refs = n;
    g->open = 1;
    for (int r = 0; r < n; r++) {
        cuda_backend *c = cuda_impl(out[r]);
        c->group = g;
        c->comm = g->comms[r];
        g->members[r] = c;
        out[r]->rank = r;
        out[r]->n_ranks = n;
    }
    // cuda_backend_create leaves the creating thread on the device it made
    // the backend on; a group leaves it on rank 0's, the one returned.
    CUDA_CHECK(cudaSetDevice(first));
    int version = 0;
    g->fns.get_version(&version);
    log_info("cuda: tensor parallelism over cuda:%d..%d, NCCL %d.%d.%d", first, first + n - 1, version / 10000,
             version / 100 % 100, version % 100);
    return 0;
}
