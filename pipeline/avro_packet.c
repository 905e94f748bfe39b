/* Avro alert packets (schemas/hilal_alert_v1.avsc) written with avro-c, and
 * the gzipped FITS cutouts they carry. The only place avro-c is called. */
#include "hilal/alert.h"

#include <avro.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "hilal/fits.h"

/* The writer schema: the text of schemas/hilal_alert_v1.avsc
 * (tests/pipeline/test_avro.c checks that both are the same schema). */
static const char schema_json[] =
    "{\n"
    "  \"namespace\": \"hilal.alert\",\n"
    "  \"type\": \"record\",\n"
    "  \"name\": \"alert\",\n"
    "  \"doc\": \"Hilal transient alert packet, schema version 1.0 (docs/alerts.md)\",\n"
    "  \"version\": \"1.0\",\n"
    "  \"fields\": [\n"
    "    {\"name\": \"schemavsn\", \"type\": \"string\", \"doc\": \"schema version used: 1.0\"},\n"
    "    {\"name\": \"publisher\", \"type\": \"string\", \"doc\": \"origin of the alert packet\"},\n"
    "    {\"name\": \"alertId\", \"type\": \"long\", \"doc\": \"deterministic alert id: consumers drop repeats of an id\"},\n"
    "    {\"name\": \"objectId\", \"type\": \"long\", \"doc\": \"object id in the archive (/objects), 0 without a sky position\"},\n"
    "    {\"name\": \"candid\", \"type\": \"long\", \"doc\": \"candidate id in the archive (/candidates)\"},\n"
    "    {\"name\": \"reason\", \"type\": \"string\", \"doc\": \"the selection rule that triggered the alert\"},\n"
    "    {\"name\": \"candidate\", \"type\": {\n"
    "      \"type\": \"record\",\n"
    "      \"name\": \"candidate\",\n"
    "      \"doc\": \"one detection on a ZOGY difference image\",\n"
    "      \"fields\": [\n"
    "        {\"name\": \"candid\", \"type\": \"long\", \"doc\": \"candidate id in the archive\"},\n"
    "        {\"name\": \"frameId\", \"type\": \"long\", \"doc\": \"frame id: int(sha256(f'{sha256 of the science file}:{hdu}').hexdigest()[:15], 16)\"},\n"
    "        {\"name\": \"frameName\", \"type\": \"string\", \"doc\": \"name of the science frame\"},\n"
    "        {\"name\": \"mjd\", \"type\": \"double\", \"doc\": \"MJD (UTC) of the science exposure [d]\"},\n"
    "        {\"name\": \"jd\", \"type\": \"double\", \"doc\": \"Julian date of the science exposure [d]\"},\n"
    "        {\"name\": \"filter\", \"type\": \"string\", \"doc\": \"filter name\"},\n"
    "        {\"name\": \"ra\", \"type\": [\"null\", \"double\"], \"default\": null, \"doc\": \"right ascension, ICRS [deg]\"},\n"
    "        {\"name\": \"dec\", \"type\": [\"null\", \"double\"], \"default\": null, \"doc\": \"declination, ICRS [deg]\"},\n"
    "        {\"name\": \"posErrArcsec\", \"type\": [\"null\", \"double\"], \"default\": null, \"doc\": \"1-sigma position error [arcsec]\"},\n"
    "        {\"name\": \"x\", \"type\": \"double\", \"doc\": \"x position, FITS 1-based science pixels\"},\n"
    "        {\"name\": \"y\", \"type\": \"double\", \"doc\": \"y position, FITS 1-based science pixels\"},\n"
    "        {\"name\": \"isdiffpos\", \"type\": \"string\", \"doc\": \"t: brightening (positive difference flux), f: fading\"},\n"
    "        {\"name\": \"snr\", \"type\": \"double\", \"doc\": \"signed S_corr peak [sigma]\"},\n"
    "        {\"name\": \"flux\", \"type\": \"double\", \"doc\": \"signed PSF flux on the difference image [science ADU]\"},\n"
    "        {\"name\": \"fluxErr\", \"type\": \"double\", \"doc\": \"1-sigma error of flux [science ADU]\"},\n"
    "        {\"name\": \"mag\", \"type\": [\"null\", \"double\"], \"default\": null, \"doc\": \"magnitude of |flux| with the frame zero point [mag]\"},\n"
    "        {\"name\": \"magErr\", \"type\": [\"null\", \"double\"], \"default\": null, \"doc\": \"1-sigma error of mag [mag]\"},\n"
    "        {\"name\": \"zeropoint\", \"type\": [\"null\", \"double\"], \"default\": null, \"doc\": \"frame zero point, mag for 1 ADU [mag]\"},\n"
    "        {\"name\": \"limmag5\", \"type\": [\"null\", \"double\"], \"default\": null, \"doc\": \"5-sigma limiting magnitude of the difference image [mag]\"},\n"
    "        {\"name\": \"fwhm\", \"type\": \"double\", \"doc\": \"FWHM on the difference image [pixels]\"},\n"
    "        {\"name\": \"elongation\", \"type\": \"double\", \"doc\": \"a/b on the difference image\"},\n"
    "        {\"name\": \"rb\", \"type\": \"double\", \"doc\": \"real/bogus score in [0, 1], 1 = real\"},\n"
    "        {\"name\": \"flags\", \"type\": \"long\", \"doc\": \"candidate flag bits (docs/archive.md)\"},\n"
    "        {\"name\": \"sharpness\", \"type\": \"double\", \"doc\": \"peak-to-PSF-fit ratio\"},\n"
    "        {\"name\": \"negFrac\", \"type\": \"double\", \"doc\": \"fraction of negative-signed pixels in the footprint\"},\n"
    "        {\"name\": \"dipole\", \"type\": \"double\", \"doc\": \"dipole measure of the residual\"},\n"
    "        {\"name\": \"distSatPx\", \"type\": \"double\", \"doc\": \"distance to the nearest saturated pixel [pixels]\"},\n"
    "        {\"name\": \"distMaskPx\", \"type\": \"double\", \"doc\": \"distance to the nearest masked pixel [pixels]\"},\n"
    "        {\"name\": \"maskedFrac\", \"type\": \"double\", \"doc\": \"masked fraction of the footprint\"}\n"
    "      ]}},\n"
    "    {\"name\": \"object\", \"type\": [\"null\", {\n"
    "      \"type\": \"record\",\n"
    "      \"name\": \"object\",\n"
    "      \"doc\": \"the object: detections associated across frames\",\n"
    "      \"fields\": [\n"
    "        {\"name\": \"objectId\", \"type\": \"long\", \"doc\": \"object id in the archive\"},\n"
    "        {\"name\": \"ra\", \"type\": \"double\", \"doc\": \"weighted mean right ascension [deg]\"},\n"
    "        {\"name\": \"dec\", \"type\": \"double\", \"doc\": \"weighted mean declination [deg]\"},\n"
    "        {\"name\": \"posErrArcsec\", \"type\": \"double\", \"doc\": \"1-sigma error of the mean position [arcsec]\"},\n"
    "        {\"name\": \"ndet\", \"type\": \"int\", \"doc\": \"detections up to and including this one\"},\n"
    "        {\"name\": \"firstMjd\", \"type\": \"double\", \"doc\": \"MJD of the first detection [d]\"},\n"
    "        {\"name\": \"lastMjd\", \"type\": \"double\", \"doc\": \"MJD of this detection [d]\"}\n"
    "      ]}], \"default\": null},\n"
    "    {\"name\": \"prv_candidates\", \"type\": [\"null\", {\"type\": \"array\", \"items\": \"hilal.alert.candidate\"}],\n"
    "     \"default\": null, \"doc\": \"earlier detections of the object, oldest first\"},\n"
    "    {\"name\": \"cutoutScience\", \"type\": [\"null\", {\n"
    "      \"type\": \"record\",\n"
    "      \"name\": \"cutout\",\n"
    "      \"doc\": \"a square stamp centred on the candidate\",\n"
    "      \"fields\": [\n"
    "        {\"name\": \"fileName\", \"type\": \"string\"},\n"
    "        {\"name\": \"stampData\", \"type\": \"bytes\", \"doc\": \"gzip-compressed FITS file (fits.gz)\"}\n"
    "      ]}], \"default\": null},\n"
    "    {\"name\": \"cutoutTemplate\", \"type\": [\"null\", \"hilal.alert.cutout\"], \"default\": null},\n"
    "    {\"name\": \"cutoutDifference\", \"type\": [\"null\", \"hilal.alert.cutout\"], \"default\": null}\n"
    "  ]\n"
    "}\n";

