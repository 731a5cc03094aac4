/*
 * Broker tests: the real unmask-broker and real unmaskd --connect workers started as
 * child processes on ipc endpoints in a private temporary folder (loopback tcp for
 * CURVE), driven over DEALER sockets exactly as clients drive them. The protocol
 * cases play the worker themselves with a raw DEALER, so each rule of
 * docs/worker-protocol.md is checked without timing luck.
 *
 * Each TCase starts its broker and workers in an unchecked fixture and stops them in
 * the teardown. The brokers use a 200 ms heartbeat and a liveness of 5, so a worker
 * that dies is declared lost after one second. ZeroMQ contexts are opened per test
 * in a checked fixture, never across a fork.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
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

/* Milliseconds a test waits for a reply that should come (before CK_TIMEOUT_MULTIPLIER). */
#define S_REPLY_TIMEOUT_MS 30000
/* How long "no further reply" is watched for after a final reply. */
#define S_QUIET_MS 300
/* Broker heartbeat settings of every test cluster: a lost worker shows after 1 s. */
#define S_HEARTBEAT "200"
#define S_LIVENESS "5"
#define S_EXPIRY_MS 1000
/* Maximum number of workers in a test cluster. */
#define S_MAX_WORKERS 4

typedef struct s_proc {
    pid_t pid;
    char log[640];
} s_proc_t;

typedef struct s_cluster {
    char dir[128];        /* private temporary folder for sockets and keys */
    char log_dir[512];    /* logs: under UM_TEST_OUT, kept after the test */
    char frontend[256];
    char backend[256];
    s_proc_t broker;
    s_proc_t workers[S_MAX_WORKERS];
    int n_workers;
} s_cluster_t;

static s_cluster_t s_cl;
static void *s_ctx;
static int s_instance;

/* ------------------------------------------------------------------------- */
/* Time, processes                                                           */

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

static int s_timeout_ms(void)
{
    const char *m = getenv("CK_TIMEOUT_MULTIPLIER");
    double mult = m ? atof(m) : 1.0;
    return (int)(S_REPLY_TIMEOUT_MS * (mult >= 1.0 ? mult : 1.0));
}

/* Start argv[0] with stderr in a log file named name under the cluster's log folder. */
static void s_spawn(s_proc_t *p, const char *const *argv, const char *name)
{
    snprintf(p->log, sizeof p->log, "%s/%s.log", s_cl.log_dir, name);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, p->log, O_WRONLY | O_CREAT | O_APPEND,
                                     0644);
    int rc = posix_spawn(&p->pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    ck_assert_msg(rc == 0, "cannot start %s: %s", argv[0], strerror(rc));
}

/* Send sig, wait up to timeout_ms; returns the wait status, or -1 after SIGKILL. */
static int s_stop(s_proc_t *p, int sig, int timeout_ms)
{
    if (p->pid <= 0)
        return -1;
    kill(p->pid, sig);
    double deadline = s_now_ms() + timeout_ms;
    int status = 0;
    while (s_now_ms() < deadline) {
        if (waitpid(p->pid, &status, WNOHANG) == p->pid) {
            p->pid = -1;
            return status;
        }
        s_sleep_ms(20);
    }
    kill(p->pid, SIGKILL);
    waitpid(p->pid, &status, 0);
    p->pid = -1;
    return -1;
}

/* Run a program to completion with stderr in log; returns its exit status. */
static int s_run(const char *const *argv, const char *log)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    ck_assert_msg(rc == 0, "cannot start %s: %s", argv[0], strerror(rc));
    int status;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(WIFEXITED(status), "%s was killed by a signal", argv[0]);
    return WEXITSTATUS(status);
}

/* Whether the file at path contains text. */
static int s_file_has(const char *path, const char *text)
{
    char *s = um_test_read_file(path, NULL);
    int found = s && strstr(s, text) != NULL;
    free(s);
    return found;
}

/* ------------------------------------------------------------------------- */
/* ZeroMQ and JSON helpers                                                   */

static void *s_dealer(const char *endpoint)
{
    void *sock = zmq_socket(s_ctx, ZMQ_DEALER);
    ck_assert_msg(sock != NULL, "zmq_socket: %s", zmq_strerror(errno));
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_msg(zmq_connect(sock, endpoint) == 0, "zmq_connect %s: %s", endpoint,
                  zmq_strerror(errno));
    return sock;
}

static void s_send_text(void *sock, const char *text)
{
    size_t len = strlen(text);
    ck_assert_msg(zmq_send(sock, text, len, 0) == (int)len, "zmq_send: %s", zmq_strerror(errno));
}

static void s_send_json(void *sock, json_t *msg)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    ck_assert(text != NULL);
    s_send_text(sock, text);
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
    json_t *reply = json_loadb(zmq_msg_data(&msg), zmq_msg_size(&msg), 0, &jerr);
    ck_assert_msg(reply != NULL, "reply is not JSON: %s: %.*s", jerr.text,
                  (int)zmq_msg_size(&msg), (char *)zmq_msg_data(&msg));
    zmq_msg_close(&msg);
    ck_assert_msg(json_is_string(json_object_get(reply, "type")), "reply has no type");
    ck_assert_msg(json_object_get(reply, "id") != NULL, "reply has no id field");
    return reply;
}

static json_t *s_recv_must(void *sock)
{
    json_t *r = s_recv(sock, s_timeout_ms());
    ck_assert_msg(r != NULL, "no reply within %d ms", s_timeout_ms());
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
    const char *id = json_string_value(json_object_get(r, "id"));
    return id ? id : "";
}

static const char *s_code(const json_t *r)
{
    const char *c = json_string_value(json_object_get(json_object_get(r, "error"), "code"));
    return c ? c : "";
}

static const char *s_message(const json_t *r)
{
    const char *m = json_string_value(json_object_get(json_object_get(r, "error"), "message"));
    return m ? m : "";
}

static json_t *s_done(json_t *r)
{
    if (strcmp(s_type(r), UM_REPLY_DONE) != 0) {
        char *text = json_dumps(r, JSON_COMPACT);
        ck_abort_msg("expected a done reply, got %s", text);
    }
    return r;
}

/* Assert an error reply with code and field (NULL: JSON null) and release it. */
static void s_expect_error(json_t *r, const char *code, const char *field)
{
    char *text = json_dumps(r, JSON_COMPACT);
    ck_assert_msg(strcmp(s_type(r), UM_REPLY_ERROR) == 0, "expected an error, got %s", text);
    ck_assert_msg(strcmp(s_code(r), code) == 0, "expected code %s, got %s", code, text);
    json_t *f = json_object_get(json_object_get(r, "error"), "field");
    if (field)
        ck_assert_msg(json_is_string(f) && strcmp(json_string_value(f), field) == 0,
                      "expected field %s: %s", field, text);
    else
        ck_assert_msg(json_is_null(f), "expected field null: %s", text);
    free(text);
    json_decref(r);
}

/* Assert that no reply arrives for a while. */
static void s_assert_quiet(void *sock, int ms)
{
    json_t *extra = s_recv(sock, ms);
    if (extra) {
        char *text = json_dumps(extra, JSON_COMPACT);
        ck_abort_msg("unexpected reply after the final one: %s", text);
    }
}

static json_t *s_generate(const char *id, int gen_length, int stream)
{
    return json_pack("{s:s, s:s, s:s, s:i, s:i, s:i, s:b}", "op", "generate", "id", id,
                     "prompt", "once upon a time", "gen_length", gen_length, "steps",
                     gen_length, "seed", 1, "stream", stream);
}

/* A generate request that runs for seconds on the bundled model (120 positions). */
static json_t *s_long_generate(const char *id, int stream)
{
    return s_generate(id, 120, stream);
}

static json_t *s_info(void *sock)
{
    return s_done(s_call(sock, json_pack("{s:s, s:s}", "op", "info", "id", "info")));
}

static json_int_t s_broker_count(const json_t *info, const char *key)
{
    return json_integer_value(json_object_get(json_object_get(info, "broker"), key));
}

/* ------------------------------------------------------------------------- */
/* Clusters                                                                  */

