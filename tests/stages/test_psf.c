/* PSF functions and the psf stage: analytic models and their FWHM,
 * Lanczos shifts, PSF-fit photometry; the empirical PSF recovered from
 * synthetic fields of Gaussian and Moffat stars (with cosmic-ray hits on
 * some of them) against the true pixel-integrated PSF; the fallback model
 * with two stars; errors without stars. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/hilal.h"
#include "hilal/psf.h"
#include "synth_rng.h"
#include "testutil.h"

extern const hilal_stage hilal_stage_background;
extern const hilal_stage hilal_stage_stars;
extern const hilal_stage hilal_stage_psf;

static char logbuf[8192];
static void capture(hilal_log_level level, const char *msg, void *user)
{
    (void)user;
    if (getenv("PSF_TEST_DEBUG"))
        fprintf(stderr, "log: %s\n", msg);
    if (level <= HILAL_LOG_WARN && strlen(logbuf) + strlen(msg) + 2 < sizeof logbuf) {
        strcat(logbuf, msg);
        strcat(logbuf, "\n");
    }
}

#define SKY 300.0
#define GAIN 2.0
#define RN 5.0

/* nstars stars of one model at random sub-pixel positions (>= 24 px apart,
 * >= 24 px from the border), log-uniform fluxes in [fmin, 30 fmin], noise
 * with the variance of sky + source. ncr stars get a cosmic-ray hit of
 * 2000 ADU 3-5 px from their centre. */
static hilal_image *make_field(long n, int nstars, hilal_psf_model model, double fwhm,
                               double beta, double fmin, int ncr, uint64_t seed)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = hilal_image_new(n, n, &err);
    double *xs = calloc((size_t)nstars + 1, sizeof *xs), *ys = calloc((size_t)nstars + 1, sizeof *ys);
    if (img == NULL || xs == NULL || ys == NULL) {
        free(xs);
        free(ys);
        hilal_image_free(img);
        return NULL;
    }
    rng_state = seed;
    int k = 0, tries = 0;
    while (k < nstars && tries++ < 100000) {
        double x = 24 + (n - 48) * rng_uniform(), y = 24 + (n - 48) * rng_uniform();
        int ok = 1;
        for (int q = 0; q < k && ok; q++)
            ok = hypot(x - xs[q], y - ys[q]) > 24;
        if (!ok)
            continue;
        xs[k] = x;
        ys[k] = y;
        double flux = fmin * pow(30.0, rng_uniform());
        hilal_psf_render(img->pix, n, n, x, y, flux, model, fwhm, beta, 0);
        k++;
    }
    for (long i = 0; i < n * n; i++) {
        double s = img->pix[i];
        img->pix[i] = (float)(SKY + s + sqrt((SKY + s) / GAIN + RN * RN / (GAIN * GAIN)) * rng_gauss());
    }
    for (int q = 0; q < ncr && q < k; q++) {
        double ang = 6.283185307179586 * rng_uniform(), r = 3.0 + 2.0 * rng_uniform();
        long cx = lround(xs[q] + r * cos(ang)), cy = lround(ys[q] + r * sin(ang));
        img->pix[cy * n + cx] += 2000.0f;
    }
    img->meta.gain_e_per_adu = GAIN;
    img->meta.rdnoise_e = RN;
    img->meta.saturate_adu = 60000.0;
    snprintf(img->meta.path, sizeof img->meta.path, "psf-field.fits");
    free(xs);
    free(ys);
    return img;
}

/* background + stars + psf on a frame whose sci and ref are copies of img
 * (the reference counts as aligned). */
static hilal_status run_chain(hilal_image *img, const char *set, hilal_frame *f, hilal_error *err)
{
    hilal_config *cfg = hilal_registry_config_new(err);
    void *bs = NULL, *ss = NULL, *ps = NULL;
    hilal_status st = cfg ? HILAL_OK : err->code;
    if (st == HILAL_OK && set != NULL)
        st = hilal_config_set_arg(cfg, set, err);
    hilal_frame_init(f);
    strcpy(f->frame_id, "psf-test");
    f->sci = img;
    f->ref = hilal_image_clone(img, err);
    f->products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    if (st == HILAL_OK)
        st = hilal_stage_background.init(cfg, &bs, err);
    if (st == HILAL_OK)
        st = hilal_stage_stars.init(cfg, &ss, err);
    if (st == HILAL_OK)
        st = hilal_stage_psf.init(cfg, &ps, err);
    if (st == HILAL_OK)
        st = hilal_stage_background.run(bs, f, err);
    if (st == HILAL_OK)
        st = hilal_stage_stars.run(ss, f, err);
    f->products |= HILAL_PROD_ALIGNED;
    if (st == HILAL_OK)
        st = hilal_stage_psf.run(ps, f, err);
    hilal_stage_background.fini(bs);
    hilal_stage_stars.fini(ss);
    hilal_stage_psf.fini(ps);
    hilal_config_free(cfg);
    return st;
}

