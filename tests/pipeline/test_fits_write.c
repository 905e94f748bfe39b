/* Writing FITS files: round trips through the reader, keyword writing,
 * header copying, safe replacement of existing files, and conformance
 * checked with fitsverify (CFITSIO's validator) when it is installed. */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hilal/fits.h"
#include "hilal/wcs.h"
#include "testutil.h"

static int have_fitsverify(void)
{
    return hilal_test_run("command -v fitsverify", NULL) == 0;
}

/* fitsverify -q prints one line starting "verification OK" when the file
 * has no errors and no warnings. */
static void check_fitsverify(const char *path)
{
    if (!have_fitsverify()) {
        printf("note: fitsverify not installed, conformance of %s not checked\n", path);
        return;
    }
    char cmd[4200], *out = NULL;
    snprintf(cmd, sizeof cmd, "fitsverify -q '%s'", path);
    int rc = hilal_test_run(cmd, &out);
    CHECK(rc == 0 && out != NULL && strstr(out, "verification OK") != NULL,
          "fitsverify %s: rc %d: %s", path, rc, out ? out : "");
    free(out);
}

/* Number of entries in dir other than . and .. */
static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (d == NULL)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

static void test_round_trip(void)
{
    char dir[2048], path[4096];
    hilal_test_tmpdir("roundtrip", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/out.fits", dir);
    hilal_error err;
    hilal_error_clear(&err);

    /* A 7 x 4 image with a ramp, one NaN and one huge value; a mask. */
    enum { NX = 7, NY = 4 };
    float pix[NX * NY];
    hilal_mask_t mask[NX * NY];
    for (int i = 0; i < NX * NY; i++) {
        pix[i] = 0.25f * (float)i - 3.0f;
        mask[i] = (hilal_mask_t)(i % 3 == 0 ? HILAL_MASK_SAT : 0);
    }
    pix[9] = NAN;
    pix[10] = 1.0e30f;
    mask[27] = HILAL_MASK_NEGVAR | HILAL_MASK_BAD;

    hilal_fits_writer *w = hilal_fits_writer_open(path, &err);
    CHECK(w != NULL, "writer opened: %s", err.msg);
    if (w == NULL)
        return;
    CHECK_OK(hilal_fits_writer_add_empty(w, NULL, &err), &err);
    CHECK_OK(hilal_fits_writer_key_string(w, "OBJECT", "field 7 'north'", "target", &err), &err);
    CHECK_OK(hilal_fits_writer_add_float(w, "SCI", NX, NY, pix, &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "GAIN", 1.75, "e-/ADU", &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "GAIN", 2.25, "e-/ADU, updated", &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "RDNOISE", NAN, "unknown", &err), &err);
    CHECK_OK(hilal_fits_writer_key_int(w, "NCOMBINE", 5000000000LL, NULL, &err), &err);
    CHECK_OK(hilal_fits_writer_key_bool(w, "SIMULATD", 1, "made by a test", &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "ESO DET OUT1 GAIN", 2.5, NULL, &err), &err);
    CHECK_OK(hilal_fits_writer_history(w, "written by test_fits_write", &err), &err);
    CHECK_OK(hilal_fits_writer_add_mask(w, "MASK", NX, NY, mask, &err), &err);
    /* Nothing appears at the target before close. */
    CHECK(access(path, F_OK) != 0, "target does not exist before close");
    CHECK_OK(hilal_fits_writer_close(w, &err), &err);
    CHECK(access(path, F_OK) == 0, "target exists after close");
    CHECK(count_entries(dir) == 1, "no temporary file left: %d entries", count_entries(dir));
    check_fitsverify(path);

    /* Read back: HDU 0 picks the first image with data, HDU 2. */
    hilal_image *img = NULL;
    CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
    if (img == NULL)
        return;
    CHECK(img->meta.hdu == 2 && img->nx == NX && img->ny == NY && img->meta.bitpix == -32,
          "SCI HDU %d, %ld x %ld, BITPIX %d", img->meta.hdu, img->nx, img->ny, img->meta.bitpix);
    size_t differ = 0;
    for (int i = 0; i < NX * NY; i++)
        differ += i == 9 ? !isnan(img->pix[i]) : img->pix[i] != pix[i];
    CHECK(differ == 0, "%zu pixels differ after the round trip", differ);
    CHECK(img->mask[9] == HILAL_MASK_NODATA && hilal_image_count_mask(img, 0xffff) == 1,
          "only the NaN pixel is masked");
    const char *h = img->meta.header;
    int n = img->meta.nheader_cards;
    char v[80];
    double d;
    hilal_fits_key_state ks;
    CHECK_OK(hilal_fits_header_get_double(h, n, "GAIN", &d, &ks, &err), &err);
    CHECK(d == 2.25, "GAIN updated to 2.25: %g", d);
    CHECK(hilal_fits_header_get(h, n, "RDNOISE", v, sizeof v) == HILAL_FITS_KEY_MISSING,
          "NaN is not written");
    CHECK(hilal_fits_header_get(h, n, "NCOMBINE", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "5000000000") == 0, "64-bit integer key: %s", v);
    CHECK(hilal_fits_header_get(h, n, "SIMULATD", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "T") == 0, "logical key: %s", v);
    CHECK_OK(hilal_fits_header_get_double(h, n, "ESO DET OUT1 GAIN", &d, &ks, &err), &err);
    CHECK(ks == HILAL_FITS_KEY_FOUND && d == 2.5, "HIERARCH key read back: %g", d);
    CHECK(hilal_fits_header_get(h, n, "EXTNAME", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "SCI") == 0, "EXTNAME = %s", v);
    CHECK(hilal_fits_header_get(h, n, "CHECKSUM", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strlen(v) == 16, "CHECKSUM = %s", v);
    CHECK(strstr(h, "HISTORY written by test_fits_write") != NULL, "HISTORY card");
    hilal_image_free(img);

    /* The primary header keeps OBJECT, quotes and all. */
    char *prim = NULL;
    int nprim = 0;
    CHECK_OK(hilal_fits_read_image_primary(path, 2, &img, &prim, &nprim, &err), &err);
    CHECK(prim != NULL && hilal_fits_header_get(prim, nprim, "OBJECT", v, sizeof v) ==
                              HILAL_FITS_KEY_FOUND && strcmp(v, "field 7 'north'") == 0,
          "OBJECT = %s", v);
    free(prim);
    hilal_image_free(img);

    /* The mask HDU: unsigned 16-bit values and the names of the bits. */
    CHECK_OK(hilal_fits_read_image(path, 3, &img, &err), &err);
    if (img == NULL)
        return;
    differ = 0;
    for (int i = 0; i < NX * NY; i++)
        differ += img->pix[i] != (float)mask[i];
    CHECK(differ == 0 && img->meta.bitpix == 16 && img->meta.bzero == 32768,
          "mask read back (%zu differ, BITPIX %d, BZERO %g)", differ, img->meta.bitpix,
          img->meta.bzero);
    CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "MASKB02", v,
                                sizeof v) == HILAL_FITS_KEY_FOUND && strcmp(v, "NODATA") == 0,
          "MASKB02 = %s", v);
    CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "MASKB07", v,
                                sizeof v) == HILAL_FITS_KEY_FOUND && strcmp(v, "NEGVAR") == 0,
          "MASKB07 = %s", v);
    hilal_image_free(img);
}

