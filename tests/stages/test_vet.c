/* Stage vet: real point sources get rb > 0.5 while cosmic-ray-like spikes
 * get rb < 0.5 (or are not detected); dipoles, saturation, masks, reference
 * defects and noisy tiles are flagged; the score is deterministic and in
 * [0, 1]; the stage reads its parameters from the configuration. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/detect.h"
#include "test_detect_synth.h"
#include "testutil.h"

/* detect (defaults), measure and vet f in place. */
static void pipeline(hilal_frame *f)
{
    hilal_error err = {0};
    hilal_detect_params dp = {5.0, 0, 8, 100000};
    hilal_vet_params vp;
    hilal_vet_params_default(&vp);
    free(f->cands);
    f->cands = NULL;
    CHECK_OK(hilal_detect_peaks(&f->diff, &dp, &f->cands, &f->ncands, NULL, &err), &err);
    CHECK_OK(hilal_measure_candidates(&f->diff, f->sci, 1.5, f->cands, f->ncands, &err), &err);
    CHECK_OK(hilal_vet_candidates(f, &vp, f->cands, f->ncands, &err), &err);
}

/* Amplitude of a single-pixel spike whose S_corr peak is snr:
 * S_corr = h P_D(0) / sqrt(sum P_D^2). */
static double spike_amp(const hilal_frame *f, double snr)
{
    const hilal_psf *p = &f->diff.psf_d;
    return snr * sqrt(synth_psf_sum2(p)) / p->data[p->size / 2 * p->size + p->size / 2];
}

static void print_cand(const char *what, const hilal_candidate *c)
{
    printf("  %-10s snr %7.2f fwhm %5.2f elong %5.2f sharp %5.2f neg %4.2f dip %4.2f msk %4.2f "
           "dsat %5.1f flags 0x%02x rb %.3f\n",
           what, c->snr, c->fwhm, c->elongation, c->sharpness, c->neg_frac, c->dipole,
           c->masked_frac, c->dist_sat_px, (unsigned)c->flags, c->rb);
}

/* Real PSF-shaped transients against cosmic rays (one pixel, or two
 * adjacent pixels sharing the charge), both at S/N 6-60, on one frame. */
static void real_vs_cosmic(const char *label, const synth_model *m, int psf_size, uint64_t seed)
{
    hilal_frame f;
    const long nx = 720, ny = 720;
    synth_frame(&f, nx, ny, m, psf_size, seed, 1.0);
    synth_rng r = {seed + 99, 0, 0};
    enum { MAXS = 1200 };
    static double sx[MAXS], sy[MAXS], ssnr[MAXS];
    static int kind[MAXS]; /* 0 real, 1 one-pixel CR, 2 two-pixel CR */
    int ns = 0;
    for (long gy = 24; gy < ny - 24; gy += 24)
        for (long gx = 24; gx < nx - 24; gx += 24) {
            int k = ns % 4 == 0 ? 0 : (ns % 4 == 1 ? 1 : (ns % 4 == 2 ? 0 : 2));
            double snr = 6.0 * exp(log(10.0) * synth_uniform(&r)); /* 6..60, log-uniform */
            kind[ns] = k;
            ssnr[ns] = snr;
            if (k == 0) {
                /* Brightening and fading alike. */
                double sgn = (ns / 4) % 2 ? -1 : 1;
                sx[ns] = gx + synth_uniform(&r) - 0.5;
                sy[ns] = gy + synth_uniform(&r) - 0.5;
                ssnr[ns] *= sgn;
                synth_add_point(&f, m, sx[ns], sy[ns], synth_amp(&f, ssnr[ns]));
            } else if (k == 1) {
                sx[ns] = gx;
                sy[ns] = gy;
                synth_add_pixel(&f, gx, gy, spike_amp(&f, snr));
            } else {
                /* Charge shared 60/40 between two neighbours; same total S/N. */
                double h = spike_amp(&f, snr);
                sx[ns] = gx + 0.4;
                sy[ns] = gy;
                synth_add_pixel(&f, gx, gy, 0.6 * h);
                synth_add_pixel(&f, gx + 1, gy, 0.4 * h);
            }
            ns++;
        }
    synth_finish(&f, 1.0);
    pipeline(&f);

    int nreal = 0, real_found = 0, real_ok = 0, real_ok7 = 0, nreal7 = 0;
    int ncr = 0, cr_found = 0, cr_bad = 0;
    double worst_real = 1, worst_cr = 0;
    const hilal_candidate *worst_real_c = NULL, *worst_cr_c = NULL;
    for (int i = 0; i < ns; i++) {
        const hilal_candidate *c = synth_match(&f, sx[i] + 1, sy[i] + 1, 2.0);
        if (kind[i] == 0) {
            nreal++;
            nreal7 += fabs(ssnr[i]) >= 7;
            if (c == NULL)
                continue;
            real_found++;
            real_ok += c->rb > 0.5;
            real_ok7 += c->rb > 0.5 && fabs(ssnr[i]) >= 7;
            if (c->rb < worst_real) {
                worst_real = c->rb;
                worst_real_c = c;
            }
            CHECK(c->rb >= 0 && c->rb <= 1, "rb in [0, 1]: %g", c->rb);
        } else {
            ncr++;
            if (c == NULL)
                continue;
            cr_found++;
            cr_bad += c->rb >= 0.5;
            if (c->rb > worst_cr) {
                worst_cr = c->rb;
                worst_cr_c = c;
            }
            CHECK(c->flags & HILAL_CAND_SHARP, "cosmic ray flagged SHARP (rb %g)", c->rb);
        }
    }
    printf("%s: real %d/%d detected, %d with rb > 0.5 (%d/%d at S/N >= 7), lowest rb %.3f; "
           "cosmic rays %d/%d detected, %d with rb >= 0.5, highest rb %.3g\n",
           label, real_found, nreal, real_ok, real_ok7, nreal7, worst_real, cr_found, ncr, cr_bad,
           worst_cr);
    if (worst_real_c)
        print_cand("worst real", worst_real_c);
    if (worst_cr_c)
        print_cand("worst CR", worst_cr_c);
    CHECK(cr_found > ncr / 2, "%s: most cosmic rays are detected (%d / %d), so the test bites",
          label, cr_found, ncr);
    CHECK(cr_bad == 0, "%s: %d cosmic rays with rb >= 0.5", label, cr_bad);
    CHECK(real_ok7 >= (int)ceil(0.98 * nreal7), "%s: reals at S/N >= 7 with rb > 0.5: %d / %d",
          label, real_ok7, nreal7);
    CHECK(real_ok >= (int)ceil(0.95 * real_found), "%s: reals with rb > 0.5: %d / %d", label,
          real_ok, real_found);
    hilal_frame_clear(&f);
}

