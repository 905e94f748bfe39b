/* Stage "vet": statistics that tell real point-source transients from
 * artefacts (cosmic rays and hot pixels, misalignment dipoles, residuals of
 * saturated stars, masked regions, defects of the reference), and a
 * deterministic real/bogus score rb in [0, 1] combining them. No trained
 * model: each statistic enters through a logistic factor whose centre and
 * width are parameters. Every statistic and factor is described in
 * docs/vetting.md.
 */
#include "hilal/detect.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fft.h"
#include "hilal/log.h"
#include "hilal/stage.h"
#include "hilal/zogy.h"
#include "parallel.h"

/* The table is the single source of truth for the defaults;
 * hilal_vet_params_default() parses it. vet_fields gives, in the same
 * order, where each value goes in hilal_vet_params. */
static const hilal_param vet_params[] = {
    {"footprint_fwhm", HILAL_PARAM_DOUBLE, "1.0", 0.5, 5, "FWHM",
     "radius of the footprint (sharpness, neg_frac, masked_frac), in FWHM of P_D (>= 2 px)"},
    {"dipole_fwhm", HILAL_PARAM_DOUBLE, "1.5", 0.5, 10, "FWHM",
     "radius within which an opposite-sign S_corr extremum makes a dipole, in FWHM of P_D"},
    {"search_radius_px", HILAL_PARAM_DOUBLE, "32", 1, 1024, "px",
     "distances to saturated and masked pixels are searched, and capped, within this radius"},
    {"sharp_centre", HILAL_PARAM_DOUBLE, "0.35", 0.01, 10, "",
     "rb factor: centre on the normalised sharpness (0 = PSF-like, 1 = single pixel) at low S/N"},
    {"sharp_width", HILAL_PARAM_DOUBLE, "0.08", 0.001, 10, "",
     "rb factor: width on the normalised sharpness at low S/N"},
    {"sharp_snr", HILAL_PARAM_DOUBLE, "10", 0.1, 1e6, "sigma",
     "above this |snr| the sharpness centre and width shrink as sharp_snr / |snr|"},
    {"sharp_floor", HILAL_PARAM_DOUBLE, "0.15", 0.001, 10, "",
     "smallest sharpness centre (room for PSF-model errors at high S/N)"},
    {"img_sharp_snr", HILAL_PARAM_DOUBLE, "5", 0, 1e6, "sigma",
     "the science (brightening) or reference (fading) image's own sharpness counts above this "
     "peak-pixel S/N"},
    {"narrow_centre", HILAL_PARAM_DOUBLE, "0.4", 0, 1, "",
     "rb factor: centre on FWHM(D) / FWHM(P_D) below which a residual is too narrow"},
    {"narrow_width", HILAL_PARAM_DOUBLE, "0.05", 0.001, 10, "",
     "rb factor: width on FWHM(D) / FWHM(P_D) for narrowness"},
    {"narrow_snr", HILAL_PARAM_DOUBLE, "5", 0, 1e6, "sigma",
     "rb factor: narrowness counts only for |snr| well above this (the FWHM is noise below)"},
    {"narrow_snr_width", HILAL_PARAM_DOUBLE, "2", 0.001, 1e6, "sigma",
     "rb factor: width of the |snr| gate of narrowness"},
    {"broad_centre", HILAL_PARAM_DOUBLE, "2.0", 1, 100, "",
     "rb factor: centre on FWHM(D) / FWHM(P_D) (broader residuals are bogus)"},
    {"broad_width", HILAL_PARAM_DOUBLE, "0.15", 0.001, 10, "",
     "rb factor: width on FWHM(D) / FWHM(P_D)"},
    {"elong_centre", HILAL_PARAM_DOUBLE, "3.0", 1, 100, "",
     "rb factor: centre on the elongation a/b on D (streaks are bogus)"},
    {"elong_width", HILAL_PARAM_DOUBLE, "0.25", 0.001, 10, "",
     "rb factor: width on the elongation"},
    {"elong_snr", HILAL_PARAM_DOUBLE, "10", 0, 1e6, "sigma",
     "rb factor: the elongation counts only for |snr| well above this (it is noise below)"},
    {"elong_snr_width", HILAL_PARAM_DOUBLE, "2", 0.001, 1e6, "sigma",
     "rb factor: width of the |snr| gate of the elongation"},
    {"dipole_centre", HILAL_PARAM_DOUBLE, "0.4", 0, 1, "",
     "rb factor: centre on the dipole measure (1 = single-signed, 0 = balanced dipole)"},
    {"dipole_width", HILAL_PARAM_DOUBLE, "0.1", 0.001, 10, "",
     "rb factor: width on the dipole measure"},
    {"dipole_sigma", HILAL_PARAM_DOUBLE, "4.0", 0, 1000, "sigma",
     "rb factor: an opposite lobe counts only when its |S_corr| is well above this"},
    {"dipole_sigma_width", HILAL_PARAM_DOUBLE, "0.5", 0.001, 100, "sigma",
     "rb factor: width on the opposite lobe's |S_corr|"},
    {"negfrac_centre", HILAL_PARAM_DOUBLE, "0.45", 0, 1, "",
     "rb factor: centre on the fraction of opposite-signed pixels of D in the footprint"},
    {"negfrac_width", HILAL_PARAM_DOUBLE, "0.04", 0.001, 10, "",
     "rb factor: width on neg_frac"},
    {"masked_centre", HILAL_PARAM_DOUBLE, "0.25", 0, 1, "",
     "rb factor: centre on the masked fraction of the footprint"},
    {"masked_width", HILAL_PARAM_DOUBLE, "0.05", 0.001, 10, "",
     "rb factor: width on masked_frac"},
    {"sat_radius_px", HILAL_PARAM_DOUBLE, "5", 0, 1024, "px",
     "rb factor and NEAR_SAT flag: centre on the distance to the nearest saturated pixel"},
    {"sat_width_px", HILAL_PARAM_DOUBLE, "1", 0.001, 100, "px",
     "rb factor: width on the distance to the nearest saturated pixel"},
    {"refdefect_factor", HILAL_PARAM_DOUBLE, "0.2", 0, 1, "",
     "rb is multiplied by this when the reference has a defect at the candidate"},
    {"tile_px", HILAL_PARAM_INT, "128", 16, 65536, "px",
     "side of the tiles in which the noise of S_corr is checked (BAD_TILE flag)"},
    {"tile_tol", HILAL_PARAM_DOUBLE, "0.3", 0.001, 100, "",
     "BAD_TILE when the robust standard deviation of S_corr in the tile is off 1 by more"},
};
#define NVET (sizeof vet_params / sizeof vet_params[0])

