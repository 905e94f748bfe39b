/* `hilal subtract` end to end: a simulated pair (`hilal simulate`, flux
 * ratio 0.8) through ingest ... subtract, the FITS file it writes read
 * back: extensions, WCS and provenance cards, fitsverify, S_corr statistics
 * and the fluxes of the injected transients in science ADU; usage errors. */
#include <fitsio.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fits.h"
#include "testutil.h"

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int has_card(const hilal_image *img, const char *key, char *value, size_t len)
{
    return hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, key, value, len) ==
           HILAL_FITS_KEY_FOUND;
}

/* Reads truth.csv: transients with their science pixel (FITS 1-based),
 * flux in science ADU and ideal S/N. Returns the count. */
static int read_truth(const char *path, double *x, double *y, double *flux, double *snr, int max)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    char line[4096];
    int n = 0;
    if (fgets(line, sizeof line, f) == NULL) { /* header */
        fclose(f);
        return -1;
    }
    while (n < max && fgets(line, sizeof line, f) != NULL) {
        char type[32];
        double id, xx, yy, ra, dec, fl, s;
        if (sscanf(line, "%lf,%31[^,],%lf,%lf,%lf,%lf,%lf,%lf", &id, type, &xx, &yy, &ra, &dec, &fl,
                   &s) == 8 &&
            strcmp(type, "transient") == 0) {
            x[n] = xx;
            y[n] = yy;
            flux[n] = fl;
            snr[n] = s;
            n++;
        }
    }
    fclose(f);
    return n;
}

