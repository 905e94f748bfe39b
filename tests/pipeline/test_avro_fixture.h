/* A hand-made alert (no archive) for the packet tests: a brightening
 * candidate with two earlier detections and 63 x 63 stamps whose pixel
 * values are known functions of position (NaN in the columns past the
 * frame edge). Included by tests/pipeline/test_voevent.c and test_avro.c. */
#ifndef HILAL_TEST_AVRO_FIXTURE_H
#define HILAL_TEST_AVRO_FIXTURE_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/alert.h"

#define FX_SIZE 63

static inline float fx_pix(int plane, int i, int j)
{
    if (plane == HILAL_ARCHIVE_SCIENCE && i >= 60)
        return NAN; /* stamp past the frame edge */
    return (float)(1000 * plane) + (float)(j * FX_SIZE + i) * 0.5f;
}

static inline void fx_cand(hilal_archive_cand *c, int64_t cand_id, double mjd, double mag, double snr)
{
    memset(c, 0, sizeof *c);
    c->cand_id = cand_id;
    c->frame_id = 123456789012345;
    c->x = 812.34;
    c->y = 401.77;
    c->ra = 150.1234567;
    c->dec = -2.2345678;
    c->snr = snr;
    c->flux = snr * 40.0;
    c->flux_err = 40.0;
    c->mag = mag;
    c->mag_err = 1.0857 / fabs(snr);
    c->fwhm = 3.1;
    c->elongation = 1.1;
    c->rb = 0.93;
    c->flags = 0;
    c->mjd = mjd;
    c->sharpness = 1.05;
    c->neg_frac = 0.02;
    c->dipole = 0.01;
    c->dist_sat_px = 120;
    c->dist_mask_px = 14;
    c->masked_frac = 0;
    c->object_id = 42;
    c->prev_cand_id = cand_id > 100 ? cand_id - 50 : 0;
    c->pos_err_arcsec = 0.08;
    c->stamp_x0 = 781;
    c->stamp_y0 = 370;
}

/* Fills *a; free with hilal_alert_clear(). Returns 0 on success. */
static inline int fx_alert(hilal_alert *a)
{
    memset(a, 0, sizeof *a);
    a->alert_id = hilal_alert_id(123456789012345, 7, 812.34, 401.77);
    fx_cand(&a->cand, 200, 60250.312345, 18.25, 23.5);
    a->history = calloc(2, sizeof *a->history);
    if (a->history == NULL)
        return -1;
    fx_cand(&a->history[0], 100, 60248.30, 19.40, 8.1);
    fx_cand(&a->history[1], 150, 60249.31, 18.90, 12.7);
    a->nhistory = 2;
    a->frame.frame_id = a->cand.frame_id;
    snprintf(a->frame.frame_name, sizeof a->frame.frame_name, "20231101-0042");
    snprintf(a->frame.filter, sizeof a->frame.filter, "r");
    a->frame.first_cand_id = 193;
    a->frame.zeropoint_mag = 28.1;
    a->frame.limmag5 = 21.3;
    a->frame.written_unix = 1698826532.25;
    a->object.object_id = 42;
    a->object.ra = 150.1234561;
    a->object.dec = -2.2345671;
    a->object.pos_err_arcsec = 0.05;
    a->object.ndet = 3;
    a->object.first_mjd = 60248.30;
    a->object.last_mjd = 60250.312345;
    snprintf(a->reason, sizeof a->reason, "3rd detection, brightened by 0.65 mag");
    a->cutout.size = FX_SIZE;
    for (int p = 0; p < HILAL_ARCHIVE_NFLOAT_PLANES; p++) {
        a->cutout.plane[p] = malloc(FX_SIZE * FX_SIZE * sizeof(float));
        if (a->cutout.plane[p] == NULL)
            return -1;
        for (int j = 0; j < FX_SIZE; j++)
            for (int i = 0; i < FX_SIZE; i++)
                a->cutout.plane[p][j * FX_SIZE + i] = fx_pix(p, i, j);
    }
    return 0;
}

#endif
