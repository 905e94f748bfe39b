/* The background stage: sky map, global sky RMS and the per-pixel variance
 * plane of the science and reference images (in place). The two images are
 * processed concurrently when pipeline.threads allows (two threads).
 *
 * 1. The sky is SExtractor's mesh background, computed by libsep: in each
 *    mesh of mesh_px x mesh_px pixels the histogram is clipped at +-3 sigma
 *    around the median until stable and the mode is estimated as
 *    2.5 median - 1.5 mean (or the median in crowded meshes); the mesh
 *    values are median-filtered over filter_size x filter_size meshes and
 *    interpolated with bicubic splines (Bertin & Arnouts 1996). Masked and
 *    non-finite pixels take no part (SEP ignores NaN and the pixels of its
 *    mask). The same is done for the RMS map, which is then divided by
 *    0.98658 (rms_clip_correction): the 3-sigma clipping of the mesh
 *    histograms makes the raw RMS of Gaussian noise 1.3% low.
 * 2. Optionally (mask_sources), sources are masked and the background is
 *    measured again, so that the wings of bright stars and galaxies do not
 *    bias the sky. The sources are found on the image binned 2 x 2 (a
 *    quarter of the pixels; a first SEP background with meshes of half the
 *    side gives its sky and RMS): pixels whose 3x3-smoothed value exceeds
 *    mask_thresh_sigma times the noise of the smoothed image, grouped into
 *    8-connected regions of at least 2 binned pixels; each region is
 *    masked as an ellipse with its second moments whose area is its own
 *    scaled by mask_grow^2, plus 2 px, so bright stars are masked farther
 *    out than faint ones. (This replaces a full SEP extraction: the same
 *    footprints at a fraction of the cost, and without libsep's
 *    process-wide extraction lock, so both images run in parallel.)
 * 3. The variance of each pixel, ADU^2, is the background variance from the
 *    RMS map plus the source Poisson term (the "source noise" of ZOGY,
 *    Zackay, Ofek & Gal-Yam 2016, section 3.3):
 *        var = rms^2 + max(pix - sky, 0) / gain
 *    (gain in e-/ADU: a signal of s ADU is s*gain electrons with variance
 *    s*gain e-^2 = s/gain ADU^2), in one pass over the image. Without a gain
 *    only rms^2 is used, with a warning. Masked or non-finite pixels get
 *    var = 1e30; any other non-positive or non-finite variance is replaced
 *    by the global RMS^2 and flagged HILAL_MASK_NEGVAR.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
#include "hilal/fft.h"
#include "hilal/log.h"
#include "hilal/stage.h"
#include "sepw.h"

#define VAR_MASKED 1e30f

static const hilal_param background_params[] = {
    {"mesh_px", HILAL_PARAM_INT, "64", 8, 4096, "px",
     "side of the background meshes (SExtractor BACK_SIZE)"},
    {"filter_size", HILAL_PARAM_INT, "3", 1, 15, "meshes",
     "median filter over meshes (SExtractor BACK_FILTERSIZE)"},
    {"mask_sources", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "mask detected sources and measure the background a second time"},
    {"mask_thresh_sigma", HILAL_PARAM_DOUBLE, "3", 0.5, 100, "sigma",
     "detection threshold of the masked sources (2x2-binned image smoothed with a 3x3 kernel)"},
    {"mask_grow", HILAL_PARAM_DOUBLE, "2", 1, 20, "",
     "masked ellipse of a source: its footprint's ellipse scaled by this, plus 2 px"},
    {"rms_clip_correction", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "divide the RMS by 0.98658 (the RMS of a Gaussian clipped at 3 sigma) so noise is unbiased"},
};

/* SExtractor's mesh statistics clip the pixel histogram at +-3 sigma, and
 * the standard deviation of a unit Gaussian truncated at +-3 is
 * sqrt(1 - 6 phi(3) / erf(3 / sqrt 2)) = 0.98658: the raw RMS is 1.3% low
 * (variance 2.7% low) on pure noise. */
#define CLIPPED_GAUSS_RMS 0.98658

/* Smallest source footprint, binned pixels (8 image pixels). */
#define MASK_MINAREA 2

typedef struct background_state {
    int mesh_px;
    int filter_size;
    int mask_sources;
    double mask_thresh_sigma;
    double mask_grow;
    int rms_correction;
    int threads;
} background_state;

