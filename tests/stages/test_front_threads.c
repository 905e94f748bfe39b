/* The front of the chain (ingest, background, stars, align, psf, fluxscale)
 * gives the same products whatever pipeline.threads is: every plane bit for
 * bit, the star lists, the flux ratio. The pair is simulated with odd sizes
 * (partial 2 x 2 blocks in the background's binned image) and the science
 * frame gets no-data pixels (NaN, +-Inf, -FLT_MAX, which ingest masks).
 * Also: a float32 file's special values read as CFITSIO's null check gives
 * them (NaN, Inf, FLT_MAX no data; -0 and denormals +0), with the two
 * images read in two threads the science error still wins, and a source
 * larger than the extractor's first pixel stack is extracted with the full
 * stars.pixstack. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <fitsio.h>

#include "hilal/checksum.h"
#include "hilal/fits.h"
#include "hilal/hilal.h"
#include "hilal/psf.h"
#include "hilal/simulate.h"
#include "run_until.h"
#include "synth_rng.h"
#include "testutil.h"

static hilal_config *config_threads(const char *threads, hilal_error *err)
{
    hilal_config *cfg = hilal_registry_config_new(err);
    if (cfg != NULL && hilal_config_set(cfg, "pipeline.threads", threads, "test", err) != HILAL_OK) {
        hilal_config_free(cfg);
        cfg = NULL;
    }
    return cfg;
}

static int same_floats(const float *a, const float *b, size_t n)
{
    if (a == NULL || b == NULL)
        return a == b;
    return memcmp(a, b, n * sizeof *a) == 0;
}

/* Every plane and the noise level of two images are identical. */
static void check_same_image(const hilal_image *a, const hilal_image *b, const char *which)
{
    CHECK(a != NULL && b != NULL, "%s image made with 1 and 2 threads", which);
    if (a == NULL || b == NULL)
        return;
    CHECK(a->nx == b->nx && a->ny == b->ny, "%s: same size", which);
    if (a->nx != b->nx || a->ny != b->ny)
        return;
    size_t n = (size_t)a->nx * (size_t)a->ny;
    CHECK(same_floats(a->pix, b->pix, n), "%s: pixels identical", which);
    CHECK(memcmp(a->mask, b->mask, n * sizeof *a->mask) == 0, "%s: masks identical", which);
    CHECK(same_floats(a->sky, b->sky, n), "%s: sky planes identical", which);
    CHECK(same_floats(a->var, b->var, n), "%s: variance planes identical", which);
    CHECK(a->sky_rms_adu == b->sky_rms_adu, "%s: sky RMS %.9g and %.9g", which, a->sky_rms_adu,
          b->sky_rms_adu);
    CHECK(strcmp(a->meta.sha256, b->meta.sha256) == 0, "%s: same checksum", which);
}

static void check_same_stars(const hilal_starlist *a, const hilal_starlist *b, const char *which)
{
    CHECK(a->n == b->n, "%s: %zu and %zu stars", which, a->n, b->n);
    if (a->n != b->n)
        return;
    int same = 1;
    for (size_t i = 0; i < a->n; i++) {
        const hilal_star *s = &a->stars[i], *t = &b->stars[i];
        same &= s->x == t->x && s->y == t->y && s->flux_adu == t->flux_adu &&
                s->flux_err_adu == t->flux_err_adu && s->peak_adu == t->peak_adu &&
                s->a_px == t->a_px && s->b_px == t->b_px && s->fwhm_px == t->fwhm_px &&
                s->flags == t->flags && s->usable == t->usable;
    }
    CHECK(same, "%s: star lists identical", which);
}

/* Marks science pixels as no data in the file: a NaN block, +-Inf and
 * -FLT_MAX. Returns the number of pixels changed. */
static long spoil_science(const char *path, hilal_error *err)
{
    hilal_image *img = NULL;
    if (hilal_fits_read_image(path, 0, &img, err) != HILAL_OK)
        return -1;
    long n = 0;
    for (long y = 40; y < 47; y++)
        for (long x = 60; x < 73; x++, n++)
            img->pix[y * img->nx + x] = NAN;
    img->pix[100 * img->nx + 7] = INFINITY;
    img->pix[101 * img->nx + 7] = -INFINITY;
    img->pix[5 * img->nx + img->nx - 1] = -FLT_MAX; /* in the last (partial) column block */
    n += 3;
    hilal_status st = hilal_fits_write_image(path, img, err);
    hilal_image_free(img);
    return st == HILAL_OK ? n : -1;
}

