/* The align stage: registers the reference onto the science pixel grid.
 *
 * First guess from the two WCS (or FFT phase correlation without WCS),
 * correction from matched stars, Lanczos3 resampling through the corrected
 * transform. See include/hilal/align.h and docs/align.md. */
#include "hilal/align.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
#include "hilal/log.h"
#include "hilal/stage.h"
#include "hilal/stats.h"
#include "hilal/wcs.h"
#include "match.h"
#include "phasecorr.h"
#include "resample.h"

void hilal_align_opts_default(hilal_align_opts *o)
{
    memset(o, 0, sizeof *o);
    o->order = 2;
    o->order2_min_matches = 50;
    o->match_radius_px = 2.0;
    o->search_radius_px = 40.0;
    o->max_stars = 400;
    o->min_matches = 6;
    o->clip_sigma = 3.0;
    o->identity_tol_px = 0.05;
    o->grid_step_px = 64;
    o->grid_tol_px = 1e-3;
    o->mask_weight = 0.01;
    o->min_overlap_frac = 0.1;
    o->fallback_rms_px = 0.3;
    o->phasecorr_max_side_px = 256;
    o->phasecorr_min_snr = 8.0;
    o->threads = 0;
}

/* ------------------------------------------------------------------------
 * The transform: first guess and correction
 * ------------------------------------------------------------------------ */

typedef struct guess {
    struct wcsprm *sci_wcs, *ref_wcs; /* both set: the WCS composition */
    double dx, dy;                    /* otherwise a translation: ref = sci + (dx, dy) */
    const hilal_poly2d *corr;         /* correction A(s) = s + c(s) applied first, or NULL */
} guess;

/* Pixel positions of one WCS to those of another through the sky:
 * (x, y) in `from` -> (RA, Dec) -> (u, v) in `to`, for n points. */
static hilal_status wcs_to_wcs(struct wcsprm *from, struct wcsprm *to, int n,
                               const double *x, const double *y, double *u, double *v,
                               hilal_error *err)
{
    double *ra = malloc((size_t)(n > 0 ? n : 1) * sizeof *ra);
    double *dec = malloc((size_t)(n > 0 ? n : 1) * sizeof *dec);
    hilal_status st = HILAL_OK;
    if (ra == NULL || dec == NULL)
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %d coordinates", n);
    if (st == HILAL_OK)
        st = hilal_wcs_pix2sky(from, n, x, y, ra, dec, err);
    if (st == HILAL_OK)
        st = hilal_wcs_sky2pix(to, n, ra, dec, u, v, err);
    free(ra);
    free(dec);
    return st;
}

/* First guess, science pixel -> reference pixel: through the sky with the
 * two WCS, or the translation. NaN where undefined. */
static hilal_status guess_forward(const guess *g, int n, const double *x, const double *y,
                                  double *u, double *v, hilal_error *err)
{
    if (g->sci_wcs == NULL) {
        for (int k = 0; k < n; k++) {
            u[k] = x[k] + g->dx;
            v[k] = y[k] + g->dy;
        }
        return HILAL_OK;
    }
    return wcs_to_wcs(g->sci_wcs, g->ref_wcs, n, x, y, u, v, err);
}

/* Inverse of the first guess, reference pixel -> science pixel. */
static hilal_status guess_inverse(const guess *g, int n, const double *u, const double *v,
                                  double *x, double *y, hilal_error *err)
{
    if (g->sci_wcs == NULL) {
        for (int k = 0; k < n; k++) {
            x[k] = u[k] - g->dx;
            y[k] = v[k] - g->dy;
        }
        return HILAL_OK;
    }
    return wcs_to_wcs(g->ref_wcs, g->sci_wcs, n, u, v, x, y, err);
}

/* The full transform for the resampling grid: reference = guess(A(s)). */
static hilal_status full_map(void *user, int n, const double *x, const double *y, double *u,
                             double *v, hilal_error *err)
{
    const guess *g = user;
    if (g->corr == NULL)
        return guess_forward(g, n, x, y, u, v, err);
    double *ax = malloc((size_t)(n > 0 ? n : 1) * sizeof *ax);
    double *ay = malloc((size_t)(n > 0 ? n : 1) * sizeof *ay);
    hilal_status st = HILAL_OK;
    if (ax == NULL || ay == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %d coordinates", n);
        goto cleanup;
    }
    for (int k = 0; k < n; k++) {
        double dx, dy;
        hilal_poly2d_eval(g->corr, x[k], y[k], &dx, &dy);
        ax[k] = x[k] + dx;
        ay[k] = y[k] + dy;
    }
    st = guess_forward(g, n, ax, ay, u, v, err);
cleanup:
    free(ax);
    free(ay);
    return st;
}

/* ------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------ */

static int inside(double x, double y, long nx, long ny, double margin)
{
    return isfinite(x) && isfinite(y) && x >= 0.5 - margin && y >= 0.5 - margin &&
           x <= (double)nx + 0.5 + margin && y <= (double)ny + 0.5 + margin;
}

/* Indices of the stars to match, brightest first: those whose position in
 * the other frame (px, py) falls within it (with margin), usable ones only
 * when there are at least min_usable of them, at most max. */
