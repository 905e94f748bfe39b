/* Synthetic image pairs with a known registration for the alignment tests.
 *
 * Truth: a science pixel s (FITS 1-based) lies at reference pixel
 *     T(s) = c + d + k R(theta) (s - c)
 * (c the science centre, d the offset, theta a counter-clockwise rotation,
 * k the science pixel size in reference pixels). Both frames get TAN WCS
 * that encode T exactly (same CRVAL; reference CRPIX = c + d, CD_ref =
 * diag(-1, 1) arcsec/px; science CRPIX = c, CD_sci = CD_ref k R), optionally
 * with the science CRPIX perturbed to mimic an imperfect astrometric
 * solution that star matching must correct.
 *
 * Stars are pixel-integrated circular Gaussians (erf differences), so the
 * flux of a star summed over pixels is its nominal flux. Images carry a
 * constant sky, a sky plane, a variance plane (read noise^2 + star/gain)
 * and Gaussian noise drawn from that variance. Star catalogues are the
 * true positions plus centroid noise of the expected size.
 * Header-only, static functions.
 */
#ifndef HILAL_TEST_ALIGN_SYNTH_H
#define HILAL_TEST_ALIGN_SYNTH_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/hilal.h"
#include "synth_rng.h"

#define AS_UNUSED __attribute__((unused))
#define AS_PI 3.14159265358979323846

/* The true transform science -> reference. */
typedef struct as_truth {
    double cx, cy;      /* science centre c */
    double dx, dy;      /* offset d */
    double theta_deg;   /* rotation */
    double k;           /* science pixel size in reference pixels */
    double q;           /* quadratic distortion: q ((sx - cx) / cx)^2 px added to the reference x */
} as_truth;

static AS_UNUSED void as_fwd(const as_truth *t, double sx, double sy, double *rx, double *ry)
{
    double th = t->theta_deg * AS_PI / 180.0, c = cos(th), s = sin(th);
    double x = sx - t->cx, y = sy - t->cy;
    *rx = t->cx + t->dx + t->k * (c * x - s * y) + t->q * (x / t->cx) * (x / t->cx);
    *ry = t->cy + t->dy + t->k * (s * x + c * y);
}

static AS_UNUSED void as_inv(const as_truth *t, double rx, double ry, double *sx, double *sy)
{
    /* Affine inverse, then fixed-point iterations for the quadratic term. */
    double th = t->theta_deg * AS_PI / 180.0, c = cos(th), s = sin(th);
    double qx = 0;
    for (int it = 0; it < 100; it++) {
        double x = (rx - qx - t->cx - t->dx) / t->k, y = (ry - t->cy - t->dy) / t->k;
        *sx = t->cx + c * x + s * y;
        *sy = t->cy - s * x + c * y;
        double u = (*sx - t->cx) / t->cx, nq = t->q * u * u;
        if (fabs(nq - qx) < 1e-12)
            break;
        qx = nq;
    }
}

/* A TAN WCS from header cards (through the library's header parser). */
static AS_UNUSED struct wcsprm *as_tan_wcs(long nx, long ny, double crval1, double crval2,
                                           double crpix1, double crpix2, const double cd[4])
{
    char cards[12][81];
    int n = 0;
    snprintf(cards[n++], 81, "%-80s", "SIMPLE  =                    T");
    snprintf(cards[n++], 81, "%-80s", "BITPIX  =                  -32");
    snprintf(cards[n++], 81, "%-80s", "NAXIS   =                    2");
    snprintf(cards[n++], 81, "NAXIS1  = %20ld%50s", nx, "");
    snprintf(cards[n++], 81, "NAXIS2  = %20ld%50s", ny, "");
    snprintf(cards[n++], 81, "%-80s", "CTYPE1  = 'RA---TAN'");
    snprintf(cards[n++], 81, "%-80s", "CTYPE2  = 'DEC--TAN'");
    snprintf(cards[n++], 81, "CRVAL1  = %20.12f%50s", crval1, "");
    snprintf(cards[n++], 81, "CRVAL2  = %20.12f%50s", crval2, "");
    snprintf(cards[n++], 81, "CRPIX1  = %20.12f%50s", crpix1, "");
    snprintf(cards[n++], 81, "CRPIX2  = %20.12f%50s", crpix2, "");
    char hdr[20 * 80 + 1];
    hdr[0] = '\0';
    for (int i = 0; i < n; i++)
        strcat(hdr, cards[i]);
    char c[81];
    snprintf(c, sizeof c, "CD1_1   = %20.14e%50s", cd[0], "");
    strcat(hdr, c);
    snprintf(c, sizeof c, "CD1_2   = %20.14e%50s", cd[1], "");
    strcat(hdr, c);
    snprintf(c, sizeof c, "CD2_1   = %20.14e%50s", cd[2], "");
    strcat(hdr, c);
    snprintf(c, sizeof c, "CD2_2   = %20.14e%50s", cd[3], "");
    strcat(hdr, c);
    snprintf(c, sizeof c, "%-80s", "END");
    strcat(hdr, c);
    struct wcsprm *w = NULL;
    hilal_error err;
    hilal_error_clear(&err);
    if (hilal_wcs_from_header(hdr, (int)(strlen(hdr) / 80), &w, &err) != HILAL_OK)
        fprintf(stderr, "as_tan_wcs: %s\n", err.msg);
    return w;
}

