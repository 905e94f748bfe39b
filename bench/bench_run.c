/* Benchmark of a whole `hilal run`: per-stage wall time and peak memory for
 * simulated pairs of several sizes, and the time of one single-precision
 * FFTW real-to-complex transform of a 4096 x 4096 array on the same machine.
 *
 * Usage: bench_run [--sizes 1024,2048,4096] [--threads N] [--dir DIR] [--repeats R] [--keep] [--archive-dir DIR]
 *
 * Each size runs in its own child process so that its peak resident memory
 * (getrusage ru_maxrss) is the pipeline's alone: one child simulates the pair
 * to disk (skipped with --keep when DIR/<size>/sci.fits and ref.fits exist),
 * a second one runs every stage (FITS ingest to HDF5 archive) on it R times
 * with the default configuration. The first run includes FFTW planning (or
 * reading the plans from the wisdom file) and the allocation of the
 * subtraction's FFT arrays; "warm" is the fastest of the later runs, which
 * is what every frame after the first of a night costs, and each stage's
 * warm time is its fastest later run (with R = 1 there is no warm figure).
 * The archive goes to DIR/<size>/bench.h5 unless --archive-dir names another
 * directory: on a slow disk, the ~80 kB of stamps per candidate make the
 * later runs wait for the kernel to write back the earlier ones. On a
 * machine shared with other work, take several runs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hilal/fft.h"
#include "hilal/hilal.h"
#include "hilal/simulate.h"

/* one 4096^2 r2c FFT, measured before the sizes run (children inherit it) */
static double fft4096_s = NAN;
/* where the archive goes (NULL: next to the inputs) */
static const char *archive_dir = NULL;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int simulate(long n, const char *dir)
{
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = n;
    o.seed = 42;
    hilal_error err = {0};
    if (hilal_sim_write(&o, dir, &err) != HILAL_OK) {
        fprintf(stderr, "bench_run: simulate %ld: %s\n", n, err.msg);
        return 1;
    }
    return 0;
}

static int run_pipeline(long n, const char *dir, int threads, int repeats)
{
    hilal_error err = {0};
    hilal_config *cfg = hilal_registry_config_new(&err);
    char archive[1200], threads_text[32];
    if (strlen(dir) > 1000) {
        fprintf(stderr, "bench_run: directory name too long: %s\n", dir);
        hilal_config_free(cfg);
        return 1;
    }
    if (archive_dir != NULL)
        snprintf(archive, sizeof archive, "%.1000s/bench%ld.h5", archive_dir, n);
    else
        snprintf(archive, sizeof archive, "%s/bench.h5", dir);
    snprintf(threads_text, sizeof threads_text, "%d", threads);
    remove(archive);
    hilal_runner *runner = NULL;
    if (cfg == NULL || hilal_config_set(cfg, "archive.path", archive, "bench", &err) != HILAL_OK ||
        hilal_config_set(cfg, "pipeline.threads", threads_text, "bench", &err) != HILAL_OK ||
        hilal_runner_new(cfg, NULL, 0, &runner, &err) != HILAL_OK) {
        fprintf(stderr, "bench_run: %s\n", err.msg);
        hilal_config_free(cfg);
        return 1;
    }
    size_t nst;
    const hilal_stage *const *stages = hilal_runner_stages(runner, &nst);
    if (nst > 32)
        nst = 32;
    /* the first run, and per stage and in total the fastest of the later ones */
    double first[32], best[32], best_total = 1e30, first_total = 0;
    for (size_t i = 0; i < 32; i++)
        best[i] = 1e30;
    size_t ncands = 0;
    for (int r = 0; r < repeats; r++) {
        hilal_frame f;
        hilal_frame_init(&f);
        snprintf(f.frame_id, sizeof f.frame_id, "bench%ld", n);
        snprintf(f.sci_path, sizeof f.sci_path, "%.1000s/sci.fits", dir);
        snprintf(f.ref_path, sizeof f.ref_path, "%.1000s/ref.fits", dir);
        double t0 = now_s();
        if (hilal_runner_run(runner, &f, &err) != HILAL_OK) {
            fprintf(stderr, "bench_run: %s\n", err.msg);
            hilal_frame_clear(&f);
            hilal_runner_free(runner);
            hilal_config_free(cfg);
            return 1;
        }
        double total = now_s() - t0;
        if (r == 0) {
            first_total = total;
            memcpy(first, f.stage_seconds, sizeof first);
        } else {
            if (total < best_total)
                best_total = total;
            for (size_t i = 0; i < nst; i++)
                if (f.stage_seconds[i] < best[i])
                    best[i] = f.stage_seconds[i];
        }
        ncands = f.ncands;
        hilal_frame_clear(&f);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("size %ld x %ld: %zu candidates; first run %.3f s (includes FFTW planning, or "
           "reading the plans from the wisdom file), ",
           n, n, ncands, first_total);
    if (repeats > 1)
        printf("warm %.3f s (fastest of runs 2-%d), ", best_total, repeats);
    printf("peak RSS %.0f MB\n", ru.ru_maxrss / 1024.0);
    printf("  per stage (first run):");
    for (size_t i = 0; i < nst; i++)
        printf(" %s %.3f", stages[i]->name, first[i]);
    printf("\n");
    if (repeats > 1) {
        if (isfinite(fft4096_s) && fft4096_s > 0)
            printf("  warm run / one 4096 x 4096 r2c FFT (%.4f s): %.1f\n", fft4096_s,
                   best_total / fft4096_s);
        printf("  per stage (warm, fastest of runs 2-%d):", repeats);
        for (size_t i = 0; i < nst; i++)
            printf(" %s %.3f", stages[i]->name, best[i]);
        printf("\n");
        printf("RESULT size=%ld warm_s=%.4f first_s=%.4f peak_mb=%.1f", n, best_total, first_total,
               ru.ru_maxrss / 1024.0);
        for (size_t i = 0; i < nst; i++)
            printf(" %s_s=%.4f", stages[i]->name, best[i]);
        printf("\n");
    } else {
        printf("RESULT size=%ld first_s=%.4f peak_mb=%.1f\n", n, first_total,
               ru.ru_maxrss / 1024.0);
    }
    fflush(stdout);
    hilal_runner_free(runner);
    hilal_config_free(cfg);
    return 0;
}

static int in_child(int (*fn)(long, const char *, int, int), long n, const char *dir, int threads,
                    int repeats)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0)
        _exit(fn(n, dir, threads, repeats));
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