static void s_broker_start(const char *const *extra)
{
    const char *bin = um_test_env("UM_TEST_BROKER");
    const char *argv[32] = {bin, "--frontend", s_cl.frontend, "--backend", s_cl.backend,
                            "--heartbeat", S_HEARTBEAT, "--liveness", S_LIVENESS,
                            "--log-level", "debug"};
    int argc = 11;
    for (int i = 0; extra && extra[i] && argc < 31; i++)
        argv[argc++] = extra[i];
    argv[argc] = NULL;
    s_spawn(&s_cl.broker, argv, "broker");
}

/* Start worker i of the cluster with extra arguments (NULL-terminated, may be NULL). */
static void s_worker_start(int i, const char *const *extra)
{
    const char *argv[32] = {um_test_env("UM_TEST_DAEMON"), "--model", um_test_env("UM_TEST_MODEL"),
                            "--plugin-dir", um_test_env("UM_TEST_PLUGINS"), "--connect",
                            s_cl.backend, "--threads", "1", "--log-level", "debug"};
    int argc = 11;
    for (int k = 0; extra && extra[k] && argc < 31; k++)
        argv[argc++] = extra[k];
    argv[argc] = NULL;
    char name[32];
    snprintf(name, sizeof name, "worker%d", i);
    s_spawn(&s_cl.workers[i], argv, name);
}

/* Wait until info through the broker lists n workers; returns the info, or fails. */
static json_t *s_wait_workers(void *sock, size_t n, int timeout_ms)
{
    double deadline = s_now_ms() + timeout_ms;
    for (;;) {
        json_t *info = s_info(sock);
        size_t have = json_array_size(json_object_get(info, "workers"));
        if (have == n)
            return info;
        json_decref(info);
        ck_assert_msg(s_now_ms() < deadline, "the broker lists %zu workers, expected %zu, after "
                      "%d ms: see the logs in %s", have, n, timeout_ms, s_cl.log_dir);
        s_sleep_ms(50);
    }
}

/* Wait until the broker replies to health on the front end (own context: fixtures may fork). */
static void s_wait_broker(void)
{
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(sock, s_cl.frontend);
    double deadline = s_now_ms() + 30000;
    int ready = 0;
    while (!ready && s_now_ms() < deadline) {
        const char *health = "{\"op\":\"health\",\"id\":\"ready\"}";
        zmq_send(sock, health, strlen(health), ZMQ_DONTWAIT);
        zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN};
        ready = zmq_poll(&item, 1, 200) > 0;
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    ck_assert_msg(ready, "unmask-broker did not answer health on %s: see %s", s_cl.frontend,
                  s_cl.broker.log);
}

/* Wait until the broker counts n generate requests in flight; returns the info. */
static json_t *s_wait_in_flight(void *sock, json_int_t n)
{
    double deadline = s_now_ms() + s_timeout_ms();
    for (;;) {
        json_t *info = s_info(sock);
        json_int_t have = s_broker_count(info, "requests_in_flight");
        if (have == n)
            return info;
        json_decref(info);
        ck_assert_msg(s_now_ms() < deadline, "the broker counts %lld requests in flight, "
                      "expected %lld", (long long)have, (long long)n);
        s_sleep_ms(20);
    }
}

/* Make the cluster's folders and ipc endpoints; no process yet. */
static void s_cluster_init(void)
{
    memset(&s_cl, 0, sizeof s_cl);
    s_cl.broker.pid = -1;
    for (int i = 0; i < S_MAX_WORKERS; i++)
        s_cl.workers[i].pid = -1;
    /* Sockets go to /tmp, because an ipc path must fit in 107 bytes. */
    snprintf(s_cl.dir, sizeof s_cl.dir, "/tmp/unmask-broker-test-%ld-%d", (long)getpid(),
             ++s_instance);
    mkdir(s_cl.dir, 0700);
    const char *out = getenv("UM_TEST_OUT");
    if (out && *out) {
        mkdir(out, 0777);
        snprintf(s_cl.log_dir, sizeof s_cl.log_dir, "%s/broker-%ld-%d", out, (long)getpid(),
                 s_instance);
        mkdir(s_cl.log_dir, 0777);
    } else {
        snprintf(s_cl.log_dir, sizeof s_cl.log_dir, "%s", s_cl.dir);
    }
    snprintf(s_cl.frontend, sizeof s_cl.frontend, "ipc://%s/front.sock", s_cl.dir);
    snprintf(s_cl.backend, sizeof s_cl.backend, "ipc://%s/back.sock", s_cl.dir);
}

/* Start a broker and n workers with worker_extra arguments, and wait for all of them. */
static void s_cluster_start(int n, const char *const *worker_extra)
{
    s_cluster_init();
    s_broker_start(NULL);
    s_wait_broker();
    s_cl.n_workers = n;
    for (int i = 0; i < n; i++)
        s_worker_start(i, worker_extra);
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(sock, s_cl.frontend);
    double deadline = s_now_ms() + 60000;
    size_t have = 0;
    while (have < (size_t)n && s_now_ms() < deadline) {
        const char *info = "{\"op\":\"info\",\"id\":\"start\"}";
        zmq_send(sock, info, strlen(info), 0);
        zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN};
        if (zmq_poll(&item, 1, 5000) > 0) {
            zmq_msg_t m;
            zmq_msg_init(&m);
            zmq_msg_recv(&m, sock, 0);
            json_t *r = json_loadb(zmq_msg_data(&m), zmq_msg_size(&m), 0, NULL);
            have = json_array_size(json_object_get(r, "workers"));
            json_decref(r);
            zmq_msg_close(&m);
        }
        if (have < (size_t)n)
            s_sleep_ms(100);
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    ck_assert_msg(have == (size_t)n, "only %zu of %d workers registered: see the logs in %s",
                  have, n, s_cl.log_dir);
}

static void s_cluster_start2(void)
{
    s_cluster_start(2, NULL);
}

/* Three workers that each run one generate request at a time, the others queued. */
static void s_cluster_start3(void)
{
    const char *const extra[] = {"--max-batch", "1", NULL};
    s_cluster_start(3, extra);
}

/* Two workers that each take one generate request at a time. */
static void s_cluster_start2_queue0(void)
{
    const char *const extra[] = {"--max-queue", "0", "--max-batch", "1", NULL};
    s_cluster_start(2, extra);
}

/* A broker alone, for the cases that play the worker. */
static void s_broker_only(void)
{
    s_cluster_init();
    s_broker_start(NULL);
    s_wait_broker();
}

static int s_remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    return flag == FTW_DP ? rmdir(path) : unlink(path);
}

/*
 * Stop every process with SIGTERM and remove the temporary folder. A teardown cannot
 * fail a test (in fork mode it runs in the runner), so a bad exit is reported on stderr.
 */
