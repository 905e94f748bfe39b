/* The background stage: sky map, global sky RMS and the per-pixel variance
 * plane of the science and reference images (in place).
 *
 * 1. The sky is SExtractor's mesh background, computed by libsep: in each
 *    mesh of mesh_px x mesh_px pixels the histogram is clipped at +-3 sigma
 *    around the median until stable and the mode is estimated as
 *    2.5 median - 1.5 mean (or the median in crowded meshes); the mesh
 *    values are median-filtered over filter_size x filter_size meshes and
 *    interpolated with bicubic splines (Bertin & Arnouts 1996). Masked and
 *    non-finite pixels are replaced by 0 and passed as SEP's mask, so they
 *    take no part. The same is done for the RMS map, which is then divided
 *    by 0.98658 (rms_clip_correction): the 3-sigma clipping of the mesh
 *    histograms makes the raw RMS of Gaussian noise 1.3% low.
 * 2. Optionally (mask_sources), sources detected above mask_thresh_sigma
 *    on the first estimate are masked (an ellipse of their isophotal area
 *    grown by mask_grow) and the background measured again, so that wings of bright
 *    stars and galaxies do not bias the sky.
 * 3. The variance of each pixel, ADU^2, is the background variance from the
 *    RMS map plus the source Poisson term (the "source noise" of ZOGY,
 *    Zackay, Ofek & Gal-Yam 2016, section 3.3):
 *        var = rms^2 + max(pix - sky, 0) / gain
 *    (gain in e-/ADU: a signal of s ADU is s*gain electrons with variance
 *    s*gain e-^2 = s/gain ADU^2). Without a gain only rms^2 is used, with a
 *    warning. Masked or non-finite pixels get var = 1e30; any other
 *    non-positive or non-finite variance is replaced by the global RMS^2
 *    and flagged HILAL_MASK_NEGVAR.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/config.h"
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
     "detection threshold of the sources masked in the second pass"},
    {"mask_grow", HILAL_PARAM_DOUBLE, "2", 1, 20, "",
     "masked ellipse of a source: its isophotal footprint's ellipse scaled by this, plus 2 px"},
    {"rms_clip_correction", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "divide the RMS by 0.98658 (the RMS of a Gaussian clipped at 3 sigma) so noise is unbiased"},
};

/* SExtractor's mesh statistics clip the pixel histogram at +-3 sigma, and
 * the standard deviation of a unit Gaussian truncated at +-3 is
 * sqrt(1 - 6 phi(3) / erf(3 / sqrt 2)) = 0.98658: the raw RMS is 1.3% low
 * (variance 2.7% low) on pure noise. */
#define CLIPPED_GAUSS_RMS 0.98658

typedef struct background_state {
    int mesh_px;
    int filter_size;
    int mask_sources;
    double mask_thresh_sigma;
    double mask_grow;
    int rms_correction;
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
    *state = s;
    return HILAL_OK;
}

/* Marks (value 1) the pixels of a detected source: an ellipse with the
 * source's orientation and axis ratio whose area is that of its isophotal
 * footprint (npix pixels above the detection threshold) scaled by grow^2,
 * plus 2 px. The footprint grows with brightness as the wings rise above
 * the threshold, so bright stars are masked farther out than faint ones. */
static void mask_ellipse(uint8_t *m, long nx, long ny, const hilal_sepw_object *o, double grow)
{
    double q = o->a > 0.0 && o->b > 0.0 ? o->b / o->a : 1.0;
    double r_iso = sqrt((double)o->npix / 3.14159265358979323846);
    double a = grow * r_iso / sqrt(q) + 2.0, b = grow * r_iso * sqrt(q) + 2.0;
    double c = cos(o->theta), s = sin(o->theta);
    /* Ellipse of semi-axes (a, b) at angle theta, in coefficient form. */
    double cxx = c * c / (a * a) + s * s / (b * b);
    double cyy = s * s / (a * a) + c * c / (b * b);
    double cxy = 2.0 * c * s * (1.0 / (a * a) - 1.0 / (b * b));
    long x0 = (long)floor(o->x - a), x1 = (long)ceil(o->x + a);
    long y0 = (long)floor(o->y - a), y1 = (long)ceil(o->y + a);
    for (long y = y0 < 0 ? 0 : y0; y <= y1 && y < ny; y++)
        for (long x = x0 < 0 ? 0 : x0; x <= x1 && x < nx; x++) {
            double dx = x - o->x, dy = y - o->y;
            if (cxx * dx * dx + cyy * dy * dy + cxy * dx * dy <= 1.0)
                m[y * nx + x] = 1;
        }
}

