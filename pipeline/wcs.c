/* The single place where wcslib is called and its status codes translated. */
#include "hilal/wcs.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <wcslib/wcs.h>
#include <wcslib/wcserr.h>
#include <wcslib/wcsfix.h>
#include <wcslib/wcshdr.h>
#include <wcslib/wcsmath.h>

hilal_status hilal_wcs_from_header(const char *header, int nkeys, struct wcsprm **out,
                                   hilal_error *err)
{
    *out = NULL;
    if (header == NULL || nkeys <= 0)
        return HILAL_OK;
    int nreject = 0, nwcs = 0;
    struct wcsprm *all = NULL;
    struct wcsprm *wcs = NULL;
    hilal_status st = HILAL_OK;
    /* wcspih wants a mutable buffer. */
    size_t len = strlen(header);
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory copying a header");
    memcpy(copy, header, len + 1);
    int ws = wcspih(copy, nkeys, WCSHDR_all, 0, &nreject, &nwcs, &all);
    if (ws != 0) {
        st = hilal_error_set(err, HILAL_ERR_WCS, "wcslib could not parse the header: %s",
                             wcs_errmsg[ws]);
        goto cleanup;
    }
    /* Pick the first description with two celestial axes. wcspih returns a
     * description for any header with NAXIS, even with no WCS keys at all:
     * require CTYPE on a celestial axis (lng/lat found by wcsset) and that the
     * header names CTYPE1 or CTYPE2 at all. */
    if (strstr(header, "CTYPE1  =") == NULL && strstr(header, "CTYPE2  =") == NULL)
        goto cleanup;
    for (int i = 0; i < nwcs; i++) {
        struct wcsprm *w = all + i;
        struct wcsprm tmp;
        memset(&tmp, 0, sizeof tmp);
        tmp.flag = -1;
        if (wcssub(1, w, NULL, NULL, &tmp) != 0)
            continue;
        int fs[NWCSFIX];
        wcsfix(7, NULL, &tmp, fs); /* translate non-standard keywords (e.g. DATE-OBS forms) */
        int ss = wcsset(&tmp);
        if (ss == 0 && tmp.lng >= 0 && tmp.lat >= 0) {
            wcs = malloc(sizeof *wcs);
            if (wcs == NULL) {
                wcsfree(&tmp);
                st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a WCS");
                goto cleanup;
            }
            *wcs = tmp;
            break;
        }
        if (ss != 0 && (strncmp(w->ctype[0], "RA", 2) == 0 || strncmp(w->ctype[0], "GLON", 4) == 0)) {
            char why[256];
            snprintf(why, sizeof why, "%s", tmp.err ? tmp.err->msg : wcs_errmsg[ss]);
            wcsfree(&tmp);
            st = hilal_error_set(err, HILAL_ERR_WCS,
                                 "celestial WCS (CTYPE1 = '%s') is unusable: %s; fix the WCS "
                                 "keywords or remove them to align by star matching",
                                 w->ctype[0], why);
            goto cleanup;
        }
        wcsfree(&tmp);
    }
cleanup:
    if (all != NULL)
        wcsvfree(&nwcs, &all);
    free(copy);
    *out = wcs;
    return st;
}

