/*
 * Hardening tests: the real unmaskd binary under clients that disconnect, cancel and
 * misbehave, under load, under signals, and with insecure settings. Every daemon binds
 * an ipc endpoint or 127.0.0.1; the public-bind tests only check that the daemon exits
 * before it binds.
 *
 * The disconnect TCase shares one daemon started in an unchecked fixture; the other
 * tests start their own, since they stop it or need other options. ZeroMQ contexts
 * never live across a fork: each test makes and closes its own.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include <unmaskd/protocol.h>

#include "testutil.h"

extern char **environ;

/* Milliseconds a test waits for a reply that should come, before s_scaled. */
#define S_REPLY_TIMEOUT_MS 30000
/* Milliseconds within which a client without the right CURVE key must get no reply. */
#define S_SILENT_MS 1000

static um_test_daemon_t s_shared = {.pid = -1};

/*
 * Daemons a test started: the checked teardown kills those that a failed assertion
 * left running. Only pids that are still unreaped children are killed, so a pid that
 * the system gave to another process meanwhile is never touched.
 */
static pid_t s_owned[8];
static size_t s_n_owned;

/* ------------------------------------------------------------------------- */
/* Helpers                                                                   */

/*
 * The multiplier of Check's CK_TIMEOUT_MULTIPLIER, which tools/ci-valgrind.sh sets
 * because a daemon under valgrind runs many times slower; 1 without it.
 */
static double s_slowdown(void)
{
    const char *m = getenv("CK_TIMEOUT_MULTIPLIER");
    double mult = m ? atof(m) : 1.0;
    return mult >= 1.0 ? mult : 1.0;
}

/* ms stretched by s_slowdown, for waits and time bounds that the daemon's speed sets. */
static int s_scaled(int ms)
{
    return (int)(ms * s_slowdown());
}

static json_t *s_recv_must(void *sock)
{
    json_t *r = um_test_recv(sock, s_scaled(S_REPLY_TIMEOUT_MS));
    ck_assert_msg(r != NULL, "no reply within %d ms", s_scaled(S_REPLY_TIMEOUT_MS));
    return r;
}

static const char *s_type(const json_t *r)
{
    return json_string_value(json_object_get(r, "type"));
}

static const char *s_id(const json_t *r)
{
    const char *id = json_string_value(json_object_get(r, "id"));
    return id ? id : "";
}

static const char *s_error_code(const json_t *r)
{
    const char *code = json_string_value(json_object_get(json_object_get(r, "error"), "code"));
    return code ? code : "";
}

static json_t *s_call(void *sock, json_t *request)
{
    um_test_send_json(sock, request);
    return s_recv_must(sock);
}

/* Receive replies until the final one for id, dropping steps and other ids. */
static json_t *s_wait_final(void *sock, const char *id)
{
    for (;;) {
        json_t *r = s_recv_must(sock);
        if (strcmp(s_id(r), id) == 0 && strcmp(s_type(r), UM_REPLY_STEP) != 0)
            return r;
        json_decref(r);
    }
}

static json_t *s_generate(const char *id, const char *prompt, int gen_length)
{
    return json_pack("{s:s, s:s, s:s, s:i, s:i}", "op", "generate", "id", id, "prompt", prompt,
                     "gen_length", gen_length, "seed", 1);
}

/*
 * A generate that runs for many steps on the test model (128 positions): 120 tokens,
 * one per step, with guidance doubling the work of each step.
 */
static json_t *s_long_generate(const char *id, int stream)
{
    json_t *req = s_generate(id, "once upon a time", 120);
    json_object_set_new(req, "steps", json_integer(120));
    json_object_set_new(req, "cfg_scale", json_real(1.0));
    json_object_set_new(req, "stream", json_boolean(stream));
    return req;
}

static json_t *s_health(void *sock)
{
    json_t *r = s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "h"));
    ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
    return r;
}

/* Poll health until nothing runs or waits; fails the test after timeout_ms. */
static void s_wait_idle(void *sock, int timeout_ms)
{
    timeout_ms = s_scaled(timeout_ms);
    double deadline = um_test_now_ms() + timeout_ms;
    for (;;) {
        json_t *h = s_health(sock);
        int idle = json_is_false(json_object_get(h, "busy"))
                   && json_integer_value(json_object_get(h, "queue")) == 0;
        json_decref(h);
        if (idle)
            return;
        ck_assert_msg(um_test_now_ms() < deadline, "the daemon is still busy after %d ms",
                      timeout_ms);
        um_test_sleep_ms(20);
    }
}

/*
 * The number after prefix in the daemon's log, waiting up to 5 s for the line to be
 * written. Fails the test when no such line appears.
 */
static int s_log_number(const char *log, const char *prefix)
{
    double deadline = um_test_now_ms() + s_scaled(5000);
    for (;;) {
        char *text = um_test_read_file(log, NULL);
        const char *at = text ? strstr(text, prefix) : NULL;
        int n = -1;
        if (at)
            n = atoi(at + strlen(prefix));
        free(text);
        if (at)
            return n;
        ck_assert_msg(um_test_now_ms() < deadline, "the log %s has no line with \"%s\"", log,
                      prefix);
        um_test_sleep_ms(20);
    }
}

static int s_file_has(const char *path, const char *needle)
{
    char *text = um_test_read_file(path, NULL);
    int found = text && strstr(text, needle) != NULL;
    free(text);
    return found;
}

/* Start a daemon with extra arguments, for s_teardown_test to clean up after a failure. */
static void s_spawn(um_test_daemon_t *d, const char *tag, const char *const *extra)
{
    ck_assert_msg(um_test_daemon_spawn(d, tag, extra) == 0, "cannot start %s",
                  um_test_env("UM_TEST_DAEMON"));
    if (s_n_owned < sizeof s_owned / sizeof s_owned[0])
        s_owned[s_n_owned++] = d->pid;
}

static void s_teardown_test(void)
{
    for (size_t i = 0; i < s_n_owned; i++) {
        if (waitpid(s_owned[i], NULL, WNOHANG) == 0) {
            kill(s_owned[i], SIGKILL);
            waitpid(s_owned[i], NULL, 0);
        }
    }
    s_n_owned = 0;
}

/* Start a daemon with extra arguments and wait until it serves. */
static void s_start(um_test_daemon_t *d, const char *tag, const char *const *extra)
{
    s_spawn(d, tag, extra);
    ck_assert_msg(um_test_daemon_wait_ready(d, s_scaled(60000)) == 0, "unmaskd did not reply "
                  "to health on %s: see its log %s", d->endpoint, d->log);
}

/* Start a daemon that must exit at once; returns its exit status (fails on a signal). */
static int s_start_expect_exit(um_test_daemon_t *d, const char *tag, const char *const *extra)
{
    s_spawn(d, tag, extra);
    int status = um_test_daemon_wait_exit(d, s_scaled(60000));
    if (status < 0)
        um_test_daemon_stop(d, 1000);
    ck_assert_msg(status >= 0, "unmaskd did not exit: see %s", d->log);
    ck_assert_msg(WIFEXITED(status), "unmaskd died of signal %d: see %s", WTERMSIG(status),
                  d->log);
    return WEXITSTATUS(status);
}

/* Stop a daemon with SIGTERM and check that it exits with status 0. */
static void s_stop_clean(um_test_daemon_t *d)
{
    int status = um_test_daemon_stop(d, s_scaled(30000));
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "unmaskd did not exit with status 0 after SIGTERM (wait status %d): see %s",
                  status, d->log);
}

/* ------------------------------------------------------------------------- */
/* Disconnects and cancel                                                    */

static void s_setup_shared(void)
{
    /* One generation at a time, so that a second one waits in the queue. */
    const char *const extra[] = {"--max-batch", "1", NULL};
    s_start(&s_shared, "hard", extra);
}

