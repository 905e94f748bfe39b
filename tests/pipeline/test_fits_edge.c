/* Reading FITS edge cases: every file under testdata/fits_edge/ has an
 * expected outcome here (a correct read with known sizes and values, or a
 * rejection with a given status and message), and a file without one fails
 * the test, so new edge cases cannot be added silently.
 *
 * Expected values were computed independently with astropy 5.2.1
 * (Debian python3-astropy), e.g. for m13.fits:
 *   python3 -c "from astropy.io import fits; import numpy as np;
 *     d = fits.getdata('m13.fits').astype(float); m = np.isfinite(d);
 *     print(d.shape, (~m).sum(), d[m].sum(), d[m].min(), d[m].max(), d[4, 2])"
 * (astropy indexes [y-1, x-1]). lzw.fits.Z, which astropy cannot open, was
 * checked after `gzip -dc lzw.fits.Z > lzw.fits`. compressed_with_nan.fits
 * is the one disagreement: astropy 5.2.1 (and funpack, which decompresses
 * without null checking) give -5.3215 at (2, 2), which is ZBLANK *
 * ZSCALE + ZZERO of the first tile (-2147483647 * 0.52417895 +
 * 1.12566572e9); the pixel is a null and must be NaN, which is what the
 * file tests upstream. */
#include <dirent.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "hilal/checksum.h"
#include "hilal/fits.h"
#include "hilal/wcs.h"
#include "testutil.h"

typedef struct expect {
    const char *file;   /* relative to testdata/fits_edge */
    int hdu;            /* argument to the reader */
    hilal_status code;  /* HILAL_OK or the expected error */
    const char *msg;    /* for errors: a phrase the message must contain */
    int got_hdu;        /* HDU read */
    long nx, ny;
    int bitpix;
    size_t nodata;      /* pixels with HILAL_MASK_NODATA */
    double sum, min, max; /* over the finite pixels */
    int px, py;         /* a FITS 1-based pixel ... */
    double pv;          /* ... and its value (NaN: must be no-data) */
    int wcs;            /* 1: a celestial WCS must be found, 0: none */
} expect;

#define OK(f, h, gh, nx, ny, bp, nd, sum, mn, mx, px, py, pv, w) \
    {f, h, HILAL_OK, NULL, gh, nx, ny, bp, nd, sum, mn, mx, px, py, pv, w}
#define FAIL(f, h, code, msg) {f, h, code, msg, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

