/* Shared helpers for the Check suites: see testutil.h. */
#include "testutil.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "generate.h"
#include "model.h"

extern char **environ;

const char *um_test_env(const char *name)
{
    const char *v = getenv(name);
    ck_assert_msg(v != NULL && *v != '\0',
                  "environment variable %s is not set: run the tests with make check", name);
    return v;
}

const char *um_test_path(const char *dir, const char *file)
{
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", dir, file);
    return buf;
}

char *um_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)size + 1);
    if (buf && fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[size] = '\0';
        if (len)
            *len = (size_t)size;
    }
    return buf;
}

double um_test_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

void um_test_sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ------------------------------------------------------------------------- */
/* The real daemon as a child process                                        */

int um_test_daemon_spawn(um_test_daemon_t *d, const char *tag, const char *const *extra)
{
    static int instance;
    const char *bin = um_test_env("UM_TEST_DAEMON");
    const char *model = um_test_env("UM_TEST_MODEL");
    const char *plugins = um_test_env("UM_TEST_PLUGINS");
    const char *out = getenv("UM_TEST_OUT");
    int n = ++instance;

    snprintf(d->endpoint, sizeof d->endpoint, "ipc:///tmp/unmaskd-%s-%ld-%d.sock", tag,
             (long)getpid(), n);
    unlink(d->endpoint + strlen("ipc://"));
    if (out && *out)
        mkdir(out, 0777);
    snprintf(d->log, sizeof d->log, "%s/%s-%ld-%d.log", out && *out ? out : "/tmp", tag,
             (long)getpid(), n);

    const char *argv[48] = {bin, "--model", model, "--plugin-dir", plugins, "--bind",
                            d->endpoint, "--log-level", "debug", "--threads", "1"};
    int argc = 11;
    for (int i = 0; extra && extra[i] && argc < 47; i++)
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

int um_test_daemon_wait_ready(um_test_daemon_t *d, int timeout_ms)
{
    void *ctx = zmq_ctx_new();
    void *sock = um_test_dealer(ctx, d->endpoint);
    int ready = -1;
    double deadline = um_test_now_ms() + timeout_ms;
    while (um_test_now_ms() < deadline) {
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

int um_test_daemon_wait_exit(um_test_daemon_t *d, int timeout_ms)
{
    if (d->pid <= 0)
        return -1;
    double deadline = um_test_now_ms() + timeout_ms;
    int status = 0;
    while (um_test_now_ms() < deadline) {
        if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
            d->pid = -1;
            return status;
        }
        um_test_sleep_ms(10);
    }
    return -1;
}

int um_test_daemon_stop(um_test_daemon_t *d, int timeout_ms)
{
    if (d->pid <= 0)
        return -1;
    kill(d->pid, SIGTERM);
    int status = um_test_daemon_wait_exit(d, timeout_ms);
    if (status < 0 && d->pid > 0) {
        kill(d->pid, SIGKILL);
        waitpid(d->pid, NULL, 0);
        d->pid = -1;
    }
    if (strncmp(d->endpoint, "ipc://", 6) == 0)
        unlink(d->endpoint + strlen("ipc://"));
    return status;
}

long um_test_rss_kib(pid_t pid)
{
    /* procfs files report size 0, so read line by line rather than by their size. */
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%ld/status", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kib = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

/* ------------------------------------------------------------------------- */
/* ZeroMQ clients                                                            */

void *um_test_dealer(void *ctx, const char *endpoint)
{
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    ck_assert_msg(sock != NULL, "zmq_socket: %s", zmq_strerror(errno));
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert_msg(zmq_connect(sock, endpoint) == 0, "zmq_connect %s: %s", endpoint,
                  zmq_strerror(errno));
    return sock;
}

void um_test_send_json(void *sock, json_t *msg)
{
    char *text = json_dumps(msg, JSON_COMPACT);
    ck_assert(text != NULL);
    size_t len = strlen(text);
    ck_assert_msg(zmq_send(sock, text, len, 0) == (int)len, "zmq_send: %s",
                  zmq_strerror(errno));
    free(text);
    json_decref(msg);
}

json_t *um_test_recv(void *sock, int timeout_ms)
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

void um_test_step_batch_to_end(struct um_gen *const *gens, int n)
{
    for (int guard = 0;; guard++) {
        int running = 0;
        for (int j = 0; j < n; j++)
            running += !um_gen_done(gens[j]);
        if (!running)
            return;
        ck_assert_int_lt(guard, 100000);
        ck_assert_int_eq(um_gen_step_batch(gens, n), 0);
    }
}

void um_test_check_ragged(struct um_model *model, const int32_t *ids, int32_t n_seq,
                          int32_t seq_len, double tol, const char *name)
{
    ck_assert_int_ge(seq_len, 4);
    const int32_t V = um_model_config(model)->embedding_size;
    const int32_t *last = ids + (size_t)(n_seq - 1) * seq_len;
    const int32_t *starts[3] = {ids, last, ids};
    const int32_t lens[3] = {seq_len - 2, seq_len, 3};
    int32_t offsets[4] = {0};
    for (int s = 0; s < 3; s++)
        offsets[s + 1] = offsets[s] + lens[s];
    const int32_t T = offsets[3];

    int32_t *cat = malloc((size_t)T * sizeof *cat), *rows = malloc((size_t)T * sizeof *rows);
    float *ragged = malloc((size_t)T * V * sizeof *ragged);
    float *alone = malloc((size_t)seq_len * V * sizeof *alone);
    ck_assert(cat && rows && ragged && alone);
    for (int s = 0; s < 3; s++)
        memcpy(cat + offsets[s], starts[s], (size_t)lens[s] * sizeof *cat);
    /* Every position, last to first, so that the row order differs from the row index. */
    for (int32_t i = 0; i < T; i++)
        rows[i] = T - 1 - i;
    int rc = um_model_forward_ragged(model, cat, offsets, 3, rows, T, ragged);
    ck_assert_msg(rc == 0, "%s: ragged forward returned %d", name, rc);

    double max_diff = 0;
    for (int s = 0; s < 3; s++) {
        ck_assert_int_eq(um_model_forward(model, starts[s], 1, lens[s], alone), 0);
        for (int32_t p = 0; p < lens[s]; p++) {
            const float *got = ragged + (size_t)(T - 1 - (offsets[s] + p)) * V;
            const float *want = alone + (size_t)p * V;
            for (int32_t v = 0; v < V; v++) {
                double diff = fabs((double)got[v] - want[v]);
                max_diff = diff > max_diff ? diff : max_diff;
                ck_assert_msg(diff <= tol * (1.0 + fabs(want[v])),
                              "%s: sequence %d of %d tokens, position %d, token %d: ragged "
                              "%.9g, alone %.9g", name, s, lens[s], p, v, got[v], want[v]);
            }
        }
    }
    printf("%s: ragged pass of %d, %d and %d tokens, max |ragged - alone| = %.2e\n", name,
           lens[0], lens[1], lens[2], max_diff);
    free(alone);
    free(ragged);
    free(rows);
    free(cat);
}
