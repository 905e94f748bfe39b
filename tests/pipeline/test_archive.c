/* The HDF5 archive: write simulated frames, read everything back with the C
 * API (candidates, cutouts, PSFs, per-frame records, provenance), re-run a
 * frame (rows replaced, not duplicated), a second configuration (new run,
 * both queryable), the query filters, the stage, and the error paths. */
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/archive.h"
#include "test_archive_frames.h"
#include "testutil.h"

#define NX 200
#define NY 160

static const char *HASH1 = "1111111111111111111111111111111111111111111111111111111111111111";
static const char *HASH2 = "2222222222222222222222222222222222222222222222222222222222222222";

/* Appends frame (name, seed, ncands) and checks the commit. */
static void append(hilal_archive *ar, int32_t run, const char *name, unsigned seed, size_t ncands,
                   hilal_archive_commit *commit)
{
    hilal_frame f;
    hilal_error err = {0};
    CHECK(tf_make(&f, name, seed, NX, NY, ncands) == 0, "frame %s built", name);
    hilal_status st = hilal_archive_append_frame(ar, run, &f, commit, &err);
    CHECK_OK(st, &err);
    CHECK(commit->ncands == ncands, "%zu candidates committed", commit->ncands);
    hilal_frame_clear(&f);
}

/* Checks that rows[0..n) are exactly the candidates of frame `seed`. */
static void check_frame_rows(const hilal_archive_cand *rows, size_t n, unsigned seed,
                             int64_t first_id, int32_t run, int64_t frame_row)
{
    char why[256];
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!tf_row_matches(&rows[i], seed, i, NX, NY, 63, why, sizeof why) ||
            rows[i].cand_id != first_id + (int64_t)i || rows[i].run_id != run ||
            rows[i].frame_row != frame_row || rows[i].valid != 1) {
            if (bad++ == 0)
                CHECK(0, "frame seed %u row %zu: %s (cand_id %lld, run %d, frame_row %lld, valid %d)",
                      seed, i, why, (long long)rows[i].cand_id, (int)rows[i].run_id,
                      (long long)rows[i].frame_row, (int)rows[i].valid);
        }
    }
    CHECK(bad == 0, "%zu of %zu rows of frame seed %u differ", bad, n, seed);
}

