/* A frame in flight: the science exposure, its reference, and every product
 * the stages add to it.
 *
 * Stages never modify their inputs (unless their descriptor says
 * HILAL_STAGE_INPLACE); they fill the fields of the products they make and
 * set the product's bit in `products`. The runner checks before the first
 * frame that every stage's needs are made by an earlier stage.
 *
 * Coordinates in products are FITS 1-based science-frame pixels unless a
 * field says otherwise.
 */
#ifndef HILAL_FRAME_H
#define HILAL_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/image.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Products, one bit each. hilal_product_name() gives their names. */
enum hilal_product {
    HILAL_PROD_SCIENCE = 1u << 0,    /* frame->sci read */
    HILAL_PROD_REFERENCE = 1u << 1,  /* frame->ref read (reference's own grid) */
    HILAL_PROD_BACKGROUND = 1u << 2, /* sky map, sky RMS and variance planes of sci and ref */
    HILAL_PROD_STARS = 1u << 3,      /* star catalogues of sci and ref */
    HILAL_PROD_ALIGNED = 1u << 4,    /* frame->ref resampled onto the science grid */
    HILAL_PROD_PSF = 1u << 5,        /* PSFs of sci and (aligned) ref */
    HILAL_PROD_FLUXSCALE = 1u << 6,  /* flux ratio between sci and ref */
    HILAL_PROD_DIFFERENCE = 1u << 7, /* ZOGY products (frame->diff) */
    HILAL_PROD_CANDIDATES = 1u << 8, /* detections on S_corr */
    HILAL_PROD_MEASURED = 1u << 9,   /* candidate flux, position, shape */
    HILAL_PROD_VETTED = 1u << 10,    /* candidate vetting statistics and rb */
    HILAL_PROD_ARCHIVED = 1u << 11   /* candidates written to the archive */
};
#define HILAL_PROD_COUNT 12

/* Name of a single product bit ("science", "psf", ...), "?" if not a product. */
const char *hilal_product_name(unsigned bit);

/* One star measured in an image. */
typedef struct hilal_star {
    double x, y;            /* centroid, FITS 1-based pixels of the image it was found in */
    double flux_adu;        /* background-subtracted flux, ADU */
    double flux_err_adu;    /* its 1-sigma error, ADU */
    double peak_adu;        /* peak above background, ADU */
    double a_px, b_px;      /* semi-major/minor axes (second moments), px */
    double theta_rad;       /* position angle of a, radians from +x */
    double fwhm_px;         /* FWHM estimate, px */
    unsigned flags;         /* SEP object flags */
    int usable;             /* isolated, unsaturated, unmasked: fit for PSF and matching */
} hilal_star;

typedef struct hilal_starlist {
    size_t n;
    hilal_star *stars;      /* owned; sorted by decreasing flux */
} hilal_starlist;

/* An empirical PSF: a normalised (sum 1) pixel image, odd size, centred on
 * the central pixel (size/2, size/2) in 0-based coordinates. */
typedef struct hilal_psf {
    int size;               /* side, px (odd) */
    float *data;            /* size*size, owned */
    double fwhm_px;         /* FWHM measured on the PSF, px */
    int nstars;             /* stars that went into it (0 for a model) */
} hilal_psf;

/* What the subtraction measured in one tile of the science frame
 * (docs/zogy.md, "Tiles"). The cores of the tiles partition the frame; ZOGY
 * ran on the tile's window, which reaches into its neighbours (the products
 * are blended there). A frame subtracted in one piece has one tile covering
 * it. */
typedef struct hilal_diff_tile {
    long x0, y0, nx, ny;        /* core, 0-based science pixels */
    long wx0, wy0, wnx, wny;    /* window ZOGY ran on, 0-based science pixels */
    double fwhm_sci_px, fwhm_ref_px, fwhm_d_px; /* PSF FWHMs used (science, reference, P_D) */
    int nstars_sci, nstars_ref; /* stars in those PSFs (0 for an analytic model) */
    int psf_whole_frame;        /* 1: too few stars in the tile, the whole-frame PSFs were used */
    double flux_ratio;          /* F_n used in the tile */
    double flux_ratio_tile;     /* F_n measured from the stars of the tile alone (NaN: too few) */
    int flux_ratio_nstars;      /* stars behind flux_ratio_tile */
    double reg_rms_x_px, reg_rms_y_px; /* registration RMS of the stars of the tile (NaN: < 3) */
    int reg_nmatch;             /* matched star pairs behind them */
    double scorr_std_model;     /* std of S_corr in the window under the white-noise model */
    double noise_scale;         /* calibration factor applied to the background noise of S (1: none) */
    double scorr_median, scorr_std; /* median and 1.4826 MAD of the final S_corr in the core,
                                       away from sources and masked pixels */
    int bad;                    /* scorr_std outside the accepted range: candidates here get
                                   HILAL_CAND_BAD_TILE */
} hilal_diff_tile;

