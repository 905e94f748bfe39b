/* hilal subtract: one science image against its reference through ingest,
 * background, stars, align, psf, fluxscale and subtract (ZOGY), the
 * difference products written to a multi-extension FITS file. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "hilal/checksum.h"
#include "hilal/fits.h"

static const char *const chain[] = {"ingest", "background", "stars", "align",
                                    "psf",    "fluxscale",  "subtract"};
#define NCHAIN (sizeof chain / sizeof chain[0])

static void help(void)
{
    printf("Usage: hilal subtract SCI.fits REF.fits -o OUT.fits [--sci-hdu N] [--ref-hdu N]\n"
           "                      [--frame-id ID] [--config FILE] [--set SECTION.KEY=VALUE]...\n"
           "\n"
           "ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016) of one science\n"
           "image against a reference of the same field: ingest, background, stars,\n"
           "align, psf, fluxscale and subtract are run, and OUT.fits receives\n"
           "\n"
           "  primary   no data; provenance (inputs and their SHA-256, flux ratio, noise,\n"
           "            PSF widths, S_corr statistics, configuration hash)\n"
           "  DIFF      proper difference image D (eq. 13), unit variance\n"
           "  SCORR     corrected score S_corr (eq. 25), in sigma: detect on this\n"
           "  FLUX      PSF-photometry flux of a point source at each pixel, science ADU\n"
           "  FLUX_ERR  its 1-sigma error, science ADU\n"
           "  PSF_D     PSF of D (eq. 14)\n"
           "  MASK      science and reference masks combined, plus filled pixels\n"
           "  TILES     table, one row per tile (one for a frame in one piece): PSF\n"
           "            FWHMs, flux ratio, registration RMS, S_corr median and std,\n"
           "            BAD flag (docs/zogy.md, Tiles)\n"
           "\n"
           "The image extensions carry the science image's WCS. An existing OUT.fits is\n"
           "replaced only once the new file is complete.\n"
           "\n"
           "  -o, --output FILE  FITS file to write (required)\n"
           "  --sci-hdu N, --ref-hdu N  1-based HDU (default: first image HDU with data)\n"
           "  --frame-id ID      name of the frame in messages (default: science file name)\n"
           "  --config FILE, --set K=V  as the global options (e.g. --set\n"
           "                     subtract.fft_rigor=measure, --set pipeline.threads=4)\n"
           "\n"
           "Exit codes: 0 done, 2 usage, 3 configuration, 4 the subtraction failed,\n"
           "5 could not run (unreadable input, unwritable output).\n");
}

/* The SHA-256 ingest recorded, else that of the file (the path without
 * any [ext] suffix), else "". */
static void input_sha256(const hilal_image *img, const char *given, char out[65])
{
    out[0] = '\0';
    if (img != NULL && img->meta.sha256[0] != '\0') {
        snprintf(out, 65, "%s", img->meta.sha256);
        return;
    }
    const char *path = (img != NULL && img->meta.path[0] != '\0') ? img->meta.path : given;
    hilal_error err = {0};
    if (hilal_sha256_file(path, out, &err) != HILAL_OK)
        out[0] = '\0';
}

/* One provenance card. */
typedef struct card {
    const char *key;
    char type;          /* 's' string, 'i' integer, 'd' real */
    const char *s;
    long long i;
    double d;
    const char *comment;
} card;

/* Provenance cards on the current HDU (real values that are unknown, NaN,
 * are left out). */
