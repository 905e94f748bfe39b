/* FFT phase correlation of two images. See phasecorr.h and docs/align.md. */
#include "phasecorr.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fft.h"

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median and robust sigma (1.4826 MAD) of the finite values among n, using
 * at most ~200000 of them (a regular stride) to stay cheap. Returns the
 * number of values used. */
static size_t robust_stats(const float *v, size_t n, double *med, double *sig)
{
    size_t stride = n / 200000 + 1, m = 0;
    float *s = malloc((n / stride + 1) * sizeof *s);
    *med = NAN;
    *sig = NAN;
    if (s == NULL)
        return 0;
    for (size_t i = 0; i < n; i += stride)
        if (isfinite(v[i]))
            s[m++] = v[i];
    if (m > 0) {
        qsort(s, m, sizeof *s, cmp_float);
        *med = s[m / 2];
        for (size_t i = 0; i < m; i++)
            s[i] = fabsf(s[i] - (float)*med);
        qsort(s, m, sizeof *s, cmp_float);
        *sig = 1.4826 * s[m / 2];
    }
    free(s);
    return m;
}

/* Steps 1-2: block average of the usable pixels (sky-subtracted when the
 * sky plane exists) into a bnx x bny array, then detection-like
 * compression. NaN marks blocks without usable pixels before step 2. */
static int binned_sources(const hilal_image *img, int b, float *out, long bnx, long bny)
{
    for (long by = 0; by < bny; by++)
        for (long bx = 0; bx < bnx; bx++) {
            double s = 0;
            long n = 0;
            for (long y = by * b; y < (by + 1) * b && y < img->ny; y++)
                for (long x = bx * b; x < (bx + 1) * b && x < img->nx; x++) {
                    size_t k = (size_t)(y * img->nx + x);
                    float p = img->pix[k];
                    if ((img->mask[k] & HILAL_MASK_UNUSABLE) || !isfinite(p))
                        continue;
                    s += img->sky ? (double)p - img->sky[k] : (double)p;
                    n++;
                }
            out[by * bnx + bx] = n > 0 ? (float)(s / (double)n) : NAN;
        }
    double med, sig;
    if (robust_stats(out, (size_t)(bnx * bny), &med, &sig) == 0 || !(sig > 0))
        return -1;
    for (long k = 0; k < bnx * bny; k++) {
        double t = (out[k] - med) / sig;
        out[k] = isfinite(t) && t > 3.0 ? (float)sqrt(t) : 0.0f;
    }
    return 0;
}

