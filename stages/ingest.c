/* The ingest stage: reads the science and reference images and their
 * detector metadata, the two files in two threads when pipeline.threads
 * allows. See include/hilal/ingest.h and docs/ingest.md. */
#include "hilal/ingest.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fft.h"
#include "hilal/fits.h"
#include "hilal/log.h"

static const hilal_param ingest_params[] = {
    /* key            type                 default     min    max    unit      help */
    {"key_gain", HILAL_PARAM_STRING, "GAIN", 0, 0, "",
     "header keyword with the gain in e-/ADU (\"\" = use ingest.gain only)"},
    {"gain", HILAL_PARAM_DOUBLE, "nan", 1e-6, 1e6, "e-/ADU",
     "gain when the header has none (nan = none: the keyword is then required)"},
    {"key_rdnoise", HILAL_PARAM_STRING, "RDNOISE", 0, 0, "",
     "header keyword with the read noise in e- (\"\" = use ingest.rdnoise only)"},
    {"rdnoise", HILAL_PARAM_DOUBLE, "nan", 0, 1e6, "e-",
     "read noise when the header has none (nan = none: the keyword is then required)"},
    {"key_saturate", HILAL_PARAM_STRING, "SATURATE", 0, 0, "",
     "header keyword with the saturation level in ADU (\"\" = use ingest.saturate only)"},
    {"saturate", HILAL_PARAM_DOUBLE, "nan", 0, 1e30, "ADU",
     "saturation level when the header has none (nan = none: nothing is flagged, with a "
     "warning)"},
    {"nodata_value", HILAL_PARAM_DOUBLE, "nan", -1e30, 1e30, "ADU",
     "pixel value meaning no data, besides NaN and BLANK (e.g. 0 or -9999; nan = none)"},
    {"key_exptime", HILAL_PARAM_STRING, "EXPTIME", 0, 0, "",
     "header keyword with the exposure time in s"},
    {"key_mjd", HILAL_PARAM_STRING, "MJD-OBS", 0, 0, "",
     "header keyword with the MJD of the exposure"},
    {"key_dateobs", HILAL_PARAM_STRING, "DATE-OBS", 0, 0, "",
     "header keyword with the date (and time) of the exposure, used when key_mjd is absent"},
    {"key_timeobs", HILAL_PARAM_STRING, "TIME-OBS", 0, 0, "",
     "header keyword with the time of day, used when the date keyword holds a date only"},
    {"mjd_is_start", HILAL_PARAM_BOOL, "true", 0, 1, "",
     "the MJD/date keyword is the exposure start: add half the exposure time"},
    {"key_filter", HILAL_PARAM_STRING, "FILTER", 0, 0, "", "header keyword with the filter name"},
    {"key_object", HILAL_PARAM_STRING, "OBJECT", 0, 0, "",
     "header keyword with the object or field name"},
    {"key_zeropoint", HILAL_PARAM_STRING, "MAGZP", 0, 0, "",
     "header keyword with the photometric zero point (mag for 1 ADU)"},
    {"zeropoint", HILAL_PARAM_DOUBLE, "nan", -100, 100, "mag",
     "zero point when the header has none (nan = unknown: magnitudes are not computed)"},
};
#define NPARAMS (sizeof ingest_params / sizeof ingest_params[0])

void hilal_ingest_opts_default(hilal_ingest_opts *o)
{
    memset(o, 0, sizeof *o);
    snprintf(o->key_gain, sizeof o->key_gain, "GAIN");
    snprintf(o->key_rdnoise, sizeof o->key_rdnoise, "RDNOISE");
    snprintf(o->key_saturate, sizeof o->key_saturate, "SATURATE");
    snprintf(o->key_exptime, sizeof o->key_exptime, "EXPTIME");
    snprintf(o->key_mjd, sizeof o->key_mjd, "MJD-OBS");
    snprintf(o->key_dateobs, sizeof o->key_dateobs, "DATE-OBS");
    snprintf(o->key_timeobs, sizeof o->key_timeobs, "TIME-OBS");
    snprintf(o->key_filter, sizeof o->key_filter, "FILTER");
    snprintf(o->key_object, sizeof o->key_object, "OBJECT");
    snprintf(o->key_zeropoint, sizeof o->key_zeropoint, "MAGZP");
    o->gain_e_per_adu = NAN;
    o->rdnoise_e = NAN;
    o->saturate_adu = NAN;
    o->zeropoint_mag = NAN;
    o->nodata_adu = NAN;
    o->mjd_is_start = 1;
    o->require_noise = 1;
}

