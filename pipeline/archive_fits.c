/* FITS products of the archive tools: candidate rows as a binary table and
 * a candidate's stamps as image extensions.
 *
 * Image files go through the FITS writer of pipeline/fits.c. That writer
 * makes images only, so the binary table is written here with CFITSIO
 * directly, following the same rules (temporary file renamed into place,
 * CHECKSUM/DATASUM on every HDU, CFITSIO's status and message stack turned
 * into the error message and cleared).
 */
#include "hilal/archive.h"

#include <errno.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <fitsio.h>

#include "hilal/fits.h"
#include "hilal/version.h"

/* CFITSIO status and its message stack -> error message; clears the stack. */
static hilal_status table_fail(hilal_error *err, int status, const char *what, const char *path)
{
    char text[FLEN_STATUS] = "", msg[FLEN_ERRMSG] = "", last[FLEN_ERRMSG] = "";
    fits_get_errstatus(status, text);
    while (fits_read_errmsg(msg))
        snprintf(last, sizeof last, "%s", msg);
    fits_clear_errmsg();
    return hilal_error_set(err, HILAL_ERR_IO, "%s %s: CFITSIO status %d (%s)%s%s", what, path,
                           status, text, last[0] ? ": " : "", last);
}

static const char *tform_of(const hilal_archive_column *c, char *buf, size_t len)
{
    switch (c->type) {
    case HILAL_ARCHIVE_COL_I64: return "1K";
    case HILAL_ARCHIVE_COL_I32: return "1J";
    case HILAL_ARCHIVE_COL_U32: return "1V"; /* CFITSIO: J with TZERO = 2147483648 */
    case HILAL_ARCHIVE_COL_U8: return "1B";
    case HILAL_ARCHIVE_COL_F64: return "1D";
    case HILAL_ARCHIVE_COL_STR: snprintf(buf, len, "%zuA", c->size - 1); return buf;
    }
    return "1D";
}

/* Writes one column of n rows gathered from the row structs. */
static int write_column(fitsfile *f, int colnum, const hilal_archive_column *c, const void *rows,
                        size_t row_size, size_t n, int *status)
{
    const char *base = rows;
    if (n == 0)
        return *status;
    if (c->type == HILAL_ARCHIVE_COL_STR) {
        char **p = malloc(n * sizeof *p);
        if (p == NULL)
            return *status = MEMORY_ALLOCATION;
        for (size_t i = 0; i < n; i++)
            p[i] = (char *)(base + i * row_size + c->offset);
        fits_write_col(f, TSTRING, colnum, 1, 1, (LONGLONG)n, p, status);
        free(p);
        return *status;
    }
    size_t width = c->type == HILAL_ARCHIVE_COL_I64 || c->type == HILAL_ARCHIVE_COL_F64 ? 8
                   : c->type == HILAL_ARCHIVE_COL_U8                                  ? 1
                                                                                      : 4;
    unsigned char *buf = malloc(n * width);
    if (buf == NULL)
        return *status = MEMORY_ALLOCATION;
    for (size_t i = 0; i < n; i++)
        memcpy(buf + i * width, base + i * row_size + c->offset, width);
    int type = c->type == HILAL_ARCHIVE_COL_I64   ? TLONGLONG
               : c->type == HILAL_ARCHIVE_COL_I32 ? TINT
               : c->type == HILAL_ARCHIVE_COL_U32 ? TUINT
               : c->type == HILAL_ARCHIVE_COL_U8  ? TBYTE
                                                  : TDOUBLE;
    /* int32_t is int and uint32_t is unsigned int on every platform Hilal
     * builds on (LP64 and ILP32). */
    fits_write_col(f, type, colnum, 1, 1, (LONGLONG)n, buf, status);
    free(buf);
    return *status;
}

