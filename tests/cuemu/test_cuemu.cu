// The emulator's own checks, on small kernels written to break them: a
// block that reads shared memory it never wrote reads NaN; static shared
// memory over the device's 48 KiB fails the launch; a recorded graph gives
// its nodes and their types (cudaGraphGetNodes); and, built under the
// race detector (CUEMU_SAN=thread), each racing kernel is reported and its
// correctly synchronised twin is not. A kernel whose failure is the test
// runs in a child process (this binary again, with the case's name).
//
// Built only for the emulator (tests/cuemu, by the Makefile): it checks
// cuemu, not a GPU.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/test.h"

#define N_THREADS 64

// Each thread writes its own element, then reads one of another warp
// (sync = 0: with no barrier between).
__global__ void neighbour_kernel(float *out, int sync) {
    __shared__ float s[N_THREADS];
    const int t = threadIdx.x;
    s[t] = (float)t;
    if (sync) __syncthreads();
    out[t] = s[(t + 32) % N_THREADS];
}

// The same between lanes of one warp: only __syncwarp orders their memory.
__global__ void lane_kernel(float *out, int sync) {
    __shared__ float s[32];
    const int t = threadIdx.x;
    s[t] = (float)t;
    if (sync) __syncwarp();
    else out[t + 32] = __shfl_xor_sync(0xffffffffu, (float)t, 1); // a shuffle orders nothing
    out[t] = s[t ^ 1];
}

// Thread 0 of every block adds into one global element (shared = 1) or
// into its block's own (shared = 0).
__global__ void blocks_kernel(float *out, int shared) {
    if (threadIdx.x == 0) out[shared ? 0 : blockIdx.x] += 1.0f;
}

// The same after a barrier, which orders each block, not the grid.
__global__ void barrier_blocks_kernel(float *out, int shared) {
    __shared__ float s[N_THREADS];
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 5) out[shared ? 0 : blockIdx.x] += s[(threadIdx.x + 32) % N_THREADS];
}

