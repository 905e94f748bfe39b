/* Alignment: registration accuracy, flux conservation, variance and mask
 * propagation, the phase-correlation path, identity pairs and error paths,
 * on synthetic pairs with a known transform (test_align_synth.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/align.h"
#include "hilal/hilal.h"
#include "resample.h"
#include "test_align_synth.h"
#include "testutil.h"

extern const hilal_stage hilal_stage_align;

/* Registration residual and flux ratio of the bright isolated stars of a
 * pair in the aligned reference: windowed centroid at the true science
 * position vs that position, aperture flux vs the same aperture in the
 * original reference. */
typedef struct accuracy {
    int n;
    double rms_x, rms_y, rms;     /* px */
    double flux_ratio_mean;       /* aligned / original */
    double flux_ratio_maxdev;     /* max |ratio - 1| */
    double ref_centroid_rms;      /* the centroid method on the original reference */
} accuracy;

static accuracy measure(const as_pair *p, const hilal_image *al, double sigma_al, double fmin)
{
    accuracy a;
    memset(&a, 0, sizeof a);
    double s2x = 0, s2y = 0, sr = 0, s2r = 0, sum_ratio = 0;
    int nf = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (p->flux[i] < fmin || !as_isolated(p, i, 12.0, 0.01))
            continue;
        double sx = p->sx[i], sy = p->sy[i];
        if (sx < 20 || sy < 20 || sx > al->nx - 20 || sy > al->ny - 20)
            continue;
        if (p->rx[i] < 20 || p->ry[i] < 20 || p->rx[i] > p->ref->nx - 20 ||
            p->ry[i] > p->ref->ny - 20)
            continue;
        double x = sx, y = sy;
        if (as_centroid(al, &x, &y, sigma_al) != 0)
            continue;
        double rx = p->rx[i], ry = p->ry[i];
        if (as_centroid(p->ref, &rx, &ry, 1.4) != 0)
            continue;
        s2x += (x - sx) * (x - sx);
        s2y += (y - sy) * (y - sy);
        s2r += (rx - p->rx[i]) * (rx - p->rx[i]) + (ry - p->ry[i]) * (ry - p->ry[i]);
        a.n++;
        double fa = as_aperture(al, sx, sy, 9.0), fo = as_aperture(p->ref, p->rx[i], p->ry[i], 9.0);
        if (isfinite(fa) && isfinite(fo) && fo > 0) {
            double r = fa / fo;
            sum_ratio += r;
            if (fabs(r - 1) > a.flux_ratio_maxdev)
                a.flux_ratio_maxdev = fabs(r - 1);
            nf++;
        }
    }
    (void)sr;
    if (a.n > 0) {
        a.rms_x = sqrt(s2x / a.n);
        a.rms_y = sqrt(s2y / a.n);
        a.rms = sqrt((s2x + s2y) / a.n);
        a.ref_centroid_rms = sqrt(s2r / a.n);
    }
    a.flux_ratio_mean = nf ? sum_ratio / nf : NAN;
    return a;
}

/* RMS distance of the carried reference stars from the true science
 * positions (nearest truth within 1 px), for stars brighter than fmin. */
static double carried_star_rms(const as_pair *p, const hilal_starlist *rs, double fmin, int *n)
{
    double s2 = 0;
    *n = 0;
    for (size_t k = 0; k < rs->n; k++) {
        if (rs->stars[k].flux_adu < fmin)
            continue;
        double best = 1.0;
        for (size_t i = 0; i < p->n; i++) {
            double dx = rs->stars[k].x - p->sx[i], dy = rs->stars[k].y - p->sy[i];
            double d = sqrt(dx * dx + dy * dy);
            if (d < best)
                best = d;
        }
        s2 += best * best;
        (*n)++;
    }
    return *n ? sqrt(s2 / *n) : NAN;
}

/* WCS with a small pointing error, 20.3/-7.6 px offset, 0.3 deg rotation. */
/* Default alignment options on 2 threads, as most tests run them. */
static hilal_align_opts two_threads(void)
{
    hilal_align_opts ao;
    hilal_align_opts_default(&ao);
    ao.threads = 2;
    return ao;
}

/* Aligns the pair's reference onto its science frame with ao (the error
 * cleared first) and checks that it worked. */
static hilal_status align(const as_pair *p, const hilal_align_opts *ao, hilal_image **al,
                          hilal_starlist *rs, hilal_align_info *info, hilal_error *err)
{
    hilal_error_clear(err);
    hilal_status st = hilal_align_pair(p->sci, p->ref, &p->sci_stars, &p->ref_stars, ao, al, rs,
                                       info, err);
    CHECK_OK(st, err);
    return st;
}

