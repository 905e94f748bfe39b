/* The HDF5 candidate archive: one file per night (or per survey field, or
 * any unit you like) holding every candidate with its cutouts, per-frame
 * records for re-analysis, and the provenance of each run. The layout
 * (schema version HILAL_ARCHIVE_SCHEMA_VERSION) is documented in
 * docs/archive.md; h5py and astropy read it directly.
 *
 * Writing
 *   hilal_archive_open_write() creates the file or opens it for appending,
 *   hilal_archive_begin_run() registers the configuration (a run id per
 *   distinct configuration hash and software version), then
 *   hilal_archive_append_frame() commits one frame at a time. Each commit is
 *   flushed to the operating system before the call returns: a writer
 *   killed at any moment (even with SIGKILL) never leaves the file
 *   unreadable and never loses a committed frame; the next writer repairs
 *   a metadata write it left torn (from the journal ARCHIVE.journal that a
 *   writer keeps next to the archive), clears the flags it left and drops
 *   the rows of the frame it did not commit.
 *   Running the same frame (same input SHA-256 and HDU) again in the same
 *   run replaces its rows: the older rows are kept but marked superseded.
 *   One writer at a time: a second writer gets HILAL_ERR_IO.
 *   The handle is thread-safe (calls are serialised by a mutex).
 *
 * Reading
 *   hilal_archive_open_read() works while another process writes (HDF5
 *   SWMR): each read sees every frame committed before it.
 *
 * All functions return a hilal_status and fill the caller's hilal_error.
 */
#ifndef HILAL_ARCHIVE_H
#define HILAL_ARCHIVE_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/config.h"
#include "hilal/frame.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the layout written by this library (root attribute
 * `hilal_archive_schema`). Readers accept this version and older ones. */
#define HILAL_ARCHIVE_SCHEMA_VERSION 2

typedef struct hilal_archive hilal_archive;

/* Options fixed when an archive is created (cutout and PSF sizes) or used
 * while writing (compression, fsync). */
typedef struct hilal_archive_options {
    int cutout_size;           /* side of the stamps, px, odd, 5..255 (default 63) */
    int psf_size;              /* side of the stored PSF boxes, px, odd, 5..255 (default 51) */
    int compress_level;        /* deflate level (with shuffle) of mask stamps and PSFs, 0..9 (default 1) */
    int cutout_compress_level; /* deflate level of the float stamps, 0..9 (default 0: see docs/archive.md) */
    int fsync;                 /* also fsync() the file at each commit (default 0; see docs/archive.md) */
    double assoc_radius_arcsec; /* candidates within this distance of an object's mean position
                                   are detections of that object (default 1.0; see docs/archive.md,
                                   "Objects") */
} hilal_archive_options;

/* Fills the defaults above. */
void hilal_archive_options_init(hilal_archive_options *opt);

/* /frames.status */
enum hilal_archive_frame_status {
    HILAL_ARCHIVE_FRAME_NONE = 0,       /* never written (row of a frame a dead writer did not commit) */
    HILAL_ARCHIVE_FRAME_COMMITTED = 1,  /* complete; current unless a later row has the same key */
    HILAL_ARCHIVE_FRAME_SUPERSEDED = 2, /* replaced by a later run of the same frame and run */
    HILAL_ARCHIVE_FRAME_FAILED = 3      /* the frame failed; message says why; no candidates */
};

/* Cutout planes, in this order in /cutouts and in hilal_archive_cutout. */
enum hilal_archive_plane {
    HILAL_ARCHIVE_SCIENCE = 0,    /* science pixels, ADU (background included) */
    HILAL_ARCHIVE_REFERENCE = 1,  /* aligned reference pixels, reference ADU */
    HILAL_ARCHIVE_DIFFERENCE = 2, /* ZOGY proper difference D (unit variance) */
    HILAL_ARCHIVE_SCORR = 3,      /* S_corr, sigma */
    HILAL_ARCHIVE_VARIANCE = 4,   /* science variance, ADU^2 */
    HILAL_ARCHIVE_NFLOAT_PLANES = 5
};

