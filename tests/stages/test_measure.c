/* Stage measure: sub-pixel positions (median error < 0.1 px at S/N 20-40),
 * fluxes and their errors, magnitudes, sky positions through a TAN WCS,
 * FWHM and elongation on D, and errors. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/detect.h"
#include "hilal/stats.h"
#include "test_detect_synth.h"
#include "testutil.h"

#define DEG (SYNTH_PI / 180.0)

/* Detects with the defaults (5 sigma, margin 8) into f->cands. */
static void detect(hilal_frame *f)
{
    hilal_error err = {0};
    hilal_detect_params p = {5.0, 0, 8, 100000};
    free(f->cands);
    f->cands = NULL;
    CHECK_OK(hilal_detect_peaks(&f->diff, &p, &f->cands, &f->ncands, NULL, &err), &err);
}

/* Injects a grid of sources (alternating signs, |S/N| in [lo, hi]) with
 * amplitude-to-flux scale 50 ADU, detects and measures them, and reports
 * position errors and flux pulls. */
static void accuracy_run(const char *label, const synth_model *m, int psf_size, double lo,
                         double hi, uint64_t seed, double max_median_px)
{
    hilal_error err = {0};
    hilal_frame f;
    const long nx = 640, ny = 640;
    const double scale = 50.0;
    synth_frame(&f, nx, ny, m, psf_size, seed, 1.0);
    synth_rng r = {seed * 7 + 1, 0, 0};
    enum { MAXS = 1000 };
    static double sx[MAXS], sy[MAXS], samp[MAXS], err_r[MAXS], pull[MAXS];
    int ns = 0;
    for (long gy = 24; gy < ny - 24; gy += 22)
        for (long gx = 24; gx < nx - 24; gx += 22) {
            double snr = (lo + (hi - lo) * synth_uniform(&r)) * ((ns % 2) ? -1 : 1);
            sx[ns] = gx + synth_uniform(&r) - 0.5;
            sy[ns] = gy + synth_uniform(&r) - 0.5;
            samp[ns] = synth_amp(&f, snr);
            synth_add_point(&f, m, sx[ns], sy[ns], samp[ns]);
            ns++;
        }
    synth_finish(&f, scale);
    detect(&f);
    hilal_status st = hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, f.ncands, &err);
    CHECK_OK(st, &err);
    int nm = 0;
    double mdx = 0, mdy = 0, sum_p = 0, sum_p2 = 0;
    const double err_want = scale / sqrt(synth_psf_sum2(&f.diff.psf_d));
    int err_ok = 1;
    for (int i = 0; i < ns; i++) {
        const hilal_candidate *c = synth_match(&f, sx[i] + 1, sy[i] + 1, 2.0);
        if (c == NULL)
            continue;
        double dx = c->x - (sx[i] + 1), dy = c->y - (sy[i] + 1);
        mdx += dx;
        mdy += dy;
        err_r[nm] = sqrt(dx * dx + dy * dy);
        pull[nm] = (c->flux - scale * samp[i]) / c->flux_err;
        sum_p += pull[nm];
        sum_p2 += pull[nm] * pull[nm];
        err_ok &= fabs(c->flux_err - err_want) < 1e-3 * err_want;
        nm++;
    }
    CHECK(nm == ns, "%s: all %d sources measured (%d)", label, ns, nm);
    if (nm == 0)
        return;
    double med = hilal_median_double(err_r, (size_t)nm);
    double mean_p = sum_p / nm, sd_p = sqrt(sum_p2 / nm - mean_p * mean_p);
    printf("%s: %d sources S/N %.0f-%.0f: median position error %.4f px, bias (%+.4f, %+.4f) px, "
           "flux pull mean %+.3f sd %.3f\n",
           label, nm, lo, hi, med, mdx / nm, mdy / nm, mean_p, sd_p);
    CHECK(med < max_median_px, "%s: median position error %.4f px", label, med);
    CHECK(fabs(mdx / nm) < 0.02 && fabs(mdy / nm) < 0.02, "%s: position bias (%g, %g)", label,
          mdx / nm, mdy / nm);
    /* The flux at the measured position is the PSF flux (unbiased, error
     * flux_err): pulls have mean ~0 and standard deviation ~1. */
    CHECK(fabs(mean_p) < 0.2, "%s: flux pull mean %g", label, mean_p);
    CHECK(sd_p > 0.8 && sd_p < 1.3, "%s: flux pull sd %g", label, sd_p);
    CHECK(err_ok, "%s: flux_err is the flux error image (%g ADU)", label, err_want);
    hilal_frame_clear(&f);
}

