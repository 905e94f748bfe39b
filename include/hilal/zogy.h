/* ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27).
 *
 * hilal_zogy_run() is the whole computation as one pure function: given a
 * science (new) image N and a reference R on the same pixel grid, their
 * PSFs, background noise and flux normalisation, it fills a hilal_diff with
 * the proper difference image D (eq. 13), its PSF P_D (eq. 14) and flux
 * normalisation F_D (eq. 15), the score S (eq. 17), the corrected score
 * S_corr (eq. 25) whose denominator holds the source noise (eqs. 26-29)
 * and astrometric noise (eqs. 30-31), and the PSF-photometry flux of a point
 * source at every pixel with its error (eqs. 41-43), in science ADU.
 * hilal_zogy_run_tiled() (pipeline/zogy_tiles.c) runs it on overlapping
 * windows, each with its own PSFs, when the PSF varies across the field,
 * and blends the products without seams; the subtract stage
 * (stages/subtract.c) and `hilal subtract` call that. Tests and benchmarks
 * can call either directly. docs/zogy.md gives every formula,
 * normalisation and convention.
 *
 * Conventions: F_r = 1 and F_n = flux_ratio (a star of flux f in reference
 * ADU has flux flux_ratio * f in science ADU). N = sci->pix - sci->sky,
 * R = ref->pix - ref->sky; sigma_N = sci->sky_rms_adu, sigma_R =
 * ref->sky_rms_adu. Pixels that are masked unusable (HILAL_MASK_UNUSABLE),
 * not finite, or have a variance >= 1e20 ADU^2 (the convention for masked
 * pixels) in either image are filled with 0 (the sky-subtracted sky level,
 * carrying no noise) in both images before any transform and flagged
 * HILAL_MASK_INTERP in diff.mask; D, S, S_corr and the flux are 0 there. The images are extended by mirror reflection to an FFT-friendly
 * size, so there is no wrap-around and no zero-padding step at the edges;
 * the variance and flux normalisation of pixels near the edges account
 * exactly for the reflected (hence correlated) noise.
 */
#ifndef HILAL_ZOGY_H
#define HILAL_ZOGY_H

#include "hilal/fft.h"
#include "hilal/frame.h"
#include "hilal/image.h"
#include "hilal/psf.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* FFT arrays kept between runs (four half-spectra of an M x M FFT grid,
 * transformed in place, about 4 x 4 M^2 bytes, and the fill map: ~300 MB
 * for a 4096 x 4096 frame): a run borrows a set of the size it needs and
 * gives it back, so that later frames neither allocate nor fault in fresh
 * pages. Thread-safe: concurrent runs get separate sets. Idle sets of a
 * size no longer asked for are freed. */
typedef struct hilal_zogy_workspace hilal_zogy_workspace;

/* *out = an empty workspace; HILAL_ERR_NOMEM. */
hilal_status hilal_zogy_workspace_new(hilal_zogy_workspace **out, hilal_error *err);

/* Frees the workspace and its arrays; no run may be using it. Accepts NULL. */
void hilal_zogy_workspace_free(hilal_zogy_workspace *ws);

