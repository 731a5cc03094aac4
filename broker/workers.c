/*
 * The broker's back end: worker registration and heartbeats, relaying replies to
 * clients, and what happens to requests when a worker leaves or dies (see
 * docs/worker-protocol.md).
 *
 * Every message from a worker starts with its routing id. One more frame is a control
 * message; two more are [route, reply]. A reply whose route is not in the table, or
 * belongs to another worker, is late: its request already has its final reply (for
 * example an error after the worker was declared lost), so it is dropped.
 */
#include "config.h"

#include "broker_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include <unmaskd/protocol.h>

#include "log.h"

/* Late replies logged one by one before only every S_LOG_EVERY-th is. */
#define S_LOG_FIRST 20
#define S_LOG_EVERY 1000

/* ------------------------------------------------------------------------- */
/* The worker list                                                           */

int um_bk_worker_serves(const um_bk_worker_t *w, const char *model)
{
    size_t i;
    json_t *m;
    json_array_foreach(w->models, i, m) {
        if (strcmp(json_string_value(m), model) == 0)
            return 1;
    }
    return 0;
}

static um_bk_worker_t *s_find(um_broker_t *b, const um_bk_peer_t *peer)
{
    for (um_bk_worker_t *w = b->workers; w; w = w->next)
        if (w->peer.len == peer->len && memcmp(w->peer.id, peer->id, peer->len) == 0)
            return w;
    return NULL;
}

static size_t s_count(const um_broker_t *b)
{
    size_t n = 0;
    for (const um_bk_worker_t *w = b->workers; w; w = w->next)
        n++;
    return n;
}

static void s_unlink(um_broker_t *b, um_bk_worker_t *w)
{
    um_bk_worker_t **p = &b->workers;
    while (*p && *p != w)
        p = &(*p)->next;
    if (*p)
        *p = w->next;
    w->next = NULL;
}

static void s_worker_free(um_bk_worker_t *w)
{
    json_decref(w->models);
    json_decref(w->info);
    free(w);
}

/* ------------------------------------------------------------------------- */
/* Requests of a worker that is gone                                         */

/*
 * Give a request of worker w, which is gone, its outcome. lost: w died or went
 * silent, so the request may have run; otherwise w left in order and never read it.
 * A request that may be sent again goes to another worker; the others get their
 * final reply here.
 */
static void s_rescue(um_broker_t *b, um_bk_request_t *r, const um_bk_worker_t *w, int lost,
                     const char *reason)
{
    um_bk_request_release(r);
    if (r->done) {
        /* Only cancels were waiting: their target ended with its final reply. */
        um_bk_request_answer_cancels(b, r);
        um_bk_request_free(b, r);
        return;
    }
    if (r->cancel) {
        json_t *reply = um_reply_new(r->id, UM_REPLY_CANCELLED);
        if (reply)
            json_object_set_new(reply, "reason", json_string("cancel"));
        um_bk_send_client_json(b, &r->client, reply);
        um_bk_request_answer_cancels(b, r);
        um_bk_request_free(b, r);
        return;
    }

    /* The payload is kept until the worker's first reply, so it is set exactly when
       nothing came back for the request: nothing streamed. */
    int unread = !lost && r->payload;
    int retry = lost && r->retry && !r->retried && r->payload;
    um_req_error_t err = {0};
    if (unread || retry) {
        if (retry)
            r->retried = 1;
        if (um_bk_dispatch(b, r, &err) == 0) {
            if (retry)
                b->n_retried++;
            else
                b->n_rerouted++;
            um_notice("broker", "request %s: %s to worker %s after worker %s %s", r->id_text,
                      retry ? "retried" : "sent again", r->worker->name, w->name, reason);
            return;
        }
        if (!lost) {
            /* Never read, so the client gets the reason it could not be placed. */
            um_bk_send_error(b, &r->client, r->id, &err);
            um_bk_request_free(b, r);
            return;
        }
    }

    b->n_lost_requests++;
    char detail[600];
    if (retry)
        snprintf(detail, sizeof detail, "the retry found no other worker (%.400s)", err.message);
    else if (r->streamed)
        snprintf(detail, sizeof detail, "it had streamed %d steps, so it was not retried: send "
                 "it again", r->streamed);
    else if (r->retried)
        snprintf(detail, sizeof detail, "it was already retried once: send it again");
    else
        snprintf(detail, sizeof detail, "set \"retry\": true to let the broker resend such a "
                 "request once, or send it again");
    um_req_error_set(&err, UM_ERR_WORKER_LOST, NULL, "worker %s %s while it held this "
                     "request; %s", w->name, reason, detail);
    um_bk_send_error(b, &r->client, r->id, &err);
    um_bk_request_free(b, r);
}

