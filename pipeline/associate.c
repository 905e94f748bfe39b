/* Association of detections into objects (see associate.h). */
#include "associate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define D2R (3.14159265358979323846 / 180.0)

/* Sky cells: declination bands of height h (the association radius, deg);
 * band j holds n_j right-ascension cells, n_j chosen so that a cell is at
 * least h wide on the sky everywhere in the band (the band edge nearer the
 * pole decides). An object lives in the cell of its mean position; a query
 * visits the cells of the three bands around it that a circle of radius h
 * can touch. */
struct hilal_assoc {
    double radius_deg;
    long nbands;
    hilal_archive_object *obj;
    int64_t *cell;        /* per object: its cell key */
    size_t *next;         /* per object: next object (index + 1) in the same cell, 0 = end */
    size_t n, cap;
    /* Open-addressing hash map: cell key -> first object (index + 1). */
    int64_t *keys;
    size_t *heads;
    size_t hcap, hused;
};

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

double hilal_assoc_sep_arcsec(double ra1, double dec1, double ra2, double dec2)
{
    double sdd = sin(0.5 * (dec2 - dec1) * D2R), sdr = sin(0.5 * (ra2 - ra1) * D2R);
    double h = sdd * sdd + cos(dec1 * D2R) * cos(dec2 * D2R) * sdr * sdr;
    return 2.0 * asin(sqrt(h < 1 ? h : 1)) / D2R * 3600.0;
}

double hilal_assoc_pos_err_arcsec(double fwhm_px, double snr, double pixscale_arcsec)
{
    /* Centroid error of a point source: sigma_PSF / SNR per axis. */
    double s = fwhm_px / 2.3548 / fabs(snr) * pixscale_arcsec;
    if (!isfinite(s) || s <= 0)
        return 0.3;
    return s < 0.01 ? 0.01 : s;
}

void hilal_assoc_finish_position(hilal_archive_object *o)
{
    /* Mean direction: the weighted sum of unit vectors, renormalised. */
    double r = sqrt(o->sum_wx * o->sum_wx + o->sum_wy * o->sum_wy + o->sum_wz * o->sum_wz);
    if (!(o->sum_w > 0) || !(r > 0)) {
        o->ra = o->dec = o->pos_err_arcsec = NAN;
        return;
    }
    o->dec = asin(o->sum_wz / r) / D2R;
    o->ra = atan2(o->sum_wy, o->sum_wx) / D2R;
    if (o->ra < 0)
        o->ra += 360.0;
    /* Error of an inverse-variance weighted mean. */
    o->pos_err_arcsec = 1.0 / sqrt(o->sum_w);
}

static long band_of(const hilal_assoc *a, double dec)
{
    long j = (long)floor((dec + 90.0) / a->radius_deg);
    return j < 0 ? 0 : (j >= a->nbands ? a->nbands - 1 : j);
}

static long band_cells(const hilal_assoc *a, long j)
{
    double lo = -90.0 + (double)j * a->radius_deg, hi = lo + a->radius_deg;
    double worst = fmax(fabs(lo), fabs(hi));
    if (worst >= 90.0)
        return 1;
    double n = floor(360.0 * cos(worst * D2R) / a->radius_deg);
    return n < 1 ? 1 : (n > 4e9 ? 4000000000L : (long)n);
}

static long ra_cell(double ra, long ncell)
{
    double r = fmod(ra, 360.0);
    if (r < 0)
        r += 360.0;
    long i = (long)floor(r / 360.0 * (double)ncell);
    return i >= ncell ? ncell - 1 : i;
}

static int64_t key_of(long j, long i) { return ((int64_t)j << 32) | (int64_t)(uint32_t)i; }

static int64_t cell_key(const hilal_assoc *a, double ra, double dec)
{
    long j = band_of(a, dec);
    return key_of(j, ra_cell(ra, band_cells(a, j)));
}

/* Slot of key in the hash map (where it is or would go). */
static size_t slot_of(const hilal_assoc *a, int64_t key)
{
    size_t m = a->hcap - 1, s = (size_t)mix64((uint64_t)key) & m;
    while (a->heads[s] != 0 && a->keys[s] != key)
        s = (s + 1) & m;
    return s;
}

static int grow_map(hilal_assoc *a)
{
    size_t ncap = a->hcap ? a->hcap * 2 : 1024;
    int64_t *ok = a->keys;
    size_t *oh = a->heads, ocap = a->hcap;
    a->keys = calloc(ncap, sizeof *a->keys);
    a->heads = calloc(ncap, sizeof *a->heads);
    if (a->keys == NULL || a->heads == NULL) {
        free(a->keys);
        free(a->heads);
        a->keys = ok;
        a->heads = oh;
        return -1;
    }
    a->hcap = ncap;
    a->hused = 0;
    for (size_t s = 0; s < ocap; s++)
        if (oh[s] != 0 && oh[s] != SIZE_MAX) {
            size_t t = slot_of(a, ok[s]);
            a->keys[t] = ok[s];
            a->heads[t] = oh[s];
            a->hused++;
        }
    free(ok);
    free(oh);
    return 0;
}

