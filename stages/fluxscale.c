/* The fluxscale stage: the ratio of science to reference flux of the same
 * stars, ZOGY's F_n with F_r = 1 (Zackay, Ofek & Gal-Yam 2016, section 3.4
 * and eq. 13: D depends on the flux-based zero points F_n, F_r).
 *
 * 1. Match: every usable science star is paired with the nearest usable
 *    reference star (both in science-grid pixels after align) within
 *    match_radius_px, and only mutual nearest neighbours are kept.
 * 2. Measure both fluxes the same way. method = psf (default): PSF-fit flux
 *    with each image's own normalised PSF (hilal_psf_fit_flux), exactly the
 *    flux normalisation ZOGY assumes (N = F_n P_n * T). method = aperture:
 *    circular aperture of radius aper_fwhm x the larger of the two PSF
 *    FWHMs, the same radius on both images.
 *    Pairs with S/N < min_snr in either image or a failed measurement are
 *    dropped.
 * 3. Robust scale: the weighted least-squares slope through the origin of
 *    F_sci = r F_ref, with weights w = 1 / (s_sci^2 + r^2 s_ref^2) (errors in
 *    both coordinates), iterated with clipping: a pair is rejected when its
 *    normalised residual |F_sci - r F_ref| sqrt(w) exceeds clip_sigma times
 *    max(1, robust scatter of the normalised residuals), so variable stars
 *    and blends drop out. Starts from the median of the ratios.
 * 4. Error: the formal slope error 1 / sqrt(sum w F_ref^2), scaled up by
 *    sqrt(chi^2 / (N - 1)) when the scatter exceeds the errors.
 * Too few pairs (< min_stars): with zp_fallback and both zero points known,
 * r = 10^(0.4 (zp_sci - zp_ref)) with an error of zp_err_mag; otherwise
 * HILAL_ERR_DATA.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
#include "hilal/log.h"
#include "hilal/psf.h"
#include "hilal/stage.h"
#include "sepw.h"

static const hilal_param fluxscale_params[] = {
    {"match_radius_px", HILAL_PARAM_DOUBLE, "1.5", 0.05, 50, "px",
     "largest distance between a science star and its reference counterpart"},
    {"min_stars", HILAL_PARAM_INT, "5", 1, 100000, "",
     "fewer matched stars than this: zero-point fallback or error"},
    {"min_snr", HILAL_PARAM_DOUBLE, "10", 0, 1e6, "",
     "minimum flux/flux_err of a star in both images"},
    {"clip_sigma", HILAL_PARAM_DOUBLE, "3", 1, 100, "sigma",
     "rejection threshold for outliers (variable stars, blends)"},
    {"method", HILAL_PARAM_STRING, "psf", 0, 0, "",
     "flux measurement: psf (PSF fit with each image's PSF) or aperture"},
    {"aper_fwhm", HILAL_PARAM_DOUBLE, "3", 0.5, 20, "FWHM",
     "aperture radius for method = aperture, in units of the larger PSF FWHM"},
    {"zp_fallback", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "too few stars: use the header zero points of both images when known"},
    {"zp_err_mag", HILAL_PARAM_DOUBLE, "0.05", 0, 5, "mag",
     "uncertainty assumed for the zero-point difference in the fallback"},
};

typedef struct fluxscale_state {
    double match_radius_px;
    long min_stars;
    double min_snr;
    double clip_sigma;
    int aperture;
    double aper_fwhm;
    int zp_fallback;
    double zp_err_mag;
} fluxscale_state;

static hilal_status fluxscale_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    fluxscale_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    s->match_radius_px = hilal_config_get_double(cfg, "fluxscale.match_radius_px");
    s->min_stars = hilal_config_get_int(cfg, "fluxscale.min_stars");
    s->min_snr = hilal_config_get_double(cfg, "fluxscale.min_snr");
    s->clip_sigma = hilal_config_get_double(cfg, "fluxscale.clip_sigma");
    s->aper_fwhm = hilal_config_get_double(cfg, "fluxscale.aper_fwhm");
    s->zp_fallback = hilal_config_get_bool(cfg, "fluxscale.zp_fallback");
    s->zp_err_mag = hilal_config_get_double(cfg, "fluxscale.zp_err_mag");
    const char *m = hilal_config_get_string(cfg, "fluxscale.method");
    if (strcmp(m, "psf") == 0)
        s->aperture = 0;
    else if (strcmp(m, "aperture") == 0)
        s->aperture = 1;
    else {
        free(s);
        return hilal_error_set(err, HILAL_ERR_CONFIG,
                               "fluxscale.method = \"%s\" is not one of psf, aperture", m);
    }
    *state = s;
    return HILAL_OK;
}

typedef struct keyed {
    double key;
    size_t idx;
} keyed;

static int cmp_keyed(const void *a, const void *b)
{
    double x = ((const keyed *)a)->key, y = ((const keyed *)b)->key;
    return (x > y) - (x < y);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_inplace(double *v, size_t n)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Nearest usable star of `list` (sorted by x in byx) to (x, y) within r;
 * -1 if none. */