static void s_cluster_stop(void)
{
    for (int i = 0; i < S_MAX_WORKERS; i++) {
        int status = s_stop(&s_cl.workers[i], SIGTERM, 30000);
        (void)status;
    }
    if (s_cl.broker.pid > 0) {
        int status = s_stop(&s_cl.broker, SIGTERM, 30000);
        if (status < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            fprintf(stderr, "unmask-broker did not exit with status 0 after SIGTERM (wait "
                    "status %d): see %s\n", status, s_cl.broker.log);
    }
    if (s_cl.dir[0])
        nftw(s_cl.dir, s_remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

static void s_setup_ctx(void)
{
    s_ctx = zmq_ctx_new();
    ck_assert(s_ctx != NULL);
}

static void s_teardown_ctx(void)
{
    if (s_ctx)
        zmq_ctx_term(s_ctx);
    s_ctx = NULL;
}

/* The pid of a worker in info whose "generating" count is at least min, or -1. */
static pid_t s_busy_worker(const json_t *info, json_int_t min)
{
    size_t i;
    json_t *w;
    json_array_foreach(json_object_get(info, "workers"), i, w) {
        if (json_integer_value(json_object_get(w, "generating")) >= min)
            return (pid_t)json_integer_value(json_object_get(w, "pid"));
    }
    return -1;
}

/* The cluster's record of the worker process with this pid. */
static s_proc_t *s_worker_proc(pid_t pid)
{
    for (int i = 0; i < S_MAX_WORKERS; i++)
        if (s_cl.workers[i].pid == pid)
            return &s_cl.workers[i];
    ck_abort_msg("pid %d is not a worker this test started", (int)pid);
    return NULL;
}

/* ------------------------------------------------------------------------- */
/* Routing through real workers                                              */

START_TEST(test_broker_info_health)
{
    void *sock = s_dealer(s_cl.frontend);
    json_t *info = s_info(sock);
    ck_assert_int_eq(json_integer_value(json_object_get(info, "protocol")), UM_PROTOCOL_VERSION);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(info, "model"),
                                                        "model_type")), "llada");
    ck_assert_int_eq(s_broker_count(info, "worker_protocol"), UM_WORKER_PROTOCOL_VERSION);
    json_t *models = json_object_get(info, "models");
    ck_assert_int_eq(json_array_size(models), 1);
    ck_assert_str_eq(json_string_value(json_array_get(models, 0)), "tinystories");

    json_t *workers = json_object_get(info, "workers");
    ck_assert_int_eq(json_array_size(workers), 3);
    size_t i;
    json_t *w;
    json_array_foreach(workers, i, w) {
        pid_t pid = (pid_t)json_integer_value(json_object_get(w, "pid"));
        s_worker_proc(pid);
        ck_assert_str_eq(json_string_value(json_array_get(json_object_get(w, "models"), 0)),
                         "tinystories");
        ck_assert_int_eq(json_integer_value(json_object_get(w, "capacity")),
                         1 + 64); /* --max-batch 1 running + the default --max-queue */
        ck_assert_str_eq(json_string_value(json_object_get(w, "state")), "ready");
        ck_assert(json_number_value(json_object_get(w, "last_seen_ms")) < S_EXPIRY_MS);
    }
    json_decref(info);

    json_t *h = s_done(s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "h")));
    ck_assert_str_eq(json_string_value(json_object_get(h, "status")), "ok");
    ck_assert_int_eq(json_integer_value(json_object_get(h, "workers")), 3);
    ck_assert(json_is_false(json_object_get(h, "busy")));
    ck_assert_int_eq(json_integer_value(json_object_get(h, "queue")), 0);
    json_decref(h);

    /* info for a model no worker serves names the ones served. */
    json_t *r = s_call(sock, json_pack("{s:s, s:s, s:s}", "op", "info", "id", "m", "model",
                                       "nope"));
    ck_assert_msg(strstr(s_message(r), "tinystories") != NULL, "message: %s", s_message(r));
    s_expect_error(r, UM_ERR_UNKNOWN_MODEL, UM_FIELD_MODEL);
    zmq_close(sock);
}
END_TEST

START_TEST(test_broker_generate)
{
    void *sock = s_dealer(s_cl.frontend);
    json_t *first = s_done(s_call(sock, s_generate("g1", 16, 0)));
    ck_assert_int_eq(json_array_size(json_object_get(first, "tokens")), 16);

    /* The broker removes its own fields before it forwards the request (a daemon would
       reject them), and the same seed gives the same tokens on any worker. */
    for (int k = 0; k < 3; k++) {
        json_t *req = s_generate("g2", 16, 0);
        json_object_set_new(req, UM_FIELD_MODEL, json_string("tinystories"));
        json_object_set_new(req, UM_FIELD_RETRY, json_true());
        json_t *again = s_done(s_call(sock, req));
        ck_assert(json_equal(json_object_get(first, "tokens"), json_object_get(again, "tokens")));
        json_decref(again);
    }
    json_decref(first);

    /* Streaming: every step in order, then exactly one final reply. */
    s_send_json(sock, s_generate("s1", 24, 1));
    int steps = 0, last = -1;
    json_t *r;
    while (strcmp(s_type(r = s_recv_must(sock)), UM_REPLY_STEP) == 0) {
        ck_assert_str_eq(s_id(r), "s1");
        int step = (int)json_integer_value(json_object_get(r, "step"));
        ck_assert_int_gt(step, last);
        last = step;
        steps++;
        json_decref(r);
    }
    ck_assert_str_eq(s_id(s_done(r)), "s1");
    ck_assert_int_eq(steps, 24);
    json_decref(r);
    s_assert_quiet(sock, S_QUIET_MS);

    /* tokenize and detokenize go to a worker too. */
    json_t *t = s_done(s_call(sock, json_pack("{s:s, s:s, s:s}", "op", "tokenize", "id", "t",
                                              "text", "the cat sat")));
    json_t *d = s_done(s_call(sock, json_pack("{s:s, s:s, s:O}", "op", "detokenize", "id", "d",
                                              "tokens", json_object_get(t, "tokens"))));
    ck_assert_str_eq(json_string_value(json_object_get(d, "text")), "the cat sat");
    json_decref(d);
    json_decref(t);

    /* So does score, and the same seed gives the same estimate on any worker. */
    double ll[2];
    for (int k = 0; k < 2; k++) {
        json_t *sc = s_done(s_call(sock, json_pack("{s:s, s:s, s:s, s:s, s:i, s:i}", "op",
                                                   "score", "id", "sc", "prompt", "the cat",
                                                   "answer", " sat down.", "n_samples", 4,
                                                   "seed", 7)));
        ll[k] = json_number_value(json_object_get(sc, "log_likelihood"));
        ck_assert(ll[k] < 0);
        json_decref(sc);
    }
    ck_assert(ll[0] == ll[1]);

    /* A REQ socket's empty delimiter frame is repeated on the reply. */
    void *req_sock = zmq_socket(s_ctx, ZMQ_REQ);
    int linger = 0;
    zmq_setsockopt(req_sock, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_int_eq(zmq_connect(req_sock, s_cl.frontend), 0);
    json_decref(s_done(s_call(req_sock, s_generate("req", 4, 0))));
    zmq_close(req_sock);
    zmq_close(sock);
}
END_TEST

START_TEST(test_broker_errors)
{
    void *sock = s_dealer(s_cl.frontend);
    s_send_text(sock, "{\"op\":");
    s_expect_error(s_recv_must(sock), UM_ERR_BAD_JSON, NULL);
    s_send_text(sock, "[1]");
    s_expect_error(s_recv_must(sock), UM_ERR_BAD_JSON, NULL);
    s_send_text(sock, "{\"id\":\"x\"}");
    s_expect_error(s_recv_must(sock), UM_ERR_INVALID, "op");
    s_send_text(sock, "{\"op\":\"generat\",\"id\":\"x\"}");
    json_t *r = s_recv_must(sock);
    ck_assert_msg(strstr(s_message(r), "generate") != NULL, "no hint: %s", s_message(r));
    s_expect_error(r, UM_ERR_UNKNOWN_OP, "op");
    s_send_text(sock, "{\"op\":\"health\",\"id\":\"x\",\"extra\":1}");
    s_expect_error(s_recv_must(sock), UM_ERR_UNKNOWN_FIELD, "extra");

    /* The broker's own fields. */
    json_t *req = s_generate("m1", 4, 0);
    json_object_set_new(req, UM_FIELD_MODEL, json_integer(5));
    s_expect_error(s_call(sock, req), UM_ERR_INVALID, UM_FIELD_MODEL);
    req = s_generate("m2", 4, 0);
    json_object_set_new(req, UM_FIELD_RETRY, json_string("yes"));
    s_expect_error(s_call(sock, req), UM_ERR_INVALID, UM_FIELD_RETRY);
    req = s_generate("m3", 4, 0);
    json_object_set_new(req, UM_FIELD_MODEL, json_string("nope"));
    r = s_call(sock, req);
    ck_assert_str_eq(s_id(r), "m3");
    s_expect_error(r, UM_ERR_UNKNOWN_MODEL, UM_FIELD_MODEL);

    /* A worker's errors come back unchanged. */
    req = s_generate("w1", 4, 0);
    json_object_set_new(req, "gen_lenght", json_integer(4));
    r = s_call(sock, req);
    ck_assert_msg(strstr(s_message(r), "did you mean gen_length") != NULL, "message: %s",
                  s_message(r));
    s_expect_error(r, UM_ERR_UNKNOWN_FIELD, "gen_lenght");
    req = s_generate("w2", 4, 0);
    json_object_set_new(req, "steps", json_integer(0));
    s_expect_error(s_call(sock, req), UM_ERR_OUT_OF_RANGE, "steps");

    /* Two frames are not a request. */
    zmq_send(sock, "{}", 2, ZMQ_SNDMORE);
    zmq_send(sock, "{}", 2, 0);
    s_expect_error(s_recv_must(sock), UM_ERR_INVALID, NULL);
    json_decref(s_done(s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "after"))));
    zmq_close(sock);
}
END_TEST

