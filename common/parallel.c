#include "common/parallel.h"

#include <pthread.h>
#include <unistd.h>

#define PAR_MAX_THREADS 256

void par_run(int threads, void *(*fn)(void *ctx), void *ctx) {
    if (threads > PAR_MAX_THREADS) threads = PAR_MAX_THREADS;
    pthread_t tid[PAR_MAX_THREADS];
    int started[PAR_MAX_THREADS] = {0};
    for (int i = 1; i < threads; i++) started[i] = pthread_create(&tid[i], NULL, fn, ctx) == 0;
    fn(ctx);
    for (int i = 1; i < threads; i++)
        if (started[i]) pthread_join(tid[i], NULL);
}

int par_cores(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > PAR_MAX_THREADS ? PAR_MAX_THREADS : (int)n;
}

int par_threads(int64_t items, double item_bytes, double min_bytes, int max) {
    double by_bytes = (double)items * item_bytes / min_bytes;
    int n = par_cores();
    if (n > max) n = max;
    if ((double)n > by_bytes) n = (int)by_bytes;
    if (n > items) n = (int)items;
    return n < 1 ? 1 : n;
}
