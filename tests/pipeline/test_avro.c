/* Avro packets: written with the shipped schema, read back with avro-c
 * (the container's writer schema equals schemas/hilal_alert_v1.avsc), every
 * field as written, and the three cutouts gzipped FITS files that CFITSIO
 * reads back pixel for pixel (NaN kept) and fitsverify accepts. */
#include <avro.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "hilal/fits.h"
#include "test_avro_fixture.h"
#include "testutil.h"

static unsigned char *gunzip(const unsigned char *in, size_t n, size_t *nout)
{
    size_t cap = 1 << 20;
    unsigned char *out = malloc(cap);
    z_stream z;
    memset(&z, 0, sizeof z);
    if (out == NULL || inflateInit2(&z, 15 + 32) != Z_OK) {
        free(out);
        return NULL;
    }
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    int rc = inflate(&z, Z_FINISH);
    *nout = cap - z.avail_out;
    inflateEnd(&z);
    if (rc != Z_STREAM_END) {
        free(out);
        return NULL;
    }
    return out;
}

static double get_double(avro_value_t *rec, const char *name)
{
    avro_value_t f;
    double d = NAN;
    if (avro_value_get_by_name(rec, name, &f, NULL) == 0)
        avro_value_get_double(&f, &d);
    return d;
}

static int64_t get_long(avro_value_t *rec, const char *name)
{
    avro_value_t f;
    int64_t v = -1;
    if (avro_value_get_by_name(rec, name, &f, NULL) == 0)
        avro_value_get_long(&f, &v);
    return v;
}

static const char *get_string(avro_value_t *rec, const char *name)
{
    avro_value_t f;
    const char *s = NULL;
    size_t n;
    if (avro_value_get_by_name(rec, name, &f, NULL) == 0)
        avro_value_get_string(&f, &s, &n);
    return s ? s : "";
}

/* A ["null", X] field: its branch value, or -1 for null. */
static int get_branch(avro_value_t *rec, const char *name, avro_value_t *out)
{
    avro_value_t f;
    int disc = -1;
    if (avro_value_get_by_name(rec, name, &f, NULL) != 0 || avro_value_get_discriminant(&f, &disc) != 0)
        return -1;
    if (disc == 0)
        return -1;
    avro_value_get_current_branch(&f, out);
    return disc;
}

static void check_cutout(avro_value_t *rec, const char *field, int plane, const char *dir,
                         const char *verify)
{
    avro_value_t c, f;
    const void *bytes = NULL;
    size_t nbytes = 0, nfits = 0;
    hilal_error err = {0};
    CHECK(get_branch(rec, field, &c) == 1, "%s present", field);
    if (avro_value_get_by_name(&c, "stampData", &f, NULL) != 0 ||
        avro_value_get_bytes(&f, &bytes, &nbytes) != 0) {
        CHECK(0, "%s.stampData readable", field);
        return;
    }
    CHECK(nbytes > 18 && ((const unsigned char *)bytes)[0] == 0x1f &&
              ((const unsigned char *)bytes)[1] == 0x8b, "%s is gzip (%zu bytes)", field, nbytes);
    unsigned char *fits = gunzip(bytes, nbytes, &nfits);
    CHECK(fits != NULL && nfits % 2880 == 0 && memcmp(fits, "SIMPLE  =", 9) == 0,
          "%s gunzips to a FITS file of %zu bytes", field, nfits);
    if (fits == NULL)
        return;
    char path[4200];
    snprintf(path, sizeof path, "%s/%s.fits", dir, field);
    FILE *fp = fopen(path, "wb");
    fwrite(fits, 1, nfits, fp);
    fclose(fp);
    free(fits);
    hilal_image *img = NULL;
    CHECK_OK(hilal_fits_read_image(path, 1, &img, &err), &err);
    if (img != NULL) {
        CHECK(img->nx == FX_SIZE && img->ny == FX_SIZE, "%s is %ld x %ld", field, img->nx, img->ny);
        long bad = 0;
        for (int j = 0; j < FX_SIZE && img->nx == FX_SIZE; j++)
            for (int i = 0; i < FX_SIZE; i++) {
                float want = fx_pix(plane, i, j), got = img->pix[j * FX_SIZE + i];
                if (!(isnan(want) ? isnan(got) : got == want))
                    bad++;
            }
        CHECK(bad == 0, "%s: every pixel as written (%ld differ)", field, bad);
        char v[80];
        CHECK(hilal_fits_header_get(img->meta.header, (int)(strlen(img->meta.header) / 80), "CANDID",
                                    v, sizeof v) == HILAL_FITS_KEY_FOUND && atoi(v) == 200,
              "%s has CANDID = 200", field);
        hilal_image_free(img);
    }
    if (verify != NULL) {
        char cmd[4400], *out = NULL;
        snprintf(cmd, sizeof cmd, "%s %s", verify, path);
        int rc = hilal_test_run(cmd, &out);
        CHECK(rc == 0 && out && strstr(out, "0 warning(s) and 0 error(s)"), "fitsverify accepts %s: %s",
              field, out ? out : "");
        free(out);
    }
}