static size_t select_stars(const hilal_starlist *l, const double *px, const double *py, long nx,
                           long ny, double margin, int max, size_t min_usable, size_t *idx)
{
    size_t nusable = 0, m = 0;
    for (size_t i = 0; i < l->n; i++)
        nusable += l->stars[i].usable && inside(px[i], py[i], nx, ny, margin);
    int only_usable = nusable >= min_usable;
    for (size_t i = 0; i < l->n && m < (size_t)max; i++) {
        if (!inside(px[i], py[i], nx, ny, margin))
            continue;
        if (only_usable && !l->stars[i].usable)
            continue;
        if (!isfinite(l->stars[i].x) || !isfinite(l->stars[i].y))
            continue;
        idx[m++] = i;
    }
    return m;
}

/* Fraction of an n x n sample of science pixels that the first guess puts
 * inside the reference. */
static hilal_status sample_overlap(const guess *g, const hilal_image *sci, const hilal_image *ref,
                                   double *frac, hilal_error *err)
{
    enum { NS = 33 };
    double x[NS * NS], y[NS * NS], u[NS * NS], v[NS * NS];
    for (int j = 0; j < NS; j++)
        for (int i = 0; i < NS; i++) {
            x[j * NS + i] = 0.5 + (double)sci->nx * (i + 0.5) / NS;
            y[j * NS + i] = 0.5 + (double)sci->ny * (j + 0.5) / NS;
        }
    hilal_status st = guess_forward(g, NS * NS, x, y, u, v, err);
    if (st != HILAL_OK)
        return st;
    int n = 0;
    for (int k = 0; k < NS * NS; k++)
        n += inside(u[k], v[k], ref->nx, ref->ny, 0.0);
    *frac = (double)n / (NS * NS);
    return HILAL_OK;
}

static const char *file_of(const hilal_image *img)
{
    return img->meta.path[0] ? img->meta.path : "(in memory)";
}

/* Sky position of an image centre, for messages ("RA ..., Dec ..."). */
static void describe_centre(const hilal_image *img, char *buf, size_t len)
{
    double x = 0.5 * (double)(img->nx + 1), y = 0.5 * (double)(img->ny + 1), ra, dec;
    if (img->meta.wcs != NULL &&
        hilal_wcs_pix2sky(img->meta.wcs, 1, &x, &y, &ra, &dec, NULL) == HILAL_OK && isfinite(ra))
        snprintf(buf, len, "centre RA %.5f, Dec %+.5f deg", ra, dec);
    else
        snprintf(buf, len, "no sky position");
}

/* Transforms one star's shape from reference to science pixels with the
 * local Jacobian m = d(science)/d(reference): the second-moment ellipse
 * C = R diag(a^2, b^2) R^T becomes m C m^T; FWHM scales with sqrt|det m|,
 * the peak (per pixel) with 1 / |det m|. The flux is unchanged. */
static void transform_shape(hilal_star *s, const double m[4])
{
    double c = cos(s->theta_rad), sn = sin(s->theta_rad);
    double a2 = s->a_px * s->a_px, b2 = s->b_px * s->b_px;
    double cxx = a2 * c * c + b2 * sn * sn, cyy = a2 * sn * sn + b2 * c * c;
    double cxy = (a2 - b2) * c * sn;
    /* t = m C, then C' = t m^T */
    double t00 = m[0] * cxx + m[1] * cxy, t01 = m[0] * cxy + m[1] * cyy;
    double t10 = m[2] * cxx + m[3] * cxy, t11 = m[2] * cxy + m[3] * cyy;
    double pxx = t00 * m[0] + t01 * m[1], pxy = t00 * m[2] + t01 * m[3];
    double pyy = t10 * m[2] + t11 * m[3];
    /* Eigenvalues of the symmetric 2 x 2 matrix. */
    double mean = 0.5 * (pxx + pyy), dif = 0.5 * (pxx - pyy);
    double rad = sqrt(dif * dif + pxy * pxy);
    double det = fabs(m[0] * m[3] - m[1] * m[2]);
    if (isfinite(s->a_px) && isfinite(s->b_px) && isfinite(s->theta_rad)) {
        s->a_px = sqrt(fmax(mean + rad, 0));
        s->b_px = sqrt(fmax(mean - rad, 0));
        s->theta_rad = 0.5 * atan2(2 * pxy, pxx - pyy);
    }
    s->fwhm_px *= sqrt(det);
    if (det > 0)
        s->peak_adu /= det;
}

/* Carries the reference stars onto the science grid: s = A^-1(guess^-1(r));
 * drops those off the grid; transforms their shape; marks them unusable
 * where the aligned reference has no data within 2 px. */
