/* ZOGY subtraction on simulated pairs with known PSFs, sky, variance and
 * flux ratio: S_corr statistics on source-free pixels, recovery of injected
 * transients in the flux image (science ADU, F_n != 1), edges, masks and
 * NaNs, bad variance, astrometric noise, the workspace (reused and shared
 * between threads: identical products), error paths and the stage
 * descriptor (FFTW wisdom saved, a damaged wisdom file only warned about).
 * The simulation is self-contained (no other stage is used). */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "hilal/log.h"
#include "hilal/zogy.h"
#include "synth_rng.h"
#include "testutil.h"

/* ------------------------------------------------------------------------
 * Random numbers: Poisson deviates (uniform and normal ones from synth_rng.h)
 * ------------------------------------------------------------------------ */

/* Poisson deviate: multiplication method for small means, Hormann's
 * transformed rejection (PTRS, 1993) for large ones. */
static double rng_poisson(synth_rng *r, double lam)
{
    if (lam <= 0)
        return 0;
    if (lam < 10) {
        double l = exp(-lam), p = 1;
        int k = 0;
        do {
            k++;
            p *= synth_uniform(r);
        } while (p > l);
        return k - 1;
    }
    double slam = sqrt(lam), loglam = log(lam);
    double b = 0.931 + 2.53 * slam, a = -0.059 + 0.02483 * b;
    double invalpha = 1.1239 + 1.1328 / (b - 3.4), vr = 0.9277 - 3.6224 / (b - 2);
    for (;;) {
        double u = synth_uniform(r) - 0.5, v = synth_uniform(r);
        double us = 0.5 - fabs(u);
        double k = floor((2 * a / us + b) * u + lam + 0.43);
        if (us >= 0.07 && v <= vr)
            return k;
        if (k < 0 || (us < 0.013 && v > us))
            continue;
        if (log(v) + log(invalpha) - log(a / (us * us) + b) <= -lam + k * loglam - lgamma(k + 1))
            return k;
    }
}

/* ------------------------------------------------------------------------
 * PSF models, pixel-integrated (3 x 3 sub-samples per pixel)
 * ------------------------------------------------------------------------ */

typedef struct model_psf {
    int moffat;     /* 0 Gaussian, 1 Moffat */
    double fwhm_px;
    double beta;    /* Moffat index */
} model_psf;

#define STAMP 25 /* stamp side, px */

static double profile(const model_psf *p, double dx, double dy)
{
    double r2 = dx * dx + dy * dy;
    if (!p->moffat) {
        double s = p->fwhm_px / 2.354820045;
        return exp(-0.5 * r2 / (s * s));
    }
    double alpha = p->fwhm_px / (2 * sqrt(pow(2.0, 1.0 / p->beta) - 1));
    return pow(1 + r2 / (alpha * alpha), -p->beta);
}

/* A STAMP x STAMP stamp of the PSF centred at (c + dx, c + dy), c the central
 * pixel, normalised to sum 1. */
static void render_stamp(const model_psf *p, double dx, double dy, double *out)
{
    const int c = STAMP / 2;
    double sum = 0;
    for (int j = 0; j < STAMP; j++)
        for (int i = 0; i < STAMP; i++) {
            double v = 0;
            for (int sj = -1; sj <= 1; sj++)
                for (int si = -1; si <= 1; si++)
                    v += profile(p, i - c - dx + si / 3.0, j - c - dy + sj / 3.0);
            out[j * STAMP + i] = v;
            sum += v;
        }
    for (int i = 0; i < STAMP * STAMP; i++)
        out[i] /= sum;
}

static void make_psf(const model_psf *p, hilal_psf *out)
{
    double st[STAMP * STAMP];
    render_stamp(p, 0, 0, st);
    out->size = STAMP;
    out->data = malloc(sizeof *out->data * STAMP * STAMP);
    for (int i = 0; i < STAMP * STAMP; i++)
        out->data[i] = (float)st[i];
    out->fwhm_px = p->fwhm_px;
    out->nstars = 0;
}

/* Adds flux * PSF centred at (x, y) (0-based) to a model image. */
static void add_source(double *img, long n, const model_psf *p, double x, double y, double flux)
{
    double st[STAMP * STAMP];
    long ix = lround(x), iy = lround(y);
    render_stamp(p, x - ix, y - iy, st);
    const int c = STAMP / 2;
    for (int j = 0; j < STAMP; j++) {
        long yy = iy + j - c;
        if (yy < 0 || yy >= n)
            continue;
        for (int i = 0; i < STAMP; i++) {
            long xx = ix + i - c;
            if (xx >= 0 && xx < n)
                img[yy * n + xx] += flux * st[j * STAMP + i];
        }
    }
}

/* ------------------------------------------------------------------------
 * A simulated pair
 * ------------------------------------------------------------------------ */

typedef struct sim_cfg {
    long n;
    model_psf psf_n, psf_r;
    double fn;                      /* science flux / reference flux */
    double sky_n, gain_n, rn_n;     /* ADU, e-/ADU, e- */
    double sky_r, gain_r, rn_r;
    int nstars;
    int ntrans;
    double tflux_min, tflux_max;    /* transient fluxes, science ADU (log-uniform) */
    int trans_margin;               /* keep transients this far from the edges */
    double ref_dx, ref_dy;          /* shift of the reference stars, px */
    uint64_t seed;
} sim_cfg;

#define MAXSRC 1024

typedef struct sim {
    sim_cfg cfg;
    hilal_image *sci, *ref;
    hilal_psf psf_n, psf_r;
    int nstars, ntrans;
    double sx[MAXSRC], sy[MAXSRC], sflux[MAXSRC];   /* stars: sci position, sci flux */
    long tx[MAXSRC], ty[MAXSRC];                    /* transients at pixel centres */
    double tflux[MAXSRC];                           /* science ADU */
    unsigned char *srcfree;                         /* 1 = far from every source */
} sim;

static void sim_free(sim *s)
{
    hilal_image_free(s->sci);
    hilal_image_free(s->ref);
    hilal_psf_clear(&s->psf_n);
    hilal_psf_clear(&s->psf_r);
    free(s->srcfree);
    memset(s, 0, sizeof *s);
}

/* Adds a transient at pixel (x, y) to the list. */
static void sim_add_transient(sim *s, long x, long y, double flux)
{
    s->tx[s->ntrans] = x;
    s->ty[s->ntrans] = y;
    s->tflux[s->ntrans] = flux;
    s->ntrans++;
}

/* Draws star and transient positions (transients at pixel centres, at least
 * 10 px from stars and 14 px from each other). */
