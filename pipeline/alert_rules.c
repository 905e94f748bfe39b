/* Alert selection rules, alert ids, loading an alert from the archive and
 * the alert context (rules + publisher + sinks) shared by the alert stage
 * and `hilal alert`. */
#include "hilal/alert.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "associate.h"
#include "hilal/checksum.h"
#include "hilal/frame.h"
#include "hilal/log.h"

void hilal_alert_rules_init(hilal_alert_rules *r)
{
    r->snr_min = 5.0;
    r->rb_min = 0.5;
    r->flags_reject = HILAL_CAND_NEAR_SAT | HILAL_CAND_EDGE | HILAL_CAND_REF_DEFECT;
    r->min_detections = 1;
    r->alert_first = 1;
    r->sign = 0;
    r->repeat_interval_days = 0.5;
    r->repeat_delta_mag = 0.5;
}

hilal_status hilal_alert_rules_from_config(const hilal_config *cfg, hilal_alert_rules *r,
                                           hilal_error *err)
{
    hilal_alert_rules_init(r);
    r->snr_min = hilal_config_get_double(cfg, "alert.snr_min");
    r->rb_min = hilal_config_get_double(cfg, "alert.rb_min");
    r->flags_reject = (uint32_t)hilal_config_get_int(cfg, "alert.flags_reject");
    r->min_detections = (int)hilal_config_get_int(cfg, "alert.min_detections");
    r->alert_first = hilal_config_get_bool(cfg, "alert.alert_first");
    r->repeat_interval_days = hilal_config_get_double(cfg, "alert.repeat_interval_days");
    r->repeat_delta_mag = hilal_config_get_double(cfg, "alert.repeat_delta_mag");
    const char *sign = hilal_config_get_string(cfg, "alert.sign");
    if (sign == NULL || !strcmp(sign, "both"))
        r->sign = 0;
    else if (!strcmp(sign, "brightening"))
        r->sign = 1;
    else if (!strcmp(sign, "fading"))
        r->sign = -1;
    else
        return hilal_error_set(err, HILAL_ERR_CONFIG, "alert.sign is '%s'; use both, brightening "
                               "or fading", sign);
    return HILAL_OK;
}

int hilal_alert_qualifies(const hilal_alert_rules *r, const hilal_archive_cand *c)
{
    if (!(fabs(c->snr) >= r->snr_min) || !(c->rb >= r->rb_min))
        return 0;
    if ((c->flags & r->flags_reject) != 0)
        return 0;
    if ((r->sign > 0 && !(c->snr > 0)) || (r->sign < 0 && !(c->snr < 0)))
        return 0;
    return 1;
}

/* Brightness change between two detections, mag: from the magnitudes when
 * both have one, else from |flux| (same zero point assumed). NaN when
 * neither works. */
static double delta_mag(const hilal_archive_cand *a, const hilal_archive_cand *b)
{
    if (isfinite(a->mag) && isfinite(b->mag))
        return a->mag - b->mag;
    if (fabs(a->flux) > 0 && fabs(b->flux) > 0)
        return -2.5 * log10(fabs(a->flux) / fabs(b->flux));
    return NAN;
}

static const char *ordinal(int n)
{
    int t = n % 100;
    if (t >= 11 && t <= 13)
        return "th";
    return n % 10 == 1 ? "st" : n % 10 == 2 ? "nd" : n % 10 == 3 ? "rd" : "th";
}

int hilal_alert_decide(const hilal_alert_rules *r, const hilal_archive_cand *hist, size_t n,
                       char *why, size_t why_len)
{
    char tmp[160] = "";
    int decision = 0, nqual = 0, have_alert = 0;
    hilal_archive_cand last = {0};
    if (n == 0) {
        if (why != NULL)
            snprintf(why, why_len, "no detection");
        return 0;
    }
    /* Replay the rules over the object's detections in the order they
     * were made: the decisions for earlier detections tell when it was last
     * alerted, so no other state is needed. */
    for (size_t i = 0; i < n; i++) {
        const hilal_archive_cand *c = &hist[i];
        decision = 0;
        if (!hilal_alert_qualifies(r, c)) {
            snprintf(tmp, sizeof tmp, "below the cuts (|snr| %.1f, rb %.2f, flags 0x%x)",
                     fabs(c->snr), c->rb, (unsigned)c->flags);
            continue;
        }
        nqual++;
        int enough = nqual >= r->min_detections;
        int first = r->alert_first && nqual == 1;
        if (!enough && !first) {
            snprintf(tmp, sizeof tmp, "%d of the %d detections needed", nqual, r->min_detections);
            continue;
        }
        if (have_alert) {
            double dt = fabs(c->mjd - last.mjd);
            double dm = delta_mag(c, &last);
            int flipped = (c->snr > 0) != (last.snr > 0);
            if (dt < r->repeat_interval_days && !flipped && !(fabs(dm) >= r->repeat_delta_mag)) {
                snprintf(tmp, sizeof tmp, "alerted %.3f d ago and changed by %.2f mag only", dt,
                         isfinite(dm) ? fabs(dm) : 0.0);
                continue;
            }
            if (flipped)
                snprintf(tmp, sizeof tmp, "%s since the last alert", c->snr > 0 ? "brightening"
                                                                               : "fading");
            else if (dt < r->repeat_interval_days)
                snprintf(tmp, sizeof tmp, "%s by %.2f mag since the last alert",
                         dm < 0 ? "brightened" : "faded", fabs(dm));
            else
                snprintf(tmp, sizeof tmp, "%d%s detection, %.2f d after the last alert", nqual,
                         ordinal(nqual), dt);
        } else if (nqual == 1) {
            snprintf(tmp, sizeof tmp, "first detection (%s)", c->snr > 0 ? "brightening" : "fading");
        } else {
            snprintf(tmp, sizeof tmp, "%d%s detection (at least %d needed)", nqual, ordinal(nqual),
                     r->min_detections);
        }
        decision = 1;
        have_alert = 1;
        last = *c;
    }
    if (why != NULL)
        snprintf(why, why_len, "%s", tmp);
    return decision;
}

