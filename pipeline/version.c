#include "hilal/version.h"

#include <stdio.h>

#include <fftw3.h>
#include <fitsio.h>
#include <hdf5.h>
#include <wcslib/wcsconfig.h>

#define STRINGIFY2(x) #x
#define STRINGIFY(x) STRINGIFY2(x)

#ifndef HILAL_VERSION_STRING
#define HILAL_VERSION_STRING "0.0.0"
#endif

const char *hilal_version(void) { return HILAL_VERSION_STRING; }

const char *hilal_library_versions(void)
{
    static char buf[256];
    if (buf[0] == '\0') {
        float cfitsio = 0;
        fits_get_version(&cfitsio);
        unsigned maj = 0, min = 0, rel = 0;
        H5get_libversion(&maj, &min, &rel);
        snprintf(buf, sizeof buf, "CFITSIO %.3f, %s, HDF5 %u.%u.%u, wcslib %s, SEP (libsep)",
                 (double)cfitsio, fftwf_version, maj, min, rel, STRINGIFY(WCSLIB_VERSION));
    }
    return buf;
}
