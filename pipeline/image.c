#include "hilal/image.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/wcs.h"

void hilal_meta_init(hilal_meta *meta)
{
    memset(meta, 0, sizeof *meta);
    meta->gain_e_per_adu = NAN;
    meta->rdnoise_e = NAN;
    meta->saturate_adu = NAN;
    meta->exptime_s = NAN;
    meta->mjd = NAN;
    meta->zeropoint_mag = NAN;
    meta->bscale = 1.0;
    meta->bzero = 0.0;
    meta->hdu = 0;
}

void hilal_meta_clear(hilal_meta *meta)
{
    if (meta == NULL)
        return;
    hilal_wcs_free(meta->wcs);
    free(meta->header);
    hilal_meta_init(meta);
}

hilal_status hilal_meta_copy(hilal_meta *dst, const hilal_meta *src, hilal_error *err)
{
    hilal_meta_clear(dst);
    *dst = *src;
    dst->wcs = NULL;
    dst->header = NULL;
    if (src->header != NULL) {
        size_t len = strlen(src->header);
        dst->header = malloc(len + 1);
        if (dst->header == NULL)
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory copying a header");
        memcpy(dst->header, src->header, len + 1);
    }
    return hilal_wcs_copy(src->wcs, &dst->wcs, err);
}

static size_t npix(long nx, long ny) { return (size_t)nx * (size_t)ny; }

hilal_image *hilal_image_new(long nx, long ny, hilal_error *err)
{
    if (nx <= 0 || ny <= 0) {
        hilal_error_set(err, HILAL_ERR_RANGE, "image size %ld x %ld is not positive", nx, ny);
        return NULL;
    }
    hilal_image *img = calloc(1, sizeof *img);
    if (img == NULL)
        goto fail;
    img->nx = nx;
    img->ny = ny;
    img->sky_rms_adu = NAN;
    hilal_meta_init(&img->meta);
    img->pix = calloc(npix(nx, ny), sizeof *img->pix);
    img->mask = calloc(npix(nx, ny), sizeof *img->mask);
    if (img->pix == NULL || img->mask == NULL)
        goto fail;
    return img;
fail:
    hilal_image_free(img);
    hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %ld x %ld image", nx, ny);
    return NULL;
}

static hilal_status alloc_plane(float **plane, const hilal_image *img, hilal_error *err)
{
    if (*plane != NULL)
        return HILAL_OK;
    *plane = calloc(npix(img->nx, img->ny), sizeof **plane);
    if (*plane == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %ld x %ld plane",
                               img->nx, img->ny);
    return HILAL_OK;
}

hilal_status hilal_image_alloc_var(hilal_image *img, hilal_error *err)
{
    return alloc_plane(&img->var, img, err);
}

hilal_status hilal_image_alloc_sky(hilal_image *img, hilal_error *err)
{
    return alloc_plane(&img->sky, img, err);
}

hilal_image *hilal_image_clone(const hilal_image *src, hilal_error *err)
{
    hilal_image *img = hilal_image_new(src->nx, src->ny, err);
    if (img == NULL)
        return NULL;
    size_t n = npix(src->nx, src->ny);
    memcpy(img->pix, src->pix, n * sizeof *img->pix);
    memcpy(img->mask, src->mask, n * sizeof *img->mask);
    img->sky_rms_adu = src->sky_rms_adu;
    if ((src->var && hilal_image_alloc_var(img, err) != HILAL_OK) ||
        (src->sky && hilal_image_alloc_sky(img, err) != HILAL_OK) ||
        hilal_meta_copy(&img->meta, &src->meta, err) != HILAL_OK) {
        hilal_image_free(img);
        return NULL;
    }
    if (src->var)
        memcpy(img->var, src->var, n * sizeof *img->var);
    if (src->sky)
        memcpy(img->sky, src->sky, n * sizeof *img->sky);
    return img;
}

void hilal_image_free(hilal_image *img)
{
    if (img == NULL)
        return;
    free(img->pix);
    free(img->var);
    free(img->mask);
    free(img->sky);
    hilal_meta_clear(&img->meta);
    free(img);
}

size_t hilal_image_count_mask(const hilal_image *img, hilal_mask_t bits)
{
    size_t n = npix(img->nx, img->ny), count = 0;
    for (size_t i = 0; i < n; i++)
        count += (img->mask[i] & bits) != 0;
    return count;
}
