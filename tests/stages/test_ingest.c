/* The ingest stage: detector keywords, their fallbacks and error messages,
 * saturation and no-data masks, and the stage run through the runner.
 *
 * Independent values: test0.fits is a real HST/WFPC2 file whose primary
 * header holds ATODGAIN = 7.0, SATURATE = 4095, EXPTIME = 0.23,
 * DATE-OBS = '19/05/94', TIME-OBS = '15:41:16', FILTNAM1 = 'F673N' and
 * EXPSTART = 49491.65366175 (the MJD of the exposure start computed by the
 * HST pipeline); its first SCI extension has 2 pixels >= 400 (astropy:
 * (fits.getdata('test0.fits', 1) >= 400).sum()). scale.fits holds
 * MAGZP = 20.4871. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fits.h"
#include "hilal/ingest.h"
#include "hilal/stage.h"
#include "testutil.h"

#define ZTF_SCI "fits_edge/ztf/ZTF18aaxjlwy_472263571115090000_science.fits"
#define ZTF_REF "fits_edge/ztf/ZTF18aaxjlwy_472263571115090000_template.fits"

static int contains(const char *msg, const char *phrase)
{
    return strstr(msg, phrase) != NULL;
}

/* Missing gain or read noise: the message names the file, the HDU, the
 * keyword and both ways to supply the value. */
static void test_missing_noise(void)
{
    char path[4096];
    hilal_test_data(ZTF_SCI, path, sizeof path);
    hilal_ingest_opts o;
    hilal_ingest_opts_default(&o);
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = (hilal_image *)1;
    hilal_status st = hilal_ingest_read(&o, path, 0, &img, NULL, &err);
    CHECK(st == HILAL_ERR_CONFIG && img == NULL, "missing gain: status %d", st);
    CHECK(contains(err.msg, path) && contains(err.msg, "HDU 1") &&
              contains(err.msg, "no GAIN keyword") &&
              contains(err.msg, "set ingest.gain=... (e-/ADU) or add the GAIN keyword"),
          "missing gain message: %s", err.msg);

    /* Gain from the configuration; read noise still missing. */
    o.gain_e_per_adu = 1.6;
    hilal_error_clear(&err);
    st = hilal_ingest_read(&o, path, 0, &img, NULL, &err);
    CHECK(st == HILAL_ERR_CONFIG && contains(err.msg, "no read noise") &&
              contains(err.msg, "RDNOISE") && contains(err.msg, "ingest.rdnoise=..."),
          "missing read noise: %s", err.msg);

    /* An empty keyword name: only the configuration can give the value. */
    hilal_ingest_opts_default(&o);
    o.key_gain[0] = '\0';
    hilal_error_clear(&err);
    st = hilal_ingest_read(&o, path, 0, &img, NULL, &err);
    CHECK(st == HILAL_ERR_CONFIG && contains(err.msg, "ingest.key_gain is empty") &&
              contains(err.msg, "set ingest.gain=..."),
          "empty key: %s", err.msg);

    /* With require_noise = 0 (inspect) the values stay unknown. */
    hilal_ingest_opts_default(&o);
    o.require_noise = 0;
    hilal_ingest_sources src;
    hilal_error_clear(&err);
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, &src, &err), &err);
    if (img != NULL)
        CHECK(isnan(img->meta.gain_e_per_adu) && isnan(img->meta.rdnoise_e) &&
                  src.gain[0] == '\0' && isinf(img->meta.saturate_adu) &&
                  strcmp(src.saturate, "none") == 0,
              "unknown gain, read noise; saturation +Inf");
    hilal_image_free(img);
}

/* Fallbacks from the configuration fill what the header lacks; a
 * no-data value and the saturation level mask pixels. */
