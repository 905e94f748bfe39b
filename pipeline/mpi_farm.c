/* `hilal night` over MPI ranks: a dynamic task farm (compiled only with
 * -DHILAL_MPI=ON).
 *
 * Rank 0 coordinates: it opens the night's archive (merging any shards a
 * killed earlier run left), registers the run, broadcasts the task list
 * and what is already done, then answers requests: each worker thread of
 * each other rank sends the outcome of its last frame and receives the
 * index of the next one (or -1 when none is left). Slow frames thus hold
 * up only their own worker. Every other rank commits its frames to its
 * own shard archive (ARCHIVE.shard<rank>.h5); when all have finished,
 * rank 0 merges the shards into the archive (hilal_archive_merge()) and
 * deletes them. A rank killed mid-night leaves a shard whose committed
 * frames the next run merges and skips.
 *
 * Worker threads of one rank take turns on MPI (a mutex around each
 * request/reply pair), so MPI_THREAD_SERIALIZED is enough; with less, one
 * worker thread per rank is used.
 */
#define _GNU_SOURCE /* strdup under C11 */

#include <errno.h>
#include <mpi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hilal/archive.h"
#include "hilal/log.h"
#include "hilal/night.h"
#include "night_internal.h"

enum { TAG_REQUEST = 101, TAG_REPLY = 102 };

/* A worker thread's request: the outcome of its last frame, if any. */
typedef struct farm_msg {
    int32_t has_task;   /* task holds a finished frame */
    int32_t index;      /* its index in the task list */
    int32_t stopping;   /* the rank met a fatal error (task.message says why) */
    int32_t pad;
    hilal_night_task task;
} farm_msg;

static int thread_level = MPI_THREAD_SINGLE;

int hilal_night_mpi_built(void)
{
    return 1;
}

hilal_status hilal_night_mpi_init(int *rank, int *size, hilal_error *err)
{
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited && MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &thread_level) != MPI_SUCCESS)
        return hilal_error_set(err, HILAL_ERR_IO, "MPI could not be initialised");
    MPI_Comm_rank(MPI_COMM_WORLD, rank);
    MPI_Comm_size(MPI_COMM_WORLD, size);
    return HILAL_OK;
}

void hilal_night_mpi_finalize(void)
{
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized)
        MPI_Finalize();
}

void hilal_night_mpi_abort(int code)
{
    int inited = 0;
    MPI_Initialized(&inited);
    if (inited)
        MPI_Abort(MPI_COMM_WORLD, code);
}

/* Waits for a non-blocking request without spinning a core at 100%: the
 * ranks of a night often share cores with the frames' worker threads. */
static void wait_gently(MPI_Request *req)
{
    int flag = 0;
    struct timespec ts = {0, 2000000}; /* 2 ms */
    for (;;) {
        MPI_Test(req, &flag, MPI_STATUS_IGNORE);
        if (flag)
            return;
        nanosleep(&ts, NULL);
    }
}

static void barrier_gently(void)
{
    MPI_Request req;
    MPI_Ibarrier(MPI_COMM_WORLD, &req);
    wait_gently(&req);
}

/* Broadcasts a byte buffer of any size (MPI counts are ints). */
static void bcast_bytes(void *buf, size_t len)
{
    const size_t chunk = (size_t)1 << 30;
    for (size_t off = 0; off < len; off += chunk) {
        size_t m = len - off < chunk ? len - off : chunk;
        MPI_Bcast((char *)buf + off, (int)m, MPI_BYTE, 0, MPI_COMM_WORLD);
    }
}

/* ------------------------------------------------------------------------
 * Worker ranks
 * ------------------------------------------------------------------------ */

typedef struct worker_farm {
    pthread_mutex_t mutex;  /* one request/reply pair on MPI at a time */
    hilal_night_task *tasks;
} worker_farm;

