/* SHA-256 checksums (OpenSSL libcrypto). */
#ifndef HILAL_CHECKSUM_H
#define HILAL_CHECKSUM_H

#include <stddef.h>

#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Hex SHA-256 of a memory buffer into out_hex (65 bytes incl. NUL). */
void hilal_sha256_hex(const void *data, size_t len, char out_hex[65]);

/* Hex SHA-256 of a whole file. */
hilal_status hilal_sha256_file(const char *path, char out_hex[65], hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
