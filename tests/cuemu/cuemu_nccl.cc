// cuemu's NCCL: the calls nibble makes (kernels/cuda/cuda_comm.cu), over the
// emulated devices (cuemu_rt.h), written from NCCL's API documentation:
//  - ncclCommInitAll makes one communicator per device of its list, in one
//    process (a "clique" here);
//  - ncclAllReduce (float sum only) and ncclAllGather (float) are
//    stream-ordered: they run when their stream gets to them, or are
//    recorded into the graph the stream captures and run at each replay,
//    as kernel nodes (NCCL's collectives are kernels, and a GPU's graph
//    records them as such). Each rank's call waits for every other
//    rank's (their threads meet here), then all receive the same sums,
//    added in rank order, or the same concatenation of the ranks' inputs;
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
    std::vector<int> gather; // 1: the rank called ncclAllGather, 0: ncclAllReduce
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

// One rank's part of an all-reduce (gather 0) or all-gather (1); the last
// rank to arrive computes the result for all.
static void clique_collective(ncclComm *c, const float *send, float *recv, size_t count, int gather) {
    emu_clique *q = c->q;
    const char *what = gather ? "ncclAllGather" : "ncclAllReduce";
    std::unique_lock<std::mutex> lk(q->mu);
    unsigned long mine = q->done;
    q->send[c->rank] = send;
    q->recv[c->rank] = recv;
    q->count[c->rank] = count;
    q->gather[c->rank] = gather;
    if (++q->arrived < q->n) {
        clique_wait(q, lk, [&] { return q->done != mine; }, what, c->rank);
        return;
    }
    for (int r = 1; r < q->n; r++)
        if (q->count[r] != q->count[0] || q->gather[r] != q->gather[0]) {
            fprintf(stderr, "cuemu: nccl: rank 0 called %s with %zu elements but rank %d %s with %zu\n",
                    q->gather[0] ? "ncclAllGather" : "ncclAllReduce", q->count[0], r,
                    q->gather[r] ? "ncclAllGather" : "ncclAllReduce", q->count[r]);
            abort();
        }
    // into a copy first: a rank's recv may be its send (in place)
    std::vector<float> res(gather ? count * (size_t)q->n : count);
    if (gather) {
        for (int r = 0; r < q->n; r++) memcpy(res.data() + (size_t)r * count, q->send[r], sizeof(float) * count);
    } else {
        for (size_t i = 0; i < count; i++) {
            float s = q->send[0][i];
            for (int r = 1; r < q->n; r++) s += q->send[r][i];
            res[i] = s;
        }
    }
    for (int r = 0; r < q->n; r++) memcpy(q->recv[r], res.data(), sizeof(float) * res.size());
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
    q->gather.resize((size_t)ndev);
    for (int r = 0; r < ndev; r++) comms[r] = new ncclComm{q, r, devlist ? devlist[r] : r, 0};
    return ncclSuccess;
}

static int emu_buffer_ok(const ncclComm *c, const void *p, size_t count, const char *which, const char *call) {
    int d = cuemu_device_of(p, sizeof(float) * count);
    if (d == c->device) return 1;
    fprintf(stderr, "cuemu: nccl: %s on rank %d (device %d): %s %p (%zu floats) is not memory of device %d\n", call,
            c->rank, c->device, which, p, count, c->device);
    return 0;
}

static int emu_stream_ok(const ncclComm *c, cudaStream_t stream, const char *call) {
    if (cuemu_stream_device(stream) == c->device) return 1;
    fprintf(stderr, "cuemu: nccl: %s for rank %d (device %d) on a stream of device %d\n", call, c->rank, c->device,
            cuemu_stream_device(stream));
    return 0;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t c, cudaStream_t stream) {
    if (!c || c->finalized) return ncclInvalidArgument;
    if (type != ncclFloat || op != ncclSum) {
        fprintf(stderr, "cuemu: nccl: ncclAllReduce emulates float sums only (type %d, op %d)\n", (int)type, (int)op);
        return ncclInvalidArgument;
    }
    if (!emu_stream_ok(c, stream, "ncclAllReduce")) return ncclUnhandledCudaError;
    if (!emu_buffer_ok(c, sendbuff, count, "sendbuff", "ncclAllReduce") ||
        !emu_buffer_ok(c, recvbuff, count, "recvbuff", "ncclAllReduce"))
        return ncclInvalidArgument;
    const float *s = (const float *)sendbuff;
    float *r = (float *)recvbuff;
    cuemu_stream_enqueue(stream, [=]() { clique_collective(c, s, r, count, 0); }, cudaGraphNodeTypeKernel, 1);
    return ncclSuccess;
}

ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t type, ncclComm_t c,
                           cudaStream_t stream) {
    if (!c || c->finalized) return ncclInvalidArgument;
    if (type != ncclFloat) {
        fprintf(stderr, "cuemu: nccl: ncclAllGather emulates floats only (type %d)\n", (int)type);
        return ncclInvalidArgument;
    }
    if (!emu_stream_ok(c, stream, "ncclAllGather")) return ncclUnhandledCudaError;
    if (!emu_buffer_ok(c, sendbuff, sendcount, "sendbuff", "ncclAllGather") ||
        !emu_buffer_ok(c, recvbuff, sendcount * (size_t)c->q->n, "recvbuff", "ncclAllGather"))
        return ncclInvalidArgument;
    const float *s = (const float *)sendbuff;
    float *r = (float *)recvbuff;
    cuemu_stream_enqueue(stream, [=]() { clique_collective(c, s, r, sendcount, 1); }, cudaGraphNodeTypeKernel, 1);
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