/* One row of /candidates (the C view; names match the HDF5 fields). */
typedef struct hilal_archive_cand {
    int64_t cand_id;        /* 1-based row number in /candidates: unique in the archive */
    int64_t frame_id;       /* see hilal_archive_frame_id() */
    double x, y;            /* FITS 1-based science-frame pixels */
    double ra, dec;         /* deg, NaN without WCS */
    double snr;             /* signed S_corr peak, sigma (negative: fading) */
    double flux, flux_err;  /* signed PSF flux and error, science ADU */
    double mag, mag_err;    /* mag of |flux| with the zero point, NaN without */
    double fwhm;            /* on D, px */
    double elongation;      /* a/b on D */
    double rb;              /* real/bogus score in [0, 1] */
    uint32_t flags;         /* hilal_cand_flag bits (HILAL_CAND_EDGE added for truncated stamps) */
    double mjd;             /* of the science frame */
    double sharpness, neg_frac, dipole, dist_sat_px, dist_mask_px, masked_frac; /* vetting */
    int32_t run_id;         /* /runs.run_id */
    int64_t frame_row;      /* 0-based row of its frame in /frames */
    int32_t stamp_x0, stamp_y0; /* FITS 1-based science pixel of the stamps' first pixel */
    uint8_t valid;          /* 1 when current (frame committed, not superseded) */
    /* Schema 2 (0 / NaN when read from a schema-1 archive): */
    int64_t object_id;      /* /objects.object_id of the object it was associated with; 0: none
                               (no sky position) */
    int64_t prev_cand_id;   /* the object's previous detection (cand_id), 0 for its first */
    double pos_err_arcsec;  /* 1-sigma position error, arcsec (see docs/archive.md, "Objects") */
} hilal_archive_cand;

/* One row of /objects (schema 2): a source seen at the same sky position in
 * one or more frames. Detections are candidates of current frames. */
typedef struct hilal_archive_object {
    int64_t object_id;      /* 1-based row number in /objects */
    double ra, dec;         /* inverse-variance weighted mean position, deg */
    double pos_err_arcsec;  /* 1-sigma error of the mean position, arcsec */
    int32_t ndet;           /* detections (current candidate rows) */
    int32_t npos, nneg;     /* of which brightening (snr > 0) and fading */
    double first_mjd, last_mjd;         /* MJD of the first and last detection */
    int64_t first_cand_id, last_cand_id; /* their cand_ids (last = head of the history chain) */
    double sum_w, sum_wx, sum_wy, sum_wz; /* sums of w and w * unit vector, w = 1/pos_err^2 */
} hilal_archive_object;

/* One row of /frames. Strings are NUL-terminated. */
typedef struct hilal_archive_frame {
    int64_t frame_id;
    char frame_name[65];    /* hilal_frame.frame_id */
    char path[513];         /* science file */
    int32_t hdu;            /* 1-based HDU of the science image */
    char sha256[65];        /* of the science file */
    char ref_path[513];
    int32_t ref_hdu;
    char ref_sha256[65];
    double mjd;
    char filter[33];
    char object[73];
    double exptime_s;
    int32_t nx, ny;
    int32_t run_id;
    int32_t status;         /* hilal_archive_frame_status */
    uint8_t valid;          /* status == COMMITTED */
    int32_t n_candidates;
    int64_t first_cand_id;  /* cand_id of its first candidate (candidates are contiguous) */
    double written_unix;    /* when the row was committed, s since 1970 */
    double psf_fwhm_sci_px, psf_fwhm_ref_px, psf_fwhm_diff_px;
    int32_t psf_nstars_sci, psf_nstars_ref;
    int32_t psf_size_sci, psf_size_ref, psf_size_diff; /* sides before boxing into /psf */
    double flux_ratio, flux_ratio_err;
    int32_t flux_ratio_nstars;
    double reg_rms_x_px, reg_rms_y_px;
    double sky_sci_adu, sky_rms_sci_adu, sky_ref_adu, sky_rms_ref_adu;
    double scorr_mean, scorr_std;
    double f_d;             /* ZOGY F_D */
    double limflux5_adu;    /* 5 x median flux error of a point source, science ADU */
    double limmag5;         /* zeropoint - 2.5 log10(limflux5_adu), NaN without zero point */
    double zeropoint_mag, gain_e_per_adu;
    int64_t header_offset, header_length; /* science header cards in /text */
    char message[257];      /* why a FAILED frame failed, "" otherwise */
} hilal_archive_frame;

/* One row of /runs. */
typedef struct hilal_archive_run {
    int32_t run_id;             /* 1, 2, ... in order of first use */
    char config_hash[65];       /* hilal_config_hash() */
    char software_version[33];  /* hilal_version() */
    char library_versions[257]; /* hilal_library_versions() */
    char created_utc[25];       /* "YYYY-MM-DDThh:mm:ssZ" of the first use */
    int64_t config_offset, config_length; /* effective configuration text in /text */
} hilal_archive_run;

