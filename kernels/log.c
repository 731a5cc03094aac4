/* Logging: see log.h. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int um_log_threshold = UM_LOG_INFO;

/* The file that stderr was pointed at by um_log_open_file, or NULL for the inherited one. */
static char *s_log_path;

static const char *const s_level_names[] = {"debug", "info", "notice", "warn", "error"};

void um_log_set_level(int level)
{
    um_log_threshold = level;
}

int um_log_parse_level(const char *name)
{
    for (int i = 0; i < 5; i++)
        if (strcmp(name, s_level_names[i]) == 0)
            return i;
    return -1;
}

/* Open path for appending and put it in place of stderr. */
static int s_redirect_stderr(const char *path, char *err, size_t errlen)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
    if (fd < 0)
        return um_fail(err, errlen, -1, "cannot open the log file %s: %s: check that its "
                       "folder exists and is writable by this user", path, strerror(errno));
    fflush(stderr);
    if (dup2(fd, STDERR_FILENO) < 0) {
        int e = errno;
        close(fd);
        return um_fail(err, errlen, -1, "cannot redirect stderr to the log file %s: %s", path,
                       strerror(e));
    }
    close(fd);
    return 0;
}

int um_log_open_file(const char *path, char *err, size_t errlen)
{
    char *copy = strdup(path);
    if (!copy)
        return um_fail(err, errlen, -1, "out of memory for the log file name");
    if (s_redirect_stderr(path, err, errlen) != 0) {
        free(copy);
        return -1;
    }
    free(s_log_path);
    s_log_path = copy;
    return 0;
}

int um_log_reopen(char *err, size_t errlen)
{
    if (!s_log_path)
        return 0;
    return s_redirect_stderr(s_log_path, err, errlen) == 0 ? 1 : -1;
}

/*
 * Copy src to dst with every control character written as \xNN, so that text a client
 * chose (an id, a field name) cannot start a forged log line or drive a terminal.
 */
static void s_escape_controls(char *dst, size_t size, const char *src)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = 0;
    for (const unsigned char *c = (const unsigned char *)src; *c && n + 5 < size; c++) {
        if (*c < 0x20 || *c == 0x7f) {
            dst[n++] = '\\';
            dst[n++] = 'x';
            dst[n++] = hex[*c >> 4];
            dst[n++] = hex[*c & 15];
        } else {
            dst[n++] = (char)*c;
        }
    }
    dst[n] = '\0';
}

/* Info to warn lines written in the current second, and those dropped past the cap. */
static pthread_mutex_t s_rate_lock = PTHREAD_MUTEX_INITIALIZER;
static time_t s_rate_second;
static int s_rate_lines;
static long s_rate_dropped;

/*
 * Whether a line of this level may be written now: at most UM_LOG_MAX_PER_SECOND info,
 * notice and warn lines each second, so that a client sending bad requests in a loop
 * cannot fill the disk behind --log-file. Debug lines, which an operator turns on for a
 * while, and errors always pass. *dropped gets the count dropped before this line.
 */
static int s_rate_allows(int level, time_t now, long *dropped)
{
    *dropped = 0;
    if (level == UM_LOG_DEBUG)
        return 1;
    pthread_mutex_lock(&s_rate_lock);
    if (now != s_rate_second) {
        s_rate_second = now;
        s_rate_lines = 0;
        *dropped = s_rate_dropped;
        s_rate_dropped = 0;
    }
    int allowed = level >= UM_LOG_ERROR || s_rate_lines < UM_LOG_MAX_PER_SECOND;
    if (allowed)
        s_rate_lines++;
    else
        s_rate_dropped++;
    pthread_mutex_unlock(&s_rate_lock);
    return allowed;
}

void um_log_write(int level, const char *component, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (level < 0 || level > 4)
        level = UM_LOG_ERROR;
    long dropped = 0;
    int allowed = s_rate_allows(level, ts.tv_sec, &dropped);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    if (dropped > 0)
        fprintf(stderr, "%s.%03ldZ %-6s log: %ld lines were dropped in the second before, "
                "over the limit of %d a second\n", stamp, ts.tv_nsec / 1000000L,
                s_level_names[UM_LOG_WARN], dropped, UM_LOG_MAX_PER_SECOND);
    if (!allowed)
        return;
    char safe[4 * sizeof msg];
    s_escape_controls(safe, sizeof safe, msg);
    char safe_component[256];
    s_escape_controls(safe_component, sizeof safe_component, component);
    fprintf(stderr, "%s.%03ldZ %-6s %s: %s\n", stamp, ts.tv_nsec / 1000000L,
            s_level_names[level], safe_component, safe);
}

int um_fail(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

void um_assert_fail(const char *expr, const char *file, int line, const char *func)
{
    fprintf(stderr, "assertion failed: %s at %s:%d in %s()\n", expr, file, line, func);
    abort();
}
