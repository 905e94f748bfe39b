/* fluxscale stage: a synthetic pair with a known flux ratio of 0.8,
 * different PSFs (Gaussian reference, Moffat science) and variable stars
 * among the brightest; the ratio must come out within 1% with a sensible
 * error, by PSF fitting and by aperture photometry; too few matches fail
 * clearly or fall back to the zero points; a biased reference sky map is
 * matched to the science frame's background. */
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
extern const hilal_stage hilal_stage_fluxscale;

static char logbuf[8192];
static void capture(hilal_log_level level, const char *msg, void *user)
{
    (void)user;
    if (level <= HILAL_LOG_WARN && strlen(logbuf) + strlen(msg) + 2 < sizeof logbuf) {
        strcat(logbuf, msg);
        strcat(logbuf, "\n");
    }
}

#define N 600
#define NSTAR 150
#define NVAR 6
#define RATIO 0.8

static double sx[NSTAR], sy[NSTAR], sf[NSTAR];

/* Star positions (>= 24 px apart) and reference fluxes, brightest first. */
static void make_catalogue(uint64_t seed)
{
    rng_state = seed;
    int k = 0;
    while (k < NSTAR) {
        double x = 24 + (N - 48) * rng_uniform(), y = 24 + (N - 48) * rng_uniform();
        int ok = 1;
        for (int q = 0; q < k && ok; q++)
            ok = hypot(x - sx[q], y - sy[q]) > 24;
        if (!ok)
            continue;
        sx[k] = x;
        sy[k] = y;
        sf[k] = 2e4 * pow(25.0, rng_uniform());
        k++;
    }
    /* Sort by decreasing flux so the variables can be the brightest. */
    for (int a = 0; a < NSTAR; a++)
        for (int b = a + 1; b < NSTAR; b++)
            if (sf[b] > sf[a]) {
                double t = sf[a]; sf[a] = sf[b]; sf[b] = t;
                t = sx[a]; sx[a] = sx[b]; sx[b] = t;
                t = sy[a]; sy[a] = sy[b]; sy[b] = t;
            }
}

/* One image of the catalogue: fluxes scaled by `scale` (star k by
 * varf[k] in addition when varf != NULL), offset by (dx, dy) px, noise of
 * sky + source with gain 2 and read noise 5 e-. */
static hilal_image *render(double scale, const double *varf, hilal_psf_model model,
                           double fwhm, double beta, double sky, double dx, double dy,
                           double zp, const char *name, uint64_t seed)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = hilal_image_new(N, N, &err);
    if (img == NULL)
        return NULL;
    for (int k = 0; k < NSTAR; k++)
        hilal_psf_render(img->pix, N, N, sx[k] + dx, sy[k] + dy,
                         scale * sf[k] * (varf != NULL ? varf[k] : 1.0), model, fwhm, beta, 0);
    rng_state = seed;
    for (long i = 0; i < (long)N * N; i++) {
        double s = img->pix[i];
        img->pix[i] = (float)(sky + s + sqrt((sky + s) / 2.0 + 6.25) * rng_gauss());
    }
    img->meta.gain_e_per_adu = 2.0;
    img->meta.rdnoise_e = 5.0;
    img->meta.saturate_adu = 1e6;
    img->meta.zeropoint_mag = zp;
    snprintf(img->meta.path, sizeof img->meta.path, "%s", name);
    return img;
}

/* background, stars, psf and fluxscale on the pair (the reference counts as
 * aligned: both are on the same grid). */
static hilal_status run_chain(hilal_image *sci, hilal_image *ref, const char *set,
                              hilal_frame *f, hilal_error *err)
{
    const hilal_stage *chain[4] = {&hilal_stage_background, &hilal_stage_stars, &hilal_stage_psf,
                                   &hilal_stage_fluxscale};
    void *state[4] = {NULL, NULL, NULL, NULL};
    hilal_config *cfg = hilal_registry_config_new(err);
    hilal_status st = cfg ? HILAL_OK : err->code;
    if (st == HILAL_OK && set != NULL)
        st = hilal_config_set_arg(cfg, set, err);
    hilal_frame_init(f);
    strcpy(f->frame_id, "pair");
    f->sci = sci;
    f->ref = ref;
    f->products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    for (int k = 0; k < 4 && st == HILAL_OK; k++)
        st = chain[k]->init(cfg, &state[k], err);
    for (int k = 0; k < 4 && st == HILAL_OK; k++) {
        if (k == 2)
            f->products |= HILAL_PROD_ALIGNED;
        st = chain[k]->run(state[k], f, err);
    }
    for (int k = 0; k < 4; k++)
        if (state[k] != NULL)
            chain[k]->fini(state[k]);
    hilal_config_free(cfg);
    return st;
}

