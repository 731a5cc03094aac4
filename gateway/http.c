/* The gateway's HTTP server: see http.h and docs/gateway.md. */
#include "config.h"

#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include <unmaskd/protocol.h>

#include "buf.h"
#include "log.h"
#include "openai.h"

/* Idle seconds after which a connection is closed. Streams send keep-alive comments
   more often than this. */
#define S_CONNECTION_TIMEOUT_S 60
/* How long stopping waits for running requests to send their last event. */
#define S_STOP_WAIT_MS 10000
/* Block size of the reads libmicrohttpd makes from a stream. */
#define S_STREAM_BLOCK 16384

/* One HTTP request, from its headers until libmicrohttpd reports it complete. */
typedef struct s_request {
    um_gw_t *gw;
    struct MHD_Connection *conn;
    um_gw_buf_t body;
    int too_big;         /* the body is over the limit, so its bytes are dropped */
    char method[16];
    char path[160];
    int status;          /* HTTP status sent, for the log */
    double t_start_ms;
} s_request_t;

typedef enum s_stream_kind {
    S_STREAM_RELAY,  /* /api/generate: every daemon reply as an event */
    S_STREAM_OPENAI, /* OpenAI chunks */
} s_stream_kind_t;

/* A server-sent-event response. It owns its session, so it outlives the request. */
typedef struct s_stream {
    um_gw_t *gw;
    struct MHD_Connection *conn;
    s_stream_kind_t kind;
    um_gw_session_t *session;
    um_gw_oai_t oai;        /* S_STREAM_OPENAI */
    char gen_id[48];        /* S_STREAM_RELAY: the generate request's id */
    int daemon_final;       /* S_STREAM_RELAY: the daemon's final reply arrived */
    double last_reply_ms;
    um_gw_buf_t out;        /* events not yet handed to libmicrohttpd */
    int over;               /* no event follows what is in out */
} s_stream_t;

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/*
 * The abort check of every session: the gateway stops, or the HTTP client has closed
 * its end of the connection (which poll reports as POLLRDHUP or POLLHUP). NOTE: a
 * client that shuts down only its sending side after the request (shutdown(SHUT_WR))
 * looks the same and loses its request. Common HTTP clients keep both sides open.
 */
static int s_client_gone(struct MHD_Connection *conn, um_gw_t *gw)
{
    if (atomic_load(&gw->stopping))
        return 1;
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!info)
        return 0;
    struct pollfd p = {.fd = info->connect_fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

static int s_request_abort(void *arg)
{
    s_request_t *r = arg;
    return s_client_gone(r->conn, r->gw);
}

static int s_stream_abort(void *arg)
{
    s_stream_t *st = arg;
    return s_client_gone(st->conn, st->gw);
}

/* ------------------------------------------------------------------------- */
/* Responses                                                                 */

/*
 * Queue a response of len bytes (copied) with a content type and an optional extra
 * header (name NULL for none).
 */
static enum MHD_Result s_respond(s_request_t *r, int status, const char *content_type,
                                 const void *data, size_t len, const char *header,
                                 const char *value)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)data, MHD_RESPMEM_MUST_COPY);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (header)
        MHD_add_response_header(resp, header, value);
    r->status = status;
    enum MHD_Result rc = MHD_queue_response(r->conn, (unsigned int)status, resp);
    MHD_destroy_response(resp);
    return rc;
}

/* Queue body as JSON, releasing it. */
static enum MHD_Result s_respond_json(s_request_t *r, int status, json_t *body,
                                      const char *header, const char *value)
{
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!text) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory while building the "
                                  "response\",\"type\":\"server_error\",\"param\":null,"
                                  "\"code\":\"internal\"}}";
        return s_respond(r, 500, "application/json", oom, sizeof oom - 1, NULL, NULL);
    }
    enum MHD_Result rc = s_respond(r, status, "application/json", text, strlen(text), header,
                                   value);
    free(text);
    return rc;
}

