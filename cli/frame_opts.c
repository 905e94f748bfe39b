/* What `hilal run` and `hilal subtract` share: the options that name one
 * frame's inputs, and the runner and frame they start from. */
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* A 1-based HDU number, as --sci-hdu and --ref-hdu take it. */
static int parse_hdu(const char *cmd, const char *opt, const char *text, int *out)
{
    char *end = NULL;
    long v = strtol(text, &end, 10);
    if (end == text || *end != '\0' || v < 1 || v > 100000) {
        fprintf(stderr, "hilal %s: usage error: %s '%s' is not an HDU number (1 = primary)\n",
                cmd, opt, text);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int hilal_cli_frame_option(const char *cmd, char **argv, int *i, hilal_cli_frame_opts *o)
{
    const char *a = argv[*i];
    if (!strcmp(a, "--frame-id")) {
        o->frame_id = argv[++*i];
        return 1;
    }
    if (!strcmp(a, "--sci-hdu"))
        return parse_hdu(cmd, a, argv[++*i], &o->sci_hdu) == 0 ? 1 : -1;
    if (!strcmp(a, "--ref-hdu"))
        return parse_hdu(cmd, a, argv[++*i], &o->ref_hdu) == 0 ? 1 : -1;
    return 0;
}

/* Copies one input path into the frame; a path that does not fit is a
 * usage error rather than a different, cut-short file name. */
static int set_path(const char *cmd, const char *what, const char *path, char *dst, size_t len)
{
    if ((size_t)snprintf(dst, len, "%s", path) < len)
        return 0;
    fprintf(stderr, "hilal %s: usage error: the %s path is %zu characters long, more than the "
                    "%zu a frame holds; use a shorter path (e.g. a symbolic link)\n",
            cmd, what, strlen(path), len - 1);
    return -1;
}

int hilal_cli_frame_start(hilal_cli *cli, const char *cmd, const hilal_stage *const *stages,
                          size_t nstages, const hilal_cli_frame_opts *o, hilal_runner **runner,
                          hilal_frame *frame)
{
    hilal_error err = {0};
    *runner = NULL;
    hilal_frame_init(frame);
    hilal_status st = hilal_runner_new(cli->cfg, stages, nstages, runner, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        return hilal_cli_exit_code(st);
    }
    if (set_path(cmd, "science", o->sci, frame->sci_path, sizeof frame->sci_path) != 0 ||
        set_path(cmd, "reference", o->ref, frame->ref_path, sizeof frame->ref_path) != 0) {
        hilal_runner_free(*runner);
        *runner = NULL;
        return HILAL_EXIT_USAGE;
    }
    frame->sci_hdu = o->sci_hdu;
    frame->ref_hdu = o->ref_hdu;
    /* The frame's name is for messages and archives: a long one is cut to
     * what the frame holds. */
    if (o->frame_id != NULL) {
        snprintf(frame->frame_id, sizeof frame->frame_id, "%s", o->frame_id);
    } else {
        char tmp[sizeof frame->sci_path];
        memcpy(tmp, frame->sci_path, sizeof tmp); /* basename() may modify its argument */
        snprintf(frame->frame_id, sizeof frame->frame_id, "%s", basename(tmp));
    }
    return HILAL_EXIT_OK;
}
