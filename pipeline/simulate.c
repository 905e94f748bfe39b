/* Frame simulator: options, the sky model and the injection bookkeeping.
 * Rendering and noise are in simulate_render.c, files in simulate_write.c;
 * docs/simulate.md describes the model. */
#include "hilal/simulate.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/log.h"
#include "hilal/wcs.h"
#include "simulate_internal.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

#define DEG2RAD (M_PI / 180.0)

/* PSF position angles of the two frames when psf_ellip > 0 (fixed, so that
 * the ratio of the two PSFs is never circular). */
#define PSF_PA_REF_DEG 20.0
#define PSF_PA_SCI_DEG 65.0

/* Stars and galaxies are drawn over the union of both frames plus this
 * margin, so that sources just outside a frame still spill light into it. */
#define FIELD_MARGIN_PX 30.0

hilal_sim_options hilal_sim_options_default(void)
{
    hilal_sim_options o;
    memset(&o, 0, sizeof o);
    o.nx = o.ny = 1024;
    o.seed = 1;
    o.pixscale_arcsec = 1.0;
    o.ra_deg = 150.0;
    o.dec_deg = 2.2;
    o.offset_x_px = o.offset_y_px = 0.0;
    o.rotate_deg = 0.0;
    o.psf_model = HILAL_SIM_PSF_MOFFAT;
    o.moffat_beta = 3.0;
    o.fwhm_ref_px = 2.5;
    o.fwhm_sci_px = 3.2;
    o.psf_vary_frac = 0.0;
    o.psf_ellip = 0.0;
    o.sky_sci_adu = 800.0;
    o.sky_ref_adu = 1000.0;
    o.sky_gradient_frac = 0.05;
    o.gain_e_per_adu = 1.5;
    o.rdnoise_e = 5.0;
    o.saturate_adu = 60000.0;
    o.bleed = 1;
    o.exptime_s = 60.0;
    o.ref_depth = 4.0;
    o.flux_ratio = 0.8;
    o.zeropoint_mag = 27.0;
    o.star_density = 2000.0;
    o.mag_bright = 12.0;
    o.mag_faint = 23.0;
    o.count_slope = 0.3;
    o.galaxy_density = 20.0;
    o.n_transients = -1;
    o.snr_min = 3.0;
    o.snr_max = 100.0;
    o.galaxy_frac = 0.2;
    o.n_variables = -1;
    o.n_cosmics = -1;
    o.n_bad_columns = 2;
    o.no_events = 0;
    o.mjd_ref = 59900.0;
    o.mjd_sci = 60300.25;
    snprintf(o.filter, sizeof o.filter, "r");
    snprintf(o.object, sizeof o.object, "HILAL-SIM");
    o.bitpix = -32;
    o.keep_model = 0;
    o.nthreads = 0;
    return o;
}

/* One range rule: the value, its inclusive bounds and the CLI flag named in
 * the message. */
typedef struct range_rule {
    double v, lo, hi;
    const char *flag;
} range_rule;

hilal_status hilal_sim_options_check(const hilal_sim_options *o, hilal_error *err)
{
    if (o->psf_model != HILAL_SIM_PSF_MOFFAT && o->psf_model != HILAL_SIM_PSF_GAUSSIAN)
        return hilal_error_set(err, HILAL_ERR_RANGE, "--psf must be moffat or gaussian");
    if (o->bitpix != -32 && o->bitpix != 16)
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "--bitpix = %d; use -32 (float) or 16 (unsigned 16-bit)", o->bitpix);
    if (o->bitpix == 16 && o->saturate_adu > 65535.0)
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "--saturate = %g does not fit --bitpix 16 (at most 65535)",
                               o->saturate_adu);
    const range_rule rules[] = {
        {(double)o->nx, 32, 16384, "--size (x)"},
        {(double)o->ny, 32, 16384, "--size (y)"},
        {(double)o->pixscale_arcsec, 1e-3, 3600.0, "--pixscale"},
        {(double)o->ra_deg, 0.0, 360.0, "--center (RA)"},
        {(double)o->dec_deg, -89.0, 89.0, "--center (Dec)"},
        {(double)o->offset_x_px, -1e5, 1e5, "--offset-px (DX)"},
        {(double)o->offset_y_px, -1e5, 1e5, "--offset-px (DY)"},
        {(double)o->rotate_deg, -360.0, 360.0, "--rotate-deg"},
        {(double)o->moffat_beta, 1.1, 50.0, "--beta"},
        {(double)o->fwhm_ref_px, 0.8, 30.0, "--fwhm-ref"},
        {(double)o->fwhm_sci_px, 0.8, 30.0, "--fwhm-sci"},
        {(double)o->psf_vary_frac, 0.0, 0.9, "--psf-vary"},
        {(double)o->psf_ellip, 0.0, 0.5, "--psf-ellip"},
        {(double)o->saturate_adu, 1.0, 1e9, "--saturate"},
        {(double)o->sky_sci_adu, 0.0, 0.5 * o->saturate_adu, "--sky-sci (at most half of --saturate)"},
        {(double)o->sky_ref_adu, 0.0, 0.5 * o->saturate_adu, "--sky-ref (at most half of --saturate)"},
        {(double)o->sky_gradient_frac, 0.0, 1.0, "--sky-gradient"},
        {(double)o->gain_e_per_adu, 1e-3, 1e3, "--gain"},
        {(double)o->rdnoise_e, 0.0, 1e4, "--rdnoise"},
        {(double)o->exptime_s, 1e-6, 1e7, "--exptime"},
        {(double)o->ref_depth, 0.01, 1e4, "--ref-depth"},
        {(double)o->flux_ratio, 1e-3, 1e3, "--flux-ratio"},
        {(double)o->zeropoint_mag, -50.0, 100.0, "--zeropoint"},
        {(double)o->star_density, 0.0, 1e5, "--star-density"},
        {(double)o->mag_bright, -50.0, 100.0, "--mag-range (bright)"},
        {(double)o->mag_faint, o->mag_bright + 0.01, 100.0, "--mag-range (faint, > bright)"},
        {(double)o->count_slope, 0.0, 1.0, "--count-slope"},
        {(double)o->galaxy_density, 0.0, 1e4, "--galaxy-density"},
        {(double)o->n_transients, -1, 1e6, "--n-transients"},
        {(double)o->snr_min, 0.1, 1e5, "--snr-range (min)"},
        {(double)o->snr_max, o->snr_min, 1e5, "--snr-range (max, >= min)"},
        {(double)o->galaxy_frac, 0.0, 1.0, "--galaxy-frac"},
        {(double)o->n_variables, -1, 1e6, "--n-variables"},
        {(double)o->n_cosmics, -1, 1e7, "--n-cosmics"},
        {(double)o->n_bad_columns, 0, (double)o->nx / 4, "--bad-columns (at most a quarter of the columns)"},
        {(double)o->mjd_ref, -1e6, 1e6, "--mjd-ref"},
        {(double)o->mjd_sci, -1e6, 1e6, "--mjd-sci"},
        {(double)o->nthreads, 0, 16, "--threads"},
    };
    for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++) {
        const range_rule *r = &rules[i];
        if (!(isfinite(r->v) && r->v >= r->lo && r->v <= r->hi))
            return hilal_error_set(err, HILAL_ERR_RANGE, "%s = %g is outside [%g, %g]", r->flag,
                                   r->v, r->lo, r->hi);
    }
    return HILAL_OK;
}

long hilal_sim_event_count(const hilal_sim_options *o, int which)
{
    if (o->no_events)
        return 0;
    double area = (double)o->nx * (double)o->ny / (1024.0 * 1024.0);
    /* Minimum automatic counts only where a frame has room for them. */
    int roomy = o->nx >= 128 && o->ny >= 128;
    switch (which) {
    case 0:
        if (o->n_transients >= 0)
            return o->n_transients;
        return lround(fmax(roomy ? 3.0 : 0.0, 50.0 * area));
    case 1:
        if (o->n_variables >= 0)
            return o->n_variables;
        return lround(fmax(roomy ? 1.0 : 0.0, 10.0 * area));
    case 2:
        if (o->n_cosmics >= 0)
            return o->n_cosmics;
        return lround(150.0 * area);
    case 3:
        return o->n_bad_columns;
    default:
        return 0;
    }
}