static long nearest(const hilal_starlist *list, const keyed *byx, size_t n, double x, double y,
                    double r)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (byx[mid].key < x - r)
            lo = mid + 1;
        else
            hi = mid;
    }
    long best = -1;
    double bd = r;
    for (size_t k = lo; k < n && byx[k].key <= x + r; k++) {
        const hilal_star *s = &list->stars[byx[k].idx];
        double dd = hypot(s->x - x, s->y - y);
        if (dd <= bd) {
            bd = dd;
            best = (long)byx[k].idx;
        }
    }
    return best;
}

/* Usable stars of a list sorted by x (count in *n). */
static keyed *usable_by_x(const hilal_starlist *list, size_t *n)
{
    keyed *k = malloc((list->n + 1) * sizeof *k);
    *n = 0;
    if (k == NULL)
        return NULL;
    for (size_t i = 0; i < list->n; i++)
        if (list->stars[i].usable) {
            k[*n].key = list->stars[i].x;
            k[*n].idx = i;
            (*n)++;
        }
    qsort(k, *n, sizeof *k, cmp_keyed);
    return k;
}

/* Flux of a star in one image by the configured method. Returns 0 when it
 * cannot be measured. x, y FITS 1-based. */
static int measure(const fluxscale_state *s, const hilal_image *img, const hilal_psf *psf,
                   double r_ap, double x, double y, double *f, double *fe)
{
    hilal_error e;
    hilal_error_clear(&e);
    if (!s->aperture)
        return hilal_psf_fit_flux(img, psf, x, y, f, fe, &e) == HILAL_OK && isfinite(*f) &&
               isfinite(*fe);
    /* Aperture: image minus sky, masked pixels corrected by SEP's mirror
     * rule, error from the variance plane. */
    long ix = lround(x - 1.0), iy = lround(y - 1.0);
    long r = (long)ceil(r_ap) + 2;
    long x0 = ix - r, y0 = iy - r, w = 2 * r + 1;
    if (x0 < 0 || y0 < 0 || x0 + w > img->nx || y0 + w > img->ny)
        return 0;
    float *d = malloc((size_t)w * w * sizeof *d), *v = malloc((size_t)w * w * sizeof *v);
    uint8_t *m = malloc((size_t)w * w);
    int ok = 0;
    if (d != NULL && v != NULL && m != NULL) {
        double rms2 = img->sky_rms_adu * img->sky_rms_adu;
        for (long j = 0; j < w; j++)
            for (long i = 0; i < w; i++) {
                long q = (y0 + j) * img->nx + (x0 + i);
                int bad = (img->mask[q] & HILAL_MASK_UNUSABLE) || !isfinite(img->pix[q]);
                double var = img->var != NULL ? img->var[q] : rms2;
                if (!(var < 1e29))
                    bad = 1;
                m[j * w + i] = (uint8_t)bad;
                d[j * w + i] = bad ? 0.0f : (float)(img->pix[q] - (img->sky ? img->sky[q] : 0.0));
                v[j * w + i] = bad ? 0.0f : (float)var;
            }
        hilal_sepw_image im = {d, v, m, w, w};
        unsigned fl = 0;
        ok = hilal_sepw_sum_circle(&im, x - 1.0 - x0, y - 1.0 - y0, r_ap, f, fe, &fl, &e) ==
                 HILAL_OK &&
             !(fl & (HILAL_SEPW_APER_TRUNC | HILAL_SEPW_APER_ALLMASKED));
    }
    free(d);
    free(v);
    free(m);
    return ok;
}

typedef struct pair {
    double fs, es, fr, er; /* science and reference flux and error */
    int keep;
} pair;

