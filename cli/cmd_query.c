/* hilal query: candidates of an archive, filtered, as a terminal table, CSV,
 * JSON or a FITS binary table. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "hilal/archive.h"

static void help(void)
{
    printf("Usage: hilal query ARCHIVE [filters] [--format table|csv|json|fits] [-o FILE]\n"
           "\n"
           "Lists the current candidates of an HDF5 archive (rows of frames that were\n"
           "committed and not replaced by a re-run). Works while a night is being written.\n"
           "\n"
           "Filters (all must hold):\n"
           "  --cone RA,DEC,R    within R arcsec of (RA, Dec) in degrees\n"
           "  --mjd MIN,MAX      MJD range, inclusive; either bound may be empty (60000,)\n"
           "  --snr-min X        |snr| >= X (S_corr peak, both signs)\n"
           "  --sign pos|neg     brightening (snr > 0) or fading (snr < 0) only\n"
           "  --rb-min X         real/bogus score >= X\n"
           "  --flags-any M      at least one of the flag bits in M (decimal or 0x hex)\n"
           "  --flags-none M     none of the flag bits in M\n"
           "  --frame ID         frame id (number) or frame name\n"
           "  --run ID           run id, or a prefix of the run's configuration hash\n"
           "  --all              also rows of frames superseded by a re-run\n"
           "\n"
           "Output:\n"
           "  --format F         table (default), csv, json or fits (fits needs -o)\n"
           "  -o FILE            write to FILE instead of standard output\n"
           "\n"
           "Flag bits: 1 near saturation, 2 near mask, 4 edge/truncated stamp, 8 reference\n"
           "defect, 16 dipole, 32 sharp, 64 merged, 128 bad tile (docs/archive.md).\n");
}

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "hilal query: usage error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "; see `hilal query --help`\n");
    return HILAL_EXIT_USAGE;
}

static int parse_double(const char *s, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno != 0 || !isfinite(v))
        return -1;
    *out = v;
    return 0;
}

/* "A,B" or "A,B,C" into doubles; empty parts give NaN when allow_empty. */
static int parse_list(const char *s, double *v, int n, int allow_empty)
{
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    char *p = buf;
    for (int i = 0; i < n; i++) {
        char *comma = strchr(p, ',');
        if ((comma == NULL) != (i == n - 1))
            return -1;
        if (comma != NULL)
            *comma = '\0';
        if (*p == '\0' && allow_empty)
            v[i] = NAN;
        else if (parse_double(p, &v[i]) != 0)
            return -1;
        p = comma != NULL ? comma + 1 : p;
    }
    return 0;
}

