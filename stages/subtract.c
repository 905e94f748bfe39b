/* The subtract stage: ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam
 * 2016, ApJ 830, 27; "ZOGY" below), and hilal_zogy_run(), the pure function
 * behind it. docs/zogy.md writes the mathematics out.
 *
 * Outline of hilal_zogy_run():
 *  1. Normalise the PSFs; take the background RMS of both images.
 *  2. On a small grid (a few PSF sizes), compute the kernels k_n, k_r of
 *     S (eqs. 28-29) and of D, and P_D (eq. 14) in real space; their extent
 *     fixes the padding and the width of the edge strip.
 *  3. Fill unusable pixels of either image with 0 in both; extend both
 *     images by mirror reflection to an FFT-friendly size (one pass, which
 *     also makes the difference mask).
 *  4. FFT N, R, P_n, P_r once; in one pass over the frequencies form D-hat
 *     (eq. 13), S-hat (eq. 17), S_N-hat and the sum F_S (eq. 41).
 *  5. Inverse FFTs give D, S and S_N (S_R = S_N - S) for the astrometric
 *     noise (eqs. 30-31).
 *  6. Source noise (eqs. 26-27): the variance in excess of the background
 *     is convolved with k_n^2 and k_r^2 (two more forward FFTs of the maps,
 *     the squared-kernel spectra summed from their few rows, one inverse).
 *  7. Near the edges, where the mirror makes a pixel enter S more than
 *     once, the variance and F_S are summed directly over the folded
 *     kernels, so S_corr keeps unit variance right up to the edge.
 *  8. S_corr (eq. 25), flux and its error (eqs. 41-43), robust statistics.
 * All transforms are in place, in four arrays that a workspace keeps from
 * one frame to the next.
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hilal/fft.h"
#include "hilal/log.h"
#include "hilal/stage.h"
#include "hilal/stats.h"
#include "hilal/zogy.h"
#include "parallel.h"
#include "psf_config.h"

#define MAX_THREADS HILAL_PARALLEL_MAX_THREADS

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* Fraction of the energy (sum of squares) of a kernel that may fall outside
 * its radius: the S kernels are truncated there for the variance and edge
 * computations, the D kernels only set the padding. */
#define KERNEL_TAIL_S 1e-4
#define KERNEL_TAIL_D 1e-4

/* Floor of V(S) relative to its background value F_S, against round-off in
 * regions where almost every pixel was filled. */
#define VAR_FLOOR_REL 1e-6

/* Variances at or above this (ADU^2) mark masked pixels: the background and
 * align stages write 1e30 there. Such pixels are filled like unusable ones
 * (their values must never reach a transform). */
#define VAR_MASKED 1e20
#define VAR_MASKED_F 1e20f

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------ */

/* Mirror index: the image extended by reflection about its edges (the edge
 * pixel repeated: ... 2 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...), periodic with
 * period 2n, so any integer maps into [0, n). */
static long reflect(long i, long n)
{
    long p = 2 * n;
    i %= p;
    if (i < 0)
        i += p;
    return i < n ? i : p - 1 - i;
}

/* Wrap an offset into [0, n) (for embedding kernels centred at the origin). */
static long wrap(long i, long n)
{
    i %= n;
    return i < 0 ? i + n : i;
}

/* Median and 1.4826 * MAD of the values of v at positions where keep is
 * non-zero (keep may be NULL: all), sampling at most ~2 million of them on
 * a regular stride. Non-finite values are skipped. Returns the number of
 * values used (0: *med and *sigma NaN); -1 when out of memory. */
static long robust_stats(const float *v, const unsigned char *keep, size_t n, double *med,
                         double *sigma)
{
    *med = NAN;
    *sigma = NAN;
    size_t stride = n / 2000000 + 1;
    float *s = malloc(sizeof *s * (n / stride + 1));
    if (s == NULL)
        return -1;
    size_t m = 0;
    for (size_t i = 0; i < n; i += stride)
        if ((keep == NULL || keep[i]) && isfinite(v[i]))
            s[m++] = v[i];
    if (m > 0) {
        float md = hilal_select_kth_float(s, m, m / 2);
        for (size_t i = 0; i < m; i++)
            s[i] = fabsf(s[i] - md);
        float mad = hilal_select_kth_float(s, m, m / 2);
        *med = md;
        *sigma = 1.4826 * mad;
    }
    free(s);
    return (long)m;
}

/* ------------------------------------------------------------------------
 * The state of one run
 * ------------------------------------------------------------------------ */

typedef struct psf_d {
    int size;       /* odd side */
    double *v;      /* normalised values, size*size */
} psf_d;

typedef struct zogy {
    /* inputs: the images are fnx x fny (row stride fnx); the products are
     * computed for the window of nx x ny pixels starting at (ox, oy) */
    long fnx, fny;
    long ox, oy, nx, ny;
    const float *pix[2], *sky[2], *var[2];  /* [0] science N, [1] reference R */
    const hilal_mask_t *msk[2];              /* masks (may be NULL) */
    double sigma[2];                         /* sigma_N, sigma_R, ADU */
    double fn, fr;                           /* F_n, F_r = 1 */
    double sx, sy;                           /* registration RMS, px */
    int use_src;                             /* source noise on */
    int use_ast;                             /* astrometric noise on (and non-zero) */
    int threads;
    psf_d psf[2];                            /* P_n, P_r */

    /* small-grid results */
    int h;                                   /* radius of the S kernels, px */
    int hd;                                  /* radius of the D kernels, px */
    double *k[2];                            /* k_n, k_r on (2h+1)^2, k(ux,uy) at [(uy+h)(2h+1)+ux+h] */

    /* big grid */
    long mx, my, mxc;                        /* FFT size and half-spectrum width */
    long rs;                                 /* floats per row of a padded real array */
    long *ixmap, *iymap;                     /* padded index -> image column / row */
    long xrun;                               /* padded columns [0, xrun) are image columns ox + x */
    long *orow;                              /* extent row -> the first padded row showing it */
    const hilal_fft_plan *plan;
    /* The extent: the image pixels the padded grid reads, [ex0, ex0 + enx) x
     * [ey0, ey0 + eny) (the window plus the padding, within the image). */
    long ex0, ey0, enx, eny;
    unsigned char *bad;                      /* 1 where the pixel was filled; extent, stride enx */
    const unsigned char *wbad;               /* bad at the window origin (stride enx) */
    /* FFT arrays (from the workspace): four arrays transformed in place,
     * each a padded real array (rows of rs floats) or its half-spectrum */
    struct ws_set *set;
    hilal_fft_complex *c[4];

    /* spectral sums */
    double fs_part[MAX_THREADS];
    double f_s;                              /* F_S (eq. 41) */
    double f_d;                              /* F_D (eq. 15) */

    /* outputs (borrowed from the hilal_diff), window-sized */
    float *d, *s, *scorr, *flux, *flux_err;
    hilal_mask_t *mask;
    /* S and S_N on the padded grid, unnormalised (c2r outputs), for the
     * astrometric term; V(S_N) + V(S_R) likewise for the source noise */
    const float *sp, *snp, *vp;
} zogy;

/* ------------------------------------------------------------------------
 * The workspace: FFT arrays kept between runs
 * ------------------------------------------------------------------------ */

/* One set of FFT arrays for an mx x my grid and a fill map, lent to one run
 * at a time. Reusing them spares the kernel from zeroing ~400 MB of fresh
 * pages per 4k frame, and keeps their huge pages. */
typedef struct ws_set {
    long mx, my;
    int busy;
    hilal_fft_complex *c[4];
    unsigned char *bad;
    size_t bad_cap;
    struct ws_set *next;
} ws_set;

struct hilal_zogy_workspace {
    pthread_mutex_t lock;
    ws_set *sets;
};

static void ws_set_free(ws_set *w)
{
    if (w == NULL)
        return;
    for (int q = 0; q < 4; q++)
        hilal_fft_free(w->c[q]);
    free(w->bad);
    free(w);
}

static hilal_status ws_set_new(long mx, long my, ws_set **out, hilal_error *err)
{
    *out = NULL;
    ws_set *w = calloc(1, sizeof *w);
    if (w == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %ld x %ld FFT arrays", mx,
                               my);
    w->mx = mx;
    w->my = my;
    for (int q = 0; q < 4; q++)
        if ((w->c[q] = hilal_fft_alloc_complex(mx, my, err)) == NULL) {
            ws_set_free(w);
            return HILAL_ERR_NOMEM;
        }
    *out = w;
    return HILAL_OK;
}

hilal_status hilal_zogy_workspace_new(hilal_zogy_workspace **out, hilal_error *err)
{
    *out = calloc(1, sizeof **out);
    if (*out == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the ZOGY workspace");
    if (pthread_mutex_init(&(*out)->lock, NULL) != 0) {
        free(*out);
        *out = NULL;
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "could not make the ZOGY workspace lock");
    }
    return HILAL_OK;
}

void hilal_zogy_workspace_free(hilal_zogy_workspace *ws)
{
    if (ws == NULL)
        return;
    while (ws->sets != NULL) {
        ws_set *next = ws->sets->next;
        ws_set_free(ws->sets);
        ws->sets = next;
    }
    pthread_mutex_destroy(&ws->lock);
    free(ws);
}

/* Lends a set of arrays for an mx x my grid: an idle one of that size from
 * the workspace, else a new one (kept in the workspace when there is one).
 * Idle sets of other sizes are freed: a night has one frame size, and a
 * workspace must not hoard arrays of sizes no longer used. */
static hilal_status ws_acquire(hilal_zogy_workspace *ws, long mx, long my, ws_set **out,
                               hilal_error *err)
{
    if (ws == NULL)
        return ws_set_new(mx, my, out, err);
    ws_set *got = NULL, *drop = NULL;
    pthread_mutex_lock(&ws->lock);
    for (ws_set **pp = &ws->sets; *pp != NULL;) {
        ws_set *w = *pp;
        if (!w->busy && w->mx == mx && w->my == my && got == NULL) {
            w->busy = 1;
            got = w;
        } else if (!w->busy && (w->mx != mx || w->my != my)) {
            *pp = w->next;
            w->next = drop;
            drop = w;
            continue;
        }
        pp = &w->next;
    }
    pthread_mutex_unlock(&ws->lock);
    while (drop != NULL) {
        ws_set *next = drop->next;
        ws_set_free(drop);
        drop = next;
    }
    if (got != NULL) {
        *out = got;
        return HILAL_OK;
    }
    hilal_status st = ws_set_new(mx, my, out, err);
    if (st != HILAL_OK)
        return st;
    got = *out;
    got->busy = 1;
    pthread_mutex_lock(&ws->lock);
    got->next = ws->sets;
    ws->sets = got;
    pthread_mutex_unlock(&ws->lock);
    return HILAL_OK;
}

/* Gives the set back (to the workspace, or frees it without one). */
static void ws_release(hilal_zogy_workspace *ws, ws_set *w)
{
    if (w == NULL)
        return;
    if (ws == NULL) {
        ws_set_free(w);
        return;
    }
    pthread_mutex_lock(&ws->lock);
    w->busy = 0;
    pthread_mutex_unlock(&ws->lock);
}

/* Index into the extent-sized fill map of image pixel (X, Y). */
static size_t ext_index(const zogy *z, long X, long Y)
{
    return (size_t)(Y - z->ey0) * (size_t)z->enx + (size_t)(X - z->ex0);
}

/* The variance of image pixel (X, Y) of image w used for the noise terms,
 * ADU^2: a filled pixel carries no noise (0); a usable pixel its variance
 * plane value, or sigma^2 without a plane or where the plane is not positive
 * and finite. With the source noise off, sigma^2 everywhere (background
 * only). */
static double pixel_var(const zogy *z, int w, long X, long Y)
{
    double s2 = z->sigma[w] * z->sigma[w];
    if (!z->use_src)
        return s2;
    if (z->bad[ext_index(z, X, Y)])
        return 0.0;
    if (z->var[w] == NULL)
        return s2;
    double v = z->var[w][(size_t)Y * (size_t)z->fnx + (size_t)X];
    return (v > 0 && isfinite(v)) ? v : s2;
}

/* ------------------------------------------------------------------------
 * Step 2: kernels on a small grid
 * ------------------------------------------------------------------------ */

/* Embeds a centred odd-sized stamp so that its central pixel lands on index
 * (0, 0) of an L x L periodic array (the ifftshift of the stamp). */
static void embed_stamp(float *dst, long L, const double *v, int size)
{
    memset(dst, 0, sizeof *dst * (size_t)L * (size_t)L);
    int c = size / 2;
    for (int j = 0; j < size; j++)
        for (int i = 0; i < size; i++)
            dst[wrap(j - c, L) * L + wrap(i - c, L)] += (float)v[j * size + i];
}

/* Smallest radius r (Chebyshev) such that the box |ux|,|uy| <= r holds at
 * least (1 - tail) of the sum of squares of the periodic L x L kernel a. */
static int kernel_radius(const double *a, long L, double tail)
{
    double total = 0;
    for (long i = 0; i < L * L; i++)
        total += a[i] * a[i];
    if (!(total > 0))
        return 0;
    long rmax = L / 2 - 1;
    double cum = 0;
    for (long r = 0; r <= rmax; r++) {
        /* add the ring of Chebyshev radius r */
        for (long uy = -r; uy <= r; uy++)
            for (long ux = -r; ux <= r; ux++) {
                if (labs(ux) != r && labs(uy) != r)
                    continue;
                double v = a[wrap(uy, L) * L + wrap(ux, L)];
                cum += v * v;
            }
        if (cum >= (1.0 - tail) * total)
            return (int)r;
    }
    return (int)rmax;
}

/* FWHM of a centred PSF stamp: where the profiles through the centre along
 * x and y fall to half the peak (linear interpolation), averaged. */
static double stamp_fwhm(const double *v, int size)
{
    int c = size / 2;
    double peak = v[c * size + c];
    if (!(peak > 0))
        return NAN;
    double sum = 0;
    int n = 0;
    const int dirs[4][2] = {{1, 0}, {-1, 0}, {0, 1}, {0, -1}};
    for (int d = 0; d < 4; d++) {
        double prev = peak;
        for (int r = 1; r <= c; r++) {
            double cur = v[(c + dirs[d][1] * r) * size + c + dirs[d][0] * r];
            if (cur <= 0.5 * peak) {
                sum += (r - 1) + (prev - 0.5 * peak) / (prev - cur);
                n++;
                break;
            }
            prev = cur;
        }
    }
    return n > 0 ? 2.0 * sum / n : NAN;
}

/* Computes, on an L x L grid, the S kernels k_n and k_r (eqs. 28-29), the
 * radius of the D kernels F_r P_r / sqrt(den) and F_n P_n / sqrt(den) (the
 * pieces of eq. 13) and P_D (eq. 14), with
 *   den = sigma_n^2 F_r^2 |P_r-hat|^2 + sigma_r^2 F_n^2 |P_n-hat|^2. */
