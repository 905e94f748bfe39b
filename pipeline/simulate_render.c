/* Frame simulator: random numbers, PSF and galaxy profiles, detector noise. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "simulate_internal.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* ======================================================================= */
/* Random numbers                                                          */
/* ======================================================================= */

#define GOLDEN 0x9E3779B97F4A7C15ull

/* splitmix64 finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mix. */
uint64_t sim_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t sim_stream_key(uint64_t seed, int stream)
{
    return sim_mix64(sim_mix64(seed + GOLDEN) ^ sim_mix64((uint64_t)stream * 0xD6E8FEB86659FD93ull));
}

void sim_rng_seed(sim_rng *r, uint64_t seed, int stream)
{
    /* splitmix64 sequence from the stream key fills the xoshiro state; it
     * cannot produce the all-zero state. */
    uint64_t x = sim_stream_key(seed, stream);
    for (int i = 0; i < 4; i++) {
        x += GOLDEN;
        r->s[i] = sim_mix64(x);
    }
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256** 1.0 (Blackman & Vigna 2018). */
uint64_t sim_rng_next(sim_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* 53 random bits centred in their interval: never exactly 0 or 1. */
static double u53(uint64_t x) { return ((double)(x >> 11) + 0.5) * 0x1.0p-53; }

double sim_rng_uniform(sim_rng *r) { return u53(sim_rng_next(r)); }

double sim_rng_normal(sim_rng *r)
{
    /* Box-Muller; the second deviate is discarded so that every call uses
     * exactly two draws (keeps streams easy to reason about). */
    double u1 = sim_rng_uniform(r), u2 = sim_rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

/* Per-pixel generator: pixel i of a keyed stream starts from an independent
 * 64-bit point mix64(key ^ i * C) and steps by the golden ratio (splitmix64).
 * A pixel's draws depend only on (key, i), so images can be filled by any
 * number of threads in any order and two simulations that differ only in a
 * few pixels share the noise of all the others. */
typedef struct pix_rng {
    uint64_t s;
} pix_rng;

static void pix_rng_init(pix_rng *r, uint64_t key, uint64_t i)
{
    r->s = sim_mix64(key ^ (i * 0xD1B54A32D192ED03ull));
}

static double pix_uniform(pix_rng *r)
{
    r->s += GOLDEN;
    return u53(sim_mix64(r->s));
}

/* Two independent N(0, 1) deviates by Marsaglia's polar method (Marsaglia &
 * Bray 1964): a point uniform in the unit disc, radius transformed. The
 * rejection loop only consumes more of the pixel's own draws. */
static void pix_normal2(pix_rng *r, double *z1, double *z2)
{
    double u, v, s;
    do {
        u = 2.0 * pix_uniform(r) - 1.0;
        v = 2.0 * pix_uniform(r) - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    double f = sqrt(-2.0 * log(s) / s);
    *z1 = u * f;
    *z2 = v * f;
}

double sim_pixel_normal(uint64_t key, uint64_t i)
{
    pix_rng r;
    double z1, z2;
    pix_rng_init(&r, key, i);
    pix_normal2(&r, &z1, &z2);
    return z1;
}

/* ======================================================================= */
/* PSF                                                                     */
/* ======================================================================= */

void sim_stamp_clear(sim_stamp *st)
{
    if (st == NULL)
        return;
    free(st->v);
    memset(st, 0, sizeof *st);
}

static hilal_status stamp_alloc(sim_stamp *st, int w, hilal_error *err)
{
    size_t n = (size_t)w * (size_t)w;
    if (n > st->cap) {
        double *v = realloc(st->v, n * sizeof *v);
        if (v == NULL)
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a %d x %d stamp", w, w);
        st->v = v;
        st->cap = n;
    }
    st->w = w;
    memset(st->v, 0, n * sizeof *st->v);
    return HILAL_OK;
}

double sim_psf_fwhm(const sim_psf *p, double x, double y)
{
    /* Normalised field coordinates u in [-1, 1] from the centre to the
     * edges; FWHM(u) = FWHM0 (1 + f (l/2 + r2/2)) with l the coordinate along
     * the frame's variation axis (linear term) and r2 = (ux^2 + uy^2)/2 in
     * [0, 1] (quadratic term). The FWHM ranges over [1 - f/4, 1 + f] FWHM0. */
    double ux = (x - 0.5 * (double)(p->nx - 1)) / (0.5 * (double)p->nx);
    double uy = (y - 0.5 * (double)(p->ny - 1)) / (0.5 * (double)p->ny);
    double l = p->vary_axis ? uy : ux;
    double r2 = 0.5 * (ux * ux + uy * uy);
    return p->fwhm0_px * (1.0 + p->vary_frac * (0.5 * l + 0.5 * r2));
}

/* Moffat alpha from the FWHM: FWHM = 2 alpha sqrt(2^(1/beta) - 1). */
static double moffat_alpha(double fwhm, double beta)
{
    return fwhm / (2.0 * sqrt(pow(2.0, 1.0 / beta) - 1.0));
}

int sim_psf_half(const sim_psf *p, double fwhm, double flux_adu)
{
    /* Semi-major axis stretch of an area-preserving ellipse with b/a = 1 - e. */
    double stretch = 1.0 / sqrt(1.0 - p->ellip);
    double r_enc, r_thr = 0.0, peak;
    if (p->model == HILAL_SIM_PSF_MOFFAT) {
        double a = moffat_alpha(fwhm, p->beta), b = p->beta;
        /* Flux outside R: (1 + R^2/a^2)^(1 - beta); 0.5% of it. */
        r_enc = a * sqrt(pow(0.005, 1.0 / (1.0 - b)) - 1.0);
        peak = fabs(flux_adu) * (b - 1.0) / (M_PI * a * a);
        if (peak > p->thresh_adu)
            r_thr = a * sqrt(pow(peak / p->thresh_adu, 1.0 / b) - 1.0);
    } else {
        double s = fwhm / (2.0 * sqrt(2.0 * log(2.0)));
        r_enc = s * sqrt(2.0 * log(200.0));
        peak = fabs(flux_adu) / (2.0 * M_PI * s * s);
        if (peak > p->thresh_adu)
            r_thr = s * sqrt(2.0 * log(peak / p->thresh_adu));
    }
    double r = stretch * fmax(r_enc, r_thr);
    int half = (int)ceil(r) + 1;
    if (half > 150)
        half = 150;
    return half;
}

/* Unnormalised profile at offset (dx, dy) from the centre. */
typedef struct psf_eval {
    hilal_sim_psf_model model;
    double beta, inv_scale2; /* 1/alpha^2 (Moffat) or 1/(2 sigma^2) (Gaussian) */
    double c, s, inv_qa2, inv_qb2;
    int beta3;
} psf_eval;

static void psf_eval_init(psf_eval *e, const sim_psf *p, double fwhm)
{
    e->model = p->model;
    e->beta = p->beta;
    e->beta3 = p->beta == 3.0;
    if (p->model == HILAL_SIM_PSF_MOFFAT) {
        double a = moffat_alpha(fwhm, p->beta);
        e->inv_scale2 = 1.0 / (a * a);
    } else {
        double s = fwhm / (2.0 * sqrt(2.0 * log(2.0)));
        e->inv_scale2 = 1.0 / (2.0 * s * s);
    }
    /* Elliptical radius: r^2 = u^2/qa^2 + v^2/qb^2 along the rotated axes,
     * qa = 1/sqrt(1-e), qb = sqrt(1-e) (qa qb = 1 keeps the area, so the
     * FWHM quoted is the geometric mean of the axes). */
    e->c = cos(p->pa_rad);
    e->s = sin(p->pa_rad);
    e->inv_qa2 = 1.0 - p->ellip;
    e->inv_qb2 = 1.0 / (1.0 - p->ellip);
}

static inline double psf_value(const psf_eval *e, double dx, double dy)
{
    double u = e->c * dx + e->s * dy, v = -e->s * dx + e->c * dy;
    double r2 = (u * u * e->inv_qa2 + v * v * e->inv_qb2) * e->inv_scale2;
    if (e->model == HILAL_SIM_PSF_MOFFAT) {
        if (e->beta3) {
            double t = 1.0 / (1.0 + r2);
            return t * t * t;
        }
        return exp(-e->beta * log1p(r2));
    }
    return exp(-r2);
}

hilal_status sim_psf_stamp(const sim_psf *p, double xc, double yc, int half, int integrate,
                           sim_stamp *st, hilal_error *err)
{
    int w = 2 * half + 1;
    hilal_status status = stamp_alloc(st, w, err);
    if (status != HILAL_OK)
        return status;
    double fwhm = sim_psf_fwhm(p, xc, yc);
    psf_eval e;
    psf_eval_init(&e, p, fwhm);
    long ix = lround(xc), iy = lround(yc);
    st->x0 = ix - half;
    st->y0 = iy - half;
    double sum = 0.0;
    for (int j = 0; j < w; j++) {
        double dy0 = (double)(st->y0 + j) - yc;
        for (int i = 0; i < w; i++) {
            double dx0 = (double)(st->x0 + i) - xc;
            double val;
            if (!integrate) {
                val = psf_value(&e, dx0, dy0);
            } else {
                /* Pixel integral by the midpoint rule on an n x n grid, n
                 * chosen by distance: the profile's curvature is large only
                 * in the core (5 x 5 within one FWHM keeps the integration
                 * error below 0.2% there, 3 x 3 to 2.5 FWHM, centre beyond). */
                double d = sqrt(dx0 * dx0 + dy0 * dy0);
                int n = d < fwhm + 0.75 ? 5 : d < 2.5 * fwhm ? 3 : 1;
                if (n == 1) {
                    val = psf_value(&e, dx0, dy0);
                } else {
                    double acc = 0.0, h = 1.0 / n;
                    for (int b = 0; b < n; b++) {
                        double dy = dy0 + (b + 0.5) * h - 0.5;
                        for (int a = 0; a < n; a++)
                            acc += psf_value(&e, dx0 + (a + 0.5) * h - 0.5, dy);
                    }
                    val = acc * h * h;
                }
            }
            st->v[j * w + i] = val;
            sum += val;
        }
    }
    /* Unit sum over the stamp: the flux given is what the pixels hold. */
    double inv = 1.0 / sum;
    for (int k = 0; k < w * w; k++)
        st->v[k] *= inv;
    return HILAL_OK;
}

void sim_stamp_add(const sim_stamp *st, double flux, float *img, long nx, long ny, long ylo,
                   long yhi)
{
    if (ylo < 0)
        ylo = 0;
    if (yhi > ny)
        yhi = ny;
    for (int j = 0; j < st->w; j++) {
        long y = st->y0 + j;
        if (y < ylo || y >= yhi)
            continue;
        for (int i = 0; i < st->w; i++) {
            long x = st->x0 + i;
            if (x < 0 || x >= nx)
                continue;
            img[y * nx + x] += (float)(flux * st->v[j * st->w + i]);
        }
    }
}

/* ======================================================================= */
/* Galaxies                                                                */
/* ======================================================================= */

/* b_n of the Sersic profile, so that R_e encloses half the light: the
 * asymptotic expansion of Ciotti & Bertin (1999, A&A 352, 447, eq. 18). */
static double sersic_b(double n)
{
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n) +
           131.0 / (1148175.0 * n * n * n);
}

hilal_status sim_galaxy_stamp(const sim_psf *p, const sim_gal_shape *g, double xc, double yc,
                              sim_stamp *out, sim_stamp *tmp, hilal_error *err)
{
    hilal_status status = HILAL_OK;
    sim_stamp kern = {0};
    /* 1. The intrinsic Sersic profile I(R) = exp(-b_n ((R/R_e)^(1/n) - 1))
     *    (Sersic 1963) with the elliptical radius R^2 = u^2 + (v/q)^2, u along
     *    the major axis, integrated over each pixel. The stamp reaches 5 R_e
     *    (at most 40 px); the truncated profile is normalised to unit sum. */
    int gh = (int)ceil(5.0 * g->reff_px) + 1;
    if (gh > 40)
        gh = 40;
    int gw = 2 * gh + 1;
    status = stamp_alloc(tmp, gw, err);
    if (status != HILAL_OK)
        goto cleanup;
    long ix = lround(xc), iy = lround(yc);
    tmp->x0 = ix - gh;
    tmp->y0 = iy - gh;
    double bn = sersic_b(g->n), c = cos(g->pa_rad), s = sin(g->pa_rad), sum = 0.0;
    for (int j = 0; j < gw; j++) {
        double dy0 = (double)(tmp->y0 + j) - yc;
        for (int i = 0; i < gw; i++) {
            double dx0 = (double)(tmp->x0 + i) - xc;
            double d = sqrt(dx0 * dx0 + dy0 * dy0);
            /* Cuspy centres (large n) need fine sub-sampling near R = 0. */
            int n = d < 2.0 ? 9 : d < 2.0 * g->reff_px + 1.0 ? 5 : d < 4.0 * g->reff_px ? 3 : 1;
            double acc = 0.0, h = 1.0 / n;
            for (int b = 0; b < n; b++) {
                double dy = dy0 + (b + 0.5) * h - 0.5;
                for (int a = 0; a < n; a++) {
                    double dx = dx0 + (a + 0.5) * h - 0.5;
                    double u = c * dx + s * dy, v = (-s * dx + c * dy) / g->q;
                    double r = sqrt(u * u + v * v) / g->reff_px;
                    acc += exp(-bn * (pow(r, 1.0 / g->n) - 1.0));
                }
            }
            tmp->v[j * gw + i] = acc * h * h;
            sum += acc * h * h;
        }
    }
    for (int k = 0; k < gw * gw; k++)
        tmp->v[k] /= sum;

    /* 2. Convolve with the PSF at the galaxy's position, sampled at pixel
     *    centres: the pixel-integrated galaxy convolved with the point-sampled
     *    PSF equals the pixel integral of (galaxy * PSF), without applying the
     *    pixel response twice. */
    double fwhm = sim_psf_fwhm(p, xc, yc);
    int kh = sim_psf_half(p, fwhm, 0.0);
    status = sim_psf_stamp(p, (double)ix, (double)iy, kh, 0, &kern, err);
    if (status != HILAL_OK)
        goto cleanup;
    int kw = 2 * kh + 1, ow = gw + 2 * kh;
    status = stamp_alloc(out, ow, err);
    if (status != HILAL_OK)
        goto cleanup;
    out->x0 = tmp->x0 - kh;
    out->y0 = tmp->y0 - kh;
    for (int j = 0; j < gw; j++) {
        for (int i = 0; i < gw; i++) {
            double gv = tmp->v[j * gw + i];
            if (gv == 0.0)
                continue;
            for (int b = 0; b < kw; b++) {
                double *row = out->v + (size_t)(j + b) * ow + i;
                const double *krow = kern.v + (size_t)b * kw;
                for (int a = 0; a < kw; a++)
                    row[a] += gv * krow[a];
            }
        }
    }
cleanup:
    sim_stamp_clear(&kern);
    return status;
}

/* ======================================================================= */
/* Detector noise                                                          */
/* ======================================================================= */

typedef struct noise_job {
    float *pix;
    long nx, ylo, yhi;
    double gain, rdnoise_adu;
    uint64_t key;
} noise_job;

/* Poisson deviate of mean lam from the pixel's draws. Below lam = 30 exact
 * inversion of the cumulative distribution with one uniform; above, the
 * normal approximation lam + sqrt(lam) z rounded to whole electrons (its
 * skewness 1/sqrt(lam) < 0.18 there). Both are monotonic in lam for fixed
 * draws, so a small change of the model changes the deviate smoothly. */
static double poisson_draw(double lam, double z, double u)
{
    if (!(lam > 0.0))
        return 0.0;
    if (lam >= 30.0) {
        double k = floor(lam + sqrt(lam) * z + 0.5);
        return k > 0.0 ? k : 0.0;
    }
    double p = exp(-lam), cdf = p;
    int k = 0;
    while (u > cdf && k < 1000) {
        k++;
        p *= lam / k;
        cdf += p;
    }
    return (double)k;
}

static void *noise_rows(void *arg)
{
    noise_job *job = arg;
    for (long y = job->ylo; y < job->yhi; y++) {
        for (long x = 0; x < job->nx; x++) {
            uint64_t i = (uint64_t)y * (uint64_t)job->nx + (uint64_t)x;
            pix_rng r;
            pix_rng_init(&r, job->key, i);
            /* Two normal deviates, one for the photon noise and one for the
             * read noise, then one uniform for the exact Poisson inversion
             * at low counts. */
            double z1, z2;
            pix_normal2(&r, &z1, &z2);
            double u3 = pix_uniform(&r);
            float *v = job->pix + i;
            double electrons = poisson_draw((double)*v * job->gain, z1, u3);
            *v = (float)(electrons / job->gain + job->rdnoise_adu * z2);
        }
    }
    return NULL;
}

hilal_status sim_noise_apply(float *pix, long nx, long ny, double gain_e_per_adu, double rdnoise_e,
                             uint64_t key, int nthreads, hilal_error *err)
{
    enum { MAXT = 16 };
    if (nthreads < 1)
        nthreads = 1;
    if (nthreads > MAXT)
        nthreads = MAXT;
    if (nthreads > ny)
        nthreads = (int)ny;
    noise_job jobs[MAXT];
    pthread_t tid[MAXT];
    int started[MAXT] = {0};
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = (noise_job){pix, nx, ny * t / nthreads, ny * (t + 1) / nthreads,
                              gain_e_per_adu, rdnoise_e / gain_e_per_adu, key};
    }
    /* Thread 0 is the caller; if a thread cannot start its rows run here. */
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&tid[t], NULL, noise_rows, &jobs[t]) == 0;
    noise_rows(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t])
            pthread_join(tid[t], NULL);
        else
            noise_rows(&jobs[t]);
    }
    (void)err;
    return HILAL_OK;
}

