/* Association of detections into objects: an in-memory catalogue of objects
 * with a sky-cell index, used by the archive writer (pipeline/archive.c) to
 * give every candidate an object (docs/archive.md, "Objects").
 *
 * An object's position is the inverse-variance weighted mean of its
 * detections' unit vectors (w = 1 / pos_err^2), renormalised to the sphere;
 * the error of the mean is 1 / sqrt(sum w). A detection belongs to the
 * nearest object whose mean position lies within the association radius
 * (great-circle distance); otherwise it starts a new object.
 *
 * Private to the library. Not thread-safe: the archive calls it under its
 * mutex.
 */
#ifndef HILAL_ASSOCIATE_H
#define HILAL_ASSOCIATE_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/archive.h"
#include "hilal/status.h"

typedef struct hilal_assoc hilal_assoc;

/* An empty catalogue matching within radius_arcsec (> 0). NULL on no memory. */
hilal_assoc *hilal_assoc_new(double radius_arcsec);
void hilal_assoc_free(hilal_assoc *a);

/* Number of objects; object ids are 1..n (index + 1). */
size_t hilal_assoc_count(const hilal_assoc *a);

/* The object with this id (NULL when out of range). The pointer is valid
 * until the next call that adds an object. */
const hilal_archive_object *hilal_assoc_get(const hilal_assoc *a, int64_t object_id);

/* Appends an object as stored (loading /objects); its id must be count + 1. */
hilal_status hilal_assoc_load(hilal_assoc *a, const hilal_archive_object *obj, hilal_error *err);

/* The id of the nearest object within the radius of (ra, dec), 0 when none
 * (or when ra/dec are not finite). *dist_arcsec gets its distance (may be NULL). */
int64_t hilal_assoc_match(const hilal_assoc *a, double ra_deg, double dec_deg,
                          double *dist_arcsec);

/* Adds a detection: to object `object_id`, or to a new object when 0.
 * Returns the object's id (0 on no memory, or when ra/dec are not finite).
 * *prev_cand_id receives the object's previous last_cand_id (0 for a new
 * object). */
int64_t hilal_assoc_add(hilal_assoc *a, int64_t object_id, double ra_deg, double dec_deg,
                        double pos_err_arcsec, double snr, double mjd, int64_t cand_id,
                        int64_t *prev_cand_id);

/* Adds one detection's contribution to an object record (sums, counts,
 * first/last detection) and updates its position. Used by
 * hilal_assoc_add() and to recompute objects from their detections. */
void hilal_assoc_accumulate(hilal_archive_object *obj, double ra_deg, double dec_deg,
                            double pos_err_arcsec, double snr, double mjd, int64_t cand_id);

/* Replaces object_id's record by obj (recomputed elsewhere, e.g. after a
 * detection was withdrawn) and re-indexes it. */
hilal_status hilal_assoc_replace(hilal_assoc *a, const hilal_archive_object *obj,
                                 hilal_error *err);

/* Position error of one detection, arcsec: the centroid error of a point
 * source, sigma_PSF / SNR with sigma_PSF = FWHM / 2.3548 (King 1983), times
 * the pixel scale; floored at 0.01 arcsec. Without a usable FWHM, SNR or
 * pixel scale: 0.3 arcsec. */
double hilal_assoc_pos_err_arcsec(double fwhm_px, double snr, double pixscale_arcsec);

/* Great-circle distance, arcsec (haversine form). */
double hilal_assoc_sep_arcsec(double ra1, double dec1, double ra2, double dec2);

/* Sets the position fields of obj (ra, dec, pos_err_arcsec) from its sums. */
void hilal_assoc_finish_position(hilal_archive_object *obj);

#endif
