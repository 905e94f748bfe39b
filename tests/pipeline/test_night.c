/* The night's library pieces: input lists, the reference library (matching
 * by footprint, filter and field key; the cache), hilal_night_run() on a
 * simulated night (outcomes, report, resuming), and merging archives. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wcslib/wcs.h>

#include "hilal/archive.h"
#include "hilal/ingest.h"
#include "hilal/night.h"
#include "hilal/wcs.h"
#include "test_night_data.h"
#include "testutil.h"

static char dir[4096];

static hilal_config *make_cfg(void)
{
    hilal_error err = {0};
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    CHECK_OK(hilal_config_set(cfg, "pipeline.threads", "1", "test", &err), &err);
    return cfg;
}

static hilal_image *read_sci(const hilal_config *cfg, const char *name)
{
    char path[4200];
    hilal_ingest_opts o;
    hilal_image *img = NULL;
    hilal_error err = {0};
    snprintf(path, sizeof path, "%s/night/%s", dir, name);
    CHECK_OK(hilal_ingest_opts_from_config(cfg, &o, &err), &err);
    CHECK_OK(hilal_ingest_read(&o, path, 0, &img, NULL, &err), &err);
    return img;
}

static void test_lists(void)
{
    hilal_night_task *t = NULL;
    size_t n = 0;
    hilal_error err = {0};
    char path[4200], list[4200];

    snprintf(path, sizeof path, "%s/night", dir);
    CHECK_OK(hilal_night_tasks_from_path(path, &t, &n, &err), &err);
    static const char *const want[] = {"a1.fits", "a2.fits", "a3.fits", "b1.fits", "b2.fits",
                                       "b3.fits", "bad.fits", "c_noref.fits"};
    CHECK(n == 8, "8 FITS files in the night directory, got %zu", n);
    for (size_t i = 0; i < n && i < 8; i++) {
        CHECK(strcmp(t[i].name, want[i]) == 0, "task %zu is %s, want %s (name order)", i,
              t[i].name, want[i]);
        CHECK(t[i].sci_hdu == 0 && t[i].status == HILAL_NIGHT_PENDING && t[i].ref_path[0] == '\0',
              "task %zu: hdu 0, pending, no fixed reference", i);
    }
    free(t);

    /* A list file: comments, blank lines, relative paths, an HDU. */
    snprintf(list, sizeof list, "%s/frames.lst", dir);
    FILE *f = fopen(list, "w");
    fprintf(f, "# tonight\n\nnight/b2.fits   1\n  night/a1.fits # first field\n%s/night/a3.fits\n",
            dir);
    fclose(f);
    CHECK_OK(hilal_night_tasks_from_path(list, &t, &n, &err), &err);
    CHECK(n == 3, "3 entries in the list, got %zu", n);
    if (n == 3) {
        size_t len = strlen(t[0].sci_path), k = strlen("/night/b2.fits");
        CHECK(t[0].sci_path[0] == '/' && len > k &&
                  strcmp(t[0].sci_path + len - k, "/night/b2.fits") == 0 && t[0].sci_hdu == 1,
              "relative entry resolved against the list's directory with its HDU: %s [%d]",
              t[0].sci_path, t[0].sci_hdu);
        CHECK(strcmp(t[1].name, "a1.fits") == 0 && t[1].sci_hdu == 0, "comment stripped: %s",
              t[1].name);
        CHECK(strcmp(t[2].name, "a3.fits") == 0, "absolute entry kept: %s", t[2].sci_path);
    }
    free(t);

    f = fopen(list, "w");
    fprintf(f, "night/a1.fits\nnight/a2.fits two\n");
    fclose(f);
    hilal_error_clear(&err);
    CHECK(hilal_night_tasks_from_path(list, &t, &n, &err) == HILAL_ERR_FORMAT && t == NULL,
          "a bad HDU is a format error");
    CHECK(strstr(err.msg, "frames.lst:2") != NULL && strstr(err.msg, "two") != NULL,
          "the message names the line and the value: %s", err.msg);

    snprintf(path, sizeof path, "%s/sim", dir);
    hilal_error_clear(&err);
    CHECK(hilal_night_tasks_from_path(path, &t, &n, &err) == HILAL_ERR_NOTFOUND,
          "a directory without FITS files is an error: %s", err.msg);
}