const char *hilal_sim_event_name(hilal_sim_event_type type)
{
    switch (type) {
    case HILAL_SIM_TRANSIENT: return "transient";
    case HILAL_SIM_VARIABLE: return "variable";
    case HILAL_SIM_COSMIC: return "cosmic";
    case HILAL_SIM_BAD_COLUMN: return "bad_column";
    }
    return "?";
}

void hilal_sim_truth_free(hilal_sim_truth *t)
{
    if (t == NULL)
        return;
    free(t->events);
    free(t->stars);
    free(t->galaxies);
    free(t->model_ref);
    free(t->model_sci);
    free(t);
}

/* Sky of a frame at C position (x, y): s0 (1 + g t) with t the projection of
 * the normalised field coordinates (in [-1, 1]) on the gradient direction,
 * halved, so that the sky changes by the fraction g from one side of the
 * field to the other along that direction. */
static double sky_at(const hilal_sim_frame_info *f, long nx, long ny, double x, double y)
{
    double ux = (x - 0.5 * (double)(nx - 1)) / (0.5 * (double)nx);
    double uy = (y - 0.5 * (double)(ny - 1)) / (0.5 * (double)ny);
    double t = 0.5 * (cos(f->sky_angle_rad) * ux + sin(f->sky_angle_rad) * uy);
    return f->sky_adu * (1.0 + f->sky_gradient_frac * t);
}

double hilal_sim_sky_adu(const hilal_sim_truth *t, int which, double x, double y)
{
    return sky_at(which ? &t->sci : &t->ref, t->nx, t->ny, x - 1.0, y - 1.0);
}

/* PSF description of a frame. */
static void frame_psf(const hilal_sim_options *o, int which, double thresh_adu, sim_psf *p)
{
    memset(p, 0, sizeof *p);
    p->model = o->psf_model;
    p->beta = o->moffat_beta;
    p->fwhm0_px = which ? o->fwhm_sci_px : o->fwhm_ref_px;
    p->vary_frac = o->psf_vary_frac;
    p->vary_axis = which ? 1 : 0;
    p->ellip = o->psf_ellip;
    p->pa_rad = (which ? PSF_PA_SCI_DEG : PSF_PA_REF_DEG) * DEG2RAD;
    p->nx = o->nx;
    p->ny = o->ny;
    p->thresh_adu = thresh_adu;
}

double hilal_sim_fwhm_px(const hilal_sim_options *o, int which, double x, double y)
{
    sim_psf p;
    frame_psf(o, which, 1.0, &p);
    return sim_psf_fwhm(&p, x - 1.0, y - 1.0);
}

/* ======================================================================= */
/* Headers                                                                 */
/* ======================================================================= */

void sim_make_headers(const hilal_sim_options *o, const hilal_sim_truth *t, sim_header *ref,
                      sim_header *sci)
{
    /* Both frames are TAN projections about the same tangent point (CRVAL).
     * Reference: CRPIX at the image centre, CD = diag(-s, s) (north up, east
     * left). Science: CRPIX shifted by the offset and CD_sci = CD_ref R(-theta),
     * so that p_sci - CRPIX_sci = R(theta) (p_ref - CRPIX_ref) for every star:
     * the science pixel grid is the reference grid rotated counter-clockwise
     * by theta and shifted by (DX, DY). */
    double s = o->pixscale_arcsec / 3600.0, th = o->rotate_deg * DEG2RAD;
    double c = cos(th), sn = sin(th);
    sim_header *h[2] = {ref, sci};
    for (int k = 0; k < 2; k++) {
        const hilal_sim_frame_info *f = k ? &t->sci : &t->ref;
        memset(h[k], 0, sizeof *h[k]);
        h[k]->frame = k ? "science" : "reference";
        h[k]->nx = o->nx;
        h[k]->ny = o->ny;
        h[k]->bitpix = o->bitpix;
        h[k]->crval[0] = o->ra_deg;
        h[k]->crval[1] = o->dec_deg;
        h[k]->crpix[0] = 0.5 * (double)(o->nx + 1) + (k ? o->offset_x_px : 0.0);
        h[k]->crpix[1] = 0.5 * (double)(o->ny + 1) + (k ? o->offset_y_px : 0.0);
        if (k == 0) {
            h[k]->cd[0][0] = -s;
            h[k]->cd[0][1] = 0.0;
            h[k]->cd[1][0] = 0.0;
            h[k]->cd[1][1] = s;
        } else {
            h[k]->cd[0][0] = -s * c;
            h[k]->cd[0][1] = -s * sn;
            h[k]->cd[1][0] = -s * sn;
            h[k]->cd[1][1] = s * c;
        }
        h[k]->gain_e_per_adu = f->gain_e_per_adu;
        h[k]->rdnoise_e = f->rdnoise_e;
        h[k]->saturate_adu = o->saturate_adu;
        h[k]->exptime_s = f->exptime_s;
        h[k]->mjd = k ? o->mjd_sci : o->mjd_ref;
        h[k]->zeropoint_mag = f->zeropoint_mag;
        h[k]->sky_adu = f->sky_adu;
        h[k]->fwhm_px = f->fwhm_px;
        h[k]->depth = k ? 1.0 : o->ref_depth;
        h[k]->flux_ratio = o->flux_ratio;
        h[k]->o = o;
    }
}

/* ======================================================================= */
/* The simulation                                                          */
/* ======================================================================= */

typedef struct sim_ctx {
    const hilal_sim_options *o;
    long nx, ny;
    int nthreads;
    sim_psf psf[2];              /* 0 reference, 1 science */
    struct wcsprm *wcs[2];
    float *model[2];             /* noise-free models, then the pixels (owned by the images) */
    double gain[2], rdnoise_adu2[2];
    double cth, sth;             /* rotation of the science grid */
    double crpix_c[2][2];        /* CRPIX in C coordinates, per frame */
    hilal_sim_truth *t;
    sim_stamp st, tmp;
    /* cosmic-ray deposits, added after the noise: pixel index and ADU */
    size_t ndep, capdep;
    size_t *dep_pix;
    float *dep_adu;
} sim_ctx;

/* Reference C position of a science C position (exact for two TAN
 * projections about the same tangent point, see sim_make_headers). */
static void ref_from_sci(const sim_ctx *c, double xs, double ys, double *xr, double *yr)
{
    double dx = xs - c->crpix_c[1][0], dy = ys - c->crpix_c[1][1];
    *xr = c->cth * dx + c->sth * dy + c->crpix_c[0][0];
    *yr = -c->sth * dx + c->cth * dy + c->crpix_c[0][1];
}

static int inside(const sim_ctx *c, double x, double y, double margin)
{
    return x >= margin - 0.5 && x <= (double)c->nx - 0.5 - margin && y >= margin - 0.5 &&
           y <= (double)c->ny - 0.5 - margin;
}

static void fill_sky(const sim_ctx *c, int which)
{
    /* sky_at() unrolled: s0 (1 + g (cos a ux + sin a uy) / 2). */
    const hilal_sim_frame_info *f = which ? &c->t->sci : &c->t->ref;
    float *m = c->model[which];
    double ca = 0.5 * f->sky_gradient_frac * cos(f->sky_angle_rad);
    double sa = 0.5 * f->sky_gradient_frac * sin(f->sky_angle_rad);
    double hx = 0.5 * (double)(c->nx - 1), hy = 0.5 * (double)(c->ny - 1);
    for (long y = 0; y < c->ny; y++) {
        double base = 1.0 + sa * ((double)y - hy) / (0.5 * (double)c->ny);
        for (long x = 0; x < c->nx; x++)
            m[y * c->nx + x] =
                (float)(f->sky_adu * (base + ca * ((double)x - hx) / (0.5 * (double)c->nx)));
    }
}

