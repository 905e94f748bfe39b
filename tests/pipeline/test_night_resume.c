/* `hilal night` end to end: a simulated night (two fields, a reference
 * library, a corrupt file, a frame without reference) processed without
 * interruption, and again with the process killed (SIGKILL) after its first
 * commit and the same command run once more: both archives must hold the
 * same candidates, with no frame twice. Then `hilal reprocess` with a higher
 * detection threshold adds a second run with fewer candidates, both
 * queryable, and reports an input that went missing. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hilal/archive.h"
#include "test_night_data.h"
#include "testutil.h"

static char dir[4096];

/* Runs `hilal ARGS` in dir through the shell; returns the exit code. */
static int hilal_cmd(const char *args, char **out)
{
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' %s", dir, hilal_test_exe(), args);
    int rc = hilal_test_run(cmd, out);
    return rc;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = calloc((size_t)n + 1, 1);
    if (s != NULL && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    fclose(f);
    return s;
}

/* Current candidates of a run (0 = all runs) as sorted "frame_id x y snr"
 * lines; *n their number, *min_abs_snr the smallest |snr|. */
static char *digest(const char *archive, int32_t run_id, size_t *n, double *min_abs_snr)
{
    char path[8400];
    hilal_archive *ar = NULL;
    hilal_archive_cand *rows = NULL;
    hilal_error err = {0};
    snprintf(path, sizeof path, "%s/%s", dir, archive);
    *n = 0;
    *min_abs_snr = INFINITY;
    CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
    if (ar == NULL)
        return strdup("");
    hilal_archive_filter q;
    hilal_archive_filter_init(&q);
    q.run_id = run_id;
    CHECK_OK(hilal_archive_query(ar, &q, &rows, n, &err), &err);
    char **lines = calloc(*n + 1, sizeof *lines);
    size_t total = 1;
    for (size_t i = 0; i < *n; i++) {
        char buf[160];
        snprintf(buf, sizeof buf, "%lld %.4f %.4f %.4f\n", (long long)rows[i].frame_id, rows[i].x,
                 rows[i].y, rows[i].snr);
        lines[i] = strdup(buf);
        total += strlen(buf);
        if (fabs(rows[i].snr) < *min_abs_snr)
            *min_abs_snr = fabs(rows[i].snr);
    }
    for (size_t i = 1; i < *n; i++)
        for (size_t j = i; j > 0 && strcmp(lines[j - 1], lines[j]) > 0; j--) {
            char *t = lines[j];
            lines[j] = lines[j - 1];
            lines[j - 1] = t;
        }
    char *out = calloc(total, 1);
    for (size_t i = 0; i < *n; i++) {
        strcat(out, lines[i]);
        free(lines[i]);
    }
    free(lines);
    free(rows);
    hilal_archive_free(ar);
    return out;
}

/* Every frame at most once per run: one committed-or-superseded row per
 * (frame, run), no superseded row, and no candidate row outside a current
 * frame. */
static void check_no_duplicates(const char *archive, size_t want_runs)
{
    char path[8400];
    hilal_archive *ar = NULL;
    hilal_archive_frame *rows = NULL;
    hilal_archive_summary sm;
    hilal_error err = {0};
    size_t n = 0;
    snprintf(path, sizeof path, "%s/%s", dir, archive);
    CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
    if (ar == NULL)
        return;
    CHECK_OK(hilal_archive_read_frames(ar, &rows, &n, NULL, &err), &err);
    CHECK_OK(hilal_archive_get_summary(ar, &sm, &err), &err);
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            CHECK(!(rows[i].frame_id == rows[j].frame_id && rows[i].run_id == rows[j].run_id),
                  "%s: frame %s has two rows in run %d (rows %zu and %zu)", archive,
                  rows[i].frame_name, (int)rows[i].run_id, i, j);
    CHECK(sm.nframes_superseded == 0 && sm.nruns == want_runs &&
              sm.nframes_current == NIGHT_GOOD_FRAMES * want_runs &&
              sm.nframes_failed == want_runs && sm.ncand_rows == sm.ncands_current,
          "%s: %zu current, %zu superseded, %zu failed frames, %zu runs; %zu candidate rows, "
          "%zu current", archive, sm.nframes_current, sm.nframes_superseded, sm.nframes_failed,
          sm.nruns, sm.ncand_rows, sm.ncands_current);
    free(rows);
    hilal_archive_free(ar);
}

/* Starts `hilal night ...` into killed.h5 with one worker, waits for its
 * first commit, kills it. Returns the frames committed when it died. */
static size_t night_killed(void)
{
    char archive[8400], log[8400];
    snprintf(archive, sizeof archive, "%s/killed.h5", dir);
    snprintf(log, sizeof log, "%s/killed.log", dir);
    pid_t pid = fork();
    if (pid == 0) {
        if (chdir(dir) != 0 || freopen(log, "w", stdout) == NULL || freopen(log, "a", stderr) == NULL)
            _exit(127);
        execl(hilal_test_exe(), "hilal", "night", "night", "--references", "refs", "--archive",
              "killed.h5", "--workers", "1", "--set", "pipeline.threads=1", "--set",
              "night.min_overlap=0.4", (char *)NULL);
        _exit(127);
    }
    CHECK(pid > 0, "fork");
    size_t committed = 0;
    int exited = 0;
    struct timespec nap = {0, 5000000};
    for (int k = 0; k < 12000 && committed == 0; k++) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            exited = 1;
            break;
        }
        hilal_archive *ar = NULL;
        hilal_archive_summary sm;
        hilal_error err = {0};
        if (hilal_archive_open_read(archive, &ar, &err) == HILAL_OK &&
            hilal_archive_get_summary(ar, &sm, &err) == HILAL_OK)
            committed = sm.nframes_current;
        hilal_archive_free(ar);
        if (committed == 0)
            nanosleep(&nap, NULL);
    }
    CHECK(!exited, "the night was still running at its first commit");
    if (!exited) {
        kill(pid, SIGKILL);
        int status = 0;
        waitpid(pid, &status, 0);
        CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "killed by SIGKILL");
    }
    /* Another frame may have been committed between the poll and the kill:
     * what counts is what the archive holds now. */
    hilal_archive *ar = NULL;
    hilal_archive_summary sm;
    hilal_error err = {0};
    CHECK_OK(hilal_archive_open_read(archive, &ar, &err), &err);
    if (ar != NULL) {
        CHECK_OK(hilal_archive_get_summary(ar, &sm, &err), &err);
        CHECK(sm.nframes_current >= committed, "the kill lost no committed frame (%zu, then %zu)",
              committed, sm.nframes_current);
        committed = sm.nframes_current;
    }
    hilal_archive_free(ar);
    return committed;
}

