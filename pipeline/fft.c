/* FFTW wrapper: plan cache, aligned buffers, new-array execution, wisdom.
 * The only file that includes fftw3.h. */
#define _DEFAULT_SOURCE /* madvise(MADV_HUGEPAGE), gethostname */
#include "hilal/fft.h"

#include <fftw3.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "hilal/log.h"

struct hilal_fft_plan {
    long nx, ny;
    int threads;
    hilal_fft_rigor rigor;
    int inplace;         /* 1: the plans transform one array in place */
    fftwf_plan r2c, c2r;
    struct hilal_fft_plan *next;
};

/* FFTW's planner, its thread set-up and its wisdom functions are not
 * thread-safe: everything that touches them holds this lock. */
static pthread_mutex_t planner_lock = PTHREAD_MUTEX_INITIALIZER;
static int threads_ready;            /* fftwf_init_threads() succeeded (under the lock) */
static int threads_failed;           /* it failed once: plan single-threaded */
static struct hilal_fft_plan *cache; /* plans made so far (under the lock) */
static double plan_limit_s = -1;     /* FFTW planning time limit, s; < 0: none (under the lock) */
static char *autosave_path;          /* wisdom saved after each measured plan (under the lock) */
static int autosave_warned;          /* a failure to save was logged (under the lock) */

static double now_s(void);

hilal_status hilal_fft_rigor_parse(const char *text, hilal_fft_rigor *out, hilal_error *err)
{
    static const char *const names[] = {"estimate", "measure", "patient", "auto"};
    for (int i = 0; i < 4; i++)
        if (text != NULL && strcasecmp(text, names[i]) == 0) {
            *out = (hilal_fft_rigor)i;
            return HILAL_OK;
        }
    return hilal_error_set(err, HILAL_ERR_CONFIG,
                           "FFT planning rigor '%s' is not one of estimate, measure, patient, auto",
                           text ? text : "(null)");
}

const char *hilal_fft_rigor_name(hilal_fft_rigor rigor)
{
    switch (rigor) {
    case HILAL_FFT_ESTIMATE: return "estimate";
    case HILAL_FFT_MEASURE: return "measure";
    case HILAL_FFT_PATIENT: return "patient";
    case HILAL_FFT_AUTO: return "auto";
    }
    return "?";
}

hilal_fft_rigor hilal_fft_rigor_resolve(hilal_fft_rigor rigor, long nx, long ny)
{
    if (rigor != HILAL_FFT_AUTO)
        return rigor;
    return (double)nx * (double)ny >= (double)HILAL_FFT_AUTO_MIN_VALUES ? HILAL_FFT_MEASURE
                                                                       : HILAL_FFT_ESTIMATE;
}

