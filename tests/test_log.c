/*
 * The log: control characters in logged text are escaped, and lines past the rate limit
 * are dropped and counted. Each test points stderr at a file and puts it back after.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "testutil.h"

/* stderr while a test writes the log to a file; -1 when not redirected. */
static int s_saved_stderr = -1;
static char s_path[128];

static void s_log_to_file(void)
{
    snprintf(s_path, sizeof s_path, "/tmp/unmaskd-log-test-%ld.log", (long)getpid());
    unlink(s_path);
    fflush(stderr);
    s_saved_stderr = dup(STDERR_FILENO);
    ck_assert_int_ge(s_saved_stderr, 0);
    char err[256];
    ck_assert_msg(um_log_open_file(s_path, err, sizeof err) == 0, "%s", err);
}

/* Put stderr back and return the file's text, which the caller frees. */
static char *s_log_restore(void)
{
    fflush(stderr);
    dup2(s_saved_stderr, STDERR_FILENO);
    close(s_saved_stderr);
    s_saved_stderr = -1;
    char *text = um_test_read_file(s_path, NULL);
    ck_assert_ptr_nonnull(text);
    unlink(s_path);
    return text;
}

static size_t s_count(const char *text, const char *needle)
{
    size_t n = 0;
    for (const char *at = strstr(text, needle); at; at = strstr(at + 1, needle))
        n++;
    return n;
}

/* Wait for the start of the next wall-clock second, so a burst fits in one second. */
static void s_next_second(void)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    time_t start = now.tv_sec;
    while (now.tv_sec == start) {
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
        clock_gettime(CLOCK_REALTIME, &now);
    }
}

START_TEST(log_escapes_control_characters)
{
    s_log_to_file();
    s_next_second();
    um_log_write(UM_LOG_WARN, "test\n", "id \"x\n2026-01-01T00:00:00.000Z error main: FORGED"
                 "\x1b[2J\x7f end");
    char *text = s_log_restore();
    ck_assert_ptr_nonnull(strstr(text, "test\\x0a: id \"x\\x0a2026-01-01T00:00:00.000Z error "
                                       "main: FORGED\\x1b[2J\\x7f end"));
    ck_assert_ptr_null(strstr(text, "\n2026-01-01"));
    free(text);
}
END_TEST

START_TEST(log_rate_limit_counts_dropped)
{
    s_log_to_file();
    s_next_second();
    time_t start = time(NULL);
    /* Each line takes well under a millisecond, so the burst stays inside one second. */
    const int burst = UM_LOG_MAX_PER_SECOND + 50;
    for (int i = 0; i < burst; i++)
        um_log_write(UM_LOG_WARN, "test", "burst line %d", i);
    /* Errors pass the limit. */
    um_log_write(UM_LOG_ERROR, "test", "an error in the burst");
    ck_assert_msg(time(NULL) == start, "the burst crossed a second, so the counts below "
                  "would not hold: the machine is too slow for this test");
    s_next_second();
    um_log_write(UM_LOG_WARN, "test", "the next second");
    char *text = s_log_restore();
    ck_assert_uint_eq(s_count(text, "burst line "), UM_LOG_MAX_PER_SECOND);
    ck_assert_ptr_nonnull(strstr(text, "an error in the burst"));
    ck_assert_ptr_nonnull(strstr(text, "log: 50 lines were dropped in the second before"));
    ck_assert_ptr_nonnull(strstr(text, "the next second"));
    free(text);
}
END_TEST

Suite *um_log_suite(void)
{
    Suite *s = suite_create("log");
    TCase *tc = tcase_create("log");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, log_escapes_control_characters);
    tcase_add_test(tc, log_rate_limit_counts_dropped);
    suite_add_tcase(s, tc);
    return s;
}
