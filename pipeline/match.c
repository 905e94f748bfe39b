/* Star matching and the robust fit of the residual transform between two
 * catalogues given in one pixel frame. See match.h and docs/align.md. */
#include "match.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/stats.h"

#define MAXCOEF 6

/* Number of coefficients per axis of a polynomial of the given order. */
static int ncoef(int order) { return order <= 0 ? 1 : order == 1 ? 3 : 6; }

/* Basis functions 1, u, v, u^2, u v, v^2 at normalised (u, v). */
static void basis(double u, double v, double b[MAXCOEF])
{
    b[0] = 1.0;
    b[1] = u;
    b[2] = v;
    b[3] = u * u;
    b[4] = u * v;
    b[5] = v * v;
}

void hilal_poly2d_zero(hilal_poly2d *p, double xc, double yc, double norm)
{
    memset(p, 0, sizeof *p);
    p->xc = xc;
    p->yc = yc;
    p->norm = norm > 0 ? norm : 1.0;
}

void hilal_poly2d_eval(const hilal_poly2d *p, double x, double y, double *dx, double *dy)
{
    double b[MAXCOEF];
    basis((x - p->xc) / p->norm, (y - p->yc) / p->norm, b);
    double sx = 0, sy = 0;
    int n = ncoef(p->order);
    for (int k = 0; k < n; k++) {
        sx += p->cx[k] * b[k];
        sy += p->cy[k] * b[k];
    }
    *dx = sx;
    *dy = sy;
}

void hilal_poly2d_jacobian(const hilal_poly2d *p, double x, double y, double jac[4])
{
    /* d/du of the basis: 0, 1, 0, 2u, v, 0; d/dv: 0, 0, 1, 0, u, 2v; then
     * divide by norm for d/dx, d/dy. */
    double u = (x - p->xc) / p->norm, v = (y - p->yc) / p->norm;
    double bu[MAXCOEF] = {0, 1, 0, 2 * u, v, 0};
    double bv[MAXCOEF] = {0, 0, 1, 0, u, 2 * v};
    double a = 0, b = 0, c = 0, d = 0;
    int n = ncoef(p->order);
    for (int k = 0; k < n; k++) {
        a += p->cx[k] * bu[k];
        b += p->cx[k] * bv[k];
        c += p->cy[k] * bu[k];
        d += p->cy[k] * bv[k];
    }
    jac[0] = a / p->norm;
    jac[1] = b / p->norm;
    jac[2] = c / p->norm;
    jac[3] = d / p->norm;
}

int hilal_poly2d_invert(const hilal_poly2d *p, double qx, double qy, double *sx, double *sy)
{
    /* Newton's method on G(s) = s + c(s) - q, starting from s = q - c(q):
     * s <- s - (I + dc/ds)^-1 G(s). */
    double dx, dy;
    hilal_poly2d_eval(p, qx, qy, &dx, &dy);
    double x = qx - dx, y = qy - dy;
    for (int it = 0; it < 50; it++) {
        double jac[4];
        hilal_poly2d_eval(p, x, y, &dx, &dy);
        hilal_poly2d_jacobian(p, x, y, jac);
        double gx = x + dx - qx, gy = y + dy - qy;
        double a = 1 + jac[0], b = jac[1], c = jac[2], d = 1 + jac[3];
        double det = a * d - b * c;
        if (!(fabs(det) > 1e-12))
            break;
        double stx = (d * gx - b * gy) / det, sty = (-c * gx + a * gy) / det;
        x -= stx;
        y -= sty;
        if (fabs(stx) < 1e-9 && fabs(sty) < 1e-9) {
            *sx = x;
            *sy = y;
            return 0;
        }
    }
    *sx = x;
    *sy = y;
    return -1;
}