static hilal_status small_kernels(zogy *z, psf_d *pd, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    int smax = z->psf[0].size > z->psf[1].size ? z->psf[0].size : z->psf[1].size;
    long L = hilal_fft_good_size(4 * smax > 64 ? 4 * smax : 64);
    long Lc = L / 2 + 1;
    float *r = NULL;
    hilal_fft_complex *pn = NULL, *pr = NULL, *w = NULL;
    double *kk[5] = {NULL};
    const hilal_fft_plan *plan = NULL;

    st = hilal_fft_plan_get(L, L, 1, HILAL_FFT_ESTIMATE, &plan, err);
    if (st != HILAL_OK)
        goto cleanup;
    r = hilal_fft_alloc_real(L, L, err);
    pn = hilal_fft_alloc_complex(L, L, err);
    pr = hilal_fft_alloc_complex(L, L, err);
    w = hilal_fft_alloc_complex(L, L, err);
    for (int q = 0; q < 5; q++)
        kk[q] = malloc(sizeof *kk[q] * (size_t)(L * L));
    if (r == NULL || pn == NULL || pr == NULL || w == NULL || kk[0] == NULL || kk[1] == NULL ||
        kk[2] == NULL || kk[3] == NULL || kk[4] == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the ZOGY kernels");
        goto cleanup;
    }
    /* P_n-hat and P_r-hat with the PSF centres at the origin. */
    embed_stamp(r, L, z->psf[0].v, z->psf[0].size);
    if ((st = hilal_fft_r2c(plan, r, pn, err)) != HILAL_OK)
        goto cleanup;
    embed_stamp(r, L, z->psf[1].v, z->psf[1].size);
    if ((st = hilal_fft_r2c(plan, r, pr, err)) != HILAL_OK)
        goto cleanup;

    const double fn = z->fn, fr = z->fr;
    const double s2n = z->sigma[0] * z->sigma[0], s2r = z->sigma[1] * z->sigma[1];
    /* q = 0: k_n (eq. 29), 1: k_r (eq. 28), 2: D kernel of N, 3: D kernel of R,
     * 4: P_D (eq. 14). */
    for (int q = 0; q < 5; q++) {
        for (long i = 0; i < L * Lc; i++) {
            double anr = pn[i][0], ani = pn[i][1], arr = pr[i][0], ari = pr[i][1];
            double an = anr * anr + ani * ani, ar = arr * arr + ari * ari;
            double den = s2n * fr * fr * ar + s2r * fn * fn * an;
            double re = 0, im = 0;
            if (den > 1e-300) {
                double sq = sqrt(den);
                switch (q) {
                case 0: /* k_n-hat = F_n F_r^2 conj(P_n-hat) |P_r-hat|^2 / den */
                    re = fn * fr * fr * ar * anr / den;
                    im = -fn * fr * fr * ar * ani / den;
                    break;
                case 1: /* k_r-hat = F_r F_n^2 conj(P_r-hat) |P_n-hat|^2 / den */
                    re = fr * fn * fn * an * arr / den;
                    im = -fr * fn * fn * an * ari / den;
                    break;
                case 2: /* F_r P_r-hat / sqrt(den): D = this (x) N - ... (eq. 13) */
                    re = fr * arr / sq;
                    im = fr * ari / sq;
                    break;
                case 3: /* F_n P_n-hat / sqrt(den) */
                    re = fn * anr / sq;
                    im = fn * ani / sq;
                    break;
                default: /* P_D-hat = F_r F_n P_r-hat P_n-hat / (F_D sqrt(den)) */
                    re = fr * fn * (arr * anr - ari * ani) / (z->f_d * sq);
                    im = fr * fn * (arr * ani + ari * anr) / (z->f_d * sq);
                    break;
                }
            }
            w[i][0] = (float)re;
            w[i][1] = (float)im;
        }
        if ((st = hilal_fft_c2r(plan, w, r, err)) != HILAL_OK)
            goto cleanup;
        for (long i = 0; i < L * L; i++)
            kk[q][i] = (double)r[i] / (double)(L * L);
    }

    /* Radii: the S kernels to 1 - KERNEL_TAIL_S of their energy, the D
     * kernels to 1 - KERNEL_TAIL_D. */
    int hn = kernel_radius(kk[0], L, KERNEL_TAIL_S);
    int hr = kernel_radius(kk[1], L, KERNEL_TAIL_S);
    z->h = hn > hr ? hn : hr;
    if (z->h < 1)
        z->h = 1;
    int hdn = kernel_radius(kk[2], L, KERNEL_TAIL_D);
    int hdr = kernel_radius(kk[3], L, KERNEL_TAIL_D);
    z->hd = hdn > hdr ? hdn : hdr;

    /* Keep k_n, k_r truncated to the (2h+1)^2 box. */
    int h = z->h, side = 2 * h + 1;
    for (int q = 0; q < 2; q++) {
        z->k[q] = malloc(sizeof *z->k[q] * (size_t)side * (size_t)side);
        if (z->k[q] == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the ZOGY kernels");
            goto cleanup;
        }
        for (int uy = -h; uy <= h; uy++)
            for (int ux = -h; ux <= h; ux++)
                z->k[q][(uy + h) * side + ux + h] = kk[q][wrap(uy, L) * L + wrap(ux, L)];
    }

    /* P_D as a centred stamp of the larger PSF size, renormalised to sum 1
     * (its sum over the whole plane is exactly 1: P_D-hat(0) = 1). */
    pd->size = smax;
    pd->v = malloc(sizeof *pd->v * (size_t)smax * (size_t)smax);
    if (pd->v == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for P_D");
        goto cleanup;
    }
    double sum = 0;
    int c = smax / 2;
    for (int j = 0; j < smax; j++)
        for (int i = 0; i < smax; i++) {
            double v = kk[4][wrap(j - c, L) * L + wrap(i - c, L)];
            pd->v[j * smax + i] = v;
            sum += v;
        }
    if (sum > 0)
        for (int i = 0; i < smax * smax; i++)
            pd->v[i] /= sum;
cleanup:
    hilal_fft_free(r);
    hilal_fft_free(pn);
    hilal_fft_free(pr);
    hilal_fft_free(w);
    for (int q = 0; q < 5; q++)
        free(kk[q]);
    return st;
}

/* ------------------------------------------------------------------------
 * Step 3: the fill map, the difference mask and mirror padding
 * ------------------------------------------------------------------------ */

/* Which pair of padded planes a preparation pass makes: the images N and R
 * with filled pixels at 0 (step 3), or their variance in excess of the
 * background, pixel_var - sigma^2 (step 6). */
enum prep_kind { PREP_IMAGES, PREP_EXCESS };

typedef struct prep_job {
    zogy *z;
    enum prep_kind kind;
    float *dst[2];                 /* padded planes of N and R (rows of rs floats) */
    const hilal_mask_t *msci, *mref;
    hilal_mask_t *out;             /* difference mask (window), PREP_IMAGES */
    long nfilled_ext[MAX_THREADS], nfilled[MAX_THREADS], nnegvar[MAX_THREADS];
    /* PREP_IMAGES scratch: rows (enx values) of zeros and ones standing for
     * absent planes, and per thread the mask and NEGVAR flags of a row */
    const float *zeros, *ones;
    const hilal_mask_t *mzeros;
    hilal_mask_t *mtmp[MAX_THREADS];
    uint16_t *ftmp[MAX_THREADS];
} prep_job;

/* PREP_IMAGES: the fill map and the difference mask of image row Y over
 * the extent, as pixel_mask() does for one pixel, written without branches
 * so that the compiler can vectorise it (absent planes read rows of zeros,
 * or ones for the variance). Counts filled pixels (extent and window) and
 * NEGVAR pixels (window). */
static void mask_row(prep_job *job, long Y, int tid)
{
    zogy *z = job->z;
    const long enx = z->enx;
    const size_t r0 = (size_t)Y * (size_t)z->fnx + (size_t)z->ex0;
    const float *restrict p0 = z->pix[0] + r0, *restrict p1 = z->pix[1] + r0;
    const float *restrict k0 = z->sky[0] ? z->sky[0] + r0 : job->zeros;
    const float *restrict k1 = z->sky[1] ? z->sky[1] + r0 : job->zeros;
    const float *restrict v0 = z->var[0] ? z->var[0] + r0 : job->ones;
    const float *restrict v1 = z->var[1] ? z->var[1] + r0 : job->ones;
    const hilal_mask_t *restrict ms = job->msci ? job->msci + r0 : job->mzeros;
    const hilal_mask_t *restrict mr = job->mref ? job->mref + r0 : job->mzeros;
    unsigned char *restrict brow = z->bad + (size_t)(Y - z->ey0) * (size_t)enx;
    hilal_mask_t *restrict mt = job->mtmp[tid];
    uint16_t *restrict fl = job->ftmp[tid];
    for (long e = 0; e < enx; e++) {
        const float a0 = p0[e], a1 = p1[e], s0 = k0[e], s1 = k1[e], w0 = v0[e], w1 = v1[e];
        /* not finite (NaN or Inf) in either image: NODATA */
        const int finite = (fabsf(a0) <= FLT_MAX) & (fabsf(a1) <= FLT_MAX) &
                           (fabsf(s0) <= FLT_MAX) & (fabsf(s1) <= FLT_MAX);
        unsigned m = (unsigned)(ms[e] | mr[e]) | (finite ? 0u : (unsigned)HILAL_MASK_NODATA);
        /* a variance of VAR_MASKED or more marks a masked pixel (VAR_MASKED_F
         * is the smallest float >= VAR_MASKED: the same test) */
        const int varmasked = (w0 >= VAR_MASKED_F) | (w1 >= VAR_MASKED_F);
        const int bad = ((m & HILAL_MASK_UNUSABLE) != 0) | varmasked;
        /* a usable pixel whose variance is not positive and finite */
        const int ok = (w0 > 0) & (w0 <= FLT_MAX) & (w1 > 0) & (w1 <= FLT_MAX);
        const int negvar = !bad & !ok;
        m |= bad ? (unsigned)HILAL_MASK_INTERP : 0u;
        m |= negvar ? (unsigned)HILAL_MASK_NEGVAR : 0u;
        mt[e] = (hilal_mask_t)m;
        fl[e] = (uint16_t)(bad | (negvar << 1)); /* bit 0: filled, bit 1: NEGVAR */
    }
    int nfe = 0;
    for (long e = 0; e < enx; e++) {
        brow[e] = (unsigned char)(fl[e] & 1u);
        nfe += fl[e] & 1u;
    }
    job->nfilled_ext[tid] += nfe;
    /* the window part of the row: the difference mask and its counts */
    const long y = Y - z->oy, wx0 = z->ox - z->ex0;
    if (y < 0 || y >= z->ny)
        return;
    memcpy(job->out + (size_t)y * (size_t)z->nx, mt + wx0, sizeof *mt * (size_t)z->nx);
    int nfw = 0, nneg = 0;
    for (long x = 0; x < z->nx; x++) {
        nfw += fl[wx0 + x] & 1u;
        nneg += fl[wx0 + x] >> 1;
    }
    job->nfilled[tid] += nfw;
    job->nnegvar[tid] += nneg;
}

/* Fills padded row y of both planes. Column x of the padded row is image
 * column ixmap[x]; [0, xrun) is the contiguous part (the window and the
 * image beyond it), the rest the mirrored columns. */
static void pad_row(const prep_job *job, long y)
{
    const zogy *z = job->z;
    const long Y = z->iymap[y];
    const size_t r0 = (size_t)Y * (size_t)z->fnx;
    const unsigned char *brow = z->bad + (size_t)(Y - z->ey0) * (size_t)z->enx - z->ex0;
    for (int w = 0; w < 2; w++) {
        float *dst = job->dst[w] + (size_t)y * (size_t)z->rs;
        const float *pix = z->pix[w] + r0, *sky = z->sky[w] ? z->sky[w] + r0 : NULL;
        const float *var = z->var[w] ? z->var[w] + r0 : NULL;
        const long ox = z->ox, xrun = z->xrun;
        if (job->kind == PREP_IMAGES) {
            /* N or R, 0 at filled pixels */
            for (long x = 0; x < xrun; x++) {
                const long X = ox + x;
                const float v = pix[X] - (sky ? sky[X] : 0.0f);
                dst[x] = brow[X] ? 0.0f : v;
            }
            for (long x = xrun; x < z->mx; x++) {
                const long X = z->ixmap[x];
                const float v = pix[X] - (sky ? sky[X] : 0.0f);
                dst[x] = brow[X] ? 0.0f : v;
            }
        } else if (var == NULL) {
            /* without a variance plane only filled pixels differ from the
             * background: -sigma^2 there (no noise) */
            const float ns2 = (float)-(z->sigma[w] * z->sigma[w]);
            for (long x = 0; x < xrun; x++)
                dst[x] = brow[ox + x] ? ns2 : 0.0f;
            for (long x = xrun; x < z->mx; x++)
                dst[x] = brow[z->ixmap[x]] ? ns2 : 0.0f;
        } else {
            /* pixel_var - sigma^2: -sigma^2 at filled pixels (no noise),
             * var - sigma^2 where the variance plane is positive and
             * finite, 0 elsewhere */
            const double s2 = z->sigma[w] * z->sigma[w];
            for (long x = 0; x < xrun; x++) {
                const double v = var[ox + x];
                const double ex = (v > 0) & (v <= FLT_MAX) ? v - s2 : 0.0;
                dst[x] = (float)(brow[ox + x] ? -s2 : ex);
            }
            for (long x = xrun; x < z->mx; x++) {
                const long X = z->ixmap[x];
                const double v = var[X];
                const double ex = (v > 0) & (v <= FLT_MAX) ? v - s2 : 0.0;
                dst[x] = (float)(brow[X] ? -s2 : ex);
            }
        }
    }
}

/* Extent rows [lo, hi): (the fill map and mask, then) the padded row that
 * first shows each of them. */
static void prep_rows(void *ctx, long lo, long hi, int tid)
{
    prep_job *job = ctx;
    const zogy *z = job->z;
    for (long e = lo; e < hi; e++) {
        if (job->kind == PREP_IMAGES)
            mask_row(job, z->ey0 + e, tid);
        pad_row(job, z->orow[e]);
    }
}

/* Padded rows [lo, hi) that repeat an image row already padded (the
 * mirrored rows) are copies of it. */
static void copy_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    const prep_job *job = ctx;
    const zogy *z = job->z;
    for (long y = lo; y < hi; y++) {
        const long first = z->orow[z->iymap[y] - z->ey0];
        if (first == y)
            continue;
        for (int w = 0; w < 2; w++)
            memcpy(job->dst[w] + (size_t)y * (size_t)z->rs, job->dst[w] + (size_t)first * (size_t)z->rs,
                   sizeof(float) * (size_t)z->mx);
    }
}

/* One preparation pass: both padded planes into dst[0], dst[1]. */
static hilal_status prep_planes(prep_job *job, hilal_error *err)
{
    zogy *z = job->z;
    void *scratch = NULL;
    if (job->kind == PREP_IMAGES) {
        const size_t n = (size_t)z->enx;
        const size_t per = (sizeof(hilal_mask_t) + sizeof(uint16_t)) * n;
        unsigned char *p = scratch = calloc(1, (2 * sizeof(float) + sizeof(hilal_mask_t)) * n +
                                                   per * (size_t)z->threads + 64);
        if (p == NULL)
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the fill map");
        float *ones = (float *)(void *)p;
        for (size_t i = 0; i < n; i++)
            ones[i] = 1.0f;
        job->ones = ones;
        job->zeros = ones + n;
        job->mzeros = (const hilal_mask_t *)(void *)(ones + 2 * n);
        p = (unsigned char *)(ones + 2 * n) + sizeof(hilal_mask_t) * n;
        for (int t = 0; t < z->threads; t++) {
            job->mtmp[t] = (hilal_mask_t *)(void *)p;
            job->ftmp[t] = (uint16_t *)(void *)(p + sizeof(hilal_mask_t) * n);
            p += per;
        }
    }
    hilal_parallel_for(z->threads, z->eny, prep_rows, job);
    hilal_parallel_for(z->threads, z->my, copy_rows, job);
    free(scratch);
    return HILAL_OK;
}

/* Zeroes rows [lo, hi) of a padded real array. */
typedef struct zero_job {
    const zogy *z;
    float *dst;
} zero_job;

static void zero_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    const zero_job *job = ctx;
    memset(job->dst + (size_t)lo * (size_t)job->z->rs, 0,
           sizeof(float) * (size_t)(hi - lo) * (size_t)job->z->rs);
}

/* Places a (2h+1)^2 kernel (optionally squared) centred at the origin of
 * the padded real array dst, zeroed first. */
static void embed_kernel(const zogy *z, float *dst, const double *k, int squared)
{
    zero_job zj = {z, dst};
    hilal_parallel_for(z->threads, z->my, zero_rows, &zj);
    int h = z->h, side = 2 * h + 1;
    for (int uy = -h; uy <= h; uy++)
        for (int ux = -h; ux <= h; ux++) {
            double v = k[(uy + h) * side + ux + h];
            dst[wrap(uy, z->my) * z->rs + wrap(ux, z->mx)] += (float)(squared ? v * v : v);
        }
}

/* The same for a PSF stamp, its central pixel at the origin. */
static void embed_psf(const zogy *z, float *dst, const psf_d *p)
{
    zero_job zj = {z, dst};
    hilal_parallel_for(z->threads, z->my, zero_rows, &zj);
    int c = p->size / 2;
    for (int j = 0; j < p->size; j++)
        for (int i = 0; i < p->size; i++)
            dst[wrap(j - c, z->my) * z->rs + wrap(i - c, z->mx)] += (float)p->v[j * p->size + i];
}

/* ------------------------------------------------------------------------
 * Step 4: the spectral pass
 * ------------------------------------------------------------------------ */