static void s_teardown_shared(void)
{
    int status = um_test_daemon_stop(&s_shared, s_scaled(30000));
    if (status < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "unmaskd did not exit with status 0 after SIGTERM: see %s\n",
                s_shared.log);
}

/*
 * A client that closes its socket while its generation runs: the daemon notices the
 * disconnect and the generation stops within one step of it.
 */
START_TEST(test_disconnect_running)
{
    void *ctx = zmq_ctx_new();
    void *closing = um_test_dealer(ctx, s_shared.endpoint);
    um_test_send_json(closing, s_long_generate("dc1", 1));
    json_t *r = s_recv_must(closing);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);
    zmq_close(closing);

    void *sock = um_test_dealer(ctx, s_shared.endpoint);
    s_wait_idle(sock, 10000);
    int at = s_log_number(s_shared.log, "request \"dc1\": the client disconnected after ");
    int end = s_log_number(s_shared.log,
                           "request \"dc1\": generate finished with cancelled after ");
    ck_assert_int_ge(at, 1);
    ck_assert_msg(end <= at + 1, "the generation ran %d steps, the disconnect was seen after "
                  "%d: more than one step late", end, at);
    ck_assert_int_lt(end, 120);
    zmq_close(sock);
    zmq_ctx_term(ctx);
}
END_TEST

/*
 * A client that disconnects with one generation running and one waiting loses both,
 * and another client's generation queued behind them runs as usual.
 */
START_TEST(test_disconnect_waiting)
{
    void *ctx = zmq_ctx_new();
    void *closing = um_test_dealer(ctx, s_shared.endpoint);
    void *other = um_test_dealer(ctx, s_shared.endpoint);
    um_test_send_json(closing, s_long_generate("dq1", 0));
    um_test_send_json(closing, s_long_generate("dq2", 0));
    double deadline = um_test_now_ms() + s_scaled(10000);
    for (;;) {
        json_t *h = s_health(other);
        json_int_t queue = json_integer_value(json_object_get(h, "queue"));
        json_decref(h);
        if (queue == 1)
            break;
        ck_assert_msg(um_test_now_ms() < deadline, "dq2 was never queued");
        um_test_sleep_ms(10);
    }
    um_test_send_json(other, s_generate("mine", "the cat sat", 8));
    zmq_close(closing);

    json_t *r = s_wait_final(other, "mine");
    ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 8);
    json_decref(r);
    ck_assert(s_file_has(s_shared.log, "request \"dq2\": the client disconnected, so its "
                                       "waiting generate request is dropped"));
    int at = s_log_number(s_shared.log, "request \"dq1\": the client disconnected after ");
    int end = s_log_number(s_shared.log,
                           "request \"dq1\": generate finished with cancelled after ");
    ck_assert_int_le(end, at + 1);
    s_wait_idle(other, 10000);
    zmq_close(other);
    zmq_ctx_term(ctx);
}
END_TEST

/* A cancel request stops a running generation within one step of its arrival. */
START_TEST(test_cancel_within_step)
{
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, s_shared.endpoint);
    um_test_send_json(sock, s_long_generate("cw1", 1));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);
    um_test_send_json(sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x", "target",
                                      "cw1"));
    r = s_wait_final(sock, "cw1");
    ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
    ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "cancel");
    json_decref(r);
    int at = s_log_number(s_shared.log,
                          "request \"cw1\": cancel requested while it runs, after ");
    int end = s_log_number(s_shared.log,
                           "request \"cw1\": generate finished with cancelled after ");
    ck_assert_msg(end <= at + 1, "the generation ran %d steps, the cancel arrived after %d",
                  end, at);
    zmq_close(sock);
    zmq_ctx_term(ctx);
}
END_TEST

/* SIGHUP without --log-file changes nothing: the daemon logs it and keeps serving. */
START_TEST(test_hangup_without_log_file)
{
    ck_assert_int_eq(kill(s_shared.pid, SIGHUP), 0);
    s_log_number(s_shared.log, "SIGHUP: the log goes to stderr");
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, s_shared.endpoint);
    json_decref(s_health(sock));
    zmq_close(sock);
    zmq_ctx_term(ctx);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Shutdown                                                                  */

/*
 * SIGTERM with a grace period: accepted generations finish with done, a new one gets
 * busy, health reports stopping, and the daemon exits 0 once the work is done.
 */
START_TEST(test_shutdown_grace_finishes)
{
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--shutdown-grace", "60", NULL};
    s_start(&d, "grace", extra);
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);
    json_t *req = s_generate("g1", "once upon a time", 48);
    json_object_set_new(req, "stream", json_true());
    um_test_send_json(sock, req);
    um_test_send_json(sock, s_generate("g2", "the cat sat", 8));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);

    ck_assert_int_eq(kill(d.pid, SIGTERM), 0);
    /* The signal and the next requests travel separately: wait until it took effect. */
    double deadline = um_test_now_ms() + s_scaled(10000);
    for (;;) {
        r = s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "h"));
        ck_assert_str_eq(s_id(r), "h");
        int stopping = strcmp(json_string_value(json_object_get(r, "status")), "stopping") == 0;
        json_decref(r);
        if (stopping)
            break;
        ck_assert_msg(um_test_now_ms() < deadline, "health never reported stopping");
        um_test_sleep_ms(5);
    }
    r = s_call(sock, s_generate("g3", "hi", 4));
    ck_assert_str_eq(s_id(r), "g3");
    ck_assert_str_eq(s_error_code(r), UM_ERR_BUSY);
    ck_assert(strstr(json_string_value(json_object_get(json_object_get(r, "error"), "message")),
                     "shutting down") != NULL);
    json_decref(r);

    /* g1 and g2 run in one batch, so g2, the shorter, may end first. */
    int g1_done = 0, g2_done = 0;
    while (!g1_done || !g2_done) {
        r = s_recv_must(sock);
        if (strcmp(s_type(r), UM_REPLY_STEP) != 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
            if (strcmp(s_id(r), "g1") == 0) {
                ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 48);
                g1_done = 1;
            } else {
                ck_assert_str_eq(s_id(r), "g2");
                g2_done = 1;
            }
        }
        json_decref(r);
    }
    int status = um_test_daemon_wait_exit(&d, s_scaled(30000));
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "wait status %d: see %s", status, d.log);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    um_test_daemon_stop(&d, 1000);
}
END_TEST

/*
 * A grace period too short for the work: when it ends, the running and the waiting
 * generation get cancelled with reason shutdown, and the daemon exits 0.
 */
START_TEST(test_shutdown_grace_expires)
{
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--shutdown-grace", "1", NULL};
    s_start(&d, "grace1", extra);
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);
    um_test_send_json(sock, s_long_generate("run", 1));
    um_test_send_json(sock, s_long_generate("wait", 0));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);

    double t_term = um_test_now_ms();
    ck_assert_int_eq(kill(d.pid, SIGTERM), 0);
    int finals = 0;
    double t_first_final = 0;
    while (finals < 2) {
        r = s_recv_must(sock);
        if (strcmp(s_type(r), UM_REPLY_STEP) != 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
            ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "shutdown");
            if (finals++ == 0)
                t_first_final = um_test_now_ms();
        }
        json_decref(r);
    }
    /* The waiting one is cancelled when the grace ends, not before. */
    ck_assert_msg(t_first_final - t_term >= 900, "cancelled %.0f ms after SIGTERM, inside the "
                  "grace of 1 s", t_first_final - t_term);
    int status = um_test_daemon_wait_exit(&d, s_scaled(30000));
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "wait status %d: see %s", status, d.log);
    zmq_close(sock);
    zmq_ctx_term(ctx);
}
END_TEST

