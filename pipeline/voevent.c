/* VOEvent 2.0 alert packets (IVOA Recommendation "Sky Event Reporting
 * Metadata", version 2.0, 2011-07-11), written with libxml2's text writer.
 * The packets validate against VOEvent-v2.0.xsd (tests/pipeline/test_voevent.c). */
#include "hilal/alert.h"

#include <libxml/xmlwriter.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define VOE_NS "http://www.ivoa.net/xml/VOEvent/v2.0"

/* ISO 8601 UTC time of an MJD, millisecond precision. */
static void mjd_iso(double mjd, char *buf, size_t len)
{
    double unix_s = (mjd - 40587.0) * 86400.0;
    double whole = floor(unix_s);
    int ms = (int)lround((unix_s - whole) * 1000.0);
    if (ms >= 1000) {
        whole += 1;
        ms -= 1000;
    }
    time_t t = (time_t)whole;
    struct tm tm;
    gmtime_r(&t, &tm);
    char base[32];
    strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf, len, "%.19s.%03u", base, (unsigned)ms % 1000u);
}

/* The writer's calls return < 0 on failure; `bad` accumulates that. */
typedef struct vo {
    xmlTextWriterPtr w;
    int bad;
} vo;

static void start(vo *v, const char *name)
{
    v->bad |= xmlTextWriterStartElement(v->w, BAD_CAST name) < 0;
}

static void end(vo *v) { v->bad |= xmlTextWriterEndElement(v->w) < 0; }

static void attr(vo *v, const char *name, const char *value)
{
    v->bad |= xmlTextWriterWriteAttribute(v->w, BAD_CAST name, BAD_CAST value) < 0;
}

static void text_element(vo *v, const char *name, const char *text)
{
    v->bad |= xmlTextWriterWriteElement(v->w, BAD_CAST name, BAD_CAST text) < 0;
}

static void param(vo *v, const char *name, const char *type, const char *ucd, const char *unit,
                  const char *value, const char *description)
{
    start(v, "Param");
    attr(v, "name", name);
    attr(v, "dataType", type);
    if (ucd != NULL)
        attr(v, "ucd", ucd);
    if (unit != NULL)
        attr(v, "unit", unit);
    attr(v, "value", value);
    if (description != NULL)
        text_element(v, "Description", description);
    end(v);
}

/* A float Param; nothing when the value is not finite (xs:float has no
 * NaN spelling that every reader takes, and "unknown" is an absent Param). */
static void param_f(vo *v, const char *name, const char *ucd, const char *unit, double value,
                    const char *description)
{
    char buf[64];
    if (!isfinite(value))
        return;
    snprintf(buf, sizeof buf, "%.9g", value);
    param(v, name, "float", ucd, unit, buf, description);
}

static void param_i(vo *v, const char *name, const char *ucd, long long value,
                    const char *description)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", value);
    param(v, name, "int", ucd, NULL, buf, description);
}

