/* The single place where CFITSIO is called and its status codes and message
 * stack are translated into hilal_error messages. See include/hilal/fits.h. */
#include "hilal/fits.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <libgen.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fitsio.h>

#include "hilal/checksum.h"
#include "hilal/log.h"
#include "hilal/wcs.h"

/* ------------------------------------------------------------------------
 * CFITSIO status translation
 * ------------------------------------------------------------------------ */

/* The hilal status for a CFITSIO status code. */
static hilal_status status_code(int status)
{
    switch (status) {
    case MEMORY_ALLOCATION:
        return HILAL_ERR_NOMEM;
    case FILE_NOT_OPENED:
    case FILE_NOT_CREATED:
    case WRITE_ERROR:
        return HILAL_ERR_IO;
    case BAD_HDU_NUM:
        return HILAL_ERR_NOTFOUND;
    case NUM_OVERFLOW:
        return HILAL_ERR_RANGE;
    case NO_SIMPLE:
    case BAD_SIMPLE:
    case UNKNOWN_REC:
        return HILAL_ERR_FORMAT;
    default:
        return HILAL_ERR_FITS;
    }
}

/* Appends CFITSIO's explanation of `status` and the lines of its error
 * stack (without repeats) to buf, then clears the stack. */
static void cfitsio_detail(int status, char *buf, size_t len)
{
    char text[FLEN_STATUS];
    char line[FLEN_ERRMSG];
    size_t used = strlen(buf);
    fits_get_errstatus(status, text);
    used += (size_t)snprintf(buf + used, used < len ? len - used : 0,
                             " [CFITSIO status %d: %s", status, text);
    int first = 1;
    while (fits_read_errmsg(line) != 0) {
        /* Trim the line and skip it when it says nothing new. */
        size_t n = strlen(line);
        while (n > 0 && isspace((unsigned char)line[n - 1]))
            line[--n] = '\0';
        if (n == 0 || strstr(buf, line) != NULL)
            continue;
        if (used < len)
            used += (size_t)snprintf(buf + used, len - used, "%s%s", first ? "; " : " / ", line);
        first = 0;
    }
    if (used < len)
        snprintf(buf + used, len - used, "]");
    fits_clear_errmsg();
}

/* Records a CFITSIO failure: the caller's message (what failed and what to
 * do), then CFITSIO's own words. code HILAL_OK means "derive from status". */
static hilal_status fits_fail(hilal_error *err, hilal_status code, int status, const char *fmt,
                              ...) __attribute__((format(printf, 4, 5)));
static hilal_status fits_fail(hilal_error *err, hilal_status code, int status, const char *fmt,
                              ...)
{
    char msg[HILAL_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (status != 0)
        cfitsio_detail(status, msg, sizeof msg);
    if (code == HILAL_OK)
        code = status_code(status);
    return hilal_error_set(err, code, "%s", msg);
}

/* ------------------------------------------------------------------------
 * Reading
 * ------------------------------------------------------------------------ */

static const char *hdu_kind(int hdutype)
{
    switch (hdutype) {
    case ASCII_TBL: return "an ASCII table";
    case BINARY_TBL: return "a binary table";
    default: return "an image";
    }
}

/* Why the current HDU cannot serve as an image, or NULL when it can.
 * why[] receives a short phrase ("a binary table 'EVENTS'", "empty
 * (NAXIS = 0)", ...). *status is left at 0 unless CFITSIO failed. */
static const char *hdu_unusable(fitsfile *f, int hdunum, char *why, size_t len, int *status)
{
    int hdutype = 0, naxis = 0, groups = 0;
    long naxes[9] = {0};
    char extname[FLEN_VALUE] = "";
    fits_get_hdu_type(f, &hdutype, status);
    if (*status != 0)
        return "unreadable";
    if (fits_read_key(f, TSTRING, "EXTNAME", extname, NULL, status) != 0) {
        *status = 0;
        extname[0] = '\0';
    }
    if (hdutype != IMAGE_HDU) {
        snprintf(why, len, "%s%s%s%s", hdu_kind(hdutype), extname[0] ? " '" : "", extname,
                 extname[0] ? "'" : "");
        return why;
    }
    if (hdunum == 1 && fits_read_key(f, TLOGICAL, "GROUPS", &groups, NULL, status) != 0) {
        *status = 0;
        groups = 0;
    }
    if (groups) {
        snprintf(why, len, "random groups (GROUPS = T, e.g. interferometer visibilities), "
                           "not an image");
        return why;
    }
    fits_get_img_dim(f, &naxis, status);
    if (*status == 0 && naxis > 0)
        fits_get_img_size(f, naxis < 9 ? naxis : 9, naxes, status);
    if (*status != 0)
        return "unreadable";
    if (naxis == 0) {
        snprintf(why, len, "empty (NAXIS = 0)");
        return why;
    }
    for (int i = 0; i < naxis && i < 9; i++) {
        if (naxes[i] == 0) {
            snprintf(why, len, "a zero-size image (NAXIS%d = 0)", i + 1);
            return why;
        }
    }
    return NULL;
}

/* Keywords of a tile-compressed image's table header that describe the
 * table or the compression, not the image. */
static int is_compression_key(const char *name)
{
    static const char *const exact[] = {"XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT",
                                        "TFIELDS", "THEAP", "CHECKSUM", "DATASUM", "END"};
    for (size_t i = 0; i < sizeof exact / sizeof exact[0]; i++)
        if (strcmp(name, exact[i]) == 0)
            return 1;
    if (strncmp(name, "NAXIS", 5) == 0 && isdigit((unsigned char)name[5]))
        return 1;
    static const char *const prefix[] = {"TTYPE", "TFORM", "TUNIT", "TNULL", "TSCAL", "TZERO",
                                         "TDISP", "TDIM", "TBCOL"};
    for (size_t i = 0; i < sizeof prefix / sizeof prefix[0]; i++) {
        size_t n = strlen(prefix[i]);
        if (strncmp(name, prefix[i], n) == 0 && isdigit((unsigned char)name[n]))
            return 1;
    }
    /* ZIMAGE, ZBITPIX, ZNAXISn, ZTILEn, ZCMPTYPE, ZNAMEn, ZVALn, ZQUANTIZ,
     * ZDITHER0, ZSIMPLE, ZTENSION, ZEXTEND, ZBLANK, ZSCALE, ZZERO, ZHECKSUM,
     * ZDATASUM, ZPCOUNT, ZGCOUNT (the tile-compression convention). */
    static const char *const zkeys[] = {"ZIMAGE", "ZBITPIX", "ZNAXIS", "ZTILE", "ZCMPTYPE",
                                        "ZNAME", "ZVAL", "ZQUANTIZ", "ZDITHER", "ZSIMPLE",
                                        "ZTENSION", "ZEXTEND", "ZBLANK", "ZSCALE", "ZZERO",
                                        "ZHECKSUM", "ZDATASUM", "ZPCOUNT", "ZGCOUNT"};
    for (size_t i = 0; i < sizeof zkeys / sizeof zkeys[0]; i++)
        if (strncmp(name, zkeys[i], strlen(zkeys[i])) == 0)
            return 1;
    return 0;
}

static void card_name(char *card, char *name);

/* The two COMMENT cards CFITSIO writes into every primary header it makes;
 * copying them onto a new HDU would repeat them. */
static int is_standard_comment(const char *card)
{
    static const char *const std[] = {
        "COMMENT   FITS (Flexible Image Transport System) format is defined in 'Astronomy",
        "COMMENT   and Astrophysics', volume 376, page 359; bibcode: 2001A&A...376..359H"};
    for (size_t i = 0; i < 2; i++)
        if (strncmp(card, std[i], strlen(std[i])) == 0)
            return 1;
    return 0;
}

/* The image header of a tile-compressed HDU, rebuilt when CFITSIO's own
 * conversion (fits_convert_hdr2str) fails, which happens when the Z...
 * keywords are in an unusual order: an IMAGE extension with the image's
 * BITPIX and axes is made in memory by CFITSIO, and every card of the table
 * header that is not about the table or the compression is copied to it. */
static int rebuild_compressed_header(fitsfile *f, char **out, int *ncards, int *status)
{
    fitsfile *m = NULL;
    char *table = NULL;
    int ntable = 0, bitpix = 0, naxis = 0;
    long naxes[9] = {0};
    char card[FLEN_CARD], name[FLEN_KEYWORD];
    fits_get_img_type(f, &bitpix, status);
    fits_get_img_dim(f, &naxis, status);
    if (*status == 0 && (naxis < 0 || naxis > 9))
        *status = BAD_NAXIS;
    fits_get_img_size(f, naxis, naxes, status);
    fits_hdr2str(f, 0, NULL, 0, &table, &ntable, status);
    fits_create_file(&m, "mem://", status);
    fits_create_img(m, BYTE_IMG, 0, NULL, status);
    fits_create_img(m, bitpix, naxis, naxes, status);
    for (int i = 0; *status == 0 && i < ntable; i++) {
        memcpy(card, table + (size_t)i * 80, 80);
        card[80] = '\0';
        card_name(card, name);
        if (is_compression_key(name))
            continue;
        if (is_standard_comment(card))
            continue;
        fits_write_record(m, card, status);
    }
    fits_hdr2str(m, 0, NULL, 0, out, ncards, status);
    if (table != NULL) {
        int ignored = 0;
        fits_free_memory(table, &ignored);
    }
    if (m != NULL) {
        int ignored = 0;
        fits_close_file(m, &ignored);
    }
    return *status;
}

/* Reads the header of the current HDU (for a tile-compressed image: the
 * header of the uncompressed image) into a malloc'd string. */
static hilal_status read_header(fitsfile *f, const char *where, char **out, int *ncards,
                                hilal_error *err)
{
    char *h = NULL;
    int status = 0, n = 0;
    *out = NULL;
    *ncards = 0;
    fits_convert_hdr2str(f, 0, NULL, 0, &h, &n, &status);
    if (status != 0 && fits_is_compressed_image(f, &(int){0})) {
        if (h != NULL) {
            int ignored = 0;
            fits_free_memory(h, &ignored);
            h = NULL;
        }
        fits_clear_errmsg();
        status = 0;
        rebuild_compressed_header(f, &h, &n, &status);
    }
    if (status != 0) {
        if (h != NULL)
            fits_free_memory(h, &status);
        return fits_fail(err, HILAL_OK, status, "%s: cannot read the header", where);
    }
    size_t len = strlen(h);
    char *copy = malloc(len + 1);
    if (copy == NULL) {
        int ignored = 0;
        fits_free_memory(h, &ignored);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "%s: out of memory for the header", where);
    }
    memcpy(copy, h, len + 1);
    int ignored = 0;
    fits_free_memory(h, &ignored);
    *out = copy;
    *ncards = n;
    return HILAL_OK;
}

