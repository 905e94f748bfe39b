/* The frame simulator's model: the ideal S/N of the truth against the
 * scatter of a PSF-fit flux measured on a noise-only pair, PSF widths and
 * shapes across the field, galaxy fluxes, variables of both signs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/simulate.h"
#include "testutil.h"
#include "test_simulate_pair.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* ideal_snr = F sqrt(sum P^2 / var) is checked two ways on an empty, flat
 * field: (1) against the variance computed here from the options alone, and
 * (2) against the measured scatter of the optimal flux estimator
 * F^ = sum(P D) / sum(P^2) applied at many empty places of the noise-only
 * difference D = S - r R - (sky_S - r sky_R). */
static void test_ideal_snr(void)
{
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = 512;
    o.seed = 7;
    o.star_density = 0;
    o.galaxy_density = 0;
    o.sky_gradient_frac = 0;
    o.n_transients = 20;
    o.snr_min = 3;
    o.snr_max = 8;
    o.n_variables = 0;
    o.n_cosmics = 0;
    o.n_bad_columns = 0;
    o.keep_model = 1;
    sim_pair pair = {0};
    if (!sim_pair_make(&o, &pair))
        goto cleanup;
    const long n = 512;
    const double r = o.flux_ratio;
    /* Per-pixel variance of D from the options: science Poisson + read
     * noise, plus r^2 times the reference's (gain x depth, read noise x
     * sqrt(depth)). */
    double gs = o.gain_e_per_adu, gr = o.gain_e_per_adu * o.ref_depth;
    double v = o.sky_sci_adu / gs + pow(o.rdnoise_e / gs, 2) +
               r * r * (o.sky_ref_adu / gr + o.rdnoise_e * o.rdnoise_e * o.ref_depth / (gr * gr));

    /* The PSF as injected: the model difference around the first transient
     * divided by its flux (25 x 25 stamp). */
    const int h = 12, w = 2 * h + 1;
    double P[25 * 25], sp2 = 0, sp = 0;
    const hilal_sim_event *e0 = &pair.t->events[0];
    long ix = lround(e0->x) - 1, iy = lround(e0->y) - 1;
    for (int j = 0; j < w; j++)
        for (int i = 0; i < w; i++) {
            long p = (iy - h + j) * n + (ix - h + i);
            P[j * w + i] = (pair.t->model_sci[p] - pair.t0->model_sci[p]) / e0->diff_flux_adu;
            sp += P[j * w + i];
            sp2 += P[j * w + i] * P[j * w + i];
        }
    CHECK(fabs(sp - 1.0) < 0.01, "injected profile sums to %.4f", sp);

    /* (1) S/N from the options' variance (source photon noise neglected:
     * these are faint) against the truth. */
    double worst = 0;
    for (size_t k = 0; k < pair.t->nevents; k++) {
        const hilal_sim_event *e = &pair.t->events[k];
        double snr = e->diff_flux_adu * sqrt(sp2 / v);
        worst = fmax(worst, fabs(snr / e->ideal_snr - 1));
        CHECK(fabs(snr / e->ideal_snr - 1) < 0.03 && e->ideal_snr >= 3 * 0.999 && e->ideal_snr <= 8 * 1.001,
              "transient %ld: truth S/N %.3f, from the options %.3f", e->id, e->ideal_snr, snr);
    }

    /* (2) The scatter of F^ over a grid of empty places. */
    double s1 = 0, s2 = 0;
    int m = 0;
    for (long cy = 20; cy < n - 20; cy += 26)
        for (long cx = 20; cx < n - 20; cx += 26) {
            double num = 0;
            for (int j = 0; j < w; j++)
                for (int i = 0; i < w; i++) {
                    long p = (cy - h + j) * n + (cx - h + i);
                    double d = pair.sci0->pix[p] - r * pair.ref0->pix[p] - (o.sky_sci_adu - r * o.sky_ref_adu);
                    num += P[j * w + i] * d;
                }
            double f = num / sp2;
            s1 += f;
            s2 += f * f;
            m++;
        }
    double mean = s1 / m, sd = sqrt(s2 / m - mean * mean);
    double predicted = e0->diff_flux_adu / e0->ideal_snr;
    CHECK(m > 300 && fabs(sd / predicted - 1) < 0.12 && fabs(mean) < 4 * sd / sqrt(m),
          "PSF-fit flux scatter on noise: %.2f ADU over %d places (mean %.2f); truth F/SNR %.2f",
          sd, m, mean, predicted);
    printf("ideal S/N: worst relative difference %.4f; measured/predicted scatter %.3f\n", worst,
           sd / predicted);
cleanup:
    sim_pair_free(&pair);
}

