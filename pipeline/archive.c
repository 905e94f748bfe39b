/* The HDF5 candidate archive. Layout and rules: docs/archive.md; API:
 * include/hilal/archive.h. HDF5 errors are translated in h5.c.
 *
 * Crash safety rests on five rules:
 *  1. The file is written in SWMR mode (HDF5 1.10 file format), whose
 *     ordered metadata flushes keep the file readable at every instant;
 *     nothing is created after the file is first made (SWMR forbids it):
 *     frames only extend chunked datasets.
 *  2. A frame's candidates, cutouts, PSFs and header are written and flushed
 *     before its /frames row (status COMMITTED) is written and flushed. A
 *     reader trusts candidate rows only inside the range of a committed
 *     frame row.
 *  3. Only one writer at a time, checked with an open-file-description lock
 *     on the archive itself (released by the kernel when the process dies):
 *     when the lock is free but HDF5's "open for writing" flag is set, the
 *     previous writer died and the flag is cleared (h5.c).
 *  4. Metadata writes go through a one-record redo journal (h5.c), so a
 *     metadata block torn by the death of the writer is written again.
 *  5. No compressed chunk holding committed data is ever rewritten (HDF5
 *     rewrites a compressed chunk in place when its size is unchanged):
 *     tables are uncompressed, compressed stacks have one chunk per row.
 */
#define _GNU_SOURCE /* F_OFD_SETLK: open-file-description locks (Linux >= 3.15) */

#include "hilal/archive.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "associate.h"
#include "h5.h"
#include "hilal/checksum.h"
#include "hilal/fft.h"
#include "hilal/log.h"
#include "hilal/stats.h"
#include "hilal/version.h"
#include "hilal/wcs.h"
#include "parallel.h"

#define FORMAT_NAME "Hilal candidate archive"

/* Byte locked by the writer: far beyond any real file size, so the lock can
 * never be confused with a lock on data. */
#define WRITER_LOCK_OFFSET ((off_t)1 << 62)

static const char *const plane_names[HILAL_ARCHIVE_NFLOAT_PLANES] = {
    "science", "reference", "difference", "scorr", "variance"};
static const char *const plane_units[HILAL_ARCHIVE_NFLOAT_PLANES] = {
    "adu", "adu", "", "", "adu2"};
static const char *const plane_help[HILAL_ARCHIVE_NFLOAT_PLANES] = {
    "science pixels (ADU as read, background included), NaN outside the frame",
    "reference resampled onto the science grid (reference ADU, background included)",
    "ZOGY proper difference image D (Zackay, Ofek & Gal-Yam 2016, eq. 13), unit variance",
    "corrected score S_corr (ibid., eq. 25), sigma",
    "science variance, ADU^2"};
static const char *const psf_names[3] = {"science", "reference", "difference"};

/* ------------------------------------------------------------------------
 * Column tables: the single description of each table (HDF5 types, astropy
 * metadata, CSV/JSON/FITS output and docs/archive.md follow it).
 * ------------------------------------------------------------------------ */

#define C_(st, f, t, unit, help) {#f, HILAL_ARCHIVE_COL_##t, offsetof(st, f), sizeof(((st *)0)->f), unit, help}
#define CC(f, t, unit, help) C_(hilal_archive_cand, f, t, unit, help)
#define FC(f, t, unit, help) C_(hilal_archive_frame, f, t, unit, help)
#define RC(f, t, unit, help) C_(hilal_archive_run, f, t, unit, help)
#define OC(f, t, unit, help) C_(hilal_archive_object, f, t, unit, help)

static const hilal_archive_column cand_columns[] = {
    CC(cand_id, I64, "", "unique id: 1-based row number in /candidates and /cutouts"),
    CC(frame_id, I64, "", "frame id (from the science file SHA-256 and HDU), see /frames"),
    CC(x, F64, "pix", "x position, FITS 1-based science-frame pixels"),
    CC(y, F64, "pix", "y position, FITS 1-based science-frame pixels"),
    CC(ra, F64, "deg", "right ascension (NaN without WCS)"),
    CC(dec, F64, "deg", "declination (NaN without WCS)"),
    CC(snr, F64, "", "signed S_corr peak in sigma: positive brightening, negative fading"),
    CC(flux, F64, "adu", "signed PSF flux of the transient, science ADU"),
    CC(flux_err, F64, "adu", "1-sigma error of flux, science ADU"),
    CC(mag, F64, "mag", "magnitude of |flux| with the frame zero point (NaN without)"),
    CC(mag_err, F64, "mag", "1-sigma error of mag"),
    CC(fwhm, F64, "pix", "FWHM on the difference image"),
    CC(elongation, F64, "", "a/b on the difference image"),
    CC(rb, F64, "", "real/bogus score in [0, 1], 1 = real (docs/vetting.md)"),
    CC(flags, U32, "", "candidate flag bits (docs/archive.md)"),
    CC(mjd, F64, "d", "MJD of the science exposure"),
    CC(sharpness, F64, "", "peak-to-PSF-fit ratio (~1 point source, >>1 cosmic ray)"),
    CC(neg_frac, F64, "", "fraction of negative-signed pixels in the footprint"),
    CC(dipole, F64, "", "dipole measure of the residual"),
    CC(dist_sat_px, F64, "pix", "distance to the nearest saturated pixel"),
    CC(dist_mask_px, F64, "pix", "distance to the nearest masked pixel"),
    CC(masked_frac, F64, "", "masked fraction of the footprint"),
    CC(run_id, I32, "", "run (configuration) that produced the row, see /runs"),
    CC(frame_row, I64, "", "0-based row of the frame in /frames"),
    CC(stamp_x0, I32, "pix", "FITS 1-based science x of the first stamp column"),
    CC(stamp_y0, I32, "pix", "FITS 1-based science y of the first stamp row"),
    CC(valid, U8, "", "1 = current (frame committed and not superseded)"),
    /* Schema 2 */
    CC(object_id, I64, "", "object (/objects) the candidate was associated with; 0: none"),
    CC(prev_cand_id, I64, "", "previous detection of the object (cand_id), 0 for the first"),
    CC(pos_err_arcsec, F64, "arcsec", "1-sigma position error: FWHM / 2.3548 / |snr| x pixel scale"),
};
/* Columns of /candidates in a schema-1 archive: all up to `valid`. */
#define NCAND_COLS_V1 27

static const hilal_archive_column object_columns[] = {
    OC(object_id, I64, "", "object id: 1-based row number in /objects"),
    OC(ra, F64, "deg", "inverse-variance weighted mean right ascension"),
    OC(dec, F64, "deg", "inverse-variance weighted mean declination"),
    OC(pos_err_arcsec, F64, "arcsec", "1-sigma error of the mean position"),
    OC(ndet, I32, "", "detections (candidates of current frames)"),
    OC(npos, I32, "", "brightening detections (snr > 0)"),
    OC(nneg, I32, "", "fading detections (snr < 0)"),
    OC(first_mjd, F64, "d", "MJD of the first detection"),
    OC(last_mjd, F64, "d", "MJD of the last detection"),
    OC(first_cand_id, I64, "", "cand_id of the first detection"),
    OC(last_cand_id, I64, "", "cand_id of the last detection (head of the prev_cand_id chain)"),
    OC(sum_w, F64, "arcsec-2", "sum of the weights 1/pos_err^2"),
    OC(sum_wx, F64, "arcsec-2", "weighted sum of the unit vectors, x"),
    OC(sum_wy, F64, "arcsec-2", "weighted sum of the unit vectors, y"),
    OC(sum_wz, F64, "arcsec-2", "weighted sum of the unit vectors, z"),
};

static const hilal_archive_column frame_columns[] = {
    FC(frame_id, I64, "", "frame id: int(sha256(f'{sha256}:{hdu}').hexdigest()[:15], 16)"),
    FC(frame_name, STR, "", "frame name used in messages"),
    FC(path, STR, "", "science file as given"),
    FC(hdu, I32, "", "1-based HDU of the science image"),
    FC(sha256, STR, "", "SHA-256 of the science file"),
    FC(ref_path, STR, "", "reference file"),
    FC(ref_hdu, I32, "", "1-based HDU of the reference image"),
    FC(ref_sha256, STR, "", "SHA-256 of the reference file"),
    FC(mjd, F64, "d", "MJD of the science exposure"),
    FC(filter, STR, "", "filter"),
    FC(object, STR, "", "OBJECT/FIELD"),
    FC(exptime_s, F64, "s", "exposure time"),
    FC(nx, I32, "pix", "science image width"),
    FC(ny, I32, "pix", "science image height"),
    FC(run_id, I32, "", "run (configuration), see /runs"),
    FC(status, I32, "", "1 committed, 2 superseded, 3 failed (0: never committed)"),
    FC(valid, U8, "", "1 = current"),
    FC(n_candidates, I32, "", "number of candidates"),
    FC(first_cand_id, I64, "", "cand_id of the first candidate; the others follow"),
    FC(written_unix, F64, "s", "commit time, seconds since 1970-01-01 UTC"),
    FC(psf_fwhm_sci_px, F64, "pix", "science PSF FWHM"),
    FC(psf_fwhm_ref_px, F64, "pix", "reference PSF FWHM"),
    FC(psf_fwhm_diff_px, F64, "pix", "FWHM of P_D"),
    FC(psf_nstars_sci, I32, "", "stars in the science PSF (0: model)"),
    FC(psf_nstars_ref, I32, "", "stars in the reference PSF (0: model)"),
    FC(psf_size_sci, I32, "pix", "side of the science PSF before boxing into /psf"),
    FC(psf_size_ref, I32, "pix", "side of the reference PSF before boxing"),
    FC(psf_size_diff, I32, "pix", "side of P_D before boxing"),
    FC(flux_ratio, F64, "", "science/reference flux ratio (ZOGY F_n with F_r = 1)"),
    FC(flux_ratio_err, F64, "", "1-sigma error of flux_ratio"),
    FC(flux_ratio_nstars, I32, "", "stars used for flux_ratio"),
    FC(reg_rms_x_px, F64, "pix", "registration RMS in x"),
    FC(reg_rms_y_px, F64, "pix", "registration RMS in y"),
    FC(sky_sci_adu, F64, "adu", "median science background"),
    FC(sky_rms_sci_adu, F64, "adu", "science background RMS"),
    FC(sky_ref_adu, F64, "adu", "median reference background"),
    FC(sky_rms_ref_adu, F64, "adu", "reference background RMS"),
    FC(scorr_mean, F64, "", "mean of S_corr on source-free pixels"),
    FC(scorr_std, F64, "", "standard deviation of S_corr on source-free pixels"),
    FC(f_d, F64, "", "ZOGY flux normalisation F_D of D (eq. 15)"),
    FC(limflux5_adu, F64, "adu", "5-sigma limiting flux: 5 x median point-source flux error"),
    FC(limmag5, F64, "mag", "5-sigma limiting magnitude (NaN without zero point)"),
    FC(zeropoint_mag, F64, "mag", "photometric zero point (mag for 1 ADU)"),
    FC(gain_e_per_adu, F64, "", "detector gain, e-/ADU"),
    FC(header_offset, I64, "", "science header cards (80 chars each) in /text: offset"),
    FC(header_length, I64, "", "science header length in /text, bytes"),
    FC(message, STR, "", "why the frame failed (status 3)"),
};

static const hilal_archive_column run_columns[] = {
    RC(run_id, I32, "", "run id: one per configuration hash and software version"),
    RC(config_hash, STR, "", "SHA-256 of the canonical effective configuration"),
    RC(software_version, STR, "", "hilal version"),
    RC(library_versions, STR, "", "versions of CFITSIO, FFTW, HDF5, wcslib, SEP"),
    RC(created_utc, STR, "", "first use of the run"),
    RC(config_offset, I64, "", "effective configuration text in /text: offset"),
    RC(config_length, I64, "", "effective configuration text length, bytes"),
};

#define NCOLS(a) (sizeof(a) / sizeof((a)[0]))

const hilal_archive_column *hilal_archive_columns(const char *table, size_t *n)
{
    if (strcmp(table, "candidates") == 0) {
        *n = NCOLS(cand_columns);
        return cand_columns;
    }
    if (strcmp(table, "frames") == 0) {
        *n = NCOLS(frame_columns);
        return frame_columns;
    }
    if (strcmp(table, "runs") == 0) {
        *n = NCOLS(run_columns);
        return run_columns;
    }
    if (strcmp(table, "objects") == 0) {
        *n = NCOLS(object_columns);
        return object_columns;
    }
    *n = 0;
    return NULL;
}

/* ------------------------------------------------------------------------
 * The handle
 * ------------------------------------------------------------------------ */

struct hilal_archive {
    char path[4096];
    int writable;
    int recovered;
    int lock_fd;                 /* writer: holds the writer lock */
    pthread_mutex_t mutex;

    hid_t fid;
    hid_t d_cand, d_frames, d_runs, d_text;
    hid_t d_cut[HILAL_ARCHIVE_NFLOAT_PLANES], d_mask;
    hid_t d_psf[3];
    hid_t d_objects, d_objects_applied; /* schema 2 */
    hid_t t_cand, t_frame, t_run, t_object; /* memory types of the row structs */
    hid_t t_valid, t_status;          /* memory types of partial rows */

    int schema_version, cutout_size, psf_size;
    char created_utc[32], created_by[64];
    hilal_archive_options opt;

    /* Writer state: every /frames and /runs row, and where the next
     * candidate and text bytes go. */
    hilal_archive_frame *frames;
    size_t nframes, frames_cap;
    hilal_archive_run *runs;
    size_t nruns;
    int64_t cand_end, text_end;

    /* Writer state of the objects (schema 2): the catalogue, whether it
     * must be rebuilt from /candidates before the next frame (a frame
     * failed half-way), and the objects a frame touched. */
    hilal_assoc *assoc;
    int assoc_dirty;
    int64_t *touched;
    size_t ntouched, touched_cap;
    size_t objects_stored;       /* rows in /objects */
};

/* Partial rows used to flip validity without rewriting whole rows. */
typedef struct valid_row { uint8_t valid; } valid_row;
typedef struct status_row { int32_t status; uint8_t valid; } status_row;

void hilal_archive_options_init(hilal_archive_options *opt)
{
    opt->cutout_size = 63;
    opt->psf_size = 51;
    opt->compress_level = 1;
    opt->cutout_compress_level = 0;
    opt->fsync = 0;
    opt->assoc_radius_arcsec = 1.0;
}

void hilal_archive_filter_init(hilal_archive_filter *q)
{
    memset(q, 0, sizeof *q);
    q->mjd_min = q->mjd_max = NAN;
    q->snr_min = NAN;
    q->rb_min = NAN;
}