static void test_wcs_offset_rotation(void)
{
    as_pair_opts o = as_pair_opts_default();
    o.wcs_err_x_px = 0.6; /* the science astrometric solution is off by 0.75 px */
    o.wcs_err_y_px = -0.45;
    as_pair p;
    CHECK(as_pair_make(&o, &p) == 0, "pair");
    hilal_align_opts ao = two_threads();
    hilal_image *al = NULL;
    hilal_starlist rs = {0, NULL};
    hilal_align_info info;
    hilal_error err;
    hilal_status st = align(&p, &ao, &al, &rs, &info, &err);
    if (st != HILAL_OK) {
        as_pair_free(&p);
        return;
    }
    CHECK(info.method == HILAL_ALIGN_METHOD_WCS, "method %d", (int)info.method);
    CHECK(!info.identity && al != NULL, "resampled");
    CHECK(info.nmatch >= 150, "matches %d", info.nmatch);
    /* Offset and rotation at the centre against the truth. */
    CHECK(fabs(info.dx_px - 20.3) < 0.02 && fabs(info.dy_px + 7.6) < 0.02,
          "offset (%.4f, %.4f)", info.dx_px, info.dy_px);
    CHECK(fabs(info.rotation_deg - 0.3) < 0.003, "rotation %.5f deg", info.rotation_deg);
    CHECK(fabs(info.scale - 1.0) < 1e-4, "scale %.6f", info.scale);
    CHECK(info.grid_err_px <= 1e-3, "grid error %.2e px", info.grid_err_px);
    /* The registration RMS of bright-star matches is the centroid noise. */
    CHECK(info.rms_x_px > 0 && info.rms_x_px < 0.05 && info.rms_y_px > 0 && info.rms_y_px < 0.05,
          "rms (%.4f, %.4f)", info.rms_x_px, info.rms_y_px);
    /* Alignment residual of bright stars in the resampled reference. */
    accuracy a = measure(&p, al, 1.4, 2e4);
    printf("WCS path: %d bright stars, residual rms (%.4f, %.4f) px, flux ratio %.5f "
           "(max dev %.4f), centroid method %.4f px, matches %d, reg rms (%.4f, %.4f)\n",
           a.n, a.rms_x, a.rms_y, a.flux_ratio_mean, a.flux_ratio_maxdev, a.ref_centroid_rms,
           info.nmatch, info.rms_x_px, info.rms_y_px);
    CHECK(a.n >= 30, "bright isolated stars %d", a.n);
    CHECK(a.ref_centroid_rms < 0.02, "centroid method rms %.4f", a.ref_centroid_rms);
    CHECK(a.rms < 0.05, "alignment residual rms %.4f px", a.rms);
    CHECK(fabs(a.flux_ratio_mean - 1) < 0.01 && a.flux_ratio_maxdev < 0.02,
          "flux ratio %.5f, max dev %.4f", a.flux_ratio_mean, a.flux_ratio_maxdev);
    /* The WCS alone would leave the 0.75 px pointing error: star matching
     * removed it (residual far below it). */
    CHECK(a.rms < 0.1 * hypot(0.6, 0.45), "correction applied");
    /* Reference stars carried onto the science grid. */
    int nc = 0;
    double crms = carried_star_rms(&p, &rs, 2e4, &nc);
    CHECK(nc >= 50 && crms < 0.05, "carried stars %d, rms %.4f", nc, crms);
    CHECK(rs.n < p.ref_stars.n && rs.n > p.ref_stars.n * 8 / 10,
          "stars off the science grid dropped: %zu of %zu kept", rs.n, p.ref_stars.n);
    int inside = 1;
    for (size_t k = 0; k < rs.n; k++)
        inside &= rs.stars[k].x >= 0.5 && rs.stars[k].x <= 1024.5 && rs.stars[k].y >= 0.5 &&
                  rs.stars[k].y <= 1024.5;
    CHECK(inside, "carried stars inside the grid");
    /* The aligned image carries the science WCS. */
    double x = 100, y = 200, ra1, de1, ra2, de2;
    hilal_wcs_pix2sky(p.sci->meta.wcs, 1, &x, &y, &ra1, &de1, NULL);
    hilal_wcs_pix2sky(al->meta.wcs, 1, &x, &y, &ra2, &de2, NULL);
    CHECK(al->meta.wcs != NULL && ra1 == ra2 && de1 == de2, "science WCS on the aligned image");

    /* Masks: columns beyond the reference are NODATA|EDGE with NaN and
     * var 1e30; a NaN reference pixel becomes NODATA|INTERP around its
     * position, finite values 2 px away, untouched 4 px away. */
    size_t k = (size_t)(511 * al->nx + 1023); /* FITS (1024, 512): ref x ~ 1044 */
    CHECK((al->mask[k] & (HILAL_MASK_NODATA | HILAL_MASK_EDGE)) ==
              (HILAL_MASK_NODATA | HILAL_MASK_EDGE) && isnan(al->pix[k]) && al->var[k] >= 1e29f,
          "uncovered pixel mask %u pix %g var %g", al->mask[k], al->pix[k], al->var[k]);
    size_t nbad = hilal_image_count_mask(al, HILAL_MASK_NODATA);
    CHECK(nbad > 20 * 1024 && nbad < 32 * 1024, "uncovered pixels %zu", nbad);
    CHECK(fabs(info.coverage_frac - (1.0 - (double)nbad / (1024.0 * 1024.0))) < 1e-9 ||
              info.coverage_frac > 0.9,
          "coverage %.4f", info.coverage_frac);
    hilal_image_free(al);
    al = NULL;
    hilal_starlist_clear(&rs);

    hilal_image *ref2 = hilal_image_clone(p.ref, NULL);
    long bx = 400, by = 300; /* 0-based reference pixel made NaN */
    ref2->pix[by * ref2->nx + bx] = NAN;
    ref2->mask[by * ref2->nx + bx] = HILAL_MASK_NODATA;
    ref2->var[by * ref2->nx + bx] = 1e30f;
    for (long j = 700; j < 703; j++)
        for (long i = 600; i < 603; i++)
            ref2->mask[j * ref2->nx + i] |= HILAL_MASK_SAT;
    hilal_error_clear(&err);
    st = hilal_align_pair(p.sci, ref2, &p.sci_stars, &p.ref_stars, &ao, &al, &rs, &info, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double sx, sy;
        as_inv(&p.t, (double)bx + 1.0, (double)by + 1.0, &sx, &sy);
        /* nearest science pixel (0-based) */
        long ix = (long)floor(sx - 0.5 + 0.5), iy = (long)floor(sy - 0.5 + 0.5);
        hilal_mask_t m0 = al->mask[iy * al->nx + ix];
        CHECK((m0 & HILAL_MASK_NODATA) && (m0 & HILAL_MASK_INTERP), "at the NaN pixel: mask %u",
              m0);
        size_t k2 = (size_t)(iy * al->nx + ix + 2);
        hilal_mask_t m2 = al->mask[k2];
        CHECK(isfinite(al->pix[k2]) && al->var[k2] < 1e29f, "2 px away: value %g var %g mask %u",
              al->pix[k2], al->var[k2], m2);
        hilal_mask_t m4 = al->mask[iy * al->nx + ix + 4];
        CHECK(m4 == 0, "4 px away: mask %u", m4);
        as_inv(&p.t, 602.0, 702.0, &sx, &sy); /* centre of the saturated block */
        ix = (long)floor(sx - 0.5 + 0.5);
        iy = (long)floor(sy - 0.5 + 0.5);
        CHECK(al->mask[iy * al->nx + ix] & HILAL_MASK_SAT, "saturated block propagated");
        CHECK(!(al->mask[(iy + 6) * al->nx + ix] & HILAL_MASK_SAT), "but not 6 px away");
    }
    hilal_image_free(al);
    hilal_starlist_clear(&rs);
    hilal_image_free(ref2);
    as_pair_free(&p);
}

