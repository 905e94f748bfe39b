/* Synthetic frames for the archive tests: every product the archive stores,
 * with pixel values and candidate fields that are deterministic functions of
 * (seed, position, index), so that what is read back can be checked against
 * what was written without keeping the frames around.
 *
 * Included by tests/pipeline/test_archive*.c and tests/cli/test_archive*.c
 * (static functions; each test is its own executable).
 */
#ifndef HILAL_TEST_ARCHIVE_FRAMES_H
#define HILAL_TEST_ARCHIVE_FRAMES_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/archive.h"
#include "hilal/frame.h"
#include "hilal/image.h"

/* Pixel values: distinct per plane, position and seed (exact in float32
 * for frames up to 512 x 512 and seeds below 64). */
static inline float tf_sci(unsigned seed, long x, long y, long nx)
{
    return (float)(seed * 300000u) + (float)(y * nx + x);
}
static inline float tf_ref(unsigned seed, long x, long y, long nx)
{
    return -tf_sci(seed, x, y, nx) - 0.5f;
}
static inline float tf_diff(unsigned seed, long x, long y, long nx)
{
    return 0.25f * (float)((y * nx + x) % 4096) - (float)seed;
}
static inline float tf_scorr(unsigned seed, long x, long y)
{
    return 0.01f * (float)(x - y) + 0.001f * (float)seed;
}
static inline float tf_var(unsigned seed, long x, long y)
{
    return 1.0f + 0.5f * (float)((x + 3 * y) % 16) + (float)seed;
}
static inline hilal_mask_t tf_mask(long x, long y)
{
    /* A saturated column and a bad pixel grid. */
    hilal_mask_t m = 0;
    if (x == 40)
        m |= HILAL_MASK_SAT;
    if (x % 17 == 3 && y % 13 == 5)
        m |= HILAL_MASK_BAD;
    return m;
}

/* Candidate i of frame `seed`: the fields the archive stores. */
static inline void tf_candidate(unsigned seed, size_t i, long nx, long ny, hilal_candidate *c)
{
    memset(c, 0, sizeof *c);
    /* Positions spread over the frame by a multiplicative hash; candidates 0
     * and 1 sit at the lower-left and upper-right corners so their stamps
     * are truncated. */
    unsigned h = (unsigned)(i * 2654435761u + seed * 40503u);
    c->cand_id = (int64_t)i + 1;
    c->x = 1.0 + (double)(h % (unsigned)((nx - 1) * 100)) / 100.0;
    c->y = 1.0 + (double)((h / 7919u) % (unsigned)((ny - 1) * 100)) / 100.0;
    if (i == 0) {
        c->x = 2.3;
        c->y = 3.6;
    } else if (i == 1) {
        c->x = (double)nx - 0.8;
        c->y = (double)ny - 1.4;
    }
    c->ra = 150.0 + c->x * 1e-4;
    c->dec = 2.0 + c->y * 1e-4;
    c->snr = (i % 3 == 2 ? -1.0 : 1.0) * (5.0 + (double)(i % 40));
    c->flux = c->snr * 12.5;
    c->flux_err = 12.5;
    c->mag = 25.0 - 2.5 * log10(fabs(c->flux));
    c->mag_err = 1.0857 / fabs(c->snr);
    c->fwhm = 2.5 + 0.01 * (double)(i % 50);
    c->elongation = 1.0 + 0.02 * (double)(i % 10);
    c->rb = (double)(i % 10) / 10.0 + 0.05;
    c->flags = (uint32_t)((i % 4 == 1) ? HILAL_CAND_NEAR_MASK : 0) |
               (uint32_t)((i % 6 == 5) ? HILAL_CAND_SHARP : 0);
    c->mjd = 60000.0 + seed * 0.01;
    c->sharpness = 1.0 + 0.1 * (double)(i % 7);
    c->neg_frac = 0.01 * (double)(i % 9);
    c->dipole = 0.02 * (double)(i % 5);
    c->dist_sat_px = 30.0 + (double)i;
    c->dist_mask_px = 3.0 + (double)(i % 11);
    c->masked_frac = 0.001 * (double)(i % 3);
}

