/* The one place libsep is called; see sepw.h. */
#include "sepw.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <sep.h>

/* libsep 1.2 status values, as in its private sepcore.h (not installed);
 * sep_get_errmsg() gives the matching texts. */
enum {
    SEPW_MEMORY_ALLOC_ERROR = 1,
    SEPW_PIXSTACK_FULL = 2,
    SEPW_ILLEGAL_DTYPE = 3,
    SEPW_ILLEGAL_SUBPIX = 4,
    SEPW_NON_ELLIPSE_PARAMS = 5,
    SEPW_ILLEGAL_APER_PARAMS = 6,
    SEPW_DEBLEND_OVERFLOW = 7,
    SEPW_LINE_NOT_IN_BUF = 8,
    SEPW_RELTHRESH_NO_NOISE = 9,
    SEPW_UNKNOWN_NOISE_TYPE = 10
};

_Static_assert(SEP_OBJ_MERGED == HILAL_SEPW_OBJ_MERGED && SEP_OBJ_TRUNC == HILAL_SEPW_OBJ_TRUNC &&
                   SEP_OBJ_SINGU == HILAL_SEPW_OBJ_SINGU &&
                   SEP_APER_TRUNC == HILAL_SEPW_APER_TRUNC &&
                   SEP_APER_HASMASKED == HILAL_SEPW_APER_HASMASKED &&
                   SEP_APER_ALLMASKED == HILAL_SEPW_APER_ALLMASKED &&
                   SEP_APER_NONPOSITIVE == HILAL_SEPW_APER_NONPOSITIVE,
               "SEP flag values changed");

/* sep_extract() reads the process-wide pixel-stack size set by
 * sep_set_extract_pixstack(); everything else it keeps per call or in
 * thread-local storage (libsep >= 1.2), so extractions on different images
 * may run at once. Extractions that want the size already set share this
 * lock (the usual case: every image of a run has the same setting); one
 * that must change it holds the lock alone while it sets and extracts, so
 * no extraction ever sees its setting changed mid-run. */
static pthread_rwlock_t pixstack_lock = PTHREAD_RWLOCK_INITIALIZER;

/* Translates a libsep status into a hilal_error: the short message, the
 * library's detail text, and what to change. `what` names the operation. */
static hilal_status sepw_fail(int status, const char *what, size_t pixstack, hilal_error *err)
{
    char msg[128] = "", detail[1024] = "";
    sep_get_errmsg(status, msg);
    sep_get_errdetail(detail);
    const char *sep_detail = detail[0] != '\0' ? detail : "no detail";
    switch (status) {
    case SEPW_MEMORY_ALLOC_ERROR:
        return hilal_error_set(err, HILAL_ERR_NOMEM, "%s: libsep: %s (%s)", what, msg,
                               sep_detail);
    case SEPW_PIXSTACK_FULL:
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "%s: libsep: %s (%s): more than %zu pixels above the detection "
                               "threshold are active at once; raise stars.pixstack or "
                               "stars.thresh_sigma",
                               what, msg, sep_detail, pixstack);
    case SEPW_DEBLEND_OVERFLOW:
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "%s: libsep: %s (%s): a blended object splits into more than "
                               "%d sub-objects; raise stars.deblend_cont or stars.thresh_sigma",
                               what, msg, sep_detail, sep_get_sub_object_limit());
    case SEPW_ILLEGAL_SUBPIX:
    case SEPW_NON_ELLIPSE_PARAMS:
    case SEPW_ILLEGAL_APER_PARAMS:
        return hilal_error_set(err, HILAL_ERR_RANGE, "%s: libsep: %s (%s)", what, msg,
                               sep_detail);
    case SEPW_ILLEGAL_DTYPE:
    case SEPW_LINE_NOT_IN_BUF:
    case SEPW_RELTHRESH_NO_NOISE:
    case SEPW_UNKNOWN_NOISE_TYPE:
    default:
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "%s: libsep status %d: %s (%s)", what,
                               status, msg, sep_detail);
    }
}

/* Fills SEP's image descriptor from ours. Fails for images larger than
 * SEP's int dimensions. */
