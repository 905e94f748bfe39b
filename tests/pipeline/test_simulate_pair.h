/* Simulated frames for the simulator's tests (test_simulate.c and
 * test_simulate_model.c): hilal_sim_make with its status checked, and the
 * pair of frames made with and without events from the same options.
 * Header-only, static functions. */
#ifndef HILAL_TEST_SIMULATE_PAIR_H
#define HILAL_TEST_SIMULATE_PAIR_H

#include "hilal/simulate.h"
#include "testutil.h"

#define SP_UNUSED __attribute__((unused))

/* hilal_sim_make, its status checked; 1 on success. */
static SP_UNUSED int make(const hilal_sim_options *o, hilal_image **sci, hilal_image **ref,
                          hilal_sim_truth **truth)
{
    hilal_error err = {0};
    hilal_status st = hilal_sim_make(o, sci, ref, truth, &err);
    CHECK_OK(st, &err);
    return st == HILAL_OK;
}

/* Frees what make() made and sets the pointers to NULL, so that make() can
 * fill them again and a cleanup label can still free them. */
static SP_UNUSED void unmake(hilal_image **sci, hilal_image **ref, hilal_sim_truth **truth)
{
    hilal_image_free(*sci);
    hilal_image_free(*ref);
    hilal_sim_truth_free(*truth);
    *sci = *ref = NULL;
    *truth = NULL;
}

/* The frames of some options with their events, and without (no_events).
 * The seed is the same, so every pixel that no event touches has the same
 * value in both, and S - S0 holds the events alone. */
typedef struct sim_pair {
    hilal_image *sci, *ref;   /* with the events */
    hilal_sim_truth *t;
    hilal_image *sci0, *ref0; /* without */
    hilal_sim_truth *t0;
} sim_pair;

/* Makes both (p starts as {0}); 1 on success. Free with sim_pair_free()
 * either way. */
static SP_UNUSED int sim_pair_make(const hilal_sim_options *o, sim_pair *p)
{
    hilal_sim_options quiet = *o;
    quiet.no_events = 1;
    return make(o, &p->sci, &p->ref, &p->t) && make(&quiet, &p->sci0, &p->ref0, &p->t0);
}

static SP_UNUSED void sim_pair_free(sim_pair *p)
{
    hilal_image_free(p->sci);
    hilal_image_free(p->ref);
    hilal_image_free(p->sci0);
    hilal_image_free(p->ref0);
    hilal_sim_truth_free(p->t);
    hilal_sim_truth_free(p->t0);
    *p = (sim_pair){0};
}

#endif