static hilal_status write_provenance(hilal_fits_writer *w, const hilal_frame *f,
                                     const hilal_cli *cli, const char *sci_sha,
                                     const char *ref_sha, hilal_error *err)
{
    char hash[65];
    hilal_config_hash(cli->cfg, hash);
    const hilal_image *sci = f->sci, *ref = f->ref;
    const card cards[] = {
        {"ORIGIN", 's', "Hilal", 0, 0, "software that made this file"},
        {"HILALVER", 's', hilal_version(), 0, 0, "Hilal version"},
        {"METHOD", 's', "ZOGY", 0, 0, "Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27"},
        {"FRAMEID", 's', f->frame_id, 0, 0, "frame name"},
        {"SCIFILE", 's', f->sci_path, 0, 0, "science input"},
        {"SCIHDU", 'i', NULL, sci ? sci->meta.hdu : f->sci_hdu, 0, "science HDU read (1 = primary)"},
        {"SCISHA", 's', sci_sha, 0, 0, "SHA-256 of the science file"},
        {"REFFILE", 's', f->ref_path, 0, 0, "reference input"},
        {"REFHDU", 'i', NULL, ref ? ref->meta.hdu : f->ref_hdu, 0, "reference HDU read (1 = primary)"},
        {"REFSHA", 's', ref_sha, 0, 0, "SHA-256 of the reference file"},
        {"FLUXRAT", 'd', NULL, 0, f->flux_ratio, "F_n: science/reference flux (F_r = 1)"},
        {"FLUXRERR", 'd', NULL, 0, f->flux_ratio_err, "error of FLUXRAT"},
        {"FLUXRNST", 'i', NULL, f->flux_ratio_nstars, 0, "stars behind FLUXRAT"},
        {"SIGMAN", 'd', NULL, 0, sci ? sci->sky_rms_adu : NAN, "[adu] background RMS of science"},
        {"SIGMAR", 'd', NULL, 0, ref ? ref->sky_rms_adu : NAN, "[adu] background RMS of reference"},
        {"FWHMN", 'd', NULL, 0, f->sci_psf.fwhm_px, "[pix] PSF FWHM of science"},
        {"FWHMR", 'd', NULL, 0, f->ref_psf.fwhm_px, "[pix] PSF FWHM of reference"},
        {"FWHMD", 'd', NULL, 0, f->diff.psf_d.fwhm_px, "[pix] FWHM of P_D"},
        {"REGRMSX", 'd', NULL, 0, f->reg_rms_x_px, "[pix] registration RMS along x"},
        {"REGRMSY", 'd', NULL, 0, f->reg_rms_y_px, "[pix] registration RMS along y"},
        {"ZOGYFD", 'd', NULL, 0, f->diff.f_d, "F_D, flux normalisation of D (eq. 15)"},
        {"SCORRMED", 'd', NULL, 0, f->diff.scorr_mean, "median of S_corr away from sources"},
        {"SCORRSTD", 'd', NULL, 0, f->diff.scorr_std, "1.4826 MAD of S_corr away from sources"},
        {"CONFHASH", 's', hash, 0, 0, "SHA-256 of the effective configuration"},
    };
    hilal_status st = HILAL_OK;
    /* Values longer than 68 characters (long paths) are written with the
     * CONTINUE convention, which FITS readers expect to be announced by a
     * LONGSTRN card (what CFITSIO's fits_write_key_longwarn writes). */
    int longstr = 0;
    for (size_t k = 0; k < sizeof cards / sizeof cards[0]; k++)
        if (cards[k].type == 's' && strlen(cards[k].s) > 68)
            longstr = 1;
    if (longstr)
        st = hilal_fits_writer_key_string(w, "LONGSTRN", "OGIP 1.0",
                                          "The OGIP long string convention may be used.", err);
    for (size_t k = 0; k < sizeof cards / sizeof cards[0] && st == HILAL_OK; k++) {
        const card *c = &cards[k];
        if (c->type == 's')
            st = hilal_fits_writer_key_string(w, c->key, c->s, c->comment, err);
        else if (c->type == 'i')
            st = hilal_fits_writer_key_int(w, c->key, c->i, c->comment, err);
        else if (isfinite(c->d))
            st = hilal_fits_writer_key_double(w, c->key, c->d, c->comment, err);
    }
    return st;
}

typedef struct plane {
    const char *extname;
    const float *pix;
    const char *bunit;
    const char *what;
} plane;


/* The TILES table: one row per tile ZOGY ran on (one row when the frame
 * was subtracted in one piece), with the PSFs, flux ratio, registration
 * RMS and S_corr statistics of each (docs/zogy.md, "Tiles"). */
