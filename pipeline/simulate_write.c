/* Frame simulator: FITS headers and images (through the writer of
 * pipeline/fits.c), truth tables (CSV). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "hilal/fits.h"
#include "simulate_internal.h"

/* ======================================================================= */
/* FITS                                                                    */
/* ======================================================================= */

/* DATE-OBS (ISO 8601, UTC) of an MJD, to the millisecond. */
static void mjd_to_iso(double mjd, char *buf, size_t len)
{
    /* MJD 40587 is 1970-01-01T00:00:00 UTC. */
    double ms_total = floor((mjd - 40587.0) * 86400000.0 + 0.5);
    double sec = floor(ms_total / 1000.0);
    int ms = (int)(ms_total - sec * 1000.0);
    time_t tt = (time_t)sec;
    struct tm tm;
    if (gmtime_r(&tt, &tm) == NULL) {
        snprintf(buf, len, "1970-01-01T00:00:00.000");
        return;
    }
    snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03d", (tm.tm_year + 1900) % 10000,
             (tm.tm_mon + 1) % 100, tm.tm_mday % 100, tm.tm_hour % 100, tm.tm_min % 100,
             tm.tm_sec % 100, ms % 1000);
}

/* One header card of a simulated frame. */
typedef struct sim_card {
    const char *key;
    char type;            /* 's' string, 'd' real, 'i' integer, 'u' unsigned, 'c' COMMENT */
    const char *s;        /* value of 's', text of 'c' */
    double d;             /* value of 'd' */
    unsigned long long n; /* value of 'i' and 'u' (non-negative here) */
    const char *comment;
} sim_card;

/* Every keyword after the structural ones. The same function writes the
 * file and the in-memory header, so the two cannot disagree. */
