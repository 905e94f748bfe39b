/* The FFTW wrapper: sizes, plan cache, transforms against direct DFTs,
 * in-place transforms, concurrent execution of one cached plan, error
 * paths, planning rigor, wisdom files (merging, autosave, damaged files,
 * the default path). */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "hilal/fft.h"
#include "testutil.h"

static int is_7smooth(long n)
{
    static const int p[] = {2, 3, 5, 7};
    for (int i = 0; i < 4; i++)
        while (n % p[i] == 0)
            n /= p[i];
    return n == 1;
}

static void test_good_size(void)
{
    CHECK(hilal_fft_good_size(1) == 1, "1 -> %ld", hilal_fft_good_size(1));
    CHECK(hilal_fft_good_size(4096) == 4096, "4096 -> %ld", hilal_fft_good_size(4096));
    CHECK(hilal_fft_good_size(4097) == 4116, "4097 -> %ld (4116 = 2^2 3 7^3)",
          hilal_fft_good_size(4097));
    CHECK(hilal_fft_good_size(11) == 12, "11 -> %ld", hilal_fft_good_size(11));
    CHECK(hilal_fft_good_size(4142) == 4200, "4142 -> %ld", hilal_fft_good_size(4142));
    /* every answer is 7-smooth and no 7-smooth number is skipped */
    for (long n = 2; n < 3000; n++) {
        long g = hilal_fft_good_size(n);
        int ok = g >= n && is_7smooth(g);
        for (long m = n; m < g && ok; m++)
            if (is_7smooth(m))
                ok = 0;
        if (!ok) {
            CHECK(ok, "good_size(%ld) = %ld is not the next 7-smooth size", n, g);
            break;
        }
    }
    CHECK(hilal_fft_threads(3) == 3, "explicit thread count kept");
    CHECK(hilal_fft_threads(0) >= 1, "0 threads means the processors: %d", hilal_fft_threads(0));
}

/* r2c against a direct DFT, and c2r(r2c(a)) = nx ny a, on an odd x even
 * size (exercises the non-Nyquist branch of the half spectrum). */
static void test_transform(void)
{
    hilal_error err = {0};
    const long nx = 15, ny = 12;
    const hilal_fft_plan *plan = NULL, *again = NULL;
    CHECK_OK(hilal_fft_plan_get(nx, ny, 1, HILAL_FFT_ESTIMATE, &plan, &err), &err);
    CHECK_OK(hilal_fft_plan_get(nx, ny, 1, HILAL_FFT_ESTIMATE, &again, &err), &err);
    CHECK(plan != NULL && plan == again, "the second request returns the cached plan");
    long px, py;
    hilal_fft_plan_size(plan, &px, &py);
    CHECK(px == nx && py == ny, "plan size %ld x %ld", px, py);

    float *a = hilal_fft_alloc_real(nx, ny, &err);
    float *b = hilal_fft_alloc_real(nx, ny, &err);
    hilal_fft_complex *c = hilal_fft_alloc_complex(nx, ny, &err);
    hilal_status st;
    CHECK(hilal_fft_ncomplex(nx, ny) == (size_t)(ny * (nx / 2 + 1)), "half-spectrum size");
    for (long i = 0; i < nx * ny; i++)
        a[i] = (float)sin(0.37 * (double)i) + 0.25f * (float)(i % 7);
    st = hilal_fft_r2c(plan, a, c, &err);
    CHECK_OK(st, &err);
    double maxerr = 0;
    for (long v = 0; v < ny; v++)
        for (long u = 0; u <= nx / 2; u++) {
            double re = 0, im = 0;
            for (long y = 0; y < ny; y++)
                for (long x = 0; x < nx; x++) {
                    double ph = -2 * 3.14159265358979323846 * ((double)(u * x) / nx + (double)(v * y) / ny);
                    re += a[y * nx + x] * cos(ph);
                    im += a[y * nx + x] * sin(ph);
                }
            size_t k = (size_t)(v * (nx / 2 + 1) + u);
            double e = hypot(c[k][0] - re, c[k][1] - im);
            if (e > maxerr)
                maxerr = e;
        }
    CHECK(maxerr < 1e-3, "r2c matches the direct DFT (max error %.2e)", maxerr);
    /* (CHECK_OK evaluates its argument twice: call first, then check) */
    st = hilal_fft_c2r(plan, c, b, &err);
    CHECK_OK(st, &err);
    double rt = 0;
    for (long i = 0; i < nx * ny; i++)
        rt = fmax(rt, fabs(b[i] / (double)(nx * ny) - a[i]));
    CHECK(rt < 1e-5, "c2r(r2c(a)) / (nx ny) = a (max error %.2e)", rt);

    /* Error paths: in-place and misaligned buffers, bad sizes. */
    hilal_error e2 = {0};
    CHECK(hilal_fft_r2c(plan, a, (hilal_fft_complex *)a, &e2) == HILAL_ERR_INTERNAL,
          "in-place use is refused");
    CHECK(strstr(e2.msg, "in-place") != NULL, "message: %s", e2.msg);
    hilal_error e3 = {0};
    CHECK(hilal_fft_r2c(plan, a + 1, c, &e3) == HILAL_ERR_INTERNAL, "misaligned buffer refused");
    CHECK(strstr(e3.msg, "hilal_fft_alloc") != NULL, "message: %s", e3.msg);
    hilal_error e4 = {0};
    const hilal_fft_plan *bad = NULL;
    CHECK(hilal_fft_plan_get(0, 10, 1, HILAL_FFT_ESTIMATE, &bad, &e4) == HILAL_ERR_RANGE && bad == NULL,
          "zero size refused");
    hilal_fft_free(a);
    hilal_fft_free(b);
    hilal_fft_free(c);
    hilal_fft_free(NULL);
}