hilal_status hilal_archive_write_fits_table(const char *path, const hilal_archive_cand *rows,
                                            size_t n, const char *source, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t ncols;
    const hilal_archive_column *cols = hilal_archive_columns("candidates", &ncols);
    char tmp[4200], dir[4096], base[4096], tforms[64][24];
    char *ttype[64], *tform[64], *tunit[64];
    fitsfile *f = NULL;
    int status = 0, fd;

    if (ncols > 64)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "too many columns");
    /* The table is written under a temporary name next to path. */
    if ((size_t)snprintf(dir, sizeof dir, "%s", path) >= sizeof dir ||
        (size_t)snprintf(base, sizeof base, "%s", path) >= sizeof base ||
        (size_t)snprintf(tmp, sizeof tmp, "%s/.%s.tmp-XXXXXX", dirname(dir), basename(base)) >=
            sizeof tmp)
        return hilal_error_set(err, HILAL_ERR_IO,
                               "%s: file name too long (%zu characters) for its temporary "
                               "name; use a shorter path",
                               path, strlen(path));
    fd = mkstemp(tmp);
    if (fd < 0)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot write %s: %s; check that the directory "
                               "exists and is writable", path, strerror(errno));
    close(fd);
    unlink(tmp); /* CFITSIO creates the file itself */
    for (size_t i = 0; i < ncols; i++) {
        ttype[i] = (char *)cols[i].name;
        tform[i] = (char *)tform_of(&cols[i], tforms[i], sizeof tforms[i]);
        tunit[i] = (char *)cols[i].unit;
    }
    fits_create_diskfile(&f, tmp, &status);
    if (status != 0) {
        f = NULL;
        st = table_fail(err, status, "cannot create", tmp);
        goto cleanup;
    }
    /* An empty primary HDU, then the table. */
    fits_create_img(f, BYTE_IMG, 0, NULL, &status);
    fits_update_key_str(f, "ORIGIN", "hilal", "software that wrote the file", &status);
    fits_write_date(f, &status);
    fits_create_tbl(f, BINARY_TBL, (LONGLONG)n, (int)ncols, ttype, tform, tunit, "CANDIDATES", &status);
    for (size_t i = 0; i < ncols && status == 0; i++) {
        char key[32];
        snprintf(key, sizeof key, "TTYPE%d", (int)i + 1);
        /* Comments are limited to what fits on the card. */
        char comment[48];
        snprintf(comment, sizeof comment, "%s", cols[i].description);
        fits_modify_comment(f, key, comment, &status);
        write_column(f, (int)i + 1, &cols[i], rows, sizeof *rows, n, &status);
    }
    fits_update_key_str(f, "ORIGIN", "hilal", "software that wrote the file", &status);
    fits_update_key_str(f, "HILALVER", hilal_version(), "hilal version", &status);
    fits_update_key_lng(f, "ARSCHEMA", HILAL_ARCHIVE_SCHEMA_VERSION, "archive schema version", &status);
    if (source != NULL && status == 0) {
        fits_write_key_longwarn(f, &status);
        fits_write_key_longstr(f, "ARCHIVE", source, "archive the rows come from", &status);
    }
    fits_write_comment(f, "Candidates from a Hilal archive; columns as in its /candidates table "
                          "(docs/archive.md). x, y are FITS 1-based science pixels.", &status);
    /* Checksums of both HDUs. */
    fits_write_chksum(f, &status);
    fits_movabs_hdu(f, 1, NULL, &status);
    fits_write_chksum(f, &status);
    if (status != 0) {
        st = table_fail(err, status, "cannot write the table to", tmp);
        goto cleanup;
    }
    fits_close_file(f, &status);
    f = NULL;
    if (status != 0) {
        st = table_fail(err, status, "cannot close", tmp);
        goto cleanup;
    }
    if (rename(tmp, path) != 0)
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
cleanup:
    if (f != NULL) {
        int s2 = 0;
        fits_close_file(f, &s2);
        fits_clear_errmsg();
    }
    if (st != HILAL_OK)
        unlink(tmp);
    return st;
}

/* Adds the WCS of the frame's header, moved to the stamp: CRPIXi of the
 * primary and alternate (A-Z) descriptions shift by the stamp origin; the
 * IRAF LTV/LTM cards give the mapping back to frame pixels. */
static hilal_status add_stamp_wcs(hilal_fits_writer *w, const char *header,
                                  const hilal_archive_cand *cand, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    double dx = cand->stamp_x0 - 1, dy = cand->stamp_y0 - 1;
    if (header != NULL && header[0] != '\0') {
        int ncards = (int)(strlen(header) / 80);
        st = hilal_fits_writer_copy_cards(w, header, ncards, HILAL_FITS_COPY_WCS, err);
        for (int a = -1; a < 26 && st == HILAL_OK; a++) {
            char key[2][16], suffix[2] = {a < 0 ? '\0' : (char)('A' + a), '\0'};
            snprintf(key[0], sizeof key[0], "CRPIX1%s", suffix);
            snprintf(key[1], sizeof key[1], "CRPIX2%s", suffix);
            for (int k = 0; k < 2 && st == HILAL_OK; k++) {
                double v;
                hilal_fits_key_state state;
                hilal_error ignored = {0};
                if (hilal_fits_header_get_double(header, ncards, key[k], &v, &state, &ignored) != HILAL_OK ||
                    state != HILAL_FITS_KEY_FOUND)
                    continue;
                st = hilal_fits_writer_key_double(w, key[k], v - (k == 0 ? dx : dy),
                                                  "reference pixel, moved to the stamp", err);
            }
        }
    }
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "LTV1", -dx, "frame x = stamp x + stamp_x0 - 1", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "LTV2", -dy, "frame y = stamp y + stamp_y0 - 1", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "LTM1_1", 1.0, NULL, err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_double(w, "LTM2_2", 1.0, NULL, err);
    return st;
}

