/* Stage alert: runs the alert rules on each frame as soon as the archive
 * has committed it, and delivers the selected alerts (VOEvent and Avro
 * packets) to the configured sinks: a directory, a command, Kafka
 * (include/hilal/alert.h, docs/alerts.md).
 *
 * Without any sink configured (alert.dir, alert.command and
 * alert.kafka_brokers all empty) the stage does nothing, so `hilal run` and
 * `hilal night` alert exactly when alerts are asked for.
 *
 * The packets are built from what the archive committed (candidate rows,
 * object histories, cutouts), read through the archive stage's writer
 * handle, so that `hilal alert ARCHIVE` replays the same alerts.
 */
#include <stdlib.h>

#include "hilal/alert.h"
#include "hilal/log.h"
#include "hilal/stage.h"

static const hilal_param alert_params[] = {
    /* Sinks */
    {"dir", HILAL_PARAM_STRING, "", 0, 0, "",
     "directory sink: <dir>/<alert_id>.avro (and .xml); empty = no directory sink"},
    {"voevent", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "the directory sink also writes the VOEvent 2.0 XML packet"},
    {"command", HILAL_PARAM_STRING, "", 0, 0, "",
     "command run (sh -c) per alert with the Avro packet on its standard input; empty = none"},
    {"command_timeout_s", HILAL_PARAM_INT, "30", 1, 3600, "s",
     "an alert command running longer is killed and the alert counts as failed"},
    {"kafka_brokers", HILAL_PARAM_STRING, "", 0, 0, "",
     "Kafka bootstrap servers host:port[,host:port]; empty = no Kafka sink"},
    {"kafka_topic", HILAL_PARAM_STRING, "", 0, 0, "", "Kafka topic of the Avro packets"},
    {"kafka_properties", HILAL_PARAM_STRING, "", 0, 0, "",
     "more librdkafka properties, key=value;key=value (security.protocol, sasl.*, ssl.*)"},
    {"kafka_spool", HILAL_PARAM_STRING, "", 0, 0, "",
     "directory keeping alerts until Kafka acknowledges them (default: <archive>.kafka-spool)"},
    {"kafka_timeout_ms", HILAL_PARAM_INT, "30000", 1000, 3600000, "ms",
     "give up on a Kafka delivery after this long; the alert stays in the spool for the next run"},
    {"wait_ms", HILAL_PARAM_INT, "5000", 0, 600000, "ms",
     "after each frame, wait at most this long for Kafka to acknowledge its alerts"},
    /* Rules */
    {"snr_min", HILAL_PARAM_DOUBLE, "5", 0, 1e6, "sigma", "alert candidates with |snr| >= snr_min"},
    {"rb_min", HILAL_PARAM_DOUBLE, "0.5", 0, 1, "", "... and real/bogus score rb >= rb_min"},
    {"flags_reject", HILAL_PARAM_INT, "13", 0, 4294967295.0, "",
     "... and none of these candidate flag bits (13 = near saturation | edge | reference defect)"},
    {"sign", HILAL_PARAM_STRING, "both", 0, 0, "",
     "both, brightening (positive difference flux) or fading"},
    {"min_detections", HILAL_PARAM_INT, "1", 1, 1000, "",
     "alert an object once it has this many qualifying detections"},
    {"alert_first", HILAL_PARAM_BOOL, "true", 0, 0, "",
     "also alert an object's first qualifying detection when min_detections > 1"},
    {"repeat_interval_days", HILAL_PARAM_DOUBLE, "0.5", 0, 1e5, "d",
     "no new alert for an object within this time of its last alert ..."},
    {"repeat_delta_mag", HILAL_PARAM_DOUBLE, "0.5", 0, 100, "mag",
     "... unless it changed by at least this much (or changed sign)"},
    /* Publisher */
    {"publisher", HILAL_PARAM_STRING, "Hilal", 0, 0, "", "publisher name written in the packets"},
    {"ivorn", HILAL_PARAM_STRING, "ivo://hilal/alerts", 0, 0, "",
     "VOEvent IVORN of the alert stream; the alert id is appended as #<id>"},
    {"contact_email", HILAL_PARAM_STRING, "", 0, 0, "", "contact e-mail in the VOEvent Who"},
    {"test", HILAL_PARAM_BOOL, "false", 0, 0, "", "mark VOEvents role=\"test\""},
};