static void test_write_and_read(const char *dir)
{
    char path[4200];
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_commit ca, cb, cc;
    int32_t run = 0;
    snprintf(path, sizeof path, "%s/night.h5", dir);

    /* --- write: three frames and a failure --- */
    hilal_status st = hilal_archive_open_write(path, NULL, &ar, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return;
    CHECK(!hilal_archive_recovered(ar), "a new archive needs no recovery");
    st = hilal_archive_begin_run(ar, "[detect]\nthresh_sigma = 5\n", HASH1, &run, &err);
    CHECK_OK(st, &err);
    CHECK(run == 1, "first run id is 1 (got %d)", (int)run);
    append(ar, run, "frameA", 1, 120, &ca);
    append(ar, run, "frameB", 2, 57, &cb);
    append(ar, run, "frameC", 3, 0, &cc);
    CHECK(ca.first_cand_id == 1 && cb.first_cand_id == 121 && cc.first_cand_id == 178,
          "candidate ids continue across frames (%lld, %lld, %lld)", (long long)ca.first_cand_id,
          (long long)cb.first_cand_id, (long long)cc.first_cand_id);
    CHECK(ca.frame_row == 0 && cb.frame_row == 1 && cc.frame_row == 2 && ca.replaced_frame_row == -1,
          "frame rows 0, 1, 2, nothing replaced");
    hilal_frame failed;
    hilal_frame_init(&failed);
    snprintf(failed.frame_id, sizeof failed.frame_id, "frameD");
    snprintf(failed.sci_path, sizeof failed.sci_path, "night/missing.fits");
    st = hilal_archive_record_failure(ar, run, &failed, "ingest: cannot open night/missing.fits", &err);
    CHECK_OK(st, &err);
    hilal_frame_clear(&failed);
    CHECK_OK(hilal_archive_close(ar, &err), &err);

    /* --- read back --- */
    st = hilal_archive_open_read(path, &ar, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return;
    hilal_archive_summary sum;
    CHECK_OK(hilal_archive_get_summary(ar, &sum, &err), &err);
    CHECK(sum.schema_version == HILAL_ARCHIVE_SCHEMA_VERSION, "schema %d", sum.schema_version);
    CHECK(sum.cutout_size == 63 && sum.psf_size == 51, "sizes %d %d", sum.cutout_size, sum.psf_size);
    CHECK(sum.nruns == 1 && sum.nframes_current == 3 && sum.nframes_failed == 1 &&
          sum.nframes_superseded == 0 && sum.nframe_rows == 4,
          "summary: %zu runs, %zu current, %zu failed, %zu rows", sum.nruns, sum.nframes_current,
          sum.nframes_failed, sum.nframe_rows);
    CHECK(sum.ncands_current == 177 && sum.ncand_rows == 177, "177 candidates (%zu, %zu)",
          sum.ncands_current, sum.ncand_rows);
    CHECK(!sum.writer_active, "no writer active after close");

    hilal_archive_cand *rows = NULL;
    size_t n = 0;
    CHECK_OK(hilal_archive_query(ar, NULL, &rows, &n, &err), &err);
    CHECK(n == 177, "query returns 177 rows (got %zu)", n);
    if (n == 177) {
        check_frame_rows(rows, 120, 1, 1, 1, 0);
        check_frame_rows(rows + 120, 57, 2, 121, 1, 1);
        CHECK(rows[0].frame_id == ca.frame_id && rows[120].frame_id == cb.frame_id, "frame ids");
        CHECK((rows[0].flags & HILAL_CAND_EDGE) && (rows[1].flags & HILAL_CAND_EDGE),
              "corner candidates flagged EDGE");
    }

    /* Cutouts: exact pixels, NaN padding and NODATA|EDGE outside. */
    char why[256];
    int64_t ids[] = {1, 2, 3, 60, 120, 121, 177};
    for (size_t k = 0; k < sizeof ids / sizeof ids[0] && n == 177; k++) {
        hilal_archive_cutout cut;
        st = hilal_archive_read_cutout(ar, ids[k], &cut, &err);
        CHECK_OK(st, &err);
        if (st != HILAL_OK)
            continue;
        unsigned seed = ids[k] <= 120 ? 1 : 2;
        CHECK(cut.size == 63, "cutout size %d", cut.size);
        CHECK(tf_cutout_matches(&cut, &rows[ids[k] - 1], seed, NX, NY, why, sizeof why),
              "cutout of candidate %lld: %s", (long long)ids[k], why);
        hilal_archive_cutout_clear(&cut);
    }
    hilal_archive_cutout empty;
    st = hilal_archive_read_cutout(ar, 178, &empty, &err);
    CHECK(st == HILAL_ERR_NOTFOUND && strstr(err.msg, "no candidate 178") != NULL,
          "cutout of a missing candidate: %s", err.msg);
    hilal_error_clear(&err);

    /* Frames: per-frame records. */
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    size_t nf = 0;
    CHECK_OK(hilal_archive_read_frames(ar, &frames, &nf, &cur, &err), &err);
    CHECK(nf == 4, "4 frame rows (got %zu)", nf);
    if (nf == 4) {
        const hilal_archive_frame *fa = &frames[0];
        char sha[65];
        tf_sha(1, sha);
        CHECK(strcmp(fa->frame_name, "frameA") == 0 && strcmp(fa->sha256, sha) == 0 &&
              strcmp(fa->path, "night/frameA.fits") == 0 && fa->hdu == 1, "frame A identity");
        CHECK(fa->frame_id == hilal_archive_frame_id(sha, 1, "frameA"), "frame id from sha and hdu");
        CHECK(strcmp(fa->ref_path, "refs/field1.fits") == 0, "reference path %s", fa->ref_path);
        CHECK(fa->status == HILAL_ARCHIVE_FRAME_COMMITTED && fa->valid == 1 && cur[0], "A current");
        CHECK(fa->n_candidates == 120 && fa->first_cand_id == 1, "A range");
        CHECK(fa->mjd == 60000.01 && strcmp(fa->filter, "r") == 0 && fa->nx == NX && fa->ny == NY,
              "A mjd %.5f filter %s", fa->mjd, fa->filter);
        CHECK(fa->psf_fwhm_sci_px == 3.0 && fa->psf_fwhm_ref_px == 2.5 && fa->psf_fwhm_diff_px == 3.4 &&
              fa->psf_nstars_sci == 40 && fa->psf_size_diff == 31, "A PSF records");
        CHECK(fa->flux_ratio == 1.25 && fa->flux_ratio_err == 0.01 && fa->flux_ratio_nstars == 33,
              "A flux ratio");
        CHECK(fa->reg_rms_x_px == 0.05 && fa->reg_rms_y_px == 0.07, "A registration RMS");
        CHECK(fa->sky_sci_adu == 51.0 && fa->sky_rms_sci_adu == 5.0 && fa->sky_ref_adu == 40.0 &&
              fa->sky_rms_ref_adu == 3.0, "A background %g %g", fa->sky_sci_adu, fa->sky_ref_adu);
        CHECK(fa->scorr_mean == 0.01 && fa->scorr_std == 1.02 && fa->f_d == 0.8, "A S_corr stats");
        CHECK(fabs(fa->limflux5_adu - 10.0) < 1e-9, "limiting flux 5 x 2 = %g", fa->limflux5_adu);
        CHECK(fabs(fa->limmag5 - (25.0 - 2.5 * log10(10.0))) < 1e-9, "limiting mag %g", fa->limmag5);
        const hilal_archive_frame *fd = &frames[3];
        CHECK(fd->status == HILAL_ARCHIVE_FRAME_FAILED && !cur[3] && fd->n_candidates == 0 &&
              strstr(fd->message, "cannot open") != NULL, "D recorded as failed: %s", fd->message);
        /* The header text. */
        char *hdr = NULL;
        CHECK_OK(hilal_archive_read_text(ar, fa->header_offset, fa->header_length, &hdr, &err), &err);
        char *want = tf_header();
        CHECK(hdr != NULL && want != NULL && strcmp(hdr, want) == 0, "science header stored verbatim");
        free(hdr);
        free(want);
    }
    free(frames);
    free(cur);

    /* PSFs: the 25 px Gaussian centred in the 51 px box, sum 1. */
    float *psf = NULL;
    int psize = 0;
    CHECK_OK(hilal_archive_read_psf(ar, 0, 0, &psf, &psize, &err), &err);
    if (psf != NULL) {
        double sum_psf = 0;
        for (int k = 0; k < psize * psize; k++)
            sum_psf += psf[k];
        hilal_psf ref;
        tf_psf(&ref, 25, 3.0, 40);
        CHECK(psize == 51 && fabs(sum_psf - 1.0) < 1e-5, "PSF box %d, sum %.6f", psize, sum_psf);
        CHECK(psf[25 * 51 + 25] == ref.data[12 * 25 + 12] && psf[13 * 51 + 13] == ref.data[0] &&
              psf[12 * 51 + 12] == 0.0f, "PSF centred in its box");
        hilal_psf_clear(&ref);
        free(psf);
    }
    CHECK_OK(hilal_archive_read_psf(ar, 3, 2, &psf, &psize, &err), &err);
    CHECK(psf != NULL && isnan(psf[0]), "a failed frame has NaN PSF boxes");
    free(psf);

    /* Provenance. */
    hilal_archive_run *runs = NULL;
    size_t nr = 0;
    CHECK_OK(hilal_archive_read_runs(ar, &runs, &nr, &err), &err);
    CHECK(nr == 1 && runs[0].run_id == 1 && strcmp(runs[0].config_hash, HASH1) == 0 &&
          strcmp(runs[0].software_version, hilal_version()) == 0 &&
          strcmp(runs[0].library_versions, hilal_library_versions()) == 0 &&
          strlen(runs[0].created_utc) == 20, "run 1 provenance");
    if (nr == 1) {
        char *text = NULL;
        CHECK_OK(hilal_archive_read_text(ar, runs[0].config_offset, runs[0].config_length, &text, &err), &err);
        CHECK(text != NULL && strcmp(text, "[detect]\nthresh_sigma = 5\n") == 0, "configuration text");
        free(text);
    }
    free(runs);
    free(rows);
    hilal_archive_free(ar);
}

static void test_rerun_and_second_run(const char *dir)
{
    char path[4200];
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_commit c;
    int32_t run = 0, run2 = 0;
    snprintf(path, sizeof path, "%s/night.h5", dir);

    /* Same frame (seed 1), same configuration: replaces its rows. */
    hilal_status st = hilal_archive_open_write(path, NULL, &ar, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return;
    CHECK_OK(hilal_archive_begin_run(ar, "[detect]\nthresh_sigma = 5\n", HASH1, &run, &err), &err);
    CHECK(run == 1, "same configuration, same run id (%d)", (int)run);
    append(ar, run, "frameA-again", 1, 80, &c);
    CHECK(c.replaced_frame_row == 0 && c.frame_row == 4 && c.first_cand_id == 178,
          "re-run replaces row 0 (replaced %lld, row %lld, first id %lld)",
          (long long)c.replaced_frame_row, (long long)c.frame_row, (long long)c.first_cand_id);
    /* Twice more: only the last stays current. */
    append(ar, run, "frameA-third", 1, 80, &c);
    CHECK(c.replaced_frame_row == 4, "third run replaces the second (%lld)", (long long)c.replaced_frame_row);

    /* A different configuration: a new run; both stay queryable. */
    CHECK_OK(hilal_archive_begin_run(ar, "[detect]\nthresh_sigma = 4\n", HASH2, &run2, &err), &err);
    CHECK(run2 == 2, "new configuration, run 2 (%d)", (int)run2);
    append(ar, run2, "frameA", 1, 30, &c);
    CHECK(c.replaced_frame_row == -1, "another run does not replace");
    CHECK_OK(hilal_archive_close(ar, &err), &err);

    CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
    hilal_archive_summary sum;
    CHECK_OK(hilal_archive_get_summary(ar, &sum, &err), &err);
    CHECK(sum.nruns == 2 && sum.nframes_current == 4 && sum.nframes_superseded == 2 &&
          sum.ncands_current == 80 + 57 + 0 + 30 && sum.ncand_rows == 177 + 80 + 80 + 30,
          "after re-runs: %zu runs, %zu current, %zu superseded, %zu current cands of %zu rows",
          sum.nruns, sum.nframes_current, sum.nframes_superseded, sum.ncands_current, sum.ncand_rows);

    hilal_archive_cand *rows = NULL;
    size_t n = 0;
    hilal_archive_filter q;
    hilal_archive_filter_init(&q);
    q.run_id = 1;
    CHECK_OK(hilal_archive_query(ar, &q, &rows, &n, &err), &err);
    CHECK(n == 137, "run 1: 80 + 57 current rows, no duplicates (got %zu)", n);
    if (n == 137) {
        /* The current rows of frame A are the third run's. */
        check_frame_rows(rows, 57, 2, 121, 1, 1);
        check_frame_rows(rows + 57, 80, 1, 178 + 80, 1, 5);
    }
    free(rows);
    q.run_id = 2;
    CHECK_OK(hilal_archive_query(ar, &q, &rows, &n, &err), &err);
    CHECK(n == 30, "run 2: 30 rows (got %zu)", n);
    if (n == 30)
        check_frame_rows(rows, 30, 1, 178 + 160, 2, 6);
    free(rows);
    q.run_id = 1;
    q.include_superseded = 1;
    CHECK_OK(hilal_archive_query(ar, &q, &rows, &n, &err), &err);
    size_t nvalid = 0;
    for (size_t i = 0; i < n; i++)
        nvalid += rows[i].valid;
    CHECK(n == 120 + 57 + 80 + 80 && nvalid == 137, "with superseded rows: %zu rows, %zu valid", n, nvalid);
    free(rows);

    /* The candidate of a superseded frame is still found, marked so. */
    hilal_archive_cand cand;
    hilal_archive_frame frame;
    int current = 1;
    CHECK_OK(hilal_archive_get_candidate(ar, 5, &cand, &frame, &current, &err), &err);
    CHECK(!current && frame.status == HILAL_ARCHIVE_FRAME_SUPERSEDED && cand.valid == 0,
          "candidate 5 belongs to a superseded frame");

    /* The frame rows in the file carry the statuses (for h5py readers). */
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    size_t nf = 0;
    CHECK_OK(hilal_archive_read_frames(ar, &frames, &nf, &cur, &err), &err);
    CHECK(nf == 7 && frames[0].status == HILAL_ARCHIVE_FRAME_SUPERSEDED && frames[0].valid == 0 &&
          frames[4].status == HILAL_ARCHIVE_FRAME_SUPERSEDED &&
          frames[5].status == HILAL_ARCHIVE_FRAME_COMMITTED && frames[6].run_id == 2,
          "frame statuses written");
    free(frames);
    free(cur);
    hilal_archive_free(ar);
}

/* Independent check of a filter on one row. */
static int want_row(const hilal_archive_cand *c, const hilal_archive_filter *q)
{
    if (q->use_cone) {
        double d2r = 3.14159265358979323846 / 180, c1 = cos(c->dec * d2r), c2 = cos(q->dec_deg * d2r);
        double v1[3] = {c1 * cos(c->ra * d2r), c1 * sin(c->ra * d2r), sin(c->dec * d2r)};
        double v2[3] = {c2 * cos(q->ra_deg * d2r), c2 * sin(q->ra_deg * d2r), sin(q->dec_deg * d2r)};
        double chord = sqrt(pow(v1[0] - v2[0], 2) + pow(v1[1] - v2[1], 2) + pow(v1[2] - v2[2], 2));
        if (2 * asin(chord / 2) / d2r * 3600 > q->radius_arcsec)
            return 0;
    }
    if (!isnan(q->mjd_min) && c->mjd < q->mjd_min)
        return 0;
    if (!isnan(q->mjd_max) && c->mjd > q->mjd_max)
        return 0;
    if (!isnan(q->snr_min) && fabs(c->snr) < q->snr_min)
        return 0;
    if (q->sign && (q->sign > 0) != (c->snr > 0))
        return 0;
    if (!isnan(q->rb_min) && c->rb < q->rb_min)
        return 0;
    if (q->flags_any && !(c->flags & q->flags_any))
        return 0;
    if (c->flags & q->flags_none)
        return 0;
    if (q->frame_id && c->frame_id != q->frame_id)
        return 0;
    if (q->run_id && c->run_id != q->run_id)
        return 0;
    return 1;
}

static void test_filters(const char *dir)
{
    char path[4200];
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_cand *all = NULL, *rows = NULL;
    size_t nall = 0, n = 0;
    snprintf(path, sizeof path, "%s/night.h5", dir);
    CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
    if (ar == NULL)
        return;
    CHECK_OK(hilal_archive_query(ar, NULL, &all, &nall, &err), &err);
    CHECK(nall == 167, "167 current rows (got %zu)", nall);
    if (nall < 10) {
        free(all);
        hilal_archive_free(ar);
        return;
    }
    hilal_archive_filter qs[10];
    for (int k = 0; k < 10; k++)
        hilal_archive_filter_init(&qs[k]);
    qs[0].use_cone = 1; /* around candidate 130, 20 arcsec */
    qs[0].ra_deg = all[5].ra;
    qs[0].dec_deg = all[5].dec;
    qs[0].radius_arcsec = 20;
    qs[1].mjd_min = 60000.015;
    qs[2].mjd_max = 60000.015;
    qs[3].snr_min = 30;
    qs[4].sign = -1;
    qs[5].rb_min = 0.5;
    qs[6].flags_any = HILAL_CAND_EDGE | HILAL_CAND_SHARP;
    qs[7].flags_none = HILAL_CAND_NEAR_MASK;
    qs[8].frame_id = all[0].frame_id;
    qs[9].snr_min = 10; /* combined */
    qs[9].sign = 1;
    qs[9].rb_min = 0.3;
    qs[9].flags_none = HILAL_CAND_EDGE;
    qs[9].run_id = 1;
    for (int k = 0; k < 10; k++) {
        size_t expect = 0;
        for (size_t i = 0; i < nall; i++)
            expect += want_row(&all[i], &qs[k]);
        CHECK_OK(hilal_archive_query(ar, &qs[k], &rows, &n, &err), &err);
        int same = n == expect;
        for (size_t i = 0, j = 0; i < nall && same; i++)
            if (want_row(&all[i], &qs[k]))
                same = rows[j++].cand_id == all[i].cand_id;
        CHECK(same && expect > 0 && expect < nall, "filter %d: %zu rows, expected %zu of %zu", k, n,
              expect, nall);
        free(rows);
    }
    /* The cone holds its centre and nothing beyond 20 arcsec. */
    CHECK_OK(hilal_archive_query(ar, &qs[0], &rows, &n, &err), &err);
    int has_centre = 0;
    for (size_t i = 0; i < n; i++)
        has_centre |= rows[i].cand_id == all[5].cand_id;
    CHECK(has_centre, "cone includes its centre candidate");
    free(rows);
    /* By frame name. */
    hilal_archive_filter byname;
    hilal_archive_filter_init(&byname);
    byname.frame_name = "frameB";
    CHECK_OK(hilal_archive_query(ar, &byname, &rows, &n, &err), &err);
    CHECK(n == 57, "frame name filter: %zu rows", n);
    free(rows);
    free(all);
    hilal_archive_free(ar);
}

static void test_errors(const char *dir)
{
    char path[4200], other[4200];
    hilal_error err = {0};
    hilal_archive *ar = NULL, *ar2 = NULL;
    hilal_archive_options opt;
    snprintf(path, sizeof path, "%s/night.h5", dir);

    snprintf(other, sizeof other, "%s/none.h5", dir);
    hilal_status st = hilal_archive_open_read(other, &ar, &err);
    CHECK(st == HILAL_ERR_NOTFOUND && ar == NULL && strstr(err.msg, "none.h5") != NULL,
          "missing archive: %s", err.msg);
    hilal_error_clear(&err);

    snprintf(other, sizeof other, "%s/text.h5", dir);
    FILE *fp = fopen(other, "w");
    if (fp != NULL) {
        fputs("not hdf5\n", fp);
        fclose(fp);
    }
    st = hilal_archive_open_read(other, &ar, &err);
    CHECK(st == HILAL_ERR_FORMAT && strstr(err.msg, "not an HDF5 file") != NULL, "text file: %s", err.msg);
    hilal_error_clear(&err);
    st = hilal_archive_open_write(other, NULL, &ar, &err);
    CHECK(st == HILAL_ERR_FORMAT && ar == NULL, "text file for writing: %s", err.msg);
    hilal_error_clear(&err);

    snprintf(other, sizeof other, "%s/plain.h5", dir);
    hid_t fid = H5Fcreate(other, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    H5Fclose(fid);
    st = hilal_archive_open_read(other, &ar, &err);
    CHECK(st == HILAL_ERR_FORMAT && strstr(err.msg, "not a Hilal archive") != NULL, "plain HDF5: %s", err.msg);
    hilal_error_clear(&err);

    hilal_archive_options_init(&opt);
    opt.cutout_size = 31;
    st = hilal_archive_open_write(path, &opt, &ar, &err);
    CHECK(st == HILAL_ERR_MISMATCH && ar == NULL && strstr(err.msg, "63 px cutouts") != NULL,
          "cutout size mismatch: %s", err.msg);
    hilal_error_clear(&err);
    opt.cutout_size = 64;
    st = hilal_archive_open_write(path, &opt, &ar, &err);
    CHECK(st == HILAL_ERR_RANGE && strstr(err.msg, "odd") != NULL, "even cutout size: %s", err.msg);
    hilal_error_clear(&err);

    /* One writer at a time; readers are welcome meanwhile. */
    st = hilal_archive_open_write(path, NULL, &ar, &err);
    CHECK_OK(st, &err);
    st = hilal_archive_open_write(path, NULL, &ar2, &err);
    CHECK(st == HILAL_ERR_IO && ar2 == NULL && strstr(err.msg, "being written by another process") != NULL,
          "second writer refused: %s", err.msg);
    hilal_error_clear(&err);
    hilal_archive *rd = NULL;
    CHECK_OK(hilal_archive_open_read(path, &rd, &err), &err);
    hilal_archive_summary sum;
    CHECK_OK(hilal_archive_get_summary(rd, &sum, &err), &err);
    CHECK(sum.writer_active == 1, "reader sees the active writer");
    hilal_archive_free(rd);

    hilal_frame f;
    tf_make(&f, "x", 9, NX, NY, 3);
    st = hilal_archive_append_frame(ar, 7, &f, NULL, &err);
    CHECK(st == HILAL_ERR_USAGE && strstr(err.msg, "run 7 was not begun") != NULL, "unknown run: %s", err.msg);
    hilal_error_clear(&err);
    hilal_frame_clear(&f);
    hilal_frame_init(&f);
    int32_t run;
    CHECK_OK(hilal_archive_begin_run(ar, "", HASH1, &run, &err), &err);
    st = hilal_archive_append_frame(ar, run, &f, NULL, &err);
    CHECK(st == HILAL_ERR_DATA && strstr(err.msg, "no science image") != NULL, "no image: %s", err.msg);
    hilal_error_clear(&err);
    st = hilal_archive_begin_run(ar, "", "abc", &run, &err);
    CHECK(st == HILAL_ERR_RANGE, "short hash refused: %s", err.msg);
    hilal_error_clear(&err);
    CHECK_OK(hilal_archive_close(ar, &err), &err);

    /* Read-only handles refuse writing. */
    CHECK_OK(hilal_archive_open_read(path, &rd, &err), &err);
    st = hilal_archive_begin_run(rd, "", HASH1, &run, &err);
    CHECK(st == HILAL_ERR_USAGE && strstr(err.msg, "read-only") != NULL, "read-only: %s", err.msg);
    hilal_error_clear(&err);
    hilal_archive_free(rd);
    hilal_archive_free(NULL);
}

/* The stage through its descriptor (the runner would need every earlier
 * stage to make VETTED). */
static void test_stage(const char *dir)
{
    char path[4200], set[4300];
    hilal_error err = {0};
    const hilal_stage *stage = hilal_registry_find("archive");
    CHECK(stage != NULL && stage->needs == HILAL_PROD_VETTED && stage->makes == HILAL_PROD_ARCHIVED,
          "archive stage registered");
    if (stage == NULL)
        return;
    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config: %s", err.msg);
    if (cfg == NULL)
        return;
    CHECK(hilal_config_get_int(cfg, "archive.cutout_size") == 63, "default cutout size 63");
    void *state = NULL;
    hilal_status st = stage->init(cfg, &state, &err);
    CHECK(st == HILAL_ERR_CONFIG && state == NULL && strstr(err.msg, "archive.path is empty") != NULL,
          "empty path refused: %s", err.msg);
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set_arg(cfg, "archive.cutout_size=32", &err), &err);
    snprintf(path, sizeof path, "%s/stage.h5", dir);
    snprintf(set, sizeof set, "archive.path=%s", path);
    CHECK_OK(hilal_config_set_arg(cfg, set, &err), &err);
    st = stage->init(cfg, &state, &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "odd") != NULL, "even size refused: %s", err.msg);
    hilal_error_clear(&err);
    CHECK_OK(hilal_config_set_arg(cfg, "archive.cutout_size=63", &err), &err);

    st = stage->init(cfg, &state, &err);
    CHECK_OK(st, &err);
    if (st == HILAL_OK) {
        hilal_frame f1, f2;
        tf_make(&f1, "s1", 11, NX, NY, 25);
        tf_make(&f2, "s2", 12, NX, NY, 10);
        CHECK_OK(stage->run(state, &f1, &err), &err);
        CHECK_OK(stage->run(state, &f2, &err), &err);
        CHECK(f1.cands[0].cand_id == 1 && f1.cands[24].cand_id == 25 && f2.cands[0].cand_id == 26 &&
              f2.cands[9].cand_id == 35, "archive ids written back to the candidates");
        hilal_frame_clear(&f1);
        hilal_frame_clear(&f2);
        stage->fini(state);
    }
    stage->fini(NULL);

    /* The run records the effective configuration and its hash. */
    hilal_archive *ar = NULL;
    CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
    if (ar != NULL) {
        hilal_archive_run *runs = NULL;
        size_t nr = 0;
        char hash[65];
        hilal_config_hash(cfg, hash);
        CHECK_OK(hilal_archive_read_runs(ar, &runs, &nr, &err), &err);
        CHECK(nr == 1 && strcmp(runs[0].config_hash, hash) == 0, "run hash is the config hash");
        if (nr == 1) {
            char *text = NULL, *want = hilal_config_text(cfg, 0);
            CHECK_OK(hilal_archive_read_text(ar, runs[0].config_offset, runs[0].config_length, &text, &err), &err);
            CHECK(text != NULL && want != NULL && strcmp(text, want) == 0 &&
                  strstr(text, "cutout_size") != NULL, "effective configuration stored");
            free(text);
            free(want);
        }
        free(runs);
        hilal_archive_summary sum;
        CHECK_OK(hilal_archive_get_summary(ar, &sum, &err), &err);
        CHECK(sum.ncands_current == 35 && sum.nframes_current == 2, "stage archived 2 frames, 35 candidates");
        hilal_archive_free(ar);
    }
    hilal_config_free(cfg);
}

/* docs/archive.md documents every column of every table. */
/* The stamps: the mask stamps with compression (the library filters each
 * stamp, shuffle then deflate, and hands HDF5 whole chunks) at levels 1 and
 * 9, and without (HDF5 writes them as they are); 255 px stamps, which the
 * library writes in blocks of 64 candidates, the second frame's first block
 * starting off a block boundary. Every stamp of two frames reads back
 * exactly through the C API, and the mask stamps through plain HDF5 with
 * the dataset's filter pipeline. */
static void test_stamp_blocks(const char *dir)
{
    const struct { int size, level; size_t n1, n2; } cases[] = {
        {63, 0, 97, 33}, {63, 1, 97, 33}, {63, 9, 97, 33}, {255, 1, 66, 3}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int S = cases[c].size, level = cases[c].level;
        const size_t n1 = cases[c].n1, n2 = cases[c].n2, n = n1 + n2;
        char path[4200], why[256];
        hilal_error err = {0};
        hilal_archive *ar = NULL;
        hilal_archive_commit c1, c2;
        int32_t run = 0;
        hilal_archive_options opt;
        hilal_archive_options_init(&opt);
        opt.cutout_size = S;
        opt.compress_level = level;
        snprintf(path, sizeof path, "%s/stamps_%d_%d.h5", dir, S, level);
        hilal_status st = hilal_archive_open_write(path, &opt, &ar, &err);
        CHECK_OK(st, &err);
        if (st != HILAL_OK)
            continue;
        CHECK_OK(hilal_archive_begin_run(ar, "stamps", HASH1, &run, &err), &err);
        append(ar, run, "s1", 5, n1, &c1);
        append(ar, run, "s2", 6, n2, &c2);
        CHECK_OK(hilal_archive_close(ar, &err), &err);

        CHECK_OK(hilal_archive_open_read(path, &ar, &err), &err);
        hilal_archive_cand *rows = NULL;
        size_t nr = 0, bad = 0;
        CHECK_OK(hilal_archive_query(ar, NULL, &rows, &nr, &err), &err);
        for (size_t i = 0; i < nr; i++) {
            hilal_archive_cutout cut;
            if (hilal_archive_read_cutout(ar, rows[i].cand_id, &cut, &err) != HILAL_OK) {
                bad++;
                continue;
            }
            if (!tf_cutout_matches(&cut, &rows[i], i < n1 ? 5 : 6, NX, NY, why, sizeof why) &&
                bad++ == 0)
                CHECK(0, "%d px, level %d, candidate %lld: %s", S, level,
                      (long long)rows[i].cand_id, why);
            hilal_archive_cutout_clear(&cut);
        }
        CHECK(nr == n && bad == 0, "%d px, level %d: %zu of %zu cutouts differ", S, level, bad, nr);
        free(rows);
        hilal_archive_free(ar);

        /* Plain HDF5: the dataset's filters and every mask pixel. */
        hid_t fid = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        hid_t ds = fid >= 0 ? H5Dopen2(fid, "cutouts/mask", H5P_DEFAULT) : -1;
        hid_t dcpl = ds >= 0 ? H5Dget_create_plist(ds) : -1;
        int nf = dcpl >= 0 ? H5Pget_nfilters(dcpl) : -1;
        CHECK(nf == (level > 0 ? 2 : 0), "level %d: %d filters on the mask stamps", level, nf);
        const size_t SS = (size_t)S * (size_t)S;
        uint16_t *all = malloc(n * SS * sizeof *all);
        CHECK(ds >= 0 && all != NULL &&
                  H5Dread(ds, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, all) >= 0,
              "%d px, level %d: mask stamps read with plain HDF5", S, level);
        size_t nbad = 0;
        for (int fr = 0; fr < 2 && all != NULL; fr++) {
            hilal_frame f;
            const size_t nf_c = fr == 0 ? n1 : n2, first = fr == 0 ? 0 : n1;
            tf_make(&f, "x", fr == 0 ? 5 : 6, NX, NY, nf_c);
            for (size_t i = 0; i < nf_c; i++) {
                const hilal_candidate *cd = &f.cands[i];
                long x0 = (long)floor(cd->x - 0.5) - S / 2, y0 = (long)floor(cd->y - 0.5) - S / 2;
                for (long j = 0; j < S; j++)
                    for (long k = 0; k < S; k++) {
                        long x = x0 + k, y = y0 + j;
                        int in = x >= 0 && y >= 0 && x < NX && y < NY;
                        uint16_t want = in ? tf_mask(x, y) : (HILAL_MASK_NODATA | HILAL_MASK_EDGE);
                        nbad += all[(first + i) * SS + (size_t)(j * S + k)] != want;
                    }
            }
            hilal_frame_clear(&f);
        }
        CHECK(nbad == 0, "%d px, level %d: %zu mask pixels differ read with plain HDF5", S, level,
              nbad);
        free(all);
        if (dcpl >= 0)
            H5Pclose(dcpl);
        if (ds >= 0)
            H5Dclose(ds);
        if (fid >= 0)
            H5Fclose(fid);
        remove(path);
    }
}

/* Clean mask stamps (all zero: most candidates of a real frame) share one
 * filtered chunk; stamps touching a masked patch or the border do not. The
 * mask stamps of a frame whose difference mask is clean but for a 5 x 5
 * patch read back exactly with plain HDF5. */
static void test_clean_masks(const char *dir)
{
    char path[4200];
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_commit c;
    int32_t run = 0;
    const size_t n = 80;
    snprintf(path, sizeof path, "%s/clean_masks.h5", dir);
    hilal_frame f;
    CHECK(tf_make(&f, "clean", 7, NX, NY, n) == 0, "frame built");
    for (long i = 0; i < NX * NY; i++)
        f.diff.mask[i] = 0;
    for (long y = 78; y < 83; y++)
        for (long x = 98; x < 103; x++)
            f.diff.mask[y * NX + x] = HILAL_MASK_SAT | HILAL_MASK_CR;
    hilal_status st = hilal_archive_open_write(path, NULL, &ar, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK) {
        hilal_frame_clear(&f);
        return;
    }
    CHECK_OK(hilal_archive_begin_run(ar, "clean", HASH1, &run, &err), &err);
    CHECK_OK(hilal_archive_append_frame(ar, run, &f, &c, &err), &err);
    CHECK_OK(hilal_archive_close(ar, &err), &err);

    const int S = 63;
    const size_t SS = (size_t)S * S;
    uint16_t *all = malloc(n * SS * sizeof *all);
    hid_t fid = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ds = fid >= 0 ? H5Dopen2(fid, "cutouts/mask", H5P_DEFAULT) : -1;
    CHECK(ds >= 0 && all != NULL &&
              H5Dread(ds, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, all) >= 0,
          "mask stamps read with plain HDF5");
    size_t nbad = 0, nclean = 0, npatch = 0;
    for (size_t i = 0; i < n && all != NULL; i++) {
        const hilal_candidate *cd = &f.cands[i];
        long x0 = (long)floor(cd->x - 0.5) - S / 2, y0 = (long)floor(cd->y - 0.5) - S / 2;
        int clean = 1, patch = 0;
        for (long j = 0; j < S; j++)
            for (long k = 0; k < S; k++) {
                long x = x0 + k, y = y0 + j;
                int in = x >= 0 && y >= 0 && x < NX && y < NY;
                uint16_t want = in ? f.diff.mask[y * NX + x] : (HILAL_MASK_NODATA | HILAL_MASK_EDGE);
                nbad += all[i * SS + (size_t)(j * S + k)] != want;
                clean &= want == 0;
                patch |= in && want != 0;
            }
        nclean += clean;
        npatch += patch;
    }
    CHECK(nbad == 0 && nclean > 5 && npatch > 5,
          "%zu mask pixels differ (%zu clean stamps, %zu on the patch)", nbad, nclean, npatch);
    free(all);
    if (ds >= 0)
        H5Dclose(ds);
    if (fid >= 0)
        H5Fclose(fid);
    hilal_frame_clear(&f);
}

static void test_docs(void)
{
    const char *src = getenv("HILAL_SOURCE_DIR");
    char path[4200];
    snprintf(path, sizeof path, "%s/docs/archive.md", src ? src : ".");
    FILE *fp = fopen(path, "r");
    CHECK(fp != NULL, "docs/archive.md exists");
    if (fp == NULL)
        return;
    static char doc[200000];
    size_t n = fread(doc, 1, sizeof doc - 1, fp);
    doc[n] = '\0';
    fclose(fp);
    const char *tables[] = {"candidates", "frames", "runs"};
    for (int t = 0; t < 3; t++) {
        size_t nc;
        const hilal_archive_column *cols = hilal_archive_columns(tables[t], &nc);
        for (size_t i = 0; i < nc; i++) {
            char quoted[80];
            snprintf(quoted, sizeof quoted, "`%s`", cols[i].name);
            CHECK(strstr(doc, quoted) != NULL, "docs/archive.md documents %s.%s", tables[t], cols[i].name);
        }
    }
    char schema[64];
    snprintf(schema, sizeof schema, "schema version %d", HILAL_ARCHIVE_SCHEMA_VERSION);
    CHECK(strstr(doc, schema) != NULL, "docs/archive.md states the schema version");
}

int main(void)
{
    char dir[4096];
    hilal_test_tmpdir("archive", dir, sizeof dir);
    test_write_and_read(dir);
    test_rerun_and_second_run(dir);
    test_filters(dir);
    test_errors(dir);
    test_stage(dir);
    test_stamp_blocks(dir);
    test_clean_masks(dir);
    test_docs();
    return hilal_test_finish();
}