/* Copying a real header: everything but the structure, or the WCS only. */
static void test_copy_cards(void)
{
    char dir[2048], src[4096], all[4096], wcs[4096];
    hilal_test_tmpdir("copy", dir, sizeof dir);
    hilal_test_data("fits_edge/astropy_io_fits/scale.fits", src, sizeof src);
    snprintf(all, sizeof all, "%s/all.fits", dir);
    snprintf(wcs, sizeof wcs, "%s/wcs.fits", dir);
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *in = NULL, *img = NULL;
    CHECK_OK(hilal_fits_read_image(src, 0, &in, &err), &err);
    if (in == NULL)
        return;

    /* Whole image through the convenience writer: float32 pixels, header
     * cards copied except BITPIX / BSCALE / BZERO of the int16 original. */
    CHECK_OK(hilal_fits_write_image(all, in, &err), &err);
    check_fitsverify(all);
    CHECK_OK(hilal_fits_read_image(all, 0, &img, &err), &err);
    if (img != NULL) {
        size_t differ = 0;
        for (long i = 0; i < in->nx * in->ny; i++)
            differ += img->pix[i] != in->pix[i];
        CHECK(differ == 0 && img->meta.bitpix == -32 && img->meta.bscale == 1 &&
                  img->meta.bzero == 0,
              "scaled int16 -> float32: %zu differ, BITPIX %d, BSCALE %g, BZERO %g", differ,
              img->meta.bitpix, img->meta.bscale, img->meta.bzero);
        double ra[1], dec[1], ra2[1], dec2[1], x[1] = {10.5}, y[1] = {3.25};
        CHECK_OK(hilal_wcs_pix2sky(in->meta.wcs, 1, x, y, ra, dec, &err), &err);
        CHECK_OK(hilal_wcs_pix2sky(img->meta.wcs, 1, x, y, ra2, dec2, &err), &err);
        CHECK(ra[0] == ra2[0] && dec[0] == dec2[0], "same WCS: %.9f %.9f vs %.9f %.9f", ra[0],
              dec[0], ra2[0], dec2[0]);
        char v[80];
        CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "BAND", v,
                                    sizeof v) == HILAL_FITS_KEY_FOUND && strcmp(v, "H") == 0,
              "BAND copied: %s", v);
        CHECK(strstr(img->meta.header, "COMMENT    This mosaic was created using Montage") != NULL,
              "COMMENT cards copied");
        /* CFITSIO's two standard COMMENT cards appear once, not twice */
        const char *first = strstr(img->meta.header, "volume 376, page 359");
        CHECK(first != NULL && strstr(first + 1, "volume 376, page 359") == NULL,
              "standard COMMENT once");
        /* exactly one BITPIX card, the new one */
        int nbitpix = 0;
        for (int i = 0; i < img->meta.nheader_cards; i++)
            nbitpix += strncmp(img->meta.header + 80 * i, "BITPIX  =", 9) == 0;
        CHECK(nbitpix == 1, "%d BITPIX cards", nbitpix);
        /* no MASK extension: nothing was masked */
        hilal_image *none = NULL;
        hilal_error_clear(&err);
        CHECK(hilal_fits_read_image(all, 2, &none, &err) == HILAL_ERR_NOTFOUND,
              "no mask HDU when the mask is empty: %s", err.msg);
    }
    hilal_image_free(img);
    img = NULL;

    /* WCS cards only, onto a new image. */
    hilal_error_clear(&err);
    hilal_fits_writer *w = hilal_fits_writer_open(wcs, &err);
    CHECK(w != NULL, "open %s", err.msg);
    if (w != NULL) {
        CHECK_OK(hilal_fits_writer_add_float(w, NULL, in->nx, in->ny, in->pix, &err), &err);
        CHECK_OK(hilal_fits_writer_copy_cards(w, in->meta.header, in->meta.nheader_cards,
                                              HILAL_FITS_COPY_WCS, &err), &err);
        CHECK_OK(hilal_fits_writer_close(w, &err), &err);
    }
    check_fitsverify(wcs);
    CHECK_OK(hilal_fits_read_image(wcs, 0, &img, &err), &err);
    if (img != NULL) {
        char v[80];
        CHECK(img->meta.wcs != NULL && strcmp(hilal_wcs_projection(img->meta.wcs), "TAN") == 0,
              "WCS copied");
        CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "CRVAL1", v,
                                    sizeof v) == HILAL_FITS_KEY_FOUND, "CRVAL1 copied");
        CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "BAND", v,
                                    sizeof v) == HILAL_FITS_KEY_MISSING &&
                  hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "MAGZP", v,
                                        sizeof v) == HILAL_FITS_KEY_MISSING,
              "BAND and MAGZP (not WCS) not copied");
    }
    hilal_image_free(img);
    hilal_image_free(in);
}

