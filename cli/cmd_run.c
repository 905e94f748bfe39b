/* hilal run: one science frame against its reference, through every stage,
 * candidates into an HDF5 archive. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static void help(void)
{
    printf("Usage: hilal run --science SCI.fits --reference REF.fits --archive OUT.h5\n"
           "                 [--sci-hdu N] [--ref-hdu N] [--frame-id ID]\n"
           "                 [--config FILE] [--set SECTION.KEY=VALUE]...\n"
           "\n"
           "Runs the whole chain on one frame: ingest, background, stars, align, psf,\n"
           "fluxscale, subtract (ZOGY), detect, measure, vet, archive. Candidates are\n"
           "appended to the HDF5 archive (created if missing). Prints a summary.\n"
           "\n"
           "  --science FILE    science frame (CFITSIO syntax FILE[EXT] allowed)\n"
           "  --reference FILE  reference image of the same field\n"
           "  --archive FILE    HDF5 archive to append to (sets archive.path)\n"
           "  --sci-hdu N, --ref-hdu N  1-based HDU (default: first image HDU with data)\n"
           "  --frame-id ID     name of the frame in messages (default: science file name)\n"
           "\n"
           "Exit codes: 0 done, 2 usage, 3 configuration, 4 the frame failed, 5 could not run.\n");
}

static void print_summary(const hilal_frame *f, const hilal_runner *runner)
{
    size_t npos = 0, nneg = 0, nreal = 0;
    for (size_t i = 0; i < f->ncands; i++) {
        npos += f->cands[i].snr > 0;
        nneg += f->cands[i].snr < 0;
        nreal += f->cands[i].rb >= 0.5;
    }
    printf("frame %s: %zu candidates (%zu brightening, %zu fading, %zu with rb >= 0.5)\n",
           f->frame_id, f->ncands, npos, nneg, nreal);
    if (f->products & HILAL_PROD_PSF)
        printf("  PSF FWHM: science %.2f px (%d stars), reference %.2f px (%d stars)\n",
               f->sci_psf.fwhm_px, f->sci_psf.nstars, f->ref_psf.fwhm_px, f->ref_psf.nstars);
    if (f->products & HILAL_PROD_FLUXSCALE)
        printf("  flux ratio science/reference: %.4f +- %.4f (%d stars)\n", f->flux_ratio,
               f->flux_ratio_err, f->flux_ratio_nstars);
    if (f->products & HILAL_PROD_ALIGNED)
        printf("  registration RMS: %.3f px (x), %.3f px (y)\n", f->reg_rms_x_px, f->reg_rms_y_px);
    if (f->products & HILAL_PROD_DIFFERENCE)
        printf("  S_corr: mean %.3f, std %.3f on source-free pixels\n", f->diff.scorr_mean,
               f->diff.scorr_std);
    size_t n;
    const hilal_stage *const *stages = hilal_runner_stages(runner, &n);
    double total = 0;
    printf("  time:");
    for (size_t i = 0; i < n; i++) {
        printf(" %s %.3f s%s", stages[i]->name, f->stage_seconds[i], i + 1 < n ? "," : "");
        total += f->stage_seconds[i];
    }
    printf("; total %.3f s\n", total);
}

int hilal_cli_run(int argc, char **argv, hilal_cli *cli)
{
    hilal_cli_frame_opts in = {0};
    const char *archive = NULL;
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
        if (i + 1 >= argc) {
            fprintf(stderr, "hilal run: usage error: '%s' is unknown or needs a value; see `hilal run --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
        used = hilal_cli_frame_option("run", argv, &i, &in);
        if (used < 0)
            return HILAL_EXIT_USAGE;
        if (used > 0)
            continue;
        if (!strcmp(a, "--science"))
            in.sci = argv[++i];
        else if (!strcmp(a, "--reference"))
            in.ref = argv[++i];
        else if (!strcmp(a, "--archive"))
            archive = argv[++i];
        else {
            fprintf(stderr, "hilal run: usage error: unknown option '%s'; see `hilal run --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
    }
    if (in.sci == NULL || in.ref == NULL || archive == NULL) {
        fprintf(stderr, "hilal run: usage error: --science, --reference and --archive are required; see `hilal run --help`\n");
        return HILAL_EXIT_USAGE;
    }
    hilal_error err = {0};
    if (hilal_config_set(cli->cfg, "archive.path", archive, "--archive", &err) != HILAL_OK) {
        hilal_cli_report(&err);
        return HILAL_EXIT_CONFIG;
    }

    hilal_runner *runner = NULL;
    hilal_frame frame;
    int rc = hilal_cli_frame_start(cli, "run", NULL, 0, &in, &runner, &frame);
    if (rc != HILAL_EXIT_OK)
        goto cleanup;
    hilal_status st = hilal_runner_run(runner, &frame, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        rc = HILAL_EXIT_FRAMES_FAILED;
    } else if (cli->verbosity >= 0) {
        print_summary(&frame, runner);
        printf("  archive: %s\n", archive);
    }
cleanup:
    hilal_frame_clear(&frame);
    hilal_runner_free(runner);
    return rc;
}
