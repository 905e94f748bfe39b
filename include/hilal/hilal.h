/* Umbrella header: the whole public API of the Hilal library. */
#ifndef HILAL_HILAL_H
#define HILAL_HILAL_H

#include "hilal/align.h"
#include "hilal/archive.h"
#include "hilal/checksum.h"
#include "hilal/config.h"
#include "hilal/detect.h"
#include "hilal/fits.h"
#include "hilal/frame.h"
#include "hilal/image.h"
#include "hilal/ingest.h"
#include "hilal/log.h"
#include "hilal/simulate.h"
#include "hilal/stage.h"
#include "hilal/status.h"
#include "hilal/version.h"
#include "hilal/wcs.h"

#endif
