/* The fluxscale stage: the photometric match of the (aligned) reference to
 * the science frame: the ratio of science to reference flux of the same
 * stars, ZOGY's F_n with F_r = 1 (Zackay, Ofek & Gal-Yam 2016, section 3.4
 * and eq. 13: D depends on the flux-based zero points F_n, F_r), and the
 * differential background.
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
 *    dropped. Each flux error gets a systematic part sys_err_frac x flux
 *    in quadrature (PSF-model errors, faint neighbours): without it the
 *    brightest star, with errors far below everyone else's, sets the ratio
 *    alone, and a variable star among a handful of matches goes unnoticed.
 * 3. Robust scale: the weighted least-squares slope through the origin of
 *    F_sci = r F_ref, with weights w = 1 / (s_sci^2 + r^2 s_ref^2) (errors in
 *    both coordinates), iterated with clipping: a pair is rejected when its
 *    normalised residual |F_sci - r F_ref| sqrt(w) exceeds clip_sigma times
 *    max(1, robust scatter of the normalised residuals), so variable stars
 *    and blends drop out. Starts from the median of the ratios.
 * 4. Error: the formal slope error 1 / sqrt(sum w F_ref^2), scaled up by
 *    sqrt(chi^2 / (N - 1)) when the scatter exceeds the errors.
 * Too few pairs (< min_stars matched, or fewer than 3 left after clipping):
 * with zp_fallback and both zero points known, r = 10^(0.4 (zp_sci -
 * zp_ref)) with an error of zp_err_mag; otherwise HILAL_ERR_DATA.
 * 5. Differential background (bg_match; Alard & Lupton 1998, ApJ 503, 325,
 *    fit a differential background with the kernel for the same reason):
 *    each image's mesh background responds to the unresolved light of
 *    faint sources according to its own depth and PSF, so the two sky
 *    maps do not differ by the factor r that the sources do, and
 *    N - r R keeps a background offset that ZOGY turns into a bias of
 *    S_corr (a simulated pair: 0.2 ADU, S_corr -0.05 sigma everywhere).
 *    The mean of N - r R, away from the sources of both star lists and
 *    clipped at 3 sigma, is taken in meshes of bg_mesh_px, a polynomial of
 *    order bg_order is fitted to the meshes, and the reference's sky map is
 *    adjusted by it divided by r, so that N - r R has no background. The
 *    mean (not a mode) is right here: every source left in N - r R sums to
 *    zero flux whatever the two PSFs, so only the masked bright sources and
 *    the clipped outliers (cosmic rays, defects) need leaving out. The
 *    stage therefore modifies the reference's sky plane in place.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
#include "hilal/fft.h"
#include "hilal/log.h"
#include "hilal/psf.h"
#include "hilal/stage.h"
#include "hilal/stats.h"
#include "linsolve.h"
#include "parallel.h"
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
    {"sys_err_frac", HILAL_PARAM_DOUBLE, "0.01", 0, 1, "",
     "systematic error of a star's flux, as a fraction of it, added in quadrature"},
    {"bg_match", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "adjust the reference's sky map so that science - ratio x reference has no background"},
    {"bg_mesh_px", HILAL_PARAM_INT, "128", 16, 8192, "px",
     "mesh size for the differential background"},
    {"bg_order", HILAL_PARAM_INT, "1", 0, 3, "",
     "polynomial order of the differential background (0: a constant)"},
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
    double sys_err_frac;
    int bg_match, bg_mesh_px, bg_order;
    int threads;
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
    s->sys_err_frac = hilal_config_get_double(cfg, "fluxscale.sys_err_frac");
    s->bg_match = hilal_config_get_bool(cfg, "fluxscale.bg_match");
    s->bg_mesh_px = (int)hilal_config_get_int(cfg, "fluxscale.bg_mesh_px");
    s->bg_order = (int)hilal_config_get_int(cfg, "fluxscale.bg_order");
    /* pipeline.threads = 0: one per core. */
    s->threads = hilal_fft_threads((int)hilal_config_get_int(cfg, "pipeline.threads"));
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
    double r = hilal_median_double(scratch, n);
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
        double scat = 1.4826 * hilal_median_double(scratch, m);
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