static hilal_status copy_key(const hilal_config *cfg, const char *name, char *dst, size_t len,
                             hilal_error *err)
{
    const char *v = hilal_config_get_string(cfg, name);
    if (v == NULL)
        v = "";
    if (strlen(v) >= len)
        return hilal_error_set(err, HILAL_ERR_CONFIG,
                               "%s = '%s' is longer than %zu characters; give a FITS keyword",
                               name, v, len - 1);
    memcpy(dst, v, strlen(v) + 1);
    return HILAL_OK;
}

hilal_status hilal_ingest_opts_from_config(const hilal_config *cfg, hilal_ingest_opts *o,
                                           hilal_error *err)
{
    hilal_ingest_opts_default(o);
    hilal_status st = HILAL_OK;
    struct {
        const char *name;
        char *dst;
    } keys[] = {
        {"ingest.key_gain", o->key_gain},         {"ingest.key_rdnoise", o->key_rdnoise},
        {"ingest.key_saturate", o->key_saturate}, {"ingest.key_exptime", o->key_exptime},
        {"ingest.key_mjd", o->key_mjd},           {"ingest.key_dateobs", o->key_dateobs},
        {"ingest.key_timeobs", o->key_timeobs},   {"ingest.key_filter", o->key_filter},
        {"ingest.key_object", o->key_object},     {"ingest.key_zeropoint", o->key_zeropoint},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0] && st == HILAL_OK; i++)
        st = copy_key(cfg, keys[i].name, keys[i].dst, HILAL_INGEST_KEY_MAX, err);
    if (st != HILAL_OK)
        return st;
    o->gain_e_per_adu = hilal_config_get_double(cfg, "ingest.gain");
    o->rdnoise_e = hilal_config_get_double(cfg, "ingest.rdnoise");
    o->saturate_adu = hilal_config_get_double(cfg, "ingest.saturate");
    o->zeropoint_mag = hilal_config_get_double(cfg, "ingest.zeropoint");
    o->nodata_adu = hilal_config_get_double(cfg, "ingest.nodata_value");
    o->mjd_is_start = hilal_config_get_bool(cfg, "ingest.mjd_is_start");
    o->require_noise = 1;
    return HILAL_OK;
}

/* The two headers a keyword may come from: the image's HDU, then (for an
 * extension) the primary HDU. */
typedef struct headers {
    const char *where;   /* "path, HDU n" for messages */
    const char *hdr;
    int ncards;
    int hdu;
    const char *prim;    /* NULL when the image is the primary HDU */
    int nprim;
} headers;

/* Looks a text keyword up; returns 1 and the value when found. */
static int lookup_text(const headers *h, const char *key, char *value, size_t len, char *src,
                       size_t srclen)
{
    if (key[0] == '\0')
        return 0;
    if (hilal_fits_header_get(h->hdr, h->ncards, key, value, len) == HILAL_FITS_KEY_FOUND) {
        snprintf(src, srclen, "header %s (HDU %d)", key, h->hdu);
        return 1;
    }
    if (h->prim != NULL &&
        hilal_fits_header_get(h->prim, h->nprim, key, value, len) == HILAL_FITS_KEY_FOUND) {
        snprintf(src, srclen, "header %s (primary HDU)", key);
        return 1;
    }
    return 0;
}

/* Looks a numeric keyword up. *found is 1 with the value, 0 when absent
 * or undefined. A value that is not a number is an error. */
