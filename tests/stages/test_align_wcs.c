/* WCS handling for alignment, on real headers (testdata/align/ and
 * testdata/fits_edge/astropy_wcs/): which headers give a usable celestial
 * WCS, which give none (wcslib would return a valid-looking identity
 * transform), which are rejected; TPV and SIP descriptions of one detector
 * agree; the transform grid meets its interpolation tolerance on a
 * distorted (TPV <-> SIP) map. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fits.h"
#include "hilal/hilal.h"
#include "resample.h"
#include "testutil.h"

/* Reads a .hdr file (bare 80-character cards, possibly ending in a
 * newline) into a NUL-terminated buffer of whole cards. */
static char *read_hdr(const char *rel, int *ncards)
{
    char path[2048];
    hilal_test_data(rel, path, sizeof path);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        CHECK(0, "cannot open %s", path);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = calloc((size_t)n + 81, 1);
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == '\r'))
        got--;
    size_t pad = (80 - got % 80) % 80;
    memset(buf + got, ' ', pad);
    buf[got + pad] = '\0';
    *ncards = (int)((got + pad) / 80);
    return buf;
}

static struct wcsprm *parse(const char *rel, hilal_status *st, hilal_error *err)
{
    int n = 0;
    char *h = read_hdr(rel, &n);
    struct wcsprm *w = NULL;
    hilal_error_clear(err);
    *st = h ? hilal_wcs_from_header(h, n, &w, err) : HILAL_ERR_IO;
    free(h);
    return w;
}

static char *cards(const char *const *lines, int n, int *ncards)
{
    char *h = calloc((size_t)n * 80 + 81, 1);
    for (int i = 0; i < n; i++) {
        char c[81];
        snprintf(c, sizeof c, "%-80s", lines[i]);
        memcpy(h + 80 * i, c, 80);
    }
    *ncards = n;
    return h;
}

/* Headers that describe no celestial WCS: wcslib alone would hand back a
 * linear identity transform for them. */
static void test_no_wcs_headers(void)
{
    const char *plain[] = {"SIMPLE  =                    T", "BITPIX  =                   16",
                           "NAXIS   =                    2", "NAXIS1  =                  256",
                           "NAXIS2  =                  256", "OBJECT  = 'no wcs here'", "END"};
    /* the dummy linear WCS some writers leave (blank CTYPE, unit CDELT) */
    const char *blank[] = {"SIMPLE  =                    T", "BITPIX  =                   16",
                           "NAXIS   =                    2", "NAXIS1  =                  256",
                           "NAXIS2  =                  256", "CTYPE1  = '        '",
                           "CTYPE2  = '        '", "CRPIX1  =                  1.0",
                           "CRVAL1  =                  1.0", "CDELT1  =                  1.0",
                           "CRPIX2  =                  1.0", "CRVAL2  =                  1.0",
                           "CDELT2  =                  1.0", "END"};
    /* a linear, non-celestial axis pair */
    const char *linear[] = {"SIMPLE  =                    T", "BITPIX  =                   16",
                            "NAXIS   =                    2", "NAXIS1  =                  100",
                            "NAXIS2  =                  100", "CTYPE1  = 'PIXEL   '",
                            "CTYPE2  = 'PIXEL   '", "CRPIX1  =                  1.0",
                            "CRVAL1  =                  1.0", "CDELT1  =                  1.0",
                            "END"};
    const char *const *sets[] = {plain, blank, linear};
    int sizes[] = {7, 14, 11};
    const char *names[] = {"no WCS keywords", "blank CTYPE", "PIXEL axes"};
    for (int k = 0; k < 3; k++) {
        int n;
        char *h = cards(sets[k], sizes[k], &n);
        struct wcsprm *w = (struct wcsprm *)h; /* must be reset */
        hilal_error err;
        hilal_error_clear(&err);
        hilal_status st = hilal_wcs_from_header(h, n, &w, &err);
        CHECK(st == HILAL_OK && w == NULL, "%s: no WCS (status %d, %s)", names[k], (int)st,
              err.msg);
        hilal_wcs_free(w);
        free(h);
    }
    hilal_error err;
    hilal_error_clear(&err);
    CHECK(hilal_wcs_check(NULL, 10, 10, &err) == HILAL_ERR_WCS && strstr(err.msg, "no WCS"),
          "check of a missing WCS: %s", err.msg);
}

