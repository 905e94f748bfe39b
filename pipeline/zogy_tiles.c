/* ZOGY on overlapping tiles, each with its own PSFs, blended without seams
 * (docs/zogy.md, "Tiles"). hilal_zogy_run_tiled() is what the subtract stage
 * calls:
 *  1. The frame is cut into a grid of about tile_px x tile_px cores. The
 *     PSF variation across the field is measured from the FWHM of the usable
 *     stars (a robust quadratic surface per image); without significant
 *     variation (or with one tile) the frame is subtracted in one piece.
 *  2. Each tile gets its own science and reference PSFs, built from the
 *     stars inside its window (the core widened by half the blending band);
 *     a tile with too few stars keeps the whole-frame PSFs, and says so.
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
#include "hilal/zogy.h"
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
    t->tile_px = 1024;
    t->overlap_px = 128;
    t->min_vary = 0.05;
    t->min_stars = 15;
    t->scorr_std_min = 0.8;
    t->scorr_std_max = 1.25;
    t->match_radius_px = 1.5;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of v[0..n) (reordered). NaN for n = 0. */
static double median_inplace(double *v, size_t n)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ------------------------------------------------------------------------
 * PSF variation across the field
 * ------------------------------------------------------------------------ */

/* Solves the n x n system a x = b (a row-major, destroyed) by Gaussian
 * elimination with partial pivoting. Returns 0 when singular. */
static int solve(double *a, double *b, int n)
{
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(a[r * n + c]) > fabs(a[p * n + c]))
                p = r;
        if (!(fabs(a[p * n + c]) > 1e-12))
            return 0;
        if (p != c) {
            for (int k = 0; k < n; k++) {
                double t = a[c * n + k];
                a[c * n + k] = a[p * n + k];
                a[p * n + k] = t;
            }
            double t = b[c];
            b[c] = b[p];
            b[p] = t;
        }
        for (int r = c + 1; r < n; r++) {
            double f = a[r * n + c] / a[c * n + c];
            for (int k = c; k < n; k++)
                a[r * n + k] -= f * a[c * n + k];
            b[r] -= f * b[c];
        }
    }
    for (int c = n - 1; c >= 0; c--) {
        double s = b[c];
        for (int k = c + 1; k < n; k++)
            s -= a[c * n + k] * b[k];
        b[c] = s / a[c * n + c];
    }
    return 1;
}

static void quad_terms(double u, double v, double t[6])
{
    t[0] = 1;
    t[1] = u;
    t[2] = v;
    t[3] = u * u;
    t[4] = u * v;
    t[5] = v * v;
}

/* Relative FWHM variation across an nx x ny frame: the usable stars with
 * flux / flux_err >= min_snr and a finite FWHM are fitted by
 * FWHM(u, v) = c0 + c1 u + c2 v + c3 u^2 + c4 uv + c5 v^2 (u, v the
 * position scaled to [-1, 1]) by least squares, clipped at 3 robust sigma
 * (5 passes); the variation is (max - min) / median of the surface over a
 * 9 x 9 grid spanning the frame. NaN with fewer than 30 stars. */
