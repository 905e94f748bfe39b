/* Ingest: reading a science or reference image and its detector metadata.
 *
 * The ingest stage (hilal_stage_ingest, configuration section [ingest])
 * reads frame->sci_path / sci_hdu into frame->sci and frame->ref_path /
 * ref_hdu into frame->ref, through hilal_ingest_read(), which `hilal
 * inspect` and other commands use as well, so every program reads images
 * the same way. See docs/ingest.md.
 *
 * Detector values come from header keywords whose names are configurable
 * (ingest.key_gain = "GAIN", ...). A keyword missing from the image's HDU
 * is looked up in the primary header (multi-extension files keep EXPTIME,
 * DATE-OBS, ... there). When the header has no value, the configured
 * fallback (ingest.gain, ingest.rdnoise, ingest.saturate,
 * ingest.zeropoint) is used; its default "nan" means "no fallback". To
 * override a header value, empty the keyword name (ingest.key_gain = "")
 * and set the value.
 *
 * Required: gain and read noise (the noise model of the subtraction needs
 * them); without them the read fails with HILAL_ERR_CONFIG and a message
 * naming the file, the HDU and the keyword. Saturation without a value is
 * +Inf (no pixel flagged saturated) and a warning is logged. Exposure time,
 * MJD, filter, object and zero point may stay unknown (NaN / "").
 */
#ifndef HILAL_INGEST_H
#define HILAL_INGEST_H

#include "hilal/config.h"
#include "hilal/image.h"
#include "hilal/stage.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

#define HILAL_INGEST_KEY_MAX 72 /* longest keyword name, HIERARCH included */

typedef struct hilal_ingest_opts {
    /* Header keyword names; "" = never read this keyword from the header. */
    char key_gain[HILAL_INGEST_KEY_MAX];      /* default "GAIN" (e-/ADU) */
    char key_rdnoise[HILAL_INGEST_KEY_MAX];   /* default "RDNOISE" (e-) */
    char key_saturate[HILAL_INGEST_KEY_MAX];  /* default "SATURATE" (ADU) */
    char key_exptime[HILAL_INGEST_KEY_MAX];   /* default "EXPTIME" (s) */
    char key_mjd[HILAL_INGEST_KEY_MAX];       /* default "MJD-OBS" (days) */
    char key_dateobs[HILAL_INGEST_KEY_MAX];   /* default "DATE-OBS", used without key_mjd */
    char key_timeobs[HILAL_INGEST_KEY_MAX];   /* default "TIME-OBS", when DATE-OBS has no time */
    char key_filter[HILAL_INGEST_KEY_MAX];    /* default "FILTER" */
    char key_object[HILAL_INGEST_KEY_MAX];    /* default "OBJECT" */
    char key_zeropoint[HILAL_INGEST_KEY_MAX]; /* default "MAGZP" (mag) */
    /* Fallbacks used when the header has no value; NaN = none. */
    double gain_e_per_adu;
    double rdnoise_e;
    double saturate_adu;
    double zeropoint_mag;
    /* A pixel value meaning "no data" besides NaN, BLANK and +-FLT_MAX
     * (compared after BSCALE/BZERO as float32): such pixels get
     * HILAL_MASK_NODATA and NaN. NaN = none (default). */
    double nodata_adu;
    /* The MJD / DATE-OBS keyword is the exposure start (default 1): add
     * half the exposure time to get the mid-exposure MJD stored in
     * meta.mjd. 0: the keyword already is mid-exposure. */
    int mjd_is_start;
    /* 1 (default): missing gain or read noise is an error. 0: they stay
     * NaN (used by `hilal inspect`, which reports them as unknown). */
    int require_noise;
} hilal_ingest_opts;

/* Where each value came from, for reports: "header GAIN (HDU 2)",
 * "header EXPTIME (primary HDU)", "ingest.gain", "default +Inf",
 * "" when unknown. */
typedef struct hilal_ingest_sources {
    char gain[96], rdnoise[96], saturate[96], exptime[96], mjd[96], filter[96], object[96],
        zeropoint[96];
} hilal_ingest_sources;

/* The built-in defaults (those of the [ingest] parameter table). */
void hilal_ingest_opts_default(hilal_ingest_opts *opts);

/* Options from the [ingest] section of a configuration. HILAL_ERR_CONFIG
 * when a keyword name is too long. */
hilal_status hilal_ingest_opts_from_config(const hilal_config *cfg, hilal_ingest_opts *opts,
                                           hilal_error *err);

/* Reads the image at path / hdu (see hilal_fits_read_image() for the path
 * syntax, the HDU choice and what is accepted or rejected), fills the
 * detector metadata from the header and the options, and flags pixels at
 * or above the saturation level with HILAL_MASK_SAT. *out is a new image
 * (free with hilal_image_free()), NULL on error. sources may be NULL. */
hilal_status hilal_ingest_read(const hilal_ingest_opts *opts, const char *path, int hdu,
                               hilal_image **out, hilal_ingest_sources *sources,
                               hilal_error *err);

/* The ingest stage: makes HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE. An
 * image already present in frame->sci or frame->ref (a reference cache may
 * preload it) is kept as it is. */
extern const hilal_stage hilal_stage_ingest;

#ifdef __cplusplus
}
#endif
#endif