static int is_regular_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Opens path: literally when a file of that name exists, else through
 * CFITSIO's extended syntax. root receives the file name without any [...]
 * specification, *ext_given whether the syntax selected an HDU. */
static hilal_status open_input(const char *path, fitsfile **f, char *root, size_t rootlen,
                               int *ext_given, hilal_error *err)
{
    int status = 0;
    *f = NULL;
    *ext_given = 0;
    root[0] = '\0';
    if (strlen(path) >= FLEN_FILENAME)
        return hilal_error_set(err, HILAL_ERR_IO, "%s: file name longer than %d characters",
                               path, FLEN_FILENAME - 1);
    if ((size_t)snprintf(root, rootlen, "%s", path) >= rootlen)
        return hilal_error_set(err, HILAL_ERR_IO, "%s: file name longer than %zu characters",
                               path, rootlen - 1);
    struct stat sb;
    if (stat(path, &sb) == 0) {
        if (S_ISDIR(sb.st_mode))
            return hilal_error_set(err, HILAL_ERR_IO,
                                   "%s is a directory; give the FITS file inside it", path);
        /* The literal file exists: no extended-syntax interpretation. */
        fits_open_diskfile(f, path, READONLY, &status);
    } else {
        char url[FLEN_FILENAME], type[FLEN_FILENAME], infile[FLEN_FILENAME],
            outfile[FLEN_FILENAME], extspec[FLEN_FILENAME], filter[FLEN_FILENAME],
            binspec[FLEN_FILENAME], colspec[FLEN_FILENAME];
        snprintf(url, sizeof url, "%s", path);
        fits_parse_input_url(url, type, infile, outfile, extspec, filter, binspec, colspec,
                             &status);
        if (status != 0)
            return fits_fail(err, HILAL_ERR_IO, status,
                             "%s: no such file, and the name is not valid CFITSIO "
                             "extended syntax (file.fits[ext])",
                             path);
        /* root is the file part alone; a URL type other than file:// stays
         * in front of it. */
        const char *prefix = (strcmp(type, "file://") == 0) ? "" : type;
        if ((size_t)snprintf(root, rootlen, "%s%s", prefix, infile) >= rootlen)
            return hilal_error_set(err, HILAL_ERR_IO,
                                   "%s: file name longer than %zu characters once the [...] "
                                   "part is removed",
                                   path, rootlen - 1);
        *ext_given = extspec[0] != '\0';
        /* For a plain name of a missing file CFITSIO still tries name.gz,
         * name.Z, ... which is what users expect. */
        fits_open_file(f, path, READONLY, &status);
    }
    if (status == 0)
        return HILAL_OK;
    *f = NULL;
    errno = 0;
    if (status == FILE_NOT_OPENED && (stat(root, &sb) != 0 || access(root, R_OK) != 0)) {
        int why = errno != 0 ? errno : ENOENT;
        fits_clear_errmsg();
        return hilal_error_set(err, HILAL_ERR_IO, "%s: cannot open: %s; check the path", path,
                               strerror(why));
    }
    if (*ext_given) {
        /* Does the file itself open? Then the [...] part names no HDU. */
        fitsfile *plain = NULL;
        int pstatus = 0, nhdu = 0;
        fits_open_file(&plain, root, READONLY, &pstatus);
        fits_get_num_hdus(plain, &nhdu, &pstatus);
        if (plain != NULL) {
            int ignored = 0;
            fits_close_file(plain, &ignored);
        }
        if (pstatus == 0)
            return fits_fail(err, HILAL_ERR_NOTFOUND, status,
                             "%s: no HDU matches the [...] part (%s has %d HDU%s; in [...] "
                             "CFITSIO counts from 0 = primary, or give the EXTNAME)",
                             path, root, nhdu, nhdu == 1 ? "" : "s");
        fits_clear_errmsg();
    }
    /* Tell a damaged FITS file from something that is not FITS at all by
     * its first bytes: a FITS file starts with "SIMPLE  =", compressed ones
     * with the gzip (1f 8b), compress (1f 9d) or bzip2 ("BZh") signature. */
    unsigned char head[10] = {0};
    size_t nhead = 0;
    FILE *raw = fopen(root, "rb");
    if (raw != NULL) {
        nhead = fread(head, 1, sizeof head, raw);
        fclose(raw);
    }
    int looks_fits = nhead >= 9 && memcmp(head, "SIMPLE  =", 9) == 0;
    int compressed = nhead >= 3 && ((head[0] == 0x1f && (head[1] == 0x8b || head[1] == 0x9d)) ||
                                    memcmp(head, "BZh", 3) == 0);
    if (raw != NULL && nhead == 0) {
        fits_clear_errmsg();
        return hilal_error_set(err, HILAL_ERR_FORMAT,
                               "%s is empty (0 bytes), not a FITS file; copy or download it "
                               "again",
                               path);
    }
    if (raw != NULL && !looks_fits && !compressed)
        return fits_fail(err, HILAL_ERR_FORMAT, status,
                         "%s is not a FITS file (it does not start with SIMPLE  =); check that "
                         "the name points at the image",
                         path);
    if (status == END_OF_FILE || status == READ_ERROR || status == NO_END)
        return fits_fail(err, HILAL_ERR_FITS, status,
                         "%s is truncated or damaged (the file ends inside its first header); "
                         "copy or download it again",
                         path);
    if (status == BAD_HDU_NUM || status == URL_PARSE_ERROR)
        return fits_fail(err, HILAL_ERR_NOTFOUND, status,
                         "%s: the HDU named in [...] does not exist; check the extension name "
                         "or number (CFITSIO counts from 0 = primary)",
                         path);
    return fits_fail(err, HILAL_ERR_FORMAT, status,
                     "%s: CFITSIO cannot read the headers (the file breaks the FITS rules); "
                     "run fitsverify on it to see what is wrong, then repair or re-create it",
                     path);
}

