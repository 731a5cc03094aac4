/*
 * Gateway tests: the real unmaskd (bundled model, real plugins) on a private ipc
 * endpoint, the real unmask-gateway on 127.0.0.1 with a port the system picks, and
 * libcurl as the HTTP client. Expected texts come from the daemon itself, asked over
 * a DEALER socket with the same settings, so every check compares the gateway with
 * the daemon it fronts.
 *
 * Each TCase starts its daemon and gateway once in an unchecked fixture and stops them
 * with SIGTERM in the teardown. Tests that need a daemon that dies, or none at all,
 * start their own processes.
 */
#include "config.h"

#include <check.h>

#ifdef HAVE_LIBCURL

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
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

#include <unmaskd/protocol.h>

#include "testutil.h"

extern char **environ;

/* Milliseconds to wait for a process to come up or for a reply that should come. */
#define S_START_TIMEOUT_MS 60000
#define S_REPLY_TIMEOUT_MS 60000
/* The bundled model's end-of-text token (models/tinystories/config.json). */
#define S_EOS 4094

typedef struct s_proc {
    pid_t pid;
    char log[512];
} s_proc_t;

/* A daemon and a gateway in front of it. */
typedef struct s_stack {
    s_proc_t daemon;
    s_proc_t gateway;
    char endpoint[160];
    char url[128]; /* "http://127.0.0.1:PORT" without the trailing slash */
} s_stack_t;

static s_stack_t s_stack = {.daemon = {.pid = -1}, .gateway = {.pid = -1}};
static int s_instance;

/* ------------------------------------------------------------------------- */
/* Time and processes                                                        */

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

static void s_log_path(char *buf, size_t len, const char *what, int n)
{
    const char *out = getenv("UM_TEST_OUT");
    if (out && *out) {
        mkdir(out, 0777);
        snprintf(buf, len, "%s/gateway-%s-%ld-%d.log", out, what, (long)getpid(), n);
    } else {
        snprintf(buf, len, "/dev/null");
    }
}

/* Spawn argv with stderr in p->log; stdout goes to stdout_fd, or /dev/null when -1. */
static void s_spawn(s_proc_t *p, const char *const *argv, int stdout_fd)
{
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, p->log, O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    if (stdout_fd >= 0)
        posix_spawn_file_actions_adddup2(&fa, stdout_fd, STDOUT_FILENO);
    else
        posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    int rc = posix_spawn(&p->pid, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    ck_assert_msg(rc == 0, "cannot start %s: %s", argv[0], strerror(rc));
}

/* SIGTERM, then wait up to timeout_ms; returns the wait status, or -1 after SIGKILL. */
static int s_stop(s_proc_t *p, int timeout_ms)
{
    if (p->pid <= 0)
        return -1;
    kill(p->pid, SIGTERM);
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

/*
 * Start unmaskd on a fresh ipc endpoint with the bundled model and real plugins. extra is
 * a NULL-terminated list of further arguments, or NULL.
 */
static void s_start_daemon(s_stack_t *st, const char *const *extra)
{
    int n = ++s_instance;
    snprintf(st->endpoint, sizeof st->endpoint, "ipc:///tmp/unmask-gateway-test-%ld-%d.sock",
             (long)getpid(), n);
    unlink(st->endpoint + strlen("ipc://"));
    s_log_path(st->daemon.log, sizeof st->daemon.log, "daemon", n);
    const char *argv[24] = {um_test_env("UM_TEST_DAEMON"), "--model",
                            um_test_env("UM_TEST_MODEL"), "--plugin-dir",
                            um_test_env("UM_TEST_PLUGINS"), "--bind", st->endpoint,
                            "--log-level", "debug", "--threads", "1"};
    int argc = 11;
    for (int i = 0; extra && extra[i] && argc < 23; i++)
        argv[argc++] = extra[i];
    argv[argc] = NULL;
    s_spawn(&st->daemon, argv, -1);
}

/*
 * Start unmask-gateway in front of endpoint on a free port and read the URL it prints.
 * extra is a NULL-terminated list of further arguments, or NULL.
 */
static void s_start_gateway(s_stack_t *st, const char *endpoint, const char *const *extra)
{
    int n = ++s_instance;
    s_log_path(st->gateway.log, sizeof st->gateway.log, "gateway", n);
    const char *argv[24] = {um_test_env("UM_TEST_GATEWAY"), "--connect", endpoint, "--port", "0",
                            "--log-level", "debug"};
    int argc = 7;
    for (int i = 0; extra && extra[i] && argc < 23; i++)
        argv[argc++] = extra[i];
    argv[argc] = NULL;

    int fds[2];
    ck_assert(pipe(fds) == 0);
    s_spawn(&st->gateway, argv, fds[1]);
    close(fds[1]);
    char line[160] = "";
    size_t len = 0;
    double deadline = s_now_ms() + S_START_TIMEOUT_MS;
    while (len < sizeof line - 1 && !strchr(line, '\n') && s_now_ms() < deadline) {
        struct pollfd p = {.fd = fds[0], .events = POLLIN};
        if (poll(&p, 1, 200) <= 0)
            continue;
        ssize_t got = read(fds[0], line + len, sizeof line - 1 - len);
        if (got <= 0)
            break;
        len += (size_t)got;
        line[len] = '\0';
    }
    close(fds[0]);
    char *nl = strchr(line, '\n');
    ck_assert_msg(nl != NULL, "unmask-gateway printed no URL: see %s", st->gateway.log);
    *nl = '\0';
    size_t line_len = strlen(line);
    ck_assert_msg(line_len > 17 && strncmp(line, "http://127.0.0.1:", 17) == 0
                      && line[line_len - 1] == '/',
                  "unmask-gateway printed \"%s\" instead of its URL", line);
    line[line_len - 1] = '\0';
    snprintf(st->url, sizeof st->url, "%s", line);
}

/* ------------------------------------------------------------------------- */
/* HTTP                                                                      */

typedef struct s_http {
    long status;
    char *body;   /* NUL-terminated */
    size_t len;
    char content_type[128];
    char allow[64];
    char retry_after[16];
    char csp[512];
    double ms;    /* wall time of the request */
    size_t stop_after; /* > 0: abort the transfer once the body has this many bytes */
    pid_t kill_on_data; /* > 0: SIGKILL this process when the first body bytes arrive */
} s_http_t;

static size_t s_on_body(char *data, size_t size, size_t n, void *arg)
{
    s_http_t *h = arg;
    size_t add = size * n;
    char *bigger = realloc(h->body, h->len + add + 1);
    if (!bigger)
        return 0;
    h->body = bigger;
    memcpy(h->body + h->len, data, add);
    h->len += add;
    h->body[h->len] = '\0';
    if (h->kill_on_data > 0) {
        kill(h->kill_on_data, SIGKILL);
        h->kill_on_data = 0;
    }
    if (h->stop_after > 0 && h->len >= h->stop_after)
        return 0; /* libcurl ends the transfer, and closes the connection */
    return add;
}

/* Copy the value of header name (case-insensitive) from line into dst. */
static void s_take_header(const char *line, size_t len, const char *name, char *dst, size_t cap)
{
    size_t nl = strlen(name);
    if (len <= nl || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return;
    const char *v = line + nl + 1;
    size_t vlen = len - nl - 1;
    while (vlen > 0 && (*v == ' ' || *v == '\t'))
        v++, vlen--;
    while (vlen > 0 && (v[vlen - 1] == '\r' || v[vlen - 1] == '\n'))
        vlen--;
    snprintf(dst, cap, "%.*s", (int)vlen, v);
}

static size_t s_on_header(char *line, size_t size, size_t n, void *arg)
{
    s_http_t *h = arg;
    size_t len = size * n;
    s_take_header(line, len, "Content-Type", h->content_type, sizeof h->content_type);
    s_take_header(line, len, "Allow", h->allow, sizeof h->allow);
    s_take_header(line, len, "Retry-After", h->retry_after, sizeof h->retry_after);
    s_take_header(line, len, "Content-Security-Policy", h->csp, sizeof h->csp);
    return len;
}

/* A body sent with chunked transfer encoding, so that no Content-Length announces it. */
typedef struct s_upload {
    const char *data;
    size_t len, off;
} s_upload_t;

static size_t s_on_read(char *buf, size_t size, size_t n, void *arg)
{
    s_upload_t *u = arg;
    size_t want = size * n, left = u->len - u->off;
    size_t take = want < left ? want : left;
    memcpy(buf, u->data + u->off, take);
    u->off += take;
    return take;
}

/*
 * Send method path with body (NULL for none) to url. chunked sends the body without a
 * Content-Length. Fills h; the caller frees h->body.
 */
static void s_http_to(const char *url, const char *method, const char *path, const char *body,
                      size_t body_len, int chunked, s_http_t *h)
{
    size_t stop_after = h->stop_after;
    pid_t kill_on_data = h->kill_on_data;
    memset(h, 0, sizeof *h);
    h->stop_after = stop_after;
    h->kill_on_data = kill_on_data;
    h->body = calloc(1, 1);
    char full[512];
    snprintf(full, sizeof full, "%s%s", url, path);
    CURL *c = curl_easy_init();
    ck_assert(c != NULL);
    curl_easy_setopt(c, CURLOPT_URL, full);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (strcmp(method, "HEAD") == 0)
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, s_on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, h);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, s_on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, h);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)S_REPLY_TIMEOUT_MS);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    struct curl_slist *headers = curl_slist_append(NULL, "Content-Type: application/json");
    /* Without this, libcurl waits up to a second for "100 Continue" on large bodies. */
    headers = curl_slist_append(headers, "Expect:");
    s_upload_t up = {.data = body, .len = body_len};
    if (body && chunked) {
        headers = curl_slist_append(headers, "Transfer-Encoding: chunked");
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_READFUNCTION, s_on_read);
        curl_easy_setopt(c, CURLOPT_READDATA, &up);
    } else if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
    double t0 = s_now_ms();
    CURLcode rc = curl_easy_perform(c);
    h->ms = s_now_ms() - t0;
    ck_assert_msg(rc == CURLE_OK || (rc == CURLE_WRITE_ERROR && h->stop_after > 0),
                  "%s %s failed: %s", method, full, curl_easy_strerror(rc));
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &h->status);
    curl_slist_free_all(headers);
    curl_easy_cleanup(c);
}