/*
 * Remove w and settle every request it held. lost: it died or went silent (or
 * registered again, which means the same); otherwise it sent disconnect.
 */
static void s_remove(um_broker_t *b, um_bk_worker_t *w, int lost, const char *reason)
{
    s_unlink(b, w);
    size_t n_held = 0;
    for (um_bk_request_t *r = b->head; r; r = r->next)
        n_held += r->worker == w;
    if (lost) {
        b->n_lost_workers++;
        um_warn("broker", "worker %s lost: it %s; %zu requests it held get an error or a "
                "retry, %zu workers left", w->name, reason, n_held, s_count(b));
        /* In case it is alive after all: it drops its requests and registers again. */
        um_bk_send_ctl(b, &w->peer, um_bk_ctl(UM_CTL_DISCONNECT, "declared lost: it was silent "
                                             "for longer than the heartbeat allows"));
    } else {
        um_notice("broker", "worker %s left; %zu requests it never read are sent again, %zu "
                  "workers left", w->name, n_held, s_count(b));
    }
    um_bk_request_t *next;
    for (um_bk_request_t *r = b->head; r; r = next) {
        next = r->next;
        if (r->worker == w)
            s_rescue(b, r, w, lost, reason);
    }
    s_worker_free(w);
}

/* ------------------------------------------------------------------------- */
/* Control messages                                                          */

static void s_reject(um_broker_t *b, const um_bk_peer_t *peer, const char *message)
{
    um_warn("broker", "rejected a worker: %s", message);
    json_t *m = um_bk_ctl(UM_CTL_REJECT, NULL);
    if (m)
        json_object_set_new(m, "message", json_string(message));
    um_bk_send_ctl(b, peer, m);
}

/* Check a ready message; returns NULL, or a message saying what is wrong. */
static const char *s_check_ready(const json_t *msg, char *buf, size_t size)
{
    json_t *version = json_object_get(msg, "version");
    json_t *protocol = json_object_get(msg, "protocol");
    json_t *models = json_object_get(msg, "models");
    json_t *capacity = json_object_get(msg, "capacity");
    if (!json_is_integer(version) || json_integer_value(version) != UM_WORKER_PROTOCOL_VERSION) {
        snprintf(buf, size, "worker protocol version %lld is not supported (-1: missing): this "
                 "broker speaks version %d; run unmaskd and unmask-broker from the same release",
                 json_is_integer(version) ? (long long)json_integer_value(version) : -1LL,
                 UM_WORKER_PROTOCOL_VERSION);
        return buf;
    }
    if (!json_is_integer(protocol) || json_integer_value(protocol) != UM_PROTOCOL_VERSION) {
        snprintf(buf, size, "the worker speaks wire protocol %lld but this broker relays "
                 "version %d: run unmaskd and unmask-broker from the same release",
                 json_is_integer(protocol) ? (long long)json_integer_value(protocol) : -1LL,
                 UM_PROTOCOL_VERSION);
        return buf;
    }
    if (!json_is_array(models) || json_array_size(models) == 0) {
        snprintf(buf, size, "the ready message lists no models: \"models\" must be a "
                 "non-empty array of names");
        return buf;
    }
    size_t i;
    json_t *m;
    json_array_foreach(models, i, m) {
        if (!json_is_string(m) || json_string_length(m) == 0 || json_string_length(m) > 128) {
            snprintf(buf, size, "models[%zu] must be a name of 1 to 128 characters", i);
            return buf;
        }
    }
    if (!json_is_integer(capacity) || json_integer_value(capacity) < 1) {
        snprintf(buf, size, "\"capacity\" must be a whole number of at least 1");
        return buf;
    }
    return NULL;
}

