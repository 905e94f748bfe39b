/* Stage detect: false positives on pure noise against the Gaussian-field
 * expectation, completeness for injected brightening and fading sources,
 * merging, exclusion of masked and edge pixels, the cap, ordering, errors
 * and the stage through a runner. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/detect.h"
#include "test_detect_synth.h"
#include "testutil.h"

extern const hilal_stage hilal_stage_detect;

static hilal_detect_params params(double thresh, double merge, long margin, size_t cap)
{
    hilal_detect_params p = {thresh, merge, margin, cap};
    return p;
}

/* Expected number of local maxima above u of a smooth unit-variance
 * Gaussian field over area A (px^2): the Euler characteristic density of
 * the excursion set (Adler 1981; Worsley 1996),
 *   E(u) = A lambda / (2 pi)^(3/2) u exp(-u^2 / 2),
 * lambda = Var(dS/dx) / Var(S). For white noise filtered with a Gaussian
 * PSF of variance s2 (the matched filter of S), the correlation function
 * is Gaussian of variance 2 s2 and lambda = 1 / (2 s2). Per sign.
 * Sampling: detection sees the pixel nearest to a maximum, not the maximum.
 * Near a maximum of height h the field is h (1 - lambda r^2 / 2) (its
 * expected curvature given the height is -h lambda), so a maximum is seen
 * above u when h > u / (1 - lambda |delta|^2 / 2), delta the offset of the
 * nearest pixel, uniform over the pixel: E is averaged over delta. */
static double expected_maxima(double area, double s2, double u)
{
    const double lambda = 1.0 / (2.0 * s2);
    double sum = 0;
    const int k = 20;
    for (int j = 0; j < k; j++)
        for (int i = 0; i < k; i++) {
            double dx = (i + 0.5) / k - 0.5, dy = (j + 0.5) / k - 0.5;
            double h = u / (1.0 - 0.5 * lambda * (dx * dx + dy * dy));
            sum += h * exp(-0.5 * h * h);
        }
    return area * lambda / pow(2.0 * SYNTH_PI, 1.5) * sum / (k * k);
}

static size_t count_sign(const hilal_candidate *c, size_t n, int positive)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += positive ? c[i].snr > 0 : c[i].snr < 0;
    return k;
}

static void test_noise(void)
{
    hilal_error err = {0};
    hilal_frame f;
    const double sigma = 1.5;
    synth_model m = synth_gaussian(sigma);
    const long nx = 2048, ny = 2048, margin = 8;
    synth_frame(&f, nx, ny, &m, 15, 12345, 1.0);
    synth_finish(&f, 1.0);
    /* Variance of the pixel-integrated Gaussian: sigma^2 + 1/12. */
    const double s2 = sigma * sigma + 1.0 / 12.0;
    const double area = (double)(nx - 2 * margin) * (double)(ny - 2 * margin);

    const double thr[3] = {3.5, 4.0, 5.0};
    for (int t = 0; t < 3; t++) {
        hilal_candidate *c = NULL;
        size_t n = 0, nfound = 0;
        hilal_detect_params p = params(thr[t], 0, margin, 100000);
        hilal_status st = hilal_detect_peaks(&f.diff, &p, &c, &n, &nfound, &err);
        CHECK_OK(st, &err);
        double e = 2.0 * expected_maxima(area, s2, thr[t]);
        size_t npos = count_sign(c, n, 1), nneg = count_sign(c, n, 0);
        printf("pure noise %ldx%ld, %.1f sigma: %zu peaks (%zu +, %zu -), expected %.1f\n", nx, ny,
               thr[t], n, npos, nneg, e);
        if (thr[t] < 5) {
            /* ~100-700 expected: within 10% (the accuracy of the formula)
             * plus 3 Poisson standard deviations. */
            CHECK(fabs((double)n - e) < 0.1 * e + 3.0 * sqrt(e),
                  "%.1f sigma: %zu peaks, expected %.1f", thr[t], n, e);
            CHECK(fabs((double)npos - (double)nneg) < 4.0 * sqrt(e) + 2.0,
                  "both signs alike: %zu + vs %zu -", npos, nneg);
        } else {
            /* ~1.3 expected at 5 sigma: fewer than 2x expected, at least 3. */
            CHECK((double)n < fmax(2.0 * e, 3.0), "5 sigma: %zu false positives, expected %.2f",
                  n, e);
        }
        for (size_t i = 0; i < n; i++)
            CHECK(fabs(c[i].snr) >= thr[t], "below threshold: %g", c[i].snr);
        free(c);
    }
    hilal_frame_clear(&f);
}