static void test_fallbacks_and_masks(void)
{
    char path[4096];
    hilal_test_data(ZTF_SCI, path, sizeof path);
    hilal_ingest_opts o;
    hilal_ingest_opts_default(&o);
    o.gain_e_per_adu = 6.2;
    o.rdnoise_e = 8.0;
    o.saturate_adu = 220.0; /* one pixel of the stamp is >= 220 (astropy) */
    o.zeropoint_mag = 26.3;
    hilal_ingest_sources src;
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL;
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, &src, &err), &err);
    if (img == NULL)
        return;
    CHECK(img->meta.gain_e_per_adu == 6.2 && strcmp(src.gain, "ingest.gain") == 0,
          "gain %g from %s", img->meta.gain_e_per_adu, src.gain);
    CHECK(img->meta.rdnoise_e == 8.0 && strcmp(src.rdnoise, "ingest.rdnoise") == 0,
          "read noise %g from %s", img->meta.rdnoise_e, src.rdnoise);
    CHECK(img->meta.saturate_adu == 220.0 && img->meta.zeropoint_mag == 26.3,
          "saturation %g, zero point %g", img->meta.saturate_adu, img->meta.zeropoint_mag);
    CHECK(hilal_image_count_mask(img, HILAL_MASK_SAT) == 1, "%zu saturated pixels",
          hilal_image_count_mask(img, HILAL_MASK_SAT));
    CHECK(hilal_image_count_mask(img, HILAL_MASK_NODATA) == 1322, "NaN pixels are no-data");
    CHECK(isnan(img->meta.exptime_s) && isnan(img->meta.mjd) && img->meta.filter[0] == '\0',
          "no exposure time, MJD or filter in a ZTF stamp");
    hilal_image_free(img);

    /* The template: -FLT_MAX fill and NaN are no-data; a declared no-data
     * value adds the pixels equal to it. */
    hilal_test_data(ZTF_REF, path, sizeof path);
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, NULL, &err), &err);
    size_t base = img ? hilal_image_count_mask(img, HILAL_MASK_NODATA) : 0;
    CHECK(base == 1183 + 139, "template no-data pixels: %zu", base);
    float some = img ? img->pix[40 * 63 + 40] : 0;
    hilal_image_free(img);
    o.nodata_adu = some;
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, NULL, &err), &err);
    if (img != NULL) {
        CHECK(hilal_image_count_mask(img, HILAL_MASK_NODATA) > base &&
                  isnan(img->pix[40 * 63 + 40]) &&
                  img->mask[40 * 63 + 40] == HILAL_MASK_NODATA,
              "nodata_value %g masks its pixels", some);
    }
    hilal_image_free(img);
}

