/* VOEvent packets: Hilal's packet validates against the IVOA VOEvent 2.0
 * schema (libxml2 xmlSchemaValidateDoc; the real Gaia packet validates and
 * the VOEvent 1.1 Swift packet does not, as controls) and carries the
 * alert's values where the standard puts them. */
#include <libxml/parser.h>
#include <libxml/xmlschemas.h>
#include <libxml/xpath.h>
#include <libxml/xpathInternals.h>
#include <stdio.h>
#include <string.h>

#include "test_avro_fixture.h"
#include "testutil.h"

static void quiet(void *ctx, const char *msg, ...)
{
    (void)ctx;
    (void)msg;
}

/* 0 when doc validates. */
static int validate(xmlSchemaPtr schema, xmlDocPtr doc)
{
    xmlSchemaValidCtxtPtr v = xmlSchemaNewValidCtxt(schema);
    xmlSchemaSetValidErrors(v, quiet, quiet, NULL);
    int rc = xmlSchemaValidateDoc(v, doc);
    xmlSchemaFreeValidCtxt(v);
    return rc;
}

static char *xpath_text(xmlDocPtr doc, const char *expr)
{
    xmlXPathContextPtr ctx = xmlXPathNewContext(doc);
    xmlXPathRegisterNs(ctx, BAD_CAST "voe", BAD_CAST "http://www.ivoa.net/xml/VOEvent/v2.0");
    xmlXPathObjectPtr r = xmlXPathEvalExpression(BAD_CAST expr, ctx);
    char *out = NULL;
    if (r != NULL && r->nodesetval != NULL && r->nodesetval->nodeNr > 0) {
        xmlChar *t = xmlNodeGetContent(r->nodesetval->nodeTab[0]);
        out = strdup((const char *)t);
        xmlFree(t);
    }
    xmlXPathFreeObject(r);
    xmlXPathFreeContext(ctx);
    return out;
}

static void check_text(xmlDocPtr doc, const char *expr, const char *want)
{
    char *got = xpath_text(doc, expr);
    CHECK(got != NULL && strcmp(got, want) == 0, "%s = '%s' (want '%s')", expr, got ? got : "(none)", want);
    free(got);
}

int main(void)
{
    char xsd[4096], path[4096];
    hilal_error err = {0};
    hilal_test_data("voevent/VOEvent-v2.0.xsd", xsd, sizeof xsd);
    xmlSchemaParserCtxtPtr pc = xmlSchemaNewParserCtxt(xsd);
    xmlSchemaPtr schema = xmlSchemaParse(pc);
    xmlSchemaFreeParserCtxt(pc);
    CHECK(schema != NULL, "the VOEvent 2.0 schema parses");
    if (schema == NULL)
        return hilal_test_finish();

    /* Controls. */
    xmlDocPtr gaia = xmlReadFile(hilal_test_data("voevent/Gaia16aac.xml", path, sizeof path), NULL, 0);
    CHECK(gaia != NULL && validate(schema, gaia) == 0, "the real Gaia16aac packet validates");
    xmlFreeDoc(gaia);
    xmlDocPtr swift = xmlReadFile(hilal_test_data("voevent/SWIFT_xrt_position_v1.1_example.xml", path,
                                                  sizeof path), NULL, 0);
    CHECK(swift != NULL && validate(schema, swift) != 0, "a VOEvent 1.1 packet does not validate");
    xmlFreeDoc(swift);

    /* Hilal's packet. */
    hilal_alert a;
    CHECK(fx_alert(&a) == 0, "fixture");
    hilal_alert_publisher pub = {"Hilal test observatory", "ivo://example.org/hilal",
                                 "alerts@example.org", 0};
    char *xml = NULL;
    size_t len = 0;
    CHECK_OK(hilal_voevent_write(&a, &pub, &xml, &len, &err), &err);
    CHECK(xml != NULL && len == strlen(xml) && len > 1000, "XML of %zu bytes", len);
    xmlDocPtr doc = xml ? xmlReadMemory(xml, (int)len, "alert.xml", NULL, 0) : NULL;
    CHECK(doc != NULL, "the packet is well-formed XML");
    if (doc != NULL) {
        CHECK(validate(schema, doc) == 0, "the packet validates against VOEvent-v2.0.xsd");
        char ivorn[128];
        snprintf(ivorn, sizeof ivorn, "ivo://example.org/hilal#%lld", (long long)a.alert_id);
        char *got = xpath_text(doc, "/voe:VOEvent/@ivorn");
        CHECK(got && strcmp(got, ivorn) == 0, "ivorn %s", got ? got : "(none)");
        free(got);
        check_text(doc, "/voe:VOEvent/@role", "observation");
        check_text(doc, "/voe:VOEvent/Who/Date", "2023-11-01T08:15:32");
        check_text(doc, "/voe:VOEvent/Who/Author/contactEmail", "alerts@example.org");
        check_text(doc, "//What/Param[@name='snr']/@value", "23.5");
        check_text(doc, "//What/Param[@name='mag']/@value", "18.25");
        check_text(doc, "//What/Param[@name='rb']/@value", "0.93");
        check_text(doc, "//What/Param[@name='object_id']/@value", "42");
        check_text(doc, "//What/Param[@name='isdiffpos']/@value", "t");
        check_text(doc, "//What/Group[@name='object']/Param[@name='ndet']/@value", "3");
        check_text(doc, "//Position2D/Value2/C1", "150.1234567");
        check_text(doc, "//Position2D/Value2/C2", "-2.2345678");
        /* 0.08 arcsec in degrees. */
        check_text(doc, "//Position2D/Error2Radius", "2.222e-05");
        /* MJD 60250.312345 = 2023-11-02T07:29:46.608 UTC */
        check_text(doc, "//TimeInstant/ISOTime", "2023-11-02T07:29:46.608");
        check_text(doc, "//Why/Description", a.reason);
        xmlFreeDoc(doc);
    }
    free(xml);

    /* A packet without a magnitude or position still validates (the
     * Params and Position2D are left out rather than written as NaN). */
    a.cand.mag = a.cand.mag_err = NAN;
    a.cand.ra = a.cand.dec = NAN;
    a.object.object_id = 0;
    pub.test_role = 1;
    CHECK_OK(hilal_voevent_write(&a, &pub, &xml, &len, &err), &err);
    doc = xml ? xmlReadMemory(xml, (int)len, "alert2.xml", NULL, 0) : NULL;
    CHECK(doc != NULL && validate(schema, doc) == 0, "a packet without position and magnitude validates");
    if (doc != NULL) {
        char *m = xpath_text(doc, "//What/Param[@name='mag']/@value");
        CHECK(m == NULL, "no mag Param without a magnitude");
        free(m);
        check_text(doc, "/voe:VOEvent/@role", "test");
        xmlFreeDoc(doc);
    }
    free(xml);

    /* Tampering shows up: an invalid role is refused by the schema. */
    CHECK_OK(hilal_voevent_write(&a, &pub, &xml, &len, &err), &err);
    if (xml != NULL) {
        char *p = strstr(xml, "role=\"test\"");
        CHECK(p != NULL, "role attribute present");
        if (p != NULL)
            memcpy(p, "role=\"tost\"", 11);
        doc = xmlReadMemory(xml, (int)len, "bad.xml", NULL, 0);
        CHECK(doc != NULL && validate(schema, doc) != 0, "an invalid role fails validation");
        xmlFreeDoc(doc);
    }
    free(xml);
    hilal_alert_clear(&a);
    xmlSchemaFree(schema);
    xmlCleanupParser();
    return hilal_test_finish();
}