static hilal_status background_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    background_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    s->mesh_px = (int)hilal_config_get_int(cfg, "background.mesh_px");
    s->filter_size = (int)hilal_config_get_int(cfg, "background.filter_size");
    s->mask_sources = hilal_config_get_bool(cfg, "background.mask_sources");
    s->mask_thresh_sigma = hilal_config_get_double(cfg, "background.mask_thresh_sigma");
    s->mask_grow = hilal_config_get_double(cfg, "background.mask_grow");
    s->rms_correction = hilal_config_get_bool(cfg, "background.rms_clip_correction");
    /* pipeline.threads = 0: one per core. */
    s->threads = hilal_fft_threads((int)hilal_config_get_int(cfg, "pipeline.threads"));
    *state = s;
    return HILAL_OK;
}

/* ------------------------------------------------------------------------
 * Source mask on the 2x2-binned image
 * ------------------------------------------------------------------------ */

/* Binned image: each binned pixel is the mean of the usable pixels of its
 * 2x2 block (the last row/column may be a partial block); NaN and masked
 * (1) when the whole block is unusable. */
static void bin2(const float *pix, const uint8_t *mask, long nx, long ny, float *b, uint8_t *bm,
                 long bx, long by)
{
    for (long j = 0; j < by; j++)
        for (long i = 0; i < bx; i++) {
            double s = 0.0;
            int n = 0;
            for (long y = 2 * j; y < 2 * j + 2 && y < ny; y++)
                for (long x = 2 * i; x < 2 * i + 2 && x < nx; x++)
                    if (!mask[y * nx + x]) {
                        s += pix[y * nx + x];
                        n++;
                    }
            b[j * bx + i] = n > 0 ? (float)(s / n) : NAN;
            bm[j * bx + i] = (uint8_t)(n == 0);
        }
}