static hilal_status put_keys(hilal_fits_writer *w, const sim_header *h, hilal_error *err)
{
    const hilal_sim_options *o = h->o;
    char date[64], object[69];
    mjd_to_iso(h->mjd, date, sizeof date);
    /* A FITS string value holds 68 characters: a longer --object is cut
     * there, as CFITSIO cuts a plain string card. */
    snprintf(object, sizeof object, "%.68s", o->object);
    int moffat = o->psf_model == HILAL_SIM_PSF_MOFFAT;
    int integral_depth = h->depth >= 1.0 && h->depth == floor(h->depth) && h->depth < 1e6;
    const sim_card cards[] = {
        {"OBJECT", 's', object, 0, 0, "field name"},
        {"TELESCOP", 's', "HILAL-SIM", 0, 0, "simulated by hilal simulate"},
        {"INSTRUME", 's', "SIMCAM", 0, 0, "simulated detector"},
        {"FILTER", 's', o->filter, 0, 0, "filter name"},
        {"EXPTIME", 'd', NULL, h->exptime_s, 0, "[s] exposure time of one exposure"},
        {"MJD-OBS", 'd', NULL, h->mjd, 0, "[d] MJD of the observation (UTC)"},
        {"DATE-OBS", 's', date, 0, 0, "UTC date of the observation"},
        {"GAIN", 'd', NULL, h->gain_e_per_adu, 0, "[e-/ADU] effective gain"},
        {"RDNOISE", 'd', NULL, h->rdnoise_e, 0, "[e-] effective read noise"},
        {"SATURATE", 'd', NULL, h->saturate_adu, 0, "[ADU] saturation level"},
        {"MAGZP", 'd', NULL, h->zeropoint_mag, 0, "[mag] magnitude of a 1 ADU source"},
        {"WCSAXES", 'i', NULL, 0, 2, "number of WCS axes"},
        {"CTYPE1", 's', "RA---TAN", 0, 0, "gnomonic projection"},
        {"CTYPE2", 's', "DEC--TAN", 0, 0, "gnomonic projection"},
        {"CUNIT1", 's', "deg", 0, 0, "unit of CRVAL1 and CD1_j"},
        {"CUNIT2", 's', "deg", 0, 0, "unit of CRVAL2 and CD2_j"},
        {"CRVAL1", 'd', NULL, h->crval[0], 0, "[deg] RA of the reference point"},
        {"CRVAL2", 'd', NULL, h->crval[1], 0, "[deg] Dec of the reference point"},
        {"CRPIX1", 'd', NULL, h->crpix[0], 0, "[px] x of the reference point"},
        {"CRPIX2", 'd', NULL, h->crpix[1], 0, "[px] y of the reference point"},
        {"CD1_1", 'd', NULL, h->cd[0][0], 0, "[deg/px] linear transformation matrix"},
        {"CD1_2", 'd', NULL, h->cd[0][1], 0, "[deg/px]"},
        {"CD2_1", 'd', NULL, h->cd[1][0], 0, "[deg/px]"},
        {"CD2_2", 'd', NULL, h->cd[1][1], 0, "[deg/px]"},
        {"RADESYS", 's', "ICRS", 0, 0, "celestial reference frame"},
        {"SIMFRAME", 's', h->frame, 0, 0, "simulated reference or science frame"},
        {"SIMSEED", 'u', NULL, 0, (unsigned long long)o->seed, "random seed of the simulation"},
        {"SIMPSF", 's', moffat ? "MOFFAT" : "GAUSSIAN", 0, 0, "PSF profile"},
        {moffat ? "SIMBETA" : NULL, 'd', NULL, o->moffat_beta, 0, "Moffat beta"},
        {"SIMFWHM", 'd', NULL, h->fwhm_px, 0, "[px] PSF FWHM at the field centre"},
        {"SIMVARY", 'd', NULL, o->psf_vary_frac, 0, "FWHM variation across the field (fraction)"},
        {"SIMELLIP", 'd', NULL, o->psf_ellip, 0, "PSF ellipticity 1-b/a"},
        {"SIMSKY", 'd', NULL, h->sky_adu, 0, "[ADU] sky level at the field centre"},
        {"SIMDEPTH", 'd', NULL, h->depth, 0, "exposures averaged into this frame"},
        {integral_depth ? "NCOMBINE" : NULL, 'i', NULL, 0,
         integral_depth ? (unsigned long long)h->depth : 0, "number of exposures averaged"},
        {"SIMRATIO", 'd', NULL, h->flux_ratio, 0, "science ADU per reference ADU of a star"},
        {"COMMENT", 'c', "Simulated image: truth tables in truth.csv, stars.csv, galaxies.csv;", 0,
         0, NULL},
        {"COMMENT", 'c', "model and keywords described in docs/simulate.md.", 0, 0, NULL},
    };
    hilal_status st = HILAL_OK;
    for (size_t k = 0; k < sizeof cards / sizeof cards[0] && st == HILAL_OK; k++) {
        const sim_card *c = &cards[k];
        if (c->key == NULL) /* a card this frame does not have */
            continue;
        if (c->type == 's')
            st = hilal_fits_writer_key_string(w, c->key, c->s, c->comment, err);
        else if (c->type == 'd')
            st = hilal_fits_writer_key_double(w, c->key, c->d, c->comment, err);
        else if (c->type == 'i')
            st = hilal_fits_writer_key_int(w, c->key, (long long)c->n, c->comment, err);
        else if (c->type == 'u')
            st = hilal_fits_writer_key_uint(w, c->key, c->n, c->comment, err);
        else
            st = hilal_fits_writer_comment(w, c->s, err);
    }
    return st;
}

