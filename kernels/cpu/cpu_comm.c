/* The CPU ranks' all-reduce: tensor parallelism on CPU backends in one
 * process, so the sharded forward is tested without GPUs.
 *
 * Each rank posts its buffer; after a barrier rank r sums the r-th slice of
 * every rank's buffer, in rank order, and writes the sum back to all of
 * them; a second barrier ends the call. Every element is summed once, in
 * one order, so all ranks hold the same bytes (as NCCL's ring gives). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "kernels/cpu/cpu_ops.h"

struct cpu_comm {
    int n;
    atomic_int refs; /* ranks still holding it */
    pthread_barrier_t bar;
    float **bufs; /* [n]: the buffers posted for the current call */
    const float **ins; /* [n]: all_gather's inputs */
};

cpu_comm *cpu_comm_create(int n, nb_err *e) {
    cpu_comm *c = xcalloc(1, sizeof *c);
    if (pthread_barrier_init(&c->bar, NULL, (unsigned)n)) {
        free(c);
        nb_errf(e, "cannot create a barrier for %d CPU ranks", n);
        return NULL;
    }
    c->n = n;
    atomic_init(&c->refs, n);
    c->bufs = xcalloc((size_t)n, sizeof *c->bufs);
    c->ins = xcalloc((size_t)n, sizeof *c->ins);
    return c;
}

void cpu_comm_release(cpu_comm *c) {
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1) return;
    pthread_barrier_destroy(&c->bar);
    free(c->bufs);
    free(c->ins);
    free(c);
}

void cpu_comm_all_reduce(cpu_comm *c, int rank, float *x, size_t n) {
    c->bufs[rank] = x;
    pthread_barrier_wait(&c->bar);
    size_t per = (n + (size_t)c->n - 1) / (size_t)c->n, lo = per * (size_t)rank, hi = lo + per;
    if (hi > n) hi = n;
    for (size_t i = lo; i < hi; i++) {
        float s = c->bufs[0][i];
        for (int k = 1; k < c->n; k++) s += c->bufs[k][i];
        for (int k = 0; k < c->n; k++) c->bufs[k][i] = s;
    }
    pthread_barrier_wait(&c->bar);
}

void cpu_comm_all_gather(cpu_comm *c, int rank, float *out, const float *in, size_t n) {
    c->ins[rank] = in;
    pthread_barrier_wait(&c->bar);
    for (int k = 0; k < c->n; k++) memcpy(out + (size_t)k * n, c->ins[k], sizeof(float) * n);
    /* no rank may change its input before every rank has copied it */
    pthread_barrier_wait(&c->bar);
}