/* Union-find over pixel indices, with path halving. */
static int32_t uf_find(int32_t *parent, int32_t i)
{
    while (parent[i] != i) {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    return i;
}

/* Footprint statistics of one connected region. */
typedef struct region {
    long npix;
    double sx, sy, sxx, syy, sxy;
} region;

/* Marks (value 1) in m (bx x by) an ellipse with the region's orientation
 * and axis ratio whose area is its footprint's scaled by grow^2, plus 1
 * binned pixel (2 image pixels), as SExtractor-style source masks. */
static void mask_region(uint8_t *m, long bx, long by, const region *r, double grow)
{
    double n = (double)r->npix, x0 = r->sx / n, y0 = r->sy / n;
    double x2 = r->sxx / n - x0 * x0 + 1.0 / 12.0, y2 = r->syy / n - y0 * y0 + 1.0 / 12.0;
    double xy = r->sxy / n - x0 * y0;
    /* Axes of the second-moment ellipse (SExtractor's A, B, THETA). */
    double t = 0.5 * (x2 + y2), d = sqrt(0.25 * (x2 - y2) * (x2 - y2) + xy * xy);
    double l1 = t + d, l2 = t - d > 1e-6 ? t - d : 1e-6;
    double q = sqrt(l2 / l1), th = 0.5 * atan2(2.0 * xy, x2 - y2);
    double r_iso = sqrt(n / 3.14159265358979323846);
    double a = grow * r_iso / sqrt(q) + 1.0, b = grow * r_iso * sqrt(q) + 1.0;
    double c = cos(th), s = sin(th);
    double cxx = c * c / (a * a) + s * s / (b * b);
    double cyy = s * s / (a * a) + c * c / (b * b);
    double cxy = 2.0 * c * s * (1.0 / (a * a) - 1.0 / (b * b));
    long i0 = (long)floor(x0 - a), i1 = (long)ceil(x0 + a);
    long j0 = (long)floor(y0 - a), j1 = (long)ceil(y0 + a);
    for (long y = j0 < 0 ? 0 : j0; y <= j1 && y < by; y++)
        for (long x = i0 < 0 ? 0 : i0; x <= i1 && x < bx; x++) {
            double dx = x - x0, dy = y - y0;
            if (cxx * dx * dx + cyy * dy * dy + cxy * dx * dy <= 1.0)
                m[y * bx + x] = 1;
        }
}

/* Source mask of the binned image b (sky bsky, masked bm, global RMS rms):
 * detection on the 3x3-smoothed sky-subtracted image (SExtractor's
 * pyramid kernel 1 2 1 / 2 4 2 / 1 2 1 over 16, whose output has
 * sqrt(36/256) = 0.375 times the pixel noise), 8-connected regions of at
 * least MASK_MINAREA pixels, each masked by mask_region. Fills src (bx x
 * by) and returns the number of regions, or -1 when out of memory. scratch
 * holds 2 bx by integers. */
static long binned_sources(const background_state *s, const float *b, const float *bsky,
                           const uint8_t *bm, long bx, long by, double rms, uint8_t *src,
                           int32_t *scratch)
{
    size_t n = (size_t)bx * (size_t)by;
    long nreg = 0;
    int32_t *parent = scratch, *rid = scratch + n;
    uint8_t *above = calloc(n, 1);
    region *reg = NULL;
    if (above == NULL) {
        nreg = -1;
        goto cleanup;
    }
    double thr = s->mask_thresh_sigma * 0.375 * rms;
    /* 1. Threshold the smoothed image: the sky-subtracted binned image
     *    (masked pixels 0) convolved separably with 1 2 1 along x, then
     *    along y, divided by the kernel weight inside the image. The
     *    parent array holds the x-pass as float until step 2 reuses it. */
    float *hx = (float *)parent;
    for (long y = 0; y < by; y++) {
        const float *bb = b + y * bx, *ss = bsky + y * bx;
        const uint8_t *mm = bm + y * bx;
        for (long x = 0; x < bx; x++) {
            double acc = 0.0, w = 0.0;
            for (int dx = -1; dx <= 1; dx++) {
                long xx = x + dx;
                if (xx < 0 || xx >= bx)
                    continue;
                double k = dx == 0 ? 2.0 : 1.0;
                w += k;
                if (!mm[xx])
                    acc += k * (bb[xx] - ss[xx]);
            }
            hx[y * bx + x] = (float)(acc / w);
        }
    }
    for (long y = 0; y < by; y++) {
        long ya = y > 0 ? y - 1 : y, yb = y + 1 < by ? y + 1 : y;
        double w = 2.0 + (ya != y) + (yb != y);
        for (long x = 0; x < bx; x++) {
            long q = y * bx + x;
            double acc = 2.0 * hx[q] + (ya != y ? hx[ya * bx + x] : 0.0) +
                         (yb != y ? hx[yb * bx + x] : 0.0);
            above[q] = !bm[q] && acc / w > thr;
        }
    }
    /* 2. 8-connected regions by union-find: every pixel above joins its
     *    already visited neighbours (left, and the three above). */
    static const int nbx[4] = {-1, -1, 0, 1}, nby[4] = {0, -1, -1, -1};
    for (long y = 0; y < by; y++)
        for (long x = 0; x < bx; x++) {
            int32_t q = (int32_t)(y * bx + x);
            if (!above[q])
                continue;
            parent[q] = q;
            for (int k = 0; k < 4; k++) {
                long xx = x + nbx[k], yy = y + nby[k];
                if (xx < 0 || yy < 0 || xx >= bx)
                    continue;
                int32_t qq = (int32_t)(yy * bx + xx);
                if (!above[qq])
                    continue;
                int32_t ra = uf_find(parent, q), rb = uf_find(parent, qq);
                if (ra != rb)
                    parent[ra < rb ? rb : ra] = ra < rb ? ra : rb;
            }
        }
    /* 3. Every pixel points to its root; roots get consecutive region
     *    numbers; the footprint moments are summed per region. */
    for (size_t q = 0; q < n; q++)
        if (above[q]) {
            parent[q] = uf_find(parent, (int32_t)q);
            if (parent[q] == (int32_t)q)
                rid[q] = (int32_t)nreg++;
        }
    reg = calloc((size_t)nreg + 1, sizeof *reg);
    if (reg == NULL) {
        nreg = -1;
        goto cleanup;
    }
    for (size_t q = 0; q < n; q++) {
        if (!above[q])
            continue;
        region *r = &reg[rid[parent[q]]];
        double x = (double)((long)q % bx), y = (double)((long)q / bx);
        r->npix++;
        r->sx += x;
        r->sy += y;
        r->sxx += x * x;
        r->syy += y * y;
        r->sxy += x * y;
    }
    /* 4. Masks. */
    memset(src, 0, n);
    for (long k = 0; k < nreg; k++)
        if (reg[k].npix >= MASK_MINAREA)
            mask_region(src, bx, by, &reg[k], s->mask_grow);

cleanup:
    free(above);
    free(reg);
    return nreg;
}

/* Bilinear interpolation of a map m (bx x by) given at the centres of the
 * 2x2 blocks of an nx x ny image (binned pixel k is centred on image
 * coordinate 2k + 0.5), clamped at the borders: the column taps and
 * weights (upsample_cols, once per image) and one image row y into out. */
typedef struct upsample_cols {
    long *i0, *i1;
    float *fx;
} upsample_cols;

/* The two map samples (i0, i1, 0-based, of b along one axis) between which
 * image coordinate x lies, and the weight f of i1: x maps to binned
 * coordinate u = (x - 0.5) / 2; below the first sample or beyond the last
 * the value is that sample's (i0 = i1). */
static void upsample_taps(long x, long b, long *i0_out, long *i1_out, double *f_out)
{
    double u = 0.5 * ((double)x - 0.5);
    long i0 = (long)floor(u);
    double f = u - (double)i0;
    long i1 = i0 + 1;
    if (i0 < 0) {
        i0 = i1 = 0;
        f = 0.0;
    }
    if (i1 >= b) {
        i1 = b - 1;
        if (i0 > i1)
            i0 = i1;
    }
    *i0_out = i0;
    *i1_out = i1;
    *f_out = f;
}

static int upsample_cols_make(upsample_cols *c, long bx, long nx)
{
    c->i0 = malloc((size_t)nx * sizeof *c->i0);
    c->i1 = malloc((size_t)nx * sizeof *c->i1);
    c->fx = malloc((size_t)nx * sizeof *c->fx);
    if (c->i0 == NULL || c->i1 == NULL || c->fx == NULL)
        return 0;
    for (long x = 0; x < nx; x++) {
        double f;
        upsample_taps(x, bx, &c->i0[x], &c->i1[x], &f);
        c->fx[x] = (float)f;
    }
    return 1;
}

static void upsample_cols_free(upsample_cols *c)
{
    free(c->i0);
    free(c->i1);
    free(c->fx);
}

static void upsample_row(const float *m, long bx, long by, const upsample_cols *c, long nx,
                         long y, float *out)
{
    long j0, j1;
    double f;
    upsample_taps(y, by, &j0, &j1, &f);
    float fy = (float)f;
    const float *r0 = m + j0 * bx, *r1 = m + j1 * bx;
    for (long x = 0; x < nx; x++) {
        float a = r0[c->i0[x]] + c->fx[x] * (r0[c->i1[x]] - r0[c->i0[x]]);
        float b = r1[c->i0[x]] + c->fx[x] * (r1[c->i1[x]] - r1[c->i0[x]]);
        out[x] = a + fy * (b - a);
    }
}

/* Median of the values histogrammed in h (nb bins of width w starting at
 * lo), interpolated linearly inside the median's bin. */
static double hist_median(const long *h, int nb, double lo, double w, long n)
{
    long c = 0;
    int k = 0;
    while (k < nb - 1 && c + h[k] < (n + 1) / 2)
        c += h[k++];
    return lo + w * ((double)k + ((n + 1) / 2.0 - (double)c) / (double)(h[k] > 0 ? h[k] : 1));
}

/* Robust RMS, 1.4826 x the median absolute deviation, of pix - sky over
 * the usable pixels outside the source mask (src, binned, bx wide) (every
 * fourth row of images over 4 Mpx): the median from a histogram of bin sig_guess / 128 over
 * +-8 sig_guess, then, in a second pass, the median of |pix - sky - median|
 * from a histogram of the same bins. NaN when fewer than 100 pixels
 * qualify. */
static double robust_rms(const float *pix, const float *sky, const uint8_t *mask,
                         const uint8_t *src, long nx, long ny, long bx, double sig_guess)
{
    enum { NB = 2048 };
    long *hist = calloc(NB, sizeof *hist);
    double out = NAN;
    double w = 16.0 * sig_guess / NB, lo = -8.0 * sig_guess;
    if (hist == NULL || !(w > 0.0) || !isfinite(w))
        goto cleanup;
    /* Every row up to 4 Mpx, every fourth beyond (a million samples). */
    int step = (double)nx * (double)ny > 4.2e6 ? 4 : 1;
    for (int pass = 0; pass < 2; pass++) {
        double med = out;
        long n = 0;
        memset(hist, 0, NB * sizeof *hist);
        for (long y = 0; y < ny; y += step)
            for (long x = 0; x < nx; x++) {
                long q = y * nx + x;
                if (mask[q] || src[(y / 2) * bx + x / 2])
                    continue;
                double r = (double)pix[q] - sky[q];
                double v = pass == 0 ? r : fabs(r - med);
                long k = (long)floor((v - (pass == 0 ? lo : 0.0)) / w);
                if (k >= 0 && k < NB) {
                    hist[k]++;
                    n++;
                }
            }
        if (n < 100) {
            out = NAN;
            goto cleanup;
        }
        out = hist_median(hist, NB, pass == 0 ? lo : 0.0, w, n);
    }
    out *= 1.4826;

cleanup:
    free(hist);
    return out;
}

/* ------------------------------------------------------------------------
 * One image
 * ------------------------------------------------------------------------ */

/* Background, RMS and variance of one image. which = "science" or
 * "reference" for messages. */
static hilal_status background_image(const background_state *s, hilal_image *img,
                                     const char *which, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t n = (size_t)img->nx * (size_t)img->ny;
    long nx = img->nx, ny = img->ny;
    uint8_t *mask = NULL, *bm = NULL, *bsrc = NULL;
    float *bsky = NULL, *brms = NULL;
    upsample_cols ucols = {NULL, NULL, NULL};
    const char *path = img->meta.path[0] != '\0' ? img->meta.path : "(unnamed)";

    st = hilal_image_alloc_sky(img, err);
    if (st == HILAL_OK)
        st = hilal_image_alloc_var(img, err);
    if (st != HILAL_OK)
        goto cleanup;
    mask = malloc(n);
    if (mask == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the background of a "
                             "%ld x %ld image", nx, ny);
        goto cleanup;
    }

    /* SEP's mask: unusable pixels, and non-finite ones, which are flagged
     * NODATA here when ingest did not. SEP reads the pixels themselves. */
    size_t nmasked = 0;
    for (size_t i = 0; i < n; i++) {
        int bad = (img->mask[i] & HILAL_MASK_UNUSABLE) != 0;
        if (!isfinite(img->pix[i])) {
            img->mask[i] |= HILAL_MASK_NODATA;
            bad = 1;
        }
        mask[i] = (uint8_t)bad;
        nmasked += (size_t)bad;
    }
    if (nmasked == n) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "%s image %s: every pixel is masked (saturated, bad or no data), "
                             "so there is no background to measure",
                             which, path);
        goto cleanup;
    }

    double gsky = NAN, grms = NAN, rscale = 1.0;
    int masked_sources = 0;
    const float *bin_rms = NULL; /* binned RMS map (binned path) */
    long bin_x = 0, bin_y = 0;
    if (s->mask_sources && nx >= 8 && ny >= 8) {
        /* 2. The binned path: sources found and the background measured on
         *    the image binned 2 x 2, with meshes of half the side (the same
         *    meshes on the sky). */
        long bx = (nx + 1) / 2, by = (ny + 1) / 2;
        size_t bn = (size_t)bx * (size_t)by;
        /* The variance plane is free until the end: it holds the binned
         * image and the labelling scratch (3 bx by 4-byte words fit in
         * nx ny), which saves allocating (and page-faulting) them. */
        float *b = img->var;
        int32_t *scratch = (int32_t *)(img->var + bn);
        bsky = malloc(bn * sizeof *bsky);
        brms = malloc(bn * sizeof *brms);
        bm = malloc(bn);
        bsrc = malloc(bn);
        if (bsky == NULL || brms == NULL || bm == NULL || bsrc == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for source masking");
            goto cleanup;
        }
        bin2(img->pix, mask, nx, ny, b, bm, bx, by);
        int bmesh = s->mesh_px / 2 > 4 ? s->mesh_px / 2 : 4;
        hilal_sepw_image bim = {b, NULL, bm, bx, by};
        double bgsky = NAN, bgrms = NAN;
        st = hilal_sepw_background(&bim, bmesh, s->filter_size, bsky, NULL, &bgsky, &bgrms, err);
        if (st != HILAL_OK)
            goto cleanup;
        long nreg = bgrms > 0.0 && isfinite(bgrms)
                        ? binned_sources(s, b, bsky, bm, bx, by, bgrms, bsrc, scratch)
                        : 0;
        if (nreg < 0) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for source masking");
            goto cleanup;
        }
        /* Measure again with the sources masked unless they cover nearly
         * everything (then the clipped unmasked estimate is the better
         * one). */
        size_t nm2 = 0;
        for (size_t q = 0; q < bn; q++) {
            bsrc[q] = (uint8_t)(bsrc[q] | bm[q]);
            nm2 += bsrc[q];
        }
        if (nm2 < bn - bn / 10) {
            masked_sources = 1;
        } else {
            hilal_log(HILAL_LOG_WARN,
                      "%s image %s: detected sources cover %.0f%% of the image; keeping the "
                      "background measured without source masking",
                      which, path, 100.0 * nm2 / bn);
            memcpy(bsrc, bm, bn);
        }
        hilal_sepw_image bim2 = {b, NULL, bsrc, bx, by};
        st = hilal_sepw_background(&bim2, bmesh, s->filter_size, bsky, brms, &gsky, &grms, err);
        if (st != HILAL_OK)
            goto cleanup;
        if (!(grms > 0.0) || !isfinite(grms) || !isfinite(gsky)) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "%s image %s: the background RMS is %g ADU (sky %g ADU); a "
                                 "constant or empty image cannot be processed",
                                 which, path, grms, gsky);
            goto cleanup;
        }
        /* The sky map at full resolution (bilinear between the binned
         * pixel centres; the map is smooth on the mesh scale). */
        if (!upsample_cols_make(&ucols, bx, nx)) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the background");
            goto cleanup;
        }
        for (long y = 0; y < ny; y++)
            upsample_row(bsky, bx, by, &ucols, nx, y, img->sky + y * nx);
        /* The RMS of a full-resolution pixel: the binned map scaled so its
         * global value is the robust RMS (1.4826 MAD) of the image's own
         * source-free pixels. For independent pixels the factor is 2 (a
         * binned pixel averages four); noise correlated between pixels, as
         * in resampled or stacked images, gives another factor, which this
         * measures rather than assumes. The MAD needs no clipping
         * correction. */
        double sig = robust_rms(img->pix, img->sky, mask, bsrc, nx, ny, bx, 2.0 * grms);
        if (!(sig > 0.0) || !isfinite(sig))
            sig = 2.0 * grms / CLIPPED_GAUSS_RMS;
        rscale = sig / grms;
        bin_rms = brms;
        bin_x = bx;
        bin_y = by;
        grms = sig;
    } else {
        /* 1. The full-resolution path (SExtractor's algorithm exactly, as
         *    without source masking): the sky map into the sky plane, the
         *    RMS map into the variance plane, which step 3 turns into the
         *    variance in place. */
        hilal_sepw_image im = {img->pix, NULL, mask, nx, ny};
        st = hilal_sepw_background(&im, s->mesh_px, s->filter_size, img->sky, img->var, &gsky,
                                   &grms, err);
        if (st != HILAL_OK)
            goto cleanup;
        if (!(grms > 0.0) || !isfinite(grms) || !isfinite(gsky)) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "%s image %s: the background RMS is %g ADU (sky %g ADU); a "
                                 "constant or empty image cannot be processed",
                                 which, path, grms, gsky);
            goto cleanup;
        }
        /* Undo the clipping bias of the RMS (see CLIPPED_GAUSS_RMS). */
        rscale = s->rms_correction ? 1.0 / CLIPPED_GAUSS_RMS : 1.0;
        grms *= rscale;
    }

    /* 3. Variance plane, one pass: var = (rms rscale)^2 + max(pix - sky, 0)
     *    / gain. */
    double gain = img->meta.gain_e_per_adu;
    int have_gain = isfinite(gain) && gain > 0.0;
    double inv_gain = have_gain ? 1.0 / gain : 0.0;
    if (!have_gain)
        hilal_log(HILAL_LOG_WARN,
                  "%s image %s: gain unknown; the variance holds the background noise only "
                  "(no source Poisson noise). Set the gain keyword in the ingest settings",
                  which, path);
    size_t nneg = 0;
    float fallback = (float)(grms * grms), rms_max = 0.0f;
    const float rs = (float)rscale, ig = (float)inv_gain;
    float *rowbuf = NULL;
    if (bin_rms != NULL && (rowbuf = malloc((size_t)nx * sizeof *rowbuf)) == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the background");
        goto cleanup;
    }
    for (long y = 0; y < ny; y++) {
        /* The RMS of the row: upsampled from the binned map, or the
         * full-resolution map already in the variance plane. */
        float *var = img->var + y * nx;
        const float *rms = var;
        if (bin_rms != NULL) {
            upsample_row(bin_rms, bin_x, bin_y, &ucols, nx, y, rowbuf);
            rms = rowbuf;
        }
        const float *pix = img->pix + y * nx, *sky = img->sky + y * nx;
        const uint8_t *m = mask + y * nx;
        long nbad = 0;
        for (long x = 0; x < nx; x++) {
            float rv = rms[x];
            rms_max = rv > rms_max ? rv : rms_max;
            float r = rv * rs, src = pix[x] - sky[x];
            float v = r * r + (src > 0.0f ? src : 0.0f) * ig;
            nbad += !m[x] && !(v > 0.0f && v < INFINITY);
            var[x] = m[x] ? VAR_MASKED : v;
        }
        /* Rare: non-positive or non-finite variance (NaN sky, ...). */
        for (long x = 0; nbad > 0 && x < nx; x++)
            if (!m[x] && !(var[x] > 0.0f && var[x] < INFINITY)) {
                var[x] = fallback;
                img->mask[y * nx + x] |= HILAL_MASK_NEGVAR;
                nneg++;
            }
    }
    free(rowbuf);
    /* libsep reports a global RMS of 1 when no mesh has any scatter; the
     * RMS map is then 0 everywhere. */
    if (!(rms_max > 0.0f)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "%s image %s: the background RMS is 0 ADU (sky %g ADU); a constant "
                             "or empty image cannot be processed",
                             which, path, gsky);
        goto cleanup;
    }
    img->sky_rms_adu = grms;
    if (nneg > 0)
        hilal_log(HILAL_LOG_WARN,
                  "%s image %s: %zu pixels had a non-positive variance; replaced by the global "
                  "RMS^2 and flagged NEGVAR",
                  which, path, nneg);
    hilal_log(HILAL_LOG_DEBUG, "%s image %s: sky %.2f ADU, RMS %.3f ADU%s", which, path, gsky,
              grms, masked_sources ? " (sources masked)" : "");