/* A second SIGTERM ends the grace period at once. */
START_TEST(test_shutdown_second_signal)
{
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--shutdown-grace", "600", NULL};
    s_start(&d, "grace2", extra);
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);
    um_test_send_json(sock, s_long_generate("run", 1));
    json_t *r = s_recv_must(sock);
    json_decref(r);
    ck_assert_int_eq(kill(d.pid, SIGTERM), 0);
    s_log_number(d.log, "a second stop signal cancels them at once");
    ck_assert_int_eq(kill(d.pid, SIGTERM), 0);
    r = s_wait_final(sock, "run");
    ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
    ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "shutdown");
    json_decref(r);
    int status = um_test_daemon_wait_exit(&d, s_scaled(30000));
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "wait status %d: see %s", status, d.log);
    zmq_close(sock);
    zmq_ctx_term(ctx);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Log file                                                                  */

/*
 * --log-file and SIGHUP, as logrotate uses them: the file is renamed, SIGHUP makes the
 * daemon open a new one under the old name, and later lines go there.
 */
START_TEST(test_log_reopen)
{
    char path[600], rotated[620];
    snprintf(path, sizeof path, "/tmp/unmaskd-hup-%ld.log", (long)getpid());
    snprintf(rotated, sizeof rotated, "%s.1", path);
    unlink(path);
    unlink(rotated);
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--log-file", path, NULL};
    s_start(&d, "hup", extra);
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);
    json_decref(s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "before")));
    ck_assert_msg(s_file_has(path, "request \"before\": health started"), "see %s", path);

    ck_assert_int_eq(rename(path, rotated), 0);
    ck_assert_int_eq(kill(d.pid, SIGHUP), 0);
    s_log_number(path, "SIGHUP: log file reopened");
    json_decref(s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "after")));
    ck_assert_msg(s_file_has(path, "request \"after\": health started"), "see %s", path);
    ck_assert(!s_file_has(path, "request \"before\""));
    ck_assert(!s_file_has(rotated, "request \"after\""));
    ck_assert(s_file_has(rotated, "request \"before\": health started"));
    zmq_close(sock);
    zmq_ctx_term(ctx);
    s_stop_clean(&d);
    unlink(path);
    unlink(rotated);

    /* A log file that cannot be opened stops the daemon before anything else. */
    const char *const bad[] = {"--log-file", "/nonexistent/folder/unmaskd.log", NULL};
    ck_assert_int_eq(s_start_expect_exit(&d, "hupbad", bad), 1);
    ck_assert_msg(s_file_has(d.log, "cannot open the log file /nonexistent/folder/unmaskd.log"),
                  "see %s", d.log);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Security: binds and CURVE                                                 */

/* Run argv to completion with stderr in log; returns the exit status, -1 on a signal. */
static int s_run(const char *const *argv, const char *log)
{
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, log, O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    ck_assert_int_eq(rc, 0);
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Read the endpoint from the daemon's "listening on ENDPOINT" line into d->endpoint. */
static void s_read_listening(um_test_daemon_t *d)
{
    double deadline = um_test_now_ms() + s_scaled(60000);
    for (;;) {
        char *log = um_test_read_file(d->log, NULL);
        const char *at = log ? strstr(log, "listening on ") : NULL;
        if (at)
            sscanf(at + strlen("listening on "), "%159s", d->endpoint);
        free(log);
        if (at)
            return;
        ck_assert_msg(um_test_now_ms() < deadline && waitpid(d->pid, NULL, WNOHANG) == 0,
                      "unmaskd never reported its endpoint: see %s", d->log);
        um_test_sleep_ms(20);
    }
}

/*
 * A tcp endpoint that other hosts could reach is refused without CURVE keys, before
 * the daemon loads anything or binds. "lo" counts too: the check does not resolve
 * interface names.
 */
START_TEST(test_bind_public_refused)
{
    static const char *const endpoints[] = {"tcp://0.0.0.0:5557", "tcp://*:5557",
                                            "tcp://[::]:5557", "tcp://lo:5557",
                                            "ws://0.0.0.0:5557"};
    for (size_t i = 0; i < sizeof endpoints / sizeof endpoints[0]; i++) {
        um_test_daemon_t d = {.pid = -1};
        const char *const extra[] = {"--bind", endpoints[i], NULL};
        ck_assert_int_eq(s_start_expect_exit(&d, "public", extra), 2);
        char want[128];
        snprintf(want, sizeof want, "--bind %s accepts connections from other hosts",
                 endpoints[i]);
        ck_assert_msg(s_file_has(d.log, want), "%s: see %s", endpoints[i], d.log);
        ck_assert_msg(s_file_has(d.log, "give --curve-key FILE")
                          && s_file_has(d.log, "bind to 127.0.0.1 or an ipc:// path")
                          && s_file_has(d.log, "add --insecure"),
                      "the message does not name the fixes: see %s", d.log);
        ck_assert_msg(!s_file_has(d.log, "starting"), "the daemon started: see %s", d.log);
    }
}
END_TEST

/* An ipc path that is a regular file is not replaced by the bind, and the file stays. */
START_TEST(test_bind_ipc_regular_file)
{
    char path[256];
    snprintf(path, sizeof path, "/tmp/unmaskd-notes-%ld.txt", (long)getpid());
    FILE *f = fopen(path, "w");
    ck_assert(f != NULL);
    fputs("data\n", f);
    fclose(f);
    char endpoint[300];
    snprintf(endpoint, sizeof endpoint, "ipc://%s", path);
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--bind", endpoint, NULL};
    ck_assert_int_ne(s_start_expect_exit(&d, "ipcfile", extra), 0);
    char want[400];
    snprintf(want, sizeof want, "%s exists and is a file, not a socket", path);
    ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
    char *data = um_test_read_file(path, NULL);
    ck_assert_msg(data != NULL, "the bind removed %s", path);
    ck_assert_str_eq(data, "data\n");
    free(data);
    unlink(path);
}
END_TEST

/* --insecure lets such an endpoint through: "lo" binds loopback only, so it is safe here. */
START_TEST(test_bind_insecure)
{
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--bind", "tcp://lo:0", "--insecure", NULL};
    s_spawn(&d, "insecure", extra);
    s_read_listening(&d);
    ck_assert_msg(strncmp(d.endpoint, "tcp://127.0.0.1:", 16) == 0, "bound %s", d.endpoint);
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);
    json_decref(s_health(sock));
    zmq_close(sock);
    zmq_ctx_term(ctx);
    s_stop_clean(&d);
}
END_TEST

/* Keys of one CURVE party, read from the .key file that unmask-broker --keygen writes. */
typedef struct s_keys {
    char public_key[41];
    char secret_key[41];
} s_keys_t;

static void s_keygen(const char *dir, const char *name, s_keys_t *keys)
{
    char base[512], log[600];
    snprintf(base, sizeof base, "%s/%s", dir, name);
    snprintf(log, sizeof log, "%s/keygen.log", dir);
    const char *const argv[] = {um_test_env("UM_TEST_BROKER"), "--keygen", base, NULL};
    ck_assert_int_eq(s_run(argv, log), 0);
    char path[600];
    snprintf(path, sizeof path, "%s.key", base);
    char *text = um_test_read_file(path, NULL);
    ck_assert(text != NULL);
    const char *pub = strstr(text, "public-key = \"");
    const char *sec = strstr(text, "secret-key = \"");
    ck_assert(pub && sec);
    sscanf(pub + 14, "%40s", keys->public_key);
    sscanf(sec + 14, "%40s", keys->secret_key);
    free(text);
}

/*
 * Whether a DEALER gets a reply to health within S_SILENT_MS: as a CURVE client of a
 * server with key server_key and key pair own, or in clear text when server_key is NULL.
 */
