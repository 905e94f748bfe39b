/* HDF5 helpers: error translation, the archive's file-opening rules, row
 * helpers and astropy column metadata. See h5.h. */
#include "h5.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------ */

void hilal_h5_quiet(void)
{
    /* The automatic printer writes to stderr: a library never prints. */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void hilal_h5_clear(void)
{
    H5Eclear2(H5E_DEFAULT);
}

typedef struct walk_ctx {
    int count;
    char api_func[64];   /* outermost entry: the API function that failed */
    char api_desc[256];  /* its description */
    char inner_desc[512];/* innermost entry: the specific reason */
} walk_ctx;

static herr_t walk_cb(unsigned n, const H5E_error2_t *e, void *data)
{
    walk_ctx *ctx = data;
    if (n == 0) {
        snprintf(ctx->api_func, sizeof ctx->api_func, "%s", e->func_name ? e->func_name : "?");
        snprintf(ctx->api_desc, sizeof ctx->api_desc, "%s", e->desc ? e->desc : "");
    }
    /* Walking downward, the last entry seen is the innermost one. */
    snprintf(ctx->inner_desc, sizeof ctx->inner_desc, "%s", e->desc ? e->desc : "");
    ctx->count++;
    return 0;
}

void hilal_h5_stack_text(char *buf, size_t len)
{
    walk_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    if (len == 0)
        return;
    buf[0] = '\0';
    if (H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, walk_cb, &ctx) < 0 || ctx.count == 0)
        return;
    if (ctx.count == 1 || strcmp(ctx.api_desc, ctx.inner_desc) == 0)
        snprintf(buf, len, "%s(): %s", ctx.api_func, ctx.api_desc);
    else
        snprintf(buf, len, "%s(): %s: %s", ctx.api_func, ctx.api_desc, ctx.inner_desc);
}

hilal_status hilal_h5_fail(hilal_error *err, hilal_status code, const char *fmt, ...)
{
    char msg[HILAL_ERROR_MSG_MAX];
    char detail[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    hilal_h5_stack_text(detail, sizeof detail);
    hilal_h5_clear();
    if (detail[0] != '\0')
        return hilal_error_set(err, code, "%s (HDF5: %s)", msg, detail);
    return hilal_error_set(err, code, "%s", msg);
}

/* ------------------------------------------------------------------------
 * Files
 * ------------------------------------------------------------------------ */

#define SWMR_READ_ATTEMPTS 30

hid_t hilal_h5_fapl(int locking)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0)
        return H5I_INVALID_HID;
    /* SWMR needs the 1.10 file format (superblock v3, extensible-array
     * chunk indexes); LATEST gives exactly that with HDF5 1.10. HDF5's
     * flock() is used where the file system has it (ignored elsewhere). */
    if (H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST) < 0 ||
        H5Pset_file_locking(fapl, locking ? 1 : 0, 1) < 0) {
        H5Pclose(fapl);
        return H5I_INVALID_HID;
    }
    return fapl;
}

hilal_status hilal_h5_create(const char *path, hid_t *fid, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t fapl = hilal_h5_fapl(1);
    *fid = H5I_INVALID_HID;
    if (fapl < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list");
        goto cleanup;
    }
    *fid = H5Fcreate(path, H5F_ACC_EXCL, H5P_DEFAULT, fapl);
    if (*fid < 0)
        st = hilal_h5_fail(err, HILAL_ERR_IO, "cannot create HDF5 file %s; check that its directory exists and is writable", path);
cleanup:
    if (fapl >= 0)
        H5Pclose(fapl);
    return st;
}

/* Clears the superblock status flags of a file whose writer died, like
 * `h5clear -s --increment` (HDF5 1.10 tools/src/h5clear/h5clear.c): the
 * three file-access properties used there are registered in every
 * file-access property list of the library although not declared in its
 * public headers. Clearing the flags alone (`h5clear -s`) would keep the
 * end-of-allocation address stored in the superblock; data written after it
 * by the dead writer would then be overwritten by the next allocation, so
 * the EOA is also moved past the end of the file. */
