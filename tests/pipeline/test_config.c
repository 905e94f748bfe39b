/* Configuration store: defaults, file parsing, precedence, error messages. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static const hilal_param detect_params[] = {
    {"thresh_sigma", HILAL_PARAM_DOUBLE, "5", 1, 100, "sigma", "detection threshold on S_corr"},
    {"max_candidates", HILAL_PARAM_INT, "10000", 1, 1000000, "", "cap per frame"},
    {"both_signs", HILAL_PARAM_BOOL, "true", 0, 1, "", "detect fading events too"},
};
static const hilal_param ingest_params[] = {
    {"key_gain", HILAL_PARAM_STRING, "GAIN", 0, 0, "", "header keyword of the gain"},
    {"gain", HILAL_PARAM_DOUBLE, "nan", 0.001, 1000, "e-/ADU", "gain when the header has none"},
};
static const hilal_param_section sections[] = {
    {"detect", "detection", detect_params, 3},
    {"ingest", "reading", ingest_params, 2},
};

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        perror(path);
        exit(2);
    }
    fputs(text, f);
    fclose(f);
}

int main(void)
{
    hilal_error err = {0};
    char dir[1024], path[1200], path2[1200];
    hilal_test_tmpdir("config", dir, sizeof dir);

    hilal_config *cfg = hilal_config_new(sections, 2, &err);
    CHECK(cfg != NULL, "config_new failed: %s", err.msg);
    CHECK(hilal_config_get_double(cfg, "detect.thresh_sigma") == 5.0, "default threshold");
    CHECK(hilal_config_get_int(cfg, "detect.max_candidates") == 10000, "default int");
    CHECK(hilal_config_get_bool(cfg, "detect.both_signs") == 1, "default bool");
    CHECK(isnan(hilal_config_get_double(cfg, "ingest.gain")), "nan default means unset");
    CHECK(strcmp(hilal_config_get_string(cfg, "ingest.key_gain"), "GAIN") == 0, "string default");
    CHECK(strcmp(hilal_config_origin(cfg, "detect.thresh_sigma"), "default") == 0, "origin default");

    /* A good file: sections, comments, quoted strings, dotted keys. */
    snprintf(path, sizeof path, "%s/good.conf", dir);
    write_file(path, "# comment\n[detect]\nthresh_sigma = 4.5   # lower\n\n[ingest]\n"
                     "key_gain = \"EGAIN#1\"\ningest.gain = 1.6 ; dotted key\n");
    hilal_status st = hilal_config_load_file(cfg, path, &err);
    CHECK_OK(st, &err);
    CHECK(hilal_config_get_double(cfg, "detect.thresh_sigma") == 4.5, "file value");
    CHECK(strcmp(hilal_config_get_string(cfg, "ingest.key_gain"), "EGAIN#1") == 0,
          "quoted string keeps '#': got '%s'", hilal_config_get_string(cfg, "ingest.key_gain"));
    CHECK(hilal_config_get_double(cfg, "ingest.gain") == 1.6, "dotted key in a section");
    char want_origin[1300];
    snprintf(want_origin, sizeof want_origin, "%s:3", path);
    CHECK(strcmp(hilal_config_origin(cfg, "detect.thresh_sigma"), want_origin) == 0,
          "origin is file:line, got %s", hilal_config_origin(cfg, "detect.thresh_sigma"));

    /* --set wins over the file. */
    st = hilal_config_set_arg(cfg, "detect.thresh_sigma=6", &err);
    CHECK_OK(st, &err);
    CHECK(hilal_config_get_double(cfg, "detect.thresh_sigma") == 6.0, "--set value");
    CHECK(strcmp(hilal_config_origin(cfg, "detect.thresh_sigma"), "--set") == 0, "origin --set");

    /* Unknown key: file and line, and the nearest key. Config unchanged. */
    char hash_before[65], hash_after[65];
    hilal_config_hash(cfg, hash_before);
    snprintf(path2, sizeof path2, "%s/typo.conf", dir);
    write_file(path2, "[detect]\nmax_candidates = 5\nthresh_sigm = 3\n");
    hilal_error_clear(&err);
    st = hilal_config_load_file(cfg, path2, &err);
    CHECK(st == HILAL_ERR_CONFIG, "unknown key rejected (status %d)", st);
    CHECK(strstr(err.msg, "typo.conf:3") != NULL, "message names file:line: %s", err.msg);
    CHECK(strstr(err.msg, "did you mean 'detect.thresh_sigma'") != NULL, "suggestion: %s", err.msg);
    CHECK(hilal_config_get_int(cfg, "detect.max_candidates") == 10000,
          "a bad file leaves the configuration unchanged");
    hilal_config_hash(cfg, hash_after);
    CHECK(strcmp(hash_before, hash_after) == 0, "hash unchanged after a rejected file");

    /* Out of range and bad type. */
    hilal_error_clear(&err);
    st = hilal_config_set_arg(cfg, "detect.thresh_sigma=0.5", &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "out of range [1, 100] sigma") != NULL,
          "range message: %s", err.msg);
    hilal_error_clear(&err);
    st = hilal_config_set_arg(cfg, "detect.max_candidates=12.5", &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "not an integer") != NULL, "int message: %s",
          err.msg);
    hilal_error_clear(&err);
    st = hilal_config_set_arg(cfg, "detect.both_signs=maybe", &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "not a boolean") != NULL, "bool: %s", err.msg);
    hilal_error_clear(&err);
    st = hilal_config_set_arg(cfg, "thresh_sigma", &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "no '='") != NULL, "no '=': %s", err.msg);
    hilal_error_clear(&err);
    st = hilal_config_set_arg(cfg, "gain=2", &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "ingest.gain") != NULL,
          "bare key suggests its section: %s", err.msg);

    /* Unknown section and malformed lines. */
    snprintf(path2, sizeof path2, "%s/section.conf", dir);
    write_file(path2, "[detekt]\nthresh_sigma = 3\n");
    hilal_error_clear(&err);
    st = hilal_config_load_file(cfg, path2, &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "section.conf:1: unknown section [detekt]; did you mean [detect]?") != NULL,
          "unknown section: %s", err.msg);
    write_file(path2, "[detect]\njust words\n");
    hilal_error_clear(&err);
    st = hilal_config_load_file(cfg, path2, &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "section.conf:2: expected 'key = value'") != NULL,
          "malformed line: %s", err.msg);
    hilal_error_clear(&err);
    st = hilal_config_load_file(cfg, "/nonexistent/dir/x.conf", &err);
    CHECK(st == HILAL_ERR_CONFIG && strstr(err.msg, "/nonexistent/dir/x.conf") != NULL,
          "missing file: %s", err.msg);

    /* The printed text is itself a configuration that reproduces the hash. */
    char *text = hilal_config_text(cfg, 1);
    CHECK(text != NULL && strstr(text, "thresh_sigma = 6    # from --set") != NULL,
          "text shows value and origin:\n%s", text ? text : "");
    CHECK(text != NULL && strstr(text, "range [1, 100], unit sigma, default 5") != NULL,
          "text documents range, unit, default");
    snprintf(path2, sizeof path2, "%s/roundtrip.conf", dir);
    write_file(path2, text ? text : "");
    free(text);
    hilal_config *cfg2 = hilal_config_new(sections, 2, &err);
    hilal_error_clear(&err);
    st = hilal_config_load_file(cfg2, path2, &err);
    CHECK_OK(st, &err);
    char h1[65], h2[65];
    hilal_config_hash(cfg, h1);
    hilal_config_hash(cfg2, h2);
    CHECK(strcmp(h1, h2) == 0 && strlen(h1) == 64, "round trip keeps the hash (%s vs %s)", h1, h2);
    hilal_config_set(cfg2, "detect.thresh_sigma", "7", "test", &err);
    hilal_config_hash(cfg2, h2);
    CHECK(strcmp(h1, h2) != 0, "a changed value changes the hash");
    hilal_config_free(cfg2);
    hilal_config_free(cfg);

    /* The whole registry's defaults are valid. */
    hilal_error_clear(&err);
    hilal_config *reg = hilal_registry_config_new(&err);
    CHECK(reg != NULL, "registry defaults valid: %s", err.msg);
    CHECK(reg && hilal_config_get_int(reg, "pipeline.edge_margin") == 8, "pipeline section present");
    /* Execution settings do not change the configuration hash; science settings do. */
    char r1[65], r2[65], r3[65];
    hilal_config_hash(reg, r1);
    hilal_config_set(reg, "pipeline.threads", "7", "test", &err);
    hilal_config_set(reg, "archive.path", "/elsewhere/night.h5", "test", &err);
    hilal_config_hash(reg, r2);
    hilal_config_set(reg, "pipeline.edge_margin", "9", "test", &err);
    hilal_config_hash(reg, r3);
    CHECK(strcmp(r1, r2) == 0, "threads and archive path are execution settings");
    CHECK(strcmp(r1, r3) != 0, "edge margin is part of the hash");
    hilal_config_free(reg);
    return hilal_test_finish();
}