static void s_http(const char *method, const char *path, const char *body, s_http_t *h)
{
    h->stop_after = 0;
    h->kill_on_data = 0;
    s_http_to(s_stack.url, method, path, body, body ? strlen(body) : 0, 0, h);
}

/* POST json (released) to path and return the parsed response; status in *status. */
static json_t *s_post_json(const char *path, json_t *req, long *status)
{
    char *text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    s_http_t h;
    s_http("POST", path, text, &h);
    free(text);
    *status = h.status;
    json_error_t jerr;
    json_t *r = json_loads(h.body, 0, &jerr);
    ck_assert_msg(r != NULL, "POST %s: status %ld, body is not JSON (%s): %.300s", path, h.status,
                  jerr.text, h.body);
    ck_assert_msg(strncmp(h.content_type, "application/json", 16) == 0,
                  "POST %s: Content-Type %s", path, h.content_type);
    free(h.body);
    return r;
}

/* POST req and require 200. */
static json_t *s_post_ok(const char *path, json_t *req)
{
    long status = 0;
    json_t *r = s_post_json(path, req, &status);
    if (status != 200) {
        char *text = json_dumps(r, JSON_COMPACT);
        ck_abort_msg("POST %s: status %ld: %s", path, status, text);
    }
    return r;
}

/* Check an HTTP error: status, error.code, error.param (NULL: null) and a message part. */
static void s_expect_error_body(long status, json_t *r, long want_status, const char *code,
                                const char *param, const char *message_part)
{
    char *text = json_dumps(r, JSON_COMPACT);
    json_t *e = json_object_get(r, "error");
    ck_assert_msg(status == want_status, "status %ld, expected %ld: %s", status, want_status, text);
    ck_assert_msg(json_is_object(e), "no error object: %s", text);
    const char *got_code = json_string_value(json_object_get(e, "code"));
    ck_assert_msg(got_code && strcmp(got_code, code) == 0, "code %s, expected %s: %s", got_code,
                  code, text);
    json_t *p = json_object_get(e, "param");
    if (param)
        ck_assert_msg(json_is_string(p) && strcmp(json_string_value(p), param) == 0,
                      "param %s, expected %s: %s", json_string_value(p), param, text);
    else
        ck_assert_msg(json_is_null(p), "param should be null: %s", text);
    const char *msg = json_string_value(json_object_get(e, "message"));
    ck_assert_msg(msg && strstr(msg, message_part), "message lacks \"%s\": %s", message_part, text);
    ck_assert_msg(json_is_string(json_object_get(e, "type")), "no error type: %s", text);
    free(text);
}

static void s_expect_error(const char *path, const char *body, long want_status,
                           const char *code, const char *param, const char *message_part)
{
    s_http_t h;
    s_http("POST", path, body, &h);
    json_error_t jerr;
    json_t *r = json_loads(h.body, 0, &jerr);
    ck_assert_msg(r != NULL, "POST %s %.80s: body is not JSON: %.200s", path, body, h.body);
    s_expect_error_body(h.status, r, want_status, code, param, message_part);
    json_decref(r);
    free(h.body);
}

/* ------------------------------------------------------------------------- */
/* Server-sent events                                                        */

/* Parse an SSE body into [{"event": name or null, "data": string}], skipping comments. */
static json_t *s_parse_sse(const char *body)
{
    json_t *events = json_array();
    const char *p = body;
    while (*p) {
        const char *end = strstr(p, "\n\n");
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char event[64] = "";
        char *data = calloc(1, len + 1);
        size_t dlen = 0;
        const char *line = p;
        while (line < p + len) {
            const char *nl = memchr(line, '\n', (size_t)(p + len - line));
            size_t ll = nl ? (size_t)(nl - line) : (size_t)(p + len - line);
            if (ll >= 7 && strncmp(line, "event: ", 7) == 0)
                snprintf(event, sizeof event, "%.*s", (int)(ll - 7), line + 7);
            else if (ll >= 6 && strncmp(line, "data: ", 6) == 0) {
                memcpy(data + dlen, line + 6, ll - 6);
                dlen += ll - 6;
            }
            line += ll + 1;
        }
        data[dlen] = '\0';
        if (dlen > 0)
            json_array_append_new(events, json_pack("{s:s?, s:s}", "event",
                                                    event[0] ? event : NULL, "data", data));
        free(data);
        p += len;
        while (*p == '\n')
            p++;
    }
    return events;
}

static json_t *s_event_json(const json_t *ev)
{
    const char *data = json_string_value(json_object_get(ev, "data"));
    json_error_t jerr;
    json_t *j = json_loads(data, 0, &jerr);
    ck_assert_msg(j != NULL, "event data is not JSON (%s): %.200s", jerr.text, data);
    return j;
}

/* POST req with "stream": true and return its events; requires 200 and text/event-stream. */
static json_t *s_post_stream(const char *path, json_t *req)
{
    char *text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    s_http_t h;
    s_http("POST", path, text, &h);
    free(text);
    ck_assert_msg(h.status == 200, "POST %s: status %ld: %.300s", path, h.status, h.body);
    ck_assert_msg(strncmp(h.content_type, "text/event-stream", 17) == 0,
                  "POST %s: Content-Type %s", path, h.content_type);
    json_t *events = s_parse_sse(h.body);
    free(h.body);
    return events;
}