/* Half-spectrum rows [lo, hi). In:  c[0] = N-hat, c[1] = R-hat,
 * c[2] = P_n-hat, c[3] = P_r-hat. Out: c[2] = D-hat (eq. 13), c[3] = S-hat
 * (eq. 17), c[0] = S_N-hat = k_n-hat N-hat when the astrometric term is on.
 * Accumulates F_S (eq. 41) with the Hermitian weights of the half spectrum.
 *
 * den is a sum of squares of single-precision values, so it is either 0 or
 * far above 1e-300: 1 / (den + 1e-300) is 1 / den exactly, and 0 times a
 * finite number where den = 0 (the PSF spectra vanish there, and so does
 * every term). Each row is done in blocks of SPEC_BLOCK frequencies in
 * three loops without branches but the square roots, which the compiler
 * can vectorise. */
#define SPEC_BLOCK 256

/* The F_S term (eq. 41) of one frequency, as in spectral_rows(). */
static double fs_term(const zogy *z, const float *pn, const float *pr)
{
    const double fn = z->fn, fr = z->fr;
    const double s2n = z->sigma[0] * z->sigma[0], s2r = z->sigma[1] * z->sigma[1];
    const double cr = s2n * fr * fr, cn = s2r * fn * fn, cfs = fn * fn * fr * fr;
    const double pnr = pn[0], pni = pn[1], prr = pr[0], pri = pr[1];
    const double an = pnr * pnr + pni * pni, ar = prr * prr + pri * pri;
    const double den = cr * ar + cn * an;
    return cfs * an * ar * (1.0 / (den + 1e-300));
}

static void spectral_rows(void *ctx, long lo, long hi, int tid)
{
    zogy *z = ctx;
    const double fn = z->fn, fr = z->fr;
    const double s2n = z->sigma[0] * z->sigma[0], s2r = z->sigma[1] * z->sigma[1];
    const double cr = s2n * fr * fr, cn = s2r * fn * fn;
    const double ckn = fn * fr * fr, ckr = fr * fn * fn, cfs = fn * fn * fr * fr;
    const long mxc = z->mxc;
    const int nyq = (z->mx % 2) == 0; /* column mx/2 is its own mirror */
    double inv[SPEC_BLOCK], isq[SPEC_BLOCK], term[SPEC_BLOCK];
    double fs = 0;
    for (long v = lo; v < hi; v++) {
        const size_t r = (size_t)v * (size_t)mxc;
        /* Hermitian weights: every column but u = 0 (and the Nyquist column
         * of an even size) stands for two frequencies, so the row adds
         * 2 sum - term(0) - term(Nyquist); those two terms are taken before
         * the loops overwrite their inputs. */
        const double edge =
            fs_term(z, z->c[2][r], z->c[3][r]) +
            (nyq ? fs_term(z, z->c[2][r + (size_t)mxc - 1], z->c[3][r + (size_t)mxc - 1]) : 0.0);
        double row = 0;
        for (long u0 = 0; u0 < mxc; u0 += SPEC_BLOCK) {
            const long nb = mxc - u0 < SPEC_BLOCK ? mxc - u0 : SPEC_BLOCK;
            float *restrict c0 = z->c[0][r + (size_t)u0], *restrict c1 = z->c[1][r + (size_t)u0];
            float *restrict c2 = z->c[2][r + (size_t)u0], *restrict c3 = z->c[3][r + (size_t)u0];
            /* den = sigma_n^2 F_r^2 |P_r-hat|^2 + sigma_r^2 F_n^2 |P_n-hat|^2,
             * and the terms of eq. 41: F_S = sum F_n^2 F_r^2 |P_n-hat|^2
             * |P_r-hat|^2 / den */
            for (long b = 0; b < nb; b++) {
                const double pnr = c2[2 * b], pni = c2[2 * b + 1];
                const double prr = c3[2 * b], pri = c3[2 * b + 1];
                const double an = pnr * pnr + pni * pni, ar = prr * prr + pri * pri;
                const double iv = 1.0 / (cr * ar + cn * an + 1e-300);
                inv[b] = iv;
                term[b] = cfs * an * ar * iv;
            }
            for (long b = 0; b < nb; b++)
                row += term[b];
            for (long b = 0; b < nb; b++)
                isq[b] = sqrt(inv[b]);
            for (long b = 0; b < nb; b++) {
                const double nr = c0[2 * b], ni = c0[2 * b + 1];
                const double rr = c1[2 * b], ri = c1[2 * b + 1];
                const double pnr = c2[2 * b], pni = c2[2 * b + 1];
                const double prr = c3[2 * b], pri = c3[2 * b + 1];
                const double an = pnr * pnr + pni * pni, ar = prr * prr + pri * pri;
                const double iv = inv[b], is = isq[b];
                /* eq. 13: D-hat = (F_r P_r-hat N-hat - F_n P_n-hat R-hat) / sqrt(den) */
                const double dre = (fr * (prr * nr - pri * ni) - fn * (pnr * rr - pni * ri)) * is;
                const double dim = (fr * (prr * ni + pri * nr) - fn * (pnr * ri + pni * rr)) * is;
                /* eqs. 28-29: k_n-hat = F_n F_r^2 conj(P_n-hat) |P_r-hat|^2 / den,
                 *             k_r-hat = F_r F_n^2 conj(P_r-hat) |P_n-hat|^2 / den */
                const double kn = ckn * ar * iv, kr = ckr * an * iv;
                const double knr = kn * pnr, kni = -kn * pni, krr = kr * prr, kri = -kr * pri;
                /* eq. 17: S-hat = F_D conj(P_D-hat) D-hat = k_n-hat N-hat - k_r-hat R-hat */
                const double snre = knr * nr - kni * ni, snim = knr * ni + kni * nr;
                const double sre = snre - (krr * rr - kri * ri);
                const double sim = snim - (krr * ri + kri * rr);
                c2[2 * b] = (float)dre;
                c2[2 * b + 1] = (float)dim;
                c3[2 * b] = (float)sre;
                c3[2 * b + 1] = (float)sim;
                /* S_N-hat for the astrometric term (c[0] is not used again
                 * otherwise) */
                c0[2 * b] = (float)snre;
                c0[2 * b + 1] = (float)snim;
            }
        }
        fs += 2.0 * row - edge;
    }
    z->fs_part[tid] += fs;
}

/* Source-noise pass: c[0] = exN-hat * (k_n^2)-hat + exR-hat * (k_r^2)-hat,
 * the spectrum of the sum of eqs. 26 and 27 (excess parts), with the
 * squared-kernel spectra transformed like the maps (in c[2] and c[3]). */
static void variance_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    zogy *z = ctx;
    for (size_t i = (size_t)lo * (size_t)z->mxc; i < (size_t)hi * (size_t)z->mxc; i++) {
        float ar = z->c[0][i][0], ai = z->c[0][i][1];
        float br = z->c[1][i][0], bi = z->c[1][i][1];
        float kr = z->c[2][i][0], ki = z->c[2][i][1];
        float lr = z->c[3][i][0], li = z->c[3][i][1];
        z->c[0][i][0] = ar * kr - ai * ki + br * lr - bi * li;
        z->c[0][i][1] = ar * ki + ai * kr + br * li + bi * lr;
    }
}

/* The squared kernels k_n^2 and k_r^2 have only 2h + 1 non-zero rows, so
 * their spectra on the padded grid need no transforms: with the kernel
 * centred at the origin,
 *   (k^2)-hat(u, v) = sum_{uy=-h..h} exp(-2 pi i v uy / my) A_uy(u),
 *   A_uy(u) = sum_{ux=-h..h} k(ux, uy)^2 exp(-2 pi i u ux / mx)
 * (FFTW's sign convention). The row transforms A (2 x (2h+1) x mxc values)
 * are made once; the sums over uy run inside the source-noise pass. For
 * small kernels this costs less than the two transforms and the two passes
 * over the grid it replaces. */
#define KSQ_DIRECT_MAX_H 12

typedef struct ksq_rows {
    long nk;       /* 2h + 1 */
    float *re, *im; /* [kernel][uy + h][u]: 2 x nk x mxc */
} ksq_rows;

static hilal_status ksq_rows_make(const zogy *z, ksq_rows *K, hilal_error *err)
{
    const int h = z->h, side = 2 * h + 1;
    const long mx = z->mx, mxc = z->mxc;
    K->nk = side;
    K->re = malloc(sizeof *K->re * 2 * (size_t)side * (size_t)mxc);
    K->im = malloc(sizeof *K->im * 2 * (size_t)side * (size_t)mxc);
    double *cw = malloc(sizeof *cw * (size_t)mx), *sw = malloc(sizeof *sw * (size_t)mx);
    if (K->re == NULL || K->im == NULL || cw == NULL || sw == NULL) {
        free(cw);
        free(sw);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the kernel spectra");
    }
    /* exp(-2 pi i k / mx), k = 0 .. mx-1; the products u ux are reduced
     * modulo mx exactly, so every phase is accurate */
    for (long k = 0; k < mx; k++) {
        cw[k] = cos(2.0 * M_PI * (double)k / (double)mx);
        sw[k] = -sin(2.0 * M_PI * (double)k / (double)mx);
    }
    for (int q = 0; q < 2; q++)
        for (int uy = -h; uy <= h; uy++) {
            const double *krow = z->k[q] + (uy + h) * side;
            float *re = K->re + ((size_t)q * (size_t)side + (size_t)(uy + h)) * (size_t)mxc;
            float *im = K->im + ((size_t)q * (size_t)side + (size_t)(uy + h)) * (size_t)mxc;
            for (long u = 0; u < mxc; u++) {
                double ar = 0, ai = 0;
                for (int ux = -h; ux <= h; ux++) {
                    const double v = krow[ux + h] * krow[ux + h];
                    const long k = wrap((long)u * ux, mx);
                    ar += v * cw[k];
                    ai += v * sw[k];
                }
                re[u] = (float)ar;
                im[u] = (float)ai;
            }
        }
    free(cw);
    free(sw);
    return HILAL_OK;
}

static void ksq_rows_free(ksq_rows *K)
{
    free(K->re);
    free(K->im);
    K->re = K->im = NULL;
}

/* variance_rows() with the squared-kernel spectra summed from the row
 * transforms, in blocks of columns that stay in the first-level cache. */
#define KSQ_BLOCK 256

typedef struct ksq_job {
    zogy *z;
    const ksq_rows *K;
} ksq_job;

static void variance_direct_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    const ksq_job *job = ctx;
    zogy *z = job->z;
    const long nk = job->K->nk, mxc = z->mxc, my = z->my, h = z->h;
    float pr[2 * KSQ_DIRECT_MAX_H + 1], pi[2 * KSQ_DIRECT_MAX_H + 1];
    float knr[KSQ_BLOCK], kni[KSQ_BLOCK], krr[KSQ_BLOCK], kri[KSQ_BLOCK];
    for (long v = lo; v < hi; v++) {
        /* exp(-2 pi i v uy / my) */
        for (long j = 0; j < nk; j++) {
            const double a = 2.0 * M_PI * (double)wrap(v * (j - h), my) / (double)my;
            pr[j] = (float)cos(a);
            pi[j] = (float)-sin(a);
        }
        for (long u0 = 0; u0 < mxc; u0 += KSQ_BLOCK) {
            const long nb = mxc - u0 < KSQ_BLOCK ? mxc - u0 : KSQ_BLOCK;
            for (long b = 0; b < nb; b++)
                knr[b] = kni[b] = krr[b] = kri[b] = 0.0f;
            for (long j = 0; j < nk; j++) {
                const float c = pr[j], s = pi[j];
                const float *restrict anr = job->K->re + (size_t)j * (size_t)mxc + u0;
                const float *restrict ani = job->K->im + (size_t)j * (size_t)mxc + u0;
                const float *restrict arr = job->K->re + (size_t)(nk + j) * (size_t)mxc + u0;
                const float *restrict ari = job->K->im + (size_t)(nk + j) * (size_t)mxc + u0;
                for (long b = 0; b < nb; b++) {
                    knr[b] += c * anr[b] - s * ani[b];
                    kni[b] += c * ani[b] + s * anr[b];
                    krr[b] += c * arr[b] - s * ari[b];
                    kri[b] += c * ari[b] + s * arr[b];
                }
            }
            float *restrict c0 = z->c[0][(size_t)v * (size_t)mxc + (size_t)u0];
            const float *restrict c1 = z->c[1][(size_t)v * (size_t)mxc + (size_t)u0];
            for (long b = 0; b < nb; b++) {
                const float ar = c0[2 * b], ai = c0[2 * b + 1];
                const float br = c1[2 * b], bi = c1[2 * b + 1];
                c0[2 * b] = ar * knr[b] - ai * kni[b] + br * krr[b] - bi * kri[b];
                c0[2 * b + 1] = ar * kni[b] + ai * knr[b] + br * kri[b] + bi * krr[b];
            }
        }
    }
}

/* Copies the window part of an inverse transform (a padded array), scaled
 * by 1/(mx my) (FFTW's inverse is unnormalised), into dst, with 0 at the
 * filled pixels (D and S are 0 there). */
typedef struct crop_job {
    zogy *z;
    const float *src;
    float *dst;
} crop_job;

static void crop_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    const crop_job *job = ctx;
    const zogy *z = job->z;
    const float scale = (float)(1.0 / ((double)z->mx * (double)z->my));
    for (long y = lo; y < hi; y++) {
        const float *restrict src = job->src + (size_t)y * (size_t)z->rs;
        const unsigned char *restrict bad = z->wbad + (size_t)y * (size_t)z->enx;
        float *restrict dst = job->dst + (size_t)y * (size_t)z->nx;
        for (long x = 0; x < z->nx; x++)
            dst[x] = bad[x] ? 0.0f : src[x] * scale;
    }
}

static void crop(zogy *z, const float *src, float *dst)
{
    crop_job job = {z, src, dst};
    hilal_parallel_for(z->threads, z->ny, crop_rows, &job);
}

/* ------------------------------------------------------------------------
 * Steps 5-8: per-pixel combination
 * ------------------------------------------------------------------------ */

/* Astrometric noise, eqs. 30-31:
 *   V_ast(S_N) = sigma_x^2 (dS_N/dx)^2 + sigma_y^2 (dS_N/dy)^2, same for S_R,
 * with S_R = S_N - S and central differences (one-sided at the image
 * edges; a window's edges inside the image use the pixels beyond them).
 * S and S_N are read from the padded inverse transforms z->sp and z->snp
 * (scaled like crop(); the padded grid is periodic: the row or column
 * before the first is the last). Written into z->flux_err (used as scratch
 * until the final pass).
 *
 * One pixel of astrometric_rows(), any column: at an image edge the
 * difference is one-sided, at a window edge inside the image it reaches
 * the pixel beyond (the padded grid is periodic: column -1 is mx - 1). */
static void astrometric_pixel(zogy *z, long x, long y, size_t r, size_t r0, size_t r1,
                              double dy)
{
    const long mx = z->mx;
    const double sx2 = z->sx * z->sx, sy2 = z->sy * z->sy;
    const float scale = (float)(1.0 / ((double)z->mx * (double)z->my));
    const long X = z->ox + x;
    const long x0 = X > 0 ? x - 1 : x, x1 = X < z->fnx - 1 ? x + 1 : x;
    const size_t ix0 = r + (size_t)(x0 < 0 ? mx - 1 : x0), ix1 = r + (size_t)x1;
    const size_t iy0 = r0 + (size_t)x, iy1 = r1 + (size_t)x;
    const double dx = (double)(x1 - x0);
    /* the values as crop() gives them (single precision) */
    const float n_x0 = z->snp[ix0] * scale, n_x1 = z->snp[ix1] * scale;
    const float n_y0 = z->snp[iy0] * scale, n_y1 = z->snp[iy1] * scale;
    const float s_x0 = z->sp[ix0] * scale, s_x1 = z->sp[ix1] * scale;
    const float s_y0 = z->sp[iy0] * scale, s_y1 = z->sp[iy1] * scale;
    double gnx = dx > 0 ? (n_x1 - n_x0) / dx : 0;
    double gny = dy > 0 ? (n_y1 - n_y0) / dy : 0;
    double grx = dx > 0 ? ((n_x1 - s_x1) - (n_x0 - s_x0)) / dx : 0;
    double gry = dy > 0 ? ((n_y1 - s_y1) - (n_y0 - s_y0)) / dy : 0;
    z->flux_err[(size_t)y * (size_t)z->nx + (size_t)x] =
        (float)(sx2 * (gnx * gnx + grx * grx) + sy2 * (gny * gny + gry * gry));
}

