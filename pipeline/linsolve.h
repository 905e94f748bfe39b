/* Small dense linear systems and the polynomial basis of the smooth fits
 * across an image. Private to the library. */
#ifndef HILAL_LINSOLVE_H
#define HILAL_LINSOLVE_H

/* Solves the n x n system a x = b (a row-major, destroyed; the solution
 * replaces b) by Gaussian elimination with partial pivoting. Returns 1, or
 * 0 when a pivot is not above 1e-300 in magnitude (singular), with a and b
 * partly reduced. */
int hilal_linsolve(double *a, double *b, int n);

/* The terms u^i v^j, i + j <= degree, in order of increasing degree i + j
 * and, within one degree, of decreasing i, into t; returns their number
 * (degree + 1)(degree + 2) / 2. */
int hilal_poly2_terms(int degree, double u, double v, double *t);

#endif