static void sim_place(sim *s, synth_rng *r)
{
    const sim_cfg *c = &s->cfg;
    s->nstars = c->nstars;
    for (int k = 0; k < c->nstars; k++) {
        s->sx[k] = -8 + (c->n + 16) * synth_uniform(r);
        s->sy[k] = -8 + (c->n + 16) * synth_uniform(r);
        /* power-law fluxes between 300 and 1e5 science ADU */
        s->sflux[k] = 300 * pow(1e5 / 300, pow(synth_uniform(r), 2.0));
    }
    int tries = 0;
    while (s->ntrans < c->ntrans && tries++ < 100000) {
        long x = c->trans_margin + (long)((c->n - 2 * c->trans_margin) * synth_uniform(r));
        long y = c->trans_margin + (long)((c->n - 2 * c->trans_margin) * synth_uniform(r));
        int ok = 1;
        for (int k = 0; k < s->nstars && ok; k++)
            if (hypot(s->sx[k] - x, s->sy[k] - y) < 10)
                ok = 0;
        for (int k = 0; k < s->ntrans && ok; k++)
            if (hypot((double)(s->tx[k] - x), (double)(s->ty[k] - y)) < 14)
                ok = 0;
        if (ok)
            sim_add_transient(s, x, y,
                              c->tflux_min * pow(c->tflux_max / c->tflux_min, synth_uniform(r)));
    }
}

/* Renders both images from the source lists: sky + sources, Poisson noise
 * in electrons plus Gaussian read noise, the exact model variance as the
 * variance plane, the known sky as the sky plane and its RMS. */
static void sim_render(sim *s, synth_rng *r)
{
    const sim_cfg *c = &s->cfg;
    const long n = c->n;
    hilal_error err = {0};
    double *mn = calloc((size_t)(n * n), sizeof *mn), *mr = calloc((size_t)(n * n), sizeof *mr);
    for (int k = 0; k < s->nstars; k++) {
        add_source(mn, n, &c->psf_n, s->sx[k], s->sy[k], s->sflux[k]);
        add_source(mr, n, &c->psf_r, s->sx[k] + c->ref_dx, s->sy[k] + c->ref_dy, s->sflux[k] / c->fn);
    }
    for (int k = 0; k < s->ntrans; k++)
        add_source(mn, n, &c->psf_n, (double)s->tx[k], (double)s->ty[k], s->tflux[k]);
    for (int w = 0; w < 2; w++) {
        double sky = w ? c->sky_r : c->sky_n, gain = w ? c->gain_r : c->gain_n;
        double rn = w ? c->rn_r : c->rn_n;
        double *m = w ? mr : mn;
        hilal_image *img = hilal_image_new(n, n, &err);
        hilal_image_alloc_var(img, &err);
        hilal_image_alloc_sky(img, &err);
        for (long i = 0; i < n * n; i++) {
            double lam_e = (sky + m[i]) * gain;
            double e = rng_poisson(r, lam_e) + rn * synth_gauss(r);
            img->pix[i] = (float)(e / gain);
            img->var[i] = (float)((lam_e + rn * rn) / (gain * gain));
            img->sky[i] = (float)sky;
        }
        img->sky_rms_adu = sqrt(sky * gain + rn * rn) / gain;
        if (w)
            s->ref = img;
        else
            s->sci = img;
    }
    make_psf(&c->psf_n, &s->psf_n);
    make_psf(&c->psf_r, &s->psf_r);
    /* source-free pixels: 12 px from every star (within or just outside the
     * image) and 18 px from every transient (the brightest reach S/N ~ 300) */
    s->srcfree = malloc((size_t)(n * n));
    memset(s->srcfree, 1, (size_t)(n * n));
    for (int k = 0; k < s->nstars + s->ntrans; k++) {
        double x = k < s->nstars ? s->sx[k] : (double)s->tx[k - s->nstars];
        double y = k < s->nstars ? s->sy[k] : (double)s->ty[k - s->nstars];
        long rad = k < s->nstars ? 12 : 18;
        for (long yy = lround(y) - rad; yy <= lround(y) + rad; yy++)
            for (long xx = lround(x) - rad; xx <= lround(x) + rad; xx++)
                if (xx >= 0 && yy >= 0 && xx < n && yy < n && hypot(xx - x, yy - y) <= rad)
                    s->srcfree[yy * n + xx] = 0;
    }
    free(mn);
    free(mr);
}

static void sim_make(sim *s, const sim_cfg *cfg)
{
    memset(s, 0, sizeof *s);
    s->cfg = *cfg;
    synth_rng r = {cfg->seed, 0, 0};
    sim_place(s, &r);
    sim_render(s, &r);
}

static hilal_status run_zogy(const sim *s, double reg_x, double reg_y, hilal_diff *diff,
                             hilal_zogy_info *info, hilal_error *err)
{
    hilal_zogy_input in;
    hilal_zogy_input_init(&in);
    in.sci = s->sci;
    in.ref = s->ref;
    in.sci_psf = &s->psf_n;
    in.ref_psf = &s->psf_r;
    in.flux_ratio = s->cfg.fn;
    in.reg_rms_x_px = reg_x;
    in.reg_rms_y_px = reg_y;
    in.threads = 2;
    return hilal_zogy_run(&in, diff, info, err);
}

/* Mean and standard deviation of v over pixels where sel(i) holds. */
typedef struct moments {
    double mean, std;
    long n;
} moments;

static moments stats_where(const float *v, const unsigned char *sel, const hilal_mask_t *mask,
                           long n, int border, long nx)
{
    double s = 0, s2 = 0;
    long m = 0;
    for (long i = 0; i < n; i++) {
        if (sel != NULL && !sel[i])
            continue;
        if (mask != NULL && (mask[i] & HILAL_MASK_INTERP))
            continue;
        if (border > 0) {
            long x = i % nx, y = i / nx, ny = n / nx;
            if (x >= border && x < nx - border && y >= border && y < ny - border)
                continue;
        }
        s += v[i];
        s2 += (double)v[i] * v[i];
        m++;
    }
    moments r = {NAN, NAN, m};
    if (m > 1) {
        r.mean = s / m;
        r.std = sqrt((s2 - s * s / m) / (m - 1));
    }
    return r;
}