/* Adds a pixel-integrated Gaussian star of total flux f at FITS (x, y). */
static AS_UNUSED void as_add_star(float *img, float *model, long nx, long ny, double x, double y,
                                  double f, double sigma)
{
    long r = (long)ceil(6.0 * sigma) + 1;
    long ix = (long)floor(x - 0.5), iy = (long)floor(y - 0.5); /* 0-based pixel */
    double gx[64], gy[64];
    if (2 * r + 1 > 64)
        r = 31;
    double q = 1.0 / (sqrt(2.0) * sigma);
    for (long k = -r; k <= r; k++) {
        /* Pixel i (0-based) spans FITS [i + 0.5, i + 1.5]. */
        double a = (double)(ix + k) + 0.5 - x, b = a + 1.0;
        gx[k + r] = 0.5 * (erf(b * q) - erf(a * q));
        a = (double)(iy + k) + 0.5 - y;
        b = a + 1.0;
        gy[k + r] = 0.5 * (erf(b * q) - erf(a * q));
    }
    for (long j = -r; j <= r; j++) {
        long yy = iy + j;
        if (yy < 0 || yy >= ny)
            continue;
        for (long i = -r; i <= r; i++) {
            long xx = ix + i;
            if (xx < 0 || xx >= nx)
                continue;
            double v = f * gx[i + r] * gy[j + r];
            img[yy * nx + xx] += (float)v;
            if (model)
                model[yy * nx + xx] += (float)v;
        }
    }
}

/* A synthetic pair. */
typedef struct as_pair {
    hilal_image *sci, *ref;
    hilal_starlist sci_stars, ref_stars;
    size_t n;               /* stars in the field */
    double *rx, *ry;        /* true reference positions (FITS) */
    double *sx, *sy;        /* true science positions (FITS) */
    double *flux;           /* true flux, ADU (same in both frames) */
    as_truth t;
} as_pair;

typedef struct as_pair_opts {
    long nx, ny;             /* both frames */
    as_truth t;              /* truth (cx, cy filled from nx, ny when 0) */
    size_t nstars;
    double flux_min, flux_max;
    double sigma_ref_px, sigma_sci_px; /* PSF Gaussian sigma, own pixels */
    double sky_adu, rdnoise_adu, gain;
    double wcs_err_x_px, wcs_err_y_px; /* error added to the science CRPIX */
    int with_wcs;            /* 0: no WCS on either frame */
    uint64_t seed;
    double dec_offset_deg;   /* moves the reference CRVAL (no overlap test) */
} as_pair_opts;

static AS_UNUSED as_pair_opts as_pair_opts_default(void)
{
    as_pair_opts o;
    memset(&o, 0, sizeof o);
    o.nx = o.ny = 1024;
    o.t.dx = 20.3;
    o.t.dy = -7.6;
    o.t.theta_deg = 0.3;
    o.t.k = 1.0;
    o.nstars = 500;
    o.flux_min = 2e3;
    o.flux_max = 3e5;
    o.sigma_ref_px = 1.4;
    o.sigma_sci_px = 1.7;
    o.sky_adu = 100.0;
    o.rdnoise_adu = 5.0;
    o.gain = 1.0;
    o.with_wcs = 1;
    o.seed = 12345;
    return o;
}

static AS_UNUSED void as_pair_free(as_pair *p)
{
    hilal_image_free(p->sci);
    hilal_image_free(p->ref);
    hilal_starlist_clear(&p->sci_stars);
    hilal_starlist_clear(&p->ref_stars);
    free(p->rx);
    free(p->ry);
    free(p->sx);
    free(p->sy);
    free(p->flux);
    memset(p, 0, sizeof *p);
}

/* Noise, sky and variance planes from the noise-free star model. */
static AS_UNUSED void as_finish_image(hilal_image *img, const float *model, double sky,
                                      double rdnoise, double gain, synth_rng *rng)
{
    hilal_image_alloc_var(img, NULL);
    hilal_image_alloc_sky(img, NULL);
    for (long k = 0; k < img->nx * img->ny; k++) {
        double var = rdnoise * rdnoise + (model[k] > 0 ? model[k] / gain : 0.0);
        img->pix[k] = (float)(sky + model[k] + sqrt(var) * synth_gauss(rng));
        img->var[k] = (float)var;
        img->sky[k] = (float)sky;
    }
    img->sky_rms_adu = rdnoise;
    img->meta.gain_e_per_adu = gain;
}

