/* The reference library of `hilal night`: reference images indexed by
 * filter, field name and WCS footprint, matched to science frames, and a
 * bounded cache of their pixels so that each reference is read once per
 * night and copied into every frame of its field (docs/night.md). */
#define _GNU_SOURCE /* strcasecmp */

#include <ctype.h>
#include <limits.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "hilal/fits.h"
#include "hilal/ingest.h"
#include "hilal/log.h"
#include "hilal/night.h"
#include "hilal/wcs.h"
#include "night_internal.h"

#define GRID 16 /* overlap sampling: GRID x GRID points over the science frame */

typedef struct ref_entry {
    hilal_reflib_entry pub;
    struct wcsprm *wcs;     /* copy of the reference WCS (NULL without one) */
    hilal_image *img;       /* cached pixels, NULL when not cached */
    int loading;            /* a thread is reading it */
    int users;              /* threads copying from img */
    unsigned long last_use; /* LRU clock */
} ref_entry;

struct hilal_reflib {
    hilal_ingest_opts ingest;
    char field_key[HILAL_INGEST_KEY_MAX];
    double min_overlap;
    int match_filter;
    size_t cache_max;

    pthread_mutex_t mutex;  /* guards everything below and the WCS structs */
    pthread_cond_t cond;    /* signalled when a read finishes */
    ref_entry *e;
    size_t n, cap;
    size_t ncached, reads;
    unsigned long tick;
};

/* ------------------------------------------------------------------------
 * The [night] parameters
 * ------------------------------------------------------------------------ */

static const hilal_param night_params[] = {
    {"field_key", HILAL_PARAM_STRING, "", 0, 0, "",
     "header keyword naming the field (e.g. FIELD or OBJECT): science frames take a reference "
     "with the same value; empty = match by WCS footprint only"},
    {"min_overlap", HILAL_PARAM_DOUBLE, "0.5", 0.01, 1, "",
     "least fraction of the science footprint a reference must cover to be matched"},
    {"match_filter", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "match only references with the science frame's filter (an unknown filter matches any)"},
    {"report", HILAL_PARAM_STRING, "", 0, 0, "",
     "JSON run report of `hilal night`/`reprocess`; empty = next to the archive, "
     "ARCHIVE-without-.h5.run<RUN>.report.json",
     HILAL_PARAM_EXECUTION},
    {"ref_cache", HILAL_PARAM_INT, "0", 0, 4096, "",
     "reference images kept in memory (each about 6 bytes per pixel); 0 = workers + 2",
     HILAL_PARAM_EXECUTION},
};

const hilal_param_section hilal_night_section = {
    "night", "nightly batches: reference matching and run report (`hilal night`, `hilal reprocess`)",
    night_params, sizeof night_params / sizeof night_params[0]};

/* ------------------------------------------------------------------------
 * Listing inputs
 * ------------------------------------------------------------------------ */

static int has_fits_suffix(const char *name)
{
    static const char *const suffixes[] = {".fits", ".fit", ".fts", ".fits.gz", ".fit.gz",
                                           ".fts.gz", ".fits.fz", ".fz"};
    size_t len = strlen(name);
    for (size_t i = 0; i < sizeof suffixes / sizeof suffixes[0]; i++) {
        size_t k = strlen(suffixes[i]);
        if (len > k && strcasecmp(name + len - k, suffixes[i]) == 0)
            return 1;
    }
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Appends (path, hdu) to the growing arrays. */
static hilal_status push_input(char ***paths, int **hdus, size_t *n, size_t *cap,
                               const char *path, int hdu, hilal_error *err)
{
    if (*n == *cap) {
        size_t c = *cap * 2 + 16;
        char **p = realloc(*paths, c * sizeof *p);
        if (p != NULL)
            *paths = p;
        int *h = p != NULL ? realloc(*hdus, c * sizeof *h) : NULL;
        if (h != NULL)
            *hdus = h;
        if (p == NULL || h == NULL)
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        *cap = c;
    }
    (*paths)[*n] = strdup(path);
    if ((*paths)[*n] == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    (*hdus)[*n] = hdu;
    (*n)++;
    return HILAL_OK;
}

static hilal_status list_dir(const char *dir, char ***paths, int **hdus, size_t *n, size_t *cap,
                             hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char **names = NULL;
    size_t nn = 0, ncap = 0;
    DIR *d = opendir(dir);
    if (d == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot read directory %s: %s", dir,
                               strerror(errno));
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || !has_fits_suffix(de->d_name))
            continue;
        if (nn == ncap) {
            size_t c = ncap * 2 + 32;
            char **p = realloc(names, c * sizeof *p);
            if (p == NULL) {
                st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
                goto cleanup;
            }
            names = p;
            ncap = c;
        }
        names[nn] = strdup(de->d_name);
        if (names[nn] == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
            goto cleanup;
        }
        nn++;
    }
    if (nn > 1)
        qsort(names, nn, sizeof *names, cmp_str);
    for (size_t i = 0; i < nn && st == HILAL_OK; i++) {
        char path[4096];
        struct stat sb;
        size_t dl = strlen(dir);
        snprintf(path, sizeof path, "%s%s%s", dir, dl > 0 && dir[dl - 1] == '/' ? "" : "/",
                 names[i]);
        if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
            continue;
        st = push_input(paths, hdus, n, cap, path, 0, err);
    }
cleanup:
    for (size_t i = 0; i < nn; i++)
        free(names[i]);
    free(names);
    closedir(d);
    return st;
}

