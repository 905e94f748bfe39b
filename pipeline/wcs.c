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
    const double *m = wcs->lin.piximg;
    double scale = NAN;
    if (m != NULL && wcs->naxis >= 2)
        scale = sqrt(fabs(m[0] * m[wcs->naxis + 1] - m[1] * m[wcs->naxis])) * 3600.0;
    snprintf(buf, (size_t)len, "%s, CRVAL = (%.6f, %.6f) deg, CRPIX = (%.2f, %.2f), scale %.4f arcsec/px",
             wcs->ctype[wcs->lng], wcs->crval[wcs->lng], wcs->crval[wcs->lat], wcs->crpix[0],
             wcs->crpix[1], scale);
}
