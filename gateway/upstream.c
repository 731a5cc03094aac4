/* The gateway's ZeroMQ sessions with the daemon: see upstream.h. */
#include "config.h"

#include "upstream.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#include <unmaskd/protocol.h>

#include "log.h"

/* Maximum wait between two checks of the abort callback. */
#define S_TICK_MS 100
/* How long a cancel waits for the cancelled request's final reply. */
#define S_CANCEL_WAIT_MS 5000

const char *um_gw_status_text(int status)
{
    switch (status) {
#define UM_GW_STATUS_TEXT(name, value, text) \
    case value:                              \
        return text;
        UM_GW_STATUS_TABLE(UM_GW_STATUS_TEXT)
#undef UM_GW_STATUS_TEXT
    default:
        return "unknown status";
    }
}

static double s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

const char *um_gw_reply_type(const json_t *reply)
{
    const char *type = json_string_value(json_object_get(reply, "type"));
    return type ? type : "";
}

/* ------------------------------------------------------------------------- */
/* Upstream                                                                  */

int um_gw_upstream_init(um_gw_upstream_t *up, const char *endpoint, int connect_timeout_ms,
                        int reply_timeout_ms, char *err, size_t errlen)
{
    memset(up, 0, sizeof *up);
    if (strlen(endpoint) >= sizeof up->endpoint) {
        snprintf(err, errlen, "the daemon endpoint is longer than %zu bytes",
                 sizeof up->endpoint - 1);
        return UM_GW_NOMEM;
    }
    snprintf(up->endpoint, sizeof up->endpoint, "%s", endpoint);
    up->connect_timeout_ms = connect_timeout_ms;
    up->reply_timeout_ms = reply_timeout_ms;
    atomic_init(&up->next_id, 1);
    up->zctx = zmq_ctx_new();
    if (!up->zctx) {
        snprintf(err, errlen, "cannot create a ZeroMQ context: %s", zmq_strerror(errno));
        return UM_GW_NOMEM;
    }
    /* Check the endpoint's syntax once here, so that a typo stops the gateway at startup
       instead of failing every request. Connecting does not need the daemon to be up. */
    void *probe = zmq_socket(up->zctx, ZMQ_DEALER);
    int rc = probe ? zmq_connect(probe, endpoint) : -1;
    int e = zmq_errno();
    if (probe) {
        int linger = 0;
        zmq_setsockopt(probe, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(probe);
    }
    if (rc != 0) {
        snprintf(err, errlen, "cannot connect to %s: %s: give an endpoint such as "
                 "tcp://127.0.0.1:5557 or ipc:///tmp/unmaskd.sock", endpoint, zmq_strerror(e));
        um_gw_upstream_fini(up);
        return UM_GW_UNREACHABLE;
    }
    return 0;
}

void um_gw_upstream_fini(um_gw_upstream_t *up)
{
    if (!up->zctx)
        return;
    int rc;
    do
        rc = zmq_ctx_term(up->zctx);
    while (rc < 0 && errno == EINTR);
    up->zctx = NULL;
}

void um_gw_upstream_new_id(um_gw_upstream_t *up, char *buf, size_t len)
{
    unsigned long n = atomic_fetch_add(&up->next_id, 1);
    snprintf(buf, len, "gw-%lu", n);
}

/* ------------------------------------------------------------------------- */
/* Sessions                                                                  */

int um_gw_session_open(um_gw_upstream_t *up, um_gw_abort_fn abort_fn, void *abort_arg,
                       um_gw_session_t **out)
{
    *out = NULL;
    um_gw_session_t *s = calloc(1, sizeof *s);
    if (!s)
        return UM_GW_NOMEM;
    s->up = up;
    s->abort_fn = abort_fn;
    s->abort_arg = abort_arg;
    s->kept = json_array();
    s->sock = zmq_socket(up->zctx, ZMQ_DEALER);
    if (!s->kept || !s->sock)
        goto fail;

    int linger = 0;
    zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger);
    /* Queue a message only on a finished connection and wait for one at most the
       connect timeout, so a daemon that is down shows as UM_GW_UNREACHABLE. */
    int immediate = 1;
    zmq_setsockopt(s->sock, ZMQ_IMMEDIATE, &immediate, sizeof immediate);
    zmq_setsockopt(s->sock, ZMQ_SNDTIMEO, &up->connect_timeout_ms,
                   sizeof up->connect_timeout_ms);

    char name[64];
    snprintf(name, sizeof name, "inproc://unmask-gateway-monitor-%lu",
             (unsigned long)atomic_fetch_add(&up->next_id, 1));
    if (zmq_socket_monitor(s->sock, name, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) != 0)
        goto fail;
    s->monitor = zmq_socket(up->zctx, ZMQ_PAIR);
    if (!s->monitor || zmq_connect(s->monitor, name) != 0)
        goto fail;
    zmq_setsockopt(s->monitor, ZMQ_LINGER, &linger, sizeof linger);

    if (zmq_connect(s->sock, up->endpoint) != 0)
        goto fail;
    *out = s;
    return 0;

fail:
    um_error("upstream", "cannot open a ZeroMQ session to %s: %s", up->endpoint,
             zmq_strerror(zmq_errno()));
    um_gw_session_close(&s);
    return UM_GW_NOMEM;
}

