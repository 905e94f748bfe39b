/* Nightly batch processing: a night's science frames, each matched to a
 * reference image from a library, processed concurrently through the stage
 * chain and committed to one HDF5 archive; resumable after a crash, and
 * distributable over MPI ranks. docs/night.md describes the behaviour,
 * the report and the memory used per worker.
 *
 * The pieces:
 *  - the reference library (hilal_reflib_*): reference images indexed by
 *    filter, field name and WCS footprint, matched to each science frame
 *    and kept in a bounded cache, so each reference is read once and
 *    copied into every frame of its field;
 *  - tasks (hilal_night_task): one science input each, listed from a
 *    directory or list file, or from the /frames table of an archive (for
 *    reprocessing), with their outcome filled in by the run;
 *  - hilal_night_run(): the frames on a pool of worker threads of one
 *    process; hilal_night_run_mpi(): the same on MPI ranks (a dynamic task
 *    farm; only in builds made with -DHILAL_MPI=ON).
 *
 * Configuration: section [night] (field_key, min_overlap, match_filter,
 * report, ref_cache) and pipeline.workers / pipeline.threads.
 */
#ifndef HILAL_NIGHT_H
#define HILAL_NIGHT_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/config.h"
#include "hilal/image.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The [night] parameter section (registered in pipeline/registry.c). */
extern const hilal_param_section hilal_night_section;

/* ------------------------------------------------------------------------
 * Reference library
 * ------------------------------------------------------------------------ */

typedef struct hilal_reflib hilal_reflib;

/* What the library knows of one reference without holding its pixels. */
typedef struct hilal_reflib_entry {
    char path[1024];        /* file as given */
    int hdu;                /* 1-based HDU the image was read from */
    char sha256[65];        /* of the file */
    char filter[32];        /* FILTER (ingest.key_filter), "" if unknown */
    char field[72];         /* value of the night.field_key keyword, "" if none */
    long nx, ny;
    int has_wcs;            /* a usable celestial WCS */
    double ra_deg, dec_deg; /* footprint centre, NaN without WCS */
    double radius_deg;      /* centre to the farthest corner, NaN without WCS */
} hilal_reflib_entry;

/* An empty library configured from cfg: ingest options ([ingest]),
 * night.field_key, night.min_overlap, night.match_filter and the cache size
 * night.ref_cache (0 = workers + 2, with workers = pipeline.workers). The
 * configuration is read now and not kept. */
hilal_status hilal_reflib_new(const hilal_config *cfg, hilal_reflib **out, hilal_error *err);

/* Adds one reference image (hdu 0: the first image HDU with data), read
 * once through ingest; the pixels stay in the cache while it has room.
 * Adding the same file and HDU twice adds it once. *index (may be NULL)
 * receives its index. */
hilal_status hilal_reflib_add(hilal_reflib *lib, const char *path, int hdu, size_t *index,
                              hilal_error *err);

/* Adds every FITS file (*.fits, *.fit, *.fts, with .gz/.fz variants) of a
 * directory, in name order, or every line "PATH [HDU]" of a list file.
 * A file that cannot be read is left out with a warning and counted in
 * *nbad (may be NULL); HILAL_ERR_IO when the directory cannot be read. */
hilal_status hilal_reflib_add_dir(hilal_reflib *lib, const char *dir_or_list, size_t *nbad,
                                  hilal_error *err);

size_t hilal_reflib_count(const hilal_reflib *lib);
const hilal_reflib_entry *hilal_reflib_entry_at(const hilal_reflib *lib, size_t i);

/* Index of the entry read from path (and hdu, when hdu >= 1), or -1. */
long hilal_reflib_find(const hilal_reflib *lib, const char *path, int hdu);

/* The reference for a science image (as ingest made it):
 *  1. when night.field_key is set and the science header has that keyword,
 *     the entries with the same value (and filter) are the candidates, and
 *     the one covering most of the frame wins (the first by name when
 *     WCS are missing);
 *  2. otherwise, of the entries with the same filter (night.match_filter;
 *     an unknown filter matches any), the one whose footprint covers the
 *     largest fraction of the science footprint, if that fraction is at
 *     least night.min_overlap.
 * *overlap receives the fraction (NaN when decided by the field key
 * without WCS). HILAL_ERR_NOTFOUND with the reason (best overlap found,
 * filter, missing WCS) when no reference qualifies. Thread-safe. */
hilal_status hilal_reflib_match(hilal_reflib *lib, const hilal_image *sci, size_t *index,
                                double *overlap, hilal_error *err);

