/* Kafka delivery of alert packets: the only place librdkafka is called.
 *
 * Nothing is lost: each packet is first written to the spool directory
 * (<spool>/<alert_id>.avro, renamed into place and fsync'ed), then produced;
 * its spool file is removed only when the broker's delivery report says the
 * message is stored (acks=all). A message librdkafka gives up on (after
 * message.timeout.ms), or one still in flight when the process ends, stays
 * in the spool and is produced again by the next producer made on that
 * spool.
 * Nothing is duplicated by retries: the producer is idempotent
 * (enable.idempotence=true), so the broker drops the copies librdkafka
 * sends again after a lost acknowledgement. The one remaining window (the
 * process dies after the broker stored a message and before its spool file
 * is removed) re-sends that message in the next run, under the same key
 * (the alert id), so consumers that drop repeated ids see it once.
 */
#include "hilal/alert.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <librdkafka/rdkafka.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "hilal/log.h"

struct hilal_kafka {
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt;
    char spool[4096];
    char topic[256];
    int timeout_ms;
    pthread_mutex_t mutex;
    hilal_delivery_stats stats;
    int64_t *inflight;          /* alert ids produced and not yet reported */
    size_t ninflight, cap;
};

/* What a message carries to its delivery report. */
typedef struct msg_ctx {
    hilal_kafka *k;
    int64_t alert_id;
    double t_ready_s;
} msg_ctx;

double hilal_alert_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void spool_path(const hilal_kafka *k, int64_t id, const char *suffix, char *out, size_t len)
{
    snprintf(out, len, "%s/%lld.avro%s", k->spool, (long long)id, suffix);
}

static void inflight_remove(hilal_kafka *k, int64_t id)
{
    for (size_t i = 0; i < k->ninflight; i++)
        if (k->inflight[i] == id) {
            k->inflight[i] = k->inflight[--k->ninflight];
            return;
        }
}

/* Delivery report: served by rd_kafka_poll/flush in the calling thread. */
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    msg_ctx *ctx = m->_private;
    if (ctx == NULL)
        return;
    hilal_kafka *k = ctx->k;
    char path[4200];
    double lat = hilal_alert_now_s() - ctx->t_ready_s;
    pthread_mutex_lock(&k->mutex);
    inflight_remove(k, ctx->alert_id);
    if (m->err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        spool_path(k, ctx->alert_id, "", path, sizeof path);
        if (unlink(path) != 0 && errno != ENOENT)
            hilal_log(HILAL_LOG_WARN, "kafka: alert %lld delivered but its spool file %s could not "
                      "be removed (%s): it will be sent again", (long long)ctx->alert_id, path,
                      strerror(errno));
        k->stats.delivered++;
        k->stats.bytes += m->len;
        if (k->stats.delivered == 1 || lat < k->stats.latency_min_s)
            k->stats.latency_min_s = lat;
        if (lat > k->stats.latency_max_s)
            k->stats.latency_max_s = lat;
        k->stats.latency_sum_s += lat;
    } else {
        k->stats.failed++;
        hilal_log(HILAL_LOG_WARN, "kafka: alert %lld not delivered to topic %s: %s; it stays in "
                  "the spool %s and is sent again by the next run", (long long)ctx->alert_id,
                  k->topic, rd_kafka_err2str(m->err), k->spool);
    }
    pthread_mutex_unlock(&k->mutex);
    free(ctx);
}

static void on_error(rd_kafka_t *rk, int code, const char *reason, void *opaque)
{
    (void)opaque;
    char fatal[512];
    if (code == RD_KAFKA_RESP_ERR__FATAL &&
        rd_kafka_fatal_error(rk, fatal, sizeof fatal) != RD_KAFKA_RESP_ERR_NO_ERROR)
        hilal_log(HILAL_LOG_ERROR, "kafka: fatal producer error: %s (undelivered alerts stay in "
                  "the spool)", fatal);
    else
        hilal_log(HILAL_LOG_DEBUG, "kafka: %s: %s", rd_kafka_err2str((rd_kafka_resp_err_t)code),
                  reason);
}

static void on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    hilal_log(level <= 3 ? HILAL_LOG_WARN : HILAL_LOG_DEBUG, "kafka %s: %s", fac, buf);
}