static void test_accuracy(void)
{
    synth_model g = synth_gaussian(1.5);
    accuracy_run("gaussian FWHM 3.5", &g, 15, 20, 40, 11, 0.1);
    accuracy_run("gaussian FWHM 3.5, bright", &g, 15, 80, 120, 12, 0.03);
    synth_model mof = {1, 0, 0, 0, 2.5, 3.0}; /* Moffat beta 3, FWHM 2.55 px */
    accuracy_run("moffat FWHM 2.5", &mof, 21, 20, 40, 13, 0.1);
    synth_model wide = synth_gaussian(2.5); /* FWHM 5.9 px */
    accuracy_run("gaussian FWHM 5.9", &wide, 25, 20, 40, 14, 0.15);
}

/* Shape on D: FWHM of round sources equals FWHM(P_D) measured the same way;
 * sources more elongated than P_D show it. */
static void test_shape(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_model ell = {0, 2.0, 1.0, 0.5, 0, 0};
    synth_frame(&f, 200, 100, &m, 15, 21, 1.0);
    synth_add_point(&f, &m, 50.3, 50.6, synth_amp(&f, 150));
    synth_add_point(&f, &ell, 150.0, 50.0, -synth_amp(&f, 150));
    synth_finish(&f, 1.0);
    detect(&f);
    CHECK_OK(hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, f.ncands, &err), &err);
    hilal_vet_psfinfo info;
    CHECK_OK(hilal_vet_psfinfo_get(&f.diff.psf_d, 1.5, &info, &err), &err);
    /* Pixel-integrated Gaussian: sigma^2 + 1/12. */
    double want = 2.3548200450309493 * sqrt(1.5 * 1.5 + 1.0 / 12.0);
    CHECK(fabs(info.fwhm_px - want) < 0.02 * want, "FWHM(P_D) %g, want %g", info.fwhm_px, want);
    const hilal_candidate *round = synth_match(&f, 51.3, 51.6, 1);
    const hilal_candidate *elong = synth_match(&f, 151, 51, 1);
    CHECK(round != NULL && elong != NULL, "both detected (%zu candidates)", f.ncands);
    if (round != NULL && elong != NULL) {
        printf("shape: round FWHM %.3f px (P_D %.3f) elongation %.3f; elongated source FWHM %.3f "
               "elongation %.3f (want %.3f)\n",
               round->fwhm, info.fwhm_px, round->elongation, elong->fwhm, elong->elongation,
               sqrt((4.0 + 1.0 / 12) / (1.0 + 1.0 / 12)));
        CHECK(fabs(round->fwhm / info.fwhm_px - 1) < 0.05, "round FWHM %g vs %g", round->fwhm,
              info.fwhm_px);
        CHECK(round->elongation < 1.1, "round elongation %g", round->elongation);
        double we = sqrt((4.0 + 1.0 / 12) / (1.0 + 1.0 / 12));
        CHECK(fabs(elong->elongation / we - 1) < 0.1, "elongation %g, want %g", elong->elongation,
              we);
        double wf = 2.3548200450309493 * sqrt(sqrt((4.0 + 1.0 / 12) * (1.0 + 1.0 / 12)));
        CHECK(fabs(elong->fwhm / wf - 1) < 0.1, "elongated FWHM %g, want %g (fading, sign "
              "corrected)", elong->fwhm, wf);
    }
    hilal_frame_clear(&f);

    /* A single-pixel spike is narrower than any PSF. */
    double fw, el;
    float img[11 * 11] = {0};
    img[5 * 11 + 5] = 10;
    hilal_measure_shape(img, 11, 11, NULL, 5, 5, 1, 2.0, NULL, 0, &fw, &el);
    CHECK(fabs(fw - 2.3548200450309493 * sqrt(1.0 / 12)) < 1e-6 && el == 1,
          "spike FWHM is the one-pixel floor: %g", fw);
    img[5 * 11 + 5] = -10;
    hilal_measure_shape(img, 11, 11, NULL, 5, 5, 1, 2.0, NULL, 0, &fw, &el);
    CHECK(isnan(fw) && isnan(el), "no positive flux: NaN shape");
}

static void add_card(char *hdr, const char *key, const char *val)
{
    char card[81];
    snprintf(card, sizeof card, "%-8s= %-70s", key, val);
    strcat(hdr, card);
}

