/* hilal alert: replays (or re-sends) the alerts of an archive: the alert
 * rules run again over every current frame in commit order and the
 * selected alerts go to the configured sinks. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "hilal/alert.h"

static void help(void)
{
    printf("Usage: hilal alert ARCHIVE.h5 [--dir DIR] [--command CMD] [--kafka BROKERS TOPIC]\n"
           "                  [--frame NAME] [--config FILE] [--set alert.KEY=VALUE]...\n"
           "\n"
           "Runs the alert rules over the candidates of an archive, frame by frame in the\n"
           "order they were committed, and delivers the selected alerts again: the same\n"
           "alert ids, objects, histories and cutouts as when the frames were processed\n"
           "(with the same [alert] rules). Consumers drop alert ids they already have.\n"
           "\n"
           "  --dir DIR          write DIR/<alert_id>.avro and .xml (sets alert.dir)\n"
           "  --command CMD      run CMD per alert with the Avro packet on stdin (alert.command)\n"
           "  --kafka B T        produce to Kafka brokers B, topic T (alert.kafka_brokers/_topic);\n"
           "                     undelivered alerts wait in alert.kafka_spool\n"
           "                     (default ARCHIVE.kafka-spool) for the next run\n"
           "  --frame NAME       only this frame (its name in the archive)\n"
           "\n"
           "Rules and sinks: `hilal config` lists the [alert] keys; docs/alerts.md explains them.\n"
           "Exit codes: 0 done, 2 usage, 3 configuration, 5 could not run or deliver.\n");
}

static int set(hilal_cli *cli, const char *key, const char *value)
{
    hilal_error err = {0};
    if (hilal_config_set(cli->cfg, key, value, "command line", &err) != HILAL_OK) {
        hilal_cli_report(&err);
        return -1;
    }
    return 0;
}

int hilal_cli_alert(int argc, char **argv, hilal_cli *cli)
{
    const char *path = NULL, *frame = NULL;
    for (int i = 1; i < argc; i++) {
        int used = hilal_cli_config_option(cli, argc, argv, &i);
        if (used < 0)
            return HILAL_EXIT_CONFIG;
        if (used > 0)
            continue;
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            help();
            return HILAL_EXIT_OK;
        }
        if (a[0] != '-') {
            if (path != NULL) {
                fprintf(stderr, "hilal alert: usage error: one archive only; see `hilal alert --help`\n");
                return HILAL_EXIT_USAGE;
            }
            path = a;
            continue;
        }
        int need = !strcmp(a, "--kafka") ? 2 : 1;
        if (i + need >= argc) {
            fprintf(stderr, "hilal alert: usage error: '%s' is unknown or needs a value; see `hilal alert --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
        int rc = 0;
        if (!strcmp(a, "--dir"))
            rc = set(cli, "alert.dir", argv[++i]);
        else if (!strcmp(a, "--command"))
            rc = set(cli, "alert.command", argv[++i]);
        else if (!strcmp(a, "--kafka")) {
            rc = set(cli, "alert.kafka_brokers", argv[i + 1]);
            if (rc == 0)
                rc = set(cli, "alert.kafka_topic", argv[i + 2]);
            i += 2;
        } else if (!strcmp(a, "--frame"))
            frame = argv[++i];
        else {
            fprintf(stderr, "hilal alert: usage error: unknown option '%s'; see `hilal alert --help`\n", a);
            return HILAL_EXIT_USAGE;
        }
        if (rc != 0)
            return HILAL_EXIT_CONFIG;
    }
    if (path == NULL) {
        fprintf(stderr, "hilal alert: usage error: give the archive; see `hilal alert --help`\n");
        return HILAL_EXIT_USAGE;
    }
    const char *dir = hilal_config_get_string(cli->cfg, "alert.dir");
    const char *cmd = hilal_config_get_string(cli->cfg, "alert.command");
    const char *brokers = hilal_config_get_string(cli->cfg, "alert.kafka_brokers");
    if (!dir[0] && !cmd[0] && !brokers[0]) {
        fprintf(stderr, "hilal alert: usage error: no sink: give --dir, --command or --kafka (or "
                        "set alert.dir, alert.command, alert.kafka_brokers)\n");
        return HILAL_EXIT_USAGE;
    }
    char spool[4200];
    if (hilal_config_get_string(cli->cfg, "alert.kafka_spool")[0] == '\0') {
        snprintf(spool, sizeof spool, "%s.kafka-spool", path);
        if (set(cli, "alert.kafka_spool", spool) != 0)
            return HILAL_EXIT_CONFIG;
    }

    hilal_error err = {0};
    hilal_archive *ar = NULL;
    hilal_alert_ctx *ctx = NULL;
    hilal_archive_frame *frames = NULL;
    unsigned char *cur = NULL;
    size_t nf = 0, total = 0, nframes = 0, pending = 0;
    int rc = HILAL_EXIT_OK;
    hilal_status st = hilal_archive_open_read(path, &ar, &err);
    if (st == HILAL_OK)
        st = hilal_alert_ctx_new(cli->cfg, &ctx, &err);
    if (st == HILAL_OK)
        st = hilal_archive_read_frames(ar, &frames, &nf, &cur, &err);
    double t0 = hilal_alert_now_s();
    for (size_t i = 0; i < nf && st == HILAL_OK; i++) {
        if (!cur[i] || frames[i].n_candidates <= 0)
            continue;
        if (frame != NULL && strcmp(frames[i].frame_name, frame) != 0)
            continue;
        size_t n = 0;
        st = hilal_alert_ctx_process(ctx, ar, frames[i].first_cand_id, (size_t)frames[i].n_candidates,
                                     0, &n, &err);
        if (st != HILAL_OK)
            hilal_error_context(&err, "frame %s", frames[i].frame_name);
        total += n;
        nframes++;
    }
    if (st == HILAL_OK)
        st = hilal_alert_sinks_flush(hilal_alert_ctx_sinks(ctx),
                                     (int)hilal_config_get_int(cli->cfg, "alert.kafka_timeout_ms"),
                                     &pending, &err);
    if (st != HILAL_OK) {
        hilal_cli_report(&err);
        rc = hilal_cli_exit_code(st);
    } else if (cli->verbosity >= 0) {
        hilal_alert_ctx_stats cs;
        hilal_delivery_stats local, kafka;
        hilal_alert_ctx_get_stats(ctx, &cs);
        hilal_alert_sinks_stats(hilal_alert_ctx_sinks(ctx), &local, &kafka);
        printf("%zu alerts from %zu candidates of %zu frames in %.2f s\n", total, cs.candidates,
               nframes, hilal_alert_now_s() - t0);
        if (cs.alerts > 0)
            printf("  Avro packets: %.1f kB on average, largest %.1f kB; VOEvent %.1f kB on average\n",
                   cs.avro_bytes / 1e3 / (double)cs.alerts, cs.avro_max_bytes / 1e3,
                   cs.xml_bytes / 1e3 / (double)cs.alerts);
        if (brokers[0])
            printf("  Kafka: %zu delivered, %zu failed, %zu re-sent from the spool, %zu pending\n",
                   kafka.delivered, kafka.failed, kafka.resent_from_spool, pending);
        if (pending > 0)
            rc = HILAL_EXIT_CANNOT_RUN;
    }
    free(frames);
    free(cur);
    hilal_alert_ctx_free(ctx);
    hilal_archive_close(ar, NULL);
    return rc;
}
