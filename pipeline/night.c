/* Nightly batches: the frames of a night through the stage chain on a
 * pool of worker threads, committed to one archive, resumable
 * (include/hilal/night.h, docs/night.md).
 *
 * How a frame goes through a worker:
 *  1. its science image is read (ingest) and identified by the SHA-256 of
 *     the file and its HDU, the archive's frame id; a frame this run
 *     already committed (or recorded as failed) is skipped;
 *  2. its reference comes from the library: matched by field name or WCS
 *     footprint, or fixed (reprocessing); the frame gets its own copy of
 *     the cached reference image, since the stages work on it in place
 *     (background) or replace it (align);
 *  3. the registry's stages up to the archive run (the ingest stage keeps
 *     the images already in the frame);
 *  4. the frame is committed to the archive through the engine's own
 *     archive handle (which also knows what is done and records
 *     failures; the handle serialises commits with its mutex), then any
 *     stages after the archive run;
 *  5. a failure at any step is recorded in the archive with its reason
 *     and the night goes on.
 */
#define _GNU_SOURCE /* strdup under C11 */

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hilal/archive.h"
#include "hilal/checksum.h"
#include "hilal/ingest.h"
#include "hilal/log.h"
#include "hilal/night.h"
#include "hilal/stage.h"
#include "h5.h"
#include "hilal/version.h"
#include "night_internal.h"

double hilal_night_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* snprintf into a fixed-size field, truncating long text (messages are
 * cut to the field; the archive and the report keep what fits). */
static void textf(char *dst, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void textf(char *dst, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dst, size, fmt, ap);
    va_end(ap);
}

const char *hilal_night_status_name(int status)
{
    switch (status) {
    case HILAL_NIGHT_PENDING: return "not processed";
    case HILAL_NIGHT_DONE: return "done";
    case HILAL_NIGHT_ALREADY: return "already done";
    case HILAL_NIGHT_FAILED: return "failed";
    case HILAL_NIGHT_NOREF: return "skipped: no reference";
    case HILAL_NIGHT_MISSING: return "missing input";
    case HILAL_NIGHT_CHANGED: return "changed input";
    case HILAL_NIGHT_FAILED_BEFORE: return "failed before";
    default: return "?";
    }
}

int hilal_night_status_is_failure(int status)
{
    return status == HILAL_NIGHT_FAILED || status == HILAL_NIGHT_MISSING ||
           status == HILAL_NIGHT_CHANGED || status == HILAL_NIGHT_FAILED_BEFORE ||
           status == HILAL_NIGHT_PENDING;
}

/* ------------------------------------------------------------------------
 * Tasks
 * ------------------------------------------------------------------------ */

static void task_set_name(hilal_night_task *t, const char *path)
{
    const char *slash = strrchr(path, '/');
    textf(t->name, sizeof t->name, "%s", slash != NULL ? slash + 1 : path);
}

void hilal_night_task_reset(hilal_night_task *t)
{
    t->status = HILAL_NIGHT_PENDING;
    t->message[0] = '\0';
    t->ref_used[0] = '\0';
    t->overlap = NAN;
    t->frame_id = 0;
    t->ncands = t->npos = t->nneg = t->nreal = 0;
    t->limmag5 = NAN;
    t->seconds = 0;
    for (int i = 0; i < HILAL_NIGHT_MAX_STAGES; i++)
        t->stage_seconds[i] = 0;
    t->rank = 0;
}

hilal_status hilal_night_tasks_from_path(const char *dir_or_list, hilal_night_task **tasks,
                                         size_t *n, hilal_error *err)
{
    char **paths = NULL;
    int *hdus = NULL;
    size_t m = 0;
    *tasks = NULL;
    *n = 0;
    hilal_status st = hilal_night_list_inputs(dir_or_list, &paths, &hdus, &m, err);
    if (st != HILAL_OK)
        return st;
    if (m == 0) {
        hilal_night_free_list(paths, hdus, m);
        return hilal_error_set(err, HILAL_ERR_NOTFOUND,
                               "%s holds no FITS files (*.fits, *.fit, *.fts, .gz or .fz)",
                               dir_or_list);
    }
    hilal_night_task *t = calloc(m, sizeof *t);
    if (t == NULL) {
        hilal_night_free_list(paths, hdus, m);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < m; i++) {
        if (strlen(paths[i]) >= sizeof t[i].sci_path) {
            st = hilal_error_set(err, HILAL_ERR_RANGE, "path too long: %s", paths[i]);
            break;
        }
        textf(t[i].sci_path, sizeof t[i].sci_path, "%s", paths[i]);
        t[i].sci_hdu = hdus[i];
        task_set_name(&t[i], paths[i]);
        hilal_night_task_reset(&t[i]);
    }
    hilal_night_free_list(paths, hdus, m);
    if (st != HILAL_OK) {
        free(t);
        return st;
    }
    *tasks = t;
    *n = m;
    return HILAL_OK;
}

typedef struct row_key { int64_t frame_id; size_t row; } row_key;

static int row_key_cmp(const void *a, const void *b)
{
    const row_key *x = a, *y = b;
    if (x->frame_id != y->frame_id)
        return x->frame_id < y->frame_id ? -1 : 1;
    return x->row < y->row ? -1 : (x->row > y->row);
}

typedef struct first_last { size_t first, last; } first_last;

static int first_cmp(const void *a, const void *b)
{
    const first_last *x = a, *y = b;
    return x->first < y->first ? -1 : (x->first > y->first);
}

