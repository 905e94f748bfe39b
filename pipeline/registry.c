/* The stage registry: every stage, in pipeline order, listed explicitly. */
#include <stdlib.h>
#include <string.h>

#include "hilal/night.h"
#include "hilal/stage.h"

/* Stage descriptors, each defined in stages/<name>.c. */
extern const hilal_stage hilal_stage_ingest;
extern const hilal_stage hilal_stage_background;
extern const hilal_stage hilal_stage_stars;
extern const hilal_stage hilal_stage_align;
extern const hilal_stage hilal_stage_psf;
extern const hilal_stage hilal_stage_fluxscale;
extern const hilal_stage hilal_stage_subtract;
extern const hilal_stage hilal_stage_detect;
extern const hilal_stage hilal_stage_measure;
extern const hilal_stage hilal_stage_vet;
extern const hilal_stage hilal_stage_archive;
extern const hilal_stage hilal_stage_alert;

static const hilal_stage *const registry[] = {
    &hilal_stage_ingest,
    &hilal_stage_background,
    &hilal_stage_stars,
    &hilal_stage_align,
    &hilal_stage_psf,
    &hilal_stage_fluxscale,
    &hilal_stage_subtract,
    &hilal_stage_detect,
    &hilal_stage_measure,
    &hilal_stage_vet,
    &hilal_stage_archive,
    &hilal_stage_alert,
};
#define NSTAGES (sizeof registry / sizeof registry[0])

/* Parameters that belong to no single stage. */
static const hilal_param pipeline_params[] = {
    {"threads", HILAL_PARAM_INT, "0", 0, 256, "",
     "threads for FFTs and pixel loops within one frame (0 = one per core)", HILAL_PARAM_EXECUTION},
    {"workers", HILAL_PARAM_INT, "1", 1, 256, "",
     "frames processed concurrently by `hilal night` (each holds one frame's products)",
     HILAL_PARAM_EXECUTION},
    {"edge_margin", HILAL_PARAM_INT, "8", 0, 512, "px",
     "pixels at the image border flagged EDGE; no candidates are reported there"},
};

const hilal_stage *const *hilal_registry_stages(size_t *n)
{
    *n = NSTAGES;
    return registry;
}

const hilal_stage *hilal_registry_find(const char *name)
{
    for (size_t i = 0; i < NSTAGES; i++)
        if (strcmp(registry[i]->name, name) == 0)
            return registry[i];
    return NULL;
}

const hilal_param_section *hilal_registry_sections(size_t *n)
{
    /* Built once; the registry is constant so there is no race in practice,
     * but guard with a static initialiser that is idempotent. */
    static hilal_param_section sections[NSTAGES + 2];
    static size_t count;
    if (count == 0) {
        size_t k = 0;
        sections[k++] = (hilal_param_section){
            "pipeline", "settings shared by all stages", pipeline_params,
            sizeof pipeline_params / sizeof pipeline_params[0]};
        sections[k++] = hilal_night_section; /* `hilal night` and `hilal reprocess` */
        for (size_t i = 0; i < NSTAGES; i++)
            if (registry[i]->nparams > 0)
                sections[k++] = (hilal_param_section){registry[i]->name, registry[i]->summary,
                                                      registry[i]->params, registry[i]->nparams};
        count = k;
    }
    *n = count;
    return sections;
}

hilal_config *hilal_registry_config_new(hilal_error *err)
{
    size_t n;
    const hilal_param_section *sections = hilal_registry_sections(&n);
    return hilal_config_new(sections, n, err);
}
