/* The psf stage and the PSF functions of include/hilal/psf.h: analytic
 * models, the empirical PSF of an image built from its usable stars (an
 * effective PSF in the sense of Anderson & King 2000, PASP 112, 1360, at
 * native sampling), its FWHM, Lanczos sub-pixel shifts and PSF-fit
 * photometry.
 *
 * ZOGY (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27) needs the PSF of each
 * image (P_n, P_r; section 2) as a normalised, centred pixel image; errors
 * in its shape, wings and centring leave residuals in the difference image
 * D (eq. 13) and bias the flux ratio F_n, so the stars are refitted with
 * the PSF itself and the result is centred to < 0.002 px. Algorithm and
 * parameters: docs/psf.md.
 */
#include "hilal/psf.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
#include "hilal/fits.h"
#include "hilal/log.h"
#include "hilal/stage.h"
#include "hilal/stats.h"
#include "psf_config.h"

#define PSF_PI 3.14159265358979323846
#define PSF_SQRT2 1.41421356237309504880
#define FWHM_PER_SIGMA 2.35482004503094938202 /* 2 sqrt(2 ln 2) */
#define PIXEL_FWHM2 (8.0 * 0.69314718055994530942 / 12.0) /* (2.3548)^2 / 12, px^2 */
#define LANCZOS_A 5 /* half-width of the Lanczos interpolation kernel, px */
#define STAMP_PAD (LANCZOS_A + 1) /* border around a stamp: kernel support and |shift| <= 1 */

/* ------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------ */

/* Index records sorted by a key (thread-safe qsort without a global). */
typedef struct keyed_val {
    double key;
    int idx;
} keyed_val;

static int cmp_keyed_val_desc(const void *a, const void *b)
{
    double x = ((const keyed_val *)a)->key, y = ((const keyed_val *)b)->key;
    return (x < y) - (x > y);
}

/* Model error allowed for in the stack and the star screening: no star's
 * normalised stamp is trusted to better than this fraction of the PSF
 * (stack_combine). */
#define PSF_MODEL_EPS 0.02
/* Star screening (hilal_psf_build step 4b): a star is dropped when its
 * chi^2 / nu against the median PSF exceeds CHI2_MIN and CHI2_FACTOR times
 * the median over the stars. */
#define CHI2_MIN 3.0
/* Radius, in units of the stars' FWHM, beyond which the PSF wings are the
 * Moffat profile fitted to the PSF inside it (stack_finish, step 6c). */
#define WING_FWHM 2.0
#define CHI2_FACTOR 3.0

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
 * Sub-pixel shifts: Lanczos (windowed-sinc) interpolation, a = 5
 * ------------------------------------------------------------------------ */

/* L(t) = sinc(t) sinc(t/a) for |t| < a, else 0. With a = 5 the
 * interpolation error on a sampled Gaussian of FWHM 2.2 px is 0.4% of the
 * peak (1.3% with a = 3), and 0.2% at FWHM 3 px. */
static double lanczos(double t)
{
    if (t == 0.0)
        return 1.0;
    if (fabs(t) >= LANCZOS_A)
        return 0.0;
    double pt = PSF_PI * t;
    return LANCZOS_A * sin(pt) * sin(pt / LANCZOS_A) / (pt * pt);
}

/* Taps for sampling at u + s: s = n0 + f with integer n0 and f in [0, 1);
 * taps at u + n0 + k, k = 1-a..a, with weights L(f - k) renormalised to
 * sum 1 (so a constant stays constant and flux is preserved). */
static void lanczos_taps(double s, long *n0, double w[2 * LANCZOS_A])
{
    double fl = floor(s);
    double f = s - fl;
    double sum = 0.0;
    *n0 = (long)fl;
    for (int k = -LANCZOS_A + 1; k <= LANCZOS_A; k++) {
        w[k + LANCZOS_A - 1] = lanczos(f - k);
        sum += w[k + LANCZOS_A - 1];
    }
    for (int k = 0; k < 2 * LANCZOS_A; k++)
        w[k] /= sum;
}

/* Mask bits of the stamps of the empirical PSF: a HARD pixel has no usable
 * value (masked in the image: the value is replaced by 0), a SOFT one holds
 * a valid value contaminated by a neighbouring source. */
#define STAMP_HARD 1u
#define STAMP_SOFT 2u
/* A shifted pixel is flagged SOFT when an input tap of weight above this
 * was SOFT: Lanczos weights fall below 0.05 beyond 2.5 px, and the
 * contaminating light is small where the neighbour's mask ends. */
#define SOFT_TAP_WEIGHT 0.05

/* Separable shift out(u, v) = in(u + sx, v + sy) of an nx x ny array, with
 * tmp (nx*ny) as scratch. When min/mout are given, an output pixel is
 * flagged HARD when any input pixel with non-zero weight was HARD (its value
 * is unknown), and SOFT when an input pixel with a weight above
 * SOFT_TAP_WEIGHT was SOFT. Samples outside the array count as 0 (and
 * unflagged). */
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
                if (min != NULL) {
                    uint8_t mi = min[(long)v * nx + t];
                    if (fabs(wx[k]) > 1e-9)
                        m |= mi & STAMP_HARD;
                    if (fabs(wx[k]) > SOFT_TAP_WEIGHT)
                        m |= mi & STAMP_SOFT;
                }
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
                if (mtmp != NULL) {
                    uint8_t mi = mtmp[t * nx + u];
                    if (fabs(wy[k]) > 1e-9)
                        m |= mi & STAMP_HARD;
                    if (fabs(wy[k]) > SOFT_TAP_WEIGHT)
                        m |= mi & STAMP_SOFT;
                }
            }
            out[(long)v * nx + u] = (float)acc;
            if (mout != NULL)
                mout[(long)v * nx + u] = m;
        }
}