/* Second moments of (model - sky) in a box: sxx, syy, sxy (px^2). */
static void moments(const float *m, long nx, const hilal_sim_truth *t, int which, double x, double y,
                    int h, double *sxx, double *syy, double *sxy)
{
    double s = 0, ax = 0, ay = 0, axx = 0, ayy = 0, axy = 0;
    for (long j = lround(y) - 1 - h; j <= lround(y) - 1 + h; j++)
        for (long i = lround(x) - 1 - h; i <= lround(x) - 1 + h; i++) {
            double d = m[j * nx + i] - hilal_sim_sky_adu(t, which, i + 1.0, j + 1.0);
            double dx = i + 1 - x, dy = j + 1 - y;
            s += d;
            ax += d * dx;
            ay += d * dy;
            axx += d * dx * dx;
            ayy += d * dy * dy;
            axy += d * dx * dy;
        }
    *sxx = axx / s;
    *syy = ayy / s;
    *sxy = axy / s;
}

/* Gaussian PSFs: widths (second moments minus the pixel's 1/12 px^2) follow
 * hilal_sim_fwhm_px across the field, whose formula is checked at the
 * documented points; elliptical PSFs have the documented axis ratio and
 * angle in each frame. */
/* Whether star i of a 512 x 512 field can be measured alone: unsaturated,
 * at least 20 px inside the reference frame, no other star within 22 px. */
static int lone_star(const hilal_sim_truth *t, size_t i)
{
    const hilal_sim_star *s = &t->stars[i];
    if (s->sat_ref || s->sat_sci || s->x_ref < 20 || s->y_ref < 20 || s->x_ref > 492 || s->y_ref > 492)
        return 0;
    for (size_t j = 0; j < t->nstars; j++)
        if (j != i && hypot(t->stars[j].x_ref - s->x_ref, t->stars[j].y_ref - s->y_ref) < 22)
            return 0;
    return 1;
}