int main(void)
{
    char *out = NULL, path[8400];
    size_t nfull = 0, nkilled = 0, n1 = 0, n2 = 0;
    double min_snr = 0;
    hilal_test_tmpdir("night_resume", dir, sizeof dir);
    if (!night_make(dir)) {
        fprintf(stderr, "could not make the test night in %s\n", dir);
        return 1;
    }

    /* 1. Uninterrupted, two workers. */
    int rc = hilal_cmd("night night --references refs --archive full.h5 --workers 2 "
                       "--set pipeline.threads=1 --set night.min_overlap=0.4", &out);
    CHECK(rc == 4, "a night with a failed frame exits 4, got %d: %s", rc, out);
    CHECK(out && strstr(out, "8 frames: 6 done, 0 already done, 1 failed, 1 skipped") &&
              strstr(out, "bad.fits: failed:") && strstr(out, "c_noref.fits: skipped"),
          "summary: %s", out);
    free(out);
    snprintf(path, sizeof path, "%s/full.run1.report.json", dir);
    char *json = slurp(path);
    CHECK(json && strstr(json, "\"done\": 6") && strstr(json, "\"failed\": 1") &&
              strstr(json, "\"skipped_no_reference\": 1") && strstr(json, "\"workers\": 2") &&
              strstr(json, "\"reason\": \"frame bad.fits, science:"),
          "report next to the archive: %s", json ? json : "(missing)");
    free(json);
    char *dfull = digest("full.h5", 0, &nfull, &min_snr);
    CHECK(nfull > 0 && min_snr >= 5.0 - 1e-9, "%zu candidates, all |snr| >= 5 (%.2f)", nfull,
          min_snr);
    check_no_duplicates("full.h5", 1);

    /* 2. Killed after its first commit, then the same command again. */
    size_t at_kill = night_killed();
    CHECK(at_kill >= 1 && at_kill < NIGHT_GOOD_FRAMES, "killed mid-night with %zu frames committed",
          at_kill);
    rc = hilal_cmd("night night --references refs --archive killed.h5 --workers 1 "
                   "--set pipeline.threads=1 --set night.min_overlap=0.4", &out);
    CHECK(rc == 4, "the resumed night exits 4 (bad.fits), got %d", rc);
    char want[128];
    snprintf(want, sizeof want, "%zu done, %zu already done", NIGHT_GOOD_FRAMES - at_kill, at_kill);
    CHECK(out && strstr(out, want), "resumed: '%s' in %s", want, out);
    free(out);
    char *dkilled = digest("killed.h5", 0, &nkilled, &min_snr);
    CHECK(nkilled == nfull && strcmp(dfull, dkilled) == 0,
          "killed and resumed gives the same candidates as uninterrupted (%zu vs %zu)", nkilled,
          nfull);
    check_no_duplicates("killed.h5", 1);
    free(dkilled);

    /* 3. Reprocessing with a higher threshold: a second run, both queryable. */
    rc = hilal_cmd("reprocess killed.h5 --set detect.thresh_sigma=6 --workers 2", &out);
    CHECK(rc == 4, "reprocess exits 4 (bad.fits fails again), got %d: %s", rc, out);
    CHECK(out && strstr(out, "7 frames: 6 done") && strstr(out, "(run 2)"), "reprocess summary: %s",
          out);
    free(out);
    char *d1 = digest("killed.h5", 1, &n1, &min_snr);
    char *d2 = digest("killed.h5", 2, &n2, &min_snr);
    CHECK(n1 == nfull && strcmp(d1, dfull) == 0, "run 1 unchanged (%zu candidates)", n1);
    CHECK(n2 > 0 && n2 < n1 && min_snr >= 6.0 - 1e-9,
          "run 2: %zu candidates, fewer than %zu, all |snr| >= 6 (%.2f)", n2, n1, min_snr);
    check_no_duplicates("killed.h5", 2);
    rc = hilal_cmd("info killed.h5 --config 2", &out);
    CHECK(rc == 0 && out && strstr(out, "thresh_sigma = 6") && strstr(out, "min_overlap = 0.4"),
          "run 2 recorded thresh_sigma = 6 and kept run 1's night.min_overlap = 0.4");
    free(out);
    rc = hilal_cmd("query killed.h5 --run 2 --format csv", &out);
    size_t lines = 0;
    for (const char *p = out; p && *p; p++)
        lines += *p == '\n';
    CHECK(rc == 0 && lines == n2 + 1, "`hilal query --run 2` lists run 2 (%zu lines)", lines);
    free(out);
    rc = hilal_cmd("reprocess killed.h5 --set detect.thresh_sigma=6", &out);
    CHECK(out && strstr(out, "0 done, 6 already done"), "the same reprocess again does nothing: %s",
          out);
    free(out);

    /* 4. An input that went missing is reported, not skipped silently. */
    char from[8400], to[8400];
    snprintf(from, sizeof from, "%s/night/a2.fits", dir);
    snprintf(to, sizeof to, "%s/a2.moved", dir);
    CHECK(rename(from, to) == 0, "move a2.fits away");
    rc = hilal_cmd("reprocess killed.h5 --run 1 --set detect.thresh_sigma=7", &out);
    CHECK(rc == 4 && out && strstr(out, "a2.fits: missing input: science file") &&
              strstr(out, "5 done"),
          "missing input reported (rc %d): %s", rc, out);
    free(out);
    snprintf(path, sizeof path, "%s/killed.run3.report.json", dir);
    json = slurp(path);
    CHECK(json && strstr(json, "\"missing_input\": 1") && strstr(json, "\"run_id\": 3"),
          "run 3 report: %s", json ? json : "(missing)");
    free(json);
    rename(to, from);

    free(d1);
    free(d2);
    free(dfull);
    return hilal_test_finish();
}
