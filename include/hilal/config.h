/* Configuration: parameter tables, the layered configuration store and the
 * configuration file format.
 *
 * Every tunable value in Hilal is a parameter declared in a table of
 * hilal_param, grouped into sections (one per stage plus "pipeline"). The
 * tables are the single source of truth: parsing, range checks, --help, the
 * printed effective configuration and the provenance in archives all come
 * from them. A key is written "section.key" (e.g. "detect.thresh_sigma").
 *
 * File format (INI-like, see configs/hilal.conf):
 *   # comment            ; comment
 *   [section]
 *   key = value          # trailing comment
 * Strings may be quoted with "..." (needed for values containing # or ;).
 *
 * Precedence, lowest to highest: built-in defaults < user config file
 * ($HILAL_CONFIG, else $XDG_CONFIG_HOME/hilal/hilal.conf, else
 * ~/.config/hilal/hilal.conf) < --config FILE (in order given) < --set.
 */
#ifndef HILAL_CONFIG_H
#define HILAL_CONFIG_H

#include <stddef.h>
#include <stdio.h>

#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum hilal_param_type {
    HILAL_PARAM_BOOL,   /* true/false, yes/no, on/off, 1/0 */
    HILAL_PARAM_INT,    /* integer within [min, max] */
    HILAL_PARAM_DOUBLE, /* real within [min, max] */
    HILAL_PARAM_STRING  /* free text; min/max unused */
} hilal_param_type;

typedef struct hilal_param {
    const char *key;        /* key within its section, [a-z0-9_]+ */
    hilal_param_type type;
    const char *def;        /* default value as text (parsed like a file value) */
    double min, max;        /* inclusive range for INT and DOUBLE */
    const char *unit;       /* "px", "sigma", "ADU", "" when dimensionless */
    const char *help;       /* one line */
    unsigned flags;         /* hilal_param_flag bits; 0 for ordinary parameters */
} hilal_param;

enum hilal_param_flag {
    /* An execution setting (threads, output path, ...) that cannot change
     * results: left out of hilal_config_hash(), so that a night resumed with
     * other settings of this kind is still "the same configuration". */
    HILAL_PARAM_EXECUTION = 1u << 0
};

typedef struct hilal_param_section {
    const char *name;           /* section name, e.g. "detect" */
    const char *help;           /* one line */
    const hilal_param *params;  /* table, nparams entries */
    size_t nparams;
} hilal_param_section;

typedef struct hilal_config hilal_config;

/* A configuration holding the defaults of all parameters in the given
 * sections (the tables are borrowed and must outlive the configuration).
 * Fails with HILAL_ERR_CONFIG if a default is invalid (a bug in a table). */
hilal_config *hilal_config_new(const hilal_param_section *sections, size_t nsections,
                               hilal_error *err);
void hilal_config_free(hilal_config *cfg);

/* Reads a configuration file. Unknown sections or keys and bad or
 * out-of-range values are errors naming the file and line and suggesting the
 * nearest known key. On error the configuration is unchanged. */
hilal_status hilal_config_load_file(hilal_config *cfg, const char *path, hilal_error *err);

/* Applies "section.key=value" (from --set). */
hilal_status hilal_config_set_arg(hilal_config *cfg, const char *assignment, hilal_error *err);

/* Sets one value; origin is recorded for printing ("--set", "file.conf:12", ...). */
hilal_status hilal_config_set(hilal_config *cfg, const char *key, const char *value,
                              const char *origin, hilal_error *err);

/* Typed getters for "section.key". The key must be declared (a bug
 * otherwise: getters then return false/0/NaN/""). */
int hilal_config_get_bool(const hilal_config *cfg, const char *key);
long hilal_config_get_int(const hilal_config *cfg, const char *key);
double hilal_config_get_double(const hilal_config *cfg, const char *key);
const char *hilal_config_get_string(const hilal_config *cfg, const char *key);

/* The current value of key as text, whatever its type; NULL if unknown. */
const char *hilal_config_value(const hilal_config *cfg, const char *key);

/* The origin of the current value of key ("default", "FILE:LINE", "--set"). */
const char *hilal_config_origin(const hilal_config *cfg, const char *key);

/* Looks up a declared parameter; NULL if unknown. */
const hilal_param *hilal_config_param(const hilal_config *cfg, const char *key);

/* The effective configuration as config-file text, every key with its value,
 * unit, range and help as comments; with with_origin, also where each value
 * came from. Returns a malloc'd string the caller frees, NULL on no memory. */
char *hilal_config_text(const hilal_config *cfg, int with_origin);

/* Hex SHA-256 of the canonical effective configuration (values only, no
 * comments, execution settings left out), used to recognise "the same
 * configuration" across runs. */
void hilal_config_hash(const hilal_config *cfg, char out_hex[65]);

/* The closest declared key to an unknown one (edit distance), or NULL. */
const char *hilal_config_suggest(const hilal_config *cfg, const char *unknown_key);

#ifdef __cplusplus
}
#endif
#endif
