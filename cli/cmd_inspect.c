/* hilal inspect: what ingest makes of FITS files. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "hilal/fits.h"
#include "hilal/ingest.h"
#include "hilal/stats.h"

static void inspect_usage(FILE *out)
{
    fprintf(out,
            "Usage: hilal inspect [--hdu N] [--set ingest.KEY=VALUE] FILE...\n"
            "\n"
            "Reads each FILE exactly as a pipeline run does (the [ingest] configuration\n"
            "applies) and prints what was read: HDU, size, BITPIX and scaling, masked\n"
            "pixels by reason, gain, read noise, saturation, exposure time, MJD, filter,\n"
            "object, zero point (each with where it came from), SHA-256 of the file, WCS\n"
            "and min/median/max of the unmasked pixels. Values a run would need but the\n"
            "file lacks are shown as unknown, with the setting that supplies them.\n"
            "\n"
            "FILE may use CFITSIO's extended syntax: f.fits[2] (third HDU, counted from\n"
            "0), f.fits[SCI], f.fits[*,*,3:3]; .gz, .Z and tile-compressed files are read.\n"
            "\n"
            "Options:\n"
            "  --hdu N             HDU to read, 1 = primary (default: first image with data)\n"
            "  --set SECTION.KEY=VALUE, --config FILE   as before the command\n"
            "  -h, --help          this help\n"
            "\n"
            "Exit status: 0 when every file was read, otherwise that of the first failure\n"
            "(5: unreadable file, 3: configuration error, 2: usage error).\n");
}

/* Min, median and max of the pixels whose mask is 0. Returns their count. */
static size_t pixel_stats(const hilal_image *img, double *mn, double *med, double *mx)
{
    size_t n = (size_t)img->nx * (size_t)img->ny, k = 0;
    float *v = malloc(n * sizeof *v);
    *mn = *med = *mx = NAN;
    if (v == NULL)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (img->mask[i] == 0 && isfinite(img->pix[i]))
            v[k++] = img->pix[i];
    if (k > 0) {
        float lo = v[0], hi = v[0];
        for (size_t i = 1; i < k; i++) {
            lo = v[i] < lo ? v[i] : lo;
            hi = v[i] > hi ? v[i] : hi;
        }
        *mn = lo;
        *mx = hi;
        /* Median: the middle value, or the mean of the two middle values. */
        *med = hilal_median_float(v, k);
    }
    free(v);
    return k;
}

static void print_value(const char *label, double v, const char *unit, const char *src,
                        const char *unknown_hint)
{
    if (isnan(v))
        printf("%-12s unknown%s%s\n", label, unknown_hint ? " " : "",
               unknown_hint ? unknown_hint : "");
    else if (isinf(v))
        printf("%-12s %s%s%s (%s)\n", label, v > 0 ? "+inf" : "-inf", unit[0] ? " " : "", unit,
               src);
    else
        printf("%-12s %.10g%s%s (%s)\n", label, v, unit[0] ? " " : "", unit, src);
}

static void print_text(const char *label, const char *v, const char *src)
{
    if (v[0] == '\0')
        printf("%-12s unknown\n", label);
    else
        printf("%-12s %s (%s)\n", label, v, src);
}