/* Different pixel scales: flux conserved through the Jacobian. */
static void test_scale_flux(void)
{
    as_pair_opts o = as_pair_opts_default();
    o.t.k = 1.15; /* science pixels 15% larger */
    o.sigma_sci_px = 1.7 / 1.15;
    o.seed = 777;
    as_pair p;
    CHECK(as_pair_make(&o, &p) == 0, "pair");
    hilal_align_opts ao = two_threads();
    hilal_image *al = NULL;
    hilal_starlist rs = {0, NULL};
    hilal_align_info info;
    hilal_error err;
    hilal_status st = align(&p, &ao, &al, &rs, &info, &err);
    if (st == HILAL_OK) {
        CHECK(fabs(info.scale - 1.15) < 1e-4, "scale %.6f", info.scale);
        accuracy a = measure(&p, al, 1.4 / 1.15, 2e4);
        printf("scale 1.15: %d stars, residual rms %.4f px, flux ratio %.5f (max dev %.4f)\n",
               a.n, a.rms, a.flux_ratio_mean, a.flux_ratio_maxdev);
        CHECK(a.n >= 20, "stars %d", a.n);
        CHECK(a.rms < 0.05, "residual rms %.4f", a.rms);
        CHECK(fabs(a.flux_ratio_mean - 1) < 0.01, "flux ratio %.5f", a.flux_ratio_mean);
        /* Per-pixel quantities scale with the pixel area (1.3225). */
        CHECK(fabs(al->sky[600 * al->nx + 500] / 100.0 - 1.15 * 1.15) < 1e-3, "sky %g",
              al->sky[600 * al->nx + 500]);
        CHECK(fabs(al->sky_rms_adu - 5.0 * 1.15) < 1e-3, "white-noise sigma %g", al->sky_rms_adu);
        /* Carried stars: FWHM in science pixels. */
        CHECK(rs.n > 0 && fabs(rs.stars[0].fwhm_px - 2.3548 * 1.4 / 1.15) < 1e-3, "fwhm %g",
              rs.n ? rs.stars[0].fwhm_px : 0.0);
    }
    hilal_image_free(al);
    hilal_starlist_clear(&rs);
    as_pair_free(&p);
}

