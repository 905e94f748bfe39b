/* background stage: SExtractor reference maps on a real frame, variance of
 * a synthetic flat with known gain and read noise, NaN and mask handling,
 * non-positive variance, error paths. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fits.h"
#include "hilal/hilal.h"
#include "synth_rng.h"
#include "testutil.h"

extern const hilal_stage hilal_stage_background;

static char logbuf[8192];
static void capture(hilal_log_level level, const char *msg, void *user)
{
    (void)user;
    if (level <= HILAL_LOG_WARN && strlen(logbuf) + strlen(msg) + 2 < sizeof logbuf) {
        strcat(logbuf, msg);
        strcat(logbuf, "\n");
    }
}

/* Runs the background stage on a frame made of sci and a copy of it. */
static hilal_status run_background(hilal_image *sci, const char *set1, const char *set2,
                                   hilal_frame *f, hilal_error *err)
{
    hilal_config *cfg = hilal_registry_config_new(err);
    void *state = NULL;
    hilal_status st = cfg ? HILAL_OK : err->code;
    if (st == HILAL_OK && set1 != NULL)
        st = hilal_config_set_arg(cfg, set1, err);
    if (st == HILAL_OK && set2 != NULL)
        st = hilal_config_set_arg(cfg, set2, err);
    hilal_frame_init(f);
    strcpy(f->frame_id, "test");
    f->sci = sci;
    f->ref = hilal_image_clone(sci, err);
    f->products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    if (st == HILAL_OK && f->ref == NULL)
        st = err->code;
    if (st == HILAL_OK)
        st = hilal_stage_background.init(cfg, &state, err);
    if (st == HILAL_OK)
        st = hilal_stage_background.run(state, f, err);
    hilal_stage_background.fini(state);
    hilal_config_free(cfg);
    return st;
}

/* 1. The ESO EMMI frame against SExtractor's BACKGROUND and
 *    BACKGROUND_RMS check images (mesh 64, filter 3, as the reference was
 *    made). Without source masking the algorithm is SExtractor's, so the
 *    maps must agree to float precision; with masking the sky may only
 *    move by a small fraction of the noise. */
static void test_sextractor_reference(void)
{
    char p1[4096], p2[4096], p3[4096];
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL, *back = NULL, *rms = NULL;
    hilal_status st = hilal_fits_read_image(hilal_test_data("sep_emmi/image.fits", p1, sizeof p1),
                                            0, &img, &err);
    CHECK_OK(st, &err);
    st = hilal_fits_read_image(hilal_test_data("sep_emmi/back.fits", p2, sizeof p2), 0, &back,
                               &err);
    CHECK_OK(st, &err);
    st = hilal_fits_read_image(hilal_test_data("sep_emmi/rms.fits", p3, sizeof p3), 0, &rms, &err);
    CHECK_OK(st, &err);
    if (img == NULL || back == NULL || rms == NULL)
        goto done;
    CHECK(img->nx == 256 && img->ny == 256, "EMMI frame is %ldx%ld", img->nx, img->ny);

    /* gain unknown: var = rms^2 exactly, so sqrt(var) is the RMS map. */
    hilal_image *copy = hilal_image_clone(img, &err);
    hilal_frame f;
    logbuf[0] = '\0';
    st = run_background(copy, "background.mask_sources=false", "background.rms_clip_correction=false",
                        &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double maxrel_b = 0.0, maxrel_r = 0.0, mean_rms = 0.0;
        for (long i = 0; i < img->nx * img->ny; i++) {
            double b = back->pix[i], r = rms->pix[i];
            maxrel_b = fmax(maxrel_b, fabs(f.sci->sky[i] - b) / fabs(b));
            maxrel_r = fmax(maxrel_r, fabs(sqrt(f.sci->var[i]) - r) / r);
            mean_rms += r;
        }
        mean_rms /= (double)(img->nx * img->ny);
        printf("EMMI vs SExtractor: max rel. diff background %.2e, rms %.2e; global rms %.3f "
               "(SExtractor map mean %.3f)\n",
               maxrel_b, maxrel_r, f.sci->sky_rms_adu, mean_rms);
        CHECK(maxrel_b < 1e-5, "background differs from SExtractor by %.3g (relative)", maxrel_b);
        CHECK(maxrel_r < 1e-4, "rms differs from SExtractor by %.3g (relative)", maxrel_r);
        CHECK(fabs(f.sci->sky_rms_adu - mean_rms) < 0.02 * mean_rms, "global rms %.3f vs %.3f",
              f.sci->sky_rms_adu, mean_rms);
        CHECK(f.products & HILAL_PROD_BACKGROUND, "BACKGROUND product set");
        CHECK(f.ref->sky != NULL && f.ref->var != NULL, "reference planes filled too");
        CHECK(strstr(logbuf, "gain unknown") != NULL, "warning about the unknown gain: %s",
              logbuf);
    }
    hilal_frame_clear(&f);

    /* Defaults (sources masked on the 2x2-binned image, which also gives
     * the maps; the RMS map scaled to the robust RMS of the full-resolution
     * pixels): the sky within a small fraction of the noise of
     * SExtractor's, the RMS SExtractor's / 0.98658 within 15% (2.4% low
     * overall on this frame; the corner mesh next to the bright galaxy
     * differs most, its binned mesh having a quarter of the pixels). */
    copy = hilal_image_clone(img, &err);
    st = run_background(copy, NULL, NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double maxdiff = 0.0, maxrel_r = 0.0;
        for (long i = 0; i < img->nx * img->ny; i++) {
            maxdiff = fmax(maxdiff, fabs(f.sci->sky[i] - back->pix[i]) / rms->pix[i]);
            maxrel_r = fmax(maxrel_r, fabs(sqrt(f.sci->var[i]) * 0.98658 / rms->pix[i] - 1.0));
        }
        printf("EMMI with defaults: max |sky - SExtractor| = %.3f rms, max rel. diff of "
               "0.98658 rms %.3f\n",
               maxdiff, maxrel_r);
        CHECK(maxdiff < 0.25, "masked-source background departs by %.3f rms", maxdiff);
        CHECK(maxrel_r < 0.15, "corrected rms departs by %.3f", maxrel_r);
    }
    hilal_frame_clear(&f);

done:
    hilal_image_free(img);
    hilal_image_free(back);
    hilal_image_free(rms);
}

