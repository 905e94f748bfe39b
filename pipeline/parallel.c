#include "parallel.h"

#include <pthread.h>

typedef struct range_job {
    hilal_range_fn fn;
    void *ctx;
    long lo, hi;
    int tid;
} range_job;

static void *range_thread(void *arg)
{
    range_job *j = arg;
    j->fn(j->ctx, j->lo, j->hi, j->tid);
    return NULL;
}

void hilal_parallel_for(int nthreads, long n, hilal_range_fn fn, void *ctx)
{
    if (n <= 0)
        return;
    if (nthreads > HILAL_PARALLEL_MAX_THREADS)
        nthreads = HILAL_PARALLEL_MAX_THREADS;
    if (nthreads > n)
        nthreads = (int)n;
    if (nthreads <= 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    pthread_t th[HILAL_PARALLEL_MAX_THREADS];
    range_job jobs[HILAL_PARALLEL_MAX_THREADS];
    int started[HILAL_PARALLEL_MAX_THREADS] = {0};
    for (int t = 0; t < nthreads; t++)
        jobs[t] = (range_job){fn, ctx, n * t / nthreads, n * (t + 1) / nthreads, t};
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&th[t], NULL, range_thread, &jobs[t]) == 0;
    fn(ctx, jobs[0].lo, jobs[0].hi, 0);
    for (int t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else
            fn(ctx, jobs[t].lo, jobs[t].hi, t);
    }
}
