/* ZOGY on overlapping tiles, each with its own PSFs, blended without seams
 * (docs/zogy.md, "Tiles"). hilal_zogy_run_tiled() is what the subtract stage
 * calls:
 *  1. The frame is cut into a grid of about tile_px x tile_px cores. The
 *     PSF variation across the field is measured from the FWHM of the usable
 *     stars (a robust quadratic surface per image); without significant
 *     variation (or with one tile) the frame is subtracted in one piece.
 *  2. Each tile gets its own science and reference PSFs: the whole-frame
 *     PSF P_0 dilated by a factor s(x, y), a low-order polynomial fitted to
 *     the factor that best matches each bright star, wings included
 *     (field_scale_fit; a pixel-by-pixel regression of the stars' residuals
 *     when the stars cannot constrain s); a tile with too few stars nearby
 *     keeps the whole-frame PSFs, and says so.
 *  3. The flux ratio F_n is measured again with the tile PSFs (each star
 *     with the PSFs of its tile), because a PSF that does not match the
 *     stars biases PSF-fit fluxes differently in the two images.
 *  4. ZOGY runs on each window (hilal_zogy_run with a window: the image
 *     around the window is used as data, so windows need no artificial edge).
 *  5. Neighbouring tiles are blended with weights w that rise as sin^2 across
 *     the band (they sum to 1 everywhere). The flux, being an unbiased
 *     estimate in every tile, is blended linearly, flux = sum w_t flux_t, and
 *     its variance is the variance of that sum:
 *         Var(flux) = sum_t sum_u w_t w_u rho_tu e_t e_u,
 *     with e_t the tile's flux error and rho_tu the correlation of the two
 *     tiles' estimates from the same pixels (their matched filters overlap
 *     almost completely: rho ~ 0.99 for PSFs differing by 10%; computed from
 *     the kernels, hilal_zogy_correlation). S_corr = flux / flux_err, so it
 *     keeps unit variance across the band: treating the tiles as independent
 *     (dividing by sqrt(sum w^2)) would inflate it by up to sqrt(2) there.
 *     D is blended the same way with the correlation of the D filters:
 *     D = sum w_t D_t / sqrt(sum_t sum_u w_t w_u rho^D_tu); S = sum w_t S_t.
 *  6. Per tile: the PSF FWHMs, the flux ratio, the registration RMS of its
 *     stars and the median and standard deviation of the final S_corr in its
 *     core, flagged bad outside [scorr_std_min, scorr_std_max].
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hilal/align.h"
#include "hilal/log.h"
#include "hilal/psf.h"
#include "hilal/stats.h"
#include "hilal/zogy.h"
#include "linsolve.h"
#include "parallel.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void hilal_zogy_tiling_default(hilal_zogy_tiling *t)
{
    memset(t, 0, sizeof *t);
    t->tile_px = 512;
    t->overlap_px = 0;
    t->min_vary = 0.05;
    t->min_stars = 5;
    t->psf_degree = 2;
    t->psf_scale = 0.0;
    t->psf_max_stars = 500;
    t->scorr_std_min = 0.8;
    t->scorr_std_max = 1.25;
    t->match_radius_px = 1.5;
    t->refit_flux_ratio = 1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ------------------------------------------------------------------------
 * A PSF that varies across the field
 * ------------------------------------------------------------------------ */

#define FIELD_MAX_TERMS 6

/* Number of polynomial terms of a degree (1, 3, 6 for 0..2). */
static int field_nterms(int degree)
{
    return (degree + 1) * (degree + 2) / 2;
}

/* The PSF of an image as a function of position, from the residuals of its
 * stars against the whole-frame PSF P_0 (psf_field_fit), evaluated at any
 * point by a local polynomial regression (psf_field_eval). */
typedef struct psf_field {
    int size;           /* side of the stamps (that of P_0) */
    int n;              /* stars */
    float *res, *wt;    /* n residual stamps (size^2 each) and their weights */
    double *sx, *sy;    /* star positions, 0-based */
    double *bias;       /* size^2: mean residual of the stars P_0 was built from */
    double fwhm_px;     /* FWHM of P_0 (for the taper) */
    double extent_px;   /* half the larger side of the image */
    /* the dilation s(x, y) of P_0 (see psf_dilate): a polynomial of degree
     * sdeg (-1: none, s = 1) in the offsets from the image centre (cx, cy)
     * in units of extent_px, fitted to all the stars (scoef[0]) and to
     * the even and the odd ones of them (scoef[1], scoef[2]) */
    int sdeg;
    double cx, cy;
    double scoef[3][FIELD_MAX_TERMS];
} psf_field;

static void psf_field_free(psf_field *f)
{
    free(f->res);
    free(f->wt);
    free(f->sx);
    free(f->sy);
    free(f->bias);
    memset(f, 0, sizeof *f);
}

#define FIELD_PAD 6         /* beyond the Lanczos (a = 5) reach */
#define FIELD_MIN_STARS 20  /* fewer: no model */

static int pix_bad(const hilal_image *img, size_t i)
{
    return (img->mask != NULL && (img->mask[i] & HILAL_MASK_UNUSABLE)) || !isfinite(img->pix[i]) ||
           (img->var != NULL && !(img->var[i] > 0 && img->var[i] < 1e20)) ||
           (img->sky != NULL && !isfinite(img->sky[i]));
}

/* ------------------------------------------------------------------------
 * The width of the PSF across the field: P_0 dilated
 * ------------------------------------------------------------------------ */

/* Where seeing, focus or the optics change the PSF across a field, the
 * leading change is of its width. A pixel-by-pixel regression of star
 * residuals cannot follow it into the wings, where each star's pixels are
 * noise (those corrections are tapered off beyond a few FWHM, see
 * psf_field_eval), yet the wings of the brightest stars are what ZOGY
 * subtracts worst with a PSF that is too narrow or too broad there. So the
 * model is, at any position,
 *     P(x, y)(u) = P_0(u / s(x, y)) / s(x, y)^2  (+ core corrections),
 * the whole-frame PSF dilated by a factor s that is a low-order polynomial
 * of position, fitted to the factor s_k that best matches each bright star
 * (all of its pixels within FIELD_SCALE_RADIUS FWHM, wings included). */

#define FIELD_SCALE_STARS 200    /* the brightest stars fitted for s_k */
#define FIELD_SCALE_RADIUS 3.0   /* fitted pixels: within this many FWHM */
#define FIELD_SCALE_MIN 0.6      /* search range of s_k */
#define FIELD_SCALE_MAX 1.7

/* Lanczos-3 weights of the 6 samples around source coordinate u (0-based)
 * on an axis of n samples: taps first..first+5 (outside [0, n): weight 0),
 * renormalised to sum 1 over the taps inside. */
static int lanczos3_taps(double u, int n, double w[6])
{
    const double pi = 3.141592653589793;
    int first = (int)floor(u) - 2;
    double sum = 0;
    for (int k = 0; k < 6; k++) {
        int i = first + k;
        double t = u - (double)i, v;
        if (i < 0 || i >= n || fabs(t) >= 3.0)
            v = 0.0;
        else if (fabs(t) < 1e-9)
            v = 1.0;
        else
            v = 3.0 * sin(pi * t) * sin(pi * t / 3.0) / (pi * pi * t * t);
        w[k] = v;
        sum += v;
    }
    if (sum != 0)
        for (int k = 0; k < 6; k++)
            w[k] /= sum;
    return first;
}

/* out (ow x ow, centre pixel oc = ow / 2) = P_0 (S x S, centre S / 2)
 * dilated by s about its centre and moved by (dx, dy):
 *     out(i, j) = P_0(c + (i - oc - dx) / s, c + (j - oc - dy) / s) / s^2,
 * separably with Lanczos-3 interpolation (the map is a scaling along each
 * axis). tmp holds S x ow doubles. */
static void psf_dilate(const float *p0, int S, double s, double dx, double dy, int ow, double *tmp,
                       double *out)
{
    const int c = S / 2, oc = ow / 2;
    double wx[6], wy[6];
    /* along x, every row of P_0 */
    for (int i = 0; i < ow; i++) {
        int f = lanczos3_taps((double)c + ((double)(i - oc) - dx) / s, S, wx);
        for (int r = 0; r < S; r++) {
            const float *row = p0 + (size_t)r * (size_t)S;
            double v = 0;
            for (int k = 0; k < 6; k++)
                if (wx[k] != 0)
                    v += wx[k] * row[f + k];
            tmp[(size_t)r * (size_t)ow + (size_t)i] = v;
        }
    }
    /* along y */
    const double norm = 1.0 / (s * s);
    for (int j = 0; j < ow; j++) {
        int f = lanczos3_taps((double)c + ((double)(j - oc) - dy) / s, S, wy);
        double *orow = out + (size_t)j * (size_t)ow;
        for (int i = 0; i < ow; i++)
            orow[i] = 0;
        for (int k = 0; k < 6; k++) {
            if (wy[k] == 0)
                continue;
            const double *trow = tmp + (size_t)(f + k) * (size_t)ow;
            const double wk = wy[k] * norm;
            for (int i = 0; i < ow; i++)
                orow[i] += wk * trow[i];
        }
    }
}

/* Chi^2 of a star (box: ow x ow, image minus sky, its centre at the
 * central pixel plus (dx, dy); var: its variance) against P_0 dilated by s,
 * with the amplitude fitted (weighted least squares), over the pixels
 * within rfit of the centre. *amp receives the amplitude. */
static double scale_chi2(const float *p0, int S, const double *box, const double *var, int ow,
                         double dx, double dy, double rfit, double s, double *tmp, double *mod,
                         double *amp)
{
    psf_dilate(p0, S, s, dx, dy, ow, tmp, mod);
    const int oc = ow / 2;
    double sbm = 0, smm = 0, sbb = 0;
    for (int j = 0; j < ow; j++)
        for (int i = 0; i < ow; i++) {
            double rx = i - oc - dx, ry = j - oc - dy;
            if (rx * rx + ry * ry > rfit * rfit)
                continue;
            size_t p = (size_t)j * (size_t)ow + (size_t)i;
            double iv = 1.0 / var[p];
            sbm += box[p] * mod[p] * iv;
            smm += mod[p] * mod[p] * iv;
            sbb += box[p] * box[p] * iv;
        }
    if (!(smm > 0)) {
        *amp = NAN;
        return INFINITY;
    }
    *amp = sbm / smm;
    return sbb - sbm * sbm / smm;
}

