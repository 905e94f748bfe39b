/* Candidates from the ZOGY products: detection on S_corr (stage "detect"),
 * measurement (stage "measure") and vetting (stage "vet").
 *
 * The stages call these functions; they are public so that other programs
 * (and the tests) can run one step on products they built themselves. All
 * positions are FITS 1-based science-frame pixels unless a name says
 * otherwise. The statistics and the real/bogus score are documented in
 * docs/vetting.md.
 */
#ifndef HILAL_DETECT_H
#define HILAL_DETECT_H

#include <stddef.h>

#include "hilal/frame.h"
#include "hilal/image.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Mask bits that veto a detection peak: the pixel value is unusable or lies
 * outside the usable area of the pair. */
#define HILAL_DETECT_VETO_MASK ((hilal_mask_t)(HILAL_MASK_UNUSABLE | HILAL_MASK_EDGE))

/* ---- detection --------------------------------------------------------- */

typedef struct hilal_detect_params {
    double thresh_sigma;    /* |S_corr| threshold, sigma (> 0) */
    double merge_radius_px; /* same-sign peaks closer than this merge into the stronger one;
                               0 = max(3, FWHM of P_D) */
    long edge_margin_px;    /* peaks closer than this to the border are ignored (>= 0) */
    size_t max_candidates;  /* keep at most this many (the most significant); >= 1 */
} hilal_detect_params;

/* Finds local extrema of S_corr (diff->scorr) with |S_corr| >= thresh_sigma,
 * positive (brightening) and negative (fading), ignoring pixels whose
 * diff->mask has a HILAL_DETECT_VETO_MASK bit (diff->mask may be NULL) and
 * pixels within edge_margin_px of the border. Same-sign peaks within the
 * merge radius of a stronger one are merged into it (flag
 * HILAL_CAND_MERGED). The result is sorted by decreasing |snr| (ties by
 * position), cand_id = 1..n, x/y at the peak pixel (FITS 1-based), snr the
 * signed S_corr there, flags set, every measured field NaN.
 * *cands is a malloc'd array the caller frees (NULL when *ncands == 0).
 * *nfound (may be NULL) receives the number of candidates before the cap, so
 * that the caller can warn when *ncands < *nfound. */
hilal_status hilal_detect_peaks(const hilal_diff *diff, const hilal_detect_params *params,
                                hilal_candidate **cands, size_t *ncands, size_t *nfound,
                                hilal_error *err);

/* ---- measurement ------------------------------------------------------- */

/* Value of a PSF image at offset (u_px, v_px) from its centre pixel, by
 * bicubic (Keys, a = -0.5) interpolation; 0 outside the image. Used to shift
 * P_D to a sub-pixel position. */
double hilal_measure_psf_value(const hilal_psf *psf, double u_px, double v_px);

/* Candidates indexed by position, to find the neighbours of one of them
 * (whose light must not be counted as its own). Fill with
 * hilal_neighbours_init(), release with hilal_neighbours_clear(). */
typedef struct hilal_neighbours {
    const hilal_candidate *cands; /* borrowed */
    size_t n;
    size_t *order;                /* indices sorted by y */
} hilal_neighbours;

hilal_status hilal_neighbours_init(hilal_neighbours *nb, const hilal_candidate *cands, size_t n,
                                   hilal_error *err);

/* Writes the 0-based positions (x, y pairs) of at most max candidates other
 * than candidate k that lie within radius_px of it into xy (2 max doubles);
 * returns how many. */
size_t hilal_neighbours_find(const hilal_neighbours *nb, size_t k, double radius_px, double *xy,
                             size_t max);

void hilal_neighbours_clear(hilal_neighbours *nb);

/* Shape of a compact source in img (nx x ny, row-major; mask may be NULL,
 * pixels with a HILAL_MASK_UNUSABLE bit are skipped) around the 0-based
 * position (x0, y0), from second moments with a circular Gaussian weight of
 * sigma_w_px, corrected for the weight assuming a Gaussian profile:
 * C = (M_w^-1 - W^-1)^-1. sign (+1 or -1) multiplies the pixels first (a
 * fading source is measured on -D). Pixels closer to one of the nothers
 * 0-based positions in others (x, y pairs; may be NULL) than to (x0, y0)
 * belong to those neighbours and are skipped. *fwhm_px = 2.3548 (det C)^(1/4)
 * and *elongation = a/b = sqrt(c1/c2) of C's eigenvalues; both NaN when the
 * weighted flux is not positive. Returns the weighted flux. */
double hilal_measure_shape(const float *img, long nx, long ny, const hilal_mask_t *mask,
                           double x0, double y0, double sign, double sigma_w_px,
                           const double *others, size_t nothers, double *fwhm_px,
                           double *elongation);

/* Gaussian sigma of the moment weight used on D for a given P_D, px:
 * weight_scale times P_D's sigma (from psf->fwhm_px, or from its second
 * moments when fwhm_px is not set). */
double hilal_measure_weight_sigma(const hilal_psf *psf_d, double weight_scale);

/* Measures candidates in place: sub-pixel position from a quadratic fit of
 * ln|S_corr| on the 3x3 pixels around the peak, flux and flux_err from
 * diff->flux/flux_err at that position (signed, science ADU), magnitude from
 * sci->meta.zeropoint_mag, ra/dec from sci->meta.wcs, FWHM and elongation
 * from hilal_measure_shape() on D with a weight of weight_scale x sigma(P_D)
 * (pixels nearer to another candidate left out), mjd from sci->meta.mjd.
 * sci is needed for its metadata (not its pixels). */
