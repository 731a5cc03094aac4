/*
 * Server tests: the real unmaskd binary started as a child process on a private
 * ipc endpoint, driven over a DEALER socket exactly as clients drive it, plus the
 * unmask client binary against it.
 *
 * Each TCase starts its daemon once in an unchecked fixture (in the runner's
 * process, so that in fork mode every test process reaches the same daemon) and
 * stops it with SIGTERM in the teardown. ZeroMQ contexts are never alive across a
 * fork: the fixture closes its own before returning, and each test opens one in a
 * checked fixture. Tests that must see the daemon exit spawn their own.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include <unmaskd/protocol.h>

#include "testutil.h"

extern char **environ;

/*
 * Milliseconds a test waits for a reply that should come, multiplied by Check's
 * CK_TIMEOUT_MULTIPLIER (as the TCase timeouts are) for runs under valgrind.
 */
#define S_REPLY_TIMEOUT_MS 30000
/* How long "no further reply" is watched for after a final reply. */
#define S_QUIET_MS 300

typedef struct s_daemon {
    pid_t pid;
    char endpoint[160];
    char log[512];
} s_daemon_t;

static s_daemon_t s_daemon = {.pid = -1};
static void *s_ctx;
static void *s_sock;
static int s_instance;

/* ------------------------------------------------------------------------- */
/* Time and ZeroMQ helpers                                                   */

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void s_sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void *s_dealer(void *ctx, const char *endpoint)
{
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    ck_assert_msg(sock != NULL, "zmq_socket: %s", zmq_strerror(errno));
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_msg(zmq_connect(sock, endpoint) == 0, "zmq_connect %s: %s", endpoint,
                  zmq_strerror(errno));
    return sock;
}

static void s_send_text(void *sock, const char *text, size_t len)
{
    ck_assert_msg(zmq_send(sock, text, len, 0) == (int)len, "zmq_send: %s", zmq_strerror(errno));
}

static void s_send_json(void *sock, json_t *msg)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    ck_assert(text != NULL);
    s_send_text(sock, text, strlen(text));
    free(text);
    json_decref(msg);
}

/* The next reply as a JSON object, or NULL when none comes within timeout_ms. */
static json_t *s_recv(void *sock, int timeout_ms)
{
    zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN};
    if (zmq_poll(&item, 1, timeout_ms) <= 0)
        return NULL;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    ck_assert(zmq_msg_recv(&msg, sock, 0) >= 0);
    ck_assert_msg(!zmq_msg_more(&msg), "a reply must be a single frame");
    json_error_t jerr;
    json_t *reply = json_loadb(zmq_msg_data(&msg), zmq_msg_size(&msg), JSON_ALLOW_NUL, &jerr);
    ck_assert_msg(reply != NULL, "reply is not JSON: %s: %.*s", jerr.text,
                  (int)zmq_msg_size(&msg), (char *)zmq_msg_data(&msg));
    zmq_msg_close(&msg);
    ck_assert_msg(json_is_object(reply), "reply is not a JSON object");
    ck_assert_msg(json_is_string(json_object_get(reply, "type")), "reply has no type");
    ck_assert_msg(json_object_get(reply, "id") != NULL, "reply has no id field");
    return reply;
}

static int s_reply_timeout_ms(void)
{
    const char *m = getenv("CK_TIMEOUT_MULTIPLIER");
    double mult = m ? atof(m) : 1.0;
    return (int)(S_REPLY_TIMEOUT_MS * (mult >= 1.0 ? mult : 1.0));
}

static json_t *s_recv_must(void *sock)
{
    int timeout_ms = s_reply_timeout_ms();
    json_t *r = s_recv(sock, timeout_ms);
    ck_assert_msg(r != NULL, "no reply within %d ms", timeout_ms);
    return r;
}

static json_t *s_call(void *sock, json_t *request)
{
    s_send_json(sock, request);
    return s_recv_must(sock);
}

static const char *s_type(const json_t *r)
{
    return json_string_value(json_object_get(r, "type"));
}

static const char *s_id(const json_t *r)
{
    return json_string_value(json_object_get(r, "id"));
}

/* Assert that reply is a done reply and return it. */
static json_t *s_done(json_t *r)
{
    if (strcmp(s_type(r), UM_REPLY_DONE) != 0) {
        char *text = json_dumps(r, JSON_COMPACT);
        ck_abort_msg("expected a done reply, got %s", text);
    }
    return r;
}

/* ------------------------------------------------------------------------- */
/* Daemon process                                                            */

/*
 * Start unmaskd on a fresh ipc endpoint with the test model and plugins, with
 * stderr in a log file under UM_TEST_OUT. extra is a NULL-terminated list of
 * further arguments. Returns 0, or -1 when the spawn fails.
 */
static int s_daemon_spawn(s_daemon_t *d, const char *const *extra)
{
    const char *bin = um_test_env("UM_TEST_DAEMON");
    const char *model = um_test_env("UM_TEST_MODEL");
    const char *plugins = um_test_env("UM_TEST_PLUGINS");
    const char *out = getenv("UM_TEST_OUT");
    int n = ++s_instance;

    snprintf(d->endpoint, sizeof d->endpoint, "ipc:///tmp/unmaskd-test-%ld-%d.sock",
             (long)getpid(), n);
    unlink(d->endpoint + strlen("ipc://"));
    if (out && *out) {
        mkdir(out, 0777);
        snprintf(d->log, sizeof d->log, "%s/server-%ld-%d.log", out, (long)getpid(), n);
    } else {
        snprintf(d->log, sizeof d->log, "/dev/null");
    }

    const char *argv[32] = {bin, "--model", model, "--plugin-dir", plugins, "--bind",
                            d->endpoint, "--log-level", "debug", "--threads", "1"};
    int argc = 11;
    for (int i = 0; extra && extra[i] && argc < 31; i++)
        argv[argc++] = extra[i];
    argv[argc] = NULL;

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, d->log, O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    int rc = posix_spawn(&d->pid, bin, &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        d->pid = -1;
        return -1;
    }
    return 0;
}

/*
 * Wait until the daemon replies to health. Returns 0, or -1 when it exits first or
 * does not reply within timeout_ms. Uses its own context and closes it.
 */
static int s_daemon_wait_ready(s_daemon_t *d, int timeout_ms)
{
    void *ctx = zmq_ctx_new();
    void *sock = s_dealer(ctx, d->endpoint);
    int ready = -1;
    double deadline = s_now_ms() + timeout_ms;
    while (s_now_ms() < deadline) {
        int status;
        if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
            d->pid = -1;
            break;
        }
        const char *health = "{\"op\":\"health\",\"id\":\"ready\"}";
        zmq_send(sock, health, strlen(health), ZMQ_DONTWAIT);
        zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN};
        if (zmq_poll(&item, 1, 200) > 0) {
            ready = 0;
            break;
        }
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return ready;
}

/* Send SIGTERM and wait up to timeout_ms; returns the wait status, or -1 after SIGKILL. */
static int s_daemon_stop(s_daemon_t *d, int timeout_ms)
{
    if (d->pid <= 0)
        return -1;
    kill(d->pid, SIGTERM);
    double deadline = s_now_ms() + timeout_ms;
    int status = 0;
    while (s_now_ms() < deadline) {
        pid_t got = waitpid(d->pid, &status, WNOHANG);
        if (got == d->pid) {
            d->pid = -1;
            unlink(d->endpoint + strlen("ipc://"));
            return status;
        }
        s_sleep_ms(20);
    }
    kill(d->pid, SIGKILL);
    waitpid(d->pid, &status, 0);
    d->pid = -1;
    unlink(d->endpoint + strlen("ipc://"));
    return -1;
}

static void s_daemon_start_with(const char *const *extra)
{
    ck_assert_msg(s_daemon_spawn(&s_daemon, extra) == 0, "cannot start %s",
                  um_test_env("UM_TEST_DAEMON"));
    ck_assert_msg(s_daemon_wait_ready(&s_daemon, 60000) == 0,
                  "unmaskd did not reply to health on %s: see its log %s", s_daemon.endpoint,
                  s_daemon.log);
}

static void s_setup_daemon(void)
{
    s_daemon_start_with(NULL);
}

/* A daemon that also scans the loader's fixture plugins, most of them broken. */
static void s_setup_daemon_bad_plugins(void)
{
    const char *const extra[] = {"--plugin-dir", um_test_env("UM_TEST_BAD_PLUGINS"), NULL};
    s_daemon_start_with(extra);
}

/* One generate request at a time, the others wait in the queue. */
static void s_setup_daemon_queue1(void)
{
    const char *const extra[] = {"--max-queue", "1", "--max-batch", "1", NULL};
    s_daemon_start_with(extra);
}

static void s_setup_daemon_serial(void)
{
    const char *const extra[] = {"--max-batch", "1", NULL};
    s_daemon_start_with(extra);
}

static void s_setup_daemon_batch4(void)
{
    const char *const extra[] = {"--max-batch", "4", NULL};
    s_daemon_start_with(extra);
}

/*
 * NOTE: a teardown cannot fail a test, because in fork mode it runs in the runner
 * itself. A bad exit status is reported on stderr here, and test_shutdown asserts it.
 */
static void s_teardown_daemon(void)
{
    int status = s_daemon_stop(&s_daemon, 30000);
    if (status < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "unmaskd on %s did not exit with status 0 after SIGTERM (wait status "
                "%d): see %s\n", s_daemon.endpoint, status, s_daemon.log);
}

static void s_setup_client(void)
{
    s_ctx = zmq_ctx_new();
    ck_assert(s_ctx != NULL);
    s_sock = s_dealer(s_ctx, s_daemon.endpoint);
}

static void s_teardown_client(void)
{
    if (s_sock)
        zmq_close(s_sock);
    if (s_ctx)
        zmq_ctx_term(s_ctx);
    s_sock = NULL;
    s_ctx = NULL;
}

/* ------------------------------------------------------------------------- */
/* Request helpers                                                           */

/* A generate request with the given id, prompt and gen_length; callers add fields. */
static json_t *s_generate(const char *id, const char *prompt, int gen_length)
{
    return json_pack("{s:s, s:s, s:s, s:i, s:i}", "op", "generate", "id", id, "prompt", prompt,
                     "gen_length", gen_length, "seed", 1);
}

static json_t *s_health(const char *id)
{
    return json_pack("{s:s, s:s}", "op", "health", "id", id);
}

/* Check that the daemon still serves: health replies done with status ok. */
static void s_assert_serving(void *sock)
{
    json_t *r = s_done(s_call(sock, s_health("after")));
    ck_assert_str_eq(s_id(r), "after");
    ck_assert_str_eq(json_string_value(json_object_get(r, "status")), "ok");
    json_decref(r);
}

/*
 * Send a raw request and check the error reply: code, field (NULL: JSON null) and a
 * piece of the message. Then check that the daemon still serves.
 */
static void s_expect_error_raw(const char *text, size_t len, const char *code,
                               const char *field, const char *message_part)
{
    s_send_text(s_sock, text, len);
    json_t *r = s_recv_must(s_sock);
    ck_assert_msg(strcmp(s_type(r), UM_REPLY_ERROR) == 0, "expected an error for %.80s, got %s",
                  text, s_type(r));
    json_t *e = json_object_get(r, "error");
    const char *got_code = json_string_value(json_object_get(e, "code"));
    const char *got_msg = json_string_value(json_object_get(e, "message"));
    ck_assert_msg(got_code && strcmp(got_code, code) == 0, "request %.80s: code %s, expected %s "
                  "(message: %s)", text, got_code, code, got_msg);
    json_t *f = json_object_get(e, "field");
    if (field)
        ck_assert_msg(json_is_string(f) && strcmp(json_string_value(f), field) == 0,
                      "request %.80s: field %s, expected %s", text,
                      json_is_string(f) ? json_string_value(f) : "null", field);
    else
        ck_assert_msg(json_is_null(f), "request %.80s: field should be null", text);
    ck_assert_msg(got_msg && strstr(got_msg, message_part) != NULL,
                  "request %.80s: message \"%s\" lacks \"%s\"", text, got_msg, message_part);
    json_decref(r);
    s_assert_serving(s_sock);
}

static void s_expect_error_text(const char *text, const char *code, const char *field,
                                const char *message_part)
{
    s_expect_error_raw(text, strlen(text), code, field, message_part);
}

static void s_expect_error(json_t *request, const char *code, const char *field,
                           const char *message_part)
{
    char *text = json_dumps(request, JSON_COMPACT);
    json_decref(request);
    s_expect_error_raw(text, strlen(text), code, field, message_part);
    free(text);
}

/* Receive replies until the final one for id; steps go to *steps when not NULL. */
static json_t *s_wait_final(void *sock, const char *id, json_t *steps)
{
    for (;;) {
        json_t *r = s_recv_must(sock);
        if (s_id(r) && strcmp(s_id(r), id) == 0 && strcmp(s_type(r), UM_REPLY_STEP) != 0)
            return r;
        if (steps && s_id(r) && strcmp(s_id(r), id) == 0)
            json_array_append(steps, r);
        json_decref(r);
    }
}

/* Assert that no reply arrives for a while (exactly one final per request). */
static void s_assert_quiet(void *sock)
{
    json_t *extra = s_recv(sock, S_QUIET_MS);
    if (extra) {
        char *text = json_dumps(extra, JSON_COMPACT);
        ck_abort_msg("unexpected reply after the final one: %s", text);
    }
}

static int s_max_positions(void)
{
    json_t *info = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i")));
    int n = (int)json_integer_value(
        json_object_get(json_object_get(info, "model"), "max_sequence_length"));
    json_decref(info);
    ck_assert_int_gt(n, 8);
    return n;
}

/* ------------------------------------------------------------------------- */
/* Cheap ops                                                                 */