/* A Gaussian PSF of odd side `size`, normalised to sum 1. */
static inline int tf_psf(hilal_psf *psf, int size, double fwhm_px, int nstars)
{
    double sigma = fwhm_px / 2.3548200450309493, sum = 0;
    int c = size / 2;
    psf->size = size;
    psf->data = malloc((size_t)size * (size_t)size * sizeof *psf->data);
    if (psf->data == NULL)
        return -1;
    for (int j = 0; j < size; j++)
        for (int i = 0; i < size; i++) {
            double r2 = (double)((i - c) * (i - c) + (j - c) * (j - c));
            psf->data[j * size + i] = (float)exp(-0.5 * r2 / (sigma * sigma));
            sum += psf->data[j * size + i];
        }
    for (int k = 0; k < size * size; k++)
        psf->data[k] = (float)(psf->data[k] / sum);
    psf->fwhm_px = fwhm_px;
    psf->nstars = nstars;
    return 0;
}

/* A minimal TAN header (80-character cards) for the science image. */
static inline char *tf_header(void)
{
    static const char *cards[] = {
        "SIMPLE  =                    T",
        "BITPIX  =                  -32",
        "NAXIS   =                    2",
        "CTYPE1  = 'RA---TAN'",
        "CTYPE2  = 'DEC--TAN'",
        "CRVAL1  =                150.0",
        "CRVAL2  =                  2.0",
        "CRPIX1  =                100.0",
        "CRPIX2  =                 80.0",
        "CD1_1   =             -0.0001",
        "CD1_2   =                  0.0",
        "CD2_1   =                  0.0",
        "CD2_2   =              0.0001",
        "FILTER  = 'r'",
    };
    size_t n = sizeof cards / sizeof cards[0];
    char *h = malloc(n * 80 + 1);
    if (h == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        char card[81];
        snprintf(card, sizeof card, "%-80s", cards[i]);
        memcpy(h + i * 80, card, 80);
    }
    h[n * 80] = '\0';
    return h;
}

/* The fake SHA-256 of the science file of frame `seed` (64 hex digits). */
static inline void tf_sha(unsigned seed, char out[65])
{
    snprintf(out, 65, "%016x%048d", seed * 2654435761u + 1u, 0);
}

/* Builds a frame with all products up to VETTED: nx x ny images, `ncands`
 * candidates, PSFs, per-frame records. name is the frame name; the science
 * file "identity" (sha256) depends on seed only, so two frames with the
 * same seed are the same input. Returns 0 on success. */