hilal_status hilal_measure_candidates(const hilal_diff *diff, const hilal_image *sci,
                                      double weight_scale, hilal_candidate *cands,
                                      size_t ncands, hilal_error *err);

/* ---- vetting ----------------------------------------------------------- */

/* Centres and widths of the real/bogus factors, and the geometry of the
 * vetting statistics. Defaults in the "vet" parameter table; meaning in
 * docs/vetting.md. */
typedef struct hilal_vet_params {
    double footprint_fwhm;  /* footprint radius in units of FWHM(P_D) (min 2 px) */
    double dipole_fwhm;     /* radius within which an opposite lobe's extremum is sought,
                               units of FWHM(P_D) */
    double search_radius_px;/* distances to saturated/masked pixels are capped here */
    double weight_scale;    /* moment weight (as measure.weight_scale) for FWHM(P_D) */
    double sharp_centre, sharp_width;     /* on the normalised sharpness z, at low S/N */
    double sharp_snr, sharp_floor;        /* above sharp_snr the centre shrinks as 1/|snr| */
    double img_sharp_snr;   /* peak-pixel S/N above which the science/reference image's own
                               sharpness counts */
    double narrow_centre, narrow_width;   /* on FWHM(D) / FWHM(P_D), too narrow */
    double narrow_snr, narrow_snr_width;  /* |snr| gate of the narrowness factor */
    double broad_centre, broad_width;     /* on FWHM(D) / FWHM(P_D), too broad */
    double elong_centre, elong_width;     /* on the elongation a/b */
    double elong_snr, elong_snr_width;    /* |snr| gate of the elongation factor */
    double dipole_centre, dipole_width;   /* on the dipole measure */
    double dipole_sigma, dipole_sigma_width; /* on the opposite lobe's |S_corr| */
    double negfrac_centre, negfrac_width; /* on neg_frac */
    double masked_centre, masked_width;   /* on masked_frac */
    double sat_radius_px, sat_width_px;   /* on dist_sat_px */
    double refdefect_factor;              /* multiplies rb when HILAL_CAND_REF_DEFECT */
    long tile_px;           /* side of the tiles for the S_corr noise check */
    double tile_tol;        /* flag BAD_TILE when |robust std(S_corr) - 1| exceeds this */
} hilal_vet_params;

/* Fills params with the defaults of the "vet" parameter table. */
void hilal_vet_params_default(hilal_vet_params *params);

/* Per-frame constants of P_D that the score needs. */
typedef struct hilal_vet_psfinfo {
    double fwhm_px;         /* FWHM of P_D measured like candidates (hilal_measure_shape) */
    double sharp_delta;     /* sharpness of a single-pixel event: sum(P_D^2) / P_D(0)^2 */
} hilal_vet_psfinfo;

/* Computes the P_D constants; HILAL_ERR_DATA when P_D is missing or empty. */
hilal_status hilal_vet_psfinfo_get(const hilal_psf *psf_d, double weight_scale,
                                   hilal_vet_psfinfo *info, hilal_error *err);

/* Centre of the sharpness factor for a candidate of S/N snr:
 * max(sharp_floor, sharp_centre min(1, sharp_snr / |snr|)). */
double hilal_vet_sharp_centre(const hilal_vet_params *params, double snr);

/* The factors of rb, in the order hilal_vet_score() reports them. */
enum hilal_vet_factor {
    HILAL_VET_F_SHARP = 0,  /* sharper than the PSF (cosmic ray, hot pixel) */
    HILAL_VET_F_NARROW,     /* FWHM on D much smaller than P_D's (bright enough to tell) */
    HILAL_VET_F_BROAD,      /* FWHM on D much larger than P_D's */
    HILAL_VET_F_ELONG,      /* elongated (bright enough to tell) */
    HILAL_VET_F_DIPOLE,     /* significant opposite-signed lobe */
    HILAL_VET_F_NEGFRAC,    /* many opposite-signed pixels in the footprint */
    HILAL_VET_F_MASKED,     /* masked footprint */
    HILAL_VET_F_SAT,        /* near a saturated pixel */
    HILAL_VET_F_REFDEFECT,  /* defect in the reference */
    HILAL_VET_NFACTORS
};

/* The real/bogus score of a candidate whose statistics and flags are set:
 * a product of logistic factors in [0, 1] (docs/vetting.md). Deterministic.
 * factors (may be NULL) receives the individual factors, indexed by
 * enum hilal_vet_factor. */
double hilal_vet_score(const hilal_vet_params *params, const hilal_vet_psfinfo *info,
                       const hilal_candidate *cand, double factors[HILAL_VET_NFACTORS]);

/* Computes the vetting statistics, flags and rb of measured candidates in
 * place. Uses frame->diff (d, scorr, mask, psf_d), the science mask
 * (saturation), and when frame has HILAL_PROD_ALIGNED the aligned reference
 * (its mask, and its pixels, sky and PSF for the reference-defect test). */
hilal_status hilal_vet_candidates(const hilal_frame *frame, const hilal_vet_params *params,
                                  hilal_candidate *cands, size_t ncands, hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