/* Chooses the HDU: explicit number, the one selected by [ext] syntax, or
 * the first image HDU with data. On success the file is positioned there. */
static hilal_status choose_hdu(fitsfile *f, const char *path, int hdu, int ext_given,
                               int *chosen, hilal_error *err)
{
    int status = 0, nhdu = 0, current = 1;
    char why[160];
    fits_get_hdu_num(f, &current);
    if (ext_given) {
        if (hdu > 0 && hdu != current)
            return hilal_error_set(err, HILAL_ERR_USAGE,
                                   "%s selects HDU %d but HDU %d was asked for as well; give "
                                   "the HDU one way only",
                                   path, current, hdu);
        *chosen = current;
        return HILAL_OK;
    }
    if (hdu > 0) {
        fits_movabs_hdu(f, hdu, NULL, &status);
        if (status == 0) {
            *chosen = hdu;
            return HILAL_OK;
        }
        if (status == END_OF_FILE || status == BAD_HDU_NUM) {
            int ignored = 0;
            fits_clear_errmsg();
            fits_get_num_hdus(f, &nhdu, &ignored);
            return hilal_error_set(err, HILAL_ERR_NOTFOUND,
                                   "%s has %d HDU%s, there is no HDU %d; pick one of 1..%d "
                                   "(1 = primary)",
                                   path, nhdu, nhdu == 1 ? "" : "s", hdu, nhdu);
        }
        return fits_fail(err, HILAL_OK, status, "%s: cannot move to HDU %d", path, hdu);
    }
    /* Automatic choice: walk the HDUs in order, remembering why each one
     * was passed over so that a file without an image gets a useful message. */
    char skipped[HILAL_ERROR_MSG_MAX / 2] = "";
    size_t used = 0;
    for (int i = 1;; i++) {
        fits_movabs_hdu(f, i, NULL, &status);
        if (status == END_OF_FILE && i > 1) {
            fits_clear_errmsg();
            break;
        }
        if (status != 0)
            return fits_fail(err, HILAL_OK, status,
                             "%s: HDU %d cannot be read (truncated or damaged file?); copy or "
                             "download it again",
                             path, i);
        const char *bad = hdu_unusable(f, i, why, sizeof why, &status);
        if (status != 0)
            return fits_fail(err, HILAL_OK, status, "%s: HDU %d cannot be read", path, i);
        if (bad == NULL) {
            *chosen = i;
            return HILAL_OK;
        }
        if (used < sizeof skipped)
            used += (size_t)snprintf(skipped + used, sizeof skipped - used, "%sHDU %d is %s",
                                     used ? ", " : "", i, bad);
    }
    return hilal_error_set(err, HILAL_ERR_FORMAT,
                           "%s has no image HDU with data (%s); give a file that holds an "
                           "image",
                           path, skipped);
}

/* Checks that the chosen HDU is a 2-D image (or 1-D, or with extra axes of
 * length 1) and returns its size. */
static hilal_status image_shape(fitsfile *f, const char *where, int hdunum, long *nx, long *ny,
                                hilal_error *err)
{
    int status = 0, naxis = 0;
    long naxes[9] = {0};
    char why[160];
    const char *bad = hdu_unusable(f, hdunum, why, sizeof why, &status);
    if (status != 0)
        return fits_fail(err, HILAL_OK, status, "%s: cannot read the header", where);
    if (bad != NULL)
        return hilal_error_set(err, HILAL_ERR_FORMAT,
                               "%s is %s; pick an image HDU (or leave the HDU unset to take "
                               "the first image)",
                               where, bad);
    fits_get_img_dim(f, &naxis, &status);
    if (status == 0 && naxis > 9)
        return hilal_error_set(err, HILAL_ERR_FORMAT, "%s has NAXIS = %d; not an image",
                               where, naxis);
    fits_get_img_size(f, naxis, naxes, &status);
    if (status != 0)
        return fits_fail(err, HILAL_OK, status, "%s: cannot read the image size", where);
    for (int i = 2; i < naxis; i++) {
        if (naxes[i] > 1) {
            char dims[128] = "";
            size_t used = 0;
            for (int k = 0; k < naxis && used < sizeof dims; k++)
                used += (size_t)snprintf(dims + used, sizeof dims - used, "%s%ld",
                                         k ? " x " : "", naxes[k]);
            return hilal_error_set(err, HILAL_ERR_FORMAT,
                                   "%s is a %d-D cube (%s px); Hilal reads 2-D images: select "
                                   "one plane with an image section, e.g. 'file.fits[*,*,1:1]'",
                                   where, naxis, dims);
        }
    }
    *nx = naxes[0];
    *ny = naxis >= 2 ? naxes[1] : 1;
    if ((double)*nx * (double)*ny > 1e10)
        return hilal_error_set(err, HILAL_ERR_RANGE, "%s is %ld x %ld px, too large", where, *nx,
                               *ny);
    return HILAL_OK;
}

/* Sets the no-data pixels (not finite, or +-FLT_MAX) of pix to NaN and
 * flags them NODATA; with zero_tiny, also sets -0 and denormal values (a
 * float32 exponent of 0) to +0, as CFITSIO's null check does. Each block
 * of pixels is first tested with a branch-free count, which the compiler
 * vectorises: blocks without such a pixel, nearly all, are read once and
 * not written. */
static void flag_nodata(float *pix, hilal_mask_t *mask, size_t n, int zero_tiny)
{
    enum { BLOCK = 4096 };
    const uint32_t tiny = zero_tiny ? 1u : 0u;
    for (size_t b0 = 0; b0 < n; b0 += BLOCK) {
        size_t b1 = b0 + BLOCK < n ? b0 + BLOCK : n, nfix = 0;
        for (size_t i = b0; i < b1; i++) {
            uint32_t bits;
            memcpy(&bits, &pix[i], sizeof bits);
            nfix += !(fabsf(pix[i]) < FLT_MAX); /* NaN, +-Inf, +-FLT_MAX */
            nfix += tiny & ((bits & 0x7f800000u) == 0) & (bits != 0); /* -0, denormal */
        }
        for (size_t i = b0; nfix > 0 && i < b1; i++) {
            if (!(fabsf(pix[i]) < FLT_MAX)) {
                pix[i] = NAN;
                mask[i] |= HILAL_MASK_NODATA;
            } else if (zero_tiny && fabsf(pix[i]) < FLT_MIN) {
                pix[i] = 0.0f;
            }
        }
    }
}

