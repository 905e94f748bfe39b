/* The frame simulator: options, determinism, event bookkeeping, sky and
 * noise levels, WCS consistency, injected fluxes, saturation and files. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fits.h"
#include "hilal/simulate.h"
#include "hilal/wcs.h"
#include "testutil.h"
#include "test_simulate_pair.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

static hilal_sim_options small(long n)
{
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = n;
    o.seed = 42;
    return o;
}

/* Mean and standard deviation of v over a box (C coordinates, inclusive). */
static void box_stats(const float *v, long nx, long x0, long y0, long x1, long y1, double *mean,
                      double *sd)
{
    double s = 0, s2 = 0;
    long n = 0;
    for (long y = y0; y <= y1; y++)
        for (long x = x0; x <= x1; x++) {
            s += v[y * nx + x];
            s2 += (double)v[y * nx + x] * v[y * nx + x];
            n++;
        }
    *mean = s / n;
    *sd = sqrt(fmax(s2 / n - *mean * *mean, 0.0) * n / (n - 1));
}

static void test_options(void)
{
    hilal_sim_options o = hilal_sim_options_default();
    hilal_error err = {0};
    CHECK(o.nx == 1024 && o.ny == 1024 && o.fwhm_ref_px == 2.5 && o.fwhm_sci_px == 3.2 &&
              o.flux_ratio == 0.8 && o.ref_depth == 4.0 && o.snr_min == 3.0 && o.snr_max == 100.0,
          "documented defaults");
    CHECK_OK(hilal_sim_options_check(&o, &err), &err);
    /* Automatic counts scale with the area. */
    CHECK(hilal_sim_event_count(&o, 0) == 50 && hilal_sim_event_count(&o, 1) == 10 &&
              hilal_sim_event_count(&o, 2) == 150 && hilal_sim_event_count(&o, 3) == 2,
          "auto counts at 1024^2: %ld %ld %ld %ld", hilal_sim_event_count(&o, 0),
          hilal_sim_event_count(&o, 1), hilal_sim_event_count(&o, 2), hilal_sim_event_count(&o, 3));
    o.nx = o.ny = 2048;
    CHECK(hilal_sim_event_count(&o, 0) == 200 && hilal_sim_event_count(&o, 2) == 600,
          "auto counts at 2048^2");
    o.no_events = 1;
    CHECK(hilal_sim_event_count(&o, 0) == 0 && hilal_sim_event_count(&o, 1) == 0 &&
              hilal_sim_event_count(&o, 2) == 0 && hilal_sim_event_count(&o, 3) == 0,
          "no_events zeroes every count");

    /* Bad values: HILAL_ERR_RANGE naming the CLI flag; nothing allocated. */
    o = hilal_sim_options_default();
    o.fwhm_sci_px = -1.0;
    hilal_image *sci = (hilal_image *)&o, *ref = (hilal_image *)&o;
    hilal_sim_truth *truth = (hilal_sim_truth *)&o;
    hilal_status st = hilal_sim_make(&o, &sci, &ref, &truth, &err);
    CHECK(st == HILAL_ERR_RANGE && strstr(err.msg, "--fwhm-sci") != NULL, "bad FWHM: %d %s", st,
          err.msg);
    CHECK(sci == NULL && ref == NULL && truth == NULL, "outputs NULL on failure");
    hilal_error_clear(&err);
    o = hilal_sim_options_default();
    o.snr_min = 50;
    o.snr_max = 10;
    st = hilal_sim_options_check(&o, &err);
    CHECK(st == HILAL_ERR_RANGE && strstr(err.msg, "--snr-range") != NULL, "%s", err.msg);
    hilal_error_clear(&err);
    o = hilal_sim_options_default();
    o.bitpix = 16;
    o.saturate_adu = 1e5;
    st = hilal_sim_options_check(&o, &err);
    CHECK(st == HILAL_ERR_RANGE && strstr(err.msg, "65535") != NULL, "%s", err.msg);
    hilal_error_clear(&err);
    o = small(64);
    o.n_transients = 500;
    o.n_variables = 0;
    st = hilal_sim_make(&o, NULL, NULL, NULL, &err);
    CHECK(st == HILAL_ERR_DATA && strstr(err.msg, "--n-transients") != NULL,
          "too many transients for the frame: %s", err.msg);
}

