/* Version of Hilal and of the libraries it was built with. */
#ifndef HILAL_VERSION_H
#define HILAL_VERSION_H

#ifdef __cplusplus
extern "C" {
#endif

/* "0.1.0" */
const char *hilal_version(void);

/* One line naming the versions of CFITSIO, FFTW, HDF5, wcslib and SEP in use. */
const char *hilal_library_versions(void);

#ifdef __cplusplus
}
#endif
#endif