START_TEST(test_health)
{
    json_t *r = s_done(s_call(s_sock, s_health("h1")));
    ck_assert_str_eq(s_id(r), "h1");
    ck_assert_str_eq(json_string_value(json_object_get(r, "status")), "ok");
    ck_assert_int_eq(json_integer_value(json_object_get(r, "queue")), 0);
    ck_assert(json_is_false(json_object_get(r, "busy")));
    ck_assert(json_number_value(json_object_get(r, "uptime_s")) >= 0);
    json_decref(r);

    /* An integer id is echoed as an integer; a request without id gets id null. */
    r = s_done(s_call(s_sock, json_pack("{s:s, s:i}", "op", "health", "id", 7)));
    ck_assert_int_eq(json_integer_value(json_object_get(r, "id")), 7);
    json_decref(r);
    r = s_done(s_call(s_sock, json_pack("{s:s}", "op", "health")));
    ck_assert(json_is_null(json_object_get(r, "id")));
    json_decref(r);
}
END_TEST

static int s_has_plugin(json_t *list, const char *name)
{
    size_t i;
    json_t *p;
    json_array_foreach(list, i, p) {
        if (strcmp(json_string_value(json_object_get(p, "name")), name) == 0)
            return 1;
    }
    return 0;
}

START_TEST(test_info)
{
    json_t *r = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i1")));
    ck_assert_str_eq(json_string_value(json_object_get(r, "version")), PACKAGE_VERSION);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "protocol")), UM_PROTOCOL_VERSION);

    json_t *m = json_object_get(r, "model");
    ck_assert_str_eq(json_string_value(json_object_get(m, "model_type")), "llada");
    ck_assert_int_gt(json_integer_value(json_object_get(m, "d_model")), 0);
    ck_assert_int_gt(json_integer_value(json_object_get(m, "n_layers")), 0);
    ck_assert_int_gt(json_integer_value(json_object_get(m, "n_heads")), 0);
    ck_assert_int_gt(json_integer_value(json_object_get(m, "vocab_size")), 0);
    ck_assert_int_gt(json_integer_value(json_object_get(m, "max_sequence_length")), 0);
    ck_assert(json_is_integer(json_object_get(m, "mask_token_id")));
    ck_assert(json_is_string(json_object_get(m, "dir")));
    ck_assert(json_is_string(json_object_get(m, "dtype")));
    ck_assert(json_is_string(json_object_get(r, "backend")));
    ck_assert(json_is_string(json_object_get(r, "isa")));

    json_t *plugins = json_object_get(r, "plugins");
    json_t *remask = json_object_get(plugins, "remask");
    ck_assert_msg(s_has_plugin(remask, "low_confidence"), "info lacks low_confidence");
    ck_assert_msg(s_has_plugin(remask, "random"), "info lacks random");
    ck_assert_msg(s_has_plugin(json_object_get(plugins, "tokenizer"), "bpe"), "info lacks bpe");
    ck_assert(json_is_array(json_object_get(json_array_get(remask, 0), "params")));

    json_t *libs = json_object_get(r, "libraries");
    ck_assert(json_is_string(json_object_get(libs, "zmq")));
    ck_assert(json_is_string(json_object_get(libs, "jansson")));
    ck_assert(json_is_string(json_object_get(libs, "onednn")));
    json_decref(r);
}
END_TEST

START_TEST(test_tokenize_round_trip)
{
    const char *text = "once upon a time, there was a little girl named lily.";
    json_t *r = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s}", "op", "tokenize", "id", "t1",
                                                "text", text)));
    json_t *tokens = json_object_get(r, "tokens");
    ck_assert_int_gt(json_array_size(tokens), 3);
    ck_assert_int_lt(json_array_size(tokens), strlen(text));

    json_t *d = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:O}", "op", "detokenize", "id", "d1",
                                                "tokens", tokens)));
    ck_assert_str_eq(json_string_value(json_object_get(d, "text")), text);
    json_decref(d);
    json_decref(r);

    /* The mask token written in text is one id, the model's mask id. */
    json_t *info = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i")));
    json_int_t mask = json_integer_value(
        json_object_get(json_object_get(info, "model"), "mask_token_id"));
    json_decref(info);
    r = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s}", "op", "tokenize", "id", "t2", "text",
                                        "a<|mdm_mask|>b")));
    tokens = json_object_get(r, "tokens");
    ck_assert_int_eq(json_array_size(tokens), 3);
    ck_assert_int_eq(json_integer_value(json_array_get(tokens, 1)), mask);
    json_decref(r);

    /* Empty text, and an empty token list. */
    r = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s}", "op", "tokenize", "id", "t3", "text",
                                        "")));
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 0);
    json_decref(r);
    r = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:[]}", "op", "detokenize", "id", "d2",
                                        "tokens")));
    ck_assert_str_eq(json_string_value(json_object_get(r, "text")), "");
    json_decref(r);

    /* A NUL byte survives both directions instead of cutting the text short. */
    r = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s#}", "op", "tokenize", "id", "t4", "text",
                                        "a\0b", (size_t)3)));
    tokens = json_object_get(r, "tokens");
    ck_assert_int_eq(json_array_size(tokens), 3);
    d = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:O}", "op", "detokenize", "id", "d3",
                                        "tokens", tokens)));
    json_t *nul_text = json_object_get(d, "text");
    ck_assert_uint_eq(json_string_length(nul_text), 3);
    ck_assert_mem_eq(json_string_value(nul_text), "a\0b", 3);
    json_decref(d);
    json_decref(r);
}
END_TEST

START_TEST(test_req_socket)
{
    /* REQ adds an empty delimiter frame; the reply must repeat it for REQ to accept it. */
    void *req = zmq_socket(s_ctx, ZMQ_REQ);
    int linger = 0;
    zmq_setsockopt(req, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_int_eq(zmq_connect(req, s_daemon.endpoint), 0);
    const char *health = "{\"op\":\"health\",\"id\":\"req\"}";
    ck_assert_int_eq(zmq_send(req, health, strlen(health), 0), (int)strlen(health));
    json_t *r = s_done(s_recv_must(req));
    ck_assert_str_eq(s_id(r), "req");
    json_decref(r);
    zmq_close(req);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* generate                                                                  */

START_TEST(test_generate_plain)
{
    const char *prompt = "once upon a time";
    json_t *t = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s}", "op", "tokenize", "id", "t",
                                                "text", prompt)));
    size_t n_prompt = json_array_size(json_object_get(t, "tokens"));
    json_decref(t);

    json_t *req = s_generate("g1", prompt, 16);
    json_object_set_new(req, "steps", json_integer(8));
    json_object_set_new(req, "seed", json_integer(5));
    json_t *r = s_done(s_call(s_sock, req));
    ck_assert_str_eq(s_id(r), "g1");
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 16);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "prompt_tokens")), (json_int_t)n_prompt);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "seed")), 5);
    ck_assert(json_is_string(json_object_get(r, "text")));
    json_t *st = json_object_get(r, "stats");
    ck_assert_int_eq(json_integer_value(json_object_get(st, "steps")), 8);
    ck_assert_int_ge(json_integer_value(json_object_get(st, "forward_passes")), 8);
    ck_assert(json_number_value(json_object_get(st, "total_ms")) > 0);
    ck_assert(json_number_value(json_object_get(st, "ms_per_step")) > 0);
    ck_assert(json_number_value(json_object_get(st, "tokens_per_second")) > 0);
    s_assert_quiet(s_sock);

    /* The same request again gives the same tokens. */
    req = s_generate("g2", prompt, 16);
    json_object_set_new(req, "steps", json_integer(8));
    json_object_set_new(req, "seed", json_integer(5));
    json_t *again = s_done(s_call(s_sock, req));
    ck_assert(json_equal(json_object_get(r, "tokens"), json_object_get(again, "tokens")));
    json_decref(again);
    json_decref(r);

    /* Without a seed the daemon picks one and reports it. */
    r = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s, s:i}", "op", "generate", "id", "g3",
                                        "prompt", prompt, "gen_length", 4)));
    ck_assert(json_is_integer(json_object_get(r, "seed")));
    ck_assert_int_ge(json_integer_value(json_object_get(r, "seed")), 0);
    json_decref(r);
}
END_TEST

START_TEST(test_generate_stream)
{
    const int gen_length = 24;
    json_t *req = s_generate("s1", "one day, a little boy named tim", gen_length);
    json_object_set_new(req, "steps", json_integer(12));
    json_object_set_new(req, "block_length", json_integer(8));
    json_object_set_new(req, "stream", json_true());
    s_send_json(s_sock, req);

    json_int_t committed_token[64];
    int seen[64] = {0};
    json_int_t last_step = -1;
    int n_steps = 0;
    json_t *final = NULL;
    while (!final) {
        json_t *r = s_recv_must(s_sock);
        ck_assert_str_eq(s_id(r), "s1");
        if (strcmp(s_type(r), UM_REPLY_STEP) != 0) {
            final = r;
            break;
        }
        json_int_t step = json_integer_value(json_object_get(r, "step"));
        ck_assert_msg(step > last_step, "step %lld arrived after step %lld", (long long)step,
                      (long long)last_step);
        last_step = step;
        n_steps++;
        ck_assert_int_eq(json_integer_value(json_object_get(r, "steps")), 12);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "blocks")), 3);
        json_int_t block = json_integer_value(json_object_get(r, "block"));
        ck_assert(block >= 0 && block < 3);
        ck_assert(json_is_number(json_object_get(r, "step_ms")));

        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(r, "committed"), i, c) {
            json_int_t pos = json_integer_value(json_object_get(c, "pos"));
            ck_assert_msg(pos >= 0 && pos < gen_length, "pos %lld out of range", (long long)pos);
            ck_assert_msg(!seen[pos], "position %lld committed twice", (long long)pos);
            /* Blocks are semi-autoregressive: a step commits only inside its block. */
            ck_assert_int_eq(pos / 8, block);
            seen[pos] = 1;
            committed_token[pos] = json_integer_value(json_object_get(c, "token"));
            ck_assert(json_is_string(json_object_get(c, "text")));
        }
        json_int_t masked = json_integer_value(json_object_get(r, "masked"));
        int n_seen = 0;
        for (int p = 0; p < gen_length; p++)
            n_seen += seen[p];
        ck_assert_int_eq(masked, gen_length - n_seen);
        json_decref(r);
    }
    ck_assert_str_eq(s_type(final), UM_REPLY_DONE);
    ck_assert_int_eq(n_steps, 12);
    json_t *tokens = json_object_get(final, "tokens");
    ck_assert_int_eq(json_array_size(tokens), gen_length);
    for (int p = 0; p < gen_length; p++) {
        ck_assert_msg(seen[p], "position %d never committed", p);
        ck_assert_int_eq(json_integer_value(json_array_get(tokens, (size_t)p)), committed_token[p]);
    }
    json_decref(final);
    s_assert_quiet(s_sock);
}
END_TEST

/* A mask token in the prompt is filled in too, and reported at its negative position. */
START_TEST(test_generate_infill)
{
    const char *prompt = "once upon a <|mdm_mask|> time";
    json_t *t = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s}", "op", "tokenize", "id", "t",
                                                "text", prompt)));
    json_t *ids = json_object_get(t, "tokens");
    json_t *info = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i")));
    json_int_t mask = json_integer_value(
        json_object_get(json_object_get(info, "model"), "mask_token_id"));
    json_decref(info);
    json_int_t n_prompt = (json_int_t)json_array_size(ids);
    json_int_t mask_pos = 0;
    for (json_int_t i = 0; i < n_prompt; i++)
        if (json_integer_value(json_array_get(ids, (size_t)i)) == mask)
            mask_pos = i - n_prompt;
    json_decref(t);
    ck_assert_int_lt(mask_pos, 0);

    json_t *req = s_generate("in1", prompt, 8);
    json_object_set_new(req, "stream", json_true());
    s_send_json(s_sock, req);
    json_t *steps = json_array();
    json_t *r = s_done(s_wait_final(s_sock, "in1", steps));
    json_t *infill = json_object_get(r, "infill");
    ck_assert_int_eq(json_array_size(infill), 1);
    json_t *e = json_array_get(infill, 0);
    ck_assert_int_eq(json_integer_value(json_object_get(e, "pos")), mask_pos);
    json_int_t token = json_integer_value(json_object_get(e, "token"));

    /* When a step committed the prompt's mask, the final reply reports the same token. */
    size_t i, k;
    json_t *step, *c;
    json_array_foreach(steps, i, step) {
        json_array_foreach(json_object_get(step, "committed"), k, c) {
            if (json_integer_value(json_object_get(c, "pos")) == mask_pos)
                ck_assert_int_eq(json_integer_value(json_object_get(c, "token")), token);
        }
    }
    json_decref(steps);

    /* The prompt's mask counts toward the quota, so no mask is left anywhere. */
    ck_assert_int_ne(token, mask);
    json_t *tok;
    json_array_foreach(json_object_get(r, "tokens"), i, tok)
        ck_assert_int_ne(json_integer_value(tok), mask);
    json_decref(r);
}
END_TEST

/* Copy the request fields of a fixture case into req: every one that is present. */
static void s_copy_case_fields(json_t *req, json_t *c)
{
    static const char *const fields[] = {
        "prompt", "gen_length", "block_length", "steps", "temperature", "cfg_scale",
        "remasking", "seed", "remasking_params", "top_k", "top_p", "schedule", "eps",
        "ban_eos", "suppress_eos_confidence", "early_stop"};
    for (size_t k = 0; k < sizeof fields / sizeof fields[0]; k++) {
        json_t *v = json_object_get(c, fields[k]);
        if (v && !json_is_null(v))
            json_object_set(req, fields[k], v);
    }
}

/*
 * The sampler fixture's older cases and those marked "daemon" (one per request field and
 * policy family), through the daemon with the plugins loaded from disk, token for token.
 */
