/* Fast Fourier transforms: the only place FFTW is called.
 *
 * Hilal uses FFTW's single-precision real-to-complex (r2c) and
 * complex-to-real (c2r) 2-D transforms. Plans are expensive to make and are
 * made once per array size, thread count and planning rigour, kept in a
 * process-wide cache and reused for every later frame. Planning (and
 * FFTW's thread set-up) happens under one global lock because FFTW's planner
 * is not thread-safe; execution uses FFTW's new-array execute calls, which
 * are, so any number of frames may transform concurrently with the same
 * cached plan.
 *
 * Arrays are row-major: a real array of ny rows of nx floats (element
 * (x, y) at [y * nx + x]) has a half-spectrum of ny rows of nx/2 + 1
 * complex values (frequency (u, v) at [v * (nx/2 + 1) + u]; u = 0..nx/2,
 * v = 0..ny-1 with v > ny/2 standing for the negative frequency v - ny).
 * Transforms are unnormalised: c2r(r2c(a)) = nx * ny * a.
 *
 * Buffers passed to the execute functions must come from
 * hilal_fft_alloc_real() / hilal_fft_alloc_complex() (FFTW's aligned
 * allocator) and be released with hilal_fft_free().
 */
#ifndef HILAL_FFT_H
#define HILAL_FFT_H

#include <stddef.h>

#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One complex value: [0] real part, [1] imaginary part (layout-compatible
 * with fftwf_complex). */
typedef float hilal_fft_complex[2];

/* How hard FFTW searches for a fast plan. ESTIMATE plans instantly;
 * MEASURE times candidate algorithms (seconds for a 4k x 4k array, once per
 * size and process, or never again with a wisdom file) and typically makes
 * transforms 2x faster; PATIENT searches longer still. */
typedef enum hilal_fft_rigor {
    HILAL_FFT_ESTIMATE = 0,
    HILAL_FFT_MEASURE = 1,
    HILAL_FFT_PATIENT = 2
} hilal_fft_rigor;

/* Parses "estimate", "measure" or "patient" (case-insensitive).
 * HILAL_ERR_CONFIG naming the accepted values otherwise. */
hilal_status hilal_fft_rigor_parse(const char *text, hilal_fft_rigor *out, hilal_error *err);

/* Name of a rigor ("estimate", ...). */
const char *hilal_fft_rigor_name(hilal_fft_rigor rigor);

/* A cached pair of plans (r2c and c2r) for one real array size. Owned by
 * the cache: never freed by the caller, valid until hilal_fft_cleanup(). */
typedef struct hilal_fft_plan hilal_fft_plan;

/* The number of threads that `requested` means: requested itself when
 * >= 1, else the number of online processors (at least 1). */
int hilal_fft_threads(int requested);

/* The smallest n' >= n whose only prime factors are 2, 3, 5 and 7 (sizes
 * FFTW transforms fastest). n <= 1 gives 1. */
long hilal_fft_good_size(long n);

/* Returns the plans for an nx x ny real array (nx columns, ny rows) using
 * `threads` threads (0 = one per processor), made now if not cached.
 * Thread-safe. HILAL_ERR_RANGE for non-positive sizes, HILAL_ERR_NOMEM,
 * HILAL_ERR_FFT when FFTW cannot make a plan. */
hilal_status hilal_fft_plan_get(long nx, long ny, int threads, hilal_fft_rigor rigor,
                                const hilal_fft_plan **out, hilal_error *err);

/* Size of the arrays a plan transforms. */
void hilal_fft_plan_size(const hilal_fft_plan *plan, long *nx, long *ny);

/* Forward transform of the real array in (nx*ny floats, left unchanged) into
 * out (ny * (nx/2+1) complex values). in and out must be distinct buffers
 * from the allocators below. HILAL_ERR_INTERNAL when a buffer is misaligned. */
hilal_status hilal_fft_r2c(const hilal_fft_plan *plan, float *in, hilal_fft_complex *out,
                           hilal_error *err);

/* Inverse transform of the half-spectrum in (DESTROYED by the call) into the
 * real array out, unnormalised (multiply by 1/(nx*ny) to invert r2c). */
hilal_status hilal_fft_c2r(const hilal_fft_plan *plan, hilal_fft_complex *in, float *out,
                           hilal_error *err);

/* Aligned buffers for nx x ny real arrays and their half-spectra; NULL (and
 * err set) when out of memory. Contents are uninitialised. */
float *hilal_fft_alloc_real(long nx, long ny, hilal_error *err);
hilal_fft_complex *hilal_fft_alloc_complex(long nx, long ny, hilal_error *err);

/* Number of complex values in the half-spectrum of an nx x ny real array. */
size_t hilal_fft_ncomplex(long nx, long ny);

/* Frees a buffer from the allocators above. Accepts NULL. */
void hilal_fft_free(void *buf);

/* Loads FFTW wisdom (remembered plans) from a file so that MEASURE and
 * PATIENT plans need no timing runs. A file that does not exist is not an
 * error (*loaded = 0); an unreadable or malformed one is HILAL_ERR_IO.
 * loaded may be NULL. */
hilal_status hilal_fft_wisdom_import(const char *path, int *loaded, hilal_error *err);

/* Saves the wisdom accumulated by this process (atomically: written to a
 * temporary file and renamed). HILAL_ERR_IO on failure. */
hilal_status hilal_fft_wisdom_export(const char *path, hilal_error *err);

/* Wall time in seconds of one r2c transform of an n x n array with the
 * given threads and rigor (the median of `repeats` >= 1 runs, after
 * planning, which is not timed). For benchmarks. */
hilal_status hilal_fft_time_r2c(long n, int threads, hilal_fft_rigor rigor, int repeats,
                                double *seconds, hilal_error *err);

/* Destroys every cached plan and FFTW's internal state. Only call when no
 * other thread uses the FFT functions (e.g. at program exit); plans are
 * made again on the next use. */
void hilal_fft_cleanup(void);

#ifdef __cplusplus
}
#endif
#endif