/* A multi-extension file: keywords found in the primary header. */
static void test_mef_keywords(void)
{
    char path[4096];
    hilal_test_data("fits_edge/astropy_io_fits/test0.fits", path, sizeof path);
    hilal_ingest_opts o;
    hilal_ingest_opts_default(&o);
    snprintf(o.key_gain, sizeof o.key_gain, "ATODGAIN");
    snprintf(o.key_filter, sizeof o.key_filter, "FILTNAM1");
    o.rdnoise_e = 5.0;
    hilal_ingest_sources src;
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL;
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, &src, &err), &err);
    if (img == NULL)
        return;
    const hilal_meta *m = &img->meta;
    CHECK(m->hdu == 2 && m->gain_e_per_adu == 7.0 &&
              strcmp(src.gain, "header ATODGAIN (primary HDU)") == 0,
          "gain %g from %s", m->gain_e_per_adu, src.gain);
    CHECK(m->saturate_adu == 4095 && strcmp(src.saturate, "header SATURATE (primary HDU)") == 0,
          "saturation %g from %s", m->saturate_adu, src.saturate);
    CHECK(m->exptime_s == 0.23, "EXPTIME %g", m->exptime_s);
    CHECK(strcmp(m->filter, "F673N") == 0, "filter '%s'", m->filter);
    CHECK(hilal_image_count_mask(img, HILAL_MASK_SAT) == 0, "max 474 < 4095: nothing saturated");
    /* DATE-OBS 19/05/94 + TIME-OBS 15:41:16 is the start to the second;
     * HST's EXPSTART is 0.37 s later. Mid-exposure adds 0.115 s. */
    double expect_mid = 49491.65366175 + 0.5 * 0.23 / 86400.0;
    CHECK(fabs(m->mjd - expect_mid) < 1.0 / 86400.0, "MJD %.8f vs EXPSTART + EXPTIME/2 %.8f",
          m->mjd, expect_mid);
    CHECK(contains(src.mjd, "DATE-OBS (primary HDU)") && contains(src.mjd, "TIME-OBS") &&
              contains(src.mjd, "EXPTIME/2"),
          "MJD source: %s", src.mjd);
    hilal_image_free(img);

    /* The MJD keyword itself (here EXPSTART), taken as mid-exposure. */
    snprintf(o.key_mjd, sizeof o.key_mjd, "EXPSTART");
    o.mjd_is_start = 0;
    /* Saturation from the configuration: the header value is ignored when
     * its keyword name is empty. */
    o.key_saturate[0] = '\0';
    o.saturate_adu = 400;
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, &src, &err), &err);
    if (img == NULL)
        return;
    CHECK(img->meta.mjd == 49491.65366175, "MJD %.8f from EXPSTART", img->meta.mjd);
    CHECK(hilal_image_count_mask(img, HILAL_MASK_SAT) == 2, "%zu pixels >= 400 (astropy: 2)",
          hilal_image_count_mask(img, HILAL_MASK_SAT));
    hilal_image_free(img);

    /* Zero point from the header (scale.fits: MAGZP = 20.4871). */
    hilal_test_data("fits_edge/astropy_io_fits/scale.fits", path, sizeof path);
    hilal_ingest_opts_default(&o);
    o.gain_e_per_adu = 1;
    o.rdnoise_e = 1;
    o.zeropoint_mag = 30; /* a fallback does not override the header */
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, &src, &err), &err);
    if (img != NULL)
        CHECK(img->meta.zeropoint_mag == 20.4871 && strcmp(src.zeropoint, "header MAGZP (HDU 1)") == 0,
              "zero point %g from %s", img->meta.zeropoint_mag, src.zeropoint);
    hilal_image_free(img);
}

