/* The psf stage and the PSF functions of include/hilal/psf.h: analytic
 * models, the empirical PSF stacked from the usable stars of an image, its
 * FWHM, Lanczos-3 sub-pixel shifts and PSF-fit photometry.
 *
 * ZOGY (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27) needs the PSF of each
 * image (P_n, P_r; section 2) as a normalised, centred pixel image; errors
 * in the PSF shape and centring leave residuals in the difference image D
 * (eq. 13), so the stack below recentres every star to ~0.01 px and the
 * result to < 0.005 px. Algorithm and parameters: docs/psf.md.
 */
#include "hilal/psf.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
#include "hilal/log.h"
#include "hilal/stage.h"

#define PSF_PI 3.14159265358979323846
#define PSF_SQRT2 1.41421356237309504880
#define FWHM_PER_SIGMA 2.35482004503094938202 /* 2 sqrt(2 ln 2) */
#define PIXEL_FWHM2 (8.0 * 0.69314718055994530942 / 12.0) /* (2.3548)^2 / 12, px^2 */
#define LANCZOS_A 3
#define STAMP_PAD 4 /* border around a stamp for the Lanczos-3 support and |shift| <= 1 */

/* ------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------ */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n values (reorders v). NaN for n == 0. */
static double median_inplace(double *v, size_t n)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static int pix_unusable(const hilal_image *img, long i)
{
    return (img->mask != NULL && (img->mask[i] & HILAL_MASK_UNUSABLE) != 0) ||
           !isfinite(img->pix[i]);
}

/* ------------------------------------------------------------------------
 * Analytic models
 * ------------------------------------------------------------------------ */

/* Fraction of a 1-D unit Gaussian of width sigma that falls in [a, b]. */
static double gauss_cell(double a, double b, double sigma)
{
    double s = PSF_SQRT2 * sigma;
    return 0.5 * (erf(b / s) - erf(a / s));
}

static double moffat_alpha(double fwhm_px, double beta)
{
    return fwhm_px / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0));
}

void hilal_psf_render(float *img, long nx, long ny, double x0, double y0, double flux,
                      hilal_psf_model model, double fwhm_px, double beta, double radius_px)
{
    if (img == NULL || !(fwhm_px > 0.0) || !isfinite(x0) || !isfinite(y0) || !isfinite(flux))
        return;
    if (model == HILAL_PSF_MOFFAT && !(beta > 1.0))
        return;
    double rad = radius_px > 0.0 ? radius_px : 8.0 * fwhm_px;
    long xlo = (long)floor(x0 - rad), xhi = (long)ceil(x0 + rad);
    long ylo = (long)floor(y0 - rad), yhi = (long)ceil(y0 + rad);
    if (xlo < 0)
        xlo = 0;
    if (ylo < 0)
        ylo = 0;
    if (xhi > nx - 1)
        xhi = nx - 1;
    if (yhi > ny - 1)
        yhi = ny - 1;

    double sigma = fwhm_px / FWHM_PER_SIGMA;
    double alpha = model == HILAL_PSF_MOFFAT ? moffat_alpha(fwhm_px, beta) : 0.0;
    /* Moffat normalisation: the integral of (1 + r^2/alpha^2)^-beta over the
     * plane is pi alpha^2 / (beta - 1). */
    double moffat_norm = model == HILAL_PSF_MOFFAT ? (beta - 1.0) / (PSF_PI * alpha * alpha) : 0.0;

    for (long j = ylo; j <= yhi; j++) {
        double gy = model == HILAL_PSF_GAUSSIAN ? gauss_cell(j - 0.5 - y0, j + 0.5 - y0, sigma) : 0.0;
        for (long i = xlo; i <= xhi; i++) {
            double rx = i - x0, ry = j - y0;
            if (rx * rx + ry * ry > rad * rad)
                continue;
            double frac;
            if (model == HILAL_PSF_GAUSSIAN) {
                /* A Gaussian is separable: the pixel integral is the product
                 * of two 1-D integrals, each a difference of error functions. */
                frac = gauss_cell(i - 0.5 - x0, i + 0.5 - x0, sigma) * gy;
            } else {
                /* Midpoint rule on n x n sub-pixels: fine near the core
                 * where the profile curves, coarse in the wings. */
                int n = rx * rx + ry * ry < 9.0 * fwhm_px * fwhm_px ? 11 : 3;
                double sum = 0.0;
                for (int b = 0; b < n; b++) {
                    double sy = ry - 0.5 + (b + 0.5) / n;
                    for (int a = 0; a < n; a++) {
                        double sx = rx - 0.5 + (a + 0.5) / n;
                        sum += pow(1.0 + (sx * sx + sy * sy) / (alpha * alpha), -beta);
                    }
                }
                frac = moffat_norm * sum / ((double)n * n);
            }
            img[j * nx + i] += (float)(flux * frac);
        }
    }
}

hilal_status hilal_psf_make_model(hilal_psf *psf, hilal_psf_model model, int size,
                                  double fwhm_px, double beta, hilal_error *err)
{
    hilal_psf_clear(psf);
    if (size < 3 || size % 2 == 0)
        return hilal_error_set(err, HILAL_ERR_RANGE, "PSF size %d px must be odd and >= 3", size);
    if (!(fwhm_px > 0.0) || !isfinite(fwhm_px))
        return hilal_error_set(err, HILAL_ERR_RANGE, "PSF FWHM %g px must be positive", fwhm_px);
    if (model == HILAL_PSF_MOFFAT && !(beta > 1.0))
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "Moffat beta %g must be > 1 for a finite flux", beta);
    float *data = calloc((size_t)size * (size_t)size, sizeof *data);
    if (data == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %dx%d PSF", size, size);
    int h = size / 2;
    hilal_psf_render(data, size, size, h, h, 1.0, model, fwhm_px, beta, 2.0 * size);
    /* Normalise to sum 1 over the stamp (the model's wings beyond the stamp
     * are dropped, as for an empirical PSF). */
    double sum = 0.0;
    for (long i = 0; i < (long)size * size; i++)
        sum += data[i];
    for (long i = 0; i < (long)size * size; i++)
        data[i] = (float)(data[i] / sum);
    psf->size = size;
    psf->data = data;
    psf->fwhm_px = fwhm_px;
    psf->nstars = 0;
    return HILAL_OK;
}

int hilal_psf_size_for_fwhm(double fwhm_px, double half_size_fwhm, int size_min, int size_max)
{
    int lo = size_min < 3 ? 3 : (size_min % 2 ? size_min : size_min + 1);
    int hi = size_max % 2 ? size_max : size_max - 1;
    if (hi < lo)
        hi = lo;
    double half = ceil(half_size_fwhm * fwhm_px);
    if (!isfinite(half) || half < 1.0)
        return lo;
    if (half > hi)
        return hi;
    int s = 2 * (int)half + 1;
    return s < lo ? lo : (s > hi ? hi : s);
}