static void test_real_vs_cosmic(void)
{
    synth_model g = synth_gaussian(1.5);
    real_vs_cosmic("gaussian FWHM 3.5", &g, 15, 101);
    synth_model mof = {1, 0, 0, 0, 3.0, 3.0}; /* Moffat beta 3, FWHM 3.06 px */
    real_vs_cosmic("moffat FWHM 3.1", &mof, 25, 102);
    synth_model wide = synth_gaussian(2.2); /* FWHM 5.2 px */
    real_vs_cosmic("gaussian FWHM 5.2", &wide, 25, 103);
}

/* Misalignment dipoles: +A P(x - s/2) - A P(x + s/2). */
static void test_dipole(void)
{
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 400, 100, &m, 15, 201, 1.0);
    /* Shifts of 1 and 2 px between the lobes, and a real source alone. */
    double amp = synth_amp(&f, 40);
    synth_add_point(&f, &m, 49.5, 50.2, amp);
    synth_add_point(&f, &m, 50.5, 50.2, -amp);
    synth_add_point(&f, &m, 149.0, 50.0, amp);
    synth_add_point(&f, &m, 151.0, 50.0, -amp);
    synth_add_point(&f, &m, 250.0, 49.0, amp);
    synth_add_point(&f, &m, 250.0, 51.0, -amp);
    synth_add_point(&f, &m, 350.3, 50.4, synth_amp(&f, 20));
    synth_finish(&f, 1.0);
    pipeline(&f);
    printf("dipoles:\n");
    int lobes = 0, lobes_flagged = 0;
    for (size_t k = 0; k < f.ncands; k++) {
        const hilal_candidate *c = &f.cands[k];
        if (c->x > 300) {
            print_cand("single", c);
            CHECK(!(c->flags & HILAL_CAND_DIPOLE) && c->rb > 0.5 && c->dipole > 0.6,
                  "a single source is no dipole: dipole %g rb %g", c->dipole, c->rb);
            continue;
        }
        print_cand("lobe", c);
        lobes++;
        lobes_flagged += (c->flags & HILAL_CAND_DIPOLE) && c->rb < 0.5;
        CHECK(c->dipole < 0.2, "dipole measure of a lobe %g", c->dipole);
    }
    CHECK(lobes >= 4, "dipole lobes detected: %d", lobes);
    CHECK(lobes_flagged == lobes, "all %d lobes flagged DIPOLE with rb < 0.5 (%d)", lobes,
          lobes_flagged);
    hilal_frame_clear(&f);
}