// The programming guide's "last block" sum: every block stores its part
// and counts itself in; the last one reads all parts (each thread another
// thread's). Without the writers' fence nothing orders the parts before
// the last block's reads.
__global__ void split_kernel(float *part, int *count, float *out, int fence) {
    __shared__ int last;
    const int t = threadIdx.x;
    part[blockIdx.x * N_THREADS + t] = (float)(blockIdx.x + t);
    if (fence) __threadfence();
    __syncthreads();
    if (t == 0) last = atomicAdd(count, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    float s = 0.0f;
    for (unsigned b = 0; b < gridDim.x; b++) s += part[b * N_THREADS + (t + 1) % N_THREADS];
    out[t] = s;
}

// Block 0 writes a shared variable; every other block only reads it.
__global__ void stale_kernel(float *out) {
    __shared__ float v;
    if (blockIdx.x == 0 && threadIdx.x == 0) v = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}

__global__ void too_much_static_kernel(float *out) {
    __shared__ float big[(48 << 10) / 4 + 1];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = big[threadIdx.x ^ 1];
}

__global__ void add_one_kernel(float *x) { x[threadIdx.x] += 1.0f; }

static float *dev_zeros(size_t n) {
    float *d = NULL;
    if (cudaMalloc((void **)&d, n * sizeof(float)) != cudaSuccess) abort();
    cudaMemset(d, 0, n * sizeof(float));
    return d;
}

// Runs case `name` in this process: the kernels that are the test.
static int run_case(const char *name) {
    float *out = dev_zeros(4 * N_THREADS);
    int race = strstr(name, "_race") != NULL;
    if (!strncmp(name, "neighbour", 9)) neighbour_kernel<<<1, N_THREADS>>>(out, !race);
    else if (!strncmp(name, "lane", 4)) lane_kernel<<<1, 32>>>(out, !race);
    else if (!strncmp(name, "blocks", 6)) blocks_kernel<<<4, N_THREADS>>>(out, race);
    else if (!strncmp(name, "barrier_blocks", 14)) barrier_blocks_kernel<<<4, N_THREADS>>>(out, race);
    else if (!strncmp(name, "split", 5)) {
        float *part = dev_zeros(4 * N_THREADS);
        int *count = (int *)dev_zeros(1);
        split_kernel<<<4, N_THREADS>>>(part, count, out, !race);
    } else if (!strcmp(name, "too_much_static")) too_much_static_kernel<<<1, N_THREADS>>>(out);
    else {
        fprintf(stderr, "test_cuemu: no case %s\n", name);
        return 2;
    }
    if (cudaDeviceSynchronize() != cudaSuccess) return 3;
    return 0;
}

// Runs case `name` in a child (this binary again); returns its exit status
// (128 + signal if killed) and its stderr in err.
static int run_child(const char *name, char *err, size_t cap) {
    int fd[2];
    if (pipe(fd)) abort();
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 2);
        close(fd[0]);
        close(fd[1]);
        execl("/proc/self/exe", "test_cuemu", name, (char *)NULL);
        _exit(127);
    }
    close(fd[1]);
    size_t n = 0;
    char buf[4096];
    ssize_t r;
    while ((r = read(fd[0], buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < r && n < cap - 1; i++) err[n++] = buf[i];
    err[n] = 0;
    close(fd[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static char err[1 << 16];

static void test_shared_starts_nan(void) {
    float *out = dev_zeros(4);
    stale_kernel<<<4, 32>>>(out);
    float h[4];
    cudaMemcpy(h, out, sizeof h, cudaMemcpyDeviceToHost);
    CHECK(h[0] == 1.0f, "block 0 read %g of its own write", h[0]);
    for (int b = 1; b < 4; b++) CHECK(isnan(h[b]), "block %d read %g, not NaN, where only block 0 wrote", b, h[b]);
    cudaFree(out);
}

static void test_static_shared_limit(void) {
    int rc = run_child("too_much_static", err, sizeof err);
    CHECK(rc != 0 && strstr(err, "static") && strstr(err, "too_much_static_kernel"),
          "49 KiB of static shared memory: exit %d, %s", rc, err);
}

// A captured stream's graph holds its work as nodes in the order of
// capture, each of the type a GPU records, and cudaGraphGetNodes answers as
// documented: nodes NULL gives the count; a longer array gets the nodes,
// NULL after them, and the count; a shorter one as many nodes as it holds.
// The graph runs at each launch, not at capture.
static void test_graph_nodes(void) {
    const size_t bytes = N_THREADS * sizeof(float);
    cudaStream_t s = NULL;
    REQUIRE(cudaStreamCreate(&s) == cudaSuccess, "cudaStreamCreate");
    float *x = dev_zeros(N_THREADS), *y = dev_zeros(N_THREADS);
    cudaGraph_t g = NULL;
    REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed) == cudaSuccess, "cudaStreamBeginCapture");
    cudaMemsetAsync(x, 0, bytes, s);
    add_one_kernel<<<1, N_THREADS, 0, s>>>(x);
    add_one_kernel<<<1, N_THREADS, 0, s>>>(x);
    cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice, s);
    REQUIRE(cudaStreamEndCapture(s, &g) == cudaSuccess && g, "cudaStreamEndCapture");

    size_t n = 0;
    CHECK(cudaGraphGetNodes(g, NULL, &n) == cudaSuccess && n == 4, "%zu nodes counted, not 4", n);
    cudaGraphNode_t nodes[6];
    for (int i = 0; i < 6; i++) nodes[i] = (cudaGraphNode_t)&n; // not NULL: the call must clear the rest
    n = 6;
    REQUIRE(cudaGraphGetNodes(g, nodes, &n) == cudaSuccess && n == 4, "%zu nodes filled into 6, not 4", n);
    CHECK(nodes[4] == NULL && nodes[5] == NULL, "the entries past the nodes are not NULL");
    static const enum cudaGraphNodeType want[4] = {cudaGraphNodeTypeMemset, cudaGraphNodeTypeKernel,
                                                   cudaGraphNodeTypeKernel, cudaGraphNodeTypeMemcpy};
    for (int i = 0; i < 4; i++) {
        enum cudaGraphNodeType t = cudaGraphNodeTypeCount;
        CHECK(cudaGraphNodeGetType(nodes[i], &t) == cudaSuccess && t == want[i], "node %d: type %d, not %d", i,
              (int)t, (int)want[i]);
    }
    cudaGraphNode_t first[2] = {NULL, NULL};
    n = 2;
    CHECK(cudaGraphGetNodes(g, first, &n) == cudaSuccess && n == 2 && first[0] == nodes[0] && first[1] == nodes[1],
          "2 of 4 nodes: %zu filled", n);
    CHECK(cudaGraphGetNodes(g, NULL, NULL) == cudaErrorInvalidValue, "no numNodes accepted");
    cudaGetLastError();

    float h[N_THREADS];
    cudaMemcpy(h, y, bytes, cudaMemcpyDeviceToHost);
    CHECK(h[0] == 0.0f, "capture ran the work: %g", h[0]);
    cudaGraphExec_t e = NULL;
    REQUIRE(cudaGraphInstantiate(&e, g, 0) == cudaSuccess, "cudaGraphInstantiate");
    for (int run = 0; run < 2; run++) { // the memset makes every run start over
        cudaGraphLaunch(e, s);
        cudaStreamSynchronize(s);
        cudaMemcpy(h, y, bytes, cudaMemcpyDeviceToHost);
        for (int i = 0; i < N_THREADS; i++) CHECK(h[i] == 2.0f, "run %d: y[%d] = %g, not 2", run, i, h[i]);
    }
    cudaGraphExecDestroy(e);
    cudaGraphDestroy(g);
    cudaStreamDestroy(s);
    cudaFree(x);
    cudaFree(y);
}

// Under the race detector: every racing case is reported, naming its
// kernel, and its twin runs clean.
static void test_races(void) {
    static const char *const cases[] = {"neighbour", "lane", "blocks", "barrier_blocks", "split"};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char name[64], kernel[64];
        snprintf(kernel, sizeof kernel, "%s_kernel", cases[i]);
        snprintf(name, sizeof name, "%s_race", cases[i]);
        int rc = run_child(name, err, sizeof err);
        CHECK(rc != 0 && strstr(err, "data race") && strstr(err, kernel), "%s: exit %d, no race in %s reported", name,
              rc, kernel);
        rc = run_child(cases[i], err, sizeof err);
        CHECK(rc == 0 && !strstr(err, "data race"), "%s: exit %d:\n%s", cases[i], rc, err);
    }
}

int main(int argc, char **argv) {
    if (argc > 1) return run_case(argv[1]);
    RUN(test_shared_starts_nan);
    RUN(test_static_shared_limit);
    RUN(test_graph_nodes);
#if defined(__SANITIZE_THREAD__)
    RUN(test_races);
#else
    printf("(the race cases need the race detector: make test-racecheck)\n");
#endif
    TEST_DONE("test_cuemu");
}
