/* SHA-256 through OpenSSL's EVP interface. */
#include "hilal/checksum.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

static void to_hex(const unsigned char *md, unsigned int len, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (unsigned int i = 0; i < len; i++) {
        out[2 * i] = digits[md[i] >> 4];
        out[2 * i + 1] = digits[md[i] & 15];
    }
    out[2 * len] = '\0';
}

void hilal_sha256_hex(const void *data, size_t len, char out_hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1) {
        out_hex[0] = '\0';
        return;
    }
    to_hex(md, mdlen, out_hex);
}

hilal_status hilal_sha256_file(const char *path, char out_hex[65], hilal_error *err)
{
    out_hex[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot open %s to checksum it: %s", path,
                               strerror(errno));
    hilal_status st = HILAL_OK;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "cannot start a SHA-256 digest");
        goto cleanup;
    }
    unsigned char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0)
        EVP_DigestUpdate(ctx, buf, got);
    if (ferror(f)) {
        st = hilal_error_set(err, HILAL_ERR_IO, "error reading %s to checksum it", path);
        goto cleanup;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    EVP_DigestFinal_ex(ctx, md, &mdlen);
    to_hex(md, mdlen, out_hex);
cleanup:
    EVP_MD_CTX_free(ctx);
    fclose(f);
    return st;
}