static double psf_sum(const hilal_psf *p)
{
    double s = 0.0;
    for (int i = 0; i < p->size * p->size; i++)
        s += p->data[i];
    return s;
}

/* 1. Models, FWHM measurement, sizes. */
static void test_models(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_psf p = {0};
    double fw[] = {2.0, 3.0, 4.5, 7.0};
    for (int i = 0; i < 4; i++) {
        int size = hilal_psf_size_for_fwhm(fw[i], 4.0, 11, 63);
        CHECK(size == (2 * (int)ceil(4.0 * fw[i]) + 1 < 11 ? 11 : 2 * (int)ceil(4.0 * fw[i]) + 1),
              "size for FWHM %.1f: %d", fw[i], size);
        CHECK_OK(hilal_psf_make_model(&p, HILAL_PSF_GAUSSIAN, size, fw[i], 0, &err), &err);
        double m = hilal_psf_measure_fwhm(p.data, NULL, size, size, size / 2, size / 2, size / 2);
        CHECK(fabs(psf_sum(&p) - 1.0) < 1e-6, "Gaussian model sums to 1");
        /* Exact pixel deconvolution for a Gaussian; interpolation limits
         * the accuracy when the FWHM approaches 2 px. */
        double tol_g = fw[i] < 2.5 ? 0.03 : 0.01, tol_m = fw[i] < 2.5 ? 0.05 : 0.02;
        CHECK(fabs(m / fw[i] - 1.0) < tol_g, "Gaussian FWHM %.2f measured %.4f", fw[i], m);
        CHECK_OK(hilal_psf_make_model(&p, HILAL_PSF_MOFFAT, size, fw[i], 3.0, &err), &err);
        m = hilal_psf_measure_fwhm(p.data, NULL, size, size, size / 2, size / 2, size / 2);
        CHECK(fabs(m / fw[i] - 1.0) < tol_m, "Moffat FWHM %.2f measured %.4f", fw[i], m);
        double cx, cy;
        hilal_psf_centroid(&p, &cx, &cy);
        CHECK(fabs(cx) < 1e-6 && fabs(cy) < 1e-6, "model centred (%.2g, %.2g)", cx, cy);
    }
    CHECK(hilal_psf_size_for_fwhm(20.0, 4.0, 11, 63) == 63, "size clipped to 63");
    CHECK(hilal_psf_size_for_fwhm(NAN, 4.0, 11, 63) == 11, "NaN FWHM gives the minimum");
    CHECK(hilal_psf_size_for_fwhm(3.0, 4.0, 10, 62) == 25, "odd limits");
    CHECK(hilal_psf_make_model(&p, HILAL_PSF_GAUSSIAN, 10, 3.0, 0, &err) == HILAL_ERR_RANGE,
          "even size rejected");
    hilal_error_clear(&err);
    CHECK(hilal_psf_make_model(&p, HILAL_PSF_MOFFAT, 11, 3.0, 1.0, &err) == HILAL_ERR_RANGE,
          "Moffat beta 1 rejected");
    hilal_psf_clear(&p);

    /* Lanczos shift: out(u) = in(u + s) moves a feature by -s and keeps
     * its flux. */
    hilal_error_clear(&err);
    CHECK_OK(hilal_psf_make_model(&p, HILAL_PSF_GAUSSIAN, 31, 3.0, 0, &err), &err);
    float *out = malloc(31 * 31 * sizeof *out);
    if (out != NULL) {
        CHECK_OK(hilal_psf_shift(p.data, 31, 31, 0.3, -0.2, out, &err), &err);
        hilal_psf q = {31, out, 0, 0};
        double cx, cy, s = 0;
        hilal_psf_centroid(&q, &cx, &cy);
        for (int i = 0; i < 31 * 31; i++)
            s += out[i];
        /* A windowed sinc does not reproduce linear ramps exactly: the
         * centroid moves by the shift to within a few percent of it. */
        CHECK(fabs(cx + 0.3) < 0.015 && fabs(cy - 0.2) < 0.015, "shifted centroid (%.4f, %.4f)",
              cx, cy);
        CHECK(fabs(s - 1.0) < 1e-4, "shift keeps the flux (%.6f)", s);
        /* Against the model rendered at the shifted position. */
        float *ref = calloc(31 * 31, sizeof *ref);
        if (ref != NULL) {
            hilal_psf_render(ref, 31, 31, 15 - 0.3, 15 + 0.2, 1.0, HILAL_PSF_GAUSSIAN, 3.0, 0, 40);
            double md = 0, pk = 0;
            for (int i = 0; i < 31 * 31; i++) {
                md = fmax(md, fabs(out[i] - ref[i]));
                pk = fmax(pk, ref[i]);
            }
            CHECK(md < 0.003 * pk, "Lanczos shift error %.2g of peak", md / pk);
            free(ref);
        }
        CHECK(hilal_psf_shift(p.data, 31, 31, 9.0, 0, out, &err) == HILAL_ERR_RANGE,
              "shift beyond 8 px rejected");
        free(out);
    }
    hilal_psf_clear(&p);
}