hilal_status hilal_psf_shift(const float *in, int nx, int ny, double sx, double sy,
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

/* Lanczos weights for sampling at fractional offset f in [-0.5, 0.5] from a
 * pixel centre: taps k = -a..a, w[k + a] = L(f - k), renormalised. */
static void lanczos_centred(double f, double w[2 * LANCZOS_A + 1])
{
    double sum = 0.0;
    for (int k = -LANCZOS_A; k <= LANCZOS_A; k++) {
        w[k + LANCZOS_A] = lanczos(f - k);
        sum += w[k + LANCZOS_A];
    }
    for (int k = 0; k < 2 * LANCZOS_A + 1; k++)
        w[k] /= sum;
}

double hilal_psf_measure_fwhm(const float *img, const hilal_mask_t *mask, long nx, long ny,
                              double x0, double y0, double rmax_px)
{
    enum { SUB = 8, FINE = 16 };
    const int A = LANCZOS_A, NT = 2 * LANCZOS_A + 1;
    if (img == NULL || nx <= 0 || ny <= 0 || !isfinite(x0) || !isfinite(y0) || !(rmax_px > 0.0) ||
        rmax_px > 1000.0)
        return NAN;

    /* The local pixels: (2R+1)^2 values around the pixel nearest (x0, y0),
     * wide enough for the interpolation kernel at the edge of rmax. */
    long ic = lround(x0), jc = lround(y0);
    long r = (long)ceil(rmax_px) + 1, R = r + A + 2, nl = 2 * R + 1;
    long gn = (2 * r + 1) * SUB;
    double *V = malloc((size_t)nl * nl * sizeof *V);
    double *H = malloc((size_t)nl * gn * sizeof *H);
    double *G = malloc((size_t)gn * gn * sizeof *G);
    unsigned char *above = calloc((size_t)gn * gn, 1);
    long *stack = malloc((size_t)gn * gn * sizeof *stack);
    double fwhm = NAN;
    if (V == NULL || H == NULL || G == NULL || above == NULL || stack == NULL)
        goto cleanup;
    for (long j = 0; j < nl; j++)
        for (long i = 0; i < nl; i++)
            V[j * nl + i] = value_at(img, mask, nx, ny, ic - R + i, jc - R + j);

    /* 1. Peak: the brightest pixel within 1.5 px of (x0, y0), then the
     *    maximum of the Lanczos interpolant to 1/16 px within +-0.75 px of
     *    it (the true peak of the pixel-integrated profile, whatever the
     *    sub-pixel phase of the source). */
    long ip = ic, jp = jc;
    double best = V[R * nl + R];
    for (long j = -2; j <= 2; j++)
        for (long i = -2; i <= 2; i++) {
            double dx = ic + i - x0, dy = jc + j - y0;
            if (dx * dx + dy * dy > 2.25)
                continue;
            if (V[(R + j) * nl + R + i] > best) {
                best = V[(R + j) * nl + R + i];
                ip = ic + i;
                jp = jc + j;
            }
        }
    if (!(best > 0.0))
        goto cleanup;
    /* Coarse to fine: a 1/4-px grid over +-0.75 px, then a 1/16-px grid
     * over +-0.25 px around its best point. */
    double peak = best, px = ip, py = jp;
    for (int level = 0; level < 2; level++) {
        double step = level == 0 ? 4.0 / FINE : 1.0 / FINE, cx0 = px, cy0 = py;
        int nstep = level == 0 ? 3 : 4;
        for (int b = -nstep; b <= nstep; b++) {
            double yy = cy0 + b * step, wy[2 * LANCZOS_A + 1];
            long jb = (long)floor(yy + 0.5);
            lanczos_centred(yy - jb, wy);
            for (int a = -nstep; a <= nstep; a++) {
                double xx = cx0 + a * step, wx[2 * LANCZOS_A + 1];
                long ia = (long)floor(xx + 0.5);
                lanczos_centred(xx - ia, wx);
                if (labs(ia - ic) > R - A || labs(jb - jc) > R - A)
                    continue;
                double v = 0.0;
                for (int ky = 0; ky < NT; ky++) {
                    long row = jb - jc + R + ky - A;
                    double acc = 0.0;
                    for (int kx = 0; kx < NT; kx++)
                        acc += wx[kx] * V[row * nl + (ia - ic + R + kx - A)];
                    v += wy[ky] * acc;
                }
                if (v > peak) {
                    peak = v;
                    px = xx;
                    py = yy;
                }
            }
        }
    }
    double half = 0.5 * peak;

    /* 2. The interpolant on an SUB x SUB sub-pixel grid over pixels
     *    [ic - r, ic + r], separably: along x for every local row, then
     *    along y. Sub-pixel a of pixel i sits at i + (a + 0.5)/SUB - 0.5. */
    double wsub[SUB][2 * LANCZOS_A + 1];
    for (int a = 0; a < SUB; a++)
        lanczos_centred((a + 0.5) / SUB - 0.5, wsub[a]);
    for (long j = 0; j < nl; j++)
        for (long g = 0; g < gn; g++) {
            long i = R - r + g / SUB; /* local column of the pixel */
            const double *w = wsub[g % SUB];
            double acc = 0.0;
            for (int k = 0; k < NT; k++)
                acc += w[k] * V[j * nl + i + k - A];
            H[j * gn + g] = acc;
        }
    for (long b = 0; b < gn; b++) {
        long j = R - r + b / SUB;
        const double *w = wsub[b % SUB];
        for (long g = 0; g < gn; g++) {
            double acc = 0.0;
            for (int k = 0; k < NT; k++)
                acc += w[k] * H[(j + k - A) * gn + g];
            G[b * gn + g] = acc;
        }
    }

    /* 3. Area above half maximum within rmax, counting only the region
     *    connected to the peak (a flood fill), so neighbours and noise
     *    spikes do not add to it. */
    for (long b = 0; b < gn; b++) {
        double v = jc - r - 0.5 + (b + 0.5) / SUB;
        for (long g = 0; g < gn; g++) {
            double u = ic - r - 0.5 + (g + 0.5) / SUB;
            if ((u - x0) * (u - x0) + (v - y0) * (v - y0) <= rmax_px * rmax_px &&
                G[b * gn + g] > half)
                above[b * gn + g] = 1;
        }
    }
    long sg = (long)floor((px - (ic - r - 0.5)) * SUB), sb = (long)floor((py - (jc - r - 0.5)) * SUB);
    long count = 0, top = 0;
    if (sg >= 0 && sb >= 0 && sg < gn && sb < gn && above[sb * gn + sg]) {
        above[sb * gn + sg] = 2;
        stack[top++] = sb * gn + sg;
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

    /* 4. FWHM of the pixel-integrated profile from the area (a disc of
     *    diameter FWHM), then the pixel's own width removed in quadrature. */
    {
        double area = (double)count / (SUB * SUB);
        double fwhm_pix = 2.0 * sqrt(area / PSF_PI);
        double f2 = fwhm_pix * fwhm_pix - PIXEL_FWHM2;
        fwhm = f2 > 0.0 ? sqrt(f2) : 0.0;
    }

cleanup:
    free(V);
    free(H);
    free(G);
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
    p->refine_iter = 3;
    p->fallback = HILAL_PSF_FALLBACK_MOFFAT;
    p->moffat_beta = 2.5;
}

/* One star going into the stack: its padded stamp (side w = size + 2 pad)
 * with the background removed, the variance and mask of the same pixels,
 * and the current sub-pixel offset of the star from the stamp centre. */
typedef struct stack_star {
    long ix, iy;         /* image pixel at the stamp centre, 0-based */
    double dx, dy;       /* star centre - (ix, iy), px */
    double flux;         /* current flux estimate, ADU */
    float *d, *v;        /* w*w data and variance */
    uint8_t *m;          /* w*w: STAMP_HARD / STAMP_SOFT bits */
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
    float *emb, *model, *resid; /* w*w scratch: embedded PSF, star model, residual */
    uint8_t *mtmp, *mshift;
    double *vals, *ws;   /* n scratch */
    double *medtmp;      /* 2n scratch */
} stack_work;

/* Robust local background of a padded stamp: the median of the unmasked
 * pixels beyond the PSF radius, clipped at 3 sigma (1.4826 MAD) up to three
 * times. */
static double stamp_background(const stack_work *wk, const stack_star *s, double *scratch)
{
    int w = wk->w, c = w / 2;
    size_t n = 0;
    for (int j = 0; j < w; j++)
        for (int i = 0; i < w; i++) {
            double rx = i - c - s->dx, ry = j - c - s->dy;
            if (rx * rx + ry * ry <= (double)wk->half * wk->half || s->m[j * w + i] != 0)
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
        med = hilal_median_double(dev, m);
        for (size_t k = 0; k < m; k++)
            dev[k] = fabs(scratch[k] - med);
        double sig = 1.4826 * hilal_median_double(dev, m);
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

/* Shifts src (star k's stamp, or its residual from the model) so the
 * star's centre falls on the central pixel, crops the central size x size
 * and divides by the star's flux, storing the result in row k of
 * norm/sig2 (NaN where masked). With measure_flux, the flux is first set
 * to the sum within r_norm of the shifted stamp (the first pass). Returns 0
 * when the star must be dropped (masked pixel within r_norm, non-positive
 * flux). */
static int stack_prepare_star(stack_work *wk, int k, const float *src, int measure_flux)
{
    stack_star *s = &wk->stars[k];
    int w = wk->w, sz = wk->size, pad = STAMP_PAD;
    /* out(u) = src(u + d): the star at c + d moves to the centre c. */
    shift_separable(src, s->m, w, w, s->dx, s->dy, wk->tmp, wk->mtmp, wk->shifted, wk->mshift);
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
                    return 0; /* a masked pixel in the core */
                nrm[j * sz + i] = NAN;
                continue;
            }
            nrm[j * sz + i] = wk->shifted[q];
            sg[j * sz + i] = s->v[q];
            if (inside)
                flux += wk->shifted[q];
        }
    if (measure_flux)
        s->flux = flux;
    if (!(s->flux > 0.0))
        return 0;
    /* Normalise: each stamp becomes an estimate of PSF x (total flux / flux
     * measure), the same for every star. */
    for (int q = 0; q < sz * sz; q++) {
        nrm[q] = (float)(nrm[q] / s->flux);
        sg[q] = (float)(sg[q] / (s->flux * s->flux));
    }
    return 1;
}

/* The model of star k in its padded stamp, F P(u - c - d), into wk->model
 * (P, size x size, is embedded in a zero border and shifted by -d). */
static void stack_model_star(stack_work *wk, int k, const float *P)
{
    const stack_star *s = &wk->stars[k];
    int w = wk->w, sz = wk->size, pad = STAMP_PAD;
    memset(wk->emb, 0, (size_t)w * w * sizeof *wk->emb);
    for (int j = 0; j < sz; j++)
        memcpy(wk->emb + (long)(j + pad) * w + pad, P + (long)j * sz, sz * sizeof *P);
    shift_separable(wk->emb, NULL, w, w, -s->dx, -s->dy, wk->tmp, NULL, wk->model, NULL);
    for (long q = 0; q < (long)w * w; q++)
        wk->model[q] = (float)(wk->model[q] * s->flux);
}

/* Per-pixel combination of the normalised stamps: median and robust scatter
 * (1.4826 MAD), rejection of values farther than clip x max(own sigma,
 * scatter) from the median, then the inverse-variance weighted mean of the
 * rest. psf_err receives the error of the mean (for the taper).
 *
 * Each stamp's variance gets a floor (eps P)^2, P being the current PSF
 * estimate pref at that pixel (when given): no stamp is trusted to better
 * than the fraction eps of the PSF, which is about what interpolation and
 * centring allow. Without it the brightest star's weight in the core grows
 * as its flux squared and any defect of that one star (a faint neighbour, a
 * residual cosmic ray) becomes the PSF; with it the core is a mean over the
 * bright stars while the wings, where only bright stars have signal, still
 * come from them.
 *
 * robust = 1 makes the median itself the estimate and 1.2533 x scatter /
 * sqrt(n) its error (for the first estimate, which must not be dominated
 * by any one stamp). */
static int stack_combine(stack_work *wk, double clip, int robust, const float *pref, double eps,
                         float *psf, float *psf_err)
{
    int sz = wk->size, used = 0;
    for (int q = 0; q < sz * sz; q++) {
        size_t n = 0;
        double floor2 = pref != NULL ? eps * eps * (double)pref[q] * pref[q] : 0.0;
        for (int k = 0; k < wk->n; k++) {
            if (!wk->stars[k].ok)
                continue;
            float v = wk->norm[(size_t)k * sz * sz + q];
            float s2 = wk->sig2[(size_t)k * sz * sz + q];
            if (!isfinite(v) || !(s2 > 0.0f) || !isfinite(s2))
                continue;
            wk->vals[n] = v;
            wk->ws[n] = s2 + floor2;
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
        double med = hilal_median_double(tmpv, n);
        for (size_t i = 0; i < n; i++)
            tmpv[i] = fabs(wk->vals[i] - med);
        double scatter = n >= 3 ? 1.4826 * hilal_median_double(tmpv, n) : 0.0;
        used = 1;
        if (robust && n >= 3) {
            psf[q] = (float)med;
            psf_err[q] = scatter > 0.0 ? (float)(1.2533 * scatter / sqrt((double)n)) : INFINITY;
            continue;
        }
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
    }
    return used;
}

/* Least-squares fit of a square stamp T (NaN = masked) by a model M placed
 * at the star's current position: T ~ a M + bx dM/dx + by dM/dy + c within
 * rfit of the array centre. If the star sits at an offset e from where M
 * assumes, T = F M(u - e) ~ F M - F e dM, so a = F and e = -(bx, by) / a.
 * Returns 0 when the fit is singular or a <= 0. */
static int fit_offset(const float *T, const float *P, int sz, double rfit, double *flux,
                      double *ex, double *ey)
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
    *flux = x[0];
    *ex = -x[1] / x[0];
    *ey = -x[2] / x[0];
    return isfinite(*ex) && isfinite(*ey);
}

/* Neighbour masks. A detected source j of the list puts light into star
 * k's stamp out to the radius R_j at which a Moffat profile of its peak
 * (beta NB_BETA, the stellar FWHM; heavier wings than most PSFs, so the
 * radius errs on the large side) falls to NB_SIGMA times the background
 * RMS. Those pixels are marked SOFT: they keep their values (so the
 * interpolation around them stays smooth) but take no part in the stack or
 * the fits. Clipping cannot do this job: the brightest stars carry most of
 * the weight of the stack, and a neighbour of a few per cent of such a
 * star's flux is far below the scatter of the fainter stars at that pixel,
 * so it survived the clipping and went into the PSF (6% of the flux 7.8 px
 * away shifted the PSF core by 0.3 px on a simulated field). A star whose
 * normalisation aperture is reached by a mask is dropped (as for masked
 * pixels). */
#define NB_BETA 2.5
#define NB_SIGMA 0.5
static void stack_mask_neighbours(stack_work *wk, int k, const hilal_starlist *stars,
                                  size_t self, double fwhm0, double a_star, double sky_rms)
{
    stack_star *s = &wk->stars[k];
    int w = wk->w, c = w / 2;
    double alpha = fwhm0 / (2.0 * sqrt(pow(2.0, 1.0 / NB_BETA) - 1.0));
    double peak_per_flux = (NB_BETA - 1.0) / (PSF_PI * alpha * alpha);
    double reach = (double)c * PSF_SQRT2 + 1.0; /* stamp corner distance */
    double xs = (double)s->ix, ys = (double)s->iy;
    for (size_t j = 0; j < stars->n; j++) {
        const hilal_star *o = &stars->stars[j];
        if (j == self || !isfinite(o->x) || !isfinite(o->y))
            continue;
        double xo = o->x - 1.0, yo = o->y - 1.0;
        double d = hypot(xo - (xs + s->dx), yo - (ys + s->dy));
        if (d < 0.5 * fwhm0)
            continue; /* the star itself (a second entry) */
        /* Peak above the background: the measured one, or the Moffat peak
         * of its flux if larger (a saturated neighbour's peak is clipped). */
        double pk = fmax(isfinite(o->peak_adu) ? o->peak_adu : 0.0,
                         isfinite(o->flux_adu) ? o->flux_adu * peak_per_flux : 0.0);
        double lim = NB_SIGMA * sky_rms, r = 0.75 * fwhm0;
        if (lim > 0.0 && pk > lim)
            r = fmax(r, alpha * sqrt(pow(pk / lim, 1.0 / NB_BETA) - 1.0));
        /* Extended sources (galaxies, also trails and bad columns) are
         * brighter far out than a star of the same peak: the masked region
         * is an ellipse with the source's orientation whose semi-axes are r
         * scaled by the source's second-moment axes relative to the stars'
         * (at least r). */
        double A = r, B = r;
        if (a_star > 0.0 && isfinite(o->a_px) && isfinite(o->b_px)) {
            A = r * fmax(1.0, o->a_px / a_star);
            B = r * fmax(1.0, o->b_px / a_star);
        }
        double ct = isfinite(o->theta_rad) ? cos(o->theta_rad) : 1.0;
        double sn = isfinite(o->theta_rad) ? sin(o->theta_rad) : 0.0;
        if (d - A > reach)
            continue;
        /* Stamp pixel (i, j) is image pixel (ix + i - c, iy + j - c). */
        double u0 = xo - xs + c, v0 = yo - ys + c;
        int i0 = (int)floor(u0 - A), i1 = (int)ceil(u0 + A);
        int j0 = (int)floor(v0 - A), j1 = (int)ceil(v0 + A);
        for (int jj = j0 < 0 ? 0 : j0; jj <= j1 && jj < w; jj++)
            for (int ii = i0 < 0 ? 0 : i0; ii <= i1 && ii < w; ii++) {
                double du = ii - u0, dv = jj - v0;
                double pu = (du * ct + dv * sn) / A, pv = (-du * sn + dv * ct) / B;
                if (pu * pu + pv * pv <= 1.0)
                    s->m[jj * w + ii] |= STAMP_SOFT;
            }
    }
}

/* Goodness of fit of star k with the PSF P (error Perr): the star's flux
 * and centre are refitted with P (fit_offset), then
 *     chi2 / nu = sum (T - F P_shifted)^2 / (var + F^2 (Perr^2 + (eps P)^2)) / (n - 3)
 * over the unmasked pixels within rfit of the star. A galaxy, a blend or a
 * star hit by a cosmic ray is not described by the PSF of the others and
 * stands out; the PSF error term keeps bright stars from standing out only
 * because the PSF is noisier than they are. NaN when there are too few
 * pixels or the fit fails. */
static double stack_chi2(stack_work *wk, int k, const float *P, const float *Perr, double rfit,
                         double eps)
{
    stack_star *s = &wk->stars[k];
    int w = wk->w, c = w / 2, sz = wk->size, h = wk->half;
    size_t w2 = (size_t)w * w;
    stack_model_star(wk, k, P);
    for (size_t q = 0; q < w2; q++) {
        wk->resid[q] = s->m[q] ? NAN : s->d[q];
        wk->model[q] = (float)(wk->model[q] / s->flux);
    }
    double fl, ex, ey;
    if (fit_offset(wk->resid, wk->model, w, rfit, &fl, &ex, &ey) && fabs(ex) < 0.5 &&
        fabs(ey) < 0.5) {
        s->flux = fl;
        s->dx += ex;
        s->dy += ey;
    }
    stack_model_star(wk, k, P);
    double chi2 = 0.0, F2 = s->flux * s->flux;
    int n = 0;
    for (int j = 0; j < w; j++)
        for (int i = 0; i < w; i++) {
            double rx = i - c - s->dx, ry = j - c - s->dy;
            if (rx * rx + ry * ry > rfit * rfit || s->m[j * w + i])
                continue;
            int pi = (int)lround(rx) + h, pj = (int)lround(ry) + h;
            if (pi < 0 || pj < 0 || pi >= sz || pj >= sz)
                continue;
            double pv = P[pj * sz + pi], pe = Perr[pj * sz + pi];
            if (!isfinite(pe))
                continue;
            double var = s->v[j * w + i] + F2 * (pe * pe + eps * eps * pv * pv);
            double r = s->d[j * w + i] - wk->model[j * w + i];
            if (!(var > 0.0))
                continue;
            chi2 += r * r / var;
            n++;
        }
    return n > 6 ? chi2 / (n - 3) : NAN;
}

/* ------------------------------------------------------------------------
 * Moffat model of the PSF core, for the wings
 * ------------------------------------------------------------------------ */

/* Elliptical Moffat profile (1 + q(x, y) / alpha^2)^-beta with the quadratic
 * form q = (1 + e1) x^2 + (1 - e1) y^2 + 2 e2 x y, integrated over the
 * pixels (midpoint rule on n x n sub-pixels: 7 within 1.5 FWHM of the
 * centre, where the profile curves, 3 beyond), into m (sz x sz, centred on
 * the central pixel). */
typedef struct moffat_par {
    double fwhm, beta, e1, e2;
} moffat_par;

static void moffat_pixels(const moffat_par *mp, int sz, double rmax, float *m)
{
    int h = sz / 2;
    double alpha = mp->fwhm / (2.0 * sqrt(pow(2.0, 1.0 / mp->beta) - 1.0));
    double ia2 = 1.0 / (alpha * alpha);
    for (int j = 0; j < sz; j++)
        for (int i = 0; i < sz; i++) {
            double x = i - h, y = j - h;
            if (x * x + y * y > rmax * rmax) {
                m[j * sz + i] = 0.0f;
                continue;
            }
            int n = x * x + y * y < 2.25 * mp->fwhm * mp->fwhm ? 7 : 3;
            double acc = 0.0;
            for (int b = 0; b < n; b++) {
                double yy = y - 0.5 + (b + 0.5) / n;
                for (int a = 0; a < n; a++) {
                    double xx = x - 0.5 + (a + 0.5) / n;
                    double q = (1.0 + mp->e1) * xx * xx + (1.0 - mp->e1) * yy * yy +
                               2.0 * mp->e2 * xx * yy;
                    acc += pow(1.0 + q * ia2, -mp->beta);
                }
            }
            m[j * sz + i] = (float)(acc / ((double)n * n));
        }
}

/* Weighted least-squares misfit of P by A M(mp) within rfit (A solved
 * linearly); fills r (one residual per pixel of the fit region, weighted)
 * and returns chi^2, with *amp the amplitude. */
static double moffat_misfit(const moffat_par *mp, const float *P, const float *W, int sz,
                            double rfit, float *m, double *r, double *amp)
{
    int h = sz / 2;
    moffat_pixels(mp, sz, rfit + 1.0, m);
    double smm = 0.0, smp = 0.0;
    for (int j = 0; j < sz; j++)
        for (int i = 0; i < sz; i++) {
            double x = i - h, y = j - h;
            if (x * x + y * y > rfit * rfit)
                continue;
            int q = j * sz + i;
            smm += W[q] * (double)m[q] * m[q];
            smp += W[q] * (double)m[q] * P[q];
        }
    double A = smm > 0.0 ? smp / smm : 0.0, chi2 = 0.0;
    int k = 0;
    for (int j = 0; j < sz; j++)
        for (int i = 0; i < sz; i++) {
            double x = i - h, y = j - h;
            if (x * x + y * y > rfit * rfit)
                continue;
            int q = j * sz + i;
            r[k] = sqrt(W[q]) * (P[q] - A * m[q]);
            chi2 += r[k] * r[k];
            k++;
        }
    *amp = A;
    return chi2;
}

/* Fits an elliptical Moffat profile (amplitude, FWHM, beta, e1, e2) to the
 * PSF P within rfit px of the centre, weighted by 1 / (err^2 + (eps P)^2),
 * by Levenberg-Marquardt on the four non-linear parameters (the amplitude
 * is solved linearly at each step; numerical derivatives). Returns 0 if the
 * fit fails. The wings of the PSF beyond about 2 FWHM are taken from this
 * model (stack_finish). */
static int fit_moffat_core(const float *P, const float *err, int sz, double fwhm0, double rfit,
                           moffat_par *out, double *amp)
{
    int h = sz / 2, npar = 4, ok = 0;
    int nmax = (2 * h + 1) * (2 * h + 1);
    float *W = malloc((size_t)sz * sz * sizeof *W), *m = malloc((size_t)sz * sz * sizeof *m);
    double *r0 = malloc((size_t)nmax * sizeof *r0), *r1 = malloc((size_t)nmax * sizeof *r1);
    double *J = malloc((size_t)nmax * npar * sizeof *J);
    if (W == NULL || m == NULL || r0 == NULL || r1 == NULL || J == NULL)
        goto cleanup;
    int npix = 0;
    for (int j = 0; j < sz; j++)
        for (int i = 0; i < sz; i++) {
            int q = j * sz + i;
            double e = isfinite(err[q]) ? err[q] : 0.0, v = PSF_MODEL_EPS * P[q];
            double var = e * e + v * v;
            W[q] = var > 0.0 && isfinite(err[q]) ? (float)(1.0 / var) : 0.0f;
            double x = i - h, y = j - h;
            npix += x * x + y * y <= rfit * rfit;
        }
    if (npix < 12)
        goto cleanup;
    double p[4] = {fwhm0, 3.0, 0.0, 0.0};
    const double lo[4] = {0.3 * fwhm0, 1.2, -0.5, -0.5}, hi[4] = {3.0 * fwhm0, 20.0, 0.5, 0.5};
    double lambda = 1e-3, A = 0.0;
    moffat_par mp = {p[0], p[1], p[2], p[3]};
    double chi2 = moffat_misfit(&mp, P, W, sz, rfit, m, r0, &A);
    for (int iter = 0; iter < 40; iter++) {
        /* Numerical Jacobian of the weighted residuals. */
        for (int a = 0; a < npar; a++) {
            double dp = a == 0 ? 1e-3 * p[0] : (a == 1 ? 1e-3 * p[1] : 1e-4);
            double pa[4] = {p[0], p[1], p[2], p[3]};
            pa[a] += dp;
            moffat_par mq = {pa[0], pa[1], pa[2], pa[3]};
            double Aq;
            moffat_misfit(&mq, P, W, sz, rfit, m, r1, &Aq);
            for (int k = 0; k < npix; k++)
                J[k * npar + a] = (r1[k] - r0[k]) / dp;
        }
        double JTJ[4][4] = {{0}}, JTr[4] = {0};
        for (int k = 0; k < npix; k++)
            for (int a = 0; a < npar; a++) {
                JTr[a] += J[k * npar + a] * r0[k];
                for (int b = 0; b < npar; b++)
                    JTJ[a][b] += J[k * npar + a] * J[k * npar + b];
            }
        int improved = 0;
        for (int tries = 0; tries < 10 && !improved; tries++) {
            /* Solve (JTJ + lambda diag) dp = -JTr by Gaussian elimination. */
            double M[4][5];
            for (int a = 0; a < npar; a++) {
                for (int b = 0; b < npar; b++)
                    M[a][b] = JTJ[a][b] + (a == b ? lambda * (JTJ[a][a] + 1e-12) : 0.0);
                M[a][4] = -JTr[a];
            }
            int singular = 0;
            for (int c = 0; c < npar && !singular; c++) {
                int piv = c;
                for (int r = c + 1; r < npar; r++)
                    if (fabs(M[r][c]) > fabs(M[piv][c]))
                        piv = r;
                if (!(fabs(M[piv][c]) > 0.0)) {
                    singular = 1;
                    break;
                }
                for (int k = 0; k < 5; k++) {
                    double t = M[c][k];
                    M[c][k] = M[piv][k];
                    M[piv][k] = t;
                }
                for (int r = c + 1; r < npar; r++) {
                    double f = M[r][c] / M[c][c];
                    for (int k = c; k < 5; k++)
                        M[r][k] -= f * M[c][k];
                }
            }
            if (singular) {
                lambda *= 10.0;
                continue;
            }
            double d[4];
            for (int r = npar - 1; r >= 0; r--) {
                double t = M[r][4];
                for (int k = r + 1; k < npar; k++)
                    t -= M[r][k] * d[k];
                d[r] = t / M[r][r];
            }
            double pn[4];
            for (int a = 0; a < npar; a++)
                pn[a] = fmin(hi[a], fmax(lo[a], p[a] + d[a]));
            moffat_par mq = {pn[0], pn[1], pn[2], pn[3]};
            double An, c2 = moffat_misfit(&mq, P, W, sz, rfit, m, r1, &An);
            if (c2 < chi2) {
                double rel = (chi2 - c2) / chi2;
                memcpy(p, pn, sizeof p);
                memcpy(r0, r1, (size_t)npix * sizeof *r0);
                chi2 = c2;
                A = An;
                lambda = fmax(lambda / 10.0, 1e-7);
                improved = 1;
                if (rel < 1e-7)
                    iter = 1000; /* converged */
            } else {
                lambda *= 10.0;
            }
        }
        if (!improved)
            break;
    }
    out->fwhm = p[0];
    out->beta = p[1];
    out->e1 = p[2];
    out->e2 = p[3];
    *amp = A;
    ok = A > 0.0 && isfinite(A);

cleanup:
    free(W);
    free(m);
    free(r0);
    free(r1);
    free(J);
    return ok;
}

/* Step 6: residual background, taper, normalisation, recentring, FWHM. */
static hilal_status stack_finish(float *psf, const float *psf_err, int sz, double fwhm0,
                                 int fit_b, hilal_psf *out, hilal_error *err)
{
    int h = sz / 2;
    double bg_removed = 0.0;
    hilal_status st = HILAL_OK;
    float *tmp = malloc((size_t)sz * sz * sizeof *tmp);
    float *tmp2 = malloc((size_t)sz * sz * sizeof *tmp2);
    double *ring = malloc((size_t)sz * sz * sizeof *ring);
    if (tmp == NULL || tmp2 == NULL || ring == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory finishing a %dx%d PSF", sz, sz);
        goto cleanup;
    }

    /* 6a. A model of the wings and, for images without a sky map, the
     *     residual background b (what the per-star ring medians left in the
     *     stack). The azimuthal means m(k) of 1-px annuli from 2 FWHM to
     *     the edge are fitted, weighted by their errors, by
     *         m(k) = A (1 + (k/c)^2)^-beta (+ b),
     *     a Moffat profile with the measured FWHM (c = FWHM / (2 sqrt(
     *     2^(1/beta) - 1))) and beta scanned over [1.5, 10] (large beta is
     *     nearly Gaussian), A >= 0, b linear. With a sky map b is not
     *     fitted: over a PSF stamp a constant is nearly degenerate with the
     *     wings (a Moffat profile of beta 2.5-3 puts ~1% of the flux beyond
     *     4 FWHM), and fitting it removed real wing light and biased
     *     PSF-fit fluxes by -0.5% in tests, while the mesh sky map is good
     *     to a small fraction of the noise. Without a sky map and with
     *     fewer than 4 annuli, b is the median of the outermost ring. */
    double wing_a = 0.0, wing_beta = 2.5, wing_c = 1.0;
    {
        int k0 = (int)ceil(2.0 * fwhm0);
        if (k0 < 2)
            k0 = 2;
        double mk[256], wk2[256], rk[256];
        int na = 0;
        for (int k = k0; k <= h && na < 256; k++) {
            double e2 = 0.0;
            int n = 0;
            for (int j = 0; j < sz; j++)
                for (int i = 0; i < sz; i++) {
                    double r = hypot(i - h, j - h);
                    if (r < k - 0.5 || r >= k + 0.5)
                        continue;
                    ring[n] = psf[j * sz + i];
                    double e = psf_err[j * sz + i];
                    e2 += isfinite(e) ? e * e : 1e30;
                    n++;
                }
            if (n == 0 || !(e2 > 0.0))
                continue;
            /* The median of the annulus: a neighbour's leftover light
             * covers a few of its pixels, not its median. Its variance is
             * pi/2 that of the mean. */
            mk[na] = hilal_median_double(ring, (size_t)n);
            wk2[na] = (double)n * n / e2 / 1.5708; /* 1 / error^2 of the median */
            rk[na] = k;
            na++;
        }
        if (na >= 4) {
            /* A = 0: b is the weighted mean. */
            double sw = 0.0, swm = 0.0;
            for (int q = 0; q < na; q++) {
                sw += wk2[q];
                swm += wk2[q] * mk[q];
            }
            bg_removed = fit_b ? swm / sw : 0.0;
            double best_chi2 = 0.0;
            for (int q = 0; q < na; q++)
                best_chi2 += wk2[q] * (mk[q] - bg_removed) * (mk[q] - bg_removed);
            for (double beta = 1.5; beta <= 10.0 + 1e-9; beta += 0.05) {
                double c = fwhm0 / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0));
                /* Linear least squares for (A, b) at this beta. */
                double s11 = 0, s12 = 0, s22 = 0, t1 = 0, t2 = 0;
                for (int q = 0; q < na; q++) {
                    double x = pow(1.0 + (rk[q] / c) * (rk[q] / c), -beta);
                    s11 += wk2[q] * x * x;
                    s12 += wk2[q] * x;
                    s22 += wk2[q];
                    t1 += wk2[q] * x * mk[q];
                    t2 += wk2[q] * mk[q];
                }
                double det = s11 * s22 - s12 * s12;
                if (!(det > 0.0))
                    continue;
                double A, b;
                if (fit_b) {
                    A = (t1 * s22 - t2 * s12) / det;
                    b = (s11 * t2 - s12 * t1) / det;
                } else {
                    A = t1 / s11;
                    b = 0.0;
                }
                if (!(A >= 0.0))
                    continue;
                double chi2 = 0.0;
                for (int q = 0; q < na; q++) {
                    double d = mk[q] - A * pow(1.0 + (rk[q] / c) * (rk[q] / c), -beta) - b;
                    chi2 += wk2[q] * d * d;
                }
                if (chi2 < best_chi2) {
                    best_chi2 = chi2;
                    bg_removed = b;
                    wing_a = A;
                    wing_beta = beta;
                    wing_c = c;
                }
            }
        } else if (fit_b) {
            size_t n = 0;
            for (int j = 0; j < sz; j++)
                for (int i = 0; i < sz; i++) {
                    double r = hypot(i - h, j - h);
                    if (r > h - 1.0 && r <= h)
                        ring[n++] = psf[j * sz + i];
                }
            bg_removed = hilal_median_double(ring, n);
        }
        if (isfinite(bg_removed))
            for (int q = 0; q < sz * sz; q++)
                psf[q] -= (float)bg_removed;
        else
            bg_removed = 0.0;
    }

    /* 6b. Where the PSF becomes noise: the first 1-px annulus beyond 1.5
     *     FWHM whose mean m(k) is below twice its noise e(k) = sqrt(sum
     *     err^2) / n. Beyond that radius the stack is replaced by the wing
     *     model of 6a (0 without one), blended with cos^2 weights over
     *     1.5 px, so the PSF keeps the flux of its wings without their
     *     noise; a truncated PSF would bias PSF-fit fluxes (and the flux
     *     ratio between two images of different S/N). */
    double r_cut = h + 1.0;
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

    /* 6c. With a sky map, the wings beyond WING_FWHM x FWHM are a Moffat
     *     profile fitted to the PSF within that radius (fit_moffat_core):
     *     out there the stack measures the sky map's local errors and the
     *     unresolved sources around the few brightest stars (which carry
     *     the weight in the wings) as much as the PSF, and their sum over
     *     the large area of the wings moved the PSF normalisation, and so
     *     every PSF-fit flux, by about 1% between simulated frames; the
     *     core fixes width, shape and beta far better. Without a sky map
     *     (or when the fit fails) the annulus fit of 6a is the wing model
     *     beyond the noise radius, as before. */
    float *wing_img = tmp2;
    int core_wing = 0;
    if (!fit_b) {
        moffat_par mp;
        double amp = 0.0, rw = WING_FWHM * fwhm0;
        if (rw < h - 1.0 && fit_moffat_core(psf, psf_err, sz, fwhm0, rw, &mp, &amp)) {
            moffat_pixels(&mp, sz, 2.0 * sz, wing_img);
            for (int q = 0; q < sz * sz; q++)
                wing_img[q] = (float)(amp * wing_img[q]);
            r_cut = fmin(r_cut, rw);
            core_wing = 1;
            hilal_log(HILAL_LOG_DEBUG,
                      "PSF core Moffat fit: FWHM %.3f px, beta %.2f, e (%.3f, %.3f); wings beyond "
                      "%.1f px from it",
                      mp.fwhm, mp.beta, mp.e1, mp.e2, r_cut);
        }
    }
    for (int j = 0; j < sz; j++)
        for (int i = 0; i < sz; i++) {
            double r = hypot(i - h, j - h), t;
            if (r <= r_cut)
                continue;
            if (r < r_cut + 1.5) {
                double c = cos(0.5 * PSF_PI * (r - r_cut) / 1.5);
                t = c * c;
            } else
                t = 0.0;
            double wing = core_wing ? wing_img[j * sz + i]
                                    : wing_a * pow(1.0 + (r / wing_c) * (r / wing_c), -wing_beta);
            psf[j * sz + i] = (float)(t * psf[j * sz + i] + (1.0 - t) * wing);
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
    hilal_log(HILAL_LOG_DEBUG,
              "PSF stack: residual background %.3g, noise radius %.1f px of %d, wing model "
              "A %.3g beta %.2f, FWHM %.3f px",
              bg_removed, r_cut, h, wing_a, wing_beta, out->fwhm_px);

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
    free(wk->emb);
    free(wk->model);
    free(wk->resid);
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
        med = hilal_median_double(v, n);
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
        /* The FWHM of the usable stars when there are any, else of all. */
        double fwhm_fb = n_usable_fwhm > 0 ? fwhm_usable : fwhm_all;
        size_t n_fb = n_usable_fwhm > 0 ? n_usable_fwhm : n_all_fwhm;
        st = hilal_psf_make_model(out, model, sz, fwhm_fb, p->moffat_beta, err);
        if (st != HILAL_OK)
            goto cleanup;
        hilal_log(HILAL_LOG_WARN,
                  "%s: only %d usable stars for the PSF (psf.min_stars = %d): using a %s model "
                  "with the median FWHM %.2f px of %zu stars",
                  img_name(img), ncand, p->min_stars,
                  model == HILAL_PSF_GAUSSIAN ? "Gaussian" : "Moffat", fwhm_fb, n_fb);
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
    wk.emb = malloc(w2 * sizeof *wk.emb);
    wk.model = malloc(w2 * sizeof *wk.model);
    wk.resid = malloc(w2 * sizeof *wk.resid);
    wk.mtmp = malloc(w2);
    wk.mshift = malloc(w2);
    wk.vals = malloc((size_t)ncand * sizeof *wk.vals);
    wk.ws = malloc((size_t)ncand * sizeof *wk.ws);
    wk.medtmp = malloc(2 * (size_t)ncand * sizeof *wk.medtmp);
    psf = malloc(s2 * sizeof *psf);
    psf_err = malloc(s2 * sizeof *psf_err);
    scratch = malloc(2 * w2 * sizeof *scratch);
    if (wk.stars == NULL || wk.norm == NULL || wk.sig2 == NULL || wk.tmp == NULL ||
        wk.shifted == NULL || wk.emb == NULL || wk.model == NULL || wk.resid == NULL ||
        wk.mtmp == NULL || wk.mshift == NULL || wk.vals == NULL ||
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
        /* Without a sky map (a resampled image may lack one), the local
         * background is the clipped median beyond the PSF radius. With a
         * sky map this is left to step 6a: subtracting a ring median per
         * star would also remove the PSF's own wing light twice. */
        if (img->sky == NULL) {
            double bg = stamp_background(&wk, s, scratch);
            for (size_t q = 0; q < w2; q++)
                if (!s->m[q])
                    s->d[q] -= (float)bg;
        }
        s->ok = 1;
    }

    /* 3b. Neighbours: the light of other detected sources in each stamp is
     *     marked SOFT (stack_mask_neighbours). */
    {
        /* The stars' size: median semi-major axis of the usable stars. */
        double *av = malloc((stars->n + 1) * sizeof *av);
        size_t na = 0;
        if (av == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
            goto cleanup;
        }
        for (size_t i = 0; i < stars->n; i++)
            if (stars->stars[i].usable && stars->stars[i].a_px > 0.0)
                av[na++] = stars->stars[i].a_px;
        double a_star = hilal_median_double(av, na);
        free(av);
        for (int k = 0; k < ncand; k++)
            stack_mask_neighbours(&wk, k, stars, (size_t)cand[k], fwhm0, a_star, sqrt(rms2));
    }

    /* 3-4. First estimate: every stamp shifted to the centre (catalogue
     *      centroid), divided by its flux within r_norm, combined by the
     *      per-pixel median, which no single star can dominate. */
    int nused = 0;
    for (int k = 0; k < ncand; k++) {
        wk.stars[k].ok = stack_prepare_star(&wk, k, wk.stars[k].d, 1);
        nused += wk.stars[k].ok;
    }
    if (nused == 0 || !stack_combine(&wk, p->clip_sigma, 1, NULL, 0.0, psf, psf_err)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "%s: none of the %d PSF stars has an unmasked core with positive "
                             "flux; check the mask and the background",
                             img_name(img), ncand);
        goto cleanup;
    }

    /* 4b. Screening: every star is fitted with the median PSF and those
     *     whose chi^2 / nu exceeds max(CHI2_MIN, CHI2_FACTOR x the median
     *     over the stars) are dropped (galaxies with star-like sizes,
     *     blends, stars hit by cosmic rays). At most a third of the stars
     *     go, the worst first, so a PSF that varies across the field does
     *     not lose its stars. */
    {
        double rfit = fmax(2.0 * fwhm0, 3.0);
        keyed_val *chi = malloc((size_t)ncand * sizeof *chi);
        double *cv = malloc((size_t)ncand * sizeof *cv);
        if (chi == NULL || cv == NULL) {
            free(chi);
            free(cv);
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory stacking %d stars", ncand);
            goto cleanup;
        }
        int nc = 0;
        for (int k = 0; k < ncand; k++) {
            if (!wk.stars[k].ok)
                continue;
            double c2 = stack_chi2(&wk, k, psf, psf_err, rfit, PSF_MODEL_EPS);
            if (!isfinite(c2))
                c2 = 1e30;
            chi[nc].key = c2;
            chi[nc].idx = k;
            cv[nc] = c2;
            nc++;
        }
        double med = hilal_median_double(cv, (size_t)nc);
        double lim = fmax(CHI2_MIN, CHI2_FACTOR * med);
        qsort(chi, (size_t)nc, sizeof *chi, cmp_keyed_val_desc);
        int nrej = 0;
        for (int q = 0; q < nc && nrej < nc / 3; q++) {
            if (!(chi[q].key > lim))
                break;
            wk.stars[chi[q].idx].ok = 0;
            nrej++;
        }
        hilal_log(HILAL_LOG_DEBUG,
                  "%s: PSF stars: median chi2/nu %.2f against the median PSF, %d of %d rejected "
                  "above %.2f",
                  img_name(img), med, nrej, nc, lim);
        free(chi);
        free(cv);
    }

    /* 4c. The weighted estimate from the stars kept, with the refitted
     *     centres, and the median estimate as the reference of the
     *     variance floor (stack_combine). */
    nused = 0;
    for (int k = 0; k < ncand; k++) {
        if (wk.stars[k].ok)
            wk.stars[k].ok = stack_prepare_star(&wk, k, wk.stars[k].d, 1);
        nused += wk.stars[k].ok;
    }
    if (nused == 0 || !stack_combine(&wk, p->clip_sigma, 0, psf, PSF_MODEL_EPS, psf, psf_err)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "%s: no PSF star is left after rejecting those the PSF does not "
                             "describe; check the star list",
                             img_name(img));
        goto cleanup;
    }

    /* 5. Refinement (the effective-PSF iteration of Anderson & King 2000,
     *    PASP 112, 1360, at native sampling). Each pass:
     *    a. every star's flux and centre are fitted with the current PSF
     *       shifted to the star (fit_offset on the unshifted stamp);
     *    b. the residuals D - F shift(P, -d) are shifted back to the centre,
     *       divided by F and combined like the stamps (clipped, weighted),
     *       and the result is added to P.
     *    The fixed point is the PSF whose shifted copies reproduce the
     *    stars: stacking alone gives a PSF blurred by the interpolation of
     *    every stamp, which matters for undersampled stars (FWHM < 3 px)
     *    and biases PSF-fit fluxes. */
    for (int pass = 0; pass < p->refine_iter; pass++) {
        for (int k = 0; k < ncand; k++) {
            stack_star *s = &wk.stars[k];
            if (!s->ok)
                continue;
            stack_model_star(&wk, k, psf);
            for (size_t q = 0; q < w2; q++) {
                wk.resid[q] = s->m[q] ? NAN : s->d[q];
                wk.model[q] = (float)(wk.model[q] / s->flux);
            }
            double fl, ex, ey;
            if (fit_offset(wk.resid, wk.model, wk.w, fmax(2.0 * fwhm0, 3.0), &fl, &ex, &ey) &&
                fabs(ex) < 0.5 && fabs(ey) < 0.5) {
                s->flux = fl;
                s->dx += ex;
                s->dy += ey;
            }
        }
        nused = 0;
        for (int k = 0; k < ncand; k++) {
            stack_star *s = &wk.stars[k];
            if (!s->ok)
                continue;
            stack_model_star(&wk, k, psf);
            /* Residuals; SOFT pixels keep theirs so the shift around them
             * stays smooth (they are flagged and left out). */
            for (size_t q = 0; q < w2; q++)
                wk.resid[q] = (s->m[q] & STAMP_HARD) ? 0.0f : s->d[q] - wk.model[q];
            s->ok = stack_prepare_star(&wk, k, wk.resid, 0);
            nused += s->ok;
        }
        if (nused == 0 || !stack_combine(&wk, p->clip_sigma, 0, psf, PSF_MODEL_EPS, wk.tmp, psf_err))
            break;
        for (size_t q = 0; q < s2; q++)
            psf[q] += wk.tmp[q];
    }

    /* 6. Finish: background, taper, normalisation, centring, FWHM. */
    st = stack_finish(psf, psf_err, sz, fwhm0, img->sky == NULL, out, err);
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

    /* Normal equations of D = F M (+ b) over the fit pixels (unweighted, so
     * the estimate is unbiased whatever the noise model). The constant b
     * is fitted only when the image has no sky map: with one, a free b
     * would soak up part of the PSF's own wings (degenerate with them over
     * the stamp) and bias F low for wide-winged PSFs. */
    int fit_b = img->sky == NULL;
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
                    /* F = sum a_i D_i with a_i = (n m_i - sum m) / det
                     * (with b) or m_i / sum m^2 (without), so
                     * var(F) = sum a_i^2 var_i. */
                    double a = fit_b ? (sn * m - sm) / det : m / smm;
                    var_f += a * a * var;
                }
            }
        if (pass == 0) {
            det = fit_b ? smm * sn - sm * sm : smm;
            if (sn < 0.7 * ntot || !(det > 0.0)) {
                st = hilal_error_set(err, HILAL_ERR_DATA,
                                     "source at (%.2f, %.2f): only %.0f of %ld pixels usable "
                                     "for the PSF fit",
                                     x, y, sn, ntot);
                goto cleanup;
            }
            *flux_adu = fit_b ? (sn * smd - sm * sd) / det : smd / smm;
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
 * Supplied PSFs
 * ------------------------------------------------------------------------ */

/* Border of the stamp cut from a supplied PSF image: the Lanczos kernel's
 * half-width plus the largest centring shift allowed. */
#define SUPPLIED_MAX_SHIFT 2.5
#define SUPPLIED_PAD (LANCZOS_A + 3)

hilal_status hilal_psf_from_pixels(const float *pix, long nx, long ny,
                                   const hilal_psf_build_params *p, hilal_psf *out,
                                   double *flux_frac, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    float *stamp = NULL, *tmp = NULL, *shifted = NULL, *psf = NULL;
    hilal_psf_clear(out);
    if (flux_frac != NULL)
        *flux_frac = NAN;
    if (pix == NULL || nx < 3 || ny < 3)
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "the PSF image is %ldx%ld px; a PSF needs at least 3x3 px", nx, ny);

    /* 1. Every pixel finite; the brightest pixel and the total. */
    long nbad = 0, ipk = -1;
    double total = 0.0, vmax = 0.0;
    for (long q = 0; q < nx * ny; q++) {
        if (!isfinite(pix[q])) {
            nbad++;
            continue;
        }
        total += pix[q];
        if (ipk < 0 || pix[q] > vmax) {
            vmax = pix[q];
            ipk = q;
        }
    }
    if (nbad > 0)
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "%ld of the %ldx%ld pixels of the PSF image are NaN or infinite "
                               "(no data); a PSF image must be complete",
                               nbad, nx, ny);
    if (!(vmax > 0.0) || !(total > 0.0))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "the PSF image has no positive peak (brightest pixel %g, sum %g)",
                               vmax, total);
    long ip = ipk % nx, jp = ipk / nx;

    /* 2. Its FWHM, around the brightest pixel. */
    double rmax = fmin(0.5 * (double)(nx > ny ? nx : ny), 64.0);
    double fwhm0 = hilal_psf_measure_fwhm(pix, NULL, nx, ny, (double)ip, (double)jp, rmax);
    if (!(fwhm0 > 0.0))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "the PSF image's peak at pixel (%ld, %ld) (1-based) is %s; it "
                               "does not look like a PSF sampled at the image's pixel scale",
                               ip + 1, jp + 1,
                               isnan(fwhm0) ? "not measurable" : "sharper than one pixel");

    /* 3. The side of the stamp: fixed, or from the FWHM as for an
     *    empirical PSF. */
    int sz = p->size > 0 ? (p->size % 2 ? p->size : p->size + 1)
                         : hilal_psf_size_for_fwhm(fwhm0, p->half_size_fwhm, p->size_min,
                                                   p->size_max);
    int h = sz / 2, w = sz + 2 * SUPPLIED_PAD, c = w / 2;
    size_t w2 = (size_t)w * w, s2 = (size_t)sz * sz;
    stamp = calloc(w2, sizeof *stamp);
    tmp = malloc(w2 * sizeof *tmp);
    shifted = malloc(w2 * sizeof *shifted);
    psf = malloc(s2 * sizeof *psf);
    if (stamp == NULL || tmp == NULL || shifted == NULL || psf == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %dx%d PSF", sz, sz);
        goto cleanup;
    }
    /* 4. The padded stamp around the brightest pixel; pixels beyond the
     *    image are 0 (a small PSF image is embedded in zeros). */
    for (int j = 0; j < w; j++)
        for (int i = 0; i < w; i++) {
            long x = ip + i - c, y = jp + j - c;
            if (x >= 0 && y >= 0 && x < nx && y < ny)
                stamp[(size_t)j * w + i] = pix[y * nx + x];
        }
    /*    Centring: out(u) = in(u + s) moves a centroid at s to 0, and the
     *    centroid of the shifted stamp moves by nearly the shift, so the
     *    total shift s is corrected by the centroid left after each pass
     *    (converges in two or three). */
    double sx = 0.0, sy = 0.0, cx = 0.0, cy = 0.0, sum = 0.0;
    hilal_psf view = {sz, psf, 0.0, 0};
    int centred = 0;
    for (int iter = 0; iter < 10 && !centred; iter++) {
        shift_separable(stamp, NULL, w, w, sx, sy, tmp, NULL, shifted, NULL);
        sum = 0.0;
        for (int j = 0; j < sz; j++)
            for (int i = 0; i < sz; i++) {
                float v = shifted[(size_t)(j + SUPPLIED_PAD) * w + (i + SUPPLIED_PAD)];
                psf[(size_t)j * sz + i] = v;
                sum += v;
            }
        if (!(sum > 0.0)) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "the central %dx%d px of the PSF image sum to %g, not a "
                                 "positive flux",
                                 sz, sz, sum);
            goto cleanup;
        }
        for (size_t q = 0; q < s2; q++)
            psf[q] = (float)(psf[q] / sum);
        hilal_psf_centroid(&view, &cx, &cy);
        if (fabs(cx) < 0.002 && fabs(cy) < 0.002) {
            centred = 1;
            break;
        }
        sx += cx;
        sy += cy;
        if (fabs(sx) > SUPPLIED_MAX_SHIFT || fabs(sy) > SUPPLIED_MAX_SHIFT) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "the centroid of the PSF image lies (%.2f, %.2f) px from its "
                                 "brightest pixel (%ld, %ld) (1-based), more than %.1f px: not "
                                 "a single centred PSF",
                                 sx, sy, ip + 1, jp + 1, SUPPLIED_MAX_SHIFT);
            goto cleanup;
        }
    }
    if (!centred && (fabs(cx) > 0.01 || fabs(cy) > 0.01)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "the PSF image could not be centred (centroid still (%.3f, %.3f) "
                             "px off after 10 shifts)",
                             cx, cy);
        goto cleanup;
    }

    /* 5. Sum 1 (done above), FWHM of the result. */
    out->size = sz;
    out->data = psf;
    out->fwhm_px = hilal_psf_measure_fwhm(psf, NULL, sz, sz, h, h, h);
    out->nstars = 0;
    psf = NULL; /* owned by out */
    if (flux_frac != NULL)
        *flux_frac = sum / total;

