/* stars stage: positions, fluxes, FWHM and the `usable` selection on a
 * synthetic field with known stars, a saturated star, a cosmic ray, a close
 * pair, an elongated source and an edge star; the max_stars limit;
 * concurrent extraction in two threads; the pixel-stack error. */
#include <math.h>
#include <pthread.h>
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

#define NX 512
#define NY 512
#define SKY 500.0
#define GAIN 2.0
#define RN 5.0
#define FWHM 3.5
#define SATURATE 40000.0
#define NSTARS 120

typedef struct truth {
    double x, y, flux; /* 0-based */
} truth;

static truth stars[NSTARS];

/* Special objects, 0-based positions. */
#define SAT_X 300.2
#define SAT_Y 300.6
#define CR_X 402
#define CR_Y 77
#define PAIR_X 150.0
#define PAIR_Y 420.0
#define ELL_X 430.0
#define ELL_Y 430.0
#define EDGE_X 3.6
#define EDGE_Y 250.3
#define GAL_X 80.4
#define GAL_Y 330.7

/* The field: NSTARS Gaussian stars at random sub-pixel positions, at
 * least 20 px apart and 20 px from the border, log-uniform fluxes from
 * 3e3 to 3e5 ADU; then the special objects; Gaussian noise with the
 * variance of sky + source (gain, read noise); saturation. */
static hilal_image *make_field(uint64_t seed)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = hilal_image_new(NX, NY, &err);
    if (img == NULL)
        return NULL;
    rng_state = seed;
    int n = 0;
    while (n < NSTARS) {
        double x = 20 + (NX - 40) * rng_uniform(), y = 20 + (NY - 40) * rng_uniform();
        int ok = hypot(x - SAT_X, y - SAT_Y) > 30 && hypot(x - CR_X, y - CR_Y) > 20 &&
                 hypot(x - PAIR_X, y - PAIR_Y) > 25 && hypot(x - ELL_X, y - ELL_Y) > 30 &&
                 hypot(x - GAL_X, y - GAL_Y) > 25;
        for (int k = 0; k < n && ok; k++)
            ok = hypot(x - stars[k].x, y - stars[k].y) > 20;
        if (!ok)
            continue;
        stars[n].x = x;
        stars[n].y = y;
        stars[n].flux = 3e3 * pow(100.0, rng_uniform());
        hilal_psf_render(img->pix, NX, NY, x, y, stars[n].flux, HILAL_PSF_GAUSSIAN, FWHM, 0, 0);
        n++;
    }
    /* Saturated star, close equal pair, elongated source, edge star. */
    hilal_psf_render(img->pix, NX, NY, SAT_X, SAT_Y, 3e6, HILAL_PSF_GAUSSIAN, FWHM, 0, 0);
    hilal_psf_render(img->pix, NX, NY, PAIR_X, PAIR_Y, 5e4, HILAL_PSF_GAUSSIAN, FWHM, 0, 0);
    hilal_psf_render(img->pix, NX, NY, PAIR_X + 6.0, PAIR_Y, 5e4, HILAL_PSF_GAUSSIAN, FWHM, 0, 0);
    for (int k = -12; k <= 12; k++) /* a streak of 25 stars, 0.5 px apart: b/a ~ 0.3 */
        hilal_psf_render(img->pix, NX, NY, ELL_X + 0.5 * k, ELL_Y, 4e3, HILAL_PSF_GAUSSIAN, FWHM,
                         0, 0);
    hilal_psf_render(img->pix, NX, NY, EDGE_X, EDGE_Y, 5e4, HILAL_PSF_GAUSSIAN, FWHM, 0, 0);
    /* A compact galaxy: round, 12% wider than the stars, S/N ~ 500. */
    hilal_psf_render(img->pix, NX, NY, GAL_X, GAL_Y, 2e5, HILAL_PSF_GAUSSIAN, 1.12 * FWHM, 0, 0);
    for (long i = 0; i < NX * NY; i++) {
        double s = img->pix[i];
        double var = (SKY + s) / GAIN + (RN / GAIN) * (RN / GAIN);
        img->pix[i] = (float)(SKY + s + sqrt(var) * rng_gauss());
        if (img->pix[i] >= SATURATE) {
            img->pix[i] = (float)SATURATE;
            img->mask[i] |= HILAL_MASK_SAT;
        }
    }
    /* Cosmic ray: one pixel. */
    img->pix[CR_Y * NX + CR_X] += 4000.0f;
    img->meta.gain_e_per_adu = GAIN;
    img->meta.rdnoise_e = RN;
    img->meta.saturate_adu = SATURATE;
    snprintf(img->meta.path, sizeof img->meta.path, "field.fits");
    return img;
}

