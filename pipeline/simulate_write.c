/* Frame simulator: FITS headers and images (CFITSIO), truth tables (CSV). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <fitsio.h>

#include "simulate_internal.h"

/* ======================================================================= */
/* CFITSIO                                                                 */
/* ======================================================================= */

/* Records a CFITSIO failure: its status text and the first message on its
 * error stack (which names the keyword or file), then clears the stack. */
static hilal_status fits_fail(int status, const char *what, const char *path, hilal_error *err)
{
    char text[FLEN_STATUS] = "", msg[FLEN_ERRMSG] = "", first[FLEN_ERRMSG] = "";
    fits_get_errstatus(status, text);
    while (fits_read_errmsg(msg))
        if (first[0] == '\0')
            snprintf(first, sizeof first, "%s", msg);
    return hilal_error_set(err, HILAL_ERR_FITS, "%s %s: CFITSIO status %d (%s)%s%s", what, path,
                           status, text, first[0] ? ": " : "", first);
}

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

static void put_dbl(fitsfile *f, const char *key, double v, const char *comment, int *status)
{
    fits_write_key_dbl(f, key, v, -15, comment, status);
}

static void put_str(fitsfile *f, const char *key, const char *v, const char *comment, int *status)
{
    fits_write_key_str(f, key, v, comment, status);
}

/* Every keyword after the structural ones. The same function writes the
 * file and the in-memory header, so the two cannot disagree. */
static void put_keys(fitsfile *f, const sim_header *h, int *status)
{
    const hilal_sim_options *o = h->o;
    char date[64];
    mjd_to_iso(h->mjd, date, sizeof date);
    put_str(f, "OBJECT", o->object, "field name", status);
    put_str(f, "TELESCOP", "HILAL-SIM", "simulated by hilal simulate", status);
    put_str(f, "INSTRUME", "SIMCAM", "simulated detector", status);
    put_str(f, "FILTER", o->filter, "filter name", status);
    put_dbl(f, "EXPTIME", h->exptime_s, "[s] exposure time of one exposure",
            status);
    put_dbl(f, "MJD-OBS", h->mjd, "[d] MJD of the observation (UTC)", status);
    put_str(f, "DATE-OBS", date, "UTC date of the observation", status);
    put_dbl(f, "GAIN", h->gain_e_per_adu, "[e-/ADU] effective gain", status);
    put_dbl(f, "RDNOISE", h->rdnoise_e, "[e-] effective read noise", status);
    put_dbl(f, "SATURATE", h->saturate_adu, "[ADU] saturation level", status);
    put_dbl(f, "MAGZP", h->zeropoint_mag, "[mag] magnitude of a 1 ADU source", status);
    long wcsaxes = 2;
    fits_write_key_lng(f, "WCSAXES", wcsaxes, "number of WCS axes", status);
    put_str(f, "CTYPE1", "RA---TAN", "gnomonic projection", status);
    put_str(f, "CTYPE2", "DEC--TAN", "gnomonic projection", status);
    put_str(f, "CUNIT1", "deg", "unit of CRVAL1 and CD1_j", status);
    put_str(f, "CUNIT2", "deg", "unit of CRVAL2 and CD2_j", status);
    put_dbl(f, "CRVAL1", h->crval[0], "[deg] RA of the reference point", status);
    put_dbl(f, "CRVAL2", h->crval[1], "[deg] Dec of the reference point", status);
    put_dbl(f, "CRPIX1", h->crpix[0], "[px] x of the reference point", status);
    put_dbl(f, "CRPIX2", h->crpix[1], "[px] y of the reference point", status);
    put_dbl(f, "CD1_1", h->cd[0][0], "[deg/px] linear transformation matrix", status);
    put_dbl(f, "CD1_2", h->cd[0][1], "[deg/px]", status);
    put_dbl(f, "CD2_1", h->cd[1][0], "[deg/px]", status);
    put_dbl(f, "CD2_2", h->cd[1][1], "[deg/px]", status);
    put_str(f, "RADESYS", "ICRS", "celestial reference frame", status);
    put_str(f, "SIMFRAME", h->frame, "simulated reference or science frame", status);
    unsigned long long seed = (unsigned long long)o->seed;
    fits_write_key(f, TULONGLONG, "SIMSEED", &seed, "random seed of the simulation", status);
    put_str(f, "SIMPSF", o->psf_model == HILAL_SIM_PSF_GAUSSIAN ? "GAUSSIAN" : "MOFFAT",
            "PSF profile", status);
    if (o->psf_model == HILAL_SIM_PSF_MOFFAT)
        put_dbl(f, "SIMBETA", o->moffat_beta, "Moffat beta", status);
    put_dbl(f, "SIMFWHM", h->fwhm_px, "[px] PSF FWHM at the field centre", status);
    put_dbl(f, "SIMVARY", o->psf_vary_frac, "FWHM variation across the field (fraction)", status);
    put_dbl(f, "SIMELLIP", o->psf_ellip, "PSF ellipticity 1-b/a", status);
    put_dbl(f, "SIMSKY", h->sky_adu, "[ADU] sky level at the field centre", status);
    put_dbl(f, "SIMDEPTH", h->depth, "exposures averaged into this frame", status);
    if (h->depth >= 1.0 && h->depth == floor(h->depth) && h->depth < 1e6)
        fits_write_key_lng(f, "NCOMBINE", (long)h->depth, "number of exposures averaged", status);
    put_dbl(f, "SIMRATIO", h->flux_ratio, "science ADU per reference ADU of a star", status);
    fits_write_comment(f, "Simulated image: truth tables in truth.csv, stars.csv, galaxies.csv;",
                       status);
    fits_write_comment(f, "model and keywords described in docs/simulate.md.", status);
}