static void test_determinism_and_counts(void)
{
    hilal_sim_options o = small(256);
    o.n_transients = 12;
    o.n_variables = 3;
    o.n_cosmics = 20;
    o.n_bad_columns = 2;
    o.galaxy_density = 300; /* hosts for the on-galaxy transients */
    hilal_image *s1 = NULL, *r1 = NULL, *s2 = NULL, *r2 = NULL;
    hilal_sim_truth *t1 = NULL, *t2 = NULL;
    if (!make(&o, &s1, &r1, &t1) || !make(&o, &s2, &r2, &t2))
        goto cleanup;
    size_t n = (size_t)o.nx * o.ny;
    CHECK(memcmp(s1->pix, s2->pix, n * sizeof(float)) == 0 &&
              memcmp(r1->pix, r2->pix, n * sizeof(float)) == 0,
          "same seed, same pixels");
    CHECK(t1->nevents == t2->nevents &&
              memcmp(t1->events, t2->events, t1->nevents * sizeof *t1->events) == 0 &&
              t1->nstars == t2->nstars &&
              memcmp(t1->stars, t2->stars, t1->nstars * sizeof *t1->stars) == 0,
          "same seed, same truth");
    CHECK(t1->nevents == 37, "12 + 3 + 20 + 2 events, got %zu", t1->nevents);
    int count[4] = {0, 0, 0, 0}, ordered = 1;
    for (size_t i = 0; i < t1->nevents; i++) {
        count[t1->events[i].type]++;
        if (i > 0 && t1->events[i].type < t1->events[i - 1].type)
            ordered = 0;
        if (t1->events[i].id != (long)i + 1)
            ordered = 0;
    }
    CHECK(count[0] == 12 && count[1] == 3 && count[2] == 20 && count[3] == 2,
          "per type %d %d %d %d", count[0], count[1], count[2], count[3]);
    CHECK(ordered, "events numbered 1.. in type order");
    int snr_ok = 1, on_gal = 0;
    for (size_t i = 0; i < t1->nevents; i++) {
        const hilal_sim_event *e = &t1->events[i];
        if (e->type == HILAL_SIM_TRANSIENT) {
            snr_ok &= e->ideal_snr >= 3.0 * 0.999 && e->ideal_snr <= 100.0 * 1.001 &&
                      e->diff_flux_adu > 0;
            on_gal += e->on_galaxy;
        }
        if (e->type == HILAL_SIM_VARIABLE) {
            const hilal_sim_star *s = &t1->stars[e->star_index];
            snr_ok &= fabs(e->ideal_snr) >= 3.0 * 0.999 && fabs(e->ideal_snr) <= 100.0 * 1.001;
            snr_ok &= s->variable && fabs(e->diff_flux_adu - (s->flux_sci_adu - 0.8 * s->flux_ref_adu)) <
                                         1e-6 * fabs(e->diff_flux_adu);
        }
    }
    CHECK(snr_ok, "transient/variable S/N in [3, 100], variable diff = F_sci - r F_ref");
    CHECK(on_gal >= 2, "about 20%% of 12 transients on galaxies, got %d", on_gal);

    /* The number of threads does not change anything. */
    {
        hilal_sim_options o3 = o;
        o3.nthreads = 3;
        hilal_image *s3 = NULL, *r3 = NULL;
        if (make(&o3, &s3, &r3, NULL))
            CHECK(memcmp(s1->pix, s3->pix, n * sizeof(float)) == 0 &&
                      memcmp(r1->pix, r3->pix, n * sizeof(float)) == 0,
                  "3 threads give the same pixels as 2");
        hilal_image_free(s3);
        hilal_image_free(r3);
    }

    /* Another seed gives another field. */
    unmake(&s2, &r2, &t2);
    o.seed = 43;
    if (!make(&o, &s2, &r2, &t2))
        goto cleanup;
    CHECK(memcmp(s1->pix, s2->pix, n * sizeof(float)) != 0 && t1->stars[0].x_ref != t2->stars[0].x_ref,
          "different seed, different field");

    /* No events: same stars and reference, no events. */
    unmake(&s2, &r2, &t2);
    o.seed = 42;
    o.no_events = 1;
    if (!make(&o, &s2, &r2, &t2))
        goto cleanup;
    CHECK(t2->nevents == 0 && t2->nstars == t1->nstars, "no events, same %zu stars", t1->nstars);
    CHECK(memcmp(r1->pix, r2->pix, n * sizeof(float)) == 0, "reference unchanged by events");
cleanup:
    hilal_image_free(s1);
    hilal_image_free(r1);
    hilal_image_free(s2);
    hilal_image_free(r2);
    hilal_sim_truth_free(t1);
    hilal_sim_truth_free(t2);
}

