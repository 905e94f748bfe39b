/* Where alerts go: a directory, a command per alert, Kafka (kafka.c). */
#include "hilal/alert.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hilal/log.h"

extern char **environ;

struct hilal_alert_sinks {
    char dir[4096];
    char command[4096];
    int command_timeout_s;
    int write_voevent;
    hilal_kafka *kafka;
    pthread_mutex_t mutex;
    hilal_delivery_stats local;
};

void hilal_alert_sinks_options_from_config(const hilal_config *cfg, hilal_alert_sinks_options *o)
{
    memset(o, 0, sizeof *o);
    o->dir = hilal_config_get_string(cfg, "alert.dir");
    o->command = hilal_config_get_string(cfg, "alert.command");
    o->command_timeout_s = (int)hilal_config_get_int(cfg, "alert.command_timeout_s");
    o->write_voevent = hilal_config_get_bool(cfg, "alert.voevent");
    o->kafka.brokers = hilal_config_get_string(cfg, "alert.kafka_brokers");
    o->kafka.topic = hilal_config_get_string(cfg, "alert.kafka_topic");
    o->kafka.properties = hilal_config_get_string(cfg, "alert.kafka_properties");
    o->kafka.spool_dir = hilal_config_get_string(cfg, "alert.kafka_spool");
    o->kafka.timeout_ms = (int)hilal_config_get_int(cfg, "alert.kafka_timeout_ms");
}

hilal_status hilal_alert_sinks_new(const hilal_alert_sinks_options *o, hilal_alert_sinks **out,
                                   hilal_error *err)
{
    hilal_status st = HILAL_OK;
    *out = NULL;
    hilal_alert_sinks *s = calloc(1, sizeof *s);
    if (s == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    pthread_mutex_init(&s->mutex, NULL);
    snprintf(s->dir, sizeof s->dir, "%s", o->dir != NULL ? o->dir : "");
    snprintf(s->command, sizeof s->command, "%s", o->command != NULL ? o->command : "");
    s->command_timeout_s = o->command_timeout_s > 0 ? o->command_timeout_s : 30;
    s->write_voevent = o->write_voevent;
    if (s->dir[0] != '\0' && mkdir(s->dir, 0755) != 0 && errno != EEXIST) {
        st = hilal_error_set(err, HILAL_ERR_IO, "cannot create the alert directory %s: %s; set "
                             "alert.dir to a writable directory", s->dir, strerror(errno));
        goto cleanup;
    }
    int want_kafka = o->kafka.brokers != NULL && o->kafka.brokers[0] != '\0';
    int has_topic = o->kafka.topic != NULL && o->kafka.topic[0] != '\0';
    if (want_kafka != has_topic) {
        st = hilal_error_set(err, HILAL_ERR_CONFIG, "Kafka needs both alert.kafka_brokers and "
                             "alert.kafka_topic (one of them is empty)");
        goto cleanup;
    }
    if (want_kafka)
        st = hilal_kafka_new(&o->kafka, &s->kafka, err);
cleanup:
    if (st != HILAL_OK) {
        hilal_alert_sinks_free(s);
        return st;
    }
    *out = s;
    return HILAL_OK;
}

int hilal_alert_sinks_any(const hilal_alert_sinks *s)
{
    return s != NULL && (s->dir[0] != '\0' || s->command[0] != '\0' || s->kafka != NULL);
}

/* Writes a file atomically: a temporary name in the same directory, then
 * rename. */
static hilal_status write_atomic(const char *path, const void *data, size_t n, hilal_error *err)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *fp = fopen(tmp, "wb");
    if (fp == NULL)
        return hilal_error_set(err, HILAL_ERR_IO, "cannot write %s: %s", tmp, strerror(errno));
    size_t w = fwrite(data, 1, n, fp);
    if (fclose(fp) != 0 || w != n || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot write %s: %s", path, strerror(e));
    }
    return HILAL_OK;
}

/* Runs the command with the packet on its standard input. The environment
 * is built before fork (the child of a threaded process may only call
 * async-signal-safe functions). */