static long count_nonfinite(const hilal_diff *d)
{
    long bad = 0;
    const float *planes[5] = {d->d, d->s, d->scorr, d->flux, d->flux_err};
    for (int p = 0; p < 5; p++)
        for (long i = 0; i < d->nx * d->ny; i++)
            if (!isfinite(planes[p][i]))
                bad++;
    for (int i = 0; i < d->psf_d.size * d->psf_d.size; i++)
        if (!isfinite(d->psf_d.data[i]))
            bad++;
    return bad;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ------------------------------------------------------------------------
 * Quality on aligned pairs: three realisations with different PSF
 * combinations and flux ratios
 * ------------------------------------------------------------------------ */

static void base_cfg(sim_cfg *c, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    c->n = 512;
    c->psf_n = (model_psf){0, 3.8, 0};
    c->psf_r = (model_psf){1, 2.9, 3.0};
    c->fn = 0.8;
    c->sky_n = 400;
    c->gain_n = 2.0;
    c->rn_n = 5.0;
    c->sky_r = 300;
    c->gain_r = 4.0;
    c->rn_r = 4.0;
    c->nstars = 300;
    c->ntrans = 100;
    c->tflux_min = 600;
    c->tflux_max = 60000;
    c->trans_margin = 16;
    c->seed = seed;
}

static void test_quality(void)
{
    static double pulls[1000], fracerr[1000];
    int npull = 0, nfrac = 0;
    struct {
        model_psf pn, pr;
        double fn;
    } cases[3] = {
        {{0, 3.8, 0}, {1, 2.9, 3.0}, 0.8}, /* science worse seeing, Gaussian vs Moffat */
        {{1, 3.0, 2.5}, {0, 4.2, 0}, 1.7}, /* reference worse seeing */
        {{0, 3.4, 0}, {1, 3.4, 4.0}, 1.0}, /* equal widths, different shapes */
    };
    for (int k = 0; k < 3; k++) {
        sim_cfg cfg;
        base_cfg(&cfg, 1000 + (uint64_t)k);
        cfg.psf_n = cases[k].pn;
        cfg.psf_r = cases[k].pr;
        cfg.fn = cases[k].fn;
        sim s;
        sim_make(&s, &cfg);
        hilal_error err = {0};
        hilal_diff d = {0};
        hilal_zogy_info info;
        hilal_status st = run_zogy(&s, 0, 0, &d, &info, &err);
        CHECK_OK(st, &err);
        if (st != HILAL_OK) {
            sim_free(&s);
            continue;
        }
        const long n = cfg.n, np = n * n;
        CHECK(count_nonfinite(&d) == 0, "case %d: no NaN/Inf in the outputs", k);
        CHECK(s.ntrans >= 90, "case %d: %d transients placed", k, s.ntrans);

        /* S_corr and D on source-free pixels: zero mean, unit variance */
        moments m = stats_where(d.scorr, s.srcfree, d.mask, np, 0, n);
        CHECK(m.n > 50000, "case %d: %ld source-free pixels", k, m.n);
        CHECK(fabs(m.mean) < 0.05, "case %d: S_corr mean on source-free pixels %.4f", k, m.mean);
        CHECK(fabs(m.std - 1) < 0.05, "case %d: S_corr std on source-free pixels %.4f", k, m.std);
        moments md = stats_where(d.d, s.srcfree, d.mask, np, 0, n);
        CHECK(fabs(md.std - 1) < 0.05, "case %d: D std on source-free pixels %.4f", k, md.std);
        CHECK(fabs(d.scorr_mean) < 0.05 && fabs(d.scorr_std - 1) < 0.05,
              "case %d: robust S_corr statistics %.4f +- %.4f", k, d.scorr_mean, d.scorr_std);
        /* the edge strip (16 px) on its own (~20000 correlated pixels: the
         * standard error of the mean is ~0.05) */
        moments mb = stats_where(d.scorr, s.srcfree, d.mask, np, 16, n);
        CHECK(fabs(mb.std - 1) < 0.07 && fabs(mb.mean) < 0.15,
              "case %d: S_corr in the 16 px edge strip %.4f +- %.4f (%ld px)", k, mb.mean, mb.std,
              mb.n);

        /* F_D (eq. 15), P_D (eq. 14) */
        double fd = cfg.fn / sqrt(info.sigma_n_adu * info.sigma_n_adu +
                                  info.sigma_r_adu * info.sigma_r_adu * cfg.fn * cfg.fn);
        CHECK(fabs(d.f_d - fd) < 1e-9 * fd, "case %d: F_D %.6g, expected %.6g", k, d.f_d, fd);
        double psum = 0;
        for (int i = 0; i < d.psf_d.size * d.psf_d.size; i++)
            psum += d.psf_d.data[i];
        CHECK(fabs(psum - 1) < 1e-4 && d.psf_d.size == STAMP, "case %d: P_D sums to %.6f", k, psum);
        double fwmin = fmin(cfg.psf_n.fwhm_px, cfg.psf_r.fwhm_px);
        double fmax_ = hypot(cfg.psf_n.fwhm_px, cfg.psf_r.fwhm_px);
        CHECK(d.psf_d.fwhm_px > 0.8 * fwmin && d.psf_d.fwhm_px < fmax_,
              "case %d: FWHM of P_D %.2f px between %.2f and %.2f", k, d.psf_d.fwhm_px, fwmin, fmax_);
        CHECK(fabs(info.f_s * 0 + info.sigma_n_adu - s.sci->sky_rms_adu) < 1e-9,
              "case %d: sigma_N taken from sky_rms_adu", k);

        /* transients: flux at the position in science ADU */
        for (int t = 0; t < s.ntrans; t++) {
            long i = s.ty[t] * n + s.tx[t];
            double f = d.flux[i], fe = d.flux_err[i];
            pulls[npull++] = (f - s.tflux[t]) / fe;
            if (s.tflux[t] / fe > 20)
                fracerr[nfrac++] = fabs(f - s.tflux[t]) / s.tflux[t];
            /* S_corr = flux / flux_err by construction (eqs. 25, 42-43) */
            if (fabs(d.scorr[i] - f / fe) > 1e-3 * fabs(d.scorr[i]) + 1e-4) {
                CHECK(0, "case %d: S_corr %.4f != flux/flux_err %.4f at a transient", k, d.scorr[i],
                      f / fe);
                break;
            }
        }
        hilal_diff_clear(&d);
        sim_free(&s);
    }
    double mean = 0, var = 0;
    for (int i = 0; i < npull; i++)
        mean += pulls[i];
    mean /= npull;
    for (int i = 0; i < npull; i++)
        var += (pulls[i] - mean) * (pulls[i] - mean);
    double sd = sqrt(var / (npull - 1));
    CHECK(npull >= 270, "%d transients in total", npull);
    CHECK(sd >= 0.9 && sd <= 1.1, "pull std %.3f over %d transients", sd, npull);
    CHECK(fabs(mean) < 0.15, "pull mean %.3f (flux bias)", mean);
    qsort(fracerr, (size_t)nfrac, sizeof *fracerr, cmp_double);
    double med = nfrac > 0 ? fracerr[nfrac / 2] : 1;
    CHECK(nfrac >= 100 && med < 0.03, "median |flux error| %.4f for %d transients at S/N > 20", med,
          nfrac);
    printf("quality: pulls %.3f +- %.3f (%d), median |df/f| %.4f at S/N > 20 (%d)\n", mean, sd,
           npull, med, nfrac);
}

/* ------------------------------------------------------------------------
 * Source noise (eqs. 26-27): S_corr at the centres of bright stars
 * ------------------------------------------------------------------------ */

static void test_source_noise(void)
{
    /* 2 x 144 isolated stars of 2e4-1e5 ADU on a grid, sub-pixel offsets;
     * one S_corr sample per star (its centre pixel), so the samples are
     * independent: with the source-noise terms they are N(0, 1); without,
     * the stars' Poisson noise is missing from the denominator. */
    static double with[400], without[400];
    int nw = 0;
    for (int rep = 0; rep < 2; rep++) {
        sim_cfg cfg;
        base_cfg(&cfg, 31 + (uint64_t)rep);
        cfg.psf_n = rep ? (model_psf){1, 3.0, 2.5} : (model_psf){0, 3.8, 0};
        cfg.psf_r = rep ? (model_psf){0, 4.2, 0} : (model_psf){1, 2.9, 3.0};
        cfg.fn = rep ? 1.7 : 0.8;
        cfg.nstars = 0;
        cfg.ntrans = 0;
        sim s;
        memset(&s, 0, sizeof s);
        s.cfg = cfg;
        synth_rng r = {cfg.seed, 0, 0};
        for (int j = 0; j < 12; j++)
            for (int i = 0; i < 12; i++) {
                int k = s.nstars++;
                s.sx[k] = 36 + 40 * i + synth_uniform(&r);
                s.sy[k] = 36 + 40 * j + synth_uniform(&r);
                s.sflux[k] = 2e4 * pow(5.0, synth_uniform(&r));
            }
        sim_render(&s, &r);
        hilal_error err = {0};
        hilal_diff d1 = {0}, d0 = {0};
        hilal_zogy_input in;
        hilal_zogy_input_init(&in);
        in.sci = s.sci;
        in.ref = s.ref;
        in.sci_psf = &s.psf_n;
        in.ref_psf = &s.psf_r;
        in.flux_ratio = cfg.fn;
        in.threads = 2;
        hilal_status st1 = hilal_zogy_run(&in, &d1, NULL, &err);
        CHECK_OK(st1, &err);
        in.source_noise = 0;
        hilal_status st0 = hilal_zogy_run(&in, &d0, NULL, &err);
        CHECK_OK(st0, &err);
        if (st1 == HILAL_OK && st0 == HILAL_OK)
            for (int k = 0; k < s.nstars; k++) {
                long i = lround(s.sy[k]) * cfg.n + lround(s.sx[k]);
                with[nw] = d1.scorr[i];
                without[nw] = d0.scorr[i];
                nw++;
            }
        hilal_diff_clear(&d1);
        hilal_diff_clear(&d0);
        sim_free(&s);
    }
    double m1 = 0, v1 = 0, m0 = 0, v0 = 0;
    for (int k = 0; k < nw; k++) {
        m1 += with[k];
        m0 += without[k];
    }
    m1 /= nw;
    m0 /= nw;
    for (int k = 0; k < nw; k++) {
        v1 += (with[k] - m1) * (with[k] - m1);
        v0 += (without[k] - m0) * (without[k] - m0);
    }
    double sd1 = sqrt(v1 / (nw - 1)), sd0 = sqrt(v0 / (nw - 1));
    CHECK(nw == 288, "%d star centres", nw);
    CHECK(fabs(sd1 - 1) < 0.15 && fabs(m1) < 0.25,
          "source noise: S_corr at bright star centres %.3f +- %.3f", m1, sd1);
    CHECK(sd0 > 1.5, "without the source-noise terms the same pixels scatter by %.3f", sd0);
    printf("source noise: S_corr at star centres %.3f +- %.3f (without V(S_N), V(S_R): +- %.3f)\n",
           m1, sd1, sd0);
}

/* ------------------------------------------------------------------------
 * Edges: bright transients 3 px from the edges and in a corner
 * ------------------------------------------------------------------------ */

static void test_edges(void)
{
    sim_cfg cfg;
    base_cfg(&cfg, 77);
    cfg.ntrans = 0;
    sim s;
    memset(&s, 0, sizeof s);
    s.cfg = cfg;
    synth_rng r = {cfg.seed, 0, 0};
    sim_place(&s, &r);
    /* drop stars near the chosen transient positions */
    long pos[4][2] = {{3, 200}, {508, 330}, {260, 3}, {4, 507}};
    int keep = 0;
    for (int k = 0; k < s.nstars; k++) {
        int ok = 1;
        for (int t = 0; t < 4; t++)
            if (hypot(s.sx[k] - pos[t][0], s.sy[k] - pos[t][1]) < 12)
                ok = 0;
        if (ok) {
            s.sx[keep] = s.sx[k];
            s.sy[keep] = s.sy[k];
            s.sflux[keep] = s.sflux[k];
            keep++;
        }
    }
    s.nstars = keep;
    for (int t = 0; t < 4; t++)
        sim_add_transient(&s, pos[t][0], pos[t][1], 40000);
    sim_render(&s, &r);

    hilal_error err = {0};
    hilal_diff d = {0};
    hilal_zogy_info info;
    hilal_status st = run_zogy(&s, 0, 0, &d, &info, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        const long n = cfg.n;
        CHECK(count_nonfinite(&d) == 0, "edges: no NaN/Inf");
        /* the strip within the kernel radius of the edges */
        int strip = info.kernel_radius_px > 4 ? info.kernel_radius_px : 4;
        moments mb = stats_where(d.scorr, s.srcfree, d.mask, n * n, strip, n);
        CHECK(fabs(mb.std - 1) < 0.07 && fabs(mb.mean) < 0.07,
              "edges: S_corr in the %d px strip %.4f +- %.4f (%ld px)", strip, mb.mean, mb.std, mb.n);
        moments m1 = stats_where(d.scorr, s.srcfree, d.mask, n * n, 2, n);
        CHECK(fabs(m1.std - 1) < 0.1, "edges: S_corr in the outermost 2 px %.4f (%ld px)", m1.std,
              m1.n);
        for (int t = 0; t < 4; t++) {
            long i = s.ty[t] * n + s.tx[t];
            double pull = (d.flux[i] - s.tflux[t]) / d.flux_err[i];
            CHECK(fabs(pull) < 4, "edges: transient at (%ld,%ld): flux %.1f +- %.1f for %.1f", s.tx[t],
                  s.ty[t], d.flux[i], d.flux_err[i], s.tflux[t]);
            CHECK(d.scorr[i] > 20, "edges: transient at (%ld,%ld) detected, S_corr %.1f", s.tx[t],
                  s.ty[t], d.scorr[i]);
        }
        /* no mirror ghost: a 'transient' reflected across the edge would
         * show as a second peak; S_corr just inside the edge on the far side
         * of the transient at (3, 200) falls off like the PSF */
        long i0 = 200 * n + 3, i1 = 200 * n + 0;
        CHECK(d.scorr[i1] < d.scorr[i0], "edges: S_corr peaks at the transient (%.1f), not the edge (%.1f)",
              d.scorr[i0], d.scorr[i1]);
    }
    hilal_diff_clear(&d);
    sim_free(&s);
}

/* ------------------------------------------------------------------------
 * NaN block, masked column, bad variance
 * ------------------------------------------------------------------------ */

static void test_masks(void)
{
    sim_cfg cfg;
    base_cfg(&cfg, 4242);
    cfg.ntrans = 20;
    sim s;
    sim_make(&s, &cfg);
    const long n = cfg.n;
    /* a 40 x 40 block of NaN in the science image, flagged NODATA */
    for (long y = 100; y < 140; y++)
        for (long x = 100; x < 140; x++) {
            s.sci->pix[y * n + x] = NAN;
            s.sci->var[y * n + x] = 1e30f;
            s.sci->mask[y * n + x] |= HILAL_MASK_NODATA;
        }
    /* a bad column in the reference, with junk values */
    for (long y = 0; y < n; y++) {
        s.ref->pix[y * n + 300] = 1e6f;
        s.ref->mask[y * n + 300] |= HILAL_MASK_BAD;
    }
    /* an unflagged NaN and an Inf */
    s.ref->pix[50 * n + 50] = NAN;
    s.sci->pix[60 * n + 450] = INFINITY;
    /* a 3 x 3 patch without mask bits but with the masked-variance value
     * (1e30) in the reference */
    for (long y = 400; y < 403; y++)
        for (long x = 60; x < 63; x++)
            s.ref->var[y * n + x] = 1e30f;
    /* 60 usable pixels with zero, negative or NaN variance */
    long nneg = 0;
    for (long k = 0; k < 60; k++) {
        long i = (200 + (k % 20) * 5) * n + 400 + (k / 20) * 7;
        float bad = k % 3 == 0 ? 0.0f : (k % 3 == 1 ? -25.0f : NAN);
        if (k % 2)
            s.sci->var[i] = bad;
        else
            s.ref->var[i] = bad;
        nneg++;
    }
    hilal_error err = {0};
    hilal_diff d = {0};
    hilal_zogy_info info;
    hilal_status st = run_zogy(&s, 0, 0, &d, &info, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        CHECK(count_nonfinite(&d) == 0, "masks: no NaN/Inf anywhere in the outputs");
        long block = 0, col = 0, zero = 0;
        for (long y = 100; y < 140; y++)
            for (long x = 100; x < 140; x++) {
                long i = y * n + x;
                block += (d.mask[i] & (HILAL_MASK_NODATA | HILAL_MASK_INTERP)) ==
                         (HILAL_MASK_NODATA | HILAL_MASK_INTERP);
                zero += d.scorr[i] == 0 && d.flux[i] == 0 && d.d[i] == 0;
            }
        for (long y = 0; y < n; y++) {
            long i = y * n + 300;
            col += (d.mask[i] & (HILAL_MASK_BAD | HILAL_MASK_INTERP)) == (HILAL_MASK_BAD | HILAL_MASK_INTERP);
            zero += d.scorr[i] == 0;
        }
        CHECK(block == 1600, "masks: NaN block flagged NODATA|INTERP (%ld of 1600)", block);
        CHECK(col == n, "masks: bad column flagged BAD|INTERP (%ld of %ld)", col, n);
        CHECK(zero == 1600 + n, "masks: S_corr (and D, flux) zero at filled pixels (%ld)", zero);
        CHECK((d.mask[50 * n + 50] & (HILAL_MASK_NODATA | HILAL_MASK_INTERP)) &&
                  (d.mask[60 * n + 450] & HILAL_MASK_NODATA),
              "masks: unflagged NaN and Inf found and flagged");
        CHECK(info.n_filled == 1600 + n + 2 + 9, "masks: %ld pixels filled", info.n_filled);
        CHECK((d.mask[401 * n + 61] & HILAL_MASK_INTERP) && d.scorr[401 * n + 61] == 0,
              "masks: a variance of 1e30 marks a pixel to fill");
        CHECK(info.n_negvar == nneg, "masks: %ld of %ld bad-variance pixels counted", info.n_negvar,
              nneg);
        long negflag = 0;
        for (long i = 0; i < n * n; i++)
            negflag += (d.mask[i] & HILAL_MASK_NEGVAR) != 0;
        CHECK(negflag == nneg, "masks: %ld pixels flagged NEGVAR", negflag);
        /* S_corr stays unit-variance everywhere, also right next to the
         * masked regions */
        moments m = stats_where(d.scorr, s.srcfree, d.mask, n * n, 0, n);
        CHECK(fabs(m.std - 1) < 0.05 && fabs(m.mean) < 0.05, "masks: S_corr %.4f +- %.4f", m.mean,
              m.std);
        unsigned char *near = calloc((size_t)(n * n), 1);
        for (long y = 0; y < n; y++)
            for (long x = 0; x < n; x++) {
                int nc = labs(x - 300) <= 8 && x != 300;
                int nb = x >= 92 && x < 148 && y >= 92 && y < 148 && !(x >= 100 && x < 140 && y >= 100 && y < 140);
                near[y * n + x] = (nc || nb) && s.srcfree[y * n + x];
            }
        moments mn = stats_where(d.scorr, near, d.mask, n * n, 0, n);
        /* (~6000 correlated pixels: standard error of the mean ~0.07) */
        CHECK(fabs(mn.std - 1) < 0.1 && fabs(mn.mean) < 0.2,
              "masks: S_corr within 8 px of the masked regions %.4f +- %.4f (%ld px)", mn.mean, mn.std,
              mn.n);
        free(near);
        CHECK(fabs(d.scorr_std - 1) < 0.05, "masks: robust S_corr std %.4f", d.scorr_std);
    }
    hilal_diff_clear(&d);
    sim_free(&s);
}

/* ------------------------------------------------------------------------
 * Astrometric noise: a reference misregistered by 0.3 px
 * ------------------------------------------------------------------------ */

static long count_outliers(const hilal_diff *d, double thresh)
{
    long c = 0;
    for (long i = 0; i < d->nx * d->ny; i++)
        c += fabs(d->scorr[i]) > thresh;
    return c;
}

static void test_astrometric(void)
{
    sim_cfg cfg;
    base_cfg(&cfg, 99);
    cfg.ntrans = 0;
    cfg.ref_dx = 0.3;
    cfg.ref_dy = -0.2;
    sim s;
    sim_make(&s, &cfg);
    hilal_error err = {0};
    hilal_diff d0 = {0}, d1 = {0};
    hilal_status st0 = run_zogy(&s, 0, 0, &d0, NULL, &err);
    CHECK_OK(st0, &err);
    hilal_status st1 = run_zogy(&s, 0.3, 0.2, &d1, NULL, &err);
    CHECK_OK(st1, &err);
    if (st0 == HILAL_OK && st1 == HILAL_OK) {
        long o0 = count_outliers(&d0, 5), o1 = count_outliers(&d1, 5);
        CHECK(o0 > 200, "astrometric: misregistration leaves %ld pixels |S_corr| > 5 without V_ast", o0);
        CHECK(o1 * 10 < o0, "astrometric: V_ast (eqs. 30-31) removes them: %ld -> %ld", o0, o1);
        const long n = cfg.n;
        moments m0 = stats_where(d0.scorr, s.srcfree, d0.mask, n * n, 0, n);
        moments m1 = stats_where(d1.scorr, s.srcfree, d1.mask, n * n, 0, n);
        CHECK(fabs(m1.std - m0.std) < 0.02 && fabs(m1.std - 1) < 0.05,
              "astrometric: background S_corr unchanged (%.4f vs %.4f)", m1.std, m0.std);
        CHECK(count_nonfinite(&d1) == 0, "astrometric: no NaN/Inf");
    }
    hilal_diff_clear(&d0);
    hilal_diff_clear(&d1);
    sim_free(&s);
}

/* ------------------------------------------------------------------------
 * A non-square image of odd sizes (odd FFT widths, Hermitian weights)
 * ------------------------------------------------------------------------ */

static hilal_image *crop_image(const hilal_image *in, long x0, long y0, long nx, long ny)
{
    hilal_error err = {0};
    hilal_image *out = hilal_image_new(nx, ny, &err);
    hilal_image_alloc_var(out, &err);
    hilal_image_alloc_sky(out, &err);
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            size_t i = (size_t)(y * nx + x), j = (size_t)((y + y0) * in->nx + x + x0);
            out->pix[i] = in->pix[j];
            out->var[i] = in->var[j];
            out->sky[i] = in->sky[j];
            out->mask[i] = in->mask[j];
        }
    out->sky_rms_adu = in->sky_rms_adu;
    return out;
}