/* ------------------------------------------------------------------------- */
/* The daemon, asked directly                                                */

/* Send req (released) to the daemon with id "direct" and return its final reply. */
static json_t *s_daemon_call(const char *endpoint, json_t *req)
{
    void *ctx = zmq_ctx_new();
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    ck_assert(zmq_connect(sock, endpoint) == 0);
    json_object_set_new(req, "id", json_string("direct"));
    char *text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    ck_assert(zmq_send(sock, text, strlen(text), 0) >= 0);
    free(text);
    json_t *reply = NULL;
    while (!reply) {
        zmq_pollitem_t item = {.socket = sock, .events = ZMQ_POLLIN};
        ck_assert_msg(zmq_poll(&item, 1, S_REPLY_TIMEOUT_MS) > 0, "no reply from %s", endpoint);
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        ck_assert(zmq_msg_recv(&msg, sock, 0) >= 0);
        json_t *r = json_loadb(zmq_msg_data(&msg), zmq_msg_size(&msg), 0, NULL);
        zmq_msg_close(&msg);
        ck_assert(r != NULL);
        if (strcmp(json_string_value(json_object_get(r, "type")), UM_REPLY_STEP) == 0)
            json_decref(r);
        else
            reply = r;
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return reply;
}

/*
 * The completion text the gateway should return for a generate request: the daemon's
 * tokens up to the first end-of-text token, decoded. *n_tokens gets that count and
 * *ended whether an end-of-text token was found.
 */
static char *s_expected_completion(json_t *generate, int *n_tokens, int *ended)
{
    json_object_set_new(generate, "op", json_string(UM_OP_GENERATE));
    json_t *done = s_daemon_call(s_stack.endpoint, generate);
    ck_assert_str_eq(json_string_value(json_object_get(done, "type")), UM_REPLY_DONE);
    json_t *tokens = json_object_get(done, "tokens");
    json_t *prefix = json_array();
    size_t i;
    json_t *t;
    *ended = 0;
    json_array_foreach(tokens, i, t) {
        if (json_integer_value(t) == S_EOS) {
            *ended = 1;
            break;
        }
        json_array_append(prefix, t);
    }
    *n_tokens = (int)json_array_size(prefix);
    json_decref(done);
    if (json_array_size(prefix) == 0) {
        json_decref(prefix);
        return strdup("");
    }
    json_t *text = s_daemon_call(s_stack.endpoint, json_pack("{s:s, s:o}", "op", UM_OP_DETOKENIZE,
                                                            "tokens", prefix));
    char *s = strdup(json_string_value(json_object_get(text, "text")));
    json_decref(text);
    return s;
}

/* The number of tokens the daemon's tokenizer makes of text. */
static int s_token_count(const char *text)
{
    json_t *r = s_daemon_call(s_stack.endpoint,
                              json_pack("{s:s, s:s}", "op", UM_OP_TOKENIZE, "text", text));
    int n = (int)json_array_size(json_object_get(r, "tokens"));
    json_decref(r);
    return n;
}

/* ------------------------------------------------------------------------- */
/* Fixtures                                                                  */

static void s_wait_healthy(const s_stack_t *st)
{
    double deadline = s_now_ms() + S_START_TIMEOUT_MS;
    for (;;) {
        s_http_t h = {0};
        s_http_to(st->url, "GET", "/api/health", NULL, 0, 0, &h);
        long status = h.status;
        free(h.body);
        if (status == 200)
            return;
        ck_assert_msg(s_now_ms() < deadline, "the gateway did not reach unmaskd: see %s and %s",
                      st->gateway.log, st->daemon.log);
        s_sleep_ms(200);
    }
}

static void s_setup_curl(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void s_teardown_curl(void)
{
    curl_global_cleanup();
}

static void s_setup_stack(void)
{
    s_setup_curl();
    s_start_daemon(&s_stack, NULL);
    s_start_gateway(&s_stack, s_stack.endpoint, NULL);
    s_wait_healthy(&s_stack);
}

/* A teardown cannot fail a test, so a bad exit status goes to stderr for the log. */
static void s_teardown_stack(void)
{
    int status = s_stop(&s_stack.gateway, 30000);
    if (status < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "unmask-gateway did not exit with status 0 after SIGTERM (wait status "
                "%d): see %s\n", status, s_stack.gateway.log);
    s_stop(&s_stack.daemon, 30000);
    unlink(s_stack.endpoint + strlen("ipc://"));
    curl_global_cleanup();
}

/* ------------------------------------------------------------------------- */
/* Endpoints                                                                 */

START_TEST(test_page)
{
    s_http_t h;
    s_http("GET", "/", NULL, &h);
    ck_assert_int_eq(h.status, 200);
    ck_assert_str_eq(h.content_type, "text/html; charset=utf-8");
    ck_assert_msg(strstr(h.csp, "default-src 'none'") != NULL, "CSP: %s", h.csp);
    ck_assert_msg(strstr(h.body, "<canvas") && strstr(h.body, "/api/generate")
                      && strstr(h.body, "/api/info"),
                  "the page lacks its canvas or its API calls");
    /* Self-contained: nothing is loaded from another origin. */
    const char *external[] = {"src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import",
                              "url(http", "<link"};
    for (size_t i = 0; i < sizeof external / sizeof external[0]; i++)
        ck_assert_msg(strstr(h.body, external[i]) == NULL, "the page contains %s", external[i]);
    free(h.body);

    s_http("HEAD", "/", NULL, &h);
    ck_assert_int_eq(h.status, 200);
    ck_assert_int_eq(h.len, 0);
    free(h.body);
}
END_TEST

START_TEST(test_models_info_health)
{
    s_http_t h;
    s_http("GET", "/v1/models", NULL, &h);
    ck_assert_int_eq(h.status, 200);
    json_t *r = json_loads(h.body, 0, NULL);
    free(h.body);
    ck_assert_str_eq(json_string_value(json_object_get(r, "object")), "list");
    json_t *m = json_array_get(json_object_get(r, "data"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(m, "id")), "tinystories");
    ck_assert_str_eq(json_string_value(json_object_get(m, "object")), "model");
    ck_assert_str_eq(json_string_value(json_object_get(m, "owned_by")), "unmaskd");
    json_decref(r);

    s_http("GET", "/v1/models/tinystories", NULL, &h);
    ck_assert_int_eq(h.status, 200);
    free(h.body);
    /* One trailing slash, as clients built on a base URL ending in "/" send it. */
    s_http("GET", "/v1/models/tinystories/", NULL, &h);
    ck_assert_int_eq(h.status, 200);
    ck_assert_ptr_nonnull(strstr(h.body, "\"tinystories\""));
    free(h.body);
    s_http("GET", "/v1/models/gpt-4", NULL, &h);
    r = json_loads(h.body, 0, NULL);
    s_expect_error_body(h.status, r, 404, "model_not_found", "model", "serves \"tinystories\"");
    json_decref(r);
    free(h.body);

    s_http("GET", "/api/info", NULL, &h);
    ck_assert_int_eq(h.status, 200);
    r = json_loads(h.body, 0, NULL);
    free(h.body);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "protocol")), UM_PROTOCOL_VERSION);
    json_t *remask = json_object_get(json_object_get(r, "plugins"), "remask");
    int has_default = 0;
    size_t i;
    json_t *p;
    json_array_foreach(remask, i, p)
        has_default |= strcmp(json_string_value(json_object_get(p, "name")), "low_confidence") == 0;
    ck_assert_msg(has_default, "/api/info lists no low_confidence policy");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(r, "gateway"), "model_id")),
                     "tinystories");
    ck_assert_ptr_null(json_object_get(r, "id"));
    json_decref(r);

    s_http("GET", "/api/health", NULL, &h);
    ck_assert_int_eq(h.status, 200);
    r = json_loads(h.body, 0, NULL);
    free(h.body);
    ck_assert_str_eq(json_string_value(json_object_get(r, "status")), "ok");
    ck_assert(json_is_object(json_object_get(r, "daemon")));
    json_decref(r);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Completions                                                               */

