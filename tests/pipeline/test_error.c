/* The error object: first error wins, context is prepended, NULL is allowed. */
#include <string.h>

#include "testutil.h"

int main(void)
{
    hilal_error err;
    hilal_error_clear(&err);
    CHECK(err.code == HILAL_OK && err.msg[0] == '\0', "cleared");
    hilal_error_context(&err, "frame x");
    CHECK(err.msg[0] == '\0', "context without an error does nothing");
    CHECK(hilal_error_set(&err, HILAL_ERR_IO, "cannot open %s", "a.fits") == HILAL_ERR_IO, "returns code");
    hilal_error_set(&err, HILAL_ERR_FITS, "second error");
    CHECK(err.code == HILAL_ERR_IO && strcmp(err.msg, "cannot open a.fits") == 0,
          "first error wins: %s", err.msg);
    hilal_error_context(&err, "stage %s", "ingest");
    hilal_error_context(&err, "frame %d", 42);
    CHECK(strcmp(err.msg, "frame 42: stage ingest: cannot open a.fits") == 0, "context: %s", err.msg);
    CHECK(hilal_error_set(NULL, HILAL_ERR_DATA, "x") == HILAL_ERR_DATA, "NULL error object");
    CHECK(strcmp(hilal_status_name(HILAL_ERR_CONFIG), "configuration error") == 0, "name");
    /* A very long context truncates instead of overflowing. */
    char longctx[3000];
    memset(longctx, 'c', sizeof longctx - 1);
    longctx[sizeof longctx - 1] = '\0';
    hilal_error_context(&err, "%s", longctx);
    CHECK(strlen(err.msg) < HILAL_ERROR_MSG_MAX, "bounded");
    return hilal_test_finish();
}