static void s_register(um_broker_t *b, const um_bk_peer_t *peer, json_t *msg)
{
    um_bk_worker_t *old = s_find(b, peer);
    if (old)
        s_remove(b, old, 1, "registered again");

    char why[256];
    const char *problem = s_check_ready(msg, why, sizeof why);
    if (problem) {
        s_reject(b, peer, problem);
        return;
    }
    um_bk_worker_t *w = calloc(1, sizeof *w);
    if (!w) {
        um_error("broker", "out of memory for a new worker");
        return;
    }
    w->peer = *peer;
    w->peer.delimiter = 0;
    w->models = json_deep_copy(json_object_get(msg, "models"));
    /* NOTE: info stays as the worker sent it here; a remasking plugin that the worker
       loads later by rescanning its plugin folders is missing from info until the
       worker registers again. */
    json_t *info = json_object_get(msg, "info");
    w->info = json_is_object(info) ? json_deep_copy(info) : json_object();
    w->capacity = (size_t)json_integer_value(json_object_get(msg, "capacity"));
    const char *host = json_string_value(json_object_get(msg, "host"));
    snprintf(w->host, sizeof w->host, "%s", host ? host : "?");
    w->pid = json_integer_value(json_object_get(msg, "pid"));
    const char *name = json_string_value(json_object_get(msg, "name"));
    if (name)
        snprintf(w->name, sizeof w->name, "%s", name);
    else
        snprintf(w->name, sizeof w->name, "%s:%lld", w->host, w->pid);
    w->t_ready_ms = w->t_seen_ms = um_bk_now_ms();
    if (!w->models || !w->info) {
        s_worker_free(w);
        um_error("broker", "out of memory for a new worker");
        return;
    }

    um_bk_worker_t **tail = &b->workers;
    while (*tail)
        tail = &(*tail)->next;
    *tail = w;
    size_t i;
    json_t *m;
    json_array_foreach(w->models, i, m) {
        json_object_set_new(b->models_seen, json_string_value(m), json_true());
    }

    json_t *welcome = um_bk_ctl(UM_CTL_WELCOME, NULL);
    if (welcome) {
        json_object_set_new(welcome, "version", json_integer(UM_WORKER_PROTOCOL_VERSION));
        json_object_set_new(welcome, "heartbeat_ms", json_integer(b->cfg.heartbeat_ms));
        json_object_set_new(welcome, "liveness", json_integer(b->cfg.liveness));
    }
    um_bk_send_ctl(b, peer, welcome);
    char *models = json_dumps(w->models, JSON_COMPACT);
    um_notice("broker", "worker %s registered: models %s, capacity %zu; %zu workers",
              w->name, models ? models : "?", w->capacity, s_count(b));
    free(models);
}

static void s_control(um_broker_t *b, um_bk_worker_t *w, const um_bk_peer_t *peer,
                      const void *data, size_t len)
{
    json_t *msg = json_loadb(data, len, 0, NULL);
    const char *ctl = json_string_value(json_object_get(msg, "ctl"));
    if (!ctl) {
        um_warn("broker", "worker %s sent a %zu-byte control frame that is not a JSON object "
                "with a \"ctl\" name: ignored", w ? w->name : "(unregistered)", len);
    } else if (strcmp(ctl, UM_CTL_READY) == 0) {
        s_register(b, peer, msg);
    } else if (!w) {
        /* Typically a worker of a broker that restarted: it registers again. */
        um_info("broker", "an unregistered worker sent \"%.32s\": told to register again", ctl);
        um_bk_send_ctl(b, peer, um_bk_ctl(UM_CTL_DISCONNECT, "this broker does not know the "
                                          "worker: register again"));
    } else if (strcmp(ctl, UM_CTL_HEARTBEAT) == 0) {
        /* t_seen_ms is already updated. */
    } else if (strcmp(ctl, UM_CTL_STOPPING) == 0) {
        w->draining = 1;
        um_notice("broker", "worker %s is shutting down: no new requests go to it", w->name);
    } else if (strcmp(ctl, UM_CTL_DISCONNECT) == 0) {
        s_remove(b, w, 0, "disconnected");
    } else {
        um_warn("broker", "worker %s sent the unknown control message \"%.32s\": ignored",
                w->name, ctl);
    }
    json_decref(msg);
}