/* ------------------------------------------------------------------------
 * FWHM and centroid
 * ------------------------------------------------------------------------ */

static double value_at(const float *img, const hilal_mask_t *mask, long nx, long ny, long i,
                       long j)
{
    if (i < 0 || j < 0 || i >= nx || j >= ny)
        return 0.0;
    long k = j * nx + i;
    if ((mask != NULL && (mask[k] & HILAL_MASK_UNUSABLE)) || !isfinite(img[k]))
        return 0.0;
    return img[k];
}

/* Offset of the vertex of a parabola through (-1, a), (0, b), (1, c) and
 * how much it exceeds b; 0 when the three points do not make a maximum. */
static double parabola_excess(double a, double b, double c)
{
    double d = a - 2.0 * b + c;
    if (!(d < 0.0))
        return 0.0;
    double t = 0.5 * (a - c) / d;
    if (fabs(t) > 1.0)
        return 0.0;
    return -(a - c) * (a - c) / (8.0 * d);
}

double hilal_psf_measure_fwhm(const float *img, const hilal_mask_t *mask, long nx, long ny,
                              double x0, double y0, double rmax_px)
{
    enum { SUB = 8 };
    if (img == NULL || nx <= 0 || ny <= 0 || !isfinite(x0) || !isfinite(y0) || !(rmax_px > 0.0))
        return NAN;

    /* 1. Peak: brightest pixel within 1.5 px of (x0, y0) (at least the
     *    nearest pixel), refined with parabolas through the logarithms of
     *    the pixel and its neighbours in x and in y (a Gaussian is a
     *    parabola in log). */
    long ip = lround(x0), jp = lround(y0);
    double best = value_at(img, mask, nx, ny, ip, jp);
    for (long j = (long)floor(y0 - 1.5); j <= (long)ceil(y0 + 1.5); j++)
        for (long i = (long)floor(x0 - 1.5); i <= (long)ceil(x0 + 1.5); i++) {
            if ((i - x0) * (i - x0) + (j - y0) * (j - y0) > 2.25)
                continue;
            double v = value_at(img, mask, nx, ny, i, j);
            if (v > best) {
                best = v;
                ip = i;
                jp = j;
            }
        }
    if (!(best > 0.0))
        return NAN;
    double l0 = log(best), lpeak = l0;
    double xm = value_at(img, mask, nx, ny, ip - 1, jp), xp = value_at(img, mask, nx, ny, ip + 1, jp);
    double ym = value_at(img, mask, nx, ny, ip, jp - 1), yp = value_at(img, mask, nx, ny, ip, jp + 1);
    if (xm > 0.0 && xp > 0.0)
        lpeak += parabola_excess(log(xm), l0, log(xp));
    if (ym > 0.0 && yp > 0.0)
        lpeak += parabola_excess(log(ym), l0, log(yp));
    double half = 0.5 * exp(lpeak);

    /* 2. Area above half maximum on an SUB x SUB sub-pixel grid of the
     *    bilinear interpolant, counting only the region connected to the
     *    peak (a flood fill), so neighbours and noise spikes do not add. */
    long r = (long)ceil(rmax_px) + 1;
    long gx0 = ip - r, gy0 = jp - r; /* grid covers pixels [ip-r, ip+r] */
    long gn = (2 * r + 1) * SUB;
    unsigned char *above = calloc((size_t)gn * (size_t)gn, 1);
    long *stack = malloc((size_t)gn * (size_t)gn * sizeof *stack);
    double fwhm = NAN;
    if (above == NULL || stack == NULL)
        goto cleanup;
    for (long b = 0; b < gn; b++) {
        double v = gy0 - 0.5 + (b + 0.5) / SUB;
        for (long a = 0; a < gn; a++) {
            double u = gx0 - 0.5 + (a + 0.5) / SUB;
            if ((u - x0) * (u - x0) + (v - y0) * (v - y0) > rmax_px * rmax_px)
                continue;
            long i0 = (long)floor(u), j0 = (long)floor(v);
            double fx = u - i0, fy = v - j0;
            double val = (1 - fx) * (1 - fy) * value_at(img, mask, nx, ny, i0, j0) +
                         fx * (1 - fy) * value_at(img, mask, nx, ny, i0 + 1, j0) +
                         (1 - fx) * fy * value_at(img, mask, nx, ny, i0, j0 + 1) +
                         fx * fy * value_at(img, mask, nx, ny, i0 + 1, j0 + 1);
            if (val > half)
                above[b * gn + a] = 1;
        }
    }
    /* Seed: the sub-pixel at the peak pixel's centre. */
    long seed = ((jp - gy0) * SUB + SUB / 2) * gn + (ip - gx0) * SUB + SUB / 2;
    long count = 0, top = 0;
    if (above[seed]) {
        above[seed] = 2;
        stack[top++] = seed;
    }
    while (top > 0) {
        long k = stack[--top];
        count++;
        long a = k % gn, b = k / gn;
        long nb[4][2] = {{a - 1, b}, {a + 1, b}, {a, b - 1}, {a, b + 1}};
        for (int q = 0; q < 4; q++) {
            if (nb[q][0] < 0 || nb[q][1] < 0 || nb[q][0] >= gn || nb[q][1] >= gn)
                continue;
            long kk = nb[q][1] * gn + nb[q][0];
            if (above[kk] == 1) {
                above[kk] = 2;
                stack[top++] = kk;
            }
        }
    }

    /* 3.-4. FWHM of the pixel-integrated profile from the area, then the
     *       pixel's width removed in quadrature. */
    {
        double area = (double)count / (SUB * SUB);
        double fwhm_pix = 2.0 * sqrt(area / PSF_PI);
        double f2 = fwhm_pix * fwhm_pix - PIXEL_FWHM2;
        fwhm = f2 > 0.0 ? sqrt(f2) : 0.0;
    }

cleanup:
    free(above);
    free(stack);
    return fwhm;
}

void hilal_psf_centroid(const hilal_psf *psf, double *dx_px, double *dy_px)
{
    int n = psf->size, h = n / 2;
    double s = 0.0, sx = 0.0, sy = 0.0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < n; i++) {
            double rx = i - h, ry = j - h;
            if (rx * rx + ry * ry > (h + 0.5) * (h + 0.5))
                continue;
            double v = psf->data[j * n + i];
            s += v;
            sx += v * rx;
            sy += v * ry;
        }
    *dx_px = s != 0.0 ? sx / s : 0.0;
    *dy_px = s != 0.0 ? sy / s : 0.0;
}