/* A flat sky with Gaussian noise of the right variance for a given gain
 * and read noise. */
static hilal_image *flat(long n, double sky, double gain, double rn, uint64_t seed)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = hilal_image_new(n, n, &err);
    if (img == NULL)
        return NULL;
    rng_state = seed;
    double sigma = sqrt(sky / gain + (rn / gain) * (rn / gain));
    for (long i = 0; i < n * n; i++)
        img->pix[i] = (float)(sky + sigma * rng_gauss());
    img->meta.gain_e_per_adu = gain;
    img->meta.rdnoise_e = rn;
    snprintf(img->meta.path, sizeof img->meta.path, "synthetic-flat.fits");
    return img;
}

/* 2. Variance of a flat: mean(var) = sky/gain + (rn/gain)^2 within 2%. */
static void test_flat_variance(void)
{
    const double sky = 1000.0, gain = 2.0, rn = 5.0;
    const double expect = sky / gain + (rn / gain) * (rn / gain);
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    hilal_status st = run_background(flat(256, sky, gain, rn, 42), NULL, NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double mv = 0.0, ms = 0.0;
        long n = f.sci->nx * f.sci->ny;
        for (long i = 0; i < n; i++) {
            mv += f.sci->var[i];
            ms += f.sci->sky[i];
        }
        mv /= n;
        ms /= n;
        printf("flat: mean var %.2f ADU^2 (expected %.2f), mean sky %.2f, global rms %.3f\n", mv,
               expect, ms, f.sci->sky_rms_adu);
        CHECK(fabs(mv / expect - 1.0) < 0.02, "mean variance %.2f vs %.2f", mv, expect);
        CHECK(fabs(ms - sky) < 0.05 * sqrt(expect), "mean sky %.3f vs %.1f", ms, sky);
        CHECK(fabs(f.sci->sky_rms_adu / sqrt(expect) - 1.0) < 0.02, "global rms %.3f vs %.3f",
              f.sci->sky_rms_adu, sqrt(expect));
    }
    hilal_frame_clear(&f);

    /* Source Poisson term on a star: var - rms^2 = (pix - sky)/gain. */
    hilal_image *img = flat(256, sky, gain, rn, 43);
    if (img != NULL) {
        for (int j = -1; j <= 1; j++)
            for (int i = -1; i <= 1; i++)
                img->pix[(128 + j) * 256 + 128 + i] += 5000.0f;
        st = run_background(img, "background.mask_sources=false", NULL, &f, &err);
        CHECK_OK(st, &err);
        if (st == HILAL_OK) {
            long q = 128 * 256 + 128;
            double src = f.sci->pix[q] - f.sci->sky[q];
            double bgvar = f.sci->var[q] - src / gain;
            CHECK(fabs(bgvar / expect - 1.0) < 0.05,
                  "variance on a star minus (pix-sky)/gain = %.2f, expected ~%.2f", bgvar, expect);
        }
        hilal_frame_clear(&f);
    }

    /* Unknown gain: background variance only. */
    img = flat(256, sky, gain, rn, 44);
    if (img != NULL) {
        img->meta.gain_e_per_adu = NAN;
        logbuf[0] = '\0';
        st = run_background(img, NULL, NULL, &f, &err);
        CHECK_OK(st, &err);
        if (st == HILAL_OK) {
            double mv = 0.0;
            long n = f.sci->nx * f.sci->ny;
            for (long i = 0; i < n; i++)
                mv += f.sci->var[i];
            mv /= n;
            CHECK(fabs(mv / expect - 1.0) < 0.02, "no gain: mean variance %.2f vs %.2f", mv,
                  expect);
            CHECK(strstr(logbuf, "synthetic-flat.fits: gain unknown") != NULL,
                  "warning names the file: %s", logbuf);
        }
        hilal_frame_clear(&f);
    }
}