static void test_odd_size(void)
{
    sim_cfg cfg;
    base_cfg(&cfg, 2024);
    cfg.ntrans = 60;
    sim s;
    sim_make(&s, &cfg);
    const long x0 = 61, y0 = 130, nx = 375, ny = 251;
    hilal_image *sci = crop_image(s.sci, x0, y0, nx, ny), *ref = crop_image(s.ref, x0, y0, nx, ny);
    unsigned char *free_px = malloc((size_t)(nx * ny));
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++)
            free_px[y * nx + x] = s.srcfree[(y + y0) * cfg.n + x + x0];
    hilal_zogy_input in;
    hilal_zogy_input_init(&in);
    in.sci = sci;
    in.ref = ref;
    in.sci_psf = &s.psf_n;
    in.ref_psf = &s.psf_r;
    in.flux_ratio = cfg.fn;
    in.threads = 2;
    hilal_error err = {0};
    hilal_diff d = {0};
    hilal_zogy_info info;
    hilal_status st = hilal_zogy_run(&in, &d, &info, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        CHECK(d.nx == nx && d.ny == ny, "odd size: %ld x %ld products", d.nx, d.ny);
        CHECK(info.fft_nx >= nx + 2 * info.pad_px && info.fft_ny >= ny + 2 * info.pad_px,
              "odd size: FFT %ld x %ld holds the padding", info.fft_nx, info.fft_ny);
        CHECK(count_nonfinite(&d) == 0, "odd size: no NaN/Inf");
        moments m = stats_where(d.scorr, free_px, d.mask, nx * ny, 0, nx);
        CHECK(fabs(m.std - 1) < 0.05 && fabs(m.mean) < 0.08, "odd size: S_corr %.4f +- %.4f", m.mean,
              m.std);
        int nin = 0, nbad = 0;
        for (int t = 0; t < s.ntrans; t++) {
            long x = s.tx[t] - x0, y = s.ty[t] - y0;
            if (x < 0 || y < 0 || x >= nx || y >= ny)
                continue;
            nin++;
            long i = y * nx + x;
            if (fabs(d.flux[i] - s.tflux[t]) > 4 * d.flux_err[i])
                nbad++;
        }
        CHECK(nin >= 10 && nbad <= 1, "odd size: %d of %d transient fluxes off by > 4 sigma", nbad, nin);
    }
    hilal_diff_clear(&d);
    hilal_image_free(sci);
    hilal_image_free(ref);
    free(free_px);
    sim_free(&s);
}