static hilal_status lookup_double(const headers *h, const char *key, double *value, int *found,
                                  char *src, size_t srclen, hilal_error *err)
{
    hilal_fits_key_state state = HILAL_FITS_KEY_MISSING;
    *found = 0;
    *value = NAN;
    if (key[0] == '\0')
        return HILAL_OK;
    hilal_status st = hilal_fits_header_get_double(h->hdr, h->ncards, key, value, &state, err);
    if (st == HILAL_OK && state == HILAL_FITS_KEY_FOUND) {
        snprintf(src, srclen, "header %s (HDU %d)", key, h->hdu);
        *found = 1;
        return HILAL_OK;
    }
    if (st == HILAL_OK && h->prim != NULL) {
        st = hilal_fits_header_get_double(h->prim, h->nprim, key, value, &state, err);
        if (st == HILAL_OK && state == HILAL_FITS_KEY_FOUND) {
            snprintf(src, srclen, "header %s (primary HDU)", key);
            *found = 1;
        }
    }
    if (st != HILAL_OK)
        hilal_error_context(err, "%s", h->where);
    return st;
}

/* A value the noise model needs (gain, read noise): header, else the
 * configured fallback, else an error (or NaN when not required). */
static hilal_status resolve_required(const headers *h, const char *what, const char *key,
                                     const char *param, const char *unit, double fallback,
                                     int positive, int required, double *out, char *src,
                                     size_t srclen, hilal_error *err)
{
    int found = 0;
    double v = NAN;
    src[0] = '\0';
    hilal_status st = lookup_double(h, key, &v, &found, src, srclen, err);
    if (st != HILAL_OK)
        return st;
    if (found && (positive ? !(v > 0) : !(v >= 0)))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "%s: %s = %g in the header is not a valid %s (it must be %s 0 "
                               "%s); fix the header, or set ingest.key_%s=\"\" and "
                               "ingest.%s=...",
                               h->where, key, v, what, positive ? ">" : ">=", unit, param,
                               param);
    if (!found && isfinite(fallback)) {
        v = fallback;
        snprintf(src, srclen, "ingest.%s", param);
        found = 1;
    }
    if (!found && required) {
        if (key[0] == '\0')
            return hilal_error_set(err, HILAL_ERR_CONFIG,
                                   "%s: no %s: ingest.key_%s is empty and ingest.%s is not set; "
                                   "set ingest.%s=... (%s)",
                                   h->where, what, param, param, param, unit);
        return hilal_error_set(err, HILAL_ERR_CONFIG,
                               "%s: no %s: the header has no %s keyword%s; set ingest.%s=... "
                               "(%s) or add the %s keyword",
                               h->where, what, key, h->prim ? " (nor has the primary HDU)" : "",
                               param, unit, key);
    }
    *out = found ? v : NAN;
    return HILAL_OK;
}

/* Seconds since midnight from "hh:mm:ss[.sss]". */
static int parse_time_of_day(const char *text, double *seconds)
{
    int hh = 0, mm = 0;
    double ss = 0;
    char extra = 0;
    if (sscanf(text, "%d:%d:%lf%c", &hh, &mm, &ss, &extra) != 3)
        return 0;
    if (hh < 0 || hh > 23 || mm < 0 || mm > 59 || ss < 0 || ss >= 61)
        return 0;
    *seconds = hh * 3600.0 + mm * 60.0 + ss;
    return 1;
}

/* meta->mjd from the MJD keyword, else from the date (and time) keywords;
 * then shifted to mid-exposure. An unreadable date is a warning only: the
 * MJD is informative (light curves, alerts), not needed for subtraction. */