static hilal_status make_sep_image(const hilal_sepw_image *im, sep_image *s, hilal_error *err)
{
    if (im->nx <= 0 || im->ny <= 0 || im->nx > INT_MAX || im->ny > INT_MAX ||
        (double)im->nx * (double)im->ny > (double)INT_MAX)
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "image of %ld x %ld px is outside libsep's size limits", im->nx,
                               im->ny);
    memset(s, 0, sizeof *s);
    s->data = im->data;
    s->dtype = SEP_TFLOAT;
    s->noise = im->var;
    s->ndtype = SEP_TFLOAT;
    s->noise_type = im->var != NULL ? SEP_NOISE_VAR : SEP_NOISE_NONE;
    s->noiseval = 0.0;
    s->mask = im->mask;
    s->mdtype = SEP_TBYTE;
    s->maskthresh = (double)im->mask_level; /* masked where mask > mask_level */
    s->segmap = NULL;
    s->sdtype = SEP_TINT;
    s->w = (int)im->nx;
    s->h = (int)im->ny;
    s->gain = 0.0; /* var already holds the source Poisson term */
    return HILAL_OK;
}

hilal_status hilal_sepw_background(const hilal_sepw_image *im, int mesh_px, int filter_size,
                                   float *sky, float *rms, double *global_sky,
                                   double *global_rms, hilal_error *err)
{
    sep_image s;
    sep_bkg *bkg = NULL;
    hilal_status st = make_sep_image(im, &s, err);
    if (st != HILAL_OK)
        goto cleanup;
    s.noise = NULL; /* the background is measured from the data alone */
    s.noise_type = SEP_NOISE_NONE;

    int status = sep_background(&s, mesh_px, mesh_px, filter_size, filter_size, 0.0, &bkg);
    if (status != 0) {
        st = sepw_fail(status, "background estimation", 0, err);
        goto cleanup;
    }
    status = sep_bkg_array(bkg, sky, SEP_TFLOAT);
    if (status == 0 && rms != NULL)
        status = sep_bkg_rmsarray(bkg, rms, SEP_TFLOAT);
    if (status != 0) {
        st = sepw_fail(status, "background interpolation", 0, err);
        goto cleanup;
    }
    *global_sky = sep_bkg_global(bkg);
    *global_rms = sep_bkg_globalrms(bkg);

cleanup:
    sep_bkg_free(bkg);
    return st;
}

/* Pixel stack of a first extraction attempt (libsep's own default). */
#define SEPW_FIRST_PIXSTACK 300000

/* One sep_extract() with a pixel stack of `pixstack` pixels (see
 * pixstack_lock); returns libsep's status. */
static int extract_with_stack(const sep_image *s, const hilal_sepw_extract_params *p,
                              size_t pixstack, sep_catalog **cat)
{
    /* SExtractor's default detection filter: a 3x3 pyramid (SEP normalises it). */
    static const float conv3[9] = {1, 2, 1, 2, 4, 2, 1, 2, 1};
    pthread_rwlock_rdlock(&pixstack_lock);
    if (sep_get_extract_pixstack() != pixstack) {
        pthread_rwlock_unlock(&pixstack_lock);
        pthread_rwlock_wrlock(&pixstack_lock);
        sep_set_extract_pixstack(pixstack);
    }
    int status = sep_extract(s, (float)p->thresh_sigma, SEP_THRESH_REL, p->minarea,
                             p->filter ? conv3 : NULL, 3, 3, SEP_FILTER_CONV,
                             p->deblend_nthresh, p->deblend_cont, p->clean ? 1 : 0,
                             p->clean_param, cat);
    pthread_rwlock_unlock(&pixstack_lock);
    return status;
}