static hilal_status write_tiles(hilal_fits_writer *w, const hilal_diff *d, hilal_error *err)
{
    const long n = d->tiles != NULL ? d->ntiles_x * d->ntiles_y : 0;
    hilal_status st = HILAL_OK;
    enum { NJ = 11, ND = 11 };
    int32_t *j[NJ] = {0};
    double *v[ND] = {0};
    for (int c = 0; c < NJ; c++)
        if ((j[c] = calloc((size_t)n + 1, sizeof *j[c])) == NULL)
            st = HILAL_ERR_NOMEM;
    for (int c = 0; c < ND; c++)
        if ((v[c] = calloc((size_t)n + 1, sizeof *v[c])) == NULL)
            st = HILAL_ERR_NOMEM;
    if (st != HILAL_OK) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the tile table");
        goto cleanup;
    }
    for (long t = 0; t < n; t++) {
        const hilal_diff_tile *p = &d->tiles[t];
        j[0][t] = (int32_t)(p->x0 + 1);
        j[1][t] = (int32_t)(p->y0 + 1);
        j[2][t] = (int32_t)p->nx;
        j[3][t] = (int32_t)p->ny;
        j[4][t] = (int32_t)p->nstars_sci;
        j[5][t] = (int32_t)p->nstars_ref;
        j[6][t] = (int32_t)p->psf_whole_frame;
        j[7][t] = (int32_t)p->flux_ratio_nstars;
        j[8][t] = (int32_t)p->reg_nmatch;
        j[9][t] = (int32_t)p->bad;
        j[10][t] = (int32_t)t;
        v[0][t] = p->fwhm_sci_px;
        v[1][t] = p->fwhm_ref_px;
        v[2][t] = p->fwhm_d_px;
        v[3][t] = p->flux_ratio;
        v[4][t] = p->flux_ratio_tile;
        v[5][t] = p->reg_rms_x_px;
        v[6][t] = p->reg_rms_y_px;
        v[7][t] = p->scorr_std_model;
        v[8][t] = p->noise_scale;
        v[9][t] = p->scorr_median;
        v[10][t] = p->scorr_std;
    }
    const hilal_fits_column cols[] = {
        {"TILE", 'J', NULL, "tile index, row-major from the lower left", NULL, j[10]},
        {"X0", 'J', "pix", "first column of the core (FITS 1-based)", NULL, j[0]},
        {"Y0", 'J', "pix", "first row of the core (FITS 1-based)", NULL, j[1]},
        {"NX", 'J', "pix", "columns in the core", NULL, j[2]},
        {"NY", 'J', "pix", "rows in the core", NULL, j[3]},
        {"FWHM_SCI", 'D', "pix", "FWHM of the science PSF used", v[0], NULL},
        {"FWHM_REF", 'D', "pix", "FWHM of the reference PSF used", v[1], NULL},
        {"FWHM_D", 'D', "pix", "FWHM of P_D", v[2], NULL},
        {"NSTARS_SCI", 'J', NULL, "stars behind the science PSF", NULL, j[4]},
        {"NSTARS_REF", 'J', NULL, "stars behind the reference PSF", NULL, j[5]},
        {"PSF_WHOLE", 'J', NULL, "1: the whole-frame PSFs were used", NULL, j[6]},
        {"FLUXRAT", 'D', NULL, "flux ratio F_n used", v[3], NULL},
        {"FLUXRAT_T", 'D', NULL, "F_n from the tile's own stars (NaN: few)", v[4], NULL},
        {"FLUXRAT_N", 'J', NULL, "stars behind FLUXRAT_T", NULL, j[7]},
        {"REGRMS_X", 'D', "pix", "registration RMS in x of the tile's stars", v[5], NULL},
        {"REGRMS_Y", 'D', "pix", "registration RMS in y of the tile's stars", v[6], NULL},
        {"REG_N", 'J', NULL, "matched star pairs behind REGRMS", NULL, j[8]},
        {"SC_STD_M", 'D', NULL, "S_corr std under the white-noise model", v[7], NULL},
        {"NOISESCL", 'D', NULL, "noise calibration factor (1: none)", v[8], NULL},
        {"SC_MED", 'D', NULL, "median of the final S_corr in the core", v[9], NULL},
        {"SC_STD", 'D', NULL, "robust std of the final S_corr in the core", v[10], NULL},
        {"BAD", 'J', NULL, "1: SC_STD outside the accepted range", NULL, j[9]},
    };
    st = hilal_fits_writer_add_table(w, "TILES", cols, (int)(sizeof cols / sizeof cols[0]), n, err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "NTILESX", d->tiles != NULL ? d->ntiles_x : 0,
                                       "tiles along x", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "NTILESY", d->tiles != NULL ? d->ntiles_y : 0,
                                       "tiles along y", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_string(w, "CONTENT", "per-tile PSFs, flux ratio, registration "
                                          "and S_corr statistics", NULL, err);
cleanup:
    for (int c = 0; c < NJ; c++)
        free(j[c]);
    for (int c = 0; c < ND; c++)
        free(v[c]);
    return st;
}