static hilal_status carry_ref_stars(const hilal_starlist *in, const guess *g,
                                    const hilal_poly2d *corr, const hilal_pixgrid *grid,
                                    const hilal_image *sci, const hilal_image *aligned,
                                    hilal_starlist *out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t n = in->n;
    double *u = malloc((n + 1) * sizeof *u), *v = malloc((n + 1) * sizeof *v);
    double *x = malloc((n + 1) * sizeof *x), *y = malloc((n + 1) * sizeof *y);
    out->n = 0;
    out->stars = malloc((n + 1) * sizeof *out->stars);
    if (!u || !v || !x || !y || !out->stars) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu reference stars", n);
        goto cleanup;
    }
    for (size_t i = 0; i < n; i++) {
        u[i] = in->stars[i].x;
        v[i] = in->stars[i].y;
    }
    st = guess_inverse(g, (int)n, u, v, x, y, err);
    if (st != HILAL_OK)
        goto cleanup;
    for (size_t i = 0; i < n; i++) {
        double sx = x[i], sy = y[i];
        if (corr != NULL && isfinite(sx) && isfinite(sy))
            hilal_poly2d_invert(corr, x[i], y[i], &sx, &sy);
        if (!inside(sx, sy, sci->nx, sci->ny, 0.0))
            continue;
        hilal_star s = in->stars[i];
        s.x = sx;
        s.y = sy;
        /* Local Jacobian of the forward map (science -> reference, from the
         * grid, 0-based) by central differences, inverted. */
        double um, vm, up, vp, uq, vq, ur, vr;
        hilal_pixgrid_eval(grid, sx - 1.5, sy - 1.0, &um, &vm, NULL);
        hilal_pixgrid_eval(grid, sx - 0.5, sy - 1.0, &up, &vp, NULL);
        hilal_pixgrid_eval(grid, sx - 1.0, sy - 1.5, &uq, &vq, NULL);
        hilal_pixgrid_eval(grid, sx - 1.0, sy - 0.5, &ur, &vr, NULL);
        double j00 = up - um, j01 = ur - uq, j10 = vp - vm, j11 = vr - vq;
        double det = j00 * j11 - j01 * j10;
        if (isfinite(det) && fabs(det) > 1e-12) {
            double m[4] = {j11 / det, -j01 / det, -j10 / det, j00 / det};
            transform_shape(&s, m);
        }
        if (aligned != NULL) {
            long cx = (long)floor(sx - 0.5), cy = (long)floor(sy - 0.5);
            for (long yy = cy - 2; yy <= cy + 2; yy++)
                for (long xx = cx - 2; xx <= cx + 2; xx++)
                    if (xx < 0 || yy < 0 || xx >= aligned->nx || yy >= aligned->ny ||
                        (aligned->mask[yy * aligned->nx + xx] & HILAL_MASK_NODATA))
                        s.usable = 0;
        }
        out->stars[out->n++] = s;
    }
cleanup:
    free(u);
    free(v);
    free(x);
    free(y);
    if (st != HILAL_OK)
        hilal_starlist_clear(out);
    return st;
}

