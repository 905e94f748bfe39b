/* FFTW wrapper: plan cache, aligned buffers, new-array execution, wisdom.
 * The only file that includes fftw3.h. */
#include "hilal/fft.h"

#include <fftw3.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "hilal/log.h"

struct hilal_fft_plan {
    long nx, ny;
    int threads;
    hilal_fft_rigor rigor;
    fftwf_plan r2c, c2r;
    struct hilal_fft_plan *next;
};

/* FFTW's planner, its thread set-up and its wisdom functions are not
 * thread-safe: everything that touches them holds this lock. */
static pthread_mutex_t planner_lock = PTHREAD_MUTEX_INITIALIZER;
static int threads_ready;            /* fftwf_init_threads() succeeded (under the lock) */
static int threads_failed;           /* it failed once: plan single-threaded */
static struct hilal_fft_plan *cache; /* plans made so far (under the lock) */

hilal_status hilal_fft_rigor_parse(const char *text, hilal_fft_rigor *out, hilal_error *err)
{
    static const char *const names[] = {"estimate", "measure", "patient"};
    for (int i = 0; i < 3; i++)
        if (text != NULL && strcasecmp(text, names[i]) == 0) {
            *out = (hilal_fft_rigor)i;
            return HILAL_OK;
        }
    return hilal_error_set(err, HILAL_ERR_CONFIG,
                           "FFT planning rigor '%s' is not one of estimate, measure, patient",
                           text ? text : "(null)");
}

const char *hilal_fft_rigor_name(hilal_fft_rigor rigor)
{
    switch (rigor) {
    case HILAL_FFT_ESTIMATE: return "estimate";
    case HILAL_FFT_MEASURE: return "measure";
    case HILAL_FFT_PATIENT: return "patient";
    }
    return "?";
}

int hilal_fft_threads(int requested)
{
    if (requested >= 1)
        return requested;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n >= 1 ? (int)(n > 1024 ? 1024 : n) : 1;
}

long hilal_fft_good_size(long n)
{
    if (n <= 1)
        return 1;
    for (long m = n;; m++) {
        long r = m;
        static const int primes[] = {2, 3, 5, 7};
        for (int i = 0; i < 4; i++)
            while (r % primes[i] == 0)
                r /= primes[i];
        if (r == 1)
            return m;
    }
}

size_t hilal_fft_ncomplex(long nx, long ny) { return (size_t)ny * (size_t)(nx / 2 + 1); }

static unsigned rigor_flags(hilal_fft_rigor rigor)
{
    switch (rigor) {
    case HILAL_FFT_MEASURE: return FFTW_MEASURE;
    case HILAL_FFT_PATIENT: return FFTW_PATIENT;
    case HILAL_FFT_ESTIMATE: break;
    }
    return FFTW_ESTIMATE;
}

/* Starts FFTW's thread support once (called with planner_lock held). It
 * must precede planning with threads and importing wisdom, which may name
 * the threaded solvers it registers. */
static void init_threads(void)
{
    if (threads_ready || threads_failed)
        return;
    if (fftwf_init_threads() != 0) {
        threads_ready = 1;
    } else {
        threads_failed = 1;
        hilal_log(HILAL_LOG_WARN, "FFTW's thread support could not start; FFTs run on one thread");
    }
}

/* Makes the r2c and c2r plans for one size. Called with planner_lock held.
 * Planning uses scratch arrays of its own so that MEASURE runs never touch
 * caller data. */