/* ------------------------------------------------------------------------
 * Lanczos-3 shifts
 * ------------------------------------------------------------------------ */

/* L(t) = sinc(t) sinc(t/3) for |t| < 3, else 0. */
static double lanczos3(double t)
{
    if (t == 0.0)
        return 1.0;
    if (fabs(t) >= LANCZOS_A)
        return 0.0;
    double pt = PSF_PI * t;
    return LANCZOS_A * sin(pt) * sin(pt / LANCZOS_A) / (pt * pt);
}

/* Taps for sampling at u + s: s = n0 + f with integer n0 and f in [0, 1);
 * taps at u + n0 + k, k = -2..3, with weights L(f - k) renormalised to sum 1
 * (so a constant stays constant and flux is preserved). */
static void lanczos_taps(double s, long *n0, double w[2 * LANCZOS_A])
{
    double fl = floor(s);
    double f = s - fl;
    double sum = 0.0;
    *n0 = (long)fl;
    for (int k = -LANCZOS_A + 1; k <= LANCZOS_A; k++) {
        w[k + LANCZOS_A - 1] = lanczos3(f - k);
        sum += w[k + LANCZOS_A - 1];
    }
    for (int k = 0; k < 2 * LANCZOS_A; k++)
        w[k] /= sum;
}

/* Separable shift out(u, v) = in(u + sx, v + sy) of an nx x ny array, with
 * tmp (nx*ny) as scratch. When min/mout are given, an output pixel is
 * flagged when any input pixel with non-zero weight was flagged. Samples
 * outside the array count as 0 (and unflagged). */
static void shift_separable(const float *in, const uint8_t *min, int nx, int ny, double sx,
                            double sy, float *tmp, uint8_t *mtmp, float *out, uint8_t *mout)
{
    double wx[2 * LANCZOS_A], wy[2 * LANCZOS_A];
    long nx0, ny0;
    lanczos_taps(sx, &nx0, wx);
    lanczos_taps(sy, &ny0, wy);
    /* Pass 1: along x. */
    for (int v = 0; v < ny; v++)
        for (int u = 0; u < nx; u++) {
            double acc = 0.0;
            uint8_t m = 0;
            for (int k = 0; k < 2 * LANCZOS_A; k++) {
                long t = u + nx0 + k - LANCZOS_A + 1;
                if (t < 0 || t >= nx || wx[k] == 0.0)
                    continue;
                acc += wx[k] * in[(long)v * nx + t];
                if (min != NULL && fabs(wx[k]) > 1e-9)
                    m |= min[(long)v * nx + t];
            }
            tmp[(long)v * nx + u] = (float)acc;
            if (mtmp != NULL)
                mtmp[(long)v * nx + u] = m;
        }
    /* Pass 2: along y. */
    for (int v = 0; v < ny; v++)
        for (int u = 0; u < nx; u++) {
            double acc = 0.0;
            uint8_t m = 0;
            for (int k = 0; k < 2 * LANCZOS_A; k++) {
                long t = v + ny0 + k - LANCZOS_A + 1;
                if (t < 0 || t >= ny || wy[k] == 0.0)
                    continue;
                acc += wy[k] * tmp[t * nx + u];
                if (mtmp != NULL && fabs(wy[k]) > 1e-9)
                    m |= mtmp[t * nx + u];
            }
            out[(long)v * nx + u] = (float)acc;
            if (mout != NULL)
                mout[(long)v * nx + u] = m;
        }
}

hilal_status hilal_psf_shift_lanczos3(const float *in, int nx, int ny, double sx, double sy,
                                      float *out, hilal_error *err)
{
    if (nx <= 0 || ny <= 0 || !(fabs(sx) <= 8.0) || !(fabs(sy) <= 8.0))
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "Lanczos shift of (%g, %g) px on a %dx%d array is out of range "
                               "(|shift| <= 8 px)",
                               sx, sy, nx, ny);
    float *tmp = malloc((size_t)nx * (size_t)ny * sizeof *tmp);
    if (tmp == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %dx%d shift", nx, ny);
    shift_separable(in, NULL, nx, ny, sx, sy, tmp, NULL, out, NULL);
    free(tmp);
    return HILAL_OK;
}

/* ------------------------------------------------------------------------
 * Empirical PSF
 * ------------------------------------------------------------------------ */

void hilal_psf_build_params_default(hilal_psf_build_params *p)
{
    p->size = 0;
    p->half_size_fwhm = 4.0;
    p->size_min = 11;
    p->size_max = 63;
    p->max_stars = 100;
    p->min_stars = 5;
    p->min_snr = 20.0;
    p->clip_sigma = 3.0;
    p->recentre_iter = 2;
    p->fallback = HILAL_PSF_FALLBACK_MOFFAT;
    p->moffat_beta = 2.5;
}

/* One star going into the stack: its padded stamp (side w = size + 2 pad)
 * with the background removed, the variance and mask of the same pixels,
 * and the current sub-pixel offset of the star from the stamp centre. */
typedef struct stack_star {
    long ix, iy;         /* image pixel at the stamp centre, 0-based */
    double dx, dy;       /* star centre - (ix, iy), px */
    float *d, *v;        /* w*w data and variance */
    uint8_t *m;          /* w*w: 1 = masked */
    int ok;              /* still in the stack */
} stack_star;

typedef struct stack_work {
    int size, half, w;   /* PSF side, half side, padded stamp side */
    double r_norm;       /* radius of the normalisation aperture, px */
    int n;               /* stars */
    stack_star *stars;
    float *norm;         /* n * size*size normalised, shifted stamps (NaN = masked) */
    float *sig2;         /* n * size*size their variances */
    float *tmp, *shifted;/* w*w scratch */
    uint8_t *mtmp, *mshift;
    double *vals, *ws;   /* n scratch */
    double *medtmp;      /* 2n scratch */
} stack_work;

/* Robust local background of a padded stamp: the median of the unmasked
 * pixels beyond the PSF radius, clipped at 3 sigma (1.4826 MAD) twice. */
