/* Pieces shared by night.c, reflib.c and mpi_farm.c. Private to the
 * library. */
#ifndef HILAL_NIGHT_INTERNAL_H
#define HILAL_NIGHT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/archive.h"
#include "hilal/night.h"

/* Lists FITS inputs: the FITS files of a directory (name order), one FITS
 * file, or the "PATH [HDU]" lines of a list file (relative paths taken
 * relative to the list's directory). *paths (each malloc'd) and *hdus are
 * malloc'd arrays of *n entries; free with hilal_night_free_list(). */
hilal_status hilal_night_list_inputs(const char *dir_or_list, char ***paths, int **hdus,
                                     size_t *n, hilal_error *err);
void hilal_night_free_list(char **paths, int *hdus, size_t n);

/* A frame's earlier record in the run: what makes a task "already done". */
typedef struct hilal_night_done {
    int64_t frame_id;
    int32_t status;   /* HILAL_ARCHIVE_FRAME_COMMITTED or _FAILED */
} hilal_night_done;

/* The frames of run_id recorded in an open archive: current committed
 * rows and failed rows (malloc'd, sorted by frame id; committed wins over
 * failed for the same frame). */
hilal_status hilal_night_done_list(hilal_archive *ar, int32_t run_id, hilal_night_done **done,
                                   size_t *n, hilal_error *err);

/* The worker engine: the stage runners, the archive the frames go to and
 * what is already done. Shared read-only by the worker threads. */
typedef struct hilal_night_engine hilal_night_engine;

/* done (sorted, borrowed, may be NULL) lists the frames to skip. */
hilal_status hilal_night_engine_new(const hilal_config *cfg, hilal_reflib *lib,
                                    hilal_archive *ar, int32_t run_id,
                                    const hilal_night_done *done, size_t ndone,
                                    int retry_failed, hilal_night_engine **out,
                                    hilal_error *err);
void hilal_night_engine_free(hilal_night_engine *eng);

/* Stage names in timing order (the night's hilal_night_result order). */
size_t hilal_night_engine_stages(const hilal_night_engine *eng,
                                 char names[HILAL_NIGHT_MAX_STAGES][24]);

/* Processes one task, filling its outcome. Returns HILAL_OK unless the
 * night cannot go on (the archive could not be written): then err says
 * why and the task is left PENDING. */
hilal_status hilal_night_engine_process(hilal_night_engine *eng, hilal_night_task *task,
                                        hilal_error *err);

/* Runs nthreads worker threads (the calling thread is one of them) that
 * each loop: idx = next(user, finished, stopping) (finished: the task the
 * thread has just completed, NULL on the first call); stop when idx < 0;
 * else process tasks[idx]. After the first fatal error (an archive that
 * cannot be written) every thread calls next() once more with stopping =
 * 1, to report its last task, and next() must return -1 then; the error is
 * returned. next() is called concurrently: it must be thread-safe. */
typedef long (*hilal_night_next_fn)(void *user, hilal_night_task *finished, int stopping);
hilal_status hilal_night_pool(hilal_night_engine *eng, hilal_night_task *tasks, int nthreads,
                              hilal_night_next_fn next, void *user, hilal_error *err);

/* Fills the tallies of res from the tasks, and each done or already-done
 * task's candidate counts and limiting magnitude from the archive rows of
 * run_id. */
hilal_status hilal_night_finish(hilal_archive *ar, int32_t run_id, hilal_night_task *tasks,
                                size_t n, hilal_night_result *res, hilal_error *err);

/* Opens (or creates) the archive with the [archive] options of cfg,
 * logging a recovery. */
hilal_status hilal_night_open_archive(const hilal_config *cfg, const char *path,
                                      hilal_archive **ar, hilal_error *err);

/* Adds the fixed references of the tasks (reprocessing) to the library;
 * one that cannot be read is logged and its frames fail with the reason. */
hilal_status hilal_night_add_fixed_refs(hilal_reflib *lib, const hilal_night_task *tasks,
                                        size_t n, hilal_error *err);

/* The names of the registry's stages, in the order of the timings
 * (hilal_night_result.stage_names); returns how many. */
size_t hilal_night_stage_names(char names[HILAL_NIGHT_MAX_STAGES][24]);

/* The shard of an MPI rank: "<archive>.shard<rank>.h5". */
void hilal_night_shard_path(const char *archive, int rank, char *out, size_t len);

/* Merges every shard next to the archive (ARCHIVE.shard<N>.h5, in rank
 * order) into it and removes them: at the end of an MPI night, and at the
 * start of any night, for the shards a killed MPI night left. *nframes
 * receives the frames copied. */
hilal_status hilal_night_merge_shards(hilal_archive *ar, const char *archive, size_t *nframes,
                                      hilal_error *err);

/* Clears the outcome fields of a task. */
void hilal_night_task_reset(hilal_night_task *t);

/* Seconds on a monotonic clock. */
double hilal_night_now_s(void);

#endif
