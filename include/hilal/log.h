/* Logging. Library code never prints: it calls hilal_log(), which hands the
 * message to the handler installed by the program (the CLI prints to stderr).
 * Without a handler messages are dropped. Thread-safe. */
#ifndef HILAL_LOG_H
#define HILAL_LOG_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum hilal_log_level {
    HILAL_LOG_ERROR = 0,
    HILAL_LOG_WARN = 1,
    HILAL_LOG_INFO = 2,
    HILAL_LOG_DEBUG = 3
} hilal_log_level;

typedef void (*hilal_log_handler)(hilal_log_level level, const char *msg, void *user);

/* Installs the handler (NULL to drop messages) and the most verbose level passed to it. */
void hilal_log_set_handler(hilal_log_handler handler, void *user, hilal_log_level max_level);

/* Whether a message at level would reach the handler. */
int hilal_log_enabled(hilal_log_level level);

void hilal_log(hilal_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#ifdef __cplusplus
}
#endif
#endif