static double fwhm_variation(const hilal_starlist *stars, long nx, long ny, double min_snr,
                             int *nused)
{
    *nused = 0;
    if (stars == NULL || stars->n == 0)
        return NAN;
    size_t n = 0;
    double *u = malloc(sizeof *u * stars->n), *v = malloc(sizeof *v * stars->n);
    double *f = malloc(sizeof *f * stars->n), *r = malloc(sizeof *r * stars->n);
    unsigned char *keep = malloc(stars->n);
    double result = NAN;
    if (u == NULL || v == NULL || f == NULL || r == NULL || keep == NULL)
        goto cleanup;
    const double hx = 0.5 * (double)nx, hy = 0.5 * (double)ny;
    for (size_t i = 0; i < stars->n; i++) {
        const hilal_star *s = &stars->stars[i];
        if (!s->usable || !(s->fwhm_px > 0) || !isfinite(s->fwhm_px) || !(s->flux_err_adu > 0) ||
            s->flux_adu / s->flux_err_adu < min_snr)
            continue;
        u[n] = (s->x - 0.5 - hx) / hx;
        v[n] = (s->y - 0.5 - hy) / hy;
        f[n] = s->fwhm_px;
        keep[n] = 1;
        n++;
    }
    if (n < 30)
        goto cleanup;
    double c[6] = {0};
    for (int pass = 0; pass < 5; pass++) {
        double a[36] = {0}, b[6] = {0}, t[6];
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            if (!keep[i])
                continue;
            quad_terms(u[i], v[i], t);
            for (int p = 0; p < 6; p++) {
                b[p] += t[p] * f[i];
                for (int q = 0; q < 6; q++)
                    a[p * 6 + q] += t[p] * t[q];
            }
            m++;
        }
        if (m < 30 || !solve(a, b, 6))
            goto cleanup;
        memcpy(c, b, sizeof c);
        /* robust scatter of all residuals, then the clip */
        for (size_t i = 0; i < n; i++) {
            quad_terms(u[i], v[i], t);
            double model = 0;
            for (int p = 0; p < 6; p++)
                model += c[p] * t[p];
            r[i] = fabs(f[i] - model);
        }
        double *tmp = malloc(sizeof *tmp * n);
        if (tmp == NULL)
            goto cleanup;
        memcpy(tmp, r, sizeof *tmp * n);
        double sig = 1.4826 * median_inplace(tmp, n);
        free(tmp);
        for (size_t i = 0; i < n; i++)
            keep[i] = r[i] <= 3.0 * sig + 1e-9;
    }
    double g[81];
    for (int j = 0; j < 9; j++)
        for (int i = 0; i < 9; i++) {
            double t[6];
            quad_terms(-1.0 + 0.25 * i, -1.0 + 0.25 * j, t);
            double model = 0;
            for (int p = 0; p < 6; p++)
                model += c[p] * t[p];
            g[j * 9 + i] = model;
        }
    double lo = g[0], hi = g[0];
    for (int i = 1; i < 81; i++) {
        lo = g[i] < lo ? g[i] : lo;
        hi = g[i] > hi ? g[i] : hi;
    }
    double med = median_inplace(g, 81);
    if (med > 0)
        result = (hi - lo) / med;
    *nused = (int)n;
cleanup:
    free(u);
    free(v);
    free(f);
    free(r);
    free(keep);
    return result;
}

/* ------------------------------------------------------------------------
 * Tile geometry and weights
 * ------------------------------------------------------------------------ */

typedef struct axis_tiles {
    long n;         /* frame size along the axis */
    long nt;        /* tiles */
    long hb;        /* half-width of the blending band */
    long *b;        /* core boundaries b[0] = 0 < ... < b[nt] = n */
} axis_tiles;

static void axis_setup(axis_tiles *a, long n, long nt, long overlap)
{
    a->n = n;
    a->nt = nt;
    for (long i = 0; i <= nt; i++)
        a->b[i] = (long)llround((double)n * (double)i / (double)nt);
    /* the bands of a core's two sides must not meet */
    long core_min = n;
    for (long i = 0; i < nt; i++)
        if (a->b[i + 1] - a->b[i] < core_min)
            core_min = a->b[i + 1] - a->b[i];
    a->hb = nt > 1 ? overlap / 2 : 0;
    if (a->hb > core_min / 2)
        a->hb = core_min / 2;
}

/* Window of tile i: [lo, hi). */
static void axis_window(const axis_tiles *a, long i, long *lo, long *hi)
{
    *lo = a->b[i] - a->hb > 0 ? a->b[i] - a->hb : 0;
    *hi = a->b[i + 1] + a->hb < a->n ? a->b[i + 1] + a->hb : a->n;
}

/* Weight of tile i at pixel x: sin^2 rising across the band [b_i - hb,
 * b_i + hb), cos^2 falling across [b_{i+1} - hb, b_{i+1} + hb), 1 in
 * between, 0 outside; the weights of all tiles sum to 1 at every pixel. */