/* ------------------------------------------------------------------------
 * The workspace: FFT arrays reused between runs and shared by threads
 * ------------------------------------------------------------------------ */

static int same_products(const hilal_diff *a, const hilal_diff *b)
{
    if (a->nx != b->nx || a->ny != b->ny || a->scorr == NULL || b->scorr == NULL)
        return 0;
    size_t n = (size_t)a->nx * (size_t)a->ny;
    return memcmp(a->d, b->d, sizeof *a->d * n) == 0 && memcmp(a->s, b->s, sizeof *a->s * n) == 0 &&
           memcmp(a->scorr, b->scorr, sizeof *a->scorr * n) == 0 &&
           memcmp(a->flux, b->flux, sizeof *a->flux * n) == 0 &&
           memcmp(a->flux_err, b->flux_err, sizeof *a->flux_err * n) == 0 &&
           memcmp(a->mask, b->mask, sizeof *a->mask * n) == 0 && a->scorr_std == b->scorr_std &&
           a->scorr_mean == b->scorr_mean;
}

typedef struct ws_job {
    const hilal_zogy_input *in;
    hilal_diff d;
    hilal_status st;
} ws_job;

static void *ws_thread(void *arg)
{
    ws_job *j = arg;
    hilal_error err = {0};
    j->st = hilal_zogy_run(j->in, &j->d, NULL, &err);
    return NULL;
}