static const expect cases[] = {
    /* Tile compression: M13 stored plain and with every CFITSIO algorithm. */
    OK("astropy_compressed/m13.fits", 0, 1, 300, 300, 16, 0, 13293397, 109, 3618, 3, 5, 112, 1),
    OK("astropy_compressed/m13_gzip.fits", 0, 2, 300, 300, 16, 0, 13293397, 109, 3618, 3, 5, 112, 1),
    OK("astropy_compressed/m13_rice.fits", 0, 2, 300, 300, 16, 0, 13293397, 109, 3618, 3, 5, 112, 1),
    OK("astropy_compressed/m13_hcomp.fits", 0, 2, 300, 300, 16, 0, 13293397, 109, 3618, 3, 5, 112, 1),
    OK("astropy_compressed/m13_plio.fits", 0, 2, 300, 300, 16, 0, 13293397, 109, 3618, 3, 5, 112, 1),
    /* float64 quantised with RICE + dither, one null pixel at (2, 2) */
    OK("astropy_compressed/compressed_with_nan.fits", 0, 2, 12, 12, -64, 1, 10278.16105 + 5.32149553,
       0.248001337, 143.006207, 2, 2, NAN, 0),
    /* Plain and scaled integer images */
    OK("astropy_io_fits/scale.fits", 0, 1, 20, 21, 16, 0, 223202.7654, 491.88208, 2726.61523, 3, 5,
       525.025208, 1),
    OK("astropy_io_fits/blank.fits", 0, 1, 1, 1, 64, 1, 0, NAN, NAN, 1, 1, NAN, 0),
    OK("astropy_io_fits/checksum.fits", 0, 1, 30, 40, 16, 0, 251496, 4, 342, 3, 5, 227, 1),
    OK("astropy_io_fits/checksum_false.fits", 0, 1, 30, 40, 16, 0, 251496, 4, 342, 30, 40, 230, 1),
    OK("astropy_io_fits/fixed-1890.fits", 0, 1, 100, 100, 16, 0, 18900000, 1890, 1890, 3, 5, 1890, 0),
    OK("astropy_io_fits/o4sp040b0_raw.fits", 0, 2, 62, 44, 16, 0, 4115095, 1487, 1515, 3, 5, 1508, 0),
    OK("astropy_io_fits/test0.fits", 0, 2, 40, 40, 16, 0, 501021, 309, 474, 3, 5, 314, 0),
    OK("astropy_io_fits/test0.fits", 4, 4, 40, 40, 16, 0, 494052, 306, 314, 3, 5, 308, 1),
    OK("astropy_io_fits/lzw.fits.Z", 0, 1, 101, 101, 16, 0, 676039, 35, 349, 3, 5, 206, 0),
    /* Tile-compressed images whose headers CFITSIO cannot convert itself */
    OK("astropy_io_fits/comp.fits", 0, 2, 440, 300, 16, 0, 34417871, 0, 1037, 3, 5, 6, 1),
    OK("astropy_io_fits/compressed_float_bzero.fits", 0, 2, 3, 1, 16, 0, 6, 1, 3, 3, 1, 3, 0),
    OK("astropy_io_fits/compressed_image.fits", 0, 2, 10, 10, 16, 0, 4950, 0, 99, 3, 5, 42, 0),
    OK("astropy_io_fits/double_ext.fits", 0, 2, 5, 5, 16, 0, 0, 0, 0, 3, 5, 0, 0),
    /* A cube is rejected; an image section picks one plane of it. */
    FAIL("astropy_io_fits/arange.fits", 0, HILAL_ERR_FORMAT, "3-D cube (11 x 10 x 7 px)"),
    /* Random groups, tables and header-only files */
    FAIL("astropy_io_fits/group.fits", 0, HILAL_ERR_FORMAT, "random groups"),
    FAIL("astropy_io_fits/group.fits", 1, HILAL_ERR_FORMAT, "random groups"),
    FAIL("astropy_io_fits/random_groups.fits", 0, HILAL_ERR_FORMAT, "random groups"),
    FAIL("astropy_io_fits/invalid/group_invalid.fits", 0, HILAL_ERR_FORMAT, "random groups"),
    FAIL("astropy_io_fits/ascii.fits", 0, HILAL_ERR_FORMAT, "HDU 2 is an ASCII table"),
    FAIL("astropy_io_fits/btable.fits", 0, HILAL_ERR_FORMAT, "no image HDU with data"),
    FAIL("astropy_io_fits/btable.fits", 2, HILAL_ERR_FORMAT, "HDU 2 is a binary table"),
    FAIL("astropy_io_fits/tdim.fits", 0, HILAL_ERR_FORMAT, "no image HDU with data"),
    FAIL("astropy_io_fits/zerowidth.fits", 0, HILAL_ERR_FORMAT, "zero-size image (NAXIS2 = 0)"),
    FAIL("astropy_io_fits/history_header.fits", 0, HILAL_ERR_FORMAT, "HDU 1 is empty (NAXIS = 0)"),
    FAIL("astropy_io_fits/history_header.fits", 2, HILAL_ERR_NOTFOUND, "there is no HDU 2"),
    FAIL("astropy_io_fits/verify.fits", 0, HILAL_ERR_FORMAT, "run fitsverify"),
    /* WCS edge cases */
    OK("astropy_wcs/1904-66_AZP.fits", 0, 1, 192, 192, -32, 8121, 865.9409216, -0.681549072,
       13.575861, 3, 5, NAN, 1),
    OK("astropy_wcs/dist.fits", 0, 2, 4096, 1, -32, 0, -3.079134811, -0.00404134719,
       0.00277050096, 3, 1, -0.000510875077, 0),
    OK("astropy_wcs/dss.14.29.56-62.41.05.fits.gz", 0, 1, 100, 100, 16, 0, 51011936, 2989, 20136,
       3, 5, 8722, 1),
    /* unusable SIP WCS: a warning, the pixels are still read */
    OK("astropy_wcs/header_newlines.fits", 0, 1, 1, 1, -64, 0, 0, 0, 0, 1, 1, 0, 0),
    OK("astropy_wcs/ie6d07ujq_wcs.fits", 0, 2, 64, 32, -32, 0, 1.373000053, -0.0359999985,
       0.0489999987, 3, 5, 0.00100000005, 0),
    OK("astropy_wcs/j94f05bgq_flt.fits", 0, 2, 1, 1, -32, 0, 0, 0, 0, 1, 1, 0, 1),
    OK("astropy_wcs/sip-wcs.fits", 0, 1, 100, 50, 16, 0, 16048727, 3132, 5045, 3, 5, 3200, 1),
    FAIL("astropy_wcs/sip.fits", 0, HILAL_ERR_FORMAT, "no image HDU with data"),
    FAIL("astropy_wcs/header_with_time.fits", 0, HILAL_ERR_FORMAT, "no image HDU with data"),
    /* bare header cards without padding or data */
    FAIL("astropy_wcs/1904-66_TAN.hdr", 0, HILAL_ERR_FITS, "truncated"),
    FAIL("astropy_wcs/sip-broken.hdr", 0, HILAL_ERR_FORMAT, "not a FITS file"),
    /* CFITSIO's own test output: int32 with BLANK = -99 */
    OK("cfitsio/testprog.std", 0, 1, 10, 2, 32, 6, 149, 2, 19, 3, 2, 13, 0),
    OK("cfitsio/testprog.std", 0, 1, 10, 2, 32, 6, 149, 2, 19, 10, 2, NAN, 0),
    /* ZTF stamps: SIMPLE card with T in column 12 (not fixed format) */
    OK("ztf/ZTF18aaxjlwy_472263571115090000_science.fits", 0, 1, 63, 63, -32, 1322, 524320.3262,
       178.996063, 222.367157, 63, 63, 192.952972, 0),
    /* the template fills 1183 pixels with -FLT_MAX and has 139 NaN */
    OK("ztf/ZTF18aaxjlwy_472263571115090000_template.fits", 0, 1, 63, 63, -32, 1183 + 139, NAN,
       194.053726, 208.420059, 1, 1, NAN, 0),
    /* Generated: one HDU per remaining BITPIX / shape case (see testdata/README.md) */
    OK("generated/bitpix_mix.fits", 0, 2, 3, 2, 8, 0, 765, 0, 255, 3, 2, 255, 0),
    OK("generated/bitpix_mix.fits", 4, 4, 4, 3, -32, 3, 66 - 1 - 6 - 11, 0, 10, 2, 1, NAN, 0),
    OK("generated/bitpix_mix.fits", 5, 5, 5, 1, -64, 0, 12.5, -2.5, 5.5, 3, 1, 3.5, 0),
    OK("generated/bitpix_mix.fits", 6, 6, 3, 2, 16, 0, -3, -3, 2, 3, 2, 2, 0),
    FAIL("generated/bitpix_mix.fits", 7, HILAL_ERR_FORMAT, "zero-size image (NAXIS2 = 0)"),
};
#define NCASES (sizeof cases / sizeof cases[0])