START_TEST(test_generate_fixture)
{
    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"), "generate.json");
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    ck_assert_msg(doc != NULL, "cannot read %s: %s (write it with tools/make_fixtures.py)", path,
                  jerr.text);
    json_t *cases = json_object_get(doc, "cases");
    ck_assert_int_ge(json_array_size(cases), 2);

    size_t i;
    json_t *c;
    int n_run = 0;
    json_array_foreach(cases, i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        json_t *flag = json_object_get(c, "daemon");
        if (flag && !json_is_true(flag))
            continue;
        n_run++;
        json_t *req = json_pack("{s:s, s:s}", "op", "generate", "id", name);
        s_copy_case_fields(req, c);
        json_t *r = s_call(s_sock, req);
        ck_assert_msg(strcmp(s_type(r), UM_REPLY_DONE) == 0, "case %s: reply %s", name, s_type(r));

        json_t *canvas = json_object_get(c, "canvas");
        size_t n_prompt = json_array_size(json_object_get(c, "prompt_ids"));
        json_t *tokens = json_object_get(r, "tokens");
        ck_assert_int_eq(json_integer_value(json_object_get(r, "prompt_tokens")),
                         (json_int_t)n_prompt);
        ck_assert_int_eq(json_array_size(tokens), json_array_size(canvas) - n_prompt);
        for (size_t k = 0; k < json_array_size(tokens); k++) {
            json_int_t want = json_integer_value(json_array_get(canvas, n_prompt + k));
            json_int_t got = json_integer_value(json_array_get(tokens, k));
            ck_assert_msg(got == want, "case %s: token %zu is %lld, the reference has %lld", name,
                          k, (long long)got, (long long)want);
        }
        json_t *st = json_object_get(r, "stats");
        ck_assert_int_eq(json_integer_value(json_object_get(st, "forward_passes")),
                         json_integer_value(json_object_get(c, "forward_passes")));
        ck_assert(json_equal(json_object_get(st, "early_stop"),
                             json_object_get(c, "early_stopped")));
        json_decref(r);
    }
    ck_assert_int_ge(n_run, 20);
    json_decref(doc);
}
END_TEST

/*
 * score through the daemon: the fixture cases of tools/make_score_fixtures.py for the
 * model this daemon runs ("bundled" or "bert"), from their texts, match the reference
 * within the tolerance test_score.c justifies; the reply reports the token counts.
 */
static void s_check_score_cases(const char *model)
{
    json_error_t jerr;
    json_t *doc = json_load_file(um_test_path(um_test_env("UM_TEST_FIXTURES"), "score.json"), 0,
                                 &jerr);
    ck_assert_msg(doc != NULL, "score.json: %s", jerr.text);
    size_t i;
    json_t *c;
    int n = 0;
    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        if (strcmp(json_string_value(json_object_get(c, "model")), model) != 0)
            continue;
        const char *name = json_string_value(json_object_get(c, "name"));
        json_t *req = json_pack("{s:s, s:s, s:O, s:O, s:O, s:O, s:O, s:O}", "op", "score", "id",
                                name, "prompt", json_object_get(c, "prompt"), "answer",
                                json_object_get(c, "answer"), "n_samples",
                                json_object_get(c, "n_samples"), "batch_size",
                                json_object_get(c, "batch_size"), "cfg_scale",
                                json_object_get(c, "cfg_scale"), "seed",
                                json_object_get(c, "seed"));
        json_t *r = s_done(s_call(s_sock, req));
        double got = json_number_value(json_object_get(r, "log_likelihood"));
        double want = json_number_value(json_object_get(c, "log_likelihood"));
        ck_assert_msg(fabs(got - want) <= 1e-3, "%s: log p %.6f, reference %.6f", name, got, want);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "prompt_tokens")),
                         (json_int_t)json_array_size(json_object_get(c, "prompt_ids")));
        ck_assert_int_eq(json_integer_value(json_object_get(r, "answer_tokens")),
                         (json_int_t)json_array_size(json_object_get(c, "answer_ids")));
        ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "stats"),
                                                            "forward_passes")),
                         json_integer_value(json_object_get(c, "forward_passes")));
        json_decref(r);
        n++;
    }
    ck_assert_int_ge(n, 1);
    json_decref(doc);
}

START_TEST(test_score)
{
    s_check_score_cases("bundled");
    s_expect_error(json_pack("{s:s, s:s, s:s, s:s, s:i}", "op", "score", "id", "s1", "prompt",
                             "the cat", "answer", " sat.", "n_samples", 0),
                   UM_ERR_OUT_OF_RANGE, "n_samples", "must be at least 1, got 0: use a whole "
                   "number in [1, 4096]");
    s_expect_error(json_pack("{s:s, s:s, s:s, s:s, s:i}", "op", "score", "id", "s2", "prompt",
                             "the cat", "answer", " sat.", "n_samples", 5000),
                   UM_ERR_OUT_OF_RANGE, "n_samples", "must be at most 4096, got 5000");
    /* The mask token has no likelihood of its own. */
    s_expect_error(json_pack("{s:s, s:s, s:s, s:s}", "op", "score", "id", "s5", "prompt",
                             "the cat", "answer", " sat<|mdm_mask|>"),
                   UM_ERR_INVALID, "answer", "is the mask token (id 4095), which the model "
                   "never predicts");
    s_expect_error(json_pack("{s:s, s:s, s:s}", "op", "score", "id", "s3", "prompt", "the cat"),
                   UM_ERR_INVALID, "answer", "missing field \"answer\"");
    s_expect_error(json_pack("{s:s, s:s, s:s, s:s}", "op", "score", "id", "s4", "prompt",
                             "the cat", "answer", ""),
                   UM_ERR_OUT_OF_RANGE, "answer", "answer has no tokens");
    s_assert_serving(s_sock);
}
END_TEST

/* A daemon on the bundled model with int8 weights, asked for with --weight-dtype's
   shorter spelling. */
static void s_setup_daemon_int8(void)
{
    const char *const extra[] = {"--weights", "int8", NULL};
    s_daemon_start_with(extra);
}

/* info names the int8 weights, and a generation runs on them. */
START_TEST(test_info_int8)
{
    json_t *r = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i8")));
    ck_assert_str_eq(json_string_value(json_object_get(r, "weight_dtype")), "int8");
    const char *backend = json_string_value(json_object_get(r, "backend"));
    ck_assert_msg(backend && strstr(backend, "(int8)"), "backend \"%s\" does not name int8",
                  backend ? backend : "(none)");
    json_decref(r);

    json_t *req = s_generate("g8", "once upon a time", 16);
    json_object_set_new(req, "steps", json_integer(8));
    r = s_done(s_call(s_sock, req));
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 16);
    json_decref(r);
}
END_TEST

/* A daemon on the random-weight BERT fixture, whose vocab.txt has the words w0, w1, ... */
static void s_setup_daemon_bert(void)
{
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s/families/bert", um_test_env("UM_TEST_FIXTURES"));
    const char *const extra[] = {"--model", dir, NULL};
    s_daemon_start_with(extra);
}

/*
 * BERT through the daemon: the prompt is framed "[CLS] prompt ... [SEP]" and the tokens
 * are those of the reference sampler (tools/make_family_generations.py), whose prompts
 * are the fixture's words w0, w1, ... (id 5 + n).
 */
START_TEST(test_generate_bert_framing)
{
    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"),
                                    "families/bert/generate.json");
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    ck_assert_msg(doc != NULL, "cannot read %s: %s", path, jerr.text);
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        json_t *ids = json_object_get(c, "prompt_ids");
        char prompt[512] = "";
        for (size_t k = 1; k < json_array_size(ids); k++) /* [CLS] is the daemon's to add */
            snprintf(prompt + strlen(prompt), sizeof prompt - strlen(prompt), "%sw%lld",
                     k > 1 ? " " : "", (long long)json_integer_value(json_array_get(ids, k)) - 5);
        json_t *req = json_pack("{s:s, s:s, s:s, s:O, s:O, s:O, s:O, s:O, s:O}", "op",
                                "generate", "id", name, "prompt", prompt, "gen_length",
                                json_object_get(c, "gen_length"), "block_length",
                                json_object_get(c, "block_length"), "steps",
                                json_object_get(c, "steps"), "temperature",
                                json_object_get(c, "temperature"), "cfg_scale",
                                json_object_get(c, "cfg_scale"), "seed",
                                json_object_get(c, "seed"));
        json_t *r = s_done(s_call(s_sock, req));
        size_t n_prompt = json_array_size(ids);
        ck_assert_int_eq(json_integer_value(json_object_get(r, "prompt_tokens")),
                         (json_int_t)n_prompt);
        json_t *canvas = json_object_get(c, "canvas"), *tokens = json_object_get(r, "tokens");
        ck_assert_int_eq(json_array_size(tokens), json_array_size(canvas) - n_prompt);
        for (size_t k = 0; k < json_array_size(tokens); k++)
            ck_assert_msg(json_integer_value(json_array_get(tokens, k))
                              == json_integer_value(json_array_get(canvas, n_prompt + k)),
                          "case %s: token %zu is %lld, the reference has %lld", name, k,
                          (long long)json_integer_value(json_array_get(tokens, k)),
                          (long long)json_integer_value(json_array_get(canvas, n_prompt + k)));
        json_decref(r);
    }
    json_decref(doc);

    /* [CLS] and [SEP] take two of the 40 positions, and the limits say so. */
    json_t *info = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i")));
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(info, "model"),
                                                        "framing_tokens")), 2);
    json_t *limits = json_object_get(info, "limits");
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_prompt_tokens")), 38);
    ck_assert_int_eq(json_integer_value(json_object_get(limits, "max_gen_length")), 38);
    json_decref(info);

    /* The text continues the prompt: WordPiece puts the space between them. */
    json_t *sp = s_done(s_call(s_sock, s_generate("space", "w1 w2", 3)));
    const char *text = json_string_value(json_object_get(sp, "text"));
    ck_assert_msg(text[0] == ' ' && text[1] == 'w', "text \"%s\" does not continue the prompt",
                  text);
    json_decref(sp);

    /* 40 positions: [CLS] and 3 words leave 35 for generation, as [SEP] takes one. */
    json_t *ok = s_done(s_call(s_sock, s_generate("fits", "w1 w2 w3", 35)));
    ck_assert_int_eq(json_integer_value(json_object_get(ok, "prompt_tokens")), 4);
    json_decref(ok);
    s_expect_error(s_generate("over", "w1 w2 w3", 36), UM_ERR_OUT_OF_RANGE, "gen_length",
                   "closing token");
    s_check_score_cases("bert");
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Policies, sampling fields and end-of-text controls                        */

/* The remask entry of info for name, or NULL. */
static json_t *s_find_plugin(json_t *list, const char *name)
{
    size_t i;
    json_t *p;
    json_array_foreach(list, i, p) {
        if (strcmp(json_string_value(json_object_get(p, "name")), name) == 0)
            return p;
    }
    return NULL;
}

/* The param entry called name of a plugin entry, or NULL. */
static json_t *s_find_param(json_t *plugin, const char *name)
{
    return s_find_plugin(json_object_get(plugin, "params"), name);
}

/* info lists every policy with its parameters, defaults, sampler and schedule. */
START_TEST(test_info_policies)
{
    json_t *r = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i2")));
    json_t *remask = json_object_get(json_object_get(r, "plugins"), "remask");
    static const struct {
        const char *name, *sampler, *schedule;
        int adaptive;
        const char *param;
        double def;
    } want[] = {
        {"low_confidence", "gumbel", "quota", 0, NULL, 0},
        {"random", "gumbel", "quota", 0, NULL, 0},
        {"maskgit_plus", "categorical", "timestep", 0, "alg_temp", 0.0},
        {"topk_margin", "categorical", "timestep", 0, "alg_temp", 0.0},
        {"entropy", "categorical", "timestep", 0, "alg_temp", 0.0},
        {"threshold", "gumbel", "quota", 1, "threshold", 0.9},
        {"factor", "gumbel", "quota", 1, "factor", 1.0},
        {"eb_sampler", "categorical", "quota", 1, "gamma", 0.01},
        {"origin", "categorical", "timestep", 1, NULL, 0},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        json_t *p = s_find_plugin(remask, want[i].name);
        ck_assert_msg(p != NULL, "info lacks policy %s", want[i].name);
        ck_assert_str_eq(json_string_value(json_object_get(p, "sampler")), want[i].sampler);
        ck_assert_str_eq(json_string_value(json_object_get(p, "schedule")), want[i].schedule);
        ck_assert_int_eq(json_is_true(json_object_get(p, "adaptive")), want[i].adaptive);
        ck_assert_str_eq(json_string_value(json_object_get(p, "abi")), "1.1");
        json_t *params = json_object_get(p, "params");
        if (!want[i].param) {
            ck_assert_int_eq(json_array_size(params), 0);
            continue;
        }
        json_t *param = s_find_param(p, want[i].param);
        ck_assert_msg(param != NULL, "%s lacks parameter %s", want[i].name, want[i].param);
        ck_assert_str_eq(json_string_value(json_object_get(param, "type")), "number");
        ck_assert_double_eq_tol(json_number_value(json_object_get(param, "default")),
                                want[i].def, 1e-12);
        ck_assert(json_is_number(json_object_get(param, "min")));
        ck_assert(json_is_number(json_object_get(param, "max")));
        ck_assert(json_is_string(json_object_get(param, "help")));
    }
    json_t *g = json_object_get(r, "generate");
    ck_assert_int_eq(json_integer_value(json_object_get(g, "gen_length")), 64);
    ck_assert_double_eq(json_number_value(json_object_get(g, "top_p")), 1.0);
    ck_assert_double_eq(json_number_value(json_object_get(g, "eps")), 1e-3);
    ck_assert_int_eq(json_array_size(json_object_get(g, "schedules")), 2);
    ck_assert(json_is_false(json_object_get(g, "early_stop")));
    json_t *m = json_object_get(r, "model");
    ck_assert(json_is_null(json_object_get(m, "eot_token_id")));
    json_decref(r);
}
END_TEST

