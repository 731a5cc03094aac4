/* Logging: see log.h. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
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

void um_log_write(int level, const char *component, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    if (level < 0 || level > 4)
        level = UM_LOG_ERROR;
    fprintf(stderr, "%s.%03ldZ %-6s %s: %s\n", stamp, ts.tv_nsec / 1000000L,
            s_level_names[level], component, msg);
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