static hilal_status conf_set(rd_kafka_conf_t *conf, const char *key, const char *value,
                             hilal_error *err)
{
    char msg[512];
    if (rd_kafka_conf_set(conf, key, value, msg, sizeof msg) != RD_KAFKA_CONF_OK)
        return hilal_error_set(err, HILAL_ERR_CONFIG, "kafka property %s=%s: %s", key, value, msg);
    return HILAL_OK;
}

/* "key=value;key=value" into the configuration. */
static hilal_status conf_properties(rd_kafka_conf_t *conf, const char *props, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    if (props == NULL || props[0] == '\0')
        return HILAL_OK;
    char *copy = strdup(props), *save = NULL;
    if (copy == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    for (char *item = strtok_r(copy, ";", &save); item != NULL && st == HILAL_OK;
         item = strtok_r(NULL, ";", &save)) {
        while (*item == ' ')
            item++;
        if (*item == '\0')
            continue;
        char *eq = strchr(item, '=');
        if (eq == NULL) {
            st = hilal_error_set(err, HILAL_ERR_CONFIG, "kafka property '%s' is not key=value "
                                 "(separate properties with ';')", item);
            break;
        }
        *eq = '\0';
        char *end = eq - 1;
        while (end > item && *end == ' ')
            *end-- = '\0';
        const char *val = eq + 1;
        while (*val == ' ')
            val++;
        if (!strcmp(item, "enable.idempotence") || !strcmp(item, "acks"))
            st = hilal_error_set(err, HILAL_ERR_CONFIG, "kafka property %s is fixed by hilal "
                                 "(idempotent delivery needs enable.idempotence=true, acks=all)",
                                 item);
        else
            st = conf_set(conf, item, val, err);
    }
    free(copy);
    return st;
}

/* Writes the spool file: under a temporary name, fsync'ed, renamed. */
static hilal_status spool_write(const hilal_kafka *k, int64_t id, const unsigned char *p, size_t n,
                                hilal_error *err)
{
    char tmp[4200], path[4200];
    spool_path(k, id, ".tmp", tmp, sizeof tmp);
    spool_path(k, id, "", path, sizeof path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot write the spool file %s: %s", tmp,
                               strerror(errno));
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, p + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return hilal_error_set(err, HILAL_ERR_IO, "cannot write the spool file %s: %s", tmp,
                                   strerror(e));
        }
        off += (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot put the spool file %s in place: %s", path,
                               strerror(e));
    }
    return HILAL_OK;
}

/* Produces one message (the spool file exists already). */
static hilal_status produce(hilal_kafka *k, int64_t id, const unsigned char *p, size_t n,
                            double t_ready_s, hilal_error *err)
{
    char key[32];
    int klen = snprintf(key, sizeof key, "%lld", (long long)id);
    msg_ctx *ctx = malloc(sizeof *ctx);
    if (ctx == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    *ctx = (msg_ctx){k, id, t_ready_s > 0 ? t_ready_s : hilal_alert_now_s()};
    pthread_mutex_lock(&k->mutex);
    for (size_t i = 0; i < k->ninflight; i++)
        if (k->inflight[i] == id) {
            /* Already on its way (from the spool): not twice. */
            pthread_mutex_unlock(&k->mutex);
            free(ctx);
            return HILAL_OK;
        }
    if (k->ninflight == k->cap) {
        size_t cap = k->cap * 2 + 64;
        int64_t *q = realloc(k->inflight, cap * sizeof *q);
        if (q == NULL) {
            pthread_mutex_unlock(&k->mutex);
            free(ctx);
            return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
        }
        k->inflight = q;
        k->cap = cap;
    }
    k->inflight[k->ninflight++] = id;
    k->stats.queued++;
    pthread_mutex_unlock(&k->mutex);
    for (int tries = 0;; tries++) {
        if (rd_kafka_produce(k->rkt, RD_KAFKA_PARTITION_UA, RD_KAFKA_MSG_F_COPY, (void *)p, n, key,
                             (size_t)klen, ctx) == 0)
            return HILAL_OK;
        rd_kafka_resp_err_t e = rd_kafka_last_error();
        if (e == RD_KAFKA_RESP_ERR__QUEUE_FULL && tries < 600) {
            rd_kafka_poll(k->rk, 100); /* let deliveries drain the queue */
            continue;
        }
        pthread_mutex_lock(&k->mutex);
        inflight_remove(k, id);
        k->stats.queued--;
        pthread_mutex_unlock(&k->mutex);
        free(ctx);
        return hilal_error_set(err, HILAL_ERR_ALERT, "kafka: cannot queue alert %lld for topic %s: "
                               "%s (it stays in the spool %s)", (long long)id, k->topic,
                               rd_kafka_err2str(e), k->spool);
    }
}

static hilal_status read_file(const char *path, unsigned char **data, size_t *n, hilal_error *err)
{
    struct stat sb;
    *data = NULL;
    *n = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &sb) != 0) {
        if (fd >= 0)
            close(fd);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot read %s: %s", path, strerror(errno));
    }
    unsigned char *buf = malloc(sb.st_size > 0 ? (size_t)sb.st_size : 1);
    size_t off = 0;
    while (buf != NULL && off < (size_t)sb.st_size) {
        ssize_t r = read(fd, buf + off, (size_t)sb.st_size - off);
        if (r <= 0)
            break;
        off += (size_t)r;
    }
    close(fd);
    if (buf == NULL || off != (size_t)sb.st_size) {
        free(buf);
        return hilal_error_set(err, buf == NULL ? HILAL_ERR_NOMEM : HILAL_ERR_IO,
                               "cannot read %s", path);
    }
    *data = buf;
    *n = off;
    return HILAL_OK;
}