hilal_status hilal_fits_read_image_primary(const char *path, int hdu, hilal_image **out,
                                           char **primary_header, int *nprimary_cards,
                                           hilal_error *err)
{
    fitsfile *f = NULL;
    hilal_image *img = NULL;
    char root[FLEN_FILENAME];
    char where[FLEN_FILENAME + 32];
    int status = 0, ext_given = 0, chosen = 0;
    long nx = 0, ny = 0;
    hilal_status st;

    *out = NULL;
    if (primary_header != NULL) {
        *primary_header = NULL;
        *nprimary_cards = 0;
    }
    if (hdu < 0) {
        st = hilal_error_set(err, HILAL_ERR_RANGE,
                             "%s: HDU %d is not valid; use 0 (first image) or 1, 2, ...", path,
                             hdu);
        goto cleanup;
    }
    st = open_input(path, &f, root, sizeof root, &ext_given, err);
    if (st != HILAL_OK)
        goto cleanup;
    st = choose_hdu(f, path, hdu, ext_given, &chosen, err);
    if (st != HILAL_OK)
        goto cleanup;
    snprintf(where, sizeof where, "%s, HDU %d", root, chosen);
    st = image_shape(f, where, chosen, &nx, &ny, err);
    if (st != HILAL_OK)
        goto cleanup;

    img = hilal_image_new(nx, ny, err);
    if (img == NULL) {
        st = HILAL_ERR_NOMEM;
        hilal_error_context(err, "%s", where);
        goto cleanup;
    }
    hilal_meta *meta = &img->meta;
    if (strlen(root) >= sizeof meta->path) {
        st = hilal_error_set(err, HILAL_ERR_IO, "%s: file name longer than %zu characters",
                             root, sizeof meta->path - 1);
        goto cleanup;
    }
    memcpy(meta->path, root, strlen(root) + 1);
    meta->hdu = chosen;

    /* Type and scaling as stored (ZBITPIX for tile-compressed images). */
    fits_get_img_type(f, &meta->bitpix, &status);
    if (fits_read_key(f, TDOUBLE, "BSCALE", &meta->bscale, NULL, &status) == KEY_NO_EXIST) {
        status = 0;
        meta->bscale = 1.0;
    }
    if (fits_read_key(f, TDOUBLE, "BZERO", &meta->bzero, NULL, &status) == KEY_NO_EXIST) {
        status = 0;
        meta->bzero = 0.0;
    }
    fits_clear_errmsg();
    if (status != 0) {
        st = fits_fail(err, HILAL_OK, status, "%s: bad BITPIX, BSCALE or BZERO", where);
        goto cleanup;
    }

    /* Pixels: CFITSIO applies BSCALE/BZERO and converts to float32; pixels
     * equal to BLANK (integer images) and NaN (floating-point images) are
     * returned as the null value we pass, NaN, and the check that finds
     * them also turns float zeros and denormals (exponent 0) into +0. An
     * unscaled, uncompressed float32 image is copied as it is, so there
     * the check, a scalar pass over every pixel, is left out (null value 0
     * tells CFITSIO so), and flag_nodata below does its work in its own
     * vectorised pass: NaN and +-Inf are no data either way. */
    size_t n = (size_t)nx * (size_t)ny;
    int compressed = fits_is_compressed_image(f, &status);
    int plain_float = meta->bitpix == FLOAT_IMG && !compressed && meta->bscale == 1.0 &&
                      meta->bzero == 0.0 && status == 0;
    float nulval = plain_float ? 0.0f : NAN;
    int anynul = 0;
    fits_read_img(f, TFLOAT, 1, (LONGLONG)n, &nulval, img->pix, &anynul, &status);
    if (status == NUM_OVERFLOW) {
        st = fits_fail(err, HILAL_ERR_RANGE, status,
                       "%s: pixel values exceed the float32 range after BSCALE/BZERO; "
                       "rescale the image",
                       where);
        goto cleanup;
    }
    if (status == END_OF_FILE || status == READ_ERROR) {
        struct stat sb;
        long long size = stat(root, &sb) == 0 ? (long long)sb.st_size : -1;
        st = fits_fail(err, HILAL_ERR_FITS, status,
                       "%s: the file is truncated (it has %lld bytes, fewer than its header "
                       "announces); copy or download it again",
                       where, size);
        goto cleanup;
    }
    if (status != 0) {
        st = fits_fail(err, HILAL_OK, status,
                       "%s: cannot read the pixels (damaged or unsupported compression?)",
                       where);
        goto cleanup;
    }
    /* No data: NaN from the file or from BLANK, +-Inf, and +-FLT_MAX, the
     * largest float32 magnitude, which no detector produces and which some
     * pipelines write as a fill value (ZTF reference images use -FLT_MAX).
     * CFITSIO clips values only on overflow, which was rejected above. */
    flag_nodata(img->pix, img->mask, n, plain_float);

    st = read_header(f, where, &meta->header, &meta->nheader_cards, err);
    if (st != HILAL_OK)
        goto cleanup;

    /* A WCS that cannot be used is a warning: alignment can still match stars. */
    hilal_error werr;
    hilal_error_clear(&werr);
    if (hilal_wcs_from_header(meta->header, meta->nheader_cards, &meta->wcs, &werr) != HILAL_OK) {
        hilal_log(HILAL_LOG_WARN, "%s: %s; reading it without WCS", where, werr.msg);
        meta->wcs = NULL;
    }

    /* The checksum is of the file's bytes as stored. CFITSIO opens
     * name.gz (or .Z, .z, .bz2) when name itself does not exist: hash that. */
    static const char *const suffix[] = {"", ".gz", ".Z", ".z", ".bz2"};
    for (size_t k = 0; k < sizeof suffix / sizeof suffix[0]; k++) {
        char actual[FLEN_FILENAME + 8];
        snprintf(actual, sizeof actual, "%s%s", root, suffix[k]);
        if (is_regular_file(actual)) {
            st = hilal_sha256_file(actual, meta->sha256, err);
            if (st != HILAL_OK) {
                hilal_error_context(err, "%s", where);
                goto cleanup;
            }
            break;
        }
    }

    if (primary_header != NULL && chosen > 1) {
        fits_movabs_hdu(f, 1, NULL, &status);
        if (status != 0) {
            st = fits_fail(err, HILAL_OK, status, "%s: cannot read the primary header", root);
            goto cleanup;
        }
        st = read_header(f, root, primary_header, nprimary_cards, err);
        if (st != HILAL_OK)
            goto cleanup;
    }

cleanup:
    if (f != NULL) {
        int ignored = 0;
        fits_close_file(f, &ignored);
        fits_clear_errmsg();
    }
    if (st != HILAL_OK) {
        hilal_image_free(img);
        img = NULL;
        if (primary_header != NULL) {
            free(*primary_header);
            *primary_header = NULL;
            *nprimary_cards = 0;
        }
    }
    *out = img;
    return st;
}

hilal_status hilal_fits_read_image(const char *path, int hdu, hilal_image **out, hilal_error *err)
{
    return hilal_fits_read_image_primary(path, hdu, out, NULL, NULL, err);
}

/* ------------------------------------------------------------------------
 * Header helpers
 * ------------------------------------------------------------------------ */

/* Copies card i of header into card[FLEN_CARD], NUL-terminated. */
static void get_card(const char *header, int i, char *card)
{
    memcpy(card, header + (size_t)i * 80, 80);
    card[80] = '\0';
}

/* The keyword name of a card (HIERARCH names without the HIERARCH prefix),
 * upper-cased, into name[FLEN_KEYWORD]. */
static void card_name(char *card, char *name)
{
    int len = 0, status = 0;
    name[0] = '\0';
    if (fits_get_keyname(card, name, &len, &status) != 0) {
        name[0] = '\0';
        fits_clear_errmsg();
        return;
    }
    for (char *p = name; *p; p++)
        *p = (char)toupper((unsigned char)*p);
}

/* Normalises a user keyword: upper case, without a leading "HIERARCH ". */
static void normalise_key(const char *key, char *out, size_t len)
{
    while (isspace((unsigned char)*key))
        key++;
    if (strncasecmp(key, "HIERARCH ", 9) == 0)
        key += 9;
    size_t i = 0;
    for (; key[i] != '\0' && i + 1 < len; i++)
        out[i] = (char)toupper((unsigned char)key[i]);
    while (i > 0 && isspace((unsigned char)out[i - 1]))
        i--;
    out[i] = '\0';
}

