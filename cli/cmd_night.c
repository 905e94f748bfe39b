/* hilal night: a night's science frames against a reference library, in
 * parallel (and over MPI ranks when started by mpirun), into one archive,
 * with a run report. The shared driver below serves `hilal reprocess` too. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "hilal/night.h"

static void help(void)
{
    printf("Usage: hilal night INPUT --references LIB --archive OUT.h5 [options]\n"
           "\n"
           "Processes a night: every science frame of INPUT is matched to a reference of\n"
           "the library LIB (same filter, largest WCS footprint overlap, or the same\n"
           "night.field_key value), run through every stage and committed to the HDF5\n"
           "archive. Frames run concurrently (pipeline.workers); a frame that fails is\n"
           "recorded with its reason and the night goes on. Running the same command\n"
           "again (after a crash, a kill, or to add frames) skips the frames the archive\n"
           "already holds for this configuration. Started by mpirun (build option\n"
           "HILAL_MPI), the frames are shared out over the ranks (docs/night.md).\n"
           "\n"
           "  INPUT               a directory of FITS files, a list file (lines \"PATH [HDU]\")\n"
           "                      or one FITS file\n"
           "  --references LIB    directory (or list file) of reference images\n"
           "  --archive FILE      HDF5 archive to append to (created if missing)\n"
           "  --workers N         frames in flight at once (pipeline.workers)\n"
           "  --report FILE       JSON run report (night.report; default next to the archive:\n"
           "                      ARCHIVE-without-.h5.run<RUN>.report.json)\n"
           "  --retry-failed      also rerun frames this configuration recorded as failed\n"
           "  --no-mpi            run in this process even when started by mpirun\n"
           "  --config FILE, --set SECTION.KEY=VALUE   configuration (see `hilal config`)\n"
           "\n"
           "With pipeline.threads = 0, each worker gets cores / workers FFT threads.\n"
           "Prints a summary; -v logs each frame. Exit codes: 0 every frame done or\n"
           "skipped for want of a reference, 2 usage, 3 configuration, 4 some frames\n"
           "failed (or an input went missing or changed), 5 could not run.\n");
}

/* Default report path: ARCHIVE without ".h5", then ".run<N>.report.json". */
static void default_report(const char *archive, int run_id, char *out, size_t len)
{
    size_t n = strlen(archive);
    int strip = n > 3 && strcmp(archive + n - 3, ".h5") == 0;
    snprintf(out, len, "%.*s.run%d.report.json", (int)(strip ? n - 3 : n), archive, run_id);
}

