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
#include <float.h>
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
#include "vecops.h"

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


/* Flags the non-finite pixels of one image row NODATA, so that from then
 * on a pixel is unusable exactly when its mask has a HILAL_MASK_UNUSABLE
 * bit. Rows without one, nearly all, cost one branch-free (vectorised)
 * count. */
static void flag_nonfinite(const float *pix, hilal_mask_t *mask, long nx)
{
    long nonfinite = 0;
    for (long x = 0; x < nx; x++)
        nonfinite += !(fabsf(pix[x]) <= FLT_MAX);
    for (long x = 0; nonfinite > 0 && x < nx; x++)
        if (!isfinite(pix[x]))
            mask[x] |= HILAL_MASK_NODATA;
}

/* Mean of the usable ones among the n <= 4 pixels v[] of a block (u[k]:
 * pixel k is usable), summed in double in order (unusable ones add 0);
 * NaN when none is. *masked is set when none is. */
static inline float block_mean(const float v[4], const int u[4], int n_px, int *masked)
{
    double sum = 0.0;
    int n = 0;
    for (int k = 0; k < n_px; k++) {
        sum += u[k] ? v[k] : 0.0;
        n += u[k];
    }
    *masked = n == 0;
    return n > 0 ? (float)(sum / n) : NAN;
}

/* Binned image: each binned pixel is the mean of the usable pixels of its
 * 2x2 block (the last row/column may be a partial block); NaN and masked
 * (1) when the whole block is unusable. Non-finite pixels are flagged
 * NODATA in the image mask on the way (flag_nonfinite). Returns the number
 * of masked binned pixels. */
static size_t bin2(hilal_image *img, float *b, uint8_t *bm, long bx, long by)
{
    const long nx = img->nx, ny = img->ny, nfull = nx / 2;
    size_t nmasked = 0;
    for (long j = 0; j < by; j++) {
        const long y0 = 2 * j;
        const int two = y0 + 1 < ny; /* the last row of an odd height stands alone */
        const float *p0 = img->pix + y0 * nx, *p1 = two ? p0 + nx : p0;
        hilal_mask_t *m0 = img->mask + y0 * nx, *m1 = two ? m0 + nx : m0;
        flag_nonfinite(p0, m0, nx);
        if (two)
            flag_nonfinite(p1, m1, nx);
        float *bj = b + j * bx;
        uint8_t *bmj = bm + j * bx;
        long i = 0;
        if (two) {
            /* Whole blocks, the bulk of the work: the same sum as
             * block_mean written without branches so that it vectorises
             * (zero_unless, a divisor of 1 for empty blocks, which get
             * their NaN afterwards). */
            size_t nempty = 0;
            for (; i < nfull; i++) {
                const long x = 2 * i;
                const int u00 = !(m0[x] & HILAL_MASK_UNUSABLE);
                const int u01 = !(m0[x + 1] & HILAL_MASK_UNUSABLE);
                const int u10 = !(m1[x] & HILAL_MASK_UNUSABLE);
                const int u11 = !(m1[x + 1] & HILAL_MASK_UNUSABLE);
                double sum = 0.0;
                sum += zero_unless(p0[x], u00);
                sum += zero_unless(p0[x + 1], u01);
                sum += zero_unless(p1[x], u10);
                sum += zero_unless(p1[x + 1], u11);
                const int n = u00 + u01 + u10 + u11;
                bj[i] = (float)(sum / (double)(n + (n == 0)));
                bmj[i] = (uint8_t)(n == 0);
                nempty += (size_t)(n == 0);
            }
            for (long k = 0; nempty > 0 && k < nfull; k++)
                if (bmj[k])
                    bj[k] = NAN;
            nmasked += nempty;
        }
        /* Partial blocks: the last column of an odd width, the last row of
         * an odd height. */
        for (; i < bx; i++) {
            const long x = 2 * i;
            const int has1 = x + 1 < nx;
            float v[4];
            int u[4], k = 0, masked;
            for (int r = 0; r < 1 + two; r++) {
                const float *p = r ? p1 : p0;
                const hilal_mask_t *m = r ? m1 : m0;
                for (long xx = x; xx <= x + has1; xx++, k++) {
                    v[k] = p[xx];
                    u[k] = !(m[xx] & HILAL_MASK_UNUSABLE);
                }
            }
            bj[i] = block_mean(v, u, k, &masked);
            bmj[i] = (uint8_t)masked;
            nmasked += (size_t)masked;
        }
    }
    return nmasked;
}

