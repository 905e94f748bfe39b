/* Stage "measure": sub-pixel position, PSF flux, magnitude, sky position and
 * shape of each candidate.
 *
 * Position: S_corr is D cross-correlated with P_D (Zackay, Ofek & Gal-Yam
 * 2016, eq. 17 and 25), so its maximum is the maximum-likelihood position of
 * a point source, and near the maximum S_corr is close to a Gaussian (the
 * autocorrelation of P_D). A quadratic fitted to ln S_corr on the 3x3 pixels
 * around the peak is therefore nearly exact; its vertex is the position.
 * Flux: diff.flux is the PSF-photometry flux of a point source centred on
 * each pixel (eq. 41-42), so the flux of the candidate is that image at the
 * sub-pixel position, interpolated with the same log-quadratic model.
 */
#include "hilal/detect.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fft.h"
#include "hilal/stage.h"
#include "hilal/wcs.h"
#include "parallel.h"

static const hilal_param measure_params[] = {
    {"weight_scale", HILAL_PARAM_DOUBLE, "1.5", 0.5, 5, "",
     "Gaussian weight of the shape moments on D, in units of the sigma of P_D"},
};

#define FWHM_PER_SIGMA 2.3548200450309493 /* 2 sqrt(2 ln 2) */

/* ---- PSF interpolation -------------------------------------------------- */

/* Keys' cubic convolution kernel with a = -0.5 (Catmull-Rom). */
static double keys(double t)
{
    t = fabs(t);
    if (t < 1)
        return (1.5 * t - 2.5) * t * t + 1.0;
    if (t < 2)
        return ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0;
    return 0.0;
}

double hilal_measure_psf_value(const hilal_psf *psf, double u, double v)
{
    if (psf == NULL || psf->data == NULL || psf->size <= 0)
        return 0.0;
    const int size = psf->size, c = size / 2;
    /* Position in the PSF array, then a 4x4 bicubic stencil around it. */
    const double px = c + u, py = c + v;
    const long ix = (long)floor(px), iy = (long)floor(py);
    const double fx = px - (double)ix, fy = py - (double)iy;
    double sum = 0.0;
    for (long j = -1; j <= 2; j++) {
        long yy = iy + j;
        if (yy < 0 || yy >= size)
            continue;
        double wy = keys((double)j - fy);
        for (long i = -1; i <= 2; i++) {
            long xx = ix + i;
            if (xx < 0 || xx >= size)
                continue;
            sum += wy * keys((double)i - fx) * psf->data[yy * size + xx];
        }
    }
    return sum;
}

/* ---- shape -------------------------------------------------------------- */

/* Whether the 0-based pixel (x, y) is closer to one of the others than to
 * (x0, y0). */
static int owned_by_other(double x, double y, double x0, double y0, const double *others,
                          size_t nothers)
{
    const double d0 = (x - x0) * (x - x0) + (y - y0) * (y - y0);
    for (size_t k = 0; k < nothers; k++) {
        double dx = x - others[2 * k], dy = y - others[2 * k + 1];
        if (dx * dx + dy * dy < d0)
            return 1;
    }
    return 0;
}