/* 3. NaN and masked pixels: SEP never sees them, the sky stays finite,
 *    var is 1e30 there, unflagged NaN gets NODATA, and the sky elsewhere is
 *    what it would be without them. */
static void test_nan_and_mask(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f0, f;
    hilal_status st = run_background(flat(256, 500.0, 1.5, 4.0, 7), NULL, NULL, &f0, &err);
    CHECK_OK(st, &err);
    hilal_image *img = flat(256, 500.0, 1.5, 4.0, 7);
    if (img == NULL || st != HILAL_OK)
        return;
    /* A flagged no-data block, an unflagged NaN column, saturated pixels
     * with absurd values. */
    for (long y = 10; y < 60; y++)
        for (long x = 10; x < 60; x++) {
            img->pix[y * 256 + x] = NAN;
            img->mask[y * 256 + x] = HILAL_MASK_NODATA;
        }
    for (long y = 0; y < 256; y++)
        img->pix[y * 256 + 200] = NAN;
    for (long x = 100; x < 110; x++) {
        img->pix[150 * 256 + x] = 1e9f;
        img->mask[150 * 256 + x] = HILAL_MASK_SAT;
    }
    st = run_background(img, NULL, NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        int finite = 1, var_ok = 1, nodata_ok = 1;
        double maxdiff = 0.0;
        for (long i = 0; i < 256 * 256; i++) {
            finite &= isfinite(f.sci->sky[i]) && isfinite(f.sci->var[i]) && f.sci->var[i] > 0.0f;
            int masked = (f.sci->mask[i] & HILAL_MASK_UNUSABLE) != 0;
            if (masked)
                var_ok &= f.sci->var[i] == 1e30f;
            maxdiff = fmax(maxdiff, fabs(f.sci->sky[i] - f0.sci->sky[i]));
        }
        for (long y = 0; y < 256; y++)
            nodata_ok &= (f.sci->mask[y * 256 + 200] & HILAL_MASK_NODATA) != 0;
        CHECK(finite, "sky and var finite and positive everywhere");
        CHECK(var_ok, "masked pixels have var = 1e30");
        CHECK(nodata_ok, "unflagged NaN pixels flagged NODATA");
        CHECK(maxdiff < 0.3 * f0.sci->sky_rms_adu,
              "masked pixels moved the sky by %.3f ADU (rms %.3f)", maxdiff, f0.sci->sky_rms_adu);
        CHECK(fabs(f.sci->sky_rms_adu / f0.sci->sky_rms_adu - 1.0) < 0.02,
              "global rms %.3f vs %.3f", f.sci->sky_rms_adu, f0.sci->sky_rms_adu);
    }
    hilal_frame_clear(&f);
    hilal_frame_clear(&f0);
}

/* 4. Images without a measurable background: a constant image (zero RMS)
 *    and an entirely masked one are data errors naming the file. */