/* ------------------------------------------------------------------------
 * Step 5: the differential background
 * ------------------------------------------------------------------------ */

#define BG_BETA 2.5       /* Moffat beta of the source masks (heavy wings) */
#define BG_MASK_SIGMA 0.5 /* sources masked down to this many sigma of N - r R */
#define BG_FLUX_SIGMA 1.0 /* ... and until the flux beyond is below this many sigma */
#define BG_FLUX_FRAC 0.01 /* ... or this fraction of the source's flux */
#define BG_MIN_FILL 0.25  /* meshes with fewer usable pixels than this fraction are skipped */

/* The masked ellipse of one source (see mask_ellipses). */
typedef struct mask_ellipse {
    double x0, y0;       /* centre, 0-based px */
    double A, B;         /* semi-axes, px */
    double ct, sn;       /* cosine and sine of the position angle */
    long i0, i1, j0, j1; /* bounding box, px (not clipped to the image) */
} mask_ellipse;

/* The stars' size: median semi-major axis of the usable stars (0 when
 * none, or out of memory). */
static double median_axis(const hilal_starlist *L)
{
    double a_star = 0.0;
    double *v = malloc((L->n + 1) * sizeof *v);
    size_t n = 0;
    if (v != NULL) {
        for (size_t i = 0; i < L->n; i++)
            if (L->stars[i].usable && L->stars[i].a_px > 0.0)
                v[n++] = L->stars[i].a_px;
        a_star = n > 0 ? hilal_median_double(v, n) : 0.0;
    }
    free(v);
    return a_star;
}

/* The ellipses that mask the light of the stars of list L (into e, at
 * most L->n; returns how many): out to where a Moffat profile (BG_BETA,
 * FWHM fwhm) of the star's peak times scale falls to lim; extended sources
 * (second-moment axes larger than the stars') get an ellipse scaled by
 * their size. */
static size_t mask_ellipses(const hilal_starlist *L, double scale, double fwhm, double lim,
                            double flim, mask_ellipse *e)
{
    const double a_star = median_axis(L);
    double alpha = fwhm / (2.0 * sqrt(pow(2.0, 1.0 / BG_BETA) - 1.0));
    double ppf = (BG_BETA - 1.0) / (3.14159265358979323846 * alpha * alpha);
    size_t ne = 0;
    for (size_t k = 0; k < L->n; k++) {
        const hilal_star *o = &L->stars[k];
        if (!isfinite(o->x) || !isfinite(o->y))
            continue;
        double pk = scale * fmax(isfinite(o->peak_adu) ? o->peak_adu : 0.0,
                                 isfinite(o->flux_adu) ? o->flux_adu * ppf : 0.0);
        double r = 1.5 * fwhm;
        if (pk > lim)
            r = fmax(r, alpha * sqrt(pow(pk / lim, 1.0 / BG_BETA) - 1.0));
        /* ... and out to where the flux it has beyond, F (1 + r^2 /
         * alpha^2)^(1 - beta), is below max(flim, BG_FLUX_FRAC F): N - r R
         * of a star sums to zero only as a whole, its wings (the broader
         * PSF's) are positive, and summed over all stars they biased the
         * mean by ~0.5% of their light with masks of 1.5 FWHM. */
        double fl = scale * (isfinite(o->flux_adu) ? o->flux_adu : 0.0);
        double lf = fmax(flim, BG_FLUX_FRAC * fl);
        if (lf > 0.0 && fl > lf)
            r = fmax(r, alpha * sqrt(pow(fl / lf, 1.0 / (BG_BETA - 1.0)) - 1.0));
        double A = r, B = r;
        if (a_star > 0.0 && isfinite(o->a_px) && isfinite(o->b_px)) {
            A = r * fmax(1.0, o->a_px / a_star);
            B = r * fmax(1.0, o->b_px / a_star);
        }
        mask_ellipse *m = &e[ne++];
        m->ct = isfinite(o->theta_rad) ? cos(o->theta_rad) : 1.0;
        m->sn = isfinite(o->theta_rad) ? sin(o->theta_rad) : 0.0;
        m->x0 = o->x - 1.0;
        m->y0 = o->y - 1.0;
        m->A = A;
        m->B = B;
        m->i0 = (long)floor(m->x0 - A);
        m->i1 = (long)ceil(m->x0 + A);
        m->j0 = (long)floor(m->y0 - A);
        m->j1 = (long)ceil(m->y0 + A);
    }
    return ne;
}