typedef struct alert_state {
    hilal_alert_ctx *ctx;      /* NULL: no sink configured */
    hilal_archive *ar;         /* the archive stage's writer (borrowed) */
    int wait_ms;
} alert_state;

static void alert_fini(void *state);

static hilal_status alert_init(const hilal_config *cfg, void **state, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    alert_state *s = calloc(1, sizeof *s);
    *state = NULL;
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    s->wait_ms = (int)hilal_config_get_int(cfg, "alert.wait_ms");
    const char *dir = hilal_config_get_string(cfg, "alert.dir");
    const char *cmd = hilal_config_get_string(cfg, "alert.command");
    const char *brokers = hilal_config_get_string(cfg, "alert.kafka_brokers");
    if ((dir == NULL || !dir[0]) && (cmd == NULL || !cmd[0]) && (brokers == NULL || !brokers[0])) {
        *state = s; /* no sink: nothing to do */
        return HILAL_OK;
    }
    const char *path = hilal_config_get_string(cfg, "archive.path");
    s->ar = hilal_archive_writer_lookup(path);
    if (s->ar == NULL) {
        st = hilal_error_set(err, HILAL_ERR_INTERNAL, "the archive %s is not open for writing in "
                             "this process; the alert stage must run after the archive stage",
                             path != NULL ? path : "(none)");
        goto cleanup;
    }
    st = hilal_alert_ctx_new(cfg, &s->ctx, err);
cleanup:
    if (st != HILAL_OK) {
        alert_fini(s);
        return st;
    }
    *state = s;
    return HILAL_OK;
}

static hilal_status alert_run(const void *state, hilal_frame *frame, hilal_error *err)
{
    const alert_state *s = state;
    size_t nalerts = 0, pending = 0;
    if (s->ctx == NULL || frame->ncands == 0)
        return HILAL_OK;
    /* The frame is finished: committed to the archive just before. */
    double t_ready = hilal_alert_now_s();
    hilal_status st = hilal_alert_ctx_process(s->ctx, s->ar, frame->cands[0].cand_id,
                                              frame->ncands, t_ready, &nalerts, err);
    if (st == HILAL_OK && nalerts > 0)
        st = hilal_alert_sinks_flush(hilal_alert_ctx_sinks(s->ctx), s->wait_ms, &pending, err);
    if (st == HILAL_OK && nalerts > 0)
        hilal_log(HILAL_LOG_INFO, "frame %s: %zu alerts delivered in %.3f s%s", frame->frame_id,
                  nalerts, hilal_alert_now_s() - t_ready,
                  pending > 0 ? " (some still awaiting Kafka acknowledgement)" : "");
    return st;
}

static void alert_fini(void *state)
{
    alert_state *s = state;
    if (s == NULL)
        return;
    if (s->ctx != NULL) {
        hilal_alert_ctx_stats cs;
        hilal_delivery_stats local, kafka;
        hilal_alert_ctx_get_stats(s->ctx, &cs);
        hilal_alert_sinks_stats(hilal_alert_ctx_sinks(s->ctx), &local, &kafka);
        if (cs.alerts > 0)
            hilal_log(HILAL_LOG_INFO, "alerts: %zu from %zu candidates, Avro %.1f kB on average "
                      "(largest %.1f kB); Kafka %zu delivered, %zu failed, latency %.3f s mean, "
                      "%.3f s max", cs.alerts, cs.candidates, cs.avro_bytes / 1e3 / (double)cs.alerts,
                      cs.avro_max_bytes / 1e3, kafka.delivered, kafka.failed,
                      kafka.delivered ? kafka.latency_sum_s / (double)kafka.delivered : 0.0,
                      kafka.latency_max_s);
    }
    hilal_alert_ctx_free(s->ctx);
    free(s);
}

const hilal_stage hilal_stage_alert = {
    .name = "alert",
    .summary = "select alerts and deliver VOEvent/Avro packets to a directory, a command or Kafka",
    .params = alert_params,
    .nparams = sizeof alert_params / sizeof alert_params[0],
    .needs = HILAL_PROD_ARCHIVED,
    .makes = 0,
    .flags = 0,
    .init = alert_init,
    .run = alert_run,
    .fini = alert_fini,
};
