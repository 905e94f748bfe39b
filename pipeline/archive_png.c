/* A PNG triplet of a candidate's stamps (science | reference | difference)
 * for people to look at, written with libpng's simplified API.
 *
 * Display limits come from the IRAF zscale algorithm (the `display` task of
 * IRAF, also astropy.visualization.ZScaleInterval): sort a sample of the
 * pixels, fit a straight line to the sorted values against their rank with
 * iterative rejection, and take the limits where the line, its slope
 * divided by the contrast, reaches the first and last ranks around the
 * median. Values are then mapped to [0, 1] and stretched with
 * asinh(v / beta) / asinh(1 / beta), which stays linear for faint levels and
 * compresses bright cores.
 */
#include "hilal/archive.h"

#include <errno.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ZSCALE_CONTRAST 0.25
#define ZSCALE_KREJ 2.5
#define ZSCALE_MAX_ITER 5
#define ZSCALE_MAX_REJECT 0.5 /* at least half of the sample must survive */
#define ASINH_BETA 1.0

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* IRAF zscale limits of the finite values of v (n of them); *z1 = *z2 = 0
 * when there are none. */
static void zscale(const float *v, size_t n, double *z1, double *z2)
{
    float *s = malloc((n > 0 ? n : 1) * sizeof *s);
    unsigned char *bad = calloc(n > 0 ? n : 1, 1);
    size_t m = 0;
    *z1 = *z2 = 0;
    if (s == NULL || bad == NULL)
        goto cleanup;
    for (size_t i = 0; i < n; i++)
        if (isfinite(v[i]))
            s[m++] = v[i];
    if (m == 0)
        goto cleanup;
    qsort(s, m, sizeof *s, cmp_float);
    double zmin = s[0], zmax = s[m - 1];
    size_t center = (m - 1) / 2;
    double median = m % 2 ? s[center] : 0.5 * ((double)s[center] + (double)s[center + 1]);
    size_t minpix = (size_t)fmax(5.0, ZSCALE_MAX_REJECT * (double)m);
    if (m < minpix) {
        *z1 = zmin;
        *z2 = zmax;
        goto cleanup;
    }
    /* Least-squares line value = a + b * (rank - center) over the kept
     * points, rejecting points beyond KREJ sigma of the residuals (and
     * their neighbours) until nothing changes. */
    double a = median, b = 0;
    size_t ngood = m;
    for (int iter = 0; iter < ZSCALE_MAX_ITER; iter++) {
        double sx = 0, sy = 0, sxx = 0, sxy = 0;
        size_t k = 0;
        for (size_t i = 0; i < m; i++) {
            if (bad[i])
                continue;
            double x = (double)i - (double)center, y = s[i];
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
            k++;
        }
        double det = (double)k * sxx - sx * sx;
        if (k < 2 || det <= 0)
            break;
        b = ((double)k * sxy - sx * sy) / det;
        a = (sy - b * sx) / (double)k;
        double ss = 0;
        for (size_t i = 0; i < m; i++)
            if (!bad[i]) {
                double r = s[i] - (a + b * ((double)i - (double)center));
                ss += r * r;
            }
        double sigma = sqrt(ss / (double)k), thresh = ZSCALE_KREJ * sigma;
        /* Seeds: kept points beyond the threshold (marked 2 first, so that
         * growing does not feed on itself within this pass). */
        for (size_t i = 0; i < m; i++) {
            double r = s[i] - (a + b * ((double)i - (double)center));
            if (!bad[i] && fabs(r) > thresh)
                bad[i] = 2;
        }
        /* Reject each seed and its neighbours in rank. */
        size_t nrej = 0;
        for (size_t i = 0; i < m; i++) {
            if (bad[i] != 2)
                continue;
            for (size_t q = i > 0 ? i - 1 : 0; q <= i + 1 && q < m; q++)
                if (bad[q] == 0 || q == i) {
                    if (bad[q] != 3)
                        nrej++;
                    bad[q] = 3;
                }
        }
        for (size_t i = 0; i < m; i++)
            if (bad[i] == 3)
                bad[i] = 1;
        if (nrej == 0)
            break;
        ngood = ngood > nrej ? ngood - nrej : 0;
        if (ngood < minpix)
            break;
    }
    if (ngood < minpix) {
        *z1 = zmin;
        *z2 = zmax;
    } else {
        double slope = b / ZSCALE_CONTRAST;
        *z1 = fmax(zmin, median - (double)center * slope);
        *z2 = fmin(zmax, median + (double)(m - 1 - center) * slope);
    }
cleanup:
    free(s);
    free(bad);
}