/* The dilation s_k of one star that minimises scale_chi2: a golden-section
 * search over [FIELD_SCALE_MIN, FIELD_SCALE_MAX] (chi^2 is smooth and has
 * one minimum there for a star that is a PSF). Returns NaN when the
 * minimum lies on the edge of the range (not a PSF of this family). */
static double scale_fit(const float *p0, int S, const double *box, const double *var, int ow,
                        double dx, double dy, double rfit, double *tmp, double *mod)
{
    const double g = 0.6180339887498949;
    double a = FIELD_SCALE_MIN, b = FIELD_SCALE_MAX, amp;
    double x1 = b - g * (b - a), x2 = a + g * (b - a);
    double f1 = scale_chi2(p0, S, box, var, ow, dx, dy, rfit, x1, tmp, mod, &amp);
    double f2 = scale_chi2(p0, S, box, var, ow, dx, dy, rfit, x2, tmp, mod, &amp);
    while (b - a > 2e-3) {
        if (f1 < f2) {
            b = x2;
            x2 = x1;
            f2 = f1;
            x1 = b - g * (b - a);
            f1 = scale_chi2(p0, S, box, var, ow, dx, dy, rfit, x1, tmp, mod, &amp);
        } else {
            a = x1;
            x1 = x2;
            f1 = f2;
            x2 = a + g * (b - a);
            f2 = scale_chi2(p0, S, box, var, ow, dx, dy, rfit, x2, tmp, mod, &amp);
        }
    }
    double s = 0.5 * (a + b);
    if (s < FIELD_SCALE_MIN + 0.01 || s > FIELD_SCALE_MAX - 0.01 || !isfinite(f1) || !isfinite(f2))
        return NAN;
    return s;
}

/* A robust polynomial fit of values v at positions (x, y) scaled by unit
 * about (x0, y0), weights w: weighted least squares, then twice again
 * without the points beyond 3.5 robust sigma (1.4826 MAD) of the fit.
 * Only the points with use[k] (NULL: all). Returns 0 when it cannot. */
static int robust_poly(const double *x, const double *y, const double *v, const double *w,
                       const unsigned char *use, int n, int degree, double x0, double y0,
                       double unit, double *coef)
{
    const int nt = field_nterms(degree);
    double *res = malloc(sizeof *res * (size_t)(n + 1));
    unsigned char *keep = malloc((size_t)n + 1);
    int ok = 0;
    if (res == NULL || keep == NULL)
        goto cleanup;
    for (int k = 0; k < n; k++)
        keep[k] = (use == NULL || use[k]) && isfinite(v[k]) && w[k] > 0;
    for (int iter = 0; iter < 3; iter++) {
        double ata[FIELD_MAX_TERMS * FIELD_MAX_TERMS] = {0}, atb[FIELD_MAX_TERMS] = {0};
        int m = 0;
        for (int k = 0; k < n; k++) {
            if (!keep[k])
                continue;
            double t[FIELD_MAX_TERMS];
            hilal_poly2_terms(degree, (x[k] - x0) / unit, (y[k] - y0) / unit, t);
            for (int a = 0; a < nt; a++) {
                atb[a] += w[k] * t[a] * v[k];
                for (int b = 0; b < nt; b++)
                    ata[a * nt + b] += w[k] * t[a] * t[b];
            }
            m++;
        }
        if (m < 2 * nt || !hilal_linsolve(ata, atb, nt))
            goto cleanup;
        memcpy(coef, atb, sizeof *coef * (size_t)nt);
        ok = 1;
        /* the residuals of the kept points, and their robust scatter */
        int nr = 0;
        for (int k = 0; k < n; k++) {
            if (!keep[k])
                continue;
            double t[FIELD_MAX_TERMS], mod = 0;
            hilal_poly2_terms(degree, (x[k] - x0) / unit, (y[k] - y0) / unit, t);
            for (int a = 0; a < nt; a++)
                mod += coef[a] * t[a];
            res[nr++] = fabs(v[k] - mod);
        }
        double mad = hilal_median_double(res, (size_t)nr);
        double lim = 3.5 * 1.4826 * mad;
        if (!(lim > 0))
            break;
        for (int k = 0; k < n; k++) {
            if (!keep[k] && (use != NULL && !use[k]))
                continue;
            if (!((use == NULL || use[k]) && isfinite(v[k]) && w[k] > 0))
                continue;
            double t[FIELD_MAX_TERMS], mod = 0;
            hilal_poly2_terms(degree, (x[k] - x0) / unit, (y[k] - y0) / unit, t);
            for (int a = 0; a < nt; a++)
                mod += coef[a] * t[a];
            keep[k] = fabs(v[k] - mod) <= lim;
        }
    }
cleanup:
    free(res);
    free(keep);
    return ok;
}

/* Copies the W x W box of img (minus sky) whose central pixel is (ix, iy)
 * into box, and its variance into var (NULL: not wanted; without a variance
 * plane, s2sky). Returns 0 when a pixel is unusable or outside the image. */
static int star_box(const hilal_image *img, long ix, long iy, int W, double s2sky, float *box,
                    double *dbox, double *var)
{
    const int h = W / 2;
    if (ix - h < 0 || iy - h < 0 || ix + h >= img->nx || iy + h >= img->ny)
        return 0;
    for (long j = 0; j < W; j++)
        for (long i = 0; i < W; i++) {
            const size_t p = (size_t)(iy - h + j) * (size_t)img->nx + (size_t)(ix - h + i);
            if (pix_bad(img, p))
                return 0;
            double v = img->pix[p] - (img->sky ? img->sky[p] : 0.0f);
            if (box != NULL)
                box[j * W + i] = (float)v;
            if (dbox != NULL)
                dbox[j * W + i] = v;
            if (var != NULL) {
                double vv = img->var != NULL ? img->var[p] : s2sky;
                if (!(vv > 0 && isfinite(vv)))
                    return 0;
                var[j * W + i] = vv;
            }
        }
    return 1;
}

/* Whether a star may model the PSF across the field (usable, S/N >=
 * min_snr); its 0-based position and nearest pixel. */
static int field_star(const hilal_star *s, double min_snr, double *xc, double *yc, long *ix,
                      long *iy)
{
    if (!s->usable || !(s->flux_adu > 0) || !(s->flux_err_adu > 0) ||
        s->flux_adu / s->flux_err_adu < min_snr)
        return 0;
    *xc = s->x - 1.0;
    *yc = s->y - 1.0;
    *ix = lround(*xc);
    *iy = lround(*yc);
    return 1;
}

/* s(x, y) of a field (part -1: all stars, 0/1: the even/odd ones),
 * within the search range; 1 without a dilation model. */
static double field_scale(const psf_field *f, double x, double y, int part)
{
    if (f->sdeg < 0)
        return 1.0;
    double t[FIELD_MAX_TERMS], s = 0;
    const int nt = field_nterms(f->sdeg);
    hilal_poly2_terms(f->sdeg, (x - f->cx) / f->extent_px, (y - f->cy) / f->extent_px, t);
    for (int a = 0; a < nt; a++)
        s += f->scoef[part + 1][a] * t[a];
    if (!(s >= FIELD_SCALE_MIN))
        s = FIELD_SCALE_MIN;
    if (s > FIELD_SCALE_MAX)
        s = FIELD_SCALE_MAX;
    return s;
}

/* The dilation model of a field: s_k of up to FIELD_SCALE_STARS of the
 * brightest usable stars with flux / flux_err >= min_snr, and the
 * polynomials s(x, y) of the highest degree up to `degree` that 10 stars
 * per term support, weighted by min(S/N, 100)^2 (the brightest stars'
 * s_k are limited by how well P_0 describes them, not by their noise). */
static hilal_status field_scale_fit(const hilal_image *img, const hilal_starlist *stars,
                                    const hilal_psf *base, double min_snr, int degree,
                                    psf_field *f, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const int S = base->size;
    const double rfit = FIELD_SCALE_RADIUS * f->fwhm_px;
    const int ow = 2 * (int)ceil(rfit) + 5;
    double *box = malloc(sizeof *box * (size_t)ow * (size_t)ow);
    double *var = malloc(sizeof *var * (size_t)ow * (size_t)ow);
    double *mod = malloc(sizeof *mod * (size_t)ow * (size_t)ow);
    double *tmp = malloc(sizeof *tmp * (size_t)S * (size_t)ow);
    double *sx = malloc(sizeof *sx * FIELD_SCALE_STARS), *sy = malloc(sizeof *sy * FIELD_SCALE_STARS);
    double *sv = malloc(sizeof *sv * FIELD_SCALE_STARS), *sw = malloc(sizeof *sw * FIELD_SCALE_STARS);
    unsigned char *use = malloc(FIELD_SCALE_STARS);
    f->sdeg = -1;
    if (box == NULL || var == NULL || mod == NULL || tmp == NULL || sx == NULL || sy == NULL ||
        sv == NULL || sw == NULL || use == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the PSF width model");
        goto cleanup;
    }
    const double s2sky = isfinite(img->sky_rms_adu) && img->sky_rms_adu > 0
                             ? img->sky_rms_adu * img->sky_rms_adu
                             : NAN;
    int n = 0;
    for (size_t k = 0; k < stars->n && n < FIELD_SCALE_STARS; k++) {
        const hilal_star *s = &stars->stars[k];
        double xc, yc;
        long ix, iy;
        if (!field_star(s, min_snr, &xc, &yc, &ix, &iy) ||
            !star_box(img, ix, iy, ow, s2sky, NULL, box, var))
            continue;
        double v = scale_fit(base->data, S, box, var, ow, xc - (double)ix, yc - (double)iy, rfit,
                             tmp, mod);
        if (!isfinite(v))
            continue;
        double snr = s->flux_adu / s->flux_err_adu;
        sx[n] = xc;
        sy[n] = yc;
        sv[n] = v;
        sw[n] = snr < 100 ? snr * snr : 1e4;
        n++;
    }
    int deg = degree;
    while (deg > 0 && n < 10 * field_nterms(deg))
        deg--;
    if (n < FIELD_MIN_STARS)
        goto cleanup;
    int ok = 1;
    for (int part = -1; part < 2 && ok; part++) {
        for (int k = 0; k < n; k++)
            use[k] = part < 0 || k % 2 == part;
        ok = robust_poly(sx, sy, sv, sw, use, n, deg, f->cx, f->cy, f->extent_px, f->scoef[part + 1]);
    }
    if (ok)
        f->sdeg = deg;
cleanup:
    free(box);
    free(var);
    free(mod);
    free(tmp);
    free(sx);
    free(sy);
    free(sv);
    free(sw);
    free(use);
    return st;
}