static int s_curve_health(void *ctx, const char *endpoint, const char *server_key,
                          const s_keys_t *own)
{
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (server_key) {
        zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_key, 41);
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, own->public_key, 41);
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, own->secret_key, 41);
    }
    ck_assert_int_eq(zmq_connect(sock, endpoint), 0);
    const char *health = "{\"op\":\"health\",\"id\":\"c\"}";
    zmq_send(sock, health, strlen(health), ZMQ_DONTWAIT);
    json_t *r = um_test_recv(sock, S_SILENT_MS);
    int ok = r != NULL;
    json_decref(r);
    zmq_close(sock);
    return ok;
}

/*
 * CURVE on the daemon's own tcp socket. With --curve-clients only listed keys get
 * replies, and a client in clear text or with another key gets none. info reports it.
 */
START_TEST(test_curve_bind)
{
    char dir[256], clients[300], server_key_file[300], path[400];
    snprintf(dir, sizeof dir, "/tmp/unmaskd-curve-%ld", (long)getpid());
    snprintf(clients, sizeof clients, "%s/clients", dir);
    mkdir(dir, 0700);
    mkdir(clients, 0700);
    s_keys_t server, client, stranger;
    s_keygen(dir, "server", &server);
    s_keygen(dir, "client", &client);
    s_keygen(dir, "stranger", &stranger);
    snprintf(path, sizeof path, "%s/client.pub", dir);
    char *pub = um_test_read_file(path, NULL);
    ck_assert(pub != NULL);
    snprintf(path, sizeof path, "%s/client.pub", clients);
    FILE *f = fopen(path, "w");
    ck_assert(f != NULL);
    fputs(pub, f);
    fclose(f);
    /* Not left to the umask: a key file others may write is rejected. */
    ck_assert_int_eq(chmod(path, 0644), 0);
    free(pub);
    snprintf(server_key_file, sizeof server_key_file, "%s/server.key", dir);

    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--bind", "tcp://127.0.0.1:0", "--curve-key", server_key_file,
                                 "--curve-clients", clients, NULL};
    s_spawn(&d, "curve", extra);
    s_read_listening(&d);
    void *ctx = zmq_ctx_new();
    ck_assert_msg(s_curve_health(ctx, d.endpoint, server.public_key, &client),
                  "the listed client got no reply: see %s", d.log);
    ck_assert_msg(!s_curve_health(ctx, d.endpoint, NULL, NULL),
                  "a client without CURVE got a reply");
    ck_assert_msg(!s_curve_health(ctx, d.endpoint, server.public_key, &stranger),
                  "a client whose key is not in %s got a reply", clients);
    ck_assert_msg(!s_curve_health(ctx, d.endpoint, stranger.public_key, &client),
                  "a client that expects another server key got a reply");

    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server.public_key, 41);
    zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, client.public_key, 41);
    zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, client.secret_key, 41);
    zmq_connect(sock, d.endpoint);
    json_t *info = s_call(sock, json_pack("{s:s, s:s}", "op", "info", "id", "i"));
    ck_assert(json_is_true(json_object_get(info, "curve")));
    json_decref(info);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    s_stop_clean(&d);

    /* A key folder that other users may write is refused: they could add their own key. */
    ck_assert_int_eq(chmod(clients, 0777), 0);
    um_test_daemon_t open_keys = {.pid = -1};
    ck_assert_int_ne(s_start_expect_exit(&open_keys, "curveperm", extra), 0);
    ck_assert_msg(s_file_has(open_keys.log, "is writable by other users (mode 0777), who could "
                             "add their own key: run chmod go-w"),
                  "the log %s lacks the key folder's permissions", open_keys.log);
    ck_assert_int_eq(chmod(clients, 0700), 0);

    static const char *const files[] = {"server.key", "server.pub", "client.key", "client.pub",
                                        "stranger.key", "stranger.pub", "keygen.log",
                                        "clients/client.pub"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(clients);
    rmdir(dir);
}
END_TEST