START_TEST(test_broker_cancel)
{
    void *sock = s_dealer(s_cl.frontend);
    s_send_json(sock, s_long_generate("c1", 1));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);

    s_send_json(sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x1", "target", "c1"));
    int cancel_done = 0, target_final = 0;
    while (!cancel_done || !target_final) {
        r = s_recv_must(sock);
        if (strcmp(s_id(r), "x1") == 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
            cancel_done++;
        } else if (strcmp(s_type(r), UM_REPLY_STEP) != 0) {
            ck_assert_str_eq(s_id(r), "c1");
            ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
            ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "cancel");
            target_final++;
        }
        json_decref(r);
    }
    s_assert_quiet(sock, S_QUIET_MS);
    r = s_call(sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x2", "target", "c1"));
    ck_assert_str_eq(s_id(r), "x2");
    s_expect_error(r, UM_ERR_NOT_FOUND, "target");

    /* Ids are per connection across the broker, as on a daemon. */
    s_send_json(sock, s_long_generate("d1", 0));
    s_expect_error(s_call(sock, s_long_generate("d1", 0)), UM_ERR_DUPLICATE_ID, "id");
    void *other = s_dealer(s_cl.frontend);
    s_expect_error(s_call(other, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "y",
                                           "target", "d1")),
                   UM_ERR_NOT_FOUND, "target");
    zmq_close(other);

    /* Two more fill the other workers; a fourth waits in a worker's queue. A waiting
       target gets its cancelled reply before the cancel's own. */
    s_send_json(sock, s_long_generate("d2", 0));
    s_send_json(sock, s_long_generate("d3", 0));
    s_send_json(sock, s_long_generate("q1", 0));
    json_t *h = s_done(s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "h")));
    ck_assert_int_eq(json_integer_value(json_object_get(h, "queue")), 1);
    json_decref(h);
    s_send_json(sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x3", "target", "q1"));
    r = s_recv_must(sock);
    ck_assert_str_eq(s_id(r), "q1");
    ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
    json_decref(r);
    r = s_recv_must(sock);
    ck_assert_str_eq(s_id(r), "x3");
    ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
    json_decref(r);

    const char *ids[] = {"d1", "d2", "d3"};
    for (int k = 0; k < 3; k++)
        s_send_json(sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x", "target",
                                    ids[k]));
    int finals = 0, cancels = 0;
    while (finals < 3 || cancels < 3) {
        r = s_recv_must(sock);
        if (strcmp(s_id(r), "x") == 0) {
            ck_assert_str_eq(s_type(r), UM_REPLY_DONE);
            cancels++;
        } else {
            ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
            finals++;
        }
        json_decref(r);
    }
    s_assert_quiet(sock, S_QUIET_MS);
    zmq_close(sock);
}
END_TEST

START_TEST(test_broker_busy)
{
    /* Two workers with --max-queue 0 take one generate request each. */
    void *sock = s_dealer(s_cl.frontend);
    s_send_json(sock, s_long_generate("b1", 0));
    s_send_json(sock, s_long_generate("b2", 0));
    json_t *r = s_call(sock, s_long_generate("b3", 0));
    ck_assert_str_eq(s_id(r), "b3");
    ck_assert_msg(strstr(s_message(r), "at capacity") != NULL, "message: %s", s_message(r));
    s_expect_error(r, UM_ERR_BUSY, NULL);

    json_t *h = s_done(s_call(sock, json_pack("{s:s, s:s}", "op", "health", "id", "h")));
    ck_assert(json_is_true(json_object_get(h, "busy")));
    ck_assert_int_eq(json_integer_value(json_object_get(h, "running")), 2);
    json_decref(h);
    /* Requests other than generate still pass. */
    json_decref(s_done(s_call(sock, json_pack("{s:s, s:s, s:s}", "op", "tokenize", "id", "t",
                                              "text", "hi"))));

    s_send_json(sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x1", "target", "b1"));
    s_send_json(sock, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x2", "target", "b2"));
    int finals = 0, cancels = 0;
    while (finals < 2 || cancels < 2) {
        r = s_recv_must(sock);
        if (s_id(r)[0] == 'x')
            cancels++;
        else if (strcmp(s_type(r), UM_REPLY_CANCELLED) == 0)
            finals++;
        json_decref(r);
    }
    json_decref(s_done(s_call(sock, s_generate("b4", 4, 0))));
    zmq_close(sock);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Failures of real workers                                                  */

/*
 * Three clients each stream a long request, which puts one on every worker; six short
 * requests follow on one socket, so each worker also gets one with "retry" and one
 * without. Killing a worker must leave every request with exactly one final reply:
 * its streamed request and its plain one get worker_lost, its retry request is sent
 * to another worker and ends in done, and everything else ends in done.
 */
START_TEST(test_broker_kill_worker)
{
    void *clients[3];
    char id[16];
    for (int c = 0; c < 3; c++) {
        clients[c] = s_dealer(s_cl.frontend);
        snprintf(id, sizeof id, "s%d", c);
        s_send_json(clients[c], s_long_generate(id, 1));
    }
    json_t *finals = json_object(); /* id -> its final reply */
    json_t *counts = json_object(); /* id -> number of final replies */
    for (int c = 0; c < 3; c++) {
        json_t *r = s_recv_must(clients[c]);
        ck_assert_msg(strcmp(s_type(r), UM_REPLY_STEP) == 0, "s%d ended before streaming", c);
        json_decref(r);
    }
    const char *short_ids[] = {"r0", "p0", "r1", "p1", "r2", "p2"};
    for (int k = 0; k < 6; k++) {
        json_t *req = s_generate(short_ids[k], 16, 0);
        if (short_ids[k][0] == 'r')
            json_object_set_new(req, UM_FIELD_RETRY, json_true());
        s_send_json(clients[0], req);
    }

    /* Least loaded first: every worker now has three generate requests. */
    void *admin = s_dealer(s_cl.frontend);
    json_t *info = s_wait_in_flight(admin, 9);
    size_t i;
    json_t *w;
    json_array_foreach(json_object_get(info, "workers"), i, w) {
        ck_assert_int_eq(json_integer_value(json_object_get(w, "generating")), 3);
    }
    pid_t victim = s_busy_worker(info, 3);
    json_decref(info);
    s_proc_t *proc = s_worker_proc(victim);
    kill(victim, SIGKILL);
    int status;
    waitpid(victim, &status, 0);
    proc->pid = -1;

    /* Collect until all nine requests have a final reply. */
    while (json_object_size(finals) < 9) {
        zmq_pollitem_t items[3];
        for (int c = 0; c < 3; c++)
            items[c] = (zmq_pollitem_t){.socket = clients[c], .events = ZMQ_POLLIN};
        ck_assert_msg(zmq_poll(items, 3, s_timeout_ms()) > 0, "only %zu of 9 requests have a "
                      "final reply after %d ms", json_object_size(finals), s_timeout_ms());
        for (int c = 0; c < 3; c++) {
            if (!(items[c].revents & ZMQ_POLLIN))
                continue;
            json_t *r = s_recv_must(clients[c]);
            if (strcmp(s_type(r), UM_REPLY_STEP) == 0) {
                ck_assert_msg(json_object_get(finals, s_id(r)) == NULL, "a step of %s after "
                              "its final reply", s_id(r));
                json_decref(r);
                continue;
            }
            json_int_t n = json_integer_value(json_object_get(counts, s_id(r)));
            json_object_set_new(counts, s_id(r), json_integer(n + 1));
            json_object_set_new(finals, s_id(r), r);
        }
    }
    for (int c = 0; c < 3; c++)
        s_assert_quiet(clients[c], S_QUIET_MS);

    const char *key;
    json_t *n;
    json_object_foreach(counts, key, n) {
        ck_assert_msg(json_integer_value(n) == 1, "request %s got %lld final replies", key,
                      (long long)json_integer_value(n));
    }
    int lost_streamed = 0, lost_plain = 0;
    json_t *r;
    json_object_foreach(finals, key, r) {
        const char *type = s_type(r);
        if (key[0] == 'r') {
            ck_assert_msg(strcmp(type, UM_REPLY_DONE) == 0, "retry request %s ended in %s: %s",
                          key, type, s_message(r));
            continue;
        }
        if (strcmp(type, UM_REPLY_DONE) == 0)
            continue;
        ck_assert_msg(strcmp(type, UM_REPLY_ERROR) == 0, "%s ended in %s", key, type);
        ck_assert_str_eq(s_code(r), UM_ERR_WORKER_LOST);
        ck_assert_msg(strstr(s_message(r), "sent nothing for") != NULL, "message: %s",
                      s_message(r));
        if (key[0] == 's') {
            ck_assert_msg(strstr(s_message(r), "streamed") != NULL, "message: %s", s_message(r));
            lost_streamed++;
        } else {
            ck_assert_msg(strstr(s_message(r), "\"retry\": true") != NULL, "message: %s",
                          s_message(r));
            lost_plain++;
        }
    }
    ck_assert_int_eq(lost_streamed, 1);
    ck_assert_int_eq(lost_plain, 1);

    info = s_info(admin);
    ck_assert_int_eq(json_array_size(json_object_get(info, "workers")), 2);
    ck_assert_int_eq(s_broker_count(info, "lost_workers"), 1);
    ck_assert_int_eq(s_broker_count(info, "retried"), 1);
    ck_assert_int_eq(s_broker_count(info, "lost_requests"), 2);
    ck_assert_int_eq(s_broker_count(info, "requests_in_flight"), 0);
    json_decref(info);

    json_decref(finals);
    json_decref(counts);
    for (int c = 0; c < 3; c++)
        zmq_close(clients[c]);
    zmq_close(admin);
}
END_TEST

/*
 * A worker that stops replying (SIGSTOP) is declared lost. When it runs again, its
 * late replies are dropped and it registers again.
 */
START_TEST(test_broker_stalled_worker)
{
    void *sock = s_dealer(s_cl.frontend);
    s_send_json(sock, s_long_generate("st", 1));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);
    json_t *info = s_info(sock);
    pid_t victim = s_busy_worker(info, 1);
    json_decref(info);
    ck_assert_int_gt(victim, 0);
    s_worker_proc(victim);
    kill(victim, SIGSTOP);

    while (strcmp(s_type(r = s_recv_must(sock)), UM_REPLY_STEP) == 0)
        json_decref(r);
    ck_assert_str_eq(s_id(r), "st");
    ck_assert_msg(strstr(s_message(r), "streamed") != NULL, "message: %s", s_message(r));
    s_expect_error(r, UM_ERR_WORKER_LOST, NULL);

    kill(victim, SIGCONT);
    s_assert_quiet(sock, 1500);
    info = s_wait_workers(sock, 2, 10000);
    ck_assert_int_ge(s_broker_count(info, "late_replies"), 1);
    json_decref(info);
    json_decref(s_done(s_call(sock, s_generate("after", 8, 0))));
    zmq_close(sock);
}
END_TEST

/*
 * SIGTERM on a worker: its running request gets the daemon's "cancelled" reply with
 * reason shutdown, and the worker leaves at once, not after the heartbeat limit.
 */
START_TEST(test_broker_worker_sigterm)
{
    void *sock = s_dealer(s_cl.frontend);
    json_t *info = s_wait_workers(sock, 2, 10000);
    json_decref(info);
    s_send_json(sock, s_long_generate("t1", 1));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);
    info = s_info(sock);
    pid_t victim = s_busy_worker(info, 1);
    json_int_t lost_before = s_broker_count(info, "lost_workers");
    json_decref(info);
    s_proc_t *proc = s_worker_proc(victim);

    double t0 = s_now_ms();
    int status = s_stop(proc, SIGTERM, 30000);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "the worker did not exit with status 0: see %s", proc->log);
    while (strcmp(s_type(r = s_recv_must(sock)), UM_REPLY_STEP) == 0)
        json_decref(r);
    ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
    ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "shutdown");
    json_decref(r);
    info = s_wait_workers(sock, 1, S_EXPIRY_MS);
    ck_assert_msg(s_now_ms() - t0 < 5000, "the worker took %.0f ms to leave", s_now_ms() - t0);
    ck_assert_int_eq(s_broker_count(info, "lost_workers"), lost_before);
    json_decref(info);
    s_assert_quiet(sock, S_QUIET_MS);
    json_decref(s_done(s_call(sock, s_generate("after", 8, 0))));
    zmq_close(sock);
}
END_TEST