static int close_to(double a, double b, double rel)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return fabs(a - b) <= rel * fmax(1.0, fmax(fabs(a), fabs(b)));
}

static void check_case(const expect *c)
{
    char path[4096];
    char rel[512];
    snprintf(rel, sizeof rel, "fits_edge/%s", c->file);
    hilal_test_data(rel, path, sizeof path);
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL;
    hilal_status st = hilal_fits_read_image(path, c->hdu, &img, &err);
    if (c->code != HILAL_OK) {
        CHECK(st == c->code, "%s (hdu %d): status %d, expected %d (%s)", c->file, c->hdu, st,
              c->code, err.msg);
        CHECK(img == NULL, "%s: no image on error", c->file);
        CHECK(strstr(err.msg, path) != NULL, "%s: message names the file: %s", c->file, err.msg);
        CHECK(strstr(err.msg, c->msg) != NULL, "%s: message has '%s': %s", c->file, c->msg,
              err.msg);
        hilal_image_free(img);
        return;
    }
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return;
    CHECK(img->meta.hdu == c->got_hdu, "%s: HDU %d, expected %d", c->file, img->meta.hdu,
          c->got_hdu);
    CHECK(img->nx == c->nx && img->ny == c->ny, "%s: %ld x %ld, expected %ld x %ld", c->file,
          img->nx, img->ny, c->nx, c->ny);
    CHECK(img->meta.bitpix == c->bitpix, "%s: BITPIX %d, expected %d", c->file, img->meta.bitpix,
          c->bitpix);
    CHECK(strcmp(img->meta.path, path) == 0, "%s: meta.path %s", c->file, img->meta.path);
    CHECK(strlen(img->meta.sha256) == 64, "%s: sha256 '%s'", c->file, img->meta.sha256);
    CHECK(img->meta.header != NULL && img->meta.nheader_cards > 0 &&
              strlen(img->meta.header) == (size_t)img->meta.nheader_cards * 80,
          "%s: header of %d cards", c->file, img->meta.nheader_cards);
    CHECK((img->meta.wcs != NULL) == c->wcs, "%s: WCS %s, expected %s", c->file,
          img->meta.wcs ? "found" : "none", c->wcs ? "one" : "none");
    if (img->nx != c->nx || img->ny != c->ny) {
        hilal_image_free(img);
        return;
    }
    size_t n = (size_t)img->nx * (size_t)img->ny, nodata = 0, nbad = 0;
    double sum = 0, mn = INFINITY, mx = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        int nd = (img->mask[i] & HILAL_MASK_NODATA) != 0;
        nodata += nd;
        nbad += nd != !isfinite(img->pix[i]); /* NODATA exactly where the value is NaN */
        if (!nd) {
            sum += img->pix[i];
            mn = fmin(mn, img->pix[i]);
            mx = fmax(mx, img->pix[i]);
        }
    }
    if (nodata == n)
        mn = mx = NAN;
    CHECK(nodata == c->nodata, "%s: %zu no-data pixels, expected %zu", c->file, nodata,
          c->nodata);
    CHECK(nbad == 0, "%s: %zu pixels where NODATA and NaN disagree", c->file, nbad);
    if (!isnan(c->sum))
        CHECK(close_to(sum, c->sum, 1e-7), "%s: sum %.10g, expected %.10g", c->file, sum, c->sum);
    CHECK(close_to(mn, c->min, 1e-7), "%s: min %.9g, expected %.9g", c->file, mn, c->min);
    CHECK(close_to(mx, c->max, 1e-7), "%s: max %.9g, expected %.9g", c->file, mx, c->max);
    double v = img->pix[(size_t)(c->py - 1) * (size_t)img->nx + (size_t)(c->px - 1)];
    CHECK(close_to(v, c->pv, 1e-7), "%s: pixel (%d, %d) = %.9g, expected %.9g", c->file, c->px,
          c->py, v, c->pv);
    hilal_image_free(img);
}