hilal_status hilal_wcs_copy(const struct wcsprm *src, struct wcsprm **out, hilal_error *err)
{
    *out = NULL;
    if (src == NULL)
        return HILAL_OK;
    struct wcsprm *dst = calloc(1, sizeof *dst);
    if (dst == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a WCS copy");
    dst->flag = -1;
    int ws = wcssub(1, src, NULL, NULL, dst);
    if (ws == 0)
        ws = wcsset(dst);
    if (ws != 0) {
        wcsfree(dst);
        free(dst);
        return hilal_error_set(err, HILAL_ERR_WCS, "wcslib could not copy a WCS: %s",
                               wcs_errmsg[ws]);
    }
    *out = dst;
    return HILAL_OK;
}

void hilal_wcs_free(struct wcsprm *wcs)
{
    if (wcs == NULL)
        return;
    wcsfree(wcs);
    free(wcs);
}

/* Shared driver for both directions: wcsp2s and wcss2p take the same arrays
 * with input and output roles exchanged. */
static hilal_status transform(struct wcsprm *wcs, int n, const double *a, const double *b,
                              double *outa, double *outb, int to_sky, hilal_error *err)
{
    if (wcs == NULL)
        return hilal_error_set(err, HILAL_ERR_WCS, "no WCS to transform coordinates with");
    if (n <= 0)
        return HILAL_OK;
    int naxis = wcs->naxis;
    double *in = malloc(sizeof(double) * (size_t)n * (size_t)naxis);
    double *img = malloc(sizeof(double) * (size_t)n * (size_t)naxis);
    double *res = malloc(sizeof(double) * (size_t)n * (size_t)naxis);
    double *phi = malloc(sizeof(double) * (size_t)n);
    double *theta = malloc(sizeof(double) * (size_t)n);
    int *stat = malloc(sizeof(int) * (size_t)n);
    hilal_status st = HILAL_OK;
    if (!in || !img || !res || !phi || !theta || !stat) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %d coordinates", n);
        goto cleanup;
    }
    int ia = to_sky ? 0 : wcs->lng, ib = to_sky ? 1 : wcs->lat;
    int oa = to_sky ? wcs->lng : 0, ob = to_sky ? wcs->lat : 1;
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < naxis; k++)
            in[i * naxis + k] = to_sky ? 1.0 : wcs->crval[k];
        in[i * naxis + ia] = a[i];
        in[i * naxis + ib] = b[i];
    }
    int ws = to_sky ? wcsp2s(wcs, n, naxis, in, img, phi, theta, res, stat)
                    : wcss2p(wcs, n, naxis, in, phi, theta, img, res, stat);
    if (ws != 0 && ws != 8 && ws != 9) { /* 8/9: some coordinates invalid, flagged in stat */
        st = hilal_error_set(err, HILAL_ERR_WCS, "wcslib coordinate transform failed: %s",
                             wcs_errmsg[ws]);
        goto cleanup;
    }
    for (int i = 0; i < n; i++) {
        int bad = stat[i] != 0 || !isfinite(a[i]) || !isfinite(b[i]);
        outa[i] = bad ? NAN : res[i * naxis + oa];
        outb[i] = bad ? NAN : res[i * naxis + ob];
    }
cleanup:
    free(in);
    free(img);
    free(res);
    free(phi);
    free(theta);
    free(stat);
    return st;
}

hilal_status hilal_wcs_pix2sky(struct wcsprm *wcs, int n, const double *x, const double *y,
                               double *ra_deg, double *dec_deg, hilal_error *err)
{
    return transform(wcs, n, x, y, ra_deg, dec_deg, 1, err);
}

hilal_status hilal_wcs_sky2pix(struct wcsprm *wcs, int n, const double *ra_deg,
                               const double *dec_deg, double *x, double *y, hilal_error *err)
{
    return transform(wcs, n, ra_deg, dec_deg, x, y, 0, err);
}

const char *hilal_wcs_projection(const struct wcsprm *wcs)
{
    if (wcs == NULL || wcs->lng < 0)
        return "";
    const char *ct = wcs->ctype[wcs->lng];
    const char *dash = strrchr(ct, '-');
    return dash ? dash + 1 : ct;
}

void hilal_wcs_describe(const struct wcsprm *wcs, char *buf, int len)
{
    if (wcs == NULL) {
        snprintf(buf, (size_t)len, "none");
        return;
    }
    /* Pixel scale from the determinant of the CD (or PC x CDELT) matrix. */
    /* lin.piximg is the CD matrix (PC x CDELT) after wcsset, however the
     * header gave it. */
    const double *m = wcs->lin.piximg;
    double scale = NAN;
    if (m != NULL && wcs->naxis >= 2)
        scale = sqrt(fabs(m[0] * m[wcs->naxis + 1] - m[1] * m[wcs->naxis])) * 3600.0;
    if (!(scale > 0) && wcs->naxis >= 2 && wcs->cdelt != NULL)
        scale = sqrt(fabs(wcs->cdelt[0] * wcs->cdelt[1])) * 3600.0;
    snprintf(buf, (size_t)len, "%s, CRVAL = (%.6f, %.6f) deg, CRPIX = (%.2f, %.2f), scale %.4f arcsec/px",
             wcs->ctype[wcs->lng], wcs->crval[wcs->lng], wcs->crval[wcs->lat], wcs->crpix[0],
             wcs->crpix[1], scale);
}