/* Ideal PSF-fit weight W = sum_i P_i^2 / (var_S,i + r^2 var_R,i) over the
 * stamp P (science pixels), so that S/N = F sqrt(W). The science variance is
 * the noise-free science model (plus the source itself when self_flux != 0)
 * over the gain plus the read-noise variance; the reference variance is taken
 * at the reference pixel nearest to each science pixel. Pixels outside either
 * frame carry no information. */
static double snr_weight(const sim_ctx *c, const sim_stamp *P, double self_flux)
{
    double r2 = c->o->flux_ratio * c->o->flux_ratio, w = 0.0;
    for (int j = 0; j < P->w; j++) {
        long y = P->y0 + j;
        if (y < 0 || y >= c->ny)
            continue;
        for (int i = 0; i < P->w; i++) {
            long x = P->x0 + i;
            double p = P->v[j * P->w + i];
            if (p == 0.0 || x < 0 || x >= c->nx)
                continue;
            double xr, yr;
            ref_from_sci(c, (double)x, (double)y, &xr, &yr);
            long ixr = lround(xr), iyr = lround(yr);
            if (ixr < 0 || ixr >= c->nx || iyr < 0 || iyr >= c->ny)
                continue;
            double ms = fmax((double)c->model[1][y * c->nx + x] + self_flux * p, 0.0);
            double mr = fmax((double)c->model[0][iyr * c->nx + ixr], 0.0);
            double v = ms / c->gain[1] + c->rdnoise_adu2[1] + r2 * (mr / c->gain[0] + c->rdnoise_adu2[0]);
            if (v < 1e-12)
                v = 1e-12;
            w += p * p / v;
        }
    }
    return w;
}

/* Flux (signed like snr) whose ideal S/N is snr for profile P, the source's
 * own photon noise included: fixed-point iteration F <- snr / sqrt(W(F)),
 * a contraction because W changes slowly with F. */
static double flux_for_snr(const sim_ctx *c, const sim_stamp *P, double snr)
{
    double f = snr / sqrt(fmax(snr_weight(c, P, 0.0), 1e-300));
    for (int it = 0; it < 60; it++) {
        double fn = snr / sqrt(fmax(snr_weight(c, P, f), 1e-300));
        if (fabs(fn - f) <= 1e-9 * fabs(f)) {
            f = fn;
            break;
        }
        f = fn;
    }
    return f;
}

static double log_uniform(sim_rng *r, double lo, double hi)
{
    double u = sim_rng_uniform(r);
    return exp(log(lo) + u * (log(hi) - log(lo)));
}

static hilal_status make_stars(sim_ctx *c, hilal_error *err)
{
    const hilal_sim_options *o = c->o;
    hilal_sim_truth *t = c->t;
    hilal_status st = HILAL_OK;
    double *xf = NULL, *yf = NULL, *ra = NULL, *dec = NULL, *xs = NULL, *ys = NULL;

    /* Field: the reference frame plus the science frame's corners mapped
     * back to the reference grid, plus a margin. */
    double xmin = -0.5, xmax = (double)c->nx - 0.5, ymin = -0.5, ymax = (double)c->ny - 0.5;
    double cx[4] = {-0.5, (double)c->nx - 0.5, -0.5, (double)c->nx - 0.5};
    double cy[4] = {-0.5, -0.5, (double)c->ny - 0.5, (double)c->ny - 0.5};
    for (int k = 0; k < 4; k++) {
        double xr, yr;
        ref_from_sci(c, cx[k], cy[k], &xr, &yr);
        xmin = fmin(xmin, xr);
        xmax = fmax(xmax, xr);
        ymin = fmin(ymin, yr);
        ymax = fmax(ymax, yr);
    }
    xmin -= FIELD_MARGIN_PX;
    ymin -= FIELD_MARGIN_PX;
    xmax += FIELD_MARGIN_PX;
    ymax += FIELD_MARGIN_PX;
    double area = (xmax - xmin) * (ymax - ymin);

    size_t ns = (size_t)llround(o->star_density * area / 1e6);
    size_t ng = (size_t)llround(o->galaxy_density * area / 1e6);
    size_t nall = ns + ng;
    if (nall > 0x7fffffff) {
        st = hilal_error_set(err, HILAL_ERR_RANGE, "%zu stars is too many; lower "
                                                   "--star-density", nall);
        goto cleanup;
    }
    t->stars = calloc(ns ? ns : 1, sizeof *t->stars);
    t->galaxies = calloc(ng ? ng : 1, sizeof *t->galaxies);
    xf = malloc((nall + 1) * sizeof *xf);
    yf = malloc((nall + 1) * sizeof *yf);
    ra = malloc((nall + 1) * sizeof *ra);
    dec = malloc((nall + 1) * sizeof *dec);
    xs = malloc((nall + 1) * sizeof *xs);
    ys = malloc((nall + 1) * sizeof *ys);
    if (!t->stars || !t->galaxies || !xf || !yf || !ra || !dec || !xs || !ys) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu simulated stars", nall);
        goto cleanup;
    }
    t->nstars = ns;
    t->ngalaxies = ng;

    /* Stars: uniform positions; magnitudes from dN/dm ~ 10^(k m) on
     * [m_b, m_f] by inverting the cumulative distribution:
     * 10^(k (m - m_f)) = a + u (1 - a), a = 10^(k (m_b - m_f)). */
    sim_rng rs;
    sim_rng_seed(&rs, o->seed, SIM_STREAM_STARS);
    double k = o->count_slope, a = pow(10.0, k * (o->mag_bright - o->mag_faint));
    for (size_t i = 0; i < ns; i++) {
        hilal_sim_star *s = &t->stars[i];
        double x = xmin + sim_rng_uniform(&rs) * (xmax - xmin);
        double y = ymin + sim_rng_uniform(&rs) * (ymax - ymin);
        double u = sim_rng_uniform(&rs);
        s->mag = k > 0.0 ? o->mag_faint + log10(a + u * (1.0 - a)) / k
                         : o->mag_bright + u * (o->mag_faint - o->mag_bright);
        s->flux_ref_adu = pow(10.0, -0.4 * (s->mag - o->zeropoint_mag));
        s->flux_sci_adu = o->flux_ratio * s->flux_ref_adu;
        xf[i] = x + 1.0;
        yf[i] = y + 1.0;
    }
    /* Galaxies: 70% exponential discs (n = 1), 30% de Vaucouleurs (n = 4);
     * R_e log-uniform in 1-4 arcsec, axis ratio 0.35-1, magnitudes 14-18. */
    sim_rng rg;
    sim_rng_seed(&rg, o->seed, SIM_STREAM_GALAXIES);
    for (size_t i = 0; i < ng; i++) {
        hilal_sim_galaxy *g = &t->galaxies[i];
        double x = xmin + sim_rng_uniform(&rg) * (xmax - xmin);
        double y = ymin + sim_rng_uniform(&rg) * (ymax - ymin);
        double mag = 14.0 + 4.0 * sim_rng_uniform(&rg);
        g->sersic_n = sim_rng_uniform(&rg) < 0.7 ? 1.0 : 4.0;
        g->reff_px = log_uniform(&rg, 1.0, 4.0) / o->pixscale_arcsec;
        if (g->reff_px < 0.5)
            g->reff_px = 0.5;
        g->axis_ratio = 0.35 + 0.65 * sim_rng_uniform(&rg);
        g->pa_deg = 180.0 * sim_rng_uniform(&rg);
        g->flux_ref_adu = pow(10.0, -0.4 * (mag - o->zeropoint_mag));
        g->flux_sci_adu = o->flux_ratio * g->flux_ref_adu;
        xf[ns + i] = x + 1.0;
        yf[ns + i] = y + 1.0;
    }
    /* On the sky through the reference WCS, then into the science frame
     * through its own WCS. */
    st = hilal_wcs_pix2sky(c->wcs[0], (int)nall, xf, yf, ra, dec, err);
    if (st == HILAL_OK)
        st = hilal_wcs_sky2pix(c->wcs[1], (int)nall, ra, dec, xs, ys, err);
    if (st != HILAL_OK) {
        hilal_error_context(err, "projecting the star field");
        goto cleanup;
    }
    for (size_t i = 0; i < ns; i++) {
        hilal_sim_star *s = &t->stars[i];
        s->ra_deg = ra[i];
        s->dec_deg = dec[i];
        s->x_ref = xf[i];
        s->y_ref = yf[i];
        s->x_sci = xs[i];
        s->y_sci = ys[i];
        s->in_ref = inside(c, s->x_ref - 1.0, s->y_ref - 1.0, 0.0);
        s->in_sci = inside(c, s->x_sci - 1.0, s->y_sci - 1.0, 0.0);
    }
    for (size_t i = 0; i < ng; i++) {
        hilal_sim_galaxy *g = &t->galaxies[i];
        g->ra_deg = ra[ns + i];
        g->dec_deg = dec[ns + i];
        g->x_ref = xf[ns + i];
        g->y_ref = yf[ns + i];
        g->x_sci = xs[ns + i];
        g->y_sci = ys[ns + i];
    }
