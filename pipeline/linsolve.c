/* Small dense linear systems and a polynomial basis. See linsolve.h. */
#include "linsolve.h"

#include <math.h>

int hilal_linsolve(double *a, double *b, int n)
{
    /* Forward elimination: for each column c, bring the row with the
     * largest |a[r][c]| (r >= c) to row c, then subtract multiples of it
     * from the rows below so that column c is zero under the diagonal. */
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(a[r * n + c]) > fabs(a[p * n + c]))
                p = r;
        if (!(fabs(a[p * n + c]) > 1e-300))
            return 0;
        if (p != c) {
            for (int k = 0; k < n; k++) {
                double t = a[c * n + k];
                a[c * n + k] = a[p * n + k];
                a[p * n + k] = t;
            }
            double t = b[c];
            b[c] = b[p];
            b[p] = t;
        }
        for (int r = c + 1; r < n; r++) {
            double f = a[r * n + c] / a[c * n + c];
            for (int k = c; k < n; k++)
                a[r * n + k] -= f * a[c * n + k];
            b[r] -= f * b[c];
        }
    }
    /* Back substitution on the upper-triangular system, last row first;
     * b[k] for k > c already holds x[k]. */
    for (int c = n - 1; c >= 0; c--) {
        double s = b[c];
        for (int k = c + 1; k < n; k++)
            s -= a[c * n + k] * b[k];
        b[c] = s / a[c * n + c];
    }
    return 1;
}

int hilal_poly2_terms(int degree, double u, double v, double *t)
{
    int k = 0;
    for (int d = 0; d <= degree; d++)
        for (int j = 0; j <= d; j++)
            t[k++] = pow(u, d - j) * pow(v, j);
    return k;
}
