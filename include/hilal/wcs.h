/* World coordinate systems: the only place wcslib is called.
 *
 * A hilal WCS is a wcslib struct wcsprm allocated by these functions; free it
 * with hilal_wcs_free(). Pixel coordinates here are FITS 1-based (the centre
 * of the first pixel is (1, 1)); sky coordinates are degrees (RA, Dec).
 */
#ifndef HILAL_WCS_H
#define HILAL_WCS_H

#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

struct wcsprm;

/* Parses the first celestial WCS in a header given as nkeys 80-char cards.
 * On success *out is a ready (wcsset) WCS, or NULL when the header holds no
 * celestial WCS (a header without WCS keywords would make wcslib return an
 * identity transform: that case is detected and reported as "none").
 * Returns HILAL_ERR_WCS when WCS keywords are present but unusable. */
hilal_status hilal_wcs_from_header(const char *header, int nkeys, struct wcsprm **out,
                                   hilal_error *err);

/* Deep copy; *out is NULL when src is NULL. */
hilal_status hilal_wcs_copy(const struct wcsprm *src, struct wcsprm **out, hilal_error *err);

/* Frees a WCS made by these functions. Accepts NULL. */
void hilal_wcs_free(struct wcsprm *wcs);

/* Converts n pixel positions (FITS 1-based) to RA/Dec in degrees. Positions
 * that cannot be converted get NaN. */
hilal_status hilal_wcs_pix2sky(struct wcsprm *wcs, int n, const double *x, const double *y,
                               double *ra_deg, double *dec_deg, hilal_error *err);

/* Converts n sky positions (degrees) to FITS 1-based pixel positions; NaN
 * where the conversion fails. */
hilal_status hilal_wcs_sky2pix(struct wcsprm *wcs, int n, const double *ra_deg,
                               const double *dec_deg, double *x, double *y, hilal_error *err);

/* A one-line description: projection, reference point, pixel scale. */
void hilal_wcs_describe(const struct wcsprm *wcs, char *buf, int len);

/* Projection code of the celestial axes ("TAN", "TPV", "SIN", ...). */
const char *hilal_wcs_projection(const struct wcsprm *wcs);

/* Checks that a WCS is a usable celestial transform for an nx x ny image:
 * two celestial axes, pixel -> sky defined at the centre and the four
 * corners, sky -> pixel returning those pixels within 1e-3 px, and a finite,
 * non-zero pixel scale at the centre. HILAL_ERR_WCS with the reason
 * otherwise (wcs == NULL: "no WCS"). */
hilal_status hilal_wcs_check(struct wcsprm *wcs, long nx, long ny, hilal_error *err);

/* Pixel scale at FITS pixel (x, y): the square root of the pixel area on the
 * sky, arcsec/px (from the local Jacobian of pixel -> sky). NaN on failure. */
double hilal_wcs_pixscale_arcsec(struct wcsprm *wcs, double x, double y);

/* Whether two celestial WCS express sky positions in the same system, so
 * that the sky coordinates of one can be fed to the other: same kind of
 * axes (RA/Dec, galactic, ecliptic, ...) and, for equatorial axes, the same
 * reference system (FK4 versus FK5/ICRS, which differ by far less than a
 * pixel, are told apart) and equinox. Returns 1 or 0; on 0, why (if not
 * NULL) describes the difference. */
int hilal_wcs_same_system(const struct wcsprm *a, const struct wcsprm *b, char *why, int len);

#ifdef __cplusplus
}
#endif
#endif