static void test_workspace(void)
{
    sim_cfg cfg;
    base_cfg(&cfg, 77);
    cfg.n = 256;
    cfg.nstars = 80;
    cfg.ntrans = 20;
    sim s;
    sim_make(&s, &cfg);
    hilal_image *sci2 = crop_image(s.sci, 10, 20, 200, 150), *ref2 = crop_image(s.ref, 10, 20, 200, 150);
    hilal_zogy_input in, in2;
    hilal_zogy_input_init(&in);
    in.sci = s.sci;
    in.ref = s.ref;
    in.sci_psf = &s.psf_n;
    in.ref_psf = &s.psf_r;
    in.flux_ratio = cfg.fn;
    in.reg_rms_x_px = 0.05; /* the astrometric term too */
    in.threads = 2;
    in2 = in;
    in2.sci = sci2;
    in2.ref = ref2;
    hilal_error err = {0};
    hilal_diff ref_run = {0}, ref_small = {0}, d = {0};
    hilal_zogy_workspace *ws = NULL;
    CHECK_OK(hilal_zogy_workspace_new(&ws, &err), &err);
    hilal_status st = hilal_zogy_run(&in, &ref_run, NULL, &err);
    CHECK_OK(st, &err);
    st = hilal_zogy_run(&in2, &ref_small, NULL, &err);
    CHECK_OK(st, &err);
    /* with a workspace, again and again, switching sizes: the arrays are
     * reused (or replaced) and the products do not change */
    in.workspace = in2.workspace = ws;
    for (int rep = 0; rep < 3 && ws != NULL; rep++) {
        const hilal_zogy_input *use = rep == 1 ? &in2 : &in;
        st = hilal_zogy_run(use, &d, NULL, &err);
        CHECK_OK(st, &err);
        CHECK(st == HILAL_OK && same_products(&d, rep == 1 ? &ref_small : &ref_run),
              "run %d through the workspace gives the same products", rep);
        hilal_diff_clear(&d);
    }
    /* three runs at once on one workspace: each gets its own arrays */
    ws_job jobs[3];
    pthread_t th[3];
    for (int k = 0; k < 3; k++) {
        memset(&jobs[k], 0, sizeof jobs[k]);
        jobs[k].in = k == 2 ? &in2 : &in;
        jobs[k].st = HILAL_ERR_INTERNAL;
        pthread_create(&th[k], NULL, ws_thread, &jobs[k]);
    }
    for (int k = 0; k < 3; k++) {
        pthread_join(th[k], NULL);
        CHECK(jobs[k].st == HILAL_OK && same_products(&jobs[k].d, k == 2 ? &ref_small : &ref_run),
              "concurrent run %d on the shared workspace: same products", k);
        hilal_diff_clear(&jobs[k].d);
    }
    hilal_zogy_workspace_free(ws);
    hilal_zogy_workspace_free(NULL);
    hilal_diff_clear(&ref_run);
    hilal_diff_clear(&ref_small);
    hilal_image_free(sci2);
    hilal_image_free(ref2);
    sim_free(&s);
}