/* Window rows [lo, hi) of the astrometric term. */
static void astrometric_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    zogy *z = ctx;
    const long nx = z->nx, rs = z->rs;
    const double sx2 = z->sx * z->sx, sy2 = z->sy * z->sy;
    const float scale = (float)(1.0 / ((double)z->mx * (double)z->my));
    for (long y = lo; y < hi; y++) {
        const long Y = z->oy + y;
        const long y0 = Y > 0 ? y - 1 : y, y1 = Y < z->fny - 1 ? y + 1 : y;
        const double dy = (double)(y1 - y0);
        const size_t r = (size_t)y * (size_t)rs;
        const size_t r0 = (size_t)(y0 < 0 ? z->my - 1 : y0) * (size_t)rs;
        const size_t r1 = (size_t)y1 * (size_t)rs;
        /* the first and last column may lie on the image edge */
        astrometric_pixel(z, 0, y, r, r0, r1, dy);
        if (nx > 1)
            astrometric_pixel(z, nx - 1, y, r, r0, r1, dy);
        /* columns 1 .. nx-2: central differences over 2 px (the same sums
         * as astrometric_pixel(), without its branches) */
        const float *restrict sn = z->snp, *restrict sp = z->sp;
        float *restrict fe = z->flux_err + (size_t)y * (size_t)nx;
        for (long x = 1; x < nx - 1; x++) {
            const float n_x0 = sn[r + x - 1] * scale, n_x1 = sn[r + x + 1] * scale;
            const float n_y0 = sn[r0 + x] * scale, n_y1 = sn[r1 + x] * scale;
            const float s_x0 = sp[r + x - 1] * scale, s_x1 = sp[r + x + 1] * scale;
            const float s_y0 = sp[r0 + x] * scale, s_y1 = sp[r1 + x] * scale;
            const double gnx = (n_x1 - n_x0) / 2.0;
            const double grx = ((n_x1 - s_x1) - (n_x0 - s_x0)) / 2.0;
            const double gny = dy > 0 ? (n_y1 - n_y0) / dy : 0;
            const double gry = dy > 0 ? ((n_y1 - s_y1) - (n_y0 - s_y0)) / dy : 0;
            fe[x] = (float)(sx2 * (gnx * gnx + grx * grx) + sy2 * (gny * gny + gry * gry));
        }
    }
}

/* Per-thread scratch for the edge strip: the folded kernels on a window of
 * (4h+3)^2 image pixels around the pixel. */
typedef struct edge_job {
    zogy *z;
    double *wn[MAX_THREADS], *wr[MAX_THREADS];
    const struct edge_tabs *tabs;
} edge_job;

/* Folds k_n and k_r for the image pixel (x0, y0) into the wd x wd windows
 * wn, wr (zero on entry), wd = 2H + 1, H = 2h + 1, centred on the pixel;
 * *amin..*amax and *bmin..*bmax bound the window columns and rows reached.
 * Image pixel a = mirror(X0 - u) receives k(u). */
static void fold_kernels(const zogy *z, double *wn, double *wr, long x0, long y0, long *amin,
                         long *amax, long *bmin, long *bmax)
{
    const int h = z->h, side = 2 * h + 1;
    const long H = 2 * h + 1, wd = 2 * H + 1;
    long ax[2 * 512 + 1];
    *amin = wd;
    *amax = -1;
    *bmin = wd;
    *bmax = -1;
    for (int ux = -h; ux <= h; ux++) {
        long a = reflect(x0 - ux, z->fnx) - x0 + H;
        ax[ux + h] = a;
        if (a < *amin)
            *amin = a;
        if (a > *amax)
            *amax = a;
    }
    for (int uy = -h; uy <= h; uy++) {
        long b = reflect(y0 - uy, z->fny) - y0 + H;
        if (b < *bmin)
            *bmin = b;
        if (b > *bmax)
            *bmax = b;
        const double *kn = z->k[0] + (uy + h) * side, *kr = z->k[1] + (uy + h) * side;
        double *rown = wn + b * wd, *rowr = wr + b * wd;
        for (int ux = -h; ux <= h; ux++) {
            rown[ax[ux + h]] += kn[ux + h];
            rowr[ax[ux + h]] += kr[ux + h];
        }
    }
}

/* For an image pixel (X0, Y0) within h of an image edge, S was computed on
 * the mirrored image, so an image pixel may enter it through several
 * reflected copies: S(X0) = sum_a W_n(a) N(a) - sum_a W_r(a) R(a) with the
 * folded kernels W(a) = sum over the copies p of a of k(X0 - p). Its exact
 * variance is sum_a W_n(a)^2 V_N(a) + W_r(a)^2 V_R(a) (eqs. 26-27 with the
 * folded kernels) and a point source centred at X0 gives S = alpha F_S,loc
 * with F_S,loc = F_n sum_a W_n(a) P_n(a - X0) (eq. 41 in real space).
 * Returns V (background and source noise) and F_S,loc. The general case;
 * edge_var() below gives the same sums faster on frames of usual size. */
static void edge_pixel(const zogy *z, double *wn, double *wr, long x0, long y0, double *var,
                       double *fs_loc)
{
    const long H = 2 * z->h + 1, wd = 2 * H + 1;
    long amin, amax, bmin, bmax;
    fold_kernels(z, wn, wr, x0, y0, &amin, &amax, &bmin, &bmax);
    /* Sum over the window, resetting it for the next pixel. */
    double vn = 0, vr = 0, fs = 0;
    const psf_d *pn = &z->psf[0];
    const int pc = pn->size / 2;
    for (long b = bmin; b <= bmax; b++) {
        long y = y0 + b - H;
        for (long a = amin; a <= amax; a++) {
            double cn = wn[b * wd + a], cr = wr[b * wd + a];
            if (cn == 0 && cr == 0)
                continue;
            long x = x0 + a - H;
            vn += cn * cn * pixel_var(z, 0, x, y);
            vr += cr * cr * pixel_var(z, 1, x, y);
            long dx = x - x0, dy = y - y0;
            if (labs(dx) <= pc && labs(dy) <= pc)
                fs += cn * pn->v[(dy + pc) * pn->size + dx + pc];
            wn[b * wd + a] = 0;
            wr[b * wd + a] = 0;
        }
    }
    *var = vn + vr;
    *fs_loc = z->fn * fs;
}

/* The edge strip without per-pixel folding. Where the image is at least
 * 4h + 4 px wide and high, the folding of a pixel within h of an edge
 * depends only on its class along each axis (interior, or its distance to
 * the near or far edge), so the squared folded kernels and F_S,loc are made
 * once per class pair; and the pixel variances of the 2h rows (columns)
 * nearest each edge are tabulated once. The sums then run over dense
 * arrays, in the order edge_pixel() uses, with the same values. */
typedef struct edge_fold {
    long a0, b0, na, nb; /* offsets [a0, a0 + na) x [b0, b0 + nb) from the pixel */
    double *wn2, *wr2;   /* W_n^2 and W_r^2 there, nb x na */
    double fs_loc;       /* F_S,loc */
} edge_fold;

typedef struct edge_tabs {
    int h;
    long nc;            /* classes per axis: 2h + 1 (0 = interior) */
    edge_fold *fold;    /* nc x nc, [cy * nc + cx] */
    /* pixel_var of both images: [side 0: rows 0..2h-1, 1: rows fny-2h..fny-1]
     * over the extent columns (2h x enx), and the same for columns over the
     * extent rows (eny x 2h) */
    double *rowv[2][2], *colv[2][2];
} edge_tabs;

/* The class of coordinate X along an axis of n pixels: 0 interior, 1 + d
 * at distance d < h from the near edge, 1 + h + d from the far edge. */
static long edge_class(long X, long n, int h)
{
    if (X < h)
        return 1 + X;
    if (X >= n - h)
        return 1 + h + (n - 1 - X);
    return 0;
}

/* A coordinate of class c along an axis of n pixels. */
static long class_coord(long c, long n, int h)
{
    if (c == 0)
        return n / 2;
    if (c <= h)
        return c - 1;
    return n - 1 - (c - 1 - h);
}

static void edge_tabs_free(edge_tabs *t)
{
    if (t->fold != NULL)
        for (long i = 0; i < t->nc * t->nc; i++) {
            free(t->fold[i].wn2);
            free(t->fold[i].wr2);
        }
    free(t->fold);
    for (int s = 0; s < 2; s++)
        for (int w = 0; w < 2; w++) {
            free(t->rowv[s][w]);
            free(t->colv[s][w]);
        }
    memset(t, 0, sizeof *t);
}

/* Builds the tables for the window of z; t->fold stays NULL (the general
 * path) when the image is too small or the window is away from the edges.
 * HILAL_ERR_NOMEM. */
static hilal_status edge_tabs_make(const zogy *z, edge_tabs *t, hilal_error *err)
{
    memset(t, 0, sizeof *t);
    const int h = z->h;
    const long H = 2 * h + 1, wd = 2 * H + 1, th = 2 * h;
    const int near[2][2] = {{z->ox < h, z->ox + z->nx > z->fnx - h},
                            {z->oy < h, z->oy + z->ny > z->fny - h}}; /* [axis][side] */
    if (z->fnx < 4 * h + 4 || z->fny < 4 * h + 4 ||
        !(near[0][0] || near[0][1] || near[1][0] || near[1][1]))
        return HILAL_OK;
    double *wn = NULL, *wr = NULL;
    t->h = h;
    t->nc = 2 * h + 1;
    t->fold = calloc((size_t)(t->nc * t->nc), sizeof *t->fold);
    wn = calloc((size_t)(wd * wd), sizeof *wn);
    wr = calloc((size_t)(wd * wd), sizeof *wr);
    if (t->fold == NULL || wn == NULL || wr == NULL)
        goto nomem;
    const psf_d *pn = &z->psf[0];
    const int pc = pn->size / 2;
    for (long cy = 0; cy < t->nc; cy++)
        for (long cx = 0; cx < t->nc; cx++) {
            if (cx == 0 && cy == 0)
                continue;
            edge_fold *f = &t->fold[cy * t->nc + cx];
            const long x0 = class_coord(cx, z->fnx, h), y0 = class_coord(cy, z->fny, h);
            long amin, amax, bmin, bmax;
            fold_kernels(z, wn, wr, x0, y0, &amin, &amax, &bmin, &bmax);
            f->a0 = amin - H;
            f->b0 = bmin - H;
            f->na = amax - amin + 1;
            f->nb = bmax - bmin + 1;
            f->wn2 = malloc(sizeof *f->wn2 * (size_t)(f->na * f->nb));
            f->wr2 = malloc(sizeof *f->wr2 * (size_t)(f->na * f->nb));
            if (f->wn2 == NULL || f->wr2 == NULL)
                goto nomem;
            double fs = 0;
            for (long b = bmin; b <= bmax; b++)
                for (long a = amin; a <= amax; a++) {
                    const double cn = wn[b * wd + a], cr = wr[b * wd + a];
                    const size_t k = (size_t)((b - bmin) * f->na + (a - amin));
                    f->wn2[k] = cn * cn;
                    f->wr2[k] = cr * cr;
                    const long dx = a - H, dy = b - H;
                    if ((cn != 0 || cr != 0) && labs(dx) <= pc && labs(dy) <= pc)
                        fs += cn * pn->v[(dy + pc) * pn->size + dx + pc];
                    wn[b * wd + a] = 0;
                    wr[b * wd + a] = 0;
                }
            f->fs_loc = z->fn * fs;
        }
    /* pixel variances near the edges the window reaches (rows and columns
     * outside the extent are never read and stay 0) */
    for (int s = 0; s < 2; s++)
        for (int w = 0; w < 2; w++) {
            if (near[1][s]) {
                const long r0 = s == 0 ? 0 : z->fny - th;
                double *v = t->rowv[s][w] = calloc((size_t)(th * z->enx), sizeof *v);
                if (v == NULL)
                    goto nomem;
                for (long r = 0; r < th; r++)
                    if (r0 + r >= z->ey0 && r0 + r < z->ey0 + z->eny)
                        for (long e = 0; e < z->enx; e++)
                            v[r * z->enx + e] = pixel_var(z, w, z->ex0 + e, r0 + r);
            }
            if (near[0][s]) {
                const long c0 = s == 0 ? 0 : z->fnx - th;
                double *v = t->colv[s][w] = calloc((size_t)(th * z->eny), sizeof *v);
                if (v == NULL)
                    goto nomem;
                for (long e = 0; e < z->eny; e++)
                    for (long c = 0; c < th; c++)
                        if (c0 + c >= z->ex0 && c0 + c < z->ex0 + z->enx)
                            v[e * th + c] = pixel_var(z, w, c0 + c, z->ey0 + e);
            }
        }
    free(wn);
    free(wr);
    return HILAL_OK;
nomem:
    free(wn);
    free(wr);
    edge_tabs_free(t);
    return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the edge strip");
}

/* V and F_S,loc of the edge pixel (X0, Y0) of classes (cx, cy) from the
 * tables: the sums of edge_pixel(). */
static void edge_var(const zogy *z, const edge_tabs *t, long cx, long cy, long X0, long Y0,
                     double *var, double *fs_loc)
{
    const edge_fold *f = &t->fold[cy * t->nc + cx];
    const long th = 2 * (long)t->h;
    const double *tn, *tr;
    long rstride, c0;
    if (cy != 0) { /* near the top or bottom: the row tables hold every column */
        const int s = Y0 < t->h ? 0 : 1;
        const long r0 = s == 0 ? 0 : z->fny - th;
        rstride = z->enx;
        c0 = z->ex0;
        tn = t->rowv[s][0] + (Y0 + f->b0 - r0) * rstride;
        tr = t->rowv[s][1] + (Y0 + f->b0 - r0) * rstride;
    } else { /* near the left or right edge only */
        const int s = X0 < t->h ? 0 : 1;
        rstride = th;
        c0 = s == 0 ? 0 : z->fnx - th;
        tn = t->colv[s][0] + (Y0 + f->b0 - z->ey0) * rstride;
        tr = t->colv[s][1] + (Y0 + f->b0 - z->ey0) * rstride;
    }
    const long xs = X0 + f->a0 - c0;
    double vn = 0, vr = 0;
    for (long b = 0; b < f->nb; b++) {
        const double *wn2 = f->wn2 + b * f->na, *wr2 = f->wr2 + b * f->na;
        const double *rn = tn + b * rstride + xs, *rr = tr + b * rstride + xs;
        for (long a = 0; a < f->na; a++) {
            vn += wn2[a] * rn[a];
            vr += wr2[a] * rr[a];
        }
    }
    *var = vn + vr;
    *fs_loc = f->fs_loc;
}

/* V(S) and F_S,loc of an edge pixel, by the tables when there are some. */
static void edge_value(const edge_job *job, int tid, long X, long Y, double *v, double *fsl)
{
    const zogy *z = job->z;
    if (job->tabs != NULL && job->tabs->fold != NULL)
        edge_var(z, job->tabs, edge_class(X, z->fnx, z->h), edge_class(Y, z->fny, z->h), X, Y, v,
                 fsl);
    else
        edge_pixel(z, job->wn[tid], job->wr[tid], X, Y, v, fsl);
    /* a pathological folded kernel: keep the interior normalisation */
    if (!(*fsl > 0.1 * z->f_s))
        *fsl = z->f_s;
}

/* First pass over window rows [lo, hi): V(S) = F_S (background) + V(S_N) +
 * V(S_R) (source, from the FFT or, in the edge strip of the image, folded
 * sums) + V_ast. Leaves V(S) in flux_err, the flux conversion F_n / F_S
 * (F_S,loc in the edge strip, eq. 42) in flux, and S_corr = S / sqrt(V(S))
 * (eq. 25) in scorr, 0 at filled pixels (where crop() zeroed D and S). */
static void combine_pixel(zogy *z, size_t i, unsigned char bad, double v, double fsl,
                          double floor_v)
{
    if (z->use_ast)
        v += (double)z->flux_err[i];
    if (!(v > floor_v))
        v = floor_v;
    z->flux_err[i] = (float)v;
    z->flux[i] = (float)(z->fn / fsl);
    z->scorr[i] = bad ? 0.0f : (float)(z->s[i] / sqrt(v));
}