int64_t hilal_alert_id(int64_t frame_id, int64_t index_in_frame, double x, double y)
{
    char text[160], hex[65];
    snprintf(text, sizeof text, "%lld:%lld:%.2f:%.2f", (long long)frame_id,
             (long long)index_in_frame, x, y);
    hilal_sha256_hex(text, strlen(text), hex);
    /* First 15 hex digits: 60 bits, a positive int64 in every language. */
    hex[15] = '\0';
    return (int64_t)strtoll(hex, NULL, 16);
}

void hilal_alert_clear(hilal_alert *a)
{
    if (a == NULL)
        return;
    free(a->history);
    hilal_archive_cutout_clear(&a->cutout);
    memset(a, 0, sizeof *a);
}

hilal_status hilal_alert_load(hilal_archive *ar, int64_t cand_id, const hilal_alert_rules *r,
                              hilal_alert *a, int *alerted, hilal_error *err)
{
    hilal_status st;
    hilal_archive_cand *hist = NULL;
    size_t n = 0;
    memset(a, 0, sizeof *a);
    *alerted = 0;
    st = hilal_archive_get_candidate(ar, cand_id, &a->cand, &a->frame, NULL, err);
    if (st != HILAL_OK)
        return st;
    a->alert_id = hilal_alert_id(a->cand.frame_id, cand_id - a->frame.first_cand_id, a->cand.x,
                                 a->cand.y);
    if (!hilal_alert_qualifies(r, &a->cand)) {
        snprintf(a->reason, sizeof a->reason, "below the cuts");
        return HILAL_OK;
    }
    if (a->cand.object_id <= 0) {
        /* Without an object (no sky position) the candidate is its own
         * history. */
        *alerted = hilal_alert_decide(r, &a->cand, 1, a->reason, sizeof a->reason);
    } else {
        st = hilal_archive_object_history(ar, a->cand.object_id, cand_id, &hist, &n, err);
        if (st != HILAL_OK)
            goto cleanup;
        if (n == 0 || hist[n - 1].cand_id != cand_id) {
            /* The candidate's frame is not current (superseded). */
            snprintf(a->reason, sizeof a->reason, "its frame was processed again since");
            goto cleanup;
        }
        *alerted = hilal_alert_decide(r, hist, n, a->reason, sizeof a->reason);
    }
    if (!*alerted)
        goto cleanup;
    /* The object as of this detection: its detections so far. */
    a->object.object_id = a->cand.object_id;
    for (size_t i = 0; i < n; i++)
        hilal_assoc_accumulate(&a->object, hist[i].ra, hist[i].dec, hist[i].pos_err_arcsec,
                               hist[i].snr, hist[i].mjd, hist[i].cand_id);
    if (n > 1) {
        a->history = hist;
        a->nhistory = n - 1;
        hist = NULL;
    }
    st = hilal_archive_read_cutout(ar, cand_id, &a->cutout, err);
cleanup:
    free(hist);
    if (st != HILAL_OK) {
        hilal_alert_clear(a);
        *alerted = 0;
    }
    return st;
}

/* ------------------------------------------------------------------------
 * The context
 * ------------------------------------------------------------------------ */

struct hilal_alert_ctx {
    hilal_alert_rules rules;
    hilal_alert_publisher pub;
    char name[128], ivorn[512], email[256], spool[4200];
    hilal_alert_sinks *sinks;
    int voevent;
    pthread_mutex_t mutex;
    hilal_alert_ctx_stats stats;
};

