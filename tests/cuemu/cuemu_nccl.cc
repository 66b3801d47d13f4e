// cuemu's NCCL: the calls nibble makes (kernels/cuda/cuda_comm.cu), over the
// emulated devices (cuemu_rt.h), written from NCCL's API documentation:
//  - ncclCommInitAll makes one communicator per device of its list, in one
//    process (a "clique" here);
//  - ncclAllReduce (float sum only) is stream-ordered: it runs when its
//    stream gets to it, or is recorded into the graph the stream captures
//    and runs at each replay. Each rank's call waits for every other rank's
//    (their threads meet here), then all receive the same sums, added in
//    rank order;
//  - teardown is collective among the ranks, as the documentation says of
//    ncclCommFinalize and ncclCommDestroy: a rank's finalization waits for
//    the others', so one thread must group the finalizations of several
//    ranks (ncclGroupStart/End); destroying a finalized communicator is
//    local.
// Where NCCL would hang (a rank that never joins a collective, one thread
// finalizing several ranks outside a group) this waits CUEMU_NCCL_TIMEOUT
// seconds (default 60) and aborts saying so. Misuse NCCL would refuse or
// corrupt memory over (another type or operation, ranks disagreeing on the
// count, a buffer that is not memory of the rank's device, a stream of
// another device) fails at the call. CUEMU_NCCL_FAIL=init makes
// ncclCommInitAll fail, so callers' error paths run.
#include "kernels/cuda/cuda_nccl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "tests/cuemu/cuemu_rt.h"

// The communicators one ncclCommInitAll made.
struct emu_clique {
    int n;
    std::mutex mu;
    std::condition_variable cv;
    int live; // communicators not yet destroyed
    // the all-reduce being assembled: each rank's buffers and count
    unsigned long done; // all-reduces completed
    int arrived;
    std::vector<const float *> send;
    std::vector<float *> recv;
    std::vector<size_t> count;
    int finalized; // ranks finalized
};

struct ncclComm {
    emu_clique *q;
    int rank, device;
    int finalized;
};

static int timeout_s(void) {
    const char *e = getenv("CUEMU_NCCL_TIMEOUT");
    return e && atoi(e) > 0 ? atoi(e) : 60;
}

// Waits on q->cv (lock held) until ready(), or aborts naming `what`.
template <class P> static void clique_wait(emu_clique *q, std::unique_lock<std::mutex> &lk, P ready, const char *what,
                                           int rank) {
    if (q->cv.wait_for(lk, std::chrono::seconds(timeout_s()), ready)) return;
    fprintf(stderr, "cuemu: nccl: rank %d of %d waited %d s in %s for the other ranks: NCCL would hang here\n", rank,
            q->n, timeout_s(), what);
    abort();
}

// One rank's part of an all-reduce; the last rank to arrive adds them up.
static void clique_all_reduce(ncclComm *c, const float *send, float *recv, size_t count) {
    emu_clique *q = c->q;
    std::unique_lock<std::mutex> lk(q->mu);
    unsigned long mine = q->done;
    q->send[c->rank] = send;
    q->recv[c->rank] = recv;
    q->count[c->rank] = count;
    if (++q->arrived < q->n) {
        clique_wait(q, lk, [&] { return q->done != mine; }, "ncclAllReduce", c->rank);
        return;
    }
    for (int r = 1; r < q->n; r++)
        if (q->count[r] != q->count[0]) {
            fprintf(stderr, "cuemu: nccl: ncclAllReduce with %zu elements on rank 0 but %zu on rank %d\n", q->count[0],
                    q->count[r], r);
            abort();
        }
    // into a copy first: a rank's recv may be its send (in place)
    std::vector<float> sum(count);
    for (size_t i = 0; i < count; i++) {
        float s = q->send[0][i];
        for (int r = 1; r < q->n; r++) s += q->send[r][i];
        sum[i] = s;
    }
    for (int r = 0; r < q->n; r++) memcpy(q->recv[r], sum.data(), sizeof(float) * count);
    q->arrived = 0;
    q->done++;
    q->cv.notify_all();
}

ncclResult_t ncclGetVersion(int *version) {
#ifdef NCCL_VERSION_CODE
    *version = NCCL_VERSION_CODE;
#else
    *version = 21400;
#endif
    return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t rc) {
    switch (rc) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    default: return "cuemu: unknown NCCL error";
    }
}