/* Catalogue of the stars whose true position lies in the frame, with
 * centroid noise sigma_c = sqrt(2) sigma_psf / SNR. Sorted by flux (stars
 * are generated brightest first). */
static AS_UNUSED void as_catalogue(hilal_starlist *l, const double *x, const double *y,
                                   const double *f, size_t n, long nx, long ny, double sigma,
                                   double rdnoise, synth_rng *rng)
{
    l->stars = calloc(n + 1, sizeof *l->stars);
    l->n = 0;
    for (size_t i = 0; i < n; i++) {
        if (x[i] < 0.5 || y[i] < 0.5 || x[i] > nx + 0.5 || y[i] > ny + 0.5)
            continue;
        double snr = f[i] / sqrt(4.0 * AS_PI * sigma * sigma * rdnoise * rdnoise + f[i]);
        double sc = sqrt(2.0) * sigma / snr;
        hilal_star *s = &l->stars[l->n++];
        s->x = x[i] + sc * synth_gauss(rng);
        s->y = y[i] + sc * synth_gauss(rng);
        s->flux_adu = f[i];
        s->flux_err_adu = f[i] / snr;
        s->peak_adu = f[i] / (2.0 * AS_PI * sigma * sigma);
        s->a_px = s->b_px = sigma;
        s->theta_rad = 0;
        s->fwhm_px = 2.3548 * sigma;
        s->usable = 1;
    }
}

/* Makes a pair. Stars are uniform over the reference frame plus a margin,
 * fluxes log-uniform, brightest first. */
static AS_UNUSED int as_pair_make(const as_pair_opts *o, as_pair *p)
{
    memset(p, 0, sizeof *p);
    synth_rng rng = {o->seed, 0, 0};
    p->t = o->t;
    if (p->t.cx == 0)
        p->t.cx = 0.5 * (double)(o->nx + 1);
    if (p->t.cy == 0)
        p->t.cy = 0.5 * (double)(o->ny + 1);
    size_t n = o->nstars;
    p->n = n;
    p->rx = malloc((n + 1) * sizeof(double));
    p->ry = malloc((n + 1) * sizeof(double));
    p->sx = malloc((n + 1) * sizeof(double));
    p->sy = malloc((n + 1) * sizeof(double));
    p->flux = malloc((n + 1) * sizeof(double));
    p->sci = hilal_image_new(o->nx, o->ny, NULL);
    p->ref = hilal_image_new(o->nx, o->ny, NULL);
    float *ms = calloc((size_t)(o->nx * o->ny), sizeof *ms);
    float *mr = calloc((size_t)(o->nx * o->ny), sizeof *mr);
    if (!p->rx || !p->ry || !p->sx || !p->sy || !p->flux || !p->sci || !p->ref || !ms || !mr) {
        free(ms);
        free(mr);
        as_pair_free(p);
        return -1;
    }
    double lmin = log(o->flux_min), lmax = log(o->flux_max);
    for (size_t i = 0; i < n; i++) {
        p->rx[i] = -40.0 + (double)(o->nx + 80) * synth_uniform(&rng);
        p->ry[i] = -40.0 + (double)(o->ny + 80) * synth_uniform(&rng);
        /* brightest first: decreasing fluxes along the list */
        p->flux[i] = exp(lmax - (lmax - lmin) * ((double)i + synth_uniform(&rng)) / (double)n);
        as_inv(&p->t, p->rx[i], p->ry[i], &p->sx[i], &p->sy[i]);
    }
    /* The science PSF has the same width on the sky: sigma_sci in science px. */
    for (size_t i = 0; i < n; i++) {
        as_add_star(p->ref->pix, NULL, o->nx, o->ny, p->rx[i], p->ry[i], p->flux[i],
                    o->sigma_ref_px);
        as_add_star(p->sci->pix, NULL, o->nx, o->ny, p->sx[i], p->sy[i], p->flux[i],
                    o->sigma_sci_px);
    }
    memcpy(mr, p->ref->pix, (size_t)(o->nx * o->ny) * sizeof *mr);
    memcpy(ms, p->sci->pix, (size_t)(o->nx * o->ny) * sizeof *ms);
    as_finish_image(p->ref, mr, o->sky_adu, o->rdnoise_adu, o->gain, &rng);
    as_finish_image(p->sci, ms, o->sky_adu, o->rdnoise_adu, o->gain, &rng);
    free(ms);
    free(mr);
    snprintf(p->sci->meta.path, sizeof p->sci->meta.path, "sim_sci.fits");
    snprintf(p->ref->meta.path, sizeof p->ref->meta.path, "sim_ref.fits");
    if (o->with_wcs) {
        double pscale = 1.0 / 3600.0;
        double cdr[4] = {-pscale, 0, 0, pscale};
        double th = p->t.theta_deg * AS_PI / 180.0, c = cos(th), s = sin(th);
        double m[4] = {p->t.k * c, -p->t.k * s, p->t.k * s, p->t.k * c};
        double cds[4] = {cdr[0] * m[0] + cdr[1] * m[2], cdr[0] * m[1] + cdr[1] * m[3],
                         cdr[2] * m[0] + cdr[3] * m[2], cdr[2] * m[1] + cdr[3] * m[3]};
        p->ref->meta.wcs = as_tan_wcs(o->nx, o->ny, 150.0, 2.2 + o->dec_offset_deg,
                                      p->t.cx + p->t.dx, p->t.cy + p->t.dy, cdr);
        p->sci->meta.wcs = as_tan_wcs(o->nx, o->ny, 150.0, 2.2, p->t.cx + o->wcs_err_x_px,
                                      p->t.cy + o->wcs_err_y_px, cds);
    }
    as_catalogue(&p->ref_stars, p->rx, p->ry, p->flux, n, o->nx, o->ny, o->sigma_ref_px,
                 o->rdnoise_adu, &rng);
    as_catalogue(&p->sci_stars, p->sx, p->sy, p->flux, n, o->nx, o->ny, o->sigma_sci_px,
                 o->rdnoise_adu, &rng);
    return 0;
}