/* Fraction of the nx x ny image with WCS a that lies inside the
 * rnx x rny image with WCS b, on a grid of 16 x 16 points (0 when the
 * coordinate systems differ). */
double hilal_reflib_overlap(struct wcsprm *a, long nx, long ny, struct wcsprm *b, long rnx,
                            long rny);

/* A private copy of reference `index` for one frame (caller frees it with
 * hilal_image_free()): read on first use, then served from the cache,
 * which keeps the most recently used references up to its size. Thread-
 * safe: concurrent requests for a reference being read wait for it. */
hilal_status hilal_reflib_get(hilal_reflib *lib, size_t index, hilal_image **copy,
                              hilal_error *err);

/* How many times reference images were read from disk (adding included). */
size_t hilal_reflib_reads(const hilal_reflib *lib);

void hilal_reflib_free(hilal_reflib *lib);

/* ------------------------------------------------------------------------
 * Tasks and the night
 * ------------------------------------------------------------------------ */

/* What happened to a task. Values are written in reports; never renumber. */
typedef enum hilal_night_status {
    HILAL_NIGHT_PENDING = 0,       /* not processed (the night stopped early) */
    HILAL_NIGHT_DONE = 1,          /* processed and committed by this run */
    HILAL_NIGHT_ALREADY = 2,       /* already committed in this run of the archive: skipped */
    HILAL_NIGHT_FAILED = 3,        /* failed; recorded in the archive with the reason */
    HILAL_NIGHT_NOREF = 4,         /* skipped: no reference matches it */
    HILAL_NIGHT_MISSING = 5,       /* an input file no longer exists */
    HILAL_NIGHT_CHANGED = 6,       /* an input's checksum differs from the recorded one */
    HILAL_NIGHT_FAILED_BEFORE = 7  /* recorded as failed by this run before: not retried */
} hilal_night_status;

/* "done", "already done", "failed", "skipped: no reference", ... */
const char *hilal_night_status_name(int status);

/* Whether a status counts as a failure for the exit code (FAILED,
 * MISSING, CHANGED, FAILED_BEFORE). */
int hilal_night_status_is_failure(int status);

#define HILAL_NIGHT_MAX_STAGES 32

/* One science input and, after the run, its outcome. Plain data (no
 * pointers), so it can be copied between MPI ranks. */
typedef struct hilal_night_task {
    /* Input */
    char name[64];          /* frame name (file name without directories) */
    char sci_path[1024];
    int sci_hdu;            /* 0 = first image HDU with data */
    char ref_path[1024];    /* fixed reference (reprocessing); "" = match in the library */
    int ref_hdu;
    char sci_sha256[65];    /* expected checksums (reprocessing); "" = not checked */
    char ref_sha256[65];
    /* Outcome */
    int status;             /* hilal_night_status */
    char message[512];      /* why it failed or was skipped */
    char ref_used[1024];    /* reference it was processed against */
    double overlap;         /* footprint fraction covered by that reference, NaN if unknown */
    int64_t frame_id;       /* archive frame id, 0 if the file could not be identified */
    int32_t ncands, npos, nneg, nreal; /* candidates: all, brightening, fading, rb >= 0.5 */
    double limmag5;         /* 5-sigma limiting magnitude from the archive row, NaN if none */
    double seconds;         /* wall time spent on it */
    double stage_seconds[HILAL_NIGHT_MAX_STAGES]; /* per stage, in hilal_night_result order */
    int rank;               /* MPI rank that processed it (0 in a single process) */
} hilal_night_task;

/* Lists the science frames of a directory (FITS files as in
 * hilal_reflib_add_dir(), in name order; hdu 0) or of a list file (lines
 * "PATH [HDU]"; '#' starts a comment; relative paths are relative to the
 * list file's directory). *tasks is malloc'd (caller frees). An empty
 * input is HILAL_ERR_NOTFOUND. */
hilal_status hilal_night_tasks_from_path(const char *dir_or_list, hilal_night_task **tasks,
                                         size_t *n, hilal_error *err);

/* The frames recorded in an archive, for reprocessing: one task per
 * distinct frame (frame id) of run run_id (0 = of any run), from its latest
 * row, with the recorded science and reference paths, HDUs and checksums
 * (so that a missing or changed input is reported). *tasks is malloc'd. */
hilal_status hilal_night_tasks_from_archive(const char *archive, int32_t run_id,
                                            hilal_night_task **tasks, size_t *n,
                                            hilal_error *err);