static hilal_status list_file(const char *list, char ***paths, int **hdus, size_t *n,
                              size_t *cap, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char line[4096], base[4096];
    long lineno = 0;
    FILE *f = fopen(list, "r");
    if (f == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot read list file %s: %s", list,
                               strerror(errno));
    /* Directory of the list file, for relative entries. */
    snprintf(base, sizeof base, "%s", list);
    char *slash = strrchr(base, '/');
    if (slash != NULL)
        slash[1] = '\0';
    else
        base[0] = '\0';
    while (st == HILAL_OK && fgets(line, sizeof line, f) != NULL) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash != NULL)
            *hash = '\0';
        char *p = line;
        while (isspace((unsigned char)*p))
            p++;
        if (*p == '\0')
            continue;
        char *end = p;
        while (*end != '\0' && !isspace((unsigned char)*end))
            end++;
        int hdu = 0;
        if (*end != '\0') {
            *end++ = '\0';
            while (isspace((unsigned char)*end))
                end++;
            if (*end != '\0') {
                char *e2 = NULL;
                long v = strtol(end, &e2, 10);
                while (e2 != NULL && isspace((unsigned char)*e2))
                    e2++;
                if (e2 == end || (e2 != NULL && *e2 != '\0') || v < 1 || v > 100000) {
                    st = hilal_error_set(err, HILAL_ERR_FORMAT,
                                         "%s:%ld: '%s' is not an HDU number; lines are "
                                         "\"PATH [HDU]\" with HDU 1 = primary", list, lineno, end);
                    break;
                }
                hdu = (int)v;
            }
        }
        char path[8192];
        if (p[0] == '/' || base[0] == '\0')
            snprintf(path, sizeof path, "%s", p);
        else
            snprintf(path, sizeof path, "%s%s", base, p);
        st = push_input(paths, hdus, n, cap, path, hdu, err);
    }
    if (st == HILAL_OK && ferror(f))
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot read list file %s", list);
    fclose(f);
    return st;
}

void hilal_night_free_list(char **paths, int *hdus, size_t n)
{
    if (paths != NULL)
        for (size_t i = 0; i < n; i++)
            free(paths[i]);
    free(paths);
    free(hdus);
}

hilal_status hilal_night_list_inputs(const char *dir_or_list, char ***paths, int **hdus,
                                     size_t *n, hilal_error *err)
{
    struct stat sb;
    size_t cap = 0;
    hilal_status st;
    char abs[PATH_MAX];
    *paths = NULL;
    *hdus = NULL;
    *n = 0;
    if (stat(dir_or_list, &sb) != 0)
        return hilal_error_set(err, errno == ENOENT ? HILAL_ERR_NOTFOUND : HILAL_ERR_IO,
                               "cannot access %s: %s", dir_or_list, strerror(errno));
    /* Absolute paths: the archive records them, and `hilal reprocess` must
     * find the files from any working directory. */
    if (realpath(dir_or_list, abs) != NULL)
        dir_or_list = abs;
    if (S_ISDIR(sb.st_mode))
        st = list_dir(dir_or_list, paths, hdus, n, &cap, err);
    else if (has_fits_suffix(dir_or_list))
        st = push_input(paths, hdus, n, &cap, dir_or_list, 0, err);
    else
        st = list_file(dir_or_list, paths, hdus, n, &cap, err);
    if (st != HILAL_OK) {
        hilal_night_free_list(*paths, *hdus, *n);
        *paths = NULL;
        *hdus = NULL;
        *n = 0;
    }
    return st;
}