cleanup:
    free(xf);
    free(yf);
    free(ra);
    free(dec);
    free(xs);
    free(ys);
    return st;
}

/* Stars of one frame rendered by several threads, each owning a band of
 * rows: a thread renders every star whose stamp reaches its band and adds
 * only the band's rows. Every pixel receives the stars in catalogue order
 * whatever the number of threads, so the result does not depend on it. */
typedef struct star_job {
    sim_ctx *c;
    int which;
    long ylo, yhi;
    sim_stamp st;
    hilal_status status;
    hilal_error err;
} star_job;

static void *render_stars_band(void *arg)
{
    star_job *job = arg;
    sim_ctx *c = job->c;
    const sim_psf *p = &c->psf[job->which];
    for (size_t i = 0; i < c->t->nstars; i++) {
        hilal_sim_star *s = &c->t->stars[i];
        double x = (job->which ? s->x_sci : s->x_ref) - 1.0;
        double y = (job->which ? s->y_sci : s->y_ref) - 1.0;
        double flux = job->which ? s->flux_sci_adu : s->flux_ref_adu;
        double fwhm = sim_psf_fwhm(p, x, y);
        int half = sim_psf_half(p, fwhm, flux);
        long iy = lround(y);
        if (x < -half || x > (double)c->nx - 1 + half || iy + half < job->ylo ||
            iy - half >= job->yhi)
            continue;
        job->status = sim_psf_stamp(p, x, y, half, 1, &job->st, &job->err);
        if (job->status != HILAL_OK)
            return NULL;
        sim_stamp_add(&job->st, flux, c->model[job->which], c->nx, c->ny, job->ylo, job->yhi);
        /* The star's peak, recorded by the band holding its centre row. */
        long cy = iy < 0 ? 0 : iy >= c->ny ? c->ny - 1 : iy;
        if (cy >= job->ylo && cy < job->yhi) {
            double vmax = 0.0;
            for (int k = 0; k < job->st.w * job->st.w; k++)
                vmax = fmax(vmax, job->st.v[k]);
            *(job->which ? &s->peak_sci_adu : &s->peak_ref_adu) = vmax * flux;
        }
    }
    return NULL;
}

static hilal_status render_stars(sim_ctx *c, int which, hilal_error *err)
{
    enum { MAXT = 16 };
    star_job jobs[MAXT];
    pthread_t tid[MAXT];
    int started[MAXT] = {0};
    int n = c->nthreads < 1 ? 1 : c->nthreads > MAXT ? MAXT : c->nthreads;
    if (n > c->ny / 16)
        n = c->ny / 16 > 0 ? (int)(c->ny / 16) : 1;
    for (int k = 0; k < n; k++) {
        memset(&jobs[k], 0, sizeof jobs[k]);
        jobs[k].c = c;
        jobs[k].which = which;
        jobs[k].ylo = c->ny * k / n;
        jobs[k].yhi = c->ny * (k + 1) / n;
    }
    for (int k = 1; k < n; k++)
        started[k] = pthread_create(&tid[k], NULL, render_stars_band, &jobs[k]) == 0;
    render_stars_band(&jobs[0]);
    hilal_status st = HILAL_OK;
    for (int k = 0; k < n; k++) {
        if (k > 0 && started[k])
            pthread_join(tid[k], NULL);
        else if (k > 0)
            render_stars_band(&jobs[k]);
        if (jobs[k].status != HILAL_OK && st == HILAL_OK)
            st = hilal_error_set(err, jobs[k].status, "%s", jobs[k].err.msg);
        sim_stamp_clear(&jobs[k].st);
    }
    return st;
}

/* Sky, stars and galaxies of one frame (science stars at flux_sci_adu). */
static hilal_status render_field(sim_ctx *c, int which, hilal_error *err)
{
    hilal_sim_truth *t = c->t;
    fill_sky(c, which);
    hilal_status st = render_stars(c, which, err);
    double rot = which ? c->o->rotate_deg : 0.0;
    for (size_t i = 0; i < t->ngalaxies && st == HILAL_OK; i++) {
        const hilal_sim_galaxy *g = &t->galaxies[i];
        double x = (which ? g->x_sci : g->x_ref) - 1.0, y = (which ? g->y_sci : g->y_ref) - 1.0;
        if (x < -60 || y < -60 || x > (double)c->nx + 60 || y > (double)c->ny + 60)
            continue;
        sim_gal_shape shape = {g->sersic_n, g->reff_px, g->axis_ratio, (g->pa_deg + rot) * DEG2RAD};
        st = sim_galaxy_stamp(&c->psf[which], &shape, x, y, &c->st, &c->tmp, err);
        if (st == HILAL_OK)
            sim_stamp_add(&c->st, which ? g->flux_sci_adu : g->flux_ref_adu, c->model[which], c->nx,
                          c->ny, 0, c->ny);
    }
    return st;
}

/* Within two effective radii of a galaxy (elliptical distance, science axes). */
static int near_galaxy(const sim_ctx *c, double x, double y)
{
    for (size_t i = 0; i < c->t->ngalaxies; i++) {
        const hilal_sim_galaxy *g = &c->t->galaxies[i];
        double dx = x - (g->x_sci - 1.0), dy = y - (g->y_sci - 1.0);
        double pa = (g->pa_deg + c->o->rotate_deg) * DEG2RAD;
        double u = cos(pa) * dx + sin(pa) * dy, v = (-sin(pa) * dx + cos(pa) * dy) / g->axis_ratio;
        if (u * u + v * v < 4.0 * g->reff_px * g->reff_px)
            return 1;
    }
    return 0;
}

static hilal_sim_event *new_event(sim_ctx *c, hilal_sim_event_type type, double x, double y)
{
    hilal_sim_event *e = &c->t->events[c->t->nevents++];
    memset(e, 0, sizeof *e);
    e->id = (long)c->t->nevents;
    e->type = type;
    e->x = x + 1.0;
    e->y = y + 1.0;
    e->star_index = -1;
    return e;
}

/* Bad columns: positions only (applied at the end). Hot columns (even
 * index) add 2000-5000 ADU; dead ones (odd) read only read noise. Each runs
 * from row 1 to a random row in the upper three quarters, like a charge trap
 * that spoils the column between the defect and the readout. */