typedef struct hilal_zogy_input {
    /* Science image N (borrowed). Used: pix, mask (may be NULL: none), sky
     * (NULL: pix is already background-subtracted), var (total variance,
     * ADU^2; NULL: background noise only) and sky_rms_adu (sigma_N; NaN or
     * <= 0: estimated from the pixels as 1.4826 * MAD, with a warning). */
    const hilal_image *sci;
    /* Reference R on the science grid (borrowed), same planes as sci. */
    const hilal_image *ref;
    /* P_n and P_r: odd-sized, centred on the central pixel; they are
     * normalised to sum 1 here (a non-positive sum is HILAL_ERR_DATA). */
    const hilal_psf *sci_psf;
    const hilal_psf *ref_psf;
    /* F_n with F_r = 1: science flux / reference flux of the same star.
     * Must be finite and > 0. Default 1. */
    double flux_ratio;
    /* Registration RMS between the images along x and y, science pixels
     * (sigma_x, sigma_y of eqs. 30-31). NaN or < 0 is taken as 0. Default 0. */
    double reg_rms_x_px, reg_rms_y_px;
    /* Threads for FFTs and pixel loops; 0 = one per processor. Default 0. */
    int threads;
    /* FFTW planning rigor. Default HILAL_FFT_ESTIMATE. */
    hilal_fft_rigor rigor;
    /* Mirror padding added beyond the larger of the kernel radius and the
     * PSF half-size, px. Default 8. */
    int pad_margin_px;
    /* Include the source noise V(S_N), V(S_R) from the variance planes
     * (eqs. 26-27). Default 1. With 0, or without variance planes, the
     * denominator of S_corr holds the background term only. */
    int source_noise;
    /* Include the astrometric noise (eqs. 30-31). Default 1 (it vanishes
     * anyway when reg_rms_x_px = reg_rms_y_px = 0). */
    int astrometric_noise;
    /* Noise calibration (docs/zogy.md): when the standard deviation s of
     * S_corr on source-free pixels of the window differs from 1 under the
     * white-noise model (noise the model does not describe: flat-field
     * structure fixed on the detector, unresolved sources, correlated noise),
     * the background term of V(S) becomes s^2 F_S instead of F_S, so S_corr
     * has unit variance again. Only applied when 1/calib_max_factor <= s <=
     * calib_max_factor (default 2); else left as it is, with a warning.
     * Default 0 (off: ZOGY as published). */
    int noise_calibration;
    double calib_max_factor;
    /* Window: compute the products only for the win_nx x win_ny pixels
     * starting at (win_x0, win_y0), 0-based, of the images; the products
     * then have that size. Image pixels around the window are used as data
     * as far as the kernels reach (mirror reflection only at the image
     * edges), so windows that overlap give the same values as a whole-image
     * run with the same PSFs, up to round-off. win_nx = win_ny = 0 (default):
     * the whole image. */
    long win_x0, win_y0, win_nx, win_ny;
    /* Smallest FFT size, px (0 = none, the default): windows of one frame can
     * share one FFTW plan this way. */
    long min_fft_nx, min_fft_ny;
    /* 1: a window in which every pixel is filled is not an error (all
     * products 0 there). Default 0: HILAL_ERR_DATA. */
    int allow_all_filled;
    /* Where the FFT arrays come from (borrowed; NULL, the default: allocated
     * and freed by the run). */
    hilal_zogy_workspace *workspace;
} hilal_zogy_input;

/* Fills *in with the defaults above and NULL images/PSFs. */
void hilal_zogy_input_init(hilal_zogy_input *in);

/* What the computation used and measured (for logs and provenance). */
typedef struct hilal_zogy_info {
    double sigma_n_adu, sigma_r_adu; /* background RMS used for N and R, ADU */
    int sigma_n_estimated, sigma_r_estimated; /* 1 when estimated from the pixels */
    double f_s;                      /* F_S (eq. 41) away from the edges = background variance of S */
    double f_d;                      /* F_D (eq. 15) */
    long fft_nx, fft_ny;             /* padded (FFT) size */
    int pad_px;                      /* minimum mirror padding on each side, px */
    int kernel_radius_px;            /* radius of the S kernels k_n, k_r, px */
    long n_filled;                   /* pixels filled (unusable in either image) */
    long n_negvar;                   /* usable pixels whose variance was not positive/finite */
    int threads;                     /* threads used */
    double scorr_median_model;       /* median of S_corr under the noise model (before calibration) */
    double scorr_std_model;          /* its 1.4826 MAD: the model's noise error factor */
    double noise_scale;              /* sqrt(kappa): the calibration factor applied (1: none) */
    double seconds;                  /* wall time */
} hilal_zogy_info;

