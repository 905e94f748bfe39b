/* FITS input and output: the only place CFITSIO is called.
 *
 * Reading turns one image HDU of a FITS file into a hilal_image (float32
 * pixels after BSCALE/BZERO, a mask marking no-data pixels, and the metadata
 * of the file: path, HDU, BITPIX, scaling, the full header, the file's
 * SHA-256 and its celestial WCS). Detector keywords (gain, read noise, ...)
 * are not interpreted here: stages/ingest.c does that with the header helpers
 * below, so that keyword names stay configurable.
 *
 * Writing makes new files through a small writer object: the file is built
 * under a temporary name in the target directory and renamed over the target
 * when it is complete, so an existing file is replaced only by a complete one
 * and a failed write leaves the old file untouched. Every written HDU gets
 * CHECKSUM and DATASUM cards; the result passes fitsverify. A header can also
 * be built in memory alone (hilal_fits_header_open()), with the same key
 * functions as a file.
 *
 * HDU numbers are 1-based throughout (1 = primary HDU), unlike CFITSIO's
 * extended file-name syntax where file.fits[0] is the primary HDU and
 * file.fits[1] the first extension.
 *
 * CFITSIO's status codes and its error-message stack are translated into
 * hilal_error messages here, and the stack is cleared afterwards. The stack
 * is process-wide: when several frames fail at the same moment in different
 * threads, a CFITSIO detail line may appear in the other frame's message.
 */
#ifndef HILAL_FITS_H
#define HILAL_FITS_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/image.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------
 * Reading
 * ------------------------------------------------------------------------ */

/* Reads one image HDU into a new image (*out, free with hilal_image_free()).
 *
 * path:  a file name. If a file of exactly this name exists it is opened as
 *        is (names containing '[' work). Otherwise CFITSIO's extended syntax
 *        is applied: "f.fits[2]" (third HDU, CFITSIO counts from 0),
 *        "f.fits[SCI]" or "f.fits[SCI,2]" (EXTNAME, EXTVER), image sections
 *        "f.fits[*,*,3:3]"; gzip (.gz), Unix compress (.Z) and tile-compressed
 *        (RICE, GZIP, HCOMPRESS, PLIO) files are decompressed transparently.
 * hdu:   0 = the HDU named by [ext] syntax if given, else the first image
 *        HDU that has data (an empty primary HDU, tables and NAXIS = 0
 *        extensions are skipped; tile-compressed images count as images);
 *        >= 1 = that HDU (1 = primary). Giving both hdu >= 1 and [ext] syntax
 *        that point at different HDUs is an error.
 *
 * Pixels: any BITPIX (8, 16, 32, 64, -32, -64) is converted to float32 with
 * BSCALE/BZERO applied. Integer pixels equal to BLANK, floating-point
 * NaN or +-Inf, and values of exactly +-FLT_MAX (3.4028235e38, a fill value
 * some pipelines write, e.g. ZTF reference images) get HILAL_MASK_NODATA
 * and the value NaN. 1-D images become
 * nx x 1 images; extra axes of length 1 are accepted.
 *
 * Rejected with a message naming the file, the HDU and what to do: files
 * that do not exist or cannot be read (HILAL_ERR_IO), non-FITS files
 * (HILAL_ERR_FORMAT), truncated files and CFITSIO read errors
 * (HILAL_ERR_FITS), files without any image HDU, tables, random groups,
 * zero-size images and cubes with more than one plane (HILAL_ERR_FORMAT),
 * HDUs that do not exist (HILAL_ERR_NOTFOUND), values beyond the float32
 * range (HILAL_ERR_RANGE).
 *
 * Metadata: meta.path is the file name without [ext] syntax, meta.hdu the
 * 1-based HDU read, meta.bitpix the BITPIX of the HDU (ZBITPIX for
 * tile-compressed images), meta.bscale/bzero the scaling that was applied,
 * meta.header the HDU's header as 80-character cards (for a tile-compressed
 * image the header of the uncompressed image), meta.sha256 the hex SHA-256
 * of the whole file's bytes (as stored, e.g. still gzipped; "" when the
 * name is not a regular local file), meta.wcs the celestial WCS from the
 * header (NULL when there is none; an unusable WCS is logged as a warning
 * and left NULL, so alignment falls back to star matching). The detector
 * fields (gain, read noise, ...) stay unknown (NaN / "").
 */