static void test_psf_shape(void)
{
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = 512;
    o.seed = 11;
    o.psf_model = HILAL_SIM_PSF_GAUSSIAN;
    o.psf_vary_frac = 0.3;
    o.star_density = 150;
    o.mag_bright = 14;
    o.mag_faint = 16;
    o.galaxy_density = 0;
    o.no_events = 1;
    o.keep_model = 1;
    /* The documented variation: FWHM0 (1 + f (l/2 + (ux^2 + uy^2)/4)),
     * l = ux (reference) or uy (science). */
    double c = 256.5;
    CHECK(fabs(hilal_sim_fwhm_px(&o, 0, c, c) - 2.5) < 1e-12 && fabs(hilal_sim_fwhm_px(&o, 1, c, c) - 3.2) < 1e-12,
          "FWHM at the centre");
    CHECK(fabs(hilal_sim_fwhm_px(&o, 0, 512.5, 512.5) / 2.5 - 1.3) < 1e-9 &&
              fabs(hilal_sim_fwhm_px(&o, 1, 512.5, 512.5) / 3.2 - 1.3) < 1e-9,
          "FWHM at the far corner: 1 + f");
    CHECK(fabs(hilal_sim_fwhm_px(&o, 0, 0.5, c) / 2.5 - (1 + 0.3 * (-0.5 + 0.25))) < 1e-9 &&
              fabs(hilal_sim_fwhm_px(&o, 1, c, 0.5) / 3.2 - (1 + 0.3 * (-0.5 + 0.25))) < 1e-9,
          "FWHM at the near edge: 1 - f/4 (reference varies along x, science along y)");

    hilal_image *sci = NULL, *ref = NULL;
    hilal_sim_truth *t = NULL;
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    int nmeas = 0;
    double worst = 0, lo = 1e9, hi = 0;
    for (size_t i = 0; i < t->nstars; i++) {
        if (!lone_star(t, i))
            continue;
        const hilal_sim_star *s = &t->stars[i];
        for (int k = 0; k < 2; k++) {
            double x = k ? s->x_sci : s->x_ref, y = k ? s->y_sci : s->y_ref, sxx, syy, sxy;
            moments(k ? t->model_sci : t->model_ref, 512, t, k, x, y, 10, &sxx, &syy, &sxy);
            double sig2 = 0.5 * (sxx + syy) - 1.0 / 12.0;
            double fwhm = 2.0 * sqrt(2.0 * log(2.0)) * sqrt(sig2);
            double expect = hilal_sim_fwhm_px(&o, k, x, y);
            worst = fmax(worst, fabs(fwhm / expect - 1));
            lo = fmin(lo, fwhm / (k ? 3.2 : 2.5));
            hi = fmax(hi, fwhm / (k ? 3.2 : 2.5));
            CHECK(fabs(fwhm / expect - 1) < 0.01, "%s star at (%.1f, %.1f): FWHM %.3f, expected %.3f",
                  k ? "sci" : "ref", x, y, fwhm, expect);
        }
        nmeas++;
    }
    CHECK(nmeas >= 8 && hi - lo > 0.1, "measured %d stars, FWHM/FWHM0 from %.3f to %.3f", nmeas, lo, hi);
    printf("PSF widths: %d stars, worst relative FWHM error %.4f\n", nmeas, worst);
    unmake(&sci, &ref, &t);

    /* Ellipticity 0.2: b/a = 0.8, major axis at 20 deg (reference) and 65
     * deg (science). */
    o.psf_vary_frac = 0;
    o.psf_ellip = 0.2;
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    nmeas = 0;
    for (size_t i = 0; i < t->nstars && nmeas < 5; i++) {
        if (!lone_star(t, i))
            continue;
        const hilal_sim_star *s = &t->stars[i];
        for (int k = 0; k < 2; k++) {
            double x = k ? s->x_sci : s->x_ref, y = k ? s->y_sci : s->y_ref, sxx, syy, sxy;
            moments(k ? t->model_sci : t->model_ref, 512, t, k, x, y, 10, &sxx, &syy, &sxy);
            sxx -= 1.0 / 12.0;
            syy -= 1.0 / 12.0;
            double tr = sxx + syy, det = sxx * syy - sxy * sxy, disc = sqrt(tr * tr / 4 - det);
            double l1 = tr / 2 + disc, l2 = tr / 2 - disc;
            double pa = 0.5 * atan2(2 * sxy, sxx - syy) * 180 / M_PI, want = k ? 65.0 : 20.0;
            CHECK(fabs(sqrt(l2 / l1) - 0.8) < 0.01 && fabs(pa - want) < 1.0,
                  "%s elliptical PSF: b/a %.4f (0.8), angle %.2f deg (%g)", k ? "sci" : "ref",
                  sqrt(l2 / l1), pa, want);
        }
        nmeas++;
    }
    CHECK(nmeas >= 3, "measured %d elliptical stars", nmeas);
cleanup:
    hilal_image_free(sci);
    hilal_image_free(ref);
    hilal_sim_truth_free(t);
}