/* Parameter and sampling-field errors name the field and the value. */
START_TEST(test_error_policy_params)
{
    json_t *req = s_generate("pp1", "hi", 8);
    json_object_set_new(req, "remasking", json_string("threshold"));
    json_object_set_new(req, "remasking_params", json_pack("{s:f}", "treshold", 0.5));
    s_expect_error(req, UM_ERR_UNKNOWN_FIELD, "remasking_params.treshold",
                   "did you mean threshold?");
    req = s_generate("pp2", "hi", 8);
    json_object_set_new(req, "remasking", json_string("threshold"));
    json_object_set_new(req, "remasking_params", json_pack("{s:f}", "threshold", 1.5));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "remasking_params.threshold", "[0, 1], got 1.5");
    req = s_generate("pp3", "hi", 8);
    json_object_set_new(req, "remasking", json_string("eb_sampler"));
    json_object_set_new(req, "remasking_params", json_pack("{s:s}", "gamma", "big"));
    s_expect_error(req, UM_ERR_INVALID, "remasking_params.gamma", "must be a number");
    req = s_generate("pp4", "hi", 8);
    json_object_set_new(req, "remasking", json_string("maskgit_plus"));
    json_object_set_new(req, "remasking_params", json_pack("{s:i}", "alg_temp", -1));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "remasking_params.alg_temp", "got -1");
    req = s_generate("pp5", "hi", 8);
    json_object_set_new(req, "remasking", json_string("factor"));
    json_object_set_new(req, "remasking_params", json_pack("{s:f}", "alg_temp", 1.0));
    s_expect_error(req, UM_ERR_UNKNOWN_FIELD, "remasking_params.alg_temp",
                   "accepted parameters are factor");

    req = s_generate("ps1", "hi", 8);
    json_object_set_new(req, "top_p", json_real(0.0));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "top_p", "got 0");
    req = s_generate("ps2", "hi", 8);
    json_object_set_new(req, "top_p", json_real(1.5));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "top_p", "got 1.5");
    req = s_generate("ps3", "hi", 8);
    json_object_set_new(req, "top_k", json_integer(-2));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "top_k", "at least 0");
    req = s_generate("ps4", "hi", 8);
    json_object_set_new(req, "schedule", json_string("timestpe"));
    s_expect_error(req, UM_ERR_INVALID, "schedule", "did you mean timestep?");
    req = s_generate("ps5", "hi", 8);
    json_object_set_new(req, "eps", json_real(1.0));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "eps", "got 1");
    req = s_generate("ps6", "hi", 8);
    json_object_set_new(req, "temperature", json_real(1e-6));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "temperature", "1e-06");
    req = s_generate("ps7", "hi", 8);
    json_object_set_new(req, "early_stop", json_string("yes"));
    s_expect_error(req, UM_ERR_INVALID, "early_stop", "true or false");
    req = s_generate("ps8", "hi", 8);
    json_object_set_new(req, "trim_eos", json_integer(1));
    s_expect_error(req, UM_ERR_INVALID, "trim_eos", "true or false");
}
END_TEST

/* Every policy serves a request by name, with its parameters and either schedule. */
START_TEST(test_generate_each_policy)
{
    static const char *const names[] = {"low_confidence", "random", "maskgit_plus",
                                        "topk_margin", "entropy", "threshold", "factor",
                                        "eb_sampler", "origin"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        for (int timestep = 0; timestep < 2; timestep++) {
            json_t *req = s_generate(names[i], "once upon a time", 12);
            json_object_set_new(req, "remasking", json_string(names[i]));
            json_object_set_new(req, "schedule", json_string(timestep ? "timestep" : "quota"));
            json_object_set_new(req, "temperature", json_real(0.7));
            json_object_set_new(req, "top_k", json_integer(40));
            json_object_set_new(req, "top_p", json_real(0.95));
            json_t *r = s_call(s_sock, req);
            ck_assert_msg(strcmp(s_type(r), UM_REPLY_DONE) == 0, "policy %s: reply %s",
                          names[i], s_type(r));
            ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 12);
            json_int_t passes = json_integer_value(
                json_object_get(json_object_get(r, "stats"), "forward_passes"));
            ck_assert_msg(passes >= 1 && passes <= 12, "policy %s: %lld passes", names[i],
                          (long long)passes);
            json_decref(r);
        }
    }
}
END_TEST

/* With stream, each step carries the whole canvas: tokens, nulls for masks. */
START_TEST(test_generate_stream_canvas)
{
    const int gen_length = 16;
    json_t *req = s_generate("sc1", "once upon a <|mdm_mask|> time", gen_length);
    json_object_set_new(req, "steps", json_integer(8));
    json_object_set_new(req, "block_length", json_integer(8));
    json_object_set_new(req, "remasking", json_string("entropy"));
    json_object_set_new(req, "stream", json_true());
    s_send_json(s_sock, req);

    json_int_t known[64];
    int n_known = 0, n_steps = 0;
    for (int p = 0; p < gen_length; p++)
        known[p] = -1;
    json_t *final = NULL;
    while (!final) {
        json_t *r = s_recv_must(s_sock);
        if (strcmp(s_type(r), UM_REPLY_STEP) != 0) {
            final = r;
            break;
        }
        n_steps++;
        json_t *canvas = json_object_get(r, "canvas");
        ck_assert_int_eq(json_array_size(canvas), gen_length);
        size_t i;
        json_t *c;
        json_array_foreach(json_object_get(r, "committed"), i, c) {
            json_int_t pos = json_integer_value(json_object_get(c, "pos"));
            if (pos < 0)
                continue;
            ck_assert_int_eq(known[pos], -1);
            known[pos] = json_integer_value(json_object_get(c, "token"));
            n_known++;
        }
        /* The canvas shows exactly the tokens committed so far, and null elsewhere. */
        int nulls = 0;
        for (int p = 0; p < gen_length; p++) {
            json_t *v = json_array_get(canvas, (size_t)p);
            if (known[p] < 0) {
                ck_assert_msg(json_is_null(v), "position %d is not masked in the canvas", p);
                nulls++;
            } else {
                ck_assert_int_eq(json_integer_value(v), known[p]);
            }
        }
        json_t *infill = json_object_get(r, "infill");
        ck_assert_int_eq(json_array_size(infill), 1);
        nulls += json_is_null(json_object_get(json_array_get(infill, 0), "token"));
        ck_assert_int_eq(json_integer_value(json_object_get(r, "masked")), nulls);
        json_decref(r);
    }
    ck_assert_str_eq(s_type(final), UM_REPLY_DONE);
    ck_assert_int_eq(n_known, gen_length);
    ck_assert_int_ge(n_steps, 2);
    json_decref(final);
}
END_TEST

/*
 * early_stop ends a generation at an EOS tail, and trim_eos cuts the reply there; both
 * keep the tokens before the EOS of the full run.
 */
START_TEST(test_generate_eos_controls)
{
    const char *prompt = "the end.<|endoftext|>once upon a time";
    json_t *full = s_generate("e1", prompt, 40);
    json_object_set_new(full, "block_length", json_integer(4));
    json_object_set_new(full, "steps", json_integer(40));
    json_object_set_new(full, "seed", json_integer(7));
    json_t *stop = json_deep_copy(full);
    json_object_set_new(stop, "id", json_string("e2"));
    json_object_set_new(stop, "early_stop", json_true());
    json_object_set_new(stop, "trim_eos", json_true());

    json_t *a = s_done(s_call(s_sock, full));
    json_t *b = s_done(s_call(s_sock, stop));
    ck_assert_str_eq(json_string_value(json_object_get(a, "finish")), "eos");
    json_int_t eos = json_integer_value(json_object_get(a, "eos_pos"));
    ck_assert_int_ge(eos, 0);
    ck_assert_int_eq(json_array_size(json_object_get(a, "tokens")), 40);
    ck_assert_int_eq(json_integer_value(json_object_get(b, "eos_pos")), eos);
    json_t *tb = json_object_get(b, "tokens");
    ck_assert_int_eq(json_array_size(tb), eos);
    for (json_int_t k = 0; k < eos; k++)
        ck_assert_int_eq(json_integer_value(json_array_get(tb, (size_t)k)),
                         json_integer_value(json_array_get(json_object_get(a, "tokens"),
                                                           (size_t)k)));
    json_t *sa = json_object_get(a, "stats"), *sb = json_object_get(b, "stats");
    ck_assert(json_is_true(json_object_get(sb, "early_stop")));
    ck_assert(json_is_false(json_object_get(sa, "early_stop")));
    ck_assert_int_lt(json_integer_value(json_object_get(sb, "forward_passes")),
                     json_integer_value(json_object_get(sa, "forward_passes")));
    json_decref(a);
    json_decref(b);

    /* ban_eos: no EOS at all, so the reply runs to the full length. */
    json_t *ban = s_generate("e3", prompt, 40);
    json_object_set_new(ban, "block_length", json_integer(4));
    json_object_set_new(ban, "ban_eos", json_true());
    json_object_set_new(ban, "trim_eos", json_true());
    json_t *c = s_done(s_call(s_sock, ban));
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish")), "length");
    ck_assert(json_is_null(json_object_get(c, "eos_pos")));
    ck_assert_int_eq(json_array_size(json_object_get(c, "tokens")), 40);
    json_decref(c);
}
END_TEST

/*
 * A daemon whose plugin folders hold broken plugins logs each with its reason and
 * serves with the rest, including a plugin built against ABI 1.0.
 */
START_TEST(test_bad_plugins_skipped)
{
    json_t *r = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i")));
    json_t *remask = json_object_get(json_object_get(r, "plugins"), "remask");
    ck_assert_ptr_nonnull(s_find_plugin(remask, "fixture_abi10"));
    ck_assert_ptr_nonnull(s_find_plugin(remask, "low_confidence"));
    ck_assert_ptr_null(s_find_plugin(remask, "fixture"));
    json_t *abi10 = s_find_plugin(remask, "fixture_abi10");
    ck_assert_str_eq(json_string_value(json_object_get(abi10, "abi")), "1.0");
    ck_assert_str_eq(json_string_value(json_object_get(abi10, "sampler")), "gumbel");
    json_decref(r);

    json_t *req = s_generate("abi10", "once upon a time", 8);
    json_object_set_new(req, "remasking", json_string("fixture_abi10"));
    json_object_set_new(req, "steps", json_integer(4));
    r = s_done(s_call(s_sock, req));
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 8);
    json_decref(r);

    char *log = um_test_read_file(s_daemon.log, NULL);
    ck_assert(log != NULL);
    static const char *const reasons[] = {
        "bad_abi.so: built for plugin ABI 2.", "no_entry.so: no um_plugin_describe symbol",
        "bad_init.so: plugin \"fixture\" failed to initialize", "bad_kind.so: plugin",
        "no_table.so: remask plugin \"fixture\" has no complete function table",
        "dup_b.so: a remask plugin named \"fixture_dup\" is already loaded"};
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++)
        ck_assert_msg(strstr(log, reasons[i]) != NULL, "the log %s lacks \"%s\"",
                      s_daemon.log, reasons[i]);
    free(log);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Errors                                                                    */

START_TEST(test_error_json)
{
    s_expect_error_text("{\"op\": \"health\"", UM_ERR_BAD_JSON, NULL, "not valid JSON");
    s_expect_error_text("[1, 2]", UM_ERR_BAD_JSON, NULL, "must be a JSON object");
    s_expect_error_text("42", UM_ERR_BAD_JSON, NULL, "must be a JSON object");
    s_expect_error_text("", UM_ERR_BAD_JSON, NULL, "empty request");
    s_expect_error_text("{\"op\":\"health\",\"op\":\"info\"}", UM_ERR_BAD_JSON, NULL,
                        "duplicate");
    s_expect_error_text("{\"op\":\"health\"} trailing", UM_ERR_BAD_JSON, NULL,
                        "not valid JSON");
}
END_TEST

START_TEST(test_error_op)
{
    s_expect_error(json_pack("{s:s}", "id", "x"), UM_ERR_INVALID, "op", "missing field \"op\"");
    s_expect_error(json_pack("{s:i}", "op", 3), UM_ERR_INVALID, "op", "must be a string");
    s_expect_error(json_pack("{s:s, s:s}", "op", "generat", "id", "x"), UM_ERR_UNKNOWN_OP, "op",
                   "did you mean generate?");
    s_expect_error(json_pack("{s:s}", "op", "launch"), UM_ERR_UNKNOWN_OP, "op", "valid ops are");
    s_expect_error(json_pack("{s:s, s:[]}", "op", "health", "id"), UM_ERR_INVALID, "id",
                   "string or an integer");

    /* The error echoes the id when the request had a readable one. */
    s_send_json(s_sock, json_pack("{s:s, s:s}", "op", "launch", "id", "e7"));
    json_t *r = s_recv_must(s_sock);
    ck_assert_str_eq(s_id(r), "e7");
    json_decref(r);
}
END_TEST