/* Every regular file under dir (relative names into list). */
static void list_files(const char *root, const char *sub, char ***list, size_t *n)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s%s%s", root, sub[0] ? "/" : "", sub);
    DIR *d = opendir(dir);
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char relname[1024], full[4096];
        snprintf(relname, sizeof relname, "%s%s%s", sub, sub[0] ? "/" : "", e->d_name);
        snprintf(full, sizeof full, "%s/%s", root, relname);
        struct stat sb;
        if (stat(full, &sb) != 0)
            continue;
        if (S_ISDIR(sb.st_mode)) {
            list_files(root, relname, list, n);
        } else if (S_ISREG(sb.st_mode)) {
            *list = realloc(*list, (*n + 1) * sizeof **list);
            (*list)[(*n)++] = strdup(relname);
        }
    }
    closedir(d);
}

static void test_every_file_has_a_case(void)
{
    char root[4096];
    hilal_test_data("fits_edge", root, sizeof root);
    char **files = NULL;
    size_t n = 0;
    list_files(root, "", &files, &n);
    CHECK(n >= 40, "found %zu files under %s", n, root);
    for (size_t i = 0; i < n; i++) {
        int covered = 0;
        for (size_t k = 0; k < NCASES; k++)
            covered |= strcmp(cases[k].file, files[i]) == 0;
        CHECK(covered, "testdata/fits_edge/%s has no expected outcome in this test", files[i]);
        free(files[i]);
    }
    free(files);
}

/* The four compressed M13 files decompress to exactly the uncompressed one
 * (HCOMPRESS was used with scale 0, i.e. losslessly, for these integers). */
static void test_m13_identical(void)
{
    const char *names[] = {"m13_gzip.fits", "m13_rice.fits", "m13_hcomp.fits", "m13_plio.fits"};
    char path[4096];
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *ref = NULL;
    hilal_test_data("fits_edge/astropy_compressed/m13.fits", path, sizeof path);
    CHECK_OK(hilal_fits_read_image(path, 0, &ref, &err), &err);
    for (size_t k = 0; k < 4 && ref != NULL; k++) {
        char rel[256];
        snprintf(rel, sizeof rel, "fits_edge/astropy_compressed/%s", names[k]);
        hilal_test_data(rel, path, sizeof path);
        hilal_image *img = NULL;
        CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
        if (img == NULL)
            continue;
        size_t ndiff = 0;
        for (size_t i = 0; i < (size_t)ref->nx * (size_t)ref->ny; i++)
            ndiff += img->pix[i] != ref->pix[i];
        CHECK(ndiff == 0, "%s: %zu pixels differ from m13.fits", names[k], ndiff);
        /* The header is that of the image (fpack compressed a primary
         * image, so SIMPLE comes back), not that of the compressed table. */
        char v[80];
        CHECK(strncmp(img->meta.header, "SIMPLE  =", 9) == 0, "%s: header starts %.20s",
              names[k], img->meta.header);
        CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "NAXIS1", v,
                                    sizeof v) == HILAL_FITS_KEY_FOUND && strcmp(v, "300") == 0,
              "%s: NAXIS1 = '%s'", names[k], v);
        CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "ZIMAGE", v,
                                    sizeof v) == HILAL_FITS_KEY_MISSING,
              "%s: no ZIMAGE in the image header", names[k]);
        CHECK(strcmp(hilal_wcs_projection(img->meta.wcs), "TAN") == 0, "%s: TAN WCS", names[k]);
        hilal_image_free(img);
    }
    hilal_image_free(ref);
}