static void make_bad_columns(sim_ctx *c, long n, long *cols)
{
    sim_rng r;
    sim_rng_seed(&r, c->o->seed, SIM_STREAM_BADCOLS);
    for (long k = 0; k < n; k++) {
        long col;
        int dup;
        do {
            col = 8 + (long)(sim_rng_uniform(&r) * (double)(c->nx - 16));
            dup = 0;
            for (long j = 0; j < k; j++)
                dup |= labs(cols[j] - col) < 3;
        } while (dup);
        cols[k] = col;
        long yend = c->ny / 4 + (long)(sim_rng_uniform(&r) * (double)(c->ny - c->ny / 4 - 1));
        double level = 2000.0 + 3000.0 * sim_rng_uniform(&r);
        hilal_sim_event *e = new_event(c, HILAL_SIM_BAD_COLUMN, (double)col, 0.5 * (double)yend);
        e->extent_px = (double)(yend + 1);
        e->diff_flux_adu = NAN;
        e->ideal_snr = NAN;
        e->level_adu = (k % 2 == 0) ? level : -sky_at(&c->t->sci, c->nx, c->ny, (double)col, 0.5 * (double)yend);
    }
}

static double min_dist2_events(const sim_ctx *c, double x, double y, hilal_sim_event_type type)
{
    double best = INFINITY;
    for (size_t i = 0; i < c->t->nevents; i++) {
        const hilal_sim_event *e = &c->t->events[i];
        if (e->type != type)
            continue;
        double dx = x - (e->x - 1.0), dy = y - (e->y - 1.0);
        best = fmin(best, dx * dx + dy * dy);
    }
    return best;
}

/* Variable stars: a star whose science flux becomes flux_ratio F_ref (1 + d),
 * -0.8 <= d <= 3. The target S/N is drawn log-uniformly in [snr_min,
 * min(snr_max, the largest the star allows at that sign)]. */
static hilal_status make_variables(sim_ctx *c, long n, hilal_error *err)
{
    const hilal_sim_options *o = c->o;
    hilal_sim_truth *t = c->t;
    hilal_status st = HILAL_OK;
    if (n == 0)
        return HILAL_OK;
    sim_rng r;
    sim_rng_seed(&r, o->seed, SIM_STREAM_VARIABLES);
    size_t *cand = malloc((t->nstars + 1) * sizeof *cand);
    if (cand == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory choosing variable stars");
    /* Candidates: inside both frames away from the edges, unsaturated even
     * at four times the flux, bright enough to reach snr_min. */
    size_t nc = 0;
    for (size_t i = 0; i < t->nstars; i++) {
        const hilal_sim_star *s = &t->stars[i];
        double xs = s->x_sci - 1.0, ys = s->y_sci - 1.0;
        if (!inside(c, xs, ys, 20.0) || !inside(c, s->x_ref - 1.0, s->y_ref - 1.0, 20.0))
            continue;
        if (sky_at(&t->sci, c->nx, c->ny, xs, ys) + 4.0 * s->peak_sci_adu > 0.7 * o->saturate_adu ||
            sky_at(&t->ref, c->nx, c->ny, s->x_ref - 1.0, s->y_ref - 1.0) + s->peak_ref_adu >
                0.7 * o->saturate_adu)
            continue;
        cand[nc++] = i;
    }
    long made = 0;
    for (long tries = 0; made < n && tries < 200 * n + 1000 && nc > 0; tries++) {
        size_t idx = cand[(size_t)(sim_rng_uniform(&r) * (double)nc) % nc];
        double sign = sim_rng_uniform(&r) < 0.5 ? -1.0 : 1.0;
        double u = sim_rng_uniform(&r);
        hilal_sim_star *s = &t->stars[idx];
        if (s->variable)
            continue;
        double xs = s->x_sci - 1.0, ys = s->y_sci - 1.0;
        double fwhm = sim_psf_fwhm(&c->psf[1], xs, ys);
        if (min_dist2_events(c, xs, ys, HILAL_SIM_VARIABLE) < 16.0 * fwhm * fwhm)
            continue;
        double fs = s->flux_sci_adu;
        int half = sim_psf_half(&c->psf[1], fwhm, 4.0 * fs);
        st = sim_psf_stamp(&c->psf[1], xs, ys, half, 1, &c->st, err);
        if (st != HILAL_OK)
            goto cleanup;
        /* Largest S/N at this sign: d = 3 (brighter) or d = -0.8 (fainter). */
        double dmax = sign > 0 ? 3.0 * fs : -0.8 * fs;
        double snr_lim = fabs(dmax) * sqrt(snr_weight(c, &c->st, dmax));
        double hi = fmin(o->snr_max, snr_lim);
        if (hi < o->snr_min)
            continue;
        double snr = exp(log(o->snr_min) + u * (log(hi) - log(o->snr_min)));
        double df = flux_for_snr(c, &c->st, sign * snr);
        if (fabs(df) > fabs(dmax) * 1.0001)
            continue;
        sim_stamp_add(&c->st, df, c->model[1], c->nx, c->ny, 0, c->ny);
        hilal_sim_event *e = new_event(c, HILAL_SIM_VARIABLE, xs, ys);
        e->diff_flux_adu = df;
        e->ideal_snr = df * sqrt(snr_weight(c, &c->st, 0.0));
        e->ref_flux_adu = s->flux_ref_adu;
        e->sci_flux_adu = fs + df;
        e->fwhm_px = fwhm;
        e->star_index = (long)idx;
        s->peak_sci_adu *= (fs + df) / fs;
        s->flux_sci_adu = fs + df;
        s->variable = 1;
        made++;
    }
    if (made < n)
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "only %ld of %ld variable stars could be placed (too few "
                             "unsaturated stars bright enough for --snr-range); lower --n-variables "
                             "or raise --star-density or --size",
                             made, n);
cleanup:
    free(cand);
    return st;
}

/* Brightest noise-free pixel of the science model in a box around (x, y). */
static double model_max(const sim_ctx *c, double x, double y, int r)
{
    long ix = lround(x), iy = lround(y);
    double m = 0.0;
    for (long yy = iy - r; yy <= iy + r; yy++)
        for (long xx = ix - r; xx <= ix + r; xx++)
            if (xx >= 0 && yy >= 0 && xx < c->nx && yy < c->ny)
                m = fmax(m, c->model[1][yy * c->nx + xx]);
    return m;
}

/* Transients: positions away from edges, saturated stars, bad columns,
 * other transients and variables; a fraction galaxy_frac on galaxies
 * (uniform within the galaxy's half-light ellipse). Flux such that the ideal
 * S/N, drawn log-uniformly in [snr_min, snr_max], is reached. */
