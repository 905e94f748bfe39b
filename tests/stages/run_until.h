/* Runs the registered stages in order, from ingest up to and including a
 * named one, on a science and reference pair given by path: for the tests
 * that take a frame part or all of the way through the chain. */
#ifndef HILAL_TEST_RUN_UNTIL_H
#define HILAL_TEST_RUN_UNTIL_H

#include <stdio.h>
#include <string.h>

#include "hilal/hilal.h"

/* Initialises *f (frame_id, sci_path and ref_path set from the arguments)
 * and runs the stages up to `last` (all of them when none is so named) on
 * it. Returns the status; the frame holds the products. */
static inline hilal_status run_until_paths(const hilal_config *cfg, const char *frame_id,
                                           const char *sci, const char *ref, const char *last,
                                           hilal_frame *f, hilal_error *err)
{
    size_t n;
    const hilal_stage *const *all = hilal_registry_stages(&n);
    const hilal_stage *stages[32];
    size_t k = 0;
    for (size_t i = 0; i < n && k < 32; i++) {
        stages[k++] = all[i];
        if (strcmp(all[i]->name, last) == 0)
            break;
    }
    hilal_runner *r = NULL;
    hilal_status st = hilal_runner_new(cfg, stages, k, &r, err);
    if (st != HILAL_OK)
        return st;
    hilal_frame_init(f);
    snprintf(f->frame_id, sizeof f->frame_id, "%s", frame_id);
    snprintf(f->sci_path, sizeof f->sci_path, "%s", sci);
    snprintf(f->ref_path, sizeof f->ref_path, "%s", ref);
    st = hilal_runner_run(r, f, err);
    hilal_runner_free(r);
    return st;
}

/* The same on the simulated pair dir/sci.fits, dir/ref.fits (frame "sim"). */
static inline hilal_status run_until(const hilal_config *cfg, const char *dir, const char *last,
                                     hilal_frame *f, hilal_error *err)
{
    char sci[1024], ref[1024];
    snprintf(sci, sizeof sci, "%.1000s/sci.fits", dir);
    snprintf(ref, sizeof ref, "%.1000s/ref.fits", dir);
    return run_until_paths(cfg, "sim", sci, ref, last, f, err);
}

#endif