hilal_status sim_header_cards(const sim_header *h, char **cards, int *ncards, hilal_error *err)
{
    *cards = NULL;
    *ncards = 0;
    hilal_fits_writer *w = NULL;
    hilal_status st = hilal_fits_header_open(h->bitpix, h->nx, h->ny, &w, err);
    if (st == HILAL_OK)
        st = put_keys(w, h, err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_header(w, cards, ncards, err);
    hilal_fits_writer_free(w);
    if (st != HILAL_OK)
        hilal_error_context(err, "building the header of the simulated %s frame", h->frame);
    return st;
}

hilal_status sim_write_fits(const char *path, const sim_header *h, const float *pix,
                            hilal_error *err)
{
    hilal_status st = HILAL_OK;
    /* The writer builds the file next to path and renames it over path
     * when complete. Fixed CHECKSUM/DATASUM comments keep the bytes a
     * function of the options alone. */
    hilal_fits_writer *w = hilal_fits_writer_open(path, err);
    if (w == NULL) {
        st = HILAL_ERR_IO; /* err says why */
        goto cleanup;
    }
    hilal_fits_writer_set_checksum(w, HILAL_FITS_CHECKSUM_FIXED);
    if (h->bitpix == 16)
        st = hilal_fits_writer_add_uint16(w, NULL, h->nx, h->ny, pix, err);
    else
        st = hilal_fits_writer_add_float(w, NULL, h->nx, h->ny, pix, err);
    if (st == HILAL_OK)
        st = put_keys(w, h, err);
    if (st == HILAL_OK) {
        st = hilal_fits_writer_close(w, err);
        w = NULL;
    }
cleanup:
    hilal_fits_writer_free(w);
    return st;
}

/* ======================================================================= */
/* Tables                                                                  */
/* ======================================================================= */

/* A double for CSV: "nan" for NaN (never "-nan"), else %.*g. */
static const char *num(char *buf, size_t len, double v, int digits)
{
    if (isnan(v))
        snprintf(buf, len, "nan");
    else
        snprintf(buf, len, "%.*g", digits, v);
    return buf;
}

/* mkdir -p */
static hilal_status make_dirs(const char *dir, hilal_error *err)
{
    char path[4096];
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path)
        return hilal_error_set(err, HILAL_ERR_IO, "output directory name is too long: %s", dir);
    for (char *p = path + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char saved = *p;
            *p = '\0';
            if (mkdir(path, 0777) != 0 && errno != EEXIST)
                return hilal_error_set(err, HILAL_ERR_IO, "cannot create directory %s: %s", path,
                                       strerror(errno));
            *p = saved;
            if (saved == '\0')
                break;
        }
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return hilal_error_set(err, HILAL_ERR_IO, "%s is not a directory", dir);
    return HILAL_OK;
}