hilal_fits_key_state hilal_fits_header_get(const char *header, int ncards, const char *key,
                                           char *value, size_t len)
{
    char want[FLEN_KEYWORD], card[FLEN_CARD], name[FLEN_KEYWORD];
    char raw[FLEN_VALUE + 8], comment[FLEN_COMMENT + 8];
    if (len > 0)
        value[0] = '\0';
    if (header == NULL || key == NULL)
        return HILAL_FITS_KEY_MISSING;
    normalise_key(key, want, sizeof want);
    if (want[0] == '\0')
        return HILAL_FITS_KEY_MISSING;
    size_t hlen = strlen(header);
    for (int i = 0; i < ncards && (size_t)(i + 1) * 80 <= hlen; i++) {
        get_card(header, i, card);
        card_name(card, name);
        if (strcmp(name, want) != 0)
            continue;
        int status = 0;
        raw[0] = '\0';
        if (fits_parse_value(card, raw, comment, &status) != 0) {
            fits_clear_errmsg();
            return HILAL_FITS_KEY_UNDEFINED;
        }
        if (raw[0] == '\0')
            return HILAL_FITS_KEY_UNDEFINED;
        if (raw[0] == '\'') {
            /* A string: drop the quotes, undo '' escapes and trailing blanks
             * (which FITS says are not significant). */
            size_t o = 0;
            for (size_t k = 1; raw[k] != '\0' && o + 1 < len; k++) {
                if (raw[k] == '\'') {
                    if (raw[k + 1] == '\'') {
                        value[o++] = '\'';
                        k++;
                        continue;
                    }
                    break;
                }
                value[o++] = raw[k];
            }
            while (o > 0 && value[o - 1] == ' ')
                o--;
            if (len > 0)
                value[o] = '\0';
        } else {
            snprintf(value, len, "%s", raw);
        }
        return HILAL_FITS_KEY_FOUND;
    }
    return HILAL_FITS_KEY_MISSING;
}

hilal_status hilal_fits_header_get_double(const char *header, int ncards, const char *key,
                                          double *value, hilal_fits_key_state *state,
                                          hilal_error *err)
{
    char text[FLEN_VALUE + 8];
    *value = NAN;
    *state = hilal_fits_header_get(header, ncards, key, text, sizeof text);
    if (*state != HILAL_FITS_KEY_FOUND)
        return HILAL_OK;
    /* FITS allows a 'D' exponent for double precision (1.5D+03). */
    char num[FLEN_VALUE + 8];
    snprintf(num, sizeof num, "%s", text);
    for (char *p = num; *p; p++)
        if (*p == 'D' || *p == 'd')
            *p = 'E';
    char *end = NULL;
    errno = 0;
    const char *start = num;
    while (isspace((unsigned char)*start))
        start++;
    double v = strtod(start, &end);
    while (end != NULL && isspace((unsigned char)*end))
        end++;
    if (end == start || errno == ERANGE || *end != '\0' || !isfinite(v))
        return hilal_error_set(err, HILAL_ERR_FITS,
                               "keyword %s = '%s' is not a number", key, text);
    *value = v;
    return HILAL_OK;
}

hilal_status hilal_fits_date_to_mjd(const char *date, double *mjd, int *has_time,
                                    hilal_error *err)
{
    int year = 0, month = 0, day = 0, hour = 0, minute = 0, status = 0;
    double second = 0.0;
    char buf[FLEN_VALUE + 8];
    *mjd = NAN;
    *has_time = 0;
    snprintf(buf, sizeof buf, "%s", date);
    /* Trailing blanks and a trailing 'Z' (UTC designator) are not part of
     * the FITS date format but occur in practice. */
    size_t n = strlen(buf);
    while (n > 0 && (buf[n - 1] == ' ' || buf[n - 1] == 'Z'))
        buf[--n] = '\0';
    fits_str2time(buf, &year, &month, &day, &hour, &minute, &second, &status);
    if (status != 0) {
        fits_clear_errmsg();
        return hilal_error_set(err, HILAL_ERR_FORMAT,
                               "'%s' is not a FITS date (YYYY-MM-DD[Thh:mm:ss] or DD/MM/YY)",
                               date);
    }
    *has_time = strchr(buf, 'T') != NULL;
    /* Julian Day Number of the Gregorian calendar date (Fliegel & Van
     * Flandern 1968, Comm. ACM 11, 657), exact in integer arithmetic; the
     * MJD of 0h UT on that day is JDN - 2400001 (JD = JDN - 0.5 at 0h and
     * MJD = JD - 2400000.5). */
    long a = (14 - month) / 12;
    long y = year + 4800 - a;
    long m = month + 12 * a - 3;
    long jdn = day + (153 * m + 2) / 5 + 365 * y + y / 4 - y / 100 + y / 400 - 32045;
    *mjd = (double)(jdn - 2400001) + (hour + minute / 60.0 + second / 3600.0) / 24.0;
    return HILAL_OK;
}

/* ------------------------------------------------------------------------
 * Writing
 * ------------------------------------------------------------------------ */

struct hilal_fits_writer {
    fitsfile *f;
    int nhdu;                   /* HDUs written so far */
    int in_memory;              /* a header alone (hilal_fits_header_open), no file */
    hilal_fits_checksum checksum; /* how CHECKSUM/DATASUM are commented */
    char path[FLEN_FILENAME];   /* target, or a description of the in-memory header */
    char tmp[FLEN_FILENAME];    /* file being written */
};

static hilal_status writer_open(const char *path, hilal_fits_writer **out, hilal_error *err)
{
    hilal_fits_writer *w = NULL;
    char dir[FLEN_FILENAME], base[FLEN_FILENAME];
    int status = 0;
    hilal_status st = HILAL_OK;
    *out = NULL;
    if (strlen(path) + 16 >= FLEN_FILENAME) {
        st = hilal_error_set(err, HILAL_ERR_IO, "%s: file name too long", path);
        goto fail;
    }
    w = calloc(1, sizeof *w);
    if (w == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory opening %s", path);
        goto fail;
    }
    /* A unique temporary name in the target's directory, so that the final
     * rename() is atomic (same file system). The length test above leaves
     * room for it; the checks below keep a change there from cutting a name
     * short. */
    if ((size_t)snprintf(w->path, sizeof w->path, "%s", path) >= sizeof w->path ||
        (size_t)snprintf(dir, sizeof dir, "%s", path) >= sizeof dir ||
        (size_t)snprintf(base, sizeof base, "%s", path) >= sizeof base ||
        (size_t)snprintf(w->tmp, sizeof w->tmp, "%s/.%s.tmp-XXXXXX", dirname(dir),
                         basename(base)) >= sizeof w->tmp) {
        st = hilal_error_set(err, HILAL_ERR_IO, "%s: file name too long", path);
        goto fail;
    }
    int fd = mkstemp(w->tmp);
    if (fd < 0) {
        st = hilal_error_set(err, HILAL_ERR_IO,
                             "cannot write %s: %s; check that the directory exists and is "
                             "writable",
                             path, strerror(errno));
        goto fail;
    }
    close(fd);
    unlink(w->tmp); /* CFITSIO creates the file itself and refuses to overwrite */
    fits_create_diskfile(&w->f, w->tmp, &status);
    if (status != 0) {
        w->f = NULL;
        st = fits_fail(err, HILAL_ERR_IO, status, "cannot create %s", w->tmp);
        goto fail;
    }
    *out = w;
    return HILAL_OK;
fail:
    hilal_fits_writer_free(w);
    return st;
}

hilal_fits_writer *hilal_fits_writer_open(const char *path, hilal_error *err)
{
    hilal_fits_writer *w = NULL;
    writer_open(path, &w, err);
    return w;
}

void hilal_fits_writer_free(hilal_fits_writer *w)
{
    if (w == NULL)
        return;
    if (w->f != NULL && w->in_memory) {
        /* Back to the 1 x 1 size the memory file was made with, so that
         * closing it pads one pixel only (see hilal_fits_header_open). */
        int status = 0;
        fits_update_key_lng(w->f, "NAXIS1", 1, NULL, &status);
        fits_update_key_lng(w->f, "NAXIS2", 1, NULL, &status);
        status = 0;
        fits_close_file(w->f, &status);
        fits_clear_errmsg();
    } else if (w->f != NULL) {
        /* Close, then remove by name ourselves: fits_delete_file() would
         * parse [...] in the name as extended syntax. */
        int status = 0;
        fits_close_file(w->f, &status);
        fits_clear_errmsg();
        unlink(w->tmp);
    }
    free(w);
}

/* need_hdu: 1 for key functions (an HDU must exist), 0 for functions that
 * add an HDU or close the file (not allowed on an in-memory header). */
