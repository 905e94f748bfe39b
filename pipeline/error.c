#include "hilal/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void hilal_error_clear(hilal_error *err)
{
    if (err == NULL)
        return;
    err->code = HILAL_OK;
    err->msg[0] = '\0';
}

hilal_status hilal_error_set(hilal_error *err, hilal_status code, const char *fmt, ...)
{
    if (err == NULL || err->code != HILAL_OK)
        return code;
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return code;
}

void hilal_error_context(hilal_error *err, const char *fmt, ...)
{
    if (err == NULL || err->code == HILAL_OK)
        return;
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    /* Shift the message right and put the prefix and ": " in front. */
    size_t plen = strlen(prefix), mlen = strlen(err->msg);
    if (plen + 2 >= sizeof err->msg)
        return;
    if (plen + 2 + mlen >= sizeof err->msg)
        mlen = sizeof err->msg - plen - 3;
    memmove(err->msg + plen + 2, err->msg, mlen);
    err->msg[plen + 2 + mlen] = '\0';
    memcpy(err->msg, prefix, plen);
    err->msg[plen] = ':';
    err->msg[plen + 1] = ' ';
}

const char *hilal_status_name(hilal_status code)
{
    switch (code) {
    case HILAL_OK: return "ok";
    case HILAL_ERR_NOMEM: return "out of memory";
    case HILAL_ERR_IO: return "i/o error";
    case HILAL_ERR_FITS: return "FITS error";
    case HILAL_ERR_FORMAT: return "format error";
    case HILAL_ERR_CONFIG: return "configuration error";
    case HILAL_ERR_USAGE: return "usage error";
    case HILAL_ERR_RANGE: return "value out of range";
    case HILAL_ERR_FFT: return "FFT error";
    case HILAL_ERR_HDF5: return "HDF5 error";
    case HILAL_ERR_WCS: return "WCS error";
    case HILAL_ERR_DATA: return "insufficient data";
    case HILAL_ERR_MISMATCH: return "inputs do not match";
    case HILAL_ERR_INTERNAL: return "internal error";
    case HILAL_ERR_NOTFOUND: return "not found";
    case HILAL_ERR_ALERT: return "alert error";
    }
    return "unknown status";
}
