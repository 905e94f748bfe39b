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
 * The subtract stage (stages/subtract.c) and `hilal subtract` call it;
 * tests and benchmarks can call it directly. docs/zogy.md gives every
 * formula, normalisation and convention.
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
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

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

#ifdef __cplusplus
}
#endif
#endif