/* Gaussian-windowed centroid (SExtractor's XWIN iteration) of img - sky
 * around FITS (x, y), window sigma sw. Returns 0 on convergence. */
static AS_UNUSED int as_centroid(const hilal_image *img, double *x, double *y, double sw)
{
    double cx = *x, cy = *y;
    long r = (long)ceil(4.0 * sw);
    for (int it = 0; it < 30; it++) {
        double sw_ = 0, sx = 0, sy = 0;
        long ix = (long)floor(cx - 0.5), iy = (long)floor(cy - 0.5);
        for (long j = iy - r; j <= iy + r; j++)
            for (long i = ix - r; i <= ix + r; i++) {
                if (i < 0 || j < 0 || i >= img->nx || j >= img->ny)
                    return -1;
                size_t k = (size_t)(j * img->nx + i);
                double v = img->pix[k] - (img->sky ? img->sky[k] : 0.0);
                if (!isfinite(v))
                    return -1;
                double px = (double)i + 1.0, py = (double)j + 1.0;
                double dx = px - cx, dy = py - cy;
                double w = exp(-(dx * dx + dy * dy) / (2 * sw * sw));
                sw_ += w * v;
                sx += w * v * dx;
                sy += w * v * dy;
            }
        if (!(sw_ > 0))
            return -1;
        double stx = 2.0 * sx / sw_, sty = 2.0 * sy / sw_;
        cx += stx;
        cy += sty;
        if (fabs(stx) < 1e-6 && fabs(sty) < 1e-6)
            break;
    }
    *x = cx;
    *y = cy;
    return 0;
}

/* Sum of img - sky in a circular aperture of radius rad around FITS (x, y);
 * NaN if the aperture touches a masked pixel or leaves the image. */
static AS_UNUSED double as_aperture(const hilal_image *img, double x, double y, double rad)
{
    double s = 0;
    long ix = (long)floor(x - 0.5), iy = (long)floor(y - 0.5), r = (long)ceil(rad) + 1;
    for (long j = iy - r; j <= iy + r; j++)
        for (long i = ix - r; i <= ix + r; i++) {
            double dx = (double)i + 1.0 - x, dy = (double)j + 1.0 - y;
            if (dx * dx + dy * dy > rad * rad)
                continue;
            if (i < 0 || j < 0 || i >= img->nx || j >= img->ny)
                return NAN;
            size_t k = (size_t)(j * img->nx + i);
            if (img->mask[k] & (HILAL_MASK_UNUSABLE | HILAL_MASK_EDGE))
                return NAN;
            s += img->pix[k] - (img->sky ? img->sky[k] : 0.0);
        }
    return s;
}

/* Whether star i is isolated: no other star brighter than frac x its flux
 * within dist px (reference positions). */
static AS_UNUSED int as_isolated(const as_pair *p, size_t i, double dist, double frac)
{
    for (size_t j = 0; j < p->n; j++) {
        if (j == i || p->flux[j] < frac * p->flux[i])
            continue;
        double dx = p->rx[j] - p->rx[i], dy = p->ry[j] - p->ry[i];
        if (dx * dx + dy * dy < dist * dist)
            return 0;
    }
    return 1;
}

#endif