static const size_t vet_fields[NVET] = {
    offsetof(hilal_vet_params, footprint_fwhm),
    offsetof(hilal_vet_params, dipole_fwhm),
    offsetof(hilal_vet_params, search_radius_px),
    offsetof(hilal_vet_params, sharp_centre),
    offsetof(hilal_vet_params, sharp_width),
    offsetof(hilal_vet_params, sharp_snr),
    offsetof(hilal_vet_params, sharp_floor),
    offsetof(hilal_vet_params, img_sharp_snr),
    offsetof(hilal_vet_params, narrow_centre),
    offsetof(hilal_vet_params, narrow_width),
    offsetof(hilal_vet_params, narrow_snr),
    offsetof(hilal_vet_params, narrow_snr_width),
    offsetof(hilal_vet_params, broad_centre),
    offsetof(hilal_vet_params, broad_width),
    offsetof(hilal_vet_params, elong_centre),
    offsetof(hilal_vet_params, elong_width),
    offsetof(hilal_vet_params, elong_snr),
    offsetof(hilal_vet_params, elong_snr_width),
    offsetof(hilal_vet_params, dipole_centre),
    offsetof(hilal_vet_params, dipole_width),
    offsetof(hilal_vet_params, dipole_sigma),
    offsetof(hilal_vet_params, dipole_sigma_width),
    offsetof(hilal_vet_params, negfrac_centre),
    offsetof(hilal_vet_params, negfrac_width),
    offsetof(hilal_vet_params, masked_centre),
    offsetof(hilal_vet_params, masked_width),
    offsetof(hilal_vet_params, sat_radius_px),
    offsetof(hilal_vet_params, sat_width_px),
    offsetof(hilal_vet_params, refdefect_factor),
    offsetof(hilal_vet_params, tile_px),
    offsetof(hilal_vet_params, tile_tol),
};

/* Default of measure.weight_scale, used when no configuration is at hand. */
#define DEFAULT_WEIGHT_SCALE 1.5

static void set_field(hilal_vet_params *p, size_t k, double value)
{
    char *base = (char *)p + vet_fields[k];
    if (vet_params[k].type == HILAL_PARAM_INT)
        *(long *)(void *)base = (long)value;
    else
        *(double *)(void *)base = value;
}

void hilal_vet_params_default(hilal_vet_params *p)
{
    memset(p, 0, sizeof *p);
    for (size_t k = 0; k < NVET; k++)
        set_field(p, k, strtod(vet_params[k].def, NULL));
    p->weight_scale = DEFAULT_WEIGHT_SCALE;
}

/* ---- helpers ------------------------------------------------------------ */

/* The logistic function 1 / (1 + e^-z). */
static double logistic(double z) { return 1.0 / (1.0 + exp(-z)); }

/* The k-th smallest (0-based) of the non-NaN a[0..n-1], k < n, reordering
 * a. Quickselect (Hoare 1961) with a median-of-3 pivot p and branch-free
 * partitions: one pass moves the values < p to the front, a second moves
 * those equal to p after them (so that ties, and an all-equal range, end
 * it); the loop then keeps the part that holds rank k, and sorts the last
 * 16 or fewer by insertion. The partitions compare and swap every value
 * without a data-dependent branch, several times faster on noise than
 * Wirth's scheme (hilal_select_kth_float()), whose branches the processor
 * mispredicts half of the time. The k-th smallest value is unique, so both
 * return the same value (a zero may come with the other sign, which
 * compares equal). */
static float select_kth(float *a, size_t n, size_t k)
{
    size_t lo = 0, hi = n;
    while (hi - lo > 16) {
        const float p0 = a[lo], p1 = a[lo + (hi - lo) / 2], p2 = a[hi - 1];
        const float p = p0 < p1 ? (p1 < p2 ? p1 : (p0 < p2 ? p2 : p0))
                                : (p0 < p2 ? p0 : (p1 < p2 ? p2 : p1));
        /* [lo, i): < p. */
        size_t i = lo;
        for (size_t j = lo; j < hi; j++) {
            const float x = a[j];
            a[j] = a[i];
            a[i] = x;
            i += x < p;
        }
        if (k < i) {
            hi = i;
            continue;
        }
        /* [i, e): == p (at least p itself). */
        size_t e = i;
        for (size_t j = i; j < hi; j++) {
            const float x = a[j];
            a[j] = a[e];
            a[e] = x;
            e += x <= p;
        }
        if (k < e)
            return p;
        lo = e;
    }
    for (size_t i = lo + 1; i < hi; i++) {
        const float x = a[i];
        size_t j = i;
        for (; j > lo && x < a[j - 1]; j--)
            a[j] = a[j - 1];
        a[j] = x;
    }
    return a[k];
}

/* Median (upper median for even n) of a[0..n-1], reordering a. n > 0. */
static float median_select(float *a, size_t n) { return select_kth(a, n, n / 2); }

/* Whether the 0-based pixel (x, y) is nearer to one of the others than to
 * (X, Y). */
static int nearer_other(double x, double y, double X, double Y, const double *others,
                        size_t nothers)
{
    const double d0 = (x - X) * (x - X) + (y - Y) * (y - Y);
    for (size_t k = 0; k < nothers; k++) {
        double dx = x - others[2 * k], dy = y - others[2 * k + 1];
        if (dx * dx + dy * dy < d0)
            return 1;
    }
    return 0;
}

/* Sharpness of a source at the 0-based position (X, Y): the value of its
 * brightest pixel divided by the value that a PSF of the fitted flux
 * predicts there. The flux is the linear least-squares amplitude
 * A = sum(I P) / sum(P^2) over the footprint (radius r_fp) with P the PSF
 * shifted to (X, Y) (equal weights: D has uniform unit noise). The
 * brightest pixel is sought in the 3x3 pixels around (X, Y): at low S/N the
 * position of a one-pixel event can be off by more than half a pixel. A
 * point source gives ~1, a single hot pixel at least sum(P^2)/P(0)^2. bg is
 * subtracted from img first; masked pixels, and pixels nearer to one of the
 * nothers neighbouring sources (0-based x, y pairs), are skipped. NaN when
 * undefined. */