/* The PSF of an image across the field. First the dilation model
 * (field_scale_fit); where it exists, the positions of the usable stars
 * with flux / flux_err >= min_snr (the brightest max_stars whose stamps
 * are unmasked and inside the image) are all that is kept. Otherwise the
 * residuals of those stars against P_0:
 *  1. P_0 is shifted (Lanczos, a = 5) to the star's sub-pixel position, the
 *     star (image minus sky) divided by its PSF-fit flux with P_0 and P_0
 *     subtracted; the residual is shifted back so that the star's centre
 *     falls on the central pixel.
 *     (Interpolation smooths what it shifts; moving the model and the small
 *     residual instead of the star keeps that smoothing out of the
 *     variation: it would make narrow PSFs look broader.) Its per-pixel
 *     weight is flux^2 / V (V from the variance plane).
 *  2. The mean residual of the brightest base->nstars stars (those P_0 was
 *     built from) is kept as the bias of this stacking against P_0's own
 *     (centroid errors broaden a plain stack): P_0 is the PSF where those
 *     stars are, and psf_field_eval subtracts it.
 * Fewer than FIELD_MIN_STARS stars: out->n = 0 (no model). */
static hilal_status psf_field_fit(const hilal_image *img, const hilal_starlist *stars,
                                  const hilal_psf *base, double min_snr, int max_stars, int degree,
                                  psf_field *out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    memset(out, 0, sizeof *out);
    out->sdeg = -1;
    const int S = base->size, W = S + 2 * FIELD_PAD;
    const size_t s2 = (size_t)S * (size_t)S;
    float *box = NULL, *shifted = NULL, *pmod = NULL;
    double *dbox = NULL, *dvar = NULL;
    int n = 0;
    if (stars == NULL || stars->n == 0 || base->data == NULL || S < 3 || max_stars < 1)
        return HILAL_OK;
    out->size = S;
    out->fwhm_px = isfinite(base->fwhm_px) && base->fwhm_px > 0 ? base->fwhm_px : S / 8.0;
    out->extent_px = 0.5 * (double)(img->nx > img->ny ? img->nx : img->ny);
    out->cx = 0.5 * (double)(img->nx - 1);
    out->cy = 0.5 * (double)(img->ny - 1);
    if ((st = field_scale_fit(img, stars, base, min_snr, degree, out, err)) != HILAL_OK)
        goto cleanup;
    /* the residual stamps only for the per-pixel model */
    const int pixel_model = out->sdeg < 0;
    box = malloc(sizeof *box * (size_t)W * (size_t)W);
    shifted = malloc(sizeof *shifted * (size_t)W * (size_t)W);
    dbox = malloc(sizeof *dbox * (size_t)W * (size_t)W);
    dvar = malloc(sizeof *dvar * (size_t)W * (size_t)W);
    pmod = malloc(sizeof *pmod * (size_t)W * (size_t)W);
    out->sx = malloc(sizeof *out->sx * (size_t)max_stars);
    out->sy = malloc(sizeof *out->sy * (size_t)max_stars);
    if (pixel_model) {
        out->res = malloc(sizeof *out->res * s2 * (size_t)max_stars);
        out->wt = malloc(sizeof *out->wt * s2 * (size_t)max_stars);
        out->bias = calloc(s2, sizeof *out->bias);
    }
    if (box == NULL || shifted == NULL || dbox == NULL || dvar == NULL || pmod == NULL ||
        out->sx == NULL || out->sy == NULL ||
        (pixel_model && (out->res == NULL || out->wt == NULL || out->bias == NULL))) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the PSF field");
        goto cleanup;
    }
    const double s2sky = isfinite(img->sky_rms_adu) && img->sky_rms_adu > 0
                             ? img->sky_rms_adu * img->sky_rms_adu
                             : NAN;
    /* 1. the residuals; the star list is sorted by decreasing flux */
    for (size_t k = 0; k < stars->n && n < max_stars; k++) {
        const hilal_star *s = &stars->stars[k];
        double xc, yc;
        long ix, iy;
        if (!field_star(s, min_snr, &xc, &yc, &ix, &iy) ||
            !star_box(img, ix, iy, W, s2sky, box, dbox, dvar))
            continue;
        double flux, flux_err;
        hilal_error e = {0};
        if (hilal_psf_fit_flux(img, base, s->x, s->y, &flux, &flux_err, &e) != HILAL_OK ||
            !(flux > 0) || !(flux / flux_err >= 0.5 * min_snr))
            continue;
        if (!pixel_model) {
            /* the dilation is the model: only the star's position counts
             * (stars near a tile, psf_field_eval's nused) */
            out->sx[n] = xc;
            out->sy[n] = yc;
            n++;
            continue;
        }
        const double dx = xc - (double)ix, dy = yc - (double)iy;
        /* P_0 moved to the star's position */
        memset(pmod, 0, sizeof *pmod * (size_t)W * (size_t)W);
        for (int j = 0; j < S; j++)
            memcpy(pmod + (size_t)(j + FIELD_PAD) * W + FIELD_PAD, base->data + (size_t)j * S,
                   sizeof *pmod * (size_t)S);
        if ((st = hilal_psf_shift(pmod, W, W, -dx, -dy, shifted, err)) != HILAL_OK)
            goto cleanup;
        for (size_t q = 0; q < (size_t)W * (size_t)W; q++)
            box[q] = (float)(box[q] / flux - shifted[q]);
        if ((st = hilal_psf_shift(box, W, W, dx, dy, shifted, err)) != HILAL_OK)
            goto cleanup;
        float *r = out->res + (size_t)n * s2, *w = out->wt + (size_t)n * s2;
        for (int j = 0; j < S; j++)
            for (int i = 0; i < S; i++) {
                const size_t q = (size_t)(j + FIELD_PAD) * (size_t)W + (size_t)(i + FIELD_PAD);
                double v = dvar[q];
                r[j * S + i] = shifted[q];
                w[j * S + i] = v > 0 && isfinite(v) ? (float)(flux * flux / v) : 0.0f;
            }
        out->sx[n] = xc;
        out->sy[n] = yc;
        n++;
    }
    out->n = n;
    if (n < FIELD_MIN_STARS) {
        out->n = 0;
        goto cleanup;
    }
    /* 2. the bias: per pixel, the weighted mean residual of P_0's stars,
     * again without the values beyond 4 sigma of the first mean */
    if (pixel_model) {
        int nb = base->nstars > 0 && base->nstars < n ? base->nstars : n;
        for (size_t p = 0; p < s2; p++) {
            double m = 0;
            for (int pass = 0; pass < 2; pass++) {
                double sw = 0, swr = 0;
                for (int k = 0; k < nb; k++) {
                    double w = out->wt[(size_t)k * s2 + p], r = out->res[(size_t)k * s2 + p];
                    if (w <= 0 || (pass == 1 && (r - m) * (r - m) * w > 16.0))
                        continue;
                    sw += w;
                    swr += w * r;
                }
                if (sw > 0)
                    m = swr / sw;
            }
            out->bias[p] = m;
        }
    }
cleanup:
    if (st != HILAL_OK || out->n == 0) {
        psf_field_free(out);
        out->sdeg = -1;
    }
    free(box);
    free(shifted);
    free(dbox);
    free(dvar);
    free(pmod);
    return st;
}

/* The PSF at (x, y) (0-based). With a dilation model (f->sdeg >= 0): P_0
 * dilated by s(x, y), nothing else. Per-pixel corrections on top of it are
 * left out because away from the centre of the star field the
 * regression extrapolates the noise of the stars' residuals into every
 * pixel (a few 1e-3 of the peak in the wings on simulated frames, enough
 * to leave a ring around every bright star), while the dilation alone
 * matches the stars to ~1% everywhere. Without one: per pixel, a
 * polynomial regression of the
 * residuals of the given degree in the star positions about (x, y), each
 * star weighted by its pixel weight and, for a local regression (LOESS;
 * Cleveland 1979; scale_px > 0), a Gaussian of its distance of standard
 * deviation scale_px (scale_px = 0: all stars alike, a global fit); twice, the
 * second time without the values beyond 4 sigma of the first fit
 * (neighbours, cosmic rays). The value at (x, y) minus the stacking bias is
 * the correction to P_0, tapered to 0 between 3 and 5 FWHM from the centre
 * (beyond, the fit is noise that would make the ZOGY kernels reach far:
 * P_0's wings, fitted by the psf stage, stay). A local regression adapts
 * to variations no low-order polynomial describes, where there are stars
 * enough. The sum is normalised to 1, shifted so that
 * its first moments vanish and its FWHM measured. *nused = stars within
 * near_px of (x, y) (may be NULL). */