/* ------------------------------------------------------------------------
 * Error paths
 * ------------------------------------------------------------------------ */

static void test_errors(void)
{
    hilal_error err = {0};
    hilal_image *a = hilal_image_new(64, 64, &err), *b = hilal_image_new(64, 48, &err);
    hilal_psf p = {0};
    model_psf g = {0, 3.0, 0};
    make_psf(&g, &p);
    hilal_zogy_input in;
    hilal_zogy_input_init(&in);
    in.sci = a;
    in.ref = b;
    in.sci_psf = &p;
    in.ref_psf = &p;
    hilal_diff d = {0};
    hilal_error e1 = {0};
    CHECK(hilal_zogy_run(&in, &d, NULL, &e1) == HILAL_ERR_MISMATCH, "size mismatch refused");
    CHECK(strstr(e1.msg, "64 x 48") != NULL && strstr(e1.msg, "align") != NULL, "message: %s", e1.msg);
    CHECK(d.d == NULL && d.scorr == NULL, "nothing allocated on error");

    hilal_image *c = hilal_image_new(64, 64, &err);
    in.ref = c;
    for (long i = 0; i < 64 * 64; i++) {
        a->pix[i] = (float)((i * 7919) % 13) - 6.0f;
        c->pix[i] = (float)((i * 104729) % 11) - 5.0f;
    }
    in.flux_ratio = 0;
    hilal_error e2 = {0};
    CHECK(hilal_zogy_run(&in, &d, NULL, &e2) == HILAL_ERR_DATA, "zero flux ratio refused");
    CHECK(strstr(e2.msg, "flux ratio") != NULL, "message: %s", e2.msg);
    in.flux_ratio = 1;

    hilal_psf empty = {0};
    in.ref_psf = &empty;
    hilal_error e3 = {0};
    CHECK(hilal_zogy_run(&in, &d, NULL, &e3) == HILAL_ERR_DATA, "missing PSF refused");
    CHECK(strstr(e3.msg, "reference PSF") != NULL, "message: %s", e3.msg);
    hilal_psf even = {4, calloc(16, sizeof(float)), 2.0, 0};
    even.data[5] = 1;
    in.ref_psf = &even;
    hilal_error e4 = {0};
    CHECK(hilal_zogy_run(&in, &d, NULL, &e4) == HILAL_ERR_DATA && strstr(e4.msg, "odd") != NULL,
          "even-sized PSF refused: %s", e4.msg);
    in.ref_psf = &p;

    for (long i = 0; i < 64 * 64; i++)
        c->mask[i] = HILAL_MASK_NODATA;
    hilal_error e5 = {0};
    CHECK(hilal_zogy_run(&in, &d, NULL, &e5) == HILAL_ERR_DATA && strstr(e5.msg, "no pixel") != NULL,
          "all pixels unusable refused: %s", e5.msg);
    memset(c->mask, 0, sizeof *c->mask * 64 * 64);

    /* no sky RMS: estimated from the pixels, no sky/var planes: background
     * only; a small image where every pixel is in the edge strip */
    hilal_zogy_info info;
    hilal_status st = hilal_zogy_run(&in, &d, &info, &err);
    CHECK_OK(st, &err);
    CHECK(info.sigma_n_estimated && info.sigma_r_estimated && info.sigma_n_adu > 0,
          "sigma estimated from the pixels (%.3f)", info.sigma_n_adu);
    CHECK(st != HILAL_OK || count_nonfinite(&d) == 0, "small image: finite outputs");
    hilal_diff_clear(&d);

    hilal_image_free(a);
    hilal_image_free(b);
    hilal_image_free(c);
    hilal_psf_clear(&p);
    hilal_psf_clear(&even);
}