hilal_status hilal_archive_write_cutout_png(const char *path, const hilal_archive_cutout *c,
                                            int zoom, hilal_error *err)
{
    static const int panels[3] = {HILAL_ARCHIVE_SCIENCE, HILAL_ARCHIVE_REFERENCE,
                                  HILAL_ARCHIVE_DIFFERENCE};
    hilal_status st = HILAL_OK;
    char tmp[4200];
    if (zoom < 1 || zoom > 32)
        return hilal_error_set(err, HILAL_ERR_RANGE, "PNG zoom %d is outside 1..32", zoom);
    int S = c->size, gap = zoom < 2 ? 2 : zoom, side = S * zoom;
    int width = 3 * side + 2 * gap, height = side;
    size_t SS = (size_t)S * (size_t)S;
    unsigned char *rgb = malloc((size_t)width * (size_t)height * 3);
    if (rgb == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    /* Blue separators, a colour no stretched pixel takes. */
    for (size_t k = 0; k < (size_t)width * (size_t)height; k++) {
        rgb[3 * k] = 0;
        rgb[3 * k + 1] = 80;
        rgb[3 * k + 2] = 160;
    }
    for (int p = 0; p < 3; p++) {
        const float *v = c->plane[panels[p]];
        double z1, z2;
        zscale(v, SS, &z1, &z2);
        double range = z2 > z1 ? z2 - z1 : 1.0, norm = asinh(1.0 / ASINH_BETA);
        int x_off = p * (side + gap);
        for (int j = 0; j < S; j++)
            for (int i = 0; i < S; i++) {
                /* FITS convention: the first row is at the bottom. */
                float val = v[(size_t)(S - 1 - j) * S + i];
                unsigned char r, g, bl;
                if (!isfinite(val)) {
                    r = 96; /* outside the frame or no data: dark red */
                    g = bl = 0;
                } else {
                    double t = (val - z1) / range;
                    t = t < 0 ? 0 : t > 1 ? 1 : t;
                    t = asinh(t / ASINH_BETA) / norm;
                    r = g = bl = (unsigned char)lround(255.0 * t);
                }
                for (int dy = 0; dy < zoom; dy++)
                    for (int dx = 0; dx < zoom; dx++) {
                        unsigned char *px = rgb + 3 * ((size_t)(j * zoom + dy) * (size_t)width +
                                                       (size_t)(x_off + i * zoom + dx));
                        px[0] = r;
                        px[1] = g;
                        px[2] = bl;
                    }
            }
    }
    snprintf(tmp, sizeof tmp, "%s.tmp-%ld", path, (long)getpid());
    png_image image;
    memset(&image, 0, sizeof image);
    image.version = PNG_IMAGE_VERSION;
    image.width = (png_uint_32)width;
    image.height = (png_uint_32)height;
    image.format = PNG_FORMAT_RGB;
    if (!png_image_write_to_file(&image, tmp, 0, rgb, 0, NULL)) {
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot write PNG %s: %s", path, image.message);
        unlink(tmp);
    } else if (rename(tmp, path) != 0) {
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
    }
    png_image_free(&image);
    free(rgb);
    return st;
}