static hilal_status psf_field_eval(const psf_field *f, const hilal_psf *base, double x, double y,
                                   int degree, double scale_px, double near_px, int part,
                                   int core_only, hilal_psf *out, int *nused, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const int S = f->size, c = S / 2;
    const size_t s2 = (size_t)S * (size_t)S;
    const int nt = field_nterms(degree);
    hilal_psf_clear(out);
    float *tmp = malloc(sizeof *tmp * s2);
    double *kw = malloc(sizeof *kw * (size_t)(f->n + 1));
    double *terms = malloc(sizeof *terms * (size_t)(f->n + 1) * (size_t)nt);
    int *idx = malloc(sizeof *idx * (size_t)(f->n + 1));
    double *dil = malloc(sizeof *dil * s2), *dtmp = malloc(sizeof *dtmp * s2);
    out->data = malloc(sizeof *out->data * s2);
    if (tmp == NULL || kw == NULL || terms == NULL || idx == NULL || dil == NULL || dtmp == NULL ||
        out->data == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a tile PSF");
        goto cleanup;
    }
    out->size = S;
    /* the stars that matter here, their distance weights and the terms,
     * in the offsets from (x, y) scaled by the scale (or by the frame's
     * size for a global fit) */
    const double unit = scale_px > 0 ? scale_px : f->extent_px;
    int m = 0;
    if (nused != NULL)
        *nused = 0;
    for (int k = 0; k < f->n; k++) {
        if (part >= 0 && k % 2 != part)
            continue;
        double du = (f->sx[k] - x) / unit, dv = (f->sy[k] - y) / unit;
        double g = scale_px > 0 ? exp(-0.5 * (du * du + dv * dv)) : 1.0;
        if (g < 1e-3)
            continue;
        if (nused != NULL && hypot(f->sx[k] - x, f->sy[k] - y) <= near_px)
            (*nused)++;
        idx[m] = k;
        kw[m] = g;
        hilal_poly2_terms(degree, du, dv, terms + (size_t)m * nt);
        m++;
    }
    /* P_0 dilated to the width here (itself without a dilation model) */
    if (f->sdeg >= 0) {
        psf_dilate(base->data, S, field_scale(f, x, y, part), 0.0, 0.0, S, dtmp, dil);
    } else {
        for (size_t p = 0; p < s2; p++)
            dil[p] = base->data[p];
    }
    const double fw = f->fwhm_px, r1 = 3.0 * fw, r2 = 5.0 * fw;
    double sum = 0;
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            const size_t p = (size_t)j * S + i;
            double r = hypot((double)(i - c), (double)(j - c)), taper = 1.0;
            if (r >= r2 || (core_only && r > 2.0 * fw))
                taper = 0.0;
            else if (r > r1)
                taper = 0.5 * (1.0 + cos(3.141592653589793 * (r - r1) / (r2 - r1)));
            double corr = 0;
            if (taper > 0 && m > 0 && f->sdeg < 0) {
                double coef[FIELD_MAX_TERMS] = {0};
                int have = 0;
                for (int pass = 0; pass < 2; pass++) {
                    double ata[FIELD_MAX_TERMS * FIELD_MAX_TERMS] = {0}, atb[FIELD_MAX_TERMS] = {0};
                    for (int q = 0; q < m; q++) {
                        const int k = idx[q];
                        double w = f->wt[(size_t)k * s2 + p], rv = f->res[(size_t)k * s2 + p];
                        if (w <= 0)
                            continue;
                        const double *t = terms + (size_t)q * nt;
                        if (have) {
                            double mod = 0;
                            for (int a = 0; a < nt; a++)
                                mod += coef[a] * t[a];
                            if ((rv - mod) * (rv - mod) * w > 16.0)
                                continue;
                        }
                        w *= kw[q];
                        for (int a = 0; a < nt; a++) {
                            atb[a] += w * t[a] * rv;
                            for (int b = 0; b < nt; b++)
                                ata[a * nt + b] += w * t[a] * t[b];
                        }
                    }
                    if (!hilal_linsolve(ata, atb, nt))
                        break;
                    memcpy(coef, atb, sizeof *coef * (size_t)nt);
                    have = 1;
                }
                /* the constant term is the fit at (x, y) */
                if (have)
                    corr = taper * (coef[0] - f->bias[p]);
            }
            double v = dil[p] + corr;
            out->data[p] = (float)v;
            sum += v;
        }
    if (!(sum > 0)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "the PSF model at (%.0f, %.0f) has no positive flux", x + 1, y + 1);
        goto cleanup;
    }
    for (size_t p = 0; p < s2; p++)
        out->data[p] = (float)(out->data[p] / sum);
    /* centre it: a feature at dx moves to 0 with a shift by dx */
    double dx, dy;
    hilal_psf_centroid(out, &dx, &dy);
    if (fabs(dx) > 1e-3 || fabs(dy) > 1e-3) {
        if (fabs(dx) > 2 || fabs(dy) > 2) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "the PSF model at (%.0f, %.0f) is off centre by (%.2f, %.2f) px",
                                 x + 1, y + 1, dx, dy);
            goto cleanup;
        }
        if ((st = hilal_psf_shift(out->data, S, S, dx, dy, tmp, err)) != HILAL_OK)
            goto cleanup;
        sum = 0;
        for (size_t p = 0; p < s2; p++)
            sum += tmp[p];
        for (size_t p = 0; p < s2; p++)
            out->data[p] = (float)(tmp[p] / sum);
    }
    out->fwhm_px = hilal_psf_measure_fwhm(out->data, NULL, S, S, S / 2, S / 2, S / 2);
    out->nstars = m;
cleanup:
    if (st != HILAL_OK)
        hilal_psf_clear(out);
    free(tmp);
    free(kw);
    free(terms);
    free(idx);
    free(dil);
    free(dtmp);
    return st;
}

/* ------------------------------------------------------------------------
 * Tile geometry and weights
 * ------------------------------------------------------------------------ */

/* Along one axis, tile i has a centre c_i, where its PSFs and flux ratio
 * are evaluated, and a core [b_i, b_{i+1}) (the cores partition [0, n),
 * for the records). Its products are weighted either
 *  - (nodes: overlap 0 or at least the tile size) linearly between the
 *    centres, which form a regular grid from the first pixel to the last
 *    (m = round(n / tile_px) + 1 of them): 1 at c_i, 0 at c_{i-1} and
 *    c_{i+1}; the window spans [c_{i-1}, c_{i+1}] and the core is the part
 *    nearer to c_i than to any other centre. The products are interpolated
 *    bilinearly between the grid of PSFs, so that a PSF that changes
 *    linearly between two centres leaves, to first order, no residual;
 *  - (band) 1 over the core (round(n / tile_px) equal cores, centred on
 *    c_i) and sin^2 / cos^2 across a band of width 2 hb centred on each
 *    boundary. The window is the core widened by hb. Cheaper, but the PSF
 *    is constant across each core.
 * Either way the weights of all tiles sum to 1 at every pixel, and at most
 * two tiles have a weight at any pixel. */
typedef struct axis_tiles {
    long n;         /* frame size along the axis */
    long nt;        /* tiles */
    int tent;       /* 1: nodes, linear interpolation between the centres */
    long hb;        /* band mode: half-width of the blending band */
    long *b;        /* core boundaries b[0] = 0 < ... < b[nt] = n */
    double *c;      /* centres, 0-based pixels */
} axis_tiles;

static double axis_centre(const axis_tiles *a, long i)
{
    return a->c[i];
}

/* The number of tiles along an axis of n pixels. */
static long axis_count(long n, long tile_px, long overlap)
{
    long k = (long)llround((double)n / (double)tile_px);
    int tent = overlap <= 0 || overlap >= tile_px;
    if (tent)
        return k >= 1 && n > 2 ? k + 1 : 1;
    return k < 1 ? 1 : k;
}

static void axis_setup(axis_tiles *a, long n, long nt, long tile_px, long overlap)
{
    a->n = n;
    a->nt = nt;
    a->tent = nt > 1 && (overlap <= 0 || overlap >= tile_px);
    a->hb = 0;
    if (a->tent) {
        for (long i = 0; i < nt; i++)
            a->c[i] = (double)(n - 1) * (double)i / (double)(nt - 1);
        a->b[0] = 0;
        for (long i = 1; i < nt; i++)
            a->b[i] = (long)ceil(0.5 * (a->c[i - 1] + a->c[i]));
        a->b[nt] = n;
        return;
    }
    for (long i = 0; i <= nt; i++)
        a->b[i] = (long)llround((double)n * (double)i / (double)nt);
    long core_min = n;
    for (long i = 0; i < nt; i++) {
        a->c[i] = 0.5 * (double)(a->b[i] + a->b[i + 1] - 1);
        if (a->b[i + 1] - a->b[i] < core_min)
            core_min = a->b[i + 1] - a->b[i];
    }
    /* the bands of a core's two sides must not meet */
    a->hb = nt > 1 ? overlap / 2 : 0;
    if (a->hb > core_min / 2)
        a->hb = core_min / 2;
}

/* Window of tile i: [lo, hi). */
static void axis_window(const axis_tiles *a, long i, long *lo, long *hi)
{
    if (a->tent) {
        *lo = i > 0 ? (long)floor(axis_centre(a, i - 1)) + 1 : 0;
        *hi = i < a->nt - 1 ? (long)ceil(axis_centre(a, i + 1)) : a->n;
        return;
    }
    *lo = a->b[i] - a->hb > 0 ? a->b[i] - a->hb : 0;
    *hi = a->b[i + 1] + a->hb < a->n ? a->b[i + 1] + a->hb : a->n;
}

/* Weight of tile i at pixel x. */
static double axis_weight(const axis_tiles *a, long i, long x)
{
    const double halfpi = 1.5707963267948966;
    if (a->nt == 1)
        return 1.0;
    if (a->tent) {
        double c = axis_centre(a, i), xx = (double)x;
        if (xx <= c) {
            if (i == 0)
                return 1.0;
            double c0 = axis_centre(a, i - 1);
            return xx <= c0 ? 0.0 : (xx - c0) / (c - c0);
        }
        if (i == a->nt - 1)
            return 1.0;
        double c1 = axis_centre(a, i + 1);
        return xx >= c1 ? 0.0 : (c1 - xx) / (c1 - c);
    }
    if (a->hb <= 0)
        return (x >= a->b[i] && x < a->b[i + 1]) ? 1.0 : 0.0;
    double w = 1.0;
    if (i > 0) {
        double t = ((double)x + 0.5 - (double)(a->b[i] - a->hb)) / (2.0 * (double)a->hb);
        if (t <= 0)
            return 0.0;
        if (t < 1) {
            double s = sin(halfpi * t);
            w *= s * s;
        }
    }
    if (i < a->nt - 1) {
        double t = ((double)x + 0.5 - (double)(a->b[i + 1] - a->hb)) / (2.0 * (double)a->hb);
        if (t >= 1)
            return 0.0;
        if (t > 0) {
            double c = cos(halfpi * t);
            w *= c * c;
        }
    }
    return w;
}

