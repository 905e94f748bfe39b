/* Crash safety: a child process appends frames to an archive and is killed
 * with SIGKILL at a random moment (opening, recovering, writing stamps,
 * committing, flagging, re-running a frame); this is repeated several
 * times on the same archive. After every kill the archive must open, every
 * frame the child reported as committed must be there with all its
 * candidates and stamps intact, no frame may be partial, and the next
 * writer must recover and go on. Finally the recovered file must open
 * without SWMR (h5py, if installed, reads it too).
 *
 * HILAL_TEST_SEED=<n> repeats a given sequence of kill times. */
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "h5.h"
#include "hilal/archive.h"
#include "test_archive_frames.h"
#include "testutil.h"

#define NX 128
#define NY 128
#define STAMP 15
#define MAX_FRAMES 400

static const char *HASH = "7777777777777777777777777777777777777777777777777777777777777777";

/* What frame k of round r is: its content seed (pixel values exact in
 * float32), its candidate count and its input identity. Frames with
 * k % 4 == 0 are the same input in every round, so each round re-runs them
 * (replacing their rows). */
static unsigned seed_of(int r, int k) { return (unsigned)((r * 37 + k) % 50 + 1); }
static size_t ncands_of(int r, int k) { return 30 + (size_t)((r * 13 + k * 29) % 170); }
static int identity_round(int r, int k) { return k % 4 == 0 ? 0 : r; }

typedef struct report {
    int k;
    int64_t frame_row, frame_id;
    int ncands;
} report;

static hilal_archive_options options(int compressed_stamps)
{
    hilal_archive_options opt;
    hilal_archive_options_init(&opt);
    opt.cutout_size = STAMP;
    opt.psf_size = 31;
    opt.cutout_compress_level = compressed_stamps ? 1 : 0;
    return opt;
}

static void child_writer(const char *path, int compressed, int r, int fd)
{
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_options opt = options(compressed);
    int32_t run;
    if (hilal_archive_open_write(path, &opt, &ar, &err) != HILAL_OK ||
        hilal_archive_begin_run(ar, "kill test", HASH, &run, &err) != HILAL_OK) {
        fprintf(stderr, "child: %s\n", err.msg);
        _exit(3);
    }
    for (int k = 0; k < MAX_FRAMES; k++) {
        hilal_frame f;
        hilal_archive_commit c;
        char name[64];
        snprintf(name, sizeof name, "r%d_f%d", r, k);
        if (tf_make(&f, name, seed_of(r, k), NX, NY, ncands_of(r, k)) != 0)
            _exit(4);
        snprintf(f.sci->meta.sha256, sizeof f.sci->meta.sha256, "%032d%032d", identity_round(r, k), k);
        if (hilal_archive_append_frame(ar, run, &f, &c, &err) != HILAL_OK) {
            fprintf(stderr, "child: %s\n", err.msg);
            _exit(5);
        }
        report rep = {k, c.frame_row, c.frame_id, (int)c.ncands};
        if (write(fd, &rep, sizeof rep) != (ssize_t)sizeof rep)
            _exit(6);
        hilal_frame_clear(&f);
    }
    hilal_archive_close(ar, &err);
    _exit(0);
}