static FILE *open_out(const char *dir, const char *name, char *path, size_t len, hilal_error *err)
{
    snprintf(path, len, "%s/%s", dir, name);
    FILE *fp = fopen(path, "w");
    if (fp == NULL)
        hilal_error_set(err, HILAL_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    return fp;
}

static hilal_status close_out(FILE *fp, const char *path, hilal_error *err)
{
    int bad = ferror(fp);
    if (fclose(fp) != 0 || bad)
        return hilal_error_set(err, HILAL_ERR_IO, "error writing %s: %s", path, strerror(errno));
    return HILAL_OK;
}

static hilal_status write_truth(const hilal_sim_truth *t, const char *dir, hilal_error *err)
{
    char path[4200], b[8][40];
    FILE *fp = open_out(dir, "truth.csv", path, sizeof path, err);
    if (fp == NULL)
        return HILAL_ERR_IO;
    fprintf(fp, "id,type,x,y,ra,dec,diff_flux_adu,ideal_snr,on_galaxy,ref_flux_adu,sci_flux_adu,"
                "fwhm_px,extent_px,level_adu,star_id\n");
    for (size_t i = 0; i < t->nevents; i++) {
        const hilal_sim_event *e = &t->events[i];
        fprintf(fp, "%ld,%s,%.4f,%.4f,%.8f,%.8f,%s,%s,%d,%s,%s,%s,%s,%s,%ld\n", e->id,
                hilal_sim_event_name(e->type), e->x, e->y, e->ra_deg, e->dec_deg,
                num(b[0], 40, e->diff_flux_adu, 10), num(b[1], 40, e->ideal_snr, 8), e->on_galaxy,
                num(b[2], 40, e->ref_flux_adu, 10), num(b[3], 40, e->sci_flux_adu, 10),
                num(b[4], 40, e->fwhm_px, 6), num(b[5], 40, e->extent_px, 6),
                num(b[6], 40, e->level_adu, 8), e->star_index + 1);
    }
    return close_out(fp, path, err);
}

static hilal_status write_stars(const hilal_sim_truth *t, const char *dir, hilal_error *err)
{
    char path[4200], b[6][40];
    FILE *fp = open_out(dir, "stars.csv", path, sizeof path, err);
    if (fp == NULL)
        return HILAL_ERR_IO;
    fprintf(fp, "id,ra,dec,x_ref,y_ref,x_sci,y_sci,mag,flux_ref_adu,flux_sci_adu,peak_ref_adu,"
                "peak_sci_adu,in_ref,in_sci,sat_ref,sat_sci,variable\n");
    for (size_t i = 0; i < t->nstars; i++) {
        const hilal_sim_star *s = &t->stars[i];
        fprintf(fp, "%zu,%.8f,%.8f,%.4f,%.4f,%.4f,%.4f,%.4f,%s,%s,%s,%s,%d,%d,%d,%d,%d\n", i + 1,
                s->ra_deg, s->dec_deg, s->x_ref, s->y_ref, s->x_sci, s->y_sci, s->mag,
                num(b[0], 40, s->flux_ref_adu, 10), num(b[1], 40, s->flux_sci_adu, 10),
                num(b[2], 40, s->peak_ref_adu, 8), num(b[3], 40, s->peak_sci_adu, 8), s->in_ref,
                s->in_sci, s->sat_ref, s->sat_sci, s->variable);
    }
    if (close_out(fp, path, err) != HILAL_OK)
        return HILAL_ERR_IO;

    fp = open_out(dir, "galaxies.csv", path, sizeof path, err);
    if (fp == NULL)
        return HILAL_ERR_IO;
    fprintf(fp, "id,ra,dec,x_ref,y_ref,x_sci,y_sci,flux_ref_adu,flux_sci_adu,sersic_n,reff_px,"
                "axis_ratio,pa_deg\n");
    for (size_t i = 0; i < t->ngalaxies; i++) {
        const hilal_sim_galaxy *g = &t->galaxies[i];
        fprintf(fp, "%zu,%.8f,%.8f,%.4f,%.4f,%.4f,%.4f,%s,%s,%.1f,%.4f,%.4f,%.3f\n", i + 1,
                g->ra_deg, g->dec_deg, g->x_ref, g->y_ref, g->x_sci, g->y_sci,
                num(b[0], 40, g->flux_ref_adu, 10), num(b[1], 40, g->flux_sci_adu, 10), g->sersic_n,
                g->reff_px, g->axis_ratio, g->pa_deg);
    }
    return close_out(fp, path, err);
}

static hilal_status write_readme(const hilal_sim_options *o, const hilal_sim_truth *t,
                                 const char *dir, hilal_error *err)
{
    char path[4200], cmd[4096];
    FILE *fp = open_out(dir, "README.txt", path, sizeof path, err);
    if (fp == NULL)
        return HILAL_ERR_IO;
    size_t count[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < t->nevents; i++)
        count[t->events[i].type]++;
    sim_options_cmdline(o, cmd, sizeof cmd);
    fprintf(fp,
            "Simulated reference/science pair made by `hilal simulate` (docs/simulate.md).\n"
            "\n"
            "Reproduce with:\n  %s --out DIR\n"
            "\n"
            "Content: %ld x %ld px, %zu stars, %zu galaxies; %zu transients, %zu variables,\n"
            "%zu cosmic rays, %zu bad columns. flux_ratio = %g (science ADU per reference ADU).\n"
            "\n"
            "Files\n"
            "  ref.fits      reference (mean of %g exposures: lower noise), TAN WCS\n"
            "  sci.fits      science frame with the events, TAN WCS\n"
            "  truth.csv     one row per injected event\n"
            "  stars.csv     every star of the field, with its position in both frames\n"
            "  galaxies.csv  every galaxy of the field\n"
            "\n"
            "Pixel positions are FITS 1-based (centre of the first pixel = 1,1); RA/Dec in\n"
            "degrees (ICRS). Fluxes are totals in ADU of the frame named.\n"
            "\n"
            "truth.csv columns\n"
            "  id             1-based event number\n"
            "  type           transient | variable | cosmic | bad_column\n"
            "  x, y           science pixel (bad_column: column, middle row of the segment)\n"
            "  ra, dec        sky position through the science WCS\n"
            "  diff_flux_adu  signed flux a perfect difference S - flux_ratio*R holds, science ADU\n"
            "                 (cosmic: deposited charge in ADU; bad_column: nan)\n"
            "  ideal_snr      F*sqrt(sum_i P_i^2/(var_S,i + flux_ratio^2 var_R,i)), signed like F\n"
            "  on_galaxy      1 if placed on a galaxy or within 2 effective radii of one\n"
            "  ref_flux_adu   variable: the star's reference flux; 0 otherwise\n"
            "  sci_flux_adu   variable: the star's science flux; transient: its flux; 0 otherwise\n"
            "  fwhm_px        science PSF FWHM at the position (0: not a PSF source)\n"
            "  extent_px      cosmic: track length; bad_column: rows affected (from row 1)\n"
            "  level_adu      bad_column: ADU added (hot) or, if negative, minus the sky lost (dead)\n"
            "  star_id        variable: id of the star in stars.csv; 0 otherwise\n"
            "\n"
            "stars.csv columns\n"
            "  id, ra, dec, x_ref, y_ref, x_sci, y_sci, mag (reference zero point),\n"
            "  flux_ref_adu, flux_sci_adu, peak_ref_adu, peak_sci_adu (brightest pixel of\n"
            "  the star alone), in_ref, in_sci (centre inside the frame), sat_ref, sat_sci\n"
            "  (sky + peak reaches SATURATE), variable (1: listed in truth.csv)\n"
            "\n"
            "galaxies.csv columns\n"
            "  id, ra, dec, x_ref, y_ref, x_sci, y_sci, flux_ref_adu, flux_sci_adu, sersic_n,\n"
            "  reff_px (half-light radius, major axis), axis_ratio (b/a), pa_deg (major axis\n"
            "  from reference +x, counter-clockwise)\n",
            cmd, t->nx, t->ny, t->nstars, t->ngalaxies, count[HILAL_SIM_TRANSIENT],
            count[HILAL_SIM_VARIABLE], count[HILAL_SIM_COSMIC], count[HILAL_SIM_BAD_COLUMN],
            t->flux_ratio, o->ref_depth);
    return close_out(fp, path, err);
}

hilal_status hilal_sim_write_outputs(const hilal_sim_options *o, const hilal_image *sci,
                                     const hilal_image *ref, const hilal_sim_truth *truth,
                                     const char *outdir, hilal_error *err)
{
    char path[4200];
    sim_header h[2];
    hilal_status st = make_dirs(outdir, err);
    if (st != HILAL_OK)
        goto cleanup;
    sim_make_headers(o, truth, &h[0], &h[1]);
    snprintf(path, sizeof path, "%s/ref.fits", outdir);
    st = sim_write_fits(path, &h[0], ref->pix, err);
    if (st != HILAL_OK)
        goto cleanup;
    snprintf(path, sizeof path, "%s/sci.fits", outdir);
    st = sim_write_fits(path, &h[1], sci->pix, err);
    if (st == HILAL_OK)
        st = write_truth(truth, outdir, err);
    if (st == HILAL_OK)
        st = write_stars(truth, outdir, err);
    if (st == HILAL_OK)
        st = write_readme(o, truth, outdir, err);
cleanup:
    if (st != HILAL_OK)
        hilal_error_context(err, "simulate");
    return st;
}