/* The core holding pixel x. */
static long axis_core(const axis_tiles *a, long x)
{
    long i = 0;
    while (i < a->nt - 1 && x >= a->b[i + 1])
        i++;
    return i;
}

/* The (at most two) tiles with a non-zero weight at pixel x. */
static int axis_cover(const axis_tiles *a, long x, long idx[2], double w[2])
{
    long i = axis_core(a, x);
    int k = 0;
    for (long j = i - 1; j <= i + 1; j++) {
        if (j < 0 || j >= a->nt)
            continue;
        double wj = axis_weight(a, j, x);
        if (wj > 0 && k < 2) {
            idx[k] = j;
            w[k] = wj;
            k++;
        }
    }
    return k;
}

/* ------------------------------------------------------------------------
 * Tile PSFs and flux ratio
 * ------------------------------------------------------------------------ */

/* Robust flux ratio r = F_sci / F_ref of star pairs: the weighted
 * least-squares slope through the origin with weights 1 / (e_s^2 + r^2
 * e_r^2) (errors in both), starting from the median ratio, with pairs whose
 * normalised residual exceeds clip x max(1, robust scatter) rejected,
 * iterated. Error: the formal one, scaled by sqrt(chi^2 / (n - 1)) when
 * larger than 1. Returns the pairs kept (0: r NaN). */
static int robust_ratio(const double *fs, const double *es, const double *fr, const double *er,
                        size_t n, double clip, double *r, double *rerr)
{
    *r = *rerr = NAN;
    if (n < 3)
        return 0;
    double *tmp = malloc(sizeof *tmp * n);
    unsigned char *keep = malloc(n);
    int nk = 0;
    if (tmp == NULL || keep == NULL)
        goto cleanup;
    for (size_t i = 0; i < n; i++)
        tmp[i] = fs[i] / fr[i];
    double ratio = hilal_median_double(tmp, n);
    for (size_t i = 0; i < n; i++)
        keep[i] = 1;
    for (int it = 0; it < 10; it++) {
        /* normalised residuals and their robust scatter */
        for (size_t i = 0; i < n; i++)
            tmp[i] = fabs(fs[i] - ratio * fr[i]) / sqrt(es[i] * es[i] + ratio * ratio * er[i] * er[i]);
        double *t2 = malloc(sizeof *t2 * n);
        if (t2 == NULL)
            goto cleanup;
        memcpy(t2, tmp, sizeof *t2 * n);
        double sig = 1.4826 * hilal_median_double(t2, n);
        free(t2);
        double lim = clip * (sig > 1 ? sig : 1);
        double swf = 0, sww = 0, chi = 0;
        int m = 0, changed = 0;
        for (size_t i = 0; i < n; i++) {
            unsigned char k = tmp[i] <= lim;
            changed |= k != keep[i];
            keep[i] = k;
        }
        for (size_t i = 0; i < n; i++) {
            if (!keep[i])
                continue;
            double w = 1.0 / (es[i] * es[i] + ratio * ratio * er[i] * er[i]);
            swf += w * fs[i] * fr[i];
            sww += w * fr[i] * fr[i];
            m++;
        }
        if (m < 3 || !(sww > 0))
            goto cleanup;
        double next = swf / sww;
        for (size_t i = 0; i < n; i++)
            if (keep[i]) {
                double d = fs[i] - next * fr[i];
                chi += d * d / (es[i] * es[i] + next * next * er[i] * er[i]);
            }
        double e = 1.0 / sqrt(sww), scale = sqrt(chi / (m - 1));
        *r = next;
        *rerr = e * (scale > 1 ? scale : 1);
        nk = m;
        int stable = fabs(next - ratio) < 1e-6 * fabs(next) && !changed;
        ratio = next;
        if (stable)
            break;
    }
cleanup:
    free(tmp);
    free(keep);
    return nk;
}

/* The stars of both images matched (mutual nearest neighbours within
 * radius) and measured with the PSFs of the tile whose core holds them. */
typedef struct pairs {
    size_t n, cap;
    double *fs, *es, *fr, *er;
    long *tile;
} pairs;

static int pairs_push(pairs *p, double fs, double es, double fr, double er, long tile)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 256;
        double *a = realloc(p->fs, sizeof *a * cap);
        if (a == NULL)
            return 0;
        p->fs = a;
        if ((a = realloc(p->es, sizeof *a * cap)) == NULL)
            return 0;
        p->es = a;
        if ((a = realloc(p->fr, sizeof *a * cap)) == NULL)
            return 0;
        p->fr = a;
        if ((a = realloc(p->er, sizeof *a * cap)) == NULL)
            return 0;
        p->er = a;
        long *t = realloc(p->tile, sizeof *t * cap);
        if (t == NULL)
            return 0;
        p->tile = t;
        p->cap = cap;
    }
    p->fs[p->n] = fs;
    p->es[p->n] = es;
    p->fr[p->n] = fr;
    p->er[p->n] = er;
    p->tile[p->n] = tile;
    p->n++;
    return 1;
}

static void pairs_free(pairs *p)
{
    free(p->fs);
    free(p->es);
    free(p->fr);
    free(p->er);
    free(p->tile);
    memset(p, 0, sizeof *p);
}

/* Nearest usable star of list b to (x, y) within radius among those with
 * indices in idx[0..m); -1 if none. */
static long nearest(const hilal_starlist *b, const long *idx, long m, double x, double y,
                    double radius)
{
    long best = -1;
    double bd = radius * radius;
    for (long k = 0; k < m; k++) {
        const hilal_star *s = &b->stars[idx[k]];
        double d = (s->x - x) * (s->x - x) + (s->y - y) * (s->y - y);
        if (d <= bd) {
            bd = d;
            best = idx[k];
        }
    }
    return best;
}

#define MAX_PAIRS_PER_TILE 300
#define PAIR_MIN_SNR 20.0

/* Matches and measures the stars of tile t (core [x0, x1) x [y0, y1)). */
static hilal_status tile_pairs(const hilal_image *sci, const hilal_image *ref,
                               const hilal_starlist *ss, const hilal_starlist *rs,
                               const hilal_psf *ps, const hilal_psf *pr, long x0, long y0, long x1,
                               long y1, double radius, long t, pairs *out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    long *is = malloc(sizeof *is * (ss->n + 1)), *ir = malloc(sizeof *ir * (rs->n + 1));
    long ns = 0, nr = 0;
    if (is == NULL || ir == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory matching tile stars");
        goto cleanup;
    }
    /* usable stars of the core (the reference ones within the match radius
     * of it); the lists are sorted by decreasing flux */
    for (size_t i = 0; i < ss->n && ns < 4 * MAX_PAIRS_PER_TILE; i++) {
        const hilal_star *s = &ss->stars[i];
        double x = s->x - 1.0, y = s->y - 1.0;
        if (s->usable && x >= x0 && x < x1 && y >= y0 && y < y1)
            is[ns++] = (long)i;
    }
    for (size_t i = 0; i < rs->n; i++) {
        const hilal_star *s = &rs->stars[i];
        double x = s->x - 1.0, y = s->y - 1.0;
        if (s->usable && x >= x0 - radius && x < x1 + radius && y >= y0 - radius &&
            y < y1 + radius)
            ir[nr++] = (long)i;
    }
    int npairs = 0;
    for (long k = 0; k < ns && npairs < MAX_PAIRS_PER_TILE; k++) {
        const hilal_star *a = &ss->stars[is[k]];
        long j = nearest(rs, ir, nr, a->x, a->y, radius);
        if (j < 0 || nearest(ss, is, ns, rs->stars[j].x, rs->stars[j].y, radius) != is[k])
            continue;
        double fs, es, fr, er;
        hilal_error e1 = {0}, e2 = {0};
        if (hilal_psf_fit_flux(sci, ps, a->x, a->y, &fs, &es, &e1) != HILAL_OK ||
            hilal_psf_fit_flux(ref, pr, rs->stars[j].x, rs->stars[j].y, &fr, &er, &e2) != HILAL_OK)
            continue;
        if (!(fs > 0 && fr > 0 && es > 0 && er > 0) || fs / es < PAIR_MIN_SNR ||
            fr / er < PAIR_MIN_SNR)
            continue;
        if (!pairs_push(out, fs, es, fr, er, t)) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory matching tile stars");
            goto cleanup;
        }
        npairs++;
    }
cleanup:
    free(is);
    free(ir);
    return st;
}

/* ------------------------------------------------------------------------
 * Blending
 * ------------------------------------------------------------------------ */

typedef struct blend {
    const axis_tiles *ax, *ay;
    long nx, ny;
    long ntiles;
    const long *wx0, *wy0, *wnx; /* windows per tile */
    float **terr;                /* flux error plane of each tile (window-sized) */
    const double *rho_s, *rho_d; /* ntiles x ntiles correlations */
    hilal_diff *out;             /* d, s, flux hold the weighted sums on entry */
} blend;

/* Final values of rows [lo, hi): flux_err from the correlated sum of the
 * tiles' errors, S_corr = flux / flux_err, D renormalised. */