/* Sky level, gradient and noise in empty corners against the options alone. */
static void test_sky_noise(void)
{
    hilal_sim_options o = small(512);
    o.star_density = 0;
    o.galaxy_density = 0;
    o.no_events = 1;
    o.sky_gradient_frac = 0.2;
    hilal_image *sci = NULL, *ref = NULL;
    hilal_sim_truth *t = NULL;
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    for (int k = 0; k < 2; k++) {
        const hilal_image *img = k ? sci : ref;
        double sky = k ? o.sky_sci_adu : o.sky_ref_adu;
        double depth = k ? 1.0 : o.ref_depth;
        double g = o.gain_e_per_adu * depth;            /* e- per (mean) ADU */
        double rn2 = o.rdnoise_e * o.rdnoise_e * depth; /* e-^2 */
        const long b = 64;
        const long x0s[4] = {0, 512 - b, 0, 512 - b}, y0s[4] = {0, 0, 512 - b, 512 - b};
        double mean[4], sd[4], lo = INFINITY, hi = -INFINITY, avg = 0;
        for (int c = 0; c < 4; c++) {
            box_stats(img->pix, 512, x0s[c], y0s[c], x0s[c] + b - 1, y0s[c] + b - 1, &mean[c], &sd[c]);
            /* The noise about the (sloped) sky model. */
            double s2 = 0;
            for (long y = y0s[c]; y < y0s[c] + b; y++)
                for (long x = x0s[c]; x < x0s[c] + b; x++) {
                    double r = img->pix[y * 512 + x] - hilal_sim_sky_adu(t, k, x + 1.0, y + 1.0);
                    s2 += r * r;
                }
            sd[c] = sqrt(s2 / (b * b));
            /* The box mean is the sky at the box centre (linear gradient). */
            double xc = x0s[c] + 0.5 * (b - 1) + 1.0, yc = y0s[c] + 0.5 * (b - 1) + 1.0;
            double expect = hilal_sim_sky_adu(t, k, xc, yc);
            double noise = sqrt(expect * g + rn2) / g;
            CHECK(fabs(mean[c] - expect) < 4.0 * noise / b, "%s corner %d: mean %.3f, sky %.3f",
                  k ? "sci" : "ref", c, mean[c], expect);
            CHECK(fabs(sd[c] / noise - 1.0) < 0.05, "%s corner %d: rms %.3f, expected %.3f",
                  k ? "sci" : "ref", c, sd[c], noise);
            lo = fmin(lo, mean[c]);
            hi = fmax(hi, mean[c]);
            avg += 0.25 * mean[c];
        }
        /* Independent of the gradient direction: the four corners average
         * to the central sky, and their spread is between g*a and g*a*sqrt2
         * times the sky (a = 0.875, the box centres' normalised position). */
        double a = 1.0 - (double)b / 512.0;
        CHECK(fabs(avg - sky) < 0.002 * sky, "%s sky: corners average %.2f, option %.2f",
              k ? "sci" : "ref", avg, sky);
        CHECK(hi - lo > 0.95 * sky * 0.2 * a && hi - lo < 1.05 * sky * 0.2 * a * sqrt(2.0),
              "%s gradient: corner spread %.2f ADU", k ? "sci" : "ref", hi - lo);
    }
    /* Low counts (exact Poisson below 30 e-): without read noise and
     * gradient, the science pixels are whole electrons with mean = variance. */
    {
        hilal_sim_options q = o;
        q.sky_sci_adu = 4.0; /* 6 e- */
        q.rdnoise_e = 0.0;
        q.sky_gradient_frac = 0.0;
        hilal_image *s2 = NULL;
        if (make(&q, &s2, NULL, NULL)) {
            double m = 0, v = 0;
            int whole = 1;
            size_t np = 512 * 512;
            for (size_t i = 0; i < np; i++) {
                double e = s2->pix[i] * q.gain_e_per_adu;
                whole &= fabs(e - nearbyint(e)) < 1e-3;
                m += e;
            }
            m /= np;
            for (size_t i = 0; i < np; i++) {
                double e = s2->pix[i] * q.gain_e_per_adu - m;
                v += e * e;
            }
            v /= np - 1;
            CHECK(whole && fabs(m - 6.0) < 0.03 && fabs(v / 6.0 - 1) < 0.02,
                  "Poisson at 6 e-/px: mean %.4f, variance %.4f, whole electrons %d", m, v, whole);
        }
        hilal_image_free(s2);
    }
    CHECK(sci->meta.gain_e_per_adu == o.gain_e_per_adu &&
              fabs(ref->meta.gain_e_per_adu - o.gain_e_per_adu * o.ref_depth) < 1e-12 &&
              fabs(ref->meta.rdnoise_e - o.rdnoise_e * 2.0) < 1e-12,
          "effective gain and read noise in the metadata");
cleanup:
    hilal_image_free(sci);
    hilal_image_free(ref);
    hilal_sim_truth_free(t);
}

/* Aperture sum of a around (x, y) (FITS) of radius r, minus b (may be NULL). */
static double aperture(const float *a, const float *b, long nx, long ny, double x, double y, double r)
{
    double s = 0;
    for (long j = (long)floor(y - 1 - r); j <= (long)ceil(y - 1 + r); j++)
        for (long i = (long)floor(x - 1 - r); i <= (long)ceil(x - 1 + r); i++) {
            if (i < 0 || j < 0 || i >= nx || j >= ny)
                continue;
            double dx = i - (x - 1), dy = j - (y - 1);
            if (dx * dx + dy * dy > r * r)
                continue;
            s += a[j * nx + i] - (b ? b[j * nx + i] : 0.0f);
        }
    return s;
}