static hilal_status inspect_one(const hilal_ingest_opts *opts, const char *path, int hdu,
                                hilal_error *err)
{
    hilal_image *img = NULL;
    hilal_ingest_sources src;
    hilal_status st = hilal_ingest_read(opts, path, hdu, &img, &src, err);
    if (st != HILAL_OK)
        return st;
    const hilal_meta *m = &img->meta;
    size_t npix = (size_t)img->nx * (size_t)img->ny;
    struct stat sb;
    char hint[256];

    printf("%-12s %s\n", "file:", m->path);
    printf("%-12s %d\n", "hdu:", m->hdu);
    if (stat(m->path, &sb) == 0)
        printf("%-12s %ld x %ld px (file %lld bytes)\n", "size:", img->nx, img->ny,
               (long long)sb.st_size);
    else
        printf("%-12s %ld x %ld px\n", "size:", img->nx, img->ny);
    printf("%-12s %d (BSCALE %.15g, BZERO %.15g)\n", "bitpix:", m->bitpix, m->bscale, m->bzero);
    printf("%-12s %s\n", "sha256:", m->sha256[0] ? m->sha256 : "not computed");

    snprintf(hint, sizeof hint, "(no %s keyword and ingest.gain not set: a run stops here)",
             opts->key_gain);
    print_value("gain:", m->gain_e_per_adu, "e-/ADU", src.gain, hint);
    snprintf(hint, sizeof hint,
             "(no %s keyword and ingest.rdnoise not set: a run stops here)", opts->key_rdnoise);
    print_value("rdnoise:", m->rdnoise_e, "e-", src.rdnoise, hint);
    print_value("saturation:", m->saturate_adu, "ADU", src.saturate, NULL);
    print_value("exptime:", m->exptime_s, "s", src.exptime, NULL);
    if (isnan(m->mjd))
        printf("%-12s unknown\n", "mjd:");
    else /* 1e-6 d = 0.09 s */
        printf("%-12s %.6f (%s)\n", "mjd:", m->mjd, src.mjd);
    print_text("filter:", m->filter, src.filter);
    print_text("object:", m->object, src.object);
    print_value("zeropoint:", m->zeropoint_mag, "mag", src.zeropoint, NULL);

    char wcs[512];
    hilal_wcs_describe(m->wcs, wcs, sizeof wcs);
    printf("%-12s %s\n", "wcs:", wcs);

    size_t nmasked = 0;
    for (size_t i = 0; i < npix; i++)
        nmasked += img->mask[i] != 0;
    printf("%-12s %zu of %zu px\n", "masked:", nmasked, npix);
    for (unsigned b = 0; b < 16; b++) {
        const char *name = hilal_fits_mask_name(1u << b);
        if (name != NULL)
            printf("  %-10s %zu\n", name, hilal_image_count_mask(img, (hilal_mask_t)(1u << b)));
    }

    double mn, med, mx;
    size_t nused = pixel_stats(img, &mn, &med, &mx);
    if (nused > 0)
        printf("%-12s min %.8g, median %.8g, max %.8g ADU (%zu unmasked px)\n", "pixels:", mn,
               med, mx, nused);
    else
        printf("%-12s no unmasked pixels\n", "pixels:");
    hilal_image_free(img);
    return HILAL_OK;
}

int hilal_cli_inspect(int argc, char **argv, hilal_cli *cli)
{
    int hdu = 0, nfiles = 0, first_fail = HILAL_EXIT_OK;
    char **files = calloc((size_t)(argc > 0 ? argc : 1), sizeof *files);
    if (files == NULL) {
        fprintf(stderr, "hilal: out of memory\n");
        return HILAL_EXIT_CANNOT_RUN;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int used;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            inspect_usage(stdout);
            free(files);
            return HILAL_EXIT_OK;
        } else if (strcmp(a, "--hdu") == 0 || strncmp(a, "--hdu=", 6) == 0) {
            const char *v = a[5] == '=' ? a + 6 : (i + 1 < argc ? argv[++i] : NULL);
            char *end = NULL;
            long n = v != NULL ? strtol(v, &end, 10) : -1;
            if (v == NULL || end == v || *end != '\0' || n < 0 || n > 100000) {
                fprintf(stderr, "hilal: usage error: --hdu needs an HDU number (1 = primary, 0 "
                                "= first image)\n");
                free(files);
                return HILAL_EXIT_USAGE;
            }
            hdu = (int)n;
        } else if ((used = hilal_cli_config_option(cli, argc, argv, &i)) != 0) {
            if (used < 0) {
                free(files);
                return HILAL_EXIT_CONFIG;
            }
        } else if (a[0] == '-' && a[1] != '\0') {
            fprintf(stderr, "hilal: usage error: unknown option '%s' for inspect; see "
                            "'hilal inspect --help'\n", a);
            free(files);
            return HILAL_EXIT_USAGE;
        } else {
            files[nfiles++] = argv[i];
        }
    }
    if (nfiles == 0) {
        fprintf(stderr, "hilal: usage error: inspect needs at least one FITS file; see "
                        "'hilal inspect --help'\n");
        free(files);
        return HILAL_EXIT_USAGE;
    }

    hilal_error err;
    hilal_error_clear(&err);
    hilal_ingest_opts opts;
    hilal_status st = hilal_ingest_opts_from_config(cli->cfg, &opts, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        free(files);
        return hilal_cli_exit_code(st);
    }
    opts.require_noise = 0; /* report missing gain / read noise instead of failing */

    for (int k = 0; k < nfiles; k++) {
        if (k > 0)
            printf("\n");
        hilal_error_clear(&err);
        st = inspect_one(&opts, files[k], hdu, &err);
        fflush(stdout);
        if (st != HILAL_OK) {
            hilal_cli_report(&err);
            if (first_fail == HILAL_EXIT_OK)
                first_fail = hilal_cli_exit_code(st);
        }
    }
    free(files);
    return first_fail;
}