static hilal_status clear_status_flags(const char *path, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t fapl = hilal_h5_fapl(1), fid = H5I_INVALID_HID;
    hbool_t yes = 1;
    if (fapl < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list");
        goto cleanup;
    }
    if (H5Pexist(fapl, "clear_status_flags") <= 0 || H5Pexist(fapl, "skip_eof_check") <= 0 ||
        H5Pexist(fapl, "null_fsm_addr") <= 0) {
        hilal_h5_clear();
        st = hilal_error_set(err, HILAL_ERR_HDF5,
                             "%s was left open by a writer that stopped, and this HDF5 library "
                             "cannot clear the flag; run `h5clear -s --increment %s` (not "
                             "`h5clear -s` alone) and try again", path, path);
        goto cleanup;
    }
    if (H5Pset(fapl, "clear_status_flags", &yes) < 0 || H5Pset(fapl, "skip_eof_check", &yes) < 0 ||
        H5Pset(fapl, "null_fsm_addr", &yes) < 0) {
        st = hilal_h5_error(err, "cannot set the recovery properties for %s", path);
        goto cleanup;
    }
    fid = H5Fopen(path, H5F_ACC_RDWR, fapl);
    if (fid < 0) {
        st = hilal_h5_error(err, "cannot open %s to clear the flags left by a writer that stopped", path);
        goto cleanup;
    }
    /* EOA = max(EOA, EOF) + 1 MiB, as `h5clear --increment` does by default. */
    if (H5Fincrement_filesize(fid, (hsize_t)1 << 20) < 0) {
        st = hilal_h5_error(err, "cannot move the end of allocation of %s past its end of file", path);
        goto cleanup;
    }
cleanup:
    if (fid >= 0 && H5Fclose(fid) < 0 && st == HILAL_OK)
        st = hilal_h5_error(err, "cannot close %s after clearing its flags", path);
    if (fapl >= 0)
        H5Pclose(fapl);
    return st;
}

hilal_status hilal_h5_open_swmr_write(const char *path, int *recovered, hid_t *fid,
                                      hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t fapl = hilal_h5_fapl(1);
    char detail[1024];
    *fid = H5I_INVALID_HID;
    *recovered = 0;
    if (fapl < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list");
        goto cleanup;
    }
    *fid = H5Fopen(path, H5F_ACC_RDWR | H5F_ACC_SWMR_WRITE, fapl);
    if (*fid >= 0)
        goto cleanup;
    hilal_h5_stack_text(detail, sizeof detail);
    if (strstr(detail, "unable to lock file") != NULL || strstr(detail, "unable to lock the file") != NULL) {
        /* HDF5 readers hold a shared flock() while open (unless opened with
         * file locking off), which a starting writer cannot override. */
        st = hilal_h5_fail(err, HILAL_ERR_IO,
                           "cannot open %s for writing: another process has it open for reading "
                           "since before this writer started; close it, or open readers with "
                           "HDF5 file locking off (h5py: locking=False; or "
                           "HDF5_USE_FILE_LOCKING=FALSE)", path);
        goto cleanup;
    }
    if (strstr(detail, "already open for write") == NULL) {
        st = hilal_h5_fail(err, HILAL_ERR_IO, "cannot open %s for writing", path);
        goto cleanup;
    }
    /* The superblock says a writer has the file open. The caller holds the
     * writer lock, so that writer is gone: recover. */
    hilal_h5_clear();
    st = clear_status_flags(path, err);
    if (st != HILAL_OK)
        goto cleanup;
    *recovered = 1;
    *fid = H5Fopen(path, H5F_ACC_RDWR | H5F_ACC_SWMR_WRITE, fapl);
    if (*fid < 0)
        st = hilal_h5_error(err, "cannot open %s for writing after clearing the flags of a writer that stopped", path);
cleanup:
    if (fapl >= 0)
        H5Pclose(fapl);
    return st;
}