static enum MHD_Result s_respond_error(s_request_t *r, const um_gw_error_t *e)
{
    if (e->status >= 500)
        um_warn("http", "%s %s: %d %s: %s", r->method, r->path, e->status, e->code, e->message);
    else
        um_debug("http", "%s %s: %d %s: %s", r->method, r->path, e->status, e->code,
                 e->message);
    char retry[16];
    snprintf(retry, sizeof retry, "%d", e->retry_after_s);
    return s_respond_json(r, e->status, um_gw_error_json(e),
                          e->retry_after_s > 0 ? MHD_HTTP_HEADER_RETRY_AFTER : NULL, retry);
}

static enum MHD_Result s_method_not_allowed(s_request_t *r, const char *allow)
{
    um_gw_error_t e;
    um_gw_error_set(&e, 405, "method_not_allowed", NULL, "%s is not allowed on %s: use %s",
                    r->method, r->path, allow);
    return s_respond_json(r, 405, um_gw_error_json(&e), MHD_HTTP_HEADER_ALLOW, allow);
}

/* Open a session for r, or fill e. */
static um_gw_session_t *s_open_session(s_request_t *r, um_gw_error_t *e)
{
    um_gw_session_t *s = NULL;
    if (um_gw_session_open(&r->gw->up, s_request_abort, r, &s) != 0) {
        um_gw_error_set(e, 500, UM_ERR_INTERNAL, NULL, "cannot open a ZeroMQ socket to %s: "
                        "see the gateway's log", r->gw->up.endpoint);
        return NULL;
    }
    return s;
}

/* ------------------------------------------------------------------------- */
/* Streams                                                                   */

/* Append one event: "event: TYPE" (when type is not NULL) and the data line. */
static void s_event(um_gw_buf_t *out, const char *type, const char *data)
{
    if (type)
        um_gw_buf_printf(out, "event: %s\n", type);
    um_gw_buf_printf(out, "data: %s\n\n", data);
}

/* A relay error event in the daemon's shape, for failures on the gateway's side. */
static void s_relay_error(s_stream_t *st, const um_gw_error_t *e)
{
    json_t *reply = json_pack("{s:s, s:s, s:{s:s, s:n, s:s}}", "id", st->gen_id, "type",
                              UM_REPLY_ERROR, "error", "code", e->code, "field", "message",
                              e->message);
    char *text = reply ? json_dumps(reply, JSON_COMPACT) : NULL;
    json_decref(reply);
    s_event(&st->out, UM_REPLY_ERROR, text ? text : "{}");
    free(text);
    um_warn("http", "request %s: step stream ends with %s: %s", st->gen_id, e->code, e->message);
}

/* Append a daemon reply as an event named after its type. Returns 1 for a final reply. */
static int s_relay_reply(s_stream_t *st, json_t *reply)
{
    const char *type = um_gw_reply_type(reply);
    int final = strcmp(type, UM_REPLY_STEP) != 0;
    char *text = json_dumps(reply, JSON_COMPACT);
    s_event(&st->out, type, text ? text : "{}");
    free(text);
    if (final) {
        st->daemon_final = 1;
        um_debug("http", "request %s: step stream ends with %s", st->gen_id, type);
    }
    return final;
}

/* Fill st->out with the next relay events. Returns 1 while more follow. */
static int s_relay_pump(s_stream_t *st)
{
    json_t *reply = NULL;
    int rc = um_gw_session_recv(st->session, st->gen_id, UM_GW_KEEPALIVE_MS, &reply);
    if (rc == UM_GW_TIMEOUT && s_now_ms() - st->last_reply_ms < st->gw->cfg.timeout_ms) {
        um_gw_buf_puts(&st->out, ": keep-alive\n\n");
        return 1;
    }
    if (rc == UM_GW_ABORTED && !atomic_load(&st->gw->stopping))
        return 0; /* the client left, and s_stream_free cancels the request */
    if (rc != 0) {
        um_gw_error_t e;
        um_gw_error_from_status(&e, rc, st->gw->up.endpoint);
        s_relay_error(st, &e);
        return 0;
    }
    st->last_reply_ms = s_now_ms();
    int final = s_relay_reply(st, reply);
    json_decref(reply);
    return !final;
}