/* Checks the archive after round r; reps are the child's commit reports. */
static void verify(const char *path, int r, const report *reps, size_t nrep, size_t *total_current)
{
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    hilal_archive_cand *rows = NULL;
    size_t nf = 0, n = 0;
    char why[256];

    hilal_status st = hilal_archive_open_read(path, &ar, &err);
    if (st == HILAL_ERR_NOTFOUND && nrep == 0 && *total_current == SIZE_MAX)
        return; /* every writer so far was killed before the archive existed: nothing was
                   promised */
    CHECK(st == HILAL_OK, "round %d: archive opens after SIGKILL: %s", r, err.msg);
    if (st != HILAL_OK)
        return;
    CHECK_OK(hilal_archive_read_frames(ar, &frames, &nf, &cur, &err), &err);
    CHECK_OK(hilal_archive_query(ar, NULL, &rows, &n, &err), &err);

    /* Every reported commit is there. */
    for (size_t i = 0; i < nrep; i++) {
        const report *p = &reps[i];
        char name[64];
        snprintf(name, sizeof name, "r%d_f%d", r, p->k);
        int ok = p->frame_row >= 0 && (size_t)p->frame_row < nf &&
                 strcmp(frames[p->frame_row].frame_name, name) == 0 &&
                 frames[p->frame_row].frame_id == p->frame_id &&
                 frames[p->frame_row].n_candidates == p->ncands &&
                 (frames[p->frame_row].status == HILAL_ARCHIVE_FRAME_COMMITTED ||
                  frames[p->frame_row].status == HILAL_ARCHIVE_FRAME_SUPERSEDED);
        CHECK(ok, "round %d: committed frame %s (row %lld) is in the archive", r, name,
              (long long)p->frame_row);
        /* A superseded one was replaced by a later committed run of the same input. */
        if (ok && !cur[p->frame_row]) {
            int later = 0;
            for (size_t j = (size_t)p->frame_row + 1; j < nf; j++)
                later |= cur[j] && frames[j].frame_id == p->frame_id;
            CHECK(later, "round %d: frame %s superseded by a current row", r, name);
        }
    }

    /* Every current frame is complete and correct; no input is current twice. */
    size_t expect_rows = 0, pos = 0;
    int bad_frames = 0;
    for (size_t i = 0; i < nf; i++) {
        if (!cur[i])
            continue;
        const hilal_archive_frame *f = &frames[i];
        int fr = -1, fk = -1;
        if (sscanf(f->frame_name, "r%d_f%d", &fr, &fk) != 2) {
            CHECK(0, "unexpected frame name %s", f->frame_name);
            continue;
        }
        for (size_t j = i + 1; j < nf; j++)
            if (cur[j] && frames[j].frame_id == f->frame_id && frames[j].run_id == f->run_id)
                bad_frames++;
        unsigned seed = seed_of(fr, fk);
        if ((size_t)f->n_candidates != ncands_of(fr, fk))
            bad_frames++;
        expect_rows += (size_t)f->n_candidates;
        for (int c = 0; c < f->n_candidates && pos < n; c++, pos++) {
            if (rows[pos].cand_id != f->first_cand_id + c ||
                !tf_row_matches(&rows[pos], seed, (size_t)c, NX, NY, STAMP, why, sizeof why)) {
                if (bad_frames++ == 0)
                    CHECK(0, "round %d: frame %s candidate %d: %s", r, f->frame_name, c, why);
            }
        }
        /* Stamps of the first and last candidate. */
        for (int c = 0; c < f->n_candidates; c += f->n_candidates - 1 > 0 ? f->n_candidates - 1 : 1) {
            hilal_archive_cutout cut;
            hilal_archive_cand cand;
            if (hilal_archive_get_candidate(ar, f->first_cand_id + c, &cand, NULL, NULL, &err) != HILAL_OK ||
                hilal_archive_read_cutout(ar, f->first_cand_id + c, &cut, &err) != HILAL_OK) {
                CHECK(0, "round %d: stamps of frame %s: %s", r, f->frame_name, err.msg);
                hilal_error_clear(&err);
                bad_frames++;
                break;
            }
            if (!tf_cutout_matches(&cut, &cand, seed, NX, NY, why, sizeof why) && bad_frames++ == 0)
                CHECK(0, "round %d: frame %s stamp %d: %s", r, f->frame_name, c, why);
            hilal_archive_cutout_clear(&cut);
            if (f->n_candidates == 1)
                break;
        }
    }
    CHECK(bad_frames == 0, "round %d: %d problems in current frames", r, bad_frames);
    CHECK(n == expect_rows, "round %d: %zu candidates returned, current frames hold %zu", r, n, expect_rows);
    *total_current = n;
    free(frames);
    free(cur);
    free(rows);
    hilal_archive_free(ar);
}

/* Kills a writer `rounds` times on one archive, checking it after each
 * kill, then recovers it and checks it with plain HDF5 and h5py. */