typedef struct hilal_night_options {
    const char *archive_path;  /* required */
    int workers;               /* frames in flight; 0 = pipeline.workers */
    int retry_failed;          /* also rerun frames this run recorded as failed */
    /* Called after each task, serialised (never concurrently), with the
     * counts so far. May be NULL. */
    void (*progress)(void *user, const hilal_night_task *task, size_t done, size_t total);
    void *user;
} hilal_night_options;

typedef struct hilal_night_result {
    int32_t run_id;             /* run of the archive the frames went to */
    char config_hash[65];
    size_t ntasks;
    size_t count[8];            /* tasks per hilal_night_status */
    size_t ncands, npos, nneg, nreal; /* candidates of the frames done or already done */
    size_t nstages;             /* stages timed, in chain order */
    char stage_names[HILAL_NIGHT_MAX_STAGES][24];
    double stage_seconds[HILAL_NIGHT_MAX_STAGES]; /* summed over the frames processed */
    double wall_s;              /* of the whole night */
    int workers;                /* worker threads per process */
    int ranks;                  /* processes (MPI ranks doing frames; 1 without MPI) */
    size_t ref_reads;           /* reference images read from disk */
} hilal_night_result;

/* Processes the tasks: each frame is read, matched to its reference (or
 * given its fixed one), run through every stage of the registry and
 * committed to the archive (created if missing) under the run of this
 * configuration (hilal_archive_begin_run_config()). Frames committed
 * before in the same run (same input SHA-256 and HDU) are skipped, so
 * rerunning after a crash finishes the night without processing any
 * frame twice; frames recorded as failed in the run are skipped too
 * unless opt->retry_failed. A frame that fails is recorded with its
 * reason and the night goes on. Afterwards every task that is in the
 * archive gets its candidate counts and limiting magnitude from it.
 *
 * Returns HILAL_OK when the night ran, whatever happened to single frames
 * (see res->count and the tasks); an error when it could not run (bad
 * configuration, archive not writable, out of memory). */
hilal_status hilal_night_run(const hilal_config *cfg, hilal_reflib *lib, hilal_night_task *tasks,
                             size_t n, const hilal_night_options *opt, hilal_night_result *res,
                             hilal_error *err);

/* Writes the run report as JSON (atomically: a temporary file renamed over
 * path). The schema is in docs/night.md. */
hilal_status hilal_night_write_report(const char *path, const char *archive_path,
                                      const hilal_night_task *tasks, size_t n,
                                      const hilal_night_result *res, hilal_error *err);

/* ------------------------------------------------------------------------
 * MPI (builds made with -DHILAL_MPI=ON)
 * ------------------------------------------------------------------------ */

/* 1 when this library was built with MPI. */
int hilal_night_mpi_built(void);

/* 1 when the process was started by an MPI launcher (mpirun, mpiexec,
 * srun with PMI): its environment names a rank. */
int hilal_night_mpi_launched(void);

/* Initialises MPI (once per process) and gives this process's rank and
 * the number of ranks. HILAL_ERR_USAGE in a build without MPI. */
hilal_status hilal_night_mpi_init(int *rank, int *size, hilal_error *err);

/* Ends MPI (after hilal_night_run_mpi()). No-op without MPI. */
void hilal_night_mpi_finalize(void);

/* Stops every rank with the exit code (MPI_Abort): for errors on one rank
 * before the ranks meet in hilal_night_run_mpi(). Returns without MPI. */
void hilal_night_mpi_abort(int code);

/* The night over MPI ranks (at least 2): rank 0 hands out frame indices
 * on request and collects the outcomes (a dynamic task farm: a slow frame
 * holds up only its own worker); every other rank runs opt->workers
 * worker threads and commits its frames to its own shard archive
 * (ARCHIVE.shard<rank>.h5 next to the archive); at the end rank 0 merges
 * the shards into the archive (hilal_archive_merge()) and deletes them.
 * Shards left by an earlier run that was killed are merged first, so the
 * rerun skips their frames. Every rank calls it with the same
 * configuration and options. *tasks / *n are significant on rank 0 (the
 * list is broadcast; other ranks pass pointers to NULL / 0 and receive a
 * malloc'd copy they free). lib: the references of this rank (rank 0 does
 * not use it). On rank 0 the tasks and res are filled as by
 * hilal_night_run(). On the other ranks archive.path is set to the rank's
 * shard (an execution setting: the run is the same), so that stages after
 * the archive (alerts) find the archive this process writes; they see only
 * that rank's frames. */
hilal_status hilal_night_run_mpi(hilal_config *cfg, hilal_reflib *lib,
                                 hilal_night_task **tasks, size_t *n,
                                 const hilal_night_options *opt, hilal_night_result *res,
                                 hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