static double stamp_background(const stack_work *wk, const stack_star *s, double *scratch)
{
    int w = wk->w, c = w / 2;
    size_t n = 0;
    for (int j = 0; j < w; j++)
        for (int i = 0; i < w; i++) {
            double rx = i - c - s->dx, ry = j - c - s->dy;
            if (rx * rx + ry * ry <= (double)wk->half * wk->half || s->m[j * w + i])
                continue;
            scratch[n++] = s->d[j * w + i];
        }
    if (n == 0)
        return 0.0;
    double med = 0.0;
    for (int iter = 0; iter < 3; iter++) {
        size_t m = n;
        double *dev = scratch + n;
        for (size_t k = 0; k < m; k++)
            dev[k] = scratch[k];
        med = median_inplace(dev, m);
        for (size_t k = 0; k < m; k++)
            dev[k] = fabs(scratch[k] - med);
        double sig = 1.4826 * median_inplace(dev, m);
        if (!(sig > 0.0))
            break;
        size_t kept = 0;
        for (size_t k = 0; k < m; k++)
            if (fabs(scratch[k] - med) <= 3.0 * sig)
                scratch[kept++] = scratch[k];
        if (kept == n || kept == 0)
            break;
        n = kept;
    }
    return med;
}

/* Shifts star k's stamp so its centre falls on the central pixel, crops the
 * central size x size, divides by the flux within r_norm and stores it in
 * row k of norm/sig2. Returns 0 when the star must be dropped (masked core,
 * non-positive flux). */
static int stack_prepare_star(stack_work *wk, int k)
{
    stack_star *s = &wk->stars[k];
    int w = wk->w, sz = wk->size, pad = STAMP_PAD;
    /* out(u) = d(u + dx): the star at c + dx moves to the centre c. */
    shift_separable(s->d, s->m, w, w, s->dx, s->dy, wk->tmp, wk->mtmp, wk->shifted, wk->mshift);
    float *nrm = wk->norm + (size_t)k * sz * sz;
    float *sg = wk->sig2 + (size_t)k * sz * sz;
    double flux = 0.0;
    for (int j = 0; j < sz; j++)
        for (int i = 0; i < sz; i++) {
            long q = (long)(j + pad) * w + (i + pad);
            double rx = i - wk->half, ry = j - wk->half;
            int inside = rx * rx + ry * ry <= wk->r_norm * wk->r_norm;
            if (wk->mshift[q]) {
                if (inside)
                    return 0; /* a masked pixel in the normalisation aperture */
                nrm[j * sz + i] = NAN;
                continue;
            }
            nrm[j * sz + i] = wk->shifted[q];
            sg[j * sz + i] = s->v[q];
            if (inside)
                flux += wk->shifted[q];
        }
    if (!(flux > 0.0))
        return 0;
    /* Normalise: each stamp becomes an estimate of PSF / (fraction of the
     * PSF inside r_norm), the same for every star. */
    for (int q = 0; q < sz * sz; q++) {
        nrm[q] = (float)(nrm[q] / flux);
        sg[q] = (float)(sg[q] / (flux * flux));
    }
    return 1;
}

/* Per-pixel combination of the normalised stamps: median and robust scatter
 * (1.4826 MAD), rejection of values farther than clip x max(own sigma,
 * scatter) from the median, then the inverse-variance weighted mean of the
 * rest. psf_err receives the error of the mean (for the taper). */
static int stack_combine(stack_work *wk, double clip, float *psf, float *psf_err)
{
    int sz = wk->size, used = 0;
    for (int q = 0; q < sz * sz; q++) {
        size_t n = 0;
        for (int k = 0; k < wk->n; k++) {
            if (!wk->stars[k].ok)
                continue;
            float v = wk->norm[(size_t)k * sz * sz + q];
            float s2 = wk->sig2[(size_t)k * sz * sz + q];
            if (!isfinite(v) || !(s2 > 0.0f) || !isfinite(s2))
                continue;
            wk->vals[n] = v;
            wk->ws[n] = s2;
            n++;
        }
        if (n == 0) {
            psf[q] = 0.0f;
            psf_err[q] = INFINITY;
            continue;
        }
        double *tmpv = wk->medtmp;
        for (size_t i = 0; i < n; i++)
            tmpv[i] = wk->vals[i];
        double med = median_inplace(tmpv, n);
        for (size_t i = 0; i < n; i++)
            tmpv[i] = fabs(wk->vals[i] - med);
        double scatter = n >= 3 ? 1.4826 * median_inplace(tmpv, n) : 0.0;
        double sw = 0.0, swv = 0.0;
        for (size_t i = 0; i < n; i++) {
            double sig = sqrt(wk->ws[i]);
            if (n >= 3 && fabs(wk->vals[i] - med) > clip * fmax(sig, scatter))
                continue;
            sw += 1.0 / wk->ws[i];
            swv += wk->vals[i] / wk->ws[i];
        }
        psf[q] = sw > 0.0 ? (float)(swv / sw) : (float)med;
        psf_err[q] = sw > 0.0 ? (float)sqrt(1.0 / sw) : INFINITY;
        used = 1;
    }
    return used;
}

/* Least-squares fit of a stamp T (already shifted by the star's current
 * offset) by a P + bx dP/dx + by dP/dy + c within radius rfit: the residual
 * offset of the star is e = -(bx, by) / a, since a P(u - e) ~ a P - a e dP.
 * Returns 0 when the fit is singular. */
static int fit_offset(const float *T, const float *P, int sz, double rfit, double *ex,
                      double *ey)
{
    double A[4][4] = {{0}}, B[4] = {0};
    int h = sz / 2;
    for (int j = 1; j < sz - 1; j++)
        for (int i = 1; i < sz - 1; i++) {
            double rx = i - h, ry = j - h;
            if (rx * rx + ry * ry > rfit * rfit)
                continue;
            double t = T[j * sz + i];
            if (!isfinite(t))
                continue;
            /* Central differences for the PSF gradient. */
            double f[4] = {P[j * sz + i], 0.5 * (P[j * sz + i + 1] - P[j * sz + i - 1]),
                           0.5 * (P[(j + 1) * sz + i] - P[(j - 1) * sz + i]), 1.0};
            for (int a = 0; a < 4; a++) {
                B[a] += f[a] * t;
                for (int b = 0; b < 4; b++)
                    A[a][b] += f[a] * f[b];
            }
        }
    /* Solve the 4x4 normal equations by Gaussian elimination with partial
     * pivoting. */
    for (int c = 0; c < 4; c++) {
        int p = c;
        for (int r = c + 1; r < 4; r++)
            if (fabs(A[r][c]) > fabs(A[p][c]))
                p = r;
        if (fabs(A[p][c]) < 1e-300)
            return 0;
        if (p != c) {
            for (int k = 0; k < 4; k++) {
                double t = A[c][k];
                A[c][k] = A[p][k];
                A[p][k] = t;
            }
            double t = B[c];
            B[c] = B[p];
            B[p] = t;
        }
        for (int r = c + 1; r < 4; r++) {
            double f = A[r][c] / A[c][c];
            for (int k = c; k < 4; k++)
                A[r][k] -= f * A[c][k];
            B[r] -= f * B[c];
        }
    }
    double x[4];
    for (int r = 3; r >= 0; r--) {
        double s = B[r];
        for (int k = r + 1; k < 4; k++)
            s -= A[r][k] * x[k];
        x[r] = s / A[r][r];
    }
    if (!(x[0] > 0.0))
        return 0;
    *ex = -x[1] / x[0];
    *ey = -x[2] / x[0];
    return isfinite(*ex) && isfinite(*ey);
}