static int isolated(const hilal_sim_truth *t, size_t k, double r)
{
    const hilal_sim_event *e = &t->events[k];
    for (size_t i = 0; i < t->nevents; i++) {
        const hilal_sim_event *o = &t->events[i];
        if (i == k)
            continue;
        if (o->type == HILAL_SIM_BAD_COLUMN ? fabs(o->x - e->x) < r + 1
                                            : hypot(o->x - e->x, o->y - e->y) < r + 4)
            return 0;
    }
    return 1;
}

/* Events measured in S minus the no-event S of the same seed (the noise of
 * untouched pixels is shared, so the difference holds the events). */
static void test_event_fluxes(void)
{
    hilal_sim_options o = small(512);
    o.n_transients = 20;
    o.n_variables = 4;
    o.n_cosmics = 30;
    sim_pair pair = {0};
    if (!sim_pair_make(&o, &pair))
        goto cleanup;
    long nx = o.nx, ny = o.ny;
    int ntr = 0, nvar = 0, ncr = 0, nbc = 0;
    double worst_tr = 0, worst_cr = 0;
    for (size_t k = 0; k < pair.t->nevents; k++) {
        const hilal_sim_event *e = &pair.t->events[k];
        if (e->type == HILAL_SIM_TRANSIENT || e->type == HILAL_SIM_VARIABLE) {
            double r = 5.0 * e->fwhm_px;
            if (fabs(e->ideal_snr) < 20 || !isolated(pair.t, k, r))
                continue;
            double f = aperture(pair.sci->pix, pair.sci0->pix, nx, ny, e->x, e->y, r);
            double rel = (f - e->diff_flux_adu) / e->diff_flux_adu;
            CHECK(fabs(rel) < 0.04, "%s %ld (S/N %.1f): aperture %.1f, truth %.1f ADU",
                  hilal_sim_event_name(e->type), e->id, e->ideal_snr, f, e->diff_flux_adu);
            if (e->type == HILAL_SIM_TRANSIENT) {
                ntr++;
                worst_tr = fmax(worst_tr, fabs(rel));
            } else {
                nvar++;
            }
        } else if (e->type == HILAL_SIM_COSMIC) {
            if (!isolated(pair.t, k, 4.0))
                continue;
            /* Added after the noise: the difference is the deposit exactly
             * (unless it saturates). */
            double f = aperture(pair.sci->pix, pair.sci0->pix, nx, ny, e->x, e->y, 3.5), peak = 0;
            for (long j = lround(e->y) - 4; j <= lround(e->y) + 2; j++)
                for (long i = lround(e->x) - 4; i <= lround(e->x) + 2; i++)
                    if (i >= 0 && j >= 0 && i < nx && j < ny)
                        peak = fmax(peak, pair.sci->pix[j * nx + i] - pair.sci0->pix[j * nx + i]);
            double rel = fabs(f - e->diff_flux_adu) / e->diff_flux_adu;
            worst_cr = fmax(worst_cr, rel);
            CHECK(rel < 1e-3 && peak > 0.3 * e->diff_flux_adu && e->extent_px >= 1 && e->extent_px <= 3,
                  "cosmic %ld: sum %.2f truth %.2f, peak %.2f (sharp)", e->id, f, e->diff_flux_adu, peak);
            ncr++;
        } else if (e->type == HILAL_SIM_BAD_COLUMN) {
            long col = lround(e->x) - 1, rows = lround(e->extent_px);
            double rn = o.rdnoise_e / o.gain_e_per_adu, mean, sd;
            int ok = 1;
            if (e->level_adu > 0) {
                for (long y = 0; y < rows; y++) {
                    double d = pair.sci->pix[y * nx + col] - pair.sci0->pix[y * nx + col];
                    if (pair.sci->pix[y * nx + col] < o.saturate_adu && fabs(d - e->level_adu) > 0.05)
                        ok = 0;
                }
                CHECK(ok, "hot column %ld adds %.1f ADU over %ld rows", col + 1, e->level_adu, rows);
            } else {
                box_stats(pair.sci->pix, nx, col, 0, col, rows - 1, &mean, &sd);
                CHECK(fabs(mean) < 5 * rn / sqrt(rows) && fabs(sd / rn - 1) < 0.2,
                      "dead column %ld reads %.2f +- %.2f ADU (read noise %.2f)", col + 1, mean, sd, rn);
            }
            double above = pair.sci->pix[rows * nx + col] - pair.sci0->pix[rows * nx + col];
            CHECK(rows >= ny || above == 0.0, "column %ld is clean above its %ld rows", col + 1, rows);
            nbc++;
        }
    }
    CHECK(ntr >= 3 && ncr >= 10 && nbc == 2, "measured %d transients (worst %.3f), %d variables, "
          "%d cosmics (worst %.2g), %d bad columns", ntr, worst_tr, nvar, ncr, worst_cr, nbc);
cleanup:
    sim_pair_free(&pair);
}

