/* hilal reprocess: the frames recorded in an archive, run again under
 * another configuration (a new run id), side by side with the earlier
 * runs in the same archive. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "hilal/night.h"

static void help(void)
{
    printf("Usage: hilal reprocess ARCHIVE [options] [--config FILE] [--set SECTION.KEY=VALUE]...\n"
           "\n"
           "Runs the frames recorded in ARCHIVE (/frames: science and reference paths,\n"
           "HDUs and SHA-256 checksums) through every stage again and commits them to the\n"
           "same archive under the run of the new configuration, so that runs with\n"
           "different settings can be compared side by side (`hilal query --run`). A\n"
           "science or reference file that no longer exists or whose checksum changed is\n"
           "reported and not processed. Frames run concurrently, and over MPI ranks when\n"
           "started by mpirun, as with `hilal night`; rerunning the command after a crash\n"
           "finishes what is left.\n"
           "\n"
           "Configuration: by default the run starts from the configuration recorded for\n"
           "run B (B = --like-run, else --run, else the latest run); what the command\n"
           "line (--config, --set) or the user configuration file sets wins over it.\n"
           "\n"
           "  --run N             only the frames of run N (default: every frame)\n"
           "  --like-run N        start from the configuration of run N\n"
           "  --fresh             start from the built-in defaults instead of a recorded run\n"
           "  --references LIB    reference library for frames recorded without a reference\n"
           "                      (they are skipped otherwise)\n"
           "  --workers N         frames in flight at once (pipeline.workers)\n"
           "  --report FILE       JSON run report (default ARCHIVE-without-.h5.run<RUN>.report.json)\n"
           "  --retry-failed      also rerun frames the new run recorded as failed\n"
           "  --no-mpi            run in this process even when started by mpirun\n"
           "\n"
           "Exit codes: 0 done, 2 usage, 3 configuration, 4 some frames failed or an input\n"
           "is missing or changed, 5 could not run.\n");
}

static int parse_run(const char *text, int32_t *out)
{
    char *end = NULL;
    long v = strtol(text, &end, 10);
    if (end == text || *end != '\0' || v < 1 || v > 2147483647L) {
        fprintf(stderr, "hilal reprocess: usage error: '%s' is not a run id (1, 2, ...; see "
                "`hilal info ARCHIVE`)\n", text);
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

/* Takes the values of the recorded configuration of run `run` (0 = the
 * latest) for every key the user left at its default, execution settings
 * apart. */
static hilal_status apply_recorded_config(hilal_config *cfg, const char *archive, int32_t run,
                                          int32_t *used_run, hilal_error *err)
{
    hilal_archive *ar = NULL;
    hilal_archive_run *runs = NULL;
    size_t nruns = 0;
    char *text = NULL;
    hilal_config *base = NULL;
    char tmp[] = "/tmp/hilal-reprocess-XXXXXX";
    int fd = -1;
    hilal_status st = hilal_archive_open_read(archive, &ar, err);
    if (st == HILAL_OK)
        st = hilal_archive_read_runs(ar, &runs, &nruns, err);
    if (st != HILAL_OK)
        goto cleanup;
    const hilal_archive_run *r = NULL;
    for (size_t i = 0; i < nruns; i++)
        if (run == 0 ? (r == NULL || runs[i].run_id > r->run_id) : runs[i].run_id == run)
            r = &runs[i];
    if (r == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND, "archive %s has no run %d; `hilal info %s` "
                             "lists its runs", archive, (int)run, archive);
        goto cleanup;
    }
    *used_run = r->run_id;
    st = hilal_archive_read_text(ar, r->config_offset, r->config_length, &text, err);
    if (st != HILAL_OK)
        goto cleanup;
    /* The recorded text is configuration-file text: read it as one. */
    fd = mkstemp(tmp);
    size_t len = strlen(text);
    if (fd < 0 || write(fd, text, len) != (ssize_t)len) {
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot write a temporary file %s: %s", tmp,
                             strerror(errno));
        goto cleanup;
    }
    base = hilal_registry_config_new(err);
    if (base == NULL) {
        st = err != NULL && err->code != HILAL_OK ? err->code : HILAL_ERR_NOMEM;
        goto cleanup;
    }
    st = hilal_config_load_file(base, tmp, err);
    if (st != HILAL_OK) {
        hilal_error_context(err, "the configuration recorded for run %d of %s (use --fresh to "
                            "start from the defaults)", (int)r->run_id, archive);
        goto cleanup;
    }
    char origin[4200];
    snprintf(origin, sizeof origin, "run %d of %s", (int)r->run_id, archive);
    size_t nsec = 0;
    const hilal_param_section *sec = hilal_registry_sections(&nsec);
    for (size_t s = 0; s < nsec && st == HILAL_OK; s++)
        for (size_t k = 0; k < sec[s].nparams && st == HILAL_OK; k++) {
            const hilal_param *p = &sec[s].params[k];
            char key[256];
            snprintf(key, sizeof key, "%s.%s", sec[s].name, p->key);
            if ((p->flags & HILAL_PARAM_EXECUTION) ||
                strcmp(hilal_config_origin(cfg, key), "default") != 0)
                continue;
            const char *v = hilal_config_value(base, key);
            if (v != NULL && strcmp(v, hilal_config_value(cfg, key)) != 0)
                st = hilal_config_set(cfg, key, v, origin, err);
        }