static hilal_status make_transients(sim_ctx *c, long n, hilal_error *err)
{
    const hilal_sim_options *o = c->o;
    hilal_sim_truth *t = c->t;
    hilal_status st = HILAL_OK;
    if (n == 0)
        return HILAL_OK;
    sim_rng r;
    sim_rng_seed(&r, o->seed, SIM_STREAM_TRANSIENTS);
    /* Galaxies usable as hosts. */
    size_t nhost = 0, *host = malloc((t->ngalaxies + 1) * sizeof *host);
    if (host == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory placing transients");
    double margin = 16.0 + 2.0 * fmax(o->fwhm_sci_px, o->fwhm_ref_px) * (1.0 + o->psf_vary_frac);
    for (size_t i = 0; i < t->ngalaxies; i++) {
        const hilal_sim_galaxy *g = &t->galaxies[i];
        double xs = g->x_sci - 1.0, ys = g->y_sci - 1.0;
        if (inside(c, xs, ys, margin + 2.0 * g->reff_px) &&
            inside(c, g->x_ref - 1.0, g->y_ref - 1.0, margin + 2.0 * g->reff_px))
            host[nhost++] = i;
    }
    long n_on = nhost > 0 ? lround(o->galaxy_frac * (double)n) : 0;
    long made = 0, tries = 0, max_tries = 2000 * n + 10000, slot_tries = 0;
    while (made < n && tries < max_tries) {
        tries++;
        /* A host slot that keeps failing (hosts near bright stars, small
         * frames) goes to a random position instead. */
        if (made < n_on && ++slot_tries > 500) {
            n_on = made;
            slot_tries = 0;
        }
        int on_gal = made < n_on;
        double u1 = sim_rng_uniform(&r), u2 = sim_rng_uniform(&r), u3 = sim_rng_uniform(&r);
        double u4 = sim_rng_uniform(&r);
        double x, y;
        if (on_gal) {
            const hilal_sim_galaxy *g = &t->galaxies[host[(size_t)(u1 * (double)nhost) % nhost]];
            double rr = g->reff_px * sqrt(u2), phi = 2.0 * M_PI * u3;
            double a = rr * cos(phi), b = rr * sin(phi) * g->axis_ratio;
            double pa = (g->pa_deg + o->rotate_deg) * DEG2RAD;
            x = g->x_sci - 1.0 + cos(pa) * a - sin(pa) * b;
            y = g->y_sci - 1.0 + sin(pa) * a + cos(pa) * b;
        } else {
            x = -0.5 + u1 * (double)c->nx;
            y = -0.5 + u2 * (double)c->ny;
        }
        double xr, yr;
        ref_from_sci(c, x, y, &xr, &yr);
        if (!inside(c, x, y, margin) || !inside(c, xr, yr, margin))
            continue;
        double fwhm = sim_psf_fwhm(&c->psf[1], x, y);
        /* After many failed tries (crowded or tiny frames) the separation
         * from other events is relaxed; edges and saturation never are. */
        int strict = tries < max_tries / 2;
        double sep2 = (strict ? 16.0 : 4.0) * fwhm * fwhm;
        if (min_dist2_events(c, x, y, HILAL_SIM_TRANSIENT) < sep2 ||
            min_dist2_events(c, x, y, HILAL_SIM_VARIABLE) < sep2)
            continue;
        int bad = 0;
        for (size_t i = 0; i < t->nevents; i++)
            if (t->events[i].type == HILAL_SIM_BAD_COLUMN && fabs(t->events[i].x - 1.0 - x) < 5.0)
                bad = 1;
        if (bad || model_max(c, x, y, (int)ceil(3.0 * fwhm)) > 0.5 * o->saturate_adu)
            continue;
        /* Flux for the target S/N with the stamp sized for that flux. */
        double snr = exp(log(o->snr_min) + u4 * (log(o->snr_max) - log(o->snr_min)));
        int half = sim_psf_half(&c->psf[1], fwhm, 100.0 * snr);
        st = sim_psf_stamp(&c->psf[1], x, y, half, 1, &c->st, err);
        if (st != HILAL_OK)
            goto cleanup;
        double f = flux_for_snr(c, &c->st, snr);
        int half2 = sim_psf_half(&c->psf[1], fwhm, f);
        if (half2 != half) {
            st = sim_psf_stamp(&c->psf[1], x, y, half2, 1, &c->st, err);
            if (st != HILAL_OK)
                goto cleanup;
            f = flux_for_snr(c, &c->st, snr);
        }
        hilal_sim_event *e = new_event(c, HILAL_SIM_TRANSIENT, x, y);
        e->diff_flux_adu = f;
        e->ideal_snr = f * sqrt(snr_weight(c, &c->st, f));
        e->sci_flux_adu = f;
        e->fwhm_px = fwhm;
        e->on_galaxy = on_gal;
        sim_stamp_add(&c->st, f, c->model[1], c->nx, c->ny, 0, c->ny);
        made++;
        slot_tries = 0;
    }
    if (made < n)
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "only %ld of %ld transients could be placed in a %ld x %ld "
                             "frame; lower --n-transients or raise --size",
                             made, n, c->nx, c->ny);
cleanup:
    free(host);
    return st;
}

/* Cosmic rays: straight tracks 1-3 px long at a random angle, total charge
 * log-uniform in 300-20000 e-, deposited without blurring (sampled at 16
 * points per pixel of length). The deposits are kept and added after the
 * noise; their ideal S/N uses the deposit pattern as the profile. */
static hilal_status make_cosmics(sim_ctx *c, long n, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    if (n == 0)
        return HILAL_OK;
    sim_rng r;
    sim_rng_seed(&r, c->o->seed, SIM_STREAM_COSMICS);
    enum { H = 3, W = 2 * H + 1 };
    double box[W * W];
    for (long k = 0; k < n; k++) {
        double x = -0.5 + sim_rng_uniform(&r) * (double)c->nx;
        double y = -0.5 + sim_rng_uniform(&r) * (double)c->ny;
        double len = 1.0 + 2.0 * sim_rng_uniform(&r);
        double ang = M_PI * sim_rng_uniform(&r);
        double adu = log_uniform(&r, 300.0, 20000.0) / c->o->gain_e_per_adu;
        memset(box, 0, sizeof box);
        long ix = lround(x), iy = lround(y);
        int npts = (int)ceil(16.0 * len) + 1;
        for (int p = 0; p < npts; p++) {
            double s = ((double)p / (npts - 1) - 0.5) * len;
            long px = lround(x + s * cos(ang)) - ix + H, py = lround(y + s * sin(ang)) - iy + H;
            box[py * W + px] += 1.0 / npts;
        }
        /* Deposit (only what lands on the chip) and its profile stamp. */
        double total = 0.0;
        for (int j = 0; j < W; j++)
            for (int i = 0; i < W; i++) {
                long gx = ix - H + i, gy = iy - H + j;
                if (box[j * W + i] == 0.0 || gx < 0 || gy < 0 || gx >= c->nx || gy >= c->ny)
                    continue;
                if (c->ndep == c->capdep) {
                    size_t cap = c->capdep ? 2 * c->capdep : 1024;
                    size_t *np = realloc(c->dep_pix, cap * sizeof *np);
                    if (np != NULL)
                        c->dep_pix = np;
                    float *na = realloc(c->dep_adu, cap * sizeof *na);
                    if (na != NULL)
                        c->dep_adu = na;
                    if (np == NULL || na == NULL) {
                        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for cosmic rays");
                        goto cleanup;
                    }
                    c->capdep = cap;
                }
                c->dep_pix[c->ndep] = (size_t)gy * (size_t)c->nx + (size_t)gx;
                c->dep_adu[c->ndep] = (float)(adu * box[j * W + i]);
                c->ndep++;
                total += adu * box[j * W + i];
            }
        hilal_sim_event *e = new_event(c, HILAL_SIM_COSMIC, x, y);
        e->diff_flux_adu = total;
        e->extent_px = len;
        if (total > 0.0) {
            sim_stamp prof = {ix - H, iy - H, W, box, 0};
            for (int q = 0; q < W * W; q++)
                box[q] *= adu / total;
            e->ideal_snr = total * sqrt(snr_weight(c, &prof, 0.0));
        }
    }
cleanup:
    return st;
}

/* Detector: noise, cosmic rays, bleeding and saturation, bad columns,
 * 16-bit quantisation. */