hilal_status hilal_phasecorr_offset(const hilal_image *sci, const hilal_image *ref,
                                    long max_side_px, double min_snr, int threads,
                                    hilal_phasecorr_result *res, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    float *a = NULL, *b = NULL, *pa = NULL, *pb = NULL;
    hilal_fft_complex *fa = NULL, *fb = NULL;
    memset(res, 0, sizeof *res);
    res->dx_px = res->dy_px = NAN;

    /* Step 1: block size. */
    long maxdim = sci->nx;
    if (sci->ny > maxdim)
        maxdim = sci->ny;
    if (ref->nx > maxdim)
        maxdim = ref->nx;
    if (ref->ny > maxdim)
        maxdim = ref->ny;
    if (max_side_px < 16)
        max_side_px = 16;
    int bin = (int)((maxdim + max_side_px - 1) / max_side_px);
    if (bin < 1)
        bin = 1;
    res->binning = bin;
    long anx = (sci->nx + bin - 1) / bin, any = (sci->ny + bin - 1) / bin;
    long bnx = (ref->nx + bin - 1) / bin, bny = (ref->ny + bin - 1) / bin;
    a = malloc((size_t)(anx * any) * sizeof *a);
    b = malloc((size_t)(bnx * bny) * sizeof *b);
    if (a == NULL || b == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for phase correlation");
        goto cleanup;
    }
    /* Step 2. */
    if (binned_sources(sci, bin, a, anx, any) != 0 || binned_sources(ref, bin, b, bnx, bny) != 0) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "phase correlation: an image has no usable pixels or no noise "
                             "(robust sigma 0)");
        goto cleanup;
    }
    /* Step 3: common padded size, each image at the origin of its array. */
    long nx = hilal_fft_good_size(anx + bnx), ny = hilal_fft_good_size(any + bny);
    const hilal_fft_plan *plan = NULL;
    st = hilal_fft_plan_get(nx, ny, threads, HILAL_FFT_ESTIMATE, &plan, err);
    if (st != HILAL_OK)
        goto cleanup;
    pa = hilal_fft_alloc_real(nx, ny, err);
    pb = hilal_fft_alloc_real(nx, ny, err);
    fa = hilal_fft_alloc_complex(nx, ny, err);
    fb = hilal_fft_alloc_complex(nx, ny, err);
    if (pa == NULL || pb == NULL || fa == NULL || fb == NULL) {
        st = HILAL_ERR_NOMEM;
        goto cleanup;
    }
    memset(pa, 0, (size_t)(nx * ny) * sizeof *pa);
    memset(pb, 0, (size_t)(nx * ny) * sizeof *pb);
    for (long y = 0; y < any; y++)
        memcpy(pa + y * nx, a + y * anx, (size_t)anx * sizeof *pa);
    for (long y = 0; y < bny; y++)
        memcpy(pb + y * nx, b + y * bnx, (size_t)bnx * sizeof *pb);
    if ((st = hilal_fft_r2c(plan, pa, fa, err)) != HILAL_OK ||
        (st = hilal_fft_r2c(plan, pb, fb, err)) != HILAL_OK)
        goto cleanup;
    /* Step 4: with R(p) = S(p - d), R^ = S^ exp(-i k.d), so
     * conj(S^) R^ / |conj(S^) R^| = exp(-i k.d), whose inverse transform is a
     * delta at d. Frequencies with no power are left at zero. */
    size_t nc = hilal_fft_ncomplex(nx, ny);
    double maxamp = 0;
    for (size_t k = 0; k < nc; k++) {
        double re = (double)fa[k][0] * fb[k][0] + (double)fa[k][1] * fb[k][1];
        double im = (double)fa[k][0] * fb[k][1] - (double)fa[k][1] * fb[k][0];
        double amp = hypot(re, im);
        if (amp > maxamp)
            maxamp = amp;
        fa[k][0] = (float)re;
        fa[k][1] = (float)im;
    }
    for (size_t k = 0; k < nc; k++) {
        double amp = hypot(fa[k][0], fa[k][1]);
        if (amp > 1e-9 * maxamp) {
            fa[k][0] = (float)(fa[k][0] / amp);
            fa[k][1] = (float)(fa[k][1] / amp);
        } else {
            fa[k][0] = fa[k][1] = 0.0f;
        }
    }
    if ((st = hilal_fft_c2r(plan, fa, pa, err)) != HILAL_OK)
        goto cleanup;
    /* Step 5: the peak and its significance over the surface. */
    size_t ipk = 0;
    for (size_t k = 1; k < (size_t)(nx * ny); k++)
        if (pa[k] > pa[ipk])
            ipk = k;
    double med, sig;
    robust_stats(pa, (size_t)(nx * ny), &med, &sig);
    res->peak_snr = sig > 0 ? (pa[ipk] - med) / sig : 0;
    long px = (long)(ipk % (size_t)nx), py = (long)(ipk / (size_t)nx);
    /* Parabola through (-1, c-), (0, c0), (+1, c+): vertex at
     * (c- - c+) / (2 (c- - 2 c0 + c+)). Neighbours wrap around. */
    double c0 = pa[ipk];
    double cxm = pa[py * nx + (px + nx - 1) % nx], cxp = pa[py * nx + (px + 1) % nx];
    double cym = pa[((py + ny - 1) % ny) * nx + px], cyp = pa[((py + 1) % ny) * nx + px];
    double ddx = 0, ddy = 0, den;
    if ((den = cxm - 2 * c0 + cxp) < 0)
        ddx = 0.5 * (cxm - cxp) / den;
    if ((den = cym - 2 * c0 + cyp) < 0)
        ddy = 0.5 * (cym - cyp) / den;
    if (fabs(ddx) > 0.5)
        ddx = 0;
    if (fabs(ddy) > 0.5)
        ddy = 0;
    /* Lags beyond half the array are negative offsets. */
    double tx = (double)(px > nx / 2 ? px - nx : px) + ddx;
    double ty = (double)(py > ny / 2 ? py - ny : py) + ddy;
    res->dx_px = tx * bin;
    res->dy_px = ty * bin;
    if (!(res->peak_snr >= min_snr))
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "phase correlation found no common sources: the highest correlation "
                             "peak (offset %.1f, %.1f px) is only %.1f sigma above the surface "
                             "(at least %.1f needed)",
                             res->dx_px, res->dy_px, res->peak_snr, min_snr);
cleanup:
    free(a);
    free(b);
    hilal_fft_free(pa);
    hilal_fft_free(pb);
    hilal_fft_free(fa);
    hilal_fft_free(fb);
    return st;
}