void hilal_fft_set_plan_time_limit(double seconds)
{
    pthread_mutex_lock(&planner_lock);
    plan_limit_s = seconds > 0 && isfinite(seconds) ? seconds : -1;
    pthread_mutex_unlock(&planner_lock);
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
    case HILAL_FFT_ESTIMATE:
    case HILAL_FFT_AUTO: break;
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

/* Makes the r2c and c2r plans for one size, out of place or in place.
 * Called with planner_lock held. Planning uses scratch arrays of its own so
 * that MEASURE runs never touch caller data. *measured = 1 when a MEASURE
 * or PATIENT plan had to be timed now (0: made from wisdom, or ESTIMATE). */
static hilal_status make_plan(long nx, long ny, int threads, hilal_fft_rigor rigor, int inplace,
                              struct hilal_fft_plan **out, int *measured, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    float *r = NULL;
    fftwf_complex *c = NULL;
    struct hilal_fft_plan *p = NULL;

    *out = NULL;
    init_threads();
    int nthreads = threads_ready ? threads : 1;

    p = calloc(1, sizeof *p);
    c = fftwf_malloc(sizeof *c * hilal_fft_ncomplex(nx, ny));
    r = inplace ? (float *)c : fftwf_malloc(sizeof *r * (size_t)nx * (size_t)ny);
    if (p == NULL || r == NULL || c == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory planning a %ld x %ld FFT", nx, ny);
        goto cleanup;
    }
    if (threads_ready)
        fftwf_plan_with_nthreads(nthreads);
    /* FFTW's time limit bounds each MEASURE/PATIENT planning call */
    fftwf_set_timelimit(rigor == HILAL_FFT_ESTIMATE ? FFTW_NO_TIMELIMIT : plan_limit_s);
    unsigned flags = rigor_flags(rigor);
    *measured = 0;
    /* FFTW's 2-D interface takes the slow (row) dimension first. The wisdom
     * alone first: when it knows both plans nothing is timed. */
    if (rigor != HILAL_FFT_ESTIMATE) {
        p->r2c = fftwf_plan_dft_r2c_2d((int)ny, (int)nx, r, c, flags | FFTW_WISDOM_ONLY);
        p->c2r = fftwf_plan_dft_c2r_2d((int)ny, (int)nx, c, r,
                                       flags | FFTW_DESTROY_INPUT | FFTW_WISDOM_ONLY);
        if (p->r2c == NULL || p->c2r == NULL) {
            if (p->r2c != NULL)
                fftwf_destroy_plan(p->r2c);
            if (p->c2r != NULL)
                fftwf_destroy_plan(p->c2r);
            p->r2c = p->c2r = NULL;
            *measured = 1;
        }
    }
    if (p->r2c == NULL)
        p->r2c = fftwf_plan_dft_r2c_2d((int)ny, (int)nx, r, c, flags);
    if (p->c2r == NULL)
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
    p->inplace = inplace;
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
    if (r != (float *)c)
        fftwf_free(r);
    fftwf_free(c);
    return st;
}

static hilal_status export_locked(const char *path, hilal_error *err);
static void make_parent_dirs(const char *path);

static hilal_status plan_get(long nx, long ny, int threads, hilal_fft_rigor rigor, int inplace,
                             const hilal_fft_plan **out, hilal_error *err)
{
    *out = NULL;
    if (nx <= 0 || ny <= 0 || nx > INT32_MAX || ny > INT32_MAX)
        return hilal_error_set(err, HILAL_ERR_RANGE, "FFT size %ld x %ld is not valid", nx, ny);
    threads = hilal_fft_threads(threads);
    rigor = hilal_fft_rigor_resolve(rigor, nx, ny);
    hilal_status st = HILAL_OK;
    pthread_mutex_lock(&planner_lock);
    /* A cached plan of this size and thread count made with at least the
     * requested rigor serves as well. */
    for (struct hilal_fft_plan *p = cache; p != NULL; p = p->next)
        if (p->nx == nx && p->ny == ny && p->threads == threads && p->rigor >= rigor &&
            p->inplace == inplace) {
            *out = p;
            goto cleanup;
        }
    struct hilal_fft_plan *p = NULL;
    double t0 = now_s();
    int measured = 0;
    st = make_plan(nx, ny, threads, rigor, inplace, &p, &measured, err);
    if (st != HILAL_OK)
        goto cleanup;
    p->next = cache;
    cache = p;
    *out = p;
    if (!measured) {
        hilal_log(HILAL_LOG_DEBUG, "FFT plans made for %ld x %ld%s (%s%s, %d threads)", nx, ny,
                  inplace ? " in place" : "", hilal_fft_rigor_name(rigor),
                  rigor == HILAL_FFT_ESTIMATE ? "" : ", from wisdom", threads);
        goto cleanup;
    }
    /* A measured plan: say why this frame took longer, and keep the result. */
    hilal_log(HILAL_LOG_INFO, "FFT plans made for %ld x %ld%s in %.1f s (%s, %d threads)%s%s", nx,
              ny, inplace ? " in place" : "", now_s() - t0, hilal_fft_rigor_name(rigor), threads,
              autosave_path ? "; wisdom saved to " : "", autosave_path ? autosave_path : "");
    if (autosave_path != NULL) {
        hilal_error e = {0};
        make_parent_dirs(autosave_path);
        if (export_locked(autosave_path, &e) != HILAL_OK && !autosave_warned) {
            autosave_warned = 1;
            hilal_log(HILAL_LOG_WARN, "%s; plans will be measured again in the next run", e.msg);
        }
    }
cleanup:
    pthread_mutex_unlock(&planner_lock);
    return st;
}

hilal_status hilal_fft_plan_get(long nx, long ny, int threads, hilal_fft_rigor rigor,
                                const hilal_fft_plan **out, hilal_error *err)
{
    return plan_get(nx, ny, threads, rigor, 0, out, err);
}

hilal_status hilal_fft_plan_get_inplace(long nx, long ny, int threads, hilal_fft_rigor rigor,
                                        const hilal_fft_plan **out, hilal_error *err)
{
    return plan_get(nx, ny, threads, rigor, 1, out, err);
}

long hilal_fft_inplace_stride(long nx) { return 2 * (nx / 2 + 1); }

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
    if (plan->inplace)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "FFT r2c called with an in-place plan");
    hilal_status st = check_aligned(in, out, "r2c", err);
    if (st != HILAL_OK)
        return st;
    fftwf_execute_dft_r2c(plan->r2c, in, (fftwf_complex *)out);
    return HILAL_OK;
}