/* background + stars on a frame whose sci and ref are copies of img. */
static hilal_status run_stars2(hilal_image *img, const char *set, const char *set2,
                               hilal_frame *f, hilal_error *err)
{
    hilal_config *cfg = hilal_registry_config_new(err);
    void *bs = NULL, *ss = NULL;
    hilal_status st = cfg ? HILAL_OK : err->code;
    if (st == HILAL_OK && set != NULL)
        st = hilal_config_set_arg(cfg, set, err);
    if (st == HILAL_OK && set2 != NULL)
        st = hilal_config_set_arg(cfg, set2, err);
    hilal_frame_init(f);
    strcpy(f->frame_id, "stars-test");
    f->sci = img;
    f->ref = hilal_image_clone(img, err);
    f->products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    if (st == HILAL_OK)
        st = hilal_stage_background.init(cfg, &bs, err);
    if (st == HILAL_OK)
        st = hilal_stage_stars.init(cfg, &ss, err);
    if (st == HILAL_OK)
        st = hilal_stage_background.run(bs, f, err);
    if (st == HILAL_OK)
        st = hilal_stage_stars.run(ss, f, err);
    hilal_stage_background.fini(bs);
    hilal_stage_stars.fini(ss);
    hilal_config_free(cfg);
    return st;
}

static hilal_status run_stars(hilal_image *img, const char *set, hilal_frame *f, hilal_error *err)
{
    return run_stars2(img, set, NULL, f, err);
}

/* The catalogue entry nearest to (x, y) 0-based, within 2 px; NULL if none. */
static const hilal_star *find(const hilal_starlist *l, double x, double y)
{
    const hilal_star *best = NULL;
    double bd = 2.0;
    for (size_t i = 0; i < l->n; i++) {
        double d = hypot(l->stars[i].x - 1.0 - x, l->stars[i].y - 1.0 - y);
        if (d < bd) {
            bd = d;
            best = &l->stars[i];
        }
    }
    return best;
}