/* Runs ZOGY. *out must be empty (zeroed or hilal_diff_clear()ed); on
 * success it owns malloc'd planes of sci->nx x sci->ny values (freed by
 * hilal_diff_clear()), on failure it is left empty. info may be NULL.
 *
 * out->d      D (eq. 13), unit variance for background-limited noise
 * out->s      S (eq. 17)
 * out->scorr  S_corr (eq. 25), in sigma; 0 at filled pixels
 * out->flux   F_n * S / F_S (eqs. 41-42): flux of a point source centred
 *             at the pixel, science ADU (positive: brighter in science)
 * out->flux_err  F_n * sqrt(V(S)) / F_S (eq. 43), science ADU, V(S) the
 *             denominator of S_corr squared
 * out->mask   science | reference mask, plus INTERP at filled pixels,
 *             NODATA at non-finite ones and NEGVAR where a usable pixel's
 *             variance was not positive and finite (replaced by sigma^2)
 * out->psf_d  P_D (eq. 14), odd size (the larger PSF size), sum 1
 * out->f_d    F_D (eq. 15)
 * out->scorr_mean, scorr_std  median and 1.4826 * MAD of S_corr on
 *             unfilled pixels away from sources (after the noise
 *             calibration, when on)
 * No output value is NaN or Inf.
 *
 * Errors: HILAL_ERR_MISMATCH (grids differ), HILAL_ERR_DATA (missing or
 * unusable PSF or pixels, bad flux ratio, all pixels unusable),
 * HILAL_ERR_NOMEM, HILAL_ERR_FFT. */
hilal_status hilal_zogy_run(const hilal_zogy_input *in, hilal_diff *out, hilal_zogy_info *info,
                            hilal_error *err);

/* P_D (eq. 14) of a pair of PSFs with background RMS sigma_n, sigma_r (ADU)
 * and flux ratio F_n (F_r = 1), as hilal_zogy_run() makes it: odd size
 * (the larger PSF size), sum 1, fwhm_px measured. out is cleared first.
 * HILAL_ERR_RANGE / HILAL_ERR_DATA / HILAL_ERR_NOMEM / HILAL_ERR_FFT. */
hilal_status hilal_zogy_psf_d(const hilal_psf *sci_psf, const hilal_psf *ref_psf, double sigma_n,
                              double sigma_r, double flux_ratio, hilal_psf *out, hilal_error *err);

/* Correlation coefficients, for background noise of RMS sigma_n and sigma_r,
 * between the scores S (eq. 17) of two ZOGY runs on the same images with
 * the PSF pairs a and b (and flux ratios F_n,a, F_n,b), and between their
 * difference images D (eq. 13): rho = Cov(X_a, X_b) / sqrt(Var X_a Var X_b)
 * at the same pixel, from the kernels (Parseval). 1 for identical inputs.
 * Used to blend overlapping tiles. HILAL_ERR_RANGE for non-positive noise
 * or flux ratios, HILAL_ERR_DATA for unusable PSFs. */
hilal_status hilal_zogy_correlation(const hilal_psf *sci_a, const hilal_psf *ref_a,
                                    const hilal_psf *sci_b, const hilal_psf *ref_b, double sigma_n,
                                    double sigma_r, double flux_ratio_a, double flux_ratio_b,
                                    double *rho_s, double *rho_d, hilal_error *err);

/* Median and 1.4826 MAD of diff->scorr over the nx x ny region at (x0, y0)
 * (0-based) of the difference, using the pixels not masked unusable or
 * INTERP (HILAL_MASK_UNUSABLE | HILAL_MASK_INTERP in diff->mask) and farther
 * than radius_px (Chebyshev) from any such pixel with |S_corr| > 5; all of
 * them when fewer than min(1000, a quarter of the region) remain. NaN when
 * no pixel is usable. *nused = values used (may be NULL). threads: 0 = one
 * per processor. HILAL_ERR_RANGE for a region outside the difference,
 * HILAL_ERR_NOMEM. */
hilal_status hilal_diff_scorr_stats(const hilal_diff *diff, long x0, long y0, long nx, long ny,
                                    long radius_px, int threads, double *median, double *std,
                                    long *nused, hilal_error *err);

/* ------------------------------------------------------------------------
 * Tiles: a PSF that varies across the field (docs/zogy.md, "Tiles")
 * ------------------------------------------------------------------------ */

