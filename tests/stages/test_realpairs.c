/* Real pairs through the chain (testdata/README.md, sections
 * lt_rise_lhs3250 and decam_n6_sfft; docs/zogy.md):
 *  - Liverpool Telescope RISE frame 21 against frame 1 (offset by about 97
 *    px, TAN WCS): S_corr on source-free pixels has a standard deviation
 *    below 1.2 (after the noise calibration; the white-noise model alone
 *    gives about 1.25, from a flat-field pattern fixed on the detector), and
 *    no star below the non-linear regime leaves a residual: |S_corr| < 5 at
 *    the centre of every matched star with a peak below 8000 ADU but one,
 *    explained below;
 *  - DECam N6 stacks (TPV WCS): processed end to end with sensible S_corr
 *    statistics, and the proper difference image agrees with the noise-
 *    decorrelated SFFT difference shipped with the data (correlation of the
 *    two images, the same strongest residuals). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fits.h"
#include "hilal/zogy.h"
#include "run_until.h"
#include "testutil.h"

static void test_lt(void)
{
    hilal_error err = {0};
    char sci[1024], ref[1024];
    hilal_test_data("lt_rise_lhs3250/q_e_20200830_1_21_1_1.fits.gz", sci, sizeof sci);
    hilal_test_data("lt_rise_lhs3250/q_e_20200830_1_1_1_1.fits.gz", ref, sizeof ref);
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    if (cfg == NULL)
        return;
    /* RISE headers carry GAIN but no RDNOISE, which ingest requires (the
     * chain measures the background noise itself) */
    CHECK_OK(hilal_config_set(cfg, "ingest.rdnoise", "10", "test", &err), &err);
    hilal_frame f;
    hilal_status st = run_until_paths(cfg, "real", sci, ref, "detect", &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        const hilal_diff *d = &f.diff;
        const hilal_diff_tile *t = hilal_diff_tile_at(d, 515.0, 513.0);
        printf("LT 21 - 1: S_corr median %.3f std %.3f (white-noise model %.3f), %ld x %ld "
               "tile(s), %zu candidates\n",
               d->scorr_mean, d->scorr_std, t ? t->scorr_std_model : NAN, d->ntiles_x,
               d->ntiles_y, f.ncands);
        CHECK(d->scorr_std < 1.2 && d->scorr_std > 0.85 && fabs(d->scorr_mean) < 0.15,
              "LT: S_corr median %.3f std %.3f on source-free pixels (std < 1.2 required)",
              d->scorr_mean, d->scorr_std);
        CHECK(t != NULL && t->scorr_std_model > 1.1 && t->scorr_std_model < 1.5 &&
                  t->noise_scale > 1.1,
              "LT: the white-noise model is off by the detector pattern (S_corr std %.3f under "
              "the model, scaled by %.3f)",
              t ? t->scorr_std_model : NAN, t ? t->noise_scale : NAN);
        /* No residual at the stars matched in both frames. Two kinds are
         * set apart and checked for what they are:
         *  - stars with a peak above 8000 ADU: RISE compresses the brightest
         *    pixels (the two stars peaking at 25000 ADU are 4-5% fainter in
         *    aperture photometry of frame 21 than the others), which leaves a
         *    negative residual concentrated in the star's central pixel;
         *  - the star at (820, 519), 4% brighter in frame 21 than the flux
         *    ratio of the other stars predicts (aperture photometry; the
         *    frames were flattened with a dummy flat, so stars landing on
         *    other detector pixels can differ by a few per cent, or it
         *    varies): a positive residual of the star's shape. */
        int nstars = 0, nres = 0, nbright = 0, bright_ok = 0, odd_ok = 0;
        double worst = 0;
        for (size_t i = 0; i < f.sci_stars.n; i++) {
            const hilal_star *s = &f.sci_stars.stars[i];
            if (!s->usable || s->flux_adu / s->flux_err_adu < 50)
                continue;
            int matched = 0;
            for (size_t j = 0; j < f.ref_stars.n && !matched; j++)
                matched = hypot(f.ref_stars.stars[j].x - s->x, f.ref_stars.stars[j].y - s->y) < 1.5;
            long ix = lround(s->x - 1), iy = lround(s->y - 1);
            if (!matched || ix < 1 || iy < 1 || ix >= d->nx - 1 || iy >= d->ny - 1)
                continue;
            size_t k = (size_t)iy * (size_t)d->nx + (size_t)ix;
            if (d->mask[k] & (HILAL_MASK_UNUSABLE | HILAL_MASK_INTERP))
                continue;
            double v = d->scorr[k];
            if (s->peak_adu > 8000) {
                /* the central pixel stands out of its neighbours */
                double nb = 0.25 * (d->scorr[k - 1] + d->scorr[k + 1] + d->scorr[k - d->nx] +
                                    d->scorr[k + d->nx]);
                nbright++;
                bright_ok += v < -3 && v < 2 * nb;
                printf("star (%.1f, %.1f), peak %.0f ADU: S_corr %.1f at the centre, %.1f around\n",
                       s->x, s->y, s->peak_adu, v, nb);
                continue;
            }
            if (hypot(s->x - 820, s->y - 519) < 3) {
                odd_ok = v > 3 && v < 12;
                printf("star (%.1f, %.1f): S_corr %.1f\n", s->x, s->y, v);
                continue;
            }
            nstars++;
            worst = fabs(v) > worst ? fabs(v) : worst;
            if (fabs(v) >= 5) {
                nres++;
                printf("residual %.1f sigma at the star (%.1f, %.1f), peak %.0f ADU\n", v, s->x,
                       s->y, s->peak_adu);
            }
        }
        printf("LT: %d matched stars with S/N >= 50 and peak < 8000 ADU, largest |S_corr| %.2f\n",
               nstars, worst);
        CHECK(nstars >= 15 && nres == 0, "LT: no residual at %d stars (%d with |S_corr| >= 5)",
              nstars, nres);
        CHECK(nbright >= 1 && bright_ok == nbright,
              "LT: the %d stars peaking above 8000 ADU leave a central-pixel deficit (%d do)",
              nbright, bright_ok);
        CHECK(odd_ok, "LT: the star at (820, 519) is measured a few per cent brighter");
    }
    hilal_frame_clear(&f);
    hilal_config_free(cfg);
}