static void utc_now(char *buf, size_t len)
{
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static double unix_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------
 * HDF5 types from the column tables
 * ------------------------------------------------------------------------ */

/* Memory type (native, at the struct offsets) or file type (little-endian
 * standard types, packed, strings without their NUL). */
static hid_t make_type(const hilal_archive_column *cols, size_t ncols, size_t struct_size,
                       int file)
{
    hid_t t = H5Tcreate(H5T_COMPOUND, struct_size);
    if (t < 0)
        return H5I_INVALID_HID;
    for (size_t i = 0; i < ncols; i++) {
        hid_t m = H5I_INVALID_HID;
        int owned = 0;
        switch (cols[i].type) {
        case HILAL_ARCHIVE_COL_I64: m = file ? H5T_STD_I64LE : H5T_NATIVE_INT64; break;
        case HILAL_ARCHIVE_COL_I32: m = file ? H5T_STD_I32LE : H5T_NATIVE_INT32; break;
        case HILAL_ARCHIVE_COL_U32: m = file ? H5T_STD_U32LE : H5T_NATIVE_UINT32; break;
        case HILAL_ARCHIVE_COL_U8: m = file ? H5T_STD_U8LE : H5T_NATIVE_UINT8; break;
        case HILAL_ARCHIVE_COL_F64: m = file ? H5T_IEEE_F64LE : H5T_NATIVE_DOUBLE; break;
        case HILAL_ARCHIVE_COL_STR:
            m = H5Tcopy(H5T_C_S1);
            owned = 1;
            if (m < 0 || H5Tset_size(m, file ? cols[i].size - 1 : cols[i].size) < 0 ||
                H5Tset_strpad(m, file ? H5T_STR_NULLPAD : H5T_STR_NULLTERM) < 0) {
                if (m >= 0)
                    H5Tclose(m);
                m = H5I_INVALID_HID;
            }
            break;
        }
        herr_t e = m < 0 ? -1 : H5Tinsert(t, cols[i].name, cols[i].offset, m);
        if (owned && m >= 0)
            H5Tclose(m);
        if (e < 0) {
            H5Tclose(t);
            return H5I_INVALID_HID;
        }
    }
    if (file && H5Tpack(t) < 0) {
        H5Tclose(t);
        return H5I_INVALID_HID;
    }
    return t;
}

static const char *astropy_type(hilal_archive_col_type t)
{
    switch (t) {
    case HILAL_ARCHIVE_COL_I64: return "int64";
    case HILAL_ARCHIVE_COL_I32: return "int32";
    case HILAL_ARCHIVE_COL_U32: return "uint32";
    case HILAL_ARCHIVE_COL_U8: return "uint8";
    case HILAL_ARCHIVE_COL_F64: return "float64";
    case HILAL_ARCHIVE_COL_STR: return "string";
    }
    return "?";
}

static hilal_status make_mem_types(hilal_archive *ar, hilal_error *err)
{
    size_t ncand_cols = ar->schema_version >= 2 ? NCOLS(cand_columns) : NCAND_COLS_V1;
    ar->t_cand = make_type(cand_columns, ncand_cols, sizeof(hilal_archive_cand), 0);
    ar->t_object = make_type(object_columns, NCOLS(object_columns), sizeof(hilal_archive_object), 0);
    ar->t_frame = make_type(frame_columns, NCOLS(frame_columns), sizeof(hilal_archive_frame), 0);
    ar->t_run = make_type(run_columns, NCOLS(run_columns), sizeof(hilal_archive_run), 0);
    ar->t_valid = H5Tcreate(H5T_COMPOUND, sizeof(valid_row));
    ar->t_status = H5Tcreate(H5T_COMPOUND, sizeof(status_row));
    if (ar->t_cand < 0 || ar->t_frame < 0 || ar->t_run < 0 || ar->t_object < 0 || ar->t_valid < 0 ||
        ar->t_status < 0 ||
        H5Tinsert(ar->t_valid, "valid", offsetof(valid_row, valid), H5T_NATIVE_UINT8) < 0 ||
        H5Tinsert(ar->t_status, "status", offsetof(status_row, status), H5T_NATIVE_INT32) < 0 ||
        H5Tinsert(ar->t_status, "valid", offsetof(status_row, valid), H5T_NATIVE_UINT8) < 0)
        return hilal_h5_error(err, "cannot build the archive's row types");
    return HILAL_OK;
}

/* ------------------------------------------------------------------------
 * Creation
 * ------------------------------------------------------------------------ */

/* A dataset extended along its first dimension: rank 1 (rows) or 3 (rows of
 * side x side stamps). level > 0 adds shuffle + deflate. fill may be NULL. */
static hilal_status create_rows_dataset(hid_t loc, const char *name, hid_t type, int rank,
                                        hsize_t side, hsize_t chunk_rows, int level,
                                        const void *fill, const char *description,
                                        const char *unit, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hsize_t dims[3] = {0, side, side}, maxdims[3] = {H5S_UNLIMITED, side, side};
    hsize_t chunk[3] = {chunk_rows, side, side};
    hid_t space = H5Screate_simple(rank, dims, maxdims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE), dset = H5I_INVALID_HID;
    if (space < 0 || dcpl < 0 || H5Pset_chunk(dcpl, rank, chunk) < 0 ||
        (fill != NULL && H5Pset_fill_value(dcpl, type, fill) < 0) ||
        /* Rows are always written whole before anyone may read them, so
         * chunks need not be pre-filled: full chunks then go straight to
         * the file instead of through the chunk cache. Chunks never
         * allocated still read as the fill value. */
        (rank == 3 && H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) < 0) ||
        (level > 0 && (H5Pset_shuffle(dcpl) < 0 || H5Pset_deflate(dcpl, (unsigned)level) < 0))) {
        st = hilal_h5_error(err, "cannot set up dataset %s", name);
        goto cleanup;
    }
    dset = H5Dcreate2(loc, name, type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (dset < 0) {
        st = hilal_h5_error(err, "cannot create dataset %s", name);
        goto cleanup;
    }
    if (description != NULL)
        st = hilal_h5_attr_write_string(dset, "description", description, err);
    if (st == HILAL_OK && unit != NULL && unit[0] != '\0')
        st = hilal_h5_attr_write_string(dset, "unit", unit, err);
cleanup:
    if (dset >= 0)
        H5Dclose(dset);
    if (dcpl >= 0)
        H5Pclose(dcpl);
    if (space >= 0)
        H5Sclose(space);
    return st;
}

static hilal_status create_table(hid_t fid, const char *name, const hilal_archive_column *cols,
                                 size_t ncols, size_t struct_size, hsize_t chunk_rows, int level,
                                 const char *description, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_h5_colmeta *meta = calloc(ncols, sizeof *meta);
    hid_t ftype = make_type(cols, ncols, struct_size, 1);
    char schema[16];
    snprintf(schema, sizeof schema, "%d", HILAL_ARCHIVE_SCHEMA_VERSION);
    const char *kv[] = {"format", FORMAT_NAME, "schema_version", schema, "table", name,
                        "description", description};
    if (meta == NULL || ftype < 0) {
        st = meta == NULL ? hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory")
                          : hilal_h5_error(err, "cannot build the file type of %s", name);
        goto cleanup;
    }
    st = create_rows_dataset(fid, name, ftype, 1, 0, chunk_rows, level, NULL, description, NULL, err);
    if (st != HILAL_OK)
        goto cleanup;
    for (size_t i = 0; i < ncols; i++)
        meta[i] = (hilal_h5_colmeta){cols[i].name, astropy_type(cols[i].type), cols[i].unit,
                                     cols[i].description};
    st = hilal_h5_write_astropy_meta(fid, name, meta, ncols, kv, 4, err);
cleanup:
    if (ftype >= 0)
        H5Tclose(ftype);
    free(meta);
    return st;
}

/* Rows per chunk of a stack of side x side float32 images: about 256 KiB. */
static hsize_t stack_chunk_rows(int side)
{
    hsize_t per = (hsize_t)side * (hsize_t)side * 4;
    hsize_t rows = ((hsize_t)256 << 10) / per;
    return rows < 1 ? 1 : rows;
}

/* Builds a complete, empty archive in a new file. */
static hilal_status create_contents(hid_t fid, const hilal_archive_options *opt,
                                    hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t g_cut = H5I_INVALID_HID, g_psf = H5I_INVALID_HID;
    char now[32];
    float nanf_fill = NAN;
    uint16_t mask_fill = HILAL_MASK_NODATA;
    int level = opt->compress_level;
    utc_now(now, sizeof now);

    st = hilal_h5_attr_write_int(fid, "hilal_archive_schema", HILAL_ARCHIVE_SCHEMA_VERSION, err);
    if (st == HILAL_OK)
        st = hilal_h5_attr_write_string(fid, "format", FORMAT_NAME " (see docs/archive.md)", err);
    if (st == HILAL_OK)
        st = hilal_h5_attr_write_string(fid, "created_utc", now, err);
    if (st == HILAL_OK)
        st = hilal_h5_attr_write_string(fid, "created_by", hilal_version(), err);
    if (st == HILAL_OK)
        st = hilal_h5_attr_write_string(fid, "library_versions", hilal_library_versions(), err);
    if (st == HILAL_OK)
        st = hilal_h5_attr_write_int(fid, "cutout_size", opt->cutout_size, err);
    if (st == HILAL_OK)
        st = hilal_h5_attr_write_int(fid, "psf_size", opt->psf_size, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* Crash safety decides the storage of each dataset. HDF5 1.10 rewrites a
     * compressed chunk in place when its new compressed size equals the old
     * one, so a writer killed during such a rewrite destroys the whole
     * chunk. Hence:
     *  - the tables and /text, whose chunks are extended by later frames
     *    and whose valid/status columns are updated in place, are not
     *    compressed: their chunks are rewritten byte for byte, committed
     *    rows with the same bytes;
     *  - compressed stacks (mask stamps, PSFs, float stamps when
     *    cutout_compress > 0) have one chunk per row, written once. */
    st = create_table(fid, "candidates", cand_columns, NCOLS(cand_columns),
                      sizeof(hilal_archive_cand), 256, 0,
                      "one row per candidate; current rows have valid = 1", err);
    if (st == HILAL_OK)
        st = create_table(fid, "frames", frame_columns, NCOLS(frame_columns),
                          sizeof(hilal_archive_frame), 16, 0,
                          "one row per processed frame and run; per-frame records", err);
    if (st == HILAL_OK)
        st = create_table(fid, "runs", run_columns, NCOLS(run_columns), sizeof(hilal_archive_run),
                          16, 0, "one row per configuration and software version", err);
    if (st == HILAL_OK)
        st = create_table(fid, "objects", object_columns, NCOLS(object_columns),
                          sizeof(hilal_archive_object), 256, 0,
                          "one row per object: candidates associated across frames (updated in place)",
                          err);
    if (st == HILAL_OK)
        st = create_rows_dataset(fid, "objects_applied", H5T_STD_I64LE, 1, 0, 1, 0, NULL,
                                 "one value: the number of /frames rows whose candidates /objects "
                                 "reflects (a writer rebuilds /objects when it differs)", NULL, err);
    if (st == HILAL_OK)
        st = create_rows_dataset(fid, "text", H5T_STD_U8LE, 1, 0, 65536, 0, NULL,
                                 "UTF-8 text referenced by offset/length from /runs and /frames",
                                 NULL, err);
    if (st != HILAL_OK)
        goto cleanup;

    g_cut = H5Gcreate2(fid, "cutouts", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    g_psf = H5Gcreate2(fid, "psf", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (g_cut < 0 || g_psf < 0) {
        st = hilal_h5_error(err, "cannot create the cutouts and psf groups");
        goto cleanup;
    }
    int clevel = opt->cutout_compress_level;
    hsize_t crow = clevel > 0 ? 1 : stack_chunk_rows(opt->cutout_size);
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES && st == HILAL_OK; p++)
        st = create_rows_dataset(g_cut, plane_names[p], H5T_IEEE_F32LE, 3,
                                 (hsize_t)opt->cutout_size, crow, clevel, &nanf_fill,
                                 plane_help[p], plane_units[p], err);
    if (st == HILAL_OK)
        st = create_rows_dataset(g_cut, "mask", H5T_STD_U16LE, 3, (hsize_t)opt->cutout_size,
                                 level > 0 ? 1 : stack_chunk_rows(opt->cutout_size), level,
                                 &mask_fill, "mask bits (hilal_mask_bit; docs/archive.md)", NULL, err);
    for (int p = 0; p < 3 && st == HILAL_OK; p++)
        st = create_rows_dataset(g_psf, psf_names[p], H5T_IEEE_F32LE, 3, (hsize_t)opt->psf_size, 1,
                                 level, &nanf_fill,
                                 p == 2 ? "PSF of the difference image P_D (ZOGY eq. 14), sum 1, row-aligned with /frames"
                                        : "PSF (sum 1, centred on the central pixel), row-aligned with /frames",
                                 NULL, err);
cleanup:
    if (g_cut >= 0)
        H5Gclose(g_cut);
    if (g_psf >= 0)
        H5Gclose(g_psf);
    return st;
}

/* Creates an archive at path unless one exists: built under a temporary
 * name in the same directory and hard-linked into place, so that a reader
 * or a crash never sees a half-made archive and two processes creating the
 * same archive at once do not replace each other's. */
static hilal_status create_archive(const char *path, const hilal_archive_options *opt,
                                   hilal_error *err)
{
    hilal_status st;
    static unsigned counter;
    char tmp[4200];
    hid_t fid = H5I_INVALID_HID;
    snprintf(tmp, sizeof tmp, "%s.creating.%ld.%u", path, (long)getpid(),
             __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED));
    st = hilal_h5_create(tmp, &fid, err);
    if (st != HILAL_OK)
        return st;
    st = create_contents(fid, opt, err);
    if (H5Fclose(fid) < 0 && st == HILAL_OK)
        st = hilal_h5_error(err, "cannot close the new archive %s", tmp);
    if (st == HILAL_OK && link(tmp, path) != 0 && errno != EEXIST) {
        /* File systems without hard links: fall back to rename. */
        if (rename(tmp, path) != 0)
            st = hilal_error_set(err, HILAL_ERR_IO, "cannot move the new archive into place at %s: %s",
                                 path, strerror(errno));
    }
    unlink(tmp);
    return st;
}

/* ------------------------------------------------------------------------
 * Opening
 * ------------------------------------------------------------------------ */

static hilal_archive *handle_new(const char *path)
{
    hilal_archive *ar = calloc(1, sizeof *ar);
    if (ar == NULL)
        return NULL;
    snprintf(ar->path, sizeof ar->path, "%s", path);
    ar->lock_fd = -1;
    ar->fid = ar->d_cand = ar->d_frames = ar->d_runs = ar->d_text = ar->d_mask = H5I_INVALID_HID;
    ar->d_objects = ar->d_objects_applied = H5I_INVALID_HID;
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES; p++)
        ar->d_cut[p] = H5I_INVALID_HID;
    for (int p = 0; p < 3; p++)
        ar->d_psf[p] = H5I_INVALID_HID;
    ar->t_cand = ar->t_frame = ar->t_run = ar->t_object = ar->t_valid = ar->t_status = H5I_INVALID_HID;
    pthread_mutex_init(&ar->mutex, NULL);
    hilal_archive_options_init(&ar->opt);
    return ar;
}

static void handle_close_hdf5(hilal_archive *ar)
{
    hid_t *ids[] = {&ar->d_cand, &ar->d_frames, &ar->d_runs, &ar->d_text, &ar->d_mask,
                    &ar->d_cut[0], &ar->d_cut[1], &ar->d_cut[2], &ar->d_cut[3], &ar->d_cut[4],
                    &ar->d_psf[0], &ar->d_psf[1], &ar->d_psf[2], &ar->d_objects,
                    &ar->d_objects_applied};
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++)
        if (*ids[i] >= 0) {
            H5Dclose(*ids[i]);
            *ids[i] = H5I_INVALID_HID;
        }
    hid_t *types[] = {&ar->t_cand, &ar->t_frame, &ar->t_run, &ar->t_object, &ar->t_valid,
                      &ar->t_status};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (*types[i] >= 0) {
            H5Tclose(*types[i]);
            *types[i] = H5I_INVALID_HID;
        }
}

/* Reads the root attributes and checks this is an archive we understand. */
static hilal_status check_root(hilal_archive *ar, hilal_error *err)
{
    long long v = 0;
    hilal_error tmp = {0};
    if (hilal_h5_attr_read_int(ar->fid, "hilal_archive_schema", &v, &tmp) != HILAL_OK)
        return hilal_error_set(err, HILAL_ERR_FORMAT,
                               "%s is an HDF5 file but not a Hilal archive (no hilal_archive_schema "
                               "attribute); give another file name", ar->path);
    if (v < 1 || v > HILAL_ARCHIVE_SCHEMA_VERSION)
        return hilal_error_set(err, HILAL_ERR_FORMAT,
                               "%s has archive schema version %lld but this hilal (%s) understands "
                               "versions 1 to %d; use a newer hilal", ar->path, v, hilal_version(),
                               HILAL_ARCHIVE_SCHEMA_VERSION);
    ar->schema_version = (int)v;
    hilal_status st = hilal_h5_attr_read_int(ar->fid, "cutout_size", &v, err);
    if (st != HILAL_OK)
        return st;
    ar->cutout_size = (int)v;
    st = hilal_h5_attr_read_int(ar->fid, "psf_size", &v, err);
    if (st != HILAL_OK)
        return st;
    ar->psf_size = (int)v;
    if (ar->cutout_size < 1 || ar->cutout_size > 4095 || ar->psf_size < 1 || ar->psf_size > 4095)
        return hilal_error_set(err, HILAL_ERR_FORMAT, "%s: implausible cutout_size %d or psf_size %d",
                               ar->path, ar->cutout_size, ar->psf_size);
    hilal_h5_attr_read_string(ar->fid, "created_utc", ar->created_utc, sizeof ar->created_utc, &tmp);
    hilal_h5_attr_read_string(ar->fid, "created_by", ar->created_by, sizeof ar->created_by, &tmp);
    return HILAL_OK;
}

static hilal_status open_datasets(hilal_archive *ar, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char name[64];
    /* A chunk cache holding a few stamp chunks, so that the partly filled
     * chunk at the end of a frame's rows is not re-read for the next one. */
    hid_t dapl = H5Pcreate(H5P_DATASET_ACCESS);
    size_t chunk_bytes = (size_t)stack_chunk_rows(ar->cutout_size) * (size_t)ar->cutout_size *
                         (size_t)ar->cutout_size * 4;
    if (dapl < 0 || H5Pset_chunk_cache(dapl, 101, 4 * chunk_bytes, 1.0) < 0) {
        st = hilal_h5_error(err, "cannot make a dataset-access property list");
        goto cleanup;
    }
    ar->d_cand = H5Dopen2(ar->fid, "candidates", H5P_DEFAULT);
    ar->d_frames = H5Dopen2(ar->fid, "frames", H5P_DEFAULT);
    ar->d_runs = H5Dopen2(ar->fid, "runs", H5P_DEFAULT);
    ar->d_text = H5Dopen2(ar->fid, "text", H5P_DEFAULT);
    ar->d_mask = H5Dopen2(ar->fid, "cutouts/mask", dapl);
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES; p++) {
        snprintf(name, sizeof name, "cutouts/%s", plane_names[p]);
        ar->d_cut[p] = H5Dopen2(ar->fid, name, dapl);
        if (ar->d_cut[p] < 0)
            break;
    }
    for (int p = 0; p < 3; p++) {
        snprintf(name, sizeof name, "psf/%s", psf_names[p]);
        ar->d_psf[p] = H5Dopen2(ar->fid, name, H5P_DEFAULT);
    }
    if (ar->d_cand < 0 || ar->d_frames < 0 || ar->d_runs < 0 || ar->d_text < 0 || ar->d_mask < 0 ||
        ar->d_cut[HILAL_ARCHIVE_NFLOAT_PLANES - 1] < 0 || ar->d_psf[0] < 0 || ar->d_psf[1] < 0 ||
        ar->d_psf[2] < 0) {
        st = hilal_h5_fail(err, HILAL_ERR_FORMAT, "%s lacks datasets of a Hilal archive", ar->path);
        goto cleanup;
    }
    if (ar->schema_version >= 2) {
        ar->d_objects = H5Dopen2(ar->fid, "objects", H5P_DEFAULT);
        ar->d_objects_applied = H5Dopen2(ar->fid, "objects_applied", H5P_DEFAULT);
        if (ar->d_objects < 0 || ar->d_objects_applied < 0) {
            st = hilal_h5_fail(err, HILAL_ERR_FORMAT, "%s (schema %d) lacks /objects", ar->path,
                               ar->schema_version);
            goto cleanup;
        }
    }
    st = make_mem_types(ar, err);
cleanup:
    if (dapl >= 0)
        H5Pclose(dapl);
    return st;
}

/* Is this an HDF5 file at all? */
static hilal_status check_hdf5(const char *path, hilal_error *err)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        return hilal_error_set(err, errno == ENOENT ? HILAL_ERR_NOTFOUND : HILAL_ERR_IO,
                               "cannot open archive %s: %s", path, strerror(errno));
    htri_t is = H5Fis_hdf5(path);
    if (is < 0)
        return hilal_h5_fail(err, HILAL_ERR_IO, "cannot read %s", path);
    if (is == 0)
        return hilal_error_set(err, HILAL_ERR_FORMAT, "%s is not an HDF5 file (not a Hilal archive)", path);
    return HILAL_OK;
}

/* The writer lock: an open-file-description write lock on one byte of the
 * archive far past its end. The kernel releases it when the process exits
 * or is killed; HDF5's own flock() locks are independent of it. */
static hilal_status take_writer_lock(hilal_archive *ar, hilal_error *err)
{
    struct flock fl;
    ar->lock_fd = open(ar->path, O_RDWR | O_CLOEXEC);
    if (ar->lock_fd < 0)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot open %s for writing: %s", ar->path,
                               strerror(errno));
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = WRITER_LOCK_OFFSET;
    fl.l_len = 1;
    if (fcntl(ar->lock_fd, F_OFD_SETLK, &fl) != 0) {
        if (errno == EAGAIN || errno == EACCES)
            return hilal_error_set(err, HILAL_ERR_IO,
                                   "archive %s is being written by another process; wait for it "
                                   "to finish or write to another archive", ar->path);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot lock %s for writing: %s", ar->path,
                               strerror(errno));
    }
    return HILAL_OK;
}