static hilal_status finish_frame(sim_ctx *c, int which, hilal_error *err)
{
    const hilal_sim_options *o = c->o;
    float *pix = c->model[which];
    size_t n = (size_t)c->nx * (size_t)c->ny;
    hilal_status st = sim_noise_apply(pix, c->nx, c->ny, c->gain[which],
                                      which ? o->rdnoise_e : c->t->ref.rdnoise_e,
                                      sim_stream_key(o->seed, which ? SIM_STREAM_NOISE_SCI
                                                                    : SIM_STREAM_NOISE_REF),
                                      c->nthreads, err);
    if (st != HILAL_OK)
        return st;
    if (which)
        for (size_t k = 0; k < c->ndep; k++)
            pix[c->dep_pix[k]] += c->dep_adu[k];
    if (o->bleed)
        sim_bleed(pix, c->nx, c->ny, o->saturate_adu);
    const float sat = (float)o->saturate_adu;
    for (size_t k = 0; k < n; k++)
        if (pix[k] > sat)
            pix[k] = sat;
    if (which) {
        uint64_t key = sim_stream_key(o->seed, SIM_STREAM_NOISE_BADCOL);
        double rn_adu = o->rdnoise_e / o->gain_e_per_adu;
        for (size_t i = 0; i < c->t->nevents; i++) {
            const hilal_sim_event *e = &c->t->events[i];
            if (e->type != HILAL_SIM_BAD_COLUMN)
                continue;
            long col = lround(e->x - 1.0), rows = lround(e->extent_px);
            for (long y = 0; y < rows && y < c->ny; y++) {
                float *v = pix + y * c->nx + col;
                if (e->level_adu > 0.0)
                    *v = fminf(*v + (float)e->level_adu, sat);
                else
                    *v = (float)(rn_adu * sim_pixel_normal(key, (uint64_t)(y * c->nx + col)));
            }
        }
    }
    if (o->bitpix == 16)
        for (size_t k = 0; k < n; k++)
            pix[k] = pix[k] < 0.0f ? 0.0f : pix[k] > 65535.0f ? 65535.0f : nearbyintf(pix[k]);
    return HILAL_OK;
}

/* Metadata and header of a finished frame. */
static hilal_status fill_meta(hilal_image *img, const sim_header *h, hilal_error *err)
{
    hilal_meta *m = &img->meta;
    m->gain_e_per_adu = h->gain_e_per_adu;
    m->rdnoise_e = h->rdnoise_e;
    m->saturate_adu = h->saturate_adu;
    m->exptime_s = h->exptime_s;
    m->mjd = h->mjd;
    m->zeropoint_mag = h->zeropoint_mag;
    snprintf(m->filter, sizeof m->filter, "%s", h->o->filter);
    snprintf(m->object, sizeof m->object, "%s", h->o->object);
    m->hdu = 1;
    m->bitpix = h->bitpix;
    m->bscale = 1.0;
    m->bzero = h->bitpix == 16 ? 32768.0 : 0.0;
    hilal_status st = sim_header_cards(h, &m->header, &m->nheader_cards, err);
    if (st == HILAL_OK)
        st = hilal_wcs_from_header(m->header, m->nheader_cards, &m->wcs, err);
    if (st == HILAL_OK && m->wcs == NULL)
        st = hilal_error_set(err, HILAL_ERR_INTERNAL, "the %s header has no WCS", h->frame);
    return st;
}

hilal_status hilal_sim_make(const hilal_sim_options *o, hilal_image **sci_out,
                            hilal_image **ref_out, hilal_sim_truth **truth_out, hilal_error *err)
{
    hilal_status st;
    sim_ctx c;
    hilal_image *img[2] = {NULL, NULL};
    sim_header hdr[2];
    memset(&c, 0, sizeof c);
    if (sci_out)
        *sci_out = NULL;
    if (ref_out)
        *ref_out = NULL;
    if (truth_out)
        *truth_out = NULL;

    st = hilal_sim_options_check(o, err);
    if (st != HILAL_OK)
        goto cleanup;
    c.o = o;
    c.nx = o->nx;
    c.ny = o->ny;
    c.nthreads = o->nthreads > 0 ? o->nthreads : 2;
    long n_tr = hilal_sim_event_count(o, 0), n_var = hilal_sim_event_count(o, 1);
    long n_cr = hilal_sim_event_count(o, 2), n_bc = hilal_sim_event_count(o, 3);

    c.t = calloc(1, sizeof *c.t);
    if (c.t == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the simulation truth");
        goto cleanup;
    }
    hilal_sim_truth *t = c.t;
    t->nx = o->nx;
    t->ny = o->ny;
    t->flux_ratio = o->flux_ratio;
    t->events = calloc((size_t)(n_tr + n_var + n_cr + n_bc) + 1, sizeof *t->events);
    if (t->events == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %ld simulated events",
                             n_tr + n_var + n_cr + n_bc);
        goto cleanup;
    }

    /* Frame descriptions. The reference is the mean of ref_depth exposures
     * like the science one: its effective gain is depth x gain (e- per mean
     * ADU) and its effective read noise sqrt(depth) x read noise (e-), so
     * that its read-noise variance in ADU^2 is rn^2 / (gain^2 depth). */
    sim_rng rsky;
    sim_rng_seed(&rsky, o->seed, SIM_STREAM_SKY);
    for (int k = 0; k < 2; k++) {
        hilal_sim_frame_info *f = k ? &t->sci : &t->ref;
        double depth = k ? 1.0 : o->ref_depth;
        f->sky_adu = k ? o->sky_sci_adu : o->sky_ref_adu;
        f->sky_gradient_frac = o->sky_gradient_frac;
        f->sky_angle_rad = 2.0 * M_PI * sim_rng_uniform(&rsky);
        f->fwhm_px = k ? o->fwhm_sci_px : o->fwhm_ref_px;
        f->psf_pa_rad = (k ? PSF_PA_SCI_DEG : PSF_PA_REF_DEG) * DEG2RAD;
        f->gain_e_per_adu = o->gain_e_per_adu * depth;
        f->rdnoise_e = o->rdnoise_e * sqrt(depth);
        f->exptime_s = o->exptime_s;
        f->zeropoint_mag = o->zeropoint_mag + (k ? 2.5 * log10(o->flux_ratio) : 0.0);
        c.gain[k] = f->gain_e_per_adu;
        c.rdnoise_adu2[k] = (f->rdnoise_e / f->gain_e_per_adu) * (f->rdnoise_e / f->gain_e_per_adu);
        /* Wings below 2% of the sky noise per pixel may be cut. */
        double noise = sqrt(f->sky_adu / f->gain_e_per_adu + c.rdnoise_adu2[k]);
        frame_psf(o, k, fmax(0.02 * noise, 1e-3), &c.psf[k]);
    }
    c.cth = cos(o->rotate_deg * DEG2RAD);
    c.sth = sin(o->rotate_deg * DEG2RAD);

    /* Headers and WCS (parsed by wcslib from the very cards written). */
    sim_make_headers(o, t, &hdr[0], &hdr[1]);
    for (int k = 0; k < 2; k++) {
        c.crpix_c[k][0] = hdr[k].crpix[0] - 1.0;
        c.crpix_c[k][1] = hdr[k].crpix[1] - 1.0;
        img[k] = hilal_image_new(o->nx, o->ny, err);
        if (img[k] == NULL) {
            st = err ? err->code : HILAL_ERR_NOMEM;
            goto cleanup;
        }
        st = fill_meta(img[k], &hdr[k], err);
        if (st != HILAL_OK)
            goto cleanup;
        c.wcs[k] = img[k]->meta.wcs;
        c.model[k] = img[k]->pix;
    }

    /* The field, then the events (bad columns first so that transients
     * avoid them), on the noise-free models. */
    st = make_stars(&c, err);
    if (st == HILAL_OK)
        st = render_field(&c, 0, err);
    if (st == HILAL_OK)
        st = render_field(&c, 1, err);
    if (st != HILAL_OK)
        goto cleanup;
    long *cols = calloc((size_t)n_bc + 1, sizeof *cols);
    if (cols == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for bad columns");
        goto cleanup;
    }
    make_bad_columns(&c, n_bc, cols);
    free(cols);
    st = make_variables(&c, n_var, err);
    if (st == HILAL_OK)
        st = make_transients(&c, n_tr, err);
    if (st == HILAL_OK)
        st = make_cosmics(&c, n_cr, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* Truth order: transients, variables, cosmics, bad columns. */
    static const hilal_sim_event_type order[4] = {HILAL_SIM_TRANSIENT, HILAL_SIM_VARIABLE,
                                                  HILAL_SIM_COSMIC, HILAL_SIM_BAD_COLUMN};
    hilal_sim_event *sorted = malloc((t->nevents + 1) * sizeof *sorted);
    if (sorted == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory sorting events");
        goto cleanup;
    }
    size_t ns = 0;
    for (int k = 0; k < 4; k++)
        for (size_t i = 0; i < t->nevents; i++)
            if (t->events[i].type == order[k])
                sorted[ns++] = t->events[i];
    free(t->events);
    t->events = sorted;
    for (size_t i = 0; i < t->nevents; i++) {
        hilal_sim_event *e = &t->events[i];
        e->id = (long)i + 1;
        e->on_galaxy |= e->type != HILAL_SIM_BAD_COLUMN && near_galaxy(&c, e->x - 1.0, e->y - 1.0);
        st = hilal_wcs_pix2sky(c.wcs[1], 1, &e->x, &e->y, &e->ra_deg, &e->dec_deg, err);
        if (st != HILAL_OK)
            goto cleanup;
    }
    for (size_t i = 0; i < t->nstars; i++) {
        hilal_sim_star *s = &t->stars[i];
        s->sat_ref = sky_at(&t->ref, c.nx, c.ny, s->x_ref - 1.0, s->y_ref - 1.0) + s->peak_ref_adu >=
                     o->saturate_adu;
        s->sat_sci = sky_at(&t->sci, c.nx, c.ny, s->x_sci - 1.0, s->y_sci - 1.0) + s->peak_sci_adu >=
                     o->saturate_adu;
    }

    if (o->keep_model) {
        size_t n = (size_t)c.nx * (size_t)c.ny;
        t->model_ref = malloc(n * sizeof *t->model_ref);
        t->model_sci = malloc(n * sizeof *t->model_sci);
        if (t->model_ref == NULL || t->model_sci == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory keeping the noise-free models");
            goto cleanup;
        }
        memcpy(t->model_ref, c.model[0], n * sizeof *t->model_ref);
        memcpy(t->model_sci, c.model[1], n * sizeof *t->model_sci);
    }

    st = finish_frame(&c, 0, err);
    if (st == HILAL_OK)
        st = finish_frame(&c, 1, err);
    if (st != HILAL_OK)
        goto cleanup;
    /* Saturated pixels are marked as ingest marks them when it reads the
     * files (value >= SATURATE); nothing else is flagged. */
    for (int k = 0; k < 2; k++) {
        size_t n = (size_t)c.nx * (size_t)c.ny;
        const float sat = (float)o->saturate_adu;
        for (size_t i = 0; i < n; i++)
            if (img[k]->pix[i] >= sat)
                img[k]->mask[i] |= HILAL_MASK_SAT;
    }

    hilal_log(HILAL_LOG_DEBUG,
              "simulate: %ld x %ld, %zu stars, %zu galaxies, %zu events (%ld transients, %ld "
              "variables, %ld cosmics, %ld bad columns)",
              c.nx, c.ny, t->nstars, t->ngalaxies, t->nevents, n_tr, n_var, n_cr, n_bc);
    if (sci_out) {
        *sci_out = img[1];
        img[1] = NULL;
    }
    if (ref_out) {
        *ref_out = img[0];
        img[0] = NULL;
    }
    if (truth_out) {
        *truth_out = c.t;
        c.t = NULL;
    }
cleanup:
    if (st != HILAL_OK)
        hilal_error_context(err, "simulate");
    hilal_image_free(img[0]);
    hilal_image_free(img[1]);
    hilal_sim_truth_free(c.t);
    sim_stamp_clear(&c.st);
    sim_stamp_clear(&c.tmp);
    free(c.dep_pix);
    free(c.dep_adu);
    return st;
}