ncclResult_t ncclCommInitAll(ncclComm_t *comms, int ndev, const int *devlist) {
    const char *fail = getenv("CUEMU_NCCL_FAIL");
    if (fail && strstr(fail, "init")) return ncclSystemError;
    if (!comms || ndev < 1) return ncclInvalidArgument;
    for (int r = 0; r < ndev; r++) {
        int d = devlist ? devlist[r] : r;
        if (d < 0 || d >= cuemu_device_count()) return ncclInvalidArgument;
        // "Using the same CUDA device multiple times as different ranks of
        // the same NCCL communicator is not supported"
        for (int k = 0; k < r; k++)
            if ((devlist ? devlist[k] : k) == d) return ncclInvalidUsage;
    }
    emu_clique *q = new emu_clique();
    q->n = q->live = ndev;
    q->done = 0;
    q->arrived = q->finalized = 0;
    q->send.resize((size_t)ndev);
    q->recv.resize((size_t)ndev);
    q->count.resize((size_t)ndev);
    for (int r = 0; r < ndev; r++) comms[r] = new ncclComm{q, r, devlist ? devlist[r] : r, 0};
    return ncclSuccess;
}

static int emu_buffer_ok(const ncclComm *c, const void *p, size_t count, const char *which) {
    int d = cuemu_device_of(p, sizeof(float) * count);
    if (d == c->device) return 1;
    fprintf(stderr, "cuemu: nccl: ncclAllReduce on rank %d (device %d): %s %p (%zu floats) is not memory of device %d\n",
            c->rank, c->device, which, p, count, c->device);
    return 0;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t c, cudaStream_t stream) {
    if (!c || c->finalized) return ncclInvalidArgument;
    if (type != ncclFloat || op != ncclSum) {
        fprintf(stderr, "cuemu: nccl: ncclAllReduce emulates float sums only (type %d, op %d)\n", (int)type, (int)op);
        return ncclInvalidArgument;
    }
    if (cuemu_stream_device(stream) != c->device) {
        fprintf(stderr, "cuemu: nccl: ncclAllReduce for rank %d (device %d) on a stream of device %d\n", c->rank,
                c->device, cuemu_stream_device(stream));
        return ncclUnhandledCudaError;
    }
    if (!emu_buffer_ok(c, sendbuff, count, "sendbuff") || !emu_buffer_ok(c, recvbuff, count, "recvbuff"))
        return ncclInvalidArgument;
    const float *s = (const float *)sendbuff;
    float *r = (float *)recvbuff;
    cuemu_stream_enqueue(stream, [=]() { clique_all_reduce(c, s, r, count); });
    return ncclSuccess;
}

// ---- teardown -------------------------------------------------------------------

static thread_local int group_depth;
static thread_local std::vector<ncclComm_t> group_finalize; // finalizations deferred to ncclGroupEnd

// Finalizes the communicators together, then waits until every rank of
// their cliques is finalized.
static void finalize_all(const std::vector<ncclComm_t> &cs) {
    for (ncclComm_t c : cs) {
        std::lock_guard<std::mutex> lk(c->q->mu);
        c->finalized = 1;
        c->q->finalized++;
        c->q->cv.notify_all();
    }
    for (ncclComm_t c : cs) {
        std::unique_lock<std::mutex> lk(c->q->mu);
        emu_clique *q = c->q;
        clique_wait(q, lk, [&] { return q->finalized == q->n; }, "ncclCommFinalize", c->rank);
    }
}

ncclResult_t ncclGroupStart(void) {
    group_depth++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
    if (group_depth == 0) return ncclInvalidUsage;
    if (--group_depth == 0 && !group_finalize.empty()) {
        std::vector<ncclComm_t> cs;
        cs.swap(group_finalize);
        finalize_all(cs);
    }
    return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t c) {
    if (!c || c->finalized) return ncclInvalidArgument;
    if (group_depth > 0) group_finalize.push_back(c);
    else finalize_all(std::vector<ncclComm_t>{c});
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (!c) return ncclInvalidArgument;
    if (group_depth > 0) {
        fprintf(stderr, "cuemu: nccl: ncclCommDestroy inside a group is not emulated\n");
        return ncclInvalidUsage;
    }
    if (!c->finalized) finalize_all(std::vector<ncclComm_t>{c}); // collective, as in NCCL
    emu_clique *q = c->q;
    int last;
    {
        std::lock_guard<std::mutex> lk(q->mu);
        last = --q->live == 0;
    }
    if (last) delete q;
    delete c;
    return ncclSuccess;
}