static void blend_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    const blend *b = ctx;
    const long ntx = b->ax->nt;
    for (long y = lo; y < hi; y++) {
        long jy[2];
        double wyv[2];
        int ky = axis_cover(b->ay, y, jy, wyv);
        for (long x = 0; x < b->nx; x++) {
            long ix[2];
            double wxv[2];
            int kx = axis_cover(b->ax, x, ix, wxv);
            long t[4];
            double w[4], e[4];
            int k = 0;
            for (int p = 0; p < ky; p++)
                for (int q = 0; q < kx; q++) {
                    long tt = jy[p] * ntx + ix[q];
                    t[k] = tt;
                    w[k] = wyv[p] * wxv[q];
                    e[k] = b->terr[tt][(size_t)(y - b->wy0[tt]) * (size_t)b->wnx[tt] +
                                       (size_t)(x - b->wx0[tt])];
                    k++;
                }
            double vf = 0, vd = 0;
            for (int p = 0; p < k; p++)
                for (int q = 0; q < k; q++) {
                    double rs = p == q ? 1.0 : b->rho_s[t[p] * b->ntiles + t[q]];
                    double rd = p == q ? 1.0 : b->rho_d[t[p] * b->ntiles + t[q]];
                    vf += w[p] * w[q] * rs * e[p] * e[q];
                    vd += w[p] * w[q] * rd;
                }
            size_t i = (size_t)y * (size_t)b->nx + (size_t)x;
            double fe = sqrt(vf > 0 ? vf : 0);
            b->out->flux_err[i] = (float)fe;
            b->out->scorr[i] = fe > 0 ? (float)(b->out->flux[i] / fe) : 0.0f;
            if (vd > 0)
                b->out->d[i] = (float)(b->out->d[i] / sqrt(vd));
        }
    }
}

/* ------------------------------------------------------------------------
 * The driver
 * ------------------------------------------------------------------------ */

static void tile_record_flag(hilal_diff_tile *t, const hilal_zogy_tiling *tp)
{
    t->bad = isfinite(t->scorr_std) &&
             (t->scorr_std < tp->scorr_std_min || t->scorr_std > tp->scorr_std_max);
}

/* Registration RMS of the stars of a region (FITS 1-based bounds). */
static void region_rms(const hilal_starlist *ss, const hilal_starlist *rs, long x0, long y0,
                       long x1, long y1, double radius, hilal_diff_tile *t)
{
    t->reg_rms_x_px = t->reg_rms_y_px = NAN;
    t->reg_nmatch = 0;
    if (ss == NULL || rs == NULL)
        return;
    hilal_error e = {0};
    double rx, ry;
    int nm = 0;
    if (hilal_align_region_rms(ss, rs, (double)x0 + 0.5, (double)y0 + 0.5, (double)x1 + 0.5,
                               (double)y1 + 0.5, radius, &rx, &ry, &nm, &e) == HILAL_OK) {
        t->reg_rms_x_px = rx;
        t->reg_rms_y_px = ry;
        t->reg_nmatch = nm;
    }
}

static hilal_status stats_radius(const hilal_diff *d, long *radius)
{
    double fw = isfinite(d->psf_d.fwhm_px) ? d->psf_d.fwhm_px : 3.0;
    *radius = (long)ceil(2.0 * fw);
    if (*radius < 3)
        *radius = 3;
    return HILAL_OK;
}

/* The frame in one piece, with its one tile record. */
static hilal_status run_whole(const hilal_zogy_input *in, const hilal_zogy_tiling *tp,
                              const hilal_starlist *ss, const hilal_starlist *rs, hilal_diff *out,
                              hilal_zogy_tiled_info *tinfo, hilal_error *err)
{
    hilal_status st = hilal_zogy_run(in, out, &tinfo->zogy, err);
    if (st != HILAL_OK)
        return st;
    out->ntiles_x = out->ntiles_y = 1;
    out->tiles = calloc(1, sizeof *out->tiles);
    if (out->tiles == NULL) {
        hilal_diff_clear(out);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the tile record");
    }
    hilal_diff_tile *t = &out->tiles[0];
    t->x0 = t->y0 = t->wx0 = t->wy0 = 0;
    t->nx = t->wnx = out->nx;
    t->ny = t->wny = out->ny;
    t->fwhm_sci_px = in->sci_psf->fwhm_px;
    t->fwhm_ref_px = in->ref_psf->fwhm_px;
    t->fwhm_d_px = out->psf_d.fwhm_px;
    t->nstars_sci = in->sci_psf->nstars;
    t->nstars_ref = in->ref_psf->nstars;
    t->psf_whole_frame = 1;
    t->flux_ratio = in->flux_ratio;
    t->flux_ratio_tile = NAN;
    t->flux_ratio_nstars = 0;
    region_rms(ss, rs, 0, 0, out->nx, out->ny, tp->match_radius_px, t);
    t->scorr_std_model = tinfo->zogy.scorr_std_model;
    t->noise_scale = tinfo->zogy.noise_scale;
    t->scorr_median = out->scorr_mean;
    t->scorr_std = out->scorr_std;
    tile_record_flag(t, tp);
    tinfo->flux_ratio = in->flux_ratio;
    tinfo->ntiles = 1;
    tinfo->ntiles_bad = t->bad;
    return HILAL_OK;
}