static void combine_rows(void *ctx, long lo, long hi, int tid)
{
    edge_job *job = ctx;
    zogy *z = job->z;
    const long nx = z->nx;
    const long h = z->h;
    const double fs = z->f_s, floor_v = VAR_FLOOR_REL * z->f_s;
    const float scale = (float)(1.0 / ((double)z->mx * (double)z->my));
    const float g = (float)(z->fn / fs);
    /* window columns [xa, xb) are away from the image's left and right edges */
    long xa = h - z->ox, xb = z->fnx - h - z->ox;
    xa = xa < 0 ? 0 : xa > nx ? nx : xa;
    xb = xb < xa ? xa : xb > nx ? nx : xb;
    for (long y = lo; y < hi; y++) {
        const long Y = z->oy + y;
        const size_t row = (size_t)y * (size_t)nx;
        const unsigned char *brow = z->wbad + (size_t)y * (size_t)z->enx;
        /* the source-noise variance of the row (padded inverse transform) */
        const float *vrow = z->vp ? z->vp + (size_t)y * (size_t)z->rs : NULL;
        double v, fsl;
        if (Y < h || Y >= z->fny - h) {
            for (long x = 0; x < nx; x++) {
                edge_value(job, tid, z->ox + x, Y, &v, &fsl);
                combine_pixel(z, row + (size_t)x, brow[x], v, fsl, floor_v);
            }
            continue;
        }
        for (long x = 0; x < xa; x++) {
            edge_value(job, tid, z->ox + x, Y, &v, &fsl);
            combine_pixel(z, row + (size_t)x, brow[x], v, fsl, floor_v);
        }
        for (long x = xb; x < nx; x++) {
            edge_value(job, tid, z->ox + x, Y, &v, &fsl);
            combine_pixel(z, row + (size_t)x, brow[x], v, fsl, floor_v);
        }
        /* the interior, as combine_pixel() with fsl = F_S */
        const float *restrict s = z->s + row;
        float *restrict sc = z->scorr + row;
        float *restrict fl = z->flux + row, *restrict fe = z->flux_err + row;
        if (z->use_ast)
            for (long x = xa; x < xb; x++) {
                double vv = fs + (vrow ? (double)(vrow[x] * scale) : 0.0);
                vv += (double)fe[x];
                vv = vv > floor_v ? vv : floor_v;
                fe[x] = (float)vv;
                fl[x] = g;
                sc[x] = brow[x] ? 0.0f : (float)(s[x] / sqrt(vv));
            }
        else
            for (long x = xa; x < xb; x++) {
                double vv = fs + (vrow ? (double)(vrow[x] * scale) : 0.0);
                vv = vv > floor_v ? vv : floor_v;
                fe[x] = (float)vv;
                fl[x] = g;
                sc[x] = brow[x] ? 0.0f : (float)(s[x] / sqrt(vv));
            }
    }
}

/* Second pass: the background term of V(S) scaled by the measured noise
 * (V' = V + (kappa - 1) F_S, kappa = 1 without calibration), then S_corr =
 * S / sqrt(V'), flux = F_n S / F_S and flux_err = F_n sqrt(V') / F_S
 * (eqs. 41-43); zeros at filled pixels (flux_err keeps its value). */
typedef struct final_job {
    zogy *z;
    double kappa;
} final_job;

static void final_rows(void *ctx, long lo, long hi, int tid)
{
    (void)tid;
    const final_job *job = ctx;
    zogy *z = job->z;
    const long nx = z->nx;
    const double add = (job->kappa - 1.0) * z->f_s, floor_v = VAR_FLOOR_REL * z->f_s;
    for (long y = lo; y < hi; y++) {
        const size_t row = (size_t)y * (size_t)nx;
        const unsigned char *brow = z->wbad + (size_t)y * (size_t)z->enx;
        float *restrict s = z->s + row, *restrict sc = z->scorr + row;
        float *restrict fl = z->flux + row, *restrict fe = z->flux_err + row;
        for (long x = 0; x < nx; x++) {
            double v = (double)fe[x] + add;
            v = v > floor_v ? v : floor_v;
            const double sd = sqrt(v), g = fl[x];
            const int b = brow[x] != 0;
            fe[x] = (float)(g * sd);
            sc[x] = b ? 0.0f : (float)(s[x] / sd);
            fl[x] = b ? 0.0f : (float)(g * s[x]);
        }
    }
}

/* Pixels near sources, for the S_corr statistics, on an nx x ny region of
 * values v (row stride vstride) with a fill map bad (row stride bstride;
 * NULL: nothing filled): tmp[] marks pixels within `radius` px along their
 * row of an unfilled pixel with |S_corr| > 5 (a sliding-window count per
 * row); then keep[] = unfilled and not within `radius` rows of a marked
 * pixel (a sliding window over rows kept as one running count per column,
 * so memory is walked row by row). Together: farther than `radius`
 * (Chebyshev) from any such pixel. tmp and keep are nx x ny, compact;
 * each thread has a row of source flags and a row of column counts. */
typedef struct near_job {
    const float *v;
    long vstride;
    const unsigned char *bad;
    long bstride;
    long nx, ny;
    long radius;
    unsigned char *tmp, *keep;
    unsigned char *src[MAX_THREADS]; /* per thread: one row of source flags */
    int32_t *cnt[MAX_THREADS];       /* per thread: the column counts */
    size_t nkeep[MAX_THREADS];
} near_job;

static void near_rows(void *ctx, long lo, long hi, int tid)
{
    near_job *job = ctx;
    const long nx = job->nx, r = job->radius;
    unsigned char *src = job->src[tid];
    for (long y = lo; y < hi; y++) {
        /* the unfilled pixels with |S_corr| > 5 */
        const float *v = job->v + (size_t)y * (size_t)job->vstride;
        if (job->bad != NULL) {
            const unsigned char *b = job->bad + (size_t)y * (size_t)job->bstride;
            for (long x = 0; x < nx; x++)
                src[x] = (unsigned char)((fabsf(v[x]) > 5.0f) & (b[x] == 0));
        } else {
            for (long x = 0; x < nx; x++)
                src[x] = (unsigned char)(fabsf(v[x]) > 5.0f);
        }
        /* within r of one along the row: a sliding count over [x - r, x + r] */
        unsigned char *t = job->tmp + (size_t)y * (size_t)nx;
        long c = 0;
        for (long x = 0; x < r && x < nx; x++)
            c += src[x];
        for (long x = 0; x < nx; x++) {
            if (x + r < nx)
                c += src[x + r];
            if (x - r - 1 >= 0)
                c -= src[x - r - 1];
            t[x] = c > 0;
        }
    }
}

/* Columns [lo, hi) of the vertical pass; counts the pixels kept. */
static void near_cols(void *ctx, long lo, long hi, int tid)
{
    near_job *job = ctx;
    const long nx = job->nx, ny = job->ny, r = job->radius, w = hi - lo;
    int32_t *restrict cnt = job->cnt[tid];
    size_t nkeep = 0;
    memset(cnt, 0, sizeof *cnt * (size_t)w);
    for (long y = 0; y < r && y < ny; y++) {
        const unsigned char *add = job->tmp + (size_t)y * (size_t)nx + lo;
        for (long x = 0; x < w; x++)
            cnt[x] += add[x];
    }
    for (long y = 0; y < ny; y++) {
        if (y + r < ny) {
            const unsigned char *add = job->tmp + (size_t)(y + r) * (size_t)nx + lo;
            for (long x = 0; x < w; x++)
                cnt[x] += add[x];
        }
        if (y - r - 1 >= 0) {
            const unsigned char *sub = job->tmp + (size_t)(y - r - 1) * (size_t)nx + lo;
            for (long x = 0; x < w; x++)
                cnt[x] -= sub[x];
        }
        unsigned char *k = job->keep + (size_t)y * (size_t)nx + lo;
        if (job->bad != NULL) {
            const unsigned char *b = job->bad + (size_t)y * (size_t)job->bstride + lo;
            for (long x = 0; x < w; x++)
                k[x] = (unsigned char)((cnt[x] == 0) & (b[x] == 0));
        } else {
            for (long x = 0; x < w; x++)
                k[x] = (unsigned char)(cnt[x] == 0);
        }
        unsigned int sum = 0;
        for (long x = 0; x < w; x++)
            sum += k[x];
        nkeep += sum;
    }
    job->nkeep[tid] = nkeep;
}

/* Order-preserving map of a float to an unsigned integer (IEEE 754: flip
 * the sign bit of positives, every bit of negatives); -0 is taken as +0. */
static uint32_t float_key(float f)
{
    uint32_t u;
    f += 0.0f;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static float key_float(uint32_t k)
{
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The k-th smallest (0-based) of n finite values, exactly, in two passes
 * (a radix selection on the top and bottom 16 bits of the keys); hist is
 * 65536 counts of scratch. The same value hilal_select_kth_float() gives,
 * without reordering v. */
static float select_kth_radix(const float *v, size_t n, size_t k, uint32_t *hist)
{
    memset(hist, 0, sizeof *hist * 65536);
    for (size_t i = 0; i < n; i++)
        hist[float_key(v[i]) >> 16]++;
    uint32_t hi = 0;
    size_t below = 0;
    while (below + hist[hi] <= k)
        below += hist[hi++];
    k -= below;
    memset(hist, 0, sizeof *hist * 65536);
    for (size_t i = 0; i < n; i++) {
        const uint32_t key = float_key(v[i]);
        if ((key >> 16) == hi)
            hist[key & 0xffffu]++;
    }
    uint32_t lo = 0;
    below = 0;
    while (below + hist[lo] <= k)
        below += hist[lo++];
    return key_float((hi << 16) | lo);
}

/* Median and 1.4826 MAD of the m finite values of vals (overwritten). */
static void median_mad(float *vals, size_t m, uint32_t *hist, double *med, double *sigma)
{
    *med = NAN;
    *sigma = NAN;
    if (m == 0)
        return;
    float md = select_kth_radix(vals, m, m / 2, hist);
    for (size_t i = 0; i < m; i++)
        vals[i] = fabsf(vals[i] - md);
    float mad = select_kth_radix(vals, m, m / 2, hist);
    *med = md;
    *sigma = 1.4826 * mad;
}

/* Bytes of scratch region_statistics() needs for an nx x ny region: the
 * histogram of the selection, per-thread rows, the sampled values and the
 * two maps. */
static size_t stats_scratch_bytes(long nx, long ny, int threads)
{
    size_t n = (size_t)nx * (size_t)ny, stride = n / 2000000 + 1;
    return 2 * n + (size_t)threads * (size_t)nx * (1 + sizeof(int32_t)) +
           sizeof(float) * (n / stride + 1) + sizeof(uint32_t) * 65536 + 64;
}

/* Median and 1.4826 MAD of S_corr over the unfilled pixels of the region
 * of near_job farther than `radius` px from any unfilled pixel with
 * |S_corr| > 5 (sources, whose wings would bias both). Falls back to all
 * unfilled pixels when fewer than min(1000, a quarter of the region) are
 * left. At most ~2 million pixels are sampled, on a regular stride.
 * *nused = values used (may be NULL). scratch (NULL: allocated here) holds
 * stats_scratch_bytes() bytes. */
static hilal_status region_statistics(near_job *job, int threads, double *med, double *sigma,
                                      long *nused, void *scratch, hilal_error *err)
{
    const size_t n = (size_t)job->nx * (size_t)job->ny;
    hilal_status st = HILAL_OK;
    unsigned char *own = NULL;
    *med = NAN;
    *sigma = NAN;
    if (nused != NULL)
        *nused = 0;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1)
        threads = 1;
    if (scratch == NULL) {
        own = malloc(stats_scratch_bytes(job->nx, job->ny, threads));
        if (own == NULL)
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for S_corr statistics");
        scratch = own;
    }
    /* carve the scratch: counts and the histogram first (aligned) */
    const size_t stride = n / 2000000 + 1;
    unsigned char *p = scratch;
    uint32_t *hist = (uint32_t *)(void *)p;
    p += sizeof *hist * 65536;
    for (int t = 0; t < threads; t++) {
        job->cnt[t] = (int32_t *)(void *)p;
        p += sizeof(int32_t) * (size_t)job->nx;
    }
    float *vals = (float *)(void *)p;
    p += sizeof *vals * (n / stride + 1);
    job->tmp = p;
    p += n;
    job->keep = p;
    p += n;
    for (int t = 0; t < threads; t++) {
        job->src[t] = p;
        p += (size_t)job->nx;
    }
    memset(job->nkeep, 0, sizeof job->nkeep);
    hilal_parallel_for(threads, job->ny, near_rows, job);
    hilal_parallel_for(threads, job->nx, near_cols, job);
    size_t nkeep = 0;
    for (int t = 0; t < MAX_THREADS; t++)
        nkeep += job->nkeep[t];
    size_t need = n / 4 < 1000 ? n / 4 : 1000;
    if (nkeep < need)
        for (long y = 0; y < job->ny; y++)
            for (long x = 0; x < job->nx; x++)
                job->keep[(size_t)y * job->nx + x] =
                    job->bad == NULL || !job->bad[(size_t)y * (size_t)job->bstride + (size_t)x];
    /* gather the kept values, at most ~2 million on a regular stride */
    size_t m = 0;
    for (size_t i = 0; i < n; i += stride) {
        if (!job->keep[i])
            continue;
        long y = (long)(i / (size_t)job->nx), x = (long)(i % (size_t)job->nx);
        vals[m++] = job->v[(size_t)y * (size_t)job->vstride + (size_t)x];
    }
    if (nused != NULL)
        *nused = (long)m;
    /* the finite ones, thinned again like robust_stats() would */
    size_t s2 = m / 2000000 + 1, mf = 0;
    for (size_t i = 0; i < m; i += s2)
        if (isfinite(vals[i]))
            vals[mf++] = vals[i];
    median_mad(vals, mf, hist, med, sigma);
    free(own);
    job->tmp = job->keep = NULL;
    return st;
}

/* The statistics of S_corr over the window of a run, in the scratch given
 * (the FFT arrays, free by then). */
static hilal_status scorr_statistics(const zogy *z, long radius, void *scratch, double *med,
                                     double *sigma, hilal_error *err)
{
    near_job job;
    memset(&job, 0, sizeof job);
    job.v = z->scorr;
    job.vstride = z->nx;
    job.bad = z->wbad;
    job.bstride = z->enx;
    job.nx = z->nx;
    job.ny = z->ny;
    job.radius = radius;
    return region_statistics(&job, z->threads, med, sigma, NULL, scratch, err);
}

/* ------------------------------------------------------------------------
 * hilal_zogy_run
 * ------------------------------------------------------------------------ */

void hilal_zogy_input_init(hilal_zogy_input *in)
{
    memset(in, 0, sizeof *in);
    in->flux_ratio = 1.0;
    in->reg_rms_x_px = 0.0;
    in->reg_rms_y_px = 0.0;
    in->threads = 0;
    in->rigor = HILAL_FFT_ESTIMATE;
    in->pad_margin_px = 8;
    in->source_noise = 1;
    in->astrometric_noise = 1;
    in->noise_calibration = 0;
    in->calib_max_factor = 2.0;
    in->win_x0 = in->win_y0 = in->win_nx = in->win_ny = 0;
    in->min_fft_nx = in->min_fft_ny = 0;
    in->allow_all_filled = 0;
    in->workspace = NULL;
}

/* The difference-mask value of image pixel (X, Y): the union of both masks;
 * a pixel unusable in either image, not finite in either (pixel or sky) or
 * with a variance >= VAR_MASKED in either is to be filled (*bad = 1; INTERP,
 * plus NODATA when not finite); a usable pixel whose variance is not
 * positive and finite is flagged NEGVAR (*negvar = 1). */
static hilal_mask_t pixel_mask(const zogy *z, const hilal_mask_t *msci, const hilal_mask_t *mref,
                               long X, long Y, int *bad, int *negvar)
{
    const size_t i = (size_t)Y * (size_t)z->fnx + (size_t)X;
    hilal_mask_t m = (msci ? msci[i] : 0) | (mref ? mref[i] : 0);
    int finite = 1;
    for (int w = 0; w < 2; w++)
        if (!isfinite(z->pix[w][i]) || (z->sky[w] && !isfinite(z->sky[w][i])))
            finite = 0;
    if (!finite)
        m |= HILAL_MASK_NODATA;
    /* a variance of VAR_MASKED or more marks a masked pixel (the background
     * stage's convention) */
    int varmasked = (z->var[0] != NULL && z->var[0][i] >= VAR_MASKED) ||
                    (z->var[1] != NULL && z->var[1][i] >= VAR_MASKED);
    *bad = (m & HILAL_MASK_UNUSABLE) != 0 || varmasked;
    *negvar = 0;
    if (*bad) {
        m |= HILAL_MASK_INTERP;
    } else {
        for (int w = 0; w < 2; w++)
            if (z->var[w] != NULL && !(z->var[w][i] > 0 && isfinite(z->var[w][i])))
                *negvar = 1;
        if (*negvar)
            m |= HILAL_MASK_NEGVAR;
    }
    return m;
}

/* Copies a PSF into doubles normalised to sum 1. */
static hilal_status load_psf(const hilal_psf *p, const char *which, psf_d *out, hilal_error *err)
{
    if (p == NULL || p->data == NULL || p->size < 1)
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "the %s PSF is missing; the psf stage must run before subtract",
                               which);
    if (p->size % 2 == 0)
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "the %s PSF is %d px wide; it must have an odd size with the "
                               "centre on the central pixel",
                               which, p->size);
    size_t n = (size_t)p->size * (size_t)p->size;
    double sum = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(p->data[i]))
            return hilal_error_set(err, HILAL_ERR_DATA, "the %s PSF has non-finite values", which);
        sum += p->data[i];
    }
    if (!(sum > 0))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "the %s PSF sums to %g; it must have a positive sum", which, sum);
    out->size = p->size;
    out->v = malloc(sizeof *out->v * n);
    if (out->v == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the %s PSF", which);
    for (size_t i = 0; i < n; i++)
        out->v[i] = p->data[i] / sum;
    return HILAL_OK;
}