static void test_completeness(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.6);
    const long nx = 600, ny = 600;
    synth_frame(&f, nx, ny, &m, 17, 777, 1.0);
    synth_rng r = {4242, 0, 0};
    enum { MAXS = 1000 };
    static double sx[MAXS], sy[MAXS], ssnr[MAXS];
    int ns = 0;
    /* A grid of sources 24 px apart, alternating signs, S/N 7..40 at
     * random sub-pixel positions. */
    for (long gy = 24; gy < ny - 24; gy += 24)
        for (long gx = 24; gx < nx - 24; gx += 24) {
            double x0 = gx + synth_uniform(&r) - 0.5, y0 = gy + synth_uniform(&r) - 0.5;
            double snr = (7.0 + 33.0 * synth_uniform(&r)) * ((ns % 2) ? -1 : 1);
            synth_add_point(&f, &m, x0, y0, synth_amp(&f, snr));
            sx[ns] = x0;
            sy[ns] = y0;
            ssnr[ns] = snr;
            ns++;
        }
    synth_finish(&f, 1.0);
    hilal_detect_params p = params(5.0, 0, 8, 10000);
    size_t nfound = 0;
    hilal_status st = hilal_detect_peaks(&f.diff, &p, &f.cands, &f.ncands, &nfound, &err);
    CHECK_OK(st, &err);
    int found = 0, wrong_sign = 0;
    double ratio_sum = 0;
    char *used = calloc(f.ncands, 1);
    for (int i = 0; i < ns; i++) {
        const hilal_candidate *c = synth_match(&f, sx[i] + 1, sy[i] + 1, 1.5);
        if (c == NULL)
            continue;
        found++;
        used[c - f.cands] = 1;
        if ((c->snr > 0) != (ssnr[i] > 0))
            wrong_sign++;
        ratio_sum += c->snr / ssnr[i];
    }
    size_t spurious = 0;
    for (size_t k = 0; k < f.ncands; k++)
        spurious += !used[k];
    free(used);
    printf("completeness: %d of %d sources (S/N 7-40, both signs) found, %zu spurious, "
           "mean snr/true %.3f\n",
           found, ns, spurious, ratio_sum / found);
    CHECK(ns > 400, "enough sources injected (%d)", ns);
    CHECK(found >= (int)(0.98 * ns), "completeness %d / %d", found, ns);
    CHECK(wrong_sign == 0, "%d detections with the wrong sign", wrong_sign);
    /* Expected false positives on 600x600 at 5 sigma ~ 0.2. */
    CHECK(spurious <= 2, "%zu spurious detections", spurious);
    /* The peak pixel is within half a pixel of the centre: S_corr there is
     * 0.95-1 of the true peak, plus unit noise. */
    CHECK(ratio_sum / found > 0.93 && ratio_sum / found < 1.02, "snr ratio %.3f",
          ratio_sum / found);

    /* Order, numbering and the unmeasured fields. */
    for (size_t k = 0; k < f.ncands; k++) {
        const hilal_candidate *c = &f.cands[k];
        CHECK(c->cand_id == (int64_t)k + 1, "cand_id %lld at %zu", (long long)c->cand_id, k);
        if (k > 0)
            CHECK(fabs(c->snr) <= fabs(f.cands[k - 1].snr), "sorted by |snr| at %zu", k);
        CHECK(c->x == floor(c->x) && c->y == floor(c->y), "peak pixel positions");
        CHECK(isnan(c->flux) && isnan(c->rb) && isnan(c->ra), "unmeasured fields are NaN");
    }
    hilal_frame_clear(&f);
}