START_TEST(test_error_fields)
{
    json_t *req = s_generate("f1", "hi", 8);
    json_object_set_new(req, "gen_lenght", json_integer(8));
    s_expect_error(req, UM_ERR_UNKNOWN_FIELD, "gen_lenght", "did you mean gen_length?");
    s_expect_error(json_pack("{s:s, s:s, s:s}", "op", "health", "id", "f2", "verbose", "yes"),
                   UM_ERR_UNKNOWN_FIELD, "verbose", "valid fields are op, id");

    req = s_generate("f3", "hi", 8);
    json_object_set_new(req, "gen_length", json_string("8"));
    s_expect_error(req, UM_ERR_INVALID, "gen_length",
                   "must be an integer, got the string \"8\": write a JSON number");
    req = s_generate("f4", "hi", 8);
    json_object_set_new(req, "steps", json_real(2.5));
    s_expect_error(req, UM_ERR_INVALID, "steps", "must be an integer");
    req = s_generate("f5", "hi", 8);
    json_object_set_new(req, "temperature", json_string("hot"));
    s_expect_error(req, UM_ERR_INVALID, "temperature", "must be a number");
    /* The message quotes 40 bytes, which end inside an "è": only that character is lost. */
    req = s_generate("f5b", "hi", 8);
    json_object_set_new(req, "temperature",
                        json_string("xtr\xc3\xa8s tr\xc3\xa8s tr\xc3\xa8s tr\xc3\xa8s "
                                    "tr\xc3\xa8s tr\xc3\xa8s tr\xc3\xa8s"));
    s_expect_error(req, UM_ERR_INVALID, "temperature", "\"xtr\xc3\xa8s tr\xc3\xa8s");
    req = s_generate("f6", "hi", 8);
    json_object_set_new(req, "stream", json_integer(1));
    s_expect_error(req, UM_ERR_INVALID, "stream", "true or false");
    s_expect_error(json_pack("{s:s, s:s, s:i}", "op", "generate", "id", "f7", "prompt", 5),
                   UM_ERR_INVALID, "prompt", "must be a string");
    s_expect_error(json_pack("{s:s, s:s}", "op", "generate", "id", "f8"), UM_ERR_INVALID,
                   "prompt", "missing field \"prompt\"");
    req = s_generate("f9", "hi", 8);
    json_object_set_new(req, "seed", json_integer(-1));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "seed", "must be at least 0");
    req = s_generate("f10", "hi", 8);
    json_object_set_new(req, "gen_length", json_integer(1LL << 40));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "gen_length", "must be at most 2147483647");
    s_expect_error(json_pack("{s:s, s:s, s:s}", "op", "detokenize", "id", "f11", "tokens", "1 2"),
                   UM_ERR_INVALID, "tokens", "must be an array");
    s_expect_error(json_pack("{s:s, s:s, s:[i,s]}", "op", "detokenize", "id", "f12", "tokens", 1,
                             "x"),
                   UM_ERR_INVALID, "tokens", "tokens[1] must be an integer");
    s_expect_error(json_pack("{s:s, s:s, s:[i,i]}", "op", "detokenize", "id", "f13", "tokens", 1,
                             99999999),
                   UM_ERR_OUT_OF_RANGE, "tokens", "99999999");
    s_expect_error(json_pack("{s:s, s:s, s:[i]}", "op", "detokenize", "id", "f14", "tokens", -3),
                   UM_ERR_OUT_OF_RANGE, "tokens", "-3");
    s_expect_error(json_pack("{s:s, s:s}", "op", "tokenize", "id", "f15"), UM_ERR_INVALID, "text",
                   "missing field \"text\"");
}
END_TEST

/* messages: its shape, its exclusion with prompt, and a model without a chat template. */
START_TEST(test_error_messages)
{
    s_expect_error(json_pack("{s:s, s:s, s:s, s:[{s:s, s:s}]}", "op", "generate", "id", "m1",
                             "prompt", "hi", "messages", "role", "user", "content", "hi"),
                   UM_ERR_INVALID, "prompt", "either \"prompt\" or \"messages\", not both");
    s_expect_error(json_pack("{s:s, s:s, s:[]}", "op", "generate", "id", "m2", "messages"),
                   UM_ERR_INVALID, "messages", "got an empty array");
    s_expect_error(json_pack("{s:s, s:s, s:{}}", "op", "generate", "id", "m3", "messages"),
                   UM_ERR_INVALID, "messages", "got an object");
    s_expect_error(json_pack("{s:s, s:s, s:[{s:s, s:s}]}", "op", "generate", "id", "m4",
                             "messages", "role", "robot", "content", "hi"),
                   UM_ERR_INVALID, "messages[0]", "role must be \"system\", \"user\" or "
                   "\"assistant\", got \"robot\"");
    s_expect_error(json_pack("{s:s, s:s, s:[{s:s, s:s}, {s:s, s:i}]}", "op", "generate", "id",
                             "m5", "messages", "role", "user", "content", "hi", "role", "user",
                             "content", 3),
                   UM_ERR_INVALID, "messages[1]", "content must be a string, got an integer");
    s_expect_error(json_pack("{s:s, s:s, s:[{s:s, s:s, s:s}]}", "op", "tokenize", "id", "m6",
                             "messages", "role", "user", "content", "hi", "name", "bob"),
                   UM_ERR_INVALID, "messages[0]", "unknown field \"name\"");
    /* The bundled model ships no chat template. */
    s_expect_error(json_pack("{s:s, s:s, s:[{s:s, s:s}]}", "op", "generate", "id", "m7",
                             "messages", "role", "user", "content", "hi"),
                   UM_ERR_INVALID, "messages", "has no chat_template");
    s_expect_error(json_pack("{s:s, s:s}", "op", "generate", "id", "m8"), UM_ERR_INVALID,
                   "prompt", "or \"messages\" for the model's chat template");
    s_assert_serving(s_sock);
}
END_TEST

/* A copy of the test model whose tokenizer_config.json has Dream's ChatML template. */
static char s_chat_model[64];

static void s_setup_daemon_chat(void)
{
    snprintf(s_chat_model, sizeof s_chat_model, "/tmp/unmaskd-chat-model-%ld", (long)getpid());
    mkdir(s_chat_model, 0755);
    const char *model = um_test_env("UM_TEST_MODEL");
    static const char *const files[] = {"config.json", "model.safetensors", "tokenizer.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char from[4096], to[4096];
        snprintf(from, sizeof from, "%s/%s", model, files[i]);
        snprintf(to, sizeof to, "%s/%s", s_chat_model, files[i]);
        unlink(to);
        ck_assert_int_eq(symlink(from, to), 0);
    }
    json_error_t jerr;
    json_t *doc = json_load_file(um_test_path(um_test_env("UM_TEST_FIXTURES"), "chat/cases.json"),
                                 0, &jerr);
    ck_assert_ptr_nonnull(doc);
    json_t *chatml = json_array_get(json_object_get(doc, "templates"), 1);
    ck_assert_str_eq(json_string_value(json_object_get(chatml, "kind")), "chatml");
    ck_assert_int_eq(json_dump_file(json_object_get(chatml, "tokenizer_config"),
                                    um_test_path(s_chat_model, "tokenizer_config.json"), 0), 0);
    json_decref(doc);
    const char *const extra[] = {"--model", s_chat_model, NULL};
    s_daemon_start_with(extra);
}

static void s_teardown_daemon_chat(void)
{
    s_teardown_daemon();
    static const char *const files[] = {"config.json", "model.safetensors", "tokenizer.json",
                                        "tokenizer_config.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        unlink(um_test_path(s_chat_model, files[i]));
    rmdir(s_chat_model);
}

/*
 * messages through the daemon: info names the template, tokenize returns the text Jinja
 * renders (tests/fixtures/chat) and its tokens, and generate reads the same prompt.
 */
START_TEST(test_generate_messages)
{
    json_t *info = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i")));
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(info, "model"),
                                                       "chat_template")), "chatml");
    json_decref(info);

    json_error_t jerr;
    json_t *doc = json_load_file(um_test_path(um_test_env("UM_TEST_FIXTURES"), "chat/cases.json"),
                                 0, &jerr);
    ck_assert_ptr_nonnull(doc);
    json_t *messages = json_array_get(json_object_get(doc, "conversations"), 2);
    json_t *want = json_array_get(json_object_get(json_array_get(json_object_get(doc,
                                                                                 "templates"), 1),
                                                  "rendered"), 2);
    json_t *tok = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:O}", "op", "tokenize", "id", "t",
                                                  "messages", messages)));
    ck_assert_msg(json_equal(json_object_get(tok, "text"), want), "rendered %s, expected %s",
                  json_string_value(json_object_get(tok, "text")), json_string_value(want));
    json_t *plain = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:O}", "op", "tokenize", "id",
                                                    "p", "text", want)));
    ck_assert(json_equal(json_object_get(tok, "tokens"), json_object_get(plain, "tokens")));

    /* A shorter chat to generate from: the bundled vocabulary splits the ChatML markers. */
    messages = json_array_get(json_object_get(doc, "conversations"), 0);
    want = json_array_get(json_object_get(json_array_get(json_object_get(doc, "templates"), 1),
                                          "rendered"), 0);
    json_decref(tok);
    tok = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:O}", "op", "tokenize", "id", "t0",
                                          "messages", messages)));
    size_t n_tokens = json_array_size(json_object_get(tok, "tokens"));

    json_t *gen = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:O, s:i, s:i}", "op", "generate",
                                                  "id", "g", "messages", messages, "gen_length",
                                                  8, "seed", 3)));
    ck_assert_int_eq(json_integer_value(json_object_get(gen, "prompt_tokens")),
                     (json_int_t)n_tokens);
    json_t *same = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:O, s:i, s:i}", "op",
                                                   "generate", "id", "g2", "prompt", want,
                                                   "gen_length", 8, "seed", 3)));
    ck_assert(json_equal(json_object_get(gen, "tokens"), json_object_get(same, "tokens")));
    json_decref(same);
    json_decref(gen);
    json_decref(plain);
    json_decref(tok);
    json_decref(doc);
}
END_TEST

START_TEST(test_error_ranges)
{
    json_t *req = s_generate("r1", "hi", 8);
    json_object_set_new(req, "steps", json_integer(0));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "steps", "steps must be at least 1, got 0");
    req = s_generate("r2", "hi", 8);
    json_object_set_new(req, "temperature", json_real(-0.5));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "temperature", "-0.5");
    req = s_generate("r3", "hi", 8);
    json_object_set_new(req, "block_length", json_integer(0));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "block_length", "block_length");
    req = s_generate("r4", "hi", 0);
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "gen_length", "gen_length");
    req = s_generate("r5", "hi", 8);
    json_object_set_new(req, "cfg_scale", json_real(-1));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "cfg_scale", "cfg_scale");

    int max = s_max_positions();
    s_expect_error(s_generate("r6", "once upon a time", max), UM_ERR_OUT_OF_RANGE, "gen_length",
                   "past the model's");

    /* Guidance large enough to overflow f32 logits is rejected, not turned into masks. */
    req = s_generate("r7", "hi", 8);
    json_object_set_new(req, "cfg_scale", json_real(1e39));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "cfg_scale", "cfg_scale");

    /* 2^63 as a JSON real is one past the largest seed. */
    req = s_generate("r8", "hi", 8);
    json_object_set_new(req, "seed", json_real(9223372036854775808.0));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "seed", "seed must be at most");

    req = s_generate("r9", "hi", 8);
    json_object_set_new(req, "steps", json_integer(-5));
    s_expect_error(req, UM_ERR_OUT_OF_RANGE, "steps", "steps must be at least 1, got -5");

    /* A prompt that fills every position names the prompt, not gen_length 0. */
    char *long_prompt = malloc((size_t)max * 3 + 1);
    for (int i = 0; i < max; i++)
        memcpy(long_prompt + 3 * i, " a.", 3);
    long_prompt[3 * max] = '\0';
    s_expect_error(s_generate("r10", long_prompt, 1), UM_ERR_OUT_OF_RANGE, "prompt",
                   "shorten the prompt");
    free(long_prompt);

    /* Far more steps than tokens: only the needed passes run, and the reply comes at once. */
    req = s_generate("r11", "hi", 4);
    json_object_set_new(req, "steps", json_integer(2147483647));
    json_t *r = s_done(s_call(s_sock, req));
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "stats"),
                                                        "forward_passes")), 4);
    json_decref(r);
}
END_TEST

START_TEST(test_error_plugins)
{
    json_t *req = s_generate("p1", "hi", 8);
    json_object_set_new(req, "remasking", json_string("low_confidense"));
    s_expect_error(req, UM_ERR_UNKNOWN_PLUGIN, "remasking", "did you mean low_confidence?");
    req = s_generate("p2", "hi", 8);
    json_object_set_new(req, "remasking", json_string("entropy_bound"));
    s_expect_error(req, UM_ERR_UNKNOWN_PLUGIN, "remasking",
                   "available: eb_sampler, entropy, factor, low_confidence, maskgit_plus, "
                   "origin, random, threshold, topk_margin");

    req = s_generate("p3", "hi", 8);
    json_object_set_new(req, "remasking_params", json_pack("{s:f}", "alpha", 0.5));
    s_expect_error(req, UM_ERR_UNKNOWN_FIELD, "remasking_params.alpha", "takes no parameters");
    req = s_generate("p4", "hi", 8);
    json_object_set_new(req, "remasking_params", json_integer(5));
    s_expect_error(req, UM_ERR_INVALID, "remasking_params", "must be an object");
    req = s_generate("p2n", "hi", 8);
    json_object_set_new(req, "remasking_params", json_null());
    s_expect_error(req, UM_ERR_INVALID, "remasking_params", "got null");

    /* An empty parameter object is fine. */
    req = s_generate("p5", "hi", 4);
    json_object_set_new(req, "remasking_params", json_object());
    json_object_set_new(req, "remasking", json_string("random"));
    json_decref(s_done(s_call(s_sock, req)));
}
END_TEST

START_TEST(test_error_missing_id)
{
    s_expect_error(json_pack("{s:s, s:s}", "op", "generate", "prompt", "hi"), UM_ERR_INVALID, "id",
                   "missing field \"id\"");
}
END_TEST

START_TEST(test_error_oversized)
{
    /* A valid tokenize request just over 1 MiB, the default limit. */
    size_t len = 1024 * 1024 + 100;
    char *text = malloc(len + 1);
    ck_assert(text != NULL);
    int head = snprintf(text, len, "{\"op\":\"tokenize\",\"id\":\"big\",\"text\":\"");
    memset(text + head, 'a', len - (size_t)head - 2);
    memcpy(text + len - 2, "\"}", 2);
    text[len] = '\0';
    s_expect_error_raw(text, len, UM_ERR_INVALID, NULL, "over the limit");
    free(text);
}
END_TEST

START_TEST(test_error_frames)
{
    const char *a = "{\"op\":\"health\"}";
    ck_assert(zmq_send(s_sock, a, strlen(a), ZMQ_SNDMORE) >= 0);
    s_expect_error_raw(a, strlen(a), UM_ERR_INVALID, NULL, "got 2 frames");
}
END_TEST

/* After all the bad requests above, a full generate still works. */
START_TEST(test_error_then_generate)
{
    s_expect_error_text("{", UM_ERR_BAD_JSON, NULL, "not valid JSON");
    json_t *r = s_done(s_call(s_sock, s_generate("ok", "the cat sat", 8)));
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 8);
    json_decref(r);
}
END_TEST

/*
 * A small generate that must succeed, sent after each bad request of the matrix
 * below: a bad request leaves no state behind that a valid one trips over.
 */
static void s_assert_generates(const char *id)
{
    json_t *r = s_done(s_call(s_sock, s_generate(id, "the cat sat", 2)));
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 2);
    json_decref(r);
}

