/* The stars stage: source extraction on the sky-subtracted science and
 * reference images, photometry, shape, and the `usable` flag that selects
 * stars fit for the PSF, alignment and flux scaling. The two images are
 * processed concurrently when pipeline.threads allows (libsep runs
 * extractions of different images at once; see sepw.h).
 *
 * For each image:
 *  1. libsep extraction (SExtractor's algorithm, Bertin & Arnouts 1996) on
 *     pix - sky, thresholded at thresh_sigma x the global background RMS
 *     after smoothing with the 3x3 pyramid kernel, with minarea,
 *     multi-threshold deblending and cleaning. Unusable and saturated
 *     pixels are 0 in the extraction (see below); the measurements see the
 *     saturated pixels' values, masked.
 *  2. The max_stars detections of highest isophotal S/N (flux over the
 *     noise of its footprint) are measured: the half-light radius r50
 *     (sep_flux_radius), the windowed centroid (SExtractor's XWIN: the
 *     Gaussian-weighted centroid of sigma = 2 r50 / 2.3548, iterated),
 *     the FWHM from the half-maximum area (hilal_psf_measure_fwhm). The
 *     other detections only get an aperture flux (for the isolation test):
 *     on a 4096^2 frame of 3000 detections this keeps the stage's cost to
 *     the objects that can matter.
 *  3. The stellar FWHM (the densest cluster of FWHM values of clean, round,
 *     bright detections: stellar_fwhm) sets the photometric aperture
 *     (radius aper_fwhm x FWHM): flux_adu and flux_err_adu are the exact
 *     circular-aperture sum and its error from the variance plane.
 *  4. usable = all of
 *       - not truncated by the image border, no masked pixel in the aperture;
 *       - farther than pipeline.edge_margin + aperture radius from the border;
 *       - unsaturated: peak + sky < sat_frac x saturation level (when known);
 *       - isolated: no other detection with flux >= iso_flux_frac x its flux
 *         within iso_fwhm x FWHM;
 *       - round: b/a >= min_axis_ratio;
 *       - point-like: FWHM within [min_fwhm_frac, max_fwhm_frac] x the
 *         stellar FWHM (rejects cosmic rays and hot pixels, and galaxies),
 *         and no wider than (1 + max(fwhm_tol, 7.5 / SNR)) x the stellar
 *         FWHM (three times the FWHM scatter of stars at that S/N: a bright
 *         compact galaxy, 20% wider than the stars at S/N 100, is not a
 *         star, while faint stars keep their noise), and as concentrated as
 *         the median star (flux within 1 FWHM over flux within 2.5 FWHM,
 *         within conc_tol and 3 sigma: rejects galaxies with star-like
 *         cores);
 *       - positive flux.
 *  5. The measured detections are sorted by flux.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
#include "hilal/fft.h"
#include "hilal/log.h"
#include "hilal/psf.h"
#include "hilal/stage.h"
#include "hilal/stats.h"
#include "sepw.h"
#include "vecops.h"

static const hilal_param stars_params[] = {
    {"thresh_sigma", HILAL_PARAM_DOUBLE, "5", 0.5, 1e4, "sigma",
     "detection threshold per pixel (image smoothed with a 3x3 kernel)"},
    {"minarea", HILAL_PARAM_INT, "5", 1, 100000, "px", "minimum number of pixels above threshold"},
    {"filter", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "smooth with SExtractor's 3x3 pyramid kernel before thresholding"},
    {"deblend_nthresh", HILAL_PARAM_INT, "32", 1, 1024, "", "deblending sub-thresholds"},
    {"deblend_cont", HILAL_PARAM_DOUBLE, "0.005", 0, 1, "",
     "minimum flux fraction of a deblended branch (1 = no deblending)"},
    {"clean", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "remove spurious detections in the wings of bright objects"},
    {"clean_param", HILAL_PARAM_DOUBLE, "1", 0.1, 10, "", "cleaning efficiency"},
    {"pixstack", HILAL_PARAM_INT, "1000000", 10000, 1000000000, "px",
     "pixels above threshold held at once by the extractor (raise for crowded frames)"},
    {"max_stars", HILAL_PARAM_INT, "1000", 10, 1000000, "",
     "detections kept per image, highest S/N first"},
    {"aper_fwhm", HILAL_PARAM_DOUBLE, "1.5", 0.5, 10, "FWHM",
     "radius of the photometric aperture in units of the stellar FWHM"},
    {"iso_fwhm", HILAL_PARAM_DOUBLE, "3", 0, 50, "FWHM",
     "isolation radius for usable stars, in units of the stellar FWHM"},
    {"iso_flux_frac", HILAL_PARAM_DOUBLE, "0.1", 0, 100, "",
     "a neighbour within the isolation radius with this fraction of the flux or more spoils a star"},
    {"sat_frac", HILAL_PARAM_DOUBLE, "0.8", 0.01, 1, "",
     "usable stars peak below this fraction of the saturation level"},
    {"min_axis_ratio", HILAL_PARAM_DOUBLE, "0.6", 0, 1, "", "minimum b/a of usable stars"},
    {"min_fwhm_frac", HILAL_PARAM_DOUBLE, "0.7", 0, 1, "",
     "usable stars have FWHM >= this x the stellar FWHM (smaller: cosmic ray, hot pixel)"},
    {"max_fwhm_frac", HILAL_PARAM_DOUBLE, "1.3", 1, 100, "",
     "usable stars have FWHM <= this x the stellar FWHM (larger: galaxy, blend)"},
    {"fwhm_tol", HILAL_PARAM_DOUBLE, "0.05", 0, 10, "",
     "usable stars are at most max(this, 7.5/SNR) wider than the stellar FWHM"},
    {"conc_tol", HILAL_PARAM_DOUBLE, "0.05", 0, 1, "",
     "usable stars are at most this fraction (plus 3 sigma) less concentrated than the median star"},
};

typedef struct stars_state {
    hilal_sepw_extract_params xp;
    long max_stars;
    double aper_fwhm, iso_fwhm, iso_flux_frac, sat_frac, min_axis_ratio;
    double min_fwhm_frac, max_fwhm_frac, fwhm_tol, conc_tol;
    long edge_margin;
    int threads;
} stars_state;

static hilal_status stars_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    stars_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    s->xp.thresh_sigma = hilal_config_get_double(cfg, "stars.thresh_sigma");
    s->xp.minarea = (int)hilal_config_get_int(cfg, "stars.minarea");
    s->xp.filter = hilal_config_get_bool(cfg, "stars.filter");
    s->xp.deblend_nthresh = (int)hilal_config_get_int(cfg, "stars.deblend_nthresh");
    s->xp.deblend_cont = hilal_config_get_double(cfg, "stars.deblend_cont");
    s->xp.clean = hilal_config_get_bool(cfg, "stars.clean");
    s->xp.clean_param = hilal_config_get_double(cfg, "stars.clean_param");
    s->xp.pixstack = (size_t)hilal_config_get_int(cfg, "stars.pixstack");
    s->max_stars = hilal_config_get_int(cfg, "stars.max_stars");
    s->aper_fwhm = hilal_config_get_double(cfg, "stars.aper_fwhm");
    s->iso_fwhm = hilal_config_get_double(cfg, "stars.iso_fwhm");
    s->iso_flux_frac = hilal_config_get_double(cfg, "stars.iso_flux_frac");
    s->sat_frac = hilal_config_get_double(cfg, "stars.sat_frac");
    s->min_axis_ratio = hilal_config_get_double(cfg, "stars.min_axis_ratio");
    s->min_fwhm_frac = hilal_config_get_double(cfg, "stars.min_fwhm_frac");
    s->max_fwhm_frac = hilal_config_get_double(cfg, "stars.max_fwhm_frac");
    s->fwhm_tol = hilal_config_get_double(cfg, "stars.fwhm_tol");
    s->conc_tol = hilal_config_get_double(cfg, "stars.conc_tol");
    /* pipeline.threads = 0: one per core. */
    s->threads = hilal_fft_threads((int)hilal_config_get_int(cfg, "pipeline.threads"));
    s->edge_margin = hilal_config_get_int(cfg, "pipeline.edge_margin");
    *state = s;
    return HILAL_OK;
}

