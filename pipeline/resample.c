/* Lanczos3 resampling through a coarse-grid pixel map. See resample.h and
 * docs/align.md. */
#include "resample.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define VAR_MASKED 1e30f /* variance of unusable pixels (the background stage's convention) */

/* ------------------------------------------------------------------------
 * The node grid
 * ------------------------------------------------------------------------ */

void hilal_pixgrid_clear(hilal_pixgrid *g)
{
    if (g == NULL)
        return;
    free(g->u);
    free(g->v);
    free(g->jac);
    memset(g, 0, sizeof *g);
}

/* Nodes along an axis of n pixels with spacing step: enough that the last
 * node lies at or beyond pixel n - 1, and at least 2. */
static long nodes_for(long n, long step)
{
    long k = (n - 1 + step - 1) / step + 1;
    return k < 2 ? 2 : k;
}

/* Evaluates fn at n 0-based positions, in batches (wcslib works on arrays). */
static hilal_status eval_map(hilal_pixmap_fn fn, void *user, size_t n, const double *x0,
                             const double *y0, double *u0, double *v0, hilal_error *err)
{
    const size_t batch = 1 << 16;
    double *x = malloc(batch * sizeof *x), *y = malloc(batch * sizeof *y);
    hilal_status st = HILAL_OK;
    if (x == NULL || y == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory evaluating a pixel map");
        goto cleanup;
    }
    for (size_t s = 0; s < n; s += batch) {
        size_t m = n - s < batch ? n - s : batch;
        /* 0-based output pixels -> FITS 1-based for the map, and back. */
        for (size_t k = 0; k < m; k++) {
            x[k] = x0[s + k] + 1.0;
            y[k] = y0[s + k] + 1.0;
        }
        st = fn(user, (int)m, x, y, u0 + s, v0 + s, err);
        if (st != HILAL_OK)
            goto cleanup;
        for (size_t k = 0; k < m; k++) {
            u0[s + k] -= 1.0;
            v0[s + k] -= 1.0;
        }
    }
cleanup:
    free(x);
    free(y);
    return st;
}

static int node_ok(const hilal_pixgrid *g, long i, long j)
{
    size_t k = (size_t)(j * g->gx + i);
    return isfinite(g->u[k]) && isfinite(g->v[k]);
}

/* Jacobian determinant |det d(u,v)/d(x,y)| at every node, by central
 * differences of the node positions (one-sided at the borders and next to
 * undefined nodes). */
static void node_jacobians(hilal_pixgrid *g)
{
    for (long j = 0; j < g->gy; j++)
        for (long i = 0; i < g->gx; i++) {
            size_t k = (size_t)(j * g->gx + i);
            g->jac[k] = NAN;
            if (!node_ok(g, i, j))
                continue;
            long a = i, b = i, c = j, d = j;
            if (i > 0 && node_ok(g, i - 1, j))
                a = i - 1;
            if (i < g->gx - 1 && node_ok(g, i + 1, j))
                b = i + 1;
            if (j > 0 && node_ok(g, i, j - 1))
                c = j - 1;
            if (j < g->gy - 1 && node_ok(g, i, j + 1))
                d = j + 1;
            if (a == b || c == d)
                continue;
            size_t ka = (size_t)(j * g->gx + a), kb = (size_t)(j * g->gx + b);
            size_t kc = (size_t)(c * g->gx + i), kd = (size_t)(d * g->gx + i);
            double hx = (double)((b - a) * g->step), hy = (double)((d - c) * g->step);
            double dudx = (g->u[kb] - g->u[ka]) / hx, dvdx = (g->v[kb] - g->v[ka]) / hx;
            double dudy = (g->u[kd] - g->u[kc]) / hy, dvdy = (g->v[kd] - g->v[kc]) / hy;
            g->jac[k] = fabs(dudx * dvdy - dudy * dvdx);
        }
}

