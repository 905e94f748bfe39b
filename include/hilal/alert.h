/* Alerts: which candidates are alerted, the packets partners receive
 * (VOEvent 2.0 XML and Avro in the style of ZTF and LSST) and their delivery
 * (a directory, Kafka, a command). docs/alerts.md describes the rules, the
 * packet contents and the delivery guarantees.
 *
 * The alert stage (stages/alert.c, after `archive`) runs the rules on each
 * frame as soon as it is committed and delivers its alerts; `hilal alert
 * ARCHIVE` replays them from an archive. Both build the packets from what
 * the archive holds (candidate row, object history, cutouts), so a replay
 * makes byte-identical packets with the same alert ids.
 *
 * All functions return a hilal_status and fill the caller's hilal_error.
 */
#ifndef HILAL_ALERT_H
#define HILAL_ALERT_H

#include <stddef.h>
#include <stdint.h>

#include "hilal/archive.h"
#include "hilal/config.h"
#include "hilal/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the Avro schema written (schemas/hilal_alert_v1.avsc). */
#define HILAL_ALERT_SCHEMA_VERSION "1.0"

/* ------------------------------------------------------------------------
 * Selection rules
 * ------------------------------------------------------------------------ */

typedef struct hilal_alert_rules {
    double snr_min;             /* |snr| >= snr_min (default 5) */
    double rb_min;              /* rb >= rb_min (default 0.5) */
    uint32_t flags_reject;      /* no alert when any of these hilal_cand_flag bits is set
                                   (default NEAR_SAT | EDGE | REF_DEFECT) */
    int min_detections;         /* alert once the object has this many qualifying detections
                                   (default 1) */
    int alert_first;            /* also alert an object's first qualifying detection even when
                                   min_detections > 1 (default 1) */
    int sign;                   /* +1 brightening only, -1 fading only, 0 both (default 0) */
    double repeat_interval_days; /* no new alert for an object within this time of its last
                                    alert (default 0.5 d) ... */
    double repeat_delta_mag;    /* ... unless its magnitude changed by at least this much or the
                                   sign of its flux changed (default 0.5 mag) */
} hilal_alert_rules;

/* The defaults above. */
void hilal_alert_rules_init(hilal_alert_rules *r);

/* The rules from the [alert] section of a configuration. */
hilal_status hilal_alert_rules_from_config(const hilal_config *cfg, hilal_alert_rules *r,
                                           hilal_error *err);

/* Whether a single detection passes the quality cuts (S/N, rb, flags, sign). */
int hilal_alert_qualifies(const hilal_alert_rules *r, const hilal_archive_cand *c);

/* Decides whether cand (the last element of hist, hist[n - 1]) is alerted,
 * given the object's detections hist[0..n-1] oldest first (as returned by
 * hilal_archive_object_history with upto = cand's id). The rules are
 * replayed over the history, so earlier alerts are known without any state
 * besides the archive. why (may be NULL) receives the reason: the rule that
 * triggered or the one that stopped it. Returns 1 to alert. */
int hilal_alert_decide(const hilal_alert_rules *r, const hilal_archive_cand *hist, size_t n,
                       char *why, size_t why_len);

/* The deterministic alert id of a candidate: the first 15 hex digits of
 * SHA-256("<frame_id>:<index of the candidate in its frame>:<x %.2f>:<y %.2f>")
 * as a positive integer. The same input frame processed with the same
 * configuration gives the same ids, so consumers can drop duplicates. */
int64_t hilal_alert_id(int64_t frame_id, int64_t index_in_frame, double x, double y);

/* ------------------------------------------------------------------------
 * An alert and its packets
 * ------------------------------------------------------------------------ */

typedef struct hilal_alert {
    int64_t alert_id;
    hilal_archive_cand cand;        /* the alerted detection */
    hilal_archive_frame frame;      /* its frame row */
    hilal_archive_object object;    /* its object (object_id 0: none) */
    hilal_archive_cand *history;    /* previous detections of the object, oldest first (owned) */
    size_t nhistory;
    hilal_archive_cutout cutout;    /* stamps of the detection (owned) */
    char reason[160];               /* why it was alerted (hilal_alert_decide) */
} hilal_alert;

/* Frees what the alert owns (accepts NULL and an all-zero struct). */
void hilal_alert_clear(hilal_alert *a);

/* Fills *a for candidate cand_id of the archive (history, object, frame row
 * and cutouts read from it) and decides with r. *alerted = 1 when the rules
 * select it (a is filled in either case). */
hilal_status hilal_alert_load(hilal_archive *ar, int64_t cand_id, const hilal_alert_rules *r,
                              hilal_alert *a, int *alerted, hilal_error *err);