typedef struct hilal_zogy_tiling {
    /* Nominal side of a tile, px: the frame is cut into round(n / tile_px)
     * tiles along each axis (at least 1). 0: always one piece. Default 512. */
    long tile_px;
    /* Width of the band over which neighbouring tiles are blended, px
     * (limited to half the smallest tile). 0, or at least the tile size:
     * the products are interpolated linearly between the tile centres, each
     * tile's window reaching its neighbours' centres, so that a PSF that
     * changes linearly between them leaves no residual to first order.
     * Default 0. */
    long overlap_px;
    /* Tiles are used only when the FWHM of the PSF model of either image
     * varies across the tiles by more than this fraction ((max - min) /
     * median); 0: whenever there is more than one tile and a model. Default
     * 0.05. */
    double min_vary;
    /* The PSF of each image across the field: the residuals of up to
     * psf_max_stars usable stars (with the PSF stage's S/N) against the
     * whole-frame PSF, fitted at each tile centre by a polynomial regression
     * of degree psf_degree (0..2) in the star positions, weighted by a
     * Gaussian of the distance with a standard deviation of psf_scale tile
     * spacings (0: unweighted, one polynomial for the whole field). At least
     * 20 stars are needed for a model. Defaults 2, 0 and 500. */
    int psf_degree;
    double psf_scale;
    int psf_max_stars;
    /* A tile with fewer PSF stars of an image than this within 1.5 tile
     * spacings of its centre uses that image's whole-frame PSF (recorded):
     * the model is not constrained there. Default 5. */
    int min_stars;
    /* Tiles whose final S_corr standard deviation is outside this range are
     * flagged bad (hilal_diff_tile.bad). Default 0.8, 1.25. */
    double scorr_std_min, scorr_std_max;
    /* Match radius for the per-tile registration RMS and flux ratio, px.
     * Default 1.5. */
    double match_radius_px;
    /* 1: F_n is measured again with the tile PSFs (each star pair with the
     * PSFs of its tile) and used for every tile; 0: the input's F_n is used.
     * Default 1. */
    int refit_flux_ratio;
} hilal_zogy_tiling;

/* Fills t with the defaults above. */
void hilal_zogy_tiling_default(hilal_zogy_tiling *t);

typedef struct hilal_zogy_tiled_info {
    hilal_zogy_info zogy;        /* the whole-frame run, or the first tile's with the times and
                                    pixel counts of all tiles summed */
    int tiled;                   /* 1 when tiles were used */
    double fwhm_vary_sci, fwhm_vary_ref; /* measured FWHM variation (NaN: not measured) */
    double flux_ratio;           /* F_n used (measured again with the tile PSFs when tiled) */
    int flux_ratio_nstars;       /* stars behind it when measured again (0: the input's) */
    long ntiles, ntiles_fallback, ntiles_bad; /* tiles, with whole-frame PSFs, flagged bad */
    double seconds;              /* wall time, PSFs and blending included */
} hilal_zogy_tiled_info;

/* ZOGY with PSFs that vary across the field. in holds the whole frame (no
 * window), its whole-frame PSFs, flux ratio, registration RMS and options;
 * sci_stars and ref_stars the star lists of the science image and the
 * aligned reference (science pixels, FITS 1-based; NULL: one piece);
 * psf_params how to build the tile PSFs (NULL: the defaults). The grid and
 * the decision to use it follow `tiling`; each tile gets PSFs built from
 * the stars of its window (hilal_psf_build), F_n is measured again with
 * them, ZOGY runs on the overlapping windows and the products are blended
 * so that D, S_corr and the flux have no seams: the flux linearly, its
 * variance with the correlation of the tiles' estimates, S_corr = flux /
 * flux_err (docs/zogy.md). out receives the frame-size products like
 * hilal_zogy_run() plus the tile records (out->tiles; one record covering
 * the frame when it was done in one piece); psf_d is P_D of the whole-frame
 * PSFs. info may be NULL. Errors as hilal_zogy_run(), with the tile named. */
hilal_status hilal_zogy_run_tiled(const hilal_zogy_input *in, const hilal_zogy_tiling *tiling,
                                  const hilal_starlist *sci_stars,
                                  const hilal_starlist *ref_stars,
                                  const hilal_psf_build_params *psf_params, hilal_diff *out,
                                  hilal_zogy_tiled_info *info, hilal_error *err);

/* The tile record whose core holds the FITS 1-based science pixel (x, y);
 * NULL when the difference has no tile records or the pixel is outside it.
 * A candidate at (x, y) deserves HILAL_CAND_BAD_TILE when the record's
 * `bad` is set. */
const hilal_diff_tile *hilal_diff_tile_at(const hilal_diff *diff, double x, double y);

#ifdef __cplusplus
}
#endif
#endif