/*
 * SIGTERM on the broker: the request in flight gets "cancelled" with reason shutdown,
 * and a new broker on the same endpoints gets the workers back.
 */
START_TEST(test_broker_restart)
{
    void *sock = s_dealer(s_cl.frontend);
    json_decref(s_wait_workers(sock, 1, 10000));
    s_send_json(sock, s_long_generate("b1", 1));
    json_t *r = s_recv_must(sock);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);

    int status = s_stop(&s_cl.broker, SIGTERM, 30000);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "the broker did not exit with status 0: see %s", s_cl.broker.log);
    while (strcmp(s_type(r = s_recv_must(sock)), UM_REPLY_STEP) == 0)
        json_decref(r);
    ck_assert_str_eq(s_id(r), "b1");
    ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
    ck_assert_str_eq(json_string_value(json_object_get(r, "reason")), "shutdown");
    json_decref(r);
    zmq_close(sock);

    s_broker_start(NULL);
    s_wait_broker();
    sock = s_dealer(s_cl.frontend);
    json_decref(s_wait_workers(sock, 1, 15000));
    json_decref(s_done(s_call(sock, s_generate("after", 8, 0))));
    zmq_close(sock);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* The worker protocol, with the test playing the worker                     */

typedef struct s_fake {
    void *sock;
    double t_beat_ms;
} s_fake_t;

static void s_fake_beat(s_fake_t *f, int force)
{
    if (!force && s_now_ms() - f->t_beat_ms < 100)
        return;
    s_send_text(f->sock, "{\"ctl\":\"heartbeat\"}");
    f->t_beat_ms = s_now_ms();
}

/* Connect a fake worker and register it with model and capacity; returns the welcome. */
static json_t *s_fake_register(s_fake_t *f, const char *model, int capacity, int version)
{
    f->sock = s_dealer(s_cl.backend);
    json_t *ready = json_pack("{s:s, s:i, s:i, s:s, s:s, s:i, s:[s], s:i, s:{}}", "ctl", "ready",
                              "version", version, "protocol", UM_PROTOCOL_VERSION, "name",
                              model, "host", "test", "pid", 1, "models", model, "capacity",
                              capacity, "info");
    s_send_json(f->sock, ready);
    f->t_beat_ms = s_now_ms();
    zmq_pollitem_t item = {.socket = f->sock, .events = ZMQ_POLLIN};
    ck_assert_msg(zmq_poll(&item, 1, s_timeout_ms()) > 0, "no answer to ready");
    zmq_msg_t m;
    zmq_msg_init(&m);
    ck_assert(zmq_msg_recv(&m, f->sock, 0) >= 0);
    ck_assert_msg(!zmq_msg_more(&m), "a control message is one frame");
    json_t *msg = json_loadb(zmq_msg_data(&m), zmq_msg_size(&m), 0, NULL);
    zmq_msg_close(&m);
    ck_assert(json_is_string(json_object_get(msg, "ctl")));
    return msg;
}

/*
 * The next request the broker sends to f, skipping heartbeats and sending f's own:
 * *route gets the route frame. Returns the request, or NULL when a control message
 * other than a heartbeat comes (*ctl gets it) or nothing within timeout_ms.
 */