hilal_status hilal_fits_read_image(const char *path, int hdu, hilal_image **out,
                                   hilal_error *err);

/* As hilal_fits_read_image(); in addition, when primary_header is not NULL
 * and the pixels come from an extension, *primary_header receives the
 * primary HDU's header as 80-character cards (malloc'd, the caller frees it)
 * and *nprimary_cards its card count; both are NULL / 0 when the pixels come
 * from the primary HDU or on error. Used to look up keywords that multi-
 * extension files keep in the primary header (EXPTIME, DATE-OBS, ...). */
hilal_status hilal_fits_read_image_primary(const char *path, int hdu, hilal_image **out,
                                           char **primary_header, int *nprimary_cards,
                                           hilal_error *err);

/* ------------------------------------------------------------------------
 * Header helpers (on headers held as 80-character cards, e.g. meta.header)
 * ------------------------------------------------------------------------ */

/* Outcome of a keyword look-up. */
typedef enum hilal_fits_key_state {
    HILAL_FITS_KEY_MISSING = 0,   /* no card with this keyword */
    HILAL_FITS_KEY_UNDEFINED = 1, /* the card exists but has no value ("KEY     =") */
    HILAL_FITS_KEY_FOUND = 2
} hilal_fits_key_state;

/* Looks up the first card with the given keyword (case-insensitive; long
 * names and names with spaces are matched against HIERARCH cards, e.g.
 * "ESO DET OUT1 GAIN") in header (ncards cards of 80 characters).
 * On FOUND, value receives the value as text: strings without their quotes
 * and trailing blanks (a doubled quote '' becomes '), numbers, T/F and
 * complex values as written. Never fails; value is "" unless FOUND. */
hilal_fits_key_state hilal_fits_header_get(const char *header, int ncards, const char *key,
                                           char *value, size_t len);

/* Looks up a numeric keyword. Returns HILAL_OK with *state MISSING or
 * UNDEFINED (and *value NaN) when it is absent or empty, HILAL_OK with
 * FOUND and the value, or HILAL_ERR_FITS when the card's value is not a
 * finite number (the message names the keyword and the value; the caller
 * adds the file). FITS 'D' exponents (1.5D+03) are accepted, as are numbers
 * written as quoted strings ('2.4'), which some cameras produce. */
hilal_status hilal_fits_header_get_double(const char *header, int ncards, const char *key,
                                          double *value, hilal_fits_key_state *state,
                                          hilal_error *err);

/* Converts a FITS date, "YYYY-MM-DD", "YYYY-MM-DDThh:mm:ss[.sss]" or the old
 * "DD/MM/YY" form (years 1900-1999), to a Modified Julian Date (UTC, days).
 * *has_time is set to 1 when the text carries a time of day, 0 when it is a
 * date alone (the MJD is then that of 0h). HILAL_ERR_FORMAT when the text is
 * not a FITS date. */
hilal_status hilal_fits_date_to_mjd(const char *date, double *mjd, int *has_time,
                                    hilal_error *err);

/* ------------------------------------------------------------------------
 * Writing
 * ------------------------------------------------------------------------ */

typedef struct hilal_fits_writer hilal_fits_writer;

/* Starts a new FITS file that will replace path (if it exists) when
 * hilal_fits_writer_close() succeeds. Nothing is written at path before
 * then; the data go to a temporary file next to it. Returns NULL and sets
 * err (HILAL_ERR_IO) when the directory is not writable. */
hilal_fits_writer *hilal_fits_writer_open(const char *path, hilal_error *err);

/* Appends a float32 image HDU (BITPIX -32) of nx x ny pixels (row-major,
 * pix[y * nx + x]); the first HDU added becomes the primary HDU, later ones
 * IMAGE extensions. extname may be NULL (no EXTNAME card). NaN pixels are
 * written as NaN (the FITS no-data value for floating-point images). The
 * new HDU becomes the current HDU for the key functions below. */
hilal_status hilal_fits_writer_add_float(hilal_fits_writer *w, const char *extname, long nx,
                                         long ny, const float *pix, hilal_error *err);