typedef struct progress_state {
    const hilal_cli *cli;
    double t0;
} progress_state;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void on_progress(void *user, const hilal_night_task *t, size_t done, size_t total)
{
    progress_state *p = user;
    (void)t; /* each frame's outcome is logged where it happens */
    hilal_cli_progress(p->cli, "frames", (long)done, (long)total, now_s() - p->t0);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void print_summary(const char *cmd, const hilal_night_task *tasks, size_t n,
                          const hilal_night_result *r, const char *archive, const char *report)
{
    printf("%s: %zu frames: %zu done, %zu already done, %zu failed, %zu skipped (no reference)",
           cmd, r->ntasks, r->count[HILAL_NIGHT_DONE], r->count[HILAL_NIGHT_ALREADY],
           r->count[HILAL_NIGHT_FAILED] + r->count[HILAL_NIGHT_FAILED_BEFORE],
           r->count[HILAL_NIGHT_NOREF]);
    if (r->count[HILAL_NIGHT_MISSING] + r->count[HILAL_NIGHT_CHANGED] > 0)
        printf(", %zu missing input, %zu changed input", r->count[HILAL_NIGHT_MISSING],
               r->count[HILAL_NIGHT_CHANGED]);
    if (r->count[HILAL_NIGHT_PENDING] > 0)
        printf(", %zu not processed", r->count[HILAL_NIGHT_PENDING]);
    printf("\n  candidates: %zu (%zu brightening, %zu fading, %zu with rb >= 0.5)\n", r->ncands,
           r->npos, r->nneg, r->nreal);
    double *lim = malloc((n > 0 ? n : 1) * sizeof *lim);
    size_t nl = 0;
    for (size_t i = 0; lim != NULL && i < n; i++)
        if (isfinite(tasks[i].limmag5))
            lim[nl++] = tasks[i].limmag5;
    if (nl > 0) {
        qsort(lim, nl, sizeof *lim, cmp_double);
        printf("  5-sigma limiting magnitude: median %.2f (%.2f to %.2f over %zu frames)\n",
               nl % 2 ? lim[nl / 2] : 0.5 * (lim[nl / 2 - 1] + lim[nl / 2]), lim[0], lim[nl - 1],
               nl);
    }
    free(lim);
    double fpm = r->wall_s > 0 ? 60.0 * (double)r->count[HILAL_NIGHT_DONE] / r->wall_s : 0;
    printf("  time: %.1f s, %.2f frames/min with %d worker%s", r->wall_s, fpm, r->workers,
           r->workers == 1 ? "" : "s");
    if (r->ranks > 1)
        printf(" on each of %d MPI ranks", r->ranks);
    printf("; references read %zu times\n", r->ref_reads);
    double total = 0;
    for (size_t s = 0; s < r->nstages; s++)
        total += r->stage_seconds[s];
    if (total > 0) {
        printf("  stage time (summed over frames):");
        for (size_t s = 0; s < r->nstages; s++)
            printf(" %s %.1f s%s", r->stage_names[s], r->stage_seconds[s],
                   s + 1 < r->nstages ? "," : "\n");
    }
    for (size_t i = 0; i < n; i++) {
        const hilal_night_task *t = &tasks[i];
        if (t->status == HILAL_NIGHT_DONE || t->status == HILAL_NIGHT_ALREADY)
            continue;
        printf("  %s: %s: %s\n", t->name, hilal_night_status_name(t->status), t->message);
    }
    printf("  archive: %s (run %d); report: %s\n", archive, (int)r->run_id, report);
}

int hilal_cli_night_execute(hilal_cli *cli, const char *cmd, hilal_cli_tasks_fn make_tasks,
                            void *user, const char *refdir, const char *archive, int workers,
                            int retry_failed, const char *report, int allow_mpi)
{
    hilal_error err = {0};
    hilal_status st = HILAL_OK;
    hilal_reflib *lib = NULL;
    hilal_night_task *tasks = NULL;
    size_t n = 0;
    int rank = 0, size = 1, use_mpi = 0, mpi_inited = 0, ran = 0, rc = HILAL_EXIT_OK;
    char num[32], report_path[4200];

    /* Execution settings (not in the configuration hash). */
    if (hilal_config_set(cli->cfg, "archive.path", archive, "--archive", &err) != HILAL_OK)
        goto config_error;
    if (workers > 0) {
        snprintf(num, sizeof num, "%d", workers);
        if (hilal_config_set(cli->cfg, "pipeline.workers", num, "--workers", &err) != HILAL_OK)
            goto config_error;
    }
    if (report != NULL && hilal_config_set(cli->cfg, "night.report", report, "--report", &err) != HILAL_OK)
        goto config_error;
    workers = (int)hilal_config_get_int(cli->cfg, "pipeline.workers");
    if (hilal_config_get_int(cli->cfg, "pipeline.threads") == 0) {
        /* Each worker's FFTs and pixel loops get an equal share of the cores. */
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        long per = cores > workers ? cores / workers : 1;
        snprintf(num, sizeof num, "%ld", per);
        if (hilal_config_set(cli->cfg, "pipeline.threads", num, "cores / pipeline.workers", &err) != HILAL_OK)
            goto config_error;
    }

    if (allow_mpi && hilal_night_mpi_launched()) {
        if (!hilal_night_mpi_built()) {
            fprintf(stderr, "hilal %s: started by an MPI launcher but this hilal was built without "
                    "MPI; rebuild with -DHILAL_MPI=ON, or run without mpirun\n", cmd);
            return HILAL_EXIT_CANNOT_RUN;
        }
        st = hilal_night_mpi_init(&rank, &size, &err);
        if (st != HILAL_OK) {
            hilal_cli_report(&err);
            return HILAL_EXIT_CANNOT_RUN;
        }
        mpi_inited = 1;
        use_mpi = size > 1;
    }

    /* The task list (rank 0 only under MPI: the others receive it). */
    if (rank == 0) {
        st = make_tasks(user, &tasks, &n, &err);
        if (st != HILAL_OK) {
            hilal_cli_report(&err);
            rc = st == HILAL_ERR_USAGE ? HILAL_EXIT_USAGE : HILAL_EXIT_CANNOT_RUN;
            goto cleanup;
        }
    }
    /* The reference library (rank 0 of an MPI night hands out frames only). */
    st = hilal_reflib_new(cli->cfg, &lib, &err);
    if (st == HILAL_OK && refdir != NULL && !(use_mpi && rank == 0)) {
        size_t nbad = 0;
        st = hilal_reflib_add_dir(lib, refdir, &nbad, &err);
        if (st == HILAL_OK && hilal_reflib_count(lib) == 0) {
            if (strcmp(cmd, "night") == 0)
                st = hilal_error_set(&err, HILAL_ERR_NOTFOUND,
                                     "reference library %s holds no usable reference image "
                                     "(%zu unreadable); give the directory of the references "
                                     "with --references", refdir, nbad);
            else
                hilal_log(HILAL_LOG_WARN, "reference library %s holds no usable reference image",
                          refdir);
        }
    }
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        rc = hilal_cli_exit_code(st);
        goto cleanup;
    }

    hilal_night_options opt = {.archive_path = archive, .workers = workers,
                               .retry_failed = retry_failed};
    progress_state ps = {cli, now_s()};
    if (rank == 0) {
        opt.progress = on_progress;
        opt.user = &ps;
    }
    hilal_night_result res;
    ran = 1;
    st = use_mpi ? hilal_night_run_mpi(cli->cfg, lib, &tasks, &n, &opt, &res, &err)
                 : hilal_night_run(cli->cfg, lib, tasks, n, &opt, &res, &err);
    if (rank != 0) {
        rc = st == HILAL_OK ? HILAL_EXIT_OK : HILAL_EXIT_CANNOT_RUN;
        if (st != HILAL_OK)
            hilal_cli_report(&err);
        goto cleanup;
    }
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        rc = hilal_cli_exit_code(st);
        if (rc == HILAL_EXIT_OK)
            rc = HILAL_EXIT_CANNOT_RUN;
        if (res.run_id == 0)
            goto cleanup;
    }
    const char *rp = hilal_config_get_string(cli->cfg, "night.report");
    if (rp[0] != '\0')
        snprintf(report_path, sizeof report_path, "%s", rp);
    else
        default_report(archive, res.run_id, report_path, sizeof report_path);
    hilal_error rerr = {0};
    if (hilal_night_write_report(report_path, archive, tasks, n, &res, &rerr) != HILAL_OK) {
        hilal_cli_report(&rerr);
        if (rc == HILAL_EXIT_OK)
            rc = HILAL_EXIT_CANNOT_RUN;
    }
    if (cli->verbosity >= 0)
        print_summary(cmd, tasks, n, &res, archive, report_path);
    if (rc == HILAL_EXIT_OK)
        for (size_t i = 0; i < n; i++)
            if (hilal_night_status_is_failure(tasks[i].status))
                rc = HILAL_EXIT_FRAMES_FAILED;