START_TEST(test_completion)
{
    const char *prompt = "once upon a time";
    int n_tokens = 0, ended = 0;
    char *want = s_expected_completion(json_pack("{s:s, s:i, s:i}", "prompt", prompt,
                                                 "gen_length", 24, "seed", 1),
                                       &n_tokens, &ended);
    json_t *r = s_post_ok("/v1/completions", json_pack("{s:s, s:s, s:i, s:i}", "model",
                                                       "anything", "prompt", prompt,
                                                       "max_tokens", 24, "seed", 1));
    ck_assert_str_eq(json_string_value(json_object_get(r, "object")), "text_completion");
    ck_assert_msg(strncmp(json_string_value(json_object_get(r, "id")), "cmpl-", 5) == 0,
                  "id %s", json_string_value(json_object_get(r, "id")));
    ck_assert_str_eq(json_string_value(json_object_get(r, "model")), "tinystories");
    ck_assert(json_integer_value(json_object_get(r, "created")) > 1600000000);
    json_t *choices = json_object_get(r, "choices");
    ck_assert_int_eq(json_array_size(choices), 1);
    json_t *c = json_array_get(choices, 0);
    ck_assert_int_eq(json_integer_value(json_object_get(c, "index")), 0);
    ck_assert_str_eq(json_string_value(json_object_get(c, "text")), want);
    ck_assert(json_is_null(json_object_get(c, "logprobs")));
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")),
                     ended ? "stop" : "length");
    json_t *usage = json_object_get(r, "usage");
    int prompt_tokens = s_token_count(prompt);
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "prompt_tokens")), prompt_tokens);
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "completion_tokens")), n_tokens);
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "total_tokens")),
                     prompt_tokens + n_tokens);
    json_t *x = json_array_get(json_object_get(json_object_get(r, "unmaskd"), "choices"), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(x, "seed")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(x, "gen_length")), 24);
    json_decref(r);
    free(want);
}
END_TEST

/* Concatenate the text deltas of OpenAI chunks, checking their shape on the way. */
static char *s_join_chunks(json_t *events, const char *object, const char *field,
                           const char **finish, json_t **usage)
{
    size_t n = json_array_size(events);
    ck_assert_msg(n >= 3, "only %zu events", n);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(events, n - 1), "data")),
                     "[DONE]");
    size_t cap = 4096, len = 0;
    char *text = calloc(1, cap);
    const char *id = NULL;
    *finish = NULL;
    *usage = NULL;
    for (size_t i = 0; i + 1 < n; i++) {
        json_t *chunk = s_event_json(json_array_get(events, i));
        ck_assert_str_eq(json_string_value(json_object_get(chunk, "object")), object);
        const char *cid = json_string_value(json_object_get(chunk, "id"));
        if (!id)
            id = strdup(cid);
        ck_assert_str_eq(cid, id);
        json_t *choices = json_object_get(chunk, "choices");
        if (json_array_size(choices) == 0) {
            *usage = json_incref(json_object_get(chunk, "usage"));
            json_decref(chunk);
            continue;
        }
        json_t *c = json_array_get(choices, 0);
        json_t *fr = json_object_get(c, "finish_reason");
        if (json_is_string(fr))
            *finish = strdup(json_string_value(fr));
        json_t *src = strcmp(field, "text") == 0 ? c : json_object_get(c, "delta");
        const char *piece = json_string_value(json_object_get(src, strcmp(field, "text") == 0
                                                                      ? "text" : "content"));
        if (piece) {
            size_t pl = strlen(piece);
            while (len + pl + 1 > cap)
                text = realloc(text, cap *= 2);
            memcpy(text + len, piece, pl + 1);
            len += pl;
        }
        json_decref(chunk);
    }
    free((void *)id);
    return text;
}

START_TEST(test_completion_stream)
{
    const char *prompt = "one day, a boy named tim";
    int n_tokens = 0, ended = 0;
    char *want = s_expected_completion(json_pack("{s:s, s:i, s:i, s:i}", "prompt", prompt,
                                                 "gen_length", 32, "block_length", 8, "seed", 5),
                                       &n_tokens, &ended);
    json_t *events = s_post_stream("/v1/completions",
                                   json_pack("{s:s, s:i, s:i, s:i, s:b, s:{s:b}}", "prompt",
                                             prompt, "max_tokens", 32, "block_length", 8,
                                             "seed", 5, "stream", 1, "stream_options",
                                             "include_usage", 1));
    const char *finish = NULL;
    json_t *usage = NULL;
    char *got = s_join_chunks(events, "text_completion", "text", &finish, &usage);
    ck_assert_str_eq(got, want);
    ck_assert_str_eq(finish, ended ? "stop" : "length");
    ck_assert_msg(usage != NULL, "no usage chunk with include_usage");
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "completion_tokens")), n_tokens);
    /* With blocks of 8 the text arrives in more than one piece before the end. */
    ck_assert_msg(json_array_size(events) >= 4, "%zu events", json_array_size(events));
    json_decref(usage);
    free((void *)finish);
    free(got);
    json_decref(events);
    free(want);
}
END_TEST

START_TEST(test_completion_echo_stop_n)
{
    const char *prompt = "once upon a time";
    json_t *r = s_post_ok("/v1/completions", json_pack("{s:s, s:i, s:i, s:b}", "prompt", prompt,
                                                       "max_tokens", 24, "seed", 1, "echo", 1));
    const char *text = json_string_value(json_object_get(json_array_get(
        json_object_get(r, "choices"), 0), "text"));
    ck_assert_msg(strncmp(text, prompt, strlen(prompt)) == 0, "echo: %s", text);
    char *full = strdup(text + strlen(prompt));
    json_decref(r);

    /* A stop sequence taken from the middle of that text cuts the completion there. */
    ck_assert_msg(strlen(full) > 8, "the completion is too short to cut: \"%s\"", full);
    char stop[5];
    snprintf(stop, sizeof stop, "%.4s", full + strlen(full) / 2);
    const char *at = strstr(full, stop);
    r = s_post_ok("/v1/completions", json_pack("{s:s, s:i, s:i, s:[s]}", "prompt", prompt,
                                               "max_tokens", 24, "seed", 1, "stop", stop));
    json_t *c = json_array_get(json_object_get(r, "choices"), 0);
    ck_assert_int_eq(strlen(json_string_value(json_object_get(c, "text"))), (size_t)(at - full));
    ck_assert(strncmp(json_string_value(json_object_get(c, "text")), full, (size_t)(at - full)) == 0);
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), "stop");
    json_decref(r);

    /* The same stop sequence in a stream: no piece of it reaches the client. */
    json_t *events = s_post_stream("/v1/completions",
                                   json_pack("{s:s, s:i, s:i, s:s, s:b}", "prompt", prompt,
                                             "max_tokens", 24, "seed", 1, "stop", stop,
                                             "stream", 1));
    const char *finish = NULL;
    json_t *usage = NULL;
    char *got = s_join_chunks(events, "text_completion", "text", &finish, &usage);
    ck_assert_int_eq(strlen(got), (size_t)(at - full));
    ck_assert_str_eq(finish, "stop");
    free(got);
    free((void *)finish);
    json_decref(events);

    /* n = 2 over two prompts: four choices, seeds seed and seed + 1 per prompt. */
    r = s_post_ok("/v1/completions", json_pack("{s:[s, s], s:i, s:i, s:i, s:f}", "prompt", prompt,
                                               "the dog", "max_tokens", 8, "seed", 5, "n", 2,
                                               "temperature", 1.0));
    json_t *choices = json_object_get(r, "choices");
    ck_assert_int_eq(json_array_size(choices), 4);
    json_t *extra = json_object_get(json_object_get(r, "unmaskd"), "choices");
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(choices, i), "index")), i);
        ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(extra, i), "seed")),
                         5 + i % 2);
    }
    json_decref(r);
    free(full);
}
END_TEST

