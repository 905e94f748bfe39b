/* The one image type of the pipeline: float32 pixels with a variance plane,
 * a mask plane and the metadata later stages need.
 *
 * Pixels are row-major: pixel (x, y) in 0-based C coordinates is
 * pix[y * nx + x]; the FITS 1-based pixel (X, Y) is C (X-1, Y-1).
 * Pixel values are in ADU as read (after BSCALE/BZERO), converted once to
 * float32 at ingest. Variance is in ADU^2. Masked pixels keep whatever value
 * they had (NaN for no-data pixels); stages must consult the mask.
 */
#ifndef HILAL_IMAGE_H
#define HILAL_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct wcsprm; /* wcslib's WCS parameters (wcslib/wcs.h) */

/* Mask bits. Values are part of the archive format: never renumber. */
enum hilal_mask_bit {
    HILAL_MASK_BAD = 1u << 0,       /* bad pixel (bad column, hot pixel, flagged by a bad-pixel map) */
    HILAL_MASK_SAT = 1u << 1,       /* at or above the saturation level, or bled from a saturated pixel */
    HILAL_MASK_NODATA = 1u << 2,    /* no data: NaN, Inf or the BLANK value in the file */
    HILAL_MASK_EDGE = 1u << 3,      /* within the edge margin, or outside the other image's coverage */
    HILAL_MASK_INTERP = 1u << 4,    /* value interpolated (resampling, filled before an FFT) */
    HILAL_MASK_CR = 1u << 5,        /* cosmic ray */
    HILAL_MASK_REFDEFECT = 1u << 6, /* defect in the reference at this position */
    HILAL_MASK_NEGVAR = 1u << 7     /* variance was not positive and was replaced */
};
typedef uint16_t hilal_mask_t;

/* Any of these bits means the pixel value must not be used as data. */
#define HILAL_MASK_UNUSABLE (HILAL_MASK_BAD | HILAL_MASK_SAT | HILAL_MASK_NODATA | HILAL_MASK_CR)

/* What ingest and later stages know about the image. Doubles are NaN when
 * unknown (never 0 as a placeholder). */
typedef struct hilal_meta {
    double gain_e_per_adu;  /* detector gain, e-/ADU */
    double rdnoise_e;       /* read noise, e- RMS */
    double saturate_adu;    /* saturation level, ADU (as in the file after scaling) */
    double exptime_s;       /* exposure time, s */
    double mjd;             /* MJD of mid-exposure (UTC) */
    double zeropoint_mag;   /* photometric zero point (mag for 1 ADU), NaN if unknown */
    char filter[32];        /* filter name, "" if unknown */
    char object[72];        /* OBJECT/FIELD value, "" if unknown */
    char path[1024];        /* file path as given by the user (without [ext] syntax) */
    int hdu;                /* 1-based HDU number the pixels came from (1 = primary) */
    char sha256[65];        /* hex SHA-256 of the whole file, "" if not computed */
    int bitpix;             /* BITPIX of the HDU in the file */
    double bscale, bzero;   /* scaling applied at ingest */
    struct wcsprm *wcs;     /* celestial WCS (owned), NULL when the header has none */
    char *header;           /* the HDU header as 80-char cards, NUL-terminated (owned), may be NULL */
    int nheader_cards;      /* number of cards in header */
} hilal_meta;

typedef struct hilal_image {
    long nx, ny;            /* NAXIS1 (columns), NAXIS2 (rows) */
    float *pix;             /* nx*ny pixel values, ADU */
    float *var;             /* nx*ny variance, ADU^2; NULL until the background stage makes it */
    hilal_mask_t *mask;     /* nx*ny mask bits (hilal_mask_bit) */
    float *sky;             /* nx*ny background map, ADU; NULL until the background stage makes it */
    double sky_rms_adu;     /* global background RMS, ADU; NaN until measured */
    hilal_meta meta;
} hilal_image;

/* Allocates an nx x ny image with pix = 0, mask = 0, var and sky NULL and all
 * metadata unknown (NaN / ""). Returns NULL (and sets err) on failure.
 * Free with hilal_image_free(). */
hilal_image *hilal_image_new(long nx, long ny, hilal_error *err);

/* Allocates (zeroed) the var or sky plane if it is NULL. */
hilal_status hilal_image_alloc_var(hilal_image *img, hilal_error *err);
hilal_status hilal_image_alloc_sky(hilal_image *img, hilal_error *err);

/* Deep copy (pixels, planes, metadata, WCS, header). NULL on failure. */
hilal_image *hilal_image_clone(const hilal_image *img, hilal_error *err);

/* Frees the image, its planes, WCS and header. Accepts NULL. */
void hilal_image_free(hilal_image *img);

/* Sets metadata fields to "unknown" (NaN, "", NULL). Does not free. */
void hilal_meta_init(hilal_meta *meta);

/* Copies metadata; the destination gets its own WCS and header copies.
 * dst must be initialised (it is cleared first). */
hilal_status hilal_meta_copy(hilal_meta *dst, const hilal_meta *src, hilal_error *err);

/* Frees what meta owns (WCS, header) and re-initialises it. */
void hilal_meta_clear(hilal_meta *meta);

/* Number of pixels whose mask has any of the given bits. */
size_t hilal_image_count_mask(const hilal_image *img, hilal_mask_t bits);

#ifdef __cplusplus
}
#endif
#endif