static void test_reflib(void)
{
    hilal_config *cfg = make_cfg();
    hilal_reflib *lib = NULL;
    hilal_error err = {0};
    char path[4200];
    size_t idx = 99, nbad = 9;
    double ov = 0;

    CHECK_OK(hilal_reflib_new(cfg, &lib, &err), &err);
    snprintf(path, sizeof path, "%s/refs", dir);
    CHECK_OK(hilal_reflib_add_dir(lib, path, &nbad, &err), &err);
    CHECK(hilal_reflib_count(lib) == 2 && nbad == 0, "2 references, none bad (%zu, %zu)",
          hilal_reflib_count(lib), nbad);
    const hilal_reflib_entry *ea = hilal_reflib_entry_at(lib, 0), *eb = hilal_reflib_entry_at(lib, 1);
    CHECK(ea != NULL && strstr(ea->path, "refA.fits") && ea->hdu == 1 && strcmp(ea->filter, "r") == 0 &&
              ea->has_wcs && strlen(ea->sha256) == 64,
          "refA indexed with HDU, filter, WCS and checksum");
    CHECK(fabs(ea->ra_deg - 150.0) < 0.01 && fabs(ea->dec_deg - 2.2) < 0.01 &&
              fabs(eb->ra_deg - 151.0) < 0.01,
          "footprint centres (%.4f, %.4f) and %.4f", ea->ra_deg, ea->dec_deg, eb->ra_deg);
    /* 256 px at 1 arcsec/px: the corner is 181 arcsec from the centre. */
    CHECK(fabs(ea->radius_deg - 128 * sqrt(2.0) / 3600) < 2e-3, "footprint radius %.5f deg",
          ea->radius_deg);
    CHECK(hilal_reflib_find(lib, ea->path, 0) == 0 && hilal_reflib_find(lib, ea->path, 2) == -1,
          "find by path and HDU");

    /* Footprint matching: each field's frames get their own reference. */
    const char *const fa[] = {"a1.fits", "a3.fits", "b2.fits"};
    const size_t want[] = {0, 0, 1};
    for (int i = 0; i < 3; i++) {
        hilal_image *sci = read_sci(cfg, fa[i]);
        hilal_error_clear(&err);
        CHECK_OK(hilal_reflib_match(lib, sci, &idx, &ov, &err), &err);
        CHECK(idx == want[i] && ov > 0.95, "%s matched to reference %zu with overlap %.3f", fa[i],
              idx, ov);
        hilal_image_free(sci);
    }
    /* No reference: another field, and another filter. */
    hilal_image *c = read_sci(cfg, "c_noref.fits");
    hilal_error_clear(&err);
    CHECK(hilal_reflib_match(lib, c, &idx, &ov, &err) == HILAL_ERR_NOTFOUND &&
              strstr(err.msg, "overlaps the frame") != NULL,
          "frame of a third field: %s", err.msg);
    hilal_image *g = read_sci(cfg, "a2.fits");
    snprintf(g->meta.filter, sizeof g->meta.filter, "g");
    hilal_error_clear(&err);
    CHECK(hilal_reflib_match(lib, g, &idx, &ov, &err) == HILAL_ERR_NOTFOUND &&
              strstr(err.msg, "filter 'g'") != NULL,
          "another filter: %s", err.msg);

    /* Half a frame of overlap: a science frame shifted by 128 px. */
    hilal_image *a2 = read_sci(cfg, "a2.fits");
    struct wcsprm *shifted = NULL;
    CHECK_OK(hilal_wcs_copy(a2->meta.wcs, &shifted, &err), &err);
    hilal_image *refa = NULL;
    CHECK_OK(hilal_reflib_get(lib, 0, &refa, &err), &err);
    double half = hilal_reflib_overlap(a2->meta.wcs, a2->nx, a2->ny, refa->meta.wcs, refa->nx,
                                       refa->ny);
    CHECK(half > 0.98, "a2 lies on refA: overlap %.3f", half);
    hilal_image *moved = hilal_image_clone(a2, &err);
    /* Move the science pointing 128 px to the east of refA by shifting
     * its reference pixel: x_sci = x + 128 then sees refA's x. */
    moved->meta.wcs->crpix[0] -= 128;
    moved->meta.wcs->flag = 0;
    half = hilal_reflib_overlap(moved->meta.wcs, moved->nx, moved->ny, refa->meta.wcs, refa->nx,
                                refa->ny);
    CHECK(fabs(half - 0.5) < 0.04, "half the frame on the reference: %.3f", half);
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set(cfg, "night.min_overlap", "0.6", "test", &err), &err);
    hilal_reflib *strict = NULL;
    CHECK_OK(hilal_reflib_new(cfg, &strict, &err), &err);
    snprintf(path, sizeof path, "%s/refs", dir);
    CHECK_OK(hilal_reflib_add_dir(strict, path, NULL, &err), &err);
    hilal_error_clear(&err);
    CHECK(hilal_reflib_match(strict, moved, &idx, &ov, &err) == HILAL_ERR_NOTFOUND &&
              strstr(err.msg, "less than night.min_overlap = 60%") != NULL,
          "half overlap below night.min_overlap = 0.6: %s", err.msg);
    hilal_reflib_free(strict);
    hilal_wcs_free(shifted);

    /* The field-key shortcut, which works without a WCS. */
    CHECK_OK(hilal_config_set(cfg, "night.field_key", "OBJECT", "test", &err), &err);
    CHECK_OK(hilal_config_set(cfg, "night.min_overlap", "0.5", "test", &err), &err);
    hilal_reflib *keyed = NULL;
    CHECK_OK(hilal_reflib_new(cfg, &keyed, &err), &err);
    CHECK_OK(hilal_reflib_add_dir(keyed, path, NULL, &err), &err);
    CHECK(strcmp(hilal_reflib_entry_at(keyed, 1)->field, "FIELD-B") == 0, "refB's OBJECT: '%s'",
          hilal_reflib_entry_at(keyed, 1)->field);
    hilal_image *b1 = read_sci(cfg, "b1.fits");
    hilal_wcs_free(b1->meta.wcs);
    b1->meta.wcs = NULL;
    hilal_error_clear(&err);
    CHECK_OK(hilal_reflib_match(keyed, b1, &idx, &ov, &err), &err);
    CHECK(idx == 1 && isnan(ov), "b1 without WCS matched by OBJECT to refB (%zu, %g)", idx, ov);
    hilal_error_clear(&err);
    CHECK(hilal_reflib_match(lib, b1, &idx, &ov, &err) == HILAL_ERR_NOTFOUND &&
              strstr(err.msg, "no usable WCS") != NULL,
          "without the key a frame without WCS has no reference: %s", err.msg);
    hilal_error_clear(&err);
    CHECK(hilal_reflib_match(keyed, c, &idx, &ov, &err) == HILAL_ERR_NOTFOUND,
          "FIELD-C has no reference by key or footprint");
    hilal_reflib_free(keyed);

    /* The cache: copies are private, reads happen once while cached. */
    size_t reads = hilal_reflib_reads(lib);
    hilal_image *r1 = NULL, *r2 = NULL;
    CHECK_OK(hilal_reflib_get(lib, 0, &r1, &err), &err);
    r1->pix[0] = -12345.0f;
    CHECK_OK(hilal_reflib_get(lib, 0, &r2, &err), &err);
    CHECK(r2->pix[0] != -12345.0f && r2->pix[1] == r1->pix[1] && r2->meta.wcs != r1->meta.wcs,
          "each copy is the frame's own");
    CHECK(hilal_reflib_reads(lib) == reads, "served from the cache (%zu reads)",
          hilal_reflib_reads(lib));
    hilal_image_free(r1);
    hilal_image_free(r2);

    CHECK_OK(hilal_config_set(cfg, "night.ref_cache", "1", "test", &err), &err);
    CHECK_OK(hilal_config_set(cfg, "night.field_key", "", "test", &err), &err);
    hilal_reflib *small = NULL;
    CHECK_OK(hilal_reflib_new(cfg, &small, &err), &err);
    CHECK_OK(hilal_reflib_add_dir(small, path, NULL, &err), &err);
    CHECK(hilal_reflib_reads(small) == 2, "2 reads to index");
    hilal_image *x = NULL;
    CHECK_OK(hilal_reflib_get(small, 1, &x, &err), &err); /* not cached: read */
    hilal_image_free(x);
    CHECK_OK(hilal_reflib_get(small, 1, &x, &err), &err); /* cached now */
    hilal_image_free(x);
    CHECK_OK(hilal_reflib_get(small, 0, &x, &err), &err); /* evicted by 1: read */
    hilal_image_free(x);
    CHECK(hilal_reflib_reads(small) == 4, "a one-image cache reads on each switch: %zu",
          hilal_reflib_reads(small));
    hilal_reflib_free(small);

    hilal_image_free(refa);
    hilal_image_free(moved);
    hilal_image_free(a2);
    hilal_image_free(b1);
    hilal_image_free(c);
    hilal_image_free(g);
    hilal_reflib_free(lib);
    hilal_config_free(cfg);
}

