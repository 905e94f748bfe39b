/* The psf stage's numeric settings, for the stages that build PSFs the same
 * way (psf, subtract). Private to the library. */
#ifndef HILAL_PSF_CONFIG_H
#define HILAL_PSF_CONFIG_H

#include "hilal/config.h"
#include "hilal/psf.h"

/* Sets the fields of p that the psf.* parameters of cfg give (all but
 * fallback, a string the psf stage checks itself); the others are left as
 * they are. cfg must hold the psf section. */
void hilal_psf_params_from_config(const hilal_config *cfg, hilal_psf_build_params *p);

#endif