/* 2. PSF-fit photometry of stars of known flux: with a sky map (flux
 *    only), and without one on an image whose background is off by 5 ADU
 *    (flux and a constant). */
static void test_fit_flux(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_psf p = {0};
    CHECK_OK(hilal_psf_make_model(&p, HILAL_PSF_GAUSSIAN, 27, 3.0, 0, &err), &err);
    hilal_image *img = hilal_image_new(200, 200, &err);
    if (img == NULL)
        return;
    rng_state = 3;
    const double flux = 2e4;
    double xs[9], ys[9];
    for (int k = 0; k < 9; k++) {
        xs[k] = 30 + 60 * (k % 3) + rng_uniform();
        ys[k] = 30 + 60 * (k / 3) + rng_uniform();
        hilal_psf_render(img->pix, 200, 200, xs[k], ys[k], flux, HILAL_PSF_GAUSSIAN, 3.0, 0, 0);
    }
    CHECK(hilal_image_alloc_var(img, &err) == HILAL_OK && hilal_image_alloc_sky(img, &err) == HILAL_OK,
          "planes");
    for (long i = 0; i < 200 * 200; i++) {
        double s = img->pix[i];
        img->var[i] = (float)((SKY + s) / GAIN + 6.25);
        img->pix[i] = (float)(SKY + s + sqrt(img->var[i]) * rng_gauss());
        img->sky[i] = (float)SKY;
    }
    img->sky_rms_adu = sqrt(SKY / GAIN + 6.25);
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            /* No sky map: the pixels carry a background 5 ADU above SKY
             * and the fit's constant has to absorb it. */
            free(img->sky);
            img->sky = NULL;
            for (long i = 0; i < 200 * 200; i++)
                img->pix[i] -= (float)(SKY - 5.0);
        }
        double chi2 = 0;
        for (int k = 0; k < 9; k++) {
            double f = NAN, fe = NAN;
            CHECK_OK(hilal_psf_fit_flux(img, &p, xs[k] + 1, ys[k] + 1, &f, &fe, &err), &err);
            /* The model PSF holds the flux inside its 27 px stamp: all of it. */
            chi2 += (f - flux) * (f - flux) / (fe * fe);
            CHECK(fe > 0.0 && fe < 0.02 * flux, "flux error %.1f", fe);
        }
        printf("PSF fit (%s): chi2/N of 9 stars = %.2f\n", pass ? "no sky map" : "sky map",
               chi2 / 9);
        CHECK(chi2 / 9 < 3.0, "PSF-fit fluxes consistent with their errors (chi2/N %.2f)",
              chi2 / 9);
    }
    double f, fe;
    img->mask[(long)lround(ys[0]) * 200 + lround(xs[0])] = HILAL_MASK_BAD;
    CHECK(hilal_psf_fit_flux(img, &p, xs[0] + 1, ys[0] + 1, &f, &fe, &err) == HILAL_ERR_DATA,
          "masked centre refused");
    hilal_error_clear(&err);
    CHECK(hilal_psf_fit_flux(img, &p, -5.0, 10.0, &f, &fe, &err) == HILAL_ERR_DATA,
          "position off the image refused");
    hilal_image_free(img);
    hilal_psf_clear(&p);
}

/* Compares an empirical PSF with the true pixel-integrated model of the
 * same size: max |difference| / peak, FWHM, centroid. */
