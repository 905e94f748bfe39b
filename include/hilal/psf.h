/* Point-spread functions: analytic models, the empirical PSF built from the
 * stars of an image, its FWHM, and PSF-fit photometry.
 *
 * A hilal_psf (frame.h) is a normalised (sum 1) pixel image of odd side,
 * centred on its central pixel (size/2, size/2) in 0-based coordinates.
 * Its values are pixel-integrated: PSF pixel (i, j) is the fraction of a
 * point source's flux that falls in the detector pixel offset by
 * (i - size/2, j - size/2) from the pixel holding the source, for a source
 * at that pixel's centre. This is the P_n / P_r of Zackay, Ofek & Gal-Yam
 * (2016, ApJ 830, 27), section 2.
 *
 * Coordinates: functions that take positions on an image say whether they
 * are 0-based C coordinates (pixel centres at integers, first pixel 0) or
 * FITS 1-based ones (first pixel 1), as in image.h.
 */
#ifndef HILAL_PSF_H
#define HILAL_PSF_H

#include <stddef.h>

#include "hilal/frame.h"
#include "hilal/image.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Analytic radial profiles. */
typedef enum hilal_psf_model {
    /* I(r) = exp(-r^2 / (2 sigma^2)), FWHM = 2 sqrt(2 ln 2) sigma */
    HILAL_PSF_GAUSSIAN = 0,
    /* I(r) = (1 + (r/alpha)^2)^(-beta) (Moffat 1969), FWHM = 2 alpha sqrt(2^(1/beta) - 1);
     * needs beta > 1 for a finite total flux */
    HILAL_PSF_MOFFAT = 1
} hilal_psf_model;

/* Adds a pixel-integrated star of total flux `flux` (over the infinite
 * plane) centred at (x0, y0), 0-based C coordinates, to the nx x ny image
 * img. Pixels farther than radius_px from the centre are not touched
 * (radius_px <= 0: 8 FWHM). Gaussians are integrated exactly (error
 * functions); Moffat profiles by sub-pixel sampling (11 x 11 per pixel
 * within 3 FWHM, 3 x 3 beyond). beta is ignored for Gaussians. */
void hilal_psf_render(float *img, long nx, long ny, double x0, double y0, double flux,
                      hilal_psf_model model, double fwhm_px, double beta, double radius_px);

/* Makes an analytic PSF of odd side `size` (>= 3) centred on the central
 * pixel, pixel-integrated and normalised to sum 1 over the stamp. Frees what
 * psf held. fwhm_px is set to the model FWHM, nstars to 0.
 * HILAL_ERR_RANGE for an even or too small size, fwhm_px <= 0, or a
 * Moffat beta <= 1. */
hilal_status hilal_psf_make_model(hilal_psf *psf, hilal_psf_model model, int size,
                                  double fwhm_px, double beta, hilal_error *err);

/* PSF side for a given FWHM: 2 * ceil(half_size_fwhm * fwhm_px) + 1,
 * clipped to [size_min, size_max] and forced odd (size_min rounded up,
 * size_max down, to odd numbers). */
int hilal_psf_size_for_fwhm(double fwhm_px, double half_size_fwhm, int size_min, int size_max);

/* FWHM (px) of a compact source in a background-subtracted nx x ny image
 * near (x0, y0), 0-based, looking no farther than rmax_px from it:
 *  1. the peak is the maximum of the Lanczos interpolant of the image
 *     within 0.75 px of the brightest pixel near (x0, y0);
 *  2. the image is interpolated (Lanczos, a = 5) on an 8 x 8 sub-pixel
 *     grid and the area A above half the peak, connected to the peak, is
 *     counted;
 *  3. the FWHM of the pixel-integrated profile is 2 sqrt(A / pi) (exact for
 *     a round profile of any shape);
 *  4. the pixel's own width is removed in quadrature: a square pixel adds
 *     1/12 px^2 to the variance of each axis, so
 *     FWHM^2 = FWHM_pix^2 - 8 ln 2 / 12 (exact for a Gaussian).
 * Works for PSF images and for stars. mask may be NULL; pixels with any
 * HILAL_MASK_UNUSABLE bit and non-finite values count as 0. Returns 0 for
 * a source sharper than a pixel, NaN when there is no positive peak near
 * (x0, y0) (or rmax_px is not in (0, 1000]). */