/* Replacing a file is all or nothing. */
static void test_replace(void)
{
    char dir[2048], path[4096], bad[4096];
    hilal_test_tmpdir("replace", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/frame[1].fits", dir); /* a name with brackets */
    hilal_error err;
    hilal_error_clear(&err);
    float a[4] = {1, 2, 3, 4}, b[6] = {9, 8, 7, 6, 5, 4};

    hilal_fits_writer *w = hilal_fits_writer_open(path, &err);
    CHECK_OK(hilal_fits_writer_add_float(w, NULL, 2, 2, a, &err), &err);
    CHECK_OK(hilal_fits_writer_close(w, &err), &err);
    /* Replaced by a complete new file. */
    w = hilal_fits_writer_open(path, &err);
    CHECK_OK(hilal_fits_writer_add_float(w, NULL, 3, 2, b, &err), &err);
    CHECK_OK(hilal_fits_writer_close(w, &err), &err);
    hilal_image *img = NULL;
    CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
    CHECK(img != NULL && img->nx == 3 && img->pix[5] == 4, "file replaced");
    hilal_image_free(img);
    /* An abandoned write leaves the old file and no temporary file. */
    w = hilal_fits_writer_open(path, &err);
    CHECK_OK(hilal_fits_writer_add_float(w, NULL, 2, 2, a, &err), &err);
    hilal_fits_writer_free(w);
    CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
    CHECK(img != NULL && img->nx == 3, "abandoned write left the old file");
    hilal_image_free(img);
    CHECK(count_entries(dir) == 1, "%d entries in %s", count_entries(dir), dir);
    hilal_fits_writer_free(NULL);

    /* A directory that does not exist. */
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.fits", dir);
    hilal_error_clear(&err);
    w = hilal_fits_writer_open(bad, &err);
    CHECK(w == NULL && err.code == HILAL_ERR_IO && strstr(err.msg, bad) != NULL &&
              strstr(err.msg, "No such file or directory") != NULL,
          "unwritable target: %s", err.msg);
    hilal_error_clear(&err);
    hilal_image *one = hilal_image_new(2, 2, &err);
    CHECK(hilal_fits_write_image(bad, one, &err) == HILAL_ERR_IO, "write_image fails too");
    hilal_image_free(one);
    /* A bad size. */
    hilal_error_clear(&err);
    snprintf(path, sizeof path, "%s/size.fits", dir);
    w = hilal_fits_writer_open(path, &err);
    CHECK(hilal_fits_writer_add_float(w, NULL, 0, 5, a, &err) == HILAL_ERR_RANGE &&
              strstr(err.msg, "0 x 5") != NULL, "zero width: %s", err.msg);
    hilal_fits_writer_free(w);
}

/* The ZTF stamp (non-standard SIMPLE card, NaN pixels) rewritten by the
 * convenience writer comes back with the same pixels and a valid header. */
static void test_ztf_rewrite(void)
{
    char dir[2048], src[4096], out[4096];
    hilal_test_tmpdir("ztf", dir, sizeof dir);
    hilal_test_data("fits_edge/ztf/ZTF18aaxjlwy_472263571115090000_science.fits", src,
                    sizeof src);
    snprintf(out, sizeof out, "%s/stamp.fits", dir);
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *in = NULL, *back = NULL;
    CHECK_OK(hilal_fits_read_image(src, 0, &in, &err), &err);
    if (in == NULL)
        return;
    CHECK_OK(hilal_fits_write_image(out, in, &err), &err);
    check_fitsverify(out); /* the rewritten SIMPLE card is standard */
    CHECK_OK(hilal_fits_read_image(out, 1, &back, &err), &err);
    if (back != NULL) {
        size_t differ = 0;
        for (long i = 0; i < in->nx * in->ny; i++)
            differ += isnan(in->pix[i]) ? !isnan(back->pix[i]) : back->pix[i] != in->pix[i];
        CHECK(differ == 0 && hilal_image_count_mask(back, HILAL_MASK_NODATA) == 1322,
              "%zu pixels differ", differ);
    }
    hilal_image_free(back);
    back = NULL;
    /* the mask went into a MASK extension */
    CHECK_OK(hilal_fits_read_image(out, 2, &back, &err), &err);
    if (back != NULL) {
        size_t nodata = 0;
        for (long i = 0; i < back->nx * back->ny; i++)
            nodata += back->pix[i] == (float)HILAL_MASK_NODATA;
        CHECK(nodata == 1322, "MASK extension has %zu NODATA pixels", nodata);
    }
    hilal_image_free(back);
    hilal_image_free(in);
}

/* The FITS checksum (FITS Standard 4.0, Appendix J): the 32-bit 1's
 * complement sum of big-endian words, carries folded back in. */
static uint32_t ones_sum(const unsigned char *b, size_t n, uint32_t sum)
{
    uint64_t s = sum;
    for (size_t i = 0; i + 4 <= n; i += 4) {
        s += (uint64_t)b[i] << 24 | (uint64_t)b[i + 1] << 16 | (uint64_t)b[i + 2] << 8 | b[i + 3];
        s = (s & 0xffffffffu) + (s >> 32);
    }
    return (uint32_t)((s & 0xffffffffu) + (s >> 32));
}

/* Reads a whole file (malloc'd) or returns NULL. */
static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *fp = fopen(path, "rb");
    unsigned char *b = NULL;
    long len;
    *n = 0;
    if (fp == NULL)
        return NULL;
    if (fseek(fp, 0, SEEK_END) == 0 && (len = ftell(fp)) > 0 && fseek(fp, 0, SEEK_SET) == 0 &&
        (b = malloc((size_t)len)) != NULL && fread(b, 1, (size_t)len, fp) == (size_t)len)
        *n = (size_t)len;
    fclose(fp);
    if (*n == 0) {
        free(b);
        b = NULL;
    }
    return b;
}