/* Saturation, masks and the edge flag; distances. */
static void test_masks(void)
{
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 300, 100, &m, 15, 301, 1.0);
    double amp = synth_amp(&f, 30);
    synth_add_point(&f, &m, 40.0, 50.0, amp);  /* saturated pixel 3 px away */
    synth_add_point(&f, &m, 100.0, 50.0, amp); /* saturated pixel 20 px away */
    synth_add_point(&f, &m, 160.0, 50.0, amp); /* bad column 2 px away */
    synth_add_point(&f, &m, 220.0, 50.0, amp); /* clean */
    synth_add_point(&f, &m, 280.0, 50.0, amp); /* EDGE pixels 3 px away */
    synth_finish(&f, 1.0);
    f.sci->mask[53 * 300 + 40] = HILAL_MASK_SAT;
    f.sci->mask[70 * 300 + 100] = HILAL_MASK_SAT;
    for (int y = 0; y < 100; y++)
        f.diff.mask[y * 300 + 162] = HILAL_MASK_BAD;
    for (int y = 0; y < 100; y++)
        f.diff.mask[y * 300 + 283] = HILAL_MASK_EDGE;
    pipeline(&f);
    printf("masks:\n");
    const hilal_candidate *sat3 = synth_match(&f, 41, 51, 0.5), *sat20 = synth_match(&f, 101, 51, 0.5);
    const hilal_candidate *col = synth_match(&f, 161, 51, 0.5), *clean = synth_match(&f, 221, 51, 0.5);
    const hilal_candidate *edge = synth_match(&f, 281, 51, 0.5);
    CHECK(sat3 && sat20 && col && clean && edge, "all five detected (%zu)", f.ncands);
    if (!(sat3 && sat20 && col && clean && edge))
        return;
    print_cand("sat 3px", sat3);
    print_cand("sat 20px", sat20);
    print_cand("column", col);
    print_cand("clean", clean);
    print_cand("edge", edge);
    CHECK(fabs(sat3->dist_sat_px - 3) < 0.2 && (sat3->flags & HILAL_CAND_NEAR_SAT) && sat3->rb < 0.5,
          "saturated pixel at 3 px: dist %g flags 0x%x rb %g", sat3->dist_sat_px, sat3->flags,
          sat3->rb);
    CHECK(fabs(sat20->dist_sat_px - 20) < 0.2 && !(sat20->flags & HILAL_CAND_NEAR_SAT) &&
              sat20->rb > 0.9,
          "saturated pixel at 20 px: dist %g rb %g", sat20->dist_sat_px, sat20->rb);
    CHECK(fabs(sat20->dist_mask_px - 20) < 0.2, "SAT is masked too: %g", sat20->dist_mask_px);
    CHECK(fabs(col->dist_mask_px - 2) < 0.2 && (col->flags & HILAL_CAND_NEAR_MASK) &&
              col->masked_frac > 0.05 && col->masked_frac < 0.25,
          "bad column at 2 px: dist %g masked_frac %g", col->dist_mask_px, col->masked_frac);
    CHECK(clean->flags == 0 && clean->masked_frac == 0 && clean->dist_sat_px == 32 &&
              clean->dist_mask_px == 32 && clean->rb > 0.9,
          "clean: flags 0x%x, distances capped at the search radius (%g, %g), rb %g",
          clean->flags, clean->dist_sat_px, clean->dist_mask_px, clean->rb);
    CHECK((edge->flags & HILAL_CAND_EDGE) && edge->rb > 0.9, "EDGE pixels in the footprint: 0x%x",
          edge->flags);
    hilal_frame_clear(&f);
}

/* Defects of the reference: a REFDEFECT mask bit, and a hot pixel in the
 * aligned reference seen as a fading candidate. A real fading source (a
 * star in the reference) is not a defect. */