/* ------------------------------------------------------------------------- */
/* Replies                                                                   */

/* Relay one reply of worker w for route to its client. */
static void s_reply(um_broker_t *b, um_bk_worker_t *w, const unsigned char *route_frame,
                    size_t route_len, const char *data, size_t len)
{
    uint64_t route = 0;
    if (route_len == UM_BK_ROUTE_LEN)
        for (size_t i = 0; i < UM_BK_ROUTE_LEN; i++)
            route = route << 8 | route_frame[i];
    um_bk_request_t *r = route ? um_bk_request_find(b, route) : NULL;
    if (!r || r->worker != w) {
        b->n_late++;
        if (b->n_late <= S_LOG_FIRST || b->n_late % S_LOG_EVERY == 0)
            um_info("broker", "dropped a late reply from worker %s: its request already has "
                    "its final reply (%llu dropped so far)", w->name,
                    (unsigned long long)b->n_late);
        return;
    }

    json_t *reply = json_loadb(data, len, JSON_ALLOW_NUL, NULL);
    const char *type = json_string_value(json_object_get(reply, "type"));
    json_t *id = json_object_get(reply, "id");
    if (!type || !id) {
        um_error("broker", "request %s: worker %s sent a reply that is not a JSON object with "
                 "id and type", r->id_text, w->name);
        json_decref(reply);
        if (!r->done) {
            um_req_error_t err;
            um_req_error_set(&err, UM_ERR_INTERNAL, NULL, "worker %s sent a malformed reply "
                             "for this request: see the broker's log", w->name);
            um_bk_send_error(b, &r->client, r->id, &err);
            um_bk_request_release(r);
            r->done = 1;
        }
        if (r->done && !r->cancels)
            um_bk_request_free(b, r);
        return;
    }

    if (json_is_null(id) && r->id && r->cancels) {
        /* The reply to a cancel sent on for this request: give it the cancel's own id. */
        um_bk_cancel_t *c = r->cancels;
        r->cancels = c->next;
        json_object_set(reply, "id", c->id ? c->id : json_null());
        um_bk_send_client_json(b, &c->client, reply);
        json_decref(c->id);
        free(c);
        if (r->done && !r->cancels)
            um_bk_request_free(b, r);
        return;
    }
    if (r->done) {
        um_error("broker", "request %s: worker %s sent a %s reply after the final one: dropped",
                 r->id_text, w->name, type);
        json_decref(reply);
        return;
    }

    um_bk_send_client(b, &r->client, data, len);
    /* The worker read the request, so it can no longer be sent elsewhere unread. */
    free(r->payload);
    r->payload = NULL;
    if (strcmp(type, UM_REPLY_STEP) == 0) {
        r->streamed++;
        json_decref(reply);
        return;
    }
    um_debug("broker", "request %s: %s from worker %s, %.1f ms after it was accepted",
             r->id_text, type, w->name, um_bk_now_ms() - r->t_accept_ms);
    json_decref(reply);
    w->finished++;
    um_bk_request_release(r);
    r->done = 1;
    if (!r->cancels)
        um_bk_request_free(b, r);
}

/* ------------------------------------------------------------------------- */
/* Reading the back end                                                      */

