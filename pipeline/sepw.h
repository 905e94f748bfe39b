/* Private wrapper around libsep (SEP, Barbary 2016, JOSS 1, 58: the
 * SExtractor algorithms of Bertin & Arnouts 1996 as a C library).
 *
 * This is the one place libsep is called. Its integer status codes and its
 * error-detail text (sep_get_errmsg / sep_get_errdetail) are translated into
 * hilal_error messages here, with advice on which configuration key to
 * change. Callers pass plain float32 planes; nothing here knows about
 * frames or stages.
 *
 * Coordinates are SEP's: 0-based, the centre of the first pixel is (0, 0).
 *
 * Thread safety: every function may run concurrently on different images
 * (libsep >= 1.2 keeps its working state per call or per thread). The one
 * process-wide libsep setting, the extraction pixel-stack size, is changed
 * only while no other extraction runs (see hilal_sepw_extract).
 *
 * Known libsep defect: sep_extract() in libsep 1.2 (Debian 12) allocates
 * its catalogue's flux and cflux arrays twice and frees only the second
 * pair, losing 8 bytes per detected object per call (found with
 * LeakSanitizer; nothing outside the library can free them). Sanitizer
 * runs need the suppression "leak:libsep.so".
 */
#ifndef HILAL_SEPW_H
#define HILAL_SEPW_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/status.h"

/* Object and aperture flags (the values of libsep's SEP_OBJ_* and
 * SEP_APER_*, checked at compile time in sepw.c). */
#define HILAL_SEPW_OBJ_MERGED 0x0001u       /* result of deblending */
#define HILAL_SEPW_OBJ_TRUNC 0x0002u        /* truncated at the image border */
#define HILAL_SEPW_OBJ_SINGU 0x0008u        /* singular moments */
#define HILAL_SEPW_APER_TRUNC 0x0010u       /* aperture off the image */
#define HILAL_SEPW_APER_HASMASKED 0x0020u   /* masked pixels in the aperture */
#define HILAL_SEPW_APER_ALLMASKED 0x0040u   /* all aperture pixels masked */
#define HILAL_SEPW_APER_NONPOSITIVE 0x0080u /* non-positive sum where one was needed */

/* An image as SEP sees it: borrowed planes, all nx*ny, row-major. */
typedef struct hilal_sepw_image {
    const float *data;    /* pixel values; must be finite where not masked */
    const float *var;     /* per-pixel variance (ADU^2), or NULL */
    const uint8_t *mask;  /* values above mask_level = ignore this pixel, or NULL */
    long nx, ny;
    int mask_level;       /* 0 (default): any non-zero mask value masks the pixel */
} hilal_sepw_image;

/* Mesh background (SExtractor's algorithm: per-mesh clipped mode estimate,
 * median filter over filter_size x filter_size meshes, bicubic spline
 * interpolation between mesh centres). Masked pixels are ignored.
 * Fills sky and rms (nx*ny each, caller-allocated; rms may be NULL) and the
 * global background level and RMS (means over meshes). */
hilal_status hilal_sepw_background(const hilal_sepw_image *im, int mesh_px, int filter_size,
                                   float *sky, float *rms, double *global_sky,
                                   double *global_rms, hilal_error *err);

/* One extracted object. */
typedef struct hilal_sepw_object {
    double x, y;              /* barycentre, 0-based px */
    double x2, y2, xy;        /* second moments, px^2 */
    double a, b, theta;       /* ellipse semi-axes (px) and angle (rad from +x) */
    double cxx, cyy, cxy;     /* ellipse coefficients */
    double flux_iso;          /* sum of isophotal pixels (unfiltered), ADU */
    double peak;              /* highest unfiltered pixel, ADU */
    int xpeak, ypeak;         /* its position, 0-based */
    int npix;                 /* isophotal area, px */
    int xmin, xmax, ymin, ymax;
    unsigned flags;           /* SEP_OBJ_* bits */
} hilal_sepw_object;

typedef struct hilal_sepw_extract_params {
    double thresh_sigma;      /* threshold in units of sqrt(var) (var must be given) */
    int minarea;              /* minimum isophotal area, px */
    int filter;               /* 1: smooth with SExtractor's 3x3 pyramid kernel first */
    int deblend_nthresh;      /* deblending sub-thresholds */
    double deblend_cont;      /* minimum contrast of a deblended branch */
    int clean;                /* 1: clean spurious detections near bright objects */
    double clean_param;       /* cleaning efficiency */
    size_t pixstack;          /* largest SEP pixel stack (active pixels held at once); a
                                 smaller one is tried first (hilal_sepw_extract) */
    double noise_sigma;       /* per-pixel noise, ADU, used when the image has no var plane */
} hilal_sepw_extract_params;

/* Source extraction on a background-subtracted image with im->var as the
 * per-pixel noise, or, when im->var is NULL, the constant p->noise_sigma
 * (which must then be positive). *objs receives a malloc'd array of *nobj
 * objects (NULL when none); the caller frees it. */
hilal_status hilal_sepw_extract(const hilal_sepw_image *im, const hilal_sepw_extract_params *p,
                                hilal_sepw_object **objs, size_t *nobj, hilal_error *err);

/* Exact circular-aperture sum at (x, y), radius r px. Masked pixels are
 * replaced by their mirror image through the centre (SExtractor's
 * "correct" mask mode). *sumerr from im->var when given (else 0).
 * *flags receives SEP_APER_* bits. */
hilal_status hilal_sepw_sum_circle(const hilal_sepw_image *im, double x, double y, double r,
                                   double *sum, double *sumerr, unsigned *flags,
                                   hilal_error *err);

/* Radius enclosing the fraction frac of the flux inside rmax (px). */
hilal_status hilal_sepw_flux_radius(const hilal_sepw_image *im, double x, double y, double rmax,
                                    double frac, double *radius, unsigned *flags,
                                    hilal_error *err);

/* SExtractor's windowed (Gaussian-weighted, iterated) centroid, with
 * Gaussian sigma sig_px; (*xo, *yo) is the refined centre. */
hilal_status hilal_sepw_windowed(const hilal_sepw_image *im, double x, double y, double sig_px,
                                 double *xo, double *yo, unsigned *flags, hilal_error *err);

/* The libsep version string ("1.2.1"). */
const char *hilal_sepw_version(void);

#endif