/* One row of the generate field matrix: the field set to a JSON value, and the outcome. */
typedef struct s_field_case {
    const char *field;
    const char *value;   /* JSON text */
    const char *code;    /* the error code, or NULL when the request must succeed */
    const char *message; /* a piece of the error message: the value and the fix */
} s_field_case_t;

static const s_field_case_t s_field_cases[] = {
    /* Negative, zero and huge values of every numeric field. */
    {"gen_length", "-4", UM_ERR_OUT_OF_RANGE, "got -4: use a whole number in [1, 2147483647]"},
    {"gen_length", "0", UM_ERR_OUT_OF_RANGE, "got 0: use a whole number in [1, 2147483647]"},
    {"gen_length", "1099511627776", UM_ERR_OUT_OF_RANGE,
     "got 1099511627776: use a whole number in [1, 2147483647]"},
    {"gen_length", "2147483647", UM_ERR_OUT_OF_RANGE, "set gen_length to at most"},
    {"steps", "-5", UM_ERR_OUT_OF_RANGE, "got -5: use a whole number in [1, 2147483647]"},
    {"steps", "0", UM_ERR_OUT_OF_RANGE, "got 0: use a whole number in [1, 2147483647]"},
    {"steps", "1099511627776", UM_ERR_OUT_OF_RANGE, "got 1099511627776: use a whole number"},
    {"steps", "2147483647", NULL, NULL},
    {"block_length", "-3", UM_ERR_OUT_OF_RANGE, "got -3: use a whole number in [1, 2147483647]"},
    {"block_length", "0", UM_ERR_OUT_OF_RANGE, "got 0: use a whole number in [1, 2147483647]"},
    {"block_length", "1099511627776", UM_ERR_OUT_OF_RANGE, "got 1099511627776: use a whole"},
    {"block_length", "2147483647", NULL, NULL},
    {"temperature", "-0.5", UM_ERR_OUT_OF_RANGE, "got -0.5: use 0 for greedy decoding"},
    {"temperature", "0", NULL, NULL},
    {"temperature", "1e-9", UM_ERR_OUT_OF_RANGE, "got 1e-09: use 0 for greedy decoding"},
    {"temperature", "1e300", UM_ERR_OUT_OF_RANGE, "got 1e+300: use 0 for greedy decoding"},
    {"cfg_scale", "-1", UM_ERR_OUT_OF_RANGE, "got -1: use 0 to turn classifier-free"},
    {"cfg_scale", "0", NULL, NULL},
    {"cfg_scale", "1e300", UM_ERR_OUT_OF_RANGE, "got 1e+300: use 0 to turn classifier-free"},
    {"top_k", "-1", UM_ERR_OUT_OF_RANGE, "got -1: use a whole number in [0, 2147483647]"},
    {"top_k", "0", NULL, NULL},
    {"top_k", "1099511627776", UM_ERR_OUT_OF_RANGE, "got 1099511627776: use a whole number"},
    {"top_k", "2147483647", NULL, NULL},
    {"top_p", "-1", UM_ERR_OUT_OF_RANGE, "got -1: use 1 to keep every token"},
    {"top_p", "0", UM_ERR_OUT_OF_RANGE, "got 0: use 1 to keep every token"},
    {"top_p", "1e300", UM_ERR_OUT_OF_RANGE, "got 1e+300: use 1 to keep every token"},
    {"top_p", "1", NULL, NULL},
    {"eps", "-1", UM_ERR_OUT_OF_RANGE, "got -1: Dream uses 0.001"},
    {"eps", "0", NULL, NULL},
    {"eps", "1e300", UM_ERR_OUT_OF_RANGE, "got 1e+300: Dream uses 0.001"},
    {"seed", "-1", UM_ERR_OUT_OF_RANGE, "got -1: use a whole number in [0, 9223372036854775807]"},
    {"seed", "0", NULL, NULL},
    {"seed", "9223372036854775807", NULL, NULL},
    {"seed", "9223372036854775808.0", UM_ERR_OUT_OF_RANGE, "use a whole number in [0, "},
    /* Wrong JSON types. */
    {"gen_length", "\"8\"", UM_ERR_INVALID, "got the string \"8\": write a JSON number"},
    {"steps", "2.5", UM_ERR_INVALID, "got 2.5: use a whole number in [1, 2147483647]"},
    {"block_length", "null", UM_ERR_INVALID, "got null: use a whole number"},
    {"temperature", "\"hot\"", UM_ERR_INVALID, "got the string \"hot\": write a JSON number"},
    {"cfg_scale", "true", UM_ERR_INVALID, "got true: write a JSON number"},
    {"top_k", "[5]", UM_ERR_INVALID, "got an array: use a whole number in [0, 2147483647]"},
    {"top_p", "{}", UM_ERR_INVALID, "got an object: write a JSON number"},
    {"eps", "\"0.1\"", UM_ERR_INVALID, "got the string \"0.1\": write a JSON number"},
    {"seed", "\"1\"", UM_ERR_INVALID, "got the string \"1\": write a JSON number"},
    {"stream", "1", UM_ERR_INVALID, "true or false, got an integer: write the JSON literal"},
    {"early_stop", "\"yes\"", UM_ERR_INVALID, "true or false, got a string"},
    {"prompt", "5", UM_ERR_INVALID, "must be a string, got an integer: put the text in double"},
    {"remasking", "5", UM_ERR_INVALID, "must be a string, got an integer: put the text in"},
    {"schedule", "1", UM_ERR_INVALID, "must be a string, got an integer"},
    {"remasking_params", "[]", UM_ERR_INVALID, "must be an object of parameter names"},
    /* Names: a misspelled field, an unknown schedule. */
    {"temprature", "0.5", UM_ERR_UNKNOWN_FIELD, "did you mean temperature?"},
    {"schedule", "\"linear\"", UM_ERR_INVALID, "unknown schedule \"linear\""},
};

/*
 * The generate field matrix: each row its own request, an error naming the field, the
 * value and the fix for a bad value (then a valid generate succeeds), a normal reply
 * for a valid one.
 */
START_TEST(test_error_field_matrix)
{
    for (size_t i = 0; i < sizeof s_field_cases / sizeof s_field_cases[0]; i++) {
        const s_field_case_t *c = &s_field_cases[i];
        char id[32];
        snprintf(id, sizeof id, "m%zu", i);
        json_t *req = s_generate(id, "hi", 4);
        json_error_t jerr;
        json_t *value = json_loads(c->value, JSON_DECODE_ANY, &jerr);
        ck_assert_msg(value != NULL, "row %zu: %s", i, jerr.text);
        json_object_set_new(req, c->field, value);
        if (!c->code) {
            char *text = json_dumps(req, JSON_COMPACT);
            json_t *r = s_call(s_sock, req);
            ck_assert_msg(strcmp(s_type(r), UM_REPLY_DONE) == 0, "%s = %s should be accepted: "
                          "request %s got %s", c->field, c->value, text,
                          json_dumps(r, JSON_COMPACT));
            ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 4);
            json_decref(r);
            free(text);
            continue;
        }
        s_expect_error(req, c->code, c->field, c->message);
        s_assert_generates("after");
    }
}
END_TEST

/*
 * Text faults: prompts that are not UTF-8, hold a raw control character or half a
 * surrogate pair name the field they are in; NUL written as \u0000 and an empty prompt
 * are valid text and generate.
 */
START_TEST(test_error_text)
{
    static const char bad_utf8[] = "{\"op\":\"generate\",\"id\":\"x1\",\"prompt\":\"ab\xff" "cd\"}";
    s_expect_error_raw(bad_utf8, sizeof bad_utf8 - 1, UM_ERR_BAD_JSON, "prompt",
                       "prompt is not valid UTF-8 (unable to decode byte 0xff");
    s_assert_generates("after");
    static const char overlong[] = "{\"op\":\"generate\",\"id\":\"x2\",\"prompt\":\"\xc0\xaf\"}";
    s_expect_error_raw(overlong, sizeof overlong - 1, UM_ERR_BAD_JSON, "prompt",
                       "send the text encoded as UTF-8");
    s_assert_generates("after");
    static const char chat[] = "{\"op\":\"generate\",\"id\":\"x3\",\"messages\":[{\"role\":"
                               "\"user\",\"content\":\"x\xc3(\"}]}";
    s_expect_error_raw(chat, sizeof chat - 1, UM_ERR_BAD_JSON, "messages[0].content",
                       "is not valid UTF-8");
    s_assert_generates("after");
    static const char bad_id[] = "{\"op\":\"health\",\"id\":\"\xfe\"}";
    s_expect_error_raw(bad_id, sizeof bad_id - 1, UM_ERR_BAD_JSON, "id", "is not valid UTF-8");
    s_assert_generates("after");
    s_expect_error_text("{\"op\":\"generate\",\"id\":\"x4\",\"prompt\":\"ab\\ud800\"}",
                        UM_ERR_BAD_JSON, "prompt", "surrogate pair");
    s_assert_generates("after");
    static const char raw_nul[] = "{\"op\":\"generate\",\"id\":\"x5\",\"prompt\":\"a\0b\"}";
    s_expect_error_raw(raw_nul, sizeof raw_nul - 1, UM_ERR_BAD_JSON, "prompt",
                       "escape control characters as JSON requires, e.g. \\u0000 for NUL");
    s_assert_generates("after");
    static const char raw_newline[] = "{\"op\":\"generate\",\"id\":\"x6\",\"prompt\":\"a\nb\"}";
    s_expect_error_raw(raw_newline, sizeof raw_newline - 1, UM_ERR_BAD_JSON, "prompt",
                       "raw line break");
    s_assert_generates("after");
    s_expect_error_text("{\"op\":\"generate\",\"id\":\"x7\",\"prompt\":\"a\\qb\"}",
                        UM_ERR_BAD_JSON, "prompt", "write a backslash as \\\\");
    s_assert_generates("after");
    s_expect_error_text("\"generate\"", UM_ERR_BAD_JSON, NULL, "got a string");
    s_expect_error_text("null", UM_ERR_BAD_JSON, NULL, "got null");

    /* \u0000 is a character like any other: the prompt keeps it and generates. */
    json_t *req = json_pack("{s:s, s:s, s:s#, s:i, s:i}", "op", "generate", "id", "nul",
                            "prompt", "once\0upon", (size_t)9, "gen_length", 4, "seed", 1);
    json_t *r = s_done(s_call(s_sock, req));
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 4);
    json_decref(r);

    /* An empty prompt is unconditional generation, which masked diffusion supports. */
    r = s_done(s_call(s_sock, s_generate("empty", "", 6)));
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 6);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "prompt_tokens")), 0);
    json_decref(r);
}
END_TEST

/* A request split over several frames, with or without a REQ-style delimiter. */
START_TEST(test_error_frames_more)
{
    const char *a = "{\"op\":\"health\"}";
    ck_assert(zmq_send(s_sock, a, strlen(a), ZMQ_SNDMORE) >= 0);
    ck_assert(zmq_send(s_sock, a, strlen(a), ZMQ_SNDMORE) >= 0);
    s_expect_error_raw(a, strlen(a), UM_ERR_INVALID, NULL, "got 3 frames");
    s_assert_generates("after");

    /* After an empty delimiter frame the reply repeats it, as a REQ socket expects. */
    ck_assert(zmq_send(s_sock, "", 0, ZMQ_SNDMORE) >= 0);
    ck_assert(zmq_send(s_sock, a, strlen(a), ZMQ_SNDMORE) >= 0);
    ck_assert(zmq_send(s_sock, a, strlen(a), 0) >= 0);
    zmq_pollitem_t item = {.socket = s_sock, .events = ZMQ_POLLIN};
    ck_assert_int_eq(zmq_poll(&item, 1, s_reply_timeout_ms()), 1);
    char buf[1024];
    ck_assert_int_eq(zmq_recv(s_sock, buf, sizeof buf, 0), 0);
    int n = zmq_recv(s_sock, buf, sizeof buf - 1, 0);
    ck_assert_int_gt(n, 0);
    buf[n < (int)sizeof buf - 1 ? n : (int)sizeof buf - 1] = '\0';
    ck_assert_msg(strstr(buf, "\"invalid_request\"") && strstr(buf, "got 2 frames"),
                  "reply: %s", buf);
    s_assert_generates("after");
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Batching                                                                  */

static json_t *s_long_generate(const char *id, int stream);

/* Requests of different prompts, lengths, policies, temperatures, guidance and caches. */
#define S_N_BATCH 6

static json_t *s_batch_request(int i, const char *id)
{
    static const char *const prompts[] = {"once upon a time", "the cat sat on the",
                                          "lily and tom went to the park",
                                          "one day a little bird", "the sun was", "mom said"};
    static const char *const policies[] = {"low_confidence", "random", "topk_margin",
                                           "entropy", "low_confidence", "maskgit_plus"};
    json_t *req = s_generate(id, prompts[i], 8 + 4 * i);
    json_object_set_new(req, "steps", json_integer(4 + 2 * i));
    json_object_set_new(req, "block_length", json_integer(i % 2 ? 4 + 2 * i : 8 + 4 * i));
    json_object_set_new(req, "remasking", json_string(policies[i]));
    json_object_set_new(req, "temperature", json_real(i % 3 == 1 ? 0.7 : 0.0));
    json_object_set_new(req, "cfg_scale", json_real(i % 3 == 2 ? 1.5 : 0.0));
    json_object_set_new(req, "seed", json_integer(100 + i));
    json_object_set_new(req, "stream", json_boolean(i % 2));
    /* Two requests with a block cache share the batch's passes too. */
    if (i == 3 || i == 4)
        json_object_set_new(req, "cache", json_string(i == 3 ? "dual" : "prefix"));
    return req;
}

/* The stats' batch_size of a done reply. */
static json_int_t s_batch_size(const json_t *done)
{
    return json_integer_value(json_object_get(json_object_get(done, "stats"), "batch_size"));
}

/* Assert that two done replies carry the same generation. */
static void s_assert_same_generation(const json_t *a, const json_t *b, const char *what)
{
    ck_assert_msg(json_equal(json_object_get(a, "tokens"), json_object_get(b, "tokens")),
                  "%s: the tokens differ from the request's reply alone", what);
    ck_assert_str_eq(json_string_value(json_object_get(a, "text")),
                     json_string_value(json_object_get(b, "text")));
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(a, "stats"),
                                                        "forward_passes")),
                     json_integer_value(json_object_get(json_object_get(b, "stats"),
                                                        "forward_passes")));
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(a, "stats"),
                                                        "cached_passes")),
                     json_integer_value(json_object_get(json_object_get(b, "stats"),
                                                        "cached_passes")));
}

