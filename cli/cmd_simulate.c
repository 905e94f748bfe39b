/* hilal simulate: write a simulated reference/science pair with its truth. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "hilal/simulate.h"

static void help(const hilal_sim_options *d)
{
    printf("Usage: hilal simulate --out DIR [options]\n"
           "\n"
           "Writes a simulated reference and science image of one star field with\n"
           "known injected events: DIR/ref.fits, DIR/sci.fits, DIR/truth.csv (one row\n"
           "per event), DIR/stars.csv, DIR/galaxies.csv and DIR/README.txt (columns\n"
           "and the command that reproduces the files). The same options give\n"
           "byte-identical files. Model and formulas: docs/simulate.md.\n"
           "\n"
           "Output\n"
           "  --out DIR             output directory (created; files replaced)    [required]\n"
           "  --size N | NXxNY      image size, px                                [%ldx%ld]\n"
           "  --seed S              random seed (unsigned 64-bit)                 [%llu]\n"
           "  --bitpix -32|16       float32, or unsigned 16-bit via BZERO         [%d]\n"
           "  --threads N           worker threads, 0 = 2                         [%d]\n"
           "\n"
           "Geometry (both frames TAN, same tangent point)\n"
           "  --pixscale ARCSEC     pixel scale, arcsec/px                        [%g]\n"
           "  --center RA,DEC       field centre, deg                             [%g,%g]\n"
           "  --offset-px DX,DY     a star at reference pixel p appears at science\n"
           "                        pixel p + (DX,DY) (before rotation)           [%g,%g]\n"
           "  --rotate-deg DEG      science grid rotated counter-clockwise by DEG  [%g]\n"
           "\n"
           "PSF\n"
           "  --psf moffat|gaussian profile                                       [moffat]\n"
           "  --beta B              Moffat beta                                   [%g]\n"
           "  --fwhm-ref PX         reference FWHM at the field centre, px        [%g]\n"
           "  --fwhm-sci PX         science FWHM at the field centre, px          [%g]\n"
           "  --psf-vary FRAC       FWHM changes across the field by up to FRAC   [%g]\n"
           "  --psf-ellip E         PSF ellipticity 1-b/a                         [%g]\n"
           "\n"
           "Sky and detector\n"
           "  --sky-sci ADU         science sky at the centre, ADU/px             [%g]\n"
           "  --sky-ref ADU         reference sky at the centre, ADU/px           [%g]\n"
           "  --sky-gradient FRAC   sky change across the field                   [%g]\n"
           "  --gain E              gain of one exposure, e-/ADU                  [%g]\n"
           "  --rdnoise E           read noise of one exposure, e-                [%g]\n"
           "  --saturate ADU        saturation level (pixels clipped)             [%g]\n"
           "  --bleed | --no-bleed  saturated charge bleeds along columns         [--bleed]\n"
           "  --exptime S           exposure time, s                              [%g]\n"
           "  --ref-depth F         reference = mean of F exposures               [%g]\n"
           "  --flux-ratio R        science ADU per reference ADU of a star       [%g]\n"
           "  --zeropoint MAG       reference zero point (mag of 1 ADU)           [%g]\n"
           "  --mjd-ref MJD         reference MJD-OBS                             [%.2f]\n"
           "  --mjd-sci MJD         science MJD-OBS                               [%.2f]\n"
           "  --filter NAME         FILTER keyword                                [%s]\n"
           "  --object NAME         OBJECT keyword                                [%s]\n"
           "\n"
           "Field\n"
           "  --star-density N      stars per 10^6 px                             [%g]\n"
           "  --mag-range B,F       star magnitudes, bright,faint                 [%g,%g]\n"
           "  --count-slope K       dN/dm ~ 10^(K m)                              [%g]\n"
           "  --galaxy-density N    galaxies per 10^6 px                          [%g]\n"
           "\n"
           "Events (science frame; -1 = automatic, scaled with the area)\n"
           "  --n-transients N      new point sources; auto 50 per 1024^2         [auto]\n"
           "  --snr-range MIN,MAX   ideal S/N range, log-uniform                  [%g,%g]\n"
           "  --galaxy-frac F       fraction of transients on galaxies            [%g]\n"
           "  --n-variables N       variable stars; auto 10 per 1024^2            [auto]\n"
           "  --n-cosmics N         cosmic rays; auto 150 per 1024^2              [auto]\n"
           "  --bad-columns N       hot/dead column segments                      [%ld]\n"
           "  --no-events           none of the above: a noise-only pair with the\n"
           "                        same stars and noise as without it\n"
           "\n"
           "  -h, --help            this help\n",
           d->nx, d->ny, (unsigned long long)d->seed, d->bitpix, d->nthreads, d->pixscale_arcsec,
           d->ra_deg, d->dec_deg, d->offset_x_px, d->offset_y_px, d->rotate_deg, d->moffat_beta,
           d->fwhm_ref_px, d->fwhm_sci_px, d->psf_vary_frac, d->psf_ellip, d->sky_sci_adu,
           d->sky_ref_adu, d->sky_gradient_frac, d->gain_e_per_adu, d->rdnoise_e, d->saturate_adu,
           d->exptime_s, d->ref_depth, d->flux_ratio, d->zeropoint_mag, d->mjd_ref, d->mjd_sci,
           d->filter, d->object, d->star_density, d->mag_bright, d->mag_faint, d->count_slope,
           d->galaxy_density, d->snr_min, d->snr_max, d->galaxy_frac, d->n_bad_columns);
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "hilal simulate: usage error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "; see `hilal simulate --help`\n");
    va_end(ap);
    return HILAL_EXIT_USAGE;
}

static int parse_double(const char *flag, const char *s, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno != 0)
        return usage_error("%s expects a number, got '%s'", flag, s);
    *out = v;
    return 0;
}

static int parse_long(const char *flag, const char *s, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno != 0)
        return usage_error("%s expects an integer, got '%s'", flag, s);
    *out = v;
    return 0;
}

static int parse_pair(const char *flag, const char *s, double *a, double *b)
{
    char *end = NULL;
    errno = 0;
    *a = strtod(s, &end);
    if (end == s || *end != ',' || errno != 0)
        return usage_error("%s expects two numbers A,B, got '%s'", flag, s);
    const char *s2 = end + 1;
    *b = strtod(s2, &end);
    if (end == s2 || *end != '\0' || errno != 0)
        return usage_error("%s expects two numbers A,B, got '%s'", flag, s);
    return 0;
}

static int parse_size(const char *s, long *nx, long *ny)
{
    char *end = NULL;
    errno = 0;
    long a = strtol(s, &end, 10), b;
    if (end == s || errno != 0)
        return usage_error("%s expects N or NXxNY, got '%s'", "--size", s);
    if (*end == '\0') {
        b = a;
    } else if (*end == 'x' || *end == 'X') {
        const char *s2 = end + 1;
        b = strtol(s2, &end, 10);
        if (end == s2 || *end != '\0' || errno != 0)
            return usage_error("%s expects N or NXxNY, got '%s'", "--size", s);
    } else {
        return usage_error("%s expects N or NXxNY, got '%s'", "--size", s);
    }
    *nx = a;
    *ny = b;
    return 0;
}

static int parse_seed(const char *s, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    if (*s == '-')
        return usage_error("%s expects a non-negative integer, got '%s'", "--seed", s);
    unsigned long long v = strtoull(s, &end, 0);
    if (end == s || *end != '\0' || errno != 0)
        return usage_error("%s expects a non-negative integer, got '%s'", "--seed", s);
    *out = (uint64_t)v;
    return 0;
}

int hilal_cli_simulate(int argc, char **argv, hilal_cli *cli)
{
    hilal_sim_options o = hilal_sim_options_default();
    const char *outdir = NULL;
    int rc = 0;
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        int used = hilal_cli_config_option(cli, argc, argv, &i);
        if (used < 0)
            return HILAL_EXIT_CONFIG;
        if (used > 0)
            continue;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            hilal_sim_options d = hilal_sim_options_default();
            help(&d);
            return HILAL_EXIT_OK;
        }
        /* Flags without a value. */
        if (!strcmp(a, "--no-events")) {
            o.no_events = 1;
            continue;
        }
        if (!strcmp(a, "--bleed") || !strcmp(a, "--no-bleed")) {
            o.bleed = a[2] == 'b';
            continue;
        }
        /* Everything else takes a value: "--opt V" or "--opt=V". */
        char name[64];
        const char *v = NULL, *eq = strchr(a, '=');
        if (strncmp(a, "--", 2) == 0 && eq != NULL && (size_t)(eq - a) < sizeof name) {
            memcpy(name, a, (size_t)(eq - a));
            name[eq - a] = '\0';
            v = eq + 1;
        } else {
            snprintf(name, sizeof name, "%s", a);
            if (strncmp(a, "--", 2) == 0 && i + 1 < argc)
                v = argv[++i];
        }
        if (strncmp(name, "--", 2) != 0)
            return usage_error("unexpected argument '%s'", a);
        if (v == NULL)
            return usage_error("%s needs a value", name);
        long l = 0;
        if (!strcmp(name, "--out"))
            outdir = v;
        else if (!strcmp(name, "--size"))
            rc = parse_size(v, &o.nx, &o.ny);
        else if (!strcmp(name, "--seed"))
            rc = parse_seed(v, &o.seed);
        else if (!strcmp(name, "--bitpix"))
            rc = parse_long(name, v, &l), o.bitpix = (int)l;
        else if (!strcmp(name, "--threads"))
            rc = parse_long(name, v, &l), o.nthreads = (int)l;
        else if (!strcmp(name, "--pixscale"))
            rc = parse_double(name, v, &o.pixscale_arcsec);
        else if (!strcmp(name, "--center"))
            rc = parse_pair(name, v, &o.ra_deg, &o.dec_deg);
        else if (!strcmp(name, "--offset-px"))
            rc = parse_pair(name, v, &o.offset_x_px, &o.offset_y_px);
        else if (!strcmp(name, "--rotate-deg"))
            rc = parse_double(name, v, &o.rotate_deg);
        else if (!strcmp(name, "--psf")) {
            if (!strcmp(v, "moffat"))
                o.psf_model = HILAL_SIM_PSF_MOFFAT;
            else if (!strcmp(v, "gaussian"))
                o.psf_model = HILAL_SIM_PSF_GAUSSIAN;
            else
                rc = usage_error("--psf expects moffat or gaussian, got '%s'", v);
        } else if (!strcmp(name, "--beta"))
            rc = parse_double(name, v, &o.moffat_beta);
        else if (!strcmp(name, "--fwhm-ref"))
            rc = parse_double(name, v, &o.fwhm_ref_px);
        else if (!strcmp(name, "--fwhm-sci"))
            rc = parse_double(name, v, &o.fwhm_sci_px);
        else if (!strcmp(name, "--psf-vary"))
            rc = parse_double(name, v, &o.psf_vary_frac);
        else if (!strcmp(name, "--psf-ellip"))
            rc = parse_double(name, v, &o.psf_ellip);
        else if (!strcmp(name, "--sky-sci"))
            rc = parse_double(name, v, &o.sky_sci_adu);
        else if (!strcmp(name, "--sky-ref"))
            rc = parse_double(name, v, &o.sky_ref_adu);
        else if (!strcmp(name, "--sky-gradient"))
            rc = parse_double(name, v, &o.sky_gradient_frac);
        else if (!strcmp(name, "--gain"))
            rc = parse_double(name, v, &o.gain_e_per_adu);
        else if (!strcmp(name, "--rdnoise"))
            rc = parse_double(name, v, &o.rdnoise_e);
        else if (!strcmp(name, "--saturate"))
            rc = parse_double(name, v, &o.saturate_adu);
        else if (!strcmp(name, "--exptime"))
            rc = parse_double(name, v, &o.exptime_s);
        else if (!strcmp(name, "--ref-depth"))
            rc = parse_double(name, v, &o.ref_depth);
        else if (!strcmp(name, "--flux-ratio"))
            rc = parse_double(name, v, &o.flux_ratio);
        else if (!strcmp(name, "--zeropoint"))
            rc = parse_double(name, v, &o.zeropoint_mag);
        else if (!strcmp(name, "--mjd-ref"))
            rc = parse_double(name, v, &o.mjd_ref);
        else if (!strcmp(name, "--mjd-sci"))
            rc = parse_double(name, v, &o.mjd_sci);
        else if (!strcmp(name, "--filter") || !strcmp(name, "--object")) {
            char *dst = name[2] == 'f' ? o.filter : o.object;
            size_t cap = name[2] == 'f' ? sizeof o.filter : sizeof o.object;
            if (strlen(v) >= cap)
                rc = usage_error("%s value '%s' is too long", name, v);
            else
                snprintf(dst, cap, "%s", v);
        } else if (!strcmp(name, "--star-density"))
            rc = parse_double(name, v, &o.star_density);
        else if (!strcmp(name, "--mag-range"))
            rc = parse_pair(name, v, &o.mag_bright, &o.mag_faint);
        else if (!strcmp(name, "--count-slope"))
            rc = parse_double(name, v, &o.count_slope);
        else if (!strcmp(name, "--galaxy-density"))
            rc = parse_double(name, v, &o.galaxy_density);
        else if (!strcmp(name, "--n-transients"))
            rc = parse_long(name, v, &o.n_transients);
        else if (!strcmp(name, "--snr-range"))
            rc = parse_pair(name, v, &o.snr_min, &o.snr_max);
        else if (!strcmp(name, "--galaxy-frac"))
            rc = parse_double(name, v, &o.galaxy_frac);
        else if (!strcmp(name, "--n-variables"))
            rc = parse_long(name, v, &o.n_variables);
        else if (!strcmp(name, "--n-cosmics"))
            rc = parse_long(name, v, &o.n_cosmics);
        else if (!strcmp(name, "--bad-columns"))
            rc = parse_long(name, v, &o.n_bad_columns);
        else
            rc = usage_error("unknown option '%s'", name);
    }
    if (rc != 0)
        return rc;
    if (outdir == NULL)
        return usage_error("--out DIR is required");

    hilal_error err = {0};
    if (hilal_sim_options_check(&o, &err) != HILAL_OK) {
        hilal_cli_report(&err);
        return HILAL_EXIT_USAGE;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    hilal_image *sci = NULL, *ref = NULL;
    hilal_sim_truth *truth = NULL;
    hilal_status st = hilal_sim_make(&o, &sci, &ref, &truth, &err);
    if (st == HILAL_OK)
        st = hilal_sim_write_outputs(&o, sci, ref, truth, outdir, &err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        rc = hilal_cli_exit_code(st);
        goto cleanup;
    }
    if (cli->verbosity >= 0) {
        size_t count[4] = {0, 0, 0, 0};
        for (size_t i = 0; i < truth->nevents; i++)
            count[truth->events[i].type]++;
        printf("hilal simulate: wrote %s/{ref,sci}.fits (%ld x %ld px), truth.csv (%zu "
               "transients, %zu variables, %zu cosmics, %zu bad columns), stars.csv (%zu stars), "
               "galaxies.csv (%zu) in %.2f s\n",
               outdir, o.nx, o.ny, count[0], count[1], count[2], count[3], truth->nstars,
               truth->ngalaxies,
               (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    }
    rc = HILAL_EXIT_OK;
cleanup:
    hilal_image_free(sci);
    hilal_image_free(ref);
    hilal_sim_truth_free(truth);
    return rc;
}