static long worker_next(void *user, hilal_night_task *finished, int stopping)
{
    worker_farm *wf = user;
    farm_msg msg;
    long idx = -1;
    memset(&msg, 0, sizeof msg);
    msg.index = -1;
    if (finished != NULL) {
        msg.has_task = 1;
        msg.index = (int32_t)(finished - wf->tasks);
        msg.task = *finished;
    }
    msg.stopping = stopping;
    pthread_mutex_lock(&wf->mutex);
    MPI_Send(&msg, (int)sizeof msg, MPI_BYTE, 0, TAG_REQUEST, MPI_COMM_WORLD);
    MPI_Recv(&idx, 1, MPI_LONG, 0, TAG_REPLY, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    pthread_mutex_unlock(&wf->mutex);
    return idx;
}

static hilal_status run_worker(hilal_config *cfg, hilal_reflib *lib,
                               hilal_night_task *tasks, size_t n, const hilal_night_done *done,
                               size_t ndone, const hilal_night_options *opt, int rank, int workers,
                               hilal_error *err)
{
    char path[4200];
    hilal_archive *shard = NULL;
    hilal_night_engine *eng = NULL;
    int32_t run_id = 0;
    hilal_night_shard_path(opt->archive_path, rank, path, sizeof path);
    /* Stages after the archive look up the archive this process writes. */
    hilal_status st = hilal_config_set(cfg, "archive.path", path, "MPI shard", err);
    if (st == HILAL_OK)
        st = hilal_night_open_archive(cfg, path, &shard, err);
    if (st == HILAL_OK)
        st = hilal_archive_begin_run_config(shard, cfg, &run_id, err);
    if (st == HILAL_OK)
        st = hilal_night_add_fixed_refs(lib, tasks, n, err);
    if (st == HILAL_OK)
        st = hilal_night_engine_new(cfg, lib, shard, run_id, done, ndone, opt->retry_failed, &eng,
                                    err);
    if (st != HILAL_OK) {
        /* Tell rank 0 this rank's threads will not come: one stopping
         * request per thread. */
        worker_farm wf = {.tasks = tasks};
        pthread_mutex_init(&wf.mutex, NULL);
        for (int i = 0; i < workers; i++) {
            hilal_night_task t;
            memset(&t, 0, sizeof t);
            snprintf(t.message, sizeof t.message, "rank %d: %.400s", rank, err != NULL ? err->msg : "");
            farm_msg msg;
            memset(&msg, 0, sizeof msg);
            msg.stopping = 1;
            msg.index = -1;
            msg.task = t;
            long idx;
            MPI_Send(&msg, (int)sizeof msg, MPI_BYTE, 0, TAG_REQUEST, MPI_COMM_WORLD);
            MPI_Recv(&idx, 1, MPI_LONG, 0, TAG_REPLY, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        }
        pthread_mutex_destroy(&wf.mutex);
        goto cleanup;
    }
    for (size_t i = 0; i < n; i++)
        tasks[i].rank = rank;
    worker_farm wf = {.tasks = tasks};
    pthread_mutex_init(&wf.mutex, NULL);
    st = hilal_night_pool(eng, tasks, workers, worker_next, &wf, err);
    pthread_mutex_destroy(&wf.mutex);
cleanup:
    hilal_night_engine_free(eng);
    if (shard != NULL) {
        hilal_status cst = hilal_archive_close(shard, st == HILAL_OK ? err : NULL);
        if (st == HILAL_OK)
            st = cst;
    }
    if (st != HILAL_OK)
        hilal_error_context(err, "rank %d, shard %s", rank, path);
    return st;
}

/* ------------------------------------------------------------------------
 * Rank 0
 * ------------------------------------------------------------------------ */

static hilal_status run_master(hilal_night_task *tasks, size_t n, int nthreads,
                               const hilal_night_options *opt, hilal_error *err)
{
    farm_msg *msg = malloc(sizeof *msg);
    size_t next = 0, done = 0;
    int remaining = nthreads, stopping = 0;
    hilal_status st = HILAL_OK;
    struct timespec ts = {0, 1000000}; /* 1 ms between polls */
    if (msg == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    while (remaining > 0) {
        int flag = 0;
        MPI_Status status;
        MPI_Iprobe(MPI_ANY_SOURCE, TAG_REQUEST, MPI_COMM_WORLD, &flag, &status);
        if (!flag) {
            nanosleep(&ts, NULL);
            continue;
        }
        MPI_Recv(msg, (int)sizeof *msg, MPI_BYTE, status.MPI_SOURCE, TAG_REQUEST, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
        if (msg->has_task && msg->index >= 0 && (size_t)msg->index < n) {
            tasks[msg->index] = msg->task;
            tasks[msg->index].rank = status.MPI_SOURCE;
            done++;
            if (opt->progress != NULL)
                opt->progress(opt->user, &tasks[msg->index], done, n);
        }
        if (msg->stopping && !stopping) {
            stopping = 1;
            st = hilal_error_set(err, HILAL_ERR_IO, "%s",
                                 msg->task.message[0] ? msg->task.message : "a rank stopped");
        }
        long idx = -1;
        if (!stopping && next < n)
            idx = (long)next++;
        if (idx < 0)
            remaining--;
        MPI_Send(&idx, 1, MPI_LONG, status.MPI_SOURCE, TAG_REPLY, MPI_COMM_WORLD);
    }
    free(msg);
    return st;
}

hilal_status hilal_night_run_mpi(hilal_config *cfg, hilal_reflib *lib,
                                 hilal_night_task **tasks, size_t *n,
                                 const hilal_night_options *opt, hilal_night_result *res,
                                 hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive *ar = NULL;
    hilal_night_done *done = NULL;
    size_t ndone = 0;
    int rank = 0, size = 1;
    double t0 = hilal_night_now_s();
    memset(res, 0, sizeof *res);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size < 2) {
        /* One rank: the ordinary night. */
        return hilal_night_run(cfg, lib, *tasks, *n, opt, res, err);
    }
    int workers = opt->workers > 0 ? opt->workers : (int)hilal_config_get_int(cfg, "pipeline.workers");
    if (workers < 1 || thread_level < MPI_THREAD_SERIALIZED)
        workers = 1;

    /* 1. Rank 0 opens the archive, merges what a killed run left, finds
     * the run and what it holds; every rank learns whether that worked. */
    int ok = 1;
    if (rank == 0) {
        size_t merged = 0;
        st = hilal_night_open_archive(cfg, opt->archive_path, &ar, err);
        if (st == HILAL_OK)
            st = hilal_night_merge_shards(ar, opt->archive_path, &merged, err);
        if (st == HILAL_OK && merged > 0)
            hilal_log(HILAL_LOG_WARN, "archive %s: merged %zu frames that an earlier run left in "
                      "its shards", opt->archive_path, merged);
        if (st == HILAL_OK)
            st = hilal_archive_begin_run_config(ar, cfg, &res->run_id, err);
        if (st == HILAL_OK)
            st = hilal_night_done_list(ar, res->run_id, &done, &ndone, err);
        ok = st == HILAL_OK;
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (!ok) {
        if (rank != 0)
            st = hilal_error_set(err, HILAL_ERR_IO, "rank 0 could not open the archive %s",
                                 opt->archive_path);
        goto cleanup;
    }

    /* 2. The task list and what is done, from rank 0. */
    unsigned long long counts[2] = {(unsigned long long)*n, (unsigned long long)ndone};
    MPI_Bcast(counts, 2, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
    if (rank != 0) {
        free(*tasks);
        *n = (size_t)counts[0];
        *tasks = calloc(*n > 0 ? *n : 1, sizeof **tasks);
        ndone = (size_t)counts[1];
        done = calloc(ndone > 0 ? ndone : 1, sizeof *done);
        if (*tasks == NULL || done == NULL) {
            hilal_night_mpi_abort(5);
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        }
    }
    bcast_bytes(*tasks, *n * sizeof **tasks);
    bcast_bytes(done, ndone * sizeof *done);
    int mine = rank == 0 ? 0 : workers, nthreads = 0;
    MPI_Allreduce(&mine, &nthreads, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0 && ndone > 0)
        hilal_log(HILAL_LOG_INFO, "archive %s: run %d already holds %zu of its frames; they are "
                  "skipped", opt->archive_path, (int)res->run_id, ndone);

    /* 3. The farm. */
    if (rank == 0)
        st = run_master(*tasks, *n, nthreads, opt, err);
    else
        st = run_worker(cfg, lib, *tasks, *n, done, ndone, opt, rank, workers, err);
    unsigned long long reads = rank == 0 ? 0 : (unsigned long long)hilal_reflib_reads(lib), total_reads = 0;
    MPI_Reduce(&reads, &total_reads, 1, MPI_UNSIGNED_LONG_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    /* Every shard is closed once all ranks are here. */
    barrier_gently();

    /* 4. Rank 0 merges the shards into the archive and reports. */
    if (rank == 0) {
        size_t merged = 0;
        hilal_status mst = hilal_night_merge_shards(ar, opt->archive_path, &merged,
                                                    st == HILAL_OK ? err : NULL);
        if (st == HILAL_OK)
            st = mst;
        hilal_config_hash(cfg, res->config_hash);
        res->nstages = hilal_night_stage_names(res->stage_names);
        res->workers = workers;
        res->ranks = size - 1;
        res->wall_s = hilal_night_now_s() - t0;
        res->ref_reads = (size_t)total_reads;
        hilal_status fst = hilal_night_finish(ar, res->run_id, *tasks, *n, res,
                                              st == HILAL_OK ? err : NULL);
        if (st == HILAL_OK)
            st = fst;
    }
cleanup:
    free(done);
    if (ar != NULL) {
        hilal_status cst = hilal_archive_close(ar, st == HILAL_OK ? err : NULL);
        if (st == HILAL_OK)
            st = cst;
    }
    if (st != HILAL_OK && rank == 0)
        hilal_error_context(err, "night into %s over %d MPI ranks", opt->archive_path, size);
    return st;
}