/* Magnitudes, sky positions, mjd; and their absence. */
static void test_metadata(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 300, 300, &m, 15, 31, 1.0);
    synth_add_point(&f, &m, 149.5, 149.5, synth_amp(&f, 60)); /* FITS (150.5, 150.5) */
    synth_add_point(&f, &m, 249.2, 199.7, synth_amp(&f, -40));
    synth_finish(&f, 20.0);
    detect(&f);
    CHECK(f.ncands == 2, "two candidates: %zu", f.ncands);

    /* Without zero point and WCS: NaN, but mjd and flux set. */
    f.sci->meta.mjd = 60000.25;
    CHECK_OK(hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, f.ncands, &err), &err);
    for (size_t k = 0; k < f.ncands; k++) {
        CHECK(isnan(f.cands[k].mag) && isnan(f.cands[k].mag_err), "no zero point: NaN mag");
        CHECK(isnan(f.cands[k].ra) && isnan(f.cands[k].dec), "no WCS: NaN ra/dec");
        CHECK(f.cands[k].mjd == 60000.25, "mjd from the science frame");
        CHECK(isfinite(f.cands[k].flux) && (f.cands[k].flux > 0) == (f.cands[k].snr > 0),
              "signed flux %g for snr %g", f.cands[k].flux, f.cands[k].snr);
    }

    /* With a zero point and a TAN WCS (1"/px, north up, east left). */
    char hdr[81 * 16] = "";
    add_card(hdr, "NAXIS", "2");
    add_card(hdr, "NAXIS1", "300");
    add_card(hdr, "NAXIS2", "300");
    add_card(hdr, "CTYPE1", "'RA---TAN'");
    add_card(hdr, "CTYPE2", "'DEC--TAN'");
    add_card(hdr, "CRPIX1", "150.5");
    add_card(hdr, "CRPIX2", "150.5");
    add_card(hdr, "CRVAL1", "150.0");
    add_card(hdr, "CRVAL2", "2.0");
    add_card(hdr, "CD1_1", "-2.777777777777778E-4");
    add_card(hdr, "CD1_2", "0.0");
    add_card(hdr, "CD2_1", "0.0");
    add_card(hdr, "CD2_2", "2.777777777777778E-4");
    add_card(hdr, "RADESYS", "'ICRS'");
    char end[81];
    snprintf(end, sizeof end, "%-80s", "END");
    strcat(hdr, end);
    CHECK_OK(hilal_wcs_from_header(hdr, 15, &f.sci->meta.wcs, &err), &err);
    CHECK(f.sci->meta.wcs != NULL, "TAN WCS parsed");
    f.sci->meta.zeropoint_mag = 25.0;
    CHECK_OK(hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, f.ncands, &err), &err);
    for (size_t k = 0; k < f.ncands; k++) {
        const hilal_candidate *c = &f.cands[k];
        double want_mag = 25.0 - 2.5 * log10(fabs(c->flux));
        CHECK(fabs(c->mag - want_mag) < 1e-12, "mag %g vs %g", c->mag, want_mag);
        CHECK(fabs(c->mag_err - 1.0857362 * c->flux_err / fabs(c->flux)) < 1e-6, "mag_err %g",
              c->mag_err);
        /* Gnomonic projection inverted by hand: standard coordinates
         * (xi, eta) = CD (p - CRPIX) in radians,
         * dec = asin((sin d0 + eta cos d0) / sqrt(1 + xi^2 + eta^2)),
         * ra = a0 + atan2(xi, cos d0 - eta sin d0). */
        double xi = -2.777777777777778e-4 * (c->x - 150.5) * DEG;
        double eta = 2.777777777777778e-4 * (c->y - 150.5) * DEG;
        double d0 = 2.0 * DEG, a0 = 150.0 * DEG;
        double dec = asin((sin(d0) + eta * cos(d0)) / sqrt(1 + xi * xi + eta * eta)) / DEG;
        double ra = (a0 + atan2(xi, cos(d0) - eta * sin(d0))) / DEG;
        CHECK(fabs(c->ra - ra) < 1e-9 && fabs(c->dec - dec) < 1e-9,
              "ra/dec (%.9f, %.9f) vs (%.9f, %.9f)", c->ra, c->dec, ra, dec);
    }
    /* The bright source sits on CRPIX (within the position error): its sky
     * position is CRVAL; the other's magnitude follows from its flux. */
    const hilal_candidate *c0 = synth_match(&f, 150.5, 150.5, 0.5);
    CHECK(c0 != NULL && fabs(c0->ra - 150.0) * 3600 < 0.1 && fabs(c0->dec - 2.0) * 3600 < 0.1,
          "source at CRPIX at CRVAL: (%.7f, %.7f)", c0 ? c0->ra : 0, c0 ? c0->dec : 0);
    const hilal_candidate *c1 = synth_match(&f, 250.2, 200.7, 0.5);
    double true_flux = -20.0 * synth_amp(&f, 40);
    CHECK(c1 != NULL && c1->flux < 0 &&
              fabs(c1->mag - (25 - 2.5 * log10(-true_flux))) < 3 * c1->mag_err,
          "fading source: mag %g +- %g, true %g", c1 ? c1->mag : 0, c1 ? c1->mag_err : 0,
          25 - 2.5 * log10(-true_flux));
    hilal_frame_clear(&f);
}