static double axis_weight(const axis_tiles *a, long i, long x)
{
    const double halfpi = 1.5707963267948966;
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

/* Builds the PSF of img from its stars whose centres lie in [x0, x1) x
 * [y0, y1) (0-based). *ok = 0 (and out empty) when there are too few of
 * them (fewer than min_stars usable stars with the PSF's S/N); other errors
 * are returned. */
static hilal_status tile_psf(const hilal_image *img, const hilal_starlist *stars,
                             const hilal_psf_build_params *pp, int min_stars, long x0, long y0,
                             long x1, long y1, hilal_psf *out, int *ok, hilal_error *err)
{
    *ok = 0;
    hilal_starlist sub = {0, NULL};
    sub.stars = malloc(sizeof *sub.stars * (stars->n + 1));
    if (sub.stars == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the tile star lists");
    for (size_t i = 0; i < stars->n; i++) {
        double x = stars->stars[i].x - 1.0, y = stars->stars[i].y - 1.0;
        if (x >= (double)x0 && x < (double)x1 && y >= (double)y0 && y < (double)y1)
            sub.stars[sub.n++] = stars->stars[i];
    }
    hilal_psf_build_params p = *pp;
    if (p.min_stars < min_stars)
        p.min_stars = min_stars;
    if (p.max_stars < p.min_stars)
        p.max_stars = p.min_stars;
    p.fallback = HILAL_PSF_FALLBACK_NONE;
    hilal_error local = {0};
    hilal_status st = HILAL_OK;
    if (sub.n > 0) {
        st = hilal_psf_build(img, &sub, &p, out, NULL, &local);
        if (st == HILAL_OK)
            *ok = 1;
        else if (st == HILAL_ERR_DATA)
            st = HILAL_OK; /* too few stars: the caller keeps the whole-frame PSF */
        else
            hilal_error_set(err, st, "%s", local.msg);
    }
    free(sub.stars);
    return st;
}

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
    double ratio = median_inplace(tmp, n);
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
        double sig = 1.4826 * median_inplace(t2, n);
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
    double t0 = now_s();
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
        ntx = (long)llround((double)nx / (double)tp->tile_px);
        nty = (long)llround((double)ny / (double)tp->tile_px);
        ntx = ntx < 1 ? 1 : ntx;
        nty = nty < 1 ? 1 : nty;
    }
    int tiled = ntx * nty > 1 && sci_stars != NULL && ref_stars != NULL;
    if (tiled) {
        int nus = 0, nur = 0;
        tinfo.fwhm_vary_sci = fwhm_variation(sci_stars, nx, ny, pp->min_snr, &nus);
        tinfo.fwhm_vary_ref = fwhm_variation(ref_stars, nx, ny, pp->min_snr, &nur);
        if (tp->min_vary > 0) {
            int vary = (isfinite(tinfo.fwhm_vary_sci) && tinfo.fwhm_vary_sci > tp->min_vary) ||
                       (isfinite(tinfo.fwhm_vary_ref) && tinfo.fwhm_vary_ref > tp->min_vary);
            if (!vary)
                tiled = 0;
        }
        hilal_log(HILAL_LOG_DEBUG,
                  "subtract: FWHM varies by %.3f (science, %d stars) and %.3f (reference, %d "
                  "stars) across the field: %s",
                  tinfo.fwhm_vary_sci, nus, tinfo.fwhm_vary_ref, nur,
                  tiled ? "tiles" : "one piece");
    }
    if (!tiled) {
        st = run_whole(in, tp, sci_stars, ref_stars, out, &tinfo, err);
        goto cleanup;
    }
    tinfo.tiled = 1;

    ax.b = malloc(sizeof *ax.b * (size_t)(ntx + 1));
    ay.b = malloc(sizeof *ay.b * (size_t)(nty + 1));
    nt = ntx * nty;
    psfs = calloc((size_t)(2 * nt), sizeof *psfs);
    psf_ok = calloc((size_t)(2 * nt), sizeof *psf_ok);
    wx0 = malloc(sizeof *wx0 * (size_t)nt);
    wy0 = malloc(sizeof *wy0 * (size_t)nt);
    wnx = malloc(sizeof *wnx * (size_t)nt);
    wny = malloc(sizeof *wny * (size_t)nt);
    terr = calloc((size_t)nt, sizeof *terr);
    rho_s = calloc((size_t)(nt * nt), sizeof *rho_s);
    rho_d = calloc((size_t)(nt * nt), sizeof *rho_d);
    if (ax.b == NULL || ay.b == NULL || psfs == NULL || psf_ok == NULL || wx0 == NULL ||
        wy0 == NULL || wnx == NULL || wny == NULL || terr == NULL || rho_s == NULL ||
        rho_d == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %ld tiles", nt);
        goto cleanup;
    }
    axis_setup(&ax, nx, ntx, tp->overlap_px);
    axis_setup(&ay, ny, nty, tp->overlap_px);
    out->ntiles_x = ntx;
    out->ntiles_y = nty;
    out->tiles = calloc((size_t)nt, sizeof *out->tiles);
    if (out->tiles == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %ld tile records", nt);
        goto cleanup;
    }

    /* ---- 2. Tile PSFs ---- */
    const hilal_psf *psf_whole[2] = {in->sci_psf, in->ref_psf};
    const hilal_image *img[2] = {in->sci, in->ref};
    const hilal_starlist *stars[2] = {sci_stars, ref_stars};
    for (long j = 0; j < nty; j++)
        for (long i = 0; i < ntx; i++) {
            long t = j * ntx + i, x1, y1;
            axis_window(&ax, i, &wx0[t], &x1);
            axis_window(&ay, j, &wy0[t], &y1);
            wnx[t] = x1 - wx0[t];
            wny[t] = y1 - wy0[t];
            hilal_diff_tile *rec = &out->tiles[t];
            rec->x0 = ax.b[i];
            rec->nx = ax.b[i + 1] - ax.b[i];
            rec->y0 = ay.b[j];
            rec->ny = ay.b[j + 1] - ay.b[j];
            rec->wx0 = wx0[t];
            rec->wy0 = wy0[t];
            rec->wnx = wnx[t];
            rec->wny = wny[t];
            for (int w = 0; w < 2; w++) {
                st = tile_psf(img[w], stars[w], pp, tp->min_stars, wx0[t], wy0[t], x1, y1,
                              &psfs[2 * t + w], &psf_ok[2 * t + w], err);
                if (st != HILAL_OK) {
                    hilal_error_context(err, "%s PSF of tile (%ld, %ld)",
                                        w == 0 ? "science" : "reference", i, j);
                    goto cleanup;
                }
            }
            /* both from the tile, or both whole-frame: a tile PSF paired with
             * the whole-frame PSF of the other image would mix two scales */
            if (!psf_ok[2 * t] || !psf_ok[2 * t + 1]) {
                hilal_psf_clear(&psfs[2 * t]);
                hilal_psf_clear(&psfs[2 * t + 1]);
                psf_ok[2 * t] = psf_ok[2 * t + 1] = 0;
                rec->psf_whole_frame = 1;
                tinfo.ntiles_fallback++;
            }
        }
#define TPSF(t, w) (psf_ok[2 * (t) + (w)] ? &psfs[2 * (t) + (w)] : psf_whole[w])

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
        double r, re;
        int nk = robust_ratio(pr.fs, pr.es, pr.fr, pr.er, pr.n, 3.0, &r, &re);
        if (nk >= 5 && isfinite(r) && r > 0) {
            hilal_log(HILAL_LOG_DEBUG,
                      "subtract: flux ratio with the tile PSFs %.5f +- %.5f (%d stars; %.5f with "
                      "the whole-frame PSFs)",
                      r, re, nk, in->flux_ratio);
            fn = r;
            tinfo.flux_ratio_nstars = nk;
        }
        tinfo.flux_ratio = fn;
        /* per tile, for the record */
        double *a = malloc(sizeof *a * (pr.n + 1) * 4);
        if (a == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for tile flux ratios");
            goto cleanup;
        }
        for (long t = 0; t < nt; t++) {
            size_t m = 0;
            for (size_t k = 0; k < pr.n; k++)
                if (pr.tile[k] == t) {
                    a[m] = pr.fs[k];
                    a[(pr.n + 1) + m] = pr.es[k];
                    a[2 * (pr.n + 1) + m] = pr.fr[k];
                    a[3 * (pr.n + 1) + m] = pr.er[k];
                    m++;
                }
            double rt, rte;
            int nkt = robust_ratio(a, a + (pr.n + 1), a + 2 * (pr.n + 1), a + 3 * (pr.n + 1), m,
                                   3.0, &rt, &rte);
            out->tiles[t].flux_ratio_tile = nkt >= 3 ? rt : NAN;
            out->tiles[t].flux_ratio_nstars = nkt;
            out->tiles[t].flux_ratio = fn;
        }
        free(a);
    }

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
                                                sig_n, sig_r, fn, fn, &rs, &rd, err);
                    if (st != HILAL_OK)
                        goto cleanup;
                }
                rho_s[t * nt + u] = rho_s[u * nt + t] = rs;
                rho_d[t * nt + u] = rho_d[u * nt + t] = rd;
            }
        }

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
            ti.flux_ratio = fn;
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
            if (t == 0 || info.seconds > 0) {
                double secs = tinfo.zogy.seconds + info.seconds;
                if (t == 0)
                    tinfo.zogy = info;
                tinfo.zogy.seconds = secs;
            }
            tinfo.zogy.n_filled += t == 0 ? 0 : info.n_filled;
            tinfo.zogy.n_negvar += t == 0 ? 0 : info.n_negvar;
            /* keep the flux error plane for the blend */
            terr[t] = td.flux_err;
            td.flux_err = NULL;
            hilal_diff_clear(&td);
        }

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
    pairs_free(&pr);
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
