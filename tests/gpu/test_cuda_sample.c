/* The CUDA sample op against sample_row_ref, the CPU definition it must
 * equal (`make test-gpu`; `make test` only builds this).
 *
 * Both sides compute the probabilities with the same IEEE operations and
 * sum masses in double, so the token ids must be identical: a difference
 * could only come from a draw u landing within ~1e-15 of a token boundary,
 * which the fixed draws below do not. Swept: vocabularies from 1 to 151936
 * tokens; logits that are random, full of ties, laced with NaN and -inf, or
 * all NaN; greedy rows and every filter alone and combined (top-k below,
 * at and above the number of live tokens, top-p, min-p, temperatures), with
 * and without the penalties' history; several rows of different parameters
 * in one call, each with its own draw. Needs a CUDA device; fails (not
 * skips) without one. */
#include "tests/gpu/gpu_test.h"

typedef struct params {
    const char *name;
    float t;
    int top_k;
    float top_p, min_p, rep, pres, freq;
} params;

static const params PARAMS[] = {
    {"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"greedy+penalties", 0.0f, 0, 1.0f, 0.0f, 1.3f, 0.5f, 0.25f},
    {"plain", 1.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"cold", 0.3f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"hot", 2.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_k=1", 1.0f, 1, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_k=5", 1.0f, 5, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_k=50", 0.7f, 50, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_k=100000", 1.0f, 100000, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_p=0.9", 1.0f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_p=0.5", 0.8f, 0, 0.5f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_p=0.05", 1.0f, 0, 0.05f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"min_p=0.05", 1.0f, 0, 1.0f, 0.05f, 1.0f, 0.0f, 0.0f},
    {"min_p=0.5", 1.5f, 0, 1.0f, 0.5f, 1.0f, 0.0f, 0.0f},
    {"top_k+top_p", 1.0f, 40, 0.8f, 0.0f, 1.0f, 0.0f, 0.0f},
    {"top_k+top_p+min_p", 0.9f, 20, 0.95f, 0.02f, 1.0f, 0.0f, 0.0f},
    {"top_p+min_p", 1.2f, 0, 0.95f, 0.3f, 1.0f, 0.0f, 0.0f},
    {"all+penalties", 0.8f, 30, 0.9f, 0.01f, 1.2f, 0.4f, 0.3f},
    {"penalties", 1.0f, 0, 1.0f, 0.0f, 0.7f, -0.5f, 1.0f},
};
#define N_PARAMS ((int)(sizeof PARAMS / sizeof PARAMS[0]))

enum { K_RANDOM, K_TIES, K_HOLES, K_FEW_LIVE, K_ALL_NAN, N_KINDS };
static const char *KIND_NAME[N_KINDS] = {"random", "ties", "nan/-inf holes", "few live", "all NaN"};

static void fill_logits(float *x, int V, int kind) {
    for (int i = 0; i < V; i++) {
        float g = gauss() * 3.0f;
        switch (kind) {
        case K_RANDOM: x[i] = g; break;
        case K_TIES: x[i] = roundf(g) * 0.5f; break; /* a handful of distinct values */
        case K_HOLES: x[i] = i % 11 == 3 ? NAN : i % 7 == 2 ? -INFINITY : g; break;
        case K_FEW_LIVE: x[i] = i % 977 == 13 || i == V - 1 ? g : -INFINITY; break;
        default: x[i] = NAN; break;
        }
    }
}

/* A history of distinct ids, some only in the prompt (count 0). */
static int make_history(int32_t *ids, int32_t *count, int V, int n) {
    if (n > V) n = V;
    int start = irand(V);
    for (int j = 0; j < n; j++) {
        ids[j] = (int32_t)((start + (int64_t)j * 7919) % V); /* 7919 is prime: distinct while n <= V */
        count[j] = j % 3 == 0 ? 0 : 1 + irand(4);
    }
    return n;
}

/* NB_GPU_TEST_QUICK=1 (make test sets it for its racecheck share): the
 * same paths on fewer and smaller rows. Under the emulator's race detector
 * every CUDA thread is a fiber and each of a block's barriers orders all
 * 1024 of them, so the full sweep (15,000 blocks) would take hours. */
static int quick(void) {
    const char *q = getenv("NB_GPU_TEST_QUICK");
    return q && atoi(q) > 0;
}

static void test_sample_rows(void) {
    static const int VOCABS[] = {1, 7, 1000, 32000, 151936};
    enum { R_MAX = 24, HIST = 300 };
    /* quick: rows at u = 0, mid and ~1, vocabularies up to 1000 (one
     * candidate per thread at most; the mixed rows and the distribution
     * below take several per thread) */
    const int R = quick() ? 3 : R_MAX, n_vocabs = quick() ? 3 : 5;
    for (int vi = 0; vi < n_vocabs; vi++) {
        int V = VOCABS[vi];
        float *x = xmalloc(sizeof(float) * (size_t)R * V), *work = xmalloc(sizeof(float) * (size_t)V);
        float *prob = xmalloc(sizeof(float) * (size_t)V);
        int32_t *idx = xmalloc(sizeof(int32_t) * (size_t)V);
        int32_t hid[HIST], hcnt[HIST];
        float *dx = gpu->ops->alloc(gpu, sizeof(float) * (size_t)R * V);
        for (int kind = 0; kind < N_KINDS; kind++) {
            for (int pi = 0; pi < N_PARAMS; pi++) {
                const params *P = &PARAMS[pi];
                WHERE("sample V=%d logits %s params %s", V, KIND_NAME[kind], P->name);
                int nh = make_history(hid, hcnt, V, HIST);
                nb_sample_row rows[R_MAX];
                for (int r = 0; r < R; r++) {
                    fill_logits(x + (size_t)r * V, V, kind);
                    /* draws spread over [0, 1), the ends included */
                    double u = r == 0 ? 0.0 : r == R - 1 ? 0.99999999 : (r + 0.318) / R;
                    rows[r] = (nb_sample_row){P->t, P->top_k, P->top_p, P->min_p, P->rep, P->pres, P->freq,
                                              u, nh, hid, hcnt};
                }
                gpu->ops->upload(gpu, dx, x, sizeof(float) * (size_t)R * V);
                int32_t got[R_MAX];
                gpu->ops->sample(gpu, got, dx, R, V, rows);
                int bad = 0, first = -1;
                int32_t want_first = 0, got_first = 0;
                for (int r = 0; r < R; r++) {
                    memcpy(work, x + (size_t)r * V, sizeof(float) * (size_t)V);
                    int32_t want = sample_row_ref(work, V, &rows[r], prob, idx);
                    if (want != got[r] && first < 0) first = r, want_first = want, got_first = got[r];
                    bad += want != got[r];
                }
                CHECK(bad == 0, "V=%d %s %s: %d of %d rows differ (row %d: cpu %d, gpu %d)", V, KIND_NAME[kind],
                      P->name, bad, R, first, want_first, got_first);
            }
        }
        gpu->ops->free(gpu, dx);
        free(x), free(work), free(prob), free(idx);
    }
}

/* Rows of different parameters in one call, each with its own history:
 * the per-row offsets into the staged history must not mix rows. */
static void test_sample_mixed_rows(void) {
    enum { V = 5000, HIST = 64 };
    int R = N_PARAMS;
    WHERE("sample mixed rows");
    float *x = xmalloc(sizeof(float) * (size_t)R * V), *work = xmalloc(sizeof(float) * V);
    float *prob = xmalloc(sizeof(float) * V);
    int32_t *idx = xmalloc(sizeof(int32_t) * V), *hid = xmalloc(sizeof(int32_t) * (size_t)R * HIST),
            *hcnt = xmalloc(sizeof(int32_t) * (size_t)R * HIST), *got = xmalloc(sizeof(int32_t) * (size_t)R);
    nb_sample_row *rows = xmalloc(sizeof(nb_sample_row) * (size_t)R);
    for (int r = 0; r < R; r++) {
        const params *P = &PARAMS[r];
        fill_logits(x + (size_t)r * V, V, K_RANDOM);
        /* the history holds the row's top tokens, so penalties change the answer */
        for (int j = 0; j < HIST; j++) hid[r * HIST + j] = (int32_t)((r * 131 + j) % V), hcnt[r * HIST + j] = 1 + j % 3;
        for (int j = 0; j < HIST; j++) x[(size_t)r * V + hid[r * HIST + j]] = 9.0f + 0.01f * (float)j;
        rows[r] = (nb_sample_row){P->t, P->top_k, P->top_p, P->min_p, P->rep, P->pres, P->freq,
                                  (r + 0.5) / R, r % 4 == 3 ? 0 : HIST, hid + r * HIST, hcnt + r * HIST};
    }
    float *dx = to_gpu(x, sizeof(float) * (size_t)R * V);
    gpu->ops->sample(gpu, got, dx, R, V, rows);
    int bad = 0;
    for (int r = 0; r < R; r++) {
        memcpy(work, x + (size_t)r * V, sizeof(float) * V);
        int32_t want = sample_row_ref(work, V, &rows[r], prob, idx);
        CHECK(want == got[r], "row %d (%s): cpu %d, gpu %d", r, PARAMS[r].name, want, got[r]);
        bad += want != got[r];
    }
    (void)bad;
    gpu->ops->free(gpu, dx);
    free(x), free(work), free(prob), free(idx), free(hid), free(hcnt), free(got), free(rows);
}

/* 4096 draws spread evenly over [0, 1) on one top-p row: the GPU's token
 * counts equal the CPU's, so the whole distribution is the same. */
static void test_sample_distribution(void) {
    enum { V = 2000 };
    const int R = quick() ? 128 : 4096;
    WHERE("sample distribution");
    float *row = randn(V, 2.0f), *x = xmalloc(sizeof(float) * (size_t)R * V), *work = xmalloc(sizeof(float) * V);
    float *prob = xmalloc(sizeof(float) * V);
    int32_t *idx = xmalloc(sizeof(int32_t) * V), *got = xmalloc(sizeof(int32_t) * R);
    nb_sample_row *rows = xmalloc(sizeof(nb_sample_row) * R);
    for (int r = 0; r < R; r++) {
        memcpy(x + (size_t)r * V, row, sizeof(float) * V);
        rows[r] = (nb_sample_row){0.9f, 0, 0.8f, 0.0f, 1.0f, 0.0f, 0.0f, (r + 0.5) / R, 0, NULL, NULL};
    }
    float *dx = to_gpu(x, sizeof(float) * (size_t)R * V);
    gpu->ops->sample(gpu, got, dx, R, V, rows);
    int bad = 0, distinct = 0;
    int32_t prev = -1;
    for (int r = 0; r < R; r++) {
        memcpy(work, row, sizeof(float) * V);
        int32_t want = sample_row_ref(work, V, &rows[r], prob, idx);
        bad += want != got[r];
        distinct += got[r] != prev;
        prev = got[r];
    }
    CHECK(bad == 0, "%d of %d draws differ", bad, R);
    CHECK(distinct > 20, "only %d distinct runs of tokens: the draws do not spread", distinct);
    gpu->ops->free(gpu, dx);
    free(row), free(x), free(work), free(prob), free(idx), free(got), free(rows);
}

int main(void) {
    if (gpu_tests_start()) TEST_DONE("test_cuda_sample");
    RUN(test_sample_rows);
    RUN(test_sample_mixed_rows);
    RUN(test_sample_distribution);
    backend_destroy(gpu);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_sample");
}