/* Diffusion settings reach the daemon: the text equals the daemon's for the same ones. */
START_TEST(test_completion_diffusion_fields)
{
    const char *prompt = "the little bird";
    int n_tokens = 0, ended = 0;
    char *want = s_expected_completion(
        json_pack("{s:s, s:i, s:i, s:i, s:s, s:f, s:i}", "prompt", prompt, "gen_length", 16,
                  "steps", 8, "block_length", 8, "remasking", "random", "cfg_scale", 0.5,
                  "seed", 9),
        &n_tokens, &ended);
    json_t *r = s_post_ok("/v1/completions",
                          json_pack("{s:s, s:i, s:i, s:i, s:s, s:f, s:i, s:o}", "prompt", prompt,
                                    "max_tokens", 16, "steps", 8, "block_length", 8, "remasking",
                                    "random", "cfg_scale", 0.5, "seed", 9, "remasking_params",
                                    json_object()));
    json_t *c = json_array_get(json_object_get(r, "choices"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(c, "text")), want);
    json_t *x = json_array_get(json_object_get(json_object_get(r, "unmaskd"), "choices"), 0);
    ck_assert_int_le(json_integer_value(json_object_get(x, "steps")), 8);
    ck_assert_int_ge(json_integer_value(json_object_get(x, "steps")), 1);
    json_decref(r);
    free(want);
}
END_TEST

/* Without max_tokens, gen_length is 64 or what the context leaves after the prompt. */
START_TEST(test_completion_default_length)
{
    json_t *r = s_post_ok("/v1/completions", json_pack("{s:s, s:i}", "prompt", "a cat", "seed", 2));
    json_t *x = json_array_get(json_object_get(json_object_get(r, "unmaskd"), "choices"), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(x, "gen_length")), 64);
    json_decref(r);

    /* A prompt of about 100 tokens leaves the rest of the bundled model's 128 positions. */
    char prompt[1024] = "";
    while (s_token_count(prompt) < 100)
        strcat(prompt, " the");
    int n = s_token_count(prompt);
    r = s_post_ok("/v1/completions", json_pack("{s:s, s:i}", "prompt", prompt, "seed", 2));
    x = json_array_get(json_object_get(json_object_get(r, "unmaskd"), "choices"), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(x, "gen_length")), 128 - n);
    json_decref(r);

    /* A prompt that fills the context leaves no room. */
    while (s_token_count(prompt) < 128)
        strcat(prompt, " the");
    json_t *req = json_pack("{s:s}", "prompt", prompt);
    char *body = json_dumps(req, 0);
    json_decref(req);
    s_expect_error("/v1/completions", body, 400, UM_ERR_OUT_OF_RANGE, "prompt", "leaves no room");
    free(body);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Chat                                                                      */

START_TEST(test_chat)
{
    json_t *messages = json_pack("[{s:s, s:s}, {s:s, s:[{s:s, s:s}]}]", "role", "system",
                                 "content", "you tell short stories.", "role", "user", "content",
                                 "type", "text", "text", "tell me about a cat");
    /* The bundled model has no chat template, so the gateway uses the plain one. */
    const char *rendered = "you tell short stories.\n\nUser: tell me about a cat\nAssistant:";
    int n_tokens = 0, ended = 0;
    char *want = s_expected_completion(json_pack("{s:s, s:i, s:i}", "prompt", rendered,
                                                 "gen_length", 32, "seed", 3),
                                       &n_tokens, &ended);
    json_t *r = s_post_ok("/v1/chat/completions",
                          json_pack("{s:s, s:O, s:i, s:i}", "model", "tinystories", "messages",
                                    messages, "max_completion_tokens", 32, "seed", 3));
    ck_assert_str_eq(json_string_value(json_object_get(r, "object")), "chat.completion");
    ck_assert_msg(strncmp(json_string_value(json_object_get(r, "id")), "chatcmpl-", 9) == 0,
                  "id %s", json_string_value(json_object_get(r, "id")));
    json_t *c = json_array_get(json_object_get(r, "choices"), 0);
    json_t *msg = json_object_get(c, "message");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "role")), "assistant");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "content")), want);
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")),
                     ended ? "stop" : "length");
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "usage"),
                                                        "prompt_tokens")),
                     s_token_count(rendered));
    json_decref(r);

    json_t *events = s_post_stream("/v1/chat/completions",
                                   json_pack("{s:O, s:i, s:i, s:b}", "messages", messages,
                                             "max_tokens", 32, "seed", 3, "stream", 1));
    json_t *first = s_event_json(json_array_get(events, 0));
    json_t *delta = json_object_get(json_array_get(json_object_get(first, "choices"), 0), "delta");
    ck_assert_str_eq(json_string_value(json_object_get(delta, "role")), "assistant");
    json_decref(first);
    const char *finish = NULL;
    json_t *usage = NULL;
    char *got = s_join_chunks(events, "chat.completion.chunk", "content", &finish, &usage);
    ck_assert_str_eq(got, want);
    ck_assert_str_eq(finish, ended ? "stop" : "length");
    ck_assert_ptr_null(usage);
    free(got);
    free((void *)finish);
    json_decref(events);
    json_decref(messages);
    free(want);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* The step stream                                                           */

START_TEST(test_step_stream)
{
    json_t *events = s_post_stream("/api/generate",
                                   json_pack("{s:s, s:i, s:i, s:i}", "prompt", "once upon a time",
                                             "gen_length", 12, "steps", 6, "seed", 4));
    size_t n = json_array_size(events);
    ck_assert_int_ge(n, 2);
    int committed[12] = {0};
    int last_step = -1;
    for (size_t i = 0; i + 1 < n; i++) {
        json_t *ev = json_array_get(events, i);
        ck_assert_str_eq(json_string_value(json_object_get(ev, "event")), UM_REPLY_STEP);
        json_t *step = s_event_json(ev);
        int s = (int)json_integer_value(json_object_get(step, "step"));
        ck_assert_int_gt(s, last_step);
        last_step = s;
        ck_assert_int_eq(json_integer_value(json_object_get(step, "steps")), 6);
        ck_assert(json_number_value(json_object_get(step, "step_ms")) > 0);
        size_t k;
        json_t *e;
        json_array_foreach(json_object_get(step, "committed"), k, e) {
            json_int_t pos = json_integer_value(json_object_get(e, "pos"));
            ck_assert(pos >= 0 && pos < 12);
            committed[pos]++;
        }
        json_decref(step);
    }
    for (int i = 0; i < 12; i++)
        ck_assert_msg(committed[i] == 1, "position %d committed %d times", i, committed[i]);

    json_t *last = json_array_get(events, n - 1);
    ck_assert_str_eq(json_string_value(json_object_get(last, "event")), UM_REPLY_DONE);
    json_t *done = s_event_json(last);
    json_t *direct = s_daemon_call(s_stack.endpoint,
                                   json_pack("{s:s, s:s, s:i, s:i, s:i}", "op", "generate",
                                             "prompt", "once upon a time", "gen_length", 12,
                                             "steps", 6, "seed", 4));
    ck_assert_str_eq(json_string_value(json_object_get(done, "text")),
                     json_string_value(json_object_get(direct, "text")));
    ck_assert(json_equal(json_object_get(done, "tokens"), json_object_get(direct, "tokens")));
    json_decref(direct);
    json_decref(done);
    json_decref(events);
}
END_TEST