cleanup:
    upsample_cols_free(&ucols);
    free(mask);
    free(bsky);
    free(brms);
    free(bm);
    free(bsrc);
    return st;
}

/* The reference image in a second thread. */
typedef struct bg_thread {
    const background_state *s;
    hilal_image *img;
    hilal_error err;
    hilal_status st;
} bg_thread;

static void *bg_thread_main(void *arg)
{
    bg_thread *t = arg;
    t->st = background_image(t->s, t->img, "reference", &t->err);
    return NULL;
}

static hilal_status background_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const background_state *s = state;
    if (frame->sci == NULL || frame->ref == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "background stage needs the science and reference images");
    /* Science here, reference in a second thread when allowed (or when the
     * thread cannot be started, afterwards here); the science error wins. */
    bg_thread t = {s, frame->ref, {0}, HILAL_OK};
    hilal_error_clear(&t.err);
    pthread_t tid;
    int threaded = s->threads >= 2 && pthread_create(&tid, NULL, bg_thread_main, &t) == 0;
    hilal_status st = background_image(s, frame->sci, "science", err);
    if (threaded)
        pthread_join(tid, NULL);
    else if (st == HILAL_OK)
        bg_thread_main(&t);
    if (st == HILAL_OK && t.st != HILAL_OK)
        st = hilal_error_set(err, t.st, "%s", t.err.msg);
    if (st != HILAL_OK)
        return st;
    frame->products |= HILAL_PROD_BACKGROUND;
    return HILAL_OK;
}

static void background_fini(void *state)
{
    free(state);
}

const hilal_stage hilal_stage_background = {
    .name = "background",
    .summary = "sky map, sky RMS and variance planes of science and reference (fills the "
               "images' sky and var planes in place)",
    .params = background_params,
    .nparams = sizeof background_params / sizeof background_params[0],
    .needs = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE,
    .makes = HILAL_PROD_BACKGROUND,
    .flags = HILAL_STAGE_INPLACE,
    .init = background_init,
    .run = background_run,
    .fini = background_fini,
};