static void test_ref_defect(void)
{
    hilal_error err = {0};
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    const long nx = 300, ny = 100;
    synth_frame(&f, nx, ny, &m, 15, 401, 1.0);
    /* The aligned reference: sky 100 ADU, noise 5 ADU, a star of flux 5000
     * ADU at (150, 50) and a hot pixel of 400 ADU at (250, 50); D holds the
     * fading residuals of both (-30 sigma). */
    f.ref = hilal_image_new(nx, ny, &err);
    synth_rng r = {4242, 0, 0};
    for (long i = 0; i < nx * ny; i++)
        f.ref->pix[i] = (float)(100.0 + 5.0 * synth_gauss(&r));
    for (long y = 34; y <= 66; y++)
        for (long x = 134; x <= 166; x++)
            f.ref->pix[y * nx + x] += (float)(5000.0 * synth_pixel(&m, x - 150.0, y - 50.0));
    f.ref->pix[50 * nx + 250] += 400.0f;
    synth_psf(&f.ref_psf, &m, 15);
    f.products |= HILAL_PROD_ALIGNED | HILAL_PROD_PSF;
    synth_add_point(&f, &m, 50.0, 50.0, synth_amp(&f, 30)); /* REFDEFECT in the mask */
    synth_add_point(&f, &m, 150.0, 50.0, synth_amp(&f, -30));
    synth_add_pixel(&f, 250, 50, -spike_amp(&f, 30));
    synth_finish(&f, 1.0);
    f.diff.mask[51 * nx + 51] = HILAL_MASK_REFDEFECT;
    pipeline(&f);
    printf("reference defects:\n");
    const hilal_candidate *a = synth_match(&f, 51, 51, 1), *b = synth_match(&f, 151, 51, 1);
    const hilal_candidate *c = synth_match(&f, 251, 51, 1);
    CHECK(a && b && c, "three detected (%zu)", f.ncands);
    if (!(a && b && c))
        return;
    print_cand("refdefect", a);
    print_cand("fading", b);
    print_cand("hot ref", c);
    double fa[HILAL_VET_NFACTORS];
    hilal_vet_params vp;
    hilal_vet_params_default(&vp);
    hilal_vet_psfinfo info;
    CHECK_OK(hilal_vet_psfinfo_get(&f.diff.psf_d, 1.5, &info, &err), &err);
    double rb = hilal_vet_score(&vp, &info, a, fa);
    CHECK((a->flags & HILAL_CAND_REF_DEFECT) && fa[HILAL_VET_F_REFDEFECT] == vp.refdefect_factor && rb == a->rb &&
              a->rb < 0.5,
          "REFDEFECT mask bit: flags 0x%x rb %g", a->flags, a->rb);
    CHECK(!(b->flags & HILAL_CAND_REF_DEFECT) && b->rb > 0.5,
          "a star that faded is no defect: flags 0x%x rb %g", b->flags, b->rb);
    CHECK((c->flags & HILAL_CAND_REF_DEFECT) && c->rb < 0.5,
          "a hot pixel in the reference: flags 0x%x rb %g", c->flags, c->rb);
    hilal_frame_clear(&f);
}

/* When the reference PSF is the broader one, ZOGY's D smooths a cosmic ray
 * of the science frame towards P_D; the science image itself still shows
 * it sharp against the science PSF. D here holds a cosmic ray smoothed to
 * a Gaussian of sigma 1.1 px (P_D: 1.5 px) and a real source; the science
 * image holds the same cosmic ray as one pixel and the source as a PSF. */
static void test_science_sharpness(void)
{
    hilal_frame f;
    synth_model m = synth_gaussian(1.5), smooth = synth_gaussian(1.1);
    const long nx = 200, ny = 100;
    synth_frame(&f, nx, ny, &m, 15, 451, 1.0);
    synth_rng r = {77, 0, 0};
    for (long i = 0; i < nx * ny; i++)
        f.sci->pix[i] = (float)(500.0 + 10.0 * synth_gauss(&r));
    f.sci->pix[50 * nx + 50] += 2000.0f;
    for (long y = 34; y <= 66; y++)
        for (long x = 134; x <= 166; x++)
            f.sci->pix[y * nx + x] += (float)(8000.0 * synth_pixel(&m, x - 150.0, y - 50.0));
    synth_psf(&f.sci_psf, &m, 15);
    synth_add_point(&f, &smooth, 50.0, 50.0, synth_amp(&f, 20));
    synth_add_point(&f, &m, 150.0, 50.0, synth_amp(&f, 20));
    synth_finish(&f, 1.0);

    /* Without the science image (no PSF product) the smoothed cosmic ray is
     * judged on D alone; with it, on the sharper of the two. */
    pipeline(&f);
    const hilal_candidate *cr = synth_match(&f, 51, 51, 1), *real = synth_match(&f, 151, 51, 1);
    CHECK(cr && real, "both detected (%zu)", f.ncands);
    double s_d = cr ? cr->sharpness : NAN;
    f.products |= HILAL_PROD_PSF;
    pipeline(&f);
    cr = synth_match(&f, 51, 51, 1);
    real = synth_match(&f, 151, 51, 1);
    CHECK(cr && real, "both detected (%zu)", f.ncands);
    if (cr && real) {
        printf("science-image sharpness:\n");
        print_cand("cosmic", cr);
        print_cand("real", real);
        CHECK(cr->sharpness > s_d + 1 && cr->rb < 0.5 && (cr->flags & HILAL_CAND_SHARP),
              "the science image shows the cosmic ray: sharpness %g (D alone %g), rb %g",
              cr->sharpness, s_d, cr->rb);
        CHECK(real->rb > 0.5 && fabs(real->sharpness - 1) < 0.3,
              "a PSF-like source in the science image stays real: sharpness %g rb %g",
              real->sharpness, real->rb);
    }
    hilal_frame_clear(&f);
}