static hilal_status write_products(const char *path, const hilal_frame *f, const hilal_cli *cli,
                                   hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char sci_sha[65], ref_sha[65];
    input_sha256(f->sci, f->sci_path, sci_sha);
    input_sha256(f->ref, f->ref_path, ref_sha);
    const hilal_diff *d = &f->diff;
    const plane planes[] = {
        {"DIFF", d->d, "", "proper difference image D (ZOGY eq. 13), unit variance"},
        {"SCORR", d->scorr, "sigma", "corrected score S_corr (ZOGY eq. 25)"},
        {"FLUX", d->flux, "adu", "point-source flux at each pixel, science ADU (ZOGY eqs. 41-42)"},
        {"FLUX_ERR", d->flux_err, "adu", "1-sigma error of FLUX, science ADU (ZOGY eq. 43)"},
    };
    const hilal_meta *meta = f->sci ? &f->sci->meta : NULL;

    hilal_fits_writer *w = hilal_fits_writer_open(path, err);
    if (w == NULL)
        return HILAL_ERR_IO;
    if ((st = hilal_fits_writer_add_empty(w, NULL, err)) != HILAL_OK ||
        (st = write_provenance(w, f, cli, sci_sha, ref_sha, err)) != HILAL_OK)
        goto cleanup;
    for (size_t k = 0; k < sizeof planes / sizeof planes[0]; k++) {
        const plane *p = &planes[k];
        if ((st = hilal_fits_writer_add_float(w, p->extname, d->nx, d->ny, p->pix, err)) != HILAL_OK)
            goto cleanup;
        if (meta != NULL && meta->header != NULL &&
            (st = hilal_fits_writer_copy_cards(w, meta->header, meta->nheader_cards,
                                               HILAL_FITS_COPY_WCS, err)) != HILAL_OK)
            goto cleanup;
        if ((p->bunit[0] != '\0' &&
             (st = hilal_fits_writer_key_string(w, "BUNIT", p->bunit, NULL, err)) != HILAL_OK) ||
            (st = hilal_fits_writer_key_string(w, "CONTENT", p->what, NULL, err)) != HILAL_OK ||
            (st = write_provenance(w, f, cli, sci_sha, ref_sha, err)) != HILAL_OK)
            goto cleanup;
    }
    if ((st = hilal_fits_writer_add_float(w, "PSF_D", d->psf_d.size, d->psf_d.size, d->psf_d.data,
                                          err)) != HILAL_OK ||
        (st = hilal_fits_writer_key_string(w, "CONTENT", "PSF of D, P_D (ZOGY eq. 14), sum 1",
                                           NULL, err)) != HILAL_OK ||
        (st = hilal_fits_writer_key_double(w, "FWHM", d->psf_d.fwhm_px, "[pix] FWHM of P_D",
                                           err)) != HILAL_OK ||
        (st = hilal_fits_writer_key_double(w, "ZOGYFD", d->f_d, "F_D (eq. 15)", err)) != HILAL_OK)
        goto cleanup;
    if ((st = hilal_fits_writer_add_mask(w, "MASK", d->nx, d->ny, d->mask, err)) != HILAL_OK)
        goto cleanup;
    if (meta != NULL && meta->header != NULL &&
        (st = hilal_fits_writer_copy_cards(w, meta->header, meta->nheader_cards, HILAL_FITS_COPY_WCS,
                                           err)) != HILAL_OK)
        goto cleanup;
    if ((st = write_tiles(w, d, err)) != HILAL_OK)
        goto cleanup;
    st = hilal_fits_writer_close(w, err);
    w = NULL;
cleanup:
    hilal_fits_writer_free(w);
    if (st != HILAL_OK)
        hilal_error_context(err, "writing %s", path);
    return st;
}