hilal_status hilal_h5_open_swmr_read(const char *path, hid_t *fid, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char detail[1024];
    /* No file lock: a reader left open must not stop a writer from
     * starting (SWMR readers tolerate a concurrent writer). */
    hid_t fapl = hilal_h5_fapl(0), fapl_lock = H5I_INVALID_HID;
    *fid = H5I_INVALID_HID;
    /* A SWMR reader that meets a metadata block with a bad checksum (the
     * writer is halfway through writing it) re-reads it with exponentially
     * growing pauses (1 ns, 2 ns, ...). HDF5's default of 100 attempts adds
     * up to hours; 30 attempts wait up to about a second in all, far longer
     * than any single metadata write takes, then fail with a message. */
    if (fapl < 0 || H5Pset_metadata_read_attempts(fapl, SWMR_READ_ATTEMPTS) < 0) {
        st = hilal_h5_error(err, "cannot make a file-access property list");
        goto cleanup;
    }
    *fid = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl);
    if (*fid >= 0)
        goto cleanup;
    /* This process already has the file open for writing, with locking:
     * HDF5 shares that open file and wants the same locking setting. */
    hilal_h5_stack_text(detail, sizeof detail);
    if (strstr(detail, "file locking flag values don't match") != NULL) {
        hilal_h5_clear();
        fapl_lock = hilal_h5_fapl(1);
        if (fapl_lock >= 0 && H5Pset_metadata_read_attempts(fapl_lock, SWMR_READ_ATTEMPTS) >= 0)
            *fid = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl_lock);
    }
    if (*fid < 0)
        st = hilal_h5_fail(err, HILAL_ERR_IO, "cannot open %s for reading", path);
cleanup:
    if (fapl >= 0)
        H5Pclose(fapl);
    if (fapl_lock >= 0)
        H5Pclose(fapl_lock);
    return st;
}

/* ------------------------------------------------------------------------
 * Rows
 * ------------------------------------------------------------------------ */

#define MAX_RANK 4

/* Dimensions of a dataset; rank returned in *rank. */
static hilal_status get_dims(hid_t dset, hsize_t dims[MAX_RANK], int *rank, hilal_error *err)
{
    hid_t space = H5Dget_space(dset);
    if (space < 0)
        return hilal_h5_error(err, "cannot get a dataspace");
    *rank = H5Sget_simple_extent_ndims(space);
    if (*rank < 1 || *rank > MAX_RANK || H5Sget_simple_extent_dims(space, dims, NULL) < 0) {
        H5Sclose(space);
        return hilal_h5_error(err, "unexpected dataspace (rank %d)", *rank);
    }
    H5Sclose(space);
    return HILAL_OK;
}

hilal_status hilal_h5_nrows(hid_t dset, int refresh, hsize_t *n, hilal_error *err)
{
    hsize_t dims[MAX_RANK];
    int rank;
    *n = 0;
    if (refresh && H5Drefresh(dset) < 0)
        return hilal_h5_error(err, "cannot refresh a dataset");
    hilal_status st = get_dims(dset, dims, &rank, err);
    if (st == HILAL_OK)
        *n = dims[0];
    return st;
}

hilal_status hilal_h5_set_nrows(hid_t dset, hsize_t n, hilal_error *err)
{
    hsize_t dims[MAX_RANK];
    int rank;
    hilal_status st = get_dims(dset, dims, &rank, err);
    if (st != HILAL_OK)
        return st;
    if (dims[0] == n)
        return HILAL_OK;
    dims[0] = n;
    if (H5Dset_extent(dset, dims) < 0)
        return hilal_h5_error(err, "cannot set a dataset to %llu rows", (unsigned long long)n);
    return HILAL_OK;
}

/* Selects rows [start, start+n) of the file space and makes a matching
 * memory space. */