double hilal_measure_shape(const float *img, long nx, long ny, const hilal_mask_t *mask,
                           double x0, double y0, double sign, double sigma_w,
                           const double *others, size_t nothers, double *fwhm_px,
                           double *elongation)
{
    *fwhm_px = NAN;
    *elongation = NAN;
    if (!(sigma_w > 0) || !isfinite(x0) || !isfinite(y0))
        return NAN;
    /* Weighted moments M_w = sum(w I r r^T) / sum(w I), w = exp(-r^2 / 2 s_w^2),
     * over a window of 3.5 s_w (the weight is 2e-3 there), leaving out the
     * pixels of neighbouring sources. */
    const double r_max = 3.5 * sigma_w, inv2s2 = 0.5 / (sigma_w * sigma_w);
    const long xa = (long)floor(x0 - r_max), xb = (long)ceil(x0 + r_max);
    const long ya = (long)floor(y0 - r_max), yb = (long)ceil(y0 + r_max);
    double m0 = 0, mxx = 0, myy = 0, mxy = 0;
    for (long y = ya < 0 ? 0 : ya; y <= yb && y < ny; y++) {
        for (long x = xa < 0 ? 0 : xa; x <= xb && x < nx; x++) {
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if (mask != NULL && (mask[i] & HILAL_MASK_UNUSABLE) != 0)
                continue;
            double v = img[i];
            if (!isfinite(v))
                continue;
            double dx = (double)x - x0, dy = (double)y - y0, r2 = dx * dx + dy * dy;
            if (r2 > r_max * r_max)
                continue;
            if (nothers > 0 && owned_by_other((double)x, (double)y, x0, y0, others, nothers))
                continue;
            double wi = exp(-r2 * inv2s2) * sign * v;
            m0 += wi;
            mxx += wi * dx * dx;
            myy += wi * dy * dy;
            mxy += wi * dx * dy;
        }
    }
    if (!(m0 > 0))
        return m0;
    mxx /= m0;
    myy /= m0;
    mxy /= m0;
    /* Eigenvalues mu1 >= mu2 of M_w. The weight is isotropic, so the source
     * covariance C shares M_w's axes and, for a Gaussian source,
     * 1/c = 1/mu - 1/s_w^2 on each axis. mu close to s_w^2 means a source
     * much broader than the weight: c is capped at 19 s_w^2 (mu = 0.95 s_w^2).
     * Nothing is narrower than a pixel: c >= 1/12 px^2. */
    const double tr = 0.5 * (mxx + myy), dd = sqrt(0.25 * (mxx - myy) * (mxx - myy) + mxy * mxy);
    const double mu[2] = {tr + dd, tr - dd};
    const double sw2 = sigma_w * sigma_w;
    double cv[2];
    for (int k = 0; k < 2; k++) {
        double m = mu[k];
        if (m > 0.95 * sw2)
            m = 0.95 * sw2;
        cv[k] = m > 0 ? m * sw2 / (sw2 - m) : 0.0;
        if (cv[k] < 1.0 / 12.0)
            cv[k] = 1.0 / 12.0;
    }
    *fwhm_px = FWHM_PER_SIGMA * sqrt(sqrt(cv[0] * cv[1]));
    *elongation = sqrt(cv[0] / cv[1]);
    return m0;
}

double hilal_measure_weight_sigma(const hilal_psf *psf, double weight_scale)
{
    if (psf == NULL)
        return NAN;
    double sigma = NAN;
    if (isfinite(psf->fwhm_px) && psf->fwhm_px > 0) {
        sigma = psf->fwhm_px / FWHM_PER_SIGMA;
    } else if (psf->data != NULL && psf->size > 0) {
        /* Unweighted second moments of the positive part of the PSF image. */
        const int size = psf->size, c = size / 2;
        double s0 = 0, s2 = 0;
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) {
                double v = psf->data[y * size + x];
                if (v > 0) {
                    s0 += v;
                    s2 += v * ((x - c) * (x - c) + (y - c) * (y - c));
                }
            }
        if (s0 > 0)
            sigma = sqrt(0.5 * s2 / s0);
    }
    return sigma * weight_scale;
}

/* ---- neighbours --------------------------------------------------------- */

/* qsort context is not portable: sort (y, index) pairs instead. */
typedef struct ykey {
    double y;
    size_t i;
} ykey;

static int cmp_ykey(const void *pa, const void *pb)
{
    const ykey *a = pa, *b = pb;
    if (a->y != b->y)
        return a->y < b->y ? -1 : 1;
    return a->i < b->i ? -1 : (a->i > b->i);
}

hilal_status hilal_neighbours_init(hilal_neighbours *nb, const hilal_candidate *cands, size_t n,
                                   hilal_error *err)
{
    memset(nb, 0, sizeof *nb);
    nb->cands = cands;
    if (n == 0)
        return HILAL_OK;
    ykey *keys = malloc(n * sizeof *keys);
    nb->order = malloc(n * sizeof *nb->order);
    if (keys == NULL || nb->order == NULL) {
        free(keys);
        hilal_neighbours_clear(nb);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory indexing %zu candidates", n);
    }
    for (size_t k = 0; k < n; k++)
        keys[k] = (ykey){cands[k].y, k};
    qsort(keys, n, sizeof *keys, cmp_ykey);
    for (size_t k = 0; k < n; k++)
        nb->order[k] = keys[k].i;
    free(keys);
    nb->n = n;
    return HILAL_OK;
}

size_t hilal_neighbours_find(const hilal_neighbours *nb, size_t k, double radius, double *xy,
                             size_t max)
{
    if (nb == NULL || k >= nb->n || max == 0)
        return 0;
    const hilal_candidate *c = nb->cands;
    const double x0 = c[k].x, y0 = c[k].y;
    /* First index with y >= y0 - radius (binary search on the y order). */
    size_t lo = 0, hi = nb->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (c[nb->order[mid]].y < y0 - radius)
            lo = mid + 1;
        else
            hi = mid;
    }
    size_t m = 0;
    for (size_t j = lo; j < nb->n && m < max; j++) {
        const hilal_candidate *o = &c[nb->order[j]];
        if (o->y > y0 + radius)
            break;
        double dx = o->x - x0, dy = o->y - y0;
        if (nb->order[j] == k || dx * dx + dy * dy > radius * radius)
            continue;
        xy[2 * m] = o->x - 1.0;
        xy[2 * m + 1] = o->y - 1.0;
        m++;
    }
    return m;
}

