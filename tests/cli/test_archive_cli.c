/* The archive tools: `hilal info`, `hilal query` (filters; table, CSV, JSON
 * and FITS output, the FITS table passing fitsverify) and `hilal cutout`
 * (FITS stamps with the WCS moved to the stamp, PNG triplet), on an archive
 * written here with the C API; exit codes and messages of the error paths. */
#include <fitsio.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../pipeline/test_archive_frames.h"
#include "hilal/archive.h"
#include "hilal/fits.h"
#include "testutil.h"

#define NX 200
#define NY 160

static const char *HASH = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789";
static char g_exe[4096];

/* Runs `hilal ARGS` (args already quoted), returns the exit status. */
static int hilal(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int hilal(char **out, const char *fmt, ...)
{
    char args[8192], cmd[12400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "'%s' %s", g_exe, args);
    if (out != NULL)
        *out = NULL;
    return hilal_test_run(cmd, out);
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; s != NULL && *s; s++)
        n += *s == '\n';
    return n;
}

/* Expected number of rows for a filter, through the C API. */
static size_t api_count(const char *path, const hilal_archive_filter *q)
{
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_cand *rows = NULL;
    size_t n = 0;
    if (hilal_archive_open_read(path, &ar, &err) == HILAL_OK)
        hilal_archive_query(ar, q, &rows, &n, &err);
    free(rows);
    hilal_archive_free(ar);
    return n;
}

/* The "# N candidates" line of the table output. */
static long table_count(const char *out)
{
    const char *p = out != NULL ? strstr(out, "# ") : NULL;
    return p != NULL ? strtol(p + 2, NULL, 10) : -1;
}