double hilal_psf_measure_fwhm(const float *img, const hilal_mask_t *mask, long nx, long ny,
                              double x0, double y0, double rmax_px);

/* First moments of the PSF over the pixels within size/2 of the centre,
 * relative to the central pixel, px (0 for a centred PSF). */
void hilal_psf_centroid(const hilal_psf *psf, double *dx_px, double *dy_px);

/* Shifts a float image by a sub-pixel amount with a separable Lanczos
 * (windowed-sinc) kernel of half-width a = 5 (weights renormalised to sum 1): out(u, v) = in(u + sx,
 * v + sy), 0-based, so a feature at (x, y) in `in` appears at (x - sx,
 * y - sy) in `out`. Samples outside `in` count as 0. |sx|, |sy| <= 8 px.
 * in and out must not overlap. HILAL_ERR_NOMEM / HILAL_ERR_RANGE. */
hilal_status hilal_psf_shift(const float *in, int nx, int ny, double sx, double sy,
                                      float *out, hilal_error *err);

/* What to do when an image has too few usable stars for an empirical PSF. */
typedef enum hilal_psf_fallback {
    HILAL_PSF_FALLBACK_NONE = 0,     /* fail with HILAL_ERR_DATA */
    HILAL_PSF_FALLBACK_GAUSSIAN = 1, /* Gaussian of the median star FWHM, with a warning */
    HILAL_PSF_FALLBACK_MOFFAT = 2    /* Moffat of the median star FWHM, with a warning */
} hilal_psf_fallback;

/* Settings of hilal_psf_build(); the psf stage's parameter table holds the
 * same keys and defaults (docs/psf.md). */
typedef struct hilal_psf_build_params {
    int size;                   /* PSF side, px (odd); 0 = from the stars' FWHM (default 0) */
    double half_size_fwhm;      /* half-side in FWHM when size = 0 (default 4) */
    int size_min, size_max;     /* limits of the automatic side, px (default 11, 63) */
    int max_stars;              /* brightest usable stars stacked (default 100) */
    int min_stars;              /* fewer usable stars: fallback (default 5) */
    double min_snr;             /* minimum flux / flux_err of a stacked star (default 20) */
    double clip_sigma;          /* per-pixel rejection threshold, sigma (default 3) */
    int refine_iter;            /* effective-PSF refinement passes (default 3) */
    hilal_psf_fallback fallback;/* default HILAL_PSF_FALLBACK_MOFFAT */
    double moffat_beta;         /* beta of the Moffat fallback (default 2.5) */
} hilal_psf_build_params;

/* Fills p with the defaults listed above. */
void hilal_psf_build_params_default(hilal_psf_build_params *p);