static hilal_status copy_starlist(const hilal_starlist *in, hilal_starlist *out, hilal_error *err)
{
    out->n = 0;
    out->stars = malloc((in->n + 1) * sizeof *out->stars);
    if (out->stars == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu stars", in->n);
    if (in->n > 0)
        memcpy(out->stars, in->stars, in->n * sizeof *in->stars);
    out->n = in->n;
    return HILAL_OK;
}

/* ------------------------------------------------------------------------
 * Registration of a pair
 * ------------------------------------------------------------------------ */

hilal_status hilal_align_pair(const hilal_image *sci, const hilal_image *ref,
                              const hilal_starlist *sci_stars, const hilal_starlist *ref_stars,
                              const hilal_align_opts *opts, hilal_image **ref_out,
                              hilal_starlist *ref_stars_out, hilal_align_info *info_out,
                              hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_align_info info;
    memset(&info, 0, sizeof info);
    info.fit_order = -1;
    info.rms_x_px = info.rms_y_px = info.dx_px = info.dy_px = NAN;
    info.rotation_deg = info.scale = info.pc_dx_px = info.pc_dy_px = info.pc_snr = NAN;
    info.grid_err_px = info.coverage_frac = info.mean_w2 = NAN;
    *ref_out = NULL;
    ref_stars_out->n = 0;
    ref_stars_out->stars = NULL;
    hilal_image *res = NULL;
    hilal_pixgrid grid;
    memset(&grid, 0, sizeof grid);
    hilal_match_result mr;
    memset(&mr, 0, sizeof mr);
    hilal_poly2d corr;
    double xc = 0.5 * (double)(sci->nx + 1), yc = 0.5 * (double)(sci->ny + 1);
    double norm = 0.5 * (double)(sci->nx > sci->ny ? sci->nx : sci->ny);
    hilal_poly2d_zero(&corr, xc, yc, norm);
    size_t ns = sci_stars->n, nr = ref_stars->n;
    double *sx = malloc((ns + 1) * sizeof *sx), *sy = malloc((ns + 1) * sizeof *sy);
    double *su = malloc((ns + 1) * sizeof *su), *sv = malloc((ns + 1) * sizeof *sv);
    double *ru = malloc((nr + 1) * sizeof *ru), *rv = malloc((nr + 1) * sizeof *rv);
    double *rx = malloc((nr + 1) * sizeof *rx), *ry = malloc((nr + 1) * sizeof *ry);
    double *ax = malloc((ns + 1) * sizeof *ax), *ay = malloc((ns + 1) * sizeof *ay);
    double *bx = malloc((nr + 1) * sizeof *bx), *by = malloc((nr + 1) * sizeof *by);
    size_t *ia = malloc((ns + 1) * sizeof *ia), *ib = malloc((nr + 1) * sizeof *ib);
    if (!sx || !sy || !su || !sv || !ru || !rv || !rx || !ry || !ax || !ay || !bx || !by || !ia ||
        !ib) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the star catalogues");
        goto cleanup;
    }
    const char *sci_file = file_of(sci), *ref_file = file_of(ref);

    /* 1. First guess. Both WCS usable: their composition. Otherwise phase
     *    correlation gives a translation. */
    hilal_error wse, wre;
    hilal_error_clear(&wse);
    hilal_error_clear(&wre);
    int sci_ok = hilal_wcs_check(sci->meta.wcs, sci->nx, sci->ny, &wse) == HILAL_OK;
    int ref_ok = hilal_wcs_check(ref->meta.wcs, ref->nx, ref->ny, &wre) == HILAL_OK;
    guess g;
    memset(&g, 0, sizeof g);
    char why[1600];
    snprintf(why, sizeof why, "%s%.700s%s%s%.700s", sci_ok ? "" : "science WCS: ",
             sci_ok ? "" : wse.msg, (!sci_ok && !ref_ok) ? "; " : "",
             ref_ok ? "" : "reference WCS: ", ref_ok ? "" : wre.msg);
    if (sci_ok && ref_ok) {
        char diff[256];
        if (!hilal_wcs_same_system(sci->meta.wcs, ref->meta.wcs, diff, sizeof diff)) {
            /* Sky coordinates of one cannot feed the other. */
            ref_ok = 0;
            snprintf(why, sizeof why, "the two WCS use %s", diff);
        }
    }
    if (opts->prealigned) {
        /* The caller vouches that both images share one pixel grid: the
         * first guess is the identity; the stars refine it when enough match. */
        info.method = HILAL_ALIGN_METHOD_GIVEN;
        g.dx = g.dy = 0.0;
        hilal_log(HILAL_LOG_INFO,
                  "align: science %s and reference %s taken as already aligned "
                  "(align.prealigned)",
                  sci_file, ref_file);
    } else if (sci_ok && ref_ok) {
        info.method = HILAL_ALIGN_METHOD_WCS;
        g.sci_wcs = sci->meta.wcs;
        g.ref_wcs = ref->meta.wcs;
        double frac;
        st = sample_overlap(&g, sci, ref, &frac, err);
        if (st != HILAL_OK)
            goto cleanup;
        if (frac <= 0.0 || frac < opts->min_overlap_frac) {
            char cs[96], cr[96];
            describe_centre(sci, cs, sizeof cs);
            describe_centre(ref, cr, sizeof cr);
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "science %s and reference %s do not overlap enough: by their WCS "
                                 "the reference covers %.1f%% of the science frame (at least "
                                 "%.0f%% needed, align.min_overlap_frac); science %s, reference "
                                 "%s; use a reference image of the same field",
                                 sci_file, ref_file, 100.0 * frac, 100.0 * opts->min_overlap_frac,
                                 cs, cr);
            goto cleanup;
        }
    } else {
        info.method = HILAL_ALIGN_METHOD_PHASECORR;
        hilal_log(HILAL_LOG_WARN,
                  "align: no usable WCS (%s); registering reference %s onto science %s by phase "
                  "correlation and star matching",
                  why, ref_file, sci_file);
        hilal_phasecorr_result pc;
        hilal_error pe;
        hilal_error_clear(&pe);
        st = hilal_phasecorr_offset(sci, ref, opts->phasecorr_max_side_px,
                                    opts->phasecorr_min_snr, opts->threads, &pc, &pe);
        if (st != HILAL_OK) {
            st = hilal_error_set(err, st == HILAL_ERR_DATA ? HILAL_ERR_DATA : st,
                                 "science %s and reference %s cannot be registered: %s (%s); "
                                 "check that both images show the same field, or give them a "
                                 "celestial WCS so that the WCS can guide the alignment",
                                 sci_file, ref_file, pe.msg, why);
            goto cleanup;
        }
        info.pc_dx_px = pc.dx_px;
        info.pc_dy_px = pc.dy_px;
        info.pc_snr = pc.peak_snr;
        g.dx = pc.dx_px;
        g.dy = pc.dy_px;
        hilal_log(HILAL_LOG_INFO,
                  "align: phase correlation offset (%.2f, %.2f) px, peak %.1f sigma, %d px blocks",
                  pc.dx_px, pc.dy_px, pc.peak_snr, pc.binning);
    }

    /* 2. Star matching in science pixels: science stars as measured,
     *    reference stars carried by the inverse first guess. Each list keeps
     *    the stars that fall within the other frame (plus the search radius). */
    for (size_t i = 0; i < ns; i++) {
        sx[i] = sci_stars->stars[i].x;
        sy[i] = sci_stars->stars[i].y;
    }
    for (size_t i = 0; i < nr; i++) {
        ru[i] = ref_stars->stars[i].x;
        rv[i] = ref_stars->stars[i].y;
    }
    if ((st = guess_forward(&g, (int)ns, sx, sy, su, sv, err)) != HILAL_OK ||
        (st = guess_inverse(&g, (int)nr, ru, rv, rx, ry, err)) != HILAL_OK)
        goto cleanup;
    size_t min_usable = (size_t)(2 * opts->min_matches);
    size_t na = select_stars(sci_stars, su, sv, ref->nx, ref->ny, opts->search_radius_px,
                             opts->max_stars, min_usable, ia);
    size_t nb = select_stars(ref_stars, rx, ry, sci->nx, sci->ny, opts->search_radius_px,
                             opts->max_stars, min_usable, ib);
    for (size_t k = 0; k < na; k++) {
        ax[k] = sx[ia[k]];
        ay[k] = sy[ia[k]];
    }
    for (size_t k = 0; k < nb; k++) {
        bx[k] = rx[ib[k]];
        by[k] = ry[ib[k]];
    }
    hilal_match_opts mo = {opts->search_radius_px, opts->match_radius_px, opts->min_matches,
                           opts->order, opts->order2_min_matches, opts->clip_sigma};
    hilal_error me;
    hilal_error_clear(&me);
    int matched = hilal_match_fit(ax, ay, na, bx, by, nb, xc, yc, norm, &mo, &corr, &mr, &me) ==
                  HILAL_OK;
    if (!matched && me.code != HILAL_ERR_DATA) {
        st = hilal_error_set(err, me.code, "%s", me.msg);
        goto cleanup;
    }
    if (matched) {
        info.nmatch = mr.nmatch;
        info.fit_order = mr.order;
        info.rms_x_px = mr.rms_x_px;
        info.rms_y_px = mr.rms_y_px;
    } else if (info.method == HILAL_ALIGN_METHOD_WCS) {
        /* The WCS alone registers the pair; its accuracy is not measured. */
        hilal_log(HILAL_LOG_WARN,
                  "align: %s (science %s, reference %s); using the WCS alone with an assumed "
                  "registration RMS of %.2f px (align.fallback_rms_px)",
                  me.msg, sci_file, ref_file, opts->fallback_rms_px);
        info.rms_x_px = info.rms_y_px = opts->fallback_rms_px;
    } else if (info.method == HILAL_ALIGN_METHOD_GIVEN) {
        /* Configured as aligned: the identity stands; its accuracy is not measured. */
        hilal_log(HILAL_LOG_WARN,
                  "align: %s (science %s, reference %s); keeping the configured identity "
                  "(align.prealigned) with an assumed registration RMS of %.2f px "
                  "(align.fallback_rms_px)",
                  me.msg, sci_file, ref_file, opts->fallback_rms_px);
        info.rms_x_px = info.rms_y_px = opts->fallback_rms_px;
    } else {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "science %s and reference %s cannot be registered: phase correlation "
                             "gave an offset of (%.1f, %.1f) px but the stars do not confirm it: "
                             "%s; check that both images show the same field (without a WCS only "
                             "small rotations, about a degree, can be recovered), lower "
                             "align.min_matches for sparse fields, or give both a celestial WCS",
                             sci_file, ref_file, g.dx, g.dy, me.msg);
        goto cleanup;
    }

    /* 3. The full transform on a node grid, its bilinear error bounded. */
    g.corr = matched ? &corr : NULL;
    st = hilal_pixgrid_build(sci->nx, sci->ny, full_map, &g, opts->grid_step_px,
                             opts->grid_tol_px, &grid, err);
    if (st != HILAL_OK)
        goto cleanup;
    info.grid_step_px = grid.step;
    info.grid_err_px = grid.max_err_px;
    {
        /* Offset, rotation and scale at the centre from the grid. */
        double u0, v0, u1, v1, u2, v2;
        hilal_pixgrid_eval(&grid, xc - 1.0, yc - 1.0, &u0, &v0, NULL);
        hilal_pixgrid_eval(&grid, xc, yc - 1.0, &u1, &v1, NULL);
        hilal_pixgrid_eval(&grid, xc - 1.0, yc, &u2, &v2, NULL);
        info.dx_px = u0 + 1.0 - xc;
        info.dy_px = v0 + 1.0 - yc;
        double j00 = u1 - u0, j01 = u2 - u0, j10 = v1 - v0, j11 = v2 - v0;
        info.rotation_deg = atan2(j10 - j01, j00 + j11) * 180.0 / 3.14159265358979323846;
        info.scale = sqrt(fabs(j00 * j11 - j01 * j10));
    }

    /* 4. Already on one grid? Same size and no node moved by more than
     *    identity_tol_px: keep the reference as it is. */
    int identity = sci->nx == ref->nx && sci->ny == ref->ny;
    for (long j = 0; identity && j < grid.gy; j++)
        for (long i = 0; identity && i < grid.gx; i++) {
            size_t k = (size_t)(j * grid.gx + i);
            double x = (double)(i * grid.step), y = (double)(j * grid.step);
            if (x > (double)(sci->nx - 1) || y > (double)(sci->ny - 1))
                continue; /* nodes beyond the last pixel do not count */
            if (!(fabs(grid.u[k] - x) <= opts->identity_tol_px &&
                  fabs(grid.v[k] - y) <= opts->identity_tol_px))
                identity = 0;
        }
    /* ... and the four corner pixels, which need not be nodes. */
    for (int c = 0; identity && c < 4; c++) {
        double x = (c & 1) ? (double)(sci->nx - 1) : 0.0, y = (c & 2) ? (double)(sci->ny - 1) : 0.0;
        double u, v;
        hilal_pixgrid_eval(&grid, x, y, &u, &v, NULL);
        if (!(fabs(u - x) <= opts->identity_tol_px && fabs(v - y) <= opts->identity_tol_px))
            identity = 0;
    }
    if (identity) {
        info.identity = 1;
        info.coverage_frac = 1.0;
        info.mean_w2 = 1.0;
        /* Registration error of the untouched pair: RMS of the raw position
         * differences of the matched stars. */
        if (matched) {
            double s2x = 0, s2y = 0;
            for (int k = 0; k < mr.nmatch; k++) {
                const hilal_star *a = &sci_stars->stars[ia[mr.ia[k]]];
                const hilal_star *b = &ref_stars->stars[ib[mr.ib[k]]];
                s2x += (b->x - a->x) * (b->x - a->x);
                s2y += (b->y - a->y) * (b->y - a->y);
            }
            info.rms_x_px = sqrt(s2x / mr.nmatch);
            info.rms_y_px = sqrt(s2y / mr.nmatch);
        } /* without matches: fallback_rms_px (WCS alone or align.prealigned), set above */
        st = copy_starlist(ref_stars, ref_stars_out, err);
        if (st != HILAL_OK)
            goto cleanup;
        info.nref_stars = (int)ref_stars_out->n;
        goto cleanup;
    }

    /* 5. Resample, then carry the metadata over: the science WCS, and the
     *    per-pixel quantities scaled like the pixels. */
    hilal_resample_stats rs;
    st = hilal_resample_lanczos3(ref, &grid, opts->mask_weight, opts->threads, &res, &rs, err);
    if (st != HILAL_OK)
        goto cleanup;
    info.coverage_frac = (double)rs.ncovered / ((double)sci->nx * (double)sci->ny);
    info.mean_w2 = rs.mean_w2;
    if (rs.ncovered == 0 || info.coverage_frac < opts->min_overlap_frac) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "science %s and reference %s do not overlap enough: after "
                             "registration the reference covers %.1f%% of the science frame (at "
                             "least %.0f%% needed, align.min_overlap_frac); use a reference image "
                             "of the same field",
                             sci_file, ref_file, 100.0 * info.coverage_frac,
                             100.0 * opts->min_overlap_frac);
        goto cleanup;
    }
    hilal_wcs_free(res->meta.wcs);
    res->meta.wcs = NULL;
    if ((st = hilal_wcs_copy(sci->meta.wcs, &res->meta.wcs, err)) != HILAL_OK)
        goto cleanup;
    double jac = isfinite(rs.mean_jac) ? rs.mean_jac : 1.0;
    if (isfinite(res->meta.saturate_adu))
        res->meta.saturate_adu *= jac;
    /* Noise level for white-noise models (ZOGY's sigma_R): interpolation
     * preserves the low-frequency noise density, so the white-noise
     * equivalent per science pixel is sigma sqrt(J), the background level of
     * the var plane (J sigma^2). A single resampled pixel varies less (by
     * mean_w2), its neighbours being correlated. */
    if (isfinite(res->sky_rms_adu))
        res->sky_rms_adu *= sqrt(jac);

    /* 6. Reference stars in science pixels. */
    st = carry_ref_stars(ref_stars, &g, matched ? &corr : NULL, &grid, sci, res, ref_stars_out,
                         err);
    if (st != HILAL_OK)
        goto cleanup;
    info.nref_stars = (int)ref_stars_out->n;