static int parse_mask(const char *s, uint32_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (end == s || *end != '\0' || errno != 0 || v > 0xffffffffUL)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

static int all_digits(const char *s)
{
    if (*s == '\0')
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/* --run: a run id, or a unique prefix of a configuration hash. */
static int resolve_run(hilal_archive *ar, const char *text, int32_t *run_id, hilal_error *err)
{
    hilal_archive_run *runs = NULL;
    size_t n = 0, hits = 0;
    if (hilal_archive_read_runs(ar, &runs, &n, err) != HILAL_OK)
        return -1;
    *run_id = 0;
    for (size_t i = 0; i < n; i++) {
        char id[16];
        snprintf(id, sizeof id, "%d", (int)runs[i].run_id);
        if (strcmp(id, text) == 0) {
            *run_id = runs[i].run_id;
            hits = 1;
            break;
        }
        if (strncmp(runs[i].config_hash, text, strlen(text)) == 0) {
            *run_id = runs[i].run_id;
            hits++;
        }
    }
    free(runs);
    if (hits == 1)
        return 0;
    hilal_error_set(err, HILAL_ERR_USAGE, "--run %s %s; `hilal info` lists the runs", text,
                    hits == 0 ? "matches no run" : "matches several runs");
    return -1;
}

/* Text of one field of a row; NaN as `nan_text`. */
static void field_text(const hilal_archive_column *c, const hilal_archive_cand *row, char *buf,
                       size_t len, const char *nan_text)
{
    const char *p = (const char *)row + c->offset;
    switch (c->type) {
    case HILAL_ARCHIVE_COL_I64: snprintf(buf, len, "%lld", (long long)*(const int64_t *)p); break;
    case HILAL_ARCHIVE_COL_I32: snprintf(buf, len, "%d", (int)*(const int32_t *)p); break;
    case HILAL_ARCHIVE_COL_U32: snprintf(buf, len, "%u", (unsigned)*(const uint32_t *)p); break;
    case HILAL_ARCHIVE_COL_U8: snprintf(buf, len, "%u", (unsigned)*(const uint8_t *)p); break;
    case HILAL_ARCHIVE_COL_F64: {
        double v = *(const double *)p;
        if (isnan(v))
            snprintf(buf, len, "%s", nan_text);
        else
            snprintf(buf, len, "%.15g", v);
        break;
    }
    case HILAL_ARCHIVE_COL_STR: snprintf(buf, len, "%s", p); break;
    }
}

static void write_csv(FILE *out, const hilal_archive_cand *rows, size_t n)
{
    size_t nc;
    const hilal_archive_column *cols = hilal_archive_columns("candidates", &nc);
    char buf[64];
    for (size_t k = 0; k < nc; k++)
        fprintf(out, "%s%s", cols[k].name, k + 1 < nc ? "," : "\n");
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < nc; k++) {
            field_text(&cols[k], &rows[i], buf, sizeof buf, "nan");
            fprintf(out, "%s%s", buf, k + 1 < nc ? "," : "\n");
        }
}

static void write_json(FILE *out, const char *path, const hilal_archive_cand *rows, size_t n)
{
    size_t nc;
    const hilal_archive_column *cols = hilal_archive_columns("candidates", &nc);
    char buf[64];
    fprintf(out, "{\"archive\": \"");
    for (const char *p = path; *p; p++) {
        if (*p == '"' || *p == '\\')
            fputc('\\', out);
        if ((unsigned char)*p >= 0x20)
            fputc(*p, out);
    }
    fprintf(out, "\", \"count\": %zu, \"candidates\": [", n);
    for (size_t i = 0; i < n; i++) {
        fprintf(out, "%s\n  {", i > 0 ? "," : "");
        for (size_t k = 0; k < nc; k++) {
            /* JSON has no NaN: null. */
            field_text(&cols[k], &rows[i], buf, sizeof buf, "null");
            fprintf(out, "\"%s\": %s%s", cols[k].name, buf, k + 1 < nc ? ", " : "");
        }
        fputc('}', out);
    }
    fprintf(out, "%s]}\n", n > 0 ? "\n" : "");
}

static void write_table(FILE *out, const hilal_archive_cand *rows, size_t n)
{
    fprintf(out, "%8s %19s %8s %8s %11s %11s %8s %11s %9s %7s %5s %5s %12s %4s\n", "cand_id",
            "frame_id", "x", "y", "ra", "dec", "snr", "flux", "flux_err", "mag", "rb", "flags",
            "mjd", "run");
    for (size_t i = 0; i < n; i++) {
        const hilal_archive_cand *c = &rows[i];
        fprintf(out, "%8lld %19lld %8.2f %8.2f %11.6f %11.6f %8.2f %11.2f %9.2f %7.3f %5.2f %5u %12.5f %4d\n",
                (long long)c->cand_id, (long long)c->frame_id, c->x, c->y, c->ra, c->dec, c->snr,
                c->flux, c->flux_err, c->mag, c->rb, (unsigned)c->flags, c->mjd, (int)c->run_id);
    }
    fprintf(out, "# %zu candidate%s\n", n, n == 1 ? "" : "s");
}

int hilal_cli_query(int argc, char **argv, hilal_cli *cli)
{
    (void)cli;
    const char *path = NULL, *format = "table", *outpath = NULL, *run_text = NULL;
    hilal_archive_filter q;
    hilal_archive_filter_init(&q);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            help();
            return HILAL_EXIT_OK;
        }
        if (!strcmp(a, "--all")) {
            q.include_superseded = 1;
            continue;
        }
        if (a[0] != '-') {
            if (path != NULL)
                return usage_error("unexpected argument '%s'", a);
            path = a;
            continue;
        }
        if (i + 1 >= argc)
            return usage_error("'%s' is unknown or needs a value", a);
        const char *v = argv[++i];
        double d3[3];
        if (!strcmp(a, "--cone")) {
            if (parse_list(v, d3, 3, 0) != 0 || d3[2] <= 0 || d3[1] < -90 || d3[1] > 90)
                return usage_error("--cone '%s' is not RA,DEC,RADIUS (degrees, degrees, arcsec > 0)", v);
            q.use_cone = 1;
            q.ra_deg = d3[0];
            q.dec_deg = d3[1];
            q.radius_arcsec = d3[2];
        } else if (!strcmp(a, "--mjd")) {
            if (parse_list(v, d3, 2, 1) != 0)
                return usage_error("--mjd '%s' is not MIN,MAX", v);
            q.mjd_min = d3[0];
            q.mjd_max = d3[1];
        } else if (!strcmp(a, "--snr-min")) {
            if (parse_double(v, &q.snr_min) != 0)
                return usage_error("--snr-min '%s' is not a number", v);
        } else if (!strcmp(a, "--rb-min")) {
            if (parse_double(v, &q.rb_min) != 0)
                return usage_error("--rb-min '%s' is not a number", v);
        } else if (!strcmp(a, "--sign")) {
            if (!strcmp(v, "pos") || !strcmp(v, "+"))
                q.sign = 1;
            else if (!strcmp(v, "neg") || !strcmp(v, "-"))
                q.sign = -1;
            else
                return usage_error("--sign '%s' is not pos or neg", v);
        } else if (!strcmp(a, "--flags-any")) {
            if (parse_mask(v, &q.flags_any) != 0)
                return usage_error("--flags-any '%s' is not a bit mask", v);
        } else if (!strcmp(a, "--flags-none")) {
            if (parse_mask(v, &q.flags_none) != 0)
                return usage_error("--flags-none '%s' is not a bit mask", v);
        } else if (!strcmp(a, "--frame")) {
            if (all_digits(v))
                q.frame_id = strtoll(v, NULL, 10);
            else
                q.frame_name = v;
        } else if (!strcmp(a, "--run")) {
            run_text = v;
        } else if (!strcmp(a, "--format")) {
            if (strcmp(v, "table") && strcmp(v, "csv") && strcmp(v, "json") && strcmp(v, "fits"))
                return usage_error("--format '%s' is not table, csv, json or fits", v);
            format = v;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            outpath = v;
        } else {
            return usage_error("unknown option '%s'", a);
        }
    }
    if (path == NULL)
        return usage_error("%s", "an ARCHIVE is required");
    if (!strcmp(format, "fits") && outpath == NULL)
        return usage_error("%s", "--format fits needs -o FILE");

    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_archive_cand *rows = NULL;
    size_t n = 0;
    int rc = HILAL_EXIT_OK;
    hilal_status st = hilal_archive_open_read(path, &ar, &err);
    if (st == HILAL_OK && run_text != NULL && resolve_run(ar, run_text, &q.run_id, &err) != 0)
        st = err.code;
    if (st == HILAL_OK)
        st = hilal_archive_query(ar, &q, &rows, &n, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        rc = hilal_cli_exit_code(st);
        goto cleanup;
    }
    if (!strcmp(format, "fits")) {
        st = hilal_archive_write_fits_table(outpath, rows, n, path, &err);
        if (st != HILAL_OK) {
            hilal_cli_report(&err);
            rc = hilal_cli_exit_code(st);
        }
        goto cleanup;
    }
    FILE *out = stdout;
    if (outpath != NULL) {
        out = fopen(outpath, "w");
        if (out == NULL) {
            fprintf(stderr, "hilal: io error: cannot write %s: %s\n", outpath, strerror(errno));
            rc = HILAL_EXIT_CANNOT_RUN;
            goto cleanup;
        }
    }
    if (!strcmp(format, "csv"))
        write_csv(out, rows, n);
    else if (!strcmp(format, "json"))
        write_json(out, path, rows, n);
    else
        write_table(out, rows, n);
    if (out != stdout && fclose(out) != 0) {
        fprintf(stderr, "hilal: io error: cannot write %s: %s\n", outpath, strerror(errno));
        rc = HILAL_EXIT_CANNOT_RUN;
    }
cleanup:
    free(rows);
    hilal_archive_free(ar);
    return rc;
}