/* A client that leaves mid-stream cancels its generation on the daemon. */
START_TEST(test_disconnect_cancels)
{
    size_t log_len = 0;
    char *before = um_test_read_file(s_stack.daemon.log, &log_len);
    int cancelled_before = 0;
    for (const char *p = before; p && (p = strstr(p, "finished with cancelled")); p++)
        cancelled_before++;
    free(before);

    s_http_t h = {.stop_after = 1}; /* hang up on the first bytes of the first step event */
    const char *body = "{\"prompt\":\"once upon a time\",\"gen_length\":120,\"steps\":120,"
                       "\"seed\":1}";
    s_http_to(s_stack.url, "POST", "/api/generate", body, strlen(body), 0, &h);
    ck_assert_int_eq(h.status, 200);
    free(h.body);

    /* The daemon logs the cancelled request. 120 steps would take much longer to finish. */
    double deadline = s_now_ms() + 30000;
    int cancelled = cancelled_before;
    while (cancelled == cancelled_before && s_now_ms() < deadline) {
        s_sleep_ms(100);
        char *log = um_test_read_file(s_stack.daemon.log, &log_len);
        cancelled = 0;
        for (const char *p = log; p && (p = strstr(p, "finished with cancelled")); p++)
            cancelled++;
        free(log);
    }
    ck_assert_msg(cancelled > cancelled_before, "unmaskd did not cancel the abandoned request: "
                  "see %s", s_stack.daemon.log);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Errors                                                                    */

START_TEST(test_error_json_and_types)
{
    s_expect_error("/v1/completions", "{\"prompt\": ", 400, UM_ERR_BAD_JSON, NULL, "not valid JSON");
    s_expect_error("/v1/completions", "[1, 2]", 400, UM_ERR_BAD_JSON, NULL, "must be a JSON object");
    s_expect_error("/v1/completions", "{\"prompt\":\"a\",\"prompt\":\"b\"}", 400, UM_ERR_BAD_JSON,
                   NULL, "duplicate");
    s_expect_error("/v1/completions", "{}", 400, UM_ERR_INVALID, "prompt", "prompt is required");
    s_expect_error("/v1/completions", "{\"prompt\":5}", 400, UM_ERR_INVALID, "prompt",
                   "must be a string or an array of strings, got an integer");
    s_expect_error("/v1/completions", "{\"prompt\":[1,2,3]}", 400, "unsupported", "prompt",
                   "token ids");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":\"many\"}", 400,
                   UM_ERR_INVALID, "max_tokens", "max_tokens must be an integer, got a string");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":0}", 400,
                   UM_ERR_OUT_OF_RANGE, "max_tokens", "max_tokens must be in [1,");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"n\":99}", 400, UM_ERR_OUT_OF_RANGE, "n",
                   "n must be in [1, 16]");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"stream\":\"yes\"}", 400, UM_ERR_INVALID,
                   "stream", "stream must be true or false");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"temperature\":\"hot\"}", 400,
                   UM_ERR_INVALID, "temperature", "temperature must be a number");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}",
                   400, UM_ERR_OUT_OF_RANGE, "stop", "at most 4");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"max_token\":3}", 400,
                   UM_ERR_UNKNOWN_FIELD, "max_token", "did you mean max_tokens?");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"gen_length\":3}", 400,
                   UM_ERR_UNKNOWN_FIELD, "gen_length", "max_tokens");
    s_expect_error("/v1/chat/completions", "{\"prompt\":\"x\"}", 400, UM_ERR_UNKNOWN_FIELD,
                   "prompt", "chat requests take messages");
    s_expect_error("/v1/chat/completions", "{\"messages\":[]}", 400, UM_ERR_INVALID, "messages",
                   "messages is empty");
    s_expect_error("/v1/chat/completions", "{\"messages\":[{\"role\":\"user\"},{\"role\":7}]}", 400,
                   UM_ERR_INVALID, "messages[1].role", "must be a string, got an integer");
    s_expect_error("/v1/chat/completions", "{\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}",
                   400, "unsupported", "messages[0].role", "tool calls");
    s_expect_error("/v1/chat/completions",
                   "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
                   400, "unsupported", "messages[0].content[0].type", "text parts only");
    s_expect_error("/v1/chat/completions",
                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":4,"
                   "\"max_completion_tokens\":5}",
                   400, UM_ERR_INVALID, "max_completion_tokens", "differ");
}
END_TEST

START_TEST(test_error_unsupported)
{
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"top_p\":0.5}", 400, "unsupported",
                   "top_p", "nucleus");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"logprobs\":2}", 400, "unsupported",
                   "logprobs", "log probabilities");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"presence_penalty\":1}", 400,
                   "unsupported", "presence_penalty", "repetition penalties");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"logit_bias\":{\"5\":1}}", 400,
                   "unsupported", "logit_bias", "bias logits");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"suffix\":\"end\"}", 400, "unsupported",
                   "suffix", "not supported");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"best_of\":3}", 400, "unsupported",
                   "best_of", "rank");
    s_expect_error("/v1/chat/completions",
                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true}", 400,
                   "unsupported", "logprobs", "log probabilities");
    s_expect_error("/v1/chat/completions",
                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{}]}", 400,
                   "unsupported", "tools", "tool calls");
    s_expect_error("/v1/chat/completions",
                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                   "\"response_format\":{\"type\":\"json_object\"}}",
                   400, "unsupported", "response_format", "JSON");

    /* The neutral values of the same settings are accepted. */
    json_t *r = s_post_ok("/v1/chat/completions",
                          json_pack("{s:[{s:s, s:s}], s:i, s:f, s:i, s:i, s:o, s:b, s:n, s:[], "
                                    "s:s, s:{s:s}, s:s}",
                                    "messages", "role", "user", "content", "hi", "max_tokens", 4,
                                    "top_p", 1.0, "presence_penalty", 0, "frequency_penalty", 0,
                                    "logit_bias", json_object(), "logprobs", 0, "top_logprobs",
                                    "tools", "tool_choice", "none", "response_format", "type",
                                    "text", "user", "someone"));
    json_decref(r);
}
END_TEST

START_TEST(test_error_daemon_codes)
{
    /* Errors the daemon finds, with its field renamed to the request's. */
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"steps\":0}", 400, UM_ERR_OUT_OF_RANGE,
                   "steps", "steps must be at least 1");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"remasking\":\"nope\"}", 400,
                   UM_ERR_UNKNOWN_PLUGIN, "remasking", "low_confidence");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"max_tokens\":500}", 400,
                   UM_ERR_OUT_OF_RANGE, "max_tokens", "the gateway sends max_tokens to unmaskd "
                                                      "as gen_length");
    s_expect_error("/v1/chat/completions",
                   "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                   "\"max_completion_tokens\":500}",
                   400, UM_ERR_OUT_OF_RANGE, "max_completion_tokens", "max_completion_tokens");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"remasking_params\":{\"zzz\":1}}", 400,
                   UM_ERR_UNKNOWN_FIELD, "remasking_params.zzz", "zzz");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"frobnicate\":1}", 400,
                   UM_ERR_UNKNOWN_FIELD, "frobnicate", "not an OpenAI field");
    s_expect_error("/api/generate", "{\"prompt\":\"x\",\"gen_length\":0}", 400,
                   UM_ERR_OUT_OF_RANGE, "gen_length", "gen_length must be at least 1");
    s_expect_error("/api/generate", "{\"prompt\":\"x\",\"stream\":false}", 400,
                   UM_ERR_UNKNOWN_FIELD, "stream", "the gateway sets it");
    s_expect_error("/api/generate", "{\"prompt\":", 400, UM_ERR_BAD_JSON, NULL, "not valid JSON");
    s_expect_error("/v1/completions", "{\"prompt\":\"x\",\"stream\":true,\"steps\":0}", 400,
                   UM_ERR_OUT_OF_RANGE, "steps", "steps must be at least 1");
}
END_TEST

