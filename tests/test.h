/* Minimal test harness: each tests/test_*.c defines test functions and a
 * main that runs them with RUN(); the binary ends with
 * "<name>: N passed, N failed" and exits non-zero on any failure.
 * Tests run from the repository root. */
#ifndef NB_TEST_H
#define NB_TEST_H

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

static int t_passed, t_failed, t_cur_failed;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            fprintf(stderr, "  %s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                 \
            fprintf(stderr, "\n");                                        \
            t_cur_failed = 1;                                             \
        }                                                                 \
    } while (0)

/* A check whose failure makes the rest of the test meaningless. */
/* (cond is evaluated once: it may have side effects) */
#define REQUIRE(cond, ...)                    \
    do {                                      \
        int req_ok_ = !!(cond);               \
        CHECK(req_ok_, __VA_ARGS__);          \
        if (!req_ok_) return;                 \
    } while (0)

#define RUN(fn)                                                   \
    do {                                                          \
        t_cur_failed = 0;                                         \
        fn();                                                     \
        if (t_cur_failed) {                                       \
            t_failed++;                                           \
            printf("FAIL %s\n", #fn);                             \
        } else {                                                  \
            t_passed++;                                           \
            printf("ok   %s\n", #fn);                             \
        }                                                         \
        fflush(stdout);                                           \
    } while (0)

#define TEST_DONE(name)                                                     \
    do {                                                                    \
        printf("%s: %d passed, %d failed\n", name, t_passed, t_failed);     \
        return t_failed ? 1 : 0;                                            \
    } while (0)

/* max |got - ref| / max |ref| (NaN if got has one). */
static inline double rel_max(const float *got, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - ref[i]);
        if (isnan(d)) return NAN;
        if (d > num) num = d;
        if (fabs(ref[i]) > den) den = fabs(ref[i]);
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return num / den;
}

/* A small seeded generator for test data: xorshift64, uniform in [0, 1)
 * and Gaussian (Box-Muller). Each test binary has its own state. */
static unsigned long long t_rng_state = 0x9e3779b97f4a7c15ull;

static inline double urand(void) {
    t_rng_state ^= t_rng_state << 13;
    t_rng_state ^= t_rng_state >> 7;
    t_rng_state ^= t_rng_state << 17;
    return (double)(t_rng_state >> 11) / 9007199254740992.0;
}

static inline float gauss(void) {
    double u = urand() + 1e-12, v = urand();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

#endif
