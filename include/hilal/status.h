/* Status codes and the error object shared by every Hilal function.
 *
 * Every fallible function returns a hilal_status and takes a caller-owned
 * hilal_error *err (which may be NULL when the caller does not want the text).
 * The innermost failure writes the code and a message that says what went
 * wrong and how to fix it; each level up prepends where it happened (frame,
 * stage, file, HDU) with hilal_error_context(). The first message wins: once
 * an error is set, hilal_error_set() does nothing, so context is added but
 * never overwritten.
 *
 * The numeric values of hilal_status never change meaning between releases.
 */
#ifndef HILAL_STATUS_H
#define HILAL_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum hilal_status {
    HILAL_OK = 0,
    HILAL_ERR_NOMEM = 1,     /* an allocation failed */
    HILAL_ERR_IO = 2,        /* a file could not be opened, read or written */
    HILAL_ERR_FITS = 3,      /* CFITSIO reported an error, or the FITS content is unusable */
    HILAL_ERR_FORMAT = 4,    /* input is not in the expected format (not FITS, bad table, ...) */
    HILAL_ERR_CONFIG = 5,    /* unknown key, bad value or out-of-range configuration */
    HILAL_ERR_USAGE = 6,     /* bad command-line use */
    HILAL_ERR_RANGE = 7,     /* an argument outside its valid range */
    HILAL_ERR_FFT = 8,       /* FFTW could not make a plan */
    HILAL_ERR_HDF5 = 9,      /* HDF5 reported an error */
    HILAL_ERR_WCS = 10,      /* wcslib reported an error, or a WCS is missing/unusable */
    HILAL_ERR_DATA = 11,     /* the data do not allow the computation (too few stars, no overlap, ...) */
    HILAL_ERR_MISMATCH = 12, /* two inputs disagree (size, filter, ...) */
    HILAL_ERR_INTERNAL = 13, /* a bug: an invariant was violated */
    HILAL_ERR_NOTFOUND = 14, /* a requested item (HDU, key, candidate, ...) does not exist */
    HILAL_ERR_ALERT = 15     /* an alert could not be built or delivered */
} hilal_status;

#define HILAL_ERROR_MSG_MAX 2048

typedef struct hilal_error {
    hilal_status code;               /* HILAL_OK while no error is recorded */
    char msg[HILAL_ERROR_MSG_MAX];   /* NUL-terminated, "" while no error is recorded */
} hilal_error;

/* Resets err to "no error". err may be NULL. */
void hilal_error_clear(hilal_error *err);

/* Records code and a printf-style message unless err already holds an error
 * (first error wins). Returns code, so callers can write
 * `return hilal_error_set(err, HILAL_ERR_IO, "...")`. err may be NULL. */
hilal_status hilal_error_set(hilal_error *err, hilal_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "<context>: " to the recorded message (no-op when err holds no
 * error or is NULL). Used by outer levels to say where the error happened. */
void hilal_error_context(hilal_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A short fixed name for a status ("io error", "config error", ...). Never NULL. */
const char *hilal_status_name(hilal_status code);

#ifdef __cplusplus
}
#endif
#endif
