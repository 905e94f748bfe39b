/* The layered configuration store and the configuration file parser. */
#include "hilal/config.h"

#include <ctype.h>
#include <stdarg.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hilal/checksum.h"

typedef struct entry {
    const hilal_param_section *section;
    const hilal_param *param;
    char key[128];      /* "section.key" */
    char *value;        /* owned text */
    char origin[1100];  /* "default", "FILE:LINE", "--set" */
    double num;         /* parsed numeric value (INT, DOUBLE, BOOL) */
} entry;

struct hilal_config {
    entry *entries;
    size_t n;
};

static entry *find(const hilal_config *cfg, const char *key)
{
    for (size_t i = 0; i < cfg->n; i++)
        if (strcmp(cfg->entries[i].key, key) == 0)
            return &cfg->entries[i];
    return NULL;
}

static const char *type_name(hilal_param_type t)
{
    switch (t) {
    case HILAL_PARAM_BOOL: return "bool";
    case HILAL_PARAM_INT: return "int";
    case HILAL_PARAM_DOUBLE: return "real";
    case HILAL_PARAM_STRING: return "string";
    }
    return "?";
}

/* Parses text as the parameter's type and checks its range. On success
 * *num holds the numeric value (0/1 for bools). "nan" is accepted for reals
 * whose default is nan (meaning "not set"). */
static hilal_status parse_value(const hilal_param *p, const char *key, const char *text,
                                double *num, hilal_error *err)
{
    char *end = NULL;
    *num = 0;
    switch (p->type) {
    case HILAL_PARAM_STRING:
        return HILAL_OK;
    case HILAL_PARAM_BOOL:
        if (!strcasecmp(text, "true") || !strcasecmp(text, "yes") || !strcasecmp(text, "on") ||
            !strcmp(text, "1")) {
            *num = 1;
            return HILAL_OK;
        }
        if (!strcasecmp(text, "false") || !strcasecmp(text, "no") || !strcasecmp(text, "off") ||
            !strcmp(text, "0"))
            return HILAL_OK;
        return hilal_error_set(err, HILAL_ERR_CONFIG,
                               "%s = '%s' is not a boolean; use true or false", key, text);
    case HILAL_PARAM_INT: {
        errno = 0;
        long v = strtol(text, &end, 10);
        if (errno != 0 || end == text || *end != '\0')
            return hilal_error_set(err, HILAL_ERR_CONFIG,
                                   "%s = '%s' is not an integer; give a whole number in [%g, %g]",
                                   key, text, p->min, p->max);
        *num = (double)v;
        break;
    }
    case HILAL_PARAM_DOUBLE: {
        errno = 0;
        double v = strtod(text, &end);
        if (errno != 0 || end == text || *end != '\0')
            return hilal_error_set(err, HILAL_ERR_CONFIG,
                                   "%s = '%s' is not a number; give a value in [%g, %g]%s%s", key,
                                   text, p->min, p->max, p->unit[0] ? " " : "", p->unit);
        if (isnan(v) && p->def != NULL && strcasecmp(p->def, "nan") == 0) {
            *num = v;
            return HILAL_OK; /* "not set" */
        }
        *num = v;
        break;
    }
    }
    if (!(*num >= p->min && *num <= p->max))
        return hilal_error_set(err, HILAL_ERR_CONFIG, "%s = %s is out of range [%g, %g]%s%s", key,
                               text, p->min, p->max, p->unit[0] ? " " : "", p->unit);
    return HILAL_OK;
}