/* Neither frame has a WCS: phase correlation, then star matching. A
 * quadratic distortion exercises the second-order fit. */
static void test_no_wcs(void)
{
    as_pair_opts o = as_pair_opts_default();
    o.with_wcs = 0;
    o.t.q = 1.5; /* 1.5 px at the left and right edges */
    o.seed = 4242;
    as_pair p;
    CHECK(as_pair_make(&o, &p) == 0, "pair");
    hilal_align_opts ao = two_threads();
    hilal_image *al = NULL;
    hilal_starlist rs = {0, NULL};
    hilal_align_info info;
    hilal_error err;
    hilal_status st = align(&p, &ao, &al, &rs, &info, &err);
    if (st == HILAL_OK) {
        CHECK(info.method == HILAL_ALIGN_METHOD_PHASECORR, "method");
        CHECK(fabs(info.pc_dx_px - 20.3) < 1.0 && fabs(info.pc_dy_px + 7.6) < 1.0,
              "phase correlation (%.2f, %.2f)", info.pc_dx_px, info.pc_dy_px);
        /* Truth at the centre: d plus the quadratic term (0 at the centre). */
        CHECK(fabs(info.dx_px - 20.3) < 0.02 && fabs(info.dy_px + 7.6) < 0.02,
              "offset (%.4f, %.4f)", info.dx_px, info.dy_px);
        CHECK(fabs(info.rotation_deg - 0.3) < 0.005, "rotation %.4f", info.rotation_deg);
        CHECK(info.fit_order == 2, "order %d", info.fit_order);
        accuracy a = measure(&p, al, 1.4, 2e4);
        printf("no WCS: pc (%.3f, %.3f) snr %.1f, final (%.4f, %.4f), rotation %.4f, %d stars, "
               "residual rms %.4f px, flux ratio %.5f\n",
               info.pc_dx_px, info.pc_dy_px, info.pc_snr, info.dx_px, info.dy_px,
               info.rotation_deg, a.n, a.rms, a.flux_ratio_mean);
        CHECK(a.n >= 30 && a.rms < 0.05, "%d stars, residual rms %.4f", a.n, a.rms);
        CHECK(al->meta.wcs == NULL, "no WCS on the aligned image");
    }
    hilal_image_free(al);
    hilal_starlist_clear(&rs);

    /* Affine only: the quadratic distortion stays in the residuals. */
    ao.order = 1;
    st = align(&p, &ao, &al, &rs, &info, &err);
    if (st == HILAL_OK)
        CHECK(info.fit_order == 1 && info.rms_x_px > 0.1, "affine rms x %.3f", info.rms_x_px);
    hilal_image_free(al);
    hilal_starlist_clear(&rs);
    as_pair_free(&p);
}

/* Log capture: the last warning. */
static char last_warning[4096];
static void capture(hilal_log_level level, const char *msg, void *user)
{
    (void)user;
    if (level == HILAL_LOG_WARN)
        snprintf(last_warning, sizeof last_warning, "%s", msg);
}

/* A sub-image (0-based columns x0.., rows y0..) with its planes. */
static hilal_image *crop(const hilal_image *in, long x0, long y0, long w, long h)
{
    hilal_image *out = hilal_image_new(w, h, NULL);
    hilal_image_alloc_var(out, NULL);
    hilal_image_alloc_sky(out, NULL);
    for (long y = 0; y < h; y++)
        for (long x = 0; x < w; x++) {
            size_t a = (size_t)(y * w + x), b = (size_t)((y + y0) * in->nx + x + x0);
            out->pix[a] = in->pix[b];
            out->var[a] = in->var[b];
            out->sky[a] = in->sky[b];
            out->mask[a] = in->mask[b];
        }
    out->sky_rms_adu = in->sky_rms_adu;
    snprintf(out->meta.path, sizeof out->meta.path, "%s", in->meta.path);
    return out;
}

/* Science with a WCS, reference without (one usable WCS is not enough) and
 * of another size: phase correlation across sizes, with a warning. */
