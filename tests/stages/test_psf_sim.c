/* End to end on a simulated pair (hilal_sim_make: Moffat stars, galaxies,
 * sky gradients, saturated stars with bleeding, cosmic rays, bad columns,
 * variable stars) on one grid: background, stars, psf and fluxscale
 * recover the simulated PSF widths and flux ratio. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/hilal.h"
#include "hilal/psf.h"
#include "hilal/simulate.h"
#include "testutil.h"

extern const hilal_stage hilal_stage_background;
extern const hilal_stage hilal_stage_stars;
extern const hilal_stage hilal_stage_psf;
extern const hilal_stage hilal_stage_fluxscale;

int main(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = 768;
    o.seed = 2024;
    hilal_image *sci = NULL, *ref = NULL;
    hilal_sim_truth *truth = NULL;
    hilal_status st = hilal_sim_make(&o, &sci, &ref, &truth, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return hilal_test_finish();

    const hilal_stage *chain[4] = {&hilal_stage_background, &hilal_stage_stars, &hilal_stage_psf,
                                   &hilal_stage_fluxscale};
    void *state[4] = {NULL, NULL, NULL, NULL};
    hilal_config *cfg = hilal_registry_config_new(&err);
    hilal_frame f;
    hilal_frame_init(&f);
    strcpy(f.frame_id, "sim");
    f.sci = sci;
    f.ref = ref;
    f.products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    st = cfg != NULL ? HILAL_OK : err.code;
    for (int k = 0; k < 4 && st == HILAL_OK; k++)
        st = chain[k]->init(cfg, &state[k], &err);
    for (int k = 0; k < 4 && st == HILAL_OK; k++) {
        if (k == 2)
            f.products |= HILAL_PROD_ALIGNED; /* offset 0: the same grid */
        st = chain[k]->run(state[k], &f, &err);
    }
    CHECK_OK(st, &err);

    if (st == HILAL_OK) {
        /* Sky: the map follows the simulated sky (with its gradient). */
        double maxd = 0.0;
        for (long y = 50; y < o.ny - 50; y += 37)
            for (long x = 50; x < o.nx - 50; x += 41) {
                double s = hilal_sim_sky_adu(truth, 1, x + 1.0, y + 1.0);
                maxd = fmax(maxd, fabs(f.sci->sky[y * o.nx + x] - s) / f.sci->sky_rms_adu);
            }
        /* The simulated noise per pixel at the sky level. */
        double sky0 = truth->sci.sky_adu, g = truth->sci.gain_e_per_adu, rn = truth->sci.rdnoise_e;
        double rms_expect = sqrt(sky0 / g + (rn / g) * (rn / g));
        printf("sim: sky map within %.3f rms of the truth; rms %.3f (expected ~%.3f)\n", maxd,
               f.sci->sky_rms_adu, rms_expect);
        CHECK(maxd < 0.3, "sky map departs by %.3f rms", maxd);
        CHECK(fabs(f.sci->sky_rms_adu / rms_expect - 1.0) < 0.05, "sky rms %.3f vs %.3f",
              f.sci->sky_rms_adu, rms_expect);

        /* Stars: every unsaturated, isolated bright star is found. */
        size_t nbright = 0, nfound = 0;
        for (size_t i = 0; i < truth->nstars; i++) {
            const hilal_sim_star *s = &truth->stars[i];
            if (!s->in_sci || s->sat_sci || s->flux_sci_adu < 50.0 * rms_expect * 3.2 ||
                s->x_sci < 20 || s->y_sci < 20 || s->x_sci > o.nx - 20 || s->y_sci > o.ny - 20)
                continue;
            nbright++;
            for (size_t k = 0; k < f.sci_stars.n; k++)
                if (hypot(f.sci_stars.stars[k].x - s->x_sci, f.sci_stars.stars[k].y - s->y_sci) <
                    1.0) {
                    nfound++;
                    break;
                }
        }
        printf("sim: %zu of %zu bright stars found; %zu/%zu detections\n", nfound, nbright,
               f.sci_stars.n, f.ref_stars.n);
        CHECK(nbright > 20 && nfound >= nbright * 95 / 100, "found %zu of %zu bright stars",
              nfound, nbright);

        /* PSFs: FWHM of the simulated Moffat profiles. */
        printf("sim: science PSF FWHM %.3f (true %.2f, %d stars), reference %.3f (true %.2f, %d "
               "stars)\n",
               f.sci_psf.fwhm_px, truth->sci.fwhm_px, f.sci_psf.nstars, f.ref_psf.fwhm_px,
               truth->ref.fwhm_px, f.ref_psf.nstars);
        CHECK(fabs(f.sci_psf.fwhm_px / truth->sci.fwhm_px - 1.0) < 0.04, "science FWHM");
        CHECK(fabs(f.ref_psf.fwhm_px / truth->ref.fwhm_px - 1.0) < 0.04, "reference FWHM");
        CHECK(f.sci_psf.nstars >= 20 && f.ref_psf.nstars >= 20, "empirical PSFs");
        double cx, cy;
        hilal_psf_centroid(&f.sci_psf, &cx, &cy);
        CHECK(fabs(cx) < 0.01 && fabs(cy) < 0.01, "science PSF centred (%.4f, %.4f)", cx, cy);

        /* Flux ratio (the simulated variables must be rejected). */
        printf("sim: flux ratio %.5f +- %.5f from %d stars (true %.3f)\n", f.flux_ratio,
               f.flux_ratio_err, f.flux_ratio_nstars, truth->flux_ratio);
        CHECK(fabs(f.flux_ratio / truth->flux_ratio - 1.0) < 0.015, "flux ratio %.5f vs %.3f",
              f.flux_ratio, truth->flux_ratio);
        CHECK(f.flux_ratio_err > 0.0 && f.flux_ratio_err < 0.01, "flux ratio error %.5f",
              f.flux_ratio_err);
    }

    for (int k = 0; k < 4; k++)
        if (state[k] != NULL)
            chain[k]->fini(state[k]);
    hilal_config_free(cfg);
    hilal_frame_clear(&f);
    hilal_sim_truth_free(truth);
    return hilal_test_finish();
}