static void kill_series(const char *path, int compressed, int rounds, const char *py)
{
    size_t total = SIZE_MAX, kills = 0; /* SIZE_MAX: no archive seen yet */
    printf("%s float stamps:\n", compressed ? "compressed" : "uncompressed");
    for (int r = 0; r < rounds; r++) {
        int fds[2];
        if (pipe(fds) != 0)
            return;
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            close(fds[0]);
            child_writer(path, compressed, r, fds[1]);
        }
        close(fds[1]);
        /* Kill between 1 and 150 ms in: early rounds may hit creation or
         * recovery, later ones stamps, commits and flag updates. */
        long delay_us = 1000 + rand() % 149000;
        struct timespec ts = {0, delay_us * 1000};
        nanosleep(&ts, NULL);
        int killed = kill(pid, SIGKILL) == 0;
        int status = 0;
        waitpid(pid, &status, 0);
        kills += killed && WIFSIGNALED(status);
        CHECK(!WIFEXITED(status) || WEXITSTATUS(status) == 0, "round %d: child failed with status %d",
              r, WEXITSTATUS(status));
        report reps[MAX_FRAMES];
        size_t nrep = 0;
        while (nrep < MAX_FRAMES && read(fds[0], &reps[nrep], sizeof reps[0]) == (ssize_t)sizeof reps[0])
            nrep++;
        close(fds[0]);
        printf("  round %d: killed after %ld ms, %zu frames reported committed\n", r, delay_us / 1000, nrep);
        verify(path, r, reps, nrep, &total);
    }
    CHECK(kills >= (size_t)rounds - 1, "the writer was killed in %zu of %d rounds", kills, rounds);

    /* The last kill left the file flagged as open: a writer recovers it. */
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_options opt = options(compressed);
    char cmd[8800], *out = NULL;
    if (py != NULL && kills > 0) {
        /* Before recovery: h5py opens it in SWMR mode. */
        snprintf(cmd, sizeof cmd,
                 "%s -c \"import h5py,sys; f=h5py.File(sys.argv[1],'r',swmr=True); "
                 "print('swmr-open', f['frames'].shape[0])\" '%s'", py, path);
        int rc = hilal_test_run(cmd, &out);
        CHECK(rc == 0 && out != NULL && strstr(out, "swmr-open") != NULL,
              "h5py opens the killed archive with swmr=True: %s", out ? out : "");
        free(out);
        out = NULL;
    }
    if (!compressed) {
        /* The next writer recovers it. */
        hilal_status st = hilal_archive_open_write(path, &opt, &ar, &err);
        CHECK_OK(st, &err);
        if (st == HILAL_OK) {
            CHECK(hilal_archive_recovered(ar) || kills == 0, "the writer recovered the archive");
            CHECK_OK(hilal_archive_close(ar, &err), &err);
        }
    } else {
        /* Or the tool does, without writing anything. */
        snprintf(cmd, sizeof cmd, "'%s' info '%s' --recover", hilal_test_exe(), path);
        int rc = hilal_test_run(cmd, &out);
        CHECK(rc == 0 && out != NULL && (strstr(out, "recovered after a writer that stopped") || kills == 0),
              "hilal info --recover: %s", out ? out : "");
        free(out);
        out = NULL;
    }
    /* Clean flags: a plain (non-SWMR) HDF5 open works. */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t fid = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(fid >= 0, "plain read-only open after recovery");
    if (fid >= 0)
        H5Fclose(fid);
    size_t after = 0;
    verify(path, 99, NULL, 0, &after);
    CHECK(after == total, "recovery kept every current candidate (%zu, %zu)", after, total);
    if (py != NULL) {
        snprintf(cmd, sizeof cmd,
                 "%s -c \"import h5py,sys; f=h5py.File(sys.argv[1],'r'); c=f['candidates'][:]; "
                 "fr=f['frames'][:]; print('valid', int(c['valid'].sum()), int(fr['n_candidates'][fr['valid']==1].sum()))\" '%s'",
                 py, path);
        int rc = hilal_test_run(cmd, &out);
        char want[64];
        snprintf(want, sizeof want, "valid %zu %zu", total, total);
        CHECK(rc == 0 && out != NULL && strstr(out, want) != NULL, "h5py: '%s' expected '%s'",
              out ? out : "", want);
        free(out);
    }
}

/* A metadata write torn by the death of the writer (simulated: the first
 * 4 kB of the file, superblock and root group header, overwritten with
 * garbage) is repaired from the journal record the writer left. */
