/* A few threads for one job, for work done once at load (quantizing,
 * repacking) where a pool that lives on would be more machinery than the
 * job: start, run, join. */
#ifndef NB_PARALLEL_H
#define NB_PARALLEL_H

#include <stdatomic.h>
#include <stdint.h>

/* Runs fn(ctx) on `threads` threads at once, the calling thread among them,
 * and returns when all have returned. fn takes its work from ctx, through
 * a shared counter (par_take), so a thread that the system refuses to
 * start only means fewer hands: the others do its share. */
void par_run(int threads, void *(*fn)(void *ctx), void *ctx);

/* The next of items 0..n-1 from a counter that the threads share (start
 * it at 0), or -1 once all are taken. */
static inline int64_t par_take(atomic_llong *next, int64_t n) {
    int64_t i = atomic_fetch_add(next, 1);
    return i < n ? i : -1;
}

/* Cores online, at least 1. */
int par_cores(void);

/* Threads for `items` items of about `item_bytes` each: one per core, at
 * most `max`, each with at least `min_bytes` of work (a thread costs tens
 * of microseconds to start). */
int par_threads(int64_t items, double item_bytes, double min_bytes, int max);

#endif
