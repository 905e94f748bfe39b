/* Star matching between two catalogues and the robust fit of the residual
 * transform (private to the alignment code; see docs/align.md).
 *
 * Both catalogues are given in the same pixel frame (the science frame,
 * FITS 1-based): the science stars s_i as measured, the reference stars
 * q_j already carried into science pixels by the first-guess transform (WCS
 * or phase correlation). The fit finds the correction polynomial c with
 *     A(s) = s + c(s),   A(s_i) ~ q_j   for matched pairs (i, j),
 * so that a science pixel s corresponds to the reference point that the
 * first-guess transform puts at A(s).
 */
#ifndef HILAL_MATCH_H
#define HILAL_MATCH_H

#include <stddef.h>

#include "hilal/status.h"

/* A displacement polynomial of order 0 (shift), 1 (affine) or 2 (quadratic)
 * in normalised coordinates u = (x - xc) / norm, v = (y - yc) / norm:
 *     dx = cx[0] + cx[1] u + cx[2] v + cx[3] u^2 + cx[4] u v + cx[5] v^2
 * and likewise dy with cy. Unused terms are 0. */
typedef struct hilal_poly2d {
    int order;
    double xc, yc, norm;
    double cx[6], cy[6];
} hilal_poly2d;

/* The zero displacement, normalised about (xc, yc) with scale norm (> 0). */
void hilal_poly2d_zero(hilal_poly2d *p, double xc, double yc, double norm);

/* Displacement (dx, dy) at (x, y). */
void hilal_poly2d_eval(const hilal_poly2d *p, double x, double y, double *dx, double *dy);

/* Jacobian of the displacement: d(dx)/dx, d(dx)/dy, d(dy)/dx, d(dy)/dy. */
void hilal_poly2d_jacobian(const hilal_poly2d *p, double x, double y, double jac[4]);

/* Solves s + c(s) = q for s by Newton's method (c smooth and small-gradient).
 * Returns 0 on convergence (|step| < 1e-9 px), -1 otherwise. */
int hilal_poly2d_invert(const hilal_poly2d *p, double qx, double qy, double *sx, double *sy);

/* Settings of the matcher (docs/align.md explains each). */
typedef struct hilal_match_opts {
    double search_radius_px; /* largest first-guess error searched by the offset vote */
    double match_radius_px;  /* final nearest-neighbour radius */
    int min_matches;         /* fewer clipped matches than this is a failure */
    int order;               /* highest order fitted (1 or 2); lower ones win when the
                                Bayesian information criterion prefers them */
    int order2_min_matches;  /* quadratic terms only with at least this many matches */
    double clip_sigma;       /* sigma-clipping threshold, in robust sigma */
} hilal_match_opts;

/* What the matcher found. */
typedef struct hilal_match_result {
    int nvote;               /* pairs in the winning offset-vote cell block */
    double vote_dx_px, vote_dy_px; /* first-guess error found by the vote (q - s) */
    int nmatch;              /* matches kept after clipping */
    int ncand;               /* matches before clipping */
    int order;               /* order of the final fit */
    double rms_x_px, rms_y_px; /* residual RMS of the kept matches (dof-corrected) */
    int *ia, *ib;            /* kept pairs: indices into a and b (malloc'd, nmatch each) */
} hilal_match_result;

void hilal_match_result_clear(hilal_match_result *r);

/* Matches science positions (ax, ay; na) with reference positions in
 * science pixels (bx, by; nb), both ordered brightest first; non-finite
 * positions are ignored. Steps (docs/align.md):
 *   1. 2-D histogram vote of all pair offsets within search_radius_px: the
 *      densest 3x3-cell block gives the common first-guess error;
 *   2. mutual nearest neighbours within a radius, starting at three vote
 *      cells and shrinking to max(match_radius_px, 4 x RMS);
 *   3. least-squares fit of the displacement polynomial with iterative
 *      clipping at clip_sigma robust sigma (1.4826 x MAD), the order (0
 *      shift, 1 affine, 2 quadratic, at most opts->order) chosen by the
 *      Bayesian information criterion;
 * repeated until the matched set no longer changes.
 * On failure (no consistent offset, fewer than min_matches matches) returns
 * HILAL_ERR_DATA with a message saying how many stars matched; the caller
 * adds which files. out is zeroed first; free it with
 * hilal_match_result_clear(). poly receives the correction. */
hilal_status hilal_match_fit(const double *ax, const double *ay, size_t na, const double *bx,
                             const double *by, size_t nb, double xc, double yc, double norm,
                             const hilal_match_opts *opts, hilal_poly2d *poly,
                             hilal_match_result *out, hilal_error *err);

#endif