/* ------------------------------------------------------------------------
 * The library
 * ------------------------------------------------------------------------ */

hilal_status hilal_reflib_new(const hilal_config *cfg, hilal_reflib **out, hilal_error *err)
{
    *out = NULL;
    hilal_reflib *lib = calloc(1, sizeof *lib);
    if (lib == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_status st = hilal_ingest_opts_from_config(cfg, &lib->ingest, err);
    if (st != HILAL_OK) {
        free(lib);
        return st;
    }
    const char *key = hilal_config_get_string(cfg, "night.field_key");
    if (strlen(key) >= sizeof lib->field_key) {
        free(lib);
        return hilal_error_set(err, HILAL_ERR_CONFIG, "night.field_key '%s' is longer than %d "
                               "characters", key, HILAL_INGEST_KEY_MAX - 1);
    }
    snprintf(lib->field_key, sizeof lib->field_key, "%s", key);
    lib->min_overlap = hilal_config_get_double(cfg, "night.min_overlap");
    lib->match_filter = hilal_config_get_bool(cfg, "night.match_filter");
    long cache = hilal_config_get_int(cfg, "night.ref_cache");
    lib->cache_max = cache > 0 ? (size_t)cache
                               : (size_t)hilal_config_get_int(cfg, "pipeline.workers") + 2;
    pthread_mutex_init(&lib->mutex, NULL);
    pthread_cond_init(&lib->cond, NULL);
    *out = lib;
    return HILAL_OK;
}

void hilal_reflib_free(hilal_reflib *lib)
{
    if (lib == NULL)
        return;
    for (size_t i = 0; i < lib->n; i++) {
        hilal_wcs_free(lib->e[i].wcs);
        hilal_image_free(lib->e[i].img);
    }
    free(lib->e);
    pthread_mutex_destroy(&lib->mutex);
    pthread_cond_destroy(&lib->cond);
    free(lib);
}

size_t hilal_reflib_count(const hilal_reflib *lib)
{
    return lib != NULL ? lib->n : 0;
}

const hilal_reflib_entry *hilal_reflib_entry_at(const hilal_reflib *lib, size_t i)
{
    return lib != NULL && i < lib->n ? &lib->e[i].pub : NULL;
}

size_t hilal_reflib_reads(const hilal_reflib *lib)
{
    return lib != NULL ? lib->reads : 0;
}

long hilal_reflib_find(const hilal_reflib *lib, const char *path, int hdu)
{
    if (lib == NULL)
        return -1;
    for (size_t i = 0; i < lib->n; i++)
        if (strcmp(lib->e[i].pub.path, path) == 0 && (hdu < 1 || lib->e[i].pub.hdu == hdu))
            return (long)i;
    return -1;
}

/* Great-circle distance, degrees (haversine). */
static double dist_deg(double ra1, double dec1, double ra2, double dec2)
{
    const double d2r = M_PI / 180.0;
    double sdd = sin(0.5 * (dec2 - dec1) * d2r), sdr = sin(0.5 * (ra2 - ra1) * d2r);
    double h = sdd * sdd + cos(dec1 * d2r) * cos(dec2 * d2r) * sdr * sdr;
    return 2.0 * asin(sqrt(h < 1 ? h : 1)) / d2r;
}

/* Centre of an image's footprint and the distance to its farthest corner. */
static void footprint(struct wcsprm *wcs, long nx, long ny, double *ra, double *dec,
                      double *radius)
{
    double x[5] = {0.5 * (nx + 1), 0.5, nx + 0.5, 0.5, nx + 0.5};
    double y[5] = {0.5 * (ny + 1), 0.5, 0.5, ny + 0.5, ny + 0.5};
    double r[5], d[5];
    hilal_error ignored = {0};
    *ra = *dec = *radius = NAN;
    if (hilal_wcs_pix2sky(wcs, 5, x, y, r, d, &ignored) != HILAL_OK || !isfinite(r[0]))
        return;
    *ra = r[0];
    *dec = d[0];
    double rmax = 0;
    for (int i = 1; i < 5; i++)
        if (isfinite(r[i]) && dist_deg(r[0], d[0], r[i], d[i]) > rmax)
            rmax = dist_deg(r[0], d[0], r[i], d[i]);
    *radius = rmax;
}

double hilal_reflib_overlap(struct wcsprm *a, long nx, long ny, struct wcsprm *b, long rnx,
                            long rny)
{
    double x[GRID * GRID], y[GRID * GRID], ra[GRID * GRID], dec[GRID * GRID];
    double rx[GRID * GRID], ry[GRID * GRID];
    hilal_error ignored = {0};
    if (a == NULL || b == NULL || !hilal_wcs_same_system(a, b, NULL, 0))
        return 0;
    /* Sample the science footprint (FITS pixels 0.5 .. n + 0.5) at the
     * centres of a GRID x GRID grid of cells, project each point onto the
     * reference and count those that land inside it. */
    for (int j = 0; j < GRID; j++)
        for (int i = 0; i < GRID; i++) {
            x[j * GRID + i] = 0.5 + (i + 0.5) * (double)nx / GRID;
            y[j * GRID + i] = 0.5 + (j + 0.5) * (double)ny / GRID;
        }
    if (hilal_wcs_pix2sky(a, GRID * GRID, x, y, ra, dec, &ignored) != HILAL_OK)
        return 0;
    if (hilal_wcs_sky2pix(b, GRID * GRID, ra, dec, rx, ry, &ignored) != HILAL_OK)
        return 0;
    int inside = 0;
    for (int k = 0; k < GRID * GRID; k++)
        if (isfinite(rx[k]) && isfinite(ry[k]) && rx[k] >= 0.5 && rx[k] <= rnx + 0.5 &&
            ry[k] >= 0.5 && ry[k] <= rny + 0.5)
            inside++;
    return (double)inside / (GRID * GRID);
}

/* Evicts least recently used cached images no thread is using until the
 * cache holds at most cache_max (lock held). */
static void evict(hilal_reflib *lib)
{
    while (lib->ncached > lib->cache_max) {
        ref_entry *victim = NULL;
        for (size_t i = 0; i < lib->n; i++) {
            ref_entry *e = &lib->e[i];
            if (e->img != NULL && e->users == 0 && (victim == NULL || e->last_use < victim->last_use))
                victim = e;
        }
        if (victim == NULL)
            return; /* all in use: the next release evicts */
        hilal_image_free(victim->img);
        victim->img = NULL;
        lib->ncached--;
    }
}

static hilal_status read_reference(const hilal_reflib *lib, const char *path, int hdu,
                                   hilal_image **img, hilal_error *err)
{
    hilal_status st = hilal_ingest_read(&lib->ingest, path, hdu, img, NULL, err);
    if (st != HILAL_OK)
        hilal_error_context(err, "reference %s", path);
    return st;
}

hilal_status hilal_reflib_add(hilal_reflib *lib, const char *path, int hdu, size_t *index,
                              hilal_error *err)
{
    hilal_image *img = NULL;
    hilal_status st = HILAL_OK;
    long have = hilal_reflib_find(lib, path, hdu);
    if (have >= 0) {
        if (index != NULL)
            *index = (size_t)have;
        return HILAL_OK;
    }
    st = read_reference(lib, path, hdu, &img, err);
    if (st != HILAL_OK)
        return st;
    pthread_mutex_lock(&lib->mutex);
    lib->reads++;
    /* With hdu 0 the HDU is known only now: the file may be listed already. */
    for (size_t i = 0; i < lib->n; i++)
        if (strcmp(lib->e[i].pub.path, path) == 0 && lib->e[i].pub.hdu == img->meta.hdu) {
            if (index != NULL)
                *index = i;
            goto cleanup;
        }
    if (lib->n == lib->cap) {
        size_t c = lib->cap * 2 + 8;
        ref_entry *p = realloc(lib->e, c * sizeof *p);
        if (p == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
            goto cleanup;
        }
        lib->e = p;
        lib->cap = c;
    }
    ref_entry *e = &lib->e[lib->n];
    memset(e, 0, sizeof *e);
    hilal_reflib_entry *pub = &e->pub;
    snprintf(pub->path, sizeof pub->path, "%s", path);
    pub->hdu = img->meta.hdu;
    snprintf(pub->sha256, sizeof pub->sha256, "%s", img->meta.sha256);
    snprintf(pub->filter, sizeof pub->filter, "%s", img->meta.filter);
    if (lib->field_key[0] != '\0' && img->meta.header != NULL)
        hilal_fits_header_get(img->meta.header, img->meta.nheader_cards, lib->field_key,
                              pub->field, sizeof pub->field);
    pub->nx = img->nx;
    pub->ny = img->ny;
    pub->ra_deg = pub->dec_deg = pub->radius_deg = NAN;
    hilal_error werr = {0};
    if (img->meta.wcs != NULL && hilal_wcs_check(img->meta.wcs, img->nx, img->ny, &werr) == HILAL_OK &&
        hilal_wcs_copy(img->meta.wcs, &e->wcs, &werr) == HILAL_OK) {
        pub->has_wcs = 1;
        footprint(e->wcs, img->nx, img->ny, &pub->ra_deg, &pub->dec_deg, &pub->radius_deg);
    } else if (img->meta.wcs != NULL) {
        hilal_log(HILAL_LOG_WARN, "reference %s: WCS unusable (%s): it can be matched by "
                  "night.field_key only", path, werr.msg);
    }
    e->last_use = ++lib->tick;
    /* Keep the pixels while the cache has room: the first frames of the
     * night then need no second read. */
    if (lib->ncached < lib->cache_max) {
        e->img = img;
        img = NULL;
        lib->ncached++;
    }
    if (index != NULL)
        *index = lib->n;
    lib->n++;
cleanup:
    pthread_mutex_unlock(&lib->mutex);
    hilal_image_free(img);
    return st;
}

hilal_status hilal_reflib_add_dir(hilal_reflib *lib, const char *dir_or_list, size_t *nbad,
                                  hilal_error *err)
{
    char **paths = NULL;
    int *hdus = NULL;
    size_t n = 0, bad = 0;
    if (nbad != NULL)
        *nbad = 0;
    hilal_status st = hilal_night_list_inputs(dir_or_list, &paths, &hdus, &n, err);
    if (st != HILAL_OK) {
        hilal_error_context(err, "reference library");
        return st;
    }
    for (size_t i = 0; i < n; i++) {
        hilal_error e = {0};
        hilal_status s = hilal_reflib_add(lib, paths[i], hdus[i], NULL, &e);
        if (s == HILAL_ERR_NOMEM) {
            st = hilal_error_set(err, s, "%s", e.msg);
            break;
        }
        if (s != HILAL_OK) {
            hilal_log(HILAL_LOG_WARN, "reference library: %s left out: %s", paths[i], e.msg);
            bad++;
        }
    }
    hilal_night_free_list(paths, hdus, n);
    if (nbad != NULL)
        *nbad = bad;
    return st;
}

/* Whether a reference's filter is acceptable for a science filter. */
static int filter_ok(const hilal_reflib *lib, const char *sci, const char *ref)
{
    return !lib->match_filter || sci[0] == '\0' || ref[0] == '\0' || strcasecmp(sci, ref) == 0;
}

hilal_status hilal_reflib_match(hilal_reflib *lib, const hilal_image *sci, size_t *index,
                                double *overlap, hilal_error *err)
{
    char field[72] = "";
    double sra = NAN, sdec = NAN, srad = NAN;
    hilal_error werr = {0};
    long best = -1;
    double best_ov = -1;
    size_t nfilter = 0;
    hilal_status st = HILAL_OK;
    *overlap = NAN;
    struct wcsprm *swcs = sci->meta.wcs;
    if (swcs != NULL && hilal_wcs_check(swcs, sci->nx, sci->ny, &werr) != HILAL_OK)
        swcs = NULL;
    if (lib->field_key[0] != '\0' && sci->meta.header != NULL)
        hilal_fits_header_get(sci->meta.header, sci->meta.nheader_cards, lib->field_key, field,
                              sizeof field);
    if (swcs != NULL)
        footprint(swcs, sci->nx, sci->ny, &sra, &sdec, &srad);

    pthread_mutex_lock(&lib->mutex);
    if (lib->n == 0) {
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND, "the reference library is empty");
        goto cleanup;
    }
    /* 1. The field-name shortcut. */
    if (field[0] != '\0') {
        for (size_t i = 0; i < lib->n; i++) {
            ref_entry *e = &lib->e[i];
            if (strcmp(e->pub.field, field) != 0 || !filter_ok(lib, sci->meta.filter, e->pub.filter))
                continue;
            double ov = swcs != NULL && e->wcs != NULL
                            ? hilal_reflib_overlap(swcs, sci->nx, sci->ny, e->wcs, e->pub.nx, e->pub.ny)
                            : NAN;
            if (best < 0 || (isfinite(ov) && ov > best_ov)) {
                best = (long)i;
                best_ov = isfinite(ov) ? ov : -1;
            }
        }
        if (best >= 0) {
            *index = (size_t)best;
            *overlap = best_ov >= 0 ? best_ov : NAN;
            goto cleanup;
        }
    }
    /* 2. The footprint with the largest overlap. */
    if (swcs == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND,
                             "the frame has no usable WCS%s%s%s%s%s",
                             lib->field_key[0] ? " and no reference has its " : "",
                             lib->field_key[0] ? lib->field_key : "",
                             lib->field_key[0] ? " value '" : "", field,
                             lib->field_key[0] ? "'" : "");
        goto cleanup;
    }
    for (size_t i = 0; i < lib->n; i++) {
        ref_entry *e = &lib->e[i];
        if (!filter_ok(lib, sci->meta.filter, e->pub.filter))
            continue;
        nfilter++;
        if (e->wcs == NULL || !isfinite(e->pub.ra_deg) || !isfinite(sra))
            continue;
        /* Footprints farther apart than their radii cannot overlap. */
        if (dist_deg(sra, sdec, e->pub.ra_deg, e->pub.dec_deg) > srad + e->pub.radius_deg)
            continue;
        double ov = hilal_reflib_overlap(swcs, sci->nx, sci->ny, e->wcs, e->pub.nx, e->pub.ny);
        if (ov > best_ov) {
            best_ov = ov;
            best = (long)i;
        }
    }
    if (best >= 0 && best_ov >= lib->min_overlap) {
        *index = (size_t)best;
        *overlap = best_ov;
    } else if (nfilter == 0) {
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND,
                             "none of the %zu references is in filter '%s' "
                             "(night.match_filter)", lib->n, sci->meta.filter);
    } else if (best >= 0 && best_ov > 0) {
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND,
                             "the best reference, %s, covers %.0f%% of the frame, less "
                             "than night.min_overlap = %.0f%%", lib->e[best].pub.path,
                             100 * best_ov, 100 * lib->min_overlap);
    } else {
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND,
                             "none of the %zu references in filter '%s' overlaps "
                             "the frame (centre RA %.5f, Dec %.5f)", nfilter, sci->meta.filter,
                             sra, sdec);
    }