/* In place: the same spectrum as out of place, in the same buffer, and the
 * round trip; plans of the other kind are refused. */
static void test_inplace(void)
{
    hilal_error err = {0};
    const long nx = 18, ny = 10, rs = hilal_fft_inplace_stride(nx);
    CHECK(rs == 20, "in-place row stride %ld", rs);
    const hilal_fft_plan *op = NULL, *ip = NULL;
    CHECK_OK(hilal_fft_plan_get(nx, ny, 1, HILAL_FFT_ESTIMATE, &op, &err), &err);
    CHECK_OK(hilal_fft_plan_get_inplace(nx, ny, 1, HILAL_FFT_ESTIMATE, &ip, &err), &err);
    CHECK(op != NULL && ip != NULL && op != ip, "in-place plans are cached apart");
    float *a = hilal_fft_alloc_real(nx, ny, &err);
    hilal_fft_complex *c = hilal_fft_alloc_complex(nx, ny, &err);
    hilal_fft_complex *b = hilal_fft_alloc_complex(nx, ny, &err);
    if (a == NULL || c == NULL || b == NULL)
        goto done;
    float *br = (float *)b;
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            a[y * nx + x] = (float)sin(0.7 * (double)x + 0.3 * (double)(y * y)) + 0.1f * (float)x;
            br[y * rs + x] = a[y * nx + x];
        }
    hilal_status st = hilal_fft_r2c(op, a, c, &err);
    CHECK_OK(st, &err);
    st = hilal_fft_r2c_inplace(ip, b, &err);
    CHECK_OK(st, &err);
    double d = 0;
    for (size_t k = 0; k < hilal_fft_ncomplex(nx, ny); k++)
        d = fmax(d, hypot(b[k][0] - c[k][0], b[k][1] - c[k][1]));
    CHECK(d < 1e-4, "in-place spectrum = out-of-place spectrum (max difference %.2e)", d);
    st = hilal_fft_c2r_inplace(ip, b, &err);
    CHECK_OK(st, &err);
    double rt = 0;
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++)
            rt = fmax(rt, fabs(br[y * rs + x] / (double)(nx * ny) - a[y * nx + x]));
    CHECK(rt < 1e-5, "in-place round trip (max error %.2e)", rt);
    hilal_error e1 = {0}, e2 = {0}, e3 = {0};
    CHECK(hilal_fft_r2c(ip, a, c, &e1) == HILAL_ERR_INTERNAL, "out-of-place call with an in-place plan refused");
    CHECK(hilal_fft_r2c_inplace(op, b, &e2) == HILAL_ERR_INTERNAL &&
              strstr(e2.msg, "out-of-place plan") != NULL,
          "in-place call with an out-of-place plan refused: %s", e2.msg);
    CHECK(hilal_fft_c2r_inplace(ip, NULL, &e3) == HILAL_ERR_INTERNAL, "NULL buffer refused");
done:
    hilal_fft_free(a);
    hilal_fft_free(b);
    hilal_fft_free(c);
}

/* Several threads execute the same cached plan on their own buffers at the
 * same time (FFTW's new-array execute is thread-safe) and get the answer a
 * single thread gets. */