cleanup:
    if (use_mpi && !ran && rc != HILAL_EXIT_OK)
        hilal_night_mpi_abort(rc); /* the other ranks would wait for this one forever */
    hilal_reflib_free(lib);
    free(tasks);
    if (mpi_inited)
        hilal_night_mpi_finalize();
    return rc;

config_error:
    hilal_cli_report(&err);
    return HILAL_EXIT_CONFIG;
}

typedef struct night_input {
    const char *input;
} night_input;

static hilal_status night_tasks(void *user, hilal_night_task **tasks, size_t *n, hilal_error *err)
{
    const night_input *in = user;
    return hilal_night_tasks_from_path(in->input, tasks, n, err);
}

int hilal_cli_parse_workers(const char *cmd, const char *text, int *out)
{
    char *end = NULL;
    long v = strtol(text, &end, 10);
    if (end == text || *end != '\0' || v < 1 || v > 256) {
        fprintf(stderr, "hilal %s: usage error: --workers '%s' must be a number from 1 to 256\n",
                cmd, text);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int hilal_cli_night_option(const char *cmd, int argc, char **argv, int *i,
                           hilal_cli_night_opts *o)
{
    const char *a = argv[*i];
    if (!strcmp(a, "--retry-failed")) {
        o->retry = 1;
        return 1;
    }
    if (!strcmp(a, "--no-mpi")) {
        o->allow_mpi = 0;
        return 1;
    }
    if (*i + 1 >= argc)
        return 0;
    if (!strcmp(a, "--references")) {
        o->refs = argv[++*i];
    } else if (!strcmp(a, "--report")) {
        o->report = argv[++*i];
    } else if (!strcmp(a, "--workers")) {
        if (hilal_cli_parse_workers(cmd, argv[++*i], &o->workers) != 0)
            return -1;
    } else {
        return 0;
    }
    return 1;
}

int hilal_cli_night(int argc, char **argv, hilal_cli *cli)
{
    const char *input = NULL, *archive = NULL;
    hilal_cli_night_opts o = {NULL, NULL, 0, 0, 1};
    for (int i = 1; i < argc; i++) {
        int used = hilal_cli_config_option(cli, argc, argv, &i);
        if (used < 0)
            return HILAL_EXIT_CONFIG;
        if (used > 0)
            continue;
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            help();
            return HILAL_EXIT_OK;
        }
        used = hilal_cli_night_option("night", argc, argv, &i, &o);
        if (used < 0)
            return HILAL_EXIT_USAGE;
        if (used > 0)
            continue;
        if (a[0] != '-') {
            if (input != NULL) {
                fprintf(stderr, "hilal night: usage error: one INPUT only ('%s' and '%s'); put "
                        "several directories' frames in a list file\n", input, a);
                return HILAL_EXIT_USAGE;
            }
            input = a;
        } else if (i + 1 >= argc) {
            fprintf(stderr, "hilal night: usage error: '%s' is unknown or needs a value; see "
                    "`hilal night --help`\n", a);
            return HILAL_EXIT_USAGE;
        } else if (!strcmp(a, "--archive")) {
            archive = argv[++i];
        } else {
            fprintf(stderr, "hilal night: usage error: unknown option '%s'; see `hilal night "
                    "--help`\n", a);
            return HILAL_EXIT_USAGE;
        }
    }
    if (input == NULL || o.refs == NULL || archive == NULL) {
        fprintf(stderr, "hilal night: usage error: INPUT, --references and --archive are "
                "required; see `hilal night --help`\n");
        return HILAL_EXIT_USAGE;
    }
    night_input in = {input};
    return hilal_cli_night_execute(cli, "night", night_tasks, &in, o.refs, archive, o.workers,
                                   o.retry, o.report, o.allow_mpi);
}