/* Queues every alert left in the spool by an earlier run (oldest name
 * order is irrelevant: consumers key on the alert id). Temporary files of a
 * write that was cut short are removed: their alert was never reported as
 * sent, and the run that made it failed that alert. */
static hilal_status resend_spool(hilal_kafka *k, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    DIR *d = opendir(k->spool);
    struct dirent *e;
    if (d == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot read the spool %s: %s", k->spool,
                               strerror(errno));
    while (st == HILAL_OK && (e = readdir(d)) != NULL) {
        char path[4400], *end = NULL;
        long long id = strtoll(e->d_name, &end, 10);
        if (end == e->d_name || id <= 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", k->spool, e->d_name);
        if (strcmp(end, ".avro.tmp") == 0) {
            unlink(path);
            continue;
        }
        if (strcmp(end, ".avro") != 0)
            continue;
        unsigned char *data = NULL;
        size_t n = 0;
        st = read_file(path, &data, &n, err);
        if (st == HILAL_OK)
            st = produce(k, id, data, n, 0, err);
        free(data);
        if (st == HILAL_OK) {
            pthread_mutex_lock(&k->mutex);
            k->stats.resent_from_spool++;
            pthread_mutex_unlock(&k->mutex);
        }
    }
    closedir(d);
    if (k->stats.resent_from_spool > 0)
        hilal_log(HILAL_LOG_INFO, "kafka: %zu alerts left undelivered by an earlier run are sent "
                  "again from %s", k->stats.resent_from_spool, k->spool);
    return st;
}

hilal_status hilal_kafka_new(const hilal_kafka_options *opt, hilal_kafka **out, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char msg[512], num[32];
    rd_kafka_conf_t *conf = NULL;
    hilal_kafka *k = NULL;
    *out = NULL;
    if (opt->brokers == NULL || opt->brokers[0] == '\0' || opt->topic == NULL ||
        opt->topic[0] == '\0')
        return hilal_error_set(err, HILAL_ERR_CONFIG, "kafka needs brokers and a topic "
                               "(alert.kafka_brokers, alert.kafka_topic)");
    if (opt->spool_dir == NULL || opt->spool_dir[0] == '\0')
        return hilal_error_set(err, HILAL_ERR_CONFIG, "kafka needs a spool directory for alerts "
                               "not yet delivered (alert.kafka_spool)");
    if (mkdir(opt->spool_dir, 0755) != 0 && errno != EEXIST)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot create the spool %s: %s", opt->spool_dir,
                               strerror(errno));
    k = calloc(1, sizeof *k);
    if (k == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    pthread_mutex_init(&k->mutex, NULL);
    snprintf(k->spool, sizeof k->spool, "%s", opt->spool_dir);
    snprintf(k->topic, sizeof k->topic, "%s", opt->topic);
    k->timeout_ms = opt->timeout_ms > 0 ? opt->timeout_ms : 30000;

    conf = rd_kafka_conf_new();
    snprintf(num, sizeof num, "%d", k->timeout_ms);
    st = conf_set(conf, "bootstrap.servers", opt->brokers, err);
    if (st == HILAL_OK)
        st = conf_set(conf, "client.id", "hilal", err);
    /* Idempotence: the broker keeps each message once, whatever librdkafka
     * re-sends; implies acks=all and ordered retries. */
    if (st == HILAL_OK)
        st = conf_set(conf, "enable.idempotence", "true", err);
    if (st == HILAL_OK)
        st = conf_set(conf, "acks", "all", err);
    if (st == HILAL_OK)
        st = conf_set(conf, "message.timeout.ms", num, err);
    /* Alerts are latency-bound: send batches after at most 5 ms. */
    if (st == HILAL_OK)
        st = conf_set(conf, "linger.ms", "5", err);
    if (st == HILAL_OK)
        st = conf_properties(conf, opt->properties, err);
    if (st != HILAL_OK)
        goto cleanup;
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    rd_kafka_conf_set_error_cb(conf, on_error);
    rd_kafka_conf_set_log_cb(conf, on_log);
    k->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, msg, sizeof msg);
    if (k->rk == NULL) {
        st = hilal_error_set(err, HILAL_ERR_CONFIG, "kafka: cannot make a producer: %s", msg);
        goto cleanup;
    }
    conf = NULL; /* owned by rk now */
    k->rkt = rd_kafka_topic_new(k->rk, opt->topic, NULL);
    if (k->rkt == NULL) {
        st = hilal_error_set(err, HILAL_ERR_CONFIG, "kafka: topic %s: %s", opt->topic,
                             rd_kafka_err2str(rd_kafka_last_error()));
        goto cleanup;
    }
    st = resend_spool(k, err);
cleanup:
    if (conf != NULL)
        rd_kafka_conf_destroy(conf);
    if (st != HILAL_OK) {
        hilal_error_context(err, "kafka sink (brokers %s, topic %s)", opt->brokers, opt->topic);
        hilal_kafka_free(k);
        return st;
    }
    *out = k;
    return HILAL_OK;
}