static void test_merge(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5); /* FWHM 3.53 px */
    synth_frame(&f, 128, 128, &m, 15, 1, 0.0);
    /* Two brightening sources 6 px apart (two maxima in S_corr: the
     * separation exceeds 2 sigma of S_corr's profile, 2 x 2.2 px), and a
     * fading one 5 px from a brightening one elsewhere. */
    synth_add_point(&f, &m, 40.2, 60.0, synth_amp(&f, 30));
    synth_add_point(&f, &m, 46.2, 60.0, synth_amp(&f, 25));
    synth_add_point(&f, &m, 90.0, 60.0, synth_amp(&f, 30));
    synth_add_point(&f, &m, 95.0, 60.0, synth_amp(&f, -30));
    synth_finish(&f, 1.0);

    hilal_candidate *c = NULL;
    size_t n = 0;
    /* Radius 0: max(3, FWHM) = 3.53 px < 6 px: deblended, four candidates. */
    hilal_detect_params p = params(5.0, 0, 8, 100);
    CHECK_OK(hilal_detect_peaks(&f.diff, &p, &c, &n, NULL, &err), &err);
    CHECK(n == 4, "auto radius keeps the 6 px pair apart: %zu candidates", n);
    for (size_t k = 0; k < n; k++)
        CHECK((c[k].flags & HILAL_CAND_MERGED) == 0, "no merge flag");
    free(c);

    /* Radius 7 px: the same-sign pair merges into the brighter one, flagged;
     * the opposite-sign pair (a dipole) is never merged. */
    p = params(5.0, 7.0, 8, 100);
    CHECK_OK(hilal_detect_peaks(&f.diff, &p, &c, &n, NULL, &err), &err);
    CHECK(n == 3, "merged: %zu candidates", n);
    int merged_ok = 0, dipole_pos = 0, dipole_neg = 0;
    for (size_t k = 0; k < n; k++) {
        if (c[k].y == 61 && fabs(c[k].x - 41) <= 1) {
            merged_ok = (c[k].flags & HILAL_CAND_MERGED) != 0 && c[k].snr > 25;
        }
        if (c[k].y == 61 && fabs(c[k].x - 91) <= 1 && c[k].snr > 0)
            dipole_pos = (c[k].flags & HILAL_CAND_MERGED) == 0;
        if (c[k].y == 61 && fabs(c[k].x - 96) <= 1 && c[k].snr < 0)
            dipole_neg = 1;
    }
    CHECK(merged_ok, "the brighter peak absorbs the fainter one and is flagged MERGED");
    CHECK(dipole_pos && dipole_neg, "opposite-sign peaks are kept apart");
    free(c);
    hilal_frame_clear(&f);
}

static void test_exclusion(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 160, 160, &m, 15, 2, 0.0);
    synth_add_point(&f, &m, 40.0, 40.0, synth_amp(&f, 20));   /* peak pixel masked BAD */
    synth_add_point(&f, &m, 120.0, 40.0, synth_amp(&f, -20)); /* NODATA hole, S_corr NaN */
    synth_add_point(&f, &m, 4.0, 100.0, synth_amp(&f, 20));   /* 4 px from the border */
    synth_add_point(&f, &m, 80.0, 120.0, synth_amp(&f, 20));  /* clean */
    synth_add_point(&f, &m, 120.0, 120.0, synth_amp(&f, 20)); /* next to an EDGE pixel */
    synth_finish(&f, 1.0);
    f.diff.mask[40 * 160 + 40] = HILAL_MASK_BAD;
    for (int y = 38; y <= 42; y++)
        for (int x = 118; x <= 122; x++) {
            f.diff.mask[y * 160 + x] = HILAL_MASK_NODATA;
            f.diff.scorr[y * 160 + x] = NAN;
        }
    f.diff.mask[120 * 160 + 121] = HILAL_MASK_EDGE;

    hilal_candidate *c = NULL;
    size_t n = 0;
    hilal_detect_params p = params(5.0, 0, 8, 100);
    CHECK_OK(hilal_detect_peaks(&f.diff, &p, &c, &n, NULL, &err), &err);
    CHECK(n == 1, "only the clean source: %zu candidates", n);
    CHECK(n >= 1 && c[0].x == 81 && c[0].y == 121, "clean source at (81, 121): (%g, %g)",
          n ? c[0].x : 0, n ? c[0].y : 0);
    free(c);

    /* Without an edge margin the source 4 px from the border is found. */
    p = params(5.0, 0, 0, 100);
    CHECK_OK(hilal_detect_peaks(&f.diff, &p, &c, &n, NULL, &err), &err);
    CHECK(n == 2, "edge margin 0: %zu candidates", n);
    int border = 0;
    for (size_t k = 0; k < n; k++)
        border |= c[k].x == 5 && c[k].y == 101;
    CHECK(border, "the source near the border is found without a margin");
    free(c);
    hilal_frame_clear(&f);
}

