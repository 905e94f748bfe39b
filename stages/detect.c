/* Stage "detect": candidates are local extrema of the ZOGY corrected score
 * S_corr (Zackay, Ofek & Gal-Yam 2016, eq. 25), which is in units of sigma,
 * so that a fixed threshold gives a known false-alarm rate. Positive peaks
 * are brightening events, negative peaks fading ones (S_corr is signed). */
#include "hilal/detect.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fft.h"
#include "hilal/log.h"
#include "hilal/stage.h"
#include "parallel.h"

static const hilal_param detect_params[] = {
    {"thresh_sigma", HILAL_PARAM_DOUBLE, "5", 1, 1000, "sigma",
     "detection threshold on |S_corr|, for brightening (S_corr > 0) and fading (< 0) events"},
    {"merge_radius_px", HILAL_PARAM_DOUBLE, "0", 0, 1000, "px",
     "same-sign peaks closer than this merge into the stronger one (0 = max(3, FWHM of P_D))"},
    {"max_candidates", HILAL_PARAM_INT, "10000", 1, 100000000, "",
     "most candidates kept per frame (the most significant), with a warning when exceeded"},
};

/* One local extremum of S_corr. */
typedef struct peak {
    long x, y;          /* 0-based pixel */
    float value;        /* signed S_corr */
    int merged;         /* absorbed at least one weaker same-sign peak */
} peak;

/* Sort by decreasing |S_corr|; ties by raster position so that the order
 * never depends on qsort's stability. */
static int cmp_peak(const void *pa, const void *pb)
{
    const peak *a = pa, *b = pb;
    float fa = fabsf(a->value), fb = fabsf(b->value);
    if (fa != fb)
        return fa > fb ? -1 : 1;
    if (a->y != b->y)
        return a->y < b->y ? -1 : 1;
    if (a->x != b->x)
        return a->x < b->x ? -1 : 1;
    return 0;
}

/* Whether pixel (x, y) is a strict local extremum of sign s in its 3x3
 * neighbourhood. All 8 neighbours must be on the image, finite and usable:
 * next to an unusable pixel the true extremum may lie in that pixel (the
 * rim of a masked star would otherwise be a ring of false peaks). Ties are
 * broken by raster order (a neighbour earlier in the raster wins an equal
 * value) so that a flat pair yields one peak. */
static int is_extremum(const float *sc, const hilal_mask_t *mask, long nx, long ny, long x, long y,
                       float s)
{
    const float a = s * sc[y * nx + x];
    for (long dy = -1; dy <= 1; dy++) {
        long yy = y + dy;
        if (yy < 0 || yy >= ny)
            return 0;
        for (long dx = -1; dx <= 1; dx++) {
            long xx = x + dx;
            if (xx < 0 || xx >= nx)
                return 0;
            if (dx == 0 && dy == 0)
                continue;
            size_t j = (size_t)yy * (size_t)nx + (size_t)xx;
            float w = sc[j];
            if (!isfinite(w) || (mask != NULL && (mask[j] & HILAL_DETECT_VETO_MASK) != 0))
                return 0;
            w *= s;
            int earlier = dy < 0 || (dy == 0 && dx < 0);
            if (earlier ? w >= a : w > a)
                return 0;
        }
    }
    return 1;
}

/* The extrema found in a band of rows, in raster order. */
typedef struct peak_list {
    peak *pk;
    size_t n, cap;
    int nomem;
} peak_list;

/* The scan of S_corr for extrema, split into bands of rows. */
typedef struct extrema_scan {
    const hilal_diff *diff;
    const hilal_detect_params *p;
    peak_list bands[HILAL_PARALLEL_MAX_THREADS];
} extrema_scan;

/* Pixels tested at once for a value beyond the threshold. */
#define SCAN_BLOCK 16

/* Kept out of the scan loop: inlined there, GCC 12 no longer vectorises
 * block_reaches(). */
#if defined(__GNUC__)
#define SCAN_NOINLINE __attribute__((noinline))
#else
#define SCAN_NOINLINE
#endif

/* Whether one of the SCAN_BLOCK values from p has |value| >= thr (NaN has
 * not). Written for the compiler to vectorise. */
