/* Start-up shared by every GPU test binary (gpu_test.h for the op tests,
 * gpu_model_test.h for the model tests): the device must be there (the
 * tests fail, not skip, without one), then the CPU reference backend; and
 * the error measure both compare with. */
#ifndef NB_GPU_START_H
#define NB_GPU_START_H

#include <math.h>
#include <stddef.h>
#include <stdio.h>

#include "kernels/backend.h"
#include "tests/test.h"

static nb_backend *cpu;

/* Fails the running test (REQUIRE returns from it) without a CUDA device. */
static inline void gpu_require_device(void) {
    char buf[256] = "";
    int n = cuda_device_count();
    cuda_device_describe(0, buf, sizeof buf);
    REQUIRE(n > 0, "no CUDA device (cuda_device_count() = %d; %s): these tests need a GPU", n, buf);
    printf("  %s\n", buf);
}

/* The CPU backend into cpu; -1 (counted as a failure) if it cannot start. */
static inline int gpu_start_cpu(void) {
    nb_err e = {{0}};
    cpu = cpu_backend_create(0, &e);
    if (!cpu) {
        fprintf(stderr, "cpu backend: %s\n", e.msg);
        t_failed++;
        return -1;
    }
    return 0;
}

#endif