hilal_status hilal_voevent_write(const hilal_alert *a, const hilal_alert_publisher *pub,
                                 char **xml, size_t *len, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    xmlBufferPtr buf = xmlBufferCreate();
    vo v = {NULL, 0};
    char tmp[512], when[64];
    const hilal_archive_cand *c = &a->cand;
    const char *base = pub != NULL && pub->ivorn_base && pub->ivorn_base[0] ? pub->ivorn_base
                                                                            : "ivo://hilal/alerts";
    *xml = NULL;
    *len = 0;
    if (buf == NULL || (v.w = xmlNewTextWriterMemory(buf, 0)) == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "libxml2: cannot make an XML writer");
        goto cleanup;
    }
    v.bad |= xmlTextWriterSetIndent(v.w, 1) < 0;
    v.bad |= xmlTextWriterStartDocument(v.w, "1.0", "UTF-8", NULL) < 0;
    v.bad |= xmlTextWriterStartElementNS(v.w, BAD_CAST "voe", BAD_CAST "VOEvent", BAD_CAST VOE_NS) < 0;
    v.bad |= xmlTextWriterWriteAttributeNS(v.w, BAD_CAST "xmlns", BAD_CAST "xsi", NULL,
                                           BAD_CAST "http://www.w3.org/2001/XMLSchema-instance") < 0;
    snprintf(tmp, sizeof tmp, "%s#%lld", base, (long long)a->alert_id);
    attr(&v, "ivorn", tmp);
    attr(&v, "role", pub != NULL && pub->test_role ? "test" : "observation");
    attr(&v, "version", "2.0");
    v.bad |= xmlTextWriterWriteAttributeNS(v.w, BAD_CAST "xsi", BAD_CAST "schemaLocation", NULL,
                                           BAD_CAST VOE_NS " http://www.ivoa.net/xml/VOEvent/VOEvent-v2.0.xsd") < 0;

    /* Who: the publisher; Date is the commit time of the frame, so that a
     * replay writes the same packet. */
    start(&v, "Who");
    text_element(&v, "AuthorIVORN", base);
    time_t wt = (time_t)floor(a->frame.written_unix);
    struct tm tm;
    gmtime_r(&wt, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    text_element(&v, "Date", when);
    start(&v, "Author");
    text_element(&v, "title", pub != NULL && pub->name ? pub->name : "Hilal");
    if (pub != NULL && pub->contact_email && pub->contact_email[0])
        text_element(&v, "contactEmail", pub->contact_email);
    end(&v);
    end(&v);

    /* What: the measurement and the object. */
    start(&v, "What");
    param_i(&v, "alert_id", "meta.id", a->alert_id, "deterministic alert id");
    param_i(&v, "cand_id", "meta.id", c->cand_id, "candidate id in the archive");
    param_i(&v, "object_id", "meta.id", c->object_id, "object id in the archive");
    param(&v, "frame", "string", "meta.id", NULL, a->frame.frame_name, "science frame");
    if (a->frame.filter[0])
        param(&v, "filter", "string", "instr.filter", NULL, a->frame.filter, NULL);
    param_f(&v, "snr", "stat.snr", NULL, c->snr,
            "signed S_corr peak: positive brightening, negative fading");
    param(&v, "isdiffpos", "string", "meta.code", NULL, c->snr >= 0 ? "t" : "f",
          "t: brighter than the reference, f: fainter");
    param_f(&v, "flux", "phot.flux", "ct", c->flux, "signed PSF flux on the difference image, science ADU");
    param_f(&v, "flux_err", "stat.error;phot.flux", "ct", c->flux_err, NULL);
    param_f(&v, "mag", "phot.mag", "mag", c->mag, "magnitude of |flux| with the frame zero point");
    param_f(&v, "mag_err", "stat.error;phot.mag", "mag", c->mag_err, NULL);
    param_f(&v, "limmag5", "phot.mag;stat.max", "mag", a->frame.limmag5, "5-sigma limiting magnitude");
    param_f(&v, "rb", "stat.probability", NULL, c->rb, "real/bogus score, 1 = real");
    param_i(&v, "flags", "meta.code.qual", (long long)c->flags, "candidate flag bits");
    param_f(&v, "fwhm", "phys.angSize", "pix", c->fwhm, "FWHM on the difference image");
    if (a->object.object_id > 0) {
        start(&v, "Group");
        attr(&v, "name", "object");
        param_i(&v, "ndet", "meta.number", a->object.ndet, "detections up to and including this one");
        param_f(&v, "first_mjd", "time.start", "d", a->object.first_mjd, "MJD of the first detection");
        param_f(&v, "ra", "pos.eq.ra", "deg", a->object.ra, "weighted mean position");
        param_f(&v, "dec", "pos.eq.dec", "deg", a->object.dec, NULL);
        param_f(&v, "pos_err", "stat.error;pos.eq", "arcsec", a->object.pos_err_arcsec, NULL);
        end(&v);
    }
    end(&v);

    /* WhereWhen: ICRS position of this detection and the UTC time of the
     * exposure, topocentric. */
    start(&v, "WhereWhen");
    start(&v, "ObsDataLocation");
    start(&v, "ObservatoryLocation");
    attr(&v, "id", pub != NULL && pub->name ? pub->name : "Hilal");
    end(&v);
    start(&v, "ObservationLocation");
    start(&v, "AstroCoordSystem");
    attr(&v, "id", "UTC-ICRS-TOPO");
    end(&v);
    start(&v, "AstroCoords");
    attr(&v, "coord_system_id", "UTC-ICRS-TOPO");
    start(&v, "Time");
    attr(&v, "unit", "s");
    start(&v, "TimeInstant");
    mjd_iso(c->mjd, when, sizeof when);
    text_element(&v, "ISOTime", when);
    end(&v);
    end(&v);
    if (isfinite(c->ra) && isfinite(c->dec)) {
        start(&v, "Position2D");
        attr(&v, "unit", "deg");
        text_element(&v, "Name1", "RA");
        text_element(&v, "Name2", "Dec");
        start(&v, "Value2");
        snprintf(tmp, sizeof tmp, "%.7f", c->ra);
        text_element(&v, "C1", tmp);
        snprintf(tmp, sizeof tmp, "%.7f", c->dec);
        text_element(&v, "C2", tmp);
        end(&v);
        double e = isfinite(c->pos_err_arcsec) ? c->pos_err_arcsec : 0.3;
        snprintf(tmp, sizeof tmp, "%.3e", e / 3600.0);
        text_element(&v, "Error2Radius", tmp);
        end(&v);
    }
    end(&v); /* AstroCoords */
    end(&v); /* ObservationLocation */
    end(&v); /* ObsDataLocation */
    end(&v); /* WhereWhen */

    start(&v, "How");
    text_element(&v, "Description",
                 "Difference imaging with ZOGY proper image subtraction; detection on the "
                 "corrected score S_corr");
    start(&v, "Reference");
    attr(&v, "uri", "https://doi.org/10.3847/0004-637X/830/1/27");
    attr(&v, "type", "url");
    end(&v);
    end(&v);

    start(&v, "Why");
    snprintf(tmp, sizeof tmp, "%.3f", isfinite(c->rb) ? fmin(fmax(c->rb, 0), 1) : 0.0);
    attr(&v, "importance", tmp);
    start(&v, "Inference");
    attr(&v, "probability", tmp);
    text_element(&v, "Concept", c->snr >= 0 ? "brightening transient" : "fading source");
    end(&v);
    text_element(&v, "Description", a->reason);
    end(&v);

    v.bad |= xmlTextWriterEndDocument(v.w) < 0;
    xmlFreeTextWriter(v.w);
    v.w = NULL;
    if (v.bad) {
        st = hilal_error_set(err, HILAL_ERR_ALERT, "libxml2 could not write the VOEvent");
        goto cleanup;
    }
    size_t n = (size_t)xmlBufferLength(buf);
    char *out = malloc(n + 1);
    if (out == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    memcpy(out, xmlBufferContent(buf), n);
    out[n] = '\0';
    *xml = out;
    *len = n;
cleanup:
    if (v.w != NULL)
        xmlFreeTextWriter(v.w);
    if (buf != NULL)
        xmlBufferFree(buf);
    if (st != HILAL_OK)
        hilal_error_context(err, "VOEvent of alert %lld", (long long)a->alert_id);
    return st;
}