static hilal_status writer_check(hilal_fits_writer *w, int need_hdu, hilal_error *err)
{
    if (w == NULL || w->f == NULL)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "FITS writer used after close");
    if (!need_hdu && w->in_memory)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "%s: an in-memory header holds one HDU and is not closed; take "
                               "its cards with hilal_fits_writer_header()",
                               w->path);
    if (need_hdu && w->nhdu == 0)
        return hilal_error_set(err, HILAL_ERR_INTERNAL,
                               "%s: keyword written before any HDU was added", w->path);
    return HILAL_OK;
}

/* Creates the next HDU (primary if none yet) with the given image type. */
static hilal_status writer_new_hdu(hilal_fits_writer *w, int bitpix, int naxis, long nx, long ny,
                                   const char *extname, hilal_error *err)
{
    int status = 0;
    long naxes[2] = {nx, ny};
    if (naxis > 0 && (nx <= 0 || ny <= 0))
        return hilal_error_set(err, HILAL_ERR_RANGE, "%s: image size %ld x %ld is not positive",
                               w->path, nx, ny);
    fits_create_img(w->f, bitpix, naxis, naxes, &status);
    if (extname != NULL && extname[0] != '\0')
        fits_update_key(w->f, TSTRING, "EXTNAME", (void *)extname, "extension name", &status);
    if (status != 0)
        return fits_fail(err, HILAL_ERR_IO, status, "%s: cannot add HDU %d", w->path,
                         w->nhdu + 1);
    w->nhdu++;
    return HILAL_OK;
}

/* A new image HDU of type imgtype (FLOAT_IMG, USHORT_IMG) holding the
 * float pixels, which CFITSIO converts to that type. */
static hilal_status writer_add_pixels(hilal_fits_writer *w, int imgtype, const char *extname,
                                      long nx, long ny, const float *pix, hilal_error *err)
{
    hilal_status st = writer_new_hdu(w, imgtype, 2, nx, ny, extname, err);
    if (st != HILAL_OK)
        return st;
    int status = 0;
    fits_write_img(w->f, TFLOAT, 1, (LONGLONG)nx * ny, (void *)pix, &status);
    if (status != 0)
        return fits_fail(err, HILAL_ERR_IO, status, "%s: cannot write the pixels of HDU %d",
                         w->path, w->nhdu);
    return HILAL_OK;
}

hilal_status hilal_fits_writer_add_float(hilal_fits_writer *w, const char *extname, long nx,
                                         long ny, const float *pix, hilal_error *err)
{
    hilal_status st = writer_check(w, 0, err);
    if (st == HILAL_OK)
        st = writer_add_pixels(w, FLOAT_IMG, extname, nx, ny, pix, err);
    return st;
}

/* CFITSIO stores a float into BITPIX 16 with BZERO 32768 as
 * round(value - 32768) (halves away from zero) and fails beyond
 * [-32768.49, 32767.49]; these bounds say the same of the value itself. */
#define UINT16_MIN_STORABLE (-0.49)
#define UINT16_MAX_STORABLE 65535.49

hilal_status hilal_fits_writer_add_uint16(hilal_fits_writer *w, const char *extname, long nx,
                                          long ny, const float *pix, hilal_error *err)
{
    hilal_status st = writer_check(w, 0, err);
    if (st != HILAL_OK)
        return st;
    /* Every value must fit before anything is added, so that a bad pixel
     * leaves no half-written HDU and is named in the message. */
    for (long y = 0; y < ny; y++)
        for (long x = 0; x < nx; x++) {
            double v = pix[y * nx + x];
            if (!(v >= UINT16_MIN_STORABLE && v <= UINT16_MAX_STORABLE))
                return hilal_error_set(err, HILAL_ERR_RANGE,
                                       "%s: pixel (%ld, %ld) of HDU %d is %g, which an "
                                       "unsigned 16-bit image cannot hold (0 to 65535); clip "
                                       "and round the image first or write it as float",
                                       w->path, x + 1, y + 1, w->nhdu + 1, v);
        }
    return writer_add_pixels(w, USHORT_IMG, extname, nx, ny, pix, err);
}

hilal_status hilal_fits_writer_add_table(hilal_fits_writer *w, const char *extname,
                                         const hilal_fits_column *cols, int ncols, long nrows,
                                         hilal_error *err)
{
    hilal_status st = writer_check(w, 0, err);
    if (st != HILAL_OK)
        return st;
    if (ncols < 1 || ncols > 999 || nrows < 0)
        return hilal_error_set(err, HILAL_ERR_RANGE, "%s: a table of %d columns and %ld rows",
                               w->path, ncols, nrows);
    for (int c = 0; c < ncols; c++)
        if (cols[c].name == NULL || (cols[c].type == 'D' ? cols[c].d == NULL && nrows > 0
                                     : cols[c].type == 'J' ? cols[c].j == NULL && nrows > 0 : 1))
            return hilal_error_set(err, HILAL_ERR_INTERNAL,
                                   "%s: table column %d has no name, an unknown type or no data",
                                   w->path, c + 1);
    /* a table cannot be the primary HDU */
    if (w->nhdu == 0 && (st = writer_new_hdu(w, BYTE_IMG, 0, 0, 0, NULL, err)) != HILAL_OK)
        return st;
    char **ttype = calloc((size_t)ncols, sizeof *ttype), **tform = calloc((size_t)ncols, sizeof *tform);
    char **tunit = calloc((size_t)ncols, sizeof *tunit);
    if (ttype == NULL || tform == NULL || tunit == NULL) {
        free(ttype);
        free(tform);
        free(tunit);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a FITS table");
    }
    for (int c = 0; c < ncols; c++) {
        ttype[c] = (char *)cols[c].name;
        tform[c] = cols[c].type == 'D' ? "1D" : "1J";
        tunit[c] = (char *)(cols[c].unit != NULL ? cols[c].unit : "");
    }
    int status = 0;
    fits_create_tbl(w->f, BINARY_TBL, (LONGLONG)nrows, ncols, ttype, tform, tunit, extname,
                    &status);
    for (int c = 0; c < ncols && status == 0; c++) {
        if (cols[c].comment != NULL) {
            char key[16];
            snprintf(key, sizeof key, "TTYPE%d", c + 1);
            fits_modify_comment(w->f, key, (char *)cols[c].comment, &status);
        }
        if (nrows > 0) {
            if (cols[c].type == 'D')
                fits_write_col(w->f, TDOUBLE, c + 1, 1, 1, (LONGLONG)nrows, (void *)cols[c].d,
                               &status);
            else
                fits_write_col(w->f, TINT, c + 1, 1, 1, (LONGLONG)nrows, (void *)cols[c].j,
                               &status);
        }
    }
    free(ttype);
    free(tform);
    free(tunit);
    if (status != 0)
        return fits_fail(err, HILAL_ERR_IO, status, "%s: cannot write table HDU %d", w->path,
                         w->nhdu + 1);
    w->nhdu++;
    return HILAL_OK;
}

const char *hilal_fits_mask_name(unsigned bit)
{
    switch (bit) {
    case HILAL_MASK_BAD: return "BAD";
    case HILAL_MASK_SAT: return "SAT";
    case HILAL_MASK_NODATA: return "NODATA";
    case HILAL_MASK_EDGE: return "EDGE";
    case HILAL_MASK_INTERP: return "INTERP";
    case HILAL_MASK_CR: return "CR";
    case HILAL_MASK_REFDEFECT: return "REFDEFECT";
    case HILAL_MASK_NEGVAR: return "NEGVAR";
    default: return NULL;
    }
}

hilal_status hilal_fits_writer_add_mask(hilal_fits_writer *w, const char *extname, long nx,
                                        long ny, const hilal_mask_t *mask, hilal_error *err)
{
    hilal_status st = writer_check(w, 0, err);
    if (st == HILAL_OK)
        st = writer_new_hdu(w, USHORT_IMG, 2, nx, ny, extname, err);
    if (st != HILAL_OK)
        return st;
    int status = 0;
    fits_write_img(w->f, TUSHORT, 1, (LONGLONG)nx * ny, (void *)mask, &status);
    /* Document the bits in the header: MASKB00 = 'BAD', ... */
    for (unsigned b = 0; b < 16 && status == 0; b++) {
        const char *name = hilal_fits_mask_name(1u << b);
        if (name == NULL)
            continue;
        char key[16], comment[64];
        snprintf(key, sizeof key, "MASKB%02u", b);
        snprintf(comment, sizeof comment, "meaning of mask bit %u (value %u)", b, 1u << b);
        fits_update_key(w->f, TSTRING, key, (void *)name, comment, &status);
    }
    if (status != 0)
        return fits_fail(err, HILAL_ERR_IO, status, "%s: cannot write the mask of HDU %d",
                         w->path, w->nhdu);
    return HILAL_OK;
}