static void compare(const char *what, const hilal_psf *got, hilal_psf_model model, double fwhm,
                    double beta, double max_resid)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_psf truth = {0};
    CHECK_OK(hilal_psf_make_model(&truth, model, got->size, fwhm, beta, &err), &err);
    double md = 0.0, pk = 0.0;
    int imax = 0;
    for (int i = 0; i < got->size * got->size; i++) {
        if (fabs(got->data[i] - truth.data[i]) > md) {
            md = fabs(got->data[i] - truth.data[i]);
            imax = i;
        }
        pk = fmax(pk, truth.data[i]);
    }
    printf("%s: worst pixel (%d, %d) from the centre: %.5f vs %.5f\n", what,
           imax % got->size - got->size / 2, imax / got->size - got->size / 2, got->data[imax],
           truth.data[imax]);
    double cx, cy;
    hilal_psf_centroid(got, &cx, &cy);
    printf("%s: size %d, %d stars, max residual %.2f%% of peak, FWHM %.3f (true %.2f), "
           "centroid (%.4f, %.4f), sum %.6f\n",
           what, got->size, got->nstars, 100 * md / pk, got->fwhm_px, fwhm, cx, cy, psf_sum(got));
    /* The side comes from the median star FWHM: 2 ceil(4 FWHM) + 1, give or
     * take one step when 4 FWHM is close to an integer. */
    int expect = hilal_psf_size_for_fwhm(fwhm, 4.0, 11, 63);
    CHECK(got->size % 2 == 1 && abs(got->size - expect) <= 2, "%s: odd size %d from the FWHM",
          what, got->size);
    CHECK(fabs(psf_sum(got) - 1.0) < 1e-5, "%s: sum 1", what);
    CHECK(md < max_resid * pk, "%s: max residual %.2f%% of peak", what, 100 * md / pk);
    CHECK(fabs(got->fwhm_px / fwhm - 1.0) < 0.03, "%s: FWHM %.3f vs %.2f", what, got->fwhm_px,
          fwhm);
    CHECK(fabs(cx) < 0.01 && fabs(cy) < 0.01, "%s: centroid (%.4f, %.4f)", what, cx, cy);
    hilal_psf_clear(&truth);
}

/* 3. Empirical PSFs of Gaussian and Moffat fields. */
static void test_empirical(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    hilal_status st = run_chain(make_field(600, 150, HILAL_PSF_GAUSSIAN, 3.2, 0, 2e4, 10, 11),
                                NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        CHECK(f.products & HILAL_PROD_PSF, "PSF product");
        CHECK(f.sci_psf.nstars >= 50, "stacked %d stars", f.sci_psf.nstars);
        compare("Gaussian FWHM 3.2", &f.sci_psf, HILAL_PSF_GAUSSIAN, 3.2, 0, 0.01);
        CHECK(f.ref_psf.size == f.sci_psf.size && f.ref_psf.nstars == f.sci_psf.nstars,
              "reference PSF built too");
        /* Without a sky map (as on a resampled image that has none): the
         * per-star ring medians and the fitted constant take the sky's
         * place. */
        free(f.sci->sky);
        f.sci->sky = NULL;
        hilal_psf_build_params bp;
        hilal_psf_build_params_default(&bp);
        hilal_psf nosky = {0};
        int fb = -1;
        CHECK_OK(hilal_psf_build(f.sci, &f.sci_stars, &bp, &nosky, &fb, &err), &err);
        CHECK(fb == 0, "empirical, not the fallback");
        if (nosky.data != NULL)
            compare("Gaussian FWHM 3.2, no sky map", &nosky, HILAL_PSF_GAUSSIAN, 3.2, 0, 0.01);
        hilal_psf_clear(&nosky);
    }
    hilal_frame_clear(&f);

    st = run_chain(make_field(600, 150, HILAL_PSF_MOFFAT, 4.0, 3.0, 3e4, 10, 12), NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK)
        compare("Moffat FWHM 4.0 beta 3", &f.sci_psf, HILAL_PSF_MOFFAT, 4.0, 3.0, 0.01);
    hilal_frame_clear(&f);

    /* Undersampled stars: FWHM 2.2 px. */
    st = run_chain(make_field(600, 150, HILAL_PSF_GAUSSIAN, 2.2, 0, 1e4, 0, 13), NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK)
        compare("Gaussian FWHM 2.2", &f.sci_psf, HILAL_PSF_GAUSSIAN, 2.2, 0, 0.015);
    hilal_frame_clear(&f);
}

/* 3b. A sparse field whose brightest star, ten times brighter than the
 *     rest, has a neighbour with 6% of its flux 8 px away. That star
 *     carries most of the weight of the stack; without the neighbour
 *     masks its neighbour went into the PSF (and the recentring then moved
 *     the core by a third of a pixel). */