hilal_status hilal_pixgrid_build(long nx, long ny, hilal_pixmap_fn fn, void *user, long step0,
                                 double tol_px, hilal_pixgrid *g, hilal_error *err)
{
    memset(g, 0, sizeof *g);
    hilal_status st = HILAL_OK;
    double *cx = NULL, *cy = NULL, *cu = NULL, *cv = NULL, *nx0 = NULL, *ny0 = NULL;
    long step = step0 < 1 ? 1 : step0;
    for (;;) {
        hilal_pixgrid_clear(g);
        free(cx), free(cy), free(cu), free(cv), free(nx0), free(ny0);
        cx = cy = cu = cv = nx0 = ny0 = NULL;
        g->nx = nx;
        g->ny = ny;
        g->step = step;
        g->gx = nodes_for(nx, step);
        g->gy = nodes_for(ny, step);
        size_t nn = (size_t)(g->gx * g->gy), nc = (size_t)((g->gx - 1) * (g->gy - 1));
        g->u = malloc(nn * sizeof *g->u);
        g->v = malloc(nn * sizeof *g->v);
        g->jac = malloc(nn * sizeof *g->jac);
        nx0 = malloc(nn * sizeof *nx0);
        ny0 = malloc(nn * sizeof *ny0);
        cx = malloc(nc * sizeof *cx);
        cy = malloc(nc * sizeof *cy);
        cu = malloc(nc * sizeof *cu);
        cv = malloc(nc * sizeof *cv);
        if (!g->u || !g->v || !g->jac || !nx0 || !ny0 || !cx || !cy || !cu || !cv) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %ld x %ld map grid",
                                 g->gx, g->gy);
            goto cleanup;
        }
        /* Exact map at the nodes. */
        for (long j = 0; j < g->gy; j++)
            for (long i = 0; i < g->gx; i++) {
                nx0[j * g->gx + i] = (double)(i * step);
                ny0[j * g->gx + i] = (double)(j * step);
            }
        st = eval_map(fn, user, nn, nx0, ny0, g->u, g->v, err);
        if (st != HILAL_OK)
            goto cleanup;
        node_jacobians(g);
        if (step == 1)
            break;
        /* Exact map at the cell centres, compared with the bilinear value
         * there (the mean of the four corners): the quadratic part of the
         * map, which bilinear interpolation misses, is largest there. */
        for (long j = 0; j < g->gy - 1; j++)
            for (long i = 0; i < g->gx - 1; i++) {
                cx[j * (g->gx - 1) + i] = ((double)i + 0.5) * (double)step;
                cy[j * (g->gx - 1) + i] = ((double)j + 0.5) * (double)step;
            }
        st = eval_map(fn, user, nc, cx, cy, cu, cv, err);
        if (st != HILAL_OK)
            goto cleanup;
        double maxerr = 0;
        for (long j = 0; j < g->gy - 1; j++)
            for (long i = 0; i < g->gx - 1; i++) {
                size_t k00 = (size_t)(j * g->gx + i), k10 = k00 + 1;
                size_t k01 = k00 + (size_t)g->gx, k11 = k01 + 1;
                double bu = 0.25 * (g->u[k00] + g->u[k10] + g->u[k01] + g->u[k11]);
                double bv = 0.25 * (g->v[k00] + g->v[k10] + g->v[k01] + g->v[k11]);
                size_t c = (size_t)(j * (g->gx - 1) + i);
                double e = fmax(fabs(bu - cu[c]), fabs(bv - cv[c]));
                if (isfinite(e) && e > maxerr)
                    maxerr = e;
            }
        g->max_err_px = maxerr;
        if (maxerr <= tol_px)
            break;
        step /= 2;
    }
cleanup:
    free(cx);
    free(cy);
    free(cu);
    free(cv);
    free(nx0);
    free(ny0);
    if (st != HILAL_OK)
        hilal_pixgrid_clear(g);
    return st;
}