/* Finite doubles as keywords; NaN is not a FITS number, so it is left out. */
static hilal_status key_finite(hilal_fits_writer *w, const char *key, double v, const char *comment,
                               hilal_error *err)
{
    if (!isfinite(v))
        return HILAL_OK;
    return hilal_fits_writer_key_double(w, key, v, comment, err);
}

hilal_status hilal_archive_write_cutout_fits(const char *path, const hilal_archive_cand *cand,
                                             const hilal_archive_frame *frame,
                                             const char *header, const hilal_archive_cutout *c,
                                             hilal_error *err)
{
    static const char *const extnames[HILAL_ARCHIVE_NFLOAT_PLANES] = {
        "SCIENCE", "REFERENCE", "DIFFERENCE", "SCORR", "VARIANCE"};
    static const char *const bunits[HILAL_ARCHIVE_NFLOAT_PLANES] = {"adu", "adu", "", "", "adu2"};
    hilal_status st;
    hilal_fits_writer *w = hilal_fits_writer_open(path, err);
    if (w == NULL)
        return err != NULL ? err->code : HILAL_ERR_IO;
    st = hilal_fits_writer_add_empty(w, NULL, err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "CAND_ID", cand->cand_id, "candidate id in the archive", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "FRAME_ID", cand->frame_id, "frame id in the archive", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "RUN_ID", cand->run_id, "run id in the archive", err);
    if (st == HILAL_OK && frame != NULL)
        st = hilal_fits_writer_key_string(w, "FRAMENAM", frame->frame_name, "frame name", err);
    if (st == HILAL_OK && frame != NULL)
        st = hilal_fits_writer_key_string(w, "SCIFILE", frame->path, "science file", err);
    if (st == HILAL_OK && frame != NULL && frame->filter[0] != '\0')
        st = hilal_fits_writer_key_string(w, "FILTER", frame->filter, "filter", err);
    if (st == HILAL_OK)
        st = key_finite(w, "X", cand->x, "FITS 1-based science x of the candidate", err);
    if (st == HILAL_OK)
        st = key_finite(w, "Y", cand->y, "FITS 1-based science y of the candidate", err);
    if (st == HILAL_OK)
        st = key_finite(w, "RA", cand->ra, "[deg] right ascension", err);
    if (st == HILAL_OK)
        st = key_finite(w, "DEC", cand->dec, "[deg] declination", err);
    if (st == HILAL_OK)
        st = key_finite(w, "SNR", cand->snr, "signed S_corr peak, sigma", err);
    if (st == HILAL_OK)
        st = key_finite(w, "FLUX", cand->flux, "[adu] PSF flux", err);
    if (st == HILAL_OK)
        st = key_finite(w, "FLUX_ERR", cand->flux_err, "[adu] flux error", err);
    if (st == HILAL_OK)
        st = key_finite(w, "MAG", cand->mag, "[mag] magnitude", err);
    if (st == HILAL_OK)
        st = key_finite(w, "RB", cand->rb, "real/bogus score", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "CANDFLAG", cand->flags, "candidate flag bits", err);
    if (st == HILAL_OK)
        st = key_finite(w, "MJD-OBS", cand->mjd, "[d] MJD of the science exposure", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "STAMPX0", cand->stamp_x0, "frame x of stamp pixel 1", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_int(w, "STAMPY0", cand->stamp_y0, "frame y of stamp pixel 1", err);
    if (st == HILAL_OK)
        st = hilal_fits_writer_key_string(w, "HILALVER", hilal_version(), "hilal version", err);
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES && st == HILAL_OK; p++) {
        st = hilal_fits_writer_add_float(w, extnames[p], c->size, c->size, c->plane[p], err);
        if (st == HILAL_OK && bunits[p][0] != '\0')
            st = hilal_fits_writer_key_string(w, "BUNIT", bunits[p], "pixel unit", err);
        if (st == HILAL_OK)
            st = add_stamp_wcs(w, header, cand, err);
    }
    if (st == HILAL_OK)
        st = hilal_fits_writer_add_mask(w, "MASK", c->size, c->size, c->mask, err);
    if (st == HILAL_OK)
        st = add_stamp_wcs(w, header, cand, err);
    if (st != HILAL_OK) {
        hilal_fits_writer_free(w);
        return st;
    }
    return hilal_fits_writer_close(w, err);
}