static void test_real_headers(void)
{
    hilal_status st;
    hilal_error err;

    /* Calabretta & Greisen's TAN test header: 192 x 192, 0.0667 deg/px. */
    struct wcsprm *w = parse("fits_edge/astropy_wcs/1904-66_TAN.hdr", &st, &err);
    CHECK(st == HILAL_OK && w != NULL, "TAN header: %s", err.msg);
    if (w) {
        CHECK(strcmp(hilal_wcs_projection(w), "TAN") == 0, "TAN projection");
        hilal_error_clear(&err);
        CHECK(hilal_wcs_check(w, 192, 192, &err) == HILAL_OK, "TAN usable: %s", err.msg);
        /* CDELT = 0.0667 deg = 240 arcsec at the reference pixel (off the
         * image); gnomonic pixels shrink on the sky away from it (cos^3). */
        double s = hilal_wcs_pixscale_arcsec(w, -268.0658087122, -0.5630437201085);
        CHECK(fabs(s - 240.0) < 0.01, "TAN scale %.4f arcsec/px at CRPIX", s);
        double s2 = hilal_wcs_pixscale_arcsec(w, 96.5, 96.5);
        CHECK(s2 < s && s2 > 0.8 * s, "TAN scale %.3f arcsec/px at the centre", s2);
    }
    hilal_wcs_free(w);

    /* ZPN with 20 polynomial terms. */
    w = parse("align/1904-66_ZPN.hdr", &st, &err);
    CHECK(st == HILAL_OK && w != NULL, "ZPN header: %s", err.msg);
    if (w) {
        CHECK(strcmp(hilal_wcs_projection(w), "ZPN") == 0, "ZPN projection");
        hilal_error_clear(&err);
        /* the centre half of the map is inside the projection's domain */
        double x = 96.5, y = 96.5, ra, dec, bx, by;
        st = hilal_wcs_pix2sky(w, 1, &x, &y, &ra, &dec, &err);
        hilal_wcs_sky2pix(w, 1, &ra, &dec, &bx, &by, &err);
        CHECK(st == HILAL_OK && fabs(bx - x) < 1e-6 && fabs(by - y) < 1e-6,
              "ZPN round trip (%g, %g)", bx, by);
    }
    hilal_wcs_free(w);

    /* Spitzer IRAC, TAN-SIP. */
    w = parse("align/irac_sip.hdr", &st, &err);
    CHECK(st == HILAL_OK && w != NULL, "IRAC SIP header: %s", err.msg);
    if (w) {
        hilal_error_clear(&err);
        CHECK(hilal_wcs_check(w, 256, 256, &err) == HILAL_OK, "IRAC usable: %s", err.msg);
        double s = hilal_wcs_pixscale_arcsec(w, 128.5, 128.5);
        CHECK(s > 1.1 && s < 1.3, "IRAC scale %.4f arcsec/px (1.2 nominal)", s);
    }
    hilal_wcs_free(w);

    /* A PV card the projection does not have: rejected with wcslib's reason. */
    w = parse("align/invalid_header.hdr", &st, &err);
    printf("invalid header: %s\n", err.msg);
    CHECK(st == HILAL_ERR_WCS && w == NULL, "invalid header rejected (status %d)", (int)st);
    CHECK(strstr(err.msg, "unusable") != NULL, "message: %s", err.msg);
    hilal_wcs_free(w);
}

/* The map for the grid test: SIP pixel -> sky -> TPV pixel. */
typedef struct two_wcs {
    struct wcsprm *a, *b;
} two_wcs;

static hilal_status map_ab(void *user, int n, const double *x, const double *y, double *u,
                           double *v, hilal_error *err)
{
    two_wcs *t = user;
    double *ra = malloc((size_t)n * sizeof *ra), *dec = malloc((size_t)n * sizeof *dec);
    hilal_status st = hilal_wcs_pix2sky(t->a, n, x, y, ra, dec, err);
    if (st == HILAL_OK)
        st = hilal_wcs_sky2pix(t->b, n, ra, dec, u, v, err);
    free(ra);
    free(dec);
    return st;
}

/* The same PTF CCD (2048 x 4096) described with SCAMP's TPV polynomial and
 * with SIP: both usable, both agreeing on the sky, and the composed map
 * sampled on a grid within the interpolation tolerance. */
