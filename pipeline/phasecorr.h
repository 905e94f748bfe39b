/* Translation between two images by FFT phase correlation (private to the
 * alignment code; see docs/align.md). Used when a frame has no usable WCS. */
#ifndef HILAL_PHASECORR_H
#define HILAL_PHASECORR_H

#include "hilal/image.h"
#include "hilal/status.h"

typedef struct hilal_phasecorr_result {
    double dx_px, dy_px; /* a source at science pixel s lies at reference pixel s + (dx, dy) */
    double peak_snr;     /* correlation peak above the median, in robust sigma of the surface */
    int binning;         /* block size the images were averaged over, px */
} hilal_phasecorr_result;

/* Finds the translation between sci and ref (any sizes):
 *   1. each image is averaged in b x b blocks (b the smallest integer making
 *      both sides at most max_side_px), using unmasked pixels only, with
 *      the sky plane subtracted when present;
 *   2. the median is subtracted and values are divided by the robust sigma
 *      (1.4826 MAD); blocks below 3 sigma are set to 0 and the others
 *      compressed as sqrt(t), so that sources, not noise or gradients, and
 *      not only the brightest stars, drive the correlation;
 *   3. both are zero-padded to a common size of at least the sum of their
 *      widths (no wrap-around ambiguity for any overlap) and transformed;
 *   4. the normalised cross-power spectrum conj(S) R / |conj(S) R| is
 *      transformed back: its peak sits at the offset (Kuglin & Hines 1975);
 *   5. the peak is located to sub-block precision by a parabola through
 *      its neighbours on each axis and multiplied by b.
 * HILAL_ERR_DATA when the peak is below min_snr robust sigma of the
 * correlation surface (no common sources), or an image has no usable
 * pixels. threads: for the FFT (0 = one per core). */
hilal_status hilal_phasecorr_offset(const hilal_image *sci, const hilal_image *ref,
                                    long max_side_px, double min_snr, int threads,
                                    hilal_phasecorr_result *res, hilal_error *err);

#endif