static void test_field(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    hilal_status st = run_stars(make_field(1234), NULL, &f, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK) {
        hilal_frame_clear(&f);
        return;
    }
    const hilal_starlist *l = &f.sci_stars;
    CHECK(f.products & HILAL_PROD_STARS, "STARS product");
    CHECK(f.ref_stars.n == l->n, "reference catalogue too (%zu vs %zu)", f.ref_stars.n, l->n);

    /* Sorted by decreasing flux. */
    int sorted = 1;
    for (size_t i = 1; i < l->n; i++)
        sorted &= l->stars[i - 1].flux_adu >= l->stars[i].flux_adu;
    CHECK(sorted, "catalogue sorted by flux");

    /* Every injected star found; bright ones: position, flux, FWHM. */
    int found = 0, usable = 0, nbright = 0;
    double maxdpos = 0.0, chi2 = 0.0, maxfrac = 0.0;
    int nchi = 0;
    double fw[NSTARS];
    int nfw = 0;
    for (int k = 0; k < NSTARS; k++) {
        const hilal_star *s = find(l, stars[k].x, stars[k].y);
        if (s == NULL)
            continue;
        found++;
        usable += s->usable;
        /* Aperture radius 1.5 FWHM = 3.53 sigma holds 99.80% of a Gaussian. */
        double expect = 0.99804 * stars[k].flux;
        double z = (s->flux_adu - expect) / s->flux_err_adu;
        chi2 += z * z;
        nchi++;
        if (s->flux_adu / s->flux_err_adu > 100) {
            nbright++;
            maxdpos = fmax(maxdpos, hypot(s->x - 1.0 - stars[k].x, s->y - 1.0 - stars[k].y));
            fw[nfw++] = s->fwhm_px;
        }
        if (s->flux_adu / s->flux_err_adu > 300)
            maxfrac = fmax(maxfrac, fabs(s->flux_adu / expect - 1.0));
    }
    double medfw = 0.0;
    for (int a = 0; a < nfw; a++) { /* median by selection */
        int below = 0, equal = 0;
        for (int b = 0; b < nfw; b++) {
            below += fw[b] < fw[a];
            equal += fw[b] == fw[a];
        }
        if (below <= nfw / 2 && below + equal > nfw / 2) {
            medfw = fw[a];
            break;
        }
    }
    printf("field: %zu detections, %d/%d injected found, %d usable; %d with S/N > 100: max "
           "position error %.3f px, median FWHM %.3f px (true %.2f); max flux error at S/N > 300 "
           "%.2f%%; flux chi2/N %.2f\n",
           l->n, found, NSTARS, usable, nbright, maxdpos, medfw, FWHM, 100 * maxfrac,
           chi2 / nchi);
    CHECK(found == NSTARS, "found %d of %d stars", found, NSTARS);
    CHECK(usable >= NSTARS * 9 / 10, "usable %d of %d isolated stars", usable, NSTARS);
    CHECK(nbright >= 20, "enough bright stars (%d)", nbright);
    CHECK(maxdpos < 0.05, "position error %.3f px", maxdpos);
    CHECK(maxfrac < 0.01, "flux error of S/N > 300 stars %.2f%%", 100 * maxfrac);
    CHECK(fabs(medfw / FWHM - 1.0) < 0.03, "median FWHM %.3f vs %.2f", medfw, FWHM);
    CHECK(chi2 / nchi > 0.6 && chi2 / nchi < 1.6, "flux errors consistent: chi2/N = %.2f",
          chi2 / nchi);

    /* The special objects. The saturated star is one detection (for
     * alignment), not usable, and no fragment of it is usable either. */
    const hilal_star *sat = find(l, SAT_X, SAT_Y);
    CHECK(sat != NULL && !sat->usable, "saturated star found whole and not usable");
    int sat_usable = 0;
    for (size_t i = 0; i < l->n; i++)
        sat_usable += l->stars[i].usable &&
                      hypot(l->stars[i].x - 1 - SAT_X, l->stars[i].y - 1 - SAT_Y) < 15;
    CHECK(sat_usable == 0, "%d usable fragments of the saturated star", sat_usable);
    const hilal_star *cr = find(l, CR_X, CR_Y);
    if (cr != NULL) {
        CHECK(!cr->usable, "cosmic ray not usable (FWHM %.2f)", cr->fwhm_px);
        CHECK(cr->fwhm_px < 0.5 * FWHM, "cosmic ray FWHM %.2f px is sharp", cr->fwhm_px);
    }
    const hilal_star *p1 = find(l, PAIR_X, PAIR_Y), *p2 = find(l, PAIR_X + 6.0, PAIR_Y);
    CHECK(p1 != NULL && p2 != NULL && p1 != p2, "close pair deblended");
    CHECK((p1 == NULL || !p1->usable) && (p2 == NULL || !p2->usable), "pair members not usable");
    const hilal_star *el = find(l, ELL_X, ELL_Y);
    CHECK(el != NULL && !el->usable && el->b_px / el->a_px < 0.6,
          "elongated source not usable (b/a %.2f)", el ? el->b_px / el->a_px : -1.0);
    const hilal_star *ed = find(l, EDGE_X, EDGE_Y);
    CHECK(ed == NULL || !ed->usable, "edge star not usable");
    /* The compact galaxy passes the round, concentration and 0.7-1.3 FWHM
     * tests; at its S/N a star would be within ~3% of the stellar FWHM. */
    const hilal_star *gal = find(l, GAL_X, GAL_Y);
    CHECK(gal != NULL && !gal->usable && gal->fwhm_px > 1.08 * FWHM,
          "compact galaxy (FWHM %.2f, S/N %.0f) found and not usable",
          gal ? gal->fwhm_px : -1.0, gal ? gal->flux_adu / gal->flux_err_adu : -1.0);
    hilal_frame_clear(&f);
}