static hilal_status assign(entry *e, const char *value, const char *origin, hilal_error *err)
{
    double num;
    hilal_status st = parse_value(e->param, e->key, value, &num, err);
    if (st != HILAL_OK)
        return st;
    size_t len = strlen(value);
    char *copy = malloc(len + 1);
    if (copy == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for %s", e->key);
    memcpy(copy, value, len + 1);
    free(e->value);
    e->value = copy;
    e->num = num;
    snprintf(e->origin, sizeof e->origin, "%s", origin);
    return HILAL_OK;
}

hilal_config *hilal_config_new(const hilal_param_section *sections, size_t nsections,
                               hilal_error *err)
{
    size_t total = 0;
    for (size_t s = 0; s < nsections; s++)
        total += sections[s].nparams;
    hilal_config *cfg = calloc(1, sizeof *cfg);
    if (cfg == NULL || (total > 0 && (cfg->entries = calloc(total, sizeof *cfg->entries)) == NULL)) {
        free(cfg);
        hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory for the configuration");
        return NULL;
    }
    for (size_t s = 0; s < nsections; s++) {
        for (size_t k = 0; k < sections[s].nparams; k++) {
            entry *e = &cfg->entries[cfg->n++];
            e->section = &sections[s];
            e->param = &sections[s].params[k];
            snprintf(e->key, sizeof e->key, "%s.%s", sections[s].name, e->param->key);
            if (find(cfg, e->key) != e) {
                hilal_error_set(err, HILAL_ERR_INTERNAL, "parameter %s is declared twice", e->key);
                hilal_config_free(cfg);
                return NULL;
            }
            if (assign(e, e->param->def, "default", err) != HILAL_OK) {
                hilal_error_context(err, "default of %s", e->key);
                hilal_config_free(cfg);
                return NULL;
            }
        }
    }
    return cfg;
}

void hilal_config_free(hilal_config *cfg)
{
    if (cfg == NULL)
        return;
    for (size_t i = 0; i < cfg->n; i++)
        free(cfg->entries[i].value);
    free(cfg->entries);
    free(cfg);
}

/* Levenshtein distance, for "did you mean" suggestions. */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 127 || lb > 127)
        return (size_t)-1;
    size_t prev[128], cur[128];
    for (size_t j = 0; j <= lb; j++)
        prev[j] = j;
    for (size_t i = 1; i <= la; i++) {
        cur[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t sub = prev[j - 1] + (a[i - 1] != b[j - 1]);
            size_t del = prev[j] + 1, ins = cur[j - 1] + 1;
            cur[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
        }
        memcpy(prev, cur, (lb + 1) * sizeof *prev);
    }
    return prev[lb];
}

const char *hilal_config_suggest(const hilal_config *cfg, const char *unknown_key)
{
    const char *best = NULL;
    size_t best_d = (size_t)-1;
    const char *dot = strchr(unknown_key, '.');
    for (size_t i = 0; i < cfg->n; i++) {
        size_t d = edit_distance(unknown_key, cfg->entries[i].key);
        /* A bare key that matches a key in some section exactly is a strong hint. */
        if (dot == NULL && strcmp(unknown_key, cfg->entries[i].param->key) == 0)
            d = 1;
        if (d < best_d) {
            best_d = d;
            best = cfg->entries[i].key;
        }
    }
    size_t len = strlen(unknown_key);
    return best_d <= (len / 2 > 3 ? len / 2 : 3) ? best : NULL;
}

static hilal_status unknown_key(const hilal_config *cfg, const char *key, hilal_error *err)
{
    const char *near = hilal_config_suggest(cfg, key);
    if (near != NULL)
        return hilal_error_set(err, HILAL_ERR_CONFIG,
                               "unknown key '%s'; did you mean '%s'? (`hilal config` lists all keys)",
                               key, near);
    return hilal_error_set(err, HILAL_ERR_CONFIG,
                           "unknown key '%s'; `hilal config` lists all keys", key);
}

hilal_status hilal_config_set(hilal_config *cfg, const char *key, const char *value,
                              const char *origin, hilal_error *err)
{
    entry *e = find(cfg, key);
    if (e == NULL)
        return unknown_key(cfg, key, err);
    return assign(e, value, origin, err);
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = '\0';
    return s;
}

hilal_status hilal_config_set_arg(hilal_config *cfg, const char *assignment, hilal_error *err)
{
    char buf[2048];
    if (strlen(assignment) >= sizeof buf)
        return hilal_error_set(err, HILAL_ERR_CONFIG, "--set argument is too long");
    snprintf(buf, sizeof buf, "%s", assignment);
    char *eq = strchr(buf, '=');
    if (eq == NULL)
        return hilal_error_set(err, HILAL_ERR_CONFIG,
                               "--set '%s' has no '='; write --set section.key=value", assignment);
    *eq = '\0';
    hilal_status st = hilal_config_set(cfg, trim(buf), trim(eq + 1), "--set", err);
    if (st != HILAL_OK)
        hilal_error_context(err, "--set %s", assignment);
    return st;
}

/* Splits a value from its trailing comment, honouring "quoted strings". */
static hilal_status split_value(char *text, char **value, hilal_error *err)
{
    text = trim(text);
    if (*text == '"') {
        char *close = strchr(text + 1, '"');
        if (close == NULL)
            return hilal_error_set(err, HILAL_ERR_CONFIG, "unterminated quoted string");
        *close = '\0';
        char *rest = trim(close + 1);
        if (*rest != '\0' && *rest != '#' && *rest != ';')
            return hilal_error_set(err, HILAL_ERR_CONFIG, "text after the closing quote: '%s'", rest);
        *value = text + 1;
        return HILAL_OK;
    }
    for (char *c = text; *c; c++)
        if (*c == '#' || *c == ';') {
            *c = '\0';
            break;
        }
    *value = trim(text);
    return HILAL_OK;
}