cleanup:
    if (fd >= 0) {
        close(fd);
        unlink(tmp);
    }
    hilal_config_free(base);
    free(text);
    free(runs);
    hilal_archive_free(ar);
    return st;
}

typedef struct reprocess_input {
    const char *archive;
    int32_t run;
} reprocess_input;

static hilal_status reprocess_tasks(void *user, hilal_night_task **tasks, size_t *n,
                                    hilal_error *err)
{
    const reprocess_input *in = user;
    return hilal_night_tasks_from_archive(in->archive, in->run, tasks, n, err);
}

int hilal_cli_reprocess(int argc, char **argv, hilal_cli *cli)
{
    const char *archive = NULL;
    hilal_cli_night_opts o = {NULL, NULL, 0, 0, 1};
    int fresh = 0;
    int32_t run = 0, like = 0, used = 0;
    for (int i = 1; i < argc; i++) {
        int u = hilal_cli_config_option(cli, argc, argv, &i);
        if (u < 0)
            return HILAL_EXIT_CONFIG;
        if (u > 0)
            continue;
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            help();
            return HILAL_EXIT_OK;
        }
        u = hilal_cli_night_option("reprocess", argc, argv, &i, &o);
        if (u < 0)
            return HILAL_EXIT_USAGE;
        if (u > 0)
            continue;
        if (!strcmp(a, "--fresh")) {
            fresh = 1;
        } else if (a[0] != '-') {
            if (archive != NULL) {
                fprintf(stderr, "hilal reprocess: usage error: one ARCHIVE only ('%s' and '%s')\n",
                        archive, a);
                return HILAL_EXIT_USAGE;
            }
            archive = a;
        } else if (i + 1 >= argc) {
            fprintf(stderr, "hilal reprocess: usage error: '%s' is unknown or needs a value; see "
                    "`hilal reprocess --help`\n", a);
            return HILAL_EXIT_USAGE;
        } else if (!strcmp(a, "--run")) {
            if (parse_run(argv[++i], &run) != 0)
                return HILAL_EXIT_USAGE;
        } else if (!strcmp(a, "--like-run")) {
            if (parse_run(argv[++i], &like) != 0)
                return HILAL_EXIT_USAGE;
        } else {
            fprintf(stderr, "hilal reprocess: usage error: unknown option '%s'; see `hilal "
                    "reprocess --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
    }
    if (archive == NULL) {
        fprintf(stderr, "hilal reprocess: usage error: ARCHIVE is required; see `hilal reprocess "
                "--help`\n");
        return HILAL_EXIT_USAGE;
    }
    if (fresh && like != 0) {
        fprintf(stderr, "hilal reprocess: usage error: --fresh and --like-run exclude each other\n");
        return HILAL_EXIT_USAGE;
    }
    if (!fresh) {
        hilal_error err = {0};
        hilal_status st = apply_recorded_config(cli->cfg, archive, like != 0 ? like : run, &used, &err);
        if (st != HILAL_OK) {
            hilal_cli_report(&err);
            return hilal_cli_exit_code(st);
        }
        hilal_log(HILAL_LOG_INFO, "reprocess: starting from the configuration of run %d",
                  (int)used);
    }
    reprocess_input in = {archive, run};
    return hilal_cli_night_execute(cli, "reprocess", reprocess_tasks, &in, o.refs, archive,
                                   o.workers, o.retry, o.report, o.allow_mpi);
}