static inline int tf_make(hilal_frame *f, const char *name, unsigned seed, long nx, long ny,
                          size_t ncands)
{
    hilal_error err = {0};
    hilal_frame_init(f);
    snprintf(f->frame_id, sizeof f->frame_id, "%s", name);
    snprintf(f->sci_path, sizeof f->sci_path, "night/%s.fits", name);
    snprintf(f->ref_path, sizeof f->ref_path, "refs/field%u.fits", seed % 3);
    f->sci = hilal_image_new(nx, ny, &err);
    f->ref = hilal_image_new(nx, ny, &err);
    if (f->sci == NULL || f->ref == NULL || hilal_image_alloc_var(f->sci, &err) != HILAL_OK ||
        hilal_image_alloc_sky(f->sci, &err) != HILAL_OK ||
        hilal_image_alloc_sky(f->ref, &err) != HILAL_OK)
        return -1;
    size_t npix = (size_t)nx * (size_t)ny;
    f->diff.nx = nx;
    f->diff.ny = ny;
    f->diff.d = malloc(npix * sizeof(float));
    f->diff.s = malloc(npix * sizeof(float));
    f->diff.scorr = malloc(npix * sizeof(float));
    f->diff.flux = malloc(npix * sizeof(float));
    f->diff.flux_err = malloc(npix * sizeof(float));
    f->diff.mask = malloc(npix * sizeof(hilal_mask_t));
    if (!f->diff.d || !f->diff.s || !f->diff.scorr || !f->diff.flux || !f->diff.flux_err || !f->diff.mask)
        return -1;
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            size_t k = (size_t)y * (size_t)nx + (size_t)x;
            f->sci->pix[k] = tf_sci(seed, x, y, nx);
            f->ref->pix[k] = tf_ref(seed, x, y, nx);
            f->sci->var[k] = tf_var(seed, x, y);
            f->sci->sky[k] = 50.0f + (float)seed;
            f->ref->sky[k] = 40.0f;
            f->sci->mask[k] = tf_mask(x, y);
            f->ref->mask[k] = 0;
            f->diff.d[k] = tf_diff(seed, x, y, nx);
            f->diff.s[k] = 0;
            f->diff.scorr[k] = tf_scorr(seed, x, y);
            f->diff.flux[k] = 0;
            f->diff.flux_err[k] = 2.0f; /* limiting flux 5 x 2 = 10 ADU */
            f->diff.mask[k] = tf_mask(x, y);
        }
    f->sci->sky_rms_adu = 5.0;
    f->ref->sky_rms_adu = 3.0;
    hilal_meta *m = &f->sci->meta;
    snprintf(m->path, sizeof m->path, "%s", f->sci_path);
    m->hdu = 1;
    tf_sha(seed, m->sha256);
    m->mjd = 60000.0 + seed * 0.01;
    m->exptime_s = 30.0;
    m->zeropoint_mag = 25.0;
    m->gain_e_per_adu = 1.5;
    snprintf(m->filter, sizeof m->filter, "r");
    snprintf(m->object, sizeof m->object, "FIELD%u", seed % 3);
    m->header = tf_header();
    m->nheader_cards = m->header ? (int)(strlen(m->header) / 80) : 0;
    snprintf(f->ref->meta.path, sizeof f->ref->meta.path, "%s", f->ref_path);
    f->ref->meta.hdu = 1;
    snprintf(f->ref->meta.sha256, sizeof f->ref->meta.sha256, "%064d", (int)(seed % 3));
    if (tf_psf(&f->sci_psf, 25, 3.0, 40) || tf_psf(&f->ref_psf, 25, 2.5, 55) ||
        tf_psf(&f->diff.psf_d, 31, 3.4, 0))
        return -1;
    f->flux_ratio = 1.25;
    f->flux_ratio_err = 0.01;
    f->flux_ratio_nstars = 33;
    f->reg_rms_x_px = 0.05;
    f->reg_rms_y_px = 0.07;
    f->diff.f_d = 0.8;
    f->diff.scorr_mean = 0.01;
    f->diff.scorr_std = 1.02;
    f->ncands = ncands;
    f->cands = calloc(ncands > 0 ? ncands : 1, sizeof *f->cands);
    if (f->cands == NULL)
        return -1;
    for (size_t i = 0; i < ncands; i++)
        tf_candidate(seed, i, nx, ny, &f->cands[i]);
    f->products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE | HILAL_PROD_BACKGROUND |
                  HILAL_PROD_STARS | HILAL_PROD_ALIGNED | HILAL_PROD_PSF | HILAL_PROD_FLUXSCALE |
                  HILAL_PROD_DIFFERENCE | HILAL_PROD_CANDIDATES | HILAL_PROD_MEASURED |
                  HILAL_PROD_VETTED;
    return 0;
}

/* Whether an archived row holds candidate i of frame `seed` (all fields,
 * with the EDGE flag added when the S x S stamp is truncated). */