hilal_status hilal_night_tasks_from_archive(const char *archive, int32_t run_id,
                                            hilal_night_task **tasks, size_t *n,
                                            hilal_error *err)
{
    hilal_archive *ar = NULL;
    hilal_archive_frame *rows = NULL;
    row_key *keys = NULL;
    first_last *groups = NULL;
    hilal_night_task *t = NULL;
    size_t nrows = 0, nk = 0, ng = 0;
    *tasks = NULL;
    *n = 0;
    hilal_status st = hilal_archive_open_read(archive, &ar, err);
    if (st == HILAL_OK)
        st = hilal_archive_read_frames(ar, &rows, &nrows, NULL, err);
    if (st != HILAL_OK)
        goto cleanup;
    keys = malloc((nrows > 0 ? nrows : 1) * sizeof *keys);
    groups = malloc((nrows > 0 ? nrows : 1) * sizeof *groups);
    if (keys == NULL || groups == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    /* One task per frame id: its first row fixes the order, its latest row
     * the paths and checksums. */
    for (size_t i = 0; i < nrows; i++)
        if (rows[i].status != HILAL_ARCHIVE_FRAME_NONE && (run_id == 0 || rows[i].run_id == run_id))
            keys[nk++] = (row_key){rows[i].frame_id, i};
    qsort(keys, nk, sizeof *keys, row_key_cmp);
    for (size_t i = 0; i < nk; i++) {
        if (i == 0 || keys[i].frame_id != keys[i - 1].frame_id)
            groups[ng++] = (first_last){keys[i].row, keys[i].row};
        else
            groups[ng - 1].last = keys[i].row;
    }
    qsort(groups, ng, sizeof *groups, first_cmp);
    if (ng == 0) {
        st = run_id != 0 ? hilal_error_set(err, HILAL_ERR_NOTFOUND, "archive %s has no frames of run %d",
                                           archive, (int)run_id)
                         : hilal_error_set(err, HILAL_ERR_NOTFOUND, "archive %s has no frames", archive);
        goto cleanup;
    }
    t = calloc(ng, sizeof *t);
    if (t == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t g = 0; g < ng; g++) {
        const hilal_archive_frame *r = &rows[groups[g].last];
        hilal_night_task *k = &t[g];
        textf(k->name, sizeof k->name, "%s", r->frame_name);
        textf(k->sci_path, sizeof k->sci_path, "%s", r->path);
        k->sci_hdu = r->hdu;
        textf(k->sci_sha256, sizeof k->sci_sha256, "%s", r->sha256);
        textf(k->ref_path, sizeof k->ref_path, "%s", r->ref_path);
        k->ref_hdu = r->ref_hdu;
        textf(k->ref_sha256, sizeof k->ref_sha256, "%s", r->ref_sha256);
        hilal_night_task_reset(k);
    }
    *tasks = t;
    *n = ng;
    t = NULL;
cleanup:
    hilal_archive_free(ar);
    free(rows);
    free(keys);
    free(groups);
    free(t);
    return st;
}

/* ------------------------------------------------------------------------
 * What is done already
 * ------------------------------------------------------------------------ */

static int done_cmp(const void *a, const void *b)
{
    const hilal_night_done *x = a, *y = b;
    if (x->frame_id != y->frame_id)
        return x->frame_id < y->frame_id ? -1 : 1;
    /* committed (1) before failed (3) */
    return (x->status > y->status) - (x->status < y->status);
}

hilal_status hilal_night_done_list(hilal_archive *ar, int32_t run_id, hilal_night_done **done,
                                   size_t *n, hilal_error *err)
{
    hilal_archive_frame *rows = NULL;
    unsigned char *cur = NULL;
    size_t nrows = 0, m = 0;
    *done = NULL;
    *n = 0;
    hilal_status st = hilal_archive_read_frames(ar, &rows, &nrows, &cur, err);
    if (st != HILAL_OK)
        return st;
    hilal_night_done *d = malloc((nrows > 0 ? nrows : 1) * sizeof *d);
    if (d == NULL) {
        free(rows);
        free(cur);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < nrows; i++) {
        if (rows[i].run_id != run_id)
            continue;
        if (cur[i])
            d[m++] = (hilal_night_done){rows[i].frame_id, HILAL_ARCHIVE_FRAME_COMMITTED};
        else if (rows[i].status == HILAL_ARCHIVE_FRAME_FAILED)
            d[m++] = (hilal_night_done){rows[i].frame_id, HILAL_ARCHIVE_FRAME_FAILED};
    }
    qsort(d, m, sizeof *d, done_cmp);
    /* One entry per frame: a commit wins over failures. */
    size_t k = 0;
    for (size_t i = 0; i < m; i++)
        if (k == 0 || d[k - 1].frame_id != d[i].frame_id)
            d[k++] = d[i];
    free(rows);
    free(cur);
    *done = d;
    *n = k;
    return HILAL_OK;
}

static int32_t done_lookup(const hilal_night_done *done, size_t n, int64_t frame_id)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (done[mid].frame_id < frame_id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && done[lo].frame_id == frame_id ? done[lo].status : 0;
}

/* ------------------------------------------------------------------------
 * The engine
 * ------------------------------------------------------------------------ */

struct hilal_night_engine {
    const hilal_config *cfg;
    hilal_reflib *lib;
    hilal_archive *ar;
    int32_t run_id;
    const hilal_night_done *done;
    size_t ndone;
    int retry_failed;
    hilal_ingest_opts ingest;
    hilal_runner *before;            /* registry stages before the archive */
    hilal_runner *after;             /* a no-op stage, then those after it; NULL if none */
    hilal_stage made;                /* the no-op stage: "makes" what came before */
    const hilal_stage *after_list[HILAL_NIGHT_MAX_STAGES];
    size_t nbefore, nafter;          /* nafter counts the real stages only */
    size_t archive_slot;             /* index of "archive" in the timing order */
    char names[HILAL_NIGHT_MAX_STAGES][24];
    size_t nnames;
};

size_t hilal_night_stage_names(char names[HILAL_NIGHT_MAX_STAGES][24])
{
    size_t ns = 0;
    const hilal_stage *const *reg = hilal_registry_stages(&ns);
    if (ns > HILAL_NIGHT_MAX_STAGES)
        ns = HILAL_NIGHT_MAX_STAGES;
    for (size_t i = 0; i < ns; i++)
        textf(names[i], 24, "%s", reg[i]->name);
    return ns;
}

static hilal_status made_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    (void)state;
    (void)frame;
    (void)err;
    return HILAL_OK;
}