static double sharpness_at(const float *img, long nx, long ny, const hilal_mask_t *mask,
                           double X, double Y, double sign, double bg, const hilal_psf *psf,
                           double r_fp, const double *others, size_t nothers)
{
    const long ix = (long)floor(X + 0.5), iy = (long)floor(Y + 0.5);
    if (ix < 0 || iy < 0 || ix >= nx || iy >= ny)
        return NAN;
    const long r = (long)ceil(r_fp);
    double sip = 0, spp = 0;
    for (long y = iy - r; y <= iy + r; y++) {
        if (y < 0 || y >= ny)
            continue;
        for (long x = ix - r; x <= ix + r; x++) {
            if (x < 0 || x >= nx)
                continue;
            double dx = (double)x - X, dy = (double)y - Y;
            if (dx * dx + dy * dy > r_fp * r_fp)
                continue;
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if (mask != NULL && (mask[i] & HILAL_MASK_UNUSABLE) != 0)
                continue;
            double v = img[i];
            if (!isfinite(v) || nearer_other((double)x, (double)y, X, Y, others, nothers))
                continue;
            double pv = hilal_measure_psf_value(psf, dx, dy);
            sip += sign * (v - bg) * pv;
            spp += pv * pv;
        }
    }
    if (!(spp > 0))
        return NAN;
    const double amp = sip / spp;
    /* The brightest usable pixel of the 3x3. */
    long bx = -1, by = -1;
    double best = -INFINITY;
    for (long y = iy - 1; y <= iy + 1; y++)
        for (long x = ix - 1; x <= ix + 1; x++) {
            if (x < 0 || y < 0 || x >= nx || y >= ny)
                continue;
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if (mask != NULL && (mask[i] & HILAL_MASK_UNUSABLE) != 0)
                continue;
            double v = sign * ((double)img[i] - bg);
            if (isfinite(v) && v > best) {
                best = v;
                bx = x;
                by = y;
            }
        }
    if (bx < 0)
        return NAN;
    const double pred = amp * hilal_measure_psf_value(psf, (double)bx - X, (double)by - Y);
    if (!(pred > 0))
        return NAN;
    return best / pred;
}

/* sum(P^2) / P(centre)^2: the sharpness of a single-pixel event. */
static double delta_sharpness(const hilal_psf *psf)
{
    if (psf == NULL || psf->data == NULL || psf->size <= 0)
        return NAN;
    const int size = psf->size, c = size / 2;
    double s2 = 0;
    for (int i = 0; i < size * size; i++)
        s2 += (double)psf->data[i] * psf->data[i];
    double p0 = psf->data[c * size + c];
    return p0 > 0 ? s2 / (p0 * p0) : NAN;
}

hilal_status hilal_vet_psfinfo_get(const hilal_psf *psf_d, double weight_scale,
                                   hilal_vet_psfinfo *info, hilal_error *err)
{
    info->fwhm_px = NAN;
    info->sharp_delta = NAN;
    if (psf_d == NULL || psf_d->data == NULL || psf_d->size <= 0)
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "P_D (the PSF of the difference) is missing, so candidates cannot "
                               "be vetted; the subtract stage must fill diff.psf_d");
    const double sigma_w = hilal_measure_weight_sigma(psf_d, weight_scale);
    const double c = psf_d->size / 2;
    double elong;
    hilal_measure_shape(psf_d->data, psf_d->size, psf_d->size, NULL, c, c, 1.0, sigma_w, NULL, 0,
                        &info->fwhm_px, &elong);
    info->sharp_delta = delta_sharpness(psf_d);
    if (!(info->fwhm_px > 0) || !(info->sharp_delta > 0))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "P_D (%dx%d px) has no positive core: FWHM %g px, central value %g",
                               psf_d->size, psf_d->size, info->fwhm_px,
                               (double)psf_d->data[psf_d->size / 2 * psf_d->size + psf_d->size / 2]);
    return HILAL_OK;
}

/* ---- the score ---------------------------------------------------------- */

/* A factor that is 1 well below centre and 0 well above (larger is worse);
 * 0.5 for an undefined statistic. */
static double falling(double s, double centre, double width)
{
    return isfinite(s) ? logistic((centre - s) / width) : 0.5;
}

double hilal_vet_sharp_centre(const hilal_vet_params *p, double snr)
{
    double a = fabs(snr);
    double centre = a > p->sharp_snr ? p->sharp_centre * p->sharp_snr / a : p->sharp_centre;
    return centre > p->sharp_floor ? centre : p->sharp_floor;
}

double hilal_vet_score(const hilal_vet_params *p, const hilal_vet_psfinfo *info,
                       const hilal_candidate *c, double factors[HILAL_VET_NFACTORS])
{
    double f[HILAL_VET_NFACTORS];
    const double snr = fabs(c->snr);
    /* Sharpness, normalised so that a PSF gives 0 and a single pixel 1:
     * z = (s - 1) / (s_delta - 1). Its noise falls as 1/|snr|, so above
     * sharp_snr the centre and width shrink in proportion (down to
     * sharp_floor). An unresolved P_D (s_delta < 1.2) cannot tell the two
     * apart: the factor is then 1. */
    if (info->sharp_delta >= 1.2) {
        double centre = hilal_vet_sharp_centre(p, c->snr);
        f[HILAL_VET_F_SHARP] = falling((c->sharpness - 1.0) / (info->sharp_delta - 1.0), centre,
                                       p->sharp_width * centre / p->sharp_centre);
    } else {
        f[HILAL_VET_F_SHARP] = 1.0;
    }
    /* Size on D against P_D: much narrower (cosmic-ray tracks, which the
     * sharpness misses when their charge is spread over a few pixels) and
     * much broader (galaxy residuals, PSF errors). The FWHM of a faint
     * source is mostly noise: narrowness is gated by |snr|. */
    const double ratio = c->fwhm / info->fwhm_px;
    f[HILAL_VET_F_NARROW] =
        isfinite(ratio) ? 1.0 - logistic((p->narrow_centre - ratio) / p->narrow_width) *
                                    logistic((snr - p->narrow_snr) / p->narrow_snr_width)
                        : 0.5;
    f[HILAL_VET_F_BROAD] = falling(ratio, p->broad_centre, p->broad_width);
    /* Streaks; the elongation of a faint source is mostly noise: gated. */
    f[HILAL_VET_F_ELONG] =
        isfinite(c->elongation)
            ? 1.0 - logistic((c->elongation - p->elong_centre) / p->elong_width) *
                        logistic((snr - p->elong_snr) / p->elong_snr_width)
            : 0.5;
    /* Dipole: penalised only when the opposite lobe is itself significant
     * (q = |snr| (1 - dipole) / (1 + dipole), its |S_corr|) AND comparable to
     * the main lobe (dipole measure small). */
    if (isfinite(c->dipole)) {
        double q = snr * (1.0 - c->dipole) / (1.0 + c->dipole);
        f[HILAL_VET_F_DIPOLE] = 1.0 - logistic((q - p->dipole_sigma) / p->dipole_sigma_width) *
                                          logistic((p->dipole_centre - c->dipole) / p->dipole_width);
    } else {
        f[HILAL_VET_F_DIPOLE] = 0.5;
    }
    f[HILAL_VET_F_NEGFRAC] = falling(c->neg_frac, p->negfrac_centre, p->negfrac_width);
    f[HILAL_VET_F_MASKED] = falling(c->masked_frac, p->masked_centre, p->masked_width);
    /* Distance to saturation: larger is better. */
    f[HILAL_VET_F_SAT] = isfinite(c->dist_sat_px)
                             ? logistic((c->dist_sat_px - p->sat_radius_px) / p->sat_width_px)
                             : 0.5;
    f[HILAL_VET_F_REFDEFECT] = (c->flags & HILAL_CAND_REF_DEFECT) ? p->refdefect_factor : 1.0;
    double rb = 1.0;
    for (int k = 0; k < HILAL_VET_NFACTORS; k++) {
        rb *= f[k];
        if (factors != NULL)
            factors[k] = f[k];
    }
    return rb < 0 ? 0 : (rb > 1 ? 1 : rb);
}