/* Working record of one detection. */
typedef struct det {
    double x, y;        /* windowed centroid, 0-based */
    double r50;         /* half-light radius, px */
    double fwhm;        /* px, NaN if not measured */
    double flux, flux_err;
    double snr;
    double conc, conc_err; /* flux within 1 FWHM / flux within 2.5 FWHM, and its error */
    unsigned flags;     /* SEP object | aperture flags */
    const hilal_sepw_object *o;
} det;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sort helpers through a file-scope pointer are not thread-safe; sort
 * index records that carry their keys instead. */
typedef struct keyed {
    double key;
    size_t idx;
} keyed;

static int cmp_keyed_desc(const void *a, const void *b)
{
    double x = ((const keyed *)a)->key, y = ((const keyed *)b)->key;
    return (x < y) - (x > y);
}

static int cmp_keyed_asc(const void *a, const void *b)
{
    double x = ((const keyed *)a)->key, y = ((const keyed *)b)->key;
    return (x > y) - (x < y);
}

/* The FWHM of the stellar locus among n FWHM values (reordered): stars
 * pile up at the PSF's FWHM, while cosmic rays and hot pixels spread over
 * smaller values and galaxies and blends over larger ones, so a plain
 * median is pulled by whichever is numerous. The locus is the value with
 * the most neighbours within +-5% (ties go to the larger FWHM: nothing real
 * is sharper than the PSF); the result is the median of the values within
 * +-15% of it. NaN for n == 0. */
