/* The alert stage after the archive stage on four frames of one field:
 * association of the same source across frames into one object (and of
 * others into their own), the selection rules (cuts, first detection, no
 * repeat within the interval unless it brightened, a sign change), the
 * deterministic alert ids, the directory and command sinks, and a replay
 * with `hilal alert ARCHIVE` giving the same alerts and VOEvents. Prints the
 * latency from the end of a frame to its alerts being on disk, and the
 * packet sizes. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../pipeline/test_archive_frames.h"
#include "hilal/alert.h"
#include "hilal/stage.h"
#include "testutil.h"

extern const hilal_stage hilal_stage_archive;
extern const hilal_stage hilal_stage_alert;

#define NX 200
#define NY 160

typedef struct spec {
    double x, y, snr, rb, mag;
    uint32_t flags;
} spec;

static int make(hilal_frame *f, unsigned seed, double mjd, const spec *s, size_t n)
{
    char name[32];
    snprintf(name, sizeof name, "epoch%u", seed);
    if (tf_make(f, name, seed, NX, NY, n) != 0)
        return -1;
    f->sci->meta.mjd = mjd;
    for (size_t i = 0; i < n; i++) {
        hilal_candidate *c = &f->cands[i];
        c->x = s[i].x;
        c->y = s[i].y;
        c->ra = 150.0 + s[i].x * 1e-4; /* 0.36 arcsec per pixel */
        c->dec = 2.0 + s[i].y * 1e-4;
        c->snr = s[i].snr;
        c->rb = s[i].rb;
        c->mag = s[i].mag;
        c->flux = (s[i].snr > 0 ? 1 : -1) * pow(10, -0.4 * (s[i].mag - 25.0));
        c->flux_err = fabs(c->flux / s[i].snr);
        c->flags = s[i].flags;
        c->mjd = mjd;
    }
    return 0;
}

static int file_exists(const char *dir, int64_t id, const char *ext)
{
    char p[4400];
    struct stat sb;
    snprintf(p, sizeof p, "%s/%lld.%s", dir, (long long)id, ext);
    return stat(p, &sb) == 0 && sb.st_size > 0;
}

static size_t count_ext(const char *dir, const char *ext)
{
    size_t n = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name), le = strlen(ext);
        n += l > le && strcmp(e->d_name + l - le, ext) == 0;
    }
    if (d)
        closedir(d);
    return n;
}

static char *slurp(const char *path, size_t *n)
{
    FILE *fp = fopen(path, "rb");
    if (fp == NULL)
        return NULL;
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *b = malloc((size_t)sz + 1);
    *n = fread(b, 1, (size_t)sz, fp);
    b[*n] = '\0';
    fclose(fp);
    return b;
}