static SCAN_NOINLINE int block_reaches(const float *p, float thr)
{
    int any = 0;
    for (int k = 0; k < SCAN_BLOCK; k++)
        any |= fabsf(p[k]) >= thr;
    return any;
}

/* hilal_parallel_for() body: the extrema of rows m + lo .. m + hi - 1 (m =
 * the edge margin) into band tid. Most pixels are far below the threshold:
 * a block of SCAN_BLOCK pixels is first tested as a whole for |S_corr| >=
 * thr (one vectorisable pass; NaN fails it), and only a block with such a
 * pixel is examined pixel by pixel. */
static void extrema_rows(void *ctx, long lo, long hi, int tid)
{
    extrema_scan *sc = ctx;
    const hilal_diff *diff = sc->diff;
    const long nx = diff->nx, ny = diff->ny, m = sc->p->edge_margin_px;
    const float thr = (float)sc->p->thresh_sigma;
    peak_list *out = &sc->bands[tid];
    for (long y = m + lo; y < m + hi && !out->nomem; y++) {
        const float *row = diff->scorr + (size_t)y * (size_t)nx;
        for (long xb = m; xb < nx - m; xb += SCAN_BLOCK) {
            const long xe = xb + SCAN_BLOCK < nx - m ? xb + SCAN_BLOCK : nx - m;
            if (xe - xb == SCAN_BLOCK && !block_reaches(row + xb, thr))
                continue;
            for (long x = xb; x < xe; x++) {
                size_t i = (size_t)y * (size_t)nx + (size_t)x;
                float v = row[x];
                /* Beyond the threshold, on a usable pixel, and the most
                 * extreme value of its sign in the 3x3 neighbourhood. */
                if (!isfinite(v) || fabsf(v) < thr)
                    continue;
                if (diff->mask != NULL && (diff->mask[i] & HILAL_DETECT_VETO_MASK) != 0)
                    continue;
                if (!is_extremum(diff->scorr, diff->mask, nx, ny, x, y, v > 0 ? 1.0f : -1.0f))
                    continue;
                if (out->n == out->cap) {
                    size_t ncap = out->cap ? 2 * out->cap : 256;
                    peak *tmp = realloc(out->pk, ncap * sizeof *tmp);
                    if (tmp == NULL) {
                        out->nomem = 1;
                        break;
                    }
                    out->pk = tmp;
                    out->cap = ncap;
                }
                out->pk[out->n++] = (peak){x, y, v, 0};
            }
            if (out->nomem)
                break;
        }
    }
}

/* Collects every extremum beyond the threshold into one array, in raster
 * order: bands of rows are scanned by up to `threads` threads and joined in
 * order, so the result does not depend on the number of threads. */
static hilal_status find_extrema(const hilal_diff *diff, const hilal_detect_params *p, int threads,
                                 peak **out, size_t *nout, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const long nrows = diff->ny - 2 * p->edge_margin_px;
    extrema_scan sc;
    memset(&sc, 0, sizeof sc);
    sc.diff = diff;
    sc.p = p;
    *out = NULL;
    *nout = 0;
    if (nrows <= 0 || diff->nx - 2 * p->edge_margin_px <= 0)
        return HILAL_OK;
    if (threads > HILAL_PARALLEL_MAX_THREADS)
        threads = HILAL_PARALLEL_MAX_THREADS;
    hilal_parallel_for(threads, nrows, extrema_rows, &sc);
    size_t n = 0;
    for (int t = 0; t < HILAL_PARALLEL_MAX_THREADS; t++) {
        if (sc.bands[t].nomem)
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu detection peaks",
                                 sc.bands[t].cap * 2);
        n += sc.bands[t].n;
    }
    peak *pk = NULL;
    if (st == HILAL_OK && n > 0) {
        pk = malloc(n * sizeof *pk);
        if (pk == NULL)
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu detection peaks", n);
    }
    if (st == HILAL_OK) {
        size_t k = 0;
        for (int t = 0; t < HILAL_PARALLEL_MAX_THREADS && k < n; t++) {
            if (sc.bands[t].n > 0)
                memcpy(pk + k, sc.bands[t].pk, sc.bands[t].n * sizeof *pk);
            k += sc.bands[t].n;
        }
        *out = pk;
        *nout = n;
    }
    for (int t = 0; t < HILAL_PARALLEL_MAX_THREADS; t++)
        free(sc.bands[t].pk);
    return st;
}