/* comp.fits keeps its Z keywords in an order CFITSIO's own header
 * conversion rejects; the rebuilt header is an image header with the
 * table's WCS and other cards, and nothing about the table. */
static void test_rebuilt_compressed_header(void)
{
    char path[4096], v[80];
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL;
    hilal_test_data("fits_edge/astropy_io_fits/comp.fits", path, sizeof path);
    CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
    if (img == NULL)
        return;
    const char *h = img->meta.header;
    int n = img->meta.nheader_cards;
    CHECK(strncmp(h, "XTENSION= 'IMAGE   '", 20) == 0, "comp.fits header starts %.20s", h);
    CHECK(hilal_fits_header_get(h, n, "NAXIS1", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "440") == 0, "NAXIS1 = %s", v);
    CHECK(hilal_fits_header_get(h, n, "OBJECT", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "NGC 1316") == 0, "OBJECT = %s", v);
    CHECK(hilal_fits_header_get(h, n, "CTYPE1", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "RA---SIN") == 0, "CTYPE1 = %s", v);
    const char *gone[] = {"ZIMAGE", "ZBITPIX", "ZTENSION", "TTYPE1", "TFORM1", "TFIELDS"};
    for (size_t k = 0; k < sizeof gone / sizeof gone[0]; k++)
        CHECK(hilal_fits_header_get(h, n, gone[k], v, sizeof v) == HILAL_FITS_KEY_MISSING,
              "%s not in the image header", gone[k]);
    CHECK(strcmp(hilal_wcs_projection(img->meta.wcs), "SIN") == 0, "SIN WCS parsed");
    hilal_image_free(img);
}

/* 64-bit integers become the nearest float32; BLANK = -999 marks no data. */
static void test_int64(void)
{
    char path[4096];
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL;
    hilal_test_data("fits_edge/generated/bitpix_mix.fits", path, sizeof path);
    CHECK_OK(hilal_fits_read_image(path, 3, &img, &err), &err);
    if (img == NULL)
        return;
    CHECK(img->nx == 7 && img->ny == 5 && img->meta.bitpix == 64, "int64 HDU %ld x %ld BITPIX %d",
          img->nx, img->ny, img->meta.bitpix);
    size_t wrong = 0;
    for (long i = 0; i < 34; i++)
        wrong += img->pix[i] != (float)((double)i * 1000000007.0);
    CHECK(wrong == 0, "%zu int64 values not converted to the nearest float32", wrong);
    CHECK(isnan(img->pix[34]) && img->mask[34] == HILAL_MASK_NODATA, "BLANK pixel is no-data");
    CHECK(hilal_image_count_mask(img, HILAL_MASK_NODATA) == 1, "one no-data pixel");
    hilal_image_free(img);

    /* +-Inf and NaN in a float32 image are no-data as well. */
    CHECK_OK(hilal_fits_read_image(path, 4, &img, &err), &err);
    if (img == NULL)
        return;
    CHECK(img->mask[1] == HILAL_MASK_NODATA && img->mask[6] == HILAL_MASK_NODATA &&
              img->mask[11] == HILAL_MASK_NODATA && img->mask[0] == 0,
          "+Inf, NaN and -Inf masked, finite pixels not");
    hilal_image_free(img);
}

static void expect_error(const char *path, int hdu, hilal_status code, const char *phrase)
{
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL;
    hilal_status st = hilal_fits_read_image(path, hdu, &img, &err);
    CHECK(st == code, "%s: status %d, expected %d (%s)", path, st, code, err.msg);
    CHECK(img == NULL, "%s: no image on error", path);
    CHECK(strstr(err.msg, phrase) != NULL, "%s: message has '%s': %s", path, phrase, err.msg);
    hilal_image_free(img);
}

static void copy_prefix(const char *src, const char *dst, long nbytes)
{
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    CHECK(in != NULL && out != NULL, "copy %s to %s", src, dst);
    if (in != NULL && out != NULL) {
        int ch;
        long k = 0;
        while ((nbytes < 0 || k < nbytes) && (ch = fgetc(in)) != EOF) {
            fputc(ch, out);
            k++;
        }
    }
    if (in != NULL)
        fclose(in);
    if (out != NULL)
        fclose(out);
}