static void test_ratio(void)
{
    /* Variables: four of the six brightest stars and two fainter ones. */
    double varf[NSTAR];
    for (int k = 0; k < NSTAR; k++)
        varf[k] = 1.0;
    varf[0] = 1.6;
    varf[1] = 0.5;
    varf[3] = 2.0;
    varf[5] = 0.7;
    varf[40] = 1.5;
    varf[80] = 0.3;
    const char *methods[2] = {NULL, "fluxscale.method=aperture"};
    for (int m = 0; m < 2; m++) {
        hilal_error err;
        hilal_error_clear(&err);
        hilal_frame f;
        hilal_image *ref = render(1.0, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, NAN,
                                  "ref.fits", 101);
        hilal_image *sci = render(RATIO, varf, HILAL_PSF_MOFFAT, 4.0, 3.0, 500, 0, 0, NAN,
                                  "sci.fits", 202);
        hilal_status st = run_chain(sci, ref, methods[m], &f, &err);
        CHECK_OK(st, &err);
        if (st == HILAL_OK) {
            double r = f.flux_ratio, e = f.flux_ratio_err;
            printf("%s: flux ratio %.5f +- %.5f from %d stars (true %.2f, off by %.2f%%, "
                   "%.1f sigma)\n",
                   m == 0 ? "PSF fit" : "aperture", r, e, f.flux_ratio_nstars, RATIO,
                   100 * (r / RATIO - 1), (r - RATIO) / e);
            CHECK(f.products & HILAL_PROD_FLUXSCALE, "FLUXSCALE product");
            /* PSF fit: within 1%. Aperture (radius 3 FWHM of the wider PSF):
             * the Moffat wings beyond it hold 0.9% of the science flux, so
             * within 2%. */
            double tol = m == 0 ? 0.01 : 0.02;
            CHECK(fabs(r / RATIO - 1.0) < tol, "ratio %.5f within %.0f%% of %.2f", r, 100 * tol,
                  RATIO);
            CHECK(e > 0.0 && e < 0.005, "error %.5f is positive and small", e);
            if (m == 0)
                CHECK(fabs(r - RATIO) < 5.0 * e + 0.003 * RATIO,
                      "ratio within its error (plus the 0.3%% wing truncation)");
            CHECK(f.flux_ratio_nstars >= 50 && f.flux_ratio_nstars <= NSTAR - NVAR,
                  "stars used %d (variables rejected)", f.flux_ratio_nstars);
        }
        hilal_frame_clear(&f);
    }
}

/* Without rejection the brightest variables would pull the ratio: check
 * that a single dominant outlier does not (flux x3 on the brightest). */
static void test_single_outlier(void)
{
    double varf[NSTAR];
    for (int k = 0; k < NSTAR; k++)
        varf[k] = 1.0;
    varf[0] = 3.0;
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    hilal_status st = run_chain(render(RATIO, varf, HILAL_PSF_GAUSSIAN, 3.5, 0, 400, 0, 0, NAN,
                                       "sci.fits", 303),
                                render(1.0, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, NAN,
                                       "ref.fits", 304),
                                NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        printf("one outlier: ratio %.5f +- %.5f (%d stars)\n", f.flux_ratio, f.flux_ratio_err,
               f.flux_ratio_nstars);
        CHECK(fabs(f.flux_ratio / RATIO - 1.0) < 0.005, "ratio %.5f", f.flux_ratio);
    }
    hilal_frame_clear(&f);
}

/* Reference stars 6 px away from the science ones: no matches. Without
 * zero points a data error that says what to do; with them the fallback. */