/* ---- statistics --------------------------------------------------------- */

/* Scratch of one thread. */
typedef struct vet_scratch {
    float *buf;                     /* a band of tiles or an image annulus (nbuf floats) */
    size_t *count;                  /* pixels of each tile of a band (ntx) */
    float *tmp;                     /* a tile, for median_bracket() */
} vet_scratch;

/* Per-frame context of the vetting: read-only while candidates are vetted,
 * apart from each thread's scratch. */
typedef struct vet_ctx {
    const hilal_diff *diff;
    const hilal_vet_params *p;
    hilal_vet_psfinfo info;
    long nx, ny;
    const hilal_mask_t *sci_mask;   /* same grid as diff, or NULL */
    const hilal_image *sci;         /* science image with its PSF, or NULL */
    const hilal_psf *sci_psf;
    double sci_delta;               /* sharpness of a single pixel against sci_psf */
    const hilal_image *ref;         /* aligned reference on the same grid, or NULL */
    const hilal_psf *ref_psf;       /* with data, or NULL */
    double ref_delta;
    double r_fp, r_dip;             /* footprint and dipole radii, px */
    long ntx, nty;                  /* tiles */
    unsigned char *need;            /* per tile: 1 when it holds a candidate */
    double *tile_std;               /* robust std of S_corr per needed tile (else NaN) */
    long *bands;                    /* rows of tiles (ty) with needed tiles */
    size_t nbands;
    size_t nbuf;                    /* floats in each scratch buf */
    hilal_candidate *cands;
    hilal_neighbours nb;            /* the candidates by position */
    vet_scratch scratch[HILAL_PARALLEL_MAX_THREADS];
} vet_ctx;

/* The upper median (the (n/2)-th smallest value, 0-based) of the non-NaN
 * a[0..n-1], as median_select() finds it, reordering a; tmp holds n
 * floats. Long arrays first go through one pass of Floyd and Rivest's
 * selection (Comm. ACM 18, 165, 1975): two values lo <= hi that bracket the
 * median are selected from a regular sample of 512 values (ranks 3 sigma
 * of the binomial apart around the median's expected rank); one pass
 * counts the values below lo and copies those within [lo, hi] to tmp
 * (~15% of them); when the median's rank falls among the copied values it
 * is selected there, otherwise (rarely) among all of them. Either way the
 * result is the (n/2)-th smallest value. */
static float median_bracket(float *a, size_t n, float *tmp)
{
    enum { NS = 512 };
    const size_t k = n / 2;
    if (n < 8 * NS)
        return select_kth(a, n, k);
    float smp[NS];
    for (size_t i = 0; i < NS; i++)
        smp[i] = a[i * n / NS];
    const double pos = ((double)k + 0.5) * NS / (double)n;
    const double margin = 3.0 * sqrt(0.25 * NS) + 2.0;
    const long klo = (long)floor(pos - margin), khi = (long)ceil(pos + margin);
    const float lo = klo >= 0 ? select_kth(smp, NS, (size_t)klo) : -INFINITY;
    const float hi = khi < NS ? select_kth(smp, NS, (size_t)khi) : INFINITY;
    size_t below = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        const float x = a[i];
        below += x < lo;
        tmp[m] = x;
        m += (x >= lo) & (x <= hi);
    }
    if (below <= k && k < below + m)
        return select_kth(tmp, m, k - below);
    return select_kth(a, n, k);
}

/* Robust (1.4826 MAD) standard deviation of the n values a (reordered and
 * overwritten; tmp: n floats of scratch); NaN for fewer than 64. */
static double robust_std(float *a, size_t n, float *tmp)
{
    if (n < 64)
        return NAN;
    /* Median, then the median of the absolute deviations from it. */
    float med = median_bracket(a, n, tmp);
    for (size_t k = 0; k < n; k++)
        a[k] = fabsf(a[k] - med);
    float mad = median_bracket(a, n, tmp);
    return 1.4826 * mad;
}

/* The noise of S_corr in the needed tiles of the band of tiles ty: the
 * robust standard deviation over the usable pixels of each tile. The band
 * is read row by row across the frame, so that memory is read in whole
 * rows, each tile's pixels going to its own part of the scratch buffer:
 * tile tx, columns x0 .. x1 - 1, holds at most (x1 - x0) x band-height
 * pixels from x0 x band-height on. */