/* Option combinations that make no sense, and a key file that is not there. */
START_TEST(test_curve_options)
{
    static const struct {
        const char *args[5];
        int status;
        const char *message;
    } cases[] = {
        {{"--curve-clients", "/tmp", NULL}, 2, "--curve-clients needs --curve-key"},
        {{"--curve-server-key", "/tmp/x.pub", NULL}, 2, "apply to a worker only"},
        {{"--curve-key", "/nonexistent/server.key", NULL}, 1, "/nonexistent/server.key"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        um_test_daemon_t d = {.pid = -1};
        ck_assert_int_eq(s_start_expect_exit(&d, "curveopt", cases[i].args), cases[i].status);
        ck_assert_msg(s_file_has(d.log, cases[i].message), "case %zu: the log %s lacks \"%s\"",
                      i, d.log, cases[i].message);
    }

    /* A worker (no --bind, which excludes --connect) takes no bind-side options. */
    char log[512];
    snprintf(log, sizeof log, "/tmp/unmaskd-worker-opts-%ld.log", (long)getpid());
    const char *const worker[] = {um_test_env("UM_TEST_DAEMON"), "--connect",
                                  "ipc:///tmp/unmaskd-nobroker.sock", "--insecure", NULL};
    ck_assert_int_eq(s_run(worker, log), 2);
    ck_assert_msg(s_file_has(log, "--curve-clients and --insecure apply to --bind only"),
                  "see %s", log);
    unlink(log);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Security: plugin folders                                                  */

static void s_copy_file(const char *from, const char *to, mode_t mode)
{
    size_t len = 0;
    char *data = um_test_read_file(from, &len);
    ck_assert_msg(data != NULL, "cannot read %s", from);
    unlink(to);
    FILE *f = fopen(to, "wb");
    ck_assert_msg(f != NULL, "cannot write %s", to);
    ck_assert_uint_eq(fwrite(data, 1, len, f), len);
    fclose(f);
    free(data);
    ck_assert_int_eq(chmod(to, mode), 0);
}

/*
 * Plugin folders and files that other users may write are skipped with a message that
 * names the path and the chmod that fixes it. The same plugin in a safe folder loads.
 */
START_TEST(test_plugin_permissions)
{
    char base[256];
    snprintf(base, sizeof base, "/tmp/unmaskd-plugperm-%ld", (long)getpid());
    mkdir(base, 0755);
    ck_assert_int_eq(chmod(base, 0755), 0);
    static const struct {
        const char *name;
        mode_t dir_mode;
        mode_t file_mode;
        gid_t file_gid; /* (gid_t)-1: unchanged */
    } dirs[] = {
        {"open", 0777, 0644, (gid_t)-1},
        {"file", 0755, 0646, (gid_t)-1},
        {"group", 0755, 0664, 100}, /* "users" on Debian, not the daemon's group */
        {"good", 0755, 0664, (gid_t)-1},
        {"owner", 0755, 0644, (gid_t)-1}, /* given to user "nobody" below, when root */
        {"loose", 0777, 0644, (gid_t)-1}, /* the folder above a plugin folder */
    };
    char paths[6][300], files[6][1900]; /* gcc bounds paths[i] by the whole array */
    const char *extra[16];
    size_t n_extra = 0;
    int group_tested = 0;
    const char *fixture = um_test_path(um_test_env("UM_TEST_BAD_PLUGINS"), "abi10.so");
    char fixture_copy[4096];
    snprintf(fixture_copy, sizeof fixture_copy, "%s", fixture);
    for (size_t i = 0; i < 6; i++) {
        snprintf(paths[i], sizeof paths[i], "%s/%s", base, dirs[i].name);
        snprintf(files[i], sizeof files[i], "%s/abi10.so", paths[i]);
        mkdir(paths[i], 0755);
        s_copy_file(fixture_copy, files[i], dirs[i].file_mode);
        ck_assert_int_eq(chmod(paths[i], dirs[i].dir_mode), 0);
        if (dirs[i].file_gid != (gid_t)-1) {
            /* Only root, or a member of that group, may change a file's group. */
            group_tested = dirs[i].file_gid != getegid()
                           && chown(files[i], (uid_t)-1, dirs[i].file_gid) == 0;
            if (!group_tested)
                chmod(files[i], 0644);
        }
        if (i < 4) {
            extra[n_extra++] = "--plugin-dir";
            extra[n_extra++] = paths[i];
        }
    }
    /* A folder owned by user "nobody": that user could swap the plugins. */
    int owner_tested = chown(paths[4], 65534, (gid_t)-1) == 0;
    if (owner_tested) {
        extra[n_extra++] = "--plugin-dir";
        extra[n_extra++] = paths[4];
    } else {
        fprintf(stderr, "test_plugin_permissions: cannot give a folder to user nobody (not "
                "root), so the owner case is not tested\n");
    }
    /* A good folder inside one every user may write: anyone could rename it away. */
    char nested[400], nested_file[500];
    snprintf(nested, sizeof nested, "%s/pl", paths[5]);
    mkdir(nested, 0755);
    ck_assert_int_eq(chmod(nested, 0755), 0);
    snprintf(nested_file, sizeof nested_file, "%s/abi10.so", nested);
    s_copy_file(fixture_copy, nested_file, 0644);
    extra[n_extra++] = "--plugin-dir";
    extra[n_extra++] = nested;
    extra[n_extra] = NULL;
    if (!group_tested)
        fprintf(stderr, "test_plugin_permissions: cannot give a file group 100 here, so the "
                "group-writable case is not tested\n");

    um_test_daemon_t d = {.pid = -1};
    s_start(&d, "plugperm", extra);
    char want[4096];
    snprintf(want, sizeof want, "skipped: plugin folder %s is writable by every user (mode "
             "0777), so anyone could make unmaskd run their code: run chmod o-w %s", paths[0],
             paths[0]);
    ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
    snprintf(want, sizeof want, "rejected %s: plugin file %s is writable by every user (mode "
             "0646)", files[1], files[1]);
    ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
    snprintf(want, sizeof want, "run chmod o-w %s", files[1]);
    ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
    if (group_tested) {
        snprintf(want, sizeof want, "rejected %s: plugin file %s is writable by group 100 "
                 "(mode 0664)", files[2], files[2]);
        ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
        snprintf(want, sizeof want, "run chmod g-w %s", files[2]);
        ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
    }
    if (owner_tested) {
        snprintf(want, sizeof want, "skipped: plugin folder %s is owned by user 65534, who is "
                 "neither root nor unmaskd's user", paths[4]);
        ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
    }
    snprintf(want, sizeof want, "skipped: folder above the plugins %s is writable by every "
             "user (mode 0777)", paths[5]);
    ck_assert_msg(s_file_has(d.log, want), "the log %s lacks \"%s\"", d.log, want);
    snprintf(want, sizeof want, "(ABI 1.0) from %s", files[3]);
    ck_assert_msg(s_file_has(d.log, "loaded remask plugin fixture_abi10 ")
                      && s_file_has(d.log, want),
                  "the log %s lacks the plugin loaded from %s", d.log, files[3]);

    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);
    json_t *req = s_generate("abi10", "once upon a time", 4);
    json_object_set_new(req, "remasking", json_string("fixture_abi10"));
    json_t *r = s_call(sock, req);
    ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
    json_decref(r);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    s_stop_clean(&d);
    unlink(nested_file);
    rmdir(nested);
    for (size_t i = 0; i < 6; i++) {
        chmod(paths[i], 0755);
        unlink(files[i]);
        rmdir(paths[i]);
    }
    rmdir(base);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Limits                                                                    */

/* Expect an error reply with code, field and a piece of the message. */
static void s_expect_error(void *sock, json_t *req, const char *code, const char *field,
                           const char *message)
{
    json_t *r = s_call(sock, req);
    ck_assert_msg(strcmp(s_type(r), UM_REPLY_ERROR) == 0, "expected an error for %s, got %s",
                  field ? field : "the request", s_type(r));
    json_t *e = json_object_get(r, "error");
    ck_assert_str_eq(json_string_value(json_object_get(e, "code")), code);
    if (field)
        ck_assert_str_eq(json_string_value(json_object_get(e, "field")), field);
    const char *msg = json_string_value(json_object_get(e, "message"));
    ck_assert_msg(msg && strstr(msg, message), "message \"%s\" lacks \"%s\"", msg, message);
    json_decref(r);
}

static void s_expect_generates(void *sock)
{
    json_t *r = s_call(sock, s_generate("ok", "the cat sat", 4));
    ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
    json_decref(r);
}

/*
 * The operator's limits: info lists them, each one rejects a request past it with the
 * option to change, the size limits hold, and a full queue replies busy at once.
 */
START_TEST(test_limits)
{
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--max-prompt-tokens", "8", "--max-gen-length", "16",
                                 "--max-steps", "8", "--max-queue", "1", "--max-batch", "1",
                                 "--max-request-size", "2048", NULL};
    s_start(&d, "limits", extra);
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d.endpoint);

    json_t *info = s_call(sock, json_pack("{s:s, s:s}", "op", "info", "id", "i"));
    json_t *limits = json_object_get(info, "limits");
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_prompt_tokens")), 8);
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_gen_length")), 16);
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_steps")), 8);
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_queue")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_batch")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_request_bytes")), 2048);
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_messages")), 1024);
    ck_assert(json_is_false(json_object_get(info, "curve")));
    json_decref(info);

    s_expect_error(sock, s_generate("p", "once upon a time there was a little girl named lily",
                                    4),
                   UM_ERR_OUT_OF_RANGE, "prompt", "over this daemon's limit of 8 "
                   "(--max-prompt-tokens): shorten it");
    s_expect_generates(sock);
    s_expect_error(sock, s_generate("g", "hi", 17), UM_ERR_OUT_OF_RANGE, "gen_length",
                   "gen_length is 17, over this daemon's limit of 16 (--max-gen-length)");
    s_expect_generates(sock);
    s_expect_error(sock, json_pack("{s:s, s:s, s:s}", "op", "generate", "id", "gd", "prompt",
                                   "hi"),
                   UM_ERR_OUT_OF_RANGE, "gen_length", "gen_length defaults to 64, over this "
                   "daemon's limit of 16 (--max-gen-length)");
    json_t *req = s_generate("s", "hi", 16);
    json_object_set_new(req, "steps", json_integer(9));
    s_expect_error(sock, req, UM_ERR_OUT_OF_RANGE, "steps",
                   "steps is 9, over this daemon's limit of 8 (--max-steps)");
    s_expect_generates(sock);
    /* Client text reaches the log with its control characters escaped: no forged line. */
    s_expect_error(sock, s_generate("x\n2026-01-01T00:00:00.000Z error  main: FORGED", "hi", 0),
                   UM_ERR_OUT_OF_RANGE, "gen_length", "must be at least 1");
    ck_assert_msg(s_file_has(d.log, "x\\x0a2026-01-01T00:00:00.000Z error  main: FORGED"),
                  "the log %s lacks the escaped id", d.log);
    ck_assert_msg(!s_file_has(d.log, "\n2026-01-01T00:00:00.000Z"), "the log %s has a forged "
                  "line", d.log);
    /* A NUL character inside a name would match the name before it. */
    s_expect_error(sock, json_pack("{s:o, s:s}", "op", json_stringn("health\0zz", 9), "id", "n"),
                   UM_ERR_INVALID, "op", "op contains a NUL character (\\u0000) at byte 6");
    json_t *nul = s_generate("n2", "hi", 4);
    json_object_set_new(nul, "remasking", json_stringn("low_confidence\0x", 16));
    s_expect_error(sock, nul, UM_ERR_INVALID, "remasking", "remasking contains a NUL character");
    s_expect_generates(sock);
    /* Steps default to gen_length, and the error states that default rather than a value
       the client never sent. */
    s_expect_error(sock, s_generate("d", "hi", 16), UM_ERR_OUT_OF_RANGE, "steps",
                   "steps defaults to gen_length, 16, over this daemon's limit of 8 "
                   "(--max-steps): send \"steps\" of at most 8");
    s_expect_generates(sock);

    /* A number JSON parsers cannot hold: the field and the largest value are named. */
    const char *too_big = "{\"op\":\"generate\",\"id\":\"h\",\"prompt\":\"hi\","
                       "\"seed\":9223372036854775808}";
    ck_assert_int_eq(zmq_send(sock, too_big, strlen(too_big), 0), (int)strlen(too_big));
    json_t *hr = s_recv_must(sock);
    ck_assert_str_eq(s_error_code(hr), UM_ERR_BAD_JSON);
    json_t *he = json_object_get(hr, "error");
    ck_assert_str_eq(json_string_value(json_object_get(he, "field")), "seed");
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(he, "message")),
                                 "past the 64-bit range"));
    json_decref(hr);

    /* Over --max-request-size: an error reply. */
    char big[3001];
    int head = snprintf(big, sizeof big, "{\"op\":\"tokenize\",\"id\":\"big\",\"text\":\"");
    memset(big + head, 'a', sizeof big - 1 - (size_t)head - 2);
    memcpy(big + sizeof big - 3, "\"}", 3);
    ck_assert_int_eq(zmq_send(sock, big, sizeof big - 1, 0), (int)sizeof big - 1);
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_error_code(r), UM_ERR_INVALID);
    json_decref(r);

    /* Over 16 times the limit: ZeroMQ drops that connection, the daemon serves on. */
    void *rude = um_test_dealer(ctx, d.endpoint);
    size_t huge_len = 16 * 2048 + 4096;
    char *huge = calloc(1, huge_len);
    ck_assert_int_eq(zmq_send(rude, huge, huge_len, 0), (int)huge_len);
    free(huge);
    r = um_test_recv(rude, S_SILENT_MS);
    ck_assert_msg(r == NULL, "a frame over the hard limit got a reply");
    zmq_close(rude);
    s_expect_generates(sock);

    /* A full queue replies busy at once, while the first generation still runs. */
    for (int i = 0; i < 2; i++) {
        json_t *g = s_generate(i == 0 ? "q1" : "q2", "once upon a time", 16);
        json_object_set_new(g, "steps", json_integer(8));
        json_object_set_new(g, "cfg_scale", json_real(1.0));
        um_test_send_json(sock, g);
    }
    double t_sent = um_test_now_ms();
    um_test_send_json(sock, s_generate("q3", "hi", 4));
    int q1 = 0, q2 = 0;
    for (;;) {
        r = s_recv_must(sock);
        if (strcmp(s_id(r), "q3") == 0) {
            ck_assert_str_eq(s_error_code(r), UM_ERR_BUSY);
            ck_assert_msg(!q1, "q1 finished before the busy reply to q3");
            ck_assert_msg(um_test_now_ms() - t_sent < s_scaled(1000), "busy took %.0f ms",
                          um_test_now_ms() - t_sent);
            json_decref(r);
            break;
        }
        q1 += strcmp(s_id(r), "q1") == 0;
        q2 += strcmp(s_id(r), "q2") == 0;
        json_decref(r);
    }
    while (!q1 || !q2) {
        r = s_recv_must(sock);
        q1 += strcmp(s_id(r), "q1") == 0;
        q2 += strcmp(s_id(r), "q2") == 0;
        json_decref(r);
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    s_stop_clean(&d);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Load                                                                      */

/* Clients, in four roles of four clients each (s_load_role_t). */
#define S_LOAD_CLIENTS 16
/* Milliseconds during which clients send requests; RSS is sampled at half and at the end. */
#define S_LOAD_MS 8000
/* Milliseconds allowed after that for the last final replies. */
#define S_LOAD_DRAIN_MS 15000
/* Requests a client keeps in flight. */
#define S_LOAD_IN_FLIGHT 2
/* Every Nth streamed generation, the client disconnects after its first step. */
#define S_LOAD_DISCONNECT_EVERY 6
/*
 * Milliseconds a bad-request or cheap-op client waits after each final reply, and a
 * generating client after "busy". Without the pause, error replies would take most of
 * the daemon's main thread, and the run would measure their rate rather than a mix.
 */
#define S_LOAD_PAUSE_MS 20
#define S_LOAD_BUSY_PAUSE_MS 50
/*
 * Largest growth of the daemon's RSS from the middle to the end of the run, in KiB.
 * The daemon batches the running requests, and each new mix of them gives its matrix
 * products a new row count. So the caches of matmul primitives may still be filling in
 * the second half: ours, bounded at UM_GEMM_MAX_CACHED, and oneDNN's own. That growth
 * was 0.5 to 2.8 MiB in 8 s runs on a 2-core VM, and 184 KiB from 15 s to 30 s
 * in a 30 s run, which is saturation rather than a leak. The second half sends about
 * 90000 requests, so a leak of 48 bytes per request crosses the bound, and a job or a
 * parsed request takes more than a kilobyte.
 */
#define S_LOAD_RSS_BOUND_KIB 4096

typedef enum s_load_role {
    S_ROLE_STREAM, /* streamed generations; some clients disconnect mid-generation */
    S_ROLE_CANCEL, /* a generation and a cancel of it, back to back */
    S_ROLE_BAD,    /* bad requests of every kind */
    S_ROLE_CHEAP,  /* health, info, tokenize, detokenize */
} s_load_role_t;

/* What a request is, which decides the final replies that are valid for it. */
typedef enum s_load_kind {
    S_KIND_STREAM,
    S_KIND_GENERATE,
    S_KIND_CANCEL,
    S_KIND_BAD,
    S_KIND_CHEAP,
} s_load_kind_t;

/* A request waiting for its final reply. */
typedef struct s_load_pending {
    char id[24];       /* "" when the reply's id is null (the daemon could not read one) */
    s_load_kind_t kind;
    const char *code;  /* S_KIND_BAD: the expected error code */
    int gen_length;    /* generations: the token count of a done reply */
    int steps;         /* step replies seen */
    int disconnect;    /* S_KIND_STREAM: disconnect after the first step */
} s_load_pending_t;

typedef struct s_load_client {
    void *sock;
    s_load_role_t role;
    unsigned next_id;  /* ids "r0", "r1", ...: the same ids on every client */
    unsigned n_stream; /* streamed generations sent */
    double next_send_ms; /* um_test_now_ms() before which it sends nothing */
    s_load_pending_t pending[S_LOAD_IN_FLIGHT];
    int n_pending;
} s_load_client_t;

typedef struct s_load_totals {
    unsigned sent, finals, steps, abandoned, disconnects;
    unsigned done, cancelled, busy, not_found, bad;
} s_load_totals_t;

/* A bad request of the BAD role: its text ("%s" takes the id), frames and reply code. */
typedef struct s_bad_request {
    const char *text;
    int frames;        /* the text is sent this many times as one multipart message */
    int null_id;       /* the daemon cannot read the id, so the reply's id is null */
    const char *code;
} s_bad_request_t;

static const s_bad_request_t s_bad_requests[] = {
    {"{\"op\": \"generate\", \"id\": \"%s\"", 1, 1, UM_ERR_BAD_JSON},
    {"{\"op\":\"generate\",\"id\":\"%s\",\"prompt\":\"hi\",\"gen_lenght\":4}", 1, 0,
     UM_ERR_UNKNOWN_FIELD},
    {"{\"op\":\"launch\",\"id\":\"%s\"}", 1, 0, UM_ERR_UNKNOWN_OP},
    {"{\"op\":\"generate\",\"id\":\"%s\",\"prompt\":\"hi\",\"top_p\":0}", 1, 0,
     UM_ERR_OUT_OF_RANGE},
    {"{\"op\":\"generate\",\"id\":\"%s\",\"prompt\":\"\xff\"}", 1, 1, UM_ERR_BAD_JSON},
    {"{\"op\":\"generate\",\"id\":\"%s\",\"prompt\":\"hi\",\"remasking\":\"nope\"}", 1, 0,
     UM_ERR_UNKNOWN_PLUGIN},
    {"{\"op\":\"health\",\"id\":\"%s\"}", 2, 1, UM_ERR_INVALID},
    {"{\"op\":\"generate\",\"prompt\":\"hi\"}", 1, 0, UM_ERR_INVALID},
};

static s_load_pending_t *s_load_add(s_load_client_t *c, s_load_totals_t *t, s_load_kind_t kind)
{
    ck_assert_int_lt(c->n_pending, S_LOAD_IN_FLIGHT);
    s_load_pending_t *p = &c->pending[c->n_pending++];
    memset(p, 0, sizeof *p);
    p->kind = kind;
    snprintf(p->id, sizeof p->id, "r%u", c->next_id++);
    t->sent++;
    return p;
}

/* Send the client's next request(s) while it has room in flight. */
static void s_load_send(s_load_client_t *c, s_load_totals_t *t)
{
    if (um_test_now_ms() < c->next_send_ms)
        return;
    if (c->role == S_ROLE_CANCEL) {
        if (c->n_pending > 0)
            return;
        s_load_pending_t *g = s_load_add(c, t, S_KIND_GENERATE);
        g->gen_length = 16;
        json_t *req = s_generate(g->id, "once upon a time", 16);
        um_test_send_json(c->sock, req);
        char target[24];
        snprintf(target, sizeof target, "%s", g->id);
        s_load_pending_t *x = s_load_add(c, t, S_KIND_CANCEL);
        um_test_send_json(c->sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", x->id,
                                             "target", target));
        return;
    }
    while (c->n_pending < S_LOAD_IN_FLIGHT) {
        if (c->role == S_ROLE_STREAM) {
            s_load_pending_t *p = s_load_add(c, t, S_KIND_STREAM);
            p->gen_length = 8;
            p->disconnect = ++c->n_stream % S_LOAD_DISCONNECT_EVERY == 0;
            json_t *req = s_generate(p->id, "the cat sat", 8);
            json_object_set_new(req, "stream", json_true());
            um_test_send_json(c->sock, req);
        } else if (c->role == S_ROLE_BAD) {
            const s_bad_request_t *b =
                &s_bad_requests[c->next_id % (sizeof s_bad_requests / sizeof s_bad_requests[0])];
            s_load_pending_t *p = s_load_add(c, t, S_KIND_BAD);
            p->code = b->code;
            char text[256];
            int len = snprintf(text, sizeof text, b->text, p->id);
            if (b->null_id || !strstr(b->text, "%s"))
                p->id[0] = '\0';
            for (int f = 0; f < b->frames; f++)
                ck_assert_int_eq(zmq_send(c->sock, text, (size_t)len,
                                          f + 1 < b->frames ? ZMQ_SNDMORE : 0), len);
        } else {
            s_load_pending_t *p = s_load_add(c, t, S_KIND_CHEAP);
            static const char *const ops[] = {"health", "info", "tokenize", "detokenize"};
            const char *op = ops[c->next_id % 4];
            json_t *req = json_pack("{s:s, s:s}", "op", op, "id", p->id);
            if (strcmp(op, "tokenize") == 0)
                json_object_set_new(req, "text", json_string("once upon a time"));
            else if (strcmp(op, "detokenize") == 0)
                json_object_set_new(req, "tokens", json_pack("[i, i, i]", 10, 20, 30));
            um_test_send_json(c->sock, req);
        }
    }
}