void um_gw_session_close(um_gw_session_t **sp)
{
    um_gw_session_t *s = *sp;
    if (!s)
        return;
    if (s->sock) {
        /* Stop the monitor first, so its PAIR end can close without events in flight. */
        zmq_socket_monitor(s->sock, NULL, 0);
        zmq_close(s->sock);
    }
    if (s->monitor)
        zmq_close(s->monitor);
    json_decref(s->kept);
    free(s);
    *sp = NULL;
}

/* Read every event the monitor has queued and update connected and lost. */
static void s_drain_monitor(um_gw_session_t *s)
{
    for (;;) {
        zmq_msg_t head;
        zmq_msg_init(&head);
        if (zmq_msg_recv(&head, s->monitor, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&head);
            return;
        }
        uint16_t event = 0;
        if (zmq_msg_size(&head) >= sizeof event)
            memcpy(&event, zmq_msg_data(&head), sizeof event);
        int more = zmq_msg_more(&head);
        zmq_msg_close(&head);
        while (more) {
            /* The second frame is the endpoint's address. */
            zmq_msg_t part;
            zmq_msg_init(&part);
            if (zmq_msg_recv(&part, s->monitor, 0) < 0) {
                zmq_msg_close(&part);
                break;
            }
            more = zmq_msg_more(&part);
            zmq_msg_close(&part);
        }
        if (event == ZMQ_EVENT_CONNECTED) {
            s->connected = 1;
        } else if (event == ZMQ_EVENT_DISCONNECTED && s->connected) {
            /* The daemon routes replies by connection, so whatever was in flight is gone,
               even when ZeroMQ reconnects. */
            s->lost = 1;
        }
    }
}

int um_gw_session_send(um_gw_session_t *s, json_t *request)
{
    s_drain_monitor(s);
    if (s->lost)
        return UM_GW_LOST;
    char *text = json_dumps(request, JSON_COMPACT);
    if (!text)
        return UM_GW_NOMEM;
    size_t len = strlen(text);
    int rc;
    do
        rc = zmq_send(s->sock, text, len, 0);
    while (rc < 0 && errno == EINTR);
    free(text);
    if (rc < 0) {
        if (errno != EAGAIN)
            um_warn("upstream", "sending to %s failed: %s", s->up->endpoint, zmq_strerror(errno));
        return UM_GW_UNREACHABLE;
    }
    return 0;
}

/* Whether reply belongs to the request id. The daemon sends a null id in the error for a
   request it could not read (bad JSON, over its size limit), which is the one waited for. */
static int s_reply_is_for(const json_t *reply, const char *id)
{
    const json_t *rid = json_object_get(reply, "id");
    if (json_is_null(rid))
        return 1;
    return json_is_string(rid) && strcmp(json_string_value(rid), id) == 0;
}

/* Take the oldest kept reply for id, or NULL. */
static json_t *s_take_kept(um_gw_session_t *s, const char *id)
{
    size_t i;
    json_t *r;
    json_array_foreach(s->kept, i, r) {
        if (s_reply_is_for(r, id)) {
            json_incref(r);
            json_array_remove(s->kept, i);
            return r;
        }
    }
    return NULL;
}

/*
 * Read every message waiting on the socket into the kept list. Returns 0, or
 * UM_GW_BAD_REPLY after a message that is not a JSON object with a type.
 */