cleanup:
    free(stamp);
    free(tmp);
    free(shifted);
    free(psf);
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
    {"refine_iter", HILAL_PARAM_INT, "3", 0, 20, "",
     "effective-PSF passes: refit each star with the PSF and add the stacked residuals"},
    {"fallback", HILAL_PARAM_STRING, "moffat", 0, 0, "",
     "too few stars: moffat or gaussian model of the median star FWHM, or none (fail)"},
    {"moffat_beta", HILAL_PARAM_DOUBLE, "2.5", 1.01, 20, "", "beta of the Moffat fallback model"},
    {"science_file", HILAL_PARAM_STRING, "", 0, 0, "",
     "FITS image of the science PSF at the science pixel scale (any size; cut to the PSF side "
     "around its centroid, centred, sum 1) instead of the empirical one; \"\" = from the stars"},
    {"reference_file", HILAL_PARAM_STRING, "", 0, 0, "",
     "FITS image of the reference PSF on the science grid, as science_file; \"\" = from the "
     "stars"},
};

void hilal_psf_params_from_config(const hilal_config *cfg, hilal_psf_build_params *p)
{
    p->size = (int)hilal_config_get_int(cfg, "psf.size");
    p->half_size_fwhm = hilal_config_get_double(cfg, "psf.half_size_fwhm");
    p->size_min = (int)hilal_config_get_int(cfg, "psf.size_min");
    p->size_max = (int)hilal_config_get_int(cfg, "psf.size_max");
    p->max_stars = (int)hilal_config_get_int(cfg, "psf.max_stars");
    p->min_stars = (int)hilal_config_get_int(cfg, "psf.min_stars");
    p->min_snr = hilal_config_get_double(cfg, "psf.min_snr");
    p->clip_sigma = hilal_config_get_double(cfg, "psf.clip_sigma");
    p->refine_iter = (int)hilal_config_get_int(cfg, "psf.refine_iter");
    p->moffat_beta = hilal_config_get_double(cfg, "psf.moffat_beta");
}