static double stellar_fwhm(double *v, size_t n)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    size_t best = 0, best_count = 0, lo = 0, hi = 0;
    for (size_t i = 0; i < n; i++) {
        /* Two pointers over the sorted values: [lo, hi) within +-5%. */
        while (v[lo] < v[i] / 1.05)
            lo++;
        if (hi < i)
            hi = i;
        while (hi < n && v[hi] <= v[i] * 1.05)
            hi++;
        if (hi - lo >= best_count) {
            best_count = hi - lo;
            best = i;
        }
    }
    double c = v[best];
    size_t a = 0, b = 0;
    while (a < n && v[a] < c / 1.15)
        a++;
    b = a;
    while (b < n && v[b] <= c * 1.15)
        b++;
    size_t m = b - a;
    return m % 2 ? v[a + m / 2] : 0.5 * (v[a + m / 2 - 1] + v[a + m / 2]);
}

/* Whether any unusable pixel lies within radius r of (x, y), 0-based. */
static int masked_within(const hilal_image *img, double x, double y, double r)
{
    long x0 = (long)floor(x - r), x1 = (long)ceil(x + r);
    long y0 = (long)floor(y - r), y1 = (long)ceil(y + r);
    for (long j = y0; j <= y1; j++)
        for (long i = x0; i <= x1; i++) {
            if ((i - x) * (i - x) + (j - y) * (j - y) > r * r)
                continue;
            if (i < 0 || j < 0 || i >= img->nx || j >= img->ny)
                return 1;
            long q = j * img->nx + i;
            if ((img->mask[q] & HILAL_MASK_UNUSABLE) || !isfinite(img->pix[q]))
                return 1;
        }
    return 0;
}

/* Values of the stage's SEP mask. */
#define MASK_SAT 1 /* saturated: 0 in the extraction, masked in the measurements */
#define MASK_BAD 2 /* unusable */

/* Largest radius of the per-detection measurements, px. */
#define MEASURE_RMAX 25.0

/* SExtractor's windowed centroid (XWIN/YWIN; Bertin's SExtractor manual,
 * "windowed positional parameters"): starting from (x, y), iterate
 *     x <- x + 2 sum w I (x_i - x) / sum w I,  w = exp(-r_i^2 / (2 sig^2)),
 * over the unmasked pixels within 4 sig (the weight is 3e-4 there, so
 * pixel centres decide membership), until the step falls below 1e-4 px or
 * after 16 steps; the factor 2 makes each step exact for a Gaussian
 * profile. The Gaussian weight is separable, exp(-dx^2 / 2 sig^2) exp(-dy^2
 * / 2 sig^2): one exponential per column and per row of the window rather
 * than per pixel. Returns 0 (and leaves the output alone) when the weighted
 * flux is not positive or the window is wider than WIN_MAXW. Coordinates
 * 0-based. */