/* ZOGY products on the science grid (Zackay, Ofek & Gal-Yam 2016). */
typedef struct hilal_diff {
    long nx, ny;
    float *d;               /* proper difference image D (eq. 13), normalised to unit variance */
    float *s;               /* score S (eq. 17) */
    float *scorr;           /* corrected score S_corr (eq. 25), in sigma */
    float *flux;            /* PSF-photometry flux of a transient, science ADU (eq. 41-42) */
    float *flux_err;        /* its 1-sigma error, science ADU (eq. 43) */
    hilal_mask_t *mask;     /* union of science and aligned-reference masks, plus EDGE/INTERP */
    hilal_psf psf_d;        /* P_D (eq. 14) */
    double f_d;             /* F_D, flux normalisation of D (eq. 15) */
    double scorr_mean, scorr_std; /* robust statistics of S_corr on unmasked, source-free pixels */
    long ntiles_x, ntiles_y; /* tile grid (1 x 1 for a frame subtracted in one piece) */
    hilal_diff_tile *tiles;  /* ntiles_x * ntiles_y records, row-major (ty * ntiles_x + tx),
                                owned; NULL when the subtraction did not record tiles */
} hilal_diff;

/* Candidate flags (bits; values are part of the archive format). */
enum hilal_cand_flag {
    HILAL_CAND_NEAR_SAT = 1u << 0,     /* within the vetting radius of a saturated pixel */
    HILAL_CAND_NEAR_MASK = 1u << 1,    /* masked pixels within the PSF footprint */
    HILAL_CAND_EDGE = 1u << 2,         /* within the edge margin or truncated stamp */
    HILAL_CAND_REF_DEFECT = 1u << 3,   /* reference has a defect at the position */
    HILAL_CAND_DIPOLE = 1u << 4,       /* dipole-like residual (misalignment) */
    HILAL_CAND_SHARP = 1u << 5,        /* sharper than the PSF (cosmic ray, hot pixel) */
    HILAL_CAND_MERGED = 1u << 6,       /* close peaks were merged into this one */
    HILAL_CAND_BAD_TILE = 1u << 7      /* S_corr of its tile is far from unit variance */
};

typedef struct hilal_candidate {
    int64_t cand_id;        /* unique in an archive; 1-based index in the frame until archived */
    double x, y;            /* sub-pixel position, FITS 1-based science pixels */
    double ra, dec;         /* degrees, NaN without WCS */
    double snr;             /* signed S_corr peak: negative for fading */
    double flux, flux_err;  /* signed PSF flux and error, science ADU */
    double mag, mag_err;    /* AB-like magnitude of |flux| with the zero point; NaN without */
    double fwhm;            /* FWHM on D, px */
    double elongation;      /* a/b on D */
    double rb;              /* real/bogus score in [0, 1] (1 = real) */
    uint32_t flags;         /* hilal_cand_flag bits */
    double mjd;             /* of the science frame */
    /* Vetting statistics (documented in docs/vetting.md) */
    double sharpness;       /* peak-to-PSF-fit ratio: ~1 for point sources, >>1 for cosmic rays */
    double neg_frac;        /* fraction of negative-signed pixels in the footprint */
    double dipole;          /* |sum(+) + sum(-)| / (|sum(+)| + |sum(-)|) style dipole measure */
    double dist_sat_px;     /* distance to nearest saturated pixel, px (large if none) */
    double dist_mask_px;    /* distance to nearest masked pixel, px */
    double masked_frac;     /* masked fraction within the footprint */
} hilal_candidate;

/* A frame in flight. */
typedef struct hilal_frame {
    char frame_id[64];      /* name used in messages and archives */
    char sci_path[1024];    /* science input (CFITSIO syntax allowed) */
    int sci_hdu;            /* 0 = first image HDU with data, else 1-based HDU */
    char ref_path[1024];    /* reference input */
    int ref_hdu;
    unsigned products;      /* hilal_product bits made so far */

    hilal_image *sci;       /* SCIENCE */
    hilal_image *ref;       /* REFERENCE, then ALIGNED (replaced by the resampled one) */
    hilal_starlist sci_stars, ref_stars;    /* STARS */
    hilal_psf sci_psf, ref_psf;             /* PSF */
    double flux_ratio;      /* FLUXSCALE: F_r/F_n... science flux = flux_ratio * reference flux */
    double flux_ratio_err;
    int flux_ratio_nstars;
    double reg_rms_x_px, reg_rms_y_px;      /* ALIGNED: registration RMS, 0 when exactly aligned */
    hilal_diff diff;        /* DIFFERENCE */
    hilal_candidate *cands; /* CANDIDATES: owned array */
    size_t ncands;
    double stage_seconds[32]; /* wall time per stage, indexed like the stage list */
} hilal_frame;

/* Initialises an empty frame (no products). */
void hilal_frame_init(hilal_frame *frame);

/* Frees everything the frame owns and re-initialises it. */
void hilal_frame_clear(hilal_frame *frame);

void hilal_psf_clear(hilal_psf *psf);
void hilal_starlist_clear(hilal_starlist *list);
void hilal_diff_clear(hilal_diff *diff);

#ifdef __cplusplus
}
#endif
#endif
