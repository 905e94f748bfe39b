#include "hilal/frame.h"

#include <stdlib.h>
#include <string.h>

const char *hilal_product_name(unsigned bit)
{
    static const char *const names[HILAL_PROD_COUNT] = {
        "science", "reference", "background", "stars", "aligned", "psf",
        "fluxscale", "difference", "candidates", "measured", "vetted", "archived"};
    for (int i = 0; i < HILAL_PROD_COUNT; i++)
        if (bit == 1u << i)
            return names[i];
    return "?";
}

void hilal_frame_init(hilal_frame *frame)
{
    memset(frame, 0, sizeof *frame);
    frame->flux_ratio = 1.0;
}

void hilal_psf_clear(hilal_psf *psf)
{
    if (psf == NULL)
        return;
    free(psf->data);
    memset(psf, 0, sizeof *psf);
}

void hilal_starlist_clear(hilal_starlist *list)
{
    if (list == NULL)
        return;
    free(list->stars);
    list->stars = NULL;
    list->n = 0;
}

void hilal_diff_clear(hilal_diff *diff)
{
    if (diff == NULL)
        return;
    free(diff->d);
    free(diff->s);
    free(diff->scorr);
    free(diff->flux);
    free(diff->flux_err);
    free(diff->mask);
    hilal_psf_clear(&diff->psf_d);
    free(diff->tiles);
    memset(diff, 0, sizeof *diff);
}

void hilal_frame_clear(hilal_frame *frame)
{
    if (frame == NULL)
        return;
    hilal_image_free(frame->sci);
    hilal_image_free(frame->ref);
    hilal_starlist_clear(&frame->sci_stars);
    hilal_starlist_clear(&frame->ref_stars);
    hilal_psf_clear(&frame->sci_psf);
    hilal_psf_clear(&frame->ref_psf);
    hilal_diff_clear(&frame->diff);
    free(frame->cands);
    hilal_frame_init(frame);
}