static json_t *s_fake_recv(s_fake_t *f, char *route, size_t *route_len, json_t **ctl,
                           int timeout_ms)
{
    double deadline = s_now_ms() + timeout_ms;
    if (ctl)
        *ctl = NULL;
    while (s_now_ms() < deadline) {
        s_fake_beat(f, 0);
        zmq_pollitem_t item = {.socket = f->sock, .events = ZMQ_POLLIN};
        if (zmq_poll(&item, 1, 50) <= 0)
            continue;
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        zmq_msg_init(&b);
        ck_assert(zmq_msg_recv(&a, f->sock, 0) >= 0);
        if (!zmq_msg_more(&a)) {
            json_t *msg = json_loadb(zmq_msg_data(&a), zmq_msg_size(&a), 0, NULL);
            zmq_msg_close(&a);
            zmq_msg_close(&b);
            const char *name = json_string_value(json_object_get(msg, "ctl"));
            ck_assert_msg(name != NULL, "a one-frame message without ctl");
            if (strcmp(name, "heartbeat") == 0) {
                json_decref(msg);
                continue;
            }
            if (ctl)
                *ctl = msg;
            else
                json_decref(msg);
            return NULL;
        }
        ck_assert(zmq_msg_recv(&b, f->sock, 0) >= 0);
        ck_assert_msg(!zmq_msg_more(&b), "a request is [route, request]");
        *route_len = zmq_msg_size(&a);
        ck_assert_int_eq(*route_len, 8);
        memcpy(route, zmq_msg_data(&a), *route_len);
        json_t *req = json_loadb(zmq_msg_data(&b), zmq_msg_size(&b), 0, NULL);
        zmq_msg_close(&a);
        zmq_msg_close(&b);
        ck_assert_msg(req != NULL, "the request frame is not JSON");
        return req;
    }
    return NULL;
}

static json_t *s_fake_recv_must(s_fake_t *f, char *route, size_t *route_len)
{
    json_t *ctl = NULL;
    json_t *req = s_fake_recv(f, route, route_len, &ctl, s_timeout_ms());
    if (!req) {
        char *text = ctl ? json_dumps(ctl, JSON_COMPACT) : NULL;
        ck_abort_msg("the fake worker got no request: %s", text ? text : "timed out");
    }
    return req;
}

/* Send [route, reply] from f. */
static void s_fake_reply(s_fake_t *f, const char *route, size_t route_len, const char *reply)
{
    ck_assert_int_eq(zmq_send(f->sock, route, route_len, ZMQ_SNDMORE), (int)route_len);
    s_send_text(f->sock, reply);
}

static void s_fake_close(s_fake_t *f, int say_disconnect)
{
    if (say_disconnect) {
        /* Linger, so that closing does not discard the message. */
        int linger = 1000;
        zmq_setsockopt(f->sock, ZMQ_LINGER, &linger, sizeof linger);
        s_send_text(f->sock, "{\"ctl\":\"disconnect\"}");
    }
    zmq_close(f->sock);
    f->sock = NULL;
}

START_TEST(test_broker_protocol_register)
{
    s_fake_t f = {0};
    json_t *welcome = s_fake_register(&f, "reg", 1, UM_WORKER_PROTOCOL_VERSION);
    ck_assert_str_eq(json_string_value(json_object_get(welcome, "ctl")), UM_CTL_WELCOME);
    ck_assert_int_eq(json_integer_value(json_object_get(welcome, "version")),
                     UM_WORKER_PROTOCOL_VERSION);
    ck_assert_int_eq(json_integer_value(json_object_get(welcome, "heartbeat_ms")),
                     atoi(S_HEARTBEAT));
    ck_assert_int_eq(json_integer_value(json_object_get(welcome, "liveness")), atoi(S_LIVENESS));
    json_decref(welcome);

    /* The broker heartbeats a registered worker. */
    char route[8];
    size_t route_len;
    json_t *ctl = NULL;
    double t0 = s_now_ms();
    zmq_pollitem_t item = {.socket = f.sock, .events = ZMQ_POLLIN};
    ck_assert(zmq_poll(&item, 1, 2 * atoi(S_HEARTBEAT)) > 0);
    ck_assert(s_now_ms() - t0 < 2 * atoi(S_HEARTBEAT));
    s_fake_recv(&f, route, &route_len, &ctl, 100);
    ck_assert(ctl == NULL);
    s_fake_close(&f, 1);

    /* Another version is rejected with a message that names both. */
    s_fake_t old = {0};
    json_t *reject = s_fake_register(&old, "old", 1, 99);
    ck_assert_str_eq(json_string_value(json_object_get(reject, "ctl")), UM_CTL_REJECT);
    const char *message = json_string_value(json_object_get(reject, "message"));
    ck_assert_msg(message && strstr(message, "99") && strstr(message, "version 1"),
                  "message: %s", message);
    json_decref(reject);
    s_fake_close(&old, 0);

    /* A worker that the broker does not know gets disconnect, so it registers again. */
    s_fake_t stranger = {.sock = s_dealer(s_cl.backend)};
    s_fake_beat(&stranger, 1);
    json_t *req = s_fake_recv(&stranger, route, &route_len, &ctl, s_timeout_ms());
    ck_assert(req == NULL && ctl != NULL);
    ck_assert_str_eq(json_string_value(json_object_get(ctl, "ctl")), UM_CTL_DISCONNECT);
    json_decref(ctl);
    s_fake_close(&stranger, 0);
}
END_TEST

START_TEST(test_broker_protocol_relay)
{
    s_fake_t f = {0};
    json_decref(s_fake_register(&f, "relay", 1, UM_WORKER_PROTOCOL_VERSION));
    void *client = s_dealer(s_cl.frontend);

    json_t *req = s_generate("g1", 4, 1);
    json_object_set_new(req, UM_FIELD_MODEL, json_string("relay"));
    json_object_set_new(req, UM_FIELD_RETRY, json_true());
    s_send_json(client, req);
    char route[8];
    size_t route_len;
    json_t *got = s_fake_recv_must(&f, route, &route_len);
    ck_assert_str_eq(json_string_value(json_object_get(got, "id")), "g1");
    ck_assert_str_eq(json_string_value(json_object_get(got, "prompt")), "once upon a time");
    ck_assert_msg(json_object_get(got, UM_FIELD_MODEL) == NULL, "model reached the worker");
    ck_assert_msg(json_object_get(got, UM_FIELD_RETRY) == NULL, "retry reached the worker");
    json_decref(got);

    /* At capacity (1), the next generate for this model is busy. */
    req = s_generate("g2", 4, 0);
    json_object_set_new(req, UM_FIELD_MODEL, json_string("relay"));
    s_expect_error(s_call(client, req), UM_ERR_BUSY, NULL);

    /* Steps and the final reply reach the client unchanged; a second final is dropped. */
    s_fake_reply(&f, route, route_len, "{\"id\":\"g1\",\"type\":\"step\",\"step\":0}");
    s_fake_reply(&f, route, route_len, "{\"id\":\"g1\",\"type\":\"done\",\"text\":\"x\"}");
    s_fake_reply(&f, route, route_len, "{\"id\":\"g1\",\"type\":\"done\",\"text\":\"again\"}");
    json_t *r = s_recv_must(client);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);
    r = s_done(s_recv_must(client));
    ck_assert_str_eq(json_string_value(json_object_get(r, "text")), "x");
    json_decref(r);
    s_assert_quiet(client, S_QUIET_MS);
    s_fake_beat(&f, 1);

    /* cancel goes to the worker under the target's route, without an id. The worker's
       reply to it (id null) reaches the client with the cancel's own id. */
    req = s_generate("g3", 4, 0);
    json_object_set_new(req, UM_FIELD_MODEL, json_string("relay"));
    s_send_json(client, req);
    json_decref(s_fake_recv_must(&f, route, &route_len));
    s_send_json(client, json_pack("{s:s, s:s, s:s}", "op", "cancel", "id", "x", "target", "g3"));
    char cancel_route[8];
    size_t cancel_len;
    got = s_fake_recv_must(&f, cancel_route, &cancel_len);
    ck_assert_mem_eq(cancel_route, route, 8);
    ck_assert_str_eq(json_string_value(json_object_get(got, "op")), "cancel");
    ck_assert_str_eq(json_string_value(json_object_get(got, "target")), "g3");
    ck_assert(json_object_get(got, "id") == NULL);
    json_decref(got);
    s_fake_reply(&f, route, route_len, "{\"id\":\"g3\",\"type\":\"cancelled\",\"reason\":\"cancel\"}");
    s_fake_reply(&f, route, route_len, "{\"id\":null,\"type\":\"done\"}");
    r = s_recv_must(client);
    ck_assert_str_eq(s_id(r), "g3");
    ck_assert_str_eq(s_type(r), UM_REPLY_CANCELLED);
    json_decref(r);
    r = s_done(s_recv_must(client));
    ck_assert_str_eq(s_id(r), "x");
    json_decref(r);
    s_assert_quiet(client, S_QUIET_MS);

    json_t *info = s_info(client);
    ck_assert_int_ge(s_broker_count(info, "late_replies"), 1);
    json_decref(info);
    s_fake_close(&f, 1);
    zmq_close(client);
}
END_TEST