static void test_tpv_sip(void)
{
    hilal_status st1, st2;
    hilal_error err;
    struct wcsprm *tpv = parse("align/tpvonly.hdr", &st1, &err);
    CHECK(st1 == HILAL_OK && tpv != NULL, "TPV header: %s", err.msg);
    struct wcsprm *sip = parse("align/siponly.hdr", &st2, &err);
    CHECK(st2 == HILAL_OK && sip != NULL, "SIP header: %s", err.msg);
    if (tpv == NULL || sip == NULL) {
        hilal_wcs_free(tpv);
        hilal_wcs_free(sip);
        return;
    }
    /* wcslib turns TPV into TAN plus a polynomial distortion. */
    CHECK(strcmp(hilal_wcs_projection(tpv), "TAN") == 0, "TPV: %s", hilal_wcs_projection(tpv));
    /* The distortion is applied: without its non-linear PV terms (j >= 3)
     * the same header maps the chip corners arcseconds away. */
    struct wcsprm *plain = NULL;
    {
        int n = 0;
        char *h = read_hdr("align/tpvonly.hdr", &n);
        int m = 0;
        for (int i = 0; i < n; i++) {
            const char *c = h + 80 * i;
            if (strncmp(c, "PV", 2) == 0 && c[3] == '_' && atoi(c + 4) >= 3)
                continue;
            memmove(h + 80 * m, h + 80 * i, 80);
            m++;
        }
        h[80 * m] = '\0';
        hilal_error_clear(&err);
        CHECK(hilal_wcs_from_header(h, m, &plain, &err) == HILAL_OK && plain, "plain: %s",
              err.msg);
        double x = 1, y = 1, r1, d1, r2, d2;
        if (plain) {
            hilal_wcs_pix2sky(tpv, 1, &x, &y, &r1, &d1, NULL);
            hilal_wcs_pix2sky(plain, 1, &x, &y, &r2, &d2, NULL);
            double sep = hypot((r1 - r2) * cos(d1 * 3.14159265358979 / 180), d1 - d2) * 3600;
            printf("TPV distortion at pixel (1, 1): %.3f arcsec\n", sep);
            CHECK(sep > 1.0, "TPV distortion applied: %.3f arcsec at the corner", sep);
        }
        free(h);
    }
    hilal_error_clear(&err);
    CHECK(hilal_wcs_check(tpv, 2048, 4096, &err) == HILAL_OK, "TPV usable: %s", err.msg);
    hilal_error_clear(&err);
    CHECK(hilal_wcs_check(sip, 2048, 4096, &err) == HILAL_OK, "SIP usable: %s", err.msg);
    /* Same sky positions over the whole chip. */
    double maxsep = 0;
    for (int j = 0; j <= 8; j++)
        for (int i = 0; i <= 8; i++) {
            double x = 1 + 2047.0 * i / 8, y = 1 + 4095.0 * j / 8, r1, d1, r2, d2;
            hilal_wcs_pix2sky(tpv, 1, &x, &y, &r1, &d1, NULL);
            hilal_wcs_pix2sky(sip, 1, &x, &y, &r2, &d2, NULL);
            double sep = hypot((r1 - r2) * cos(d1 * 3.14159265358979 / 180), d1 - d2) * 3600;
            if (sep > maxsep)
                maxsep = sep;
        }
    double scale = hilal_wcs_pixscale_arcsec(tpv, 1024.5, 2048.5);
    printf("TPV vs SIP: max separation %.4f arcsec (%.4f px at %.4f arcsec/px)\n", maxsep,
           maxsep / scale, scale);
    CHECK(scale > 0.9 && scale < 1.1, "PTF scale %.4f arcsec/px", scale);
    CHECK(maxsep / scale < 0.1, "TPV and SIP agree within 0.1 px: %.4f px", maxsep / scale);

    /* A strongly distorted composed map (distorted TPV pixel -> sky ->
     * undistorted TAN pixel) on a grid: bilinear error within the tolerance
     * everywhere (checked here at a dense set of points, not only at the cell
     * centres the builder looks at). */
    two_wcs t = {tpv, plain ? plain : sip};
    hilal_pixgrid g;
    hilal_error_clear(&err);
    hilal_status st = hilal_pixgrid_build(2048, 4096, map_ab, &t, 64, 1e-3, &g, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        double maxerr = 0, maxdev = 0;
        int n = 0;
        for (double y = 3.3; y < 4095; y += 37.7)
            for (double x = 5.1; x < 2047; x += 41.3) {
                double u, v, ex, ey, xx = x + 1, yy = y + 1;
                hilal_pixgrid_eval(&g, x, y, &u, &v, NULL);
                map_ab(&t, 1, &xx, &yy, &ex, &ey, NULL);
                double e = fmax(fabs(u + 1 - ex), fabs(v + 1 - ey));
                if (e > maxerr)
                    maxerr = e;
                double d = hypot(ex - xx, ey - yy);
                if (d > maxdev)
                    maxdev = d;
                n++;
            }
        printf("TPV -> TAN grid: step %ld px, builder max error %.2e px, dense check %.2e px at %d "
               "points, map deviates from identity by up to %.4f px\n",
               g.step, g.max_err_px, maxerr, n, maxdev);
        CHECK(g.max_err_px <= 1e-3 && maxerr <= 2e-3, "grid error %.2e / %.2e px", g.max_err_px,
              maxerr);
        CHECK(maxdev > 10, "the map is distorted (%.1f px)", maxdev);
        hilal_pixgrid_clear(&g);
    }
    hilal_wcs_free(tpv);
    hilal_wcs_free(sip);
    hilal_wcs_free(plain);
}

