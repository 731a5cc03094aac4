/*
 * Logging for the kernels, the engine, the daemon and its tools. It lives with the
 * kernels because they are the lowest layer that logs. One process-wide level; each
 * line goes to stderr, which um_log_open_file may point at a file, as
 * "2026-12-04T21:00:00.123Z info  component: message". The
 * macros test the level before evaluating their arguments, so a disabled debug line
 * costs one comparison. Thread-safe: each line is written with one fprintf call.
 */
#ifndef UM_LOG_H
#define UM_LOG_H

#include <stddef.h>

#include <unmaskd/plugin.h>

extern int um_log_threshold;

/* Set the lowest level that is printed. */
void um_log_set_level(int level);

/* Parse "debug", "info", "notice", "warn" or "error"; returns the level or -1. */
int um_log_parse_level(const char *name);

/*
 * Send the log, and everything else the process writes to stderr, to the file at path
 * (opened for appending, created with mode 0640). The file descriptor is replaced with
 * dup2, so a line is written either to the old file or to the new one. Returns 0, or -1
 * with a message naming the path in err.
 */
int um_log_open_file(const char *path, char *err, size_t errlen);

/*
 * Open the file of um_log_open_file again, after logrotate renamed it. Returns 1 when
 * it was reopened, 0 when no log file is set, -1 with a message in err when the open
 * failed (the old file stays in use). Safe to call from any one thread at a time.
 */
int um_log_reopen(char *err, size_t errlen);

/*
 * Most info, notice and warn lines written in one second. Past it lines are dropped, and
 * the next line written reports how many, so that a client sending bad requests in a loop
 * cannot fill the disk behind a log file.
 */
#define UM_LOG_MAX_PER_SECOND 200

/*
 * Write one line to stderr: time stamp, level, component and message, with control
 * characters written as \xNN so that client text cannot forge a line.
 */
void um_log_write(int level, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define UM_LOG(level, component, ...)                      \
    do {                                                   \
        if ((level) >= um_log_threshold)                   \
            um_log_write((level), (component), __VA_ARGS__); \
    } while (0)

#define um_debug(c, ...) UM_LOG(UM_LOG_DEBUG, c, __VA_ARGS__)
#define um_info(c, ...) UM_LOG(UM_LOG_INFO, c, __VA_ARGS__)
#define um_notice(c, ...) UM_LOG(UM_LOG_NOTICE, c, __VA_ARGS__)
#define um_warn(c, ...) UM_LOG(UM_LOG_WARN, c, __VA_ARGS__)
#define um_error(c, ...) UM_LOG(UM_LOG_ERROR, c, __VA_ARGS__)

/* Always-on invariant check: prints the expression, file, line and function, then aborts. */
#define UM_ASSERT(expr)                                                          \
    do {                                                                         \
        if (!(expr))                                                             \
            um_assert_fail(#expr, __FILE__, __LINE__, __func__);                 \
    } while (0)

/*
 * Format a message into err (when err is not NULL and errlen > 0) and return code, so a
 * failing function can end with `return um_fail(err, errlen, UM_EINVAL, "...", ...)`.
 */
int um_fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

_Noreturn void um_assert_fail(const char *expr, const char *file, int line, const char *func);

#endif /* UM_LOG_H */