cleanup:
    if (st == HILAL_OK) {
        hilal_log(HILAL_LOG_INFO,
                  "align: %s%s, %d matches (order %d), offset (%.3f, %.3f) px, rotation %.4f deg, "
                  "scale %.5f, rms (%.3f, %.3f) px, grid %ld px (max err %.1e px), coverage "
                  "%.1f%%",
                  info.method == HILAL_ALIGN_METHOD_WCS        ? "WCS"
                  : info.method == HILAL_ALIGN_METHOD_GIVEN    ? "configured identity"
                                                               : "phase correlation",
                  info.identity ? " (already aligned: not resampled)" : "", info.nmatch,
                  info.fit_order, info.dx_px, info.dy_px, info.rotation_deg, info.scale,
                  info.rms_x_px, info.rms_y_px, info.grid_step_px, info.grid_err_px,
                  100.0 * info.coverage_frac);
        *ref_out = res;
    } else {
        hilal_image_free(res);
        hilal_starlist_clear(ref_stars_out);
    }
    if (info_out != NULL)
        *info_out = info;
    hilal_pixgrid_clear(&grid);
    hilal_match_result_clear(&mr);
    free(sx);
    free(sy);
    free(su);
    free(sv);
    free(ru);
    free(rv);
    free(rx);
    free(ry);
    free(ax);
    free(ay);
    free(bx);
    free(by);
    free(ia);
    free(ib);
    return st;
}