/* Links object index k into its cell (a->cell[k] set by the caller).
 * Empty map slots are never reused for another key once taken (a cell
 * whose list empties keeps its slot with head 0 only transiently: see
 * unlink_obj), so probing stays correct. */
static int link_obj(hilal_assoc *a, size_t k)
{
    if ((a->hused + 1) * 2 > a->hcap && grow_map(a) != 0)
        return -1;
    size_t s = slot_of(a, a->cell[k]);
    if (a->heads[s] == 0) {
        a->keys[s] = a->cell[k];
        a->hused++;
    }
    a->next[k] = a->heads[s] == SIZE_MAX ? 0 : a->heads[s];
    a->heads[s] = k + 1;
    return 0;
}

/* Removes object k from its cell's list. A cell left empty keeps a
 * tombstone so that probe chains through it stay intact: its head points
 * at no object but the key stays (heads[s] = SIZE_MAX marks it). */
static void unlink_obj(hilal_assoc *a, size_t k)
{
    size_t m = a->hcap - 1, s = (size_t)mix64((uint64_t)a->cell[k]) & m;
    while (a->heads[s] != 0 && a->keys[s] != a->cell[k])
        s = (s + 1) & m;
    if (a->heads[s] == 0)
        return;
    size_t *p = &a->heads[s];
    while (*p != 0 && *p != SIZE_MAX && *p != k + 1)
        p = &a->next[*p - 1];
    if (*p == k + 1)
        *p = a->next[k];
    if (a->heads[s] == 0)
        a->heads[s] = SIZE_MAX; /* tombstone: empty list, key kept */
    a->next[k] = 0;
}

void hilal_assoc_accumulate(hilal_archive_object *o, double ra, double dec, double pos_err_arcsec,
                            double snr, double mjd, int64_t cand_id)
{
    /* Inverse-variance weight and the detection's unit vector. */
    double w = 1.0 / (pos_err_arcsec * pos_err_arcsec);
    o->sum_w += w;
    o->sum_wx += w * cos(dec * D2R) * cos(ra * D2R);
    o->sum_wy += w * cos(dec * D2R) * sin(ra * D2R);
    o->sum_wz += w * sin(dec * D2R);
    hilal_assoc_finish_position(o);
    o->ndet++;
    if (snr > 0)
        o->npos++;
    else if (snr < 0)
        o->nneg++;
    if (o->ndet == 1 || mjd < o->first_mjd) {
        o->first_mjd = mjd;
        o->first_cand_id = cand_id;
    }
    if (o->ndet == 1 || mjd >= o->last_mjd)
        o->last_mjd = mjd;
    if (cand_id > o->last_cand_id)
        o->last_cand_id = cand_id;
}

hilal_assoc *hilal_assoc_new(double radius_arcsec)
{
    if (!(radius_arcsec > 0) || !isfinite(radius_arcsec))
        return NULL;
    hilal_assoc *a = calloc(1, sizeof *a);
    if (a == NULL)
        return NULL;
    a->radius_deg = radius_arcsec / 3600.0;
    a->nbands = (long)ceil(180.0 / a->radius_deg);
    if (grow_map(a) != 0) {
        free(a);
        return NULL;
    }
    return a;
}

void hilal_assoc_free(hilal_assoc *a)
{
    if (a == NULL)
        return;
    free(a->obj);
    free(a->cell);
    free(a->next);
    free(a->keys);
    free(a->heads);
    free(a);
}

size_t hilal_assoc_count(const hilal_assoc *a) { return a->n; }

const hilal_archive_object *hilal_assoc_get(const hilal_assoc *a, int64_t id)
{
    if (id < 1 || (size_t)id > a->n)
        return NULL;
    return &a->obj[id - 1];
}

static int reserve(hilal_assoc *a)
{
    if (a->n < a->cap)
        return 0;
    size_t cap = a->cap ? a->cap * 2 : 256;
    hilal_archive_object *o = realloc(a->obj, cap * sizeof *o);
    if (o == NULL)
        return -1;
    a->obj = o;
    int64_t *c = realloc(a->cell, cap * sizeof *c);
    if (c == NULL)
        return -1;
    a->cell = c;
    size_t *nx = realloc(a->next, cap * sizeof *nx);
    if (nx == NULL)
        return -1;
    a->next = nx;
    a->cap = cap;
    return 0;
}

