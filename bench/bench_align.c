/* Alignment benchmark and real-pair report.
 *
 *   bench_align [--size N] [--threads T] [--repeat R]
 *       times the Lanczos3 resampling of an N x N reference (default 4096)
 *       through a 20.3/-7.6 px, 0.3 deg transform (pixels, variance, mask,
 *       sky), median of R runs (default 3), and the transform grid;
 *   bench_align SCI.fits REF.fits [--threads T] [--set SECTION.KEY=VALUE]...
 *       runs ingest, background, stars and align on a real pair and prints
 *       what the alignment found (first guess, matches, offset, rotation,
 *       registration RMS, coverage) with each stage's wall time.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hilal/align.h"
#include "hilal/hilal.h"
#include "resample.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void log_to_stderr(hilal_log_level level, const char *msg, void *user)
{
    (void)user;
    static const char *names[] = {"error", "warning", "info", "debug"};
    fprintf(stderr, "%s: %s\n", names[level], msg);
}

/* Science -> reference: 20.3/-7.6 px offset and 0.3 deg rotation about the
 * centre (FITS pixels). */
typedef struct rot {
    double cx, cy;
} rot;

static hilal_status rot_map(void *user, int n, const double *x, const double *y, double *u,
                            double *v, hilal_error *err)
{
    (void)err;
    const rot *r = user;
    double th = 0.3 * 3.14159265358979323846 / 180.0, c = cos(th), s = sin(th);
    for (int k = 0; k < n; k++) {
        double dx = x[k] - r->cx, dy = y[k] - r->cy;
        u[k] = r->cx + 20.3 + c * dx - s * dy;
        v[k] = r->cy - 7.6 + s * dx + c * dy;
    }
    return HILAL_OK;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int bench_resample(long n, int threads, int repeat)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *ref = hilal_image_new(n, n, &err);
    if (ref == NULL || hilal_image_alloc_var(ref, &err) != HILAL_OK ||
        hilal_image_alloc_sky(ref, &err) != HILAL_OK) {
        fprintf(stderr, "%s\n", err.msg);
        hilal_image_free(ref);
        return 1;
    }
    /* Noise-like pixels, a few masked ones. */
    uint64_t s = 88172645463325252ull;
    for (long k = 0; k < n * n; k++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ref->pix[k] = 100.0f + (float)((s >> 40) & 0xffff) / 6553.6f;
        ref->var[k] = 25.0f;
        ref->sky[k] = 100.0f;
        if ((s & 0xfff) == 0)
            ref->mask[k] = HILAL_MASK_SAT;
    }
    rot r = {0.5 * (double)(n + 1), 0.5 * (double)(n + 1)};
    double t0 = now_s();
    hilal_pixgrid g;
    if (hilal_pixgrid_build(n, n, rot_map, &r, 64, 1e-3, &g, &err) != HILAL_OK) {
        fprintf(stderr, "%s\n", err.msg);
        hilal_image_free(ref);
        return 1;
    }
    double tg = now_s() - t0;
    double *t = calloc((size_t)repeat, sizeof *t), *c = calloc((size_t)repeat, sizeof *c);
    hilal_resample_stats st = {0};
    for (int i = 0; i < repeat; i++) {
        hilal_image *out = NULL;
        t0 = now_s();
        double c0 = cpu_s();
        if (hilal_resample_lanczos3(ref, &g, 0.01, threads, &out, &st, &err) != HILAL_OK) {
            fprintf(stderr, "%s\n", err.msg);
            break;
        }
        t[i] = now_s() - t0;
        c[i] = cpu_s() - c0;
        hilal_image_free(out);
    }
    qsort(t, (size_t)repeat, sizeof *t, cmp_double);
    qsort(c, (size_t)repeat, sizeof *c, cmp_double);
    printf("resample %ld x %ld, %d threads: grid %.4f s (step %ld, max err %.1e px), resample "
           "median %.3f s wall, %.3f s CPU, of %d (pix+var+mask+sky), coverage %.4f, mean sum "
           "w^2 %.4f\n",
           n, n, threads, tg, g.step, g.max_err_px, t[repeat / 2], c[repeat / 2], repeat,
           (double)st.ncovered / ((double)n * (double)n), st.mean_w2);
    free(t);
    free(c);
    hilal_pixgrid_clear(&g);
    hilal_image_free(ref);
    return 0;
}