/* libmicrohttpd's content reader: hands out buffered events, blocking for new ones. */
static ssize_t s_stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    s_stream_t *st = cls;
    while (st->out.len == 0) {
        if (st->over)
            return MHD_CONTENT_READER_END_OF_STREAM;
        int more = st->kind == S_STREAM_RELAY
                       ? s_relay_pump(st)
                       : um_gw_oai_stream_pump(&st->oai, st->session, &st->out);
        if (!more)
            st->over = 1;
        if (st->out.failed)
            return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t n = st->out.len < max ? st->out.len : max;
    memcpy(buf, st->out.data, n);
    um_gw_buf_consume(&st->out, n);
    return (ssize_t)n;
}

/* Released by libmicrohttpd with the response: cancels what still runs on the daemon. */
static void s_stream_free(void *cls)
{
    s_stream_t *st = cls;
    if (st->kind == S_STREAM_OPENAI) {
        um_gw_oai_clear(&st->oai);
    } else if (!st->daemon_final && st->session && st->gen_id[0]) {
        um_debug("http", "request %s: the stream ended before the daemon's final reply, "
                 "cancelling it", st->gen_id);
        um_gw_session_cancel(st->session, st->gen_id);
    }
    um_gw_session_close(&st->session);
    um_gw_buf_free(&st->out);
    free(st);
}

static s_stream_t *s_stream_new(s_request_t *r, s_stream_kind_t kind, um_gw_error_t *e)
{
    s_stream_t *st = calloc(1, sizeof *st);
    if (!st) {
        um_gw_error_set(e, 500, UM_ERR_INTERNAL, NULL, "out of memory");
        return NULL;
    }
    st->gw = r->gw;
    st->conn = r->conn;
    st->kind = kind;
    if (um_gw_session_open(&r->gw->up, s_stream_abort, st, &st->session) != 0) {
        um_gw_error_set(e, 500, UM_ERR_INTERNAL, NULL, "cannot open a ZeroMQ socket to %s: "
                        "see the gateway's log", r->gw->up.endpoint);
        free(st);
        return NULL;
    }
    return st;
}