int main(void)
{
    hilal_error err = {0};
    char dir[4096], path[4200];
    hilal_test_tmpdir("avro", dir, sizeof dir);
    const char *verify = hilal_test_run("command -v fitsverify >/dev/null", NULL) == 0 ? "fitsverify" : NULL;

    /* The shipped schema file is the schema the library writes. */
    const char *src = getenv("HILAL_SOURCE_DIR");
    snprintf(path, sizeof path, "%s/schemas/hilal_alert_v1.avsc", src ? src : ".");
    FILE *fp = fopen(path, "r");
    CHECK(fp != NULL, "schemas/hilal_alert_v1.avsc exists");
    static char text[65536];
    size_t ntext = fp ? fread(text, 1, sizeof text - 1, fp) : 0;
    if (fp)
        fclose(fp);
    avro_schema_t shipped = NULL, embedded = NULL;
    CHECK(avro_schema_from_json_length(text, ntext, &shipped) == 0, "shipped schema parses: %s", avro_strerror());
    CHECK(avro_schema_from_json_length(hilal_avro_schema_json(), strlen(hilal_avro_schema_json()),
                                       &embedded) == 0, "embedded schema parses");
    CHECK(shipped && embedded && avro_schema_equal(shipped, embedded), "shipped == embedded schema");
    CHECK(strstr(text, "\"version\": \"" HILAL_ALERT_SCHEMA_VERSION "\"") != NULL,
          "the schema file states version %s", HILAL_ALERT_SCHEMA_VERSION);

    hilal_alert a;
    CHECK(fx_alert(&a) == 0, "fixture");
    hilal_alert_publisher pub = {"Hilal test", "ivo://example.org/hilal", "", 0};
    unsigned char *buf = NULL;
    size_t len = 0;
    CHECK_OK(hilal_avro_packet_write(&a, &pub, &buf, &len, &err), &err);
    CHECK(buf != NULL && len > 4 && memcmp(buf, "Obj\x01", 4) == 0, "an Avro container of %zu bytes", len);
    printf("Avro packet with 3 cutouts of 63 x 63 and 2 previous detections: %zu bytes\n", len);

    /* Read back with avro-c. */
    FILE *mem = buf ? fmemopen(buf, len, "rb") : NULL;
    avro_file_reader_t reader = NULL;
    CHECK(mem != NULL && avro_file_reader_fp(mem, "packet", 1, &reader) == 0, "avro-c opens the packet: %s",
          avro_strerror());
    if (reader != NULL) {
        avro_schema_t ws = avro_file_reader_get_writer_schema(reader);
        CHECK(ws && shipped && avro_schema_equal(ws, shipped), "writer schema is the shipped one");
        avro_value_iface_t *iface = avro_generic_class_from_schema(ws);
        avro_value_t rec, cand, obj, prv, item;
        avro_generic_value_new(iface, &rec);
        CHECK(avro_file_reader_read_value(reader, &rec) == 0, "one record");
        CHECK(strcmp(get_string(&rec, "schemavsn"), "1.0") == 0, "schemavsn 1.0");
        CHECK(strcmp(get_string(&rec, "publisher"), "Hilal test") == 0, "publisher");
        CHECK(get_long(&rec, "alertId") == a.alert_id, "alertId");
        CHECK(get_long(&rec, "objectId") == 42 && get_long(&rec, "candid") == 200, "ids");
        CHECK(strcmp(get_string(&rec, "reason"), a.reason) == 0, "reason");
        avro_value_get_by_name(&rec, "candidate", &cand, NULL);
        CHECK(get_double(&cand, "snr") == 23.5 && get_double(&cand, "mjd") == 60250.312345 &&
                  get_double(&cand, "jd") == 60250.312345 + 2400000.5,
              "candidate snr, mjd, jd");
        CHECK(strcmp(get_string(&cand, "isdiffpos"), "t") == 0 &&
                  strcmp(get_string(&cand, "frameName"), "20231101-0042") == 0 &&
                  strcmp(get_string(&cand, "filter"), "r") == 0,
              "candidate strings");
        avro_value_t v;
        CHECK(get_branch(&cand, "mag", &v) == 1, "mag present");
        double m = 0;
        avro_value_get_double(&v, &m);
        CHECK(m == 18.25, "mag 18.25 (%g)", m);
        CHECK(get_branch(&cand, "limmag5", &v) == 1, "limmag5 present");
        CHECK(get_branch(&rec, "object", &obj) == 1 && get_long(&obj, "objectId") == 42,
              "object record");
        avro_value_t nd;
        int32_t ndet = 0;
        avro_value_get_by_name(&obj, "ndet", &nd, NULL);
        avro_value_get_int(&nd, &ndet);
        CHECK(ndet == 3, "object ndet 3");
        size_t nprv = 0;
        CHECK(get_branch(&rec, "prv_candidates", &prv) == 1 && avro_value_get_size(&prv, &nprv) == 0 &&
                  nprv == 2, "two previous detections (%zu)", nprv);
        if (nprv == 2) {
            avro_value_get_by_index(&prv, 0, &item, NULL);
            CHECK(get_long(&item, "candid") == 100 && get_double(&item, "snr") == 8.1,
                  "oldest previous detection first");
            avro_value_get_by_index(&prv, 1, &item, NULL);
            CHECK(get_long(&item, "candid") == 150, "then the next one");
        }
        check_cutout(&rec, "cutoutScience", HILAL_ARCHIVE_SCIENCE, dir, verify);
        check_cutout(&rec, "cutoutTemplate", HILAL_ARCHIVE_REFERENCE, dir, verify);
        check_cutout(&rec, "cutoutDifference", HILAL_ARCHIVE_DIFFERENCE, dir, verify);
        CHECK(avro_file_reader_read_value(reader, &rec) != 0, "and only one record");
        avro_value_decref(&rec);
        avro_value_iface_decref(iface);
        avro_schema_decref(ws); /* get_writer_schema returns a new reference */
        avro_file_reader_close(reader);
    }
    free(buf);

    /* Without history, object and stamps the optional fields are null. */
    hilal_alert_clear(&a);
    fx_cand(&a.cand, 7, 60000.5, NAN, -6.0);
    a.cand.ra = NAN;
    a.alert_id = 99;
    CHECK_OK(hilal_avro_packet_write(&a, &pub, &buf, &len, &err), &err);
    mem = buf ? fmemopen(buf, len, "rb") : NULL;
    reader = NULL;
    if (mem != NULL && avro_file_reader_fp(mem, "packet2", 1, &reader) == 0) {
        avro_schema_t ws = avro_file_reader_get_writer_schema(reader);
        avro_value_iface_t *iface = avro_generic_class_from_schema(ws);
        avro_value_t rec, cand, v;
        avro_generic_value_new(iface, &rec);
        CHECK(avro_file_reader_read_value(reader, &rec) == 0, "minimal record read");
        avro_value_get_by_name(&rec, "candidate", &cand, NULL);
        CHECK(get_branch(&cand, "mag", &v) == -1 && get_branch(&cand, "ra", &v) == -1,
              "NaN magnitude and position are null");
        CHECK(strcmp(get_string(&cand, "isdiffpos"), "f") == 0, "fading: isdiffpos f");
        CHECK(get_branch(&rec, "object", &v) == -1 && get_branch(&rec, "prv_candidates", &v) == -1 &&
                  get_branch(&rec, "cutoutScience", &v) == -1,
              "no object, history or cutouts: null");
        printf("minimal Avro packet: %zu bytes\n", len);
        avro_value_decref(&rec);
        avro_value_iface_decref(iface);
        avro_schema_decref(ws); /* get_writer_schema returns a new reference */
        avro_file_reader_close(reader);
    } else {
        CHECK(0, "minimal packet readable");
    }
    free(buf);
    avro_schema_decref(shipped);
    avro_schema_decref(embedded);
    return hilal_test_finish();
}