/* The stage's state: the build settings and the supplied PSFs (size 0 when
 * the PSF is built from the stars). Read-only once made, so frames can be
 * processed in parallel. */
typedef struct psf_state {
    hilal_psf_build_params build;
    hilal_psf supplied[2];      /* science, reference */
    char path[2][1024];         /* their files, for messages */
} psf_state;

static const char *const which_name[2] = {"science", "reference"};
static const char *const which_key[2] = {"psf.science_file", "psf.reference_file"};

/* Reads the PSF file of one image (key = its setting) and makes the PSF
 * (hilal_psf_from_pixels). Errors keep the inner status, name the setting
 * and the file, and say what to do. */
static hilal_status load_supplied(const char *key, const char *what, const char *path,
                                  const hilal_psf_build_params *p, hilal_psf *out,
                                  hilal_error *err)
{
    hilal_image *img = NULL;
    hilal_error e;
    hilal_error_clear(&e);
    double frac = NAN;
    const char *fix_fmt = "point %s at a FITS image of the %s PSF sampled at the science pixel "
                          "scale (file.fits[N] or file.fits[EXTNAME] for another HDU), or set it "
                          "to \"\" to build the PSF from the image's stars";
    char fix[512];
    snprintf(fix, sizeof fix, fix_fmt, key, what);
    hilal_status st = hilal_fits_read_image(path, 0, &img, &e);
    if (st != HILAL_OK) {
        hilal_error_set(err, st, "%s = \"%s\": %s; %s", key, path, e.msg, fix);
        goto cleanup;
    }
    st = hilal_psf_from_pixels(img->pix, img->nx, img->ny, p, out, &frac, &e);
    if (st != HILAL_OK) {
        hilal_error_set(err, st, "%s = \"%s\" (HDU %d, %ldx%ld px): %s; %s", key, path,
                        img->meta.hdu, img->nx, img->ny, e.msg, fix);
        goto cleanup;
    }
    hilal_log(HILAL_LOG_INFO,
              "psf: %s PSF from %s (HDU %d, %ldx%ld px, SHA-256 %.16s...): %dx%d px, FWHM %.2f "
              "px, %.1f%% of the file's flux inside",
              what, img->meta.path, img->meta.hdu, img->nx, img->ny,
              img->meta.sha256[0] ? img->meta.sha256 : "unknown", out->size, out->size,
              out->fwhm_px, 100.0 * frac);
cleanup:
    hilal_image_free(img);
    return st;
}