/* Who publishes the alerts (from the [alert] configuration section). */
typedef struct hilal_alert_publisher {
    const char *name;          /* publisher name in packets (default "Hilal") */
    const char *ivorn_base;    /* VOEvent IVORN stream, e.g. "ivo://example.org/hilal";
                                  the alert id is appended as "#<id>" */
    const char *contact_email; /* may be "" */
    int test_role;             /* 1: VOEvent role="test" */
} hilal_alert_publisher;

/* VOEvent 2.0 packet (IVOA Recommendation 2011-07-11) as UTF-8 XML: Who,
 * What (S/N, flux, magnitude, rb, flags, object id and detections), WhereWhen
 * (ICRS position with its error, UTC time of the exposure), How, Why.
 * Valid against VOEvent-v2.0.xsd. *xml is malloc'd (caller frees). */
hilal_status hilal_voevent_write(const hilal_alert *a, const hilal_alert_publisher *pub,
                                 char **xml, size_t *len, hilal_error *err);

/* Avro packet: an Avro object container file (codec null) holding one
 * record of schema hilal.alert.alert version HILAL_ALERT_SCHEMA_VERSION
 * (schemas/hilal_alert_v1.avsc, embedded as the writer schema): the
 * candidate, the object, its previous detections and gzipped-FITS cutouts of
 * the science, reference and difference images. *buf is malloc'd. */
hilal_status hilal_avro_packet_write(const hilal_alert *a, const hilal_alert_publisher *pub,
                                     unsigned char **buf, size_t *len, hilal_error *err);

/* The Avro schema text the library writes (identical in meaning to
 * schemas/hilal_alert_v1.avsc; a test checks it). */
const char *hilal_avro_schema_json(void);

/* A size x size float32 stamp as a gzip-compressed FITS file (made with
 * CFITSIO through include/hilal/fits.h; primary HDU, BITPIX -32, NaN where
 * the stamp leaves the frame), with EXTNAME-like cards naming the plane and
 * the candidate. *buf is malloc'd. tmpdir: where the FITS file is built
 * (NULL: $TMPDIR or /tmp). */
hilal_status hilal_alert_cutout_fits_gz(const float *pix, int size, const char *plane,
                                        const hilal_alert *a, const char *tmpdir,
                                        unsigned char **buf, size_t *len, hilal_error *err);

/* gzip (RFC 1952) compression of a buffer with zlib; *out is malloc'd. */
hilal_status hilal_gzip(const unsigned char *in, size_t n, unsigned char **out, size_t *nout,
                        hilal_error *err);

/* ------------------------------------------------------------------------
 * Kafka (pipeline/kafka.c: the only place librdkafka is called)
 * ------------------------------------------------------------------------ */

typedef struct hilal_kafka hilal_kafka;

typedef struct hilal_kafka_options {
    const char *brokers;      /* bootstrap.servers, "host:port,host:port" */
    const char *topic;
    const char *properties;   /* more librdkafka properties, "key=value;key=value"
                                 (security.protocol, sasl.*, ssl.*, ...); may be NULL */
    const char *spool_dir;    /* alerts not yet delivered are kept here (created) */
    int timeout_ms;           /* message.timeout.ms: give up on a delivery after this long
                                 (the alert stays in the spool) */
} hilal_kafka_options;

/* An idempotent producer (enable.idempotence=true, acks=all). Alerts left
 * in the spool by an earlier run are queued again first. */
hilal_status hilal_kafka_new(const hilal_kafka_options *opt, hilal_kafka **out, hilal_error *err);

/* Queues a packet keyed by its alert id: written to the spool first, then
 * produced; the spool file is removed when the broker acknowledges it. A
 * packet of an alert already in the spool is not queued twice.
 * t_ready_s (CLOCK_MONOTONIC seconds; 0 = now) is when the alert became
 * ready (end of its frame), for latency statistics. */
hilal_status hilal_kafka_send(hilal_kafka *k, int64_t alert_id, const unsigned char *payload,
                              size_t len, double t_ready_s, hilal_error *err);

/* Serves delivery reports for up to timeout_ms or until nothing is in
 * flight; *pending (may be NULL) receives the alerts still unacknowledged. */
hilal_status hilal_kafka_flush(hilal_kafka *k, int timeout_ms, size_t *pending, hilal_error *err);

/* Delivery counters and latency (from t_ready to the broker's
 * acknowledgement) statistics in seconds. */
typedef struct hilal_delivery_stats {
    size_t queued, delivered, failed, resent_from_spool;
    double latency_min_s, latency_max_s, latency_sum_s;
    size_t bytes;
} hilal_delivery_stats;
void hilal_kafka_stats(const hilal_kafka *k, hilal_delivery_stats *out);