/* Background, RMS and variance of one image. which = "science" or
 * "reference" for messages. */
static hilal_status background_image(const background_state *s, hilal_image *img,
                                     const char *which, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t n = (size_t)img->nx * (size_t)img->ny;
    float *data = NULL, *rms = NULL, *sub = NULL;
    uint8_t *mask = NULL, *mask2 = NULL;
    hilal_sepw_object *objs = NULL;
    size_t nobj = 0;
    const char *path = img->meta.path[0] != '\0' ? img->meta.path : "(unnamed)";

    st = hilal_image_alloc_sky(img, err);
    if (st == HILAL_OK)
        st = hilal_image_alloc_var(img, err);
    if (st != HILAL_OK)
        goto cleanup;
    data = malloc(n * sizeof *data);
    rms = malloc(n * sizeof *rms);
    mask = malloc(n);
    if (data == NULL || rms == NULL || mask == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the background of a "
                             "%ld x %ld image", img->nx, img->ny);
        goto cleanup;
    }

    /* SEP cannot take NaN: unusable pixels become 0 and are masked. A
     * non-finite pixel that ingest did not flag is flagged NODATA here. */
    size_t nmasked = 0;
    for (size_t i = 0; i < n; i++) {
        int bad = (img->mask[i] & HILAL_MASK_UNUSABLE) != 0;
        if (!isfinite(img->pix[i])) {
            img->mask[i] |= HILAL_MASK_NODATA;
            bad = 1;
        }
        mask[i] = (uint8_t)bad;
        data[i] = bad ? 0.0f : img->pix[i];
        nmasked += (size_t)bad;
    }
    if (nmasked == n) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "%s image %s: every pixel is masked (saturated, bad or no data), "
                             "so there is no background to measure",
                             which, path);
        goto cleanup;
    }

    /* 1. First estimate of the sky and RMS maps. */
    hilal_sepw_image im = {data, NULL, mask, img->nx, img->ny};
    double gsky = NAN, grms = NAN;
    st = hilal_sepw_background(&im, s->mesh_px, s->filter_size, img->sky, rms, &gsky, &grms, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* 2. Optional second pass with the sources masked. */
    if (s->mask_sources) {
        sub = malloc(n * sizeof *sub);
        mask2 = malloc(n);
        if (sub == NULL || mask2 == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for source masking");
            goto cleanup;
        }
        /* Detection on the sky-subtracted image with the background
         * variance only (rms^2); masked pixels carry no signal. */
        for (size_t i = 0; i < n; i++) {
            sub[i] = mask[i] ? 0.0f : data[i] - img->sky[i];
            float r = rms[i];
            img->var[i] = r > 0.0f && isfinite(r) ? r * r : VAR_MASKED;
        }
        hilal_sepw_image dim = {sub, img->var, mask, img->nx, img->ny};
        hilal_sepw_extract_params xp = {
            .thresh_sigma = s->mask_thresh_sigma, .minarea = 5, .filter = 1,
            .deblend_nthresh = 1, .deblend_cont = 1.0, .clean = 0, .clean_param = 1.0,
            .pixstack = 1000000};
        hilal_error xerr;
        hilal_error_clear(&xerr);
        hilal_status xst = hilal_sepw_extract(&dim, &xp, &objs, &nobj, &xerr);
        if (xst == HILAL_ERR_DATA) {
            /* Too crowded for the pixel stack: the clipped first pass stands. */
            hilal_log(HILAL_LOG_WARN, "%s image %s: sources not masked for the background (%s)",
                      which, path, xerr.msg);
            nobj = 0;
        } else if (xst != HILAL_OK) {
            st = hilal_error_set(err, xst, "%s", xerr.msg);
            goto cleanup;
        }
        memcpy(mask2, mask, n);
        for (size_t k = 0; k < nobj; k++)
            mask_ellipse(mask2, img->nx, img->ny, &objs[k], s->mask_grow);
        size_t nm2 = 0;
        for (size_t i = 0; i < n; i++)
            nm2 += mask2[i];
        /* Re-measure unless the sources cover nearly everything (then the
         * clipped first pass is the better estimate). */
        if (nm2 < n - n / 10) {
            hilal_sepw_image im2 = {data, NULL, mask2, img->nx, img->ny};
            st = hilal_sepw_background(&im2, s->mesh_px, s->filter_size, img->sky, rms, &gsky,
                                       &grms, err);
            if (st != HILAL_OK)
                goto cleanup;
        } else {
            hilal_log(HILAL_LOG_WARN,
                      "%s image %s: detected sources cover %.0f%% of the image; keeping the "
                      "background measured without source masking",
                      which, path, 100.0 * nm2 / n);
        }
    }

    /* libsep reports a global RMS of 1 when no mesh has any scatter; the
     * RMS map is then 0 everywhere. */
    float rms_max = 0.0f;
    for (size_t i = 0; i < n; i++)
        if (rms[i] > rms_max)
            rms_max = rms[i];
    if (!(rms_max > 0.0f))
        grms = 0.0;
    if (!(grms > 0.0) || !isfinite(grms) || !isfinite(gsky)) {
        st = hilal_error_set(err, HILAL_ERR_DATA,
                             "%s image %s: the background RMS is %g ADU (sky %g ADU); a constant "
                             "or empty image cannot be processed",
                             which, path, grms, gsky);
        goto cleanup;
    }
    /* Undo the clipping bias of the RMS (see CLIPPED_GAUSS_RMS). */
    if (s->rms_correction) {
        for (size_t i = 0; i < n; i++)
            rms[i] = (float)(rms[i] / CLIPPED_GAUSS_RMS);
        grms /= CLIPPED_GAUSS_RMS;
    }
    img->sky_rms_adu = grms;

    /* 3. Variance plane. */
    double gain = img->meta.gain_e_per_adu;
    int have_gain = isfinite(gain) && gain > 0.0;
    if (!have_gain)
        hilal_log(HILAL_LOG_WARN,
                  "%s image %s: gain unknown; the variance holds the background noise only "
                  "(no source Poisson noise). Set the gain keyword in the ingest settings",
                  which, path);
    size_t nneg = 0;
    float fallback = (float)(grms * grms);
    for (size_t i = 0; i < n; i++) {
        if (mask[i]) {
            img->var[i] = VAR_MASKED;
            continue;
        }
        double r = rms[i];
        double v = r * r;
        if (have_gain) {
            double src = img->pix[i] - img->sky[i];
            if (src > 0.0)
                v += src / gain;
        }
        if (!(v > 0.0) || !isfinite(v)) {
            v = fallback;
            img->mask[i] |= HILAL_MASK_NEGVAR;
            nneg++;
        }
        img->var[i] = (float)v;
    }
    if (nneg > 0)
        hilal_log(HILAL_LOG_WARN,
                  "%s image %s: %zu pixels had a non-positive variance; replaced by the global "
                  "RMS^2 and flagged NEGVAR",
                  which, path, nneg);
    hilal_log(HILAL_LOG_DEBUG, "%s image %s: sky %.2f ADU, RMS %.3f ADU%s", which, path, gsky,
              grms, s->mask_sources ? " (sources masked)" : "");

cleanup:
    free(data);
    free(rms);
    free(sub);
    free(mask);
    free(mask2);
    free(objs);
    return st;
}

static hilal_status background_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const background_state *s = state;
    if (frame->sci == NULL || frame->ref == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "background stage needs the science and reference images");
    hilal_status st = background_image(s, frame->sci, "science", err);
    if (st == HILAL_OK)
        st = background_image(s, frame->ref, "reference", err);
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
