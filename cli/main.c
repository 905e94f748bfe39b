/* hilal: the command-line client of the Hilal library. Parses global
 * options, builds the configuration and dispatches to a subcommand. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

typedef struct command {
    const char *name;
    int (*fn)(int argc, char **argv, hilal_cli *cli);
    const char *summary;
} command;

static const command commands[] = {
    {"run", hilal_cli_run, "one science frame against its reference, through every stage"},
    {"subtract", hilal_cli_subtract, "ZOGY subtraction of one science image against a reference into a FITS file"},
    {"inspect", hilal_cli_inspect, "show what ingest reads from FITS files"},
    {"simulate", hilal_cli_simulate, "write a simulated reference/science pair with a truth table"},
    {"config", hilal_cli_config, "print the effective configuration and where each value came from"},
    {"query", hilal_cli_query, "list an archive's candidates, filtered, as a table, CSV, JSON or FITS"},
    {"cutout", hilal_cli_cutout, "write a candidate's stamps as FITS and a PNG triplet"},
    {"info", hilal_cli_info, "show an archive's schema, runs, frames and candidate counts"},
    {"alert", hilal_cli_alert, "replay or re-send an archive's alerts (VOEvent/Avro to a directory, command, Kafka)"},
    {"night", hilal_cli_night, "a night's frames against a reference library, in parallel, into one archive"},
    {"reprocess", hilal_cli_reprocess, "re-run the frames of an archive under another configuration"},
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: hilal [global options] <command> [command options]\n"
            "\n"
            "Hilal finds transients: ZOGY proper image subtraction of science frames\n"
            "against references, detection on S_corr, vetting, HDF5 archives and alerts.\n"
            "\n"
            "Commands:\n");
    for (size_t i = 0; i < NCOMMANDS; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(out,
            "\n"
            "Global options (before the command; --config and --set also after it):\n"
            "  -h, --help           this help; `hilal <command> --help` for a command\n"
            "  -V, --version        version of hilal and of its libraries\n"
            "  -v, --verbose        more log output (repeat for debug)\n"
            "  -q, --quiet          errors only\n"
            "  --config FILE        read a configuration file (may be repeated)\n"
            "  --set SECTION.KEY=VALUE  override one configuration value (may be repeated)\n"
            "\n"
            "Configuration precedence: built-in defaults < $HILAL_CONFIG (or\n"
            "~/.config/hilal/hilal.conf) < --config FILE < --set. `hilal config` prints it.\n"
            "\n"
            "Exit codes:\n"
            "  0  success\n"
            "  2  usage error (bad command line)\n"
            "  3  configuration error (unknown key, bad or out-of-range value)\n"
            "  4  ran, but one or more frames failed (see the report)\n"
            "  5  could not run (unreadable input, unwritable output, ...)\n");
}

static const char *level_names[] = {"error", "warning", "info", "debug"};

static void log_to_stderr(hilal_log_level level, const char *msg, void *user)
{
    (void)user;
    char stamp[32];
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(stamp, sizeof stamp, "%H:%M:%S", &tm);
    fprintf(stderr, "%s hilal %s: %s\n", stamp, level_names[level], msg);
}

void hilal_cli_report(const hilal_error *err)
{
    fprintf(stderr, "hilal: %s: %s\n", hilal_status_name(err->code),
            err->msg[0] ? err->msg : "(no message)");
}

int hilal_cli_exit_code(hilal_status st)
{
    switch (st) {
    case HILAL_OK: return HILAL_EXIT_OK;
    case HILAL_ERR_USAGE: return HILAL_EXIT_USAGE;
    case HILAL_ERR_CONFIG: return HILAL_EXIT_CONFIG;
    default: return HILAL_EXIT_CANNOT_RUN;
    }
}

int hilal_cli_config_option(hilal_cli *cli, int argc, char **argv, int *i)
{
    const char *opt = argv[*i];
    const char *val = NULL;
    int is_set = 0;
    if (strcmp(opt, "--set") == 0 || strcmp(opt, "--config") == 0) {
        if (*i + 1 >= argc) {
            fprintf(stderr, "hilal: usage error: %s needs a value\n", opt);
            return -1;
        }
        is_set = opt[2] == 's';
        val = argv[++*i];
    } else if (strncmp(opt, "--set=", 6) == 0) {
        is_set = 1;
        val = opt + 6;
    } else if (strncmp(opt, "--config=", 9) == 0) {
        val = opt + 9;
    } else {
        return 0;
    }
    hilal_error err = {0};
    hilal_status st = is_set ? hilal_config_set_arg(cli->cfg, val, &err)
                             : hilal_config_load_file(cli->cfg, val, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        return -1;
    }
    return 1;
}

void hilal_cli_progress(const hilal_cli *cli, const char *what, long done, long total,
                        double elapsed_s)
{
    if (cli->verbosity < 0)
        return;
    double rate = elapsed_s > 0 ? (double)done / elapsed_s : 0;
    double eta = rate > 0 ? (double)(total - done) / rate : 0;
    if (cli->is_tty) {
        int width = 30, fill = total > 0 ? (int)(width * done / total) : width;
        fprintf(stderr, "\r%s [%.*s%*s] %ld/%ld  %.2f/s  ETA %d:%02d ", what, fill,
                "##############################", width - fill, "", done, total, rate,
                (int)eta / 60, (int)eta % 60);
        if (done >= total)
            fputc('\n', stderr);
        fflush(stderr);
    } else {
        hilal_log(HILAL_LOG_INFO, "%s %ld/%ld done, %.2f/s, ETA %.0f s", what, done, total, rate, eta);
    }
}

/* The user configuration file, if any: $HILAL_CONFIG, else
 * $XDG_CONFIG_HOME/hilal/hilal.conf, else ~/.config/hilal/hilal.conf. An
 * explicitly named $HILAL_CONFIG must exist; the others are optional. */
