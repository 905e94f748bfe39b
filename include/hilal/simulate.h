/* The frame simulator: a reference and a science image of the same star
 * field with known injected events, for tests, benchmarks and demos.
 *
 * Stars live on the sky: each has an RA/Dec and each frame projects it with
 * its own TAN WCS. The reference is deeper (lower noise) and may be offset
 * and rotated with respect to the science frame. The science frame holds the
 * events: transients, variable stars, cosmic rays and bad columns. Every
 * random draw comes from a generator seeded by hilal_sim_options.seed, so the
 * same options give byte-identical output. Pixel noise is drawn from a
 * generator keyed by (seed, frame, pixel), so two runs that differ only in
 * their events (e.g. with and without no_events) share the noise of every
 * pixel the events do not touch.
 *
 * Flux convention: flux_ratio is science ADU per reference ADU for the same
 * star (F_sci = flux_ratio * F_ref); a perfect subtraction in science units is
 * D = S - flux_ratio * R, and diff_flux_adu in the truth is what D holds.
 *
 * Coordinates: event and star positions are FITS 1-based pixels (the centre of
 * the first pixel is (1, 1)); RA/Dec in degrees. The full model and the file
 * formats are documented in docs/simulate.md.
 */
#ifndef HILAL_SIMULATE_H
#define HILAL_SIMULATE_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/image.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* PSF profile families. */
typedef enum hilal_sim_psf_model {
    HILAL_SIM_PSF_MOFFAT = 0,   /* Moffat (1969): (beta-1)/(pi a^2) (1 + r^2/a^2)^-beta */
    HILAL_SIM_PSF_GAUSSIAN = 1  /* circular (or elliptical) Gaussian */
} hilal_sim_psf_model;

/* Options. Start from hilal_sim_options_default() and change fields. Counts
 * given as -1 mean "automatic": scaled with the image area from the density
 * noted. The CLI flag of each field is given in brackets. */
typedef struct hilal_sim_options {
    long nx, ny;                 /* image size, px [--size N or NXxNY]; 1024 x 1024; 32..16384 */
    uint64_t seed;               /* random seed [--seed]; 1 */
    double pixscale_arcsec;      /* pixel scale of both frames, arcsec/px [--pixscale]; 1.0 */
    double ra_deg, dec_deg;      /* field centre (CRVAL of both frames) [--center RA,DEC]; 150.0, 2.2 */
    double offset_x_px, offset_y_px; /* a star at reference pixel p near the centre appears at
                                      science pixel p + offset [--offset-px DX,DY]; 0, 0 */
    double rotate_deg;           /* science pixel axes rotated counter-clockwise by this angle
                                    relative to the reference [--rotate-deg]; 0 */

    hilal_sim_psf_model psf_model; /* [--psf moffat|gaussian]; Moffat */
    double moffat_beta;          /* Moffat beta [--beta]; 3.0; > 1.1 */
    double fwhm_ref_px;          /* reference PSF FWHM at the field centre, px [--fwhm-ref]; 2.5 */
    double fwhm_sci_px;          /* science PSF FWHM at the field centre, px [--fwhm-sci]; 3.2 */
    double psf_vary_frac;        /* FWHM varies across the field by up to this fraction
                                    (linear + quadratic terms, see docs) [--psf-vary]; 0 */
    double psf_ellip;            /* PSF ellipticity 1 - b/a [--psf-ellip]; 0; < 0.5 */

    double sky_sci_adu;          /* science sky at the centre, ADU/px [--sky-sci]; 800 */
    double sky_ref_adu;          /* reference sky at the centre, ADU/px [--sky-ref]; 1000 */
    double sky_gradient_frac;    /* sky changes by this fraction across the field along a
                                    random direction per frame [--sky-gradient]; 0.05 */
    double gain_e_per_adu;       /* gain of one exposure, e-/ADU [--gain]; 1.5 */
    double rdnoise_e;            /* read noise of one exposure, e- [--rdnoise]; 5.0 */
    double saturate_adu;         /* saturation level, ADU [--saturate]; 60000 */
    int bleed;                   /* saturated charge bleeds along columns [--bleed/--no-bleed]; 1 */
    double exptime_s;            /* science exposure time, s [--exptime]; 60 */
    double ref_depth;            /* the reference is the mean of this many science-like exposures:
                                    gain x depth, read noise x sqrt(depth) [--ref-depth]; 4 */
    double flux_ratio;           /* science ADU per reference ADU of a star [--flux-ratio]; 0.8 */
    double zeropoint_mag;        /* reference zero point, mag of a 1 ADU source [--zeropoint]; 27.0 */

    double star_density;         /* stars per 10^6 px between mag_bright and mag_faint
                                    [--star-density]; 2000 */
    double mag_bright, mag_faint; /* star magnitude range [--mag-range B,F]; 12.0, 23.0 */
    double count_slope;          /* number counts dN/dm ~ 10^(count_slope m) [--count-slope]; 0.3 */
    double galaxy_density;       /* galaxies per 10^6 px [--galaxy-density]; 20 */

    long n_transients;           /* transients in the science frame [--n-transients]; -1 = 50 per
                                    1024^2 px (at least 3 in frames of 128 x 128 px or more) */
    double snr_min, snr_max;     /* transient and variable ideal S/N range, log-uniform
                                    [--snr-range MIN,MAX]; 3, 100 */
    double galaxy_frac;          /* fraction of transients placed on galaxies [--galaxy-frac]; 0.2 */
    long n_variables;            /* variable stars [--n-variables]; -1 = 10 per 1024^2 (at least 1
                                    in frames of 128 x 128 px or more) */
    long n_cosmics;              /* cosmic rays in the science frame [--n-cosmics]; -1 = 150 per 1024^2 */
    long n_bad_columns;          /* bad columns in the science frame [--bad-columns]; 2 */
    int no_events;               /* no transients, variables, cosmics or bad columns: a
                                    noise-only pair [--no-events]; 0 */

    double mjd_ref, mjd_sci;     /* MJD-OBS of the frames [--mjd-ref, --mjd-sci]; 59900.0, 60300.25 */
    char filter[32];             /* FILTER [--filter]; "r" */
    char object[72];             /* OBJECT [--object]; "HILAL-SIM" */
    int bitpix;                  /* file data type: -32 (float) or 16 (uint16 via BZERO) [--bitpix]; -32 */
    int keep_model;              /* hilal_sim_make: keep the noise-free images in the truth; 0 */
    int nthreads;                /* worker threads, 0 = 2 [--threads]; 0 */
} hilal_sim_options;

