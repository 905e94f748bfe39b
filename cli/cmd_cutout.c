/* hilal cutout: a candidate's stamps as FITS and as a PNG triplet. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "hilal/archive.h"

static void help(void)
{
    printf("Usage: hilal cutout ARCHIVE CAND_ID [-o DIR] [--zoom N] [--no-png]\n"
           "\n"
           "Writes DIR/cand_<CAND_ID>.fits (extensions SCIENCE, REFERENCE, DIFFERENCE,\n"
           "SCORR, VARIANCE, MASK, with the frame's WCS moved to the stamp) and\n"
           "DIR/cand_<CAND_ID>.png (science | reference | difference, zscale limits,\n"
           "asinh stretch, pixels outside the frame in dark red).\n"
           "\n"
           "  -o DIR      output directory (default: current directory)\n"
           "  --zoom N    PNG pixels per stamp pixel, 1..32 (default 4)\n"
           "  --no-png    FITS only\n");
}

int hilal_cli_cutout(int argc, char **argv, hilal_cli *cli)
{
    (void)cli;
    const char *path = NULL, *id_text = NULL, *dir = ".";
    int zoom = 4, png = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            help();
            return HILAL_EXIT_OK;
        } else if (!strcmp(a, "--no-png")) {
            png = 0;
        } else if ((!strcmp(a, "-o") || !strcmp(a, "--output")) && i + 1 < argc) {
            dir = argv[++i];
        } else if (!strcmp(a, "--zoom") && i + 1 < argc) {
            char *end = NULL;
            long z = strtol(argv[++i], &end, 10);
            if (end == argv[i] || *end != '\0' || z < 1 || z > 32) {
                fprintf(stderr, "hilal cutout: usage error: --zoom '%s' is not in 1..32\n", argv[i]);
                return HILAL_EXIT_USAGE;
            }
            zoom = (int)z;
        } else if (a[0] != '-' && path == NULL) {
            path = a;
        } else if (a[0] != '-' && id_text == NULL) {
            id_text = a;
        } else {
            fprintf(stderr, "hilal cutout: usage error: unexpected argument '%s'; see `hilal cutout --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
    }
    char *end = NULL;
    long long cand_id = id_text != NULL ? strtoll(id_text, &end, 10) : 0;
    if (path == NULL || id_text == NULL || end == id_text || *end != '\0' || cand_id < 1) {
        fprintf(stderr, "hilal cutout: usage error: give ARCHIVE and a candidate id (a positive "
                        "integer, the cand_id column of `hilal query`)\n");
        return HILAL_EXIT_USAGE;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        fprintf(stderr, "hilal: io error: output directory %s does not exist; create it first\n", dir);
        return HILAL_EXIT_CANNOT_RUN;
    }

    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_cand cand;
    hilal_archive_frame frame;
    hilal_archive_cutout cut;
    char *header = NULL, fits_path[4200], png_path[4200];
    int current = 0, rc = HILAL_EXIT_OK;
    memset(&cut, 0, sizeof cut);
    hilal_status st = hilal_archive_open_read(path, &ar, &err);
    if (st == HILAL_OK)
        st = hilal_archive_get_candidate(ar, cand_id, &cand, &frame, &current, &err);
    if (st == HILAL_OK)
        st = hilal_archive_read_cutout(ar, cand_id, &cut, &err);
    if (st == HILAL_OK && frame.header_length > 0)
        st = hilal_archive_read_text(ar, frame.header_offset, frame.header_length, &header, &err);
    if (st != HILAL_OK)
        goto fail;
    snprintf(fits_path, sizeof fits_path, "%s/cand_%lld.fits", dir, cand_id);
    snprintf(png_path, sizeof png_path, "%s/cand_%lld.png", dir, cand_id);
    st = hilal_archive_write_cutout_fits(fits_path, &cand, &frame, header, &cut, &err);
    if (st != HILAL_OK)
        goto fail;
    printf("%s\n", fits_path);
    if (png) {
        st = hilal_archive_write_cutout_png(png_path, &cut, zoom, &err);
        if (st != HILAL_OK)
            goto fail;
        printf("%s\n", png_path);
    }
    if (!current)
        fprintf(stderr, "hilal cutout: note: candidate %lld belongs to a frame superseded by a re-run\n",
                cand_id);
    goto cleanup;
fail:
    hilal_cli_report(&err);
    rc = hilal_cli_exit_code(st);
cleanup:
    free(header);
    hilal_archive_cutout_clear(&cut);
    hilal_archive_free(ar);
    return rc;
}