/* Background RMS: the image's sky_rms_adu, else 1.4826 MAD of its usable
 * sky-subtracted pixels in the window. */
static hilal_status background_sigma(const zogy *z, int w, const hilal_image *img,
                                     double *sigma, int *estimated, hilal_error *err)
{
    *estimated = 0;
    if (isfinite(img->sky_rms_adu) && img->sky_rms_adu > 0) {
        *sigma = img->sky_rms_adu;
        return HILAL_OK;
    }
    size_t n = (size_t)z->nx * (size_t)z->ny;
    float *v = malloc(sizeof *v * n);
    unsigned char *keep = malloc(n);
    if (v == NULL || keep == NULL) {
        free(v);
        free(keep);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory estimating the sky RMS");
    }
    for (long y = 0; y < z->ny; y++)
        for (long x = 0; x < z->nx; x++) {
            const long X = z->ox + x, Y = z->oy + y;
            const size_t i = (size_t)y * (size_t)z->nx + (size_t)x;
            const size_t f = (size_t)Y * (size_t)z->fnx + (size_t)X;
            int bad, negvar;
            (void)pixel_mask(z, z->msk[0], z->msk[1], X, Y, &bad, &negvar);
            keep[i] = !bad;
            v[i] = z->pix[w][f] - (z->sky[w] ? z->sky[w][f] : 0.0f);
        }
    double med;
    long m = robust_stats(v, keep, n, &med, sigma);
    free(v);
    free(keep);
    if (m < 0)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory estimating the sky RMS");
    if (m == 0)
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "no pixel is usable in both the science and the reference image "
                               "(all masked or NaN); check the alignment and the masks");
    if (!(*sigma > 0))
        return hilal_error_set(err, HILAL_ERR_DATA,
                               "the %s image has no measured background RMS and its pixels give "
                               "none (MAD = 0); run the background stage first",
                               w == 0 ? "science" : "reference");
    *estimated = 1;
    hilal_log(HILAL_LOG_WARN,
              "subtract: the %s image has no background RMS; using 1.4826 MAD = %.4g ADU",
              w == 0 ? "science" : "reference", *sigma);
    return HILAL_OK;
}

static hilal_status alloc_diff(hilal_diff *out, long nx, long ny, int psize, hilal_error *err)
{
    size_t n = (size_t)nx * (size_t)ny;
    out->nx = nx;
    out->ny = ny;
    out->d = malloc(sizeof *out->d * n);
    out->s = malloc(sizeof *out->s * n);
    out->scorr = malloc(sizeof *out->scorr * n);
    out->flux = malloc(sizeof *out->flux * n);
    out->flux_err = malloc(sizeof *out->flux_err * n);
    out->mask = malloc(sizeof *out->mask * n);
    out->psf_d.size = psize;
    out->psf_d.data = malloc(sizeof *out->psf_d.data * (size_t)psize * (size_t)psize);
    if (out->d == NULL || out->s == NULL || out->scorr == NULL || out->flux == NULL ||
        out->flux_err == NULL || out->mask == NULL || out->psf_d.data == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM,
                               "out of memory for the %ld x %ld difference products", nx, ny);
    return HILAL_OK;
}

hilal_status hilal_zogy_run(const hilal_zogy_input *in, hilal_diff *out, hilal_zogy_info *info,
                            hilal_error *err)
{
    hilal_status st = HILAL_OK;
    zogy zs;
    zogy *z = &zs;
    psf_d pd = {0, NULL};
    edge_job ej;
    edge_tabs etabs;
    ksq_rows ksq = {0, NULL, NULL};
    double t0 = now_s();
    double tstep[8] = {0}; /* wall time at the end of each step, for the debug log */

    memset(z, 0, sizeof *z);
    memset(&ej, 0, sizeof ej);
    memset(&etabs, 0, sizeof etabs);
    memset(out, 0, sizeof *out);
    if (info != NULL)
        memset(info, 0, sizeof *info);

    /* ---- Step 1: inputs ---- */
    const hilal_image *sci = in->sci, *ref = in->ref;
    if (sci == NULL || ref == NULL || sci->pix == NULL || ref->pix == NULL) {
        st = hilal_error_set(err, HILAL_ERR_DATA, "ZOGY needs both a science and a reference image");
        goto cleanup;
    }
    if (sci->nx != ref->nx || sci->ny != ref->ny) {
        st = hilal_error_set(err, HILAL_ERR_MISMATCH,
                             "science image is %ld x %ld px but the reference is %ld x %ld px; the "
                             "reference must be resampled onto the science grid (align stage)",
                             sci->nx, sci->ny, ref->nx, ref->ny);
        goto cleanup;
    }
    if (!(isfinite(in->flux_ratio) && in->flux_ratio > 0)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "flux ratio F_n = %g is not a positive number; check the fluxscale "
                             "stage (too few matched stars?)",
                             in->flux_ratio);
        goto cleanup;
    }
    /* The window of the products: the whole image unless one is given. */
    z->fnx = sci->nx;
    z->fny = sci->ny;
    if (in->win_nx > 0 || in->win_ny > 0) {
        if (in->win_x0 < 0 || in->win_y0 < 0 || in->win_nx < 1 || in->win_ny < 1 ||
            in->win_x0 + in->win_nx > z->fnx || in->win_y0 + in->win_ny > z->fny) {
            st = hilal_error_set(err, HILAL_ERR_RANGE,
                                 "the window %ld x %ld px at (%ld, %ld) does not lie inside the "
                                 "%ld x %ld px image",
                                 in->win_nx, in->win_ny, in->win_x0, in->win_y0, z->fnx, z->fny);
            goto cleanup;
        }
        z->ox = in->win_x0;
        z->oy = in->win_y0;
        z->nx = in->win_nx;
        z->ny = in->win_ny;
    } else {
        z->ox = z->oy = 0;
        z->nx = z->fnx;
        z->ny = z->fny;
    }
    const size_t npix = (size_t)z->nx * (size_t)z->ny;
    const hilal_image *img[2] = {sci, ref};
    for (int w = 0; w < 2; w++) {
        z->pix[w] = img[w]->pix;
        z->sky[w] = img[w]->sky;
        z->var[w] = img[w]->var;
        z->msk[w] = img[w]->mask;
    }
    z->fn = in->flux_ratio;
    z->fr = 1.0;
    z->sx = isfinite(in->reg_rms_x_px) && in->reg_rms_x_px > 0 ? in->reg_rms_x_px : 0.0;
    z->sy = isfinite(in->reg_rms_y_px) && in->reg_rms_y_px > 0 ? in->reg_rms_y_px : 0.0;
    z->use_ast = in->astrometric_noise && (z->sx > 0 || z->sy > 0);
    z->use_src = in->source_noise != 0;
    z->threads = hilal_fft_threads(in->threads);
    if (z->threads > MAX_THREADS)
        z->threads = MAX_THREADS;
    if ((st = load_psf(in->sci_psf, "science", &z->psf[0], err)) != HILAL_OK ||
        (st = load_psf(in->ref_psf, "reference", &z->psf[1], err)) != HILAL_OK)
        goto cleanup;

    int est[2];
    for (int w = 0; w < 2; w++)
        if ((st = background_sigma(z, w, img[w], &z->sigma[w], &est[w], err)) != HILAL_OK)
            goto cleanup;

    /* eq. 15: F_D = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2) */
    z->f_d = z->fr * z->fn /
             sqrt(z->sigma[0] * z->sigma[0] * z->fr * z->fr + z->sigma[1] * z->sigma[1] * z->fn * z->fn);

    tstep[0] = now_s();
    /* ---- Step 2: kernels and P_D on a small grid ---- */
    if ((st = small_kernels(z, &pd, err)) != HILAL_OK)
        goto cleanup;
    if (z->h > 512) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "the ZOGY kernels are %d px in radius; the PSFs are too large (at "
                             "most ~250 px) or badly sampled",
                             z->h);
        goto cleanup;
    }

    /* ---- Step 3: padded size, maps and the fill map ---- */
    int phalf = (z->psf[0].size > z->psf[1].size ? z->psf[0].size : z->psf[1].size) / 2;
    int pad = z->h > z->hd ? z->h : z->hd;
    if (phalf > pad)
        pad = phalf;
    pad += in->pad_margin_px > 0 ? in->pad_margin_px : 0;
    z->mx = hilal_fft_good_size(z->nx + 2 * (long)pad);
    z->my = hilal_fft_good_size(z->ny + 2 * (long)pad);
    /* a larger transform on request (windows of one frame sharing a plan) */
    if (in->min_fft_nx > z->mx)
        z->mx = hilal_fft_good_size(in->min_fft_nx);
    if (in->min_fft_ny > z->my)
        z->my = hilal_fft_good_size(in->min_fft_ny);
    z->mxc = z->mx / 2 + 1;
    z->rs = hilal_fft_inplace_stride(z->mx);
    z->ixmap = malloc(sizeof *z->ixmap * (size_t)z->mx);
    z->iymap = malloc(sizeof *z->iymap * (size_t)z->my);
    if (z->ixmap == NULL || z->iymap == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the padding maps");
        goto cleanup;
    }
    /* Padded index j < n is the window itself; the rest is split between the
     * pixels beyond its far edge (j = n, n+1, ...) and, wrapping around, those
     * before its near edge (j = m-1, m-2, ... standing for -1, -2, ...). They
     * are image pixels where the image extends that far (a window inside the
     * image), and the image reflected about its edge beyond it (... 1 0 | 0 1
     * ...). Every padded pixel lies in the extent [e0, e0 + ne). */
    for (int axis = 0; axis < 2; axis++) {
        long n = axis == 0 ? z->nx : z->ny, m = axis == 0 ? z->mx : z->my;
        long o = axis == 0 ? z->ox : z->oy, full = axis == 0 ? z->fnx : z->fny;
        long *map = axis == 0 ? z->ixmap : z->iymap;
        long right = (m - n) / 2;
        long lo = full, hi = -1;
        for (long j = 0; j < m; j++) {
            map[j] = reflect(j < n + right ? o + j : o + j - m, full);
            if (map[j] < lo)
                lo = map[j];
            if (map[j] > hi)
                hi = map[j];
        }
        if (axis == 0) {
            z->ex0 = lo;
            z->enx = hi - lo + 1;
        } else {
            z->ey0 = lo;
            z->eny = hi - lo + 1;
        }
    }
    /* The padded columns that are image columns ox + x in order: the window
     * and the image beyond its far edge (read without the map). */
    z->xrun = 0;
    while (z->xrun < z->mx && z->ixmap[z->xrun] == z->ox + z->xrun)
        z->xrun++;
    /* Each image row of the extent is made once, in the first padded row
     * showing it; the padded rows repeating it (mirrored) are copies. */
    z->orow = malloc(sizeof *z->orow * (size_t)z->eny);
    if (z->orow == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the padding maps");
        goto cleanup;
    }
    for (long e = 0; e < z->eny; e++)
        z->orow[e] = -1;
    for (long y = 0; y < z->my; y++)
        if (z->orow[z->iymap[y] - z->ey0] < 0)
            z->orow[z->iymap[y] - z->ey0] = y;

    /* The FFT arrays and the fill map, from the workspace. */
    if ((st = alloc_diff(out, z->nx, z->ny,
                         z->psf[0].size > z->psf[1].size ? z->psf[0].size : z->psf[1].size,
                         err)) != HILAL_OK)
        goto cleanup;
    if ((st = ws_acquire(in->workspace, z->mx, z->my, &z->set, err)) != HILAL_OK)
        goto cleanup;
    for (int q = 0; q < 4; q++)
        z->c[q] = z->set->c[q];
    {
        size_t need = (size_t)z->enx * (size_t)z->eny;
        if (z->set->bad_cap < need) {
            free(z->set->bad);
            z->set->bad_cap = 0;
            if ((z->set->bad = malloc(need)) == NULL) {
                st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the fill map");
                goto cleanup;
            }
            z->set->bad_cap = need;
        }
        z->bad = z->set->bad;
    }
    z->wbad = z->bad + ext_index(z, z->ox, z->oy);

    /* One pass over the images: the difference mask (union of both masks),
     * the pixels to fill (unusable in either image, not finite in either, or
     * with a masked variance), and N and R padded, 0 at filled pixels, into
     * c[0] and c[1] (as real arrays; every transform below is in place). */
    prep_job pj;
    memset(&pj, 0, sizeof pj);
    pj.z = z;
    pj.kind = PREP_IMAGES;
    pj.dst[0] = (float *)z->c[0];
    pj.dst[1] = (float *)z->c[1];
    pj.msci = sci->mask;
    pj.mref = ref->mask;
    pj.out = out->mask;
    if ((st = prep_planes(&pj, err)) != HILAL_OK)
        goto cleanup;
    long nfilled = 0, nfilled_ext = 0, nnegvar = 0;
    for (int t = 0; t < MAX_THREADS; t++) {
        nfilled += pj.nfilled[t];
        nfilled_ext += pj.nfilled_ext[t];
        nnegvar += pj.nnegvar[t];
    }
    if ((size_t)nfilled == npix && !in->allow_all_filled) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "no pixel is usable in both the science and the reference image "
                             "(all masked or NaN); check the alignment and the masks");
        goto cleanup;
    }

    tstep[1] = now_s();
    /* ---- Step 4: FFTs of N, R, P_n, P_r and the spectral pass ---- */
    if ((st = hilal_fft_plan_get_inplace(z->mx, z->my, z->threads, in->rigor, &z->plan, err)) !=
        HILAL_OK)
        goto cleanup;
    embed_psf(z, (float *)z->c[2], &z->psf[0]);
    embed_psf(z, (float *)z->c[3], &z->psf[1]);
    for (int q = 0; q < 4; q++)
        if ((st = hilal_fft_r2c_inplace(z->plan, z->c[q], err)) != HILAL_OK)
            goto cleanup;
    hilal_parallel_for(z->threads, z->my, spectral_rows, z);
    double fs_sum = 0;
    for (int t = 0; t < MAX_THREADS; t++)
        fs_sum += z->fs_part[t];
    z->f_s = fs_sum / ((double)z->mx * (double)z->my);
    if (!(z->f_s > 0) || !isfinite(z->f_s)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "F_S = %g: the PSFs and noise levels give no sensitivity to point "
                             "sources; check the PSFs",
                             z->f_s);
        goto cleanup;
    }

    tstep[2] = now_s();
    /* ---- Step 5: D, S and S_N in image space ----
     * D from c[2], S from c[3] and S_N from c[0], each in place; S and S_N
     * stay there for the astrometric pass. */
    out->f_d = z->f_d;
    z->d = out->d;
    z->s = out->s;
    z->scorr = out->scorr;
    z->flux = out->flux;
    z->flux_err = out->flux_err;
    z->mask = out->mask;
    if ((st = hilal_fft_c2r_inplace(z->plan, z->c[2], err)) != HILAL_OK)
        goto cleanup;
    crop(z, (float *)z->c[2], z->d);
    if ((st = hilal_fft_c2r_inplace(z->plan, z->c[3], err)) != HILAL_OK)
        goto cleanup;
    crop(z, (float *)z->c[3], z->s);
    if (z->use_ast) {
        if ((st = hilal_fft_c2r_inplace(z->plan, z->c[0], err)) != HILAL_OK)
            goto cleanup;
        z->sp = (const float *)z->c[3];
        z->snp = (const float *)z->c[0];
        hilal_parallel_for(z->threads, z->ny, astrometric_rows, z);
        z->sp = z->snp = NULL;
    }

    tstep[3] = now_s();
    /* ---- Step 6: source noise, eqs. 26-27 ----
     * V(S_N) + V(S_R) = V_N (x) k_n^2 + V_R (x) k_r^2. The background part
     * sigma^2 sum k^2 of each is the constant F_S (added in step 8); here
     * only the excess V - sigma^2 is convolved. It is non-zero where there
     * are sources, filled pixels (-sigma^2: no noise there) or a background
     * that differs from its global RMS. The result stays in c[0] (a padded
     * real array) for step 8. */
    int need_src = z->use_src && (z->var[0] != NULL || z->var[1] != NULL || nfilled_ext > 0);
    if (need_src) {
        pj.kind = PREP_EXCESS;
        pj.dst[0] = (float *)z->c[0];
        pj.dst[1] = (float *)z->c[1];
        if ((st = prep_planes(&pj, err)) != HILAL_OK)
            goto cleanup;
        const int direct = z->h <= KSQ_DIRECT_MAX_H;
        if (!direct) {
            embed_kernel(z, (float *)z->c[2], z->k[0], 1);
            embed_kernel(z, (float *)z->c[3], z->k[1], 1);
        }
        for (int q = 0; q < (direct ? 2 : 4); q++)
            if ((st = hilal_fft_r2c_inplace(z->plan, z->c[q], err)) != HILAL_OK)
                goto cleanup;
        if (direct) {
            if ((st = ksq_rows_make(z, &ksq, err)) != HILAL_OK)
                goto cleanup;
            ksq_job kj = {z, &ksq};
            hilal_parallel_for(z->threads, z->my, variance_direct_rows, &kj);
        } else {
            hilal_parallel_for(z->threads, z->my, variance_rows, z);
        }
        if ((st = hilal_fft_c2r_inplace(z->plan, z->c[0], err)) != HILAL_OK)
            goto cleanup;
        z->vp = (const float *)z->c[0];
    }

    tstep[4] = now_s();
    /* ---- Steps 7-8: edge strip, S_corr, flux and its error ---- */
    ej.z = z;
    {
        long wd = 2 * (2 * (long)z->h + 1) + 1;
        for (int t = 0; t < z->threads; t++) {
            ej.wn[t] = calloc((size_t)(wd * wd), sizeof *ej.wn[t]);
            ej.wr[t] = calloc((size_t)(wd * wd), sizeof *ej.wr[t]);
            if (ej.wn[t] == NULL || ej.wr[t] == NULL) {
                st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the edge strip");
                goto cleanup;
            }
        }
    }
    if ((st = edge_tabs_make(z, &etabs, err)) != HILAL_OK)
        goto cleanup;
    ej.tabs = &etabs;
    hilal_parallel_for(z->threads, z->ny, combine_rows, &ej);
    z->vp = NULL;
    tstep[5] = now_s();

    /* P_D, and the robust S_corr statistics on unfilled pixels away from
     * sources under the noise model. */
    for (int i = 0; i < pd.size * pd.size; i++)
        out->psf_d.data[i] = (float)pd.v[i];
    out->psf_d.fwhm_px = stamp_fwhm(pd.v, pd.size);
    out->psf_d.nstars = 0;
    double model_med = NAN, model_std = NAN, kappa = 1.0;
    /* the statistics work in the FFT arrays, free by now, when they suffice */
    void *stats_scratch =
        stats_scratch_bytes(z->nx, z->ny, z->threads) <=
                sizeof(hilal_fft_complex) * hilal_fft_ncomplex(z->mx, z->my)
            ? (void *)z->c[1]
            : NULL;
    long radius;
    {
        double fw = isfinite(out->psf_d.fwhm_px) ? out->psf_d.fwhm_px : 3.0;
        radius = (long)ceil(2.0 * fw);
        if (radius < 3)
            radius = 3;
    }
    if ((size_t)nfilled < npix) {
        st = scorr_statistics(z, radius, stats_scratch, &model_med, &model_std, err);
        if (st != HILAL_OK)
            goto cleanup;
    }
    /* Noise calibration: real images carry noise the white-noise model of
     * ZOGY does not describe (flat-field structure fixed on the detector,
     * which does not cancel between frames taken at different pointings,
     * unresolved sources, noise correlated by earlier resampling). Its power
     * adds to the background variance of S; measured as the variance of
     * S_corr on source-free pixels, model_std^2 = kappa (in units of F_S,
     * where the background dominates), it enters V(S) as an extra background
     * term (kappa - 1) F_S, so that S_corr has unit variance again while the
     * source-noise terms keep their meaning. Only done when the factor is
     * within [1/calib_max_factor, calib_max_factor]: a larger one means
     * something is wrong (PSFs, flux ratio) and must stay visible. */
    int calibrated = 0;
    if (in->noise_calibration && isfinite(model_std) && model_std > 0) {
        double f = in->calib_max_factor > 1 ? in->calib_max_factor : 1.0;
        if (model_std <= f && model_std >= 1.0 / f) {
            kappa = model_std * model_std;
            calibrated = 1;
        } else {
            hilal_log(HILAL_LOG_WARN,
                      "subtract: S_corr has a standard deviation of %.3f under the noise model "
                      "in the %ld x %ld px window at (%ld, %ld); outside the calibration range "
                      "[%.3g, %.3g], left uncalibrated",
                      model_std, z->nx, z->ny, z->ox, z->oy, 1.0 / f, f);
        }
    }
    {
        final_job fj = {z, kappa};
        hilal_parallel_for(z->threads, z->ny, final_rows, &fj);
    }
    if (calibrated && (size_t)nfilled < npix && in->win_nx == 0 && in->win_ny == 0) {
        st = scorr_statistics(z, radius, stats_scratch, &out->scorr_mean, &out->scorr_std, err);
        if (st != HILAL_OK)
            goto cleanup;
    } else if (calibrated && (size_t)nfilled < npix) {
        /* a window (a tile, whose statistics are measured again after the
         * blend): the background pixels scale by 1 / sqrt(kappa) */
        out->scorr_mean = model_med / sqrt(kappa);
        out->scorr_std = model_std / sqrt(kappa);
    } else {
        out->scorr_mean = (size_t)nfilled < npix ? model_med : 0.0;
        out->scorr_std = (size_t)nfilled < npix ? model_std : 0.0;
    }
    tstep[6] = now_s();
    hilal_log(HILAL_LOG_DEBUG,
              "ZOGY %ld x %ld at (%ld, %ld) (FFT %ld x %ld, kernel radius %d px, %d threads): "
              "inputs %.3f s, kernels and padding %.3f s, "
              "forward FFTs and spectra %.3f s, D and S %.3f s, source noise %.3f s, S_corr and "
              "flux %.3f s, statistics %.3f s",
              z->nx, z->ny, z->ox, z->oy, z->mx, z->my, z->h, z->threads, tstep[0] - t0, tstep[1] - tstep[0],
              tstep[2] - tstep[1], tstep[3] - tstep[2], tstep[4] - tstep[3], tstep[5] - tstep[4],
              tstep[6] - tstep[5]);

    if (info != NULL) {
        info->sigma_n_adu = z->sigma[0];
        info->sigma_r_adu = z->sigma[1];
        info->sigma_n_estimated = est[0];
        info->sigma_r_estimated = est[1];
        info->f_s = z->f_s;
        info->f_d = z->f_d;
        info->fft_nx = z->mx;
        info->fft_ny = z->my;
        info->pad_px = pad;
        info->kernel_radius_px = z->h;
        info->n_filled = nfilled;
        info->n_negvar = nnegvar;
        info->threads = z->threads;
        info->scorr_std_model = model_std;
        info->scorr_median_model = model_med;
        info->noise_scale = sqrt(kappa);
        info->seconds = now_s() - t0;
    }
