/* Registration of a reference image onto a science image's pixel grid.
 *
 * The transform from science pixels to reference pixels is, in order:
 *   1. a first guess: the composition of the two WCS (science pixel -> sky
 *      with the science WCS -> reference pixel with the reference WCS), or,
 *      when either frame lacks a usable WCS, a translation found by FFT
 *      phase correlation;
 *   2. a correction measured by matching the two star catalogues: a
 *      polynomial displacement A(s) = s + c(s) of the science position
 *      (affine, or quadratic with enough stars), fitted with sigma clipping,
 *      applied before the first guess: reference = guess(A(s)).
 * The reference is resampled through that transform with a Lanczos3 kernel
 * (flux-conserving: scaled by the local pixel-area ratio), its variance
 * (as the white-noise-equivalent variance of the resampled image) and mask
 * propagated. Pairs already on one grid are left untouched. The full
 * description, tolerances and measured accuracy are in docs/align.md.
 *
 * Coordinates are FITS 1-based pixels.
 */
#ifndef HILAL_ALIGN_H
#define HILAL_ALIGN_H

#include "hilal/frame.h"
#include "hilal/image.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Settings; the [align] configuration section holds one key per field
 * (same names) with the defaults of hilal_align_opts_default(). */
typedef struct hilal_align_opts {
    int order;                   /* highest order of the star-fit correction: 1 affine,
                                    2 quadratic */
    int order2_min_matches;      /* quadratic terms only with at least this many matches */
    double match_radius_px;      /* final match radius, px */
    double search_radius_px;     /* largest first-guess error searched by the offset vote, px */
    int max_stars;               /* brightest stars used from each catalogue */
    int min_matches;             /* fewer matches: the pair cannot be registered by stars */
    double clip_sigma;           /* sigma clipping of the fit, robust sigma */
    double identity_tol_px;      /* same-size pair whose transform moves no pixel by more than
                                    this is not resampled */
    long grid_step_px;           /* initial node spacing of the transform grid, px */
    double grid_tol_px;          /* largest bilinear interpolation error of the grid, px */
    double mask_weight;          /* kernel weights below this do not propagate input masks */
    double min_overlap_frac;     /* least fraction of science pixels the reference must cover */
    double fallback_rms_px;      /* registration RMS assumed when the WCS is used without
                                    enough star matches, px */
    long phasecorr_max_side_px;  /* images are block-averaged to at most this size for phase
                                    correlation */
    double phasecorr_min_snr;    /* least significance of the phase-correlation peak */
    int threads;                 /* resampling threads (0 = one per core) */
    int prealigned;              /* 1: the pair is already on one pixel grid (e.g. survey
                                    alert stamps): no WCS or phase-correlation guess, the
                                    identity is checked by the stars when they suffice, else
                                    used with fallback_rms_px */
} hilal_align_opts;

/* The documented defaults (docs/align.md). */
void hilal_align_opts_default(hilal_align_opts *opts);

/* How the first guess was found. */
typedef enum hilal_align_method {
    HILAL_ALIGN_METHOD_WCS = 0,      /* both frames have a usable celestial WCS */
    HILAL_ALIGN_METHOD_PHASECORR = 1, /* at least one has none: FFT phase correlation */
    HILAL_ALIGN_METHOD_GIVEN = 2      /* align.prealigned: the identity, as configured */
} hilal_align_method;

/* What the registration found (NaN where not measured). */
typedef struct hilal_align_info {
    hilal_align_method method;
    int identity;            /* 1: the pair was already on one grid, nothing resampled */
    int nmatch;              /* star matches kept by the clipped fit (0: none used) */
    int fit_order;           /* order of the correction: 0 shift, 1 affine, 2 quadratic, chosen
                                by the Bayesian information criterion up to opts.order
                                (-1: no star fit) */
    double rms_x_px, rms_y_px; /* registration RMS = frame->reg_rms_x_px / reg_rms_y_px */
    double dx_px, dy_px;     /* reference minus science position at the science centre */
    double rotation_deg;     /* rotation of the reference pixel axes relative to the science ones
                                at the centre (counter-clockwise) */
    double scale;            /* linear size of a science pixel in reference pixels, at the centre */
    double pc_dx_px, pc_dy_px, pc_snr; /* phase-correlation result (NaN with WCS) */
    long grid_step_px;       /* node spacing used */
    double grid_err_px;      /* largest bilinear error of the grid (at cell centres), px */
    double coverage_frac;    /* fraction of science pixels with reference data */
    double mean_w2;          /* mean sum of squared kernel weights: per-pixel variance of the
                                resampled noise / var plane (0.798 for random phases) */
    int nref_stars;          /* reference stars carried onto the science grid */
} hilal_align_info;

/* Registers ref onto the grid of sci.
 *
 * sci_stars, ref_stars: the catalogues of each image in its own pixels
 * (sorted brightest first; `usable` stars preferred for matching).
 * On success:
 *   *ref_out is the resampled reference on the science grid (a new image:
 *     pixels, var and sky scaled by the pixel-area ratio, mask propagated,
 *     uncovered pixels NODATA|EDGE with NaN pixels and var 1e30, the
 *     science WCS, the other metadata of the reference), or NULL when the
 *     pair was already on one grid (the reference is then usable as is);
 *   *ref_stars_out holds the reference stars in science pixels (those off
 *     the science grid dropped; shape parameters transformed), caller-owned
 *     (free with hilal_starlist_clear());
 *   *info (may be NULL) says what was done.
 * Errors: HILAL_ERR_DATA naming both files when the images do not overlap
 * (or overlap less than min_overlap_frac), or when a pair without WCS cannot
 * be matched; HILAL_ERR_NOMEM. Logs a warning when a frame has no usable WCS,
 * or when the WCS is used without enough star matches. On error nothing is
 * allocated and the outputs are NULL / empty. */
hilal_status hilal_align_pair(const hilal_image *sci, const hilal_image *ref,
                              const hilal_starlist *sci_stars, const hilal_starlist *ref_stars,
                              const hilal_align_opts *opts, hilal_image **ref_out,
                              hilal_starlist *ref_stars_out, hilal_align_info *info,
                              hilal_error *err);

/* Registration RMS of two catalogues that are already in the same pixels
 * (e.g. frame->sci_stars and the aligned frame->ref_stars), restricted to
 * science stars inside [x0, x1] x [y0, y1] (FITS pixels): each usable star
 * is paired with its nearest counterpart within radius_px (mutual nearest
 * neighbours); the residuals are clipped at 3 robust sigma about their
 * median and the RMS of x and y residuals returned. *nmatch = pairs kept.
 * HILAL_ERR_DATA when fewer than 3 pairs remain. For per-tile statistics. */
hilal_status hilal_align_region_rms(const hilal_starlist *sci_stars,
                                    const hilal_starlist *ref_stars, double x0, double y0,
                                    double x1, double y1, double radius_px, double *rms_x_px,
                                    double *rms_y_px, int *nmatch, hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