hilal_status hilal_fits_writer_add_empty(hilal_fits_writer *w, const char *extname,
                                         hilal_error *err)
{
    hilal_status st = writer_check(w, 0, err);
    if (st != HILAL_OK)
        return st;
    return writer_new_hdu(w, BYTE_IMG, 0, 0, 0, extname, err);
}

/* Shared tail of the key writers. */
static hilal_status key_done(hilal_fits_writer *w, const char *key, int status, hilal_error *err)
{
    if (status != 0)
        return fits_fail(err, HILAL_ERR_IO, status, "%s: cannot write keyword %s in HDU %d",
                         w->path, key, w->nhdu);
    return HILAL_OK;
}

hilal_status hilal_fits_writer_key_double(hilal_fits_writer *w, const char *key, double value,
                                          const char *comment, hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    int status = 0;
    if (isfinite(value)) {
        fits_update_key_dbl(w->f, key, value, -15, comment, &status);
    } else {
        /* FITS has no NaN: an unknown value is no keyword at all (an
         * undefined value would draw a fitsverify warning). */
        if (fits_delete_key(w->f, key, &status) == KEY_NO_EXIST) {
            status = 0;
            fits_clear_errmsg();
        }
    }
    return key_done(w, key, status, err);
}

hilal_status hilal_fits_writer_key_int(hilal_fits_writer *w, const char *key, long long value,
                                       const char *comment, hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    int status = 0;
    LONGLONG v = value;
    fits_update_key(w->f, TLONGLONG, key, &v, comment, &status);
    return key_done(w, key, status, err);
}

hilal_status hilal_fits_writer_key_string(hilal_fits_writer *w, const char *key,
                                          const char *value, const char *comment,
                                          hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    int status = 0;
    if (strlen(value) > 68) /* long strings need the CONTINUE convention */
        fits_update_key_longstr(w->f, key, value, comment, &status);
    else
        fits_update_key(w->f, TSTRING, key, (void *)value, comment, &status);
    return key_done(w, key, status, err);
}

hilal_status hilal_fits_writer_key_uint(hilal_fits_writer *w, const char *key,
                                        unsigned long long value, const char *comment,
                                        hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    /* CFITSIO updates no unsigned 64-bit keyword (fits_update_key with
     * TULONGLONG fails): make the card as fits_write_key_ulng would and
     * update it by name. */
    int status = 0;
    char value_text[32], card[FLEN_CARD];
    snprintf(value_text, sizeof value_text, "%llu", value);
    fits_make_key(key, value_text, comment, card, &status);
    fits_update_card(w->f, key, card, &status);
    return key_done(w, key, status, err);
}

hilal_status hilal_fits_writer_key_bool(hilal_fits_writer *w, const char *key, int value,
                                        const char *comment, hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    int status = 0, v = value != 0;
    fits_update_key(w->f, TLOGICAL, key, &v, comment, &status);
    return key_done(w, key, status, err);
}

hilal_status hilal_fits_writer_history(hilal_fits_writer *w, const char *text, hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    int status = 0;
    fits_write_history(w->f, text, &status);
    return key_done(w, "HISTORY", status, err);
}

hilal_status hilal_fits_writer_comment(hilal_fits_writer *w, const char *text, hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    int status = 0;
    fits_write_comment(w->f, text, &status);
    return key_done(w, "COMMENT", status, err);
}

/* Whether name (upper case, HIERARCH prefix removed) describes the stored
 * data and must not be copied onto a new HDU. */
static int is_structural(const char *name)
{
    static const char *const exact[] = {
        "SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT", "GROUPS",
        "BSCALE", "BZERO", "BLANK", "EXTNAME", "EXTVER", "EXTLEVEL", "CHECKSUM", "DATASUM",
        "END", "TFIELDS", "THEAP", "INHERIT"};
    for (size_t i = 0; i < sizeof exact / sizeof exact[0]; i++)
        if (strcmp(name, exact[i]) == 0)
            return 1;
    if (strncmp(name, "NAXIS", 5) == 0 && isdigit((unsigned char)name[5]))
        return 1;
    /* Tile-compression (ZIMAGE, ZBITPIX, ZNAXISn, ZTILEn, ZCMPTYPE, ZNAMEn,
     * ZVALn, ZQUANTIZ, ZDITHER0, ZSIMPLE, ZTENSION, ZEXTEND, ZBLANK, ZSCALE,
     * ZZERO, ZHECKSUM, ZDATASUM, ZPCOUNT, ZGCOUNT) and table column keywords. */
    static const char *const prefix[] = {
        "ZIMAGE", "ZBITPIX", "ZNAXIS", "ZTILE", "ZCMPTYPE", "ZNAME", "ZVAL", "ZQUANTIZ",
        "ZDITHER", "ZSIMPLE", "ZTENSION", "ZEXTEND", "ZBLANK", "ZSCALE", "ZZERO", "ZHECKSUM",
        "ZDATASUM", "ZPCOUNT", "ZGCOUNT", "TTYPE", "TFORM", "TUNIT", "TNULL", "TSCAL", "TZERO",
        "TDISP", "TDIM", "TBCOL"};
    for (size_t i = 0; i < sizeof prefix / sizeof prefix[0]; i++) {
        size_t n = strlen(prefix[i]);
        if (strncmp(name, prefix[i], n) == 0 &&
            (name[n] == '\0' || isdigit((unsigned char)name[n]) || prefix[i][0] == 'Z'))
            return 1;
    }
    return 0;
}

/* Whether name is a world-coordinate keyword (FITS WCS papers I-IV and the
 * SIP convention), with an optional alternate-description letter. */
static int is_wcs_key(const char *name)
{
    static const char *const indexed[] = {"CTYPE", "CUNIT", "CRPIX", "CRVAL", "CDELT",
                                          "CROTA", "CRDER", "CSYER", "CNAME"};
    static const char *const plain[] = {"WCSAXES", "LONPOLE", "LATPOLE", "RADESYS", "RADECSYS",
                                        "EQUINOX", "EPOCH", "WCSNAME", "MJDREF", "RESTFRQ",
                                        "RESTWAV", "SPECSYS", "A_ORDER", "B_ORDER", "AP_ORDER",
                                        "BP_ORDER", "A_DMAX", "B_DMAX"};
    for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++) {
        size_t n = strlen(plain[i]);
        if (strncmp(name, plain[i], n) == 0 &&
            (name[n] == '\0' || (isupper((unsigned char)name[n]) && name[n + 1] == '\0')))
            return 1;
    }
    for (size_t i = 0; i < sizeof indexed / sizeof indexed[0]; i++) {
        size_t n = strlen(indexed[i]);
        if (strncmp(name, indexed[i], n) == 0 && isdigit((unsigned char)name[n]))
            return 1;
    }
    /* CDi_j, PCi_j, PVi_m, PSi_m (and the old PC00i00j form). */
    if ((strncmp(name, "CD", 2) == 0 || strncmp(name, "PC", 2) == 0 ||
         strncmp(name, "PV", 2) == 0 || strncmp(name, "PS", 2) == 0) &&
        isdigit((unsigned char)name[2]))
        return 1;
    /* SIP polynomial coefficients A_p_q, B_p_q, AP_p_q, BP_p_q. */
    if ((strncmp(name, "A_", 2) == 0 || strncmp(name, "B_", 2) == 0) &&
        isdigit((unsigned char)name[2]))
        return 1;
    if ((strncmp(name, "AP_", 3) == 0 || strncmp(name, "BP_", 3) == 0) &&
        isdigit((unsigned char)name[3]))
        return 1;
    return 0;
}

