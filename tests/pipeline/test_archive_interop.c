/* Interoperability: the archive written here is read by h5py and astropy
 * (tests/pipeline/test_archive_interop.py), which check values, units,
 * descriptions, cutouts, provenance and the documented frame_id formula
 * against expectations computed from the source frames.
 *
 * Needs python3 with h5py and astropy (Debian: python3-h5py
 * python3-astropy; scripts/bootstrap.sh installs them). Without them the
 * test fails, unless HILAL_SKIP_PYTHON=1 says to skip it. HILAL_PYTHON
 * names the interpreter to use. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/archive.h"
#include "test_archive_frames.h"
#include "testutil.h"

#define NX 200
#define NY 160

static const char *HASH1 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
static const char *HASH2 = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
static const char *CONF1 = "[detect]\nthresh_sigma = 5\n";
static const char *CONF2 = "[detect]\nthresh_sigma = 4.5 # 'quoted' \"text\"\n";

static void jnum(FILE *fp, const char *key, double v, int comma)
{
    if (isnan(v))
        fprintf(fp, "\"%s\": null%s", key, comma ? ", " : "");
    else
        fprintf(fp, "\"%s\": %.17g%s", key, v, comma ? ", " : "");
}

static void jstr(FILE *fp, const char *s)
{
    fputc('"', fp);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(fp, "\\%c", *s);
        else if (*s == '\n')
            fputs("\\n", fp);
        else
            fputc(*s, fp);
    }
    fputc('"', fp);
}

typedef struct written {
    unsigned seed;
    size_t n;
    int nan_sky;
    int64_t first_id, frame_id;
    int32_t run;
} written;

static int write_archive(const char *path, written *w, size_t *nw)
{
    hilal_error err = {0};
    hilal_archive *ar = NULL;
    int32_t run1 = 0, run2 = 0;
    struct { const char *name; unsigned seed; size_t n; int nan_sky; int run; } plan[] = {
        {"A", 1, 30, 0, 1}, {"B", 2, 20, 1, 1}, {"A-again", 1, 25, 0, 1}, {"C", 3, 10, 0, 2}};
    if (hilal_archive_open_write(path, NULL, &ar, &err) != HILAL_OK ||
        hilal_archive_begin_run(ar, CONF1, HASH1, &run1, &err) != HILAL_OK ||
        hilal_archive_begin_run(ar, CONF2, HASH2, &run2, &err) != HILAL_OK) {
        CHECK(0, "open: %s", err.msg);
        return -1;
    }
    for (size_t i = 0; i < 4; i++) {
        hilal_frame f;
        hilal_archive_commit c;
        if (tf_make(&f, plan[i].name, plan[i].seed, NX, NY, plan[i].n) != 0)
            return -1;
        if (plan[i].nan_sky)
            for (size_t k = 0; k < f.ncands; k++)
                f.cands[k].ra = f.cands[k].dec = NAN;
        int32_t run = plan[i].run == 1 ? run1 : run2;
        hilal_status st = hilal_archive_append_frame(ar, run, &f, &c, &err);
        CHECK_OK(st, &err);
        hilal_frame_clear(&f);
        if (st != HILAL_OK)
            return -1;
        w[i] = (written){plan[i].seed, plan[i].n, plan[i].nan_sky, c.first_cand_id, c.frame_id, run};
    }
    *nw = 4;
    CHECK_OK(hilal_archive_close(ar, &err), &err);
    return 0;
}

static int write_expected(const char *json, const written *w, size_t nw)
{
    FILE *fp = fopen(json, "w");
    if (fp == NULL)
        return -1;
    size_t rows = 0;
    for (size_t i = 0; i < nw; i++)
        rows += w[i].n;
    fprintf(fp, "{\"schema_version\": %d, \"rows\": %zu, \"edge_id\": %lld,\n", HILAL_ARCHIVE_SCHEMA_VERSION,
            rows, (long long)w[1].first_id);
    fprintf(fp, "\"superseded_ids\": [");
    for (size_t k = 0; k < w[0].n; k++)
        fprintf(fp, "%s%lld", k ? ", " : "", (long long)(w[0].first_id + (int64_t)k));
    fprintf(fp, "],\n\"current\": [\n");
    int first = 1;
    for (size_t i = 1; i < nw; i++)
        for (size_t k = 0; k < w[i].n; k++) {
            hilal_candidate c;
            tf_candidate(w[i].seed, k, NX, NY, &c);
            if (w[i].nan_sky)
                c.ra = c.dec = NAN;
            long cx = (long)floor(c.x - 0.5), cy = (long)floor(c.y - 0.5);
            int edge = cx - 31 < 0 || cy - 31 < 0 || cx + 31 >= NX || cy + 31 >= NY;
            fprintf(fp, "%s{\"cand_id\": %lld, \"frame_id\": %lld, \"run_id\": %d, \"flags\": %u, ",
                    first ? "" : ",\n", (long long)(w[i].first_id + (int64_t)k),
                    (long long)w[i].frame_id, (int)w[i].run,
                    (unsigned)(c.flags | (edge ? HILAL_CAND_EDGE : 0u)));
            jnum(fp, "x", c.x, 1);
            jnum(fp, "y", c.y, 1);
            jnum(fp, "ra", c.ra, 1);
            jnum(fp, "dec", c.dec, 1);
            jnum(fp, "snr", c.snr, 1);
            jnum(fp, "flux", c.flux, 1);
            jnum(fp, "flux_err", c.flux_err, 1);
            jnum(fp, "mag", c.mag, 1);
            jnum(fp, "rb", c.rb, 1);
            jnum(fp, "mjd", c.mjd, 1);
            jnum(fp, "sci_center", tf_sci(w[i].seed, cx, cy, NX), 1);
            jnum(fp, "diff_center", tf_diff(w[i].seed, cx, cy, NX), 0);
            fputc('}', fp);
            first = 0;
        }
    fprintf(fp, "],\n\"frames\": [");
    const char *names[] = {"A", "B", "A-again", "C"};
    int statuses[] = {HILAL_ARCHIVE_FRAME_SUPERSEDED, HILAL_ARCHIVE_FRAME_COMMITTED,
                      HILAL_ARCHIVE_FRAME_COMMITTED, HILAL_ARCHIVE_FRAME_COMMITTED};
    for (size_t i = 0; i < nw; i++) {
        char sha[65];
        tf_sha(w[i].seed, sha);
        fprintf(fp, "%s{\"row\": %zu, \"name\": \"%s\", \"status\": %d, \"sha256\": \"%s\"}",
                i ? ", " : "", i, names[i], statuses[i], sha);
    }
    fprintf(fp, "],\n\"runs\": [{\"run_id\": 1, \"hash\": \"%s\", \"config\": ", HASH1);
    jstr(fp, CONF1);
    fprintf(fp, "}, {\"run_id\": 2, \"hash\": \"%s\", \"config\": ", HASH2);
    jstr(fp, CONF2);
    fprintf(fp, "}]}\n");
    return fclose(fp) == 0 ? 0 : -1;
}

int main(void)
{
    char dir[4096], path[4200], json[4200], cmd[13000], src[4096];
    written w[4];
    size_t nw = 0;
    hilal_test_tmpdir("archive_interop", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/interop.h5", dir);
    snprintf(json, sizeof json, "%s/expected.json", dir);
    const char *srcdir = getenv("HILAL_SOURCE_DIR");
    snprintf(src, sizeof src, "%s/tests/pipeline/test_archive_interop.py", srcdir ? srcdir : ".");

    CHECK(write_archive(path, w, &nw) == 0, "archive written");
    CHECK(nw == 4 && write_expected(json, w, nw) == 0, "expectations written");

    const char *py = tf_find_python("h5py, astropy.table");
    if (py == NULL) {
        const char *skip = getenv("HILAL_SKIP_PYTHON");
        if (skip != NULL && strcmp(skip, "1") == 0) {
            printf("HILAL_SKIP_PYTHON=1: interop checks skipped\n");
            return hilal_test_finish();
        }
        CHECK(0, "no python3 with h5py and astropy: apt-get install python3-h5py python3-astropy "
                 "(or set HILAL_PYTHON, or HILAL_SKIP_PYTHON=1 to skip)");
        return hilal_test_finish();
    }
    snprintf(cmd, sizeof cmd, "%s '%s' '%s' '%s'", py, src, path, json);
    char *out = NULL;
    int rc = hilal_test_run(cmd, &out);
    printf("%s", out ? out : "");
    CHECK(rc == 0 && out != NULL && strstr(out, "interop OK") != NULL, "h5py and astropy read the archive");
    free(out);
    return hilal_test_finish();
}