void hilal_pixgrid_eval(const hilal_pixgrid *g, double x, double y, double *u, double *v,
                        double *jac)
{
    /* Cell containing (x, y) and the fractional position inside it. */
    long i = (long)floor(x / (double)g->step), j = (long)floor(y / (double)g->step);
    if (i < 0)
        i = 0;
    if (j < 0)
        j = 0;
    if (i > g->gx - 2)
        i = g->gx - 2;
    if (j > g->gy - 2)
        j = g->gy - 2;
    double fx = x / (double)g->step - (double)i, fy = y / (double)g->step - (double)j;
    size_t k00 = (size_t)(j * g->gx + i), k10 = k00 + 1, k01 = k00 + (size_t)g->gx, k11 = k01 + 1;
    double w00 = (1 - fx) * (1 - fy), w10 = fx * (1 - fy), w01 = (1 - fx) * fy, w11 = fx * fy;
    *u = w00 * g->u[k00] + w10 * g->u[k10] + w01 * g->u[k01] + w11 * g->u[k11];
    *v = w00 * g->v[k00] + w10 * g->v[k10] + w01 * g->v[k01] + w11 * g->v[k11];
    if (jac != NULL)
        *jac = w00 * g->jac[k00] + w10 * g->jac[k10] + w01 * g->jac[k01] + w11 * g->jac[k11];
}

/* ------------------------------------------------------------------------
 * The Lanczos3 kernel
 * ------------------------------------------------------------------------ */

double hilal_lanczos3(double t)
{
    /* L(t) = sinc(t) sinc(t/3) = 3 sin(pi t) sin(pi t / 3) / (pi t)^2. */
    t = fabs(t);
    if (t >= 3.0)
        return 0.0;
    if (t < 1e-8)
        return 1.0;
    const double pi = 3.14159265358979323846;
    double pt = pi * t;
    return 3.0 * sin(pt) * sin(pt / 3.0) / (pt * pt);
}

/* The six normalised tap weights tabulated against the sub-pixel phase f in
 * [0, 1] at NPHASE + 1 points and interpolated linearly in f: a linear
 * combination of normalised weight sets is normalised, and the error of the
 * interpolation, (1/NPHASE)^2/8 max|d^2w/df^2| ~ 3e-7, is far below the
 * float precision of the data. */
#define NPHASE 2048
static double phase_w[NPHASE + 1][6];
static pthread_once_t phase_once = PTHREAD_ONCE_INIT;

static void phase_init(void)
{
    for (int p = 0; p <= NPHASE; p++) {
        double f = (double)p / NPHASE, s = 0;
        for (int k = 0; k < 6; k++) {
            phase_w[p][k] = hilal_lanczos3(f + 2.0 - k); /* tap k at distance f + 2 - k */
            s += phase_w[p][k];
        }
        for (int k = 0; k < 6; k++)
            phase_w[p][k] /= s;
    }
}

/* The 6 taps around input coordinate c (0-based): the index of the first
 * tap (floor(c) - 2), the weights (sum 1) and their sum of squares. */
static inline long taps(double c, double w[6], double *w2)
{
    double fl = floor(c);
    double t = (c - fl) * NPHASE;
    int p = (int)t;
    if (p >= NPHASE)
        p = NPHASE - 1;
    double a = t - p, q = 0;
    const double *w0 = phase_w[p], *w1 = phase_w[p + 1];
    for (int k = 0; k < 6; k++) {
        w[k] = w0[k] + a * (w1[k] - w0[k]);
        q += w[k] * w[k];
    }
    *w2 = q;
    return (long)fl - 2;
}

/* ------------------------------------------------------------------------
 * The resampling loop
 * ------------------------------------------------------------------------ */

typedef struct worker {
    const hilal_image *in;
    const hilal_pixgrid *g;
    hilal_image *out;
    double mask_weight;
    long y0, y1;
    size_t ncov, nnodata;
    double sum_w2, sum_jac;
    int nomem;
} worker;

/* Bilinear sample of a smooth plane (the sky map) at 0-based (u, v), clamped
 * to the image. */
