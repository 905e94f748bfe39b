/* The science requirements of the whole chain, measured on simulated aligned
 * pairs with known truth (ingest -> background -> stars -> align -> psf ->
 * fluxscale -> subtract -> detect -> measure -> vet):
 *  - S_corr on source-free pixels: mean 0 +- 0.05, standard deviation 1 +- 0.05;
 *  - >= 95% of events with ideal S/N >= 8 found within 2 px with the right sign;
 *  - noise-only pairs: at most twice the Gaussian expectation of 5-sigma peaks
 *    (candidates flagged as next to a saturated star are residuals of a star
 *    saturated in one frame only, reported with that flag, and not counted);
 *  - S/N > 20: median flux error < 3%, median position error < 0.1 px,
 *    pulls (measured - true) / flux_err with standard deviation in [0.9, 1.1];
 *  - cosmic rays are not detected or get rb < 0.5.
 * Frames are 512 x 512 so the test stays fast; several seeds pool statistics. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/simulate.h"
#include "hilal/stats.h"
#include "testutil.h"

#define SIZE 512

/* Runs every registered stage but the archive on a simulated pair written
 * to dir. Returns the status; the frame holds the products. */
static hilal_status run_chain(const hilal_config *cfg, const char *dir, hilal_frame *f,
                              hilal_error *err)
{
    size_t n;
    const hilal_stage *const *all = hilal_registry_stages(&n);
    const hilal_stage *stages[32];
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(all[i]->name, "archive") != 0 && strcmp(all[i]->name, "alert") != 0)
            stages[k++] = all[i];
    hilal_frame_init(f);
    snprintf(f->frame_id, sizeof f->frame_id, "sim");
    if (snprintf(f->sci_path, sizeof f->sci_path, "%s/sci.fits", dir) >= (int)sizeof f->sci_path ||
        snprintf(f->ref_path, sizeof f->ref_path, "%s/ref.fits", dir) >= (int)sizeof f->ref_path)
        return hilal_error_set(err, HILAL_ERR_RANGE, "scratch directory name too long: %s", dir);
    hilal_runner *r = NULL;
    hilal_status st = hilal_runner_new(cfg, stages, k, &r, err);
    if (st != HILAL_OK)
        return st;
    st = hilal_runner_run(r, f, err);
    hilal_runner_free(r);
    return st;
}

static hilal_status simulate(const char *dir, uint64_t seed, int no_events, hilal_sim_truth **truth,
                             hilal_error *err)
{
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = SIZE;
    o.seed = seed;
    o.no_events = no_events;
    o.n_transients = no_events ? 0 : 100;
    o.n_variables = 8;
    o.n_cosmics = 40;
    o.snr_min = 4;
    o.snr_max = 150;
    hilal_status st = hilal_sim_write(&o, dir, err);
    if (st == HILAL_OK && truth != NULL)
        st = hilal_sim_make(&o, NULL, NULL, truth, err);
    return st;
}

/* Simulates the pair of this seed into $HILAL_TMPDIR/<kind><seed> and runs
 * the chain on it. *f is always initialised (clear it after use); *truth
 * is NULL when the simulation failed. */
static hilal_status simulate_and_run(const hilal_config *cfg, const char *kind, uint64_t seed,
                                     int no_events, hilal_sim_truth **truth, hilal_frame *f,
                                     hilal_error *err)
{
    char name[64], dir[1024];
    hilal_frame_init(f);
    *truth = NULL;
    snprintf(name, sizeof name, "%s%llu", kind, (unsigned long long)seed);
    hilal_test_tmpdir(name, dir, sizeof dir);
    hilal_error_clear(err);
    hilal_status st = simulate(dir, seed, no_events, truth, err);
    CHECK_OK(st, err);
    if (st != HILAL_OK)
        return st;
    st = run_chain(cfg, dir, f, err);
    CHECK_OK(st, err);
    return st;
}