static void test_bad_files(void)
{
    char dir[2048], m13[4096], path[4096];
    hilal_test_tmpdir("bad", dir, sizeof dir);
    hilal_test_data("fits_edge/astropy_compressed/m13.fits", m13, sizeof m13);

    /* Truncated in the data (m13.fits is 184320 bytes) and in the header. */
    snprintf(path, sizeof path, "%s/cut_data.fits", dir);
    copy_prefix(m13, path, 100000);
    expect_error(path, 0, HILAL_ERR_FITS, "truncated (it has 100000 bytes");
    expect_error(path, 0, HILAL_ERR_FITS, "copy or download it again");
    snprintf(path, sizeof path, "%s/cut_header.fits", dir);
    copy_prefix(m13, path, 1000);
    expect_error(path, 0, HILAL_ERR_FITS, "truncated");

    /* Not FITS at all, empty, missing, a directory. */
    snprintf(path, sizeof path, "%s/notes.fits", dir);
    FILE *f = fopen(path, "w");
    if (f != NULL) {
        fputs("observing log: clouds after midnight\n", f);
        fclose(f);
    }
    expect_error(path, 0, HILAL_ERR_FORMAT, "is not a FITS file");
    snprintf(path, sizeof path, "%s/empty.fits", dir);
    f = fopen(path, "w");
    if (f != NULL)
        fclose(f);
    expect_error(path, 0, HILAL_ERR_FORMAT, "is empty (0 bytes)");
    snprintf(path, sizeof path, "%s/missing.fits", dir);
    expect_error(path, 0, HILAL_ERR_IO, "No such file or directory");
    expect_error(dir, 0, HILAL_ERR_IO, "is a directory");
    expect_error(m13, -1, HILAL_ERR_RANGE, "HDU -1 is not valid");
}

static void test_names_and_syntax(void)
{
    char dir[2048], test0[4000], path[4096], dss[4000];
    hilal_error err;
    hilal_image *img = NULL;
    hilal_test_tmpdir("names", dir, sizeof dir);
    hilal_test_data("fits_edge/astropy_io_fits/test0.fits", test0, sizeof test0);
    const char *sha_test0 = "ea06ee30b28f1ea2e8ca62c5289756763b7f41356d7fa3291dbc346e2ed34e94";

    /* Names with brackets that exist on disk are opened literally. */
    const char *literal[] = {"night[1].fits", "frame.fits[2]", "a[SCI]"};
    for (size_t k = 0; k < 3; k++) {
        snprintf(path, sizeof path, "%s/%s", dir, literal[k]);
        copy_prefix(test0, path, -1);
        hilal_error_clear(&err);
        CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
        if (img != NULL) {
            CHECK(img->meta.hdu == 2 && strcmp(img->meta.path, path) == 0,
                  "%s: HDU %d path %s", literal[k], img->meta.hdu, img->meta.path);
            CHECK(strcmp(img->meta.sha256, sha_test0) == 0, "%s: sha256", literal[k]);
        }
        hilal_image_free(img);
    }

    /* CFITSIO extended syntax: [n] counts from 0, [EXTNAME,EXTVER]. */
    struct {
        const char *spec;
        int hdu;
        double pix35;
    } sel[] = {{"[3]", 4, 308}, {"[SCI,2]", 3, 349}, {"[SCI]", 2, 314}, {"[sci,4]", 5, 0}};
    for (size_t k = 0; k < 4; k++) {
        snprintf(path, sizeof path, "%s%s", test0, sel[k].spec);
        hilal_error_clear(&err);
        CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
        if (img != NULL) {
            CHECK(img->meta.hdu == sel[k].hdu, "%s: HDU %d, expected %d", sel[k].spec,
                  img->meta.hdu, sel[k].hdu);
            CHECK(strcmp(img->meta.path, test0) == 0, "%s: meta.path without [...]: %s",
                  sel[k].spec, img->meta.path);
            CHECK(strcmp(img->meta.sha256, sha_test0) == 0, "%s: sha256 of the file", sel[k].spec);
            if (sel[k].pix35 > 0)
                CHECK(img->pix[4 * 40 + 2] == sel[k].pix35, "%s: pixel (3,5) = %g", sel[k].spec,
                      img->pix[4 * 40 + 2]);
        }
        hilal_image_free(img);
    }
    snprintf(path, sizeof path, "%s[9]", test0);
    expect_error(path, 0, HILAL_ERR_NOTFOUND, "has 5 HDUs");
    snprintf(path, sizeof path, "%s[NOPE]", test0);
    expect_error(path, 0, HILAL_ERR_NOTFOUND, "no HDU matches");
    snprintf(path, sizeof path, "%s[2]", test0);
    expect_error(path, 2, HILAL_ERR_USAGE, "selects HDU 3 but HDU 2 was asked for");
    expect_error(test0, 6, HILAL_ERR_NOTFOUND, "has 5 HDUs, there is no HDU 6");
    expect_error(test0, 1, HILAL_ERR_FORMAT, "HDU 1 is empty (NAXIS = 0)");

    /* An image section takes one plane of a cube: plane 2 of arange.fits
     * holds 110..219 (astropy: d[1].sum() = 18095, d[1, 4, 2] = 156). */
    hilal_test_data("fits_edge/astropy_io_fits/arange.fits", path, sizeof path);
    strcat(path, "[*,*,2:2]");
    hilal_error_clear(&err);
    CHECK_OK(hilal_fits_read_image(path, 0, &img, &err), &err);
    if (img != NULL) {
        double sum = 0;
        for (long i = 0; i < img->nx * img->ny; i++)
            sum += img->pix[i];
        CHECK(img->nx == 11 && img->ny == 10 && sum == 18095 && img->pix[4 * 11 + 2] == 156,
              "plane 2: %ld x %ld, sum %g, (3,5) = %g", img->nx, img->ny, sum,
              img->pix[4 * 11 + 2]);
    }
    hilal_image_free(img);

    /* A missing name.fits is found as name.fits.gz; the hash is of the .gz. */
    hilal_test_data("fits_edge/astropy_wcs/dss.14.29.56-62.41.05.fits", dss, sizeof dss);
    hilal_error_clear(&err);
    CHECK_OK(hilal_fits_read_image(dss, 0, &img, &err), &err);
    if (img != NULL) {
        char gz[4200], sha[65];
        snprintf(gz, sizeof gz, "%s.gz", dss);
        hilal_error_clear(&err);
        CHECK_OK(hilal_sha256_file(gz, sha, &err), &err);
        CHECK(strcmp(img->meta.sha256, sha) == 0 && img->nx == 100, "dss without .gz: sha %s",
              img->meta.sha256);
    }
    hilal_image_free(img);
}