/* Handle one message from the back end; -1 when none was waiting. */
static int s_read_one(um_broker_t *b)
{
    zmq_msg_t parts[3];
    size_t n_parts = 0, n_frames = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        int rc;
        do
            rc = zmq_msg_recv(&m, b->back, n_frames == 0 ? ZMQ_DONTWAIT : 0);
        while (rc < 0 && errno == EINTR && n_frames > 0);
        if (rc < 0) {
            zmq_msg_close(&m);
            if (n_frames == 0)
                return -1;
            break;
        }
        n_frames++;
        int more = zmq_msg_more(&m);
        if (n_parts < 3) {
            zmq_msg_init(&parts[n_parts]);
            zmq_msg_move(&parts[n_parts++], &m);
        }
        zmq_msg_close(&m);
        if (!more)
            break;
    }

    um_bk_peer_t peer = {0};
    peer.len = zmq_msg_size(&parts[0]);
    if (peer.len > sizeof peer.id)
        peer.len = sizeof peer.id;
    memcpy(peer.id, zmq_msg_data(&parts[0]), peer.len);
    um_bk_worker_t *w = s_find(b, &peer);
    if (w)
        w->t_seen_ms = um_bk_now_ms();

    if (n_frames == 2) {
        s_control(b, w, &peer, zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]));
    } else if (n_frames == 3 && w) {
        s_reply(b, w, zmq_msg_data(&parts[1]), zmq_msg_size(&parts[1]), zmq_msg_data(&parts[2]),
                zmq_msg_size(&parts[2]));
    } else if (n_frames == 3) {
        b->n_late++;
        um_info("broker", "a reply from an unregistered worker was dropped; it is told to "
                "register again");
        um_bk_send_ctl(b, &peer, um_bk_ctl(UM_CTL_DISCONNECT, "this broker does not know the "
                                           "worker: register again"));
    } else {
        um_warn("broker", "worker %s sent a message of %zu frames, expected 1 or 2 after the "
                "routing id: dropped", w ? w->name : "(unregistered)", n_frames - 1);
    }
    for (size_t i = 0; i < n_parts; i++)
        zmq_msg_close(&parts[i]);
    return 0;
}

void um_bk_workers_read(um_broker_t *b)
{
    for (int i = 0; i < UM_BK_BATCH; i++)
        if (s_read_one(b) != 0)
            break;
}

/* ------------------------------------------------------------------------- */
/* Heartbeats                                                                */

int um_bk_workers_timeout_ms(const um_broker_t *b, double now_ms)
{
    double due = b->t_heartbeat_ms + b->cfg.heartbeat_ms - now_ms;
    if (due < 0)
        return 0;
    return (int)due + 1;
}

void um_bk_workers_tick(um_broker_t *b, double now_ms)
{
    if (now_ms - b->t_heartbeat_ms >= b->cfg.heartbeat_ms) {
        for (um_bk_worker_t *w = b->workers; w; w = w->next)
            um_bk_send_ctl(b, &w->peer, um_bk_ctl(UM_CTL_HEARTBEAT, NULL));
        b->t_heartbeat_ms = now_ms;
    }
    /* Messages still waiting may be the silent worker's: read them before judging, but
       judge anyway once the back end has had a backlog for a whole heartbeat interval. */
    int events = 0;
    size_t size = sizeof events;
    if (zmq_getsockopt(b->back, ZMQ_EVENTS, &events, &size) == 0 && (events & ZMQ_POLLIN)) {
        if (b->t_backlog_ms == 0)
            b->t_backlog_ms = now_ms;
        if (now_ms - b->t_backlog_ms < b->cfg.heartbeat_ms)
            return;
    } else {
        b->t_backlog_ms = 0;
    }
    double expiry = (double)b->cfg.heartbeat_ms * b->cfg.liveness;
    um_bk_worker_t *next;
    for (um_bk_worker_t *w = b->workers; w; w = next) {
        next = w->next;
        double silent = now_ms - w->t_seen_ms;
        if (silent > expiry) {
            char reason[128];
            snprintf(reason, sizeof reason, "sent nothing for %.0f ms (limit %.0f ms)", silent,
                     expiry);
            s_remove(b, w, 1, reason);
        }
    }
}

void um_bk_workers_release_all(um_broker_t *b)
{
    while (b->workers) {
        um_bk_worker_t *w = b->workers;
        b->workers = w->next;
        um_bk_send_ctl(b, &w->peer, um_bk_ctl(UM_CTL_DISCONNECT, "the broker is stopping"));
        s_worker_free(w);
    }
}