/* The documented defaults. */
hilal_sim_options hilal_sim_options_default(void);

/* Checks every option; HILAL_ERR_RANGE with a message naming the CLI flag. */
hilal_status hilal_sim_options_check(const hilal_sim_options *o, hilal_error *err);

/* The event count an option resolves to (automatic counts scaled by area,
 * zero under no_events). which: 0 transients, 1 variables, 2 cosmics,
 * 3 bad columns. */
long hilal_sim_event_count(const hilal_sim_options *o, int which);

typedef enum hilal_sim_event_type {
    HILAL_SIM_TRANSIENT = 0,  /* new point source in the science frame */
    HILAL_SIM_VARIABLE = 1,   /* a star whose science flux differs from flux_ratio x reference */
    HILAL_SIM_COSMIC = 2,     /* sharp charge track in the science frame, not convolved */
    HILAL_SIM_BAD_COLUMN = 3  /* a hot or dead column segment in the science frame */
} hilal_sim_event_type;

/* Name of an event type as written in truth.csv ("transient", ...). */
const char *hilal_sim_event_name(hilal_sim_event_type type);

/* One injected event. */
typedef struct hilal_sim_event {
    long id;                  /* 1-based, in truth.csv order */
    hilal_sim_event_type type;
    double x, y;              /* science pixel, FITS 1-based (bad column: column and centre row) */
    double ra_deg, dec_deg;
    double diff_flux_adu;     /* signed science ADU a perfect S - flux_ratio R measures; NaN for
                                 bad columns */
    double ideal_snr;         /* F sqrt(sum P^2 / (var_S + flux_ratio^2 var_R)), docs/simulate.md;
                                 signed like the flux; NaN for bad columns */
    int on_galaxy;            /* 1 if placed on, or within 2 effective radii of, a galaxy */
    double ref_flux_adu;      /* variables: the star's reference flux (ref ADU); else 0 */
    double sci_flux_adu;      /* variables: the star's science flux; transients: = diff; else 0 */
    double fwhm_px;           /* science PSF FWHM at the position (0 for cosmics/bad columns) */
    double extent_px;         /* cosmic track length / bad column length in rows; 0 otherwise */
    double level_adu;         /* bad columns: added ADU (negative: dead); else 0 */
    long star_index;          /* variables: 0-based index into truth->stars; else -1 */
} hilal_sim_event;

