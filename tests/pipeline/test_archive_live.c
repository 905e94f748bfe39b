/* Live reading: while a writer process appends a night of frames, a reader
 * (this process, with one handle kept open, plus fresh `hilal query` runs
 * and h5py in SWMR mode when installed) sees a growing archive whose every
 * returned candidate belongs to a committed frame and is intact. A reader
 * opened before the writer starts must not stop it. */
#include <hdf5.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hilal/archive.h"
#include "test_archive_frames.h"
#include "testutil.h"

#define NX 128
#define NY 128
#define STAMP 15
#define NFRAMES 40

static const char *HASH = "5555555555555555555555555555555555555555555555555555555555555555";

static size_t ncands_of(int k) { return 40 + (size_t)(k * 17 % 90); }
static unsigned seed_of(int k) { return (unsigned)(k % 50 + 1); }

static hilal_archive_options options(void)
{
    hilal_archive_options opt;
    hilal_archive_options_init(&opt);
    opt.cutout_size = STAMP;
    opt.psf_size = 31;
    return opt;
}

/* The writer: NFRAMES frames, a few milliseconds apart. */
static void writer(const char *path, int go_fd)
{
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_options opt = options();
    int32_t run;
    char c;
    if (read(go_fd, &c, 1) != 1)
        _exit(2);
    if (hilal_archive_open_write(path, &opt, &ar, &err) != HILAL_OK ||
        hilal_archive_begin_run(ar, "live test", HASH, &run, &err) != HILAL_OK) {
        fprintf(stderr, "writer: %s\n", err.msg);
        _exit(3);
    }
    for (int k = 0; k < NFRAMES; k++) {
        hilal_frame f;
        char name[32];
        snprintf(name, sizeof name, "live_%d", k);
        if (tf_make(&f, name, seed_of(k), NX, NY, ncands_of(k)) != 0)
            _exit(4);
        snprintf(f.sci->meta.sha256, sizeof f.sci->meta.sha256, "%064d", k + 1);
        if (hilal_archive_append_frame(ar, run, &f, NULL, &err) != HILAL_OK) {
            fprintf(stderr, "writer: %s\n", err.msg);
            _exit(5);
        }
        hilal_frame_clear(&f);
        struct timespec ts = {0, 15 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (hilal_archive_close(ar, &err) != HILAL_OK)
        _exit(6);
    _exit(0);
}

/* Checks one view of the archive; returns the number of current candidates. */
static size_t check_view(hilal_archive *ar, size_t *bad)
{
    hilal_error err = {0};
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    hilal_archive_cand *rows = NULL;
    size_t nf = 0, n = 0, pos = 0;
    char why[256];
    /* The query reads the frames first, so a frame committed between the
     * two reads below shows up only in the second: compare in that order. */
    if (hilal_archive_query(ar, NULL, &rows, &n, &err) != HILAL_OK ||
        hilal_archive_read_frames(ar, &frames, &nf, &cur, &err) != HILAL_OK) {
        CHECK(0, "live read: %s", err.msg);
        (*bad)++;
        goto cleanup;
    }
    for (size_t i = 0; i < nf && pos < n; i++) {
        if (!cur[i])
            continue;
        int k = -1;
        sscanf(frames[i].frame_name, "live_%d", &k);
        if (k < 0 || (size_t)frames[i].n_candidates != ncands_of(k)) {
            (*bad)++;
            continue;
        }
        for (int c = 0; c < frames[i].n_candidates && pos < n; c++, pos++)
            if (rows[pos].cand_id != frames[i].first_cand_id + c ||
                !tf_row_matches(&rows[pos], seed_of(k), (size_t)c, NX, NY, STAMP, why, sizeof why)) {
                if ((*bad)++ == 0)
                    CHECK(0, "live row %zu of %s: %s", pos, frames[i].frame_name, why);
            }
    }
    CHECK(pos == n, "every live row belongs to a committed frame (%zu of %zu)", pos, n);
    if (n > 0) {
        /* The newest candidate's stamps are readable and right. */
        hilal_archive_cutout cut;
        int k = -1;
        hilal_archive_frame fr;
        hilal_archive_cand cand;
        if (hilal_archive_get_candidate(ar, rows[n - 1].cand_id, &cand, &fr, NULL, &err) == HILAL_OK &&
            sscanf(fr.frame_name, "live_%d", &k) == 1 &&
            hilal_archive_read_cutout(ar, rows[n - 1].cand_id, &cut, &err) == HILAL_OK) {
            if (!tf_cutout_matches(&cut, &cand, seed_of(k), NX, NY, why, sizeof why) && (*bad)++ == 0)
                CHECK(0, "live stamp: %s", why);
            hilal_archive_cutout_clear(&cut);
        } else {
            CHECK(0, "live stamp read: %s", err.msg);
            (*bad)++;
        }
    }
cleanup:
    free(frames);
    free(cur);
    free(rows);
    return n;
}

int main(void)
{
    char dir[4096], path[4200], cmd[9000];
    hilal_error err = {0};
    hilal_archive *early = NULL, *ar = NULL;
    hilal_archive_options opt = options();
    hilal_test_tmpdir("archive_live", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/live.h5", dir);

    /* An empty archive, and a reader that opens it before the writer
     * starts. The writer is forked first: a child must not inherit this
     * process's open HDF5 files. */
    CHECK_OK(hilal_archive_open_write(path, &opt, &ar, &err), &err);
    CHECK_OK(hilal_archive_close(ar, &err), &err);
    int go[2];
    if (pipe(go) != 0)
        return 2;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(go[1]);
        writer(path, go[0]);
    }
    close(go[0]);
    CHECK_OK(hilal_archive_open_read(path, &early, &err), &err);
    if (write(go[1], "g", 1) != 1)
        return 2;
    close(go[1]);

    const char *py = tf_find_python("h5py");
    size_t last = 0, distinct = 0, bad = 0, polls = 0, decreases = 0;
    int cli_runs = 0, py_runs = 0, active_seen = 0, status = 0, done = 0;
    while (!done) {
        done = waitpid(pid, &status, WNOHANG) == pid;
        size_t n = check_view(early, &bad);
        polls++;
        if (n < last)
            decreases++;
        if (n != last)
            distinct++;
        last = n;
        hilal_archive_summary sum;
        if (!done && hilal_archive_get_summary(early, &sum, &err) == HILAL_OK && sum.writer_active)
            active_seen = 1;
        /* Fresh readers while the night is written: the CLI and h5py. */
        if (!done && n > 0 && cli_runs < 2 && polls % 3 == 0) {
            char *out = NULL;
            snprintf(cmd, sizeof cmd, "'%s' query '%s' --format csv", hilal_test_exe(), path);
            int rc = hilal_test_run(cmd, &out);
            size_t lines = 0;
            for (const char *p = out; p != NULL && *p; p++)
                lines += *p == '\n';
            CHECK(rc == 0 && lines >= n + 1, "hilal query while writing: rc %d, %zu lines for >= %zu rows", rc,
                  lines, n);
            free(out);
            cli_runs++;
        }
        if (!done && n > 0 && py != NULL && py_runs < 1 && polls % 5 == 0) {
            char *out = NULL;
            snprintf(cmd, sizeof cmd,
                     "%s -c \"import h5py,sys; f=h5py.File(sys.argv[1],'r',swmr=True,locking=False); "
                     "fr=f['frames'][:]; c=f['candidates']; c.refresh(); "
                     "ok=fr['status']>0; print('rows', int(fr['n_candidates'][ok].sum()) <= c.shape[0])\" '%s'",
                     py, path);
            int rc = hilal_test_run(cmd, &out);
            CHECK(rc == 0 && out != NULL && strstr(out, "rows True") != NULL,
                  "h5py SWMR read while writing: %s", out ? out : "");
            free(out);
            py_runs++;
        }
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "writer finished (status %d)", status);
    size_t total = 0;
    for (int k = 0; k < NFRAMES; k++)
        total += ncands_of(k);
    size_t final_n = check_view(early, &bad);
    CHECK(final_n == total, "the open reader sees the whole night: %zu of %zu", final_n, total);
    CHECK(bad == 0 && decreases == 0, "%zu bad reads, %zu decreases in %zu polls", bad, decreases, polls);
    CHECK(distinct >= 3, "the reader saw the archive grow (%zu distinct states in %zu polls)", distinct, polls);
    CHECK(active_seen, "the reader saw the writer active");
    CHECK(cli_runs >= 1, "hilal query ran while writing");
    hilal_archive_free(early);
    early = NULL;

    /* A reader that locks the file (HDF5's default, e.g. h5py without
     * locking=False) and opened it before a writer: the writer is refused
     * with a message saying what to do. */
    int ready[2], release[2];
    if (pipe(ready) != 0 || pipe(release) != 0)
        return 2;
    fflush(NULL);
    pid_t rd = fork();
    if (rd == 0) {
        char c = 0;
        H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
        hid_t fid = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (write(ready[1], fid >= 0 ? "y" : "n", 1) != 1 || read(release[0], &c, 1) != 1)
            _exit(3);
        _exit(fid >= 0 ? 0 : 4);
    }
    char c = 0;
    CHECK(read(ready[0], &c, 1) == 1 && c == 'y', "a locking reader opened the finished archive");
    hilal_status st = hilal_archive_open_write(path, &opt, &ar, &err);
    CHECK(st == HILAL_ERR_IO && ar == NULL && strstr(err.msg, "open for reading") != NULL &&
              strstr(err.msg, "locking=False") != NULL,
          "writer refused while a locking reader holds the file: %s", err.msg);
    hilal_error_clear(&err);
    if (write(release[1], "x", 1) != 1)
        return 2;
    waitpid(rd, &status, 0);
    /* Once it is gone the writer starts. */
    CHECK_OK(hilal_archive_open_write(path, &opt, &ar, &err), &err);
    CHECK_OK(hilal_archive_close(ar, &err), &err);
    if (py == NULL)
        printf("note: no python3 with h5py; the h5py check was skipped\n");
    return hilal_test_finish();
}