static hilal_status make_plan(long nx, long ny, int threads, hilal_fft_rigor rigor,
                              struct hilal_fft_plan **out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    float *r = NULL;
    fftwf_complex *c = NULL;
    struct hilal_fft_plan *p = NULL;

    *out = NULL;
    init_threads();
    int nthreads = threads_ready ? threads : 1;

    p = calloc(1, sizeof *p);
    r = fftwf_malloc(sizeof *r * (size_t)nx * (size_t)ny);
    c = fftwf_malloc(sizeof *c * hilal_fft_ncomplex(nx, ny));
    if (p == NULL || r == NULL || c == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory planning a %ld x %ld FFT", nx, ny);
        goto cleanup;
    }
    if (threads_ready)
        fftwf_plan_with_nthreads(nthreads);
    unsigned flags = rigor_flags(rigor);
    /* FFTW's 2-D interface takes the slow (row) dimension first. */
    p->r2c = fftwf_plan_dft_r2c_2d((int)ny, (int)nx, r, c, flags);
    p->c2r = fftwf_plan_dft_c2r_2d((int)ny, (int)nx, c, r, flags | FFTW_DESTROY_INPUT);
    if (p->r2c == NULL || p->c2r == NULL) {
        st = hilal_error_set(err, HILAL_ERR_FFT,
                             "FFTW could not make a %s plan for a %ld x %ld real transform on %d "
                             "threads; try fft_rigor=estimate or fewer threads",
                             hilal_fft_rigor_name(rigor), nx, ny, nthreads);
        goto cleanup;
    }
    p->nx = nx;
    p->ny = ny;
    p->threads = threads;
    p->rigor = rigor;
    *out = p;
    p = NULL;
cleanup:
    if (p != NULL) {
        if (p->r2c != NULL)
            fftwf_destroy_plan(p->r2c);
        if (p->c2r != NULL)
            fftwf_destroy_plan(p->c2r);
        free(p);
    }
    fftwf_free(r);
    fftwf_free(c);
    return st;
}

hilal_status hilal_fft_plan_get(long nx, long ny, int threads, hilal_fft_rigor rigor,
                                const hilal_fft_plan **out, hilal_error *err)
{
    *out = NULL;
    if (nx <= 0 || ny <= 0 || nx > INT32_MAX || ny > INT32_MAX)
        return hilal_error_set(err, HILAL_ERR_RANGE, "FFT size %ld x %ld is not valid", nx, ny);
    threads = hilal_fft_threads(threads);
    hilal_status st = HILAL_OK;
    pthread_mutex_lock(&planner_lock);
    /* A cached plan of this size and thread count made with at least the
     * requested rigor serves as well. */
    for (struct hilal_fft_plan *p = cache; p != NULL; p = p->next)
        if (p->nx == nx && p->ny == ny && p->threads == threads && p->rigor >= rigor) {
            *out = p;
            goto cleanup;
        }
    struct hilal_fft_plan *p = NULL;
    st = make_plan(nx, ny, threads, rigor, &p, err);
    if (st != HILAL_OK)
        goto cleanup;
    p->next = cache;
    cache = p;
    *out = p;
    hilal_log(HILAL_LOG_DEBUG, "FFT plans made for %ld x %ld (%s, %d threads)", nx, ny,
              hilal_fft_rigor_name(rigor), threads);
cleanup:
    pthread_mutex_unlock(&planner_lock);
    return st;
}

void hilal_fft_plan_size(const hilal_fft_plan *plan, long *nx, long *ny)
{
    *nx = plan->nx;
    *ny = plan->ny;
}

/* New-array execution requires the alignment the plan was made with;
 * fftwf_malloc always gives FFTW's full SIMD alignment (offset 0). */
static hilal_status check_aligned(const void *a, const void *b, const char *what, hilal_error *err)
{
    if (a == NULL || b == NULL || a == b)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "FFT %s called with a NULL or in-place buffer", what);
    if (fftwf_alignment_of((float *)(uintptr_t)a) != 0 ||
        fftwf_alignment_of((float *)(uintptr_t)b) != 0)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "FFT %s called with a buffer not from hilal_fft_alloc_*", what);
    return HILAL_OK;
}

hilal_status hilal_fft_r2c(const hilal_fft_plan *plan, float *in, hilal_fft_complex *out,
                           hilal_error *err)
{
    hilal_status st = check_aligned(in, out, "r2c", err);
    if (st != HILAL_OK)
        return st;
    fftwf_execute_dft_r2c(plan->r2c, in, (fftwf_complex *)out);
    return HILAL_OK;
}

hilal_status hilal_fft_c2r(const hilal_fft_plan *plan, hilal_fft_complex *in, float *out,
                           hilal_error *err)
{
    hilal_status st = check_aligned(in, out, "c2r", err);
    if (st != HILAL_OK)
        return st;
    fftwf_execute_dft_c2r(plan->c2r, (fftwf_complex *)in, out);
    return HILAL_OK;
}