static void band_std(const vet_ctx *v, vet_scratch *sc, long ty)
{
    const long ts = v->p->tile_px, nx = v->nx, ntx = v->ntx;
    const long y0 = ty * ts, y1 = y0 + ts < v->ny ? y0 + ts : v->ny, h = y1 - y0;
    const hilal_mask_t *mask = v->diff->mask;
    const unsigned char *need = v->need + ty * ntx;
    size_t *count = sc->count;
    for (long tx = 0; tx < ntx; tx++)
        count[tx] = 0;
    for (long y = y0; y < y1; y++) {
        const float *srow = v->diff->scorr + (size_t)y * (size_t)nx;
        const hilal_mask_t *mrow = mask != NULL ? mask + (size_t)y * (size_t)nx : NULL;
        for (long tx = 0; tx < ntx; tx++) {
            if (!need[tx])
                continue;
            const long x0 = tx * ts, x1 = x0 + ts < nx ? x0 + ts : nx;
            float *out = sc->buf + (size_t)x0 * (size_t)h;
            size_t n = count[tx];
            for (long x = x0; x < x1; x++) {
                float s = srow[x];
                if (!isfinite(s))
                    continue;
                if (mrow != NULL && (mrow[x] & HILAL_DETECT_VETO_MASK) != 0)
                    continue;
                out[n++] = s;
            }
            count[tx] = n;
        }
    }
    for (long tx = 0; tx < ntx; tx++)
        if (need[tx])
            v->tile_std[ty * ntx + tx] =
                robust_std(sc->buf + (size_t)(tx * ts) * (size_t)h, count[tx], sc->tmp);
}

/* hilal_parallel_for() body: the bands bands[lo .. hi). */
static void bands_range(void *ctx, long lo, long hi, int tid)
{
    vet_ctx *v = ctx;
    for (long i = lo; i < hi; i++)
        band_std(v, &v->scratch[tid], v->bands[i]);
}

/* Normalised sharpness z of the image in which the event is positive (the
 * science frame for a brightening, the aligned reference for a fading
 * candidate) at the 0-based position (X, Y), against that image's own PSF.
 * A cosmic ray or hot pixel is sharp there whatever ZOGY's D made of it
 * (when the reference PSF is the broader one, D smooths a cosmic ray of
 * the science frame towards P_D). The local background and noise come from
 * an annulus r < rho <= 2 r around the footprint radius r (median and
 * 1.4826 MAD, robust to the source); z is NaN unless the brightest pixel of
 * the 3x3 under the candidate is at least img_sharp_snr sigma above it (a
 * faint event's pixels carry no shape information). Pixels nearer to one of
 * the nothers neighbouring candidates are left out of the fit. */
static double image_z(const vet_ctx *v, vet_scratch *sc, const hilal_image *img,
                      const hilal_psf *psf, double delta, double X, double Y,
                      const double *others, size_t nothers)
{
    if (img == NULL || psf == NULL || !(delta >= 1.2))
        return NAN;
    const long nx = v->nx, ny = v->ny;
    const long ix = (long)floor(X + 0.5), iy = (long)floor(Y + 0.5);
    const float *px = img->pix;
    const hilal_mask_t *pm = img->mask;
    double r = v->p->footprint_fwhm * psf->fwhm_px;
    if (!(r >= 2.0))
        r = 2.0;
    const double r2a = r * r, r2b = 4.0 * r2a;
    const long rb = (long)ceil(2.0 * r);
    float *buf = sc->buf;
    size_t n = 0;
    for (long y = iy - rb; y <= iy + rb; y++)
        for (long x = ix - rb; x <= ix + rb; x++) {
            if (x < 0 || y < 0 || x >= nx || y >= ny)
                continue;
            double dx = (double)x - X, dy = (double)y - Y, d2 = dx * dx + dy * dy;
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if (d2 <= r2a || d2 > r2b || (pm[i] & HILAL_MASK_UNUSABLE) != 0 || !isfinite(px[i]))
                continue;
            if (n < v->nbuf)
                buf[n++] = px[i];
        }
    if (n < 16)
        return NAN;
    const double bg = median_select(buf, n);
    for (size_t k = 0; k < n; k++)
        buf[k] = fabsf(buf[k] - (float)bg);
    const double sigma = 1.4826 * median_select(buf, n);
    if (!(sigma > 0))
        return NAN;
    double best = -INFINITY;
    for (long y = iy - 1; y <= iy + 1; y++)
        for (long x = ix - 1; x <= ix + 1; x++) {
            if (x < 0 || y < 0 || x >= nx || y >= ny)
                continue;
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if ((pm[i] & HILAL_MASK_UNUSABLE) == 0 && isfinite(px[i]) && px[i] > best)
                best = px[i];
        }
    if (!((best - bg) / sigma >= v->p->img_sharp_snr))
        return NAN;
    double s = sharpness_at(px, nx, ny, pm, X, Y, 1.0, bg, psf, r, others, nothers);
    return (s - 1.0) / (delta - 1.0);
}

/* Whether the reference mask marks a defect under the candidate: REFDEFECT
 * in the difference mask, or a bad/cosmic/defect bit in the aligned
 * reference mask, within the footprint. */
static int ref_mask_defect(const vet_ctx *v, double X, double Y)
{
    const long nx = v->nx, ny = v->ny;
    const long r = (long)ceil(v->r_fp);
    const long ix = (long)floor(X + 0.5), iy = (long)floor(Y + 0.5);
    const hilal_mask_t refbits = HILAL_MASK_REFDEFECT | HILAL_MASK_BAD | HILAL_MASK_CR;
    for (long y = iy - r; y <= iy + r; y++)
        for (long x = ix - r; x <= ix + r; x++) {
            if (x < 0 || y < 0 || x >= nx || y >= ny)
                continue;
            double dx = (double)x - X, dy = (double)y - Y;
            if (dx * dx + dy * dy > v->r_fp * v->r_fp)
                continue;
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            if (v->diff->mask != NULL && (v->diff->mask[i] & HILAL_MASK_REFDEFECT) != 0)
                return 1;
            if (v->ref != NULL && (v->ref->mask[i] & refbits) != 0)
                return 1;
        }
    return 0;
}

/* OR of the masks (each may be NULL) over the len pixels from index i. */
static hilal_mask_t mask_or(const hilal_mask_t *a, const hilal_mask_t *b, const hilal_mask_t *c,
                            size_t i, long len)
{
    hilal_mask_t acc = 0;
    if (a != NULL)
        for (long k = 0; k < len; k++)
            acc |= a[i + (size_t)k];
    if (b != NULL)
        for (long k = 0; k < len; k++)
            acc |= b[i + (size_t)k];
    if (c != NULL)
        for (long k = 0; k < len; k++)
            acc |= c[i + (size_t)k];
    return acc;
}