/* The done reply of each batch request sent alone, one after another. */
static void s_batch_alone(json_t *alone[S_N_BATCH])
{
    for (int i = 0; i < S_N_BATCH; i++) {
        char id[16];
        snprintf(id, sizeof id, "alone%d", i);
        s_send_json(s_sock, s_batch_request(i, id));
        alone[i] = s_done(s_wait_final(s_sock, id, NULL));
        ck_assert_int_eq(s_batch_size(alone[i]), 1);
        json_int_t cached = json_integer_value(json_object_get(json_object_get(alone[i],
                                                                               "stats"),
                                                               "cached_passes"));
        if (i == 3 || i == 4)
            ck_assert_int_gt(cached, 0);
    }
}

/*
 * Send every batch request at once, each from its own client, and check every reply
 * against the request's reply alone: the same tokens and text, its own step stream and
 * exactly one final reply. Returns the largest batch_size reported.
 */
static json_int_t s_batch_concurrent(json_t *alone[S_N_BATCH])
{
    void *socks[S_N_BATCH];
    for (int i = 0; i < S_N_BATCH; i++)
        socks[i] = s_dealer(s_ctx, s_daemon.endpoint);
    for (int i = 0; i < S_N_BATCH; i++)
        s_send_json(socks[i], s_batch_request(i, "together"));
    json_int_t largest = 0;
    for (int i = 0; i < S_N_BATCH; i++) {
        json_t *steps = json_array();
        json_t *r = s_done(s_wait_final(socks[i], "together", steps));
        char what[32];
        snprintf(what, sizeof what, "request %d", i);
        s_assert_same_generation(r, alone[i], what);
        json_int_t passes = json_integer_value(json_object_get(json_object_get(r, "stats"),
                                                                "forward_passes"));
        /* A streamed request gets one step reply per forward pass; the others none. */
        ck_assert_int_eq((json_int_t)json_array_size(steps), i % 2 ? passes : 0);
        if (s_batch_size(r) > largest)
            largest = s_batch_size(r);
        json_decref(steps);
        json_decref(r);
    }
    for (int i = 0; i < S_N_BATCH; i++) {
        s_assert_quiet(socks[i]);
        zmq_close(socks[i]);
    }
    return largest;
}

/*
 * Six clients send at once to a daemon with --max-batch 4: every reply equals the same
 * request's reply alone (fixed seeds), and the stats show requests that shared passes.
 */
START_TEST(test_batch_matches_alone)
{
    json_t *info = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "info", "id", "i")));
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(info, "limits"),
                                                        "max_batch")), 4);
    json_decref(info);
    json_t *alone[S_N_BATCH];
    s_batch_alone(alone);
    json_int_t largest = s_batch_concurrent(alone);
    ck_assert_int_gt(largest, 1);
    ck_assert_int_le(largest, 4);
    for (int i = 0; i < S_N_BATCH; i++)
        json_decref(alone[i]);
}
END_TEST

/* With --max-batch 1 concurrent requests run one at a time and give the same replies. */
START_TEST(test_batch_serial)
{
    json_t *alone[S_N_BATCH];
    s_batch_alone(alone);
    ck_assert_int_eq(s_batch_concurrent(alone), 1);
    for (int i = 0; i < S_N_BATCH; i++)
        json_decref(alone[i]);
}
END_TEST

/*
 * A long request is cancelled after its first step while two others run in its batch:
 * it gets one cancelled reply, and the others equal their replies alone.
 */
START_TEST(test_batch_cancel_one)
{
    json_t *alone[S_N_BATCH];
    s_batch_alone(alone);
    void *victim = s_dealer(s_ctx, s_daemon.endpoint);
    void *socks[2] = {s_dealer(s_ctx, s_daemon.endpoint), s_dealer(s_ctx, s_daemon.endpoint)};
    s_send_json(victim, s_long_generate("long", 1));
    for (int i = 0; i < 2; i++)
        s_send_json(socks[i], s_batch_request(2 + i, "other"));
    json_t *r = s_recv_must(victim);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);
    s_send_json(victim, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x", "target",
                                  "long"));
    int cancelled = 0, cancel_done = 0;
    while (!cancelled || !cancel_done) {
        r = s_recv_must(victim);
        if (strcmp(s_id(r), "x") == 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
            cancel_done = 1;
        } else if (strcmp(s_type(r), UM_REPLY_STEP) != 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
            cancelled = 1;
        }
        json_decref(r);
    }
    for (int i = 0; i < 2; i++) {
        r = s_done(s_wait_final(socks[i], "other", NULL));
        s_assert_same_generation(r, alone[2 + i], "a request batched with a cancelled one");
        ck_assert_int_gt(s_batch_size(r), 1);
        json_decref(r);
        s_assert_quiet(socks[i]);
        zmq_close(socks[i]);
    }
    s_assert_quiet(victim);
    zmq_close(victim);
    for (int i = 0; i < S_N_BATCH; i++)
        json_decref(alone[i]);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Cancel, duplicates, queue                                                 */

/*
 * A generate that runs long enough to be cancelled: every position of the model, one
 * per step, with guidance doubling the work of each step.
 */
static json_t *s_long_generate(const char *id, int stream)
{
    int max = s_max_positions();
    int gen = max - 8;
    json_t *req = s_generate(id, "once upon a time", gen);
    json_object_set_new(req, "steps", json_integer(gen));
    json_object_set_new(req, "cfg_scale", json_real(1.0));
    json_object_set_new(req, "stream", json_boolean(stream));
    return req;
}

START_TEST(test_cancel_running)
{
    s_send_json(s_sock, s_long_generate("c1", 1));
    json_t *r = s_recv_must(s_sock);
    ck_assert_str_eq(s_id(r), "c1");
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);

    s_send_json(s_sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x1", "target", "c1"));
    int cancel_done = 0, target_final = 0, steps = 1, steps_after = 0;
    while (!cancel_done || !target_final) {
        r = s_recv_must(s_sock);
        if (strcmp(s_id(r), "x1") == 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
            cancel_done++;
        } else {
            ck_assert_str_eq(s_id(r), "c1");
            if (strcmp(s_type(r), UM_REPLY_STEP) == 0) {
                steps++;
                steps_after += cancel_done;
            } else {
                ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
                ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "cancel");
                target_final++;
            }
        }
        json_decref(r);
    }
    /*
     * The cancel's reply leaves when the flag is set, so the steps after it are the one
     * that was running plus any already waiting to be forwarded.
     */
    ck_assert_int_le(steps_after, 3);
    ck_assert_int_lt(steps, s_max_positions() - 8);
    s_assert_quiet(s_sock);

    s_expect_error(json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x2", "target", "c1"),
                   UM_ERR_NOT_FOUND, "target", "c1");
    s_expect_error(json_pack("{s:s, s:s}", "op", "cancel", "id", "x3"), UM_ERR_INVALID, "target",
                   "missing field");
}
END_TEST

START_TEST(test_cancel_queued)
{
    s_send_json(s_sock, s_long_generate("q1", 0));
    s_send_json(s_sock, s_long_generate("q2", 0));
    s_send_json(s_sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x1", "target", "q2"));

    /* The queued target gets its cancelled reply at once, before the cancel's own reply. */
    json_t *r = s_recv_must(s_sock);
    ck_assert_str_eq(s_id(r), "q2");
    ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
    json_decref(r);
    r = s_recv_must(s_sock);
    ck_assert_str_eq(s_id(r), "x1");
    ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
    json_decref(r);

    r = s_done(s_call(s_sock, s_health("h")));
    ck_assert(json_is_true(json_object_get(r, "busy")));
    ck_assert_int_eq(json_integer_value(json_object_get(r, "queue")), 0);
    json_decref(r);

    s_send_json(s_sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x2", "target", "q1"));
    json_t *final = s_wait_final(s_sock, "q1", NULL);
    ck_assert_str_eq(s_type(final), UM_REPLY_CANCELLED);
    json_decref(final);
    s_assert_quiet(s_sock);
}
END_TEST

START_TEST(test_duplicate_id)
{
    s_send_json(s_sock, s_long_generate("d1", 0));
    json_t *dup = s_long_generate("d1", 0);
    s_send_json(s_sock, dup);
    json_t *r = s_recv_must(s_sock);
    ck_assert_str_eq(s_id(r), "d1");
    ck_assert_str_eq(s_type(r), UM_REPLY_ERROR);
    json_t *e = json_object_get(r, "error");
    ck_assert_str_eq(json_string_value(json_object_get(e, "code")), UM_ERR_DUPLICATE_ID);
    ck_assert_str_eq(json_string_value(json_object_get(e, "field")), "id");
    json_decref(r);

    /* Ids are scoped per connection: another socket may reuse d1. */
    void *other = s_dealer(s_ctx, s_daemon.endpoint);
    s_send_json(other, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x", "target", "d1"));
    r = s_recv_must(other);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(r, "error"), "code")),
                     UM_ERR_NOT_FOUND);
    json_decref(r);
    zmq_close(other);

    s_send_json(s_sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x", "target", "d1"));
    int cancel_done = 0, target_final = 0;
    while (!cancel_done || !target_final) {
        r = s_recv_must(s_sock);
        if (strcmp(s_id(r), "x") == 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
            cancel_done++;
        } else {
            ck_assert_str_eq(s_id(r), "d1");
            ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
            target_final++;
        }
        json_decref(r);
    }
    s_assert_quiet(s_sock);

    /* Once d1 has ended, its id is free again. */
    json_decref(s_done(s_call(s_sock, s_generate("d1", "hi", 4))));
}
END_TEST

START_TEST(test_queue_busy)
{
    s_send_json(s_sock, s_long_generate("b1", 0)); /* runs */
    s_send_json(s_sock, s_long_generate("b2", 0)); /* waits: the queue has room for 1 */
    s_send_json(s_sock, s_long_generate("b3", 0)); /* over the limit */
    json_t *r = s_recv_must(s_sock);
    ck_assert_str_eq(s_id(r), "b3");
    ck_assert_str_eq(s_type(r), UM_REPLY_ERROR);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(r, "error"), "code")),
                     UM_ERR_BUSY);
    json_decref(r);

    r = s_done(s_call(s_sock, s_health("h")));
    ck_assert_int_eq(json_integer_value(json_object_get(r, "queue")), 1);
    ck_assert(json_is_true(json_object_get(r, "busy")));
    json_decref(r);

    s_send_json(s_sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x2", "target", "b2"));
    s_send_json(s_sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x1", "target", "b1"));
    int finals = 0, cancels = 0;
    while (finals < 2 || cancels < 2) {
        r = s_recv_must(s_sock);
        if (s_id(r)[0] == 'x')
            cancels++;
        else if (strcmp(s_type(r), UM_REPLY_CANCELLED) == 0)
            finals++;
        json_decref(r);
    }
    json_decref(s_done(s_call(s_sock, s_generate("b4", "hi", 4))));
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Shutdown                                                                  */

/* After SIGTERM the running and the waiting request get cancelled, then the daemon exits 0. */
START_TEST(test_shutdown)
{
    s_daemon_t d = {.pid = -1};
    ck_assert_int_eq(s_daemon_spawn(&d, NULL), 0);
    ck_assert_msg(s_daemon_wait_ready(&d, 60000) == 0, "daemon not ready: see %s", d.log);

    void *ctx = zmq_ctx_new();
    void *sock = s_dealer(ctx, d.endpoint);
    json_t *req = s_generate("run", "once upon a time", 100);
    json_object_set_new(req, "steps", json_integer(100));
    json_object_set_new(req, "stream", json_true());
    s_send_json(sock, req);
    s_send_json(sock, s_generate("wait", "once upon a time", 16));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);

    kill(d.pid, SIGTERM);
    int run_final = 0, wait_final = 0;
    while (!run_final || !wait_final) {
        r = s_recv_must(sock);
        if (strcmp(s_id(r), "wait") == 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
            ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "shutdown");
            wait_final++;
        } else if (strcmp(s_type(r), UM_REPLY_STEP) != 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
            ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "shutdown");
            run_final++;
        }
        json_decref(r);
    }
    ck_assert_int_eq(run_final, 1);
    ck_assert_int_eq(wait_final, 1);
    zmq_close(sock);
    zmq_ctx_term(ctx);

    int status = s_daemon_stop(&d, 30000);
    ck_assert_msg(status >= 0 && WIFEXITED(status), "daemon did not exit: see %s", d.log);
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}
END_TEST