static void test_errors_and_stage(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 64, 64, &m, 15, 41, 1.0);
    synth_add_point(&f, &m, 32, 32, synth_amp(&f, 30));
    synth_finish(&f, 1.0);
    detect(&f);
    hilal_status st = hilal_measure_candidates(&f.diff, NULL, 1.5, f.cands, f.ncands, &err);
    CHECK(st == HILAL_ERR_INTERNAL && strstr(err.msg, "science") != NULL, "no science: %s",
          err.msg);
    hilal_error_clear(&err);
    float *keep = f.diff.psf_d.data;
    f.diff.psf_d.data = NULL;
    f.diff.psf_d.fwhm_px = NAN;
    st = hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, f.ncands, &err);
    CHECK(st == HILAL_ERR_DATA && strstr(err.msg, "P_D") != NULL, "no P_D: %s", err.msg);
    f.diff.psf_d.data = keep;
    f.diff.psf_d.fwhm_px = 3.5322;
    hilal_error_clear(&err);

    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    const hilal_stage *stage = hilal_registry_find("measure");
    CHECK(stage != NULL && (stage->needs & HILAL_PROD_CANDIDATES) &&
              stage->makes == HILAL_PROD_MEASURED,
          "measure registered, needs CANDIDATES, makes MEASURED");
    if (cfg != NULL && stage != NULL) {
        CHECK(hilal_config_get_double(cfg, "measure.weight_scale") == 1.5, "default weight");
        void *state = NULL;
        CHECK_OK(stage->init(cfg, &state, &err), &err);
        f.sci->meta.mjd = 59000.5;
        CHECK_OK(stage->run(state, &f, &err), &err);
        CHECK(f.ncands == 1 && fabs(f.cands[0].x - 33) < 0.2 && fabs(f.cands[0].y - 33) < 0.2 &&
                  f.cands[0].mjd == 59000.5,
              "measured through the stage: (%g, %g)", f.ncands ? f.cands[0].x : 0,
              f.ncands ? f.cands[0].y : 0);
        stage->fini(state);
    }
    hilal_config_free(cfg);
    hilal_frame_clear(&f);
}

/* Measuring with 1, 2, 3 and 7 threads gives the same bytes as the library
 * call, on a crowded frame (neighbours within each other's shape windows). */
static void test_threads(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    const long nx = 300, ny = 220;
    synth_frame(&f, nx, ny, &m, 15, 61, 1.0);
    synth_rng r = {62, 0, 0};
    for (int k = 0; k < 300; k++) {
        double snr = 6.0 * exp(log(10.0) * synth_uniform(&r));
        synth_add_point(&f, &m, 10 + (nx - 20) * synth_uniform(&r), 10 + (ny - 20) * synth_uniform(&r),
                        (k % 4 == 0 ? -1 : 1) * synth_amp(&f, snr));
    }
    synth_finish(&f, 50.0);
    f.sci->meta.zeropoint_mag = 25.0;
    f.sci->meta.mjd = 60001.25;
    detect(&f);
    const size_t n = f.ncands;
    hilal_candidate *found = malloc(n * sizeof *found), *ref = malloc(n * sizeof *ref);
    memcpy(found, f.cands, n * sizeof *found);
    CHECK_OK(hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, n, &err), &err);
    memcpy(ref, f.cands, n * sizeof *ref);
    size_t shaped = 0;
    for (size_t k = 0; k < n; k++)
        shaped += isfinite(ref[k].fwhm);
    CHECK(n > 150 && shaped > n / 2, "%zu candidates, %zu with a shape", n, shaped);
    hilal_config *cfg = hilal_registry_config_new(&err);
    const hilal_stage *stage = hilal_registry_find("measure");
    const char *threads[] = {"1", "2", "3", "7"};
    for (size_t t = 0; t < sizeof threads / sizeof threads[0] && cfg != NULL; t++) {
        void *state = NULL;
        CHECK_OK(hilal_config_set(cfg, "pipeline.threads", threads[t], "test", &err), &err);
        CHECK_OK(stage->init(cfg, &state, &err), &err);
        memcpy(f.cands, found, n * sizeof *found);
        CHECK_OK(stage->run(state, &f, &err), &err);
        CHECK(memcmp(f.cands, ref, n * sizeof *ref) == 0, "%s threads: the same measurements",
              threads[t]);
        stage->fini(state);
    }
    hilal_config_free(cfg);
    free(found);
    free(ref);
    hilal_frame_clear(&f);
}

int main(void)
{
    test_accuracy();
    test_shape();
    test_metadata();
    test_errors_and_stage();
    test_threads();
    return hilal_test_finish();
}