hilal_status hilal_sepw_extract(const hilal_sepw_image *im, const hilal_sepw_extract_params *p,
                                hilal_sepw_object **objs, size_t *nobj, hilal_error *err)
{
    sep_image s;
    sep_catalog *cat = NULL;
    hilal_sepw_object *out = NULL;
    *objs = NULL;
    *nobj = 0;

    hilal_status st = make_sep_image(im, &s, err);
    if (st != HILAL_OK)
        goto cleanup;
    if (im->var == NULL) {
        if (!(p->noise_sigma > 0.0) || !isfinite(p->noise_sigma)) {
            st = hilal_error_set(err, HILAL_ERR_INTERNAL,
                                 "source extraction needs the variance plane or a positive noise "
                                 "level (run background first)");
            goto cleanup;
        }
        s.noise_type = SEP_NOISE_STDDEV;
        s.noiseval = p->noise_sigma;
    }

    /* libsep writes its whole pixel stack (a free list of records of ~28
     * bytes) before it starts, in fresh memory at every call, while most
     * images use a small part of it: a first attempt has a stack of at most
     * SEPW_FIRST_PIXSTACK pixels, and only when that overflows does the
     * extraction run again with the full p->pixstack. The stack size
     * changes nothing but whether it overflows, so the catalogue is the
     * same. */
    size_t first = p->pixstack < SEPW_FIRST_PIXSTACK ? p->pixstack : SEPW_FIRST_PIXSTACK;
    int status = extract_with_stack(&s, p, first, &cat);
    if (status == SEPW_PIXSTACK_FULL && first < p->pixstack) {
        sep_catalog_free(cat);
        cat = NULL;
        status = extract_with_stack(&s, p, p->pixstack, &cat);
    }
    if (status != 0) {
        st = sepw_fail(status, "source extraction", p->pixstack, err);
        goto cleanup;
    }

    if (cat->nobj > 0) {
        out = calloc((size_t)cat->nobj, sizeof *out);
        if (out == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %d detections",
                                 cat->nobj);
            goto cleanup;
        }
    }
    for (int i = 0; i < cat->nobj; i++) {
        hilal_sepw_object *o = &out[i];
        o->x = cat->x[i];
        o->y = cat->y[i];
        o->x2 = cat->x2[i];
        o->y2 = cat->y2[i];
        o->xy = cat->xy[i];
        o->a = cat->a[i];
        o->b = cat->b[i];
        o->theta = cat->theta[i];
        o->cxx = cat->cxx[i];
        o->cyy = cat->cyy[i];
        o->cxy = cat->cxy[i];
        o->flux_iso = cat->flux[i];
        o->peak = cat->peak[i];
        o->xpeak = cat->xpeak[i];
        o->ypeak = cat->ypeak[i];
        o->npix = cat->npix[i];
        o->xmin = cat->xmin[i];
        o->xmax = cat->xmax[i];
        o->ymin = cat->ymin[i];
        o->ymax = cat->ymax[i];
        o->flags = (unsigned)(unsigned short)cat->flag[i];
    }
    *nobj = (size_t)cat->nobj;
    *objs = out;
    out = NULL;

cleanup:
    free(out);
    sep_catalog_free(cat);
    return st;
}

hilal_status hilal_sepw_sum_circle(const hilal_sepw_image *im, double x, double y, double r,
                                   double *sum, double *sumerr, unsigned *flags,
                                   hilal_error *err)
{
    sep_image s;
    hilal_status st = make_sep_image(im, &s, err);
    if (st != HILAL_OK)
        return st;
    double area = 0.0;
    short flag = 0;
    /* subpix 0: exact pixel/circle overlap. */
    int status = sep_sum_circle(&s, x, y, r, 0, 0, 0, sum, sumerr, &area, &flag);
    if (status != 0)
        return sepw_fail(status, "circular-aperture photometry", 0, err);
    if (im->var == NULL)
        *sumerr = 0.0;
    *flags = (unsigned)(unsigned short)flag;
    return HILAL_OK;
}

hilal_status hilal_sepw_flux_radius(const hilal_sepw_image *im, double x, double y, double rmax,
                                    double frac, double *radius, unsigned *flags,
                                    hilal_error *err)
{
    sep_image s;
    hilal_status st = make_sep_image(im, &s, err);
    if (st != HILAL_OK)
        return st;
    short flag = 0;
    /* subpix 5: SEP's default sampling of the pixel/annulus overlap. */
    int status = sep_flux_radius(&s, x, y, rmax, 0, 5, 0, NULL, &frac, 1, radius, &flag);
    if (status != 0)
        return sepw_fail(status, "flux-radius measurement", 0, err);
    *flags = (unsigned)(unsigned short)flag;
    return HILAL_OK;
}

hilal_status hilal_sepw_windowed(const hilal_sepw_image *im, double x, double y, double sig_px,
                                 double *xo, double *yo, unsigned *flags, hilal_error *err)
{
    sep_image s;
    hilal_status st = make_sep_image(im, &s, err);
    if (st != HILAL_OK)
        return st;
    short flag = 0;
    int niter = 0;
    /* subpix 11 as SExtractor uses for XWIN/YWIN. */
    int status = sep_windowed(&s, x, y, sig_px, 11, 0, xo, yo, &niter, &flag);
    if (status != 0)
        return sepw_fail(status, "windowed centroid", 0, err);
    *flags = (unsigned)(unsigned short)flag;
    return HILAL_OK;
}

const char *hilal_sepw_version(void)
{
    return sep_version_string;
}