/* Whether the header (n cards) has key with the value want; v receives
 * the value found. */
static int has_value(const char *hdr, int n, const char *key, const char *want, char *v,
                     size_t len)
{
    return hilal_fits_header_get(hdr, n, key, v, len) == HILAL_FITS_KEY_FOUND &&
           strcmp(v, want) == 0;
}

/* Unsigned 16-bit images, unsigned keys, COMMENT cards and fixed checksum
 * comments: the same content written twice gives the same bytes, and the
 * checksums verify. */
static void test_uint16_fixed_checksum(void)
{
    char dir[2048], path[2][4096];
    hilal_test_tmpdir("uint16", dir, sizeof dir);
    hilal_error err;
    hilal_error_clear(&err);
    enum { NX = 5, NY = 3 };
    const float pix[NX * NY] = {0, 1, 2, 65535, 65534.6f, 12.4f, 12.6f, 32768, 32767, 100,
                                7, 8, 9, 10, 11};
    for (int k = 0; k < 2; k++) {
        snprintf(path[k], sizeof path[k], "%s/u16_%d.fits", dir, k);
        hilal_fits_writer *w = hilal_fits_writer_open(path[k], &err);
        CHECK(w != NULL, "writer opened: %s", err.msg);
        if (w == NULL)
            return;
        hilal_fits_writer_set_checksum(w, HILAL_FITS_CHECKSUM_FIXED);
        CHECK_OK(hilal_fits_writer_add_uint16(w, NULL, NX, NY, pix, &err), &err);
        CHECK_OK(hilal_fits_writer_key_uint(w, "SEED", 18446744073709551615ULL, "seed", &err),
                 &err);
        CHECK_OK(hilal_fits_writer_comment(w, "written by test_fits_write", &err), &err);
        CHECK_OK(hilal_fits_writer_close(w, &err), &err);
    }
    check_fitsverify(path[0]);
    size_t n0 = 0, n1 = 0;
    unsigned char *b0 = slurp(path[0], &n0), *b1 = slurp(path[1], &n1);
    CHECK(b0 != NULL && b1 != NULL && n0 == n1 && memcmp(b0, b1, n0) == 0,
          "two writes give the same bytes (%zu, %zu)", n0, n1);
    if (b0 != NULL && n0 % 2880 == 0) {
        /* Header blocks up to the one holding END, then the data unit. */
        size_t hlen = 0;
        for (size_t off = 0; off + 80 <= n0; off += 80)
            if (memcmp(b0 + off, "END     ", 8) == 0) {
                hlen = (off / 2880 + 1) * 2880;
                break;
            }
        uint32_t datasum = ones_sum(b0 + hlen, n0 - hlen, 0);
        uint32_t hdusum = ones_sum(b0, hlen, datasum);
        char *hdr = malloc(hlen + 1), v[80];
        if (hdr != NULL) {
            memcpy(hdr, b0, hlen);
            hdr[hlen] = '\0';
            int ncards = (int)(hlen / 80);
            CHECK(hdusum == 0xffffffffu, "HDU sums to -0: %08x", (unsigned)hdusum);
            CHECK(hilal_fits_header_get(hdr, ncards, "DATASUM", v, sizeof v) ==
                          HILAL_FITS_KEY_FOUND &&
                      strtoul(v, NULL, 10) == datasum,
                  "DATASUM %s = %u", v, (unsigned)datasum);
            CHECK(strstr(hdr, "/ HDU checksum   ") != NULL &&
                      strstr(hdr, "/ data unit checksum   ") != NULL &&
                      strstr(hdr, "updated") == NULL,
                  "fixed checksum comments");
            CHECK(has_value(hdr, ncards, "SEED", "18446744073709551615", v, sizeof v),
                  "unsigned 64-bit key: %s", v);
            CHECK(strstr(hdr, "COMMENT written by test_fits_write") != NULL, "COMMENT card");
            free(hdr);
        }
    }
    free(b0);
    free(b1);

    /* Read back: BITPIX 16 with BZERO 32768, values rounded to integers. */
    hilal_image *img = NULL;
    CHECK_OK(hilal_fits_read_image(path[0], 0, &img, &err), &err);
    if (img != NULL) {
        size_t differ = 0;
        for (int i = 0; i < NX * NY; i++)
            differ += img->pix[i] != roundf(pix[i]);
        CHECK(differ == 0 && img->meta.bitpix == 16 && img->meta.bzero == 32768,
              "uint16 read back (%zu differ, BITPIX %d, BZERO %g)", differ, img->meta.bitpix,
              img->meta.bzero);
        hilal_image_free(img);
    }

    /* The default comments hold the time of writing. */
    hilal_fits_writer *w = hilal_fits_writer_open(path[1], &err);
    if (w != NULL) {
        CHECK_OK(hilal_fits_writer_add_uint16(w, NULL, NX, NY, pix, &err), &err);
        CHECK_OK(hilal_fits_writer_close(w, &err), &err);
    }
    b1 = slurp(path[1], &n1);
    int dated = 0;
    for (size_t off = 0; b1 != NULL && off + 23 <= n1 && !dated; off++)
        dated = memcmp(b1 + off, "HDU checksum updated 20", 23) == 0;
    CHECK(dated, "dated checksum comment by default");
    free(b1);

    /* A value that does not fit is named and nothing is written. */
    float bad[NX * NY];
    memcpy(bad, pix, sizeof bad);
    bad[6] = 65536.0f;
    hilal_error_clear(&err);
    w = hilal_fits_writer_open(path[1], &err);
    CHECK(hilal_fits_writer_add_uint16(w, "IMG", NX, NY, bad, &err) == HILAL_ERR_RANGE &&
              strstr(err.msg, "pixel (2, 2)") != NULL && strstr(err.msg, "65536") != NULL,
          "out of range: %s", err.msg);
    bad[6] = NAN;
    hilal_error_clear(&err);
    CHECK(hilal_fits_writer_add_uint16(w, "IMG", NX, NY, bad, &err) == HILAL_ERR_RANGE &&
              strstr(err.msg, "nan") != NULL,
          "NaN: %s", err.msg);
    hilal_fits_writer_free(w);
}