static void test_torn_write(const char *dir)
{
    char path[4200], journal[4300];
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_options opt = options(0);
    int32_t run;
    snprintf(path, sizeof path, "%s/torn.h5", dir);
    hilal_h5_journal_path(path, journal, sizeof journal);
    CHECK_OK(hilal_archive_open_write(path, &opt, &ar, &err), &err);
    if (ar == NULL)
        return;
    FILE *fp = fopen(journal, "rb");
    CHECK(fp != NULL, "a writer keeps a journal next to the archive");
    if (fp)
        fclose(fp);
    CHECK_OK(hilal_archive_begin_run(ar, "torn", HASH, &run, &err), &err);
    hilal_frame f;
    tf_make(&f, "r0_f1", seed_of(0, 1), NX, NY, ncands_of(0, 1));
    CHECK_OK(hilal_archive_append_frame(ar, run, &f, NULL, &err), &err);
    hilal_frame_clear(&f);
    CHECK_OK(hilal_archive_close(ar, &err), &err);
    fp = fopen(journal, "rb");
    CHECK(fp == NULL, "the journal is removed when the writer closes");
    if (fp)
        fclose(fp);

    /* The write "in flight": its record in the journal, garbage in place. */
    unsigned char good[4096], junk[4096];
    fp = fopen(path, "r+b");
    size_t got = fp ? fread(good, 1, sizeof good, fp) : 0;
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (unsigned char)(i * 131u + 7u);
    if (fp) {
        fseek(fp, 0, SEEK_SET);
        fwrite(junk, 1, sizeof junk, fp);
        fclose(fp);
    }
    CHECK(got == sizeof good, "read the file start");
    hilal_archive *rd = NULL;
    hilal_status st = hilal_archive_open_read(path, &rd, &err);
    CHECK(st != HILAL_OK, "the torn file is unreadable without the journal");
    hilal_archive_free(rd);
    hilal_error_clear(&err);
    CHECK_OK(hilal_h5_journal_write_record(journal, 0, good, sizeof good, &err), &err);
    st = hilal_archive_open_read(path, &rd, &err);
    CHECK(st != HILAL_OK && strstr(err.msg, "--recover") != NULL,
          "a reader of the torn file is told how to repair it: %s", err.msg);
    hilal_archive_free(rd);
    hilal_error_clear(&err);
    /* The first time by the tool, the second time by a writer. */
    char cmd[8800], *out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' info '%s' --recover", hilal_test_exe(), path);
    int rc = hilal_test_run(cmd, &out);
    CHECK(rc == 0 && out != NULL && strstr(out, "recovered after a writer that stopped") != NULL,
          "hilal info --recover repairs the torn write: %s", out ? out : "");
    free(out);
    fp = fopen(path, "r+b");
    if (fp) {
        fwrite(junk, 1, sizeof junk, fp);
        fclose(fp);
    }
    CHECK_OK(hilal_h5_journal_write_record(journal, 0, good, sizeof good, &err), &err);
    st = hilal_archive_open_write(path, &opt, &ar, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        CHECK(hilal_archive_recovered(ar), "opening reports the repair");
        CHECK_OK(hilal_archive_close(ar, &err), &err);
    }
    size_t n = 0;
    verify(path, 98, NULL, 0, &n);
    CHECK(n == ncands_of(0, 1), "the repaired archive holds its frame (%zu candidates)", n);
    /* A torn record (bad CRC) is ignored: nothing is written. */
    CHECK_OK(hilal_h5_journal_write_record(journal, 0, junk, sizeof junk, &err), &err);
    fp = fopen(journal, "r+b");
    if (fp) {
        fseek(fp, 100, SEEK_SET);
        fputc(0x5a, fp);
        fclose(fp);
    }
    int replayed = 1;
    CHECK_OK(hilal_h5_journal_replay(path, &replayed, &err), &err);
    CHECK(replayed == 0, "a record with a bad CRC is not replayed");
    verify(path, 98, NULL, 0, &n);
    CHECK(n == ncands_of(0, 1), "the archive is untouched by a torn record (%zu)", n);
}

int main(void)
{
    char dir[4096], path[4200];
    hilal_test_tmpdir("archive_kill", dir, sizeof dir);
    const char *seed_env = getenv("HILAL_TEST_SEED");
    unsigned seed = seed_env ? (unsigned)strtoul(seed_env, NULL, 10) : (unsigned)time(NULL);
    srand(seed);
    printf("kill times from seed %u (HILAL_TEST_SEED=%u repeats them)\n", seed, seed);
    const char *py = tf_find_python("h5py");
    snprintf(path, sizeof path, "%s/night.h5", dir);
    kill_series(path, 0, 7, py);
    snprintf(path, sizeof path, "%s/night_compressed.h5", dir);
    kill_series(path, 1, 5, py);
    test_torn_write(dir);
    if (py == NULL)
        printf("note: no python3 with h5py; the h5py checks were skipped\n");
    return hilal_test_finish();
}