/* Queue st as a text/event-stream response. libmicrohttpd owns st afterwards. */
static enum MHD_Result s_respond_stream(s_request_t *r, s_stream_t *st)
{
    struct MHD_Response *resp = MHD_create_response_from_callback(
        MHD_SIZE_UNKNOWN, S_STREAM_BLOCK, s_stream_read, st, s_stream_free);
    if (!resp) {
        s_stream_free(st);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream; charset=utf-8");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    /* Tells nginx-style proxies not to hold events back. */
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    r->status = 200;
    enum MHD_Result rc = MHD_queue_response(r->conn, 200, resp);
    MHD_destroy_response(resp);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Endpoints                                                                 */

/* Content-Security-Policy of the page: nothing may load from anywhere else. */
#define S_PAGE_CSP                                                                           \
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "           \
    "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'"

static enum MHD_Result s_get_page(s_request_t *r)
{
    return s_respond(r, 200, "text/html; charset=utf-8", um_gw_page_html, um_gw_page_html_len,
                     "Content-Security-Policy", S_PAGE_CSP);
}

/* Remove a reply's id and type, leaving its payload. */
static json_t *s_payload(json_t *reply)
{
    json_object_del(reply, "id");
    json_object_del(reply, "type");
    return reply;
}

/* GET /api/info: the daemon's info reply and the gateway's own details. */
static enum MHD_Result s_get_info(s_request_t *r)
{
    um_gw_error_t e;
    um_gw_session_t *s = s_open_session(r, &e);
    json_t *info = s ? um_gw_fetch_info(s, &e) : NULL;
    um_gw_session_close(&s);
    if (!info)
        return s_respond_error(r, &e);
    char model[128];
    um_gw_model_id(r->gw, info, model, sizeof model);
    json_object_set_new(info, "gateway",
                        json_pack("{s:s, s:s, s:s, s:I}", "version", PACKAGE_VERSION,
                                  "model_id", model, "daemon", r->gw->up.endpoint,
                                  "max_body_size", (json_int_t)r->gw->cfg.max_body));
    return s_respond_json(r, 200, s_payload(info), NULL, NULL);
}

/* GET /api/health: 200 with the daemon's health, or the error that reaching it gave. */
static enum MHD_Result s_get_health(s_request_t *r)
{
    um_gw_error_t e;
    um_gw_session_t *s = s_open_session(r, &e);
    if (!s)
        return s_respond_error(r, &e);
    json_t *req = json_pack("{s:s}", "op", UM_OP_HEALTH);
    json_t *reply = NULL;
    int rc = req ? um_gw_session_call(s, req, &reply) : UM_GW_NOMEM;
    json_decref(req);
    um_gw_session_close(&s);
    if (rc != 0) {
        um_gw_error_from_status(&e, rc, r->gw->up.endpoint);
        return s_respond_error(r, &e);
    }
    if (strcmp(um_gw_reply_type(reply), UM_REPLY_DONE) != 0) {
        um_gw_error_from_reply(&e, reply, NULL, NULL);
        json_decref(reply);
        return s_respond_error(r, &e);
    }
    return s_respond_json(r, 200, json_pack("{s:s, s:o}", "status", "ok", "daemon",
                                            s_payload(reply)),
                          NULL, NULL);
}

/* GET /v1/models and GET /v1/models/ID: the one model the daemon serves. */
static enum MHD_Result s_get_models(s_request_t *r, const char *id)
{
    um_gw_error_t e;
    um_gw_session_t *s = s_open_session(r, &e);
    json_t *info = s ? um_gw_fetch_info(s, &e) : NULL;
    um_gw_session_close(&s);
    if (!info)
        return s_respond_error(r, &e);
    char model[128];
    um_gw_model_id(r->gw, info, model, sizeof model);
    json_t *entry = json_pack("{s:s, s:s, s:i, s:s, s:O}", "id", model, "object", "model",
                              "created", 0, "owned_by", "unmaskd", "unmaskd",
                              json_object_get(info, "model"));
    json_decref(info);
    if (!id)
        return s_respond_json(r, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", entry),
                              NULL, NULL);
    if (strcmp(id, model) != 0) {
        json_decref(entry);
        um_gw_error_set(&e, 404, "model_not_found", "model", "model \"%s\" is not served here: "
                        "this gateway serves \"%s\"", id, model);
        return s_respond_error(r, &e);
    }
    return s_respond_json(r, 200, entry, NULL, NULL);
}

/* POST /v1/completions and POST /v1/chat/completions. */
static enum MHD_Result s_post_openai(s_request_t *r, um_gw_oai_kind_t kind)
{
    um_gw_error_t e;
    um_gw_oai_t o;
    if (um_gw_oai_parse(&o, r->gw, kind, r->body.data ? r->body.data : "", r->body.len, &e) != 0) {
        um_gw_oai_clear(&o);
        return s_respond_error(r, &e);
    }
    if (o.stream) {
        s_stream_t *st = s_stream_new(r, S_STREAM_OPENAI, &e);
        if (!st) {
            um_gw_oai_clear(&o);
            return s_respond_error(r, &e);
        }
        st->oai = o; /* the stream owns the request from here */
        if (um_gw_oai_prepare(&st->oai, st->session, &e) != 0
            || um_gw_oai_stream_begin(&st->oai, st->session, &e) != 0) {
            s_stream_free(st);
            return s_respond_error(r, &e);
        }
        return s_respond_stream(r, st);
    }

    um_gw_session_t *s = s_open_session(r, &e);
    json_t *resp = NULL;
    if (s && um_gw_oai_prepare(&o, s, &e) == 0)
        resp = um_gw_oai_run(&o, s, &e);
    um_gw_oai_clear(&o);
    um_gw_session_close(&s);
    if (!resp && s_request_abort(r)) {
        um_debug("http", "%s %s: the HTTP client left before the response", r->method, r->path);
        return MHD_NO;
    }
    return resp ? s_respond_json(r, 200, resp, NULL, NULL) : s_respond_error(r, &e);
}

/* POST /api/generate: the daemon's generate fields in, every step out as an event. */
static enum MHD_Result s_post_generate(s_request_t *r)
{
    um_gw_error_t e;
    json_error_t jerr;
    json_t *req = json_loadb(r->body.data ? r->body.data : "", r->body.len,
                             JSON_REJECT_DUPLICATES, &jerr);
    if (!req) {
        um_gw_error_set(&e, 400, UM_ERR_BAD_JSON, NULL, "the request body is not valid JSON: "
                        "%s (line %d, column %d)", jerr.text, jerr.line, jerr.column);
        return s_respond_error(r, &e);
    }
    if (!json_is_object(req)) {
        json_decref(req);
        um_gw_error_set(&e, 400, UM_ERR_BAD_JSON, NULL, "the request body must be a JSON "
                        "object with the daemon's generate fields, such as {\"prompt\": "
                        "\"once upon a time\"}");
        return s_respond_error(r, &e);
    }
    const char *reserved[] = {"op", "id", "stream"};
    for (size_t i = 0; i < 3; i++) {
        if (json_object_get(req, reserved[i])) {
            json_decref(req);
            um_gw_error_set(&e, 400, UM_ERR_UNKNOWN_FIELD, reserved[i], "unknown field \"%s\": "
                            "the gateway sets it; send only the generate fields", reserved[i]);
            return s_respond_error(r, &e);
        }
    }

    s_stream_t *st = s_stream_new(r, S_STREAM_RELAY, &e);
    if (!st) {
        json_decref(req);
        return s_respond_error(r, &e);
    }
    um_gw_upstream_new_id(&r->gw->up, st->gen_id, sizeof st->gen_id);
    json_object_set_new(req, "op", json_string(UM_OP_GENERATE));
    json_object_set_new(req, "id", json_string(st->gen_id));
    json_object_set_new(req, "stream", json_true());
    int rc = um_gw_session_send(st->session, req);
    json_decref(req);
    st->last_reply_ms = s_now_ms();
    if (rc != 0)
        st->daemon_final = 1; /* the request never reached the daemon: nothing to cancel */

    /* An invalid request fails at once and still gets an HTTP status. */
    json_t *first = NULL;
    if (rc == 0)
        rc = um_gw_session_recv(st->session, st->gen_id, UM_GW_FIRST_REPLY_WAIT_MS, &first);
    if (rc != 0 && rc != UM_GW_TIMEOUT) {
        um_gw_error_from_status(&e, rc, r->gw->up.endpoint);
        s_stream_free(st);
        return s_respond_error(r, &e);
    }
    if (first && strcmp(um_gw_reply_type(first), UM_REPLY_ERROR) == 0) {
        um_gw_error_from_reply(&e, first, NULL, NULL);
        json_decref(first);
        st->daemon_final = 1;
        s_stream_free(st);
        return s_respond_error(r, &e);
    }
    if (first) {
        st->last_reply_ms = s_now_ms();
        if (s_relay_reply(st, first))
            st->over = 1;
        json_decref(first);
    }
    um_debug("http", "request %s: step stream started", st->gen_id);
    return s_respond_stream(r, st);
}

/* ------------------------------------------------------------------------- */
/* Routing                                                                   */

static int s_is(const s_request_t *r, const char *method)
{
    return strcmp(r->method, method) == 0;
}

static enum MHD_Result s_route(s_request_t *r)
{
    /* A client that builds URLs from a base ending in "/" may send "/v1/completions/":
       one trailing slash is dropped before routing. */
    char path[256];
    size_t path_len = strlen(r->path);
    if (path_len > 1 && path_len < sizeof path && r->path[path_len - 1] == '/') {
        memcpy(path, r->path, path_len - 1);
        path[path_len - 1] = '\0';
    } else {
        snprintf(path, sizeof path, "%s", r->path);
    }
    const char *p = path_len < sizeof path ? path : r->path;
    int get = s_is(r, "GET") || s_is(r, "HEAD");
    if (strcmp(p, "/") == 0 || strcmp(p, "/index.html") == 0)
        return get ? s_get_page(r) : s_method_not_allowed(r, "GET, HEAD");
    if (strcmp(p, "/v1/completions") == 0)
        return s_is(r, "POST") ? s_post_openai(r, UM_GW_OAI_COMPLETION)
                               : s_method_not_allowed(r, "POST");
    if (strcmp(p, "/v1/chat/completions") == 0)
        return s_is(r, "POST") ? s_post_openai(r, UM_GW_OAI_CHAT) : s_method_not_allowed(r, "POST");
    if (strcmp(p, "/v1/models") == 0)
        return get ? s_get_models(r, NULL) : s_method_not_allowed(r, "GET, HEAD");
    if (strncmp(p, "/v1/models/", 11) == 0 && p[11])
        return get ? s_get_models(r, p + 11) : s_method_not_allowed(r, "GET, HEAD");
    if (strcmp(p, "/api/generate") == 0)
        return s_is(r, "POST") ? s_post_generate(r) : s_method_not_allowed(r, "POST");
    if (strcmp(p, "/api/info") == 0)
        return get ? s_get_info(r) : s_method_not_allowed(r, "GET, HEAD");
    if (strcmp(p, "/api/health") == 0)
        return get ? s_get_health(r) : s_method_not_allowed(r, "GET, HEAD");

    um_gw_error_t e;
    um_gw_error_set(&e, 404, "not_found", NULL, "no endpoint at %s: the gateway serves /, "
                    "/v1/models, /v1/completions, /v1/chat/completions, /api/info, /api/health "
                    "and /api/generate", p);
    return s_respond_error(r, &e);
}

static enum MHD_Result s_too_big(s_request_t *r, unsigned long long size)
{
    um_gw_error_t e;
    if (size)
        um_gw_error_set(&e, 413, "body_too_large", NULL, "the request body is %llu bytes, over "
                        "the gateway's limit of %zu bytes: send a shorter prompt, or start "
                        "unmask-gateway with a larger --max-body-size", size, r->gw->cfg.max_body);
    else
        um_gw_error_set(&e, 413, "body_too_large", NULL, "the request body is over the "
                        "gateway's limit of %zu bytes: send a shorter prompt, or start "
                        "unmask-gateway with a larger --max-body-size", r->gw->cfg.max_body);
    return s_respond_error(r, &e);
}

/*
 * libmicrohttpd calls this once after the headers, once per piece of the body, and
 * once more when the body is complete (*upload_data_size is 0 then).
 */
static enum MHD_Result s_handle(void *cls, struct MHD_Connection *conn, const char *url,
                                const char *method, const char *version,
                                const char *upload_data, size_t *upload_data_size,
                                void **req_cls)
{
    (void)version;
    um_gw_t *gw = cls;
    s_request_t *r = *req_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        r->gw = gw;
        r->conn = conn;
        r->t_start_ms = s_now_ms();
        atomic_fetch_add(&gw->active, 1);
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->path, sizeof r->path, "%s", url);
        *req_cls = r;
        /* A declared length over the limit is refused before any of the body is read. */
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_LENGTH);
        unsigned long long declared = cl ? strtoull(cl, NULL, 10) : 0;
        if (declared > gw->cfg.max_body)
            return s_too_big(r, declared);
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        if (!r->too_big && r->body.len + *upload_data_size > gw->cfg.max_body) {
            r->too_big = 1;
            um_gw_buf_free(&r->body);
        }
        if (!r->too_big)
            um_gw_buf_append(&r->body, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (r->too_big)
        return s_too_big(r, 0);
    if (r->body.failed) {
        um_gw_error_t e;
        um_gw_error_set(&e, 500, UM_ERR_INTERNAL, NULL, "out of memory for the request body");
        return s_respond_error(r, &e);
    }
    return s_route(r);
}

static void s_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                        enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    um_gw_t *gw = cls;
    s_request_t *r = *req_cls;
    if (!r)
        return;
    atomic_fetch_sub(&gw->active, 1);
    um_debug("http", "%s %s: %d in %.1f ms%s", r->method, r->path, r->status,
             s_now_ms() - r->t_start_ms,
             toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (connection ended early)");
    um_gw_buf_free(&r->body);
    free(r);
    *req_cls = NULL;
}

static void s_mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    um_warn("libmicrohttpd", "%s", msg);
}