hilal_status hilal_sim_write(const hilal_sim_options *o, const char *outdir, hilal_error *err)
{
    hilal_image *sci = NULL, *ref = NULL;
    hilal_sim_truth *truth = NULL;
    hilal_status st = hilal_sim_make(o, &sci, &ref, &truth, err);
    if (st == HILAL_OK)
        st = hilal_sim_write_outputs(o, sci, ref, truth, outdir, err);
    hilal_image_free(sci);
    hilal_image_free(ref);
    hilal_sim_truth_free(truth);
    return st;
}

/* Shortest %g text that reads back as the same double. */
static const char *num_text(double v, char *buf, size_t len)
{
    for (int digits = 6; digits <= 17; digits++) {
        snprintf(buf, len, "%.*g", digits, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    return buf;
}

/* A shell word: single-quoted, with ' written as '\''. */
static const char *shell_word(const char *s, char *buf, size_t len)
{
    size_t k = 0;
    if (len < 3)
        return "''";
    buf[k++] = '\'';
    for (; *s != '\0' && k + 6 < len; s++) {
        if (*s == '\'') {
            memcpy(buf + k, "'\\''", 4);
            k += 4;
        } else {
            buf[k++] = *s;
        }
    }
    buf[k++] = '\'';
    buf[k] = '\0';
    return buf;
}

/* Distinct text buffers for the numbers of one command line; the counter
 * is advanced inside the call, so several calls among the arguments of one
 * printf are well defined. */
typedef struct num_bufs {
    char b[40][40];
    int k;
} num_bufs;

static const char *num_next(num_bufs *nb, double v)
{
    int k = nb->k < 39 ? nb->k++ : 39;
    return num_text(v, nb->b[k], sizeof nb->b[k]);
}

void sim_options_cmdline(const hilal_sim_options *o, char *buf, size_t len)
{
    char fq[160], oq[300];
    num_bufs nb;
    nb.k = 0;
#define N(v) num_next(&nb, (v))
    snprintf(buf, len,
             "hilal simulate --size %ldx%ld --seed %llu --pixscale %s --center %s,%s "
             "--offset-px %s,%s --rotate-deg %s --psf %s --beta %s --fwhm-ref %s --fwhm-sci %s "
             "--psf-vary %s --psf-ellip %s --sky-sci %s --sky-ref %s --sky-gradient %s --gain %s "
             "--rdnoise %s --saturate %s %s --exptime %s --ref-depth %s --flux-ratio %s "
             "--zeropoint %s --star-density %s --mag-range %s,%s --count-slope %s "
             "--galaxy-density %s --n-transients %ld --snr-range %s,%s --galaxy-frac %s "
             "--n-variables %ld --n-cosmics %ld --bad-columns %ld%s --mjd-ref %s --mjd-sci %s "
             "--filter %s --object %s --bitpix %d",
             o->nx, o->ny, (unsigned long long)o->seed, N(o->pixscale_arcsec), N(o->ra_deg),
             N(o->dec_deg), N(o->offset_x_px), N(o->offset_y_px), N(o->rotate_deg),
             o->psf_model == HILAL_SIM_PSF_GAUSSIAN ? "gaussian" : "moffat", N(o->moffat_beta),
             N(o->fwhm_ref_px), N(o->fwhm_sci_px), N(o->psf_vary_frac), N(o->psf_ellip),
             N(o->sky_sci_adu), N(o->sky_ref_adu), N(o->sky_gradient_frac), N(o->gain_e_per_adu),
             N(o->rdnoise_e), N(o->saturate_adu), o->bleed ? "--bleed" : "--no-bleed",
             N(o->exptime_s), N(o->ref_depth), N(o->flux_ratio), N(o->zeropoint_mag),
             N(o->star_density), N(o->mag_bright), N(o->mag_faint), N(o->count_slope),
             N(o->galaxy_density), hilal_sim_event_count(o, 0), N(o->snr_min), N(o->snr_max),
             N(o->galaxy_frac), hilal_sim_event_count(o, 1), hilal_sim_event_count(o, 2),
             hilal_sim_event_count(o, 3), o->no_events ? " --no-events" : "", N(o->mjd_ref),
             N(o->mjd_sci), shell_word(o->filter, fq, sizeof fq), shell_word(o->object, oq, sizeof oq),
             o->bitpix);
#undef N
}