hilal_status hilal_fft_c2r(const hilal_fft_plan *plan, hilal_fft_complex *in, float *out,
                           hilal_error *err)
{
    if (plan->inplace)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "FFT c2r called with an in-place plan");
    hilal_status st = check_aligned(in, out, "c2r", err);
    if (st != HILAL_OK)
        return st;
    fftwf_execute_dft_c2r(plan->c2r, (fftwf_complex *)in, out);
    return HILAL_OK;
}

/* The same checks for an in-place transform: an in-place plan and a buffer
 * with FFTW's alignment. */
static hilal_status check_inplace(const hilal_fft_plan *plan, const void *buf, const char *what,
                                  hilal_error *err)
{
    if (!plan->inplace)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "FFT %s in place called with an out-of-place plan", what);
    if (buf == NULL || fftwf_alignment_of((float *)(uintptr_t)buf) != 0)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "FFT %s in place called with a NULL buffer or one not from "
                               "hilal_fft_alloc_complex",
                               what);
    return HILAL_OK;
}

hilal_status hilal_fft_r2c_inplace(const hilal_fft_plan *plan, hilal_fft_complex *buf,
                                   hilal_error *err)
{
    hilal_status st = check_inplace(plan, buf, "r2c", err);
    if (st != HILAL_OK)
        return st;
    fftwf_execute_dft_r2c(plan->r2c, (float *)buf, (fftwf_complex *)buf);
    return HILAL_OK;
}

hilal_status hilal_fft_c2r_inplace(const hilal_fft_plan *plan, hilal_fft_complex *buf,
                                   hilal_error *err)
{
    hilal_status st = check_inplace(plan, buf, "c2r", err);
    if (st != HILAL_OK)
        return st;
    fftwf_execute_dft_c2r(plan->c2r, (fftwf_complex *)buf, (float *)buf);
    return HILAL_OK;
}

/* Asks for transparent huge pages behind the 2 MiB-aligned interior of a
 * large buffer: a 2-D transform walks its arrays along columns too, and
 * with 4 KiB pages nearly every access of such a pass misses the TLB
 * (measured: 4200 x 4200 transforms 25-30% faster). Only advice: where the
 * system has no huge pages nothing changes. */