hilal_status hilal_config_load_file(hilal_config *cfg, const char *path, hilal_error *err)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return hilal_error_set(err, HILAL_ERR_CONFIG, "cannot open configuration file %s: %s", path,
                               strerror(errno));
    /* Parse into a scratch copy so that a bad file leaves cfg unchanged. */
    hilal_config scratch = {NULL, cfg->n};
    hilal_status st = HILAL_OK;
    scratch.entries = calloc(cfg->n ? cfg->n : 1, sizeof *scratch.entries);
    if (scratch.entries == NULL) {
        st = hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory reading %s", path);
        goto cleanup;
    }
    for (size_t i = 0; i < cfg->n; i++) {
        scratch.entries[i] = cfg->entries[i];
        scratch.entries[i].value = NULL;
        if (assign(&scratch.entries[i], cfg->entries[i].value, cfg->entries[i].origin, err) != HILAL_OK) {
            st = err ? err->code : HILAL_ERR_NOMEM;
            goto cleanup;
        }
    }
    char line[4096], section[128] = "";
    int lineno = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        lineno++;
        char *s = trim(line);
        if (*s == '\0' || *s == '#' || *s == ';')
            continue;
        if (*s == '[') {
            char *close = strchr(s, ']');
            if (close == NULL) {
                st = hilal_error_set(err, HILAL_ERR_CONFIG, "%s:%d: section header '%s' has no ']'",
                                     path, lineno, s);
                goto cleanup;
            }
            *close = '\0';
            snprintf(section, sizeof section, "%s", trim(s + 1));
            int known = 0;
            for (size_t i = 0; i < cfg->n && !known; i++)
                known = strcmp(cfg->entries[i].section->name, section) == 0;
            if (!known) {
                const char *near = NULL;
                size_t best = (size_t)-1;
                for (size_t i = 0; i < cfg->n; i++) {
                    size_t d = edit_distance(section, cfg->entries[i].section->name);
                    if (d < best) {
                        best = d;
                        near = cfg->entries[i].section->name;
                    }
                }
                st = hilal_error_set(err, HILAL_ERR_CONFIG, "%s:%d: unknown section [%s]%s%s%s",
                                     path, lineno, section, near && best <= 3 ? "; did you mean [" : "",
                                     near && best <= 3 ? near : "", near && best <= 3 ? "]?" : "");
                goto cleanup;
            }
            continue;
        }
        char *eq = strchr(s, '=');
        if (eq == NULL) {
            st = hilal_error_set(err, HILAL_ERR_CONFIG,
                                 "%s:%d: expected 'key = value' or '[section]', found '%s'", path,
                                 lineno, s);
            goto cleanup;
        }
        *eq = '\0';
        char *key = trim(s), *value = NULL;
        if (split_value(eq + 1, &value, err) != HILAL_OK) {
            hilal_error_context(err, "%s:%d", path, lineno);
            st = HILAL_ERR_CONFIG;
            goto cleanup;
        }
        char full[300];
        if (strchr(key, '.') != NULL || section[0] == '\0')
            snprintf(full, sizeof full, "%s", key);
        else
            snprintf(full, sizeof full, "%s.%s", section, key);
        char origin[1100];
        snprintf(origin, sizeof origin, "%s:%d", path, lineno);
        if (hilal_config_set(&scratch, full, value, origin, err) != HILAL_OK) {
            hilal_error_context(err, "%s:%d", path, lineno);
            st = HILAL_ERR_CONFIG;
            goto cleanup;
        }
    }
    if (ferror(f)) {
        st = hilal_error_set(err, HILAL_ERR_IO, "error reading configuration file %s", path);
        goto cleanup;
    }
    /* Commit: swap the parsed values into cfg. */
    for (size_t i = 0; i < cfg->n; i++) {
        entry tmp = cfg->entries[i];
        cfg->entries[i] = scratch.entries[i];
        scratch.entries[i] = tmp;
    }
cleanup:
    if (scratch.entries != NULL)
        for (size_t i = 0; i < cfg->n; i++)
            free(scratch.entries[i].value);
    free(scratch.entries);
    fclose(f);
    return st;
}