/* ------------------------------------------------------------------------
 * Registration RMS of already aligned catalogues
 * ------------------------------------------------------------------------ */

hilal_status hilal_align_region_rms(const hilal_starlist *a, const hilal_starlist *b, double x0,
                                    double y0, double x1, double y1, double radius_px,
                                    double *rms_x_px, double *rms_y_px, int *nmatch,
                                    hilal_error *err)
{
    *rms_x_px = *rms_y_px = NAN;
    *nmatch = 0;
    hilal_status st = HILAL_OK;
    double *ex = malloc((a->n + 1) * sizeof *ex), *ey = malloc((a->n + 1) * sizeof *ey);
    double *t = malloc((a->n + 1) * sizeof *t);
    if (ex == NULL || ey == NULL || t == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu stars", a->n);
        goto cleanup;
    }
    /* Mutual nearest neighbours within radius_px. */
    size_t n = 0;
    double r2 = radius_px * radius_px;
    for (size_t i = 0; i < a->n; i++) {
        const hilal_star *s = &a->stars[i];
        if (!s->usable || !(s->x >= x0 && s->x <= x1 && s->y >= y0 && s->y <= y1))
            continue;
        long jbest = -1;
        double dbest = r2;
        for (size_t j = 0; j < b->n; j++) {
            double dx = b->stars[j].x - s->x, dy = b->stars[j].y - s->y, d2 = dx * dx + dy * dy;
            if (d2 <= dbest) {
                dbest = d2;
                jbest = (long)j;
            }
        }
        if (jbest < 0)
            continue;
        int mutual = 1;
        for (size_t k = 0; k < a->n && mutual; k++) {
            double dx = b->stars[jbest].x - a->stars[k].x, dy = b->stars[jbest].y - a->stars[k].y;
            if (k != i && dx * dx + dy * dy < dbest)
                mutual = 0;
        }
        if (!mutual)
            continue;
        ex[n] = b->stars[jbest].x - s->x;
        ey[n] = b->stars[jbest].y - s->y;
        n++;
    }
    if (n < 3) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "only %zu star pairs within %.1f px in [%.0f, %.0f] x [%.0f, %.0f] "
                             "(at least 3 needed)",
                             n, radius_px, x0, x1, y0, y1);
        goto cleanup;
    }
    /* Clip at 3 robust sigma about the median, then the RMS about zero
     * (a residual offset is a registration error too). */
    memcpy(t, ex, n * sizeof *t);
    double mx = hilal_median_double(t, n);
    memcpy(t, ey, n * sizeof *t);
    double my = hilal_median_double(t, n);
    for (size_t k = 0; k < n; k++)
        t[k] = fabs(ex[k] - mx);
    double sgx = fmax(1.4826 * hilal_median_double(t, n), 1e-3);
    for (size_t k = 0; k < n; k++)
        t[k] = fabs(ey[k] - my);
    double sgy = fmax(1.4826 * hilal_median_double(t, n), 1e-3);
    double s2x = 0, s2y = 0;
    int kept = 0;
    for (size_t k = 0; k < n; k++)
        if (fabs(ex[k] - mx) <= 3 * sgx && fabs(ey[k] - my) <= 3 * sgy) {
            s2x += ex[k] * ex[k];
            s2y += ey[k] * ey[k];
            kept++;
        }
    if (kept < 3) {
        st = hilal_error_set(err, HILAL_ERR_DATA, "only %d star pairs survive clipping", kept);
        goto cleanup;
    }
    *rms_x_px = sqrt(s2x / kept);
    *rms_y_px = sqrt(s2y / kept);
    *nmatch = kept;