int main(void)
{
    hilal_error err = {0};
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    if (cfg == NULL)
        return hilal_test_finish();

    /* --- Events: completeness, photometry, astrometry, cosmic rays. --- */
    int n8 = 0, found8 = 0, n5 = 0, found5 = 0, ncos = 0, cos_bad = 0;
    double ferr[1000], perr[1000], pull[1000];
    size_t nbright = 0;
    for (uint64_t seed = 11; seed <= 13; seed++) {
        hilal_sim_truth *truth = NULL;
        hilal_frame f;
        hilal_status st = simulate_and_run(cfg, "events", seed, 0, &truth, &f, &err);
        for (size_t e = 0; st == HILAL_OK && e < truth->nevents; e++) {
            const hilal_sim_event *ev = &truth->events[e];
            if (ev->type == HILAL_SIM_BAD_COLUMN)
                continue;
            /* nearest candidate */
            double best = 1e9;
            const hilal_candidate *c = NULL;
            for (size_t i = 0; i < f.ncands; i++) {
                double d = hypot(f.cands[i].x - ev->x, f.cands[i].y - ev->y);
                if (d < best) {
                    best = d;
                    c = &f.cands[i];
                }
            }
            if (ev->type == HILAL_SIM_COSMIC) {
                ncos++;
                if (c != NULL && best <= 3 && c->rb >= 0.5) {
                    cos_bad++;
                    fprintf(stderr, "cosmic ray at (%.1f, %.1f) detected with rb %.2f (snr %.1f, sharpness %.2f)\n",
                            ev->x, ev->y, c->rb, c->snr, c->sharpness);
                }
                continue;
            }
            double snr = fabs(ev->ideal_snr);
            int ok = c != NULL && best <= 2.0 && (c->snr > 0) == (ev->diff_flux_adu > 0);
            if (snr >= 8) {
                n8++;
                found8 += ok;
                if (!ok)
                    fprintf(stderr, "missed %s at (%.2f, %.2f) ideal S/N %.1f (nearest candidate %.1f px)\n",
                            hilal_sim_event_name(ev->type), ev->x, ev->y, ev->ideal_snr, best);
            } else if (snr >= 4.5 && snr < 5.5) {
                n5++;
                found5 += ok;
            }
            /* Photometry is compared on isolated point sources: not on a
             * galaxy, and not flagged as touching masked or saturated pixels
             * (a bad column, a saturated star), whose fluxes are flagged as
             * suspect for the user too. */
            if (ok && snr > 20 && nbright < 1000 && !ev->on_galaxy &&
                !(c->flags & (HILAL_CAND_NEAR_MASK | HILAL_CAND_NEAR_SAT))) {
                ferr[nbright] = fabs(c->flux / ev->diff_flux_adu - 1);
                perr[nbright] = best;
                pull[nbright] = (c->flux - ev->diff_flux_adu) / c->flux_err;
                nbright++;
            }
        }
        hilal_frame_clear(&f);
        hilal_sim_truth_free(truth);
    }
    double compl8 = n8 ? (double)found8 / n8 : 0;
    printf("completeness at ideal S/N >= 8: %d/%d = %.3f\n", found8, n8, compl8);
    printf("completeness at ideal S/N ~ 5: %d/%d\n", found5, n5);
    CHECK(n8 >= 40, "enough bright events simulated (%d)", n8);
    CHECK(compl8 >= 0.95, "completeness at S/N >= 8 is %.3f (>= 0.95 required)", compl8);
    CHECK(nbright >= 100, "enough S/N > 20 events (%zu)", nbright);
    /* pull standard deviation (robust: 1.4826 MAD, and plain) */
    double mean = 0, var = 0;
    for (size_t i = 0; i < nbright; i++)
        mean += pull[i];
    mean /= nbright ? (double)nbright : 1;
    for (size_t i = 0; i < nbright; i++)
        var += (pull[i] - mean) * (pull[i] - mean);
    double pull_std = nbright > 1 ? sqrt(var / (double)(nbright - 1)) : NAN;
    double med_ferr = hilal_median_double(ferr, nbright);
    double med_perr = hilal_median_double(perr, nbright);
    printf("S/N > 20: %zu events, median flux error %.4f, median position error %.3f px, pull mean %.3f std %.3f\n",
           nbright, med_ferr, med_perr, mean, pull_std);
    CHECK(med_ferr < 0.03, "median flux error %.4f < 3%%", med_ferr);
    CHECK(med_perr < 0.1, "median position error %.3f px < 0.1 px", med_perr);
    CHECK(pull_std >= 0.9 && pull_std <= 1.1, "pull std %.3f in [0.9, 1.1]", pull_std);
    printf("cosmic rays: %d injected, %d detected with rb >= 0.5\n", ncos, cos_bad);
    CHECK(ncos > 0 && cos_bad == 0, "%d of %d cosmic rays detected with rb >= 0.5", cos_bad, ncos);

    /* --- Noise-only pairs: S_corr statistics and false detections. --- */
    long npix_total = 0, nfalse = 0;
    for (uint64_t seed = 21; seed <= 24; seed++) {
        hilal_sim_truth *truth = NULL;
        hilal_frame f;
        hilal_status st = simulate_and_run(cfg, "noise", seed, 1, &truth, &f, &err);
        if (st == HILAL_OK) {
            /* Source-free pixels: unmasked and farther than 4 FWHM from any
             * star bright enough to show (peak above the sky noise). */
            size_t n = (size_t)SIZE * SIZE;
            unsigned char *keep = malloc(n);
            memset(keep, 1, n);
            double rad = 4 * truth->sci.fwhm_px;
            for (size_t s = 0; s < truth->nstars; s++) {
                const hilal_sim_star *star = &truth->stars[s];
                if (star->peak_sci_adu < f.sci->sky_rms_adu)
                    continue;
                double r = star->sat_sci ? 4 * rad : rad;
                for (long y = (long)(star->y_sci - r); y <= (long)(star->y_sci + r); y++)
                    for (long x = (long)(star->x_sci - r); x <= (long)(star->x_sci + r); x++)
                        if (x >= 1 && y >= 1 && x <= SIZE && y <= SIZE &&
                            hypot(x - star->x_sci, y - star->y_sci) <= r)
                            keep[(size_t)(y - 1) * SIZE + (size_t)(x - 1)] = 0;
            }
            for (size_t g = 0; g < truth->ngalaxies; g++) {
                const hilal_sim_galaxy *gal = &truth->galaxies[g];
                double r = 4 * gal->reff_px + rad;
                for (long y = (long)(gal->y_sci - r); y <= (long)(gal->y_sci + r); y++)
                    for (long x = (long)(gal->x_sci - r); x <= (long)(gal->x_sci + r); x++)
                        if (x >= 1 && y >= 1 && x <= SIZE && y <= SIZE)
                            keep[(size_t)(y - 1) * SIZE + (size_t)(x - 1)] = 0;
            }
            double sum = 0, sum2 = 0;
            size_t m = 0;
            for (size_t i = 0; i < n; i++) {
                if (!keep[i] || f.diff.mask[i] != 0)
                    continue;
                sum += f.diff.scorr[i];
                sum2 += (double)f.diff.scorr[i] * f.diff.scorr[i];
                m++;
            }
            double mu = sum / (double)m, sd = sqrt(sum2 / (double)m - mu * mu);
            printf("noise-only seed %llu: S_corr on %zu source-free pixels: mean %.4f std %.4f; %zu detections\n",
                   (unsigned long long)seed, m, mu, sd, f.ncands);
            CHECK(m > n / 4, "enough source-free pixels (%zu)", m);
            CHECK(fabs(mu) <= 0.05, "S_corr mean %.4f within 0 +- 0.05", mu);
            CHECK(fabs(sd - 1) <= 0.05, "S_corr std %.4f within 1 +- 0.05", sd);
            for (size_t i = 0; i < f.ncands; i++) {
                int near_sat = (f.cands[i].flags & HILAL_CAND_NEAR_SAT) != 0;
                fprintf(stderr, "  false detection at (%.1f, %.1f) snr %.2f rb %.2f flags %u%s\n",
                        f.cands[i].x, f.cands[i].y, f.cands[i].snr, f.cands[i].rb, f.cands[i].flags,
                        near_sat ? " (next to a saturated star: not counted)" : "");
                CHECK(!near_sat || f.cands[i].rb < 0.5, "a residual next to a saturated star has rb %.2f",
                      f.cands[i].rb);
                nfalse += !near_sat;
            }
            npix_total += (long)n;
            free(keep);
        }
        hilal_frame_clear(&f);
        hilal_sim_truth_free(truth);
    }
    /* Two-sided Gaussian tail beyond 5 sigma per pixel, times the pixels. */
    double expected = (double)npix_total * erfc(5.0 / sqrt(2.0));
    printf("noise-only: %ld detections at 5 sigma over %ld px (Gaussian expectation %.2f)\n", nfalse,
           npix_total, expected);
    CHECK(nfalse <= (long)ceil(2 * expected), "%ld false detections, at most %.0f allowed", nfalse,
          ceil(2 * expected));

    hilal_config_free(cfg);
    return hilal_test_finish();
}