static void psf_fini(void *state)
{
    psf_state *s = state;
    if (s == NULL)
        return;
    hilal_psf_clear(&s->supplied[0]);
    hilal_psf_clear(&s->supplied[1]);
    free(s);
}

static hilal_status psf_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    psf_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_psf_build_params *p = &s->build;
    hilal_psf_build_params_default(p);
    hilal_psf_params_from_config(cfg, p);
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
    /* Supplied PSFs are read once, before the first frame, so a bad file
     * stops the run before any processing. */
    for (int w = 0; w < 2 && st == HILAL_OK; w++) {
        const char *path = hilal_config_get_string(cfg, which_key[w]);
        if (path == NULL || path[0] == '\0')
            continue;
        if (strlen(path) >= sizeof s->path[w]) {
            st = hilal_error_set(err, HILAL_ERR_CONFIG,
                                 "%s: the path is %zu characters long, more than %zu; use a "
                                 "shorter path",
                                 which_key[w], strlen(path), sizeof s->path[w] - 1);
            break;
        }
        snprintf(s->path[w], sizeof s->path[w], "%s", path);
        st = load_supplied(which_key[w], which_name[w], path, p, &s->supplied[w], err);
    }
    if (st != HILAL_OK) {
        psf_fini(s);
        return st;
    }
    *state = s;
    return HILAL_OK;
}