static void test_chain_threads(void)
{
    char dir[1024];
    hilal_error err;
    hilal_error_clear(&err);
    hilal_test_tmpdir("front_threads", dir, sizeof dir);
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = 401;
    o.ny = 357;
    o.seed = 11;
    o.star_density = 8000;
    CHECK_OK(hilal_sim_write(&o, dir, &err), &err);
    char sci[1100];
    snprintf(sci, sizeof sci, "%s/sci.fits", dir);
    long spoiled = spoil_science(sci, &err);
    CHECK(spoiled > 0, "no-data pixels written into the science frame: %s", err.msg);

    hilal_frame f1, f2;
    hilal_config *c1 = config_threads("1", &err), *c2 = config_threads("2", &err);
    CHECK(c1 != NULL && c2 != NULL, "configurations: %s", err.msg);
    if (c1 == NULL || c2 == NULL) {
        hilal_config_free(c1);
        hilal_config_free(c2);
        return;
    }
    CHECK_OK(run_until(c1, dir, "fluxscale", &f1, &err), &err);
    CHECK_OK(run_until(c2, dir, "fluxscale", &f2, &err), &err);

    /* The products make sense before they are compared. */
    if (f1.sci != NULL) {
        size_t nodata = hilal_image_count_mask(f1.sci, HILAL_MASK_NODATA);
        CHECK(nodata >= (size_t)spoiled, "%zu no-data pixels, %ld written", nodata, spoiled);
        CHECK(f1.sci->var[40 * f1.sci->nx + 60] >= 1e29f, "no-data pixel has no variance");
        char hex[65];
        CHECK_OK(hilal_sha256_file(sci, hex, &err), &err);
        CHECK(strcmp(hex, f1.sci->meta.sha256) == 0, "science checksum is the file's");
    }
    size_t nusable = 0;
    for (size_t i = 0; i < f1.sci_stars.n; i++)
        nusable += (size_t)f1.sci_stars.stars[i].usable;
    CHECK(nusable >= 10, "%zu usable science stars", nusable);
    CHECK(fabs(f1.flux_ratio / o.flux_ratio - 1.0) < 0.05, "flux ratio %.4f (simulated %.2f)",
          f1.flux_ratio, o.flux_ratio);

    check_same_image(f1.sci, f2.sci, "science");
    check_same_image(f1.ref, f2.ref, "reference");
    check_same_stars(&f1.sci_stars, &f2.sci_stars, "science");
    check_same_stars(&f1.ref_stars, &f2.ref_stars, "reference");
    CHECK(f1.flux_ratio == f2.flux_ratio && f1.flux_ratio_err == f2.flux_ratio_err &&
              f1.flux_ratio_nstars == f2.flux_ratio_nstars,
          "flux ratio %.9g +- %.3g (%d) and %.9g +- %.3g (%d)", f1.flux_ratio,
          f1.flux_ratio_err, f1.flux_ratio_nstars, f2.flux_ratio, f2.flux_ratio_err,
          f2.flux_ratio_nstars);
    hilal_frame_clear(&f1);
    hilal_frame_clear(&f2);
    hilal_config_free(c1);
    hilal_config_free(c2);
}