cleanup:
    pthread_mutex_unlock(&lib->mutex);
    return st;
}

hilal_status hilal_reflib_get(hilal_reflib *lib, size_t index, hilal_image **copy,
                              hilal_error *err)
{
    hilal_status st = HILAL_OK;
    *copy = NULL;
    pthread_mutex_lock(&lib->mutex);
    if (index >= lib->n) {
        pthread_mutex_unlock(&lib->mutex);
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "reference index %zu out of range", index);
    }
    ref_entry *e = &lib->e[index];
    while (e->loading)
        pthread_cond_wait(&lib->cond, &lib->mutex);
    if (e->img == NULL) {
        /* Read it without holding the lock (other frames go on), then
         * check it is still the file the library indexed. */
        char path[1024];
        int hdu = e->pub.hdu;
        snprintf(path, sizeof path, "%s", e->pub.path);
        e->loading = 1;
        pthread_mutex_unlock(&lib->mutex);
        hilal_image *img = NULL;
        st = read_reference(lib, path, hdu, &img, err);
        pthread_mutex_lock(&lib->mutex);
        e = &lib->e[index];
        e->loading = 0;
        pthread_cond_broadcast(&lib->cond);
        if (st == HILAL_OK) {
            lib->reads++;
            if (strcmp(img->meta.sha256, e->pub.sha256) != 0) {
                st = hilal_error_set(err, HILAL_ERR_MISMATCH,
                                     "reference %s changed during the night (SHA-256 %.12s... "
                                     "now, %.12s... when the library was read)", path,
                                     img->meta.sha256, e->pub.sha256);
                hilal_image_free(img);
            } else {
                e->img = img;
                lib->ncached++;
            }
        }
        if (st != HILAL_OK) {
            pthread_mutex_unlock(&lib->mutex);
            return st;
        }
    }
    e->users++;
    e->last_use = ++lib->tick;
    evict(lib);
    const hilal_image *src = e->img;
    pthread_mutex_unlock(&lib->mutex);

    /* The copy is made outside the lock: the cached image is read-only
     * while users > 0. */
    *copy = hilal_image_clone(src, err);
    if (*copy == NULL)
        st = err != NULL && err->code != HILAL_OK ? err->code : HILAL_ERR_NOMEM;

    pthread_mutex_lock(&lib->mutex);
    lib->e[index].users--;
    evict(lib);
    pthread_mutex_unlock(&lib->mutex);
    return st;
}
