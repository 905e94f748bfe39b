/* HDF5 helpers: the only place the HDF5 error stack is translated into
 * hilal_error messages, plus the file-opening rules of the archive (SWMR
 * writing with recovery after a crash, SWMR reading) and small helpers for
 * 1-D/N-D chunked "tables" extended along their first dimension.
 *
 * Private to the library (pipeline/ and stages/); the public archive API is
 * include/hilal/archive.h.
 */
#ifndef HILAL_H5_H
#define HILAL_H5_H

#include <stddef.h>
#include <stdint.h>

#include <hdf5.h>

#include "hilal/status.h"

/* Turns off HDF5's automatic printing of its error stack for the calling
 * thread (the thread-safe HDF5 library keeps one stack per thread). Cheap;
 * call it at the entry of every function that calls HDF5. */
void hilal_h5_quiet(void);

/* Records `code` with "<printf message>: <HDF5 detail>" where the detail is
 * taken from the calling thread's HDF5 error stack (the API function that
 * failed, its description and the innermost description), then clears the
 * stack. Without an HDF5 error on the stack only the message is recorded.
 * Returns code. */
hilal_status hilal_h5_fail(hilal_error *err, hilal_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* hilal_h5_fail() with HILAL_ERR_HDF5. */
#define hilal_h5_error(err, ...) hilal_h5_fail((err), HILAL_ERR_HDF5, __VA_ARGS__)

/* The HDF5 detail text of the current error stack (as used by
 * hilal_h5_fail), without clearing it. */
void hilal_h5_stack_text(char *buf, size_t len);

/* Clears the calling thread's HDF5 error stack. */
void hilal_h5_clear(void);

/* A file-access property list for archives: latest file format (needed by
 * SWMR); with `locking`, HDF5's own flock() locking where the file system
 * supports it (ignored where it does not), without it none. Returns
 * H5I_INVALID_HID on failure. */
hid_t hilal_h5_fapl(int locking);

/* Creates a new file (fails if it exists) with hilal_h5_fapl(). */
hilal_status hilal_h5_create(const char *path, hid_t *fid, hilal_error *err);

/* The journaling file driver used by writers (registered on first use;
 * H5I_INVALID_HID on failure). Like HDF5's sec2 driver, except that each
 * metadata write first goes to a one-record redo journal <file>.journal
 * (removed when the file is closed cleanly), so that a write torn by the
 * death of the process can be completed by hilal_h5_journal_replay(). */
hid_t hilal_h5_journal_driver(void);

/* "<path>.journal" into out. */
void hilal_h5_journal_path(const char *path, char *out, size_t len);

/* Writes again the journaled metadata write of a writer that died, if the
 * journal of path holds a complete record (*replayed = 1), and clears the
 * journal. Harmless when there is no journal or no valid record. Only while
 * no writer has the file open. */
hilal_status hilal_h5_journal_replay(const char *path, int *replayed, hilal_error *err);

/* Writes a complete journal record (for tests that simulate a torn write).
 * Record layout, little-endian: magic "HLJ1" (u32 0x314a4c48), CRC-32 of
 * the rest (u32), file offset (u64), length (u64), then the bytes. */
hilal_status hilal_h5_journal_write_record(const char *journal, uint64_t offset,
                                           const void *data, size_t len, hilal_error *err);

/* Opens an existing file for SWMR writing. When the open fails because the
 * superblock still says "open for writing" (a writer died without closing
 * the file) the status flags are cleared the way `h5clear -s --increment`
 * does (clear the flags, skip the EOF check, set EOA to max(EOA, EOF) + 1 MiB
 * so that no space past the stored EOA is reused) and the file is opened
 * again. Before anything, a torn metadata write is repaired from the
 * journal. *recovered is 1 when either was needed. The file is opened with
 * the journaling driver. THE CALLER MUST KNOW THAT NO OTHER WRITER IS ALIVE
 * (the archive holds a lock for that). */
hilal_status hilal_h5_open_swmr_write(const char *path, int *recovered, hid_t *fid,
                                      hilal_error *err);

/* Opens a file read-only in SWMR-read mode, which works on a closed file, on
 * a file being written by a live SWMR writer and on a file whose writer died
 * (but not on a file held by a non-SWMR writer). Takes no file lock, so that
 * an open reader never keeps a writer from starting. */
hilal_status hilal_h5_open_swmr_read(const char *path, hid_t *fid, hilal_error *err);

/* ---- "Tables": datasets extended along their first dimension ---------- */

/* Current number of rows (first dimension). Refreshes the dataset's metadata
 * first when refresh is non-zero (SWMR readers). */
hilal_status hilal_h5_nrows(hid_t dset, int refresh, hsize_t *n, hilal_error *err);

/* Sets the number of rows (grows or shrinks the first dimension). */
hilal_status hilal_h5_set_nrows(hid_t dset, hsize_t n, hilal_error *err);

/* Writes rows [start, start + n) from buf (memory type mtype, each row being
 * the product of the other dimensions), extending the dataset when needed. */
hilal_status hilal_h5_write_rows(hid_t dset, hid_t mtype, hsize_t start, hsize_t n,
                                 const void *buf, hilal_error *err);

/* Reads rows [start, start + n) into buf. */
hilal_status hilal_h5_read_rows(hid_t dset, hid_t mtype, hsize_t start, hsize_t n, void *buf,
                                hilal_error *err);

/* ---- Attributes (written only at creation: SWMR forbids changing them) - */

hilal_status hilal_h5_attr_write_int(hid_t loc, const char *name, long long value,
                                     hilal_error *err);
hilal_status hilal_h5_attr_write_string(hid_t loc, const char *name, const char *value,
                                        hilal_error *err);
/* HILAL_ERR_NOTFOUND when the attribute does not exist. */
hilal_status hilal_h5_attr_read_int(hid_t loc, const char *name, long long *value,
                                    hilal_error *err);
hilal_status hilal_h5_attr_read_string(hid_t loc, const char *name, char *buf, size_t len,
                                       hilal_error *err);

/* ---- astropy column metadata ------------------------------------------ */

/* One column as astropy's HDF5 reader expects it. */
typedef struct hilal_h5_colmeta {
    const char *name;
    const char *datatype;    /* astropy/numpy name: "int64", "float64", "string", ... */
    const char *unit;        /* astropy unit string, "" or NULL for none */
    const char *description; /* one line, may be NULL */
} hilal_h5_colmeta;

/* Writes the dataset "<table>.__table_column_meta__" next to the table in
 * loc: a 1-D array of fixed-length ASCII strings, one line each, holding the
 * YAML header astropy writes with serialize_meta=True ("datatype:" followed
 * by one flow mapping per column, then "meta: !!omap" and the table meta as
 * key/value pairs). astropy.table.Table.read(file, path=table) then gives the
 * columns their units and descriptions. meta_kv holds nmeta key/value string
 * pairs (keys [A-Za-z0-9_]+). */
hilal_status hilal_h5_write_astropy_meta(hid_t loc, const char *table,
                                         const hilal_h5_colmeta *cols, size_t ncols,
                                         const char *const *meta_kv, size_t nmeta,
                                         hilal_error *err);

#endif
