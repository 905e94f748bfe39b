/* A small parallel for: splits [0, n) into contiguous chunks, one per
 * thread. Private to the library. */
#ifndef HILAL_PARALLEL_H
#define HILAL_PARALLEL_H

#define HILAL_PARALLEL_MAX_THREADS 64

/* Called once per chunk [lo, hi) with the chunk's thread index tid
 * (0 <= tid < nthreads). */
typedef void (*hilal_range_fn)(void *ctx, long lo, long hi, int tid);

/* Runs fn over [0, n) on up to nthreads threads (at most
 * HILAL_PARALLEL_MAX_THREADS and n; the calling thread takes the first
 * chunk). A chunk whose thread cannot be started runs in the calling
 * thread, so the work is always done. */
void hilal_parallel_for(int nthreads, long n, hilal_range_fn fn, void *ctx);

#endif