/* Flux-weighted centroid of v - sky model in a box (FITS coordinates). */
static void centroid(const float *v, long nx, const hilal_sim_truth *t, int which, double x, double y,
                     int h, double *cx, double *cy)
{
    double s = 0, sx = 0, sy = 0;
    for (long j = lround(y) - 1 - h; j <= lround(y) - 1 + h; j++)
        for (long i = lround(x) - 1 - h; i <= lround(x) - 1 + h; i++) {
            double d = v[j * nx + i] - hilal_sim_sky_adu(t, which, i + 1.0, j + 1.0);
            s += d;
            sx += d * (i + 1);
            sy += d * (j + 1);
        }
    *cx = sx / s;
    *cy = sy / s;
}

/* Stars live on the sky: each frame's WCS maps them to their pixels, the
 * offset/rotation options mean what the documentation says, the pixels put
 * the light there, and truth rows are consistent with the science WCS. */
static void test_wcs_geometry(void)
{
    hilal_sim_options o = small(512);
    o.offset_x_px = 10.5;
    o.offset_y_px = -7.25;
    o.rotate_deg = 3.0;
    o.n_transients = 10;
    /* A sparse field of bright stars, so that many are isolated. */
    o.star_density = 200;
    o.mag_bright = 13.5;
    o.mag_faint = 16.5;
    o.keep_model = 1;
    hilal_image *sci = NULL, *ref = NULL;
    hilal_sim_truth *t = NULL;
    hilal_error err = {0};
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    CHECK(strcmp(hilal_wcs_projection(sci->meta.wcs), "TAN") == 0 &&
              strcmp(hilal_wcs_projection(ref->meta.wcs), "TAN") == 0,
          "TAN projections");
    double th = 3.0 * M_PI / 180.0, c0 = 256.5;
    double worst_wcs = 0, worst_affine = 0;
    for (size_t i = 0; i < t->nstars; i++) {
        const hilal_sim_star *s = &t->stars[i];
        double x[2], y[2];
        CHECK_OK(hilal_wcs_sky2pix(ref->meta.wcs, 1, &s->ra_deg, &s->dec_deg, &x[0], &y[0], &err), &err);
        CHECK_OK(hilal_wcs_sky2pix(sci->meta.wcs, 1, &s->ra_deg, &s->dec_deg, &x[1], &y[1], &err), &err);
        worst_wcs = fmax(worst_wcs, fmax(hypot(x[0] - s->x_ref, y[0] - s->y_ref),
                                         hypot(x[1] - s->x_sci, y[1] - s->y_sci)));
        /* Documented meaning: p_sci = R(theta) (p_ref - c) + c + offset. */
        double dx = s->x_ref - c0, dy = s->y_ref - c0;
        double xs = cos(th) * dx - sin(th) * dy + c0 + 10.5, ys = sin(th) * dx + cos(th) * dy + c0 - 7.25;
        worst_affine = fmax(worst_affine, hypot(xs - s->x_sci, ys - s->y_sci));
    }
    CHECK(worst_wcs < 1e-6, "stars through both WCS: worst %.2g px", worst_wcs);
    CHECK(worst_affine < 1e-6, "offset and rotation as documented: worst %.2g px", worst_affine);

    /* Pixel scale from two stars' sky separation. */
    const hilal_sim_star *a = &t->stars[0], *b = &t->stars[1];
    double d1 = a->dec_deg * M_PI / 180, d2 = b->dec_deg * M_PI / 180;
    double sep = acos(fmin(1.0, sin(d1) * sin(d2) + cos(d1) * cos(d2) *
                                                       cos((a->ra_deg - b->ra_deg) * M_PI / 180))) *
                 180 / M_PI * 3600;
    double pix = hypot(a->x_ref - b->x_ref, a->y_ref - b->y_ref);
    CHECK(fabs(sep / pix - 1.0) < 1e-3, "pixel scale %.5f arcsec/px", sep / pix);

    double worst_ev = 0;
    for (size_t i = 0; i < t->nevents; i++) {
        const hilal_sim_event *e = &t->events[i];
        double x, y, ra, dec;
        CHECK_OK(hilal_wcs_sky2pix(sci->meta.wcs, 1, &e->ra_deg, &e->dec_deg, &x, &y, &err), &err);
        CHECK_OK(hilal_wcs_pix2sky(sci->meta.wcs, 1, &e->x, &e->y, &ra, &dec, &err), &err);
        worst_ev = fmax(worst_ev, hypot(x - e->x, y - e->y));
        worst_ev = fmax(worst_ev, 3600.0 * hypot((ra - e->ra_deg) * cos(dec * M_PI / 180), dec - e->dec_deg));
    }
    CHECK(worst_ev < 1e-6, "truth rows consistent with the science WCS: worst %.2g", worst_ev);

    /* The light is where the WCS says: centroids of bright isolated
     * unsaturated stars in both frames; and the noise-free models hold
     * flux_ref in the reference and flux_ratio x flux_ref in the science
     * frame. */
    int measured = 0;
    for (size_t i = 0; i < t->nstars; i++) {
        const hilal_sim_star *s = &t->stars[i];
        if (s->sat_ref || s->sat_sci || s->variable || s->flux_ref_adu < 2e4 || s->x_ref < 30 ||
            s->y_ref < 30 || s->x_ref > 482 || s->y_ref > 482 || s->x_sci < 30 || s->y_sci < 30 ||
            s->x_sci > 482 || s->y_sci > 482)
            continue;
        int alone = 1;
        for (size_t j = 0; j < t->nstars; j++)
            if (j != i && t->stars[j].flux_ref_adu > 0.001 * s->flux_ref_adu &&
                hypot(t->stars[j].x_ref - s->x_ref, t->stars[j].y_ref - s->y_ref) < 25)
                alone = 0;
        for (size_t j = 0; j < t->ngalaxies; j++)
            if (hypot(t->galaxies[j].x_ref - s->x_ref, t->galaxies[j].y_ref - s->y_ref) < 80)
                alone = 0;
        for (size_t j = 0; j < t->nevents; j++)
            if (hypot(t->events[j].x - s->x_sci, t->events[j].y - s->y_sci) < 25 ||
                (t->events[j].type == HILAL_SIM_BAD_COLUMN && fabs(t->events[j].x - s->x_sci) < 25))
                alone = 0;
        if (!alone)
            continue;
        /* Noise-free centroids (a wide box keeps the truncation bias
         * small) and noisy ones (tolerance from the photon and sky noise:
         * sigma_x^2 = sum (x - xc)^2 var / F^2 over the box). */
        double cx, cy;
        centroid(t->model_ref, 512, t, 0, s->x_ref, s->y_ref, 18, &cx, &cy);
        CHECK(hypot(cx - s->x_ref, cy - s->y_ref) < 0.01, "ref model centroid (%.4f, %.4f) vs (%.4f, %.4f)",
              cx, cy, s->x_ref, s->y_ref);
        centroid(t->model_sci, 512, t, 1, s->x_sci, s->y_sci, 18, &cx, &cy);
        CHECK(hypot(cx - s->x_sci, cy - s->y_sci) < 0.01, "sci model centroid (%.4f, %.4f) vs (%.4f, %.4f)",
              cx, cy, s->x_sci, s->y_sci);
        double tol_ref = 5.0 * sqrt(15.0 * 280.0 * 13.0 * 13.0) / s->flux_ref_adu;
        double tol_sci = 5.0 * sqrt(15.0 * 280.0 * 24.0 * 24.0) / s->flux_sci_adu;
        centroid(ref->pix, 512, t, 0, s->x_ref, s->y_ref, 7, &cx, &cy);
        CHECK(hypot(cx - s->x_ref, cy - s->y_ref) < 0.05 + tol_ref, "ref centroid (%.3f, %.3f) vs (%.3f, %.3f)",
              cx, cy, s->x_ref, s->y_ref);
        centroid(sci->pix, 512, t, 1, s->x_sci, s->y_sci, 7, &cx, &cy);
        CHECK(hypot(cx - s->x_sci, cy - s->y_sci) < 0.05 + tol_sci, "sci centroid (%.3f, %.3f) vs (%.3f, %.3f)",
              cx, cy, s->x_sci, s->y_sci);
        double f[2];
        for (int k = 0; k < 2; k++) {
            const float *m = k ? t->model_sci : t->model_ref;
            double x = k ? s->x_sci : s->x_ref, y = k ? s->y_sci : s->y_ref, sum = 0;
            for (long j = lround(y) - 21; j <= lround(y) + 19; j++)
                for (long ii = lround(x) - 21; ii <= lround(x) + 19; ii++)
                    if (hypot(ii + 1 - x, j + 1 - y) < 20)
                        sum += m[j * 512 + ii] - hilal_sim_sky_adu(t, k, ii + 1.0, j + 1.0);
            f[k] = sum;
        }
        CHECK(fabs(f[0] / s->flux_ref_adu - 1) < 0.005 && fabs(f[1] / (o.flux_ratio * s->flux_ref_adu) - 1) < 0.005,
              "star %zu: model holds %.1f (ref, truth %.1f) and %.1f (sci, flux_ratio x ref %.1f) ADU",
              i + 1, f[0], s->flux_ref_adu, f[1], o.flux_ratio * s->flux_ref_adu);
        measured++;
    }
    CHECK(measured >= 5, "measured %d bright isolated stars", measured);
cleanup:
    hilal_image_free(sci);
    hilal_image_free(ref);
    hilal_sim_truth_free(t);
}