/* Step 3-4: clipped weighted slope through the origin. */
static void robust_slope(pair *p, size_t n, double clip, double *r_out, double *err_out,
                         int *nkept, double *scratch)
{
    /* Start: median of the ratios. */
    for (size_t i = 0; i < n; i++)
        scratch[i] = p[i].fs / p[i].fr;
    double r = median_inplace(scratch, n);
    for (size_t i = 0; i < n; i++)
        p[i].keep = 1;
    double sw = 0.0;
    for (int iter = 0; iter < 20; iter++) {
        /* Normalised residuals z = (F_sci - r F_ref) sqrt(w) and their
         * robust scatter 1.4826 MAD over the kept pairs. */
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            double w = 1.0 / (p[i].es * p[i].es + r * r * p[i].er * p[i].er);
            double z = (p[i].fs - r * p[i].fr) * sqrt(w);
            if (p[i].keep)
                scratch[m++] = fabs(z);
        }
        double scat = 1.4826 * median_inplace(scratch, m);
        double lim = clip * fmax(1.0, isfinite(scat) ? scat : 1.0);
        int changed = 0;
        for (size_t i = 0; i < n; i++) {
            double w = 1.0 / (p[i].es * p[i].es + r * r * p[i].er * p[i].er);
            double z = (p[i].fs - r * p[i].fr) * sqrt(w);
            int keep = fabs(z) <= lim;
            changed |= keep != p[i].keep;
            p[i].keep = keep;
        }
        /* Weighted slope of the kept pairs: r = sum w Fs Fr / sum w Fr^2. */
        double swxy = 0.0;
        sw = 0.0;
        for (size_t i = 0; i < n; i++) {
            if (!p[i].keep)
                continue;
            double w = 1.0 / (p[i].es * p[i].es + r * r * p[i].er * p[i].er);
            swxy += w * p[i].fs * p[i].fr;
            sw += w * p[i].fr * p[i].fr;
        }
        if (!(sw > 0.0))
            break;
        double rn = swxy / sw;
        int converged = fabs(rn - r) < 1e-7 * fabs(r);
        r = rn;
        if (!changed && converged)
            break;
    }
    /* Error: formal, scaled by sqrt(reduced chi^2) when above 1. */
    int k = 0;
    double chi2 = 0.0;
    sw = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!p[i].keep)
            continue;
        double w = 1.0 / (p[i].es * p[i].es + r * r * p[i].er * p[i].er);
        double e = p[i].fs - r * p[i].fr;
        chi2 += w * e * e;
        sw += w * p[i].fr * p[i].fr;
        k++;
    }
    double err = sw > 0.0 ? 1.0 / sqrt(sw) : NAN;
    if (k > 1 && chi2 / (k - 1) > 1.0)
        err *= sqrt(chi2 / (k - 1));
    *r_out = r;
    *err_out = err;
    *nkept = k;
}