static void test_degenerate(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    hilal_image *img = flat(128, 800.0, 2.0, 5.0, 9);
    if (img == NULL)
        return;
    for (long i = 0; i < 128 * 128; i++)
        img->pix[i] = 800.0f;
    hilal_status st = run_background(img, NULL, NULL, &f, &err);
    CHECK(st == HILAL_ERR_DATA, "constant image: status %d (%s)", (int)st, err.msg);
    CHECK(strstr(err.msg, "synthetic-flat.fits") && strstr(err.msg, "background RMS"),
          "message: %s", err.msg);
    hilal_frame_clear(&f);

    img = flat(64, 800.0, 2.0, 5.0, 10);
    if (img == NULL)
        return;
    for (long i = 0; i < 64 * 64; i++)
        img->mask[i] = HILAL_MASK_BAD;
    hilal_error_clear(&err);
    st = run_background(img, NULL, NULL, &f, &err);
    CHECK(st == HILAL_ERR_DATA, "all-masked image: status %d", (int)st);
    CHECK(strstr(err.msg, "synthetic-flat.fits") && strstr(err.msg, "every pixel is masked"),
          "message: %s", err.msg);
    hilal_frame_clear(&f);
}

static void test_descriptor(void)
{
    CHECK(strcmp(hilal_stage_background.name, "background") == 0, "name");
    CHECK(hilal_stage_background.flags & HILAL_STAGE_INPLACE, "declared in place");
    CHECK(hilal_stage_background.makes == HILAL_PROD_BACKGROUND, "makes BACKGROUND");
    CHECK(hilal_registry_find("background") == &hilal_stage_background, "registered");
    hilal_error err;
    hilal_error_clear(&err);
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL && hilal_config_get_int(cfg, "background.mesh_px") == 64 &&
              hilal_config_get_int(cfg, "background.filter_size") == 3,
          "defaults mesh 64, filter 3");
    hilal_status st = hilal_config_set_arg(cfg, "background.mesh_px=2", &err);
    CHECK(st == HILAL_ERR_CONFIG, "mesh_px below range rejected (%d)", (int)st);
    hilal_config_free(cfg);
}

/* 5. Correlated noise (each pixel the sum of a 2x2 block of white noise,
 *    halved: the same per-pixel RMS as the white noise, but neighbours
 *    correlated, as in resampled or stacked images). The maps come from
 *    the 2x2-binned image, whose noise is then not half the pixels';
 *    the RMS is scaled to the pixels' own robust RMS, so sky_rms_adu and
 *    the variance plane still give the per-pixel noise. */
static void test_correlated_noise(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    const long n = 256;
    const double sigma = 20.0;
    hilal_image *img = hilal_image_new(n, n, &err);
    double *w = malloc((size_t)(n + 1) * (n + 1) * sizeof *w);
    if (img == NULL || w == NULL) {
        free(w);
        hilal_image_free(img);
        return;
    }
    rng_state = 31;
    for (long i = 0; i < (n + 1) * (n + 1); i++)
        w[i] = sigma * rng_gauss();
    for (long y = 0; y < n; y++)
        for (long x = 0; x < n; x++)
            img->pix[y * n + x] = (float)(700.0 + 0.5 * (w[y * (n + 1) + x] + w[y * (n + 1) + x + 1] +
                                                        w[(y + 1) * (n + 1) + x] +
                                                        w[(y + 1) * (n + 1) + x + 1]));
    free(w);
    snprintf(img->meta.path, sizeof img->meta.path, "correlated.fits");
    /* The actual per-pixel RMS of this realisation. */
    double s = 0.0, s2 = 0.0;
    for (long i = 0; i < n * n; i++) {
        s += img->pix[i];
        s2 += (double)img->pix[i] * img->pix[i];
    }
    double rms = sqrt(s2 / (n * n) - (s / (n * n)) * (s / (n * n)));
    hilal_frame f;
    hilal_status st = run_background(img, NULL, NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double mv = 0.0;
        for (long i = 0; i < n * n; i++)
            mv += sqrt(f.sci->var[i]);
        mv /= (double)(n * n);
        printf("correlated noise: pixel RMS %.3f, sky_rms_adu %.3f, mean sqrt(var) %.3f\n", rms,
               f.sci->sky_rms_adu, mv);
        CHECK(fabs(f.sci->sky_rms_adu / rms - 1.0) < 0.03, "global RMS %.3f vs %.3f",
              f.sci->sky_rms_adu, rms);
        CHECK(fabs(mv / rms - 1.0) < 0.05, "RMS map %.3f vs %.3f", mv, rms);
    }
    hilal_frame_clear(&f);
}

int main(void)
{
    hilal_log_set_handler(capture, NULL, HILAL_LOG_DEBUG);
    test_descriptor();
    test_sextractor_reference();
    test_flat_variance();
    test_nan_and_mask();
    test_degenerate();
    test_correlated_noise();
    return hilal_test_finish();
}