/* Marks (1) the pixels of image rows [ylo, yhi) (of an image nx wide) that
 * lie inside any of the n ellipses, in m, which holds those rows (row j at
 * m + (j - ylo) nx). */
static void mask_band(uint8_t *m, long nx, const mask_ellipse *e, size_t n, long ylo, long yhi)
{
    enum { CHUNK = 64 };
    double q[CHUNK];
    for (size_t k = 0; k < n; k++) {
        const mask_ellipse *el = &e[k];
        if (el->j1 < ylo || el->j0 >= yhi || el->i1 < 0 || el->i0 >= nx)
            continue;
        const double x0 = el->x0, y0 = el->y0, A = el->A, B = el->B, ct = el->ct, sn = el->sn;
        /* The box clipped to the band, row by row in chunks: the
         * elliptical radius of a chunk's pixels (a loop on int columns that
         * vectorises, divisions included), then the marks. */
        const int ia = (int)(el->i0 < 0 ? 0 : el->i0), ib = (int)(el->i1 < nx ? el->i1 : nx - 1);
        for (long j = el->j0 < ylo ? ylo : el->j0; j <= el->j1 && j < yhi; j++) {
            const double dv = j - y0;
            uint8_t *row = m + (j - ylo) * nx;
            for (int c0 = ia; c0 <= ib; c0 += CHUNK) {
                const int nc = ib - c0 + 1 < CHUNK ? ib - c0 + 1 : CHUNK;
                for (int c = 0; c < nc; c++) {
                    const double du = (c0 + c) - x0;
                    const double pu = (du * ct + dv * sn) / A, pv = (-du * sn + dv * ct) / B;
                    q[c] = pu * pu + pv * pv;
                }
                for (int c = 0; c < nc; c++)
                    if (q[c] <= 1.0)
                        row[c0 + c] = 1;
            }
        }
    }
}

typedef struct bg_job {
    const hilal_image *sci, *ref;
    const mask_ellipse *ell; /* the sources of both lists */
    size_t nell;
    double r, sigma;
    long mesh, mx, my;
    double *sum;           /* per mesh */
    long *cnt;
    long mesh_w, mesh_h;   /* mesh size inside the image */
    float *scratch;        /* mesh_w floats per thread */
    uint8_t *band;         /* mesh_h x nx source-mask bytes per thread */
    const float *zero_row; /* nx zeros, standing in for a missing sky plane */
} bg_job;

/* One row segment of n pixels: d = (N - sky_N) - r (R - sky_R), and 0 where
 * the pixel is a source (src), masked in either image, or |d| > lim (NaN
 * included); returns the number of pixels kept. Branch-free on restrict
 * pointers so that it vectorises. */
static long clipped_diff(const float *restrict np, const float *restrict ns,
                         const hilal_mask_t *restrict nm, const float *restrict rp,
                         const float *restrict rs, const hilal_mask_t *restrict rm,
                         const uint8_t *restrict src, long n, float r, float lim,
                         float *restrict d)
{
    long kept = 0;
    for (long x = 0; x < n; x++) {
        const float v = (np[x] - ns[x]) - r * (rp[x] - rs[x]);
        const int keep = (src[x] == 0) & (((nm[x] | rm[x]) & HILAL_MASK_UNUSABLE) == 0) &
                         (fabsf(v) <= lim);
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        bits &= 0u - (uint32_t)keep;
        memcpy(&d[x], &bits, sizeof bits);
        kept += keep;
    }
    return kept;
}