typedef struct conc_job {
    const hilal_fft_plan *plan;
    long n;
    int seed;
    double maxdiff;
    hilal_status st;
} conc_job;

static void fill(float *a, long n, int seed)
{
    for (long i = 0; i < n * n; i++)
        a[i] = (float)cos(0.011 * (double)(i + 1) * (seed + 1)) + (float)((i * 31 + seed) % 17) * 0.1f;
}

static void *conc_thread(void *arg)
{
    conc_job *j = arg;
    hilal_error err = {0};
    float *a = hilal_fft_alloc_real(j->n, j->n, &err);
    float *r = hilal_fft_alloc_real(j->n, j->n, &err);
    hilal_fft_complex *c = hilal_fft_alloc_complex(j->n, j->n, &err);
    j->st = HILAL_ERR_NOMEM;
    if (a != NULL && r != NULL && c != NULL) {
        fill(a, j->n, j->seed);
        j->maxdiff = 0;
        for (int rep = 0; rep < 5; rep++) {
            j->st = hilal_fft_r2c(j->plan, a, c, &err);
            if (j->st == HILAL_OK)
                j->st = hilal_fft_c2r(j->plan, c, r, &err);
            for (long i = 0; i < j->n * j->n; i++)
                j->maxdiff = fmax(j->maxdiff, fabs(r[i] / (double)(j->n * j->n) - a[i]));
        }
    }
    hilal_fft_free(a);
    hilal_fft_free(r);
    hilal_fft_free(c);
    return NULL;
}

static void test_concurrent(void)
{
    hilal_error err = {0};
    const long n = 96;
    const hilal_fft_plan *plan = NULL;
    CHECK_OK(hilal_fft_plan_get(n, n, 2, HILAL_FFT_MEASURE, &plan, &err), &err);
    /* an ESTIMATE request is served by the better MEASURE plan */
    const hilal_fft_plan *est = NULL;
    CHECK_OK(hilal_fft_plan_get(n, n, 2, HILAL_FFT_ESTIMATE, &est, &err), &err);
    CHECK(est == plan, "an estimate request reuses the cached measure plan");
    conc_job jobs[4];
    pthread_t th[4];
    for (int t = 0; t < 4; t++) {
        jobs[t] = (conc_job){plan, n, t, 1e9, HILAL_ERR_INTERNAL};
        pthread_create(&th[t], NULL, conc_thread, &jobs[t]);
    }
    for (int t = 0; t < 4; t++) {
        pthread_join(th[t], NULL);
        CHECK(jobs[t].st == HILAL_OK, "thread %d status %d", t, (int)jobs[t].st);
        CHECK(jobs[t].maxdiff < 1e-5, "thread %d round trip error %.2e", t, jobs[t].maxdiff);
    }
}