/* Step 6: residual background, taper, normalisation, recentring, FWHM. */
static hilal_status stack_finish(float *psf, const float *psf_err, int sz, double fwhm0,
                                 hilal_psf *out, hilal_error *err)
{
    int h = sz / 2;
    hilal_status st = HILAL_OK;
    float *tmp = malloc((size_t)sz * sz * sizeof *tmp);
    float *tmp2 = malloc((size_t)sz * sz * sizeof *tmp2);
    double *ring = malloc((size_t)sz * sz * sizeof *ring);
    if (tmp == NULL || tmp2 == NULL || ring == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory finishing a %dx%d PSF", sz, sz);
        goto cleanup;
    }

    /* 6a. Residual background: the median of the outermost ring
     *     (h - 1 < r <= h) is what the per-stamp sky estimates left over. */
    {
        size_t n = 0;
        for (int j = 0; j < sz; j++)
            for (int i = 0; i < sz; i++) {
                double r = hypot(i - h, j - h);
                if (r > h - 1.0 && r <= h)
                    ring[n++] = psf[j * sz + i];
            }
        double bg = median_inplace(ring, n);
        if (isfinite(bg))
            for (int q = 0; q < sz * sz; q++)
                psf[q] -= (float)bg;
    }

    /* 6b. Taper: the azimuthal mean m(k) in 1-px annuli and its noise
     *     e(k) = sqrt(sum err^2) / n; the first annulus beyond 1.5 FWHM
     *     where m < 2 e is where the PSF becomes noise. Pixels out to there
     *     are kept, then rolled off with cos^2 over 1.5 px, zero beyond
     *     (and always beyond the inscribed circle). */
    double r_cut = h;
    {
        int k0 = (int)ceil(1.5 * fwhm0);
        if (k0 < 2)
            k0 = 2;
        for (int k = k0; k <= h; k++) {
            double s = 0.0, e2 = 0.0;
            int n = 0;
            for (int j = 0; j < sz; j++)
                for (int i = 0; i < sz; i++) {
                    double r = hypot(i - h, j - h);
                    if (r < k - 0.5 || r >= k + 0.5)
                        continue;
                    s += psf[j * sz + i];
                    double e = psf_err[j * sz + i];
                    e2 += isfinite(e) ? e * e : 1e30;
                    n++;
                }
            if (n == 0)
                continue;
            double m = s / n, e = sqrt(e2) / n;
            if (m < 2.0 * e) {
                r_cut = k;
                break;
            }
        }
    }
    for (int j = 0; j < sz; j++)
        for (int i = 0; i < sz; i++) {
            double r = hypot(i - h, j - h), t;
            if (r <= r_cut)
                t = 1.0;
            else if (r < r_cut + 1.5) {
                double c = cos(0.5 * PSF_PI * (r - r_cut) / 1.5);
                t = c * c;
            } else
                t = 0.0;
            if (r > h + 0.5)
                t = 0.0;
            psf[j * sz + i] = (float)(psf[j * sz + i] * t);
        }

    /* 6c-d. Normalise to sum 1 and shift until the first moments vanish;
     *       each Lanczos shift moves the centroid by the shift, so this
     *       converges in one or two passes. */
    out->size = sz;
    out->data = psf;
    for (int iter = 0; iter < 6; iter++) {
        double sum = 0.0;
        for (int q = 0; q < sz * sz; q++)
            sum += psf[q];
        if (!(sum > 0.0)) {
            out->data = NULL;
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "the stacked PSF has no positive flux (sum %g)", sum);
            goto cleanup;
        }
        for (int q = 0; q < sz * sz; q++)
            psf[q] = (float)(psf[q] / sum);
        double cx, cy;
        hilal_psf_centroid(out, &cx, &cy);
        if (iter == 5 || (fabs(cx) < 0.002 && fabs(cy) < 0.002))
            break;
        if (fabs(cx) > 2.0 || fabs(cy) > 2.0) {
            out->data = NULL;
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "the stacked PSF is off-centre by (%.2f, %.2f) px: the star "
                                 "centroids are inconsistent",
                                 cx, cy);
            goto cleanup;
        }
        /* out(u) = in(u + c) moves the centroid from c to 0. */
        shift_separable(psf, NULL, sz, sz, cx, cy, tmp, NULL, tmp2, NULL);
        memcpy(psf, tmp2, (size_t)sz * sz * sizeof *psf);
    }
    out->fwhm_px = hilal_psf_measure_fwhm(psf, NULL, sz, sz, h, h, h);

cleanup:
    free(tmp);
    free(tmp2);
    free(ring);
    return st;
}

static void stack_work_free(stack_work *wk)
{
    if (wk->stars != NULL)
        for (int k = 0; k < wk->n; k++) {
            free(wk->stars[k].d);
            free(wk->stars[k].v);
            free(wk->stars[k].m);
        }
    free(wk->stars);
    free(wk->norm);
    free(wk->sig2);
    free(wk->tmp);
    free(wk->shifted);
    free(wk->mtmp);
    free(wk->mshift);
    free(wk->vals);
    free(wk->ws);
    free(wk->medtmp);
    memset(wk, 0, sizeof *wk);
}

static const char *img_name(const hilal_image *img)
{
    return img->meta.path[0] != '\0' ? img->meta.path : "(unnamed image)";
}

/* Median FWHM of the stars; usable_only restricts to usable ones. */
static double median_star_fwhm(const hilal_starlist *stars, int usable_only, size_t *n_out)
{
    double *v = malloc((stars->n + 1) * sizeof *v);
    size_t n = 0;
    double med = NAN;
    if (v != NULL) {
        for (size_t i = 0; i < stars->n; i++) {
            const hilal_star *s = &stars->stars[i];
            if ((usable_only && !s->usable) || !(s->fwhm_px > 0.0) || !isfinite(s->fwhm_px))
                continue;
            v[n++] = s->fwhm_px;
        }
        med = median_inplace(v, n);
    }
    free(v);
    *n_out = n;
    return med;
}