START_TEST(test_startup_failures)
{
    /* A model folder that does not exist: a clear message and a nonzero exit. */
    const char *bin = um_test_env("UM_TEST_DAEMON");
    const char *argv[] = {bin, "--model", "/nonexistent/model", "--bind",
                          "ipc:///tmp/unmaskd-test-never.sock", NULL};
    char log[512];
    const char *out = getenv("UM_TEST_OUT");
    snprintf(log, sizeof log, "%s/server-startup-%ld.log", out && *out ? out : "/tmp",
             (long)getpid());
    if (out && *out)
        mkdir(out, 0777);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid;
    ck_assert_int_eq(posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    ck_assert_int_ne(WEXITSTATUS(status), 0);
    char *text = um_test_read_file(log, NULL);
    ck_assert(text != NULL);
    ck_assert_msg(strstr(text, "/nonexistent/model") && strstr(text, "--model"),
                  "message does not name the folder and --model: %s", text);
    free(text);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* The unmask client                                                         */

typedef struct s_run_result {
    int status;
    char *out;
    char *err;
} s_run_result_t;

/* Run the client binary with args (NULL-terminated) and capture its output. */
static s_run_result_t s_run_client(const char *const *args)
{
    const char *bin = um_test_env("UM_TEST_CLIENT");
    char out_path[256], err_path[256];
    snprintf(out_path, sizeof out_path, "/tmp/unmask-test-%ld.out", (long)getpid());
    snprintf(err_path, sizeof err_path, "/tmp/unmask-test-%ld.err", (long)getpid());
    const char *argv[32] = {bin};
    int argc = 1;
    for (int i = 0; args[i] && argc < 31; i++)
        argv[argc++] = args[i];
    argv[argc] = NULL;

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out_path, O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, err_path, O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    pid_t pid;
    ck_assert_int_eq(posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    s_run_result_t res = {0};
    ck_assert_int_eq(waitpid(pid, &res.status, 0), pid);
    ck_assert_msg(WIFEXITED(res.status), "unmask was killed by a signal");
    res.status = WEXITSTATUS(res.status);
    res.out = um_test_read_file(out_path, NULL);
    res.err = um_test_read_file(err_path, NULL);
    unlink(out_path);
    unlink(err_path);
    ck_assert(res.out && res.err);
    return res;
}

static void s_run_free(s_run_result_t *r)
{
    free(r->out);
    free(r->err);
}

START_TEST(test_client_plain)
{
    const char *prompt = "the cat sat";
    const char *args[] = {"--connect", s_daemon.endpoint, "--plain", "--gen-length", "12",
                          "--seed", "4", prompt, NULL};
    s_run_result_t res = s_run_client(args);
    ck_assert_msg(res.status == 0, "unmask exited %d: %s", res.status, res.err);

    /* The output is the prompt plus the text the daemon generates for the same request. */
    json_t *req = s_generate("cmp", prompt, 12);
    json_object_set_new(req, "seed", json_integer(4));
    json_t *r = s_done(s_call(s_sock, req));
    char want[4096];
    snprintf(want, sizeof want, "%s%s\n", prompt, json_string_value(json_object_get(r, "text")));
    ck_assert_str_eq(res.out, want);
    json_decref(r);
    s_run_free(&res);
}
END_TEST

START_TEST(test_client_json)
{
    const char *args[] = {"--connect", s_daemon.endpoint, "--json", "--gen-length", "8",
                          "--steps", "4", "--remasking", "random", "--seed", "2",
                          "once upon a time", NULL};
    s_run_result_t res = s_run_client(args);
    ck_assert_msg(res.status == 0, "unmask exited %d: %s", res.status, res.err);
    json_error_t jerr;
    json_t *r = json_loads(res.out, 0, &jerr);
    ck_assert_msg(r != NULL, "unmask --json printed invalid JSON: %s: %s", jerr.text, res.out);
    ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
    ck_assert_int_eq(json_array_size(json_object_get(r, "tokens")), 8);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "seed")), 2);
    json_decref(r);
    s_run_free(&res);
}
END_TEST

/* unmask --score: the same estimate as the score request it stands for. */
START_TEST(test_client_score)
{
    const char *args[] = {"--connect", s_daemon.endpoint, "--json", "--score", " she smiled.",
                          "--samples", "4", "--seed", "5", "the girl saw a cat.", NULL};
    s_run_result_t res = s_run_client(args);
    ck_assert_msg(res.status == 0, "unmask exited %d: %s", res.status, res.err);
    json_t *a = json_loads(res.out, 0, NULL);
    ck_assert_msg(a != NULL, "unmask --json printed invalid JSON: %s", res.out);
    json_t *b = s_done(s_call(s_sock, json_pack("{s:s, s:s, s:s, s:s, s:i, s:i}", "op", "score",
                                                "id", "x", "prompt", "the girl saw a cat.",
                                                "answer", " she smiled.", "n_samples", 4,
                                                "seed", 5)));
    ck_assert(json_equal(json_object_get(a, "log_likelihood"),
                         json_object_get(b, "log_likelihood")));
    ck_assert_int_eq(json_integer_value(json_object_get(a, "n_samples")), 4);
    json_decref(a);
    json_decref(b);
    s_run_free(&res);

    const char *plain[] = {"--connect", s_daemon.endpoint, "--score", " she smiled.",
                           "--samples", "2", "the girl saw a cat.", NULL};
    res = s_run_client(plain);
    ck_assert_msg(res.status == 0, "unmask exited %d: %s", res.status, res.err);
    ck_assert_msg(strstr(res.out, "log p(answer | prompt) = -") != NULL, "%s", res.out);
    s_run_free(&res);
}
END_TEST

/* The client's sampling flags reach the daemon: the same request by hand gives the same reply. */
START_TEST(test_client_sampling_flags)
{
    const char *args[] = {"--connect", s_daemon.endpoint, "--json", "--gen-length", "16",
                          "--block-length", "8", "--steps", "8", "--remasking", "entropy",
                          "--param", "alg_temp=0.5", "--schedule", "quota", "--eps", "0.01",
                          "--temperature", "0.7", "--top-k", "30", "--top-p", "0.9",
                          "--suppress-eos", "--early-stop", "--trim-eos", "--seed", "3",
                          "once upon a time", NULL};
    s_run_result_t res = s_run_client(args);
    ck_assert_msg(res.status == 0, "unmask exited %d: %s", res.status, res.err);
    json_t *a = json_loads(res.out, 0, NULL);
    ck_assert_msg(a != NULL, "unmask --json printed invalid JSON: %s", res.out);
    s_done(a);

    json_t *req = s_generate("flags", "once upon a time", 16);
    json_object_set_new(req, "block_length", json_integer(8));
    json_object_set_new(req, "steps", json_integer(8));
    json_object_set_new(req, "remasking", json_string("entropy"));
    json_object_set_new(req, "remasking_params", json_pack("{s:f}", "alg_temp", 0.5));
    json_object_set_new(req, "schedule", json_string("quota"));
    json_object_set_new(req, "eps", json_real(0.01));
    json_object_set_new(req, "temperature", json_real(0.7));
    json_object_set_new(req, "top_k", json_integer(30));
    json_object_set_new(req, "top_p", json_real(0.9));
    json_object_set_new(req, "suppress_eos_confidence", json_true());
    json_object_set_new(req, "early_stop", json_true());
    json_object_set_new(req, "trim_eos", json_true());
    json_object_set_new(req, "seed", json_integer(3));
    json_t *b = s_done(s_call(s_sock, req));
    ck_assert(json_equal(json_object_get(a, "tokens"), json_object_get(b, "tokens")));
    ck_assert(json_equal(json_object_get(a, "finish"), json_object_get(b, "finish")));
    json_decref(a);
    json_decref(b);
    s_run_free(&res);

    const char *bad[] = {"--connect", s_daemon.endpoint, "--top-p", "0", "x", NULL};
    res = s_run_client(bad);
    ck_assert_int_eq(res.status, 2);
    ck_assert_msg(strstr(res.err, "--top-p") != NULL, "stderr: %s", res.err);
    s_run_free(&res);
}
END_TEST

START_TEST(test_client_errors)
{
    /* An error reply: exit 1 with the code and message on stderr. */
    const char *bad[] = {"--connect", s_daemon.endpoint, "--plain", "--remasking", "nope", "x",
                         NULL};
    s_run_result_t res = s_run_client(bad);
    ck_assert_int_eq(res.status, 1);
    ck_assert_msg(strstr(res.err, "unknown_plugin") != NULL, "stderr: %s", res.err);
    s_run_free(&res);

    /* A flag checked locally. */
    const char *flag[] = {"--connect", s_daemon.endpoint, "--steps", "0", "x", NULL};
    res = s_run_client(flag);
    ck_assert_int_eq(res.status, 2);
    ck_assert_msg(strstr(res.err, "--steps") != NULL, "stderr: %s", res.err);
    s_run_free(&res);

    const char *delay[] = {"--connect", s_daemon.endpoint, "--step-delay", "-1", "x", NULL};
    res = s_run_client(delay);
    ck_assert_int_eq(res.status, 2);
    ck_assert_msg(strstr(res.err, "--step-delay") != NULL, "stderr: %s", res.err);
    s_run_free(&res);

    /* Nothing listens: exit 2 with a message that names the fix. */
    const char *none[] = {"--connect", "ipc:///tmp/unmaskd-test-nobody-listens.sock", "--plain",
                          "--timeout", "1", "x", NULL};
    res = s_run_client(none);
    ck_assert_int_eq(res.status, 2);
    ck_assert_msg(strstr(res.err, "no reply from ipc:///tmp/unmaskd-test-nobody-listens.sock "
                                  "within 1 s: is unmaskd running?") != NULL,
                  "stderr: %s", res.err);
    s_run_free(&res);
}
END_TEST

/* A second daemon on the running one's ipc path fails instead of taking it over. */
START_TEST(test_ipc_in_use)
{
    const char *bin = um_test_env("UM_TEST_DAEMON");
    const char *argv[] = {bin, "--model", um_test_env("UM_TEST_MODEL"), "--plugin-dir",
                          um_test_env("UM_TEST_PLUGINS"), "--bind", s_daemon.endpoint, NULL};
    char log[512];
    const char *out = getenv("UM_TEST_OUT");
    snprintf(log, sizeof log, "%s/server-second-%ld.log", out && *out ? out : "/tmp",
             (long)getpid());
    if (out && *out)
        mkdir(out, 0777);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid;
    int status;
    ck_assert_int_eq(posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    ck_assert_int_ne(WEXITSTATUS(status), 0);
    char *text = um_test_read_file(log, NULL);
    ck_assert(text != NULL);
    ck_assert_msg(strstr(text, "another process is listening") != NULL, "message: %s", text);
    free(text);
    json_t *h = s_done(s_call(s_sock, json_pack("{s:s, s:s}", "op", "health", "id", "h")));
    ck_assert_str_eq(json_string_value(json_object_get(h, "status")), "ok");
    json_decref(h);
}
END_TEST

/* ------------------------------------------------------------------------- */

static TCase *s_tcase(const char *name, void (*setup)(void), int timeout_s)
{
    TCase *tc = tcase_create(name);
    tcase_add_unchecked_fixture(tc, setup, s_teardown_daemon);
    tcase_add_checked_fixture(tc, s_setup_client, s_teardown_client);
    tcase_set_timeout(tc, timeout_s);
    return tc;
}

Suite *um_server_suite(void)
{
    Suite *s = suite_create("server");

    TCase *tc = s_tcase("ops", s_setup_daemon, 120);
    tcase_add_test(tc, test_health);
    tcase_add_test(tc, test_info);
    tcase_add_test(tc, test_tokenize_round_trip);
    tcase_add_test(tc, test_req_socket);
    tcase_add_test(tc, test_generate_plain);
    tcase_add_test(tc, test_generate_stream);
    tcase_add_test(tc, test_generate_infill);
    tcase_add_test(tc, test_generate_fixture);
    tcase_add_test(tc, test_info_policies);
    tcase_add_test(tc, test_generate_each_policy);
    tcase_add_test(tc, test_generate_stream_canvas);
    tcase_add_test(tc, test_generate_eos_controls);
    tcase_add_test(tc, test_score);
    suite_add_tcase(s, tc);

    tc = tcase_create("chat");
    tcase_add_unchecked_fixture(tc, s_setup_daemon_chat, s_teardown_daemon_chat);
    tcase_add_checked_fixture(tc, s_setup_client, s_teardown_client);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_generate_messages);
    suite_add_tcase(s, tc);

    tc = s_tcase("bert", s_setup_daemon_bert, 60);
    tcase_add_test(tc, test_generate_bert_framing);
    suite_add_tcase(s, tc);

    tc = s_tcase("int8", s_setup_daemon_int8, 60);
    tcase_add_test(tc, test_info_int8);
    suite_add_tcase(s, tc);

    tc = s_tcase("bad_plugins", s_setup_daemon_bad_plugins, 120);
    tcase_add_test(tc, test_bad_plugins_skipped);
    suite_add_tcase(s, tc);

    tc = s_tcase("errors", s_setup_daemon, 120);
    tcase_add_test(tc, test_error_json);
    tcase_add_test(tc, test_error_op);
    tcase_add_test(tc, test_error_fields);
    tcase_add_test(tc, test_error_messages);
    tcase_add_test(tc, test_error_ranges);
    tcase_add_test(tc, test_error_plugins);
    tcase_add_test(tc, test_error_policy_params);
    tcase_add_test(tc, test_error_missing_id);
    tcase_add_test(tc, test_error_oversized);
    tcase_add_test(tc, test_error_frames);
    tcase_add_test(tc, test_error_then_generate);
    tcase_add_test(tc, test_error_field_matrix);
    tcase_add_test(tc, test_error_text);
    tcase_add_test(tc, test_error_frames_more);
    suite_add_tcase(s, tc);

    tc = s_tcase("cancel", s_setup_daemon_serial, 120);
    tcase_add_test(tc, test_cancel_running);
    tcase_add_test(tc, test_cancel_queued);
    tcase_add_test(tc, test_duplicate_id);
    suite_add_tcase(s, tc);

    tc = s_tcase("batch", s_setup_daemon_batch4, 120);
    tcase_add_test(tc, test_batch_matches_alone);
    tcase_add_test(tc, test_batch_cancel_one);
    suite_add_tcase(s, tc);

    tc = s_tcase("batch_serial", s_setup_daemon_serial, 120);
    tcase_add_test(tc, test_batch_serial);
    suite_add_tcase(s, tc);

    tc = s_tcase("queue", s_setup_daemon_queue1, 120);
    tcase_add_test(tc, test_queue_busy);
    suite_add_tcase(s, tc);

    tc = s_tcase("client", s_setup_daemon, 120);
    tcase_add_test(tc, test_client_plain);
    tcase_add_test(tc, test_client_json);
    tcase_add_test(tc, test_client_score);
    tcase_add_test(tc, test_client_sampling_flags);
    tcase_add_test(tc, test_client_errors);
    tcase_add_test(tc, test_ipc_in_use);
    suite_add_tcase(s, tc);

    tc = tcase_create("lifecycle");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_shutdown);
    tcase_add_test(tc, test_startup_failures);
    suite_add_tcase(s, tc);
    return s;
}