static void test_cap(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 256, 256, &m, 15, 3, 0.0);
    for (int i = 0; i < 20; i++)
        synth_add_point(&f, &m, 20.0 + 50 * (i % 5), 30.0 + 50 * (i / 5),
                        synth_amp(&f, (i % 2 ? -1 : 1) * (10.0 + 2.0 * i)));
    synth_finish(&f, 1.0);
    hilal_candidate *c = NULL;
    size_t n = 0, nfound = 0;
    hilal_detect_params p = params(5.0, 0, 8, 5);
    CHECK_OK(hilal_detect_peaks(&f.diff, &p, &c, &n, &nfound, &err), &err);
    CHECK(n == 5 && nfound == 20, "cap: %zu kept of %zu", n, nfound);
    /* The five most significant: i = 19..15 (|S/N| 48..40), signs alternate. */
    for (size_t k = 0; k < n; k++) {
        int i = 19 - (int)k;
        double want = (i % 2 ? -1 : 1) * (10.0 + 2.0 * i);
        CHECK(fabs(c[k].snr - want) < 0.5, "cap keeps the brightest: %g vs %g", c[k].snr, want);
    }
    free(c);
    hilal_frame_clear(&f);
}

static void test_errors(void)
{
    hilal_error err = {0};
    hilal_diff d;
    memset(&d, 0, sizeof d);
    d.nx = 10;
    d.ny = 10;
    hilal_candidate *c = (hilal_candidate *)&d; /* must be reset to NULL */
    size_t n = 7;
    hilal_detect_params p = params(5.0, 0, 8, 10);
    hilal_status st = hilal_detect_peaks(&d, &p, &c, &n, NULL, &err);
    CHECK(st == HILAL_ERR_INTERNAL && c == NULL && n == 0, "missing S_corr: %d", st);
    CHECK(strstr(err.msg, "S_corr") != NULL, "message names S_corr: %s", err.msg);

    float sc[100] = {0};
    d.scorr = sc;
    hilal_error_clear(&err);
    p.thresh_sigma = -1;
    st = hilal_detect_peaks(&d, &p, &c, &n, NULL, &err);
    CHECK(st == HILAL_ERR_RANGE && strstr(err.msg, "threshold") != NULL, "bad threshold: %s",
          err.msg);
}