/* Builds the empirical PSF of img from its star list (stars found in img,
 * FITS 1-based coordinates of img, `usable` flags set, as made by the stars
 * stage). The algorithm (docs/psf.md):
 *  1. side from the median FWHM of the usable stars;
 *  2. the brightest usable stars with flux / flux_err >= min_snr whose
 *     padded stamp lies inside the image and whose centre pixel is
 *     unmasked, up to max_stars;
 *  3. each stamp: image minus sky map (without a sky map: minus the
 *     clipped median beyond the PSF radius), shifted (Lanczos) so the
 *     star's centre falls on the central pixel, divided by its flux within
 *     2 FWHM;
 *  4. per pixel, sigma-clipped inverse-variance weighted mean of the stamps;
 *  5. refine_iter effective-PSF passes (Anderson & King 2000): every star's
 *     flux and centre refitted with the current PSF, the residuals shifted
 *     back, combined like the stamps and added to the PSF;
 *  6. wings beyond the radius where the PSF becomes noise replaced by a
 *     fitted Moffat wing (and, without a sky map, a residual constant
 *     background removed), normalised to sum 1, shifted so its first
 *     moments vanish (|centroid| < 0.002 px), FWHM measured with
 *     hilal_psf_measure_fwhm().
 * With fewer than min_stars candidates, the fallback model (if any) is
 * made with the median FWHM of the usable stars (of all stars when none is
 * usable), a warning logged and *used_fallback set to 1 (else 0;
 * used_fallback may be NULL). Fails with HILAL_ERR_DATA, naming
 * img->meta.path and suggesting settings, when there are no stars to take
 * a FWHM from or the fallback is NONE.
 * out is cleared first; on failure it stays empty. */
hilal_status hilal_psf_build(const hilal_image *img, const hilal_starlist *stars,
                             const hilal_psf_build_params *p, hilal_psf *out,
                             int *used_fallback, hilal_error *err);

/* PSF-fit photometry of one point source at (x, y), FITS 1-based pixels of
 * img: the PSF is shifted (Lanczos) to the source's sub-pixel position
 * and img->pix - img->sky is fitted by flux * PSF by unweighted linear
 * least squares over the unmasked pixels within size/2 of the source;
 * without a sky map (img->sky NULL), img->pix is fitted by flux * PSF + b
 * with b a constant local background. The error propagates img->var (or
 * img->sky_rms_adu^2 when var is NULL) through the least-squares solution.
 * Because the PSF sums to 1, flux is the source's flux within the PSF
 * stamp, ADU. HILAL_ERR_DATA when the source's pixel is masked or off the
 * image, or fewer than 70% of the fit pixels are usable. */
hilal_status hilal_psf_fit_flux(const hilal_image *img, const hilal_psf *psf, double x, double y,
                                double *flux_adu, double *flux_err_adu, hilal_error *err);

/* A PSF from a sampled image of one (nx x ny, row-major, any size): a
 * model such as WebbPSF's or PSFEx's, rendered at the pixel scale of the
 * image it describes. The steps (docs/psf.md, "Supplied PSFs"):
 *  1. checks: at least 3 x 3 px, every pixel finite, a positive brightest
 *     pixel and a positive total;
 *  2. FWHM of the image around its brightest pixel
 *     (hilal_psf_measure_fwhm(), within 64 px);
 *  3. side: p->size when > 0 (made odd), else
 *     hilal_psf_size_for_fwhm(FWHM, p->half_size_fwhm, p->size_min,
 *     p->size_max) -- the rule of hilal_psf_build();
 *  4. a stamp of that side is cut around the brightest pixel (pixels beyond
 *     the image count as 0) and shifted (Lanczos, a = 5) until its first
 *     moments within size/2 vanish (|centroid| < 0.002 px); every pass
 *     shifts the original pixels by the total offset, so they are
 *     interpolated once;
 *  5. normalised to sum 1 over the stamp; fwhm_px measured on the result
 *     (hilal_psf_measure_fwhm()), nstars = 0.
 * Only p->size, half_size_fwhm, size_min and size_max are used.
 * *flux_frac (may be NULL) receives the fraction of the image's total flux
 * that the stamp holds before normalisation (the part of the wings the
 * stamp leaves out is 1 - that).
 * HILAL_ERR_DATA, with a message saying what is wrong, when a check fails,
 * the peak is sharper than a pixel or the centroid lies more than 2.5 px
 * from the brightest pixel (not a single centred PSF). out is cleared
 * first; on failure it stays empty. */
hilal_status hilal_psf_from_pixels(const float *pix, long nx, long ny,
                                   const hilal_psf_build_params *p, hilal_psf *out,
                                   double *flux_frac, hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