static int load_user_config(hilal_config *cfg)
{
    hilal_error err = {0};
    const char *env = getenv("HILAL_CONFIG");
    char path[4096];
    if (env != NULL && *env != '\0') {
        if (hilal_config_load_file(cfg, env, &err) != HILAL_OK) {
            hilal_error_context(&err, "$HILAL_CONFIG");
            hilal_cli_report(&err);
            return -1;
        }
        return 0;
    }
    const char *xdg = getenv("XDG_CONFIG_HOME"), *home = getenv("HOME");
    if (xdg != NULL && *xdg != '\0')
        snprintf(path, sizeof path, "%s/hilal/hilal.conf", xdg);
    else if (home != NULL && *home != '\0')
        snprintf(path, sizeof path, "%s/.config/hilal/hilal.conf", home);
    else
        return 0;
    if (access(path, R_OK) != 0)
        return 0;
    if (hilal_config_load_file(cfg, path, &err) != HILAL_OK) {
        hilal_cli_report(&err);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    hilal_cli cli = {0};
    cli.prog = "hilal";
    cli.is_tty = isatty(STDERR_FILENO);
    int rc = HILAL_EXIT_OK;
    hilal_error err = {0};

    cli.cfg = hilal_registry_config_new(&err);
    if (cli.cfg == NULL) {
        hilal_cli_report(&err);
        return HILAL_EXIT_CANNOT_RUN;
    }
    if (load_user_config(cli.cfg) != 0) {
        rc = HILAL_EXIT_CONFIG;
        goto cleanup;
    }

    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        int used;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            goto cleanup;
        } else if (!strcmp(a, "-V") || !strcmp(a, "--version")) {
            printf("hilal %s\n%s\n", hilal_version(), hilal_library_versions());
            goto cleanup;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            cli.verbosity++;
        } else if (!strcmp(a, "-vv")) {
            cli.verbosity += 2;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            cli.verbosity = -1;
        } else if ((used = hilal_cli_config_option(&cli, argc, argv, &i)) != 0) {
            if (used < 0) {
                rc = HILAL_EXIT_CONFIG;
                goto cleanup;
            }
        } else {
            fprintf(stderr, "hilal: usage error: unknown option '%s'; see `hilal --help`\n", a);
            rc = HILAL_EXIT_USAGE;
            goto cleanup;
        }
    }
    if (i >= argc) {
        usage(stderr);
        rc = HILAL_EXIT_USAGE;
        goto cleanup;
    }
    hilal_log_level level = cli.verbosity < 0 ? HILAL_LOG_ERROR
                            : cli.verbosity == 0 ? HILAL_LOG_WARN
                            : cli.verbosity == 1 ? HILAL_LOG_INFO
                                                 : HILAL_LOG_DEBUG;
    hilal_log_set_handler(log_to_stderr, NULL, level);

    const command *cmd = NULL;
    for (size_t k = 0; k < NCOMMANDS; k++)
        if (strcmp(commands[k].name, argv[i]) == 0)
            cmd = &commands[k];
    if (cmd == NULL) {
        fprintf(stderr, "hilal: usage error: unknown command '%s'; see `hilal --help`\n", argv[i]);
        rc = HILAL_EXIT_USAGE;
        goto cleanup;
    }
    rc = cmd->fn(argc - i, argv + i, &cli);
cleanup:
    hilal_log_set_handler(NULL, NULL, HILAL_LOG_ERROR);
    hilal_config_free(cli.cfg);
    return rc;
}