static void test_info(const char *path)
{
    char *out = NULL;
    int rc = hilal(&out, "info '%s'", path);
    CHECK(rc == 0, "info exits 0 (%d): %s", rc, out);
    CHECK(out && strstr(out, "schema version: 2") && strstr(out, "runs: 1") &&
              strstr(out, "frames: 2 current, 0 superseded, 1 failed (3 rows)") &&
              strstr(out, "candidates: 55 current (55 rows)") && strstr(out, HASH) &&
              strstr(out, "cutouts: 63 x 63 px") && strstr(out, "writer: none"),
          "info content: %s", out);
    free(out);
    rc = hilal(&out, "info '%s' --frames", path);
    CHECK(rc == 0 && out && strstr(out, "frameA") && strstr(out, "frameB") && strstr(out, "failed") &&
              strstr(out, "no reference found"),
          "info --frames: %s", out);
    free(out);
    rc = hilal(&out, "info '%s' --config 1", path);
    CHECK(rc == 0 && out && strstr(out, "thresh_sigma = 5") && strstr(out, HASH), "info --config: %s", out);
    free(out);
    rc = hilal(&out, "info '%s' --config 9", path);
    CHECK(rc == 5 && out && strstr(out, "no run 9"), "info --config of a missing run: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "info '%s' --recover", path);
    CHECK(rc == 0 && out && strstr(out, "nothing to recover"), "info --recover on a clean archive: %s", out);
    free(out);
}

static void test_query(const char *path, const char *dir)
{
    char *out = NULL, fits[4200], cmd[8800];
    hilal_archive_filter q;
    int rc = hilal(&out, "query '%s'", path);
    CHECK(rc == 0 && table_count(out) == 55, "query: 55 rows (%ld)", table_count(out));
    free(out);

    /* CSV: header with the public fields, one line per row, exact values. */
    rc = hilal(&out, "query '%s' --format csv", path);
    CHECK(rc == 0 && count_lines(out) == 56, "csv: 56 lines (%zu)", count_lines(out));
    CHECK(out && strncmp(out, "cand_id,frame_id,x,y,ra,dec,snr,flux,flux_err,mag,mag_err,fwhm,elongation,rb,flags,mjd,", 87) == 0,
          "csv header: %.120s", out);
    if (out != NULL) {
        hilal_candidate c;
        tf_candidate(1, 2, NX, NY, &c);
        char want[128];
        snprintf(want, sizeof want, "\n3,");
        char *row = strstr(out, want);
        double x = row ? strtod(strchr(row + 3, ',') + 1, NULL) : NAN;
        CHECK(row != NULL && x == c.x, "csv row of candidate 3 has x = %.15g (got %.15g)", c.x, x);
        CHECK(strstr(out, ",nan,") != NULL, "csv writes NaN as nan");
    }
    free(out);

    /* JSON: valid numbers, null for NaN. */
    rc = hilal(&out, "query '%s' --format json", path);
    CHECK(rc == 0 && out && strstr(out, "\"count\": 55") && strstr(out, "\"ra\": null") &&
              strstr(out, "\"cand_id\": 55") && !strstr(out, "nan"),
          "json output");
    free(out);

    /* FITS: passes fitsverify; columns, units and values read back. */
    snprintf(fits, sizeof fits, "%s/q.fits", dir);
    rc = hilal(&out, "query '%s' --format fits -o '%s' --frame frameA", path, fits);
    CHECK(rc == 0, "fits output: %s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "fitsverify -q '%s'", fits);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 0 && out && strstr(out, "verification OK"), "fitsverify: %s", out);
    free(out);
    fitsfile *f = NULL;
    int status = 0, colnum = 0, anynul = 0;
    long nrows = 0;
    char unit[FLEN_VALUE] = "", extname[FLEN_VALUE] = "";
    double xs[40];
    fits_open_table(&f, fits, READONLY, &status);
    fits_read_key_str(f, "EXTNAME", extname, NULL, &status);
    fits_get_num_rows(f, &nrows, &status);
    fits_get_colnum(f, CASEINSEN, "x", &colnum, &status);
    fits_read_key_str(f, "TUNIT3", unit, NULL, &status);
    if (status == 0 && nrows == 40)
        fits_read_col(f, TDOUBLE, colnum, 1, 1, 40, NULL, xs, &anynul, &status);
    CHECK(status == 0 && nrows == 40 && strcmp(extname, "CANDIDATES") == 0 && strcmp(unit, "pix") == 0,
          "fits table: status %d, %ld rows, EXTNAME %s, TUNIT3 %s", status, nrows, extname, unit);
    if (status == 0 && nrows == 40) {
        int same = 1;
        for (int i = 0; i < 40; i++) {
            hilal_candidate c;
            tf_candidate(1, (size_t)i, NX, NY, &c);
            same &= xs[i] == c.x;
        }
        CHECK(same, "fits x column holds the candidates' x");
    }
    status = 0;
    if (f != NULL)
        fits_close_file(f, &status);

    /* Filters agree with the C API. */
    const char *cases[] = {"--snr-min 30", "--sign neg", "--rb-min 0.5", "--flags-any 0x24",
                           "--flags-none 2", "--mjd 60000.015,", "--mjd ,60000.015", "--run 1",
                           "--run abcdef", "--snr-min 10 --sign pos --rb-min 0.3"};
    size_t expect[10];
    for (int k = 0; k < 10; k++) {
        hilal_archive_filter_init(&q);
        switch (k) {
        case 0: q.snr_min = 30; break;
        case 1: q.sign = -1; break;
        case 2: q.rb_min = 0.5; break;
        case 3: q.flags_any = 0x24; break;
        case 4: q.flags_none = 2; break;
        case 5: q.mjd_min = 60000.015; break;
        case 6: q.mjd_max = 60000.015; break;
        case 7: case 8: q.run_id = 1; break;
        case 9: q.snr_min = 10; q.sign = 1; q.rb_min = 0.3; break;
        }
        expect[k] = api_count(path, &q);
        rc = hilal(&out, "query '%s' %s", path, cases[k]);
        CHECK(rc == 0 && table_count(out) == (long)expect[k] && (k >= 7 || expect[k] < 55),
              "query %s: %ld rows, expected %zu", cases[k], table_count(out), expect[k]);
        free(out);
    }
    /* Cone around candidate 5 (frame A has a WCS-like sky position). */
    hilal_candidate c5;
    tf_candidate(1, 4, NX, NY, &c5);
    rc = hilal(&out, "query '%s' --cone %.10f,%.10f,1 --format csv", path, c5.ra, c5.dec);
    CHECK(rc == 0 && out && strstr(out, "\n5,") != NULL && count_lines(out) >= 2, "cone query: %s", out);
    free(out);
    /* By frame id number. */
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_cand cand;
    CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
    if (ar != NULL && hilal_archive_get_candidate(ar, 50, &cand, NULL, NULL, &err) == HILAL_OK) {
        rc = hilal(&out, "query '%s' --frame %lld", path, (long long)cand.frame_id);
        CHECK(rc == 0 && table_count(out) == 15, "query --frame ID: %ld rows", table_count(out));
        free(out);
    }
    hilal_archive_free(ar);
}

static void test_cutout(const char *path, const char *dir)
{
    char *out = NULL, fits[4200], png[4200], cmd[8800];
    int rc = hilal(&out, "cutout '%s' 3 -o '%s'", path, dir);
    snprintf(fits, sizeof fits, "%s/cand_3.fits", dir);
    snprintf(png, sizeof png, "%s/cand_3.png", dir);
    CHECK(rc == 0 && out && strstr(out, "cand_3.fits") && strstr(out, "cand_3.png"), "cutout: %s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "fitsverify -q '%s'", fits);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 0 && out && strstr(out, "verification OK"), "cutout fitsverify: %s", out);
    free(out);

    /* The SCIENCE stamp holds the frame's pixels; the WCS moved with it. */
    hilal_candidate c;
    tf_candidate(1, 2, NX, NY, &c);
    long x0 = (long)floor(c.x - 0.5) - 31, y0 = (long)floor(c.y - 0.5) - 31;
    char ext[4300];
    hilal_image *img = NULL;
    hilal_error err = {0};
    snprintf(ext, sizeof ext, "%s[SCIENCE]", fits);
    hilal_status st = hilal_fits_read_image(ext, 0, &img, &err);
    CHECK_OK(st, &err);
    if (img != NULL) {
        int same = img->nx == 63 && img->ny == 63;
        for (long j = 0; j < 63 && same; j++)
            for (long i = 0; i < 63 && same; i++) {
                long x = x0 + i, y = y0 + j;
                int in = x >= 0 && y >= 0 && x < NX && y < NY;
                float v = img->pix[j * 63 + i];
                same = in ? v == tf_sci(1, x, y, NX) : isnan(v);
            }
        CHECK(same, "SCIENCE stamp pixels");
        double crpix1 = NAN, ltv1 = NAN;
        hilal_fits_key_state s1, s2;
        hilal_fits_header_get_double(img->meta.header, img->meta.nheader_cards, "CRPIX1", &crpix1, &s1, &err);
        hilal_fits_header_get_double(img->meta.header, img->meta.nheader_cards, "LTV1", &ltv1, &s2, &err);
        CHECK(crpix1 == 100.0 - (double)x0 && ltv1 == -(double)x0, "CRPIX1 %g and LTV1 %g moved by %ld",
              crpix1, ltv1, x0);
        CHECK(img->meta.wcs != NULL, "stamp has a WCS");
        hilal_image_free(img);
    }
    /* PNG: signature and size (3 panels of 63 x 4 px, 4 px gaps). */
    FILE *fp = fopen(png, "rb");
    unsigned char head[24] = {0};
    size_t got = fp ? fread(head, 1, sizeof head, fp) : 0;
    if (fp)
        fclose(fp);
    unsigned w = (unsigned)head[16] << 24 | (unsigned)head[17] << 16 | (unsigned)head[18] << 8 | head[19];
    unsigned h = (unsigned)head[20] << 24 | (unsigned)head[21] << 16 | (unsigned)head[22] << 8 | head[23];
    CHECK(got == 24 && memcmp(head, "\x89PNG\r\n\x1a\n", 8) == 0 && w == 3 * 252 + 8 && h == 252,
          "PNG %u x %u", w, h);
    rc = hilal(&out, "cutout '%s' 1 -o '%s' --no-png --zoom 2", path, dir);
    snprintf(png, sizeof png, "%s/cand_1.png", dir);
    fp = fopen(png, "rb");
    CHECK(rc == 0 && fp == NULL, "--no-png writes FITS only");
    if (fp)
        fclose(fp);
    free(out);
}

static void test_errors(const char *path, const char *dir)
{
    char *out = NULL;
    int rc = hilal(&out, "query");
    CHECK(rc == 2 && out && strstr(out, "ARCHIVE is required"), "query without archive: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "query '%s/none.h5'", dir);
    CHECK(rc == 5 && out && strstr(out, "none.h5"), "query of a missing file: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "query '%s' --format xml", path);
    CHECK(rc == 2 && out && strstr(out, "--format 'xml'"), "bad format: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "query '%s' --format fits", path);
    CHECK(rc == 2 && out && strstr(out, "needs -o"), "fits without -o: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "query '%s' --cone 1,2", path);
    CHECK(rc == 2 && out && strstr(out, "RA,DEC,RADIUS"), "bad cone: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "query '%s' --run 99", path);
    CHECK(rc == 2 && out && strstr(out, "matches no run"), "unknown run: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "cutout '%s' 9999 -o '%s'", path, dir);
    CHECK(rc == 5 && out && strstr(out, "no candidate 9999"), "missing candidate: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "cutout '%s' abc", path);
    CHECK(rc == 2, "non-numeric candidate id: %d", rc);
    free(out);
    rc = hilal(&out, "cutout '%s' 3 -o '%s/nodir'", path, dir);
    CHECK(rc == 5 && out && strstr(out, "does not exist"), "missing output directory: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "info '%s/text.txt'", dir);
    CHECK(rc == 5 && out && strstr(out, "not an HDF5 file"), "info on a text file: %d %s", rc, out);
    free(out);
    rc = hilal(&out, "query --help");
    CHECK(rc == 0 && out && strstr(out, "--cone RA,DEC,R"), "query --help");
    free(out);
}

int main(void)
{
    char dir[4096], path[4200], home[4200];
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    int32_t run = 0;
    hilal_test_tmpdir("archive_cli", dir, sizeof dir);
    snprintf(g_exe, sizeof g_exe, "%s", hilal_test_exe());
    /* No user configuration file. */
    snprintf(home, sizeof home, "%s/home", dir);
    setenv("HOME", home, 1);
    setenv("XDG_CONFIG_HOME", home, 1);
    unsetenv("HILAL_CONFIG");
    snprintf(path, sizeof path, "%s/night.h5", dir);
    char txt[4300];
    snprintf(txt, sizeof txt, "%s/text.txt", dir);
    FILE *fp = fopen(txt, "w");
    if (fp) {
        fputs("hello\n", fp);
        fclose(fp);
    }

    /* Frame A: 40 candidates; frame B: 15 with no sky positions; a failure. */
    hilal_status st = hilal_archive_open_write(path, NULL, &ar, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return hilal_test_finish();
    CHECK_OK(hilal_archive_begin_run(ar, "[detect]\nthresh_sigma = 5\n", HASH, &run, &err), &err);
    hilal_frame a, b, failed;
    tf_make(&a, "frameA", 1, NX, NY, 40);
    tf_make(&b, "frameB", 2, NX, NY, 15);
    for (size_t i = 0; i < b.ncands; i++)
        b.cands[i].ra = b.cands[i].dec = NAN;
    CHECK_OK(hilal_archive_append_frame(ar, run, &a, NULL, &err), &err);
    CHECK_OK(hilal_archive_append_frame(ar, run, &b, NULL, &err), &err);
    hilal_frame_init(&failed);
    snprintf(failed.frame_id, sizeof failed.frame_id, "frameC");
    CHECK_OK(hilal_archive_record_failure(ar, run, &failed, "align: no reference found", &err), &err);
    hilal_frame_clear(&a);
    hilal_frame_clear(&b);
    hilal_frame_clear(&failed);
    CHECK_OK(hilal_archive_close(ar, &err), &err);

    test_info(path);
    test_query(path, dir);
    test_cutout(path, dir);
    test_errors(path, dir);
    return hilal_test_finish();
}