/* Accumulates the sums of N - r R, clipped at +-BG_CLIP sigma, away from
 * the sources of both lists, over the meshes of mesh rows [lo, hi); each
 * mesh row belongs to one call, so no locking is needed, and its source
 * mask is made there (mask_band on the band of image rows), where it is
 * read while still in cache. (The clip is centred on 0: the offsets sought
 * are a small fraction of sigma, so the symmetric clip leaves their mean
 * unbiased while cosmic rays, defects and residuals of unlisted bright
 * sources go.) */
#define BG_CLIP 4.0
static void bg_rows(void *ctx, long lo, long hi, int tid)
{
    const bg_job *b = ctx;
    const hilal_image *sci = b->sci, *ref = b->ref;
    long nx = sci->nx, ny = sci->ny;
    const float lim = (float)(BG_CLIP * b->sigma), rr = (float)b->r;
    float *d = b->scratch + (size_t)tid * (size_t)b->mesh_w;
    const float *zero = b->zero_row;
    for (long my = lo; my < hi; my++) {
        long y0 = my * b->mesh, y1 = y0 + b->mesh < ny ? y0 + b->mesh : ny;
        double *sum = b->sum + my * b->mx;
        long *cnt = b->cnt + my * b->mx;
        uint8_t *band = b->band + (size_t)tid * (size_t)b->mesh_h * (size_t)nx;
        memset(band, 0, (size_t)(y1 - y0) * (size_t)nx);
        mask_band(band, nx, b->ell, b->nell, y0, y1);
        for (long mx = 0; mx < b->mx; mx++) {
            sum[mx] = 0.0;
            cnt[mx] = 0;
        }
        /* Whole image rows in turn (the planes are read as streams), each
         * mesh's part added to its own sums: per mesh the same sums in the
         * same order as mesh by mesh. */
        for (long y = y0; y < y1; y++) {
            for (long mx = 0; mx < b->mx; mx++) {
                long x0 = mx * b->mesh, x1 = x0 + b->mesh < nx ? x0 + b->mesh : nx;
                const long o = y * nx + x0;
                /* The values of N - r R, 0 where not used (masked, a
                 * source, or clipped; pixels without data are NaN here and
                 * fail the clip), in a vectorised pass; then their sum in
                 * order, which adding the zeros leaves as it is. */
                cnt[mx] += clipped_diff(sci->pix + o, sci->sky ? sci->sky + o : zero + x0,
                                        sci->mask + o, ref->pix + o,
                                        ref->sky ? ref->sky + o : zero + x0, ref->mask + o,
                                        band + (y - y0) * nx + x0, x1 - x0, rr, lim, d);
                double s = sum[mx];
                for (long x = 0; x < x1 - x0; x++)
                    s += d[x];
                sum[mx] = s;
            }
        }
    }
}

typedef struct bg_apply_job {
    hilal_image *ref;
    const double *coef;
    int order;
    double r;
    const double *u;  /* nx normalised column coordinates */
    double *scratch;  /* nx doubles per thread */
} bg_apply_job;

/* ref->sky -= poly(u, v) / r over rows [lo, hi): per row the polynomial
 * collapses to one in u, evaluated by Horner's rule, one coefficient at a
 * time over the whole row (loops that vectorise). */
static void bg_apply_rows(void *ctx, long lo, long hi, int tid)
{
    const bg_apply_job *a = ctx;
    long nx = a->ref->nx, ny = a->ref->ny;
    double cu[4];
    const double *restrict u = a->u;
    double *restrict pv = a->scratch + (size_t)tid * (size_t)nx;
    for (long y = lo; y < hi; y++) {
        double v = (y - 0.5 * (ny - 1)) / (0.5 * ny);
        /* cu[p] = sum over terms u^p v^q of coef v^q. */
        for (int p = 0; p <= a->order; p++)
            cu[p] = 0.0;
        int k = 0;
        for (int d = 0; d <= a->order; d++)
            for (int p = d; p >= 0; p--, k++)
                cu[p] += a->coef[k] * pow(v, d - p);
        for (long x = 0; x < nx; x++)
            pv[x] = cu[a->order];
        for (int p = a->order - 1; p >= 0; p--)
            for (long x = 0; x < nx; x++)
                pv[x] = pv[x] * u[x] + cu[p];
        float *restrict row = a->ref->sky + y * nx;
        for (long x = 0; x < nx; x++)
            row[x] = (float)(row[x] - pv[x] / a->r);
    }
}