int hilal_cli_subtract(int argc, char **argv, hilal_cli *cli)
{
    hilal_cli_frame_opts in = {0};
    const char *out = NULL;
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
        if (a[0] != '-' || a[1] == '\0') {
            if (in.sci == NULL) {
                in.sci = a;
            } else if (in.ref == NULL) {
                in.ref = a;
            } else {
                fprintf(stderr, "hilal subtract: usage error: unexpected argument '%s'; see `hilal subtract --help`\n", a);
                return HILAL_EXIT_USAGE;
            }
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "hilal subtract: usage error: '%s' is unknown or needs a value; see `hilal subtract --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
        used = hilal_cli_frame_option("subtract", argv, &i, &in);
        if (used < 0)
            return HILAL_EXIT_USAGE;
        if (used > 0)
            continue;
        if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            out = argv[++i];
        } else {
            fprintf(stderr, "hilal subtract: usage error: unknown option '%s'; see `hilal subtract --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
    }
    if (in.sci == NULL || in.ref == NULL || out == NULL) {
        fprintf(stderr, "hilal subtract: usage error: a science image, a reference image and -o OUT.fits are required; see `hilal subtract --help`\n");
        return HILAL_EXIT_USAGE;
    }

    /* The chain, by name from the registry. */
    const hilal_stage *stages[NCHAIN];
    for (size_t k = 0; k < NCHAIN; k++) {
        stages[k] = hilal_registry_find(chain[k]);
        if (stages[k] == NULL) {
            fprintf(stderr, "hilal subtract: the '%s' stage is not part of this build of hilal; "
                            "`hilal subtract` needs %s, %s, %s, %s, %s, %s and %s\n",
                    chain[k], chain[0], chain[1], chain[2], chain[3], chain[4], chain[5], chain[6]);
            return HILAL_EXIT_CANNOT_RUN;
        }
    }
    hilal_error err = {0};
    hilal_runner *runner = NULL;
    hilal_frame frame;
    int rc = hilal_cli_frame_start(cli, "subtract", stages, NCHAIN, &in, &runner, &frame);
    if (rc != HILAL_EXIT_OK)
        goto cleanup;
    hilal_status st = hilal_runner_run(runner, &frame, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        /* unreadable inputs are "could not run"; a failure in the science
         * stages is a failed frame */
        rc = (st == HILAL_ERR_IO || st == HILAL_ERR_FITS || st == HILAL_ERR_FORMAT ||
              st == HILAL_ERR_NOTFOUND || st == HILAL_ERR_NOMEM)
                 ? HILAL_EXIT_CANNOT_RUN
                 : HILAL_EXIT_FRAMES_FAILED;
        goto cleanup;
    }
    st = write_products(out, &frame, cli, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        rc = HILAL_EXIT_CANNOT_RUN;
        goto cleanup;
    }
    if (cli->verbosity >= 0) {
        double total = 0;
        for (size_t k = 0; k < NCHAIN; k++)
            total += frame.stage_seconds[k];
        printf("%s: %ld x %ld px, flux ratio %.4f, PSF FWHM %.2f/%.2f px (science/reference), "
               "S_corr median %.3f std %.3f; subtract %.2f s, total %.2f s\n",
               out, frame.diff.nx, frame.diff.ny, frame.flux_ratio, frame.sci_psf.fwhm_px,
               frame.ref_psf.fwhm_px, frame.diff.scorr_mean, frame.diff.scorr_std,
               frame.stage_seconds[NCHAIN - 1], total);
    }
cleanup:
    hilal_frame_clear(&frame);
    hilal_runner_free(runner);
    return rc;
}
