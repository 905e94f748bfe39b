/* Resampling an image onto another pixel grid with a Lanczos3 kernel
 * (private to the alignment code; see docs/align.md).
 *
 * The geometry is a pixel map from output (science) pixels to input
 * (reference) pixels. It is evaluated exactly on a coarse grid of nodes and
 * interpolated bilinearly between them; the node spacing is halved until the
 * bilinear error, measured against the exact map at every cell centre, is
 * below a tolerance.
 */
#ifndef HILAL_RESAMPLE_H
#define HILAL_RESAMPLE_H

#include <stddef.h>

#include "hilal/image.h"
#include "hilal/status.h"

/* Maps n output pixel positions (FITS 1-based) to input pixel positions
 * (FITS 1-based), NaN where the map is undefined. Called from one thread. */
typedef hilal_status (*hilal_pixmap_fn)(void *user, int n, const double *x, const double *y,
                                        double *u, double *v, hilal_error *err);

/* The map sampled on nodes (i * step, j * step), 0-based output pixels,
 * i < gx, j < gy; the last nodes lie at or beyond the last pixel. */
typedef struct hilal_pixgrid {
    long nx, ny;        /* output grid, px */
    long step;          /* node spacing, px */
    long gx, gy;        /* nodes per axis (>= 2) */
    double *u, *v;      /* input position, 0-based, at node [j * gx + i]; NaN if undefined */
    double *jac;        /* |det d(u,v)/d(x,y)| at the node (input pixels per output pixel) */
    double max_err_px;  /* largest bilinear error found at the cell centres, px */
} hilal_pixgrid;

/* Samples fn on a node grid for an nx x ny output, starting with spacing
 * step0 and halving it until the bilinear error at every cell centre is at
 * most tol_px (or the spacing is 1 px, where interpolation is exact). */
hilal_status hilal_pixgrid_build(long nx, long ny, hilal_pixmap_fn fn, void *user, long step0,
                                 double tol_px, hilal_pixgrid *g, hilal_error *err);

/* Input position (0-based) and Jacobian at 0-based output position (x, y). */
void hilal_pixgrid_eval(const hilal_pixgrid *g, double x, double y, double *u, double *v,
                        double *jac);

void hilal_pixgrid_clear(hilal_pixgrid *g);

/* Lanczos3 kernel L(t) = sinc(t) sinc(t/3) for |t| < 3, else 0. */
double hilal_lanczos3(double t);

/* Figures of one resampling. */
typedef struct hilal_resample_stats {
    size_t ncovered;    /* output pixels with a finite value and variance */
    size_t nnodata;     /* output pixels flagged NODATA (outside the input or fully masked) */
    double mean_w2;     /* mean over covered pixels of sum w^2 (normalised weights): the
                           per-pixel variance reduction of interpolated noise */
    double mean_jac;    /* mean Jacobian over covered pixels */
} hilal_resample_stats;

/* Resamples in onto the grid of g: for each output pixel the input position
 * (u, v) from g, the separable Lanczos3 weights w = wx(u) wy(v) normalised
 * to sum 1 on each axis, and, over the usable input pixels of the 6 x 6
 * footprint (W = sum w, Wa = sum |w| over them, J = Jacobian):
 *     pix = J sum w p / W                 (flux-conserving)
 *     var = J sum |w| var / Wa            (white-noise-equivalent variance)
 *     sky = J x bilinear(sky)
 * The var plane is the local variance density the noise models of later
 * stages need (what sums over many pixels, e.g. PSF-filtered images, see);
 * the variance of a single resampled pixel is lower, J^2 sum w^2 var, and
 * neighbours are correlated (docs/align.md).
 * Mask: OR of the input masks with |w| >= mask_weight, plus INTERP where an
 * unusable input pixel was skipped and EDGE|NODATA where the footprint
 * leaves the input. Output pixels whose position lies outside the input, or
 * whose usable weight W is below 0.5, get NODATA (plus EDGE outside), var
 * 1e30 and NaN pixels (outside). var and sky are made only when the input
 * has them. *out gets a new image with the input's metadata (WCS included:
 * the caller replaces it). stats->mean_w2 is the mean of sum w^2 over the
 * covered pixels (per-pixel variance / var plane at J = 1). threads <= 0
 * means one per core. */
hilal_status hilal_resample_lanczos3(const hilal_image *in, const hilal_pixgrid *g,
                                     double mask_weight, int threads, hilal_image **out,
                                     hilal_resample_stats *stats, hilal_error *err);

#endif