static hilal_status select_rows(hid_t dset, hsize_t start, hsize_t n, hid_t *fspace,
                                hid_t *mspace, hilal_error *err)
{
    hsize_t dims[MAX_RANK], off[MAX_RANK] = {0}, cnt[MAX_RANK];
    int rank;
    *fspace = *mspace = H5I_INVALID_HID;
    hilal_status st = get_dims(dset, dims, &rank, err);
    if (st != HILAL_OK)
        return st;
    if (start + n > dims[0])
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "rows %llu..%llu are beyond the %llu rows of a dataset",
                               (unsigned long long)start, (unsigned long long)(start + n),
                               (unsigned long long)dims[0]);
    for (int i = 0; i < rank; i++)
        cnt[i] = dims[i];
    off[0] = start;
    cnt[0] = n;
    *fspace = H5Dget_space(dset);
    *mspace = H5Screate_simple(rank, cnt, NULL);
    if (*fspace < 0 || *mspace < 0 ||
        H5Sselect_hyperslab(*fspace, H5S_SELECT_SET, off, NULL, cnt, NULL) < 0) {
        if (*fspace >= 0)
            H5Sclose(*fspace);
        if (*mspace >= 0)
            H5Sclose(*mspace);
        *fspace = *mspace = H5I_INVALID_HID;
        return hilal_h5_error(err, "cannot select rows of a dataset");
    }
    return HILAL_OK;
}

hilal_status hilal_h5_write_rows(hid_t dset, hid_t mtype, hsize_t start, hsize_t n,
                                 const void *buf, hilal_error *err)
{
    hsize_t nrows;
    hid_t fspace = H5I_INVALID_HID, mspace = H5I_INVALID_HID;
    hilal_status st;
    if (n == 0)
        return HILAL_OK;
    st = hilal_h5_nrows(dset, 0, &nrows, err);
    if (st == HILAL_OK && start + n > nrows)
        st = hilal_h5_set_nrows(dset, start + n, err);
    if (st == HILAL_OK)
        st = select_rows(dset, start, n, &fspace, &mspace, err);
    if (st == HILAL_OK && H5Dwrite(dset, mtype, mspace, fspace, H5P_DEFAULT, buf) < 0)
        st = hilal_h5_error(err, "cannot write rows %llu..%llu", (unsigned long long)start,
                            (unsigned long long)(start + n - 1));
    if (fspace >= 0)
        H5Sclose(fspace);
    if (mspace >= 0)
        H5Sclose(mspace);
    return st;
}

hilal_status hilal_h5_read_rows(hid_t dset, hid_t mtype, hsize_t start, hsize_t n, void *buf,
                                hilal_error *err)
{
    hid_t fspace = H5I_INVALID_HID, mspace = H5I_INVALID_HID;
    hilal_status st;
    if (n == 0)
        return HILAL_OK;
    st = select_rows(dset, start, n, &fspace, &mspace, err);
    if (st == HILAL_OK && H5Dread(dset, mtype, mspace, fspace, H5P_DEFAULT, buf) < 0)
        st = hilal_h5_error(err, "cannot read rows %llu..%llu", (unsigned long long)start,
                            (unsigned long long)(start + n - 1));
    if (fspace >= 0)
        H5Sclose(fspace);
    if (mspace >= 0)
        H5Sclose(mspace);
    return st;
}

/* ------------------------------------------------------------------------
 * Attributes
 * ------------------------------------------------------------------------ */

hilal_status hilal_h5_attr_write_int(hid_t loc, const char *name, long long value,
                                     hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t space = H5Screate(H5S_SCALAR), attr = H5I_INVALID_HID;
    if (space >= 0)
        attr = H5Acreate2(loc, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attr < 0 || H5Awrite(attr, H5T_NATIVE_LLONG, &value) < 0)
        st = hilal_h5_error(err, "cannot write attribute %s", name);
    if (attr >= 0)
        H5Aclose(attr);
    if (space >= 0)
        H5Sclose(space);
    return st;
}

