/* hilal info: what an archive holds (schema, runs and their provenance,
 * frames, candidate counts). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "hilal/archive.h"

static void help(void)
{
    printf("Usage: hilal info ARCHIVE [--frames] [--config RUN_ID] [--recover]\n"
           "\n"
           "Prints the archive's schema version, its runs (configuration hash, software\n"
           "and library versions), frame and candidate counts. Works while a night is\n"
           "being written.\n"
           "\n"
           "  --frames        also list every frame row with its per-frame records\n"
           "  --config RUN    print the effective configuration of run RUN instead\n"
           "  --recover       if the last writer of the archive died, repair what it left\n"
           "                  (a torn metadata write, HDF5's \"open for writing\" flag,\n"
           "                  rows of an uncommitted frame), as the next writer would, so\n"
           "                  that tools without SWMR (h5py without swmr=True, h5dump) can\n"
           "                  open it\n");
}

static const char *status_name(int s)
{
    switch (s) {
    case HILAL_ARCHIVE_FRAME_COMMITTED: return "committed";
    case HILAL_ARCHIVE_FRAME_SUPERSEDED: return "superseded";
    case HILAL_ARCHIVE_FRAME_FAILED: return "failed";
    default: return "unfinished";
    }
}

static int print_config(hilal_archive *ar, const char *run_text, hilal_error *err)
{
    hilal_archive_run *runs = NULL;
    size_t n = 0;
    char *text = NULL;
    int found = 0;
    if (hilal_archive_read_runs(ar, &runs, &n, err) != HILAL_OK)
        return -1;
    for (size_t i = 0; i < n && !found; i++) {
        char id[16];
        snprintf(id, sizeof id, "%d", (int)runs[i].run_id);
        if (strcmp(id, run_text) != 0)
            continue;
        found = 1;
        if (hilal_archive_read_text(ar, runs[i].config_offset, runs[i].config_length, &text, err) != HILAL_OK) {
            free(runs);
            return -1;
        }
        printf("# run %d, configuration hash %s\n%s", (int)runs[i].run_id, runs[i].config_hash, text);
        if (text[0] != '\0' && text[strlen(text) - 1] != '\n')
            putchar('\n');
        free(text);
    }
    free(runs);
    if (!found) {
        hilal_error_set(err, HILAL_ERR_NOTFOUND, "no run %s in the archive; `hilal info` lists them", run_text);
        return -1;
    }
    return 0;
}

int hilal_cli_info(int argc, char **argv, hilal_cli *cli)
{
    (void)cli;
    const char *path = NULL, *config_run = NULL;
    int list_frames = 0, recover = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            help();
            return HILAL_EXIT_OK;
        } else if (!strcmp(a, "--frames")) {
            list_frames = 1;
        } else if (!strcmp(a, "--recover")) {
            recover = 1;
        } else if (!strcmp(a, "--config") && i + 1 < argc) {
            config_run = argv[++i];
        } else if (a[0] != '-' && path == NULL) {
            path = a;
        } else {
            fprintf(stderr, "hilal info: usage error: unexpected argument '%s'; see `hilal info --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
    }
    if (path == NULL) {
        fprintf(stderr, "hilal info: usage error: an ARCHIVE is required; see `hilal info --help`\n");
        return HILAL_EXIT_USAGE;
    }

    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_summary sum;
    hilal_archive_run *runs = NULL;
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    size_t nruns = 0, nframes = 0;
    int rc = HILAL_EXIT_OK;
    hilal_status st = HILAL_OK;

    if (recover) {
        int recovered = 0;
        st = hilal_archive_recover(path, &recovered, &err);
        if (st != HILAL_OK)
            goto fail;
        printf("%s: %s\n", path, recovered ? "recovered after a writer that stopped"
                                             : "was closed cleanly; nothing to recover");
    }

    st = hilal_archive_open_read(path, &ar, &err);
    if (st != HILAL_OK)
        goto fail;
    if (config_run != NULL) {
        if (print_config(ar, config_run, &err) != 0) {
            st = err.code;
            goto fail;
        }
        goto cleanup;
    }
    st = hilal_archive_get_summary(ar, &sum, &err);
    if (st == HILAL_OK)
        st = hilal_archive_read_runs(ar, &runs, &nruns, &err);
    if (st == HILAL_OK)
        st = hilal_archive_read_frames(ar, &frames, &nframes, &cur, &err);
    if (st != HILAL_OK)
        goto fail;

    printf("archive: %s\n", path);
    printf("schema version: %d (Hilal candidate archive, docs/archive.md)\n", sum.schema_version);
    printf("created: %s by hilal %s\n", sum.created_utc, sum.created_by);
    printf("cutouts: %d x %d px; PSF boxes: %d x %d px\n", sum.cutout_size, sum.cutout_size,
           sum.psf_size, sum.psf_size);
    printf("writer: %s\n", sum.writer_active ? "a process is writing it now" : "none");
    printf("frames: %zu current, %zu superseded, %zu failed (%zu rows)\n", sum.nframes_current,
           sum.nframes_superseded, sum.nframes_failed, sum.nframe_rows);
    printf("candidates: %zu current (%zu rows)\n", sum.ncands_current, sum.ncand_rows);
    printf("runs: %zu\n", nruns);
    for (size_t r = 0; r < nruns; r++) {
        size_t nf = 0, nc = 0;
        for (size_t i = 0; i < nframes; i++)
            if (cur[i] && frames[i].run_id == runs[r].run_id) {
                nf++;
                nc += (size_t)frames[i].n_candidates;
            }
        printf("  run %d: %zu frames, %zu candidates; first used %s\n", (int)runs[r].run_id, nf, nc,
               runs[r].created_utc);
        printf("    configuration hash: %s (`hilal info %s --config %d` prints it)\n",
               runs[r].config_hash, path, (int)runs[r].run_id);
        printf("    software: hilal %s; %s\n", runs[r].software_version, runs[r].library_versions);
    }
    if (list_frames) {
        printf("frames:\n  %4s %19s %-24s %-10s %3s %6s %12s %-6s %6s %6s %8s\n", "row", "frame_id",
               "name", "status", "run", "cands", "mjd", "filter", "fwhm", "limmag", "limflux");
        for (size_t i = 0; i < nframes; i++) {
            const hilal_archive_frame *f = &frames[i];
            if (f->status == HILAL_ARCHIVE_FRAME_NONE)
                continue;
            printf("  %4zu %19lld %-24.24s %-10s %3d %6d %12.5f %-6.6s %6.2f %6.2f %8.2f%s%s\n", i,
                   (long long)f->frame_id, f->frame_name, status_name(f->status), (int)f->run_id,
                   (int)f->n_candidates, f->mjd, f->filter, f->psf_fwhm_sci_px, f->limmag5,
                   f->limflux5_adu, f->message[0] ? "  " : "", f->message);
        }
    }
    goto cleanup;
fail:
    hilal_cli_report(&err);
    rc = hilal_cli_exit_code(st);
cleanup:
    free(runs);
    free(frames);
    free(cur);
    hilal_archive_free(ar);
    return rc;
}