/* Squared distances from the 0-based position (X, Y) (nearest pixel ix, iy)
 * to the nearest pixel centre with a HILAL_MASK_UNUSABLE bit (*dmask2) and
 * with SAT (*dsat2) in the union of the difference, science and aligned
 * reference masks, both capped at rs^2, rs = search_radius_px. Only pixels
 * of the square of half-side ceil(rs) around (ix, iy) can be nearer than
 * rs. A row is skipped when no pixel of it can lower either distance
 * (dy^2 is at least the larger, *dsat2: SAT is one of the unusable bits,
 * so *dsat2 >= *dmask2) or when none of its pixels in the square is
 * unusable (one vectorisable OR over the row); the others are searched
 * pixel by pixel. The minimum does not depend on the order the pixels are
 * visited in, so this is the exhaustive search of the square. */
static void mask_distances(const vet_ctx *v, double X, double Y, long ix, long iy, double *dsat2,
                           double *dmask2)
{
    const long nx = v->nx, ny = v->ny;
    const double rs = v->p->search_radius_px;
    const long rr = (long)ceil(rs);
    const hilal_mask_t *ma = v->diff->mask, *mb = v->sci_mask;
    const hilal_mask_t *mc = v->ref != NULL ? v->ref->mask : NULL;
    const long xa = ix - rr < 0 ? 0 : ix - rr, xb = ix + rr >= nx ? nx - 1 : ix + rr;
    double ds2 = rs * rs, dm2 = rs * rs;
    if (xa <= xb) {
        for (long y = iy - rr; y <= iy + rr; y++) {
            if (y < 0 || y >= ny)
                continue;
            const double dy = (double)y - Y;
            if (dy * dy >= ds2)
                continue;
            const size_t row = (size_t)y * (size_t)nx;
            if ((mask_or(ma, mb, mc, row + (size_t)xa, xb - xa + 1) & HILAL_MASK_UNUSABLE) == 0)
                continue;
            for (long x = xa; x <= xb; x++) {
                size_t i = row + (size_t)x;
                hilal_mask_t m = ma != NULL ? ma[i] : 0;
                if (mb != NULL)
                    m |= mb[i];
                if (mc != NULL)
                    m |= mc[i];
                if ((m & HILAL_MASK_UNUSABLE) == 0)
                    continue;
                double dx = (double)x - X, d2 = dx * dx + dy * dy;
                if (d2 < dm2)
                    dm2 = d2;
                if ((m & HILAL_MASK_SAT) && d2 < ds2)
                    ds2 = d2;
            }
        }
    }
    *dsat2 = ds2;
    *dmask2 = dm2;
}

/* All statistics, flags and rb of candidate k, with the scratch sc. */
static void vet_one(const vet_ctx *v, vet_scratch *sc, hilal_candidate *cands, size_t k)
{
    hilal_candidate *c = &cands[k];
    const hilal_diff *diff = v->diff;
    const long nx = v->nx, ny = v->ny;
    const double sign = c->snr < 0 ? -1.0 : 1.0;
    const double X = c->x - 1.0, Y = c->y - 1.0;
    const long ix = (long)floor(X + 0.5), iy = (long)floor(Y + 0.5);
    uint32_t flags = c->flags & HILAL_CAND_MERGED;

    /* 1. Footprint of radius r_fp: masked fraction (pixels off the image
     * count as masked), fraction of opposite-signed pixels of D, EDGE. */
    const long r = (long)ceil(v->r_fp);
    size_t ntot = 0, nmask = 0, nuse = 0, nneg = 0;
    int edge = 0;
    for (long y = iy - r; y <= iy + r; y++)
        for (long x = ix - r; x <= ix + r; x++) {
            double dx = (double)x - X, dy = (double)y - Y;
            if (dx * dx + dy * dy > v->r_fp * v->r_fp)
                continue;
            ntot++;
            if (x < 0 || y < 0 || x >= nx || y >= ny) {
                nmask++;
                edge = 1;
                continue;
            }
            size_t i = (size_t)y * (size_t)nx + (size_t)x;
            hilal_mask_t m = diff->mask != NULL ? diff->mask[i] : 0;
            if (v->sci_mask != NULL)
                m |= v->sci_mask[i];
            if (m & HILAL_MASK_EDGE)
                edge = 1;
            if (m & HILAL_MASK_UNUSABLE) {
                nmask++;
                continue;
            }
            double d = sign * diff->d[i];
            if (!isfinite(d))
                continue;
            nuse++;
            if (d < 0)
                nneg++;
        }
    c->masked_frac = ntot > 0 ? (double)nmask / (double)ntot : NAN;
    c->neg_frac = nuse > 0 ? (double)nneg / (double)nuse : NAN;
    if (edge)
        flags |= HILAL_CAND_EDGE;
    if (nmask > 0)
        flags |= HILAL_CAND_NEAR_MASK;

    /* 2. Sharpness on D against P_D at the measured position, and on the
     * image where the event is positive against its PSF; the sharper of
     * the two (on D's scale: s = 1 + z (s_delta(P_D) - 1)) is kept. A
     * fading candidate whose reference feature is sharp is a reference
     * defect (a cosmic ray or hot pixel of the reference). */
    double others[2 * 32];
    size_t no = hilal_neighbours_find(&v->nb, k, 2.0 * v->r_fp, others, 32);
    c->sharpness = sharpness_at(diff->d, nx, ny, diff->mask, X, Y, sign, 0.0, &diff->psf_d, v->r_fp,
                                others, no);
    {
        double zi = sign > 0
                        ? image_z(v, sc, v->sci, v->sci_psf, v->sci_delta, X, Y, others, no)
                        : image_z(v, sc, v->ref, v->ref_psf, v->ref_delta, X, Y, others, no);
        double zd = (c->sharpness - 1.0) / (v->info.sharp_delta - 1.0);
        if (isfinite(zi) && (!isfinite(zd) || zi > zd))
            c->sharpness = 1.0 + zi * (v->info.sharp_delta - 1.0);
        if (sign < 0 && isfinite(zi) && zi > hilal_vet_sharp_centre(v->p, c->snr))
            flags |= HILAL_CAND_REF_DEFECT;
    }

    /* 3. Dipole: the strongest opposite-signed extremum of S_corr whose
     * peak lies within r_dip, q, against the peak p = |snr|:
     * dipole = (p - q) / (p + q), clipped to [0, 1]. Only extrema count, so
     * the wing of an unrelated opposite-signed source farther away does
     * not. */
    {
        const long rd = (long)ceil(v->r_dip);
        double q = 0;
        for (long y = iy - rd; y <= iy + rd; y++)
            for (long x = ix - rd; x <= ix + rd; x++) {
                if (x < 1 || y < 1 || x >= nx - 1 || y >= ny - 1)
                    continue;
                double dx = (double)x - X, dy = (double)y - Y;
                if (dx * dx + dy * dy > v->r_dip * v->r_dip)
                    continue;
                size_t i = (size_t)y * (size_t)nx + (size_t)x;
                if (diff->mask != NULL && (diff->mask[i] & HILAL_MASK_UNUSABLE) != 0)
                    continue;
                double s = -sign * diff->scorr[i];
                if (!(s > q))
                    continue;
                int ext = 1;
                for (long yy = y - 1; yy <= y + 1 && ext; yy++)
                    for (long xx = x - 1; xx <= x + 1; xx++) {
                        double w = -sign * diff->scorr[yy * nx + xx];
                        if ((xx != x || yy != y) && isfinite(w) && w > s) {
                            ext = 0;
                            break;
                        }
                    }
                if (ext)
                    q = s;
            }
        double pk = fabs(c->snr);
        double dm = pk + q > 0 ? (pk - q) / (pk + q) : NAN;
        c->dipole = dm < 0 ? 0 : dm;
    }

    /* 4. Distances (from the measured position to pixel centres) to the
     * nearest saturated and the nearest unusable pixel, in the union of the
     * difference, science and aligned reference masks; capped at the search
     * radius. */
    {
        double dsat2, dmask2;
        mask_distances(v, X, Y, ix, iy, &dsat2, &dmask2);
        c->dist_sat_px = sqrt(dsat2);
        c->dist_mask_px = sqrt(dmask2);
        if (c->dist_sat_px <= v->p->sat_radius_px)
            flags |= HILAL_CAND_NEAR_SAT;
    }

    /* 5. Defects of the reference marked in the masks. */
    if (ref_mask_defect(v, X, Y))
        flags |= HILAL_CAND_REF_DEFECT;

    /* 6. Noise of S_corr in the candidate's tile: the ZOGY tile it was
     * subtracted in (when the subtraction was tiled) and a local window. */
    {
        const hilal_diff_tile *zt = hilal_diff_tile_at(v->diff, c->x, c->y);
        if (zt != NULL && zt->bad)
            flags |= HILAL_CAND_BAD_TILE;
        long tx = ix / v->p->tile_px, ty = iy / v->p->tile_px;
        if (ix >= 0 && iy >= 0 && tx < v->ntx && ty < v->nty) {
            double sd = v->tile_std[ty * v->ntx + tx];
            if (isfinite(sd) && fabs(sd - 1.0) > v->p->tile_tol)
                flags |= HILAL_CAND_BAD_TILE;
        }
    }

    /* 7. The score, and the flags that mirror its factors. */
    c->flags = flags;
    double f[HILAL_VET_NFACTORS];
    c->rb = hilal_vet_score(v->p, &v->info, c, f);
    if (f[HILAL_VET_F_SHARP] < 0.5 || f[HILAL_VET_F_NARROW] < 0.5)
        flags |= HILAL_CAND_SHARP;
    if (f[HILAL_VET_F_DIPOLE] < 0.5)
        flags |= HILAL_CAND_DIPOLE;
    c->flags = flags;
}