START_TEST(test_error_body_size)
{
    /* 2 MiB against the default limit of 1 MiB: refused from its Content-Length. */
    size_t len = 2u << 20;
    char *big = malloc(len + 1);
    memset(big, ' ', len);
    big[len] = '\0';
    s_http_t h = {0};
    s_http_to(s_stack.url, "POST", "/v1/completions", big, len, 0, &h);
    json_t *r = json_loads(h.body, 0, NULL);
    ck_assert_msg(r != NULL, "413 body: %s", h.body);
    s_expect_error_body(h.status, r, 413, "body_too_large", NULL, "over the gateway's limit");
    json_decref(r);
    free(h.body);

    /* The same body in chunks, with no length announced. */
    s_http_to(s_stack.url, "POST", "/v1/completions", big, len, 1, &h);
    r = json_loads(h.body, 0, NULL);
    ck_assert_msg(r != NULL, "413 body: %s", h.body);
    s_expect_error_body(h.status, r, 413, "body_too_large", NULL, "--max-body-size");
    json_decref(r);
    free(h.body);
    free(big);
}
END_TEST

START_TEST(test_error_routes)
{
    s_http_t h;
    s_http("GET", "/nope", NULL, &h);
    json_t *r = json_loads(h.body, 0, NULL);
    s_expect_error_body(h.status, r, 404, "not_found", NULL, "/v1/completions");
    json_decref(r);
    free(h.body);

    s_http("GET", "/v1/completions", NULL, &h);
    r = json_loads(h.body, 0, NULL);
    s_expect_error_body(h.status, r, 405, "method_not_allowed", NULL, "use POST");
    ck_assert_str_eq(h.allow, "POST");
    json_decref(r);
    free(h.body);

    s_http("POST", "/api/info", "{}", &h);
    ck_assert_int_eq(h.status, 405);
    ck_assert_str_eq(h.allow, "GET, HEAD");
    free(h.body);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Daemon down, daemon lost, the command line                                */

START_TEST(test_daemon_down)
{
    s_stack_t st = {.daemon = {.pid = -1}, .gateway = {.pid = -1}};
    const char *nobody = "ipc:///tmp/unmask-gateway-test-nobody-listens.sock";
    s_start_gateway(&st, nobody, NULL);
    const char *paths[] = {"/v1/completions", "/v1/chat/completions", "/api/generate"};
    const char *bodies[] = {"{\"prompt\":\"x\"}",
                            "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":true}",
                            "{\"prompt\":\"x\"}"};
    for (size_t i = 0; i < 3; i++) {
        s_http_t h = {0};
        s_http_to(st.url, "POST", paths[i], bodies[i], strlen(bodies[i]), 0, &h);
        json_t *r = json_loads(h.body, 0, NULL);
        ck_assert_msg(r != NULL, "%s: %s", paths[i], h.body);
        s_expect_error_body(h.status, r, 503, "daemon_unavailable", NULL, "cannot be reached");
        ck_assert_str_eq(h.retry_after, "1");
        /* The connect timeout is 1 s by default, and the rest is slack for a busy machine. */
        ck_assert_msg(h.ms < 3000, "%s took %.0f ms to report a missing daemon", paths[i], h.ms);
        json_decref(r);
        free(h.body);
    }
    s_http_t h = {0};
    s_http_to(st.url, "GET", "/api/health", NULL, 0, 0, &h);
    ck_assert_int_eq(h.status, 503);
    free(h.body);
    int status = s_stop(&st.gateway, 30000);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "unmask-gateway exit status %d after SIGTERM", status);
}
END_TEST

/*
 * A model with its own chat template (ChatML, as Dream ships): in auto mode the gateway
 * has the daemon render it, the developer role as system, so usage counts the tokens of
 * the daemon's rendering.
 */
START_TEST(test_chat_model_template)
{
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/unmask-gateway-chat-%ld", (long)getpid());
    mkdir(dir, 0755);
    static const char *const files[] = {"config.json", "model.safetensors", "tokenizer.json"};
    for (size_t i = 0; i < 3; i++) {
        char from[4096], to[256];
        snprintf(from, sizeof from, "%s/%s", um_test_env("UM_TEST_MODEL"), files[i]);
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        unlink(to);
        ck_assert_int_eq(symlink(from, to), 0);
    }
    json_t *doc = json_load_file(um_test_path(um_test_env("UM_TEST_FIXTURES"), "chat/cases.json"),
                                 0, NULL);
    ck_assert_ptr_nonnull(doc);
    json_t *config = json_object_get(json_array_get(json_object_get(doc, "templates"), 1),
                                     "tokenizer_config");
    char config_path[256];
    snprintf(config_path, sizeof config_path, "%s/tokenizer_config.json", dir);
    ck_assert_int_eq(json_dump_file(config, config_path, 0), 0);
    json_decref(doc);

    s_stack_t st = {.daemon = {.pid = -1}, .gateway = {.pid = -1}};
    const char *const extra[] = {"--model", dir, NULL};
    s_start_daemon(&st, extra);
    s_start_gateway(&st, st.endpoint, NULL);
    s_wait_healthy(&st);

    json_t *r = s_daemon_call(st.endpoint, json_pack("{s:s, s:[{s:s, s:s}, {s:s, s:s}]}", "op",
                                                     UM_OP_TOKENIZE, "messages", "role",
                                                     "system", "content", "be brief.", "role",
                                                     "user", "content", "a cat"));
    int want = (int)json_array_size(json_object_get(r, "tokens"));
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(r, "text")),
                                 "<|im_start|>system\nbe brief.<|im_end|>"));
    json_decref(r);
    char body[] = "{\"messages\": [{\"role\": \"developer\", \"content\": \"be brief.\"}, "
                  "{\"role\": \"user\", \"content\": \"a cat\"}], \"max_tokens\": 4}";
    s_http_t h = {0};
    s_http_to(st.url, "POST", "/v1/chat/completions", body, strlen(body), 0, &h);
    ck_assert_msg(h.status == 200, "status %ld: %s", h.status, h.body);
    r = json_loads(h.body, 0, NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(r, "usage"),
                                                        "prompt_tokens")), want);
    json_decref(r);
    free(h.body);

    s_stop(&st.gateway, 30000);
    s_stop(&st.daemon, 30000);
    unlink(st.endpoint + strlen("ipc://"));
    for (size_t i = 0; i < 3; i++) {
        char to[256];
        snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        unlink(to);
    }
    unlink(config_path);
    rmdir(dir);
}
END_TEST

/* A daemon that dies mid-stream ends the stream with an error event at once. */
START_TEST(test_daemon_lost)
{
    s_stack_t st = {.daemon = {.pid = -1}, .gateway = {.pid = -1}};
    s_start_daemon(&st, NULL);
    s_start_gateway(&st, st.endpoint, NULL);
    s_wait_healthy(&st);

    /* The daemon dies as soon as the first event of the stream arrives. */
    s_http_t h = {.kill_on_data = st.daemon.pid};
    const char *body = "{\"prompt\":\"once upon a time\",\"gen_length\":120,\"steps\":120}";
    s_http_to(st.url, "POST", "/api/generate", body, strlen(body), 0, &h);
    int status;
    waitpid(st.daemon.pid, &status, 0);
    st.daemon.pid = -1;

    if (h.status == 200) {
        json_t *events = s_parse_sse(h.body);
        json_t *last = json_array_get(events, json_array_size(events) - 1);
        ck_assert_str_eq(json_string_value(json_object_get(last, "event")), UM_REPLY_ERROR);
        json_t *e = s_event_json(last);
        ck_assert_str_eq(json_string_value(json_object_get(json_object_get(e, "error"), "code")),
                         "daemon_lost");
        json_decref(e);
        json_decref(events);
    } else {
        ck_abort_msg("status %ld: %s", h.status, h.body);
    }
    ck_assert_msg(h.ms < 10000, "the stream took %.0f ms to end after the daemon died", h.ms);
    free(h.body);
    s_stop(&st.gateway, 30000);
    unlink(st.endpoint + strlen("ipc://"));
}
END_TEST