void hilal_match_result_clear(hilal_match_result *r)
{
    if (r == NULL)
        return;
    free(r->ia);
    free(r->ib);
    memset(r, 0, sizeof *r);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n values (sorts a scratch copy in tmp). */
static double median(const double *v, size_t n, double *tmp)
{
    if (n > 0)
        memcpy(tmp, v, n * sizeof *v);
    return hilal_median_double(tmp, n);
}

/* Solves the n x n system m x = r in place by Gaussian elimination with
 * partial pivoting. Returns 0, or -1 when m is (nearly) singular. */
static int solve(int n, double m[MAXCOEF][MAXCOEF], double r[MAXCOEF])
{
    double scale = 0;
    for (int i = 0; i < n; i++)
        scale = fmax(scale, fabs(m[i][i]));
    for (int col = 0; col < n; col++) {
        int piv = col;
        for (int i = col + 1; i < n; i++)
            if (fabs(m[i][col]) > fabs(m[piv][col]))
                piv = i;
        if (!(fabs(m[piv][col]) > 1e-12 * scale))
            return -1;
        if (piv != col) {
            for (int k = 0; k < n; k++) {
                double t = m[col][k];
                m[col][k] = m[piv][k];
                m[piv][k] = t;
            }
            double t = r[col];
            r[col] = r[piv];
            r[piv] = t;
        }
        for (int i = col + 1; i < n; i++) {
            double f = m[i][col] / m[col][col];
            for (int k = col; k < n; k++)
                m[i][k] -= f * m[col][k];
            r[i] -= f * r[col];
        }
    }
    for (int i = n - 1; i >= 0; i--) {
        double s = r[i];
        for (int k = i + 1; k < n; k++)
            s -= m[i][k] * r[k];
        r[i] = s / m[i][i];
    }
    return 0;
}

/* Least-squares fit of the displacements (ex, ey) at positions (x, y) of the
 * points with use[i] set, by the normal equations of the polynomial basis.
 * Returns 0, or -1 when the positions do not constrain the order. */
static int lsq_fit(hilal_poly2d *p, int order, const double *x, const double *y, const double *ex,
                   const double *ey, const unsigned char *use, size_t n)
{
    int nc = ncoef(order);
    double m[MAXCOEF][MAXCOEF] = {{0}}, my[MAXCOEF][MAXCOEF], rx[MAXCOEF] = {0}, ry[MAXCOEF] = {0};
    size_t nused = 0;
    for (size_t i = 0; i < n; i++) {
        if (!use[i])
            continue;
        double b[MAXCOEF];
        basis((x[i] - p->xc) / p->norm, (y[i] - p->yc) / p->norm, b);
        for (int j = 0; j < nc; j++) {
            for (int k = 0; k < nc; k++)
                m[j][k] += b[j] * b[k];
            rx[j] += b[j] * ex[i];
            ry[j] += b[j] * ey[i];
        }
        nused++;
    }
    if (nused < (size_t)nc)
        return -1;
    memcpy(my, m, sizeof m);
    if (solve(nc, m, rx) != 0 || solve(nc, my, ry) != 0)
        return -1;
    memset(p->cx, 0, sizeof p->cx);
    memset(p->cy, 0, sizeof p->cy);
    for (int k = 0; k < nc; k++) {
        p->cx[k] = rx[k];
        p->cy[k] = ry[k];
    }
    p->order = order;
    return 0;
}

/* Fits every order from 0 to max_order to the points in use and keeps the
 * one with the lowest Bayesian information criterion (Schwarz 1978),
 *     BIC = n ln(RSS / n) + p ln(n),
 * n the number of residual components (2 per star), p the number of
 * coefficients (both axes), RSS the residual sum of squares: a rotation,
 * scale or quadratic term is kept only when the stars demand it, so that a
 * few noisy matches do not tilt the transform. Returns the order chosen, or
 * -1 when not even a shift can be fitted. */
static int best_fit(hilal_poly2d *p, int max_order, const double *x, const double *y,
                    const double *ex, const double *ey, const unsigned char *use, size_t n)
{
    size_t nu = 0;
    for (size_t i = 0; i < n; i++)
        nu += use[i] != 0;
    int best = -1;
    double best_bic = INFINITY;
    hilal_poly2d trial = *p, chosen = *p;
    for (int o = 0; o <= max_order; o++) {
        int pc = 2 * ncoef(o);
        if (nu * 2 <= (size_t)pc || lsq_fit(&trial, o, x, y, ex, ey, use, n) != 0)
            continue;
        double rss = 0;
        for (size_t i = 0; i < n; i++) {
            if (!use[i])
                continue;
            double dx, dy;
            hilal_poly2d_eval(&trial, x[i], y[i], &dx, &dy);
            rss += (ex[i] - dx) * (ex[i] - dx) + (ey[i] - dy) * (ey[i] - dy);
        }
        double m = 2.0 * (double)nu;
        /* floor: noise-free data must not give ln(0) */
        double bic = m * log(rss / m + 1e-12) + pc * log(m);
        if (bic < best_bic) {
            best_bic = bic;
            best = o;
            chosen = trial;
        }
    }
    if (best >= 0)
        *p = chosen;
    return best;
}

/* Mutual nearest neighbours: for every a_i its nearest b within radius of
 * the predicted position a_i + c(a_i), kept only when a_i is also the
 * nearest a (predicted) of that b. Writes pairs into ia/ib; returns the count. */
static size_t mutual_nn(const hilal_poly2d *p, const double *ax, const double *ay, size_t na,
                        const double *bx, const double *by, size_t nb, double radius, int *best_b,
                        double *best_b_d2, int *best_a, double *best_a_d2, double *px, double *py,
                        int *ia, int *ib)
{
    double r2 = radius * radius;
    for (size_t i = 0; i < na; i++) {
        double dx, dy;
        hilal_poly2d_eval(p, ax[i], ay[i], &dx, &dy);
        px[i] = ax[i] + dx;
        py[i] = ay[i] + dy;
        best_b[i] = -1;
        best_b_d2[i] = r2;
    }
    for (size_t j = 0; j < nb; j++) {
        best_a[j] = -1;
        best_a_d2[j] = r2;
    }
    for (size_t i = 0; i < na; i++) {
        if (!isfinite(px[i]) || !isfinite(py[i]))
            continue;
        for (size_t j = 0; j < nb; j++) {
            double ddx = bx[j] - px[i];
            if (fabs(ddx) > radius)
                continue;
            double ddy = by[j] - py[i];
            if (fabs(ddy) > radius)
                continue;
            double d2 = ddx * ddx + ddy * ddy;
            if (d2 <= best_b_d2[i]) {
                best_b_d2[i] = d2;
                best_b[i] = (int)j;
            }
            if (d2 <= best_a_d2[j]) {
                best_a_d2[j] = d2;
                best_a[j] = (int)i;
            }
        }
    }
    size_t n = 0;
    for (size_t i = 0; i < na; i++) {
        int j = best_b[i];
        if (j >= 0 && best_a[j] == (int)i) {
            ia[n] = (int)i;
            ib[n] = j;
            n++;
        }
    }
    return n;
}

hilal_status hilal_match_fit(const double *ax, const double *ay, size_t na, const double *bx,
                             const double *by, size_t nb, double xc, double yc, double norm,
                             const hilal_match_opts *opts, hilal_poly2d *poly,
                             hilal_match_result *out, hilal_error *err)
{
    memset(out, 0, sizeof *out);
    hilal_poly2d_zero(poly, xc, yc, norm);
    hilal_status st = HILAL_OK;
    size_t nmax = na > nb ? na : nb;
    int *best_b = malloc((na + 1) * sizeof *best_b), *best_a = malloc((nb + 1) * sizeof *best_a);
    double *best_b_d2 = malloc((na + 1) * sizeof(double));
    double *best_a_d2 = malloc((nb + 1) * sizeof(double));
    double *px = malloc((na + 1) * sizeof(double)), *py = malloc((na + 1) * sizeof(double));
    int *ia = malloc((nmax + 1) * sizeof *ia), *ib = malloc((nmax + 1) * sizeof *ib);
    int *prev_ia = malloc((nmax + 1) * sizeof *ia), *prev_ib = malloc((nmax + 1) * sizeof *ib);
    double *mx = malloc((nmax + 1) * sizeof(double)), *my = malloc((nmax + 1) * sizeof(double));
    double *ex = malloc((nmax + 1) * sizeof(double)), *ey = malloc((nmax + 1) * sizeof(double));
    double *rx = malloc((nmax + 1) * sizeof(double)), *ry = malloc((nmax + 1) * sizeof(double));
    double *tmp = malloc((nmax + 1) * sizeof(double)), *tmp2 = malloc((nmax + 1) * sizeof(double));
    double *scratch = malloc((nmax + 1) * sizeof(double));
    unsigned char *use = malloc(nmax + 1), *newuse = malloc(nmax + 1);
    long *hist = NULL;
    double *vdx = NULL, *vdy = NULL;
    if (!best_b || !best_a || !best_b_d2 || !best_a_d2 || !px || !py || !ia || !ib || !prev_ia ||
        !prev_ib || !mx || !my || !ex || !ey || !rx || !ry || !tmp || !tmp2 || !scratch || !use ||
        !newuse) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory matching %zu and %zu stars", na,
                             nb);
        goto cleanup;
    }
    int min_matches = opts->min_matches < 3 ? 3 : opts->min_matches;

    /* 1. Offset vote. Every pair (a_i, b_j) whose offset b_j - a_i lies
     *    within the search box votes for its cell in a 2-D histogram of cell
     *    size `bin`; the true common offset collects one vote per star while
     *    chance pairs spread evenly. The densest 3x3 block of cells wins, and
     *    the median offset of its pairs is the first guess. */
    double bin = opts->match_radius_px > 1.0 ? opts->match_radius_px : 1.0;
    long half = (long)ceil(opts->search_radius_px / bin);
    if (half < 1)
        half = 1;
    long side = 2 * half + 1;
    hist = calloc((size_t)(side * side), sizeof *hist);
    if (hist == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the offset vote");
        goto cleanup;
    }
    double box = (double)half * bin;
    long npairs = 0;
    for (size_t i = 0; i < na; i++) {
        if (!isfinite(ax[i]) || !isfinite(ay[i]))
            continue;
        for (size_t j = 0; j < nb; j++) {
            double dx = bx[j] - ax[i], dy = by[j] - ay[i];
            if (!(fabs(dx) < box) || !(fabs(dy) < box))
                continue;
            long cx = (long)floor(dx / bin + 0.5) + half, cy = (long)floor(dy / bin + 0.5) + half;
            if (cx < 0 || cy < 0 || cx >= side || cy >= side)
                continue;
            hist[cy * side + cx]++;
            npairs++;
        }
    }
    long best = -1, bestx = 0, besty = 0;
    for (long cy = 0; cy < side; cy++)
        for (long cx = 0; cx < side; cx++) {
            long s = 0;
            for (long k = -1; k <= 1; k++)
                for (long l = -1; l <= 1; l++) {
                    long yy = cy + k, xx = cx + l;
                    if (yy >= 0 && xx >= 0 && yy < side && xx < side)
                        s += hist[yy * side + xx];
                }
            if (s > best) {
                best = s;
                bestx = cx;
                besty = cy;
            }
        }
    /* Chance pairs expected in a 3x3 block if offsets were uniform over the
     * search box: the winner must stand 5 sigma (Poisson) above that. */
    double expect = (double)npairs * 9.0 / (double)(side * side);
    if (best < 3 || (double)best < expect + 5.0 * sqrt(expect) + 1.0) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "no common offset between %zu science and %zu reference stars within "
                             "%.0f px of the first guess (best vote %ld pairs, %.1f expected by "
                             "chance)",
                             na, nb, opts->search_radius_px, best < 0 ? 0 : best, expect);
        goto cleanup;
    }
    double ox = (double)(bestx - half) * bin, oy = (double)(besty - half) * bin;
    vdx = malloc((size_t)best * sizeof *vdx);
    vdy = malloc((size_t)best * sizeof *vdy);
    if (vdx == NULL || vdy == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the offset vote");
        goto cleanup;
    }
    size_t nv = 0;
    for (size_t i = 0; i < na && nv < (size_t)best; i++) {
        if (!isfinite(ax[i]) || !isfinite(ay[i]))
            continue;
        for (size_t j = 0; j < nb && nv < (size_t)best; j++) {
            double dx = bx[j] - ax[i], dy = by[j] - ay[i];
            if (fabs(dx - ox) <= 1.5 * bin && fabs(dy - oy) <= 1.5 * bin) {
                vdx[nv] = dx;
                vdy[nv] = dy;
                nv++;
            }
        }
    }
    qsort(vdx, nv, sizeof *vdx, cmp_double);
    qsort(vdy, nv, sizeof *vdy, cmp_double);
    out->nvote = (int)nv;
    out->vote_dx_px = nv % 2 ? vdx[nv / 2] : 0.5 * (vdx[nv / 2 - 1] + vdx[nv / 2]);
    out->vote_dy_px = nv % 2 ? vdy[nv / 2] : 0.5 * (vdy[nv / 2 - 1] + vdy[nv / 2]);
    poly->order = 0;
    poly->cx[0] = out->vote_dx_px;
    poly->cy[0] = out->vote_dy_px;

    /* 2-3. Match, fit, clip; shrink the radius and repeat until stable. The
     *      first radius (three vote cells) tolerates the spread a small
     *      rotation or scale error gives the offsets across the field. */
    double radius = 3.0 * bin;
    size_t nprev = 0, nkept = 0;
    int order = 0;
    for (int iter = 0; iter < 20; iter++) {
        size_t nm = mutual_nn(poly, ax, ay, na, bx, by, nb, radius, best_b, best_b_d2, best_a,
                              best_a_d2, px, py, ia, ib);
        out->ncand = (int)nm;
        if (nm < (size_t)min_matches) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "only %zu of %zu science and %zu reference stars match within "
                                 "%.1f px (at least %d needed)",
                                 nm, na, nb, radius, min_matches);
            goto cleanup;
        }
        for (size_t k = 0; k < nm; k++) {
            mx[k] = ax[ia[k]];
            my[k] = ay[ia[k]];
            ex[k] = bx[ib[k]] - ax[ia[k]];
            ey[k] = by[ib[k]] - ay[ia[k]];
            use[k] = 1;
        }
        /* Highest order tried: quadratic only with enough matches to
         * constrain its 6 coefficients per axis well, affine otherwise; the
         * information criterion then picks among the lower ones. */
        order = (opts->order >= 2 && nm >= (size_t)opts->order2_min_matches) ? 2 : 1;
        hilal_poly2d fit = *poly;
        int ok = 0;
        for (int clip = 0; clip < 20; clip++) {
            if (best_fit(&fit, order, mx, my, ex, ey, use, nm) < 0)
                break;
            ok = 1;
            /* Residuals of every candidate (rejected ones may come back). */
            size_t nu = 0;
            for (size_t k = 0; k < nm; k++) {
                double dx, dy;
                hilal_poly2d_eval(&fit, mx[k], my[k], &dx, &dy);
                rx[k] = ex[k] - dx;
                ry[k] = ey[k] - dy;
                if (use[k]) {
                    tmp[nu] = rx[k];
                    tmp2[nu] = ry[k];
                    nu++;
                }
            }
            /* Robust sigma: 1.4826 x median absolute deviation about the
             * median, floored at 1 millipixel so that noise-free data are not
             * over-clipped. */
            double medx = median(tmp, nu, scratch), medy = median(tmp2, nu, scratch);
            for (size_t k = 0; k < nu; k++) {
                tmp[k] = fabs(tmp[k] - medx);
                tmp2[k] = fabs(tmp2[k] - medy);
            }
            double sx = fmax(1.4826 * median(tmp, nu, scratch), 1e-3);
            double sy = fmax(1.4826 * median(tmp2, nu, scratch), 1e-3);
            size_t nnew = 0;
            int changed = 0;
            for (size_t k = 0; k < nm; k++) {
                newuse[k] = fabs(rx[k] - medx) <= opts->clip_sigma * sx &&
                            fabs(ry[k] - medy) <= opts->clip_sigma * sy;
                nnew += newuse[k];
                changed |= newuse[k] != use[k];
            }
            if (!changed)
                break;
            if (nnew < (size_t)min_matches)
                break; /* keep the last fit with enough points */
            memcpy(use, newuse, nm);
        }
        if (!ok) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "the %zu matched stars do not constrain a transform (collinear or "
                                 "coincident positions)",
                                 nm);
            goto cleanup;
        }
        *poly = fit;
        /* Statistics of the kept matches, corrected for the fitted degrees
         * of freedom: rms^2 = sum r^2 / (n - p). */
        nkept = 0;
        double s2x = 0, s2y = 0;
        for (size_t k = 0; k < nm; k++)
            if (use[k]) {
                s2x += rx[k] * rx[k];
                s2y += ry[k] * ry[k];
                ia[nkept] = ia[k];
                ib[nkept] = ib[k];
                nkept++;
            }
        if (nkept < (size_t)min_matches) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "only %zu of %zu matched stars survive %.1f-sigma clipping (at "
                                 "least %d needed)",
                                 nkept, nm, opts->clip_sigma, min_matches);
            goto cleanup;
        }
        int p = ncoef(poly->order);
        double dof = nkept > (size_t)p ? (double)(nkept - (size_t)p) : (double)nkept;
        out->rms_x_px = sqrt(s2x / dof);
        out->rms_y_px = sqrt(s2y / dof);
        out->nmatch = (int)nkept;
        out->order = poly->order;
        /* Next radius: four times the scatter, never below match_radius_px
         * and never growing. Stop when the radius and the kept set are stable. */
        double next = fmax(opts->match_radius_px, 4.0 * fmax(out->rms_x_px, out->rms_y_px));
        if (next > radius)
            next = radius;
        int same = next == radius && nkept == nprev;
        for (size_t k = 0; same && k < nkept; k++)
            same = ia[k] == prev_ia[k] && ib[k] == prev_ib[k];
        memcpy(prev_ia, ia, nkept * sizeof *ia);
        memcpy(prev_ib, ib, nkept * sizeof *ib);
        nprev = nkept;
        radius = next;
        if (same && iter > 0)
            break;
    }
    /* 4. Sanity of the result. A true registration leaves a scatter of the
     *    order of the centroid errors, well inside the match radius, and many
     *    more matches than two unrelated star fields would give by chance
     *    within the final radius: lambda = na nb pi r^2 / A (A the area the
     *    science stars span); ask for lambda + 5 sqrt(lambda) + 3. */
    if (fmax(out->rms_x_px, out->rms_y_px) > 0.5 * opts->match_radius_px) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "the %zu matched stars scatter by (%.2f, %.2f) px RMS about the best "
                             "transform, too much for a registration (at most half the %.1f px "
                             "match radius, align.match_radius_px)",
                             nkept, out->rms_x_px, out->rms_y_px, opts->match_radius_px);
        goto cleanup;
    }
    {
        double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
        for (size_t i = 0; i < na; i++)
            if (isfinite(ax[i]) && isfinite(ay[i])) {
                xmin = fmin(xmin, ax[i]);
                xmax = fmax(xmax, ax[i]);
                ymin = fmin(ymin, ay[i]);
                ymax = fmax(ymax, ay[i]);
            }
        double area = fmax((xmax - xmin) * (ymax - ymin), 1.0);
        double lambda = (double)na * (double)nb * 3.14159265358979323846 * radius * radius / area;
        if ((double)nkept < lambda + 5.0 * sqrt(lambda) + 3.0) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "only %zu stars match within %.1f px where %.1f would match by "
                                 "chance: no significant registration",
                                 nkept, radius, lambda);
            goto cleanup;
        }
    }
    out->ia = malloc((nkept + 1) * sizeof *out->ia);
    out->ib = malloc((nkept + 1) * sizeof *out->ib);
    if (out->ia == NULL || out->ib == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the match list");
        goto cleanup;
    }
    memcpy(out->ia, prev_ia, nkept * sizeof *ia);
    memcpy(out->ib, prev_ib, nkept * sizeof *ib);

cleanup:
    if (st != HILAL_OK) {
        hilal_match_result_clear(out);
        hilal_poly2d_zero(poly, xc, yc, norm);
    }
    free(best_b);
    free(best_a);
    free(best_b_d2);
    free(best_a_d2);
    free(px);
    free(py);
    free(ia);
    free(ib);
    free(prev_ia);
    free(prev_ib);
    free(mx);
    free(my);
    free(ex);
    free(ey);
    free(rx);
    free(ry);
    free(tmp);
    free(tmp2);
    free(scratch);
    free(use);
    free(newuse);
    free(hist);
    free(vdx);
    free(vdy);
    return st;
}