hilal_status hilal_zogy_run_tiled(const hilal_zogy_input *in, const hilal_zogy_tiling *tp,
                                  const hilal_starlist *sci_stars,
                                  const hilal_starlist *ref_stars,
                                  const hilal_psf_build_params *psf_params, hilal_diff *out,
                                  hilal_zogy_tiled_info *tinfo_out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    double t0 = now_s(), tm[5] = {0};
    hilal_zogy_tiled_info tinfo;
    memset(&tinfo, 0, sizeof tinfo);
    tinfo.fwhm_vary_sci = tinfo.fwhm_vary_ref = NAN;
    tinfo.flux_ratio = NAN;
    memset(out, 0, sizeof *out);
    axis_tiles ax = {0}, ay = {0};
    hilal_psf *psfs = NULL; /* 2 per tile: science, reference */
    int *psf_ok = NULL;
    long *wx0 = NULL, *wy0 = NULL, *wnx = NULL, *wny = NULL;
    float **terr = NULL;
    double *rho_s = NULL, *rho_d = NULL;
    pairs pr = {0};
    hilal_diff td;
    memset(&td, 0, sizeof td);
    long nt = 0;
    psf_field field[2];
    memset(field, 0, sizeof field);
    double scale_px = 0, spacing_px = 0;

    if (in == NULL || in->sci == NULL || in->ref == NULL || tp == NULL) {
        st = hilal_error_set(err, HILAL_ERR_INTERNAL, "tiled ZOGY called without inputs");
        goto cleanup;
    }
    hilal_psf_build_params pdef;
    hilal_psf_build_params_default(&pdef);
    const hilal_psf_build_params *pp = psf_params != NULL ? psf_params : &pdef;
    const long nx = in->sci->nx, ny = in->sci->ny;

    /* ---- 1. The grid, and whether to use it ---- */
    long ntx = 1, nty = 1;
    if (tp->tile_px > 0 && in->win_nx == 0 && in->win_ny == 0) {
        ntx = axis_count(nx, tp->tile_px, tp->overlap_px);
        nty = axis_count(ny, tp->tile_px, tp->overlap_px);
        ntx = ntx < 1 ? 1 : ntx;
        nty = nty < 1 ? 1 : nty;
    }
    int tiled = ntx * nty > 1 && sci_stars != NULL && ref_stars != NULL;
    /* A PSF that is a model (supplied by the user, or the analytic fallback
     * of an image with too few stars: nstars 0) is taken as given across
     * the field: the stars cannot refine it. */
    if (tiled && (in->sci_psf == NULL || in->ref_psf == NULL || in->sci_psf->nstars == 0 ||
                  in->ref_psf->nstars == 0)) {
        hilal_log(HILAL_LOG_DEBUG, "subtract: a PSF is a model (supplied or analytic): one piece");
        tiled = 0;
    }
    nt = ntx * nty;
    const hilal_psf *psf_whole[2] = {in->sci_psf, in->ref_psf};
    const hilal_image *img[2] = {in->sci, in->ref};
    const hilal_starlist *stars[2] = {sci_stars, ref_stars};
    if (tiled) {
        ax.b = malloc(sizeof *ax.b * (size_t)(ntx + 1));
        ay.b = malloc(sizeof *ay.b * (size_t)(nty + 1));
        ax.c = malloc(sizeof *ax.c * (size_t)ntx);
        ay.c = malloc(sizeof *ay.c * (size_t)nty);
        psfs = calloc((size_t)(2 * nt), sizeof *psfs);
        psf_ok = calloc((size_t)(2 * nt), sizeof *psf_ok);
        wx0 = malloc(sizeof *wx0 * (size_t)nt);
        wy0 = malloc(sizeof *wy0 * (size_t)nt);
        wnx = malloc(sizeof *wnx * (size_t)nt);
        wny = malloc(sizeof *wny * (size_t)nt);
        terr = calloc((size_t)nt, sizeof *terr);
        rho_s = calloc((size_t)(nt * nt), sizeof *rho_s);
        rho_d = calloc((size_t)(nt * nt), sizeof *rho_d);
        if (ax.b == NULL || ay.b == NULL || ax.c == NULL || ay.c == NULL || psfs == NULL || psf_ok == NULL || wx0 == NULL ||
            wy0 == NULL || wnx == NULL || wny == NULL || terr == NULL || rho_s == NULL ||
            rho_d == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %ld tiles", nt);
            goto cleanup;
        }
        axis_setup(&ax, nx, ntx, tp->tile_px, tp->overlap_px);
        axis_setup(&ay, ny, nty, tp->tile_px, tp->overlap_px);
        /* the spacing of the tile centres, and the scale of the local PSF
         * fits in it (0: global) */
        spacing_px = 0.5 * ((ntx > 1 ? ax.c[1] - ax.c[0] : (double)nx) +
                            (nty > 1 ? ay.c[1] - ay.c[0] : (double)ny));
        scale_px = tp->psf_scale > 0 ? tp->psf_scale * spacing_px : 0.0;

        /* ---- 2. The PSF across the field, at every tile ---- */
        for (int w = 0; w < 2 && tiled; w++) {
            st = psf_field_fit(img[w], stars[w], psf_whole[w], pp->min_snr, tp->psf_max_stars,
                               tp->psf_degree,
                               &field[w], err);
            if (st != HILAL_OK) {
                hilal_error_context(err, "%s PSF across the field", w == 0 ? "science" : "reference");
                goto cleanup;
            }
        }
        if (field[0].n == 0 && field[1].n == 0)
            tiled = 0; /* too few stars to see a variation */
    }
    int deg[2] = {0, 0};
    if (tiled) {
        /* the degree the stars support: 10 per term */
        for (int w = 0; w < 2; w++) {
            deg[w] = tp->psf_degree;
            while (deg[w] > 0 && field[w].n < 10 * field_nterms(deg[w]))
                deg[w]--;
        }
        /* Whether the PSF varies: the model's FWHM at 9 tiles (the corners,
         * the middles of the sides and the centre of the grid), from all the
         * stars and from each half of them. Only the core is needed for a
         * FWHM (core_only). The variation, (max - min) / median, must stand
         * out of the noise of the model: the FWHMs from two halves of the
         * stars differ by twice the noise of the whole set's model (in
         * quadrature), so sigma = rms(half difference) / 2; the range of 9
         * values of pure noise is about 3 sigma, and a variation is taken as
         * real beyond 6 sigma (and min_vary). */
        double fw[2][9], dsum[2] = {0, 0}, vary[2], noise[2];
        int nfw[2] = {0, 0}, nd[2] = {0, 0}, real[2] = {0, 0};
        const long px[3] = {0, ntx / 2, ntx - 1}, py[3] = {0, nty / 2, nty - 1};
        for (int w = 0; w < 2; w++) {
            if (field[w].n == 0)
                continue;
            for (int q = 0; q < 9; q++) {
                double xc = axis_centre(&ax, px[q % 3]), yc = axis_centre(&ay, py[q / 3]);
                hilal_psf m[3];
                memset(m, 0, sizeof m);
                hilal_status s3 = HILAL_OK;
                for (int h = -1; h < 2 && s3 == HILAL_OK; h++) {
                    hilal_error e1 = {0};
                    s3 = psf_field_eval(&field[w], psf_whole[w], xc, yc, deg[w], scale_px, 0, h,
                                        1, &m[h + 1], NULL, &e1);
                    if (s3 != HILAL_OK && s3 != HILAL_ERR_DATA)
                        hilal_error_set(err, s3, "%s", e1.msg);
                }
                if (s3 != HILAL_OK && s3 != HILAL_ERR_DATA) {
                    for (int h = 0; h < 3; h++)
                        hilal_psf_clear(&m[h]);
                    st = s3;
                    goto cleanup;
                }
                if (s3 == HILAL_OK && isfinite(m[0].fwhm_px)) {
                    fw[w][nfw[w]++] = m[0].fwhm_px;
                    double d = m[1].fwhm_px - m[2].fwhm_px;
                    if (isfinite(d)) {
                        dsum[w] += d * d;
                        nd[w]++;
                    }
                } else {
                    /* a half too sparse to make a PSF: the model is noise */
                    dsum[w] += psf_whole[w]->fwhm_px * psf_whole[w]->fwhm_px;
                    nd[w]++;
                }
                for (int h = 0; h < 3; h++)
                    hilal_psf_clear(&m[h]);
            }
        }
        for (int w = 0; w < 2; w++) {
            vary[w] = noise[w] = NAN;
            if (nfw[w] >= 2) {
                qsort(fw[w], (size_t)nfw[w], sizeof fw[w][0], cmp_double);
                double med = fw[w][nfw[w] / 2];
                vary[w] = (fw[w][nfw[w] - 1] - fw[w][0]) / med;
                noise[w] = nd[w] > 0 ? 0.5 * sqrt(dsum[w] / nd[w]) / med : 0.0;
                real[w] = vary[w] > 6.0 * noise[w] && (tp->min_vary <= 0 || vary[w] > tp->min_vary);
            }
        }
        tinfo.fwhm_vary_sci = vary[0];
        tinfo.fwhm_vary_ref = vary[1];
        if (!real[0] && !real[1])
            tiled = 0;
        hilal_log(HILAL_LOG_DEBUG,
                  "subtract: PSF models from %d (science) and %d (reference) stars, degree %d and "
                  "%d over %.0f px; the FWHM varies by %.3f (noise %.3f) and %.3f (noise %.3f) "
                  "across %ld x %ld tiles: %s",
                  field[0].n, field[1].n, deg[0], deg[1], scale_px, vary[0], noise[0], vary[1],
                  noise[1], ntx, nty, tiled ? "tiles" : "one piece");
    }
    if (tiled) {
        /* the PSFs of every tile */
        for (long j = 0; j < nty; j++)
            for (long i = 0; i < ntx; i++) {
                long t = j * ntx + i, x1, y1;
                axis_window(&ax, i, &wx0[t], &x1);
                axis_window(&ay, j, &wy0[t], &y1);
                wnx[t] = x1 - wx0[t];
                wny[t] = y1 - wy0[t];
                /* the model at the tile's centre, unless too few stars
                 * (min_stars within 1.5 tile spacings) constrain it there,
                 * or it is not a PSF there (no flux, off centre, a width far
                 * from the frame's): then the whole-frame PSF */
                double xc = axis_centre(&ax, i), yc = axis_centre(&ay, j);
                for (int w = 0; w < 2; w++) {
                    if (field[w].n == 0)
                        continue;
                    int nused = 0;
                    hilal_error e1 = {0};
                    st = psf_field_eval(&field[w], psf_whole[w], xc, yc, deg[w], scale_px,
                                        1.5 * spacing_px, -1, 0, &psfs[2 * t + w], &nused, &e1);
                    double fr = psfs[2 * t + w].fwhm_px / psf_whole[w]->fwhm_px;
                    if (st == HILAL_ERR_DATA || (st == HILAL_OK && !(fr > 0.5 && fr < 2.0))) {
                        hilal_log(HILAL_LOG_DEBUG, "subtract: tile (%ld, %ld), %s: %s", i, j,
                                  w == 0 ? "science" : "reference",
                                  st == HILAL_OK ? "model FWHM far from the frame's" : e1.msg);
                        hilal_psf_clear(&psfs[2 * t + w]);
                        st = HILAL_OK;
                        continue;
                    }
                    if (st != HILAL_OK) {
                        hilal_error_set(err, st, "%s", e1.msg);
                        hilal_error_context(err, "%s PSF of tile (%ld, %ld)",
                                            w == 0 ? "science" : "reference", i, j);
                        goto cleanup;
                    }
                    if (nused < tp->min_stars) {
                        hilal_psf_clear(&psfs[2 * t + w]);
                        continue;
                    }
                    psf_ok[2 * t + w] = 1;
                }
            }
    }
    if (!tiled) {
        st = run_whole(in, tp, sci_stars, ref_stars, out, &tinfo, err);
        goto cleanup;
    }
    tinfo.tiled = 1;
    out->ntiles_x = ntx;
    out->ntiles_y = nty;
    out->tiles = calloc((size_t)nt, sizeof *out->tiles);
    if (out->tiles == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %ld tile records", nt);
        goto cleanup;
    }
    for (long j = 0; j < nty; j++)
        for (long i = 0; i < ntx; i++) {
            long t = j * ntx + i;
            hilal_diff_tile *rec = &out->tiles[t];
            rec->x0 = ax.b[i];
            rec->nx = ax.b[i + 1] - ax.b[i];
            rec->y0 = ay.b[j];
            rec->ny = ay.b[j + 1] - ay.b[j];
            rec->wx0 = wx0[t];
            rec->wy0 = wy0[t];
            rec->wnx = wnx[t];
            rec->wny = wny[t];
            rec->psf_whole_frame = !psf_ok[2 * t] || !psf_ok[2 * t + 1];
            tinfo.ntiles_fallback += rec->psf_whole_frame;
        }
#define TPSF(t, w) (psf_ok[2 * (t) + (w)] ? &psfs[2 * (t) + (w)] : psf_whole[w])

    tm[0] = now_s();
    /* ---- 3. The flux ratio with the tile PSFs ---- */
    double fn = in->flux_ratio;
    for (long j = 0; j < nty; j++)
        for (long i = 0; i < ntx; i++) {
            long t = j * ntx + i;
            st = tile_pairs(in->sci, in->ref, sci_stars, ref_stars, TPSF(t, 0), TPSF(t, 1),
                            ax.b[i], ay.b[j], ax.b[i + 1], ay.b[j + 1], tp->match_radius_px, t,
                            &pr, err);
            if (st != HILAL_OK)
                goto cleanup;
        }
    {
        /* the frame's ratio with the tile PSFs, then its variation */
        double r, re;
        int nk = robust_ratio(pr.fs, pr.es, pr.fr, pr.er, pr.n, 3.0, &r, &re);
        if (tp->refit_flux_ratio && nk >= 5 && isfinite(r) && r > 0) {
            fn = r;
            tinfo.flux_ratio_nstars = nk;
        }
        tinfo.flux_ratio = fn;
        hilal_log(HILAL_LOG_DEBUG,
                  "subtract: flux ratio with the tile PSFs %.5f +- %.5f (%d stars; %.5f with the "
                  "whole-frame PSFs)",
                  r, re, nk, in->flux_ratio);
        /* per tile, for the record: the ratio of the tile's own pairs (one
         * ratio is used for the frame: the tiles' own are too noisy to
         * improve on it) */
        double *a = malloc(sizeof *a * (pr.n + 1) * 4);
        if (a == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for tile flux ratios");
            goto cleanup;
        }
        for (long j = 0; j < nty; j++)
            for (long i = 0; i < ntx; i++) {
                long t = j * ntx + i;
                size_t m = 0;
                for (size_t k = 0; k < pr.n; k++) {
                    if (pr.tile[k] == t) {
                        a[m] = pr.fs[k];
                        a[(pr.n + 1) + m] = pr.es[k];
                        a[2 * (pr.n + 1) + m] = pr.fr[k];
                        a[3 * (pr.n + 1) + m] = pr.er[k];
                        m++;
                    }
                }
                double rt, rte;
                int nkt = robust_ratio(a, a + (pr.n + 1), a + 2 * (pr.n + 1),
                                       a + 3 * (pr.n + 1), m, 3.0, &rt, &rte);
                hilal_diff_tile *rec = &out->tiles[t];
                rec->flux_ratio_tile = nkt >= 3 ? rt : NAN;
                rec->flux_ratio_nstars = nkt;
                rec->flux_ratio = fn;
            }
        free(a);
    }

    tm[1] = now_s();
    /* ---- 4. Correlations of neighbouring tiles (background noise) ---- */
    double sig_n = in->sci->sky_rms_adu, sig_r = in->ref->sky_rms_adu;
    for (long j = 0; j < nty; j++)
        for (long i = 0; i < ntx; i++) {
            long t = j * ntx + i;
            const long nb[4][2] = {{1, 0}, {0, 1}, {1, 1}, {-1, 1}};
            for (int q = 0; q < 4; q++) {
                long i2 = i + nb[q][0], j2 = j + nb[q][1];
                if (i2 < 0 || i2 >= ntx || j2 >= nty)
                    continue;
                long u = j2 * ntx + i2;
                double rs = 1.0, rd = 1.0;
                if (psf_ok[2 * t] || psf_ok[2 * u]) {
                    if (!(sig_n > 0 && sig_r > 0)) {
                        /* unknown background RMS: the ratio of the two sets
                         * the correlation; take it as equal */
                        sig_n = sig_r = 1.0;
                    }
                    st = hilal_zogy_correlation(TPSF(t, 0), TPSF(t, 1), TPSF(u, 0), TPSF(u, 1),
                                                sig_n, sig_r, out->tiles[t].flux_ratio, out->tiles[u].flux_ratio, &rs, &rd, err);
                    if (st != HILAL_OK)
                        goto cleanup;
                }
                rho_s[t * nt + u] = rho_s[u * nt + t] = rs;
                rho_d[t * nt + u] = rho_d[u * nt + t] = rd;
            }
        }

    tm[2] = now_s();
    /* ---- 5. ZOGY on every window, accumulated with the weights ---- */
    const size_t npix = (size_t)nx * (size_t)ny;
    out->nx = nx;
    out->ny = ny;
    out->d = calloc(npix, sizeof *out->d);
    out->s = calloc(npix, sizeof *out->s);
    out->scorr = calloc(npix, sizeof *out->scorr);
    out->flux = calloc(npix, sizeof *out->flux);
    out->flux_err = calloc(npix, sizeof *out->flux_err);
    out->mask = calloc(npix, sizeof *out->mask);
    if (out->d == NULL || out->s == NULL || out->scorr == NULL || out->flux == NULL ||
        out->flux_err == NULL || out->mask == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM,
                             "out of memory for the %ld x %ld difference products", nx, ny);
        goto cleanup;
    }
    long fft_nx = 0, fft_ny = 0;
    for (long j = 0; j < nty; j++)
        for (long i = 0; i < ntx; i++) {
            long t = j * ntx + i;
            hilal_zogy_input ti = *in;
            hilal_zogy_info info;
            ti.sci_psf = TPSF(t, 0);
            ti.ref_psf = TPSF(t, 1);
            ti.flux_ratio = out->tiles[t].flux_ratio;
            ti.win_x0 = wx0[t];
            ti.win_y0 = wy0[t];
            ti.win_nx = wnx[t];
            ti.win_ny = wny[t];
            ti.min_fft_nx = fft_nx;
            ti.min_fft_ny = fft_ny;
            ti.allow_all_filled = 1;
            st = hilal_zogy_run(&ti, &td, &info, err);
            if (st != HILAL_OK) {
                hilal_error_context(err, "tile (%ld, %ld) of %ld x %ld", i, j, ntx, nty);
                goto cleanup;
            }
            /* the largest transform so far: later windows reuse its plan */
            fft_nx = info.fft_nx > fft_nx ? info.fft_nx : fft_nx;
            fft_ny = info.fft_ny > fft_ny ? info.fft_ny : fft_ny;
            for (long y = 0; y < wny[t]; y++) {
                const long Y = wy0[t] + y;
                const double wyv = axis_weight(&ay, j, Y);
                for (long x = 0; x < wnx[t]; x++) {
                    const long X = wx0[t] + x;
                    const size_t o = (size_t)Y * (size_t)nx + (size_t)X;
                    const size_t k = (size_t)y * (size_t)wnx[t] + (size_t)x;
                    out->mask[o] = td.mask[k];
                    const double w = wyv * axis_weight(&ax, i, X);
                    if (w <= 0)
                        continue;
                    out->d[o] += (float)(w * td.d[k]);
                    out->s[o] += (float)(w * td.s[k]);
                    out->flux[o] += (float)(w * td.flux[k]);
                }
            }
            hilal_diff_tile *rec = &out->tiles[t];
            rec->fwhm_sci_px = ti.sci_psf->fwhm_px;
            rec->fwhm_ref_px = ti.ref_psf->fwhm_px;
            rec->fwhm_d_px = td.psf_d.fwhm_px;
            rec->nstars_sci = ti.sci_psf->nstars;
            rec->nstars_ref = ti.ref_psf->nstars;
            rec->scorr_std_model = info.scorr_std_model;
            rec->noise_scale = info.noise_scale;
            region_rms(sci_stars, ref_stars, rec->x0, rec->y0, rec->x0 + rec->nx,
                       rec->y0 + rec->ny, tp->match_radius_px, rec);
            /* the first tile's run describes the set-up (noise levels, FFT
             * size); times and counts add up (counts over overlapping
             * windows) */
            if (t == 0) {
                tinfo.zogy = info;
            } else {
                tinfo.zogy.seconds += info.seconds;
                tinfo.zogy.n_filled += info.n_filled;
                tinfo.zogy.n_negvar += info.n_negvar;
            }
            /* keep the flux error plane for the blend */
            terr[t] = td.flux_err;
            td.flux_err = NULL;
            hilal_diff_clear(&td);
        }

    tm[3] = now_s();
    /* ---- 6. The blend ---- */
    {
        blend b = {&ax, &ay, nx, ny, nt, wx0, wy0, wnx, terr, rho_s, rho_d, out};
        hilal_parallel_for(hilal_fft_threads(in->threads), ny, blend_rows, &b);
    }
    /* P_D of the whole-frame PSFs (representative of the frame), F_D (eq. 15) */
    st = hilal_zogy_psf_d(in->sci_psf, in->ref_psf, tinfo.zogy.sigma_n_adu, tinfo.zogy.sigma_r_adu,
                          fn, &out->psf_d, err);
    if (st != HILAL_OK)
        goto cleanup;
    {
        double sn = tinfo.zogy.sigma_n_adu, sr = tinfo.zogy.sigma_r_adu;
        out->f_d = fn / sqrt(sn * sn + sr * sr * fn * fn);
    }

    tm[4] = now_s();
    /* ---- 7. Statistics: the frame and every tile's core ---- */
    long radius;
    stats_radius(out, &radius);
    st = hilal_diff_scorr_stats(out, 0, 0, nx, ny, radius, in->threads, &out->scorr_mean,
                                &out->scorr_std, NULL, err);
    if (st != HILAL_OK)
        goto cleanup;
    for (long t = 0; t < nt; t++) {
        hilal_diff_tile *rec = &out->tiles[t];
        st = hilal_diff_scorr_stats(out, rec->x0, rec->y0, rec->nx, rec->ny, radius, in->threads,
                                    &rec->scorr_median, &rec->scorr_std, NULL, err);
        if (st != HILAL_OK)
            goto cleanup;
        tile_record_flag(rec, tp);
        tinfo.ntiles_bad += rec->bad;
    }
    tinfo.ntiles = nt;
    hilal_log(HILAL_LOG_DEBUG,
              "subtract: %ld tiles: PSF models %.3f s, flux ratio %.3f s, correlations %.3f s, "
              "ZOGY %.3f s, blend %.3f s, statistics %.3f s",
              nt, tm[0] - t0, tm[1] - tm[0], tm[2] - tm[1], tm[3] - tm[2], tm[4] - tm[3],
              now_s() - tm[4]);
