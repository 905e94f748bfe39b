/* Synthetic ZOGY products for the detect, measure and vet tests.
 *
 * A frame's difference is built the way ZOGY's products relate to each other
 * (Zackay, Ofek & Gal-Yam 2016): D is white unit-variance noise plus sources
 * A P_D(x - x0) (point sources, exactly sub-pixel shifted analytic profiles
 * integrated over the pixel) or single-pixel spikes (cosmic rays); then
 *   S      = D cross-correlated with P_D (eq. 17 with F_D = 1),
 *   S_corr = S / sqrt(sum P_D^2)            (unit variance for white D),
 *   flux   = flux_scale S / sum P_D^2        (the PSF-photometry estimate),
 *   flux_err = flux_scale / sqrt(sum P_D^2).
 * A source of amplitude A then has S_corr = A sqrt(sum P_D^2) at its centre
 * and flux = flux_scale A. Header-only, static functions.
 */
#ifndef HILAL_TEST_DETECT_SYNTH_H
#define HILAL_TEST_DETECT_SYNTH_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/hilal.h"
#include "synth_rng.h"

#define SYNTH_UNUSED __attribute__((unused))
#define SYNTH_PI 3.14159265358979323846

/* ---- random numbers: synth_rng, synth_uniform, synth_gauss (synth_rng.h) */

/* ---- PSF models --------------------------------------------------------- */
typedef struct synth_model {
    int moffat;          /* 0: elliptical Gaussian, 1: circular Moffat */
    double sx, sy, theta;/* Gaussian sigmas (px) and angle of sx from +x (rad) */
    double alpha, beta;  /* Moffat */
} synth_model;

static SYNTH_UNUSED synth_model synth_gaussian(double sigma)
{
    synth_model m = {0, sigma, sigma, 0, 0, 0};
    return m;
}

static SYNTH_UNUSED double synth_model_fwhm(const synth_model *m)
{
    if (m->moffat)
        return 2.0 * m->alpha * sqrt(pow(2.0, 1.0 / m->beta) - 1.0);
    return 2.3548200450309493 * sqrt(m->sx * m->sy);
}

/* Unnormalised profile at offset (dx, dy). */
static SYNTH_UNUSED double synth_profile(const synth_model *m, double dx, double dy)
{
    if (m->moffat) {
        double r2 = (dx * dx + dy * dy) / (m->alpha * m->alpha);
        return pow(1.0 + r2, -m->beta);
    }
    double c = cos(m->theta), s = sin(m->theta);
    double u = c * dx + s * dy, v = -s * dx + c * dy;
    return exp(-0.5 * (u * u / (m->sx * m->sx) + v * v / (m->sy * m->sy)));
}

/* Normalisation of the profile (its integral over the plane). */
static SYNTH_UNUSED double synth_norm(const synth_model *m)
{
    if (m->moffat)
        return SYNTH_PI * m->alpha * m->alpha / (m->beta - 1.0);
    return 2.0 * SYNTH_PI * m->sx * m->sy;
}

/* Profile integrated over the pixel centred at offset (dx, dy), normalised
 * to unit total flux (7x7 sub-samples). */
static SYNTH_UNUSED double synth_pixel(const synth_model *m, double dx, double dy)
{
    double sum = 0;
    for (int j = 0; j < 7; j++)
        for (int i = 0; i < 7; i++)
            sum += synth_profile(m, dx + (i - 3) / 7.0, dy + (j - 3) / 7.0);
    return sum / 49.0 / synth_norm(m);
}

/* P_D sampled on a size x size grid centred on the central pixel, renormalised
 * to sum 1. */
static SYNTH_UNUSED void synth_psf(hilal_psf *psf, const synth_model *m, int size)
{
    psf->size = size;
    psf->data = malloc((size_t)size * size * sizeof *psf->data);
    double sum = 0;
    for (int y = 0; y < size; y++)
        for (int x = 0; x < size; x++)
            sum += psf->data[y * size + x] =
                (float)synth_pixel(m, x - size / 2, y - size / 2);
    for (int i = 0; i < size * size; i++)
        psf->data[i] = (float)(psf->data[i] / sum);
    psf->fwhm_px = synth_model_fwhm(m);
    psf->nstars = 0;
}

static SYNTH_UNUSED double synth_psf_sum2(const hilal_psf *psf)
{
    double s = 0;
    for (int i = 0; i < psf->size * psf->size; i++)
        s += (double)psf->data[i] * psf->data[i];
    return s;
}

/* ---- the frame ---------------------------------------------------------- */

