/* The hilal command-line program: shared pieces of the subcommands.
 *
 * main.c parses the global options, installs the log handler, builds the
 * configuration (defaults < user file < --config < --set) and dispatches to
 * a subcommand listed in the table in main.c. Each subcommand lives in
 * cli/cmd_<name>.c as `int hilal_cli_<name>(int argc, char **argv, hilal_cli *cli)`
 * where argv[0] is the subcommand name and the rest are its own arguments
 * (global options already removed). A subcommand returns one of the exit
 * codes below and never calls exit().
 */
#ifndef HILAL_CLI_H
#define HILAL_CLI_H

#include <stdio.h>

#include "hilal/hilal.h"

/* Exit codes (documented in README and `hilal --help`). */
enum hilal_exit {
    HILAL_EXIT_OK = 0,            /* everything done */
    HILAL_EXIT_USAGE = 2,         /* bad command line */
    HILAL_EXIT_CONFIG = 3,        /* bad configuration file or --set value */
    HILAL_EXIT_FRAMES_FAILED = 4, /* ran, but one or more frames failed */
    HILAL_EXIT_CANNOT_RUN = 5     /* could not run at all (input unreadable, archive unwritable, ...) */
};

typedef struct hilal_cli {
    hilal_config *cfg;   /* effective configuration (owned by main) */
    int verbosity;       /* -1 quiet, 0 normal, 1 -v, 2 -vv */
    int is_tty;          /* stderr is a terminal: progress displays allowed */
    const char *prog;    /* "hilal" */
} hilal_cli;

/* Prints "hilal: <status name>: <message>" to stderr. */
void hilal_cli_report(const hilal_error *err);

/* Maps a library status to an exit code (config errors -> HILAL_EXIT_CONFIG,
 * usage -> HILAL_EXIT_USAGE, anything else -> HILAL_EXIT_CANNOT_RUN). */
int hilal_cli_exit_code(hilal_status st);

/* Applies a subcommand-local "--set k=v" or "--config F" if argv[*i] is one
 * (advancing *i past its value). Returns 1 if consumed, 0 if not, -1 on
 * error (message printed, exit with HILAL_EXIT_CONFIG). Lets subcommands
 * accept these options after the command name too. */
int hilal_cli_config_option(hilal_cli *cli, int argc, char **argv, int *i);

/* A progress line on stderr when it is a terminal ("\r[ 12/100] 3.1 frames/s ETA 0:29");
 * plain log lines otherwise. done == total ends the line. */
void hilal_cli_progress(const hilal_cli *cli, const char *what, long done, long total,
                        double elapsed_s);

/* Subcommands. */
int hilal_cli_inspect(int argc, char **argv, hilal_cli *cli);
int hilal_cli_simulate(int argc, char **argv, hilal_cli *cli);
int hilal_cli_config(int argc, char **argv, hilal_cli *cli);
int hilal_cli_subtract(int argc, char **argv, hilal_cli *cli);
int hilal_cli_run(int argc, char **argv, hilal_cli *cli);
int hilal_cli_query(int argc, char **argv, hilal_cli *cli);
int hilal_cli_cutout(int argc, char **argv, hilal_cli *cli);
int hilal_cli_info(int argc, char **argv, hilal_cli *cli);

#endif