#undef TPSF

cleanup:
    if (st != HILAL_OK)
        hilal_diff_clear(out);
    hilal_diff_clear(&td);
    if (psfs != NULL)
        for (long t = 0; t < 2 * nt; t++)
            hilal_psf_clear(&psfs[t]);
    free(psfs);
    free(psf_ok);
    if (terr != NULL)
        for (long t = 0; t < nt; t++)
            free(terr[t]);
    free(terr);
    free(wx0);
    free(wy0);
    free(wnx);
    free(wny);
    free(rho_s);
    free(rho_d);
    free(ax.b);
    free(ay.b);
    free(ax.c);
    free(ay.c);
    pairs_free(&pr);
    psf_field_free(&field[0]);
    psf_field_free(&field[1]);
    tinfo.seconds = now_s() - t0;
    if (tinfo_out != NULL)
        *tinfo_out = tinfo;
    return st;
}

const hilal_diff_tile *hilal_diff_tile_at(const hilal_diff *diff, double x, double y)
{
    if (diff == NULL || diff->tiles == NULL || diff->ntiles_x < 1 || diff->ntiles_y < 1)
        return NULL;
    /* FITS 1-based pixel (x, y) is 0-based pixel (x - 1, y - 1); pixel k
     * spans [k - 0.5, k + 0.5) */
    long ix = (long)floor(x - 0.5), iy = (long)floor(y - 0.5);
    if (ix < 0 || iy < 0 || ix >= diff->nx || iy >= diff->ny)
        return NULL;
    long tx = 0, ty = 0;
    while (tx < diff->ntiles_x - 1 &&
           ix >= diff->tiles[tx + 1].x0)
        tx++;
    while (ty < diff->ntiles_y - 1 && iy >= diff->tiles[(ty + 1) * diff->ntiles_x].y0)
        ty++;
    return &diff->tiles[ty * diff->ntiles_x + tx];
}