static void test_max_stars(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_frame f;
    hilal_status st = run_stars(make_field(99), "stars.max_stars=20", &f, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        CHECK(f.sci_stars.n == 20, "max_stars keeps 20 (%zu)", f.sci_stars.n);
        /* The kept ones are the 20 brightest here (S/N rises with flux). */
        double minflux = 1e300;
        for (size_t i = 0; i < f.sci_stars.n; i++)
            minflux = fmin(minflux, f.sci_stars.stars[i].flux_adu);
        int brighter = 0;
        for (int k = 0; k < NSTARS; k++)
            brighter += stars[k].flux > 1.2 * minflux;
        CHECK(brighter <= 20, "%d injected stars brighter than the faintest kept", brighter);
    }
    hilal_frame_clear(&f);
}

/* Two frames extracted concurrently give the same catalogues as one at a
 * time (libsep's global settings are guarded). The images are made first
 * (the field generator is not thread-safe), then processed in threads. */
typedef struct job {
    hilal_image *img;
    hilal_frame f;
    hilal_status st;
    hilal_error err;
} job;

static void *run_job(void *arg)
{
    job *j = arg;
    hilal_error_clear(&j->err);
    j->st = run_stars(j->img, NULL, &j->f, &j->err);
    return NULL;
}

static int same_list(const hilal_starlist *a, const hilal_starlist *b)
{
    if (a->n != b->n)
        return 0;
    for (size_t i = 0; i < a->n; i++)
        if (a->stars[i].x != b->stars[i].x || a->stars[i].flux_adu != b->stars[i].flux_adu ||
            a->stars[i].usable != b->stars[i].usable)
            return 0;
    return 1;
}

static void test_threads(void)
{
    job serial[2], par[2];
    uint64_t seeds[2] = {5, 6};
    for (int k = 0; k < 2; k++) {
        serial[k].img = make_field(seeds[k]);
        par[k].img = make_field(seeds[k]);
        run_job(&serial[k]);
        CHECK_OK(serial[k].st, &serial[k].err);
    }
    pthread_t t[2];
    for (int k = 0; k < 2; k++)
        pthread_create(&t[k], NULL, run_job, &par[k]);
    for (int k = 0; k < 2; k++)
        pthread_join(t[k], NULL);
    for (int k = 0; k < 2; k++) {
        CHECK_OK(par[k].st, &par[k].err);
        CHECK(same_list(&serial[k].f.sci_stars, &par[k].f.sci_stars),
              "frame %d: concurrent catalogue equals the serial one", k);
        hilal_frame_clear(&serial[k].f);
        hilal_frame_clear(&par[k].f);
    }
}

/* A source with more pixels above threshold than the pixel stack holds:
 * a data error that names the setting to change. */
static void test_pixstack(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = hilal_image_new(400, 400, &err);
    if (img == NULL)
        return;
    rng_state = 77;
    hilal_psf_render(img->pix, 400, 400, 200, 200, 2e8, HILAL_PSF_GAUSSIAN, 90.0, 0, 0);
    for (long i = 0; i < 400 * 400; i++)
        img->pix[i] += (float)(100.0 + 3.0 * rng_gauss());
    img->meta.gain_e_per_adu = 1e6; /* negligible source noise */
    hilal_frame f;
    /* One background mesh larger than the image: the sky is a constant and
     * the source stays whole in the sky-subtracted image. */
    hilal_status st = run_stars2(img, "stars.pixstack=10000", "background.mesh_px=4096", &f, &err);
    CHECK(st == HILAL_ERR_DATA, "pixel-stack overflow is a data error (%d: %s)", (int)st, err.msg);
    CHECK(strstr(err.msg, "stars.pixstack") != NULL, "message names stars.pixstack: %s", err.msg);
    hilal_frame_clear(&f);
}

int main(void)
{
    CHECK(hilal_registry_find("stars") == &hilal_stage_stars, "stars registered");
    test_field();
    test_max_stars();
    test_threads();
    test_pixstack();
    return hilal_test_finish();
}