static float bilinear(const float *p, long nx, long ny, double u, double v)
{
    if (u < 0)
        u = 0;
    if (v < 0)
        v = 0;
    if (u > nx - 1)
        u = (double)(nx - 1);
    if (v > ny - 1)
        v = (double)(ny - 1);
    long i = (long)u, j = (long)v;
    if (i > nx - 2)
        i = nx > 1 ? nx - 2 : 0;
    if (j > ny - 2)
        j = ny > 1 ? ny - 2 : 0;
    double fx = u - (double)i, fy = v - (double)j;
    long i1 = nx > 1 ? i + 1 : i, j1 = ny > 1 ? j + 1 : j;
    return (float)((1 - fx) * (1 - fy) * p[j * nx + i] + fx * (1 - fy) * p[j * nx + i1] +
                   (1 - fx) * fy * p[j1 * nx + i] + fx * fy * p[j1 * nx + i1]);
}

static void *resample_rows(void *arg)
{
    worker *wk = arg;
    const hilal_image *in = wk->in;
    const hilal_pixgrid *g = wk->g;
    hilal_image *out = wk->out;
    const long rnx = in->nx, rny = in->ny, onx = out->nx;
    const float *inp = in->pix, *inv = in->var, *ins = in->sky;
    const hilal_mask_t *inm = in->mask;
    const double mw = wk->mask_weight;
    double *ru = malloc((size_t)g->gx * sizeof *ru), *rv = malloc((size_t)g->gx * sizeof *rv);
    double *rj = malloc((size_t)g->gx * sizeof *rj);
    if (ru == NULL || rv == NULL || rj == NULL) {
        wk->nomem = 1;
        goto cleanup;
    }
    for (long y = wk->y0; y < wk->y1; y++) {
        /* Interpolate the node grid along y once per row. */
        long j = y / g->step;
        if (j > g->gy - 2)
            j = g->gy - 2;
        double fy = (double)(y - j * g->step) / (double)g->step;
        for (long i = 0; i < g->gx; i++) {
            size_t a = (size_t)(j * g->gx + i), b = a + (size_t)g->gx;
            ru[i] = (1 - fy) * g->u[a] + fy * g->u[b];
            rv[i] = (1 - fy) * g->v[a] + fy * g->v[b];
            rj[i] = (1 - fy) * g->jac[a] + fy * g->jac[b];
        }
        for (long x = 0; x < onx; x++) {
            size_t o = (size_t)(y * onx + x);
            long i = x / g->step;
            if (i > g->gx - 2)
                i = g->gx - 2;
            double fx = (double)(x - i * g->step) / (double)g->step;
            double u = (1 - fx) * ru[i] + fx * ru[i + 1];
            double v = (1 - fx) * rv[i] + fx * rv[i + 1];
            double jac = (1 - fx) * rj[i] + fx * rj[i + 1];
            /* Outside the input (or no map): no data. */
            if (!isfinite(u) || !isfinite(v) || !isfinite(jac) || u < -0.5 ||
                v < -0.5 || u > (double)rnx - 0.5 || v > (double)rny - 0.5) {
                out->pix[o] = NAN;
                out->mask[o] = HILAL_MASK_NODATA | HILAL_MASK_EDGE;
                if (out->var)
                    out->var[o] = VAR_MASKED;
                if (out->sky)
                    out->sky[o] = NAN;
                wk->nnodata++;
                continue;
            }
            double wx[6], wy[6], qx, qy;
            long ix0 = taps(u, wx, &qx), iy0 = taps(v, wy, &qy);
            double sp = 0, sv = 0, W = 0, Wa = 0;
            hilal_mask_t m = 0;
            int done = 0;
            /* Fast path: the whole 6 x 6 footprint inside the input and
             * usable. Separable sums: sum_b wy_b sum_a wx_a p(a, b), and the
             * same with squared weights for the variance. */
            if (ix0 >= 0 && iy0 >= 0 && ix0 + 5 < rnx && iy0 + 5 < rny) {
                hilal_mask_t mor = 0;
                for (int b = 0; b < 6; b++) {
                    const hilal_mask_t *mr = inm + (iy0 + b) * rnx + ix0;
                    mor |= mr[0] | mr[1] | mr[2] | mr[3] | mr[4] | mr[5];
                }
                if ((mor & HILAL_MASK_UNUSABLE) == 0) {
                    /* single precision here: 7 significant digits are ample
                     * for sums of 36 data values, and it vectorises */
                    float fx6[6], fy6[6], ax6[6], ay6[6], sax = 0.0f, say = 0.0f;
                    for (int t = 0; t < 6; t++) {
                        fx6[t] = (float)wx[t];
                        fy6[t] = (float)wy[t];
                        ax6[t] = fabsf(fx6[t]);
                        ay6[t] = fabsf(fy6[t]);
                        sax += ax6[t];
                        say += ay6[t];
                    }
                    for (int t = 0; t < 6; t++) {
                        ax6[t] /= sax;
                        ay6[t] /= say;
                    }
                    float acc = 0.0f, accv = 0.0f;
                    for (int b = 0; b < 6; b++) {
                        const float *pr = inp + (iy0 + b) * rnx + ix0;
                        float r = fx6[0] * pr[0] + fx6[1] * pr[1] + fx6[2] * pr[2] +
                                  fx6[3] * pr[3] + fx6[4] * pr[4] + fx6[5] * pr[5];
                        acc += fy6[b] * r;
                    }
                    if (inv != NULL)
                        for (int b = 0; b < 6; b++) {
                            const float *vr = inv + (iy0 + b) * rnx + ix0;
                            float r = ax6[0] * vr[0] + ax6[1] * vr[1] + ax6[2] * vr[2] +
                                      ax6[3] * vr[3] + ax6[4] * vr[4] + ax6[5] * vr[5];
                            accv += ay6[b] * r;
                        }
                    sp = acc;
                    sv = accv;
                    Wa = 1.0;
                    /* Masks of the taps with a non-negligible weight. */
                    if (mor != 0)
                        for (int b = 0; b < 6; b++)
                            for (int a = 0; a < 6; a++)
                                if (fabs(wx[a] * wy[b]) >= mw)
                                    m |= inm[(iy0 + b) * rnx + ix0 + a];
                    W = 1.0;
                    done = isfinite(sp) && isfinite(sv) && sv < 1e20;
                }
            }
            if (!done) {
                /* General path: skip taps outside the input or unusable
                 * (masked, non-finite, masked variance) and renormalise by
                 * the weight W of those used. */
                sp = sv = W = Wa = 0;
                m = 0;
                double spall = 0, wall = 0;
                int edge = 0, interp = 0;
                for (int b = 0; b < 6; b++) {
                    long yy = iy0 + b;
                    for (int a = 0; a < 6; a++) {
                        long xx = ix0 + a;
                        double w = wx[a] * wy[b];
                        int sig = fabs(w) >= mw;
                        if (xx < 0 || yy < 0 || xx >= rnx || yy >= rny) {
                            edge |= sig;
                            continue;
                        }
                        size_t k = (size_t)(yy * rnx + xx);
                        if (sig)
                            m |= inm[k];
                        float p = inp[k];
                        int finite = isfinite(p);
                        int good = finite && (inm[k] & HILAL_MASK_UNUSABLE) == 0 &&
                                   (inv == NULL || (isfinite(inv[k]) && inv[k] < 1e29f));
                        if (finite) {
                            spall += w * p;
                            wall += w;
                        }
                        if (!good) {
                            interp |= sig;
                            continue;
                        }
                        sp += w * p;
                        if (inv != NULL)
                            sv += fabs(w) * inv[k];
                        W += w;
                        Wa += fabs(w);
                    }
                }
                if (edge)
                    m |= HILAL_MASK_EDGE | HILAL_MASK_NODATA;
                if (interp)
                    m |= HILAL_MASK_INTERP;
                if (W < 0.5) {
                    /* Mostly unusable footprint: keep a representative value
                     * when there is one, but no usable variance. */
                    out->pix[o] = fabs(wall) >= 0.5 ? (float)(jac * spall / wall) : NAN;
                    if ((m & HILAL_MASK_UNUSABLE) == 0)
                        m |= HILAL_MASK_NODATA;
                    out->mask[o] = m;
                    if (out->var)
                        out->var[o] = VAR_MASKED;
                    if (out->sky)
                        out->sky[o] = (float)(jac * bilinear(ins, rnx, rny, u, v));
                    wk->nnodata += (m & HILAL_MASK_NODATA) != 0;
                    continue;
                }
            }
            /* Flux conservation: an output pixel covers `jac` input pixels. */
            out->pix[o] = (float)(jac * sp / W);
            if (out->var)
                out->var[o] = (float)(jac * sv / Wa);
            if (out->sky)
                out->sky[o] = (float)(jac * bilinear(ins, rnx, rny, u, v));
            out->mask[o] = m;
            wk->nnodata += (m & HILAL_MASK_NODATA) != 0;
            wk->ncov++;
            wk->sum_w2 += qx * qy;
            wk->sum_jac += jac;
        }
    }
cleanup:
    free(ru);
    free(rv);
    free(rj);
    return NULL;
}

