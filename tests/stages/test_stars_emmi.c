/* stars stage on a real frame: the ESO NTT/EMMI image against the
 * SExtractor catalogue made from it (testdata/sep_emmi/image.cat): every
 * bright, unflagged SExtractor object is found, at the same windowed
 * position. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/fits.h"
#include "hilal/hilal.h"
#include "testutil.h"

extern const hilal_stage hilal_stage_background;
extern const hilal_stage hilal_stage_stars;

typedef struct sex_obj {
    double xwin, ywin;  /* XWIN_IMAGE, YWIN_IMAGE: FITS 1-based */
    double flux, ferr;  /* FLUX_AUTO, FLUXERR_AUTO */
    double r50;         /* FLUX_RADIUS (second of the three fractions) */
    int flags;
} sex_obj;

/* Reads the ASCII_HEAD catalogue: 21 columns after the '#' header lines
 * (FLUX_APER and FLUXERR_APER hold one value each here; FLUX_RADIUS three). */
static int read_catalogue(const char *path, sex_obj *out, int max)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    char line[1024];
    int n = 0;
    while (fgets(line, sizeof line, f) != NULL && n < max) {
        if (line[0] == '#')
            continue;
        double v[21];
        char *p = line, *end;
        int k = 0;
        for (; k < 21; k++) {
            v[k] = strtod(p, &end);
            if (end == p)
                break;
            p = end;
        }
        if (k != 21)
            continue;
        out[n].xwin = v[3];
        out[n].ywin = v[4];
        out[n].flux = v[15];
        out[n].ferr = v[16];
        out[n].r50 = v[18];
        out[n].flags = (int)v[20];
        n++;
    }
    fclose(f);
    return n;
}

int main(void)
{
    char path[4096], catpath[4096];
    hilal_error err;
    hilal_error_clear(&err);
    sex_obj cat[200];
    int ncat = read_catalogue(hilal_test_data("sep_emmi/image.cat", catpath, sizeof catpath), cat,
                              200);
    CHECK(ncat == 65, "SExtractor catalogue has %d objects", ncat);

    hilal_image *img = NULL;
    hilal_status st = hilal_fits_read_image(hilal_test_data("sep_emmi/image.fits", path, sizeof path),
                                            0, &img, &err);
    CHECK_OK(st, &err);
    if (st != HILAL_OK)
        return hilal_test_finish();

    hilal_config *cfg = hilal_registry_config_new(&err);
    void *bs = NULL, *ss = NULL;
    hilal_frame f;
    hilal_frame_init(&f);
    strcpy(f.frame_id, "emmi");
    f.sci = img;
    f.ref = hilal_image_clone(img, &err);
    f.products = HILAL_PROD_SCIENCE | HILAL_PROD_REFERENCE;
    st = cfg != NULL ? HILAL_OK : err.code;
    if (st == HILAL_OK)
        st = hilal_config_set_arg(cfg, "background.mask_sources=false", &err);
    if (st == HILAL_OK)
        st = hilal_stage_background.init(cfg, &bs, &err);
    if (st == HILAL_OK)
        st = hilal_stage_stars.init(cfg, &ss, &err);
    if (st == HILAL_OK)
        st = hilal_stage_background.run(bs, &f, &err);
    if (st == HILAL_OK)
        st = hilal_stage_stars.run(ss, &f, &err);
    CHECK_OK(st, &err);

    if (st == HILAL_OK) {
        /* Compact (half-light radius 0.8-3 px: not the sharp hot pixels
         * or the diffuse objects SExtractor's 1.5-sigma run splits off),
         * unflagged SExtractor objects of S/N > 20 away from the border:
         * each must be found within 1 px. */
        int nbright = 0, nfound = 0;
        double dmax = 0.0, dsum = 0.0;
        for (int i = 0; i < ncat; i++) {
            const sex_obj *c = &cat[i];
            if (c->flags != 0 || !(c->ferr > 0.0) || c->flux / c->ferr < 20.0 || c->r50 < 0.8 ||
                c->r50 > 3.0 || c->xwin < 10 ||
                c->ywin < 10 || c->xwin > 246 || c->ywin > 246)
                continue;
            nbright++;
            double best = 1.0;
            for (size_t k = 0; k < f.sci_stars.n; k++)
                best = fmin(best, hypot(f.sci_stars.stars[k].x - c->xwin,
                                        f.sci_stars.stars[k].y - c->ywin));
            if (getenv("EMMI_DEBUG"))
                printf("sex %.2f %.2f snr %.0f r50 %.2f best %.2f\n", c->xwin, c->ywin,
                       c->flux / c->ferr, c->r50, best);
            if (best < 1.0) {
                nfound++;
                dmax = fmax(dmax, best);
                dsum += best;
            }
        }
        printf("EMMI: %zu detections (%d SExtractor objects, %d compact, bright, unflagged); %d found, "
               "windowed positions differ by %.3f px on average, %.3f px at most\n",
               f.sci_stars.n, ncat, nbright, nfound, nfound ? dsum / nfound : 0.0, dmax);
        CHECK(nbright >= 10, "%d bright SExtractor objects", nbright);
        CHECK(nfound == nbright, "found %d of %d", nfound, nbright);
        CHECK(nfound > 0 && dsum / nfound < 0.02, "mean position difference %.3f px",
              nfound ? dsum / nfound : 0.0);
        CHECK(dmax < 0.1, "largest position difference %.3f px", dmax);
    }
    hilal_stage_background.fini(bs);
    hilal_stage_stars.fini(ss);
    hilal_config_free(cfg);
    hilal_frame_clear(&f);
    return hilal_test_finish();
}