/* Step 5 (see the file header). */
static hilal_status match_background(const fluxscale_state *s, hilal_frame *frame,
                                     hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const hilal_image *sci = frame->sci;
    hilal_image *ref = frame->ref;
    long nx = sci->nx, ny = sci->ny, mesh = s->bg_mesh_px;
    double r = frame->flux_ratio;
    double sn = sci->sky_rms_adu, sr = ref->sky_rms_adu;
    double sigma = sqrt(sn * sn + r * r * sr * sr);
    long mx = (nx + mesh - 1) / mesh, my = (ny + mesh - 1) / mesh, nm = mx * my;
    double *sum = malloc((size_t)nm * sizeof *sum);
    long *cnt = malloc((size_t)nm * sizeof *cnt);
    int nthreads = s->threads < HILAL_PARALLEL_MAX_THREADS ? s->threads : HILAL_PARALLEL_MAX_THREADS;
    if (nthreads < 1)
        nthreads = 1;
    /* Per thread: a mesh row of N - r R values and a band of source-mask
     * rows. */
    long mesh_w = mesh < nx ? mesh : nx, mesh_h = mesh < ny ? mesh : ny;
    float *scratch = malloc((size_t)nthreads * (size_t)mesh_w * sizeof *scratch);
    uint8_t *band = malloc((size_t)nthreads * (size_t)mesh_h * (size_t)nx);
    mask_ellipse *ell = malloc((frame->sci_stars.n + frame->ref_stars.n + 1) * sizeof *ell);
    float *zero = sci->sky == NULL || ref->sky == NULL ? calloc((size_t)nx, sizeof *zero) : NULL;
    double *ucol = NULL, *pvrow = NULL;
    if (sum == NULL || cnt == NULL || scratch == NULL || band == NULL || ell == NULL ||
        ((sci->sky == NULL || ref->sky == NULL) && zero == NULL)) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the differential background");
        goto cleanup;
    }
    if (!(sigma > 0.0) || !isfinite(sigma) || !(r > 0.0)) {
        hilal_log(HILAL_LOG_WARN, "frame %s: no background RMS; differential background not "
                  "matched", frame->frame_id);
        goto cleanup;
    }
    /* Sources of both lists, in units of N - r R. */
    double fs = isfinite(frame->sci_psf.fwhm_px) ? frame->sci_psf.fwhm_px : 3.0;
    double fr = isfinite(frame->ref_psf.fwhm_px) ? frame->ref_psf.fwhm_px : 3.0;

    /* Clipped means per mesh. */
    size_t nell = mask_ellipses(&frame->sci_stars, 1.0, fs, BG_MASK_SIGMA * sigma,
                                BG_FLUX_SIGMA * sigma, ell);
    nell += mask_ellipses(&frame->ref_stars, r, fr, BG_MASK_SIGMA * sigma, BG_FLUX_SIGMA * sigma,
                          ell + nell);
    bg_job job = {.sci = sci, .ref = ref, .ell = ell, .nell = nell, .r = r, .sigma = sigma,
                  .mesh = mesh, .mx = mx, .my = my, .sum = sum, .cnt = cnt, .mesh_w = mesh_w,
                  .mesh_h = mesh_h, .scratch = scratch, .band = band, .zero_row = zero};
    hilal_parallel_for(nthreads, my, bg_rows, &job);

    /* Weighted polynomial fit to the mesh means (weight: pixel count),
     * with meshes more than 4 sigma off the fit dropped once. */
    int order = s->bg_order;
    double coef[16] = {0}, t[16];
    int nterm = hilal_poly2_terms(order, 0.0, 0.0, t);
    long nvalid = 0;
    uint8_t *use = malloc((size_t)nm);
    if (use == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the differential background");
        goto cleanup;
    }
    for (long k = 0; k < nm; k++) {
        long mxk = k % mx, myk = k / mx;
        long area = ((mxk + 1) * mesh < nx ? mesh : nx - mxk * mesh) *
                    ((myk + 1) * mesh < ny ? mesh : ny - myk * mesh);
        use[k] = cnt[k] >= BG_MIN_FILL * area && cnt[k] > 10;
        nvalid += use[k];
    }
    while (order > 0 && nvalid < 2 * hilal_poly2_terms(order, 0.0, 0.0, t))
        order--;
    nterm = hilal_poly2_terms(order, 0.0, 0.0, t);
    int fitted = 0;
    for (int round = 0; round < 2 && nvalid >= nterm && nvalid > 0; round++) {
        double A[256] = {0}, b[16] = {0};
        for (long k = 0; k < nm; k++) {
            if (!use[k])
                continue;
            double u = (((k % mx) + 0.5) * mesh - 0.5 * nx) / (0.5 * nx);
            double v = (((k / mx) + 0.5) * mesh - 0.5 * ny) / (0.5 * ny);
            hilal_poly2_terms(order, u, v, t);
            double w = (double)cnt[k], m = sum[k] / cnt[k];
            for (int i = 0; i < nterm; i++) {
                b[i] += w * t[i] * m;
                for (int j = 0; j < nterm; j++)
                    A[i * nterm + j] += w * t[i] * t[j];
            }
        }
        if (!hilal_linsolve(A, b, nterm))
            break;
        memcpy(coef, b, sizeof coef[0] * (size_t)nterm);
        fitted = 1;
        long dropped = 0;
        for (long k = 0; k < nm && round == 0; k++) {
            if (!use[k])
                continue;
            double u = (((k % mx) + 0.5) * mesh - 0.5 * nx) / (0.5 * nx);
            double v = (((k / mx) + 0.5) * mesh - 0.5 * ny) / (0.5 * ny);
            hilal_poly2_terms(order, u, v, t);
            double p = 0.0;
            for (int i = 0; i < nterm; i++)
                p += coef[i] * t[i];
            if (fabs(sum[k] / cnt[k] - p) > 4.0 * sigma / sqrt((double)cnt[k])) {
                use[k] = 0;
                dropped++;
            }
        }
        nvalid -= dropped;
        if (dropped == 0)
            break;
    }
    free(use);
    if (!fitted) {
        hilal_log(HILAL_LOG_WARN,
                  "frame %s: too few source-free pixels to match the backgrounds of science and "
                  "reference; the reference's sky map is left as it is",
                  frame->frame_id);
        goto cleanup;
    }

    /* Apply: R gains poly / r, so N - r R loses poly. */
    if (ref->sky == NULL && (st = hilal_image_alloc_sky(ref, err)) != HILAL_OK)
        goto cleanup;
    ucol = malloc((size_t)nx * sizeof *ucol);
    pvrow = malloc((size_t)nthreads * (size_t)nx * sizeof *pvrow);
    if (ucol == NULL || pvrow == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the differential background");
        goto cleanup;
    }
    for (long x = 0; x < nx; x++)
        ucol[x] = (x - 0.5 * (nx - 1)) / (0.5 * nx);
    bg_apply_job aj = {ref, coef, order, r, ucol, pvrow};
    hilal_parallel_for(nthreads, ny, bg_apply_rows, &aj);
    hilal_log(HILAL_LOG_DEBUG,
              "frame %s: differential background (science - %.4f x reference) %.3f ADU at the "
              "centre (order %d, %ld meshes of %ld px); removed through the reference's sky map",
              frame->frame_id, r, coef[0], order, nvalid, mesh);