/* Sets *arg (an int) once a transfer has received body bytes. */
static size_t s_on_first_bytes(char *data, size_t size, size_t n, void *arg)
{
    (void)data;
    *(int *)arg = 1;
    return size * n;
}

/* A daemon whose queue is full replies busy, which the gateway sends as 503. */
START_TEST(test_daemon_busy)
{
    s_stack_t st = {.daemon = {.pid = -1}, .gateway = {.pid = -1}};
    const char *no_queue[] = {"--max-queue", "0", "--max-batch", "1", NULL};
    s_start_daemon(&st, no_queue);
    s_start_gateway(&st, st.endpoint, NULL);
    s_wait_healthy(&st);

    /* A long generation keeps the daemon's only slot while the second request comes. */
    char url[256];
    snprintf(url, sizeof url, "%s/api/generate", st.url);
    const char *body = "{\"prompt\":\"once upon a time\",\"gen_length\":120,\"steps\":120}";
    int started = 0;
    CURL *c = curl_easy_init();
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, s_on_first_bytes);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &started);
    CURLM *m = curl_multi_init();
    curl_multi_add_handle(m, c);
    double deadline = s_now_ms() + S_REPLY_TIMEOUT_MS;
    while (!started && s_now_ms() < deadline) {
        int running = 0;
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 100, NULL);
    }
    ck_assert_msg(started, "the first generation did not start streaming");

    s_http_t h = {0};
    const char *second = "{\"prompt\":\"x\",\"max_tokens\":4}";
    s_http_to(st.url, "POST", "/v1/completions", second, strlen(second), 0, &h);
    json_t *r = json_loads(h.body, 0, NULL);
    ck_assert_msg(r != NULL, "busy body: %s", h.body);
    s_expect_error_body(h.status, r, 503, UM_ERR_BUSY, NULL, "queue is full");
    ck_assert_str_eq(h.retry_after, "1");
    json_decref(r);
    free(h.body);

    curl_multi_remove_handle(m, c);
    curl_easy_cleanup(c);
    curl_multi_cleanup(m);
    s_stop(&st.gateway, 30000);
    s_stop(&st.daemon, 30000);
    unlink(st.endpoint + strlen("ipc://"));
}
END_TEST

/* Run the gateway binary with args and return its exit status; its stdout goes to out. */
static int s_run_gateway(const char *const *args, char *out, size_t cap)
{
    const char *argv[16] = {um_test_env("UM_TEST_GATEWAY")};
    int argc = 1;
    for (int i = 0; args[i] && argc < 15; i++)
        argv[argc++] = args[i];
    argv[argc] = NULL;
    int fds[2];
    ck_assert(pipe(fds) == 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDERR_FILENO);
    pid_t pid;
    ck_assert(posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ) == 0);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    size_t len = 0;
    ssize_t got;
    while (len + 1 < cap && (got = read(fds[0], out + len, cap - 1 - len)) > 0)
        len += (size_t)got;
    out[len] = '\0';
    close(fds[0]);
    int status;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

START_TEST(test_command_line)
{
    char out[8192];
    const char *help[] = {"--help", NULL};
    ck_assert_int_eq(s_run_gateway(help, out, sizeof out), 0);
    const char *options[] = {"--connect", "--listen", "--port", "--model-name", "--chat-template",
                             "--max-body-size", "--max-connections", "--connect-timeout",
                             "--timeout", "--log-level", "gateway.md"};
    for (size_t i = 0; i < sizeof options / sizeof options[0]; i++)
        ck_assert_msg(strstr(out, options[i]) != NULL, "--help lacks %s", options[i]);

    const char *version[] = {"--version", NULL};
    ck_assert_int_eq(s_run_gateway(version, out, sizeof out), 0);
    ck_assert_msg(strstr(out, PACKAGE_VERSION) != NULL, "--version: %s", out);

    const char *bad_port[] = {"--port", "70000", NULL};
    ck_assert_int_eq(s_run_gateway(bad_port, out, sizeof out), 2);
    ck_assert_msg(strstr(out, "--port must be a whole number in [0, 65535]") != NULL, "%s", out);
    const char *bad_template[] = {"--chat-template", "jinja", NULL};
    ck_assert_int_eq(s_run_gateway(bad_template, out, sizeof out), 2);
    ck_assert_msg(strstr(out, "auto, model, llada or plain") != NULL, "%s", out);
    const char *bad_listen[] = {"--listen", "example.org", "--port", "0", NULL};
    ck_assert_int_eq(s_run_gateway(bad_listen, out, sizeof out), 1);
    ck_assert_msg(strstr(out, "not a numeric IPv4 or IPv6 address") != NULL, "%s", out);
    const char *bad_endpoint[] = {"--connect", "nowhere:5557", "--port", "0", NULL};
    ck_assert_int_eq(s_run_gateway(bad_endpoint, out, sizeof out), 1);
    ck_assert_msg(strstr(out, "cannot connect to nowhere:5557") != NULL, "%s", out);
}
END_TEST

/* ------------------------------------------------------------------------- */

static TCase *s_tcase(const char *name)
{
    TCase *tc = tcase_create(name);
    tcase_add_unchecked_fixture(tc, s_setup_stack, s_teardown_stack);
    tcase_set_timeout(tc, 300);
    return tc;
}

Suite *um_gateway_suite(void)
{
    Suite *s = suite_create("gateway");

    TCase *tc = s_tcase("endpoints");
    tcase_add_test(tc, test_page);
    tcase_add_test(tc, test_models_info_health);
    tcase_add_test(tc, test_completion);
    tcase_add_test(tc, test_completion_stream);
    tcase_add_test(tc, test_completion_echo_stop_n);
    tcase_add_test(tc, test_completion_diffusion_fields);
    tcase_add_test(tc, test_completion_default_length);
    tcase_add_test(tc, test_chat);
    tcase_add_test(tc, test_step_stream);
    tcase_add_test(tc, test_disconnect_cancels);
    suite_add_tcase(s, tc);

    tc = s_tcase("errors");
    tcase_add_test(tc, test_error_json_and_types);
    tcase_add_test(tc, test_error_unsupported);
    tcase_add_test(tc, test_error_daemon_codes);
    tcase_add_test(tc, test_error_body_size);
    tcase_add_test(tc, test_error_routes);
    suite_add_tcase(s, tc);

    tc = tcase_create("lifecycle");
    tcase_set_timeout(tc, 300);
    tcase_add_unchecked_fixture(tc, s_setup_curl, s_teardown_curl);
    tcase_add_test(tc, test_daemon_down);
    tcase_add_test(tc, test_chat_model_template);
    tcase_add_test(tc, test_daemon_lost);
    tcase_add_test(tc, test_daemon_busy);
    tcase_add_test(tc, test_command_line);
    suite_add_tcase(s, tc);
    return s;
}

#else /* !HAVE_LIBCURL */

#include "testutil.h"

START_TEST(test_needs_libcurl)
{
    ck_abort_msg("the gateway tests need libcurl: install the Debian package "
                 "libcurl4-openssl-dev and rerun ./configure");
}
END_TEST

Suite *um_gateway_suite(void)
{
    Suite *s = suite_create("gateway");
    TCase *tc = tcase_create("libcurl");
    tcase_add_test(tc, test_needs_libcurl);
    suite_add_tcase(s, tc);
    return s;
}

#endif /* HAVE_LIBCURL */