/* hilal_parallel_for() body: candidates lo .. hi - 1. */
static void cands_range(void *ctx, long lo, long hi, int tid)
{
    vet_ctx *v = ctx;
    for (long k = lo; k < hi; k++)
        vet_one(v, &v->scratch[tid], v->cands, (size_t)k);
}

/* hilal_vet_candidates() on up to `threads` threads. Every candidate is
 * vetted from the frame and the positions of the others alone, and the
 * per-tile noise is computed for every tile holding a candidate before any
 * candidate is vetted, so the results do not depend on the number of
 * threads. */
static hilal_status vet_candidates(const hilal_frame *frame, const hilal_vet_params *p,
                                   int threads, hilal_candidate *cands, size_t n,
                                   hilal_error *err)
{
    hilal_status st = HILAL_OK;
    vet_ctx v;
    memset(&v, 0, sizeof v);
    if (n == 0)
        return HILAL_OK;
    const hilal_diff *diff = &frame->diff;
    if (diff->d == NULL || diff->scorr == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "vetting needs D and S_corr of the difference, which are missing");
    st = hilal_vet_psfinfo_get(&diff->psf_d, p->weight_scale, &v.info, err);
    if (st != HILAL_OK)
        return st;
    v.diff = diff;
    v.p = p;
    v.nx = diff->nx;
    v.ny = diff->ny;
    if (frame->sci != NULL && frame->sci->mask != NULL && frame->sci->nx == v.nx &&
        frame->sci->ny == v.ny)
        v.sci_mask = frame->sci->mask;
    /* The science image and its PSF (for its own sharpness). */
    if ((frame->products & HILAL_PROD_PSF) && frame->sci != NULL && frame->sci->pix != NULL &&
        frame->sci->mask != NULL && frame->sci->nx == v.nx && frame->sci->ny == v.ny &&
        frame->sci_psf.data != NULL) {
        v.sci = frame->sci;
        v.sci_psf = &frame->sci_psf;
        v.sci_delta = delta_sharpness(&frame->sci_psf);
    }
    /* The reference is on the science grid only once aligned. */
    if ((frame->products & HILAL_PROD_ALIGNED) && frame->ref != NULL && frame->ref->pix != NULL &&
        frame->ref->mask != NULL && frame->ref->nx == v.nx && frame->ref->ny == v.ny) {
        v.ref = frame->ref;
        if ((frame->products & HILAL_PROD_PSF) && frame->ref_psf.data != NULL) {
            v.ref_psf = &frame->ref_psf;
            v.ref_delta = delta_sharpness(&frame->ref_psf);
        }
    }
    v.r_fp = p->footprint_fwhm * v.info.fwhm_px;
    if (v.r_fp < 2.0)
        v.r_fp = 2.0;
    v.r_dip = p->dipole_fwhm * v.info.fwhm_px;
    if (v.r_dip < v.r_fp)
        v.r_dip = v.r_fp;
    v.ntx = (v.nx + p->tile_px - 1) / p->tile_px;
    v.nty = (v.ny + p->tile_px - 1) / p->tile_px;
    if (threads < 1)
        threads = 1;
    if (threads > HILAL_PARALLEL_MAX_THREADS)
        threads = HILAL_PARALLEL_MAX_THREADS;
    if ((size_t)threads > n)
        threads = (int)n;
    v.cands = cands;
    const size_t ntile = (size_t)v.ntx * (size_t)v.nty;
    v.tile_std = malloc(ntile * sizeof *v.tile_std);
    v.need = calloc(ntile, 1);
    v.bands = malloc((size_t)v.nty * sizeof *v.bands);
    /* Scratch for a band of tiles or an image annulus, whichever is
     * larger. */
    double rmax = v.r_fp;
    if (v.sci_psf != NULL && p->footprint_fwhm * v.sci_psf->fwhm_px > rmax)
        rmax = p->footprint_fwhm * v.sci_psf->fwhm_px;
    if (v.ref_psf != NULL && p->footprint_fwhm * v.ref_psf->fwhm_px > rmax)
        rmax = p->footprint_fwhm * v.ref_psf->fwhm_px;
    const long ra = 2 * (long)ceil(2.0 * rmax) + 1;
    const size_t tile_n = (size_t)(p->tile_px < v.nx ? p->tile_px : v.nx) *
                          (size_t)(p->tile_px < v.ny ? p->tile_px : v.ny);
    v.nbuf = (size_t)v.nx * (size_t)(p->tile_px < v.ny ? p->tile_px : v.ny);
    if ((size_t)(ra * ra) > v.nbuf)
        v.nbuf = (size_t)(ra * ra);
    int nomem = v.tile_std == NULL || v.need == NULL || v.bands == NULL;
    for (int t = 0; t < threads && !nomem; t++) {
        v.scratch[t].buf = malloc(v.nbuf * sizeof *v.scratch[t].buf);
        v.scratch[t].count = malloc((size_t)v.ntx * sizeof *v.scratch[t].count);
        v.scratch[t].tmp = malloc(tile_n * sizeof *v.scratch[t].tmp);
        nomem = v.scratch[t].buf == NULL || v.scratch[t].count == NULL ||
                v.scratch[t].tmp == NULL;
    }
    if (nomem) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for vetting %zu candidates", n);
        goto cleanup;
    }

    /* 1. The noise of S_corr in every tile that holds a candidate (the
     * tile of its nearest pixel), once per tile, band by band. */
    for (size_t i = 0; i < ntile; i++)
        v.tile_std[i] = NAN;
    for (size_t k = 0; k < n; k++) {
        const long ix = (long)floor(cands[k].x - 1.0 + 0.5);
        const long iy = (long)floor(cands[k].y - 1.0 + 0.5);
        const long tx = ix / p->tile_px, ty = iy / p->tile_px;
        if (ix >= 0 && iy >= 0 && tx < v.ntx && ty < v.nty)
            v.need[ty * v.ntx + tx] = 1;
    }
    for (long ty = 0; ty < v.nty; ty++)
        if (memchr(v.need + ty * v.ntx, 1, (size_t)v.ntx) != NULL)
            v.bands[v.nbands++] = ty;
    hilal_parallel_for(threads, (long)v.nbands, bands_range, &v);

    /* 2. The candidates. */
    st = hilal_neighbours_init(&v.nb, cands, n, err);
    if (st != HILAL_OK)
        goto cleanup;
    hilal_parallel_for(threads, (long)n, cands_range, &v);