static void resolve_mjd(const headers *h, const hilal_ingest_opts *o, hilal_meta *meta,
                        char *src, size_t srclen)
{
    int found = 0;
    double mjd = NAN;
    char text[96], dsrc[96] = "", tsrc[96] = "";
    src[0] = '\0';
    hilal_error kerr;
    hilal_error_clear(&kerr);
    if (lookup_double(h, o->key_mjd, &mjd, &found, src, srclen, &kerr) != HILAL_OK) {
        hilal_log(HILAL_LOG_WARN, "%s; ignoring it", kerr.msg);
        found = 0;
        src[0] = '\0';
    }
    if (!found && lookup_text(h, o->key_dateobs, text, sizeof text, dsrc, sizeof dsrc)) {
        int has_time = 0;
        hilal_error_clear(&kerr);
        if (hilal_fits_date_to_mjd(text, &mjd, &has_time, &kerr) != HILAL_OK) {
            hilal_log(HILAL_LOG_WARN, "%s: %s: %s; the MJD stays unknown", h->where, dsrc,
                      kerr.msg);
        } else {
            found = 1;
            snprintf(src, srclen, "%s", dsrc);
            double tod = 0;
            if (!has_time && lookup_text(h, o->key_timeobs, text, sizeof text, tsrc, sizeof tsrc)) {
                if (parse_time_of_day(text, &tod)) {
                    mjd += tod / 86400.0;
                    snprintf(src, srclen, "%s + %s", dsrc, tsrc);
                } else {
                    hilal_log(HILAL_LOG_WARN, "%s: %s = '%s' is not hh:mm:ss; using 0h UT",
                              h->where, tsrc, text);
                }
            } else if (!has_time) {
                hilal_log(HILAL_LOG_WARN, "%s: %s has a date but no time; using 0h UT", h->where,
                          dsrc);
            }
        }
    }
    if (!found)
        return;
    /* Mid-exposure: start + EXPTIME / 2 (converted from s to days). */
    if (o->mjd_is_start) {
        if (isfinite(meta->exptime_s)) {
            mjd += 0.5 * meta->exptime_s / 86400.0;
            size_t n = strlen(src);
            snprintf(src + n, srclen - n, " + EXPTIME/2");
        } else {
            size_t n = strlen(src);
            snprintf(src + n, srclen - n, " (exposure start: exposure time unknown)");
        }
    }
    meta->mjd = mjd;
}

/* An optional numeric keyword (exposure time, zero point): a bad value is
 * logged and ignored. */
static void resolve_optional(const headers *h, const char *key, double fallback,
                             const char *param, double *out, char *src, size_t srclen)
{
    int found = 0;
    double v = NAN;
    hilal_error kerr;
    hilal_error_clear(&kerr);
    src[0] = '\0';
    if (lookup_double(h, key, &v, &found, src, srclen, &kerr) != HILAL_OK) {
        hilal_log(HILAL_LOG_WARN, "%s; ignoring it", kerr.msg);
        found = 0;
        src[0] = '\0';
    }
    if (!found && param != NULL && isfinite(fallback)) {
        v = fallback;
        found = 1;
        snprintf(src, srclen, "ingest.%s", param);
    }
    *out = found ? v : NAN;
}

/* Pixels equal to the declared no-data value nodata_adu (when finite;
 * compared after BSCALE/BZERO, in float32) become NaN and NODATA; then
 * pixels at or above the saturation level saturate_adu (when finite) are
 * flagged SAT (no-data pixels are NaN and never compare true). The image
 * comes from the FITS reader, whose mask holds NODATA exactly for its NaN
 * pixels, so *nnodata, the no-data pixels, is the NaN count afterwards.
 * Each block of pixels is first tested with branch-free counts (the
 * compiler vectorises them); only blocks with such a pixel are written. */
static void flag_values(hilal_image *img, double nodata_adu, double saturate_adu,
                        size_t *nnodata, size_t *nsat)
{
    enum { BLOCK = 4096 };
    const size_t n = (size_t)img->nx * (size_t)img->ny;
    const int use_fill = isfinite(nodata_adu), use_sat = isfinite(saturate_adu);
    /* Without a level the comparisons are made false: NaN never compares. */
    const float fill = use_fill ? (float)nodata_adu : NAN;
    const float sat = use_sat ? (float)saturate_adu : NAN;
    float *pix = img->pix;
    hilal_mask_t *mask = img->mask;
    *nnodata = *nsat = 0;
    for (size_t b0 = 0; b0 < n; b0 += BLOCK) {
        size_t b1 = b0 + BLOCK < n ? b0 + BLOCK : n, nnan = 0, nflag = 0;
        for (size_t i = b0; i < b1; i++) {
            nnan += pix[i] != pix[i];
            nflag += (pix[i] == fill) | (pix[i] >= sat);
        }
        *nnodata += nnan;
        for (size_t i = b0; nflag > 0 && i < b1; i++) {
            if (pix[i] == fill) {
                pix[i] = NAN;
                mask[i] |= HILAL_MASK_NODATA;
                (*nnodata)++;
            }
            if (pix[i] >= sat) {
                mask[i] |= HILAL_MASK_SAT;
                (*nsat)++;
            }
        }
    }
}