static void test_sizes_one_wcs(void)
{
    as_pair_opts o = as_pair_opts_default();
    o.seed = 2024;
    as_pair p;
    CHECK(as_pair_make(&o, &p) == 0, "pair");
    long x0 = 100, y0 = 50, w = 800, h = 950;
    hilal_image *ref = crop(p.ref, x0, y0, w, h);
    hilal_starlist rl = {0, calloc(p.ref_stars.n + 1, sizeof(hilal_star))};
    for (size_t k = 0; k < p.ref_stars.n; k++) {
        hilal_star st = p.ref_stars.stars[k];
        st.x -= (double)x0;
        st.y -= (double)y0;
        if (st.x >= 0.5 && st.y >= 0.5 && st.x <= w + 0.5 && st.y <= h + 0.5)
            rl.stars[rl.n++] = st;
    }
    hilal_align_opts ao;
    hilal_align_opts_default(&ao);
    ao.threads = 2;
    hilal_image *al = NULL;
    hilal_starlist rs = {0, NULL};
    hilal_align_info info;
    hilal_error err;
    hilal_error_clear(&err);
    last_warning[0] = '\0';
    hilal_log_set_handler(capture, NULL, HILAL_LOG_WARN);
    hilal_status st = hilal_align_pair(p.sci, ref, &p.sci_stars, &rl, &ao, &al, &rs, &info, &err);
    hilal_log_set_handler(NULL, NULL, HILAL_LOG_ERROR);
    CHECK_OK(st, &err);
    CHECK(strstr(last_warning, "no usable WCS") && strstr(last_warning, "reference WCS: no WCS") &&
              strstr(last_warning, "sim_ref.fits") && strstr(last_warning, "phase correlation"),
          "warning: %s", last_warning);
    if (st == HILAL_OK) {
        CHECK(info.method == HILAL_ALIGN_METHOD_PHASECORR, "method");
        CHECK(fabs(info.dx_px - (20.3 - x0)) < 0.02 && fabs(info.dy_px - (-7.6 - y0)) < 0.02,
              "offset (%.4f, %.4f)", info.dx_px, info.dy_px);
        /* Covered: the science pixels whose true reference position lies in
         * the crop, ~ 800 x 950 minus the kernel margins. */
        double expect = (double)(w - 5) * (double)(h - 5) / (1024.0 * 1024.0);
        CHECK(al && al->nx == 1024 && al->ny == 1024 && fabs(info.coverage_frac - expect) < 0.01,
              "coverage %.4f (expected ~%.4f)", info.coverage_frac, expect);
        int nc = 0;
        double crms = carried_star_rms(&p, &rs, 2e4, &nc);
        CHECK(nc >= 30 && crms < 0.05, "carried stars %d rms %.4f", nc, crms);
        printf("sizes: offset (%.4f, %.4f), coverage %.4f, %d matches, carried rms %.4f\n",
               info.dx_px, info.dy_px, info.coverage_frac, info.nmatch, crms);
    }
    hilal_image_free(al);
    hilal_starlist_clear(&rs);
    hilal_starlist_clear(&rl);
    hilal_image_free(ref);
    as_pair_free(&p);
}

/* Pairs that cannot be registered. */
static void test_errors(void)
{
    /* WCS 1 degree apart: no overlap. */
    as_pair_opts o = as_pair_opts_default();
    o.nx = o.ny = 256;
    o.nstars = 60;
    o.dec_offset_deg = 1.0;
    as_pair p;
    CHECK(as_pair_make(&o, &p) == 0, "pair");
    hilal_align_opts ao;
    hilal_align_opts_default(&ao);
    hilal_image *al = (hilal_image *)&ao; /* must be reset to NULL */
    hilal_starlist rs = {0, NULL};
    hilal_align_info info;
    hilal_error err;
    hilal_error_clear(&err);
    hilal_status st = hilal_align_pair(p.sci, p.ref, &p.sci_stars, &p.ref_stars, &ao, &al, &rs,
                                       &info, &err);
    printf("no overlap: %s\n", err.msg);
    CHECK(st == HILAL_ERR_DATA && err.code == HILAL_ERR_DATA, "status %d", (int)st);
    CHECK(strstr(err.msg, "sim_sci.fits") && strstr(err.msg, "sim_ref.fits") &&
              strstr(err.msg, "do not overlap") && strstr(err.msg, "0.0%"),
          "message: %s", err.msg);
    CHECK(al == NULL && rs.n == 0 && rs.stars == NULL, "nothing returned");
    as_pair_free(&p);

    /* No WCS and two different star fields. */
    as_pair_opts o1 = as_pair_opts_default(), o2 = as_pair_opts_default();
    o1.nx = o1.ny = o2.nx = o2.ny = 512;
    o1.with_wcs = o2.with_wcs = 0;
    o1.nstars = o2.nstars = 150;
    o1.seed = 1;
    o2.seed = 2;
    as_pair a, b;
    CHECK(as_pair_make(&o1, &a) == 0 && as_pair_make(&o2, &b) == 0, "pairs");
    hilal_error_clear(&err);
    st = hilal_align_pair(a.sci, b.ref, &a.sci_stars, &b.ref_stars, &ao, &al, &rs, &info, &err);
    printf("unrelated fields: %s\n", err.msg);
    CHECK(st == HILAL_ERR_DATA, "status %d", (int)st);
    CHECK(strstr(err.msg, "sim_sci.fits") && strstr(err.msg, "sim_ref.fits") &&
              strstr(err.msg, "cannot be registered") && strstr(err.msg, "same field"),
          "message: %s", err.msg);
    CHECK(al == NULL && rs.n == 0, "nothing returned");
    as_pair_free(&a);
    as_pair_free(&b);
}