/* A float32 image with special values: what ingest makes of them. */
static void test_float_specials(void)
{
    static const uint32_t in[] = {
        0x00000000u, /* +0 */
        0x80000000u, /* -0 -> +0 */
        0x00000001u, /* smallest denormal -> +0 */
        0x807fffffu, /* negative denormal -> +0 */
        0x00800000u, /* smallest normal: kept */
        0x3f800000u, /* 1: kept */
        0x7f800000u, /* +Inf: no data */
        0xff800000u, /* -Inf: no data */
        0x7fc00000u, /* NaN: no data */
        0x7fffffffu, /* NaN with a payload: no data */
        0x7f7fffffu, /* FLT_MAX: no data */
        0xff7fffffu, /* -FLT_MAX: no data */
    };
    enum { N = sizeof in / sizeof in[0] };
    static const int nodata[N] = {0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1};
    static const uint32_t out[N] = {0, 0, 0, 0, 0x00800000u, 0x3f800000u};
    char dir[1024], path[1100];
    hilal_test_tmpdir("front_specials", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/specials.fits", dir);
    float v[N];
    memcpy(v, in, sizeof v);
    fitsfile *ff = NULL;
    int status = 0;
    long naxes[2] = {N, 1};
    fits_create_file(&ff, path, &status);
    fits_create_img(ff, FLOAT_IMG, 2, naxes, &status);
    fits_write_img(ff, TFLOAT, 1, N, v, &status);
    fits_close_file(ff, &status);
    CHECK(status == 0, "special-value file written (CFITSIO status %d)", status);

    hilal_image *img = NULL;
    hilal_error err;
    hilal_error_clear(&err);
    CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
    if (img == NULL)
        return;
    for (int i = 0; i < N; i++) {
        uint32_t bits;
        memcpy(&bits, &img->pix[i], sizeof bits);
        int nd = (img->mask[i] & HILAL_MASK_NODATA) != 0;
        CHECK(nd == nodata[i], "value %08x: no data %d (expected %d)", in[i], nd, nodata[i]);
        if (nodata[i])
            CHECK(isnan(img->pix[i]), "value %08x reads as NaN", in[i]);
        else
            CHECK(bits == out[i], "value %08x reads as %08x (expected %08x)", in[i], bits,
                  out[i]);
    }
    hilal_image_free(img);
}

/* Both images read at once: a missing science file is the error reported
 * even when the reference is missing too; a missing reference alone is
 * reported as the reference's, and the frame gets no reference. */
static void test_ingest_errors(void)
{
    char dir[1024], sci[1100], missing[1100];
    hilal_error err;
    hilal_error_clear(&err);
    hilal_test_tmpdir("front_errors", dir, sizeof dir);
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = 64;
    o.seed = 3;
    CHECK_OK(hilal_sim_write(&o, dir, &err), &err);
    snprintf(sci, sizeof sci, "%s/sci.fits", dir);
    snprintf(missing, sizeof missing, "%s/none.fits", dir);
    hilal_config *cfg = config_threads("2", &err);
    CHECK(cfg != NULL, "configuration: %s", err.msg);
    if (cfg == NULL)
        return;

    hilal_frame f;
    hilal_error_clear(&err);
    hilal_status st = run_until_paths(cfg, "both", missing, missing, "ingest", &f, &err);
    CHECK(st == HILAL_ERR_IO, "both missing: I/O error (%d)", (int)st);
    CHECK(strstr(err.msg, "science") != NULL && strstr(err.msg, "reference") == NULL,
          "the science error wins: %s", err.msg);
    CHECK(f.sci == NULL && f.ref == NULL, "no images in the frame");
    hilal_frame_clear(&f);

    hilal_error_clear(&err);
    st = run_until_paths(cfg, "ref", sci, missing, "ingest", &f, &err);
    CHECK(st == HILAL_ERR_IO, "reference missing: I/O error (%d)", (int)st);
    CHECK(strstr(err.msg, "reference") != NULL && strstr(err.msg, "none.fits") != NULL,
          "names the reference file: %s", err.msg);
    CHECK(f.ref == NULL, "no reference in the frame");
    hilal_frame_clear(&f);
    hilal_config_free(cfg);
}

extern const hilal_stage hilal_stage_background, hilal_stage_stars;

/* Background and stars on a copy of img (as science and reference) with
 * one extra setting; the frame holds the products. */
static hilal_status run_stars_with(const hilal_image *img, const char *set, hilal_frame *f,
                                   hilal_error *err)
{
    hilal_config *cfg = hilal_registry_config_new(err);
    void *bs = NULL, *ss = NULL;
    hilal_status st = cfg != NULL ? HILAL_OK : err->code;
    /* One background mesh larger than the image: the source stays whole. */
    if (st == HILAL_OK)
        st = hilal_config_set_arg(cfg, "background.mesh_px=4096", err);
    if (st == HILAL_OK)
        st = hilal_config_set_arg(cfg, set, err);
    hilal_frame_init(f);
    f->sci = hilal_image_clone(img, err);
    f->ref = hilal_image_clone(img, err);
    f->products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    if (st == HILAL_OK && (f->sci == NULL || f->ref == NULL))
        st = HILAL_ERR_NOMEM;
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

/* A source of ~550 000 pixels above the threshold, all held at once by
 * the extractor: more than its first pixel stack (300 000), less than the
 * default stars.pixstack (10^6), which is used on the second attempt. */
static void test_pixstack_retry(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    enum { N = 1000 };
    hilal_image *img = hilal_image_new(N, N, &err);
    CHECK(img != NULL, "image: %s", err.msg);
    if (img == NULL)
        return;
    rng_state = 21;
    /* FWHM 300 px (sigma 127 px), peak ~4900 ADU over a sky of 100 +- 3:
     * above 15 ADU out to ~430 px. */
    hilal_psf_render(img->pix, N, N, 500, 500, 5e8, HILAL_PSF_GAUSSIAN, 300.0, 0, 0);
    for (long i = 0; i < (long)N * N; i++)
        img->pix[i] += (float)(100.0 + 3.0 * rng_gauss());
    img->meta.gain_e_per_adu = 1e6; /* negligible source noise */
    img->meta.saturate_adu = INFINITY;

    hilal_frame f;
    hilal_status st = run_stars_with(img, "stars.pixstack=300000", &f, &err);
    CHECK(st == HILAL_ERR_DATA && strstr(err.msg, "stars.pixstack") != NULL,
          "300 000 pixels are too few for the source (%d: %s)", (int)st, err.msg);
    hilal_frame_clear(&f);

    hilal_error_clear(&err);
    st = run_stars_with(img, "stars.pixstack=1000000", &f, &err);
    CHECK_OK(st, &err);
    int found = 0;
    for (size_t i = 0; i < f.sci_stars.n; i++)
        found |= hypot(f.sci_stars.stars[i].x - 501.0, f.sci_stars.stars[i].y - 501.0) < 2.0;
    CHECK(found, "the large source is extracted (%zu detections)", f.sci_stars.n);
    hilal_frame_clear(&f);
    hilal_image_free(img);
}

int main(void)
{
    test_chain_threads();
    test_float_specials();
    test_ingest_errors();
    test_pixstack_retry();
    return hilal_test_finish();
}