static void test_too_few(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    hilal_status st = run_chain(
        render(RATIO, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, NAN, "sci.fits", 1),
        render(1.0, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 6.0, 0, NAN, "ref.fits", 2), NULL, &f,
        &err);
    CHECK(st == HILAL_ERR_DATA, "no matches: data error (%d)", (int)st);
    CHECK(strstr(err.msg, "sci.fits") && strstr(err.msg, "ref.fits") &&
              strstr(err.msg, "fluxscale.match_radius_px") && strstr(err.msg, "0 matched"),
          "message: %s", err.msg);
    CHECK(!(f.products & HILAL_PROD_FLUXSCALE), "no FLUXSCALE product");
    hilal_frame_clear(&f);

    hilal_error_clear(&err);
    logbuf[0] = '\0';
    st = run_chain(render(RATIO, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, 25.0, "sci.fits", 1),
                   render(1.0, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 6.0, 0, 25.5, "ref.fits", 2),
                   NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double expect = pow(10.0, 0.4 * (25.0 - 25.5));
        CHECK(fabs(f.flux_ratio - expect) < 1e-12, "zero-point ratio %.6f vs %.6f", f.flux_ratio,
              expect);
        CHECK(f.flux_ratio_nstars == 0, "no stars used");
        CHECK(fabs(f.flux_ratio_err - expect * 0.4 * log(10.0) * 0.05) < 1e-12,
              "error from fluxscale.zp_err_mag");
        CHECK(strstr(logbuf, "zero points") != NULL, "fallback warning: %s", logbuf);
    }
    hilal_frame_clear(&f);

    /* Fallback disabled: the data error again. */
    hilal_error_clear(&err);
    st = run_chain(render(RATIO, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, 25.0, "sci.fits", 1),
                   render(1.0, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 6.0, 0, 25.5, "ref.fits", 2),
                   "fluxscale.zp_fallback=false", &f, &err);
    CHECK(st == HILAL_ERR_DATA, "fallback off: data error (%d)", (int)st);
    hilal_frame_clear(&f);

    /* Bad method name caught at init. */
    hilal_config *cfg = hilal_registry_config_new(&err);
    void *s = NULL;
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set_arg(cfg, "fluxscale.method=kron", &err), &err);
    st = hilal_stage_fluxscale.init(cfg, &s, &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "kron"), "bad method: %s", err.msg);
    hilal_config_free(cfg);
}

/* Mean of N - r R (sky-subtracted science minus ratio x sky-subtracted
 * reference) over the pixels farther than 15 px from every star, and the
 * same with the reference sky map shifted by -b(x, y). */
static double source_free_mean(const hilal_frame *f, double r)
{
    double s = 0.0;
    long n = 0;
    for (long y = 0; y < N; y++)
        for (long x = 0; x < N; x++) {
            int near = 0;
            for (int k = 0; k < NSTAR && !near; k++)
                near = fabs(x - sx[k]) < 15 && fabs(y - sy[k]) < 15;
            if (near)
                continue;
            long q = y * N + x;
            s += (f->sci->pix[q] - f->sci->sky[q]) - r * (f->ref->pix[q] - f->ref->sky[q]);
            n++;
        }
    return n > 0 ? s / n : NAN;
}

/* Differential background: the reference's sky map made too high by
 * b(x, y) = 2 ADU + 0.004 ADU/px x (x - 300) + 0.002 ADU/px x (y - 300)
 * (as a background estimate that reacts to faint sources differently in
 * the two images would), so N - r R gains r b: fluxscale brings the mean of
 * N - r R on source-free pixels back to zero, through the reference's sky
 * map, and leaves it when bg_match is off. */