hilal_status hilal_psf_build(const hilal_image *img, const hilal_starlist *stars,
                             const hilal_psf_build_params *p, hilal_psf *out,
                             int *used_fallback, hilal_error *err)
{
    stack_work wk;
    memset(&wk, 0, sizeof wk);
    float *psf = NULL, *psf_err = NULL;
    double *scratch = NULL;
    int *cand = NULL;
    hilal_status st = HILAL_OK;
    hilal_psf_clear(out);
    if (used_fallback != NULL)
        *used_fallback = 0;

    /* 1. A first FWHM: the median over usable stars, else over all stars. */
    size_t n_usable_fwhm = 0, n_all_fwhm = 0;
    double fwhm_usable = median_star_fwhm(stars, 1, &n_usable_fwhm);
    double fwhm_all = median_star_fwhm(stars, 0, &n_all_fwhm);
    if (n_all_fwhm == 0) {
        st = hilal_error_set(
            err, HILAL_ERR_DATA,
            "%s: no stars with a measurable FWHM (%zu detections), so no PSF can be built; check "
            "that the image has stars in focus, or lower stars.thresh_sigma / stars.minarea",
            img_name(img), stars->n);
        goto cleanup;
    }
    double fwhm0 = n_usable_fwhm > 0 ? fwhm_usable : fwhm_all;
    int sz = p->size > 0 ? (p->size % 2 ? p->size : p->size + 1)
                         : hilal_psf_size_for_fwhm(fwhm0, p->half_size_fwhm, p->size_min,
                                                   p->size_max);
    wk.size = sz;
    wk.half = sz / 2;
    wk.w = sz + 2 * STAMP_PAD;
    /* Normalisation aperture: 2 FWHM holds >99.9% of a Gaussian's flux and
     * has high S/N; the stack is renormalised to sum 1 at the end. */
    wk.r_norm = fmin(2.0 * fwhm0, (double)wk.half);

    /* 2. Candidates: usable, bright enough, stamp inside the image, centre
     *    pixel unmasked; the list is sorted by decreasing flux. */
    int ncand = 0;
    cand = malloc((stars->n + 1) * sizeof *cand);
    if (cand == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t i = 0; i < stars->n && ncand < p->max_stars; i++) {
        const hilal_star *s = &stars->stars[i];
        if (!s->usable || !(s->flux_adu > 0.0) || !(s->flux_err_adu > 0.0) ||
            s->flux_adu / s->flux_err_adu < p->min_snr)
            continue;
        long ix = lround(s->x - 1.0), iy = lround(s->y - 1.0);
        long r = wk.w / 2;
        if (ix - r < 0 || iy - r < 0 || ix + r >= img->nx || iy + r >= img->ny)
            continue;
        if (pix_unusable(img, iy * img->nx + ix))
            continue;
        cand[ncand++] = (int)i;
    }

    if (ncand < p->min_stars) {
        free(cand);
        cand = NULL;
        /* Fallback: an analytic model of the median FWHM of whatever stars
         * were found. */
        if (p->fallback == HILAL_PSF_FALLBACK_NONE) {
            st = hilal_error_set(
                err, HILAL_ERR_DATA,
                "%s: only %d usable stars with S/N >= %g for the PSF (psf.min_stars = %d) and "
                "psf.fallback = none; lower psf.min_snr or stars.thresh_sigma, or set "
                "psf.fallback = moffat",
                img_name(img), ncand, p->min_snr, p->min_stars);
            goto cleanup;
        }
        hilal_psf_model model =
            p->fallback == HILAL_PSF_FALLBACK_GAUSSIAN ? HILAL_PSF_GAUSSIAN : HILAL_PSF_MOFFAT;
        st = hilal_psf_make_model(out, model, sz, fwhm_all, p->moffat_beta, err);
        if (st != HILAL_OK)
            goto cleanup;
        hilal_log(HILAL_LOG_WARN,
                  "%s: only %d usable stars for the PSF (psf.min_stars = %d): using a %s model "
                  "with the median FWHM %.2f px of %zu stars",
                  img_name(img), ncand, p->min_stars,
                  model == HILAL_PSF_GAUSSIAN ? "Gaussian" : "Moffat", fwhm_all, n_all_fwhm);
        if (used_fallback != NULL)
            *used_fallback = 1;
        goto cleanup;
    }

    /* Work arrays. */
    size_t w2 = (size_t)wk.w * wk.w, s2 = (size_t)sz * sz;
    wk.n = ncand;
    wk.stars = calloc((size_t)ncand, sizeof *wk.stars);
    wk.norm = malloc((size_t)ncand * s2 * sizeof *wk.norm);
    wk.sig2 = malloc((size_t)ncand * s2 * sizeof *wk.sig2);
    wk.tmp = malloc(w2 * sizeof *wk.tmp);
    wk.shifted = malloc(w2 * sizeof *wk.shifted);
    wk.mtmp = malloc(w2);
    wk.mshift = malloc(w2);
    wk.vals = malloc((size_t)ncand * sizeof *wk.vals);
    wk.ws = malloc((size_t)ncand * sizeof *wk.ws);
    wk.medtmp = malloc(2 * (size_t)ncand * sizeof *wk.medtmp);
    psf = malloc(s2 * sizeof *psf);
    psf_err = malloc(s2 * sizeof *psf_err);
    scratch = malloc(2 * w2 * sizeof *scratch);
    if (wk.stars == NULL || wk.norm == NULL || wk.sig2 == NULL || wk.tmp == NULL ||
        wk.shifted == NULL || wk.mtmp == NULL || wk.mshift == NULL || wk.vals == NULL ||
        wk.ws == NULL || wk.medtmp == NULL || psf == NULL || psf_err == NULL || scratch == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory stacking %d stars", ncand);
        goto cleanup;
    }

    /* 3. Cut the padded stamps: data minus sky map, variance, mask. */
    double rms2 = isfinite(img->sky_rms_adu) ? img->sky_rms_adu * img->sky_rms_adu : 1.0;
    for (int k = 0; k < ncand; k++) {
        const hilal_star *src = &stars->stars[cand[k]];
        stack_star *s = &wk.stars[k];
        s->ix = lround(src->x - 1.0);
        s->iy = lround(src->y - 1.0);
        s->dx = (src->x - 1.0) - s->ix;
        s->dy = (src->y - 1.0) - s->iy;
        s->d = malloc(w2 * sizeof *s->d);
        s->v = malloc(w2 * sizeof *s->v);
        s->m = malloc(w2);
        if (s->d == NULL || s->v == NULL || s->m == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory stacking %d stars", ncand);
            goto cleanup;
        }
        int c = wk.w / 2;
        for (int j = 0; j < wk.w; j++)
            for (int i = 0; i < wk.w; i++) {
                long q = (s->iy + j - c) * img->nx + (s->ix + i - c);
                int bad = pix_unusable(img, q);
                double sky = img->sky != NULL ? img->sky[q] : 0.0;
                double var = img->var != NULL ? img->var[q] : rms2;
                if (!(var > 0.0) || !isfinite(var) || var >= 1e29)
                    bad = 1;
                s->m[j * wk.w + i] = (uint8_t)bad;
                s->d[j * wk.w + i] = bad ? 0.0f : (float)(img->pix[q] - sky);
                s->v[j * wk.w + i] = bad ? 1e30f : (float)var;
            }
        /* Residual local background (sky-map errors, or no sky map on a
         * resampled image): clipped median beyond the PSF radius. */
        double bg = stamp_background(&wk, s, scratch);
        for (size_t q = 0; q < w2; q++)
            if (!s->m[q])
                s->d[q] -= (float)bg;
        s->ok = 1;
    }

    /* 3-4. Shift, normalise and combine; 5. refine the centres with fits of
     *      the stack to every star, and repeat. */
    int nused = 0;
    for (int pass = 0; pass <= p->recentre_iter; pass++) {
        nused = 0;
        for (int k = 0; k < ncand; k++) {
            wk.stars[k].ok = stack_prepare_star(&wk, k);
            nused += wk.stars[k].ok;
        }
        if (nused == 0 || !stack_combine(&wk, p->clip_sigma, psf, psf_err)) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "%s: none of the %d PSF stars has an unmasked core with "
                                 "positive flux; check the mask and the background",
                                 img_name(img), ncand);
            goto cleanup;
        }
        if (pass == p->recentre_iter)
            break;
        /* Each star's residual offset from a fit of the stack. */
        for (int k = 0; k < ncand; k++) {
            if (!wk.stars[k].ok)
                continue;
            double ex, ey;
            if (fit_offset(wk.norm + (size_t)k * s2, psf, sz, fmax(2.0 * fwhm0, 3.0), &ex, &ey)) {
                if (ex > 0.5)
                    ex = 0.5;
                if (ex < -0.5)
                    ex = -0.5;
                if (ey > 0.5)
                    ey = 0.5;
                if (ey < -0.5)
                    ey = -0.5;
                wk.stars[k].dx += ex;
                wk.stars[k].dy += ey;
            }
        }
    }

    /* 6. Finish: background, taper, normalisation, centring, FWHM. */
    st = stack_finish(psf, psf_err, sz, fwhm0, out, err);
    if (st != HILAL_OK) {
        hilal_error_context(err, "%s", img_name(img));
        goto cleanup;
    }
    psf = NULL; /* owned by out */
    out->nstars = nused;