/* Normalised Lanczos3 weights of the six taps at sub-pixel phase f. */
static void lanczos_weights(double f, double w[6])
{
    double s = 0;
    for (int t = 0; t < 6; t++) {
        w[t] = hilal_lanczos3(f + 2.0 - t);
        s += w[t];
    }
    for (int t = 0; t < 6; t++)
        w[t] /= s;
}

/* Pure noise of variance 100 resampled: the var plane is the white-noise
 * equivalent variance (the local variance of the input, 100 here), which is
 * what a block sum of the resampled noise sees; the variance of a single
 * resampled pixel is lower by sum w^2 (documented in docs/align.md). */
static void test_variance(void)
{
    for (int pass = 0; pass < 2; pass++) {
        as_pair_opts o = as_pair_opts_default();
        o.nstars = 0;
        o.sky_adu = 0;
        o.rdnoise_adu = 10.0;
        if (pass == 0) {
            o.t.theta_deg = 2.0; /* many sub-pixel phase cycles across the frame */
        } else {
            o.t.theta_deg = 0.0; /* a pure half-pixel translation: every phase 0.5 */
            o.t.dx = 20.5;
            o.t.dy = -7.5;
        }
        o.seed = 99 + (uint64_t)pass;
        as_pair p;
        CHECK(as_pair_make(&o, &p) == 0, "pair");
        hilal_align_opts ao = two_threads();
        hilal_image *al = NULL;
        hilal_starlist rs = {0, NULL};
        hilal_align_info info;
        hilal_error err;
        hilal_status st = align(&p, &ao, &al, &rs, &info, &err);
        if (st != HILAL_OK) {
            as_pair_free(&p);
            continue;
        }
        /* No stars: the WCS alone, with the fallback RMS. */
        CHECK(info.nmatch == 0 && info.rms_x_px == ao.fallback_rms_px, "fallback rms %g",
              info.rms_x_px);
        double s2 = 0, sv = 0, vmin = 1e30, vmax = 0;
        long n = 0;
        for (long k = 0; k < al->nx * al->ny; k++) {
            if (al->mask[k] != 0)
                continue;
            s2 += (double)al->pix[k] * al->pix[k];
            sv += al->var[k];
            vmin = fmin(vmin, al->var[k]);
            vmax = fmax(vmax, al->var[k]);
            n++;
        }
        double meanvar = sv / n, pixvar = s2 / n;
        CHECK(fabs(meanvar - 100.0) < 1e-3 && vmax - vmin < 1e-3,
              "var plane = input variance: mean %.5f, range [%.5f, %.5f]", meanvar, vmin, vmax);
        if (pass == 0) {
            /* Per-pixel variance: sigma^2 times the mean of sum w^2 over the
             * sub-pixel phases, (mean over f of sum_k w_k(f)^2)^2 for
             * uniformly distributed phases. */
            double e1 = 0;
            int nf = 2000;
            for (int i = 0; i < nf; i++) {
                double w[6], q = 0;
                lanczos_weights((i + 0.5) / nf, w);
                for (int t = 0; t < 6; t++)
                    q += w[t] * w[t];
                e1 += q / nf;
            }
            printf("variance (rotation): pixel variance %.3f, var plane %.3f, expected ratio "
                   "%.4f (%.4f^2), measured %.4f, mean_w2 %.4f\n",
                   pixvar, meanvar, e1 * e1, e1, pixvar / meanvar, info.mean_w2);
            CHECK(fabs(pixvar / meanvar / (e1 * e1) - 1) < 0.03, "pixel / plane %.4f vs %.4f",
                  pixvar / meanvar, e1 * e1);
            CHECK(fabs(pixvar / meanvar / info.mean_w2 - 1) < 0.02, "mean_w2 %.4f",
                  info.mean_w2);
        } else {
            /* Exact expectations for phase 0.5 on both axes: a pixel has
             * sigma^2 (sum w^2)^2; a B x B block sum has sigma^2 S^2 with
             * S = sum_m c_m^2, c = (B ones) convolved with w. */
            enum { B = 8 };
            double w[6], q = 0, c[B + 5];
            lanczos_weights(0.5, w);
            for (int t = 0; t < 6; t++)
                q += w[t] * w[t];
            memset(c, 0, sizeof c);
            for (int i = 0; i < B; i++)
                for (int t = 0; t < 6; t++)
                    c[i + t] += w[t];
            double S = 0;
            for (int m = 0; m < B + 5; m++)
                S += c[m] * c[m];
            double bs = 0;
            long nb = 0;
            for (long by = 1; by + 1 < al->ny / B; by++)
                for (long bx = 1; bx + 1 < al->nx / B; bx++) {
                    double sum = 0;
                    int ok = 1;
                    for (long y = by * B; y < (by + 1) * B && ok; y++)
                        for (long x = bx * B; x < (bx + 1) * B; x++) {
                            if (al->mask[y * al->nx + x]) {
                                ok = 0;
                                break;
                            }
                            sum += al->pix[y * al->nx + x];
                        }
                    if (ok) {
                        bs += sum * sum;
                        nb++;
                    }
                }
            double blockvar = bs / nb, expect_block = 100.0 * S * S;
            printf("variance (half pixel): pixel %.3f (expected %.3f), %ld blocks of %dx%d: "
                   "%.1f (expected %.1f = %.4f x %d x var plane)\n",
                   pixvar, 100.0 * q * q, nb, B, B, blockvar, expect_block,
                   expect_block / (B * B * meanvar), B * B);
            CHECK(fabs(pixvar / (100.0 * q * q) - 1) < 0.02, "pixel variance %.3f vs %.3f",
                  pixvar, 100.0 * q * q);
            CHECK(fabs(blockvar / expect_block - 1) < 0.05, "block variance %.1f vs %.1f",
                  blockvar, expect_block);
            /* The block sum sees the var plane, not the per-pixel variance:
             * within the boundary loss of the correlation (~4% at B = 8). */
            CHECK(fabs(blockvar / (B * B * meanvar) - 1) < 0.08 &&
                      blockvar / (B * B * pixvar) > 1.4,
                  "block variance / (B^2 var plane) = %.4f", blockvar / (B * B * meanvar));
        }
        hilal_image_free(al);
        hilal_starlist_clear(&rs);
        as_pair_free(&p);
    }
}