/* The first index i >= from (and < to) with a[i] != 0, else to: eight
 * bytes at a time over the zeros (most of a detection map). */
static long next_set(const uint8_t *a, long from, long to)
{
    long i = from;
    while (i < to && (i & 7) != 0 && a[i] == 0)
        i++;
    if (i < to && a[i] != 0)
        return i;
    for (; i + 8 <= to; i += 8) {
        uint64_t w;
        memcpy(&w, a + i, sizeof w);
        if (w != 0)
            break;
    }
    while (i < to && a[i] == 0)
        i++;
    return i;
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
 * holds 2 bx by integers, above bx by bytes. */
static long binned_sources(const background_state *s, const float *b, const float *bsky,
                           const uint8_t *bm, long bx, long by, double rms, uint8_t *src,
                           int32_t *scratch, uint8_t *above)
{
    size_t n = (size_t)bx * (size_t)by;
    long nreg = 0;
    int32_t *parent = scratch, *rid = scratch + n;
    region *reg = NULL;
    double thr = s->mask_thresh_sigma * 0.375 * rms;
    /* 1. Threshold the smoothed image: the sky-subtracted binned image
     *    (masked pixels 0) convolved separably with 1 2 1 along x, then
     *    along y, divided by the kernel weight inside the image. The
     *    parent array holds the x-pass as float until step 2 reuses it. */
    float *hx = (float *)parent;
    /* The sky-subtracted row, masked pixels 0 (rid is free until step 3). */
    float *v = (float *)rid;
    for (long y = 0; y < by; y++) {
        const float *bb = b + y * bx, *ss = bsky + y * bx;
        const uint8_t *mm = bm + y * bx;
        float *h = hx + y * bx;
        for (long x = 0; x < bx; x++)
            v[x] = zero_unless(bb[x] - ss[x], !mm[x]);
        /* (1 2 1) / 4 inside, (2 1) / 3 and (1 2) / 3 at the ends. */
        if (bx == 1) {
            h[0] = (float)(2.0 * v[0] / 2.0);
            continue;
        }
        h[0] = (float)((2.0 * v[0] + v[1]) / 3.0);
        for (long x = 1; x + 1 < bx; x++)
            h[x] = (float)(((double)v[x - 1] + 2.0 * v[x] + v[x + 1]) * 0.25);
        h[bx - 1] = (float)(((double)v[bx - 2] + 2.0 * v[bx - 1]) / 3.0);
    }
    for (long y = 0; y < by; y++) {
        long ya = y > 0 ? y - 1 : y, yb = y + 1 < by ? y + 1 : y;
        const float *hc = hx + y * bx, *ha = hx + ya * bx, *hb = hx + yb * bx;
        const uint8_t *mm = bm + y * bx;
        uint8_t *ab = above + y * bx;
        if (ya != y && yb != y) {
            for (long x = 0; x < bx; x++)
                ab[x] = (!mm[x]) & ((2.0 * hc[x] + ha[x] + hb[x]) * 0.25 > thr);
            continue;
        }
        double w = 2.0 + (ya != y) + (yb != y);
        for (long x = 0; x < bx; x++) {
            double acc = 2.0 * hc[x] + (ya != y ? ha[x] : 0.0) + (yb != y ? hb[x] : 0.0);
            ab[x] = (!mm[x]) & (acc / w > thr);
        }
    }
    /* 2. 8-connected regions by union-find: every pixel above joins its
     *    already visited neighbours (left, and the three above). */
    static const int nbx[4] = {-1, -1, 0, 1}, nby[4] = {0, -1, -1, -1};
    for (long y = 0; y < by; y++)
        for (long x = 0; x < bx; x++) {
            int32_t q = (int32_t)(y * bx + x);
            if (!above[q]) {
                x = next_set(above + y * bx, x, bx) - 1;
                continue;
            }
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
    for (long q = next_set(above, 0, (long)n); q < (long)n; q = next_set(above, q + 1, (long)n)) {
        parent[q] = uf_find(parent, (int32_t)q);
        if (parent[q] == (int32_t)q)
            rid[q] = (int32_t)nreg++;
    }
    reg = calloc((size_t)nreg + 1, sizeof *reg);
    if (reg == NULL) {
        nreg = -1;
        goto cleanup;
    }
    for (long yi = 0; yi < by; yi++) {
        const uint8_t *ab = above + yi * bx;
        for (long xi = next_set(ab, 0, bx); xi < bx; xi = next_set(ab, xi + 1, bx)) {
            region *r = &reg[rid[parent[yi * bx + xi]]];
            double x = (double)xi, y = (double)yi;
            r->npix++;
            r->sx += x;
            r->sy += y;
            r->sxx += x * x;
            r->syy += y * y;
            r->sxy += x * y;
        }
    }
    /* 4. Masks. */
    memset(src, 0, n);
    for (long k = 0; k < nreg; k++)
        if (reg[k].npix >= MASK_MINAREA)
            mask_region(src, bx, by, &reg[k], s->mask_grow);

cleanup:
    free(reg);
    return nreg;
}

/* Bilinear interpolation of a map m (bx x by) given at the centres of the
 * 2x2 blocks of an nx x ny image (binned pixel k is centred on image
 * coordinate 2k + 0.5), clamped at the borders. Image coordinate x maps
 * to binned coordinate u = (x - 0.5) / 2 and lies between samples
 * i0 = floor(u) and i1 = i0 + 1 with weight f = u - i0 on i1: f = 0.75 for
 * even x, 0.25 for odd x; below the first sample or beyond the last the
 * value is that sample's (i0 = i1). An image row interpolates along y
 * between two map rows that were first interpolated along x ("expanded"
 * to nx values); an expanded row serves two image rows, so the upsampler
 * keeps the last two. */
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

typedef struct upsampler {
    const float *m;
    long bx, by, nx;
    float *row[2]; /* expanded map rows */
    long j[2];     /* the map row each holds, -1 for none */
} upsampler;

static int upsampler_make(upsampler *u, const float *m, long bx, long by, long nx)
{
    *u = (upsampler){m, bx, by, nx, {NULL, NULL}, {-1, -1}};
    u->row[0] = malloc((size_t)nx * sizeof *u->row[0]);
    u->row[1] = malloc((size_t)nx * sizeof *u->row[1]);
    return u->row[0] != NULL && u->row[1] != NULL;
}

static void upsampler_free(upsampler *u)
{
    free(u->row[0]);
    free(u->row[1]);
}

/* Map row j expanded along x: e[x] = r[i0] + f (r[i1] - r[i0]). In the
 * interior the pair of image columns 2k - 1, 2k lies between samples k - 1
 * and k with f = 0.25 and 0.75; the first column (and the last for an even
 * width) takes the clamped taps. */
static void upsample_expand(const float *r, long bx, long nx, float *e)
{
    long i0, i1;
    double f;
    upsample_taps(0, bx, &i0, &i1, &f);
    e[0] = r[i0] + (float)f * (r[i1] - r[i0]);
    const long kend = bx < (nx + 1) / 2 ? bx : (nx + 1) / 2; /* 2k < nx */
    for (long k = 1; k < kend; k++) {
        float a = r[k - 1], d = r[k] - r[k - 1];
        e[2 * k - 1] = a + 0.25f * d;
        e[2 * k] = a + 0.75f * d;
    }
    for (long x = 2 * (bx - 1) + 1; x < nx; x++) {
        upsample_taps(x, bx, &i0, &i1, &f);
        e[x] = r[i0] + (float)f * (r[i1] - r[i0]);
    }
}

/* Expanded map row j, computed unless one of the two kept rows holds it;
 * the row `keep` (still needed) is never the one replaced. */
static const float *upsampler_expanded(upsampler *u, long j, long keep)
{
    for (int k = 0; k < 2; k++)
        if (u->j[k] == j)
            return u->row[k];
    int k = u->j[0] == keep ? 1 : 0;
    upsample_expand(u->m + j * u->bx, u->bx, u->nx, u->row[k]);
    u->j[k] = j;
    return u->row[k];
}

/* Image row y of the upsampled map into out (nx values). */
static void upsample_row(upsampler *u, long y, float *out)
{
    long j0, j1;
    double f;
    upsample_taps(y, u->by, &j0, &j1, &f);
    const float fy = (float)f;
    const float *a = upsampler_expanded(u, j0, -1), *b = upsampler_expanded(u, j1, j0);
    for (long x = 0; x < u->nx; x++)
        out[x] = a[x] + fy * (b[x] - a[x]);
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
 * fourth row of images over 4 Mpx), with the sky rows from the upsampled
 * binned map bsky: the median from a histogram of bin sig_guess / 128 over
 * +-8 sig_guess, then, in a second pass, the median of |pix - sky - median|
 * from a histogram of the same bins. NaN when fewer than 100 pixels
 * qualify (or out of memory). skyrow holds nx floats. Per row, the bin
 * coordinates of all pixels are computed first (a loop that vectorises),
 * then the qualifying ones are counted. */
static double robust_rms(const hilal_image *img, upsampler *bsky, const uint8_t *src, long bx,
                         double sig_guess, float *skyrow)
{
    enum { NB = 2048, NSUB = 4 };
    const long nx = img->nx, ny = img->ny;
    /* NSUB interleaved histograms, summed at the end: neighbouring pixels
     * often fall in the same bin, and one histogram would make each count
     * wait for the previous one. */
    long *hist = calloc(NB * NSUB, sizeof *hist);
    double *t = malloc((size_t)nx * sizeof *t);
    double out = NAN;
    double w = 16.0 * sig_guess / NB, lo = -8.0 * sig_guess;
    if (hist == NULL || t == NULL || !(w > 0.0) || !isfinite(w))
        goto cleanup;
    /* Every row up to 4 Mpx, every fourth beyond (a million samples). */
    int step = (double)nx * (double)ny > 4.2e6 ? 4 : 1;
    for (int pass = 0; pass < 2; pass++) {
        const double med = out, base = pass == 0 ? lo : 0.0;
        long n = 0;
        memset(hist, 0, NB * NSUB * sizeof *hist);
        for (long y = 0; y < ny; y += step) {
            const float *pix = img->pix + y * nx;
            const hilal_mask_t *m = img->mask + y * nx;
            const uint8_t *sr = src + (y / 2) * bx;
            upsample_row(bsky, y, skyrow);
            if (pass == 0)
                for (long x = 0; x < nx; x++)
                    t[x] = (((double)pix[x] - skyrow[x]) - base) / w;
            else
                for (long x = 0; x < nx; x++)
                    t[x] = (fabs(((double)pix[x] - skyrow[x]) - med) - base) / w;
            for (long x = 0; x < nx; x++) {
                if ((m[x] & HILAL_MASK_UNUSABLE) || sr[x / 2])
                    continue;
                /* t >= 0: truncation is floor; NaN fails both tests. */
                if (t[x] >= 0.0 && t[x] < NB) {
                    hist[(long)t[x] * NSUB + (x & (NSUB - 1))]++;
                    n++;
                }
            }
        }
        for (long k = 0; k < NB; k++) {
            long c = 0;
            for (int j = 0; j < NSUB; j++)
                c += hist[k * NSUB + j];
            hist[k] = c; /* (in place: no smaller bin wrote entries k NSUB...) */
        }
        if (n < 100) {
            out = NAN;
            goto cleanup;
        }
        out = hist_median(hist, NB, base, w, n);
    }
    out *= 1.4826;

cleanup:
    free(hist);
    free(t);
    return out;
}

/* One row of the variance plane: var = (rms rs)^2 + max(pix - sky, 0) ig,
 * VAR_MASKED where the mask has an unusable bit. Returns the number of
 * usable pixels whose variance is not positive and finite; *npos counts
 * the pixels of positive RMS. (Branch-free and on restrict pointers so
 * that it vectorises: one pass over 16 Mpx per 4k frame.) var may be the
 * rms row itself (the full-resolution path keeps the RMS map there). */
static long variance_row(const float *restrict pix, const float *restrict sky, const float *rms,
                         const hilal_mask_t *restrict m, long nx, float rs, float ig, float *var,
                         long *npos)
{
    long nbad = 0, np = 0;
    for (long x = 0; x < nx; x++) {
        const int bad = (m[x] & HILAL_MASK_UNUSABLE) != 0;
        const float rv = rms[x];
        np += rv > 0.0f;
        const float r = rv * rs, src = pix[x] - sky[x];
        const float v = r * r + (src > 0.0f ? src : 0.0f) * ig;
        nbad += !(bad | ((v > 0.0f) & (v < INFINITY)));
        var[x] = bad ? VAR_MASKED : v;
    }
    *npos += np;
    return nbad;
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
    uint8_t *mask = NULL, *bm = NULL, *bsrc = NULL; /* (bm, bsrc: in the sky plane) */
    float *bsky = NULL, *brms = NULL, *rowbuf = NULL;
    upsampler usky = {0}, urms = {0};
    const char *path = img->meta.path[0] != '\0' ? img->meta.path : "(unnamed)";
    const int binned = s->mask_sources && nx >= 8 && ny >= 8;

    st = hilal_image_alloc_sky(img, err);
    if (st == HILAL_OK)
        st = hilal_image_alloc_var(img, err);
    if (st != HILAL_OK)
        goto cleanup;

    double gsky = NAN, grms = NAN, rscale = 1.0;
    int masked_sources = 0;
    if (binned) {
        /* 2. The binned path: sources found and the background measured on
         *    the image binned 2 x 2, with meshes of half the side (the same
         *    meshes on the sky). */
        long bx = (nx + 1) / 2, by = (ny + 1) / 2;
        size_t bn = (size_t)bx * (size_t)by;
        /* The variance and sky planes are free until step 3, which writes
         * them: the variance plane holds the binned image and the
         * labelling scratch (3 bx by 4-byte words fit in nx ny), the sky
         * plane the binned masks (3 bx by bytes). Fresh memory costs a
         * page fault per 4 KiB when first touched; these planes are touched
         * anyway. (The binned sky and RMS maps are read while step 3
         * writes both planes: they have their own memory.) */
        float *b = img->var;
        int32_t *scratch = (int32_t *)(img->var + bn);
        bm = (uint8_t *)img->sky;
        bsrc = bm + bn;
        uint8_t *above = bsrc + bn;
        bsky = malloc(bn * sizeof *bsky);
        brms = malloc(bn * sizeof *brms);
        if (bsky == NULL || brms == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for source masking");
            goto cleanup;
        }
        /* Unusable pixels (non-finite ones are flagged NODATA here when
         * ingest did not) take no part; a binned pixel is masked when its
         * whole block is, so every pixel is masked exactly when every
         * binned one is. */
        if (bin2(img, b, bm, bx, by) == bn) {
            st = hilal_error_set(err, HILAL_ERR_DATA,
                                 "%s image %s: every pixel is masked (saturated, bad or no "
                                 "data), so there is no background to measure",
                                 which, path);
            goto cleanup;
        }
        int bmesh = s->mesh_px / 2 > 4 ? s->mesh_px / 2 : 4;
        hilal_sepw_image bim = {b, NULL, bm, bx, by};
        double bgsky = NAN, bgrms = NAN;
        st = hilal_sepw_background(&bim, bmesh, s->filter_size, bsky, NULL, &bgsky, &bgrms, err);
        if (st != HILAL_OK)
            goto cleanup;
        long nreg = bgrms > 0.0 && isfinite(bgrms)
                        ? binned_sources(s, b, bsky, bm, bx, by, bgrms, bsrc, scratch, above)
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
        /* The sky and RMS maps at full resolution: bilinear between the
         * binned pixel centres (the maps are smooth on the mesh scale),
         * made row by row where they are used. */
        rowbuf = malloc((size_t)nx * sizeof *rowbuf);
        if (rowbuf == NULL || !upsampler_make(&usky, bsky, bx, by, nx) ||
            !upsampler_make(&urms, brms, bx, by, nx)) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the background");
            goto cleanup;
        }
        /* The RMS of a full-resolution pixel: the binned map scaled so its
         * global value is the robust RMS (1.4826 MAD) of the image's own
         * source-free pixels. For independent pixels the factor is 2 (a
         * binned pixel averages four); noise correlated between pixels, as
         * in resampled or stacked images, gives another factor, which this
         * measures rather than assumes. The MAD needs no clipping
         * correction. */
        double sig = robust_rms(img, &usky, bsrc, bx, 2.0 * grms, rowbuf);
        if (!(sig > 0.0) || !isfinite(sig))
            sig = 2.0 * grms / CLIPPED_GAUSS_RMS;
        rscale = sig / grms;
        grms = sig;
    } else {
        /* 1. The full-resolution path (SExtractor's algorithm exactly, as
         *    without source masking): SEP's mask holds the unusable pixels,
         *    and the non-finite ones, which are flagged NODATA here when
         *    ingest did not (SEP reads the pixels themselves). The sky map
         *    goes into the sky plane, the RMS map into the variance plane,
         *    which step 3 turns into the variance in place. */
        mask = malloc(n);
        if (mask == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the background of a "
                                 "%ld x %ld image", nx, ny);
            goto cleanup;
        }
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
                                 "%s image %s: every pixel is masked (saturated, bad or no "
                                 "data), so there is no background to measure",
                                 which, path);
            goto cleanup;
        }
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
     *    / gain (on the binned path the same pass writes the sky plane).
     *    From here a pixel is unusable exactly when its mask has an
     *    unusable bit (non-finite pixels were flagged above). */
    double gain = img->meta.gain_e_per_adu;
    int have_gain = isfinite(gain) && gain > 0.0;
    double inv_gain = have_gain ? 1.0 / gain : 0.0;
    if (!have_gain)
        hilal_log(HILAL_LOG_WARN,
                  "%s image %s: gain unknown; the variance holds the background noise only "
                  "(no source Poisson noise). Set the gain keyword in the ingest settings",
                  which, path);
    size_t nneg = 0;
    float fallback = (float)(grms * grms);
    long npos = 0; /* pixels of positive RMS */
    const float rs = (float)rscale, ig = (float)inv_gain;
    for (long y = 0; y < ny; y++) {
        /* The RMS of the row: upsampled from the binned map, or the
         * full-resolution map already in the variance plane. */
        float *var = img->var + y * nx, *sky = img->sky + y * nx;
        const float *rms = var;
        if (binned) {
            upsample_row(&usky, y, sky);
            upsample_row(&urms, y, rowbuf);
            rms = rowbuf;
        }
        const hilal_mask_t *m = img->mask + y * nx;
        long nbad = variance_row(img->pix + y * nx, sky, rms, m, nx, rs, ig, var, &npos);
        /* Rare: non-positive or non-finite variance (NaN sky, ...). */
        for (long x = 0; nbad > 0 && x < nx; x++)
            if (!(m[x] & HILAL_MASK_UNUSABLE) && !(var[x] > 0.0f && var[x] < INFINITY)) {
                var[x] = fallback;
                img->mask[y * nx + x] |= HILAL_MASK_NEGVAR;
                nneg++;
            }
    }
    /* libsep reports a global RMS of 1 when no mesh has any scatter; the
     * RMS map is then 0 everywhere. */
    if (npos == 0) {
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
    upsampler_free(&usky);
    upsampler_free(&urms);
    free(rowbuf);
    free(mask);
    free(bsky);
    free(brms);
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