const char *hilal_avro_schema_json(void) { return schema_json; }

/* ------------------------------------------------------------------------
 * gzip and FITS cutouts
 * ------------------------------------------------------------------------ */

hilal_status hilal_gzip(const unsigned char *in, size_t n, unsigned char **out, size_t *nout,
                        hilal_error *err)
{
    hilal_status st = HILAL_OK;
    z_stream z;
    memset(&z, 0, sizeof z);
    *out = NULL;
    *nout = 0;
    /* windowBits 15 + 16: a gzip (RFC 1952) header and trailer around the
     * deflate stream; level 6 is zlib's default trade-off. */
    if (deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "zlib: cannot start gzip compression");
    size_t cap = deflateBound(&z, (uLong)n) + 32;
    unsigned char *buf = malloc(cap);
    if (buf == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu bytes", cap);
        goto cleanup;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)n;
    z.next_out = buf;
    z.avail_out = (uInt)cap;
    if (deflate(&z, Z_FINISH) != Z_STREAM_END) {
        st = hilal_error_set(err, HILAL_ERR_INTERNAL, "zlib: gzip compression did not finish: %s",
                             z.msg ? z.msg : "no message");
        goto cleanup;
    }
    *out = buf;
    *nout = cap - z.avail_out;
    buf = NULL;
cleanup:
    deflateEnd(&z);
    free(buf);
    return st;
}