static void test_stage(void)
{
    hilal_error err = {0};
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "registry config: %s", err.msg);
    if (cfg == NULL)
        return;
    CHECK(hilal_config_get_double(cfg, "detect.thresh_sigma") == 5.0, "default threshold 5");
    CHECK(hilal_config_get_int(cfg, "detect.max_candidates") == 10000, "default cap 10000");
    hilal_status st = hilal_config_set(cfg, "detect.thresh_sigma", "0.5", "test", &err);
    CHECK(st == HILAL_ERR_CONFIG, "threshold below range rejected: %s", err.msg);
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set(cfg, "detect.max_candidates", "2", "test", &err), &err);

    /* The descriptor, and its callbacks as the runner calls them (a runner
     * made of detect alone is refused: nothing before it makes DIFFERENCE). */
    const hilal_stage *stage = hilal_registry_find("detect");
    CHECK(stage == &hilal_stage_detect, "detect is registered");
    CHECK(stage->needs == HILAL_PROD_DIFFERENCE && stage->makes == HILAL_PROD_CANDIDATES,
          "needs DIFFERENCE, makes CANDIDATES");
    const hilal_stage *alone[1] = {stage};
    hilal_runner *run = NULL;
    st = hilal_runner_new(cfg, alone, 1, &run, &err);
    CHECK(st == HILAL_ERR_CONFIG && run == NULL && strstr(err.msg, "difference") != NULL,
          "chain check: %s", err.msg);
    hilal_error_clear(&err);
    void *state = NULL;
    st = stage->init(cfg, &state, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        hilal_frame f;
        synth_model m = synth_gaussian(1.5);
        synth_frame(&f, 128, 128, &m, 15, 9, 1.0);
        synth_add_point(&f, &m, 30.3, 30.7, synth_amp(&f, 12));
        synth_add_point(&f, &m, 90.6, 40.1, synth_amp(&f, -25));
        synth_add_point(&f, &m, 60.0, 100.0, synth_amp(&f, 8));
        synth_finish(&f, 1.0);
        st = stage->run(state, &f, &err);
        CHECK_OK(st, &err);
        CHECK(f.ncands == 2, "capped at 2 by the configuration: %zu", f.ncands);
        CHECK(f.ncands >= 1 && f.cands[0].snr < -20 && f.cands[0].x == 92 && f.cands[0].y == 41,
              "fading source first: snr %g at (%g, %g)", f.ncands ? f.cands[0].snr : 0,
              f.ncands ? f.cands[0].x : 0, f.ncands ? f.cands[0].y : 0);
        /* Running again replaces the candidates. */
        st = stage->run(state, &f, &err);
        CHECK(st == HILAL_OK && f.ncands == 2, "rerun replaces candidates");
        hilal_frame_clear(&f);
    }
    stage->fini(state);
    hilal_config_free(cfg);
}

/* Every extremum, by the rules of docs/vetting.md section 1 applied pixel by
 * pixel over the whole frame (independent of the stage's blocked scan):
 * |S_corr| >= thr, finite, not vetoed, at least margin px from the border,
 * all 8 neighbours on the image, finite and usable, and the strict
 * extremum of its sign (ties go to the earlier pixel in raster order). */
static size_t brute_extrema(const hilal_diff *d, double thr, long margin)
{
    const long nx = d->nx, ny = d->ny;
    size_t n = 0;
    for (long y = margin; y < ny - margin; y++)
        for (long x = margin; x < nx - margin; x++) {
            float v = d->scorr[y * nx + x];
            if (!isfinite(v) || fabsf(v) < (float)thr || (d->mask[y * nx + x] & HILAL_DETECT_VETO_MASK))
                continue;
            float s = v > 0 ? 1.0f : -1.0f, a = s * v;
            int ok = 1;
            for (long dy = -1; dy <= 1 && ok; dy++)
                for (long dx = -1; dx <= 1 && ok; dx++) {
                    long xx = x + dx, yy = y + dy;
                    if (dx == 0 && dy == 0)
                        continue;
                    if (xx < 0 || yy < 0 || xx >= nx || yy >= ny) {
                        ok = 0;
                        break;
                    }
                    float w = d->scorr[yy * nx + xx];
                    if (!isfinite(w) || (d->mask[yy * nx + xx] & HILAL_DETECT_VETO_MASK))
                        ok = 0;
                    else if ((dy < 0 || (dy == 0 && dx < 0)) ? s * w >= a : s * w > a)
                        ok = 0;
                }
            n += ok;
        }
    return n;
}

/* Whether two candidate lists hold the same detections (the fields detect
 * sets, compared bit for bit; the padding of the struct is not compared). */