/* A frame with SCIENCE (nx x ny, zero pixels, metadata unknown) and a
 * DIFFERENCE whose D holds unit Gaussian noise (noise = 0: none), P_D from
 * the model, an all-zero mask. Sources are added to D with synth_add_*();
 * synth_finish() then computes S, S_corr, flux and flux_err. */
static SYNTH_UNUSED void synth_frame(hilal_frame *f, long nx, long ny, const synth_model *m,
                                     int psf_size, uint64_t seed, double noise)
{
    hilal_error err = {0};
    hilal_frame_init(f);
    snprintf(f->frame_id, sizeof f->frame_id, "synth-%llu", (unsigned long long)seed);
    f->sci = hilal_image_new(nx, ny, &err);
    f->products = HILAL_PROD_SCIENCE;
    hilal_diff *d = &f->diff;
    d->nx = nx;
    d->ny = ny;
    size_t n = (size_t)nx * (size_t)ny;
    d->d = malloc(n * sizeof *d->d);
    d->mask = calloc(n, sizeof *d->mask);
    synth_rng r = {seed, 0, 0};
    for (size_t i = 0; i < n; i++)
        d->d[i] = (float)(noise * synth_gauss(&r));
    synth_psf(&d->psf_d, m, psf_size);
    d->f_d = 1.0;
}

/* Adds a point source of amplitude amp (so its S_corr peak is
 * amp sqrt(sum P_D^2)) at the 0-based position (x0, y0). */
static SYNTH_UNUSED void synth_add_point(hilal_frame *f, const synth_model *m, double x0,
                                         double y0, double amp)
{
    hilal_diff *d = &f->diff;
    const long r = 16;
    long ix = (long)floor(x0 + 0.5), iy = (long)floor(y0 + 0.5);
    for (long y = iy - r; y <= iy + r; y++)
        for (long x = ix - r; x <= ix + r; x++) {
            if (x < 0 || y < 0 || x >= d->nx || y >= d->ny)
                continue;
            d->d[y * d->nx + x] += (float)(amp * synth_pixel(m, x - x0, y - y0));
        }
}

static SYNTH_UNUSED void synth_add_pixel(hilal_frame *f, long x, long y, double amp)
{
    f->diff.d[y * f->diff.nx + x] += (float)amp;
}

/* Amplitude giving an S_corr peak of snr for a centred source. */
static SYNTH_UNUSED double synth_amp(const hilal_frame *f, double snr)
{
    return snr / sqrt(synth_psf_sum2(&f->diff.psf_d));
}

/* Computes S, S_corr, flux (flux_scale ADU per unit amplitude) and flux_err
 * from D, and marks the DIFFERENCE product. */
static SYNTH_UNUSED void synth_finish(hilal_frame *f, double flux_scale)
{
    hilal_diff *d = &f->diff;
    const long nx = d->nx, ny = d->ny;
    const int size = d->psf_d.size, c = size / 2;
    const float *p = d->psf_d.data;
    size_t n = (size_t)nx * (size_t)ny;
    d->s = malloc(n * sizeof *d->s);
    d->scorr = malloc(n * sizeof *d->scorr);
    d->flux = malloc(n * sizeof *d->flux);
    d->flux_err = malloc(n * sizeof *d->flux_err);
    const double s2 = synth_psf_sum2(&d->psf_d);
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            double acc = 0;
            for (int j = 0; j < size; j++) {
                long yy = y + j - c;
                if (yy < 0 || yy >= ny)
                    continue;
                const float *row = d->d + yy * nx;
                const float *prow = p + j * size;
                for (int i = 0; i < size; i++) {
                    long xx = x + i - c;
                    if (xx < 0 || xx >= nx)
                        continue;
                    acc += (double)prow[i] * row[xx];
                }
            }
            size_t k = (size_t)y * nx + x;
            d->s[k] = (float)acc;
            d->scorr[k] = (float)(acc / sqrt(s2));
            d->flux[k] = (float)(flux_scale * acc / s2);
            d->flux_err[k] = (float)(flux_scale / sqrt(s2));
        }
    d->scorr_mean = 0;
    d->scorr_std = 1;
    f->products |= HILAL_PROD_DIFFERENCE;
}

/* The candidate closest to the FITS position (x, y) within tol px, or NULL. */
static SYNTH_UNUSED const hilal_candidate *synth_match(const hilal_frame *f, double x, double y,
                                                        double tol)
{
    const hilal_candidate *best = NULL;
    double bd = tol * tol;
    for (size_t k = 0; k < f->ncands; k++) {
        double dx = f->cands[k].x - x, dy = f->cands[k].y - y;
        if (dx * dx + dy * dy <= bd) {
            bd = dx * dx + dy * dy;
            best = &f->cands[k];
        }
    }
    return best;
}

#endif