static void test_background_match(void)
{
    for (int on = 0; on < 2; on++) {
        const hilal_stage *chain[4] = {&hilal_stage_background, &hilal_stage_stars,
                                       &hilal_stage_psf, &hilal_stage_fluxscale};
        void *state[4] = {NULL, NULL, NULL, NULL};
        hilal_error err;
        hilal_error_clear(&err);
        hilal_config *cfg = hilal_registry_config_new(&err);
        hilal_status st = cfg ? HILAL_OK : err.code;
        if (st == HILAL_OK && !on)
            st = hilal_config_set_arg(cfg, "fluxscale.bg_match=false", &err);
        hilal_frame f;
        hilal_frame_init(&f);
        strcpy(f.frame_id, "bgpair");
        f.sci = render(RATIO, NULL, HILAL_PSF_MOFFAT, 4.0, 3.0, 500, 0, 0, NAN, "sci.fits", 41);
        f.ref = render(1.0, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, NAN, "ref.fits", 42);
        f.products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
        for (int k = 0; k < 4 && st == HILAL_OK; k++)
            st = chain[k]->init(cfg, &state[k], &err);
        for (int k = 0; k < 4 && st == HILAL_OK; k++) {
            if (k == 2)
                f.products |= HILAL_PROD_ALIGNED;
            if (k == 3) {
                /* The bias, before the photometric match. */
                for (long y = 0; y < N; y++)
                    for (long x = 0; x < N; x++)
                        f.ref->sky[y * N + x] +=
                            (float)(2.0 + 0.004 * (x - 300) + 0.002 * (y - 300));
            }
            st = chain[k]->run(state[k], &f, &err);
        }
        CHECK_OK(st, &err);
        if (st == HILAL_OK) {
            double m = source_free_mean(&f, f.flux_ratio);
            /* Noise of the mean: sigma_D / sqrt(n) ~ 24 / 400 = 0.06 ADU. */
            if (on) {
                printf("differential background matched: mean of N - r R off sources %.3f ADU "
                       "(the bias was %.3f ADU at the centre)\n", m, RATIO * 2.0);
                CHECK(fabs(m) < 0.15, "mean of N - r R off sources %.3f ADU after matching", m);
                CHECK(hilal_stage_fluxscale.flags & HILAL_STAGE_INPLACE,
                      "fluxscale declared in place (it adjusts the reference's sky map)");
            } else {
                /* The bias r b (1.6 ADU at the centre), plus what the two
                 * mesh backgrounds themselves leave (the science Moffat
                 * wings reach farther into the meshes than the reference's
                 * Gaussian; 0.3 ADU here), which matching removes too. */
                printf("without matching: mean of N - r R off sources %.3f ADU\n", m);
                CHECK(m > 1.4 && m < 2.4, "bias %.3f ADU kept when bg_match is off", m);
            }
        }
        for (int k = 0; k < 4; k++)
            if (state[k] != NULL)
                chain[k]->fini(state[k]);
        hilal_config_free(cfg);
        hilal_frame_clear(&f);
    }
}

/* Five matched stars, one of them an outlier: the ratio of the other four,
 * not a data error. */
static void test_clipped_to_few(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    double keep_x[NSTAR], keep_y[NSTAR], keep_f[NSTAR];
    memcpy(keep_x, sx, sizeof sx);
    memcpy(keep_y, sy, sizeof sy);
    memcpy(keep_f, sf, sizeof sf);
    /* Five stars only (the rest far below the detection limit). */
    for (int k = 5; k < NSTAR; k++)
        sf[k] = 1e-3;
    double varf[NSTAR];
    for (int k = 0; k < NSTAR; k++)
        varf[k] = 1.0;
    varf[2] = 1.5;
    hilal_frame f;
    hilal_status st = run_chain(render(RATIO, varf, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, NAN,
                                       "sci.fits", 51),
                                render(1.0, NULL, HILAL_PSF_GAUSSIAN, 3.0, 0, 300, 0, 0, NAN,
                                       "ref.fits", 52),
                                NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        printf("five stars, one variable: ratio %.5f +- %.5f from %d\n", f.flux_ratio,
               f.flux_ratio_err, f.flux_ratio_nstars);
        CHECK(f.flux_ratio_nstars == 4, "the variable clipped (%d stars kept)",
              f.flux_ratio_nstars);
        CHECK(fabs(f.flux_ratio / RATIO - 1.0) < 0.01, "ratio %.5f", f.flux_ratio);
    }
    hilal_frame_clear(&f);
    memcpy(sx, keep_x, sizeof sx);
    memcpy(sy, keep_y, sizeof sy);
    memcpy(sf, keep_f, sizeof sf);
}

int main(void)
{
    hilal_log_set_handler(capture, NULL, HILAL_LOG_DEBUG);
    CHECK(hilal_registry_find("fluxscale") == &hilal_stage_fluxscale, "fluxscale registered");
    make_catalogue(7);
    test_ratio();
    test_single_outlier();
    test_too_few();
    test_background_match();
    test_clipped_to_few();
    return hilal_test_finish();
}
