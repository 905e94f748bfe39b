/* Stage archive: appends each vetted frame (candidates, cutouts, PSFs,
 * per-frame records) to the HDF5 archive and commits it (see
 * include/hilal/archive.h and docs/archive.md).
 *
 * init opens (or creates) the archive once per run and registers the run's
 * configuration; frames processed concurrently share it (the archive
 * serialises writes with its own mutex). Each frame is committed and
 * flushed before run() returns, so a frame counts as archived only once it
 * would survive the process being killed. After a successful commit the
 * candidates' cand_id fields are set to their archive ids.
 */
#include <stdlib.h>

#include "hilal/archive.h"
#include "hilal/log.h"
#include "hilal/stage.h"

static const hilal_param archive_params[] = {
    {"path", HILAL_PARAM_STRING, "", 0, 0, "",
     "HDF5 archive file to append to (created if missing); `hilal run --archive` sets it",
     HILAL_PARAM_EXECUTION},
    {"cutout_size", HILAL_PARAM_INT, "63", 5, 255, "px",
     "side of the cutout stamps (odd); fixed when the archive is created"},
    {"psf_size", HILAL_PARAM_INT, "51", 5, 255, "px",
     "side of the boxes the PSFs are stored in (odd); fixed when the archive is created"},
    {"compress", HILAL_PARAM_INT, "1", 0, 9, "",
     "deflate level (with shuffle) of the mask stamps and PSFs; 0 = none"},
    {"cutout_compress", HILAL_PARAM_INT, "0", 0, 9, "",
     "deflate level (with shuffle) of the float stamps; 0 = none (fastest: noise compresses little)"},
    {"fsync", HILAL_PARAM_BOOL, "false", 0, 0, "",
     "also fsync() the archive at each commit (committed data on the disk, not full power-loss safety)"},
    {"assoc_radius_arcsec", HILAL_PARAM_DOUBLE, "1.0", 0.01, 60, "arcsec",
     "candidates this close to an object's mean position are detections of that object"},
};

typedef struct archive_state {
    hilal_archive *ar;
    int32_t run_id;
} archive_state;

static hilal_status archive_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive_options opt;
    archive_state *s = calloc(1, sizeof *s);
    *state = NULL;
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    const char *path = hilal_config_get_string(cfg, "archive.path");
    hilal_archive_options_init(&opt);
    opt.cutout_size = (int)hilal_config_get_int(cfg, "archive.cutout_size");
    opt.psf_size = (int)hilal_config_get_int(cfg, "archive.psf_size");
    opt.compress_level = (int)hilal_config_get_int(cfg, "archive.compress");
    opt.cutout_compress_level = (int)hilal_config_get_int(cfg, "archive.cutout_compress");
    opt.fsync = hilal_config_get_bool(cfg, "archive.fsync");
    opt.assoc_radius_arcsec = hilal_config_get_double(cfg, "archive.assoc_radius_arcsec");
    if (path == NULL || path[0] == '\0') {
        st = hilal_error_set(err, HILAL_ERR_CONFIG,
                             "archive.path is empty; give the archive file with --archive FILE "
                             "or --set archive.path=FILE");
        goto cleanup;
    }
    if (opt.cutout_size % 2 == 0 || opt.psf_size % 2 == 0) {
        st = hilal_error_set(err, HILAL_ERR_CONFIG,
                             "archive.cutout_size (%d) and archive.psf_size (%d) must be odd so "
                             "that stamps are centred on a pixel", opt.cutout_size, opt.psf_size);
        goto cleanup;
    }
    st = hilal_archive_open_write(path, &opt, &s->ar, err);
    if (st != HILAL_OK)
        goto cleanup;
    if (hilal_archive_recovered(s->ar))
        hilal_log(HILAL_LOG_WARN, "archive %s had been left open by a writer that stopped; "
                  "recovered (committed frames kept, unfinished rows dropped)", path);
    st = hilal_archive_begin_run_config(s->ar, cfg, &s->run_id, err);
cleanup:
    if (st != HILAL_OK) {
        hilal_archive_free(s->ar);
        free(s);
        return st;
    }
    *state = s;
    return HILAL_OK;
}

static hilal_status archive_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const archive_state *s = state;
    hilal_archive_commit commit;
    hilal_status st = hilal_archive_append_frame(s->ar, s->run_id, frame, &commit, err);
    if (st != HILAL_OK)
        return st;
    /* Candidates now have their archive ids (frame.h: "1-based index in
     * the frame until archived"). */
    for (size_t i = 0; i < frame->ncands; i++)
        frame->cands[i].cand_id = commit.first_cand_id + (int64_t)i;
    if (commit.replaced_frame_row >= 0)
        hilal_log(HILAL_LOG_INFO, "frame %s: replaced its earlier rows (frame row %lld) in the "
                  "archive", frame->frame_id, (long long)commit.replaced_frame_row);
    return HILAL_OK;
}

static void archive_fini(void *state)
{
    archive_state *s = state;
    if (s == NULL)
        return;
    hilal_error err = {0};
    if (hilal_archive_close(s->ar, &err) != HILAL_OK)
        hilal_log(HILAL_LOG_ERROR, "%s", err.msg);
    free(s);
}

const hilal_stage hilal_stage_archive = {
    .name = "archive",
    .summary = "append candidates, cutouts, PSFs and provenance to the HDF5 archive",
    .params = archive_params,
    .nparams = sizeof archive_params / sizeof archive_params[0],
    .needs = HILAL_PROD_VETTED,
    .makes = HILAL_PROD_ARCHIVED,
    .flags = 0,
    .init = archive_init,
    .run = archive_run,
    .fini = archive_fini,
};