/* Indexes object k at its position (objects without one are not indexed). */
static int index_obj(hilal_assoc *a, size_t k)
{
    const hilal_archive_object *o = &a->obj[k];
    a->next[k] = 0;
    if (!isfinite(o->ra) || !isfinite(o->dec)) {
        a->cell[k] = INT64_MIN;
        return 0;
    }
    a->cell[k] = cell_key(a, o->ra, o->dec);
    return link_obj(a, k);
}

hilal_status hilal_assoc_load(hilal_assoc *a, const hilal_archive_object *obj, hilal_error *err)
{
    if (obj->object_id != (int64_t)a->n + 1)
        return hilal_error_set(err, HILAL_ERR_FORMAT, "/objects row %zu has object_id %lld",
                               a->n, (long long)obj->object_id);
    if (reserve(a) != 0)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu objects", a->n + 1);
    a->obj[a->n] = *obj;
    if (index_obj(a, a->n) != 0)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the object index");
    a->n++;
    return HILAL_OK;
}

int64_t hilal_assoc_match(const hilal_assoc *a, double ra, double dec, double *dist_arcsec)
{
    int64_t best = 0;
    double best_d = INFINITY, r_arcsec = a->radius_deg * 3600.0;
    if (dist_arcsec != NULL)
        *dist_arcsec = NAN;
    if (!isfinite(ra) || !isfinite(dec))
        return 0;
    long j0 = band_of(a, dec);
    /* Half-width in RA (deg) of the circle at its widest latitude. */
    double widest = fmin(89.999999, fabs(dec) + a->radius_deg);
    double dra = a->radius_deg / cos(widest * D2R);
    for (long j = j0 - 1; j <= j0 + 1; j++) {
        if (j < 0 || j >= a->nbands)
            continue;
        long nc = band_cells(a, j), ic = ra_cell(ra, nc);
        double width = 360.0 / (double)nc;
        long k = (long)ceil(dra / width);
        long lo = ic - k, hi = ic + k;
        if (2 * k + 1 >= nc) {
            lo = 0;
            hi = nc - 1;
        }
        for (long i = lo; i <= hi; i++) {
            long ii = ((i % nc) + nc) % nc;
            int64_t key = key_of(j, ii);
            size_t s = slot_of(a, key);
            if (a->heads[s] == 0 || a->heads[s] == SIZE_MAX)
                continue;
            for (size_t p = a->heads[s]; p != 0; p = a->next[p - 1]) {
                const hilal_archive_object *o = &a->obj[p - 1];
                double d = hilal_assoc_sep_arcsec(ra, dec, o->ra, o->dec);
                /* Nearest wins; ties go to the older object. */
                if (d <= r_arcsec && (d < best_d || (d == best_d && o->object_id < best))) {
                    best_d = d;
                    best = o->object_id;
                }
            }
        }
    }
    if (best != 0 && dist_arcsec != NULL)
        *dist_arcsec = best_d;
    return best;
}

int64_t hilal_assoc_add(hilal_assoc *a, int64_t id, double ra, double dec, double pos_err_arcsec,
                        double snr, double mjd, int64_t cand_id, int64_t *prev_cand_id)
{
    *prev_cand_id = 0;
    if (!isfinite(ra) || !isfinite(dec))
        return 0;
    size_t k;
    if (id == 0) {
        if (reserve(a) != 0)
            return 0;
        k = a->n;
        memset(&a->obj[k], 0, sizeof a->obj[k]);
        a->obj[k].object_id = (int64_t)k + 1;
        a->obj[k].first_mjd = a->obj[k].last_mjd = mjd;
        a->obj[k].first_cand_id = cand_id;
        a->cell[k] = INT64_MIN;
        a->next[k] = 0;
        a->n++;
    } else {
        if (id < 1 || (size_t)id > a->n)
            return 0;
        k = (size_t)id - 1;
        *prev_cand_id = a->obj[k].last_cand_id;
        if (a->cell[k] != INT64_MIN)
            unlink_obj(a, k);
    }
    hilal_archive_object *o = &a->obj[k];
    hilal_assoc_accumulate(o, ra, dec, pos_err_arcsec, snr, mjd, cand_id);
    if (index_obj(a, k) != 0)
        return 0;
    return o->object_id;
}

hilal_status hilal_assoc_replace(hilal_assoc *a, const hilal_archive_object *obj, hilal_error *err)
{
    if (obj->object_id < 1 || (size_t)obj->object_id > a->n)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "no object %lld to replace",
                               (long long)obj->object_id);
    size_t k = (size_t)obj->object_id - 1;
    if (a->cell[k] != INT64_MIN)
        unlink_obj(a, k);
    a->obj[k] = *obj;
    if (index_obj(a, k) != 0)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the object index");
    return HILAL_OK;
}