static void test_saturation(void)
{
    for (int bleed = 0; bleed <= 1; bleed++) {
        hilal_sim_options o = small(384);
        o.saturate_adu = 20000;
        o.zeropoint_mag = 30.0; /* 16 times brighter stars: several saturate */
        o.star_density = 6000;
        o.bleed = bleed;
        o.no_events = 1;
        hilal_image *sci = NULL, *ref = NULL;
        hilal_sim_truth *t = NULL;
        if (!make(&o, &sci, &ref, &t))
            continue;
        for (int k = 0; k < 2; k++) {
            const hilal_image *img = k ? sci : ref;
            size_t n = (size_t)o.nx * o.ny, at = 0, above = 0;
            for (size_t i = 0; i < n; i++) {
                above += img->pix[i] > 20000.0f;
                at += img->pix[i] == 20000.0f;
            }
            CHECK(above == 0 && at > 0 && img->meta.saturate_adu == 20000.0,
                  "%s bleed=%d: %zu pixels at SATURATE, none above", k ? "sci" : "ref", bleed, at);
            CHECK(hilal_image_count_mask(img, HILAL_MASK_SAT) == at &&
                      hilal_image_count_mask(img, 0xffff) == at,
                  "%s: the saturated pixels, and only they, are masked SAT", k ? "sci" : "ref");
        }
        int nsat = 0, nrun = 0, ncons = 0;
        for (size_t i = 0; i < t->nstars; i++) {
            const hilal_sim_star *s = &t->stars[i];
            if (!s->sat_sci || s->x_sci < 2 || s->y_sci < 2 || s->x_sci > 383 || s->y_sci > 383)
                continue;
            long cx = lround(s->x_sci) - 1, cy = lround(s->y_sci) - 1;
            CHECK(sci->pix[cy * 384 + cx] == 20000.0f, "saturated star %zu centre at SATURATE", i + 1);
            /* Extent of the saturated run along the row and the column. */
            int row = 0, col = 0;
            for (long d = -30; d <= 30; d++) {
                if (cx + d >= 0 && cx + d < 384)
                    row += sci->pix[cy * 384 + cx + d] == 20000.0f;
                if (cy + d >= 0 && cy + d < 384)
                    col += sci->pix[(cy + d) * 384 + cx] == 20000.0f;
            }
            if (s->peak_sci_adu > 4 * 20000.0) {
                CHECK(bleed ? col > row + 2 : abs(col - row) <= 2,
                      "bleed=%d: saturated run %d px along the column, %d along the row (peak %.0f)",
                      bleed, col, row, s->peak_sci_adu);
                nrun++;
                if (bleed && s->peak_sci_adu < 40 * 20000.0 && cx >= 15 && cx < 384 - 15 &&
                    cy >= 60 && cy < 384 - 60) {
                    /* Bleeding moves charge, it does not lose it (while the
                     * trail stays on the chip). */
                    double sum = 0;
                    for (long y = cy - 60; y <= cy + 60; y++)
                        for (long x = cx - 15; x <= cx + 15; x++)
                            sum += sci->pix[y * 384 + x] - hilal_sim_sky_adu(t, 1, x + 1.0, y + 1.0);
                    CHECK(fabs(sum / s->flux_sci_adu - 1) < 0.05,
                          "bleed keeps the charge: %.0f of %.0f ADU", sum, s->flux_sci_adu);
                    ncons++;
                }
            }
            nsat++;
        }
        CHECK(nsat >= 3 && nrun >= 1 && (!bleed || ncons >= 1),
              "bleed=%d: %d saturated stars, %d run shapes, %d charge sums checked", bleed, nsat,
              nrun, ncons);
        hilal_image_free(sci);
        hilal_image_free(ref);
        hilal_sim_truth_free(t);
    }
}

