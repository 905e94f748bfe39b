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
 * transforms 2x faster; PATIENT searches longer still. AUTO is MEASURE for
 * arrays of at least HILAL_FFT_AUTO_MIN_VALUES real values (where the
 * planning time is repaid within a few frames) and ESTIMATE below. */
typedef enum hilal_fft_rigor {
    HILAL_FFT_ESTIMATE = 0,
    HILAL_FFT_MEASURE = 1,
    HILAL_FFT_PATIENT = 2,
    HILAL_FFT_AUTO = 3
} hilal_fft_rigor;

/* The smallest array (nx * ny real values) that AUTO plans with MEASURE:
 * 2048 x 2048. */
#define HILAL_FFT_AUTO_MIN_VALUES (2048L * 2048L)

/* Parses "estimate", "measure", "patient" or "auto" (case-insensitive).
 * HILAL_ERR_CONFIG naming the accepted values otherwise. */
hilal_status hilal_fft_rigor_parse(const char *text, hilal_fft_rigor *out, hilal_error *err);

/* Name of a rigor ("estimate", ...). */
const char *hilal_fft_rigor_name(hilal_fft_rigor rigor);

/* The rigor a plan for an nx x ny array is made with: AUTO resolved by the
 * size, any other rigor unchanged. */
hilal_fft_rigor hilal_fft_rigor_resolve(hilal_fft_rigor rigor, long nx, long ny);

/* Upper bound on the time FFTW spends making one MEASURE or PATIENT plan,
 * seconds (FFTW's planning time limit: when it is reached the best plan
 * found so far is used). <= 0: no limit (the default). Process-wide;
 * applies to plans made afterwards. */
void hilal_fft_set_plan_time_limit(double seconds);

/* A cached pair of plans (r2c and c2r) for one real array size. Owned by
 * the cache: never freed by the caller, valid until hilal_fft_cleanup(). */
typedef struct hilal_fft_plan hilal_fft_plan;

/* The number of threads that `requested` means: requested itself when
 * >= 1, else the number of online processors (at least 1). */
int hilal_fft_threads(int requested);

/* The smallest n' >= n whose only prime factors are 2, 3, 5 and 7 (sizes
 * FFTW transforms fast). n <= 1 gives 1. */
long hilal_fft_good_size(long n);

/* Returns the plans for an nx x ny real array (nx columns, ny rows) using
 * `threads` threads (0 = one per processor), made now if not cached.
 * Thread-safe. HILAL_ERR_RANGE for non-positive sizes, HILAL_ERR_NOMEM,
 * HILAL_ERR_FFT when FFTW cannot make a plan. */
hilal_status hilal_fft_plan_get(long nx, long ny, int threads, hilal_fft_rigor rigor,
                                const hilal_fft_plan **out, hilal_error *err);

/* The same for transforms in place (hilal_fft_r2c_inplace() and
 * hilal_fft_c2r_inplace()), cached separately: one buffer from
 * hilal_fft_alloc_complex() holds the real array, in rows of
 * hilal_fft_inplace_stride(nx) floats (the last one or two of a row unused),
 * and then its half-spectrum. In place, FFTW needs no second array and
 * fewer internal copies (measured: 10-20% less CPU time at 4200 x 4200). */
hilal_status hilal_fft_plan_get_inplace(long nx, long ny, int threads, hilal_fft_rigor rigor,
                                        const hilal_fft_plan **out, hilal_error *err);

/* Floats per row of the real array of an in-place transform: 2 (nx/2 + 1). */
long hilal_fft_inplace_stride(long nx);

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

/* In place, with a plan from hilal_fft_plan_get_inplace(): r2c replaces the
 * real array in buf (rows of hilal_fft_inplace_stride(nx) floats) by its
 * half-spectrum, c2r the half-spectrum by the real array (unnormalised).
 * HILAL_ERR_INTERNAL for an out-of-place plan or a misaligned buffer (the
 * out-of-place calls refuse an in-place plan likewise). */
hilal_status hilal_fft_r2c_inplace(const hilal_fft_plan *plan, hilal_fft_complex *buf,
                                   hilal_error *err);
hilal_status hilal_fft_c2r_inplace(const hilal_fft_plan *plan, hilal_fft_complex *buf,
                                   hilal_error *err);

/* Aligned buffers for nx x ny real arrays and their half-spectra; NULL (and
 * err set) when out of memory. Contents are uninitialised. Large buffers
 * are backed by transparent huge pages where the system offers them (fewer
 * TLB misses in the strided passes of a 2-D transform). */
float *hilal_fft_alloc_real(long nx, long ny, hilal_error *err);
hilal_fft_complex *hilal_fft_alloc_complex(long nx, long ny, hilal_error *err);

/* Number of complex values in the half-spectrum of an nx x ny real array. */
size_t hilal_fft_ncomplex(long nx, long ny);

/* Frees a buffer from the allocators above. Accepts NULL. */
void hilal_fft_free(void *buf);

/* Loads FFTW wisdom (remembered plans) from a file so that MEASURE and
 * PATIENT plans need no timing runs. A file that does not exist is not an
 * error (*loaded = 0); an unreadable or malformed one (or wisdom of another
 * FFTW precision) is HILAL_ERR_IO and leaves the wisdom held so far
 * unchanged. loaded may be NULL. */
hilal_status hilal_fft_wisdom_import(const char *path, int *loaded, hilal_error *err);

/* Saves the wisdom accumulated by this process, merged with the wisdom the
 * file already holds (when it is readable), atomically: written to a
 * temporary file in the same directory and renamed, so that concurrent
 * readers and writers only ever see a whole file. HILAL_ERR_IO on failure
 * (the directory must exist). */
hilal_status hilal_fft_wisdom_export(const char *path, hilal_error *err);

/* The default wisdom file of this user and machine:
 * $XDG_CACHE_HOME/hilal/fftwf-wisdom-<host> ($HOME/.cache when
 * XDG_CACHE_HOME is unset or not absolute). Plans are only good on the
 * machine that timed them, hence the host name. Returns 1 and writes the
 * path to buf, or 0 when neither variable gives a directory or buf is too
 * small. */
int hilal_fft_wisdom_default_path(char *buf, size_t size);

/* Makes every MEASURE or PATIENT plan timed from now on (not those the
 * wisdom already knows) save the wisdom to path at once
 * (hilal_fft_wisdom_export, creating missing directories), so that a
 * planning run is never lost, even when the process is killed later. A
 * failure to save is logged once as a warning. NULL stops it. Process-wide;
 * the path is copied. */
void hilal_fft_wisdom_autosave(const char *path);

/* Wall time in seconds of one r2c transform of an n x n array with the
 * given threads and rigor (the median of `repeats` >= 1 runs, after
 * planning, which is not timed). For benchmarks. */
hilal_status hilal_fft_time_r2c(long n, int threads, hilal_fft_rigor rigor, int repeats,
                                double *seconds, hilal_error *err);

/* Destroys every cached plan and FFTW's internal state (its wisdom too),
 * and resets the planning time limit and the wisdom autosave. Only call
 * when no other thread uses the FFT functions (e.g. at program exit);
 * plans are made again on the next use. */
void hilal_fft_cleanup(void);

#ifdef __cplusplus
}
#endif
#endif