static int simulate_child(long n, const char *dir, int threads, int repeats)
{
    (void)threads;
    (void)repeats;
    return simulate(n, dir);
}

int main(int argc, char **argv)
{
    char sizes[256] = "1024,2048,4096";
    const char *root = "/tmp/hilal-bench";
    int threads = 0, repeats = 3, keep = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--sizes") && i + 1 < argc)
            snprintf(sizes, sizeof sizes, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            root = argv[++i];
        else if (!strcmp(argv[i], "--repeats") && i + 1 < argc)
            repeats = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--keep"))
            keep = 1;
        else if (!strcmp(argv[i], "--archive-dir") && i + 1 < argc)
            archive_dir = argv[++i];
        else {
            fprintf(stderr, "usage: bench_run [--sizes 1024,2048,4096] [--threads N] [--dir DIR] "
                            "[--repeats R] [--keep] [--archive-dir DIR]\n");
            return 2;
        }
    }
    if (repeats < 1)
        repeats = 1;
    mkdir(root, 0755);
    int nthreads = hilal_fft_threads(threads);
    printf("bench_run: %d threads, %d runs per size, %s\n", nthreads, repeats, hilal_library_versions());
    /* The yardstick: one 4096^2 r2c FFT on this machine with the same threads,
     * its plan remembered in the default wisdom file like the pipeline's. It
     * runs in a child of its own too: FFTW's threads must not exist in the
     * process that forks the pipeline's children. */
    int fd[2];
    if (pipe(fd) != 0)
        return 1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0) {
        close(fd[0]);
        hilal_error err = {0};
        double fft_s = NAN;
        char wisdom[1024];
        if (hilal_fft_wisdom_default_path(wisdom, sizeof wisdom)) {
            (void)hilal_fft_wisdom_import(wisdom, NULL, &err);
            memset(&err, 0, sizeof err);
            hilal_fft_wisdom_autosave(wisdom);
        }
        if (hilal_fft_time_r2c(4096, nthreads, HILAL_FFT_MEASURE, 5, &fft_s, &err) != HILAL_OK)
            fprintf(stderr, "bench_run: %s\n", err.msg);
        ssize_t wr = write(fd[1], &fft_s, sizeof fft_s);
        hilal_fft_cleanup();
        _exit(wr == (ssize_t)sizeof fft_s && isfinite(fft_s) ? 0 : 1);
    }
    close(fd[1]);
    double fft_s = NAN;
    ssize_t got = read(fd[0], &fft_s, sizeof fft_s);
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (got != (ssize_t)sizeof fft_s || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return 1;
    printf("one 4096 x 4096 float r2c FFT (FFTW_MEASURE, %d threads): %.4f s\n", nthreads, fft_s);
    printf("RESULT fft4096_s=%.4f\n", fft_s);
    fflush(stdout);
    fft4096_s = fft_s;
    for (char *tok = strtok(sizes, ","); tok != NULL; tok = strtok(NULL, ",")) {
        long n = atol(tok);
        char dir[1100], sci[1200], ref[1200];
        snprintf(dir, sizeof dir, "%.1000s/%ld", root, n);
        snprintf(sci, sizeof sci, "%s/sci.fits", dir);
        snprintf(ref, sizeof ref, "%s/ref.fits", dir);
        mkdir(dir, 0755);
        int have = keep && access(sci, R_OK) == 0 && access(ref, R_OK) == 0;
        if ((!have && in_child(simulate_child, n, dir, threads, repeats) != 0) ||
            in_child(run_pipeline, n, dir, nthreads, repeats) != 0)
            return 1;
    }
    return 0;
}