/* A tile whose S_corr noise is 1.6x too large is flagged BAD_TILE. */
static void test_bad_tile(void)
{
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 256, 128, &m, 15, 501, 1.0);
    double amp = synth_amp(&f, 25);
    synth_add_point(&f, &m, 64.0, 64.0, amp);
    synth_add_point(&f, &m, 192.0, 64.0, amp);
    for (long y = 0; y < 128; y++)
        for (long x = 128; x < 256; x++)
            f.diff.d[y * 256 + x] *= 1.6f; /* scales noise and source: S/N 40 */
    synth_finish(&f, 1.0);
    pipeline(&f);
    const hilal_candidate *good = synth_match(&f, 65, 65, 1), *bad = synth_match(&f, 193, 65, 1);
    CHECK(good && bad, "both detected");
    if (good && bad) {
        CHECK(!(good->flags & HILAL_CAND_BAD_TILE), "unit-variance tile: 0x%x", good->flags);
        CHECK(bad->flags & HILAL_CAND_BAD_TILE, "noisy tile flagged: 0x%x", bad->flags);
    }
    hilal_frame_clear(&f);
}

/* The score alone: range, ideal values, monotonicity, determinism. */
static void test_score(void)
{
    hilal_vet_params p;
    hilal_vet_params_default(&p);
    hilal_vet_psfinfo info = {3.6, 7.0};
    hilal_candidate c;
    memset(&c, 0, sizeof c);
    c.snr = 20;
    c.fwhm = 3.6;
    c.elongation = 1.05;
    c.sharpness = 1.0;
    c.neg_frac = 0.1;
    c.dipole = 0.9;
    c.masked_frac = 0;
    c.dist_sat_px = 32;
    double f[HILAL_VET_NFACTORS];
    double ideal = hilal_vet_score(&p, &info, &c, f);
    CHECK(ideal > 0.95, "ideal candidate rb %g", ideal);
    for (int k = 0; k < HILAL_VET_NFACTORS; k++)
        CHECK(f[k] > 0.97 && f[k] <= 1, "factor %d = %g", k, f[k]);
    CHECK(hilal_vet_score(&p, &info, &c, NULL) == ideal, "deterministic");
    /* Each statistic pushed to the bad side lowers rb below 0.5. */
    hilal_candidate d = c;
    d.sharpness = 7.0;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.01, "single-pixel sharpness");
    d = c;
    d.fwhm = 3 * 3.6;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.01, "3x broader");
    d = c;
    d.fwhm = 0.25 * 3.6;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.1, "4x narrower at 20 sigma");
    /* The narrowness gate is centred on 5 sigma (vet.narrow_snr): half
     * counted there, not at all well below. */
    d.snr = 5;
    double half = hilal_vet_score(&p, &info, &d, NULL);
    CHECK(half > 0.3 && half < 0.7, "narrowness half counted at 5 sigma (rb %g)", half);
    d.snr = 1.5;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) > 0.8, "narrowness not counted at 1.5 sigma");
    d = c;
    d.elongation = 5;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.01, "streak");
    d = c;
    d.dipole = 0.05;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.1, "balanced dipole at 20 sigma");
    d.snr = 5.0; /* opposite lobe at 4.5 sigma: only partly counted */
    double weak = hilal_vet_score(&p, &info, &d, NULL);
    CHECK(weak > 0.1 && weak < 0.5, "weak dipole %g", weak);
    d = c;
    d.masked_frac = 0.5;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.01, "half masked");
    d = c;
    d.dist_sat_px = 1;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.05, "on a saturated star");
    d = c;
    d.neg_frac = 0.7;
    CHECK(hilal_vet_score(&p, &info, &d, NULL) < 0.01, "mostly negative footprint");
    d = c;
    d.sharpness = NAN;
    double undef = hilal_vet_score(&p, &info, &d, f);
    CHECK(f[HILAL_VET_F_SHARP] == 0.5 && fabs(undef - 0.5 * ideal) < 0.02,
          "undefined statistic: factor 0.5, rb %g", undef);
    /* Monotone in sharpness. */
    double prev = 2;
    for (double s = 0.5; s < 8; s += 0.25) {
        d = c;
        d.sharpness = s;
        double rb = hilal_vet_score(&p, &info, &d, NULL);
        CHECK(rb <= prev && rb >= 0 && rb <= 1, "monotone at sharpness %g", s);
        prev = rb;
    }
}