/* Copies src into dst (cleared first). */
static hilal_status psf_copy(const hilal_psf *src, hilal_psf *dst, hilal_error *err)
{
    size_t n = (size_t)src->size * src->size;
    hilal_psf_clear(dst);
    float *data = malloc(n * sizeof *data);
    if (data == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %dx%d PSF", src->size,
                               src->size);
    memcpy(data, src->data, n * sizeof *data);
    *dst = *src;
    dst->data = data;
    return HILAL_OK;
}

/* The PSF of one image: the supplied one, or built from its stars. A
 * supplied PSF whose FWHM is far from the image's stars' is used, with a
 * warning: an oversampled model, or one of another image. */
static hilal_status one_psf(const psf_state *s, int w, const hilal_frame *frame,
                            const hilal_image *img, const hilal_starlist *stars, hilal_psf *out,
                            hilal_error *err)
{
    hilal_status st;
    if (s->supplied[w].data != NULL) {
        st = psf_copy(&s->supplied[w], out, err);
        if (st != HILAL_OK)
            return st;
        size_t n = 0;
        double med = median_star_fwhm(stars, 1, &n);
        if (n == 0)
            med = median_star_fwhm(stars, 0, &n);
        double r = n > 0 ? out->fwhm_px / med : NAN;
        if (n > 0 && isfinite(r) && (r < 1.0 / 1.5 || r > 1.5))
            hilal_log(HILAL_LOG_WARN,
                      "frame %s: the supplied %s PSF (%s = %s) has a FWHM of %.2f px but the "
                      "median FWHM of %zu stars of %s is %.2f px; check that the PSF is sampled "
                      "at the image's pixel scale (an oversampled model is wider by its "
                      "oversampling factor) and belongs to this image",
                      frame->frame_id, which_name[w], which_key[w], s->path[w], out->fwhm_px, n,
                      img_name(img), med);
        hilal_log(HILAL_LOG_DEBUG, "frame %s: %s PSF %dx%d px, FWHM %.2f px, supplied (%s)",
                  frame->frame_id, which_name[w], out->size, out->size, out->fwhm_px,
                  s->path[w]);
        return HILAL_OK;
    }
    int fb = 0;
    st = hilal_psf_build(img, stars, &s->build, out, &fb, err);
    if (st != HILAL_OK)
        return st;
    hilal_log(HILAL_LOG_DEBUG, "frame %s: %s PSF %dx%d px, FWHM %.2f px, %d stars%s",
              frame->frame_id, which_name[w], out->size, out->size, out->fwhm_px, out->nstars,
              fb ? " (fallback model)" : "");
    return HILAL_OK;
}

static hilal_status psf_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const psf_state *s = state;
    hilal_status st;
    if (frame->sci == NULL || frame->ref == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "psf stage needs science and reference");
    st = one_psf(s, 0, frame, frame->sci, &frame->sci_stars, &frame->sci_psf, err);
    if (st != HILAL_OK) {
        hilal_error_context(err, "science PSF");
        return st;
    }
    st = one_psf(s, 1, frame, frame->ref, &frame->ref_stars, &frame->ref_psf, err);
    if (st != HILAL_OK) {
        hilal_psf_clear(&frame->sci_psf);
        hilal_error_context(err, "reference PSF");
        return st;
    }
    frame->products |= HILAL_PROD_PSF;
    return HILAL_OK;
}

const hilal_stage hilal_stage_psf = {
    .name = "psf",
    .summary = "PSFs of the science and aligned reference images, from their stars or from "
               "supplied PSF images",
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