cleanup:
    free(band);
    free(ell);
    free(sum);
    free(cnt);
    free(scratch);
    free(zero);
    free(ucol);
    free(pvrow);
    return st;
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
        p.es = hypot(p.es, s->sys_err_frac * p.fs);
        p.er = hypot(p.er, s->sys_err_frac * p.fr);
        pairs[npair++] = p;
    }

    /* 3-4. Robust ratio and its error (when there are enough pairs). */
    double r = NAN, re = NAN;
    int nk = 0;
    if (npair >= (size_t)s->min_stars)
        robust_slope(pairs, npair, s->clip_sigma, &r, &re, &nk, scratch);
    if (npair < (size_t)s->min_stars || !(r > 0.0) || !isfinite(r) || nk < 3) {
        double zs = sci->meta.zeropoint_mag, zr = ref->meta.zeropoint_mag;
        if (s->zp_fallback && isfinite(zs) && isfinite(zr)) {
            /* Same star: zs - 2.5 log10 Fs = zr - 2.5 log10 Fr, so
             * Fs / Fr = 10^(0.4 (zs - zr)); d(r)/r = 0.4 ln(10) d(mag). */
            frame->flux_ratio = pow(10.0, 0.4 * (zs - zr));
            frame->flux_ratio_err = frame->flux_ratio * 0.4 * log(10.0) * s->zp_err_mag;
            frame->flux_ratio_nstars = 0;
            hilal_log(HILAL_LOG_WARN,
                      "frame %s: only %zu matched stars with S/N >= %g (%d consistent; "
                      "fluxscale.min_stars = %ld); flux ratio %.4f from the zero points %.3f "
                      "(science) and %.3f (reference)",
                      frame->frame_id, npair, s->min_snr, nk, s->min_stars, frame->flux_ratio,
                      zs, zr);
        } else if (npair < (size_t)s->min_stars) {
            st = hilal_error_set(
                err, HILAL_ERR_DATA,
                "only %zu stars usable in both %s and %s with S/N >= %g (%zu usable science "
                "stars, %zu usable reference stars, %zu matched within %.2f px; "
                "fluxscale.min_stars = %ld) and no zero points to fall back on; check the "
                "alignment, raise fluxscale.match_radius_px, lower fluxscale.min_snr or "
                "stars.thresh_sigma, or give both images a zero point",
                npair, sci->meta.path[0] ? sci->meta.path : "the science image",
                ref->meta.path[0] ? ref->meta.path : "the reference image", s->min_snr, ns, nr,
                nmatch, s->match_radius_px, s->min_stars);
            goto cleanup;
        } else {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "the flux ratio of %zu matched stars is undefined (%g, %d kept "
                                 "after clipping) and there are no zero points to fall back "
                                 "on; check the star lists and PSFs",
                                 npair, r, nk);
            goto cleanup;
        }
    } else {
        frame->flux_ratio = r;
        frame->flux_ratio_err = re;
        frame->flux_ratio_nstars = nk;
        hilal_log(HILAL_LOG_DEBUG, "frame %s: flux ratio %.5f +- %.5f from %d of %zu stars (%s)",
                  frame->frame_id, r, re, nk, npair, s->aperture ? "aperture" : "PSF fit");
    }

    /* 5. Differential background. */
    if (s->bg_match) {
        st = match_background(s, frame, err);
        if (st != HILAL_OK)
            goto cleanup;
    }
    frame->products |= HILAL_PROD_FLUXSCALE;

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
    .summary = "flux ratio science/reference (ZOGY F_n with F_r = 1) from matched stars, and "
               "the differential background (adjusts the reference's sky map in place)",
    .params = fluxscale_params,
    .nparams = sizeof fluxscale_params / sizeof fluxscale_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND |
             HILAL_PROD_STARS | HILAL_PROD_ALIGNED | HILAL_PROD_PSF,
    .makes = HILAL_PROD_FLUXSCALE,
    .flags = HILAL_STAGE_INPLACE,
    .init = fluxscale_init,
    .run = fluxscale_run,
    .fini = fluxscale_fini,
};
