/* Stage descriptors, the stage registry and the runner.
 *
 * A stage is a const descriptor: a name, its parameter table, the products
 * it needs and makes, and three callbacks. See docs/adding-a-stage.md.
 */
#ifndef HILAL_STAGE_H
#define HILAL_STAGE_H

#include <stddef.h>

#include "hilal/config.h"
#include "hilal/frame.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

enum hilal_stage_flag {
    HILAL_STAGE_INPLACE = 1u << 0 /* run() may modify products it needs (documented per stage) */
};

typedef struct hilal_stage {
    const char *name;           /* also the config section name */
    const char *summary;        /* one line for --help */
    const hilal_param *params;  /* parameter table (may be NULL when nparams == 0) */
    size_t nparams;
    unsigned needs;             /* hilal_product bits that must exist before run() */
    unsigned makes;             /* hilal_product bits run() adds */
    unsigned flags;             /* hilal_stage_flag bits */
    /* Once per run, before any frame: read and validate parameters, load
     * what is shared across frames. *state may stay NULL. */
    hilal_status (*init)(const hilal_config *cfg, void **state, hilal_error *err);
    /* Once per frame; state is shared read-only between concurrent frames. */
    hilal_status (*run)(const void *state, hilal_frame *frame, hilal_error *err);
    /* Once per run; frees state. Accepts NULL. */
    void (*fini)(void *state);
} hilal_stage;

/* The registry: every stage in pipeline order. */
const hilal_stage *const *hilal_registry_stages(size_t *n);

/* Looks a stage up by name; NULL if unknown. */
const hilal_stage *hilal_registry_find(const char *name);

/* All parameter sections: "pipeline" first, then one per stage with params. */
const hilal_param_section *hilal_registry_sections(size_t *n);

/* A configuration with every registered parameter at its default. */
hilal_config *hilal_registry_config_new(hilal_error *err);

typedef struct hilal_runner hilal_runner;

/* Checks the chain (every need made earlier) and calls every init. On error
 * nothing is left allocated and *out is NULL. The configuration is borrowed
 * and must outlive the runner. stages == NULL means the whole registry. */
hilal_status hilal_runner_new(const hilal_config *cfg, const hilal_stage *const *stages,
                              size_t nstages, hilal_runner **out, hilal_error *err);

/* Runs every stage on the frame, in order, recording each stage's wall time
 * in frame->stage_seconds. Errors get "frame <id>, stage <name>: " context. */
hilal_status hilal_runner_run(const hilal_runner *runner, hilal_frame *frame, hilal_error *err);

/* Stages of a runner (for reporting timings). */
const hilal_stage *const *hilal_runner_stages(const hilal_runner *runner, size_t *n);

void hilal_runner_free(hilal_runner *runner);

#ifdef __cplusplus
}
#endif
#endif
