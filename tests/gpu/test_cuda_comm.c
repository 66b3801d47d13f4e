/* Tensor parallelism on the CUDA backend (`make test-gpu` on a machine with
 * two GPUs and NCCL; `make test` runs it on the emulator, which gives two
 * devices and its own NCCL, tests/cuemu/cuemu_nccl.cc). A group of two
 * ranks, backend_create with tensor_parallel = 2 on cuda:0 and cuda:1,
 * each rank driven by its own thread that attaches to it first, as the
 * model drives them:
 *  - all_reduce of random vectors of odd lengths (1 to 2^20 + 1 floats)
 *    gives, on both ranks, exactly the sum of the two inputs and the same
 *    bytes (two addends: every order of adding them rounds alike); ranks
 *    reach each call at different times; chained with kernels on the same
 *    stream (x += x between two all-reduces);
 *  - the same inside graph_begin(key)/graph_end: recorded, run, then
 *    replayed with new inputs in the same buffers, then an eager all-reduce
 *    after the replay;
 *  - a thread attached to rank 0 allocates, loads weights, reads memory
 *    figures and frees on rank 1 without attaching to it, and its own
 *    kernels still run on rank 0 afterwards (the backend selects and
 *    restores the device for those ops);
 *  - backend_destroy(rank 0) frees both ranks: under the emulator every
 *    byte of both devices' memory is back (and its AddressSanitizer build,
 *    CUEMU_SAN=address, finds no leak or stray access); every test makes
 *    and destroys its own group;
 *  - all_gather of odd lengths: both ranks hold rank 0's input, then rank
 *    1's, to the bit;
 *  - a lone backend is rank 0 of 1, its all_reduce changes nothing and its
 *    all_gather copies;
 *    tensor_parallel beyond the devices there are gives a one-line error;
 *    under the emulator, NCCL failing to start gives a one-line error and
 *    leaves nothing behind.
 * Needs a CUDA device (fails without one, as the other GPU tests); with
 * only one, the group tests are skipped and say so (neither passed nor
 * failed). */
#include <pthread.h>
#include <time.h>

#include "tests/gpu/gpu_test.h"

#define KEY 7

static int is_emu; /* running on tests/cuemu */

static nb_backend *group_create(void) {
    nb_err e = {{0}};
    nb_backend_opts o = {.device = "cuda", .tensor_parallel = 2};
    nb_backend *g = backend_create(&o, &e);
    CHECK(g != NULL, "backend_create(cuda, tensor_parallel=2): %s", e.msg);
    return g;
}

static int one_line(const char *s) { return s[0] && !strchr(s, '\n'); }