/* The primary header comes along when the image is in an extension. */
static void test_primary_header(void)
{
    char path[4096];
    hilal_error err;
    hilal_error_clear(&err);
    hilal_image *img = NULL;
    char *prim = (char *)1;
    int nprim = -1;
    hilal_test_data("fits_edge/astropy_io_fits/test0.fits", path, sizeof path);
    CHECK_OK(hilal_fits_read_image_primary(path, 0, &img, &prim, &nprim, &err), &err);
    CHECK(prim != NULL && nprim > 100 && strlen(prim) == (size_t)nprim * 80,
          "primary header of %d cards", nprim);
    char v[80];
    CHECK(hilal_fits_header_get(prim, nprim, "DATE-OBS", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "19/05/94") == 0,
          "DATE-OBS = '%s'", v);
    CHECK(hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, "DATE-OBS", v,
                                sizeof v) == HILAL_FITS_KEY_MISSING,
          "DATE-OBS is not in the extension");
    free(prim);
    hilal_image_free(img);
    /* An image in the primary HDU gives no separate primary header. */
    hilal_test_data("fits_edge/astropy_compressed/m13.fits", path, sizeof path);
    prim = (char *)1;
    CHECK_OK(hilal_fits_read_image_primary(path, 0, &img, &prim, &nprim, &err), &err);
    CHECK(prim == NULL && nprim == 0, "no primary header for a primary image");
    hilal_image_free(img);
}

/* A header as 80-character cards. */
static char *make_header(const char *const *cards, int n)
{
    char *h = malloc((size_t)n * 80 + 1);
    for (int i = 0; i < n; i++) {
        char card[96];
        snprintf(card, sizeof card, "%-80s", cards[i]);
        memcpy(h + (size_t)i * 80, card, 80);
    }
    h[(size_t)n * 80] = '\0';
    return h;
}

