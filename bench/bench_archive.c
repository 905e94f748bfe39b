/* Archive write speed: appending candidates with their cutouts.
 *
 * Usage: bench_archive [DIR] [NCANDS] [SIDE]
 *   DIR     where the archive is written (default: /tmp), removed afterwards
 *   NCANDS  candidates in one frame (default 10000)
 *   SIDE    frame side in pixels (default 2048)
 *
 * Prints the time of one hilal_archive_append_frame() call for NCANDS
 * candidates (candidate rows, 63 x 63 science, reference, difference,
 * S_corr, variance and mask stamps, PSFs, per-frame records, three flushes),
 * the same number spread over 100 frames, and a cold reopen + full query,
 * with throughputs and the file size. CPU time (user + system, this
 * process) is printed next to wall time: on a shared machine it is the
 * steadier figure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../tests/pipeline/test_archive_frames.h"
#include "hilal/archive.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *HASH = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

static int fail(const hilal_error *err)
{
    fprintf(stderr, "bench_archive: %s\n", err->msg);
    return 1;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    size_t ncands = argc > 2 ? (size_t)atol(argv[2]) : 10000;
    long side = argc > 3 ? atol(argv[3]) : 2048;
    char path[4200];
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_frame big, small;
    int32_t run;
    struct stat sb;
    if (ncands < 100 || side < 128) {
        fprintf(stderr, "bench_archive: NCANDS >= 100 and SIDE >= 128 please\n");
        return 2;
    }
    snprintf(path, sizeof path, "%s/bench_archive_%ld.h5", dir, (long)getpid());
    unlink(path);
    if (tf_make(&big, "big", 1, side, side, ncands) != 0 ||
        tf_make(&small, "small", 2, side, side, ncands / 100) != 0) {
        fprintf(stderr, "bench_archive: out of memory\n");
        return 1;
    }
    double stamp_mb = (double)ncands * 63.0 * 63.0 * (5 * 4 + 2) / 1e6;

    if (hilal_archive_open_write(path, NULL, &ar, &err) != HILAL_OK ||
        hilal_archive_begin_run(ar, "bench", HASH, &run, &err) != HILAL_OK)
        return fail(&err);

    /* One frame with all candidates. */
    double t0 = now_s(), c0 = cpu_s();
    if (hilal_archive_append_frame(ar, run, &big, NULL, &err) != HILAL_OK)
        return fail(&err);
    double t_one = now_s() - t0, c_one = cpu_s() - c0;

    /* 100 frames of ncands / 100 (distinct inputs: new frame names and ids). */
    t0 = now_s();
    c0 = cpu_s();
    for (int k = 0; k < 100; k++) {
        snprintf(small.sci->meta.sha256, sizeof small.sci->meta.sha256, "%064d", 1000 + k);
        if (hilal_archive_append_frame(ar, run, &small, NULL, &err) != HILAL_OK)
            return fail(&err);
    }
    double t_many = now_s() - t0, c_many = cpu_s() - c0;
    if (hilal_archive_close(ar, &err) != HILAL_OK)
        return fail(&err);

    /* Reading it back: open, query everything, one cutout. */
    t0 = now_s();
    hilal_archive_cand *rows = NULL;
    size_t n = 0;
    hilal_archive_cutout cut;
    if (hilal_archive_open_read(path, &ar, &err) != HILAL_OK ||
        hilal_archive_query(ar, NULL, &rows, &n, &err) != HILAL_OK ||
        hilal_archive_read_cutout(ar, rows[n / 2].cand_id, &cut, &err) != HILAL_OK)
        return fail(&err);
    double t_read = now_s() - t0;
    hilal_archive_cutout_clear(&cut);
    free(rows);
    hilal_archive_free(ar);
    stat(path, &sb);

    printf("archive append, 63 x 63 stamps (5 float planes + mask), %ld x %ld frames:\n", side, side);
    printf("  1 frame of %zu candidates:      %.3f s wall, %.3f s CPU  (%.0f candidates/s, %.0f MB/s of stamps)\n",
           ncands, t_one, c_one, (double)ncands / t_one, stamp_mb / t_one);
    printf("  100 frames of %zu candidates:    %.3f s wall, %.3f s CPU  (%.1f ms per frame commit)\n",
           ncands / 100, t_many, c_many, 1e3 * t_many / 100);
    printf("  reopen + query %zu rows + 1 cutout: %.3f s\n", n, t_read);
    printf("  file size: %.1f MB for %zu candidates\n", (double)sb.st_size / 1e6, n);
    unlink(path);
    hilal_frame_clear(&big);
    hilal_frame_clear(&small);
    return 0;
}