/* One star of the field. */
typedef struct hilal_sim_star {
    double ra_deg, dec_deg;
    double x_ref, y_ref;      /* reference pixel, FITS 1-based (may lie outside the frame) */
    double x_sci, y_sci;      /* science pixel, FITS 1-based */
    double mag;               /* with the reference zero point */
    double flux_ref_adu;      /* total flux in the reference, ADU */
    double flux_sci_adu;      /* total flux in the science frame, ADU (flux_ratio x ref unless
                                 variable) */
    double peak_ref_adu, peak_sci_adu; /* brightest pixel of the star alone, ADU (before sky) */
    int in_ref, in_sci;       /* centre inside the frame */
    int sat_ref, sat_sci;     /* sky + peak reaches the saturation level */
    int variable;             /* 1 if an event changes its science flux */
} hilal_sim_star;

/* One galaxy (Sersic profile convolved with the local PSF). */
typedef struct hilal_sim_galaxy {
    double ra_deg, dec_deg;
    double x_ref, y_ref, x_sci, y_sci; /* FITS 1-based */
    double flux_ref_adu, flux_sci_adu;
    double sersic_n;
    double reff_px;           /* effective (half-light) radius along the major axis, px */
    double axis_ratio;        /* b/a */
    double pa_deg;            /* major axis angle from reference +x, counter-clockwise */
} hilal_sim_galaxy;

/* What one frame was made with. */
typedef struct hilal_sim_frame_info {
    double sky_adu;           /* sky at the field centre, ADU/px */
    double sky_gradient_frac; /* total fractional change across the field */
    double sky_angle_rad;     /* gradient direction from +x */
    double fwhm_px;           /* PSF FWHM at the centre, px */
    double psf_pa_rad;        /* PSF major axis angle (when psf_ellip > 0) */
    double gain_e_per_adu;    /* effective gain written to GAIN */
    double rdnoise_e;         /* effective read noise written to RDNOISE */
    double exptime_s;
    double zeropoint_mag;     /* mag of a 1 ADU source in this frame */
} hilal_sim_frame_info;

/* Everything that was injected, owned by the caller; free with
 * hilal_sim_truth_free(). */
typedef struct hilal_sim_truth {
    long nx, ny;
    size_t nevents;
    hilal_sim_event *events;
    size_t nstars;
    hilal_sim_star *stars;
    size_t ngalaxies;
    hilal_sim_galaxy *galaxies;
    hilal_sim_frame_info ref, sci;
    double flux_ratio;
    float *model_ref;         /* noise-free reference, ADU (keep_model only, else NULL) */
    float *model_sci;         /* noise-free science with all events except cosmics and bad
                                 columns, before saturation (keep_model only) */
} hilal_sim_truth;

void hilal_sim_truth_free(hilal_sim_truth *truth);

/* Sky model of a frame (which: 0 reference, 1 science) at FITS pixel (x, y), ADU. */
double hilal_sim_sky_adu(const hilal_sim_truth *truth, int which, double x, double y);

/* PSF FWHM of a frame at FITS pixel (x, y), px (geometric mean of the axes). */
double hilal_sim_fwhm_px(const hilal_sim_options *o, int which, double x, double y);

/* Simulates the pair in memory. On success *sci and *ref are new images as
 * ingest would make them from the files: pixels in ADU, mask with
 * HILAL_MASK_SAT where a pixel is >= SATURATE and nothing else (bad columns
 * and cosmic rays are left for the pipeline to find), var and sky NULL,
 * metadata and WCS filled, header = the FITS cards. *truth receives the
 * injected content. Any of the three pointers may be NULL when not wanted.
 * On failure nothing is allocated and the out-pointers are NULL. */
hilal_status hilal_sim_make(const hilal_sim_options *o, hilal_image **sci, hilal_image **ref,
                            hilal_sim_truth **truth, hilal_error *err);

/* Simulates the pair and writes outdir/ref.fits, outdir/sci.fits,
 * outdir/truth.csv, outdir/stars.csv, outdir/galaxies.csv and
 * outdir/README.txt (column descriptions and the options used). The
 * directory is created if needed; existing files are replaced. */
hilal_status hilal_sim_write(const hilal_sim_options *o, const char *outdir, hilal_error *err);

/* Writes already simulated images and truth into outdir (as hilal_sim_write). */
hilal_status hilal_sim_write_outputs(const hilal_sim_options *o, const hilal_image *sci,
                                     const hilal_image *ref, const hilal_sim_truth *truth,
                                     const char *outdir, hilal_error *err);

#ifdef __cplusplus
}
#endif
#endif