/* Greedy merging in order of decreasing |S_corr|: a peak within radius of an
 * already kept peak of the same sign is absorbed by it. Kept peaks are
 * indexed in a grid of cells of side radius, so each peak only looks at the
 * 3x3 cells around it. Compacts pk in place; returns the number kept. */
static hilal_status merge_peaks(peak *pk, size_t n, long nx, long ny, double radius,
                                size_t *nkept, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    long *head = NULL, *next = NULL;
    size_t kept = 0;
    if (radius <= 0 || n < 2) {
        *nkept = n;
        return HILAL_OK;
    }
    const double cell = radius;
    const long ncx = (long)ceil((double)nx / cell) + 1, ncy = (long)ceil((double)ny / cell) + 1;
    head = malloc((size_t)ncx * (size_t)ncy * sizeof *head);
    next = malloc(n * sizeof *next);
    if (head == NULL || next == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory merging %zu peaks", n);
        goto cleanup;
    }
    for (long i = 0; i < ncx * ncy; i++)
        head[i] = -1;
    const double r2 = radius * radius;
    for (size_t i = 0; i < n; i++) {
        const long cx = (long)(pk[i].x / cell), cy = (long)(pk[i].y / cell);
        long absorber = -1;
        for (long yy = cy - 1; yy <= cy + 1 && absorber < 0; yy++) {
            if (yy < 0 || yy >= ncy)
                continue;
            for (long xx = cx - 1; xx <= cx + 1 && absorber < 0; xx++) {
                if (xx < 0 || xx >= ncx)
                    continue;
                for (long k = head[yy * ncx + xx]; k >= 0; k = next[k]) {
                    double ddx = (double)(pk[k].x - pk[i].x), ddy = (double)(pk[k].y - pk[i].y);
                    if ((pk[k].value > 0) == (pk[i].value > 0) && ddx * ddx + ddy * ddy <= r2) {
                        absorber = k;
                        break;
                    }
                }
            }
        }
        if (absorber >= 0) {
            pk[absorber].merged = 1;
            continue;
        }
        /* Keep: move to slot `kept` (kept <= i, and slots below i are final). */
        pk[kept] = pk[i];
        next[kept] = head[cy * ncx + cx];
        head[cy * ncx + cx] = (long)kept;
        kept++;
    }
    *nkept = kept;
cleanup:
    free(head);
    free(next);
    return st;
}