int main(void)
{
    char dir[1024], cmd[8192], path[1200], val[128];
    char *out = NULL;
    const char *exe = hilal_test_exe();
    hilal_test_tmpdir("subtract_cli", dir, sizeof dir);

    snprintf(cmd, sizeof cmd,
             "'%s' -q simulate --out '%s/sim' --size 512 --seed 11 --flux-ratio 0.8 "
             "--n-transients 40 --snr-range 20,200 --n-cosmics 0 --bad-columns 1",
             exe, dir);
    int rc = hilal_test_run(cmd, &out);
    CHECK(rc == 0, "simulate: rc %d: %s", rc, out ? out : "");
    free(out);
    out = NULL;

    snprintf(cmd, sizeof cmd,
             "'%s' subtract '%s/sim/sci.fits' '%s/sim/ref.fits' -o '%s/diff.fits' --set "
             "pipeline.threads=2",
             exe, dir, dir, dir);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 0, "subtract: rc %d: %s", rc, out ? out : "");
    CHECK(out != NULL && strstr(out, "diff.fits") != NULL && strstr(out, "S_corr") != NULL,
          "summary printed: %s", out ? out : "");
    free(out);
    out = NULL;

    /* fitsverify, when installed */
    if (hilal_test_run("command -v fitsverify", NULL) == 0) {
        snprintf(cmd, sizeof cmd, "fitsverify -q '%s/diff.fits'", dir);
        rc = hilal_test_run(cmd, &out);
        CHECK(rc == 0 && out != NULL && strstr(out, "verification OK") != NULL, "fitsverify: %s",
              out ? out : "");
        free(out);
        out = NULL;
    }

    /* the extensions, in order, with WCS and provenance */
    snprintf(path, sizeof path, "%s/diff.fits", dir);
    const char *names[] = {"DIFF", "SCORR", "FLUX", "FLUX_ERR", "PSF_D", "MASK"};
    hilal_image *img[6] = {NULL};
    hilal_error err = {0};
    for (int k = 0; k < 6; k++) {
        hilal_status st = hilal_fits_read_image(path, k + 2, &img[k], &err);
        CHECK_OK(st, &err);
        if (st != HILAL_OK)
            continue;
        CHECK(has_card(img[k], "EXTNAME", val, sizeof val) && strcmp(val, names[k]) == 0,
              "HDU %d is %s (found '%s')", k + 2, names[k], val);
        if (k != 4) {
            CHECK(img[k]->nx == 512 && img[k]->ny == 512, "%s is 512 x 512", names[k]);
            CHECK(img[k]->meta.wcs != NULL, "%s carries the science WCS", names[k]);
        }
        if (k < 4) {
            CHECK(img[k]->meta.bitpix == -32, "%s is float32", names[k]);
            CHECK(has_card(img[k], "FLUXRAT", val, sizeof val) && fabs(atof(val) - 0.8) < 0.03,
                  "%s: FLUXRAT = %s", names[k], val);
            CHECK(has_card(img[k], "SCISHA", val, sizeof val) && strlen(val) == 64, "%s: SCISHA",
                  names[k]);
            CHECK(has_card(img[k], "HILALVER", val, sizeof val), "%s: HILALVER", names[k]);
            CHECK(has_card(img[k], "SIGMAN", val, sizeof val) && atof(val) > 0, "%s: SIGMAN", names[k]);
            CHECK(has_card(img[k], "FWHMN", val, sizeof val) && has_card(img[k], "FWHMR", val, sizeof val),
                  "%s: FWHMN, FWHMR", names[k]);
            CHECK(has_card(img[k], "SCORRSTD", val, sizeof val) && fabs(atof(val) - 1) < 0.1,
                  "%s: SCORRSTD = %s", names[k], val);
        }
    }
    /* the TILES table: one row per tile (one for a frame in one piece) */
    {
        fitsfile *ff = NULL;
        int fst = 0, ntx = 0, nty = 0, col = 0, anynul = 0;
        long nrows = 0;
        double scstd = NAN, fwhm = NAN;
        fits_open_file(&ff, path, READONLY, &fst);
        fits_movnam_hdu(ff, BINARY_TBL, "TILES", 0, &fst);
        fits_get_num_rows(ff, &nrows, &fst);
        fits_read_key(ff, TINT, "NTILESX", &ntx, NULL, &fst);
        fits_read_key(ff, TINT, "NTILESY", &nty, NULL, &fst);
        fits_get_colnum(ff, CASEINSEN, "SC_STD", &col, &fst);
        fits_read_col(ff, TDOUBLE, col, 1, 1, 1, NULL, &scstd, &anynul, &fst);
        fits_get_colnum(ff, CASEINSEN, "FWHM_SCI", &col, &fst);
        fits_read_col(ff, TDOUBLE, col, 1, 1, 1, NULL, &fwhm, &anynul, &fst);
        CHECK(fst == 0, "TILES table readable (CFITSIO status %d)", fst);
        CHECK(nrows >= 1 && nrows == (long)ntx * nty, "TILES: %ld rows for %d x %d tiles", nrows,
              ntx, nty);
        CHECK(fabs(scstd - 1) < 0.1 && fwhm > 1 && fwhm < 10,
              "TILES row 1: S_corr std %.3f, science FWHM %.2f px", scstd, fwhm);
        if (ff != NULL) {
            int s2 = 0;
            fits_close_file(ff, &s2);
        }
    }

    /* the science WCS itself: same pixel -> sky as the science file */
    hilal_image *sci = NULL;
    snprintf(cmd, sizeof cmd, "%s/sim/sci.fits", dir);
    hilal_status st = hilal_fits_read_image(cmd, 0, &sci, &err);
    CHECK_OK(st, &err);
    if (sci != NULL && img[1] != NULL && sci->meta.wcs != NULL && img[1]->meta.wcs != NULL) {
        double px = 100.5, py = 300.25, ra1, de1, ra2, de2;
        hilal_wcs_pix2sky(sci->meta.wcs, 1, &px, &py, &ra1, &de1, &err);
        hilal_wcs_pix2sky(img[1]->meta.wcs, 1, &px, &py, &ra2, &de2, &err);
        CHECK(fabs(ra1 - ra2) < 1e-9 && fabs(de1 - de2) < 1e-9, "SCORR WCS equals the science WCS");
    }

    /* transients: flux (science ADU) and S_corr at the brightest S_corr
     * pixel within 1 px of the true position */
    static double tx[200], ty[200], tf[200], ts[200], ratio[200];
    snprintf(cmd, sizeof cmd, "%s/sim/truth.csv", dir);
    int nt = read_truth(cmd, tx, ty, tf, ts, 200);
    CHECK(nt >= 30, "%d transients in the truth table", nt);
    int nr = 0, detected = 0;
    if (img[1] != NULL && img[2] != NULL && img[5] != NULL) {
        const long n = 512;
        for (int k = 0; k < nt; k++) {
            long cx = lround(tx[k] - 1), cy = lround(ty[k] - 1), best = -1;
            for (long y = cy - 1; y <= cy + 1; y++)
                for (long x = cx - 1; x <= cx + 1; x++)
                    if (x >= 0 && y >= 0 && x < n && y < n &&
                        (best < 0 || img[1]->pix[y * n + x] > img[1]->pix[best]))
                        best = y * n + x;
            if (best < 0 || img[5]->pix[best] != 0)
                continue;
            detected += img[1]->pix[best] > 5;
            ratio[nr++] = img[2]->pix[best] / tf[k];
        }
        qsort(ratio, (size_t)nr, sizeof *ratio, cmp_double);
        double med = nr > 0 ? ratio[nr / 2] : 0;
        /* F_n = 0.8: a flux in reference units would read 1.25, one scaled
         * twice 0.8 */
        CHECK(nr >= 25 && med > 0.92 && med < 1.05,
              "median measured/true transient flux %.3f over %d (science ADU)", med, nr);
        CHECK(detected >= nr - 2, "%d of %d transients (S/N 20-200) have S_corr > 5", detected, nr);
        printf("cli: median flux ratio %.3f over %d transients, %d with S_corr > 5\n", med, nr, detected);
    }
    for (int k = 0; k < 6; k++)
        hilal_image_free(img[k]);
    hilal_image_free(sci);

    /* usage errors and an unwritable output */
    snprintf(cmd, sizeof cmd, "'%s' subtract '%s/sim/sci.fits'", exe, dir);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 2 && out && strstr(out, "-o OUT.fits") != NULL, "missing arguments: rc %d: %s", rc,
          out ? out : "");
    free(out);
    out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' subtract '%s/sim/sci.fits' '%s/sim/ref.fits' -o '%s/no/such/dir/d.fits'",
             exe, dir, dir, dir);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 5 && out && strstr(out, "no/such/dir") != NULL, "unwritable output: rc %d: %s", rc,
          out ? out : "");
    free(out);
    out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' subtract '%s/missing.fits' '%s/sim/ref.fits' -o '%s/d2.fits'", exe,
             dir, dir, dir);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 5 && out && strstr(out, "missing.fits") != NULL, "missing input: rc %d: %s", rc,
          out ? out : "");
    free(out);
    out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' subtract --set subtract.fft_rigor=quick '%s/sim/sci.fits' '%s/sim/ref.fits' -o '%s/d3.fits'",
             exe, dir, dir, dir);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 3 && out && strstr(out, "fft_rigor") != NULL, "bad rigor: rc %d: %s", rc, out ? out : "");
    free(out);
    return hilal_test_finish();
}