void sim_bleed(float *pix, long nx, long ny, double saturate_adu)
{
    const float sat = (float)saturate_adu;
    /* Columns holding any pixel above saturation. */
    unsigned char *hit = calloc((size_t)nx, 1);
    int any = 0;
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++)
            if (pix[y * nx + x] > sat) {
                if (hit != NULL)
                    hit[x] = 1;
                any = 1;
            }
    if (!any)
        goto cleanup;
    for (long x = 0; x < nx; x++) {
        if (hit != NULL && !hit[x])
            continue;
        /* Each saturated pixel keeps the full-well level and sends half of
         * its excess charge up the column and half down; the charge travels
         * through full pixels and fills the first ones with room. What
         * reaches the end of the column is lost (a serial register
         * would read it out, here it simply leaves). */
        double carry = 0.0;
        for (long y = 0; y < ny; y++) {
            float *v = pix + y * nx + x;
            if (*v > sat) {
                carry += 0.5 * ((double)*v - sat);
            } else if (carry > 0.0) {
                double take = fmin((double)sat - *v, carry);
                *v += (float)take;
                carry -= take;
            }
        }
        carry = 0.0;
        for (long y = ny - 1; y >= 0; y--) {
            float *v = pix + y * nx + x;
            if (*v > sat) {
                carry += 0.5 * ((double)*v - sat);
                *v = sat;
            } else if (carry > 0.0) {
                double take = fmin((double)sat - *v, carry);
                *v += (float)take;
                carry -= take;
            }
        }
    }
cleanup:
    free(hit);
}