void hilal_neighbours_clear(hilal_neighbours *nb)
{
    if (nb == NULL)
        return;
    free(nb->order);
    memset(nb, 0, sizeof *nb);
}

/* ---- position and flux -------------------------------------------------- */

/* f(u, v) = a + b u + c v + d u^2 + e u v + g v^2, least squares on the 3x3
 * grid u, v in {-1, 0, 1}, optionally of ln f. */
typedef struct quad {
    double a, b, c, d, e, g;
    int is_log;
} quad;

/* Least-squares fit of the quadratic to the 3x3 values f[(v+1)*3 + (u+1)]
 * (closed form: the basis 1, u, v, u^2 - 2/3, uv, v^2 - 2/3 is orthogonal on
 * the grid). With use_log, fits ln f (all values must be > 0): exact for a
 * Gaussian peak. */
static void quad_fit(const double f_in[9], int use_log, quad *q)
{
    double f[9];
    for (int k = 0; k < 9; k++)
        f[k] = use_log ? log(f_in[k]) : f_in[k];
    double mean = 0, su[3] = {0, 0, 0}, sv[3] = {0, 0, 0};
    for (int j = 0; j < 3; j++)
        for (int i = 0; i < 3; i++) {
            double v = f[j * 3 + i];
            mean += v / 9.0;
            su[i] += v;
            sv[j] += v;
        }
    q->b = (su[2] - su[0]) / 6.0;
    q->c = (sv[2] - sv[0]) / 6.0;
    q->d = (su[2] + su[0] - 2.0 * su[1]) / 6.0;
    q->g = (sv[2] + sv[0] - 2.0 * sv[1]) / 6.0;
    q->e = (f[8] - f[6] - f[2] + f[0]) / 4.0;
    q->a = mean - 2.0 / 3.0 * (q->d + q->g);
    q->is_log = use_log;
}

static double quad_eval(const quad *q, double u, double v)
{
    double r = q->a + q->b * u + q->c * v + q->d * u * u + q->e * u * v + q->g * v * v;
    return q->is_log ? exp(r) : r;
}

/* Vertex of a maximum of the quadratic: solves [2d e; e 2g] (u v) = -(b c).
 * Falls back to one-dimensional vertices when the 2-D surface is not a
 * maximum, and clamps to the 3x3 box. */
static void quad_vertex(const quad *q, double *u, double *v)
{
    double det = 4.0 * q->d * q->g - q->e * q->e;
    if (q->d < 0 && q->g < 0 && det > 0) {
        *u = (-2.0 * q->b * q->g + q->c * q->e) / det;
        *v = (-2.0 * q->c * q->d + q->b * q->e) / det;
    } else {
        *u = q->d < 0 ? -q->b / (2.0 * q->d) : 0.0;
        *v = q->g < 0 ? -q->c / (2.0 * q->g) : 0.0;
    }
    if (!isfinite(*u))
        *u = 0;
    if (!isfinite(*v))
        *v = 0;
    *u = *u < -1 ? -1 : (*u > 1 ? 1 : *u);
    *v = *v < -1 ? -1 : (*v > 1 ? 1 : *v);
}

/* The 3x3 sign-corrected values around (x, y); 0 when a pixel is outside
 * the image or not finite. *all_pos says whether all nine are > 0 (then a
 * log fit is possible). */
static int stencil(const float *img, long nx, long ny, long x, long y, double sign, double f[9],
                   int *all_pos)
{
    *all_pos = 1;
    for (int j = -1; j <= 1; j++)
        for (int i = -1; i <= 1; i++) {
            long xx = x + i, yy = y + j;
            if (xx < 0 || yy < 0 || xx >= nx || yy >= ny)
                return 0;
            double v = sign * img[yy * nx + xx];
            if (!isfinite(v))
                return 0;
            f[(j + 1) * 3 + (i + 1)] = v;
            if (!(v > 0))
                *all_pos = 0;
        }
    return 1;
}

/* Bilinear interpolation at the 0-based position (x, y); NaN where a needed
 * pixel is missing. */