/* Header values that cannot be used. */
static void test_bad_keywords(void)
{
    char dir[2048], path[4096];
    hilal_test_tmpdir("badkeys", dir, sizeof dir);
    float pix[6] = {1, 2, 3, 4, 5, 6};
    hilal_error err;
    struct {
        const char *name;
        double gain;
        const char *gain_text;
        hilal_status code;
        const char *phrase;
    } cases[] = {
        {"zero_gain.fits", 0.0, NULL, HILAL_ERR_DATA, "GAIN = 0 in the header is not a valid gain"},
        {"negative_gain.fits", -2.0, NULL, HILAL_ERR_DATA, "it must be > 0 e-/ADU"},
        {"text_gain.fits", 0, "unknown", HILAL_ERR_FITS, "GAIN = 'unknown' is not a number"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        snprintf(path, sizeof path, "%s/%s", dir, cases[k].name);
        hilal_error_clear(&err);
        hilal_fits_writer *w = hilal_fits_writer_open(path, &err);
        CHECK_OK(hilal_fits_writer_add_float(w, NULL, 3, 2, pix, &err), &err);
        if (cases[k].gain_text != NULL)
            CHECK_OK(hilal_fits_writer_key_string(w, "GAIN", cases[k].gain_text, NULL, &err),
                     &err);
        else
            CHECK_OK(hilal_fits_writer_key_double(w, "GAIN", cases[k].gain, NULL, &err), &err);
        CHECK_OK(hilal_fits_writer_key_double(w, "RDNOISE", 4.0, NULL, &err), &err);
        CHECK_OK(hilal_fits_writer_close(w, &err), &err);

        hilal_ingest_opts o;
        hilal_ingest_opts_default(&o);
        hilal_image *img = NULL;
        hilal_error_clear(&err);
        hilal_status st = hilal_ingest_read(&o, path, 0, &img, NULL, &err);
        CHECK(st == cases[k].code && img == NULL && contains(err.msg, path) &&
                  contains(err.msg, cases[k].phrase),
              "%s: status %d: %s", cases[k].name, st, err.msg);
        hilal_image_free(img);
    }

    /* Header keywords written by the writer are read back by ingest:
     * GAIN 2.5, RDNOISE 4, SATURATE 5 (two pixels >= 5), DATE-OBS. */
    snprintf(path, sizeof path, "%s/good.fits", dir);
    hilal_error_clear(&err);
    hilal_fits_writer *w = hilal_fits_writer_open(path, &err);
    CHECK_OK(hilal_fits_writer_add_float(w, NULL, 3, 2, pix, &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "GAIN", 2.5, "e-/ADU", &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "RDNOISE", 4.0, "e-", &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "SATURATE", 5.0, "ADU", &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "EXPTIME", 86.4, "s", &err), &err);
    CHECK_OK(hilal_fits_writer_key_string(w, "DATE-OBS", "2026-01-15T03:00:00", NULL, &err),
             &err);
    CHECK_OK(hilal_fits_writer_key_string(w, "FILTER", "r", NULL, &err), &err);
    CHECK_OK(hilal_fits_writer_key_string(w, "OBJECT", "field-0042", NULL, &err), &err);
    CHECK_OK(hilal_fits_writer_close(w, &err), &err);
    hilal_ingest_opts o;
    hilal_ingest_opts_default(&o);
    hilal_image *img = NULL;
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, NULL, &err), &err);
    if (img != NULL) {
        const hilal_meta *m = &img->meta;
        /* 2026-01-15 is MJD 61055; 03:00 is 0.125 d; + 43.2 s = 0.0005 d. */
        CHECK(m->gain_e_per_adu == 2.5 && m->rdnoise_e == 4.0 && m->saturate_adu == 5.0 &&
                  m->exptime_s == 86.4 && fabs(m->mjd - 61055.1255) < 1e-9 &&
                  strcmp(m->filter, "r") == 0 && strcmp(m->object, "field-0042") == 0,
              "gain %g rdnoise %g sat %g exptime %g mjd %.7f filter %s object %s",
              m->gain_e_per_adu, m->rdnoise_e, m->saturate_adu, m->exptime_s, m->mjd, m->filter,
              m->object);
        CHECK(img->mask[4] == HILAL_MASK_SAT && img->mask[5] == HILAL_MASK_SAT &&
                  hilal_image_count_mask(img, HILAL_MASK_SAT) == 2,
              "pixels 5 and 6 saturated");
    }
    hilal_image_free(img);
}

/* The stage through the runner, configured through the configuration. */
/* Names the frame and its inputs (ref may be NULL). A path too long for
 * the frame's fields fails the test by name instead of being cut short. */
static void name_frame(hilal_frame *f, const char *id, const char *sci, const char *ref)
{
    int fits = (size_t)snprintf(f->frame_id, sizeof f->frame_id, "%s", id) < sizeof f->frame_id &&
               (size_t)snprintf(f->sci_path, sizeof f->sci_path, "%s", sci) < sizeof f->sci_path &&
               (ref == NULL ||
                (size_t)snprintf(f->ref_path, sizeof f->ref_path, "%s", ref) < sizeof f->ref_path);
    if (!fits)
        CHECK(0, "frame %s: %s or %s is longer than a frame path (%zu characters); use a "
                 "shorter HILAL_TESTDATA",
              id, sci, ref != NULL ? ref : "(no reference)", sizeof f->sci_path - 1);
}