/* Appends an image HDU of unsigned 16-bit integers (BITPIX 16, BZERO 32768,
 * what CFITSIO calls USHORT_IMG) of nx x ny pixels given as floats: each
 * value is rounded to the nearest integer (halves away from 32768) as it is
 * stored. A NaN pixel or one outside [0, 65535] after rounding is an error
 * (HILAL_ERR_RANGE, naming the pixel) and nothing is written; clip and round
 * beforehand to store a float image this way. Otherwise as
 * hilal_fits_writer_add_float(). */
hilal_status hilal_fits_writer_add_uint16(hilal_fits_writer *w, const char *extname, long nx,
                                          long ny, const float *pix, hilal_error *err);

/* Appends a mask HDU of nx x ny hilal_mask_t values, stored as unsigned
 * 16-bit integers (BITPIX 16, BZERO 32768), with one MASKBnn card per mask
 * bit naming it ("MASKB02 = 'NODATA'"), so the file documents its bits. */
hilal_status hilal_fits_writer_add_mask(hilal_fits_writer *w, const char *extname, long nx,
                                        long ny, const hilal_mask_t *mask, hilal_error *err);

/* One column of a binary table (hilal_fits_writer_add_table): 'D' a
 * 64-bit float from d[], 'J' a 32-bit integer from j[]. unit and comment
 * may be NULL. */
typedef struct hilal_fits_column {
    const char *name;
    char type;
    const char *unit;
    const char *comment;
    const double *d;
    const int32_t *j;
} hilal_fits_column;

/* Appends a binary-table extension of nrows rows (nrows may be 0) with
 * the given columns; it becomes the current HDU for the key functions. A
 * writer with no HDU yet gets an empty primary HDU first. */
hilal_status hilal_fits_writer_add_table(hilal_fits_writer *w, const char *extname,
                                         const hilal_fits_column *cols, int ncols, long nrows,
                                         hilal_error *err);

/* The name of a single mask bit as written in MASKBnn cards ("BAD", "SAT",
 * "NODATA", "EDGE", "INTERP", "CR", "REFDEFECT", "NEGVAR"); NULL when bit is
 * not exactly one defined hilal_mask_bit. */
const char *hilal_fits_mask_name(unsigned bit);

/* Appends an HDU without data (NAXIS = 0): as the first HDU, an empty
 * primary HDU holding only keywords (the usual start of a multi-extension
 * file). extname may be NULL. */
hilal_status hilal_fits_writer_add_empty(hilal_fits_writer *w, const char *extname,
                                         hilal_error *err);

/* Keywords on the current (last added) HDU. An existing card with the same
 * keyword is updated. Keywords longer than 8 characters or with characters
 * outside [A-Z0-9_-] are written as HIERARCH cards. comment may be NULL.
 * A non-finite double is not written (FITS has no NaN; a missing keyword
 * is how FITS says "unknown") and removes an existing card of that name. */
hilal_status hilal_fits_writer_key_double(hilal_fits_writer *w, const char *key, double value,
                                          const char *comment, hilal_error *err);
hilal_status hilal_fits_writer_key_int(hilal_fits_writer *w, const char *key, long long value,
                                       const char *comment, hilal_error *err);
hilal_status hilal_fits_writer_key_string(hilal_fits_writer *w, const char *key,
                                          const char *value, const char *comment,
                                          hilal_error *err);
/* An unsigned integer (up to 2^64 - 1, e.g. a random seed), written in full. */
hilal_status hilal_fits_writer_key_uint(hilal_fits_writer *w, const char *key,
                                        unsigned long long value, const char *comment,
                                        hilal_error *err);
hilal_status hilal_fits_writer_key_bool(hilal_fits_writer *w, const char *key, int value,
                                        const char *comment, hilal_error *err);
/* A HISTORY card (long text is split over several cards). */
hilal_status hilal_fits_writer_history(hilal_fits_writer *w, const char *text,
                                       hilal_error *err);
/* A COMMENT card (long text is split over several cards). */
hilal_status hilal_fits_writer_comment(hilal_fits_writer *w, const char *text,
                                       hilal_error *err);