static double bilinear(const float *img, long nx, long ny, double x, double y)
{
    long ix = (long)floor(x), iy = (long)floor(y);
    double fx = x - (double)ix, fy = y - (double)iy;
    if (ix < 0 || iy < 0 || ix >= nx || iy >= ny)
        return NAN;
    long ix1 = ix + 1 < nx ? ix + 1 : ix, iy1 = iy + 1 < ny ? iy + 1 : iy;
    double v00 = img[iy * nx + ix], v10 = img[iy * nx + ix1];
    double v01 = img[iy1 * nx + ix], v11 = img[iy1 * nx + ix1];
    return (1 - fy) * ((1 - fx) * v00 + fx * v10) + fy * ((1 - fx) * v01 + fx * v11);
}

/* Position and flux of one candidate. */
static void measure_one(const hilal_diff *diff, hilal_candidate *c)
{
    const long nx = diff->nx, ny = diff->ny;
    const double sign = c->snr < 0 ? -1.0 : 1.0;
    long ix = (long)floor(c->x - 1.0 + 0.5), iy = (long)floor(c->y - 1.0 + 0.5);
    if (ix < 0)
        ix = 0;
    if (iy < 0)
        iy = 0;
    if (ix >= nx)
        ix = nx - 1;
    if (iy >= ny)
        iy = ny - 1;

    /* 1. Sub-pixel position: vertex of the quadratic through ln(sign S_corr)
     * (or sign S_corr when a pixel of the 3x3 is not positive). */
    double f[9], u = 0, v = 0;
    int all_pos = 0;
    if (stencil(diff->scorr, nx, ny, ix, iy, sign, f, &all_pos)) {
        quad q;
        quad_fit(f, all_pos, &q);
        quad_vertex(&q, &u, &v);
    }
    c->x = (double)ix + u + 1.0;
    c->y = (double)iy + v + 1.0;

    /* 2. Flux at the vertex: the same model fitted to the flux image (which
     * is S scaled by a smooth normalisation); its error interpolated
     * bilinearly. */
    c->flux = NAN;
    c->flux_err = NAN;
    if (diff->flux != NULL) {
        if (stencil(diff->flux, nx, ny, ix, iy, sign, f, &all_pos)) {
            quad q;
            quad_fit(f, all_pos, &q);
            c->flux = sign * quad_eval(&q, u, v);
        } else {
            c->flux = diff->flux[iy * nx + ix];
        }
    }
    if (diff->flux_err != NULL)
        c->flux_err = bilinear(diff->flux_err, nx, ny, (double)ix + u, (double)iy + v);
}

/* The candidates of a frame being measured, shared by the threads. */
typedef struct measure_job {
    const hilal_diff *diff;
    hilal_candidate *cands;
    const hilal_neighbours *nb;
    double sigma_w, zp, mjd;
} measure_job;

/* hilal_parallel_for() body: position and flux of candidates lo .. hi - 1. */
static void position_range(void *ctx, long lo, long hi, int tid)
{
    const measure_job *j = ctx;
    (void)tid;
    for (long k = lo; k < hi; k++)
        measure_one(j->diff, &j->cands[k]);
}

/* hilal_parallel_for() body: shape, magnitude and time of candidates
 * lo .. hi - 1 (the positions of all of them are final). */
static void shape_range(void *ctx, long lo, long hi, int tid)
{
    const measure_job *j = ctx;
    const hilal_diff *diff = j->diff;
    (void)tid;
    for (long k = lo; k < hi; k++) {
        hilal_candidate *c = &j->cands[k];
        double others[2 * 32];
        size_t no = hilal_neighbours_find(j->nb, (size_t)k, 7.0 * j->sigma_w, others, 32);
        c->fwhm = NAN;
        c->elongation = NAN;
        if (diff->d != NULL)
            hilal_measure_shape(diff->d, diff->nx, diff->ny, diff->mask, c->x - 1.0, c->y - 1.0,
                                c->snr < 0 ? -1.0 : 1.0, j->sigma_w, others, no, &c->fwhm,
                                &c->elongation);
        /* 4. Magnitude of |flux| with the zero point (mag of 1 ADU):
         * m = zp - 2.5 log10|F|, sigma_m = 2.5/ln(10) sigma_F/|F|. */
        c->mag = NAN;
        c->mag_err = NAN;
        if (isfinite(j->zp) && isfinite(c->flux) && c->flux != 0) {
            c->mag = j->zp - 2.5 * log10(fabs(c->flux));
            c->mag_err = 1.0857362047581294 * c->flux_err / fabs(c->flux);
        }
        c->mjd = j->mjd;
        c->ra = NAN;
        c->dec = NAN;
    }
}

