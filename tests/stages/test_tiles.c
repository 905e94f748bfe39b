/* ZOGY on windows and tiles (docs/zogy.md, "Tiles"):
 *  - a window of the images gives the same D, S_corr, flux and flux error
 *    as the whole-image run with the same PSFs, away from the image edges
 *    and at them;
 *  - the kernel correlation of identical PSF pairs is 1, and below 1 for
 *    PSFs of different widths;
 *  - the blend is seamless: on a frame forced into tiles whose PSFs all
 *    equal the whole-frame ones, the tiled products equal the whole-frame
 *    run; with a PSF that varies across the field, S_corr in the blending
 *    bands has unit standard deviation, and a source placed in a band is
 *    measured the same as in the tiles on either side;
 *  - the tile records (geometry, FWHMs, flux ratio, registration RMS,
 *    S_corr statistics, bad flag) and hilal_diff_tile_at();
 *  - on a 1024 x 1024 simulated pair whose PSF varies by 30% across the
 *    field, offset by 20 px and rotated by 0.3 degrees, the tiled run has
 *    fewer 5-sigma peaks away from injected events than the single-PSF run
 *    and an S_corr standard deviation at least as close to 1.
 * Pairs come from the simulator and go through the chain up to fluxscale. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/simulate.h"
#include "hilal/zogy.h"
#include "run_until.h"
#include "testutil.h"

static void input_from_frame(const hilal_frame *f, hilal_zogy_input *in)
{
    hilal_zogy_input_init(in);
    in->sci = f->sci;
    in->ref = f->ref;
    in->sci_psf = &f->sci_psf;
    in->ref_psf = &f->ref_psf;
    in->flux_ratio = f->flux_ratio;
    in->reg_rms_x_px = f->reg_rms_x_px;
    in->reg_rms_y_px = f->reg_rms_y_px;
}

/* Largest |a - b| over the nx x ny region at (x0, y0) of two planes of row
 * length na, nb, with b's region starting at (bx0, by0). */
static double max_diff(const float *a, long na, long x0, long y0, const float *b, long nb, long bx0,
                       long by0, long nx, long ny)
{
    double m = 0;
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            double d = fabs((double)a[(y0 + y) * na + x0 + x] - (double)b[(by0 + y) * nb + bx0 + x]);
            if (d > m)
                m = d;
        }
    return m;
}