hilal_status hilal_alert_ctx_new(const hilal_config *cfg, hilal_alert_ctx **out, hilal_error *err)
{
    hilal_status st;
    hilal_alert_sinks_options so;
    *out = NULL;
    hilal_alert_ctx *c = calloc(1, sizeof *c);
    if (c == NULL)
        return hilal_error_set(err, HILAL_ERR_NOMEM, "out of memory");
    pthread_mutex_init(&c->mutex, NULL);
    st = hilal_alert_rules_from_config(cfg, &c->rules, err);
    if (st != HILAL_OK)
        goto cleanup;
    snprintf(c->name, sizeof c->name, "%s", hilal_config_get_string(cfg, "alert.publisher"));
    snprintf(c->ivorn, sizeof c->ivorn, "%s", hilal_config_get_string(cfg, "alert.ivorn"));
    snprintf(c->email, sizeof c->email, "%s", hilal_config_get_string(cfg, "alert.contact_email"));
    if (strncmp(c->ivorn, "ivo://", 6) != 0 || strchr(c->ivorn, '#') != NULL) {
        st = hilal_error_set(err, HILAL_ERR_CONFIG, "alert.ivorn '%s' must start with ivo:// and "
                             "hold no '#' (the alert id is appended after '#')", c->ivorn);
        goto cleanup;
    }
    c->pub = (hilal_alert_publisher){c->name, c->ivorn, c->email,
                                     hilal_config_get_bool(cfg, "alert.test")};
    hilal_alert_sinks_options_from_config(cfg, &so);
    c->voevent = so.write_voevent;
    /* The Kafka spool defaults to a directory next to the archive. */
    const char *apath = hilal_config_get_string(cfg, "archive.path");
    if ((so.kafka.spool_dir == NULL || so.kafka.spool_dir[0] == '\0') && apath != NULL &&
        apath[0] != '\0') {
        snprintf(c->spool, sizeof c->spool, "%s.kafka-spool", apath);
        so.kafka.spool_dir = c->spool;
    }
    st = hilal_alert_sinks_new(&so, &c->sinks, err);
cleanup:
    if (st != HILAL_OK) {
        hilal_alert_ctx_free(c);
        return st;
    }
    *out = c;
    return HILAL_OK;
}

void hilal_alert_ctx_free(hilal_alert_ctx *c)
{
    if (c == NULL)
        return;
    hilal_alert_sinks_free(c->sinks);
    pthread_mutex_destroy(&c->mutex);
    free(c);
}

hilal_alert_sinks *hilal_alert_ctx_sinks(hilal_alert_ctx *c) { return c->sinks; }

void hilal_alert_ctx_get_stats(hilal_alert_ctx *c, hilal_alert_ctx_stats *out)
{
    pthread_mutex_lock(&c->mutex);
    *out = c->stats;
    pthread_mutex_unlock(&c->mutex);
}

hilal_status hilal_alert_ctx_process(hilal_alert_ctx *c, hilal_archive *ar, int64_t first,
                                     size_t n, double t_ready_s, size_t *nalerts,
                                     hilal_error *err)
{
    hilal_status st = HILAL_OK;
    hilal_archive_cand *rows = NULL;
    size_t count = 0;
    if (nalerts != NULL)
        *nalerts = 0;
    if (n == 0)
        return HILAL_OK;
    if (t_ready_s <= 0)
        t_ready_s = hilal_alert_now_s();
    st = hilal_archive_read_candidates(ar, first, n, &rows, err);
    if (st != HILAL_OK)
        return st;
    for (size_t i = 0; i < n && st == HILAL_OK; i++) {
        hilal_alert a;
        int alerted = 0;
        char *xml = NULL;
        unsigned char *avro = NULL;
        size_t nxml = 0, navro = 0;
        /* Most candidates fail the cuts: only the others need their history. */
        if (!hilal_alert_qualifies(&c->rules, &rows[i]))
            continue;
        double t0 = hilal_alert_now_s();
        st = hilal_alert_load(ar, rows[i].cand_id, &c->rules, &a, &alerted, err);
        if (st == HILAL_OK && alerted) {
            st = hilal_avro_packet_write(&a, &c->pub, &avro, &navro, err);
            if (st == HILAL_OK && c->voevent)
                st = hilal_voevent_write(&a, &c->pub, &xml, &nxml, err);
            double t1 = hilal_alert_now_s();
            if (st == HILAL_OK)
                st = hilal_alert_sinks_deliver(c->sinks, a.alert_id, avro, navro, xml, nxml,
                                               t_ready_s, err);
            if (st == HILAL_OK) {
                count++;
                hilal_log(HILAL_LOG_INFO, "alert %lld: candidate %lld, object %lld, snr %.1f, "
                          "mag %.2f: %s (Avro %zu B)", (long long)a.alert_id,
                          (long long)a.cand.cand_id, (long long)a.cand.object_id, a.cand.snr,
                          a.cand.mag, a.reason, navro);
                pthread_mutex_lock(&c->mutex);
                c->stats.alerts++;
                c->stats.avro_bytes += navro;
                c->stats.xml_bytes += nxml;
                if (navro > c->stats.avro_max_bytes)
                    c->stats.avro_max_bytes = navro;
                if (nxml > c->stats.xml_max_bytes)
                    c->stats.xml_max_bytes = nxml;
                c->stats.build_s += t1 - t0;
                pthread_mutex_unlock(&c->mutex);
            }
        }
        free(avro);
        free(xml);
        hilal_alert_clear(&a);
    }
    pthread_mutex_lock(&c->mutex);
    c->stats.candidates += n;
    pthread_mutex_unlock(&c->mutex);
    free(rows);
    if (nalerts != NULL)
        *nalerts = count;
    return st;
}