/* Which cards hilal_fits_writer_copy_cards() copies. */
typedef enum hilal_fits_copy {
    /* Every card except the structural ones that describe the stored data
     * (SIMPLE, XTENSION, BITPIX, NAXISn, EXTEND, PCOUNT, GCOUNT, GROUPS,
     * BSCALE, BZERO, BLANK, EXTNAME, EXTVER, CHECKSUM, DATASUM, END, the
     * tile-compression Z... and table T... keywords) */
    HILAL_FITS_COPY_ALL = 0,
    /* Only world-coordinate cards: WCSAXES, CTYPE, CUNIT, CRPIX, CRVAL,
     * CDELT, CROTA, CD, PC, PV, PS, LONPOLE, LATPOLE, RADESYS(A), EQUINOX,
     * EPOCH, WCSNAME, MJDREF, SIP (A_/B_/AP_/BP_) and their alternate-WCS
     * (letter-suffixed) forms */
    HILAL_FITS_COPY_WCS = 1
} hilal_fits_copy;

/* Copies cards from a header given as ncards 80-character cards (such as
 * meta.header, or wcslib's wcshdo() output) to the current HDU, skipping
 * the cards `what` excludes. Copying a WCS header onto a different pixel
 * grid is the caller's responsibility. */
hilal_status hilal_fits_writer_copy_cards(hilal_fits_writer *w, const char *header, int ncards,
                                          hilal_fits_copy what, hilal_error *err);

/* How hilal_fits_writer_close() comments the CHECKSUM and DATASUM cards. */
typedef enum hilal_fits_checksum {
    /* CFITSIO's comments, which hold the time of writing ("HDU checksum
     * updated 2026-01-31T22:10:05"): the default */
    HILAL_FITS_CHECKSUM_DATED = 0,
    /* Fixed comments ("HDU checksum", "data unit checksum"), so that the
     * same content gives the same bytes whenever it is written (simulated
     * data, golden files). The checksum values are the same kind and verify
     * the same way. */
    HILAL_FITS_CHECKSUM_FIXED = 1
} hilal_fits_checksum;

/* Chooses the CHECKSUM/DATASUM comments of the file (default
 * HILAL_FITS_CHECKSUM_DATED). Accepts NULL (does nothing). */
void hilal_fits_writer_set_checksum(hilal_fits_writer *w, hilal_fits_checksum how);

/* Writes CHECKSUM/DATASUM for every HDU, closes the file and renames it
 * over the target path. The writer is freed in every case; on failure the
 * target is left as it was and the temporary file is removed. */
hilal_status hilal_fits_writer_close(hilal_fits_writer *w, hilal_error *err);

/* Abandons the file: closes and removes the temporary file, frees the
 * writer. The target is left as it was. Accepts NULL. */
void hilal_fits_writer_free(hilal_fits_writer *w);

/* Starts a header built in memory, with no file and no pixels: the
 * structural cards of a primary image HDU of nx x ny pixels stored as bitpix
 * (-32 float, or 16 for unsigned 16-bit with BZERO 32768 as
 * hilal_fits_writer_add_uint16() stores them), after which the key functions
 * above add cards exactly as they would to a file, so a header kept in memory
 * and the file written with the same calls cannot disagree. No pixel memory
 * of the full size is used. Adding HDUs to it or closing it is an error
 * (HILAL_ERR_INTERNAL); take the cards with hilal_fits_writer_header() and
 * free it with hilal_fits_writer_free(). On failure (HILAL_ERR_RANGE for
 * another bitpix or a size that is not positive) *out is NULL. */
hilal_status hilal_fits_header_open(int bitpix, long nx, long ny, hilal_fits_writer **out,
                                    hilal_error *err);

/* The current HDU's header as 80-character cards, END last, in one
 * NUL-terminated string (*cards, malloc'd, the caller frees it), and the
 * number of cards, END included (*ncards): the form of hilal_meta.header.
 * On failure *cards is NULL and *ncards 0. */
hilal_status hilal_fits_writer_header(hilal_fits_writer *w, char **cards, int *ncards,
                                      hilal_error *err);

/* Convenience: writes img->pix as the primary HDU of a new file at path
 * (replacing it), copying the non-structural cards of img->meta.header (if
 * any) and, when the image has a mask with any bit set, a MASK extension.
 * Detector metadata (gain, ...) are not written: the keyword names are the
 * reader's choice; add them with the writer API. */
hilal_status hilal_fits_write_image(const char *path, const hilal_image *img, hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