static const hilal_night_task *find_task(const hilal_night_task *t, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(t[i].name, name) == 0)
            return &t[i];
    return NULL;
}

/* Current candidates of an archive as sorted "frame_id x y snr" lines. */
static char *cand_digest(const char *path, size_t *ncands)
{
    hilal_archive *ar = NULL;
    hilal_archive_cand *rows = NULL;
    hilal_error err = {0};
    size_t n = 0;
    *ncands = 0;
    CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
    if (ar == NULL)
        return NULL;
    CHECK_OK(hilal_archive_query(ar, NULL, &rows, &n, &err), &err);
    char **lines = calloc(n + 1, sizeof *lines);
    size_t total = 1;
    for (size_t i = 0; i < n; i++) {
        char buf[160];
        snprintf(buf, sizeof buf, "%lld %.4f %.4f %.4f\n", (long long)rows[i].frame_id, rows[i].x,
                 rows[i].y, rows[i].snr);
        lines[i] = strdup(buf);
        total += strlen(buf);
    }
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && strcmp(lines[j - 1], lines[j]) > 0; j--) {
            char *tmp = lines[j];
            lines[j] = lines[j - 1];
            lines[j - 1] = tmp;
        }
    char *out = calloc(total, 1);
    for (size_t i = 0; i < n; i++) {
        strcat(out, lines[i]);
        free(lines[i]);
    }
    free(lines);
    free(rows);
    hilal_archive_free(ar);
    *ncands = n;
    return out;
}