/* Check a final reply against what its request allows, and count it. */
static void s_load_final(int client, const s_load_pending_t *p, const json_t *r,
                         s_load_totals_t *t)
{
    const char *type = s_type(r);
    const char *code = s_error_code(r);
    t->finals++;
    if (strcmp(type, UM_REPLY_DONE) == 0 && (p->kind == S_KIND_STREAM
                                             || p->kind == S_KIND_GENERATE)) {
        ck_assert_msg(json_array_size(json_object_get(r, "tokens")) == (size_t)p->gen_length,
                      "client %d, %s: a done reply with %zu tokens, the request asked for %d",
                      client, p->id, json_array_size(json_object_get(r, "tokens")),
                      p->gen_length);
        if (p->kind == S_KIND_STREAM)
            ck_assert_msg(p->steps >= 1, "client %d, %s: done without a step", client, p->id);
        t->done++;
        return;
    }
    if (strcmp(code, UM_ERR_BUSY) == 0 && (p->kind == S_KIND_STREAM
                                          || p->kind == S_KIND_GENERATE)) {
        t->busy++;
        return;
    }
    switch (p->kind) {
    case S_KIND_GENERATE:
        ck_assert_msg(strcmp(type, UM_REPLY_CANCELLED) == 0, "client %d, %s: %s %s", client,
                      p->id, type, code);
        ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "cancel");
        t->cancelled++;
        return;
    case S_KIND_CANCEL:
        if (strcmp(type, UM_REPLY_DONE) != 0) {
            ck_assert_msg(strcmp(code, UM_ERR_NOT_FOUND) == 0, "client %d, cancel %s: %s %s",
                          client, p->id, type, code);
            t->not_found++;
        }
        return;
    case S_KIND_BAD:
        ck_assert_msg(strcmp(type, UM_REPLY_ERROR) == 0 && strcmp(code, p->code) == 0,
                      "client %d, bad request %s: expected %s, got %s %s", client,
                      p->id[0] ? p->id : "(null id)", p->code, type, code);
        t->bad++;
        return;
    case S_KIND_CHEAP:
        ck_assert_msg(strcmp(type, UM_REPLY_DONE) == 0, "client %d, %s: %s %s", client, p->id,
                      type, code);
        return;
    case S_KIND_STREAM:
        ck_abort_msg("client %d, %s: a streamed generation ended with %s %s", client, p->id,
                     type, code);
    }
}