static void test_stage(void)
{
    hilal_error err = {0};
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    if (cfg == NULL)
        return;
    const hilal_stage *stage = hilal_registry_find("vet");
    CHECK(stage != NULL && stage->makes == HILAL_PROD_VETTED &&
              (stage->needs & HILAL_PROD_MEASURED),
          "vet registered after measure");
    size_t ns = 0;
    const hilal_stage *const *all = hilal_registry_stages(&ns);
    int id = -1, im = -1, iv = -1;
    for (size_t i = 0; i < ns; i++) {
        if (strcmp(all[i]->name, "detect") == 0)
            id = (int)i;
        if (strcmp(all[i]->name, "measure") == 0)
            im = (int)i;
        if (strcmp(all[i]->name, "vet") == 0)
            iv = (int)i;
    }
    CHECK(id >= 0 && id < im && im < iv, "registry order detect < measure < vet");

    /* init reads the table: the defaults equal hilal_vet_params_default(). */
    void *state = NULL;
    CHECK_OK(stage->init(cfg, &state, &err), &err);
    hilal_vet_params def;
    hilal_vet_params_default(&def);
    CHECK(state != NULL && memcmp(state, &def, sizeof def) == 0, "defaults agree");
    stage->fini(state);

    /* Configured values change the outcome: with the sharpness and
     * narrowness centres moved out of reach a cosmic ray passes. */
    hilal_frame f;
    synth_model m = synth_gaussian(1.5);
    synth_frame(&f, 96, 96, &m, 15, 601, 1.0);
    synth_add_pixel(&f, 48, 48, spike_amp(&f, 30));
    synth_finish(&f, 1.0);
    hilal_detect_params dp = {5.0, 0, 8, 100};
    CHECK_OK(hilal_detect_peaks(&f.diff, &dp, &f.cands, &f.ncands, NULL, &err), &err);
    CHECK_OK(hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, f.ncands, &err), &err);
    CHECK_OK(stage->init(cfg, &state, &err), &err);
    CHECK_OK(stage->run(state, &f, &err), &err);
    CHECK(f.ncands == 1 && f.cands[0].rb < 0.5 && (f.cands[0].flags & HILAL_CAND_SHARP),
          "default: the cosmic ray has rb %g", f.ncands ? f.cands[0].rb : -1);
    stage->fini(state);
    CHECK_OK(hilal_config_set(cfg, "vet.sharp_centre", "10", "test", &err), &err);
    CHECK_OK(hilal_config_set(cfg, "vet.narrow_centre", "0", "test", &err), &err);
    CHECK(hilal_config_set(cfg, "vet.refdefect_factor", "2", "test", &err) == HILAL_ERR_CONFIG,
          "refdefect_factor above 1 rejected");
    hilal_error_clear(&err);
    CHECK_OK(stage->init(cfg, &state, &err), &err);
    CHECK_OK(stage->run(state, &f, &err), &err);
    CHECK(f.ncands == 1 && f.cands[0].rb > 0.5 && !(f.cands[0].flags & HILAL_CAND_SHARP),
          "configured sharp_centre applies: rb %g", f.ncands ? f.cands[0].rb : -1);
    stage->fini(state);

    /* Parameters checked together at init. */
    CHECK_OK(hilal_config_set(cfg, "vet.sat_radius_px", "40", "test", &err), &err);
    state = NULL;
    hilal_status st0 = stage->init(cfg, &state, &err);
    CHECK(st0 == HILAL_ERR_CONFIG && state == NULL && strstr(err.msg, "vet.search_radius_px"),
          "sat radius beyond the search radius: %s", err.msg);
    hilal_error_clear(&err);

    /* Missing P_D: a clear error. */
    hilal_psf_clear(&f.diff.psf_d);
    hilal_vet_params vp;
    hilal_vet_params_default(&vp);
    hilal_status st = hilal_vet_candidates(&f, &vp, f.cands, f.ncands, &err);
    CHECK(st == HILAL_ERR_DATA && strstr(err.msg, "P_D") != NULL, "no P_D: %s", err.msg);
    hilal_frame_clear(&f);
    hilal_config_free(cfg);
}

/* A crowded frame for the thread and distance tests: point sources of both
 * signs and cosmic rays at S/N 6-60, a science image and an aligned
 * reference with their PSFs, saturated stars, a bad column, cosmic rays
 * and no-data corners in the three masks. */