static void sleep_ms(int ms) {
    struct timespec ts = {0, ms * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- the rank threads -------------------------------------------------------- */

typedef struct job job;
struct job {
    nb_backend *b;
    void (*fn)(job *);
    int n_cases;
    const size_t *len;
    float **in, **in2; /* [n_cases] host inputs of this rank */
    float **out, **out2, **out3;
    float *x;          /* a device buffer made for the rank by another thread */
    int recorded, replayed;
};

static void *job_main(void *arg) {
    job *j = arg;
    j->b->ops->attach(j->b);
    j->fn(j);
    return NULL;
}

/* Runs jobs[r] on rank r's thread, both at once. */
static void run_ranks(job *jobs) {
    pthread_t t[2];
    for (int r = 0; r < 2; r++) pthread_create(&t[r], NULL, job_main, &jobs[r]);
    for (int r = 0; r < 2; r++) pthread_join(t[r], NULL);
}

static float *dev_copy(nb_backend *b, const float *h, size_t n) {
    float *d = b->ops->alloc(b, sizeof(float) * n);
    b->ops->upload(b, d, h, sizeof(float) * n);
    return d;
}

/* out = sum; out2 = the sum of (x + x) after x = sum (chained with a
 * kernel on the stream). Rank 1 starts late. */
static void job_all_reduce(job *j) {
    nb_backend *b = j->b;
    if (b->rank == 1) sleep_ms(20);
    for (int c = 0; c < j->n_cases; c++) {
        size_t n = j->len[c], bytes = sizeof(float) * n;
        float *x = dev_copy(b, j->in[c], n);
        b->ops->all_reduce(b, x, n);
        b->ops->download(b, j->out[c], x, bytes);
        b->ops->add(b, x, x, x, n);
        if (b->rank == 0 && c == 1) sleep_ms(10);
        b->ops->all_reduce(b, x, n);
        b->ops->download(b, j->out2[c], x, bytes);
        b->ops->free(b, x);
    }
}

/* out3 = every rank's input, rank 0's first. Rank 0 starts late. */
static void job_all_gather(job *j) {
    nb_backend *b = j->b;
    if (b->rank == 0) sleep_ms(20);
    for (int c = 0; c < j->n_cases; c++) {
        size_t n = j->len[c];
        float *x = dev_copy(b, j->in[c], n), *y = b->ops->alloc(b, 2 * sizeof(float) * n);
        b->ops->all_gather(b, y, x, n);
        b->ops->download(b, j->out3[c], y, 2 * sizeof(float) * n);
        b->ops->free(b, x);
        b->ops->free(b, y);
    }
}

/* The recorded step: y = x + x; y = sum(y); y += x; y = sum(y). */
static void step(nb_backend *b, float *y, float *x, size_t n) {
    b->ops->add(b, y, x, x, n);
    b->ops->all_reduce(b, y, n);
    b->ops->add(b, y, y, x, n);
    b->ops->all_reduce(b, y, n);
}

static void job_graph(job *j) {
    nb_backend *b = j->b;
    for (int c = 0; c < j->n_cases; c++) {
        size_t n = j->len[c], bytes = sizeof(float) * n;
        float *x = dev_copy(b, j->in[c], n), *y = b->ops->alloc(b, bytes);
        int r = b->ops->graph_begin(b, KEY + c);
        if (!r) {
            step(b, y, x, n);
            b->ops->graph_end(b);
        }
        j->recorded += !r;
        b->ops->download(b, j->out[c], y, bytes);
        b->ops->upload(b, x, j->in2[c], bytes);
        if (b->rank == 1) sleep_ms(10);
        r = b->ops->graph_begin(b, KEY + c);
        if (!r) {
            step(b, y, x, n);
            b->ops->graph_end(b);
        }
        j->replayed += r;
        b->ops->download(b, j->out2[c], y, bytes);
        b->ops->all_reduce(b, y, n); /* eager, after a replay */
        b->ops->download(b, j->out3[c], y, bytes);
        b->ops->free(b, x);
        b->ops->free(b, y);
    }
}

static void job_one(job *j) {
    j->b->ops->all_reduce(j->b, j->x, j->len[0]);
    j->b->ops->download(j->b, j->out[0], j->x, sizeof(float) * j->len[0]);
}

/* ---- checks -------------------------------------------------------------------- */

/* Both ranks' results equal want[] to the bit. */
static void check_sum(const char *what, size_t n, float *const got[2], const float *want) {
    size_t bad0 = n_mismatch(got[0], want, n), bad1 = n_mismatch(got[1], want, n), diff = n_mismatch(got[0], got[1], n);
    CHECK(bad0 == 0 && bad1 == 0, "%s, %zu floats: %zu (rank 0) and %zu (rank 1) elements differ from the sum", what, n,
          bad0, bad1);
    CHECK(diff == 0, "%s, %zu floats: the ranks differ in %zu elements", what, n, diff);
}

static float **alloc_cases(int n_cases, const size_t *len) {
    float **p = xcalloc((size_t)n_cases, sizeof *p);
    for (int c = 0; c < n_cases; c++) p[c] = xmalloc(sizeof(float) * len[c]);
    return p;
}

static float **random_cases(int n_cases, const size_t *len) {
    float **p = xcalloc((size_t)n_cases, sizeof *p);
    for (int c = 0; c < n_cases; c++) p[c] = randn(len[c], 1.0f);
    return p;
}

static void free_cases(float **p, int n_cases) {
    for (int c = 0; p && c < n_cases; c++) free(p[c]);
    free(p);
}

/* ---- tests --------------------------------------------------------------------- */

static void test_alone(void) {
    WHERE("alone");
    CHECK(gpu->rank == 0 && gpu->n_ranks == 1 && gpu->ranks == NULL, "a lone backend is rank %d of %d (ranks %p)",
          gpu->rank, gpu->n_ranks, (void *)gpu->ranks);
    REQUIRE(gpu->ops->all_reduce && gpu->ops->attach, "the cuda backend lacks all_reduce or attach");
    gpu->ops->attach(gpu);
    float *h = randn(1001, 1.0f), *back = xmalloc(sizeof(float) * 1001);
    float *x = to_gpu(h, sizeof(float) * 1001);
    gpu->ops->all_reduce(gpu, x, 1001);
    gpu->ops->download(gpu, back, x, sizeof(float) * 1001);
    CHECK(n_mismatch(back, h, 1001) == 0, "all_reduce alone changed the data");
    REQUIRE(gpu->ops->all_gather, "the cuda backend lacks all_gather");
    float *y = gpu->ops->alloc(gpu, sizeof(float) * 1001);
    gpu->ops->all_gather(gpu, y, x, 1001);
    memset(back, 0, sizeof(float) * 1001);
    gpu->ops->download(gpu, back, y, sizeof(float) * 1001);
    CHECK(n_mismatch(back, h, 1001) == 0, "all_gather alone is not a copy");
    gpu->ops->free(gpu, x);
    gpu->ops->free(gpu, y);
    free(h), free(back);
}

static void test_too_many(void) {
    WHERE("too many ranks");
    int n = cuda_device_count();
    nb_err e = {{0}};
    nb_backend_opts o = {.device = "cuda", .tensor_parallel = n + 1};
    nb_backend *b = backend_create(&o, &e);
    CHECK(b == NULL, "tensor_parallel %d with %d device(s) made a backend", n + 1, n);
    CHECK(one_line(e.msg) && strstr(e.msg, "tensor parallel"), "error: '%s'", e.msg);
    printf("  tensor_parallel=%d: %s\n", n + 1, e.msg);
    backend_destroy(b);
    e.msg[0] = 0;
    o = (nb_backend_opts){.device = "cuda:1", .tensor_parallel = n};
    b = backend_create(&o, &e);
    CHECK(b == NULL && one_line(e.msg), "cuda:1 with tensor_parallel %d on %d device(s): '%s'", n, n, e.msg);
    backend_destroy(b);
}

static void test_group(void) {
    WHERE("group");
    nb_backend *g = group_create();
    if (!g) return;
    CHECK(g->rank == 0 && g->n_ranks == 2 && g->ranks && g->ranks[0] == g, "rank 0: rank %d of %d", g->rank,
          g->n_ranks);
    if (g->ranks) {
        nb_backend *r1 = g->ranks[1];
        CHECK(r1 && r1 != g && r1->rank == 1 && r1->n_ranks == 2, "rank 1: rank %d of %d", r1 ? r1->rank : -1,
              r1 ? r1->n_ranks : -1);
        CHECK(r1 && !strcmp(r1->ops->name, "cuda"), "rank 1 is not a cuda backend");
    }
    backend_destroy(g);
}

static void test_all_reduce(void) {
    static const size_t len[] = {1, 3, 31, 257, 4099, 65537, (1u << 20) + 1};
    enum { N = sizeof len / sizeof len[0] };
    nb_backend *g = group_create();
    if (!g) return;
    WHERE("all_reduce");
    job jobs[2];
    for (int r = 0; r < 2; r++)
        jobs[r] = (job){.b = g->ranks[r], .fn = job_all_reduce, .n_cases = N, .len = len,
                        .in = random_cases(N, len), .out = alloc_cases(N, len), .out2 = alloc_cases(N, len)};
    run_ranks(jobs);
    for (int c = 0; c < N; c++) {
        size_t n = len[c];
        float *want = xmalloc(sizeof(float) * n), *want2 = xmalloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) {
            want[i] = jobs[0].in[c][i] + jobs[1].in[c][i];
            want2[i] = (want[i] + want[i]) + (want[i] + want[i]);
        }
        float *got[2] = {jobs[0].out[c], jobs[1].out[c]}, *got2[2] = {jobs[0].out2[c], jobs[1].out2[c]};
        check_sum("all_reduce", n, got, want);
        check_sum("x += x, all_reduce", n, got2, want2);
        free(want), free(want2);
    }
    for (int r = 0; r < 2; r++) {
        free_cases(jobs[r].in, N);
        free_cases(jobs[r].out, N);
        free_cases(jobs[r].out2, N);
    }
    backend_destroy(g);
}

static void test_all_gather(void) {
    static const size_t len[] = {1, 3, 257, 65537}, len2[] = {2, 6, 514, 131074};
    enum { N = sizeof len / sizeof len[0] };
    nb_backend *g = group_create();
    if (!g) return;
    WHERE("all_gather");
    job jobs[2];
    for (int r = 0; r < 2; r++)
        jobs[r] = (job){.b = g->ranks[r], .fn = job_all_gather, .n_cases = N, .len = len, .in = random_cases(N, len),
                        .out3 = alloc_cases(N, len2)};
    run_ranks(jobs);
    for (int c = 0; c < N; c++) {
        size_t n = len[c];
        for (int r = 0; r < 2; r++)
            CHECK(!memcmp(jobs[r].out3[c], jobs[0].in[c], sizeof(float) * n) &&
                      !memcmp(jobs[r].out3[c] + n, jobs[1].in[c], sizeof(float) * n),
                  "all_gather of %zu floats: rank %d does not hold rank 0's then rank 1's input", n, r);
    }
    for (int r = 0; r < 2; r++) {
        free_cases(jobs[r].in, N);
        free_cases(jobs[r].out3, N);
    }
    backend_destroy(g);
}

static void test_graph(void) {
    static const size_t len[] = {5, 4097, 100003};
    enum { N = sizeof len / sizeof len[0] };
    nb_backend *g = group_create();
    if (!g) return;
    WHERE("graph");
    job jobs[2];
    for (int r = 0; r < 2; r++)
        jobs[r] = (job){.b = g->ranks[r], .fn = job_graph, .n_cases = N, .len = len, .in = random_cases(N, len),
                        .in2 = random_cases(N, len), .out = alloc_cases(N, len), .out2 = alloc_cases(N, len),
                        .out3 = alloc_cases(N, len)};
    run_ranks(jobs);
    for (int r = 0; r < 2; r++)
        CHECK(jobs[r].recorded == N && jobs[r].replayed == N, "rank %d: %d of %d steps recorded, %d replayed", r,
              jobs[r].recorded, N, jobs[r].replayed);
    for (int c = 0; c < N; c++) {
        size_t n = len[c];
        float *want[3];
        for (int k = 0; k < 3; k++) want[k] = xmalloc(sizeof(float) * n);
        for (int k = 0; k < 2; k++) {
            const float *x0 = k ? jobs[0].in2[c] : jobs[0].in[c], *x1 = k ? jobs[1].in2[c] : jobs[1].in[c];
            for (size_t i = 0; i < n; i++) {
                float s = (x0[i] + x0[i]) + (x1[i] + x1[i]);
                want[k][i] = (s + x0[i]) + (s + x1[i]);
            }
        }
        for (size_t i = 0; i < n; i++) want[2][i] = want[1][i] + want[1][i];
        float *got[2] = {jobs[0].out[c], jobs[1].out[c]}, *got2[2] = {jobs[0].out2[c], jobs[1].out2[c]},
              *got3[2] = {jobs[0].out3[c], jobs[1].out3[c]};
        check_sum("recorded step", n, got, want[0]);
        check_sum("replayed step, new inputs", n, got2, want[1]);
        check_sum("all_reduce after a replay", n, got3, want[2]);
        for (int k = 0; k < 3; k++) free(want[k]);
    }
    for (int r = 0; r < 2; r++) {
        free_cases(jobs[r].in, N), free_cases(jobs[r].in2, N);
        free_cases(jobs[r].out, N), free_cases(jobs[r].out2, N), free_cases(jobs[r].out3, N);
    }
    backend_destroy(g);
}

/* The creating thread stays attached to rank 0 and works on rank 1's
 * memory without attaching to it. */
static void test_cross_thread(void) {
    static const size_t len[] = {70001};
    const size_t n = len[0], bytes = sizeof(float) * n;
    nb_backend *g = group_create();
    if (!g) return;
    WHERE("cross-thread");
    nb_backend *r0 = g, *r1 = g->ranks[1];
    size_t free0 = 0, free1 = 0, tot = 0, f0 = 0, f1 = 0;
    float *h0 = randn(n, 1.0f), *h1 = randn(n, 1.0f);
    float *x0 = dev_copy(r0, h0, n);
    CHECK(r0->ops->mem_info(r0, &free0, &tot) == 0 && r1->ops->mem_info(r1, &free1, &tot) == 0, "mem_info");
    /* rank 1's buffer is weights loaded from this thread */
    float *x1 = (float *)r1->ops->weight_load(r1, h1, bytes);
    void *big = r1->ops->alloc(r1, 8u << 20);
    CHECK(r0->ops->mem_info(r0, &f0, &tot) == 0 && r1->ops->mem_info(r1, &f1, &tot) == 0, "mem_info");
    if (is_emu) /* a GPU's free memory also moves with what NCCL and the driver do */
        CHECK(f0 == free0 && f1 + (8u << 20) + bytes <= free1,
              "memory of rank 1 allocated from rank 0's thread: rank 0 free %zu -> %zu, rank 1 %zu -> %zu", free0,
              f0, free1, f1);
    r1->ops->free(r1, big);
    /* a kernel of rank 0 from this thread: its device is still current */
    r0->ops->add(r0, x0, x0, x0, n);
    r0->ops->sync(r0);
    float *o[2] = {xmalloc(bytes), xmalloc(bytes)};
    job jobs[2] = {{.b = r0, .fn = job_one, .len = len, .x = x0, .out = &o[0]},
                   {.b = r1, .fn = job_one, .len = len, .x = x1, .out = &o[1]}};
    run_ranks(jobs);
    float *want = xmalloc(bytes);
    for (size_t i = 0; i < n; i++) want[i] = (h0[i] + h0[i]) + h1[i];
    check_sum("all_reduce of buffers made from another thread", n, o, want);
    r1->ops->weight_free(r1, x1);
    r0->ops->free(r0, x0);
    free(h0), free(h1), free(o[0]), free(o[1]), free(want);
    backend_destroy(g);
}

/* Under the emulator: backend_destroy(rank 0) gives back every byte of
 * both devices (a lone backend on each reads the figures). */
static void test_destroy_frees(void) {
    WHERE("destroy");
    nb_err e = {{0}};
    nb_backend_opts o1 = {.device = "cuda:1"};
    nb_backend *d1 = backend_create(&o1, &e);
    REQUIRE(d1 != NULL, "cuda:1: %s", e.msg);
    size_t before0, before1, after0, after1, tot;
    gpu->ops->mem_info(gpu, &before0, &tot);
    d1->ops->mem_info(d1, &before1, &tot);
    nb_backend *g = group_create();
    if (g) {
        /* some work on both ranks first, recorded steps included */
        job jobs[2];
        static const size_t len[] = {1000};
        for (int r = 0; r < 2; r++)
            jobs[r] = (job){.b = g->ranks[r], .fn = job_graph, .n_cases = 1, .len = len, .in = random_cases(1, len),
                            .in2 = random_cases(1, len), .out = alloc_cases(1, len), .out2 = alloc_cases(1, len),
                            .out3 = alloc_cases(1, len)};
        run_ranks(jobs);
        for (int r = 0; r < 2; r++) {
            free_cases(jobs[r].in, 1), free_cases(jobs[r].in2, 1);
            free_cases(jobs[r].out, 1), free_cases(jobs[r].out2, 1), free_cases(jobs[r].out3, 1);
        }
        backend_destroy(g);
    }
    gpu->ops->mem_info(gpu, &after0, &tot);
    d1->ops->mem_info(d1, &after1, &tot);
    backend_destroy(d1);
    gpu->ops->attach(gpu);
    if (is_emu) {
        CHECK(after0 == before0, "device 0: %zu bytes free before the group, %zu after", before0, after0);
        CHECK(after1 == before1, "device 1: %zu bytes free before the group, %zu after", before1, after1);
    }
}

static void test_init_fails(void) {
    WHERE("NCCL init failing");
    setenv("CUEMU_NCCL_FAIL", "init", 1);
    nb_err e = {{0}};
    nb_backend_opts o = {.device = "cuda", .tensor_parallel = 2};
    nb_backend *b = backend_create(&o, &e);
    unsetenv("CUEMU_NCCL_FAIL");
    CHECK(b == NULL, "a group was made though NCCL failed");
    CHECK(one_line(e.msg) && strstr(e.msg, "NCCL"), "error: '%s'", e.msg);
    printf("  NCCL failing: %s\n", e.msg);
    backend_destroy(b);
    b = group_create(); /* nothing left behind in the way */
    backend_destroy(b);
}

int main(void) {
    /* the emulator's device count (a GPU's runtime does not read it) */
    setenv("CUEMU_DEVICES", "2", 0);
    if (gpu_tests_start()) TEST_DONE("test_cuda_comm");
    char desc[256] = "";
    cuda_device_describe(0, desc, sizeof desc);
    is_emu = strstr(desc, "cuemu") != NULL;
    RUN(test_alone);
    RUN(test_too_many);
    int n = cuda_device_count();
    if (n < 2) {
        printf("skipped: the group tests need 2 CUDA devices, %d found\n", n);
    } else {
        RUN(test_group);
        RUN(test_all_reduce);
        RUN(test_all_gather);
        RUN(test_graph);
        RUN(test_cross_thread);
        RUN(test_destroy_frees);
        if (is_emu) RUN(test_init_fails);
    }
    backend_destroy(gpu);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_comm");
}