hilal_status hilal_h5_attr_write_string(hid_t loc, const char *name, const char *value,
                                        hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t len = strlen(value);
    hid_t space = H5Screate(H5S_SCALAR), type = H5Tcopy(H5T_C_S1), attr = H5I_INVALID_HID;
    if (space >= 0 && type >= 0 && H5Tset_size(type, len > 0 ? len : 1) >= 0 &&
        H5Tset_strpad(type, H5T_STR_NULLPAD) >= 0)
        attr = H5Acreate2(loc, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (attr < 0 || H5Awrite(attr, type, len > 0 ? value : "") < 0)
        st = hilal_h5_error(err, "cannot write attribute %s", name);
    if (attr >= 0)
        H5Aclose(attr);
    if (type >= 0)
        H5Tclose(type);
    if (space >= 0)
        H5Sclose(space);
    return st;
}

hilal_status hilal_h5_attr_read_int(hid_t loc, const char *name, long long *value,
                                    hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t attr = H5I_INVALID_HID;
    htri_t exists = H5Aexists(loc, name);
    if (exists <= 0) {
        hilal_h5_clear();
        return hilal_error_set(err, HILAL_ERR_NOTFOUND, "attribute %s is missing", name);
    }
    attr = H5Aopen(loc, name, H5P_DEFAULT);
    if (attr < 0 || H5Aread(attr, H5T_NATIVE_LLONG, value) < 0)
        st = hilal_h5_error(err, "cannot read attribute %s", name);
    if (attr >= 0)
        H5Aclose(attr);
    return st;
}

hilal_status hilal_h5_attr_read_string(hid_t loc, const char *name, char *buf, size_t len,
                                       hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hid_t attr = H5I_INVALID_HID, ftype = H5I_INVALID_HID, mtype = H5I_INVALID_HID;
    char *tmp = NULL;
    htri_t exists = H5Aexists(loc, name);
    buf[0] = '\0';
    if (exists <= 0) {
        hilal_h5_clear();
        return hilal_error_set(err, HILAL_ERR_NOTFOUND, "attribute %s is missing", name);
    }
    attr = H5Aopen(loc, name, H5P_DEFAULT);
    if (attr >= 0)
        ftype = H5Aget_type(attr);
    if (attr < 0 || ftype < 0 || H5Tget_class(ftype) != H5T_STRING || H5Tis_variable_str(ftype) != 0) {
        st = hilal_h5_error(err, "attribute %s is not a fixed-length string", name);
        goto cleanup;
    }
    size_t size = H5Tget_size(ftype);
    tmp = calloc(size + 1, 1);
    mtype = H5Tcopy(ftype);
    if (tmp == NULL || mtype < 0) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    if (H5Aread(attr, mtype, tmp) < 0) {
        st = hilal_h5_error(err, "cannot read attribute %s", name);
        goto cleanup;
    }
    snprintf(buf, len, "%s", tmp);
cleanup:
    free(tmp);
    if (mtype >= 0)
        H5Tclose(mtype);
    if (ftype >= 0)
        H5Tclose(ftype);
    if (attr >= 0)
        H5Aclose(attr);
    return st;
}

/* ------------------------------------------------------------------------
 * astropy column metadata
 * ------------------------------------------------------------------------ */

/* Appends s to the growing string *buf. */
static int append(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t n = strlen(s);
    if (*len + n + 1 > *cap) {
        size_t nc = (*cap + n + 1) * 2;
        char *p = realloc(*buf, nc);
        if (p == NULL)
            return -1;
        *buf = p;
        *cap = nc;
    }
    memcpy(*buf + *len, s, n + 1);
    *len += n;
    return 0;
}

/* Appends s as a YAML single-quoted scalar (quotes doubled), which needs no
 * other escapes for printable text. */
static int append_quoted(char **buf, size_t *len, size_t *cap, const char *s)
{
    char one[2] = {0, 0};
    if (append(buf, len, cap, "'") != 0)
        return -1;
    for (; *s; s++) {
        one[0] = (*s == '\n' || *s == '\r' || *s == '\t') ? ' ' : *s;
        if (append(buf, len, cap, one) != 0 || (*s == '\'' && append(buf, len, cap, "'") != 0))
            return -1;
    }
    return append(buf, len, cap, "'");
}

hilal_status hilal_h5_write_astropy_meta(hid_t loc, const char *table,
                                         const hilal_h5_colmeta *cols, size_t ncols,
                                         const char *const *meta_kv, size_t nmeta,
                                         hilal_error *err)
{
    hilal_status st = HILAL_OK;
    size_t nlines = 1 + ncols + (nmeta > 0 ? 1 + nmeta : 0);
    char **lines = calloc(nlines, sizeof *lines);
    char *block = NULL, dname[256];
    hid_t type = H5I_INVALID_HID, space = H5I_INVALID_HID, dset = H5I_INVALID_HID;
    size_t k = 0, maxlen = 1;
    if (lines == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    /* The layout astropy writes (astropy/io/misc/hdf5.py, write_table_hdf5
     * with serialize_meta=True, via astropy.table.meta.get_yaml_from_table):
     *   datatype:
     *   - {name: x, unit: pix, datatype: float64, description: ...}
     *   meta: !!omap
     *   - {key: value}                                                    */
    lines[k++] = strdup("datatype:");
    for (size_t i = 0; i < ncols; i++) {
        char *b = NULL;
        size_t len = 0, cap = 0;
        int bad = append(&b, &len, &cap, "- {name: ") || append(&b, &len, &cap, cols[i].name);
        if (!bad && cols[i].unit != NULL && cols[i].unit[0] != '\0')
            bad = append(&b, &len, &cap, ", unit: ") || append_quoted(&b, &len, &cap, cols[i].unit);
        if (!bad)
            bad = append(&b, &len, &cap, ", datatype: ") || append(&b, &len, &cap, cols[i].datatype);
        if (!bad && cols[i].description != NULL && cols[i].description[0] != '\0')
            bad = append(&b, &len, &cap, ", description: ") ||
                  append_quoted(&b, &len, &cap, cols[i].description);
        if (!bad)
            bad = append(&b, &len, &cap, "}");
        if (bad) {
            free(b);
            b = NULL;
        }
        lines[k++] = b;
    }
    if (nmeta > 0) {
        lines[k++] = strdup("meta: !!omap");
        for (size_t i = 0; i < nmeta; i++) {
            char *b = NULL;
            size_t len = 0, cap = 0;
            if (append(&b, &len, &cap, "- {") || append(&b, &len, &cap, meta_kv[2 * i]) ||
                append(&b, &len, &cap, ": ") || append_quoted(&b, &len, &cap, meta_kv[2 * i + 1]) ||
                append(&b, &len, &cap, "}")) {
                free(b);
                b = NULL;
            }
            lines[k++] = b;
        }
    }
    for (size_t i = 0; i < nlines; i++) {
        if (lines[i] == NULL) {
            st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
            goto cleanup;
        }
        if (strlen(lines[i]) > maxlen)
            maxlen = strlen(lines[i]);
    }
    /* Fixed-length, NUL-padded ASCII strings, as numpy's 'S<n>' gives. */
    block = calloc(nlines, maxlen);
    if (block == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        goto cleanup;
    }
    for (size_t i = 0; i < nlines; i++)
        memcpy(block + i * maxlen, lines[i], strlen(lines[i]));
    hsize_t dim = nlines;
    type = H5Tcopy(H5T_C_S1);
    space = H5Screate_simple(1, &dim, NULL);
    snprintf(dname, sizeof dname, "%s.__table_column_meta__", table);
    if (type < 0 || space < 0 || H5Tset_size(type, maxlen) < 0 ||
        H5Tset_strpad(type, H5T_STR_NULLPAD) < 0) {
        st = hilal_h5_error(err, "cannot make the column-metadata type of %s", table);
        goto cleanup;
    }
    dset = H5Dcreate2(loc, dname, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (dset < 0 || H5Dwrite(dset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, block) < 0)
        st = hilal_h5_error(err, "cannot write %s", dname);
cleanup:
    if (dset >= 0)
        H5Dclose(dset);
    if (space >= 0)
        H5Sclose(space);
    if (type >= 0)
        H5Tclose(type);
    free(block);
    if (lines != NULL)
        for (size_t i = 0; i < nlines; i++)
            free(lines[i]);
    free(lines);
    return st;
}