static int s_read_available(um_gw_session_t *s)
{
    for (;;) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, s->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            return 0;
        }
        json_error_t jerr;
        json_t *reply = json_loadb(zmq_msg_data(&msg), zmq_msg_size(&msg), JSON_ALLOW_NUL, &jerr);
        size_t size = zmq_msg_size(&msg);
        zmq_msg_close(&msg);
        if (!reply || !json_is_object(reply) || !json_is_string(json_object_get(reply, "type"))) {
            um_warn("upstream", "%s sent a %zu-byte reply that is not a JSON object with a "
                    "type: %s", s->up->endpoint, size, reply ? "wrong shape" : jerr.text);
            json_decref(reply);
            return UM_GW_BAD_REPLY;
        }
        json_array_append_new(s->kept, reply);
    }
}

int um_gw_session_recv(um_gw_session_t *s, const char *id, int wait_ms, json_t **out)
{
    *out = NULL;
    double deadline = s_now_ms() + wait_ms;
    for (;;) {
        json_t *r = s_take_kept(s, id);
        if (r) {
            *out = r;
            return 0;
        }
        if (s->lost)
            return UM_GW_LOST;
        if (s->abort_fn && s->abort_fn(s->abort_arg))
            return UM_GW_ABORTED;
        double left = deadline - s_now_ms();
        if (left <= 0)
            return UM_GW_TIMEOUT;

        zmq_pollitem_t items[2] = {
            {.socket = s->sock, .events = ZMQ_POLLIN},
            {.socket = s->monitor, .events = ZMQ_POLLIN},
        };
        long tick = left < S_TICK_MS ? (long)left + 1 : S_TICK_MS;
        int n = zmq_poll(items, 2, tick);
        if (n < 0 && errno != EINTR) {
            um_warn("upstream", "polling the socket to %s failed: %s", s->up->endpoint,
                    zmq_strerror(errno));
            return UM_GW_LOST;
        }
        /* Replies first: a reply that arrived before a disconnect still counts. */
        if (n > 0 && (items[0].revents & ZMQ_POLLIN)) {
            int rc = s_read_available(s);
            if (rc != 0)
                return rc;
        }
        if (n > 0 && (items[1].revents & ZMQ_POLLIN))
            s_drain_monitor(s);
    }
}

int um_gw_session_call(um_gw_session_t *s, json_t *request, json_t **out)
{
    *out = NULL;
    char id[48];
    um_gw_upstream_new_id(s->up, id, sizeof id);
    json_object_set_new(request, "id", json_string(id));
    int rc = um_gw_session_send(s, request);
    if (rc != 0)
        return rc;
    for (;;) {
        json_t *r = NULL;
        rc = um_gw_session_recv(s, id, s->up->reply_timeout_ms, &r);
        if (rc != 0)
            return rc;
        if (strcmp(um_gw_reply_type(r), UM_REPLY_STEP) != 0) {
            *out = r;
            return 0;
        }
        json_decref(r);
    }
}

int um_gw_session_cancel_async(um_gw_session_t *s, const char *target)
{
    char id[96];
    snprintf(id, sizeof id, "%s-cancel", target);
    json_t *c = json_pack("{s:s, s:s, s:s}", "op", UM_OP_CANCEL, "id", id, "target", target);
    if (!c)
        return UM_GW_NOMEM;
    int rc = um_gw_session_send(s, c);
    json_decref(c);
    return rc;
}

void um_gw_session_cancel(um_gw_session_t *s, const char *target)
{
    if (um_gw_session_cancel_async(s, target) != 0)
        return;
    /* The HTTP side is usually gone by now, so the wait ignores the abort callback. */
    um_gw_abort_fn saved = s->abort_fn;
    s->abort_fn = NULL;
    double deadline = s_now_ms() + S_CANCEL_WAIT_MS;
    for (;;) {
        int left = (int)(deadline - s_now_ms());
        json_t *r = NULL;
        if (left <= 0 || um_gw_session_recv(s, target, left, &r) != 0) {
            um_warn("upstream", "request %s: no final reply within %d ms of its cancel",
                    target, S_CANCEL_WAIT_MS);
            break;
        }
        int final = strcmp(um_gw_reply_type(r), UM_REPLY_STEP) != 0;
        json_decref(r);
        if (final)
            break;
    }
    s->abort_fn = saved;
}