/*
 * Handle one reply of client c: it must belong to a request of this client that has
 * not had its final reply yet. Returns 1 when the client disconnected after it.
 */
static int s_load_reply(void *ctx, const char *endpoint, s_load_client_t *c, int client,
                        const json_t *r, s_load_totals_t *t)
{
    const json_t *idv = json_object_get(r, "id");
    const char *id = json_is_null(idv) ? "" : json_string_value(idv);
    ck_assert_msg(id != NULL, "client %d: a reply whose id is neither null nor a string",
                  client);
    int i = 0;
    while (i < c->n_pending && strcmp(c->pending[i].id, id) != 0)
        i++;
    ck_assert_msg(i < c->n_pending, "client %d got a %s reply for id \"%s\", which it has no "
                  "request waiting for: a reply went to the wrong client or came twice",
                  client, s_type(r), id);
    s_load_pending_t *p = &c->pending[i];
    if (strcmp(s_type(r), UM_REPLY_STEP) == 0) {
        ck_assert_msg(p->kind == S_KIND_STREAM, "client %d, %s: a step for a request that "
                      "does not stream", client, id);
        p->steps++;
        t->steps++;
        if (p->disconnect && p->steps == 1) {
            zmq_close(c->sock);
            c->sock = um_test_dealer(ctx, endpoint);
            t->abandoned += (unsigned)c->n_pending;
            t->disconnects++;
            c->n_pending = 0;
            return 1;
        }
        return 0;
    }
    unsigned busy_before = t->busy;
    s_load_final(client, p, r, t);
    c->pending[i] = c->pending[--c->n_pending];
    if (t->busy != busy_before)
        c->next_send_ms = um_test_now_ms() + S_LOAD_BUSY_PAUSE_MS;
    else if (c->role == S_ROLE_BAD || c->role == S_ROLE_CHEAP)
        c->next_send_ms = um_test_now_ms() + S_LOAD_PAUSE_MS;
    return 0;
}