int main(void)
{
    hilal_error err = {0};
    char dir[4096], archive[4200], alerts[4200], cmddir[4200], replay[4200], cmd[9000];
    hilal_test_tmpdir("alert", dir, sizeof dir);
    snprintf(archive, sizeof archive, "%s/night.h5", dir);
    snprintf(alerts, sizeof alerts, "%s/alerts", dir);
    snprintf(cmddir, sizeof cmddir, "%s/cmd", dir);
    snprintf(replay, sizeof replay, "%s/replay", dir);
    mkdir(cmddir, 0755);

    hilal_config *cfg = hilal_registry_config_new(&err);
    CHECK(cfg != NULL, "config");
    snprintf(cmd, sizeof cmd, "cat > '%s'/$HILAL_ALERT_ID.avro && test -s \"$HILAL_VOEVENT\"", cmddir);
    CHECK_OK(hilal_config_set(cfg, "archive.path", archive, "test", &err), &err);
    CHECK_OK(hilal_config_set(cfg, "alert.dir", alerts, "test", &err), &err);
    CHECK_OK(hilal_config_set(cfg, "alert.command", cmd, "test", &err), &err);

    void *sa = NULL, *sl = NULL;
    CHECK_OK(hilal_stage_archive.init(cfg, &sa, &err), &err);
    CHECK_OK(hilal_stage_alert.init(cfg, &sl, &err), &err);

    /* Source A at (100, 80) in every frame (moved by <= 0.1 px); B fails
     * rb; C is near saturation; D appears in frame 2. */
    spec f1[] = {{100.0, 80.0, 12, 0.9, 19.0, 0}, {150, 100, 6, 0.2, 20.0, 0},
                 {50, 50, 8, 0.8, 19.5, HILAL_CAND_NEAR_SAT}};
    spec f2[] = {{100.1, 80.0, 11, 0.9, 18.9, 0}, {120, 120, 7, 0.7, 20.2, 0}};
    spec f3[] = {{99.95, 80.05, 20, 0.95, 18.2, 0}};
    spec f4[] = {{100.02, 79.98, -9, 0.85, 19.6, 0}};
    const spec *specs[] = {f1, f2, f3, f4};
    size_t ns[] = {3, 2, 1, 1};
    double mjds[] = {60000.0, 60000.1, 60000.2, 61000.0};
    int64_t expect_ids[4];
    int64_t frame_ids[4];
    double lat_max = 0, lat_sum = 0;
    for (int k = 0; k < 4; k++) {
        hilal_frame f;
        CHECK(make(&f, (unsigned)k + 1, mjds[k], specs[k], ns[k]) == 0, "frame %d", k + 1);
        CHECK_OK(hilal_stage_archive.run(sa, &f, &err), &err);
        double t0 = hilal_alert_now_s();
        CHECK_OK(hilal_stage_alert.run(sl, &f, &err), &err);
        double lat = hilal_alert_now_s() - t0;
        lat_sum += lat;
        lat_max = fmax(lat_max, lat);
        char sha[65];
        tf_sha((unsigned)k + 1, sha);
        frame_ids[k] = hilal_archive_frame_id(sha, 1, NULL);
        /* Frame 1: A; 2: D (index 1); 3: A brightened; 4: A fading. */
        int idx = k == 1 ? 1 : 0;
        expect_ids[k] = hilal_alert_id(frame_ids[k], idx, specs[k][idx].x, specs[k][idx].y);
        hilal_frame_clear(&f);
    }
    printf("end of frame -> alerts written (Avro + VOEvent + command): mean %.1f ms, max %.1f ms "
           "per frame\n", 1e3 * lat_sum / 4, 1e3 * lat_max);

    CHECK(count_ext(alerts, ".avro") == 4, "4 alerts in the directory (%zu)", count_ext(alerts, ".avro"));
    CHECK(count_ext(alerts, ".xml") == 4, "4 VOEvents");
    CHECK(count_ext(cmddir, ".avro") == 4, "the command ran for 4 alerts (%zu)", count_ext(cmddir, ".avro"));
    for (int k = 0; k < 4; k++) {
        CHECK(file_exists(alerts, expect_ids[k], "avro") && file_exists(alerts, expect_ids[k], "xml"),
              "alert %lld of frame %d", (long long)expect_ids[k], k + 1);
        char p1[4400], p2[4400];
        size_t n1 = 0, n2 = 0;
        snprintf(p1, sizeof p1, "%s/%lld.avro", alerts, (long long)expect_ids[k]);
        snprintf(p2, sizeof p2, "%s/%lld.avro", cmddir, (long long)expect_ids[k]);
        char *b1 = slurp(p1, &n1), *b2 = slurp(p2, &n2);
        CHECK(b1 && b2 && n1 == n2 && memcmp(b1, b2, n1) == 0, "command got the packet on stdin");
        if (k == 2)
            printf("Avro packet with 2 previous detections and 3 cutouts: %zu bytes\n", n1);
        free(b1);
        free(b2);
    }

    /* Objects: A is one object with four detections; B, C, D their own. */
    hilal_archive *ar = hilal_archive_writer_lookup(archive);
    CHECK(ar != NULL, "the writer is found by path");
    hilal_archive_object *objs = NULL;
    size_t nobj = 0;
    if (ar != NULL)
        CHECK_OK(hilal_archive_read_objects(ar, &objs, &nobj, &err), &err);
    CHECK(nobj == 4, "4 objects (%zu)", nobj);
    if (nobj >= 1) {
        CHECK(objs[0].ndet == 4 && objs[0].npos == 3 && objs[0].nneg == 1, "A: 4 detections, 3 up, 1 down (%d)",
              objs[0].ndet);
        CHECK(objs[0].first_mjd == 60000.0 && objs[0].last_mjd == 61000.0, "A: first and last MJD");
        /* Mean of x = 100, 100.1, 99.95, 100.02 weighted equally (same
         * default position error) = 100.0175 -> RA 150.01000175. */
        CHECK(fabs(objs[0].ra - 150.01000175) * 3600 < 1e-3, "A: mean RA %.8f", objs[0].ra);
        CHECK(fabs(objs[0].pos_err_arcsec - 0.15) < 1e-6, "A: error of the mean 0.3/sqrt(4) (%g)",
              objs[0].pos_err_arcsec);
        hilal_archive_cand *hist = NULL;
        size_t nh = 0;
        CHECK_OK(hilal_archive_object_history(ar, 1, 0, &hist, &nh, &err), &err);
        CHECK(nh == 4 && hist[0].mjd == 60000.0 && hist[3].mjd == 61000.0 && hist[1].prev_cand_id == hist[0].cand_id,
              "A's history: 4 detections, oldest first, chained");
        free(hist);
    }
    free(objs);

    hilal_stage_alert.fini(sl);
    hilal_stage_archive.fini(sa);

    /* Replay from the closed archive with the CLI: the same alert ids and
     * the same VOEvents. */
    char *out = NULL;
    snprintf(cmd, sizeof cmd, "'%s' alert '%s' --dir '%s' 2>&1", hilal_test_exe(), archive, replay);
    int rc = hilal_test_run(cmd, &out);
    CHECK(rc == 0 && out && strstr(out, "4 alerts from 7 candidates of 4 frames"), "replay: %s", out ? out : "");
    free(out);
    for (int k = 0; k < 4; k++) {
        char p1[4400], p2[4400];
        size_t n1 = 0, n2 = 0;
        snprintf(p1, sizeof p1, "%s/%lld.xml", alerts, (long long)expect_ids[k]);
        snprintf(p2, sizeof p2, "%s/%lld.xml", replay, (long long)expect_ids[k]);
        char *b1 = slurp(p1, &n1), *b2 = slurp(p2, &n2);
        CHECK(b1 && b2 && n1 == n2 && memcmp(b1, b2, n1) == 0, "replayed VOEvent %d identical", k + 1);
        if (k == 2 && b1 != NULL) {
            CHECK(strstr(b1, "brightened by 0.80 mag") != NULL, "frame 3 alert says why: brightened");
            printf("VOEvent packet: %zu bytes\n", n1);
        }
        if (k == 3 && b1 != NULL)
            CHECK(strstr(b1, "fading since the last alert") != NULL, "frame 4 alert: sign change");
        free(b1);
        free(b2);
    }
    CHECK(count_ext(replay, ".avro") == 4, "replay wrote 4 packets");

    /* Rules change what is alerted: at least 2 detections, no first-detection alert. */
    snprintf(cmd, sizeof cmd, "'%s' alert '%s' --dir '%s/r2' --set alert.min_detections=2 "
             "--set alert.alert_first=false --set alert.repeat_interval_days=0 2>&1",
             hilal_test_exe(), archive, dir);
    rc = hilal_test_run(cmd, &out);
    /* A: detections 2, 3, 4 (no repeat suppression); D: a single detection. */
    CHECK(rc == 0 && out && strstr(out, "3 alerts from"), "min_detections=2: %s", out ? out : "");
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' alert '%s' 2>&1", hilal_test_exe(), archive);
    rc = hilal_test_run(cmd, &out);
    CHECK(rc == 2 && out && strstr(out, "no sink"), "no sink is a usage error: %s", out ? out : "");
    free(out);

    /* A failing command is reported. */
    hilal_config_set(cfg, "alert.command", "exit 3", "test", &err);
    hilal_config_set(cfg, "alert.dir", "", "test", &err);
    hilal_alert_ctx *ctx = NULL;
    hilal_archive *rd = NULL;
    CHECK_OK(hilal_archive_open_read(archive, &rd, &err), &err);
    CHECK_OK(hilal_alert_ctx_new(cfg, &ctx, &err), &err);
    hilal_error e2 = {0};
    if (ctx && rd)
        CHECK(hilal_alert_ctx_process(ctx, rd, 1, 3, 0, NULL, &e2) == HILAL_ERR_ALERT &&
                  strstr(e2.msg, "exit status 3"), "failing command: %s", e2.msg);
    hilal_alert_ctx_free(ctx);
    hilal_archive_close(rd, NULL);
    hilal_config_free(cfg);
    return hilal_test_finish();
}