static void crowded_frame(hilal_frame *f, long nx, long ny, uint64_t seed)
{
    hilal_error err = {0};
    synth_model m = synth_gaussian(1.5);
    synth_frame(f, nx, ny, &m, 15, seed, 1.0);
    f->ref = hilal_image_new(nx, ny, &err);
    synth_psf(&f->sci_psf, &m, 15);
    synth_psf(&f->ref_psf, &m, 15);
    f->products |= HILAL_PROD_ALIGNED | HILAL_PROD_PSF;
    synth_rng r = {seed + 7, 0, 0};
    for (long i = 0; i < nx * ny; i++) {
        f->sci->pix[i] = (float)(100.0 + 5.0 * synth_gauss(&r));
        f->ref->pix[i] = (float)(100.0 + 4.0 * synth_gauss(&r));
    }
    for (int k = 0; k < 260; k++) {
        double x = 4 + (nx - 8) * synth_uniform(&r), y = 4 + (ny - 8) * synth_uniform(&r);
        double snr = 6.0 * exp(log(10.0) * synth_uniform(&r));
        long ix = (long)x, iy = (long)y;
        if (k % 3 == 2) {
            synth_add_pixel(f, ix, iy, (k % 2 ? 1 : -1) * spike_amp(f, snr));
            (k % 2 ? f->sci : f->ref)->pix[iy * nx + ix] += (float)(40 * snr);
        } else {
            double sign = k % 5 == 0 ? -1 : 1;
            synth_add_point(f, &m, x, y, sign * synth_amp(f, snr));
            hilal_image *img = sign > 0 ? f->sci : f->ref;
            for (long yy = iy - 7; yy <= iy + 7; yy++)
                for (long xx = ix - 7; xx <= ix + 7; xx++)
                    if (xx >= 0 && yy >= 0 && xx < nx && yy < ny)
                        img->pix[yy * nx + xx] += (float)(60 * snr * synth_pixel(&m, xx - x, yy - y));
        }
    }
    synth_finish(f, 1.0);
    /* Saturated stars (science), a bad column (difference), cosmic rays
     * (reference), no data in two corners (all three). */
    for (int k = 0; k < 12; k++) {
        long cx = (long)(nx * synth_uniform(&r)), cy = (long)(ny * synth_uniform(&r));
        for (long y = cy - 2; y <= cy + 2; y++)
            for (long x = cx - 2; x <= cx + 2; x++)
                if (x >= 0 && y >= 0 && x < nx && y < ny && (x - cx) * (x - cx) + (y - cy) * (y - cy) <= 4)
                    f->sci->mask[y * nx + x] |= HILAL_MASK_SAT;
    }
    for (long y = 0; y < ny; y++)
        f->diff.mask[y * nx + nx / 3] |= HILAL_MASK_BAD;
    for (int k = 0; k < 40; k++)
        f->ref->mask[(long)(ny * synth_uniform(&r)) * nx + (long)(nx * synth_uniform(&r))] |= HILAL_MASK_CR;
    for (long y = 0; y < 20; y++)
        for (long x = 0; x < 20 - y; x++) {
            f->diff.mask[y * nx + x] |= HILAL_MASK_NODATA;
            f->ref->mask[(ny - 1 - y) * nx + (nx - 1 - x)] |= HILAL_MASK_NODATA;
        }
}

/* The distances to the nearest saturated and unusable pixels, searched over
 * the whole frame (independent of the stage's windowed search). */
static void brute_distances(const hilal_frame *f, const hilal_candidate *c, double rs,
                            double *dsat, double *dmask)
{
    const long nx = f->diff.nx, ny = f->diff.ny;
    const double X = c->x - 1.0, Y = c->y - 1.0;
    double ds2 = rs * rs, dm2 = rs * rs;
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            size_t i = (size_t)y * nx + x;
            hilal_mask_t m = f->diff.mask[i] | f->sci->mask[i] | f->ref->mask[i];
            if (!(m & HILAL_MASK_UNUSABLE))
                continue;
            double dx = (double)x - X, dy = (double)y - Y, d2 = dx * dx + dy * dy;
            if (d2 < dm2)
                dm2 = d2;
            if ((m & HILAL_MASK_SAT) && d2 < ds2)
                ds2 = d2;
        }
    *dsat = sqrt(ds2);
    *dmask = sqrt(dm2);
}

/* Vetting with 1, 2, 3 and 7 threads gives the same bytes as the library
 * call; the distances equal an exhaustive search. */