static void test_decam(void)
{
    hilal_error err = {0};
    char sci[1024], ref[1024], exp[1024];
    hilal_test_data("decam_n6_sfft/sci_stack_DEC-OBS04.fits.gz", sci, sizeof sci);
    hilal_test_data("decam_n6_sfft/ref_stack_DEC-OBS18.fits.gz", ref, sizeof ref);
    hilal_test_data("decam_n6_sfft/expected_sfft_stackdiff_decorr.fits.gz", exp, sizeof exp);
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    if (cfg == NULL)
        return;
    hilal_frame f;
    hilal_image *sfft = NULL;
    unsigned char *keep = NULL;
    hilal_status st = run_until_paths(cfg, "real", sci, ref, "detect", &f, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        goto cleanup;
    const hilal_diff *d = &f.diff;
    printf("DECam stacks: F_n %.4f, FWHM %.2f/%.2f px, registration RMS %.3f/%.3f px, S_corr "
           "median %.3f std %.3f (model %.3f), %zu candidates\n",
           f.flux_ratio, f.sci_psf.fwhm_px, f.ref_psf.fwhm_px, f.reg_rms_x_px, f.reg_rms_y_px,
           d->scorr_mean, d->scorr_std, d->tiles ? d->tiles[0].scorr_std_model : NAN, f.ncands);
    CHECK(f.sci->meta.wcs != NULL && f.flux_ratio > 0.9 && f.flux_ratio < 1.2,
          "DECam: TPV WCS read, flux ratio %.4f", f.flux_ratio);
    CHECK(d->scorr_std > 0.9 && d->scorr_std < 1.2 && fabs(d->scorr_mean) < 0.4,
          "DECam: S_corr median %.3f, std %.3f", d->scorr_mean, d->scorr_std);
    st = hilal_fits_read_image(exp, 0, &sfft, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        goto cleanup;
    CHECK(sfft->nx == d->nx && sfft->ny == d->ny, "same grid as the SFFT difference");
    if (sfft->nx != d->nx || sfft->ny != d->ny)
        goto cleanup;
    size_t n = (size_t)d->nx * (size_t)d->ny;
    keep = malloc(n);
    if (keep == NULL)
        goto cleanup;
    for (size_t i = 0; i < n; i++)
        keep[i] = !(d->mask[i] & (HILAL_MASK_UNUSABLE | HILAL_MASK_INTERP)) && isfinite(sfft->pix[i]);
    double r = hilal_test_pearson(d->d, sfft->pix, keep, n);
    printf("DECam: correlation of D with the SFFT decorrelated difference %.3f\n", r);
    CHECK(r > 0.6, "D follows the SFFT difference (correlation %.3f)", r);
    /* the SFFT difference's strongest residual, a dipole at (61, 182) / (57,
     * 181), is there with the same signs */
    double dpos = d->d[(size_t)181 * d->nx + 60], dneg = d->d[(size_t)180 * d->nx + 56];
    CHECK(dpos > 20 && dneg < -20, "the dipole at (61, 182) / (57, 181): D = %.1f / %.1f", dpos,
          dneg);
    /* its second, a compact brightening at (131, 128), is a candidate */
    int found = 0;
    for (size_t i = 0; i < f.ncands; i++)
        found |= hypot(f.cands[i].x - 131, f.cands[i].y - 128) < 2.5 && f.cands[i].snr > 10;
    CHECK(found, "the brightening at (131, 128) is detected");
cleanup:
    free(keep);
    hilal_image_free(sfft);
    hilal_frame_clear(&f);
    hilal_config_free(cfg);
}

int main(void)
{
    test_lt();
    test_decam();
    return hilal_test_finish();
}
