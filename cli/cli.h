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
#include "hilal/night.h"

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
int hilal_cli_alert(int argc, char **argv, hilal_cli *cli);
int hilal_cli_night(int argc, char **argv, hilal_cli *cli);
int hilal_cli_reprocess(int argc, char **argv, hilal_cli *cli);

/* The driver `hilal night` and `hilal reprocess` share (cli/cmd_night.c):
 * sets the execution settings (archive.path, pipeline.workers when
 * workers > 0, night.report when report is not NULL, pipeline.threads =
 * cores / workers when 0), joins MPI when started by mpirun (allow_mpi),
 * lists the tasks with make_tasks (on rank 0), loads the reference library
 * refdir (may be NULL), runs the night, writes the report and prints the
 * summary. Returns the exit code. */
typedef hilal_status (*hilal_cli_tasks_fn)(void *user, hilal_night_task **tasks, size_t *n,
                                           hilal_error *err);
int hilal_cli_night_execute(hilal_cli *cli, const char *cmd, hilal_cli_tasks_fn make_tasks,
                            void *user, const char *refdir, const char *archive, int workers,
                            int retry_failed, const char *report, int allow_mpi);

/* Parses --workers N (1..256); prints a usage error and returns -1 if bad. */
int hilal_cli_parse_workers(const char *cmd, const char *text, int *out);

/* The options `hilal night` and `hilal reprocess` share. Start from
 * {NULL, NULL, 0, 0, 1}. */
typedef struct hilal_cli_night_opts {
    const char *refs;    /* --references DIR */
    const char *report;  /* --report FILE */
    int workers;         /* --workers N; 0: not given */
    int retry;           /* --retry-failed */
    int allow_mpi;       /* 0 after --no-mpi */
} hilal_cli_night_opts;

/* Takes argv[*i] into *o when it is one of those options (a valued one only
 * when its value follows, advancing *i past it). Returns 1 if taken, 0 if
 * not, -1 on a bad value (usage error printed: exit with
 * HILAL_EXIT_USAGE). cmd names the subcommand in messages. */
int hilal_cli_night_option(const char *cmd, int argc, char **argv, int *i,
                           hilal_cli_night_opts *o);

/* One frame's inputs as `hilal run` and `hilal subtract` take them
 * (cli/frame_opts.c). Start from {0}. */
typedef struct hilal_cli_frame_opts {
    const char *sci, *ref;  /* science and reference paths (CFITSIO syntax allowed) */
    const char *frame_id;   /* --frame-id; NULL: the science file's name */
    int sci_hdu, ref_hdu;   /* --sci-hdu, --ref-hdu; 0: first image HDU with data */
} hilal_cli_frame_opts;

/* Takes --frame-id ID, --sci-hdu N or --ref-hdu N at argv[*i] into o. The
 * caller has checked that a value follows; *i is advanced past it. Returns
 * 1 if consumed, 0 if argv[*i] is none of these, -1 on a bad HDU number
 * (usage error printed: exit with HILAL_EXIT_USAGE). cmd names the
 * subcommand in messages. */
int hilal_cli_frame_option(const char *cmd, char **argv, int *i, hilal_cli_frame_opts *o);

/* Initialises *frame from o (paths, HDUs, frame_id, by default the science
 * file's name without directories, cut to what the frame holds) and makes
 * the runner of the given stages (NULL, 0: the whole chain of the
 * configuration). Returns HILAL_EXIT_OK; otherwise the exit code, with the
 * error printed (a path longer than the frame holds: HILAL_EXIT_USAGE), and
 * *runner NULL. Either way the caller ends with hilal_frame_clear(frame)
 * and hilal_runner_free(*runner). */
int hilal_cli_frame_start(hilal_cli *cli, const char *cmd, const hilal_stage *const *stages,
                          size_t nstages, const hilal_cli_frame_opts *o, hilal_runner **runner,
                          hilal_frame *frame);

#endif