/* Column description of a table (for output formats and documentation). */
typedef enum hilal_archive_col_type {
    HILAL_ARCHIVE_COL_I64, HILAL_ARCHIVE_COL_I32, HILAL_ARCHIVE_COL_U32,
    HILAL_ARCHIVE_COL_U8, HILAL_ARCHIVE_COL_F64, HILAL_ARCHIVE_COL_STR
} hilal_archive_col_type;

typedef struct hilal_archive_column {
    const char *name;
    hilal_archive_col_type type;
    size_t offset;           /* in the C struct of the table */
    size_t size;             /* strings: bytes in the C struct (NUL included) */
    const char *unit;        /* astropy/FITS unit string, "" when none */
    const char *description;
} hilal_archive_column;

/* Columns of "candidates", "frames", "runs" or "objects" in file order; NULL
 * (n = 0) for another name. */
const hilal_archive_column *hilal_archive_columns(const char *table, size_t *n);

/* ------------------------------------------------------------------------
 * Writing
 * ------------------------------------------------------------------------ */

/* Opens path for appending, creating it (atomically: a complete empty
 * archive appears at path or nothing does) when it does not exist. opt may
 * be NULL for the defaults; cutout_size and psf_size must match those of an
 * existing archive (HILAL_ERR_MISMATCH otherwise; both 0: take them from an
 * existing archive, which must then exist). When the previous writer
 * died, its flags are cleared, rows of uncommitted frames are dropped and
 * hilal_archive_recovered() returns 1. On error *out is NULL. */
hilal_status hilal_archive_open_write(const char *path, const hilal_archive_options *opt,
                                      hilal_archive **out, hilal_error *err);

/* 1 when opening had to recover from a writer that died. */
int hilal_archive_recovered(const hilal_archive *ar);

/* Opens the archive for writing and closes it again: what the next writer
 * would do after a writer died (repair a torn metadata write from the
 * journal, clear HDF5's "open for writing" flag, drop uncommitted rows), so
 * that tools without SWMR can read it. *recovered says whether anything had
 * to be done. HILAL_ERR_IO while another process is writing it. */
hilal_status hilal_archive_recover(const char *path, int *recovered, hilal_error *err);

/* Finds or adds the run of this configuration: the same configuration hash
 * and software version give the same run id. Records the configuration
 * text, hash and software and library versions. */
hilal_status hilal_archive_begin_run(hilal_archive *ar, const char *config_text,
                                     const char *config_hash, int32_t *run_id,
                                     hilal_error *err);

/* hilal_archive_begin_run() with hilal_config_text(cfg, 0) and hilal_config_hash(cfg). */
hilal_status hilal_archive_begin_run_config(hilal_archive *ar, const hilal_config *cfg,
                                            int32_t *run_id, hilal_error *err);

/* What a commit did. */
typedef struct hilal_archive_commit {
    int64_t frame_id;
    int64_t frame_row;          /* its row in /frames */
    int64_t first_cand_id;      /* cand_id of frame->cands[0]; the others follow */
    size_t ncands;
    int64_t replaced_frame_row; /* row it superseded, -1 if none */
} hilal_archive_commit;

/* Appends one frame: its candidates (frame->cands, x/y FITS 1-based), their
 * cutouts from frame->sci, frame->ref (aligned), frame->diff.d,
 * frame->diff.scorr, frame->sci->var and the mask (frame->diff.mask, else the
 * union of the science and reference masks), its PSFs and per-frame
 * records; missing planes give NaN stamps. Stamps reaching past the image are
 * padded with NaN (mask NODATA|EDGE) and the row gets HILAL_CAND_EDGE. The
 * frame is committed (and flushed) before returning. out may be NULL. */
hilal_status hilal_archive_append_frame(hilal_archive *ar, int32_t run_id,
                                        const hilal_frame *frame, hilal_archive_commit *out,
                                        hilal_error *err);

/* Records a frame that failed (status FAILED, the message, no candidates),
 * so that a night's archive lists every frame it was given. */
hilal_status hilal_archive_record_failure(hilal_archive *ar, int32_t run_id,
                                          const hilal_frame *frame, const char *message,
                                          hilal_error *err);

/* Copies into ar every frame of the archive at src_path (a shard written by
 * one rank of an MPI night, or any archive with the same cutout and PSF
 * sizes) that is current there or FAILED, with its candidates, cutouts,
 * PSFs and header, in src's row order. Each source run becomes the run of
 * ar with the same configuration hash and software version (added, with
 * its configuration text, when missing). Each frame is committed as by
 * hilal_archive_append_frame() (new cand_ids; a current row of the same
 * frame and run in ar becomes superseded) and keeps its commit time. A row
 * already copied before (same frame id, run, status and commit time) is not
 * copied again, so a merge cut short by a crash can simply be repeated. src
 * is first recovered if its writer died (HILAL_ERR_IO while a writer is
 * active on it); HILAL_ERR_MISMATCH when the sizes differ. nframes and
 * ncands (may be NULL) receive the frames and candidates copied. */