static void advise_huge(void *p, size_t bytes)
{
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (p == NULL || bytes < 4 * huge)
        return;
    uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t e = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (e > a)
        (void)madvise((void *)a, (size_t)(e - a), MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

float *hilal_fft_alloc_real(long nx, long ny, hilal_error *err)
{
    float *p = NULL;
    size_t bytes = sizeof *p * (size_t)nx * (size_t)ny;
    if (nx > 0 && ny > 0)
        p = fftwf_malloc(bytes);
    if (p == NULL)
        hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %ld x %ld FFT array", nx, ny);
    else
        advise_huge(p, bytes);
    return p;
}

hilal_fft_complex *hilal_fft_alloc_complex(long nx, long ny, hilal_error *err)
{
    hilal_fft_complex *p = NULL;
    size_t bytes = sizeof *p * hilal_fft_ncomplex(nx, ny);
    if (nx > 0 && ny > 0)
        p = fftwf_malloc(bytes);
    if (p == NULL)
        hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the spectrum of a %ld x %ld array",
                        nx, ny);
    else
        advise_huge(p, bytes);
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

/* Saves the wisdom to path, merged with what the file holds, through a
 * temporary file renamed over it. Called with planner_lock held. */
static hilal_status export_locked(const char *path, hilal_error *err)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return hilal_error_set(err, HILAL_ERR_IO, "FFTW wisdom path is too long: %s", path);
    init_threads();
    /* Another process may have added plans of other sizes since this one
     * read the file: keep them. A file FFTW cannot read leaves the wisdom
     * unchanged and is replaced. */
    if (access(path, R_OK) == 0)
        (void)fftwf_import_wisdom_from_filename(path);
    int ok = fftwf_export_wisdom_to_filename(tmp);
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return hilal_error_set(err, HILAL_ERR_IO,
                               "FFTW wisdom could not be written to %s; check the directory "
                               "exists and is writable",
                               path);
    }
    return HILAL_OK;
}

hilal_status hilal_fft_wisdom_export(const char *path, hilal_error *err)
{
    pthread_mutex_lock(&planner_lock);
    hilal_status st = export_locked(path, err);
    pthread_mutex_unlock(&planner_lock);
    return st;
}

int hilal_fft_wisdom_default_path(char *buf, size_t size)
{
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    char host[256] = "";
    if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0')
        strcpy(host, "localhost");
    host[sizeof host - 1] = '\0';
    /* a host name is a file name component: no '/' */
    for (char *c = host; *c != '\0'; c++)
        if (*c == '/')
            *c = '_';
    int n;
    /* the XDG base directory specification ignores relative paths */
    if (xdg != NULL && xdg[0] == '/')
        n = snprintf(buf, size, "%s/hilal/fftwf-wisdom-%s", xdg, host);
    else if (home != NULL && home[0] == '/')
        n = snprintf(buf, size, "%s/.cache/hilal/fftwf-wisdom-%s", home, host);
    else
        return 0;
    return n > 0 && (size_t)n < size;
}

/* Creates the directories above path (mkdir -p of its dirname). */
static void make_parent_dirs(const char *path)
{
    char dir[4096];
    if (snprintf(dir, sizeof dir, "%s", path) >= (int)sizeof dir)
        return;
    char *slash = strrchr(dir, '/');
    if (slash == NULL || slash == dir)
        return;
    *slash = '\0';
    for (char *c = dir + 1; *c != '\0'; c++)
        if (*c == '/') {
            *c = '\0';
            (void)mkdir(dir, 0755);
            *c = '/';
        }
    (void)mkdir(dir, 0755);
}

void hilal_fft_wisdom_autosave(const char *path)
{
    pthread_mutex_lock(&planner_lock);
    free(autosave_path);
    autosave_path = NULL;
    autosave_warned = 0;
    if (path != NULL && path[0] != '\0')
        autosave_path = strdup(path);
    pthread_mutex_unlock(&planner_lock);
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
    free(autosave_path);
    autosave_path = NULL;
    autosave_warned = 0;
    plan_limit_s = -1;
    pthread_mutex_unlock(&planner_lock);
}