static void test_header_helpers(void)
{
    const char *cards[] = {
        "SIMPLE  =                    T",
        "GAIN    = '3.5     '           / quoted number",
        "RDNOISE =              1.5D+01 / Fortran exponent",
        "OBJECT  = 'O''Brien field'     / doubled quote",
        "EXPTIME =                      / undefined",
        "FILTER  = 'r       '",
        "SATURATE= 'high    '",
        "HIERARCH ESO DET OUT1 GAIN = 2.1 / hierarch",
        "COMMENT GAIN = 99 is not a keyword here",
        "GAIN    =                  9.0 / second GAIN card: the first wins",
        "END",
    };
    int n = (int)(sizeof cards / sizeof cards[0]);
    char *h = make_header(cards, n);
    char v[80];
    double d;
    hilal_fits_key_state ks;
    hilal_error err;
    hilal_error_clear(&err);

    CHECK(hilal_fits_header_get(h, n, "object", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "O'Brien field") == 0,
          "OBJECT = '%s'", v);
    CHECK(hilal_fits_header_get(h, n, "FILTER", v, sizeof v) == HILAL_FITS_KEY_FOUND &&
              strcmp(v, "r") == 0,
          "FILTER = '%s' (trailing blanks dropped)", v);
    CHECK(hilal_fits_header_get(h, n, "EXPTIME", v, sizeof v) == HILAL_FITS_KEY_UNDEFINED,
          "EXPTIME undefined");
    CHECK(hilal_fits_header_get(h, n, "AIRMASS", v, sizeof v) == HILAL_FITS_KEY_MISSING,
          "AIRMASS missing");
    CHECK_OK(hilal_fits_header_get_double(h, n, "GAIN", &d, &ks, &err), &err);
    CHECK(ks == HILAL_FITS_KEY_FOUND && d == 3.5, "GAIN = %g (quoted, first card)", d);
    CHECK_OK(hilal_fits_header_get_double(h, n, "RDNOISE", &d, &ks, &err), &err);
    CHECK(d == 15.0, "RDNOISE = %g (D exponent)", d);
    CHECK_OK(hilal_fits_header_get_double(h, n, "ESO DET OUT1 GAIN", &d, &ks, &err), &err);
    CHECK(ks == HILAL_FITS_KEY_FOUND && d == 2.1, "HIERARCH gain = %g", d);
    CHECK_OK(hilal_fits_header_get_double(h, n, "HIERARCH ESO DET OUT1 GAIN", &d, &ks, &err), &err);
    CHECK(ks == HILAL_FITS_KEY_FOUND && d == 2.1, "HIERARCH prefix accepted");
    CHECK_OK(hilal_fits_header_get_double(h, n, "EXPTIME", &d, &ks, &err), &err);
    CHECK(ks == HILAL_FITS_KEY_UNDEFINED && isnan(d), "undefined EXPTIME is NaN");
    hilal_status st = hilal_fits_header_get_double(h, n, "SATURATE", &d, &ks, &err);
    CHECK(st == HILAL_ERR_FITS && strstr(err.msg, "SATURATE = 'high' is not a number") != NULL,
          "non-numeric value: %s", err.msg);
    free(h);

    /* Dates: MJD 0 is 1858-11-17; 2000-01-01 is MJD 51544 (astropy.time);
     * the old DD/MM/YY form is 19YY. */
    struct {
        const char *text;
        double mjd;
        int has_time;
    } dates[] = {
        {"1858-11-17", 0, 0},
        {"2000-01-01T12:00:00", 51544.5, 1},
        {"1994-05-19T15:41:16", 49491.653657407405, 1},
        {"2020-08-30T21:36:59.5Z", 59091.0 + (21 * 3600 + 36 * 60 + 59.5) / 86400.0, 1},
        {"26/10/92", 48921, 0},
    };
    for (size_t k = 0; k < sizeof dates / sizeof dates[0]; k++) {
        int has_time = -1;
        hilal_error_clear(&err);
        CHECK_OK(hilal_fits_date_to_mjd(dates[k].text, &d, &has_time, &err), &err);
        CHECK(fabs(d - dates[k].mjd) < 1e-9 && has_time == dates[k].has_time,
              "%s -> MJD %.9f (expected %.9f), has_time %d", dates[k].text, d, dates[k].mjd,
              has_time);
    }
    hilal_error_clear(&err);
    int has_time;
    CHECK(hilal_fits_date_to_mjd("last tuesday", &d, &has_time, &err) == HILAL_ERR_FORMAT &&
              strstr(err.msg, "'last tuesday' is not a FITS date") != NULL && isnan(d),
          "bad date: %s", err.msg);
}

int main(void)
{
    hilal_log_set_handler(NULL, NULL, HILAL_LOG_ERROR);
    test_every_file_has_a_case();
    for (size_t k = 0; k < NCASES; k++)
        check_case(&cases[k]);
    test_m13_identical();
    test_rebuilt_compressed_header();
    test_int64();
    test_bad_files();
    test_names_and_syntax();
    test_primary_header();
    test_header_helpers();
    return hilal_test_finish();
}