cleanup:
    if (st != HILAL_OK)
        hilal_diff_clear(out);
    for (int w = 0; w < 2; w++) {
        free(z->psf[w].v);
        free(z->k[w]);
    }
    free(pd.v);
    free(z->ixmap);
    free(z->iymap);
    free(z->orow);
    /* the FFT arrays and the fill map go back to the workspace */
    ws_release(in->workspace, z->set);
    edge_tabs_free(&etabs);
    ksq_rows_free(&ksq);
    for (int t = 0; t < MAX_THREADS; t++) {
        free(ej.wn[t]);
        free(ej.wr[t]);
    }
    return st;
}

/* ------------------------------------------------------------------------
 * P_D and kernel correlations of PSF pairs (for tiled runs)
 * ------------------------------------------------------------------------ */

hilal_status hilal_zogy_psf_d(const hilal_psf *sci_psf, const hilal_psf *ref_psf, double sigma_n,
                              double sigma_r, double flux_ratio, hilal_psf *out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    zogy zs;
    zogy *z = &zs;
    psf_d pd = {0, NULL};
    memset(z, 0, sizeof *z);
    hilal_psf_clear(out);
    if (!(sigma_n > 0 && sigma_r > 0 && isfinite(sigma_n) && isfinite(sigma_r) &&
          flux_ratio > 0 && isfinite(flux_ratio))) {
        st = hilal_error_set(err, HILAL_ERR_RANGE,
                             "P_D needs positive noise levels and flux ratio (got sigma_n = %g, "
                             "sigma_r = %g, F_n = %g)",
                             sigma_n, sigma_r, flux_ratio);
        goto cleanup;
    }
    if ((st = load_psf(sci_psf, "science", &z->psf[0], err)) != HILAL_OK ||
        (st = load_psf(ref_psf, "reference", &z->psf[1], err)) != HILAL_OK)
        goto cleanup;
    z->sigma[0] = sigma_n;
    z->sigma[1] = sigma_r;
    z->fn = flux_ratio;
    z->fr = 1.0;
    /* eq. 15 */
    z->f_d = z->fr * z->fn / sqrt(sigma_n * sigma_n * z->fr * z->fr + sigma_r * sigma_r * z->fn * z->fn);
    if ((st = small_kernels(z, &pd, err)) != HILAL_OK)
        goto cleanup;
    out->data = malloc(sizeof *out->data * (size_t)pd.size * (size_t)pd.size);
    if (out->data == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for P_D");
        goto cleanup;
    }
    out->size = pd.size;
    for (int i = 0; i < pd.size * pd.size; i++)
        out->data[i] = (float)pd.v[i];
    out->fwhm_px = stamp_fwhm(pd.v, pd.size);
    out->nstars = 0;
cleanup:
    for (int w = 0; w < 2; w++) {
        free(z->psf[w].v);
        free(z->k[w]);
    }
    free(pd.v);
    return st;
}

hilal_status hilal_zogy_correlation(const hilal_psf *sci_a, const hilal_psf *ref_a,
                                    const hilal_psf *sci_b, const hilal_psf *ref_b, double sigma_n,
                                    double sigma_r, double flux_ratio_a, double flux_ratio_b,
                                    double *rho_s, double *rho_d, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    psf_d p[4] = {{0, NULL}, {0, NULL}, {0, NULL}, {0, NULL}};
    float *r = NULL;
    hilal_fft_complex *c[4] = {NULL, NULL, NULL, NULL};
    const hilal_fft_plan *plan = NULL;
    *rho_s = *rho_d = NAN;
    if (!(sigma_n > 0 && sigma_r > 0 && flux_ratio_a > 0 && flux_ratio_b > 0)) {
        st = hilal_error_set(err, HILAL_ERR_RANGE,
                             "kernel correlation needs positive noise levels and flux ratios");
        goto cleanup;
    }
    if ((st = load_psf(sci_a, "science", &p[0], err)) != HILAL_OK ||
        (st = load_psf(ref_a, "reference", &p[1], err)) != HILAL_OK ||
        (st = load_psf(sci_b, "science", &p[2], err)) != HILAL_OK ||
        (st = load_psf(ref_b, "reference", &p[3], err)) != HILAL_OK)
        goto cleanup;
    int smax = 0;
    for (int q = 0; q < 4; q++)
        if (p[q].size > smax)
            smax = p[q].size;
    /* The same small grid as the kernels of a run (step 2). */
    long L = hilal_fft_good_size(4 * smax > 64 ? 4 * smax : 64), Lc = L / 2 + 1;
    if ((st = hilal_fft_plan_get(L, L, 1, HILAL_FFT_ESTIMATE, &plan, err)) != HILAL_OK)
        goto cleanup;
    r = hilal_fft_alloc_real(L, L, err);
    for (int q = 0; q < 4; q++)
        c[q] = hilal_fft_alloc_complex(L, L, err);
    if (r == NULL || c[0] == NULL || c[1] == NULL || c[2] == NULL || c[3] == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the kernel correlation");
        goto cleanup;
    }
    for (int q = 0; q < 4; q++) {
        embed_stamp(r, L, p[q].v, p[q].size);
        if ((st = hilal_fft_r2c(plan, r, c[q], err)) != HILAL_OK)
            goto cleanup;
    }
    /* With F_r = 1, per frequency (eqs. 13, 28-29):
     *   den = sigma_n^2 |P_r|^2 + sigma_r^2 F_n^2 |P_n|^2,
     *   k_n = F_n |P_r|^2 conj(P_n) / den,  k_r = F_n^2 |P_n|^2 conj(P_r) / den,
     *   D filters: P_r / sqrt(den) on N and F_n P_n / sqrt(den) on R.
     * For the same N and R, Cov(S_a, S_b) = sum over frequencies of
     * sigma_n^2 Re(conj(k_n,a) k_n,b) + sigma_r^2 Re(conj(k_r,a) k_r,b)
     * (Parseval; the background noise), and likewise for D. */
    const double s2n = sigma_n * sigma_n, s2r = sigma_r * sigma_r;
    double cs = 0, va = 0, vb = 0, cd = 0, da = 0, db = 0;
    const int nyq = (L % 2) == 0;
    for (long v = 0; v < L; v++)
        for (long u = 0; u < Lc; u++) {
            size_t i = (size_t)v * (size_t)Lc + (size_t)u;
            double wgt = (u == 0 || (nyq && u == Lc - 1)) ? 1.0 : 2.0;
            double kn[2][2], kr[2][2], dn[2][2], dr[2][2];
            int ok = 1;
            for (int t = 0; t < 2; t++) {
                const float *pn = c[2 * t][i], *pr = c[2 * t + 1][i];
                double f = t == 0 ? flux_ratio_a : flux_ratio_b;
                double an = (double)pn[0] * pn[0] + (double)pn[1] * pn[1];
                double ar = (double)pr[0] * pr[0] + (double)pr[1] * pr[1];
                double den = s2n * ar + s2r * f * f * an;
                if (!(den > 1e-300)) {
                    ok = 0;
                    break;
                }
                double sq = sqrt(den);
                kn[t][0] = f * ar * pn[0] / den;
                kn[t][1] = -f * ar * pn[1] / den;
                kr[t][0] = f * f * an * pr[0] / den;
                kr[t][1] = -f * f * an * pr[1] / den;
                dn[t][0] = pr[0] / sq;
                dn[t][1] = pr[1] / sq;
                dr[t][0] = f * pn[0] / sq;
                dr[t][1] = f * pn[1] / sq;
            }
            if (!ok)
                continue;
            cs += wgt * (s2n * (kn[0][0] * kn[1][0] + kn[0][1] * kn[1][1]) +
                         s2r * (kr[0][0] * kr[1][0] + kr[0][1] * kr[1][1]));
            va += wgt * (s2n * (kn[0][0] * kn[0][0] + kn[0][1] * kn[0][1]) +
                         s2r * (kr[0][0] * kr[0][0] + kr[0][1] * kr[0][1]));
            vb += wgt * (s2n * (kn[1][0] * kn[1][0] + kn[1][1] * kn[1][1]) +
                         s2r * (kr[1][0] * kr[1][0] + kr[1][1] * kr[1][1]));
            cd += wgt * (s2n * (dn[0][0] * dn[1][0] + dn[0][1] * dn[1][1]) +
                         s2r * (dr[0][0] * dr[1][0] + dr[0][1] * dr[1][1]));
            da += wgt * (s2n * (dn[0][0] * dn[0][0] + dn[0][1] * dn[0][1]) +
                         s2r * (dr[0][0] * dr[0][0] + dr[0][1] * dr[0][1]));
            db += wgt * (s2n * (dn[1][0] * dn[1][0] + dn[1][1] * dn[1][1]) +
                         s2r * (dr[1][0] * dr[1][0] + dr[1][1] * dr[1][1]));
        }
    if (!(va > 0 && vb > 0 && da > 0 && db > 0)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "the PSFs give no sensitivity to point sources; check the PSFs");
        goto cleanup;
    }
    *rho_s = cs / sqrt(va * vb);
    *rho_d = cd / sqrt(da * db);
cleanup:
    for (int q = 0; q < 4; q++) {
        free(p[q].v);
        hilal_fft_free(c[q]);
    }
    hilal_fft_free(r);
    return st;
}