static const entry *get(const hilal_config *cfg, const char *key, hilal_param_type type)
{
    const entry *e = find(cfg, key);
    return e != NULL && e->param->type == type ? e : NULL;
}

int hilal_config_get_bool(const hilal_config *cfg, const char *key)
{
    const entry *e = get(cfg, key, HILAL_PARAM_BOOL);
    return e ? e->num != 0 : 0;
}

long hilal_config_get_int(const hilal_config *cfg, const char *key)
{
    const entry *e = get(cfg, key, HILAL_PARAM_INT);
    return e ? (long)e->num : 0;
}

double hilal_config_get_double(const hilal_config *cfg, const char *key)
{
    const entry *e = get(cfg, key, HILAL_PARAM_DOUBLE);
    return e ? e->num : NAN;
}

const char *hilal_config_get_string(const hilal_config *cfg, const char *key)
{
    const entry *e = get(cfg, key, HILAL_PARAM_STRING);
    return e ? e->value : "";
}

const char *hilal_config_value(const hilal_config *cfg, const char *key)
{
    const entry *e = find(cfg, key);
    return e ? e->value : NULL;
}

const char *hilal_config_origin(const hilal_config *cfg, const char *key)
{
    const entry *e = find(cfg, key);
    return e ? e->origin : "";
}

const hilal_param *hilal_config_param(const hilal_config *cfg, const char *key)
{
    const entry *e = find(cfg, key);
    return e ? e->param : NULL;
}

/* A growable string buffer for the text output. */
typedef struct strbuf {
    char *s;
    size_t len, cap;
    int failed;
} strbuf;

static void sb_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(strbuf *b, const char *fmt, ...)
{
    if (b->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = 1;
            return;
        }
        if (b->s != NULL && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = (b->cap ? b->cap * 2 : 4096) + (size_t)n;
        char *ns = realloc(b->s, cap);
        if (ns == NULL) {
            b->failed = 1;
            return;
        }
        b->s = ns;
        b->cap = cap;
    }
}

static int needs_quotes(const char *v)
{
    return *v == '\0' || strpbrk(v, "#;\"") != NULL || isspace((unsigned char)v[0]) ||
           isspace((unsigned char)v[strlen(v) - 1]);
}

char *hilal_config_text(const hilal_config *cfg, int with_origin)
{
    strbuf b = {0};
    const hilal_param_section *cur = NULL;
    for (size_t i = 0; i < cfg->n; i++) {
        const entry *e = &cfg->entries[i];
        const hilal_param *p = e->param;
        if (e->section != cur) {
            cur = e->section;
            sb_printf(&b, "%s[%s]\n# %s\n", i ? "\n" : "", cur->name, cur->help ? cur->help : "");
        }
        if (with_origin >= 0) {
            sb_printf(&b, "# %s (%s", p->help, type_name(p->type));
            if (p->type == HILAL_PARAM_INT || p->type == HILAL_PARAM_DOUBLE)
                sb_printf(&b, ", range [%g, %g]", p->min, p->max);
            if (p->unit && p->unit[0])
                sb_printf(&b, ", unit %s", p->unit);
            sb_printf(&b, ", default %s%s)\n", p->def,
                      p->flags & HILAL_PARAM_EXECUTION ? "; execution setting, not in the configuration hash" : "");
        }
        const char *q = p->type == HILAL_PARAM_STRING && needs_quotes(e->value) ? "\"" : "";
        sb_printf(&b, "%s = %s%s%s", p->key, q, e->value, q);
        if (with_origin > 0)
            sb_printf(&b, "    # from %s", e->origin);
        sb_printf(&b, "\n");
    }
    if (b.failed) {
        free(b.s);
        return NULL;
    }
    if (b.s == NULL)
        b.s = calloc(1, 1);
    return b.s;
}

void hilal_config_hash(const hilal_config *cfg, char out_hex[65])
{
    /* Canonical form: "section.key=value\n" for every key, in table order. */
    strbuf b = {0};
    for (size_t i = 0; i < cfg->n; i++)
        if (!(cfg->entries[i].param->flags & HILAL_PARAM_EXECUTION))
            sb_printf(&b, "%s=%s\n", cfg->entries[i].key, cfg->entries[i].value);
    if (b.failed || b.s == NULL) {
        out_hex[0] = '\0';
        free(b.s);
        return;
    }
    hilal_sha256_hex(b.s, b.len, out_hex);
    free(b.s);
}