cleanup:
    hilal_neighbours_clear(&v.nb);
    for (int t = 0; t < HILAL_PARALLEL_MAX_THREADS; t++) {
        free(v.scratch[t].buf);
        free(v.scratch[t].count);
        free(v.scratch[t].tmp);
    }
    free(v.tile_std);
    free(v.need);
    free(v.bands);
    return st;
}

hilal_status hilal_vet_candidates(const hilal_frame *frame, const hilal_vet_params *p,
                                  hilal_candidate *cands, size_t n, hilal_error *err)
{
    return vet_candidates(frame, p, 1, cands, n, err);
}

/* ---- the stage ---------------------------------------------------------- */

/* The stage's state: the parameters (first, so that the state reads as a
 * hilal_vet_params) and the threads of pipeline.threads. */
typedef struct vet_state {
    hilal_vet_params p;
    int threads;
} vet_state;

static hilal_status vet_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    vet_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_vet_params *p = &s->p;
    char key[96];
    for (size_t k = 0; k < NVET; k++) {
        snprintf(key, sizeof key, "vet.%s", vet_params[k].key);
        set_field(p, k, vet_params[k].type == HILAL_PARAM_INT
                            ? (double)hilal_config_get_int(cfg, key)
                            : hilal_config_get_double(cfg, key));
    }
    /* Candidates' FWHM was measured with measure.weight_scale; FWHM(P_D)
     * must be measured the same way. */
    p->weight_scale = DEFAULT_WEIGHT_SCALE;
    if (hilal_config_param(cfg, "measure.weight_scale") != NULL)
        p->weight_scale = hilal_config_get_double(cfg, "measure.weight_scale");
    if (!(p->sat_radius_px < p->search_radius_px)) {
        hilal_status st = hilal_error_set(
            err, HILAL_ERR_CONFIG,
            "vet.sat_radius_px (%g px) must be smaller than vet.search_radius_px (%g px), beyond "
            "which distances to saturated pixels are not measured",
            p->sat_radius_px, p->search_radius_px);
        free(s);
        return st;
    }
    /* pipeline.threads = 0: one per core. */
    s->threads = 1;
    if (hilal_config_param(cfg, "pipeline.threads") != NULL)
        s->threads = hilal_fft_threads((int)hilal_config_get_int(cfg, "pipeline.threads"));
    *state = s;
    return HILAL_OK;
}

static hilal_status vet_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const vet_state *s = state;
    hilal_status st =
        vet_candidates(frame, &s->p, s->threads, frame->cands, frame->ncands, err);
    if (st != HILAL_OK)
        return st;
    size_t nreal = 0;
    for (size_t k = 0; k < frame->ncands; k++)
        nreal += frame->cands[k].rb >= 0.5;
    hilal_log(HILAL_LOG_INFO, "frame %s: %zu of %zu candidates with rb >= 0.5", frame->frame_id,
              nreal, frame->ncands);
    return HILAL_OK;
}

static void vet_fini(void *state) { free(state); }

const hilal_stage hilal_stage_vet = {
    .name = "vet",
    .summary = "vetting statistics, flags and a real/bogus score rb for candidates",
    .params = vet_params,
    .nparams = NVET,
    .needs = HILAL_PROD_DIFFERENCE | HILAL_PROD_CANDIDATES | HILAL_PROD_MEASURED,
    .makes = HILAL_PROD_VETTED,
    .flags = 0,
    .init = vet_init,
    .run = vet_run,
    .fini = vet_fini,
};