static hilal_status fluxscale_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const fluxscale_state *s = state;
    hilal_status st = HILAL_OK;
    keyed *sx = NULL, *rx = NULL;
    pair *pairs = NULL;
    double *scratch = NULL;
    const hilal_image *sci = frame->sci, *ref = frame->ref;
    if (sci == NULL || ref == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "fluxscale needs science and reference");
    if (sci->nx != ref->nx || sci->ny != ref->ny)
        return hilal_error_set(err, HILAL_ERR_MISMATCH,
                               "science (%ld x %ld px) and reference (%ld x %ld px) are not on "
                               "the same grid; the align stage must run first",
                               sci->nx, sci->ny, ref->nx, ref->ny);

    /* 1. Mutual nearest-neighbour matches of usable stars. */
    size_t ns = 0, nr = 0;
    sx = usable_by_x(&frame->sci_stars, &ns);
    rx = usable_by_x(&frame->ref_stars, &nr);
    pairs = malloc((ns + 1) * sizeof *pairs);
    scratch = malloc((ns + 1) * sizeof *scratch);
    if (sx == NULL || rx == NULL || pairs == NULL || scratch == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory matching stars");
        goto cleanup;
    }
    double fwhm_max = fmax(frame->sci_psf.fwhm_px, frame->ref_psf.fwhm_px);
    if (!isfinite(fwhm_max) || fwhm_max <= 0.0)
        fwhm_max = 3.0;
    double r_ap = s->aper_fwhm * fwhm_max;
    size_t nmatch = 0, npair = 0;
    for (size_t k = 0; k < ns; k++) {
        const hilal_star *a = &frame->sci_stars.stars[sx[k].idx];
        long j = nearest(&frame->ref_stars, rx, nr, a->x, a->y, s->match_radius_px);
        if (j < 0)
            continue;
        const hilal_star *b = &frame->ref_stars.stars[j];
        long back = nearest(&frame->sci_stars, sx, ns, b->x, b->y, s->match_radius_px);
        if (back != (long)sx[k].idx)
            continue;
        nmatch++;
        /* 2. Fluxes measured the same way in both images. */
        pair p;
        if (!measure(s, sci, &frame->sci_psf, r_ap, a->x, a->y, &p.fs, &p.es) ||
            !measure(s, ref, &frame->ref_psf, r_ap, b->x, b->y, &p.fr, &p.er))
            continue;
        if (!(p.fs > 0.0) || !(p.fr > 0.0) || !(p.es > 0.0) || !(p.er > 0.0) ||
            p.fs / p.es < s->min_snr || p.fr / p.er < s->min_snr)
            continue;
        pairs[npair++] = p;
    }

    if (npair < (size_t)s->min_stars) {
        double zs = sci->meta.zeropoint_mag, zr = ref->meta.zeropoint_mag;
        if (s->zp_fallback && isfinite(zs) && isfinite(zr)) {
            /* Same star: zs - 2.5 log10 Fs = zr - 2.5 log10 Fr, so
             * Fs / Fr = 10^(0.4 (zs - zr)); d(r)/r = 0.4 ln(10) d(mag). */
            frame->flux_ratio = pow(10.0, 0.4 * (zs - zr));
            frame->flux_ratio_err = frame->flux_ratio * 0.4 * log(10.0) * s->zp_err_mag;
            frame->flux_ratio_nstars = 0;
            hilal_log(HILAL_LOG_WARN,
                      "frame %s: only %zu matched stars with S/N >= %g (fluxscale.min_stars = "
                      "%ld); flux ratio %.4f from the zero points %.3f (science) and %.3f "
                      "(reference)",
                      frame->frame_id, npair, s->min_snr, s->min_stars, frame->flux_ratio, zs,
                      zr);
            frame->products |= HILAL_PROD_FLUXSCALE;
            goto cleanup;
        }
        st = hilal_error_set(
            err, HILAL_ERR_DATA,
            "only %zu stars usable in both %s and %s with S/N >= %g (%zu usable science stars, "
            "%zu usable reference stars, %zu matched within %.2f px; fluxscale.min_stars = %ld) "
            "and no zero points to fall back on; check the alignment, raise "
            "fluxscale.match_radius_px, lower fluxscale.min_snr or stars.thresh_sigma, or give "
            "both images a zero point",
            npair, sci->meta.path[0] ? sci->meta.path : "the science image",
            ref->meta.path[0] ? ref->meta.path : "the reference image", s->min_snr, ns, nr,
            nmatch, s->match_radius_px, s->min_stars);
        goto cleanup;
    }

    /* 3-4. Robust ratio and its error. */
    double r, re;
    int nk;
    robust_slope(pairs, npair, s->clip_sigma, &r, &re, &nk, scratch);
    if (!(r > 0.0) || !isfinite(r) || nk < s->min_stars) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "the flux ratio of %zu matched stars is undefined (%g, %d kept "
                             "after clipping); check the star lists and PSFs",
                             npair, r, nk);
        goto cleanup;
    }
    frame->flux_ratio = r;
    frame->flux_ratio_err = re;
    frame->flux_ratio_nstars = nk;
    frame->products |= HILAL_PROD_FLUXSCALE;
    hilal_log(HILAL_LOG_DEBUG, "frame %s: flux ratio %.5f +- %.5f from %d of %zu stars (%s)",
              frame->frame_id, r, re, nk, npair, s->aperture ? "aperture" : "PSF fit");

cleanup:
    free(sx);
    free(rx);
    free(pairs);
    free(scratch);
    return st;
}

static void fluxscale_fini(void *state)
{
    free(state);
}

const hilal_stage hilal_stage_fluxscale = {
    .name = "fluxscale",
    .summary = "flux ratio science/reference (ZOGY F_n with F_r = 1) from matched stars",
    .params = fluxscale_params,
    .nparams = sizeof fluxscale_params / sizeof fluxscale_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND |
             HILAL_PROD_STARS | HILAL_PROD_ALIGNED | HILAL_PROD_PSF,
    .makes = HILAL_PROD_FLUXSCALE,
    .flags = 0,
    .init = fluxscale_init,
    .run = fluxscale_run,
    .fini = fluxscale_fini,
};
