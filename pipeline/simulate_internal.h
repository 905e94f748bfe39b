/* Private pieces of the frame simulator shared by simulate.c (the model and
 * its bookkeeping), simulate_render.c (random numbers, PSF and galaxy
 * profiles, noise) and simulate_write.c (FITS headers and files, CSV).
 * Pixel coordinates here are 0-based C coordinates (pixel (i, j) covers
 * [i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]) unless a name says "fits". */
#ifndef HILAL_SIMULATE_INTERNAL_H
#define HILAL_SIMULATE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/simulate.h"

/* ---- random numbers ---------------------------------------------------- */

/* xoshiro256** (Blackman & Vigna 2018), seeded through splitmix64. */
typedef struct sim_rng {
    uint64_t s[4];
} sim_rng;

/* Independent streams of one seed, so that changing one kind of content
 * (e.g. the number of cosmic rays) leaves every other draw unchanged. */
enum sim_stream {
    SIM_STREAM_SKY = 1,
    SIM_STREAM_STARS = 2,
    SIM_STREAM_GALAXIES = 3,
    SIM_STREAM_TRANSIENTS = 4,
    SIM_STREAM_VARIABLES = 5,
    SIM_STREAM_COSMICS = 6,
    SIM_STREAM_BADCOLS = 7,
    SIM_STREAM_NOISE_REF = 8,
    SIM_STREAM_NOISE_SCI = 9,
    SIM_STREAM_NOISE_BADCOL = 10
};

uint64_t sim_mix64(uint64_t z);
/* Key of a stream of a seed: input of the per-pixel generators. */
uint64_t sim_stream_key(uint64_t seed, int stream);
void sim_rng_seed(sim_rng *r, uint64_t seed, int stream);
uint64_t sim_rng_next(sim_rng *r);
double sim_rng_uniform(sim_rng *r);   /* in (0, 1) */
double sim_rng_normal(sim_rng *r);    /* N(0, 1) */

/* ---- PSF --------------------------------------------------------------- */

typedef struct sim_psf {
    hilal_sim_psf_model model;
    double beta;          /* Moffat beta */
    double fwhm0_px;      /* FWHM at the field centre */
    double vary_frac;     /* see hilal_sim_fwhm_px */
    int vary_axis;        /* 0: linear term along x, 1: along y */
    double ellip;         /* 1 - b/a */
    double pa_rad;        /* major axis angle from +x */
    long nx, ny;
    double thresh_adu;    /* profile wings below this (ADU/px) may be cut */
} sim_psf;

/* A small image around a source: w x w values, v[j * w + i] belongs to the
 * C pixel (x0 + i, y0 + j). */
typedef struct sim_stamp {
    long x0, y0;
    int w;
    double *v;
    size_t cap;
} sim_stamp;

void sim_stamp_clear(sim_stamp *st);

/* FWHM at C position (x, y). */
double sim_psf_fwhm(const sim_psf *p, double x, double y);

/* Half width (px) of the stamp of a source of flux_adu with this FWHM: it
 * encloses 99.5% of the flux and reaches where the wings fall below
 * thresh_adu. */
int sim_psf_half(const sim_psf *p, double fwhm_px, double flux_adu);

/* The PSF at C position (xc, yc), normalised to unit sum over the stamp.
 * integrate = 1 integrates over each pixel (sub-pixel sampling), 0 samples
 * pixel centres (used as a convolution kernel). */
hilal_status sim_psf_stamp(const sim_psf *p, double xc, double yc, int half, int integrate,
                           sim_stamp *st, hilal_error *err);

/* Sersic galaxy shape in a frame's pixel axes. */
typedef struct sim_gal_shape {
    double n;             /* Sersic index */
    double reff_px;       /* half-light radius along the major axis */
    double q;             /* axis ratio b/a */
    double pa_rad;        /* major axis angle from +x of this frame */
} sim_gal_shape;

/* The galaxy at C position (xc, yc), convolved with the PSF of the frame at
 * that position, normalised to unit sum. tmp is scratch. */
hilal_status sim_galaxy_stamp(const sim_psf *p, const sim_gal_shape *g, double xc, double yc,
                              sim_stamp *out, sim_stamp *tmp, hilal_error *err);

/* img[rows ylo..yhi-1] += flux * stamp (clipped to the image). */
void sim_stamp_add(const sim_stamp *st, double flux, float *img, long nx, long ny, long ylo,
                   long yhi);

/* ---- noise and detector ------------------------------------------------ */

/* Replaces the noise-free model (ADU) by a realisation: Poisson electrons
 * (gain_e_per_adu) plus Gaussian read noise (rdnoise_e), in ADU. The draws of
 * pixel i come from a generator keyed by (key, i) only. */
hilal_status sim_noise_apply(float *pix, long nx, long ny, double gain_e_per_adu, double rdnoise_e,
                             uint64_t key, int nthreads, hilal_error *err);

/* Charge above saturate_adu moves up and down its column into unsaturated
 * pixels (half each way; what leaves the chip is lost). */
void sim_bleed(float *pix, long nx, long ny, double saturate_adu);

/* Gaussian deviate of pixel i of a keyed per-pixel generator. */
double sim_pixel_normal(uint64_t key, uint64_t i);

/* ---- files ------------------------------------------------------------- */

/* What goes into a frame's FITS header. */
typedef struct sim_header {
    const char *frame;            /* "reference" or "science" */
    long nx, ny;
    int bitpix;
    double crval[2], crpix[2], cd[2][2];
    double gain_e_per_adu, rdnoise_e, saturate_adu, exptime_s, mjd, zeropoint_mag;
    double sky_adu, fwhm_px, depth, flux_ratio;
    const hilal_sim_options *o;
} sim_header;

/* The header as 80-character cards (built in memory by the FITS writer,
 * with the keys sim_write_fits writes). *cards is malloc'd, NUL-terminated. */
hilal_status sim_header_cards(const sim_header *h, char **cards, int *ncards, hilal_error *err);

/* Writes pix (nx x ny) with the header to path, replacing it once the new
 * file is complete; CHECKSUM/DATASUM carry fixed comments, so the bytes
 * depend on the options alone. */
hilal_status sim_write_fits(const char *path, const sim_header *h, const float *pix,
                            hilal_error *err);

/* The command line that reproduces the options (for README.txt). */
void sim_options_cmdline(const hilal_sim_options *o, char *buf, size_t len);

/* The headers of the two frames (filled by simulate.c from the options). */
void sim_make_headers(const hilal_sim_options *o, const hilal_sim_truth *t, sim_header *ref,
                      sim_header *sci);

#endif