/* A header built in memory: the structure of the image it describes and
 * the cards added, in the form of hilal_meta.header. */
static void test_header_in_memory(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_fits_writer *w = NULL;
    CHECK_OK(hilal_fits_header_open(16, 3000, 2000, &w, &err), &err);
    if (w == NULL)
        return;
    CHECK_OK(hilal_fits_writer_key_string(w, "OBJECT", "M 31", "target", &err), &err);
    CHECK_OK(hilal_fits_writer_key_double(w, "GAIN", 1.5, NULL, &err), &err);
    char *cards = NULL, v[80];
    int n = 0;
    CHECK_OK(hilal_fits_writer_header(w, &cards, &n, &err), &err);
    if (cards != NULL) {
        CHECK((size_t)n * 80 == strlen(cards) && strncmp(cards + (n - 1) * 80, "END ", 4) == 0,
              "%d cards, END last", n);
        CHECK(has_value(cards, n, "NAXIS1", "3000", v, sizeof v), "NAXIS1 = %s", v);
        CHECK(has_value(cards, n, "NAXIS2", "2000", v, sizeof v), "NAXIS2 = %s", v);
        CHECK(has_value(cards, n, "BZERO", "32768", v, sizeof v), "BZERO = %s", v);
        CHECK(has_value(cards, n, "OBJECT", "M 31", v, sizeof v), "OBJECT = %s", v);
    }
    free(cards);
    /* It holds one header: no HDUs added, no closing. */
    float one = 1;
    CHECK(hilal_fits_writer_add_float(w, NULL, 1, 1, &one, &err) == HILAL_ERR_INTERNAL &&
              strstr(err.msg, "in-memory header") != NULL,
          "add to an in-memory header: %s", err.msg);
    hilal_error_clear(&err);
    CHECK(hilal_fits_writer_close(w, &err) == HILAL_ERR_INTERNAL, "close: %s", err.msg);
    w = NULL;
    hilal_error_clear(&err);
    CHECK(hilal_fits_header_open(8, 10, 10, &w, &err) == HILAL_ERR_RANGE && w == NULL &&
              strstr(err.msg, "BITPIX 8") != NULL,
          "BITPIX 8: %s", err.msg);
}

int main(void)
{
    hilal_log_set_handler(NULL, NULL, HILAL_LOG_ERROR);
    test_round_trip();
    test_copy_cards();
    test_replace();
    test_ztf_rewrite();
    test_uint16_fixed_checksum();
    test_header_in_memory();
    return hilal_test_finish();
}