static inline int tf_row_matches(const hilal_archive_cand *r, unsigned seed, size_t i, long nx,
                                 long ny, int S, char *why, size_t len)
{
    hilal_candidate c;
    int h = S / 2;
    tf_candidate(seed, i, nx, ny, &c);
    long cx = (long)floor(c.x - 0.5), cy = (long)floor(c.y - 0.5);
    int edge = cx - h < 0 || cy - h < 0 || cx + h >= nx || cy + h >= ny;
    uint32_t flags = c.flags | (edge ? (uint32_t)HILAL_CAND_EDGE : 0u);
#define TF_EQ(field)                                                                          \
    if (!(r->field == c.field)) {                                                             \
        snprintf(why, len, "%s: %.17g != %.17g", #field, (double)r->field, (double)c.field); \
        return 0;                                                                             \
    }
    TF_EQ(x) TF_EQ(y) TF_EQ(ra) TF_EQ(dec) TF_EQ(snr) TF_EQ(flux) TF_EQ(flux_err) TF_EQ(mag)
    TF_EQ(mag_err) TF_EQ(fwhm) TF_EQ(elongation) TF_EQ(rb) TF_EQ(mjd) TF_EQ(sharpness)
    TF_EQ(neg_frac) TF_EQ(dipole) TF_EQ(dist_sat_px) TF_EQ(dist_mask_px) TF_EQ(masked_frac)
#undef TF_EQ
    if (r->flags != flags) {
        snprintf(why, len, "flags %u != %u", (unsigned)r->flags, (unsigned)flags);
        return 0;
    }
    if (r->stamp_x0 != cx - h + 1 || r->stamp_y0 != cy - h + 1) {
        snprintf(why, len, "stamp origin (%d, %d) != (%ld, %ld)", (int)r->stamp_x0,
                 (int)r->stamp_y0, cx - h + 1, cy - h + 1);
        return 0;
    }
    return 1;
}

/* Whether a cutout holds the planes of frame `seed` around the row. */
static inline int tf_cutout_matches(const hilal_archive_cutout *cut, const hilal_archive_cand *r,
                                    unsigned seed, long nx, long ny, char *why, size_t len)
{
    int S = cut->size;
    for (int j = 0; j < S; j++)
        for (int i = 0; i < S; i++) {
            long x = r->stamp_x0 - 1 + i, y = r->stamp_y0 - 1 + j;
            size_t k = (size_t)j * (size_t)S + (size_t)i;
            int in = x >= 0 && y >= 0 && x < nx && y < ny;
            float want[5] = {tf_sci(seed, x, y, nx), tf_ref(seed, x, y, nx),
                             tf_diff(seed, x, y, nx), tf_scorr(seed, x, y), tf_var(seed, x, y)};
            for (int p = 0; p < 5; p++) {
                float got = cut->plane[p][k];
                if (in ? got != want[p] : !isnan(got)) {
                    snprintf(why, len, "plane %d pixel (%d, %d) = %g, expected %g", p, i, j,
                             (double)got, in ? (double)want[p] : NAN);
                    return 0;
                }
            }
            uint16_t m = in ? tf_mask(x, y) : (HILAL_MASK_NODATA | HILAL_MASK_EDGE);
            if (cut->mask[k] != m) {
                snprintf(why, len, "mask pixel (%d, %d) = %u, expected %u", i, j,
                         (unsigned)cut->mask[k], (unsigned)m);
                return 0;
            }
        }
    return 1;
}

/* The python3 that the interoperability checks run: $HILAL_PYTHON when
 * set, else the first of /usr/bin/python3 and python3 that imports
 * `modules` (e.g. "h5py" or "h5py, astropy.table"); NULL when none does. */
static inline const char *tf_find_python(const char *modules)
{
    static const char *const candidates[] = {"/usr/bin/python3", "python3"};
    const char *env = getenv("HILAL_PYTHON");
    if (env != NULL && *env)
        return env;
    for (size_t i = 0; i < 2; i++) {
        char cmd[512];
        snprintf(cmd, sizeof cmd, "%s -c 'import %s' >/dev/null 2>&1", candidates[i], modules);
        if (system(cmd) == 0)
            return candidates[i];
    }
    return NULL;
}

#endif