/* Celestial systems that cannot be mixed. */
static struct wcsprm *sys_wcs(const char *ct1, const char *ct2, const char *radesys,
                              double equinox)
{
    char l[8][81];
    snprintf(l[0], 81, "NAXIS   =                    2");
    snprintf(l[1], 81, "CTYPE1  = '%s'", ct1);
    snprintf(l[2], 81, "CTYPE2  = '%s'", ct2);
    snprintf(l[3], 81, "CRVAL1  =                 10.0");
    snprintf(l[4], 81, "CRVAL2  =                 20.0");
    snprintf(l[5], 81, "CDELT1  =          -0.00027778");
    snprintf(l[6], 81, "CDELT2  =           0.00027778");
    snprintf(l[7], 81, "RADESYS = '%s'", radesys);
    const char *lines[12] = {"SIMPLE  =                    T", "BITPIX  =                  -32",
                             l[0], l[1], l[2], l[3], l[4], l[5], l[6], l[7]};
    char eq[81];
    snprintf(eq, sizeof eq, "EQUINOX = %20.1f", equinox);
    lines[10] = eq;
    lines[11] = "END";
    int n;
    char *h = cards(lines, 12, &n);
    struct wcsprm *w = NULL;
    hilal_wcs_from_header(h, n, &w, NULL);
    free(h);
    return w;
}

static void test_systems(void)
{
    struct wcsprm *fk5 = sys_wcs("RA---TAN", "DEC--TAN", "FK5", 2000.0);
    struct wcsprm *icrs = sys_wcs("RA---TAN", "DEC--TAN", "ICRS", 2000.0);
    struct wcsprm *fk4 = sys_wcs("RA---TAN", "DEC--TAN", "FK4", 1950.0);
    struct wcsprm *gal = sys_wcs("GLON-TAN", "GLAT-TAN", "FK5", 2000.0);
    CHECK(fk5 && icrs && fk4 && gal, "system headers parsed");
    if (fk5 && icrs && fk4 && gal) {
        char why[256] = "";
        CHECK(hilal_wcs_same_system(fk5, icrs, why, sizeof why) == 1, "FK5 ~ ICRS: %s", why);
        CHECK(hilal_wcs_same_system(fk5, fk4, why, sizeof why) == 0 &&
                  strstr(why, "reference systems"),
              "FK5 vs FK4: %s", why);
        CHECK(hilal_wcs_same_system(fk5, gal, why, sizeof why) == 0 &&
                  strstr(why, "different celestial axes"),
              "equatorial vs galactic: %s", why);
    }
    hilal_wcs_free(fk5);
    hilal_wcs_free(icrs);
    hilal_wcs_free(fk4);
    hilal_wcs_free(gal);
}

/* A FITS file with a SIP WCS read through the FITS layer. */
static void test_fits_file(void)
{
    char path[2048];
    hilal_test_data("fits_edge/astropy_wcs/sip-wcs.fits", path, sizeof path);
    hilal_image *img = NULL;
    hilal_error err;
    hilal_error_clear(&err);
    hilal_status st = hilal_fits_read_image(path, 0, &img, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        CHECK(img->meta.wcs != NULL, "SIP WCS found");
        hilal_error_clear(&err);
        CHECK(hilal_wcs_check(img->meta.wcs, img->nx, img->ny, &err) == HILAL_OK, "usable: %s",
              err.msg);
    }
    hilal_image_free(img);
}

int main(void)
{
    test_no_wcs_headers();
    test_real_headers();
    test_tpv_sip();
    test_systems();
    test_fits_file();
    return hilal_test_finish();
}