/* Read every reply waiting on client c's socket. */
static void s_load_read(void *ctx, const char *endpoint, s_load_client_t *c, int client,
                        s_load_totals_t *t)
{
    for (;;) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            return;
        }
        ck_assert_msg(!zmq_msg_more(&msg), "client %d: a reply of several frames", client);
        json_error_t jerr;
        json_t *r = json_loadb(zmq_msg_data(&msg), zmq_msg_size(&msg), 0, &jerr);
        zmq_msg_close(&msg);
        ck_assert_msg(r != NULL, "client %d: a reply that is not JSON: %s", client, jerr.text);
        int reconnected = s_load_reply(ctx, endpoint, c, client, r, t);
        json_decref(r);
        if (reconnected)
            return;
    }
}

/* Count the lines of a file that contain needle. */
static int s_count_lines(const char *path, const char *needle)
{
    char *text = um_test_read_file(path, NULL);
    int n = 0;
    for (const char *p = text; p && (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    free(text);
    return n;
}

/*
 * Sixteen clients on one ipc endpoint for S_LOAD_MS. Every request gets exactly one
 * final reply, on the socket that sent it, although all clients use the same ids. The
 * daemon's RSS stays flat from the middle of the run to its end.
 */
START_TEST(test_load)
{
    um_test_daemon_t d = {.pid = -1};
    const char *const extra[] = {"--max-queue", "6", "--log-level", "info", NULL};
    s_start(&d, "load", extra);
    void *ctx = zmq_ctx_new();
    s_load_client_t clients[S_LOAD_CLIENTS];
    for (int i = 0; i < S_LOAD_CLIENTS; i++) {
        clients[i] = (s_load_client_t){.sock = um_test_dealer(ctx, d.endpoint),
                                       .role = (s_load_role_t)(i / 4)};
    }
    s_load_totals_t t = {0};
    long rss_start = um_test_rss_kib(d.pid), rss_mid = -1, rss_end = -1;
    double t0 = um_test_now_ms();
    for (;;) {
        double elapsed = um_test_now_ms() - t0;
        int sending = elapsed < S_LOAD_MS;
        if (rss_mid < 0 && elapsed >= S_LOAD_MS / 2)
            rss_mid = um_test_rss_kib(d.pid);
        if (rss_end < 0 && !sending)
            rss_end = um_test_rss_kib(d.pid);
        int in_flight = 0;
        for (int i = 0; i < S_LOAD_CLIENTS; i++) {
            if (sending)
                s_load_send(&clients[i], &t);
            in_flight += clients[i].n_pending;
        }
        if (!sending && in_flight == 0)
            break;
        ck_assert_msg(elapsed < S_LOAD_MS + s_scaled(S_LOAD_DRAIN_MS), "%d requests still have "
                      "no final reply %d ms after the last was sent: see %s", in_flight,
                      s_scaled(S_LOAD_DRAIN_MS), d.log);
        zmq_pollitem_t items[S_LOAD_CLIENTS];
        for (int i = 0; i < S_LOAD_CLIENTS; i++)
            items[i] = (zmq_pollitem_t){.socket = clients[i].sock, .events = ZMQ_POLLIN};
        ck_assert_int_ge(zmq_poll(items, S_LOAD_CLIENTS, 10), 0);
        for (int i = 0; i < S_LOAD_CLIENTS; i++)
            if (items[i].revents & ZMQ_POLLIN)
                s_load_read(ctx, d.endpoint, &clients[i], i, &t);
    }
    for (int i = 0; i < S_LOAD_CLIENTS; i++)
        zmq_close(clients[i].sock);

    int gone_lines = s_count_lines(d.log, "the client disconnected");
    fprintf(stderr, "test_load: %u requests, %u final replies (%u done generations, %u "
            "cancelled, %u busy, %u cancels too late, %u bad requests), %u abandoned by %u "
            "disconnects (%d cancellations logged), %u steps; daemon RSS %ld KiB at the start, "
            "%ld KiB at %d s, %ld KiB at %d s\n", t.sent, t.finals, t.done, t.cancelled, t.busy,
            t.not_found, t.bad, t.abandoned, t.disconnects, gone_lines, t.steps, rss_start,
            rss_mid, S_LOAD_MS / 2000, rss_end, S_LOAD_MS / 1000);
    ck_assert_uint_eq(t.sent, t.finals + t.abandoned);
    ck_assert_uint_gt(t.done, 0);
    ck_assert_uint_gt(t.cancelled, 0);
    ck_assert_uint_gt(t.bad, 0);
    ck_assert_uint_gt(t.disconnects, 0);
    ck_assert_msg(gone_lines > 0, "no disconnect cancelled a generation: see %s", d.log);
    ck_assert(rss_mid > 0 && rss_end > 0);
    /* Under valgrind (a slowdown above 1) the RSS is mostly valgrind's own. */
    if (s_slowdown() == 1.0)
        ck_assert_msg(rss_end - rss_mid <= S_LOAD_RSS_BOUND_KIB, "the daemon's RSS grew from "
                      "%ld to %ld KiB in the second half of the run", rss_mid, rss_end);

    void *sock = um_test_dealer(ctx, d.endpoint);
    s_wait_idle(sock, 10000);
    zmq_close(sock);
    zmq_ctx_term(ctx);
    s_stop_clean(&d);
}
END_TEST

/* ------------------------------------------------------------------------- */

Suite *um_hardening_suite(void)
{
    Suite *s = suite_create("hardening");

    TCase *tc = tcase_create("disconnect");
    tcase_add_unchecked_fixture(tc, s_setup_shared, s_teardown_shared);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_disconnect_running);
    tcase_add_test(tc, test_disconnect_waiting);
    tcase_add_test(tc, test_cancel_within_step);
    tcase_add_test(tc, test_hangup_without_log_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("signals");
    tcase_add_checked_fixture(tc, NULL, s_teardown_test);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_shutdown_grace_finishes);
    tcase_add_test(tc, test_shutdown_grace_expires);
    tcase_add_test(tc, test_shutdown_second_signal);
    tcase_add_test(tc, test_log_reopen);
    suite_add_tcase(s, tc);

    tc = tcase_create("security");
    tcase_add_checked_fixture(tc, NULL, s_teardown_test);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_bind_public_refused);
    tcase_add_test(tc, test_bind_ipc_regular_file);
    tcase_add_test(tc, test_bind_insecure);
    tcase_add_test(tc, test_curve_bind);
    tcase_add_test(tc, test_curve_options);
    tcase_add_test(tc, test_plugin_permissions);
    tcase_add_test(tc, test_limits);
    suite_add_tcase(s, tc);

    tc = tcase_create("load");
    tcase_add_checked_fixture(tc, NULL, s_teardown_test);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_load);
    suite_add_tcase(s, tc);
    return s;
}
