/* The runner: checks a chain of stages, initialises them once and runs them
 * on each frame. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hilal/log.h"
#include "hilal/stage.h"

struct hilal_runner {
    const hilal_config *cfg;
    const hilal_stage **stages;
    void **states;
    size_t n;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Every need of stage i must be made by a stage before it. */
static hilal_status check_chain(const hilal_stage *const *stages, size_t n, hilal_error *err)
{
    unsigned made = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned missing = stages[i]->needs & ~made;
        if (missing != 0) {
            unsigned bit = missing & (~missing + 1u);
            return hilal_error_set(err, HILAL_ERR_CONFIG,
                                   "stage '%s' needs the '%s' product, but no earlier stage makes it",
                                   stages[i]->name, hilal_product_name(bit));
        }
        made |= stages[i]->makes;
    }
    return HILAL_OK;
}

hilal_status hilal_runner_new(const hilal_config *cfg, const hilal_stage *const *stages,
                              size_t nstages, hilal_runner **out, hilal_error *err)
{
    *out = NULL;
    if (stages == NULL)
        stages = hilal_registry_stages(&nstages);
    if (nstages > 32)
        return hilal_error_set(err, HILAL_ERR_INTERNAL, "too many stages (%zu > 32)", nstages);
    hilal_status st = check_chain(stages, nstages, err);
    if (st != HILAL_OK)
        return st;
    hilal_runner *r = calloc(1, sizeof *r);
    if (r == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the runner");
    r->cfg = cfg;
    r->stages = calloc(nstages ? nstages : 1, sizeof *r->stages);
    r->states = calloc(nstages ? nstages : 1, sizeof *r->states);
    if (r->stages == NULL || r->states == NULL) {
        hilal_runner_free(r);
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the runner");
    }
    for (size_t i = 0; i < nstages; i++) {
        r->stages[i] = stages[i];
        if (stages[i]->init != NULL) {
            st = stages[i]->init(cfg, &r->states[i], err);
            if (st != HILAL_OK) {
                hilal_error_context(err, "stage %s", stages[i]->name);
                r->n = i; /* fini only the ones initialised */
                hilal_runner_free(r);
                return st;
            }
        }
        r->n = i + 1;
    }
    *out = r;
    return HILAL_OK;
}

hilal_status hilal_runner_run(const hilal_runner *r, hilal_frame *frame, hilal_error *err)
{
    for (size_t i = 0; i < r->n; i++) {
        const hilal_stage *s = r->stages[i];
        unsigned missing = s->needs & ~frame->products;
        if (missing != 0) {
            unsigned bit = missing & (~missing + 1u);
            hilal_error_set(err, HILAL_ERR_INTERNAL, "product '%s' is missing",
                            hilal_product_name(bit));
            hilal_error_context(err, "frame %s, stage %s", frame->frame_id, s->name);
            return HILAL_ERR_INTERNAL;
        }
        double t0 = now_s();
        hilal_status st = s->run(r->states[i], frame, err);
        frame->stage_seconds[i] = now_s() - t0;
        if (st != HILAL_OK) {
            hilal_error_context(err, "frame %s, stage %s", frame->frame_id, s->name);
            return st;
        }
        frame->products |= s->makes;
        hilal_log(HILAL_LOG_DEBUG, "frame %s: stage %s done in %.3f s", frame->frame_id, s->name,
                  frame->stage_seconds[i]);
    }
    return HILAL_OK;
}

const hilal_stage *const *hilal_runner_stages(const hilal_runner *r, size_t *n)
{
    *n = r->n;
    return r->stages;
}

void hilal_runner_free(hilal_runner *r)
{
    if (r == NULL)
        return;
    for (size_t i = r->n; i-- > 0;)
        if (r->stages[i]->fini != NULL)
            r->stages[i]->fini(r->states[i]);
    free(r->stages);
    free(r->states);
    free(r);
}
