#include "hilal/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>

static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static hilal_log_handler log_handler;
static void *log_user;
static hilal_log_level log_max = HILAL_LOG_INFO;

void hilal_log_set_handler(hilal_log_handler handler, void *user, hilal_log_level max_level)
{
    pthread_mutex_lock(&log_lock);
    log_handler = handler;
    log_user = user;
    log_max = max_level;
    pthread_mutex_unlock(&log_lock);
}

int hilal_log_enabled(hilal_log_level level)
{
    pthread_mutex_lock(&log_lock);
    int on = log_handler != NULL && level <= log_max;
    pthread_mutex_unlock(&log_lock);
    return on;
}

void hilal_log(hilal_log_level level, const char *fmt, ...)
{
    if (!hilal_log_enabled(level))
        return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&log_lock);
    if (log_handler != NULL)
        log_handler(level, msg, log_user);
    pthread_mutex_unlock(&log_lock);
}