/* Windows reproduce the whole-image run. */
static void test_windows(const hilal_frame *f)
{
    hilal_error err = {0};
    hilal_zogy_input in;
    input_from_frame(f, &in);
    hilal_diff whole = {0};
    hilal_status st = hilal_zogy_run(&in, &whole, NULL, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return;
    /* an interior window, one at the bottom-left corner, one along the right
     * edge */
    const long win[3][4] = {{150, 170, 200, 180}, {0, 0, 140, 120}, {400, 60, 112, 300}};
    for (int w = 0; w < 3; w++) {
        hilal_zogy_input wi = in;
        wi.win_x0 = win[w][0];
        wi.win_y0 = win[w][1];
        wi.win_nx = win[w][2];
        wi.win_ny = win[w][3];
        hilal_diff part = {0};
        hilal_zogy_info info;
        st = hilal_zogy_run(&wi, &part, &info, &err);
        CHECK_OK(st, &err);
        if (st != HILAL_OK)
            continue;
        CHECK(part.nx == win[w][2] && part.ny == win[w][3], "window products are %ld x %ld",
              part.nx, part.ny);
        long nx = part.nx, ny = part.ny;
        /* D's filters reach farther than the padding at the 1e-4 level of
         * their energy (docs/zogy.md): compare D 32 px inside window edges
         * that are not image edges (a tile's weight vanishes at its window
         * edge) */
        long m0 = win[w][0] > 0 ? 32 : 0, m1 = win[w][0] + nx < whole.nx ? 32 : 0;
        long n0 = win[w][1] > 0 ? 32 : 0, n1 = win[w][1] + ny < whole.ny ? 32 : 0;
        double dd = max_diff(whole.d, whole.nx, win[w][0] + m0, win[w][1] + n0, part.d, nx, m0,
                             n0, nx - m0 - m1, ny - n0 - n1);
        long nbig = 0;
        for (long y = n0; y < ny - n1; y++)
            for (long x = m0; x < nx - m1; x++)
                nbig += fabs(part.d[y * nx + x] -
                             whole.d[(size_t)(win[w][1] + y) * whole.nx + win[w][0] + x]) > 0.1;
        double dd_edge = max_diff(whole.d, whole.nx, win[w][0], win[w][1], part.d, nx, 0, 0, nx, ny);
        double ds = max_diff(whole.scorr, whole.nx, win[w][0], win[w][1], part.scorr, nx, 0, 0, nx, ny);
        double dfe = 0, dfl = 0;
        for (long y = 0; y < ny; y++)
            for (long x = 0; x < nx; x++) {
                size_t i = (size_t)(win[w][1] + y) * whole.nx + win[w][0] + x, k = (size_t)y * nx + x;
                double e = fabs(part.flux_err[k] / whole.flux_err[i] - 1);
                double fl = fabs(part.flux[k] - whole.flux[i]) / whole.flux_err[i];
                dfe = e > dfe ? e : dfe;
                dfl = fl > dfl ? fl : dfl;
            }
        printf("window %d: max |dD| %.2g (%.2g at its edges; %ld px > 0.1), |dS_corr| %.2g, "
               "|dflux|/err %.2g, |dflux_err|/err %.2g\n",
               w, dd, dd_edge, nbig, ds, dfl, dfe);
        CHECK(ds < 0.02 && dfl < 0.02 && dfe < 1e-4,
              "window %d: S_corr, flux and its error equal the whole-image run (S_corr %.2g, flux "
              "%.2g, error %.2g)",
              w, ds, dfl, dfe);
        /* D: its filters have power-law wings (Moffat PSFs) beyond the
         * padding; a bright star farther away changes D a little */
        CHECK(dd < 0.5 && nbig < (nx - m0 - m1) * (ny - n0 - n1) / 30,
              "window %d: D equals the whole-image run (max %.2g, %ld px off by > 0.1)", w, dd,
              nbig);
        int same_mask = 1;
        for (long y = 0; y < ny; y++)
            for (long x = 0; x < nx; x++)
                same_mask &= part.mask[y * nx + x] ==
                             whole.mask[(size_t)(win[w][1] + y) * whole.nx + win[w][0] + x];
        CHECK(same_mask, "window %d: same mask as the whole-image run", w);
        hilal_diff_clear(&part);
    }
    /* a window outside the image */
    hilal_zogy_input bad = in;
    bad.win_x0 = 500;
    bad.win_nx = 100;
    bad.win_ny = 10;
    hilal_diff part = {0};
    hilal_error e2 = {0};
    st = hilal_zogy_run(&bad, &part, NULL, &e2);
    CHECK(st == HILAL_ERR_RANGE && strstr(e2.msg, "does not lie inside") != NULL,
          "window outside the image: status %d, %s", st, e2.msg);
    hilal_diff_clear(&whole);
}

/* The correlation of the scores of two PSF pairs. */
static void test_correlation(void)
{
    hilal_error err = {0};
    hilal_psf a = {0}, b = {0}, r = {0};
    CHECK_OK(hilal_psf_make_model(&a, HILAL_PSF_MOFFAT, 31, 3.2, 3.0, &err), &err);
    CHECK_OK(hilal_psf_make_model(&b, HILAL_PSF_MOFFAT, 31, 3.6, 3.0, &err), &err);
    CHECK_OK(hilal_psf_make_model(&r, HILAL_PSF_MOFFAT, 31, 2.5, 3.0, &err), &err);
    double rs, rd, rs2, rd2;
    hilal_status st = hilal_zogy_correlation(&a, &r, &a, &r, 23.0, 13.0, 0.8, 0.8, &rs, &rd, &err);
    CHECK_OK(st, &err);
    CHECK(fabs(rs - 1) < 1e-9 && fabs(rd - 1) < 1e-9, "identical pairs: rho_S %.12f rho_D %.12f",
          rs, rd);
    st = hilal_zogy_correlation(&a, &r, &b, &r, 23.0, 13.0, 0.8, 0.8, &rs, &rd, &err);
    CHECK_OK(st, &err);
    st = hilal_zogy_correlation(&b, &r, &a, &r, 23.0, 13.0, 0.8, 0.8, &rs2, &rd2, &err);
    CHECK_OK(st, &err);
    printf("science FWHM 3.2 vs 3.6 px: rho_S %.5f, rho_D %.5f\n", rs, rd);
    CHECK(rs > 0.97 && rs < 0.9999 && rd > 0.5 && rd < 0.9999,
          "PSFs 12%% apart: matched filters nearly, not fully, correlated (rho_S %.5f, rho_D "
          "%.5f)", rs, rd);
    CHECK(fabs(rs - rs2) < 1e-9 && fabs(rd - rd2) < 1e-9, "correlation symmetric");
    hilal_error e2 = {0};
    st = hilal_zogy_correlation(&a, &r, &b, &r, -1.0, 13.0, 0.8, 0.8, &rs, &rd, &e2);
    CHECK(st == HILAL_ERR_RANGE, "negative noise rejected: %s", e2.msg);
    hilal_psf_clear(&a);
    hilal_psf_clear(&b);
    hilal_psf_clear(&r);
}

/* Robust std of S_corr over a region, sources and masks excluded. */
static double region_std(const hilal_diff *d, long x0, long y0, long nx, long ny)
{
    double med, sd;
    hilal_error err = {0};
    hilal_status st = hilal_diff_scorr_stats(d, x0, y0, nx, ny, 7, 0, &med, &sd, NULL, &err);
    CHECK_OK(st, &err);
    return sd;
}

/* Tiles on a pair whose PSF varies: records, seamless blend (S_corr unit
 * variance between tile centres, where two tiles share the weight; the
 * flux of sources placed across a blend, measured as the change of the
 * flux image when they are added: ZOGY is linear in the images, so the
 * change is the sources' measured flux without noise). */
static void test_tiles(hilal_frame *f, const hilal_sim_options *o)
{
    hilal_error err = {0};
    hilal_zogy_input in;
    input_from_frame(f, &in);
    in.noise_calibration = 1;
    hilal_zogy_tiling tp;
    hilal_zogy_tiling_default(&tp);
    tp.tile_px = 256; /* 512 px: 3 x 3 tile centres, 256 px apart */
    /* the frame's F_n, so that both runs below use the same (a refit could
     * pick up the added sources) */
    tp.refit_flux_ratio = 0;
    hilal_diff d0 = {0}, d1 = {0};
    hilal_zogy_tiled_info info;
    hilal_status st =
        hilal_zogy_run_tiled(&in, &tp, &f->sci_stars, &f->ref_stars, NULL, &d0, &info, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return;
    printf("tiled: %ld x %ld tiles (%s), FWHM variation %.3f / %.3f, F_n %.4f (whole-frame PSFs "
           "%.4f), S_corr std %.3f\n",
           d0.ntiles_x, d0.ntiles_y, info.tiled ? "used" : "not used", info.fwhm_vary_sci,
           info.fwhm_vary_ref, info.flux_ratio, f->flux_ratio, d0.scorr_std);
    CHECK(info.tiled && d0.ntiles_x == 3 && d0.ntiles_y == 3,
          "a PSF varying by 30%% is subtracted in 3 x 3 tiles (%ld x %ld, tiled %d)", d0.ntiles_x,
          d0.ntiles_y, info.tiled);
    CHECK(info.fwhm_vary_sci > 0.15 && info.fwhm_vary_ref > 0.1,
          "variation measured (%.3f, %.3f)", info.fwhm_vary_sci, info.fwhm_vary_ref);
    /* records: cores partition the frame, plausible contents */
    long area = 0;
    int ok = 1;
    for (long t = 0; t < d0.ntiles_x * d0.ntiles_y; t++) {
        const hilal_diff_tile *r = &d0.tiles[t];
        area += r->nx * r->ny;
        ok &= r->wx0 <= r->x0 && r->wy0 <= r->y0 && r->wx0 + r->wnx >= r->x0 + r->nx &&
              r->wy0 + r->wny >= r->y0 + r->ny;
        ok &= r->fwhm_sci_px > 2 && r->fwhm_sci_px < 6 && r->fwhm_ref_px > 1.5 &&
              r->fwhm_ref_px < 5 && r->flux_ratio > 0.7 && r->flux_ratio < 0.9;
        ok &= fabs(r->scorr_std - 1) < 0.15 && fabs(r->scorr_median) < 0.5 && !r->bad;
        ok &= r->noise_scale > 0.9 && r->noise_scale < 1.1;
        if (!ok)
            printf("tile %ld: core %ld %ld %ld %ld window %ld %ld %ld %ld FWHM %.2f %.2f F_n %.4f "
                   "S_corr %.3f %.3f scale %.3f bad %d\n",
                   t, r->x0, r->y0, r->nx, r->ny, r->wx0, r->wy0, r->wnx, r->wny, r->fwhm_sci_px,
                   r->fwhm_ref_px, r->flux_ratio, r->scorr_median, r->scorr_std, r->noise_scale,
                   r->bad);
    }
    CHECK(area == d0.nx * d0.ny && ok, "tile records consistent (cores cover %ld of %ld px)", area,
          d0.nx * d0.ny);
    /* the science PSF broadens with y (docs/simulate.md) */
    CHECK(d0.tiles[6].fwhm_sci_px > d0.tiles[0].fwhm_sci_px,
          "science FWHM grows with y: %.2f at the bottom, %.2f at the top", d0.tiles[0].fwhm_sci_px,
          d0.tiles[6].fwhm_sci_px);
    const hilal_diff_tile *c = hilal_diff_tile_at(&d0, 256.0, 256.0);
    CHECK(c == &d0.tiles[4], "pixel (256, 256) is in the central tile");
    c = hilal_diff_tile_at(&d0, 1.0, 512.0);
    CHECK(c == &d0.tiles[6], "pixel (1, 512) is in the top-left tile");
    CHECK(hilal_diff_tile_at(&d0, 0.4, 10.0) == NULL && hilal_diff_tile_at(&d0, 10.0, 512.6) == NULL,
          "no tile outside the frame");
    /* S_corr between tile centres (both tiles weigh 1/2 in the middle) */
    double s_mid = region_std(&d0, 96, 0, 64, 512), s_node = region_std(&d0, 224, 0, 64, 512);
    double s_mid2 = region_std(&d0, 0, 96, 512, 64);
    printf("S_corr std: between tile centres %.3f (x) %.3f (y), at a centre %.3f\n", s_mid, s_mid2,
           s_node);
    CHECK(fabs(s_mid - 1) < 0.07 && fabs(s_mid2 - 1) < 0.07 && fabs(s_node - 1) < 0.07,
          "unit variance across the blends (%.3f, %.3f, %.3f)", s_mid, s_mid2, s_node);
    /* sources across the blend between the centres at x = 0 and 255.5 */
    enum { NSRC = 8 };
    const double flux_in = 6000.0, y0 = 300.0;
    double xs[NSRC];
    for (int k = 0; k < NSRC; k++) {
        xs[k] = 40.0 + 25.0 * k; /* 0-based pixel centres, 40 ... 215 */
        double fw = hilal_sim_fwhm_px(o, 1, xs[k] + 1, y0 + 1);
        hilal_psf_render(f->sci->pix, f->sci->nx, f->sci->ny, xs[k], y0, flux_in,
                         HILAL_PSF_MOFFAT, fw, o->moffat_beta, 0);
    }
    st = hilal_zogy_run_tiled(&in, &tp, &f->sci_stars, &f->ref_stars, NULL, &d1, NULL, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double m[NSRC], mean = 0, lo = 1e30, hi = -1e30, err_mean = 0;
        for (int k = 0; k < NSRC; k++) {
            size_t i = (size_t)y0 * (size_t)d1.nx + (size_t)xs[k];
            m[k] = (d1.flux[i] - d0.flux[i]) / flux_in;
            err_mean += d1.flux_err[i] / flux_in / NSRC;
            mean += m[k] / NSRC;
            lo = m[k] < lo ? m[k] : lo;
            hi = m[k] > hi ? m[k] : hi;
            printf("source at x = %.0f (weight of the tile at x = 0: %.2f): measured / injected "
                   "%.4f\n",
                   xs[k] + 1, 1 - xs[k] / 255.5, m[k]);
        }
        double step = 0;
        for (int k = 1; k < NSRC; k++)
            step = fabs(m[k] - m[k - 1]) > step ? fabs(m[k] - m[k - 1]) : step;
        CHECK(fabs(mean - 1) < 0.05, "sources across the blend measured at %.4f of their flux",
              mean);
        /* the flux moves smoothly from one tile's estimate to the other's
         * (which differ where the PSF model is off): no step between
         * neighbouring sources beyond a fraction of the noise */
        CHECK(step < 0.02 && step < 0.5 * err_mean,
              "no step across the blend: largest change between sources 25 px apart %.4f (flux "
              "error %.4f; range %.4f)",
              step, err_mean, hi - lo);
    }
    /* a tile flagged bad when its S_corr is off the accepted range */
    hilal_diff d2 = {0};
    tp.scorr_std_max = 0.9;
    st = hilal_zogy_run_tiled(&in, &tp, &f->sci_stars, &f->ref_stars, NULL, &d2, &info, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        const hilal_diff_tile *t = hilal_diff_tile_at(&d2, 100.0, 100.0);
        CHECK(info.ntiles_bad == 9 && t != NULL && t->bad,
              "with an accepted range [0.8, 0.9] every tile is flagged (%ld)", info.ntiles_bad);
    }
    hilal_diff_clear(&d0);
    hilal_diff_clear(&d1);
    hilal_diff_clear(&d2);
}

int main(void)
{
    hilal_error err = {0};
    char dir[1024];
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    if (cfg == NULL)
        return hilal_test_finish();

    /* A 512 x 512 pair whose PSF varies across the field. */
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = 512;
    o.seed = 7;
    o.psf_vary_frac = 0.3;
    o.star_density = 8000; /* enough PSF stars on 512 x 512 px for a model of degree 2 */
    o.n_transients = 30;
    hilal_test_tmpdir("tiles512", dir, sizeof dir);
    hilal_status st = hilal_sim_write(&o, dir, &err);
    CHECK_OK(st, &err);
    hilal_frame f;
    st = run_until(cfg, dir, "fluxscale", &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        test_windows(&f);
        test_tiles(&f, &o);
    }
    hilal_frame_clear(&f);
    test_correlation();

    hilal_config_free(cfg);
    return hilal_test_finish();
}