hilal_status hilal_kafka_send(hilal_kafka *k, int64_t alert_id, const unsigned char *payload,
                              size_t len, double t_ready_s, hilal_error *err)
{
    hilal_status st = spool_write(k, alert_id, payload, len, err);
    if (st == HILAL_OK)
        st = produce(k, alert_id, payload, len, t_ready_s, err);
    /* Serve delivery reports that are ready without waiting. */
    rd_kafka_poll(k->rk, 0);
    return st;
}

hilal_status hilal_kafka_flush(hilal_kafka *k, int timeout_ms, size_t *pending, hilal_error *err)
{
    (void)err;
    double t_end = hilal_alert_now_s() + timeout_ms / 1000.0;
    size_t n;
    for (;;) {
        pthread_mutex_lock(&k->mutex);
        n = k->ninflight;
        pthread_mutex_unlock(&k->mutex);
        double left = t_end - hilal_alert_now_s();
        if (n == 0 || left <= 0)
            break;
        rd_kafka_poll(k->rk, (int)fmin(100.0, ceil(left * 1000.0)));
    }
    if (pending != NULL)
        *pending = n;
    return HILAL_OK;
}

void hilal_kafka_stats(const hilal_kafka *k, hilal_delivery_stats *out)
{
    pthread_mutex_lock((pthread_mutex_t *)&k->mutex);
    *out = k->stats;
    pthread_mutex_unlock((pthread_mutex_t *)&k->mutex);
}

void hilal_kafka_free(hilal_kafka *k)
{
    if (k == NULL)
        return;
    if (k->rk != NULL) {
        size_t pending = 0;
        hilal_kafka_flush(k, k->timeout_ms, &pending, NULL);
        if (pending > 0)
            hilal_log(HILAL_LOG_WARN, "kafka: %zu alerts not acknowledged by the brokers; they stay "
                      "in %s and are sent by the next run", pending, k->spool);
        /* Messages still queued are dropped from memory only (their delivery
         * reports fire with an error and free their contexts); their spool
         * files stay. */
        rd_kafka_purge(k->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(k->rk, 0);
    }
    if (k->rkt != NULL)
        rd_kafka_topic_destroy(k->rkt);
    if (k->rk != NULL)
        rd_kafka_destroy(k->rk);
    pthread_mutex_destroy(&k->mutex);
    free(k->inflight);
    free(k);
}