hilal_status hilal_fits_writer_copy_cards(hilal_fits_writer *w, const char *header, int ncards,
                                          hilal_fits_copy what, hilal_error *err)
{
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK || header == NULL)
        return st;
    char card[FLEN_CARD], name[FLEN_KEYWORD];
    size_t hlen = strlen(header);
    for (int i = 0; i < ncards && (size_t)(i + 1) * 80 <= hlen; i++) {
        get_card(header, i, card);
        card_name(card, name);
        if (strcmp(name, "END") == 0)
            break;
        if (what == HILAL_FITS_COPY_WCS ? !is_wcs_key(name) : is_structural(name))
            continue;
        if (is_standard_comment(card))
            continue;
        int status = 0;
        int commentary = name[0] == '\0' || strcmp(name, "COMMENT") == 0 ||
                         strcmp(name, "HISTORY") == 0 || strcmp(name, "CONTINUE") == 0;
        if (commentary)
            fits_write_record(w->f, card, &status);
        else
            fits_update_card(w->f, name, card, &status);
        if (status != 0) {
            /* A card CFITSIO will not write (bad characters, ...) is dropped
             * rather than failing the whole file. */
            fits_clear_errmsg();
            hilal_log(HILAL_LOG_WARN, "%s: header card %d not copied (%.80s)", w->path, i + 1,
                      card);
        }
    }
    return HILAL_OK;
}

void hilal_fits_writer_set_checksum(hilal_fits_writer *w, hilal_fits_checksum how)
{
    if (w != NULL)
        w->checksum = how;
}

/* After fits_write_chksum on the current HDU: puts fixed text in place of
 * the time in the CHECKSUM and DATASUM comments, then computes CHECKSUM
 * again over the changed header. The FITS checksum convention (FITS
 * Standard 4.0, Appendix J): DATASUM is the 32-bit 1's-complement sum of
 * the data unit; CHECKSUM, computed while it reads '0000000000000000',
 * holds the ASCII-encoded complement of the sum of the whole HDU, so that
 * the HDU then sums to -0. DATASUM does not change (only the header did). */
static void fix_checksum_comments(fitsfile *f, int *status)
{
    unsigned long datasum = 0, hdusum = 0;
    char encoded[17];
    fits_modify_comment(f, "DATASUM", "data unit checksum", status);
    fits_modify_comment(f, "CHECKSUM", "HDU checksum", status);
    /* "&": keep the comment just written. */
    fits_modify_key_str(f, "CHECKSUM", "0000000000000000", "&", status);
    fits_get_chksum(f, &datasum, &hdusum, status);
    if (*status != 0)
        return;
    fits_encode_chksum(hdusum, 1, encoded);
    fits_modify_key_str(f, "CHECKSUM", encoded, "&", status);
}

hilal_status hilal_fits_writer_close(hilal_fits_writer *w, hilal_error *err)
{
    hilal_status st = writer_check(w, 0, err);
    if (st != HILAL_OK) {
        hilal_fits_writer_free(w);
        return st;
    }
    int status = 0;
    if (w->nhdu == 0) /* a valid, empty file */
        st = writer_new_hdu(w, BYTE_IMG, 0, 0, 0, NULL, err);
    if (st != HILAL_OK) {
        hilal_fits_writer_free(w);
        return st;
    }
    /* CHECKSUM/DATASUM last, once every HDU is complete. */
    for (int i = 1; i <= w->nhdu && status == 0; i++) {
        fits_movabs_hdu(w->f, i, NULL, &status);
        fits_write_chksum(w->f, &status);
        if (w->checksum == HILAL_FITS_CHECKSUM_FIXED)
            fix_checksum_comments(w->f, &status);
    }
    if (status == 0) {
        fits_close_file(w->f, &status);
        w->f = NULL;
    }
    if (status != 0) {
        st = fits_fail(err, HILAL_ERR_IO, status, "cannot finish writing %s (disk full?)",
                       w->path);
        if (w->f == NULL)
            unlink(w->tmp);
        hilal_fits_writer_free(w);
        return st;
    }
    if (rename(w->tmp, w->path) != 0) {
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot move %s to %s: %s", w->tmp, w->path,
                             strerror(errno));
        unlink(w->tmp);
    }
    hilal_fits_writer_free(w);
    return st;
}

hilal_status hilal_fits_header_open(int bitpix, long nx, long ny, hilal_fits_writer **out,
                                    hilal_error *err)
{
    hilal_fits_writer *w = NULL;
    hilal_status st = HILAL_OK;
    int status = 0;
    *out = NULL;
    if (bitpix != FLOAT_IMG && bitpix != SHORT_IMG) {
        st = hilal_error_set(err, HILAL_ERR_RANGE,
                             "in-memory header: BITPIX %d is not one Hilal writes; use -32 "
                             "(float) or 16 (unsigned 16-bit)",
                             bitpix);
        goto cleanup;
    }
    if (nx <= 0 || ny <= 0) {
        st = hilal_error_set(err, HILAL_ERR_RANGE,
                             "in-memory header: image size %ld x %ld is not positive", nx, ny);
        goto cleanup;
    }
    w = calloc(1, sizeof *w);
    if (w == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for an in-memory FITS header");
        goto cleanup;
    }
    w->in_memory = 1;
    snprintf(w->path, sizeof w->path, "in-memory header");
    /* A one-pixel image in a memory file, so that no data unit of the full
     * size is ever allocated; NAXISn then say the real size (updated in
     * place on the same HDU; hilal_fits_writer_free restores 1 x 1 before
     * closing). A failed fits_create_file leaves w->f NULL. */
    long one[2] = {1, 1};
    fits_create_file(&w->f, "mem://", &status);
    fits_create_img(w->f, bitpix == SHORT_IMG ? USHORT_IMG : FLOAT_IMG, 2, one, &status);
    fits_update_key_lng(w->f, "NAXIS1", nx, NULL, &status);
    fits_update_key_lng(w->f, "NAXIS2", ny, NULL, &status);
    if (status != 0) {
        st = fits_fail(err, HILAL_ERR_FITS, status, "cannot start an in-memory FITS header");
        goto cleanup;
    }
    w->nhdu = 1;
    *out = w;
    w = NULL;
cleanup:
    hilal_fits_writer_free(w);
    return st;
}

hilal_status hilal_fits_writer_header(hilal_fits_writer *w, char **cards, int *ncards,
                                      hilal_error *err)
{
    *cards = NULL;
    *ncards = 0;
    hilal_status st = writer_check(w, 1, err);
    if (st != HILAL_OK)
        return st;
    int status = 0, nkeys = 0;
    char *str = NULL;
    fits_hdr2str(w->f, 0, NULL, 0, &str, &nkeys, &status);
    if (status != 0) {
        st = fits_fail(err, HILAL_ERR_FITS, status, "%s: cannot read back HDU %d's header",
                       w->path, w->nhdu);
        goto cleanup;
    }
    size_t len = strlen(str);
    *cards = malloc(len + 1);
    if (*cards == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for a header of %d cards",
                             nkeys);
        goto cleanup;
    }
    memcpy(*cards, str, len + 1);
    *ncards = nkeys;
cleanup:
    if (str != NULL) {
        int ignored = 0;
        fits_free_memory(str, &ignored);
    }
    return st;
}

hilal_status hilal_fits_write_image(const char *path, const hilal_image *img, hilal_error *err)
{
    hilal_fits_writer *w = NULL;
    hilal_status st = writer_open(path, &w, err);
    if (st != HILAL_OK)
        return st;
    st = hilal_fits_writer_add_float(w, NULL, img->nx, img->ny, img->pix, err);
    if (st == HILAL_OK && img->meta.header != NULL)
        st = hilal_fits_writer_copy_cards(w, img->meta.header, img->meta.nheader_cards,
                                          HILAL_FITS_COPY_ALL, err);
    if (st == HILAL_OK && img->mask != NULL && hilal_image_count_mask(img, 0xffffu) > 0)
        st = hilal_fits_writer_add_mask(w, "MASK", img->nx, img->ny, img->mask, err);
    if (st != HILAL_OK) {
        hilal_fits_writer_free(w);
        return st;
    }
    return hilal_fits_writer_close(w, err);
}