/* ------------------------------------------------------------------------
 * The stage descriptor, driven like the runner does
 * ------------------------------------------------------------------------ */

/* Keeps the first warning logged (a log handler). */
static void keep_warning(hilal_log_level level, const char *msg, void *user)
{
    char *buf = user;
    if (level == HILAL_LOG_WARN && buf[0] == '\0')
        snprintf(buf, 512, "%s", msg);
}

static void test_stage(void)
{
    extern const hilal_stage hilal_stage_subtract;
    const hilal_stage *stage = &hilal_stage_subtract;
    CHECK(strcmp(stage->name, "subtract") == 0, "stage name");
    CHECK(stage->makes == HILAL_PROD_DIFFERENCE, "makes DIFFERENCE");
    CHECK((stage->needs & (HILAL_PROD_PSF | HILAL_PROD_FLUXSCALE | HILAL_PROD_ALIGNED)) ==
              (HILAL_PROD_PSF | HILAL_PROD_FLUXSCALE | HILAL_PROD_ALIGNED),
          "needs PSF, FLUXSCALE, ALIGNED");
    CHECK(hilal_registry_find("subtract") == stage, "registered");

    hilal_error err = {0};
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "registry config: %s", err.msg);
    if (cfg == NULL)
        return;
    hilal_error e1 = {0};
    void *state = NULL;
    hilal_config_set(cfg, "subtract.fft_rigor", "fastest", "--set", &e1);
    hilal_error e2 = {0};
    CHECK(stage->init(cfg, &state, &e2) == HILAL_ERR_CONFIG && state == NULL,
          "bad fft_rigor refused at init");
    CHECK(strstr(e2.msg, "subtract.fft_rigor") != NULL, "message names the key: %s", e2.msg);
    /* measured plans, saved to a wisdom file of the test's own (never the
     * user's cache) as soon as they are made */
    char dir[1024], wisdom[1200];
    hilal_test_tmpdir("subtract-wisdom", dir, sizeof dir);
    snprintf(wisdom, sizeof wisdom, "%s/sub/fftwf-wisdom", dir);
    remove(wisdom);
    hilal_config_set(cfg, "subtract.fft_rigor", "measure", "--set", &err);
    hilal_config_set(cfg, "subtract.fft_wisdom", wisdom, "--set", &err);
    hilal_config_set(cfg, "pipeline.threads", "2", "--set", &err);
    hilal_status st = stage->init(cfg, &state, &err);
    CHECK_OK(st, &err);

    sim_cfg sc;
    base_cfg(&sc, 555);
    sc.ntrans = 10;
    sim s;
    sim_make(&s, &sc);
    hilal_frame frame;
    hilal_frame_init(&frame);
    snprintf(frame.frame_id, sizeof frame.frame_id, "sim-555");
    frame.sci = s.sci;
    frame.ref = s.ref;
    frame.sci_psf = s.psf_n;
    frame.ref_psf = s.psf_r;
    frame.flux_ratio = sc.fn;
    frame.products = stage->needs;
    s.sci = s.ref = NULL;
    memset(&s.psf_n, 0, sizeof s.psf_n);
    memset(&s.psf_r, 0, sizeof s.psf_r);
    st = stage->run(state, &frame, &err);
    CHECK_OK(st, &err);
    CHECK(frame.diff.scorr != NULL && frame.diff.nx == sc.n, "diff filled");
    if (frame.diff.scorr != NULL) {
        CHECK(fabs(frame.diff.scorr_std - 1) < 0.05, "stage: robust S_corr std %.4f",
              frame.diff.scorr_std);
        long i = s.ty[0] * sc.n + s.tx[0];
        CHECK(fabs(frame.diff.flux[i] - s.tflux[0]) < 5 * frame.diff.flux_err[i],
              "stage: transient flux %.1f +- %.1f for %.1f", frame.diff.flux[i], frame.diff.flux_err[i],
              s.tflux[0]);
    }
    struct stat sb;
    CHECK(stat(wisdom, &sb) == 0 && sb.st_size > 0, "measured plans saved to %s", wisdom);
    /* a second frame reuses the cached plans and the workspace's arrays,
     * and gives the same products */
    hilal_diff first = frame.diff;
    memset(&frame.diff, 0, sizeof frame.diff);
    st = stage->run(state, &frame, &err);
    CHECK_OK(st, &err);
    CHECK(st == HILAL_OK && same_products(&first, &frame.diff), "second frame: same products");
    hilal_diff_clear(&first);
    stage->fini(state);
    stage->fini(NULL);

    /* a damaged wisdom file costs a warning, never the run */
    FILE *f = fopen(wisdom, "w");
    if (f != NULL) {
        fputs("(fftw-3.3 garbage\n", f);
        fclose(f);
    }
    char warned[512] = "";
    hilal_log_set_handler(keep_warning, warned, HILAL_LOG_WARN);
    state = NULL;
    hilal_error e3 = {0};
    st = stage->init(cfg, &state, &e3);
    hilal_log_set_handler(NULL, NULL, HILAL_LOG_ERROR);
    CHECK(st == HILAL_OK && state != NULL, "damaged wisdom: init succeeds (%s)", e3.msg);
    CHECK(strstr(warned, wisdom) != NULL && strstr(warned, "measured again") != NULL,
          "damaged wisdom: warning names the file: %s", warned);
    stage->fini(state);
    hilal_frame_clear(&frame);
    sim_free(&s);
    hilal_config_free(cfg);
}

int main(void)
{
    test_quality();
    test_source_noise();
    test_edges();
    test_masks();
    test_astrometric();
    test_odd_size();
    test_workspace();
    test_errors();
    test_stage();
    hilal_fft_cleanup();
    return hilal_test_finish();
}