cleanup:
    free(ex);
    free(ey);
    free(t);
    return st;
}

/* ------------------------------------------------------------------------
 * The stage
 * ------------------------------------------------------------------------ */

static const hilal_param align_params[] = {
    {"order", HILAL_PARAM_INT, "2", 1, 2, "",
     "highest order of the star-fit correction (1 affine, 2 quadratic; lower ones win when "
     "the stars do not demand more)"},
    {"order2_min_matches", HILAL_PARAM_INT, "50", 6, 1000000, "",
     "star matches needed before quadratic terms are fitted"},
    {"match_radius_px", HILAL_PARAM_DOUBLE, "2.0", 0.1, 100, "px",
     "final radius within which a reference star matches a science star"},
    {"search_radius_px", HILAL_PARAM_DOUBLE, "40", 1, 10000, "px",
     "largest error of the first guess (WCS or phase correlation) searched by the offset vote"},
    {"max_stars", HILAL_PARAM_INT, "400", 10, 100000, "",
     "brightest stars of each catalogue used for matching"},
    {"min_matches", HILAL_PARAM_INT, "6", 3, 100000, "",
     "fewest star matches that register a pair"},
    {"clip_sigma", HILAL_PARAM_DOUBLE, "3.0", 1.5, 20, "sigma",
     "sigma clipping of the transform fit (robust sigma from the MAD)"},
    {"identity_tol_px", HILAL_PARAM_DOUBLE, "0.05", 0, 2, "px",
     "same-size pairs whose transform moves no pixel more than this are not resampled"},
    {"grid_step_px", HILAL_PARAM_INT, "64", 1, 4096, "px",
     "initial node spacing of the exact transform (halved until grid_tol_px is met)"},
    {"grid_tol_px", HILAL_PARAM_DOUBLE, "0.001", 1e-6, 0.1, "px",
     "largest bilinear interpolation error allowed between transform nodes"},
    {"mask_weight", HILAL_PARAM_DOUBLE, "0.01", 0, 1, "",
     "reference mask bits propagate through kernel weights at least this large"},
    {"min_overlap_frac", HILAL_PARAM_DOUBLE, "0.1", 0, 1, "",
     "least fraction of the science frame the reference must cover"},
    {"fallback_rms_px", HILAL_PARAM_DOUBLE, "0.3", 0, 100, "px",
     "registration RMS assumed when too few stars match and the WCS is used alone"},
    {"phasecorr_max_side_px", HILAL_PARAM_INT, "256", 32, 16384, "px",
     "frames without WCS are block-averaged to at most this size for phase correlation"},
    {"phasecorr_min_snr", HILAL_PARAM_DOUBLE, "8", 3, 1e6, "sigma",
     "least significance of the phase-correlation peak"},
    {"prealigned", HILAL_PARAM_BOOL, "false", 0, 0, "",
     "the pair is already on one pixel grid (survey alert stamps): identity first guess instead "
     "of WCS or phase correlation; too few star matches keep it with fallback_rms_px"},
};

