/* Minimal test helpers: each CHECK records a pass or a failure with its
 * location; hilal_test_finish() prints "N passed, N failed" and returns the
 * exit status (non-zero if anything failed). */
#ifndef HILAL_TESTUTIL_H
#define HILAL_TESTUTIL_H

#include <stddef.h>

#include "hilal/hilal.h"

extern int hilal_test_passed;
extern int hilal_test_failed;

void hilal_test_check(int ok, const char *file, int line, const char *expr, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* CHECK(condition, "message with %d", values...) */
#define CHECK(cond, ...) hilal_test_check((cond) ? 1 : 0, __FILE__, __LINE__, #cond, __VA_ARGS__)

/* CHECK that a status is HILAL_OK, printing the error message if not. */
#define CHECK_OK(st, err)                                                                    \
    do {                                                                                     \
        hilal_status check_ok_st_ = (st);                                                    \
        hilal_test_check(check_ok_st_ == HILAL_OK, __FILE__, __LINE__, #st, "status %d: %s", \
                         (int)check_ok_st_, (err)->msg);                                     \
    } while (0)

/* Prints the summary line and returns 0 if nothing failed, 1 otherwise. */
int hilal_test_finish(void);

/* $HILAL_TESTDATA/<rel> into buf (aborts the test with a message if unset). */
const char *hilal_test_data(const char *rel, char *buf, size_t len);

/* A fresh empty scratch directory $HILAL_TMPDIR/<name> (created), into buf. */
const char *hilal_test_tmpdir(const char *name, char *buf, size_t len);

/* Runs a shell command, capturing stdout+stderr into *out (malloc'd, caller
 * frees; may be NULL to discard). Returns the exit status (or -1). */
int hilal_test_run(const char *cmd, char **out);

/* Path of the hilal executable ($HILAL_EXE). */
const char *hilal_test_exe(void);

/* Pearson correlation of a and b over the n pixels with keep[i] != 0 (NaN
 * with fewer than 2). */
double hilal_test_pearson(const float *a, const float *b, const unsigned char *keep, size_t n);

#endif