static hilal_status read_whole_file(const char *path, unsigned char **data, size_t *n,
                                    hilal_error *err)
{
    FILE *fp = fopen(path, "rb");
    long size;
    *data = NULL;
    *n = 0;
    if (fp == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot read %s: %s", path, strerror(errno));
    if (fseek(fp, 0, SEEK_END) != 0 || (size = ftell(fp)) < 0 || fseek(fp, 0, SEEK_SET) != 0) {
        fclose(fp);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot size %s: %s", path, strerror(errno));
    }
    unsigned char *buf = malloc(size > 0 ? (size_t)size : 1);
    if (buf == NULL || fread(buf, 1, (size_t)size, fp) != (size_t)size) {
        free(buf);
        fclose(fp);
        return hilal_error_set(err, buf == NULL ? HILAL_ERR_NOMEM : HILAL_ERR_IO,
                               "cannot read %s", path);
    }
    fclose(fp);
    *data = buf;
    *n = (size_t)size;
    return HILAL_OK;
}

hilal_status hilal_alert_cutout_fits_gz(const float *pix, int size, const char *plane,
                                        const hilal_alert *a, const char *tmpdir,
                                        unsigned char **buf, size_t *len, hilal_error *err)
{
    static unsigned counter;
    hilal_status st;
    char path[4096];
    unsigned char *fits = NULL;
    size_t nfits = 0;
    const char *dir = tmpdir != NULL && tmpdir[0] ? tmpdir : getenv("TMPDIR");
    *buf = NULL;
    *len = 0;
    if (dir == NULL || dir[0] == '\0')
        dir = "/tmp";
    snprintf(path, sizeof path, "%s/hilal-cutout-%ld-%u.fits", dir, (long)getpid(),
             __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED));
    /* The FITS file is made by CFITSIO (fits.h) in a scratch file, read
     * back and gzipped: the packet carries the bytes of a standard FITS
     * file, as ZTF's and LSST's do. */
    hilal_fits_writer *w = hilal_fits_writer_open(path, err);
    if (w == NULL) {
        hilal_error_context(err, "%s cutout of candidate %lld", plane, (long long)a->cand.cand_id);
        return HILAL_ERR_IO;
    }
    st = hilal_fits_writer_add_float(w, NULL, size, size, pix, err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_string(w, "STAMP", plane, "image plane of the stamp", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_string(w, "BUNIT", strcmp(plane, "difference") == 0 ? "sigma" : "adu",
                                          strcmp(plane, "difference") == 0
                                              ? "ZOGY D normalised to unit variance"
                                              : "detector units, background included",
                                          err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "ALERTID", a->alert_id, "Hilal alert id", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "CANDID", a->cand.cand_id, "candidate id in the archive", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "OBJECTID", a->cand.object_id, "object id in the archive", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "MJD-OBS", a->cand.mjd, "MJD of the science exposure", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "CAND_RA", a->cand.ra, "[deg] candidate right ascension", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "CAND_DEC", a->cand.dec, "[deg] candidate declination", err);
    /* IRAF's physical-to-image offset: stamp pixel (i, j) is frame pixel
     * (i - LTV1, j - LTV2). */
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "LTV1", 1.0 - a->cand.stamp_x0, "frame x = stamp x - LTV1", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "LTV2", 1.0 - a->cand.stamp_y0, "frame y = stamp y - LTV2", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_string(w, "FRAME", a->frame.frame_name, "science frame", err);
    if (st != HILAL_OK) {
        hilal_fits_writer_free(w);
        goto cleanup;
    }
    st = hilal_fits_writer_close(w, err);
    if (st == HILAL_OK)
        st = read_whole_file(path, &fits, &nfits, err);
    if (st == HILAL_OK)
        st = hilal_gzip(fits, nfits, buf, len, err);
cleanup:
    unlink(path);
    free(fits);
    if (st != HILAL_OK)
        hilal_error_context(err, "%s cutout of candidate %lld", plane, (long long)a->cand.cand_id);
    return st;
}

/* ------------------------------------------------------------------------
 * The record
 * ------------------------------------------------------------------------ */

/* avro-c reports errors through a thread-local message. */
static hilal_status avro_fail(hilal_error *err, const char *what)
{
    return hilal_error_set(err, HILAL_ERR_ALERT, "avro: %s: %s", what, avro_strerror());
}

static int field(avro_value_t *rec, const char *name, avro_value_t *out)
{
    return avro_value_get_by_name(rec, name, out, NULL);
}

static int set_double(avro_value_t *rec, const char *name, double v)
{
    avro_value_t f;
    return field(rec, name, &f) || avro_value_set_double(&f, v);
}

static int set_long(avro_value_t *rec, const char *name, int64_t v)
{
    avro_value_t f;
    return field(rec, name, &f) || avro_value_set_long(&f, v);
}

static int set_int(avro_value_t *rec, const char *name, int32_t v)
{
    avro_value_t f;
    return field(rec, name, &f) || avro_value_set_int(&f, v);
}

static int set_string(avro_value_t *rec, const char *name, const char *v)
{
    avro_value_t f;
    return field(rec, name, &f) || avro_value_set_string(&f, v != NULL ? v : "");
}

/* ["null", "double"]: null for a non-finite value. */
static int set_opt_double(avro_value_t *rec, const char *name, double v)
{
    avro_value_t f, b;
    if (field(rec, name, &f))
        return 1;
    if (!isfinite(v))
        return avro_value_set_branch(&f, 0, &b) || avro_value_set_null(&b);
    return avro_value_set_branch(&f, 1, &b) || avro_value_set_double(&b, v);
}

static int fill_candidate(avro_value_t *rec, const hilal_archive_cand *c,
                          const hilal_archive_frame *f)
{
    return set_long(rec, "candid", c->cand_id) || set_long(rec, "frameId", c->frame_id) ||
           set_string(rec, "frameName", f != NULL ? f->frame_name : "") ||
           set_double(rec, "mjd", c->mjd) || set_double(rec, "jd", c->mjd + 2400000.5) ||
           set_string(rec, "filter", f != NULL ? f->filter : "") ||
           set_opt_double(rec, "ra", c->ra) || set_opt_double(rec, "dec", c->dec) ||
           set_opt_double(rec, "posErrArcsec", c->pos_err_arcsec) || set_double(rec, "x", c->x) ||
           set_double(rec, "y", c->y) || set_string(rec, "isdiffpos", c->snr >= 0 ? "t" : "f") ||
           set_double(rec, "snr", c->snr) || set_double(rec, "flux", c->flux) ||
           set_double(rec, "fluxErr", c->flux_err) || set_opt_double(rec, "mag", c->mag) ||
           set_opt_double(rec, "magErr", c->mag_err) ||
           set_opt_double(rec, "zeropoint", f != NULL ? f->zeropoint_mag : NAN) ||
           set_opt_double(rec, "limmag5", f != NULL ? f->limmag5 : NAN) ||
           set_double(rec, "fwhm", c->fwhm) || set_double(rec, "elongation", c->elongation) ||
           set_double(rec, "rb", c->rb) || set_long(rec, "flags", (int64_t)c->flags) ||
           set_double(rec, "sharpness", c->sharpness) || set_double(rec, "negFrac", c->neg_frac) ||
           set_double(rec, "dipole", c->dipole) || set_double(rec, "distSatPx", c->dist_sat_px) ||
           set_double(rec, "distMaskPx", c->dist_mask_px) ||
           set_double(rec, "maskedFrac", c->masked_frac);
}

static hilal_status set_cutout(avro_value_t *rec, const char *name, const hilal_alert *a,
                               int plane, const char *label, hilal_error *err)
{
    avro_value_t f, b, sub;
    unsigned char *gz = NULL;
    size_t ngz = 0;
    char fname[128];
    if (field(rec, name, &f))
        return avro_fail(err, name);
    if (a->cutout.plane[plane] == NULL || a->cutout.size <= 0) {
        if (avro_value_set_branch(&f, 0, &b) || avro_value_set_null(&b))
            return avro_fail(err, name);
        return HILAL_OK;
    }
    hilal_status st = hilal_alert_cutout_fits_gz(a->cutout.plane[plane], a->cutout.size, label, a,
                                                 NULL, &gz, &ngz, err);
    if (st != HILAL_OK)
        return st;
    snprintf(fname, sizeof fname, "candid%lld_%s.fits.gz", (long long)a->cand.cand_id, label);
    if (avro_value_set_branch(&f, 1, &b) || field(&b, "fileName", &sub) ||
        avro_value_set_string(&sub, fname) || field(&b, "stampData", &sub) ||
        avro_value_set_bytes(&sub, gz, ngz))
        st = avro_fail(err, name);
    free(gz);
    return st;
}

hilal_status hilal_avro_packet_write(const hilal_alert *a, const hilal_alert_publisher *pub,
                                     unsigned char **buf, size_t *len, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    avro_schema_t schema = NULL;
    avro_value_iface_t *iface = NULL;
    avro_value_t rec, f, b, item;
    int have_rec = 0;
    avro_file_writer_t w = NULL;
    char *mem = NULL;
    size_t nmem = 0;
    FILE *fp = NULL;
    *buf = NULL;
    *len = 0;

    if (avro_schema_from_json_length(schema_json, sizeof schema_json - 1, &schema) != 0) {
        st = avro_fail(err, "the alert schema does not parse");
        goto cleanup;
    }
    iface = avro_generic_class_from_schema(schema);
    if (iface == NULL || avro_generic_value_new(iface, &rec) != 0) {
        st = avro_fail(err, "cannot make a record");
        goto cleanup;
    }
    have_rec = 1;
    if (set_string(&rec, "schemavsn", HILAL_ALERT_SCHEMA_VERSION) ||
        set_string(&rec, "publisher", pub != NULL && pub->name ? pub->name : "Hilal") ||
        set_long(&rec, "alertId", a->alert_id) || set_long(&rec, "objectId", a->cand.object_id) ||
        set_long(&rec, "candid", a->cand.cand_id) || set_string(&rec, "reason", a->reason) ||
        field(&rec, "candidate", &f) || fill_candidate(&f, &a->cand, &a->frame)) {
        st = avro_fail(err, "candidate fields");
        goto cleanup;
    }
    /* The object as of this detection. */
    if (field(&rec, "object", &f)) {
        st = avro_fail(err, "object");
        goto cleanup;
    }
    if (a->object.object_id > 0) {
        if (avro_value_set_branch(&f, 1, &b) || set_long(&b, "objectId", a->object.object_id) ||
            set_double(&b, "ra", a->object.ra) || set_double(&b, "dec", a->object.dec) ||
            set_double(&b, "posErrArcsec", a->object.pos_err_arcsec) ||
            set_int(&b, "ndet", a->object.ndet) || set_double(&b, "firstMjd", a->object.first_mjd) ||
            set_double(&b, "lastMjd", a->object.last_mjd)) {
            st = avro_fail(err, "object fields");
            goto cleanup;
        }
    } else if (avro_value_set_branch(&f, 0, &b) || avro_value_set_null(&b)) {
        st = avro_fail(err, "object");
        goto cleanup;
    }
    /* Previous detections (their frame names and filters are not repeated:
     * frameId identifies the frame). */
    if (field(&rec, "prv_candidates", &f)) {
        st = avro_fail(err, "prv_candidates");
        goto cleanup;
    }
    if (a->nhistory > 0) {
        if (avro_value_set_branch(&f, 1, &b)) {
            st = avro_fail(err, "prv_candidates");
            goto cleanup;
        }
        for (size_t i = 0; i < a->nhistory; i++)
            if (avro_value_append(&b, &item, NULL) || fill_candidate(&item, &a->history[i], NULL)) {
                st = avro_fail(err, "prv_candidates entry");
                goto cleanup;
            }
    } else if (avro_value_set_branch(&f, 0, &b) || avro_value_set_null(&b)) {
        st = avro_fail(err, "prv_candidates");
        goto cleanup;
    }
    st = set_cutout(&rec, "cutoutScience", a, HILAL_ARCHIVE_SCIENCE, "science", err);
    if (st == HILAL_OK)
        st = set_cutout(&rec, "cutoutTemplate", a, HILAL_ARCHIVE_REFERENCE, "reference", err);
    if (st == HILAL_OK)
        st = set_cutout(&rec, "cutoutDifference", a, HILAL_ARCHIVE_DIFFERENCE, "difference", err);
    if (st != HILAL_OK)
        goto cleanup;

    /* One-record object container file, in memory. The block must hold the
     * whole record: stamps, history and a margin. */
    size_t block = 3 * 64 * 1024 + 512 * (a->nhistory + 1) + 65536;
    if (a->cutout.size > 0)
        block += 3 * (size_t)a->cutout.size * (size_t)a->cutout.size * 4;
    fp = open_memstream(&mem, &nmem);
    if (fp == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "cannot open a memory stream: %s", strerror(errno));
        goto cleanup;
    }
    if (avro_file_writer_create_with_codec_fp(fp, "alert", 0, schema, &w, "null", block) != 0) {
        st = avro_fail(err, "cannot start the container");
        goto cleanup;
    }
    if (avro_file_writer_append_value(w, &rec) != 0) {
        st = avro_fail(err, "cannot write the record");
        goto cleanup;
    }
    if (avro_file_writer_close(w) != 0) {
        w = NULL;
        st = avro_fail(err, "cannot finish the container");
        goto cleanup;
    }
    w = NULL;
    if (fclose(fp) != 0) {
        fp = NULL;
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "cannot finish the memory stream");
        goto cleanup;
    }
    fp = NULL;
    *buf = (unsigned char *)mem;
    *len = nmem;
    mem = NULL;
cleanup:
    if (w != NULL)
        avro_file_writer_close(w);
    if (fp != NULL)
        fclose(fp);
    free(mem);
    if (have_rec)
        avro_value_decref(&rec);
    if (iface != NULL)
        avro_value_iface_decref(iface);
    if (schema != NULL)
        avro_schema_decref(schema);
    if (st != HILAL_OK)
        hilal_error_context(err, "Avro packet of alert %lld", (long long)a->alert_id);
    return st;
}