static void test_threads(void)
{
    hilal_error err = {0};
    hilal_frame f;
    crowded_frame(&f, 331, 257, 811);
    hilal_detect_params dp = {5.0, 0, 4, 100000};
    CHECK_OK(hilal_detect_peaks(&f.diff, &dp, &f.cands, &f.ncands, NULL, &err), &err);
    CHECK_OK(hilal_measure_candidates(&f.diff, f.sci, 1.5, f.cands, f.ncands, &err), &err);
    const size_t n = f.ncands;
    CHECK(n > 150, "a crowded frame: %zu candidates", n);
    hilal_candidate *measured = malloc(n * sizeof *measured), *ref = malloc(n * sizeof *ref);
    memcpy(measured, f.cands, n * sizeof *measured);
    hilal_vet_params vp;
    hilal_vet_params_default(&vp);
    CHECK_OK(hilal_vet_candidates(&f, &vp, f.cands, n, &err), &err);
    memcpy(ref, f.cands, n * sizeof *ref);

    size_t nsat = 0, nmask = 0, nbad = 0;
    for (size_t k = 0; k < n; k++) {
        double dsat, dmask;
        brute_distances(&f, &ref[k], vp.search_radius_px, &dsat, &dmask);
        nbad += dsat != ref[k].dist_sat_px || dmask != ref[k].dist_mask_px;
        nsat += dsat < vp.search_radius_px;
        nmask += dmask < vp.search_radius_px;
    }
    printf("threads: %zu candidates, %zu within the search radius of SAT, %zu of a mask\n", n,
           nsat, nmask);
    CHECK(nbad == 0 && nsat > 10 && nmask > nsat,
          "distances equal the exhaustive search (%zu differ; %zu near SAT, %zu near masks)", nbad,
          nsat, nmask);

    hilal_config *cfg = hilal_registry_config_new(&err);
    const hilal_stage *stage = hilal_registry_find("vet");
    const char *threads[] = {"1", "2", "3", "7"};
    for (size_t t = 0; t < sizeof threads / sizeof threads[0] && cfg != NULL; t++) {
        void *state = NULL;
        CHECK_OK(hilal_config_set(cfg, "pipeline.threads", threads[t], "test", &err), &err);
        CHECK_OK(stage->init(cfg, &state, &err), &err);
        memcpy(f.cands, measured, n * sizeof *measured);
        CHECK_OK(stage->run(state, &f, &err), &err);
        CHECK(memcmp(f.cands, ref, n * sizeof *ref) == 0,
              "%s threads: the same statistics, flags and rb", threads[t]);
        stage->fini(state);
    }
    hilal_config_free(cfg);
    free(measured);
    free(ref);
    hilal_frame_clear(&f);
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* The noise check of a tile is exact: S_corr in a 128 x 128 tile is set to
 * values with many ties, to Gaussian noise, and to noise whose regular
 * sample (every 32nd usable pixel) is an outlier; BAD_TILE follows the
 * robust standard deviation computed here by sorting, on either side of
 * vet.tile_tol. */
static void test_tile_exact(void)
{
    hilal_error err = {0};
    for (int pattern = 0; pattern < 3; pattern++) {
        hilal_frame f;
        synth_model m = synth_gaussian(1.5);
        synth_frame(&f, 256, 256, &m, 15, 901 + pattern, 1.0);
        synth_finish(&f, 1.0);
        synth_rng r = {77 + pattern, 0, 0};
        enum { T = 128 };
        static float vals[T * T];
        size_t nv = 0;
        for (long y = 0; y < T; y++)
            for (long x = 0; x < T; x++) {
                size_t i = (size_t)y * 256 + x;
                float v;
                if (pattern == 0)
                    v = 0.21f * (float)((x * 7 + y * 13) % 11) - 0.8f;
                else
                    v = (float)(1.3 * synth_gauss(&r));
                if (pattern == 2 && (y * T + x) % 32 == 0)
                    v = 50.0f;
                f.diff.scorr[i] = v;
                vals[nv++] = v;
            }
        /* The robust standard deviation, by sorting: 1.4826 MAD. */
        qsort(vals, nv, sizeof vals[0], cmp_float);
        const float med = vals[nv / 2];
        for (size_t k = 0; k < nv; k++)
            vals[k] = fabsf(vals[k] - med);
        qsort(vals, nv, sizeof vals[0], cmp_float);
        const double sd = 1.4826 * vals[nv / 2], off = fabs(sd - 1.0);
        f.cands = calloc(1, sizeof *f.cands);
        f.ncands = 1;
        f.cands[0] = (hilal_candidate){.cand_id = 1, .x = 50.2, .y = 60.7, .snr = 8, .fwhm = 3.5,
                                       .elongation = 1.1};
        hilal_vet_params vp;
        hilal_vet_params_default(&vp);
        vp.tile_tol = off * (1 - 1e-6);
        CHECK_OK(hilal_vet_candidates(&f, &vp, f.cands, 1, &err), &err);
        int below = (f.cands[0].flags & HILAL_CAND_BAD_TILE) != 0;
        vp.tile_tol = off * (1 + 1e-6);
        CHECK_OK(hilal_vet_candidates(&f, &vp, f.cands, 1, &err), &err);
        int above = (f.cands[0].flags & HILAL_CAND_BAD_TILE) != 0;
        printf("tile pattern %d: robust std %.6f\n", pattern, sd);
        CHECK(off > 0.01 && below && !above,
              "tile pattern %d: robust std %.6f flagged just below |sd - 1| (%d), not above (%d)",
              pattern, sd, below, above);
        hilal_frame_clear(&f);
    }
}

int main(void)
{
    test_real_vs_cosmic();
    test_dipole();
    test_masks();
    test_ref_defect();
    test_science_sharpness();
    test_bad_tile();
    test_tile_exact();
    test_threads();
    test_score();
    test_stage();
    return hilal_test_finish();
}