/* Flushes for up to opt->timeout_ms and frees (accepts NULL). Alerts not
 * acknowledged stay in the spool. */
void hilal_kafka_free(hilal_kafka *k);

/* ------------------------------------------------------------------------
 * Sinks: where alerts go (combinable)
 * ------------------------------------------------------------------------ */

typedef struct hilal_alert_sinks hilal_alert_sinks;

typedef struct hilal_alert_sinks_options {
    const char *dir;          /* directory sink: <dir>/<alert_id>.avro and .xml ("" = none) */
    const char *command;      /* command sink: run with `sh -c` per alert, the Avro packet on
                                 its standard input; environment HILAL_ALERT_ID,
                                 HILAL_ALERT_FORMAT=avro, HILAL_VOEVENT (path of the XML when
                                 the directory sink wrote it) ("" = none) */
    int command_timeout_s;    /* a command running longer is killed (failure) */
    hilal_kafka_options kafka; /* Kafka sink when kafka.brokers and kafka.topic are set */
    int write_voevent;        /* directory sink also writes the VOEvent XML */
} hilal_alert_sinks_options;

/* The sinks of the [alert] configuration section (strings borrowed from
 * cfg, which must outlive the sinks). */
void hilal_alert_sinks_options_from_config(const hilal_config *cfg, hilal_alert_sinks_options *o);

hilal_status hilal_alert_sinks_new(const hilal_alert_sinks_options *o, hilal_alert_sinks **out,
                                   hilal_error *err);

/* Whether any sink is configured. */
int hilal_alert_sinks_any(const hilal_alert_sinks *s);

/* Delivers one alert to every sink. A sink that fails does not stop the
 * others; the first error is returned (Kafka failures are only known at
 * flush time and keep the alert in the spool). Thread-safe. */
hilal_status hilal_alert_sinks_deliver(hilal_alert_sinks *s, int64_t alert_id,
                                       const unsigned char *avro, size_t avro_len,
                                       const char *xml, size_t xml_len, double t_ready_s,
                                       hilal_error *err);

/* Waits up to timeout_ms for Kafka acknowledgements. */
hilal_status hilal_alert_sinks_flush(hilal_alert_sinks *s, int timeout_ms, size_t *pending,
                                     hilal_error *err);

/* Counters of the directory/command sinks (latency to the file being in
 * place / the command having exited) and of Kafka. */
void hilal_alert_sinks_stats(const hilal_alert_sinks *s, hilal_delivery_stats *local,
                             hilal_delivery_stats *kafka);

/* Flushes Kafka (up to its timeout) and frees. Accepts NULL. */
void hilal_alert_sinks_free(hilal_alert_sinks *s);

/* ------------------------------------------------------------------------
 * A whole pass: select, build, deliver
 * ------------------------------------------------------------------------ */

typedef struct hilal_alert_ctx hilal_alert_ctx;

/* Rules, publisher and sinks from the [alert] section. */
hilal_status hilal_alert_ctx_new(const hilal_config *cfg, hilal_alert_ctx **out, hilal_error *err);
void hilal_alert_ctx_free(hilal_alert_ctx *ctx);

/* Runs the rules on candidates [first_cand_id, first_cand_id + n) of ar and
 * delivers the selected ones. t_ready_s: CLOCK_MONOTONIC time the frame was
 * finished (0 = now). *nalerts (may be NULL) receives the number delivered. */
hilal_status hilal_alert_ctx_process(hilal_alert_ctx *ctx, hilal_archive *ar,
                                     int64_t first_cand_id, size_t n, double t_ready_s,
                                     size_t *nalerts, hilal_error *err);

/* Counters of a context: alerts built and their packet sizes. */
typedef struct hilal_alert_ctx_stats {
    size_t candidates;      /* candidates looked at */
    size_t alerts;          /* alerts built and handed to the sinks */
    size_t avro_bytes, avro_max_bytes; /* Avro packet sizes: total and largest */
    size_t xml_bytes, xml_max_bytes;   /* VOEvent sizes */
    double build_s;         /* time spent building packets */
} hilal_alert_ctx_stats;
void hilal_alert_ctx_get_stats(hilal_alert_ctx *ctx, hilal_alert_ctx_stats *out);

/* The context's sinks (for flushing and statistics). */
hilal_alert_sinks *hilal_alert_ctx_sinks(hilal_alert_ctx *ctx);

/* CLOCK_MONOTONIC seconds. */
double hilal_alert_now_s(void);

#ifdef __cplusplus
}
#endif
#endif