static void test_rigor_and_wisdom(void)
{
    hilal_error err = {0};
    hilal_fft_rigor r = HILAL_FFT_ESTIMATE;
    CHECK_OK(hilal_fft_rigor_parse("Measure", &r, &err), &err);
    CHECK(r == HILAL_FFT_MEASURE, "measure parsed");
    CHECK(strcmp(hilal_fft_rigor_name(HILAL_FFT_PATIENT), "patient") == 0, "name");
    hilal_error e2 = {0};
    CHECK(hilal_fft_rigor_parse("fast", &r, &e2) == HILAL_ERR_CONFIG, "unknown rigor refused");
    CHECK(strstr(e2.msg, "estimate, measure, patient, auto") != NULL, "message lists values: %s",
          e2.msg);
    CHECK_OK(hilal_fft_rigor_parse("AUTO", &r, &err), &err);
    CHECK(r == HILAL_FFT_AUTO && strcmp(hilal_fft_rigor_name(r), "auto") == 0, "auto parsed");
    /* auto: measured plans from 2048 x 2048 up, instant ones below */
    CHECK(hilal_fft_rigor_resolve(HILAL_FFT_AUTO, 2048, 2048) == HILAL_FFT_MEASURE &&
              hilal_fft_rigor_resolve(HILAL_FFT_AUTO, 4320, 4320) == HILAL_FFT_MEASURE &&
              hilal_fft_rigor_resolve(HILAL_FFT_AUTO, 2048, 2047) == HILAL_FFT_ESTIMATE &&
              hilal_fft_rigor_resolve(HILAL_FFT_AUTO, 540, 540) == HILAL_FFT_ESTIMATE,
          "auto resolves by size");
    CHECK(hilal_fft_rigor_resolve(HILAL_FFT_ESTIMATE, 8192, 8192) == HILAL_FFT_ESTIMATE &&
              hilal_fft_rigor_resolve(HILAL_FFT_PATIENT, 8, 8) == HILAL_FFT_PATIENT,
          "explicit rigors kept");
    const hilal_fft_plan *pa = NULL, *pe = NULL;
    CHECK_OK(hilal_fft_plan_get(20, 12, 1, HILAL_FFT_AUTO, &pa, &err), &err);
    CHECK_OK(hilal_fft_plan_get(20, 12, 1, HILAL_FFT_ESTIMATE, &pe, &err), &err);
    CHECK(pa != NULL && pa == pe, "a small auto plan is the estimate plan");

    char dir[1024], path[1200];
    hilal_test_tmpdir("wisdom", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/fftw.wisdom", dir);
    int loaded = -1;
    CHECK_OK(hilal_fft_wisdom_import(path, &loaded, &err), &err);
    CHECK(loaded == 0, "a missing wisdom file is not an error");
    CHECK_OK(hilal_fft_wisdom_export(path, &err), &err);
    struct stat sb;
    CHECK(stat(path, &sb) == 0 && sb.st_size > 0, "wisdom written to %s", path);
    /* as in a new process: FFTW's state (and thread set-up) gone; the
     * wisdom of the threaded MEASURE plan above names threaded solvers,
     * which the import must find registered */
    hilal_fft_cleanup();
    CHECK_OK(hilal_fft_wisdom_import(path, &loaded, &err), &err);
    CHECK(loaded == 1, "wisdom read back");
    FILE *f = fopen(path, "w");
    if (f != NULL) {
        fputs("not wisdom\n", f);
        fclose(f);
    }
    hilal_error e3 = {0};
    CHECK(hilal_fft_wisdom_import(path, &loaded, &e3) == HILAL_ERR_IO, "malformed wisdom refused");
    CHECK(strstr(e3.msg, path) != NULL, "message names the file: %s", e3.msg);
    hilal_error e4 = {0};
    CHECK(hilal_fft_wisdom_export("/nonexistent-dir/x.wisdom", &e4) == HILAL_ERR_IO,
          "unwritable wisdom path refused");
    /* a failed import leaves the wisdom held so far as it was */
    char good[1200], again[1200];
    snprintf(good, sizeof good, "%s/good.wisdom", dir);
    snprintf(again, sizeof again, "%s/again.wisdom", dir);
    const hilal_fft_plan *mp = NULL;
    CHECK_OK(hilal_fft_plan_get(48, 40, 1, HILAL_FFT_MEASURE, &mp, &err), &err);
    CHECK_OK(hilal_fft_wisdom_export(good, &err), &err);
    hilal_error e5 = {0};
    CHECK(hilal_fft_wisdom_import(path, &loaded, &e5) == HILAL_ERR_IO, "damaged file refused again");
    CHECK_OK(hilal_fft_wisdom_export(again, &err), &err);
    struct stat s1, s2;
    CHECK(stat(good, &s1) == 0 && stat(again, &s2) == 0 && s1.st_size == s2.st_size &&
              s1.st_size > 0,
          "wisdom unchanged by the damaged file (%ld and %ld bytes)", (long)s1.st_size,
          (long)s2.st_size);
    /* export merges with the file: a new process (cleanup) measuring another
     * size and saving to good.wisdom keeps the first size's wisdom too */
    hilal_fft_cleanup();
    char only[1200];
    snprintf(only, sizeof only, "%s/only.wisdom", dir);
    CHECK_OK(hilal_fft_plan_get(36, 30, 1, HILAL_FFT_MEASURE, &mp, &err), &err);
    CHECK_OK(hilal_fft_wisdom_export(only, &err), &err);
    CHECK_OK(hilal_fft_wisdom_export(good, &err), &err);
    struct stat s3, s4;
    CHECK(stat(only, &s3) == 0 && stat(good, &s4) == 0 && s4.st_size > s3.st_size &&
              s4.st_size > s1.st_size,
          "merged wisdom (%ld bytes) holds more than either (%ld, %ld)", (long)s4.st_size,
          (long)s3.st_size, (long)s1.st_size);

    /* autosave: a measured plan writes the wisdom at once, creating the
     * directories; estimate plans do not */
    char auto_path[1200];
    snprintf(auto_path, sizeof auto_path, "%s/a/b/fftwf-wisdom", dir);
    hilal_fft_wisdom_autosave(auto_path);
    CHECK_OK(hilal_fft_plan_get(30, 22, 1, HILAL_FFT_ESTIMATE, &mp, &err), &err);
    CHECK(stat(auto_path, &s1) != 0, "no wisdom saved for an estimate plan");
    hilal_fft_set_plan_time_limit(5.0);
    CHECK_OK(hilal_fft_plan_get(32, 24, 2, HILAL_FFT_MEASURE, &mp, &err), &err);
    CHECK(stat(auto_path, &s1) == 0 && s1.st_size > 0, "wisdom saved to %s after a measured plan",
          auto_path);
    hilal_fft_set_plan_time_limit(0);
    hilal_fft_wisdom_autosave(NULL);
    CHECK_OK(hilal_fft_plan_get(34, 24, 2, HILAL_FFT_MEASURE, &mp, &err), &err);
    CHECK(stat(auto_path, &s2) == 0 && s2.st_size == s1.st_size, "autosave off again");
    /* the measured plan works */
    float *ra = hilal_fft_alloc_real(32, 24, &err), *rb = hilal_fft_alloc_real(32, 24, &err);
    hilal_fft_complex *rc = hilal_fft_alloc_complex(32, 24, &err);
    if (ra != NULL && rb != NULL && rc != NULL) {
        const hilal_fft_plan *p32 = NULL;
        CHECK_OK(hilal_fft_plan_get(32, 24, 2, HILAL_FFT_MEASURE, &p32, &err), &err);
        for (long i = 0; i < 32 * 24; i++)
            ra[i] = (float)cos(0.05 * (double)i) + 0.01f * (float)(i % 13);
        hilal_status st = hilal_fft_r2c(p32, ra, rc, &err);
        if (st == HILAL_OK)
            st = hilal_fft_c2r(p32, rc, rb, &err);
        CHECK_OK(st, &err);
        double rt = 0;
        for (long i = 0; i < 32 * 24; i++)
            rt = fmax(rt, fabs(rb[i] / (32.0 * 24.0) - ra[i]));
        CHECK(rt < 1e-5, "time-limited measured plan round trip %.2e", rt);
    }
    hilal_fft_free(ra);
    hilal_fft_free(rb);
    hilal_fft_free(rc);

    double sec = -1;
    CHECK_OK(hilal_fft_time_r2c(128, 1, HILAL_FFT_ESTIMATE, 3, &sec, &err), &err);
    CHECK(sec > 0 && sec < 1, "timing of a 128^2 r2c: %.2e s", sec);
}

/* The default wisdom file: XDG_CACHE_HOME (absolute only), else HOME/.cache,
 * then hilal/fftwf-wisdom-<host>. */
static void test_default_path(void)
{
    char *xdg = getenv("XDG_CACHE_HOME") ? strdup(getenv("XDG_CACHE_HOME")) : NULL;
    char *home = getenv("HOME") ? strdup(getenv("HOME")) : NULL;
    char buf[1024];
    setenv("XDG_CACHE_HOME", "/cache/x", 1);
    CHECK(hilal_fft_wisdom_default_path(buf, sizeof buf) &&
              strncmp(buf, "/cache/x/hilal/fftwf-wisdom-", 28) == 0 && strlen(buf) > 28,
          "XDG path: %s", buf);
    setenv("XDG_CACHE_HOME", "relative", 1);
    setenv("HOME", "/home/obs", 1);
    CHECK(hilal_fft_wisdom_default_path(buf, sizeof buf) &&
              strncmp(buf, "/home/obs/.cache/hilal/fftwf-wisdom-", 36) == 0,
          "HOME path (relative XDG ignored): %s", buf);
    CHECK(!hilal_fft_wisdom_default_path(buf, 20), "too small a buffer");
    unsetenv("XDG_CACHE_HOME");
    unsetenv("HOME");
    CHECK(!hilal_fft_wisdom_default_path(buf, sizeof buf), "no directory without XDG/HOME");
    if (xdg != NULL)
        setenv("XDG_CACHE_HOME", xdg, 1);
    if (home != NULL)
        setenv("HOME", home, 1);
    free(xdg);
    free(home);
}

int main(void)
{
    test_good_size();
    test_transform();
    test_inplace();
    test_concurrent();
    test_rigor_and_wisdom();
    test_default_path();
    hilal_fft_cleanup();
    /* usable again after a cleanup */
    hilal_error err = {0};
    double sec = -1;
    CHECK_OK(hilal_fft_time_r2c(64, 2, HILAL_FFT_ESTIMATE, 1, &sec, &err), &err);
    hilal_fft_cleanup();
    return hilal_test_finish();
}