/* ------------------------------------------------------------------------- */
/* Start and stop                                                            */

int um_gw_http_start(um_gw_t *gw, char *err, size_t errlen)
{
    /* "[::1]" as in URLs is accepted as well as "::1". */
    char addr[64];
    size_t n = strlen(gw->cfg.listen);
    if (strcmp(gw->cfg.listen, "localhost") == 0)
        snprintf(addr, sizeof addr, "127.0.0.1");
    else if (n >= 2 && gw->cfg.listen[0] == '[' && gw->cfg.listen[n - 1] == ']')
        snprintf(addr, sizeof addr, "%.*s", (int)(n - 2), gw->cfg.listen + 1);
    else
        snprintf(addr, sizeof addr, "%s", gw->cfg.listen);
    struct sockaddr_in v4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)gw->cfg.port)};
    struct sockaddr_in6 v6 = {.sin6_family = AF_INET6,
                              .sin6_port = htons((uint16_t)gw->cfg.port)};
    const struct sockaddr *sa;
    /* MHD_USE_ITC lets um_gw_http_stop stop accepting before it ends the requests. */
    unsigned int flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD
                         | MHD_USE_ERROR_LOG | MHD_USE_ITC;
    if (inet_pton(AF_INET, addr, &v4.sin_addr) == 1) {
        sa = (const struct sockaddr *)&v4;
    } else if (inet_pton(AF_INET6, addr, &v6.sin6_addr) == 1) {
        sa = (const struct sockaddr *)&v6;
        flags |= MHD_USE_IPv6;
    } else {
        snprintf(err, errlen, "--listen \"%s\" is not a numeric IPv4 or IPv6 address: use e.g. "
                 "127.0.0.1 or ::1", gw->cfg.listen);
        return -1;
    }

    gw->mhd = MHD_start_daemon(
        flags, (uint16_t)gw->cfg.port, NULL, NULL, s_handle, gw,
        MHD_OPTION_EXTERNAL_LOGGER, s_mhd_log, gw, /* first, so that it gets every message */
        MHD_OPTION_SOCK_ADDR, sa,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned int)gw->cfg.max_connections,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)S_CONNECTION_TIMEOUT_S,
        MHD_OPTION_NOTIFY_COMPLETED, s_completed, gw,
        MHD_OPTION_END);
    if (!gw->mhd) {
        snprintf(err, errlen, "cannot serve HTTP on %s port %d (see the libmicrohttpd message "
                 "above): is the port in use? choose another with --port, or 0 for a free one",
                 gw->cfg.listen, gw->cfg.port);
        return -1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(gw->mhd, MHD_DAEMON_INFO_BIND_PORT);
    gw->port = info ? info->port : (uint16_t)gw->cfg.port;
    return 0;
}

void um_gw_http_stop(um_gw_t *gw)
{
    if (!gw->mhd)
        return;
    /* Requests see the stopping flag within a tick of their wait, cancel their daemon
       request and send their last event. Closing the connections first would cut those
       events off. Idle keep-alive connections are not requests and are not waited for. */
    MHD_socket listen = MHD_quiesce_daemon(gw->mhd);
    double deadline = s_now_ms() + S_STOP_WAIT_MS;
    while (atomic_load(&gw->active) > 0 && s_now_ms() < deadline) {
        struct timespec pause = {.tv_nsec = 20 * 1000000L};
        nanosleep(&pause, NULL);
    }
    if (atomic_load(&gw->active) > 0)
        um_warn("http", "%d requests still running after %d ms: closing their connections",
                atomic_load(&gw->active), S_STOP_WAIT_MS);
    MHD_stop_daemon(gw->mhd);
    gw->mhd = NULL;
    if (listen != MHD_INVALID_SOCKET)
        close(listen);
}