static hilal_status run_command(const hilal_alert_sinks *s, int64_t id, const unsigned char *p,
                                size_t n, const char *voevent_path, hilal_error *err)
{
    hilal_status st = HILAL_OK;
    char e_id[64], e_vo[4300];
    const char *e_fmt = "HILAL_ALERT_FORMAT=avro";
    size_t nenv = 0;
    while (environ != NULL && environ[nenv] != NULL)
        nenv++;
    char **envp = calloc(nenv + 4, sizeof *envp);
    if (envp == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    size_t k = 0;
    for (size_t i = 0; i < nenv; i++)
        if (strncmp(environ[i], "HILAL_ALERT_ID=", 15) && strncmp(environ[i], "HILAL_VOEVENT=", 14) &&
            strncmp(environ[i], "HILAL_ALERT_FORMAT=", 19))
            envp[k++] = environ[i];
    snprintf(e_id, sizeof e_id, "HILAL_ALERT_ID=%lld", (long long)id);
    envp[k++] = e_id;
    envp[k++] = (char *)e_fmt;
    if (voevent_path != NULL) {
        snprintf(e_vo, sizeof e_vo, "HILAL_VOEVENT=%s", voevent_path);
        envp[k++] = e_vo;
    }
    envp[k] = NULL;

    int fds[2];
    if (pipe(fds) != 0) {
        free(envp);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot make a pipe: %s", strerror(errno));
    }
    char *argv[] = {"sh", "-c", (char *)s->command, NULL};
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        free(envp);
        return hilal_error_set(err, HILAL_ERR_IO, "cannot start the alert command: %s", strerror(errno));
    }
    if (pid == 0) {
        dup2(fds[0], STDIN_FILENO);
        close(fds[0]);
        close(fds[1]);
        execve("/bin/sh", argv, envp);
        _exit(127);
    }
    close(fds[0]);
    free(envp);

    /* Write the packet with SIGPIPE blocked in this thread: a command that
     * does not read its input must not kill the pipeline. */
    sigset_t pipe_set, old_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old_set);
    size_t off = 0;
    int write_errno = 0;
    while (off < n) {
        ssize_t w = write(fds[1], p + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            write_errno = errno;
            break;
        }
        off += (size_t)w;
    }
    close(fds[1]);
    if (write_errno == EPIPE) {
        struct timespec zero = {0, 0};
        sigtimedwait(&pipe_set, NULL, &zero); /* consume the pending SIGPIPE */
    }
    pthread_sigmask(SIG_SETMASK, &old_set, NULL);

    /* Wait, killing it after the timeout. */
    int status = 0;
    double t_end = hilal_alert_now_s() + s->command_timeout_s;
    pid_t r;
    while ((r = waitpid(pid, &status, WNOHANG)) == 0) {
        if (hilal_alert_now_s() > t_end) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return hilal_error_set(err, HILAL_ERR_ALERT, "alert command `%s` ran longer than %d s "
                                   "(alert.command_timeout_s) for alert %lld and was killed",
                                   s->command, s->command_timeout_s, (long long)id);
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    if (r < 0)
        st = hilal_error_set(err, HILAL_ERR_ALERT, "cannot wait for the alert command: %s",
                             strerror(errno));
    else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        st = hilal_error_set(err, HILAL_ERR_ALERT, "alert command `%s` failed for alert %lld "
                             "(%s %d)%s", s->command, (long long)id,
                             WIFEXITED(status) ? "exit status" : "signal",
                             WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status),
                             write_errno ? " and did not read the whole packet" : "");
    return st;
}

static void record_local(hilal_alert_sinks *s, size_t bytes, double t_ready_s)
{
    double lat = hilal_alert_now_s() - t_ready_s;
    pthread_mutex_lock(&s->mutex);
    s->local.queued++;
    s->local.delivered++;
    s->local.bytes += bytes;
    if (s->local.delivered == 1 || lat < s->local.latency_min_s)
        s->local.latency_min_s = lat;
    if (lat > s->local.latency_max_s)
        s->local.latency_max_s = lat;
    s->local.latency_sum_s += lat;
    pthread_mutex_unlock(&s->mutex);
}

hilal_status hilal_alert_sinks_deliver(hilal_alert_sinks *s, int64_t id, const unsigned char *avro,
                                       size_t avro_len, const char *xml, size_t xml_len,
                                       double t_ready_s, hilal_error *err)
{
    hilal_status st = HILAL_OK, st2;
    char path[4200], xpath[4200];
    int have_xml = 0;
    if (t_ready_s <= 0)
        t_ready_s = hilal_alert_now_s();
    /* Kafka first: it is the latency-critical one and works asynchronously. */
    if (s->kafka != NULL)
        st = hilal_kafka_send(s->kafka, id, avro, avro_len, t_ready_s, err);
    if (s->dir[0] != '\0') {
        hilal_error e2 = {0};
        if (xml != NULL && s->write_voevent) {
            snprintf(xpath, sizeof xpath, "%s/%lld.xml", s->dir, (long long)id);
            st2 = write_atomic(xpath, xml, xml_len, &e2);
            have_xml = st2 == HILAL_OK;
        } else {
            st2 = HILAL_OK;
        }
        snprintf(path, sizeof path, "%s/%lld.avro", s->dir, (long long)id);
        if (st2 == HILAL_OK)
            st2 = write_atomic(path, avro, avro_len, &e2);
        if (st2 == HILAL_OK && s->command[0] == '\0')
            record_local(s, avro_len, t_ready_s);
        if (st2 != HILAL_OK && st == HILAL_OK) {
            st = st2;
            if (err != NULL && err->code == HILAL_OK)
                *err = e2;
        }
    }
    if (s->command[0] != '\0') {
        hilal_error e2 = {0};
        st2 = run_command(s, id, avro, avro_len, have_xml ? xpath : NULL, &e2);
        if (st2 == HILAL_OK)
            record_local(s, avro_len, t_ready_s);
        if (st2 != HILAL_OK && st == HILAL_OK) {
            st = st2;
            if (err != NULL && err->code == HILAL_OK)
                *err = e2;
        }
    }
    return st;
}

hilal_status hilal_alert_sinks_flush(hilal_alert_sinks *s, int timeout_ms, size_t *pending,
                                     hilal_error *err)
{
    if (pending != NULL)
        *pending = 0;
    if (s == NULL || s->kafka == NULL)
        return HILAL_OK;
    return hilal_kafka_flush(s->kafka, timeout_ms, pending, err);
}

void hilal_alert_sinks_stats(const hilal_alert_sinks *s, hilal_delivery_stats *local,
                             hilal_delivery_stats *kafka)
{
    if (local != NULL) {
        pthread_mutex_lock((pthread_mutex_t *)&s->mutex);
        *local = s->local;
        pthread_mutex_unlock((pthread_mutex_t *)&s->mutex);
    }
    if (kafka != NULL) {
        memset(kafka, 0, sizeof *kafka);
        if (s->kafka != NULL)
            hilal_kafka_stats(s->kafka, kafka);
    }
}

void hilal_alert_sinks_free(hilal_alert_sinks *s)
{
    if (s == NULL)
        return;
    hilal_kafka_free(s->kafka);
    pthread_mutex_destroy(&s->mutex);
    free(s);
}