/* Pairs already on one grid are not resampled. */
static void test_identity(void)
{
    for (int with_wcs = 1; with_wcs >= 0; with_wcs--) {
        as_pair_opts o = as_pair_opts_default();
        o.nx = o.ny = 512;
        o.nstars = 200;
        o.t.dx = o.t.dy = o.t.theta_deg = 0;
        o.with_wcs = with_wcs;
        o.seed = 31 + (uint64_t)with_wcs;
        as_pair p;
        CHECK(as_pair_make(&o, &p) == 0, "pair");
        hilal_align_opts ao;
        hilal_align_opts_default(&ao);
        hilal_image *al = NULL;
        hilal_starlist rs = {0, NULL};
        hilal_align_info info;
        hilal_error err;
        align(&p, &ao, &al, &rs, &info, &err);
        printf("identity (wcs %d): identity %d, matches %d, rms (%.4f, %.4f)\n", with_wcs,
               info.identity, info.nmatch, info.rms_x_px, info.rms_y_px);
        CHECK(info.identity == 1 && al == NULL, "identity (wcs %d)", with_wcs);
        CHECK(info.nmatch > 50 && info.rms_x_px > 0 && info.rms_x_px < 0.05 &&
                  info.rms_y_px < 0.05,
              "rms of the untouched pair (%.4f, %.4f)", info.rms_x_px, info.rms_y_px);
        int same = rs.n == p.ref_stars.n;
        for (size_t k = 0; same && k < rs.n; k++)
            same = rs.stars[k].x == p.ref_stars.stars[k].x &&
                   rs.stars[k].y == p.ref_stars.stars[k].y;
        CHECK(same, "reference stars unchanged");
        hilal_starlist_clear(&rs);
        as_pair_free(&p);
    }
}

/* Several threads give the same pixels as one. */
static void test_threads(void)
{
    as_pair_opts o = as_pair_opts_default();
    o.nx = o.ny = 300;
    o.nstars = 80;
    as_pair p;
    CHECK(as_pair_make(&o, &p) == 0, "pair");
    hilal_align_opts ao;
    hilal_align_opts_default(&ao);
    hilal_image *a1 = NULL, *a3 = NULL;
    hilal_starlist r1 = {0, NULL}, r3 = {0, NULL};
    hilal_error err;
    hilal_error_clear(&err);
    ao.threads = 1;
    hilal_status s1 = hilal_align_pair(p.sci, p.ref, &p.sci_stars, &p.ref_stars, &ao, &a1, &r1,
                                       NULL, &err);
    ao.threads = 3;
    hilal_status s3 = hilal_align_pair(p.sci, p.ref, &p.sci_stars, &p.ref_stars, &ao, &a3, &r3,
                                       NULL, &err);
    CHECK(s1 == HILAL_OK && s3 == HILAL_OK, "%s", err.msg);
    if (a1 && a3) {
        size_t npx = (size_t)(a1->nx * a1->ny);
        CHECK(memcmp(a1->mask, a3->mask, npx * sizeof *a1->mask) == 0 &&
                  memcmp(a1->var, a3->var, npx * sizeof *a1->var) == 0,
              "same masks and variance");
        int same = 1;
        for (size_t k = 0; k < npx && same; k++)
            same = (isnan(a1->pix[k]) && isnan(a3->pix[k])) || a1->pix[k] == a3->pix[k];
        CHECK(same, "same pixels");
    }
    hilal_image_free(a1);
    hilal_image_free(a3);
    hilal_starlist_clear(&r1);
    hilal_starlist_clear(&r3);
    as_pair_free(&p);
}