START_TEST(test_broker_protocol_loss)
{
    s_fake_t a = {0}, b = {0}, c = {0};
    json_decref(s_fake_register(&a, "loss", 2, UM_WORKER_PROTOCOL_VERSION));
    void *client = s_dealer(s_cl.frontend);
    char route[8];
    size_t route_len;

    /* A worker that leaves in order never read what is still on it: sent again. */
    json_t *req = s_generate("u1", 4, 0);
    json_object_set_new(req, UM_FIELD_MODEL, json_string("loss"));
    s_send_json(client, req);
    json_decref(s_fake_recv_must(&a, route, &route_len));
    json_decref(s_fake_register(&b, "loss", 2, UM_WORKER_PROTOCOL_VERSION));
    s_fake_close(&a, 1);
    json_t *got = s_fake_recv_must(&b, route, &route_len);
    ck_assert_str_eq(json_string_value(json_object_get(got, "id")), "u1");
    json_decref(got);
    s_fake_reply(&b, route, route_len, "{\"id\":\"u1\",\"type\":\"done\"}");
    json_decref(s_done(s_recv_must(client)));

    /* A silent worker is lost: a request with "retry" that has not streamed goes to
       another worker, a streamed one and one without "retry" get worker_lost. */
    json_decref(s_fake_register(&c, "loss", 2, UM_WORKER_PROTOCOL_VERSION));
    const char *ids[] = {"k1", "k2", "k3"};
    for (int k = 0; k < 3; k++) {
        req = s_generate(ids[k], 4, k == 1);
        json_object_set_new(req, UM_FIELD_MODEL, json_string("loss"));
        if (k == 0)
            json_object_set_new(req, UM_FIELD_RETRY, json_true());
        s_send_json(client, req);
    }
    /* The fewest requests in flight wins, and a tie goes to the worker idle for longer
       (c has had no request yet): k1 to c, k2 to b, k3 to c. */
    char k1_route[8], k2_route[8], k3_route[8];
    size_t len1, len2, len3;
    json_decref(s_fake_recv_must(&c, k1_route, &len1));
    json_decref(s_fake_recv_must(&b, k2_route, &len2));
    json_decref(s_fake_recv_must(&c, k3_route, &len3));
    s_fake_reply(&b, k2_route, len2, "{\"id\":\"k2\",\"type\":\"step\"}");
    json_t *r = s_recv_must(client);
    ck_assert_str_eq(s_type(r), UM_REPLY_STEP);
    json_decref(r);

    /* c goes silent; b keeps beating and receives k1 again. */
    got = s_fake_recv_must(&b, route, &route_len);
    ck_assert_str_eq(json_string_value(json_object_get(got, "id")), "k1");
    json_decref(got);
    r = s_recv_must(client);
    ck_assert_str_eq(s_id(r), "k3");
    ck_assert_msg(strstr(s_message(r), "\"retry\": true") != NULL, "message: %s", s_message(r));
    s_expect_error(r, UM_ERR_WORKER_LOST, NULL);
    /* A late reply of the lost worker, on the old route, is dropped. */
    s_fake_reply(&c, k1_route, len1, "{\"id\":\"k1\",\"type\":\"done\",\"text\":\"late\"}");
    s_fake_reply(&b, route, route_len, "{\"id\":\"k1\",\"type\":\"done\",\"text\":\"retried\"}");
    r = s_done(s_recv_must(client));
    ck_assert_str_eq(s_id(r), "k1");
    ck_assert_str_eq(json_string_value(json_object_get(r, "text")), "retried");
    json_decref(r);

    /* b goes silent with k2, which streamed. */
    s_fake_close(&c, 0);
    r = s_recv_must(client);
    ck_assert_str_eq(s_id(r), "k2");
    ck_assert_msg(strstr(s_message(r), "streamed 1 steps") != NULL, "message: %s",
                  s_message(r));
    s_expect_error(r, UM_ERR_WORKER_LOST, NULL);
    s_assert_quiet(client, S_QUIET_MS);

    json_t *info = s_info(client);
    ck_assert_int_eq(s_broker_count(info, "rerouted"), 1);
    ck_assert_int_eq(s_broker_count(info, "retried"), 1);
    ck_assert_int_eq(s_broker_count(info, "lost_requests"), 2);
    ck_assert_int_eq(s_broker_count(info, "requests_in_flight"), 0);
    json_decref(info);
    s_fake_close(&b, 0);
    zmq_close(client);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* CURVE and startup checks                                                  */

static void s_keygen(const char *base)
{
    const char *argv[] = {um_test_env("UM_TEST_BROKER"), "--keygen", base, NULL};
    char log[600];
    snprintf(log, sizeof log, "%s/keygen.log", s_cl.log_dir);
    ck_assert_int_eq(s_run(argv, log), 0);
}

/* Whether a DEALER with these CURVE settings gets an answer to health within 1 s. */
static int s_curve_health(const char *server_pub, const char *client_key)
{
    void *sock = zmq_socket(s_ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (server_pub) {
        char path[300], pub[64] = "", sec[64] = "";
        snprintf(path, sizeof path, "%s/%s", s_cl.dir, server_pub);
        char *text = um_test_read_file(path, NULL);
        ck_assert(text != NULL);
        sscanf(strstr(text, "public-key = \"") + 14, "%40s", pub);
        free(text);
        zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, pub, 41);
        snprintf(path, sizeof path, "%s/%s", s_cl.dir, client_key);
        text = um_test_read_file(path, NULL);
        ck_assert(text != NULL);
        sscanf(strstr(text, "public-key = \"") + 14, "%40s", pub);
        sscanf(strstr(text, "secret-key = \"") + 14, "%40s", sec);
        free(text);
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, pub, 41);
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, sec, 41);
    }
    zmq_connect(sock, s_cl.frontend);
    const char *health = "{\"op\":\"health\",\"id\":\"c\"}";
    zmq_send(sock, health, strlen(health), ZMQ_DONTWAIT);
    json_t *r = s_recv(sock, 1000);
    int ok = r != NULL;
    json_decref(r);
    zmq_close(sock);
    return ok;
}

/*
 * Read the endpoints the broker bound from its log line "clients connect to A ..., workers
 * to B ...", waiting for it. The broker binds port 0, so no other process can take the
 * port between the test's choice and the bind.
 */
static void s_read_bound_endpoints(void)
{
    double deadline = s_now_ms() + 30000;
    for (;;) {
        char *log = um_test_read_file(s_cl.broker.log, NULL);
        const char *front = log ? strstr(log, "clients connect to ") : NULL;
        const char *back = log ? strstr(log, ", workers to ") : NULL;
        if (front && back) {
            sscanf(front + strlen("clients connect to "), "%255[^ ,;]", s_cl.frontend);
            sscanf(back + strlen(", workers to "), "%255[^ ,;]", s_cl.backend);
            free(log);
            return;
        }
        free(log);
        ck_assert_msg(s_now_ms() < deadline && s_cl.broker.pid > 0
                          && waitpid(s_cl.broker.pid, NULL, WNOHANG) == 0,
                      "the broker did not report its endpoints: see %s", s_cl.broker.log);
        s_sleep_ms(50);
    }
}