cleanup:
    free(cand);
    free(psf);
    free(psf_err);
    free(scratch);
    stack_work_free(&wk);
    if (st != HILAL_OK)
        hilal_psf_clear(out);
    return st;
}

/* ------------------------------------------------------------------------
 * PSF-fit photometry
 * ------------------------------------------------------------------------ */

hilal_status hilal_psf_fit_flux(const hilal_image *img, const hilal_psf *psf, double x, double y,
                                double *flux_adu, double *flux_err_adu, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    int sz = psf->size, h = sz / 2, pad = LANCZOS_A;
    int w = sz + 2 * pad, c = w / 2;
    float *emb = NULL, *model = NULL, *tmp = NULL;
    double x0 = x - 1.0, y0 = y - 1.0;
    long ix = lround(x0), iy = lround(y0);
    *flux_adu = NAN;
    *flux_err_adu = NAN;
    if (psf->data == NULL || sz < 3)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "PSF fit without a PSF");
    if (ix < 0 || iy < 0 || ix >= img->nx || iy >= img->ny || pix_unusable(img, iy * img->nx + ix))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "source at (%.2f, %.2f) is off the image or on a masked pixel", x,
                               y);
    emb = calloc((size_t)w * w, sizeof *emb);
    model = malloc((size_t)w * w * sizeof *model);
    tmp = malloc((size_t)w * w * sizeof *tmp);
    if (emb == NULL || model == NULL || tmp == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a PSF fit");
        goto cleanup;
    }
    /* The PSF embedded in a zero border, then moved to the source's
     * sub-pixel offset: model(u) = P(u - d), d = (x0 - ix, y0 - iy). */
    for (int j = 0; j < sz; j++)
        memcpy(emb + (long)(j + pad) * w + pad, psf->data + (long)j * sz, sz * sizeof *emb);
    shift_separable(emb, NULL, w, w, -(x0 - ix), -(y0 - iy), tmp, NULL, model, NULL);

    /* Normal equations of D = F M + b over the fit pixels (unweighted, so
     * the estimate is unbiased whatever the noise model). */
    double rfit = h + 0.5;
    double smm = 0, sm = 0, sn = 0, smd = 0, sd = 0;
    long ntot = 0;
    double rms2 = isfinite(img->sky_rms_adu) ? img->sky_rms_adu * img->sky_rms_adu : NAN;
    for (int pass = 0; pass < 2; pass++) {
        double det = smm * sn - sm * sm, var_f = 0.0;
        for (int j = 0; j < w; j++)
            for (int i = 0; i < w; i++) {
                long gx = ix + i - c, gy = iy + j - c;
                double rx = gx - x0, ry = gy - y0;
                if (rx * rx + ry * ry > rfit * rfit)
                    continue;
                if (pass == 0)
                    ntot++;
                if (gx < 0 || gy < 0 || gx >= img->nx || gy >= img->ny)
                    continue;
                long q = gy * img->nx + gx;
                if (pix_unusable(img, q))
                    continue;
                double var = img->var != NULL ? img->var[q] : rms2;
                if (img->var != NULL && var >= 1e29)
                    continue;
                double m = model[j * w + i];
                if (pass == 0) {
                    double d = img->pix[q] - (img->sky != NULL ? img->sky[q] : 0.0);
                    smm += m * m;
                    sm += m;
                    sn += 1.0;
                    smd += m * d;
                    sd += d;
                } else {
                    /* F = sum a_i D_i with a_i = (n m_i - sum m) / det, so
                     * var(F) = sum a_i^2 var_i. */
                    double a = (sn * m - sm) / det;
                    var_f += a * a * var;
                }
            }
        if (pass == 0) {
            det = smm * sn - sm * sm;
            if (sn < 0.7 * ntot || !(det > 0.0)) {
                st = hilal_error_set(err, HILAL_ERR_DATA,
                                     "source at (%.2f, %.2f): only %.0f of %ld pixels usable "
                                     "for the PSF fit",
                                     x, y, sn, ntot);
                goto cleanup;
            }
            *flux_adu = (sn * smd - sm * sd) / det;
        } else {
            *flux_err_adu = sqrt(var_f);
        }
    }