static void test_bright_neighbour(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = make_field(400, 14, HILAL_PSF_GAUSSIAN, 3.2, 0, 5e3, 0, 21);
    if (img == NULL)
        return;
    /* Added on top of the noisy field, with their own Poisson noise. */
    float *extra = calloc(400 * 400, sizeof *extra);
    if (extra == NULL) {
        hilal_image_free(img);
        return;
    }
    hilal_psf_render(extra, 400, 400, 200.3, 200.6, 6e5, HILAL_PSF_GAUSSIAN, 3.2, 0, 0);
    hilal_psf_render(extra, 400, 400, 199.5, 192.8, 3.6e4, HILAL_PSF_GAUSSIAN, 3.2, 0, 0);
    for (long i = 0; i < 400 * 400; i++)
        img->pix[i] += (float)(extra[i] + sqrt(extra[i] / GAIN) * rng_gauss());
    free(extra);
    hilal_frame f;
    hilal_status st = run_chain(img, NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK)
        compare("bright star with a 6% neighbour", &f.sci_psf, HILAL_PSF_GAUSSIAN, 3.2, 0, 0.015);
    hilal_frame_clear(&f);
}

/* 4. Two stars: the Moffat fallback of their FWHM, with a warning; with
 *    fallback = none, a data error; no stars at all: a data error. */
static void test_fallback(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    logbuf[0] = '\0';
    hilal_status st = run_chain(make_field(200, 2, HILAL_PSF_GAUSSIAN, 3.0, 0, 3e4, 0, 21), NULL,
                                &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        CHECK(f.sci_psf.nstars == 0, "model PSF has nstars 0 (%d)", f.sci_psf.nstars);
        CHECK(fabs(f.sci_psf.fwhm_px / 3.0 - 1.0) < 0.05, "fallback FWHM %.3f from the stars",
              f.sci_psf.fwhm_px);
        CHECK(fabs(psf_sum(&f.sci_psf) - 1.0) < 1e-6 && f.sci_psf.size == 25,
              "fallback normalised, size %d", f.sci_psf.size);
        CHECK(strstr(logbuf, "psf-field.fits: only 2 usable stars") && strstr(logbuf, "Moffat"),
              "fallback warning: %s", logbuf);
        /* The fallback is a Moffat of beta 2.5 and that FWHM. */
        hilal_psf m = {0};
        CHECK_OK(hilal_psf_make_model(&m, HILAL_PSF_MOFFAT, 25, f.sci_psf.fwhm_px, 2.5, &err), &err);
        double md = 0;
        for (int i = 0; i < 25 * 25; i++)
            md = fmax(md, fabs(m.data[i] - f.sci_psf.data[i]));
        CHECK(md < 1e-7, "fallback is the Moffat model");
        hilal_psf_clear(&m);
    }
    hilal_frame_clear(&f);

    hilal_error_clear(&err);
    st = run_chain(make_field(200, 2, HILAL_PSF_GAUSSIAN, 3.0, 0, 3e4, 0, 21), "psf.fallback=none",
                   &f, &err);
    CHECK(st == HILAL_ERR_DATA, "fallback none: data error (%d)", (int)st);
    CHECK(strstr(err.msg, "science PSF") && strstr(err.msg, "psf-field.fits") &&
              strstr(err.msg, "psf.min_stars") && strstr(err.msg, "psf.fallback"),
          "message: %s", err.msg);
    hilal_frame_clear(&f);

    hilal_error_clear(&err);
    st = run_chain(make_field(200, 0, HILAL_PSF_GAUSSIAN, 3.0, 0, 3e4, 0, 22), NULL, &f, &err);
    CHECK(st == HILAL_ERR_DATA, "no stars: data error (%d)", (int)st);
    CHECK(strstr(err.msg, "psf-field.fits") && strstr(err.msg, "stars.thresh_sigma"),
          "message: %s", err.msg);
    hilal_frame_clear(&f);

    /* Bad configuration is caught at init. */
    hilal_config *cfg = hilal_registry_config_new(&err);
    void *ps = NULL;
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set_arg(cfg, "psf.fallback=lorentz", &err), &err);
    st = hilal_stage_psf.init(cfg, &ps, &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "lorentz"), "bad fallback: %s", err.msg);
    hilal_config_free(cfg);
}

int main(void)
{
    hilal_log_set_handler(capture, NULL, HILAL_LOG_DEBUG);
    CHECK(hilal_registry_find("psf") == &hilal_stage_psf, "psf registered");
    test_models();
    test_fit_flux();
    test_empirical();
    test_bright_neighbour();
    test_fallback();
    return hilal_test_finish();
}