hilal_status hilal_archive_merge(hilal_archive *ar, const char *src_path, size_t *nframes,
                                 size_t *ncands, hilal_error *err);

/* The frame id stored for an input: the first 15 hex digits (60 bits) of
 * SHA-256("<sha256 of the file>:<hdu>") as a positive integer; when the file's
 * SHA-256 is unknown, of "name:<name>:<hdu>" instead. In Python:
 * int(hashlib.sha256(f"{sha}:{hdu}".encode()).hexdigest()[:15], 16). */
int64_t hilal_archive_frame_id(const char *sha256_hex, int hdu, const char *name);

/* The writer handle this process holds on path (opened with
 * hilal_archive_open_write() and not closed yet), or NULL. Lets a stage that
 * runs after `archive` in the same process (alerts) read what was just
 * committed through the writer, since a second handle on a file being
 * written is not possible within one process. The handle stays owned by its
 * opener; the caller must stop using it before the opener closes it. */
hilal_archive *hilal_archive_writer_lookup(const char *path);

/* Flushes, closes and frees. Returns the first error met while closing (the
 * handle is freed in every case). */
hilal_status hilal_archive_close(hilal_archive *ar, hilal_error *err);

/* Closes without reporting errors. Accepts NULL. */
void hilal_archive_free(hilal_archive *ar);

/* ------------------------------------------------------------------------
 * Reading
 * ------------------------------------------------------------------------ */

/* Opens an archive read-only (HDF5 SWMR read: works while a writer appends).
 * HILAL_ERR_IO when the file cannot be opened, HILAL_ERR_FORMAT when it is
 * not a Hilal archive or has a newer schema. */
hilal_status hilal_archive_open_read(const char *path, hilal_archive **out, hilal_error *err);

typedef struct hilal_archive_summary {
    int schema_version;
    int cutout_size, psf_size;
    char created_utc[32];
    char created_by[64];            /* software version that created it */
    size_t nruns;
    size_t nframe_rows;             /* rows in /frames, all statuses */
    size_t nframes_current;         /* committed and not superseded */
    size_t nframes_superseded;
    size_t nframes_failed;
    size_t ncand_rows;              /* rows in /candidates */
    size_t ncands_current;          /* candidates of current frames */
    int writer_active;              /* a live process holds the archive for writing */
} hilal_archive_summary;

hilal_status hilal_archive_get_summary(hilal_archive *ar, hilal_archive_summary *out,
                                       hilal_error *err);

/* All runs (malloc'd array, caller frees). */
hilal_status hilal_archive_read_runs(hilal_archive *ar, hilal_archive_run **runs, size_t *n,
                                     hilal_error *err);

/* All rows of /frames, whatever their status (malloc'd, caller frees). With
 * current != NULL, *current receives a malloc'd array of n flags: 1 for the
 * rows whose frame is current (the caller frees it). */
hilal_status hilal_archive_read_frames(hilal_archive *ar, hilal_archive_frame **rows, size_t *n,
                                       unsigned char **current, hilal_error *err);

/* A piece of /text (configuration or header) as a malloc'd NUL-terminated
 * string (caller frees). */
hilal_status hilal_archive_read_text(hilal_archive *ar, int64_t offset, int64_t length,
                                     char **text, hilal_error *err);

/* Filters of hilal_archive_query(); hilal_archive_filter_init() disables all. */
typedef struct hilal_archive_filter {
    int use_cone;
    double ra_deg, dec_deg, radius_arcsec;  /* cone (great-circle distance) */
    double mjd_min, mjd_max;                /* inclusive; NaN = open */
    double snr_min;                         /* |snr| >= snr_min; NaN = any */
    int sign;                               /* +1 brightening only, -1 fading only, 0 both */
    double rb_min;                          /* rb >= rb_min; NaN = any */
    uint32_t flags_any;                     /* some of these bits set (0 = no filter) */
    uint32_t flags_none;                    /* none of these bits set */
    int64_t frame_id;                       /* 0 = any */
    const char *frame_name;                 /* NULL = any */
    int32_t run_id;                         /* 0 = any */
    int include_superseded;                 /* also rows of superseded frames */
} hilal_archive_filter;

void hilal_archive_filter_init(hilal_archive_filter *q);

/* Candidates of committed frames matching q (all current ones for q NULL),
 * in cand_id order (malloc'd array, caller frees; *rows NULL when n = 0).
 * Rows of frames a writer has not committed yet are never returned. */