/* A broker on loopback tcp with CURVE, one listed worker and one unlisted. */
static void s_curve_cluster(void)
{
    s_cluster_init();
    snprintf(s_cl.frontend, sizeof s_cl.frontend, "tcp://127.0.0.1:0");
    snprintf(s_cl.backend, sizeof s_cl.backend, "tcp://127.0.0.1:0");
    char path[700], dir[300];
    const char *names[] = {"broker", "worker", "client", "stranger"};
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", s_cl.dir, names[i]);
        s_keygen(path);
    }
    for (int i = 0; i < 2; i++) {
        snprintf(dir, sizeof dir, "%s/%s", s_cl.dir, i == 0 ? "workers" : "clients");
        mkdir(dir, 0700);
        snprintf(path, sizeof path, "%s/%s.pub", s_cl.dir, names[i + 1]);
        char *text = um_test_read_file(path, NULL);
        ck_assert(text != NULL);
        snprintf(path, sizeof path, "%s/%s.pub", dir, names[i + 1]);
        FILE *out = fopen(path, "w");
        ck_assert(out != NULL);
        fputs(text, out);
        fclose(out);
        /* Not left to the umask: a key file others may write is rejected. */
        ck_assert_int_eq(chmod(path, 0644), 0);
        free(text);
    }
    char key[300], workers[300], clients[300], server_pub[300], worker_key[300], stranger[300];
    snprintf(key, sizeof key, "%s/broker.key", s_cl.dir);
    snprintf(workers, sizeof workers, "%s/workers", s_cl.dir);
    snprintf(clients, sizeof clients, "%s/clients", s_cl.dir);
    snprintf(server_pub, sizeof server_pub, "%s/broker.pub", s_cl.dir);
    snprintf(worker_key, sizeof worker_key, "%s/worker.key", s_cl.dir);
    snprintf(stranger, sizeof stranger, "%s/stranger.key", s_cl.dir);
    const char *const broker_extra[] = {"--curve-key", key, "--curve-workers", workers,
                                        "--curve-clients", clients, NULL};
    s_broker_start(broker_extra);
    s_read_bound_endpoints();
    const char *const good[] = {"--curve-key", worker_key, "--curve-server-key", server_pub,
                                NULL};
    const char *const bad[] = {"--curve-key", stranger, "--curve-server-key", server_pub, NULL};
    s_worker_start(0, good);
    s_worker_start(1, bad);
    s_cl.n_workers = 2;
}

START_TEST(test_broker_curve)
{
    /* A plain client and a client with an unlisted key get no answer. */
    ck_assert_msg(!s_curve_health(NULL, NULL), "a client without CURVE was answered");
    ck_assert_msg(!s_curve_health("broker.pub", "stranger.key"),
                  "a client with an unlisted key was answered");

    /* The listed client sees the listed worker only, and generates through it. */
    double deadline = s_now_ms() + 30000;
    while (!s_curve_health("broker.pub", "client.key"))
        ck_assert_msg(s_now_ms() < deadline, "the listed client got no answer: see %s",
                      s_cl.broker.log);
    char server_pub[300], client_key[300];
    snprintf(server_pub, sizeof server_pub, "%s/broker.pub", s_cl.dir);
    snprintf(client_key, sizeof client_key, "%s/client.key", s_cl.dir);
    const char *argv[] = {um_test_env("UM_TEST_CLIENT"), "--connect", s_cl.frontend,
                          "--curve-server-key", server_pub, "--curve-key", client_key,
                          "--timeout", "30", "--json", "--gen-length", "8", "--seed", "1",
                          "hello", NULL};
    char log[600];
    snprintf(log, sizeof log, "%s/client.out", s_cl.log_dir);
    int status = 0;
    /* The worker may still be registering: retry on busy, at most for the deadline. */
    while ((status = s_run(argv, log)) != 0 && s_file_has(log, "\"busy\"")
           && s_now_ms() < deadline)
        s_sleep_ms(200);
    char *out = um_test_read_file(log, NULL);
    ck_assert_msg(status == 0 && out && strstr(out, "\"type\":\"done\""), "unmask exited %d: %s",
                  status, out ? out : "");
    free(out);

    const char *info_argv[] = {um_test_env("UM_TEST_CLIENT"), "--connect", s_cl.frontend,
                               "--curve-server-key", server_pub, "--curve-key", client_key,
                               "--json", "--info", NULL};
    s_sleep_ms(500);
    ck_assert_int_eq(s_run(info_argv, log), 0);
    json_t *info = json_load_file(log, 0, NULL);
    ck_assert(info != NULL);
    ck_assert_int_eq(json_array_size(json_object_get(info, "workers")), 1);
    json_decref(info);
    ck_assert_msg(s_file_has(s_cl.broker.log, "rejected a workers connection"),
                  "the unlisted worker was not rejected: see %s", s_cl.broker.log);
    ck_assert_msg(s_file_has(s_cl.broker.log, "rejected a clients connection"),
                  "the unlisted client was not rejected: see %s", s_cl.broker.log);
}
END_TEST

START_TEST(test_broker_startup_errors)
{
    char log[600], key[300];
    snprintf(log, sizeof log, "%s/startup.log", s_cl.log_dir);
    const char *bin = um_test_env("UM_TEST_BROKER");

    const char *open_tcp[] = {bin, "--frontend", "tcp://0.0.0.0:0", "--backend", s_cl.backend,
                              NULL};
    ck_assert_int_eq(s_run(open_tcp, log), 1);
    ck_assert_msg(s_file_has(log, "CURVE is off") && s_file_has(log, "--curve-key"),
                  "see %s", log);

    snprintf(key, sizeof key, "%s/b", s_cl.dir);
    s_keygen(key);
    snprintf(key, sizeof key, "%s/b.key", s_cl.dir);
    const char *no_list[] = {bin, "--frontend", s_cl.frontend, "--backend", "tcp://127.0.0.1:0",
                             "--curve-key", key, NULL};
    ck_assert_int_eq(s_run(no_list, log), 1);
    ck_assert_msg(s_file_has(log, "--curve-workers"), "see %s", log);
    chmod(key, 0644);
    const char *open_key[] = {bin, "--curve-key", key, NULL};
    ck_assert_int_eq(s_run(open_key, log), 1);
    ck_assert_msg(s_file_has(log, "chmod 600"), "see %s", log);

    const char *bad_heartbeat[] = {bin, "--heartbeat", "5", NULL};
    ck_assert_int_eq(s_run(bad_heartbeat, log), 2);

    const char *daemon = um_test_env("UM_TEST_DAEMON");
    const char *both[] = {daemon, "--bind", "ipc:///tmp/x", "--connect", "ipc:///tmp/y", NULL};
    ck_assert_int_eq(s_run(both, log), 2);
    ck_assert_msg(s_file_has(log, "exclude each other"), "see %s", log);
    const char *no_connect[] = {daemon, "--model-name", "x", NULL};
    ck_assert_int_eq(s_run(no_connect, log), 2);
    ck_assert_msg(s_file_has(log, "add --connect"), "see %s", log);
}
END_TEST

/* ------------------------------------------------------------------------- */

static TCase *s_tcase(const char *name, void (*setup)(void), int timeout_s)
{
    TCase *tc = tcase_create(name);
    tcase_add_unchecked_fixture(tc, setup, s_cluster_stop);
    tcase_add_checked_fixture(tc, s_setup_ctx, s_teardown_ctx);
    tcase_set_timeout(tc, timeout_s);
    return tc;
}

Suite *um_broker_suite(void)
{
    Suite *s = suite_create("broker");

    TCase *tc = s_tcase("broker_protocol", s_broker_only, 60);
    tcase_add_test(tc, test_broker_protocol_register);
    tcase_add_test(tc, test_broker_protocol_relay);
    tcase_add_test(tc, test_broker_protocol_loss);
    suite_add_tcase(s, tc);

    tc = s_tcase("broker_ops", s_cluster_start3, 120);
    tcase_add_test(tc, test_broker_info_health);
    tcase_add_test(tc, test_broker_generate);
    tcase_add_test(tc, test_broker_errors);
    tcase_add_test(tc, test_broker_cancel);
    suite_add_tcase(s, tc);

    tc = s_tcase("broker_busy", s_cluster_start2_queue0, 120);
    tcase_add_test(tc, test_broker_busy);
    suite_add_tcase(s, tc);

    tc = s_tcase("broker_failover", s_cluster_start3, 120);
    tcase_add_test(tc, test_broker_kill_worker);
    suite_add_tcase(s, tc);

    tc = s_tcase("broker_lifecycle", s_cluster_start2, 120);
    tcase_add_test(tc, test_broker_stalled_worker);
    tcase_add_test(tc, test_broker_worker_sigterm);
    tcase_add_test(tc, test_broker_restart);
    suite_add_tcase(s, tc);

    tc = s_tcase("broker_curve", s_curve_cluster, 120);
    tcase_add_test(tc, test_broker_curve);
    suite_add_tcase(s, tc);

    tc = s_tcase("broker_startup", s_cluster_init, 60);
    tcase_add_test(tc, test_broker_startup_errors);
    suite_add_tcase(s, tc);
    return s;
}