#define WIN_NSIG 4.0
#define WIN_NITER 16
#define WIN_STEPMIN 1e-4
#define WIN_MAXW 64 /* widest window, px (4 sig of a star of r50 <= MEASURE_RMAX / 4 fits) */
static int windowed_centroid(const float *d, const uint8_t *mask, long nx, long ny, double x,
                             double y, double sig, double *xo, double *yo)
{
    if (!(sig > 0.0))
        return 0;
    double r = WIN_NSIG * sig, r2 = r * r, inv2s2 = 0.5 / (sig * sig);
    double wx[WIN_MAXW], wy[WIN_MAXW];
    for (int it = 0; it < WIN_NITER; it++) {
        long i0 = (long)floor(x - r), i1 = (long)ceil(x + r);
        long j0 = (long)floor(y - r), j1 = (long)ceil(y + r);
        if (i1 - i0 >= WIN_MAXW || j1 - j0 >= WIN_MAXW)
            return 0;
        for (long i = i0; i <= i1; i++)
            wx[i - i0] = exp(-(i - x) * (i - x) * inv2s2);
        for (long j = j0; j <= j1; j++)
            wy[j - j0] = exp(-(j - y) * (j - y) * inv2s2);
        double sw = 0.0, sx = 0.0, sy = 0.0;
        for (long j = j0 < 0 ? 0 : j0; j <= j1 && j < ny; j++) {
            double dy = j - y;
            for (long i = i0 < 0 ? 0 : i0; i <= i1 && i < nx; i++) {
                double dx = i - x, dd = dx * dx + dy * dy;
                long q = j * nx + i;
                if (dd > r2 || mask[q])
                    continue;
                double wi = wy[j - j0] * wx[i - i0] * d[q];
                sw += wi;
                sx += wi * dx;
                sy += wi * dy;
            }
        }
        if (!(sw > 0.0))
            return 0;
        double stepx = 2.0 * sx / sw, stepy = 2.0 * sy / sw;
        x += stepx;
        y += stepy;
        if (stepx * stepx + stepy * stepy < WIN_STEPMIN * WIN_STEPMIN)
            break;
    }
    *xo = x;
    *yo = y;
    return isfinite(x) && isfinite(y);
}


/* The detection planes of n pixels (see stars_image): mask MASK_SAT for
 * saturated pixels (finite, with no unusable bit but SAT), MASK_BAD for
 * other pixels that are non-finite, have an unusable bit or no variance
 * (VAR >= 1e29), 0 elsewhere; sub = pix - sky, 0 where the mask is not
 * (restore_saturated puts the saturated pixels' values back).
 * Branch-free (bitwise logic) so that it vectorises: it runs over every
 * pixel of both images. */
static void detection_planes(const float *restrict pix, const float *restrict sky,
                             const float *restrict var, const hilal_mask_t *restrict imask,
                             size_t n, float *restrict sub, uint8_t *restrict mask)
{
    for (size_t i = 0; i < n; i++) {
        const int bits = imask[i] & HILAL_MASK_UNUSABLE;
        const int fin = fabsf(pix[i]) <= FLT_MAX;
        const int sat = fin & (bits == HILAL_MASK_SAT);
        const int bad = (!sat) & (!fin | (bits != 0) | !(var[i] < 1e29f));
        mask[i] = (uint8_t)(bad * MASK_BAD + sat * MASK_SAT);
        sub[i] = zero_unless(pix[i] - sky[i], !(bad | sat));
    }
}

/* sub = pix - sky where mask is MASK_SAT. Each block is first scanned with
 * a branch-free count: blocks without a saturated pixel, nearly all, are
 * only read. */
static void restore_saturated(const float *pix, const float *sky, const uint8_t *mask, size_t n,
                              float *sub)
{
    enum { BLOCK = 4096 };
    for (size_t b0 = 0; b0 < n; b0 += BLOCK) {
        size_t b1 = b0 + BLOCK < n ? b0 + BLOCK : n, nsat = 0;
        for (size_t i = b0; i < b1; i++)
            nsat += mask[i] == MASK_SAT;
        for (size_t i = b0; nsat > 0 && i < b1; i++)
            if (mask[i] == MASK_SAT)
                sub[i] = pix[i] - sky[i];
    }
}

