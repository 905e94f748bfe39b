/* A small simulated night for the night tests: two fields of three
 * 256 x 256 science frames each (offset pointings of the same star field),
 * one reference per field in a library (OBJECT = FIELD-A, FIELD-B), a
 * truncated (corrupt) FITS file and a frame of a third field (FIELD-C) that
 * has no reference.
 *
 *   <dir>/night/a1.fits a2.fits a3.fits   field A (RA 150.0, Dec 2.2)
 *   <dir>/night/b1.fits b2.fits b3.fits   field B (RA 151.0, Dec 2.5)
 *   <dir>/night/bad.fits                  the first 20000 bytes of a1.fits
 *   <dir>/night/c_noref.fits              field C (RA 200, Dec -20), no reference
 *   <dir>/refs/refA.fits refB.fits
 *
 * The science frames of a field share the simulator seed (same stars, on
 * the sky) and differ in pointing offset and MJD, so their files differ. */
#ifndef TEST_NIGHT_DATA_H
#define TEST_NIGHT_DATA_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define NIGHT_SIZE_PX 256
#define NIGHT_GOOD_FRAMES 6

/* Copies a file, or its first `limit` bytes (limit 0: all). */
static int night_copy(const char *from, const char *to, long limit)
{
    FILE *in = fopen(from, "rb"), *out = in ? fopen(to, "wb") : NULL;
    char buf[65536];
    long done = 0;
    size_t n;
    int ok = in != NULL && out != NULL;
    while (ok && (n = fread(buf, 1, sizeof buf, in)) > 0) {
        if (limit > 0 && done + (long)n > limit)
            n = (size_t)(limit - done);
        ok = fwrite(buf, 1, n, out) == n;
        done += (long)n;
        if (limit > 0 && done >= limit)
            break;
    }
    if (in)
        fclose(in);
    if (out && fclose(out) != 0)
        ok = 0;
    return ok;
}

/* Simulates one pair into <dir>/sim/<tag> and copies its science frame
 * to <dir>/night/<tag>.fits (and its reference to refs/<ref> if ref). */
static int night_sim(const char *dir, const char *tag, unsigned seed, double ra, double dec,
                     double dx, double dy, double mjd, const char *object, const char *ref)
{
    char sim[8192], from[8400], to[8400];
    hilal_error err = {0};
    hilal_sim_options o = hilal_sim_options_default();
    o.nx = o.ny = NIGHT_SIZE_PX;
    o.seed = seed;
    o.ra_deg = ra;
    o.dec_deg = dec;
    o.offset_x_px = dx;
    o.offset_y_px = dy;
    o.star_density = 6000;
    o.mjd_sci = mjd;
    o.nthreads = 1;
    snprintf(o.object, sizeof o.object, "%s", object);
    snprintf(sim, sizeof sim, "%s/sim/%s", dir, tag);
    if (hilal_sim_write(&o, sim, &err) != HILAL_OK) {
        fprintf(stderr, "simulating %s: %s\n", tag, err.msg);
        return 0;
    }
    snprintf(from, sizeof from, "%s/sci.fits", sim);
    snprintf(to, sizeof to, "%s/night/%s.fits", dir, tag);
    if (!night_copy(from, to, 0))
        return 0;
    if (ref != NULL) {
        snprintf(from, sizeof from, "%s/ref.fits", sim);
        snprintf(to, sizeof to, "%s/refs/%s", dir, ref);
        if (!night_copy(from, to, 0))
            return 0;
    }
    return 1;
}

/* Makes the night under dir (which must exist and be empty). */
static int night_make(const char *dir)
{
    char cmd[16384], from[8400], to[8400];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/night' '%s/refs' '%s/sim'", dir, dir, dir);
    if (system(cmd) != 0)
        return 0;
    int ok = 1;
    for (int k = 1; k <= 3 && ok; k++) {
        char tag[8];
        snprintf(tag, sizeof tag, "a%d", k);
        ok = night_sim(dir, tag, 101, 150.0, 2.2, 1.3 * k - 2, -0.7 * k + 1, 60300.0 + 0.01 * k,
                       "FIELD-A", k == 1 ? "refA.fits" : NULL);
        snprintf(tag, sizeof tag, "b%d", k);
        ok = ok && night_sim(dir, tag, 202, 151.0, 2.5, -1.1 * k + 1, 0.9 * k - 1,
                             60300.0 + 0.01 * k, "FIELD-B", k == 1 ? "refB.fits" : NULL);
    }
    ok = ok && night_sim(dir, "c_noref", 303, 200.0, -20.0, 0, 0, 60300.5, "FIELD-C", NULL);
    snprintf(from, sizeof from, "%s/night/a1.fits", dir);
    snprintf(to, sizeof to, "%s/night/bad.fits", dir);
    return ok && night_copy(from, to, 20000);
}

#endif