float *hilal_fft_alloc_real(long nx, long ny, hilal_error *err)
{
    float *p = NULL;
    if (nx > 0 && ny > 0)
        p = fftwf_malloc(sizeof *p * (size_t)nx * (size_t)ny);
    if (p == NULL)
        hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %ld x %ld FFT array", nx, ny);
    return p;
}

hilal_fft_complex *hilal_fft_alloc_complex(long nx, long ny, hilal_error *err)
{
    hilal_fft_complex *p = NULL;
    if (nx > 0 && ny > 0)
        p = fftwf_malloc(sizeof *p * hilal_fft_ncomplex(nx, ny));
    if (p == NULL)
        hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the spectrum of a %ld x %ld array",
                        nx, ny);
    return p;
}

void hilal_fft_free(void *buf)
{
    if (buf != NULL)
        fftwf_free(buf);
}

hilal_status hilal_fft_wisdom_import(const char *path, int *loaded, hilal_error *err)
{
    if (loaded != NULL)
        *loaded = 0;
    if (access(path, F_OK) != 0)
        return HILAL_OK;
    pthread_mutex_lock(&planner_lock);
    init_threads();
    int ok = fftwf_import_wisdom_from_filename(path);
    pthread_mutex_unlock(&planner_lock);
    if (!ok)
        return hilal_error_set(err, HILAL_ERR_IO,
                               "FFTW wisdom file %s could not be read or is not FFTW single-"
                               "precision wisdom; delete it and it will be made again",
                               path);
    if (loaded != NULL)
        *loaded = 1;
    return HILAL_OK;
}

hilal_status hilal_fft_wisdom_export(const char *path, hilal_error *err)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return hilal_error_set(err, HILAL_ERR_IO, "FFTW wisdom path is too long: %s", path);
    pthread_mutex_lock(&planner_lock);
    init_threads();
    int ok = fftwf_export_wisdom_to_filename(tmp);
    pthread_mutex_unlock(&planner_lock);
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return hilal_error_set(err, HILAL_ERR_IO,
                               "FFTW wisdom could not be written to %s; check the directory "
                               "exists and is writable",
                               path);
    }
    return HILAL_OK;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

hilal_status hilal_fft_time_r2c(long n, int threads, hilal_fft_rigor rigor, int repeats,
                                double *seconds, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    float *r = NULL;
    hilal_fft_complex *c = NULL;
    double *t = NULL;
    const hilal_fft_plan *plan = NULL;

    *seconds = NAN;
    if (repeats < 1)
        repeats = 1;
    st = hilal_fft_plan_get(n, n, threads, rigor, &plan, err);
    if (st != HILAL_OK)
        goto cleanup;
    r = hilal_fft_alloc_real(n, n, err);
    c = hilal_fft_alloc_complex(n, n, err);
    t = malloc(sizeof *t * (size_t)repeats);
    if (r == NULL || c == NULL || t == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory timing a %ld x %ld FFT", n, n);
        goto cleanup;
    }
    /* Deterministic non-trivial content. */
    for (size_t i = 0; i < (size_t)n * (size_t)n; i++)
        r[i] = (float)((i * 2654435761u) % 1000u) * 1e-3f;
    for (int k = 0; k < repeats; k++) {
        double t0 = now_s();
        st = hilal_fft_r2c(plan, r, c, err);
        t[k] = now_s() - t0;
        if (st != HILAL_OK)
            goto cleanup;
    }
    qsort(t, (size_t)repeats, sizeof *t, cmp_double);
    *seconds = t[repeats / 2];
cleanup:
    hilal_fft_free(r);
    hilal_fft_free(c);
    free(t);
    return st;
}

void hilal_fft_cleanup(void)
{
    pthread_mutex_lock(&planner_lock);
    while (cache != NULL) {
        struct hilal_fft_plan *next = cache->next;
        fftwf_destroy_plan(cache->r2c);
        fftwf_destroy_plan(cache->c2r);
        free(cache);
        cache = next;
    }
    if (threads_ready)
        fftwf_cleanup_threads();
    else
        fftwf_cleanup();
    threads_ready = 0;
    threads_failed = 0;
    pthread_mutex_unlock(&planner_lock);
}