static void test_night_and_merge(void)
{
    hilal_config *cfg = make_cfg();
    hilal_reflib *lib = NULL;
    hilal_night_task *t = NULL;
    hilal_night_result res;
    hilal_error err = {0};
    size_t n = 0;
    char path[4200], archive[4200], merged[4200], report[4200];

    snprintf(path, sizeof path, "%s/refs", dir);
    CHECK_OK(hilal_reflib_new(cfg, &lib, &err), &err);
    CHECK_OK(hilal_reflib_add_dir(lib, path, NULL, &err), &err);
    snprintf(path, sizeof path, "%s/night", dir);
    CHECK_OK(hilal_night_tasks_from_path(path, &t, &n, &err), &err);
    snprintf(archive, sizeof archive, "%s/night.h5", dir);
    hilal_night_options opt = {.archive_path = archive, .workers = 2};
    CHECK_OK(hilal_night_run(cfg, lib, t, n, &opt, &res, &err), &err);

    CHECK(res.count[HILAL_NIGHT_DONE] == NIGHT_GOOD_FRAMES && res.count[HILAL_NIGHT_FAILED] == 1 &&
              res.count[HILAL_NIGHT_NOREF] == 1 && res.ntasks == 8,
          "6 done, 1 failed, 1 without reference (%zu, %zu, %zu)", res.count[HILAL_NIGHT_DONE],
          res.count[HILAL_NIGHT_FAILED], res.count[HILAL_NIGHT_NOREF]);
    const hilal_night_task *bad = find_task(t, n, "bad.fits"), *c = find_task(t, n, "c_noref.fits");
    const hilal_night_task *b3 = find_task(t, n, "b3.fits");
    CHECK(bad && bad->status == HILAL_NIGHT_FAILED && strstr(bad->message, "truncated") != NULL,
          "the corrupt file failed with its reason: %s", bad ? bad->message : "");
    CHECK(c && c->status == HILAL_NIGHT_NOREF && strstr(c->message, "overlaps the frame"),
          "the third field is skipped for want of a reference: %s", c ? c->message : "");
    CHECK(b3 && strstr(b3->ref_used, "refB.fits") && b3->ncands > 0 && isfinite(b3->limmag5) &&
              b3->npos + b3->nneg == b3->ncands && b3->frame_id > 0,
          "b3 done against refB with %d candidates, limmag %.2f", b3 ? b3->ncands : -1,
          b3 ? b3->limmag5 : NAN);
    CHECK(res.ref_reads == 2, "each reference read once (%zu reads)", res.ref_reads);
    size_t sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += t[i].status == HILAL_NIGHT_DONE ? (size_t)t[i].ncands : 0;
    CHECK(sum == res.ncands && res.ncands > 0, "candidate total %zu = sum over frames %zu",
          res.ncands, sum);
    CHECK(res.nstages >= 11 && strcmp(res.stage_names[0], "ingest") == 0 &&
              res.stage_seconds[6] > 0 && strcmp(res.stage_names[6], "subtract") == 0,
          "stage timings: %s %.3f s", res.stage_names[6], res.stage_seconds[6]);

    /* The archive holds every frame it was given that could be identified. */
    hilal_archive *ar = NULL;
    hilal_archive_summary sm;
    CHECK_OK(hilal_archive_open_read(archive, &ar, &err), &err);
    CHECK_OK(hilal_archive_get_summary(ar, &sm, &err), &err);
    CHECK(sm.nframes_current == NIGHT_GOOD_FRAMES && sm.nframes_failed == 1 && sm.nruns == 1 &&
              sm.ncands_current == res.ncands,
          "archive: %zu current, %zu failed, %zu runs, %zu candidates", sm.nframes_current,
          sm.nframes_failed, sm.nruns, sm.ncands_current);
    hilal_archive_free(ar);

    /* The report. */
    snprintf(report, sizeof report, "%s/night.json", dir);
    CHECK_OK(hilal_night_write_report(report, archive, t, n, &res, &err), &err);
    char *json = NULL;
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "cat '%s'", report);
    hilal_test_run(cmd, &json);
    CHECK(json && strstr(json, "\"done\": 6") && strstr(json, "\"skipped_no_reference\": 1") &&
              strstr(json, "\"status\": \"failed\"") && strstr(json, "\"limiting_mag5\"") &&
              strstr(json, "\"subtract\": "),
          "report content");
    free(json);

    /* Again: nothing is processed twice. */
    CHECK_OK(hilal_night_run(cfg, lib, t, n, &opt, &res, &err), &err);
    CHECK(res.count[HILAL_NIGHT_ALREADY] == NIGHT_GOOD_FRAMES &&
              res.count[HILAL_NIGHT_FAILED_BEFORE] == 1 && res.count[HILAL_NIGHT_DONE] == 0 &&
              res.ncands == sum,
          "rerun: %zu already done, %zu failed before; %zu candidates from the archive",
          res.count[HILAL_NIGHT_ALREADY], res.count[HILAL_NIGHT_FAILED_BEFORE], res.ncands);
    b3 = find_task(t, n, "b3.fits");
    CHECK(b3 && b3->npos + b3->nneg == b3->ncands && b3->ncands > 0,
          "already-done frames get their counts from the archive");

    /* Merging the archive into a new one copies it; repeating is a no-op. */
    snprintf(merged, sizeof merged, "%s/merged.h5", dir);
    hilal_archive *m = NULL;
    size_t nf = 0, nc = 0;
    CHECK_OK(hilal_archive_open_write(merged, NULL, &m, &err), &err);
    CHECK_OK(hilal_archive_merge(m, archive, &nf, &nc, &err), &err);
    CHECK(nf == NIGHT_GOOD_FRAMES + 1 && nc == sum, "merged %zu frames, %zu candidates", nf, nc);
    CHECK_OK(hilal_archive_merge(m, archive, &nf, &nc, &err), &err);
    CHECK(nf == 0 && nc == 0, "a second merge copies nothing (%zu frames)", nf);
    hilal_error_clear(&err);
    CHECK(hilal_archive_merge(m, merged, &nf, &nc, &err) == HILAL_ERR_USAGE,
          "no merging into itself: %s", err.msg);
    hilal_error_clear(&err);
    CHECK_OK(hilal_archive_close(m, &err), &err);
    size_t na = 0, nb = 0;
    char *da = cand_digest(archive, &na), *db = cand_digest(merged, &nb);
    CHECK(da && db && na == sum && nb == sum && strcmp(da, db) == 0,
          "merged archive has the same candidates (%zu and %zu)", na, nb);
    CHECK_OK(hilal_archive_open_read(merged, &ar, &err), &err);
    CHECK_OK(hilal_archive_get_summary(ar, &sm, &err), &err);
    CHECK(sm.nframes_current == NIGHT_GOOD_FRAMES && sm.nframes_failed == 1 && sm.nruns == 1,
          "merged: %zu current frames, %zu failed, %zu runs", sm.nframes_current,
          sm.nframes_failed, sm.nruns);
    hilal_archive_cutout cut = {0};
    CHECK_OK(hilal_archive_read_cutout(ar, 1, &cut, &err), &err);
    CHECK(cut.size == 63 && cut.plane[HILAL_ARCHIVE_SCIENCE] != NULL &&
              isfinite(cut.plane[HILAL_ARCHIVE_SCIENCE][31 * 63 + 31]),
          "cutouts copied");
    hilal_archive_cutout_clear(&cut);
    hilal_archive_free(ar);
    free(da);
    free(db);

    /* Shards an MPI night left next to an archive are merged by the next
     * night, which then skips their frames. */
    char second[4200], shard[4300];
    snprintf(second, sizeof second, "%s/second.h5", dir);
    snprintf(shard, sizeof shard, "%s.shard5.h5", second);
    CHECK(night_copy(archive, shard, 0), "copy the archive as a leftover shard");
    opt.archive_path = second;
    CHECK_OK(hilal_night_run(cfg, lib, t, n, &opt, &res, &err), &err);
    CHECK(res.count[HILAL_NIGHT_ALREADY] == NIGHT_GOOD_FRAMES && res.count[HILAL_NIGHT_DONE] == 0 &&
              res.ncands == sum,
          "leftover shard merged: %zu already done, %zu done", res.count[HILAL_NIGHT_ALREADY],
          res.count[HILAL_NIGHT_DONE]);
    FILE *gone = fopen(shard, "rb");
    CHECK(gone == NULL, "the merged shard is removed");
    if (gone)
        fclose(gone);

    free(t);
    hilal_reflib_free(lib);
    hilal_config_free(cfg);
}

int main(void)
{
    hilal_test_tmpdir("night", dir, sizeof dir);
    if (!night_make(dir)) {
        fprintf(stderr, "could not make the test night in %s\n", dir);
        return 1;
    }
    test_lists();
    test_reflib();
    test_night_and_merge();
    return hilal_test_finish();
}