static hilal_status stars_image(const stars_state *s, const hilal_image *img,
                                hilal_starlist *out, const char *which, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t n = (size_t)img->nx * (size_t)img->ny;
    float *sub = NULL;
    uint8_t *mask = NULL;
    hilal_sepw_object *objs = NULL;
    size_t nobj = 0;
    det *d = NULL;
    keyed *order = NULL, *byx = NULL;
    double *tmp = NULL;
    hilal_star *list = NULL;
    const char *path = img->meta.path[0] != '\0' ? img->meta.path : "(unnamed)";

    hilal_starlist_clear(out);
    if (img->sky == NULL || img->var == NULL) {
        st = hilal_error_set(err, HILAL_ERR_INTERNAL,
                             "%s image %s has no sky or variance plane (run background first)",
                             which, path);
        goto cleanup;
    }
    sub = malloc(n * sizeof *sub);
    mask = malloc(n);
    if (sub == NULL || mask == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for star extraction");
        goto cleanup;
    }
    /* Detection planes: pix - sky, and the mask of the measurements
     * (saturated and unusable pixels). libsep's extraction sets every
     * masked pixel to 0 before smoothing, whatever the mask level (libsep
     * 1.2 applies the level in its aperture and background functions
     * only), so a saturated star is extracted around a hole of zeros; the
     * extraction is given those zeros directly and no mask, which gives the
     * same catalogue without libsep converting and applying a mask line by
     * line (~10% of the extraction). The saturated pixels' values are put
     * back for the measurements, which mask them. The threshold is relative
     * to the global background RMS (as SExtractor's default): at an
     * isophote a few sigma above the sky the source's own noise is
     * negligible, so the variance plane would change little, and leaving it
     * out saves a full-size plane. */
    detection_planes(img->pix, img->sky, img->var, img->mask, n, sub, mask);

    /* 1. Extraction. */
    hilal_sepw_extract_params xp = s->xp;
    xp.noise_sigma = img->sky_rms_adu;
    hilal_sepw_image dim = {sub, NULL, NULL, img->nx, img->ny, 0};
    st = hilal_sepw_extract(&dim, &xp, &objs, &nobj, err);
    restore_saturated(img->pix, img->sky, mask, n, sub);
    if (st != HILAL_OK) {
        hilal_error_context(err, "%s image %s", which, path);
        goto cleanup;
    }
    /* The measurements: variance plane, saturated pixels masked too. */
    hilal_sepw_image im = {sub, img->var, mask, img->nx, img->ny, 0};
    if (nobj == 0) {
        hilal_log(HILAL_LOG_WARN, "%s image %s: no sources above %.1f sigma", which, path,
                  s->xp.thresh_sigma);
        goto cleanup;
    }

    d = calloc(nobj, sizeof *d);
    order = calloc(nobj, sizeof *order);
    byx = malloc(nobj * sizeof *byx);
    tmp = calloc(nobj, sizeof *tmp);
    if (d == NULL || order == NULL || byx == NULL || tmp == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu detections", nobj);
        goto cleanup;
    }

    /* 2. The detections to measure: the max_stars of highest isophotal S/N,
     *    flux_iso / sqrt(npix rms^2 + flux_iso / gain) (the footprint's
     *    background noise and the source's Poisson noise). */
    double gain = img->meta.gain_e_per_adu;
    double inv_gain = isfinite(gain) && gain > 0.0 ? 1.0 / gain : 0.0;
    double rms2 = img->sky_rms_adu * img->sky_rms_adu;
    for (size_t k = 0; k < nobj; k++) {
        const hilal_sepw_object *o = &objs[k];
        double nv = (double)o->npix * rms2 + fmax(o->flux_iso, 0.0) * inv_gain;
        order[k].key = nv > 0.0 ? o->flux_iso / sqrt(nv) : -1e300;
        order[k].idx = k;
    }
    qsort(order, nobj, sizeof *order, cmp_keyed_desc);
    size_t nkeep = nobj < (size_t)s->max_stars ? nobj : (size_t)s->max_stars;

    /* Radius, windowed centroid and FWHM of the detections measured; the
     * others keep their barycentre. */
    for (size_t k = 0; k < nobj; k++) {
        d[k].o = &objs[k];
        d[k].x = objs[k].x;
        d[k].y = objs[k].y;
        d[k].flags = objs[k].flags;
        d[k].fwhm = NAN;
        d[k].r50 = NAN;
    }
    for (size_t m = 0; m < nkeep; m++) {
        det *e = &d[order[m].idx];
        const hilal_sepw_object *o = e->o;
        unsigned fl = 0;
        /* Radii capped: cosmic-ray tracks, bleed trails and large
         * galaxies (a of tens of px) would cost much and are never
         * usable. */
        double rmax = fmin(MEASURE_RMAX, fmax(4.0, 5.0 * o->a));
        double r50 = NAN;
        st = hilal_sepw_flux_radius(&im, o->x, o->y, rmax, 0.5, &r50, &fl, err);
        if (st != HILAL_OK)
            goto cleanup;
        e->r50 = r50 > 0.0 && isfinite(r50) ? r50 : fmax(o->a, 0.5);
        double xw, yw;
        /* Keep the barycentre when the windowed centroid wandered off (or
         * for sources too large to be stars). */
        if (e->r50 <= MEASURE_RMAX / 4.0 &&
            windowed_centroid(sub, mask, img->nx, img->ny, o->x, o->y, 2.0 * e->r50 / 2.3548,
                              &xw, &yw) &&
            hypot(xw - o->x, yw - o->y) < 1.0) {
            e->x = xw;
            e->y = yw;
        }
        /* The half-maximum contour lies at ~0.85 r50 (Gaussian); 2 r50 leaves
         * room for elongated sources. Capped at 15 px: extended objects
         * (r50 of tens of px) would cost much and are never usable. */
        e->fwhm = hilal_psf_measure_fwhm(sub, NULL, img->nx, img->ny, e->x, e->y,
                                         fmin(15.0, fmax(3.0, 2.0 * e->r50)));
    }

    /* 3. The stellar FWHM from clean, round measured detections with a peak
     *    of at least 10 sigma (all measured ones when fewer than 3
     *    qualify). */
    size_t nm = 0;
    for (size_t m = 0; m < nkeep; m++) {
        const det *e = &d[order[m].idx];
        const hilal_sepw_object *o = e->o;
        long q = (long)o->ypeak * img->nx + o->xpeak;
        double sig = img->var[q] < 1e29f ? sqrt(img->var[q]) : img->sky_rms_adu;
        if (isfinite(e->fwhm) && e->fwhm > 0.0 && o->flags == 0 && o->peak >= 10.0 * sig &&
            o->a > 0.0 && o->b / o->a >= s->min_axis_ratio)
            tmp[nm++] = e->fwhm;
    }
    if (nm < 3) {
        nm = 0;
        for (size_t m = 0; m < nkeep; m++)
            if (isfinite(d[order[m].idx].fwhm) && d[order[m].idx].fwhm > 0.0)
                tmp[nm++] = d[order[m].idx].fwhm;
    }
    double med_fwhm = stellar_fwhm(tmp, nm);
    double r_ap = isfinite(med_fwhm) ? fmax(2.0, s->aper_fwhm * med_fwhm) : 3.0;

    /* Aperture photometry of every detection (the isolation test compares
     * fluxes with all of them); the concentration of the measured ones. */
    for (size_t k = 0; k < nobj; k++) {
        det *e = &d[k];
        double sum = NAN, sumerr = NAN;
        unsigned fl = 0;
        st = hilal_sepw_sum_circle(&im, e->x, e->y, r_ap, &sum, &sumerr, &fl, err);
        if (st != HILAL_OK)
            goto cleanup;
        e->flux = sum;
        e->flux_err = sumerr;
        e->flags |= fl;
        e->snr = sumerr > 0.0 ? sum / sumerr : 0.0;
        e->conc = e->conc_err = NAN;
    }
    for (size_t m = 0; m < nkeep && isfinite(med_fwhm); m++) {
        /* Concentration: the fraction of the light within 2.5 FWHM that
         * falls within 1 FWHM. It is the same for every star (the PSF's)
         * and lower for galaxies, whose cores can be as sharp as a star's
         * while their wings are not. */
        det *e = &d[order[m].idx];
        double s1, e1, s2, e2;
        unsigned f1 = 0, f2 = 0;
        st = hilal_sepw_sum_circle(&im, e->x, e->y, fmax(1.0, med_fwhm), &s1, &e1, &f1, err);
        if (st == HILAL_OK)
            st = hilal_sepw_sum_circle(&im, e->x, e->y, 2.5 * med_fwhm, &s2, &e2, &f2, err);
        if (st != HILAL_OK)
            goto cleanup;
        if (s1 > 0.0 && s2 > 0.0) {
            e->conc = s1 / s2;
            e->conc_err = e->conc * sqrt((e1 / s1) * (e1 / s1) + (e2 / s2) * (e2 / s2));
        }
    }

    list = calloc(nkeep > 0 ? nkeep : 1, sizeof *list);
    if (list == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu stars", nkeep);
        goto cleanup;
    }

    /* 4. usable. Isolation is tested against every detection (measured or
     *    not), through detections sorted by x. */
    for (size_t k = 0; k < nobj; k++) {
        byx[k].key = d[k].x;
        byx[k].idx = k;
    }
    qsort(byx, nobj, sizeof *byx, cmp_keyed_asc);
    double r_iso = isfinite(med_fwhm) ? s->iso_fwhm * med_fwhm : s->iso_fwhm * 3.0;
    double sat = img->meta.saturate_adu;
    size_t nusable = 0;
    for (size_t m = 0; m < nkeep; m++) {
        const det *e = &d[order[m].idx];
        const hilal_sepw_object *o = e->o;
        hilal_star *t = &list[m];
        t->x = e->x + 1.0;
        t->y = e->y + 1.0;
        t->flux_adu = e->flux;
        t->flux_err_adu = e->flux_err;
        t->peak_adu = o->peak;
        t->a_px = o->a;
        t->b_px = o->b;
        t->theta_rad = o->theta;
        t->fwhm_px = e->fwhm;
        t->flags = e->flags;

        int ok = e->flux > 0.0 && e->flux_err > 0.0 && isfinite(e->fwhm);
        /* Border and masks. */
        ok = ok && !(e->flags & (HILAL_SEPW_OBJ_TRUNC | HILAL_SEPW_APER_TRUNC | HILAL_SEPW_APER_HASMASKED));
        double edge = (double)s->edge_margin + r_ap;
        ok = ok && e->x >= edge && e->y >= edge && e->x <= img->nx - 1 - edge &&
             e->y <= img->ny - 1 - edge;
        ok = ok && !masked_within(img, e->x, e->y, r_ap);
        /* Saturation: the brightest pixel including the sky. */
        if (ok && isfinite(sat)) {
            long q = (long)o->ypeak * img->nx + o->xpeak;
            ok = o->peak + img->sky[q] < s->sat_frac * sat;
        }
        /* Shape: round, and the stellar FWHM within the bounds and within
         * the noise of the FWHM at this S/N (about 2.5 / SNR relative,
         * measured on simulated frames). */
        ok = ok && o->a > 0.0 && o->b / o->a >= s->min_axis_ratio;
        if (ok && isfinite(med_fwhm)) {
            double tol = fmax(s->fwhm_tol, 3.0 * 2.5 / fmax(e->snr, 1e-3));
            ok = e->fwhm >= s->min_fwhm_frac * med_fwhm && e->fwhm <= s->max_fwhm_frac * med_fwhm &&
                 e->fwhm <= (1.0 + tol) * med_fwhm;
        }
        /* Isolation: binary search for x - r_iso, scan to x + r_iso. */
        if (ok && r_iso > 0.0) {
            size_t lo = 0, hi = nobj;
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (byx[mid].key < e->x - r_iso)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            for (size_t k = lo; k < nobj && byx[k].key <= e->x + r_iso; k++) {
                const det *nb = &d[byx[k].idx];
                if (nb == e)
                    continue;
                if (hypot(nb->x - e->x, nb->y - e->y) <= r_iso &&
                    nb->flux >= s->iso_flux_frac * e->flux) {
                    ok = 0;
                    break;
                }
            }
        }
        t->usable = ok;
    }

    /* Concentration: the median over the stars usable so far is the
     * stellar value c0; a usable star must not be less concentrated than
     * c0 (1 - conc_tol) by more than 3 sigma of its own measurement. */
    {
        size_t nc = 0;
        for (size_t m = 0; m < nkeep; m++)
            if (list[m].usable && isfinite(d[order[m].idx].conc))
                tmp[nc++] = d[order[m].idx].conc;
        if (nc >= 3) {
            double c0 = hilal_median_double(tmp, nc);
            for (size_t m = 0; m < nkeep; m++) {
                const det *e = &d[order[m].idx];
                if (list[m].usable &&
                    !(e->conc >= c0 * (1.0 - s->conc_tol) - 3.0 * e->conc_err))
                    list[m].usable = 0;
            }
        }
        for (size_t m = 0; m < nkeep; m++)
            nusable += (size_t)list[m].usable;
    }

    /* 5. Sort the measured stars by decreasing flux. */
    for (size_t m = 0; m < nkeep; m++) {
        order[m].key = isfinite(list[m].flux_adu) ? list[m].flux_adu : -1e300;
        order[m].idx = m;
    }
    qsort(order, nkeep, sizeof *order, cmp_keyed_desc);
    out->stars = malloc((nkeep > 0 ? nkeep : 1) * sizeof *out->stars);
    if (out->stars == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu stars", nkeep);
        goto cleanup;
    }
    for (size_t m = 0; m < nkeep; m++)
        out->stars[m] = list[order[m].idx];
    out->n = nkeep;
    hilal_log(HILAL_LOG_DEBUG,
              "%s image %s: %zu detections, %zu kept, %zu usable, median FWHM %.2f px, "
              "aperture radius %.2f px",
              which, path, nobj, nkeep, nusable, med_fwhm, r_ap);

cleanup:
    free(sub);
    free(mask);
    free(objs);
    free(d);
    free(order);
    free(byx);
    free(tmp);
    free(list);
    if (st != HILAL_OK)
        hilal_starlist_clear(out);
    return st;
}