/* The stage through a runner: frame products replaced and filled. */
static void test_stage(void)
{
    as_pair_opts o = as_pair_opts_default();
    o.nx = o.ny = 512;
    o.nstars = 250;
    o.seed = 5;
    as_pair p;
    CHECK(as_pair_make(&o, &p) == 0, "pair");
    hilal_error err;
    hilal_error_clear(&err);
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    CHECK(hilal_registry_find("align") == &hilal_stage_align, "registered");
    CHECK(hilal_config_set(cfg, "align.max_stars", "300", "test", &err) == HILAL_OK, "set");
    const hilal_stage *stage = &hilal_stage_align;
    CHECK(stage->needs == (HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND |
                           HILAL_PROD_STARS) &&
              stage->makes == HILAL_PROD_ALIGNED,
          "needs and makes");
    hilal_frame f;
    hilal_frame_init(&f);
    snprintf(f.frame_id, sizeof f.frame_id, "sim-0001");
    /* hand the pair to the frame (the frame owns it from here) */
    f.sci = p.sci;
    f.ref = p.ref;
    f.sci_stars = p.sci_stars;
    f.ref_stars = p.ref_stars;
    p.sci = p.ref = NULL;
    memset(&p.sci_stars, 0, sizeof p.sci_stars);
    memset(&p.ref_stars, 0, sizeof p.ref_stars);
    f.products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND |
                 HILAL_PROD_STARS;
    hilal_image *old_ref = f.ref;
    void *state = NULL;
    hilal_status st = stage->init(cfg, &state, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        st = stage->run(state, &f, &err);
        CHECK_OK(st, &err);
        CHECK(f.ref != old_ref && f.ref->nx == 512, "reference replaced");
        CHECK(f.reg_rms_x_px > 0 && f.reg_rms_x_px < 0.05 && f.reg_rms_y_px > 0 &&
                  f.reg_rms_y_px < 0.05,
              "reg rms (%g, %g)", f.reg_rms_x_px, f.reg_rms_y_px);
        int nc = 0;
        double crms = carried_star_rms(&p, &f.ref_stars, 2e4, &nc);
        CHECK(nc >= 10 && crms < 0.05, "carried stars %d rms %.4f", nc, crms);
        /* Registration RMS of a region (a quadrant) from the aligned lists. */
        double rx = 0, ry = 0;
        int nm = 0;
        hilal_error_clear(&err);
        st = hilal_align_region_rms(&f.sci_stars, &f.ref_stars, 1, 1, 256, 256, 1.0, &rx, &ry, &nm,
                                    &err);
        CHECK_OK(st, &err);
        CHECK(nm >= 20 && rx > 0 && rx < 0.1 && ry > 0 && ry < 0.1, "quadrant rms (%g, %g) of %d",
              rx, ry, nm);
        hilal_error_clear(&err);
        st = hilal_align_region_rms(&f.sci_stars, &f.ref_stars, 600, 600, 700, 700, 1.0, &rx, &ry,
                                    &nm, &err);
        CHECK(st == HILAL_ERR_DATA && nm == 0 && isnan(rx) && strstr(err.msg, "at least 3"),
              "empty region: %s", err.msg);
        stage->fini(state);
    }
    /* Inconsistent settings are refused at init. */
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set(cfg, "align.search_radius_px", "1.5", "test", &err), &err);
    state = NULL;
    st = stage->init(cfg, &state, &err);
    CHECK(st == HILAL_ERR_CONFIG && state == NULL && strstr(err.msg, "search_radius_px"),
          "init check: %s", err.msg);
    hilal_frame_clear(&f);
    hilal_config_free(cfg);
    as_pair_free(&p);
}

int main(void)
{
    test_wcs_offset_rotation();
    test_scale_flux();
    test_no_wcs();
    test_sizes_one_wcs();
    test_errors();
    test_variance();
    test_identity();
    test_threads();
    test_stage();
    return hilal_test_finish();
}