/* hilal_detect_peaks() with the scan on up to `threads` threads. */
static hilal_status detect_peaks(const hilal_diff *diff, const hilal_detect_params *p, int threads,
                                 hilal_candidate **cands, size_t *ncands, size_t *nfound,
                                 hilal_error *err)
{
    hilal_status st = HILAL_OK;
    peak *pk = NULL;
    size_t n = 0, kept = 0;
    *cands = NULL;
    *ncands = 0;
    if (nfound != NULL)
        *nfound = 0;
    if (diff == NULL || diff->scorr == NULL || diff->nx <= 0 || diff->ny <= 0)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "detection needs the S_corr image of the difference, which is missing");
    if (!(p->thresh_sigma > 0) || p->edge_margin_px < 0 || p->max_candidates < 1 ||
        !(p->merge_radius_px >= 0))
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "detection parameters out of range (threshold %g sigma, edge margin "
                               "%ld px, merge radius %g px, cap %zu)",
                               p->thresh_sigma, p->edge_margin_px, p->merge_radius_px,
                               p->max_candidates);

    /* 1. Local extrema of S_corr beyond the threshold. */
    st = find_extrema(diff, p, threads, &pk, &n, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* 2. Most significant first, then merge close same-sign peaks. The
     * default radius is the FWHM of P_D (the size of one resolution element
     * of S_corr's parent image), at least 3 px. */
    if (n > 1)
        qsort(pk, n, sizeof *pk, cmp_peak);
    double radius = p->merge_radius_px;
    if (radius == 0) {
        radius = 3.0;
        if (isfinite(diff->psf_d.fwhm_px) && diff->psf_d.fwhm_px > radius)
            radius = diff->psf_d.fwhm_px;
    }
    st = merge_peaks(pk, n, diff->nx, diff->ny, radius, &kept, err);
    if (st != HILAL_OK)
        goto cleanup;
    if (nfound != NULL)
        *nfound = kept;

    /* 3. Cap: keep the most significant ones (already sorted). */
    if (kept > p->max_candidates)
        kept = p->max_candidates;
    if (kept == 0)
        goto cleanup;

    /* 4. Candidates, numbered 1..n in order of decreasing |S_corr|. */
    hilal_candidate *c = malloc(kept * sizeof *c);
    if (c == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu candidates", kept);
        goto cleanup;
    }
    for (size_t i = 0; i < kept; i++) {
        c[i] = (hilal_candidate){
            .cand_id = (int64_t)(i + 1),
            .x = (double)pk[i].x + 1.0,
            .y = (double)pk[i].y + 1.0,
            .ra = NAN, .dec = NAN,
            .snr = pk[i].value,
            .flux = NAN, .flux_err = NAN, .mag = NAN, .mag_err = NAN,
            .fwhm = NAN, .elongation = NAN, .rb = NAN,
            .flags = pk[i].merged ? HILAL_CAND_MERGED : 0u,
            .mjd = NAN,
            .sharpness = NAN, .neg_frac = NAN, .dipole = NAN,
            .dist_sat_px = NAN, .dist_mask_px = NAN, .masked_frac = NAN,
        };
    }
    *cands = c;
    *ncands = kept;
cleanup:
    free(pk);
    return st;
}

hilal_status hilal_detect_peaks(const hilal_diff *diff, const hilal_detect_params *p,
                                hilal_candidate **cands, size_t *ncands, size_t *nfound,
                                hilal_error *err)
{
    return detect_peaks(diff, p, 1, cands, ncands, nfound, err);
}

/* ---- the stage ---------------------------------------------------------- */

/* The stage's state: the parameters and the threads of pipeline.threads. */
typedef struct detect_state {
    hilal_detect_params p;
    int threads;
} detect_state;

static hilal_status detect_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    detect_state *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_detect_params *p = &s->p;
    p->thresh_sigma = hilal_config_get_double(cfg, "detect.thresh_sigma");
    p->merge_radius_px = hilal_config_get_double(cfg, "detect.merge_radius_px");
    p->max_candidates = (size_t)hilal_config_get_int(cfg, "detect.max_candidates");
    p->edge_margin_px = hilal_config_get_int(cfg, "pipeline.edge_margin");
    /* pipeline.threads = 0: one per core. */
    s->threads = hilal_fft_threads((int)hilal_config_get_int(cfg, "pipeline.threads"));
    *state = s;
    return HILAL_OK;
}

static hilal_status detect_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const detect_state *s = state;
    const hilal_detect_params *p = &s->p;
    hilal_candidate *c = NULL;
    size_t n = 0, nfound = 0;
    hilal_status st = detect_peaks(&frame->diff, p, s->threads, &c, &n, &nfound, err);
    if (st != HILAL_OK)
        return st;
    if (nfound > n)
        hilal_log(HILAL_LOG_WARN,
                  "frame %s: %zu candidates beyond %.2f sigma, keeping the %zu most significant "
                  "(raise detect.max_candidates, or check the subtraction: S_corr std %.3g)",
                  frame->frame_id, nfound, p->thresh_sigma, n, frame->diff.scorr_std);
    free(frame->cands);
    frame->cands = c;
    frame->ncands = n;
    hilal_log(HILAL_LOG_INFO, "frame %s: %zu candidates beyond %.2f sigma", frame->frame_id, n,
              p->thresh_sigma);
    return HILAL_OK;
}

static void detect_fini(void *state) { free(state); }

const hilal_stage hilal_stage_detect = {
    .name = "detect",
    .summary = "find brightening and fading candidates as extrema of S_corr",
    .params = detect_params,
    .nparams = sizeof detect_params / sizeof detect_params[0],
    .needs = HILAL_PROD_DIFFERENCE,
    .makes = HILAL_PROD_CANDIDATES,
    .flags = 0,
    .init = detect_init,
    .run = detect_run,
    .fini = detect_fini,
};