static void test_stage(void)
{
    char sci[4096], ref[4096];
    hilal_test_data(ZTF_SCI, sci, sizeof sci);
    hilal_test_data(ZTF_REF, ref, sizeof ref);
    hilal_error err;
    hilal_error_clear(&err);
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "registry configuration: %s", err.msg);
    if (cfg == NULL)
        return;
    CHECK(hilal_registry_find("ingest") == &hilal_stage_ingest, "ingest is registered");
    const hilal_stage *stages[] = {&hilal_stage_ingest};
    hilal_runner *runner = NULL;

    /* Without gain: the frame fails with the full context. */
    CHECK_OK(hilal_runner_new(cfg, stages, 1, &runner, &err), &err);
    hilal_frame frame;
    hilal_frame_init(&frame);
    name_frame(&frame, "ztf-0001", sci, ref);
    hilal_status st = hilal_runner_run(runner, &frame, &err);
    CHECK(st == HILAL_ERR_CONFIG &&
              strncmp(err.msg, "frame ztf-0001, stage ingest: science: ", 39) == 0 &&
              contains(err.msg, sci) && contains(err.msg, "ingest.gain"),
          "context: %s", err.msg);
    hilal_frame_clear(&frame);
    hilal_runner_free(runner);
    runner = NULL;

    /* With gain and read noise set: both images read. */
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set(cfg, "ingest.gain", "6.2", "test", &err), &err);
    CHECK_OK(hilal_config_set(cfg, "ingest.rdnoise", "8", "test", &err), &err);
    CHECK_OK(hilal_config_set(cfg, "ingest.saturate", "1e5", "test", &err), &err);
    CHECK_OK(hilal_runner_new(cfg, stages, 1, &runner, &err), &err);
    hilal_frame_init(&frame);
    name_frame(&frame, "ztf-0002", sci, ref);
    CHECK_OK(hilal_runner_run(runner, &frame, &err), &err);
    CHECK((frame.products & (HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE)) ==
              (HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE),
          "products 0x%x", frame.products);
    CHECK(frame.sci != NULL && frame.ref != NULL && frame.sci->nx == 63 &&
              frame.ref->meta.rdnoise_e == 8 &&
              hilal_image_count_mask(frame.ref, HILAL_MASK_NODATA) == 1322,
          "science and reference read");
    hilal_frame_clear(&frame);

    /* A preloaded reference is kept; a missing reference path is fine then. */
    hilal_frame_init(&frame);
    name_frame(&frame, "ztf-0003", sci, NULL);
    frame.ref = hilal_image_new(5, 5, &err);
    hilal_image *cached = frame.ref;
    CHECK_OK(hilal_runner_run(runner, &frame, &err), &err);
    CHECK(frame.ref == cached && frame.ref->nx == 5, "preloaded reference kept");
    hilal_frame_clear(&frame);

    /* No reference at all. */
    hilal_frame_init(&frame);
    name_frame(&frame, "ztf-0004", sci, NULL);
    hilal_error_clear(&err);
    st = hilal_runner_run(runner, &frame, &err);
    CHECK(st == HILAL_ERR_USAGE && contains(err.msg, "no reference image given"),
          "no reference: %s", err.msg);
    hilal_frame_clear(&frame);
    hilal_runner_free(runner);
    runner = NULL;

    /* A keyword name too long for a FITS card fails at init. */
    char longkey[128];
    memset(longkey, 'K', 100);
    longkey[100] = '\0';
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set(cfg, "ingest.key_gain", longkey, "test", &err), &err);
    st = hilal_runner_new(cfg, stages, 1, &runner, &err);
    CHECK(st == HILAL_ERR_CONFIG && runner == NULL && contains(err.msg, "ingest.key_gain"),
          "long key: %s", err.msg);
    hilal_config_free(cfg);
}

int main(void)
{
    hilal_log_set_handler(NULL, NULL, HILAL_LOG_ERROR);
    test_missing_noise();
    test_fallbacks_and_masks();
    test_mef_keywords();
    test_bad_keywords();
    test_stage();
    return hilal_test_finish();
}