hilal_status hilal_night_engine_new(const hilal_config *cfg, hilal_reflib *lib,
                                    hilal_archive *ar, int32_t run_id,
                                    const hilal_night_done *done, size_t ndone,
                                    int retry_failed, hilal_night_engine **out,
                                    hilal_error *err)
{
    size_t ns = 0, ia = 0;
    hilal_status st = HILAL_OK;
    *out = NULL;
    hilal_night_engine *eng = calloc(1, sizeof *eng);
    if (eng == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    eng->cfg = cfg;
    eng->lib = lib;
    eng->ar = ar;
    eng->run_id = run_id;
    eng->done = done;
    eng->ndone = ndone;
    eng->retry_failed = retry_failed;
    st = hilal_ingest_opts_from_config(cfg, &eng->ingest, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* Split the registry at the archive stage: the engine commits frames
     * itself, through the handle that also records failures. */
    const hilal_stage *const *reg = hilal_registry_stages(&ns);
    for (ia = 0; ia < ns; ia++)
        if (strcmp(reg[ia]->name, "archive") == 0)
            break;
    if (ia == ns || ns > HILAL_NIGHT_MAX_STAGES - 1) {
        st = hilal_error_set(err, HILAL_ERR_INTERNAL,
                             "the stage registry has no archive stage (or too many stages)");
        goto cleanup;
    }
    st = hilal_runner_new(cfg, reg, ia, &eng->before, err);
    if (st != HILAL_OK)
        goto cleanup;
    eng->nbefore = ia;
    unsigned made = 0;
    for (size_t i = 0; i <= ia; i++)
        made |= reg[i]->makes;
    if (ia + 1 < ns) {
        /* Stages after the archive see every product made up to it: a
         * no-op first stage declares them, so the runner's chain check
         * holds for this second runner. */
        eng->made = (hilal_stage){.name = "committed",
                                  .summary = "products made before the archive",
                                  .makes = made,
                                  .run = made_run};
        eng->after_list[0] = &eng->made;
        for (size_t i = ia + 1; i < ns; i++)
            eng->after_list[1 + i - (ia + 1)] = reg[i];
        eng->nafter = ns - (ia + 1);
        st = hilal_runner_new(cfg, eng->after_list, eng->nafter + 1, &eng->after, err);
        if (st != HILAL_OK)
            goto cleanup;
    }
    eng->nnames = hilal_night_stage_names(eng->names);
    eng->archive_slot = ia;
cleanup:
    if (st != HILAL_OK) {
        hilal_night_engine_free(eng);
        return st;
    }
    *out = eng;
    return HILAL_OK;
}

void hilal_night_engine_free(hilal_night_engine *eng)
{
    if (eng == NULL)
        return;
    hilal_runner_free(eng->after);
    hilal_runner_free(eng->before);
    free(eng);
}

size_t hilal_night_engine_stages(const hilal_night_engine *eng,
                                 char names[HILAL_NIGHT_MAX_STAGES][24])
{
    for (size_t i = 0; i < eng->nnames; i++)
        memcpy(names[i], eng->names[i], sizeof names[i]);
    return eng->nnames;
}

/* Records a failed frame in the archive and in the task. An archive error
 * is returned (the night cannot go on). */
static hilal_status fail_frame(hilal_night_engine *eng, hilal_night_task *t,
                               const hilal_frame *frame, const char *why, hilal_error *err)
{
    t->status = HILAL_NIGHT_FAILED;
    textf(t->message, sizeof t->message, "%s", why);
    hilal_log(HILAL_LOG_WARN, "%s", why);
    hilal_status st = hilal_archive_record_failure(eng->ar, eng->run_id, frame, why, err);
    if (st != HILAL_OK)
        t->status = HILAL_NIGHT_PENDING;
    return st;
}

/* Checks a file against its recorded checksum: HILAL_NIGHT_MISSING,
 * HILAL_NIGHT_CHANGED or 0 (unchanged). */
static int check_input(const char *what, const char *path, const char *sha, char *msg,
                       size_t len)
{
    char now[65];
    hilal_error e = {0};
    if (access(path, F_OK) != 0) {
        textf(msg, len, "%s file %s no longer exists (%s)", what, path, strerror(errno));
        return HILAL_NIGHT_MISSING;
    }
    if (hilal_sha256_file(path, now, &e) != HILAL_OK) {
        textf(msg, len, "%s file %s cannot be read: %s", what, path, e.msg);
        return HILAL_NIGHT_MISSING;
    }
    if (strcmp(now, sha) != 0) {
        textf(msg, len, "%s file %s has changed since it was recorded (SHA-256 %.16s... now, "
                 "%.16s... recorded)", what, path, now, sha);
        return HILAL_NIGHT_CHANGED;
    }
    return 0;
}

/* The reference of a frame: the task's fixed one, else the library's
 * match. Returns 0 and sets frame->ref, or a task status for why not
 * (message in t->message). */
static int find_reference(hilal_night_engine *eng, hilal_night_task *t, hilal_frame *frame)
{
    hilal_error e = {0};
    size_t idx = 0;
    double overlap = NAN;
    if (t->ref_path[0] != '\0') {
        if (t->ref_sha256[0] != '\0') {
            int s = check_input("reference", t->ref_path, t->ref_sha256, t->message,
                                sizeof t->message);
            if (s != 0)
                return s;
        }
        long k = hilal_reflib_find(eng->lib, t->ref_path, t->ref_hdu);
        if (k < 0) {
            /* Not in the library: it could not be read when the night
             * started. Read it again for the reason. */
            hilal_image *img = NULL;
            if (hilal_ingest_read(&eng->ingest, t->ref_path, t->ref_hdu, &img, NULL, &e) == HILAL_OK) {
                hilal_image_free(img);
                textf(t->message, sizeof t->message, "reference %s was not loaded", t->ref_path);
            } else {
                textf(t->message, sizeof t->message, "reference %s: %s", t->ref_path, e.msg);
            }
            return HILAL_NIGHT_FAILED;
        }
        idx = (size_t)k;
    } else {
        hilal_status st = hilal_reflib_match(eng->lib, frame->sci, &idx, &overlap, &e);
        if (st != HILAL_OK) {
            textf(t->message, sizeof t->message, "%s", e.msg);
            return st == HILAL_ERR_NOTFOUND ? HILAL_NIGHT_NOREF : HILAL_NIGHT_FAILED;
        }
    }
    const hilal_reflib_entry *re = hilal_reflib_entry_at(eng->lib, idx);
    if (hilal_reflib_get(eng->lib, idx, &frame->ref, &e) != HILAL_OK) {
        textf(t->message, sizeof t->message, "%s", e.msg);
        return HILAL_NIGHT_FAILED;
    }
    textf(frame->ref_path, sizeof frame->ref_path, "%s", re->path);
    frame->ref_hdu = re->hdu;
    textf(t->ref_used, sizeof t->ref_used, "%s", re->path);
    t->overlap = overlap;
    return 0;
}

hilal_status hilal_night_engine_process(hilal_night_engine *eng, hilal_night_task *t,
                                        hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_error ferr = {0};
    hilal_frame frame;
    double t0 = hilal_night_now_s();
    hilal_night_task_reset(t);
    hilal_frame_init(&frame);
    textf(frame.frame_id, sizeof frame.frame_id, "%s", t->name);
    textf(frame.sci_path, sizeof frame.sci_path, "%s", t->sci_path);
    frame.sci_hdu = t->sci_hdu;

    /* 1. Reprocessing: the science file must be the one recorded. */
    if (t->sci_sha256[0] != '\0') {
        int s = check_input("science", t->sci_path, t->sci_sha256, t->message, sizeof t->message);
        if (s != 0) {
            t->status = s;
            hilal_log(HILAL_LOG_WARN, "frame %s: %s", t->name, t->message);
            goto cleanup;
        }
    }

    /* 2. The science image, and whether this run has it already. */
    hilal_status rst = hilal_ingest_read(&eng->ingest, t->sci_path, t->sci_hdu, &frame.sci, NULL,
                                         &ferr);
    t->stage_seconds[0] = hilal_night_now_s() - t0;
    if (rst != HILAL_OK) {
        /* Identified by the bytes of the file, as the archive records it. */
        char sha[65] = "";
        hilal_error ignored = {0};
        if (hilal_sha256_file(t->sci_path, sha, &ignored) != HILAL_OK)
            sha[0] = '\0';
        t->frame_id = hilal_archive_frame_id(sha, t->sci_hdu, t->name);
        if (done_lookup(eng->done, eng->ndone, t->frame_id) == HILAL_ARCHIVE_FRAME_FAILED &&
            !eng->retry_failed) {
            t->status = HILAL_NIGHT_FAILED_BEFORE;
            textf(t->message, sizeof t->message, "recorded as failed by this run before: %s",
                     ferr.msg);
            goto cleanup;
        }
        hilal_error_context(&ferr, "frame %s, science", t->name);
        st = fail_frame(eng, t, &frame, ferr.msg, err);
        goto cleanup;
    }
    t->frame_id = hilal_archive_frame_id(frame.sci->meta.sha256, frame.sci->meta.hdu, t->name);
    int32_t before = done_lookup(eng->done, eng->ndone, t->frame_id);
    if (before == HILAL_ARCHIVE_FRAME_COMMITTED) {
        t->status = HILAL_NIGHT_ALREADY;
        hilal_log(HILAL_LOG_INFO, "frame %s: already in the archive (run %d)", t->name,
                  (int)eng->run_id);
        goto cleanup;
    }
    if (before == HILAL_ARCHIVE_FRAME_FAILED && !eng->retry_failed) {
        t->status = HILAL_NIGHT_FAILED_BEFORE;
        textf(t->message, sizeof t->message,
                 "recorded as failed by this run before (see the archive's /frames message); "
                 "--retry-failed runs it again");
        goto cleanup;
    }

    /* 3. Its reference. */
    int s = find_reference(eng, t, &frame);
    if (s == HILAL_NIGHT_NOREF || s == HILAL_NIGHT_MISSING || s == HILAL_NIGHT_CHANGED) {
        t->status = s;
        hilal_log(HILAL_LOG_WARN, "frame %s %s: %s", t->name, hilal_night_status_name(s),
                  t->message);
        goto cleanup;
    }
    if (s != 0) {
        char why[sizeof t->message];
        textf(why, sizeof why, "frame %s: %s", t->name, t->message);
        st = fail_frame(eng, t, &frame, why, err);
        goto cleanup;
    }

    /* 4. The stages up to the archive. */
    double read_s = t->stage_seconds[0];
    st = hilal_runner_run(eng->before, &frame, &ferr);
    for (size_t i = 0; i < eng->nbefore; i++)
        t->stage_seconds[i] = frame.stage_seconds[i];
    t->stage_seconds[0] += read_s;
    if (st != HILAL_OK) {
        st = fail_frame(eng, t, &frame, ferr.msg, err);
        goto cleanup;
    }

    /* 5. The commit. An archive that cannot be written stops the night. */
    double ta = hilal_night_now_s();
    hilal_archive_commit commit;
    st = hilal_archive_append_frame(eng->ar, eng->run_id, &frame, &commit, err);
    if (st != HILAL_OK) {
        textf(t->message, sizeof t->message, "%s", err != NULL ? err->msg : "archive error");
        goto cleanup;
    }
    for (size_t i = 0; i < frame.ncands; i++)
        frame.cands[i].cand_id = commit.first_cand_id + (int64_t)i;
    frame.products |= HILAL_PROD_ARCHIVED;
    t->stage_seconds[eng->archive_slot] = hilal_night_now_s() - ta;
    t->status = HILAL_NIGHT_DONE;
    t->ncands = (int32_t)frame.ncands;
    for (size_t i = 0; i < frame.ncands; i++) {
        t->npos += frame.cands[i].snr > 0;
        t->nneg += frame.cands[i].snr < 0;
        t->nreal += frame.cands[i].rb >= 0.5;
    }

    /* 6. Stages after the archive (the frame is committed whatever they do). */
    if (eng->after != NULL) {
        hilal_status ast = hilal_runner_run(eng->after, &frame, &ferr);
        for (size_t i = 0; i < eng->nafter; i++)
            t->stage_seconds[eng->archive_slot + 1 + i] = frame.stage_seconds[i + 1];
        if (ast != HILAL_OK) {
            t->status = HILAL_NIGHT_FAILED;
            textf(t->message, sizeof t->message, "committed, then %s", ferr.msg);
            hilal_log(HILAL_LOG_WARN, "%s", t->message);
        }
    }
    hilal_log(HILAL_LOG_INFO, "frame %s: done, %d candidates (reference %s)", t->name,
              (int)t->ncands, t->ref_used);
cleanup:
    hilal_frame_clear(&frame);
    t->seconds = hilal_night_now_s() - t0;
    return st;
}

/* ------------------------------------------------------------------------
 * The worker pool
 * ------------------------------------------------------------------------ */

typedef struct pool {
    hilal_night_engine *eng;
    hilal_night_task *tasks;
    hilal_night_next_fn next;
    void *user;
    pthread_mutex_t mutex;
    int stop;               /* a fatal error happened: hand out nothing more */
    hilal_status st;        /* the first fatal error */
    hilal_error err;
} pool;

static void *pool_thread(void *arg)
{
    pool *p = arg;
    hilal_night_task *finished = NULL;
    for (;;) {
        long idx = p->next(p->user, finished, __atomic_load_n(&p->stop, __ATOMIC_ACQUIRE));
        if (idx < 0)
            break;
        hilal_night_task *t = &p->tasks[idx];
        hilal_error e = {0};
        hilal_status st = hilal_night_engine_process(p->eng, t, &e);
        finished = t;
        if (st != HILAL_OK) {
            pthread_mutex_lock(&p->mutex);
            if (p->st == HILAL_OK) {
                p->st = st;
                p->err = e;
            }
            pthread_mutex_unlock(&p->mutex);
            __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

hilal_status hilal_night_pool(hilal_night_engine *eng, hilal_night_task *tasks, int nthreads,
                              hilal_night_next_fn next, void *user, hilal_error *err)
{
    pool p = {.eng = eng, .tasks = tasks, .next = next, .user = user, .st = HILAL_OK};
    pthread_t th[256];
    int started = 0;
    if (nthreads < 1)
        nthreads = 1;
    if (nthreads > 256)
        nthreads = 256;
    pthread_mutex_init(&p.mutex, NULL);
    /* Thread 0 is the calling thread; the others are started here. A
     * thread that cannot be started is simply not there: fewer workers. */
    for (int i = 1; i < nthreads; i++)
        if (pthread_create(&th[started], NULL, pool_thread, &p) == 0)
            started++;
    pool_thread(&p);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    pthread_mutex_destroy(&p.mutex);
    if (p.st != HILAL_OK)
        return hilal_error_set(err, p.st, "%s", p.err.msg);
    return HILAL_OK;
}

/* ------------------------------------------------------------------------
 * Tallies and the report
 * ------------------------------------------------------------------------ */

typedef struct task_key { int64_t frame_id; size_t i; } task_key;

static int task_key_cmp(const void *a, const void *b)
{
    const task_key *x = a, *y = b;
    if (x->frame_id != y->frame_id)
        return x->frame_id < y->frame_id ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* First index in keys with this frame id, or n. */
static size_t task_key_find(const task_key *keys, size_t n, int64_t frame_id)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (keys[mid].frame_id < frame_id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && keys[lo].frame_id == frame_id ? lo : n;
}

hilal_status hilal_night_finish(hilal_archive *ar, int32_t run_id, hilal_night_task *tasks,
                                size_t n, hilal_night_result *res, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive_frame *rows = NULL;
    unsigned char *cur = NULL;
    hilal_archive_cand *cands = NULL;
    size_t nrows = 0, ncands = 0, nk = 0, nalready = 0;
    task_key *keys = malloc((n > 0 ? n : 1) * sizeof *keys);
    if (keys == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        int s = tasks[i].status;
        if ((s == HILAL_NIGHT_DONE || s == HILAL_NIGHT_ALREADY) && tasks[i].frame_id != 0)
            keys[nk++] = (task_key){tasks[i].frame_id, i};
        nalready += s == HILAL_NIGHT_ALREADY;
    }
    qsort(keys, nk, sizeof *keys, task_key_cmp);

    /* Candidate counts and limiting magnitudes from the committed rows. */
    st = hilal_archive_read_frames(ar, &rows, &nrows, &cur, err);
    for (size_t r = 0; r < nrows && st == HILAL_OK; r++) {
        if (!cur[r] || rows[r].run_id != run_id)
            continue;
        for (size_t k = task_key_find(keys, nk, rows[r].frame_id);
             k < nk && keys[k].frame_id == rows[r].frame_id; k++) {
            hilal_night_task *t = &tasks[keys[k].i];
            t->ncands = rows[r].n_candidates;
            t->limmag5 = rows[r].limmag5;
            if (t->ref_used[0] == '\0')
                textf(t->ref_used, sizeof t->ref_used, "%s", rows[r].ref_path);
        }
    }
    /* Signs and rb of frames committed before this run of the command. */
    if (st == HILAL_OK && nalready > 0) {
        hilal_archive_filter q;
        hilal_archive_filter_init(&q);
        q.run_id = run_id;
        st = hilal_archive_query(ar, &q, &cands, &ncands, err);
        for (size_t i = 0; i < nk; i++)
            if (tasks[keys[i].i].status == HILAL_NIGHT_ALREADY)
                tasks[keys[i].i].npos = tasks[keys[i].i].nneg = tasks[keys[i].i].nreal = 0;
        for (size_t c = 0; c < ncands && st == HILAL_OK; c++)
            for (size_t k = task_key_find(keys, nk, cands[c].frame_id);
                 k < nk && keys[k].frame_id == cands[c].frame_id; k++) {
                hilal_night_task *t = &tasks[keys[k].i];
                if (t->status != HILAL_NIGHT_ALREADY)
                    continue;
                t->npos += cands[c].snr > 0;
                t->nneg += cands[c].snr < 0;
                t->nreal += cands[c].rb >= 0.5;
            }
    }
    res->ntasks = n;
    memset(res->count, 0, sizeof res->count);
    res->ncands = res->npos = res->nneg = res->nreal = 0;
    for (size_t s = 0; s < HILAL_NIGHT_MAX_STAGES; s++)
        res->stage_seconds[s] = 0;
    for (size_t i = 0; i < n; i++) {
        const hilal_night_task *t = &tasks[i];
        if (t->status >= 0 && t->status < 8)
            res->count[t->status]++;
        if (t->status == HILAL_NIGHT_DONE || t->status == HILAL_NIGHT_ALREADY) {
            res->ncands += (size_t)t->ncands;
            res->npos += (size_t)t->npos;
            res->nneg += (size_t)t->nneg;
            res->nreal += (size_t)t->nreal;
        }
        if (t->status == HILAL_NIGHT_DONE || t->status == HILAL_NIGHT_FAILED)
            for (size_t s = 0; s < res->nstages && s < HILAL_NIGHT_MAX_STAGES; s++)
                res->stage_seconds[s] += t->stage_seconds[s];
    }
    free(keys);
    free(rows);
    free(cur);
    free(cands);
    return st;
}

/* Writes s as a JSON string. */
static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p == '\n')
            fputs("\\n", f);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

/* A number, or null when not finite (JSON has no NaN). */
static void json_num(FILE *f, double v, const char *fmt)
{
    if (isfinite(v))
        fprintf(f, fmt, v);
    else
        fputs("null", f);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

hilal_status hilal_night_write_report(const char *path, const char *archive_path,
                                      const hilal_night_task *tasks, size_t n,
                                      const hilal_night_result *res, hilal_error *err)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot write the report %s: %s", tmp,
                               strerror(errno));
    double *lim = malloc((n > 0 ? n : 1) * sizeof *lim);
    size_t nlim = 0;
    for (size_t i = 0; lim != NULL && i < n; i++)
        if (isfinite(tasks[i].limmag5))
            lim[nlim++] = tasks[i].limmag5;
    if (lim != NULL)
        qsort(lim, nlim, sizeof *lim, cmp_double);
    char stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);

    fprintf(f, "{\n  \"report_schema\": 1,\n  \"software_version\": ");
    json_str(f, hilal_version());
    fprintf(f, ",\n  \"written_utc\": \"%s\",\n  \"archive\": ", stamp);
    json_str(f, archive_path);
    fprintf(f, ",\n  \"run_id\": %d,\n  \"config_hash\": \"%s\",\n", (int)res->run_id,
            res->config_hash);
    fprintf(f, "  \"workers\": %d,\n  \"ranks\": %d,\n  \"wall_s\": %.3f,\n", res->workers,
            res->ranks, res->wall_s);
    fprintf(f, "  \"frames_per_minute\": ");
    json_num(f, res->wall_s > 0 ? 60.0 * (double)res->count[HILAL_NIGHT_DONE] / res->wall_s : NAN,
             "%.3f");
    fprintf(f, ",\n  \"reference_reads\": %zu,\n", res->ref_reads);
    fprintf(f, "  \"frames\": {\"total\": %zu, \"done\": %zu, \"already_done\": %zu, "
               "\"failed\": %zu, \"failed_before\": %zu, \"skipped_no_reference\": %zu, "
               "\"missing_input\": %zu, \"changed_input\": %zu, \"not_processed\": %zu},\n",
            res->ntasks, res->count[HILAL_NIGHT_DONE], res->count[HILAL_NIGHT_ALREADY],
            res->count[HILAL_NIGHT_FAILED], res->count[HILAL_NIGHT_FAILED_BEFORE],
            res->count[HILAL_NIGHT_NOREF], res->count[HILAL_NIGHT_MISSING],
            res->count[HILAL_NIGHT_CHANGED], res->count[HILAL_NIGHT_PENDING]);
    fprintf(f, "  \"candidates\": {\"total\": %zu, \"brightening\": %zu, \"fading\": %zu, "
               "\"rb_ge_0_5\": %zu},\n", res->ncands, res->npos, res->nneg, res->nreal);
    fprintf(f, "  \"limiting_mag5\": {\"frames\": %zu, \"min\": ", nlim);
    json_num(f, nlim > 0 ? lim[0] : NAN, "%.3f");
    fprintf(f, ", \"median\": ");
    json_num(f, nlim > 0 ? (nlim % 2 ? lim[nlim / 2] : 0.5 * (lim[nlim / 2 - 1] + lim[nlim / 2]))
                         : NAN, "%.3f");
    fprintf(f, ", \"max\": ");
    json_num(f, nlim > 0 ? lim[nlim - 1] : NAN, "%.3f");
    fprintf(f, "},\n  \"stage_seconds\": {");
    for (size_t s = 0; s < res->nstages; s++) {
        fprintf(f, "%s", s ? ", " : "");
        json_str(f, res->stage_names[s]);
        fprintf(f, ": %.3f", res->stage_seconds[s]);
    }
    fprintf(f, "},\n  \"frame_list\": [");
    for (size_t i = 0; i < n; i++) {
        const hilal_night_task *t = &tasks[i];
        fprintf(f, "%s\n    {\"name\": ", i ? "," : "");
        json_str(f, t->name);
        fprintf(f, ", \"path\": ");
        json_str(f, t->sci_path);
        fprintf(f, ", \"hdu\": %d, \"frame_id\": %lld, \"status\": ", t->sci_hdu,
                (long long)t->frame_id);
        json_str(f, hilal_night_status_name(t->status));
        fprintf(f, ", \"status_code\": %d, \"reason\": ", t->status);
        json_str(f, t->message);
        fprintf(f, ", \"reference\": ");
        json_str(f, t->ref_used);
        fprintf(f, ", \"overlap\": ");
        json_num(f, t->overlap, "%.4f");
        fprintf(f, ", \"candidates\": %d, \"brightening\": %d, \"fading\": %d, \"rb_ge_0_5\": %d"
                   ", \"limmag5\": ", (int)t->ncands, (int)t->npos, (int)t->nneg, (int)t->nreal);
        json_num(f, t->limmag5, "%.3f");
        fprintf(f, ", \"seconds\": %.3f, \"rank\": %d}", t->seconds, t->rank);
    }
    fprintf(f, "\n  ]\n}\n");
    free(lim);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        unlink(tmp);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot write the report %s", tmp);
    }
    if (rename(tmp, path) != 0) {
        hilal_status st = hilal_error_set(err, HILAL_ERR_IO, "cannot move the report to %s: %s",
                                          path, strerror(errno));
        unlink(tmp);
        return st;
    }
    return HILAL_OK;
}

/* ------------------------------------------------------------------------
 * MPI shards (also merged by a night in one process, when a killed MPI
 * night left them)
 * ------------------------------------------------------------------------ */

void hilal_night_shard_path(const char *archive, int rank, char *out, size_t len)
{
    snprintf(out, len, "%s.shard%d.h5", archive, rank);
}

/* Removes a merged shard and its journal. */
static void remove_shard(const char *path)
{
    char journal[4200];
    hilal_h5_journal_path(path, journal, sizeof journal);
    unlink(path);
    unlink(journal);
}

hilal_status hilal_night_merge_shards(hilal_archive *ar, const char *archive, size_t *nframes,
                                      hilal_error *err)
{
    char dir[4096], prefix[1100];
    const char *slash = strrchr(archive, '/');
    hilal_status st = HILAL_OK;
    char **found = NULL;
    size_t nfound = 0, cap = 0;
    *nframes = 0;
    if (slash != NULL) {
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - archive), archive);
        if (dir[0] == '\0')
            snprintf(dir, sizeof dir, "/");
    } else {
        snprintf(dir, sizeof dir, ".");
    }
    snprintf(prefix, sizeof prefix, "%s.shard", slash != NULL ? slash + 1 : archive);
    DIR *d = opendir(dir);
    if (d == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot read directory %s: %s", dir, strerror(errno));
    struct dirent *de;
    size_t plen = strlen(prefix);
    while ((de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        size_t len = strlen(name);
        if (len <= plen + 3 || strncmp(name, prefix, plen) != 0 || strcmp(name + len - 3, ".h5") != 0)
            continue;
        int digits = 1;
        for (size_t k = plen; k < len - 3; k++)
            digits &= name[k] >= '0' && name[k] <= '9';
        if (!digits)
            continue;
        if (nfound == cap) {
            char **p = realloc(found, (cap * 2 + 8) * sizeof *p);
            if (p == NULL) {
                st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
                break;
            }
            found = p;
            cap = cap * 2 + 8;
        }
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if ((found[nfound] = strdup(path)) == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
            break;
        }
        nfound++;
    }
    closedir(d);
    /* In rank order, so that merged rows come in a reproducible order. */
    for (size_t i = 1; i < nfound; i++)
        for (size_t j = i; j > 0 && strlen(found[j - 1]) > strlen(found[j]); j--) {
            char *tmp = found[j];
            found[j] = found[j - 1];
            found[j - 1] = tmp;
        }
    for (size_t i = 1; i < nfound; i++)
        for (size_t j = i; j > 0 && strlen(found[j - 1]) == strlen(found[j]) &&
                           strcmp(found[j - 1], found[j]) > 0; j--) {
            char *tmp = found[j];
            found[j] = found[j - 1];
            found[j - 1] = tmp;
        }
    for (size_t i = 0; i < nfound && st == HILAL_OK; i++) {
        size_t nf = 0, nc = 0;
        st = hilal_archive_merge(ar, found[i], &nf, &nc, err);
        if (st == HILAL_OK) {
            hilal_log(HILAL_LOG_INFO, "merged %zu frames (%zu candidates) of %s", nf, nc, found[i]);
            *nframes += nf;
            remove_shard(found[i]);
        }
    }
    for (size_t i = 0; i < nfound; i++)
        free(found[i]);
    free(found);
    return st;
}

/* ------------------------------------------------------------------------
 * One process
 * ------------------------------------------------------------------------ */

/* The archive options of the [archive] section. */
static void archive_options(const hilal_config *cfg, hilal_archive_options *opt)
{
    hilal_archive_options_init(opt);
    opt->cutout_size = (int)hilal_config_get_int(cfg, "archive.cutout_size");
    opt->psf_size = (int)hilal_config_get_int(cfg, "archive.psf_size");
    opt->compress_level = (int)hilal_config_get_int(cfg, "archive.compress");
    opt->cutout_compress_level = (int)hilal_config_get_int(cfg, "archive.cutout_compress");
    opt->fsync = hilal_config_get_bool(cfg, "archive.fsync");
}

hilal_status hilal_night_open_archive(const hilal_config *cfg, const char *path,
                                      hilal_archive **ar, hilal_error *err)
{
    hilal_archive_options opt;
    archive_options(cfg, &opt);
    hilal_status st = hilal_archive_open_write(path, &opt, ar, err);
    if (st == HILAL_OK && hilal_archive_recovered(*ar))
        hilal_log(HILAL_LOG_WARN, "archive %s had been left open by a writer that stopped; "
                  "recovered (committed frames kept, unfinished rows dropped)", path);
    return st;
}

hilal_status hilal_night_add_fixed_refs(hilal_reflib *lib, const hilal_night_task *tasks,
                                        size_t n, hilal_error *err)
{
    for (size_t i = 0; i < n; i++) {
        const hilal_night_task *t = &tasks[i];
        if (t->ref_path[0] == '\0' || hilal_reflib_find(lib, t->ref_path, t->ref_hdu) >= 0)
            continue;
        int seen = 0;
        for (size_t j = 0; j < i && !seen; j++)
            seen = strcmp(tasks[j].ref_path, t->ref_path) == 0 && tasks[j].ref_hdu == t->ref_hdu;
        if (seen)
            continue;
        hilal_error e = {0};
        hilal_status st = hilal_reflib_add(lib, t->ref_path, t->ref_hdu, NULL, &e);
        if (st == HILAL_ERR_NOMEM)
            return hilal_error_set(err, st, "%s", e.msg);
        if (st != HILAL_OK)
            hilal_log(HILAL_LOG_WARN, "%s", e.msg);
    }
    return HILAL_OK;
}

typedef struct local_farm {
    pthread_mutex_t mutex;
    size_t next, n, done;
    const hilal_night_options *opt;
} local_farm;

static long local_next(void *user, hilal_night_task *finished, int stopping)
{
    local_farm *lf = user;
    long idx = -1;
    pthread_mutex_lock(&lf->mutex);
    if (finished != NULL) {
        lf->done++;
        if (lf->opt->progress != NULL)
            lf->opt->progress(lf->opt->user, finished, lf->done, lf->n);
    }
    if (!stopping && lf->next < lf->n)
        idx = (long)lf->next++;
    pthread_mutex_unlock(&lf->mutex);
    return idx;
}

hilal_status hilal_night_run(const hilal_config *cfg, hilal_reflib *lib, hilal_night_task *tasks,
                             size_t n, const hilal_night_options *opt, hilal_night_result *res,
                             hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive *ar = NULL;
    hilal_night_done *done = NULL;
    hilal_night_engine *eng = NULL;
    size_t ndone = 0;
    double t0 = hilal_night_now_s();
    memset(res, 0, sizeof *res);
    if (opt == NULL || opt->archive_path == NULL || opt->archive_path[0] == '\0')
        return hilal_error_set(err, HILAL_ERR_USAGE, "the night needs an archive file");
    if (lib == NULL)
        return hilal_error_set(err, HILAL_ERR_USAGE, "the night needs a reference library "
                               "(hilal_reflib_new(), possibly empty for reprocessing)");
    int workers = opt->workers > 0 ? opt->workers : (int)hilal_config_get_int(cfg, "pipeline.workers");
    if (workers < 1)
        workers = 1;
    if ((size_t)workers > n && n > 0)
        workers = (int)n;
    for (size_t i = 0; i < n; i++)
        hilal_night_task_reset(&tasks[i]);

    size_t merged = 0;
    st = hilal_night_open_archive(cfg, opt->archive_path, &ar, err);
    if (st == HILAL_OK)
        st = hilal_night_merge_shards(ar, opt->archive_path, &merged, err);
    if (st == HILAL_OK && merged > 0)
        hilal_log(HILAL_LOG_WARN, "archive %s: merged %zu frames that an MPI night left in its "
                  "shards", opt->archive_path, merged);
    if (st == HILAL_OK)
        st = hilal_archive_begin_run_config(ar, cfg, &res->run_id, err);
    if (st == HILAL_OK)
        st = hilal_night_done_list(ar, res->run_id, &done, &ndone, err);
    if (st == HILAL_OK)
        st = hilal_night_add_fixed_refs(lib, tasks, n, err);
    if (st == HILAL_OK)
        st = hilal_night_engine_new(cfg, lib, ar, res->run_id, done, ndone, opt->retry_failed,
                                    &eng, err);
    if (st != HILAL_OK)
        goto cleanup;
    hilal_config_hash(cfg, res->config_hash);
    res->nstages = hilal_night_engine_stages(eng, res->stage_names);
    res->workers = workers;
    res->ranks = 1;
    if (ndone > 0)
        hilal_log(HILAL_LOG_INFO, "archive %s: run %d already holds %zu of its frames; they are "
                  "skipped", opt->archive_path, (int)res->run_id, ndone);

    local_farm lf = {.next = 0, .n = n, .done = 0, .opt = opt};
    pthread_mutex_init(&lf.mutex, NULL);
    st = hilal_night_pool(eng, tasks, workers, local_next, &lf, err);
    pthread_mutex_destroy(&lf.mutex);
    res->wall_s = hilal_night_now_s() - t0;
    res->ref_reads = hilal_reflib_reads(lib);
    hilal_status fst = hilal_night_finish(ar, res->run_id, tasks, n, res,
                                          st == HILAL_OK ? err : NULL);
    if (st == HILAL_OK)
        st = fst;
cleanup:
    hilal_night_engine_free(eng);
    free(done);
    if (ar != NULL) {
        hilal_status cst = hilal_archive_close(ar, st == HILAL_OK ? err : NULL);
        if (st == HILAL_OK)
            st = cst;
    }
    if (st != HILAL_OK)
        hilal_error_context(err, "night into %s", opt->archive_path);
    return st;
}

/* ------------------------------------------------------------------------
 * MPI: without it, only the answers that say so (mpi_farm.c has the rest)
 * ------------------------------------------------------------------------ */

int hilal_night_mpi_launched(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                                       "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i]) != NULL)
            return 1;
    return 0;
}

#ifndef HILAL_MPI
int hilal_night_mpi_built(void)
{
    return 0;
}

hilal_status hilal_night_mpi_init(int *rank, int *size, hilal_error *err)
{
    *rank = 0;
    *size = 1;
    return hilal_error_set(err, HILAL_ERR_USAGE,
                           "this hilal was built without MPI; rebuild with -DHILAL_MPI=ON "
                           "(needs libopenmpi-dev) to run a night across MPI ranks");
}

void hilal_night_mpi_finalize(void) {}

void hilal_night_mpi_abort(int code)
{
    (void)code;
}

hilal_status hilal_night_run_mpi(hilal_config *cfg, hilal_reflib *lib,
                                 hilal_night_task **tasks, size_t *n,
                                 const hilal_night_options *opt, hilal_night_result *res,
                                 hilal_error *err)
{
    (void)cfg;
    (void)lib;
    (void)tasks;
    (void)n;
    (void)opt;
    memset(res, 0, sizeof *res);
    return hilal_error_set(err, HILAL_ERR_USAGE, "this hilal was built without MPI");
}
#endif