hilal_status hilal_resample_lanczos3(const hilal_image *in, const hilal_pixgrid *g,
                                     double mask_weight, int threads, hilal_image **out,
                                     hilal_resample_stats *stats, hilal_error *err)
{
    *out = NULL;
    hilal_status st = HILAL_OK;
    worker *wk = NULL;
    pthread_t *tid = NULL;
    int nstarted = 0;
    pthread_once(&phase_once, phase_init);
    hilal_image *res = hilal_image_new(g->nx, g->ny, err);
    if (res == NULL)
        return HILAL_ERR_NOMEM;
    if ((in->var != NULL && hilal_image_alloc_var(res, err) != HILAL_OK) ||
        (in->sky != NULL && hilal_image_alloc_sky(res, err) != HILAL_OK) ||
        hilal_meta_copy(&res->meta, &in->meta, err) != HILAL_OK) {
        st = err && err->code ? err->code : HILAL_ERR_NOMEM;
        goto cleanup;
    }
    res->sky_rms_adu = in->sky_rms_adu;
    if (threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        threads = nc > 0 ? (int)nc : 1;
    }
    if (threads > g->ny)
        threads = (int)g->ny;
    if (threads > 64)
        threads = 64;
    wk = calloc((size_t)threads, sizeof *wk);
    tid = calloc((size_t)threads, sizeof *tid);
    if (wk == NULL || tid == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for resampling threads");
        goto cleanup;
    }
    /* Rows split into equal contiguous blocks, one per thread. */
    for (int t = 0; t < threads; t++) {
        wk[t].in = in;
        wk[t].g = g;
        wk[t].out = res;
        wk[t].mask_weight = mask_weight;
        wk[t].y0 = g->ny * t / threads;
        wk[t].y1 = g->ny * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, resample_rows, &wk[t]) != 0) {
            /* Could not start a thread: do its rows here afterwards. */
            break;
        }
        nstarted = t;
    }
    resample_rows(&wk[0]);
    for (int t = 1; t <= nstarted; t++)
        pthread_join(tid[t], NULL);
    for (int t = nstarted + 1; t < threads; t++)
        resample_rows(&wk[t]);
    hilal_resample_stats s = {0};
    double sw2 = 0, sj = 0;
    for (int t = 0; t < threads; t++) {
        if (wk[t].nomem) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory in a resampling thread");
            goto cleanup;
        }
        s.ncovered += wk[t].ncov;
        s.nnodata += wk[t].nnodata;
        sw2 += wk[t].sum_w2;
        sj += wk[t].sum_jac;
    }
    s.mean_w2 = s.ncovered ? sw2 / (double)s.ncovered : NAN;
    s.mean_jac = s.ncovered ? sj / (double)s.ncovered : NAN;
    if (stats != NULL)
        *stats = s;
cleanup:
    free(wk);
    free(tid);
    if (st != HILAL_OK) {
        hilal_image_free(res);
        res = NULL;
    }
    *out = res;
    return st;
}