static int same_cands(const hilal_candidate *a, const hilal_candidate *b, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (a[k].cand_id != b[k].cand_id || memcmp(&a[k].x, &b[k].x, sizeof a[k].x) != 0 ||
            memcmp(&a[k].y, &b[k].y, sizeof a[k].y) != 0 ||
            memcmp(&a[k].snr, &b[k].snr, sizeof a[k].snr) != 0 || a[k].flags != b[k].flags)
            return 0;
    return 1;
}

/* The scan misses no extremum anywhere (odd widths, the last columns, NaN
 * and infinite values, masked pixels), and gives the same candidates with
 * 1, 2, 3 and 7 threads. */
static void test_scan_threads(void)
{
    hilal_error err = {0};
    hilal_config *cfg = hilal_registry_config_new(&err);
    const hilal_stage *stage = hilal_registry_find("detect");
    const long sizes[][2] = {{301, 173}, {37, 41}, {16, 9}};
    for (size_t z = 0; z < sizeof sizes / sizeof sizes[0] && cfg != NULL; z++) {
        const long nx = sizes[z][0], ny = sizes[z][1];
        hilal_frame f;
        synth_model m = synth_gaussian(1.2);
        synth_frame(&f, nx, ny, &m, 11, 31 + z, 1.0);
        synth_finish(&f, 1.0);
        synth_rng r = {55 + z, 0, 0};
        for (long i = 0; i < nx * ny; i++) {
            double u = synth_uniform(&r);
            if (u < 0.01)
                f.diff.scorr[i] = NAN;
            else if (u < 0.015)
                f.diff.scorr[i] = u < 0.0125 ? INFINITY : -INFINITY;
            else if (u < 0.03)
                f.diff.mask[i] = HILAL_MASK_SAT;
            else if (u < 0.2)
                f.diff.scorr[i] *= 2.5f; /* many peaks beyond 3 sigma */
        }
        /* Extrema in the last columns and rows. */
        f.diff.scorr[(ny / 2) * nx + nx - 2] = 9.0f;
        f.diff.scorr[(ny - 2) * nx + nx / 2] = -9.0f;
        const long margin = 1;
        const size_t want = brute_extrema(&f.diff, 3.0, margin);
        hilal_candidate *ref = NULL;
        size_t nref = 0;
        hilal_detect_params p = params(3.0, 0.1, margin, 100000);
        CHECK_OK(hilal_detect_peaks(&f.diff, &p, &ref, &nref, NULL, &err), &err);
        CHECK(nref == want && want > 0, "%ld x %ld: %zu extrema found, %zu by the pixel-by-pixel rule",
              nx, ny, nref, want);
        CHECK_OK(hilal_config_set(cfg, "detect.thresh_sigma", "3", "test", &err), &err);
        CHECK_OK(hilal_config_set(cfg, "detect.merge_radius_px", "0.1", "test", &err), &err);
        CHECK_OK(hilal_config_set(cfg, "pipeline.edge_margin", "1", "test", &err), &err);
        const char *threads[] = {"1", "2", "3", "7"};
        for (size_t t = 0; t < sizeof threads / sizeof threads[0]; t++) {
            void *state = NULL;
            CHECK_OK(hilal_config_set(cfg, "pipeline.threads", threads[t], "test", &err), &err);
            CHECK_OK(stage->init(cfg, &state, &err), &err);
            CHECK_OK(stage->run(state, &f, &err), &err);
            CHECK(f.ncands == nref && same_cands(f.cands, ref, nref),
                  "%ld x %ld, %s threads: the same %zu candidates", nx, ny, threads[t], nref);
            stage->fini(state);
        }
        free(ref);
        hilal_frame_clear(&f);
    }
    hilal_config_free(cfg);
}

int main(void)
{
    test_noise();
    test_completeness();
    test_merge();
    test_exclusion();
    test_cap();
    test_errors();
    test_scan_threads();
    test_stage();
    return hilal_test_finish();
}