hilal_status hilal_archive_query(hilal_archive *ar, const hilal_archive_filter *q,
                                 hilal_archive_cand **rows, size_t *n, hilal_error *err);

/* One candidate by id, with its frame row. HILAL_ERR_NOTFOUND when no
 * committed frame holds it. *current (may be NULL) says whether its frame is
 * current. */
hilal_status hilal_archive_get_candidate(hilal_archive *ar, int64_t cand_id,
                                         hilal_archive_cand *cand, hilal_archive_frame *frame,
                                         int *current, hilal_error *err);

/* Rows [first_cand_id, first_cand_id + n) of /candidates as stored, without
 * looking at their frames (for a caller that knows they belong to a
 * committed frame, such as the range a commit returned; `valid` is as stored).
 * HILAL_ERR_NOTFOUND when the range passes the end. *rows is malloc'd. */
hilal_status hilal_archive_read_candidates(hilal_archive *ar, int64_t first_cand_id, size_t n,
                                           hilal_archive_cand **rows, hilal_error *err);

/* Objects (schema 2; HILAL_ERR_NOTFOUND for an older archive). */

/* All rows of /objects (malloc'd, caller frees; *rows NULL when n = 0). */
hilal_status hilal_archive_read_objects(hilal_archive *ar, hilal_archive_object **rows, size_t *n,
                                        hilal_error *err);

/* One object. HILAL_ERR_NOTFOUND when there is no such object. */
hilal_status hilal_archive_get_object(hilal_archive *ar, int64_t object_id,
                                      hilal_archive_object *obj, hilal_error *err);

/* The history of an object: its detections (candidates of current frames),
 * oldest first (in cand_id order), up to and including cand_id `upto`
 * (0 = all). When a frame was processed by several runs only the latest
 * run's detection of that frame is kept. malloc'd, caller frees. */
hilal_status hilal_archive_object_history(hilal_archive *ar, int64_t object_id, int64_t upto,
                                          hilal_archive_cand **rows, size_t *n,
                                          hilal_error *err);

/* The stamps of one candidate. */
typedef struct hilal_archive_cutout {
    int size;                                  /* side, px */
    float *plane[HILAL_ARCHIVE_NFLOAT_PLANES]; /* size*size each, row-major, NaN outside the frame */
    uint16_t *mask;                            /* size*size hilal_mask_bit values */
} hilal_archive_cutout;

hilal_status hilal_archive_read_cutout(hilal_archive *ar, int64_t cand_id,
                                       hilal_archive_cutout *out, hilal_error *err);

/* Frees the planes (accepts an all-zero struct). */
void hilal_archive_cutout_clear(hilal_archive_cutout *c);

/* The stored PSF box of a frame row: which = 0 science, 1 reference,
 * 2 difference (P_D). *data is psf_size^2 floats (malloc'd, caller frees),
 * NaN when the frame had no such PSF. */
hilal_status hilal_archive_read_psf(hilal_archive *ar, int64_t frame_row, int which,
                                    float **data, int *size, hilal_error *err);

/* ------------------------------------------------------------------------
 * Products of the tools
 * ------------------------------------------------------------------------ */

/* Writes candidate rows as a FITS binary table (EXTNAME CANDIDATES, one
 * column per field with TUNIT, CHECKSUM/DATASUM; passes fitsverify), built
 * under a temporary name and renamed over path. source names the archive in
 * the header (may be NULL). */
hilal_status hilal_archive_write_fits_table(const char *path, const hilal_archive_cand *rows,
                                            size_t n, const char *source, hilal_error *err);

/* Writes a candidate's stamps as a FITS file: an empty primary HDU with the
 * candidate's fields as keywords, then SCIENCE, REFERENCE, DIFFERENCE,
 * SCORR, VARIANCE (float32) and MASK extensions. header (the frame's
 * science header cards from /text, may be NULL) provides the WCS, shifted
 * to the stamp (CRPIX) with LTV1/LTV2 giving the offset to the frame. */
hilal_status hilal_archive_write_cutout_fits(const char *path, const hilal_archive_cand *cand,
                                             const hilal_archive_frame *frame,
                                             const char *header, const hilal_archive_cutout *c,
                                             hilal_error *err);

/* Writes an 8-bit RGB PNG showing science | reference | difference side by
 * side, each scaled `zoom` times (nearest pixel), with IRAF zscale limits
 * and an asinh stretch; pixels outside the frame are dark red. */
hilal_status hilal_archive_write_cutout_png(const char *path, const hilal_archive_cutout *c,
                                            int zoom, hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