static int same_file(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa != NULL && fb != NULL;
    while (same) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb)
            same = 0;
        if (ca == EOF || cb == EOF)
            break;
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    return same;
}

static long count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    long n = 0;
    int c;
    if (f == NULL)
        return -1;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

/* Files: byte-identical for the same seed, readable by the project's FITS
 * reader with the same pixels and metadata, 16-bit output. */
static void test_files(void)
{
    char d1[4096], d2[4096], p1[4200], p2[4200];
    hilal_test_tmpdir("sim_a", d1, sizeof d1);
    hilal_test_tmpdir("sim_b", d2, sizeof d2);
    hilal_sim_options o = small(256);
    o.n_transients = 5;
    o.n_variables = 1;
    o.n_cosmics = 7;
    hilal_error err = {0};
    CHECK_OK(hilal_sim_write(&o, d1, &err), &err);
    CHECK_OK(hilal_sim_write(&o, d2, &err), &err);
    const char *names[] = {"ref.fits", "sci.fits", "truth.csv", "stars.csv", "galaxies.csv", "README.txt"};
    for (int i = 0; i < 6; i++) {
        snprintf(p1, sizeof p1, "%s/%s", d1, names[i]);
        snprintf(p2, sizeof p2, "%s/%s", d2, names[i]);
        CHECK(same_file(p1, p2), "%s byte-identical for the same seed", names[i]);
    }
    snprintf(p1, sizeof p1, "%s/truth.csv", d1);
    CHECK(count_lines(p1) == 1 + 5 + 1 + 7 + 2, "truth.csv rows: %ld lines", count_lines(p1));

    hilal_image *sci = NULL, *ref = NULL, *fsci = NULL;
    hilal_sim_truth *t = NULL;
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    snprintf(p1, sizeof p1, "%s/stars.csv", d1);
    CHECK(count_lines(p1) == 1 + (long)t->nstars, "stars.csv rows");
    snprintf(p1, sizeof p1, "%s/sci.fits", d1);
    CHECK_OK(hilal_fits_read_image(p1, 0, &fsci, &err), &err);
    if (fsci != NULL) {
        CHECK(fsci->nx == 256 && memcmp(fsci->pix, sci->pix, 256 * 256 * sizeof(float)) == 0,
              "file pixels equal the in-memory simulation");
        double v;
        hilal_fits_key_state ks;
        CHECK_OK(hilal_fits_header_get_double(fsci->meta.header, fsci->meta.nheader_cards, "GAIN", &v, &ks, &err), &err);
        CHECK(ks == HILAL_FITS_KEY_FOUND && v == 1.5, "GAIN %g", v);
        CHECK_OK(hilal_fits_header_get_double(fsci->meta.header, fsci->meta.nheader_cards, "SATURATE", &v, &ks, &err), &err);
        CHECK(ks == HILAL_FITS_KEY_FOUND && v == 60000, "SATURATE %g", v);
        CHECK_OK(hilal_fits_header_get_double(fsci->meta.header, fsci->meta.nheader_cards, "MJD-OBS", &v, &ks, &err), &err);
        CHECK(ks == HILAL_FITS_KEY_FOUND && v == o.mjd_sci, "MJD-OBS %g", v);
        char val[80];
        CHECK(hilal_fits_header_get(fsci->meta.header, fsci->meta.nheader_cards, "FILTER", val, sizeof val) ==
                      HILAL_FITS_KEY_FOUND && strcmp(val, "r") == 0,
              "FILTER '%s'", val);
        double x = 100, y = 50, ra1, de1, ra2, de2;
        CHECK_OK(hilal_wcs_pix2sky(fsci->meta.wcs, 1, &x, &y, &ra1, &de1, &err), &err);
        CHECK_OK(hilal_wcs_pix2sky(sci->meta.wcs, 1, &x, &y, &ra2, &de2, &err), &err);
        CHECK(ra1 == ra2 && de1 == de2, "file WCS equals the in-memory WCS");
    }
    hilal_image_free(fsci);
    fsci = NULL;

    /* 16-bit output: integers through BZERO, identical to the in-memory image. */
    unmake(&sci, &ref, &t);
    o.bitpix = 16;
    CHECK_OK(hilal_sim_write(&o, d2, &err), &err);
    if (!make(&o, &sci, &ref, &t))
        goto cleanup;
    snprintf(p2, sizeof p2, "%s/sci.fits", d2);
    CHECK_OK(hilal_fits_read_image(p2, 0, &fsci, &err), &err);
    if (fsci != NULL) {
        int integral = 1;
        for (long i = 0; i < 256 * 256; i++)
            integral &= sci->pix[i] == floorf(sci->pix[i]) && sci->pix[i] >= 0 && sci->pix[i] <= 65535;
        CHECK(fsci->meta.bitpix == 16 && fsci->meta.bzero == 32768 && integral &&
                  memcmp(fsci->pix, sci->pix, 256 * 256 * sizeof(float)) == 0,
              "16-bit file: BITPIX %d BZERO %g, integral pixels equal to memory", fsci->meta.bitpix,
              fsci->meta.bzero);
    }

    /* An output path that is a file, not a directory. */
    hilal_error_clear(&err);
    snprintf(p1, sizeof p1, "%s/truth.csv/sub", d1);
    hilal_status st = hilal_sim_write(&o, p1, &err);
    CHECK(st == HILAL_ERR_IO && strstr(err.msg, "truth.csv") != NULL, "unwritable output: %s", err.msg);
cleanup:
    hilal_image_free(sci);
    hilal_image_free(ref);
    hilal_image_free(fsci);
    hilal_sim_truth_free(t);
}

int main(void)
{
    test_options();
    test_determinism_and_counts();
    test_sky_noise();
    test_event_fluxes();
    test_wcs_geometry();
    test_saturation();
    test_files();
    return hilal_test_finish();
}