cleanup:
    free(emb);
    free(model);
    free(tmp);
    return st;
}

/* ------------------------------------------------------------------------
 * The stage
 * ------------------------------------------------------------------------ */

static const hilal_param psf_params[] = {
    {"size", HILAL_PARAM_INT, "0", 0, 255, "px",
     "PSF side (odd); 0 = 2*ceil(half_size_fwhm*FWHM)+1 clipped to [size_min, size_max]"},
    {"half_size_fwhm", HILAL_PARAM_DOUBLE, "4", 1, 20, "FWHM",
     "half-side of the automatic PSF size in units of the median star FWHM"},
    {"size_min", HILAL_PARAM_INT, "11", 3, 255, "px", "smallest automatic PSF side"},
    {"size_max", HILAL_PARAM_INT, "63", 3, 255, "px", "largest automatic PSF side"},
    {"max_stars", HILAL_PARAM_INT, "100", 1, 10000, "",
     "brightest usable stars stacked into the PSF"},
    {"min_stars", HILAL_PARAM_INT, "5", 1, 10000, "",
     "fewer usable stars than this: use the fallback model"},
    {"min_snr", HILAL_PARAM_DOUBLE, "20", 0, 1e6, "",
     "minimum flux/flux_err of a star stacked into the PSF"},
    {"clip_sigma", HILAL_PARAM_DOUBLE, "3", 1, 100, "sigma",
     "per-pixel rejection threshold when combining the star stamps"},
    {"recentre_iter", HILAL_PARAM_INT, "2", 0, 10, "",
     "passes refining each star's centre by fitting the stacked PSF"},
    {"fallback", HILAL_PARAM_STRING, "moffat", 0, 0, "",
     "too few stars: moffat or gaussian model of the median star FWHM, or none (fail)"},
    {"moffat_beta", HILAL_PARAM_DOUBLE, "2.5", 1.01, 20, "", "beta of the Moffat fallback model"},
};

static hilal_status psf_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    hilal_psf_build_params *p = calloc(1, sizeof *p);
    if (p == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_psf_build_params_default(p);
    p->size = (int)hilal_config_get_int(cfg, "psf.size");
    p->half_size_fwhm = hilal_config_get_double(cfg, "psf.half_size_fwhm");
    p->size_min = (int)hilal_config_get_int(cfg, "psf.size_min");
    p->size_max = (int)hilal_config_get_int(cfg, "psf.size_max");
    p->max_stars = (int)hilal_config_get_int(cfg, "psf.max_stars");
    p->min_stars = (int)hilal_config_get_int(cfg, "psf.min_stars");
    p->min_snr = hilal_config_get_double(cfg, "psf.min_snr");
    p->clip_sigma = hilal_config_get_double(cfg, "psf.clip_sigma");
    p->recentre_iter = (int)hilal_config_get_int(cfg, "psf.recentre_iter");
    p->moffat_beta = hilal_config_get_double(cfg, "psf.moffat_beta");
    const char *fb = hilal_config_get_string(cfg, "psf.fallback");
    hilal_status st = HILAL_OK;
    if (strcmp(fb, "moffat") == 0)
        p->fallback = HILAL_PSF_FALLBACK_MOFFAT;
    else if (strcmp(fb, "gaussian") == 0)
        p->fallback = HILAL_PSF_FALLBACK_GAUSSIAN;
    else if (strcmp(fb, "none") == 0)
        p->fallback = HILAL_PSF_FALLBACK_NONE;
    else
        st = hilal_error_set(err, HILAL_ERR_CONFIG,
                             "psf.fallback = \"%s\" is not one of moffat, gaussian, none", fb);
    if (st == HILAL_OK && p->size != 0 && p->size % 2 == 0)
        st = hilal_error_set(err, HILAL_ERR_CONFIG,
                             "psf.size = %d must be odd (or 0 for automatic)", p->size);
    if (st == HILAL_OK && p->size_min > p->size_max)
        st = hilal_error_set(err, HILAL_ERR_CONFIG, "psf.size_min = %d exceeds psf.size_max = %d",
                             p->size_min, p->size_max);
    if (st == HILAL_OK && p->min_stars > p->max_stars)
        st = hilal_error_set(err, HILAL_ERR_CONFIG,
                             "psf.min_stars = %d exceeds psf.max_stars = %d", p->min_stars,
                             p->max_stars);
    if (st != HILAL_OK) {
        free(p);
        return st;
    }
    *state = p;
    return HILAL_OK;
}

static hilal_status psf_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const hilal_psf_build_params *p = state;
    hilal_status st;
    if (frame->sci == NULL || frame->ref == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "psf stage needs science and reference");
    int fb = 0;
    st = hilal_psf_build(frame->sci, &frame->sci_stars, p, &frame->sci_psf, &fb, err);
    if (st != HILAL_OK) {
        hilal_error_context(err, "science PSF");
        return st;
    }
    hilal_log(HILAL_LOG_DEBUG, "frame %s: science PSF %dx%d px, FWHM %.2f px, %d stars%s",
              frame->frame_id, frame->sci_psf.size, frame->sci_psf.size, frame->sci_psf.fwhm_px,
              frame->sci_psf.nstars, fb ? " (fallback model)" : "");
    st = hilal_psf_build(frame->ref, &frame->ref_stars, p, &frame->ref_psf, &fb, err);
    if (st != HILAL_OK) {
        hilal_psf_clear(&frame->sci_psf);
        hilal_error_context(err, "reference PSF");
        return st;
    }
    hilal_log(HILAL_LOG_DEBUG, "frame %s: reference PSF %dx%d px, FWHM %.2f px, %d stars%s",
              frame->frame_id, frame->ref_psf.size, frame->ref_psf.size, frame->ref_psf.fwhm_px,
              frame->ref_psf.nstars, fb ? " (fallback model)" : "");
    frame->products |= HILAL_PROD_PSF;
    return HILAL_OK;
}

static void psf_fini(void *state)
{
    free(state);
}

const hilal_stage hilal_stage_psf = {
    .name = "psf",
    .summary = "empirical PSF of the science and aligned reference images from their stars",
    .params = psf_params,
    .nparams = sizeof psf_params / sizeof psf_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND |
             HILAL_PROD_STARS | HILAL_PROD_ALIGNED,
    .makes = HILAL_PROD_PSF,
    .flags = 0,
    .init = psf_init,
    .run = psf_run,
    .fini = psf_fini,
};