/* hilal_measure_candidates() on up to `threads` threads. Each candidate is
 * measured from the frame and the final positions of the others alone, so
 * the results do not depend on the number of threads. */
static hilal_status measure_candidates(const hilal_diff *diff, const hilal_image *sci,
                                       double weight_scale, int threads, hilal_candidate *cands,
                                       size_t n, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    double *xs = NULL, *ys = NULL, *ra = NULL, *dec = NULL;
    hilal_neighbours nb;
    memset(&nb, 0, sizeof nb);
    if (n == 0)
        return HILAL_OK;
    if (diff == NULL || diff->scorr == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "measurement needs the S_corr image of the difference, which is "
                               "missing");
    if (sci == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "measurement needs the science image's metadata, which is missing");
    const double sigma_w = hilal_measure_weight_sigma(&diff->psf_d, weight_scale);
    if (!(sigma_w > 0))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "P_D (the PSF of the difference) is missing or empty, so the shape "
                               "of candidates cannot be measured; the subtract stage must fill "
                               "diff.psf_d");

    /* 1-2. Positions and fluxes. */
    measure_job job = {diff, cands, &nb, sigma_w, sci->meta.zeropoint_mag, sci->meta.mjd};
    hilal_parallel_for(threads, (long)n, position_range, &job);

    /* 3. Shape on D, sign-corrected so that a fading source is positive,
     * leaving out the pixels nearer to another candidate. */
    st = hilal_neighbours_init(&nb, cands, n, err);
    if (st != HILAL_OK)
        return st;
    hilal_parallel_for(threads, (long)n, shape_range, &job);

    /* 5. Sky positions, all at once. */
    if (sci->meta.wcs != NULL) {
        if (n > (size_t)0x7fffffff) {
            st = hilal_error_set(err, HILAL_ERR_RANGE, "too many candidates (%zu) for wcslib", n);
            goto cleanup;
        }
        xs = malloc(n * sizeof *xs);
        ys = malloc(n * sizeof *ys);
        ra = malloc(n * sizeof *ra);
        dec = malloc(n * sizeof *dec);
        if (xs == NULL || ys == NULL || ra == NULL || dec == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory converting %zu positions", n);
            goto cleanup;
        }
        for (size_t k = 0; k < n; k++) {
            xs[k] = cands[k].x;
            ys[k] = cands[k].y;
        }
        st = hilal_wcs_pix2sky(sci->meta.wcs, (int)n, xs, ys, ra, dec, err);
        if (st != HILAL_OK) {
            hilal_error_context(err, "sky positions of candidates");
            goto cleanup;
        }
        for (size_t k = 0; k < n; k++) {
            cands[k].ra = ra[k];
            cands[k].dec = dec[k];
        }
    }
cleanup:
    hilal_neighbours_clear(&nb);
    free(xs);
    free(ys);
    free(ra);
    free(dec);
    return st;
}

hilal_status hilal_measure_candidates(const hilal_diff *diff, const hilal_image *sci,
                                      double weight_scale, hilal_candidate *cands, size_t n,
                                      hilal_error *err)
{
    return measure_candidates(diff, sci, weight_scale, 1, cands, n, err);
}

/* ---- the stage ---------------------------------------------------------- */

typedef struct measure_state {
    double weight_scale;
    int threads;                /* pipeline.threads (0: one per core) */
} measure_state;

static hilal_status measure_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    measure_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    s->weight_scale = hilal_config_get_double(cfg, "measure.weight_scale");
    s->threads = 1;
    if (hilal_config_param(cfg, "pipeline.threads") != NULL)
        s->threads = hilal_fft_threads((int)hilal_config_get_int(cfg, "pipeline.threads"));
    *state = s;
    return HILAL_OK;
}

static hilal_status measure_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const measure_state *s = state;
    return measure_candidates(&frame->diff, frame->sci, s->weight_scale, s->threads, frame->cands,
                              frame->ncands, err);
}

static void measure_fini(void *state) { free(state); }

const hilal_stage hilal_stage_measure = {
    .name = "measure",
    .summary = "sub-pixel position, PSF flux, magnitude, sky position and shape of candidates",
    .params = measure_params,
    .nparams = sizeof measure_params / sizeof measure_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_DIFFERENCE | HILAL_PROD_CANDIDATES,
    .makes = HILAL_PROD_MEASURED,
    .flags = 0,
    .init = measure_init,
    .run = measure_run,
    .fini = measure_fini,
};