hilal_status hilal_diff_scorr_stats(const hilal_diff *diff, long x0, long y0, long nx, long ny,
                                    long radius_px, int threads, double *median, double *std,
                                    long *nused, hilal_error *err)
{
    *median = *std = NAN;
    if (nused != NULL)
        *nused = 0;
    if (diff == NULL || diff->scorr == NULL || x0 < 0 || y0 < 0 || nx < 1 || ny < 1 ||
        x0 + nx > diff->nx || y0 + ny > diff->ny)
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "the region %ld x %ld px at (%ld, %ld) is not inside the difference",
                               nx, ny, x0, y0);
    size_t n = (size_t)nx * (size_t)ny;
    unsigned char *bad = malloc(n);
    if (bad == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for S_corr statistics");
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            hilal_mask_t m =
                diff->mask ? diff->mask[(size_t)(y0 + y) * (size_t)diff->nx + (size_t)(x0 + x)] : 0;
            bad[(size_t)y * (size_t)nx + (size_t)x] =
                (m & (HILAL_MASK_UNUSABLE | HILAL_MASK_INTERP)) != 0;
        }
    near_job job;
    memset(&job, 0, sizeof job);
    job.v = diff->scorr + (size_t)y0 * (size_t)diff->nx + (size_t)x0;
    job.vstride = diff->nx;
    job.bad = bad;
    job.bstride = nx;
    job.nx = nx;
    job.ny = ny;
    job.radius = radius_px > 0 ? radius_px : 1;
    hilal_status st =
        region_statistics(&job, hilal_fft_threads(threads), median, std, nused, NULL, err);
    free(bad);
    return st;
}

/* ------------------------------------------------------------------------
 * The stage
 * ------------------------------------------------------------------------ */

static const hilal_param subtract_params[] = {
    {"fft_rigor", HILAL_PARAM_STRING, "auto", 0, 0, "",
     "FFTW planning: estimate (instant), measure (seconds once per size and machine, then "
     "~2x faster FFTs), patient, or auto (measure for FFTs of 2048^2 or more, else estimate)"},
    {"fft_wisdom", HILAL_PARAM_STRING, "auto", 0, 0, "",
     "file FFTW plans are loaded from at start and saved to as soon as one is measured: auto "
     "($XDG_CACHE_HOME or ~/.cache, hilal/fftwf-wisdom-<host>), a path, or \"\" for none"},
    {"fft_plan_limit", HILAL_PARAM_DOUBLE, "60", 0, 3600, "s",
     "upper bound on FFTW's time to measure one plan (0 = none); the best plan found by then "
     "is used"},
    {"pad_margin", HILAL_PARAM_INT, "8", 0, 512, "px",
     "mirror padding beyond the larger of the kernel radius and the PSF half-size"},
    {"source_noise", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "include the source noise of both images (variance planes) in S_corr (ZOGY eqs. 26-27)"},
    {"astrometric_noise", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "include the registration noise (ZOGY eqs. 30-31) from the alignment RMS in S_corr"},
    {"noise_calibration", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "scale the background noise of S to the measured S_corr scatter on source-free pixels "
     "(per tile), for noise the white-noise model misses (flat-field structure, correlations)"},
    {"calib_max_factor", HILAL_PARAM_DOUBLE, "2", 1, 100, "",
     "noise calibration only when the measured S_corr std is within [1/f, f] of 1"},
    {"tile_px", HILAL_PARAM_INT, "512", 0, 1000000, "px",
     "nominal tile side for a PSF that varies across the field (0 = always one piece)"},
    {"tile_overlap", HILAL_PARAM_INT, "0", 0, 100000, "px",
     "width of the band over which neighbouring tiles are blended; 0 (or at least the tile "
     "size): interpolate linearly between the tile centres"},
    {"tile_min_vary", HILAL_PARAM_DOUBLE, "0.05", 0, 10, "",
     "use tiles only when the star FWHM varies across the field by more than this fraction "
     "(0 = whenever the frame holds more than one tile)"},
    {"tile_psf_degree", HILAL_PARAM_INT, "2", 0, 2, "",
     "degree of the polynomial of position that gives the PSF's dilation across the field (or "
     "of the per-pixel regression used when too few stars constrain a dilation)"},
    {"tile_psf_scale", HILAL_PARAM_DOUBLE, "0", 0, 1000, "tiles",
     "distance weighting of the stars in the per-pixel regression: Gaussian of this many tile "
     "spacings (0 = one polynomial for the whole field)"},
    {"tile_psf_max_stars", HILAL_PARAM_INT, "500", 20, 100000, "",
     "brightest usable stars of each image that model the PSF across the field"},
    {"tile_min_stars", HILAL_PARAM_INT, "5", 1, 100000, "",
     "PSF stars an image needs within 1.5 tile spacings of a tile for its own PSF there (else "
     "the whole-frame PSF)"},
    {"tile_refit_flux_ratio", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "measure the flux ratio again with the tile PSFs (else the fluxscale stage's is used)"},
    {"tile_scorr_std_min", HILAL_PARAM_DOUBLE, "0.8", 0, 100, "",
     "tiles whose S_corr std is below this are flagged bad (BAD_TILE)"},
    {"tile_scorr_std_max", HILAL_PARAM_DOUBLE, "1.25", 0, 100, "",
     "tiles whose S_corr std is above this are flagged bad (BAD_TILE)"},
};

typedef struct subtract_state {
    hilal_zogy_workspace *ws; /* FFT arrays shared by the frames */
    hilal_fft_rigor rigor;
    int threads;
    int pad_margin_px;
    int source_noise, astrometric_noise;
    int noise_calibration;
    double calib_max_factor;
    hilal_zogy_tiling tiling;
    hilal_psf_build_params psf;
    char wisdom[1024];
} subtract_state;

/* The tile PSFs are built like the whole-frame ones: with the psf stage's
 * settings when the configuration has them, else the defaults. */
static void psf_params_from_config(const hilal_config *cfg, hilal_psf_build_params *p)
{
    hilal_psf_build_params_default(p);
    if (hilal_config_param(cfg, "psf.size") == NULL)
        return;
    hilal_psf_params_from_config(cfg, p);
}

static hilal_status subtract_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    *state = NULL;
    subtract_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the subtract stage");
    hilal_status st = hilal_fft_rigor_parse(hilal_config_get_string(cfg, "subtract.fft_rigor"),
                                            &s->rigor, err);
    if (st != HILAL_OK) {
        hilal_error_context(err, "subtract.fft_rigor");
        free(s);
        return st;
    }
    s->threads = (int)hilal_config_get_int(cfg, "pipeline.threads");
    s->pad_margin_px = (int)hilal_config_get_int(cfg, "subtract.pad_margin");
    s->source_noise = hilal_config_get_bool(cfg, "subtract.source_noise");
    s->astrometric_noise = hilal_config_get_bool(cfg, "subtract.astrometric_noise");
    s->noise_calibration = hilal_config_get_bool(cfg, "subtract.noise_calibration");
    s->calib_max_factor = hilal_config_get_double(cfg, "subtract.calib_max_factor");
    hilal_zogy_tiling_default(&s->tiling);
    s->tiling.tile_px = hilal_config_get_int(cfg, "subtract.tile_px");
    s->tiling.overlap_px = hilal_config_get_int(cfg, "subtract.tile_overlap");
    s->tiling.min_vary = hilal_config_get_double(cfg, "subtract.tile_min_vary");
    s->tiling.min_stars = (int)hilal_config_get_int(cfg, "subtract.tile_min_stars");
    s->tiling.psf_degree = (int)hilal_config_get_int(cfg, "subtract.tile_psf_degree");
    s->tiling.psf_scale = hilal_config_get_double(cfg, "subtract.tile_psf_scale");
    s->tiling.refit_flux_ratio = hilal_config_get_bool(cfg, "subtract.tile_refit_flux_ratio");
    s->tiling.psf_max_stars = (int)hilal_config_get_int(cfg, "subtract.tile_psf_max_stars");
    s->tiling.scorr_std_min = hilal_config_get_double(cfg, "subtract.tile_scorr_std_min");
    s->tiling.scorr_std_max = hilal_config_get_double(cfg, "subtract.tile_scorr_std_max");
    if (s->tiling.scorr_std_min >= s->tiling.scorr_std_max) {
        st = hilal_error_set(err, HILAL_ERR_CONFIG,
                             "subtract.tile_scorr_std_min = %g must be below "
                             "subtract.tile_scorr_std_max = %g",
                             s->tiling.scorr_std_min, s->tiling.scorr_std_max);
        free(s);
        return st;
    }
    psf_params_from_config(cfg, &s->psf);
    const char *wisdom = hilal_config_get_string(cfg, "subtract.fft_wisdom");
    if (wisdom != NULL && strcmp(wisdom, "auto") == 0) {
        if (!hilal_fft_wisdom_default_path(s->wisdom, sizeof s->wisdom)) {
            s->wisdom[0] = '\0';
            hilal_log(HILAL_LOG_DEBUG, "subtract: neither XDG_CACHE_HOME nor HOME is set; FFTW "
                                       "plans are not remembered between runs");
        }
    } else if (wisdom != NULL && wisdom[0] != '\0') {
        if (strlen(wisdom) >= sizeof s->wisdom) {
            free(s);
            return hilal_error_set(err, HILAL_ERR_CONFIG, "subtract.fft_wisdom: path too long");
        }
        strcpy(s->wisdom, wisdom);
    }
    if ((st = hilal_zogy_workspace_new(&s->ws, err)) != HILAL_OK) {
        free(s);
        return st;
    }
    /* Measured plans are made on the first frame of each size (the debug
     * log says how long it took) and saved at once; a wisdom file FFTW
     * cannot read (damaged, or written by another FFTW precision or
     * version) costs a new measurement, never the run. */
    hilal_fft_set_plan_time_limit(hilal_config_get_double(cfg, "subtract.fft_plan_limit"));
    if (s->wisdom[0] != '\0' && s->rigor != HILAL_FFT_ESTIMATE) {
        int loaded = 0;
        hilal_error e = {0};
        if (hilal_fft_wisdom_import(s->wisdom, &loaded, &e) != HILAL_OK)
            hilal_log(HILAL_LOG_WARN, "subtract: %s; plans will be measured again and the file "
                                      "replaced", e.msg);
        else
            hilal_log(HILAL_LOG_DEBUG, "subtract: FFTW wisdom %s %s", loaded ? "loaded from" :
                      "not found; measured plans will be saved to", s->wisdom);
        hilal_fft_wisdom_autosave(s->wisdom);
    }
    *state = s;
    return HILAL_OK;
}

static hilal_status subtract_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const subtract_state *s = state;
    hilal_zogy_input in;
    hilal_zogy_tiled_info info;
    hilal_zogy_tiling tiling;
    hilal_psf_build_params pdef;
    hilal_zogy_input_init(&in);
    hilal_zogy_tiling_default(&tiling);
    hilal_psf_build_params_default(&pdef);
    in.sci = frame->sci;
    in.ref = frame->ref;
    in.sci_psf = &frame->sci_psf;
    in.ref_psf = &frame->ref_psf;
    in.flux_ratio = frame->flux_ratio;
    in.reg_rms_x_px = frame->reg_rms_x_px;
    in.reg_rms_y_px = frame->reg_rms_y_px;
    in.noise_calibration = 1;
    if (s != NULL) {
        in.workspace = s->ws;
        in.threads = s->threads;
        in.rigor = s->rigor;
        in.pad_margin_px = s->pad_margin_px;
        in.source_noise = s->source_noise;
        in.astrometric_noise = s->astrometric_noise;
        in.noise_calibration = s->noise_calibration;
        in.calib_max_factor = s->calib_max_factor;
        tiling = s->tiling;
    }
    hilal_diff_clear(&frame->diff);
    const hilal_starlist *ss = (frame->products & HILAL_PROD_STARS) ? &frame->sci_stars : NULL;
    const hilal_starlist *rs = (frame->products & HILAL_PROD_STARS) ? &frame->ref_stars : NULL;
    hilal_status st = hilal_zogy_run_tiled(&in, &tiling, ss, rs, s != NULL ? &s->psf : &pdef,
                                           &frame->diff, &info, err);
    if (st != HILAL_OK)
        return st;
    const hilal_diff *d = &frame->diff;
    hilal_log(HILAL_LOG_INFO,
              "frame %s: ZOGY F_n = %.4g, sigma_N = %.4g, sigma_R = %.4g ADU, FWHM N/R/D = "
              "%.2f/%.2f/%.2f px, S_corr median %.3f std %.3f (noise model %.3f), %ld px filled, "
              "FFT %ld x %ld, %.2f s",
              frame->frame_id, info.flux_ratio, info.zogy.sigma_n_adu, info.zogy.sigma_r_adu,
              frame->sci_psf.fwhm_px, frame->ref_psf.fwhm_px, d->psf_d.fwhm_px, d->scorr_mean,
              d->scorr_std, info.zogy.scorr_std_model, info.zogy.n_filled, info.zogy.fft_nx,
              info.zogy.fft_ny, info.seconds);
    if (info.tiled) {
        hilal_log(HILAL_LOG_INFO,
                  "frame %s: PSF FWHM varies by %.0f%% (science) and %.0f%% (reference) across "
                  "the field: %ld x %ld tiles, %ld with the whole-frame PSFs, %ld flagged bad; F_n "
                  "= %.4g with the tile PSFs (%.4g with the whole-frame ones)",
                  frame->frame_id, 100 * info.fwhm_vary_sci, 100 * info.fwhm_vary_ref,
                  d->ntiles_x, d->ntiles_y, info.ntiles_fallback, info.ntiles_bad,
                  info.flux_ratio, frame->flux_ratio);
        for (long t = 0; t < d->ntiles_x * d->ntiles_y; t++) {
            const hilal_diff_tile *r = &d->tiles[t];
            hilal_log(HILAL_LOG_DEBUG,
                      "frame %s: tile %ld (%ld, %ld) %ld x %ld px: FWHM N/R/D %.2f/%.2f/%.2f px "
                      "(%d/%d stars%s), F_n(tile) %.4g (%d stars), registration RMS %.3f/%.3f px "
                      "(%d), S_corr model std %.3f, median %.3f std %.3f%s",
                      frame->frame_id, t, r->x0, r->y0, r->nx, r->ny, r->fwhm_sci_px,
                      r->fwhm_ref_px, r->fwhm_d_px, r->nstars_sci, r->nstars_ref,
                      r->psf_whole_frame ? ", whole-frame PSFs" : "", r->flux_ratio_tile,
                      r->flux_ratio_nstars, r->reg_rms_x_px, r->reg_rms_y_px, r->reg_nmatch,
                      r->scorr_std_model, r->scorr_median, r->scorr_std, r->bad ? " BAD" : "");
        }
    }
    if (fabs(d->scorr_std - 1.0) > 0.1 || fabs(d->scorr_mean) > 0.1)
        hilal_log(HILAL_LOG_WARN,
                  "frame %s: S_corr has median %.3f and robust std %.3f instead of 0 and 1; "
                  "the PSFs, flux ratio or noise model may be off",
                  frame->frame_id, d->scorr_mean, d->scorr_std);
    else if (fabs(info.zogy.scorr_std_model - 1.0) > 0.1)
        hilal_log(HILAL_LOG_WARN,
                  "frame %s: S_corr had a robust std of %.3f under the white-noise model, "
                  "calibrated to %.3f: the images carry noise the model does not describe "
                  "(flat-field structure, correlated noise)",
                  frame->frame_id, info.zogy.scorr_std_model, d->scorr_std);
    return HILAL_OK;
}

static void subtract_fini(void *state)
{
    subtract_state *s = state;
    if (s == NULL)
        return;
    /* measured plans were saved when they were made */
    if (s->wisdom[0] != '\0' && s->rigor != HILAL_FFT_ESTIMATE)
        hilal_fft_wisdom_autosave(NULL);
    hilal_zogy_workspace_free(s->ws);
    free(s);
}

const hilal_stage hilal_stage_subtract = {
    .name = "subtract",
    .summary = "ZOGY proper image subtraction: D, S, S_corr, PSF-photometry flux and error",
    .params = subtract_params,
    .nparams = sizeof subtract_params / sizeof subtract_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND |
             HILAL_PROD_ALIGNED | HILAL_PROD_PSF | HILAL_PROD_FLUXSCALE,
    .makes = HILAL_PROD_DIFFERENCE,
    .flags = 0,
    .init = subtract_init,
    .run = subtract_run,
    .fini = subtract_fini,
};