/* The reference image in a second thread. */
typedef struct stars_thread {
    const stars_state *s;
    const hilal_image *img;
    hilal_starlist *out;
    hilal_error err;
    hilal_status st;
} stars_thread;

static void *stars_thread_main(void *arg)
{
    stars_thread *t = arg;
    t->st = stars_image(t->s, t->img, t->out, "reference", &t->err);
    return NULL;
}

static hilal_status stars_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const stars_state *s = state;
    if (frame->sci == NULL || frame->ref == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "stars stage needs the science and reference images");
    /* Science here, reference in a second thread when allowed (or when the
     * thread cannot be started, afterwards here); the science error wins. */
    stars_thread t = {s, frame->ref, &frame->ref_stars, {0}, HILAL_OK};
    hilal_error_clear(&t.err);
    pthread_t tid;
    int threaded = s->threads >= 2 && pthread_create(&tid, NULL, stars_thread_main, &t) == 0;
    hilal_status st = stars_image(s, frame->sci, &frame->sci_stars, "science", err);
    if (threaded)
        pthread_join(tid, NULL);
    else if (st == HILAL_OK)
        stars_thread_main(&t);
    if (st == HILAL_OK && t.st != HILAL_OK)
        st = hilal_error_set(err, t.st, "%s", t.err.msg);
    if (st != HILAL_OK) {
        hilal_starlist_clear(&frame->sci_stars);
        hilal_starlist_clear(&frame->ref_stars);
        return st;
    }
    frame->products |= HILAL_PROD_STARS;
    return HILAL_OK;
}

static void stars_fini(void *state)
{
    free(state);
}

const hilal_stage hilal_stage_stars = {
    .name = "stars",
    .summary = "star catalogues of science and reference (SEP extraction, aperture photometry, "
               "usable-star selection)",
    .params = stars_params,
    .nparams = sizeof stars_params / sizeof stars_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND,
    .makes = HILAL_PROD_STARS,
    .flags = 0,
    .init = stars_init,
    .run = stars_run,
    .fini = stars_fini,
};