/* Whether some process holds the writer lock (for readers). */
static int writer_active(const char *path)
{
    struct flock fl;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = WRITER_LOCK_OFFSET;
    fl.l_len = 1;
    int active = fcntl(fd, F_OFD_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
    close(fd);
    return active;
}

/* Marks which frame rows are current: status COMMITTED and no later
 * COMMITTED row for the same (frame_id, run_id). */
typedef struct key_index { int64_t frame_id; int32_t run_id; size_t row; } key_index;

static int key_cmp(const void *a, const void *b)
{
    const key_index *x = a, *y = b;
    if (x->frame_id != y->frame_id)
        return x->frame_id < y->frame_id ? -1 : 1;
    if (x->run_id != y->run_id)
        return x->run_id < y->run_id ? -1 : 1;
    return x->row < y->row ? -1 : (x->row > y->row);
}

static hilal_status compute_current(const hilal_archive_frame *rows, size_t n,
                                    unsigned char *cur, hilal_error *err)
{
    size_t m = 0;
    key_index *idx = malloc((n > 0 ? n : 1) * sizeof *idx);
    if (idx == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    memset(cur, 0, n);
    for (size_t i = 0; i < n; i++)
        if (rows[i].status == HILAL_ARCHIVE_FRAME_COMMITTED)
            idx[m++] = (key_index){rows[i].frame_id, rows[i].run_id, i};
    qsort(idx, m, sizeof *idx, key_cmp);
    /* Within a key the rows are in row order: the last one wins. */
    for (size_t i = 0; i < m; i++)
        if (i + 1 == m || idx[i + 1].frame_id != idx[i].frame_id || idx[i + 1].run_id != idx[i].run_id)
            cur[idx[i].row] = 1;
    free(idx);
    return HILAL_OK;
}

static hilal_status flush(hilal_archive *ar, hilal_error *err)
{
    if (H5Fflush(ar->fid, H5F_SCOPE_GLOBAL) < 0)
        return hilal_h5_error(err, "cannot flush %s", ar->path);
    if (ar->opt.fsync && fsync(ar->lock_fd) != 0)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot fsync %s: %s", ar->path, strerror(errno));
    return HILAL_OK;
}

static hilal_status write_valid_range(hilal_archive *ar, int64_t start, int64_t n, uint8_t value,
                                      hilal_error *err)
{
    if (n <= 0)
        return HILAL_OK;
    valid_row *v = malloc((size_t)n * sizeof *v);
    if (v == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < n; i++)
        v[i].valid = value;
    hilal_status st = hilal_h5_write_rows(ar->d_cand, ar->t_valid, (hsize_t)start, (hsize_t)n, v, err);
    free(v);
    return st;
}

static hilal_status write_frame_status(hilal_archive *ar, size_t row, int32_t status,
                                       hilal_error *err)
{
    status_row s = {status, status == HILAL_ARCHIVE_FRAME_COMMITTED};
    hilal_status st = hilal_h5_write_rows(ar->d_frames, ar->t_status, row, 1, &s, err);
    if (st == HILAL_OK) {
        ar->frames[row].status = s.status;
        ar->frames[row].valid = s.valid;
    }
    return st;
}

/* ------------------------------------------------------------------------
 * Objects (schema 2): the writer keeps the catalogue in memory (associate.c)
 * and mirrors the rows a frame touched into /objects after the frame's
 * commit; /objects_applied says how many /frames rows /objects reflects.
 * Whenever that is not the number of frame rows (a writer died between a
 * commit and the object update) the next writer rebuilds /objects from the
 * committed candidates, whose object_id and prev_cand_id are written with
 * them before the commit.
 * ------------------------------------------------------------------------ */

/* Fields a schema-1 archive does not have. */
static void fix_v1_rows(const hilal_archive *ar, hilal_archive_cand *rows, size_t n)
{
    if (ar->schema_version >= 2)
        return;
    for (size_t i = 0; i < n; i++) {
        rows[i].object_id = 0;
        rows[i].prev_cand_id = 0;
        rows[i].pos_err_arcsec = NAN;
    }
}

static hilal_status touch_object(hilal_archive *ar, int64_t id, hilal_error *err)
{
    for (size_t i = 0; i < ar->ntouched; i++)
        if (ar->touched[i] == id)
            return HILAL_OK;
    if (ar->ntouched == ar->touched_cap) {
        size_t cap = ar->touched_cap * 2 + 64;
        int64_t *t = realloc(ar->touched, cap * sizeof *t);
        if (t == NULL)
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        ar->touched = t;
        ar->touched_cap = cap;
    }
    ar->touched[ar->ntouched++] = id;
    return HILAL_OK;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : (x > y);
}

static hilal_status write_objects_applied(hilal_archive *ar, int64_t value, hilal_error *err)
{
    return hilal_h5_write_rows(ar->d_objects_applied, H5T_NATIVE_INT64, 0, 1, &value, err);
}

/* Writes the touched objects' rows (runs of consecutive ids in one call). */
static hilal_status write_touched_objects(hilal_archive *ar, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    if (ar->ntouched > 1) /* qsort must not get a NULL array, even for no rows */
        qsort(ar->touched, ar->ntouched, sizeof *ar->touched, cmp_i64);
    hilal_archive_object *buf = NULL;
    size_t cap = 0;
    for (size_t i = 0; i < ar->ntouched && st == HILAL_OK;) {
        size_t j = i + 1;
        while (j < ar->ntouched && ar->touched[j] == ar->touched[j - 1] + 1)
            j++;
        if (j - i > cap) {
            free(buf);
            cap = j - i;
            buf = malloc(cap * sizeof *buf);
            if (buf == NULL) {
                st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
                break;
            }
        }
        for (size_t k = i; k < j; k++)
            buf[k - i] = *hilal_assoc_get(ar->assoc, ar->touched[k]);
        st = hilal_h5_write_rows(ar->d_objects, ar->t_object, (hsize_t)(ar->touched[i] - 1), j - i,
                                 buf, err);
        i = j;
    }
    free(buf);
    if (st == HILAL_OK && hilal_assoc_count(ar->assoc) > ar->objects_stored)
        ar->objects_stored = hilal_assoc_count(ar->assoc);
    return st;
}

/* A candidate row of the writer is current when its frame row is
 * COMMITTED (statuses are kept exact by the writer). */
static int writer_row_current(const hilal_archive *ar, const hilal_archive_cand *c)
{
    return c->frame_row >= 0 && (size_t)c->frame_row < ar->nframes &&
           ar->frames[c->frame_row].status == HILAL_ARCHIVE_FRAME_COMMITTED;
}

/* Rebuilds the catalogue and /objects from the committed candidates. */
static hilal_status rebuild_objects(hilal_archive *ar, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const size_t block = 16384;
    hilal_archive_cand *rows = malloc(block * sizeof *rows);
    hilal_archive_object *objs = NULL;
    size_t nobj = 0, cap = 0;
    hilal_assoc *assoc = hilal_assoc_new(ar->opt.assoc_radius_arcsec);
    if (rows == NULL || assoc == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    /* Candidates in cand_id order: detections accumulate in the order they
     * were first made, as they did when the frames were written. */
    for (int64_t s0 = 0; s0 < ar->cand_end && st == HILAL_OK; s0 += (int64_t)block) {
        size_t nb = (size_t)(ar->cand_end - s0) < block ? (size_t)(ar->cand_end - s0) : block;
        st = hilal_h5_read_rows(ar->d_cand, ar->t_cand, (hsize_t)s0, nb, rows, err);
        for (size_t i = 0; i < nb && st == HILAL_OK; i++) {
            const hilal_archive_cand *c = &rows[i];
            if (c->object_id <= 0)
                continue;
            if ((size_t)c->object_id > nobj) {
                if ((size_t)c->object_id > cap) {
                    size_t nc = (size_t)c->object_id * 2;
                    hilal_archive_object *p = realloc(objs, nc * sizeof *p);
                    if (p == NULL) {
                        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
                        break;
                    }
                    objs = p;
                    cap = nc;
                }
                for (size_t k = nobj; k < (size_t)c->object_id; k++) {
                    memset(&objs[k], 0, sizeof objs[k]);
                    objs[k].object_id = (int64_t)k + 1;
                    objs[k].ra = objs[k].dec = objs[k].pos_err_arcsec = NAN;
                    objs[k].first_mjd = objs[k].last_mjd = NAN;
                }
                nobj = (size_t)c->object_id;
            }
            if (writer_row_current(ar, c))
                hilal_assoc_accumulate(&objs[c->object_id - 1], c->ra, c->dec, c->pos_err_arcsec,
                                       c->snr, c->mjd, c->cand_id);
        }
    }
    for (size_t k = 0; k < nobj && st == HILAL_OK; k++)
        st = hilal_assoc_load(assoc, &objs[k], err);
    if (st == HILAL_OK && nobj > 0)
        st = hilal_h5_write_rows(ar->d_objects, ar->t_object, 0, nobj, objs, err);
    if (st == HILAL_OK)
        st = hilal_h5_set_nrows(ar->d_objects, nobj, err);
    if (st == HILAL_OK)
        st = write_objects_applied(ar, (int64_t)ar->nframes, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    if (st == HILAL_OK) {
        hilal_assoc_free(ar->assoc);
        ar->assoc = assoc;
        assoc = NULL;
        ar->objects_stored = nobj;
        ar->assoc_dirty = 0;
        hilal_log(HILAL_LOG_INFO, "archive %s: rebuilt %zu objects from the committed candidates",
                  ar->path, nobj);
    }
cleanup:
    hilal_assoc_free(assoc);
    free(rows);
    free(objs);
    if (st != HILAL_OK)
        hilal_error_context(err, "rebuilding /objects");
    return st;
}

/* Loads the catalogue from /objects, or rebuilds it when /objects does not
 * reflect exactly the committed frames. */
static hilal_status load_objects(hilal_archive *ar, hilal_error *err)
{
    hilal_status st;
    hsize_t nobj = 0, napplied = 0;
    int64_t applied = -1;
    hilal_archive_object *objs = NULL;
    int rebuild = 0;
    st = hilal_h5_nrows(ar->d_objects, 0, &nobj, err);
    if (st == HILAL_OK)
        st = hilal_h5_nrows(ar->d_objects_applied, 0, &napplied, err);
    if (st == HILAL_OK && napplied > 0)
        st = hilal_h5_read_rows(ar->d_objects_applied, H5T_NATIVE_INT64, 0, 1, &applied, err);
    if (st != HILAL_OK)
        return st;
    if (napplied == 0)
        applied = 0;
    rebuild = applied != (int64_t)ar->nframes;
    objs = malloc((nobj > 0 ? nobj : 1) * sizeof *objs);
    ar->assoc = hilal_assoc_new(ar->opt.assoc_radius_arcsec);
    if (objs == NULL || ar->assoc == NULL) {
        free(objs);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    }
    if (!rebuild)
        st = hilal_h5_read_rows(ar->d_objects, ar->t_object, 0, nobj, objs, err);
    for (hsize_t k = 0; k < nobj && st == HILAL_OK && !rebuild; k++) {
        /* An object pointing past the committed candidates comes from a
         * frame that was never committed. */
        if (objs[k].first_cand_id > ar->cand_end || objs[k].last_cand_id > ar->cand_end ||
            objs[k].object_id != (int64_t)k + 1) {
            rebuild = 1;
            break;
        }
        st = hilal_assoc_load(ar->assoc, &objs[k], err);
    }
    free(objs);
    if (st != HILAL_OK)
        return st;
    if (rebuild)
        return rebuild_objects(ar, err);
    ar->objects_stored = nobj;
    return HILAL_OK;
}

/* Recomputes an object from its current detections, walking its
 * prev_cand_id chain from the last detection (after a frame was
 * superseded). */
static hilal_status recompute_object(hilal_archive *ar, int64_t id, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const hilal_archive_object *cur = hilal_assoc_get(ar->assoc, id);
    if (cur == NULL)
        return HILAL_OK;
    hilal_archive_object o;
    memset(&o, 0, sizeof o);
    o.object_id = id;
    o.ra = o.dec = o.pos_err_arcsec = o.first_mjd = o.last_mjd = NAN;
    for (int64_t c_id = cur->last_cand_id; c_id > 0 && st == HILAL_OK;) {
        hilal_archive_cand c;
        if (c_id > ar->cand_end)
            return hilal_error_set(err, HILAL_ERR_INTERNAL, "object %lld links to candidate %lld "
                                   "past the end of /candidates", (long long)id, (long long)c_id);
        st = hilal_h5_read_rows(ar->d_cand, ar->t_cand, (hsize_t)(c_id - 1), 1, &c, err);
        if (st == HILAL_OK && writer_row_current(ar, &c))
            hilal_assoc_accumulate(&o, c.ra, c.dec, c.pos_err_arcsec, c.snr, c.mjd, c.cand_id);
        if (c.prev_cand_id >= c_id)
            return hilal_error_set(err, HILAL_ERR_FORMAT, "candidate %lld has prev_cand_id %lld",
                                   (long long)c_id, (long long)c.prev_cand_id);
        c_id = c.prev_cand_id;
    }
    if (st == HILAL_OK)
        st = hilal_assoc_replace(ar->assoc, &o, err);
    return st;
}

/* Writer registry for hilal_archive_writer_lookup(). */
#define MAX_WRITERS 64
static pthread_mutex_t writers_mutex = PTHREAD_MUTEX_INITIALIZER;
static hilal_archive *writers[MAX_WRITERS];

static void register_writer(hilal_archive *ar, int add)
{
    pthread_mutex_lock(&writers_mutex);
    for (int i = 0; i < MAX_WRITERS; i++) {
        if (add && writers[i] == NULL) {
            writers[i] = ar;
            break;
        }
        if (!add && writers[i] == ar) {
            writers[i] = NULL;
            break;
        }
    }
    pthread_mutex_unlock(&writers_mutex);
}

hilal_archive *hilal_archive_writer_lookup(const char *path)
{
    struct stat a, b;
    hilal_archive *found = NULL;
    if (path == NULL || stat(path, &a) != 0)
        return NULL;
    pthread_mutex_lock(&writers_mutex);
    for (int i = 0; i < MAX_WRITERS && found == NULL; i++)
        if (writers[i] != NULL && stat(writers[i]->path, &b) == 0 && a.st_dev == b.st_dev &&
            a.st_ino == b.st_ino)
            found = writers[i];
    pthread_mutex_unlock(&writers_mutex);
    return found;
}

/* Writer start-up: loads /runs and /frames, finds where the next rows go,
 * drops what a dead writer left uncommitted and brings the `valid` and
 * `status` columns in line with the committed rows. */
static hilal_status load_writer_state(hilal_archive *ar, hilal_error *err)
{
    hilal_status st;
    hsize_t nruns = 0, nframes = 0, ncand = 0, nrows = 0;
    unsigned char *cur = NULL;
    valid_row *valid = NULL;
    size_t changed = 0;

    st = hilal_h5_nrows(ar->d_runs, 0, &nruns, err);
    if (st == HILAL_OK)
        st = hilal_h5_nrows(ar->d_frames, 0, &nframes, err);
    if (st == HILAL_OK)
        st = hilal_h5_nrows(ar->d_cand, 0, &ncand, err);
    if (st != HILAL_OK)
        goto cleanup;

    ar->runs = calloc(nruns > 0 ? nruns : 1, sizeof *ar->runs);
    ar->frames_cap = nframes + 64;
    ar->frames = calloc(ar->frames_cap, sizeof *ar->frames);
    cur = calloc(nframes > 0 ? nframes : 1, 1);
    if (ar->runs == NULL || ar->frames == NULL || cur == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    st = hilal_h5_read_rows(ar->d_runs, ar->t_run, 0, nruns, ar->runs, err);
    if (st == HILAL_OK)
        st = hilal_h5_read_rows(ar->d_frames, ar->t_frame, 0, nframes, ar->frames, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* Rows a dead writer extended but never filled read back as the fill
     * value (zeros): run_id 0, status NONE. Only trailing ones can exist. */
    ar->nruns = nruns;
    while (ar->nruns > 0 && ar->runs[ar->nruns - 1].run_id == 0)
        ar->nruns--;
    ar->nframes = nframes;
    while (ar->nframes > 0 && ar->frames[ar->nframes - 1].status == HILAL_ARCHIVE_FRAME_NONE)
        ar->nframes--;

    ar->cand_end = 0;
    ar->text_end = 0;
    for (size_t i = 0; i < ar->nruns; i++)
        if (ar->runs[i].config_offset + ar->runs[i].config_length > ar->text_end)
            ar->text_end = ar->runs[i].config_offset + ar->runs[i].config_length;
    for (size_t i = 0; i < ar->nframes; i++) {
        const hilal_archive_frame *f = &ar->frames[i];
        if (f->status == HILAL_ARCHIVE_FRAME_NONE)
            continue;
        if (f->first_cand_id < 1 || f->n_candidates < 0) {
            st = hilal_error_set(err, HILAL_ERR_FORMAT, "%s is damaged: /frames row %zu has first_cand_id %lld",
                                 ar->path, i, (long long)f->first_cand_id);
            goto cleanup;
        }
        if (f->first_cand_id - 1 + f->n_candidates > ar->cand_end)
            ar->cand_end = f->first_cand_id - 1 + f->n_candidates;
        if (f->header_offset + f->header_length > ar->text_end)
            ar->text_end = f->header_offset + f->header_length;
    }
    /* Every committed row must have its candidates and stamps on disk. */
    hid_t stacks[] = {ar->d_cand, ar->d_mask, ar->d_cut[0], ar->d_cut[1], ar->d_cut[2],
                      ar->d_cut[3], ar->d_cut[4]};
    for (size_t i = 0; i < sizeof stacks / sizeof stacks[0]; i++) {
        st = hilal_h5_nrows(stacks[i], 0, &nrows, err);
        if (st != HILAL_OK)
            goto cleanup;
        if ((int64_t)nrows < ar->cand_end) {
            st = hilal_error_set(err, HILAL_ERR_FORMAT,
                                 "%s is damaged: committed frames reference %lld candidate rows but a "
                                 "dataset has only %llu", ar->path, (long long)ar->cand_end,
                                 (unsigned long long)nrows);
            goto cleanup;
        }
        /* Drop rows of a frame that was never committed. */
        if ((int64_t)nrows > ar->cand_end) {
            st = hilal_h5_set_nrows(stacks[i], (hsize_t)ar->cand_end, err);
            changed++;
        }
        if (st != HILAL_OK)
            goto cleanup;
    }
    for (int p = 0; p < 3; p++) {
        st = hilal_h5_nrows(ar->d_psf[p], 0, &nrows, err);
        if (st == HILAL_OK && nrows < ar->nframes)
            st = hilal_error_set(err, HILAL_ERR_FORMAT, "%s is damaged: /psf/%s has %llu rows for %zu frames",
                                 ar->path, psf_names[p], (unsigned long long)nrows, ar->nframes);
        if (st == HILAL_OK && nrows > ar->nframes) {
            st = hilal_h5_set_nrows(ar->d_psf[p], ar->nframes, err);
            changed++;
        }
        if (st != HILAL_OK)
            goto cleanup;
    }
    st = hilal_h5_nrows(ar->d_text, 0, &nrows, err);
    if (st == HILAL_OK && (int64_t)nrows < ar->text_end)
        st = hilal_error_set(err, HILAL_ERR_FORMAT, "%s is damaged: /text is shorter than its references", ar->path);
    if (st == HILAL_OK && (int64_t)nrows > ar->text_end) {
        st = hilal_h5_set_nrows(ar->d_text, (hsize_t)ar->text_end, err);
        changed++;
    }
    if (st == HILAL_OK && nframes > ar->nframes) {
        st = hilal_h5_set_nrows(ar->d_frames, ar->nframes, err);
        changed++;
    }
    if (st == HILAL_OK && nruns > ar->nruns) {
        st = hilal_h5_set_nrows(ar->d_runs, ar->nruns, err);
        changed++;
    }
    if (st != HILAL_OK)
        goto cleanup;

    /* Statuses and validity flags: a writer killed between a commit and the
     * flag updates that follow it leaves an older row COMMITTED or new
     * candidates invalid. The rule (the last committed row of a key is
     * current) says what they must be. */
    st = compute_current(ar->frames, ar->nframes, cur, err);
    if (st != HILAL_OK)
        goto cleanup;
    valid = malloc((ar->cand_end > 0 ? (size_t)ar->cand_end : 1) * sizeof *valid);
    if (valid == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    st = hilal_h5_read_rows(ar->d_cand, ar->t_valid, 0, (hsize_t)ar->cand_end, valid, err);
    for (size_t i = 0; i < ar->nframes && st == HILAL_OK; i++) {
        hilal_archive_frame *f = &ar->frames[i];
        if (f->status == HILAL_ARCHIVE_FRAME_COMMITTED && !cur[i]) {
            st = write_frame_status(ar, i, HILAL_ARCHIVE_FRAME_SUPERSEDED, err);
            changed++;
        }
        if (st != HILAL_OK || f->status == HILAL_ARCHIVE_FRAME_NONE)
            continue;
        uint8_t want = cur[i] ? 1 : 0;
        int64_t a = f->first_cand_id - 1, b = a + f->n_candidates;
        for (int64_t k = a; k < b; k++)
            if (valid[k].valid != want) {
                st = write_valid_range(ar, a, b - a, want, err);
                changed++;
                break;
            }
    }
    if (st == HILAL_OK && changed > 0)
        st = flush(ar, err);
    if (st == HILAL_OK && (changed > 0 || ar->recovered))
        hilal_log(HILAL_LOG_INFO, "archive %s: %s; %zu frame rows, %lld candidate rows kept",
                  ar->path, ar->recovered ? "recovered after a writer stopped" : "tidied",
                  ar->nframes, (long long)ar->cand_end);
    if (st == HILAL_OK && ar->schema_version >= 2)
        st = load_objects(ar, err);
    else if (st == HILAL_OK)
        hilal_log(HILAL_LOG_WARN, "archive %s has schema version %d: candidates are not "
                  "associated into objects (start a new archive to get them)", ar->path,
                  ar->schema_version);
cleanup:
    free(valid);
    free(cur);
    return st;
}

hilal_status hilal_archive_open_write(const char *path, const hilal_archive_options *opt,
                                      hilal_archive **out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive *ar = NULL;
    hilal_archive_options o;
    struct stat sb;
    *out = NULL;
    hilal_h5_quiet();
    if (opt != NULL)
        o = *opt;
    else
        hilal_archive_options_init(&o);
    /* Sizes 0 mean "as the existing archive has them" (hilal_archive_recover). */
    int sizes_from_file = o.cutout_size == 0 && o.psf_size == 0;
    if (!sizes_from_file &&
        (o.cutout_size < 5 || o.cutout_size > 255 || o.cutout_size % 2 == 0 || o.psf_size < 5 ||
         o.psf_size > 255 || o.psf_size % 2 == 0))
        return hilal_error_set(err, HILAL_ERR_RANGE,
                               "archive %s: cutout size %d and PSF size %d must be odd and in 5..255",
                               path, o.cutout_size, o.psf_size);
    if (o.compress_level < 0 || o.compress_level > 9 || o.cutout_compress_level < 0 ||
        o.cutout_compress_level > 9)
        return hilal_error_set(err, HILAL_ERR_RANGE, "archive %s: compression levels %d and %d must be in 0..9",
                               path, o.compress_level, o.cutout_compress_level);
    if (path == NULL || path[0] == '\0')
        return hilal_error_set(err, HILAL_ERR_CONFIG, "no archive file given; set archive.path (or --archive)");
    ar = handle_new(path);
    if (ar == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    ar->writable = 1;
    ar->opt = o;

    if (stat(path, &sb) != 0) {
        if (errno != ENOENT || sizes_from_file) {
            st = hilal_error_set(err, errno == ENOENT ? HILAL_ERR_NOTFOUND : HILAL_ERR_IO,
                                 "cannot access archive %s: %s", path, strerror(errno));
            goto cleanup;
        }
        st = create_archive(path, &o, err);
        if (st != HILAL_OK)
            goto cleanup;
    }
    /* The lock first: then a journal record or an "open for writing" flag
     * left in the file can only come from a writer that died. */
    int replayed = 0;
    st = take_writer_lock(ar, err);
    if (st == HILAL_OK)
        st = hilal_h5_journal_replay(path, &replayed, err);
    if (st == HILAL_OK)
        st = check_hdf5(path, err);
    if (st == HILAL_OK)
        st = hilal_h5_open_swmr_write(path, &ar->recovered, &ar->fid, err);
    ar->recovered |= replayed;
    if (st == HILAL_OK)
        st = check_root(ar, err);
    if (st != HILAL_OK)
        goto cleanup;
    if (!sizes_from_file && (ar->cutout_size != o.cutout_size || ar->psf_size != o.psf_size)) {
        st = hilal_error_set(err, HILAL_ERR_MISMATCH,
                             "archive %s has %d px cutouts and %d px PSF boxes but %d and %d were "
                             "asked for; set archive.cutout_size=%d and archive.psf_size=%d or use "
                             "a new archive", path, ar->cutout_size, ar->psf_size, o.cutout_size,
                             o.psf_size, ar->cutout_size, ar->psf_size);
        goto cleanup;
    }
    if (!(o.assoc_radius_arcsec > 0) || o.assoc_radius_arcsec > 3600) {
        st = hilal_error_set(err, HILAL_ERR_RANGE, "association radius %g arcsec must be in (0, 3600]",
                             o.assoc_radius_arcsec);
        goto cleanup;
    }
    st = open_datasets(ar, err);
    if (st == HILAL_OK)
        st = load_writer_state(ar, err);
cleanup:
    if (st != HILAL_OK) {
        hilal_error_context(err, "archive %s", path);
        hilal_archive_free(ar);
        return st;
    }
    register_writer(ar, 1);
    *out = ar;
    return HILAL_OK;
}

int hilal_archive_recovered(const hilal_archive *ar)
{
    return ar != NULL && ar->recovered;
}

hilal_status hilal_archive_recover(const char *path, int *recovered, hilal_error *err)
{
    hilal_archive_options opt;
    hilal_archive *ar = NULL;
    hilal_archive_options_init(&opt);
    opt.cutout_size = opt.psf_size = 0; /* as stored */
    *recovered = 0;
    hilal_status st = hilal_archive_open_write(path, &opt, &ar, err);
    if (st != HILAL_OK)
        return st;
    *recovered = ar->recovered;
    return hilal_archive_close(ar, err);
}

hilal_status hilal_archive_open_read(const char *path, hilal_archive **out, hilal_error *err)
{
    hilal_status st;
    hilal_archive *ar = NULL;
    *out = NULL;
    hilal_h5_quiet();
    st = check_hdf5(path, err);
    if (st == HILAL_OK && (ar = handle_new(path)) == NULL)
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    if (st == HILAL_OK)
        st = hilal_h5_open_swmr_read(path, &ar->fid, err);
    if (st == HILAL_OK)
        st = check_root(ar, err);
    if (st == HILAL_OK)
        st = open_datasets(ar, err);
    if (st != HILAL_OK) {
        /* A journal left by a writer that died may hold the write that
         * makes the file readable again. */
        char journal[4200];
        struct stat sb;
        hilal_h5_journal_path(path, journal, sizeof journal);
        if (st != HILAL_ERR_NOTFOUND && stat(journal, &sb) == 0 && sb.st_size > 0 &&
            !writer_active(path))
            hilal_error_context(err, "the last writer of %s stopped while writing; run "
                                "`hilal info %s --recover` to repair it", path, path);
        hilal_archive_free(ar);
        return st;
    }
    *out = ar;
    return HILAL_OK;
}

hilal_status hilal_archive_close(hilal_archive *ar, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    if (ar == NULL)
        return HILAL_OK;
    hilal_h5_quiet();
    if (ar->writable)
        register_writer(ar, 0);
    if (ar->writable && ar->fid >= 0)
        st = flush(ar, err);
    handle_close_hdf5(ar);
    if (ar->fid >= 0 && H5Fclose(ar->fid) < 0 && st == HILAL_OK)
        st = hilal_h5_error(err, "cannot close archive %s", ar->path);
    ar->fid = H5I_INVALID_HID;
    /* Closing the descriptor releases the writer lock, after HDF5 has
     * cleared its "open for writing" flag. */
    if (ar->lock_fd >= 0)
        close(ar->lock_fd);
    pthread_mutex_destroy(&ar->mutex);
    free(ar->frames);
    free(ar->runs);
    hilal_assoc_free(ar->assoc);
    free(ar->touched);
    free(ar);
    return st;
}

void hilal_archive_free(hilal_archive *ar)
{
    hilal_error ignored = {0};
    hilal_archive_close(ar, &ignored);
}

/* ------------------------------------------------------------------------
 * Runs
 * ------------------------------------------------------------------------ */

/* Appends bytes to /text; returns their offset. */
static hilal_status append_text(hilal_archive *ar, const char *text, size_t len, int64_t *offset,
                                hilal_error *err)
{
    *offset = ar->text_end;
    if (len == 0)
        return HILAL_OK;
    hilal_status st = hilal_h5_write_rows(ar->d_text, H5T_NATIVE_UCHAR, (hsize_t)ar->text_end,
                                          (hsize_t)len, text, err);
    if (st == HILAL_OK)
        ar->text_end += (int64_t)len;
    return st;
}

/* Finds the run with this configuration hash and software version or adds
 * it (with the library versions and creation time given; created_utc NULL
 * means now). */
static hilal_status find_or_add_run(hilal_archive *ar, const char *config_text,
                                    const char *config_hash, const char *software_version,
                                    const char *library_versions, const char *created_utc,
                                    int32_t *run_id, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive_run run;
    *run_id = 0;
    if (!ar->writable)
        return hilal_error_set(err, HILAL_ERR_USAGE, "archive %s was opened read-only", ar->path);
    if (config_hash == NULL || strlen(config_hash) != 64)
        return hilal_error_set(err, HILAL_ERR_RANGE, "a run needs a 64-hex configuration hash");
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    for (size_t i = 0; i < ar->nruns; i++)
        if (strcmp(ar->runs[i].config_hash, config_hash) == 0 &&
            strcmp(ar->runs[i].software_version, software_version) == 0) {
            *run_id = ar->runs[i].run_id;
            goto cleanup;
        }
    memset(&run, 0, sizeof run);
    run.run_id = ar->nruns > 0 ? ar->runs[ar->nruns - 1].run_id + 1 : 1;
    snprintf(run.config_hash, sizeof run.config_hash, "%s", config_hash);
    snprintf(run.software_version, sizeof run.software_version, "%s", software_version);
    snprintf(run.library_versions, sizeof run.library_versions, "%s", library_versions);
    if (created_utc != NULL && created_utc[0] != '\0')
        snprintf(run.created_utc, sizeof run.created_utc, "%s", created_utc);
    else
        utc_now(run.created_utc, sizeof run.created_utc);
    if (config_text == NULL)
        config_text = "";
    /* The text first, then the row that points at it. */
    st = append_text(ar, config_text, strlen(config_text), &run.config_offset, err);
    run.config_length = (int64_t)strlen(config_text);
    if (st == HILAL_OK)
        st = flush(ar, err);
    if (st == HILAL_OK)
        st = hilal_h5_write_rows(ar->d_runs, ar->t_run, ar->nruns, 1, &run, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    if (st != HILAL_OK)
        goto cleanup;
    hilal_archive_run *p = realloc(ar->runs, (ar->nruns + 1) * sizeof *p);
    if (p == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    ar->runs = p;
    ar->runs[ar->nruns++] = run;
    *run_id = run.run_id;
cleanup:
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s", ar->path);
    return st;
}

hilal_status hilal_archive_begin_run(hilal_archive *ar, const char *config_text,
                                     const char *config_hash, int32_t *run_id, hilal_error *err)
{
    return find_or_add_run(ar, config_text, config_hash, hilal_version(),
                           hilal_library_versions(), NULL, run_id, err);
}

hilal_status hilal_archive_begin_run_config(hilal_archive *ar, const hilal_config *cfg,
                                            int32_t *run_id, hilal_error *err)
{
    char hash[65];
    char *text = hilal_config_text(cfg, 0);
    if (text == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_config_hash(cfg, hash);
    hilal_status st = hilal_archive_begin_run(ar, text, hash, run_id, err);
    free(text);
    return st;
}

/* ------------------------------------------------------------------------
 * Frame rows
 * ------------------------------------------------------------------------ */

int64_t hilal_archive_frame_id(const char *sha256_hex, int hdu, const char *name)
{
    char key[1200], hex[65];
    if (sha256_hex != NULL && sha256_hex[0] != '\0')
        snprintf(key, sizeof key, "%s:%d", sha256_hex, hdu);
    else
        snprintf(key, sizeof key, "name:%s:%d", name != NULL ? name : "", hdu);
    hilal_sha256_hex(key, strlen(key), hex);
    hex[15] = '\0';
    return (int64_t)strtoll(hex, NULL, 16);
}

/* Median of the finite values of a plane whose mask (may be NULL) has none
 * of `bad`, estimated from at most ~16384 pixels on a regular stride (exact
 * for smaller images). NaN when none qualify. */
static double sampled_median(const float *a, const hilal_mask_t *mask, size_t n,
                             hilal_mask_t bad, int positive_only)
{
    if (a == NULL || n == 0)
        return NAN;
    size_t stride = n / 16384 + 1, m = 0;
    float *s = malloc((n / stride + 1) * sizeof *s);
    if (s == NULL)
        return NAN;
    /* The samples are a page or more apart: each one misses the caches
     * and the TLB. They are loaded BATCH at a time into local arrays first,
     * so that those misses overlap instead of waiting for each in turn. */
    enum { BATCH = 32 };
    for (size_t i0 = 0; i0 < n; i0 += BATCH * stride) {
        float v[BATCH];
        hilal_mask_t mk[BATCH];
        size_t nb = 0;
        for (size_t i = i0; i < n && nb < BATCH; i += stride) {
            v[nb] = a[i];
            mk[nb++] = mask != NULL ? mask[i] : 0;
        }
        for (size_t j = 0; j < nb; j++) {
            if (!isfinite(v[j]) || (mk[j] & bad) || (positive_only && v[j] <= 0))
                continue;
            s[m++] = v[j];
        }
    }
    double med = hilal_median_float(s, m);
    free(s);
    return med;
}

/* Threads the archive uses to cut stamps and sample planes while it
 * writes: two on a machine with more than one processor. */
static int archive_threads(void) { return hilal_fft_threads(0) > 1 ? 2 : 1; }

/* One sampled_median() to compute (a == NULL: none, NaN). */
typedef struct median_job {
    const float *a;
    const hilal_mask_t *mask;
    size_t n;
    hilal_mask_t bad;
    int positive_only;
    double med;
} median_job;

/* hilal_parallel_for() body: jobs lo .. hi - 1. */
static void median_range(void *ctx, long lo, long hi, int tid)
{
    median_job *jobs = ctx;
    (void)tid;
    for (long i = lo; i < hi; i++)
        jobs[i].med = sampled_median(jobs[i].a, jobs[i].mask, jobs[i].n, jobs[i].bad,
                                     jobs[i].positive_only);
}

/* Copies a string into a fixed field, truncating (fields hold the first
 * size - 1 bytes). */
static void copy_str(char *dst, size_t size, const char *src)
{
    size_t n = src != NULL ? strnlen(src, size - 1) : 0;
    if (n > 0)
        memcpy(dst, src, n);
    dst[n] = '\0';
}

/* Fills the per-frame record of a frame (candidates and status apart). */
static void fill_frame_row(const hilal_frame *frame, int32_t run_id, hilal_archive_frame *r)
{
    const hilal_image *sci = frame->sci, *ref = frame->ref;
    const hilal_diff *d = &frame->diff;
    memset(r, 0, sizeof *r);
    copy_str(r->frame_name, sizeof r->frame_name, frame->frame_id);
    if (sci != NULL && sci->meta.path[0] != '\0')
        copy_str(r->path, sizeof r->path, sci->meta.path);
    else
        copy_str(r->path, sizeof r->path, frame->sci_path);
    r->hdu = sci != NULL && sci->meta.hdu > 0 ? sci->meta.hdu : frame->sci_hdu;
    if (sci != NULL)
        copy_str(r->sha256, sizeof r->sha256, sci->meta.sha256);
    if (r->sha256[0] == '\0' && frame->sci_path[0] != '\0') {
        /* No image (the frame failed early): identify the frame by the file
         * when it is a plain readable file. */
        hilal_error ignored = {0};
        char hex[65];
        if (hilal_sha256_file(frame->sci_path, hex, &ignored) == HILAL_OK)
            copy_str(r->sha256, sizeof r->sha256, hex);
    }
    r->frame_id = hilal_archive_frame_id(r->sha256, r->hdu, frame->frame_id);
    if (ref != NULL && ref->meta.path[0] != '\0')
        copy_str(r->ref_path, sizeof r->ref_path, ref->meta.path);
    else
        copy_str(r->ref_path, sizeof r->ref_path, frame->ref_path);
    r->ref_hdu = ref != NULL && ref->meta.hdu > 0 ? ref->meta.hdu : frame->ref_hdu;
    if (ref != NULL)
        copy_str(r->ref_sha256, sizeof r->ref_sha256, ref->meta.sha256);
    r->mjd = sci != NULL ? sci->meta.mjd : NAN;
    if (sci != NULL) {
        copy_str(r->filter, sizeof r->filter, sci->meta.filter);
        copy_str(r->object, sizeof r->object, sci->meta.object);
    }
    r->exptime_s = sci != NULL ? sci->meta.exptime_s : NAN;
    r->nx = sci != NULL ? (int32_t)sci->nx : 0;
    r->ny = sci != NULL ? (int32_t)sci->ny : 0;
    r->run_id = run_id;
    r->written_unix = unix_now();

    int has_psf = (frame->products & HILAL_PROD_PSF) != 0;
    r->psf_fwhm_sci_px = has_psf && frame->sci_psf.data ? frame->sci_psf.fwhm_px : NAN;
    r->psf_fwhm_ref_px = has_psf && frame->ref_psf.data ? frame->ref_psf.fwhm_px : NAN;
    r->psf_nstars_sci = frame->sci_psf.data ? frame->sci_psf.nstars : 0;
    r->psf_nstars_ref = frame->ref_psf.data ? frame->ref_psf.nstars : 0;
    r->psf_size_sci = frame->sci_psf.data ? frame->sci_psf.size : 0;
    r->psf_size_ref = frame->ref_psf.data ? frame->ref_psf.size : 0;
    r->psf_size_diff = d->psf_d.data ? d->psf_d.size : 0;
    r->psf_fwhm_diff_px = d->psf_d.data ? d->psf_d.fwhm_px : NAN;

    int has_fs = (frame->products & HILAL_PROD_FLUXSCALE) != 0;
    r->flux_ratio = has_fs ? frame->flux_ratio : NAN;
    r->flux_ratio_err = has_fs ? frame->flux_ratio_err : NAN;
    r->flux_ratio_nstars = has_fs ? frame->flux_ratio_nstars : 0;
    int has_al = (frame->products & HILAL_PROD_ALIGNED) != 0;
    r->reg_rms_x_px = has_al ? frame->reg_rms_x_px : NAN;
    r->reg_rms_y_px = has_al ? frame->reg_rms_y_px : NAN;

    /* The median sky of both images and the median flux error, three
     * planes sampled at once (each sample waits on memory). */
    int has_diff = (frame->products & HILAL_PROD_DIFFERENCE) != 0 && d->nx > 0;
    median_job jobs[3] = {
        {sci != NULL ? sci->sky : NULL, sci != NULL ? sci->mask : NULL,
         sci != NULL ? (size_t)(sci->nx * sci->ny) : 0, HILAL_MASK_UNUSABLE, 0, NAN},
        {ref != NULL ? ref->sky : NULL, ref != NULL ? ref->mask : NULL,
         ref != NULL ? (size_t)(ref->nx * ref->ny) : 0, HILAL_MASK_UNUSABLE, 0, NAN},
        {has_diff ? d->flux_err : NULL, d->mask, has_diff ? (size_t)(d->nx * d->ny) : 0,
         HILAL_MASK_UNUSABLE | HILAL_MASK_EDGE, 1, NAN}};
    hilal_parallel_for(archive_threads(), 3, median_range, jobs);
    r->sky_sci_adu = sci != NULL ? jobs[0].med : NAN;
    r->sky_rms_sci_adu = sci != NULL ? sci->sky_rms_adu : NAN;
    r->sky_ref_adu = ref != NULL ? jobs[1].med : NAN;
    r->sky_rms_ref_adu = ref != NULL ? ref->sky_rms_adu : NAN;

    r->scorr_mean = has_diff ? d->scorr_mean : NAN;
    r->scorr_std = has_diff ? d->scorr_std : NAN;
    r->f_d = has_diff ? d->f_d : NAN;
    /* Limiting flux at 5 sigma: the error of a point-source flux measured on
     * the difference image (ZOGY eq. 43) is the flux_err image; its median
     * over usable pixels times 5 is the flux a transient needs to be found
     * at S/N 5 on a typical pixel. */
    r->limflux5_adu = has_diff ? 5.0 * jobs[2].med : NAN;
    r->zeropoint_mag = sci != NULL ? sci->meta.zeropoint_mag : NAN;
    r->limmag5 = isfinite(r->zeropoint_mag) && r->limflux5_adu > 0
                     ? r->zeropoint_mag - 2.5 * log10(r->limflux5_adu) : NAN;
    r->gain_e_per_adu = sci != NULL ? sci->meta.gain_e_per_adu : NAN;
}

/* Writes the three PSF boxes of frame row `row`: each PSF centred in a
 * psf_size box (zeros around a smaller PSF, the central part of a larger
 * one, which is logged), NaN when the frame has none. */
static hilal_status write_psfs(hilal_archive *ar, const hilal_frame *frame, size_t row,
                               hilal_error *err)
{
    const hilal_psf *psfs[3] = {&frame->sci_psf, &frame->ref_psf, &frame->diff.psf_d};
    int P = ar->psf_size;
    float *box = malloc((size_t)P * (size_t)P * sizeof *box);
    hilal_status st = HILAL_OK;
    if (box == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    for (int p = 0; p < 3 && st == HILAL_OK; p++) {
        const hilal_psf *psf = psfs[p];
        if (psf->data == NULL || psf->size <= 0) {
            for (int i = 0; i < P * P; i++)
                box[i] = NAN;
        } else {
            /* Both sides are odd, so the centres coincide at an integer shift. */
            int off = (P - psf->size) / 2;
            memset(box, 0, (size_t)P * (size_t)P * sizeof *box);
            if (psf->size > P)
                hilal_log(HILAL_LOG_WARN, "frame %s: %s PSF of %d px kept as its central %d px "
                          "(archive.psf_size)", frame->frame_id, psf_names[p], psf->size, P);
            for (int j = 0; j < psf->size; j++) {
                int bj = j + off;
                if (bj < 0 || bj >= P)
                    continue;
                for (int i = 0; i < psf->size; i++) {
                    int bi = i + off;
                    if (bi >= 0 && bi < P)
                        box[bj * P + bi] = psf->data[j * psf->size + i];
                }
            }
        }
        st = hilal_h5_write_rows(ar->d_psf[p], H5T_NATIVE_FLOAT, row, 1, box, err);
    }
    free(box);
    return st;
}

/* Copies an S x S stamp with first pixel (x0, y0) (0-based) from an
 * nx x ny plane; pixels outside the plane (or a NULL plane) get NaN. */
static void cut_float(const float *img, long nx, long ny, long x0, long y0, int S, float *out)
{
    int inside = x0 >= 0 && x0 + S <= nx;
    for (int j = 0; j < S; j++) {
        long y = y0 + j;
        float *o = out + (size_t)j * (size_t)S;
        if (img == NULL || y < 0 || y >= ny) {
            for (int i = 0; i < S; i++)
                o[i] = NAN;
            continue;
        }
        const float *row = img + (size_t)y * (size_t)nx;
        if (inside) {
            memcpy(o, row + x0, (size_t)S * sizeof *o);
            continue;
        }
        for (int i = 0; i < S; i++) {
            long x = x0 + i;
            o[i] = (x >= 0 && x < nx) ? row[x] : NAN;
        }
    }
}

/* Mask stamp: outside pixels are NODATA|EDGE. m1 and m2 (either may be
 * NULL) are OR-ed. */
static void cut_mask(const hilal_mask_t *m1, const hilal_mask_t *m2, long nx, long ny, long x0,
                     long y0, int S, uint16_t *out)
{
    const uint16_t outside = HILAL_MASK_NODATA | HILAL_MASK_EDGE;
    const int inside = x0 >= 0 && x0 + S <= nx;
    for (int j = 0; j < S; j++) {
        const long y = y0 + j;
        uint16_t *o = out + (size_t)j * (size_t)S;
        if (y < 0 || y >= ny) {
            for (int i = 0; i < S; i++)
                o[i] = outside;
            continue;
        }
        const hilal_mask_t *r1 = m1 != NULL ? m1 + (size_t)y * (size_t)nx : NULL;
        const hilal_mask_t *r2 = m2 != NULL ? m2 + (size_t)y * (size_t)nx : NULL;
        if (inside && r1 != NULL && r2 != NULL) {
            for (int i = 0; i < S; i++)
                o[i] = (uint16_t)(r1[x0 + i] | r2[x0 + i]);
        } else if (inside && r1 != NULL) {
            for (int i = 0; i < S; i++)
                o[i] = r1[x0 + i];
        } else {
            for (int i = 0; i < S; i++) {
                const long x = x0 + i;
                o[i] = x >= 0 && x < nx
                           ? (uint16_t)((r1 != NULL ? r1[x] : 0) | (r2 != NULL ? r2[x] : 0))
                           : outside;
            }
        }
    }
}

/* Stamps copied at a time by a merge: ~64 MB of float stamps at most. */
static size_t group_rows(int S)
{
    size_t rows = ((size_t)64 << 20) / ((size_t)S * (size_t)S * sizeof(float));
    return rows < 1 ? 1 : rows;
}

/* Stamps cut and written at a time: ~16 MB of float stamps, in whole chunks
 * of the float stacks. */
static size_t block_rows(int S)
{
    const size_t crow = (size_t)stack_chunk_rows(S);
    size_t rows = ((size_t)16 << 20) / ((size_t)S * (size_t)S * sizeof(float)) / crow * crow;
    return rows < crow ? crow : rows;
}

typedef struct stamp_order { long y0, x0; size_t k; } stamp_order;

static int stamp_order_cmp(const void *a, const void *b)
{
    const stamp_order *p = a, *q = b;
    if (p->y0 != q->y0)
        return p->y0 < q->y0 ? -1 : 1;
    if (p->x0 != q->x0)
        return p->x0 < q->x0 ? -1 : 1;
    return p->k < q->k ? -1 : (p->k > q->k);
}

/* The deflate level with which this library can filter mask stamps itself
 * and hand them to HDF5 as whole chunks (H5Dwrite_chunk()): the dataset's
 * filter pipeline is exactly shuffle of 2-byte elements then deflate, one
 * stamp per chunk, and the file's little-endian uint16 is the native one.
 * -1 when HDF5 must filter them (no compression, another pipeline). */
static int mask_direct_level(const hilal_archive *ar)
{
    int level = -1;
    hid_t dcpl = H5Dget_create_plist(ar->d_mask);
    hsize_t chunk[3];
    if (dcpl < 0) {
        hilal_h5_clear();
        return -1;
    }
    if (H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, 3, chunk) == 3 &&
        chunk[0] == 1 && chunk[1] == (hsize_t)ar->cutout_size &&
        chunk[2] == (hsize_t)ar->cutout_size && H5Pget_nfilters(dcpl) == 2 &&
        H5Tequal(H5T_NATIVE_UINT16, H5T_STD_U16LE) > 0) {
        unsigned flags, cd0[4], cd1[4], config;
        size_t n0 = 4, n1 = 4;
        H5Z_filter_t f0 = H5Pget_filter2(dcpl, 0, &flags, &n0, cd0, 0, NULL, &config);
        H5Z_filter_t f1 = H5Pget_filter2(dcpl, 1, &flags, &n1, cd1, 0, NULL, &config);
        if (f0 == H5Z_FILTER_SHUFFLE && n0 >= 1 && cd0[0] == 2 && f1 == H5Z_FILTER_DEFLATE &&
            n1 >= 1 && cd1[0] <= 9)
            level = (int)cd1[0];
    }
    H5Pclose(dcpl);
    hilal_h5_clear();
    return level;
}

/* zarena_of[] of a stamp that is the all-zero stamp. */
#define ZERO_STAMP 2

/* Compressed mask stamps of one thread, one after the other. */
typedef struct zarena {
    unsigned char *buf;
    size_t used, cap;
} zarena;

/* Writing the stamps of a frame's n candidates (file rows row0 .. row0 + n -
 * 1). Planes 0 .. HILAL_ARCHIVE_NFLOAT_PLANES - 1 are float planes cut from
 * src; the mask plane is m1 | m2. The candidates are taken in blocks
 * (block j: candidates bstart[j] .. bstart[j + 1] - 1), and each block's
 * stamps in order of their first row (order[], block after block):
 * consecutive stamps then read neighbouring image rows. A task is one
 * plane of one block, cut into one of two buffers and written with one
 * call; tasks t = j nplanes + p. */
typedef struct stamp_writer {
    hilal_archive *ar;
    const float *src[HILAL_ARCHIVE_NFLOAT_PLANES];
    const hilal_mask_t *m1, *m2;
    long nx, ny;
    int S;
    hsize_t row0;
    size_t n;
    const stamp_order *order;
    const size_t *bstart;
    size_t nblocks;
    int nplanes;                /* the float planes, and the mask unless level >= 0 */
    void *buf[2];
    /* Mask stamps filtered here (level >= 0): cut and compressed one at a
     * time by whichever thread is free (next_mask counts those taken),
     * stamp k into arena[zarena_of[k]] at zoff[k], zlen[k] bytes (0: left
     * to HDF5), or, zarena_of[k] == ZERO_STAMP, the all-zero stamp. */
    int level;
    size_t zcap;
    size_t next_mask;
    int writing;                /* 1 while the calling thread writes a task */
    size_t *zoff, *zlen;
    unsigned char *zarena_of;
    zarena arena[2];
    unsigned char *zero;        /* the all-zero stamp, filtered: zero_len bytes (0: none) */
    size_t zero_len;
    uint16_t *mtmp[2];          /* per thread: one raw stamp */
    unsigned char *stmp[2];     /* per thread: one shuffled stamp */
} stamp_writer;

/* Cuts stamps lo .. hi - 1 (in order) of task t into buf. */
static void cut_task(const stamp_writer *w, size_t t, size_t lo, size_t hi, void *buf)
{
    const size_t SS = (size_t)w->S * (size_t)w->S, j = t / (size_t)w->nplanes;
    const int p = (int)(t % (size_t)w->nplanes);
    for (size_t o = w->bstart[j] + lo; o < w->bstart[j] + hi; o++) {
        const stamp_order *so = &w->order[o];
        const size_t at = (so->k - w->bstart[j]) * SS;
        if (p < HILAL_ARCHIVE_NFLOAT_PLANES)
            cut_float(w->src[p], w->nx, w->ny, so->x0 - 1, so->y0 - 1, w->S, (float *)buf + at);
        else
            cut_mask(w->m1, w->m2, w->nx, w->ny, so->x0 - 1, so->y0 - 1, w->S, (uint16_t *)buf + at);
    }
}

/* Writes task t from buf. */
static hilal_status write_task(const stamp_writer *w, size_t t, const void *buf, hilal_error *err)
{
    const size_t j = t / (size_t)w->nplanes;
    const int p = (int)(t % (size_t)w->nplanes);
    const hsize_t row = w->row0 + w->bstart[j];
    const size_t nrows = w->bstart[j + 1] - w->bstart[j];
    if (p < HILAL_ARCHIVE_NFLOAT_PLANES)
        return hilal_h5_write_rows(w->ar->d_cut[p], H5T_NATIVE_FLOAT, row, nrows, buf, err);
    return hilal_h5_write_rows(w->ar->d_mask, H5T_NATIVE_UINT16, row, nrows, buf, err);
}

/* Cuts and filters the mask stamp order[o] in thread tid. HDF5's shuffle
 * filter stores the first bytes of all 2-byte elements, then all second
 * bytes; its deflate filter is zlib's compress2() at the dataset's level. */
static void mask_unit(stamp_writer *w, size_t o, int tid)
{
    const size_t SS = (size_t)w->S * (size_t)w->S;
    const stamp_order *so = &w->order[o];
    uint16_t *raw = w->mtmp[tid];
    unsigned char *sh = w->stmp[tid];
    zarena *z = &w->arena[tid];
    w->zlen[so->k] = 0;
    cut_mask(w->m1, w->m2, w->nx, w->ny, so->x0 - 1, so->y0 - 1, w->S, raw);
    /* Most stamps are clean: an all-zero stamp is the all-zero chunk,
     * compressed once. */
    uint16_t any = 0;
    for (size_t i = 0; i < SS; i++)
        any |= raw[i];
    if (any == 0 && w->zero_len > 0) {
        w->zarena_of[so->k] = ZERO_STAMP;
        w->zoff[so->k] = 0;
        w->zlen[so->k] = w->zero_len;
        return;
    }
    if (z->cap - z->used < w->zcap) {
        size_t cap = 2 * z->cap + 16 * w->zcap;
        unsigned char *tmp = realloc(z->buf, cap);
        if (tmp == NULL)
            return; /* HDF5 compresses this one */
        z->buf = tmp;
        z->cap = cap;
    }
    for (size_t i = 0; i < SS; i++) {
        sh[i] = (unsigned char)(raw[i] & 0xff);
        sh[SS + i] = (unsigned char)(raw[i] >> 8);
    }
    uLongf len = (uLongf)w->zcap;
    if (compress2(z->buf + z->used, &len, sh, (uLong)(2 * SS), w->level) != Z_OK)
        return;
    w->zoff[so->k] = z->used;
    w->zlen[so->k] = (size_t)len;
    w->zarena_of[so->k] = (unsigned char)tid;
    z->used += (size_t)len;
}

/* Mask stamps in thread tid until none is left or, when `until_written`,
 * until the calling thread has written its task. */
static void mask_units(stamp_writer *w, int tid, int until_written)
{
    if (w->level < 0)
        return;
    while (!until_written || __atomic_load_n(&w->writing, __ATOMIC_ACQUIRE)) {
        size_t o = __atomic_fetch_add(&w->next_mask, 1, __ATOMIC_RELAXED);
        if (o >= w->n)
            break;
        mask_unit(w, o, tid);
    }
}

/* hilal_parallel_for() body: stamps lo .. hi - 1 of the first task, into
 * the first buffer. */
static void first_range(void *ctx, long lo, long hi, int tid)
{
    const stamp_writer *w = ctx;
    (void)tid;
    cut_task(w, 0, (size_t)lo, (size_t)hi, w->buf[0]);
}

/* hilal_parallel_for() body: the mask stamps left. */
static void mask_range(void *ctx, long lo, long hi, int tid)
{
    (void)lo;
    (void)hi;
    mask_units(ctx, tid, 0);
}

/* One step: the calling thread writes task t from buf[t % 2] (task 0 of
 * the step; HDF5 calls stay in that thread), while a second thread cuts
 * task t + 1 into the other buffer, then mask stamps until the write is
 * done (task 1). */
typedef struct stamp_step {
    stamp_writer *w;
    size_t t, ntasks;
    hilal_status st;
    hilal_error *err;
} stamp_step;

static void step_task(void *ctx, long lo, long hi, int tid)
{
    stamp_step *s = ctx;
    stamp_writer *w = s->w;
    for (long i = lo; i < hi; i++) {
        if (i == 0) {
            s->st = write_task(w, s->t, w->buf[s->t % 2], s->err);
            __atomic_store_n(&w->writing, 0, __ATOMIC_RELEASE);
        } else {
            if (s->t + 1 < s->ntasks) {
                const size_t j = (s->t + 1) / (size_t)w->nplanes;
                cut_task(w, s->t + 1, 0, w->bstart[j + 1] - w->bstart[j], w->buf[(s->t + 1) % 2]);
            }
            mask_units(w, tid, 1);
        }
    }
}

/* Writes the mask stamps filtered by mask_unit(), one chunk each, in row
 * order; a stamp left to HDF5 (no memory for it) is cut again into mtmp[0]
 * and written through the filters. */
static hilal_status write_masks(stamp_writer *w, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t *where = malloc((w->n > 0 ? w->n : 1) * sizeof *where);
    if (where == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    for (size_t o = 0; o < w->n; o++)
        where[w->order[o].k] = o;
    for (size_t k = 0; k < w->n && st == HILAL_OK; k++) {
        const hsize_t row = w->row0 + k;
        if (w->zlen[k] == 0) {
            const stamp_order *so = &w->order[where[k]];
            cut_mask(w->m1, w->m2, w->nx, w->ny, so->x0 - 1, so->y0 - 1, w->S, w->mtmp[0]);
            st = hilal_h5_write_rows(w->ar->d_mask, H5T_NATIVE_UINT16, row, 1, w->mtmp[0], err);
            continue;
        }
        hsize_t off[3] = {row, 0, 0};
        const unsigned char *data =
            w->zarena_of[k] == ZERO_STAMP ? w->zero : w->arena[w->zarena_of[k]].buf + w->zoff[k];
        if (H5Dwrite_chunk(w->ar->d_mask, H5P_DEFAULT, 0, off, w->zlen[k], data) < 0)
            st = hilal_h5_error(err, "cannot write the mask stamp of row %llu",
                                (unsigned long long)row);
    }
    free(where);
    return st;
}

/* Cuts and writes every stamp of the frame: the first task cut by all
 * threads, then each task written while the next one is cut and mask
 * stamps compressed; then the mask stamps left, by all threads, and their
 * chunks. The writes (the kernel copying into its page cache) overlap all
 * the cutting and compression. */
static hilal_status write_stamps(stamp_writer *w, int threads, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const size_t ntasks = w->nblocks * (size_t)w->nplanes;
    if (ntasks == 0)
        return HILAL_OK;
    hilal_parallel_for(threads, (long)(w->bstart[1] - w->bstart[0]), first_range, w);
    for (size_t t = 0; t < ntasks && st == HILAL_OK; t++) {
        stamp_step step = {w, t, ntasks, HILAL_OK, err};
        w->writing = 1;
        hilal_parallel_for(threads, 2, step_task, &step);
        st = step.st;
    }
    if (st == HILAL_OK && w->level >= 0) {
        hilal_parallel_for(threads, threads, mask_range, w);
        st = write_masks(w, err);
    }
    return st;
}

/* Association into objects (schema 2): each candidate row joins the nearest
 * object within the radius or starts one; its position error (from the
 * pixel scale, NaN when unknown) sets its weight in the object's mean
 * position (associate.h). Rows keep a finite pos_err_arcsec they have. */
static hilal_status associate_rows(hilal_archive *ar, hilal_archive_cand *rows, size_t n,
                                   double scale_arcsec, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    for (size_t i = 0; i < n; i++) {
        hilal_archive_cand *r = &rows[i];
        if (!(r->pos_err_arcsec > 0) || !isfinite(r->pos_err_arcsec))
            r->pos_err_arcsec = hilal_assoc_pos_err_arcsec(r->fwhm, r->snr, scale_arcsec);
        r->object_id = r->prev_cand_id = 0;
    }
    if (ar->assoc == NULL)
        return HILAL_OK;
    for (size_t i = 0; i < n && st == HILAL_OK; i++) {
        hilal_archive_cand *r = &rows[i];
        if (!isfinite(r->ra) || !isfinite(r->dec))
            continue;
        int64_t id = hilal_assoc_match(ar->assoc, r->ra, r->dec, NULL);
        r->object_id = hilal_assoc_add(ar->assoc, id, r->ra, r->dec, r->pos_err_arcsec, r->snr,
                                       r->mjd, r->cand_id, &r->prev_cand_id);
        if (r->object_id == 0)
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the object catalogue");
        else
            st = touch_object(ar, r->object_id, err);
    }
    return st;
}

/* After a commit: withdraws the detections of the replaced frame row `old`
 * (-1: none) from their objects, then mirrors the touched objects into
 * /objects and records that /objects reflects every frame row. A crash
 * before objects_applied is written makes the next writer rebuild /objects;
 * a failure here makes this writer rebuild it before the next frame. */
static hilal_status objects_after_commit(hilal_archive *ar, int64_t old, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    if (ar->assoc == NULL)
        return HILAL_OK;
    if (old >= 0 && ar->frames[old].n_candidates > 0) {
        size_t no = (size_t)ar->frames[old].n_candidates;
        hilal_archive_cand *orows = malloc(no * sizeof *orows);
        if (orows == NULL)
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        else
            st = hilal_h5_read_rows(ar->d_cand, ar->t_cand,
                                    (hsize_t)(ar->frames[old].first_cand_id - 1), no, orows, err);
        for (size_t i = 0; i < no && st == HILAL_OK; i++)
            if (orows[i].object_id > 0) {
                st = touch_object(ar, orows[i].object_id, err);
                if (st == HILAL_OK)
                    st = recompute_object(ar, orows[i].object_id, err);
            }
        free(orows);
    }
    if (st == HILAL_OK)
        st = write_touched_objects(ar, err);
    if (st == HILAL_OK)
        st = write_objects_applied(ar, (int64_t)ar->nframes, err);
    if (st != HILAL_OK)
        ar->assoc_dirty = 1;
    return st;
}

/* Writes the candidate rows [start, start + n) (valid = 0 until the commit)
 * and their stamps. */
static hilal_status write_candidates(hilal_archive *ar, const hilal_frame *frame, int32_t run_id,
                                     int64_t frame_id, size_t frame_row, int64_t start,
                                     hilal_error *err)
{
    hilal_status st = HILAL_OK;
    const hilal_image *sci = frame->sci, *ref = frame->ref;
    const hilal_diff *d = &frame->diff;
    size_t n = frame->ncands;
    int S = ar->cutout_size, half = S / 2;
    long nx = sci->nx, ny = sci->ny;
    const size_t SS = (size_t)S * (size_t)S, R = block_rows(S);
    const int level = mask_direct_level(ar);
    /* Blocks of at most R candidates, their file rows starting at
     * multiples of R (whole chunks), but the first. */
    size_t nblocks = 0;
    for (size_t b = 0; b < n; b += R - ((size_t)start + b) % R)
        nblocks++;
    hilal_archive_cand *rows = calloc(n > 0 ? n : 1, sizeof *rows);
    stamp_order *order = malloc((n > 0 ? n : 1) * sizeof *order);
    size_t *bstart = malloc((nblocks + 1) * sizeof *bstart);
    const size_t R1 = R < n ? R : (n > 0 ? n : 1);
    void *bufs[2] = {malloc(R1 * SS * sizeof(float)), malloc(R1 * SS * sizeof(float))};
    size_t *zoff = level >= 0 ? malloc((n > 0 ? n : 1) * sizeof *zoff) : NULL;
    size_t *zlen = level >= 0 ? malloc((n > 0 ? n : 1) * sizeof *zlen) : NULL;
    unsigned char *zarena_of = level >= 0 ? malloc(n > 0 ? n : 1) : NULL;
    uint16_t *mtmp = malloc(2 * SS * sizeof *mtmp);
    unsigned char *stmp = malloc(2 * 2 * SS);
    unsigned char *zero = level >= 0 ? malloc((size_t)compressBound((uLong)(2 * SS))) : NULL;
    stamp_writer w;
    memset(&w, 0, sizeof w);
    if (rows == NULL || order == NULL || bstart == NULL || bufs[0] == NULL || bufs[1] == NULL ||
        (level >= 0 && (zoff == NULL || zlen == NULL || zarena_of == NULL)) || mtmp == NULL ||
        stmp == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %zu candidates", n);
        goto cleanup;
    }
    /* Planes in science-grid geometry; a plane of another size is unusable. */
    int ref_ok = ref != NULL && ref->nx == nx && ref->ny == ny;
    int diff_ok = (frame->products & HILAL_PROD_DIFFERENCE) && d->nx == nx && d->ny == ny;
    const float *src[HILAL_ARCHIVE_NFLOAT_PLANES] = {
        sci->pix, ref_ok ? ref->pix : NULL, diff_ok ? d->d : NULL, diff_ok ? d->scorr : NULL,
        sci->var};
    const hilal_mask_t *m1 = diff_ok && d->mask ? d->mask : sci->mask;
    const hilal_mask_t *m2 = diff_ok && d->mask ? NULL : (ref_ok ? ref->mask : NULL);

    /* The rows. */
    for (size_t i = 0; i < n; i++) {
        const hilal_candidate *c = &frame->cands[i];
        hilal_archive_cand *r = &rows[i];
        r->cand_id = start + (int64_t)i + 1;
        r->frame_id = frame_id;
        r->x = c->x;
        r->y = c->y;
        r->ra = c->ra;
        r->dec = c->dec;
        r->snr = c->snr;
        r->flux = c->flux;
        r->flux_err = c->flux_err;
        r->mag = c->mag;
        r->mag_err = c->mag_err;
        r->fwhm = c->fwhm;
        r->elongation = c->elongation;
        r->rb = c->rb;
        r->flags = c->flags;
        r->mjd = isfinite(c->mjd) ? c->mjd : sci->meta.mjd;
        r->sharpness = c->sharpness;
        r->neg_frac = c->neg_frac;
        r->dipole = c->dipole;
        r->dist_sat_px = c->dist_sat_px;
        r->dist_mask_px = c->dist_mask_px;
        r->masked_frac = c->masked_frac;
        r->run_id = run_id;
        r->frame_row = (int64_t)frame_row;
        r->valid = 0;
        /* Stamp centred on the pixel holding the candidate: FITS x maps to
         * 0-based x - 1, whose nearest pixel is floor(x - 0.5). */
        long cx = isfinite(c->x) ? (long)floor(c->x - 0.5) : -4L * S;
        long cy = isfinite(c->y) ? (long)floor(c->y - 0.5) : -4L * S;
        long x0 = cx - half, y0 = cy - half;
        r->stamp_x0 = (int32_t)(x0 + 1);
        r->stamp_y0 = (int32_t)(y0 + 1);
        if (x0 < 0 || y0 < 0 || x0 + S > nx || y0 + S > ny)
            r->flags |= HILAL_CAND_EDGE;
        r->pos_err_arcsec = NAN;
    }
    double scale = sci->meta.wcs != NULL
                       ? hilal_wcs_pixscale_arcsec(sci->meta.wcs, 0.5 * (double)(nx + 1),
                                                   0.5 * (double)(ny + 1))
                       : NAN;
    st = associate_rows(ar, rows, n, scale, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* Extend every stack once, then fill it block by block. */
    hid_t stacks[HILAL_ARCHIVE_NFLOAT_PLANES + 1];
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES; p++)
        stacks[p] = ar->d_cut[p];
    stacks[HILAL_ARCHIVE_NFLOAT_PLANES] = ar->d_mask;
    for (int p = 0; p <= HILAL_ARCHIVE_NFLOAT_PLANES && st == HILAL_OK; p++) {
        hsize_t have;
        st = hilal_h5_nrows(stacks[p], 0, &have, err);
        if (st == HILAL_OK && have < (hsize_t)start + n)
            st = hilal_h5_set_nrows(stacks[p], (hsize_t)start + n, err);
    }
    /* The stamps, block by block, each block's in order of their first row. */
    nblocks = 0;
    bstart[0] = 0;
    for (size_t b = 0; b < n; nblocks++) {
        size_t e = b + R - ((size_t)start + b) % R;
        if (e > n)
            e = n;
        for (size_t k = b; k < e; k++)
            order[k] = (stamp_order){rows[k].stamp_y0, rows[k].stamp_x0, k};
        qsort(order + b, e - b, sizeof *order, stamp_order_cmp);
        bstart[nblocks + 1] = b = e;
    }
    w = (stamp_writer){.ar = ar, .m1 = m1, .m2 = m2, .nx = nx, .ny = ny, .S = S,
                       .row0 = (hsize_t)start, .n = n, .order = order, .bstart = bstart,
                       .nblocks = nblocks, .buf = {bufs[0], bufs[1]}, .level = level,
                       .zcap = (size_t)compressBound((uLong)(2 * SS)), .zoff = zoff,
                       .zlen = zlen, .zarena_of = zarena_of, .mtmp = {mtmp, mtmp + SS},
                       .stmp = {stmp, stmp + 2 * SS}};
    w.nplanes = HILAL_ARCHIVE_NFLOAT_PLANES + (level < 0);
    memcpy(w.src, src, sizeof src);
    if (level >= 0 && zero != NULL) {
        /* The all-zero mask stamp, shuffled (still zeros) and deflated. */
        uLongf len = (uLongf)w.zcap;
        memset(stmp, 0, 2 * SS);
        if (compress2(zero, &len, stmp, (uLong)(2 * SS), level) == Z_OK) {
            w.zero = zero;
            w.zero_len = (size_t)len;
        }
    }
    if (st == HILAL_OK)
        st = write_stamps(&w, archive_threads(), err);
    if (st == HILAL_OK)
        st = hilal_h5_write_rows(ar->d_cand, ar->t_cand, (hsize_t)start, n, rows, err);
cleanup:
    free(rows);
    free(order);
    free(bstart);
    free(bufs[0]);
    free(bufs[1]);
    free(zoff);
    free(zlen);
    free(zarena_of);
    free(w.arena[0].buf);
    free(w.arena[1].buf);
    free(mtmp);
    free(stmp);
    free(zero);
    return st;
}

/* Makes room for one more frame row in memory. */
static hilal_status reserve_frame(hilal_archive *ar, hilal_error *err)
{
    if (ar->nframes < ar->frames_cap)
        return HILAL_OK;
    size_t cap = ar->frames_cap * 2 + 16;
    hilal_archive_frame *p = realloc(ar->frames, cap * sizeof *p);
    if (p == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    ar->frames = p;
    ar->frames_cap = cap;
    return HILAL_OK;
}

static int run_known(const hilal_archive *ar, int32_t run_id)
{
    for (size_t i = 0; i < ar->nruns; i++)
        if (ar->runs[i].run_id == run_id)
            return 1;
    return 0;
}

/* Under the lock, before a frame row is added: the run must have begun,
 * and there must be room for one more row. */
static hilal_status frame_row_ready(hilal_archive *ar, int32_t run_id, hilal_error *err)
{
    if (!run_known(ar, run_id))
        return hilal_error_set(err, HILAL_ERR_USAGE, "run %d was not begun in archive %s",
                               (int)run_id, ar->path);
    return reserve_frame(ar, err);
}

/* The row of the committed frame that a new commit of frame_id in run_id
 * replaces (the last one), or -1 when there is none. */
static int64_t replaced_frame_row(const hilal_archive *ar, int64_t frame_id, int32_t run_id)
{
    for (size_t i = ar->nframes; i-- > 0;)
        if (ar->frames[i].status == HILAL_ARCHIVE_FRAME_COMMITTED &&
            ar->frames[i].frame_id == frame_id && ar->frames[i].run_id == run_id)
            return (int64_t)i;
    return -1;
}

/* After a frame failed before its commit: the next frame overwrites the
 * /text bytes it wrote, and the object catalogue, which may hold its
 * detections, is rebuilt before the next commit. */
static void forget_uncommitted(hilal_archive *ar, int64_t text_before)
{
    ar->text_end = text_before;
    ar->assoc_dirty = ar->assoc != NULL;
}

/* Steps 2 to 4 of adding a frame, once everything its row points at (its
 * header text, PSF rows, stamps and candidate rows start .. start + ncands - 1)
 * is written and flushed:
 *   2. the commit: the frame row at row frow, flushed; on failure the frame
 *      is forgotten (forget_uncommitted);
 *   3. convenience flags for readers that do not apply the rule: the new
 *      rows become valid when the frame is committed, the replaced frame
 *      (row old, -1: none) and its rows superseded. A crash here is
 *      repaired by the next writer (load_writer_state);
 *   4. the objects (schema 2). */
static hilal_status commit_frame(hilal_archive *ar, const hilal_archive_frame *row, size_t frow,
                                 int64_t start, int64_t ncands, int64_t old, int64_t text_before,
                                 hilal_error *err)
{
    hilal_status st = hilal_h5_write_rows(ar->d_frames, ar->t_frame, frow, 1, row, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    if (st != HILAL_OK) {
        forget_uncommitted(ar, text_before);
        return st;
    }
    ar->frames[ar->nframes++] = *row;
    ar->cand_end = start + ncands;

    if (row->status == HILAL_ARCHIVE_FRAME_COMMITTED)
        st = write_valid_range(ar, start, ncands, 1, err);
    if (st == HILAL_OK && old >= 0) {
        st = write_frame_status(ar, (size_t)old, HILAL_ARCHIVE_FRAME_SUPERSEDED, err);
        if (st == HILAL_OK)
            st = write_valid_range(ar, ar->frames[old].first_cand_id - 1,
                                   ar->frames[old].n_candidates, 0, err);
    }
    if (st == HILAL_OK)
        st = objects_after_commit(ar, old, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    return st;
}

hilal_status hilal_archive_append_frame(hilal_archive *ar, int32_t run_id,
                                        const hilal_frame *frame, hilal_archive_commit *out,
                                        hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive_frame row;
    int64_t old = -1, start;
    size_t frow;
    if (!ar->writable)
        return hilal_error_set(err, HILAL_ERR_USAGE, "archive %s was opened read-only", ar->path);
    if (frame->sci == NULL || frame->sci->pix == NULL)
        return hilal_error_set(err, HILAL_ERR_DATA, "frame %s has no science image to archive",
                               frame->frame_id);
    if (frame->ncands > 0 && frame->cands == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "frame %s: %zu candidates but no array",
                               frame->frame_id, frame->ncands);
    if (frame->ncands > (size_t)INT32_MAX)
        return hilal_error_set(err, HILAL_ERR_RANGE, "frame %s has too many candidates (%zu)",
                               frame->frame_id, frame->ncands);
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = frame_row_ready(ar, run_id, err);
    if (st == HILAL_OK && ar->assoc != NULL && ar->assoc_dirty)
        st = rebuild_objects(ar, err);
    if (st != HILAL_OK)
        goto cleanup;
    ar->ntouched = 0;

    fill_frame_row(frame, run_id, &row);
    frow = ar->nframes;
    start = ar->cand_end;
    row.status = HILAL_ARCHIVE_FRAME_COMMITTED;
    row.valid = 1;
    row.n_candidates = (int32_t)frame->ncands;
    row.first_cand_id = start + 1;
    old = replaced_frame_row(ar, row.frame_id, run_id);

    /* 1. Everything the frame row will point at. */
    const hilal_meta *meta = &frame->sci->meta;
    size_t hlen = meta->header != NULL ? strlen(meta->header) : 0;
    int64_t text_before = ar->text_end;
    st = append_text(ar, meta->header, hlen, &row.header_offset, err);
    row.header_length = (int64_t)hlen;
    if (st == HILAL_OK)
        st = write_psfs(ar, frame, frow, err);
    if (st == HILAL_OK)
        st = write_candidates(ar, frame, run_id, row.frame_id, frow, start, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    if (st != HILAL_OK) {
        forget_uncommitted(ar, text_before);
        goto cleanup;
    }
    /* 2 to 4: the commit, then the flags and objects that follow it. */
    row.written_unix = unix_now();
    st = commit_frame(ar, &row, frow, start, (int64_t)frame->ncands, old, text_before, err);
    if (st == HILAL_OK && out != NULL) {
        out->frame_id = row.frame_id;
        out->frame_row = (int64_t)frow;
        out->first_cand_id = row.first_cand_id;
        out->ncands = frame->ncands;
        out->replaced_frame_row = old;
    }
cleanup:
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s, frame %s", ar->path, frame->frame_id);
    return st;
}

hilal_status hilal_archive_record_failure(hilal_archive *ar, int32_t run_id,
                                          const hilal_frame *frame, const char *message,
                                          hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive_frame row;
    hilal_frame empty;
    if (!ar->writable)
        return hilal_error_set(err, HILAL_ERR_USAGE, "archive %s was opened read-only", ar->path);
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = frame_row_ready(ar, run_id, err);
    if (st != HILAL_OK)
        goto cleanup;
    fill_frame_row(frame, run_id, &row);
    row.status = HILAL_ARCHIVE_FRAME_FAILED;
    row.valid = 0;
    row.n_candidates = 0;
    row.first_cand_id = ar->cand_end + 1;
    row.header_offset = ar->text_end;
    snprintf(row.message, sizeof row.message, "%s", message != NULL ? message : "");
    /* PSF rows stay aligned with /frames: NaN boxes. */
    hilal_frame_init(&empty);
    st = write_psfs(ar, &empty, ar->nframes, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    if (st == HILAL_OK)
        st = hilal_h5_write_rows(ar->d_frames, ar->t_frame, ar->nframes, 1, &row, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    if (st == HILAL_OK)
        ar->frames[ar->nframes++] = row;
    /* Objects are unchanged by a failed frame; they reflect one more row. */
    if (st == HILAL_OK && ar->assoc != NULL) {
        ar->ntouched = 0;
        st = objects_after_commit(ar, -1, err);
        if (st == HILAL_OK)
            st = flush(ar, err);
    }
cleanup:
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s, frame %s", ar->path, frame->frame_id);
    return st;
}

/* ------------------------------------------------------------------------
 * Reading
 * ------------------------------------------------------------------------ */

/* Reads every /frames row (and the current flags) under the lock. */
static hilal_status load_frames(hilal_archive *ar, hilal_archive_frame **rows, size_t *n,
                                unsigned char **cur, hilal_error *err)
{
    hsize_t nf = 0;
    hilal_status st;
    *rows = NULL;
    *n = 0;
    if (cur != NULL)
        *cur = NULL;
    st = hilal_h5_nrows(ar->d_frames, !ar->writable, &nf, err);
    if (st != HILAL_OK)
        return st;
    hilal_archive_frame *r = calloc(nf > 0 ? nf : 1, sizeof *r);
    unsigned char *c = calloc(nf > 0 ? nf : 1, 1);
    if (r == NULL || c == NULL) {
        free(r);
        free(c);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    }
    st = hilal_h5_read_rows(ar->d_frames, ar->t_frame, 0, nf, r, err);
    if (st == HILAL_OK)
        st = compute_current(r, nf, c, err);
    if (st != HILAL_OK) {
        free(r);
        free(c);
        return st;
    }
    *rows = r;
    *n = nf;
    if (cur != NULL)
        *cur = c;
    else
        free(c);
    return HILAL_OK;
}

hilal_status hilal_archive_read_frames(hilal_archive *ar, hilal_archive_frame **rows, size_t *n,
                                       unsigned char **current, hilal_error *err)
{
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    hilal_status st = load_frames(ar, rows, n, current, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s", ar->path);
    return st;
}

hilal_status hilal_archive_read_runs(hilal_archive *ar, hilal_archive_run **runs, size_t *n,
                                     hilal_error *err)
{
    hsize_t nr = 0;
    hilal_status st;
    *runs = NULL;
    *n = 0;
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = hilal_h5_nrows(ar->d_runs, !ar->writable, &nr, err);
    hilal_archive_run *r = st == HILAL_OK ? calloc(nr > 0 ? nr : 1, sizeof *r) : NULL;
    if (st == HILAL_OK && r == NULL)
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    if (st == HILAL_OK)
        st = hilal_h5_read_rows(ar->d_runs, ar->t_run, 0, nr, r, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK) {
        free(r);
        hilal_error_context(err, "archive %s", ar->path);
        return st;
    }
    /* Rows not yet filled by a live writer read as run_id 0. */
    size_t m = 0;
    for (size_t i = 0; i < nr; i++)
        if (r[i].run_id > 0)
            r[m++] = r[i];
    *runs = r;
    *n = m;
    return HILAL_OK;
}

hilal_status hilal_archive_read_text(hilal_archive *ar, int64_t offset, int64_t length,
                                     char **text, hilal_error *err)
{
    hsize_t nt = 0;
    hilal_status st;
    *text = NULL;
    if (offset < 0 || length < 0)
        return hilal_error_set(err, HILAL_ERR_RANGE, "bad text range %lld+%lld", (long long)offset,
                               (long long)length);
    char *t = malloc((size_t)length + 1);
    if (t == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = hilal_h5_nrows(ar->d_text, !ar->writable, &nt, err);
    if (st == HILAL_OK && (hsize_t)(offset + length) > nt)
        st = hilal_error_set(err, HILAL_ERR_FORMAT, "text range %lld+%lld is beyond /text (%llu bytes)",
                             (long long)offset, (long long)length, (unsigned long long)nt);
    if (st == HILAL_OK)
        st = hilal_h5_read_rows(ar->d_text, H5T_NATIVE_UCHAR, (hsize_t)offset, (hsize_t)length, t, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK) {
        free(t);
        hilal_error_context(err, "archive %s", ar->path);
        return st;
    }
    t[length] = '\0';
    *text = t;
    return HILAL_OK;
}

/* Great-circle distance in degrees (haversine form, accurate at small
 * separations). */
static double sky_dist_deg(double ra1, double dec1, double ra2, double dec2)
{
    const double d2r = M_PI / 180.0;
    double sdd = sin(0.5 * (dec2 - dec1) * d2r), sdr = sin(0.5 * (ra2 - ra1) * d2r);
    double h = sdd * sdd + cos(dec1 * d2r) * cos(dec2 * d2r) * sdr * sdr;
    return 2.0 * asin(sqrt(h < 1 ? h : 1)) / d2r;
}

static int matches(const hilal_archive_filter *q, const hilal_archive_cand *c,
                   const hilal_archive_frame *f)
{
    if (q->use_cone && !(isfinite(c->ra) && isfinite(c->dec) &&
                         sky_dist_deg(q->ra_deg, q->dec_deg, c->ra, c->dec) * 3600.0 <= q->radius_arcsec))
        return 0;
    if (!isnan(q->mjd_min) && !(c->mjd >= q->mjd_min))
        return 0;
    if (!isnan(q->mjd_max) && !(c->mjd <= q->mjd_max))
        return 0;
    if (!isnan(q->snr_min) && !(fabs(c->snr) >= q->snr_min))
        return 0;
    if (q->sign > 0 && !(c->snr > 0))
        return 0;
    if (q->sign < 0 && !(c->snr < 0))
        return 0;
    if (!isnan(q->rb_min) && !(c->rb >= q->rb_min))
        return 0;
    if (q->flags_any != 0 && (c->flags & q->flags_any) == 0)
        return 0;
    if ((c->flags & q->flags_none) != 0)
        return 0;
    if (q->frame_id != 0 && c->frame_id != q->frame_id)
        return 0;
    if (q->frame_name != NULL && strcmp(f->frame_name, q->frame_name) != 0)
        return 0;
    if (q->run_id != 0 && c->run_id != q->run_id)
        return 0;
    return 1;
}

hilal_status hilal_archive_query(hilal_archive *ar, const hilal_archive_filter *q,
                                 hilal_archive_cand **rows, size_t *n, hilal_error *err)
{
    hilal_status st;
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    hilal_archive_cand *all = NULL;
    size_t nf = 0, m = 0;
    hsize_t nc = 0;
    int64_t end = 0;
    hilal_archive_filter none;
    *rows = NULL;
    *n = 0;
    if (q == NULL) {
        hilal_archive_filter_init(&none);
        q = &none;
    }
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    /* Frames first: any frame committed by now has its candidates on disk. */
    st = load_frames(ar, &frames, &nf, &cur, err);
    if (st != HILAL_OK)
        goto cleanup;
    for (size_t i = 0; i < nf; i++)
        if (frames[i].status != HILAL_ARCHIVE_FRAME_NONE &&
            frames[i].first_cand_id - 1 + frames[i].n_candidates > end)
            end = frames[i].first_cand_id - 1 + frames[i].n_candidates;
    st = hilal_h5_nrows(ar->d_cand, !ar->writable, &nc, err);
    if (st != HILAL_OK)
        goto cleanup;
    if ((hsize_t)end > nc) {
        st = hilal_error_set(err, HILAL_ERR_FORMAT, "committed frames reference %lld candidates but "
                             "/candidates has %llu rows", (long long)end, (unsigned long long)nc);
        goto cleanup;
    }
    all = malloc((end > 0 ? (size_t)end : 1) * sizeof *all);
    if (all == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    st = hilal_h5_read_rows(ar->d_cand, ar->t_cand, 0, (hsize_t)end, all, err);
    if (st != HILAL_OK)
        goto cleanup;
    fix_v1_rows(ar, all, (size_t)end);
    /* Walk frame by frame: a candidate belongs to the frame whose range
     * holds its row (rows of uncommitted frames are in no range). */
    for (size_t i = 0; i < nf; i++) {
        const hilal_archive_frame *f = &frames[i];
        if (f->status == HILAL_ARCHIVE_FRAME_NONE || f->status == HILAL_ARCHIVE_FRAME_FAILED)
            continue;
        if (!cur[i] && !q->include_superseded)
            continue;
        for (int64_t k = f->first_cand_id - 1; k < f->first_cand_id - 1 + f->n_candidates; k++) {
            hilal_archive_cand *c = &all[k];
            if (c->frame_row != (int64_t)i)
                continue; /* cannot happen in a sound archive */
            c->valid = cur[i];
            if (matches(q, c, f))
                all[m++] = *c;
        }
    }
    /* Frames are in row order and their ranges ascend, so `all` is sorted
     * by cand_id already. */
cleanup:
    pthread_mutex_unlock(&ar->mutex);
    free(frames);
    free(cur);
    if (st != HILAL_OK || m == 0) {
        free(all);
        all = NULL;
        m = 0;
    }
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s", ar->path);
    *rows = all;
    *n = m;
    return st;
}

/* Locked part of get_candidate. */
static hilal_status find_candidate(hilal_archive *ar, int64_t cand_id, hilal_archive_cand *cand,
                                   hilal_archive_frame *frame, int *current, hilal_error *err)
{
    hilal_status st;
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    size_t nf = 0;
    hilal_archive_cand c;
    st = load_frames(ar, &frames, &nf, &cur, err);
    if (st != HILAL_OK)
        return st;
    /* The frame whose range holds the row. */
    size_t fi = nf;
    for (size_t i = 0; i < nf; i++)
        if ((frames[i].status == HILAL_ARCHIVE_FRAME_COMMITTED ||
             frames[i].status == HILAL_ARCHIVE_FRAME_SUPERSEDED) &&
            cand_id >= frames[i].first_cand_id &&
            cand_id < frames[i].first_cand_id + frames[i].n_candidates)
            fi = i;
    if (fi == nf) {
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND,
                             "no candidate %lld in a committed frame; `hilal query %s` lists them",
                             (long long)cand_id, ar->path);
        goto cleanup;
    }
    st = hilal_h5_read_rows(ar->d_cand, ar->t_cand, (hsize_t)(cand_id - 1), 1, &c, err);
    if (st != HILAL_OK)
        goto cleanup;
    fix_v1_rows(ar, &c, 1);
    c.valid = cur[fi];
    if (cand != NULL)
        *cand = c;
    if (frame != NULL)
        *frame = frames[fi];
    if (current != NULL)
        *current = cur[fi];
cleanup:
    free(frames);
    free(cur);
    return st;
}

hilal_status hilal_archive_get_candidate(hilal_archive *ar, int64_t cand_id,
                                         hilal_archive_cand *cand, hilal_archive_frame *frame,
                                         int *current, hilal_error *err)
{
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    hilal_status st = find_candidate(ar, cand_id, cand, frame, current, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s", ar->path);
    return st;
}

hilal_status hilal_archive_read_candidates(hilal_archive *ar, int64_t first_cand_id, size_t n,
                                           hilal_archive_cand **rows, hilal_error *err)
{
    hsize_t nc = 0;
    hilal_archive_cand *r = NULL;
    *rows = NULL;
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    hilal_status st = hilal_h5_nrows(ar->d_cand, !ar->writable, &nc, err);
    if (st == HILAL_OK && (first_cand_id < 1 || (hsize_t)(first_cand_id - 1) + n > nc))
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND, "candidates %lld..%lld are not all in the "
                             "archive (%llu rows)", (long long)first_cand_id,
                             (long long)(first_cand_id + (int64_t)n - 1), (unsigned long long)nc);
    if (st == HILAL_OK && (r = calloc(n > 0 ? n : 1, sizeof *r)) == NULL)
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    if (st == HILAL_OK && n > 0)
        st = hilal_h5_read_rows(ar->d_cand, ar->t_cand, (hsize_t)(first_cand_id - 1), n, r, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK) {
        free(r);
        hilal_error_context(err, "archive %s", ar->path);
        return st;
    }
    fix_v1_rows(ar, r, n);
    *rows = r;
    return HILAL_OK;
}

static hilal_status need_objects(const hilal_archive *ar, hilal_error *err)
{
    if (ar->schema_version < 2)
        return hilal_error_set(err, HILAL_ERR_NOTFOUND,
                               "archive %s has schema version %d, which keeps no objects; "
                               "objects start with schema 2 (a new archive)", ar->path,
                               ar->schema_version);
    return HILAL_OK;
}

hilal_status hilal_archive_read_objects(hilal_archive *ar, hilal_archive_object **rows, size_t *n,
                                        hilal_error *err)
{
    hsize_t no = 0;
    hilal_archive_object *r = NULL;
    *rows = NULL;
    *n = 0;
    hilal_status st = need_objects(ar, err);
    if (st != HILAL_OK)
        return st;
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = hilal_h5_nrows(ar->d_objects, !ar->writable, &no, err);
    if (st == HILAL_OK && no > 0 && (r = malloc(no * sizeof *r)) == NULL)
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    if (st == HILAL_OK && no > 0)
        st = hilal_h5_read_rows(ar->d_objects, ar->t_object, 0, no, r, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK) {
        free(r);
        hilal_error_context(err, "archive %s", ar->path);
        return st;
    }
    *rows = r;
    *n = no;
    return HILAL_OK;
}

hilal_status hilal_archive_get_object(hilal_archive *ar, int64_t object_id,
                                      hilal_archive_object *obj, hilal_error *err)
{
    hsize_t no = 0;
    hilal_status st = need_objects(ar, err);
    if (st != HILAL_OK)
        return st;
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = hilal_h5_nrows(ar->d_objects, !ar->writable, &no, err);
    if (st == HILAL_OK && (object_id < 1 || (hsize_t)object_id > no))
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND, "no object %lld (the archive has %llu)",
                             (long long)object_id, (unsigned long long)no);
    if (st == HILAL_OK)
        st = hilal_h5_read_rows(ar->d_objects, ar->t_object, (hsize_t)(object_id - 1), 1, obj, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s", ar->path);
    return st;
}

/* Locked part of object_history: walks the prev_cand_id chain from `from`
 * back to the first detection. */
static hilal_status walk_history(hilal_archive *ar, int64_t object_id, int64_t from,
                                 hilal_archive_cand **out, size_t *nout, hilal_error *err)
{
    hilal_status st;
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    hilal_archive_cand *h = NULL;
    size_t nf = 0, n = 0, cap = 0;
    hsize_t nc = 0;
    st = load_frames(ar, &frames, &nf, &cur, err);
    if (st == HILAL_OK)
        st = hilal_h5_nrows(ar->d_cand, !ar->writable, &nc, err);
    for (int64_t id = from; id > 0 && st == HILAL_OK;) {
        hilal_archive_cand c;
        if ((hsize_t)id > nc) {
            st = hilal_error_set(err, HILAL_ERR_FORMAT, "object %lld links to candidate %lld past "
                                 "the end of /candidates", (long long)object_id, (long long)id);
            break;
        }
        st = hilal_h5_read_rows(ar->d_cand, ar->t_cand, (hsize_t)(id - 1), 1, &c, err);
        if (st != HILAL_OK)
            break;
        if (c.object_id != object_id || c.prev_cand_id >= id) {
            st = hilal_error_set(err, HILAL_ERR_FORMAT, "candidate %lld is not a detection of "
                                 "object %lld or links forward", (long long)id, (long long)object_id);
            break;
        }
        /* Current: its frame row is current and holds it (a row of a frame
         * not yet committed is in no frame's range). */
        int current = c.frame_row >= 0 && (size_t)c.frame_row < nf && cur[c.frame_row] &&
                      id >= frames[c.frame_row].first_cand_id &&
                      id < frames[c.frame_row].first_cand_id + frames[c.frame_row].n_candidates;
        /* Newest first: a frame already seen was processed again later. */
        for (size_t k = 0; k < n && current; k++)
            if (h[k].frame_id == c.frame_id)
                current = 0;
        if (current) {
            if (n == cap) {
                cap = cap * 2 + 16;
                hilal_archive_cand *p = realloc(h, cap * sizeof *p);
                if (p == NULL) {
                    st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
                    break;
                }
                h = p;
            }
            c.valid = 1;
            h[n++] = c;
        }
        id = c.prev_cand_id;
    }
    free(frames);
    free(cur);
    if (st != HILAL_OK) {
        free(h);
        return st;
    }
    /* Oldest first. */
    for (size_t i = 0; i < n / 2; i++) {
        hilal_archive_cand t = h[i];
        h[i] = h[n - 1 - i];
        h[n - 1 - i] = t;
    }
    *out = h;
    *nout = n;
    return HILAL_OK;
}

hilal_status hilal_archive_object_history(hilal_archive *ar, int64_t object_id, int64_t upto,
                                          hilal_archive_cand **rows, size_t *n, hilal_error *err)
{
    hilal_archive_object obj;
    *rows = NULL;
    *n = 0;
    hilal_status st = upto > 0 ? need_objects(ar, err)
                               : hilal_archive_get_object(ar, object_id, &obj, err);
    if (st != HILAL_OK)
        return st;
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = walk_history(ar, object_id, upto > 0 ? upto : obj.last_cand_id, rows, n, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK)
        hilal_error_context(err, "archive %s, history of object %lld", ar->path,
                            (long long)object_id);
    return st;
}

void hilal_archive_cutout_clear(hilal_archive_cutout *c)
{
    if (c == NULL)
        return;
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES; p++)
        free(c->plane[p]);
    free(c->mask);
    memset(c, 0, sizeof *c);
}

hilal_status hilal_archive_read_cutout(hilal_archive *ar, int64_t cand_id,
                                       hilal_archive_cutout *out, hilal_error *err)
{
    hilal_status st;
    size_t SS = (size_t)ar->cutout_size * (size_t)ar->cutout_size;
    memset(out, 0, sizeof *out);
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = find_candidate(ar, cand_id, NULL, NULL, NULL, err);
    if (st != HILAL_OK)
        goto cleanup;
    out->size = ar->cutout_size;
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES; p++)
        out->plane[p] = malloc(SS * sizeof(float));
    out->mask = malloc(SS * sizeof(uint16_t));
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES; p++)
        if (out->plane[p] == NULL)
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    if (out->mask == NULL)
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES && st == HILAL_OK; p++) {
        if (!ar->writable && H5Drefresh(ar->d_cut[p]) < 0)
            st = hilal_h5_error(err, "cannot refresh /cutouts/%s", plane_names[p]);
        if (st == HILAL_OK)
            st = hilal_h5_read_rows(ar->d_cut[p], H5T_NATIVE_FLOAT, (hsize_t)(cand_id - 1), 1,
                                    out->plane[p], err);
    }
    if (st == HILAL_OK && !ar->writable && H5Drefresh(ar->d_mask) < 0)
        st = hilal_h5_error(err, "cannot refresh /cutouts/mask");
    if (st == HILAL_OK)
        st = hilal_h5_read_rows(ar->d_mask, H5T_NATIVE_UINT16, (hsize_t)(cand_id - 1), 1, out->mask, err);
cleanup:
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK) {
        hilal_archive_cutout_clear(out);
        hilal_error_context(err, "archive %s, candidate %lld", ar->path, (long long)cand_id);
    }
    return st;
}

hilal_status hilal_archive_read_psf(hilal_archive *ar, int64_t frame_row, int which,
                                    float **data, int *size, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hsize_t nr = 0;
    *data = NULL;
    *size = 0;
    if (which < 0 || which > 2)
        return hilal_error_set(err, HILAL_ERR_RANGE, "PSF %d: use 0 (science), 1 (reference) or 2 (difference)", which);
    float *d = malloc((size_t)ar->psf_size * (size_t)ar->psf_size * sizeof *d);
    if (d == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = hilal_h5_nrows(ar->d_psf[which], !ar->writable, &nr, err);
    if (st == HILAL_OK && (frame_row < 0 || (hsize_t)frame_row >= nr))
        st = hilal_error_set(err, HILAL_ERR_NOTFOUND, "no frame row %lld (the archive has %llu)",
                             (long long)frame_row, (unsigned long long)nr);
    if (st == HILAL_OK)
        st = hilal_h5_read_rows(ar->d_psf[which], H5T_NATIVE_FLOAT, (hsize_t)frame_row, 1, d, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK) {
        free(d);
        hilal_error_context(err, "archive %s", ar->path);
        return st;
    }
    *data = d;
    *size = ar->psf_size;
    return HILAL_OK;
}

hilal_status hilal_archive_get_summary(hilal_archive *ar, hilal_archive_summary *out,
                                       hilal_error *err)
{
    hilal_status st;
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    size_t nf = 0;
    hsize_t nc = 0;
    memset(out, 0, sizeof *out);
    hilal_h5_quiet();
    pthread_mutex_lock(&ar->mutex);
    st = load_frames(ar, &frames, &nf, &cur, err);
    if (st == HILAL_OK)
        st = hilal_h5_nrows(ar->d_cand, !ar->writable, &nc, err);
    pthread_mutex_unlock(&ar->mutex);
    if (st != HILAL_OK) {
        free(frames);
        free(cur);
        hilal_error_context(err, "archive %s", ar->path);
        return st;
    }
    out->schema_version = ar->schema_version;
    out->cutout_size = ar->cutout_size;
    out->psf_size = ar->psf_size;
    snprintf(out->created_utc, sizeof out->created_utc, "%s", ar->created_utc);
    snprintf(out->created_by, sizeof out->created_by, "%s", ar->created_by);
    out->ncand_rows = nc;
    for (size_t i = 0; i < nf; i++) {
        if (frames[i].status == HILAL_ARCHIVE_FRAME_NONE)
            continue;
        out->nframe_rows++;
        if (cur[i]) {
            out->nframes_current++;
            out->ncands_current += (size_t)frames[i].n_candidates;
        } else if (frames[i].status == HILAL_ARCHIVE_FRAME_FAILED) {
            out->nframes_failed++;
        } else {
            out->nframes_superseded++;
        }
    }
    free(frames);
    free(cur);
    hilal_archive_run *runs = NULL;
    size_t nruns = 0;
    st = hilal_archive_read_runs(ar, &runs, &nruns, err);
    free(runs);
    out->nruns = nruns;
    out->writer_active = ar->writable ? 1 : writer_active(ar->path);
    return st;
}

/* ------------------------------------------------------------------------
 * Merging another archive (e.g. the shards of an MPI night)
 * ------------------------------------------------------------------------ */

/* Copies rows [from, from + n) of a stack of src to rows [to, to + n) of
 * the same stack of dst, in groups that fit buf (cap_rows rows). */
static hilal_status copy_rows(hid_t sd, hid_t dd, hid_t mtype, hsize_t from, hsize_t to,
                              hsize_t n, void *buf, hsize_t cap_rows, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    for (hsize_t k = 0; k < n && st == HILAL_OK; k += cap_rows) {
        hsize_t m = n - k < cap_rows ? n - k : cap_rows;
        st = hilal_h5_read_rows(sd, mtype, from + k, m, buf, err);
        if (st == HILAL_OK)
            st = hilal_h5_write_rows(dd, mtype, to + k, m, buf, err);
    }
    return st;
}

/* Whether ar already holds the row sf copied under run_id (an earlier,
 * interrupted merge of the same source). */
static int merged_before(const hilal_archive *ar, const hilal_archive_frame *sf, int32_t run_id)
{
    for (size_t i = 0; i < ar->nframes; i++) {
        const hilal_archive_frame *f = &ar->frames[i];
        if (f->frame_id != sf->frame_id || f->run_id != run_id ||
            f->written_unix != sf->written_unix)
            continue;
        if (sf->status == HILAL_ARCHIVE_FRAME_FAILED ? f->status == HILAL_ARCHIVE_FRAME_FAILED
                                                     : f->status != HILAL_ARCHIVE_FRAME_FAILED)
            return 1;
    }
    return 0;
}

/* Copies frame row `srow` of src (with its candidates, stamps, PSFs and
 * header) into ar under run_id and commits it, following the order of
 * hilal_archive_append_frame(): everything the row points at, flushed; the
 * row, flushed; then the convenience flags. buf holds cap_rows stamps. */
static hilal_status merge_frame(hilal_archive *ar, hilal_archive *src, size_t srow,
                                const hilal_archive_frame *sf, int32_t run_id, void *buf,
                                hsize_t cap_rows, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive_frame row = *sf;
    hilal_archive_cand *cands = NULL;
    char *header = NULL;
    int64_t old = -1, start = 0, text_before = 0;
    size_t frow = 0, n = sf->n_candidates > 0 ? (size_t)sf->n_candidates : 0;
    size_t hlen = sf->header_length > 0 ? (size_t)sf->header_length : 0;
    int committed = sf->status != HILAL_ARCHIVE_FRAME_FAILED;

    /* What the row points at in src: its header text and candidate rows. */
    header = malloc(hlen + 1);
    cands = calloc(n > 0 ? n : 1, sizeof *cands);
    if (header == NULL || cands == NULL) {
        free(header);
        free(cands);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for frame %s", sf->frame_name);
    }
    st = hilal_h5_read_rows(src->d_text, H5T_NATIVE_UCHAR, (hsize_t)sf->header_offset, hlen,
                            header, err);
    if (st == HILAL_OK && n > 0)
        st = hilal_h5_read_rows(src->d_cand, src->t_cand, (hsize_t)(sf->first_cand_id - 1), n,
                                cands, err);
    if (st != HILAL_OK) {
        free(header);
        free(cands);
        return st;
    }

    pthread_mutex_lock(&ar->mutex);
    st = reserve_frame(ar, err);
    if (st != HILAL_OK)
        goto cleanup;
    frow = ar->nframes;
    start = ar->cand_end;
    text_before = ar->text_end;
    row.run_id = run_id;
    row.status = committed ? HILAL_ARCHIVE_FRAME_COMMITTED : HILAL_ARCHIVE_FRAME_FAILED;
    row.valid = committed ? 1 : 0;
    row.first_cand_id = start + 1;
    if (committed)
        old = replaced_frame_row(ar, row.frame_id, run_id);

    /* 1. Header, PSF boxes, stamps and candidate rows, flushed. */
    st = append_text(ar, header, hlen, &row.header_offset, err);
    for (int p = 0; p < 3 && st == HILAL_OK; p++)
        st = copy_rows(src->d_psf[p], ar->d_psf[p], H5T_NATIVE_FLOAT, srow, frow, 1, buf,
                       1, err);
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES && st == HILAL_OK; p++)
        st = copy_rows(src->d_cut[p], ar->d_cut[p], H5T_NATIVE_FLOAT,
                       (hsize_t)(sf->first_cand_id - 1), (hsize_t)start, n, buf, cap_rows, err);
    if (st == HILAL_OK)
        st = copy_rows(src->d_mask, ar->d_mask, H5T_NATIVE_UINT16,
                       (hsize_t)(sf->first_cand_id - 1), (hsize_t)start, n, buf, cap_rows, err);
    for (size_t k = 0; k < n; k++) {
        cands[k].cand_id = start + (int64_t)k + 1;
        cands[k].run_id = run_id;
        cands[k].frame_row = (int64_t)frow;
        cands[k].valid = 0;
    }
    /* Objects are this archive's: associate the copied rows afresh. */
    fix_v1_rows(src, cands, n);
    if (st == HILAL_OK && ar->assoc != NULL && ar->assoc_dirty)
        st = rebuild_objects(ar, err);
    ar->ntouched = 0;
    if (st == HILAL_OK && committed)
        st = associate_rows(ar, cands, n, NAN, err);
    if (st == HILAL_OK)
        st = hilal_h5_write_rows(ar->d_cand, ar->t_cand, (hsize_t)start, n, cands, err);
    if (st == HILAL_OK)
        st = flush(ar, err);
    /* 2 to 4: the commit (the frame row keeps its commit time), the flags
     * and the objects, as in hilal_archive_append_frame(). */
    if (st == HILAL_OK)
        st = commit_frame(ar, &row, frow, start, (int64_t)n, old, text_before, err);
    else
        forget_uncommitted(ar, text_before);
cleanup:
    pthread_mutex_unlock(&ar->mutex);
    free(header);
    free(cands);
    if (st != HILAL_OK)
        hilal_error_context(err, "frame %s", sf->frame_name);
    return st;
}

hilal_status hilal_archive_merge(hilal_archive *ar, const char *src_path, size_t *nframes,
                                 size_t *ncands, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive *src = NULL;
    hilal_archive_run *runs = NULL;
    hilal_archive_frame *rows = NULL;
    unsigned char *cur = NULL;
    int32_t *map = NULL;
    void *buf = NULL;
    size_t nruns = 0, nrows = 0, copied = 0, copied_cands = 0;
    int recovered = 0;
    if (nframes != NULL)
        *nframes = 0;
    if (ncands != NULL)
        *ncands = 0;
    if (!ar->writable)
        return hilal_error_set(err, HILAL_ERR_USAGE, "archive %s was opened read-only", ar->path);
    if (strcmp(src_path, ar->path) == 0)
        return hilal_error_set(err, HILAL_ERR_USAGE, "cannot merge archive %s into itself", src_path);

    /* A shard whose writer died is repaired first, as its next writer would. */
    st = hilal_archive_recover(src_path, &recovered, err);
    if (st == HILAL_OK)
        st = hilal_archive_open_read(src_path, &src, err);
    if (st != HILAL_OK)
        goto cleanup;
    if (src->cutout_size != ar->cutout_size || src->psf_size != ar->psf_size) {
        st = hilal_error_set(err, HILAL_ERR_MISMATCH,
                             "%s has %d px cutouts and %d px PSF boxes but %s has %d and %d",
                             src_path, src->cutout_size, src->psf_size, ar->path,
                             ar->cutout_size, ar->psf_size);
        goto cleanup;
    }
    st = hilal_archive_read_runs(src, &runs, &nruns, err);
    if (st == HILAL_OK)
        st = hilal_archive_read_frames(src, &rows, &nrows, &cur, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* Each source run becomes the run of ar with the same configuration
     * hash and software version. */
    map = calloc(nruns > 0 ? nruns : 1, sizeof *map);
    hsize_t cap_rows = group_rows(ar->cutout_size);
    size_t stamp_bytes = (size_t)ar->cutout_size * (size_t)ar->cutout_size * sizeof(float);
    size_t psf_bytes = (size_t)ar->psf_size * (size_t)ar->psf_size * sizeof(float);
    buf = malloc(cap_rows * stamp_bytes > psf_bytes ? cap_rows * stamp_bytes : psf_bytes);
    if (map == NULL || buf == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t r = 0; r < nruns && st == HILAL_OK; r++) {
        char *text = NULL;
        st = hilal_archive_read_text(src, runs[r].config_offset, runs[r].config_length, &text, err);
        if (st == HILAL_OK)
            st = find_or_add_run(ar, text, runs[r].config_hash, runs[r].software_version,
                                 runs[r].library_versions, runs[r].created_utc, &map[r], err);
        free(text);
    }
    for (size_t i = 0; i < nrows && st == HILAL_OK; i++) {
        const hilal_archive_frame *sf = &rows[i];
        if (!(cur[i] || sf->status == HILAL_ARCHIVE_FRAME_FAILED))
            continue;
        int32_t run_id = 0;
        for (size_t r = 0; r < nruns; r++)
            if (runs[r].run_id == sf->run_id)
                run_id = map[r];
        if (run_id == 0) {
            st = hilal_error_set(err, HILAL_ERR_FORMAT, "%s: frame row %zu names run %d, which "
                                 "is not in /runs", src_path, i, (int)sf->run_id);
            break;
        }
        pthread_mutex_lock(&ar->mutex);
        int skip = merged_before(ar, sf, run_id);
        pthread_mutex_unlock(&ar->mutex);
        if (skip)
            continue;
        st = merge_frame(ar, src, i, sf, run_id, buf, cap_rows, err);
        if (st == HILAL_OK) {
            copied++;
            copied_cands += sf->status == HILAL_ARCHIVE_FRAME_FAILED ? 0 : (size_t)sf->n_candidates;
        }
    }
    if (st == HILAL_OK && recovered)
        hilal_log(HILAL_LOG_INFO, "merge: %s had been left open by a writer that stopped; "
                  "recovered before merging", src_path);
cleanup:
    if (nframes != NULL)
        *nframes = copied;
    if (ncands != NULL)
        *ncands = copied_cands;
    hilal_archive_free(src);
    free(runs);
    free(rows);
    free(cur);
    free(map);
    free(buf);
    if (st != HILAL_OK)
        hilal_error_context(err, "merging %s into %s", src_path, ar->path);
    return st;
}