static void create_image(fitsfile *f, const sim_header *h, int *status)
{
    long naxes[2] = {h->nx, h->ny};
    fits_create_img(f, h->bitpix == 16 ? USHORT_IMG : FLOAT_IMG, 2, naxes, status);
    put_keys(f, h, status);
}

hilal_status sim_header_cards(const sim_header *h, char **cards, int *ncards, hilal_error *err)
{
    *cards = NULL;
    *ncards = 0;
    fitsfile *f = NULL;
    int status = 0, nkeys = 0;
    char *str = NULL;
    hilal_status st = HILAL_OK;
    /* A one-pixel in-memory image with the same keywords, so that no data
     * unit of the full size is ever allocated; NAXISn are then set to the
     * real size (fits_update_key, on the same HDU). */
    long one[2] = {1, 1};
    fits_create_file(&f, "mem://", &status);
    fits_create_img(f, h->bitpix == 16 ? USHORT_IMG : FLOAT_IMG, 2, one, &status);
    fits_update_key_lng(f, "NAXIS1", h->nx, NULL, &status);
    fits_update_key_lng(f, "NAXIS2", h->ny, NULL, &status);
    put_keys(f, h, &status);
    fits_hdr2str(f, 0, NULL, 0, &str, &nkeys, &status);
    if (status != 0) {
        st = fits_fail(status, "building the header of the simulated", h->frame, err);
        goto cleanup;
    }
    size_t len = strlen(str);
    *cards = malloc(len + 1);
    if (*cards == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a header");
        goto cleanup;
    }
    memcpy(*cards, str, len + 1);
    *ncards = nkeys;
cleanup:
    if (str != NULL) {
        int s2 = 0;
        fits_free_memory(str, &s2);
    }
    if (f != NULL) {
        int s2 = 0;
        /* Restore the 1 x 1 size before closing so that closing only pads
         * one pixel. */
        fits_update_key_lng(f, "NAXIS1", 1, NULL, &s2);
        fits_update_key_lng(f, "NAXIS2", 1, NULL, &s2);
        s2 = 0;
        fits_close_file(f, &s2);
        fits_clear_errmsg();
    }
    return st;
}

hilal_status sim_write_fits(const char *path, const sim_header *h, const float *pix,
                            hilal_error *err)
{
    fitsfile *f = NULL;
    int status = 0;
    /* Replace an existing file; fits_create_diskfile takes the name
     * literally (no CFITSIO extended syntax), so any path works. */
    if (unlink(path) != 0 && errno != ENOENT)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot replace %s: %s", path, strerror(errno));
    fits_create_diskfile(&f, path, &status);
    create_image(f, h, &status);
    fits_write_img(f, TFLOAT, 1, (LONGLONG)h->nx * h->ny, (void *)pix, &status);
    int cstatus = 0;
    if (f != NULL)
        fits_close_file(f, status == 0 ? &status : &cstatus);
    if (status != 0)
        return fits_fail(status, "writing", path, err);
    return HILAL_OK;
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
