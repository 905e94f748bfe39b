#include "testutil.h"

#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

int hilal_test_passed;
int hilal_test_failed;

void hilal_test_check(int ok, const char *file, int line, const char *expr, const char *fmt, ...)
{
    if (ok) {
        hilal_test_passed++;
        return;
    }
    hilal_test_failed++;
    fprintf(stderr, "FAIL %s:%d: %s: ", file, line, expr);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

int hilal_test_finish(void)
{
    printf("%d passed, %d failed\n", hilal_test_passed, hilal_test_failed);
    return hilal_test_failed == 0 && hilal_test_passed > 0 ? 0 : 1;
}

static const char *env_or_die(const char *name)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') {
        fprintf(stderr, "test setup: environment variable %s is not set (run through ctest)\n", name);
        exit(2);
    }
    return v;
}

const char *hilal_test_data(const char *rel, char *buf, size_t len)
{
    snprintf(buf, len, "%s/%s", env_or_die("HILAL_TESTDATA"), rel);
    return buf;
}

const char *hilal_test_exe(void) { return env_or_die("HILAL_EXE"); }

const char *hilal_test_tmpdir(const char *name, char *buf, size_t len)
{
    const char *root = env_or_die("HILAL_TMPDIR");
    char cmd[4096];
    snprintf(buf, len, "%s/%s", root, name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", buf, buf);
    if (system(cmd) != 0) {
        fprintf(stderr, "test setup: cannot create %s\n", buf);
        exit(2);
    }
    return buf;
}

int hilal_test_run(const char *cmd, char **out)
{
    char full[8192];
    snprintf(full, sizeof full, "(%s) 2>&1", cmd);
    FILE *p = popen(full, "r");
    if (p == NULL)
        return -1;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        pclose(p);
        return -1;
    }
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += got;
        if (cap - n < 1024) {
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL)
                break;
            buf = nb;
            cap *= 2;
        }
    }
    buf[n] = '\0';
    int rc = pclose(p);
    if (out != NULL)
        *out = buf;
    else
        free(buf);
    if (rc == -1)
        return -1;
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + (WIFSIGNALED(rc) ? WTERMSIG(rc) : 0);
}

double hilal_test_pearson(const float *a, const float *b, const unsigned char *keep, size_t n)
{
    double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        if (!keep[i])
            continue;
        sa += a[i];
        sb += b[i];
        saa += (double)a[i] * a[i];
        sbb += (double)b[i] * b[i];
        sab += (double)a[i] * b[i];
        m++;
    }
    if (m < 2)
        return NAN;
    double ca = saa - sa * sa / m, cb = sbb - sb * sb / m, cab = sab - sa * sb / m;
    return cab / sqrt(ca * cb);
}