double hilal_wcs_pixscale_arcsec(struct wcsprm *wcs, double x, double y)
{
    /* Sky positions of (x, y), (x + 1, y), (x, y + 1) as unit vectors; the
     * pixel's solid angle is |(p1 - p0) x (p2 - p0)| (valid at the poles,
     * where RA differences are meaningless). */
    double px[3] = {x, x + 1.0, x}, py[3] = {y, y, y + 1.0}, ra[3], dec[3];
    if (hilal_wcs_pix2sky(wcs, 3, px, py, ra, dec, NULL) != HILAL_OK)
        return NAN;
    const double deg = 3.14159265358979323846 / 180.0;
    double p[3][3];
    for (int k = 0; k < 3; k++) {
        p[k][0] = cos(dec[k] * deg) * cos(ra[k] * deg);
        p[k][1] = cos(dec[k] * deg) * sin(ra[k] * deg);
        p[k][2] = sin(dec[k] * deg);
    }
    double a[3], b[3];
    for (int i = 0; i < 3; i++) {
        a[i] = p[1][i] - p[0][i];
        b[i] = p[2][i] - p[0][i];
    }
    double cx = a[1] * b[2] - a[2] * b[1], cy = a[2] * b[0] - a[0] * b[2];
    double cz = a[0] * b[1] - a[1] * b[0];
    double area = sqrt(cx * cx + cy * cy + cz * cz); /* steradians */
    return isfinite(area) ? sqrt(area) / deg * 3600.0 : NAN;
}

hilal_status hilal_wcs_check(struct wcsprm *wcs, long nx, long ny, hilal_error *err)
{
    if (wcs == NULL)
        return hilal_error_set(err, HILAL_ERR_WCS, "no WCS");
    if (wcs->lng < 0 || wcs->lat < 0)
        return hilal_error_set(err, HILAL_ERR_WCS,
                               "the WCS has no celestial axes (CTYPE '%s', '%s')",
                               wcs->naxis > 0 ? wcs->ctype[0] : "",
                               wcs->naxis > 1 ? wcs->ctype[1] : "");
    /* Centre and corners (FITS 1-based). */
    double x[5] = {0.5 * (double)(nx + 1), 1.0, (double)nx, 1.0, (double)nx};
    double y[5] = {0.5 * (double)(ny + 1), 1.0, 1.0, (double)ny, (double)ny};
    double ra[5], dec[5], bx[5], by[5];
    hilal_error local;
    hilal_error_clear(&local);
    if (hilal_wcs_pix2sky(wcs, 5, x, y, ra, dec, &local) != HILAL_OK ||
        hilal_wcs_sky2pix(wcs, 5, ra, dec, bx, by, &local) != HILAL_OK)
        return hilal_error_set(err, HILAL_ERR_WCS, "%s", local.msg);
    for (int k = 0; k < 5; k++) {
        if (!isfinite(ra[k]) || !isfinite(dec[k]))
            return hilal_error_set(err, HILAL_ERR_WCS,
                                   "pixel (%.1f, %.1f) has no sky position under the WCS",
                                   x[k], y[k]);
        double e = hypot(bx[k] - x[k], by[k] - y[k]);
        if (!(e <= 1e-3))
            return hilal_error_set(err, HILAL_ERR_WCS,
                                   "the WCS does not invert: pixel (%.1f, %.1f) -> sky -> pixel "
                                   "misses by %.3g px",
                                   x[k], y[k], e);
    }
    double scale = hilal_wcs_pixscale_arcsec(wcs, x[0], y[0]);
    if (!(scale > 0) || !isfinite(scale))
        return hilal_error_set(err, HILAL_ERR_WCS,
                               "the WCS pixel scale at the centre is %g arcsec/px", scale);
    return HILAL_OK;
}

/* FK4 (B1950-like) or not: FK5 and ICRS agree to ~20 mas. */
static int is_fk4(const struct wcsprm *w)
{
    return strncmp(w->radesys, "FK4", 3) == 0;
}

int hilal_wcs_same_system(const struct wcsprm *a, const struct wcsprm *b, char *why, int len)
{
    if (a == NULL || b == NULL || a->lng < 0 || b->lng < 0) {
        if (why)
            snprintf(why, (size_t)len, "a WCS is missing or not celestial");
        return 0;
    }
    const char *ca = a->ctype[a->lng], *cb = b->ctype[b->lng];
    if (strncmp(ca, cb, 4) != 0) {
        if (why)
            snprintf(why, (size_t)len, "different celestial axes ('%.8s' and '%.8s')", ca, cb);
        return 0;
    }
    if (strncmp(ca, "RA", 2) == 0) {
        if (is_fk4(a) != is_fk4(b)) {
            if (why)
                snprintf(why, (size_t)len, "different reference systems (%s and %s)",
                         a->radesys[0] ? a->radesys : "default",
                         b->radesys[0] ? b->radesys : "default");
            return 0;
        }
        double ea = a->equinox, eb = b->equinox;
        if (strncmp(a->radesys, "ICRS", 4) != 0 && strncmp(b->radesys, "ICRS", 4) != 0 &&
            !undefined(ea) && !undefined(eb) && fabs(ea - eb) > 1e-6) {
            if (why)
                snprintf(why, (size_t)len, "different equinoxes (%.1f and %.1f)", ea, eb);
            return 0;
        }
    }
    return 1;
}