hilal_status hilal_ingest_read(const hilal_ingest_opts *o, const char *path, int hdu,
                               hilal_image **out, hilal_ingest_sources *sources,
                               hilal_error *err)
{
    hilal_image *img = NULL;
    char *prim = NULL;
    int nprim = 0;
    hilal_ingest_sources local;
    hilal_ingest_sources *src = sources != NULL ? sources : &local;
    char where[1100];
    memset(src, 0, sizeof *src);
    *out = NULL;

    hilal_status st = hilal_fits_read_image_primary(path, hdu, &img, &prim, &nprim, err);
    if (st != HILAL_OK)
        goto cleanup;
    hilal_meta *meta = &img->meta;
    snprintf(where, sizeof where, "%s, HDU %d", meta->path, meta->hdu);
    headers h = {where, meta->header, meta->nheader_cards, meta->hdu, prim, nprim};

    /* Noise model: gain and read noise (required unless told otherwise). */
    st = resolve_required(&h, "gain", o->key_gain, "gain", "e-/ADU", o->gain_e_per_adu, 1,
                          o->require_noise, &meta->gain_e_per_adu, src->gain, sizeof src->gain,
                          err);
    if (st != HILAL_OK)
        goto cleanup;
    st = resolve_required(&h, "read noise", o->key_rdnoise, "rdnoise", "e-", o->rdnoise_e, 0,
                          o->require_noise, &meta->rdnoise_e, src->rdnoise,
                          sizeof src->rdnoise, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* Saturation: header, fallback, else +Inf with a warning. */
    int found = 0;
    st = lookup_double(&h, o->key_saturate, &meta->saturate_adu, &found, src->saturate,
                       sizeof src->saturate, err);
    if (st != HILAL_OK)
        goto cleanup;
    if (!found && isfinite(o->saturate_adu)) {
        meta->saturate_adu = o->saturate_adu;
        snprintf(src->saturate, sizeof src->saturate, "ingest.saturate");
        found = 1;
    }
    if (!found) {
        meta->saturate_adu = INFINITY;
        snprintf(src->saturate, sizeof src->saturate, "none");
        hilal_log(HILAL_LOG_WARN,
                  "%s: no saturation level (no %s keyword and ingest.saturate not set): no "
                  "pixel is flagged saturated",
                  where, o->key_saturate[0] ? o->key_saturate : "saturation");
    }

    resolve_optional(&h, o->key_exptime, NAN, NULL, &meta->exptime_s, src->exptime,
                     sizeof src->exptime);
    if (isfinite(meta->exptime_s) && meta->exptime_s < 0) {
        hilal_log(HILAL_LOG_WARN, "%s: %s = %g is negative; exposure time unknown", where,
                  o->key_exptime, meta->exptime_s);
        meta->exptime_s = NAN;
        src->exptime[0] = '\0';
    }
    resolve_optional(&h, o->key_zeropoint, o->zeropoint_mag, "zeropoint", &meta->zeropoint_mag,
                     src->zeropoint, sizeof src->zeropoint);
    resolve_mjd(&h, o, meta, src->mjd, sizeof src->mjd);
    lookup_text(&h, o->key_filter, meta->filter, sizeof meta->filter, src->filter,
                sizeof src->filter);
    lookup_text(&h, o->key_object, meta->object, sizeof meta->object, src->object,
                sizeof src->object);

    /* The declared no-data value and saturation. */
    size_t nnodata = 0, nsat = 0;
    flag_values(img, o->nodata_adu, meta->saturate_adu, &nnodata, &nsat);
    hilal_log(HILAL_LOG_DEBUG, "%s: %ld x %ld px, BITPIX %d, %zu no-data and %zu saturated px",
              where, img->nx, img->ny, meta->bitpix, nnodata, nsat);

cleanup:
    free(prim);
    if (st != HILAL_OK) {
        hilal_image_free(img);
        img = NULL;
    }
    *out = img;
    return st;
}

/* ------------------------------------------------------------------------
 * The stage
 * ------------------------------------------------------------------------ */

typedef struct ingest_state {
    hilal_ingest_opts opts;
    int threads; /* pipeline.threads, resolved */
} ingest_state;

static hilal_status ingest_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    ingest_state *s = malloc(sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_status st = hilal_ingest_opts_from_config(cfg, &s->opts, err);
    if (st != HILAL_OK) {
        free(s);
        return st;
    }
    /* pipeline.threads = 0: one per core. */
    s->threads = hilal_fft_threads((int)hilal_config_get_int(cfg, "pipeline.threads"));
    *state = s;
    return HILAL_OK;
}

/* The reference image, read in a second thread. */
typedef struct ingest_thread {
    const hilal_ingest_opts *o;
    const char *path;
    int hdu;
    hilal_image *img;
    hilal_error err;
    hilal_status st;
} ingest_thread;

static void *ingest_thread_main(void *arg)
{
    ingest_thread *t = arg;
    t->st = hilal_ingest_read(t->o, t->path, t->hdu, &t->img, NULL, &t->err);
    return NULL;
}

static hilal_status ingest_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const ingest_state *s = state;
    const hilal_ingest_opts *o = &s->opts;
    hilal_status st = HILAL_OK;
    int need_sci = frame->sci == NULL, need_ref = frame->ref == NULL;
    if (need_sci && frame->sci_path[0] == '\0')
        return hilal_error_set(err, HILAL_ERR_USAGE, "no science image given");
    if (need_ref && frame->ref_path[0] == '\0')
        return hilal_error_set(err, HILAL_ERR_USAGE, "no reference image given");
    /* The science image here, the reference in a second thread when
     * allowed (or when the thread cannot be started, afterwards here): the
     * two files are independent, and reading one is mostly CPU (pixel
     * conversion, checksum). The science error wins, and the frame gets
     * the reference only when both were read, as when read in turn.
     * CFITSIO (built reentrant) and wcslib's header parser are thread-safe;
     * CFITSIO's stack of error messages is shared by all threads, so when
     * one file fails while the other is being read, the CFITSIO detail
     * quoted in the message may be incomplete (the status and the rest of
     * the message are not affected). Night workers read files
     * concurrently in the same way. */
    ingest_thread t = {o, frame->ref_path, frame->ref_hdu, NULL, {0}, HILAL_OK};
    hilal_error_clear(&t.err);
    pthread_t tid;
    int threaded = need_sci && need_ref && s->threads >= 2 &&
                   pthread_create(&tid, NULL, ingest_thread_main, &t) == 0;
    if (need_sci) {
        st = hilal_ingest_read(o, frame->sci_path, frame->sci_hdu, &frame->sci, NULL, err);
        if (st != HILAL_OK)
            hilal_error_context(err, "science");
    }
    if (threaded)
        pthread_join(tid, NULL);
    else if (st == HILAL_OK && need_ref)
        ingest_thread_main(&t);
    if (st == HILAL_OK && need_ref && t.st != HILAL_OK) {
        st = hilal_error_set(err, t.st, "%s", t.err.msg);
        hilal_error_context(err, "reference");
    }
    if (st != HILAL_OK) {
        hilal_image_free(t.img);
        return st;
    }
    if (need_ref)
        frame->ref = t.img;
    frame->products |= HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    return HILAL_OK;
}

static void ingest_fini(void *state) { free(state); }

const hilal_stage hilal_stage_ingest = {
    .name = "ingest",
    .summary = "read the science and reference images and their detector keywords",
    .params = ingest_params,
    .nparams = NPARAMS,
    .needs = 0,
    .makes = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE,
    .flags = 0,
    .init = ingest_init,
    .run = ingest_run,
    .fini = ingest_fini,
};