typedef struct align_state {
    hilal_align_opts opts;
} align_state;

static hilal_status align_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    align_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the align stage");
    hilal_align_opts *o = &s->opts;
    hilal_align_opts_default(o);
    o->order = (int)hilal_config_get_int(cfg, "align.order");
    o->order2_min_matches = (int)hilal_config_get_int(cfg, "align.order2_min_matches");
    o->match_radius_px = hilal_config_get_double(cfg, "align.match_radius_px");
    o->search_radius_px = hilal_config_get_double(cfg, "align.search_radius_px");
    o->max_stars = (int)hilal_config_get_int(cfg, "align.max_stars");
    o->min_matches = (int)hilal_config_get_int(cfg, "align.min_matches");
    o->clip_sigma = hilal_config_get_double(cfg, "align.clip_sigma");
    o->identity_tol_px = hilal_config_get_double(cfg, "align.identity_tol_px");
    o->grid_step_px = hilal_config_get_int(cfg, "align.grid_step_px");
    o->grid_tol_px = hilal_config_get_double(cfg, "align.grid_tol_px");
    o->mask_weight = hilal_config_get_double(cfg, "align.mask_weight");
    o->min_overlap_frac = hilal_config_get_double(cfg, "align.min_overlap_frac");
    o->fallback_rms_px = hilal_config_get_double(cfg, "align.fallback_rms_px");
    o->phasecorr_max_side_px = hilal_config_get_int(cfg, "align.phasecorr_max_side_px");
    o->phasecorr_min_snr = hilal_config_get_double(cfg, "align.phasecorr_min_snr");
    o->threads = (int)hilal_config_get_int(cfg, "pipeline.threads");
    o->prealigned = hilal_config_get_bool(cfg, "align.prealigned");
    if (o->search_radius_px < o->match_radius_px) {
        hilal_status st = hilal_error_set(err, HILAL_ERR_CONFIG,
                                          "align.search_radius_px (%g) is smaller than "
                                          "align.match_radius_px (%g); raise search_radius_px",
                                          o->search_radius_px, o->match_radius_px);
        free(s);
        return st;
    }
    *state = s;
    return HILAL_OK;
}

static hilal_status align_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const align_state *s = state;
    hilal_image *aligned = NULL;
    hilal_starlist stars = {0, NULL};
    hilal_align_info info;
    hilal_status st = hilal_align_pair(frame->sci, frame->ref, &frame->sci_stars,
                                       &frame->ref_stars, &s->opts, &aligned, &stars, &info, err);
    if (st != HILAL_OK)
        return st;
    if (aligned != NULL) {
        hilal_image_free(frame->ref);
        frame->ref = aligned;
    }
    hilal_starlist_clear(&frame->ref_stars);
    frame->ref_stars = stars;
    frame->reg_rms_x_px = info.rms_x_px;
    frame->reg_rms_y_px = info.rms_y_px;
    return HILAL_OK;
}

static void align_fini(void *state) { free(state); }

const hilal_stage hilal_stage_align = {
    .name = "align",
    .summary = "register the reference onto the science grid (WCS or phase correlation, star "
               "matching, Lanczos3 resampling)",
    .params = align_params,
    .nparams = sizeof align_params / sizeof align_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND | HILAL_PROD_STARS,
    .makes = HILAL_PROD_ALIGNED,
    .flags = 0,
    .init = align_init,
    .run = align_run,
    .fini = align_fini,
};