/* Galaxies: the model holds each isolated galaxy's flux, spread wider than
 * a star; variables come in both signs. */
static void test_galaxies_variables(void)
{
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = 512;
    o.seed = 5;
    o.star_density = 0;
    o.galaxy_density = 40;
    o.no_events = 1;
    o.keep_model = 1;
    hilal_image *sci = NULL, *ref = NULL;
    hilal_sim_truth *t = NULL;
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    int ng = 0, n1 = 0, n4 = 0;
    for (size_t i = 0; i < t->ngalaxies; i++) {
        const hilal_sim_galaxy *g = &t->galaxies[i];
        if (g->x_ref < 60 || g->y_ref < 60 || g->x_ref > 452 || g->y_ref > 452)
            continue;
        int alone = 1;
        for (size_t j = 0; j < t->ngalaxies; j++)
            if (j != i && hypot(t->galaxies[j].x_ref - g->x_ref, t->galaxies[j].y_ref - g->y_ref) < 110)
                alone = 0;
        if (!alone)
            continue;
        double sum = 0, peak = 0;
        for (long y = lround(g->y_ref) - 56; y <= lround(g->y_ref) + 54; y++)
            for (long x = lround(g->x_ref) - 56; x <= lround(g->x_ref) + 54; x++) {
                double d = t->model_ref[y * 512 + x] - hilal_sim_sky_adu(t, 0, x + 1.0, y + 1.0);
                sum += d;
                peak = fmax(peak, d);
            }
        /* A point source of the reference PSF puts >= 10% of its flux in
         * the brightest pixel; a galaxy of R_e >= 1 px far less. */
        CHECK(fabs(sum / g->flux_ref_adu - 1) < 0.005 && peak < 0.08 * g->flux_ref_adu,
              "galaxy %zu (n=%.0f, Re %.2f px): model flux %.1f of %.1f, peak fraction %.3f", i + 1,
              g->sersic_n, g->reff_px, sum, g->flux_ref_adu, peak / g->flux_ref_adu);
        ng++;
        n1 += g->sersic_n == 1.0;
        n4 += g->sersic_n == 4.0;
    }
    CHECK(ng >= 2, "checked %d isolated galaxies (%d exponential, %d de Vaucouleurs)", ng, n1, n4);
    unmake(&sci, &ref, &t);

    o.star_density = 2000;
    o.galaxy_density = 120;
    o.no_events = 0;
    o.keep_model = 0;
    o.n_variables = 12;
    o.n_transients = 10;
    o.galaxy_frac = 0.5;
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    int up = 0, down = 0, ongal = 0;
    for (size_t k = 0; k < t->nevents; k++) {
        const hilal_sim_event *e = &t->events[k];
        if (e->type == HILAL_SIM_VARIABLE) {
            up += e->diff_flux_adu > 0;
            down += e->diff_flux_adu < 0;
            CHECK(e->sci_flux_adu > 0.19 * o.flux_ratio * e->ref_flux_adu &&
                      e->sci_flux_adu < 4.01 * o.flux_ratio * e->ref_flux_adu &&
                      (e->ideal_snr > 0) == (e->diff_flux_adu > 0),
                  "variable %ld: %.1f -> %.1f ADU, S/N %.1f", e->id, o.flux_ratio * e->ref_flux_adu,
                  e->sci_flux_adu, e->ideal_snr);
        }
        if (e->type == HILAL_SIM_TRANSIENT)
            ongal += e->on_galaxy;
    }
    CHECK(up >= 2 && down >= 2, "variables brighten (%d) and fade (%d)", up, down);
    CHECK(ongal >= 5, "%d of 10 transients on galaxies (galaxy_frac 0.5)", ongal);
cleanup:
    hilal_image_free(sci);
    hilal_image_free(ref);
    hilal_sim_truth_free(t);
}

int main(void)
{
    test_ideal_snr();
    test_psf_shape();
    test_galaxies_variables();
    return hilal_test_finish();
}