static int report_pair(const char *sci, const char *ref, int threads, char **sets, int nsets)
{
    hilal_log_set_handler(log_to_stderr, NULL, HILAL_LOG_INFO);
    hilal_error err;
    hilal_error_clear(&err);
    hilal_config *cfg = hilal_registry_config_new(&err);
    if (cfg == NULL) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    char tv[32];
    snprintf(tv, sizeof tv, "%d", threads);
    hilal_config_set(cfg, "pipeline.threads", tv, "bench", &err);
    for (int i = 0; i < nsets; i++)
        if (hilal_config_set_arg(cfg, sets[i], &err) != HILAL_OK) {
            fprintf(stderr, "%s\n", err.msg);
            hilal_config_free(cfg);
            return 2;
        }
    const char *names[] = {"ingest", "background", "stars", "align"};
    const hilal_stage *stages[4];
    for (int i = 0; i < 4; i++) {
        stages[i] = hilal_registry_find(names[i]);
        if (stages[i] == NULL) {
            fprintf(stderr, "stage %s is not registered\n", names[i]);
            hilal_config_free(cfg);
            return 1;
        }
    }
    hilal_runner *run = NULL;
    int rc = 1;
    hilal_frame f;
    hilal_frame_init(&f);
    if (hilal_runner_new(cfg, stages, 4, &run, &err) != HILAL_OK) {
        fprintf(stderr, "%s\n", err.msg);
        goto cleanup;
    }
    snprintf(f.frame_id, sizeof f.frame_id, "bench");
    snprintf(f.sci_path, sizeof f.sci_path, "%s", sci);
    snprintf(f.ref_path, sizeof f.ref_path, "%s", ref);
    if (hilal_runner_run(run, &f, &err) != HILAL_OK) {
        fprintf(stderr, "%s\n", err.msg);
        goto cleanup;
    }
    printf("science %s (%ld x %ld, %zu stars), reference %s (%zu stars on the science grid)\n",
           sci, f.sci->nx, f.sci->ny, f.sci_stars.n, ref, f.ref_stars.n);
    printf("registration rms (%.4f, %.4f) px; masked NODATA %zu px; stage times:", f.reg_rms_x_px,
           f.reg_rms_y_px, hilal_image_count_mask(f.ref, HILAL_MASK_NODATA));
    for (int i = 0; i < 4; i++)
        printf(" %s %.3f s", names[i], f.stage_seconds[i]);
    printf("\n");
    rc = 0;
cleanup:
    hilal_frame_clear(&f);
    hilal_runner_free(run);
    hilal_config_free(cfg);
    return rc;
}

int main(int argc, char **argv)
{
    long n = 4096;
    int threads = 2, repeat = 3;
    const char *files[2] = {NULL, NULL};
    int nf = 0, nsets = 0;
    char **sets = calloc((size_t)argc + 1, sizeof *sets);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--size") == 0 && i + 1 < argc)
            n = atol(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc)
            repeat = atoi(argv[++i]);
        else if (strcmp(argv[i], "--set") == 0 && i + 1 < argc)
            sets[nsets++] = argv[++i];
        else if (nf < 2)
            files[nf++] = argv[i];
        else {
            fprintf(stderr, "usage: bench_align [--size N] [--threads T] [--repeat R] "
                            "[SCI.fits REF.fits [--set SECTION.KEY=VALUE]...]\n");
            free(sets);
            return 2;
        }
    }
    if (repeat < 1)
        repeat = 1;
    int rc = nf == 2 ? report_pair(files[0], files[1], threads, sets, nsets)
                     : bench_resample(n, threads, repeat);
    free(sets);
    return rc;
}
